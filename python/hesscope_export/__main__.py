"""python -m hesscope_export torchvision:resnet18 --kwargs '{"num_classes": 10}' --input 3 224 224 --out resnet18.arch
python -m hesscope_export transformers:GPT2LMHeadModel --kwargs '{"n_layer": 2, "attn_implementation": "eager"}' --tokens 64 --out gpt2.arch"""
import argparse
import importlib
import json
import sys

import torch

from . import UnsupportedOp, export


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hesscope_export", description=__doc__)
    ap.add_argument("factory", help="MODULE:FUNCTION returning an nn.Module, e.g. torchvision:resnet18 "
                    "(torchvision:NAME is looked up in torchvision.models)")
    ap.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory")
    shape = ap.add_mutually_exclusive_group(required=True)
    shape.add_argument("--input", nargs=3, type=int, metavar=("C", "H", "W"), help="an image model's input")
    shape.add_argument("--tokens", type=int, metavar="T", help="a language model's sequence length")
    ap.add_argument("--out", required=True, help="the architecture file to write")
    ap.add_argument("--weights", help="also write the module's state_dict here (safetensors)")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building the module")
    a = ap.parse_args(argv)
    mod_name, _, fn_name = a.factory.partition(":")
    if not fn_name:
        ap.error(f"factory {a.factory!r}: MODULE:FUNCTION expected")
    module = importlib.import_module("torchvision.models" if mod_name == "torchvision" else mod_name)
    try:
        factory = getattr(module, fn_name)
    except AttributeError:
        ap.error(f"{mod_name} has no {fn_name}")
    torch.manual_seed(a.seed)
    kwargs = json.loads(a.kwargs)
    config_class = getattr(factory, "config_class", None)
    if mod_name == "transformers" and config_class is not None:
        # A Hugging Face model class: --kwargs is its config.
        model = factory(config_class(**kwargs))
    else:
        model = factory(**kwargs)
    example = torch.zeros(2, a.tokens, dtype=torch.long) if a.tokens else torch.zeros(2, *a.input)
    try:
        export(model, example, a.out, name=fn_name)
    except UnsupportedOp as e:
        print(f"hesscope_export: {a.factory}: {e}", file=sys.stderr)
        return 1
    if a.weights:
        from safetensors.torch import save_file
        # Cloned: tied tensors (GPT-2's lm_head.weight) share memory, which
        # safetensors refuses; the file keeps both names, as the state_dict.
        save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, a.weights)
    print(f"wrote {a.out}" + (f" and {a.weights}" if a.weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

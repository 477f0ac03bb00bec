"""python -m hesscope_export torchvision:resnet18 --kwargs '{"num_classes": 10}' --input 3 224 224 --out resnet18.arch"""
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
    ap.add_argument("--input", nargs=3, type=int, required=True, metavar=("C", "H", "W"))
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
    model = factory(**json.loads(a.kwargs))
    try:
        export(model, torch.zeros(2, *a.input), a.out, name=fn_name)
    except UnsupportedOp as e:
        print(f"hesscope_export: {a.factory}: {e}", file=sys.stderr)
        return 1
    if a.weights:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.weights)
    print(f"wrote {a.out}" + (f" and {a.weights}" if a.weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

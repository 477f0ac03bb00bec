"""Exports the fifteen torchvision CNNs of issue 26 into a folder: for each,
NAME.arch (hesscope_export), NAME.safetensors (its state_dict, BN perturbed
as in models.py). Each file is checked against its module: the tensors its
conv/bn/linear lines declare are the state_dict's (num_batches_tracked
aside), and the parameters come in model.parameters() order. A refusal or a
mismatch is reported and makes the exit status 1.
    PYTHONPATH=python python3 python/tests/export_all.py OUT_DIR [--size 64] [NAME ...]"""
import argparse, os, sys, time
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from models import MODELS, build  # noqa: E402
from hesscope_export import UnsupportedOp, export  # noqa: E402


def declared(text):
    """The tensor names a file's layer lines declare, in file order:
    (parameters, buffers)."""
    params, buffers = [], []
    for line in text.splitlines():
        if " = " not in line or line.startswith("#"):
            continue
        name, rest = line.split(" = ", 1)
        kw, args = rest.split("(", 1)[0], rest.split(")", 1)[1].split()
        opts = dict(a.split("=", 1) for a in args if "=" in a)
        if kw in ("conv", "linear"):
            params.append(f"{name}.weight")
            if opts.get("bias", "true") == "true":
                params.append(f"{name}.bias")
        elif kw == "bn":
            params += [f"{name}.weight", f"{name}.bias"]
            buffers += [f"{name}.running_mean", f"{name}.running_var"]
    return params, buffers


def check_names(m, text):
    """None, or what differs between the file's tensors and the module's."""
    params, buffers = declared(text)
    want = [n for n, _ in m.named_parameters()]
    want_buffers = [n for n, _ in m.named_buffers() if not n.endswith("num_batches_tracked")]
    if sorted(params) != sorted(want) or sorted(buffers) != sorted(want_buffers):
        missing = sorted(set(want + want_buffers) - set(params + buffers))
        extra = sorted(set(params + buffers) - set(want + want_buffers))
        return f"tensors differ: missing {missing[:5]}, extra {extra[:5]}"
    if params != want:
        i = next(i for i, (a, b) in enumerate(zip(params, want)) if a != b)
        return f"parameter order differs from model.parameters() at {i}: {params[i]} vs {want[i]}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("names", nargs="*", default=MODELS)
    ap.add_argument("--size", type=int, default=64, help="input side (3×S×S)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    failed = []
    for name in a.names:
        t = time.time()
        m = build(name)
        path = os.path.join(a.out, f"{name}.arch")
        try:
            text = export(m, torch.zeros(2, 3, a.size, a.size), path, name=name)
        except UnsupportedOp as e:
            print(f"{name}: REFUSED: {e}", flush=True)
            failed.append(name)
            continue
        bad = check_names(m, text)
        if bad:
            print(f"{name}: {bad}", flush=True)
            failed.append(name)
            continue
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(a.out, f"{name}.safetensors"))
        n_params = sum(p.numel() for p in m.parameters())
        print(f"{name}: {len(text.splitlines()) - 4} layers, {n_params} parameters [{time.time() - t:.1f} s]", flush=True)
    if failed:
        print(f"failed: {' '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

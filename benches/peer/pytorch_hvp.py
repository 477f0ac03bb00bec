#!/usr/bin/env python3
"""The PyTorch peer of `hesscope bench`: the same model, weights and data files, gradient and
Hessian-vector product in FP32 (TF32 off) by double backward (as PyHessian does) and by
torch.func's jvp-of-grad (forward-over-reverse, what hesscope computes), timed with device
synchronisation. Also exports a model's weights and a batch of data as a user would.

  python3 benches/peer/pytorch_hvp.py --model resnet20 --weights W.safetensors --data D.safetensors --batch 128
  python3 benches/peer/pytorch_hvp.py --model resnet20 --export-weights W.safetensors --export-data D.safetensors
"""
import argparse, json, os, sys, time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--weights")
    ap.add_argument("--data")
    ap.add_argument("--vector")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bn", choices=["batch", "running"], default="batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export-weights")
    ap.add_argument("--export-data")
    ap.add_argument("--out-hv")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # PyTorch >= 2.9 spells "FP32 is IEEE FP32" this way (the allow_tf32
    # flags above are the older spelling); set both where they exist.
    for mod in (getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul):
        if mod is not None and hasattr(mod, "fp32_precision"):
            mod.fp32_precision = "ieee"
    torch.manual_seed(a.seed)
    model, shape, classes = build(a.model)
    if a.weights:
        model.load_state_dict(load_file(a.weights), strict=True)
    if a.export_weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.export_weights)
    if a.data:
        d = load_file(a.data)
        x, y = d["x"], d["y"].long()
    else:
        x = torch.randn(a.batch, *shape)
        y = torch.randint(0, classes, (a.batch,))
    if a.export_data:
        save_file({"x": x.contiguous(), "y": y.contiguous()}, a.export_data)
    if a.export_weights or a.export_data:
        return
    dt = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    model = model.to(dev, dt)
    model.train(a.bn == "batch")
    if a.bn == "batch":
        # Batch statistics without updating running buffers, which torch.func forbids.
        torch.func.replace_all_batch_norm_modules_(model)
    x, y = x[: a.batch].to(dev, dt), y[: a.batch].to(dev)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    if a.vector:
        vd = load_file(a.vector)
        v = {n: vd[n].to(dev, dt) for n in names}
    else:
        v = {n: torch.randn_like(p) for n, p in params.items()}
    # Running statistics must not drift between timed calls.
    state = {n: b.clone() for n, b in buffers.items()}

    def loss_fn(p):
        out = torch.func.functional_call(model, (p, state), (x,))
        return F.cross_entropy(out, y)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def grad_only():
        return torch.func.grad(loss_fn)(params)

    def hvp_double_backward():
        ps = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = loss_fn(ps)
        g = torch.autograd.grad(loss, list(ps.values()), create_graph=True)
        dot = sum((gi * v[n]).sum() for gi, n in zip(g, names))
        return torch.autograd.grad(dot, list(ps.values()))

    def hvp_jvp_of_grad():
        return torch.func.jvp(torch.func.grad(loss_fn), (params,), (v,))[1]

    def timeit(f):
        f()
        sync()
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t)
        ts.sort()
        return ts[len(ts) // 2]

    res = {
        "model": a.model, "batch": x.shape[0], "bn": a.bn, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": a.dtype, "torch": torch.__version__, "tf32": False,
        "n_params": sum(p.numel() for p in params.values()),
        "grad_s": timeit(grad_only),
        "hvp_double_backward_s": timeit(hvp_double_backward),
        "hvp_jvp_of_grad_s": timeit(hvp_jvp_of_grad),
    }
    res["hvp_over_grad_double_backward"] = res["hvp_double_backward_s"] / res["grad_s"]
    res["hvp_over_grad_jvp"] = res["hvp_jvp_of_grad_s"] / res["grad_s"]
    if a.out_hv:
        hv = hvp_jvp_of_grad()
        save_file({n: hv[n].detach().double().cpu().contiguous() for n in names}, a.out_hv)
    if a.json:
        print(json.dumps(res))
    else:
        for k, val in res.items():
            print(f"{k:>30}  {val:.6f}" if isinstance(val, float) else f"{k:>30}  {val}")


if __name__ == "__main__":
    main()

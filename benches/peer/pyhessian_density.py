#!/usr/bin/env python3
"""PyHessian's eigenvalue density on the same problem as `hesscope density`, timed: the peer
of the README's main command (issue 12's "at least 2x faster than PyHessian on the same CPU").

What it runs: PyHessian 0.1 from PyPI (`pip install torch pyhessian safetensors`), unchanged:
`pyhessian.hessian(model, CrossEntropyLoss(), dataloader=batches, cuda=False)` and
`.density(iter=STEPS, n_v=RUNS)`. That is Lanczos with full reorthogonalisation against every
earlier vector (PyHessian's `orthnormal`, one Gram-Schmidt pass, FP32), Rademacher start vectors,
and every Hessian-vector product by double backward over the whole data set: per batch a forward,
`backward(create_graph=True)` and `autograd.grad(grads, params, grad_outputs=v)`, summed with the
batch sizes as weights and divided by the sample count (`dataloader_hv_product`), so STEPS x RUNS
products, each a full sweep with its own forward (nothing cached between products). The
sample-weighted mean loss over batches is hesscope's loss too.

Two shims, both outside the timed work's arithmetic:
  * PyHessian 0.1 calls `torch.eig`, which PyTorch 2 removed (a stub that raises); where it
    does not work it is replaced by `torch.linalg.eigh` of the symmetric tridiagonal (same
    pairs, ascending order; one 90x90 eigendecomposition per run, microseconds).
  * PyHessian puts the model in eval() (BN by running buffers). hesscope's default is
    `--bn batch` (PyTorch train(): each batch normalised by its own statistics), so with
    `--bn batch` (the default here) the model is put back in train() after `hessian(...)` is
    built. The running buffers then drift between forwards, which does not change batch-mode
    outputs. `--bn running` keeps PyHessian's eval().

The problem is hesscope's default job when given hesscope's own default files:

  hesscope init  --out w.safetensors          # cnn-tiny, PyTorch-style init from --seed 0 (f64)
  hesscope synth --out d.safetensors          # the 256 synthetic samples (x f64, y i64)
  python3 benches/peer/pyhessian_density.py --weights w.safetensors --data d.safetensors
  # and, for the other side (same problem, same files):
  hesscope density --backend vulkan --weights w.safetensors --data d.safetensors --out d.json

Weights and data are cast to FP32 (hesscope's GPU kernels are f32 too). Defaults: cnn-tiny, all
samples of the file (256), batch 128, BN batch mode, 90 steps x 10 runs = 900 HVPs, torch threads
= os.cpu_count(), TF32 off (irrelevant on CPU, set anyway).

What is timed (wall seconds, time.perf_counter):
  * hvp_s: one full-data-set HVP as PyHessian computes it (`dataloader_hv_product`, i.e. what one
    Lanczos step pays), median of --hvp-repeats after one untimed call; hvp_per_batch_s is that
    over the number of batches.
  * seconds: the whole `density(iter, n_v)` call (900 HVPs + reorthogonalisation + the
    tridiagonal eigendecompositions), measured once, after the HVP timing (so warm). Imports,
    reading the files, building the model and batching the data are excluded.
  * cpu_seconds / hvp_cpu_s: the same spans in process CPU time (all threads), which tells a
    loaded machine (wall >> cpu / threads) from a quiet one; loadavg_before/after too.
  hvps is counted (calls of dataloader_hv_product during density), not assumed.

It prints one JSON line: {peer, torch_version, pyhessian_version, threads, seconds, hvps, model,
samples, batch, ...} with hvp_s, the load average before/after, and for a sanity check against
hesscope's report the loss, the extreme Ritz values over all runs and the SLQ trace estimate
(n_params x mean over runs of sum_i w_i theta_i). Those depend on the random start vectors
(PyHessian: Rademacher; hesscope: Gaussian) only through SLQ's variance; λmax and λmin converge.
On hesscope's default files (2026-12-01): loss 1.4376518 (hesscope grad: 1.4376519), λmax
2.705763 and λmin -3.103375 (hesscope density: 2.705764, -3.103376), so both sides solve the same
problem. Time it on an otherwise idle machine: with other jobs on the cores, torch's OpenMP
threads wait on each other and the wall time says little (compare cpu_seconds and the load).
"""
import argparse, importlib.metadata, json, os, statistics, sys, time, warnings

import torch
import torch.nn as nn
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build  # noqa: E402

# PyHessian 0.1 calls torch.eig, which PyTorch 2 keeps only as a stub that raises; T is
# symmetric tridiagonal, so eigh gives the same pairs.
def _eig(t, eigenvectors=False):
    lam, q = torch.linalg.eigh(t)
    return torch.stack([lam, torch.zeros_like(lam)], 1), q


try:
    torch.eig(torch.ones(1, 1), eigenvectors=True)
except (AttributeError, RuntimeError):
    torch.eig = _eig

from pyhessian import hessian  # noqa: E402

warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn-tiny")
    ap.add_argument("--weights", help="safetensors state_dict (hesscope init --out W)")
    ap.add_argument("--data", help="safetensors x/y (hesscope synth --out D)")
    ap.add_argument("--samples", type=int, help="first N samples (default: all)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bn", choices=["batch", "running"], default="batch")
    ap.add_argument("--steps", type=int, default=90, help="Lanczos steps per run (PyHessian iter)")
    ap.add_argument("--runs", type=int, default=10, help="SLQ runs (PyHessian n_v)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--hvp-repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON (with every run's Ritz values and weights)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for mod in (getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul):
        if mod is not None and hasattr(mod, "fp32_precision"):
            mod.fp32_precision = "ieee"
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(a.seed)

    model, shape, classes = build(a.model)
    if a.weights:
        sd = {k: v.float() for k, v in load_file(a.weights).items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            sys.exit(f"weights: missing {missing}, unexpected {unexpected}")
    else:
        print("note: no --weights: models.py's init from --seed, not hesscope's default",
              file=sys.stderr)
    if a.data:
        d = load_file(a.data)
        x, y = d["x"].float(), d["y"].long()
    else:
        print("note: no --data: 256 Gaussian samples, not hesscope's synthetic set",
              file=sys.stderr)
        x, y = torch.randn(256, *shape), torch.randint(0, classes, (256,))
    if a.samples:
        x, y = x[: a.samples], y[: a.samples]
    x, y = x.contiguous(), y.contiguous()
    # PyHessian only iterates its "dataloader": fixed, pre-sliced batches (no loader overhead).
    batches = [(x[i: i + a.batch], y[i: i + a.batch]) for i in range(0, x.shape[0], a.batch)]
    model = model.float()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    hc = hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    if a.bn == "batch":
        model.train()  # PyHessian set eval(); hesscope's default normalises by batch statistics

    with torch.no_grad():
        loss = sum(nn.functional.cross_entropy(model(xb), yb, reduction="sum").item()
                   for xb, yb in batches) / x.shape[0]

    calls = [0]
    inner = hc.dataloader_hv_product

    def counted(v):
        calls[0] += 1
        return inner(v)
    hc.dataloader_hv_product = counted

    load_before = os.getloadavg()
    v = [torch.randn_like(p) for p in hc.params]
    hc.dataloader_hv_product(v)  # untimed warm-up
    ts, cs = [], []
    for _ in range(a.hvp_repeats):
        t, c = time.perf_counter(), time.process_time()
        hc.dataloader_hv_product(v)
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    hvp_s, hvp_cpu_s = statistics.median(ts), statistics.median(cs)

    calls[0] = 0
    torch.manual_seed(a.seed)
    t, c = time.perf_counter(), time.process_time()
    eigs, weights = hc.density(iter=a.steps, n_v=a.runs)
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
    load_after = os.getloadavg()

    flat = [float(e) for run in eigs for e in run]
    trace = n_params * statistics.mean(
        sum(float(w) * float(e) for e, w in zip(er, wr)) for er, wr in zip(eigs, weights))
    res = {
        "peer": "pyhessian", "torch_version": torch.__version__,
        "pyhessian_version": importlib.metadata.version("pyhessian"),
        "threads": torch.get_num_threads(), "seconds": seconds, "hvps": calls[0],
        "cpu_seconds": cpu_seconds,
        "model": a.model, "samples": int(x.shape[0]), "batch": a.batch,
        "bn": a.bn, "dtype": "float32", "steps": a.steps, "runs": a.runs,
        "n_params": n_params, "batches": len(batches),
        "hvp_s": hvp_s, "hvp_cpu_s": hvp_cpu_s, "hvp_per_batch_s": hvp_s / len(batches),
        "hvp_repeats": a.hvp_repeats,
        "density_s_per_hvp": seconds / max(calls[0], 1),
        "loss": loss, "lambda_max": max(flat), "lambda_min": min(flat), "trace_slq": trace,
        "weights": a.weights, "data": a.data,
        "loadavg_before": load_before, "loadavg_after": load_after, "cpu_count": os.cpu_count(),
    }
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**res, "ritz_values": [[float(e) for e in r] for r in eigs],
                       "ritz_weights": [[float(w) for w in r] for r in weights]}, f)


if __name__ == "__main__":
    main()

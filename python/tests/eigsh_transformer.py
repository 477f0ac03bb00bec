"""`hesscope eigs` (float64 engine, --backend cpu) against scipy's eigsh on
the same Hessian: a LinearOperator of PyTorch float64 double-backward HVPs
(torch's math attention backend: the fused kernels have no double
backward), for the transformer fixtures (../shared/fixtures/tv-vit-tiny,
hf-gpt2-tiny: their weights, data and batch; the architectures
tests/data/vit-tiny.arch, gpt2-tiny.arch). Both ends: the algebraically
largest (eigsh which='LA', hesscope --which largest) and smallest ('SA',
--which smallest). Prints one JSON line per model and end with both sets of
eigenvalues and the largest relative difference |λ_h − λ_s| / |λ_s|.

GPT-2's loss is next-token cross-entropy in float64 (mean over B·(T−1)),
not Hugging Face's `labels=` loss, which casts the logits to float32.

    PYTHONPATH=python HESSCOPE=target/release/hesscope \\
        python3 python/tests/eigsh_transformer.py [--k 5] [--tol 1e-10] \\
        [--cases tv-vit-tiny hf-gpt2-tiny] [--ends largest smallest]

Needs torch, torchvision, transformers, safetensors, scipy."""
import argparse, json, os, subprocess, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.sparse.linalg import LinearOperator, eigsh

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
CASES = {"tv-vit-tiny": "vit-tiny.arch", "hf-gpt2-tiny": "gpt2-tiny.arch"}


def build(kind, cfg):
    if kind == "tv-vit-tiny":
        from torchvision.models import VisionTransformer
        return VisionTransformer(**cfg)
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation="eager"))


def operator(kind, fx):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    meta = json.load(open(os.path.join(fx, "meta.json")))
    m = build(kind, meta["config"])
    m.load_state_dict(load_file(os.path.join(fx, "weights.safetensors")))
    m = m.double().eval()
    data = load_file(os.path.join(fx, "data.safetensors"))
    ps = [p for _, p in m.named_parameters()]  # tied lm_head once, as hesscope
    n = sum(p.numel() for p in ps)
    count = [0]

    def loss_fn():
        with sdpa_kernel(SDPBackend.MATH):
            if kind == "tv-vit-tiny":
                return F.cross_entropy(m(data["x"].double()), data["y"])
            z = m(input_ids=data["x"]).logits
            return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), data["x"][:, 1:].reshape(-1))

    # The batch is one: hesscope's --batch covers the whole fixture batch.
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(loss_fn(), ps, create_graph=True)

    def hvp(v):
        count[0] += 1
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        vs, at = [], 0
        for p in ps:
            vs.append(v[at:at + p.numel()].view_as(p))
            at += p.numel()
        with sdpa_kernel(SDPBackend.MATH):
            hv = torch.autograd.grad(g, ps, grad_outputs=vs, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    return LinearOperator((n, n), matvec=hvp, dtype=np.float64), meta, count


def hesscope(kind, fx, meta, k, which, tol):
    exe = os.environ.get("HESSCOPE", os.path.join(ROOT, "target", "release", "hesscope"))
    args = [exe, "eigs", "--model", os.path.join(ROOT, "tests", "data", CASES[kind]),
            "--weights", os.path.join(fx, "weights.safetensors"),
            "--data", os.path.join(fx, "data.safetensors"), "--batch", str(meta["batch"]),
            "--backend", "cpu", "--top", str(k), "--which", which, "--tol", str(tol),
            "--steps", "2000", "--json"]
    t = time.time()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {r.stderr.strip()}")
    j = json.loads(r.stdout)
    return j, time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-10, help="hesscope eigs --tol")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--ends", nargs="+", choices=["largest", "smallest"],
                    default=["largest", "smallest"])
    a = ap.parse_args()
    worst = 0.0
    for kind in a.cases:
        fx = os.path.join(FIXTURES, kind)
        op, meta, count = operator(kind, fx)
        for which, sc in [("largest", "LA"), ("smallest", "SA")]:
            if which not in a.ends:
                continue
            count[0] = 0
            t = time.time()
            vals = eigsh(op, k=a.k, which=sc, tol=0, return_eigenvectors=False, maxiter=100000)
            ts = time.time() - t
            vals = sorted(vals, reverse=(which == "largest"))
            j, th = hesscope(kind, fx, meta, a.k, which, a.tol)
            got = j["eigenvalues"]
            rel = max(abs(x - y) / abs(y) for x, y in zip(got, vals))
            worst = max(worst, rel)
            print(json.dumps({"model": kind, "which": which, "n_params": op.shape[0],
                              "hesscope": got, "eigsh": [float(v) for v in vals],
                              "max_rel_diff": rel, "hesscope_residuals": j["residuals"],
                              "hesscope_converged": j["converged"], "hesscope_hvps": j["hvps"],
                              "hesscope_seconds": round(th, 2), "eigsh_hvps": count[0],
                              "eigsh_seconds": round(ts, 2)}), flush=True)
    print(json.dumps({"worst_max_rel_diff": worst}))


if __name__ == "__main__":
    main()

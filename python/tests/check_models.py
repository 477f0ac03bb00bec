"""Checks hesscope on the fifteen torchvision CNNs of issue 26 and
convnext_tiny (issue 25) against
PyTorch float64: for each model, exports it (hesscope_export), saves its
weights, a batch and a direction v, computes loss, gradient and Hv in
PyTorch float64 in both batch-norm modes (model.train() for batch
statistics, model.eval() for running ones; dropout and stochastic depth the
identity; Hardswish/Hardsigmoid in their clamp forms, which autograd can
differentiate twice), runs `hesscope grad` and `hesscope hvp` on each
backend, and prints one JSON line per model, mode and backend with the
relative errors (‖got − ref‖/‖ref‖ over all parameters), then a table.

    PYTHONPATH=python HESSCOPE=target/release/hesscope \
        python3 python/tests/check_models.py [NAME ...] [--size 64] [--batch 4] \
        [--backends cpu,auto] [--work DIR] [--hesscope-args '--adapter 1']

Bounds (issue 26): cpu (the float64 reference) ≤ 1e-10, GPU ≤ 1e-5 with
float64 decisions (the default). The exit status is 1 if any model fails
to export or run, or any error exceeds its bound."""
import argparse, json, os, subprocess, sys, tempfile, time
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file

sys.path.insert(0, os.path.dirname(__file__))
from models import EXTRA_MODELS, MODELS, build, clamp_forms, set_bn_mode  # noqa: E402
from hesscope_export import UnsupportedOp, export  # noqa: E402

BOUND = {"cpu": 1e-10}
GPU_BOUND = 1e-5


def rel(got, ref, names):
    num = sum(float(((got[n].double() - ref[n]) ** 2).sum()) for n in names)
    den = sum(float((ref[n] ** 2).sum()) for n in names)
    return (num / den) ** 0.5 if den > 0 else float("inf")


def reference(m, sd, x, y, v, names, batch, dtype=torch.float64):
    """PyTorch's loss, gradient and Hv (by name) in `dtype`."""
    mm = clamp_forms(build_like(m))
    mm.load_state_dict(sd)
    mm = set_bn_mode(mm.to(dtype), batch)
    ps = [dict(mm.named_parameters())[n] for n in names]
    loss = F.cross_entropy(mm(x.to(dtype)), y)
    g = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(sum((a * v[n].to(dtype)).sum() for a, n in zip(g, names)), ps)
    return float(loss.detach()), {n: t.detach() for n, t in zip(names, g)}, {n: t.detach() for n, t in zip(names, hv)}


def build_like(m):
    import copy
    return copy.deepcopy(m)


def hesscope(args):
    exe = os.environ.get("HESSCOPE", "hesscope")
    t = time.time()
    r = subprocess.run([exe] + args, capture_output=True, text=True)
    if r.returncode != 0:
        # A process killed by a signal (the kernel's OOM killer: -9) prints
        # nothing: say so rather than return an empty error.
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:]
        return None, last or [f"{args[0]}: exit status {r.returncode}, no output"], time.time() - t
    return json.loads(r.stdout), None, time.time() - t


def check(name, a, work):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    m = build(name)
    arch = os.path.join(d, f"{name}.arch")
    export(m, torch.zeros(2, 3, a.size, a.size), arch, name=name)
    full = m.state_dict()
    sd = type(full)((k, v.contiguous()) for k, v in full.items())
    # Module versions (MNASNet refuses a state_dict without its own).
    sd._metadata = getattr(full, "_metadata", None)
    save_file(sd, os.path.join(d, "w.safetensors"))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    save_file({"x": x, "y": y}, os.path.join(d, "d.safetensors"))
    names = [n for n, _ in m.named_parameters()]
    v = {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}
    save_file(v, os.path.join(d, "v.safetensors"))
    rows = []
    for mode in ("batch", "running"):
        loss, g_ref, hv_ref = reference(m, sd, x, y, v, names, mode == "batch")
        # PyTorch's own float32, the peer a GPU result compares with.
        _, g32, hv32 = reference(m, sd, x, y, v, names, mode == "batch", torch.float32)
        peer = {"model": name, "bn": mode, "backend": "pytorch-float32",
                "grad_rel": rel(g32, g_ref, names), "hv_rel": rel(hv32, hv_ref, names)}
        print(json.dumps(peer), flush=True)
        for be in a.backends.split(","):
            common = ["--model", arch, "--weights", os.path.join(d, "w.safetensors"),
                      "--data", os.path.join(d, "d.safetensors"), "--batch", str(a.batch), "--bn", mode,
                      "--backend", be, "--json"] + a.hesscope_args.split()
            gout = os.path.join(d, f"g-{mode}-{be}.safetensors")
            hout = os.path.join(d, f"hv-{mode}-{be}.safetensors")
            row = {"model": name, "bn": mode, "backend": be}
            jg, err, tg = hesscope(["grad"] + common + ["--out", gout])
            jh, err2, th = (None, None, 0.0) if err else hesscope(
                ["hvp"] + common + ["--vector", os.path.join(d, "v.safetensors"), "--out", hout])
            if err or err2:
                row["error"] = " ".join(err or err2)
            else:
                row.update({
                    "loss_rel": abs(jh["loss"] - loss) / abs(loss),
                    "grad_rel": rel(load_file(gout), g_ref, names),
                    "hv_rel": rel(load_file(hout), hv_ref, names),
                    "adapter": jh.get("adapter"),
                    "seconds": round(tg + th, 2),
                    "near": (jh.get("decisions") or {}).get("near"),
                    "flipped": (jh.get("decisions") or {}).get("flipped"),
                })
                bound = BOUND.get(be, GPU_BOUND)
                row["ok"] = max(row["loss_rel"], row["grad_rel"], row["hv_rel"]) <= bound
            print(json.dumps(row), flush=True)
            rows.append(row)
        rows.append(peer)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=MODELS + EXTRA_MODELS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--backends", default="cpu,auto", help="comma-separated --backend values")
    ap.add_argument("--work", help="folder for the files (default: a temporary one)")
    ap.add_argument("--hesscope-args", default="",
                    help="more arguments for every hesscope run (e.g. '--adapter 1')")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="hesscope-models-")
    rows = []
    for name in a.names:
        try:
            rows += check(name, a, work)
        except UnsupportedOp as e:
            print(json.dumps({"model": name, "error": f"export refused: {e}"}), flush=True)
            rows.append({"model": name, "error": str(e)})
    print(f"\n{'model':<20} {'bn':<8} {'backend':<8} {'loss':>9} {'grad':>9} {'Hv':>9}")
    for r in rows:
        if r.get("backend") == "pytorch-float32":
            print(f"{r['model']:<20} {r['bn']:<8} {'torch32':<8} {'':>9} {r['grad_rel']:9.1e} {r['hv_rel']:9.1e}")
            continue
        if "error" in r:
            print(f"{r['model']:<20} {r.get('bn', ''):<8} {r.get('backend', ''):<8} ERROR {r['error']}")
        else:
            flag = "" if r["ok"] else "  OVER BOUND"
            print(f"{r['model']:<20} {r['bn']:<8} {r['backend']:<8} {r['loss_rel']:9.1e} "
                  f"{r['grad_rel']:9.1e} {r['hv_rel']:9.1e}{flag}")
    bad = [r for r in rows if "error" in r or not r.get("ok", True)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

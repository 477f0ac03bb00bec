"""GPT-2 small (GPT2LMHeadModel(GPT2Config()), 124 M parameters, random
init, eager attention) at batch 1 and T tokens: exports it with
hesscope_export, writes weights (float32 state_dict), data (x int64 [1, T])
and v (N(0,1) float32) to --work, and with --torch DTYPE times PyTorch's
double-backward HVP in that dtype (one gradient, then one HVP through it),
printing one JSON line with the seconds, the peak RSS (ru_maxrss) and, for
float64, the Hv saved to WORK/hv-torch64.safetensors to check hesscope's
against. Loss: next-token cross-entropy taken in DTYPE (mean over T−1).

    PYTHONPATH=python python3 python/tests/gpt2_small_bench.py --work DIR --tokens 256 --export
    PYTHONPATH=python python3 python/tests/gpt2_small_bench.py --work DIR --torch float32
    PYTHONPATH=python python3 python/tests/gpt2_small_bench.py --work DIR --torch float64
    python3 python/tests/gpt2_small_bench.py --work DIR --compare HV.safetensors"""
import argparse, json, os, resource, sys, time
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def model(n_layer=None):
    from transformers import GPT2Config, GPT2LMHeadModel
    kw = {} if n_layer is None else {"n_layer": n_layer}
    cfg = GPT2Config(attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return GPT2LMHeadModel(cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, help="n_layer (default GPT-2 small's 12)")
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--torch", choices=["float32", "float64"])
    ap.add_argument("--compare")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    W = lambda f: os.path.join(a.work, f)
    if a.export:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from hesscope_export import export
        torch.manual_seed(0)
        m = model(a.layers).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, m.config.vocab_size, (1, a.tokens), generator=g)
        export(m, x, W("gpt2-small.arch"), name="gpt2-small")
        sd = {k: t.contiguous().clone() for k, t in m.state_dict().items()}
        save_file(sd, W("weights.safetensors"))
        save_file({"x": x}, W("data.safetensors"))
        v = {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}
        save_file(v, W("v.safetensors"))
        n = sum(p.numel() for p in m.parameters())
        print(json.dumps({"exported": W("gpt2-small.arch"), "n_params": n, "tokens": a.tokens}))
    if a.torch:
        dtype = getattr(torch, a.torch)
        torch.manual_seed(0)
        m = model(a.layers)
        m.load_state_dict(load_file(W("weights.safetensors")))
        m = m.to(dtype).eval()
        x = load_file(W("data.safetensors"))["x"]
        vs = load_file(W("v.safetensors"))
        names = [n for n, _ in m.named_parameters()]
        ps = [p for _, p in m.named_parameters()]
        t0 = time.time()
        z = m(input_ids=x).logits
        loss = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), x[:, 1:].reshape(-1))
        g = torch.autograd.grad(loss, ps, create_graph=True)
        t1 = time.time()
        hv = torch.autograd.grad(g, ps, grad_outputs=[vs[n].to(dtype) for n in names])
        t2 = time.time()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if a.torch == "float64":
            save_file({n: h.contiguous() for n, h in zip(names, hv)}, W("hv-torch64.safetensors"))
        print(json.dumps({"torch": a.torch, "threads": torch.get_num_threads(), "loss": float(loss),
                          "grad_create_graph_s": round(t1 - t0, 2), "hvp_s": round(t2 - t1, 2),
                          "total_s": round(t2 - t0, 2), "peak_rss_gib": round(rss, 2)}))
    if a.compare:
        ref, got = load_file(W("hv-torch64.safetensors")), load_file(a.compare)
        num = sum(float(((got[n].double() - ref[n].double()) ** 2).sum()) for n in ref)
        den = sum(float((ref[n].double() ** 2).sum()) for n in ref)
        print(json.dumps({"hv_rel_vs_torch64": (num / den) ** 0.5}))


if __name__ == "__main__":
    main()

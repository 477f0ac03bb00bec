"""PyTorch float32's own error on a transformer fixture (../shared/fixtures/tv-vit-tiny or
hf-gpt2-tiny: its weights, data and v), the quantity that sets the GPU bound of
tests/transformer_gpu.rs (max(1e-5, 10x this)): loss, gradient and Hv computed by the library's
own model in float32 and in float64 (torchvision's VisionTransformer with the math attention
backend, which has a double backward; Hugging Face's GPT2LMHeadModel with eager attention and
its own `labels=` loss), relative 2-norm differences over all parameters. Prints one JSON line.
Needs torch, safetensors, and torchvision or transformers.
Usage: python3 transformer_f32_error.py FIXTURE_DIR"""
import json, os, sys
import torch
from safetensors.torch import load_file

fix = sys.argv[1]
meta = json.load(open(os.path.join(fix, "meta.json")))
sd = load_file(os.path.join(fix, "weights.safetensors"))
data = load_file(os.path.join(fix, "data.safetensors"))
v = load_file(os.path.join(fix, "v.safetensors"))
names = meta["parameters"]
vit = "VisionTransformer" in meta["source"]


def build():
    if vit:
        from torchvision.models import VisionTransformer
        return VisionTransformer(**meta["config"])
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(**meta["config"], attn_implementation="eager"))


def loss_of(m, dtype):
    if vit:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.cross_entropy(m(data["x"].to(dtype)), data["y"])
    return m(input_ids=data["x"], labels=data["x"]).loss


def passes(dtype):
    m = build()
    m.load_state_dict(sd)
    m = m.to(dtype).eval()
    ps = [dict(m.named_parameters())[n] for n in names]
    if vit:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(SDPBackend.MATH)
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        loss = loss_of(m, dtype)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        hv = torch.autograd.grad(sum((a * v[n].to(dtype)).sum() for a, n in zip(g, names)), ps)
    return float(loss.detach()), [t.detach().double() for t in g], [t.detach().double() for t in hv]


def rel(a, b):
    num = sum(((p - q) ** 2).sum() for p, q in zip(a, b)) ** 0.5
    return float(num / sum((p ** 2).sum() for p in a) ** 0.5)


l64, g64, hv64 = passes(torch.float64)
l32, g32, hv32 = passes(torch.float32)
print(json.dumps({
    "fixture": os.path.basename(os.path.normpath(fix)),
    "loss": abs(l32 - l64) / abs(l64),
    "grad": rel(g64, g32),
    "hv": rel(hv64, hv32),
    "meta": meta["pytorch_float32_rel_error"],
}))

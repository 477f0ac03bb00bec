"""All-float64 PyTorch reference for tests/transformer_fixtures.rs on the
fixture ../shared/fixtures/hf-gpt2-tiny (its weights, data and v): Hugging
Face's GPT2LMHeadModel (eager attention) in float64 with the next-token
cross-entropy taken in float64 too. The fixture's own refs use the model's
`labels=` loss, whose ForCausalLMLoss casts the logits to float32
(`logits.float()`) before the cross-entropy, so they carry float32
rounding (about 5e-8 relative); this script's do not. Writes OUT/grad.safetensors
and OUT/hv.safetensors and prints one JSON line with the loss and Hugging
Face's own (float32-cast) loss. Needs torch, safetensors, transformers.
Usage: python3 gpt2_tiny_reference.py FIXTURE_DIR OUT"""
import json, os, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

fix, out = sys.argv[1], sys.argv[2]
meta = json.load(open(os.path.join(fix, "meta.json")))
sd = load_file(os.path.join(fix, "weights.safetensors"))
ids = load_file(os.path.join(fix, "data.safetensors"))["x"]
v = load_file(os.path.join(fix, "v.safetensors"))
names = meta["parameters"]
m = GPT2LMHeadModel(GPT2Config(**meta["config"], attn_implementation="eager"))
m.load_state_dict(sd)
m = m.double().eval()
ps = [dict(m.named_parameters())[n] for n in names]
z = m(input_ids=ids).logits
loss = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))
g = torch.autograd.grad(loss, ps, create_graph=True)
hv = torch.autograd.grad(sum((a * v[n].double()).sum() for a, n in zip(g, names)), ps)
save_file({n: t.detach().contiguous() for n, t in zip(names, g)}, os.path.join(out, "grad.safetensors"))
save_file({n: t.detach().contiguous() for n, t in zip(names, hv)}, os.path.join(out, "hv.safetensors"))
with torch.no_grad():
    hf = m(input_ids=ids, labels=ids).loss
print(json.dumps({"loss": float(loss), "loss_hf": float(hf)}))

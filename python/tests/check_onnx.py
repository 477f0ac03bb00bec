"""Exports a torchvision model to ONNX unfolded (batch norm perturbed),
runs hesscope's hvp on the .onnx file (weights from its initializers, and
once from the state_dict) and prints one JSON line: for each BN mode, the
loss and Hv of each backend relative to PyTorch float64 (and the cpu
gradient, `cpu-grad`). Also exports it
folded (eval mode, constant folding) and runs hesscope on it with the
state_dict: refused naming a batch-norm tensor where the model has batch
norms; else (SqueezeNet) read, its Hv in `folded.hv_rel`. Run in a scratch folder:
HESSCOPE=path/to/hesscope python check_onnx.py NAME C H W [BACKEND ...]
(BATCH=B sets the batch, 4 by default; the export uses it too, since
ShuffleNet's reshapes bake it in). The PyTorch references use the clamp
forms of Hardswish/Hardsigmoid (which PyTorch can double-backward) and
keep dropout the identity in both BN modes, as hesscope reads it.
(tests/onnx.rs runs it on cpu wherever torch, torchvision and onnx are
installed; `cpu vulkan gl` gives the GPU's numbers, with PyTorch float32's
own error beside them)."""
import json, os, subprocess, sys, warnings
import torch, torch.nn as nn, torchvision
from safetensors.torch import save_file, load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import clamp_forms, set_bn_mode

warnings.filterwarnings("ignore")
name = sys.argv[1]
shape = tuple(int(v) for v in sys.argv[2:5])
backends = sys.argv[5:] or ["cpu"]
batch = int(os.environ.get("BATCH", "4"))
hesscope = os.environ.get("HESSCOPE", "hesscope")
torch.manual_seed(5)
m = getattr(torchvision.models, name)(num_classes=10)
bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
with torch.no_grad():
    for b in bns:
        b.weight.uniform_(0.5, 1.5); b.bias.uniform_(-0.2, 0.2)
        b.running_mean.uniform_(-0.1, 0.1); b.running_var.uniform_(0.5, 1.5)
sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
save_file(sd, "w.safetensors")
# Unfolded: training mode, no constant folding. The export runs the module
# once in train(); momentum 0 keeps the running statistics as they are.
for b in bns:
    b.momentum = 0.0
m.train()
torch.onnx.export(m, (torch.zeros(batch, *shape),), f"{name}.onnx", dynamo=False, opset_version=17,
                  training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                  input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
m.eval()
torch.onnx.export(m, (torch.zeros(batch, *shape),), f"{name}-folded.onnx", dynamo=False, opset_version=17,
                  training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
                  input_names=["x"], output_names=["logits"])
for k, v in m.state_dict().items():
    assert k.endswith("num_batches_tracked") or torch.equal(v, sd[k]), k
x = torch.randn(batch, *shape); y = torch.randint(0, 10, (batch,))
save_file({"x": x, "y": y}, "d.safetensors")
names = [n for n, _ in m.named_parameters()]
v = {n: torch.randn(p.shape, dtype=torch.float64) for n, p in m.named_parameters()}
save_file(v, "v.safetensors")
res = {}
for bn_mode in ("batch", "running"):
    mm = getattr(torchvision.models, name)(num_classes=10)
    mm.load_state_dict(sd)
    mm = set_bn_mode(clamp_forms(mm).double(), bn_mode == "batch")
    ps = [dict(mm.named_parameters())[n] for n in names]
    loss = nn.functional.cross_entropy(mm(x.double()), y)
    g = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(sum((a * v[n]).sum() for a, n in zip(g, names)), ps)
    row = {"loss": loss.item()}
    # The gradient, from hesscope's `grad` on the float64 reference.
    r = subprocess.run([hesscope, "grad", "--model", f"{name}.onnx", "--data", "d.safetensors",
                        "--batch", str(batch), "--bn", bn_mode, "--backend", "cpu",
                        "--out", f"grad-{bn_mode}.safetensors", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        row["cpu-grad"] = {"error": r.stderr.strip()}
    else:
        got = load_file(f"grad-{bn_mode}.safetensors")
        num = sum(((got[n].double() - a) ** 2).sum() for n, a in zip(names, g))
        row["cpu-grad"] = {"grad_rel": float((num / sum((a ** 2).sum() for a in g)) ** 0.5)}
    # PyTorch's own float32, for the GPU's numbers.
    m32 = getattr(torchvision.models, name)(num_classes=10)
    m32.load_state_dict(sd)
    m32 = set_bn_mode(clamp_forms(m32), bn_mode == "batch")
    p32 = [dict(m32.named_parameters())[n] for n in names]
    g32 = torch.autograd.grad(nn.functional.cross_entropy(m32(x), y), p32, create_graph=True)
    hv32 = torch.autograd.grad(sum((a * v[n].float()).sum() for a, n in zip(g32, names)), p32)
    row["pytorch_f32_hv_rel"] = float(sum(((a.double() - b) ** 2).sum() for a, b in zip(hv32, hv)) ** 0.5
                                      / sum((b ** 2).sum() for b in hv) ** 0.5)
    runs = [(be, []) for be in backends] + [("cpu-state-dict", ["--weights", "w.safetensors"])]
    for tag, extra in runs:
        be = "cpu" if tag.startswith("cpu") else tag
        out = f"hv-{tag}-{bn_mode}.safetensors"
        r = subprocess.run([hesscope, "hvp", "--model", f"{name}.onnx", *extra, "--data", "d.safetensors",
                            "--batch", str(batch), "--bn", bn_mode, "--backend", be, "--vector", "v.safetensors",
                            "--out", out, "--json"], capture_output=True, text=True)
        if r.returncode != 0:
            row[tag] = {"error": r.stderr.strip()}
            continue
        got = load_file(out)
        num = sum(((got[n].double() - h) ** 2).sum() for n, h in zip(names, hv))
        den = sum((h ** 2).sum() for h in hv)
        j = json.loads(r.stdout)
        row[tag] = {"hv_rel": float((num / den) ** 0.5), "loss_rel": abs(j["loss"] - loss.item()) / abs(loss.item())}
    res[bn_mode] = row
r = subprocess.run([hesscope, "hvp", "--model", f"{name}-folded.onnx", "--weights", "w.safetensors",
                    "--data", "d.safetensors", "--batch", str(batch), "--backend", "cpu", "--bn", "running",
                    "--vector", "v.safetensors", "--out", "hv-folded.safetensors", "--json"],
                   capture_output=True, text=True)
res["folded"] = {"status": r.returncode, "stderr": r.stderr.strip()}
if r.returncode == 0:
    # A model without batch norm folds to itself (the eval-mode export
    # only merges equal initializers): its Hv, against running mode's.
    got = load_file("hv-folded.safetensors")
    num = sum(((got[n].double() - h) ** 2).sum() for n, h in zip(names, hv))
    res["folded"]["hv_rel"] = float((num / sum((h ** 2).sum() for h in hv)) ** 0.5)
print(json.dumps(res))

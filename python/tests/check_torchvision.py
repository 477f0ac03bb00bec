"""Exports a torchvision model (batch norm perturbed), runs hesscope's hvp
on it (cpu and vulkan) and prints one JSON line: each backend's Hv relative
to PyTorch's float64, and PyTorch float32's own error. Run in a scratch
folder: HESSCOPE=path/to/hesscope python check_torchvision.py NAME C H W [batch|running]
(tests/exporter.rs runs it wherever torch and torchvision are installed)."""
import json, subprocess, sys, torch, torchvision, torch.nn as nn
from safetensors.torch import save_file, load_file
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
from hesscope_export import export
name = sys.argv[1]; shape = tuple(int(v) for v in sys.argv[2:5]); bn_mode = sys.argv[5] if len(sys.argv) > 5 else "batch"
torch.manual_seed(5)
m = getattr(torchvision.models, name)(num_classes=10)
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
        # ConvNeXt's layer scale (1e-6 at init) away from 0, so that its
        # second-order terms matter.
        if isinstance(getattr(mod, "layer_scale", None), nn.Parameter):
            mod.layer_scale.normal_(0.5, 0.1)
export(m, torch.zeros(2, *shape), f"{name}.arch")
sd = {k: v.contiguous() for k, v in m.state_dict().items()}
save_file(sd, "w.safetensors")
x = torch.randn(4, *shape); y = torch.randint(0, 10, (4,))
save_file({"x": x, "y": y}, "d.safetensors")
names = [n for n, _ in m.named_parameters()]
v = {n: torch.randn(p.shape) for n, p in m.named_parameters()}
save_file(v, "v.safetensors")
mm = m.double().train(bn_mode == "batch")
ps = [dict(mm.named_parameters())[n] for n in names]
loss = nn.functional.cross_entropy(mm(x.double()), y)
g = torch.autograd.grad(loss, ps, create_graph=True)
hv = torch.autograd.grad(sum((a * v[n].double()).sum() for a, n in zip(g, names)), ps)
m32 = getattr(torchvision.models, name)(num_classes=10); m32.load_state_dict(sd); m32 = m32.train(bn_mode == "batch")
p32 = [dict(m32.named_parameters())[n] for n in names]
l32 = nn.functional.cross_entropy(m32(x), y)
g32 = torch.autograd.grad(l32, p32, create_graph=True)
hv32 = torch.autograd.grad(sum((a * v[n]).sum() for a, n in zip(g32, names)), p32)
res = {"loss": loss.item(), "pytorch_f32_hv_rel": float(sum(((a.double()-b)**2).sum() for a,b in zip(hv32,hv))**0.5 / sum((b**2).sum() for b in hv)**0.5)}
for be in ("cpu", "vulkan"):
    r = subprocess.run([__import__("os").environ.get("HESSCOPE", "hesscope"), "hvp", "--model", f"{name}.arch", "--weights", "w.safetensors",
                        "--data", "d.safetensors", "--batch", "4", "--bn", bn_mode, "--backend", be, "--vector", "v.safetensors",
                        "--out", f"hv-{be}.safetensors", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        print(be, r.stderr); continue
    j = json.loads(r.stdout)
    got = load_file(f"hv-{be}.safetensors")
    num = sum(((got[n].double() - h) ** 2).sum() for n, h in zip(names, hv)); den = sum((h ** 2).sum() for h in hv)
    res[be] = {"hv_rel": float((num / den) ** 0.5), "loss": j["loss"], "near": j.get("decisions", {}).get("near"), "flipped": j.get("decisions", {}).get("flipped")}
print(json.dumps(res))

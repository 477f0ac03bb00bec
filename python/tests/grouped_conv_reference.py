"""PyTorch float64 reference for tests/grouped_conv_model.rs: the module of
tests/data/grouped-conv.arch (grouped, depthwise and dilated convolutions,
MaxPool2d/AvgPool2d with ceil_mode) with perturbed batch norms. Writes into
OUT: w.safetensors (its state_dict), d.safetensors (x, y), v.safetensors,
and per batch-norm mode grad-MODE.safetensors, hv-MODE.safetensors, and
prints one JSON line with the losses and the output shapes.
Usage: python3 grouped_conv_reference.py OUT"""
import copy, json, os, sys
from collections import OrderedDict
import torch, torch.nn as nn
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(3)
m = nn.Sequential(OrderedDict([
    ("c1", nn.Conv2d(3, 8, 3, padding=1, bias=False)),
    ("b1", nn.BatchNorm2d(8)), ("r1", nn.ReLU()),
    ("p1", nn.MaxPool2d(3, 2, ceil_mode=True)),
    ("g2", nn.Conv2d(8, 8, 3, padding=1, groups=2)), ("r2", nn.ReLU()),
    ("d3", nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)),
    ("b3", nn.BatchNorm2d(8)), ("r3", nn.ReLU()),
    ("x4", nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4)), ("r4", nn.ReLU()),
    ("p4", nn.AvgPool2d(3, 2, padding=1, ceil_mode=True)),
    ("dw5", nn.Conv2d(16, 32, 3, padding=1, groups=16)), ("r5", nn.ReLU()),
    ("p5", nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)),
    ("flat", nn.Flatten()),
    ("fc", nn.Linear(32 * 3 * 3, 5)),
]))
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(out, "w.safetensors"))
x = torch.randn(6, 3, 16, 16); y = torch.randint(0, 5, (6,))
save_file({"x": x, "y": y}, os.path.join(out, "d.safetensors"))
names = [n for n, _ in m.named_parameters()]
v = {n: torch.randn(p.shape) for n, p in m.named_parameters()}
save_file(v, os.path.join(out, "v.safetensors"))
res = {"shapes": []}
h = x.double()
for name, mod in copy.deepcopy(m).double().eval().named_children():
    h = mod(h); res["shapes"].append([name, list(h.shape[1:])])
for mode in ("running", "batch"):
    mm = copy.deepcopy(m).double().train(mode == "batch")
    ps = [dict(mm.named_parameters())[n] for n in names]
    loss = nn.functional.cross_entropy(mm(x.double()), y)
    g = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(sum((a * v[n].double()).sum() for a, n in zip(g, names)), ps)
    save_file({n: t.detach().contiguous() for n, t in zip(names, g)}, os.path.join(out, f"grad-{mode}.safetensors"))
    save_file({n: t.contiguous() for n, t in zip(names, hv)}, os.path.join(out, f"hv-{mode}.safetensors"))
    res[mode] = loss.item()
print(json.dumps(res))

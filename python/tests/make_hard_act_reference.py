"""Writes tests/data/hard-act/: a small network with Hardswish, ReLU6 and
Hardsigmoid (and a batch norm with eps 1e-3, as MobileNetV3's) (tests/data/hard-act/hard-act.arch is its hand-written
hesscope file), its weights (batch norm perturbed), a batch, a direction v,
and PyTorch float64's loss, gradient and Hv in both batch-norm modes
(ref-batch: model.train(), ref-running: model.eval()); tests/hard_activations.rs
holds hesscope's float64 reference to them.

PyTorch cannot differentiate nn.Hardswish / nn.Hardsigmoid twice (no
derivative for aten::hardsigmoid_backward), so the references use
x·clamp(x/6 + 1/2, 0, 1) and clamp(x/6 + 1/2, 0, 1); this script checks that
these forms give nn.Hardswish / nn.Hardsigmoid's values and first
derivatives, at the kinks ±3 too (their derivative conventions: 0 at -3,
hardswish' 1 and hardsigmoid' 0 at 3).
Run from the repository root: python3 python/tests/make_hard_act_reference.py"""
import json, os
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import save_file

OUT = "tests/data/hard-act"


class ClampHardswish(nn.Module):
    def forward(self, x):
        return x * torch.clamp(x / 6 + 0.5, 0, 1)


class ClampHardsigmoid(nn.Module):
    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0, 1)


class Net(nn.Module):
    def __init__(self, clamp=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(6, eps=1e-3)  # MobileNetV3's eps
        self.a1 = ClampHardswish() if clamp else nn.Hardswish()
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.a2 = nn.ReLU6()
        self.c3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.a3 = ClampHardsigmoid() if clamp else nn.Hardsigmoid()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        x = self.a3(self.c3(x))
        return self.fc(torch.flatten(x, 1))


def same_as_torch():
    x = torch.cat([torch.linspace(-5, 5, 101, dtype=torch.float64),
                   torch.tensor([-3.0, 3.0, 0.0], dtype=torch.float64)]).requires_grad_()
    for mine, theirs in ((ClampHardswish(), nn.Hardswish()), (ClampHardsigmoid(), nn.Hardsigmoid())):
        a, b = mine(x), theirs(x)
        assert torch.allclose(a, b, rtol=0, atol=1e-15), (mine, (a - b).abs().max())
        ga, = torch.autograd.grad(a.sum(), x)
        gb, = torch.autograd.grad(b.sum(), x)
        # PyTorch's CPU hardsigmoid_backward multiplies by 1/6 rounded to
        # float32 even in float64 (5e-9 off); the kink choices must agree.
        assert torch.allclose(ga, gb, rtol=0, atol=1e-8), (mine, ga, gb)
        assert torch.equal(ga == 0, gb == 0), (mine, ga, gb)


def main():
    same_as_torch()
    torch.manual_seed(26)
    m = Net()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                # Wide enough that every piece of every activation is hit.
                mod.weight.uniform_(1.5, 3.5); mod.bias.uniform_(-1.0, 1.0)
                mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
        m.c3.weight.mul_(4.0)
        m.b2.weight.uniform_(3.0, 5.0)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    x = torch.randn(6, 3, 8, 8); y = torch.randint(0, 5, (6,))
    names = [n for n, _ in m.named_parameters()]
    v = {n: torch.randn(p.shape) for n, p in m.named_parameters()}
    os.makedirs(OUT, exist_ok=True)
    save_file(sd, f"{OUT}/weights.safetensors")
    save_file({"x": x, "y": y}, f"{OUT}/data.safetensors")
    save_file(v, f"{OUT}/v.safetensors")
    pieces = {}
    for mode, train in (("batch", True), ("running", False)):
        mm = Net(clamp=True)
        mm.load_state_dict(sd)
        mm = mm.double().train(train)
        ps = [dict(mm.named_parameters())[n] for n in names]
        acts = {}
        for nm in ("a1", "a2", "a3"):
            getattr(mm, nm).register_forward_hook(lambda mod, i, o, nm=nm: acts.__setitem__(nm, i[0].detach()))
        loss = F.cross_entropy(mm(x.double()), y)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        hv = torch.autograd.grad(sum((a * v[n].double()).sum() for a, n in zip(g, names)), ps)
        os.makedirs(f"{OUT}/ref-{mode}", exist_ok=True)
        save_file({"loss": loss.detach().reshape(1)}, f"{OUT}/ref-{mode}/loss.safetensors")
        save_file({n: t.detach().contiguous() for n, t in zip(names, g)}, f"{OUT}/ref-{mode}/grad.safetensors")
        save_file({n: t.contiguous() for n, t in zip(names, hv)}, f"{OUT}/ref-{mode}/hv.safetensors")
        # How many inputs lie on each piece (all three must be hit).
        kinks = {"a1": (-3, 3), "a2": (0, 6), "a3": (-3, 3)}
        pieces[mode] = {nm: [int((t <= lo).sum()), int(((t > lo) & (t < hi)).sum()), int((t >= hi).sum())]
                        for nm, t in acts.items() for lo, hi in [kinks[nm]]}
        assert all(min(c) > 0 for c in pieces[mode].values()), pieces
    json.dump({"seed": 26, "batch": 6, "pieces": pieces}, open(f"{OUT}/meta.json", "w"), indent=1)
    print(json.dumps(pieces))


if __name__ == "__main__":
    main()

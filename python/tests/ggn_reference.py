"""PyTorch float64 references of the generalised Gauss–Newton product
G·v = Jᵀ H_L J v and the Hessian product H·v on one fixture of
../shared/fixtures, for tests/ggn.rs.

    python3 python/tests/ggn_reference.py FIXTURES_DIR OUT_DIR FIXTURE:BN:BATCH ...

BN is `batch` (train-mode batch norm: each batch normalised by its own
statistics) or `running` (eval mode); BATCH the samples per batch
(consecutive slices in file order, the last may be smaller). Writes
OUT_DIR/FIXTURE-BN/gv.safetensors and hv.safetensors (float64, one tensor
per trainable parameter, by name) per case, and prints one JSON line per
case with their norms.

The loss is L = (1/N)·Σ per-sample softmax cross-entropy over the N samples
(a language model: next-token cross-entropy over the N·(T−1) predicted
tokens, computed here in float64 from the logits, not through Hugging
Face's `labels=`, which casts the logits to float32). Per batch b with
logits z_b(θ) (the whole batch's logits as one function of θ: in batch-mode
batch norm the samples are coupled, and J_b is that function's Jacobian):

    u = J_b v                      torch.func.jvp of θ ↦ z_b(θ)
    w = H_L u                      (diag(p) − p pᵀ) u per row, times the loss's row scale
    G v += J_bᵀ w                  torch.func.vjp of θ ↦ z_b(θ)
    H v += ∇²L_b v                 torch.func.jvp of torch.func.grad (forward over reverse)

Everything in float64 from the fixture's float32 weights and data. The
models are the fixtures' own: the spec's built-in networks
(/work/shared/spec/architectures.md) written here in torch, and the
third-party ones built by the libraries' code as their make.py do."""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call, grad, jvp, vjp


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, bn=True):
        super().__init__()
        self.bn = bn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        if bn:
            self.bn1 = nn.BatchNorm2d(cout)
            self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            layers = [nn.Conv2d(cin, cout, 1, stride, 0, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x):
        if self.bn:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
        else:
            out = F.relu(self.conv1(x))
            out = self.conv2(out)
        return F.relu(out + self.shortcut(x))


class CnnTiny(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.has_bn = bn
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=not bn)
        if bn:
            self.bn1 = nn.BatchNorm2d(4)
        self.block1 = BasicBlock(4, 4, 1, bn)
        self.block2 = BasicBlock(4, 8, 2, bn)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)
        if self.has_bn:
            x = self.bn1(x)
        x = self.block2(self.block1(F.relu(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MlpTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Lenet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, 1, 2), nn.Conv2d(6, 16, 5, 1, 0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SmoothBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        return x + F.silu(self.conv(x))


class CnnSmooth(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(6, 8, 3, 1, 1)
        self.block = SmoothBlock()
        self.fc1, self.fc2 = nn.Linear(128, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2, 2)
        x = F.leaky_relu(self.block(F.gelu(self.conv2(x))), 0.1).flatten(1)
        return self.fc2(torch.sigmoid(self.fc1(x)))


def build(name, dirpath):
    """The fixture's network and whether it is a language model."""
    if name == "cnn-tiny":
        return CnnTiny(True), False
    if name == "cnn-tiny-nobn":
        return CnnTiny(False), False
    if name == "mlp-tiny":
        return MlpTiny(), False
    if name == "lenet5":
        return Lenet5(), False
    if name == "cnn-smooth":
        return CnnSmooth(), False
    meta = json.load(open(os.path.join(dirpath, "meta.json")))
    if name == "tv-resnet18-trunc":
        import torchvision
        m = torchvision.models.resnet18(num_classes=10)
        m.layer2 = nn.Sequential(m.layer2[0])
        m.layer3 = nn.Identity()
        m.layer4 = nn.Identity()
        m.fc = nn.Linear(128, 10)
        return m, False
    if name == "tv-vit-tiny":
        from torchvision.models import VisionTransformer
        return VisionTransformer(**meta["config"]), False
    if name == "hf-gpt2-tiny":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(**meta["config"], attn_implementation="eager")
        return GPT2LMHeadModel(cfg), True
    raise SystemExit(f"ggn_reference.py: no torch model for fixture {name}")


class Logits(nn.Module):
    """The network's logits (a language model's from its output object)."""

    def __init__(self, m, lm):
        super().__init__()
        self.m, self.lm = m, lm

    def forward(self, x):
        return self.m(input_ids=x).logits if self.lm else self.m(x)


def batch_norm_mode(m, batch):
    """Batch statistics without running-buffer updates (which forward-mode
    AD would write into), or the running buffers; no dropout either way
    (the fixtures' dropout probabilities are 0: nn.MultiheadAttention runs
    in train mode, since its eval-mode fast path has no forward-mode AD)."""
    m.eval()
    for mod in m.modules():
        if isinstance(mod, nn.MultiheadAttention):
            assert mod.dropout == 0.0
            mod.train()
    if batch:
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.train()
                mod.track_running_stats = False
                mod.running_mean = None
                mod.running_var = None


def main():
    fixtures, out = sys.argv[1:3]
    for case in sys.argv[3:]:
        name, bn, batch = case.split(":")
        one(fixtures, name, bn, int(batch), os.path.join(out, f"{name}-{bn}"))


def one(fixtures, name, bn, batch, out):
    d = os.path.join(fixtures, name)
    net, lm = build(name, d)
    sd = load_file(os.path.join(d, "weights.safetensors"))
    net.load_state_dict(sd)
    net = net.double()
    batch_norm_mode(net, bn == "batch")
    model = Logits(net, lm)
    names = [n for n, _ in net.named_parameters()]
    params = {"m." + n: p.detach() for n, p in net.named_parameters()}
    vfile = load_file(os.path.join(d, "v.safetensors"))
    v = {"m." + n: vfile[n].double() for n in names}
    data = load_file(os.path.join(d, "data.safetensors"))
    x = data["x"] if lm else data["x"].double()
    n = x.shape[0]

    def rows(z, x_b, y_b):
        """The labelled rows of the logits, their labels, and the row scale."""
        if lm:
            t = z.shape[1]
            return z[:, :-1].reshape(-1, z.shape[-1]), x_b[:, 1:].reshape(-1), 1.0 / (n * (t - 1))
        return z, y_b, 1.0 / n

    gv = {k: torch.zeros_like(p) for k, p in params.items()}
    hv = {k: torch.zeros_like(p) for k, p in params.items()}
    ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with ctx:
        for s in range(0, n, batch):
            x_b = x[s:s + batch]
            y_b = None if lm else data["y"][s:s + batch]

            def f(p):
                return functional_call(model, p, (x_b,))

            z, u = jvp(f, (params,), (v,))
            zr, _, scale = rows(z, x_b, y_b)
            ur, _, _ = rows(u, x_b, y_b)
            p = torch.softmax(zr, dim=-1)
            wr = scale * (p * ur - p * (p * ur).sum(-1, keepdim=True))
            w = torch.zeros_like(z)
            if lm:
                w[:, :-1] = wr.reshape(z.shape[0], z.shape[1] - 1, z.shape[2])
            else:
                w = wr
            _, pull = vjp(f, params)
            (g,) = pull(w)

            def loss(p):
                zr, lab, scale = rows(f(p), x_b, y_b)
                return scale * F.cross_entropy(zr, lab, reduction="sum")

            _, h = jvp(grad(loss), (params,), (v,))
            for k in params:
                gv[k] += g[k]
                hv[k] += h[k]
    os.makedirs(out, exist_ok=True)
    strip = lambda t: {k[2:]: x.contiguous() for k, x in t.items()}  # noqa: E731
    save_file(strip(gv), os.path.join(out, "gv.safetensors"))
    save_file(strip(hv), os.path.join(out, "hv.safetensors"))
    norm = lambda t: float(sum((x ** 2).sum() for x in t.values()) ** 0.5)  # noqa: E731
    vgv = float(sum((v[k] * gv[k]).sum() for k in params))
    print(json.dumps({"fixture": name, "bn": bn, "batch": batch, "gv_norm": norm(gv),
                      "hv_norm": norm(hv), "v_dot_gv": vgv}))


if __name__ == "__main__":
    main()

"""PyTorch float64 reference for tests/data/struct-ops.arch (the channel
layers: narrow, concat, channel shuffle, mul, adaptive average pooling).
Writes into the folder given: weights.safetensors (float32, BN perturbed),
data.safetensors (6 samples), v.safetensors, and per BN mode (batch,
running) grad-MODE.safetensors and hv-MODE.safetensors in float64, the
loss taken over batches of 4 and 2 as hesscope's --batch 4 does, and
prints one JSON line of the losses. Run by tests/struct_ops_model.rs
wherever torch and safetensors are installed:
    python3 struct_ops_torch.py OUT_DIR"""
import json, os, sys
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

out = sys.argv[1]
try:  # ShuffleNetV2's own channel shuffle, where torchvision is installed
    from torchvision.models.shufflenetv2 import channel_shuffle as tv_shuffle
except ImportError:
    tv_shuffle = None
torch.manual_seed(26)

# (name, shape) in registration order; BN tensors get their own ranges.
convs = [("stem", 8, 3, 3, False), ("b1", 4, 4, 3, True), ("se_fc1", 3, 4, 1, True),
         ("se_fc2", 4, 3, 1, True), ("d1", 4, 12, 3, True), ("in_fc", 3, 8, 1, True),
         ("g", 6, 22, 3, True)]
P, B = {}, {}
for name, cout, cin, k, bias in convs:
    bound = 1.0 / (cin * k * k) ** 0.5
    P[f"{name}.weight"] = torch.empty(cout, cin, k, k).uniform_(-bound, bound)
    if bias:
        P[f"{name}.bias"] = torch.empty(cout).uniform_(-bound, bound)
for name, c in [("stem_bn", 8), ("d1_bn", 4)]:
    P[f"{name}.weight"] = torch.empty(c).uniform_(0.5, 1.5)
    P[f"{name}.bias"] = torch.empty(c).uniform_(-0.2, 0.2)
    B[f"{name}.running_mean"] = torch.empty(c).uniform_(-0.1, 0.1)
    B[f"{name}.running_var"] = torch.empty(c).uniform_(0.5, 1.5)
bound = 1.0 / (6 * 2 * 2) ** 0.5
P["fc.weight"] = torch.empty(4, 24).uniform_(-bound, bound)
P["fc.bias"] = torch.empty(4).uniform_(-bound, bound)
save_file({**P, **B}, os.path.join(out, "weights.safetensors"))
x = torch.randn(6, 3, 10, 10)
y = torch.randint(0, 4, (6,))
save_file({"x": x, "y": y}, os.path.join(out, "data.safetensors"))
V = {n: torch.randn(t.shape) for n, t in P.items()}
save_file(V, os.path.join(out, "v.safetensors"))

names = list(P)
Pd = {n: t.double().requires_grad_() for n, t in P.items()}
Bd = {n: t.double() for n, t in B.items()}


def forward(x, batch_mode):
    def conv(t, name, pad=0):
        return F.conv2d(t, Pd[f"{name}.weight"], Pd.get(f"{name}.bias"), 1, pad)

    def bn(t, name):
        return F.batch_norm(t, Bd[f"{name}.running_mean"].clone(), Bd[f"{name}.running_var"].clone(),
                            Pd[f"{name}.weight"], Pd[f"{name}.bias"], batch_mode, 0.0, 1e-5)

    def shuffle(t, g):
        if tv_shuffle is not None:
            return tv_shuffle(t, g)
        n, c, h, w = t.shape
        return t.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    r0 = F.relu(bn(conv(x, "stem", 1), "stem_bn"))
    a, b = torch.split(r0, 4, dim=1)
    b1t = torch.tanh(conv(b, "b1", 1))
    se_s = torch.sigmoid(conv(F.silu(conv(F.adaptive_avg_pool2d(b1t, 1), "se_fc1")), "se_fc2"))
    cat = torch.cat([a, b1t * se_s, a], dim=1)
    sh = shuffle(cat, 3)
    d1r = F.relu(bn(conv(sh, "d1", 1), "d1_bn"))
    in_s = torch.sigmoid(conv(F.adaptive_avg_pool2d(r0, (1, 1)), "in_fc"))
    dense = torch.cat([r0, d1r, sh, in_s * x, x], dim=1)
    up = F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(dense, (3, 4)), (5, 6))
    g = conv(torch.narrow(up, 1, 8, 22), "g", 1)
    m = torch.tanh(g) * torch.sigmoid(g)
    z = torch.flatten(F.adaptive_avg_pool2d(m, (2, 2)), 1)
    return F.linear(z, Pd["fc.weight"], Pd["fc.bias"])


losses = {}
xd = x.double()
for mode in ("batch", "running"):
    loss = sum(F.cross_entropy(forward(xd[s:s + 4], mode == "batch"), y[s:s + 4], reduction="sum")
               for s in (0, 4)) / 6
    ps = [Pd[n] for n in names]
    g = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(sum((a * V[n].double()).sum() for a, n in zip(g, names)), ps)
    save_file({n: t.detach().contiguous() for n, t in zip(names, g)}, os.path.join(out, f"grad-{mode}.safetensors"))
    save_file({n: t.contiguous() for n, t in zip(names, hv)}, os.path.join(out, f"hv-{mode}.safetensors"))
    losses[mode] = loss.item()
print(json.dumps(losses))

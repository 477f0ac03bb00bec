"""Writes tests/data/onnx/channels.onnx and tests/data/onnx/channels/: a
small CNN with the channel ops of torchvision's lighter CNNs, exported by
torch (legacy exporter, opset 17, training mode, no constant folding, a
dynamic batch), with PyTorch float64 references, for tests/onnx.rs (which
needs no torch). Its ONNX ops: Conv (grouped), BatchNormalization, Clip
(ReLU6), Split and Slice along channels, HardSwish, Concat, the channel
shuffle (Reshape, Transpose, Reshape, with its shape arithmetic: Shape,
Gather, Div, Cast, Unsqueeze, Concat), GlobalAveragePool, Relu,
HardSigmoid, Mul by [N, C, 1, 1] (squeeze-and-excitation), Sigmoid and Mul
of one shape (x·sigmoid(x)), Flatten, Gemm.

  channels.onnx                       the model
  channels/weights.safetensors        its state_dict
  channels/data.safetensors           x [4, 3, 12, 12], y [4]
  channels/v.safetensors              a direction, by parameter name
  channels/ref-{batch,running}/       PyTorch float64 grad, Hv, reference.json
                                      (Hardswish/Hardsigmoid in their clamp
                                      forms, which autograd differentiates twice)

Run from the repository root: python3 python/tests/make_onnx_channels.py"""
import json, os, sys, warnings
import torch, torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import clamp_forms, set_bn_mode

warnings.filterwarnings("ignore")
OUT = "tests/data/onnx"


class Channels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, groups=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.Hardswish()
        self.conv3 = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False)
        self.fc1 = nn.Conv2d(10, 4, 1)
        self.fc2 = nn.Conv2d(4, 10, 1)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        a, b = torch.split(x, [3, 5], dim=1)           # Split
        b = self.act2(self.bn2(self.conv2(b)))          # 6 channels
        c = self.conv3(b.narrow(1, 2, 2))               # Slice, grouped conv
        x = torch.cat([a, b[:, :1], c], dim=1)          # 3 + 1 + 2 = 6 ... + below
        x = torch.cat([x, a[:, 1:], b[:, 4:]], dim=1)   # 6 + 2 + 2 = 10
        n, ch, h, w = x.size()                          # the channel shuffle
        x = x.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = self.gate(self.fc2(torch.relu(self.fc1(s))))
        x = x * s                                       # squeeze-and-excitation
        x = x * torch.sigmoid(x)                        # SiLU as Sigmoid and Mul
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def main():
    torch.manual_seed(3)
    m = Channels()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    d = f"{OUT}/channels"
    os.makedirs(d, exist_ok=True)
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    for b in bns:
        b.momentum = 0.0
    m.train()
    torch.onnx.export(m, (torch.zeros(2, 3, 12, 12),), f"{OUT}/channels.onnx", dynamo=False,
                      opset_version=17, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    for k, t in m.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(t, sd[k]), f"the export changed {k}"
    save_file(sd, f"{d}/weights.safetensors")
    x = torch.randn(4, 3, 12, 12) * 2
    y = torch.tensor([0, 3, 1, 4])
    save_file({"x": x, "y": y}, f"{d}/data.safetensors")
    g = torch.Generator().manual_seed(13)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in m.named_parameters()}
    save_file(v, f"{d}/v.safetensors")
    for bn_mode in ("batch", "running"):
        mm = Channels()
        mm.load_state_dict(sd)
        mm = set_bn_mode(clamp_forms(mm).double(), bn_mode == "batch")
        names = [n for n, _ in mm.named_parameters()]
        ps = [p for _, p in mm.named_parameters()]
        loss = nn.functional.cross_entropy(mm(x.double()), y)
        gr = torch.autograd.grad(loss, ps, create_graph=True)
        hv = torch.autograd.grad(sum((a * v[n]).sum() for a, n in zip(gr, names)), ps)
        r = f"{d}/ref-{bn_mode}"
        os.makedirs(r, exist_ok=True)
        save_file({n: t.detach().contiguous() for n, t in zip(names, gr)}, f"{r}/grad.safetensors")
        save_file({n: t.detach().contiguous() for n, t in zip(names, hv)}, f"{r}/hv.safetensors")
        with open(f"{r}/reference.json", "w") as f:
            json.dump({"loss": loss.item(), "bn": bn_mode, "dtype": "float64"}, f, indent=1)
            f.write("\n")
    print("wrote", f"{OUT}/channels.onnx", sorted(os.listdir(d)))


if __name__ == "__main__":
    main()

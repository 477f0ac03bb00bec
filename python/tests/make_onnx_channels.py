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
import os, sys, warnings
import torch, torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import clamp_forms, set_bn_mode
from onnx_refs import write_model_and_references

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
    d = f"{OUT}/channels"
    write_model_and_references(Channels, f"{OUT}/channels.onnx", d, 12, 13,
                               lambda mm, batch: set_bn_mode(clamp_forms(mm).double(), batch))
    print("wrote", f"{OUT}/channels.onnx", sorted(os.listdir(d)))


if __name__ == "__main__":
    main()

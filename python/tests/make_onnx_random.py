"""Writes tests/data/onnx/random.onnx and tests/data/onnx/random/: a small
CNN with torchvision's stochastic depth (both modes) and a Dropout,
exported by torch unfolded (legacy exporter, opset 17, training mode, no
constant folding), so that its graph holds the random ops
(RandomUniformLike, Less, Cast, Div, Mul; Dropout with training_mode),
with PyTorch float64 references in eval() semantics for the random layers
(stochastic depth and dropout the identity, batch norm in each of
hesscope's modes). Also two files for the ONNX importer's handling of
shared initializers:

  random.onnx                       the model
  random/weights.safetensors        its state_dict
  random/data.safetensors           x [4, 3, 10, 10], y [4]
  random/v.safetensors              a direction, by parameter name
  random/ref-{batch,running}/       PyTorch float64 grad, Hv, reference.json
  dedup.onnx                        no batch norm, zero biases, exported in
                                    eval mode with constant folding: the
                                    exporter merges the equal biases into
                                    one initializer and hands it on through
                                    Identity nodes under each bias's name
  dedup/weights.safetensors         its state_dict
  tied.onnx                         two convolutions reading one weight
                                    (`b.weight = a.weight`), which hesscope
                                    refuses in ONNX

Run from the repository root: python3 python/tests/make_onnx_random.py"""
import os, sys, warnings
import torch, torch.nn as nn
from safetensors.torch import save_file
from torchvision.ops import StochasticDepth

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import set_bn_mode
from onnx_refs import export, write_model_and_references

warnings.filterwarnings("ignore")
OUT = "tests/data/onnx"


class Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.drop_row = StochasticDepth(0.2, "row")
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.drop_batch = StochasticDepth(0.3, "batch")
        self.drop = nn.Dropout(0.4)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + self.drop_row(torch.tanh(self.conv2(x)))
        x = x + self.drop_batch(self.conv3(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(self.drop(x))


class Dedup(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for m in (self.a, self.b, self.c):
                m.bias.zero_()

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.c(torch.relu(self.b(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def main():
    torch.manual_seed(4)
    d = f"{OUT}/random"

    def prepare(mm, batch):
        # set_bn_mode puts the module in eval() (stochastic depth and
        # dropout the identity) with its batch norms in the mode asked.
        mm = set_bn_mode(mm.double(), batch)
        assert not mm.drop.training and not mm.drop_row.training
        return mm

    write_model_and_references(Random, f"{OUT}/random.onnx", d, 10, 17, prepare)

    torch.manual_seed(6)
    dd = Dedup().eval()
    os.makedirs(f"{OUT}/dedup", exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in dd.state_dict().items()},
              f"{OUT}/dedup/weights.safetensors")
    export(dd, f"{OUT}/dedup.onnx", False, 10)
    tied = Dedup()
    tied.c = nn.Conv2d(4, 4, 3, padding=1)
    tied.c.weight = tied.b.weight
    export(tied, f"{OUT}/tied.onnx", True, 10)
    print("wrote", f"{OUT}/random.onnx", sorted(os.listdir(d)), "dedup.onnx tied.onnx")


if __name__ == "__main__":
    main()

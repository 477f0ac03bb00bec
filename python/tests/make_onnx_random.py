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
import json, os, sys, warnings
import torch, torch.nn as nn
from safetensors.torch import save_file
from torchvision.ops import StochasticDepth

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import set_bn_mode

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


def export(m, path, train):
    mode = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(m, (torch.zeros(2, 3, 10, 10),), path, dynamo=False, opset_version=17,
                      training=mode, do_constant_folding=not train, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})


def main():
    torch.manual_seed(4)
    m = Random()
    with torch.no_grad():
        m.bn1.weight.uniform_(0.5, 1.5); m.bn1.bias.uniform_(-0.2, 0.2)
        m.bn1.running_mean.uniform_(-0.1, 0.1); m.bn1.running_var.uniform_(0.5, 1.5)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    d = f"{OUT}/random"
    os.makedirs(d, exist_ok=True)
    m.bn1.momentum = 0.0
    m.train()
    export(m, f"{OUT}/random.onnx", True)
    for k, t in m.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(t, sd[k]), f"the export changed {k}"
    save_file(sd, f"{d}/weights.safetensors")
    x = torch.randn(4, 3, 10, 10) * 2
    y = torch.tensor([0, 3, 1, 4])
    save_file({"x": x, "y": y}, f"{d}/data.safetensors")
    g = torch.Generator().manual_seed(17)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in m.named_parameters()}
    save_file(v, f"{d}/v.safetensors")
    for bn_mode in ("batch", "running"):
        mm = Random()
        mm.load_state_dict(sd)
        # set_bn_mode puts the module in eval() (stochastic depth and
        # dropout the identity) with its batch norms in the mode asked.
        mm = set_bn_mode(mm.double(), bn_mode == "batch")
        assert not mm.drop.training and not mm.drop_row.training
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

    torch.manual_seed(6)
    dd = Dedup().eval()
    os.makedirs(f"{OUT}/dedup", exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in dd.state_dict().items()},
              f"{OUT}/dedup/weights.safetensors")
    export(dd, f"{OUT}/dedup.onnx", False)
    tied = Dedup()
    tied.c = nn.Conv2d(4, 4, 3, padding=1)
    tied.c.weight = tied.b.weight
    export(tied, f"{OUT}/tied.onnx", True)
    print("wrote", f"{OUT}/random.onnx", sorted(os.listdir(d)), "dedup.onnx tied.onnx")


if __name__ == "__main__":
    main()

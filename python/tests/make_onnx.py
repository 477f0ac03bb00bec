"""Writes tests/data/onnx/: a small CNN exported to ONNX by torch, with
PyTorch float64 references, for tests/onnx.rs (which needs no torch).

  small.onnx          the model unfolded (torch.onnx.export, legacy exporter,
                      opset 17, training mode, no constant folding): Conv,
                      BatchNormalization, Relu, LeakyRelu, MaxPool, Add,
                      AveragePool, Tanh, Sigmoid, GELU (its erf form),
                      Dropout, GlobalAveragePool, Flatten, Gemm, and a
                      Linear written as x @ W.t() + b (Transpose, MatMul, Add)
  small-gelu20.onnx   the same at opset 20 (a Gelu op)
  folded.onnx         the same exported in eval mode with constant folding:
                      batch norm folded into the convolutions
  dynamo.onnx(.data)  the same in eval mode by the dynamo exporter (opset 20,
                      batch norm folded, weights in external data,
                      ReduceMean and Reshape for the pool and flatten)
  weights.safetensors its state_dict (float32, as the initializers hold)
  data.safetensors    x [4, 3, 16, 16], y [4]
  v.safetensors       a direction, by parameter name
  ref-{batch,running}/{grad,hv}.safetensors, reference.json: PyTorch float64
                      loss, gradient and Hv (mean cross-entropy over the batch)

Run from the repository root: python3 python/tests/make_onnx.py
(needs torch and onnx)."""
import json, os, warnings
import torch, torch.nn as nn
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
OUT = "tests/data/onnx"


class MMLinear(nn.Module):
    """A Linear written by hand: exports as Transpose, MatMul and Add."""

    def __init__(self, din, dout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din) / din**0.5)
        self.bias = nn.Parameter(torch.randn(dout) * 0.1)

    def forward(self, x):
        return x.matmul(self.weight.t()) + self.bias


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.LeakyReLU(0.1)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 1)
        self.conv4 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
        self.gelu = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 12)
        self.head = MMLinear(12, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x))) + x
        x = torch.tanh(self.conv3(self.avg(x)))
        x = self.gelu(torch.sigmoid(self.conv4(x)) + x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(torch.sigmoid(self.fc(self.drop(x))))


def export(m, x, path, opset, folded):
    mode = torch.onnx.TrainingMode.EVAL if folded else torch.onnx.TrainingMode.TRAINING
    m.train(not folded)
    # A training-mode export runs the module once in train(): with momentum
    # 0 that forward leaves the running statistics (which become the
    # initializers) as they were.
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    for b in bns:
        b.momentum = 0.0
    torch.onnx.export(m, (x,), path, dynamo=False, opset_version=opset, training=mode,
                      do_constant_folding=folded, input_names=["x"], output_names=["logits"])
    for b in bns:
        b.momentum = 0.1


def references(m, sd, x, y, v, bn_mode):
    mm = Small()
    mm.load_state_dict(sd)
    mm = mm.double().train(bn_mode == "batch")
    mm.drop.eval()  # dropout is the identity, as hesscope reads it
    names = [n for n, _ in mm.named_parameters()]
    ps = [p for _, p in mm.named_parameters()]
    loss = nn.functional.cross_entropy(mm(x.double()), y)
    g = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(sum((a * v[n].double()).sum() for a, n in zip(g, names)), ps)
    d = f"{OUT}/ref-{bn_mode}"
    os.makedirs(d, exist_ok=True)
    save_file({n: t.detach().contiguous() for n, t in zip(names, g)}, f"{d}/grad.safetensors")
    save_file({n: t.detach().contiguous() for n, t in zip(names, hv)}, f"{d}/hv.safetensors")
    with open(f"{d}/reference.json", "w") as f:
        json.dump({"loss": loss.item(), "bn": bn_mode, "dtype": "float64"}, f, indent=1)
        f.write("\n")


def main():
    torch.manual_seed(7)
    m = Small()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 3, 1, 4])
    os.makedirs(OUT, exist_ok=True)
    export(m, torch.zeros(2, 3, 16, 16), f"{OUT}/small.onnx", 17, folded=False)
    export(m, torch.zeros(2, 3, 16, 16), f"{OUT}/small-gelu20.onnx", 20, folded=False)
    export(m, torch.zeros(2, 3, 16, 16), f"{OUT}/folded.onnx", 17, folded=True)
    m.eval()
    if os.path.exists(f"{OUT}/dynamo.onnx.data"):
        os.remove(f"{OUT}/dynamo.onnx.data")
    torch.onnx.export(m, (torch.zeros(2, 3, 16, 16),), f"{OUT}/dynamo.onnx", dynamo=True,
                      external_data=True, input_names=["x"], output_names=["logits"])
    for k, t in m.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(t, sd[k]), f"the export changed {k}"
    save_file(sd, f"{OUT}/weights.safetensors")
    save_file({"x": x, "y": y}, f"{OUT}/data.safetensors")
    g = torch.Generator().manual_seed(11)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in m.named_parameters()}
    save_file(v, f"{OUT}/v.safetensors")
    for bn_mode in ("batch", "running"):
        references(m, sd, x, y, v, bn_mode)
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()

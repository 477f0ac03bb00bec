"""Unit checks of hesscope_export on small modules: each mapping's text,
the refusals (module path and ATen op named, no file written), tensor names
and parameter order. Plain asserts; run as a script (tests/exporter.rs runs
it wherever torch is installed):
    PYTHONPATH=python python3 python/tests/test_exporter.py"""
import os, sys, tempfile
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hesscope_export import UnsupportedOp, export, to_text  # noqa: E402


def lines(text):
    return [ln for ln in text.splitlines() if " = " in ln]


def refused(module, x, *parts):
    try:
        to_text(module, x)
    except UnsupportedOp as e:
        for p in parts:
            assert p in str(e), (p, str(e))
        return str(e)
    raise AssertionError(f"{type(module).__name__} was not refused")


class Se(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Net(nn.Module):
    """Every mapping of the exporter once."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.bn = nn.BatchNorm2d(8, eps=1e-3)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se = Se()
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, 1, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8 * 3 * 3, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = F.hardswish(self.dw(x)) + x
        x = self.se(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.hardsigmoid(self.branch(b))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = self.avg(self.pool(F.silu(x)))
        x = F.adaptive_avg_pool2d(x, (3, 3))
        return self.head(self.drop(torch.flatten(F.leaky_relu(x, 0.2), 1)))


def test_every_mapping():
    text = to_text(Net(), torch.zeros(2, 3, 16, 16), name="net")
    got = lines(text)
    want = [
        "stem = conv(input) 8 k=3 stride=2 pad=2 bias=false dilation=2",
        "bn = bn(stem) eps=0.001",
        "relu6 = relu6(bn)",  # F.relu6 at the top level: named by the op
        "dw = conv(relu6) 8 k=3 stride=1 pad=1 bias=true groups=8",
        "hardswish = hardswish(dw)",
        "add = add(hardswish, relu6)",
        "se = adaptive_avgpool(add) h=1 w=1",
        "se.fc1 = conv(se) 4 k=1 stride=1 pad=0 bias=true",
        "se_1 = relu(se.fc1)",
        "se.fc2 = conv(se_1) 8 k=1 stride=1 pad=0 bias=true",
        "se_2 = sigmoid(se.fc2)",
        "se_3 = mul(add, se_2)",
        "getitem = narrow(se_3) start=0 len=4",
        "getitem_1 = narrow(se_3) start=4 len=4",
        "branch = conv(getitem_1) 4 k=1 stride=1 pad=0 bias=true",
        "hardsigmoid = hardsigmoid(branch)",
        "cat = concat(getitem, hardsigmoid)",
        "view_1 = shuffle(cat) groups=2",
        "silu = silu(view_1)",
        "pool = maxpool(silu) k=3 stride=2 pad=0 ceil=true",
        "avg = avgpool(pool) k=2 stride=1 pad=1",
        "adaptive_avg_pool2d_1 = adaptive_avgpool(avg) h=3 w=3",
        "leaky_relu = leaky_relu(adaptive_avg_pool2d_1) slope=0.2",
        "flatten = flatten(leaky_relu)",
        "head = linear(flatten) 5 bias=true",
    ]
    assert got == want, "\n".join(got)
    assert "input 3 16 16" in text and "classes 5" in text and "model net" in text


class Late(nn.Module):
    """Registered b, a; run a then b on separate branches: the file keeps
    model.parameters() order (b first) since the graph allows it."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_parameter_order():
    got = [ln.split(" = ")[0] for ln in lines(to_text(Late(), torch.zeros(1, 3, 4, 4)))]
    assert got.index("b") < got.index("a"), got
    assert got[-1] == "fc", got
    # gap: the (1, 1) pool is only flattened.
    assert "gap(" in to_text(Late(), torch.zeros(1, 3, 4, 4))


class Grid(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 2, 1), Warp())
        self.fc = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


class Warp(nn.Module):
    def forward(self, x):
        g = torch.zeros(x.shape[0], 4, 4, 2)
        return F.grid_sample(x, g, align_corners=False)


def test_refusals():
    x = torch.zeros(2, 3, 4, 4)
    refused(Grid(), x, "body.1: aten.grid_sampler is not supported")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "g.arch")
        try:
            export(Grid(), x, p)
        except UnsupportedOp:
            pass
        assert not os.path.exists(p), "a refused module writes no file"

    class Tanhish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 2, 1)
            self.fc = nn.Linear(2 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(F.hardtanh(self.c(x), -2.0, 2.0).flatten(1))

    refused(Tanhish(), x, "aten.hardtanh", "only relu6")

    class Rect(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 2, (1, 3))
            self.fc = nn.Linear(2 * 4 * 2, 2)

        def forward(self, x):
            return self.fc(self.c(x).flatten(1))

    refused(Rect(), x, "c: a 1×3 kernel is not square")
    refused(nn.Sequential(nn.Conv2d(3, 2, 1), nn.GELU(approximate="tanh"), nn.Flatten(), nn.Linear(32, 2)),
            x, "1: aten.gelu(approximate='tanh')")
    refused(nn.Sequential(nn.Conv2d(3, 2, 1)), x, "logits [N, classes] expected")
    try:
        to_text(Late(), x, loss="mse")
        raise AssertionError("loss mse accepted")
    except UnsupportedOp as e:
        assert "cross-entropy" in str(e)


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
            print(f"{name}: ok", flush=True)

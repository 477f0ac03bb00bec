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
    # GELU's tanh form is the agreed `gelu_tanh` (issue 25).
    tanh = to_text(nn.Sequential(nn.Conv2d(3, 2, 1), nn.GELU(approximate="tanh"), nn.Flatten(),
                                 nn.Linear(32, 2)), x)
    assert "1 = gelu_tanh(0)" in tanh, tanh
    refused(nn.Sequential(nn.Conv2d(3, 2, 1)), x, "logits [N, classes] expected")
    try:
        to_text(Late(), x, loss="mse")
        raise AssertionError("loss mse accepted")
    except UnsupportedOp as e:
        assert "cross-entropy" in str(e)


# ---- transformers (issue 25): the agreed sequence syntax, on the configs
# of ../shared/fixtures/tv-vit-tiny and ../shared/fixtures/hf-gpt2-tiny.

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures")


def fixture_config(name, default):
    """The fixture's config (meta.json), or `default` where the fixtures
    are not beside the checkout."""
    import json
    path = os.path.join(FIXTURES, name, "meta.json")
    if not os.path.exists(path):
        return dict(default)
    with open(path) as f:
        return json.load(f)["config"]


def vit():
    from torchvision.models import VisionTransformer
    cfg = fixture_config("tv-vit-tiny", dict(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                             hidden_dim=64, mlp_dim=128, num_classes=10))
    torch.manual_seed(9)
    return VisionTransformer(**cfg), cfg


def gpt2(**over):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = fixture_config("hf-gpt2-tiny", dict(vocab_size=96, n_positions=32, n_embd=64, n_layer=2,
                                              n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                              bos_token_id=0, eos_token_id=0))
    cfg.update(over)
    torch.manual_seed(5)
    return GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation="eager")), cfg


def declared(text):
    """Parameter names and shapes the text declares, by the agreed syntax
    (what the Rust side will read), in file order."""
    out = []
    for ln in lines(text):
        name, rest = ln.split(" = ")
        kw = rest.split("(")[0]
        args = dict(a.split("=") for a in rest.split(")")[-1].split() if "=" in a)
        pos = [a for a in rest.split(")")[-1].split() if "=" not in a]
        out.append((name, kw, args, pos))
    return out


def param_shapes(text, sd):
    """{parameter name: shape} the text declares; shapes from the state_dict
    for raw parameters, checked against the layer's own arguments."""
    got = {}
    dims = {}
    for name, kw, args, pos in declared(text):
        if kw == "layernorm":
            got[name + ".weight"] = sd[name + ".weight"].shape
            got[name + ".bias"] = sd[name + ".bias"].shape
        elif kw == "attention":
            for r in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                got[f"{name}.{r}"] = sd[f"{name}.{r}"].shape
        elif kw == "conv1d":
            got[name + ".weight"] = sd[name + ".weight"].shape
            got[name + ".bias"] = sd[name + ".bias"].shape
            assert sd[name + ".weight"].shape[1] == int(pos[0]), (name, pos)
        elif kw in ("linear", "conv") and "tie" not in args:
            got[name + ".weight"] = sd[name + ".weight"].shape
            if args.get("bias", "true") == "true":
                got[name + ".bias"] = sd[name + ".bias"].shape
            assert sd[name + ".weight"].shape[0] == int(pos[0]), (name, pos)
        elif kw == "linear":
            assert args["tie"] in got, f"{name} ties {args['tie']} before it is declared"
            assert args["bias"] == "false"
        elif kw == "embedding":
            got[name + ".weight"] = torch.Size([int(pos[0]), int(pos[1])])
        elif kw == "pos_embedding":
            got[name + ".weight"] = sd[name + ".weight"].shape
            assert sd[name + ".weight"].shape[0] == int(pos[0])
        elif kw in ("add_param", "cls_token", "mul_param"):
            got[pos[0]] = sd[pos[0]].shape
        dims[name] = kw
    return got


def run_arch(text, sd, x):
    """The exported text evaluated by the agreed syntax's definitions (a
    float64 interpreter of the sequence layers written from the spec, not
    from the modules), on input x: what hesscope will compute."""
    import math
    sd = {k: t.double() for k, t in sd.items()}
    env = {"input": x if not x.is_floating_point() else x.double()}
    for name, kw, args, pos in declared(text):
        ins = [env[i.strip()] for i in text.split(f"\n{name} = {kw}(")[1].split(")")[0].split(",")]
        z = ins[0]
        if kw == "conv":
            z = F.conv2d(z, sd[name + ".weight"], sd.get(name + ".bias"), int(args.get("stride", 1)),
                         int(args.get("pad", 0)), 1, int(args.get("groups", 1)))
        elif kw == "tokens":
            z = z.flatten(2).transpose(1, 2)
        elif kw == "untokens":
            z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], int(args["h"]), int(args["w"]))
        elif kw == "mul_param":
            z = z * sd[pos[0]]
        elif kw == "adaptive_avgpool":
            z = F.adaptive_avg_pool2d(z, (int(args["h"]), int(args["w"])))
        elif kw == "flatten":
            z = z.flatten(1)
        elif kw == "cls_token":
            z = torch.cat([sd[pos[0]].expand(z.shape[0], -1, -1), z], 1)
        elif kw == "add_param":
            z = z + sd[pos[0]]
        elif kw == "layernorm":
            z = F.layer_norm(z, z.shape[-1:], sd[name + ".weight"], sd[name + ".bias"],
                             float(args.get("eps", 1e-5)))
        elif kw in ("mha", "attention"):
            h, causal = int(args["heads"]), args.get("causal", "false") == "true"
            if kw == "attention":
                z = F.linear(z, sd[name + ".in_proj_weight"], sd[name + ".in_proj_bias"])
            n, t, d = z.shape[0], z.shape[1], z.shape[2] // 3
            q, k, v = (u.reshape(n, t, h, d // h).transpose(1, 2) for u in z.split(d, -1))
            a = q @ k.transpose(-1, -2) / math.sqrt(d // h)
            if causal:
                a = a.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
            z = (a.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
            if kw == "attention":
                z = F.linear(z, sd[name + ".out_proj.weight"], sd[name + ".out_proj.bias"])
        elif kw == "add":
            z = ins[0] + ins[1]
        elif kw == "linear":
            w = sd[args["tie"]] if "tie" in args else sd[name + ".weight"]
            z = F.linear(z, w, sd[name + ".bias"] if args.get("bias", "true") == "true" else None)
        elif kw == "gelu":
            z = F.gelu(z)
        elif kw == "gelu_tanh":
            z = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        elif kw == "select":
            z = z[:, int(args["index"])]
        elif kw == "embedding":
            z = sd[name + ".weight"][z]
        elif kw == "pos_embedding":
            z = z + sd[name + ".weight"][: z.shape[1]]
        elif kw == "conv1d":
            z = z @ sd[name + ".weight"] + sd[name + ".bias"]
        else:
            raise AssertionError(f"run_arch: no {kw}")
        env[name] = z
    return z


def test_vision_transformer():
    m, cfg = vit()
    text = to_text(m, torch.zeros(2, 3, cfg["image_size"], cfg["image_size"]))
    kinds = [kw for _, kw, _, _ in declared(text)]
    per_layer = ["layernorm", "attention", "add", "layernorm", "linear", "gelu", "linear", "add"]
    assert kinds == ["conv", "tokens", "cls_token", "add_param"] + per_layer * cfg["num_layers"] \
        + ["layernorm", "select", "linear"], kinds
    assert f"input 3 {cfg['image_size']} {cfg['image_size']}" in text
    assert f"classes {cfg['num_classes']}" in text
    d = {n: (kw, a, p) for n, kw, a, p in declared(text)}
    assert d["encoder.layers.encoder_layer_0.self_attention"][1] == {"heads": str(cfg["num_heads"])}
    assert d["encoder.ln"][1] == {"eps": "1e-06"}
    assert any(kw == "cls_token" and p == ["class_token"] for kw, a, p in d.values())
    assert any(kw == "add_param" and p == ["encoder.pos_embedding"] for kw, a, p in d.values())
    assert any(kw == "select" and a == {"index": "0"} for kw, a, p in d.values())
    sd = m.state_dict()
    got = param_shapes(text, sd)
    assert got == {k: v.shape for k, v in sd.items()}, sorted(set(got) ^ set(sd))
    # The text computes the module's function (float64, by the syntax's
    # definitions): the same sums in another order, ~1e-15.
    with torch.no_grad():
        m.class_token.normal_(0, 0.02)
        m.encoder.pos_embedding.normal_(0, 0.02)
        x = torch.randn(3, 3, cfg["image_size"], cfg["image_size"], dtype=torch.float64)
        e = (run_arch(text, m.state_dict(), x) - m.double().eval()(x)).abs().max().item()
    assert e <= 1e-10, e


def test_gpt2():
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("test_gpt2: SKIPPED (transformers not installed)")
        return
    m, cfg = gpt2()
    t = cfg["n_positions"]
    text = to_text(m, torch.zeros(2, t, dtype=torch.long))
    assert f"input tokens {t}" in text and f"classes {cfg['vocab_size']}" in text, text
    kinds = [kw for _, kw, _, _ in declared(text)]
    per_layer = ["layernorm", "conv1d", "mha", "conv1d", "add", "layernorm", "conv1d", "gelu_tanh",
                 "conv1d", "add"]
    assert kinds == ["embedding", "pos_embedding"] + per_layer * cfg["n_layer"] \
        + ["layernorm", "linear"], kinds
    d = {n: (kw, a, p) for n, kw, a, p in declared(text)}
    assert d["transformer.h.0.attn"][:2] == ("mha", {"heads": str(cfg["n_head"]), "causal": "true"})
    assert d["transformer.wte"] == ("embedding", {}, [str(cfg["vocab_size"]), str(cfg["n_embd"])])
    assert d["transformer.wpe"] == ("pos_embedding", {}, [str(cfg["n_positions"])])
    assert d["lm_head"] == ("linear", {"bias": "false", "tie": "transformer.wte.weight"},
                            [str(cfg["vocab_size"])])
    sd = m.state_dict()
    got = param_shapes(text, sd)
    # The state_dict minus the tied duplicate (lm_head.weight).
    want = {k: v.shape for k, v in sd.items() if k != "lm_head.weight"}
    assert got == want, sorted(set(got) ^ set(want))
    # Names in named_parameters() order, which is the tensors' first names.
    assert list(got) == [n for n, _ in m.named_parameters()], list(got)
    # The text computes the module's logits (float64; ~1e-15).
    with torch.no_grad():
        ids = torch.randint(0, cfg["vocab_size"], (3, t))
        m = m.double().eval()
        e = (run_arch(text, m.state_dict(), ids) - m(input_ids=ids).logits).abs().max().item()
    assert e <= 1e-10, e


def test_sequence_refusals():
    # Each block is checked numerically against hesscope's layer: a GPT-2
    # whose attention scales by the layer index is not `mha`.
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("test_sequence_refusals: SKIPPED (transformers not installed)")
        return
    m, cfg = gpt2(scale_attn_by_inverse_layer_idx=True)
    e = refused(m, torch.zeros(2, 8, dtype=torch.long), "transformer.h.1.attn:",
                "does not compute softmax attention")
    assert "transformer.h.0" not in e, e
    # An attention mask other than the causal one.
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 10)

        def forward(self, ids):
            x = self.emb(ids)
            mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(2)
            return self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
    refused(Masked(), torch.zeros(2, 5, dtype=torch.long), "attn: nn.MultiheadAttention with a mask")
    # Cross-attention (query differs from key and value).
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.q = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 10)

        def forward(self, ids):
            x = self.emb(ids)
            return self.head(self.attn(self.q(x), x, x, need_weights=False)[0])
    refused(Cross(), torch.zeros(2, 5, dtype=torch.long), "attn: nn.MultiheadAttention (self-attention")
    # LayerNorm over two dimensions.
    class Ln2(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.ln = nn.LayerNorm([5, 8])
            self.head = nn.Linear(8, 10)

        def forward(self, ids):
            return self.head(self.ln(self.emb(ids)))
    refused(Ln2(), torch.zeros(2, 5, dtype=torch.long), "ln: layer_norm over [5, 8]")


def test_convnext():
    """torchvision's convnext_tiny (issue 25): LayerNorm2d as tokens,
    layernorm, untokens; the block's Linear layers on the channels-last
    sequence; the layer scale as mul_param; every tensor declared under its
    state_dict name and shape; the text computes the module's function."""
    import torchvision
    torch.manual_seed(3)
    m = torchvision.models.convnext_tiny(num_classes=10)
    text = to_text(m, torch.zeros(2, 3, 32, 32))
    d = declared(text)
    kinds = [kw for _, kw, _, _ in d]
    block = ["conv", "tokens", "layernorm", "linear", "gelu", "linear", "untokens", "mul_param", "add"]
    ln2d = ["tokens", "layernorm", "untokens"]
    want = ["conv"] + ln2d
    for stage, depth in enumerate([3, 3, 9, 3]):
        if stage:
            want += ln2d + ["conv"]
        want += block * depth
    want += ["adaptive_avgpool"] + ln2d + ["flatten", "linear"]
    assert kinds == want, kinds
    by = {n: (kw, a, p) for n, kw, a, p in d}
    assert by["features.1.0.block.0"][1] == {"k": "7", "stride": "1", "pad": "3", "bias": "true",
                                             "groups": "96"}
    assert by["features.1.0.block.2"][1] == {"eps": "1e-06"}
    assert any(kw == "mul_param" and p == ["features.5.8.layer_scale"] for kw, a, p in by.values())
    assert any(kw == "untokens" and a == {"h": "2", "w": "2"} for kw, a, p in by.values())
    sd = m.state_dict()
    got = param_shapes(text, sd)
    assert got == {k: v.shape for k, v in sd.items()}, sorted(set(got) ^ set(sd))
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "layer_scale"):
                mod.layer_scale.normal_(0.5, 0.1)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        e = (run_arch(text, m.state_dict(), x) - m.double().eval()(x)).abs().max().item()
    assert e <= 1e-10, e


def test_convnext_refusals():
    """Variants hesscope has no layer for are refused naming the module
    path and the op."""
    x = torch.zeros(2, 3, 8, 8)

    class Scale4d(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.gamma = nn.Parameter(torch.ones(1, 4, 1, 1))
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc((self.gamma * self.c(x)).flatten(1))

    refused(Scale4d(), x, "aten.mul of parameter gamma of shape (1, 4, 1, 1)", "layer scale [C, 1, 1]")

    class LnHW(nn.Module):
        """LayerNorm over the last two dimensions of a channels-last image."""

        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.ln = nn.LayerNorm([8, 4])
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            y = self.ln(self.c(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(y.flatten(1))

    refused(LnHW(), x, "ln: layer_norm over [8, 4]")

    class Hwc(nn.Module):
        """A permute to [N, H, C, W]: no hesscope layer."""

        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(self.c(x).permute(0, 2, 1, 3).flatten(1))

    refused(Hwc(), x, "aten.permute is not supported")


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            fn()
            print(f"{name}: ok", flush=True)

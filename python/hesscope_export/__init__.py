"""Export a PyTorch module to hesscope's architecture language (the
explicit-edge form: one line per value, ``NAME = OP(INPUTS) ARGS``).

    import torch, torchvision
    from hesscope_export import export
    model = torchvision.models.resnet18(num_classes=10)
    export(model, torch.randn(1, 3, 64, 64), "resnet18.arch")

then ``hesscope density --model resnet18.arch --weights W.safetensors`` with
``safetensors.torch.save_file(model.state_dict(), "W.safetensors")``:
parameter names are the module's own state_dict names.

The module is traced with ``torch.fx.symbolic_trace`` (module calls keep
their paths, which are the state_dict prefixes). What fx cannot trace —
control flow that depends on tensor values, data-dependent shapes — is
refused by fx itself. Dropout (and stochastic depth) is the identity, as in
``eval()``; batch norm's mode is hesscope's ``--bn``. An op hesscope has no
layer for is refused here, naming the op and the module path.
"""

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["export", "to_text", "UnsupportedOp"]


class UnsupportedOp(ValueError):
    """An op of the module that hesscope cannot compute."""


def _pair(v, what, where):
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1]:
        return int(v[0])
    raise UnsupportedOp(f"{where}: {what}={v!r} is not square (hesscope's layers take one size)")


def _conv(m, where):
    if m.groups != 1:
        raise UnsupportedOp(f"{where}: Conv2d with groups={m.groups} is not supported yet")
    if _pair(m.dilation, "dilation", where) != 1:
        raise UnsupportedOp(f"{where}: Conv2d with dilation={m.dilation} is not supported yet")
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedOp(f"{where}: Conv2d padding {m.padding!r}/{m.padding_mode} is not supported")
    k = _pair(m.kernel_size, "kernel_size", where)
    s = _pair(m.stride, "stride", where)
    p = _pair(m.padding, "padding", where)
    bias = "true" if m.bias is not None else "false"
    return "conv", f" {m.out_channels} k={k} stride={s} pad={p} bias={bias}"


def _bn(m, where):
    if not m.affine or not m.track_running_stats:
        raise UnsupportedOp(f"{where}: BatchNorm2d without affine parameters or running statistics")
    if abs(m.eps - 1e-5) > 1e-12:
        raise UnsupportedOp(f"{where}: BatchNorm2d eps={m.eps} (hesscope's is 1e-5)")
    return "bn", ""


def _pool(m, kind, where):
    if kind == "maxpool" and (_pair(m.dilation, "dilation", where) != 1 or m.return_indices):
        raise UnsupportedOp(f"{where}: MaxPool2d with dilation or returned indices")
    if m.ceil_mode:
        raise UnsupportedOp(f"{where}: {type(m).__name__} with ceil_mode=True")
    if kind == "avgpool" and (not m.count_include_pad or m.divisor_override is not None):
        raise UnsupportedOp(f"{where}: AvgPool2d without count_include_pad")
    k = _pair(m.kernel_size, "kernel_size", where)
    s = _pair(m.stride if m.stride is not None else m.kernel_size, "stride", where)
    p = _pair(m.padding, "padding", where)
    return kind, f" k={k} stride={s} pad={p}"


def _adaptive(m, where):
    size = m.output_size
    if size in (1, (1, 1), [1, 1]):
        return "gap", ""
    raise UnsupportedOp(f"{where}: AdaptiveAvgPool2d to {size!r} is not supported yet (only 1)")


def _module_op(m, where):
    """(keyword, args) of a leaf module; None for the identity."""
    if isinstance(m, nn.Conv2d):
        return _conv(m, where)
    if isinstance(m, nn.BatchNorm2d):
        return _bn(m, where)
    if isinstance(m, nn.Linear):
        return "linear", f" {m.out_features} bias={'true' if m.bias is not None else 'false'}"
    if isinstance(m, nn.ReLU):
        return "relu", ""
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", f" slope={m.negative_slope!r}"
    if isinstance(m, nn.Tanh):
        return "tanh", ""
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", ""
    if isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise UnsupportedOp(f"{where}: GELU(approximate={m.approximate!r}) (hesscope's is exact)")
        return "gelu", ""
    if isinstance(m, nn.SiLU):
        return "silu", ""
    if isinstance(m, nn.MaxPool2d):
        return _pool(m, "maxpool", where)
    if isinstance(m, nn.AvgPool2d):
        return _pool(m, "avgpool", where)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return _adaptive(m, where)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise UnsupportedOp(f"{where}: Flatten({m.start_dim}, {m.end_dim}) (only from dim 1)")
        return "flatten", ""
    if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Identity)):
        return None
    raise UnsupportedOp(f"{where}: {type(m).__module__}.{type(m).__name__} is not supported")


_FUNCTIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.silu: "silu",
}


def _flatten_args(node, where):
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if start != 1 or end != -1:
        raise UnsupportedOp(f"{where}: flatten({start}, {end}) (only from dim 1)")


def to_text(module, example_input, name=None, loss="cross_entropy"):
    """The module as hesscope architecture text (explicit edges)."""
    if loss != "cross_entropy":
        raise UnsupportedOp(f"loss {loss!r}: hesscope computes the mean softmax cross-entropy")
    module = module.eval()
    x = example_input
    if x.dim() != 4:
        raise UnsupportedOp(f"example input of shape {tuple(x.shape)}: an image batch [N, C, H, W]")
    with torch.no_grad():
        out = module(x)
    if out.dim() != 2:
        raise UnsupportedOp(f"the module gives {tuple(out.shape)}: logits [N, classes] expected")
    gm = torch.fx.symbolic_trace(module)
    mods = dict(gm.named_modules())
    name = name or type(module).__name__.lower()
    lines = [
        f"# {type(module).__module__}.{type(module).__name__}, exported by hesscope_export",
        f"model {name}",
        f"input {x.shape[1]} {x.shape[2]} {x.shape[3]}",
        f"classes {out.shape[1]}",
    ]
    value = {}  # fx node -> hesscope value name
    used = {n for n, _ in module.named_modules() if n}  # module paths stay theirs

    def fresh(base):
        n = base
        while n in used or n == "input":
            n += "_"
        used.add(n)
        return n

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if value:
                raise UnsupportedOp(f"{node.name}: a second input (hesscope models take one image)")
            value[node] = "input"
            continue
        if node.op == "output":
            res = node.args[0]
            if not isinstance(res, torch.fx.Node):
                raise UnsupportedOp("the module returns several values: logits expected")
            if res is not last:
                raise UnsupportedOp(f"the output `{res.name}` is not the last value computed")
            continue
        ins = [a for a in node.args if isinstance(a, torch.fx.Node)]
        where = node.target if node.op == "call_module" else node.name
        if node.op == "call_module":
            op = _module_op(mods[node.target], where)
            if op and op[0] in ("conv", "bn", "linear"):
                if node.target in value.values():
                    raise UnsupportedOp(f"{where}: a module with parameters called twice")
                out_name = node.target  # its tensors are NAME.weight, ...
            else:
                out_name = node.target if node.target not in value.values() else fresh(node.target)
        elif node.op == "call_function" or node.op == "call_method":
            t = node.target
            if t in (operator.add, torch.add, operator.iadd, "add", "add_"):
                if len(ins) != 2 or node.kwargs.get("alpha", 1) != 1:
                    raise UnsupportedOp(f"{where}: add of {len(ins)} tensors (or with alpha)")
                op = ("add", "")
            elif t in _FUNCTIONS or t in ("relu", "relu_", "sigmoid", "tanh"):
                op = (_FUNCTIONS.get(t, str(t).rstrip("_")), "")
            elif t in (torch.flatten, "flatten"):
                _flatten_args(node, where)
                op = ("flatten", "")
            elif t in (F.dropout, "contiguous"):
                op = None
            else:
                tn = getattr(t, "__name__", str(t))
                raise UnsupportedOp(f"{where}: {tn} is not supported")
            out_name = fresh(node.name)
        else:
            raise UnsupportedOp(f"{node.name}: fx op {node.op} ({node.target}) is not supported")
        if op is None:  # the identity
            value[node] = value[ins[0]]
            last = node
            continue
        kw, args = op
        srcs = ", ".join(value[i] for i in ins)
        lines.append(f"{out_name} = {kw}({srcs}){args}")
        value[node] = out_name
        last = node
    return "\n".join(lines) + "\n"


def export(module, example_input, path, loss="cross_entropy", name=None):
    """Writes `to_text(module, example_input)` to `path`."""
    text = to_text(module, example_input, name=name, loss=loss)
    with open(path, "w") as f:
        f.write(text)
    return text

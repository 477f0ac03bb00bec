"""Export a PyTorch module to hesscope's architecture language (the
explicit-edge form: one line per value, ``NAME = OP(INPUTS) ARGS``).

    import torch, torchvision
    from hesscope_export import export
    model = torchvision.models.resnet18(num_classes=10)
    export(model, torch.randn(1, 3, 64, 64), "resnet18.arch")

then ``hesscope density --model resnet18.arch --weights W.safetensors`` with
``safetensors.torch.save_file(model.state_dict(), "W.safetensors")``:
parameter and buffer names are the module's own state_dict names (taken
from the export's graph signature), and the layers are written in an order
that keeps the parameters in ``model.parameters()`` order wherever the
graph allows it.

The module is traced (in ``eval()`` mode) with ``torch.export`` to an ATen
graph; layers are named by the module paths of ``nn_module_stack`` (a
convolution, batch norm or linear by the state_dict prefix of its
parameters). Dropout (and stochastic depth, the identity in ``eval()``) is
the identity; batch norm's mode is hesscope's ``--bn``. An op hesscope has
no layer for is refused here, naming the module path and the op
(``features.3.block.1: aten.grid_sampler_2d is not supported``).

Transformers (``seq.py``): an example input of token ids (integers
[N, T]) makes a language model (``input tokens T``, logits [N, T, V]); a
Hugging Face model is traced as ``model(input_ids=ids,
use_cache=False).logits`` and keeps its own state_dict names. torchvision's
``VisionTransformer`` and Hugging Face's ``GPT2LMHeadModel`` (eager
attention) export; their attention, ``Conv1D`` and ``gelu_new`` modules are
recognised by ``nn_module_stack`` and checked numerically against
hesscope's layers before they are written.

What ``torch.export`` cannot trace, refused with its message (``torch.export
cannot trace NAME: ...``):

- Python control flow on tensor values (``if x.sum() > 0:``), loops whose
  count depends on a tensor, and ``.item()`` / ``.tolist()`` feeding shapes
  or branches: export traces one path, so data-dependent branches are
  errors (rewrite them with ``torch.cond`` / ``torch.where``).
- Data-dependent output shapes (``nonzero``, boolean-mask indexing,
  ``unique``), unless bounded with ``torch._check``.
- Calls it cannot see through: NumPy or other non-torch code on tensors,
  custom autograd Functions and C++ extensions without fake-tensor
  kernels, ``torch.jit.script`` modules, global state mutated in forward.
- Inputs other than tensors that change the graph per call (Python
  objects, ``**kwargs`` dictionaries): a Hugging Face model is therefore
  traced through a wrapper taking ``input_ids`` alone, with
  ``use_cache=False`` (a cache would be a second output).
- Fused attention kernels trace (``scaled_dot_product_attention``) but
  PyTorch cannot differentiate them twice; hesscope computes its own
  second-order passes, so the exported model needs no math-backend switch.
"""

import heapq
import operator

import torch

from .seq import MARKERS, SequenceMixin, UnsupportedOp

__all__ = ["export", "to_text", "UnsupportedOp"]


aten = torch.ops.aten

# ATen ops that are the identity here (eval mode, copies, views that keep
# the shape).
_IDENTITY = {
    aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
    aten.feature_dropout_.default, aten.alpha_dropout.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default,
}

# Activations without options: ATen op -> keyword.
_ACTIVATIONS = {
    aten.relu.default: "relu", aten.relu_.default: "relu",
    aten.relu6.default: "relu6", aten.relu6_.default: "relu6",
    aten.hardswish.default: "hardswish", aten.hardswish_.default: "hardswish",
    aten.hardsigmoid.default: "hardsigmoid", aten.hardsigmoid_.default: "hardsigmoid",
    aten.silu.default: "silu", aten.silu_.default: "silu",
    aten.sigmoid.default: "sigmoid", aten.sigmoid_.default: "sigmoid",
    aten.tanh.default: "tanh", aten.tanh_.default: "tanh",
}


def _opname(target):
    """`aten.grid_sampler_2d` for an ATen overload, else its name."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet)
    return getattr(target, "__name__", str(target))


def _where(node, fallback):
    """The innermost module path of a graph node (its nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        path = str(path)
        if path:
            return path
    return fallback


def _shape(node):
    v = node.meta.get("val")
    return tuple(v.shape) if hasattr(v, "shape") else None


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _square(v, what, where, default=None):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        if default is None:
            raise UnsupportedOp(f"{where}: {what} missing")
        return default
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)) and all(int(e) == int(v[0]) for e in v):
        return int(v[0])
    raise UnsupportedOp(f"{where}: {what}={list(v)!r} is not square (hesscope's layers take one size)")


class _Shuffle:
    """A channel shuffle under way: view to [N, G, C/G, H, W] (step 1),
    transposed (step 2), then viewed back to [N, C, H, W]."""

    def __init__(self, src, groups, step):
        self.src, self.groups, self.step = src, groups, step


class _Parts:
    """chunk/split along channels: the (start, len) of each part of src."""

    def __init__(self, src, parts):
        self.src, self.parts = src, parts


# A value computed from constants and parameters only.
_CONSTANT = object()


class _Exporter(SequenceMixin):
    CONSTANT = _CONSTANT

    def __init__(self, module, x, prefix=""):
        self.module = module
        # A wrapper's attribute path (`inner.`), stripped from every name.
        self.prefix = prefix
        try:
            self.ep = torch.export.export(module, (x,))
        except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
            raise UnsupportedOp(f"torch.export cannot trace {type(module).__name__}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        sig = self.ep.graph_signature
        self.params_raw = dict(sig.inputs_to_parameters)  # placeholder -> state_dict name
        self.buffers_raw = dict(sig.inputs_to_buffers)
        self.params = {k: self.strip(v) for k, v in self.params_raw.items()}
        self.buffers = {k: self.strip(v) for k, v in self.buffers_raw.items()}
        self.constants = set(getattr(sig, "inputs_to_lifted_tensor_constants", {}))
        self.tensors = dict(module.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(module.named_buffers(remove_duplicate=False)))
        # Tied parameters: every name -> the first name of that tensor.
        first = {}
        self.canon = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            self.canon[self.strip(n)] = self.strip(first.setdefault(id(p), n))
        self.param_index = {self.strip(n): i for i, n in enumerate(dict(module.named_parameters()))}
        self.in_block = set()
        self.const_memo = {}
        self.records = []  # (name, keyword, inputs, args, first parameter index)
        self.value = {}  # graph node -> hesscope value name, or a _Shuffle/_Parts
        self.channels_last = set()  # value names of [N, H, W, C] tensors (sequences here)
        self.used = {"input"}
        # Layer names with tensors (the state_dict prefixes): other values
        # never take them.
        self.reserved = {self.strip(k).rpartition(".")[0] for k in module.state_dict()}

    def strip(self, name):
        """A name without the wrapper's prefix."""
        if self.prefix and name.startswith(self.prefix):
            return name[len(self.prefix):]
        return "" if name + "." == self.prefix else name

    # ---- names
    def fresh(self, base):
        """A new value name from `base`, never a parameterised layer's."""
        base = base or "v"
        n, k = base, 0
        while n in self.used or n in self.reserved:
            k += 1
            n = f"{base}_{k}"
        self.used.add(n)
        return n

    def layer_name(self, where, node, kind, tensors):
        """A layer with parameters is named by their state_dict prefix:
        every tensor must be PREFIX.<its role>."""
        prefix = None
        for role, ph in tensors:
            if ph is None:
                continue
            if not isinstance(ph, torch.fx.Node) or (ph.name not in self.params and ph.name not in self.buffers):
                raise UnsupportedOp(f"{where}: {kind} whose {role} is computed, not a parameter or buffer")
            full = self.canon_name(ph)
            if not full.endswith("." + role):
                raise UnsupportedOp(f"{where}: {kind} {role} is `{full}`, not <module>.{role}")
            p = full[: -len(role) - 1]
            if prefix is not None and p != prefix:
                raise UnsupportedOp(f"{where}: {kind} takes tensors of two modules ({prefix}, {p})")
            prefix = p
        if prefix in self.used:
            raise UnsupportedOp(f"{where}: the module `{prefix}` is called twice (shared parameters)")
        self.used.add(prefix)
        return prefix

    def src(self, node, where, arg):
        """The hesscope value of a tensor argument."""
        if not isinstance(arg, torch.fx.Node) or arg not in self.value:
            raise UnsupportedOp(f"{where}: {_opname(node.target)} of a constant or a parameter "
                                f"({arg}) is not supported")
        v = self.value[arg]
        if v is _CONSTANT:
            raise UnsupportedOp(f"{where}: {_opname(node.target)} of a constant is not supported")
        if not isinstance(v, str):
            what = ("channel shuffle" if isinstance(v, _Shuffle) else "split" if isinstance(v, _Parts)
                    else "patch reshape" if isinstance(v, MARKERS[0]) else "parameter or embedding")
            raise UnsupportedOp(f"{where}: {_opname(node.target)} of an intermediate {what} "
                                "is not supported")
        return v

    def emit(self, node, where, kw, ins, args="", name=None, param=None):
        if name is None:
            name = self.fresh(self.strip(_where(node, "")) or node.name)
        first = self.param_index.get(param) if param is not None else None
        self.records.append((name, kw, ins, args, first))
        self.value[node] = name
        # Channels-last values (ConvNeXt's [N, H, W, C] between its
        # permutes) are hesscope sequences [H·W, C]: `tokens` makes one,
        # the layers on the last dimension keep it, `untokens` ends it.
        if kw == "tokens" and len(_shape(node) or ()) == 4:
            self.channels_last.add(name)
        elif kw != "untokens" and ins and ins[0] in self.channels_last:
            self.channels_last.add(name)

    # ---- the graph
    def run(self):
        graph = self.ep.graph
        out = None
        top = type(self.module).__name__
        for node in graph.nodes:
            if node.op == "placeholder":
                if node.name in self.params or node.name in self.buffers:
                    continue
                if node.name in self.constants:
                    self.value[node] = _CONSTANT
                    continue
                if "input" in self.value.values():
                    raise UnsupportedOp(f"{node.name}: a second input (hesscope models take one image "
                                        "or one sequence of token ids)")
                self.value[node] = "input"
                continue
            if node.op == "output":
                res = node.args[0]
                if isinstance(res, (tuple, list)):
                    if len(res) != 1:
                        raise UnsupportedOp(f"{top} returns {len(res)} values: logits expected")
                    res = res[0]
                out = res
                continue
            where = self.strip(_where(node, top)) or top
            if node.op != "call_function":
                raise UnsupportedOp(f"{where}: graph op {node.op} ({node.target}) is not supported")
            if self.try_block(node):
                continue
            self.call(node, where)
        if out is None or not isinstance(self.value.get(out), str):
            raise UnsupportedOp(f"{top}: the output is not a value hesscope computes")
        return self.value[out]

    def call(self, node, where):
        t = node.target
        a = node.args
        # In-place ops (relu_, add_) are read as new values: torch.export
        # points every later read of the value they change at their output.
        if t in _IDENTITY:
            v = self.value.get(a[0]) if isinstance(a[0], torch.fx.Node) else None
            if not isinstance(v, (str, _Shuffle)):
                raise UnsupportedOp(f"{where}: {_opname(t)} of a constant or a parameter is not supported")
            self.value[node] = v
            return
        if self.seq_call(node, where):
            return
        if not any(isinstance(self.value.get(n), (str, _Shuffle, _Parts) + MARKERS)
                   or (n.op == "placeholder" and (n.name in self.params or n.name in self.buffers))
                   for n in node.all_input_nodes):
            # Made from constants alone (a mask, position ids): a constant,
            # refused only where a layer reads it.
            self.value[node] = _CONSTANT
            return
        if t in (aten.conv2d.default, aten.convolution.default):
            return self.conv(node, where)
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            return self.bn(node, where)
        if t == aten.linear.default:
            return self.linear(node, where)
        if t in _ACTIVATIONS:
            return self.emit(node, where, _ACTIVATIONS[t], [self.src(node, where, a[0])])
        if t in (aten.hardtanh.default, aten.hardtanh_.default):
            lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            if (lo, hi) != (0.0, 6.0):
                raise UnsupportedOp(f"{where}: aten.hardtanh({lo}, {hi}) is not supported (only relu6's 0, 6)")
            return self.emit(node, where, "relu6", [self.src(node, where, a[0])])
        if t in (aten.leaky_relu.default, aten.leaky_relu_.default):
            slope = _arg(node, 1, "negative_slope", 0.01)
            return self.emit(node, where, "leaky_relu", [self.src(node, where, a[0])], f" slope={float(slope)!r}")
        if t == aten.gelu.default or t == aten.gelu_.default:
            approx = _arg(node, 1, "approximate", "none")
            if approx not in ("none", "tanh"):
                raise UnsupportedOp(f"{where}: aten.gelu(approximate={approx!r}) is not supported")
            kw = "gelu" if approx == "none" else "gelu_tanh"
            return self.emit(node, where, kw, [self.src(node, where, a[0])])
        if t in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default):
            return self.pool(node, where, "maxpool")
        if t == aten.avg_pool2d.default:
            return self.pool(node, where, "avgpool")
        if t == aten.adaptive_avg_pool2d.default:
            return self.adaptive(node, where)
        if t == aten.mean.dim:
            dims = _arg(node, 1, "dim", None)
            shape_in = _shape(a[0])
            if shape_in is None or len(shape_in) != 4 or sorted(d % 4 for d in dims) != [2, 3]:
                raise UnsupportedOp(f"{where}: aten.mean over {dims} is not supported (only over H, W)")
            if _arg(node, 2, "keepdim", False):
                return self.emit(node, where, "adaptive_avgpool", [self.src(node, where, a[0])], " h=1 w=1")
            return self.emit(node, where, "gap", [self.src(node, where, a[0])])
        if t in (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return self.reshape(node, where)
        if t in (aten.transpose.int, aten.permute.default):
            return self.transpose(node, where)
        if t in (aten.add.Tensor, aten.add_.Tensor):
            if node.kwargs.get("alpha", 1) == 1 and self.seq_add(node, where):
                return
            if not isinstance(a[1], torch.fx.Node) or node.kwargs.get("alpha", 1) != 1:
                raise UnsupportedOp(f"{where}: aten.add of a constant (or with alpha) is not supported")
            if _shape(a[0]) != _shape(a[1]):
                raise UnsupportedOp(f"{where}: aten.add of shapes {_shape(a[0])} and {_shape(a[1])} "
                                    "(hesscope adds equal shapes)")
            return self.emit(node, where, "add", [self.src(node, where, a[0]), self.src(node, where, a[1])])
        if t in (aten.mul.Tensor, aten.mul_.Tensor):
            return self.mul(node, where)
        if t == aten.cat.default:
            if self.seq_cat(node, where):
                return
            xs, dim = a[0], _arg(node, 1, "dim", 0)
            shape = _shape(node)
            if shape is None or len(shape) != 4 or dim % 4 != 1:
                raise UnsupportedOp(f"{where}: aten.cat along dim {dim} is not supported (only channels)")
            ins = [self.src(node, where, x) for x in xs]
            if len(ins) == 1:
                self.value[node] = ins[0]
                return
            return self.emit(node, where, "concat", ins)
        if t in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default,
                 aten.tensor_split.sections):
            return self.split(node, where)
        if t == operator.getitem:
            return self.getitem(node, where)
        if t in (aten.narrow.default, aten.slice.Tensor):
            return self.narrow(node, where)
        if not any(isinstance(self.value.get(n), (str, _Shuffle, _Parts) + MARKERS) for n in node.all_input_nodes):
            # Made from constants and parameters alone (a grid, a mask): a
            # constant, refused only where a layer reads it.
            self.value[node] = _CONSTANT
            return
        raise UnsupportedOp(f"{where}: {_opname(t)} is not supported")

    def linear(self, node, where):
        """Linear on [N, F] or on the last dimension of a sequence; a
        weight declared under another module's name is a tie."""
        a = node.args
        w, b = a[1], _arg(node, 2, "bias", None)
        shape_in = _shape(a[0])
        ok = (2, 3, 4) if self.value.get(a[0]) in self.channels_last else (2, 3)
        if shape_in is None or len(shape_in) not in ok:
            raise UnsupportedOp(f"{where}: linear on a {len(shape_in or ())}-d input (hesscope's takes [N, F], "
                                "a sequence [N, T, F] or channels-last [N, H, W, C] between permutes)")
        dout = _shape(w)[0]
        bias = f" bias={'true' if b is not None else 'false'}"
        if isinstance(w, torch.fx.Node) and w.name in self.params:
            first = self.canon_name(w)
            own = where + ".weight"
            if first != own and self.canon.get(own) == first:
                # A tied weight (GPT-2's lm_head.weight = transformer.wte.weight).
                if b is not None:
                    raise UnsupportedOp(f"{where}: a linear with a tied weight and a bias is not supported")
                self.take(where, where)
                return self.emit(node, where, "linear", [self.src(node, where, a[0])],
                                 f" {dout}{bias} tie={first}", name=where)
        name = self.layer_name(where, node, "linear", [("weight", w), ("bias", b)])
        self.emit(node, where, "linear", [self.src(node, where, a[0])], f" {dout}{bias}", name=name,
                  param=name + ".weight")

    def conv(self, node, where):
        a = node.args
        x, w, b = a[0], a[1], _arg(node, 2, "bias", None)
        stride = _square(_arg(node, 3, "stride", [1, 1]), "stride", where, 1)
        padding = _arg(node, 4, "padding", [0, 0])
        if isinstance(padding, str):
            raise UnsupportedOp(f"{where}: aten.conv2d with padding='{padding}' is not supported (give numbers)")
        pad = _square(padding, "padding", where, 0)
        dilation = _square(_arg(node, 5, "dilation", [1, 1]), "dilation", where, 1)
        if node.target == aten.convolution.default:
            if a[6]:
                raise UnsupportedOp(f"{where}: a transposed convolution is not supported")
            groups = a[8]
        else:
            groups = _arg(node, 6, "groups", 1)
        ws = _shape(w)
        if ws is None or len(ws) != 4:
            raise UnsupportedOp(f"{where}: aten.conv2d with a {len(ws or ())}-d weight (only 2-d convolutions)")
        if ws[2] != ws[3]:
            raise UnsupportedOp(f"{where}: a {ws[2]}×{ws[3]} kernel is not square (hesscope's layers take one size)")
        name = self.layer_name(where, node, "convolution", [("weight", w), ("bias", b)])
        args = f" {ws[0]} k={ws[2]} stride={stride} pad={pad} bias={'true' if b is not None else 'false'}"
        if groups != 1:
            args += f" groups={groups}"
        if dilation != 1:
            args += f" dilation={dilation}"
        self.emit(node, where, "conv", [self.src(node, where, x)], args, name=name, param=name + ".weight")

    def bn(self, node, where):
        a = node.args
        x, w, b, rm, rv = a[0], a[1], a[2], a[3], a[4]
        if node.target == aten.batch_norm.default:
            eps = a[7]
        else:
            eps = a[6]
        if w is None or b is None or rm is None or rv is None:
            raise UnsupportedOp(f"{where}: batch norm without affine parameters or running statistics "
                                "is not supported")
        # eps=1e-5 (BatchNorm2d's default) is hesscope's default; another
        # (MobileNetV3's 1e-3) is written as an option.
        args = "" if abs(eps - 1e-5) <= 1e-12 else f" eps={float(eps)!r}"
        if len(_shape(x) or ()) != 4:
            raise UnsupportedOp(f"{where}: batch norm of a {len(_shape(x) or ())}-d input (only BatchNorm2d)")
        name = self.layer_name(where, node, "batch norm",
                               [("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)])
        self.emit(node, where, "bn", [self.src(node, where, x)], args, name=name, param=name + ".weight")
        if node.target != aten.batch_norm.default:  # (y, mean, invstd): only y is read
            self.value[node] = _Parts(self.value[node], None)

    def pool(self, node, where, kind):
        a = node.args
        k = _square(_arg(node, 1, "kernel_size", None), "kernel_size", where)
        s = _square(_arg(node, 2, "stride", []), "stride", where, k)
        p = _square(_arg(node, 3, "padding", 0), "padding", where, 0)
        if kind == "maxpool":
            if _square(_arg(node, 4, "dilation", 1), "dilation", where, 1) != 1:
                raise UnsupportedOp(f"{where}: aten.max_pool2d with dilation is not supported")
            ceil = _arg(node, 5, "ceil_mode", False)
        else:
            ceil = _arg(node, 4, "ceil_mode", False)
            if not _arg(node, 5, "count_include_pad", True) or _arg(node, 6, "divisor_override", None) is not None:
                raise UnsupportedOp(f"{where}: aten.avg_pool2d without count_include_pad (or with a divisor) "
                                    "is not supported")
        args = f" k={k} stride={s} pad={p}" + (" ceil=true" if ceil else "")
        self.emit(node, where, kind, [self.src(node, where, a[0])], args)
        if node.target == aten.max_pool2d_with_indices.default:
            self.value[node] = _Parts(self.value[node], None)

    def adaptive(self, node, where):
        a = node.args
        size = a[1]
        oh, ow = (size, size) if isinstance(size, int) else (size[0], size[1])
        if oh is None or ow is None:
            raise UnsupportedOp(f"{where}: aten.adaptive_avg_pool2d to {size} (None sizes) is not supported")
        users = list(node.users)
        flat_after = users and all(self.is_flatten(u) for u in users)
        if (oh, ow) == (1, 1) and flat_after:
            return self.emit(node, where, "gap", [self.src(node, where, a[0])])
        self.emit(node, where, "adaptive_avgpool", [self.src(node, where, a[0])], f" h={oh} w={ow}")

    def is_flatten(self, node):
        shape_in, shape = _shape(node.args[0]) if node.args else None, _shape(node)
        if node.target not in (aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                               aten._unsafe_view.default):
            return False
        return shape_in is not None and shape is not None and len(shape) == 2 and shape[0] == shape_in[0]

    def reshape(self, node, where):
        x = node.args[0]
        v = self.value.get(x)
        shape_in, shape = _shape(x), _shape(node)
        if isinstance(v, _Shuffle) and v.step == 2 and shape is not None and len(shape) == 4:
            return self.emit(node, where, "shuffle", [v.src], f" groups={v.groups}")
        if shape_in is not None and shape is not None and shape == shape_in:
            self.value[node] = self.src(node, where, x)
            return
        if (shape_in is not None and shape is not None and len(shape_in) == 4 and len(shape) == 5
                and shape[0] == shape_in[0] and shape[1] * shape[2] == shape_in[1]
                and shape[3:] == shape_in[2:]):
            self.value[node] = _Shuffle(self.src(node, where, x), shape[1], 1)
            return
        if self.seq_reshape(node, where):
            return
        if self.is_flatten(node):
            if node.target == aten.flatten.using_ints:
                start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
                if start != 1 or end not in (-1, len(shape_in) - 1):
                    raise UnsupportedOp(f"{where}: aten.flatten({start}, {end}) is not supported (only from dim 1)")
            return self.emit(node, where, "flatten", [self.src(node, where, x)])
        raise UnsupportedOp(f"{where}: {_opname(node.target)} from {list(shape_in or ())} to {list(shape or ())} "
                            "is not supported (only flattening to [N, -1] and the channel shuffle)")

    def transpose(self, node, where):
        if self.seq_transpose(node, where):
            return
        if self.channels_last_permute(node, where):
            return
        v = self.value.get(node.args[0])
        if node.target == aten.transpose.int:
            dims = sorted(d % 5 for d in node.args[1:3])
            swap12 = dims == [1, 2]
        else:
            swap12 = [d % 5 for d in node.args[1]] == [0, 2, 1, 3, 4]
        if isinstance(v, _Shuffle) and v.step == 1 and swap12:
            self.value[node] = _Shuffle(v.src, v.groups, 2)
            return
        raise UnsupportedOp(f"{where}: {_opname(node.target)} is not supported (only in a channel shuffle)")

    def mul(self, node, where):
        a, b = node.args[0], node.args[1]
        if not isinstance(b, torch.fx.Node) or not isinstance(a, torch.fx.Node):
            raise UnsupportedOp(f"{where}: aten.mul by a constant is not supported")
        if self.layer_scale(node, where):
            return
        sa, sb = _shape(a), _shape(b)
        pair = None
        if sa is not None and sb is not None and len(sa) == 4 and len(sb) == 4 and sa[:2] == sb[:2]:
            if sb[2:] == (1, 1) or sa == sb:
                pair = (a, b)
            elif sa[2:] == (1, 1):
                pair = (b, a)
        if pair is None:
            raise UnsupportedOp(f"{where}: aten.mul of shapes {sa} and {sb} is not supported "
                                "(only [N, C, H, W] by [N, C, 1, 1] or equal shapes)")
        self.emit(node, where, "mul", [self.src(node, where, pair[0]), self.src(node, where, pair[1])])

    def split(self, node, where):
        x = node.args[0]
        shape_in = _shape(x)
        t = node.target
        if t == aten.chunk.default:
            n, dim = node.args[1], _arg(node, 2, "dim", 0)
        else:
            dim = _arg(node, 2, "dim", 0)
        if shape_in is None or len(shape_in) != 4 or dim % 4 != 1:
            raise UnsupportedOp(f"{where}: {_opname(t)} along dim {dim} is not supported (only channels)")
        c = shape_in[1]
        if t == aten.chunk.default:
            size = -(-c // n)
            sizes = [min(size, c - i) for i in range(0, c, size)]
        elif t == aten.split.Tensor:
            size = node.args[1]
            sizes = [min(size, c - i) for i in range(0, c, size)]
        elif t == aten.split_with_sizes.default:
            sizes = list(node.args[1])
        else:
            n = node.args[1]
            sizes = [c // n + (1 if i < c % n else 0) for i in range(n)]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.value[node] = _Parts(self.src(node, where, x), list(zip(starts, sizes)))

    def getitem(self, node, where):
        v = self.value.get(node.args[0])
        i = node.args[1]
        if isinstance(v, _Parts) and v.parts is None:  # a max pool's indices, a batch norm's statistics
            if i != 0:
                raise UnsupportedOp(f"{where}: output {i} of {_opname(node.args[0].target)} is not supported")
            self.value[node] = v.src
            return
        if not isinstance(v, _Parts):
            raise UnsupportedOp(f"{where}: getitem of {node.args[0]} is not supported")
        start, ln = v.parts[i]
        self.emit(node, where, "narrow", [v.src], f" start={start} len={ln}")

    def narrow(self, node, where):
        x = node.args[0]
        shape_in = _shape(x)
        if shape_in is None:
            raise UnsupportedOp(f"{where}: {_opname(node.target)} of an unknown shape")
        if node.target == aten.narrow.default:
            dim, start, ln = node.args[1], node.args[2], node.args[3]
        else:
            dim = _arg(node, 1, "dim", 0)
            start = _arg(node, 2, "start", None)
            end = _arg(node, 3, "end", None)
            if _arg(node, 4, "step", 1) != 1:
                raise UnsupportedOp(f"{where}: aten.slice with a step is not supported")
            c = shape_in[dim]
            start = 0 if start is None else (start + c if start < 0 else start)
            end = c if end is None else min(end + c if end < 0 else end, c)
            ln = end - start
        dim %= len(shape_in)
        if start == 0 and ln == shape_in[dim]:
            self.value[node] = self.src(node, where, x)  # the whole dimension
            return
        if len(shape_in) != 4 or dim != 1:
            raise UnsupportedOp(f"{where}: {_opname(node.target)} along dim {dim} is not supported (only channels)")
        self.emit(node, where, "narrow", [self.src(node, where, x)], f" start={start} len={ln}")


def _ordered(records, output):
    """The records in a topological order that keeps the parameters in
    `model.parameters()` order wherever the graph allows: a value without
    parameters goes as soon as its inputs are there (in graph order); of
    the layers with parameters ready, the one leading to the earliest
    parameter goes first. Values the output does not read are dropped."""
    by_name = {r[0]: i for i, r in enumerate(records)}
    # Keep what the output reads.
    keep, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n in keep or n not in by_name:
            continue
        keep.add(n)
        stack.extend(records[by_name[n]][2])
    idx = [i for i, r in enumerate(records) if r[0] in keep]
    inf = float("inf")
    # key = the earliest parameter among a record and what it feeds.
    key = {i: (records[i][4] if records[i][4] is not None else inf) for i in idx}
    users = {i: [] for i in idx}
    for i in idx:
        for s in records[i][2]:
            if s in by_name and by_name[s] in users:
                users[by_name[s]].append(i)
    for i in reversed(idx):
        for u in users[i]:
            key[i] = min(key[i], key[u])
    pending = {i: sum(1 for s in set(records[i][2]) if s in by_name and by_name[s] in key) for i in idx}
    def prio(i):
        return (0, i) if records[i][4] is None else (1, key[i], i)

    heap = [(prio(i), i) for i in idx if pending[i] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, i = heapq.heappop(heap)
        out.append(records[i])
        for u in set(users[i]):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(heap, (prio(u), u))
    return out


class _Logits(torch.nn.Module):
    """A Hugging Face language model as a function of its token ids:
    `model(input_ids=ids, use_cache=False).logits`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(input_ids=ids, use_cache=False).logits


def to_text(module, example_input, name=None, loss="cross_entropy"):
    """The module as hesscope architecture text (explicit edges). The
    example input is an image batch [N, C, H, W] (a classifier: logits
    [N, classes]) or token ids, integers [N, T] (a language model: logits
    [N, T, vocabulary]; a Hugging Face model is called as
    `model(input_ids=ids, use_cache=False).logits`)."""
    if loss != "cross_entropy":
        raise UnsupportedOp(f"loss {loss!r}: hesscope computes the mean softmax cross-entropy")
    module = module.eval()
    x = example_input
    tokens = not x.is_floating_point()
    if tokens and x.dim() != 2:
        raise UnsupportedOp(f"example token ids of shape {tuple(x.shape)}: [N, T] expected")
    if not tokens and x.dim() != 4:
        raise UnsupportedOp(f"example input of shape {tuple(x.shape)}: an image batch [N, C, H, W] "
                            "or token ids [N, T]")
    traced, prefix = module, ""
    if tokens and hasattr(module, "config") and hasattr(module, "get_input_embeddings"):
        traced, prefix = _Logits(module).eval(), "inner."
    try:
        with torch.no_grad():
            out = traced(x)
    except Exception as e:  # noqa: BLE001 - whatever the module raises
        raise UnsupportedOp(f"{type(module).__name__} fails on the example input of shape "
                            f"{tuple(x.shape)}: {type(e).__name__}: {e}") from e
    want = 3 if tokens else 2
    if not isinstance(out, torch.Tensor) or out.dim() != want:
        raise UnsupportedOp(f"the module gives {getattr(out, 'shape', type(out).__name__)}: logits "
                            + ("[N, T, vocabulary]" if tokens else "[N, classes]") + " expected")
    ex = _Exporter(traced, x, prefix)
    result = ex.run()
    records = _ordered(ex.records, result)
    if not records or records[-1][0] != result:
        raise UnsupportedOp("the output is the input itself: no layer to export")
    name = name or type(module).__name__.lower()
    lines = [
        f"# {type(module).__module__}.{type(module).__name__}, exported by hesscope_export",
        f"model {name}",
        f"input tokens {x.shape[1]}" if tokens else f"input {x.shape[1]} {x.shape[2]} {x.shape[3]}",
        f"classes {out.shape[-1]}",
    ]
    for n, kw, ins, args, _ in records:
        lines.append(f"{n} = {kw}({', '.join(ins)}){args}")
    return "\n".join(lines) + "\n"


def export(module, example_input, path, loss="cross_entropy", name=None):
    """Writes `to_text(module, example_input)` to `path` (nothing on refusal)."""
    text = to_text(module, example_input, name=name, loss=loss)
    with open(path, "w") as f:
        f.write(text)
    return text

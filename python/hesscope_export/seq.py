"""Sequence layers for the exporter: torchvision's ``VisionTransformer`` and
Hugging Face's ``GPT2LMHeadModel`` (and modules built like them).

Most ATen ops map one to one (``layer_norm``, ``embedding``, ``select``,
``linear`` on the last dimension, ``gelu``). Modules whose ATen graph is a
chain of generic ops are recognised by each node's ``nn_module_stack``
instead: every node whose innermost module is one of these is one block,
whose inputs, parameters and single output are read off the graph, and
whose function is then *checked numerically* against hesscope's layer (the
block's own ATen nodes run on random inputs with the module's parameters,
against a reference written here from the layer's definition) before it is
written. A block that does not compute the layer, e.g. an attention with a
mask other than the causal one, a different scale, or dropout left on, is
refused naming the module path.

  nn.MultiheadAttention (self-attention)   attention NAME heads=H
  transformers Conv1D                      conv1d NAME DOUT
  transformers GPT2Attention (its core,    mha heads=H causal=true
    between c_attn and c_proj)
  transformers NewGELUActivation           gelu_tanh

Tied parameters (one tensor under two state_dict names, GPT-2's
``lm_head.weight`` = ``transformer.wte.weight``) are written once, under
the first name of ``named_parameters()``, and a linear reading it under
another module's name becomes ``linear NAME DOUT bias=false tie=FIRST``.
"""

import math

import torch
import torch.nn.functional as F

aten = torch.ops.aten


class UnsupportedOp(ValueError):
    """An op of the module that hesscope cannot compute."""


class _Tokens:
    """An image reshaped to [N, C, H·W] (or flattened from dim 2), before
    the permute that makes it the sequence [N, H·W, C]."""

    def __init__(self, src):
        self.src = src


class _ParamRef:
    """A raw parameter read as a value (ViT's class token, expanded)."""

    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class _PosEmb:
    """Rows 0..T of an embedding table (GPT-2's wpe at arange(T)), to be
    added to a sequence."""

    def __init__(self, name, rows, shape):
        self.name, self.rows, self.shape = name, rows, shape


MARKERS = (_Tokens, _ParamRef, _PosEmb)

# Blocks, by the class of the innermost module: the last part of its
# qualified name, and the package it must come from.
_BLOCKS = {
    "MultiheadAttention": ("torch.", "block_mha"),
    "Conv1D": ("transformers.", "block_conv1d"),
    "GPT2Attention": ("transformers.", "block_gpt2_attention"),
    "NewGELUActivation": ("transformers.", "block_gelu_tanh"),
}

_IGNORED = {aten._assert_tensor_metadata.default}
_TO = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}


def _type_name(t):
    if isinstance(t, str):
        return t
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', str(t))}"


def innermost(node):
    """(module path, class name) of the innermost module of a node."""
    stack = node.meta.get("nn_module_stack") or {}
    vals = list(stack.values())
    if not vals:
        return "", ""
    path, typ = vals[-1]
    return str(path), _type_name(typ)


def _shape(node):
    v = node.meta.get("val")
    return tuple(v.shape) if hasattr(v, "shape") else None


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def mha_reference(qkv, heads, causal):
    """hesscope's `mha`: q|k|v along the features, per head
    softmax(q·kᵀ/sqrt(D/H) [+ causal mask])·v, heads concatenated."""
    n, t, d3 = qkv.shape
    d = d3 // 3
    hd = d // heads
    q, k, v = (z.reshape(n, t, heads, hd).transpose(1, 2) for z in qkv.split(d, dim=-1))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        keep = torch.ones(t, t, dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)


# Two structures that differ give O(1) differences; float32 rounding
# through a block is ~1e-6.
_CHECK_TOL = 1e-4


class SequenceMixin:
    """Methods of the exporter (`_Exporter`) for sequence models."""

    # ---- names and tensors
    def own_name(self, ph):
        """The state_dict name (stripped of a wrapper's prefix) of a
        parameter or buffer placeholder."""
        return self.params.get(ph.name) or self.buffers.get(ph.name)

    def canon_name(self, ph):
        """The name a (possibly tied) parameter is declared under: the
        first of its names in `named_parameters()`."""
        n = self.own_name(ph)
        return self.canon.get(n, n)

    def tensor_of(self, ph):
        """The value of a parameter, buffer or constant placeholder."""
        if ph.name in self.params_raw:
            return self.tensors[self.params_raw[ph.name]].detach()
        if ph.name in self.buffers_raw:
            return self.tensors[self.buffers_raw[ph.name]].detach()
        lifted = dict(getattr(self.ep.graph_signature, "inputs_to_lifted_tensor_constants", {}))
        if ph.name in lifted:
            return self.ep.constants[lifted[ph.name]]
        raise UnsupportedOp(f"{ph.name}: the model's input read as a constant")

    def const_eval(self, node):
        """The value of a node computed from constants and parameters
        alone (a mask, position ids), by running its ATen ops."""
        memo = self.const_memo
        if node in memo:
            return memo[node]
        if node.op == "placeholder":
            out = self.tensor_of(node)
        elif node.op == "call_function":
            get = lambda a: self.const_eval(a)  # noqa: E731
            args = torch.fx.node.map_arg(node.args, get)
            kwargs = torch.fx.node.map_arg(node.kwargs, get)
            out = None if node.target in _IGNORED else node.target(*args, **kwargs)
        else:
            raise UnsupportedOp(f"{node.name}: graph op {node.op} in a constant")
        memo[node] = out
        return out

    # ---- blocks
    def try_block(self, node):
        """Reads the block `node` opens, if its innermost module is one of
        _BLOCKS; True when node belongs to a block (read now or before)."""
        if node in self.in_block:
            return True
        path, typ = innermost(node)
        cls = typ.rpartition(".")[2]
        rule = _BLOCKS.get(cls)
        if rule is None or not typ.startswith(rule[0]):
            return False
        nodes, n = [], node
        while n.op == "call_function" and innermost(n)[0] == path:
            nodes.append(n)
            n = n.next
        self.in_block.update(nodes)
        getattr(self, rule[1])(nodes, path, self.strip(path) or path)
        return True

    def block_io(self, nodes, where):
        """(value inputs, parameter placeholders, constant inputs, the one
        output node) of a block."""
        inside = set(nodes)
        ins, params, consts = [], [], []
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                v = self.value.get(a)
                if a.op == "placeholder" and (a.name in self.params or a.name in self.buffers):
                    if a not in params:
                        params.append(a)
                elif isinstance(v, str):
                    if a not in ins:
                        ins.append(a)
                elif v is self.CONSTANT:
                    if a not in consts:
                        consts.append(a)
                else:
                    raise UnsupportedOp(f"{where}: the block reads {a.name}, which is not a value "
                                        "hesscope computes")
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(outs) != 1:
            raise UnsupportedOp(f"{where}: the module's graph has {len(outs)} outputs read outside it "
                                "(one expected)")
        return ins, params, consts, outs[0]

    def run_block(self, nodes, feed):
        """The block's own ATen nodes run on `feed` (node -> tensor)."""
        env = dict(feed)

        def get(a):
            if a in env:
                return env[a]
            if a.op == "placeholder":
                return self.tensor_of(a)
            return self.const_eval(a)

        for n in nodes:
            if n.target in _IGNORED:
                continue
            args = torch.fx.node.map_arg(n.args, get)
            kwargs = torch.fx.node.map_arg(n.kwargs, get)
            env[n] = n.target(*args, **kwargs)
        return env

    def check_block(self, nodes, x_node, out, reference, where, what):
        """Refuses unless the block maps a random input as `reference`."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(_shape(x_node), generator=g)
        with torch.no_grad():
            got = self.run_block(nodes, {x_node: x})[out]
            want = reference(x)
        if tuple(got.shape) != tuple(want.shape) or _rel(got, want) > _CHECK_TOL:
            err = _rel(got, want) if tuple(got.shape) == tuple(want.shape) else "shape"
            raise UnsupportedOp(f"{where}: the module's graph does not compute {what} "
                                f"(checked on a random input: {err})")

    def one_input(self, ins, where, what):
        if len(ins) != 1:
            raise UnsupportedOp(f"{where}: {what} reads {len(ins)} values (one expected: "
                                f"{', '.join(a.name for a in ins) or 'none'})")
        return ins[0]

    def take(self, where, path):
        if path in self.used:
            raise UnsupportedOp(f"{where}: the module `{path}` is called twice (shared parameters)")
        self.used.add(path)

    def block_params(self, params, where, path, roles):
        names = sorted(self.canon_name(p) for p in params)
        want = sorted(f"{path}.{r}" for r in roles)
        if names != want:
            raise UnsupportedOp(f"{where}: the module reads parameters {names}, expected {want}")

    def block_mha(self, nodes, raw, path):
        mod = self.module.get_submodule(raw)
        if not getattr(mod, "_qkv_same_embed_dim", False) or mod.in_proj_bias is None \
                or mod.bias_k is not None or mod.add_zero_attn or not mod.batch_first:
            raise UnsupportedOp(f"{path}: nn.MultiheadAttention with separate q/k/v weights, no bias, "
                                "bias_kv, add_zero_attn or batch_first=False is not supported")
        ins, params, consts, out = self.block_io(nodes, path)
        x = self.one_input(ins, path, "nn.MultiheadAttention (self-attention: query = key = value)")
        if consts:
            raise UnsupportedOp(f"{path}: nn.MultiheadAttention with a mask is not supported")
        self.block_params(params, path, path, ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                               "out_proj.bias"])
        h = mod.num_heads
        w_in, b_in = mod.in_proj_weight.detach(), mod.in_proj_bias.detach()
        w_out, b_out = mod.out_proj.weight.detach(), mod.out_proj.bias.detach()

        def ref(z):
            return F.linear(mha_reference(F.linear(z, w_in, b_in), h, False), w_out, b_out)

        self.check_block(nodes, x, out, ref, path, f"self-attention with {h} heads")
        self.take(path, path)
        self.emit(out, path, "attention", [self.src(out, path, x)], f" heads={h}", name=path,
                  param=self.canon.get(path + ".in_proj_weight", path + ".in_proj_weight"))

    def block_conv1d(self, nodes, raw, path):
        mod = self.module.get_submodule(raw)
        ins, params, consts, out = self.block_io(nodes, path)
        x = self.one_input(ins, path, "Conv1D")
        self.block_params(params, path, path, ["weight", "bias"])
        w, b = mod.weight.detach(), mod.bias.detach()
        self.check_block(nodes, x, out, lambda z: z @ w + b, path, "x·W + b (Conv1D)")
        self.take(path, path)
        self.emit(out, path, "conv1d", [self.src(out, path, x)], f" {w.shape[1]}", name=path,
                  param=path + ".weight")

    def block_gpt2_attention(self, nodes, raw, path):
        mod = self.module.get_submodule(raw)
        if getattr(mod, "is_cross_attention", False):
            raise UnsupportedOp(f"{path}: cross-attention is not supported")
        ins, params, consts, out = self.block_io(nodes, path)
        if params:
            raise UnsupportedOp(f"{path}: the attention reads parameters "
                                f"{[self.own_name(p) for p in params]} besides c_attn and c_proj")
        x = self.one_input(ins, path, "the attention (c_attn's output)")
        h = mod.num_heads
        errors = []
        for causal in (True, False):
            try:
                self.check_block(nodes, x, out, lambda z, c=causal: mha_reference(z, h, c), path,
                                 f"softmax attention with {h} heads, causal={'true' if causal else 'false'}")
            except UnsupportedOp as e:
                errors.append(str(e))
                continue
            self.emit(out, path, "mha", [self.src(out, path, x)],
                      f" heads={h} causal={'true' if causal else 'false'}")
            return
        raise UnsupportedOp(errors[0] + " (nor without the causal mask: an attention mask, "
                            "a scale other than 1/sqrt(head dim), or dropout?)")

    def block_gelu_tanh(self, nodes, raw, path):
        ins, params, consts, out = self.block_io(nodes, path)
        x = self.one_input(ins, path, "NewGELUActivation")
        if params:
            raise UnsupportedOp(f"{path}: the activation reads parameters")
        self.check_block(nodes, x, out, lambda z: F.gelu(z, approximate="tanh"), path,
                         "GELU's tanh form")
        self.emit(out, path, "gelu_tanh", [self.src(out, path, x)])

    # ---- single ops on sequences
    def seq_call(self, node, where):
        """Ops of sequence models; False when `node` is none of them."""
        t, a = node.target, node.args
        if t in _IGNORED:
            self.value[node] = None
            return True
        if t in _TO:
            v = self.value.get(a[0])
            dt_in = getattr(a[0].meta.get("val"), "dtype", None)
            dt = getattr(node.meta.get("val"), "dtype", None)
            if isinstance(v, str) or isinstance(v, MARKERS):
                if dt_in != dt:
                    raise UnsupportedOp(f"{where}: a cast from {dt_in} to {dt} is not supported")
                self.value[node] = v
                return True
            return False
        if t == aten.layer_norm.default:
            return self.layer_norm(node, where)
        if t == aten.embedding.default:
            return self.embedding(node, where)
        if t == aten.select.int:
            shape_in = _shape(a[0])
            dim, i = a[1], a[2]
            if shape_in is None or len(shape_in) != 3 or dim % 3 != 1:
                raise UnsupportedOp(f"{where}: aten.select along dim {dim} of {shape_in} is not supported "
                                    "(only a token of a sequence [N, T, D])")
            i = i + shape_in[1] if i < 0 else i
            self.emit(node, where, "select", [self.src(node, where, a[0])], f" index={i}")
            return True
        if t == aten.expand.default and isinstance(a[0], torch.fx.Node) and a[0].name in self.params:
            name = self.canon_name(a[0])
            self.value[node] = _ParamRef(name, _shape(a[0]))
            return True
        return False

    def layer_norm(self, node, where):
        a = node.args
        x, shape = a[0], list(a[1])
        w = a[2] if len(a) > 2 else node.kwargs.get("weight")
        b = a[3] if len(a) > 3 else node.kwargs.get("bias")
        eps = a[4] if len(a) > 4 else node.kwargs.get("eps", 1e-5)
        shape_in = _shape(x)
        dims = 4 if self.value.get(x) in self.channels_last else 3
        if shape_in is None or len(shape) != 1 or shape[0] != shape_in[-1] or len(shape_in) != dims:
            raise UnsupportedOp(f"{where}: layer_norm over {shape} of {shape_in} is not supported "
                                "(only over the last dimension of a sequence [N, T, D] or of "
                                "channels-last [N, H, W, C] between permutes)")
        if w is None or b is None:
            raise UnsupportedOp(f"{where}: layer_norm without its weight and bias is not supported")
        name = self.layer_name(where, node, "layer norm", [("weight", w), ("bias", b)])
        args = "" if abs(eps - 1e-5) <= 1e-12 else f" eps={float(eps)!r}"
        self.emit(node, where, "layernorm", [self.src(node, where, x)], args, name=name,
                  param=name + ".weight")
        return True

    def embedding(self, node, where):
        a = node.args
        w, idx = a[0], a[1]
        if any(x not in (None, -1, False) for x in a[2:]):
            raise UnsupportedOp(f"{where}: aten.embedding with padding_idx, max_norm or sparse "
                                "is not supported")
        if not (isinstance(w, torch.fx.Node) and w.name in self.params):
            raise UnsupportedOp(f"{where}: an embedding whose table is not a parameter")
        rows, d = _shape(w)
        name = self.canon_name(w)
        if not name.endswith(".weight"):
            raise UnsupportedOp(f"{where}: embedding table `{name}` is not <module>.weight")
        layer = name[: -len(".weight")]
        if self.value.get(idx) == "input":
            self.take(where, layer)
            self.emit(node, where, "embedding", ["input"], f" {rows} {d}", name=layer, param=name)
            return True
        if self.value.get(idx) is self.CONSTANT:
            ids = self.const_eval(idx)
            t = ids.shape[-1]
            want = torch.arange(t).expand_as(ids)
            if ids.dim() == 2 and torch.equal(ids.long(), want):
                self.value[node] = _PosEmb(layer, rows, _shape(node))
                return True
            raise UnsupportedOp(f"{where}: an embedding at constant indices other than arange(T)")
        raise UnsupportedOp(f"{where}: an embedding of other than the model's token ids")

    def seq_add(self, node, where):
        """add of a sequence and a position embedding / raw parameter."""
        a, b = node.args[0], node.args[1]
        for x, p in ((a, b), (b, a)):
            vx = self.value.get(x) if isinstance(x, torch.fx.Node) else None
            if not isinstance(vx, str) or not isinstance(p, torch.fx.Node):
                continue
            vp = self.value.get(p)
            sx = _shape(x)
            if isinstance(vp, _PosEmb):
                if vp.shape[1:] != sx[1:]:
                    raise UnsupportedOp(f"{where}: position embedding {vp.shape} added to {sx}")
                self.take(where, vp.name)
                self.emit(node, where, "pos_embedding", [vx], f" {vp.rows}", name=vp.name,
                          param=vp.name + ".weight")
                return True
            if p.op == "placeholder" and p.name in self.params:
                sp = _shape(p)
                if sx is None or len(sx) != 3 or sp != (1,) + tuple(sx[1:]):
                    raise UnsupportedOp(f"{where}: adding parameter {self.canon_name(p)} of shape {sp} "
                                        f"to {sx} (only [1, T, D] to a sequence [N, T, D])")
                name = self.canon_name(p)
                self.emit(node, where, "add_param", [vx], f" {name}", param=name)
                return True
        return False

    def seq_cat(self, node, where):
        """cat along the tokens of a class token and a sequence."""
        xs, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        if shape is None or len(shape) != 3 or dim % 3 != 1 or len(xs) != 2:
            return False
        v0, v1 = self.value.get(xs[0]), self.value.get(xs[1])
        if isinstance(v0, _ParamRef) and isinstance(v1, str) and v0.shape[:2] == (1, 1):
            self.emit(node, where, "cls_token", [v1], f" {v0.name}", param=v0.name)
            return True
        raise UnsupportedOp(f"{where}: aten.cat along the tokens of other than a class token "
                            "[1, 1, D] and a sequence is not supported")

    def seq_reshape(self, node, where):
        """An image [N, C, H, W] to [N, C, H·W] (ViT's patches): half of
        `tokens`."""
        x = node.args[0]
        shape_in, shape = _shape(x), _shape(node)
        if shape_in is None or shape is None or len(shape_in) != 4:
            return False
        if node.target == aten.flatten.using_ints:
            if list(node.args[1:3]) not in ([2], [2, -1], [2, 3]):
                return False
        elif tuple(shape) != (shape_in[0], shape_in[1], shape_in[2] * shape_in[3]):
            return False
        self.value[node] = _Tokens(self.src(node, where, x))
        return True

    def seq_transpose(self, node, where):
        v = self.value.get(node.args[0])
        if not isinstance(v, _Tokens):
            return False
        if node.target == aten.transpose.int:
            ok = sorted(d % 3 for d in node.args[1:3]) == [1, 2]
        else:
            ok = [d % 3 for d in node.args[1]] == [0, 2, 1]
        if not ok:
            return False
        self.emit(node, where, "tokens", [v.src])
        return True

    # ---- channels-last images (torchvision's ConvNeXt)
    def channels_last_permute(self, node, where):
        """permute(0, 2, 3, 1) of an image [N, C, H, W] (`tokens`: a
        sequence [H·W, C] here) or permute(0, 3, 1, 2) of such a
        channels-last value back (`untokens h=H w=W`)."""
        if node.target != aten.permute.default:
            return False
        x = node.args[0]
        v = self.value.get(x)
        dims = [d % 4 for d in node.args[1]]
        shape = _shape(node)
        if not isinstance(v, str) or shape is None or len(shape) != 4:
            return False
        if dims == [0, 2, 3, 1] and v not in self.channels_last and v != "input":
            self.emit(node, where, "tokens", [v])
            return True
        if dims == [0, 3, 1, 2] and v in self.channels_last:
            self.emit(node, where, "untokens", [v], f" h={shape[2]} w={shape[3]}")
            return True
        return False

    def layer_scale(self, node, where):
        """A parameter P [C, 1, 1] times an image [N, C, H, W] (ConvNeXt's
        layer scale): `mul_param(X) P`."""
        a, b = node.args[0], node.args[1]
        for p, x in ((a, b), (b, a)):
            if p.op != "placeholder" or p.name not in self.params:
                continue
            sp, sx = _shape(p), _shape(x)
            vx = self.value.get(x)
            if (sx is None or len(sx) != 4 or sp != (sx[1], 1, 1) or not isinstance(vx, str)
                    or vx in self.channels_last):
                raise UnsupportedOp(f"{where}: aten.mul of parameter {self.canon_name(p)} of shape "
                                    f"{sp} and {sx} is not supported (only a layer scale [C, 1, 1] "
                                    "times an image [N, C, H, W])")
            name = self.canon_name(p)
            self.emit(node, where, "mul_param", [vx], f" {name}", param=name)
            return True
        return False

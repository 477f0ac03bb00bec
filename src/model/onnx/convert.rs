//! The ONNX graph lowered to hesscope's IR: values, constants, parameters
//! and the checks every node gets (shapes, attributes, which of its
//! outputs are read). The operators themselves are in `ops.rs`.

use super::proto::{AttributeProto, GraphProto, NodeProto, TensorProto};
use super::random::{random_incomplete, RandPart};
use super::tensor::{self, attr_f64, Tensor};
use crate::model::graph::{BufferSpec, Init, Node, Op, ParamSpec, Shape};
use crate::model::params::Weights;
use crate::model::{Model, MAX_ELEMENTS};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;

/// Errors while lowering: the message alone (the caller names the file).
pub type R<T> = std::result::Result<T, String>;

/// Where a constant came from: the initializer it is (for parameter
/// names), and whether a `Transpose` node turned it around.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub init: Option<String>,
    pub transposed: bool,
}

/// A piece of GELU's erf form, 0.5·x·(1 + erf(x/√2)), as the exporters
/// without a `Gelu` op write it (the legacy exporter: Div, Erf, Add, Mul,
/// Mul; the dynamo one multiplies by 0.5 first). Each piece is an exact
/// function of x; only the whole is a value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GeluPart {
    /// x/√2.
    Scaled,
    /// erf(x/√2).
    Erf,
    /// c·(1 + erf(x/√2)).
    OnePlusErf(f64),
    /// c·x·(1 + erf(x/√2)).
    XTimes(f64),
}

#[derive(Clone, Debug)]
pub enum Val {
    /// A value of the IR, by id (0 is the input).
    Value(usize),
    Const(Rc<Tensor>, Origin),
    /// A piece of GELU's erf form of the value with this id.
    Gelu(usize, GeluPart),
    /// A piece of ShuffleNet's channel shuffle of the value with this id:
    /// reshaped to [N, groups, C/groups, H, W], then (`transposed`) with
    /// axes 1 and 2 swapped. Only the reshape back to [N, C, H, W] is a value.
    Shuffle {
        v: usize,
        groups: usize,
        transposed: bool,
    },
    /// A piece of stochastic depth's random mask (`random.rs`).
    Random(RandPart),
}

pub struct Builder<'a> {
    pub graph: &'a GraphProto,
    /// The model's folder (external data).
    pub dir: &'a Path,
    pub inits: HashMap<&'a str, &'a TensorProto>,
    pub vals: HashMap<String, Val>,
    /// Outputs no node may read, with why (BN's running statistics,
    /// Dropout's mask, MaxPool's indices).
    pub unread: HashMap<String, String>,
    pub nodes: Vec<Node>,
    /// Per value id: (shape, flat). Flat values are `[N, C]` in ONNX.
    pub shapes: Vec<(Shape, bool)>,
    pub params: Vec<ParamSpec>,
    pub buffers: Vec<BufferSpec>,
    pub theta: Vec<f64>,
    pub buffer_data: Vec<Vec<f64>>,
    /// Initializers taken as parameters, with the node that took them.
    pub taken: HashMap<String, String>,
    /// For each node index, the nodes (indices) that read its outputs.
    pub consumers: HashMap<String, Vec<usize>>,
    /// Add nodes taken as a MatMul's bias: their output is that Linear's.
    pub absorbed: HashMap<usize, usize>,
    pub live: Vec<bool>,
    /// The batch size the input declares, when it is a number.
    pub batch: Option<usize>,
}

/// A node's name in errors: its ONNX name, or its index and op.
pub fn label(idx: usize, n: &NodeProto) -> String {
    if n.name.is_empty() {
        format!("node {idx} ({})", n.op_type)
    } else {
        n.name.clone()
    }
}

/// A PyTorch module path: `.`-separated, non-empty parts of ASCII letters,
/// digits, `_` and `-` (RegNet's `block1-0`).
pub fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// The PyTorch module a node belongs to, from the scope the legacy
/// exporter writes into node names (`/layer1/layer1.0/relu/Relu` →
/// `layer1.0.relu`); a name without scopes is kept when it is a module
/// path (`node_relu_1`); else empty.
pub fn module_of(node_name: &str) -> String {
    if let Some(rest) = node_name.strip_prefix('/') {
        let parts: Vec<&str> = rest.split('/').collect();
        let mut q = String::new();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if q.is_empty() || !p.starts_with(&format!("{q}.")) {
                if !q.is_empty() {
                    q.push('.');
                }
                q.push_str(p);
            } else {
                q = p.to_string();
            }
        }
        return if is_module_name(&q) { q } else { String::new() };
    }
    if is_module_name(node_name) {
        node_name.to_string()
    } else {
        String::new()
    }
}

/// A node's attributes, with the ones its op may have.
pub struct Attrs<'a> {
    pub n: &'a NodeProto,
}

impl<'a> Attrs<'a> {
    /// Refuses any attribute outside `allowed` (an attribute hesscope does
    /// not know could change what the op computes).
    pub fn only(n: &'a NodeProto, allowed: &[&str]) -> R<Attrs<'a>> {
        if let Some(a) = n
            .attribute
            .iter()
            .find(|a| !allowed.contains(&a.name.as_str()))
        {
            return Err(format!(
                "attribute `{}` of {} is not supported{}",
                a.name,
                n.op_type,
                if allowed.is_empty() {
                    String::new()
                } else {
                    format!(" (known: {})", allowed.join(", "))
                }
            ));
        }
        if let Some(a) = n.attribute.iter().find(|a| !a.ref_attr_name.is_empty()) {
            return Err(format!(
                "attribute `{}` refers to a function's attribute",
                a.name
            ));
        }
        Ok(Attrs { n })
    }
    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.n.attribute.iter().find(|a| a.name == name)
    }
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map(|a| a.i).unwrap_or(default)
    }
    pub fn float(&self, name: &str, default: f64) -> f64 {
        self.get(name).map(|a| attr_f64(a.f)).unwrap_or(default)
    }
    pub fn ints(&self, name: &str) -> Option<&'a [i64]> {
        self.get(name).map(|a| a.ints.as_slice())
    }
    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_else(|| default.to_string())
    }
    pub fn tensor(&self, name: &str) -> Option<&'a TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}

/// `a·b·…` as a checked element count.
pub fn elements(what: &str, parts: &[usize]) -> R<usize> {
    parts
        .iter()
        .try_fold(1usize, |acc, &p| acc.checked_mul(p))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            format!("{what} would have {parts:?} elements, above the limit of {MAX_ELEMENTS}")
        })
}

impl<'a> Builder<'a> {
    pub fn new(graph: &'a GraphProto, dir: &'a Path) -> Builder<'a> {
        Builder {
            graph,
            dir,
            inits: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            vals: HashMap::new(),
            unread: HashMap::new(),
            nodes: vec![],
            shapes: vec![],
            params: vec![],
            buffers: vec![],
            theta: vec![],
            buffer_data: vec![],
            taken: HashMap::new(),
            consumers: HashMap::new(),
            absorbed: HashMap::new(),
            live: vec![],
            batch: None,
        }
    }

    /// Input `i` of node `n` by name, which must be there and known.
    pub fn val(&mut self, n: &NodeProto, i: usize) -> R<Val> {
        let name = n
            .input
            .get(i)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{} needs input {} and has none", n.op_type, i + 1))?;
        self.named(name)
    }

    /// The value called `name`: one a node made, or an initializer.
    pub fn named(&mut self, name: &str) -> R<Val> {
        if let Some(v) = self.vals.get(name) {
            return Ok(v.clone());
        }
        if let Some(why) = self.unread.get(name) {
            return Err(format!(
                "reads `{name}`, {why}, which hesscope does not compute"
            ));
        }
        if let Some(t) = self.inits.get(name) {
            let t =
                tensor::decode(t, self.dir).map_err(|e| format!("initializer `{name}`: {e}"))?;
            let v = Val::Const(
                Rc::new(t),
                Origin {
                    init: Some(name.to_string()),
                    transposed: false,
                },
            );
            self.vals.insert(name.to_string(), v.clone());
            return Ok(v);
        }
        Err(format!(
            "reads `{name}`, which no node before it makes and no initializer holds (the \
             graph is not in topological order, or the value is missing)"
        ))
    }

    /// Whether node `n` has input `i` (optional inputs may be "").
    pub fn has_input(n: &NodeProto, i: usize) -> bool {
        n.input.get(i).is_some_and(|s| !s.is_empty())
    }

    /// Input `i` as a value of the IR: (id, shape, flat).
    pub fn value(&mut self, n: &NodeProto, i: usize) -> R<(usize, Shape, bool)> {
        match self.val(n, i)? {
            Val::Value(v) => Ok((v, self.shapes[v].0, self.shapes[v].1)),
            Val::Const(t, _) => Err(format!(
                "input {} (`{}`) is a constant; hesscope reads {} of a constant only as its \
                 parameter",
                i + 1,
                t.name,
                n.op_type
            )),
            Val::Gelu(..) => Err(gelu_incomplete(&n.input[i])),
            Val::Shuffle { .. } => Err(shuffle_incomplete(&n.input[i])),
            Val::Random(_) => Err(random_incomplete(&n.input[i])),
        }
    }

    /// Input `i` as an image [C, H, W].
    pub fn image(&mut self, n: &NodeProto, i: usize) -> R<(usize, Shape)> {
        let (v, s, flat) = self.value(n, i)?;
        if flat {
            return Err(format!(
                "{} needs an image [N, C, H, W], but its input is [N, {}]",
                n.op_type, s.c
            ));
        }
        Ok((v, s))
    }

    /// Input `i` as a constant.
    pub fn konst(&mut self, n: &NodeProto, i: usize) -> R<(Rc<Tensor>, Origin)> {
        match self.val(n, i)? {
            Val::Const(t, o) => Ok((t, o)),
            _ => Err(format!(
                "input {} (`{}`) of {} must be a constant (an initializer)",
                i + 1,
                n.input[i],
                n.op_type
            )),
        }
    }

    /// Output `j` of node `n` is `v`.
    pub fn set(&mut self, n: &NodeProto, j: usize, v: Val) {
        if let Some(name) = n.output.get(j).filter(|s| !s.is_empty()) {
            self.vals.insert(name.clone(), v);
        }
    }

    /// Outputs from `from` on are not computed: any read of them is refused.
    pub fn unread_from(&mut self, n: &NodeProto, from: usize, why: &[&str]) {
        for (j, name) in n.output.iter().enumerate().skip(from) {
            if !name.is_empty() {
                let w = why.get(j - from).copied().unwrap_or("an extra output");
                self.unread.insert(
                    name.clone(),
                    format!("{w} (output {} of {})", j + 1, n.op_type),
                );
            }
        }
    }

    /// Appends a node reading `inputs`; returns its value id.
    pub fn push(
        &mut self,
        name: String,
        op: Op,
        inputs: Vec<usize>,
        out: Shape,
        flat: bool,
    ) -> R<usize> {
        elements("the output", &[out.c, out.h, out.w])?;
        let in_shape = self.shapes[inputs[0]].0;
        self.nodes.push(Node {
            name,
            op,
            inputs,
            in_shape,
            out_shape: out,
        });
        self.shapes.push((out, flat));
        Ok(self.nodes.len())
    }

    /// A trainable tensor `name` of PyTorch shape `shape` holding `data`.
    pub fn add_param(
        &mut self,
        name: String,
        shape: Vec<usize>,
        init: Init,
        data: Vec<f64>,
    ) -> R<usize> {
        if self.params.iter().any(|p| p.name == name) {
            return Err(format!("a second parameter named `{name}`"));
        }
        let numel = elements(&format!("parameter `{name}`"), &shape)?;
        debug_assert_eq!(numel, data.len());
        finite(&name, &data)?;
        let offset = self.theta.len();
        if offset + numel > MAX_ELEMENTS {
            return Err(format!(
                "`{name}` brings the model to {} parameters, above the limit of {MAX_ELEMENTS}",
                offset + numel
            ));
        }
        self.theta.extend(data);
        self.params.push(ParamSpec {
            name,
            shape,
            offset,
            init,
        });
        Ok(self.params.len() - 1)
    }

    pub fn add_buffer(&mut self, name: String, data: Vec<f64>, init: f64) -> R<usize> {
        if self.buffers.iter().any(|b| b.name == name) {
            return Err(format!("a second buffer named `{name}`"));
        }
        finite(&name, &data)?;
        self.buffers.push(BufferSpec {
            name,
            len: data.len(),
            init,
        });
        self.buffer_data.push(data);
        Ok(self.buffers.len() - 1)
    }

    /// The state_dict name of a constant taken as parameter `suffix` of
    /// `module`: the initializer's own name when it is one PyTorch could
    /// have written (`layer1.0.conv1.weight`), else `module.suffix`. A
    /// PyTorch-named initializer serves one parameter only (tied weights
    /// are refused); an exporter's own constant (`onnx::Conv_194`) read by
    /// several layers is one value the exporter stored once (constant
    /// folding merges equal tensors), so each layer gets its own copy.
    pub fn param_name(&mut self, who: &str, o: &Origin, module: &str, suffix: &str) -> R<String> {
        if let Some(init) = &o.init {
            let torch_name = is_module_name(init) && init.contains('.');
            match self.taken.get(init) {
                Some(other) if torch_name => {
                    return Err(format!(
                        "initializer `{init}` is also a parameter of `{other}`: the graph \
                         reads one tensor in two layers (tied parameters, e.g. `b.weight = \
                         a.weight`; an exporter that merges equal tensors hands each layer \
                         its own name through an Identity node instead), and hesscope does \
                         not read tied parameters from ONNX"
                    ))
                }
                Some(_) => {}
                None => {
                    self.taken.insert(init.clone(), who.to_string());
                }
            }
            if torch_name {
                return Ok(init.clone());
            }
        }
        if module.is_empty() {
            return Err(format!(
                "its {suffix} has no PyTorch name (initializer `{}`) and the node's name gives \
                 no module to name it after",
                o.init.as_deref().unwrap_or("a constant")
            ));
        }
        Ok(format!("{module}.{suffix}"))
    }

    /// The module a parameter node is named after: that of its first
    /// parameter's PyTorch name.
    pub fn module_for(name: &str) -> String {
        name.rsplit_once('.')
            .map(|(m, _)| m.to_string())
            .unwrap_or_default()
    }

    /// The IR model and its weights, once every node is read: the graph's
    /// one output must be the last value, flat logits of 2 classes or more.
    pub fn finish(self, name: String, input: Shape, output: &str) -> R<(Model, Weights)> {
        let v = match self.vals.get(output) {
            Some(Val::Value(v)) => *v,
            Some(Val::Const(..)) => return Err(format!("the output `{output}` is a constant")),
            Some(Val::Gelu(..)) => return Err(gelu_incomplete(output)),
            Some(Val::Shuffle { .. }) => return Err(shuffle_incomplete(output)),
            Some(Val::Random(_)) => return Err(random_incomplete(output)),
            None => return Err(format!("no node makes the output `{output}`")),
        };
        if v == 0 {
            return Err(format!("the output `{output}` is the input"));
        }
        if v != self.nodes.len() {
            return Err(format!(
                "the output `{output}` is not the last value of the graph"
            ));
        }
        let (s, flat) = self.shapes[v];
        if !flat {
            return Err(format!(
                "the output `{output}` is an image [N, {}, {}, {}]; hesscope takes the loss \
                 on flat logits [N, classes]",
                s.c, s.h, s.w
            ));
        }
        if s.c < 2 {
            return Err(format!(
                "the output `{output}` has {} class; a classifier needs at least 2",
                s.c
            ));
        }
        if self.params.is_empty() {
            return Err(
                "the graph has no trainable parameters (no Conv, BatchNormalization, \
                        Gemm or MatMul): its Hessian would be empty"
                    .into(),
            );
        }
        let model = Model::new(name, input, s.c, self.nodes, self.params, self.buffers);
        Ok((
            model,
            Weights {
                theta: self.theta,
                buffers: self.buffer_data,
            },
        ))
    }
}

/// Refuses NaN and infinities in a tensor hesscope takes as a parameter.
pub fn finite(name: &str, data: &[f64]) -> R<()> {
    if let Some((i, x)) = data.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(format!(
            "initializer `{name}` holds {x} at element {i}; parameters must be finite"
        ));
    }
    Ok(())
}

pub fn gelu_incomplete(name: &str) -> String {
    format!(
        "`{name}` is part of GELU's erf form 0.5·x·(1 + erf(x/√2)) but is read as a value of \
         its own; hesscope reads that form only whole (or the Gelu op of opset 20)"
    )
}

pub fn shuffle_incomplete(name: &str) -> String {
    format!(
        "`{name}` is part of a channel shuffle (Reshape to [N, G, C/G, H, W], Transpose perm \
         [0, 2, 1, 3, 4], Reshape to [N, C, H, W]) but is read as a value of its own; hesscope \
         reads that pattern only whole"
    )
}

/// Reads the node set that the output depends on: `live[i]` for node i,
/// and who reads each value.
pub fn liveness(graph: &GraphProto, output: &str) -> (Vec<bool>, HashMap<String, Vec<usize>>) {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), i);
        }
    }
    let mut live = vec![false; graph.node.len()];
    let mut stack: Vec<&str> = vec![output];
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        if let Some(&i) = producer.get(v) {
            if !live[i] {
                live[i] = true;
                stack.extend(graph.node[i].input.iter().map(|s| s.as_str()));
            }
        }
    }
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        if live[i] {
            for inp in &n.input {
                consumers.entry(inp.clone()).or_default().push(i);
            }
        }
    }
    (live, consumers)
}

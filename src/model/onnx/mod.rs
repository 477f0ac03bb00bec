//! ONNX models: `--model file.onnx` read into hesscope's IR, with the
//! weights from the graph's initializers (or a `--weights` state_dict).
//!
//! Read: opset 13 and later, the standard domain only; the operators
//! Conv, BatchNormalization, Relu, LeakyRelu, Tanh, Sigmoid, Gelu (opset
//! 20, or the erf form 0.5·x·(1 + erf(x/√2)) older exporters write),
//! Clip(0, 6), HardSigmoid, HardSwish, MaxPool, AveragePool,
//! GlobalAveragePool, ReduceMean over H and W, Flatten, Reshape to
//! [N, C·H·W], Gemm, MatMul (+ Add of its bias), Add, Mul of values,
//! Concat, Slice and Split along channels, the channel shuffle (Reshape,
//! Transpose, Reshape), Identity, Dropout and torchvision's stochastic
//! depth (RandomUniformLike, Less, Cast, Div, Mul; the identity, as in
//! eval(); other random ops are refused),
//! Constant, Transpose of a constant, and shape arithmetic (Shape,
//! Gather, Unsqueeze, Cast, integer Add/Sub/Mul/Div) folded to constants. The graph has one input, an image batch [N, C, H, W],
//! and one output, the logits [N, classes]; the loss is cross-entropy on
//! them, as for `.arch` models. Parameter names are the initializers'
//! (PyTorch's state_dict names, when torch exported the graph unfolded).
//!
//! Initializers an eval-mode export merged (equal values, handed on by
//! Identity nodes under each parameter's name) are separate parameters;
//! tied ones (read directly by two layers) are refused.
//!
//! Protobuf is decoded by `prost` (`proto.rs` holds the messages).

mod arith;
mod channels;
mod convert;
mod dense;
mod ops;
pub mod proto;
mod random;
mod shape;
mod tensor;

use super::graph::Shape;
use super::{tensorio, Model, Weights};
use crate::error::{Error, Result};
use prost::Message;
use std::path::Path;

/// The largest ONNX file read: 2 GiB, protobuf's own limit (larger models
/// keep their weights in external data files, which are read as well).
pub const MAX_ONNX_BYTES: u64 = 2 << 30;

/// The oldest opset read.
pub const MIN_OPSET: i64 = 13;

/// How to export a model hesscope reads with its batch norms.
pub const EXPORT_HINT: &str = "torch.onnx.export(model, x, path, dynamo=False, \
     training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)";

/// Whether `--model` names an ONNX file (by its extension).
pub fn is_onnx(name_or_path: &str) -> bool {
    Path::new(name_or_path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// The model and the weights its initializers hold.
pub fn read(path: &Path) -> Result<(Model, Weights)> {
    let (m, name) = parse(path)?;
    lower_model(&m, path, name)
}

fn format_error(path: &Path, msg: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg,
    }
}

/// The decoded protobuf, checked for what hesscope reads (size, opset,
/// one graph), and the model's name (the file's stem).
fn parse(path: &Path) -> Result<(proto::ModelProto, String)> {
    let fail = |msg: String| format_error(path, msg);
    let meta = tensorio::regular_file(path)?;
    if meta.len() > MAX_ONNX_BYTES {
        return Err(fail(format!(
            "{} bytes; ONNX files are at most {MAX_ONNX_BYTES} bytes (protobuf's limit)",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let m = proto::ModelProto::decode(bytes.as_slice()).map_err(|e| {
        fail(format!(
            "not an ONNX model: the protobuf does not decode ({e}); is the file whole?"
        ))
    })?;
    let opset = m
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .ok_or_else(|| {
            fail("no opset of the standard ONNX domain is imported: not an ONNX model".into())
        })?;
    if opset < MIN_OPSET {
        return Err(fail(format!(
            "opset {opset}: hesscope reads opset {MIN_OPSET} and later (export with \
             opset_version={MIN_OPSET} or later)"
        )));
    }
    let g = m
        .graph
        .as_ref()
        .ok_or_else(|| fail("the model has no graph".into()))?;
    if !g.sparse_initializer.is_empty() {
        return Err(fail("sparse initializers are not supported".into()));
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() { "onnx".into() } else { name };
    Ok((m, name))
}

fn lower_model(m: &proto::ModelProto, path: &Path, name: String) -> Result<(Model, Weights)> {
    let g = m.graph.as_ref().expect("parse checks the graph");
    let dir = path.parent().unwrap_or(Path::new("."));
    lower(g, dir, name).map_err(|msg| format_error(path, msg))
}

/// The model, with the weights of `weights` (a state_dict, by names) when
/// given, else the initializers'. A state_dict with batch-norm tensors the
/// graph lacks is refused naming them: the graph's batch norms were
/// folded into its convolutions. That check comes first, on the graph as
/// it is (its initializers and BatchNormalization nodes), so that a folded
/// graph is refused for what it is even where lowering it would fail for
/// another reason.
pub fn load(path: &Path, weights: Option<&Path>) -> Result<(Model, Weights)> {
    let (m, name) = parse(path)?;
    if let Some(w) = weights {
        let g = m.graph.as_ref().expect("parse checks the graph");
        let inits: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name.as_str()).collect();
        let bn_modules: Vec<String> = g
            .node
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
            .map(|n| convert::module_of(&n.name))
            .collect();
        not_folded(&name, w, |module| {
            inits.contains(format!("{module}.running_mean").as_str())
                || inits.contains(format!("{module}.running_var").as_str())
                || bn_modules.iter().any(|b| b == module)
        })?;
    }
    let (model, init) = lower_model(&m, path, name)?;
    let Some(w) = weights else {
        return Ok((model, init));
    };
    check_not_folded(&model, w)?;
    let loaded = Weights::load(&model, w)?;
    Ok((model, loaded))
}

/// Refuses a state_dict that holds batch-norm modules the model lacks.
pub fn check_not_folded(model: &Model, weights: &Path) -> Result<()> {
    not_folded(&model.name, weights, |m| {
        model.buffers.iter().any(|b| {
            b.name
                .strip_prefix(m)
                .is_some_and(|rest| rest == ".running_mean" || rest == ".running_var")
        })
    })
}

/// Refuses a state_dict that holds batch-norm modules (by their running
/// statistics) for which `has_bn(module)` is false.
fn not_folded(model_name: &str, weights: &Path, has_bn: impl Fn(&str) -> bool) -> Result<()> {
    let file = tensorio::File::open(weights)?;
    let names: Vec<&String> = file.layout().keys().collect();
    let mut modules: Vec<&str> = vec![];
    for name in &names {
        for suffix in [".running_mean", ".running_var", ".num_batches_tracked"] {
            if let Some(m) = name.strip_suffix(suffix) {
                if !has_bn(m) && !modules.contains(&m) {
                    modules.push(m);
                }
            }
        }
    }
    if modules.is_empty() {
        return Ok(());
    }
    let lacking: Vec<&str> = names
        .iter()
        .filter(|n| {
            modules.iter().any(|m| {
                n.strip_prefix(m).is_some_and(|rest| {
                    matches!(
                        rest,
                        ".weight"
                            | ".bias"
                            | ".running_mean"
                            | ".running_var"
                            | ".num_batches_tracked"
                    )
                })
            })
        })
        .map(|n| n.as_str())
        .collect();
    let shown: Vec<&str> = lacking.iter().take(6).copied().collect();
    Err(Error::Tensor {
        file: file.label.clone(),
        name: lacking[0].to_string(),
        msg: format!(
            "a batch-norm tensor that {} does not have ({} such tensors of {} batch norms: {}{}). \
             Its batch norms were folded into the convolutions (torch.onnx.export does this in \
             eval mode with constant folding): a different parameterisation, which cannot be \
             told from a convolution with bias and onto which these tensors do not map. Export \
             unfolded: {EXPORT_HINT}",
            model_name,
            lacking.len(),
            modules.len(),
            shown.join(", "),
            if lacking.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ),
    })
}

/// The graph lowered: its one image input, its nodes (those the output
/// depends on), its one output.
fn lower(g: &proto::GraphProto, dir: &Path, name: String) -> convert::R<(Model, Weights)> {
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&proto::ValueInfoProto> = g
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect();
    let [inp] = inputs[..] else {
        return Err(format!(
            "the graph has {} inputs ({}); hesscope reads one, the image batch [N, C, H, W]",
            inputs.len(),
            inputs
                .iter()
                .map(|i| format!("`{}`", i.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let tt = inp
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| format!("input `{}` is not a tensor", inp.name))?;
    if !matches!(tt.elem_type, 1 | 11) {
        return Err(format!(
            "input `{}` has element type {}; hesscope reads float (1) or double (11) images",
            inp.name, tt.elem_type
        ));
    }
    let dims: Vec<Option<i64>> = tt
        .shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| d.dim_value).collect())
        .unwrap_or_default();
    let fixed = |d: &Option<i64>| d.filter(|&x| x > 0).map(|x| x as usize);
    let shape = match &dims[..] {
        [_, c, h, w] => match (fixed(c), fixed(h), fixed(w)) {
            (Some(c), Some(h), Some(w)) => {
                convert::elements("the input", &[c, h, w])?;
                Shape::new(c, h, w)
            }
            _ => {
                return Err(format!(
                    "input `{}` has dims {dims:?}: C, H and W must be fixed numbers (only the \
                     batch may be dynamic)",
                    inp.name
                ))
            }
        },
        _ => {
            return Err(format!(
                "input `{}` has {} dims; hesscope reads images [N, C, H, W]",
                inp.name,
                dims.len()
            ))
        }
    };
    let [out] = &g.output[..] else {
        return Err(format!(
            "the graph has {} outputs; hesscope reads one, the logits [N, classes]",
            g.output.len()
        ));
    };
    let mut b = convert::Builder::new(g, dir);
    let (live, consumers) = convert::liveness(g, &out.name);
    b.live = live;
    b.consumers = consumers;
    b.batch = fixed(&dims[0]);
    b.shapes.push((shape, false));
    b.vals.insert(inp.name.clone(), convert::Val::Value(0));
    for (i, n) in g.node.iter().enumerate() {
        if b.live[i] {
            b.node(i, n)
                .map_err(|e| format!("{}: {e}", convert::label(i, n)))?;
        }
    }
    b.finish(name, shape, &out.name)
}

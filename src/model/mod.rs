//! Models: architecture files, the lowered graph, parameters and their
//! PyTorch-named safetensors I/O.

pub mod arch;
pub mod graph;
pub mod onnx;
pub mod param_blocks;
pub mod params;
pub mod tensorio;

pub use graph::{Activation, BufferSpec, Init, Kind, Node, Op, ParamSpec, Shape};
pub use params::Weights;

use crate::error::{Error, Result};
use std::path::Path;

/// The most elements any tensor may have: a value per sample or a
/// parameter tensor declared by an architecture, a tensor read from a
/// safetensors file, and the model's whole parameter vector. 2^28 =
/// 268,435,456 elements, 1 GiB in f32 and 2 GiB in f64 (resnet18 has 11.7
/// million parameters and 0.8 million values per sample at most).
pub const MAX_ELEMENTS: usize = 1 << 28;

/// The largest architecture file read: 1 MiB.
pub const MAX_ARCH_BYTES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    pub input: Shape,
    pub classes: usize,
    pub nodes: Vec<Node>,
    /// Trainable tensors in PyTorch registration order.
    pub params: Vec<ParamSpec>,
    pub buffers: Vec<BufferSpec>,
    pub n_params: usize,
    /// Tied parameters: a second state_dict name for a parameter (index
    /// into `params`), e.g. `lm_head.weight` = `transformer.wte.weight`.
    pub tied: Vec<(String, usize)>,
}

/// The architecture files shipped in the binary, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("mlp-tiny", include_str!("../../models/mlp-tiny.arch")),
    ("cnn-tiny", include_str!("../../models/cnn-tiny.arch")),
    (
        "cnn-tiny-nobn",
        include_str!("../../models/cnn-tiny-nobn.arch"),
    ),
    ("resnet20", include_str!("../../models/resnet20.arch")),
    (
        "resnet20-nobn",
        include_str!("../../models/resnet20-nobn.arch"),
    ),
    ("resnet32", include_str!("../../models/resnet32.arch")),
    (
        "resnet32-nobn",
        include_str!("../../models/resnet32-nobn.arch"),
    ),
    ("vgg11-bn", include_str!("../../models/vgg11-bn.arch")),
    ("vgg11", include_str!("../../models/vgg11.arch")),
    ("resnet18", include_str!("../../models/resnet18.arch")),
    ("lenet5", include_str!("../../models/lenet5.arch")),
    ("cnn-smooth", include_str!("../../models/cnn-smooth.arch")),
];

impl Model {
    pub(crate) fn new(
        name: String,
        input: Shape,
        classes: usize,
        nodes: Vec<Node>,
        params: Vec<ParamSpec>,
        buffers: Vec<BufferSpec>,
    ) -> Model {
        let n_params = params.iter().map(|p| p.numel()).sum();
        Model {
            name,
            input,
            classes,
            nodes,
            params,
            buffers,
            n_params,
            tied: vec![],
        }
    }

    /// Whether the loss is next-token cross-entropy: token ids in, logits
    /// [T, classes] out (a language model trained on its own input).
    pub fn next_token(&self) -> bool {
        let out = self.nodes.last().map(|n| n.out_shape);
        self.input.kind == Kind::Ids
            && out.is_some_and(|s| s.is_seq() && s.features() == self.classes)
    }

    /// The vocabulary of a model reading token ids: the rows of the first
    /// embedding that reads the input.
    pub fn vocab(&self) -> Option<usize> {
        self.nodes.iter().find_map(|n| match n.op {
            Op::Embedding { vocab, .. } if n.inputs == [0] => Some(vocab),
            _ => None,
        })
    }

    /// A built-in model by name, an ONNX file (`.onnx`, see [`onnx`]), or
    /// an architecture file by path (a regular file of at most
    /// [`MAX_ARCH_BYTES`]; a FIFO or device is refused before it is
    /// opened, so nothing blocks).
    pub fn load(name_or_path: &str) -> Result<Model> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return arch::parse(&format!("models/{name}.arch"), text);
        }
        if onnx::is_onnx(name_or_path) {
            return onnx::read(Path::new(name_or_path)).map(|(model, _)| model);
        }
        let path = Path::new(name_or_path);
        if let Ok(meta) = std::fs::metadata(path) {
            let label = path.display().to_string();
            let refuse = |msg: String| Error::Architecture {
                file: label.clone(),
                line: 0,
                msg,
            };
            if !meta.is_file() {
                return Err(refuse(format!(
                    "not a regular file ({}); an architecture is a text file",
                    tensorio::file_kind(&meta)
                )));
            }
            if meta.len() > MAX_ARCH_BYTES as u64 {
                return Err(refuse(format!(
                    "{} bytes; architecture files are at most {MAX_ARCH_BYTES} bytes",
                    meta.len()
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                refuse(format!(
                    "not UTF-8 text (byte {})",
                    e.utf8_error().valid_up_to()
                ))
            })?;
            return arch::parse(&label, &text);
        }
        // A path (an .arch name or one with a folder) that is not there:
        // the file is missing, not the model unknown.
        if name_or_path.ends_with(".arch") || name_or_path.contains(std::path::MAIN_SEPARATOR) {
            if let Err(e) = std::fs::metadata(path) {
                return Err(Error::io(path, e));
            }
        }
        let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        Err(Error::UnknownModel(
            name_or_path.to_string(),
            known.join(", "),
        ))
    }

    /// The per-sample shape of value `v` (0: the input; `i + 1`: node
    /// `i`'s output).
    pub fn value_shape(&self, v: usize) -> Shape {
        if v == 0 {
            self.input
        } else {
            self.nodes[v - 1].out_shape
        }
    }

    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Whether any layer is batch norm (the `--bn` mode matters only then).
    pub fn has_bn(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| matches!(n.op, Op::BatchNorm { .. }))
    }

    /// Modules (name prefix before the last '.') in parameter order, each
    /// with the contiguous range of the flat parameter vector it owns.
    pub fn modules(&self) -> Vec<(String, std::ops::Range<usize>)> {
        let mut out: Vec<(String, std::ops::Range<usize>)> = Vec::new();
        for p in &self.params {
            let m = p.module().to_string();
            let r = p.offset..p.offset + p.numel();
            match out.last_mut() {
                Some((last, range)) if *last == m && range.end == r.start => range.end = r.end,
                _ => out.push((m, r)),
            }
        }
        out
    }

    /// The first name part of every trainable tensor, in order, once each
    /// (`conv1`, `bn1`, `layer1`, ..., `fc`).
    pub fn top_level_modules(&self) -> Vec<&str> {
        let mut out: Vec<&str> = vec![];
        for p in &self.params {
            let top = p.name.split('.').next().unwrap_or("");
            if !out.contains(&top) {
                out.push(top);
            }
        }
        out
    }

    /// The parameter range of every tensor whose name starts with `prefix`
    /// (a module or group such as `layer1`), which must be contiguous.
    pub fn prefix_range(&self, prefix: &str) -> Result<std::ops::Range<usize>> {
        let matches = |n: &str| n == prefix || n.starts_with(&format!("{prefix}."));
        let hits: Vec<&ParamSpec> = self.params.iter().filter(|p| matches(&p.name)).collect();
        let (Some(first), Some(last)) = (hits.first(), hits.last()) else {
            return Err(Error::Invalid {
                what: "layer",
                msg: format!(
                    "no trainable tensor of {} starts with `{prefix}` (top-level modules: {})",
                    self.name,
                    self.top_level_modules().join(", ")
                ),
            });
        };
        let range = first.offset..last.offset + last.numel();
        let covered: usize = hits.iter().map(|p| p.numel()).sum();
        if covered != range.len() {
            return Err(Error::Invalid {
                what: "layer",
                msg: format!("the tensors under `{prefix}` are not contiguous in parameter order"),
            });
        }
        Ok(range)
    }
}

//! Models: architecture files, the lowered graph, parameters and their
//! PyTorch-named safetensors I/O.

pub mod arch;
pub mod graph;
pub mod params;
pub mod tensorio;

pub use graph::{BufferSpec, Init, Node, Op, ParamSpec, Shape};
pub use params::Weights;

use crate::error::{Error, Result};
use std::path::Path;

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
        }
    }

    /// A built-in model by name, or an architecture file by path.
    pub fn load(name_or_path: &str) -> Result<Model> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return arch::parse(&format!("models/{name}.arch"), text);
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            return arch::parse(&path.display().to_string(), &text);
        }
        let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        Err(Error::UnknownModel(
            name_or_path.to_string(),
            known.join(", "),
        ))
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

    /// The parameter range of every tensor whose name starts with `prefix`
    /// (a module or group such as `layer1`), which must be contiguous.
    pub fn prefix_range(&self, prefix: &str) -> Result<std::ops::Range<usize>> {
        let matches = |n: &str| n == prefix || n.starts_with(&format!("{prefix}."));
        let hits: Vec<&ParamSpec> = self.params.iter().filter(|p| matches(&p.name)).collect();
        let first = hits.first().ok_or_else(|| Error::Argument {
            flag: "--layer".into(),
            msg: format!(
                "no trainable tensor of {} starts with `{prefix}`",
                self.name
            ),
        })?;
        let last = hits.last().unwrap();
        let range = first.offset..last.offset + last.numel();
        let covered: usize = hits.iter().map(|p| p.numel()).sum();
        if covered != range.len() {
            return Err(Error::Argument {
                flag: "--layer".into(),
                msg: format!("the tensors under `{prefix}` are not contiguous in parameter order"),
            });
        }
        Ok(range)
    }
}

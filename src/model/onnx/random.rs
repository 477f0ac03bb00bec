//! Random ops: torchvision's stochastic depth, read as the identity (as
//! in `eval()`, and as hesscope's exporter writes it). A training-mode
//! export (`training=torch.onnx.TrainingMode.TRAINING`) writes
//! `torchvision.ops.stochastic_depth(x, p, "row")` as
//!
//! ```text
//! u = RandomUniformLike(zeros [N, 1, 1, 1]) low=0 high=1
//! keep = Cast(Less(u, 1 - p)) to float
//! y = Mul(x, Div(keep, 1 - p))
//! ```
//!
//! (`mode="batch"` draws one number, zeros [1, 1, 1, 1]; with a dynamic
//! batch the zeros are `ConstantOfShape` of the shape [N, 1, 1, 1], which
//! hesscope reads only there). That chain is
//! recognised exactly, link by link: each piece is a [`RandPart`] that no
//! other op may read, and only the last Mul is a value, x itself. Any
//! other op that draws random numbers (RandomNormal, Bernoulli, ...) is
//! refused by name. Dropout nodes are read as the identity in `ops.rs`.

use super::convert::{Attrs, Builder, Val, R};
use super::proto::NodeProto;

/// ONNX ops that draw random numbers, refused outside stochastic depth.
pub const RANDOM_OPS: &[&str] = &[
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Bernoulli",
    "Multinomial",
];

/// A piece of stochastic depth's mask; `dims`: the noise's shape (−1:
/// the batch, where the input's is dynamic).
#[derive(Clone, Debug, PartialEq)]
pub enum RandPart {
    /// ConstantOfShape of a shape: the template whose shape the noise
    /// takes (a graph with a dynamic batch builds [N, 1, 1, 1] so).
    Template { dims: Vec<i64> },
    /// u ~ U(0, 1).
    Uniform { dims: Vec<i64> },
    /// u < keep, as booleans.
    Less { dims: Vec<i64>, keep: f64 },
    /// u < keep, as numbers 0 and 1.
    Mask { dims: Vec<i64>, keep: f64 },
    /// (u < keep) / keep: what multiplies x.
    Scaled { dims: Vec<i64> },
}

/// The pattern, for errors.
const PATTERN: &str = "stochastic depth (RandomUniformLike low=0 high=1 of zeros [N, 1, 1, 1] \
     or [1, 1, 1, 1], Less than the survival rate s, Cast to float, Div by s, Mul of the \
     value), which hesscope reads only whole, as the identity of eval()";

pub fn random_incomplete(name: &str) -> String {
    format!("`{name}` is part of {PATTERN}, but is read as a value of its own")
}

fn scalar_const(v: &Val) -> Option<f64> {
    match v {
        Val::Const(t, _) if t.numel() == 1 && !t.int => Some(t.data[0]),
        _ => None,
    }
}

impl Builder<'_> {
    /// Whether node `n` draws random numbers or reads a piece of
    /// stochastic depth.
    pub(super) fn is_random(&self, n: &NodeProto) -> bool {
        RANDOM_OPS.contains(&n.op_type.as_str())
            || n.op_type == "ConstantOfShape"
            || n.input
                .iter()
                .any(|i| matches!(self.vals.get(i), Some(Val::Random(_))))
    }

    /// Reads a node of stochastic depth (see the module's docs).
    pub(super) fn random(&mut self, n: &NodeProto) -> R<()> {
        let op = n.op_type.as_str();
        let wrong = |what: &str| {
            format!("{op} {what}; hesscope reads random numbers only within {PATTERN}")
        };
        let out = match op {
            "RandomUniformLike" => {
                let a = Attrs::only(n, &["dtype", "high", "low", "seed"])?;
                let (low, high) = (a.float("low", 0.0), a.float("high", 1.0));
                if low != 0.0 || high != 1.0 {
                    return Err(wrong(&format!("with low={low} high={high}")));
                }
                if !matches!(a.int("dtype", 1), 1 | 10 | 11) {
                    return Err(wrong(&format!("of dtype {}", a.int("dtype", 1))));
                }
                let dims = match self.val(n, 0)? {
                    Val::Const(t, _) => t.dims.iter().map(|&d| d as i64).collect(),
                    Val::Random(RandPart::Template { dims }) => dims,
                    _ => return Err(wrong("of other than a constant (the noise's shape)")),
                };
                Val::Random(RandPart::Uniform { dims })
            }
            "ConstantOfShape" => {
                Attrs::only(n, &["value"])?;
                let dims = match self.val(n, 0)? {
                    Val::Const(t, _) if t.int && t.dims.len() == 1 && t.numel() <= 8 => {
                        t.data.iter().map(|&d| d as i64).collect()
                    }
                    _ => {
                        return Err(
                            "ConstantOfShape is supported only of a constant shape, as the \
                             noise of stochastic depth"
                                .into(),
                        )
                    }
                };
                Val::Random(RandPart::Template { dims })
            }
            op if RANDOM_OPS.contains(&op) => {
                return Err(format!(
                    "ONNX op {op} draws random numbers; hesscope reads randomness only as \
                     Dropout and {PATTERN}"
                ))
            }
            "Less" => {
                Attrs::only(n, &[])?;
                match (self.val(n, 0)?, self.val(n, 1)?) {
                    (Val::Random(RandPart::Uniform { dims }), k) => match scalar_const(&k) {
                        Some(keep) if keep > 0.0 && keep <= 1.0 => {
                            Val::Random(RandPart::Less { dims, keep })
                        }
                        _ => {
                            return Err(wrong(
                                "with a threshold other than a survival rate in (0, 1]",
                            ))
                        }
                    },
                    _ => return Err(wrong("of other than U(0, 1) and a constant")),
                }
            }
            "Cast" => {
                let to = Attrs::only(n, &["saturate", "to"])?.int("to", 0);
                match self.val(n, 0)? {
                    Val::Random(RandPart::Less { dims, keep }) if matches!(to, 1 | 10 | 11) => {
                        Val::Random(RandPart::Mask { dims, keep })
                    }
                    _ => return Err(wrong(&format!("to type {to}"))),
                }
            }
            "Div" => {
                Attrs::only(n, &[])?;
                match (self.val(n, 0)?, self.val(n, 1)?) {
                    (Val::Random(RandPart::Mask { dims, keep }), k)
                        if scalar_const(&k) == Some(keep) =>
                    {
                        Val::Random(RandPart::Scaled { dims })
                    }
                    _ => return Err(wrong("other than of the mask by its survival rate")),
                }
            }
            "Mul" => {
                Attrs::only(n, &[])?;
                let (x, dims) = match (self.val(n, 0)?, self.val(n, 1)?) {
                    (Val::Value(x), Val::Random(RandPart::Scaled { dims }))
                    | (Val::Random(RandPart::Scaled { dims }), Val::Value(x)) => (x, dims),
                    _ => return Err(wrong("other than of a value by the scaled mask")),
                };
                let rank = if self.shapes[x].1 { 2 } else { 4 };
                let batch = self.batch.map(|b| b as i64).unwrap_or(-1);
                let per_sample = dims.len() == rank
                    && dims[1..].iter().all(|&d| d == 1)
                    && (dims[0] == 1 || dims[0] == batch || (batch == -1 && dims[0] > 0));
                if !per_sample {
                    return Err(wrong(&format!(
                        "of a mask of dims {dims:?} (one number per sample or per batch: \
                         [N{}] or [1{}])",
                        ", 1".repeat(rank - 1),
                        ", 1".repeat(rank - 1)
                    )));
                }
                Val::Value(x)
            }
            _ => {
                let name = n
                    .input
                    .iter()
                    .find(|i| matches!(self.vals.get(*i), Some(Val::Random(_))))
                    .cloned()
                    .unwrap_or_default();
                return Err(format!("{op} reads `{name}`, a piece of {PATTERN}"));
            }
        };
        self.set(n, 0, out);
        Ok(())
    }
}

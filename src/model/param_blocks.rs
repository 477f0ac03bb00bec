//! The Hessian blocks of Zhang et al. (NeurIPS 2024, "Why Transformers
//! Need Adam: A Hessian Perspective"): one block per module (each linear,
//! embedding, LayerNorm, conv, ...), with a fused attention projection
//! split into its Q, K and V blocks. The split comes from the graph: the
//! single input of an `mha` [T, 3D] is the output of a linear (or Hugging
//! Face Conv1D) of DOUT = 3D, whose output features are q | k | v.
//! nn.Linear's weight [3D, DIN] (nn.MultiheadAttention's `in_proj_weight`)
//! holds them as contiguous thirds of its rows; Conv1D's [DIN, 3D]
//! (GPT-2's `c_attn.weight`) as the thirds of every row, so each of its
//! blocks is DIN strided runs of D entries; the bias [3D] in thirds.

use crate::error::{Error, Result};
use crate::model::{Model, Op};
use std::ops::Range;

/// One block: a name and its parameter indices as disjoint ascending runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamBlock {
    pub name: String,
    pub ranges: Vec<Range<usize>>,
}

impl ParamBlock {
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The block's indices in order.
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranges.iter().flat_map(|r| r.clone())
    }
}

/// A fused q|k|v projection feeding an `mha`: its weight and bias (indices
/// into `Model::params`), the width D of each part, and whether the weight
/// is Conv1D's [DIN, 3D] (strided parts) or nn.Linear's [3D, DIN].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedQkv {
    pub weight: usize,
    pub bias: Option<usize>,
    pub d: usize,
    pub transposed: bool,
}

/// Every fused q|k|v projection of the model (those feeding an `mha` with
/// a single input from a linear or conv1d of DOUT = 3D). A tied weight
/// (shared with another layer) is not split: its block is its owner's.
pub fn fused_qkv(model: &Model) -> Vec<FusedQkv> {
    let mut out = vec![];
    for node in &model.nodes {
        let Op::Mha { .. } = node.op else { continue };
        if node.inputs.len() != 1 || node.inputs[0] == 0 {
            continue;
        }
        let src = &model.nodes[node.inputs[0] - 1];
        let d = node.out_shape.features();
        if let Op::SeqLinear {
            weight,
            bias,
            dout,
            transposed,
            ..
        } = src.op
        {
            let tied = model.tied.iter().any(|(_, p)| *p == weight);
            if dout == 3 * d && !tied && !out.iter().any(|f: &FusedQkv| f.weight == weight) {
                out.push(FusedQkv {
                    weight,
                    bias,
                    d,
                    transposed,
                });
            }
        }
    }
    out
}

/// Part `part` (0 = q, 1 = k, 2 = v) of parameter `p` as runs.
fn part_ranges(model: &Model, p: usize, f: &FusedQkv, part: usize) -> Vec<Range<usize>> {
    let spec = &model.params[p];
    let (o, d) = (spec.offset, f.d);
    if p == f.weight && f.transposed {
        // [DIN, 3D]: row i's columns [part·D, (part+1)·D).
        let din = spec.shape[0];
        (0..din)
            .map(|i| o + i * 3 * d + part * d..o + i * 3 * d + (part + 1) * d)
            .collect()
    } else {
        // [3D, DIN] rows or a [3D] bias: contiguous thirds.
        let third = spec.numel() / 3;
        std::iter::once(o + part * third..o + (part + 1) * third).collect()
    }
}

/// The model's blocks in parameter order: one per module (the tensors
/// sharing the name before their last '.'; a top-level tensor such as
/// ViT's `class_token` is a block of its own), and with `split_qkv` the
/// fused projections' three blocks `MODULE.q`, `MODULE.k`, `MODULE.v` in
/// place of their module's. Checked to cover every parameter once.
pub fn param_blocks(model: &Model, split_qkv: bool) -> Result<Vec<ParamBlock>> {
    let fused = if split_qkv { fused_qkv(model) } else { vec![] };
    let mut blocks: Vec<ParamBlock> = vec![];
    let mut push = |name: String, r: Range<usize>| {
        let b = match blocks.iter_mut().find(|b| b.name == name) {
            Some(b) => b,
            None => {
                blocks.push(ParamBlock {
                    name,
                    ranges: vec![],
                });
                blocks.last_mut().unwrap()
            }
        };
        match b.ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => b.ranges.push(r),
        }
    };
    for (i, spec) in model.params.iter().enumerate() {
        let module = match spec.module() {
            "" => spec.name.clone(),
            m => m.to_string(),
        };
        let f = fused.iter().find(|f| f.weight == i || f.bias == Some(i));
        match f {
            Some(f) => {
                for (part, tag) in ["q", "k", "v"].iter().enumerate() {
                    for r in part_ranges(model, i, f, part) {
                        push(format!("{module}.{tag}"), r);
                    }
                }
            }
            None => push(module, spec.offset..spec.offset + spec.numel()),
        }
    }
    check_partition(&blocks, model.n_params)?;
    Ok(blocks)
}

/// Every index of 0..n in exactly one block, each block's runs ascending
/// and disjoint (what [`crate::spectral::layers::BlockOperator`] takes).
pub fn check_partition(blocks: &[ParamBlock], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    for b in blocks {
        let mut prev = 0;
        for r in &b.ranges {
            if r.start < prev || r.end > n || r.is_empty() {
                return Err(Error::Invalid {
                    what: "blocks",
                    msg: format!(
                        "block {}: run {}..{} is empty, out of order or past the {n} parameters",
                        b.name, r.start, r.end
                    ),
                });
            }
            prev = r.end;
            for s in &mut seen[r.clone()] {
                if *s {
                    return Err(Error::Invalid {
                        what: "blocks",
                        msg: format!(
                            "block {}: a parameter in {}..{} is in two blocks",
                            b.name, r.start, r.end
                        ),
                    });
                }
                *s = true;
            }
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(Error::Invalid {
            what: "blocks",
            msg: format!("parameter {i} of {n} is in no block"),
        });
    }
    Ok(())
}

//! What an engine checks of its results: batch statistics and outputs
//! that overflow float32 (naming the layer), non-finite parameter-shaped
//! vectors (naming the tensor), and the masks tests compare against.

use super::GpuEngine;
use crate::dispatch::kernels::bn_rows;
use crate::engine::BnMode;
use crate::error::{Error, Result};
use crate::layers;
use crate::model::{Activation, Model, Op};

impl GpuEngine {
    /// Batch statistics that overflow float32 (a variance beyond its range,
    /// which makes 1/√(σ²+ε) zero) give finite but wrong outputs: refused,
    /// naming the layer, for the batches whose forward pass just ran. Their
    /// workspaces are then forgotten, so a later call recomputes and checks
    /// again.
    pub(super) fn check_bn_statistics(&mut self, batches: &[usize]) -> Result<()> {
        if self.bn != BnMode::Batch || batches.is_empty() {
            return Ok(());
        }
        let bns: Vec<(usize, usize)> = (self.model.nodes.iter().enumerate())
            .filter_map(|(i, n)| match n.op {
                Op::BatchNorm { c, .. } => Some((i, c)),
                _ => None,
            })
            .collect();
        if bns.is_empty() {
            return Ok(());
        }
        let mut ranges = vec![];
        for &bi in batches {
            let ws = &self.workspaces[self.programs[bi].ws];
            for &(i, c) in &bns {
                // Rows MEAN and S, and VAR (kernels::bn_rows). With float64
                // statistics (`Plan::bn_float64`) s stays in range where σ²
                // does not; the passes' products of s (s², s·gy) then leave
                // float32's range, so σ² is checked too.
                let buf = &self.arena.buffers[ws.state[i][2]];
                ranges.push((buf, 0, 2 * c));
                ranges.push((buf, bn_rows::VAR * c, c));
            }
        }
        let rows = self.ctx.read_f32(&ranges)?;
        for (k, r) in rows.chunks(2).enumerate() {
            let (i, c) = bns[k % bns.len()];
            let (ms, var) = (&r[0], &r[1]);
            let bad = ms[..c].iter().any(|m| !m.is_finite())
                || ms[c..].iter().any(|s| !s.is_finite() || *s == 0.0)
                || var.iter().any(|v| !v.is_finite());
            if bad {
                let bi = batches[k / bns.len()];
                let node = &self.model.nodes[i];
                for &b in batches {
                    let w = self.programs[b].ws;
                    self.workspaces[w].resident = None;
                }
                return Err(Error::Numerical(format!(
                    "the batch statistics of layer `{}` (batch norm) overflow float32 on {} (batch {bi}: \
                     a mean or variance beyond its range): the data or weights are too large for float32; \
                     the float64 reference computes in their range",
                    crate::layers::layer_name(node),
                    self.ctx.info.name
                )));
            }
        }
        Ok(())
    }

    pub(super) fn check_finite(&self, what: &str, xs: &[f32]) -> Result<()> {
        non_finite_error(&self.model, what, xs, &self.ctx.info.name)
    }

    /// The ReLU masks (input > 0, in f32) per batch and node, as the GPU
    /// sees them: lets tests run the float64 reference with the same kinks.
    /// An engine replaying float64 decisions gives those.
    pub fn relu_masks(&mut self) -> Result<Vec<Vec<Vec<bool>>>> {
        self.ensure_decisions()?;
        if let (true, Some(host)) = (self.replay, &self.held.host) {
            let relu = |n: &crate::model::Node| n.op == Op::Act(Activation::Relu);
            return Ok(host
                .iter()
                .map(|b| {
                    (self.model.nodes.iter().zip(b))
                        .map(|(n, d)| match d {
                            layers::Decision::Mask(m) if relu(n) => m.clone(),
                            _ => vec![],
                        })
                        .collect()
                })
                .collect());
        }
        let mut out = vec![];
        for bi in 0..self.programs.len() {
            let w = self.programs[bi].ws;
            if self.workspaces[w].resident != Some(bi) {
                if self.workspaces.len() < self.programs.len() {
                    self.upload_batch(bi)?;
                }
                let p = &self.programs[bi];
                self.submit(&format!("batch {bi}"), |enc| p.forward_backward.record(enc))?;
                self.workspaces[w].resident = Some(bi);
                self.workspaces[w].zero_adjoint = false;
            }
            let count = self.programs[bi].count;
            let ws = &self.workspaces[w];
            let mut ranges = vec![];
            for node in &self.model.nodes {
                if node.op == Op::Act(Activation::Relu) {
                    let b = ws.act[self.canon[node.inputs[0]]];
                    ranges.push((&self.arena.buffers[b], 0, count * node.in_shape.numel()));
                }
            }
            let vals = self.ctx.read_f32(&ranges)?;
            let mut it = vals.into_iter();
            let masks = self
                .model
                .nodes
                .iter()
                .map(|n| {
                    if n.op == Op::Act(Activation::Relu) {
                        it.next().unwrap().iter().map(|x| *x > 0.0).collect()
                    } else {
                        vec![]
                    }
                })
                .collect();
            out.push(masks);
        }
        Ok(out)
    }

    /// After a non-finite result: the first layer (in graph order, over the
    /// batches still resident) whose output (`tangents`: its R-forward
    /// output) holds an infinity or NaN, as an error naming it. Ok when
    /// every resident value is finite (the overflow happened later).
    pub(super) fn diagnose(&self, tangents: bool) -> Result<()> {
        for (bi, prog) in self.programs.iter().enumerate() {
            let ws = &self.workspaces[prog.ws];
            if ws.resident != Some(bi) {
                continue;
            }
            for (i, node) in self.model.nodes.iter().enumerate() {
                if layers::unit(&node.op).is_alias() {
                    continue;
                }
                let v = self.canon[i + 1];
                let buf = if tangents { ws.dact[v] } else { ws.act[v] };
                let len = prog.count * node.out_shape.numel();
                let vals = self.ctx.read_f32(&[(&self.arena.buffers[buf], 0, len)])?;
                if let Some(x) = vals[0].iter().find(|x| !x.is_finite()) {
                    let pass = if tangents { "R-forward" } else { "forward" };
                    return Err(Error::Numerical(format!(
                        "the {pass} pass overflows float32 at layer `{}` ({}) on {} (batch {bi}: an output is {x}): \
                         the weights, data or direction are too large for float32; the float64 reference computes in their range",
                        crate::layers::layer_name(node),
                        node.kind(),
                        self.ctx.info.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Which of a workspace's per-value buffers [`GpuEngine::resident_values`]
/// reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// Forward values.
    Forward,
    /// R-forward values (the first tangent's slice).
    Tangent,
    /// Adjoints (gradients of the loss with respect to each value).
    Adjoint,
    /// R-adjoints (the first tangent's slice).
    RAdjoint,
}

impl GpuEngine {
    /// Every value's buffer (the input, then each node's output; an alias
    /// reads its input's) of batch `bi` as its last pass left it, for
    /// diagnostics that compare a pass with the float64 reference node by
    /// node (examples/bn_precision.rs). Forward values and adjoints are
    /// those of the batch's last forward/backward pass only while it is
    /// resident; tangent values are those of the last R-pass.
    pub fn resident_values(&self, bi: usize, kind: ValueKind) -> Result<Vec<Vec<f32>>> {
        let prog = &self.programs[bi];
        let ws = &self.workspaces[prog.ws];
        let mut ranges = vec![];
        for v in 0..self.canon.len() {
            let shape = if v == 0 {
                self.model.input
            } else {
                self.model.nodes[v - 1].out_shape
            };
            let c = self.canon[v];
            let buf = match kind {
                ValueKind::Forward => ws.act[c],
                ValueKind::Tangent => ws.dact[c],
                ValueKind::Adjoint => ws.adj[c],
                ValueKind::RAdjoint => ws.radj[c],
            };
            ranges.push((&self.arena.buffers[buf], 0, prog.count * shape.numel()));
        }
        self.ctx.read_f32(&ranges)
    }
}

/// An error naming the first non-finite value of a parameter-shaped vector.
pub(super) fn non_finite_error(model: &Model, what: &str, xs: &[f32], device: &str) -> Result<()> {
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        let name = model
            .params
            .iter()
            .find(|p| i >= p.offset && i < p.offset + p.numel())
            .map(|p| p.name.clone())
            .unwrap_or_default();
        return Err(Error::Numerical(format!(
            "{what} is {} at parameter {i} ({name}) on {device}: the weights, data or direction overflow in float32",
            xs[i]
        )));
    }
    Ok(())
}

pub use crate::dispatch::kernels::{EMULATOR_LOOP_LIMIT, ITERATIONS_PER_TAP};

/// Refuses, on a CPU emulator, a layer whose kernels would loop past
/// [`EMULATOR_LOOP_LIMIT`] in one invocation and cannot be split: the
/// per-channel reductions (batch norm, bias and weight-gradient sums) over
/// a channel's values in a batch of `max_count`, a workgroup of 256 threads
/// sharing them; a conv/linear weight gradient's stage one (a thread's
/// chunk of output rows × columns) and its sum over the chunks; the
/// cross-entropy's loops over the classes (named by the last layer). The
/// conv/linear forward (and R-forward) threads loop over the input
/// channels × taps, the backward (data) threads over the output channels ×
/// the taps of one phase: with `split` (the emulator kernels) those run in
/// chunks (src/layers/conv_split.rs) and pass; without it (the tiled
/// kernels forced onto an emulator) they are refused too.
pub(crate) fn check_emulator_loops(
    model: &Model,
    adapter: &str,
    max_count: usize,
    split: bool,
) -> Result<()> {
    let refuse = |node: &crate::model::Node, what: String| Error::Unsupported {
        layer: node.name.clone(),
        msg: format!(
            "{what}, past the {EMULATOR_LOOP_LIMIT} after which {adapter} (Mesa's CPU driver) \
             silently stops a shader's loops; take smaller batches, or run it on a GPU or on \
             the float64 CPU engine"
        ),
    };
    for node in &model.nodes {
        let per_channel = max_count * node.in_shape.spatial().max(node.out_shape.spatial());
        let reduce = per_channel.div_ceil(256) * ITERATIONS_PER_TAP;
        if reduce > EMULATOR_LOOP_LIMIT {
            return Err(refuse(
                node,
                format!(
                    "its per-channel sums over {per_channel} values of a batch of {max_count} \
                     loop about {reduce} times per GPU thread"
                ),
            ));
        }
        let (fwd, bwd, what, rows, k, oh, ow, weights) = match node.op {
            Op::Conv {
                cin,
                cout,
                k,
                stride,
                groups,
                ..
            } => {
                let g = groups.max(1);
                let phase = k.div_ceil(stride.max(1));
                let (oh, ow) = (node.out_shape.h, node.out_shape.w);
                let w = cout * (cin / g) * k * k;
                (
                    cin / g * k * k,
                    cout / g * phase * phase,
                    "channels",
                    max_count,
                    k,
                    oh,
                    ow,
                    w,
                )
            }
            Op::Linear { din, dout, .. } => (din, dout, "features", max_count, 1, 1, 1, din * dout),
            Op::SeqLinear { din, dout, .. } => {
                let rows = max_count * node.in_shape.tokens();
                (din, dout, "features", rows, 1, 1, 1, din * dout)
            }
            _ => continue,
        };
        // The weight gradient (conv_weight.wgsl, conv_direct.wgsl): stage
        // one loops over ⌈k/7⌉ passes of a chunk's rows × columns, the sum
        // over the chunks; counted at the same rate as a tap.
        let (per, chunks) = crate::dispatch::kernels::conv_weight_chunks(rows, oh, ow, weights);
        let stage = k.div_ceil(7) * per * ow.max(1) * ITERATIONS_PER_TAP;
        let sum = chunks * ITERATIONS_PER_TAP;
        if stage.max(sum) > EMULATOR_LOOP_LIMIT {
            return Err(refuse(
                node,
                format!(
                    "its weight gradient over a batch of {max_count} loops about {} times per \
                     GPU thread",
                    stage.max(sum)
                ),
            ));
        }
        let worst = fwd.max(bwd) * ITERATIONS_PER_TAP;
        if !split && worst > EMULATOR_LOOP_LIMIT {
            return Err(refuse(
                node,
                format!(
                    "its float32 kernels (the tiled path, which does not split them) loop over \
                     {fwd} input and {bwd} output {what} (taps included) per GPU thread, about \
                     {worst} loop iterations"
                ),
            ));
        }
    }
    // The cross-entropy's three loops over the classes (a vocabulary for a
    // language model): a thread per row, or with `split` a workgroup per
    // row whose threads stride over them (shaders/loss.wgsl).
    let k = model.classes;
    let per_thread = if split && crate::layers::loss::by_rows_at(k) {
        k.div_ceil(256)
    } else {
        k
    };
    let loss = 3 * per_thread * ITERATIONS_PER_TAP;
    if let (true, Some(last)) = (loss > EMULATOR_LOOP_LIMIT, model.nodes.last()) {
        return Err(refuse(
            last,
            format!(
                "the cross-entropy over its {k} outputs loops about {loss} times per GPU thread"
            ),
        ));
    }
    Ok(())
}

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

/// Loop iterations one shader invocation may run on llvmpipe (the CPU
/// driver behind lavapipe and Mesa's GL): gallivm's loop limiter
/// (`LP_MAX_TGSI_LOOP_ITERATIONS`) ends every loop of an invocation once
/// 65535 iterations have run in all, silently, so a longer loop leaves a
/// partial sum and a wrong answer.
pub const EMULATOR_LOOP_LIMIT: usize = 65_535;

/// Iterations counted per channel (or feature) a conv/linear kernel's
/// thread loops over, per tap: measured on lavapipe and llvmpipe (Mesa
/// 22.3), a 1×1 convolution (a linear layer) went wrong above about
/// 65535/6 = 10922 input features (10800 right, 11000 wrong) and a 3×3 one
/// at stride 2 above 2700..4000 channels (≤ 24 per channel, against the
/// 54 taken here): 6 per channel and tap bounds both from above.
const ITERATIONS_PER_TAP: usize = 6;

/// Refuses, on a CPU emulator, a layer whose kernels would loop past
/// [`EMULATOR_LOOP_LIMIT`] in one invocation: the conv/linear forward (and
/// R-forward) threads loop over the input channels × taps, the backward
/// (data) threads over the output channels × the taps of one phase; the
/// per-channel reductions (batch norm, bias and weight-gradient sums) over
/// a channel's values in a batch of `max_count`, a workgroup of 256 threads
/// sharing them.
pub(crate) fn check_emulator_loops(model: &Model, adapter: &str, max_count: usize) -> Result<()> {
    for node in &model.nodes {
        let per_channel = max_count * node.in_shape.spatial().max(node.out_shape.spatial());
        let reduce = per_channel.div_ceil(256) * ITERATIONS_PER_TAP;
        if reduce > EMULATOR_LOOP_LIMIT {
            return Err(Error::Unsupported {
                layer: node.name.clone(),
                msg: format!(
                    "its per-channel sums over {per_channel} values of a batch of {max_count} \
                     loop about {reduce} times per GPU thread, past the {EMULATOR_LOOP_LIMIT} \
                     after which {adapter} (Mesa's CPU driver) silently stops a shader's loops; \
                     take smaller batches, or run it on a GPU or on the float64 CPU engine"
                ),
            });
        }
        let (fwd, bwd, what) = match node.op {
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
                (cin / g * k * k, cout / g * phase * phase, "channels")
            }
            Op::Linear { din, dout, .. } | Op::SeqLinear { din, dout, .. } => {
                (din, dout, "features")
            }
            _ => continue,
        };
        let worst = fwd.max(bwd) * ITERATIONS_PER_TAP;
        if worst > EMULATOR_LOOP_LIMIT {
            return Err(Error::Unsupported {
                layer: node.name.clone(),
                msg: format!(
                    "its float32 kernels loop over {} input and {} output {what} (taps included) \
                     per GPU thread, about {worst} loop iterations, past the {EMULATOR_LOOP_LIMIT} \
                     after which {adapter} (Mesa's CPU driver) silently stops a shader's loops; \
                     run it on a GPU, or on the float64 CPU engine",
                    fwd, bwd
                ),
            });
        }
    }
    Ok(())
}

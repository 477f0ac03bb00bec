//! The engine's piecewise decisions (`crate::decisions`): taken from the
//! float64 reference's forward pass at the engine's θ and written into the
//! state its replaying plans read (`Plan::frozen`), or recorded by a
//! float32 forward pass on the device; with their report.

use super::GpuEngine;
use crate::cpu::CpuReference;
use crate::decisions::{self, DecisionReport, DecisionSource, Tally};
use crate::error::Result;
use crate::gpu::kernels;
use crate::layers::{self, CpuCx, Decision, StateWords};
use crate::model::Model;
use std::time::Instant;

/// What an engine holds of its decisions.
pub(super) struct Held {
    pub source: DecisionSource,
    /// The float64 reference the decisions come from (`Float64` only):
    /// the engine's problem, kept at its θ, samples and running buffers.
    pub reference: Option<CpuReference>,
    /// The float64 decisions of the current θ per batch, per node, as
    /// written into the workspaces (rewritten before a shared workspace's
    /// forward pass).
    pub host: Option<Vec<Vec<Decision>>>,
    /// The decisions no longer belong to the current θ (or samples): the
    /// next pass takes them anew.
    pub stale: bool,
    /// A float32 recording pass overwrote the float64 decisions in the
    /// workspaces' state: they are written again before the next pass.
    pub dirty: bool,
    /// The report of the current decisions, once made (inner None: the
    /// model takes none).
    pub report: Option<Option<DecisionReport>>,
    /// Batch mode with float64 decisions (`Plan::bn_float64`): batch
    /// norm's statistics and x̂ come from the same float64 forward pass.
    pub bn: bool,
    /// That state per batch, kept on the host only where the workspace is
    /// shared and it is written again before each batch's pass.
    pub bn_host: Option<Vec<BnState>>,
}

/// One batch's float64 batch-norm state: per batch-norm node, its index,
/// x̂, the rows μ and s, and the row σ² (`layers::batchnorm::float64_state`).
pub(super) type BnState = Vec<(usize, Vec<f32>, Vec<f32>, Vec<f32>)>;

fn bn_state_of(model: &Model, count: usize, vals: &[Vec<f64>]) -> BnState {
    (model.nodes.iter().enumerate())
        .filter(|(_, n)| matches!(n.op, crate::model::Op::BatchNorm { .. }))
        .map(|(ni, n)| {
            let (xhat, rows, var) = layers::batchnorm::float64_state(n, count, &vals[n.inputs[0]]);
            (ni, xhat, rows, var)
        })
        .collect()
}

impl Held {
    pub fn new(source: DecisionSource, reference: Option<CpuReference>, bn: bool) -> Held {
        Held {
            source,
            reference,
            host: None,
            stale: true,
            dirty: false,
            report: None,
            bn,
            bn_host: None,
        }
    }

    /// θ, the samples or the running buffers moved.
    pub fn invalidate(&mut self) {
        self.stale = true;
        self.report = None;
    }
}

impl GpuEngine {
    /// Before a pass: decisions of the current θ in place, where the
    /// plans replay float64 ones and they are stale.
    pub(super) fn ensure_decisions(&mut self) -> Result<()> {
        if !self.replay || self.held.source != DecisionSource::Float64 {
            return Ok(());
        }
        if self.held.stale && !self.frozen {
            self.take_float64_decisions()?;
        } else if self.held.dirty {
            if let Some(h) = self.held.host.take() {
                if self.workspaces.len() == self.programs.len() {
                    for (bi, d) in h.iter().enumerate() {
                        self.upload_decisions(bi, d)?;
                    }
                }
                self.held.host = Some(h);
            }
            self.held.dirty = false;
        }
        Ok(())
    }

    /// The float64 reference's decisions at the current θ, written where
    /// the replaying plans read them; the report counts how many lie
    /// within float32 rounding of their threshold (from the float64
    /// inputs) and how many a float32 forward pass takes otherwise.
    pub(super) fn take_float64_decisions(&mut self) -> Result<()> {
        let t = Instant::now();
        let reference = self
            .held
            .reference
            .as_mut()
            .expect("internal: a float64-decision engine keeps its reference");
        reference
            .problem
            .weights
            .theta
            .copy_from_slice(&self.theta_host);
        let reference = &*reference;
        let bn = self.held.bn;
        let (dec, tally, bn_state) = reference.decisions_tallied_with(|count, vals| {
            if bn {
                bn_state_of(&reference.problem.model, count, vals)
            } else {
                vec![]
            }
        });
        let flips = self.float32_tally(Some(&dec))?;
        let resident = self.workspaces.len() == self.programs.len();
        if resident {
            for (bi, d) in dec.iter().enumerate() {
                self.upload_decisions(bi, d)?;
                self.upload_bn(bi, &bn_state[bi])?;
            }
        }
        self.held.bn_host = (bn && !resident).then_some(bn_state);
        let seconds = t.elapsed().as_secs_f64();
        let report = tally.has_layers().then(|| {
            tally
                .with_flips_of(&flips)
                .report(&self.model, DecisionSource::Float64, seconds)
        });
        for w in &mut self.workspaces {
            w.resident = None;
        }
        self.held.host = Some(dec);
        self.held.stale = false;
        self.held.dirty = false;
        self.held.report = Some(report);
        Ok(())
    }

    /// Writes batch `bi`'s decisions into its workspace's unit state.
    pub(super) fn upload_decisions(&self, bi: usize, dec: &[Decision]) -> Result<()> {
        let ws = &self.workspaces[self.programs[bi].ws];
        for (ni, (node, d)) in self.model.nodes.iter().zip(dec).enumerate() {
            let Some(words) = layers::unit(&node.op).decision_words(node, d) else {
                continue;
            };
            let buf = &self.arena.buffers[ws.state[ni][0]];
            match words {
                StateWords::F32(v) => self.ctx.write_f32(buf, 0, &v)?,
                StateWords::U32(v) => self.ctx.write_u32(buf, &v)?,
            }
        }
        Ok(())
    }

    /// Writes batch `bi`'s float64 batch-norm state where its replaying
    /// forward pass reads it: x̂ (state 0), the rows μ, s and σ² (state 2).
    pub(super) fn upload_bn(&self, bi: usize, st: &BnState) -> Result<()> {
        let ws = &self.workspaces[self.programs[bi].ws];
        for (ni, xhat, rows, var) in st {
            let c = var.len();
            let stats = &self.arena.buffers[ws.state[*ni][2]];
            self.ctx
                .write_f32(&self.arena.buffers[ws.state[*ni][0]], 0, xhat)?;
            self.ctx.write_f32(stats, 0, rows)?;
            self.ctx.write_f32(stats, kernels::bn_rows::VAR * c, var)?;
        }
        Ok(())
    }

    /// Before batch `bi`'s forward pass in a shared workspace: its
    /// float64 decisions and batch-norm state, if the engine holds them.
    pub(super) fn upload_held(&self, bi: usize) -> Result<()> {
        if let Some(b) = &self.held.bn_host {
            self.upload_bn(bi, &b[bi])?;
        }
        match &self.held.host {
            Some(h) if self.replay => self.upload_decisions(bi, &h[bi]),
            _ => Ok(()),
        }
    }

    /// A float32 forward pass over every batch (the recording pass of a
    /// replaying plan, else the forward/backward pass), the decisions it
    /// takes counted from its inputs read back; with `compare`, how many
    /// differ from those. A replaying plan's recording pass leaves its own
    /// decisions in the state.
    pub(super) fn float32_tally(&mut self, compare: Option<&[Vec<Decision>]>) -> Result<Tally> {
        let deciding: Vec<usize> = (self.model.nodes.iter().enumerate())
            .filter(|(_, n)| layers::unit(&n.op).decides(n))
            .map(|(i, _)| i)
            .collect();
        let mut total = Tally::default();
        if deciding.is_empty() {
            return Ok(total);
        }
        for bi in 0..self.programs.len() {
            let inputs: Vec<Vec<f64>> = self
                .float32_piecewise_inputs(bi)?
                .into_iter()
                .map(|(_, v)| v.iter().map(|&x| x as f64).collect())
                .collect();
            let count = self.programs[bi].count;
            let cx = cpu_cx(&self.model, count, &self.theta_host);
            let (dec, mut tally) = decisions::decide_batch(&cx, &self.model, |ni| {
                deciding
                    .iter()
                    .position(|&d| d == ni)
                    .map(|k| inputs[k].as_slice())
            });
            if let Some(c) = compare {
                for &ni in &deciding {
                    tally.add_flips(ni, &dec[ni], &c[bi][ni]);
                }
            }
            total.merge(tally);
        }
        Ok(total)
    }

    /// A float32 forward pass of batch `bi` taking its own decisions (the
    /// recording pass of a replaying plan, else the forward/backward
    /// pass), and the input of every node that decides, by node index.
    pub fn float32_piecewise_inputs(&mut self, bi: usize) -> Result<Vec<(usize, Vec<f32>)>> {
        let deciding: Vec<usize> = (self.model.nodes.iter().enumerate())
            .filter(|(_, n)| layers::unit(&n.op).decides(n))
            .map(|(i, _)| i)
            .collect();
        if self.workspaces.len() < self.programs.len() {
            self.upload_batch(bi)?;
        }
        let p = &self.programs[bi];
        let (w, count) = (p.ws, p.count);
        match &p.record {
            Some(rec) => self.submit(&format!("batch {bi} recording"), |enc| rec.record(enc))?,
            None => self.submit(&format!("batch {bi}"), |enc| p.forward_backward.record(enc))?,
        }
        // A recording pass leaves values, not adjoints, and its own
        // decisions in the state: the next pass recomputes.
        self.workspaces[w].resident = p.record.is_none().then_some(bi);
        self.workspaces[w].zero_adjoint = false;
        if p.record.is_some() && self.held.source == DecisionSource::Float64 {
            self.held.dirty = true;
            // The float64 batch-norm state it overwrote is not kept on the
            // host for resident workspaces: the next pass takes it anew.
            if self.held.bn && self.held.bn_host.is_none() {
                self.held.stale = true;
            }
        }
        let ws = &self.workspaces[w];
        let ranges: Vec<_> = deciding
            .iter()
            .map(|&ni| {
                let node = &self.model.nodes[ni];
                let b = ws.act[self.canon[node.inputs[0]]];
                (&self.arena.buffers[b], 0, count * node.in_shape.numel())
            })
            .collect();
        let vals = self.ctx.read_f32(&ranges)?;
        Ok(deciding.into_iter().zip(vals).collect())
    }

    /// The report of the current decisions (made on first call after θ
    /// moved: for float32 decisions a forward pass over the data).
    pub(super) fn decisions_report(&mut self) -> Result<Option<DecisionReport>> {
        self.ensure_decisions()?;
        if self.held.report.is_none() {
            self.take_float32_report()?;
        }
        Ok(self.held.report.clone().flatten())
    }

    /// A float32 forward pass's decisions counted into the report (on a
    /// replaying plan its recording pass, which leaves them in the state).
    fn take_float32_report(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let t = self.float32_tally(None)?;
        let seconds = t0.elapsed().as_secs_f64();
        self.held.report = Some(
            t.has_layers()
                .then(|| t.report(&self.model, DecisionSource::Float32, seconds)),
        );
        Ok(())
    }

    /// The decisions of a held (`EngineOptions::frozen`) engine at the
    /// current θ: the float64 reference's, or a float32 recording pass's.
    pub(super) fn record_decisions(&mut self) -> Result<()> {
        match self.held.source {
            DecisionSource::Float64 => self.take_float64_decisions(),
            DecisionSource::Float32 => {
                self.take_float32_report()?;
                self.held.stale = false;
                Ok(())
            }
        }
    }

    /// Where the decisions come from.
    pub fn decision_source(&self) -> DecisionSource {
        self.held.source
    }
}

/// The context `Layer::decide` reads (the batch size).
fn cpu_cx<'a>(model: &'a Model, n: usize, theta: &'a [f64]) -> CpuCx<'a> {
    CpuCx {
        model,
        n,
        theta,
        buffers: &[],
        batch_mode: false,
        mask: None,
        argmax: None,
        pieces: None,
        sync: None,
    }
}

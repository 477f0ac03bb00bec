//! The float64 CPU reference executor: a walker over the lowered graph that
//! runs each layer unit's float64 passes (`crate::layers`) — forward,
//! R-forward, backward and R-backward (Pearlmutter's forward-over-reverse)
//! — and owns the values, tangents and adjoints between them.

use crate::decisions::{self, DecisionReport, DecisionSource, Tally};
use crate::engine::{check_out_len, BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::layers::{self, next_token, CpuCx, Decision, Saved};
use crate::model::{Activation, Op};
use crate::ops::bn::AllSum;
use std::sync::Mutex;

pub mod profile;
mod sweep;

pub struct CpuReference {
    pub problem: Problem,
    /// ReLU masks to use instead of the sign of the f64 pre-activation,
    /// per batch then per node (empty for non-ReLU nodes): lets a test
    /// isolate kernel error from f32/f64 kink flips.
    pub relu_masks: Option<Vec<Vec<Vec<bool>>>>,
    /// Piecewise decisions (ReLU/LeakyReLU masks, max-pool argmax) to
    /// replay instead of taking them from the current θ, per batch then per
    /// node, as [`CpuReference::decisions`] records them; they take
    /// precedence over `relu_masks`. With them the passes compute the loss,
    /// gradient and Hv of the smooth piece that holds the recording θ —
    /// what differentiating Hv along θ (third derivatives) needs.
    pub frozen: Option<Vec<Vec<Decision>>>,
    /// Each batch's forward state at the θ of the last product
    /// (`sweep`), reused while θ, the data and the decisions stay.
    cache: Mutex<sweep::SweepCache>,
}

/// Results of one pass over the data set.
pub struct PassOutput {
    pub loss: f64,
    pub grad: Vec<f64>,
    pub hv: Option<Vec<f64>>,
}

/// One mini-batch's loss, gradient and batch-norm moments
/// ([`CpuReference::batch_step`]).
pub struct BatchStep {
    /// Mean cross-entropy over the batch's samples.
    pub loss: f64,
    /// Its gradient with respect to θ.
    pub grad: Vec<f64>,
    /// Per batch-norm node, in graph order.
    pub bn: Vec<BnMoments>,
}

/// A batch-norm node's batch statistics in one mini-batch.
pub struct BnMoments {
    /// Index into `Model::nodes`.
    pub node: usize,
    /// Indices into `Model::buffers`.
    pub running_mean: usize,
    pub running_var: usize,
    /// Elements per channel (samples × h × w).
    pub count: usize,
    /// Per channel: the mean and the biased variance Σ(x − μ)²/count.
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

fn add_into(dst: &mut Option<Vec<f64>>, src: Vec<f64>) {
    match dst {
        Some(d) => d.iter_mut().zip(&src).for_each(|(a, b)| *a += b),
        None => *dst = Some(src),
    }
}

impl CpuReference {
    /// The reference for a problem: any shape the model parser accepts
    /// (the float64 loops have no envelope; the GPU kernels do).
    pub fn new(problem: Problem) -> CpuReference {
        CpuReference {
            problem,
            relu_masks: None,
            frozen: None,
            cache: Mutex::default(),
        }
    }

    /// The reference for a problem, refused with [`Error::TooLarge`]
    /// naming the sizes when its passes need more memory than the host has
    /// available ([`CpuReference::host_bytes`], `MemAvailable`): a refusal
    /// before any work instead of an allocation failure (an abort) midway.
    pub fn checked(problem: Problem) -> Result<CpuReference> {
        let need = Self::host_bytes(&problem);
        if let Some(have) = crate::host::available_memory() {
            if need > have as u64 {
                let pr = &problem;
                return Err(Error::TooLarge(format!(
                    "the float64 reference needs about {} of host memory for model `{}` \
                     ({} parameters; {} of values per sample, each with its tangent and \
                     adjoint, in batches of {}), and the host has {} available",
                    crate::host::bytes_text(need),
                    pr.model.name,
                    pr.model.n_params,
                    crate::host::bytes_text(Self::values_per_sample(&pr.model) as u64 * 8),
                    pr.batch.min(pr.data.len()),
                    crate::host::bytes_text(have as u64),
                )));
            }
        }
        Ok(CpuReference::new(problem))
    }

    /// Floats every layer's output holds per sample, the input included.
    fn values_per_sample(model: &crate::model::Model) -> usize {
        model
            .nodes
            .iter()
            .map(|n| n.out_shape.numel())
            .fold(model.input.numel(), usize::saturating_add)
    }

    /// The peak memory of a pass with Hv, estimated: per value of a batch
    /// 3 float64s (its value, tangent and adjoint are live together; what
    /// layers save and the R-adjoints come and go: resnet20 in batches of
    /// 128 peaks at 1.87 GB resident, 2.7 floats per value, where this
    /// says 2.09 GB), plus θ, the gradient, Hv and v, plus the data set.
    /// The products' cache of forward states (`sweep`; about 3 float64s
    /// per value of every sample) is not counted: it takes at most half
    /// of what the host has left beyond this, and batches that do not fit
    /// are recomputed per product.
    pub fn host_bytes(problem: &Problem) -> u64 {
        let m = &problem.model;
        let n = problem.batch.min(problem.data.len()).max(1) as u64;
        let per_batch = (Self::values_per_sample(m) as u64)
            .saturating_mul(n)
            .saturating_mul(3 * 8);
        let params = (m.n_params as u64).saturating_mul(4 * 8);
        let data = (problem.data.x.len() as u64).saturating_mul(4);
        per_batch.saturating_add(params).saturating_add(data)
    }

    fn cx<'a>(
        &'a self,
        count: usize,
        mask: Option<&'a [bool]>,
        argmax: Option<&'a [u32]>,
        pieces: Option<&'a [u8]>,
    ) -> CpuCx<'a> {
        let pr = &self.problem;
        CpuCx {
            model: &pr.model,
            n: count,
            theta: &pr.weights.theta,
            buffers: &pr.weights.buffers,
            batch_mode: pr.bn == BnMode::Batch,
            mask,
            argmax,
            pieces,
            sync: None,
        }
    }

    /// One pass over every batch: loss, gradient, and Hv when `v` is given.
    pub fn pass(&self, v: Option<&[f64]>) -> Result<PassOutput> {
        let pr = &self.problem;
        let np = pr.model.n_params;
        if let Some(v) = v {
            if v.len() != np {
                return Err(Error::Invalid {
                    what: "direction v",
                    msg: format!("{} values for {np} parameters", v.len()),
                });
            }
        }
        let mut grad = vec![0.0; np];
        let mut hv = v.map(|_| vec![0.0; np]);
        let mut total = 0.0;
        let scale = 1.0 / pr.data.len() as f64;
        for (bi, (start, count)) in pr.data.batches(pr.batch).into_iter().enumerate() {
            let (l, _) = self.batch_pass(
                Some(bi),
                start,
                count,
                scale,
                v,
                &mut grad,
                hv.as_deref_mut(),
                None,
            );
            total += l;
        }
        if !total.is_finite() {
            return Err(Error::Numerical(format!(
                "the loss is {total}: the weights or data overflow in float64"
            )));
        }
        Ok(PassOutput {
            loss: total,
            grad,
            hv,
        })
    }

    /// The ReLU masks (input > 0) of every batch, per node.
    pub fn relu_mask_of(&self) -> Vec<Vec<Vec<bool>>> {
        let pr = &self.problem;
        pr.data
            .batches(pr.batch)
            .into_iter()
            .map(|(start, count)| {
                let (vals, _) = self.forward(None, start, count);
                pr.model
                    .nodes
                    .iter()
                    .map(|n| match n.op {
                        Op::Act(Activation::Relu) => {
                            vals[n.inputs[0]].iter().map(|x| *x > 0.0).collect()
                        }
                        _ => vec![],
                    })
                    .collect()
            })
            .collect()
    }

    /// The piecewise decisions of every batch at the current θ, per node
    /// ([`Decision::None`] for smooth ops), for [`CpuReference::frozen`].
    pub fn decisions(&self) -> Vec<Vec<Decision>> {
        self.decisions_tallied().0
    }

    /// [`CpuReference::decisions`] with their tally over the data (how
    /// many lie within float32 rounding of their threshold, per layer):
    /// one forward pass per batch, the batches on all cores (each batch's
    /// decisions are its own, so the result does not depend on the order).
    pub fn decisions_tallied(&self) -> (Vec<Vec<Decision>>, Tally) {
        let (d, t, _) = self.decisions_tallied_with(|_, _| ());
        (d, t)
    }

    /// [`CpuReference::decisions_tallied`], with `extra` of each batch's
    /// values (the input, then every node's output; `extra`'s second
    /// argument) from the same forward pass: what else a GPU engine takes
    /// from it (batch norm's float64 state, `layers::batchnorm::float64_state`).
    pub fn decisions_tallied_with<T: Send>(
        &self,
        extra: impl Fn(usize, &[Vec<f64>]) -> T + Sync,
    ) -> (Vec<Vec<Decision>>, Tally, Vec<T>) {
        use rayon::prelude::*;
        let pr = &self.problem;
        let per_batch: Vec<(Vec<Decision>, Tally, T)> = pr
            .data
            .batches(pr.batch)
            .into_par_iter()
            .map(|(start, count)| {
                let (vals, _) = self.forward(None, start, count);
                let cx = self.cx(count, None, None, None);
                let (d, t) = decisions::decide_batch(&cx, &pr.model, |ni| {
                    Some(vals[pr.model.nodes[ni].inputs[0]].as_slice())
                });
                (d, t, extra(count, &vals))
            })
            .collect();
        let mut tally = Tally::default();
        let mut out = Vec::with_capacity(per_batch.len());
        let mut extras = Vec::with_capacity(per_batch.len());
        for (d, t, e) in per_batch {
            tally.merge(t);
            out.push(d);
            extras.push(e);
        }
        (out, tally, extras)
    }

    /// Every value (the input, then each node's output) of samples
    /// `start..start + count`, decisions taken in float64.
    pub fn values(&self, start: usize, count: usize) -> Vec<Vec<f64>> {
        self.forward(None, start, count).0
    }

    /// Values and saved states of a batch; `bi` selects the forced
    /// decisions (frozen ones, else ReLU masks) of that batch.
    fn forward(
        &self,
        bi: Option<usize>,
        start: usize,
        count: usize,
    ) -> (Vec<Vec<f64>>, Vec<Saved>) {
        self.forward_with(bi, start, count, None)
    }

    /// [`CpuReference::forward`], batch norm's sums over workers with
    /// `sync` (`CpuCx::sync`).
    fn forward_with(
        &self,
        bi: Option<usize>,
        start: usize,
        count: usize,
        sync: Option<AllSum>,
    ) -> (Vec<Vec<f64>>, Vec<Saved>) {
        let pr = &self.problem;
        let d = pr.model.input.numel();
        let mut vals: Vec<Vec<f64>> = Vec::with_capacity(pr.model.nodes.len() + 1);
        vals.push(
            pr.data.x[start * d..(start + count) * d]
                .iter()
                .map(|&v| v as f64)
                .collect(),
        );
        let mut saved = Vec::with_capacity(pr.model.nodes.len());
        for (ni, node) in pr.model.nodes.iter().enumerate() {
            let frozen = match (&self.frozen, bi) {
                (Some(f), Some(bi)) => f.get(bi).and_then(|b| b.get(ni)),
                _ => None,
            };
            let pieces = match frozen {
                Some(Decision::Piece(p)) => Some(p.as_slice()),
                _ => None,
            };
            let (mask, argmax) = match frozen {
                Some(Decision::Mask(m)) => (Some(m.as_slice()), None),
                Some(Decision::Argmax(a)) => (None, Some(a.as_slice())),
                Some(Decision::Piece(_)) => (None, None),
                _ => match (&self.relu_masks, bi) {
                    (Some(m), Some(bi)) if !m[bi][ni].is_empty() => {
                        (Some(m[bi][ni].as_slice()), None)
                    }
                    _ => (None, None),
                },
            };
            let mut cx = self.cx(count, mask, argmax, pieces);
            cx.sync = sync;
            let xs: Vec<&[f64]> = node.inputs.iter().map(|&i| vals[i].as_slice()).collect();
            let (y, s) = layers::unit(&node.op).forward(&cx, node, &xs);
            vals.push(y);
            saved.push(s);
        }
        (vals, saved)
    }

    /// The logits of samples `start..start + count` (count × classes,
    /// row-major), batch norm in the problem's mode.
    pub fn logits(&self, start: usize, count: usize) -> Vec<f64> {
        let (mut vals, _) = self.forward(None, start, count);
        vals.pop().unwrap_or_default()
    }

    /// Mean cross-entropy and accuracy (fraction of samples whose largest
    /// logit, the first on ties, is the label; for a language model the
    /// fraction of predicted tokens) over the whole data set,
    /// forward passes only, batch by batch with the problem's BN mode (a
    /// PyTorch `model.eval()` evaluation is `BnMode::Running`).
    pub fn evaluate(&self) -> Result<(f64, f64)> {
        let pr = &self.problem;
        let n = pr.data.len();
        let scale = 1.0 / n as f64;
        let mut total = 0.0;
        let mut correct = 0.0;
        for (start, count) in pr.data.batches(pr.batch) {
            let z = self.logits(start, count);
            let (l, _, _) =
                next_token::forward_backward(&pr.model, &pr.data, start, count, &z, scale);
            total += l;
            correct += next_token::correct(&pr.model, &pr.data, start, count, &z);
        }
        if !total.is_finite() {
            return Err(Error::Numerical(format!(
                "the evaluation loss is {total}: the weights or data overflow in float64"
            )));
        }
        Ok((total, correct / n as f64))
    }

    /// One mini-batch of samples `start..start + count` as a training step
    /// sees it: the mean cross-entropy over its samples, that loss's
    /// gradient, and every batch-norm node's batch moments (batch mode
    /// only; empty in running mode). Forced decisions are not applied.
    pub fn batch_step(&self, start: usize, count: usize) -> Result<BatchStep> {
        finite_step(
            self.batch_step_part(start, count, count, None)?,
            start,
            count,
        )
    }

    /// One worker's part of a mini-batch of `total` samples spread over
    /// workers (data-parallel training, `crate::multi::train`): samples
    /// `start..start + count` are this worker's. The loss is this worker's
    /// Σℓ/total and the gradient its derivative, so the workers' parts sum
    /// to the mini-batch's mean loss and its gradient; batch norm
    /// normalises by the whole mini-batch's statistics, its per-channel
    /// sums summed over the workers by `sync` (None: the whole mini-batch
    /// is here, `count == total`), and the moments returned are the whole
    /// mini-batch's. The loss is not checked here (a non-finite part is
    /// seen in the sum by every worker alike).
    pub fn batch_step_part(
        &self,
        start: usize,
        count: usize,
        total: usize,
        sync: Option<AllSum>,
    ) -> Result<BatchStep> {
        let pr = &self.problem;
        if count == 0 || count > total || start + count > pr.data.len() {
            return Err(Error::Invalid {
                what: "batch size",
                msg: format!(
                    "samples {start}..{} of a data set of {}",
                    start + count,
                    pr.data.len()
                ),
            });
        }
        let mut grad = vec![0.0; pr.model.n_params];
        let (loss, saved) = self.batch_pass(
            None,
            start,
            count,
            1.0 / total as f64,
            None,
            &mut grad,
            None,
            sync,
        );
        let bn = pr
            .model
            .nodes
            .iter()
            .zip(&saved)
            .enumerate()
            .filter_map(|(ni, (n, s))| match n.op {
                Op::BatchNorm {
                    running_mean,
                    running_var,
                    ..
                } => layers::batchnorm::batch_moments(s).map(|(mean, var)| BnMoments {
                    node: ni,
                    running_mean,
                    running_var,
                    count: total * n.in_shape.spatial(),
                    mean: mean.to_vec(),
                    var: var.to_vec(),
                }),
                _ => None,
            })
            .collect();
        Ok(BatchStep { loss, grad, bn })
    }

    /// Loss of one batch (times `scale`), with its gradient (and Hv along
    /// `v`) added into `grad` (`hv`), and the nodes' saved states. `bi`
    /// selects the batch's forced decisions, if any.
    #[allow(clippy::too_many_arguments)]
    fn batch_pass(
        &self,
        bi: Option<usize>,
        start: usize,
        count: usize,
        scale: f64,
        v: Option<&[f64]>,
        grad: &mut [f64],
        mut hv: Option<&mut [f64]>,
        sync: Option<AllSum>,
    ) -> (f64, Vec<Saved>) {
        let pr = &self.problem;
        let nodes = &pr.model.nodes;
        let mut cx = self.cx(count, None, None, None);
        cx.sync = sync;
        let (vals, mut saved) = self.forward_with(bi, start, count, sync);

        // R-forward: the directional derivative of every value along v.
        let mut dvals: Vec<Vec<f64>> = Vec::new();
        if let Some(v) = v {
            dvals.push(vec![0.0; vals[0].len()]);
            for (ni, node) in nodes.iter().enumerate() {
                let dy = layers::unit(&node.op).r_forward(
                    &cx,
                    node,
                    &slices(&nodes[ni].inputs, &vals),
                    &slices(&nodes[ni].inputs, &dvals),
                    v,
                    &mut saved[ni],
                );
                dvals.push(dy);
            }
        }

        // Loss, its gradient and (with v) its R-gradient.
        let nv = vals.len();
        let (l, gz, p) =
            next_token::forward_backward(&pr.model, &pr.data, start, count, &vals[nv - 1], scale);
        let mut adj: Vec<Option<Vec<f64>>> = vec![None; nv];
        let mut radj: Vec<Option<Vec<f64>>> = vec![None; nv];
        adj[nv - 1] = Some(gz);
        if v.is_some() {
            radj[nv - 1] = Some(next_token::r_backward(
                &pr.model,
                count,
                &p,
                &dvals[nv - 1],
                scale,
            ));
        }

        // Backward and R-backward, node by node in reverse.
        for (ni, node) in nodes.iter().enumerate().rev() {
            let Some(gy) = adj[ni + 1].take() else {
                continue;
            };
            let unit = layers::unit(&node.op);
            let xs = slices(&node.inputs, &vals);
            let gxs = unit.backward(&cx, node, &xs, &saved[ni], &gy, grad);
            if let (Some(rgy), Some(hv), Some(v)) = (radj[ni + 1].take(), hv.as_deref_mut(), v) {
                let rgxs = unit.r_backward(
                    &cx,
                    node,
                    &xs,
                    &slices(&nodes[ni].inputs, &dvals),
                    &saved[ni],
                    &gy,
                    &rgy,
                    v,
                    hv,
                );
                for (&i, r) in node.inputs.iter().zip(rgxs) {
                    add_into(&mut radj[i], r);
                }
            }
            for (&i, g) in node.inputs.iter().zip(gxs) {
                add_into(&mut adj[i], g);
            }
        }
        (l, saved)
    }
}

/// The values (or tangents) a node reads.
fn slices<'v>(inputs: &[usize], of: &'v [Vec<f64>]) -> Vec<&'v [f64]> {
    inputs.iter().map(|&i| of[i].as_slice()).collect()
}

impl Curvature for CpuReference {
    fn n_params(&self) -> usize {
        self.problem.model.n_params
    }
    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        let o = self.pass(None)?;
        Ok((o.loss, o.grad))
    }
    /// Through [`CpuReference::hv_block`]: the batches' forward states are
    /// reused between products at one θ.
    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        check_out_len(out, self.problem.model.n_params)?;
        if let Some(hv) = self.hv_block(&[v])?.pop() {
            out.copy_from_slice(&hv);
        }
        Ok(())
    }
    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        self.product_block(crate::operator::Operator::Hessian, vs, outs)
    }
    /// H, G or E for every direction in one sweep
    /// ([`CpuReference::products`]).
    fn product_block(
        &mut self,
        op: crate::operator::Operator,
        vs: &[&[f64]],
        outs: &mut [Vec<f64>],
    ) -> Result<()> {
        if vs.len() != outs.len() {
            return Err(Error::Invalid {
                what: "output vectors",
                msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
            });
        }
        for out in outs.iter() {
            check_out_len(out, self.problem.model.n_params)?;
        }
        for (out, p) in outs.iter_mut().zip(self.products(vs, op)?) {
            *out = p;
        }
        Ok(())
    }
    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        let o = self.pass(Some(v))?;
        let hv = o.hv.unwrap_or_default();
        Ok((o.loss, o.grad, hv))
    }
    /// The reference takes every decision in float64 (its own, or frozen
    /// ones where set): the tally of its own at the current θ.
    fn decision_report(&mut self) -> Result<Option<DecisionReport>> {
        let t = std::time::Instant::now();
        let (_, tally) = self.decisions_tallied();
        let seconds = t.elapsed().as_secs_f64();
        Ok(tally
            .has_layers()
            .then(|| tally.report(&self.problem.model, DecisionSource::Float64, seconds)))
    }

    fn backend(&self) -> String {
        "cpu".into()
    }
    fn adapter(&self) -> String {
        "float64 reference".into()
    }
}

/// A training step's result, refused where its loss is not finite (one
/// worker's or the sum over data-parallel workers').
pub(crate) fn finite_step(st: BatchStep, start: usize, count: usize) -> Result<BatchStep> {
    if !st.loss.is_finite() {
        return Err(Error::Numerical(format!(
            "the loss of samples {start}..{} is {}: the weights or data overflow in float64",
            start + count,
            st.loss
        )));
    }
    Ok(st)
}

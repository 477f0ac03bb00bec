//! SGD training on the float64 reference, as PyTorch's
//! `torch.optim.SGD(model.parameters(), lr, momentum, weight_decay)`
//! (dampening 0, no Nesterov) with `MultiStepLR(milestones, gamma)` stepped
//! once per epoch, and batch norm in train mode.
//!
//! A step on a mini-batch B: the loss is the mean cross-entropy over B and
//! g = ∇L_B + wd·θ (weight decay on every trainable tensor); the momentum
//! buffer is g on the first step, else buf = momentum·buf + g (with
//! momentum 0 the buffer is g); θ −= lr·buf. Each batch-norm layer
//! normalises by B's statistics, and its running buffers move as
//! PyTorch's do: running_mean = 0.9·running_mean + 0.1·μ_B, running_var =
//! 0.9·running_var + 0.1·σ²_B·m/(m − 1) (the unbiased variance over the m
//! elements per channel), `num_batches_tracked` += 1.
//!
//! Epoch e (0-based) runs at lr·gamma^k, k the number of milestones ≤ e.
//! Mini-batches are consecutive slices of the data in its order, the last
//! possibly smaller; with shuffling, the data is first permuted per epoch
//! by [`permutation`]. With [`Augment::CropFlip`] every sample is then
//! padded, cropped and maybe flipped as [`crop_flip_draws`] says for its
//! epoch. With a Hessian-trace regulariser ([`Htr`]) a regularised step adds
//! γ·∇θ[(1/P) Σₖ vₖᵀ H_S vₖ] over its own mini-batch
//! ([`crate::trace_grad`]) to the gradient before weight decay and momentum.
//! Everything random is a function of the seed, the epoch and the step, so
//! a resumed run repeats an uninterrupted one bit for bit.

use crate::cpu::CpuReference;
use crate::data::Dataset;
use crate::engine::{BnMode, Problem};
use crate::error::{Error, Result};
use crate::model::{Model, Weights};
use crate::trace_grad::{trace_grad, trace_grad_on, LayerSet, Steps, TraceGrad};
use std::collections::HashMap;
use std::path::Path;

mod checkpoint;
mod guard;
mod htr;
mod recipe;
mod state_dict;
mod trajectory;
pub use checkpoint::{
    checkpoint_epochs, data_sha256, digest, latest_checkpoint, run_identity, save_checkpoint,
    sha256_hex, write_atomic, CheckpointMeta, FileDigest, Resumed, RunMeasures,
};
pub use guard::check_state;
pub use htr::{htr_probes, Htr, HtrStep, ProbeDist, StepGradient};
pub use recipe::{
    crop_flip, crop_flip_draws, permutation, samples, Augment, CropFlip, Recipe, CROP_PAD,
};
use recipe::{invalid, permuted};
use state_dict::running_means;
pub use state_dict::{initial_counts, save_state_dict};
pub use trajectory::TrainReport;

/// Batch norm's running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// One step as the progress display sees it.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// 0-based within the epoch, and the epoch's step count.
    pub index: usize,
    pub of: usize,
    /// Samples in this step's mini-batch.
    pub samples: usize,
    pub loss: f64,
}

/// What one epoch did.
#[derive(Clone, Debug)]
pub struct EpochResult {
    /// 0-based.
    pub epoch: usize,
    pub lr: f64,
    /// Each step's mini-batch loss, before its update.
    pub losses: Vec<f64>,
    /// The regulariser's estimate (1/P) Σ vᵀH_S v of each regularised step.
    pub htr: Vec<f64>,
    pub seconds: f64,
}

/// Training state: θ and the BN buffers (in the reference's problem), the
/// momentum buffer, `num_batches_tracked` and the steps taken.
pub struct Trainer {
    pub cpu: CpuReference,
    pub recipe: Recipe,
    /// The data in file order (the problem's copy is each epoch's order).
    data: Dataset,
    momentum_buf: Option<Vec<f64>>,
    /// `num_batches_tracked` per `Model::buffers` index of a running_mean.
    pub batches_tracked: Vec<i64>,
    pub steps: usize,
    /// Epochs finished.
    pub epoch: usize,
    /// Data augmentation (set before the first epoch).
    pub augment: Augment,
    /// The Hessian-trace regulariser and its layer set ([`Trainer::set_htr`]).
    htr: Option<(Htr, LayerSet)>,
    /// With [`Trainer::use_gpu`]: the steps run there, and θ, the BN
    /// buffers and the momentum buffer live on the device; the host's
    /// copies are refreshed by [`Trainer::sync`] (every epoch's end).
    gpu: Option<crate::gpu::trainer::GpuTrainer>,
    /// The device has taken steps the host copies do not show.
    gpu_ahead: bool,
    /// The regulariser's engines on the trainer's device, by mini-batch
    /// size: float32 products with held decisions (`trace_grad`).
    htr_engines: HashMap<usize, crate::gpu::GpuEngine>,
    /// The state_dict is saved as float32: every step also checks that θ
    /// and the running buffers stay finite in float32.
    pub f32_saved: bool,
    /// Data-parallel steps ([`Trainer::set_workers`]).
    workers: Option<crate::multi::train::Workers>,
    /// Data-parallel steps on GPU adapters ([`Trainer::set_gpu_workers`]).
    gpu_workers: Option<crate::multi::train_gpu::GpuWorkers>,
}

impl Trainer {
    /// `batches_tracked`: the counters to start from, per `Model::buffers`
    /// index (only running_mean entries are used); see [`initial_counts`].
    pub fn new(
        model: Model,
        weights: Weights,
        data: Dataset,
        batch: usize,
        recipe: Recipe,
        batches_tracked: Vec<i64>,
    ) -> Result<Trainer> {
        recipe.check()?;
        let problem = Problem::new(model, weights, data.clone(), batch, BnMode::Batch)?;
        Ok(Trainer {
            cpu: CpuReference::checked(problem)?,
            recipe,
            data,
            momentum_buf: None,
            batches_tracked,
            steps: 0,
            epoch: 0,
            augment: Augment::None,
            htr: None,
            gpu: None,
            gpu_ahead: false,
            htr_engines: HashMap::new(),
            f32_saved: false,
            workers: None,
            gpu_workers: None,
        })
    }

    /// Spread every mini-batch over `workers` from now on
    /// ([`crate::multi::train`]: batch norm synchronised, the gradients
    /// summed, one step; the float64 reference only). `flag` names the
    /// setting in errors (e.g. `--devices cpu,cpu`). Refused with a GPU
    /// trainer, with the Hessian-trace regulariser, and where a mini-batch
    /// has fewer samples than there are workers.
    pub fn set_workers(&mut self, workers: crate::multi::train::Workers, flag: &str) -> Result<()> {
        let refuse = |msg: &str| Error::Argument {
            flag: flag.into(),
            msg: msg.into(),
        };
        if self.gpu.is_some() || self.gpu_workers.is_some() {
            return Err(refuse(
                "data-parallel training runs on the float64 CPU engine (cpu); the GPU \
                 trainer runs on one adapter",
            ));
        }
        if self.htr.is_some() {
            return Err(refuse(
                "the Hessian-trace regulariser (--htr) trains on one worker; data-parallel \
                 training takes plain SGD steps",
            ));
        }
        let batches = self.data.batches(self.cpu.problem.batch);
        workers.check(&batches, self.cpu.problem.batch, flag)?;
        self.workers = Some(workers);
        Ok(())
    }

    /// Spread every mini-batch over GPU adapters from now on
    /// ([`crate::multi::train_gpu`]: float32 loss and gradient of each
    /// part, summed in float64, the step on the host in float64). Refused
    /// for a model with batch norm (naming the layer), with the GPU
    /// trainer, with the regulariser, and where a mini-batch has fewer
    /// samples than there are adapters.
    pub fn set_gpu_workers(
        &mut self,
        devices: &[crate::multi::DeviceSpec],
        flag: &str,
    ) -> Result<()> {
        if self.gpu.is_some() || self.workers.is_some() || self.htr.is_some() {
            return Err(Error::Argument {
                flag: flag.into(),
                msg: "GPU adapters train data-parallel alone: not beside the GPU trainer, \
                      float64 workers or the Hessian-trace regulariser (--htr)"
                    .into(),
            });
        }
        crate::multi::train_gpu::check_model(self.model(), flag)?;
        let batches = self.data.batches(self.cpu.problem.batch);
        crate::multi::train::Workers::Threads(devices.len()).check(
            &batches,
            self.cpu.problem.batch,
            flag,
        )?;
        let w = crate::multi::train_gpu::GpuWorkers::open(
            self.model(),
            self.weights(),
            self.data.shape,
            devices,
        )?;
        self.gpu_workers = Some(w);
        Ok(())
    }

    /// The data-parallel workers, if any.
    pub fn workers(&self) -> Option<crate::multi::train::Workers> {
        self.workers
    }

    /// Run the steps on a GPU from now on (after [`Trainer::restore`], or
    /// before the first step): θ, the BN running buffers and the momentum
    /// buffer are uploaded and stay on the device; each step reads back
    /// only its loss ([`crate::gpu::trainer`]). A regularised step computes
    /// its trace gradient there too ([`Trainer::gradient`] for the method),
    /// with float32 products ([`Steps::for_f32`]) on an engine sharing the
    /// device, and adds it to the gradient on the device.
    pub fn use_gpu(&mut self, ctx: crate::gpu::GpuContext) -> Result<()> {
        if self.workers.is_some() || self.gpu_workers.is_some() {
            return Err(invalid(
                "backend",
                "the GPU trainer runs on one adapter, not beside data-parallel workers",
            ));
        }
        self.htr_engines.clear();
        let max_count = self.cpu.problem.batch.min(self.data.len()).max(1);
        let g = crate::gpu::trainer::GpuTrainer::new(
            ctx,
            self.model(),
            self.weights(),
            self.momentum_buf.as_deref(),
            max_count,
        )?;
        self.gpu = Some(g);
        self.gpu_ahead = false;
        Ok(())
    }

    /// The GPU the steps run on, if any.
    pub fn gpu(&self) -> Option<&crate::gpu::GpuContext> {
        self.gpu.as_ref().map(|g| g.context())
    }

    /// Reads θ, the BN running buffers and the momentum buffer back from
    /// the GPU into the host copies ([`Trainer::weights`],
    /// [`Trainer::momentum_buffer`]) when the device is ahead.
    pub fn sync(&mut self) -> Result<()> {
        if let (Some(g), true) = (&self.gpu, self.gpu_ahead) {
            let (w, m) = g.state()?;
            self.cpu.problem.weights = w;
            self.momentum_buf = Some(m);
            self.gpu_ahead = false;
        }
        Ok(())
    }

    /// Turn the Hessian-trace regulariser on (or off with None).
    pub fn set_htr(&mut self, htr: Option<Htr>) -> Result<()> {
        self.htr = match htr {
            Some(_) if self.workers.is_some() || self.gpu_workers.is_some() => {
                return Err(invalid(
                    "htr",
                    "the Hessian-trace regulariser trains on one worker, not data-parallel",
                ))
            }
            Some(h) => {
                let set = h.check(self.model())?;
                Some((h, set))
            }
            None => None,
        };
        Ok(())
    }

    pub fn htr(&self) -> Option<&Htr> {
        self.htr.as_ref().map(|(h, _)| h)
    }

    /// The momentum buffer (None before the first step).
    pub fn momentum_buffer(&self) -> Option<&[f64]> {
        self.momentum_buf.as_deref()
    }

    /// Continue from a checkpoint: `epoch` epochs and `steps` steps done,
    /// with that point's momentum buffer (the weights and counters are
    /// given to [`Trainer::new`]).
    pub fn restore(
        &mut self,
        epoch: usize,
        steps: usize,
        momentum: Option<Vec<f64>>,
    ) -> Result<()> {
        if let Some(m) = &momentum {
            if m.len() != self.model().n_params {
                return Err(invalid(
                    "resume",
                    format!(
                        "a momentum buffer of {} values for {} parameters",
                        m.len(),
                        self.model().n_params
                    ),
                ));
            }
        }
        self.epoch = epoch;
        self.steps = steps;
        self.momentum_buf = momentum;
        if let Some(g) = &mut self.gpu {
            g.upload(&self.cpu.problem.weights, self.momentum_buf.as_deref())?;
            self.gpu_ahead = false;
        }
        Ok(())
    }

    pub fn model(&self) -> &Model {
        &self.cpu.problem.model
    }
    pub fn weights(&self) -> &Weights {
        &self.cpu.problem.weights
    }

    /// The regulariser's probes for the next step ([`htr_probes`] of this
    /// run's seed, epoch and step count).
    fn step_probes(&self, h: &Htr, set: &LayerSet) -> Result<Vec<Vec<f64>>> {
        htr_probes(
            &self.cpu.problem.model,
            set,
            h.probes,
            h.dist,
            self.recipe.seed,
            self.epoch,
            self.steps,
        )
    }

    /// The parts of the next step's gradient on samples `start..start +
    /// count` of the problem's current order, at the current weights: the
    /// mini-batch loss and gradient, and on a regularised step the trace
    /// estimate and its gradient over the same mini-batch (the probes of
    /// [`htr_probes`] for this epoch and step).
    pub fn gradient(&self, start: usize, count: usize) -> Result<StepGradient> {
        let st = match (&self.workers, &self.gpu_workers) {
            (Some(w), _) => crate::multi::train::step(&self.cpu, w, start, count)?,
            (None, Some(g)) => {
                let pr = &self.cpu.problem;
                let (loss, grad) = g.loss_grad(&pr.data, start, count, &pr.weights.theta)?;
                if !loss.is_finite() {
                    return Err(Error::Numerical(format!(
                        "the loss of samples {start}..{} is {loss} on the GPU workers",
                        start + count
                    )));
                }
                crate::cpu::BatchStep {
                    loss,
                    grad,
                    bn: vec![],
                }
            }
            (None, None) => self.cpu.batch_step(start, count)?,
        };
        let htr = match &self.htr {
            Some((h, set)) if h.active(self.epoch, self.steps) => {
                let pr = &self.cpu.problem;
                let probes = self.step_probes(h, set)?;
                let mini = Problem::new(
                    pr.model.clone(),
                    pr.weights.clone(),
                    samples(&pr.data, start, count),
                    count,
                    BnMode::Batch,
                )?;
                let t = trace_grad_on(mini, &probes, Steps::default())?;
                Some(HtrStep {
                    estimate: t.estimate,
                    grad: t.grad,
                    probes,
                })
            }
            _ => None,
        };
        Ok(StepGradient {
            loss: st.loss,
            data_grad: st.grad,
            htr,
            bn: st.bn,
        })
    }

    /// One SGD step on samples `start..start + count` of the problem's
    /// current order: the mini-batch loss before the update, and the
    /// regulariser's estimate on a regularised step.
    pub fn step(&mut self, start: usize, count: usize, lr: f64) -> Result<(f64, Option<f64>)> {
        if self.gpu.is_some() {
            return self.gpu_step(start, count, lr);
        }
        let st = self.gradient(start, count)?;
        let gamma = self.htr.as_ref().map_or(0.0, |(h, _)| h.gamma);
        let r = &self.recipe;
        let w = &mut self.cpu.problem.weights;
        // Batch norm's running statistics (the forward of this step).
        for b in &st.bn {
            let m = b.count as f64;
            let unbias = m / (m - 1.0);
            for (rm, mu) in w.buffers[b.running_mean].iter_mut().zip(&b.mean) {
                *rm = (1.0 - BN_MOMENTUM) * *rm + BN_MOMENTUM * mu;
            }
            for (rv, v) in w.buffers[b.running_var].iter_mut().zip(&b.var) {
                *rv = (1.0 - BN_MOMENTUM) * *rv + BN_MOMENTUM * (v * unbias);
            }
            self.batches_tracked[b.running_mean] += 1;
        }
        // g = ∇L (+ γ·∇trace) + wd·θ; buf = g, then momentum·buf + g; θ −= lr·buf.
        let g = st.total(gamma, r.weight_decay, &w.theta);
        let buf = match self.momentum_buf.take() {
            Some(mut b) if r.momentum != 0.0 => {
                b.iter_mut()
                    .zip(&g)
                    .for_each(|(bi, gi)| *bi = r.momentum * *bi + gi);
                b
            }
            _ => g,
        };
        w.theta.iter_mut().zip(&buf).for_each(|(t, b)| *t -= lr * b);
        self.momentum_buf = Some(buf);
        self.steps += 1;
        Ok((st.loss, st.htr.map(|h| h.estimate)))
    }

    /// The regulariser's trace gradient for a step on the samples from
    /// `start` (`count` of them) on the GPU, at θ as on the device:
    /// [`Trainer::gradient`]'s term with float32 products.
    fn gpu_trace_grad(&mut self, start: usize, count: usize) -> Result<Option<TraceGrad>> {
        let (Some((h, set)), Some(g)) = (&self.htr, &self.gpu) else {
            return Ok(None);
        };
        if !h.active(self.epoch, self.steps) {
            return Ok(None);
        }
        let pr = &self.cpu.problem;
        let probes = self.step_probes(h, set)?;
        let theta = g.theta()?;
        let mini = samples(&pr.data, start, count);
        let engine = match self.htr_engines.entry(count) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let e = e.into_mut();
                e.set_samples(&mini.x, &mini.y)?;
                e.set_theta(&theta)?;
                e
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                let weights = Weights {
                    theta,
                    buffers: pr.weights.buffers.clone(),
                };
                let problem = Problem::new(pr.model.clone(), weights, mini, count, BnMode::Batch)?;
                // Held float32 decisions: float64 ones would add a
                // float64 forward pass on the host to every regularised
                // step (`trace-grad` on a fixed θ takes them).
                let options = crate::gpu::EngineOptions {
                    frozen: true,
                    block: Some(1),
                    decisions: crate::decisions::DecisionSource::Float32,
                    ..Default::default()
                };
                v.insert(crate::gpu::GpuEngine::with_options(
                    g.context().share(),
                    &problem,
                    options,
                )?)
            }
        };
        let t = trace_grad(engine, &probes, Steps::for_f32())?;
        Ok(Some(t))
    }

    /// [`Trainer::step`] on the GPU: the same update in float32 there.
    fn gpu_step(&mut self, start: usize, count: usize, lr: f64) -> Result<(f64, Option<f64>)> {
        let htr = self.gpu_trace_grad(start, count)?;
        let gamma = self.htr.as_ref().map_or(0.0, |(h, _)| h.gamma);
        let extra: Option<Vec<f64>> = htr
            .as_ref()
            .map(|t| t.grad.iter().map(|x| gamma * x).collect());
        let r = &self.recipe;
        let s = crate::gpu::trainer::SgdStep {
            lr,
            momentum: r.momentum,
            weight_decay: r.weight_decay,
            first: r.momentum == 0.0 || (self.momentum_buf.is_none() && !self.gpu_ahead),
            bn_momentum: BN_MOMENTUM,
        };
        let data = &self.cpu.problem.data;
        let d = data.shape.numel();
        let x = &data.x[start * d..(start + count) * d];
        let y = &data.y[start..start + count];
        let g = self.gpu.as_mut().expect("a GPU trainer");
        let loss = g.step_with(x, y, s, extra.as_deref())?;
        self.gpu_ahead = true;
        for rm in running_means(&self.cpu.problem.model) {
            self.batches_tracked[rm] += 1;
        }
        self.steps += 1;
        Ok((loss, htr.map(|t| t.estimate)))
    }

    /// The next epoch: its order, its steps.
    pub fn epoch(&mut self) -> Result<EpochResult> {
        self.epoch_with(|_| {})
    }

    /// The next epoch, calling `on_step` after each step.
    pub fn epoch_with(&mut self, mut on_step: impl FnMut(&StepInfo)) -> Result<EpochResult> {
        let t0 = std::time::Instant::now();
        let e = self.epoch;
        let lr = self.recipe.lr_at(e);
        let draws = match self.augment {
            Augment::CropFlip => Some(crop_flip_draws(self.data.len(), self.recipe.seed, e)),
            Augment::None => None,
        };
        if self.recipe.shuffle || draws.is_some() {
            let perm = if self.recipe.shuffle {
                permutation(self.data.len(), self.recipe.seed, e)
            } else {
                (0..self.data.len()).collect()
            };
            self.cpu.problem.data = permuted(&self.data, &perm, draws.as_deref());
        }
        let batches = self.cpu.problem.data.batches(self.cpu.problem.batch);
        let mut losses = Vec::with_capacity(batches.len());
        let mut htr = vec![];
        let of = batches.len();
        for (index, (start, count)) in batches.into_iter().enumerate() {
            let run_step = self.steps + 1;
            let at = |tensor: &str, msg: String| Error::Diverged {
                epoch: e + 1,
                step: index + 1,
                steps_in_epoch: of,
                run_step,
                tensor: tensor.into(),
                msg,
            };
            let (loss, h) = match self.step(start, count, lr) {
                Ok(r) => r,
                Err(Error::Numerical(m)) => {
                    let tensor = if m.contains("regulariser") {
                        "regulariser gradient"
                    } else {
                        "loss"
                    };
                    return Err(at(tensor, format!("is not finite ({m})")));
                }
                Err(other) => return Err(other),
            };
            if let Some((tensor, msg)) = self.check_step(loss) {
                return Err(at(&tensor, msg));
            }
            losses.push(loss);
            htr.extend(h);
            on_step(&StepInfo {
                index,
                of,
                samples: count,
                loss,
            });
        }
        self.sync()?;
        // On a GPU the device checks θ and the momentum buffer after every
        // step (`GpuTrainer::nonfinite_state`); the copies read back at the
        // epoch's end are checked once more on the host.
        if self.gpu.is_some() {
            if let Some((tensor, msg)) =
                check_state(self.model(), self.weights(), self.momentum_buffer(), false)
            {
                return Err(Error::Diverged {
                    epoch: e + 1,
                    step: of,
                    steps_in_epoch: of,
                    run_step: self.steps,
                    tensor,
                    msg: format!("{msg} (read back from the device at the epoch's end)"),
                });
            }
        }
        self.epoch += 1;
        Ok(EpochResult {
            epoch: e,
            lr,
            losses,
            htr,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// What is wrong after a step whose mini-batch loss was `loss`, as
    /// (tensor, why): the loss; on the reference θ, the momentum buffer
    /// and the running buffers ([`check_state`]); on a GPU θ and the
    /// momentum buffer as the device checked them, and the running buffers
    /// the step read back.
    fn check_step(&self, loss: f64) -> Option<(String, String)> {
        if !loss.is_finite() {
            return Some(("loss".into(), format!("is {loss}")));
        }
        match &self.gpu {
            Some(g) => g
                .nonfinite_state()
                .or_else(|| g.nonfinite_running())
                .map(|(name, i, v)| (name, format!("element {i} is {v} (float32 on the device)"))),
            None => check_state(
                self.model(),
                self.weights(),
                self.momentum_buffer(),
                self.f32_saved,
            ),
        }
    }

    /// The training data in file order, unaugmented.
    pub fn data(&self) -> &Dataset {
        &self.data
    }

    /// The whole state_dict: trainable tensors, BN running buffers and
    /// `num_batches_tracked` (int64 scalars), by PyTorch's names; floats
    /// as float32 (PyTorch's usual state_dict) or float64.
    pub fn save(&self, path: &Path, f64_out: bool) -> Result<()> {
        save_state_dict(
            self.model(),
            self.weights(),
            &self.batches_tracked,
            path,
            f64_out,
        )
    }
}

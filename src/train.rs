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

use crate::cpu::{BnMoments, CpuReference};
use crate::data::Dataset;
use crate::engine::{BnMode, Problem};
use crate::error::{Error, Result};
use crate::model::{params, tensorio, Model, Op, Shape, Weights};
use crate::trace_grad::{trace_grad, trace_grad_on, LayerSet, Steps, TraceGrad};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

mod checkpoint;
mod guard;
pub use checkpoint::{
    checkpoint_epochs, data_sha256, digest, latest_checkpoint, run_identity, save_checkpoint,
    sha256_hex, write_atomic, CheckpointMeta, FileDigest, Resumed, RunMeasures,
};
pub use guard::check_state;

/// Batch norm's running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// The optimiser and schedule.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recipe {
    pub epochs: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Epochs (1-based counts of finished epochs) after which lr is
    /// multiplied by `lr_gamma`; strictly increasing, each ≥ 1.
    pub milestones: Vec<usize>,
    pub lr_gamma: f64,
    /// A permutation of the data per epoch from `seed`; else file order.
    pub shuffle: bool,
    pub seed: u64,
}

fn invalid(what: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        msg: msg.into(),
    }
}

impl Recipe {
    pub fn check(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(invalid("epochs", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid(
                "learning rate",
                format!("{} is not a finite positive number", self.lr),
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(invalid(
                "momentum",
                format!("{} is not in [0, 1)", self.momentum),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight decay",
                format!("{} is not a finite number ≥ 0", self.weight_decay),
            ));
        }
        if !(self.lr_gamma.is_finite() && self.lr_gamma > 0.0) {
            return Err(invalid(
                "learning-rate gamma",
                format!("{} is not a finite positive number", self.lr_gamma),
            ));
        }
        if self.milestones.first() == Some(&0) {
            return Err(invalid(
                "milestones",
                "epochs are counted from 1: a milestone is at least 1",
            ));
        }
        if self.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(
                "milestones",
                format!("{:?} is not strictly increasing", self.milestones),
            ));
        }
        Ok(())
    }

    /// The learning rate of epoch `e` (0-based).
    pub fn lr_at(&self, e: usize) -> f64 {
        let k = self.milestones.iter().filter(|&&m| m <= e).count();
        self.lr * self.lr_gamma.powi(k as i32)
    }
}

/// The sample order of epoch `epoch` (0-based) under `seed`: 0..n shuffled
/// by rand's `SliceRandom::shuffle` (Fisher–Yates) with `StdRng` (rand 0.9,
/// ChaCha12) seeded by `seed_from_u64(seed ^ 0x7472_6169_6e00_0000 ^
/// epoch·0x9E37_79B9_7F4A_7C15)`, a fresh generator per epoch, so any
/// epoch's order depends only on the seed and the epoch.
pub fn permutation(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let s = seed ^ 0x7472_6169_6e00_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut rng);
    p
}

/// Data augmentation applied to the training samples each epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// The samples as they are.
    #[default]
    None,
    /// torchvision's `RandomCrop(H×W, padding=4)` (zero padding) then
    /// `RandomHorizontalFlip(0.5)`, per sample and epoch ([`crop_flip_draws`]).
    CropFlip,
}

/// Zero padding on each side before the random crop.
pub const CROP_PAD: usize = 4;

impl Augment {
    /// Whether it applies to samples of `shape`: a crop of an image with
    /// H or W ≤ [`CROP_PAD`] (a flat input is 1×1) can hold no pixel of
    /// it, only padding.
    pub fn check(&self, shape: Shape) -> Result<()> {
        if *self == Augment::CropFlip && (shape.h <= CROP_PAD || shape.w <= CROP_PAD) {
            return Err(invalid(
                "augment",
                format!(
                    "crop-flip pads {CROP_PAD} zeros on each side and crops an H×W window: \
                     on {}×{}×{} samples{} a crop can hold nothing of the image",
                    shape.c,
                    shape.h,
                    shape.w,
                    if shape.h == 1 && shape.w == 1 {
                        " (a flat input)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(())
    }
}

/// One sample's crop and flip: the crop's top-left corner in the padded
/// image (`dy`, `dx` in 0..=2·[`CROP_PAD`]; 4, 4 is the original window)
/// and whether it is then mirrored left-right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
}

/// The crop and flip of each of `n` samples (indexed in file order) in
/// epoch `epoch` (0-based): `StdRng::seed_from_u64(seed ^ 0x6175_676d_0000_0000
/// ^ epoch·0xD1B5_4A32_D192_ED03)`, per sample in file order dy, dx uniform
/// in 0..=8 (`random_range`), then flip = `random::<bool>()` (probability
/// 1/2), as torchvision draws the crop before the flip. A sample's draw
/// depends on the seed, the epoch and its index only, not on the order the
/// epoch visits it in.
pub fn crop_flip_draws(n: usize, seed: u64, epoch: usize) -> Vec<CropFlip> {
    let s = seed ^ 0x6175_676d_0000_0000 ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    (0..n)
        .map(|_| {
            let dy = rng.random_range(0..=2 * CROP_PAD);
            let dx = rng.random_range(0..=2 * CROP_PAD);
            CropFlip {
                dy,
                dx,
                flip: rng.random::<bool>(),
            }
        })
        .collect()
}

/// One C×H×W image cropped and flipped: out[c][y][x] = padded[c][y+dy][x'+dx]
/// with x' = W−1−x when flipped (else x), where the padded image is the
/// input with [`CROP_PAD`] zeros on every side (so padded[y][x] =
/// img[y−4][x−4] inside, 0 outside).
pub fn crop_flip(img: &[f32], shape: Shape, t: CropFlip, out: &mut [f32]) {
    let (h, w) = (shape.h as isize, shape.w as isize);
    let pad = CROP_PAD as isize;
    for c in 0..shape.c {
        let plane = &img[c * shape.spatial()..(c + 1) * shape.spatial()];
        let dst = &mut out[c * shape.spatial()..(c + 1) * shape.spatial()];
        for y in 0..h {
            let sy = y + t.dy as isize - pad;
            for x in 0..w {
                let xs = if t.flip { w - 1 - x } else { x };
                let sx = xs + t.dx as isize - pad;
                dst[(y * w + x) as usize] = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                    plane[(sy * w + sx) as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Which Hutchinson probes the regulariser draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeDist {
    /// ±1 entries: the lower-variance Hutchinson estimator (see [`Htr`]).
    #[default]
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

/// The Hessian-trace regulariser of Sankar et al.: on a regularised step
/// the gradient gains γ·∇θ[(1/P) Σₖ vₖᵀ H_S vₖ], H_S the Hessian's diagonal
/// block over the layer set S of the step's own mini-batch loss (batch
/// norm on the mini-batch's statistics, as the step's forward), the vₖ
/// drawn by [`htr_probes`] for that step, zero outside S.
///
/// Rademacher probes by default: for a symmetric A the Hutchinson
/// estimate zᵀAz has variance 2(‖A‖²_F − Σᵢ A²ᵢᵢ) with Rademacher z and
/// 2‖A‖²_F with Gaussian z (E z⁴ = 1 against 3), so Rademacher is never
/// worse and removes the diagonal's share entirely; with P = 1 probe per
/// step that variance is the noise the regulariser injects. It is also
/// what PyHessian's trace (and `hesscope trace`/`trace-grad`) use.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Htr {
    /// γ, the regulariser's weight.
    pub gamma: f64,
    /// The layer set S (`all`, `middle`, module names; [`LayerSet::parse`]).
    pub layers: String,
    /// Probes P per regularised step.
    pub probes: usize,
    /// A step is regularised when the steps taken before it are a
    /// multiple of `every` (counted over the whole run) ...
    pub every: usize,
    /// ... and at least `from_epoch` epochs have finished (0: from the
    /// first step).
    pub from_epoch: usize,
    pub dist: ProbeDist,
}

impl Htr {
    pub fn check(&self, model: &Model) -> Result<LayerSet> {
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(invalid(
                "htr gamma",
                format!("{} is not a finite number ≥ 0", self.gamma),
            ));
        }
        if self.probes == 0 {
            return Err(invalid("htr probes", "must be at least 1"));
        }
        if self.every == 0 {
            return Err(invalid("htr every", "must be at least 1"));
        }
        LayerSet::parse(model, &self.layers)
    }

    /// Whether step `step` (0-based over the run) of epoch `epoch`
    /// (0-based) is regularised.
    pub fn active(&self, epoch: usize, step: usize) -> bool {
        epoch >= self.from_epoch && step.is_multiple_of(self.every)
    }
}

/// The probes of step `step` (0-based over the run) in epoch `epoch`
/// (0-based): [`LayerSet::rademacher`] or [`LayerSet::gaussian`] seeded by
/// `seed ^ 0x4854_5200_0000_0000 ^ (epoch+1)·0x9E37_79B9_7F4A_7C15 ^
/// (step+1)·0xC2B2_AE3D_27D4_EB4F`.
pub fn htr_probes(
    model: &Model,
    set: &LayerSet,
    count: usize,
    dist: ProbeDist,
    seed: u64,
    epoch: usize,
    step: usize,
) -> Result<Vec<Vec<f64>>> {
    let s = seed
        ^ 0x4854_5200_0000_0000
        ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    match dist {
        ProbeDist::Rademacher => set.rademacher(model, count, s),
        ProbeDist::Gaussian => set.gaussian(model, count, s),
    }
}

/// Samples `start..start + count` of a data set, as a data set.
pub fn samples(data: &Dataset, start: usize, count: usize) -> Dataset {
    let d = data.shape.numel();
    Dataset {
        x: data.x[start * d..(start + count) * d].to_vec(),
        y: data.y[start..start + count].to_vec(),
        shape: data.shape,
        source: data.source.clone(),
    }
}

/// The data set with its samples in the order `perm`, each augmented by
/// `draws[j]` (indexed by the sample's file position j) when given.
fn permuted(data: &Dataset, perm: &[usize], draws: Option<&[CropFlip]>) -> Dataset {
    let d = data.shape.numel();
    let mut out = data.clone();
    for (i, &j) in perm.iter().enumerate() {
        let src = &data.x[j * d..(j + 1) * d];
        let dst = &mut out.x[i * d..(i + 1) * d];
        match draws {
            Some(t) => crop_flip(src, data.shape, t[j], dst),
            None => dst.copy_from_slice(src),
        }
        out.y[i] = data.y[j];
    }
    out
}

/// The regulariser's part of one step.
#[derive(Clone, Debug)]
pub struct HtrStep {
    /// (1/P) Σₖ vₖᵀ H_S vₖ on the mini-batch.
    pub estimate: f64,
    /// Its gradient ∇θ (not yet multiplied by γ).
    pub grad: Vec<f64>,
    pub probes: Vec<Vec<f64>>,
}

/// What a step's update is made of.
pub struct StepGradient {
    /// The mini-batch's mean cross-entropy.
    pub loss: f64,
    /// Its gradient ∇L_B.
    pub data_grad: Vec<f64>,
    /// On a regularised step.
    pub htr: Option<HtrStep>,
    /// Per batch-norm node, the mini-batch's moments.
    pub bn: Vec<BnMoments>,
}

impl StepGradient {
    /// g = ∇L_B + γ·∇θ(trace estimate) + wd·θ: what momentum and the
    /// learning rate act on.
    pub fn total(&self, gamma: f64, weight_decay: f64, theta: &[f64]) -> Vec<f64> {
        let mut g = self.data_grad.clone();
        if let Some(h) = &self.htr {
            g.iter_mut()
                .zip(&h.grad)
                .for_each(|(gi, t)| *gi += gamma * t);
        }
        if weight_decay != 0.0 {
            g.iter_mut()
                .zip(theta)
                .for_each(|(gi, t)| *gi += weight_decay * t);
        }
        g
    }
}

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
            cpu: CpuReference::new(problem),
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
        })
    }

    /// Run the steps on a GPU from now on (after [`Trainer::restore`], or
    /// before the first step): θ, the BN running buffers and the momentum
    /// buffer are uploaded and stay on the device; each step reads back
    /// only its loss ([`crate::gpu::trainer`]). A regularised step computes
    /// its trace gradient there too ([`Trainer::gradient`] for the method),
    /// with float32 products ([`Steps::for_f32`]) on an engine sharing the
    /// device, and adds it to the gradient on the device.
    pub fn use_gpu(&mut self, ctx: crate::gpu::GpuContext) -> Result<()> {
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
        let st = self.cpu.batch_step(start, count)?;
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
        // On a GPU θ and the momentum buffer are read back (and checked)
        // at the epoch's end only: a non-finite one there makes the next
        // step's loss non-finite, but the last step's would go unseen.
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
    /// and the running buffers ([`check_state`]); on a GPU the running
    /// buffers the step read back (θ and momentum at the epoch's end).
    fn check_step(&self, loss: f64) -> Option<(String, String)> {
        if !loss.is_finite() {
            return Some(("loss".into(), format!("is {loss}")));
        }
        match &self.gpu {
            Some(g) => g
                .nonfinite_running()
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

/// The BN module name of a running_mean buffer (`block1.bn1`).
fn bn_module(model: &Model, buffer: usize) -> Option<&str> {
    model.buffers[buffer].name.strip_suffix(".running_mean")
}

/// The indices of the running_mean buffers of the model's BN nodes.
fn running_means(model: &Model) -> Vec<usize> {
    model
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::BatchNorm { running_mean, .. } => Some(running_mean),
            _ => None,
        })
        .collect()
}

/// `num_batches_tracked` per buffer index from a state_dict file (0 where
/// the file has none, or without a file).
pub fn initial_counts(model: &Model, weights: Option<&Path>) -> Result<Vec<i64>> {
    let mut out = vec![0; model.buffers.len()];
    let Some(path) = weights else {
        return Ok(out);
    };
    let file = tensorio::File::open(path)?;
    for rm in running_means(model) {
        let Some(module) = bn_module(model, rm) else {
            continue;
        };
        let name = format!("{module}.num_batches_tracked");
        if file.layout().contains_key(&name) {
            let t = file.tensor(&name)?;
            match t.data.as_slice() {
                [v] if *v >= 0.0 && v.fract() == 0.0 => out[rm] = *v as i64,
                _ => {
                    return Err(Error::Invalid {
                        what: "weights",
                        msg: format!("{name} is not one non-negative integer"),
                    })
                }
            }
        }
    }
    Ok(out)
}

/// Write a whole state_dict (see [`Trainer::save`]).
pub fn save_state_dict(
    model: &Model,
    w: &Weights,
    batches_tracked: &[i64],
    path: &Path,
    f64_out: bool,
) -> Result<()> {
    let mut floats = params::named(model, &w.theta);
    for (b, vals) in model.buffers.iter().zip(&w.buffers) {
        floats.push((b.name.clone(), vec![b.len], vals.clone()));
    }
    // Never a non-finite state_dict (the steps' checks stop a run first).
    for (n, _, v) in &floats {
        if let Some(m) = guard::check_tensor(n, v, !f64_out) {
            return Err(Error::Numerical(format!(
                "not writing {}: {m}",
                path.display()
            )));
        }
    }
    let counts: Vec<(String, [i64; 1])> = running_means(model)
        .into_iter()
        .filter_map(|rm| {
            bn_module(model, rm)
                .map(|m| (format!("{m}.num_batches_tracked"), [batches_tracked[rm]]))
        })
        .collect();
    let mut t: Vec<(&str, &[usize], tensorio::Values)> = floats
        .iter()
        .map(|(n, s, d)| {
            let v = if f64_out {
                tensorio::Values::F64(d)
            } else {
                tensorio::Values::F32(d)
            };
            (n.as_str(), s.as_slice(), v)
        })
        .collect();
    for (n, c) in &counts {
        t.push((n.as_str(), &[], tensorio::Values::I64(c)));
    }
    tensorio::write(path, &t)
}

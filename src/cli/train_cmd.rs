//! `hesscope train`: SGD as PyTorch's, on the float64 reference
//! (`hesscope::train`), writing the final state_dict, a checkpoint per
//! epoch, `trajectory.json` and its plots; optionally the Hessian's
//! curvature along the way (`hesscope::snapshot`), data augmentation and
//! the Hessian-trace regulariser.

use crate::cli::common::{backend_flag, Backend, BnArg, Inputs};
use crate::cli::output::notice;
use crate::cli::spectral_cmds::{
    BasisArgs, BasisOn, SweepArgs, MAX_GRID, MAX_PROBES, MAX_RUNS, MAX_STEPS,
};
use crate::cli::train_guard;
use crate::cli::train_measures::{describe_curvature, describe_epoch, Measures};
use crate::cli::train_plots::write_trajectory;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use hesscope::data::Dataset;
use hesscope::device::Need;
use hesscope::report::{EpochRecord, Exporter, HtrRecord, StartRecord};
use hesscope::snapshot::SnapshotSettings;
use hesscope::spectral::slq;
use hesscope::trace_grad::LayerSet;
use hesscope::train::TrainReport;
use hesscope::train::{
    initial_counts, latest_checkpoint, run_identity, save_checkpoint, Augment, CheckpointMeta,
    FileDigest, Htr, ProbeDist, Recipe, RunMeasures, StepInfo, Trainer,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// `--augment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AugmentArg {
    /// The samples as they are.
    None,
    /// Zero-pad 4, random H×W crop, horizontal flip with probability 1/2,
    /// per sample and epoch from --seed (torchvision's RandomCrop +
    /// RandomHorizontalFlip).
    CropFlip,
}

/// `--htr-probe-dist`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProbeDistArg {
    /// ±1 entries (lower variance: 2(‖A‖²_F − Σ A²ᵢᵢ) against 2‖A‖²_F).
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

/// How the Hessian is measured along the run.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Curvature along training")]
pub struct SpectrumArgs {
    /// Measure the Hessian every E epochs, and always before the first and
    /// after the last (0: only there). Without it, none is measured.
    #[arg(long, value_name = "E", allow_hyphen_values = true)]
    pub spectrum_every: Option<usize>,
    /// The fixed subset the Hessian is taken over: the first N training
    /// samples in file order, unaugmented (capped at the data's size), in
    /// batches of --batch.
    #[arg(long, default_value_t = 1024, allow_hyphen_values = true)]
    pub hessian_samples: usize,
    /// Batch norm in the Hessian's loss: the batches' own statistics
    /// (train mode) or the running buffers (eval mode).
    #[arg(long, value_enum, default_value_t = BnArg::Batch)]
    pub hessian_bn: BnArg,
    /// Where the Hessian-vector products run (`auto`: as the spectral
    /// commands' --backend auto). Default: the float64 reference that also
    /// trains, so a resumed run repeats the curvature exactly.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub hessian_backend: Backend,
    /// SLQ Lanczos steps per run.
    #[arg(long, default_value_t = slq::DEFAULT_STEPS, allow_hyphen_values = true)]
    pub steps: usize,
    /// SLQ runs (Gaussian start vectors).
    #[arg(long, default_value_t = slq::DEFAULT_RUNS, allow_hyphen_values = true)]
    pub runs: usize,
    /// Gaussian kernel standard deviation of the densities (default:
    /// sigma² = 1e-5·max(1, λmax − λmin), as in Ghorbani et al.).
    #[arg(long, allow_hyphen_values = true)]
    pub sigma: Option<f64>,
    /// Grid points of each density in trajectory.json.
    #[arg(long, default_value_t = 1000, allow_hyphen_values = true)]
    pub grid: usize,
    /// Top-k eigenvalues (algebraic), and the gradient's fractions in the
    /// top 1..k eigenspaces.
    #[arg(long, default_value_t = 10, allow_hyphen_values = true)]
    pub top: usize,
    /// Lanczos step budget of the top-k eigenvalues (and of each module's
    /// λmax with --layerwise).
    #[arg(long, default_value_t = 400, allow_hyphen_values = true)]
    pub eigs_steps: usize,
    /// Residual tolerance of the eigenvalues relative to |λmax|, in (0, 1).
    #[arg(long, default_value_t = 1e-6, allow_hyphen_values = true)]
    pub tol: f64,
    /// Hutchinson probes of the trace (whole Hessian and each module).
    #[arg(long, default_value_t = 100, allow_hyphen_values = true)]
    pub probes: usize,
    /// Each module's λmax and trace (its diagonal block of the Hessian).
    #[arg(long)]
    pub layerwise: bool,
    /// Papyan's decomposition at every measurement too: the densities of
    /// the Gauss–Newton term G and the residual E = H − G (same steps, runs
    /// and start vectors as H's), and G's top 2·classes + 2 eigenvalues
    /// with its outliers (as `hesscope papyan`).
    #[arg(long)]
    pub papyan: bool,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub basis: BasisArgs,
}

/// The Hessian-trace regulariser (Sankar et al.).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Hessian-trace regulariser")]
pub struct HtrArgs {
    /// Add G·∇θ[(1/P) Σₖ vₖᵀ H_S vₖ] (the step's own mini-batch, third
    /// derivatives as `trace-grad` computes them) to the gradient of the
    /// regularised steps, before weight decay and momentum.
    #[arg(long, value_name = "G", allow_hyphen_values = true)]
    pub htr_gamma: Option<f64>,
    /// The layer set S: `all`, `middle` (the trainable tensors i with
    /// ⌊n/4⌋ ≤ i < ⌊3n/4⌋, Sankar et al.), or comma-separated module names
    /// or prefixes.
    #[arg(long, default_value = "middle", value_name = "S")]
    pub htr_layers: String,
    /// Probes P per regularised step (7 HVPs each).
    #[arg(
        long,
        default_value_t = 1,
        value_name = "P",
        allow_hyphen_values = true
    )]
    pub htr_probes: usize,
    /// Regularise the steps whose count of steps before them is a multiple
    /// of K.
    #[arg(
        long,
        default_value_t = 1,
        value_name = "K",
        allow_hyphen_values = true
    )]
    pub htr_every: usize,
    /// Regularise once E epochs have finished (0: from the first step).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "E",
        allow_hyphen_values = true
    )]
    pub htr_from_epoch: usize,
    /// The probes, drawn per step from --seed, the epoch and the step.
    /// Rademacher by default: for a symmetric A, zᵀAz has variance
    /// 2(‖A‖²_F − Σ A²ᵢᵢ) with ±1 entries against 2‖A‖²_F with Gaussian
    /// ones, so it is never noisier (PyHessian's choice too).
    #[arg(long, value_enum, default_value_t = ProbeDistArg::Rademacher)]
    pub htr_probe_dist: ProbeDistArg,
}

/// Float dtype of the saved state_dicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SaveDtype {
    /// float32, as PyTorch's state_dicts usually are.
    F32,
    /// float64: the reference's values unrounded.
    F64,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Epochs to train (passes over the data).
    #[arg(long, allow_hyphen_values = true)]
    pub epochs: usize,
    /// Learning rate of the first epoch.
    #[arg(long, allow_hyphen_values = true)]
    pub lr: f64,
    /// SGD momentum (PyTorch's; dampening 0, no Nesterov).
    #[arg(long, default_value_t = 0.9, allow_hyphen_values = true)]
    pub momentum: f64,
    /// L2 weight decay on every trainable tensor, added to the gradient.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub weight_decay: f64,
    /// Epochs after which the learning rate is multiplied by --lr-gamma
    /// (MultiStepLR; strictly increasing, from 1).
    #[arg(long, num_args = 1..)]
    pub milestones: Vec<usize>,
    /// The factor of each milestone.
    #[arg(long, default_value_t = 0.1, allow_hyphen_values = true)]
    pub lr_gamma: f64,
    /// File order every epoch (default: a permutation per epoch from --seed).
    #[arg(long)]
    pub no_shuffle: bool,
    /// Float dtype of final.safetensors and the checkpoints
    /// (num_batches_tracked is always int64).
    #[arg(long, value_enum, default_value_t = SaveDtype::F32)]
    pub dtype: SaveDtype,
    /// Folder for final.safetensors, checkpoints/epoch-E.safetensors,
    /// trajectory.json and its plots (training.svg; with --spectrum-every
    /// densities.svg and curvature.svg), created if missing; with
    /// --resume, that folder.
    #[arg(long, help_heading = "Output", required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR (a killed or finished one) from its latest
    /// complete checkpoint to the same result as an uninterrupted run; the
    /// recipe flags must be those of the run (--epochs may be larger).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Delete the files of another run in --out (its checkpoints,
    /// final.*, trajectory.json and plots) before training; without it a
    /// folder holding another run is refused.
    #[arg(long, help_heading = "Output", conflicts_with = "resume")]
    pub overwrite: bool,
    /// Test set (safetensors x/y or a CIFAR-10 folder): its mean loss and
    /// accuracy after each epoch, batch norm by running statistics
    /// (PyTorch's eval()), in trajectory.json.
    #[arg(long, value_name = "FILE|DIR")]
    pub test_data: Option<PathBuf>,
    /// Data augmentation of the training samples, per sample and epoch
    /// from --seed.
    #[arg(long, value_enum, default_value_t = AugmentArg::None)]
    pub augment: AugmentArg,
    #[command(flatten)]
    pub spectrum: SpectrumArgs,
    #[command(flatten)]
    pub htr: HtrArgs,
    #[command(flatten)]
    pub inputs: Inputs,
}

fn check_count(flag: &str, value: usize, max: usize) -> Result<()> {
    if value == 0 {
        bail!("invalid {flag}: must be at least 1");
    }
    if value > max {
        bail!("invalid {flag}: {value} is above the limit of {max}");
    }
    Ok(())
}

impl SpectrumArgs {
    fn settings(&self, seed: u64) -> Result<SnapshotSettings> {
        check_count("--steps", self.steps, MAX_STEPS)?;
        check_count("--runs", self.runs, MAX_RUNS)?;
        check_count("--eigs-steps", self.eigs_steps, MAX_STEPS)?;
        check_count("--probes", self.probes, MAX_PROBES)?;
        check_count("--hessian-samples", self.hessian_samples, usize::MAX)?;
        check_count("--top", self.top, MAX_STEPS)?;
        self.sweep.validate()?;
        if self.basis.basis_on == BasisOn::Device && self.hessian_backend == Backend::Cpu {
            bail!(
                "invalid --basis-on device: --hessian-backend cpu (the float64 reference) keeps \
                 no vectors on a device; use a GPU backend or --basis-on host"
            );
        }
        if self.papyan && self.spectrum_every.is_none() {
            bail!(
                "invalid --papyan without --spectrum-every: G and E are measured beside the \
                 Hessian, at its epochs"
            );
        }
        if !(2..=MAX_GRID).contains(&self.grid) {
            bail!(
                "invalid --grid: {}; a density needs between 2 and {MAX_GRID} grid points",
                self.grid
            );
        }
        if let Some(s) = self.sigma {
            if !(s.is_finite() && s > 0.0) {
                bail!("invalid --sigma: {s}; the kernel width must be a positive finite number");
            }
        }
        if !(self.tol.is_finite() && self.tol > 0.0 && self.tol < 1.0) {
            bail!(
                "invalid --tol: {}; a relative tolerance in (0, 1)",
                self.tol
            );
        }
        Ok(SnapshotSettings {
            slq_steps: self.steps,
            slq_runs: self.runs,
            sigma: self.sigma,
            grid: self.grid,
            top: self.top,
            eigs_steps: self.eigs_steps,
            tol: self.tol,
            probes: self.probes,
            layerwise: self.layerwise,
            seed,
            block: self.sweep.block,
            basis_budget: match self.basis.basis_budget {
                Some(_) => Some(self.basis.budget()?.0),
                None => None,
            },
            papyan: self.papyan,
        })
    }
}

impl HtrArgs {
    /// The regulariser with --htr-gamma; every flag is checked either way
    /// (the layer set against the model by the caller).
    fn htr(&self, epochs: usize) -> Result<Option<Htr>> {
        check_count("--htr-probes", self.htr_probes, MAX_PROBES)?;
        check_count("--htr-every", self.htr_every, usize::MAX)?;
        if self.htr_from_epoch >= epochs {
            bail!(
                "invalid --htr-from-epoch: {} with --epochs {epochs}: no epoch would be regularised",
                self.htr_from_epoch
            );
        }
        let Some(gamma) = self.htr_gamma else {
            return Ok(None);
        };
        if !(gamma.is_finite() && gamma >= 0.0) {
            bail!("invalid --htr-gamma: {gamma} is not a finite number ≥ 0");
        }
        Ok(Some(Htr {
            gamma,
            layers: self.htr_layers.clone(),
            probes: self.htr_probes,
            every: self.htr_every,
            from_epoch: self.htr_from_epoch,
            dist: match self.htr_probe_dist {
                ProbeDistArg::Rademacher => ProbeDist::Rademacher,
                ProbeDistArg::Gaussian => ProbeDist::Gaussian,
            },
        }))
    }
}

/// A progress bar over an epoch's steps on stderr, drawn only on a terminal.
fn epoch_bar(epoch: usize, epochs: usize, steps: usize) -> ProgressBar {
    match ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} steps  {msg}  {elapsed} (eta {eta})",
    ) {
        Ok(style) if std::io::stderr().is_terminal() => {
            let b = ProgressBar::new(steps as u64);
            b.set_style(style.progress_chars("=> "));
            b.set_prefix(format!("{epoch}/{epochs}"));
            b
        }
        _ => ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::hidden()),
    }
}

/// The GPU the steps run on (the regulariser's third derivatives too):
/// None for the float64 CPU engine (`--backend cpu`, or `auto` without a
/// GPU adapter: the same decision as every command's, `hesscope devices`).
fn train_device(a: &TrainArgs) -> Result<Option<hesscope::gpu::GpuContext>> {
    let Some((choice, adapter)) = a.inputs.backend.resolve(a.inputs.adapter, Need::Engine)? else {
        return Ok(None);
    };
    hesscope::gpu::GpuContext::open(choice, adapter)
        .map(Some)
        .with_context(|| {
            format!(
                "--backend {} --adapter {} ({} adapter {adapter})",
                a.inputs.backend.name(),
                a.inputs.adapter,
                backend_flag(choice)
            )
        })
}

/// The report's settings, naming the device the steps ran on.
fn run_settings(a: &TrainArgs, tr: &Trainer) -> hesscope::report::Settings {
    let mut s = a.inputs.settings(&tr.cpu, None);
    if let Some(ctx) = tr.gpu() {
        s.backend = ctx.info.backend.clone();
        s.adapter = ctx.info.name.clone();
    }
    // Data-parallel: the workers, as the sweeping commands name them.
    match (hesscope::multi::world().1, &a.inputs.devices) {
        (r, _) if r > 1 => s.backend = format!("mpi:{r}xcpu"),
        (_, Some(list)) => s.backend = list.clone(),
        _ => {}
    }
    s
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    if a.inputs.bn == BnArg::Running {
        bail!("invalid --bn running: training normalises by each mini-batch's statistics (--bn batch)");
    }
    let recipe = Recipe {
        epochs: a.epochs,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        milestones: a.milestones.clone(),
        lr_gamma: a.lr_gamma,
        shuffle: !a.no_shuffle,
        seed: a.inputs.seed,
    };
    recipe.check()?;
    let augment = match a.augment {
        AugmentArg::None => Augment::None,
        AugmentArg::CropFlip => Augment::CropFlip,
    };
    // Every flag is checked, whether or not its feature is on.
    let htr = a.htr.htr(a.epochs)?;
    let settings = a.spectrum.settings(a.inputs.seed)?;
    a.inputs.check_cache_budget()?;
    let spectrum = a.spectrum.spectrum_every.map(|_| (settings, &a.spectrum));
    let out = match (&a.resume, &a.out) {
        (Some(r), Some(o)) if r != o => bail!(
            "invalid --out {}: a resumed run writes into its --resume folder {}",
            o.display(),
            r.display()
        ),
        (Some(r), _) => r.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) => bail!("--out DIR is required (or --resume DIR)"),
    };
    if let Some(d) = a.inputs.data.as_ref().filter(|d| d.to_str().is_none()) {
        bail!(
            "invalid --data {}: not a UTF-8 path (the checkpoints record it)",
            d.display()
        );
    }
    let f64_out = a.dtype == SaveDtype::F64;
    let dtype = if f64_out { "F64" } else { "F32" };
    let t0 = Instant::now();
    // Data-parallel workers run on the float64 engine: no GPU trainer.
    let workers = super::train_parallel::workers(&a)?;
    let device = match workers {
        Some(_) => None,
        None => train_device(&a)?,
    };
    let (model, mut weights) = a.inputs.model_and_weights()?;
    LayerSet::parse(&model, &a.htr.htr_layers)
        .map_err(|e| anyhow!("invalid --htr-layers: {}", strip_invalid(&e)))?;
    augment.check(model.input)?;
    if let Some((s, _)) = &spectrum {
        if s.top > model.n_params {
            bail!(
                "invalid --top: {} is more than the {} parameters of {}",
                s.top,
                model.n_params,
                model.name
            );
        }
    }
    let mut counts = initial_counts(&model, a.inputs.weights.as_deref())
        .with_context(|| format!("--weights {:?}", a.inputs.weights))?;
    let data = a.inputs.dataset(&model)?;
    let n_samples = data.len();
    let test = match &a.test_data {
        Some(p) => Some(
            Dataset::load_first(p, None).with_context(|| format!("--test-data {}", p.display()))?,
        ),
        None => None,
    };
    if let Some(t) = &test {
        if t.shape != data.shape {
            bail!(
                "invalid --test-data: samples of shape {:?}, the training data's are {:?}",
                t.shape,
                data.shape
            );
        }
    }
    if let Some(r) = &a.resume {
        if !r.join("checkpoints").is_dir() {
            bail!(
                "invalid --resume {}: no checkpoints folder there (not a hesscope train run)",
                r.display()
            );
        }
    }
    // The folder is ours (locked, no other run's files) before any work.
    // (Rank 0's only, under MPI: it alone writes.)
    let root = hesscope::multi::is_root();
    let _held = match root {
        true => Some(train_guard::claim(&out, a.resume.is_some(), a.overwrite)?),
        false => None,
    };
    let (model_sha256, data_sha256) = run_identity(&model, &data);
    let run_measures = RunMeasures {
        spectrum_every: a.spectrum.spectrum_every,
        curvature: spectrum.as_ref().map(|(s, _)| s.clone()),
        hessian_samples: a.spectrum.hessian_samples,
        hessian_bn: format!("{:?}", a.spectrum.hessian_bn),
        hessian_backend: a.spectrum.hessian_backend.name().to_string(),
        test_data: a.test_data.clone(),
        test_sha256: test.as_ref().map(hesscope::train::data_sha256),
    };
    let given = train_guard::Given {
        recipe: &recipe,
        batch: a.inputs.batch,
        model: &a.inputs.model,
        data: a.inputs.data.as_deref(),
        samples: n_samples,
        dtype,
        augment,
        htr: htr.as_ref(),
        model_sha256: &model_sha256,
        data_sha256: &data_sha256,
        measures: &run_measures,
    };
    let mut resumed = None;
    if let Some(dir) = &a.resume {
        let r = latest_checkpoint(&model, dir, &mut |json, m| {
            let diffs = train_guard::differences(&given, m);
            if diffs.is_empty() {
                return Ok(());
            }
            Err(hesscope::error::Error::Invalid {
                what: "resume",
                msg: format!(
                    "{} (epoch {}) was made with other settings: {}",
                    json.display(),
                    m.epoch,
                    diffs.join("; ")
                ),
            })
        })?;
        for s in &r.skipped {
            notice(format!("hesscope: ignoring checkpoint {s}"));
        }
        if a.inputs.weights.is_some() {
            notice("hesscope: --resume continues from the checkpoint; --weights is not used");
        }
        weights = r.weights.clone();
        counts = r.batches_tracked.clone();
        resumed = Some(r);
    }
    let mut tr = Trainer::new(model, weights, data, a.inputs.batch, recipe.clone(), counts)?;
    tr.augment = augment;
    tr.f32_saved = !f64_out;
    tr.set_htr(htr.clone())?;
    if let Some((w, flag)) = workers {
        // The same arguments on every rank: a refusal is agreed.
        w.apply(&mut tr, &flag)
            .inspect_err(|_| hesscope::multi::mark_agreed())?;
    }
    if let Some(ctx) = device {
        tr.use_gpu(ctx).context("building the GPU trainer")?;
    }
    let measures = Measures {
        inputs: &a.inputs,
        spectrum,
        test: test.as_ref(),
        weight_decay: recipe.weight_decay,
        gpu_eval: Default::default(),
    };
    let say = train_guard::Progress::default();
    let mut epochs = vec![];
    let mut step_losses = vec![];
    let mut start = None;
    let mut previous = None;
    if let Some(r) = resumed {
        tr.restore(r.meta.epoch, r.meta.steps, r.momentum)?;
        epochs = r.epochs;
        step_losses = r.step_losses;
        start = r.start;
        previous = Some(r.json);
        if !a.inputs.json {
            say.line(format!(
                "resuming {} after epoch {} ({} steps)",
                out.display(),
                tr.epoch,
                tr.steps
            ));
        }
    }
    let ckdir = out.join("checkpoints");
    if tr.epoch == 0 && start.is_none() {
        let (test_loss, test_accuracy) = measures.test(&tr)?;
        let (train_eval_loss, train_accuracy) = measures.eval(&tr, tr.data(), "train")?;
        let curvature = match measures.spectrum {
            Some(_) => Some(measures.curvature(&tr, "start")?),
            None => None,
        };
        if let (Some(c), false) = (&curvature, a.inputs.json) {
            say.line(format!("start{}", describe_curvature(c)));
        }
        start = Some(StartRecord {
            epoch: 0,
            train_accuracy: Some(train_accuracy),
            train_eval_loss: Some(train_eval_loss),
            test_loss,
            test_accuracy,
            curvature,
        });
    }
    let meta = |tr: &Trainer,
                lr: f64,
                record: Option<EpochRecord>,
                step_losses: &[f64],
                previous: Option<FileDigest>| CheckpointMeta {
        epoch: tr.epoch,
        steps: tr.steps,
        lr,
        recipe: recipe.clone(),
        batch: a.inputs.batch,
        samples: n_samples,
        model: a.inputs.model.clone(),
        data: a.inputs.data.clone(),
        model_sha256: model_sha256.clone(),
        data_sha256: data_sha256.clone(),
        measures: run_measures.clone(),
        dtype: dtype.into(),
        state_dict: String::new(),
        state_f64: String::new(),
        optim: None,
        files: vec![],
        start: if tr.epoch == 1 && record.is_some() {
            start.clone()
        } else {
            None
        },
        record,
        step_losses: step_losses.to_vec(),
        previous,
        augment,
        htr: htr.clone(),
    };
    let mut last_lr = recipe.lr_at(tr.epoch.saturating_sub(1));
    while tr.epoch < recipe.epochs {
        // Where a failure in this epoch leaves the run.
        let good = match tr.epoch {
            0 => "none (this is the first epoch)".to_string(),
            k => ckdir
                .join(format!("epoch-{k}.safetensors"))
                .display()
                .to_string(),
        };
        let stop = format!(
            "nothing written for epoch {}; the last good checkpoint: {good}",
            tr.epoch + 1
        );
        let n_steps = tr.data().batches(a.inputs.batch).len();
        let bar = epoch_bar(tr.epoch + 1, recipe.epochs, n_steps);
        let (t_bar, mut seen) = (Instant::now(), 0usize);
        let r = tr.epoch_with(|s: &StepInfo| {
            seen += s.samples;
            let rate = seen as f64 / t_bar.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("loss {:.4}  {rate:.0} samples/s", s.loss));
            bar.inc(1);
        });
        bar.finish_and_clear();
        let r = r.map_err(|e| match e {
            hesscope::Error::Diverged { .. } => anyhow!("{e}; {stop}"),
            other => anyhow::Error::new(other).context(format!("training stopped: {stop}")),
        })?;
        last_lr = r.lr;
        let done = r.epoch + 1;
        // A failure here (an evaluation overflowing) is after the epoch's
        // last step: named so.
        let after = || {
            format!(
                "training stopped after epoch {done}'s last step (step {} of the run): {stop}",
                tr.steps
            )
        };
        let (test_loss, test_accuracy) = measures.test(&tr).with_context(after)?;
        let (train_eval_loss, train_accuracy) =
            measures.eval(&tr, tr.data(), "train").with_context(after)?;
        let curvature = match (&measures.spectrum, a.spectrum.spectrum_every) {
            (Some(_), Some(every)) if done == recipe.epochs || (every > 0 && done % every == 0) => {
                Some(
                    measures
                        .curvature(&tr, &format!("epoch {done}"))
                        .with_context(after)?,
                )
            }
            _ => None,
        };
        let htr_rec = tr.htr().map(|_| HtrRecord {
            value: (!r.htr.is_empty()).then(|| r.htr.iter().sum::<f64>() / r.htr.len() as f64),
            steps: r.htr.len(),
        });
        let rec = EpochRecord {
            epoch: done,
            train_loss: r.losses.iter().sum::<f64>() / r.losses.len() as f64,
            lr: r.lr,
            steps: tr.steps,
            seconds: r.seconds,
            checkpoint: ckdir.join(format!("epoch-{done}.safetensors")),
            test_loss,
            test_accuracy,
            train_accuracy: Some(train_accuracy),
            train_eval_loss: Some(train_eval_loss),
            htr: htr_rec,
            curvature,
        };
        let stem = format!("epoch-{done}");
        if !root {
            step_losses.extend(r.losses);
            continue;
        }
        let (_, json) = save_checkpoint(
            &tr,
            &ckdir,
            &stem,
            f64_out,
            meta(&tr, r.lr, Some(rec.clone()), &r.losses, previous.take()),
        )
        .with_context(|| format!("writing checkpoint {}", ckdir.join(&stem).display()))?;
        previous = Some(json);
        step_losses.extend(r.losses);
        epochs.push(rec.clone());
        // The trajectory so far and its plots, for a look while it runs.
        let so_far = TrainReport {
            recipe: recipe.clone(),
            augment,
            htr: htr.clone(),
            start: start.clone(),
            epochs: epochs.clone(),
            step_losses: step_losses.clone(),
            steps: tr.steps,
            out: rec.checkpoint.clone(),
            finished: false,
            dtype: dtype.into(),
            seconds: t0.elapsed().as_secs_f64(),
            settings: run_settings(&a, &tr),
        };
        write_trajectory(&out, tr.model(), &so_far)?;
        if !a.inputs.json {
            say.line(describe_epoch(&rec));
        }
    }
    if !root {
        return Ok(());
    }
    let (fin, _) = save_checkpoint(
        &tr,
        &out,
        "final",
        f64_out,
        meta(
            &tr,
            last_lr,
            None,
            &[],
            previous.map(|p| FileDigest {
                file: format!("checkpoints/{}", p.file),
                ..p
            }),
        ),
    )
    .with_context(|| format!("writing {}", out.join("final.safetensors").display()))?;
    let report = TrainReport {
        recipe,
        augment,
        htr,
        start,
        epochs,
        step_losses,
        steps: tr.steps,
        out: fin.clone(),
        finished: true,
        dtype: dtype.into(),
        seconds: t0.elapsed().as_secs_f64(),
        settings: run_settings(&a, &tr),
    };
    let (traj, plots) = write_trajectory(&out, tr.model(), &report)?;
    if a.inputs.json {
        say.line(Exporter::JsonLine.render(&report)?);
    } else {
        say.line(format!(
            "trained {} epochs ({} steps); wrote {}, {} and {}",
            report.epochs.len(),
            report.steps,
            fin.display(),
            traj.display(),
            plots
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    say.finish()
}

/// The message of a library `Invalid` error without its own "what".
fn strip_invalid(e: &hesscope::Error) -> String {
    match e {
        hesscope::Error::Invalid { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}

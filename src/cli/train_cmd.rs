//! `hesscope train`: SGD as PyTorch's, on the float64 reference
//! (`hesscope::train`), writing the final state_dict, a checkpoint per
//! epoch and `trajectory.json`.

use crate::cli::common::{Backend, BnArg, Inputs};
use crate::cli::output::{self, notice};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Problem};
use hesscope::report::{EpochRecord, Exporter, TrainReport};
use hesscope::train::{
    initial_counts, latest_checkpoint, save_checkpoint, write_atomic, CheckpointMeta, Recipe,
    Trainer,
};
use std::path::PathBuf;
use std::time::Instant;

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
    /// Folder for final.safetensors, checkpoints/epoch-E.safetensors and
    /// trajectory.json (created if missing; with --resume, that folder).
    #[arg(long, help_heading = "Output", required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR (a killed or finished one) from its latest
    /// complete checkpoint to the same result as an uninterrupted run; the
    /// recipe flags must be those of the run (--epochs may be larger).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Test set (safetensors x/y or a CIFAR-10 folder): its mean loss and
    /// accuracy after each epoch, batch norm by running statistics
    /// (PyTorch's eval()), in trajectory.json.
    #[arg(long, value_name = "FILE|DIR")]
    pub test_data: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: Inputs,
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    match a.inputs.backend {
        Backend::Cpu => {}
        Backend::Auto => {
            notice("hesscope: train runs on the float64 CPU reference so far (--backend cpu)")
        }
        other => bail!(
            "invalid --backend {}: training runs on the float64 CPU reference so far; \
             use --backend cpu (or auto)",
            other.name()
        ),
    }
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
    let f64_out = a.dtype == SaveDtype::F64;
    let dtype = if f64_out { "F64" } else { "F32" };
    let t0 = Instant::now();
    let (model, mut weights) = a.inputs.model_and_weights()?;
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
    let mut resumed = None;
    if let Some(dir) = &a.resume {
        let r = latest_checkpoint(&model, dir)?;
        for s in &r.skipped {
            notice(format!("hesscope: ignoring an incomplete checkpoint: {s}"));
        }
        let m = &r.meta;
        let mut given = recipe.clone();
        given.epochs = m.recipe.epochs;
        let mut diffs = vec![];
        if given != m.recipe {
            diffs.push(format!("recipe {:?}, the run's is {:?}", recipe, m.recipe));
        }
        if recipe.epochs < m.epoch {
            diffs.push(format!(
                "--epochs {} but {} epochs are done",
                recipe.epochs, m.epoch
            ));
        }
        if a.inputs.batch != m.batch {
            diffs.push(format!(
                "--batch {}, the run's is {}",
                a.inputs.batch, m.batch
            ));
        }
        if a.inputs.model != m.model {
            diffs.push(format!(
                "--model {}, the run's is {}",
                a.inputs.model, m.model
            ));
        }
        if a.inputs.data != m.data || n_samples != m.samples {
            diffs.push(format!(
                "--data {:?} with {n_samples} samples, the run's is {:?} with {}",
                a.inputs.data, m.data, m.samples
            ));
        }
        if dtype != m.dtype {
            diffs.push(format!("--dtype {dtype}, the run's is {}", m.dtype));
        }
        if !diffs.is_empty() {
            return Err(hesscope::error::Error::Invalid {
                what: "resume",
                msg: format!(
                    "{} (epoch {}) was made with other settings: {}",
                    dir.display(),
                    m.epoch,
                    diffs.join("; ")
                ),
            }
            .into());
        }
        if a.inputs.weights.is_some() {
            notice("hesscope: --resume continues from the checkpoint; --weights is not used");
        }
        weights = r.weights.clone();
        counts = r.batches_tracked.clone();
        resumed = Some(r);
    }
    let mut tr = Trainer::new(model, weights, data, a.inputs.batch, recipe.clone(), counts)?;
    let mut epochs = vec![];
    let mut step_losses = vec![];
    if let Some(r) = resumed {
        tr.restore(r.meta.epoch, r.meta.steps, r.momentum)?;
        epochs = r.meta.epochs;
        step_losses = r.meta.step_losses;
        if !a.inputs.json {
            output::line(format!(
                "resuming {} after epoch {} ({} steps)",
                out.display(),
                tr.epoch,
                tr.steps
            ))?;
        }
    }
    let ckdir = out.join("checkpoints");
    std::fs::create_dir_all(&ckdir).with_context(|| format!("creating {}", ckdir.display()))?;
    let meta =
        |tr: &Trainer, lr: f64, epochs: &[EpochRecord], step_losses: &[f64]| CheckpointMeta {
            epoch: tr.epoch,
            steps: tr.steps,
            lr,
            recipe: recipe.clone(),
            batch: a.inputs.batch,
            samples: n_samples,
            model: a.inputs.model.clone(),
            data: a.inputs.data.clone(),
            dtype: dtype.into(),
            state_dict: String::new(),
            state_f64: String::new(),
            optim: None,
            epochs: epochs.to_vec(),
            step_losses: step_losses.to_vec(),
        };
    let mut last_lr = recipe.lr_at(tr.epoch.saturating_sub(1));
    while tr.epoch < recipe.epochs {
        let r = tr.epoch()?;
        last_lr = r.lr;
        let (test_loss, test_accuracy) = match &test {
            Some(t) => {
                let p = Problem::new(
                    tr.model().clone(),
                    tr.weights().clone(),
                    t.clone(),
                    a.inputs.batch,
                    BnMode::Running,
                )?;
                let (l, acc) = hesscope::cpu::CpuReference::new(p).evaluate()?;
                (Some(l), Some(acc))
            }
            None => (None, None),
        };
        let rec = EpochRecord {
            epoch: r.epoch + 1,
            train_loss: r.losses.iter().sum::<f64>() / r.losses.len() as f64,
            lr: r.lr,
            steps: tr.steps,
            seconds: r.seconds,
            checkpoint: ckdir.join(format!("epoch-{}.safetensors", r.epoch + 1)),
            test_loss,
            test_accuracy,
        };
        step_losses.extend(r.losses);
        epochs.push(rec.clone());
        let stem = format!("epoch-{}", r.epoch + 1);
        save_checkpoint(
            &tr,
            &ckdir,
            &stem,
            f64_out,
            meta(&tr, r.lr, &epochs, &step_losses),
        )
        .with_context(|| format!("writing checkpoint {}", ckdir.join(&stem).display()))?;
        if !a.inputs.json {
            let test = match (rec.test_loss, rec.test_accuracy) {
                (Some(l), Some(acc)) => format!("  test loss {l:.6} acc {acc:.4}"),
                _ => String::new(),
            };
            output::line(format!(
                "epoch {:>3}  lr {:.4e}  train loss {:.6}{test}  ({} steps, {:.2} s)",
                rec.epoch, rec.lr, rec.train_loss, rec.steps, rec.seconds
            ))?;
        }
    }
    let fin = save_checkpoint(
        &tr,
        &out,
        "final",
        f64_out,
        meta(&tr, last_lr, &epochs, &step_losses),
    )
    .with_context(|| format!("writing {}", out.join("final.safetensors").display()))?;
    let report = TrainReport {
        recipe,
        epochs,
        step_losses,
        steps: tr.steps,
        out: fin.clone(),
        dtype: dtype.into(),
        seconds: t0.elapsed().as_secs_f64(),
        settings: a.inputs.settings(&tr.cpu, None),
    };
    let traj = out.join("trajectory.json");
    write_atomic(&traj, |p| Exporter::JsonPretty.write(p, &report))
        .with_context(|| format!("writing {}", traj.display()))?;
    if a.inputs.json {
        return output::line(Exporter::JsonLine.render(&report)?);
    }
    output::line(format!(
        "trained {} epochs ({} steps); wrote {} and {}",
        report.epochs.len(),
        report.steps,
        fin.display(),
        traj.display()
    ))
}

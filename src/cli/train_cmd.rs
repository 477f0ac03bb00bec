//! `hesscope train`: SGD as PyTorch's, on the float64 reference
//! (`hesscope::train`), writing the final state_dict, a checkpoint per
//! epoch and `trajectory.json`.

use crate::cli::common::{Backend, BnArg, Inputs};
use crate::cli::output::{self, notice};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hesscope::report::{EpochRecord, Exporter, TrainReport};
use hesscope::train::{initial_counts, Recipe, Trainer};
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
    /// trajectory.json (created if missing).
    #[arg(long, help_heading = "Output")]
    pub out: PathBuf,
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
    let t0 = Instant::now();
    let (model, weights) = a.inputs.model_and_weights()?;
    let counts = initial_counts(&model, a.inputs.weights.as_deref())
        .with_context(|| format!("--weights {:?}", a.inputs.weights))?;
    let data = a.inputs.dataset(&model)?;
    let mut tr = Trainer::new(model, weights, data, a.inputs.batch, recipe.clone(), counts)?;
    let ckdir = a.out.join("checkpoints");
    std::fs::create_dir_all(&ckdir).with_context(|| format!("creating {}", ckdir.display()))?;
    let f64_out = a.dtype == SaveDtype::F64;
    let mut epochs = vec![];
    let mut step_losses = vec![];
    for _ in 0..recipe.epochs {
        let r = tr.epoch()?;
        let ck = ckdir.join(format!("epoch-{}.safetensors", r.epoch + 1));
        tr.save(&ck, f64_out)
            .with_context(|| format!("writing {}", ck.display()))?;
        let rec = EpochRecord {
            epoch: r.epoch + 1,
            train_loss: r.losses.iter().sum::<f64>() / r.losses.len() as f64,
            lr: r.lr,
            steps: tr.steps,
            seconds: r.seconds,
            checkpoint: ck,
        };
        if !a.inputs.json {
            output::line(format!(
                "epoch {:>3}  lr {:.4e}  train loss {:.6}  ({} steps, {:.2} s)",
                rec.epoch, rec.lr, rec.train_loss, rec.steps, rec.seconds
            ))?;
        }
        step_losses.extend(r.losses);
        epochs.push(rec);
    }
    let fin = a.out.join("final.safetensors");
    tr.save(&fin, f64_out)
        .with_context(|| format!("writing {}", fin.display()))?;
    let report = TrainReport {
        recipe,
        epochs,
        step_losses,
        steps: tr.steps,
        out: fin.clone(),
        dtype: if f64_out { "F64" } else { "F32" }.into(),
        seconds: t0.elapsed().as_secs_f64(),
        settings: a.inputs.settings(&tr.cpu, None),
    };
    let traj = a.out.join("trajectory.json");
    Exporter::JsonPretty
        .write(&traj, &report)
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

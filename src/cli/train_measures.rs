//! What `hesscope train` measures besides training, after each epoch:
//! the loss and accuracy with running statistics (training and test
//! data, on the trainer's GPU or the float64 reference) and the Hessian's
//! curvature on a fixed subset; and the progress lines that report them.

use crate::cli::common::Inputs;
use crate::cli::train_cmd::SpectrumArgs;
use anyhow::{Context, Result};
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Problem};
use hesscope::gpu::GpuEngine;
use hesscope::report::{CurvatureRecord, EpochRecord, HtrRecord};
use hesscope::snapshot::{snapshot_with, SnapshotSettings};
use hesscope::train::{samples, Trainer};
use indicatif::ProgressBar;
use std::collections::hash_map::Entry;
use std::io::IsTerminal;

/// A spinner on stderr (terminal only) while the Hessian is measured.
fn spinner(msg: String) -> ProgressBar {
    if std::io::stderr().is_terminal() {
        let b = ProgressBar::new_spinner();
        b.set_message(msg);
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    } else {
        ProgressBar::hidden()
    }
}

/// What the run measures besides training.
pub struct Measures<'a> {
    pub inputs: &'a Inputs,
    pub spectrum: Option<(SnapshotSettings, &'a SpectrumArgs)>,
    pub test: Option<&'a Dataset>,
    pub weight_decay: f64,
    /// A GPU run's evaluation engines on its device, for the training and
    /// the test data.
    pub gpu_eval: std::cell::RefCell<std::collections::HashMap<&'static str, GpuEngine>>,
}

impl Measures<'_> {
    /// Mean cross-entropy and accuracy with running statistics: on the
    /// trainer's GPU (float32 forward passes) when it has one, else on the
    /// float64 reference. `key` names the data set (its engine is kept).
    pub fn eval(&self, tr: &Trainer, data: &Dataset, key: &'static str) -> Result<(f64, f64)> {
        // Model mode: batch norm on its running statistics.
        let problem = || {
            Problem::new(
                tr.model().clone(),
                tr.weights().clone(),
                data.clone(),
                self.inputs.batch,
                BnMode::Running,
            )
        };
        if let Some(ctx) = tr.gpu() {
            let mut cache = self.gpu_eval.borrow_mut();
            let engine = match cache.entry(key) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(v) => {
                    let p = problem()?;
                    // One workspace, each batch uploaded in turn. A
                    // forward pass: float32 decisions (float64 ones would
                    // cost a float64 forward of the whole set).
                    let options = hesscope::gpu::EngineOptions {
                        cache_budget: Some(0),
                        block: Some(1),
                        decisions: hesscope::decisions::DecisionSource::Float32,
                        ..Default::default()
                    };
                    v.insert(GpuEngine::with_options(ctx.share(), &p, options)?)
                }
            };
            engine.set_theta(&tr.weights().theta)?;
            engine.set_running_buffers(&tr.weights().buffers)?;
            return Ok(engine.evaluate()?);
        }
        Ok(hesscope::cpu::CpuReference::checked(problem()?)?.evaluate()?)
    }

    pub fn test(&self, tr: &Trainer) -> Result<(Option<f64>, Option<f64>)> {
        Ok(match self.test {
            Some(t) => {
                let (l, a) = self.eval(tr, t, "test")?;
                (Some(l), Some(a))
            }
            None => (None, None),
        })
    }

    /// The Hessian of the data loss over the subset at the current weights.
    pub fn curvature(&self, tr: &Trainer, label: &str) -> Result<CurvatureRecord> {
        let (s, args) = self.spectrum.as_ref().expect("spectrum settings");
        let n = args.hessian_samples.min(tr.data().len());
        let bn: BnMode = args.hessian_bn.into();
        let problem = Problem::new(
            tr.model().clone(),
            tr.weights().clone(),
            samples(tr.data(), 0, n),
            self.inputs.batch,
            bn,
        )
        .context("the Hessian's subset")?;
        let mut inputs = self.inputs.clone();
        inputs.backend = args.hessian_backend;
        let mut engine =
            inputs.engine_with_options(problem, args.basis.engine_options(args.sweep.block)?)?;
        args.basis.check_engine(engine.as_ref())?;
        let bar = spinner(format!("{label}: measuring the Hessian on {n} samples"));
        let bn_name = match bn {
            BnMode::Batch => "batch",
            BnMode::Running => "running",
        };
        let r = snapshot_with(
            engine.as_mut(),
            tr.model(),
            s,
            (n, self.inputs.batch, bn_name, self.weight_decay),
            &mut |stage, count| {
                bar.set_message(format!(
                    "{label}: the Hessian on {n} samples: {stage}, {count} HVPs"
                ))
            },
        )
        .with_context(|| format!("{label}: measuring the Hessian"));
        bar.finish_and_clear();
        r
    }
}

pub fn describe_curvature(c: &CurvatureRecord) -> String {
    let mut s = format!(
        "  λmax {:.4e}  trace {:.4e}  ‖g‖² in top-{} {:.3}",
        c.top_eigenvalues.first().copied().unwrap_or(f64::NAN),
        c.trace,
        c.grad_frac_in_top_k.len(),
        c.grad_frac_in_top_k.last().copied().unwrap_or(f64::NAN)
    );
    if let Some(p) = &c.papyan {
        s += &format!(
            "  G λmax {:.4e}  E negative mass {:.3}  G outliers {} (×{:.2} gap; classes {})",
            p.ggn.lambda_max, p.residual.negative_mass, p.outliers, p.gap_ratio, p.classes
        );
    }
    s
}

/// An epoch's progress line (and its curvature's).
pub fn describe_epoch(rec: &EpochRecord) -> String {
    let test = match (rec.test_loss, rec.test_accuracy) {
        (Some(l), Some(acc)) => format!("  test loss {l:.6} acc {acc:.4}"),
        _ => String::new(),
    };
    let htr = match &rec.htr {
        Some(HtrRecord { value: Some(v), .. }) => format!("  htr {v:.4e}"),
        _ => String::new(),
    };
    let mut s = format!(
        "epoch {:>3}  lr {:.4e}  train loss {:.6} acc {:.4}{test}{htr}  ({} steps, {:.2} s)",
        rec.epoch,
        rec.lr,
        rec.train_loss,
        rec.train_accuracy.unwrap_or(f64::NAN),
        rec.steps,
        rec.seconds
    );
    if let Some(c) = &rec.curvature {
        s += &format!("\n     {}", describe_curvature(c));
    }
    s
}

//! `hesscope trace-grad`: the gradient of a Hutchinson trace estimate over
//! a layer set (`hesscope::trace_grad`), on a GPU engine that holds its
//! decisions (float32 steps, `Steps::for_f32`) or the float64 reference.

use crate::cli::common::Inputs;
use crate::cli::output::{self, emit, vnorm};
use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use hesscope::cpu::CpuReference;
use hesscope::engine::{Curvature, Problem};
use hesscope::gpu::EngineOptions;
use hesscope::model::params;
use hesscope::report::TraceGradReport;
use hesscope::trace_grad::{trace_grad, HoldsDecisions, LayerSet, Steps};
use std::path::PathBuf;
use std::time::Instant;

/// The most Rademacher probes `--probes` accepts.
pub const MAX_PROBES: usize = 100_000;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("probe_source").required(true).args(["probe", "probes"])))]
pub struct TraceGradArgs {
    /// The layer set S: `all`, `middle` (the trainable tensors i with
    /// ⌊n/4⌋ ≤ i < ⌊3n/4⌋, Sankar et al.), or comma-separated module
    /// names or prefixes (`block2,fc`).
    #[arg(long, default_value = "all")]
    pub layer: String,
    /// Probe files (safetensors named like the parameters, zero outside
    /// the layer set); one or more.
    #[arg(long, num_args = 1.., conflicts_with = "probes")]
    pub probe: Vec<PathBuf>,
    /// Rademacher (±1) probes on the layer set, drawn from --seed.
    #[arg(long, allow_hyphen_values = true)]
    pub probes: Option<usize>,
    /// Write the gradient as safetensors with the parameter names (float64).
    #[arg(long, help_heading = "Output")]
    pub out: PathBuf,
    #[command(flatten)]
    pub inputs: Inputs,
}

pub fn trace_grad_cmd(a: TraceGradArgs) -> Result<()> {
    if let Some(p) = a.probes {
        if p == 0 {
            bail!("invalid --probes: must be at least 1");
        }
        if p > MAX_PROBES {
            bail!("invalid --probes: {p} is above the limit of {MAX_PROBES}");
        }
    }
    let t0 = Instant::now();
    let (model, weights) = a.inputs.model_and_weights()?;
    let set = LayerSet::parse(&model, &a.layer)?;
    // Probes are checked before the data is loaded.
    let (probes, probe_source) = if a.probe.is_empty() {
        let count = a.probes.unwrap_or(1);
        (
            set.rademacher(&model, count, a.inputs.seed)?,
            vec![format!("{count} Rademacher (seed {})", a.inputs.seed)],
        )
    } else {
        let mut vs = vec![];
        for path in &a.probe {
            let v = params::load_vector(&model, path)
                .with_context(|| format!("--probe {}", path.display()))?;
            set.check_probe(&model, &v, &path.display().to_string())?;
            vs.push(v);
        }
        (
            vs,
            a.probe.iter().map(|p| p.display().to_string()).collect(),
        )
    };
    let data = a.inputs.dataset(&model)?;
    let problem = Problem::new(
        model.clone(),
        weights,
        data,
        a.inputs.batch,
        a.inputs.bn_mode(),
    )?;
    let options = EngineOptions {
        frozen: true,
        block: Some(1),
        ..Default::default()
    };
    let (mut engine, steps): (Box<dyn HoldsDecisions>, Steps) =
        match crate::cli::parallel::engine(&a.inputs, &problem, options)? {
            Some((e, true)) => (e, Steps::default()),
            Some((e, false)) => (e, Steps::for_f32()),
            None => match a.inputs.gpu_engine(&problem, options)? {
                Some(gpu) => (Box::new(gpu), Steps::for_f32()),
                None => (Box::new(CpuReference::checked(problem)?), Steps::default()),
            },
        };
    let cpu = engine.as_mut();
    let t = trace_grad(cpu, &probes, steps).context("computing the trace gradient")?;
    let settings = a
        .inputs
        .settings_with_decisions(cpu as &mut dyn Curvature, Some(&a.layer))?;
    a.inputs.save_vector(&model, &a.out, &t.grad)?;
    let report = TraceGradReport {
        estimate: t.estimate,
        grad_norm: vnorm(&t.grad),
        probes: probes.len(),
        per_probe: t.per_probe.clone(),
        layers: set.spec.clone(),
        selected: set.names(&model),
        selected_size: set.size(&model),
        probe_source,
        method: format!(
            "central differences of exact Hessian-vector products along each probe, \
             ReLU masks and max-pool argmax frozen at θ, Richardson-extrapolated \
             ({} products)",
            if steps.hvp_accuracy < 1e-10 {
                "float64"
            } else {
                "float32"
            }
        ),
        eps: steps.eps,
        levels: steps.levels,
        error_estimate: t.error_estimate,
        hvps: t.hvps,
        backend: cpu.backend(),
        adapter: cpu.adapter(),
        seconds: t0.elapsed().as_secs_f64(),
        out: a.out.clone(),
        settings,
    };
    if a.inputs.json {
        return emit(true, &report);
    }
    output::line(format!(
        "trace-grad over `{}` ({} tensors, {} parameters), {} probe(s): estimate {:.6e}, \
         ‖gradient‖ {:.6e} (error bound {:.1e}, {} HVPs); wrote {}",
        report.layers,
        report.selected.len(),
        report.selected_size,
        report.probes,
        report.estimate,
        report.grad_norm,
        report.error_estimate,
        report.hvps,
        a.out.display()
    ))
}

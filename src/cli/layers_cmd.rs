//! `hesscope layers`: SLQ on every block of the Hessian's diagonal (one
//! per module, a fused attention projection split into Q, K and V as
//! Zhang et al., NeurIPS 2024), each block's density on one shared grid,
//! its Bhattacharyya similarity to the full density, and the
//! Jensen–Shannon distance between every pair of block densities (their
//! heterogeneity measure) as a matrix and a heat map.

use crate::cli::output::{self, export};
use crate::cli::spectral_args::*;
use anyhow::{bail, Context, Result};
use clap::Args;
use hesscope::model::param_blocks::{fused_qkv, param_blocks};
use hesscope::report::{known, LayerRow, LayersReport};
use hesscope::spectral::heatmap::heatmap_svg;
use hesscope::spectral::layers::{bhattacharyya, js_matrix, BlockOperator};
use hesscope::spectral::slq;
use hesscope::spectral::SymOperator;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct LayersArgs {
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// Lanczos steps per layer run.
    #[arg(long, default_value_t = 30, allow_hyphen_values = true)]
    pub steps: usize,
    /// SLQ runs per layer (and for the full Hessian).
    #[arg(long, default_value_t = 3, allow_hyphen_values = true)]
    pub runs: usize,
    /// Split each fused q|k|v projection feeding an `mha` (GPT-2's
    /// `c_attn`, nn.MultiheadAttention's `in_proj`) into Q, K and V blocks
    /// (default: true where the model has one).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub split_qkv: Option<bool>,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub basis: BasisArgs,
    #[command(flatten)]
    pub smoothing: SmoothingArgs,
    /// Write the report as JSON (per block: λmax, λmin, trace, similarity,
    /// density; the shared grid; the Jensen–Shannon distance matrix; settings).
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// SVG heat map of the Jensen–Shannon distances between block densities.
    #[arg(long, help_heading = "Output")]
    pub heatmap: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: crate::cli::common::Inputs,
}

/// What `js_distance` in the report is.
const JS_MEASURE: &str = "Jensen–Shannon distance sqrt(JSD) between two block densities on the \
     shared grid, each normalised to a discrete distribution over the grid points (negatives \
     clamped to 0), log base 2 (so in [0, 1]), 0·log 0 = 0; null where a density has no mass";

/// Per block: λmax and trace from SLQ on its diagonal block, its density
/// on the shared grid, the Bhattacharyya coefficient between it and the
/// full density (see `layers::bhattacharyya`), and the Jensen–Shannon
/// distances between the blocks (see `layers::js_distance`).
pub fn layers_cmd(a: LayersArgs) -> Result<()> {
    check_count("--steps", a.steps, MAX_STEPS)?;
    check_count("--runs", a.runs, MAX_RUNS)?;
    a.sweep.validate()?;
    let budget = a.basis.budget()?;
    a.smoothing.validate()?;
    if let Some(p) = &a.heatmap {
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            bail!("invalid --heatmap {}: only .svg is written", p.display());
        }
    }
    let t0 = Instant::now();
    let mut l = a
        .inputs
        .load_with_options(a.basis.engine_options(a.sweep.block)?)?;
    a.basis.check_engine(l.engine.as_ref())?;
    let fused = fused_qkv(&l.model).len();
    let split = a.split_qkv.unwrap_or(fused > 0);
    if split && fused == 0 && a.split_qkv == Some(true) {
        output::notice(format!(
            "hesscope: --split-qkv: {} has no fused q|k|v projection feeding an mha; nothing to split",
            l.model.name
        ));
    }
    let blocks = param_blocks(&l.model, split).context("the Hessian blocks")?;
    let mut settings = a.inputs.settings_with_decisions(l.engine.as_mut(), None)?;
    settings.operator = Some(a.operator.get());
    let sweep = a.sweep.resolve(l.engine.as_ref());
    let mut h = a.operator.of(l.engine.as_mut());
    let n = h.dim();
    let CountedSlq {
        runs: full, basis, ..
    } = counted_slq(
        &mut h,
        a.steps.min(n),
        a.runs,
        a.inputs.seed,
        sweep,
        budget,
        &format!("full {}", a.operator.get().describe()),
    )?;
    let mut per = vec![];
    for b in &blocks {
        let size = b.len();
        let mut op = BlockOperator::with_ranges(&mut h, b.ranges.clone());
        let steps = a.steps.min(size);
        let runs = counted_slq(
            &mut op,
            steps,
            a.runs,
            a.inputs.seed,
            sweep,
            budget,
            &b.name,
        )?
        .runs;
        per.push((b.name.clone(), size, b.ranges.len(), runs));
    }
    // One grid for all, covering every block's and the full spectrum.
    let (mut lo, mut hi) = slq::extremes(&full);
    for (_, _, _, r) in &per {
        let (a_, b_) = slq::extremes(r);
        lo = lo.min(a_);
        hi = hi.max(b_);
    }
    let default_sigma = slq::default_sigma(lo, hi).max(0.01 * (hi - lo));
    let (grid, sigma) = a.smoothing.grid(lo, hi, default_sigma, LAYERS_GRID)?;
    let fd = a.smoothing.density(&full, &grid, sigma)?;
    let fs = slq::summarize(&full, n);
    let mut rows = vec![];
    let scale = fs.lambda_max.abs().max(fs.lambda_min.abs());
    for (name, size, pieces, runs) in per {
        let s = if slq::is_zero_block(&runs, scale) {
            slq::SlqSummary::zero()
        } else {
            slq::summarize(&runs, size)
        };
        let d = a.smoothing.density(&runs, &grid, sigma)?;
        rows.push(LayerRow {
            module: name,
            size,
            runs_of_indices: pieces,
            lambda_max: s.lambda_max,
            lambda_min: s.lambda_min,
            trace: s.trace,
            trace_stderr: known(s.trace_stderr),
            negative_mass: s.negative_mass,
            negative_mass_stderr: known(s.negative_mass_stderr),
            similarity: bhattacharyya(&grid, &d, &fd),
            density: d,
        });
    }
    let dens: Vec<Vec<f64>> = rows.iter().map(|r| r.density.clone()).collect();
    let js = js_matrix(&dens);
    if let Some(p) = &a.heatmap {
        let labels: Vec<String> = rows.iter().map(|r| r.module.clone()).collect();
        let title = format!(
            "{}: Jensen–Shannon distance between block Hessian densities",
            l.model.name
        );
        let text = heatmap_svg(&title, &labels, &js, 1.0);
        output::write_atomic(p, |t| {
            std::fs::write(t, &text).map_err(|e| hesscope::Error::io(t, e))
        })
        .with_context(|| format!("writing {}", p.display()))?;
    }
    let report = LayersReport {
        similarity_measure: "Bhattacharyya coefficient ∫√(p·q) between the layer's and the full SLQ density on a shared grid",
        js_measure: JS_MEASURE,
        split_qkv: split,
        full: fs,
        full_density: fd,
        layers: rows,
        js_distance: js,
        steps: a.steps,
        runs: a.runs,
        block: sweep,
        basis,
        sigma,
        grid,
        seconds: t0.elapsed().as_secs_f64(),
        settings,
    };
    export(a.inputs.json, a.out.as_deref(), &report)?;
    if a.inputs.json {
        return Ok(());
    }
    let w = report
        .layers
        .iter()
        .map(|r| r.module.chars().count())
        .max()
        .unwrap_or(0)
        .max(28);
    let mut text = format!(
        "{:<w$} {:>9} {:>14} {:>14} {:>14} {:>10} {:>8}\n",
        "block", "size", "λmax", "λmin", "trace", "similarity", "mean JS"
    );
    text.push_str(&format!(
        "{:<w$} {:>9} {:>14.6e} {:>14.6e} {:>14.6e} {:>10.4}\n",
        "(all)", n, report.full.lambda_max, report.full.lambda_min, report.full.trace, 1.0
    ));
    let k = report.layers.len();
    for (i, r) in report.layers.iter().enumerate() {
        let others: Vec<f64> = (0..k)
            .filter(|&j| j != i)
            .filter_map(|j| report.js_distance[i][j])
            .collect();
        let mean = if others.is_empty() {
            "-".to_string()
        } else {
            format!("{:.4}", others.iter().sum::<f64>() / others.len() as f64)
        };
        text.push_str(&format!(
            "{:<w$} {:>9} {:>14.6e} {:>14.6e} {:>14.6e} {:>10.4} {:>8}\n",
            r.module, r.size, r.lambda_max, r.lambda_min, r.trace, r.similarity, mean
        ));
    }
    text.push_str(&format!(
        "  {} blocks{}; Jensen–Shannon distances (base 2, in [0, 1]) between every pair in the report\n",
        k,
        if split { ", fused q|k|v projections split into Q, K, V" } else { "" }
    ));
    for p in a.out.iter().chain(&a.heatmap) {
        text.push_str(&format!("  wrote {}\n", p.display()));
    }
    text.push_str(&decisions_text(&report.settings));
    output::print(&text)
}

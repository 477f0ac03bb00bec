//! The spectral subcommands: density, eigs, trace, exact, layers.

use crate::cli::common::{self, Backend, Inputs};
use crate::cli::output::{self, export, or_unknown};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hesscope::report::{
    known, DensityReport, EigsReport, ExactReport, TraceEstimates, TraceReport, TraceRow,
};
use hesscope::spectral::bands;
use hesscope::spectral::deflate::{self, DeflateCount};
use hesscope::spectral::eigs::{eigs, gradient_fractions, EigsSettings, Which};
use hesscope::spectral::exact::{exact_spectrum, EXACT_HARD_MAX_PARAMS, EXACT_MAX_PARAMS};
use hesscope::spectral::layers::BlockOperator;
use hesscope::spectral::slq::{self, SlqRun};
use hesscope::spectral::trace::{hutchinson_block, hutchpp_block};
use hesscope::spectral::SymOperator;
use std::path::PathBuf;
use std::time::Instant;

pub use crate::cli::spectral_args::*;

#[derive(Args, Debug, Clone)]
pub struct DensityArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// Lanczos steps per run (default 90; with --deflate, 30 per bulk run).
    #[arg(long, allow_hyphen_values = true)]
    pub steps: Option<usize>,
    /// Independent runs (Gaussian start vectors). With --deflate, the
    /// budget is 90 × runs products in all (or --steps × runs), the
    /// deflation's included, and the bulk gets as many runs as it leaves.
    #[arg(long, default_value_t = slq::DEFAULT_RUNS, allow_hyphen_values = true)]
    pub runs: usize,
    /// Deflate the K eigenpairs of largest |λ| first (`eigs`, residual
    /// checked) and run SLQ on the rest; `auto`: every one of the top 64
    /// that converges within a third of the budget. See README.
    #[arg(long, value_name = "K|auto", value_parser = parse_deflate, allow_hyphen_values = true)]
    pub deflate: Option<DeflateCount>,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub basis: BasisArgs,
    #[command(flatten)]
    pub smoothing: SmoothingArgs,
    /// Write the report as JSON (grid, density, nodes and weights per run, summary, settings).
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// SVG of the density on a log-scale y axis.
    #[arg(long, help_heading = "Output")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: Inputs,
}

pub fn density(a: DensityArgs) -> Result<()> {
    let given_steps = a.steps.unwrap_or(slq::DEFAULT_STEPS);
    check_count("--steps", given_steps, MAX_STEPS)?;
    check_count("--runs", a.runs, MAX_RUNS)?;
    a.sweep.validate()?;
    let budget = a.basis.budget()?;
    a.smoothing.validate()?;
    check_plot(&a.plot)?;
    let t0 = Instant::now();
    let mut l = a
        .inputs
        .load_with_options(a.basis.engine_options(a.sweep.block)?)?;
    a.basis.check_engine(l.engine.as_ref())?;
    let range = block_range(&l.model, &a.block.layer)?;
    let mut settings = a
        .inputs
        .settings_with_decisions(l.engine.as_mut(), a.block.layer.as_deref())?;
    settings.operator = Some(a.operator.get());
    let sweep = a.sweep.resolve(l.engine.as_ref());
    let mut h = a.operator.of(l.engine.as_mut());
    let mut block = BlockOperator::new(&mut h, range.clone());
    let n = block.dim();
    let t = Instant::now();
    let (
        CountedSlq {
            runs,
            hvps,
            sweeps,
            hvp_seconds,
            basis,
        },
        steps,
        deflation,
    ) = match a.deflate {
        None => {
            let steps = given_steps.min(n);
            let r = counted_slq(
                &mut block,
                steps,
                a.runs,
                a.inputs.seed,
                sweep,
                budget,
                "density",
            )
            .context("stochastic Lanczos quadrature")?;
            (r, steps, None)
        }
        Some(count) => {
            // The budget of the undeflated default (or of --steps × --runs).
            let total = given_steps.saturating_mul(a.runs);
            let steps = a.steps.unwrap_or(deflate::DEFLATED_STEPS);
            check_count("--steps", steps, MAX_STEPS)?;
            let (r, d) = counted_deflated_slq(
                &mut block,
                count,
                total,
                steps,
                a.inputs.seed,
                sweep,
                budget,
            )
            .context("deflated stochastic Lanczos quadrature")?;
            let steps = d.bulk_steps;
            (r, steps, Some(d))
        }
    };
    let lanczos_seconds = t.elapsed().as_secs_f64();
    let mut summary = slq::summarize(&runs, n);
    // A block of a larger Hessian whose Ritz values are all tiny: compared
    // with ‖H u‖ of one random unit u over every parameter (one product).
    if n < l.model.n_params {
        let u = common::random_unit(l.model.n_params, a.inputs.seed);
        let mut hu = vec![0.0; u.len()];
        h.apply(&u, &mut hu).context("the full Hessian's scale")?;
        let scale = output::vnorm(&hu);
        if slq::is_zero_block(&runs, scale) {
            output::notice(format!(
                "hesscope: the block{} is zero but for rounding (every Ritz value within {:e}·‖Hu‖ \
                 of zero, ‖Hu‖ = {scale:.3e} for a random unit u): reported as zero",
                layer_suffix(&a.block.layer),
                slq::ZERO_BLOCK_TOL
            ));
            summary = slq::SlqSummary::zero();
        }
    }
    let smoothed = a.smoothing.smooth(&runs, slq::DEFAULT_GRID)?;
    let stderr = smoothed.stderr(&runs);
    let title = format!(
        "{}{} {} density ({} steps × {} runs{})",
        l.model.name,
        layer_suffix(&a.block.layer),
        a.operator.get().describe(),
        steps,
        runs.len(),
        deflation
            .as_ref()
            .map(|d| format!(", {} outliers deflated", d.k))
            .unwrap_or_default()
    );
    write_band_plot(
        &a.plot,
        &title,
        &smoothed.grid,
        &smoothed.density,
        stderr.as_deref(),
    )?;
    let report = DensityReport {
        lambda_max: summary.lambda_max,
        lambda_min: summary.lambda_min,
        trace: summary.trace,
        trace_stderr: known(summary.trace_stderr),
        negative_mass: summary.negative_mass,
        negative_mass_stderr: known(summary.negative_mass_stderr),
        n_params: n,
        steps,
        runs_count: runs.len(),
        sigma: smoothed.sigma,
        grid_points: smoothed.grid.len(),
        hvps,
        block: sweep,
        sweeps,
        lanczos_seconds,
        hvp_seconds,
        basis,
        seconds: t0.elapsed().as_secs_f64(),
        settings,
        grid: smoothed.grid,
        density: smoothed.density,
        band: bands::BAND_METHOD,
        density_stderr: stderr,
        deflation,
        runs,
    };
    export(a.inputs.json, a.out.as_deref(), &report)?;
    if a.inputs.json {
        return Ok(());
    }
    let mut text = format!(
        "{title} on {} ({})\n",
        report.settings.adapter, report.settings.backend
    );
    text.push_str(&band_text(&report));
    text.push_str(&format!(
        "  λmax {:.6e}   λmin {:.6e}\n",
        report.lambda_max, report.lambda_min
    ));
    text.push_str(&format!(
        "  trace ≈ {:.6e} ± {}   negative mass {:.4} ± {}\n",
        report.trace,
        or_unknown(report.trace_stderr, |s| format!("{s:.2e}")),
        report.negative_mass,
        or_unknown(report.negative_mass_stderr, |s| format!("{s:.1e}"))
    ));
    text.push_str(&format!(
        "  {hvps} {} products ({sweeps} sweeps of up to {sweep}) in {lanczos_seconds:.1} s, \
         {hvp_seconds:.1} s of them in the products (total {:.1} s); basis in {}\n",
        a.operator.get().describe(),
        report.seconds,
        report.basis
    ));
    for p in a.out.iter().chain(&a.plot) {
        text.push_str(&format!("  wrote {}\n", p.display()));
    }
    text.push_str(&decisions_text(&report.settings));
    output::print(&text)
}

/// `--which`: the CLI's mirror of the library's [`Which`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WhichArg {
    /// The algebraically largest eigenvalues, largest first.
    Largest,
    /// The algebraically smallest (most negative), smallest first.
    Smallest,
    /// The largest |λ|, largest first.
    Magnitude,
}

impl From<WhichArg> for Which {
    fn from(w: WhichArg) -> Which {
        match w {
            WhichArg::Largest => Which::Largest,
            WhichArg::Smallest => Which::Smallest,
            WhichArg::Magnitude => Which::Magnitude,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct EigsArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// How many eigenvalues.
    #[arg(long, default_value_t = 5, allow_hyphen_values = true)]
    pub top: usize,
    /// Which end of the spectrum.
    #[arg(long, value_enum, default_value_t = WhichArg::Largest)]
    pub which: WhichArg,
    /// Step budget of the Lanczos process.
    #[arg(long, default_value_t = 400, allow_hyphen_values = true)]
    pub steps: usize,
    /// Residual tolerance relative to |λmax|, in (0, 1).
    #[arg(long, default_value_t = 1e-6, allow_hyphen_values = true)]
    pub tol: f64,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub basis: BasisArgs,
    /// Write the report as JSON (eigenvalues, residuals, gradient fractions, settings).
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// Ritz vectors as safetensors: each parameter tensor with a leading K axis.
    #[arg(long, help_heading = "Output")]
    pub vectors: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: Inputs,
}

pub fn eigs_cmd(a: EigsArgs) -> Result<()> {
    check_count("--top", a.top, usize::MAX)?;
    check_count("--steps", a.steps, MAX_STEPS)?;
    if !(a.tol.is_finite() && a.tol > 0.0 && a.tol < 1.0) {
        bail!("invalid --tol: {}; a relative tolerance in (0, 1)", a.tol);
    }
    a.sweep.validate()?;
    let budget = a.basis.budget()?;
    let t0 = Instant::now();
    let mut l = a
        .inputs
        .load_with_options(a.basis.engine_options(a.sweep.block)?)?;
    a.basis.check_engine(l.engine.as_ref())?;
    let range = block_range(&l.model, &a.block.layer)?;
    if a.top > range.len() {
        bail!(
            "invalid --top: {} is more than the {} parameters{} of {}",
            a.top,
            range.len(),
            layer_suffix(&a.block.layer),
            l.model.name
        );
    }
    let mut settings = a
        .inputs
        .settings_with_decisions(l.engine.as_mut(), a.block.layer.as_deref())?;
    settings.operator = Some(a.operator.get());
    let sweep = a.sweep.resolve(l.engine.as_ref());
    let (_, grad) = l.engine.loss_grad().context("computing the gradient")?;
    let g = grad[range.clone()].to_vec();
    let mut h = a.operator.of(l.engine.as_mut());
    let mut block = BlockOperator::new(&mut h, range.clone());
    let mut op = Counted::new(&mut block, a.steps.min(range.len()), "eigs");
    let which: Which = a.which.into();
    let mut s = EigsSettings::new(a.top, which);
    s.tol = a.tol;
    s.max_steps = a.steps;
    s.seed = a.inputs.seed;
    s.block = sweep;
    s.basis_budget = budget;
    let r = eigs(&mut op, &s).context("Lanczos")?;
    op.bar.finish_and_clear();
    let (hvps, sweeps, hvp_seconds) = (op.count, op.sweeps, op.product_seconds);
    let fracs = gradient_fractions(&g, &r.vectors);
    if let Some(p) = &a.vectors {
        let k = r.vectors.len();
        let mut tensors = vec![];
        for spec in &l.model.params {
            let (o, len) = (spec.offset, spec.numel());
            if o < range.start || o + len > range.end {
                continue;
            }
            let mut data = Vec::with_capacity(k * len);
            for v in &r.vectors {
                data.extend_from_slice(&v[o - range.start..o - range.start + len]);
            }
            let mut shape = vec![k];
            shape.extend(&spec.shape);
            tensors.push((spec.name.clone(), shape, data));
        }
        output::write_atomic(p, |t| hesscope::model::tensorio::write_f64(t, &tensors))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let report = EigsReport {
        eigenvalues: r.values,
        residuals: r.residuals,
        converged: r.converged,
        which,
        tol: a.tol,
        steps: r.steps,
        hvps,
        block: sweep,
        sweeps,
        hvp_seconds,
        basis: r.basis.clone(),
        grad_frac_in_top_k: fracs,
        seconds: t0.elapsed().as_secs_f64(),
        settings,
        vectors: a.vectors.clone(),
    };
    export(a.inputs.json, a.out.as_deref(), &report)?;
    if a.inputs.json {
        return Ok(());
    }
    let mut text = format!(
        "{} eigenvalues ({:?}) of the {} of {}{}:\n",
        report.eigenvalues.len(),
        which,
        a.operator.get().describe(),
        l.model.name,
        layer_suffix(&a.block.layer)
    );
    for (i, (l, res)) in report.eigenvalues.iter().zip(&report.residuals).enumerate() {
        text.push_str(&format!(
            "  λ{:<3} {l:>16.9e}   residual {res:.2e}   ‖g‖² fraction in top {} {:.4}\n",
            i + 1,
            i + 1,
            report.grad_frac_in_top_k[i]
        ));
    }
    if !report.converged {
        text.push_str(&format!(
            "  NOT CONVERGED: residuals above {:.1e}·|λmax| after {} steps (raise --steps)\n",
            a.tol, report.steps
        ));
    }
    text.push_str(&format!(
        "  {hvps} Hessian-vector products ({sweeps} sweeps of up to {sweep}), {:.1} s, \
         {hvp_seconds:.1} s of it in the products; basis in {}\n",
        report.seconds, report.basis
    ));
    text.push_str(&decisions_text(&report.settings));
    output::print(&text)
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// Hutchinson probes (and Hutch++'s budget of products).
    #[arg(long, default_value_t = 100, allow_hyphen_values = true)]
    pub probes: usize,
    /// Per layer (module), each with its own estimates.
    #[arg(long, conflicts_with = "layer")]
    pub layerwise: bool,
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Write the report as JSON (estimates with standard errors per block, settings).
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: Inputs,
}

fn trace_of(
    op: &mut dyn SymOperator,
    probes: usize,
    seed: u64,
    block: usize,
) -> Result<TraceEstimates> {
    let hutchinson = hutchinson_block(op, probes, seed, block)?;
    let hutchpp = if probes >= 6 && op.dim() >= 2 {
        Some(hutchpp_block(op, probes, seed, block)?)
    } else {
        None
    };
    Ok(TraceEstimates {
        hutchinson,
        hutchpp,
    })
}

pub fn trace_cmd(a: TraceArgs) -> Result<()> {
    check_count("--probes", a.probes, MAX_PROBES)?;
    a.sweep.validate()?;
    let t0 = Instant::now();
    let mut l = a.inputs.load_block(a.sweep.block)?;
    let mut settings = a
        .inputs
        .settings_with_decisions(l.engine.as_mut(), a.block.layer.as_deref())?;
    settings.operator = Some(a.operator.get());
    let sweep = a.sweep.resolve(l.engine.as_ref());
    let blocks: Vec<(String, std::ops::Range<usize>)> = if a.layerwise {
        l.model.modules()
    } else {
        vec![(
            a.block.layer.clone().unwrap_or_else(|| "all".into()),
            block_range(&l.model, &a.block.layer)?,
        )]
    };
    let mut h = a.operator.of(l.engine.as_mut());
    let mut rows = vec![];
    for (name, range) in blocks {
        let mut block = BlockOperator::new(&mut h, range.clone());
        let mut op = Counted::new(&mut block, 2 * a.probes, &name);
        let estimates = trace_of(&mut op, a.probes, a.inputs.seed, sweep)?;
        op.bar.finish_and_clear();
        if !a.inputs.json {
            let e = |t: &hesscope::spectral::trace::TraceEstimate| {
                format!(
                    "{:>13.6e} ± {}",
                    t.estimate,
                    or_unknown(known(t.stderr), |s| format!("{s:.2e}"))
                )
            };
            output::line(format!(
                "  {name:<24} size {:>9}   Hutchinson {}   Hutch++ {}",
                range.len(),
                e(&estimates.hutchinson),
                estimates
                    .hutchpp
                    .as_ref()
                    .map(e)
                    .unwrap_or_else(|| "-".into())
            ))?;
        }
        rows.push(TraceRow {
            layer: name,
            size: range.len(),
            estimates,
        });
    }
    let report = TraceReport {
        traces: rows,
        probes: a.probes,
        block: sweep,
        seconds: t0.elapsed().as_secs_f64(),
        settings,
    };
    export(a.inputs.json, a.out.as_deref(), &report)
}

#[derive(Args, Debug, Clone)]
pub struct ExactArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// Largest model (or block) accepted: n Hessian-vector products and an
    /// n×n float64 matrix.
    #[arg(long, default_value_t = EXACT_MAX_PARAMS, allow_hyphen_values = true)]
    pub max_params: usize,
    #[command(flatten)]
    pub smoothing: SmoothingArgs,
    /// Write the report as JSON (every eigenvalue, the smoothed density, settings).
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// SVG of the density with the eigenvalues marked.
    #[arg(long, help_heading = "Output")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: Inputs,
}

pub fn exact_cmd(mut a: ExactArgs) -> Result<()> {
    if a.max_params > EXACT_HARD_MAX_PARAMS {
        bail!(
            "invalid --max-params: {} would allow a dense {n}×{n} float64 Hessian ({} GiB); \
             the limit is {EXACT_HARD_MAX_PARAMS} parameters ({} GiB; use `density` beyond)",
            a.max_params,
            (a.max_params as u128 * a.max_params as u128 * 8) >> 30,
            (EXACT_HARD_MAX_PARAMS * EXACT_HARD_MAX_PARAMS * 8) >> 30,
            n = a.max_params
        );
    }
    a.smoothing.validate()?;
    check_plot(&a.plot)?;
    // The dense Hessian is ground truth: the float64 reference unless a GPU
    // backend is named explicitly.
    if a.inputs.backend == Backend::Auto {
        a.inputs.backend = Backend::Cpu;
    }
    let t0 = Instant::now();
    let (model, weights) = a.inputs.model_and_weights()?;
    let range = block_range(&model, &a.block.layer)?;
    if range.len() > a.max_params {
        bail!(
            "{} has {} parameters{}; `exact` builds a dense {n}×{n} float64 Hessian from {n} products and is limited to --max-params {} (use `density`)",
            model.name, range.len(), a.block.layer.as_ref().map(|l| format!(" in {l}")).unwrap_or_default(), a.max_params, n = range.len()
        );
    }
    let mut l = a.inputs.load_with(model, weights)?;
    let mut settings = a
        .inputs
        .settings_with_decisions(l.engine.as_mut(), a.block.layer.as_deref())?;
    settings.operator = Some(a.operator.get());
    let (_, grad) = l.engine.loss_grad().context("computing the gradient")?;
    let g = grad[range.clone()].to_vec();
    let mut h = a.operator.of(l.engine.as_mut());
    let mut block = BlockOperator::new(&mut h, range.clone());
    let n = block.dim();
    let mut op = Counted::new(&mut block, n, "exact");
    let ex = exact_spectrum(&mut op, a.max_params).context("the dense Hessian")?;
    op.bar.finish_and_clear();
    let vals = ex.values;
    let (Some(&lmin), Some(&lmax)) = (vals.first(), vals.last()) else {
        bail!(
            "{} has no parameters{}: no spectrum",
            l.model.name,
            layer_suffix(&a.block.layer)
        );
    };
    let trace: f64 = vals.iter().sum();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    let neg: f64 = vals.iter().filter(|v| **v < 0.0).map(|v| v.abs()).sum();
    let top: Vec<Vec<f64>> = ex.vectors.iter().rev().take(10).cloned().collect();
    let fracs = gradient_fractions(&g, &top);
    let one = [SlqRun {
        nodes: vals.clone(),
        weights: vec![1.0 / n as f64; n],
        breakdowns: 0,
    }];
    let smoothed = a.smoothing.smooth(&one, slq::DEFAULT_GRID)?;
    write_plot(
        &a.plot,
        &format!(
            "{} exact {} spectrum (n = {n})",
            l.model.name,
            a.operator.get().describe()
        ),
        &smoothed.grid,
        &smoothed.density,
        Some(&vals),
    )?;
    let report = ExactReport {
        lambda_max: lmax,
        lambda_min: lmin,
        trace,
        negative_mass: if abs > 0.0 { neg / abs } else { 0.0 },
        frac_negative: vals.iter().filter(|v| **v < 0.0).count() as f64 / n as f64,
        top5: vals.iter().rev().take(5).copied().collect(),
        bottom5: vals.iter().take(5).copied().collect(),
        grad_frac_in_top_k: fracs,
        asymmetry: ex.asymmetry,
        n_params: n,
        sigma: smoothed.sigma,
        seconds: t0.elapsed().as_secs_f64(),
        settings,
        grid: smoothed.grid,
        density: smoothed.density,
        eigenvalues: vals,
    };
    export(a.inputs.json, a.out.as_deref(), &report)?;
    if a.inputs.json {
        return Ok(());
    }
    output::print(&format!(
        "exact spectrum of {} ({n} parameters, {n} products):\n  λmax {lmax:.9e}   λmin {lmin:.9e}   trace {trace:.6e}   negative mass {:.4}\n  asymmetry of the assembled Hessian {:.1e}; {:.1} s\n{}",
        l.model.name, report.negative_mass, report.asymmetry, report.seconds,
        decisions_text(&report.settings)
    ))
}

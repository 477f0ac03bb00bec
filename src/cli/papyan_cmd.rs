//! `hesscope papyan`: Papyan's view of one checkpoint — the SLQ densities
//! of the Hessian H, its Gauss–Newton term G and the residual E = H − G on
//! one grid (and one plot), with the outliers of G (its top eigenvalues,
//! residual-checked by `eigs`, above the widest relative gap among them)
//! counted against the number of classes C (Papyan 2019, 2020 find about C
//! outliers in G's spectrum of a trained classifier, set by the class
//! means; what a given checkpoint shows is what this measures).

use crate::cli::common::Inputs;
use crate::cli::output::{self, export};
use crate::cli::spectral_args::*;
use anyhow::{Context, Result};
use clap::Args;
use hesscope::engine::CurvatureOperator;
use hesscope::operator::{outliers, Operator};
use hesscope::report::Settings;
use hesscope::spectral::eigs::{eigs, EigsSettings, Which};
use hesscope::spectral::plot::{densities_svg, DensitySeries};
use hesscope::spectral::slq::{self, SlqSummary};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct PapyanArgs {
    /// Lanczos steps per SLQ run (each of H, G, E).
    #[arg(long, default_value_t = 60, allow_hyphen_values = true)]
    pub steps: usize,
    /// SLQ runs per operator.
    #[arg(long, default_value_t = 5, allow_hyphen_values = true)]
    pub runs: usize,
    /// How many top eigenvalues of G `eigs` finds to look for the outliers
    /// among (default: 2 × the classes + 2).
    #[arg(long, allow_hyphen_values = true)]
    pub top: Option<usize>,
    /// Lanczos step budget of that `eigs`.
    #[arg(long, default_value_t = 300, allow_hyphen_values = true)]
    pub eigs_steps: usize,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub basis: BasisArgs,
    #[command(flatten)]
    pub smoothing: SmoothingArgs,
    /// Write the report as JSON (the three densities on one grid, their
    /// summaries, G's top eigenvalues and the outlier count).
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// SVG of the three densities on one log-scale figure.
    #[arg(long, help_heading = "Output")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub inputs: Inputs,
}

/// One operator's SLQ summary and density.
#[derive(Clone, Debug, Serialize)]
pub struct OperatorDensity {
    pub operator: Operator,
    pub summary: SlqSummary,
    pub density: Vec<f64>,
}

/// `hesscope papyan`.
#[derive(Clone, Debug, Serialize)]
pub struct PapyanReport {
    /// The model's classes (a language model: its vocabulary).
    pub classes: usize,
    /// G's eigenvalues above the widest relative gap among its top ones.
    pub outliers: usize,
    /// That gap: λ_outliers / λ_(outliers+1).
    pub gap_ratio: f64,
    /// G's top eigenvalues (largest first) and their residuals ‖Gx − λx‖.
    pub ggn_top: Vec<f64>,
    pub ggn_residuals: Vec<f64>,
    pub converged: bool,
    pub steps: usize,
    pub runs: usize,
    pub sigma: f64,
    pub grid: Vec<f64>,
    /// H, G and E, in that order.
    pub densities: Vec<OperatorDensity>,
    pub seconds: f64,
    pub settings: Settings,
}

pub fn papyan_cmd(a: PapyanArgs) -> Result<()> {
    check_count("--steps", a.steps, MAX_STEPS)?;
    check_count("--runs", a.runs, MAX_RUNS)?;
    check_count("--eigs-steps", a.eigs_steps, MAX_STEPS)?;
    a.sweep.validate()?;
    let budget = a.basis.budget()?;
    a.smoothing.validate()?;
    check_plot(&a.plot)?;
    let t0 = Instant::now();
    let mut l = a
        .inputs
        .load_with_options(a.basis.engine_options(a.sweep.block)?)?;
    a.basis.check_engine(l.engine.as_ref())?;
    let n = l.model.n_params;
    let classes = l.model.classes;
    let top = a.top.unwrap_or(2 * classes + 2).min(n);
    check_count("--top", top, n)?;
    let settings = a.inputs.settings_with_decisions(l.engine.as_mut(), None)?;
    let sweep = a.sweep.resolve(l.engine.as_ref());
    let steps = a.steps.min(n);
    let mut all_runs = vec![];
    for op in Operator::ALL {
        let mut c = CurvatureOperator::new(l.engine.as_mut(), op);
        let r = counted_slq(
            &mut c,
            steps,
            a.runs,
            a.inputs.seed,
            sweep,
            budget,
            op.describe(),
        )
        .with_context(|| format!("SLQ of the {}", op.describe()))?;
        all_runs.push((op, r.runs));
    }
    let mut s = EigsSettings::new(top, Which::Largest);
    s.max_steps = a.eigs_steps;
    s.seed = a.inputs.seed;
    s.block = sweep;
    s.basis_budget = budget;
    let mut g = CurvatureOperator::new(l.engine.as_mut(), Operator::Ggn);
    let e = eigs(&mut g, &s).context("the top eigenvalues of G (Lanczos)")?;
    let (count, gap) = outliers(&e.values);
    // One grid over the three spectra.
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (_, r) in &all_runs {
        let (x, y) = slq::extremes(r);
        lo = lo.min(x);
        hi = hi.max(y);
    }
    let (grid, sigma) = a
        .smoothing
        .grid(lo, hi, slq::default_sigma(lo, hi), slq::DEFAULT_GRID)?;
    let mut densities = vec![];
    for (op, r) in &all_runs {
        densities.push(OperatorDensity {
            operator: *op,
            summary: slq::summarize(r, n),
            density: a.smoothing.density(r, &grid, sigma)?,
        });
    }
    let title = format!(
        "{}: H, G and E = H − G ({steps} steps × {} runs); G outliers {count}, classes {classes}",
        l.model.name, a.runs
    );
    if let Some(p) = &a.plot {
        let series: Vec<DensitySeries> = densities
            .iter()
            .map(|d| DensitySeries {
                label: d.operator.describe().split(' ').next().unwrap_or("").into(),
                grid: &grid,
                density: &d.density,
            })
            .collect();
        let text = densities_svg(&title, &series);
        output::write_atomic(p, |t| {
            std::fs::write(t, &text).map_err(|e| hesscope::Error::io(t, e))
        })
        .with_context(|| format!("writing {}", p.display()))?;
    }
    let report = PapyanReport {
        classes,
        outliers: count,
        gap_ratio: gap,
        ggn_top: e.values,
        ggn_residuals: e.residuals,
        converged: e.converged,
        steps,
        runs: a.runs,
        sigma,
        grid,
        densities,
        seconds: t0.elapsed().as_secs_f64(),
        settings,
    };
    export(a.inputs.json, a.out.as_deref(), &report)?;
    if a.inputs.json {
        return Ok(());
    }
    let mut text = format!("{title}\n");
    for d in &report.densities {
        text.push_str(&format!(
            "  {:<18} λmax {:>13.6e}   λmin {:>13.6e}   trace {:>13.6e}   negative mass {:.4}\n",
            d.operator.describe(),
            d.summary.lambda_max,
            d.summary.lambda_min,
            d.summary.trace,
            d.summary.negative_mass
        ));
    }
    text.push_str(&format!(
        "  G's top {}: {}\n  outliers: {count} above a gap of ×{gap:.2} (classes: {classes}){}\n",
        report.ggn_top.len(),
        report
            .ggn_top
            .iter()
            .map(|x| format!("{x:.4e}"))
            .collect::<Vec<_>>()
            .join(" "),
        if report.converged {
            ""
        } else {
            "; eigs NOT CONVERGED (raise --eigs-steps)"
        }
    ));
    for p in a.out.iter().chain(&a.plot) {
        text.push_str(&format!("  wrote {}\n", p.display()));
    }
    output::print(&text)
}

#[cfg(test)]
mod tests {
    use hesscope::operator::outliers;

    #[test]
    fn outliers_sit_above_the_widest_gap() {
        assert_eq!(outliers(&[100.0, 90.0, 80.0, 2.0, 1.5, 1.0]), (3, 40.0));
        assert_eq!(outliers(&[5.0]), (0, 1.0));
        assert_eq!(outliers(&[4.0, 1.0, -1.0]), (1, 4.0));
        assert_eq!(outliers(&[]), (0, 1.0));
    }
}

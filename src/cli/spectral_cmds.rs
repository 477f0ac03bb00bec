//! The spectral subcommands: density, eigs, trace, exact, layers.

use crate::cli::common::{Backend, Inputs};
use anyhow::{bail, Context, Result};
use clap::Args;
use hesscope::engine::{Curvature, Hessian};
use hesscope::model::Model;
use hesscope::spectral::eigs::{eigs, gradient_fractions, EigsSettings, Which};
use hesscope::spectral::exact::{exact_spectrum, EXACT_MAX_PARAMS};
use hesscope::spectral::layers::{bhattacharyya, BlockOperator};
use hesscope::spectral::plot::density_svg;
use hesscope::spectral::slq::{self, SlqRun};
use hesscope::spectral::trace::{hutchinson, hutchpp};
use hesscope::spectral::SymOperator;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// An operator that ticks a progress bar per product (drawn only on a
/// terminal) and counts the products.
pub struct Counted<'a> {
    pub inner: &'a mut dyn SymOperator,
    pub bar: ProgressBar,
    pub count: usize,
}

impl<'a> Counted<'a> {
    pub fn new(inner: &'a mut dyn SymOperator, expected: usize, what: &str) -> Counted<'a> {
        let bar = if std::io::stderr().is_terminal() {
            let b = ProgressBar::new(expected as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} HVPs, {elapsed} (eta {eta})",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.set_message(what.to_string());
            b
        } else {
            ProgressBar::with_draw_target(Some(expected as u64), ProgressDrawTarget::hidden())
        };
        Counted {
            inner,
            bar,
            count: 0,
        }
    }
}

impl SymOperator for Counted<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
        self.count += 1;
        self.bar.inc(1);
        self.inner.apply(v, out)
    }
}

#[derive(Args, Debug, Clone)]
pub struct Which_ {
    /// The diagonal block of one layer or name-prefix group (`layer1`, `fc`).
    #[arg(long)]
    pub layer: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DensityArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub block: Which_,
    /// Lanczos steps per run.
    #[arg(long, default_value_t = slq::DEFAULT_STEPS)]
    pub steps: usize,
    /// Independent runs (Gaussian start vectors).
    #[arg(long, default_value_t = slq::DEFAULT_RUNS)]
    pub runs: usize,
    /// Kernel standard deviation (default: sigma² = 1e-5·max(1, λmax − λmin)).
    #[arg(long)]
    pub sigma: Option<f64>,
    /// Grid points.
    #[arg(long, default_value_t = slq::DEFAULT_GRID)]
    pub grid: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// SVG of the density on a log-scale y axis.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The layer's parameter range, or everything.
fn block_range(model: &Model, layer: &Option<String>) -> Result<std::ops::Range<usize>> {
    match layer {
        Some(l) => Ok(model.prefix_range(l)?),
        None => Ok(0..model.n_params),
    }
}

fn write_json(path: &Option<PathBuf>, v: &Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn write_plot(
    path: &Option<PathBuf>,
    title: &str,
    grid: &[f64],
    dens: &[f64],
    exact: Option<&[f64]>,
) -> Result<()> {
    if let Some(p) = path {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "svg" {
            bail!("--plot {}: only .svg is written", p.display());
        }
        std::fs::write(p, density_svg(title, grid, dens, exact))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn check_positive(flag: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(())
}

/// Grid, normalised density and sigma for a set of runs.
fn smooth(runs: &[SlqRun], sigma: Option<f64>, points: usize) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let (lmin, lmax) = slq::extremes(runs);
    let sigma = sigma.unwrap_or_else(|| slq::default_sigma(lmin, lmax));
    if !(sigma > 0.0 && sigma.is_finite()) {
        bail!("--sigma must be positive");
    }
    let grid = slq::default_grid(lmin, lmax, sigma, points.max(2));
    let mut dens = slq::density_on(runs, &grid, sigma);
    slq::normalize(&grid, &mut dens);
    Ok((grid, dens, sigma))
}

fn settings_json(inputs: &Inputs, engine: &dyn Curvature, layer: &Option<String>) -> Value {
    json!({
        "model": inputs.model, "weights": inputs.weights, "data": inputs.data, "samples": inputs.samples,
        "batch": inputs.batch, "bn": inputs.bn, "seed": inputs.seed, "layer": layer,
        "backend": engine.backend(), "adapter": engine.adapter(),
    })
}

/// SLQ over `op` with a progress bar (on a terminal): the runs and how many
/// HVPs they took.
fn counted_slq(
    op: &mut dyn SymOperator,
    steps: usize,
    runs: usize,
    seed: u64,
    what: &str,
) -> hesscope::Result<(Vec<slq::SlqRun>, usize)> {
    let mut counted = Counted::new(op, steps * runs, what);
    let r = slq::slq(&mut counted, steps, runs, seed)?;
    counted.bar.finish_and_clear();
    Ok((r, counted.count))
}

pub fn density(a: DensityArgs) -> Result<()> {
    check_positive("--steps", a.steps)?;
    check_positive("--runs", a.runs)?;
    check_positive("--grid", a.grid)?;
    let t0 = Instant::now();
    let mut engine = a.inputs.engine()?;
    let (model, _) = a.inputs.model_and_weights()?;
    let range = block_range(&model, &a.block.layer)?;
    let settings = settings_json(&a.inputs, engine.as_ref(), &a.block.layer);
    let mut h = Hessian(engine.as_mut());
    let mut block = BlockOperator::new(&mut h, range.clone());
    let n = block.dim();
    let steps = a.steps.min(n);
    let t = Instant::now();
    let (runs, hvps) = counted_slq(&mut block, steps, a.runs, a.inputs.seed, "density")
        .context("stochastic Lanczos quadrature")?;
    let lanczos_seconds = t.elapsed().as_secs_f64();
    let summary = slq::summarize(&runs, n);
    let (grid, dens, sigma) = smooth(&runs, a.sigma, a.grid)?;
    let title = format!(
        "{}{} Hessian density ({} steps × {} runs)",
        model.name,
        a.block
            .layer
            .as_ref()
            .map(|l| format!(" [{l}]"))
            .unwrap_or_default(),
        steps,
        a.runs
    );
    write_plot(&a.plot, &title, &grid, &dens, None)?;
    let out = json!({
        "lambda_max": summary.lambda_max, "lambda_min": summary.lambda_min,
        "trace": summary.trace, "trace_stderr": summary.trace_stderr, "negative_mass": summary.negative_mass,
        "n_params": n, "steps": steps, "runs_count": a.runs, "sigma": sigma, "grid_points": grid.len(),
        "hvps": hvps, "lanczos_seconds": lanczos_seconds, "seconds": t0.elapsed().as_secs_f64(),
        "settings": settings, "grid": grid, "density": dens, "runs": runs,
    });
    write_json(&a.out, &out)?;
    if a.inputs.json {
        println!("{out}");
    } else {
        println!(
            "{title} on {} ({})",
            out["settings"]["adapter"].as_str().unwrap_or(""),
            out["settings"]["backend"].as_str().unwrap_or("")
        );
        println!(
            "  λmax {:.6e}   λmin {:.6e}",
            summary.lambda_max, summary.lambda_min
        );
        println!(
            "  trace ≈ {:.6e} ± {:.2e}   negative mass {:.4}",
            summary.trace, summary.trace_stderr, summary.negative_mass
        );
        println!(
            "  {hvps} Hessian-vector products in {lanczos_seconds:.1} s (total {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        if let Some(p) = &a.out {
            println!("  wrote {}", p.display());
        }
        if let Some(p) = &a.plot {
            println!("  wrote {}", p.display());
        }
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct EigsArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub block: Which_,
    /// How many eigenvalues.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    #[arg(long, value_enum, default_value_t = Which::Largest)]
    pub which: Which,
    /// Step budget of the Lanczos process.
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Residual tolerance relative to |λmax|.
    #[arg(long, default_value_t = 1e-6)]
    pub tol: f64,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Ritz vectors as safetensors: each parameter tensor with a leading K axis.
    #[arg(long)]
    pub vectors: Option<PathBuf>,
}

pub fn eigs_cmd(a: EigsArgs) -> Result<()> {
    check_positive("--top", a.top)?;
    if a.tol.is_nan() || a.tol <= 0.0 {
        bail!("--tol must be positive");
    }
    let t0 = Instant::now();
    let mut engine = a.inputs.engine()?;
    let (model, _) = a.inputs.model_and_weights()?;
    let range = block_range(&model, &a.block.layer)?;
    let settings = settings_json(&a.inputs, engine.as_ref(), &a.block.layer);
    let (_, grad) = engine.loss_grad().context("computing the gradient")?;
    let g = grad[range.clone()].to_vec();
    let mut h = Hessian(engine.as_mut());
    let mut block = BlockOperator::new(&mut h, range.clone());
    let mut op = Counted::new(&mut block, a.steps.min(range.len()), "eigs");
    let mut s = EigsSettings::new(a.top, a.which);
    s.tol = a.tol;
    s.max_steps = a.steps;
    s.seed = a.inputs.seed;
    let r = eigs(&mut op, &s).context("Lanczos")?;
    op.bar.finish_and_clear();
    let hvps = op.count;
    let fracs = gradient_fractions(&g, &r.vectors);
    if let Some(p) = &a.vectors {
        let k = r.vectors.len();
        let mut tensors = vec![];
        for spec in &model.params {
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
        hesscope::model::tensorio::write_f64(p, &tensors)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let out = json!({
        "eigenvalues": r.values, "residuals": r.residuals, "converged": r.converged,
        "which": a.which, "tol": a.tol, "steps": r.steps, "hvps": hvps,
        "grad_frac_in_top_k": fracs, "seconds": t0.elapsed().as_secs_f64(), "settings": settings,
        "vectors": a.vectors,
    });
    write_json(&a.out, &out)?;
    if a.inputs.json {
        println!("{out}");
    } else {
        println!(
            "{} eigenvalues ({:?}) of {}{}:",
            r.values.len(),
            a.which,
            model.name,
            a.block
                .layer
                .as_ref()
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default()
        );
        for (i, (l, res)) in r.values.iter().zip(&r.residuals).enumerate() {
            println!(
                "  λ{:<3} {l:>16.9e}   residual {res:.2e}   ‖g‖² fraction in top {} {:.4}",
                i + 1,
                i + 1,
                fracs[i]
            );
        }
        if !r.converged {
            println!(
                "  NOT CONVERGED: residuals above {:.1e}·|λmax| after {} steps (raise --steps)",
                a.tol, r.steps
            );
        }
        println!(
            "  {hvps} Hessian-vector products, {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub block: Which_,
    /// Hutchinson probes (and Hutch++'s budget of products).
    #[arg(long, default_value_t = 100)]
    pub probes: usize,
    /// Per layer (module), each with its own estimates.
    #[arg(long)]
    pub layerwise: bool,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn trace_of(op: &mut dyn SymOperator, probes: usize, seed: u64) -> Result<Value> {
    let h = hutchinson(op, probes, seed)?;
    let hpp = if probes >= 6 && op.dim() >= 2 {
        Some(hutchpp(op, probes, seed)?)
    } else {
        None
    };
    Ok(json!({ "hutchinson": h, "hutchpp": hpp }))
}

pub fn trace_cmd(a: TraceArgs) -> Result<()> {
    check_positive("--probes", a.probes)?;
    let t0 = Instant::now();
    let mut engine = a.inputs.engine()?;
    let (model, _) = a.inputs.model_and_weights()?;
    let settings = settings_json(&a.inputs, engine.as_ref(), &a.block.layer);
    let mut h = Hessian(engine.as_mut());
    let blocks: Vec<(String, std::ops::Range<usize>)> = if a.layerwise {
        model.modules()
    } else {
        vec![(
            a.block.layer.clone().unwrap_or_else(|| "all".into()),
            block_range(&model, &a.block.layer)?,
        )]
    };
    let mut rows = vec![];
    for (name, range) in blocks {
        let mut block = BlockOperator::new(&mut h, range.clone());
        let mut op = Counted::new(&mut block, 2 * a.probes, &name);
        let est = trace_of(&mut op, a.probes, a.inputs.seed)?;
        op.bar.finish_and_clear();
        if !a.inputs.json {
            let hu = &est["hutchinson"];
            let hp = &est["hutchpp"];
            println!(
                "  {name:<24} size {:>9}   Hutchinson {:>13.6e} ± {:.2e}   Hutch++ {}",
                range.len(),
                hu["estimate"].as_f64().unwrap_or(f64::NAN),
                hu["stderr"].as_f64().unwrap_or(f64::NAN),
                if hp.is_null() {
                    "-".to_string()
                } else {
                    format!(
                        "{:.6e} ± {:.2e}",
                        hp["estimate"].as_f64().unwrap_or(f64::NAN),
                        hp["stderr"].as_f64().unwrap_or(f64::NAN)
                    )
                }
            );
        }
        rows.push(json!({ "layer": name, "size": range.len(), "estimates": est }));
    }
    let out = json!({ "traces": rows, "probes": a.probes, "seconds": t0.elapsed().as_secs_f64(), "settings": settings });
    write_json(&a.out, &out)?;
    if a.inputs.json {
        println!("{out}");
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct ExactArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    #[command(flatten)]
    pub block: Which_,
    /// Largest model accepted.
    #[arg(long, default_value_t = EXACT_MAX_PARAMS)]
    pub max_params: usize,
    #[arg(long)]
    pub sigma: Option<f64>,
    #[arg(long, default_value_t = slq::DEFAULT_GRID)]
    pub grid: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn exact_cmd(mut a: ExactArgs) -> Result<()> {
    // The dense Hessian is ground truth: the float64 reference unless a GPU
    // backend is named explicitly.
    if a.inputs.backend == Backend::Auto {
        a.inputs.backend = Backend::Cpu;
    }
    let t0 = Instant::now();
    let (model, _) = a.inputs.model_and_weights()?;
    let range = block_range(&model, &a.block.layer)?;
    if range.len() > a.max_params {
        bail!(
            "{} has {} parameters{}; `exact` builds a dense {n}×{n} float64 Hessian from {n} products and is limited to --max-params {} (use `density`)",
            model.name, range.len(), a.block.layer.as_ref().map(|l| format!(" in {l}")).unwrap_or_default(), a.max_params, n = range.len()
        );
    }
    let mut engine = a.inputs.engine()?;
    let settings = settings_json(&a.inputs, engine.as_ref(), &a.block.layer);
    let (_, grad) = engine.loss_grad()?;
    let g = grad[range.clone()].to_vec();
    let mut h = Hessian(engine.as_mut());
    let mut block = BlockOperator::new(&mut h, range.clone());
    let n = block.dim();
    let mut op = Counted::new(&mut block, n, "exact");
    let ex = exact_spectrum(&mut op, a.max_params)?;
    op.bar.finish_and_clear();
    let vals = &ex.values;
    let lmax = *vals.last().unwrap();
    let lmin = vals[0];
    let trace: f64 = vals.iter().sum();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    let neg: f64 = vals.iter().filter(|v| **v < 0.0).map(|v| v.abs()).sum();
    let top: Vec<Vec<f64>> = ex.vectors.iter().rev().take(10).cloned().collect();
    let fracs = gradient_fractions(&g, &top);
    let sigma = a.sigma.unwrap_or_else(|| slq::default_sigma(lmin, lmax));
    let grid = slq::default_grid(lmin, lmax, sigma, a.grid.max(2));
    let one = [SlqRun {
        nodes: vals.clone(),
        weights: vec![1.0 / n as f64; n],
        breakdowns: 0,
    }];
    let mut dens = slq::density_on(&one, &grid, sigma);
    slq::normalize(&grid, &mut dens);
    write_plot(
        &a.plot,
        &format!("{} exact Hessian spectrum (n = {n})", model.name),
        &grid,
        &dens,
        Some(vals),
    )?;
    let out = json!({
        "lambda_max": lmax, "lambda_min": lmin, "trace": trace,
        "negative_mass": if abs > 0.0 { neg / abs } else { 0.0 },
        "frac_negative": vals.iter().filter(|v| **v < 0.0).count() as f64 / n as f64,
        "top5": vals.iter().rev().take(5).collect::<Vec<_>>(), "bottom5": vals.iter().take(5).collect::<Vec<_>>(),
        "grad_frac_in_top_k": fracs, "asymmetry": ex.asymmetry, "n_params": n, "sigma": sigma,
        "seconds": t0.elapsed().as_secs_f64(), "settings": settings,
        "grid": grid, "density": dens, "eigenvalues": vals,
    });
    write_json(&a.out, &out)?;
    if a.inputs.json {
        println!("{out}");
    } else {
        println!(
            "exact spectrum of {} ({n} parameters, {} products):",
            model.name, n
        );
        println!(
            "  λmax {lmax:.9e}   λmin {lmin:.9e}   trace {trace:.6e}   negative mass {:.4}",
            out["negative_mass"].as_f64().unwrap()
        );
        println!(
            "  asymmetry of the assembled Hessian {:.1e}; {:.1} s",
            ex.asymmetry,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct LayersArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// Lanczos steps per layer run.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// SLQ runs per layer (and for the full Hessian).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 2000)]
    pub grid: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Per module: λmax and trace from SLQ on its diagonal block, and the
/// Bhattacharyya coefficient between its density and the full one on a
/// shared grid (see `layers::bhattacharyya` for why that measure).
pub fn layers_cmd(a: LayersArgs) -> Result<()> {
    check_positive("--steps", a.steps)?;
    check_positive("--runs", a.runs)?;
    let t0 = Instant::now();
    let mut engine = a.inputs.engine()?;
    let (model, _) = a.inputs.model_and_weights()?;
    let settings = settings_json(&a.inputs, engine.as_ref(), &None);
    let mut h = Hessian(engine.as_mut());
    let n = h.dim();
    let (full, _) = counted_slq(
        &mut h,
        a.steps.min(n),
        a.runs,
        a.inputs.seed,
        "full Hessian",
    )?;
    let mut per = vec![];
    for (name, range) in model.modules() {
        let mut block = BlockOperator::new(&mut h, range.clone());
        let steps = a.steps.min(range.len());
        let (runs, _) = counted_slq(&mut block, steps, a.runs, a.inputs.seed, &name)?;
        per.push((name, range.len(), runs));
    }
    // One grid for all, covering every layer's and the full spectrum.
    let (mut lo, mut hi) = slq::extremes(&full);
    for (_, _, r) in &per {
        let (a_, b_) = slq::extremes(r);
        lo = lo.min(a_);
        hi = hi.max(b_);
    }
    let sigma = slq::default_sigma(lo, hi).max(0.01 * (hi - lo));
    let grid = slq::default_grid(lo, hi, sigma, a.grid.max(2));
    let mut fd = slq::density_on(&full, &grid, sigma);
    slq::normalize(&grid, &mut fd);
    let fs = slq::summarize(&full, n);
    let mut rows = vec![];
    if !a.inputs.json {
        println!(
            "{:<28} {:>9} {:>14} {:>14} {:>14} {:>10}",
            "module", "size", "λmax", "λmin", "trace", "similarity"
        );
        println!(
            "{:<28} {:>9} {:>14.6e} {:>14.6e} {:>14.6e} {:>10.4}",
            "(all)", n, fs.lambda_max, fs.lambda_min, fs.trace, 1.0
        );
    }
    for (name, size, runs) in &per {
        let s = slq::summarize(runs, *size);
        let mut d = slq::density_on(runs, &grid, sigma);
        slq::normalize(&grid, &mut d);
        let sim = bhattacharyya(&grid, &d, &fd);
        if !a.inputs.json {
            println!(
                "{name:<28} {size:>9} {:>14.6e} {:>14.6e} {:>14.6e} {sim:>10.4}",
                s.lambda_max, s.lambda_min, s.trace
            );
        }
        rows.push(json!({ "module": name, "size": size, "lambda_max": s.lambda_max, "lambda_min": s.lambda_min,
            "trace": s.trace, "trace_stderr": s.trace_stderr, "negative_mass": s.negative_mass, "similarity": sim }));
    }
    let out = json!({
        "similarity_measure": "Bhattacharyya coefficient ∫√(p·q) between the layer's and the full SLQ density on a shared grid",
        "full": fs, "layers": rows, "steps": a.steps, "runs": a.runs, "sigma": sigma,
        "seconds": t0.elapsed().as_secs_f64(), "settings": settings,
    });
    write_json(&a.out, &out)?;
    if a.inputs.json {
        println!("{out}");
    }
    Ok(())
}

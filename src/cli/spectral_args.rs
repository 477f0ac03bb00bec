//! What the spectral subcommands share: their argument groups (block,
//! sweep, basis, smoothing), the counted operator, the checks and the
//! plot and density helpers.

use crate::cli::common::gib_bytes;
use crate::cli::output::{self};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hesscope::engine::Curvature;
use hesscope::engine::CurvatureOperator;
use hesscope::gpu::{BasisPlace, EngineOptions};
use hesscope::model::Model;
use hesscope::operator::Operator;
use hesscope::report::{DeflationReport, DensityReport};
use hesscope::spectral::deflate::{self, DeflateCount};
use hesscope::spectral::lanczos::BasisBudget;
use hesscope::spectral::plot::density_svg;
use hesscope::spectral::slq::{self, SlqRun};
use hesscope::spectral::SymOperator;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// The most grid points a density is evaluated at (8 MB per array).
pub const MAX_GRID: usize = 1_000_000;
/// The most Lanczos steps per run (`density`, `layers`) or in all (`eigs`).
pub const MAX_STEPS: usize = 100_000;
/// The most SLQ runs.
pub const MAX_RUNS: usize = 100_000;
/// The most trace probes.
pub const MAX_PROBES: usize = 10_000_000;
/// `layers`' default grid (a coarser one: it smooths every module).
pub const LAYERS_GRID: usize = 2000;
/// The most vectors per sweep (`--block`).
pub const MAX_BLOCK: usize = 64;

/// An operator that ticks a progress bar per product (drawn only on a
/// terminal) and counts the products, and the sweeps that computed them
/// (a block product of K vectors is K products in one sweep).
pub struct Counted<'a> {
    pub inner: &'a mut dyn SymOperator,
    pub bar: ProgressBar,
    pub count: usize,
    pub sweeps: usize,
    /// Wall time spent in the inner operator's products.
    pub product_seconds: f64,
}

impl<'a> Counted<'a> {
    pub fn new(inner: &'a mut dyn SymOperator, expected: usize, what: &str) -> Counted<'a> {
        let bar = match ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} HVPs, {elapsed} (eta {eta})",
        ) {
            Ok(style) if std::io::stderr().is_terminal() => {
                let b = ProgressBar::new(expected as u64);
                b.set_style(style.progress_chars("=> "));
                b.set_message(what.to_string());
                b
            }
            _ => ProgressBar::with_draw_target(Some(expected as u64), ProgressDrawTarget::hidden()),
        };
        Counted {
            inner,
            bar,
            count: 0,
            sweeps: 0,
            product_seconds: 0.0,
        }
    }
}

impl SymOperator for Counted<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
        self.count += 1;
        self.sweeps += 1;
        self.bar.inc(1);
        let t = Instant::now();
        let r = self.inner.apply(v, out);
        self.product_seconds += t.elapsed().as_secs_f64();
        r
    }
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> hesscope::Result<()> {
        self.count += vs.len();
        self.sweeps += 1;
        self.bar.inc(vs.len() as u64);
        let t = Instant::now();
        let r = self.inner.apply_block(vs, outs);
        self.product_seconds += t.elapsed().as_secs_f64();
        r
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn hesscope::spectral::lanczos::BasisDevice>> {
        self.inner.basis_device()
    }
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn hesscope::spectral::shard::Collective>> {
        self.inner.basis_ranks()
    }
}

/// Which diagonal block of the Hessian a command works on.
#[derive(Args, Debug, Clone)]
pub struct BlockArgs {
    /// The diagonal block of one layer or name-prefix group (`layer1`, `fc`).
    #[arg(long)]
    pub layer: Option<String>,
}

/// Which curvature matrix the products are of.
#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// The matrix: hessian (H), ggn (the generalised Gauss–Newton term
    /// G = Jᵀ H_L J: J the Jacobian of the logits, H_L the cross-entropy's
    /// Hessian in them; positive semi-definite) or residual (E = H − G).
    #[arg(long, value_enum, default_value_t = OperatorArg::Hessian)]
    pub operator: OperatorArg,
}

/// `--operator`: the CLI's mirror of [`Operator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OperatorArg {
    Hessian,
    Ggn,
    Residual,
}

impl From<OperatorArg> for Operator {
    fn from(o: OperatorArg) -> Operator {
        match o {
            OperatorArg::Hessian => Operator::Hessian,
            OperatorArg::Ggn => Operator::Ggn,
            OperatorArg::Residual => Operator::Residual,
        }
    }
}

impl OperatorArgs {
    pub fn get(&self) -> Operator {
        self.operator.into()
    }

    /// `engine`'s products of this operator for the solvers.
    pub fn of<'a>(&self, engine: &'a mut dyn Curvature) -> CurvatureOperator<'a> {
        CurvatureOperator::new(engine, self.get())
    }
}

/// How many Hessian-vector products one sweep over the data computes.
#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// Vectors per sweep: one pass over the data computes K Hessian-vector
    /// products (SLQ runs in lockstep, trace probes in blocks, block
    /// Lanczos for eigs); 1 gives single products. Default: the executor's
    /// preferred block.
    #[arg(long = "block", value_name = "K", allow_hyphen_values = true)]
    pub block: Option<usize>,
}

/// How much host memory the Lanczos bases may take: the commands that run
/// Lanczos (density, eigs, layers, train's spectra) take it; trace, which
/// keeps no basis, does not.
#[derive(Args, Debug, Clone)]
pub struct BasisArgs {
    /// GiB of memory the Lanczos bases may take where they live: on the
    /// host, f64 while they fit, f32 beyond, refused if they do not fit
    /// even so (default: half of the host's available memory); on a GPU
    /// (--basis-on), f32 (default: a quarter of its memory). Under MPI the
    /// budget is per rank, and bases that do not fit it whole in f64 are
    /// sharded: each rank keeps a slice of every vector (f64, else f32).
    #[arg(long, value_name = "GIB", allow_hyphen_values = true)]
    pub basis_budget: Option<f64>,
    /// Where the Lanczos bases live. auto: in the GPU's memory when the
    /// engine runs on a GPU (not a CPU emulator) and they fit in its
    /// --basis-budget (default a quarter of its memory), else the host's; host; device: the GPU's, refused where they
    /// do not fit or there is no GPU. On the device the vectors are kept in
    /// f32 and reorthogonalised there with compensated sums.
    #[arg(long = "basis-on", value_enum, default_value_t = BasisOn::Auto)]
    pub basis_on: BasisOn,
}

/// `--basis-on`: the CLI's mirror of [`BasisPlace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BasisOn {
    Auto,
    Host,
    Device,
}

impl From<BasisOn> for BasisPlace {
    fn from(b: BasisOn) -> BasisPlace {
        match b {
            BasisOn::Auto => BasisPlace::Auto,
            BasisOn::Host => BasisPlace::Host,
            BasisOn::Device => BasisPlace::Device,
        }
    }
}

impl BasisArgs {
    /// Engine options for `block` tangents per sweep and these bases.
    pub fn engine_options(&self, block: Option<usize>) -> Result<EngineOptions> {
        Ok(EngineOptions {
            block,
            basis_place: self.basis_on.into(),
            basis_budget: self.budget_bytes()?,
            ..Default::default()
        })
    }

    fn budget_bytes(&self) -> Result<Option<usize>> {
        self.basis_budget
            .map(|gib| gib_bytes("--basis-budget", gib, false))
            .transpose()
    }

    /// Refuses `--basis-on device` for an engine that offers no device
    /// (the float64 reference).
    pub fn check_engine(&self, engine: &dyn Curvature) -> Result<()> {
        if self.basis_on == BasisOn::Device && engine.basis_device().is_none() {
            bail!(
                "invalid --basis-on device: the {} ({}) keeps no vectors on a device; \
                 use a GPU backend or --basis-on host",
                engine.adapter(),
                engine.backend()
            );
        }
        Ok(())
    }

    /// `--basis-budget` in bytes, or the host default.
    pub fn budget(&self) -> Result<BasisBudget> {
        Ok(self
            .budget_bytes()?
            .map_or_else(BasisBudget::host_default, BasisBudget))
    }
}

impl SweepArgs {
    /// Refuses a block outside 1..=MAX_BLOCK, before any work.
    pub fn validate(&self) -> Result<()> {
        if let Some(k) = self.block {
            check_count("--block", k, MAX_BLOCK)?;
        }
        Ok(())
    }

    /// `--block`, or the executor's preferred block (within 1..=MAX_BLOCK).
    pub fn resolve(&self, engine: &dyn Curvature) -> usize {
        self.block
            .unwrap_or_else(|| engine.preferred_block())
            .clamp(1, MAX_BLOCK)
    }
}

/// How a spectrum becomes a density: shared by density, exact and layers,
/// validated in one place.
#[derive(Args, Debug, Clone)]
pub struct SmoothingArgs {
    /// Gaussian kernel standard deviation in eigenvalue units (default:
    /// sigma² = 1e-5·max(1, λmax − λmin), as in Ghorbani et al.).
    #[arg(long, allow_hyphen_values = true)]
    pub sigma: Option<f64>,
    /// Grid points of the density (default 10000; `layers`: 2000).
    #[arg(long, allow_hyphen_values = true)]
    pub grid: Option<usize>,
}

/// A density on a grid.
pub struct Smoothed {
    pub grid: Vec<f64>,
    pub density: Vec<f64>,
    pub sigma: f64,
    /// The mass of the runs' mean on the grid before normalising (≈ 1).
    pub mass: f64,
}

impl Smoothed {
    /// The band of the runs' mean at every grid point, normalised as the
    /// density is (`bands::density_stderr`); None with one run.
    pub fn stderr(&self, runs: &[SlqRun]) -> Option<Vec<f64>> {
        let mut se = hesscope::spectral::bands::density_stderr(runs, &self.grid, self.sigma)?;
        se.iter_mut().for_each(|x| *x /= self.mass);
        Some(se)
    }
}

impl SmoothingArgs {
    /// Refuse settings no spectrum can make sense of, before any work.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.sigma {
            if !(s.is_finite() && s > 0.0) {
                bail!("invalid --sigma: {s}; the kernel width must be a positive finite number");
            }
        }
        if let Some(g) = self.grid {
            if !(2..=MAX_GRID).contains(&g) {
                bail!("invalid --grid: {g}; a density needs between 2 and {MAX_GRID} grid points");
            }
        }
        Ok(())
    }

    /// The grid over [lo, hi] and the kernel width: `--sigma` or `default`.
    pub(crate) fn grid(
        &self,
        lo: f64,
        hi: f64,
        default: f64,
        points: usize,
    ) -> Result<(Vec<f64>, f64)> {
        let sigma = self.sigma.unwrap_or(default);
        let points = self.grid.unwrap_or(points);
        let grid = slq::default_grid(lo, hi, sigma, points);
        let (a, b) = (grid[0], grid[grid.len() - 1]);
        if !(a.is_finite() && b.is_finite() && a < b) {
            bail!(
                "invalid --sigma: {sigma:e} over the spectrum [{lo:e}, {hi:e}] gives no finite grid \
                 ([{a:e}, {b:e}]); choose a smaller --sigma"
            );
        }
        Ok((grid, sigma))
    }

    /// The normalised density of `runs` on `grid`; refuses a density that
    /// underflows to zero everywhere (a kernel far narrower than the grid
    /// spacing) or is not finite.
    pub(crate) fn density(&self, runs: &[SlqRun], grid: &[f64], sigma: f64) -> Result<Vec<f64>> {
        Ok(self.density_and_mass(runs, grid, sigma)?.0)
    }

    /// [`SmoothingArgs::density`] and the mass it was normalised by.
    fn density_and_mass(
        &self,
        runs: &[SlqRun],
        grid: &[f64],
        sigma: f64,
    ) -> Result<(Vec<f64>, f64)> {
        let mut d = slq::density_on(runs, grid, sigma);
        let mass = slq::integrate(grid, &d);
        let spacing = (grid[grid.len() - 1] - grid[0]) / (grid.len() - 1) as f64;
        if !(mass.is_finite() && mass > 0.0) {
            bail!(
                "invalid --sigma: {sigma:e}: the density is {} at every one of the {} grid points \
                 (spacing {spacing:.3e}); choose a --sigma near the spacing or above, or more --grid points",
                if mass.is_finite() { "zero" } else { "not finite" },
                grid.len()
            );
        }
        slq::normalize(grid, &mut d);
        if d.iter().any(|x| !x.is_finite()) {
            bail!(
                "invalid --sigma: {sigma:e}: the normalised density overflows (grid spacing \
                 {spacing:.3e}); choose a --sigma near the spacing or above"
            );
        }
        Ok((d, mass))
    }

    pub(crate) fn smooth(&self, runs: &[SlqRun], default_points: usize) -> Result<Smoothed> {
        let (lo, hi) = slq::extremes(runs);
        let (grid, sigma) = self.grid(lo, hi, slq::default_sigma(lo, hi), default_points)?;
        let (density, mass) = self.density_and_mass(runs, &grid, sigma)?;
        Ok(Smoothed {
            grid,
            density,
            sigma,
            mass,
        })
    }
}

/// The layer's parameter range, or everything: a module name or prefix,
/// or a tensor set as `trace-grad --layer` and `train --htr-layers` take it
/// (`all`, `middle`, `block1,block2`) when its tensors are one contiguous
/// run in parameter order (a diagonal block of the Hessian).
pub(crate) fn block_range(model: &Model, layer: &Option<String>) -> Result<std::ops::Range<usize>> {
    let Some(l) = layer else {
        return Ok(0..model.n_params);
    };
    match model.prefix_range(l) {
        Ok(r) => Ok(r),
        Err(prefix_err) => {
            let set = match hesscope::trace_grad::LayerSet::parse(model, l) {
                Ok(set) => set,
                // A list is a tensor set: its own error names the item.
                Err(e) if l.contains(',') => return Err(e.into()),
                Err(_) => return Err(prefix_err.into()),
            };
            let (first, last) = (set.tensors[0], set.tensors[set.tensors.len() - 1]);
            if last - first + 1 != set.tensors.len() {
                bail!(
                    "invalid --layer {l}: its tensors ({}) are not one contiguous run in parameter order; \
                     the spectral commands take one diagonal block of the Hessian",
                    set.names(model).join(", ")
                );
            }
            let (a, b) = (&model.params[first], &model.params[last]);
            Ok(a.offset..b.offset + b.numel())
        }
    }
}

pub(crate) fn check_plot(path: &Option<PathBuf>) -> Result<()> {
    if let Some(p) = path {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "svg" {
            bail!("invalid --plot {}: only .svg is written", p.display());
        }
    }
    Ok(())
}

pub(crate) fn write_plot(
    path: &Option<PathBuf>,
    title: &str,
    grid: &[f64],
    dens: &[f64],
    exact: Option<&[f64]>,
) -> Result<()> {
    if let Some(p) = path {
        let text = density_svg(title, grid, dens, exact, None);
        output::write_atomic(p, |t| {
            std::fs::write(t, &text).map_err(|e| hesscope::Error::io(t, e))
        })
        .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The density's plot with its band (±2 standard errors) shaded.
pub(crate) fn write_band_plot(
    path: &Option<PathBuf>,
    title: &str,
    grid: &[f64],
    dens: &[f64],
    stderr: Option<&[f64]>,
) -> Result<()> {
    if let Some(p) = path {
        let text = density_svg(title, grid, dens, None, stderr);
        output::write_atomic(p, |t| {
            std::fs::write(t, &text).map_err(|e| hesscope::Error::io(t, e))
        })
        .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// `--deflate K|auto`.
pub(crate) fn parse_deflate(s: &str) -> std::result::Result<DeflateCount, String> {
    if s == "auto" {
        return Ok(DeflateCount::Auto);
    }
    match s.parse::<usize>() {
        Ok(k) if k >= 1 => Ok(DeflateCount::Fixed(k)),
        _ => Err(format!(
            "`{s}`: the number of eigenpairs to deflate (at least 1), or `auto`"
        )),
    }
}

/// A deflated SLQ over `op` ([`deflate::deflated_slq`]) within `total`
/// products, counted and with a progress bar (on a terminal).
pub(crate) fn counted_deflated_slq(
    op: &mut dyn SymOperator,
    count: DeflateCount,
    total: usize,
    steps: usize,
    seed: u64,
    block: usize,
    budget: BasisBudget,
) -> hesscope::Result<(CountedSlq, DeflationReport)> {
    let mut counted = Counted::new(op, total, "density (deflated)");
    let d = deflate::deflated_slq(&mut counted, count, total, steps, seed, block, budget)?;
    counted.bar.finish_and_clear();
    let o = &d.outliers;
    let report = DeflationReport {
        requested: match count {
            DeflateCount::Auto => "auto".into(),
            DeflateCount::Fixed(k) => k.to_string(),
        },
        rule: match count {
            DeflateCount::Auto => DEFLATE_AUTO_RULE,
            DeflateCount::Fixed(_) => DEFLATE_FIXED_RULE,
        },
        k: o.values.len(),
        asked: o.asked,
        eigenvalues: o.values.clone(),
        residuals: o.residuals.clone(),
        residual_bound: o.bound,
        not_deflated: o
            .candidates
            .iter()
            .filter(|(_, r)| *r > o.bound)
            .map(|(l, _)| *l)
            .collect(),
        eigs_steps: o.steps,
        eigs_hvps: o.hvps,
        bulk_steps: d.steps,
        bulk_runs: d.bulk_runs,
        budget: total,
    };
    Ok((
        CountedSlq {
            runs: d.runs,
            hvps: counted.count,
            sweeps: counted.sweeps,
            hvp_seconds: counted.product_seconds,
            basis: d.basis,
        },
        report,
    ))
}

/// The rules `DeflationReport::rule` states.
pub(crate) const DEFLATE_FIXED_RULE: &str = "the K eigenpairs of largest |lambda| by eigs, kept where the true residual is <= 1e-6 |lambda|max";
pub(crate) const DEFLATE_AUTO_RULE: &str = "every one of the top 64 eigenpairs by |lambda| that eigs resolves to a true residual <= 1e-6 |lambda|max within a third of the budget (a gap rule by convergence: those are the eigenvalues separated from the rest of the spectrum)";

/// The text output's lines on the band and the deflation.
pub(crate) fn band_text(r: &DensityReport) -> String {
    let mut t = match r.density_stderr {
        Some(_) => format!(
            "  band: ±2 standard errors of the mean over the {} runs at every grid point \
             (density_stderr in the JSON)\n",
            r.runs_count
        ),
        None => "  no band: one run says nothing about the spread (use --runs 2 or more)\n".into(),
    };
    if let Some(d) = &r.deflation {
        t.push_str(&format!(
            "  deflated {} of {} eigenpairs of largest |λ| (residuals ≤ {:.1e}){}: eigs took {} \
             of the {} products, the bulk {} runs × {} steps\n",
            d.k,
            d.asked,
            d.residual_bound,
            if d.k < d.asked {
                format!(", {} not converged", d.asked - d.k)
            } else {
                String::new()
            },
            d.eigs_hvps,
            d.budget,
            d.bulk_runs,
            d.bulk_steps
        ));
    }
    t
}

/// `value` must be in 1..=max; the error names the flag, the value and
/// the limit.
pub(crate) fn check_count(flag: &str, value: usize, max: usize) -> Result<()> {
    if value == 0 {
        bail!("invalid {flag}: must be at least 1");
    }
    if value > max {
        bail!("invalid {flag}: {value} is above the limit of {max}");
    }
    Ok(())
}

/// What [`counted_slq`] ran and what it took.
pub(crate) struct CountedSlq {
    pub runs: Vec<SlqRun>,
    pub hvps: usize,
    pub sweeps: usize,
    pub hvp_seconds: f64,
    /// Where the bases were kept (`BasisPlan::describe`).
    pub basis: String,
}

/// SLQ over `op`, `block` runs in lockstep, with a progress bar (on a
/// terminal).
pub(crate) fn counted_slq(
    op: &mut dyn SymOperator,
    steps: usize,
    runs: usize,
    seed: u64,
    block: usize,
    budget: BasisBudget,
    what: &str,
) -> hesscope::Result<CountedSlq> {
    let plan = slq::basis_plan(op, steps, runs, block, budget)?;
    let mut counted = Counted::new(op, steps * runs, what);
    let r = slq::slq_with_plan(&mut counted, steps, runs, seed, block, &plan)?;
    counted.bar.finish_and_clear();
    Ok(CountedSlq {
        runs: r,
        hvps: counted.count,
        sweeps: counted.sweeps,
        hvp_seconds: counted.product_seconds,
        basis: plan.describe(),
    })
}

/// The decision report's line for the text output ("" without one).
pub(crate) fn decisions_text(settings: &hesscope::report::Settings) -> String {
    settings
        .decisions
        .as_ref()
        .map(|d| format!("  {}\n", d.summary()))
        .unwrap_or_default()
}

pub(crate) fn layer_suffix(layer: &Option<String>) -> String {
    layer
        .as_ref()
        .map(|l| format!(" [{l}]"))
        .unwrap_or_default()
}

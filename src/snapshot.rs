//! A curvature snapshot of the current weights, as `hesscope train` takes
//! one at its spectrum epochs: on any [`Curvature`] engine (the float64
//! reference or a GPU executor built for the weights of that moment), the
//! SLQ density, the top-k eigenvalues with residuals, the fraction of ‖g‖²
//! in their span, a Hutchinson trace, and optionally each module's λmax and
//! trace. The Hessian is that of the engine's loss (the data loss: weight
//! decay's constant wd·I is reported by the caller, not added).
//!
//! Products go through the solvers' block entry points (`slq_block`,
//! `hutchinson_block`, `EigsSettings::block`), by default with the engine's
//! preferred block ([`Curvature::preferred_block`]; 1 on the float64
//! reference, where the block solvers are the single-vector ones).
//!
//! Every solver is seeded by the same seed at every snapshot, so successive
//! epochs are compared with the same start vectors and probes (common
//! random numbers: differences between epochs are not probe noise).

use crate::engine::CurvatureOperator;
use crate::engine::{Curvature, Hessian};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::operator::Operator;
use crate::report::{
    known, CurvatureRecord, LayerCurvature, OperatorCurvature, PapyanRecord, QuadratureRun,
};
use crate::spectral::eigs::{eigs, gradient_fractions, EigsSettings, Which};
use crate::spectral::lanczos::BasisBudget;
use crate::spectral::layers::BlockOperator;
use crate::spectral::slq;
use crate::spectral::trace::hutchinson_block;
use crate::spectral::SymOperator;

/// What a snapshot computes (the `density`/`eigs`/`trace` settings).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotSettings {
    /// SLQ: Lanczos steps per run and runs.
    pub slq_steps: usize,
    pub slq_runs: usize,
    /// Kernel width (default Ghorbani et al.'s sigma² = 1e-5·max(1, λmax − λmin)).
    pub sigma: Option<f64>,
    /// Grid points of the density.
    pub grid: usize,
    /// Top-k eigenvalues (and the gradient fractions k = 1..top).
    pub top: usize,
    /// Lanczos step budget and relative residual tolerance of `eigs`.
    pub eigs_steps: usize,
    pub tol: f64,
    /// Hutchinson probes (whole Hessian and each module).
    pub probes: usize,
    /// Per module λmax (Lanczos on its diagonal block, same budget and
    /// tolerance) and Hutchinson trace.
    pub layerwise: bool,
    pub seed: u64,
    /// Vectors per block product (None: the engine's preferred block).
    #[serde(default)]
    pub block: Option<usize>,
    /// Host memory (bytes) for the Lanczos bases (None: half the host's
    /// available memory, `BasisBudget::host_default`).
    #[serde(default)]
    pub basis_budget: Option<usize>,
    /// Papyan's decomposition too: the SLQ of G and E (same steps, runs and
    /// seed), and G's top 2·classes + 2 eigenvalues with its outliers.
    #[serde(default)]
    pub papyan: bool,
}

/// Counts the products an operator serves (blocks included) and reports
/// the count with the current stage after each.
struct Counting<'a, 'p> {
    inner: &'a mut dyn SymOperator,
    count: usize,
    stage: String,
    progress: &'p mut dyn FnMut(&str, usize),
}

impl SymOperator for Counting<'_, '_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.inner.apply(v, out)?;
        self.count += 1;
        (self.progress)(&self.stage, self.count);
        Ok(())
    }
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        self.inner.apply_block(vs, outs)?;
        self.count += vs.len();
        (self.progress)(&self.stage, self.count);
        Ok(())
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn crate::spectral::lanczos::BasisDevice>> {
        self.inner.basis_device()
    }
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
        self.inner.basis_ranks()
    }
}

/// The curvature of `engine`'s loss at its weights. `about` fills the
/// record's description of the subset (samples, batch, bn) and
/// `weight_decay_shift`.
pub fn snapshot(
    engine: &mut dyn Curvature,
    model: &Model,
    s: &SnapshotSettings,
    about: (usize, usize, &str, f64),
) -> Result<CurvatureRecord> {
    snapshot_with(engine, model, s, about, &mut |_, _| {})
}

/// [`snapshot`], calling `progress(stage, products so far)` after every
/// product (stages: `density`, `eigs`, `trace`, then a module's name).
pub fn snapshot_with(
    engine: &mut dyn Curvature,
    model: &Model,
    s: &SnapshotSettings,
    about: (usize, usize, &str, f64),
    progress: &mut dyn FnMut(&str, usize),
) -> Result<CurvatureRecord> {
    let t0 = std::time::Instant::now();
    let n = engine.n_params();
    if s.top == 0 || s.top > n {
        return Err(Error::Invalid {
            what: "eigenpair count",
            msg: format!("{} must be between 1 and the {n} parameters", s.top),
        });
    }
    let (loss, grad) = engine.loss_grad()?;
    let block = s.block.unwrap_or_else(|| engine.preferred_block()).max(1);
    let backend = engine.backend();
    let adapter = engine.adapter();
    let mut h = Hessian(&mut *engine);
    let mut op = Counting {
        inner: &mut h,
        count: 0,
        stage: "density".into(),
        progress,
    };
    // The density.
    let slq_steps = s.slq_steps.min(n);
    let budget = s
        .basis_budget
        .map(BasisBudget)
        .unwrap_or_else(BasisBudget::host_default);
    let runs = slq::slq_block(&mut op, slq_steps, s.slq_runs, s.seed, block, budget)?;
    let summary = slq::summarize(&runs, n);
    let (lo, hi) = slq::extremes(&runs);
    let sigma = s.sigma.unwrap_or_else(|| slq::default_sigma(lo, hi));
    let grid = slq::default_grid(lo, hi, sigma, s.grid);
    let mut density = slq::density_on(&runs, &grid, sigma);
    let mass = slq::integrate(&grid, &density);
    if !(mass.is_finite() && mass > 0.0) {
        return Err(Error::Numerical(format!(
            "the density with sigma {sigma:e} on [{:e}, {:e}] has mass {mass:e}; \
             choose a sigma near the grid spacing or above",
            grid[0],
            grid[grid.len() - 1]
        )));
    }
    slq::normalize(&grid, &mut density);
    // The top-k eigenpairs and the gradient's share of their span.
    op.stage = "eigs".into();
    let mut es = EigsSettings::new(s.top, Which::Largest);
    es.tol = s.tol;
    es.max_steps = s.eigs_steps;
    es.seed = s.seed;
    es.block = block;
    es.basis_budget = budget;
    let top = eigs(&mut op, &es)?;
    let fracs = gradient_fractions(&grad, &top.vectors);
    // The trace.
    op.stage = "trace".into();
    let tr = hutchinson_block(&mut op, s.probes, s.seed, block)?;
    // Per module.
    let mut layers = vec![];
    if s.layerwise {
        for (module, range) in model.modules() {
            let size = range.len();
            op.stage = module.clone();
            let mut op_b = BlockOperator::new(&mut op, range);
            let mut es = EigsSettings::new(1, Which::Largest);
            es.tol = s.tol;
            es.max_steps = s.eigs_steps;
            es.seed = s.seed;
            es.block = block;
            es.basis_budget = budget;
            let e = eigs(&mut op_b, &es)?;
            let t = hutchinson_block(&mut op_b, s.probes, s.seed, block)?;
            layers.push(LayerCurvature {
                module,
                size,
                lambda_max: e.values[0],
                residual: e.residuals[0],
                trace: t.estimate,
                trace_stderr: known(t.stderr),
            });
        }
    }
    let mut hvps = op.count;
    drop(op);
    let papyan = if s.papyan {
        let (record, count) = papyan_record(engine, model, s, block, budget, progress)?;
        hvps += count;
        Some(record)
    } else {
        None
    };
    let (samples, batch, bn, weight_decay_shift) = about;
    Ok(CurvatureRecord {
        samples,
        batch,
        bn: bn.to_string(),
        backend,
        adapter,
        loss,
        grad_norm: grad.iter().map(|g| g * g).sum::<f64>().sqrt(),
        weight_decay_shift,
        lambda_max: summary.lambda_max,
        lambda_min: summary.lambda_min,
        slq_trace: summary.trace,
        slq_trace_stderr: known(summary.trace_stderr),
        negative_mass: summary.negative_mass,
        negative_mass_stderr: known(summary.negative_mass_stderr),
        slq_steps,
        sigma,
        grid,
        density,
        runs: runs
            .into_iter()
            .map(|r| QuadratureRun {
                nodes: r.nodes,
                weights: r.weights,
            })
            .collect(),
        top_eigenvalues: top.values,
        residuals: top.residuals,
        eigs_converged: top.converged,
        grad_frac_in_top_k: fracs,
        trace: tr.estimate,
        trace_stderr: known(tr.stderr),
        layers,
        block,
        hvps,
        papyan,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// G's and E's SLQ from the Hessian's seed, and G's outliers (the second
/// half of [`snapshot_with`] with `papyan`); the products it took.
fn papyan_record(
    engine: &mut dyn Curvature,
    model: &Model,
    s: &SnapshotSettings,
    block: usize,
    budget: BasisBudget,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<(PapyanRecord, usize)> {
    let n = engine.n_params();
    let slq_steps = s.slq_steps.min(n);
    let mut count = 0;
    let mut parts = vec![];
    for which in [Operator::Ggn, Operator::Residual] {
        let mut c = CurvatureOperator::new(&mut *engine, which);
        let mut op = Counting {
            inner: &mut c,
            count,
            stage: which.name().into(),
            progress: &mut *progress,
        };
        let runs = slq::slq_block(&mut op, slq_steps, s.slq_runs, s.seed, block, budget)?;
        count = op.count;
        let sum = slq::summarize(&runs, n);
        parts.push(OperatorCurvature {
            operator: which.name().into(),
            lambda_max: sum.lambda_max,
            lambda_min: sum.lambda_min,
            slq_trace: sum.trace,
            slq_trace_stderr: known(sum.trace_stderr),
            negative_mass: sum.negative_mass,
            negative_mass_stderr: known(sum.negative_mass_stderr),
            runs: runs
                .into_iter()
                .map(|r| QuadratureRun {
                    nodes: r.nodes,
                    weights: r.weights,
                })
                .collect(),
        });
    }
    let classes = model.classes;
    let mut c = CurvatureOperator::new(&mut *engine, Operator::Ggn);
    let mut op = Counting {
        inner: &mut c,
        count,
        stage: "ggn eigs".into(),
        progress: &mut *progress,
    };
    let mut es = EigsSettings::new((2 * classes + 2).min(n), Which::Largest);
    es.tol = s.tol;
    es.max_steps = s.eigs_steps;
    es.seed = s.seed;
    es.block = block;
    es.basis_budget = budget;
    let top = eigs(&mut op, &es)?;
    count = op.count;
    let (outliers, gap_ratio) = crate::operator::outliers(&top.values);
    let residual = parts.pop().expect("two operators");
    let ggn = parts.pop().expect("two operators");
    Ok((
        PapyanRecord {
            ggn,
            residual,
            classes,
            ggn_top: top.values,
            ggn_residuals: top.residuals,
            ggn_converged: top.converged,
            outliers,
            gap_ratio,
        },
        count,
    ))
}

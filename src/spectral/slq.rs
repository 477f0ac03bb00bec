//! Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019): each run
//! starts Lanczos from a Gaussian vector; the Ritz values are the Gauss
//! quadrature nodes and the squared first eigenvector components its
//! weights, so Σ wᵢ f(λᵢ) ≈ vᵀ f(H) v / ‖v‖² ≈ (1/n) tr f(H).

use crate::error::{Error, Result};

/// The standard error of ρ = Σ num / Σ den over independent runs (the
/// ratio estimator's delta-method error); NaN with fewer than two runs,
/// 0 where the denominator is 0 (then ρ is reported as 0).
pub fn ratio_stderr(num: &[f64], den: &[f64]) -> f64 {
    let k = num.len() as f64;
    if num.len() < 2 {
        return f64::NAN;
    }
    let (sn, sd) = (num.iter().sum::<f64>(), den.iter().sum::<f64>());
    if sd <= 0.0 {
        return 0.0;
    }
    let rho = sn / sd;
    let s2 = num
        .iter()
        .zip(den)
        .map(|(n, d)| (n - rho * d).powi(2))
        .sum::<f64>()
        / (k - 1.0);
    (s2 / k).sqrt() / (sd / k)
}

#[cfg(test)]
use crate::spectral::lanczos::BasisPrecision;
use crate::spectral::lanczos::{gaussian_unit, BasisBudget, BasisPlan, Recurrence};
use crate::spectral::operator::SymOperator;
use rand::SeedableRng;

/// Ghorbani et al.'s defaults.
pub const DEFAULT_STEPS: usize = 90;
pub const DEFAULT_RUNS: usize = 10;
pub const DEFAULT_GRID: usize = 10_000;

#[derive(Clone, Debug, serde::Serialize)]
pub struct SlqRun {
    pub nodes: Vec<f64>,
    pub weights: Vec<f64>,
    pub breakdowns: usize,
}

/// `runs` independent Lanczos runs of `steps` steps (fewer when the
/// operator's dimension is smaller), one after another: [`slq_block`] with
/// a block of 1.
pub fn slq(op: &mut dyn SymOperator, steps: usize, runs: usize, seed: u64) -> Result<Vec<SlqRun>> {
    slq_block(op, steps, runs, seed, 1, BasisBudget::host_default())
}

/// `runs` independent Lanczos runs of `steps` steps (fewer when the
/// operator's dimension is smaller), `block` of them in lockstep: each step
/// multiplies the current vector of every live run of the group in one
/// block product (`apply_block`), and each run then continues with its own
/// full reorthogonalisation. The starts are drawn in run order from `seed`
/// whatever the block, so the runs are the same ones; only the basis
/// storage may change (f32 once the group's bases together pass half of
/// `budget`; refused when they pass all of it even in f32).
pub fn slq_block(
    op: &mut dyn SymOperator,
    steps: usize,
    runs: usize,
    seed: u64,
    block: usize,
    budget: BasisBudget,
) -> Result<Vec<SlqRun>> {
    check_counts(op, steps, runs, block)?;
    let plan = basis_plan(op, steps, runs, block, budget)?;
    slq_with_plan(op, steps, runs, seed, block, &plan)
}

/// [`slq_block`] with the bases where `plan` puts them (from
/// [`basis_plan`], for a caller that reports it).
pub fn slq_with_plan(
    op: &mut dyn SymOperator,
    steps: usize,
    runs: usize,
    seed: u64,
    block: usize,
    plan: &BasisPlan,
) -> Result<Vec<SlqRun>> {
    slq_from_starts(op, steps, runs, seed, block, plan, &|_| {})
}

/// [`slq_with_plan`] with every Gaussian start passed through `start`
/// before Lanczos normalises it (the deflated SLQ projects its starts off
/// the deflated vectors, `deflate::Projector`). The starts are drawn from
/// `seed` as in [`slq_with_plan`], so an identity `start` gives its runs.
pub fn slq_from_starts(
    op: &mut dyn SymOperator,
    steps: usize,
    runs: usize,
    seed: u64,
    block: usize,
    plan: &BasisPlan,
    start: &dyn Fn(&mut [f64]),
) -> Result<Vec<SlqRun>> {
    check_counts(op, steps, runs, block)?;
    let n = op.dim();
    let block = block.min(runs);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x51a9);
    let mut out = vec![];
    for first in (0..runs).step_by(block) {
        let mut group = vec![];
        for r in first..(first + block).min(runs) {
            let mut v = gaussian_unit(n, &mut rng);
            start(&mut v);
            group.push(Recurrence::with_basis(
                n,
                &v,
                plan.basis(n, steps + 1)?,
                seed.wrapping_add(r as u64),
            )?);
        }
        lockstep(op, &mut group, steps)?;
        for lz in group {
            let t = lz.ritz()?;
            out.push(SlqRun {
                weights: t.weights(),
                nodes: t.values,
                breakdowns: lz.breakdowns,
            });
        }
    }
    Ok(out)
}

/// Steps, runs and block of at least 1, and an operator of some dimension.
fn check_counts(op: &dyn SymOperator, steps: usize, runs: usize, block: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::Invalid {
            what: "Lanczos steps",
            msg: "must be at least 1".into(),
        });
    }
    if runs == 0 {
        return Err(Error::Invalid {
            what: "SLQ runs",
            msg: "must be at least 1".into(),
        });
    }
    if block == 0 {
        return Err(Error::Invalid {
            what: "block size",
            msg: "must be at least 1".into(),
        });
    }
    if op.dim() == 0 {
        return Err(Error::Invalid {
            what: "operator",
            msg: "the operator has dimension 0 (no parameters): no spectrum to estimate".into(),
        });
    }
    Ok(())
}

/// Where `slq_block` keeps the bases of `block` runs in lockstep (of
/// `runs`): on the operator's device where it offers one and they fit,
/// else on the host, sharded over MPI ranks where they do not fit one
/// whole (`BasisPlan::choose_for`).
pub fn basis_plan(
    op: &dyn SymOperator,
    steps: usize,
    runs: usize,
    block: usize,
    budget: BasisBudget,
) -> Result<BasisPlan> {
    BasisPlan::choose_for(op, steps, block.min(runs).max(1), budget)
}

/// Steps every recurrence of `group` until it has `steps` steps or spans
/// the space, one block product per step over the live ones.
pub fn lockstep(op: &mut dyn SymOperator, group: &mut [Recurrence], steps: usize) -> Result<()> {
    let n = op.dim();
    let mut outs: Vec<Vec<f64>> = vec![];
    loop {
        let live: Vec<usize> = (0..group.len())
            .filter(|&i| group[i].steps() < steps && group[i].pending().is_some())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        outs.resize_with(live.len(), || vec![0.0; n]);
        outs.truncate(live.len());
        {
            let vs: Vec<&[f64]> = live.iter().filter_map(|&i| group[i].pending()).collect();
            op.apply_block(&vs, &mut outs)?;
        }
        for (&i, w) in live.iter().zip(outs.iter_mut()) {
            group[i].absorb(std::mem::replace(w, vec![0.0; n]))?;
        }
    }
}

/// sigma = sqrt(1e-5 · max(1, λmax − λmin)), Ghorbani et al.'s kernel width.
pub fn default_sigma(lmin: f64, lmax: f64) -> f64 {
    (1e-5 * (lmax - lmin).max(1.0)).sqrt()
}

pub fn extremes(runs: &[SlqRun]) -> (f64, f64) {
    let all = runs.iter().flat_map(|r| r.nodes.iter().copied());
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in all {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    (lo, hi)
}

/// `points` equally spaced over the spectrum with a margin of 1% of its
/// range plus 5 sigma on either side, so no kernel is cut off.
pub fn default_grid(lmin: f64, lmax: f64, sigma: f64, points: usize) -> Vec<f64> {
    let margin = 0.01 * (lmax - lmin) + 5.0 * sigma;
    linspace(lmin - margin, lmax + margin, points)
}

pub fn linspace(a: f64, b: f64, points: usize) -> Vec<f64> {
    if points < 2 {
        return vec![a];
    }
    (0..points)
        .map(|i| a + (b - a) * i as f64 / (points - 1) as f64)
        .collect()
}

/// (1/runs) Σ_runs Σ_i wᵢ N(t; λᵢ, σ²) on `grid`.
pub fn density_on(runs: &[SlqRun], grid: &[f64], sigma: f64) -> Vec<f64> {
    let c = 1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt() * runs.len() as f64);
    grid.iter()
        .map(|&t| {
            runs.iter()
                .flat_map(|r| r.nodes.iter().zip(&r.weights))
                .map(|(l, w)| w * (-(t - l) * (t - l) / (2.0 * sigma * sigma)).exp())
                .sum::<f64>()
                * c
        })
        .collect()
}

/// ∫ f over the grid by the trapezoid rule.
pub fn integrate(grid: &[f64], f: &[f64]) -> f64 {
    grid.windows(2)
        .zip(f.windows(2))
        .map(|(g, v)| 0.5 * (g[1] - g[0]) * (v[0] + v[1]))
        .sum()
}

/// Rescales f to integrate to 1 over the grid.
pub fn normalize(grid: &[f64], f: &mut [f64]) {
    let s = integrate(grid, f);
    if s > 0.0 {
        f.iter_mut().for_each(|x| *x /= s);
    }
}

/// ∫ |p − q| on a shared grid.
pub fn l1_distance(grid: &[f64], p: &[f64], q: &[f64]) -> f64 {
    let d: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).abs()).collect();
    integrate(grid, &d)
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SlqSummary {
    pub lambda_max: f64,
    pub lambda_min: f64,
    /// n · Σ wᵢλᵢ, averaged over runs.
    pub trace: f64,
    /// Standard error of the trace over runs; NaN (unknown) with one run.
    pub trace_stderr: f64,
    /// Σ|λ| over λ < 0 divided by Σ|λ|, from the quadrature.
    pub negative_mass: f64,
    /// Standard error of the negative mass over runs (the ratio of sums
    /// over runs: [`ratio_stderr`]); NaN (unknown) with one run.
    pub negative_mass_stderr: f64,
}

pub fn summarize(runs: &[SlqRun], n: usize) -> SlqSummary {
    let (lmin, lmax) = extremes(runs);
    let traces: Vec<f64> = runs
        .iter()
        .map(|r| {
            n as f64
                * r.nodes
                    .iter()
                    .zip(&r.weights)
                    .map(|(l, w)| l * w)
                    .sum::<f64>()
        })
        .collect();
    let k = traces.len() as f64;
    let mean = traces.iter().sum::<f64>() / k;
    // One run says nothing about the spread: unknown, not zero.
    let var = if traces.len() > 1 {
        traces.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (k - 1.0)
    } else {
        f64::NAN
    };
    let (mut neg, mut abs) = (0.0, 0.0);
    let (mut negs, mut abss) = (vec![], vec![]);
    for r in runs {
        let (mut rn, mut ra) = (0.0, 0.0);
        for (l, w) in r.nodes.iter().zip(&r.weights) {
            abs += w * l.abs();
            ra += w * l.abs();
            if *l < 0.0 {
                neg += w * l.abs();
                rn += w * l.abs();
            }
        }
        negs.push(rn);
        abss.push(ra);
    }
    SlqSummary {
        lambda_max: lmax,
        lambda_min: lmin,
        trace: mean,
        trace_stderr: (var / k).sqrt(),
        negative_mass: if abs > 0.0 { neg / abs } else { 0.0 },
        negative_mass_stderr: ratio_stderr(&negs, &abss),
    }
}

/// The fraction of the operator's scale below which a block's Ritz values
/// are rounding noise (float64 products carry ~1e-16 of it).
pub const ZERO_BLOCK_TOL: f64 = 1e-10;

/// Whether every Ritz value of `runs` is within [`ZERO_BLOCK_TOL`]·`scale`
/// of zero: a block that is zero but for rounding (a conv bias before
/// batch-mode batch norm), whose noise would otherwise read as a density
/// with a negative mass.
pub fn is_zero_block(runs: &[SlqRun], scale: f64) -> bool {
    scale.is_finite()
        && runs
            .iter()
            .flat_map(|r| &r.nodes)
            .all(|l| l.abs() <= ZERO_BLOCK_TOL * scale)
}

impl SlqSummary {
    /// The summary of a zero block: every figure 0.
    pub fn zero() -> SlqSummary {
        SlqSummary {
            lambda_max: 0.0,
            lambda_min: 0.0,
            trace: 0.0,
            trace_stderr: 0.0,
            negative_mass: 0.0,
            negative_mass_stderr: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spectral::DiagonalOperator;

    /// Runs in lockstep do the same arithmetic on the same starts as runs
    /// one after another (the default `apply_block` is `apply` per vector):
    /// equal bit for bit, for groups that divide the runs and those that
    /// leave a short last group, and through breakdowns (repeated
    /// eigenvalues) and exhaustion (steps > n).
    #[test]
    fn lockstep_runs_equal_sequential_runs() {
        let d: Vec<f64> = (0..40).map(|i| ((i % 13) as f64 - 4.0) * 0.7).collect();
        for steps in [12, 60] {
            let one = slq(&mut DiagonalOperator { d: d.clone() }, steps, 7, 3).unwrap();
            assert!(one.iter().any(|r| r.breakdowns > 0) || steps < 13);
            for block in [2, 3, 7, 10] {
                let many = slq_block(
                    &mut DiagonalOperator { d: d.clone() },
                    steps,
                    7,
                    3,
                    block,
                    BasisBudget::host_default(),
                )
                .unwrap();
                assert_eq!(many.len(), 7);
                for (a, b) in one.iter().zip(&many) {
                    assert_eq!(a.nodes, b.nodes, "steps {steps} block {block}");
                    assert_eq!(a.weights, b.weights, "steps {steps} block {block}");
                    assert_eq!(a.breakdowns, b.breakdowns);
                }
            }
        }
        assert!(slq_block(
            &mut DiagonalOperator { d },
            5,
            2,
            0,
            0,
            BasisBudget::host_default()
        )
        .is_err());
    }

    /// The basis budget decides the storage: f64 while all bases fit in
    /// it, f32 while they fit so, and a refusal naming the sizes before
    /// any product otherwise. 40 entries × 13 vectors × 2 bases = 1040
    /// entries: 8320 bytes in f64, 4160 in f32.
    #[test]
    fn the_basis_budget_picks_the_precision_or_refuses() {
        let f = |bytes| BasisPrecision::for_bases(40, 12, 2, BasisBudget(bytes));
        assert_eq!(f(8320).unwrap(), BasisPrecision::F64);
        assert_eq!(f(8319).unwrap(), BasisPrecision::F32);
        assert_eq!(f(4160).unwrap(), BasisPrecision::F32);
        let e = f(4159).unwrap_err().to_string();
        assert!(
            e.contains("basis budget") && e.contains("13 vectors × 40"),
            "{e}"
        );
        // Refused before the operator is asked for anything.
        struct Never;
        impl SymOperator for Never {
            fn dim(&self) -> usize {
                40
            }
            fn apply(&mut self, _: &[f64], _: &mut [f64]) -> Result<()> {
                panic!("a product was computed before the refusal")
            }
        }
        assert!(slq_block(&mut Never, 12, 2, 0, 2, BasisBudget(4159)).is_err());
    }

    /// An f32 basis (forced by the budget) gives the f64 basis's quadrature
    /// to f32 storage rounding: nodes within 1e-5 relative.
    #[test]
    fn an_f32_basis_agrees_with_an_f64_basis() {
        let d: Vec<f64> = (0..200)
            .map(|i| (i as f64 * 0.37).sin() * 3.0 + 0.01 * i as f64)
            .collect();
        let run = |bytes| {
            slq_block(
                &mut DiagonalOperator { d: d.clone() },
                30,
                3,
                5,
                3,
                BasisBudget(bytes),
            )
            .unwrap()
        };
        let (wide, narrow) = (run(usize::MAX), run(200 * 31 * 3 * 4));
        for (a, b) in wide.iter().zip(&narrow) {
            for (x, y) in a.nodes.iter().zip(&b.nodes) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
        assert_ne!(
            wide[0].nodes, narrow[0].nodes,
            "the budget did not change the storage"
        );
    }
}

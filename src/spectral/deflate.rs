//! Outlier deflation for SLQ densities.
//!
//! The top eigenpairs (by |λ|) come first, from `eigs` with its true
//! residual check; SLQ then runs on the deflated operator P H P, P = I −
//! V Vᵀ over the converged eigenvectors V, from Gaussian starts projected
//! off V. The Krylov spaces of those starts stay in the complement of V (P
//! after every product keeps them there to rounding), so the K zero
//! eigenvalues P H P has on span V get no quadrature weight: the bulk's
//! runs are quadratures of the n − K remaining eigenvalues. The density is
//! the K spikes at the eigenvalues, each of mass 1/n, plus the bulk with
//! mass (n − K)/n, smoothed by the same Gaussian ([`with_spikes`] folds
//! both into every run, so the runs' mean, its band and its moments come
//! out of the same code as without deflation).
//!
//! Why it helps: at Ghorbani et al.'s 90 steps the quadrature of each run
//! is already that of the exact spectrum at the default smoothing (the
//! fixtures' L1 at 90 steps equals that of an n-step quadrature from the
//! same starts to 4 digits); what is left is the sampling error of the
//! random starts' weights, largest at eigenvalues isolated at the scale σ
//! — the outliers, whose weight (v·u)² has the spread of its own mean. A
//! deflated eigenvalue carries its exact mass 1/n instead; the bulk, being
//! narrower, is resolved by fewer steps per run ([`DEFLATED_STEPS`]), and
//! the products saved go into more runs.

use crate::error::{Error, Result};
use crate::spectral::compensated::{dot, norm};
use crate::spectral::eigs::{eigs, EigsSettings, Which};
use crate::spectral::lanczos::BasisBudget;
use crate::spectral::operator::{BasisDevice, SymOperator};
use crate::spectral::slq::{self, SlqRun};

/// `--deflate auto`: how many eigenpairs are asked of `eigs` at most.
pub const AUTO_CAP: usize = 64;
/// Lanczos steps per run of the deflated bulk, unless asked otherwise.
pub const DEFLATED_STEPS: usize = 30;
/// An eigenpair is deflated when its true residual ‖Hv − λv‖ is at most
/// this times |λ|max (`eigs`' default tolerance).
pub const DEFLATE_TOL: f64 = 1e-6;
/// The share of the total product budget `eigs` may take (its step
/// budget; its residual checks come on top).
pub const EIGS_SHARE: f64 = 1.0 / 3.0;

/// How many eigenpairs to deflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeflateCount {
    /// The K of largest |λ| (those of them that converge).
    Fixed(usize),
    /// Up to [`AUTO_CAP`]: every one `eigs` resolves within its step
    /// budget (see [`find_outliers`]).
    Auto,
}

/// P = I − V Vᵀ over orthonormal vectors V.
#[derive(Clone, Debug)]
pub struct Projector {
    v: Vec<Vec<f64>>,
}

impl Projector {
    /// Over the span of `vectors`, orthonormalised here (two passes of
    /// Gram–Schmidt; a vector dependent on the earlier ones to 1e-8 of
    /// its norm is dropped).
    pub fn new(vectors: &[Vec<f64>]) -> Projector {
        let mut p = Projector { v: vec![] };
        for x in vectors {
            let mut y = x.clone();
            let before = norm(&y);
            p.project(&mut y);
            let r = norm(&y);
            if before > 0.0 && r > 1e-8 * before {
                y.iter_mut().for_each(|a| *a /= r);
                p.v.push(y);
            }
        }
        p
    }

    /// The number of vectors projected off.
    pub fn len(&self) -> usize {
        self.v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// x ← P x, twice (classical Gram–Schmidt repeated: orthogonal to V to
    /// rounding whatever x's component along V).
    pub fn project(&self, x: &mut [f64]) {
        for _ in 0..2 {
            for q in &self.v {
                let c = dot(x, q);
                x.iter_mut().zip(q).for_each(|(a, b)| *a -= c * b);
            }
        }
    }
}

/// P A P for the operator A and the projector P.
pub struct Deflated<'a> {
    pub inner: &'a mut dyn SymOperator,
    pub p: &'a Projector,
}

impl SymOperator for Deflated<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        let mut x = v.to_vec();
        self.p.project(&mut x);
        self.inner.apply(&x, out)?;
        self.p.project(out);
        Ok(())
    }
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        let xs: Vec<Vec<f64>> = vs
            .iter()
            .map(|v| {
                let mut x = v.to_vec();
                self.p.project(&mut x);
                x
            })
            .collect();
        let refs: Vec<&[f64]> = xs.iter().map(|x| x.as_slice()).collect();
        self.inner.apply_block(&refs, outs)?;
        for o in outs.iter_mut() {
            self.p.project(o);
        }
        Ok(())
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn BasisDevice>> {
        self.inner.basis_device()
    }
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
        self.inner.basis_ranks()
    }
}

/// The eigenpairs found for deflation.
#[derive(Clone, Debug)]
pub struct Outliers {
    /// Of the deflated pairs, largest |λ| first.
    pub values: Vec<f64>,
    pub vectors: Vec<Vec<f64>>,
    /// Their true residuals ‖Hv − λv‖.
    pub residuals: Vec<f64>,
    /// How many pairs `eigs` was asked for.
    pub asked: usize,
    /// Every pair `eigs` returned, with its residual (the deflated ones
    /// and those that did not converge).
    pub candidates: Vec<(f64, f64)>,
    /// The bound the residuals were held to (`DEFLATE_TOL`·|λ|max).
    pub bound: f64,
    /// Lanczos steps and products `eigs` took (residual checks included).
    pub steps: usize,
    pub hvps: usize,
}

/// The pairs to deflate: `eigs` (largest |λ| first, `max_steps` steps at
/// most) for K pairs, or for [`AUTO_CAP`] with [`DeflateCount::Auto`];
/// the pairs whose true residual is within `DEFLATE_TOL`·|λ|max are kept,
/// the others dropped (a vector that is not an eigenvector would carry its
/// Rayleigh quotient's mass where no eigenvalue is).
///
/// The automatic rule is a gap rule measured by convergence: Lanczos
/// resolves an eigenvalue to a residual of 1e-6·|λ|max within a few
/// hundred steps only where it is separated from the rest of the spectrum
/// by a gap large against the spectrum's width (Kaniel–Paige), and those
/// are the eigenvalues SLQ's weights represent worst. So K = the number of
/// the top-|λ| Ritz pairs, at most [`AUTO_CAP`], that converge within the
/// step budget ([`EIGS_SHARE`] of the products).
pub fn find_outliers(
    op: &mut dyn SymOperator,
    count: DeflateCount,
    max_steps: usize,
    seed: u64,
    block: usize,
    budget: BasisBudget,
) -> Result<Outliers> {
    let n = op.dim();
    let asked = match count {
        DeflateCount::Fixed(k) => k,
        DeflateCount::Auto => AUTO_CAP,
    };
    if asked == 0 || asked >= n {
        return Err(Error::Invalid {
            what: "deflation",
            msg: format!(
                "{asked} eigenpairs: deflation takes between 1 and n − 1 = {} of the operator's {n}",
                n.saturating_sub(1)
            ),
        });
    }
    let mut s = EigsSettings::new(asked, Which::Magnitude);
    s.tol = DEFLATE_TOL;
    s.max_steps = max_steps.max(s.min_steps.min(n));
    s.seed = seed;
    s.block = block;
    s.basis_budget = budget;
    let r = eigs(op, &s)?;
    let lmax = r.values.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let bound = DEFLATE_TOL * lmax.max(f64::MIN_POSITIVE);
    let mut out = Outliers {
        values: vec![],
        vectors: vec![],
        residuals: vec![],
        asked,
        candidates: r
            .values
            .iter()
            .copied()
            .zip(r.residuals.iter().copied())
            .collect(),
        bound,
        steps: r.steps,
        hvps: r.operator_applications,
    };
    for ((l, v), res) in r.values.into_iter().zip(r.vectors).zip(r.residuals) {
        if res <= bound {
            out.values.push(l);
            out.vectors.push(v);
            out.residuals.push(res);
        }
    }
    Ok(out)
}

/// Every bulk run with the spikes folded in: nodes the spikes then the
/// bulk's, weights 1/n per spike and the bulk's scaled by (n − K)/n, so
/// each run is a quadrature of the whole spectrum and the runs' mean is
/// spikes + (n − K)/n · the bulk's mean.
pub fn with_spikes(bulk: &[SlqRun], spikes: &[f64], n: usize) -> Vec<SlqRun> {
    let k = spikes.len();
    let scale = (n - k) as f64 / n as f64;
    bulk.iter()
        .map(|r| SlqRun {
            nodes: spikes.iter().chain(&r.nodes).copied().collect(),
            weights: std::iter::repeat_n(1.0 / n as f64, k)
                .chain(r.weights.iter().map(|w| w * scale))
                .collect(),
            breakdowns: r.breakdowns,
        })
        .collect()
}

/// A deflated SLQ and what it took.
pub struct DeflatedSlq {
    pub outliers: Outliers,
    /// The bulk runs with the spikes folded in ([`with_spikes`]).
    pub runs: Vec<SlqRun>,
    /// Steps per bulk run and bulk runs.
    pub steps: usize,
    pub bulk_runs: usize,
    /// Where the bulk runs' bases were kept (`BasisPlan::describe`).
    pub basis: String,
}

/// Deflation within a budget of `total` products: the outliers
/// ([`find_outliers`], at most [`EIGS_SHARE`] of `total` steps), then as
/// many bulk runs of `steps` steps on the deflated operator as the rest of
/// the budget allows (refused when not one fits).
pub fn deflated_slq(
    op: &mut dyn SymOperator,
    count: DeflateCount,
    total: usize,
    steps: usize,
    seed: u64,
    block: usize,
    budget: BasisBudget,
) -> Result<DeflatedSlq> {
    let n = op.dim();
    let max_steps = ((total as f64 * EIGS_SHARE) as usize).max(1);
    let outliers = find_outliers(op, count, max_steps, seed, block, budget)?;
    let left = total.saturating_sub(outliers.hvps);
    let k = outliers.values.len();
    let steps = steps.min(n - k).max(1);
    let runs = left / steps;
    if runs == 0 {
        return Err(Error::Invalid {
            what: "deflation budget",
            msg: format!(
                "finding the {} eigenpairs took {} of the {total} products, leaving {left}, \
                 fewer than one run of {steps} steps: raise the budget (steps × runs)",
                outliers.asked, outliers.hvps
            ),
        });
    }
    let p = Projector::new(&outliers.vectors);
    let mut d = Deflated { inner: op, p: &p };
    let plan = slq::basis_plan(&d, steps, runs, block, budget)?;
    let bulk = slq::slq_from_starts(&mut d, steps, runs, seed, block, &plan, &|v| p.project(v))?;
    Ok(DeflatedSlq {
        runs: with_spikes(&bulk, &outliers.values, n),
        outliers,
        steps,
        bulk_runs: runs,
        basis: plan.describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spectral::DiagonalOperator;

    /// A bulk in [1, 2] and three outliers at 10, 20, −15: deflating them
    /// leaves every bulk node in [1, 2] (no node at the zeros P H P has on
    /// span V, nor any weight there), the spikes at the outliers with mass
    /// 1/n each, and the runs' weights summing to 1.
    #[test]
    fn deflation_removes_the_outliers_and_their_zero_modes() {
        let mut d: Vec<f64> = (0..200)
            .map(|i| 1.0 + (i as f64 * 0.731).sin().abs())
            .collect();
        d[17] = 10.0;
        d[90] = 20.0;
        d[150] = -15.0;
        let n = d.len();
        let mut op = DiagonalOperator { d };
        let r = deflated_slq(
            &mut op,
            DeflateCount::Fixed(3),
            900,
            30,
            4,
            1,
            BasisBudget::host_default(),
        )
        .unwrap();
        let mut v = r.outliers.values.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(r.outliers.values.len(), 3);
        for (a, b) in v.iter().zip([-15.0, 10.0, 20.0]) {
            assert!((a - b).abs() <= 1e-8, "{v:?}");
        }
        assert!(r.bulk_runs >= 2);
        for run in &r.runs {
            let total: f64 = run.weights.iter().sum();
            assert!((total - 1.0).abs() <= 1e-12, "weights sum to {total}");
            for (l, w) in run.nodes[3..].iter().zip(&run.weights[3..]) {
                assert!(
                    (1.0 - 1e-9..=2.0 + 1e-9).contains(l) || *w <= 1e-20,
                    "bulk node {l} (weight {w}) outside the bulk"
                );
            }
            assert!(run.weights[..3].iter().all(|w| *w == 1.0 / n as f64));
        }
    }

    /// The same deflation on an operator whose outliers are not on the
    /// axes (a rotation by Householder reflections): the same spikes.
    #[test]
    fn deflation_of_a_rotated_operator() {
        let n = 60;
        let d: Vec<f64> = (0..n)
            .map(|i| {
                if i < 2 {
                    50.0 + i as f64
                } else {
                    (i as f64 * 0.3).cos()
                }
            })
            .collect();
        // H = R diag(d) R with R = I − 2uuᵀ, u a unit vector.
        let u: Vec<f64> = (0..n).map(|i| ((i * 7 % 11) as f64 - 5.0) / 20.0).collect();
        let s = norm(&u);
        let u: Vec<f64> = u.iter().map(|x| x / s).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let r = |p: usize, q: usize| f64::from(u8::from(p == q)) - 2.0 * u[p] * u[q];
                a[i * n + j] = (0..n).map(|k| r(i, k) * d[k] * r(k, j)).sum();
            }
        }
        let mut op = crate::spectral::DenseOperator { n, a };
        let r = deflated_slq(
            &mut op,
            DeflateCount::Fixed(2),
            300,
            20,
            1,
            2,
            BasisBudget::host_default(),
        )
        .unwrap();
        let mut v = r.outliers.values.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert!(
            (v[0] - 50.0).abs() <= 1e-7 && (v[1] - 51.0).abs() <= 1e-7,
            "{v:?}"
        );
        for run in &r.runs {
            for (l, w) in run.nodes[2..].iter().zip(&run.weights[2..]) {
                assert!(l.abs() <= 1.0 + 1e-9 || *w <= 1e-20, "{l} ({w})");
            }
        }
    }
}

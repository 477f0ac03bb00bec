//! Extreme eigenpairs by Lanczos with full reorthogonalisation, continued
//! until every wanted Ritz pair's true residual ‖Av − λv‖ ≤ tol·|λmax| or
//! the step budget runs out. Algebraic ordering by default: in batch-mode
//! BN the largest-magnitude eigenvalue is often negative, and power
//! iteration, which finds that one, reports it as "the top eigenvalue".

use crate::error::{Error, Result};
use crate::spectral::compensated::norm;
use crate::spectral::lanczos::{gaussian_unit, BasisPrecision, Lanczos};
use crate::spectral::operator::SymOperator;
use rand::SeedableRng;

/// Which end of the spectrum `eigs` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Largest,
    Smallest,
    Magnitude,
}

#[derive(Clone, Debug)]
pub struct EigsSettings {
    pub k: usize,
    pub which: Which,
    pub tol: f64,
    /// Steps before the first convergence check.
    pub min_steps: usize,
    /// Step budget.
    pub max_steps: usize,
    pub seed: u64,
}

impl EigsSettings {
    pub fn new(k: usize, which: Which) -> EigsSettings {
        EigsSettings {
            k,
            which,
            tol: 1e-6,
            min_steps: (2 * k + 20).max(30),
            max_steps: 400,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EigsResult {
    /// In the order asked for (largest first, most negative first, or largest |λ| first).
    pub values: Vec<f64>,
    pub vectors: Vec<Vec<f64>>,
    /// True residual norms ‖Av − λv‖.
    pub residuals: Vec<f64>,
    pub steps: usize,
    pub converged: bool,
    pub operator_applications: usize,
}

fn order(values: &[f64], which: Which) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| match which {
        Which::Largest => -values[i],
        Which::Smallest => values[i],
        Which::Magnitude => -values[i].abs(),
    };
    idx.sort_by(|&a, &b| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}

pub fn eigs(op: &mut dyn SymOperator, s: &EigsSettings) -> Result<EigsResult> {
    let n = op.dim();
    if s.k == 0 || s.k > n {
        return Err(Error::Invalid {
            what: "eigenpair count",
            msg: format!("{} must be between 1 and the operator's dimension {n}", s.k),
        });
    }
    if !(s.tol.is_finite() && s.tol > 0.0) {
        return Err(Error::Invalid {
            what: "tolerance",
            msg: format!("{} must be a positive finite number", s.tol),
        });
    }
    if s.max_steps == 0 {
        return Err(Error::Invalid {
            what: "Lanczos steps",
            msg: "the step budget must be at least 1".into(),
        });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0xe165);
    let start = gaussian_unit(n, &mut rng);
    let max_steps = s.max_steps.min(n).max(s.k);
    let precision = BasisPrecision::for_size(n, max_steps);
    let mut lz = Lanczos::new(op, &start, precision, s.seed)?;
    let mut more = true;
    let mut applications = 0;
    loop {
        while more && lz.steps() < s.min_steps.min(max_steps) {
            more = lz.step()?;
        }
        let t = lz.ritz()?;
        let idx = order(&t.values, s.which);
        let lmax = t.values.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        let beta = lz.last_beta();
        let wanted: Vec<usize> = idx.into_iter().take(s.k).collect();
        let est: Vec<f64> = wanted
            .iter()
            .map(|&i| (beta * t.vectors[i].last().unwrap()).abs())
            .collect();
        let at_end = !more || lz.steps() >= max_steps;
        // The Lanczos estimate |β_m y_m| is cheap; true residuals cost one
        // product per vector, so they are taken only once it says done.
        if at_end || est.iter().all(|e| *e <= s.tol * lmax) {
            let values: Vec<f64> = wanted.iter().map(|&i| t.values[i]).collect();
            let vectors: Vec<Vec<f64>> =
                wanted.iter().map(|&i| lz.combine(&t.vectors[i])).collect();
            let mut residuals = vec![];
            let mut av = vec![0.0; n];
            for (l, v) in values.iter().zip(&vectors) {
                lz.apply(v, &mut av)?;
                applications += 1;
                let r: Vec<f64> = av.iter().zip(v).map(|(a, x)| a - l * x).collect();
                residuals.push(norm(&r));
            }
            let bound = s.tol * lmax.max(f64::MIN_POSITIVE);
            let converged = residuals.iter().all(|r| *r <= bound);
            if converged || at_end {
                let steps = lz.steps();
                return Ok(EigsResult {
                    values,
                    vectors,
                    residuals,
                    steps,
                    converged,
                    operator_applications: steps + applications,
                });
            }
        }
        for _ in 0..10 {
            if lz.steps() >= max_steps || !more {
                break;
            }
            more = lz.step()?;
        }
    }
}
/// Fraction of ‖g‖² in the span of the first k vectors, k = 1..=len.
/// The vectors must be orthonormal (Ritz vectors of one Lanczos basis are).
pub fn gradient_fractions(g: &[f64], vectors: &[Vec<f64>]) -> Vec<f64> {
    let gg = crate::spectral::compensated::dot(g, g);
    let mut acc = 0.0;
    vectors
        .iter()
        .map(|u| {
            let c = crate::spectral::compensated::dot(g, u);
            acc += c * c;
            if gg > 0.0 {
                acc / gg
            } else {
                0.0
            }
        })
        .collect()
}

//! Trace estimators: Hutchinson with Rademacher probes, and Hutch++
//! (Meyer, Musco, Musco & Woodruff 2021), which takes the trace of a
//! sketched top subspace exactly and applies Hutchinson only to the rest.

use crate::error::{Error, Result};
use crate::spectral::compensated::{dot, norm};
use crate::spectral::operator::SymOperator;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, serde::Serialize)]
pub struct TraceEstimate {
    pub estimate: f64,
    pub stderr: f64,
    pub operator_applications: usize,
}

fn rademacher(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
        .collect()
}

fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let k = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / k;
    if xs.len() < 2 {
        return (m, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (k - 1.0);
    (m, (var / k).sqrt())
}

pub fn hutchinson(op: &mut dyn SymOperator, probes: usize, seed: u64) -> Result<TraceEstimate> {
    if probes == 0 {
        return Err(Error::Invalid {
            what: "trace probes",
            msg: "must be at least 1".into(),
        });
    }
    let n = op.dim();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7ace);
    let mut av = vec![0.0; n];
    let mut samples = vec![];
    for _ in 0..probes {
        let z = rademacher(n, &mut rng);
        op.apply(&z, &mut av)?;
        samples.push(dot(&z, &av));
    }
    let (estimate, stderr) = mean_stderr(&samples);
    Ok(TraceEstimate {
        estimate,
        stderr,
        operator_applications: probes,
    })
}

/// Hutch++ with `matvecs` operator applications (split in thirds).
pub fn hutchpp(op: &mut dyn SymOperator, matvecs: usize, seed: u64) -> Result<TraceEstimate> {
    let k = matvecs / 3;
    if k < 2 {
        return Err(Error::Invalid {
            what: "trace probes",
            msg: format!("Hutch++ needs at least 6 operator applications, got {matvecs}"),
        });
    }
    let n = op.dim();
    let k = k.min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7ace2);
    // Q: an orthonormal basis of A S, by twice-repeated Gram–Schmidt.
    let mut q: Vec<Vec<f64>> = vec![];
    let mut av = vec![0.0; n];
    for _ in 0..k {
        let s = rademacher(n, &mut rng);
        op.apply(&s, &mut av)?;
        let mut y = av.clone();
        for _ in 0..2 {
            for qi in &q {
                let c = dot(&y, qi);
                y.iter_mut().zip(qi).for_each(|(a, b)| *a -= c * b);
            }
        }
        let r = norm(&y);
        if r > 1e-12 * norm(&av).max(f64::MIN_POSITIVE) {
            q.push(y.into_iter().map(|x| x / r).collect());
        }
    }
    let mut exact = 0.0;
    for qi in &q {
        op.apply(qi, &mut av)?;
        exact += dot(qi, &av);
    }
    let mut samples = vec![];
    for _ in 0..k {
        let mut g = rademacher(n, &mut rng);
        for qi in &q {
            let c = dot(&g, qi);
            g.iter_mut().zip(qi).for_each(|(a, b)| *a -= c * b);
        }
        op.apply(&g, &mut av)?;
        samples.push(dot(&g, &av));
    }
    let (m, se) = mean_stderr(&samples);
    Ok(TraceEstimate {
        estimate: exact + m,
        stderr: se,
        operator_applications: 2 * k + q.len(),
    })
}

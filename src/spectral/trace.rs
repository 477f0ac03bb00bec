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

fn check_block(block: usize) -> Result<()> {
    if block == 0 {
        return Err(Error::Invalid {
            what: "block size",
            msg: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// `count` vectors drawn in order by `make`, multiplied `block` at a time
/// (one block product each), each handed with its product to `take` in
/// order; at most one block of vectors is held at a time.
fn in_blocks(
    op: &mut dyn SymOperator,
    count: usize,
    block: usize,
    mut make: impl FnMut() -> Vec<f64>,
    mut take: impl FnMut(&[f64], &[f64]),
) -> Result<()> {
    let n = op.dim();
    let mut done = 0;
    while done < count {
        let m = block.max(1).min(count - done);
        let vs: Vec<Vec<f64>> = (0..m).map(|_| make()).collect();
        let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
        let mut avs = vec![vec![0.0; n]; m];
        op.apply_block(&refs, &mut avs)?;
        for (v, av) in vs.iter().zip(&avs) {
            take(v, av);
        }
        done += m;
    }
    Ok(())
}

/// Hutchinson's estimate over `probes` Rademacher probes, one product at
/// a time: [`hutchinson_block`] with a block of 1.
pub fn hutchinson(op: &mut dyn SymOperator, probes: usize, seed: u64) -> Result<TraceEstimate> {
    hutchinson_block(op, probes, seed, 1)
}

/// Hutch++ with `matvecs` operator applications (split in thirds), one
/// product at a time: [`hutchpp_block`] with a block of 1.
pub fn hutchpp(op: &mut dyn SymOperator, matvecs: usize, seed: u64) -> Result<TraceEstimate> {
    hutchpp_block(op, matvecs, seed, 1)
}

/// Hutchinson's estimate over `probes` Rademacher probes, `block` of them
/// per block product (the same probes, in the same order, whatever the
/// block).
pub fn hutchinson_block(
    op: &mut dyn SymOperator,
    probes: usize,
    seed: u64,
    block: usize,
) -> Result<TraceEstimate> {
    if probes == 0 {
        return Err(Error::Invalid {
            what: "trace probes",
            msg: "must be at least 1".into(),
        });
    }
    check_block(block)?;
    let n = op.dim();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7ace);
    let mut samples = vec![];
    in_blocks(
        op,
        probes,
        block,
        || rademacher(n, &mut rng),
        |z, av| samples.push(dot(z, av)),
    )?;
    let (estimate, stderr) = mean_stderr(&samples);
    Ok(TraceEstimate {
        estimate,
        stderr,
        operator_applications: probes,
    })
}

/// Hutch++ with `matvecs` operator applications (split in thirds), each
/// third in block products of `block` vectors. The sketch, the exact part
/// and the residual probes are the same vectors in the same order whatever
/// the block.
pub fn hutchpp_block(
    op: &mut dyn SymOperator,
    matvecs: usize,
    seed: u64,
    block: usize,
) -> Result<TraceEstimate> {
    let k = matvecs / 3;
    if k < 2 {
        return Err(Error::Invalid {
            what: "trace probes",
            msg: format!("Hutch++ needs at least 6 operator applications, got {matvecs}"),
        });
    }
    check_block(block)?;
    let n = op.dim();
    let k = k.min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7ace2);
    // Q: an orthonormal basis of A S, by twice-repeated Gram–Schmidt.
    let mut q: Vec<Vec<f64>> = vec![];
    in_blocks(
        op,
        k,
        block,
        || rademacher(n, &mut rng),
        |_, av| {
            let mut y = av.to_vec();
            for _ in 0..2 {
                for qi in &q {
                    let c = dot(&y, qi);
                    y.iter_mut().zip(qi).for_each(|(a, b)| *a -= c * b);
                }
            }
            let r = norm(&y);
            if r > 1e-12 * norm(av).max(f64::MIN_POSITIVE) {
                q.push(y.into_iter().map(|x| x / r).collect());
            }
        },
    )?;
    let mut exact = 0.0;
    let mut next = q.iter();
    in_blocks(
        op,
        q.len(),
        block,
        || next.next().cloned().unwrap_or_default(),
        |qi, av| exact += dot(qi, av),
    )?;
    let mut samples = vec![];
    in_blocks(
        op,
        k,
        block,
        || {
            let mut g = rademacher(n, &mut rng);
            for qi in &q {
                let c = dot(&g, qi);
                g.iter_mut().zip(qi).for_each(|(a, b)| *a -= c * b);
            }
            g
        },
        |g, av| samples.push(dot(g, av)),
    )?;
    let (m, se) = mean_stderr(&samples);
    Ok(TraceEstimate {
        estimate: exact + m,
        stderr: se,
        operator_applications: 2 * k + q.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spectral::DiagonalOperator;

    /// Same probes in the same order and the default `apply_block` (one
    /// `apply` per vector): the estimates are equal bit for bit whatever
    /// the block, including blocks that do not divide the count.
    #[test]
    fn block_estimates_equal_single_estimates() {
        let d: Vec<f64> = (0..90)
            .map(|i| (i as f64 * 0.37).sin() * 3.0 + 1.0)
            .collect();
        let h1 = hutchinson(&mut DiagonalOperator { d: d.clone() }, 23, 4).unwrap();
        let p1 = hutchpp(&mut DiagonalOperator { d: d.clone() }, 30, 4).unwrap();
        for block in [2, 4, 7, 64] {
            let h = hutchinson_block(&mut DiagonalOperator { d: d.clone() }, 23, 4, block).unwrap();
            let p = hutchpp_block(&mut DiagonalOperator { d: d.clone() }, 30, 4, block).unwrap();
            assert_eq!(
                (h.estimate, h.stderr.to_bits()),
                (h1.estimate, h1.stderr.to_bits())
            );
            assert_eq!(
                (p.estimate, p.stderr.to_bits()),
                (p1.estimate, p1.stderr.to_bits())
            );
            assert_eq!(p.operator_applications, p1.operator_applications);
        }
        assert!(hutchinson_block(&mut DiagonalOperator { d: d.clone() }, 5, 0, 0).is_err());
        assert!(hutchpp_block(&mut DiagonalOperator { d }, 9, 0, 0).is_err());
    }
}

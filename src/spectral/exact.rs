//! The dense Hessian of a small model from n Hessian-vector products, and
//! its whole spectrum by a symmetric eigensolver.

use crate::error::{Error, Result};
use crate::spectral::operator::SymOperator;

/// n products and an n² f64 matrix: 4096 parameters take 4096 products and
/// 128 MiB, minutes on the CPU reference; beyond that SLQ is the tool.
pub const EXACT_MAX_PARAMS: usize = 4096;

/// The largest limit accepted at all: 16,384 parameters make a 2 GiB
/// matrix and 16,384 products; past that the dense route cannot finish.
pub const EXACT_HARD_MAX_PARAMS: usize = 16_384;

pub struct ExactSpectrum {
    /// Ascending.
    pub values: Vec<f64>,
    /// vectors[k] is the unit eigenvector of values[k].
    pub vectors: Vec<Vec<f64>>,
    /// max |H − Hᵀ| / max |H| of the assembled matrix, before symmetrising.
    pub asymmetry: f64,
}

/// Columns H e_i, symmetrised as (H + Hᵀ)/2.
pub fn dense_matrix(op: &mut dyn SymOperator, limit: usize) -> Result<(Vec<f64>, f64)> {
    let n = op.dim();
    if limit > EXACT_HARD_MAX_PARAMS {
        return Err(Error::Invalid {
            what: "exact size limit",
            msg: format!(
                "{limit} parameters would allow a dense {limit}×{limit} float64 matrix ({} GiB); \
                 the most accepted is {EXACT_HARD_MAX_PARAMS} ({} GiB)",
                (limit as f64 * limit as f64 * 8.0 / (1u64 << 30) as f64).round(),
                (EXACT_HARD_MAX_PARAMS * EXACT_HARD_MAX_PARAMS * 8) >> 30
            ),
        });
    }
    if n == 0 {
        return Err(Error::Invalid {
            what: "operator",
            msg: "the operator has dimension 0 (no parameters): no spectrum".into(),
        });
    }
    if n > limit {
        return Err(Error::TooLarge(format!(
            "the exact spectrum needs {n} Hessian-vector products and a {n}×{n} float64 matrix ({} MiB); \
             the limit is {limit} parameters, beyond which `hesscope density` (SLQ) is the tool",
            (n * n * 8) >> 20
        )));
    }
    let mut h = vec![0.0; n * n];
    let mut e = vec![0.0; n];
    let mut col = vec![0.0; n];
    for j in 0..n {
        e[j] = 1.0;
        op.apply(&e, &mut col)?;
        e[j] = 0.0;
        for i in 0..n {
            h[i * n + j] = col[i];
        }
    }
    let mut asym: f64 = 0.0;
    let mut big: f64 = 0.0;
    for i in 0..n {
        for j in 0..i {
            let (a, b) = (h[i * n + j], h[j * n + i]);
            asym = asym.max((a - b).abs());
            big = big.max(a.abs()).max(b.abs());
            let m = 0.5 * (a + b);
            h[i * n + j] = m;
            h[j * n + i] = m;
        }
        big = big.max(h[i * n + i].abs());
    }
    Ok((h, if big > 0.0 { asym / big } else { 0.0 }))
}

pub fn exact_spectrum(op: &mut dyn SymOperator, limit: usize) -> Result<ExactSpectrum> {
    let n = op.dim();
    let (h, asymmetry) = dense_matrix(op, limit)?;
    let m = faer::Mat::<f64>::from_fn(n, n, |i, j| h[i * n + j]);
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numerical(format!("symmetric eigensolver: {e:?}")))?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let values: Vec<f64> = (0..n).map(|i| s[i]).collect();
    let vectors = (0..n)
        .map(|k| (0..n).map(|i| u[(i, k)]).collect())
        .collect();
    Ok(ExactSpectrum {
        values,
        vectors,
        asymmetry,
    })
}

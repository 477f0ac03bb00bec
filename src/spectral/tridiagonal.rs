//! Eigen-decomposition of a symmetric tridiagonal matrix by the implicit QL
//! algorithm with Wilkinson shifts, with eigenvectors (Golub–Welsch: the
//! Gauss quadrature weights are the squared first components).

use crate::error::{Error, Result};

pub struct TridiagEigen {
    /// Ascending.
    pub values: Vec<f64>,
    /// vectors[k] is the unit eigenvector of values[k] (length m).
    pub vectors: Vec<Vec<f64>>,
}

impl TridiagEigen {
    /// Gauss quadrature weights: squared first components.
    pub fn weights(&self) -> Vec<f64> {
        self.vectors.iter().map(|v| v[0] * v[0]).collect()
    }
}

/// Diagonal `alpha` (m), off-diagonal `beta` (m − 1).
pub fn tridiagonal_eigen(alpha: &[f64], beta: &[f64]) -> Result<TridiagEigen> {
    let m = alpha.len();
    if m == 0 {
        return Ok(TridiagEigen {
            values: vec![],
            vectors: vec![],
        });
    }
    if beta.len() + 1 != m {
        return Err(Error::Numerical(format!(
            "tridiagonal with {m} diagonal and {} off-diagonal entries",
            beta.len()
        )));
    }
    let mut d = alpha.to_vec();
    let mut e = vec![0.0; m];
    e[..m - 1].copy_from_slice(beta);
    // z[i][k]: component i of eigenvector k.
    let mut z = vec![vec![0.0; m]; m];
    for (i, row) in z.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for l in 0..m {
        let mut iter = 0;
        loop {
            let mut mm = l;
            while mm + 1 < m {
                let dd = d[mm].abs() + d[mm + 1].abs();
                if e[mm].abs() <= f64::EPSILON * dd {
                    break;
                }
                mm += 1;
            }
            if mm == l {
                break;
            }
            iter += 1;
            if iter > 60 {
                return Err(Error::Numerical(
                    "tridiagonal QL did not converge in 60 iterations".into(),
                ));
            }
            // Wilkinson shift from the leading 2x2 block.
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[mm] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut i = mm;
            let mut underflow = false;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[mm] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                for row in z.iter_mut() {
                    let f = row[i + 1];
                    row[i + 1] = s * row[i] + c * f;
                    row[i] = c * row[i] - s * f;
                }
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[mm] = 0.0;
        }
    }
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| d[a].partial_cmp(&d[b]).unwrap_or(std::cmp::Ordering::Equal));
    Ok(TridiagEigen {
        values: order.iter().map(|&k| d[k]).collect(),
        vectors: order
            .iter()
            .map(|&k| z.iter().map(|row| row[k]).collect())
            .collect(),
    })
}

//! Softmax cross-entropy. `scale` is 1/N for a data set of N samples, so
//! that summing over batches gives the batch-size-weighted mean loss.

/// Per-row softmax of logits [n, k].
pub fn softmax(n: usize, k: usize, z: &[f64]) -> Vec<f64> {
    let mut p = vec![0.0; n * k];
    for s in 0..n {
        let row = &z[s * k..(s + 1) * k];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
        let t: f64 = e.iter().sum();
        for j in 0..k {
            p[s * k + j] = e[j] / t;
        }
    }
    p
}

/// Returns (scale·Σ −log p_y, gz = scale·(p − onehot)).
pub fn forward_backward(
    n: usize,
    k: usize,
    z: &[f64],
    y: &[u32],
    scale: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let p = softmax(n, k, z);
    let mut loss = 0.0;
    let mut gz = vec![0.0; n * k];
    for s in 0..n {
        let row = &z[s * k..(s + 1) * k];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - row[y[s] as usize];
        for j in 0..k {
            gz[s * k + j] = scale * (p[s * k + j] - (j == y[s] as usize) as u8 as f64);
        }
    }
    (scale * loss, gz, p)
}

/// R(gz) = scale·(p ⊙ ż − p·(p·ż)) per row: the softmax Jacobian applied to ż.
pub fn r_backward(n: usize, k: usize, p: &[f64], zdot: &[f64], scale: f64) -> Vec<f64> {
    let mut out = vec![0.0; n * k];
    for s in 0..n {
        let pr = &p[s * k..(s + 1) * k];
        let zr = &zdot[s * k..(s + 1) * k];
        let pz: f64 = pr.iter().zip(zr).map(|(a, b)| a * b).sum();
        for j in 0..k {
            out[s * k + j] = scale * pr[j] * (zr[j] - pz);
        }
    }
    out
}

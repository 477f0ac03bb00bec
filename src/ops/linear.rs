//! Fully connected layer y = x Wᵀ + b in float64 (W is [dout, din]): the
//! plain loops, kept as the independent check of [`super::gemm`]'s GEMMs
//! (tests/conv_gemm.rs), which the reference computes through.

use rayon::prelude::*;

/// y [n, dout] += x [n, din] · Wᵀ.
pub fn forward_acc(n: usize, din: usize, dout: usize, x: &[f64], w: &[f64], y: &mut [f64]) {
    y.par_chunks_mut(dout)
        .enumerate()
        .take(n)
        .for_each(|(s, ys)| {
            let xs = &x[s * din..(s + 1) * din];
            for (o, yv) in ys.iter_mut().enumerate() {
                *yv += w[o * din..(o + 1) * din]
                    .iter()
                    .zip(xs)
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
            }
        });
}

/// gx [n, din] += gy [n, dout] · W.
pub fn backward_data_acc(n: usize, din: usize, dout: usize, gy: &[f64], w: &[f64], gx: &mut [f64]) {
    gx.par_chunks_mut(din)
        .enumerate()
        .take(n)
        .for_each(|(s, gxs)| {
            for o in 0..dout {
                let g = gy[s * dout + o];
                for (a, wv) in gxs.iter_mut().zip(&w[o * din..(o + 1) * din]) {
                    *a += g * wv;
                }
            }
        });
}

/// gw [dout, din] += gyᵀ · x.
pub fn backward_weight_acc(
    n: usize,
    din: usize,
    dout: usize,
    gy: &[f64],
    x: &[f64],
    gw: &mut [f64],
) {
    gw.par_chunks_mut(din).enumerate().for_each(|(o, gwo)| {
        for s in 0..n {
            let g = gy[s * dout + o];
            for (a, xv) in gwo.iter_mut().zip(&x[s * din..(s + 1) * din]) {
                *a += g * xv;
            }
        }
    });
}

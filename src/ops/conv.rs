//! 2-D convolution (zero padding, any groups and dilation, as PyTorch's
//! Conv2d) in float64: the three linear maps from which the forward,
//! backward and R passes are built. Weights are [cout, cin/groups, k, k];
//! output channel co reads the input channels of its group
//! co / (cout/groups).
//!
//! These are the plain loops: the float64 reference computes through
//! [`super::gemm`]'s GEMMs, and tests/conv_gemm.rs checks those against
//! these loops on random shapes (the GPU tests use them as their reference).

use super::valid_range;
use rayon::prelude::*;

/// Geometry of one convolution over a batch.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
    /// Channel groups (1: dense; cin: depthwise); divides cin and cout.
    pub groups: usize,
    /// Spacing of the kernel taps (1: adjacent).
    pub dilation: usize,
}

impl ConvGeom {
    fn in_plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
    /// Per kernel row offset: the valid output rows and the input offset,
    /// computed once per call rather than in the hot loops.
    pub(crate) fn row_table(&self) -> Vec<(usize, usize, isize)> {
        (0..self.k)
            .map(|kh| {
                let off = (kh * self.dilation) as isize - self.pad as isize;
                let (lo, hi) = valid_range(self.oh, self.h, self.stride, off);
                (lo, hi, off)
            })
            .collect()
    }
    pub(crate) fn col_table(&self) -> Vec<(usize, usize, isize)> {
        (0..self.k)
            .map(|kw| {
                let off = (kw * self.dilation) as isize - self.pad as isize;
                let (lo, hi) = valid_range(self.ow, self.w, self.stride, off);
                (lo, hi, off)
            })
            .collect()
    }
    /// Input channels per group (the weight's second dimension).
    pub fn cin_g(&self) -> usize {
        self.cin / self.groups
    }
    /// Output channels per group.
    pub fn cout_g(&self) -> usize {
        self.cout / self.groups
    }
    /// The input channels output channel `co` reads: (first, count).
    fn group_inputs(&self, co: usize) -> (usize, usize) {
        let cig = self.cin_g();
        ((co / self.cout_g()) * cig, cig)
    }
}

/// y += conv(x, w): x [n, cin, h, w], w [cout, cin/groups, k, k], y [n, cout, oh, ow].
pub fn forward_acc(g: &ConvGeom, x: &[f64], w: &[f64], y: &mut [f64]) {
    let (ip, op) = (g.in_plane(), g.out_plane());
    let (rows, cols) = (g.row_table(), g.col_table());
    y.par_chunks_mut(g.cout * op)
        .enumerate()
        .for_each(|(n, yn)| {
            let xn = &x[n * g.cin * ip..(n + 1) * g.cin * ip];
            for co in 0..g.cout {
                let yp = &mut yn[co * op..(co + 1) * op];
                let (first, cig) = g.group_inputs(co);
                for cl in 0..cig {
                    let ci = first + cl;
                    let xp = &xn[ci * ip..(ci + 1) * ip];
                    for kh in 0..g.k {
                        let (r0, r1, roff) = rows[kh];
                        for kw in 0..g.k {
                            let wv = w[((co * cig + cl) * g.k + kh) * g.k + kw];
                            let (c0, c1, coff) = cols[kw];
                            for o_r in r0..r1 {
                                let ir = (o_r * g.stride) as isize + roff;
                                let xrow = &xp[ir as usize * g.w..];
                                let yrow = &mut yp[o_r * g.ow..];
                                for (o_c, y) in yrow.iter_mut().enumerate().take(c1).skip(c0) {
                                    let ic = ((o_c * g.stride) as isize + coff) as usize;
                                    *y += wv * xrow[ic];
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// gx += conv_transpose(gy, w): the data gradient.
pub fn backward_data_acc(g: &ConvGeom, gy: &[f64], w: &[f64], gx: &mut [f64]) {
    let (ip, op) = (g.in_plane(), g.out_plane());
    let (rows, cols) = (g.row_table(), g.col_table());
    gx.par_chunks_mut(g.cin * ip)
        .enumerate()
        .for_each(|(n, gxn)| {
            let gyn = &gy[n * g.cout * op..(n + 1) * g.cout * op];
            for co in 0..g.cout {
                let gp = &gyn[co * op..(co + 1) * op];
                let (first, cig) = g.group_inputs(co);
                for cl in 0..cig {
                    let ci = first + cl;
                    let xp = &mut gxn[ci * ip..(ci + 1) * ip];
                    for kh in 0..g.k {
                        let (r0, r1, roff) = rows[kh];
                        for kw in 0..g.k {
                            let wv = w[((co * cig + cl) * g.k + kh) * g.k + kw];
                            let (c0, c1, coff) = cols[kw];
                            for o_r in r0..r1 {
                                let ir = ((o_r * g.stride) as isize + roff) as usize;
                                for o_c in c0..c1 {
                                    let ic = ((o_c * g.stride) as isize + coff) as usize;
                                    xp[ir * g.w + ic] += wv * gp[o_r * g.ow + o_c];
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// gw += sum over batch and positions of gy * x: the weight gradient.
pub fn backward_weight_acc(g: &ConvGeom, gy: &[f64], x: &[f64], gw: &mut [f64]) {
    let (ip, op) = (g.in_plane(), g.out_plane());
    let (rows, cols) = (g.row_table(), g.col_table());
    let kk = g.k * g.k;
    gw.par_chunks_mut(g.cin_g() * kk)
        .enumerate()
        .for_each(|(co, gwc)| {
            let (first, cig) = g.group_inputs(co);
            for n in 0..g.n {
                let gp = &gy[(n * g.cout + co) * op..(n * g.cout + co + 1) * op];
                for cl in 0..cig {
                    let ci = first + cl;
                    let xp = &x[(n * g.cin + ci) * ip..(n * g.cin + ci + 1) * ip];
                    for kh in 0..g.k {
                        let (r0, r1, roff) = rows[kh];
                        for kw in 0..g.k {
                            let (c0, c1, coff) = cols[kw];
                            let mut acc = 0.0;
                            for o_r in r0..r1 {
                                let ir = ((o_r * g.stride) as isize + roff) as usize;
                                for o_c in c0..c1 {
                                    let ic = ((o_c * g.stride) as isize + coff) as usize;
                                    acc += gp[o_r * g.ow + o_c] * xp[ir * g.w + ic];
                                }
                            }
                            gwc[cl * kk + kh * g.k + kw] += acc;
                        }
                    }
                }
            }
        });
}

/// y[n, c, :] += b[c].
pub fn bias_acc(n: usize, c: usize, plane: usize, b: &[f64], y: &mut [f64]) {
    for (i, yp) in y.chunks_mut(plane).enumerate().take(n * c) {
        let bv = b[i % c];
        yp.iter_mut().for_each(|v| *v += bv);
    }
}

/// gb[c] += sum over batch and positions of gy[n, c, :].
pub fn bias_grad_acc(n: usize, c: usize, plane: usize, gy: &[f64], gb: &mut [f64]) {
    for (i, gp) in gy.chunks(plane).enumerate().take(n * c) {
        gb[i % c] += gp.iter().sum::<f64>();
    }
}

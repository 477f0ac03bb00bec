//! Convolutions and fully connected layers of the float64 reference as
//! cache-blocked GEMMs: faer's `matmul` (its x86 kernels, or nano-gemm
//! below 16³), always sequential within a call, over an im2col tile of
//! output rows kept in a per-thread scratch buffer (1×1 convolutions with
//! stride 1 and no padding read the input as it is).
//!
//! Work is split only over independent outputs — samples for the forward
//! and the data gradient, fixed row blocks for the linear layers — and a
//! weight gradient sums per-chunk partials (a chunk's size depends only on
//! the batch) in chunk order: every call makes the same GEMM calls on the
//! same operands whatever the thread count, so results are bit-for-bit
//! independent of it (tests/conv_gemm.rs). The plain loops of
//! [`super::conv`] and [`super::linear`] stay as the independent check.
//!
//! Every function takes a list of pairs whose products it sums, so that an
//! R-pass's two terms (conv(ẋ, W) + conv(x, V); convᵀ(R(gy), W) +
//! convᵀ(gy, V); R(gy)⊗x + gy⊗ẋ) share one output pass.

use super::conv::ConvGeom;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use std::cell::RefCell;

/// Floats of one im2col tile, at most (a few MB: cache-sized panels).
const TILE_FLOATS: usize = 1 << 18;
/// Samples per row block of a linear layer's GEMMs, and output rows per
/// block of its weight gradient.
const LINEAR_ROWS: usize = 32;
/// A weight gradient sums at most this many per-chunk partials.
const MAX_CHUNKS: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of at least `len` floats
/// (grown, never shrunk, so a thread allocates it once per size class).
/// `f` must not call into rayon (it would re-enter the borrow).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f64]) -> R) -> R {
    SCRATCH.with_borrow_mut(|v| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// A row-major view: `rows` rows of `cols` floats, `rs` apart.
fn view(s: &[f64], rows: usize, cols: usize, rs: usize) -> MatRef<'_, f64> {
    let len = if rows == 0 { 0 } else { (rows - 1) * rs + cols };
    MatRef::from_column_major_slice_with_stride(&s[..len], cols, rows, rs).transpose()
}

/// A mutable row-major view, built as the transpose of a column-major one:
/// faer 0.24.4's `from_row_major_slice_with_stride_mut` gives the matrix a
/// column-major layout (row stride 1, column stride `rs`), which writes
/// outside the rows it was given.
fn view_mut(s: &mut [f64], rows: usize, cols: usize, rs: usize) -> MatMut<'_, f64> {
    let len = if rows == 0 { 0 } else { (rows - 1) * rs + cols };
    MatMut::from_column_major_slice_with_stride_mut(&mut s[..len], cols, rows, rs).transpose_mut()
}

/// dst (+)= a · b, sequentially.
fn mm(dst: MatMut<'_, f64>, acc: Accum, a: MatRef<'_, f64>, b: MatRef<'_, f64>) {
    if dst.nrows() == 0 || dst.ncols() == 0 {
        return;
    }
    matmul(dst, acc, a, b, 1.0, Par::Seq);
}

/// The per-call constants of a convolution's GEMMs.
struct Conv {
    g: ConvGeom,
    rows: Vec<(usize, usize, isize)>,
    cols: Vec<(usize, usize, isize)>,
    /// Input and output plane sizes.
    ip: usize,
    op: usize,
    cig: usize,
    cog: usize,
    /// Rows of the im2col matrix: cin/groups · k · k.
    kk: usize,
    /// Output rows per im2col tile.
    per: usize,
    /// 1×1, stride 1, no padding: the input is its own im2col matrix.
    plain: bool,
    /// Stride 1 and output rows as wide as the input's ([`Conv::im2col_block`]).
    same: bool,
}

impl Conv {
    fn new(g: &ConvGeom) -> Conv {
        let (cig, cog) = (g.cin_g(), g.cout_g());
        let kk = cig * g.k * g.k;
        let per = (TILE_FLOATS / (kk * g.ow).max(1)).clamp(1, g.oh.max(1));
        Conv {
            g: *g,
            rows: g.row_table(),
            cols: g.col_table(),
            ip: g.h * g.w,
            op: g.oh * g.ow,
            cig,
            cog,
            kk,
            per,
            plain: g.k == 1 && g.stride == 1 && g.pad == 0 && g.oh == g.h && g.ow == g.w,
            same: g.stride == 1 && g.ow == g.w,
        }
    }

    /// Scratch floats of one tile.
    fn tile_floats(&self) -> usize {
        if self.plain {
            0
        } else {
            self.kk * self.per * self.g.ow
        }
    }

    /// The tiles of output rows: (first row, end row).
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.g.oh)
            .step_by(self.per)
            .map(|r0| (r0, (r0 + self.per).min(self.g.oh)))
    }

    /// Output columns of valid taps for kernel column kw, clamped to ow.
    fn col_span(&self, kw: usize) -> (usize, usize, isize) {
        let (c0, c1, off) = self.cols[kw];
        let c0 = c0.min(self.g.ow);
        (c0, c1.min(self.g.ow).max(c0), off)
    }

    /// col [kk, (r1 − r0)·ow] = the taps of output rows r0..r1 over the
    /// group's input channels `xg` [cig, h, w] (zeros where they fall in
    /// the padding).
    fn im2col(&self, xg: &[f64], r0: usize, r1: usize, col: &mut [f64]) {
        let g = &self.g;
        let t = (r1 - r0) * g.ow;
        for cl in 0..self.cig {
            let xp = &xg[cl * self.ip..(cl + 1) * self.ip];
            for kh in 0..g.k {
                let (lo, hi, roff) = self.rows[kh];
                for kw in 0..g.k {
                    let (c0, c1, coff) = self.col_span(kw);
                    let r = (cl * g.k + kh) * g.k + kw;
                    let dst = &mut col[r * t..(r + 1) * t];
                    if self.same {
                        self.im2col_block(xp, (r0, r1), self.rows[kh], (c0, c1, coff), dst);
                        continue;
                    }
                    for (o_r, drow) in (r0..r1).zip(dst.chunks_exact_mut(g.ow)) {
                        if o_r < lo || o_r >= hi {
                            drow.fill(0.0);
                            continue;
                        }
                        let ir = ((o_r * g.stride) as isize + roff) as usize;
                        let xrow = &xp[ir * g.w..(ir + 1) * g.w];
                        drow[..c0].fill(0.0);
                        drow[c1..].fill(0.0);
                        if c1 == c0 {
                        } else if g.stride == 1 {
                            let i0 = (c0 as isize + coff) as usize;
                            drow[c0..c1].copy_from_slice(&xrow[i0..i0 + (c1 - c0)]);
                        } else {
                            for (o_c, d) in drow.iter_mut().enumerate().take(c1).skip(c0) {
                                *d = xrow[((o_c * g.stride) as isize + coff) as usize];
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Conv::im2col`]: gxg [cig, h, w] += the taps of
    /// `col` scattered back to their inputs, in a fixed order.
    fn col2im(&self, col: &mut [f64], r0: usize, r1: usize, gxg: &mut [f64]) {
        let g = &self.g;
        let t = (r1 - r0) * g.ow;
        for cl in 0..self.cig {
            let xp = &mut gxg[cl * self.ip..(cl + 1) * self.ip];
            for kh in 0..g.k {
                let (lo, hi, roff) = self.rows[kh];
                for kw in 0..g.k {
                    let (c0, c1, coff) = self.col_span(kw);
                    let r = (cl * g.k + kh) * g.k + kw;
                    if self.same {
                        let src = &mut col[r * t..(r + 1) * t];
                        self.col2im_block(src, (r0, r1), self.rows[kh], (c0, c1, coff), xp);
                        continue;
                    }
                    let src = &col[r * t..(r + 1) * t];
                    for (o_r, srow) in (r0..r1).zip(src.chunks_exact(g.ow)) {
                        if o_r < lo || o_r >= hi {
                            continue;
                        }
                        let ir = ((o_r * g.stride) as isize + roff) as usize;
                        let xrow = &mut xp[ir * g.w..(ir + 1) * g.w];
                        if c1 == c0 {
                        } else if g.stride == 1 {
                            let i0 = (c0 as isize + coff) as usize;
                            let xs = &mut xrow[i0..i0 + (c1 - c0)];
                            xs.iter_mut().zip(&srow[c0..c1]).for_each(|(a, b)| *a += b);
                        } else {
                            for (o_c, s) in srow.iter().enumerate().take(c1).skip(c0) {
                                xrow[((o_c * g.stride) as isize + coff) as usize] += s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// One im2col row (one input channel and tap) of a stride-1
    /// convolution whose output rows are as wide as its input rows: the
    /// valid output rows `lo..hi` of the tile read one contiguous run of
    /// the input plane (rows advance by w on both sides), copied at once;
    /// the columns that fall in the padding (which the run fills with the
    /// neighbouring rows' ends) and the rows outside are then zeroed.
    /// Short rows (cnn-tiny's 8×8 planes) otherwise cost a copy call per
    /// row, the largest share of a small model's product.
    fn im2col_block(
        &self,
        xp: &[f64],
        (r0, r1): (usize, usize),
        (lo, hi, roff): (usize, usize, isize),
        (c0, c1, coff): (usize, usize, isize),
        dst: &mut [f64],
    ) {
        let ow = self.g.ow;
        let (a, b) = (lo.max(r0), hi.min(r1));
        if a >= b || c1 == c0 {
            dst.fill(0.0);
            return;
        }
        dst[..(a - r0) * ow].fill(0.0);
        dst[(b - r0) * ow..].fill(0.0);
        let d0 = (a - r0) * ow + c0;
        let len = (b - a - 1) * ow + (c1 - c0);
        let s0 = ((a as isize + roff) as usize) * self.g.w + (c0 as isize + coff) as usize;
        dst[d0..d0 + len].copy_from_slice(&xp[s0..s0 + len]);
        if c0 > 0 || c1 < ow {
            for row in dst[(a - r0) * ow..(b - r0) * ow].chunks_exact_mut(ow) {
                row[..c0].iter_mut().for_each(|v| *v = 0.0);
                row[c1..].iter_mut().for_each(|v| *v = 0.0);
            }
        }
    }

    /// The adjoint of [`Conv::im2col_block`]: the padding columns of `src`
    /// (this call consumes it) are zeroed, then the run is added onto the
    /// input plane at once (its wrapped-around elements add exact zeros).
    fn col2im_block(
        &self,
        src: &mut [f64],
        (r0, r1): (usize, usize),
        (lo, hi, roff): (usize, usize, isize),
        (c0, c1, coff): (usize, usize, isize),
        xp: &mut [f64],
    ) {
        let ow = self.g.ow;
        let (a, b) = (lo.max(r0), hi.min(r1));
        if a >= b || c1 == c0 {
            return;
        }
        if c0 > 0 || c1 < ow {
            for row in src[(a - r0) * ow..(b - r0) * ow].chunks_exact_mut(ow) {
                row[..c0].iter_mut().for_each(|v| *v = 0.0);
                row[c1..].iter_mut().for_each(|v| *v = 0.0);
            }
        }
        let d0 = (a - r0) * ow + c0;
        let len = (b - a - 1) * ow + (c1 - c0);
        let s0 = ((a as isize + roff) as usize) * self.g.w + (c0 as isize + coff) as usize;
        xp[s0..s0 + len]
            .iter_mut()
            .zip(&src[d0..d0 + len])
            .for_each(|(x, v)| *x += v);
    }

    /// Sample n's input channels of group gi.
    fn in_group<'a>(&self, x: &'a [f64], n: usize, gi: usize) -> &'a [f64] {
        let at = (n * self.g.cin + gi * self.cig) * self.ip;
        &x[at..at + self.cig * self.ip]
    }

    /// Sample n's output channels of group gi.
    fn out_group<'a>(&self, y: &'a [f64], n: usize, gi: usize) -> &'a [f64] {
        let at = (n * self.g.cout + gi * self.cog) * self.op;
        &y[at..at + self.cog * self.op]
    }

    /// Group gi's weights [cog, kk].
    fn weights<'a>(&self, w: &'a [f64], gi: usize) -> MatRef<'a, f64> {
        view(&w[gi * self.cog * self.kk..], self.cog, self.kk, self.kk)
    }
}

/// y += Σ conv(x, w) over `pairs` of (x [n, cin, h, w], w [cout, cin/groups,
/// k, k]); y [n, cout, oh, ow].
pub fn conv_forward_acc(g: &ConvGeom, pairs: &[(&[f64], &[f64])], y: &mut [f64]) {
    let c = Conv::new(g);
    if c.op == 0 || g.cout == 0 {
        return;
    }
    y.par_chunks_mut(g.cout * c.op)
        .take(g.n)
        .enumerate()
        .for_each(|(n, yn)| {
            with_scratch(c.tile_floats(), |col| {
                for gi in 0..g.groups {
                    let yg = &mut yn[gi * c.cog * c.op..(gi + 1) * c.cog * c.op];
                    for &(x, w) in pairs {
                        let (xg, wg) = (c.in_group(x, n, gi), c.weights(w, gi));
                        if c.plain {
                            let dst = view_mut(yg, c.cog, c.op, c.op);
                            mm(dst, Accum::Add, wg, view(xg, c.cig, c.op, c.op));
                            continue;
                        }
                        for (r0, r1) in c.tiles() {
                            let t = (r1 - r0) * g.ow;
                            let col = &mut col[..c.kk * t];
                            c.im2col(xg, r0, r1, col);
                            let dst = view_mut(&mut yg[r0 * g.ow..], c.cog, t, c.op);
                            mm(dst, Accum::Add, wg, view(col, c.kk, t, t));
                        }
                    }
                }
            })
        });
}

/// gx += Σ convᵀ(gy, w) over `pairs` of (gy [n, cout, oh, ow], w): the
/// data gradient, gx [n, cin, h, w].
pub fn conv_backward_data_acc(g: &ConvGeom, pairs: &[(&[f64], &[f64])], gx: &mut [f64]) {
    let c = Conv::new(g);
    if c.op == 0 || g.cin == 0 {
        return;
    }
    gx.par_chunks_mut(g.cin * c.ip)
        .take(g.n)
        .enumerate()
        .for_each(|(n, gxn)| {
            with_scratch(c.tile_floats(), |col| {
                for gi in 0..g.groups {
                    let gxg = &mut gxn[gi * c.cig * c.ip..(gi + 1) * c.cig * c.ip];
                    if c.plain {
                        for &(gy, w) in pairs {
                            let (gyg, wg) = (c.out_group(gy, n, gi), c.weights(w, gi));
                            let dst = view_mut(gxg, c.cig, c.ip, c.ip);
                            mm(
                                dst,
                                Accum::Add,
                                wg.transpose(),
                                view(gyg, c.cog, c.op, c.op),
                            );
                        }
                        continue;
                    }
                    for (r0, r1) in c.tiles() {
                        let t = (r1 - r0) * g.ow;
                        let col = &mut col[..c.kk * t];
                        for (j, &(gy, w)) in pairs.iter().enumerate() {
                            let (gyg, wg) = (c.out_group(gy, n, gi), c.weights(w, gi));
                            let src = view(&gyg[r0 * g.ow..], c.cog, t, c.op);
                            let acc = if j == 0 { Accum::Replace } else { Accum::Add };
                            mm(view_mut(col, c.kk, t, t), acc, wg.transpose(), src);
                        }
                        c.col2im(col, r0, r1, gxg);
                    }
                }
            })
        });
}

/// Samples per chunk of a weight gradient's partial sums: a function of
/// the batch alone, so that the sums do not depend on the thread count.
fn chunk_samples(n: usize) -> usize {
    n.div_ceil(MAX_CHUNKS).max(2)
}

/// gw += Σ over the batch and positions of gy ⊗ x, over `pairs` of (gy, x):
/// the weight gradient, gw [cout, cin/groups, k, k].
pub fn conv_backward_weight_acc(g: &ConvGeom, pairs: &[(&[f64], &[f64])], gw: &mut [f64]) {
    let c = Conv::new(g);
    let wl = g.cout * c.kk;
    if c.op == 0 || wl == 0 || g.n == 0 {
        return;
    }
    let per = chunk_samples(g.n);
    let starts: Vec<usize> = (0..g.n).step_by(per).collect();
    let parts: Vec<Vec<f64>> = starts
        .into_par_iter()
        .map(|s0| {
            let mut part = vec![0.0; wl];
            with_scratch(c.tile_floats(), |col| {
                for n in s0..(s0 + per).min(g.n) {
                    for gi in 0..g.groups {
                        let pg = &mut part[gi * c.cog * c.kk..(gi + 1) * c.cog * c.kk];
                        for &(gy, x) in pairs {
                            let (gyg, xg) = (c.out_group(gy, n, gi), c.in_group(x, n, gi));
                            if c.plain {
                                let dst = view_mut(pg, c.cog, c.kk, c.kk);
                                let src = view(gyg, c.cog, c.op, c.op);
                                mm(
                                    dst,
                                    Accum::Add,
                                    src,
                                    view(xg, c.cig, c.ip, c.ip).transpose(),
                                );
                                continue;
                            }
                            for (r0, r1) in c.tiles() {
                                let t = (r1 - r0) * g.ow;
                                let col = &mut col[..c.kk * t];
                                c.im2col(xg, r0, r1, col);
                                let dst = view_mut(pg, c.cog, c.kk, c.kk);
                                let src = view(&gyg[r0 * g.ow..], c.cog, t, c.op);
                                mm(dst, Accum::Add, src, view(col, c.kk, t, t).transpose());
                            }
                        }
                    }
                }
            });
            part
        })
        .collect();
    add_parts(gw, &parts);
}

/// gw += parts[0] + parts[1] + … in that order, element by element.
fn add_parts(gw: &mut [f64], parts: &[Vec<f64>]) {
    gw.par_chunks_mut(4096).enumerate().for_each(|(i, gc)| {
        for p in parts {
            let pc = &p[i * 4096..i * 4096 + gc.len()];
            gc.iter_mut().zip(pc).for_each(|(a, b)| *a += b);
        }
    });
}

/// A linear layer's weight as the [dout, din] matrix W: stored so
/// (nn.Linear's weight), or stored as its transpose [din, dout]
/// (`transposed`: Hugging Face's Conv1D).
fn weight(w: &[f64], din: usize, dout: usize, transposed: bool) -> MatRef<'_, f64> {
    if transposed {
        view(w, din, dout, dout).transpose()
    } else {
        view(w, dout, din, din)
    }
}

/// y [n, dout] += x [n, din] · Wᵀ (W as [`weight`] reads `w`).
pub fn linear_forward_acc(
    n: usize,
    din: usize,
    dout: usize,
    transposed: bool,
    x: &[f64],
    w: &[f64],
    y: &mut [f64],
) {
    if dout == 0 {
        return;
    }
    let wt = weight(w, din, dout, transposed).transpose();
    y[..n * dout]
        .par_chunks_mut(LINEAR_ROWS * dout)
        .enumerate()
        .for_each(|(b, yb)| {
            let rows = yb.len() / dout;
            let xb = &x[b * LINEAR_ROWS * din..];
            mm(
                view_mut(yb, rows, dout, dout),
                Accum::Add,
                view(xb, rows, din, din),
                wt,
            );
        });
}

/// gx [n, din] += gy [n, dout] · W.
pub fn linear_backward_data_acc(
    n: usize,
    din: usize,
    dout: usize,
    transposed: bool,
    gy: &[f64],
    w: &[f64],
    gx: &mut [f64],
) {
    if din == 0 {
        return;
    }
    let wm = weight(w, din, dout, transposed);
    gx[..n * din]
        .par_chunks_mut(LINEAR_ROWS * din)
        .enumerate()
        .for_each(|(b, gxb)| {
            let rows = gxb.len() / din;
            let gyb = &gy[b * LINEAR_ROWS * dout..];
            mm(
                view_mut(gxb, rows, din, din),
                Accum::Add,
                view(gyb, rows, dout, dout),
                wm,
            );
        });
}

/// The weight gradient gyᵀ · x, accumulated into `gw` in the weight's
/// stored layout ([dout, din], or [din, dout] when `transposed`: there
/// gw += xᵀ · gy), in blocks of stored rows, each summing over the whole
/// batch.
pub fn linear_backward_weight_acc(
    n: usize,
    din: usize,
    dout: usize,
    transposed: bool,
    gy: &[f64],
    x: &[f64],
    gw: &mut [f64],
) {
    if din == 0 || dout == 0 || n == 0 {
        return;
    }
    // Stored rows (dout, or din when transposed) of `cols` floats: the
    // block's rows select columns of `a`, summed against all of `b`.
    let (cols, a, a_cols, b) = if transposed {
        (dout, x, din, view(gy, n, dout, dout))
    } else {
        (din, gy, dout, view(x, n, din, din))
    };
    gw[..din * dout]
        .par_chunks_mut(LINEAR_ROWS * cols)
        .enumerate()
        .for_each(|(blk, gwb)| {
            let rows = gwb.len() / cols;
            let ab = view(&a[blk * LINEAR_ROWS..], n, rows, a_cols).transpose();
            mm(view_mut(gwb, rows, cols, cols), Accum::Add, ab, b);
        });
}

/// Dense row-major products for attention's per-(sample, head) matrices,
/// each one sequential faer GEMM (callers parallelise over independent
/// (sample, head) pairs, so results do not depend on the thread count).
pub mod dense {
    use super::{mm, view, view_mut};
    use faer::Accum;

    /// out [m, n] += a [m, k] · b [k, n].
    pub fn mm_acc(m: usize, k: usize, n: usize, a: &[f64], b: &[f64], out: &mut [f64]) {
        mm(
            view_mut(out, m, n, n),
            Accum::Add,
            view(a, m, k, k),
            view(b, k, n, n),
        );
    }

    /// out [m, n] += aᵀ · b with a [k, m], b [k, n].
    pub fn mtm_acc(m: usize, k: usize, n: usize, a: &[f64], b: &[f64], out: &mut [f64]) {
        mm(
            view_mut(out, m, n, n),
            Accum::Add,
            view(a, k, m, m).transpose(),
            view(b, k, n, n),
        );
    }

    /// a [m, k] · bᵀ with b [n, k] -> [m, n].
    pub fn mmt(m: usize, k: usize, n: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        mm(
            view_mut(&mut out, m, n, n),
            Accum::Replace,
            view(a, m, k, k),
            view(b, n, k, k).transpose(),
        );
        out
    }
}

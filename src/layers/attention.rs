//! Multi-head softmax attention (`Op::Mha`), parameter-free, in float64.
//!
//! Per sample and head h (width e = D/H, c = 1/√e), with q, k, v the
//! head's [T, e] slices: S = c·q·kᵀ (entries j > i masked to −∞ when
//! causal), P = softmax over each row of S, O = P·v; the heads' O side by
//! side make the output [T, D]. The input is q | k | v along the features
//! ([T, 3D], GPT-2's c_attn and nn.MultiheadAttention's in_proj output) or
//! three inputs [T, D].
//!
//! - R-forward: Ṡ = c·(q̇kᵀ + qk̇ᵀ), Ṗ = P⊙(Ṡ − rowsum(P⊙Ṡ)),
//!   Ȯ = Ṗv + Pv̇.
//! - backward: gP = gO·vᵀ, gv = Pᵀ·gO, gS = P⊙(gP − rowsum(P⊙gP)),
//!   gq = c·gS·k, gk = c·gSᵀ·q.
//! - R-backward: R(gP) = R(gO)·vᵀ + gO·v̇ᵀ, R(gv) = Ṗᵀ·gO + Pᵀ·R(gO),
//!   R(gS) = Ṗ⊙(gP − rowsum(P⊙gP)) + P⊙(R(gP) − rowsum(Ṗ⊙gP + P⊙R(gP))),
//!   R(gq) = c·(R(gS)·k + gS·k̇), R(gk) = c·(R(gS)ᵀ·q + gSᵀ·q̇): the
//!   softmax's and the products' second-order terms.
//!
//! Masked entries have P = Ṗ = 0 exactly, so every term above vanishes
//! there; the loops visit j ≤ i only when causal.

mod gpu;

use super::{saved, CpuCx, Layer, Saved, StateBuf, StateCx};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::model::{Node, Op};
use rayon::prelude::*;

pub struct MhaUnit;

/// Geometry of a node: tokens, width D, heads, head width, causal, fused.
#[derive(Clone, Copy)]
struct Geo {
    t: usize,
    d: usize,
    heads: usize,
    e: usize,
    causal: bool,
    fused: bool,
}

fn geo(node: &Node) -> Geo {
    let Op::Mha { heads, causal } = node.op else {
        unreachable!("mha unit on {}", node.kind())
    };
    let (t, d) = (node.out_shape.tokens(), node.out_shape.features());
    Geo {
        t,
        d,
        heads,
        e: d / heads,
        causal,
        fused: node.inputs.len() == 1,
    }
}

impl Geo {
    /// Row stride of q/k/v in their buffer and the column of (which, head).
    fn layout(&self, which: usize, h: usize) -> (usize, usize, usize) {
        if self.fused {
            (0, 3 * self.d, which * self.d + h * self.e)
        } else {
            (which, self.d, h * self.e)
        }
    }
    /// The [T, e] slice `which` (0 q, 1 k, 2 v) of head h of sample n.
    fn get(&self, xs: &[&[f64]], which: usize, n: usize, h: usize) -> Vec<f64> {
        let (buf, stride, col) = self.layout(which, h);
        let base = n * self.t * stride;
        let x = xs[buf];
        let mut out = Vec::with_capacity(self.t * self.e);
        for i in 0..self.t {
            let o = base + i * stride + col;
            out.extend_from_slice(&x[o..o + self.e]);
        }
        out
    }
    /// Adds the [T, e] slice into the adjoint buffers.
    fn put(&self, gxs: &mut [Vec<f64>], which: usize, n: usize, h: usize, g: &[f64]) {
        let (buf, stride, col) = self.layout(which, h);
        let base = n * self.t * stride;
        let x = &mut gxs[buf];
        for i in 0..self.t {
            let o = base + i * stride + col;
            x[o..o + self.e]
                .iter_mut()
                .zip(&g[i * self.e..(i + 1) * self.e])
                .for_each(|(a, b)| *a += b);
        }
    }
    /// Writes head h's [T, e] output into the [T, D] output of sample n.
    fn put_out(&self, y: &mut [f64], n: usize, h: usize, o: &[f64]) {
        for i in 0..self.t {
            let at = (n * self.t + i) * self.d + h * self.e;
            y[at..at + self.e].copy_from_slice(&o[i * self.e..(i + 1) * self.e]);
        }
    }
    /// Head h's [T, e] slice of an output-shaped buffer.
    fn get_out(&self, y: &[f64], n: usize, h: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.t * self.e);
        for i in 0..self.t {
            let at = (n * self.t + i) * self.d + h * self.e;
            out.extend_from_slice(&y[at..at + self.e]);
        }
        out
    }
    /// Columns j of row i that attend.
    fn cols(&self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.t
        }
    }
    fn scale(&self) -> f64 {
        1.0 / (self.e as f64).sqrt()
    }
    /// c·a·bᵀ over the attending entries ([T, T], zero elsewhere): one
    /// GEMM for all entries, the masked ones zeroed after.
    fn scores(&self, a: &[f64], b: &[f64]) -> Vec<f64> {
        let (t, e, c) = (self.t, self.e, self.scale());
        let mut s = mmt(t, e, a, b);
        for i in 0..t {
            let n = self.cols(i);
            let row = &mut s[i * t..(i + 1) * t];
            row[..n].iter_mut().for_each(|x| *x *= c);
            row[n..].iter_mut().for_each(|x| *x = 0.0);
        }
        s
    }
    /// Row-wise softmax of the attending entries.
    fn softmax(&self, s: &[f64]) -> Vec<f64> {
        let t = self.t;
        let mut p = vec![0.0; t * t];
        for i in 0..t {
            let n = self.cols(i);
            let row = &s[i * t..i * t + n];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut z = 0.0;
            for j in 0..n {
                let ex = (row[j] - m).exp();
                p[i * t + j] = ex;
                z += ex;
            }
            for j in 0..n {
                p[i * t + j] /= z;
            }
        }
        p
    }
    /// P⊙(G − rowsum(P⊙G)): the softmax's Jacobian (transposed: it is
    /// symmetric) applied to G, row by row.
    fn softmax_jac(&self, p: &[f64], g: &[f64]) -> Vec<f64> {
        let t = self.t;
        let mut out = vec![0.0; t * t];
        for i in 0..t {
            let n = self.cols(i);
            let r = i * t;
            let dot: f64 = (0..n).map(|j| p[r + j] * g[r + j]).sum();
            for j in 0..n {
                out[r + j] = p[r + j] * (g[r + j] - dot);
            }
        }
        out
    }
}

/// a [T, T] · b [T, e], accumulated into out [T, e] (one sequential faer
/// GEMM: the caller's parallelism is over (sample, head) pairs, so the
/// result does not depend on the thread count).
fn mm_acc(t: usize, e: usize, a: &[f64], b: &[f64], out: &mut [f64]) {
    crate::ops::gemm::dense::mm_acc(t, t, e, a, b, out);
}

/// aᵀ [T, T] · b [T, e], accumulated into out [T, e].
fn mtm_acc(t: usize, e: usize, a: &[f64], b: &[f64], out: &mut [f64]) {
    crate::ops::gemm::dense::mtm_acc(t, t, e, a, b, out);
}

/// a [T, e] · bᵀ ([T, e]) -> [T, T] (all entries).
fn mmt(t: usize, e: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
    crate::ops::gemm::dense::mmt(t, e, t, a, b)
}

/// The attention probabilities of every (sample, head), [T, T] each.
struct Probs(Vec<Vec<f64>>);

impl MhaUnit {
    /// Ṗ of sample n, head h.
    fn p_dot(g: &Geo, p: &[f64], q: &[f64], k: &[f64], dq: &[f64], dk: &[f64]) -> Vec<f64> {
        let mut ds = g.scores(dq, k);
        let s2 = g.scores(q, dk);
        ds.iter_mut().zip(&s2).for_each(|(a, b)| *a += b);
        g.softmax_jac(p, &ds)
    }
}

/// f(sample, head) for every pair, in parallel, in order.
fn per_head<T: Send>(g: &Geo, n: usize, f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    (0..n * g.heads)
        .into_par_iter()
        .map(|sh| f(sh / g.heads, sh % g.heads))
        .collect()
}

impl Layer for MhaUnit {
    fn forward(&self, _cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let g = geo(node);
        let n = xs[0].len() / (g.t * if g.fused { 3 * g.d } else { g.d });
        let per = per_head(&g, n, |s, h| {
            let (q, k, v) = (g.get(xs, 0, s, h), g.get(xs, 1, s, h), g.get(xs, 2, s, h));
            let p = g.softmax(&g.scores(&q, &k));
            let mut o = vec![0.0; g.t * g.e];
            mm_acc(g.t, g.e, &p, &v, &mut o);
            (o, p)
        });
        let mut y = vec![0.0; n * g.t * g.d];
        let mut probs = Vec::with_capacity(n * g.heads);
        for (sh, (o, p)) in per.into_iter().enumerate() {
            g.put_out(&mut y, sh / g.heads, sh % g.heads, &o);
            probs.push(p);
        }
        (y, Box::new(Probs(probs)))
    }
    fn r_forward(
        &self,
        _cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        saved_: &mut Saved,
    ) -> Vec<f64> {
        let g = geo(node);
        let probs: &Probs = saved(saved_, node);
        let n = probs.0.len() / g.heads;
        let per = per_head(&g, n, |s, h| {
            let p = &probs.0[s * g.heads + h];
            let (q, k, v) = (g.get(xs, 0, s, h), g.get(xs, 1, s, h), g.get(xs, 2, s, h));
            let (dq, dk, dv) = (
                g.get(dxs, 0, s, h),
                g.get(dxs, 1, s, h),
                g.get(dxs, 2, s, h),
            );
            let dp = Self::p_dot(&g, p, &q, &k, &dq, &dk);
            let mut o = vec![0.0; g.t * g.e];
            mm_acc(g.t, g.e, &dp, &v, &mut o);
            mm_acc(g.t, g.e, p, &dv, &mut o);
            o
        });
        let mut dy = vec![0.0; n * g.t * g.d];
        for (sh, o) in per.iter().enumerate() {
            g.put_out(&mut dy, sh / g.heads, sh % g.heads, o);
        }
        dy
    }
    fn backward(
        &self,
        _cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        saved_: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let g = geo(node);
        let probs: &Probs = saved(saved_, node);
        let n = probs.0.len() / g.heads;
        let c = g.scale();
        let per = per_head(&g, n, |s, h| {
            let p = &probs.0[s * g.heads + h];
            let (q, k, v) = (g.get(xs, 0, s, h), g.get(xs, 1, s, h), g.get(xs, 2, s, h));
            let go = g.get_out(gy, s, h);
            let gp = mmt(g.t, g.e, &go, &v);
            let mut gv = vec![0.0; g.t * g.e];
            mtm_acc(g.t, g.e, p, &go, &mut gv);
            let mut gs = g.softmax_jac(p, &gp);
            gs.iter_mut().for_each(|a| *a *= c);
            let (mut gq, mut gk) = (vec![0.0; g.t * g.e], vec![0.0; g.t * g.e]);
            mm_acc(g.t, g.e, &gs, &k, &mut gq);
            mtm_acc(g.t, g.e, &gs, &q, &mut gk);
            [gq, gk, gv]
        });
        let mut gxs: Vec<Vec<f64>> = xs.iter().map(|x| vec![0.0; x.len()]).collect();
        for (sh, parts) in per.iter().enumerate() {
            for (which, part) in parts.iter().enumerate() {
                g.put(&mut gxs, which, sh / g.heads, sh % g.heads, part);
            }
        }
        gxs
    }
    fn r_backward(
        &self,
        _cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        saved_: &Saved,
        gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        _hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let g = geo(node);
        let probs: &Probs = saved(saved_, node);
        let n = probs.0.len() / g.heads;
        let (t, e, c) = (g.t, g.e, g.scale());
        let per = per_head(&g, n, |s, h| {
            let p = &probs.0[s * g.heads + h];
            let (q, k, v) = (g.get(xs, 0, s, h), g.get(xs, 1, s, h), g.get(xs, 2, s, h));
            let (dq, dk, dv) = (
                g.get(dxs, 0, s, h),
                g.get(dxs, 1, s, h),
                g.get(dxs, 2, s, h),
            );
            let dp = Self::p_dot(&g, p, &q, &k, &dq, &dk);
            let (go, rgo) = (g.get_out(gy, s, h), g.get_out(rgy, s, h));
            let gp = mmt(t, e, &go, &v);
            let mut rgp = mmt(t, e, &rgo, &v);
            let gp2 = mmt(t, e, &go, &dv);
            rgp.iter_mut().zip(&gp2).for_each(|(a, b)| *a += b);
            // R(gv) = Ṗᵀ·gO + Pᵀ·R(gO).
            let mut rgv = vec![0.0; t * e];
            mtm_acc(t, e, &dp, &go, &mut rgv);
            mtm_acc(t, e, p, &rgo, &mut rgv);
            // gS and R(gS) (times c below).
            let gs = g.softmax_jac(p, &gp);
            let mut rgs = vec![0.0; t * t];
            for i in 0..t {
                let r = i * t;
                let m = g.cols(i);
                let dot: f64 = (0..m).map(|j| p[r + j] * gp[r + j]).sum();
                let rdot: f64 = (0..m)
                    .map(|j| dp[r + j] * gp[r + j] + p[r + j] * rgp[r + j])
                    .sum();
                for j in 0..m {
                    rgs[r + j] = dp[r + j] * (gp[r + j] - dot) + p[r + j] * (rgp[r + j] - rdot);
                }
            }
            let (mut rgq, mut rgk) = (vec![0.0; t * e], vec![0.0; t * e]);
            mm_acc(t, e, &rgs, &k, &mut rgq);
            mm_acc(t, e, &gs, &dk, &mut rgq);
            mtm_acc(t, e, &rgs, &q, &mut rgk);
            mtm_acc(t, e, &gs, &dq, &mut rgk);
            rgq.iter_mut().chain(rgk.iter_mut()).for_each(|a| *a *= c);
            [rgq, rgk, rgv]
        });
        let mut out: Vec<Vec<f64>> = xs.iter().map(|x| vec![0.0; x.len()]).collect();
        for (sh, parts) in per.iter().enumerate() {
            for (which, part) in parts.iter().enumerate() {
                g.put(&mut out, which, sh / g.heads, sh % g.heads, part);
            }
        }
        out
    }
    // ---- GPU plan: attention/gpu.rs
    fn check(&self, node: &Node) -> crate::error::Result<()> {
        gpu::check(node)
    }
    fn gpu_state(&self, node: &Node, n: usize, _cx: &StateCx) -> Vec<StateBuf> {
        gpu::state(node, n)
    }
    fn gpu_scratch(&self, node: &Node, n: usize) -> usize {
        gpu::scratch(node, n)
    }
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        gpu::forward(p, node, io)
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        gpu::r_forward(p, node, io)
    }
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        gpu::backward(p, node, io, r)
    }
}

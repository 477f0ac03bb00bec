//! nn.LayerNorm over the last dimension of a sequence, in float64.
//!
//! Per token (a row x of D features): μ = mean(x), σ² = mean((x − μ)²),
//! s = 1/√(σ² + ε), x̂ = (x − μ)·s, y = γ⊙x̂ + β. With ⟨a⟩ the mean over
//! the row:
//! - R-forward: ẋ̂ = s·(ẋ − ⟨ẋ⟩ − x̂·⟨x̂ẋ⟩), ẏ = γ⊙ẋ̂ + v_γ⊙x̂ + v_β;
//! - backward: g = γ⊙gy, gx = s·(g − ⟨g⟩ − x̂·⟨g x̂⟩), ∂γ = Σ gy⊙x̂,
//!   ∂β = Σ gy;
//! - R-backward: ṡ = −s·⟨x̂ẋ⟩ (R(σ²) = 2⟨(x − μ)ẋ⟩), R(g) = v_γ⊙gy +
//!   γ⊙R(gy), and R(gx) = (ṡ/s)·gx + s·(R(g) − ⟨R(g)⟩ − ẋ̂·⟨g x̂⟩ −
//!   x̂·⟨R(g)x̂ + g ẋ̂⟩): the terms in ṡ and ẋ̂ are the normalisation's own
//!   curvature. Hv: γ gains Σ R(gy)⊙x̂ + gy⊙ẋ̂, β Σ R(gy).
//!
//! GPU: shaders/layernorm.wgsl, a workgroup per row for the row passes and
//! a thread per feature for γ's and β's sums over the rows (no atomics).
//! State: x̂ then the rows' s; ẋ̂ then the rows' ⟨x̂ẋ⟩ (per tangent).

use super::{saved, CpuCx, Layer, Saved, StateBuf, StateCx};
use crate::dispatch::kernels::{Consts, Kernel, LnParams};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::model::{Node, Op};

pub struct LayerNormUnit;

/// x̂ and s of every row.
struct Norm {
    xhat: Vec<f64>,
    s: Vec<f64>,
}

fn of(node: &Node) -> (usize, usize, usize, f64) {
    match node.op {
        Op::LayerNorm {
            weight,
            bias,
            dim,
            eps,
        } => (weight, bias, dim, eps),
        _ => unreachable!("layernorm unit on {}", node.kind()),
    }
}

fn mean(a: &[f64]) -> f64 {
    a.iter().sum::<f64>() / a.len() as f64
}

fn mean_prod(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / a.len() as f64
}

/// ẋ̂ of every row.
fn xhat_dot(n: &Norm, dx: &[f64], d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(dx.len());
    for ((xh, dr), &s) in n.xhat.chunks(d).zip(dx.chunks(d)).zip(&n.s) {
        let m = mean(dr);
        let c = mean_prod(xh, dr);
        out.extend(xh.iter().zip(dr).map(|(h, e)| s * (e - m - h * c)));
    }
    out
}

impl Layer for LayerNormUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let (w, b, d, eps) = of(node);
        let (gamma, beta) = (cx.param(cx.theta, w), cx.param(cx.theta, b));
        let x = xs[0];
        let mut xhat = Vec::with_capacity(x.len());
        let mut ss = Vec::with_capacity(x.len() / d);
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let mu = mean(row);
            let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / d as f64;
            let s = 1.0 / (var + eps).sqrt();
            ss.push(s);
            for (j, v) in row.iter().enumerate() {
                let h = (v - mu) * s;
                xhat.push(h);
                y.push(gamma[j] * h + beta[j]);
            }
        }
        (y, Box::new(Norm { xhat, s: ss }))
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        v: &[f64],
        saved_: &mut Saved,
    ) -> Vec<f64> {
        let (w, b, d, _) = of(node);
        let n: &Norm = saved(saved_, node);
        let gamma = cx.param(cx.theta, w);
        let (vg, vb) = (cx.param(v, w), cx.param(v, b));
        let dh = xhat_dot(n, dxs[0], d);
        dh.iter()
            .zip(&n.xhat)
            .enumerate()
            .map(|(i, (e, h))| {
                let j = i % d;
                gamma[j] * e + vg[j] * h + vb[j]
            })
            .collect()
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        saved_: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let (w, b, d, _) = of(node);
        let n: &Norm = saved(saved_, node);
        {
            let gg = cx.param_mut(grad, w);
            for (gr, hr) in gy.chunks(d).zip(n.xhat.chunks(d)) {
                for j in 0..d {
                    gg[j] += gr[j] * hr[j];
                }
            }
        }
        {
            let gb = cx.param_mut(grad, b);
            for gr in gy.chunks(d) {
                gb.iter_mut().zip(gr).for_each(|(a, q)| *a += q);
            }
        }
        let gamma = cx.param(cx.theta, w);
        let mut gx = Vec::with_capacity(gy.len());
        let mut g = vec![0.0; d];
        for ((gr, hr), &s) in gy.chunks(d).zip(n.xhat.chunks(d)).zip(&n.s) {
            for j in 0..d {
                g[j] = gamma[j] * gr[j];
            }
            let (m, c) = (mean(&g), mean_prod(&g, hr));
            gx.extend((0..d).map(|j| s * (g[j] - m - hr[j] * c)));
        }
        vec![gx]
    }
    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        saved_: &Saved,
        gy: &[f64],
        rgy: &[f64],
        v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let (w, b, d, _) = of(node);
        let n: &Norm = saved(saved_, node);
        let dh = xhat_dot(n, dxs[0], d);
        {
            let hg = cx.param_mut(hv, w);
            for ((rr, gr), (hr, er)) in rgy
                .chunks(d)
                .zip(gy.chunks(d))
                .zip(n.xhat.chunks(d).zip(dh.chunks(d)))
            {
                for j in 0..d {
                    hg[j] += rr[j] * hr[j] + gr[j] * er[j];
                }
            }
        }
        {
            let hb = cx.param_mut(hv, b);
            for rr in rgy.chunks(d) {
                hb.iter_mut().zip(rr).for_each(|(a, q)| *a += q);
            }
        }
        let (gamma, vg) = (cx.param(cx.theta, w), cx.param(v, w));
        let mut out = Vec::with_capacity(gy.len());
        let (mut g, mut rg) = (vec![0.0; d], vec![0.0; d]);
        let rows = gy
            .chunks(d)
            .zip(rgy.chunks(d))
            .zip(n.xhat.chunks(d).zip(dh.chunks(d)))
            .zip(dxs[0].chunks(d).zip(&n.s));
        for (((gr, rr), (hr, er)), (dr, &s)) in rows {
            for j in 0..d {
                g[j] = gamma[j] * gr[j];
                rg[j] = vg[j] * gr[j] + gamma[j] * rr[j];
            }
            let (m, c) = (mean(&g), mean_prod(&g, hr));
            let (rm, rc) = (mean(&rg), mean_prod(&rg, hr) + mean_prod(&g, er));
            // ṡ/s = −s·⟨x̂ẋ⟩.
            let ds_s = -s * mean_prod(hr, dr);
            out.extend((0..d).map(|j| {
                let gx = s * (g[j] - m - hr[j] * c);
                ds_s * gx + s * (rg[j] - rm - er[j] * c - hr[j] * rc)
            }));
        }
        vec![out]
    }
    /// x̂ and the rows' s; ẋ̂ and the rows' ⟨x̂ẋ⟩, per tangent.
    fn gpu_state(&self, node: &Node, n: usize, _cx: &StateCx) -> Vec<StateBuf> {
        let (_, _, d, _) = of(node);
        let len = n * node.in_shape.numel();
        let rows = len / d;
        vec![
            StateBuf {
                name: "x̂ and s",
                len: len + rows,
                init: None,
                tangent: false,
            },
            StateBuf {
                name: "R(x̂) and ⟨x̂ẋ⟩",
                len: len + rows,
                init: None,
                tangent: true,
            },
        ]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let lp = ln_params(p, node);
        p.push(
            Kernel::LnForward,
            &lp,
            vec![io.x[0], p.theta, io.state[0], io.y],
            Grid::Groups(lp.rows as usize),
        );
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let lp = ln_params(p, node);
        // A zero ẋ is read as the zero buffer it is (`NodeBufs::dx`).
        p.push(
            Kernel::LnRForward,
            &lp,
            vec![io.dx[0], io.state[0], p.theta, p.v, io.state[1], io.dy],
            Grid::Groups(lp.rows as usize),
        );
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let lp = ln_params(p, node);
        let (xhat, xhd) = (io.state[0], io.state[1]);
        let target = p.target(r);
        let (c, cd) = if r { (io.g, xhd) } else { (p.dummy, p.dummy) };
        p.push_with(
            Kernel::LnParamSums,
            Consts::new(&[("PAIR2", r as u32)]),
            &lp,
            vec![io.gy, xhat, c, cd, target],
            Grid::Threads(lp.d as usize),
        );
        if !io.needs_gx[0] {
            return;
        }
        let consts = Consts::new(&[("ACC", io.acc[0] as u32)]);
        let grid = Grid::Groups(lp.rows as usize);
        if r {
            p.push_with(
                Kernel::LnRBackward,
                consts,
                &lp,
                vec![io.g, io.gy, xhat, xhd, p.theta, p.v, io.gx[0]],
                grid,
            );
        } else {
            p.push_with(
                Kernel::LnBackward,
                consts,
                &lp,
                vec![io.gy, xhat, p.theta, io.gx[0]],
                grid,
            );
        }
    }
}

/// The kernels' parameters for this batch: rows = samples · tokens.
fn ln_params(p: &Plan, node: &Node) -> LnParams {
    let (w, b, d, eps) = of(node);
    LnParams {
        rows: (p.n * node.in_shape.numel() / d) as u32,
        d: d as u32,
        gamma_off: p.param_off(w) as u32,
        beta_off: p.param_off(b) as u32,
        eps: eps as f32,
        ..Default::default()
    }
}

//! The product y = x·s of two activations (squeeze-and-excitation): s of
//! x's shape, or s [c, 1, 1] broadcast over x's h·w. It is bilinear:
//! - R-forward: ẏ = ẋ·s + x·ṡ;
//! - backward: gx = gy·s, gs = gy·x (summed over h·w when broadcast);
//! - R-backward: R(gx) = R(gy)·s + gy·ṡ, R(gs) = R(gy)·x + gy·ẋ (summed
//!   likewise).
//!
//! A term whose tangent is identically zero (`dx_zero`) is skipped.
//! Kernels: shaders/channels.wgsl (`mul`, `plane_dot`).

use super::{unsupported, CpuCx, Layer, Saved};
use crate::dispatch::kernels::{ChannelParams, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::model::{Model, Node};
use crate::ops::channels as ch;

pub struct MulUnit;

/// Elements of x per element of s: h·w when s is [c, 1, 1] broadcast,
/// else 1.
fn per(model: &Model, node: &Node) -> usize {
    let s = model.value_shape(node.inputs[1]);
    if s == node.in_shape {
        1
    } else {
        node.in_shape.spatial()
    }
}

/// Refuses a product whose factor is neither of x's shape nor [c, 1, 1].
pub fn check_mul(model: &Model, node: &Node) -> Result<()> {
    if node.inputs.len() != 2 {
        return Err(unsupported(
            node,
            format!("mul takes two inputs (x, s), got {}", node.inputs.len()),
        ));
    }
    let (x, s) = (node.in_shape, model.value_shape(node.inputs[1]));
    let fits = s == x || (s.c == x.c && s.h == 1 && s.w == 1);
    if !fits || node.out_shape != x {
        return Err(unsupported(
            node,
            format!(
                "mul of x {x} by s {s} into {}: s must have x's shape or [{}, 1, 1], the output x's",
                node.out_shape, x.c
            ),
        ));
    }
    Ok(())
}

/// Pushes out (+)= a·b (+ c·d), b and d one per `hw` elements of a, c.
fn plan_mul(
    p: &mut Plan,
    len: usize,
    hw: usize,
    (a, b): (usize, usize),
    cd: Option<(usize, usize)>,
    out: usize,
    acc: bool,
) {
    let (c, d) = cd.unwrap_or((p.dummy, p.dummy));
    p.push_with(
        Kernel::Mul,
        Consts::new(&[("PAIR_B", cd.is_some() as u32), ("ACC", acc as u32)]),
        &ChannelParams {
            len: len as u32,
            hw: hw as u32,
            ..Default::default()
        },
        vec![a, b, c, d, out],
        Grid::Threads(len),
    );
}

/// Pushes out[pl] (+)= Σ a·b (+ c·d) over each of `planes` planes of `hw`
/// (a workgroup per plane).
fn plan_plane_dot(
    p: &mut Plan,
    planes: usize,
    hw: usize,
    (a, b): (usize, usize),
    cd: Option<(usize, usize)>,
    out: usize,
    acc: bool,
) {
    let (c, d) = cd.unwrap_or((p.dummy, p.dummy));
    p.push_with(
        Kernel::PlaneDot,
        Consts::new(&[("PAIR_B", cd.is_some() as u32), ("ACC", acc as u32)]),
        &ChannelParams {
            blocks: planes as u32,
            hw: hw as u32,
            ..Default::default()
        },
        vec![a, b, c, d, out],
        Grid::Groups(planes),
    );
}

/// The adjoint of s: gy·x per element, or summed per plane.
fn s_adjoint(gy: &[f64], x: &[f64], hw: usize) -> Vec<f64> {
    if hw == 1 {
        ch::mul(gy, x, 1)
    } else {
        ch::plane_dot(gy, x, hw)
    }
}

impl Layer for MulUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        (ch::mul(xs[0], xs[1], per(cx.model, node)), Box::new(()))
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        let hw = per(cx.model, node);
        super::add_vecs(&ch::mul(dxs[0], xs[1], hw), &ch::mul(xs[0], dxs[1], hw))
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let hw = per(cx.model, node);
        vec![ch::mul(gy, xs[1], hw), s_adjoint(gy, xs[0], hw)]
    }
    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        _hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let hw = per(cx.model, node);
        let rgx = super::add_vecs(&ch::mul(rgy, xs[1], hw), &ch::mul(gy, dxs[1], hw));
        let rgs = super::add_vecs(&s_adjoint(rgy, xs[0], hw), &s_adjoint(gy, dxs[0], hw));
        vec![rgx, rgs]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let len = p.n * node.out_shape.numel();
        let hw = per(p.model, node);
        plan_mul(p, len, hw, (io.x[0], io.x[1]), None, io.y, false);
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let len = p.n * node.out_shape.numel();
        let hw = per(p.model, node);
        let terms: Vec<(usize, usize)> = [
            (!io.dx_zero[0]).then_some((io.dx[0], io.x[1])),
            (!io.dx_zero[1]).then_some((io.x[0], io.dx[1])),
        ]
        .into_iter()
        .flatten()
        .collect();
        match terms[..] {
            [] => return true,
            [ab] => plan_mul(p, len, hw, ab, None, io.dy, false),
            [ab, cd] => plan_mul(p, len, hw, ab, Some(cd), io.dy, false),
            _ => unreachable!(),
        }
        false
    }

    /// gx = gy·s and gs = gy·x; in the R-pass (gy: R(gy), g: the plain
    /// adjoint) R(gx) = R(gy)·s + g·ṡ and R(gs) = R(gy)·x + g·ẋ.
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let len = p.n * node.out_shape.numel();
        let hw = per(p.model, node);
        if io.needs_gx[0] {
            let second = (r && !io.dx_zero[1]).then_some((io.g, io.dx[1]));
            plan_mul(p, len, hw, (io.gy, io.x[1]), second, io.gx[0], io.acc[0]);
        }
        if io.needs_gx[1] {
            let second = (r && !io.dx_zero[0]).then_some((io.g, io.dx[0]));
            if hw == 1 {
                plan_mul(p, len, 1, (io.gy, io.x[0]), second, io.gx[1], io.acc[1]);
            } else {
                let planes = p.n * node.in_shape.c;
                plan_plane_dot(p, planes, hw, (io.gy, io.x[0]), second, io.gx[1], io.acc[1]);
            }
        }
    }
}

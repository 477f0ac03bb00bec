//! ConvNeXt's layer scale: y = x·γ of an image x [C, H, W] and a raw
//! parameter γ [C, 1, 1] broadcast over the batch and H, W
//! (`Op::MulParam`, `.arch` `mul_param [NAME] PARAM`). It is bilinear in
//! (x, γ):
//! - R-forward: ẏ = ẋ·γ + x·v_γ;
//! - backward: gx = gy·γ, ∂L/∂γ_c = Σ over samples and H, W of gy·x;
//! - R-backward: R(gx) = R(gy)·γ + gy·v_γ, and γ's block of Hv
//!   Σ (R(gy)·x + gy·ẋ) per channel: the second-order term gy·ẋ couples
//!   γ with every parameter before it, and gy·v_γ couples them back.
//!
//! Kernels: shaders/channels.wgsl (`mul` with `B_PARAM`: the factor read
//! from θ or v at the parameter's offset; `channel_dot`: a workgroup per
//! channel summing over the batch's planes into the gradient or Hv).

use super::{unsupported, CpuCx, Layer, Saved};
use crate::dispatch::kernels::{ChannelParams, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::model::{Node, Op};
use crate::ops::channels as ch;

pub struct MulParamUnit;

fn param(node: &Node) -> usize {
    match node.op {
        Op::MulParam { param } => param,
        _ => unreachable!("mul_param unit on {}", node.kind()),
    }
}

/// x·γ with γ the parameter's slice of `vec` (θ or v).
fn scaled(cx: &CpuCx, node: &Node, x: &[f64], vec: &[f64]) -> Vec<f64> {
    ch::scale_channels(x, cx.param(vec, param(node)), node.in_shape.spatial())
}

/// grad_γ += Σ a·b per channel.
fn add_dot(cx: &CpuCx, node: &Node, a: &[f64], b: &[f64], into: &mut [f64]) {
    let s = node.in_shape;
    let d = ch::channel_dot(a, b, s.c, s.spatial());
    cx.param_mut(into, param(node))
        .iter_mut()
        .zip(d)
        .for_each(|(t, v)| *t += v);
}

/// Pushes out (+)= a·γ_b (+ c·γ_d), γ_b and γ_d the parameter in the
/// buffers b and d.
fn plan_scale(
    p: &mut Plan,
    node: &Node,
    (a, b): (usize, usize),
    cd: Option<(usize, usize)>,
    out: usize,
    acc: bool,
) {
    let s = node.in_shape;
    let len = p.n * s.numel();
    let (c, d) = cd.unwrap_or((p.dummy, p.dummy));
    let off = p.param_off(param(node));
    p.push_with(
        Kernel::Mul,
        Consts::new(&[
            ("PAIR_B", cd.is_some() as u32),
            ("ACC", acc as u32),
            ("B_PARAM", 1),
        ]),
        &ChannelParams {
            len: len as u32,
            hw: s.spatial() as u32,
            c: s.c as u32,
            src_off: off as u32,
            ..Default::default()
        },
        vec![a, b, c, d, out],
        Grid::Threads(len),
    );
}

/// Pushes target[γ] += Σ a·b (+ c·d) per channel.
fn plan_dot(p: &mut Plan, node: &Node, ab: (usize, usize), cd: Option<(usize, usize)>, r: bool) {
    let s = node.in_shape;
    let (c, d) = cd.unwrap_or((p.dummy, p.dummy));
    let off = p.param_off(param(node));
    let target = p.target(r);
    p.push_with(
        Kernel::ChannelDot,
        Consts::new(&[("PAIR_B", cd.is_some() as u32), ("ACC", 1)]),
        &ChannelParams {
            blocks: p.n as u32,
            c: s.c as u32,
            hw: s.spatial() as u32,
            dst_off: off as u32,
            ..Default::default()
        },
        vec![ab.0, ab.1, c, d, target],
        Grid::Groups(s.c),
    );
}

impl Layer for MulParamUnit {
    /// The parser makes a layer scale of an image only; a hand-built
    /// graph may not.
    fn check(&self, node: &Node) -> Result<()> {
        let s = node.in_shape;
        if !s.is_image() || node.out_shape != s {
            return Err(unsupported(
                node,
                format!(
                    "mul_param scales an image [C, H, W] into its own shape, not {s} into {}",
                    node.out_shape
                ),
            ));
        }
        Ok(())
    }
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        (scaled(cx, node, xs[0], cx.theta), Box::new(()))
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        super::add_vecs(
            &scaled(cx, node, dxs[0], cx.theta),
            &scaled(cx, node, xs[0], v),
        )
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        add_dot(cx, node, gy, xs[0], grad);
        vec![scaled(cx, node, gy, cx.theta)]
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
        v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        add_dot(cx, node, rgy, xs[0], hv);
        add_dot(cx, node, gy, dxs[0], hv);
        vec![super::add_vecs(
            &scaled(cx, node, rgy, cx.theta),
            &scaled(cx, node, gy, v),
        )]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        plan_scale(p, node, (io.x[0], p.theta), None, io.y, false);
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let xv = (io.x[0], p.v);
        if io.dx_zero[0] {
            plan_scale(p, node, xv, None, io.dy, false);
        } else {
            plan_scale(p, node, (io.dx[0], p.theta), Some(xv), io.dy, false);
        }
        false
    }
    /// gx = gy·γ and grad_γ += Σ gy·x; in the R-pass (gy: R(gy), g: the
    /// plain adjoint) R(gx) = R(gy)·γ + g·v_γ and Hv_γ += Σ R(gy)·x + g·ẋ.
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let second = (r && !io.dx_zero[0]).then_some((io.g, io.dx[0]));
        plan_dot(p, node, (io.gy, io.x[0]), second, r);
        if io.needs_gx[0] {
            let gv = r.then_some((io.g, p.v));
            plan_scale(p, node, (io.gy, p.theta), gv, io.gx[0], io.acc[0]);
        }
    }
}

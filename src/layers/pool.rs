//! Pooling: MaxPool2d (the argmax kept for the gather/scatter passes; ties
//! to the first maximum as PyTorch), AvgPool2d (count_include_pad; both
//! with ceil_mode, which only changes the output size and, for the
//! average, the divisor of windows past the padded edge) and the
//! global average pool. All three are linear in x given the argmax
//! ([`LinearUnit`]): each gives its map and the transpose, and the R-passes
//! follow. Kernels: shaders/pool.wgsl.

use super::{
    saved, unsupported, CpuCx, Decision, LinearUnit, Saved, StateBuf, StateCx, StateWords,
};
use crate::dispatch::kernels::{Consts, Kernel, PoolParams};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::model::{Node, Op};
use crate::ops::pool;

pub struct MaxPoolUnit;
pub struct AvgPoolUnit;
pub struct GlobalAvgPoolUnit;

/// (k, stride, pad) of a max or average pool.
fn window(node: &Node) -> (usize, usize, usize) {
    match node.op {
        Op::MaxPool { k, stride, pad, .. } | Op::AvgPool { k, stride, pad, .. } => (k, stride, pad),
        _ => unreachable!("pool unit on {}", node.kind()),
    }
}

/// PyTorch refuses pad > k/2 for both pools.
fn check_window(node: &Node) -> Result<()> {
    let (k, stride, pad) = window(node);
    if k == 0 || stride == 0 {
        return Err(unsupported(
            node,
            "kernel size and stride must be at least 1",
        ));
    }
    if 2 * pad > k {
        return Err(unsupported(
            node,
            format!("pad {pad} should be at most half of the kernel size {k}"),
        ));
    }
    Ok(())
}

/// The pool kernels' parameters for a batch of `n` (the window is zero
/// for the global average pool).
fn pool_params(node: &Node, n: usize) -> PoolParams {
    let (s, o) = (node.in_shape, node.out_shape);
    let (k, stride, pad) = match node.op {
        Op::MaxPool { k, stride, pad, .. } | Op::AvgPool { k, stride, pad, .. } => (k, stride, pad),
        _ => (0, 0, 0),
    };
    PoolParams {
        planes: (n * s.c) as u32,
        h: s.h as u32,
        w: s.w as u32,
        k: k as u32,
        stride: stride as u32,
        pad: pad as u32,
        oh: o.h as u32,
        ow: o.w as u32,
        ..Default::default()
    }
}

impl LinearUnit for MaxPoolUnit {
    fn check(&self, node: &Node) -> Result<()> {
        check_window(node)
    }

    /// The argmax of every window (the state A depends on), or the one
    /// the context forces.
    fn forward(&self, cx: &CpuCx, node: &Node, x: &[f64]) -> (Vec<f64>, Saved) {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        if let Some(arg) = cx.argmax {
            let arg = arg.to_vec();
            let y = pool::maxpool_gather(cx.n * s.c, s.spatial(), o.spatial(), &arg, x);
            return (y, Box::new(arg));
        }
        let (y, arg) = pool::maxpool_forward(cx.n * s.c, s.h, s.w, k, stride, pad, o.h, o.w, x);
        (y, Box::new(arg))
    }

    fn apply(&self, cx: &CpuCx, node: &Node, sv: &Saved, x: &[f64]) -> Vec<f64> {
        let arg: &Vec<u32> = saved(sv, node);
        let (s, o) = (node.in_shape, node.out_shape);
        pool::maxpool_gather(cx.n * s.c, s.spatial(), o.spatial(), arg, x)
    }

    fn transpose(&self, cx: &CpuCx, node: &Node, sv: &Saved, g: &[f64]) -> Vec<f64> {
        let arg: &Vec<u32> = saved(sv, node);
        let (s, o) = (node.in_shape, node.out_shape);
        pool::maxpool_scatter(cx.n * s.c, s.spatial(), o.spatial(), arg, g)
    }

    fn decides(&self, _node: &Node) -> bool {
        true
    }

    /// Each window's argmax (as the forward picks it), with margin the
    /// window's maximum minus its runner-up.
    fn decide(&self, cx: &CpuCx, node: &Node, x: &[f64]) -> Option<(Decision, Vec<f64>)> {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        let planes = cx.n * s.c;
        let (_, arg) = pool::maxpool_forward(planes, s.h, s.w, k, stride, pad, o.h, o.w, x);
        let margins = pool::maxpool_margins(planes, s.h, s.w, k, stride, pad, o.h, o.w, x);
        Some((Decision::Argmax(arg), margins))
    }

    /// The argmax buffer the gather and scatter kernels read.
    fn decision_words(&self, _node: &Node, d: &Decision) -> Option<StateWords> {
        match d {
            Decision::Argmax(a) => Some(StateWords::U32(a.clone())),
            _ => None,
        }
    }

    fn gpu_state(&self, node: &Node, n: usize, _cx: &StateCx) -> Vec<StateBuf> {
        vec![StateBuf {
            name: "argmax",
            len: n * node.out_shape.numel(),
            init: None,
            tangent: false,
        }]
    }

    /// While a frozen plan replays (`Plan::frozen`), the gather through
    /// the argmax its recording pass left.
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        if p.replaying() {
            self.plan_apply(p, node, io, io.x[0], io.y);
            return;
        }
        p.push(
            Kernel::MaxPoolForward,
            &pool_params(node, p.n),
            vec![io.x[0], io.y, io.state[0]],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
    }

    fn plan_apply(&self, p: &mut Plan, node: &Node, io: &NodeBufs, src: usize, dst: usize) {
        p.push(
            Kernel::MaxPoolGather,
            &pool_params(node, p.n),
            vec![src, io.state[0], dst],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
    }

    fn plan_transpose(
        &self,
        p: &mut Plan,
        node: &Node,
        io: &NodeBufs,
        src: usize,
        dst: usize,
        acc: bool,
    ) {
        p.push_with(
            Kernel::MaxPoolBackward,
            Consts::acc(acc),
            &pool_params(node, p.n),
            vec![src, io.state[0], dst],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

impl LinearUnit for AvgPoolUnit {
    fn check(&self, node: &Node) -> Result<()> {
        check_window(node)
    }

    fn apply(&self, cx: &CpuCx, node: &Node, _sv: &Saved, x: &[f64]) -> Vec<f64> {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        pool::avgpool_forward(cx.n * s.c, s.h, s.w, k, stride, pad, o.h, o.w, x)
    }

    fn transpose(&self, cx: &CpuCx, node: &Node, _sv: &Saved, g: &[f64]) -> Vec<f64> {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        pool::avgpool_backward(cx.n * s.c, s.h, s.w, k, stride, pad, o.h, o.w, g)
    }

    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        p.push(
            Kernel::AvgPoolForward,
            &pool_params(node, p.n),
            vec![src, dst],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
    }

    fn plan_transpose(
        &self,
        p: &mut Plan,
        node: &Node,
        _io: &NodeBufs,
        src: usize,
        dst: usize,
        acc: bool,
    ) {
        p.push_with(
            Kernel::AvgPoolBackward,
            Consts::acc(acc),
            &pool_params(node, p.n),
            vec![src, dst],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

impl LinearUnit for GlobalAvgPoolUnit {
    fn apply(&self, cx: &CpuCx, node: &Node, _sv: &Saved, x: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        pool::gap_forward(cx.n * s.c, s.spatial(), x)
    }

    fn transpose(&self, cx: &CpuCx, node: &Node, _sv: &Saved, g: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        pool::gap_backward(cx.n * s.c, s.spatial(), g)
    }

    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        p.push(
            Kernel::GapForward,
            &pool_params(node, p.n),
            vec![src, dst],
            Grid::Threads(p.n * node.in_shape.c),
        );
    }

    fn plan_transpose(
        &self,
        p: &mut Plan,
        node: &Node,
        _io: &NodeBufs,
        src: usize,
        dst: usize,
        acc: bool,
    ) {
        p.push_with(
            Kernel::GapBackward,
            Consts::acc(acc),
            &pool_params(node, p.n),
            vec![src, dst],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

//! Pooling: MaxPool2d (the argmax kept for the gather/scatter passes; ties
//! to the first maximum as PyTorch), AvgPool2d (count_include_pad) and the
//! global average pool. All three are linear in x given the argmax, so the
//! R-forward is the forward map applied to ẋ and the R-backward the
//! backward map applied to R(gy). Kernels: shaders/pool.wgsl.

use super::{saved, unsupported, CpuCx, Layer, Saved, StateBuf, StateCx};
use crate::error::Result;
use crate::gpu::kernels::{Consts, Kernel, PoolParams};
use crate::gpu::plan::{NodeBufs, Plan};
use crate::gpu::program::Grid;
use crate::model::{Node, Op};
use crate::ops::pool;

pub struct MaxPoolUnit;
pub struct AvgPoolUnit;
pub struct GlobalAvgPoolUnit;

/// (k, stride, pad) of a max or average pool.
fn window(node: &Node) -> (usize, usize, usize) {
    match node.op {
        Op::MaxPool { k, stride, pad } | Op::AvgPool { k, stride, pad } => (k, stride, pad),
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
        Op::MaxPool { k, stride, pad } | Op::AvgPool { k, stride, pad } => (k, stride, pad),
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

impl Layer for MaxPoolUnit {
    fn check(&self, node: &Node) -> Result<()> {
        check_window(node)
    }

    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        let (y, arg) = pool::maxpool_forward(cx.n * s.c, s.h, s.w, k, stride, pad, o.h, o.w, xs[0]);
        (y, Box::new(arg))
    }

    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        sv: &mut Saved,
    ) -> Vec<f64> {
        let arg: &Vec<u32> = saved(sv, node);
        let (s, o) = (node.in_shape, node.out_shape);
        pool::maxpool_gather(cx.n * s.c, s.spatial(), o.spatial(), arg, dxs[0])
    }

    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        sv: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let arg: &Vec<u32> = saved(sv, node);
        let (s, o) = (node.in_shape, node.out_shape);
        vec![pool::maxpool_scatter(
            cx.n * s.c,
            s.spatial(),
            o.spatial(),
            arg,
            gy,
        )]
    }

    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _dxs: &[&[f64]],
        sv: &Saved,
        _gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        self.backward(cx, node, xs, sv, rgy, hv)
    }

    fn gpu_state(&self, node: &Node, n: usize, _cx: &StateCx) -> Vec<StateBuf> {
        vec![StateBuf {
            name: "argmax",
            len: n * node.out_shape.numel(),
            init: None,
        }]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        p.push(
            Kernel::MaxPoolForward,
            &pool_params(node, p.n),
            vec![io.x[0], io.y, io.state[0]],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        if io.dx_zero[0] {
            return true;
        }
        p.push(
            Kernel::MaxPoolGather,
            &pool_params(node, p.n),
            vec![io.dx[0], io.state[0], io.dy],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, _r: bool) {
        if !io.needs_gx[0] {
            return;
        }
        p.push_with(
            Kernel::MaxPoolBackward,
            Consts::acc(io.acc[0]),
            &pool_params(node, p.n),
            vec![io.gy, io.state[0], io.gx[0]],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

impl Layer for AvgPoolUnit {
    fn check(&self, node: &Node) -> Result<()> {
        check_window(node)
    }

    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        let y = pool::avgpool_forward(cx.n * s.c, s.h, s.w, k, stride, pad, o.h, o.w, xs[0]);
        (y, Box::new(()))
    }

    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        _sv: &mut Saved,
    ) -> Vec<f64> {
        self.forward(cx, node, dxs).0
    }

    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _sv: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let (k, stride, pad) = window(node);
        let (s, o) = (node.in_shape, node.out_shape);
        vec![pool::avgpool_backward(
            cx.n * s.c,
            s.h,
            s.w,
            k,
            stride,
            pad,
            o.h,
            o.w,
            gy,
        )]
    }

    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _dxs: &[&[f64]],
        sv: &Saved,
        _gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        self.backward(cx, node, xs, sv, rgy, hv)
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        p.push(
            Kernel::AvgPoolForward,
            &pool_params(node, p.n),
            vec![io.x[0], io.y],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        if io.dx_zero[0] {
            return true;
        }
        p.push(
            Kernel::AvgPoolForward,
            &pool_params(node, p.n),
            vec![io.dx[0], io.dy],
            Grid::Threads(p.n * node.out_shape.numel()),
        );
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, _r: bool) {
        if !io.needs_gx[0] {
            return;
        }
        p.push_with(
            Kernel::AvgPoolBackward,
            Consts::acc(io.acc[0]),
            &pool_params(node, p.n),
            vec![io.gy, io.gx[0]],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

impl Layer for GlobalAvgPoolUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let s = node.in_shape;
        (
            pool::gap_forward(cx.n * s.c, s.spatial(), xs[0]),
            Box::new(()),
        )
    }

    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        _sv: &mut Saved,
    ) -> Vec<f64> {
        self.forward(cx, node, dxs).0
    }

    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _sv: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let s = node.in_shape;
        vec![pool::gap_backward(cx.n * s.c, s.spatial(), gy)]
    }

    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _dxs: &[&[f64]],
        sv: &Saved,
        _gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        self.backward(cx, node, xs, sv, rgy, hv)
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        p.push(
            Kernel::GapForward,
            &pool_params(node, p.n),
            vec![io.x[0], io.y],
            Grid::Threads(p.n * node.in_shape.c),
        );
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        if io.dx_zero[0] {
            return true;
        }
        p.push(
            Kernel::GapForward,
            &pool_params(node, p.n),
            vec![io.dx[0], io.dy],
            Grid::Threads(p.n * node.in_shape.c),
        );
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, _r: bool) {
        if !io.needs_gx[0] {
            return;
        }
        p.push_with(
            Kernel::GapBackward,
            Consts::acc(io.acc[0]),
            &pool_params(node, p.n),
            vec![io.gy, io.gx[0]],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

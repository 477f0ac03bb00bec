//! Adaptive average pooling (PyTorch's AdaptiveAvgPool2d) to any output
//! size: a fixed linear map ([`LinearUnit`]). Kernels:
//! shaders/adaptive_pool.wgsl.

use super::{unsupported, CpuCx, LinearUnit, Saved};
use crate::dispatch::kernels::{Consts, Kernel, PoolParams};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::model::{Node, Op};
use crate::ops::adaptive_pool as ap;

pub struct AdaptiveAvgPoolUnit;

fn params(node: &Node, n: usize) -> PoolParams {
    let (s, o) = (node.in_shape, node.out_shape);
    PoolParams {
        planes: (n * s.c) as u32,
        h: s.h as u32,
        w: s.w as u32,
        oh: o.h as u32,
        ow: o.w as u32,
        ..Default::default()
    }
}

impl LinearUnit for AdaptiveAvgPoolUnit {
    fn check(&self, node: &Node) -> Result<()> {
        let Op::AdaptiveAvgPool { h, w } = node.op else {
            unreachable!("adaptive pool unit on {}", node.kind());
        };
        let (s, o) = (node.in_shape, node.out_shape);
        if h == 0 || w == 0 || (o.c, o.h, o.w) != (s.c, h, w) {
            return Err(unsupported(
                node,
                format!("adaptive_avgpool h={h} w={w} of {s} must give [{}, {h}, {w}] (positive h, w), not {o}", s.c),
            ));
        }
        Ok(())
    }

    fn apply(&self, cx: &CpuCx, node: &Node, _sv: &Saved, x: &[f64]) -> Vec<f64> {
        let (s, o) = (node.in_shape, node.out_shape);
        ap::forward(cx.n * s.c, s.h, s.w, o.h, o.w, x)
    }

    fn transpose(&self, cx: &CpuCx, node: &Node, _sv: &Saved, g: &[f64]) -> Vec<f64> {
        let (s, o) = (node.in_shape, node.out_shape);
        ap::backward(cx.n * s.c, s.h, s.w, o.h, o.w, g)
    }

    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        p.push(
            Kernel::AdaptiveAvgPoolForward,
            &params(node, p.n),
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
            Kernel::AdaptiveAvgPoolBackward,
            Consts::acc(acc),
            &params(node, p.n),
            vec![src, dst],
            Grid::Threads(p.n * node.in_shape.numel()),
        );
    }
}

//! Channel moves: concatenation along channels (any number of inputs),
//! narrowing to a channel range, and ShuffleNet's channel shuffle. All
//! are linear maps that only move values, so every pass moves the
//! tangents and adjoints the same way. Kernels: shaders/channels.wgsl.

use super::{unsupported, CpuCx, Layer, LinearUnit, Saved};
use crate::dispatch::kernels::{ChannelParams, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::model::{Model, Node, Op};
use crate::ops::channels as ch;

pub struct ConcatUnit;
pub struct NarrowUnit;
pub struct ShuffleUnit;

/// The channel counts of a concatenation's inputs.
fn parts(model: &Model, node: &Node) -> Vec<usize> {
    node.inputs
        .iter()
        .map(|&v| model.value_shape(v).c)
        .collect()
}

/// A strided block copy (shaders/channels.wgsl `block_copy`): for `blocks`
/// blocks b, `len` floats from src[b·src.0 + src.1] to dst[b·dst.0 +
/// dst.1]; added with `acc`, with `fill` the rest of every destination
/// block zeroed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_copy(
    p: &mut Plan,
    src: usize,
    dst: usize,
    blocks: usize,
    len: usize,
    (src_stride, src_off): (usize, usize),
    (dst_stride, dst_off): (usize, usize),
    acc: bool,
    fill: bool,
) {
    let threads = if fill {
        blocks * dst_stride
    } else {
        blocks * len
    };
    p.push_with(
        Kernel::BlockCopy,
        Consts::new(&[("ACC", acc as u32), ("FILL", fill as u32)]),
        &ChannelParams {
            blocks: blocks as u32,
            len: len as u32,
            src_stride: src_stride as u32,
            src_off: src_off as u32,
            dst_stride: dst_stride as u32,
            dst_off: dst_off as u32,
            ..Default::default()
        },
        vec![src, dst],
        Grid::Threads(threads),
    );
}

/// Refuses a concatenation whose inputs do not make its output: each an
/// image of the output's h, w (or all flat), their channels adding up.
pub fn check_concat(model: &Model, node: &Node) -> Result<()> {
    if node.inputs.len() < 2 {
        return Err(unsupported(
            node,
            format!("concat needs two or more inputs, got {}", node.inputs.len()),
        ));
    }
    let o = node.out_shape;
    let mut c = 0usize;
    for &v in &node.inputs {
        let s = model.value_shape(v);
        if (s.h, s.w) != (o.h, o.w) {
            return Err(unsupported(
                node,
                format!("concat of an input {s} into an output {o}: inputs need equal h, w"),
            ));
        }
        c += s.c;
    }
    if c != o.c {
        return Err(unsupported(
            node,
            format!("concat of {c} channels into an output of {}", o.c),
        ));
    }
    Ok(())
}

impl Layer for ConcatUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let hw = node.out_shape.spatial();
        let parts: Vec<(&[f64], usize)> = xs.iter().copied().zip(parts(cx.model, node)).collect();
        (ch::concat(cx.n, hw, &parts), Box::new(()))
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        self.forward(cx, node, dxs).0
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        ch::split(cx.n, node.out_shape.spatial(), &parts(cx.model, node), gy)
    }
    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _dxs: &[&[f64]],
        _saved: &Saved,
        _gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        _hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        ch::split(cx.n, node.out_shape.spatial(), &parts(cx.model, node), rgy)
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let hw = node.out_shape.spatial();
        let c = node.out_shape.c;
        let mut off = 0;
        for (i, ci) in parts(p.model, node).into_iter().enumerate() {
            let len = ci * hw;
            block_copy(
                p,
                io.x[i],
                io.y,
                p.n,
                len,
                (len, 0),
                (c * hw, off * hw),
                false,
                false,
            );
            off += ci;
        }
    }

    /// The inputs' tangents into their channels of ẏ, which is written
    /// whole as every R-forward writes its output: the first nonzero
    /// tangent's copy also zeroes the channels of the zero ones (`FILL`)
    /// rather than trusting that no pass ever wrote there.
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        if io.dx_zero.iter().all(|&z| z) {
            return true;
        }
        let hw = node.out_shape.spatial();
        let c = node.out_shape.c;
        let fill = io.dx_zero.iter().any(|&z| z);
        let mut first = true;
        let mut off = 0;
        for (i, ci) in parts(p.model, node).into_iter().enumerate() {
            let len = ci * hw;
            if !io.dx_zero[i] {
                let f = fill && first;
                block_copy(
                    p,
                    io.dx[i],
                    io.dy,
                    p.n,
                    len,
                    (len, 0),
                    (c * hw, off * hw),
                    false,
                    f,
                );
                first = false;
            }
            off += ci;
        }
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, _r: bool) {
        let hw = node.out_shape.spatial();
        let c = node.out_shape.c;
        let mut off = 0;
        for (i, ci) in parts(p.model, node).into_iter().enumerate() {
            let len = ci * hw;
            if io.needs_gx[i] {
                block_copy(
                    p,
                    io.gy,
                    io.gx[i],
                    p.n,
                    len,
                    (c * hw, off * hw),
                    (len, 0),
                    io.acc[i],
                    false,
                );
            }
            off += ci;
        }
    }
}

/// (start, len) of a narrow.
fn range(node: &Node) -> (usize, usize) {
    match node.op {
        Op::Narrow { start, len } => (start, len),
        _ => unreachable!("narrow unit on {}", node.kind()),
    }
}

impl LinearUnit for NarrowUnit {
    fn check(&self, node: &Node) -> Result<()> {
        let (start, len) = range(node);
        let (s, o) = (node.in_shape, node.out_shape);
        if len == 0 || start.checked_add(len).is_none_or(|e| e > s.c) {
            return Err(unsupported(
                node,
                format!(
                    "narrow start={start} len={len} of {} channels: the range must be nonempty and within them",
                    s.c
                ),
            ));
        }
        if (o.c, o.h, o.w) != (len, s.h, s.w) {
            return Err(unsupported(
                node,
                format!(
                    "narrow of {s} to len={len} gives [{len}, {}, {}], not {o}",
                    s.h, s.w
                ),
            ));
        }
        Ok(())
    }

    fn apply(&self, cx: &CpuCx, node: &Node, _sv: &Saved, x: &[f64]) -> Vec<f64> {
        let (start, len) = range(node);
        let s = node.in_shape;
        ch::narrow(cx.n, s.c, s.spatial(), start, len, x)
    }

    fn transpose(&self, cx: &CpuCx, node: &Node, _sv: &Saved, g: &[f64]) -> Vec<f64> {
        let (start, len) = range(node);
        let s = node.in_shape;
        ch::narrow_backward(cx.n, s.c, s.spatial(), start, len, g)
    }

    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        let (start, len) = range(node);
        let s = node.in_shape;
        let hw = s.spatial();
        let l = len * hw;
        block_copy(
            p,
            src,
            dst,
            p.n,
            l,
            (s.c * hw, start * hw),
            (l, 0),
            false,
            false,
        );
    }

    /// Into the input's channels [start, start + len): added with `acc`;
    /// otherwise written, with zeros over the other channels.
    fn plan_transpose(
        &self,
        p: &mut Plan,
        node: &Node,
        _io: &NodeBufs,
        src: usize,
        dst: usize,
        acc: bool,
    ) {
        let (start, len) = range(node);
        let s = node.in_shape;
        let hw = s.spatial();
        let l = len * hw;
        block_copy(
            p,
            src,
            dst,
            p.n,
            l,
            (l, 0),
            (s.c * hw, start * hw),
            acc,
            !acc,
        );
    }
}

fn groups(node: &Node) -> usize {
    match node.op {
        Op::ChannelShuffle { groups } => groups,
        _ => unreachable!("shuffle unit on {}", node.kind()),
    }
}

/// A shuffle of `c` channels in `groups` groups (the transpose: c/groups).
fn plan_shuffle(p: &mut Plan, node: &Node, groups: usize, src: usize, dst: usize, acc: bool) {
    let s = node.in_shape;
    p.push_with(
        Kernel::ChannelShuffle,
        Consts::acc(acc),
        &ChannelParams {
            blocks: p.n as u32,
            c: s.c as u32,
            hw: s.spatial() as u32,
            groups: groups as u32,
            ..Default::default()
        },
        vec![src, dst],
        Grid::Threads(p.n * s.numel()),
    );
}

impl LinearUnit for ShuffleUnit {
    fn check(&self, node: &Node) -> Result<()> {
        let g = groups(node);
        let c = node.in_shape.c;
        if g == 0 || !c.is_multiple_of(g) {
            return Err(unsupported(
                node,
                format!("channel shuffle of {c} channels in groups={g}: groups must divide the channels"),
            ));
        }
        if node.out_shape != node.in_shape {
            return Err(unsupported(
                node,
                format!(
                    "channel shuffle of {} gives {}, not its input's shape",
                    node.in_shape, node.out_shape
                ),
            ));
        }
        Ok(())
    }

    fn apply(&self, cx: &CpuCx, node: &Node, _sv: &Saved, x: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        ch::shuffle(cx.n, s.c, s.spatial(), groups(node), x)
    }

    /// The inverse permutation: the shuffle with c/groups groups.
    fn transpose(&self, cx: &CpuCx, node: &Node, _sv: &Saved, g: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        ch::shuffle(cx.n, s.c, s.spatial(), s.c / groups(node), g)
    }

    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        plan_shuffle(p, node, groups(node), src, dst, false);
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
        let g = node.in_shape.c / groups(node);
        plan_shuffle(p, node, g, src, dst, acc);
    }
}

//! Sequence plumbing and the linear map on a sequence's last dimension, in
//! float64: `Op::Tokens` (image [C, H, W] -> sequence [H·W, C], ViT's
//! reshape + permute), `Op::Select` (token I -> flat [D], ViT's x[:, 0])
//! and `Op::SeqLinear` (nn.Linear on [T, DIN], or Hugging Face's Conv1D:
//! the same map with the weight stored transposed).
//!
//! Tokens and select are linear in x (on the GPU: the channel shuffle and
//! block copies of shaders/channels.wgsl); the linear map is bilinear in
//! (x, W), so its R-backward gains the term Vᵀ·gy (into R(gx)) and
//! gy·ẋᵀ (into Hv's weight block) beside the backward of R(gy).

use super::channels::block_copy;
use super::conv::{self, ConvUnit};
use super::linear_rows;
use super::{CpuCx, Layer, LinearUnit, Saved, StateBuf, StateCx};
use crate::dispatch::kernels::{ChannelParams, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::model::{Node, Op, Shape};
use crate::ops::gemm;

fn none() -> Saved {
    Box::new(())
}

/// Image [C, H, W] -> sequence [H·W, C], per sample.
pub struct TokensUnit;

/// Per sample, the transpose of a [rows, cols] matrix.
fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    let per = rows * cols;
    for (xs, ys) in x.chunks(per).zip(y.chunks_mut(per)) {
        for r in 0..rows {
            for c in 0..cols {
                ys[c * rows + r] = xs[r * cols + c];
            }
        }
    }
    y
}

impl LinearUnit for TokensUnit {
    fn apply(&self, _cx: &CpuCx, node: &Node, _saved: &Saved, x: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        transpose(x, s.c, s.spatial())
    }
    fn transpose(&self, _cx: &CpuCx, node: &Node, _saved: &Saved, g: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        transpose(g, s.spatial(), s.c)
    }
    // GPU: the per-sample transpose [C, H·W] -> [H·W, C] is the channel
    // shuffle of C·H·W one-element "channels" in C groups; its adjoint
    // the shuffle in H·W groups (shaders/channels.wgsl).
    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        plan_transpose(p, node, src, dst, false, false);
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
        plan_transpose(p, node, src, dst, true, acc);
    }
}

/// Sequence [H·W, C] -> image [C, H, W], per sample (ConvNeXt's
/// permute(0, 3, 1, 2)): the transpose of `tokens`.
pub struct UntokensUnit;

impl LinearUnit for UntokensUnit {
    fn apply(&self, _cx: &CpuCx, node: &Node, _saved: &Saved, x: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        transpose(x, s.tokens(), s.features())
    }
    fn transpose(&self, _cx: &CpuCx, node: &Node, _saved: &Saved, g: &[f64]) -> Vec<f64> {
        let s = node.in_shape;
        transpose(g, s.features(), s.tokens())
    }
    // GPU: the shuffles of `tokens` the other way round: [T, C] -> [C, T]
    // is the shuffle of T·C one-element channels in T groups, its adjoint
    // the shuffle in C groups.
    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        let s = node.in_shape;
        shuffle(p, s.numel(), s.tokens(), src, dst, false);
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
        let s = node.in_shape;
        shuffle(p, s.numel(), s.features(), src, dst, acc);
    }
}

/// dst (+)= the per-sample transpose of src: [C, H·W] -> [H·W, C], or back
/// with `adjoint`.
fn plan_transpose(p: &mut Plan, node: &Node, src: usize, dst: usize, adjoint: bool, acc: bool) {
    let s = node.in_shape;
    let groups = if adjoint { s.spatial() } else { s.c };
    shuffle(p, s.numel(), groups, src, dst, acc);
}

/// dst (+)= the channel shuffle of each sample's `per` one-element
/// channels in `groups` groups: the transpose of a [groups, per/groups]
/// matrix.
fn shuffle(p: &mut Plan, per: usize, groups: usize, src: usize, dst: usize, acc: bool) {
    p.push_with(
        Kernel::ChannelShuffle,
        Consts::acc(acc),
        &ChannelParams {
            blocks: p.n as u32,
            c: per as u32,
            hw: 1,
            groups: groups as u32,
            ..Default::default()
        },
        vec![src, dst],
        Grid::Threads(p.n * per),
    );
}

/// Token `index` of [T, D] -> flat [D].
pub struct SelectUnit;

fn pick(node: &Node, x: &[f64]) -> Vec<f64> {
    let Op::Select { index } = node.op else {
        unreachable!("select unit on {}", node.kind())
    };
    let (per, d) = (node.in_shape.numel(), node.in_shape.features());
    x.chunks(per)
        .flat_map(|s| s[index * d..(index + 1) * d].iter().copied())
        .collect()
}

fn unpick(node: &Node, g: &[f64]) -> Vec<f64> {
    let Op::Select { index } = node.op else {
        unreachable!("select unit on {}", node.kind())
    };
    let (per, d) = (node.in_shape.numel(), node.in_shape.features());
    let mut gx = vec![0.0; g.len() / d * per];
    for (s, gs) in gx.chunks_mut(per).zip(g.chunks(d)) {
        s[index * d..(index + 1) * d].copy_from_slice(gs);
    }
    gx
}

impl LinearUnit for SelectUnit {
    fn apply(&self, _cx: &CpuCx, node: &Node, _saved: &Saved, x: &[f64]) -> Vec<f64> {
        pick(node, x)
    }
    fn transpose(&self, _cx: &CpuCx, node: &Node, _saved: &Saved, g: &[f64]) -> Vec<f64> {
        unpick(node, g)
    }
    // GPU: block copies (shaders/channels.wgsl); the adjoint writes the
    // token's row and zeros elsewhere, or adds the row alone.
    fn plan_apply(&self, p: &mut Plan, node: &Node, _io: &NodeBufs, src: usize, dst: usize) {
        plan_pick(p, node, src, dst);
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
        let Op::Select { index } = node.op else {
            unreachable!("select unit on {}", node.kind())
        };
        let (per, d) = (node.in_shape.numel(), node.in_shape.features());
        block_copy(p, src, dst, p.n, d, (d, 0), (per, index * d), acc, !acc);
    }
}

/// dst = token `index` of each sample of src.
fn plan_pick(p: &mut Plan, node: &Node, src: usize, dst: usize) {
    let Op::Select { index } = node.op else {
        unreachable!("select unit on {}", node.kind())
    };
    let (per, d) = (node.in_shape.numel(), node.in_shape.features());
    block_copy(p, src, dst, p.n, d, (per, index * d), (d, 0), false, false);
}

/// y = x·Wᵀ + b on every token (nn.Linear), or x·W + b (Conv1D).
pub struct SeqLinearUnit;

struct Lin {
    weight: usize,
    bias: Option<usize>,
    din: usize,
    dout: usize,
    transposed: bool,
}

fn lin(node: &Node) -> Lin {
    match node.op {
        Op::SeqLinear {
            weight,
            bias,
            din,
            dout,
            transposed,
        } => Lin {
            weight,
            bias,
            din,
            dout,
            transposed,
        },
        _ => unreachable!("sequence linear unit on {}", node.kind()),
    }
}

/// The map's GEMMs (ops::gemm: faer, fixed row blocks, so the bits do not
/// depend on the thread count), reading Conv1D's [DIN, DOUT] weight in
/// place.
impl Lin {
    /// y[r] += W·x[r] for every row.
    fn apply_acc(&self, w: &[f64], x: &[f64], y: &mut [f64]) {
        let rows = x.len() / self.din;
        gemm::linear_forward_acc(rows, self.din, self.dout, self.transposed, x, w, y);
    }
    /// gx[r] += Wᵀ·g[r] for every row.
    fn transpose_acc(&self, w: &[f64], g: &[f64], gx: &mut [f64]) {
        let rows = gx.len() / self.din;
        gemm::linear_backward_data_acc(rows, self.din, self.dout, self.transposed, g, w, gx);
    }
    /// dW(o, i) += Σ_r g[r, o]·x[r, i], in W's stored layout.
    fn outer_acc(&self, g: &[f64], x: &[f64], dw: &mut [f64]) {
        let rows = x.len() / self.din;
        gemm::linear_backward_weight_acc(rows, self.din, self.dout, self.transposed, g, x, dw);
    }
    /// db(o) += Σ_r g[r, o].
    fn bias_acc(&self, g: &[f64], db: &mut [f64]) {
        for gr in g.chunks(self.dout) {
            db.iter_mut().zip(gr).for_each(|(a, b)| *a += b);
        }
    }
}

impl Layer for SeqLinearUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let l = lin(node);
        let rows = xs[0].len() / l.din;
        let mut y = match l.bias {
            Some(b) => cx.param(cx.theta, b).repeat(rows),
            None => vec![0.0; rows * l.dout],
        };
        l.apply_acc(cx.param(cx.theta, l.weight), xs[0], &mut y);
        (y, none())
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
        let l = lin(node);
        let rows = xs[0].len() / l.din;
        let mut y = match l.bias {
            Some(b) => cx.param(v, b).repeat(rows),
            None => vec![0.0; rows * l.dout],
        };
        l.apply_acc(cx.param(cx.theta, l.weight), dxs[0], &mut y);
        l.apply_acc(cx.param(v, l.weight), xs[0], &mut y);
        y
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
        let l = lin(node);
        l.outer_acc(gy, xs[0], cx.param_mut(grad, l.weight));
        if let Some(b) = l.bias {
            l.bias_acc(gy, cx.param_mut(grad, b));
        }
        let mut gx = vec![0.0; xs[0].len()];
        l.transpose_acc(cx.param(cx.theta, l.weight), gy, &mut gx);
        vec![gx]
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
        let l = lin(node);
        {
            let hw = cx.param_mut(hv, l.weight);
            l.outer_acc(rgy, xs[0], hw);
            l.outer_acc(gy, dxs[0], hw);
        }
        if let Some(b) = l.bias {
            l.bias_acc(rgy, cx.param_mut(hv, b));
        }
        let mut rgx = vec![0.0; xs[0].len()];
        l.transpose_acc(cx.param(cx.theta, l.weight), rgy, &mut rgx);
        l.transpose_acc(cx.param(v, l.weight), gy, &mut rgx);
        vec![rgx]
    }
    /// The GPU runs nn.Linear on a sequence as the linear layer's kernels
    /// (src/layers/conv.rs: the GEMM of a 1×1 conv) over samples · tokens
    /// rows; Hugging Face's Conv1D (weight [DIN, DOUT]) as the direct conv
    /// kernels (conv_direct.wgsl) reading the weight transposed (`WT`).
    fn check(&self, node: &Node) -> crate::error::Result<()> {
        ConvUnit.check(&as_linear(node))
    }
    fn gpu_scratch(&self, node: &Node, n: usize) -> usize {
        ConvUnit.gpu_scratch(&as_linear(node), n * node.in_shape.tokens())
    }
    fn gpu_state(&self, node: &Node, n: usize, cx: &StateCx) -> Vec<StateBuf> {
        ConvUnit.gpu_state(&as_linear(node), n * node.in_shape.tokens(), cx)
    }
    // A weight split by rows between bindings (an nn.Linear's, never a
    // Conv1D's, tied or not: `Plan::row_blocks`) runs by blocks of output
    // rows as the flat linear layer does (`layers::linear_rows`).
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let wt = lin(node).transposed;
        on_rows(p, node, |p, l| match linear_rows::blocks(p, l) {
            Some(b) => linear_rows::forward(p, l, io, &b),
            None => conv::plan_forward_wt(p, l, io, wt),
        })
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let wt = lin(node).transposed;
        on_rows(p, node, |p, l| match linear_rows::blocks(p, l) {
            Some(b) => linear_rows::r_forward(p, l, io, &b),
            None => conv::plan_r_forward_wt(p, l, io, wt),
        })
    }
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let wt = lin(node).transposed;
        on_rows(p, node, |p, l| match linear_rows::blocks(p, l) {
            Some(b) => linear_rows::backward(p, l, io, r, &b),
            None => conv::plan_backward_wt(p, l, io, r, wt),
        })
    }
}

/// The flat linear layer [DIN] -> [DOUT] one token of a sequence linear
/// is (a Conv1D's weight is read transposed by the plan's `wt`).
pub(crate) fn as_linear(node: &Node) -> Node {
    let l = lin(node);
    Node {
        name: node.name.clone(),
        op: Op::Linear {
            weight: l.weight,
            bias: l.bias,
            din: l.din,
            dout: l.dout,
        },
        inputs: node.inputs.clone(),
        in_shape: Shape::new(l.din, 1, 1),
        out_shape: Shape::new(l.dout, 1, 1),
    }
}

/// Plans `f` for the flat linear layer with the batch's samples · tokens
/// as its samples.
fn on_rows<R>(p: &mut Plan, node: &Node, f: impl FnOnce(&mut Plan, &Node) -> R) -> R {
    let n = p.n;
    p.n = n * node.in_shape.tokens();
    let out = f(p, &as_linear(node));
    p.n = n;
    out
}

//! A linear layer whose weight exceeds a storage binding (vgg11_bn's
//! classifier.0, 4096 × 25088 floats = 411 MB, against lavapipe's 128 MiB;
//! GPT-2's lm_head on a sequence, tied to the 50257 × 768 token embedding,
//! runs here too with the batch's samples · tokens as its samples):
//! its weight lies in several chunks of θ, v, the gradient and Hv
//! (`gpu::executor::param_bufs`), split between rows, and each pass runs
//! the conv unit's kernels on one row block at a time, every binding a
//! block of rows:
//! - forward / R-forward: the block's outputs y[:, r0..r1] = W[r0..r1]·x
//!   (+ V[r0..r1]·x), computed into a scratch [n, rows] and copied into
//!   their columns of y; the bias added after;
//! - backward data: gx = Σ over blocks W[r0..r1]ᵀ·gy[:, r0..r1], the
//!   adjoint's columns gathered into a scratch, each block after the first
//!   adding into gx (the kernels' ACC);
//! - weight gradient: each block's rows from its own columns of gy;
//! - bias: the conv unit's per-channel sums over the whole adjoint.
//!
//! The sums are the unsplit layer's, in the same order within each output
//! (forward) or weight (gradient); backward data sums the blocks one after
//! the other, and the forward adds the bias after the sum, so results
//! agree with the unsplit layer to float32 rounding, not bit for bit.
//! Block products take one tangent at a time here (the engine's block
//! size is 1 when a layer is split).

use super::channels::block_copy;
use super::conv;
use crate::dispatch::kernels::{self, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan, RowBlock};
use crate::dispatch::step::Grid;
use crate::model::{Node, Op, Shape};

/// The row blocks of a linear layer split by rows; None for every other
/// layer.
pub fn blocks(p: &Plan, node: &Node) -> Option<Vec<RowBlock>> {
    match node.op {
        Op::Linear { weight, .. } => p.row_blocks(weight),
        _ => None,
    }
}

/// Floats of the weight-gradient partial sums of a block of `weights`.
pub fn partial_floats(weights: usize, n: usize) -> usize {
    weights * kernels::conv_weight_chunks(n, 1, 1, weights).1
}

fn din_dout(node: &Node) -> (usize, usize) {
    match node.op {
        Op::Linear { din, dout, .. } => (din, dout),
        _ => unreachable!("row blocks of {}", node.kind()),
    }
}

/// The layer restricted to one block's rows, without bias.
fn sub(node: &Node, b: &RowBlock) -> Node {
    let (weight, din) = match node.op {
        Op::Linear { weight, din, .. } => (weight, din),
        _ => unreachable!("row blocks of {}", node.kind()),
    };
    Node {
        op: Op::Linear {
            weight,
            bias: None,
            din,
            dout: b.r1 - b.r0,
        },
        out_shape: Shape::new(b.r1 - b.r0, 1, 1),
        ..node.clone()
    }
}

/// Columns r0..r1 of every sample of `src` [n, dout] into `dst` [n, rows]
/// (one strided block copy).
fn gather(p: &mut Plan, src: usize, dst: usize, dout: usize, b: &RowBlock) {
    let rows = b.r1 - b.r0;
    block_copy(
        p,
        src,
        dst,
        p.n,
        rows,
        (dout, b.r0),
        (rows, 0),
        false,
        false,
    );
}

/// `src` [n, rows] into columns r0..r1 of `dst` [n, dout].
fn scatter(p: &mut Plan, src: usize, dst: usize, dout: usize, b: &RowBlock) {
    let rows = b.r1 - b.r0;
    block_copy(
        p,
        src,
        dst,
        p.n,
        rows,
        (rows, 0),
        (dout, b.r0),
        false,
        false,
    );
}

/// Adds the bias (θ's or v's, by `v`) to every sample of `y` [n, dout].
fn add_bias(p: &mut Plan, node: &Node, y: usize, v: bool) {
    let Some(bias) = conv::params_of(node).1 else {
        return;
    };
    let (_, dout) = din_dout(node);
    let (c, off) = p.param_at(bias);
    let src = if v { c.v } else { c.theta };
    block_copy(p, src, y, p.n, dout, (0, off), (dout, 0), true, false);
}

pub fn forward(p: &mut Plan, node: &Node, io: &NodeBufs, blocks: &[RowBlock]) {
    let (_, dout) = din_dout(node);
    let [sa, _] = p.row_scratch();
    let x = io.x[0];
    for b in blocks {
        let sn = sub(node, b);
        let pr = conv::conv_params(&sn, p.n, b.off, 0, 0);
        let th = b.at.theta;
        let grid = conv::forward_grid(&sn, p.n);
        let c = Consts::conv(false, false, false);
        let bufs = vec![x, th, x, th, sa];
        conv::push_conv(p, Kernel::ConvForward, c, &pr, bufs, grid, 1, false);
        scatter(p, sa, io.y, dout, b);
    }
    add_bias(p, node, io.y, false);
}

/// ẏ = W·ẋ + V·x + v_b (the first term dropped while ẋ is zero).
pub fn r_forward(p: &mut Plan, node: &Node, io: &NodeBufs, blocks: &[RowBlock]) -> bool {
    let (_, dout) = din_dout(node);
    let [sa, _] = p.row_scratch();
    let (x, dx) = (io.x[0], io.dx[0]);
    for b in blocks {
        let sn = sub(node, b);
        let (th, v) = (b.at.theta, b.at.v);
        let grid = conv::forward_grid(&sn, p.n);
        let (pr, c, bufs) = if io.dx_zero[0] {
            let pr = conv::conv_params(&sn, p.n, b.off, 0, 0);
            (pr, Consts::conv(false, false, false), vec![x, v, x, v, sa])
        } else {
            let pr = conv::conv_params(&sn, p.n, b.off, b.off, 0);
            (pr, Consts::conv(true, false, false), vec![dx, th, x, v, sa])
        };
        conv::push_conv(p, Kernel::ConvForward, c, &pr, bufs, grid, 1, false);
        scatter(p, sa, io.dy, dout, b);
    }
    add_bias(p, node, io.dy, true);
    false
}

/// gx = Σ Wᵀ·gy, gW, gb; or R(gx) = Σ Wᵀ·R(gy) + Vᵀ·gy, (Hv)_W, (Hv)_b.
pub fn backward(p: &mut Plan, node: &Node, io: &NodeBufs, r: bool, blocks: &[RowBlock]) {
    let (din, dout) = din_dout(node);
    let n = p.n;
    let [sa, sb] = p.row_scratch();
    let (gy, g, x) = (io.gy, io.g, io.x[0]);
    for (k, b) in blocks.iter().enumerate() {
        let sn = sub(node, b);
        let (th, v) = (b.at.theta, b.at.v);
        gather(p, gy, sa, dout, b);
        if r {
            gather(p, g, sb, dout, b);
        }
        if io.needs_gx[0] {
            let (pr, bufs) = if r {
                let pr = conv::conv_params(&sn, n, b.off, b.off, 0);
                (pr, vec![sa, th, sb, v, io.gx[0]])
            } else {
                let pr = conv::conv_params(&sn, n, b.off, 0, 0);
                (pr, vec![sa, th, sa, th, io.gx[0]])
            };
            let c = Consts::conv(r, false, io.acc[0] || k > 0);
            let grid = Grid::Threads(kernels::conv_backward_data_threads(n, din, 1, 1, 1));
            conv::push_conv(p, Kernel::ConvBackwardData, c, &pr, bufs, grid, 1, false);
        }
        let pair_b = r && !io.dx_zero[0];
        let parts = p.partials;
        let bufs = if pair_b {
            vec![sa, x, sb, io.dx[0], parts]
        } else {
            vec![sa, x, sa, x, parts]
        };
        let target = if r { b.at.hv } else { b.at.grad };
        conv::push_weight_grad(p, &sn, b.off, bufs, pair_b, target, false);
    }
    if let Some(bias) = conv::params_of(node).1 {
        let (c, off) = p.param_at(bias);
        let target = if r { c.hv } else { c.grad };
        p.channel_sums(gy, None, n, dout, 1, target, off, 0, true);
    }
}

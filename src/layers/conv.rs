//! Conv2d and Linear (a linear layer is a 1×1 convolution of a 1×1 image
//! on the GPU): y = conv(x, W) + b.
//!
//! R-forward: ẏ = conv(ẋ, W) + conv(x, V) + v_b.
//! Backward: gx = convᵀ(gy, W); gW = Σ gy ⊗ x; gb = Σ gy.
//! R-backward: R(gx) = convᵀ(R(gy), W) + convᵀ(gy, V);
//! (Hv)_W = Σ R(gy) ⊗ x + Σ gy ⊗ ẋ; (Hv)_b = Σ R(gy).
//! The float64 passes run as GEMMs (`ops::gemm`), each R-pass's two terms
//! summed in one call.
//! Kernels: shaders/conv.wgsl (forward, backward data) and
//! shaders/conv_weight.wgsl (weight gradient in two stages), or with
//! `Plan::conv_tiled` shaders/conv_tiled.wgsl's tiled implicit GEMMs (the
//! weight gradient's stage one; conv_weight_sum adds its chunks as before).
//! Those compute dense layers; grouped (depthwise included) and dilated
//! ones run on shaders/conv_direct.wgsl on either path (a thread per
//! element over its group's channels only), conv_weight_sum after it.

use super::{conv_split, linear_rows, unsupported, CpuCx, Layer, Saved};
use crate::dispatch::kernels::{self, Consts, ConvParams, Kernel, WeightsVia};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::model::{Node, Op};
use crate::ops::{conv, gemm};

pub struct ConvUnit;

/// The largest kernel size the GPU kernels are tested for.
pub const MAX_K: usize = 11;
/// The largest stride the GPU kernels are tested for.
pub const MAX_STRIDE: usize = 11;

/// (weight, bias) parameter indices of a conv or linear node.
pub(super) fn params_of(node: &Node) -> (usize, Option<usize>) {
    match node.op {
        Op::Conv { weight, bias, .. } | Op::Linear { weight, bias, .. } => (weight, bias),
        _ => unreachable!("conv unit on {}", node.kind()),
    }
}

/// The f64 geometry; a linear layer is a 1×1 conv of a 1×1 image.
fn geom(node: &Node, n: usize) -> conv::ConvGeom {
    let d = dims(node);
    conv::ConvGeom {
        n,
        cin: d.cin,
        h: d.h,
        w: d.w,
        cout: d.cout,
        k: d.k,
        stride: d.stride,
        pad: d.pad,
        oh: d.oh,
        ow: d.ow,
        groups: d.groups,
        dilation: d.dilation,
    }
}

/// Shape of a conv (or linear as a 1×1 conv).
#[derive(Clone, Copy)]
pub struct Dims {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
    pub groups: usize,
    pub dilation: usize,
}

impl Dims {
    /// Weights: cout·(cin/groups)·k·k.
    pub fn weights(&self) -> usize {
        self.cout * (self.cin / self.groups) * self.k * self.k
    }
    /// Whether conv_direct.wgsl computes the layer (grouped or dilated).
    pub fn direct(&self) -> bool {
        kernels::conv_direct_applies(self.groups, self.dilation)
    }
}

pub fn dims(node: &Node) -> Dims {
    match node.op {
        Op::Conv {
            cin,
            cout,
            k,
            stride,
            pad,
            groups,
            dilation,
            ..
        } => Dims {
            cin,
            h: node.in_shape.h,
            w: node.in_shape.w,
            cout,
            k,
            stride,
            pad,
            oh: node.out_shape.h,
            ow: node.out_shape.w,
            groups,
            dilation,
        },
        Op::Linear { din, dout, .. } => Dims {
            cin: din,
            h: 1,
            w: 1,
            cout: dout,
            k: 1,
            stride: 1,
            pad: 0,
            oh: 1,
            ow: 1,
            groups: 1,
            dilation: 1,
        },
        _ => unreachable!("conv dims on {}", node.kind()),
    }
}

/// Pairs of (input, weights) whose products a pass sums.
type Pairs<'a> = [(&'a [f64], &'a [f64])];

/// y += Σ conv(x, w) over (x, w) pairs, as GEMMs (ops::gemm).
fn fwd_acc(node: &Node, n: usize, pairs: &Pairs, y: &mut [f64]) {
    match node.op {
        Op::Linear { din, dout, .. } => {
            for &(x, w) in pairs {
                gemm::linear_forward_acc(n, din, dout, false, x, w, y);
            }
        }
        _ => gemm::conv_forward_acc(&geom(node, n), pairs, y),
    }
}

/// gx += Σ convᵀ(gy, w) over (gy, w) pairs.
fn data_acc(node: &Node, n: usize, pairs: &Pairs, gx: &mut [f64]) {
    match node.op {
        Op::Linear { din, dout, .. } => {
            for &(gy, w) in pairs {
                gemm::linear_backward_data_acc(n, din, dout, false, gy, w, gx);
            }
        }
        _ => gemm::conv_backward_data_acc(&geom(node, n), pairs, gx),
    }
}

/// gw += Σ gy ⊗ x over (gy, x) pairs.
fn weight_acc(node: &Node, n: usize, pairs: &Pairs, gw: &mut [f64]) {
    match node.op {
        Op::Linear { din, dout, .. } => {
            for &(gy, x) in pairs {
                gemm::linear_backward_weight_acc(n, din, dout, false, gy, x, gw);
            }
        }
        _ => gemm::conv_backward_weight_acc(&geom(node, n), pairs, gw),
    }
}

fn bias_grad(cx: &CpuCx, node: &Node, bias: Option<usize>, gy: &[f64], out: &mut [f64]) {
    if let Some(b) = bias {
        let c = dims(node).cout;
        let plane = node.out_shape.spatial();
        conv::bias_grad_acc(cx.n, c, plane, gy, cx.param_mut(out, b));
    }
}

impl Layer for ConvUnit {
    /// k ≤ 11 and stride 1..=4 (tests/gpu_kernels.rs and tests/shapes.rs
    /// cover them) or up to 11 (ViT's patch convolutions, k = stride;
    /// tests/gpu_conv_stride.rs); any padding (the kernels' index arithmetic is exact for
    /// every size the parser accepts; tested to k + 3); groups dividing
    /// both channel counts, any dilation ≥ 1 (tests/gpu_grouped_conv.rs).
    fn check(&self, node: &Node) -> Result<()> {
        let d = dims(node);
        if d.groups == 0 || !d.cin.is_multiple_of(d.groups) || !d.cout.is_multiple_of(d.groups) {
            return Err(unsupported(
                node,
                format!(
                    "groups={} must divide both the input channels ({}) and the output \
                     channels ({})",
                    d.groups, d.cin, d.cout
                ),
            ));
        }
        if d.dilation == 0 {
            return Err(unsupported(node, "dilation must be at least 1"));
        }
        if d.k > MAX_K {
            return Err(unsupported(
                node,
                format!("kernel size {} is above the supported {MAX_K}", d.k),
            ));
        }
        if !(1..=MAX_STRIDE).contains(&d.stride) {
            return Err(unsupported(
                node,
                format!(
                    "stride {} is outside the supported 1..={MAX_STRIDE}",
                    d.stride
                ),
            ));
        }
        let (_, bias) = params_of(node);
        if bias.is_some() && d.cout > super::batchnorm::MAX_CHANNELS {
            return Err(unsupported(
                node,
                format!(
                    "a bias over {} channels; the GPU bias reduction takes at most {}",
                    d.cout,
                    super::batchnorm::MAX_CHANNELS
                ),
            ));
        }
        Ok(())
    }

    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let (weight, bias) = params_of(node);
        let mut y = vec![0.0; cx.n * node.out_shape.numel()];
        fwd_acc(node, cx.n, &[(xs[0], cx.param(cx.theta, weight))], &mut y);
        if let Some(b) = bias {
            let c = dims(node).cout;
            conv::bias_acc(
                cx.n,
                c,
                node.out_shape.spatial(),
                cx.param(cx.theta, b),
                &mut y,
            );
        }
        (y, Box::new(()))
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
        let (weight, bias) = params_of(node);
        let mut y = vec![0.0; cx.n * node.out_shape.numel()];
        let pairs = [
            (dxs[0], cx.param(cx.theta, weight)),
            (xs[0], cx.param(v, weight)),
        ];
        fwd_acc(node, cx.n, &pairs, &mut y);
        if let Some(b) = bias {
            let c = dims(node).cout;
            conv::bias_acc(cx.n, c, node.out_shape.spatial(), cx.param(v, b), &mut y);
        }
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
        let (weight, bias) = params_of(node);
        let mut gx = vec![0.0; cx.n * node.in_shape.numel()];
        data_acc(node, cx.n, &[(gy, cx.param(cx.theta, weight))], &mut gx);
        weight_acc(node, cx.n, &[(gy, xs[0])], cx.param_mut(grad, weight));
        bias_grad(cx, node, bias, gy, grad);
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
        let (weight, bias) = params_of(node);
        let mut rgx = vec![0.0; cx.n * node.in_shape.numel()];
        let pairs = [(rgy, cx.param(cx.theta, weight)), (gy, cx.param(v, weight))];
        data_acc(node, cx.n, &pairs, &mut rgx);
        let hw = cx.param_mut(hv, weight);
        weight_acc(node, cx.n, &[(rgy, xs[0]), (gy, dxs[0])], hw);
        bias_grad(cx, node, bias, rgy, hv);
        vec![rgx]
    }

    fn gpu_scratch(&self, node: &Node, n: usize) -> usize {
        let (w, _, chunks) = weight_split(node, n);
        w * chunks
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        match linear_rows::blocks(p, node) {
            Some(b) => linear_rows::forward(p, node, io, &b),
            None => plan_forward_wt(p, node, io, false),
        }
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        match linear_rows::blocks(p, node) {
            Some(b) => linear_rows::r_forward(p, node, io, &b),
            None => plan_r_forward_wt(p, node, io, false),
        }
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        match linear_rows::blocks(p, node) {
            Some(b) => linear_rows::backward(p, node, io, r, &b),
            None => plan_backward_wt(p, node, io, r, false),
        }
    }
}

/// The conv/linear forward step; `wt`: a linear layer whose weight is
/// stored transposed, [din, dout] (Hugging Face's Conv1D), which the
/// direct kernels read through their `WT` constant.
pub fn plan_forward_wt(p: &mut Plan, node: &Node, io: &NodeBufs, wt: bool) {
    let (weight, bias) = params_of(node);
    let boff = bias.map_or(0, |b| p.param_off(b));
    let pr = conv_params(node, p.n, p.param_off(weight), 0, boff);
    let (x, th) = (io.x[0], p.theta);
    let c = Consts::conv(false, bias.is_some(), false);
    let grid = forward_grid(node, p.n);
    push_conv(
        p,
        Kernel::ConvForward,
        c,
        &pr,
        vec![x, th, x, th, io.y],
        grid,
        dims(node).dilation,
        wt,
    );
}

/// The R-forward step (`wt` as in `plan_forward_wt`).
pub fn plan_r_forward_wt(p: &mut Plan, node: &Node, io: &NodeBufs, wt: bool) -> bool {
    let (weight, bias) = params_of(node);
    let woff = p.param_off(weight);
    let boff = bias.map_or(0, |b| p.param_off(b));
    let (x, dx) = (io.x[0], io.dx[0]);
    let grid = forward_grid(node, p.n);
    // conv(ẋ, W) + conv(x, V) + v_bias; the first term drops while ẋ is zero.
    if io.dx_zero[0] {
        let pr = conv_params(node, p.n, woff, 0, boff);
        let c = Consts::conv(false, bias.is_some(), false);
        push_conv(
            p,
            Kernel::ConvForward,
            c,
            &pr,
            vec![x, p.v, x, p.v, io.dy],
            grid,
            dims(node).dilation,
            wt,
        );
    } else {
        let pr = conv_params(node, p.n, woff, woff, boff);
        let c = Consts::conv(true, bias.is_some(), false);
        let bufs = vec![dx, p.theta, x, p.v, io.dy];
        let dil = dims(node).dilation;
        push_conv(p, Kernel::ConvForward, c, &pr, bufs, grid, dil, wt);
    }
    false
}

/// The backward (or R-backward) step (`wt` as in `plan_forward_wt`).
pub fn plan_backward_wt(p: &mut Plan, node: &Node, io: &NodeBufs, r: bool, wt: bool) {
    let (weight, bias) = params_of(node);
    let n = p.n;
    let d = dims(node);
    let woff = p.param_off(weight);
    let (gy, g, x) = (io.gy, io.g, io.x[0]);
    let target = p.target(r);
    if io.needs_gx[0] {
        // R(gx) = convᵀ(R(gy), W) + convᵀ(gy, V); gx = convᵀ(gy, W).
        let (pr, bufs) = if r {
            let bufs = vec![gy, p.theta, g, p.v, io.gx[0]];
            (conv_params(node, n, woff, woff, 0), bufs)
        } else {
            let bufs = vec![gy, p.theta, gy, p.theta, io.gx[0]];
            (conv_params(node, n, woff, 0, 0), bufs)
        };
        let c = Consts::conv(r, false, io.acc[0]);
        let grid = Grid::Threads(kernels::conv_backward_data_threads(
            n, d.cin, d.h, d.w, d.stride,
        ));
        push_conv(
            p,
            Kernel::ConvBackwardData,
            c,
            &pr,
            bufs,
            grid,
            d.dilation,
            wt,
        );
    }
    // The weight block: Σ R(gy)·x + Σ gy·ẋ (ẋ may be zero).
    let pair_b = r && !io.dx_zero[0];
    let parts = p.partials;
    let bufs = if pair_b {
        vec![gy, x, g, io.dx[0], parts]
    } else {
        vec![gy, x, gy, x, parts]
    };
    push_weight_grad(p, node, woff, bufs, pair_b, target, wt);
    if let Some(b) = bias {
        let boff = p.param_off(b);
        let plane = node.out_shape.spatial();
        p.channel_sums(gy, None, n, d.cout, plane, target, boff, 0, true);
    }
}

/// The weight gradient's two stages: partial sums of `bufs` (adjoint,
/// input, [second pair,] partials) by chunks of output rows, then their
/// sum added into `target` at `woff`.
pub(super) fn push_weight_grad(
    p: &mut Plan,
    node: &Node,
    woff: usize,
    bufs: Vec<usize>,
    pair_b: bool,
    target: usize,
    wt: bool,
) {
    let (n, d, parts) = (p.n, dims(node), p.partials);
    let (weights, per, chunks) = weight_split(node, n);
    let pr = ConvParams {
        rows_per_chunk: per as u32,
        chunks: chunks as u32,
        ..conv_params(node, n, woff, 0, 0)
    };
    let c = Consts::new(&[("PAIR_B", pair_b as u32)]);
    let (kernel, grid, c) = if d.direct() || wt {
        (
            Kernel::ConvDirectBackwardWeight,
            Grid::Threads(weights * chunks),
            c.with("DIL", d.dilation as u32).with("WT", wt as u32),
        )
    } else if p.conv_tiled {
        let taps = d.cin * d.k * d.k;
        let tile = p.conv_tile.for_rows(d.cout);
        let groups = tile.groups(d.cout, taps, chunks);
        let grid = Grid::Groups(groups);
        (Kernel::ConvTiledBackwardWeight, grid, tile.consts(c))
    } else {
        let kernel = kernels::conv_weight_variant(d.k, d.stride, d.ow);
        let groups = kernels::conv_weight_groups(d.cout, d.cin, d.k, chunks);
        (kernel, Grid::Groups(groups), c)
    };
    p.push_with(kernel, c, &pr, bufs, grid);
    p.push(
        Kernel::ConvWeightSum,
        &pr,
        vec![parts, target],
        Grid::Threads(weights),
    );
}

pub(super) fn forward_grid(node: &Node, n: usize) -> Grid {
    let d = dims(node);
    Grid::Threads(kernels::conv_forward_threads(n, d.cout, d.oh, d.ow))
}

/// (weights, rows per chunk, chunks) of a layer's weight gradient.
pub fn weight_split(node: &Node, n: usize) -> (usize, usize, usize) {
    let d = dims(node);
    let weights = d.weights();
    let (per, chunks) = kernels::conv_weight_chunks(n, d.oh, d.ow, weights);
    (weights, per, chunks)
}

/// The kernels' parameters for a batch of `n`.
pub(super) fn conv_params(
    node: &Node,
    n: usize,
    wa_off: usize,
    wb_off: usize,
    bias_off: usize,
) -> ConvParams {
    let d = dims(node);
    ConvParams {
        n: n as u32,
        cin: d.cin as u32,
        h: d.h as u32,
        w: d.w as u32,
        cout: d.cout as u32,
        k: d.k as u32,
        stride: d.stride as u32,
        pad: d.pad as u32,
        oh: d.oh as u32,
        ow: d.ow as u32,
        wa_off: wa_off as u32,
        wb_off: wb_off as u32,
        bias_off: bias_off as u32,
        rows_per_chunk: 0,
        chunks: 0,
        groups: d.groups as u32,
    }
}

/// Pushes a conv forward or backward-data step (`push_conv_whole`); on a
/// plan that splits loops (CPU emulators) and a reduction past their loop
/// limit, as one dispatch per chunk of the reduced channels
/// (src/layers/conv_split.rs: wgpu runs a pass's dispatches in order, so
/// each chunk adds to the sums the previous one finished).
#[allow(clippy::too_many_arguments)]
pub(super) fn push_conv(
    p: &mut Plan,
    kernel: Kernel,
    consts: Consts,
    pr: &ConvParams,
    buffers: Vec<usize>,
    grid: Grid,
    dilation: usize,
    wt: bool,
) {
    let spans = if p.split_loops && !p.conv_tiled {
        let (channels, taps) = conv_split::reduction(kernel, pr, dilation, wt);
        conv_split::spans(channels, taps)
    } else {
        vec![]
    };
    if spans.len() <= 1 {
        return push_conv_whole(p, kernel, consts, pr, buffers, grid, dilation, wt);
    }
    for (i, &(lo, hi)) in spans.iter().enumerate() {
        let c = conv_split::chunk_consts(consts, i, lo, hi);
        push_conv_whole(p, kernel, c, pr, buffers.clone(), grid, dilation, wt);
    }
}

/// Pushes a conv forward or backward-data step, reading the layer's
/// weights (and bias) through one uniform window of θ/v where they fit in
/// it: the offsets in `pr` become relative to the window. A grouped or
/// dilated layer runs conv_direct.wgsl's kernel instead, on a thread per
/// output (forward) or input (backward data) element.
#[allow(clippy::too_many_arguments)]
fn push_conv_whole(
    p: &mut Plan,
    kernel: Kernel,
    consts: Consts,
    pr: &ConvParams,
    buffers: Vec<usize>,
    grid: Grid,
    dilation: usize,
    wt: bool,
) {
    if wt || kernels::conv_direct_applies(pr.groups as usize, dilation) {
        let (direct, elements) = match kernel {
            Kernel::ConvForward => (Kernel::ConvDirectForward, pr.cout * pr.oh * pr.ow),
            _ => (Kernel::ConvDirectBackwardData, pr.cin * pr.h * pr.w),
        };
        let grid = Grid::Threads((pr.n * elements) as usize);
        let consts = consts.with("DIL", dilation as u32).with("WT", wt as u32);
        return p.push_with(direct, consts, pr, buffers, grid);
    }
    if p.conv_tiled {
        // The tiled kernels read the weights from storage.
        let (tiled, m, cols) = match kernel {
            Kernel::ConvForward => (Kernel::ConvTiledForward, pr.cout, pr.oh * pr.ow),
            _ => (Kernel::ConvTiledBackwardData, pr.cin, pr.h * pr.w),
        };
        let tile = p.conv_tile.for_rows(m as usize);
        let groups = tile.groups(m as usize, (pr.n * cols) as usize, 1);
        return p.push_with(
            tiled,
            tile.consts(consts),
            pr,
            buffers,
            Grid::Groups(groups),
        );
    }
    let (k, s) = (pr.k as usize, pr.stride as usize);
    let storage = kernels::conv_variant_via(kernel, k, s, WeightsVia::Storage);
    let Some(align) = p.window_alignment else {
        return p.push_with(storage, consts, pr, buffers, grid);
    };
    // In a block product's R-pass the second pair's weights are each
    // tangent's slice of v, which a window cannot select: only θ (the
    // first pair's, when it is θ) goes through one.
    let half = p.in_block();
    if half && buffers[1] != p.theta {
        return p.push_with(storage, consts, pr, buffers, grid);
    }
    let weights = (pr.cin * pr.cout * pr.k * pr.k) as usize; // dense: groups 1
    let (woff, boff) = (pr.wa_off as usize, pr.bias_off as usize);
    let mut lo = woff;
    let mut hi = woff + weights;
    let bias = consts.get("BIAS") == Some(1);
    if bias && !half {
        lo = lo.min(boff);
        hi = hi.max(boff + pr.cout as usize);
    }
    let start = lo / align * align;
    if hi - start > kernels::WINDOW_FLOATS {
        return p.push_with(storage, consts, pr, buffers, grid);
    }
    let rel = |x: usize| (x - start) as u32;
    let pr = if half {
        // The bias, if any, is v's: read from storage with the second pair.
        ConvParams {
            wa_off: rel(woff),
            ..*pr
        }
    } else {
        ConvParams {
            wa_off: rel(woff),
            // The second pair's weights share the first's offset (θ and v
            // have one layout); without a second pair they are read and
            // zeroed.
            wb_off: rel(woff),
            bias_off: if bias { rel(boff) } else { 0 },
            ..*pr
        }
    };
    let via = if half {
        WeightsVia::HalfWindows
    } else {
        WeightsVia::Windows
    };
    let windowed = kernels::conv_variant_via(kernel, k, s, via);
    p.push_windowed(windowed, consts, &pr, buffers, grid, start);
}

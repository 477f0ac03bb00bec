//! The GPU executor: the model lowered to three programs per batch —
//! forward + loss + backward (gradient), and R-forward + R-loss +
//! R-backward (Hv) — each one command buffer with no host work between
//! layers. Activations, adjoints and batch statistics do not depend on v,
//! so while they fit in the cache budget every batch keeps its own
//! workspace and an HVP runs only the R program.

use crate::data::Dataset;
use crate::engine::{BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::gpu::context::{GpuBuffer, GpuContext};
use crate::gpu::kernels::{self, bn_rows, flags, params, Kernel};
use crate::gpu::program::{Compiled, Grid, Step};
use crate::model::{Model, Node, Op};
use crate::ops::bn::EPS;

/// Wall seconds per dispatched kernel, in program order.
pub type KernelTimes = Vec<(Kernel, f64)>;

/// Bytes of per-batch state kept resident for reuse by every HVP.
pub const CACHE_BUDGET_BYTES: usize = 2 << 30;

/// Buffers of one batch's passes, by value id (after flatten aliasing) or node.
struct Workspace {
    labels: usize,
    probs: usize,
    sample_loss: usize,
    act: Vec<usize>,
    dact: Vec<usize>,
    adj: Vec<usize>,
    radj: Vec<usize>,
    xhat: Vec<Option<usize>>,
    xhd: Vec<Option<usize>>,
    stats: Vec<Option<usize>>,
    arg: Vec<Option<usize>>,
    /// The batch whose forward/backward results the buffers hold.
    resident: Option<usize>,
}

struct BatchProgram {
    ws: usize,
    start: usize,
    count: usize,
    forward_backward: Compiled,
    r_pass: Compiled,
}

pub struct GpuEngine {
    ctx: GpuContext,
    model: Model,
    data: Dataset,
    bn: BnMode,
    arena: Vec<GpuBuffer>,
    #[allow(dead_code)]
    theta: usize,
    v: usize,
    grad: usize,
    hv: usize,
    losses: usize,
    workspaces: Vec<Workspace>,
    programs: Vec<BatchProgram>,
    /// Canonical buffer value of every value (flatten aliases its input).
    canon: Vec<usize>,
}

fn conv_dims(node: &Node) -> [u32; 10] {
    match node.op {
        Op::Conv {
            cin,
            cout,
            k,
            stride,
            pad,
            ..
        } => [
            0,
            cin as u32,
            node.in_shape.h as u32,
            node.in_shape.w as u32,
            cout as u32,
            k as u32,
            stride as u32,
            pad as u32,
            node.out_shape.h as u32,
            node.out_shape.w as u32,
        ],
        Op::Linear { din, dout, .. } => [0, din as u32, 1, 1, dout as u32, 1, 1, 0, 1, 1],
        _ => unreachable!("conv_dims on {}", node.kind()),
    }
}

fn conv_forward_grid(node: &Node, n: usize) -> Grid {
    let d = conv_dims(node);
    Grid::Threads(kernels::conv_forward_threads(
        n,
        d[4] as usize,
        d[8] as usize,
        d[9] as usize,
    ))
}

fn conv_backward_data_grid(node: &Node, n: usize) -> Grid {
    let d = conv_dims(node);
    Grid::Threads(kernels::conv_backward_data_threads(
        n,
        d[1] as usize,
        d[2] as usize,
        d[3] as usize,
        d[6] as usize,
    ))
}

/// (weights, rows per chunk, chunks) of a conv's weight gradient.
fn conv_weight_split(node: &Node, n: usize) -> (usize, usize, usize) {
    let d = conv_dims(node);
    let weights = (d[4] * d[1] * d[5] * d[5]) as usize;
    let (per, chunks) = kernels::conv_weight_chunks(n, d[8] as usize, d[9] as usize, weights);
    (weights, per, chunks)
}

/// ConvParams: dims, then wa_off, wb_off, flags, bias_off.
fn conv_params(
    node: &Node,
    n: usize,
    wa_off: usize,
    wb_off: usize,
    fl: u32,
    bias_off: usize,
) -> [u32; 16] {
    let mut d = conv_dims(node);
    d[0] = n as u32;
    let mut w = d.to_vec();
    w.extend([wa_off as u32, wb_off as u32, fl, bias_off as u32]);
    params(&w)
}

struct Builder<'a> {
    model: &'a Model,
    ws: &'a Workspace,
    canon: &'a [usize],
    count: usize,
    #[allow(dead_code)]
    theta: usize,
    v: usize,
    grad: usize,
    hv: usize,
    dummy: usize,
    /// Scratch for the weight gradient's per-chunk partial sums.
    partials: usize,
    batch_mode: bool,
    /// The alignment (floats) of uniform weight windows, where the device
    /// allows them.
    window_alignment: Option<usize>,
    steps: Vec<Step>,
}

impl Builder<'_> {
    fn push(&mut self, kernel: Kernel, p: [u32; 16], buffers: Vec<usize>, grid: Grid) {
        self.steps.push(Step {
            kernel,
            params: p,
            buffers,
            grid,
            window: 0,
        });
    }

    /// Pushes a conv forward or backward-data step, reading the layer's
    /// weights (and bias) through one uniform window of θ/v where they fit
    /// in it: the offsets in `p` become relative to the window.
    fn push_conv(&mut self, kernel: Kernel, mut p: [u32; 16], buffers: Vec<usize>, grid: Grid) {
        let (k, s) = (p[5] as usize, p[6] as usize);
        let windowed = kernels::conv_variant(kernel, k, s, true);
        let kernel = kernels::conv_variant(kernel, k, s, false);
        let Some(align) = self.window_alignment else {
            return self.push(kernel, p, buffers, grid);
        };
        let weights = (p[1] * p[4] * p[5] * p[5]) as usize;
        let (woff, boff) = (p[10] as usize, p[13] as usize);
        let mut lo = woff;
        let mut hi = woff + weights;
        let bias = matches!(kernel, Kernel::ConvForward | Kernel::ConvForwardK3)
            && p[12] & flags::CONV_BIAS != 0;
        if bias {
            lo = lo.min(boff);
            hi = hi.max(boff + p[4] as usize);
        }
        let start = lo / align * align;
        if hi - start > kernels::WINDOW_FLOATS {
            return self.push(kernel, p, buffers, grid);
        }
        let rel = |x: usize| (x - start) as u32;
        p[10] = rel(woff);
        // The second pair's weights share the first's offset (θ and v have
        // one layout); without a second pair they are read and zeroed.
        p[11] = rel(woff);
        p[13] = if bias { rel(boff) } else { 0 };
        self.steps.push(Step {
            kernel: windowed,
            params: p,
            buffers,
            grid,
            window: start,
        });
    }
    fn param_off(&self, idx: usize) -> usize {
        self.model.params[idx].offset
    }
    /// The conv flag and offset of an optional bias parameter.
    fn bias_flag(&self, bias: Option<usize>) -> (u32, usize) {
        match bias {
            Some(b) => (flags::CONV_BIAS, self.param_off(b)),
            None => (0, 0),
        }
    }
    fn copy(
        &mut self,
        src: usize,
        src_off: usize,
        dst: usize,
        dst_off: usize,
        len: usize,
        acc: bool,
    ) {
        let fl = if acc { flags::EW_ACC } else { 0 };
        let d = self.dummy;
        self.push(
            Kernel::Copy,
            params(&[len as u32, src_off as u32, dst_off as u32, fl]),
            vec![src, d, dst],
            Grid::Threads(len),
        );
    }
    #[allow(clippy::too_many_arguments)]
    fn channel_sums(
        &mut self,
        a: usize,
        b: Option<usize>,
        n: usize,
        c: usize,
        hw: usize,
        out: usize,
        out_a: usize,
        out_b: usize,
        acc: bool,
    ) {
        let mut fl = if acc { flags::SUMS_ACC } else { 0 };
        if b.is_some() {
            fl |= flags::SUMS_HAS_B;
        }
        let d = self.dummy;
        self.push(
            Kernel::ChannelSums,
            params(&[
                n as u32,
                c as u32,
                hw as u32,
                out_a as u32,
                out_b as u32,
                fl,
            ]),
            vec![a, b.unwrap_or(d), out],
            Grid::Groups(c),
        );
    }

    /// Forward, loss and backward of one batch; `batch` indexes the loss slot.
    fn forward_backward(&mut self, batch: usize, losses: usize, labels: usize) {
        let ws = self.ws;
        let n = self.count;
        let nodes = &self.model.nodes;
        for (i, node) in nodes.iter().enumerate() {
            let out = ws.act[self.canon[i + 1]];
            let x = ws.act[self.canon[node.inputs[0]]];
            match node.op {
                Op::Conv { weight, bias, .. } | Op::Linear { weight, bias, .. } => {
                    let (fl, boff) = self.bias_flag(bias);
                    let p = conv_params(node, n, self.param_off(weight), 0, fl, boff);
                    self.push_conv(
                        Kernel::ConvForward,
                        p,
                        vec![x, self.theta, x, self.theta, out],
                        conv_forward_grid(node, n),
                    );
                }
                Op::BatchNorm { gamma, beta, c, .. } => {
                    let stats = ws.stats[i].unwrap();
                    let hw = node.in_shape.spatial();
                    let bp = self.bn_params(n, c, hw, gamma, beta, 0);
                    if self.batch_mode {
                        self.push(Kernel::BnStats, bp, vec![x, stats], Grid::Groups(c));
                    }
                    self.push(
                        Kernel::BnForward,
                        bp,
                        vec![x, stats, self.theta, ws.xhat[i].unwrap(), out],
                        Grid::Threads(kernels::bn_threads(n, c, hw)),
                    );
                }
                Op::Relu => {
                    let len = n * node.out_shape.numel();
                    self.push(
                        Kernel::ReluMask,
                        params(&[len as u32, 0, 0, 0]),
                        vec![x, x, out],
                        Grid::Threads(len),
                    );
                }
                Op::MaxPool { .. } => {
                    let p = self.pool_params(node, 0);
                    self.push(
                        Kernel::MaxPoolForward,
                        p,
                        vec![x, out, ws.arg[i].unwrap()],
                        Grid::Threads(n * node.out_shape.numel()),
                    );
                }
                Op::GlobalAvgPool => {
                    let p = self.pool_params(node, 0);
                    self.push(
                        Kernel::GapForward,
                        p,
                        vec![x, out],
                        Grid::Threads(n * node.in_shape.c),
                    );
                }
                Op::Flatten => {}
                Op::Add => {
                    let b = ws.act[self.canon[node.inputs[1]]];
                    let len = n * node.out_shape.numel();
                    self.push(
                        Kernel::Add,
                        params(&[len as u32, 0, 0, 0]),
                        vec![x, b, out],
                        Grid::Threads(len),
                    );
                }
            }
        }
        // Loss and its gradient.
        let last = self.canon[nodes.len()];
        let k = self.model.classes;
        self.push(
            Kernel::XentForwardBackward,
            params(&[n as u32, k as u32, 0, 0]),
            vec![ws.act[last], labels, ws.probs, ws.sample_loss, ws.adj[last]],
            Grid::Threads(n),
        );
        self.push(
            Kernel::SumAll,
            params(&[0, 0, 0, batch as u32, 0, 0, n as u32, 0]),
            vec![ws.sample_loss, self.dummy, losses],
            Grid::Groups(1),
        );
        self.backward();
    }

    fn bn_params(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        gamma: usize,
        beta: usize,
        fl: u32,
    ) -> [u32; 16] {
        let mut fl = fl;
        if self.batch_mode {
            fl |= flags::BN_BATCH;
        }
        params(&[
            n as u32,
            c as u32,
            hw as u32,
            self.param_off(gamma) as u32,
            self.param_off(beta) as u32,
            fl,
            (EPS as f32).to_bits(),
        ])
    }

    fn pool_params(&self, node: &Node, fl: u32) -> [u32; 16] {
        let s = node.in_shape;
        let o = node.out_shape;
        let (k, stride, pad) = match node.op {
            Op::MaxPool { k, stride, pad } => (k, stride, pad),
            _ => (0, 0, 0),
        };
        params(&[
            (self.count * s.c) as u32,
            s.h as u32,
            s.w as u32,
            k as u32,
            stride as u32,
            pad as u32,
            o.h as u32,
            o.w as u32,
            fl,
        ])
    }

    /// Backward (rgrad = false) or R-backward (true) over the nodes in reverse.
    fn backward_pass(&mut self, r: bool) {
        let ws = self.ws;
        let n = self.count;
        let nodes = &self.model.nodes;
        let nv = nodes.len() + 1;
        let mut written = vec![false; nv];
        written[self.canon[nodes.len()]] = true;
        let adj_of = |v: usize| if r { ws.radj[v] } else { ws.adj[v] };
        for (i, node) in nodes.iter().enumerate().rev() {
            let cout = self.canon[i + 1];
            let gy = adj_of(cout);
            let g_plain = ws.adj[cout];
            let cin = self.canon[node.inputs[0]];
            let gx = adj_of(cin);
            let x = ws.act[cin];
            let acc = written[cin];
            let needs_gx = cin != 0;
            let target = if r { self.hv } else { self.grad };
            match node.op {
                Op::Conv {
                    weight,
                    bias,
                    cout: co,
                    ..
                }
                | Op::Linear {
                    weight,
                    bias,
                    dout: co,
                    ..
                } => {
                    let woff = self.param_off(weight);
                    let plane = node.out_shape.spatial();
                    if needs_gx {
                        let fl = if acc { flags::CONV_ACC } else { 0 };
                        let p = if r {
                            conv_params(node, n, woff, woff, fl | flags::CONV_PAIR_B, 0)
                        } else {
                            conv_params(node, n, woff, 0, fl, 0)
                        };
                        let bufs = if r {
                            vec![gy, self.theta, g_plain, self.v, gx]
                        } else {
                            vec![gy, self.theta, gy, self.theta, gx]
                        };
                        self.push_conv(
                            Kernel::ConvBackwardData,
                            p,
                            bufs,
                            conv_backward_data_grid(node, n),
                        );
                    }
                    // Hv's weight block: Σ R(gy)·x + Σ gy·ẋ (ẋ = 0 at the input).
                    let pair_b = r && cin != 0;
                    let fl = if pair_b { flags::CONV_PAIR_B } else { 0 };
                    let (weights, per, chunks) = conv_weight_split(node, n);
                    let mut p = conv_params(node, n, woff, 0, fl, 0);
                    p[14] = per as u32;
                    p[15] = chunks as u32;
                    let parts = self.partials;
                    let bufs = if pair_b {
                        vec![gy, x, g_plain, ws.dact[cin], parts]
                    } else {
                        vec![gy, x, gy, x, parts]
                    };
                    let d = conv_dims(node);
                    let kernel =
                        kernels::conv_weight_variant(d[5] as usize, d[6] as usize, d[9] as usize);
                    self.push(
                        kernel,
                        p,
                        bufs,
                        Grid::Groups(kernels::conv_weight_groups(
                            d[4] as usize,
                            d[1] as usize,
                            d[5] as usize,
                            chunks,
                        )),
                    );
                    let d = self.dummy;
                    self.push(
                        Kernel::ConvWeightSum,
                        p,
                        vec![parts, d, d, d, target],
                        Grid::Threads(weights),
                    );
                    if let Some(b) = bias {
                        let boff = self.param_off(b);
                        self.channel_sums(gy, None, n, co, plane, target, boff, 0, true);
                    }
                }
                Op::BatchNorm { gamma, beta, c, .. } => {
                    let stats = ws.stats[i].unwrap();
                    let xhat = ws.xhat[i].unwrap();
                    let hw = node.in_shape.spatial();
                    let (goff, boff) = (self.param_off(gamma), self.param_off(beta));
                    let fl = if acc { flags::BN_ACC } else { 0 };
                    let bp = self.bn_params(n, c, hw, gamma, beta, fl);
                    // The statistics rows the input gradient needs, with γ's
                    // and β's gradient (or Hv) added into `target`: Σgy and
                    // Σgy·x̂; the R-pass's ΣR(gy), ΣR(gy)·x̂ and Σgy·x̂̇.
                    let d = self.dummy;
                    let (rows, (c2, d2), pair2) = if r {
                        let xhd = ws.xhd[i].unwrap();
                        (
                            [bn_rows::SUM_RGY, bn_rows::SUM_RGY_XHAT, bn_rows::SUM_GY_XHD],
                            (g_plain, xhd),
                            flags::SUMS_PAIR2,
                        )
                    } else {
                        ([bn_rows::SUM_GY, bn_rows::SUM_GY_XHAT, 0], (d, d), 0)
                    };
                    let p = params(&[
                        n as u32,
                        c as u32,
                        hw as u32,
                        (rows[0] * c) as u32,
                        (rows[1] * c) as u32,
                        pair2,
                        0,
                        (rows[2] * c) as u32,
                        boff as u32,
                        goff as u32,
                    ]);
                    self.push(
                        Kernel::BnParamSums,
                        p,
                        vec![gy, xhat, stats, c2, d2, target],
                        Grid::Groups(c),
                    );
                    let grid = Grid::Threads(kernels::bn_threads(n, c, hw));
                    if r {
                        let xhd = ws.xhd[i].unwrap();
                        self.push(
                            Kernel::BnRBackward,
                            bp,
                            vec![g_plain, gy, xhat, xhd, stats, self.theta, self.v, gx],
                            grid,
                        );
                    } else {
                        self.push(
                            Kernel::BnBackward,
                            bp,
                            vec![gy, xhat, stats, self.theta, gx],
                            grid,
                        );
                    }
                }
                Op::Relu => {
                    let len = n * node.out_shape.numel();
                    let fl = if acc { flags::EW_ACC } else { 0 };
                    self.push(
                        Kernel::ReluMask,
                        params(&[len as u32, 0, 0, fl]),
                        vec![x, gy, gx],
                        Grid::Threads(len),
                    );
                }
                Op::MaxPool { .. } => {
                    let fl = if acc { flags::POOL_ACC } else { 0 };
                    let p = self.pool_params(node, fl);
                    self.push(
                        Kernel::MaxPoolBackward,
                        p,
                        vec![gy, ws.arg[i].unwrap(), gx],
                        Grid::Threads(n * node.in_shape.numel()),
                    );
                }
                Op::GlobalAvgPool => {
                    let fl = if acc { flags::POOL_ACC } else { 0 };
                    let p = self.pool_params(node, fl);
                    self.push(
                        Kernel::GapBackward,
                        p,
                        vec![gy, gx],
                        Grid::Threads(n * node.in_shape.numel()),
                    );
                }
                Op::Flatten => continue,
                Op::Add => {
                    let len = n * node.out_shape.numel();
                    self.copy(gy, 0, gx, 0, len, acc);
                    written[cin] = true;
                    let c2 = self.canon[node.inputs[1]];
                    if c2 != 0 {
                        let acc2 = written[c2];
                        self.copy(gy, 0, adj_of(c2), 0, len, acc2);
                        written[c2] = true;
                    }
                    continue;
                }
            }
            if needs_gx {
                written[cin] = true;
            }
        }
    }

    fn backward(&mut self) {
        self.backward_pass(false);
    }

    /// R-forward, R-loss and R-backward of one batch.
    fn r_pass(&mut self) {
        let ws = self.ws;
        let n = self.count;
        let nodes = &self.model.nodes;
        // ẋ is zero at the input; track which values are still zero.
        let mut zero = vec![false; nodes.len() + 1];
        zero[0] = true;
        for (i, node) in nodes.iter().enumerate() {
            let cout = self.canon[i + 1];
            let cin = self.canon[node.inputs[0]];
            let out = ws.dact[cout];
            let dx = ws.dact[cin];
            let x = ws.act[cin];
            match node.op {
                Op::Conv { weight, bias, .. } | Op::Linear { weight, bias, .. } => {
                    let woff = self.param_off(weight);
                    let (bfl, boff) = self.bias_flag(bias);
                    // conv(ẋ, W) + conv(x, V) + v_bias; the first term
                    // drops while ẋ is zero.
                    let (p, bufs) = if zero[cin] {
                        (
                            conv_params(node, n, woff, 0, bfl, boff),
                            vec![x, self.v, x, self.v, out],
                        )
                    } else {
                        (
                            conv_params(node, n, woff, woff, bfl | flags::CONV_PAIR_B, boff),
                            vec![dx, self.theta, x, self.v, out],
                        )
                    };
                    self.push_conv(Kernel::ConvForward, p, bufs, conv_forward_grid(node, n));
                }
                Op::BatchNorm { gamma, beta, c, .. } => {
                    let stats = ws.stats[i].unwrap();
                    let xhat = ws.xhat[i].unwrap();
                    let hw = node.in_shape.spatial();
                    if self.batch_mode {
                        self.channel_sums(
                            dx,
                            Some(xhat),
                            n,
                            c,
                            hw,
                            stats,
                            bn_rows::SUM_DX * c,
                            bn_rows::SUM_XHAT_DX * c,
                            false,
                        );
                    }
                    let bp = self.bn_params(n, c, hw, gamma, beta, 0);
                    self.push(
                        Kernel::BnRForward,
                        bp,
                        vec![dx, xhat, stats, self.theta, self.v, ws.xhd[i].unwrap(), out],
                        Grid::Threads(kernels::bn_threads(n, c, hw)),
                    );
                }
                Op::Relu => {
                    let len = n * node.out_shape.numel();
                    self.push(
                        Kernel::ReluMask,
                        params(&[len as u32, 0, 0, 0]),
                        vec![x, dx, out],
                        Grid::Threads(len),
                    );
                }
                Op::MaxPool { .. } => {
                    let p = self.pool_params(node, 0);
                    self.push(
                        Kernel::MaxPoolGather,
                        p,
                        vec![dx, ws.arg[i].unwrap(), out],
                        Grid::Threads(n * node.out_shape.numel()),
                    );
                }
                Op::GlobalAvgPool => {
                    let p = self.pool_params(node, 0);
                    self.push(
                        Kernel::GapForward,
                        p,
                        vec![dx, out],
                        Grid::Threads(n * node.in_shape.c),
                    );
                }
                Op::Flatten => {
                    zero[cout] = zero[cin];
                    continue;
                }
                Op::Add => {
                    let c2 = self.canon[node.inputs[1]];
                    let len = n * node.out_shape.numel();
                    match (zero[cin], zero[c2]) {
                        (true, true) => {
                            zero[cout] = true;
                            continue;
                        }
                        (false, true) => self.copy(dx, 0, out, 0, len, false),
                        (true, false) => self.copy(ws.dact[c2], 0, out, 0, len, false),
                        (false, false) => self.push(
                            Kernel::Add,
                            params(&[len as u32, 0, 0, 0]),
                            vec![dx, ws.dact[c2], out],
                            Grid::Threads(len),
                        ),
                    }
                }
            }
            zero[cout] = false;
        }
        let last = self.canon[nodes.len()];
        let k = self.model.classes;
        self.push(
            Kernel::XentRBackward,
            params(&[n as u32, k as u32, 0, 0]),
            vec![ws.probs, ws.dact[last], ws.radj[last]],
            Grid::Threads(n),
        );
        self.backward_pass(true);
    }
}

impl GpuEngine {
    pub fn new(ctx: GpuContext, problem: &Problem) -> Result<GpuEngine> {
        Self::with_cache_budget(ctx, problem, CACHE_BUDGET_BYTES)
    }

    /// As `new`, keeping every batch's activations resident only while
    /// they take at most `budget` bytes; otherwise one workspace is shared
    /// and each HVP recomputes the forward and backward passes.
    pub fn with_cache_budget(
        ctx: GpuContext,
        problem: &Problem,
        budget: usize,
    ) -> Result<GpuEngine> {
        let model = problem.model.clone();
        let data = problem.data.clone();
        let batches = data.batches(problem.batch);
        let max_count = batches.iter().map(|b| b.1).max().unwrap_or(0);
        let nodes = &model.nodes;
        let nv = nodes.len() + 1;
        let mut canon: Vec<usize> = (0..nv).collect();
        for (i, node) in nodes.iter().enumerate() {
            if node.op == Op::Flatten {
                canon[i + 1] = canon[node.inputs[0]];
            }
        }
        let mut arena: Vec<GpuBuffer> = vec![];
        let alloc = |arena: &mut Vec<GpuBuffer>, name: String, len: usize| -> Result<usize> {
            arena.push(ctx.storage(&name, len)?);
            Ok(arena.len() - 1)
        };
        let np = model.n_params;
        arena.push(ctx.weights("parameters θ", np)?);
        let theta = arena.len() - 1;
        arena.push(ctx.weights("direction v", np)?);
        let v = arena.len() - 1;
        let grad = alloc(&mut arena, "gradient".into(), np)?;
        let hv = alloc(&mut arena, "Hv".into(), np)?;
        let losses = alloc(&mut arena, "batch losses".into(), batches.len())?;
        let dummy = alloc(&mut arena, "unused binding".into(), 4)?;
        let partial_len = nodes
            .iter()
            .filter(|nd| matches!(nd.op, Op::Conv { .. } | Op::Linear { .. }))
            .map(|nd| {
                let (w, _, c) = conv_weight_split(nd, max_count);
                w * c
            })
            .max()
            .unwrap_or(1);
        let partials = alloc(
            &mut arena,
            "weight-gradient partial sums".into(),
            partial_len,
        )?;
        let theta_f32: Vec<f32> = problem.weights.theta.iter().map(|&x| x as f32).collect();
        // Refused here, not left to propagate: a kernel's result from an
        // infinite weight is the driver's business (llvmpipe's uniform
        // reads, for one, do not carry it through).
        non_finite_error(&model, "the weights", &theta_f32, &ctx.info.name)?;
        ctx.write_f32(&arena[theta], 0, &theta_f32)?;

        let value_len = |v: usize| {
            let s = if v == 0 {
                model.input
            } else {
                nodes[v - 1].out_shape
            };
            max_count * s.numel()
        };
        let mut ws_bytes = 0usize;
        for (vi, &c) in canon.iter().enumerate() {
            if c == vi {
                ws_bytes += 4 * 4 * value_len(vi);
            }
        }
        for node in nodes {
            if let Op::BatchNorm { .. } = node.op {
                ws_bytes += 2 * 4 * max_count * node.in_shape.numel();
            }
        }
        let n_ws = if ws_bytes * batches.len() <= budget {
            batches.len()
        } else {
            1
        };
        let batch_mode = problem.bn == BnMode::Batch;
        let mut workspaces = vec![];
        for w in 0..n_ws {
            let tag = if n_ws > 1 {
                format!(" (batch {w})")
            } else {
                String::new()
            };
            let value_name = |vi: usize| -> String {
                if vi == 0 {
                    "input".to_string()
                } else {
                    let nd = &nodes[vi - 1];
                    if nd.name.is_empty() {
                        format!("{} output #{vi}", nd.kind())
                    } else {
                        format!("{} output", nd.name)
                    }
                }
            };
            let mut act = vec![usize::MAX; nv];
            let mut dact = vec![usize::MAX; nv];
            let mut adj = vec![usize::MAX; nv];
            let mut radj = vec![usize::MAX; nv];
            for vi in 0..nv {
                if canon[vi] != vi {
                    continue;
                }
                let len = value_len(vi);
                let nm = value_name(vi);
                act[vi] = alloc(&mut arena, format!("{nm}{tag}"), len)?;
                dact[vi] = alloc(&mut arena, format!("R-forward of {nm}{tag}"), len)?;
                adj[vi] = alloc(&mut arena, format!("adjoint of {nm}{tag}"), len)?;
                radj[vi] = alloc(&mut arena, format!("R-adjoint of {nm}{tag}"), len)?;
            }
            let mut xhat = vec![None; nodes.len()];
            let mut xhd = vec![None; nodes.len()];
            let mut stats = vec![None; nodes.len()];
            let mut arg = vec![None; nodes.len()];
            for (i, node) in nodes.iter().enumerate() {
                match node.op {
                    Op::BatchNorm {
                        c,
                        running_mean,
                        running_var,
                        ..
                    } => {
                        let len = max_count * node.in_shape.numel();
                        xhat[i] = Some(alloc(&mut arena, format!("{} x̂{tag}", node.name), len)?);
                        xhd[i] = Some(alloc(&mut arena, format!("{} R(x̂){tag}", node.name), len)?);
                        let s = alloc(
                            &mut arena,
                            format!("{} statistics{tag}", node.name),
                            bn_rows::COUNT * c,
                        )?;
                        if !batch_mode {
                            let (m, inv) = crate::ops::bn::running_stats(
                                &problem.weights.buffers[running_mean],
                                &problem.weights.buffers[running_var],
                            );
                            let rows: Vec<f32> = m.iter().chain(&inv).map(|&x| x as f32).collect();
                            ctx.write_f32(&arena[s], 0, &rows)?;
                        }
                        stats[i] = Some(s);
                    }
                    Op::MaxPool { .. } => {
                        let len = max_count * node.out_shape.numel();
                        arg[i] = Some(alloc(
                            &mut arena,
                            format!("{} argmax{tag}", node.name),
                            len,
                        )?);
                    }
                    _ => {}
                }
            }
            let k = model.classes;
            let labels = alloc(&mut arena, format!("labels{tag}"), max_count)?;
            let probs = alloc(&mut arena, format!("softmax{tag}"), max_count * k)?;
            let sample_loss = alloc(&mut arena, format!("per-sample loss{tag}"), max_count)?;
            workspaces.push(Workspace {
                labels,
                probs,
                sample_loss,
                act,
                dact,
                adj,
                radj,
                xhat,
                xhd,
                stats,
                arg,
                resident: None,
            });
        }

        let scale = 1.0 / data.len() as f32;
        let mut programs = vec![];
        for (bi, &(start, count)) in batches.iter().enumerate() {
            let w = bi % n_ws;
            let mut b = Builder {
                model: &model,
                ws: &workspaces[w],
                canon: &canon,
                count,
                theta,
                v,
                grad,
                hv,
                dummy,
                partials,
                batch_mode,
                window_alignment: ctx.windows_supported().then(|| ctx.window_alignment()),
                steps: vec![],
            };
            let labels = workspaces[w].labels;
            b.forward_backward(bi, losses, labels);
            let mut fb = std::mem::take(&mut b.steps);
            b.r_pass();
            let mut rp = std::mem::take(&mut b.steps);
            for s in fb.iter_mut().chain(rp.iter_mut()) {
                if matches!(
                    s.kernel,
                    Kernel::XentForwardBackward | Kernel::XentRBackward
                ) {
                    s.params[2] = scale.to_bits();
                }
            }
            let forward_backward =
                Compiled::build(&ctx, &format!("batch {bi} forward/backward"), &fb, &arena)?;
            let r_pass = Compiled::build(&ctx, &format!("batch {bi} R-pass"), &rp, &arena)?;
            programs.push(BatchProgram {
                ws: w,
                start,
                count,
                forward_backward,
                r_pass,
            });
        }
        let mut e = GpuEngine {
            ctx,
            model,
            data,
            bn: problem.bn,
            arena,
            theta,
            v,
            grad,
            hv,
            losses,
            workspaces,
            programs,
            canon,
        };
        if n_ws == e.programs.len() {
            for bi in 0..e.programs.len() {
                e.upload_batch(bi)?;
            }
        }
        e.ctx.check()?;
        Ok(e)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    pub fn bn_mode(&self) -> BnMode {
        self.bn
    }

    /// How many batches keep their activations resident (1 = recomputed).
    pub fn cached_batches(&self) -> usize {
        if self.workspaces.len() == self.programs.len() {
            self.programs.len()
        } else {
            0
        }
    }

    /// Per-kernel wall times of the first batch's forward/backward and
    /// R-pass programs, each dispatch submitted and waited for alone.
    pub fn profile(&mut self) -> Result<(KernelTimes, KernelTimes)> {
        self.upload_batch(0)?;
        let p = &self.programs[0];
        let fb = p.forward_backward.profile(&self.ctx)?;
        let r = p.r_pass.profile(&self.ctx)?;
        self.workspaces[p.ws].resident = Some(0);
        Ok((fb, r))
    }

    fn upload_batch(&mut self, bi: usize) -> Result<()> {
        let p = &self.programs[bi];
        let ws = &self.workspaces[p.ws];
        let d = self.model.input.numel();
        let x = &self.data.x[p.start * d..(p.start + p.count) * d];
        let y = &self.data.y[p.start..p.start + p.count];
        self.ctx.write_f32(&self.arena[ws.act[0]], 0, x)?;
        self.ctx.write_u32(&self.arena[ws.labels], y)?;
        Ok(())
    }

    /// Submits `record` in one command buffer inside error scopes.
    fn submit(&self, what: &str, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        self.ctx.scoped(what, || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            record(&mut enc);
            self.ctx.queue.submit([enc.finish()]);
        })
    }

    /// Runs every batch's forward/backward (and with `r`, its R-pass),
    /// reusing resident batches for the R-pass.
    fn run(&mut self, grad: bool, r: bool) -> Result<()> {
        let (gb, hb, lb) = (self.grad, self.hv, self.losses);
        self.submit("clearing the accumulators", |enc| {
            if grad {
                enc.clear_buffer(&self.arena[gb].buffer, 0, None);
                enc.clear_buffer(&self.arena[lb].buffer, 0, None);
            }
            if r {
                enc.clear_buffer(&self.arena[hb].buffer, 0, None);
            }
        })?;
        for bi in 0..self.programs.len() {
            let w = self.programs[bi].ws;
            let resident = self.workspaces[w].resident == Some(bi);
            let need_fb = grad || !resident;
            if need_fb && self.workspaces.len() < self.programs.len() {
                self.upload_batch(bi)?;
            }
            let p = &self.programs[bi];
            self.submit(&format!("batch {bi}"), |enc| {
                if need_fb {
                    p.forward_backward.record(enc);
                }
                if r {
                    p.r_pass.record(enc);
                }
            })?;
            self.workspaces[w].resident = Some(bi);
        }
        Ok(())
    }

    fn check_finite(&self, what: &str, xs: &[f32]) -> Result<()> {
        non_finite_error(&self.model, what, xs, &self.ctx.info.name)
    }

    fn upload_v(&mut self, v: &[f64]) -> Result<()> {
        if v.len() != self.model.n_params {
            return Err(Error::Argument {
                flag: "--vector".into(),
                msg: format!("{} values for {} parameters", v.len(), self.model.n_params),
            });
        }
        let vf: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        self.check_finite("the direction v", &vf)?;
        self.ctx.write_f32(&self.arena[self.v], 0, &vf)
    }

    /// The ReLU masks (input > 0, in f32) per batch and node, as the GPU
    /// sees them: lets tests run the float64 reference with the same kinks.
    pub fn relu_masks(&mut self) -> Result<Vec<Vec<Vec<bool>>>> {
        let mut out = vec![];
        for bi in 0..self.programs.len() {
            let w = self.programs[bi].ws;
            if self.workspaces[w].resident != Some(bi) {
                if self.workspaces.len() < self.programs.len() {
                    self.upload_batch(bi)?;
                }
                let p = &self.programs[bi];
                self.submit(&format!("batch {bi}"), |enc| p.forward_backward.record(enc))?;
                self.workspaces[w].resident = Some(bi);
            }
            let count = self.programs[bi].count;
            let ws = &self.workspaces[w];
            let mut ranges = vec![];
            for node in &self.model.nodes {
                if node.op == Op::Relu {
                    let b = ws.act[self.canon[node.inputs[0]]];
                    ranges.push((&self.arena[b], 0, count * node.in_shape.numel()));
                }
            }
            let vals = self.ctx.read_f32(&ranges)?;
            let mut it = vals.into_iter();
            let masks = self
                .model
                .nodes
                .iter()
                .map(|n| {
                    if n.op == Op::Relu {
                        it.next().unwrap().iter().map(|x| *x > 0.0).collect()
                    } else {
                        vec![]
                    }
                })
                .collect();
            out.push(masks);
        }
        Ok(out)
    }

    fn read_loss_grad(&self) -> Result<(f64, Vec<f64>)> {
        let np = self.model.n_params;
        let nb = self.programs.len();
        let r = self.ctx.read_f32(&[
            (&self.arena[self.losses], 0, nb),
            (&self.arena[self.grad], 0, np),
        ])?;
        let loss: f64 = r[0].iter().map(|&x| x as f64).sum();
        if !loss.is_finite() {
            return Err(Error::Numerical(format!(
                "the loss is {loss} on {}: the weights or data overflow in float32",
                self.ctx.info.name
            )));
        }
        self.check_finite("the gradient", &r[1])?;
        Ok((loss, r[1].iter().map(|&x| x as f64).collect()))
    }
}

/// An error naming the first non-finite value of a parameter-shaped vector.
fn non_finite_error(model: &Model, what: &str, xs: &[f32], device: &str) -> Result<()> {
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        let name = model
            .params
            .iter()
            .find(|p| i >= p.offset && i < p.offset + p.numel())
            .map(|p| p.name.clone())
            .unwrap_or_default();
        return Err(Error::Numerical(format!(
            "{what} is {} at parameter {i} ({name}) on {device}: the weights, data or direction overflow in float32",
            xs[i]
        )));
    }
    Ok(())
}

impl Curvature for GpuEngine {
    fn n_params(&self) -> usize {
        self.model.n_params
    }

    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        self.run(true, false)?;
        self.read_loss_grad()
    }

    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.upload_v(v)?;
        self.run(false, true)?;
        let r = self
            .ctx
            .read_f32(&[(&self.arena[self.hv], 0, self.model.n_params)])?;
        self.check_finite("Hv", &r[0])?;
        out.iter_mut().zip(&r[0]).for_each(|(o, &x)| *o = x as f64);
        Ok(())
    }

    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        self.upload_v(v)?;
        self.run(true, true)?;
        let (loss, grad) = self.read_loss_grad()?;
        let r = self
            .ctx
            .read_f32(&[(&self.arena[self.hv], 0, self.model.n_params)])?;
        self.check_finite("Hv", &r[0])?;
        Ok((loss, grad, r[0].iter().map(|&x| x as f64).collect()))
    }

    fn backend(&self) -> String {
        self.ctx.info.backend.clone()
    }

    fn adapter(&self) -> String {
        self.ctx.info.name.clone()
    }
}

/// Opens the chosen backend's adapter and builds the engine for a problem.
pub fn open(
    problem: &Problem,
    choice: crate::gpu::BackendChoice,
    adapter: usize,
) -> Result<GpuEngine> {
    let ctx = GpuContext::open(choice, adapter)?;
    GpuEngine::new(ctx, problem)
}

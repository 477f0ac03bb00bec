//! Measuring instruments: kernel throughput at a model's layer shapes and
//! end-to-end gradient / HVP times. Every time is wall time around a
//! submission that is waited for (device synchronisation), the median of
//! several repetitions after a warm-up that compiles the pipeline.

use crate::engine::Curvature;
use crate::error::Result;
use crate::gpu::kernels::{
    self, bn_rows, ActParams, BnParams, Consts, ConvParams, ConvTile, EwParams, Kernel,
    KernelParams, ReduceParams,
};
use crate::gpu::program::{dispatch_timed, Grid};
use crate::gpu::reduce::{self, SplitParams};
use crate::gpu::{GpuBuffer, GpuContext};
use crate::model::{Model, Op};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelRow {
    pub kernel: String,
    /// Shape in words: `n=32 16→16 32x32 k3 s1`.
    pub shape: String,
    pub seconds: f64,
    /// `gpu-timestamps` where the adapter has them, else `host`.
    pub timer: &'static str,
    pub gflops: f64,
    pub gbs: f64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Median kernel time of `reps` runs after a warm-up: GPU timestamps
/// around the kernel's pass where the adapter has them, else host wall
/// time around the waited-for submission.
fn time_kernel<P: KernelParams>(
    ctx: &GpuContext,
    reps: usize,
    kern: Kernel,
    consts: Consts,
    p: &P,
    bufs: &[&GpuBuffer],
    grid: Grid,
) -> Result<(f64, &'static str)> {
    dispatch_timed(ctx, kern, consts, p, bufs, grid)?;
    let mut gpu = vec![];
    let mut host = vec![];
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        let t = dispatch_timed(ctx, kern, consts, p, bufs, grid)?;
        host.push(s.elapsed().as_secs_f64());
        if let Some(t) = t {
            gpu.push(t);
        }
    }
    if gpu.len() == host.len() {
        Ok((median(gpu), "gpu-timestamps"))
    } else {
        Ok((median(host), "host"))
    }
}

/// A per-channel reduction's time as the engine runs it
/// (`reduce::stages`): its one dispatch, or split at `span` elements per
/// segment the sum of its two (each timed as `time_kernel` does).
#[allow(clippy::too_many_arguments)]
fn time_reduction<P: SplitParams>(
    ctx: &GpuContext,
    reps: usize,
    kern: Kernel,
    consts: Consts,
    p: &P,
    bufs: &[&GpuBuffer],
    c: usize,
    count: usize,
    span: Option<usize>,
) -> Result<(f64, &'static str)> {
    let floats = reduce::partials_for(c, count, span);
    let partials = ctx.storage("bench reduction partials", floats)?;
    let split = span.map(|s| (s, &partials));
    let mut total = 0.0;
    let mut timer = "host";
    for st in reduce::stages(kern, consts, *p, bufs, c, count, split) {
        let (t, tm) = time_kernel(ctx, reps, kern, st.consts, &st.params, &st.buffers, st.grid)?;
        total += t;
        timer = tm;
    }
    Ok((total, timer))
}

/// Median wall time of `reps` runs of `f` after one warm-up run.
pub fn time_it(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = vec![];
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn filled(ctx: &GpuContext, name: &str, len: usize, seed: u32) -> Result<GpuBuffer> {
    fill(ctx, ctx.storage(name, len)?, len, seed)
}

/// Writes `len` deterministic values in [-0.5, 0.5) at the start of `b`.
fn fill(ctx: &GpuContext, b: GpuBuffer, len: usize, seed: u32) -> Result<GpuBuffer> {
    let data: Vec<f32> = (0..len)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32)
                - 0.5
        })
        .collect();
    ctx.write_f32(&b, 0, &data)?;
    Ok(b)
}

/// The distinct dense conv shapes of a model (groups 1, dilation 1: the
/// layers the timed kernels compute): (cin, cout, h, w, k, stride, pad, oh, ow).
pub fn conv_shapes(model: &Model) -> Vec<[usize; 9]> {
    let mut out: Vec<[usize; 9]> = vec![];
    for n in &model.nodes {
        if let Op::Conv {
            cin,
            cout,
            k,
            stride,
            pad,
            groups: 1,
            dilation: 1,
            ..
        } = n.op
        {
            let s = [
                cin,
                cout,
                n.in_shape.h,
                n.in_shape.w,
                k,
                stride,
                pad,
                n.out_shape.h,
                n.out_shape.w,
            ];
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// The kernel table as `hesscope bench` and `cargo bench` print it, columns
/// as wide as their longest entry.
pub fn format_kernel_table(rows: &[KernelRow]) -> String {
    let kw = rows
        .iter()
        .map(|r| r.kernel.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let sw = rows
        .iter()
        .map(|r| r.shape.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = format!(
        "  {} {} {:>10} {:>9} {:>8}  timer\n",
        pad("kernel", kw),
        pad("shape", sw),
        "ms",
        "GFLOP/s",
        "GB/s"
    );
    for r in rows {
        out += &format!(
            "  {} {} {:>10.3} {:>9.2} {:>8.2}  {}\n",
            pad(&r.kernel, kw),
            pad(&r.shape, sw),
            r.seconds * 1e3,
            r.gflops,
            r.gbs,
            r.timer
        );
    }
    out
}

/// A conv shape of `conv_shapes` at batch `n`: the kernels' parameters,
/// the FLOPs of one kernel (2·n·cout·oh·ow·cin·k²) and the table's label.
fn conv_geometry(n: usize, s: [usize; 9]) -> (ConvParams, f64, String) {
    let [cin, cout, h, w, k, stride, pad, oh, ow] = s;
    let p = ConvParams {
        n: n as u32,
        cin: cin as u32,
        h: h as u32,
        w: w as u32,
        cout: cout as u32,
        k: k as u32,
        stride: stride as u32,
        pad: pad as u32,
        oh: oh as u32,
        ow: ow as u32,
        ..Default::default()
    };
    let flops = 2.0 * (n * cout * oh * ow * cin * k * k) as f64;
    (
        p,
        flops,
        format!("n={n} {cin}→{cout} {h}x{w} k{k} s{stride}"),
    )
}

/// Throughput of the conv kernels at every conv shape of `model` at batch
/// `n`, and of batch norm and the elementwise kernels at its largest
/// activation.
pub fn kernel_table(
    ctx: &GpuContext,
    model: &Model,
    n: usize,
    reps: usize,
) -> Result<Vec<KernelRow>> {
    let mut rows = vec![];
    for s in conv_shapes(model) {
        let [cin, cout, h, w, k, stride, _, oh, ow] = s;
        let x = filled(ctx, "bench input", n * cin * h * w, 1)?;
        // The kernels the engine runs for this layer: weights through a
        // uniform window where they fit in one.
        let weights = cout * cin * k * k;
        let windowed = ctx.windows_supported() && weights <= kernels::WINDOW_FLOATS;
        let wt = if windowed {
            fill(ctx, ctx.weights("bench weights", weights)?, weights, 2)?
        } else {
            filled(ctx, "bench weights", weights, 2)?
        };
        let gy = filled(ctx, "bench adjoint", n * cout * oh * ow, 3)?;
        let y = ctx.storage("bench output", n * cout * oh * ow)?;
        let gx = ctx.storage("bench input adjoint", n * cin * h * w)?;
        let gw = ctx.storage("bench weight gradient", cout * cin * k * k)?;
        let (p, flops, shape) = conv_geometry(n, s);
        let io = |a: usize, b: usize, c: usize| 4.0 * (a + b + c) as f64;
        let cases: [(Kernel, [&GpuBuffer; 5], Grid, f64); 2] = [
            (
                kernels::conv_variant(Kernel::ConvForward, k, stride, windowed),
                [&x, &wt, &x, &wt, &y],
                Grid::Threads(kernels::conv_forward_threads(n, cout, oh, ow)),
                io(x.len, wt.len, y.len),
            ),
            (
                kernels::conv_variant(Kernel::ConvBackwardData, k, stride, windowed),
                [&gy, &wt, &gy, &wt, &gx],
                Grid::Threads(kernels::conv_backward_data_threads(n, cin, h, w, stride)),
                io(gy.len, wt.len, gx.len),
            ),
        ];
        for (kern, bufs, grid, bytes) in cases {
            let (t, timer) = time_kernel(ctx, reps, kern, Consts::default(), &p, &bufs, grid)?;
            let suffix = if windowed { " (uniform weights)" } else { "" };
            rows.push(KernelRow {
                kernel: format!("{}{suffix}", kern.entry()),
                shape: shape.clone(),
                seconds: t,
                timer,
                gflops: flops / t / 1e9,
                gbs: bytes / t / 1e9,
            });
        }
        // The weight gradient: per-chunk partial sums, then their sum.
        let wkernel = kernels::conv_weight_variant(k, stride, ow);
        let (per, chunks) = kernels::conv_weight_chunks(n, oh, ow, weights);
        let parts = ctx.storage("bench partial sums", weights * chunks)?;
        let pw = ConvParams {
            rows_per_chunk: per as u32,
            chunks: chunks as u32,
            ..p
        };
        let (t1, timer) = time_kernel(
            ctx,
            reps,
            wkernel,
            Consts::default(),
            &pw,
            &[&gy, &x, &gy, &x, &parts],
            Grid::Groups(kernels::conv_weight_groups(cout, cin, k, chunks)),
        )?;
        let (t2, _) = time_kernel(
            ctx,
            reps,
            Kernel::ConvWeightSum,
            Consts::default(),
            &pw,
            &[&parts, &gw],
            Grid::Threads(weights),
        )?;
        let t = t1 + t2;
        rows.push(KernelRow {
            kernel: format!("{} + conv_weight_sum", wkernel.entry()),
            shape: shape.clone(),
            seconds: t,
            timer,
            gflops: flops / t / 1e9,
            gbs: io(gy.len, x.len, gw.len) / t / 1e9,
        });
    }
    // Batch norm and elementwise kernels at the largest activation.
    let biggest = model
        .nodes
        .iter()
        .filter(|nd| matches!(nd.op, Op::BatchNorm { .. }))
        .max_by_key(|nd| nd.in_shape.numel());
    let (c, hw) = match biggest {
        Some(nd) => (nd.in_shape.c, nd.in_shape.spatial()),
        None => (model.input.c, model.input.spatial()),
    };
    let len = n * c * hw;
    let shape = format!("n={n} c={c} {hw} px");
    let x = filled(ctx, "bench activation", len, 4)?;
    let g = filled(ctx, "bench adjoint", len, 5)?;
    let theta = filled(ctx, "bench parameters", 2 * c, 6)?;
    let stats = ctx.storage("bench statistics", bn_rows::COUNT * c)?;
    let xhat = ctx.storage("bench x̂", len)?;
    let y = ctx.storage("bench output", len)?;
    let bp = BnParams {
        n: n as u32,
        c: c as u32,
        hw: hw as u32,
        gamma_off: 0,
        beta_off: c as u32,
        eps: 1e-5,
        ..Default::default()
    };
    let ew = EwParams {
        len: len as u32,
        ..Default::default()
    };
    let sums = ReduceParams {
        n: n as u32,
        c: c as u32,
        hw: hw as u32,
        out_a: 0,
        out_b: c as u32,
        ..Default::default()
    };
    let act = ActParams {
        len: len as u32,
        ..Default::default()
    };
    let relu = Consts::new(&[("ACT", 0), ("ACC", 0)]);
    let gelu = Consts::new(&[("ACT", 4), ("ACC", 0)]);
    let mb = |k: usize| 4.0 * (k * len) as f64;
    let bn_grid = Grid::Threads(kernels::bn_threads(n, c, hw));
    let none = Consts::default;
    let l = len as f64;
    let t = Grid::Threads(len);
    let mut row =
        |r: Result<(f64, &'static str)>, kern: Kernel, name: &str, bytes: f64, flops: f64| {
            r.map(|(t, timer)| {
                rows.push(KernelRow {
                    kernel: format!("{}{name}", kern.entry()),
                    shape: shape.clone(),
                    seconds: t,
                    timer,
                    gflops: flops / t / 1e9,
                    gbs: bytes / t / 1e9,
                })
            })
        };
    let (k1, k2, k3, k4) = (
        Kernel::BnStats,
        Kernel::BnForward,
        Kernel::ChannelSums,
        Kernel::BnBackward,
    );
    // The reductions whole (a workgroup per channel, the emulators' form)
    // and split in segments (GPUs', `ReducePath::Auto`).
    let split_name = format!(" (split {})", reduce::GPU_SPAN);
    for (span, name) in [(None, ""), (Some(reduce::GPU_SPAN), split_name.as_str())] {
        row(
            time_reduction(ctx, reps, k1, none(), &bp, &[&x, &stats], c, n * hw, span),
            k1,
            name,
            mb(2),
            3.0 * l,
        )?;
        row(
            time_reduction(
                ctx,
                reps,
                k3,
                Consts::new(&[("HAS_B", 1), ("ACC", 0)]),
                &sums,
                &[&g, &x, &stats],
                c,
                n * hw,
                span,
            ),
            k3,
            name,
            mb(2),
            3.0 * l,
        )?;
    }
    row(
        time_kernel(
            ctx,
            reps,
            k2,
            none(),
            &bp,
            &[&x, &stats, &theta, &xhat, &y],
            bn_grid,
        ),
        k2,
        "",
        mb(3),
        4.0 * l,
    )?;
    row(
        time_kernel(
            ctx,
            reps,
            k4,
            Consts::bn(true, false),
            &bp,
            &[&g, &xhat, &stats, &theta, &y],
            bn_grid,
        ),
        k4,
        "",
        mb(3),
        6.0 * l,
    )?;
    let kb = Kernel::ActBackward;
    row(
        time_kernel(ctx, reps, kb, relu, &act, &[&x, &g, &y], t),
        kb,
        " (relu)",
        mb(3),
        l,
    )?;
    row(
        time_kernel(ctx, reps, kb, gelu, &act, &[&x, &g, &y], t),
        kb,
        " (gelu)",
        mb(3),
        l,
    )?;
    row(
        time_kernel(ctx, reps, Kernel::Add, none(), &ew, &[&x, &g, &y], t),
        Kernel::Add,
        "",
        mb(3),
        l,
    )?;
    Ok(rows)
}

/// Throughput of the tiled conv kernels (shaders/conv_tiled.wgsl, the
/// engine's `ConvPath::Tiled`) at every conv shape of `model` at batch
/// `n`: forward, backward data, and the weight gradient's tiled stage one
/// plus conv_weight_sum, FLOPs counted as `kernel_table` counts them
/// (2·n·cout·oh·ow·cin·k² per kernel). On CPU emulators these numbers only
/// show that the kernels run: they are shaped for GPUs.
///
/// Each kernel runs at the tile the engine would choose (`tile` narrowed
/// by `ConvTile::for_rows`, marked `*`) and at every other tile of
/// `TILE_CANDIDATES`, so a run on a new adapter shows which to choose.
pub fn tiled_kernel_table(
    ctx: &GpuContext,
    model: &Model,
    n: usize,
    reps: usize,
    tile: ConvTile,
) -> Result<Vec<KernelRow>> {
    let mut rows = vec![];
    for s in conv_shapes(model) {
        let [cin, cout, h, w, k, _, _, oh, ow] = s;
        let weights = cout * cin * k * k;
        let x = filled(ctx, "bench input", n * cin * h * w, 1)?;
        let wt = filled(ctx, "bench weights", weights, 2)?;
        let gy = filled(ctx, "bench adjoint", n * cout * oh * ow, 3)?;
        let y = ctx.storage("bench output", n * cout * oh * ow)?;
        let gx = ctx.storage("bench input adjoint", n * cin * h * w)?;
        let gw = ctx.storage("bench weight gradient", weights)?;
        let (per, chunks) = kernels::conv_weight_chunks(n, oh, ow, weights);
        let parts = ctx.storage("bench partial sums", weights * chunks)?;
        let (p, flops, shape) = conv_geometry(n, s);
        let p = ConvParams {
            rows_per_chunk: per as u32,
            chunks: chunks as u32,
            ..p
        };
        let io = |a: usize, b: usize, c: usize| 4.0 * (a + b + c) as f64;
        // (kernel, buffers, GEMM rows m, columns, chunks, bytes)
        type Case<'a> = (Kernel, [&'a GpuBuffer; 5], usize, usize, usize, f64);
        let cases: [Case; 3] = [
            (
                Kernel::ConvTiledForward,
                [&x, &wt, &x, &wt, &y],
                cout,
                n * oh * ow,
                1,
                io(x.len, wt.len, y.len),
            ),
            (
                Kernel::ConvTiledBackwardData,
                [&gy, &wt, &gy, &wt, &gx],
                cin,
                n * h * w,
                1,
                io(gy.len, wt.len, gx.len),
            ),
            (
                Kernel::ConvTiledBackwardWeight,
                [&gy, &x, &gy, &x, &parts],
                cout,
                cin * k * k,
                chunks,
                io(gy.len, x.len, gw.len),
            ),
        ];
        for (kern, bufs, m, cols, ch, bytes) in cases {
            let chosen = tile.for_rows(m);
            let mut tiles = vec![chosen];
            tiles.extend(TILE_CANDIDATES.iter().copied().filter(|t| *t != chosen));
            for t_ in tiles {
                let (mut t, timer) = time_kernel(
                    ctx,
                    reps,
                    kern,
                    t_.consts(Consts::default()),
                    &p,
                    &bufs,
                    Grid::Groups(t_.groups(m, cols, ch)),
                )?;
                let mark = if t_ == chosen { "*" } else { "" };
                let mut name = format!("{} {t_}{mark}", kern.entry());
                if kern == Kernel::ConvTiledBackwardWeight {
                    let (t2, _) = time_kernel(
                        ctx,
                        reps,
                        Kernel::ConvWeightSum,
                        Consts::default(),
                        &p,
                        &[&parts, &gw],
                        Grid::Threads(weights),
                    )?;
                    t += t2;
                    name += " + conv_weight_sum";
                }
                rows.push(KernelRow {
                    kernel: name,
                    shape: shape.clone(),
                    seconds: t,
                    timer,
                    gflops: flops / t / 1e9,
                    gbs: bytes / t / 1e9,
                });
            }
        }
    }
    Ok(rows)
}

/// The tiles `tiled_kernel_table` compares with the chosen one: the
/// default and the narrow and wide shapes `ConvTile::for_rows` picks
/// between, and one deeper-than-wide.
pub const TILE_CANDIDATES: [ConvTile; 4] = [
    ConvTile::DEFAULT,
    ConvTile {
        tm: 32,
        tn: 128,
        tk: 8,
    },
    ConvTile {
        tm: 16,
        tn: 256,
        tk: 4,
    },
    ConvTile {
        tm: 128,
        tn: 32,
        tk: 8,
    },
];

#[derive(Clone, Debug, serde::Serialize)]
pub struct EndToEnd {
    pub grad_seconds: f64,
    /// An HVP with the batch's activations cached (what Lanczos runs).
    pub hvp_seconds: f64,
    pub hvp_over_grad: f64,
    /// One Lanczos step with full reorthogonalisation against
    /// `lanczos_basis` earlier vectors: the HVP plus the host work.
    pub lanczos_step_seconds: f64,
    pub lanczos_basis: usize,
}

/// Host time of one full reorthogonalisation (two compensated Gram–Schmidt
/// passes) of an n-vector against `basis` vectors, as Lanczos step 90 pays.
/// Above 1 GiB of stand-in vectors it times fewer and scales linearly.
pub fn reorth_seconds(n: usize, basis: usize) -> f64 {
    use crate::spectral::compensated::{dot, subtract_combination};
    let fit = ((1usize << 30) / (8 * n.max(1))).clamp(1, basis.max(1));
    let vecs: Vec<Vec<f64>> = (0..fit)
        .map(|j| {
            (0..n)
                .map(|i| (((i * 31 + j * 17) % 97) as f64 - 48.0) * 1e-3)
                .collect()
        })
        .collect();
    let refs: Vec<&[f64]> = vecs.iter().map(|v| v.as_slice()).collect();
    let mut w: Vec<f64> = (0..n).map(|i| ((i % 13) as f64) - 6.0).collect();
    let t = Instant::now();
    for _ in 0..2 {
        let c: Vec<f64> = refs.iter().map(|q| dot(&w, q)).collect();
        subtract_combination(&mut w, &c, &refs);
    }
    t.elapsed().as_secs_f64() * basis as f64 / fit as f64
}

/// One block size of `hesscope bench --block-sizes`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BlockTiming {
    /// Vectors per block product.
    pub block: usize,
    /// Median time of one block product of `block` vectors.
    pub seconds: f64,
    /// `seconds / block`: the HVP cost per vector at this block size.
    pub per_vector_seconds: f64,
}

/// Median time of one block product (`hvp_block`, one sweep over the data
/// for K vectors) and its cost per vector, for each K of `sizes`.
pub fn block_timings(
    engine: &mut dyn Curvature,
    sizes: &[usize],
    reps: usize,
) -> Result<Vec<BlockTiming>> {
    let n = engine.n_params();
    let mut rows = vec![];
    for &k in sizes {
        let vs: Vec<Vec<f64>> = (0..k)
            .map(|j| {
                (0..n)
                    .map(|i| (((i + 31 * j) * 7919 % 1000) as f64 / 1000.0) - 0.5)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
        let mut outs = vec![vec![0.0; n]; k];
        let seconds = time_it(reps, || engine.hvp_block(&refs, &mut outs))?;
        rows.push(BlockTiming {
            block: k,
            seconds,
            per_vector_seconds: seconds / k.max(1) as f64,
        });
    }
    Ok(rows)
}

/// Gradient and cached-HVP times of an engine.
pub fn end_to_end(engine: &mut dyn Curvature, reps: usize) -> Result<EndToEnd> {
    let n = engine.n_params();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f64 / 1000.0) - 0.5)
        .collect();
    let grad = time_it(reps, || engine.loss_grad().map(|_| ()))?;
    let mut out = vec![0.0; n];
    let hvp = time_it(reps, || engine.hvp(&v, &mut out))?;
    let basis = 90.min(n);
    let reorth = reorth_seconds(n, basis);
    Ok(EndToEnd {
        grad_seconds: grad,
        hvp_seconds: hvp,
        hvp_over_grad: hvp / grad,
        lanczos_step_seconds: hvp + reorth,
        lanczos_basis: basis,
    })
}

//! Every WGSL kernel against the float64 reference ops (src/ops), with the
//! typed parameters (`hesscope::gpu::params`), override constants, buffers,
//! offsets and override constants the engine (src/layers) uses, on random shapes
//! (seeded) and random inputs, on Vulkan (lavapipe) and GL (llvmpipe).
//! Outputs are poisoned with NaN before each run so that an unwritten
//! element shows; accumulating paths start from random values that must be
//! added to; kernels writing at an offset into a larger buffer must leave
//! the rest of it bit-for-bit as it was.
//!
//! Tolerances, as ‖gpu − ref‖/‖ref‖ over one output (plus: every element
//! finite). Inputs are rounded to f32 before the f64 reference sees them,
//! so the reference is exact to ~1e-16 and the only error is the kernels'
//! f32 rounding (unit roundoff u = 2⁻²⁴ ≈ 6e-8):
//! - `TOL` = 1e-5 for reductions. A sum of random-sign terms whose longest
//!   serial chain is L terms errs by ≈ u·√L relative to its size (rounding
//!   errors are a random walk over partial sums that grow like the total).
//!   Here L ≤ 4608 (conv: cin·k·k per output, two pairs; the widest
//!   edge case, 12 channels at k = 11, has 2904), ≤ 544 for the tree
//!   reductions (n·hw/256 per thread + 2×16 tree adds; split in segments,
//!   fewer: span/256 + 32, then segments/256 + 32), so ≈ 4e-6 at
//!   worst; chained BN passes add a few u per step. 1e-5 keeps ≥ 2×
//!   headroom, while a wrong index, a missing term or a missed flag errs
//!   by ≥ 1e-2 on these random inputs.
//! - `TOL_FEW` = 1e-6 for outputs made by a handful of f32 operations
//!   (accumulating adds, max-pool's ≤ 4-term scatter, LeakyReLU's one
//!   product): ≤ 4u ≈ 2.4e-7; also average pooling's window sums of
//!   ≤ 25 terms (+ the division and an accumulating add), ≈ u·√27 ≈ 3e-7
//!   by the random-walk argument above.
//! - `TOL_ACT` for the smooth activations' transcendental functions: see
//!   `activation_kernels_match`.
//! - exact equality for outputs that only select or move values (ReLU and
//!   its derivative, copy, max-pool values, argmax and gather).

// `untouched` takes a list of written ranges; one range is a valid list.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use common::{gpu_contexts, skip};
use hesscope::gpu::kernels::{
    self, bn_rows, ActParams, BnParams, Consts, ConvParams, EwParams, Kernel, KernelParams,
    LossParams, PoolParams, ReduceParams,
};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::reduce::{self, SplitParams};
use hesscope::gpu::{GpuBuffer, GpuContext};
use hesscope::layers::activation::act_code;
use hesscope::model::Activation;
use hesscope::ops::{activation as act, bn, conv, loss, pool};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const TOL: f64 = 1e-5;
const TOL_FEW: f64 = 1e-6;
const EXACT: f64 = 0.0;

// ---------------------------------------------------------------- helpers

/// Uniform(lo, hi) values that f32 holds exactly.
fn uniform(r: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| (lo + (hi - lo) * r.random::<f64>()) as f32 as f64)
        .collect()
}

/// Uniform(-1, 1), f32-exact.
fn rnd(r: &mut StdRng, n: usize) -> Vec<f64> {
    uniform(r, n, -1.0, 1.0)
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn upload(ctx: &GpuContext, name: &str, v: &[f64]) -> GpuBuffer {
    let b = ctx.storage(name, v.len()).unwrap();
    ctx.write_f32(&b, 0, &to_f32(v)).unwrap();
    b
}

fn poisoned(ctx: &GpuContext, name: &str, n: usize) -> GpuBuffer {
    let b = ctx.storage(name, n).unwrap();
    ctx.write_f32(&b, 0, &vec![f32::NAN; n]).unwrap();
    b
}

/// The engine binds a 4-element "unused binding" buffer where a kernel's
/// optional input is absent.
fn dummy(ctx: &GpuContext) -> GpuBuffer {
    poisoned(ctx, "unused binding", 4)
}

fn read_raw(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f64> {
    read_raw(ctx, b).iter().map(|&x| x as f64).collect()
}

fn read_u32(ctx: &GpuContext, b: &GpuBuffer) -> Vec<u32> {
    read_raw(ctx, b).iter().map(|x| x.to_bits()).collect()
}

fn plus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Elements outside the written ranges must keep their bits (NaN included).
#[track_caller]
fn untouched(what: &str, after: &[f32], before: &[f32], written: &[std::ops::Range<usize>]) {
    assert_eq!(after.len(), before.len());
    for (i, (a, b)) in after.iter().zip(before).enumerate() {
        if written.iter().any(|r| r.contains(&i)) {
            continue;
        }
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}: element {i} outside the output was changed ({b} -> {a})"
        );
    }
}

/// One dispatch of a kernel without override constants.
fn run<P: KernelParams>(ctx: &GpuContext, k: Kernel, p: &P, bufs: &[&GpuBuffer], grid: Grid) {
    run_with(ctx, k, Consts::default(), p, bufs, grid);
}

/// One dispatch of a kernel specialised by override constants.
fn run_with<P: KernelParams>(
    ctx: &GpuContext,
    k: Kernel,
    consts: Consts,
    p: &P,
    bufs: &[&GpuBuffer],
    grid: Grid,
) {
    dispatch_once(ctx, k, consts, p, bufs, grid).unwrap();
}

/// A per-channel reduction over `c` channels of `count` elements as the
/// engine runs it (`reduce::stages`): whole, or split in segments of
/// `span` elements through a NaN-poisoned partials buffer, so that a
/// segment stage one skipped shows in stage two's result.
#[allow(clippy::too_many_arguments)]
fn run_reduction<P: SplitParams>(
    ctx: &GpuContext,
    k: Kernel,
    consts: Consts,
    p: &P,
    bufs: &[&GpuBuffer],
    c: usize,
    count: usize,
    span: Option<usize>,
) {
    let floats = reduce::partials_for(c, count, span);
    let partials = poisoned(ctx, "partials", floats);
    let split = span.map(|s| (s, &partials));
    let stages = reduce::stages(k, consts, *p, bufs, c, count, split);
    if let Some(s) = span {
        let want = if count > s { 2 } else { 1 };
        assert_eq!(stages.len(), want, "{k:?}: {count} elements at span {s}");
    }
    for st in stages {
        run_with(ctx, k, st.consts, &st.params, &st.buffers, st.grid);
    }
}

/// Worst errors per kernel and backend over a test, printed at its end
/// (`--nocapture`).
#[derive(Default)]
struct Worst {
    /// The backend the checks being made run on (`on`).
    backend: String,
    /// (kernel, backend) -> (worst relative error, worst absolute error,
    /// checks, the check with the worst relative error).
    rows: BTreeMap<(String, String), (f64, f64, usize, String)>,
}

impl Worst {
    /// The checks that follow are of `backend`.
    fn on(&mut self, backend: &str) {
        self.backend = backend.to_string();
    }

    /// Relative error ‖got − want‖/‖want‖ ≤ tol, every element finite.
    #[track_caller]
    fn check(&mut self, kernel: &str, what: &str, got: &[f64], want: &[f64], tol: f64) {
        self.check_scaled(kernel, what, got, want, &[], tol)
    }

    /// As `check` for sums whose total may cancel by chance: relative to
    /// max(‖want‖, ‖scale‖) with scale[c] = √(Σ terms²) of sum c, the size
    /// a random-sign sum of those terms has, to which its rounding error
    /// is proportional (a sum of 8192 terms of size 80 that lands near
    /// 100 still carries the ~1e-3 rounding of its ~5000-sized partials).
    #[track_caller]
    fn check_scaled(
        &mut self,
        kernel: &str,
        what: &str,
        got: &[f64],
        want: &[f64],
        scale: &[f64],
        tol: f64,
    ) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = got.iter().position(|x| !x.is_finite()) {
            panic!(
                "{what}: element {i} is {} (want {}): unwritten?",
                got[i], want[i]
            );
        }
        let (mut num, mut den, mut max_abs, mut at) = (0.0f64, 0.0f64, 0.0f64, 0);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            num += (a - b).powi(2);
            den += b * b;
            if (a - b).abs() > max_abs {
                max_abs = (a - b).abs();
                at = i;
            }
        }
        let den = den.max(scale.iter().map(|v| v * v).sum());
        let rel = if num == 0.0 {
            0.0
        } else {
            num.sqrt() / den.sqrt()
        };
        assert!(
            rel <= tol,
            "{what}: relative error {rel:.2e} > {tol:.0e}; worst element {at}: got {}, want {}",
            got[at],
            want[at]
        );
        self.record(kernel, what, rel, max_abs);
    }

    fn record(&mut self, kernel: &str, what: &str, rel: f64, max_abs: f64) {
        let e = self
            .rows
            .entry((kernel.to_string(), self.backend.clone()))
            .or_default();
        if rel >= e.0 {
            e.0 = rel;
            e.3 = what.to_string();
        }
        e.1 = e.1.max(max_abs);
        e.2 += 1;
    }

    fn report(&self, title: &str) {
        eprintln!("{title}: worst errors per kernel and backend");
        for ((k, backend), (rel, abs, n, at)) in &self.rows {
            eprintln!(
                "  {k:<32} {backend:<6} rel {rel:.2e} (at {at})  max abs {abs:.2e}  ({n} checks)"
            );
        }
    }
}

// ---------------------------------------------------------------- conv

#[allow(clippy::too_many_arguments)]
fn conv_geom(
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    s: usize,
    p: usize,
) -> conv::ConvGeom {
    conv::ConvGeom {
        n,
        cin,
        h,
        w,
        cout,
        k,
        stride: s,
        pad: p,
        oh: (h + 2 * p - k) / s + 1,
        ow: (w + 2 * p - k) / s + 1,
        groups: 1,
        dilation: 1,
    }
}

/// Stage one of the weight gradient in f64: for each chunk of `per` output
/// rows (n, oy) and each weight (co, ci, ky, kx), Σ gy·x over the chunk
/// (+ the same for the second pair), laid out [chunk, weight].
fn weight_partials(
    g: &conv::ConvGeom,
    per: usize,
    chunks: usize,
    gy: &[f64],
    x: &[f64],
    second: Option<(&Vec<f64>, &Vec<f64>)>,
) -> Vec<f64> {
    let nw = g.cout * g.cin * g.k * g.k;
    let mut out = vec![0.0; nw * chunks];
    for chunk in 0..chunks {
        for row in chunk * per..((chunk + 1) * per).min(g.n * g.oh) {
            let (n, oy) = (row / g.oh, row % g.oh);
            for co in 0..g.cout {
                for ci in 0..g.cin {
                    for ky in 0..g.k {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        for kx in 0..g.k {
                            let wi = ((co * g.cin + ci) * g.k + ky) * g.k + kx;
                            let mut acc = 0.0;
                            for ox in 0..g.ow {
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if ix < 0 || ix >= g.w as isize {
                                    continue;
                                }
                                let gi = ((n * g.cout + co) * g.oh + oy) * g.ow + ox;
                                let xi = ((n * g.cin + ci) * g.h + iy as usize) * g.w + ix as usize;
                                acc += gy[gi] * x[xi];
                                if let Some((gb, xb)) = second {
                                    acc += gb[gi] * xb[xi];
                                }
                            }
                            out[chunk * nw + wi] += acc;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Two random draws of every conv form of the reference models (k, stride,
/// pad), linear layers as 1x1 convs on 1x1 images, and two large
/// reductions for backward-weight accuracy (n·oh·ow = 32768 and 4096 terms
/// per weight, the latter through the k > 3 branch).
/// Then the edge cases of `conv_edge_cases`.
fn conv_cases() -> Vec<conv::ConvGeom> {
    let mut r = StdRng::seed_from_u64(10);
    let mut out = vec![];
    for (k, s, p) in [
        (3, 1, 1),
        (3, 2, 1),
        (1, 2, 0),
        (1, 1, 0),
        (7, 2, 3),
        (5, 1, 2),
        (5, 1, 0),
    ] {
        for _ in 0..2 {
            let lo = (k as i64 - 2 * p as i64).max(1) as usize;
            let (n, cin, cout) = (
                r.random_range(1..=3),
                r.random_range(1..=7),
                r.random_range(1..=10),
            );
            let (h, w) = (r.random_range(lo..=13), r.random_range(lo..=13));
            out.push(conv_geom(n, cin, h, w, cout, k, s, p));
        }
    }
    for _ in 0..2 {
        let (n, din, dout) = (
            r.random_range(1..=40),
            r.random_range(1..=300),
            r.random_range(1..=12),
        );
        out.push(conv_geom(n, din, 1, 1, dout, 1, 1, 0));
    }
    // 3×3 stride 1 with rows of 4k columns (conv_backward_weight_k3s1):
    // padded and not, a channel block overhanging cout.
    out.push(conv_geom(3, 5, 6, 8, 6, 3, 1, 1));
    out.push(conv_geom(2, 3, 7, 10, 4, 3, 1, 0));
    out.push(conv_geom(32, 4, 32, 32, 4, 3, 1, 1));
    out.push(conv_geom(16, 3, 32, 32, 5, 7, 2, 3));
    out.extend(conv_edge_cases());
    out
}

/// Input and output channels in 1..=max, shrunk (the larger first) until
/// the weights and biases fit a uniform window with the largest gaps the
/// conv test puts around them (cout + 4 + cout·cin·k² + 2 floats), so that
/// every shape runs through the windowed kernels too.
fn channels_that_fit(r: &mut StdRng, lo: usize, max: usize, k: usize) -> (usize, usize) {
    let (mut cin, mut cout) = (r.random_range(lo..=max), r.random_range(lo..=max));
    while cout * cin * k * k + cout + 6 > kernels::WINDOW_FLOATS {
        if cin >= cout {
            cin -= 1;
        } else {
            cout -= 1;
        }
    }
    (cin, cout)
}

/// Every tap size k = 1..=11 (8..=11 take more than one pass of the
/// weight gradient's 7 named accumulators), each: a random stride 1..=4 and
/// padding 0..=k with channels past the 8-channel blocks (cin and cout
/// 9..=16 as far as the window allows: a block overhanging both); a shape
/// whose output is one pixel; a 1×1 image (padding ⌈(k−1)/2⌉..=k). Batch
/// 1..=3 throughout. Then padding past k (windows wholly in the padding),
/// and the 3×3 stride-1 kernels at padding 0..=3 with channels past the
/// block and rows of 4k output columns (conv_backward_weight_k3s1).
fn conv_edge_cases() -> Vec<conv::ConvGeom> {
    let mut r = StdRng::seed_from_u64(11);
    let mut out = vec![];
    for k in 1..=11usize {
        // Past the channel blocks, any stride and padding.
        let (s, p) = (r.random_range(1..=4), r.random_range(0..=k));
        let lo = k.saturating_sub(2 * p).max(1);
        let (cin, cout) = channels_that_fit(&mut r, 9, 16, k);
        let n = r.random_range(1..=3);
        let (h, w) = (r.random_range(lo..=lo + 9), r.random_range(lo..=lo + 9));
        out.push(conv_geom(n, cin, h, w, cout, k, s, p));

        // One output pixel: h + 2p − k < s.
        let (s, p) = loop {
            let (s, p) = (r.random_range(1..=4), r.random_range(0..=k / 2));
            if k - 2 * p >= 1 || s >= 2 {
                break (s, p);
            }
        };
        let lo = (k - 2 * p).max(1);
        let hi = s + k - 2 * p; // exclusive
        let (cin, cout) = channels_that_fit(&mut r, 1, 12, k);
        let n = r.random_range(1..=3);
        let (h, w) = (r.random_range(lo..hi), r.random_range(lo..hi));
        let g = conv_geom(n, cin, h, w, cout, k, s, p);
        assert_eq!((g.oh, g.ow), (1, 1));
        out.push(g);

        // A 1×1 image.
        let (s, p) = (r.random_range(1..=4), r.random_range(k / 2..=k));
        let (cin, cout) = channels_that_fit(&mut r, 1, 12, k);
        out.push(conv_geom(r.random_range(1..=3), cin, 1, 1, cout, k, s, p));
    }
    // Padding past k.
    out.push(conv_geom(2, 3, 4, 5, 10, 3, 2, 5));
    out.push(conv_geom(1, 9, 2, 3, 3, 1, 1, 2));
    // 3×3 stride 1 at padding 0..=3, channels past the block, ow = 8, 4,
    // 8, 8 (the k3 weight kernel applies).
    out.push(conv_geom(2, 9, 6, 10, 12, 3, 1, 0));
    out.push(conv_geom(1, 16, 7, 4, 16, 3, 1, 1));
    out.push(conv_geom(1, 12, 5, 6, 9, 3, 1, 2));
    out.push(conv_geom(3, 10, 4, 4, 11, 3, 1, 3));
    out
}

/// The forms of a conv kernel to test on one shape: the general kernel and
/// its uniform-window twin, and on 3×3 stride-1 shapes the specialised
/// pair too, as (kernel, report name, reads weights through a window).
fn conv_forms(general: Kernel, k3: bool) -> Vec<(Kernel, &'static str, bool)> {
    use Kernel::*;
    let (all, k3_forms) = match general {
        ConvForward => (
            [
                (ConvForward, "conv_forward", false),
                (ConvForwardWindowed, "conv_forward_windowed", true),
            ],
            [
                (ConvForwardK3, "conv_forward_k3s1", false),
                (ConvForwardK3Windowed, "conv_forward_k3s1_windowed", true),
            ],
        ),
        ConvBackwardData => (
            [
                (ConvBackwardData, "conv_backward_data", false),
                (
                    ConvBackwardDataWindowed,
                    "conv_backward_data_windowed",
                    true,
                ),
            ],
            [
                (ConvBackwardDataK3, "conv_backward_data_k3s1", false),
                (
                    ConvBackwardDataK3Windowed,
                    "conv_backward_data_k3s1_windowed",
                    true,
                ),
            ],
        ),
        _ => panic!("no forms of {general:?}"),
    };
    let mut forms = all.to_vec();
    if k3 {
        forms.extend(k3_forms);
    }
    forms
}

#[test]
fn conv_kernels_match_the_reference() {
    let mut worst = Worst::default();
    let cases = conv_cases();
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        let mut r = StdRng::seed_from_u64(1);
        for g in &cases {
            let (n, cin, cout, k) = (g.n, g.cin, g.cout, g.k);
            let (oh, ow) = (g.oh, g.ow);
            let what = format!(
                "{backend} conv n{n} cin{cin} {}x{} cout{cout} k{k} s{} p{}",
                g.h, g.w, g.stride, g.pad
            );
            let (xl, wl, yl) = (n * cin * g.h * g.w, cout * cin * k * k, n * cout * oh * ow);
            // Weights and biases at offsets inside parameter buffers θ and
            // v. Half the draws put the weights last with nothing after
            // them, so a channel block overhanging cout reads past the end.
            let bias_first = r.random_bool(0.5);
            let gap = r.random_range(0..5);
            let tail = if bias_first { 0 } else { r.random_range(0..3) };
            let (boff, woff) = if bias_first {
                (0, cout + gap)
            } else {
                (gap + wl, gap)
            };
            let plen = cout + gap + wl + tail;
            let theta = rnd(&mut r, plen);
            let v = rnd(&mut r, plen);
            let (wt, vt) = (&theta[woff..woff + wl], &v[woff..woff + wl]);
            let (bt, bv) = (&theta[boff..boff + cout], &v[boff..boff + cout]);
            let (x, dx, gy, rgy) = (
                rnd(&mut r, xl),
                rnd(&mut r, xl),
                rnd(&mut r, yl),
                rnd(&mut r, yl),
            );
            let (tb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            // The 3×3 stride-1 kernels run on the general kernels' grids.
            let k3 = kernels::conv_k3s1_applies(k, g.stride);
            // The windowed kernels read a WINDOW_FLOATS window from offset
            // 0: θ and v continued by random values that a channel block
            // overhanging cout must not pick up.
            let pad = |a: &[f64], r: &mut StdRng| {
                let mut a = a.to_vec();
                a.extend(rnd(r, kernels::WINDOW_FLOATS - plen));
                a
            };
            let window = |name: &str, a: &[f64]| {
                let b = ctx.weights(name, a.len()).unwrap();
                let f: Vec<f32> = a.iter().map(|&x| x as f32).collect();
                ctx.write_f32(&b, 0, &f).unwrap();
                b
            };
            let (tbw, vbw) = (
                window("θ window", &pad(&theta, &mut r)),
                window("v window", &pad(&v, &mut r)),
            );
            let (xb, dxb, gyb, rgyb) = (
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );
            let pr = |wa: usize, wb: usize, bo: usize| ConvParams {
                n: n as u32,
                cin: cin as u32,
                h: g.h as u32,
                w: g.w as u32,
                cout: cout as u32,
                k: k as u32,
                stride: g.stride as u32,
                pad: g.pad as u32,
                oh: oh as u32,
                ow: ow as u32,
                wa_off: wa as u32,
                wb_off: wb as u32,
                bias_off: bo as u32,
                ..Default::default()
            };
            let fgrid = Grid::Threads(kernels::conv_forward_threads(n, cout, oh, ow));
            let dgrid = Grid::Threads(kernels::conv_backward_data_threads(
                n, cin, g.h, g.w, g.stride,
            ));

            // ---- forward: (pair, bias, acc); the engine's forward pass is
            // the single pair [x, θ, x, θ] with or without bias, its
            // R-forward the pair [ẋ, θ, x, v] with v's bias.
            let fwd = |xa: &[f64], wa: &[f64], pair: bool, bias: Option<&[f64]>| {
                let mut y = vec![0.0; yl];
                conv::forward_acc(g, xa, wa, &mut y);
                if pair {
                    conv::forward_acc(g, &x, vt, &mut y);
                }
                if let Some(b) = bias {
                    conv::bias_acc(n, cout, oh * ow, b, &mut y);
                }
                y
            };
            for (pair, bias, acc) in [
                (false, false, false),
                (false, true, false),
                (false, false, true),
                (true, false, false),
                (true, true, false),
                (true, true, true),
            ] {
                let consts = Consts::conv(pair, bias, acc);
                let y0 = rnd(&mut r, yl);
                for (kernel, name, windowed) in conv_forms(Kernel::ConvForward, k3) {
                    let (tw, vw) = if windowed { (&tbw, &vbw) } else { (&tb, &vb) };
                    let y = if acc {
                        upload(&ctx, "y", &y0)
                    } else {
                        poisoned(&ctx, "y", yl)
                    };
                    let (p, bufs, mut want) = if pair {
                        (
                            pr(woff, woff, if bias { boff } else { 0 }),
                            [&dxb, tw, &xb, vw, &y],
                            fwd(&dx, wt, true, bias.then_some(bv)),
                        )
                    } else {
                        (
                            pr(woff, 0, if bias { boff } else { 0 }),
                            [&xb, tw, &xb, tw, &y],
                            fwd(&x, wt, false, bias.then_some(bt)),
                        )
                    };
                    if acc {
                        want = plus(&want, &y0);
                    }
                    run_with(&ctx, kernel, consts, &p, &bufs, fgrid);
                    worst.check(
                        name,
                        &format!("{what} forward pair={pair} bias={bias} acc={acc}"),
                        &read(&ctx, &y),
                        &want,
                        TOL,
                    );
                }
            }

            // ---- backward data: [gy, θ, gy, θ] (backward) and
            // [R(gy), θ, gy, v] with PAIR_B (R-backward), each overwriting
            // or accumulating (a second consumer of the same input).
            for (pair, acc) in [(false, false), (false, true), (true, false), (true, true)] {
                let consts = Consts::conv(pair, false, acc);
                let gx0 = rnd(&mut r, xl);
                let mut want = if acc { gx0.clone() } else { vec![0.0; xl] };
                if pair {
                    conv::backward_data_acc(g, &rgy, wt, &mut want);
                    conv::backward_data_acc(g, &gy, vt, &mut want);
                } else {
                    conv::backward_data_acc(g, &gy, wt, &mut want);
                }
                for (kernel, name, windowed) in conv_forms(Kernel::ConvBackwardData, k3) {
                    let (tw, vw) = if windowed { (&tbw, &vbw) } else { (&tb, &vb) };
                    let gx = if acc {
                        upload(&ctx, "gx", &gx0)
                    } else {
                        poisoned(&ctx, "gx", xl)
                    };
                    let (p, bufs) = if pair {
                        (pr(woff, woff, 0), [&rgyb, tw, &gyb, vw, &gx])
                    } else {
                        (pr(woff, 0, 0), [&gyb, tw, &gyb, tw, &gx])
                    };
                    run_with(&ctx, kernel, consts, &p, &bufs, dgrid);
                    worst.check(
                        name,
                        &format!("{what} backward data pair={pair} acc={acc}"),
                        &read(&ctx, &gx),
                        &want,
                        TOL,
                    );
                }
            }

            // ---- weight gradient, in two stages as the engine runs it:
            // conv_backward_weight writes one partial sum per (chunk of
            // output rows, weight) into a scratch buffer (`rows_per_chunk`,
            // `chunks`; the engine's grid,
            // conv_weight_threads, so that an under-launch shows), then conv_weight_sum adds the chunks
            // into the gradient (or Hv) buffer at wa_off. Bindings:
            // [gy, x, gy, x] (backward) and [R(gy), x, gy, ẋ] with PAIR_B
            // (R-backward). Splits: the engine's (conv_weight_chunks), one
            // row per chunk, and a random one. After the plain pass the bias
            // gradient goes in as the engine does it: channel_sums of gy
            // accumulated at the bias offset.
            let rows = n * oh;
            let (per_engine, _) = kernels::conv_weight_chunks(n, oh, ow, wl);
            let splits = [per_engine, 1, r.random_range(1..=rows)];
            for (si, per) in splits.into_iter().enumerate() {
                for pair in [false, true] {
                    let chunks = rows.div_ceil(per);
                    let tag = format!("{what} weight gradient pair={pair} rows/chunk {per}");
                    let p = ConvParams {
                        rows_per_chunk: per as u32,
                        chunks: chunks as u32,
                        ..pr(woff, 0, 0)
                    };
                    let pair_c = Consts::new(&[("PAIR_B", pair as u32)]);
                    // Stage one: every partial written, nothing past them.
                    let parts = poisoned(&ctx, "partials", wl * chunks + 3);
                    let (a1, b1, a2, b2) = if pair {
                        (&rgyb, &xb, &gyb, &dxb)
                    } else {
                        (&gyb, &xb, &gyb, &xb)
                    };
                    run_with(
                        &ctx,
                        Kernel::ConvBackwardWeight,
                        pair_c,
                        &p,
                        &[a1, b1, a2, b2, &parts],
                        Grid::Groups(kernels::conv_weight_groups(cout, cin, k, chunks)),
                    );
                    let got = read(&ctx, &parts);
                    let (ga, xa_, gb_, xb_) = if pair {
                        (&rgy, &x, &gy, &dx)
                    } else {
                        (&gy, &x, &gy, &x)
                    };
                    let want = weight_partials(g, per, chunks, ga, xa_, pair.then_some((gb_, xb_)));
                    worst.check(
                        "conv_backward_weight",
                        &format!("{tag} partials"),
                        &got[..wl * chunks],
                        &want,
                        TOL,
                    );
                    assert!(
                        got[wl * chunks..].iter().all(|v| v.is_nan()),
                        "{tag}: wrote past the partials"
                    );
                    // The 3×3 stride-1 kernel, where the engine would use it.
                    if kernels::conv_weight_k3_applies(k, g.stride, ow) {
                        let parts3 = poisoned(&ctx, "partials", wl * chunks + 3);
                        run_with(
                            &ctx,
                            Kernel::ConvBackwardWeightK3,
                            pair_c,
                            &p,
                            &[a1, b1, a2, b2, &parts3],
                            Grid::Groups(kernels::conv_weight_groups(cout, cin, k, chunks)),
                        );
                        let got3 = read(&ctx, &parts3);
                        worst.check(
                            "conv_backward_weight_k3s1",
                            &format!("{tag} partials"),
                            &got3[..wl * chunks],
                            &want,
                            TOL,
                        );
                        assert!(
                            got3[wl * chunks..].iter().all(|v| v.is_nan()),
                            "{tag}: the k3 kernel wrote past the partials"
                        );
                    }

                    // Stage two adds into a larger buffer at wa_off.
                    let out0 = rnd(&mut r, plen);
                    let out = upload(&ctx, "gradient", &out0);
                    let d = dummy(&ctx);
                    run(
                        &ctx,
                        Kernel::ConvWeightSum,
                        &p,
                        &[&parts, &out],
                        Grid::Threads(wl),
                    );
                    let mut gw = out0[woff..woff + wl].to_vec();
                    conv::backward_weight_acc(g, ga, xa_, &mut gw);
                    if pair {
                        conv::backward_weight_acc(g, gb_, xb_, &mut gw);
                    }
                    let with_bias = !pair && si == 0;
                    if with_bias {
                        let p = ReduceParams {
                            n: n as u32,
                            c: cout as u32,
                            hw: (oh * ow) as u32,
                            out_a: boff as u32,
                            ..Default::default()
                        };
                        run_with(
                            &ctx,
                            Kernel::ChannelSums,
                            Consts::new(&[("HAS_B", 0), ("ACC", 1)]),
                            &p,
                            &[&gyb, &d, &out],
                            Grid::Groups(cout),
                        );
                    }
                    let got = read(&ctx, &out);
                    worst.check(
                        "conv_weight_sum",
                        &format!("{tag} gradient"),
                        &got[woff..woff + wl],
                        &gw,
                        TOL,
                    );
                    let mut written = vec![woff..woff + wl];
                    if with_bias {
                        let mut gb = out0[boff..boff + cout].to_vec();
                        conv::bias_grad_acc(n, cout, oh * ow, &gy, &mut gb);
                        worst.check(
                            "channel_sums",
                            &format!("{what} bias gradient"),
                            &got[boff..boff + cout],
                            &gb,
                            TOL,
                        );
                        written.push(boff..boff + cout);
                    }
                    untouched(&tag, &read_raw(&ctx, &out), &to_f32(&out0), &written);
                }
            }
        }
    }
    worst.report("conv");
}

// ---------------------------------------------------------------- reductions and elementwise

#[test]
fn reductions_and_elementwise_kernels_match() {
    let mut worst = Worst::default();
    // (2, 80, 2600) split in 5s: 867 segments of 6 per channel, 69,360
    // stage-one workgroups, folded into a 65,535 × 2 grid.
    let mut shapes = vec![
        (128usize, 3usize, 1024usize),
        (7, 600, 1),
        (1, 1, 1),
        (2, 80, 2600),
    ];
    {
        let mut r = StdRng::seed_from_u64(20);
        for _ in 0..4 {
            shapes.push((
                r.random_range(1..=9),
                r.random_range(1..=20),
                r.random_range(1..=60),
            ));
        }
    }
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        let mut r = StdRng::seed_from_u64(2);
        let d = dummy(&ctx);
        for &(n, c, hw) in &shapes {
            let what = format!("{backend} {n}x{c}x{hw}");
            let len = n * c * hw;
            let (a, b) = (rnd(&mut r, len), rnd(&mut r, len));
            let (ab, bb) = (upload(&ctx, "a", &a), upload(&ctx, "b", &b));
            let mut sa = vec![0.0; c];
            let mut sab = vec![0.0; c];
            for i in 0..len {
                let ch = (i / hw) % c;
                sa[ch] += a[i];
                sab[ch] += a[i] * b[i];
            }

            // ---- channel_sums, into a larger buffer at offsets (the
            // engine's stats rows and gradient blocks).
            let out_a = r.random_range(0..4);
            let out_b = out_a + c + r.random_range(0..4);
            let olen = out_b + c + 3;
            // Whole channels (the emulators' form), and split in segments
            // (GPUs'): of 5 elements (ragged; 128x3x1024 gets 1024 of 128,
            // more partials than stage two has threads) and of 64.
            for (has_b, acc, span) in [
                (true, false, None),
                (false, true, None),
                (true, true, None),
                (true, false, Some(5)),
                (false, true, Some(5)),
                (true, true, Some(64)),
            ] {
                let consts = Consts::new(&[("HAS_B", has_b as u32), ("ACC", acc as u32)]);
                let init = rnd(&mut r, olen);
                let out = if acc {
                    upload(&ctx, "sums", &init)
                } else {
                    poisoned(&ctx, "sums", olen)
                };
                let before = read_raw(&ctx, &out);
                let p = ReduceParams {
                    n: n as u32,
                    c: c as u32,
                    hw: hw as u32,
                    out_a: out_a as u32,
                    out_b: out_b as u32,
                    ..Default::default()
                };
                let bbind = if has_b { &bb } else { &d };
                run_reduction(
                    &ctx,
                    Kernel::ChannelSums,
                    consts,
                    &p,
                    &[&ab, bbind, &out],
                    c,
                    n * hw,
                    span,
                );
                let got = read(&ctx, &out);
                let tag = format!("{what} channel_sums has_b={has_b} acc={acc} span={span:?}");
                let wa = if acc {
                    plus(&sa, &init[out_a..out_a + c])
                } else {
                    sa.clone()
                };
                worst.check(
                    "channel_sums",
                    &format!("{tag} Σa"),
                    &got[out_a..out_a + c],
                    &wa,
                    TOL,
                );
                let mut written = vec![out_a..out_a + c];
                if has_b {
                    let wb = if acc {
                        plus(&sab, &init[out_b..out_b + c])
                    } else {
                        sab.clone()
                    };
                    worst.check(
                        "channel_sums",
                        &format!("{tag} Σab"),
                        &got[out_b..out_b + c],
                        &wb,
                        TOL,
                    );
                    written.push(out_b..out_b + c);
                }
                untouched(&tag, &read_raw(&ctx, &out), &before, &written);
            }

            // ---- bn_stats split where stage one's grid folds (it is
            // checked whole and split in batch_norm_kernels_match; a
            // folded dispatch of 65,536+ workgroups costs lavapipe
            // seconds, so once here). Mean 3 against a spread of 1.
            if c * (n * hw).div_ceil(5) > 65_535 {
                let x: Vec<f64> = a.iter().map(|v| v + 3.0).collect();
                let xb = upload(&ctx, "x", &x);
                let stats = poisoned(&ctx, "stats", bn_rows::COUNT * c);
                let p = BnParams {
                    n: n as u32,
                    c: c as u32,
                    hw: hw as u32,
                    eps: bn::EPS as f32,
                    ..Default::default()
                };
                let k = Kernel::BnStats;
                let none = Consts::default();
                run_reduction(&ctx, k, none, &p, &[&xb, &stats], c, n * hw, Some(5));
                let got = read(&ctx, &stats);
                let g = bn::BnGeom { n, c, hw };
                let (mean, var) = bn::batch_moments(&g, &x);
                let tag = format!("{what} bn_stats folded split");
                worst.check("bn_stats", &format!("{tag} mean"), &got[..c], &mean, TOL);
                let gv = &got[bn_rows::VAR * c..(bn_rows::VAR + 1) * c];
                worst.check("bn_stats", &format!("{tag} σ²"), gv, &var, TOL);
            }

            // ---- sum_all: the per-sample losses (positive) into the
            // losses buffer at the batch's slot.
            let slot = r.random_range(0..5);
            let pos = uniform(&mut r, len, 0.0, 2.0);
            let pb = upload(&ctx, "losses", &pos);
            let out = poisoned(&ctx, "total", slot + 3);
            run(
                &ctx,
                Kernel::SumAll,
                &ReduceParams {
                    out_a: slot as u32,
                    len: len as u32,
                    ..Default::default()
                },
                &[&pb, &out],
                Grid::Groups(1),
            );
            let got = read(&ctx, &out);
            worst.check(
                "sum_all",
                &format!("{backend} sum_all len {len}"),
                &got[slot..slot + 1],
                &[pos.iter().sum()],
                TOL,
            );
            untouched(
                &format!("{backend} sum_all"),
                &read_raw(&ctx, &out),
                &vec![f32::NAN; slot + 3],
                &[slot..slot + 1],
            );

            // ---- add: out = a + b (the engine overwrites; ACC is the
            // shared store path, tested too).
            for acc in [false, true] {
                let y0 = rnd(&mut r, len + 3);
                let y = if acc {
                    upload(&ctx, "y", &y0)
                } else {
                    poisoned(&ctx, "y", len + 3)
                };
                let before = read_raw(&ctx, &y);
                run_with(
                    &ctx,
                    Kernel::Add,
                    Consts::acc(acc),
                    &EwParams {
                        len: len as u32,
                        ..Default::default()
                    },
                    &[&ab, &bb, &y],
                    Grid::Threads(len),
                );
                let mut want = plus(&a, &b);
                if acc {
                    want = plus(&want, &y0);
                }
                let tag = format!("{what} add acc={acc}");
                worst.check("add", &tag, &read(&ctx, &y)[..len], &want, TOL_FEW);
                untouched(&tag, &read_raw(&ctx, &y), &before, &[0..len]);
            }

            // ---- copy: out[out_off + i] (+)= a[a_off + i] (stats rows into
            // the gradient, residual adjoints).
            let m = r.random_range(1..=len);
            let a_off = r.random_range(0..=len - m);
            let out_off = r.random_range(0..4);
            for acc in [false, true] {
                let y0 = rnd(&mut r, out_off + m + 2);
                let y = if acc {
                    upload(&ctx, "y", &y0)
                } else {
                    poisoned(&ctx, "y", out_off + m + 2)
                };
                let before = read_raw(&ctx, &y);
                run_with(
                    &ctx,
                    Kernel::Copy,
                    Consts::acc(acc),
                    &EwParams {
                        len: m as u32,
                        a_off: a_off as u32,
                        out_off: out_off as u32,
                        _p0: 0,
                    },
                    &[&ab, &y],
                    Grid::Threads(m),
                );
                let got = read(&ctx, &y);
                let src = &a[a_off..a_off + m];
                let tag = format!("{what} copy {m} from {a_off} to {out_off} acc={acc}");
                if acc {
                    let want = plus(src, &y0[out_off..out_off + m]);
                    worst.check("copy", &tag, &got[out_off..out_off + m], &want, TOL_FEW);
                } else {
                    worst.check("copy", &tag, &got[out_off..out_off + m], src, EXACT);
                }
                untouched(&tag, &read_raw(&ctx, &y), &before, &[out_off..out_off + m]);
            }
        }
    }
    worst.report("reductions and elementwise");
}

/// Launches wider than the device's per-dimension workgroup limit fold into
/// y (program::fold_grid); the kernels rebuild the flat index from
/// num_workgroups. One elementwise kernel over more than that many groups
/// must write every element exactly once and nothing past the end.
#[test]
fn folded_grids_cover_every_element() {
    for (backend, ctx) in gpu_contexts() {
        let max_dim = ctx.limits.max_compute_workgroups_per_dimension as usize;
        let len = (max_dim + 3) * kernels::WORKGROUP + 77;
        if (len + 5) * 4 > ctx.limits.max_storage_buffer_binding_size as usize {
            skip(&format!("{backend}: {len} floats exceed the binding limit"));
            continue;
        }
        // a = i mod 2¹², b = the next 11 bits of i, times 2¹²: a + b = i mod
        // 2²³, below 2²⁴ so exact in f32, and different for any two
        // indices that are not a multiple of 2²³ apart: an element written
        // from the wrong index (a grid folded wrongly) shows, unless the
        // error is exactly 2²³ (the old b, up to 3.4e7 > 2²⁴, was rounded
        // in f32 and shared values between nearby indices).
        let a: Vec<f32> = (0..len).map(|i| (i % 4096) as f32).collect();
        let b: Vec<f32> = (0..len)
            .map(|i| ((i / 4096) % 2048) as f32 * 4096.0)
            .collect();
        let (ab, bb) = (
            ctx.storage("a", len).unwrap(),
            ctx.storage("b", len).unwrap(),
        );
        ctx.write_f32(&ab, 0, &a).unwrap();
        ctx.write_f32(&bb, 0, &b).unwrap();
        let y = poisoned(&ctx, "y", len + 5);
        run(
            &ctx,
            Kernel::Add,
            &EwParams {
                len: len as u32,
                ..Default::default()
            },
            &[&ab, &bb, &y],
            Grid::Threads(len),
        );
        let got = read_raw(&ctx, &y);
        for (i, g) in got[..len].iter().enumerate() {
            assert_eq!(
                *g,
                (i % (1 << 23)) as f32,
                "{backend}: element {i} of {len}"
            );
        }
        assert!(
            got[len..].iter().all(|v| v.is_nan()),
            "{backend}: wrote past the end"
        );
        eprintln!(
            "{backend}: folded add over {} workgroups ok",
            len.div_ceil(256)
        );
    }
}

// ---------------------------------------------------------------- batch norm

/// What bn_param_sums added into a parameter buffer: `got` against the
/// sums `want` added to the buffer's initial values `init`, the scale
/// widened by |init|.
fn added(worst: &mut Worst, what: &str, got: &[f64], init: &[f64], want: &[f64], scale: &[f64]) {
    let init_abs: Vec<f64> = init.iter().map(|x| x.abs()).collect();
    worst.check_scaled(
        "bn_param_sums",
        what,
        got,
        &plus(want, init),
        &plus(scale, &init_abs),
        TOL,
    );
}

#[test]
fn batch_norm_kernels_match() {
    let mut worst = Worst::default();
    let mut shapes = vec![(4usize, 3usize, 25usize), (128, 4, 64), (9, 17, 1)];
    {
        let mut r = StdRng::seed_from_u64(30);
        for _ in 0..2 {
            shapes.push((
                r.random_range(1..=6),
                r.random_range(2..=9),
                r.random_range(1..=70),
            ));
        }
    }
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        let mut r = StdRng::seed_from_u64(3);
        for &(n, c, hw) in &shapes {
            let len = n * c * hw;
            let g = bn::BnGeom { n, c, hw };
            let mut x = rnd(&mut r, len);
            // Channel 0 has mean 100 and spread 0.01: a one-pass variance
            // E[x²] − E[x]² cancels completely in f32 there (ulp(1e4) ≈ 1e-3
            // against a variance of 3e-5).
            for (i, xi) in x.iter_mut().enumerate() {
                if (i / hw) % c == 0 {
                    *xi = (100.0 + 0.01 * *xi) as f32 as f64;
                }
            }
            let xb = upload(&ctx, "x", &x);
            let eps = bn::EPS as f32;
            // γ and β at random offsets of θ and v.
            let goff = r.random_range(0..3);
            let boff = goff + c + r.random_range(0..3);
            let plen = boff + c + r.random_range(0..2);
            let theta = rnd(&mut r, plen);
            let v = rnd(&mut r, plen);
            let (gamma, beta) = (&theta[goff..goff + c], &theta[boff..boff + c]);
            let (dgamma, dbeta) = (&v[goff..goff + c], &v[boff..boff + c]);
            let (tb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            let (dx, gy, rgy) = (rnd(&mut r, len), rnd(&mut r, len), rnd(&mut r, len));
            let (dxb, gyb, rgyb) = (
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );

            // Reductions whole (emulators) and split in segments of 5
            // elements (GPUs' form, ragged; 128x4x64 gets 1024 of 8; a
            // folded stage-one grid: `reductions_and_elementwise_kernels_match`).
            for (batch, span) in [
                (true, None),
                (false, None),
                (true, Some(5)),
                (false, Some(5)),
            ] {
                let what = format!("{backend} bn {n}x{c}x{hw} batch={batch} span={span:?}");
                let bp = || BnParams {
                    n: n as u32,
                    c: c as u32,
                    hw: hw as u32,
                    gamma_off: goff as u32,
                    beta_off: boff as u32,
                    eps,
                    ..Default::default()
                };
                // Rows the engine never fills in running mode (2, 3) stay
                // NaN: the running-mode paths must not read them.
                let stats = poisoned(&ctx, "stats", bn_rows::COUNT * c);
                let row = |k: usize| k * c..(k + 1) * c;
                // √(Σ t²) per channel, for check_scaled.
                let scale = |t: &dyn Fn(usize) -> f64| -> Vec<f64> {
                    let mut q = vec![0.0; c];
                    for i in 0..len {
                        q[(i / hw) % c] += t(i) * t(i);
                    }
                    q.into_iter().map(f64::sqrt).collect()
                };
                let sums = |a: &GpuBuffer, b: &GpuBuffer, ra: usize, rb: usize| {
                    let p = ReduceParams {
                        n: n as u32,
                        c: c as u32,
                        hw: hw as u32,
                        out_a: (ra * c) as u32,
                        out_b: (rb * c) as u32,
                        ..Default::default()
                    };
                    run_reduction(
                        &ctx,
                        Kernel::ChannelSums,
                        Consts::new(&[("HAS_B", 1), ("ACC", 0)]),
                        &p,
                        &[a, b, &stats],
                        c,
                        n * hw,
                        span,
                    );
                };
                // bn_param_sums as the engine runs it: rows ra, rb (and rd
                // with a second pair) of the statistics, and the sums added
                // into a parameter-shaped buffer at boff (Σa) and goff
                // (Σa·b + Σc·d). Returns that buffer's initial values.
                let param_sums = |a: &GpuBuffer,
                                  b: &GpuBuffer,
                                  cd: Option<(&GpuBuffer, &GpuBuffer)>,
                                  rows: [usize; 3],
                                  tgt: &GpuBuffer| {
                    let pair2 = Consts::new(&[("PAIR2", cd.is_some() as u32)]);
                    let p = ReduceParams {
                        n: n as u32,
                        c: c as u32,
                        hw: hw as u32,
                        out_a: (rows[0] * c) as u32,
                        out_b: (rows[1] * c) as u32,
                        len: 0,
                        out_d: (rows[2] * c) as u32,
                        t_a: boff as u32,
                        t_b: goff as u32,
                        ..Default::default()
                    };
                    let d = dummy(&ctx);
                    let (cb, db) = cd.unwrap_or((&d, &d));
                    run_reduction(
                        &ctx,
                        Kernel::BnParamSums,
                        pair2,
                        &p,
                        &[a, b, &stats, cb, db, tgt],
                        c,
                        n * hw,
                        span,
                    );
                };

                // ---- statistics: bn_stats in batch mode, the running
                // buffers' (μ, 1/√(σ²+ε)) written as f32 otherwise. The
                // reference continues from the f32 statistics the kernels
                // read (a mean of 100 is only held to ~4e-6, 4e-4 of the
                // channel's spread).
                let (mean, s) = if batch {
                    run_reduction(
                        &ctx,
                        Kernel::BnStats,
                        Consts::default(),
                        &bp(),
                        &[&xb, &stats],
                        c,
                        n * hw,
                        span,
                    );
                    let got = read(&ctx, &stats);
                    let (mean, s) = bn::batch_stats(&g, &x);
                    worst.check(
                        "bn_stats",
                        &format!("{what} mean"),
                        &got[row(0)],
                        &mean,
                        TOL,
                    );
                    worst.check("bn_stats", &format!("{what} s"), &got[row(1)], &s, TOL);
                    // The biased variance training folds into running_var.
                    let (_, var) = bn::batch_moments(&g, &x);
                    worst.check(
                        "bn_stats",
                        &format!("{what} σ²"),
                        &got[row(bn_rows::VAR)],
                        &var,
                        TOL,
                    );
                    (got[row(0)].to_vec(), got[row(1)].to_vec())
                } else {
                    let rm = rnd(&mut r, c);
                    let rv = uniform(&mut r, c, 0.2, 2.0);
                    let (m, s) = bn::running_stats(&rm, &rv);
                    let rows: Vec<f64> = m.iter().chain(&s).map(|&v| v as f32 as f64).collect();
                    ctx.write_f32(&stats, 0, &to_f32(&rows)).unwrap();
                    (rows[..c].to_vec(), rows[c..].to_vec())
                };

                // ---- forward.
                let (xhat, y) = bn::forward(&g, &x, &mean, &s, gamma, beta);
                let (xhb, yb) = (poisoned(&ctx, "x̂", len), poisoned(&ctx, "y", len));
                run(
                    &ctx,
                    Kernel::BnForward,
                    &bp(),
                    &[&xb, &stats, &tb, &xhb, &yb],
                    Grid::Threads(kernels::bn_threads(n, c, hw)),
                );
                worst.check(
                    "bn_forward",
                    &format!("{what} x̂"),
                    &read(&ctx, &xhb),
                    &xhat,
                    TOL,
                );
                worst.check(
                    "bn_forward",
                    &format!("{what} y"),
                    &read(&ctx, &yb),
                    &y,
                    TOL,
                );

                // ---- R-forward; in batch mode rows 2, 3 = Σẋ, Σx̂ẋ from
                // channel_sums over the kernel's own x̂, as the engine does.
                let (xhd, ydot, mxx) =
                    bn::r_forward(&g, batch, &dx, &xhat, &s, gamma, dgamma, dbeta);
                if batch {
                    sums(&dxb, &xhb, bn_rows::SUM_DX, bn_rows::SUM_XHAT_DX);
                    let got = read(&ctx, &stats);
                    let m = (n * hw) as f64;
                    let sum_dx: Vec<f64> = (0..c)
                        .map(|ch| (0..len).filter(|i| (i / hw) % c == ch).map(|i| dx[i]).sum())
                        .collect();
                    worst.check_scaled(
                        "channel_sums",
                        &format!("{what} Σẋ"),
                        &got[row(2)],
                        &sum_dx,
                        &scale(&|i| dx[i]),
                        TOL,
                    );
                    let sxx: Vec<f64> = mxx.iter().map(|v| v * m).collect();
                    worst.check_scaled(
                        "channel_sums",
                        &format!("{what} Σx̂ẋ"),
                        &got[row(3)],
                        &sxx,
                        &scale(&|i| xhat[i] * dx[i]),
                        TOL,
                    );
                }
                let (xhdb, dyb) = (poisoned(&ctx, "x̂̇", len), poisoned(&ctx, "ẏ", len));
                run_with(
                    &ctx,
                    Kernel::BnRForward,
                    Consts::new(&[("BATCH", batch as u32)]),
                    &bp(),
                    &[&dxb, &xhb, &stats, &tb, &vb, &xhdb, &dyb],
                    Grid::Threads(kernels::bn_threads(n, c, hw)),
                );
                worst.check(
                    "bn_r_forward",
                    &format!("{what} x̂̇"),
                    &read(&ctx, &xhdb),
                    &xhd,
                    TOL,
                );
                worst.check(
                    "bn_r_forward",
                    &format!("{what} ẏ"),
                    &read(&ctx, &dyb),
                    &ydot,
                    TOL,
                );

                // ---- backward: rows 4, 5 = Σgy, Σgy·x̂ (gβ, gγ, also added
                // into a gradient buffer), then gx, overwriting or accumulating.
                let p0 = rnd(&mut r, plen);
                let pg = upload(&ctx, "gradient", &p0);
                param_sums(
                    &gyb,
                    &xhb,
                    None,
                    [bn_rows::SUM_GY, bn_rows::SUM_GY_XHAT, 0],
                    &pg,
                );
                let (gx, dgam, dbet) = bn::backward(&g, batch, &gy, &xhat, &s, gamma);
                let got = read(&ctx, &stats);
                let gotp = read(&ctx, &pg);
                added(
                    &mut worst,
                    &format!("{what} gγ added"),
                    &gotp[goff..goff + c],
                    &p0[goff..goff + c],
                    &dgam,
                    &scale(&|i| gy[i] * xhat[i]),
                );
                added(
                    &mut worst,
                    &format!("{what} gβ added"),
                    &gotp[boff..boff + c],
                    &p0[boff..boff + c],
                    &dbet,
                    &scale(&|i| gy[i]),
                );
                worst.check_scaled(
                    "bn_param_sums",
                    &format!("{what} gγ"),
                    &got[row(5)],
                    &dgam,
                    &scale(&|i| gy[i] * xhat[i]),
                    TOL,
                );
                worst.check_scaled(
                    "bn_param_sums",
                    &format!("{what} gβ"),
                    &got[row(4)],
                    &dbet,
                    &scale(&|i| gy[i]),
                    TOL,
                );
                for acc in [false, true] {
                    let g0 = rnd(&mut r, len);
                    let gxb = if acc {
                        upload(&ctx, "gx", &g0)
                    } else {
                        poisoned(&ctx, "gx", len)
                    };
                    let consts = Consts::bn(batch, acc);
                    run_with(
                        &ctx,
                        Kernel::BnBackward,
                        consts,
                        &bp(),
                        &[&gyb, &xhb, &stats, &tb, &gxb],
                        Grid::Threads(kernels::bn_threads(n, c, hw)),
                    );
                    let want = if acc { plus(&gx, &g0) } else { gx.clone() };
                    worst.check(
                        "bn_backward",
                        &format!("{what} gx acc={acc}"),
                        &read(&ctx, &gxb),
                        &want,
                        TOL,
                    );
                }

                // ---- R-backward: rows 6, 7 = ΣR(gy), ΣR(gy)·x̂ and
                // 8 = Σgy·x̂̇ over the kernels' own x̂, x̂̇, in one dispatch.
                let h0 = rnd(&mut r, plen);
                let ph = upload(&ctx, "Hv", &h0);
                param_sums(
                    &rgyb,
                    &xhb,
                    Some((&gyb, &xhdb)),
                    [bn_rows::SUM_RGY, bn_rows::SUM_RGY_XHAT, bn_rows::SUM_GY_XHD],
                    &ph,
                );
                let (rgx, rdgam, rdbet) =
                    bn::r_backward(&g, batch, &gy, &rgy, &xhat, &xhd, &s, &mxx, gamma, dgamma);
                let got = read(&ctx, &stats);
                let gotp = read(&ctx, &ph);
                added(
                    &mut worst,
                    &format!("{what} R(gγ) added"),
                    &gotp[goff..goff + c],
                    &h0[goff..goff + c],
                    &rdgam,
                    &scale(&|i| (rgy[i] * xhat[i]).abs() + (gy[i] * xhd[i]).abs()),
                );
                added(
                    &mut worst,
                    &format!("{what} R(gβ) added"),
                    &gotp[boff..boff + c],
                    &h0[boff..boff + c],
                    &rdbet,
                    &scale(&|i| rgy[i]),
                );
                let rg = plus(&got[row(7)], &got[row(bn_rows::SUM_GY_XHD)]);
                // R(gγ) = row 7 + row 8: two sums that may cancel.
                worst.check_scaled(
                    "bn_param_sums",
                    &format!("{what} R(gγ)"),
                    &rg,
                    &rdgam,
                    &scale(&|i| (rgy[i] * xhat[i]).abs() + (gy[i] * xhd[i]).abs()),
                    TOL,
                );
                worst.check_scaled(
                    "bn_param_sums",
                    &format!("{what} R(gβ)"),
                    &got[row(6)],
                    &rdbet,
                    &scale(&|i| rgy[i]),
                    TOL,
                );
                for acc in [false, true] {
                    let r0 = rnd(&mut r, len);
                    let rgxb = if acc {
                        upload(&ctx, "R(gx)", &r0)
                    } else {
                        poisoned(&ctx, "R(gx)", len)
                    };
                    let consts = Consts::bn(batch, acc);
                    run_with(
                        &ctx,
                        Kernel::BnRBackward,
                        consts,
                        &bp(),
                        &[&gyb, &rgyb, &xhb, &xhdb, &stats, &tb, &vb, &rgxb],
                        Grid::Threads(kernels::bn_threads(n, c, hw)),
                    );
                    let want = if acc { plus(&rgx, &r0) } else { rgx.clone() };
                    worst.check(
                        "bn_r_backward",
                        &format!("{what} R(gx) acc={acc}"),
                        &read(&ctx, &rgxb),
                        &want,
                        TOL,
                    );
                }
            }
        }
    }
    worst.report("batch norm");
}

// ---------------------------------------------------------------- pooling

#[derive(Clone, Copy, Debug)]
enum PoolData {
    /// Five distinct values: ties in most windows; the first maximum wins.
    Ties,
    /// Continuous uniform(-1, 1).
    Uniform,
    /// All negative: a padded window position must never win as a 0.
    Negative,
}

#[test]
fn pooling_kernels_match() {
    let mut worst = Worst::default();
    // (planes, h, w, k, stride, pad): the models' two max-pool forms on
    // random odd and even sizes, and one large layer.
    let mut cases = vec![(128usize, 32usize, 32usize, 3usize, 2usize, 1usize)];
    {
        let mut r = StdRng::seed_from_u64(40);
        for (k, s, p) in [(2, 2, 0), (3, 2, 1)] {
            for _ in 0..3 {
                cases.push((
                    r.random_range(1..=12),
                    r.random_range(k - 2 * p..=13),
                    r.random_range(k - 2 * p..=13),
                    k,
                    s,
                    p,
                ));
            }
        }
    }
    let mut ties_decided = 0;
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        let mut r = StdRng::seed_from_u64(4);
        for &(planes, h, w, k, s, pad) in &cases {
            let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
            let (il, ol) = (planes * h * w, planes * oh * ow);
            for data in [PoolData::Ties, PoolData::Uniform, PoolData::Negative] {
                let what = format!("{backend} maxpool {planes}x{h}x{w} k{k} s{s} p{pad} {data:?}");
                let x: Vec<f64> = match data {
                    PoolData::Ties => (0..il)
                        .map(|_| (r.random_range(0..5) as f64 - 2.0) * 0.5)
                        .collect(),
                    PoolData::Uniform => rnd(&mut r, il),
                    PoolData::Negative => uniform(&mut r, il, -2.0, -1.0),
                };
                let (yref, aref) = pool::maxpool_forward(planes, h, w, k, s, pad, oh, ow, &x);
                if let PoolData::Ties = data {
                    // Windows where the last maximum differs from the first:
                    // a kernel keeping the last (>= instead of >) would fail.
                    for (o, &best) in yref.iter().enumerate() {
                        let (pl, oy, ox) = (o / (oh * ow), (o % (oh * ow)) / ow, o % ow);
                        let maxima = (0..k * k)
                            .filter(|t| {
                                let iy = (oy * s + t / k) as isize - pad as isize;
                                let ix = (ox * s + t % k) as isize - pad as isize;
                                (0..h as isize).contains(&iy)
                                    && (0..w as isize).contains(&ix)
                                    && x[pl * h * w + iy as usize * w + ix as usize] == best
                            })
                            .count();
                        if maxima > 1 {
                            ties_decided += 1;
                        }
                    }
                }
                let xb = upload(&ctx, "x", &x);
                let (yb, ab) = (poisoned(&ctx, "y", ol), poisoned(&ctx, "argmax", ol));
                let p = || PoolParams {
                    planes: planes as u32,
                    h: h as u32,
                    w: w as u32,
                    k: k as u32,
                    stride: s as u32,
                    pad: pad as u32,
                    oh: oh as u32,
                    ow: ow as u32,
                    ..Default::default()
                };
                run(
                    &ctx,
                    Kernel::MaxPoolForward,
                    &p(),
                    &[&xb, &yb, &ab],
                    Grid::Threads(ol),
                );
                worst.check(
                    "maxpool_forward",
                    &format!("{what} values"),
                    &read(&ctx, &yb),
                    &yref,
                    EXACT,
                );
                let got_arg = read_u32(&ctx, &ab);
                if let Some(o) = (0..ol).find(|&o| got_arg[o] != aref[o]) {
                    panic!(
                        "{what}: argmax of output {o} is {} (value {}), want the first maximum {} (value {})",
                        got_arg[o],
                        x.get((o / (oh * ow)) * h * w + got_arg[o] as usize).copied().unwrap_or(f64::NAN),
                        aref[o],
                        yref[o]
                    );
                }

                // ---- gather through the argmax (R-forward).
                let dx = rnd(&mut r, il);
                let dxb = upload(&ctx, "ẋ", &dx);
                let gb = poisoned(&ctx, "gathered", ol);
                run(
                    &ctx,
                    Kernel::MaxPoolGather,
                    &p(),
                    &[&dxb, &ab, &gb],
                    Grid::Threads(ol),
                );
                worst.check(
                    "maxpool_gather",
                    &format!("{what} gather"),
                    &read(&ctx, &gb),
                    &pool::maxpool_gather(planes, h * w, oh * ow, &aref, &dx),
                    EXACT,
                );

                // ---- backward (scatter as a gather over covering windows),
                // overwriting or accumulating.
                let gy = rnd(&mut r, ol);
                let gyb = upload(&ctx, "gy", &gy);
                let want = pool::maxpool_scatter(planes, h * w, oh * ow, &aref, &gy);
                for acc in [false, true] {
                    let g0 = rnd(&mut r, il);
                    let gx = if acc {
                        upload(&ctx, "gx", &g0)
                    } else {
                        poisoned(&ctx, "gx", il)
                    };
                    run_with(
                        &ctx,
                        Kernel::MaxPoolBackward,
                        Consts::acc(acc),
                        &p(),
                        &[&gyb, &ab, &gx],
                        Grid::Threads(il),
                    );
                    let w2 = if acc { plus(&want, &g0) } else { want.clone() };
                    worst.check(
                        "maxpool_backward",
                        &format!("{what} backward acc={acc}"),
                        &read(&ctx, &gx),
                        &w2,
                        TOL_FEW,
                    );
                }
            }
        }

        // ---- global average pool: forward, backward (overwrite, acc).
        let mut gap_cases = vec![(70usize, 8usize, 8usize), (3, 1, 1), (300, 4, 4)];
        for _ in 0..2 {
            gap_cases.push((
                r.random_range(1..=40),
                r.random_range(1..=9),
                r.random_range(1..=9),
            ));
        }
        for (planes, h, w) in gap_cases {
            let what = format!("{backend} gap {planes}x{h}x{w}");
            let hw = h * w;
            let x = rnd(&mut r, planes * hw);
            let xb = upload(&ctx, "x", &x);
            let y = poisoned(&ctx, "y", planes);
            let p = || PoolParams {
                planes: planes as u32,
                h: h as u32,
                w: w as u32,
                oh: 1,
                ow: 1,
                ..Default::default()
            };
            run(
                &ctx,
                Kernel::GapForward,
                &p(),
                &[&xb, &y],
                Grid::Threads(planes),
            );
            worst.check(
                "gap_forward",
                &format!("{what} forward"),
                &read(&ctx, &y),
                &pool::gap_forward(planes, hw, &x),
                TOL,
            );
            let gy = rnd(&mut r, planes);
            let gyb = upload(&ctx, "gy", &gy);
            let want = pool::gap_backward(planes, hw, &gy);
            for acc in [false, true] {
                let g0 = rnd(&mut r, planes * hw);
                let gx = if acc {
                    upload(&ctx, "gx", &g0)
                } else {
                    poisoned(&ctx, "gx", planes * hw)
                };
                run_with(
                    &ctx,
                    Kernel::GapBackward,
                    Consts::acc(acc),
                    &p(),
                    &[&gyb, &gx],
                    Grid::Threads(planes * hw),
                );
                let w2 = if acc { plus(&want, &g0) } else { want.clone() };
                worst.check(
                    "gap_backward",
                    &format!("{what} backward acc={acc}"),
                    &read(&ctx, &gx),
                    &w2,
                    TOL_FEW,
                );
            }
        }
    }
    // The tie data must actually exercise first-maximum selection.
    assert!(
        ties_decided > 100,
        "only {ties_decided} windows had tied maxima"
    );
    worst.report("pooling");
}

// ---------------------------------------------------------------- average pooling

#[test]
fn average_pooling_kernels_match() {
    let mut worst = Worst::default();
    // (planes, h, w, k, stride, pad), count_include_pad: every k in 1..=5
    // with every stride 1..=3 at a random pad 0..=k/2 on random (odd and
    // even) sizes; per k a shape with a 1×1 output; 1×1 images; strides
    // past k (inputs no window covers); one large layer.
    let mut cases = vec![
        (128usize, 32usize, 32usize, 2usize, 2usize, 0usize),
        (5, 1, 1, 1, 1, 0),
        (7, 1, 1, 3, 1, 1),
        (3, 1, 1, 5, 3, 2),
        (4, 9, 7, 1, 3, 0),
        (6, 11, 13, 2, 3, 1),
    ];
    {
        let mut r = StdRng::seed_from_u64(60);
        for k in 1..=5usize {
            for s in 1..=3usize {
                let pad = r.random_range(0..=k / 2);
                let lo = (k - 2 * pad).max(1);
                cases.push((
                    r.random_range(1..=12),
                    r.random_range(lo..=13) | 1,
                    r.random_range(lo..=13),
                    k,
                    s,
                    pad,
                ));
            }
            // A 1×1 output: h + 2·pad − k < s.
            let (s, pad) = loop {
                let (s, pad) = (r.random_range(1..=3), r.random_range(0..=k / 2));
                if k - 2 * pad >= 1 || s >= 2 {
                    break (s, pad);
                }
            };
            let (lo, hi) = ((k - 2 * pad).max(1), s + k - 2 * pad);
            cases.push((
                r.random_range(1..=12),
                r.random_range(lo..hi),
                r.random_range(lo..hi),
                k,
                s,
                pad,
            ));
        }
    }
    let one_pixel = cases
        .iter()
        .filter(|&&(_, h, w, k, s, pad)| (h + 2 * pad - k) / s == 0 && (w + 2 * pad - k) / s == 0)
        .count();
    assert!(one_pixel >= 8, "only {one_pixel} cases have a 1×1 output");
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        let mut r = StdRng::seed_from_u64(6);
        for &(planes, h, w, k, s, pad) in &cases {
            let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
            let (il, ol) = (planes * h * w, planes * oh * ow);
            let what = format!("{backend} avgpool {planes}x{h}x{w} k{k} s{s} p{pad}");
            let p = PoolParams {
                planes: planes as u32,
                h: h as u32,
                w: w as u32,
                k: k as u32,
                stride: s as u32,
                pad: pad as u32,
                oh: oh as u32,
                ow: ow as u32,
                ..Default::default()
            };

            // ---- forward (the engine's forward and R-forward), into an
            // output 3 longer whose tail must stay untouched.
            let x = rnd(&mut r, il);
            let xb = upload(&ctx, "x", &x);
            let y = poisoned(&ctx, "y", ol + 3);
            let before = read_raw(&ctx, &y);
            run(
                &ctx,
                Kernel::AvgPoolForward,
                &p,
                &[&xb, &y],
                Grid::Threads(ol),
            );
            let tag = format!("{what} forward");
            worst.check(
                "avgpool_forward",
                &tag,
                &read(&ctx, &y)[..ol],
                &pool::avgpool_forward(planes, h, w, k, s, pad, oh, ow, &x),
                TOL_FEW,
            );
            untouched(&tag, &read_raw(&ctx, &y), &before, &[0..ol]);

            // ---- backward, overwriting (poisoned) or adding (ACC)
            // into random values.
            let gy = rnd(&mut r, ol);
            let gyb = upload(&ctx, "gy", &gy);
            let want = pool::avgpool_backward(planes, h, w, k, s, pad, oh, ow, &gy);
            for acc in [false, true] {
                let g0 = rnd(&mut r, il + 3);
                let gx = if acc {
                    upload(&ctx, "gx", &g0)
                } else {
                    poisoned(&ctx, "gx", il + 3)
                };
                let before = read_raw(&ctx, &gx);
                run_with(
                    &ctx,
                    Kernel::AvgPoolBackward,
                    Consts::new(&[("ACC", acc as u32)]),
                    &p,
                    &[&gyb, &gx],
                    Grid::Threads(il),
                );
                let w2 = if acc { plus(&want, &g0) } else { want.clone() };
                let tag = format!("{what} backward acc={acc}");
                worst.check(
                    "avgpool_backward",
                    &tag,
                    &read(&ctx, &gx)[..il],
                    &w2,
                    TOL_FEW,
                );
                untouched(&tag, &read_raw(&ctx, &gx), &before, &[0..il]);
            }
        }
    }
    worst.report("average pooling");
}

// ---------------------------------------------------------------- activations

/// The smooth activations (tanh, sigmoid, GELU, SiLU) evaluate exp, erfc
/// and their derivatives in f32 (shaders/activation.wgsl): each of f, f',
/// f'' within a few ulp of its exact value at the f32 input, relative to
/// the terms it sums (Φ + x·φ, σ·(1 + x·σ(−x)), …). The outputs add at most
/// 4 roundings to that (f'(x)·R(gy) + f''(x)·ẋ·gy, and the accumulated
/// value), so each element errs by ≲ 10u ≈ 6e-7 relative to its terms, and
/// the relative L2 error over thousands of random elements, where the
/// roundings do not align, by ~u·√10 ≈ 2e-7 (measured: ≤ 7e-8 on both
/// backends). `TOL_ACT` = 1e-6 bounds that L2 error over |x| ≤ 8, while a
/// wrong formula, constant or branch errs by ≥ 1e-4 (Numerical Recipes'
/// erfc fit alone is 1.2e-7).
const TOL_ACT: f64 = 1e-6;

/// The same outputs element by element, relative to the size of what each
/// sums (`act_terms`), over every input including the large ones: the
/// check that sees the tails, where the L2 error cannot (σ'(8) ≈ 3e-4 next
/// to elements of size 1). Computing σ' as σ(1 − σ) would err by ~1e-4
/// there (1 − σ(8) cancels), Φ(x) as 1 − Φ(−x) by 100 % at x = −8
/// (Φ(−8) ≈ 6e-16 is below f32's ulp of 1), and both pass the L2 check. By
/// the count above ≲ 10u ≈ 6e-7 (f' or f'' a few ulp each, 4 roundings);
/// measured: ≤ 3.8e-7 (GELU forward, both backends), ≤ 3e-7 for every
/// other smooth output. 2e-6 ≈ 34u leaves 5× headroom, 100× below the
/// smallest of those cancellations.
const TOL_ACT_ELEM: f64 = 2e-6;

/// Every activation (LeakyReLU at two slopes, f32-exact so that the f64
/// reference has the kernel's), with its report name.
fn activations() -> Vec<(Activation, &'static str)> {
    vec![
        (Activation::Relu, "relu"),
        (
            Activation::LeakyRelu {
                slope: 0.1f32 as f64,
            },
            "leaky_relu(0.1)",
        ),
        (
            Activation::LeakyRelu {
                slope: 0.01f32 as f64,
            },
            "leaky_relu(0.01)",
        ),
        (Activation::Tanh, "tanh"),
        (Activation::Sigmoid, "sigmoid"),
        (Activation::Gelu, "gelu"),
        (Activation::Silu, "silu"),
    ]
}

/// The tolerances (relative L2, per element) of an activation's outputs:
/// ReLU and its derivative only select (exact), unless accumulating (one
/// add, `TOL_FEW`); LeakyReLU adds the product with the slope (one
/// rounding, `TOL_FEW`); the smooth ones `TOL_ACT` and `TOL_ACT_ELEM`.
fn act_tol(a: Activation, acc: bool) -> (f64, f64) {
    match a {
        Activation::Relu if !acc => (EXACT, EXACT),
        Activation::Relu | Activation::LeakyRelu { .. } => (TOL_FEW, TOL_FEW),
        _ => (TOL_ACT, TOL_ACT_ELEM),
    }
}

/// The sizes of f(x), f'(x) and f''(x) at one x: the sum of the magnitudes
/// of the terms the kernel adds to form each, to which its rounding error
/// is proportional.
struct Terms {
    f: f64,
    d1: f64,
    /// 0 for ReLU and LeakyReLU, whose R-backward has no f'' term.
    d2: f64,
}

/// `Terms` of `a` at x: Φ + |x|·φ for GELU', σ·(1 + |x|·σ(−x)) for SiLU',
/// σ'·(2 + |x·tanh(x/2)|) for SiLU''; the others are products (no
/// cancellation), their size their magnitude. GELU'' = φ·(2 − x²) is a
/// product too: the shader forms 2 − x² exactly.
fn act_terms(a: Activation, x: f64) -> Terms {
    let (f, d1, d2) = (
        act::f(a, x).abs(),
        act::df(a, x).abs(),
        act::d2f(a, x).abs(),
    );
    let (d1, d2) = match a {
        Activation::Gelu => {
            let phi = act::normal_pdf(x);
            let xphi = if phi == 0.0 { 0.0 } else { x.abs() * phi };
            (act::normal_cdf(x) + xphi, d2)
        }
        Activation::Silu => {
            let (s, sm) = (act::sigmoid(x), act::sigmoid(-x));
            let xsm = if sm == 0.0 { 0.0 } else { x.abs() * sm };
            let s1 = s * sm;
            let xt = if s1 == 0.0 {
                0.0
            } else {
                (x * (0.5 * x).tanh()).abs()
            };
            (s * (1.0 + xsm), s1 * (2.0 + xt))
        }
        _ => (d1, d2),
    };
    Terms { f, d1, d2 }
}

/// Every element finite and within `tol` of `want` relative to `scale`
/// (exact where the scale is 0).
#[track_caller]
fn check_elems(
    worst: &mut Worst,
    kernel: &str,
    what: &str,
    got: &[f64],
    want: &[f64],
    scale: &[f64],
    tol: f64,
) {
    assert!(
        got.len() == want.len() && got.len() == scale.len(),
        "{what}: length"
    );
    let (mut rel, mut max_abs) = (0.0f64, 0.0f64);
    for i in 0..got.len() {
        let (a, b) = (got[i], want[i]);
        assert!(a.is_finite(), "{what}: element {i} is {a} (want {b})");
        let e = (a - b).abs();
        let er = if e == 0.0 { 0.0 } else { e / scale[i] };
        assert!(
            er <= tol,
            "{what}: element {i}: got {a}, want {b}, relative to {} {er:.2e} > {tol:.0e}",
            scale[i]
        );
        rel = rel.max(er);
        max_abs = max_abs.max(e);
    }
    worst.record(kernel, what, rel, max_abs);
}

#[test]
fn activation_kernels_match() {
    let mut worst = Worst::default();
    let mut worst_elem = Worst::default();
    // Large inputs where every output must stay finite and exact up to
    // roundings: past every exp's range, ±1e30 (x² overflows f32), and
    // f32's extremes.
    let large: Vec<f64> = [1e4, -1e4, 1e30, -1e30, f32::MAX as f64, -(f32::MAX as f64)]
        .iter()
        .map(|&v| v as f32 as f64)
        .collect();
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        worst_elem.on(&backend);
        let mut r = StdRng::seed_from_u64(7);
        for (a, name) in activations() {
            // x: uniform over [-8, 8] with every 7th an exact 0 (ReLU' and
            // LeakyReLU' take the x ≤ 0 side there) and every 29th a -0,
            // then the large inputs; a length off the 256-thread groups.
            let n0 = r.random_range(2000..=3000) / 256 * 256 + r.random_range(1..=255);
            let mut x = uniform(&mut r, n0, -8.0, 8.0);
            for (i, v) in x.iter_mut().enumerate() {
                if i % 7 == 0 {
                    *v = 0.0;
                } else if i % 29 == 0 {
                    *v = -0.0;
                }
            }
            x.extend(&large);
            let len = x.len();
            let (dx, gy, rgy) = (rnd(&mut r, len), rnd(&mut r, len), rnd(&mut r, len));
            let (xb, dxb, gyb, rgyb) = (
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );
            let slope = match a {
                Activation::LeakyRelu { slope } => slope as f32,
                _ => 0.0,
            };
            let p = ActParams {
                len: len as u32,
                slope,
                ..Default::default()
            };
            let code = act_code(a);
            // What each kernel writes or adds, and the size of its terms.
            let fwd = act::forward(a, &x);
            let rfwd = act::r_forward(a, &x, &dx);
            let mut bwd = vec![0.0; len];
            act::backward_acc(a, &x, &gy, &mut bwd);
            let mut rbwd = vec![0.0; len];
            act::r_backward_acc(a, &x, &dx, &gy, &rgy, &mut rbwd);
            // The reference in f64 stays finite on the large inputs too.
            for v in [&fwd, &rfwd, &bwd, &rbwd] {
                assert!(v.iter().all(|e| e.is_finite()), "{name}: reference");
            }
            let t: Vec<Terms> = x.iter().map(|&v| act_terms(a, v)).collect();
            let sf: Vec<f64> = t.iter().map(|t| t.f).collect();
            let srf: Vec<f64> = (0..len).map(|i| t[i].d1 * dx[i].abs()).collect();
            let sb: Vec<f64> = (0..len).map(|i| t[i].d1 * gy[i].abs()).collect();
            let srb: Vec<f64> = (0..len)
                .map(|i| t[i].d1 * rgy[i].abs() + t[i].d2 * (dx[i] * gy[i]).abs())
                .collect();
            // (kernel, report name, has ACC, inputs, reference, term size).
            let runs = [
                (
                    Kernel::ActForward,
                    "act_forward",
                    false,
                    vec![&xb],
                    &fwd,
                    &sf,
                ),
                (
                    Kernel::ActRForward,
                    "act_r_forward",
                    false,
                    vec![&xb, &dxb],
                    &rfwd,
                    &srf,
                ),
                (
                    Kernel::ActBackward,
                    "act_backward",
                    true,
                    vec![&xb, &gyb],
                    &bwd,
                    &sb,
                ),
                (
                    Kernel::ActRBackward,
                    "act_r_backward",
                    true,
                    vec![&xb, &dxb, &gyb, &rgyb],
                    &rbwd,
                    &srb,
                ),
            ];
            for (kernel, kname, has_acc, inputs, want, scale) in runs {
                let accs: &[bool] = if has_acc { &[false, true] } else { &[false] };
                for &acc in accs {
                    let consts = if has_acc {
                        Consts::new(&[("ACT", code), ("ACC", acc as u32)])
                    } else {
                        Consts::new(&[("ACT", code)])
                    };
                    // An output 3 longer: the tail must stay untouched.
                    let y0 = rnd(&mut r, len + 3);
                    let y = if acc {
                        upload(&ctx, "out", &y0)
                    } else {
                        poisoned(&ctx, "out", len + 3)
                    };
                    let before = read_raw(&ctx, &y);
                    let mut bufs = inputs.clone();
                    bufs.push(&y);
                    run_with(&ctx, kernel, consts, &p, &bufs, Grid::Threads(len));
                    let got = read(&ctx, &y);
                    let (want, scale) = if acc {
                        let y0_abs: Vec<f64> = y0[..len].iter().map(|v| v.abs()).collect();
                        (plus(want, &y0), plus(scale, &y0_abs))
                    } else {
                        (want.clone(), scale.clone())
                    };
                    let key = format!("{kname} {name}");
                    let tag = format!("{backend} {key} len {len} acc={acc}");
                    let (tol, tol_elem) = act_tol(a, acc);
                    worst.check(
                        &key,
                        &format!("{tag} |x| <= 8"),
                        &got[..n0],
                        &want[..n0],
                        tol,
                    );
                    check_elems(
                        &mut worst_elem,
                        &key,
                        &tag,
                        &got[..len],
                        &want,
                        &scale,
                        tol_elem,
                    );
                    untouched(&tag, &read_raw(&ctx, &y), &before, &[0..len]);
                }
            }
        }
    }
    worst.report("activations, relative L2 over |x| <= 8");
    worst_elem.report("activations, per element relative to its terms (every x)");
}

// ---------------------------------------------------------------- loss

#[test]
fn softmax_cross_entropy_kernels_match() {
    let mut worst = Worst::default();
    // (n, classes, logit shift): a shift of 90 makes exp overflow f32
    // unless the row maximum is subtracted first.
    let mut cases = vec![
        (37usize, 10usize, 0.0f64),
        (300, 4, 0.0),
        (3, 1000, 0.0),
        (20, 10, 90.0),
    ];
    {
        let mut r = StdRng::seed_from_u64(50);
        for _ in 0..2 {
            cases.push((r.random_range(1..=300), r.random_range(2..=30), 0.0));
        }
    }
    for (backend, ctx) in gpu_contexts() {
        worst.on(&backend);
        let mut r = StdRng::seed_from_u64(5);
        for &(n, k, shift) in &cases {
            let what = format!("{backend} xent {n}x{k} shift {shift}");
            let z: Vec<f64> = rnd(&mut r, n * k)
                .iter()
                .map(|v| (shift + 4.0 * v) as f32 as f64)
                .collect();
            let y: Vec<u32> = (0..n).map(|_| r.random_range(0..k as u32)).collect();
            // 1/N for a data set of N ≥ n samples, f32-exact.
            let scale = (1.0 / r.random_range(n..=3 * n) as f64) as f32 as f64;
            let (_, gz, p) = loss::forward_backward(n, k, &z, &y, scale);
            let per_sample: Vec<f64> = (0..n)
                .map(|i| {
                    loss::forward_backward(1, k, &z[i * k..(i + 1) * k], &y[i..i + 1], scale).0
                })
                .collect();
            let zb = upload(&ctx, "z", &z);
            let yb = ctx.storage("labels", n).unwrap();
            ctx.write_u32(&yb, &y).unwrap();
            let (pb, lb, gb) = (
                poisoned(&ctx, "p", n * k),
                poisoned(&ctx, "losses", n),
                poisoned(&ctx, "gz", n * k),
            );
            let pr = LossParams {
                n: n as u32,
                k: k as u32,
                scale: scale as f32,
                ..Default::default()
            };
            run(
                &ctx,
                Kernel::XentForwardBackward,
                &pr,
                &[&zb, &yb, &pb, &lb, &gb],
                Grid::Threads(n),
            );
            worst.check(
                "xent_forward_backward",
                &format!("{what} p"),
                &read(&ctx, &pb),
                &p,
                TOL,
            );
            worst.check(
                "xent_forward_backward",
                &format!("{what} loss"),
                &read(&ctx, &lb),
                &per_sample,
                TOL,
            );
            worst.check(
                "xent_forward_backward",
                &format!("{what} gz"),
                &read(&ctx, &gb),
                &gz,
                TOL,
            );

            // ---- R-backward on the kernel's own p, as the engine runs it.
            let dz = rnd(&mut r, n * k);
            let dzb = upload(&ctx, "ż", &dz);
            let rg = poisoned(&ctx, "R(gz)", n * k);
            run(
                &ctx,
                Kernel::XentRBackward,
                &pr,
                &[&pb, &dzb, &rg],
                Grid::Threads(n),
            );
            worst.check(
                "xent_r_backward",
                &format!("{what} R(gz)"),
                &read(&ctx, &rg),
                &loss::r_backward(n, k, &p, &dz, scale),
                TOL,
            );
        }
    }
    worst.report("softmax cross-entropy");
}

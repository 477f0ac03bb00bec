//! Grouped, depthwise and dilated convolution (shaders/conv_direct.wgsl,
//! which the conv unit runs for every such layer on either conv path) and
//! the pools with ceil_mode (shaders/pool.wgsl) against the float64
//! reference (src/ops) on random shapes and inputs, on Vulkan (lavapipe)
//! and GL (llvmpipe), with the harness of tests/gpu_kernels.rs: outputs
//! poisoned with NaN, accumulating outputs starting from random values,
//! the weight-gradient partials and sum leaving the rest of their buffers
//! bit-for-bit as they were.
//!
//! Tolerances, ‖gpu − ref‖/‖ref‖ (inputs f32-exact, so the only error is
//! the kernels' f32 rounding, u = 2⁻²⁴ ≈ 6e-8):
//! - `TOL` = 1e-5 for the conv sums: the longest serial chain is
//!   2·(cin/groups)·k² ≤ 400 terms (forward), 2·(cout/groups)·k² ≤ 400
//!   (backward data), 2·rows_per_chunk·ow ≤ 2·(256 + ow) (the weight
//!   partials) plus the chunks (the sum); a random-sign sum of L terms errs
//!   by ≈ u·√L ≈ 2e-6 at worst, while a wrong index, group or tap errs by
//!   ≥ 1e-2 on these inputs.
//! - `TOL_FEW` = 1e-6 for average pooling (window sums of ≤ 16 terms and
//!   a division: a few u) and max pooling's scatter (≤ 16-term sums);
//!   exact equality for max pooling's values and argmax (it selects).

mod common;

use common::gpu_contexts;
use hesscope::gpu::kernels::{Consts, ConvParams, Kernel, PoolParams};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{GpuBuffer, GpuContext};
use hesscope::ops::{conv, pool};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-5;
const TOL_FEW: f64 = 1e-6;

fn rnd(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| (2.0 * r.random::<f64>() - 1.0) as f32 as f64)
        .collect()
}

fn upload(ctx: &GpuContext, name: &str, v: &[f64]) -> GpuBuffer {
    let b = ctx.storage(name, v.len()).unwrap();
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    ctx.write_f32(&b, 0, &f).unwrap();
    b
}

fn poisoned(ctx: &GpuContext, name: &str, n: usize) -> GpuBuffer {
    let b = ctx.storage(name, n).unwrap();
    ctx.write_f32(&b, 0, &vec![f32::NAN; n]).unwrap();
    b
}

fn read_raw(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f64> {
    read_raw(ctx, b).iter().map(|&x| x as f64).collect()
}

fn plus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn run(ctx: &GpuContext, k: Kernel, c: Consts, p: &ConvParams, bufs: &[&GpuBuffer], grid: Grid) {
    dispatch_once(ctx, k, c, p, bufs, grid).unwrap();
}

/// Relative error ≤ tol with every element finite; returns the error.
#[track_caller]
fn check(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: element {i} is {} (want {}): unwritten?",
            got[i], want[i]
        );
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let rel = if num == 0.0 { 0.0 } else { (num / den).sqrt() };
    assert!(rel <= tol, "{what}: relative error {rel:.2e} > {tol:.0e}");
    rel
}

/// A random grouped / depthwise / dilated geometry: groups 1, 2, 4 or
/// depthwise (groups = cin, channel multiplier 1 or 2), dilation 1..=3,
/// stride 1..=2, k 1, 3 or 5, padding 0 to past half the span, images
/// from the smallest the span allows.
fn draw(r: &mut StdRng) -> conv::ConvGeom {
    let kind = r.random_range(0..4);
    let (cin, cout, groups) = match kind {
        0..=2 => {
            let g = [1, 2, 4][kind];
            (g * r.random_range(1..=4), g * r.random_range(1..=4), g)
        }
        _ => {
            let c = r.random_range(1..=12);
            (c, c * r.random_range(1..=2), c)
        }
    };
    let k: usize = [1, 3, 5][r.random_range(0..3)];
    let dilation = r.random_range(1..=3);
    let stride = r.random_range(1..=2);
    let span = dilation * (k - 1) + 1;
    let pad = r.random_range(0..=span / 2 + 1);
    let min = span.saturating_sub(2 * pad).max(1);
    let (h, w) = (r.random_range(min..min + 8), r.random_range(min..min + 8));
    conv::ConvGeom {
        n: r.random_range(1..=3),
        cin,
        h,
        w,
        cout,
        k,
        stride,
        pad,
        oh: (h + 2 * pad - span) / stride + 1,
        ow: (w + 2 * pad - span) / stride + 1,
        groups,
        dilation,
    }
}

fn params(g: &conv::ConvGeom, wa: usize, wb: usize, bias: usize) -> ConvParams {
    ConvParams {
        n: g.n as u32,
        cin: g.cin as u32,
        h: g.h as u32,
        w: g.w as u32,
        cout: g.cout as u32,
        k: g.k as u32,
        stride: g.stride as u32,
        pad: g.pad as u32,
        oh: g.oh as u32,
        ow: g.ow as u32,
        wa_off: wa as u32,
        wb_off: wb as u32,
        bias_off: bias as u32,
        groups: g.groups as u32,
        ..Default::default()
    }
}

/// Stage one of the weight gradient in f64, [chunk, weight]: the reference
/// weight gradient of each chunk's output rows (n, oy) alone (+ the
/// second pair).
fn weight_partials(
    g: &conv::ConvGeom,
    per: usize,
    chunks: usize,
    a: (&[f64], &[f64]),
    b: Option<(&[f64], &[f64])>,
) -> Vec<f64> {
    let wl = g.cout * g.cin_g() * g.k * g.k;
    let mut out = vec![0.0; wl * chunks];
    let plane = g.oh * g.ow;
    for (c, part) in out.chunks_mut(wl).enumerate() {
        let rows = c * per..((c + 1) * per).min(g.n * g.oh);
        let only = |gy: &[f64]| -> Vec<f64> {
            let mut m = gy.to_vec();
            for (i, v) in m.iter_mut().enumerate() {
                let (n, oy) = (i / (g.cout * plane), (i % plane) / g.ow);
                if !rows.contains(&(n * g.oh + oy)) {
                    *v = 0.0;
                }
            }
            m
        };
        conv::backward_weight_acc(g, &only(a.0), a.1, part);
        if let Some((gy, x)) = b {
            conv::backward_weight_acc(g, &only(gy), x, part);
        }
    }
    out
}

#[test]
fn direct_conv_kernels_match_the_float64_reference() {
    const CASES: usize = 40;
    let mut r = StdRng::seed_from_u64(0x6e0c);
    let cases: Vec<_> = (0..CASES).map(|_| draw(&mut r)).collect();
    // Every kind of layer is drawn.
    assert!(cases.iter().any(|g| g.groups == g.cin && g.cin > 1));
    assert!(cases.iter().any(|g| g.groups == 1 && g.dilation > 1));
    assert!(cases.iter().any(|g| g.groups == 4 && g.cin > 4));
    for (backend, ctx) in gpu_contexts() {
        let mut worst = [0.0f64; 4];
        for g in &cases {
            let what = format!("{backend} {g:?}");
            let (n, cin, cout) = (g.n, g.cin, g.cout);
            let (xl, yl) = (n * cin * g.h * g.w, n * cout * g.oh * g.ow);
            let wl = cout * g.cin_g() * g.k * g.k;
            // Weights then bias at an offset in θ and v, random values after.
            let woff = r.random_range(0..5);
            let boff = woff + wl;
            let plen = boff + cout + r.random_range(0..5);
            let (theta, v) = (rnd(&mut r, plen), rnd(&mut r, plen));
            let (wt, vt) = (&theta[woff..boff], &v[woff..boff]);
            let (bt, bv) = (&theta[boff..boff + cout], &v[boff..boff + cout]);
            let (x, dx, gy, rgy) = (
                rnd(&mut r, xl),
                rnd(&mut r, xl),
                rnd(&mut r, yl),
                rnd(&mut r, yl),
            );
            let (tb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            let (xb, dxb, gyb, rgyb) = (
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );
            let dil = ("DIL", g.dilation as u32);

            // ---- forward: [x, θ, x, θ] (+ θ's bias), the R-forward's
            // [ẋ, θ, x, v] (+ v's bias); overwriting or accumulating.
            for (pair, bias, acc) in [
                (false, false, false),
                (false, true, false),
                (true, false, true),
                (true, true, false),
                (true, true, true),
            ] {
                let y0 = rnd(&mut r, yl);
                let mut want = if acc { y0.clone() } else { vec![0.0; yl] };
                let (bufs, p) = if pair {
                    conv::forward_acc(g, &dx, wt, &mut want);
                    conv::forward_acc(g, &x, vt, &mut want);
                    if bias {
                        conv::bias_acc(n, cout, g.oh * g.ow, bv, &mut want);
                    }
                    ([&dxb, &tb, &xb, &vb], params(g, woff, woff, boff))
                } else {
                    conv::forward_acc(g, &x, wt, &mut want);
                    if bias {
                        conv::bias_acc(n, cout, g.oh * g.ow, bt, &mut want);
                    }
                    ([&xb, &tb, &xb, &tb], params(g, woff, 0, boff))
                };
                let y = if acc {
                    upload(&ctx, "y", &y0)
                } else {
                    poisoned(&ctx, "y", yl)
                };
                let c = Consts::conv(pair, bias, acc).with(dil.0, dil.1);
                let b = [bufs[0], bufs[1], bufs[2], bufs[3], &y];
                run(
                    &ctx,
                    Kernel::ConvDirectForward,
                    c,
                    &p,
                    &b,
                    Grid::Threads(yl),
                );
                let tag = format!("{what} forward pair={pair} bias={bias} acc={acc}");
                worst[0] = worst[0].max(check(&tag, &read(&ctx, &y), &want, TOL));
            }

            // ---- backward data: [gy, θ, gy, θ] and [R(gy), θ, gy, v].
            for (pair, acc) in [(false, false), (false, true), (true, false), (true, true)] {
                let gx0 = rnd(&mut r, xl);
                let mut want = if acc { gx0.clone() } else { vec![0.0; xl] };
                let bufs = if pair {
                    conv::backward_data_acc(g, &rgy, wt, &mut want);
                    conv::backward_data_acc(g, &gy, vt, &mut want);
                    [&rgyb, &tb, &gyb, &vb]
                } else {
                    conv::backward_data_acc(g, &gy, wt, &mut want);
                    [&gyb, &tb, &gyb, &tb]
                };
                let gx = if acc {
                    upload(&ctx, "gx", &gx0)
                } else {
                    poisoned(&ctx, "gx", xl)
                };
                let c = Consts::conv(pair, false, acc).with(dil.0, dil.1);
                let p = params(g, woff, woff, 0);
                let b = [bufs[0], bufs[1], bufs[2], bufs[3], &gx];
                run(
                    &ctx,
                    Kernel::ConvDirectBackwardData,
                    c,
                    &p,
                    &b,
                    Grid::Threads(xl),
                );
                let tag = format!("{what} backward data pair={pair} acc={acc}");
                worst[1] = worst[1].max(check(&tag, &read(&ctx, &gx), &want, TOL));
            }

            // ---- weight gradient in the engine's two stages: partials per
            // (chunk, weight) into a poisoned scratch, then conv_weight_sum
            // adding them into a larger buffer at wa_off. Splits: the
            // engine's, one row per chunk, a random one.
            let rows = n * g.oh;
            let (per_engine, _) = hesscope::gpu::kernels::conv_weight_chunks(n, g.oh, g.ow, wl);
            for per in [per_engine, 1, r.random_range(1..=rows)] {
                let chunks = rows.div_ceil(per);
                for pair in [false, true] {
                    let tag = format!("{what} weight pair={pair} rows/chunk {per}");
                    let p = ConvParams {
                        rows_per_chunk: per as u32,
                        chunks: chunks as u32,
                        ..params(g, woff, 0, 0)
                    };
                    let parts = poisoned(&ctx, "partials", wl * chunks + 3);
                    let (bufs, want) = if pair {
                        (
                            [&rgyb, &xb, &gyb, &dxb, &parts],
                            weight_partials(g, per, chunks, (&rgy, &x), Some((&gy, &dx))),
                        )
                    } else {
                        (
                            [&gyb, &xb, &gyb, &xb, &parts],
                            weight_partials(g, per, chunks, (&gy, &x), None),
                        )
                    };
                    let c = Consts::new(&[("PAIR_B", pair as u32), dil]);
                    let grid = Grid::Threads(wl * chunks);
                    run(&ctx, Kernel::ConvDirectBackwardWeight, c, &p, &bufs, grid);
                    let got = read(&ctx, &parts);
                    let e = check(&format!("{tag} partials"), &got[..wl * chunks], &want, TOL);
                    worst[2] = worst[2].max(e);
                    assert!(
                        got[wl * chunks..].iter().all(|v| v.is_nan()),
                        "{tag}: wrote past the partials"
                    );
                    // Stage two adds the chunks at wa_off of a larger buffer.
                    let out0 = rnd(&mut r, plen);
                    let out = upload(&ctx, "gradient", &out0);
                    let grid = Grid::Threads(wl);
                    let c = Consts::default();
                    run(&ctx, Kernel::ConvWeightSum, c, &p, &[&parts, &out], grid);
                    let got = read(&ctx, &out);
                    let mut sum = out0[woff..boff].to_vec();
                    for part in want.chunks(wl) {
                        sum = plus(&sum, part);
                    }
                    let e = check(&format!("{tag} sum"), &got[woff..boff], &sum, TOL);
                    worst[3] = worst[3].max(e);
                    let outside = (0..plen).filter(|i| !(woff..boff).contains(i));
                    for i in outside {
                        assert_eq!(got[i], out0[i], "{tag}: sum wrote element {i}");
                    }
                }
            }
        }
        eprintln!(
            "{backend}: {CASES} grouped/dilated shapes, worst relative errors: forward {:.1e}, \
             backward data {:.1e}, weight partials {:.1e}, weight sum {:.1e}",
            worst[0], worst[1], worst[2], worst[3]
        );
    }
}

/// Output size with PyTorch's ceil_mode (as the parser computes it).
fn ceil_out(size: usize, k: usize, s: usize, pad: usize) -> usize {
    let mut o = (size + 2 * pad - k).div_ceil(s) + 1;
    if (o - 1) * s >= size + pad {
        o -= 1;
    }
    o
}

#[test]
fn pools_with_ceil_mode_match_the_float64_reference() {
    const CASES: usize = 30;
    let mut r = StdRng::seed_from_u64(0xce11);
    for (backend, ctx) in gpu_contexts() {
        let (mut past_edge, mut worst) = (0, 0.0f64);
        for _ in 0..CASES {
            let k: usize = r.random_range(1..=4);
            let s = r.random_range(1..=3);
            let pad = r.random_range(0..=k / 2);
            let min = k.saturating_sub(2 * pad).max(1);
            let (h, w) = (r.random_range(min..min + 9), r.random_range(min..min + 9));
            let (oh, ow) = (ceil_out(h, k, s, pad), ceil_out(w, k, s, pad));
            let planes = r.random_range(1..=5);
            let (il, ol) = (planes * h * w, planes * oh * ow);
            let what = format!("{backend} k{k} s{s} p{pad} {h}x{w} -> {oh}x{ow}");
            // Windows that run past the padded edge (ceil_mode's own).
            let div = pool::avgpool_divisors(h, w, k, s, pad, oh, ow);
            past_edge += div.iter().filter(|&&d| d != (k * k) as f64).count();
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
            let x = rnd(&mut r, il);
            let gy = rnd(&mut r, ol);
            let (xb, gyb) = (upload(&ctx, "x", &x), upload(&ctx, "gy", &gy));
            // ---- average pool forward and backward (overwrite, accumulate).
            let y = poisoned(&ctx, "y", ol);
            dispatch_once(
                &ctx,
                Kernel::AvgPoolForward,
                Consts::default(),
                &p,
                &[&xb, &y],
                Grid::Threads(ol),
            )
            .unwrap();
            let want = pool::avgpool_forward(planes, h, w, k, s, pad, oh, ow, &x);
            worst = worst.max(check(
                &format!("{what} avg forward"),
                &read(&ctx, &y),
                &want,
                TOL_FEW,
            ));
            let back = pool::avgpool_backward(planes, h, w, k, s, pad, oh, ow, &gy);
            for acc in [false, true] {
                let g0 = rnd(&mut r, il);
                let gx = if acc {
                    upload(&ctx, "gx", &g0)
                } else {
                    poisoned(&ctx, "gx", il)
                };
                dispatch_once(
                    &ctx,
                    Kernel::AvgPoolBackward,
                    Consts::acc(acc),
                    &p,
                    &[&gyb, &gx],
                    Grid::Threads(il),
                )
                .unwrap();
                let want = if acc { plus(&back, &g0) } else { back.clone() };
                let tag = format!("{what} avg backward acc={acc}");
                worst = worst.max(check(&tag, &read(&ctx, &gx), &want, TOL_FEW));
            }
            // ---- max pool: values and argmax exact, the scatter exact.
            let (yb, ab) = (poisoned(&ctx, "y", ol), poisoned(&ctx, "argmax", ol));
            dispatch_once(
                &ctx,
                Kernel::MaxPoolForward,
                Consts::default(),
                &p,
                &[&xb, &yb, &ab],
                Grid::Threads(ol),
            )
            .unwrap();
            let (yref, aref) = pool::maxpool_forward(planes, h, w, k, s, pad, oh, ow, &x);
            check(&format!("{what} max values"), &read(&ctx, &yb), &yref, 0.0);
            let arg: Vec<u32> = read_raw(&ctx, &ab).iter().map(|v| v.to_bits()).collect();
            assert_eq!(arg, aref, "{what}: argmax");
            let gx = poisoned(&ctx, "gx", il);
            dispatch_once(
                &ctx,
                Kernel::MaxPoolBackward,
                Consts::acc(false),
                &p,
                &[&gyb, &ab, &gx],
                Grid::Threads(il),
            )
            .unwrap();
            let want = pool::maxpool_scatter(planes, h * w, oh * ow, &aref, &gy);
            // Sums of the ≤ ⌈k/s⌉² outputs choosing one input: TOL_FEW.
            check(
                &format!("{what} max backward"),
                &read(&ctx, &gx),
                &want,
                TOL_FEW,
            );
        }
        assert!(past_edge > 0, "no window ran past the padded edge");
        eprintln!(
            "{backend}: {CASES} ceil-mode pools ({past_edge} windows past the padded edge), \
             average pool worst relative error {worst:.1e}, max pool exact"
        );
    }
}

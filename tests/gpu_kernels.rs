//! Every WGSL kernel against the float64 reference ops (src/ops) on random
//! shapes and random inputs, on Vulkan (lavapipe) and GL (llvmpipe).
//! Outputs are poisoned with NaN before each run so an unwritten element
//! shows; accumulating paths start from random values that must be kept.
//!
//! Tolerance: ‖gpu − ref‖/‖ref‖ ≤ 1e-5. Inputs are f32-exact, so the only
//! error is f32 rounding of sums of at most a few thousand O(1) terms
//! (≈ √m · 6e-8 ≤ 4e-6 for m = 4608); a wrong index or a missing term
//! errs by ≥ 1e-2.

mod common;

use common::{gpu_context, GPU_BACKENDS};
use hesscope::gpu::kernels::{self, bn_rows, flags, params, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{GpuBuffer, GpuContext};
use hesscope::ops::{bn, conv, loss, pool};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-5;

/// Uniform(-1, 1) values that f32 holds exactly.
fn rnd(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| (r.random::<f64>() * 2.0 - 1.0) as f32 as f64)
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

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f64> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap()[0]
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn read_u32(ctx: &GpuContext, b: &GpuBuffer) -> Vec<u32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap()[0]
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[track_caller]
fn check(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten?)", got[i]);
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-30);
    let e = num / den;
    assert!(e <= TOL, "{what}: relative error {e:.2e}");
    e
}

fn run(ctx: &GpuContext, k: Kernel, p: &[u32], bufs: &[&GpuBuffer], grid: Grid) {
    dispatch_once(ctx, k, &params(p), bufs, grid).unwrap();
}

fn contexts() -> Vec<(String, GpuContext)> {
    GPU_BACKENDS
        .iter()
        .filter_map(|&c| gpu_context(c).map(|ctx| (format!("{c:?}"), ctx)))
        .collect()
}

/// (n, cin, h, w, cout, k, stride, pad): every conv form of the reference
/// models, linear layers as 1x1 convs on 1x1 images, odd sizes throughout.
const CONV_SHAPES: [[usize; 8]; 7] = [
    [3, 5, 9, 7, 6, 3, 1, 1],
    [2, 3, 11, 10, 5, 3, 2, 1],
    [2, 4, 8, 9, 7, 1, 2, 0],
    [5, 13, 1, 1, 9, 1, 1, 0],
    [2, 3, 13, 13, 4, 7, 2, 3],
    [2, 3, 9, 9, 5, 5, 1, 2],
    [32, 4, 32, 32, 4, 3, 1, 1],
];

#[test]
fn conv_kernels_match_the_reference() {
    let mut worst: f64 = 0.0;
    for (backend, ctx) in contexts() {
        let mut r = StdRng::seed_from_u64(1);
        for s in CONV_SHAPES {
            let [n, cin, h, w, cout, k, stride, pad] = s;
            let (oh, ow) = (
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            );
            let g = conv::ConvGeom {
                n,
                cin,
                h,
                w,
                cout,
                k,
                stride,
                pad,
                oh,
                ow,
            };
            let what = format!("{backend} conv {s:?}");
            let (xl, wl, yl) = (n * cin * h * w, cout * cin * k * k, n * cout * oh * ow);
            // Weights and biases sit at offsets inside parameter buffers.
            let off = 3;
            let theta = rnd(&mut r, off + wl + cout + 2);
            let v = rnd(&mut r, off + wl + cout + 2);
            let (wt, vt) = (&theta[off..off + wl], &v[off..off + wl]);
            let (bt, bv) = (
                &theta[off + wl..off + wl + cout],
                &v[off + wl..off + wl + cout],
            );
            let (x, dx, gy, gy2) = (
                rnd(&mut r, xl),
                rnd(&mut r, xl),
                rnd(&mut r, yl),
                rnd(&mut r, yl),
            );
            let (tb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            let (xb, dxb, gyb, gy2b) = (
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "gy2", &gy2),
            );
            let base = [n, cin, h, w, cout, k, stride, pad, oh, ow].map(|x| x as u32);
            let pr = |wa: usize, wb: usize, fl: u32, boff: usize| {
                let mut p = base.to_vec();
                p.extend([wa as u32, wb as u32, fl, boff as u32]);
                p
            };
            let fgrid = Grid::Threads(kernels::conv_forward_threads(n, cout, oh, ow));
            let dgrid = Grid::Threads(kernels::conv_backward_data_threads(n, cin, h, w));
            let wgrid = Grid::Groups(kernels::conv_backward_weight_groups(cout, cin, k));

            // Forward with bias.
            let y = poisoned(&ctx, "y", yl);
            run(
                &ctx,
                Kernel::ConvForward,
                &pr(off, 0, flags::CONV_BIAS, off + wl),
                &[&xb, &tb, &xb, &tb, &y],
                fgrid,
            );
            let mut want = vec![0.0; yl];
            conv::forward_acc(&g, &x, wt, &mut want);
            conv::bias_acc(n, cout, oh * ow, bt, &mut want);
            worst = worst.max(check(&format!("{what} forward"), &read(&ctx, &y), &want));

            // R-forward form: y0 + conv(ẋ, W) + conv(x, V) + b_v, accumulated.
            let y0 = rnd(&mut r, yl);
            let y = upload(&ctx, "y", &y0);
            let fl = flags::CONV_PAIR_B | flags::CONV_ACC | flags::CONV_BIAS;
            run(
                &ctx,
                Kernel::ConvForward,
                &pr(off, off, fl, off + wl),
                &[&dxb, &tb, &xb, &vb, &y],
                fgrid,
            );
            let mut want = y0.clone();
            conv::forward_acc(&g, &dx, wt, &mut want);
            conv::forward_acc(&g, &x, vt, &mut want);
            conv::bias_acc(n, cout, oh * ow, bv, &mut want);
            worst = worst.max(check(
                &format!("{what} forward pair+acc"),
                &read(&ctx, &y),
                &want,
            ));

            // Backward data, plain and as the R-backward pair with accumulation.
            let gx = poisoned(&ctx, "gx", xl);
            run(
                &ctx,
                Kernel::ConvBackwardData,
                &pr(off, 0, 0, 0),
                &[&gyb, &tb, &gyb, &tb, &gx],
                dgrid,
            );
            let mut want = vec![0.0; xl];
            conv::backward_data_acc(&g, &gy, wt, &mut want);
            worst = worst.max(check(
                &format!("{what} backward data"),
                &read(&ctx, &gx),
                &want,
            ));
            let gx0 = rnd(&mut r, xl);
            let gx = upload(&ctx, "gx", &gx0);
            run(
                &ctx,
                Kernel::ConvBackwardData,
                &pr(off, off, flags::CONV_PAIR_B | flags::CONV_ACC, 0),
                &[&gyb, &tb, &gy2b, &vb, &gx],
                dgrid,
            );
            let mut want = gx0.clone();
            conv::backward_data_acc(&g, &gy, wt, &mut want);
            conv::backward_data_acc(&g, &gy2, vt, &mut want);
            worst = worst.max(check(
                &format!("{what} backward data pair+acc"),
                &read(&ctx, &gx),
                &want,
            ));

            // Backward weight adds into a larger buffer at an offset; the rest
            // must stay as it was.
            for pair in [false, true] {
                let total = off + wl + 5;
                let out0 = rnd(&mut r, total);
                let out = upload(&ctx, "gradient", &out0);
                let fl = if pair { flags::CONV_PAIR_B } else { 0 };
                run(
                    &ctx,
                    Kernel::ConvBackwardWeight,
                    &pr(off, 0, fl, 0),
                    &[&gyb, &xb, &gy2b, &dxb, &out],
                    wgrid,
                );
                let mut gw = vec![0.0; wl];
                conv::backward_weight_acc(&g, &gy, &x, &mut gw);
                if pair {
                    conv::backward_weight_acc(&g, &gy2, &dx, &mut gw);
                }
                let got = read(&ctx, &out);
                let want_gw: Vec<f64> = out0[off..off + wl]
                    .iter()
                    .zip(&gw)
                    .map(|(a, b)| a + b)
                    .collect();
                worst = worst.max(check(
                    &format!("{what} backward weight (pair {pair})"),
                    &got[off..off + wl],
                    &want_gw,
                ));
                let untouched = got[..off]
                    .iter()
                    .chain(&got[off + wl..])
                    .zip(out0[..off].iter().chain(&out0[off + wl..]));
                for (a, b) in untouched {
                    assert_eq!(
                        *a as f32, *b as f32,
                        "{what}: backward weight wrote outside its block"
                    );
                }
            }
        }
    }
    eprintln!("conv kernels: worst relative error {worst:.2e}");
}

#[test]
fn reductions_and_elementwise_kernels_match() {
    let mut worst: f64 = 0.0;
    for (backend, ctx) in contexts() {
        let mut r = StdRng::seed_from_u64(2);
        for (n, c, hw) in [(3usize, 5usize, 37usize), (128, 3, 1024), (7, 600, 1)] {
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
            // Both sums, at offsets, overwriting; then accumulating.
            let out = poisoned(&ctx, "sums", 2 * c + 4);
            let p = [n, c, hw, 1, c + 3, flags::SUMS_HAS_B as usize].map(|x| x as u32);
            run(
                &ctx,
                Kernel::ChannelSums,
                &p,
                &[&ab, &bb, &out],
                Grid::Groups(c),
            );
            let got = read(&ctx, &out);
            worst = worst.max(check(
                &format!("{backend} channel Σa {n}x{c}x{hw}"),
                &got[1..1 + c],
                &sa,
            ));
            worst = worst.max(check(
                &format!("{backend} channel Σab"),
                &got[c + 3..2 * c + 3],
                &sab,
            ));
            let init = rnd(&mut r, c);
            let out = upload(&ctx, "sums", &init);
            run(
                &ctx,
                Kernel::ChannelSums,
                &[n as u32, c as u32, hw as u32, 0, 0, flags::SUMS_ACC],
                &[&ab, &bb, &out],
                Grid::Groups(c),
            );
            let want: Vec<f64> = init.iter().zip(&sa).map(|(x, y)| x + y).collect();
            worst = worst.max(check(
                &format!("{backend} channel Σa acc"),
                &read(&ctx, &out),
                &want,
            ));

            let out = poisoned(&ctx, "total", 3);
            run(
                &ctx,
                Kernel::SumAll,
                &[0, 0, 0, 2, 0, 0, len as u32, 0],
                &[&ab, &bb, &out],
                Grid::Groups(1),
            );
            worst = worst.max(check(
                &format!("{backend} sum_all {len}"),
                &read(&ctx, &out)[2..3],
                &[a.iter().sum()],
            ));

            // Elementwise: ReLU mask (overwrite, accumulate), add, copy at offsets.
            let y = poisoned(&ctx, "y", len);
            run(
                &ctx,
                Kernel::ReluMask,
                &[len as u32, 0, 0, 0],
                &[&ab, &bb, &y],
                Grid::Threads(len),
            );
            let want: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(x, g)| if *x > 0.0 { *g } else { 0.0 })
                .collect();
            worst = worst.max(check(
                &format!("{backend} relu_mask"),
                &read(&ctx, &y),
                &want,
            ));
            let y0 = rnd(&mut r, len);
            let y = upload(&ctx, "y", &y0);
            run(
                &ctx,
                Kernel::ReluMask,
                &[len as u32, 0, 0, flags::EW_ACC],
                &[&ab, &bb, &y],
                Grid::Threads(len),
            );
            let want2: Vec<f64> = want.iter().zip(&y0).map(|(p, q)| p + q).collect();
            worst = worst.max(check(
                &format!("{backend} relu_mask acc"),
                &read(&ctx, &y),
                &want2,
            ));
            let y = poisoned(&ctx, "y", len);
            run(
                &ctx,
                Kernel::Add,
                &[len as u32, 0, 0, 0],
                &[&ab, &bb, &y],
                Grid::Threads(len),
            );
            let want: Vec<f64> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
            worst = worst.max(check(&format!("{backend} add"), &read(&ctx, &y), &want));
            let m = len - 5;
            let y0 = rnd(&mut r, len);
            let y = upload(&ctx, "y", &y0);
            run(
                &ctx,
                Kernel::Copy,
                &[m as u32, 5, 2, flags::EW_ACC],
                &[&ab, &bb, &y],
                Grid::Threads(m),
            );
            let got = read(&ctx, &y);
            let want: Vec<f64> = (0..m).map(|i| y0[2 + i] + a[5 + i]).collect();
            worst = worst.max(check(&format!("{backend} copy acc"), &got[2..2 + m], &want));
            assert_eq!(
                got[..2],
                y0[..2].iter().map(|x| *x as f32 as f64).collect::<Vec<_>>()[..]
            );
        }
    }
    eprintln!("reductions and elementwise: worst relative error {worst:.2e}");
}

#[test]
fn batch_norm_kernels_match() {
    let mut worst: f64 = 0.0;
    for (backend, ctx) in contexts() {
        let mut r = StdRng::seed_from_u64(3);
        for (n, c, hw) in [(4usize, 3usize, 25usize), (128, 4, 64), (9, 17, 1)] {
            let len = n * c * hw;
            let g = bn::BnGeom { n, c, hw };
            let m = (n * hw) as f64;
            let mut x = rnd(&mut r, len);
            // Channel 0 has mean 100 and spread 0.01: a one-pass variance
            // (E[x²] − E[x]²) cancels catastrophically in f32 there.
            for (i, xi) in x.iter_mut().enumerate() {
                if (i / hw) % c == 0 {
                    *xi = (100.0 + 0.01 * *xi) as f32 as f64;
                }
            }
            let xb = upload(&ctx, "x", &x);
            let eps = bn::EPS as f32;
            let stats = poisoned(&ctx, "stats", bn_rows::COUNT * c);
            let p0 = [
                n as u32,
                c as u32,
                hw as u32,
                0,
                0,
                flags::BN_BATCH,
                eps.to_bits(),
            ];
            run(&ctx, Kernel::BnStats, &p0, &[&xb, &stats], Grid::Groups(c));
            let (mean, s) = bn::batch_stats(&g, &x);
            let got = read(&ctx, &stats);
            worst = worst.max(check(&format!("{backend} bn_stats mean"), &got[..c], &mean));
            worst = worst.max(check(&format!("{backend} bn_stats s"), &got[c..2 * c], &s));

            // The elementwise kernels with host-made statistics, so each is
            // tested alone. θ and v hold γ at 2 and β at 2 + c.
            let (goff, boff) = (2, 2 + c);
            let theta = rnd(&mut r, 2 * c + 3);
            let v = rnd(&mut r, 2 * c + 3);
            let (gamma, beta) = (&theta[goff..goff + c], &theta[boff..boff + c]);
            let (dgamma, dbeta) = (&v[goff..goff + c], &v[boff..boff + c]);
            let (tb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            for batch in [true, false] {
                let what = format!("{backend} bn {n}x{c}x{hw} batch={batch}");
                let fl = if batch { flags::BN_BATCH } else { 0 };
                let (mean, s) = if batch {
                    bn::batch_stats(&g, &x)
                } else {
                    (
                        rnd(&mut r, c),
                        rnd(&mut r, c).iter().map(|v| 1.5 + v).collect(),
                    )
                };
                // The kernels read the statistics in f32: reference them so
                // (a mean of 100 rounds by 6e-6, 6e-4 of a 0.01 spread).
                let f32r =
                    |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x as f32 as f64).collect() };
                let (mean, s) = (f32r(mean), f32r(s));
                let (xhat, y) = bn::forward(&g, &x, &mean, &s, gamma, beta);
                let dx = rnd(&mut r, len);
                let (xhd, ydot, mxx) =
                    bn::r_forward(&g, batch, &dx, &xhat, &s, gamma, dgamma, dbeta);
                let (gy, rgy) = (rnd(&mut r, len), rnd(&mut r, len));
                let (gx, _, _) = bn::backward(&g, batch, &gy, &xhat, &s, gamma);
                let (rgx, _, _) =
                    bn::r_backward(&g, batch, &gy, &rgy, &xhat, &xhd, &s, &mxx, gamma, dgamma);
                let mut rows = vec![0.0; bn_rows::COUNT * c];
                let sum = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
                    let mut o = vec![0.0; c];
                    for i in 0..len {
                        o[(i / hw) % c] += f(i);
                    }
                    o
                };
                let set = |rows: &mut Vec<f64>, row: usize, vals: Vec<f64>| {
                    rows[row * c..(row + 1) * c].copy_from_slice(&vals)
                };
                set(&mut rows, bn_rows::MEAN, mean.clone());
                set(&mut rows, bn_rows::S, s.clone());
                set(&mut rows, bn_rows::SUM_DX, sum(&|i| dx[i]));
                set(
                    &mut rows,
                    bn_rows::SUM_XHAT_DX,
                    mxx.iter().map(|v| v * m).collect(),
                );
                set(&mut rows, bn_rows::SUM_GY, sum(&|i| gy[i]));
                set(&mut rows, bn_rows::SUM_GY_XHAT, sum(&|i| gy[i] * xhat[i]));
                set(&mut rows, bn_rows::SUM_RGY, sum(&|i| rgy[i]));
                set(&mut rows, bn_rows::SUM_RGY_XHAT, sum(&|i| rgy[i] * xhat[i]));
                set(&mut rows, bn_rows::SUM_GY_XHD, sum(&|i| gy[i] * xhd[i]));
                let stats = upload(&ctx, "stats", &rows);
                let p = [
                    n as u32,
                    c as u32,
                    hw as u32,
                    goff as u32,
                    boff as u32,
                    fl,
                    eps.to_bits(),
                ];
                let (xhb, yb) = (poisoned(&ctx, "x̂", len), poisoned(&ctx, "y", len));
                run(
                    &ctx,
                    Kernel::BnForward,
                    &p,
                    &[&xb, &stats, &tb, &xhb, &yb],
                    Grid::Threads(len),
                );
                worst = worst.max(check(
                    &format!("{what} forward x̂"),
                    &read(&ctx, &xhb),
                    &xhat,
                ));
                worst = worst.max(check(&format!("{what} forward y"), &read(&ctx, &yb), &y));
                // Later kernels read the f64 x̂ rounded to f32, as uploaded.
                let xhat_b = upload(&ctx, "x̂", &xhat);
                let dxb = upload(&ctx, "ẋ", &dx);
                let (xhdb, dyb) = (poisoned(&ctx, "x̂̇", len), poisoned(&ctx, "ẏ", len));
                run(
                    &ctx,
                    Kernel::BnRForward,
                    &p,
                    &[&dxb, &xhat_b, &stats, &tb, &vb, &xhdb, &dyb],
                    Grid::Threads(len),
                );
                worst = worst.max(check(
                    &format!("{what} R-forward x̂̇"),
                    &read(&ctx, &xhdb),
                    &xhd,
                ));
                worst = worst.max(check(
                    &format!("{what} R-forward ẏ"),
                    &read(&ctx, &dyb),
                    &ydot,
                ));
                let (gyb, rgyb, xhd_b) = (
                    upload(&ctx, "gy", &gy),
                    upload(&ctx, "R(gy)", &rgy),
                    upload(&ctx, "x̂̇", &xhd),
                );
                let gxb = poisoned(&ctx, "gx", len);
                run(
                    &ctx,
                    Kernel::BnBackward,
                    &p,
                    &[&gyb, &xhat_b, &stats, &tb, &gxb],
                    Grid::Threads(len),
                );
                worst = worst.max(check(&format!("{what} backward"), &read(&ctx, &gxb), &gx));
                let r0 = rnd(&mut r, len);
                let rgxb = upload(&ctx, "R(gx)", &r0);
                let pa = [
                    n as u32,
                    c as u32,
                    hw as u32,
                    goff as u32,
                    boff as u32,
                    fl | flags::BN_ACC,
                    eps.to_bits(),
                ];
                run(
                    &ctx,
                    Kernel::BnRBackward,
                    &pa,
                    &[&gyb, &rgyb, &xhat_b, &xhd_b, &stats, &tb, &vb, &rgxb],
                    Grid::Threads(len),
                );
                let want: Vec<f64> = rgx.iter().zip(&r0).map(|(a, b)| a + b).collect();
                worst = worst.max(check(
                    &format!("{what} R-backward (acc)"),
                    &read(&ctx, &rgxb),
                    &want,
                ));
            }
        }
    }
    eprintln!("batch norm: worst relative error {worst:.2e}");
}

#[test]
fn pooling_kernels_match() {
    for (backend, ctx) in contexts() {
        let mut r = StdRng::seed_from_u64(4);
        for (planes, h, w, k, s, pad) in [
            (6usize, 9usize, 11usize, 3usize, 2usize, 1usize),
            (5, 8, 8, 2, 2, 0),
            (3, 7, 7, 3, 1, 1),
        ] {
            let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
            let what = format!("{backend} maxpool {planes}x{h}x{w} k{k} s{s} p{pad}");
            // Few distinct values: ties everywhere, where the first maximum wins.
            let x: Vec<f64> = (0..planes * h * w)
                .map(|_| (r.random_range(0..5) as f64 - 2.0) * 0.5)
                .collect();
            let (yref, aref) = pool::maxpool_forward(planes, h, w, k, s, pad, oh, ow, &x);
            let xb = upload(&ctx, "x", &x);
            let (yb, ab) = (
                poisoned(&ctx, "y", planes * oh * ow),
                poisoned(&ctx, "argmax", planes * oh * ow),
            );
            let p = [planes, h, w, k, s, pad, oh, ow, 0].map(|v| v as u32);
            run(
                &ctx,
                Kernel::MaxPoolForward,
                &p,
                &[&xb, &yb, &ab],
                Grid::Threads(planes * oh * ow),
            );
            assert_eq!(read(&ctx, &yb), yref, "{what}: values");
            assert_eq!(read_u32(&ctx, &ab), aref, "{what}: argmax (first maximum)");
            let dx = rnd(&mut r, planes * h * w);
            let dxb = upload(&ctx, "ẋ", &dx);
            let gb = poisoned(&ctx, "gathered", planes * oh * ow);
            run(
                &ctx,
                Kernel::MaxPoolGather,
                &p,
                &[&dxb, &ab, &gb],
                Grid::Threads(planes * oh * ow),
            );
            check(
                &format!("{what} gather"),
                &read(&ctx, &gb),
                &pool::maxpool_gather(planes, h * w, oh * ow, &aref, &dx),
            );
            let gy = rnd(&mut r, planes * oh * ow);
            let gyb = upload(&ctx, "gy", &gy);
            let want = pool::maxpool_scatter(planes, h * w, oh * ow, &aref, &gy);
            let gx = poisoned(&ctx, "gx", planes * h * w);
            run(
                &ctx,
                Kernel::MaxPoolBackward,
                &p,
                &[&gyb, &ab, &gx],
                Grid::Threads(planes * h * w),
            );
            check(&format!("{what} backward"), &read(&ctx, &gx), &want);
            let g0 = rnd(&mut r, planes * h * w);
            let gx = upload(&ctx, "gx", &g0);
            let pa = [planes, h, w, k, s, pad, oh, ow, flags::POOL_ACC as usize].map(|v| v as u32);
            run(
                &ctx,
                Kernel::MaxPoolBackward,
                &pa,
                &[&gyb, &ab, &gx],
                Grid::Threads(planes * h * w),
            );
            let want2: Vec<f64> = want.iter().zip(&g0).map(|(a, b)| a + b).collect();
            check(&format!("{what} backward acc"), &read(&ctx, &gx), &want2);
        }
        for (planes, h, w) in [(70usize, 8usize, 8usize), (3, 5, 3)] {
            let x = rnd(&mut r, planes * h * w);
            let xb = upload(&ctx, "x", &x);
            let y = poisoned(&ctx, "y", planes);
            let p = [planes as u32, h as u32, w as u32, 0, 0, 0, 1, 1, 0];
            run(
                &ctx,
                Kernel::GapForward,
                &p,
                &[&xb, &y],
                Grid::Threads(planes),
            );
            check(
                &format!("{backend} gap forward"),
                &read(&ctx, &y),
                &pool::gap_forward(planes, h * w, &x),
            );
            let gy = rnd(&mut r, planes);
            let gyb = upload(&ctx, "gy", &gy);
            let gx = poisoned(&ctx, "gx", planes * h * w);
            run(
                &ctx,
                Kernel::GapBackward,
                &p,
                &[&gyb, &gx],
                Grid::Threads(planes * h * w),
            );
            check(
                &format!("{backend} gap backward"),
                &read(&ctx, &gx),
                &pool::gap_backward(planes, h * w, &gy),
            );
        }
    }
}

#[test]
fn softmax_cross_entropy_kernels_match() {
    for (backend, ctx) in contexts() {
        let mut r = StdRng::seed_from_u64(5);
        for (n, k) in [(37usize, 10usize), (300, 4), (3, 1000)] {
            let z: Vec<f64> = rnd(&mut r, n * k).iter().map(|v| 4.0 * v).collect();
            let y: Vec<u32> = (0..n).map(|_| r.random_range(0..k as u32)).collect();
            let scale = 1.0 / (2 * n) as f64;
            let (l, gz, p) = loss::forward_backward(n, k, &z, &y, scale);
            let zb = upload(&ctx, "z", &z);
            let yb = ctx.storage("labels", n).unwrap();
            ctx.write_u32(&yb, &y).unwrap();
            let (pb, lb, gb) = (
                poisoned(&ctx, "p", n * k),
                poisoned(&ctx, "losses", n),
                poisoned(&ctx, "gz", n * k),
            );
            let pr = [n as u32, k as u32, (scale as f32).to_bits(), 0];
            run(
                &ctx,
                Kernel::XentForwardBackward,
                &pr,
                &[&zb, &yb, &pb, &lb, &gb],
                Grid::Threads(n),
            );
            let what = format!("{backend} xent {n}x{k}");
            check(&format!("{what} softmax"), &read(&ctx, &pb), &p);
            check(&format!("{what} gz"), &read(&ctx, &gb), &gz);
            check(
                &format!("{what} loss"),
                &[read(&ctx, &lb).iter().sum::<f64>()],
                &[l],
            );
            let dz = rnd(&mut r, n * k);
            let (pb2, dzb) = (upload(&ctx, "p", &p), upload(&ctx, "ż", &dz));
            let rg = poisoned(&ctx, "R(gz)", n * k);
            run(
                &ctx,
                Kernel::XentRBackward,
                &pr,
                &[&pb2, &dzb, &rg],
                Grid::Threads(n),
            );
            check(
                &format!("{what} R-backward"),
                &read(&ctx, &rg),
                &loss::r_backward(n, k, &p, &dz, scale),
            );
        }
    }
}

//! The channel-layer kernels (shaders/channels.wgsl,
//! shaders/adaptive_pool.wgsl) against the float64 reference ops
//! (src/ops/channels.rs, src/ops/adaptive_pool.rs) with the parameters and
//! override constants the layer units (src/layers/{channels, mul,
//! adaptive_pool}.rs) use, on random shapes and inputs (seeded), on Vulkan
//! (lavapipe) and GL (llvmpipe). Outputs are poisoned with NaN before each
//! run, so an unwritten element shows; accumulating runs start from random
//! values that must be added to; writes into part of a buffer must leave
//! the rest bit for bit as it was.
//!
//! Inputs are rounded to f32 before the f64 reference sees them, so the
//! only error is the kernels' f32 rounding (u = 2⁻²⁴ ≈ 6e-8). Tolerances
//! (‖gpu − ref‖/‖ref‖ per output):
//! - exact for copies and permutations (concat, narrow, split, shuffle:
//!   they only move values);
//! - `TOL_FEW` = 1e-6 for a handful of f32 operations: an accumulating
//!   add, a·b + c·d (≤ 4u ≈ 2.4e-7);
//! - `TOL` = 1e-5 for sums: plane_dot over up to 3000·2 terms (≤ 24 per
//!   thread, then a tree of 256) and
//!   adaptive pooling windows of up to 13·13 terms err by ≈ u·√L ≤ 2e-6
//!   relative to the terms' size (a random walk; the sums are compared
//!   against max(‖ref‖, √Σ terms²) so that a total that cancels by chance
//!   does not inflate the ratio). Any wrong index or missing term errs by
//!   ≥ 1e-2 on these inputs.

mod common;

use common::gpu_contexts;
use hesscope::gpu::kernels::{ChannelParams, Consts, Kernel, KernelParams, PoolParams};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{GpuBuffer, GpuContext};
use hesscope::ops::{adaptive_pool as ap, channels as ch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-5;
const TOL_FEW: f64 = 1e-6;
const EXACT: f64 = 0.0;

fn rnd(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| (r.random::<f64>() * 2.0 - 1.0) as f32 as f64)
        .collect()
}

fn upload(ctx: &GpuContext, v: &[f64]) -> GpuBuffer {
    let b = ctx.storage("input", v.len().max(1)).unwrap();
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    ctx.write_f32(&b, 0, &f).unwrap();
    b
}

fn poisoned(ctx: &GpuContext, n: usize) -> GpuBuffer {
    let b = ctx.storage("output", n.max(1)).unwrap();
    ctx.write_f32(&b, 0, &vec![f32::NAN; n.max(1)]).unwrap();
    b
}

fn read_raw(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f64> {
    read_raw(ctx, b).iter().map(|&x| x as f64).collect()
}

fn run<P: KernelParams>(
    ctx: &GpuContext,
    k: Kernel,
    consts: Consts,
    p: &P,
    bufs: &[&GpuBuffer],
    grid: Grid,
) {
    dispatch_once(ctx, k, consts, p, bufs, grid).unwrap();
}

fn plus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// The worst relative error per kernel and backend over a test,
/// printed at its end (`--nocapture`).
#[derive(Default)]
struct Worst(std::collections::BTreeMap<String, f64>);

impl Worst {
    #[track_caller]
    fn check(
        &mut self,
        kernel: &str,
        what: &str,
        got: &[f64],
        want: &[f64],
        scale: &[f64],
        tol: f64,
    ) {
        let rel = check(what, got, want, scale, tol);
        let backend = what
            .split_whitespace()
            .find(|w| *w == "Vulkan" || *w == "Gl")
            .unwrap_or("?");
        let e = self.0.entry(format!("{kernel} on {backend}")).or_default();
        *e = e.max(rel);
    }
    fn report(&self) {
        for (k, rel) in &self.0 {
            eprintln!("  {k:<44} worst rel {rel:.2e}");
        }
    }
}

/// ‖got − want‖ / max(‖want‖, ‖scale‖) ≤ tol, every element finite.
#[track_caller]
fn check(what: &str, got: &[f64], want: &[f64], scale: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: element {i} is {} (want {}): unwritten?",
            got[i], want[i]
        );
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den = want
        .iter()
        .map(|b| b * b)
        .sum::<f64>()
        .max(scale.iter().map(|s| s * s).sum());
    let rel = if num == 0.0 { 0.0 } else { (num / den).sqrt() };
    assert!(rel <= tol, "{what}: relative error {rel:.2e} > {tol:.0e}");
    rel
}

/// Elements outside `written` keep their bits.
#[track_caller]
fn untouched(what: &str, after: &[f32], before: &[f32], written: impl Fn(usize) -> bool) {
    for (i, (a, b)) in after.iter().zip(before).enumerate() {
        if !written(i) {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{what}: element {i} outside the output changed"
            );
        }
    }
}

fn copy_params(
    blocks: usize,
    len: usize,
    src: (usize, usize),
    dst: (usize, usize),
) -> ChannelParams {
    ChannelParams {
        blocks: blocks as u32,
        len: len as u32,
        src_stride: src.0 as u32,
        src_off: src.1 as u32,
        dst_stride: dst.0 as u32,
        dst_off: dst.1 as u32,
        ..Default::default()
    }
}

fn copy_consts(acc: bool, fill: bool) -> Consts {
    Consts::new(&[("ACC", acc as u32), ("FILL", fill as u32)])
}

/// Concatenation of 2–4 inputs (forward, as ConcatUnit plans it: one
/// block copy per input into its channels), its transpose (split, plain
/// and accumulating), and narrow forward and transpose (FILL: zeros
/// elsewhere; ACC: only the slice added); every shape random, 1×1 images
/// and single channels included.
#[test]
fn channel_copies_match_the_reference() {
    let mut worst = Worst::default();
    let mut r = StdRng::seed_from_u64(2601);
    for (backend, ctx) in gpu_contexts() {
        for case in 0..24 {
            let n = r.random_range(1..=4usize);
            let (h, w) = if case % 6 == 0 {
                (1, 1)
            } else {
                (r.random_range(1..=9usize), r.random_range(1..=9usize))
            };
            let hw = h * w;
            let parts: Vec<usize> = (0..r.random_range(2..=4usize))
                .map(|_| r.random_range(1..=7usize))
                .collect();
            let c: usize = parts.iter().sum();
            let label = format!("{backend} case {case}: n={n} parts={parts:?} hw={hw}");

            // Concat forward: the last input's copy must not disturb the others.
            let xs: Vec<Vec<f64>> = parts.iter().map(|&ci| rnd(&mut r, n * ci * hw)).collect();
            let y = poisoned(&ctx, n * c * hw);
            let mut off = 0;
            for (x, &ci) in xs.iter().zip(&parts) {
                let xb = upload(&ctx, x);
                let len = ci * hw;
                let p = copy_params(n, len, (len, 0), (c * hw, off * hw));
                run(
                    &ctx,
                    Kernel::BlockCopy,
                    copy_consts(false, false),
                    &p,
                    &[&xb, &y],
                    Grid::Threads(n * len),
                );
                off += ci;
            }
            let refs: Vec<(&[f64], usize)> = xs
                .iter()
                .map(|v| v.as_slice())
                .zip(parts.iter().copied())
                .collect();
            let want = ch::concat(n, hw, &refs);
            worst.check(
                "BlockCopy (concat)",
                &format!("concat {label}"),
                &read(&ctx, &y),
                &want,
                &[],
                EXACT,
            );

            // Split (concat's backward), plain and accumulating.
            let gy = rnd(&mut r, n * c * hw);
            let gyb = upload(&ctx, &gy);
            let split = ch::split(n, hw, &parts, &gy);
            let mut off = 0;
            for (i, &ci) in parts.iter().enumerate() {
                let len = ci * hw;
                let p = copy_params(n, len, (c * hw, off * hw), (len, 0));
                let acc = i % 2 == 1;
                let before = rnd(&mut r, n * len);
                let gx = if acc {
                    upload(&ctx, &before)
                } else {
                    poisoned(&ctx, n * len)
                };
                run(
                    &ctx,
                    Kernel::BlockCopy,
                    copy_consts(acc, false),
                    &p,
                    &[&gyb, &gx],
                    Grid::Threads(n * len),
                );
                let (want, tol) = if acc {
                    (plus(&before, &split[i]), TOL_FEW)
                } else {
                    (split[i].clone(), EXACT)
                };
                worst.check(
                    "BlockCopy (split)",
                    &format!("split part {i} acc={acc} {label}"),
                    &read(&ctx, &gx),
                    &want,
                    &[],
                    tol,
                );
                off += ci;
            }

            // Narrow forward and its transpose (FILL, and ACC into a
            // buffer whose other channels must keep their bits).
            let start = r.random_range(0..c);
            let len_c = r.random_range(1..=c - start);
            let x = rnd(&mut r, n * c * hw);
            let xb = upload(&ctx, &x);
            let l = len_c * hw;
            let nl = format!("narrow start={start} len={len_c} {label}");
            let yb = poisoned(&ctx, n * l);
            let p = copy_params(n, l, (c * hw, start * hw), (l, 0));
            run(
                &ctx,
                Kernel::BlockCopy,
                copy_consts(false, false),
                &p,
                &[&xb, &yb],
                Grid::Threads(n * l),
            );
            worst.check(
                "BlockCopy (narrow)",
                &nl,
                &read(&ctx, &yb),
                &ch::narrow(n, c, hw, start, len_c, &x),
                &[],
                EXACT,
            );

            let g = rnd(&mut r, n * l);
            let gb = upload(&ctx, &g);
            let want = ch::narrow_backward(n, c, hw, start, len_c, &g);
            let p = copy_params(n, l, (l, 0), (c * hw, start * hw));
            let gx = poisoned(&ctx, n * c * hw);
            run(
                &ctx,
                Kernel::BlockCopy,
                copy_consts(false, true),
                &p,
                &[&gb, &gx],
                Grid::Threads(n * c * hw),
            );
            worst.check(
                "BlockCopy FILL (narrow backward)",
                &format!("{nl} backward (fill)"),
                &read(&ctx, &gx),
                &want,
                &[],
                EXACT,
            );

            let in_slice = |i: usize| {
                let ch = (i / hw) % c;
                ch >= start && ch < start + len_c
            };
            // A NaN outside the slice must stay (bit for bit) as it was.
            let mut before = rnd(&mut r, n * c * hw);
            if let Some(i) = (0..before.len()).find(|&i| !in_slice(i)) {
                before[i] = f64::NAN;
            }
            let before32: Vec<f32> = before.iter().map(|&v| v as f32).collect();
            let gx = ctx.storage("gx", before.len()).unwrap();
            ctx.write_f32(&gx, 0, &before32).unwrap();
            run(
                &ctx,
                Kernel::BlockCopy,
                copy_consts(true, false),
                &p,
                &[&gb, &gx],
                Grid::Threads(n * l),
            );
            let after = read_raw(&ctx, &gx);
            untouched(&format!("{nl} backward (acc)"), &after, &before32, in_slice);
            let (got, want): (Vec<f64>, Vec<f64>) = (0..before.len())
                .filter(|&i| in_slice(i))
                .map(|i| (after[i] as f64, before[i] + want[i]))
                .unzip();
            worst.check(
                "BlockCopy ACC (narrow backward)",
                &format!("{nl} backward (acc)"),
                &got,
                &want,
                &[],
                TOL_FEW,
            );
        }
    }
    worst.report();
}

/// The shuffle with g groups and its transpose (c/g groups), plain and
/// accumulating, on random n, g, c/g, h, w (one group, and c/g = 1,
/// included).
#[test]
fn channel_shuffle_matches_the_reference() {
    let mut worst = Worst::default();
    let mut r = StdRng::seed_from_u64(2602);
    for (backend, ctx) in gpu_contexts() {
        for case in 0..16 {
            let n = r.random_range(1..=3usize);
            let g = if case == 0 {
                1
            } else {
                r.random_range(1..=5usize)
            };
            let m = if case == 1 {
                1
            } else {
                r.random_range(1..=6usize)
            };
            let c = g * m;
            let hw = r.random_range(1..=30usize);
            let x = rnd(&mut r, n * c * hw);
            let xb = upload(&ctx, &x);
            for (groups, acc) in [(g, false), (m, true)] {
                let label =
                    format!("{backend} shuffle n={n} c={c} groups={groups} hw={hw} acc={acc}");
                let before = rnd(&mut r, n * c * hw);
                let y = if acc {
                    upload(&ctx, &before)
                } else {
                    poisoned(&ctx, n * c * hw)
                };
                let p = ChannelParams {
                    blocks: n as u32,
                    c: c as u32,
                    hw: hw as u32,
                    groups: groups as u32,
                    ..Default::default()
                };
                run(
                    &ctx,
                    Kernel::ChannelShuffle,
                    Consts::acc(acc),
                    &p,
                    &[&xb, &y],
                    Grid::Threads(n * c * hw),
                );
                let s = ch::shuffle(n, c, hw, groups, &x);
                let (want, tol) = if acc {
                    (plus(&before, &s), TOL_FEW)
                } else {
                    (s, EXACT)
                };
                worst.check("ChannelShuffle", &label, &read(&ctx, &y), &want, &[], tol);
            }
            // The transpose undoes the shuffle.
            let back = ch::shuffle(n, c, hw, m, &ch::shuffle(n, c, hw, g, &x));
            assert_eq!(back, x, "shuffle(c/g) ∘ shuffle(g) is the identity");
        }
    }
    worst.report();
}

/// `mul` (a·b, + c·d with PAIR_B, + out with ACC; b, d per plane of hw or
/// per element) and `plane_dot` (Σ a·b over each plane, + c·d, + out) as
/// MulUnit plans them, on random shapes: broadcast over planes of up to
/// 3000 (past a workgroup's 256 threads) and element-wise.
#[test]
fn products_match_the_reference() {
    let mut worst = Worst::default();
    let mut r = StdRng::seed_from_u64(2603);
    for (backend, ctx) in gpu_contexts() {
        for case in 0..24 {
            let planes = r.random_range(1..=24usize);
            let hw = match case % 6 {
                0 | 3 => 1,
                5 => r.random_range(1000..=3000usize),
                _ => r.random_range(1..=400usize),
            };
            let (pair, acc) = (case % 2 == 1, (case / 2) % 2 == 1);
            let len = planes * hw;
            let label = format!("{backend} planes={planes} hw={hw} pair={pair} acc={acc}");
            let (a, c) = (rnd(&mut r, len), rnd(&mut r, len));
            let (b, d) = (rnd(&mut r, planes), rnd(&mut r, planes));
            let (ab, bb, cb, db) = (
                upload(&ctx, &a),
                upload(&ctx, &b),
                upload(&ctx, &c),
                upload(&ctx, &d),
            );
            let dummy = poisoned(&ctx, 4);
            let consts = Consts::new(&[("PAIR_B", pair as u32), ("ACC", acc as u32)]);
            let (cbind, dbind) = if pair { (&cb, &db) } else { (&dummy, &dummy) };

            let before = rnd(&mut r, len);
            let out = if acc {
                upload(&ctx, &before)
            } else {
                poisoned(&ctx, len)
            };
            let p = ChannelParams {
                len: len as u32,
                hw: hw as u32,
                ..Default::default()
            };
            run(
                &ctx,
                Kernel::Mul,
                consts,
                &p,
                &[&ab, &bb, cbind, dbind, &out],
                Grid::Threads(len),
            );
            let mut want = ch::mul(&a, &b, hw);
            if pair {
                want = plus(&want, &ch::mul(&c, &d, hw));
            }
            if acc {
                want = plus(&want, &before);
            }
            worst.check(
                "Mul",
                &format!("mul {label}"),
                &read(&ctx, &out),
                &want,
                &[],
                TOL_FEW,
            );

            // plane_dot over full-size second factors.
            let (b2, d2) = (rnd(&mut r, len), rnd(&mut r, len));
            let (b2b, d2b) = (upload(&ctx, &b2), upload(&ctx, &d2));
            let dbind = if pair { &d2b } else { &dummy };
            let before = rnd(&mut r, planes);
            let out = if acc {
                upload(&ctx, &before)
            } else {
                poisoned(&ctx, planes)
            };
            let p = ChannelParams {
                blocks: planes as u32,
                hw: hw as u32,
                ..Default::default()
            };
            run(
                &ctx,
                Kernel::PlaneDot,
                consts,
                &p,
                &[&ab, &b2b, cbind, dbind, &out],
                Grid::Groups(planes),
            );
            let mut want = ch::plane_dot(&a, &b2, hw);
            let mut sq: Vec<f64> = (0..planes)
                .map(|pl| {
                    (0..hw)
                        .map(|j| (a[pl * hw + j] * b2[pl * hw + j]).powi(2))
                        .sum()
                })
                .collect();
            if pair {
                want = plus(&want, &ch::plane_dot(&c, &d2, hw));
                for (pl, s) in sq.iter_mut().enumerate() {
                    *s += (0..hw)
                        .map(|j| (c[pl * hw + j] * d2[pl * hw + j]).powi(2))
                        .sum::<f64>();
                }
            }
            if acc {
                want = plus(&want, &before);
            }
            let scale: Vec<f64> = sq.iter().map(|s| s.sqrt()).collect();
            worst.check(
                "PlaneDot",
                &format!("plane_dot {label}"),
                &read(&ctx, &out),
                &want,
                &scale,
                TOL,
            );
        }
    }
    worst.report();
}

/// Adaptive average pooling forward and backward (plain and
/// accumulating) on random sizes 1..=13 in and 1..=14 out along each
/// axis: outputs that divide the input, that do not (overlapping
/// windows), upsampling (repeated inputs), 1×1 in and out.
#[test]
fn adaptive_average_pooling_matches_the_reference() {
    let mut worst = Worst::default();
    let mut r = StdRng::seed_from_u64(2604);
    let mut cases = vec![
        (3usize, 1usize, 1usize, 1usize, 1usize),
        (2, 1, 1, 7, 7),
        (4, 12, 12, 3, 3),
        (2, 10, 10, 3, 4),
        (3, 3, 4, 5, 6),
        (2, 13, 13, 1, 1),
        (1, 7, 3, 7, 3),
    ];
    for _ in 0..24 {
        cases.push((
            r.random_range(1..=6),
            r.random_range(1..=13),
            r.random_range(1..=13),
            r.random_range(1..=14),
            r.random_range(1..=14),
        ));
    }
    for (backend, ctx) in gpu_contexts() {
        for &(planes, h, w, oh, ow) in &cases {
            let label = format!("{backend} planes={planes} {h}x{w} -> {oh}x{ow}");
            let p = PoolParams {
                planes: planes as u32,
                h: h as u32,
                w: w as u32,
                oh: oh as u32,
                ow: ow as u32,
                ..Default::default()
            };
            let x = rnd(&mut r, planes * h * w);
            let xb = upload(&ctx, &x);
            let y = poisoned(&ctx, planes * oh * ow);
            run(
                &ctx,
                Kernel::AdaptiveAvgPoolForward,
                Consts::default(),
                &p,
                &[&xb, &y],
                Grid::Threads(planes * oh * ow),
            );
            // Scale: per output, √Σ (term / area)² of its window.
            let want = ap::forward(planes, h, w, oh, ow, &x);
            let xsq: Vec<f64> = x.iter().map(|v| v * v).collect();
            let scale: Vec<f64> = ap::forward(planes, h, w, oh, ow, &xsq)
                .iter()
                .enumerate()
                .map(|(o, m)| {
                    let (y0, y1) = ap::window((o / ow) % oh, h, oh);
                    let (x0, x1) = ap::window(o % ow, w, ow);
                    (m / ((y1 - y0) * (x1 - x0)) as f64).sqrt()
                })
                .collect();
            worst.check(
                "AdaptiveAvgPoolForward",
                &format!("forward {label}"),
                &read(&ctx, &y),
                &want,
                &scale,
                TOL,
            );

            let gy = rnd(&mut r, planes * oh * ow);
            let gyb = upload(&ctx, &gy);
            let gsq: Vec<f64> = gy.iter().map(|v| v * v).collect();
            for acc in [false, true] {
                let before = rnd(&mut r, planes * h * w);
                let gx = if acc {
                    upload(&ctx, &before)
                } else {
                    poisoned(&ctx, planes * h * w)
                };
                run(
                    &ctx,
                    Kernel::AdaptiveAvgPoolBackward,
                    Consts::acc(acc),
                    &p,
                    &[&gyb, &gx],
                    Grid::Threads(planes * h * w),
                );
                let mut want = ap::backward(planes, h, w, oh, ow, &gy);
                // Σ (g/area)² over the outputs covering each input ≤ what
                // backward of g²/area gives, since area ≥ 1.
                let scale: Vec<f64> = ap::backward(planes, h, w, oh, ow, &gsq)
                    .iter()
                    .map(|s| s.sqrt())
                    .collect();
                if acc {
                    want = plus(&want, &before);
                }
                worst.check(
                    "AdaptiveAvgPoolBackward",
                    &format!("backward acc={acc} {label}"),
                    &read(&ctx, &gx),
                    &want,
                    &scale,
                    TOL,
                );
            }
        }
    }
    worst.report();
}

/// The reference itself: adaptive pooling to the input's own size is
/// the identity, to 1×1 the global mean, and the backward is the
/// forward's transpose (⟨A x, g⟩ = ⟨x, Aᵀ g⟩) on random sizes.
#[test]
fn the_adaptive_pool_reference_is_pytorchs_map() {
    let mut r = StdRng::seed_from_u64(2605);
    for _ in 0..50 {
        let (pl, h, w, oh, ow) = (
            r.random_range(1..=3usize),
            r.random_range(1..=9usize),
            r.random_range(1..=9usize),
            r.random_range(1..=11usize),
            r.random_range(1..=11usize),
        );
        let x = rnd(&mut r, pl * h * w);
        assert_eq!(ap::forward(pl, h, w, h, w, &x), x);
        let mean: Vec<f64> = x
            .chunks(h * w)
            .map(|c| c.iter().sum::<f64>() / (h * w) as f64)
            .collect();
        check("1x1", &ap::forward(pl, h, w, 1, 1, &x), &mean, &[], 1e-15);
        let g = rnd(&mut r, pl * oh * ow);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        let lhs = dot(&ap::forward(pl, h, w, oh, ow, &x), &g);
        let rhs = dot(&x, &ap::backward(pl, h, w, oh, ow, &g));
        assert!(
            (lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()),
            "{lhs} vs {rhs}"
        );
        // Every window is nonempty and inside the input.
        for i in 0..oh {
            let (a, b) = ap::window(i, h, oh);
            assert!(a < b && b <= h, "window {i} of {h} -> {oh}: [{a}, {b})");
        }
    }
}

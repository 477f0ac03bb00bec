//! The tiled implicit-GEMM convolutions (shaders/conv_tiled.wgsl, the
//! engine's `ConvPath::Tiled`) on Mesa's software Vulkan and GL, where CI
//! runs; `ConvPath::Auto` picks them only on GPUs, so every test here
//! forces them.
//!
//! - Kernel level, against the float64 reference (src/ops/conv.rs) on
//!   random shapes (k 1..=11, stride 1..=4, padding 0..=k+1, channels up
//!   to 70, batch 1..=3, tiny and non-multiple-of-tile sizes), with and
//!   without PAIR_B / BIAS / ACC, and as block products (KB/KMAX, three
//!   tangents, every slice compared). Outputs are poisoned with NaN
//!   before each run so an unwritten element shows, and nothing past an
//!   output may change.
//! - Engine level: every PyTorch fixture with the tiled path (gradient and
//!   Hv against PyTorch; block products against the emulator path's), and
//!   random conv models against the float64 reference.
//!
//! Tolerances, as ‖gpu − ref‖/‖ref‖ over one output, every element finite
//! (inputs are f32-exact, so the only error is the kernels' f32 rounding,
//! unit roundoff u = 2⁻²⁴ ≈ 6e-8): `TOL` = 1e-5. Each output is one
//! serial fma chain over the GEMM's K (per pair): ≤ 2·4096 terms here
//! (cin·k² and cout·k² are kept ≤ 4096; a weight-gradient chunk sums
//! ≈ 256 + ow), whose rounding errs by ≈ u·√L ≤ 5.4e-6 relative at worst
//! and far less in the norm; a wrong tap, channel, slice or a missed flag
//! errs by ≥ 1e-2 on these random inputs.

mod common;

use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::executor::ConvPath;
use hesscope::gpu::kernels::{self, Consts, ConvParams, ConvTile, Kernel};
use hesscope::gpu::program::{dispatch_once, Compiled, Grid, Step};
use hesscope::gpu::{BackendChoice, EngineOptions, GpuBuffer, GpuContext, GpuEngine};
use hesscope::model::{arch, Weights};
use hesscope::ops::conv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-5;

/// f32 kernels against PyTorch's float64 fixtures: the bound of
/// tests/gpu.rs (PyTorch's own f32 reaches ≤ 5e-7; a wrong term ≥ 1e-3).
const FIXTURE_TOL: f64 = 1e-5;

/// Block products of the tiled path against the emulator path's: two f32
/// computations of the same products in different summation orders, each
/// within ~1e-6 of float64 on the fixtures (tests/gpu.rs), so within
/// 1e-5 of each other; a kernel reading another tangent's slice errs by
/// O(1) (the directions differ in scale by 2× and more).
const PATH_TOL: f64 = 1e-5;

// ---------------------------------------------------------------- helpers

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

/// ‖got − want‖/‖want‖ ≤ TOL with every element finite; returns the error.
#[track_caller]
fn check(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: element {i} is {} (want {}): unwritten?",
            got[i], want[i]
        );
    }
    let err = rel_err(got, want);
    let err = if err.is_nan() { 0.0 } else { err };
    assert!(err <= TOL, "{what}: relative error {err:.2e} > {TOL:.0e}");
    err
}

#[allow(clippy::too_many_arguments)]
fn geom(
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

/// Stage one of the weight gradient in f64, [chunk, weight]: Σ gy·x over
/// each chunk of `per` output rows (n, oy) (+ the second pair).
fn weight_partials(
    g: &conv::ConvGeom,
    per: usize,
    chunks: usize,
    gy: &[f64],
    x: &[f64],
    second: Option<(&[f64], &[f64])>,
) -> Vec<f64> {
    let nw = g.cout * g.cin * g.k * g.k;
    let plane_o = g.oh * g.ow;
    let plane_i = g.h * g.w;
    let mut out = vec![0.0; nw * chunks];
    for chunk in 0..chunks {
        let part = &mut out[chunk * nw..(chunk + 1) * nw];
        for row in chunk * per..((chunk + 1) * per).min(g.n * g.oh) {
            let (n, oy) = (row / g.oh, row % g.oh);
            for ky in 0..g.k {
                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                for kx in 0..g.k {
                    for ox in 0..g.ow {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix < 0 || ix >= g.w as isize {
                            continue;
                        }
                        let sp_in = iy as usize * g.w + ix as usize;
                        for co in 0..g.cout {
                            let gi = (n * g.cout + co) * plane_o + oy * g.ow + ox;
                            for ci in 0..g.cin {
                                let xi = (n * g.cin + ci) * plane_i + sp_in;
                                let wi = ((co * g.cin + ci) * g.k + ky) * g.k + kx;
                                let mut t = gy[gi] * x[xi];
                                if let Some((gb, xb)) = second {
                                    t += gb[gi] * xb[xi];
                                }
                                part[wi] += t;
                            }
                        }
                    }
                }
            }
        }
    }
    out
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
        ..Default::default()
    }
}

fn forward_groups(g: &conv::ConvGeom, t: ConvTile) -> Grid {
    Grid::Groups(t.groups(g.cout, g.n * g.oh * g.ow, 1))
}

fn data_groups(g: &conv::ConvGeom, t: ConvTile) -> Grid {
    Grid::Groups(t.groups(g.cin, g.n * g.h * g.w, 1))
}

fn weight_groups(g: &conv::ConvGeom, chunks: usize, t: ConvTile) -> Grid {
    Grid::Groups(t.groups(g.cout, g.cin * g.k * g.k, chunks))
}

/// Tiles besides the engine's choice, one per shape in turn: the bench's
/// other candidates, odd ones at the edges of what `ConvTile::check`
/// accepts (one micro-tile and one-deep slabs; sides not powers of two;
/// a full 1024-float slab), and the default.
fn other_tiles() -> Vec<ConvTile> {
    let odd = ["4x4x1", "12x20x3", "8x128x8"].map(|t| t.parse::<ConvTile>().unwrap());
    let mut tiles = hesscope::bench::TILE_CANDIDATES[1..].to_vec();
    tiles.extend(odd);
    tiles.push(ConvTile::DEFAULT);
    tiles
}

/// The tiles shape `i` runs with for a GEMM of `m` rows: the engine's
/// (the default narrowed to m), then another; `first` marks the engine's,
/// which runs every variant of the kernel, the other only the fullest.
fn tiles(i: usize, m: usize) -> [(ConvTile, bool); 2] {
    [
        (ConvTile::DEFAULT.for_rows(m), true),
        (other_tiles()[i % other_tiles().len()], false),
    ]
}

#[test]
fn tiles_are_checked_and_narrowed_within_the_shaders_bounds() {
    for t in other_tiles() {
        t.check().unwrap();
    }
    for m in 1..=200 {
        let t = ConvTile::DEFAULT.for_rows(m);
        t.check().unwrap();
        assert!(t.tm as usize >= m.min(64), "{m}: {t}");
    }
    assert_eq!(ConvTile::DEFAULT.for_rows(16).to_string(), "16x256x4");
    assert_eq!(ConvTile::DEFAULT.for_rows(32).to_string(), "32x128x8");
    assert_eq!(ConvTile::DEFAULT.for_rows(33), ConvTile::DEFAULT);
    for bad in [
        "64x64",
        "0x64x16",
        "6x64x16",
        "128x64x16",
        "64x64x17",
        "64x64x0",
        "axbxc",
    ] {
        assert!(bad.parse::<ConvTile>().is_err(), "{bad}");
    }
    assert_eq!("32x128x8".parse::<ConvTile>().unwrap(), other_tiles()[0]);
}

/// Random shapes: k 1..=11, stride 1..=4, padding 0..=k+1; channels up to
/// 70, shrunk until cin·k² and cout·k² ≤ 4096 (the chain bound of `TOL`)
/// and the f64 reference stays small; batch 1..=3; images from a 1×1 up
/// to outputs past one 64-wide tile. Then fixed edge cases: one output
/// pixel, a 1×1 image under padding, linear layers (1×1 convs of 1×1
/// images, 300 inputs), channels exactly a tile and one past it.
fn shapes() -> Vec<conv::ConvGeom> {
    let mut r = StdRng::seed_from_u64(0x711ed);
    let mut out = vec![];
    while out.len() < 6 {
        let k = r.random_range(1..=11usize);
        let s = r.random_range(1..=4usize);
        let p = r.random_range(0..=k + 1);
        let lo = k.saturating_sub(2 * p).max(1);
        let (h, w) = (r.random_range(lo..=lo + 12), r.random_range(lo..=lo + 12));
        let (mut cin, mut cout) = (r.random_range(1..=70usize), r.random_range(1..=70usize));
        while cin.max(cout) * k * k > 4096 {
            cin = (cin * 3 / 4).max(1);
            cout = (cout * 3 / 4).max(1);
        }
        let n = r.random_range(1..=3usize);
        let g = geom(n, cin, h, w, cout, k, s, p);
        let macs = g.n * g.cout * g.cin * k * k * g.oh.max(g.h) * g.ow.max(g.w);
        if macs > 400_000 {
            continue;
        }
        out.push(g);
    }
    out.extend([
        geom(2, 5, 3, 4, 7, 5, 3, 1),    // one output pixel
        geom(3, 9, 1, 1, 11, 7, 2, 4),   // a 1×1 image
        geom(1, 300, 1, 1, 10, 1, 1, 0), // linear
        geom(40, 37, 1, 1, 12, 1, 1, 0), // linear, 40 samples
        geom(1, 64, 4, 4, 64, 3, 1, 1),  // a whole tile of channels
        geom(1, 65, 5, 3, 65, 3, 2, 2),  // one channel past it
        geom(1, 3, 2, 2, 2, 1, 1, 0),    // tiny
    ]);
    out
}

// ---------------------------------------------------------------- kernels

#[test]
fn tiled_conv_kernels_match_the_reference() {
    let cases = shapes();
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(1);
        let mut worst = [0.0f64; 3];
        for (gi, g) in cases.iter().enumerate() {
            let what = format!(
                "{backend} tiled n{} cin{} {}x{} cout{} k{} s{} p{}",
                g.n, g.cin, g.h, g.w, g.cout, g.k, g.stride, g.pad
            );
            let (xl, wl, yl) = (
                g.n * g.cin * g.h * g.w,
                g.cout * g.cin * g.k * g.k,
                g.n * g.cout * g.oh * g.ow,
            );
            // Weights after a gap, bias after them, in θ and v.
            let woff = r.random_range(0..5);
            let boff = woff + wl + r.random_range(0..3);
            let plen = boff + g.cout;
            let (theta, v) = (rnd(&mut r, plen), rnd(&mut r, plen));
            let (wt, vt) = (&theta[woff..woff + wl], &v[woff..woff + wl]);
            let (x, dx, gy, rgy) = (
                rnd(&mut r, xl),
                rnd(&mut r, xl),
                rnd(&mut r, yl),
                rnd(&mut r, yl),
            );
            let (tb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            let (xb, dxb) = (upload(&ctx, "x", &x), upload(&ctx, "ẋ", &dx));
            let (gyb, rgyb) = (upload(&ctx, "gy", &gy), upload(&ctx, "R(gy)", &rgy));

            // Forward: [x, θ, x, θ] (+ θ's bias), R-forward [ẋ, θ, x, v] (+ v's bias).
            for (tile, first) in tiles(gi, g.cout) {
                for (pair, bias, acc) in [
                    (false, false, false),
                    (false, true, false),
                    (false, false, true),
                    (true, false, false),
                    (true, true, true),
                ] {
                    if !(first || pair && bias && acc) {
                        continue;
                    }
                    let y0 = rnd(&mut r, yl);
                    let y = if acc {
                        upload(&ctx, "y", &y0)
                    } else {
                        poisoned(&ctx, "y", yl)
                    };
                    let mut want = if acc { y0.clone() } else { vec![0.0; yl] };
                    let (p, bufs) = if pair {
                        conv::forward_acc(g, &dx, wt, &mut want);
                        conv::forward_acc(g, &x, vt, &mut want);
                        if bias {
                            conv::bias_acc(g.n, g.cout, g.oh * g.ow, &v[boff..], &mut want);
                        }
                        (params(g, woff, woff, boff), [&dxb, &tb, &xb, &vb, &y])
                    } else {
                        conv::forward_acc(g, &x, wt, &mut want);
                        if bias {
                            conv::bias_acc(g.n, g.cout, g.oh * g.ow, &theta[boff..], &mut want);
                        }
                        (params(g, woff, 0, boff), [&xb, &tb, &xb, &tb, &y])
                    };
                    let c = tile.consts(Consts::conv(pair, bias, acc));
                    dispatch_once(
                        &ctx,
                        Kernel::ConvTiledForward,
                        c,
                        &p,
                        &bufs,
                        forward_groups(g, tile),
                    )
                    .unwrap();
                    let e = check(
                        &format!("{what} tile {tile} forward pair={pair} bias={bias} acc={acc}"),
                        &read(&ctx, &y),
                        &want,
                    );
                    worst[0] = worst[0].max(e);
                }
            }

            // Backward data: [gy, θ, gy, θ] and [R(gy), θ, gy, v].
            for (tile, first) in tiles(gi, g.cin) {
                for (pair, acc) in [(false, false), (false, true), (true, false), (true, true)] {
                    if !(first || pair && acc) {
                        continue;
                    }
                    let gx0 = rnd(&mut r, xl);
                    let gx = if acc {
                        upload(&ctx, "gx", &gx0)
                    } else {
                        poisoned(&ctx, "gx", xl)
                    };
                    let mut want = if acc { gx0.clone() } else { vec![0.0; xl] };
                    let (p, bufs) = if pair {
                        conv::backward_data_acc(g, &rgy, wt, &mut want);
                        conv::backward_data_acc(g, &gy, vt, &mut want);
                        (params(g, woff, woff, 0), [&rgyb, &tb, &gyb, &vb, &gx])
                    } else {
                        conv::backward_data_acc(g, &gy, wt, &mut want);
                        (params(g, woff, 0, 0), [&gyb, &tb, &gyb, &tb, &gx])
                    };
                    let c = tile.consts(Consts::conv(pair, false, acc));
                    dispatch_once(
                        &ctx,
                        Kernel::ConvTiledBackwardData,
                        c,
                        &p,
                        &bufs,
                        data_groups(g, tile),
                    )
                    .unwrap();
                    let e = check(
                        &format!("{what} tile {tile} backward data pair={pair} acc={acc}"),
                        &read(&ctx, &gx),
                        &want,
                    );
                    worst[1] = worst[1].max(e);
                }
            }

            // Weight gradient, stage one: the engine's split and a random
            // one; [gy, x, gy, x] and [R(gy), x, gy, ẋ]. Nothing past the
            // partials is written.
            let rows = g.n * g.oh;
            let (per_engine, _) = kernels::conv_weight_chunks(g.n, g.oh, g.ow, wl);
            let per_random = r.random_range(1..=rows);
            for (tile, first) in tiles(gi, g.cout) {
                for per in [per_engine, per_random] {
                    let chunks = rows.div_ceil(per);
                    for pair in [false, true] {
                        if !(first || pair && per == per_engine) {
                            continue;
                        }
                        let p = ConvParams {
                            rows_per_chunk: per as u32,
                            chunks: chunks as u32,
                            ..params(g, woff, 0, 0)
                        };
                        let parts = poisoned(&ctx, "partials", wl * chunks + 3);
                        let (bufs, want) = if pair {
                            (
                                [&rgyb, &xb, &gyb, &dxb, &parts],
                                weight_partials(g, per, chunks, &rgy, &x, Some((&gy, &dx))),
                            )
                        } else {
                            (
                                [&gyb, &xb, &gyb, &xb, &parts],
                                weight_partials(g, per, chunks, &gy, &x, None),
                            )
                        };
                        let c = tile.consts(Consts::new(&[("PAIR_B", pair as u32)]));
                        dispatch_once(
                            &ctx,
                            Kernel::ConvTiledBackwardWeight,
                            c,
                            &p,
                            &bufs,
                            weight_groups(g, chunks, tile),
                        )
                        .unwrap();
                        let got = read(&ctx, &parts);
                        let tag = format!("{what} tile {tile} weight pair={pair} rows/chunk {per}");
                        worst[2] = worst[2].max(check(&tag, &got[..wl * chunks], &want));
                        assert!(
                            got[wl * chunks..].iter().all(|v| v.is_nan()),
                            "{tag}: wrote past the partials"
                        );
                    }
                }
            }
        }
        eprintln!(
            "{backend}: {} shapes; worst forward {:.2e}, backward data {:.2e}, weight partials {:.2e}",
            cases.len(),
            worst[0],
            worst[1],
            worst[2]
        );
    }
}

/// One dispatch of `kernel` over `tangents` tangents (workgroup z), as a
/// block product's R-pass runs it.
fn dispatch_block(
    ctx: &GpuContext,
    kernel: Kernel,
    consts: Consts,
    p: &ConvParams,
    bufs: Vec<GpuBuffer>,
    grid: Grid,
    tangents: u32,
) -> Vec<GpuBuffer> {
    let step = Step::new(kernel, consts, p, (0..bufs.len()).collect(), grid);
    let prog = Compiled::build(ctx, "block test", &[step], &bufs).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    prog.record_block(&mut enc, tangents);
    ctx.queue.submit([enc.finish()]);
    ctx.check().unwrap();
    bufs
}

/// Three tangents per dispatch (KMAX = 3, workgroup z = tangent): the
/// bindings the engine's R-pass marks in KB (ẋ or R(gy), v or ẋ, and the
/// output: bits 1, 4, 5) and every binding, each tangent's slice against
/// its own float64 products. The shared bindings are read whole.
#[test]
fn tiled_conv_kernels_serve_three_tangents_per_dispatch() {
    const K: usize = 3;
    let cases = [
        geom(2, 5, 7, 6, 70, 3, 1, 1),
        geom(2, 4, 11, 9, 6, 11, 4, 6),
    ];
    let slices =
        |r: &mut StdRng, len: usize| -> Vec<Vec<f64>> { (0..K).map(|_| rnd(r, len)).collect() };
    let flat = |v: &[Vec<f64>]| -> Vec<f64> { v.concat() };
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(2);
        for g in &cases {
            let what = format!(
                "{backend} tiled K=3 n{} cin{} {}x{} cout{} k{} s{} p{}",
                g.n, g.cin, g.h, g.w, g.cout, g.k, g.stride, g.pad
            );
            let (xl, wl, yl) = (
                g.n * g.cin * g.h * g.w,
                g.cout * g.cin * g.k * g.k,
                g.n * g.cout * g.oh * g.ow,
            );
            let plen = wl + g.cout + 2;
            let (woff, boff) = (2, 2 + wl);
            for kb in [0b110010u32, 0b111110] {
                let all = kb == 0b111110;
                // Binding b holds K slices where KB marks it, else one.
                let input = |r: &mut StdRng, b: u32, len: usize| -> Vec<Vec<f64>> {
                    if kb >> b & 1 == 1 {
                        slices(r, len)
                    } else {
                        vec![rnd(r, len); K]
                    }
                };
                let buf = |name: &str, b: u32, v: &[Vec<f64>]| {
                    if kb >> b & 1 == 1 {
                        upload(&ctx, name, &flat(v))
                    } else {
                        upload(&ctx, name, &v[0])
                    }
                };
                let consts = |c: Consts| c.with("KB", kb).with("KMAX", K as u32);

                // R-forward [ẋ, θ, x, v, ẏ] with bias and ACC.
                let (dx, th, x, v) = (
                    input(&mut r, 1, xl),
                    input(&mut r, 2, plen),
                    input(&mut r, 3, xl),
                    input(&mut r, 4, plen),
                );
                let y0 = slices(&mut r, yl);
                let bufs = vec![
                    buf("ẋ", 1, &dx),
                    buf("θ", 2, &th),
                    buf("x", 3, &x),
                    buf("v", 4, &v),
                    upload(&ctx, "ẏ", &flat(&y0)),
                ];
                let out = dispatch_block(
                    &ctx,
                    Kernel::ConvTiledForward,
                    consts(Consts::conv(true, true, true)),
                    &params(g, woff, woff, boff),
                    bufs,
                    forward_groups(g, ConvTile::DEFAULT),
                    K as u32,
                );
                let got = read(&ctx, &out[4]);
                for t in 0..K {
                    let mut want = y0[t].clone();
                    conv::forward_acc(g, &dx[t], &th[t][woff..woff + wl], &mut want);
                    conv::forward_acc(g, &x[t], &v[t][woff..woff + wl], &mut want);
                    conv::bias_acc(g.n, g.cout, g.oh * g.ow, &v[t][boff..], &mut want);
                    check(
                        &format!("{what} KB {kb:#b} forward tangent {t}"),
                        &got[t * yl..(t + 1) * yl],
                        &want,
                    );
                }

                // R-backward data [R(gy), θ, gy, v, R(gx)], overwriting.
                let (rgy, th, gy, v) = (
                    input(&mut r, 1, yl),
                    input(&mut r, 2, plen),
                    input(&mut r, 3, yl),
                    input(&mut r, 4, plen),
                );
                let bufs = vec![
                    buf("R(gy)", 1, &rgy),
                    buf("θ", 2, &th),
                    buf("gy", 3, &gy),
                    buf("v", 4, &v),
                    poisoned(&ctx, "R(gx)", K * xl),
                ];
                let out = dispatch_block(
                    &ctx,
                    Kernel::ConvTiledBackwardData,
                    consts(Consts::conv(true, false, false)),
                    &params(g, woff, woff, 0),
                    bufs,
                    data_groups(g, ConvTile::DEFAULT),
                    K as u32,
                );
                let got = read(&ctx, &out[4]);
                for t in 0..K {
                    let mut want = vec![0.0; xl];
                    conv::backward_data_acc(g, &rgy[t], &th[t][woff..woff + wl], &mut want);
                    conv::backward_data_acc(g, &gy[t], &v[t][woff..woff + wl], &mut want);
                    check(
                        &format!("{what} KB {kb:#b} backward data tangent {t}"),
                        &got[t * xl..(t + 1) * xl],
                        &want,
                    );
                }

                // Weight partials [R(gy), x, gy, ẋ, parts].
                let (per, chunks) = kernels::conv_weight_chunks(g.n, g.oh, g.ow, wl);
                let (rgy, x, gy, dx) = (
                    input(&mut r, 1, yl),
                    input(&mut r, 2, xl),
                    input(&mut r, 3, yl),
                    input(&mut r, 4, xl),
                );
                let pl = wl * chunks;
                let bufs = vec![
                    buf("R(gy)", 1, &rgy),
                    buf("x", 2, &x),
                    buf("gy", 3, &gy),
                    buf("ẋ", 4, &dx),
                    poisoned(&ctx, "partials", K * pl),
                ];
                let p = ConvParams {
                    rows_per_chunk: per as u32,
                    chunks: chunks as u32,
                    ..params(g, 0, 0, 0)
                };
                let out = dispatch_block(
                    &ctx,
                    Kernel::ConvTiledBackwardWeight,
                    consts(Consts::new(&[("PAIR_B", 1)])),
                    &p,
                    bufs,
                    weight_groups(g, chunks, ConvTile::DEFAULT),
                    K as u32,
                );
                let got = read(&ctx, &out[4]);
                for t in 0..K {
                    let want =
                        weight_partials(g, per, chunks, &rgy[t], &x[t], Some((&gy[t], &dx[t])));
                    check(
                        &format!("{what} KB {kb:#b} weight partials tangent {t} (all bindings sliced: {all})"),
                        &got[t * pl..(t + 1) * pl],
                        &want,
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- engine

fn engine(choice: BackendChoice, p: &Problem, path: ConvPath, block: usize) -> Option<GpuEngine> {
    let ctx = gpu_context(choice)?;
    let options = EngineOptions {
        block: Some(block),
        conv_path: path,
        ..Default::default()
    };
    Some(GpuEngine::with_options(ctx, p, options).unwrap())
}

/// Auto picks the tiled kernels on GPUs only; a forced path is kept.
#[test]
fn auto_chooses_the_tiled_path_on_gpus_only() {
    for t in ["DiscreteGpu", "IntegratedGpu", "VirtualGpu"] {
        assert!(ConvPath::Auto.tiled_on(t), "{t}");
        assert!(!ConvPath::Emulator.tiled_on(t), "{t}");
    }
    for t in ["Cpu", "Other"] {
        assert!(!ConvPath::Auto.tiled_on(t), "{t}");
        assert!(ConvPath::Tiled.tiled_on(t), "{t}");
    }
}

/// What `hesscope devices` says the automatic choices are: on a GPU that
/// has the tiled kernels' limits, tiled convs, split reductions and
/// device bases; on one without them the emulator convs; on a CPU
/// adapter the emulators' forms throughout.
#[test]
fn devices_reports_the_automatic_choices_per_adapter() {
    use hesscope::gpu::executor::AutoChoices;
    let mem = ConvPath::TILED_WORKGROUP_MEMORY;
    let h200 = AutoChoices::on("DiscreteGpu", 49_152, 1024, 1024);
    assert_eq!(
        (h200.conv, h200.reductions.as_str(), h200.lanczos_bases),
        ("tiled", "split in segments of 4096", "device")
    );
    let small = AutoChoices::on("IntegratedGpu", mem - 4, 256, 256);
    assert_eq!((small.conv, small.lanczos_bases), ("emulator", "device"));
    assert_eq!(small.reductions, "split in segments of 4096");
    let lavapipe = AutoChoices::on("Cpu", 32_768, 1024, 1024);
    assert_eq!(
        (
            lavapipe.conv,
            lavapipe.reductions.as_str(),
            lavapipe.lanczos_bases
        ),
        ("emulator", "a workgroup per channel", "host")
    );
    // And an engine on each adapter here runs what its report says.
    for a in hesscope::gpu::list_adapters() {
        let choice = match a.backend.as_str() {
            "vulkan" => BackendChoice::Vulkan,
            "gl" => BackendChoice::Gl,
            _ => continue,
        };
        let ctx = match GpuContext::open(choice, a.index) {
            Ok(ctx) => ctx,
            Err(e) => {
                skip(&format!(
                    "{} ({}) is listed but does not open: {e}",
                    a.name, a.backend
                ));
                continue;
            }
        };
        let p = problem("cnn-tiny", BnMode::Batch);
        let e = GpuEngine::with_options(ctx, &p, EngineOptions::default()).unwrap();
        let paths = e.kernel_paths().unwrap();
        let conv = if a.auto.conv == "tiled" {
            "conv tiled"
        } else {
            "conv emulator"
        };
        assert!(
            paths.starts_with(conv) && paths.ends_with(&a.auto.reductions),
            "{}: {paths} against {:?}",
            a.name,
            a.auto
        );
        assert_eq!(e.basis_device().is_some(), a.auto.lanczos_bases == "device");
    }
}

/// The programs of an engine run the kernels of its path: on lavapipe,
/// Auto and Emulator none of the tiled ones, Tiled no emulator conv.
#[test]
fn the_engine_runs_the_kernels_of_its_path() {
    let p = problem("cnn-tiny", BnMode::Batch);
    for (path, tiled) in [
        (ConvPath::Auto, false),
        (ConvPath::Emulator, false),
        (ConvPath::Tiled, true),
    ] {
        let Some(mut e) = engine(BackendChoice::Vulkan, &p, path, 1) else {
            return;
        };
        if path == ConvPath::Auto && e.context().info.device_type != "Cpu" {
            eprintln!("not checked: Auto on {} (a GPU picks the tiled kernels; devices_reports_the_automatic_choices_per_adapter checks that)", e.context().info.name);
            continue;
        }
        let (fb, rp) = e.profile().unwrap();
        let ks: Vec<Kernel> = fb.iter().chain(&rp).map(|t| t.0).collect();
        let is_tiled = |k: &Kernel| {
            matches!(
                k,
                Kernel::ConvTiledForward
                    | Kernel::ConvTiledBackwardData
                    | Kernel::ConvTiledBackwardWeight
            )
        };
        let emulator_conv = |k: &Kernel| {
            let name = format!("{k:?}");
            name.starts_with("ConvForward") || name.starts_with("ConvBackward")
        };
        for want in [
            Kernel::ConvTiledForward,
            Kernel::ConvTiledBackwardData,
            Kernel::ConvTiledBackwardWeight,
        ] {
            assert_eq!(ks.contains(&want), tiled, "{path:?}: {want:?}");
        }
        assert_eq!(ks.iter().any(emulator_conv), !tiled, "{path:?}: {ks:?}");
        assert_eq!(ks.iter().any(is_tiled), tiled, "{path:?}");
        assert!(ks.contains(&Kernel::ConvWeightSum), "{path:?}");
    }
}

/// Every fixture with the tiled path on Vulkan and GL: loss, gradient, Hv
/// and the cached Hv against PyTorch, and a block product of three
/// directions against the emulator path's.
#[test]
fn tiled_engine_matches_every_fixture() {
    let mut rows = vec![];
    for choice in GPU_BACKENDS {
        for (model, bn) in fixture_cases() {
            let p = problem(&model, bn);
            let dir = ref_dir(&model, bn);
            let loss_ref = json(dir.join("reference.json"))["loss"].as_f64().unwrap();
            let grad_ref = vector(&p, dir.join("grad.safetensors"));
            let hv_ref = vector(&p, dir.join("hv.safetensors"));
            let v = vector(&p, fixtures_dir().join(&model).join("v.safetensors"));
            let Some(mut e) = engine(choice, &p, ConvPath::Tiled, 3) else {
                continue;
            };
            let (loss, grad, hv) = e.loss_grad_hvp(&v).unwrap();
            let mut hv2 = vec![0.0; v.len()];
            e.hvp(&v, &mut hv2).unwrap();
            let el = (loss - loss_ref).abs() / loss_ref.abs();
            let (eg, eh, eh2) = (
                rel_err(&grad, &grad_ref),
                rel_err(&hv, &hv_ref),
                rel_err(&hv2, &hv_ref),
            );

            // Three directions of different scales, poisoned outputs.
            let n = p.model.n_params;
            let mut rng = StdRng::seed_from_u64(7);
            let mut vs = vec![v.clone()];
            for s in [2.0, 5.0] {
                vs.push((0..n).map(|_| s * (rng.random::<f64>() - 0.5)).collect());
            }
            let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
            let mut tiled = vec![vec![f64::NAN; n]; 3];
            e.hvp_block(&refs, &mut tiled).unwrap();
            let mut emu = vec![vec![f64::NAN; n]; 3];
            let mut ee = engine(choice, &p, ConvPath::Emulator, 3).unwrap();
            ee.hvp_block(&refs, &mut emu).unwrap();
            let eb = tiled
                .iter()
                .zip(&emu)
                .map(|(a, b)| rel_err(a, b))
                .fold(0.0f64, |m, x| if x.is_nan() { f64::NAN } else { m.max(x) });
            let row = format!(
                "{choice:?} {model} {bn:?} tiled: loss {el:.1e} grad {eg:.1e} hv {eh:.1e} cached hv {eh2:.1e}; block of 3 vs emulator {eb:.1e}"
            );
            eprintln!("{row}");
            let bad = [el, eg, eh, eh2]
                .iter()
                .any(|x| x.is_nan() || *x > FIXTURE_TOL)
                || eb.is_nan()
                || eb > PATH_TOL;
            rows.push((row, bad));
        }
    }
    let bad: Vec<_> = rows.iter().filter(|r| r.1).map(|r| &r.0).collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// Random one- and two-conv models (as tests/shapes.rs draws them, k
/// 1..=11, stride 1..=4, padding to k + 3, 1×1 images and 1-pixel outputs)
/// through the tiled engine: gradient and Hv against the float64
/// reference with the GPU's ReLU masks. Bound: tests/shapes.rs's 1e-5.
#[test]
fn tiled_engine_on_random_conv_models() {
    const MODELS: usize = 24;
    let mut failures = vec![];
    for choice in GPU_BACKENDS {
        let mut r = StdRng::seed_from_u64(0x7e1ed);
        let (mut ran, mut worst, mut refused, mut skipped) = (0, 0.0f64, vec![], false);
        for id in 0..MODELS {
            let (text, desc) = draw_model(&mut r, id);
            let model = arch::parse("tiled.arch", &text).unwrap();
            let samples = r.random_range(1..=3usize);
            let batch = r.random_range(1..=samples);
            let mut weights = Weights::init(&model, r.random());
            weights.theta.iter_mut().for_each(|t| *t = *t as f32 as f64);
            let data = hesscope::data::synthetic(model.input, model.classes, samples, r.random());
            let n = model.n_params;
            let v: Vec<f64> = (0..n)
                .map(|_| (r.random::<f64>() - 0.5) as f32 as f64)
                .collect();
            let p = Problem::new(model, weights, data, batch, BnMode::Batch).unwrap();
            let Some(ctx) = gpu_context(choice) else {
                skipped = true;
                break;
            };
            let options = EngineOptions {
                conv_path: ConvPath::Tiled,
                block: Some(1),
                ..Default::default()
            };
            let mut e = match GpuEngine::with_options(ctx, &p, options) {
                Ok(e) => e,
                Err(err @ hesscope::Error::Unsupported { .. }) => {
                    refused.push(format!("{desc}: {err}"));
                    continue;
                }
                Err(err) => panic!("{desc}: {err}"),
            };
            let (_, grad, hv) = e.loss_grad_hvp(&v).unwrap();
            let masks = e.relu_masks().unwrap();
            let mut cpu = CpuReference::new(p);
            cpu.relu_masks = Some(masks);
            let o = cpu.pass(Some(&v)).unwrap();
            let (eg, eh) = (
                rel_err(&grad, &o.grad),
                rel_err(&hv, o.hv.as_ref().unwrap()),
            );
            worst = worst.max(eg).max(eh);
            if eg.is_nan() || eh.is_nan() || eg > TOL || eh > TOL {
                failures.push(format!(
                    "{choice:?} {desc}: grad {eg:.2e} hv {eh:.2e}\n{text}"
                ));
            }
            ran += 1;
        }
        if !skipped {
            // Every model refused (or most) is a failure, not a pass.
            eprintln!(
                "{choice:?}: {ran} tiled models, worst {worst:.2e}; {} refused by the engine",
                refused.len()
            );
            assert!(
                ran >= MODELS * 2 / 3,
                "{choice:?}: only {ran} of {MODELS} models ran: {refused:#?}"
            );
        }
    }
    assert!(failures.is_empty(), "above {TOL}:\n{}", failures.join("\n"));
}

/// A random model: one or two convs (k 1..=11, stride 1..=4, padding
/// 0..=k, sometimes to k + 3; channels across the 64-wide tiles' edges
/// kept small for the reference) with ReLU, then a linear layer.
fn draw_model(r: &mut StdRng, id: usize) -> (String, String) {
    loop {
        let cin = [1usize, 3, 5, 9][r.random_range(0..4)];
        let (h, w) = if r.random_bool(0.1) {
            (1, 1)
        } else {
            (r.random_range(1..=15usize), r.random_range(1..=15usize))
        };
        let mut text = format!("model tiled{id}\ninput {cin} {h} {w}\n");
        let mut desc = format!("[{cin},{h},{w}]");
        let (mut hh, mut ww) = (h, w);
        let mut convs = 0;
        let mut cout = cin;
        let mut ok = true;
        let layers = if r.random_bool(0.5) { 2 } else { 1 };
        let mut body = String::new();
        for i in 0..layers {
            let k = r.random_range(1..=11usize);
            let s = r.random_range(1..=4usize);
            let pad = if r.random_bool(0.15) {
                r.random_range(k + 1..=k + 3)
            } else {
                r.random_range(0..=k)
            };
            if hh + 2 * pad < k || ww + 2 * pad < k {
                ok = false;
                break;
            }
            cout = [1usize, 2, 7, 9, 17, 33][r.random_range(0..6)];
            let bias = r.random_bool(0.6);
            body += &format!(
                "conv c{} {cout} k={k} stride={s} pad={pad} bias={bias}\nrelu\n",
                i + 1
            );
            desc += &format!(
                " conv(cout {cout} k{k} s{s} p{pad}{})",
                if bias { " +b" } else { "" }
            );
            hh = (hh + 2 * pad - k) / s + 1;
            ww = (ww + 2 * pad - k) / s + 1;
            convs += 1;
        }
        if !ok || convs == 0 || cout * hh * ww > 4096 {
            continue;
        }
        let classes = r.random_range(2..=5usize);
        text += &format!("classes {classes}\n{body}flatten\nlinear fc {classes}\n");
        desc += &format!(" -> [{cout},{hh},{ww}] fc {classes}");
        return (text, desc);
    }
}

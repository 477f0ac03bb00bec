//! The GPU kernels of the sequence layers (issue 25) against the float64
//! reference (src/ops, src/layers), on Vulkan (lavapipe) and GL (llvmpipe),
//! outputs poisoned with NaN (accumulating outputs start from random
//! values), random inputs (seeded), and output buffers longer than the
//! result whose tail must keep its bits.
//!
//! Kernels so far: GELU's tanh form (`gelu_tanh`, Hugging Face's
//! `gelu_new`) as a case of shaders/activation.wgsl; LayerNorm over the
//! last dimension (shaders/layernorm.wgsl); `tokens` and `select` through
//! the channel shuffle and block copies of shaders/channels.wgsl, and
//! nn.Linear on a sequence through the linear layer's kernels (these three
//! tested in whole networks). The embedding: tests/gpu_embedding.rs.

mod common;

use common::gpu::*;
use common::gpu_contexts;
use hesscope::gpu::kernels::{ActParams, Consts, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::GpuBuffer;
use hesscope::layers::activation::act_code;
use hesscope::model::{arch, Activation};
use hesscope::ops::activation as act;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ------------------------------------------------------------- gelu_tanh

/// Per-element tolerance of the gelu_tanh kernels, relative to the size of
/// the terms each output sums (`gelu_tanh_terms`) times (1 + |u|), u =
/// √(2/π)(x + 0.044715x³) the inner argument. The kernel's σ, sech² and
/// tanh are within a few ulp of exact at their f32 argument (the shared
/// exp_dd of shaders/activation.wgsl, as for `gelu`/`silu`, whose outputs
/// are measured within 3.8e-7 of their terms in tests/gpu_kernels.rs),
/// but that argument 2u is itself rounded in f32 (x², the constants, two
/// products and a sum: ≲ 5 roundings of u), and e^{±2u} turns a relative
/// error δ of u into a relative error 2|u|·δ of σ(2u) in the lower tail
/// and of sech²(u) (tanh'(u) = 4e/(1 + e)², e = e^{−2|u|}). So an element
/// errs by ≲ (10 + 10|u|)·2⁻²⁴ of its terms: ≈ 6e-7·(1 + |u|). `TOL_GT`
/// = 2e-6 (≈ 34u) keeps ≥ 3× headroom; a wrong constant (0.0447 for
/// 0.044715) errs by ≥ 3e-5·|u| in the tails and a wrong formula by ≥ 1e-2.
const TOL_GT: f64 = 2e-6;

/// Relative L2 error over the whole of one output for |x| ≤ 8 (where the
/// per-element bound's (1 + |u|) is at most 26 but the elements of size
/// ~|x| dominate): the same few roundings per element, unaligned across
/// thousands of elements, ≈ u·√10 ≈ 2e-7; 1e-6 as `TOL_ACT` of
/// tests/gpu_kernels.rs.
const TOL_GT_L2: f64 = 1e-6;

/// GELU-tanh's inner u and u' at x.
fn inner(x: f64) -> (f64, f64) {
    const C: f64 = 0.797_884_560_802_865_4;
    const A: f64 = 0.044_715;
    (C * (x + A * x * x * x), C * (1.0 + 3.0 * A * x * x))
}

/// The sizes of the terms of f = x·σ(2u), f' = σ(2u) + x/2·sech²(u)·u' and
/// f'' = sech²(u)·(u' + x/2·(u'' − 2·tanh(u)·u'²)) at x, each times
/// (1 + |u|) (see `TOL_GT`).
fn gelu_tanh_terms(x: f64) -> (f64, f64, f64) {
    let (u, du) = inner(x);
    let d2u = 0.797_884_560_802_865_4 * 6.0 * 0.044_715 * x;
    let s = act::sigmoid(2.0 * u);
    let e = (-2.0 * u.abs()).exp();
    let s2 = 4.0 * e / ((1.0 + e) * (1.0 + e));
    let amp = if u.is_finite() { 1.0 + u.abs() } else { 1.0 };
    let f = (x * s).abs();
    let (d1, d2) = if s2 == 0.0 {
        (s, 0.0)
    } else {
        (
            s + 0.5 * (x * s2 * du).abs(),
            s2 * (du + 0.5 * x.abs() * (d2u.abs() + 2.0 * u.tanh().abs() * du * du)),
        )
    };
    (f * amp, d1 * amp, d2 * amp)
}

/// Results below f32's normal range (smallest normal 1.18e-38): past
/// x ≈ −10, GELU-tanh's σ(2u) and sech²(u) fall under it (e^{2u} =
/// e^{−142} at x = −12), where the kernel's exp_dd gives 0 or a subnormal;
/// an element whose error is below this absolute floor passes.
const F32_FLOOR: f64 = 1e-37;

/// Every element finite and within `TOL_GT` of `want` relative to `scale`
/// (or within `F32_FLOOR` absolutely); the tail past `want` keeps its
/// bits. Returns the worst relative error among the others.
#[track_caller]
fn check_elems(what: &str, got: &[f32], before: &[f32], want: &[f64], scale: &[f64]) -> f64 {
    check_scaled(what, got, before, (want, scale), TOL_GT, F32_FLOOR)
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - w) * (*g as f64 - w);
        den += w * w;
    }
    (num / den).sqrt()
}

/// One kernel run: (kernel, has ACC, inputs, reference, term sizes).
type Case<'a> = (Kernel, bool, Vec<&'a GpuBuffer>, Vec<f64>, Vec<f64>);

/// f, f', f'' of the kernel against `ops::activation` (whose gelu_tanh is
/// checked against Hugging Face's formula and by finite differences in
/// tests/ops_activation.rs) through the four entry points, with and
/// without accumulation, on uniform x over [−8, 8] with ±0, then larger
/// ones: ±12 (σ(2u) underflows to its tail), past every exponential's
/// range, ±1e30 (x² overflows f32) and f32's extremes.
#[test]
fn gelu_tanh_kernels_match() {
    let a = Activation::GeluTanh;
    let code = act_code(a);
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(25);
        for round in 0..2 {
            let n0 = r.random_range(2000..3000) / 256 * 256 + r.random_range(1..=255);
            let mut x = uniform(&mut r, n0, -8.0, 8.0);
            x[0] = 0.0;
            x[7] = -0.0;
            let large = [
                12.0,
                -12.0,
                -9.5,
                1e4,
                -1e4,
                1e30,
                -1e30,
                f32::MAX as f64,
                -(f32::MAX as f64),
            ];
            x.extend(large);
            let len = x.len();
            let dx = uniform(&mut r, len, -1.0, 1.0);
            let gy = uniform(&mut r, len, -1.0, 1.0);
            let rgy = uniform(&mut r, len, -1.0, 1.0);
            let (xb, dxb, gyb, rgyb) = (
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );
            let t: Vec<(f64, f64, f64)> = x.iter().map(|&v| gelu_tanh_terms(v)).collect();
            let mut bwd = vec![0.0; len];
            act::backward_acc(a, &x, &gy, &mut bwd);
            let mut rbwd = vec![0.0; len];
            act::r_backward_acc(a, &x, &dx, &gy, &rgy, &mut rbwd);
            let cases: Vec<Case> = vec![
                (
                    Kernel::ActForward,
                    false,
                    vec![&xb],
                    act::forward(a, &x),
                    t.iter().map(|t| t.0).collect(),
                ),
                (
                    Kernel::ActRForward,
                    false,
                    vec![&xb, &dxb],
                    act::r_forward(a, &x, &dx),
                    (0..len).map(|i| t[i].1 * dx[i].abs()).collect(),
                ),
                (
                    Kernel::ActBackward,
                    true,
                    vec![&xb, &gyb],
                    bwd,
                    (0..len).map(|i| t[i].1 * gy[i].abs()).collect(),
                ),
                (
                    Kernel::ActRBackward,
                    true,
                    vec![&xb, &dxb, &gyb, &rgyb],
                    rbwd,
                    (0..len)
                        .map(|i| t[i].1 * rgy[i].abs() + t[i].2 * (dx[i] * gy[i]).abs())
                        .collect(),
                ),
            ];
            let p = ActParams {
                len: len as u32,
                ..Default::default()
            };
            for (kernel, has_acc, inputs, want, scale) in cases {
                assert!(want.iter().all(|v| v.is_finite()), "{kernel:?}: reference");
                let accs: &[bool] = if has_acc { &[false, true] } else { &[false] };
                for &acc in accs {
                    let consts = if has_acc {
                        Consts::new(&[("ACT", code), ("ACC", acc as u32)])
                    } else {
                        Consts::new(&[("ACT", code)])
                    };
                    let y0 = uniform(&mut r, len + 3, -1.0, 1.0);
                    let y = if acc {
                        upload(&ctx, "out", &y0)
                    } else {
                        poisoned(&ctx, "out", len + 3)
                    };
                    let before = read_raw(&ctx, &y);
                    let mut bufs = inputs.clone();
                    bufs.push(&y);
                    dispatch_once(&ctx, kernel, consts, &p, &bufs, Grid::Threads(len)).unwrap();
                    let got = read_raw(&ctx, &y);
                    let (want, scale): (Vec<f64>, Vec<f64>) = if acc {
                        (0..len)
                            .map(|i| (want[i] + y0[i], scale[i] + y0[i].abs()))
                            .unzip()
                    } else {
                        (want.clone(), scale.clone())
                    };
                    let what = format!("{backend} gelu_tanh round {round} {kernel:?} acc={acc}");
                    let worst = check_elems(&what, &got, &before, &want, &scale);
                    let l2 = rel_l2(&got[..n0], &want[..n0]);
                    assert!(l2 <= TOL_GT_L2, "{what}: relative L2 {l2:.2e}");
                    eprintln!("{what}: worst {worst:.2e} of the terms·(1+|u|), L2 {l2:.2e}");
                }
            }
        }
    }
}

/// Gradient and Hv of a small network with gelu_tanh between two convs on
/// the GPU against the float64 reference, within `TOL_GPU` = 1e-5
/// relative (tests/decisions.rs' bound for whole-model float32 results:
/// reductions of a few hundred terms and the activation's few-ulp f, f',
/// f'' give ~1e-6). Pre-activations span a few units, where GELU-tanh is
/// curved, so the R-backward's f'' term is exercised.
#[test]
fn gelu_tanh_network_matches_float64_on_the_gpu() {
    const TOL_GPU: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(2501);
    let text = "model gt\ninput 3 6 6\nclasses 4\nconv c1 6 k=3 pad=1\ngelu_tanh g1\n\
                conv c2 5 k=3 pad=1\ngelu_tanh g2\nflatten\nlinear fc 4\n";
    let model = arch::parse("gt.arch", text).unwrap();
    hesscope::layers::check_model(&model).unwrap();
    let mut theta = vec![];
    for p in &model.params {
        let fan: usize = p.shape[1..].iter().product();
        let s = 2.0 * (3.0 / fan.max(1) as f64).sqrt();
        theta.extend((0..p.numel()).map(|_| r.random_range(-s..s)));
    }
    let n = 5;
    let data = image_data(&mut r, &model, n, 4);
    let problem = problem_of(&model, theta, data, n);
    let vs = tangents(&mut r, 1, model.n_params);
    check_whole_model("gelu_tanh network", &problem, &vs, TOL_GPU, false);
}

// ------------------------------------------------------------- layernorm

/// Relative L2 error of each LayerNorm kernel's output against the
/// unit's float64 passes (`LayerNormUnit`). Each output element sums a
/// handful of products after two row reductions of d terms (workgroup
/// trees: ≤ d/256 serial adds per thread + 8 tree levels, so ≤ ~12 serial
/// terms for d ≤ 1024) and the parameter sums add rows·1 terms serially
/// (≤ 400 here): by the random-walk count of tests/gpu_kernels.rs' `TOL`
/// (≈ u·√L relative) ≲ 2e-6 with L ≤ 400 plus the ~10 roundings of the
/// per-element formula; the R-backward chains the most (≈ 20 roundings).
/// `TOL` = 1e-5 as tests/gpu_kernels.rs' reductions, while a missing term
/// (e.g. the R-backward's ṡ/s·gx or ẋ̂·⟨g x̂⟩) errs by ≥ 1e-2 on these
/// random inputs.
const TOL_LN: f64 = 1e-5;

/// Every element finite, within `TOL_LN` in relative L2, and the tail past
/// `want` (and any element outside `range`) bit for bit as before.
#[track_caller]
fn check_ln(
    what: &str,
    got: &[f32],
    before: &[f32],
    range: std::ops::Range<usize>,
    want: &[f64],
) -> f64 {
    for (i, (a, b)) in got.iter().zip(before).enumerate() {
        if !range.contains(&i) {
            assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i} outside");
        }
    }
    let g: Vec<f64> = got[range].iter().map(|&x| x as f64).collect();
    assert!(g.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_l2_f64(&g, want);
    assert!(e <= TOL_LN, "{what}: relative L2 {e:.2e} > {TOL_LN:e}");
    e
}

/// A model whose node 1 is a LayerNorm over [t, d] (node 0 turns a
/// [d, 1, t] image into that sequence).
fn ln_model(t: usize, d: usize, eps: f64) -> hesscope::model::Model {
    let text = format!(
        "model ln\ninput {d} 1 {t}\nclasses 2\ntokens\nlayernorm ln eps={eps:e}\n\
         select index=0\nlinear fc 2\n"
    );
    arch::parse("ln.arch", &text).unwrap()
}

/// The five LayerNorm kernels against `LayerNormUnit`'s float64 passes,
/// on random shapes: d from 1 (x̂ = 0) through one and several 256-thread
/// strides, rows (samples · tokens) from 1 up, both eps of the fixtures,
/// γ and β at their offsets in θ (v, the gradient and Hv), with and
/// without accumulation; outputs poisoned (or random where accumulated),
/// the gradient buffer's other parameters untouched.
#[test]
fn layernorm_kernels_match() {
    use hesscope::gpu::kernels::LnParams;
    use hesscope::layers::{layernorm::LayerNormUnit, Layer};
    let mut shapes = vec![(1, 1), (3, 1), (2, 3), (5, 256), (4, 257), (2, 700)];
    let mut r = StdRng::seed_from_u64(2502);
    for _ in 0..6 {
        shapes.push((r.random_range(1..=40), r.random_range(1..=600)));
    }
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(2503);
        for (case, &(rows, d)) in shapes.iter().enumerate() {
            // rows = n samples of t tokens.
            let n = if rows % 2 == 0 { 2 } else { 1 };
            let t = rows / n;
            let eps = if case % 2 == 0 { 1e-5 } else { 1e-6 };
            let m = ln_model(t, d, eps);
            let node = &m.nodes[1];
            assert_eq!(node.kind(), "layernorm");
            let np = m.n_params;
            let theta = uniform(&mut r, np, -1.5, 1.5);
            let v = uniform(&mut r, np, -1.0, 1.0);
            let len = rows * d;
            // x with a per-row offset and scale, as residual streams have.
            let mut x = uniform(&mut r, len, -1.0, 1.0);
            for row in 0..rows {
                let (o, s) = (r.random_range(-3.0..3.0), r.random_range(0.2..4.0));
                for j in 0..d {
                    x[row * d + j] = ((x[row * d + j] * s + o) as f32) as f64;
                }
            }
            let dx = uniform(&mut r, len, -1.0, 1.0);
            let gy = uniform(&mut r, len, -1.0, 1.0);
            let rgy = uniform(&mut r, len, -1.0, 1.0);
            let cx = batch_cx(&m, n, &theta);
            let u = LayerNormUnit;
            let (y, mut saved) = u.forward(&cx, node, &[&x]);
            let dy = u.r_forward(&cx, node, &[&x], &[&dx], &v, &mut saved);
            let mut grad = vec![0.0; np];
            let gx = u
                .backward(&cx, node, &[&x], &saved, &gy, &mut grad)
                .remove(0);
            let mut hv = vec![0.0; np];
            let rgx = u
                .r_backward(&cx, node, &[&x], &[&dx], &saved, &gy, &rgy, &v, &mut hv)
                .remove(0);
            let (w, b) = match node.op {
                hesscope::model::Op::LayerNorm { weight, bias, .. } => (weight, bias),
                _ => unreachable!(),
            };
            let (go, bo) = (m.params[w].offset, m.params[b].offset);
            let lp = LnParams {
                rows: rows as u32,
                d: d as u32,
                gamma_off: go as u32,
                beta_off: bo as u32,
                eps: eps as f32,
                ..Default::default()
            };
            let tag = format!("{backend} rows {rows} d {d} eps {eps:e}");
            let (xb, dxb, gyb, rgyb) = (
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );
            let (thb, vb) = (upload(&ctx, "θ", &theta), upload(&ctx, "v", &v));
            // Forward: x̂ and s (checked through the passes that read
            // them), y.
            let xhat = poisoned(&ctx, "x̂ and s", len + rows);
            let yb = poisoned(&ctx, "y", len + 3);
            let before = read_raw(&ctx, &yb);
            let groups = Grid::Groups(rows);
            dispatch_once(
                &ctx,
                Kernel::LnForward,
                Consts::default(),
                &lp,
                &[&xb, &thb, &xhat, &yb],
                groups,
            )
            .unwrap();
            let e_y = check_ln(
                &format!("{tag} forward"),
                &read_raw(&ctx, &yb),
                &before,
                0..len,
                &y,
            );
            let xh = read(&ctx, &xhat);
            assert!(xh.iter().all(|v| v.is_finite()), "{tag}: x̂ and s");
            // R-forward: ẋ̂ and ⟨x̂ẋ⟩, ẏ.
            let xhd = poisoned(&ctx, "ẋ̂", len + rows);
            let dyb = poisoned(&ctx, "ẏ", len + 3);
            let before = read_raw(&ctx, &dyb);
            dispatch_once(
                &ctx,
                Kernel::LnRForward,
                Consts::default(),
                &lp,
                &[&dxb, &xhat, &thb, &vb, &xhd, &dyb],
                groups,
            )
            .unwrap();
            let e_dy = check_ln(
                &format!("{tag} r_forward"),
                &read_raw(&ctx, &dyb),
                &before,
                0..len,
                &dy,
            );
            let mut worst = [e_y, e_dy, 0.0, 0.0, 0.0, 0.0];
            for acc in [false, true] {
                let consts = Consts::new(&[("ACC", acc as u32)]);
                let y0 = uniform(&mut r, len + 3, -1.0, 1.0);
                let plus = |w: &[f64]| -> Vec<f64> {
                    if acc {
                        w.iter().zip(&y0).map(|(a, b)| a + b).collect()
                    } else {
                        w.to_vec()
                    }
                };
                let out = |name| {
                    if acc {
                        upload(&ctx, name, &y0)
                    } else {
                        poisoned(&ctx, name, len + 3)
                    }
                };
                let gxb = out("gx");
                let before = read_raw(&ctx, &gxb);
                dispatch_once(
                    &ctx,
                    Kernel::LnBackward,
                    consts,
                    &lp,
                    &[&gyb, &xhat, &thb, &gxb],
                    groups,
                )
                .unwrap();
                let e = check_ln(
                    &format!("{tag} backward acc={acc}"),
                    &read_raw(&ctx, &gxb),
                    &before,
                    0..len,
                    &plus(&gx),
                );
                worst[2] = worst[2].max(e);
                let rgxb = out("R(gx)");
                let before = read_raw(&ctx, &rgxb);
                dispatch_once(
                    &ctx,
                    Kernel::LnRBackward,
                    consts,
                    &lp,
                    &[&gyb, &rgyb, &xhat, &xhd, &thb, &vb, &rgxb],
                    groups,
                )
                .unwrap();
                let e = check_ln(
                    &format!("{tag} r_backward acc={acc}"),
                    &read_raw(&ctx, &rgxb),
                    &before,
                    0..len,
                    &plus(&rgx),
                );
                worst[3] = worst[3].max(e);
            }
            // Parameter sums, added into random gradient/Hv buffers whose
            // other parameters must keep their bits.
            for (pair2, want, slot) in [(false, &grad, 4), (true, &hv, 5)] {
                let t0 = uniform(&mut r, np, -1.0, 1.0);
                let tb = upload(&ctx, "target", &t0);
                let before = read_raw(&ctx, &tb);
                let (a, c, cd) = if pair2 {
                    (&rgyb, &gyb, &xhd)
                } else {
                    (&gyb, &gyb, &xhd)
                };
                let consts = Consts::new(&[("PAIR2", pair2 as u32)]);
                dispatch_once(
                    &ctx,
                    Kernel::LnParamSums,
                    consts,
                    &lp,
                    &[a, &xhat, c, cd, &tb],
                    Grid::Threads(d),
                )
                .unwrap();
                let got = read_raw(&ctx, &tb);
                let mut e = 0.0f64;
                for (off, len_p) in [(go, d), (bo, d)] {
                    let want_p: Vec<f64> = (off..off + len_p).map(|i| want[i] + t0[i]).collect();
                    let g: Vec<f64> = got[off..off + len_p].iter().map(|&v| v as f64).collect();
                    e = e.max(rel_l2_f64(&g, &want_p));
                }
                for i in 0..np {
                    let inside = (go..go + d).contains(&i) || (bo..bo + d).contains(&i);
                    if !inside {
                        assert_eq!(
                            got[i].to_bits(),
                            before[i].to_bits(),
                            "{tag}: θ[{i}] touched"
                        );
                    }
                }
                assert!(e <= TOL_LN, "{tag} param sums pair2={pair2}: {e:.2e}");
                worst[slot] = e;
            }
            eprintln!("{tag}: worst relative L2 y {:.1e} ẏ {:.1e} gx {:.1e} R(gx) {:.1e} ∂γβ {:.1e} Hvγβ {:.1e}",
                worst[0], worst[1], worst[2], worst[3], worst[4], worst[5]);
        }
    }
}

// ------------------------------------------------------- whole models

/// Gradient and Hv (single and as a block of 3 tangents, which runs the
/// kernels on tangent slices) of ViT-shaped networks made of the layers
/// with GPU kernels — tokens, a class token, an added position
/// parameter, nn.Linear on the sequence, LayerNorms
/// around gelu_tanh, select, a flat linear head — on random shapes
/// (tokens, features, widths, batch), against the float64 reference on
/// both backends. `TOL_GPU` = 1e-5 relative, the bound of
/// tests/decisions.rs for whole-model float32 results (chained reductions
/// of ≤ a few hundred terms ≈ u·√L ≈ 1e-6).
#[test]
fn token_networks_match_float64_on_the_gpu() {
    const TOL_GPU: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(2504);
    for case in 0..3 {
        let s = token_shapes(&mut r);
        let TokenShapes { c, h, w, t, d1, d2 } = s;
        let bias = if case == 1 { "bias=false" } else { "" };
        let index = r.random_range(0..=t);
        let text = format!(
            "model vt{case}\ninput {c} {h} {w}\nclasses 4\ntokens\ncls_token class_token\n\
             add_param pos\nlayernorm ln1 eps=1e-6\n\
             linear l1 {d1} {bias}\ngelu_tanh g\nlinear l2 {d2}\nlayernorm ln2\n\
             select index={index}\nlinear fc 4\n"
        );
        check_token_network(&mut r, case, &s, &text, TOL_GPU);
    }
}

//! torchvision ConvNeXt's layers (issue 25): the layer scale
//! (`mul_param`: an image times a raw parameter [C, 1, 1]) and the
//! channels-last round trip (`tokens`, `layernorm`/`linear` on the
//! sequence, `untokens`).
//!
//! Kernels against the float64 reference (src/ops/channels.rs
//! `scale_channels`, `channel_dot`) on random shapes and inputs (seeded),
//! on Vulkan (lavapipe) and GL (llvmpipe): outputs poisoned with NaN (or,
//! accumulating, random values that must be added to), and every element
//! of the buffer outside the result must keep its bits. Inputs are f32
//! values, so the error is the kernels' own rounding (u = 2⁻²⁴):
//! - `TOL_FEW` = 1e-6 for `mul` with `B_PARAM` (one or two products and
//!   an add per element: ≤ 4u ≈ 2.4e-7);
//! - `TOL_SUM` = 1e-5 for `channel_dot` (sums of up to 4·2000 products:
//!   strided partial sums then a tree of 256, a random walk ≈ u·√L ≤ 6e-6
//!   of the terms' size, which is what the error is measured against).
//!   A wrong index or a missing term errs by ≥ 1e-2 on these inputs.
//!
//! Whole networks (float64 engine against the GPU engine, gradient, Hv and
//! a block of 3 Hv): `TOL_GPU` = 1e-5 relative, the bound tests/decisions.rs
//! and tests/gpu_seq.rs use for whole-model float32 results.
//!
//! The float64 passes themselves are held to PyTorch float64 on
//! torchvision's `convnext_tiny` by python/tests/check_models.py (≤ 1e-10)
//! and by finite differences below.

mod common;

use common::gpu::{check_whole_model, image_data, problem_of, tangents, uniform_unit};
use common::gpu_contexts;
use hesscope::cpu::CpuReference;
use hesscope::engine::Curvature;
use hesscope::gpu::kernels::{ChannelParams, Consts, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{GpuBuffer, GpuContext};
use hesscope::model::arch;
use hesscope::ops::channels as ch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL_FEW: f64 = 1e-6;
const TOL_SUM: f64 = 1e-5;
const TOL_GPU: f64 = 1e-5;

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

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

/// ‖got − want‖ / max(‖want‖, ‖scale‖) over `range` of `got`, every
/// element finite; the rest of `got` keeps the bits of `before`.
#[track_caller]
fn check(
    what: &str,
    got: &[f32],
    before: &[f32],
    range: std::ops::Range<usize>,
    want: &[f64],
    scale: &[f64],
    tol: f64,
) -> f64 {
    let (mut num, mut den, mut sden) = (0.0, 0.0, 0.0);
    for (j, i) in range.clone().enumerate() {
        let g = got[i] as f64;
        assert!(g.is_finite(), "{what}: element {i} is {g}: unwritten?");
        num += (g - want[j]).powi(2);
        den += want[j] * want[j];
        sden += scale.get(j).map_or(0.0, |s| s * s);
    }
    for i in (0..got.len()).filter(|i| !range.contains(i)) {
        assert_eq!(
            got[i].to_bits(),
            before[i].to_bits(),
            "{what}: element {i} outside the output changed"
        );
    }
    let rel = if num == 0.0 {
        0.0
    } else {
        (num / den.max(sden)).sqrt()
    };
    assert!(rel <= tol, "{what}: relative error {rel:.2e} > {tol:e}");
    rel
}

fn plus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `mul` with `B_PARAM` (x·γ, γ at an offset of a parameter vector, as
/// the layer scale's forward, R-forward and adjoint plan it) and
/// `channel_dot` (its parameter adjoint, written at an offset of the
/// gradient), plain and accumulating, with and without the second
/// product, on random batches, channels and planes (1×1 planes and
/// single channels included).
#[test]
fn layer_scale_kernels_match_the_reference() {
    let mut r = StdRng::seed_from_u64(2525);
    for (backend, ctx) in gpu_contexts() {
        let (mut worst_mul, mut worst_dot) = (0.0f64, 0.0f64);
        for case in 0..16 {
            let n = r.random_range(1..=4usize);
            let c = if case % 5 == 0 {
                1
            } else {
                r.random_range(1..=40usize)
            };
            let hw = match case % 4 {
                0 => 1,
                3 => r.random_range(500..=2000usize),
                _ => r.random_range(1..=70usize),
            };
            let (pair, acc) = (case % 2 == 1, (case / 2) % 2 == 1);
            let label = format!("{backend} n={n} c={c} hw={hw} pair={pair} acc={acc}");
            let len = n * c * hw;
            // Parameter vectors with γ at `off` among other parameters.
            let (off, np) = (r.random_range(0..50usize), 0);
            let np = np + off + c + r.random_range(0..50usize);
            let (theta, v) = (rnd(&mut r, np), rnd(&mut r, np));
            let (a, cc) = (rnd(&mut r, len), rnd(&mut r, len));
            let (ab, cb, tb, vb) = (
                upload(&ctx, &a),
                upload(&ctx, &cc),
                upload(&ctx, &theta),
                upload(&ctx, &v),
            );
            let dummy = upload(&ctx, &[f32::NAN as f64; 4]);
            let consts = |bp: bool| {
                let mut kv = vec![("PAIR_B", pair as u32), ("ACC", acc as u32)];
                if bp {
                    kv.push(("B_PARAM", 1));
                }
                Consts::new(&kv)
            };
            let (cbind, dbind) = if pair { (&cb, &vb) } else { (&dummy, &dummy) };

            // mul: out (+)= a·γ (+ c·v_γ).
            let extra = r.random_range(0..5usize);
            let before: Vec<f64> = if acc {
                rnd(&mut r, len + extra)
            } else {
                vec![f32::NAN as f64; len + extra]
            };
            let out = upload(&ctx, &before);
            let before32 = read(&ctx, &out);
            let p = ChannelParams {
                len: len as u32,
                hw: hw as u32,
                c: c as u32,
                src_off: off as u32,
                ..Default::default()
            };
            dispatch_once(
                &ctx,
                Kernel::Mul,
                consts(true),
                &p,
                &[&ab, &tb, cbind, dbind, &out],
                Grid::Threads(len),
            )
            .unwrap();
            let mut want = ch::scale_channels(&a, &theta[off..off + c], hw);
            if pair {
                want = plus(&want, &ch::scale_channels(&cc, &v[off..off + c], hw));
            }
            if acc {
                want = plus(&want, &before[..len]);
            }
            let e = check(
                &format!("mul B_PARAM {label}"),
                &read(&ctx, &out),
                &before32,
                0..len,
                &want,
                &[],
                TOL_FEW,
            );
            worst_mul = worst_mul.max(e);

            // channel_dot: grad[off + ch] (+)= Σ a·b (+ c·d).
            let (b2, d2) = (rnd(&mut r, len), rnd(&mut r, len));
            let (b2b, d2b) = (upload(&ctx, &b2), upload(&ctx, &d2));
            let dbind = if pair { &d2b } else { &dummy };
            let before: Vec<f64> = if acc {
                rnd(&mut r, np)
            } else {
                vec![f32::NAN as f64; np]
            };
            let out = upload(&ctx, &before);
            let before32 = read(&ctx, &out);
            let p = ChannelParams {
                blocks: n as u32,
                c: c as u32,
                hw: hw as u32,
                dst_off: off as u32,
                ..Default::default()
            };
            dispatch_once(
                &ctx,
                Kernel::ChannelDot,
                consts(false),
                &p,
                &[&ab, &b2b, cbind, dbind, &out],
                Grid::Groups(c),
            )
            .unwrap();
            let mut want = ch::channel_dot(&a, &b2, c, hw);
            let sq = |x: &[f64], y: &[f64]| -> Vec<f64> {
                let t: Vec<f64> = x.iter().zip(y).map(|(p, q)| (p * q).powi(2)).collect();
                ch::channel_dot(&t, &vec![1.0; len], c, hw)
            };
            let mut terms = sq(&a, &b2);
            if pair {
                want = plus(&want, &ch::channel_dot(&cc, &d2, c, hw));
                terms = plus(&terms, &sq(&cc, &d2));
            }
            if acc {
                want = plus(&want, &before[off..off + c]);
            }
            let scale: Vec<f64> = terms.iter().map(|s| s.sqrt()).collect();
            let e = check(
                &format!("channel_dot {label}"),
                &read(&ctx, &out),
                &before32,
                off..off + c,
                &want,
                &scale,
                TOL_SUM,
            );
            worst_dot = worst_dot.max(e);
        }
        eprintln!(
            "{backend}: mul B_PARAM worst {worst_mul:.1e}, channel_dot worst {worst_dot:.1e}"
        );
    }
}

/// A ConvNeXt block on random shapes, in the explicit form the exporter
/// writes: stem conv, LayerNorm2d (tokens, layernorm, untokens), the
/// block (depthwise conv, tokens, layernorm, linear, gelu, linear,
/// untokens, layer scale, residual add), a downsampling LayerNorm2d +
/// stride-2 conv, global pool, LayerNorm2d on [C, 1, 1], flatten, head.
fn convnext_text(r: &mut StdRng) -> (String, String) {
    let c_in = r.random_range(1..=4usize);
    let (h, w) = (
        2 * r.random_range(1..=4usize),
        2 * r.random_range(1..=4usize),
    );
    // LayerNorm over one feature is its bias whatever the input (nothing
    // before it reaches the loss), and over two it is ±1 up to eps, its
    // derivatives eps/(δ² + eps)^{3/2} of the half-difference δ, which
    // amplify float32's rounding of the inputs by orders of magnitude (an
    // ill-conditioned function, not a kernel error: measured 4e-4 on Hv
    // at width 2). ConvNeXt's are 96 and up; widths from 4 here.
    let d = r.random_range(4..=12usize);
    let k = 2 * r.random_range(0..=3usize) + 1;
    let e = r.random_range(1..=4usize) * d;
    let d2 = r.random_range(4..=12usize);
    let label = format!("[{c_in}, {h}, {w}], width {d} (hidden {e}), depthwise {k}×{k}, then {d2}");
    let text = format!(
        "model cn\ninput {c_in} {h} {w}\nclasses 4\n\
         stem = conv(input) {d} k=1\n\
         s1 = tokens(stem)\nstem_ln = layernorm(s1) eps=1e-06\ns2 = untokens(stem_ln) h={h} w={w}\n\
         b.block.0 = conv(s2) {d} k={k} pad={p} groups={d}\n\
         b.block.1 = tokens(b.block.0)\nb.block.2 = layernorm(b.block.1) eps=1e-06\n\
         b.block.3 = linear(b.block.2) {e}\nb.block.4 = gelu(b.block.3)\n\
         b.block.5 = linear(b.block.4) {d}\nb.block.6 = untokens(b.block.5) h={h} w={w}\n\
         b_1 = mul_param(b.block.6) b.layer_scale\nb_2 = add(b_1, s2)\n\
         ds1 = tokens(b_2)\nds = layernorm(ds1) eps=1e-06\nds2 = untokens(ds) h={h} w={w}\n\
         down = conv(ds2) {d2} k=2 stride=2\n\
         pool = adaptive_avgpool(down) h=1 w=1\nc1 = tokens(pool)\nhead_ln = layernorm(c1) eps=1e-06\n\
         c2 = untokens(head_ln) h=1 w=1\nflat = flatten(c2)\nfc = linear(flat) 4\n",
        p = k / 2
    );
    (label, text)
}

/// Gradient, Hv and a block of 3 Hv of random ConvNeXt-shaped networks on
/// the GPU against the float64 engine, within `TOL_GPU`; the text reads
/// back from `arch::to_text` to the same model.
#[test]
fn convnext_networks_match_float64_on_the_gpu() {
    let mut r = StdRng::seed_from_u64(2526);
    for case in 0..4 {
        let (label, text) = convnext_text(&mut r);
        let model = arch::parse("cn.arch", &text).unwrap();
        hesscope::layers::check_model(&model).unwrap();
        let back = arch::parse("back.arch", &arch::to_text(&model)).unwrap();
        assert_eq!(arch::to_text(&back), arch::to_text(&model), "{label}");
        let scale = model.params.iter().find(|p| p.name == "b.layer_scale");
        let d = model.nodes[0].out_shape.c;
        assert_eq!(
            scale.map(|p| p.shape.clone()),
            Some(vec![d, 1, 1]),
            "{label}"
        );
        let theta = uniform_unit(&mut r, model.n_params);
        let n = r.random_range(1..=3) + case.min(1);
        let data = image_data(&mut r, &model, n, 4);
        let problem = problem_of(&model, theta, data, n);
        let vs = tangents(&mut r, 3, model.n_params);
        check_whole_model(
            &format!("case {case}: {label}, batch {n}"),
            &problem,
            &vs,
            TOL_GPU,
            true,
        );
    }
}

/// The float64 layer scale and untokens passes against central finite
/// differences of the float64 engine's gradient (Hv ≈ (g(θ + εv) −
/// g(θ − εv)) / 2ε, error O(ε²) ≈ 1e-8 relative at ε = 1e-4, bounded
/// by 1e-6), with v only on the layer scale and with v on everything:
/// the layer scale's second-order terms (gy·ẋ into its block of Hv, gy·v_γ
/// into R(gx)) are what the first case measures.
#[test]
fn convnext_hv_matches_finite_differences() {
    let mut r = StdRng::seed_from_u64(2527);
    let (label, text) = convnext_text(&mut r);
    let model = arch::parse("cn.arch", &text).unwrap();
    let theta = uniform_unit(&mut r, model.n_params);
    let n = 2;
    let data = image_data(&mut r, &model, n, 4);
    let problem = problem_of(&model, theta.clone(), data, n);
    let ls = model
        .params
        .iter()
        .find(|p| p.name == "b.layer_scale")
        .unwrap();
    let mut only = vec![0.0; model.n_params];
    for x in &mut only[ls.offset..ls.offset + ls.numel()] {
        *x = r.random_range(-1.0..1.0);
    }
    let all = uniform_unit(&mut r, model.n_params);
    for (what, v) in [("v on the layer scale", only), ("v on all", all)] {
        let mut cpu = CpuReference::new(problem.clone());
        let (_, _, hv) = cpu.loss_grad_hvp(&v).unwrap();
        let eps = 1e-4;
        let grad_at = |sign: f64| {
            let th: Vec<f64> = theta
                .iter()
                .zip(&v)
                .map(|(t, d)| t + sign * eps * d)
                .collect();
            let mut p = problem.clone();
            p.weights.theta = th;
            let mut c = CpuReference::new(p);
            c.loss_grad_hvp(&v).unwrap().1
        };
        let (gp, gm) = (grad_at(1.0), grad_at(-1.0));
        let fd: Vec<f64> = gp
            .iter()
            .zip(&gm)
            .map(|(a, b)| (a - b) / (2.0 * eps))
            .collect();
        let norm = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();
        eprintln!(
            "‖Hv‖ {:.3e}, ‖fd‖ {:.3e}, ‖g+‖ {:.3e}",
            norm(&hv),
            norm(&fd),
            norm(&gp)
        );
        let e = common::rel_err(&hv, &fd);
        eprintln!("{label}, {what}: Hv vs finite differences {e:.1e}");
        assert!(
            e <= 1e-6,
            "{label}, {what}: Hv vs finite differences {e:.1e}"
        );
        // The layer scale's block is not zero: its second-order terms act.
        let blk = &hv[ls.offset..ls.offset + ls.numel()];
        assert!(
            blk.iter().any(|x| x.abs() > 1e-8),
            "{what}: zero layer-scale block"
        );
    }
}

/// Bad `untokens` / `mul_param` lines are typed errors naming the layer
/// and the problem, never panics.
#[test]
fn bad_channels_last_lines_are_refused() {
    let head = "model m\ninput 3 4 4\nclasses 2\nconv c 5 k=1\n";
    let tail = "gap\nlinear fc 2\n";
    let cases = [
        (
            "tokens\nuntokens u h=3 w=4\n",
            "untokens `u`: h=3 w=4 make 12 positions, but the input has 16 tokens",
        ),
        ("tokens\nuntokens u h=4\n", "untokens `u`: w=N is required"),
        (
            "tokens\nuntokens u h=0 w=4\n",
            "untokens `u`: h must be a positive whole number",
        ),
        ("untokens u h=4 w=4\n", "untokens `u` needs a sequence"),
        (
            "tokens\nmul_param s c.gamma\n",
            "mul_param `s` scales the channels of an image",
        ),
        (
            "mul_param s c.gamma init=abc\n",
            "mul_param `s`: init must be a finite number",
        ),
        ("mul_param s c.weight\n", "duplicate tensor name `c.weight`"),
        ("mul_param s c.gamma x=1\n", "x"),
    ];
    for (body, want) in cases {
        let text = format!("{head}{body}{tail}");
        let e = arch::parse("bad.arch", &text)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        assert!(e.to_string().contains(want), "{body}: {e}");
    }
    // The defaults: the layer scale starts at torchvision's 1e-6.
    let m = arch::parse("ok.arch", &format!("{head}mul_param s c.gamma\n{tail}")).unwrap();
    let p = m.params.iter().find(|p| p.name == "c.gamma").unwrap();
    assert_eq!(p.shape, vec![5, 1, 1]);
    assert_eq!(p.init, hesscope::model::Init::Const(1e-6));
}

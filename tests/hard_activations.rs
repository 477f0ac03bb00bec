//! ReLU6, Hardswish and Hardsigmoid (MobileNet's activations): the float64
//! reference against PyTorch's definitions and float64 autograd, every
//! kernel (the plain ones and the `act_replay_*` ones of frozen plans)
//! against the float64 reference on Vulkan (lavapipe) and GL (llvmpipe),
//! and their piecewise decisions taken by float64 and replayed on the GPU;
//! with batch norm's `eps` option (MobileNetV3 uses 1e-3).
//!
//! Tolerances:
//! - kernels: per element, relative to the sum of the magnitudes of the
//!   terms the kernel forms (|x|·(|x| + 3)/6 for Hardswish's middle
//!   piece, (2|x| + 3)/6 for its derivative, ...): `TOL_ELEM` = 1e-6. Each
//!   output is at most six f32 roundings (x + 3, a product, WGSL's
//!   division (2.5 ulp), the R-backward's second product and sum, an
//!   accumulating add) ≈ 8.5u ≈ 5e-7 with u = 2⁻²⁴; 1e-6 keeps 2× headroom,
//!   while a wrong piece errs by ≥ 1/6 of the terms.
//! - the float64 reference against PyTorch float64 (`tests/data/hard-act`,
//!   made by python/tests/make_hard_act_reference.py): 1e-10 relative, the
//!   fixtures' bound for float64 results.
//! - GPU gradient and Hv with float64 decisions against the float64
//!   reference: 1e-5 relative, as tests/decisions.rs.

mod common;

use common::gpu::{check_scaled, poisoned, read_raw, uniform, upload};
use common::{gpu_contexts, rel_err};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::decisions::DecisionSource;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::kernels::{ActParams, Consts, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{EngineOptions, GpuBuffer, GpuContext, GpuEngine};
use hesscope::layers::activation::{act_code, ActivationUnit};
use hesscope::layers::{Decision, Layer, StateWords};
use hesscope::model::{arch, params, Activation, Model, Op, Weights};
use hesscope::ops::activation as act;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL_ELEM: f64 = 1e-6;
const TOL_PYTORCH: f64 = 1e-10;
const TOL_GPU: f64 = 1e-5;

const HARD: [(Activation, &str); 3] = [
    (Activation::Relu6, "relu6"),
    (Activation::Hardswish, "hardswish"),
    (Activation::Hardsigmoid, "hardsigmoid"),
];

// ---------------------------------------------------------------- float64

/// PyTorch's values and derivatives at and beside the kinks (measured with
/// torch.autograd on float64 tensors: relu6' is 0 at 0 and 6; hardsigmoid'
/// 0 at ±3; hardswish' 0 at -3 and 1 at 3, hardswish'' 0 at ±3).
#[test]
fn kinks_follow_pytorch() {
    let (r6, hs, hg) = (
        Activation::Relu6,
        Activation::Hardswish,
        Activation::Hardsigmoid,
    );
    for (a, x, f, df) in [
        (r6, 0.0, 0.0, 0.0),
        (r6, 6.0, 6.0, 0.0),
        (r6, 3.0, 3.0, 1.0),
        (r6, -1.0, 0.0, 0.0),
        (r6, 7.5, 6.0, 0.0),
        (hg, -3.0, 0.0, 0.0),
        (hg, 3.0, 1.0, 0.0),
        (hg, 0.0, 0.5, 1.0 / 6.0),
        (hg, -4.0, 0.0, 0.0),
        (hg, 4.0, 1.0, 0.0),
        (hs, -3.0, 0.0, 0.0),
        (hs, 3.0, 3.0, 1.0),
        (hs, 0.0, 0.0, 0.5),
        (hs, -1.5, -0.375, 0.0),
        (hs, -4.0, 0.0, 0.0),
        (hs, 4.0, 4.0, 1.0),
    ] {
        assert_eq!(act::f(a, x), f, "{a:?}({x})");
        assert_eq!(act::df(a, x), df, "{a:?}'({x})");
    }
    assert_eq!(act::d2f(hs, -3.0), 0.0);
    assert_eq!(act::d2f(hs, 3.0), 0.0);
    assert_eq!(act::d2f(hs, 0.0), 1.0 / 3.0);
    assert_eq!(act::d2f(r6, 3.0), 0.0);
    assert_eq!(act::d2f(hg, 0.0), 0.0);
    // The pieces and margins.
    assert_eq!(act::piece(r6, 0.0), 0);
    assert_eq!(act::piece(r6, 1e-300), 1);
    assert_eq!(act::piece(r6, 6.0), 2);
    assert_eq!(act::piece(hs, -3.0), 0);
    assert_eq!(act::piece(hs, 3.0), 2);
    assert_eq!(act::piece(hg, f64::NAN), 0);
    assert_eq!(act::kink_margin(r6, 5.5), 0.5);
    assert_eq!(act::kink_margin(hs, -2.0), 1.0);
    assert!(act::kink_margin(hg, f64::NAN).is_nan());
    // A NaN passes the forward unchanged (an overflow upstream reaches
    // the loss); infinities land on their pieces.
    for (a, _) in HARD {
        assert!(act::f(a, f64::NAN).is_nan());
        assert_eq!(act::f(a, f64::NEG_INFINITY), 0.0);
    }
    assert_eq!(act::f(r6, f64::INFINITY), 6.0);
    assert_eq!(act::f(hs, f64::INFINITY), f64::INFINITY);
}

/// f' and f'' against central differences of f and f' off the kinks.
#[test]
fn derivatives_match_differences() {
    let mut r = StdRng::seed_from_u64(61);
    for (a, name) in HARD {
        let (lo, hi) = act::kinks(a).unwrap();
        for _ in 0..2000 {
            let x: f64 = r.random_range(-10.0..10.0);
            let h = 1e-5;
            if (x - lo).abs() < 2.0 * h || (x - hi).abs() < 2.0 * h {
                continue;
            }
            let d1 = (act::f(a, x + h) - act::f(a, x - h)) / (2.0 * h);
            let d2 = (act::df(a, x + h) - act::df(a, x - h)) / (2.0 * h);
            // Differences of a quadratic are exact up to rounding of f
            // (|f| ≤ 10·13/6 ≈ 22, so ≈ 22·1e-16/1e-5 ≈ 2e-10).
            assert!((d1 - act::df(a, x)).abs() <= 1e-9, "{name}'({x})");
            assert!((d2 - act::d2f(a, x)).abs() <= 1e-9, "{name}''({x})");
        }
    }
}

// ---------------------------------------------------------------- kernels

/// Every kink, ±0, and the f32 neighbours on both sides of each kink.
fn kink_values(a: Activation) -> Vec<f64> {
    let (lo, hi) = act::kinks(a).unwrap();
    let mut v = vec![0.0, -0.0];
    for k in [lo as f32, hi as f32] {
        v.extend([k, k.next_up(), k.next_down()].map(f64::from));
    }
    v
}

/// The sizes of the terms each output sums, at x on piece p: (f, f', f'').
fn terms(a: Activation, p: u8, x: f64) -> (f64, f64, f64) {
    let ax = x.abs();
    let f = match (a, p) {
        (Activation::Hardswish, 1) => ax * (ax + 3.0) / 6.0,
        (Activation::Hardsigmoid, 1) => (ax + 3.0) / 6.0,
        _ => act::f_on(a, p, x).abs(),
    };
    let d1 = match (a, p) {
        (Activation::Hardswish, 1) => (2.0 * ax + 3.0) / 6.0,
        _ => act::df_on(a, p, x).abs(),
    };
    (f, d1, act::d2f_on(a, p))
}

/// Every element finite and within TOL_ELEM of `want` relative to
/// `scale` (exact where the scale is 0); the tail past `want` untouched.
#[track_caller]
fn check(what: &str, got: &[f32], before: &[f32], want: &[f64], scale: &[f64]) -> f64 {
    check_scaled(what, got, before, (want, scale), TOL_ELEM, 0.0)
}

/// One of the tested kernels: its inputs, its reference and the sizes of
/// its terms.
struct Case<'a> {
    kernel: Kernel,
    has_acc: bool,
    inputs: Vec<&'a GpuBuffer>,
    want: Vec<f64>,
    scale: Vec<f64>,
}

fn run_cases(ctx: &GpuContext, r: &mut StdRng, a: Activation, tag: &str, cases: Vec<Case>) {
    let len = cases[0].want.len();
    let p = ActParams {
        len: len as u32,
        ..Default::default()
    };
    for c in cases {
        let accs: &[bool] = if c.has_acc { &[false, true] } else { &[false] };
        for &acc in accs {
            let consts = if c.has_acc {
                Consts::new(&[("ACT", act_code(a)), ("ACC", acc as u32)])
            } else {
                Consts::new(&[("ACT", act_code(a))])
            };
            // An output 3 longer whose tail must stay as it was.
            let y0 = uniform(r, len + 3, -1.0, 1.0);
            let y = if acc {
                upload(ctx, "out", &y0)
            } else {
                poisoned(ctx, "out", len + 3)
            };
            let before = read_raw(ctx, &y);
            let mut bufs = c.inputs.clone();
            bufs.push(&y);
            dispatch_once(ctx, c.kernel, consts, &p, &bufs, Grid::Threads(len)).unwrap();
            let (want, scale): (Vec<f64>, Vec<f64>) = if acc {
                (0..len)
                    .map(|i| (c.want[i] + y0[i], c.scale[i] + y0[i].abs()))
                    .unzip()
            } else {
                (c.want.clone(), c.scale.clone())
            };
            let what = format!("{tag} {:?} acc={acc}", c.kernel);
            let worst = check(&what, &read_raw(ctx, &y), &before, &want, &scale);
            eprintln!("{what}: worst {worst:.2e} of the terms");
        }
    }
}

/// The four plain kernels on uniform inputs over [-10, 10], the kinks and
/// their f32 neighbours, ±0 and large values (past every piece, and f32's
/// extremes, where x·(x + 3) overflows off its piece).
#[test]
fn hard_activation_kernels_match() {
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(62);
        for (a, name) in HARD {
            let n0 = r.random_range(2000..3000) / 256 * 256 + r.random_range(1..=255);
            let mut x = uniform(&mut r, n0, -10.0, 10.0);
            for (i, v) in kink_values(a).into_iter().enumerate() {
                x[7 * i] = v;
            }
            x.extend([1e4, -1e4, 1e30, -1e30, f32::MAX as f64, -(f32::MAX as f64)]);
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
            let t: Vec<(f64, f64, f64)> =
                x.iter().map(|&v| terms(a, act::piece(a, v), v)).collect();
            let mut bwd = vec![0.0; len];
            act::backward_acc(a, &x, &gy, &mut bwd);
            let mut rbwd = vec![0.0; len];
            act::r_backward_acc(a, &x, &dx, &gy, &rgy, &mut rbwd);
            let cases = vec![
                Case {
                    kernel: Kernel::ActForward,
                    has_acc: false,
                    inputs: vec![&xb],
                    want: act::forward(a, &x),
                    scale: t.iter().map(|t| t.0).collect(),
                },
                Case {
                    kernel: Kernel::ActRForward,
                    has_acc: false,
                    inputs: vec![&xb, &dxb],
                    want: act::r_forward(a, &x, &dx),
                    scale: (0..len).map(|i| t[i].1 * dx[i].abs()).collect(),
                },
                Case {
                    kernel: Kernel::ActBackward,
                    has_acc: true,
                    inputs: vec![&xb, &gyb],
                    want: bwd,
                    scale: (0..len).map(|i| t[i].1 * gy[i].abs()).collect(),
                },
                Case {
                    kernel: Kernel::ActRBackward,
                    has_acc: true,
                    inputs: vec![&xb, &dxb, &gyb, &rgyb],
                    want: rbwd,
                    scale: (0..len)
                        .map(|i| t[i].1 * rgy[i].abs() + t[i].2 * (dx[i] * gy[i]).abs())
                        .collect(),
                },
            ];
            run_cases(&ctx, &mut r, a, &format!("{backend} {name}"), cases);
            // A NaN input passes the forward unchanged.
            let nan = upload(&ctx, "x", &[f64::NAN, 1.0]);
            let y = poisoned(&ctx, "y", 2);
            let p = ActParams {
                len: 2,
                ..Default::default()
            };
            let c = Consts::new(&[("ACT", act_code(a))]);
            dispatch_once(
                &ctx,
                Kernel::ActForward,
                c,
                &p,
                &[&nan, &y],
                Grid::Threads(2),
            )
            .unwrap();
            let got = read_raw(&ctx, &y);
            assert!(
                got[0].is_nan() && got[1] == act::f(a, 1.0) as f32,
                "{name}: {got:?}"
            );
        }
    }
}

/// A node of activation `a` (for `decision_words`).
fn act_model(a: Activation) -> Model {
    let text = format!(
        "model t\ninput 1 2 2\nclasses 2\n{}\nflatten\nlinear fc 2\n",
        a.keyword()
    );
    arch::parse("t.arch", &text).unwrap()
}

/// The replay kernels of frozen plans: each element's piece from x₀ —
/// the words `decision_words` writes for float64's decisions, or a
/// recorded float32 input (kinks and their neighbours among them) — and
/// the piece's polynomial at an x that may lie on another piece.
#[test]
fn replay_kernels_take_the_recorded_piece() {
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(63);
        for (a, name) in HARD {
            let model = act_model(a);
            let node = &model.nodes[0];
            let len = r.random_range(1500..2500);
            let mut x = uniform(&mut r, len, -10.0, 10.0);
            for (i, v) in kink_values(a).into_iter().enumerate() {
                x[5 * i + 1] = v;
            }
            // The first half: float64 decisions' words, random pieces;
            // the second: recorded inputs (their own pieces).
            let half = len / 2;
            let decided: Vec<u8> = (0..half).map(|_| r.random_range(0..3u8)).collect();
            let Some(StateWords::F32(words)) =
                ActivationUnit.decision_words(node, &Decision::Piece(decided.clone()))
            else {
                panic!("{name}: no words for its pieces");
            };
            assert_eq!(words.len(), half);
            let mut recorded = uniform(&mut r, len - half, -10.0, 10.0);
            for (i, v) in kink_values(a).into_iter().enumerate() {
                recorded[3 * i] = v;
            }
            let x0: Vec<f64> = words
                .iter()
                .map(|&w| w as f64)
                .chain(recorded.iter().copied())
                .collect();
            let pieces: Vec<u8> = decided
                .iter()
                .copied()
                .chain(recorded.iter().map(|&v| act::piece(a, v)))
                .collect();
            // The words lie on the pieces they stand for.
            for (i, &w) in words.iter().enumerate() {
                assert_eq!(act::piece(a, w as f64), decided[i], "{name}: word {w}");
            }
            let dx = uniform(&mut r, len, -1.0, 1.0);
            let gy = uniform(&mut r, len, -1.0, 1.0);
            let rgy = uniform(&mut r, len, -1.0, 1.0);
            let (x0b, xb, dxb, gyb, rgyb) = (
                upload(&ctx, "x0", &x0),
                upload(&ctx, "x", &x),
                upload(&ctx, "ẋ", &dx),
                upload(&ctx, "gy", &gy),
                upload(&ctx, "R(gy)", &rgy),
            );
            let t: Vec<(f64, f64, f64)> = (0..len).map(|i| terms(a, pieces[i], x[i])).collect();
            let cases = vec![
                Case {
                    kernel: Kernel::ActReplayForward,
                    has_acc: false,
                    inputs: vec![&x0b, &xb],
                    want: act::forward_on(a, &pieces, &x),
                    scale: t.iter().map(|t| t.0).collect(),
                },
                Case {
                    kernel: Kernel::ActReplayRForward,
                    has_acc: false,
                    inputs: vec![&x0b, &xb, &dxb],
                    want: act::derivative_on(a, &pieces, &x, &dx),
                    scale: (0..len).map(|i| t[i].1 * dx[i].abs()).collect(),
                },
                Case {
                    kernel: Kernel::ActReplayBackward,
                    has_acc: true,
                    inputs: vec![&x0b, &xb, &gyb],
                    want: act::derivative_on(a, &pieces, &x, &gy),
                    scale: (0..len).map(|i| t[i].1 * gy[i].abs()).collect(),
                },
                Case {
                    kernel: Kernel::ActReplayRBackward,
                    has_acc: true,
                    inputs: vec![&x0b, &xb, &dxb, &gyb, &rgyb],
                    want: act::r_backward_on(a, &pieces, &x, &dx, &gy, &rgy),
                    scale: (0..len)
                        .map(|i| t[i].1 * rgy[i].abs() + t[i].2 * (dx[i] * gy[i]).abs())
                        .collect(),
                },
            ];
            run_cases(&ctx, &mut r, a, &format!("{backend} {name} replay"), cases);
        }
    }
}

// ---------------------------------------------------------------- networks

fn data_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hard-act")
}

/// hesscope's float64 reference on python/tests/make_hard_act_reference.py's
/// network against PyTorch float64 (clamp forms of Hardswish and
/// Hardsigmoid), both batch-norm modes; and the GPU with float64
/// decisions within 1e-5 of it.
#[test]
fn hard_act_network_matches_pytorch_float64() {
    let dir = data_dir();
    let model = Model::load(dir.join("hard-act.arch").to_str().unwrap()).unwrap();
    for bn in [BnMode::Batch, BnMode::Running] {
        let weights = Weights::load(&model, &dir.join("weights.safetensors")).unwrap();
        let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
        let problem = Problem::new(model.clone(), weights, data, 6, bn).unwrap();
        let v = params::load_vector(&model, &dir.join("v.safetensors")).unwrap();
        let rd = dir.join(match bn {
            BnMode::Batch => "ref-batch",
            BnMode::Running => "ref-running",
        });
        let g_ref = params::load_vector(&model, &rd.join("grad.safetensors")).unwrap();
        let hv_ref = params::load_vector(&model, &rd.join("hv.safetensors")).unwrap();
        let mut cpu = CpuReference::new(problem.clone());
        let (_, g, hv) = cpu.loss_grad_hvp(&v).unwrap();
        let (eg, eh) = (rel_err(&g, &g_ref), rel_err(&hv, &hv_ref));
        eprintln!("hard-act {bn:?} float64: grad {eg:.1e} Hv {eh:.1e}");
        assert!(
            eg <= TOL_PYTORCH && eh <= TOL_PYTORCH,
            "{bn:?}: float64 gradient {eg:.1e}, Hv {eh:.1e} against PyTorch"
        );
        // The three activations decide, every piece is hit.
        let report = cpu.decision_report().unwrap().unwrap();
        let kinds: Vec<&str> = report.layers.iter().map(|l| l.kind.as_str()).collect();
        assert_eq!(kinds, ["hardswish", "relu6", "hardsigmoid"]);
        for (name, ctx) in gpu_contexts() {
            let (gg, gh, flipped) = gpu_run(&ctx, &problem, &v, DecisionSource::Float64);
            let (eg, eh) = (rel_err(&gg, &g), rel_err(&gh, &hv));
            eprintln!(
                "hard-act {bn:?} {name}: grad {eg:.1e} Hv {eh:.1e} (float32 flips {flipped:?})"
            );
            assert!(
                eg <= TOL_GPU && eh <= TOL_GPU,
                "{bn:?} on {name}: gradient {eg:.1e}, Hv {eh:.1e} against float64"
            );
        }
    }
}

/// (gradient, Hv, decisions a float32 pass flips) of a GPU engine.
fn gpu_run(
    ctx: &GpuContext,
    problem: &Problem,
    v: &[f64],
    source: DecisionSource,
) -> (Vec<f64>, Vec<f64>, Option<u64>) {
    let options = EngineOptions {
        decisions: source,
        ..Default::default()
    };
    let mut e = GpuEngine::with_options(ctx.share(), problem, options).unwrap();
    let (_, g, hv) = e.loss_grad_hvp(v).unwrap();
    let report = e.decision_report().unwrap().expect("the network decides");
    assert_eq!(report.source, source);
    (g, hv, report.flipped)
}

/// Moves one input of every three-piece activation fed by a batch norm
/// onto one of its kinks, to float32 rounding: the norm's shift β of that
/// element's channel is moved by (kink − x), rounded to f32 so that both
/// engines see one θ. A float32 pass decides such an input at random;
/// float64's decision, replayed, must give float64's gradient and Hv.
fn plant_on_kinks(problem: &mut Problem, r: &mut StdRng) -> u64 {
    let model = problem.model.clone();
    let n = problem.data.len();
    let mut planted = 0;
    for node in &model.nodes {
        let Op::Act(a) = node.op else { continue };
        let Some((lo, hi)) = act::kinks(a) else {
            continue;
        };
        let Op::BatchNorm { beta, c, .. } = model.nodes[node.inputs[0] - 1].op else {
            continue;
        };
        let vals = CpuReference::new(problem.clone()).values(0, n);
        let x = &vals[node.inputs[0]];
        let idx = r.random_range(0..x.len());
        let kink = if r.random_bool(0.5) { lo } else { hi };
        let channel = (idx / node.in_shape.spatial()) % c;
        let off = model.params[beta].offset + channel;
        let b = &mut problem.weights.theta[off];
        *b = (*b + kink - x[idx]) as f32 as f64;
        planted += 1;
    }
    planted
}

/// Random networks of conv, batch norm and the three activations (and a
/// ReLU, a max pool), one input of each three-piece activation planted on
/// a kink: the GPU with float64 decisions within 1e-5 of the float64
/// reference on every backend, while float32 decisions flip some.
#[test]
fn hard_activation_decisions_replay_float64() {
    let mut r = StdRng::seed_from_u64(64);
    let mut flips = std::collections::BTreeMap::<String, u64>::new();
    for case in 0..6u64 {
        let acts: Vec<&str> = (0..3)
            .map(|_| ["relu6", "hardswish", "hardsigmoid"][r.random_range(0..3)])
            .collect();
        let w = [4, 6, 8][r.random_range(0..3)];
        let text = format!(
            "model hard-{case}\ninput 3 10 10\nclasses 4\n\
             conv c1 {w} k=3 pad=1 bias=false\nbn b1\n{}\n\
             conv c2 {w} k=3 pad=1 bias=false\nbn b2\n{}\nmaxpool k=2\n\
             conv c3 {w} k=3 pad=1 bias=false\nbn b3\n{}\n\
             conv c4 {w} k=1 bias=false\nbn b4\nrelu\ngap\nlinear fc 4\n",
            acts[0], acts[1], acts[2]
        );
        let model = arch::parse(&format!("hard-{case}.arch"), &text).unwrap();
        let mut theta = vec![];
        for p in &model.params {
            let fan: usize = p.shape[1..].iter().product();
            let s = match p.init {
                hesscope::model::Init::Const(1.0) => {
                    theta.extend((0..p.numel()).map(|_| r.random_range(1.0..3.0)));
                    continue;
                }
                hesscope::model::Init::Const(_) => 1.0,
                _ => (3.0 / fan.max(1) as f64).sqrt(),
            };
            theta.extend((0..p.numel()).map(|_| r.random_range(-s..s)));
        }
        let buffers = model
            .buffers
            .iter()
            .map(|b| {
                (0..b.len)
                    .map(|_| {
                        if b.init == 0.0 {
                            r.random_range(-0.1..0.1)
                        } else {
                            r.random_range(0.5..1.5)
                        }
                    })
                    .collect()
            })
            .collect();
        let n = r.random_range(2..=6);
        let data = Dataset {
            x: (0..n * model.input.numel())
                .map(|_| r.random_range(-2.0f32..2.0))
                .collect(),
            y: (0..n).map(|_| r.random_range(0..4u32)).collect(),
            shape: model.input,
            source: format!("uniform, case {case}"),
        };
        let bn = if case % 3 == 2 {
            BnMode::Running
        } else {
            BnMode::Batch
        };
        let weights = Weights { theta, buffers };
        let mut problem = Problem::new(model.clone(), weights, data, n, bn).unwrap();
        let planted = plant_on_kinks(&mut problem, &mut r);
        let label = format!("case {case} ({acts:?}, {bn:?}, {planted} planted)");
        let v: Vec<f64> = (0..model.n_params)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let mut cpu = CpuReference::new(problem.clone());
        let (_, g, hv) = cpu.loss_grad_hvp(&v).unwrap();
        let near = cpu.decision_report().unwrap().unwrap().near;
        assert!(
            near >= planted,
            "{label}: {near} near for {planted} planted"
        );
        for (name, ctx) in gpu_contexts() {
            let (gg, gh, flipped) = gpu_run(&ctx, &problem, &v, DecisionSource::Float64);
            let (eg, eh) = (rel_err(&gg, &g), rel_err(&gh, &hv));
            let flipped = flipped.expect("a float64-decision engine counts flips");
            eprintln!("{label} {name}: grad {eg:.1e} Hv {eh:.1e}, float32 flips {flipped}");
            assert!(
                eg <= TOL_GPU && eh <= TOL_GPU,
                "{label} on {name}: gradient {eg:.1e}, Hv {eh:.1e} with float64 decisions"
            );
            *flips.entry(name).or_default() += flipped;
        }
    }
    // The planted kinks make float32 passes decide otherwise somewhere:
    // the test exercises the replay it claims to.
    for (name, f) in &flips {
        eprintln!("{name}: {f} decisions flipped by float32");
        assert!(
            *f > 0,
            "{name}: no decision flipped: the planted kinks missed"
        );
    }
}

/// `bn NAME eps=E` (MobileNetV3's 1e-3): parsed, printed back, and a bad
/// value refused naming the option.
#[test]
fn bn_eps_parses_and_prints() {
    let text =
        "model t\ninput 2 3 3\nclasses 2\nconv c 2 k=1\nbn b eps=0.001\nflatten\nlinear fc 2\n";
    let m = arch::parse("t.arch", text).unwrap();
    assert!(matches!(m.nodes[1].op, Op::BatchNorm { eps, .. } if eps == 0.001));
    let again = arch::parse("again.arch", &arch::to_text(&m)).unwrap();
    assert_eq!(again.nodes[1].op, m.nodes[1].op);
    let plain = arch::parse("t.arch", &text.replace(" eps=0.001", "")).unwrap();
    assert!(matches!(plain.nodes[1].op, Op::BatchNorm { eps, .. } if eps == 1e-5));
    assert!(!arch::to_text(&plain).contains("eps"));
    for bad in ["0", "-1", "x", "inf"] {
        let e = arch::parse("t.arch", &text.replace("0.001", bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("eps") && e.contains(bad), "{bad}: {e}");
    }
}

/// `.arch` keywords, and their text round trip.
#[test]
fn keywords_parse_and_print() {
    for (a, name) in HARD {
        let m = act_model(a);
        assert_eq!(m.nodes[0].op, Op::Act(a));
        assert_eq!(a.keyword(), name);
        let text = arch::to_text(&m);
        assert!(text.contains(name), "{text}");
        let again = arch::parse("again.arch", &text).unwrap();
        assert_eq!(again.nodes[0].op, Op::Act(a));
    }
}

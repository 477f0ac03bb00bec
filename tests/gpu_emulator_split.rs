//! Reductions past llvmpipe's loop limit, split across dispatches
//! (src/layers/conv_split.rs). llvmpipe (lavapipe, Mesa's GL) silently
//! ends a shader invocation's loops after 65535 iterations in all, so a
//! conv/linear thread may reduce at most 65535/(6·taps) channels
//! (tests/gpu_emulator_loops.rs holds the measured line). On CPU emulators
//! the engine and the trainer now run a longer forward / R-forward
//! (over input channels·taps) or backward-data / R-backward (over output
//! channels·taps) as one dispatch per chunk of channels, the first writing
//! and the rest adding: the shapes refused before (an 11000- and a
//! 26000-feature linear, both directions; a 4000-channel 3×3 stride-2
//! convolution, both directions; a linear of 60000 outputs) match float64.
//!
//! Tolerance: 1e-5 relative (L2 for vectors), as every whole-network GPU
//! check and tests/gpu_emulator_loops.rs: float32 sums of ≤ 6·10⁴ terms
//! err by ≈ u·√L ≈ 1e-5 at worst and measured far below; a chunk lost or
//! counted twice (or a loop cut short by the limiter) errs by ≥ 1e-2.

mod common;

use common::gpu::{
    batch_cx, check_whole_model, image_data, poisoned, problem_of, read, tangents, upload,
};
use common::{gpu_contexts, rel_err};
use hesscope::gpu::kernels::{self, Consts, ConvParams, Kernel, WeightsVia};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::layers::conv_split;
use hesscope::layers::{conv::ConvUnit, Layer};
use hesscope::model::{arch, Model, Op, Weights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-5;

fn model(text: &str) -> Model {
    arch::parse("split.arch", text).unwrap()
}

fn problem(text: &str, n: usize) -> hesscope::engine::Problem {
    let m = model(text);
    let mut r = StdRng::seed_from_u64(5);
    let data = image_data(&mut r, &m, n, m.classes as u32);
    let theta = Weights::init(&m, 5).theta;
    problem_of(&m, theta, data, n)
}

fn uniform(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| r.random_range(-1.0..1.0f32) as f64)
        .collect()
}

/// Networks whose conv/linear reductions pass the limit, each in one
/// direction or both.
const PAST_THE_LIMIT: [&str; 6] = [
    // Forward over 11000 input features.
    "model in11000\ninput 11000 1 1\nclasses 10\nflatten\nlinear fc 10\n",
    // Backward data over 11000 outputs (and fc2's forward over them).
    "model out11000\ninput 4 1 1\nclasses 10\nflatten\nlinear fc1 11000\nrelu\nlinear fc2 10\n",
    // Both directions at 26000 features (vgg11_bn's classifier.0 has
    // 25088): fc1 and fc3 forward over 26000 inputs, fc2 backward over
    // 26000 outputs.
    "model both26000\ninput 26000 1 1\nclasses 10\nflatten\nlinear fc1 8\nrelu\nlinear fc2 26000\nrelu\nlinear fc3 10\n",
    // A 3×3 stride-2 convolution over 4000 input channels (forward).
    "model conv-in4000\ninput 4000 3 3\nclasses 10\nconv c1 4 k=3 stride=2\nflatten\nlinear fc 10\n",
    // ... and to 4000 output channels (backward data over 4000·4 phase taps,
    // fc's forward over 16000 features).
    "model conv-out4000\ninput 4 4 4\nclasses 10\nconv c1 4000 k=3 stride=2 pad=1\nrelu\nflatten\nlinear fc 10\n",
    // A linear of 60000 outputs (GPT-2's tied lm_head has 50257).
    "model out60000\ninput 8 1 1\nclasses 10\nflatten\nlinear fc1 60000\nrelu\nlinear fc2 10\n",
];

/// Loss, gradient, Hv and a block product of two tangents on lavapipe
/// and llvmpipe against the float64 engine (`check_whole_model`), within
/// `TOL`, for every shape the engine refused before the split.
#[test]
fn layers_past_the_loop_limit_match_float64_on_emulators() {
    let mut checked = 0;
    for text in PAST_THE_LIMIT {
        let p = problem(text, 3);
        let mut r = StdRng::seed_from_u64(6);
        let vs = tangents(&mut r, 2, p.model.n_params);
        check_whole_model(&p.model.name, &p, &vs, TOL, true);
        checked += gpu_contexts()
            .iter()
            .filter(|(_, c)| c.is_cpu_adapter())
            .count();
    }
    if common::under_ci() {
        assert!(
            checked >= 2 * PAST_THE_LIMIT.len(),
            "no CPU emulator checked"
        );
    }
}

/// The split kernels themselves, as the plan runs them (`conv_split::spans`
/// and `chunk_consts`: chunk 0 writes and adds the bias, the rest add),
/// into outputs poisoned with NaN: the dense conv kernels' forward with
/// both pairs and a bias (R-forward), and backward data with both pairs
/// (R-backward), on a linear of 26000 input / 26000 output features and a
/// 3×3 stride-2 conv of 4000 input / output channels (the long direction
/// split in 3 to 4 chunks, the short one whole), against `ConvUnit`'s
/// float64 passes. Every chunk must write its part: NaN left anywhere
/// fails.
#[test]
fn split_kernels_fill_poisoned_outputs_and_match_float64() {
    let mut r = StdRng::seed_from_u64(77);
    // (architecture, the conv/linear node's index, the pass that splits)
    let (fwd, bwd) = (Kernel::ConvForward, Kernel::ConvBackwardData);
    let cases = [
        ("model a\ninput 26000 1 1\nclasses 5\nflatten\nlinear fc 5\n", 1, fwd),
        ("model b\ninput 3 1 1\nclasses 26000\nflatten\nlinear fc 26000\n", 1, bwd),
        ("model c\ninput 4000 5 5\nclasses 2\nconv c1 3 k=3 stride=2\nflatten\nlinear fc 2\n", 0, fwd),
        ("model d\ninput 3 5 5\nclasses 2\nconv c1 4000 k=3 stride=2 pad=1\nflatten\nlinear fc 2\n", 0, bwd),
    ];
    let mut checked = 0;
    for (backend, ctx) in gpu_contexts() {
        for (text, i, split) in cases {
            let m = model(text);
            let node = &m.nodes[i];
            let d = hesscope::layers::conv::dims(node);
            let (woff, boff) = match node.op {
                Op::Linear { weight, bias, .. } | Op::Conv { weight, bias, .. } => (
                    m.params[weight].offset,
                    bias.map_or(0, |b| m.params[b].offset),
                ),
                _ => unreachable!(),
            };
            let n = 2;
            let np = m.n_params;
            let (nx, ny) = (n * node.in_shape.numel(), n * node.out_shape.numel());
            let (theta, v) = (uniform(&mut r, np), uniform(&mut r, np));
            let (x, dx) = (uniform(&mut r, nx), uniform(&mut r, nx));
            let (gy, rgy) = (uniform(&mut r, ny), uniform(&mut r, ny));
            let cx = batch_cx(&m, n, &theta);
            let u = ConvUnit;
            let (_, mut saved) = u.forward(&cx, node, &[&x]);
            let ydot = u.r_forward(&cx, node, &[&x], &[&dx], &v, &mut saved);
            let mut hv = vec![0.0; np];
            let rgx = u
                .r_backward(&cx, node, &[&x], &[&dx], &saved, &gy, &rgy, &v, &mut hv)
                .remove(0);
            let pr = ConvParams {
                n: n as u32,
                cin: d.cin as u32,
                h: d.h as u32,
                w: d.w as u32,
                cout: d.cout as u32,
                k: d.k as u32,
                stride: d.stride as u32,
                pad: d.pad as u32,
                oh: d.oh as u32,
                ow: d.ow as u32,
                wa_off: woff as u32,
                wb_off: woff as u32,
                bias_off: boff as u32,
                rows_per_chunk: 0,
                chunks: 0,
                groups: 1,
            };
            let b = |name: &str, data: &[f64]| upload(&ctx, name, data);
            let (thb, vb, xb, dxb, gyb, rgyb) = (
                b("θ", &theta),
                b("v", &v),
                b("x", &x),
                b("ẋ", &dx),
                b("gy", &gy),
                b("R(gy)", &rgy),
            );
            let bias = node_has_bias(node);
            let passes = [
                // R-forward: W·ẋ + V·x + v's bias.
                (Kernel::ConvForward, [&dxb, &thb, &xb, &vb], bias, &ydot, ny),
                // R-backward data: Wᵀ·R(gy) + Vᵀ·gy.
                (
                    Kernel::ConvBackwardData,
                    [&rgyb, &thb, &gyb, &vb],
                    false,
                    &rgx,
                    nx,
                ),
            ];
            for (kernel, bufs, bias, want, len) in passes {
                let (channels, taps) = conv_split::reduction(kernel, &pr, 1, false);
                let spans = conv_split::spans(channels, taps);
                let out = poisoned(&ctx, "out", len);
                let variant = kernels::conv_variant_via(kernel, d.k, d.stride, WeightsVia::Storage);
                let grid = match kernel {
                    Kernel::ConvForward => kernels::conv_forward_threads(n, d.cout, d.oh, d.ow),
                    _ => kernels::conv_backward_data_threads(n, d.cin, d.h, d.w, d.stride),
                };
                let all = [bufs[0], bufs[1], bufs[2], bufs[3], &out];
                for (j, &(lo, hi)) in spans.iter().enumerate() {
                    let c = conv_split::chunk_consts(Consts::conv(true, bias, false), j, lo, hi);
                    dispatch_once(&ctx, variant, c, &pr, &all, Grid::Threads(grid)).unwrap();
                }
                let got = read(&ctx, &out);
                let e = rel_err(&got, want);
                let tag = format!(
                    "{backend} {} {kernel:?}: {channels} channels in {} chunks",
                    m.name,
                    spans.len()
                );
                eprintln!("{tag}: relative L2 {e:.1e}");
                if kernel == split {
                    assert!(spans.len() >= 2, "{tag}: not split");
                }
                assert!(got.iter().all(|g| g.is_finite()), "{tag}: poison left");
                assert!(e <= TOL, "{tag}: relative L2 {e:.2e}");
                checked += 1;
            }
        }
    }
    if common::under_ci() {
        assert!(checked >= 16, "no emulator checked");
    }
}

fn node_has_bias(node: &hesscope::model::Node) -> bool {
    matches!(
        node.op,
        Op::Linear { bias: Some(_), .. } | Op::Conv { bias: Some(_), .. }
    )
}

/// The GPU trainer on a network past the limit both ways (26000 features
/// into fc1 and fc3, out of fc2) over a few SGD steps with momentum and
/// weight decay, against the float64 trainer: every step's loss and the
/// final parameters within `TOL` relative (float32 steps from the same
/// start; a short run carries each step's ≈ 1e-7 error forward without
/// amplifying it much, tests/train_gpu_lm.rs).
#[test]
fn the_gpu_trainer_past_the_limit_matches_the_float64_trainer() {
    use hesscope::train::{initial_counts, Recipe, Trainer};
    let text = PAST_THE_LIMIT[2];
    let m = model(text);
    let mut r = StdRng::seed_from_u64(8);
    let data = image_data(&mut r, &m, 6, m.classes as u32);
    let recipe = Recipe {
        epochs: 2,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        milestones: vec![],
        lr_gamma: 1.0,
        shuffle: false,
        seed: 0,
    };
    let make = || {
        let w = Weights::init(&m, 9);
        let counts = initial_counts(&m, None).unwrap();
        Trainer::new(m.clone(), w, data.clone(), 3, recipe.clone(), counts).unwrap()
    };
    let run = |t: &mut Trainer| -> Vec<f64> {
        let mut losses = vec![];
        for _ in 0..t.recipe.epochs {
            losses.extend(t.epoch().unwrap().losses);
        }
        losses
    };
    let mut cpu = make();
    let want = run(&mut cpu);
    let theta = cpu.weights().theta.clone();
    let mut checked = 0;
    for (backend, ctx) in gpu_contexts() {
        if !ctx.is_cpu_adapter() {
            continue;
        }
        let mut t = make();
        t.use_gpu(ctx).unwrap();
        let got = run(&mut t);
        t.sync().unwrap();
        assert_eq!(got.len(), want.len());
        let e_loss = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs())
            .fold(0.0f64, f64::max);
        let e_theta = rel_err(&t.weights().theta, &theta);
        eprintln!(
            "{backend}: {} steps, step losses {e_loss:.1e}, final parameters {e_theta:.1e}",
            got.len()
        );
        assert!(
            e_loss <= TOL && e_theta <= TOL,
            "{backend}: losses {e_loss:.2e}, parameters {e_theta:.2e}"
        );
        checked += 1;
    }
    // The run moved.
    assert!((want[0] - want[want.len() - 1]).abs() > 1e3 * TOL * want[0]);
    if common::under_ci() {
        assert!(checked >= 2, "no CPU emulator checked");
    }
}

/// A language model's head and loss over GPT-2's vocabulary (50257): the
/// head's backward data reduces over 50257 outputs (split), and the
/// cross-entropy's per-row loops over them would pass the limit with a
/// thread per row, so the emulators run the workgroup-per-row kernels
/// (`XentForwardBackwardRows`, `XentRBackwardRows`). Those kernels alone,
/// into poisoned outputs, against `next_token`'s float64 passes (the
/// unlabelled last rows exactly zero), then the whole model's loss,
/// gradient, Hv and block product against the float64 engine, within
/// `TOL` (a row's softmax sums 50257 float32 exponentials in 256 strided
/// partial sums and a tree: ≈ u·√V ≈ 3e-5 at worst per sum, far less in
/// L2 over the rows; measured below 1e-6).
#[test]
fn a_gpt2_sized_vocabulary_matches_float64_on_emulators() {
    use hesscope::data::Dataset;
    use hesscope::gpu::params::LossParams;
    use hesscope::layers::next_token;
    let (n, t, v) = (2, 3, 50257);
    let text =
        format!("model lm\ninput tokens {t}\nclasses {v}\nembedding wte {v} 4\nlinear head {v}\n");
    let m = model(&text);
    let mut r = StdRng::seed_from_u64(2521);
    let data = Dataset {
        x: (0..n * t).map(|_| r.random_range(0..v) as f32).collect(),
        y: vec![0; n],
        shape: m.input,
        source: "uniform ids".into(),
    };
    let rows = n * t;
    let z: Vec<f64> = (0..rows * v)
        .map(|_| r.random_range(-4.0..4.0f32) as f64)
        .collect();
    let zdot = uniform(&mut r, rows * v);
    let scale = 0.5;
    let (loss, gz, p) = next_token::forward_backward(&m, &data, 0, n, &z, scale);
    let rgz = next_token::r_backward(&m, n, &p, &zdot, scale);
    let labels = next_token::gpu_labels(&m, &data, 0, n);
    let lp = LossParams {
        n: rows as u32,
        k: v as u32,
        scale: next_token::row_scale(&m, scale) as f32,
        _p0: 0,
    };
    let mut checked = 0;
    for (name, ctx) in gpu_contexts() {
        let zb = upload(&ctx, "z", &z);
        let lb = ctx.storage("labels", rows).unwrap();
        ctx.write_u32(&lb, &labels).unwrap();
        let (pb, sb, gb) = (
            poisoned(&ctx, "p", rows * v),
            poisoned(&ctx, "loss", rows),
            poisoned(&ctx, "gz", rows * v),
        );
        let bufs = [&zb, &lb, &pb, &sb, &gb];
        let g = Grid::Groups(rows);
        let k = Kernel::XentForwardBackwardRows;
        dispatch_once(&ctx, k, Consts::default(), &lp, &bufs, g).unwrap();
        let (gp, gl, gg) = (read(&ctx, &pb), read(&ctx, &sb), read(&ctx, &gb));
        for s in 0..n {
            let last = (s * t + t - 1) * v..(s + 1) * t * v;
            assert!(gg[last.clone()].iter().all(|&x| x == 0.0), "{name}: gz row");
            assert!(gp[last].iter().all(|&x| x == 0.0), "{name}: p row");
            assert_eq!(gl[s * t + t - 1], 0.0, "{name}: loss row");
        }
        let gp_rows: Vec<f64> = (0..n)
            .flat_map(|s| gp[s * t * v..(s * t + t - 1) * v].to_vec())
            .collect();
        let dzb = upload(&ctx, "ż", &zdot);
        let rb = poisoned(&ctx, "R(gz)", rows * v);
        let k = Kernel::XentRBackwardRows;
        dispatch_once(&ctx, k, Consts::default(), &lp, &[&pb, &dzb, &rb], g).unwrap();
        let gr = read(&ctx, &rb);
        let el = (gl.iter().sum::<f64>() - loss).abs() / loss.abs();
        let (ep, eg, er) = (rel_err(&gp_rows, &p), rel_err(&gg, &gz), rel_err(&gr, &rgz));
        eprintln!(
            "{name}: vocabulary {v}, workgroup-per-row loss kernels: loss {el:.1e}, \
             softmax {ep:.1e}, gz {eg:.1e}, R(gz) {er:.1e}"
        );
        assert!(
            el <= TOL && ep <= TOL && eg <= TOL && er <= TOL,
            "{name}: loss {el:.1e}, softmax {ep:.1e}, gz {eg:.1e}, R {er:.1e}"
        );
        checked += 1;
    }
    let theta = Weights::init(&m, 3).theta;
    let p = problem_of(&m, theta, data, n);
    let vs = tangents(&mut r, 2, m.n_params);
    check_whole_model("lm over 50257 tokens", &p, &vs, TOL, true);
    if common::under_ci() {
        assert!(checked >= 2, "no GPU backend checked");
    }
}

//! Batch norm with its state taken from the float64 forward pass (the
//! GPU engines' default with float64 decisions in batch mode,
//! `EngineOptions::bn_state`): the forward kernel's GIVEN form against the
//! float64 reference on random shapes, on Vulkan (lavapipe) and GL
//! (llvmpipe), and whole engines on an ill-conditioned batch-mode BN.
//!
//! Tolerances, as ‖gpu − ref‖/‖ref‖:
//! - `bn_forward` GIVEN computes y = γx̂ + β from an x̂ rounded once to
//!   f32: a product and a sum, ≤ 3u ≈ 1.8e-7 relative per element
//!   against the float64 y (u = 2⁻²⁴) where γx̂ and β do not cancel; with
//!   random signs they may, so the check is relative to ‖|γx̂| + |β|‖,
//!   bound 1e-6. Reading x (poisoned) or writing x̂ would show as NaN or
//!   as changed bits.

mod common;

use common::{gpu_contexts, rel_err};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::decisions::DecisionSource;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::executor::ValueKind;
use hesscope::gpu::kernels::{self, bn_rows, BnParams, Consts, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{EngineOptions, GpuEngine};
use hesscope::gpu::{GpuBuffer, GpuContext};
use hesscope::model::{arch, Init, Op, Weights};
use hesscope::ops::bn;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL_FEW: f64 = 1e-6;

fn rnd(r: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| lo + (hi - lo) * r.random::<f64>()).collect()
}

fn upload(ctx: &GpuContext, name: &str, v: &[f32]) -> GpuBuffer {
    let b = ctx.storage(name, v.len()).unwrap();
    ctx.write_f32(&b, 0, v).unwrap();
    b
}

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

#[test]
fn bn_forward_given_matches_the_reference() {
    // Shapes over the kernel's range: one element per plane, planes not a
    // multiple of its 4-element quads, a batch of one, many channels.
    let mut shapes = vec![(1usize, 1usize, 1usize), (4, 3, 4), (2, 300, 1), (3, 5, 49)];
    let mut r = StdRng::seed_from_u64(26);
    for _ in 0..6 {
        shapes.push((
            r.random_range(1..=8),
            r.random_range(1..=40),
            r.random_range(1..=100),
        ));
    }
    for (backend, ctx) in gpu_contexts() {
        let mut worst = 0.0f64;
        for &(n, c, hw) in &shapes {
            let len = n * c * hw;
            let g = bn::BnGeom { n, c, hw };
            // Ill-conditioned channels: mean 50 and spread ~1e-3, where
            // the float32 x̂ would be off by ~5e-2 of itself.
            let x: Vec<f64> = rnd(&mut r, len, -1.0, 1.0)
                .into_iter()
                .map(|e| 50.0 + 1e-3 * e)
                .collect();
            let goff = r.random_range(0..4);
            let boff = goff + c + r.random_range(0..4);
            let theta = rnd(&mut r, boff + c + 1, -1.5, 1.5);
            let (gamma, beta) = (&theta[goff..goff + c], &theta[boff..boff + c]);
            let (mean, var) = bn::batch_moments(&g, &x);
            let s = bn::scales_eps(&var, bn::EPS);
            let (xhat, _) = bn::forward(&g, &x, &mean, &s, gamma, beta);
            let xh32: Vec<f32> = xhat.iter().map(|&v| v as f32).collect();
            // The reference continues from the f32 x̂ and θ the kernel reads.
            let th32: Vec<f32> = theta.iter().map(|&v| v as f32).collect();
            let (want, scale): (Vec<f64>, Vec<f64>) = (0..len)
                .map(|i| {
                    let ch = (i / hw) % c;
                    let (gm, bt) = (th32[goff + ch] as f64, th32[boff + ch] as f64);
                    let a = gm * xh32[i] as f64;
                    (a + bt, a.abs() + bt.abs())
                })
                .unzip();
            let mut stats = vec![f32::NAN; bn_rows::COUNT * c];
            for ch in 0..c {
                stats[bn_rows::MEAN * c + ch] = mean[ch] as f32;
                stats[bn_rows::S * c + ch] = s[ch] as f32;
            }
            let xb = upload(&ctx, "x", &vec![f32::NAN; len]);
            let sb = upload(&ctx, "stats", &stats);
            let tb = upload(&ctx, "θ", &th32);
            let xhb = upload(&ctx, "x̂", &xh32);
            let yb = upload(&ctx, "y", &vec![f32::NAN; len]);
            let p = BnParams {
                n: n as u32,
                c: c as u32,
                hw: hw as u32,
                gamma_off: goff as u32,
                beta_off: boff as u32,
                eps: bn::EPS as f32,
                ..Default::default()
            };
            dispatch_once(
                &ctx,
                Kernel::BnForward,
                Consts::new(&[("GIVEN", 1)]),
                &p,
                &[&xb, &sb, &tb, &xhb, &yb],
                Grid::Threads(kernels::bn_threads(n, c, hw)),
            )
            .unwrap();
            let y = read(&ctx, &yb);
            let what = format!("{backend} bn_forward GIVEN {n}x{c}x{hw}");
            assert!(y.iter().all(|v| v.is_finite()), "{what}: y not all written");
            let num: f64 = y
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).powi(2))
                .sum();
            let den: f64 = scale.iter().map(|v| v * v).sum();
            let err = (num / den).sqrt();
            assert!(err <= TOL_FEW, "{what}: y relative error {err:.2e}");
            worst = worst.max(err);
            let after = read(&ctx, &xhb);
            assert!(
                after
                    .iter()
                    .zip(&xh32)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: the given x̂ was overwritten"
            );
        }
        println!(
            "{backend}: bn_forward GIVEN worst {worst:.2e} over {} shapes",
            shapes.len()
        );
    }
}

// ------------------------------------------------------------ whole engines

/// A deep, narrow batch-mode network on 4×4 maps (a stride-2 stem, then
/// six residual blocks): the small per-channel batches over which float32
/// rounding of the forward values, compounded over the depth, moves the
/// gradient and Hv most (BENCHMARKS.md, "torchvision's fifteen CNNs").
fn deep_problem(samples: usize, batch: usize, seed: u64) -> Problem {
    let mut text = String::from(
        "model deep-bn\ninput 3 8 8\nclasses 5\nconv conv1 8 k=3 stride=2 pad=1 bias=false\nbn bn1\nrelu\n",
    );
    for b in 0..6 {
        text.push_str(&format!("basicblock layer{b} 8\n"));
    }
    text.push_str("gap\nlinear fc 5\n");
    let model = arch::parse("deep-bn.arch", &text).unwrap();
    let mut r = StdRng::seed_from_u64(seed);
    let mut theta = Vec::with_capacity(model.n_params);
    for p in &model.params {
        let n = p.numel();
        if p.shape.len() == 4 {
            // Kaiming fan-in, uniform.
            let b = (6.0 / (p.shape[1] * p.shape[2] * p.shape[3]) as f64).sqrt();
            theta.extend(rnd(&mut r, n, -b, b));
            continue;
        }
        match p.init {
            Init::Const(1.0) => theta.extend(rnd(&mut r, n, 0.5, 1.5)),
            Init::Const(_) => theta.extend(rnd(&mut r, n, -0.2, 0.2)),
            Init::UniformFanIn(f) => {
                let b = 1.0 / (f as f64).sqrt();
                theta.extend(rnd(&mut r, n, -b, b));
            }
            // The sequence layers' laws; none of these CNNs has them.
            Init::Uniform { bound: b } | Init::Normal { std: b } => {
                theta.extend(rnd(&mut r, n, -b, b))
            }
        }
    }
    let buffers = model.buffers.iter().map(|b| vec![b.init; b.len]).collect();
    let shape = model.input;
    let data = Dataset {
        x: rnd(&mut r, samples * shape.numel(), -2.0, 2.0)
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        y: (0..samples).map(|_| r.random_range(0..5u32)).collect(),
        shape,
        source: format!("uniform images, seed {seed}"),
    };
    Problem::new(
        model,
        Weights { theta, buffers },
        data,
        batch,
        BnMode::Batch,
    )
    .unwrap()
}

/// Relative error of each batch-norm node's output on the engine against
/// the float64 reference's, worst over nodes and the resident `batches`.
fn bn_output_error(e: &GpuEngine, cpu: &CpuReference, p: &Problem, batches: &[usize]) -> f64 {
    let mut worst = 0.0f64;
    for &bi in batches {
        let (start, count) = p.data.batches(p.batch)[bi];
        let want = cpu.values(start, count);
        let got = e.resident_values(bi, ValueKind::Forward).unwrap();
        for (ni, node) in p.model.nodes.iter().enumerate() {
            if matches!(node.op, Op::BatchNorm { .. }) {
                let g: Vec<f64> = got[ni + 1].iter().map(|&x| x as f64).collect();
                worst = worst.max(rel_err(&g, &want[ni + 1]));
            }
        }
    }
    worst
}

/// Tolerances: gradient and Hv 1e-5 relative (issue 26's bound for GPU
/// results); each batch norm's output 1e-6 (y = γx̂ + β from the float64
/// x̂ rounded once: a product and a sum, ≤ 3u ≈ 2e-7 per element against
/// ‖y‖ with these γ, β; a state of another batch or θ errs by O(1)).
#[test]
fn engines_take_batch_norm_state_from_float64() {
    let p = deep_problem(4, 2, 26);
    let np = p.model.n_params;
    let mut r = StdRng::seed_from_u64(7);
    let v = rnd(&mut r, np, -1.0, 1.0);
    let v2 = rnd(&mut r, np, -1.0, 1.0);
    let mut cpu = CpuReference::new(p.clone());
    let (_, g64, h64) = cpu.loss_grad_hvp(&v).unwrap();
    let mut h64b = vec![0.0; np];
    cpu.hvp(&v2, &mut h64b).unwrap();
    for (backend, ctx) in gpu_contexts() {
        let within = |what: &str, g: f64, h: f64| {
            eprintln!("{backend} {what}: gradient {g:.2e}, Hv {h:.2e}");
            assert!(
                g <= 1e-5 && h <= 1e-5,
                "{backend} {what}: gradient {g:.2e}, Hv {h:.2e} (bound 1e-5)"
            );
        };
        // Every batch resident; then its state overwritten by a float32
        // recording pass, which the next product must replace.
        let mut e = GpuEngine::new(ctx.share(), &p).unwrap();
        let (_, g, h) = e.loss_grad_hvp(&v).unwrap();
        within("resident", rel_err(&g, &g64), rel_err(&h, &h64));
        let bn_err = bn_output_error(&e, &cpu, &p, &[0, 1]);
        assert!(
            bn_err <= TOL_FEW,
            "{backend}: batch-norm outputs {bn_err:.2e} off float64"
        );
        e.float32_piecewise_inputs(0).unwrap();
        let (_, g, h) = e.loss_grad_hvp(&v).unwrap();
        within(
            "after a float32 recording pass",
            rel_err(&g, &g64),
            rel_err(&h, &h64),
        );
        let bn_err2 = bn_output_error(&e, &cpu, &p, &[0, 1]);
        assert!(
            bn_err2 <= TOL_FEW,
            "{backend}: after recording, batch-norm outputs {bn_err2:.2e} off"
        );

        // The float32 state beside it, for the record.
        let f32_state = EngineOptions {
            bn_state: DecisionSource::Float32,
            ..Default::default()
        };
        let mut e32 = GpuEngine::with_options(ctx.share(), &p, f32_state).unwrap();
        let (_, g, h) = e32.loss_grad_hvp(&v).unwrap();
        eprintln!(
            "{backend} float32 state: gradient {:.2e}, Hv {:.2e}, batch-norm outputs {:.2e} (float64 state {bn_err:.2e})",
            rel_err(&g, &g64),
            rel_err(&h, &h64),
            bn_output_error(&e32, &cpu, &p, &[0, 1])
        );

        // One workspace shared by both batches: the state is written
        // before each batch's pass.
        let shared = EngineOptions {
            cache_budget: Some(1),
            ..Default::default()
        };
        let mut es = GpuEngine::with_options(ctx.share(), &p, shared).unwrap();
        assert_eq!(
            es.cached_batches(),
            0,
            "{backend}: the workspace should be shared"
        );
        let (_, g, h) = es.loss_grad_hvp(&v).unwrap();
        within("shared workspace", rel_err(&g, &g64), rel_err(&h, &h64));
        let bn_err = bn_output_error(&es, &cpu, &p, &[1]);
        assert!(
            bn_err <= TOL_FEW,
            "{backend} shared: batch-norm outputs {bn_err:.2e} off"
        );

        // A block product of two tangents, then a move of θ.
        let block = EngineOptions {
            block: Some(2),
            ..Default::default()
        };
        let mut eb = GpuEngine::with_options(ctx.share(), &p, block).unwrap();
        let mut outs = vec![vec![0.0; np], vec![0.0; np]];
        eb.hvp_block(&[&v, &v2], &mut outs).unwrap();
        within(
            "block of 2",
            rel_err(&outs[0], &h64),
            rel_err(&outs[1], &h64b),
        );
        let theta2: Vec<f64> = (p.weights.theta.iter())
            .map(|t| t * (1.0 + 0.1 * r.random::<f64>()))
            .collect();
        let mut p2 = p.clone();
        p2.weights.theta = theta2.clone();
        let (_, g2, h2) = CpuReference::new(p2).loss_grad_hvp(&v).unwrap();
        eb.set_theta(&theta2).unwrap();
        let (_, g, h) = eb.loss_grad_hvp(&v).unwrap();
        within("after set_theta", rel_err(&g, &g2), rel_err(&h, &h2));
    }
}

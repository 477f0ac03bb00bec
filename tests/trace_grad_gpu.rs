//! `trace_grad` on the GPU engines (Vulkan/lavapipe and GL/llvmpipe):
//! float32 Hessian-vector products with held decisions, differenced along
//! each probe, against PyTorch's float64 fixtures.

mod common;
use common::*;
use hesscope::decisions::DecisionSource;
use hesscope::engine::{BnMode, Problem};
use hesscope::gpu::{BackendChoice, EngineOptions, GpuEngine};
use hesscope::trace_grad::{trace_grad, Steps};

const FIXTURES: [(&str, BnMode, &str); 3] = [
    ("cnn-tiny", BnMode::Batch, "third-middle"),
    ("cnn-tiny", BnMode::Running, "third-block1"),
    ("cnn-smooth", BnMode::Batch, "third-all"),
];

fn frozen_engine(ctx: hesscope::gpu::GpuContext, p: &Problem) -> GpuEngine {
    let options = EngineOptions {
        frozen: true,
        ..Default::default()
    };
    GpuEngine::with_options(ctx, p, options).unwrap()
}

/// `f` on every fixture on every GPU backend, with a frozen engine.
fn for_each_fixture(mut f: impl FnMut(BackendChoice, &str, BnMode, &str, ThirdFixture, GpuEngine)) {
    for choice in GPU_BACKENDS {
        for (model, bn, tag) in FIXTURES {
            let Some(ctx) = gpu_context(choice) else {
                return;
            };
            let c = third_fixture(model, bn, tag);
            let e = frozen_engine(ctx, &c.problem);
            f(choice, model, bn, tag, c, e);
        }
    }
}

/// The aim of the issue for float32 differences (what the stated bound
/// must stay under).
const AIM: f64 = 1e-3;

/// What the errors themselves are held to: measured 3.1e-6 to 6.4e-6 on
/// the three fixtures, Vulkan and GL (the README's range), 4.6e-6 through
/// the CLI; 4e-5 is 6.2× the worst, below every stated bound (5.5e-5 to
/// 1.5e-4), so a hundredfold regression fails even where the bound would
/// still hold it.
const MEASURED_TOL: f64 = 4e-5;

/// Every fixture on both GPU backends with the float32 steps: within the
/// bound the run states (truncation estimate + rounding bound), within
/// [`MEASURED_TOL`], and the bound within the aim. Measured: 3.1e-6 to
/// 6.4e-6 (bounds 5.5e-5 to 1.5e-4; the bound is dominated by the
/// truncation estimate, which is conservative).
#[test]
fn every_fixture_matches_pytorch_within_the_stated_bound() {
    for_each_fixture(|choice, model, bn, tag, c, mut e| {
        let theta = e.theta().to_vec();
        let t = trace_grad(&mut e, &c.probes, Steps::for_f32()).unwrap();
        let err = rel_err(&t.grad, &c.want);
        println!(
            "{choice:?} {model} {bn:?} {tag}: grad rel err {err:.2e}, stated bound {:.2e}, {} HVPs",
            t.error_estimate, t.hvps
        );
        assert!(
            err <= t.error_estimate,
            "{model} {tag}: {err:.3e} above the stated bound {:.3e}",
            t.error_estimate
        );
        assert!(err <= MEASURED_TOL, "{model} {tag}: {err:.3e}");
        assert!(
            t.error_estimate <= AIM,
            "{model} {tag}: bound {:.3e}",
            t.error_estimate
        );
        assert_eq!(e.theta(), &theta[..], "θ is restored");
    });
}

/// At the recording θ a frozen engine's passes are the plain engine's bit
/// for bit (the replayed pieces multiply by exactly 0, 1 or the slope, the
/// argmax gather picks the same element); away from it, they are the
/// float64 reference's with its decisions held at θ.
#[test]
fn held_decisions_replay_the_recorded_pieces() {
    use hesscope::engine::Curvature;
    use hesscope::trace_grad::HoldsDecisions;
    for choice in GPU_BACKENDS {
        // lenet5 has max pools, cnn-tiny ReLUs, batch norm and a residual.
        for (model, bn) in [("lenet5", BnMode::Batch), ("cnn-tiny", BnMode::Batch)] {
            let Some(ctx) = gpu_context(choice) else {
                return;
            };
            let p = problem(model, bn);
            let mut frozen = frozen_engine(ctx, &p);
            // A frozen engine takes its batch statistics in float32 (held
            // decisions are evaluated away from the recording θ, where no
            // float64 forward runs), so the plain engine it must equal bit
            // for bit does too (`bn_state`; the default takes them from
            // the float64 forward in batch mode).
            let f32_stats = EngineOptions {
                bn_state: DecisionSource::Float32,
                ..Default::default()
            };
            let mut plain =
                GpuEngine::with_options(gpu_context(choice).unwrap(), &p, f32_stats).unwrap();
            let np = p.model.n_params;
            let v: Vec<f64> = (0..np)
                .map(|i| ((i * 7919 % 101) as f64 / 50.0) - 1.0)
                .collect();
            let (l0, g0) = plain.loss_grad().unwrap();
            let (l1, g1) = frozen.loss_grad().unwrap();
            assert_eq!(l0.to_bits(), l1.to_bits(), "{model}: loss at θ");
            assert_eq!(g0, g1, "{model}: gradient at θ");
            let mut h0 = vec![0.0; np];
            let mut h1 = vec![0.0; np];
            plain.hvp(&v, &mut h0).unwrap();
            frozen.hvp(&v, &mut h1).unwrap();
            assert_eq!(h0, h1, "{model}: Hv at θ");

            // A step large enough to flip decisions.
            let mut cpu = hesscope::cpu::CpuReference::new(p.clone());
            cpu.hold_decisions(true).unwrap();
            let theta: Vec<f64> = p.weights.theta.clone();
            let moved: Vec<f64> = theta.iter().zip(&v).map(|(t, d)| t + 0.05 * d).collect();
            let decisions_at_theta = cpu.decisions();
            cpu.set_theta(&moved).unwrap();
            frozen.set_theta(&moved).unwrap();
            plain.set_theta(&moved).unwrap();
            assert_ne!(
                cpu.decisions(),
                decisions_at_theta,
                "{model}: the step flips a decision"
            );
            let mut want = vec![0.0; np];
            cpu.hvp(&v, &mut want).unwrap();
            frozen.hvp(&v, &mut h1).unwrap();
            plain.hvp(&v, &mut h0).unwrap();
            let e_frozen = rel_err(&h1, &want);
            let e_plain = rel_err(&h0, &want);
            println!("{choice:?} {model}: held Hv at θ+0.05v vs held float64 {e_frozen:.2e}; unheld {e_plain:.2e}");
            // float32 products: 4e-7 at θ on every fixture; 1e-5 leaves
            // room for the moved point, far below what one flip costs.
            assert!(e_frozen <= 1e-5, "{model}: {e_frozen:.3e}");
            assert!(e_plain > 10.0 * e_frozen, "{model}: unheld {e_plain:.3e}");
        }
    }
}

/// What a frozen engine refuses: releasing its decisions, or float32
/// recordings of batches that do not all stay resident; a plain one
/// refuses to hold them. Float64 decisions, kept on the host, are
/// rewritten into a shared workspace before each batch: the same Hv as
/// with every batch resident (to float32 summation, 1e-6).
#[test]
fn held_decisions_refuse_what_they_cannot_do() {
    let p = problem("cnn-tiny", BnMode::Batch);
    let Some(ctx) = gpu_context(GPU_BACKENDS[0]) else {
        return;
    };
    let mut plain = GpuEngine::new(ctx, &p).unwrap();
    let e = plain.hold_decisions(true).unwrap_err().to_string();
    assert!(e.contains("not planned"), "{e}");
    let options = EngineOptions {
        frozen: true,
        cache_budget: Some(1),
        decisions: DecisionSource::Float32,
        ..Default::default()
    };
    let ctx = gpu_context(GPU_BACKENDS[0]).unwrap();
    let e = match GpuEngine::with_options(ctx, &p, options) {
        Ok(_) => panic!("a frozen engine over the cache budget"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("every batch resident"), "{e}");
    let shared = EngineOptions {
        decisions: DecisionSource::Float64,
        ..options
    };
    let mut e = GpuEngine::with_options(gpu_context(GPU_BACKENDS[0]).unwrap(), &p, shared).unwrap();
    assert_eq!(e.cached_batches(), 0);
    let v = vector(&p, fixtures_dir().join("cnn-tiny").join("v.safetensors"));
    let mut hv_shared = vec![0.0; v.len()];
    hesscope::engine::Curvature::hvp(&mut e, &v, &mut hv_shared).unwrap();
    let mut resident = frozen_engine(gpu_context(GPU_BACKENDS[0]).unwrap(), &p);
    let mut hv = vec![0.0; v.len()];
    hesscope::engine::Curvature::hvp(&mut resident, &v, &mut hv).unwrap();
    let err = rel_err(&hv_shared, &hv);
    assert!(
        err <= 1e-6,
        "shared workspace with held float64 decisions: {err:.1e}"
    );
    let mut frozen = frozen_engine(gpu_context(GPU_BACKENDS[0]).unwrap(), &p);
    let e = frozen.hold_decisions(false).unwrap_err().to_string();
    assert!(e.contains("always replays"), "{e}");
    let e = frozen.set_theta(&[0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("3 values"), "{e}");
}

#[test]
#[ignore]
fn step_sweep() {
    for_each_fixture(|choice, model, bn, tag, c, mut e| {
        for eps in [3e-1, 1e-1, 3e-2, 1e-2, 3e-3] {
            for levels in [1, 2, 3] {
                let steps = Steps {
                    eps,
                    levels,
                    ..Steps::for_f32()
                };
                let t = trace_grad(&mut e, &c.probes, steps).unwrap();
                println!(
                    "{choice:?} {model} {bn:?} {tag} eps {eps:.0e} levels {levels}: {:.2e} (est {:.2e})",
                    rel_err(&t.grad, &c.want),
                    t.error_estimate
                );
            }
        }
    });
}

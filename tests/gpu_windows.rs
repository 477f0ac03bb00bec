//! Models whose parameter vector exceeds the device's storage binding
//! limit (`max_storage_buffer_binding_size`: alexnet's 228 MB of θ against
//! lavapipe's 128 MiB): θ, v, the gradient and Hv are then held as several
//! buffers split between layers (`gpu::executor::param_bufs`), each node's
//! passes binding the chunk of its parameters at rebased offsets. Tested by
//! capping the binding limit of a Vulkan (lavapipe) and a GL (llvmpipe)
//! context at 128 KiB, where a model of conv, grouped conv, batch norm
//! (both modes) and linear layers of 41 550 parameters splits in four:
//! loss, gradient, Hv and block Hv against the float64 reference and
//! against the same engine on the uncapped context, host outputs poisoned
//! with NaN.

mod common;

use common::gpu::products;
use common::{gpu_context, rel_err, GPU_BACKENDS};
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::executor::EngineOptions;
use hesscope::gpu::{GpuContext, GpuEngine};
use hesscope::model::{arch, Model, Weights};
use hesscope::Error;
use rand::{Rng, SeedableRng};

/// As tests/gpu.rs for whole models: float32 kernels (decisions from the
/// float64 forward, the default) against float64 within 1e-5; a node bound
/// to the wrong chunk or offset errs by O(1).
const TOL: f64 = 1e-5;

/// The capped binding limit: 32 Ki floats, so a chunk of θ (padded by a
/// 16 Ki-float uniform window) holds at most 16 Ki floats.
const CAP: u64 = 128 << 10;

const ARCH: &str = "model windows
input 4 8 8
classes 10
conv c1 32 k=3 pad=1 bias=false
bn b1
relu
conv g2 64 k=3 pad=1 groups=2
relu
conv g3 64 k=3 pad=1 groups=4 bias=false
bn b3
relu
maxpool k=2
conv g4 64 k=3 pad=1 groups=4
relu
flatten
linear fc1 12
relu
linear fc2 10
";

fn model(text: &str) -> Model {
    arch::parse("windows.arch", text).unwrap()
}

fn problem(m: &Model, bn: BnMode) -> Problem {
    let mut w = Weights::init(m, 3);
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    for p in &m.params {
        if p.name.starts_with('b') {
            let (lo, hi) = if p.name.ends_with("weight") {
                (0.5, 1.5)
            } else {
                (-0.2, 0.2)
            };
            for t in &mut w.theta[p.offset..p.offset + p.numel()] {
                *t = lo + (hi - lo) * r.random::<f64>();
            }
        }
    }
    for (i, b) in w.buffers.iter_mut().enumerate() {
        let var = m.buffers[i].name.ends_with("running_var");
        for x in b.iter_mut() {
            *x = if var {
                0.5 + r.random::<f64>()
            } else {
                0.2 * (r.random::<f64>() - 0.5)
            };
        }
    }
    let data = hesscope::data::synthetic(m.input, m.classes, 4, 9);
    Problem::new(m.clone(), w, data, 4, bn).unwrap()
}

fn capped(ctx: &GpuContext) -> GpuContext {
    let mut c = ctx.share();
    c.limits.max_storage_buffer_binding_size = CAP;
    c
}

fn engine(ctx: GpuContext, p: &Problem, block: usize) -> GpuEngine {
    let options = EngineOptions {
        block: Some(block),
        ..Default::default()
    };
    GpuEngine::with_options(ctx, p, options).unwrap()
}

#[test]
fn split_parameter_buffers_match_float64_and_the_single_buffer_bit_for_bit() {
    let m = model(ARCH);
    assert_eq!(m.n_params, 41550);
    for choice in GPU_BACKENDS {
        let Some(ctx) = gpu_context(choice) else {
            continue;
        };
        for bn in [BnMode::Batch, BnMode::Running] {
            let p = problem(&m, bn);
            let np = m.n_params;
            let mut r = rand::rngs::StdRng::seed_from_u64(17);
            let vs: Vec<Vec<f64>> = (0..3)
                .map(|k| {
                    let s = 1.0 + k as f64;
                    (0..np).map(|_| s * (r.random::<f64>() - 0.5)).collect()
                })
                .collect();
            let mut cpu = CpuReference::new(p.clone());
            let (l, g, hv) = cpu.loss_grad_hvp(&vs[0]).unwrap();
            let hvs: Vec<Vec<f64>> = vs
                .iter()
                .map(|v| {
                    let mut o = vec![0.0; np];
                    cpu.hvp(v, &mut o).unwrap();
                    o
                })
                .collect();
            for block in [1, 2] {
                let mut whole = engine(ctx.share(), &p, block);
                let mut split = engine(capped(&ctx), &p, block);
                assert_eq!(whole.param_chunks(), 1);
                assert_eq!(split.param_chunks(), 4, "{np} floats in chunks of ≤ 16 Ki");
                let a = products(&mut whole, &vs);
                let b = products(&mut split, &vs);
                let what = format!("{choice:?} {bn:?} block {block}");
                // The same kernels on the same values in the same order:
                // only the buffer a node's parameters lie in and their
                // offsets there change, so the results are bit for bit
                // those of the single buffers.
                assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{what}: loss");
                assert_eq!(a.grad, b.grad, "{what}: gradient");
                assert_eq!(a.hv, b.hv, "{what}: Hv");
                assert_eq!(a.block, b.block, "{what}: block Hv");
                let el = (b.loss - l).abs() / l.abs();
                let eg = rel_err(&b.grad, &g);
                let eh = rel_err(&b.hv, &hv);
                let eb = b
                    .block
                    .iter()
                    .zip(&hvs)
                    .map(|(x, y)| rel_err(x, y))
                    .fold(0.0, f64::max);
                eprintln!(
                    "{what}: split in 4, vs float64: loss {el:.1e} grad {eg:.1e} Hv {eh:.1e} \
                     block Hv {eb:.1e}; bit for bit the single buffers"
                );
                assert!(
                    el <= TOL && eg <= TOL && eh <= TOL && eb <= TOL,
                    "{what}: {el:.1e} {eg:.1e} {eh:.1e} {eb:.1e}"
                );
            }
        }
    }
}

/// The model with fc1 of 1024 × 20 = 20 480 floats, more than a chunk of
/// 16 Ki: its weight is split by rows between chunks
/// (`layers::linear_rows`), each pass running its kernels a row block at a
/// time. Against float64: `TOL`. Against the unsplit engine: the same
/// kernels on the same values, but backward data adds up the row blocks
/// one after the other (and the forward adds the bias after the sum), so
/// the two agree to float32 rounding, not bit for bit: `SPLIT_TOL` = 1e-6
/// relative (sums of ≤ 1024 terms regrouped: a few u·√L ≈ 1e-7 at worst,
/// carried through the layers below; a block read from the wrong rows or
/// chunk errs by O(1)).
#[test]
fn a_linear_layer_larger_than_a_binding_is_split_by_rows() {
    const SPLIT_TOL: f64 = 1e-6;
    let m = model(&ARCH.replace("linear fc1 12", "linear fc1 20"));
    for choice in GPU_BACKENDS {
        let Some(ctx) = gpu_context(choice) else {
            continue;
        };
        for bn in [BnMode::Batch, BnMode::Running] {
            let p = problem(&m, bn);
            let np = m.n_params;
            let mut r = rand::rngs::StdRng::seed_from_u64(23);
            let vs: Vec<Vec<f64>> = (0..3)
                .map(|k| {
                    let s = 1.0 + k as f64;
                    (0..np).map(|_| s * (r.random::<f64>() - 0.5)).collect()
                })
                .collect();
            let mut cpu = CpuReference::new(p.clone());
            let (l, g, hv) = cpu.loss_grad_hvp(&vs[0]).unwrap();
            let hvs: Vec<Vec<f64>> = vs
                .iter()
                .map(|v| {
                    let mut o = vec![0.0; np];
                    cpu.hvp(v, &mut o).unwrap();
                    o
                })
                .collect();
            let mut whole = engine(ctx.share(), &p, 1);
            // The block size chosen by the engine: one tangent per sweep.
            let mut split =
                GpuEngine::with_options(capped(&ctx), &p, EngineOptions::default()).unwrap();
            assert_eq!(split.block(), 1);
            assert!(split.param_chunks() >= 4, "{}", split.param_chunks());
            let a = products(&mut whole, &vs);
            let b = products(&mut split, &vs);
            let what = format!("{choice:?} {bn:?}");
            let worst_block = |x: &[Vec<f64>], y: &[Vec<f64>]| {
                x.iter()
                    .zip(y)
                    .map(|(x, y)| rel_err(x, y))
                    .fold(0.0, f64::max)
            };
            let d = [
                (a.loss - b.loss).abs() / a.loss.abs(),
                rel_err(&b.grad, &a.grad),
                rel_err(&b.hv, &a.hv),
                worst_block(&b.block, &a.block),
            ];
            let e = [
                (b.loss - l).abs() / l.abs(),
                rel_err(&b.grad, &g),
                rel_err(&b.hv, &hv),
                worst_block(&b.block, &hvs),
            ];
            eprintln!(
                "{what}: fc1 split by rows in {} chunks; vs float64: loss {:.1e} grad {:.1e} \
                 Hv {:.1e} block Hv {:.1e}; vs unsplit: {:.1e} {:.1e} {:.1e} {:.1e}",
                split.param_chunks(),
                e[0],
                e[1],
                e[2],
                e[3],
                d[0],
                d[1],
                d[2],
                d[3]
            );
            assert!(e.iter().all(|&x| x <= TOL), "{what}: vs float64 {e:?}");
            assert!(
                d.iter().all(|&x| x <= SPLIT_TOL),
                "{what}: vs unsplit {d:?}"
            );
        }
    }
}

/// A tensor larger than a binding that is not a linear weight (here the
/// conv `g3.weight`, 64 × 64 × 9 = 36 864 floats against chunks of 16 Ki)
/// cannot be split: the engine refuses it by name. So is a block product
/// asked for with a layer split by rows, and a block too wide for the
/// largest layer.
#[test]
fn a_tensor_larger_than_a_binding_is_refused_by_name() {
    let big = model(&ARCH.replace("conv g3 64 k=3 pad=1 groups=4", "conv g3 64 k=3 pad=1"));
    for choice in GPU_BACKENDS {
        let Some(ctx) = gpu_context(choice) else {
            continue;
        };
        let p = problem(&big, BnMode::Batch);
        let e = GpuEngine::with_options(capped(&ctx), &p, EngineOptions::default());
        match e {
            Err(Error::DeviceLimit {
                tensor, limit_name, ..
            }) => {
                assert!(tensor.contains("g3.weight"), "{tensor}");
                assert_eq!(limit_name, "max_storage_buffer_binding_size");
            }
            Err(e) => panic!("{choice:?}: {e}"),
            Ok(_) => panic!("{choice:?}: a 36 864-float conv weight in 32 Ki-float bindings"),
        }
        let split = model(&ARCH.replace("linear fc1 12", "linear fc1 20"));
        let p = problem(&split, BnMode::Batch);
        let block2 = EngineOptions {
            block: Some(2),
            ..Default::default()
        };
        let err = GpuEngine::with_options(capped(&ctx), &p, block2)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("fc1.weight") && err.contains("one tangent"),
            "{choice:?}: {err}"
        );
        // fc1 of 12 300 floats: two slices of it fit a 32 Ki-float binding,
        // three do not.
        let p = problem(&model(ARCH), BnMode::Batch);
        let block3 = EngineOptions {
            block: Some(3),
            ..Default::default()
        };
        let err = GpuEngine::with_options(capped(&ctx), &p, block3)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("fc1.weight"), "{choice:?}: {err}");
    }
}

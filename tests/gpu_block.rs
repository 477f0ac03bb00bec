//! Block products on the GPU: H·[v₁ … v_K] in one sweep (each layer's
//! R-pass kernels take the K tangents in one dispatch, shaders/tangents.wgsl)
//! against K single products of an engine built for one tangent, on every
//! fixture, on Vulkan (lavapipe in CI) and GL (llvmpipe).

mod common;

use common::*;
use hesscope::data::synthetic;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::{BackendChoice, EngineOptions, GpuEngine};
use hesscope::model::{Model, Weights};
use rand::{Rng, SeedableRng};

/// A block product runs the same f32 arithmetic in the same order as a
/// single one (only the slice a kernel reads changes), so the two agree to
/// a few f32 roundings of ‖Hv‖; a kernel that read or wrote another
/// tangent's slice (or none) errs by O(1).
const BLOCK_TOL: f64 = 1e-6;

/// As tests/gpu.rs: f32 kernels against PyTorch's float64.
const FIXTURE_TOL: f64 = 1e-5;

fn engine(choice: BackendChoice, p: &Problem, block: usize, cache: bool) -> Option<GpuEngine> {
    let ctx = gpu_context(choice)?;
    let mut options = EngineOptions {
        block: Some(block),
        ..Default::default()
    };
    if !cache {
        options.cache_budget = Some(0);
    }
    Some(GpuEngine::with_options(ctx, p, options).unwrap())
}

/// `count` directions: the fixture's v (if any) and Gaussian ones of
/// different scales, so that a tangent's slice mixed up with another's
/// shows.
fn directions(n: usize, first: Option<Vec<f64>>, count: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<Vec<f64>> = first.into_iter().collect();
    while out.len() < count {
        let scale = 0.5 + out.len() as f64;
        out.push(
            (0..n)
                .map(|_| scale * (rng.random::<f64>() - 0.5))
                .collect(),
        );
    }
    out
}

/// Worst relative difference between a block product and single products
/// (engine for one tangent) over `vs`.
fn block_vs_single(
    choice: BackendChoice,
    p: &Problem,
    vs: &[Vec<f64>],
    block: usize,
    cache: bool,
) -> Option<(f64, Vec<Vec<f64>>)> {
    let mut single = engine(choice, p, 1, true)?;
    let mut blocked = engine(choice, p, block, cache)?;
    assert_eq!(blocked.block(), block);
    let n = p.model.n_params;
    let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
    // Poisoned outputs: every element must be written.
    let mut outs = vec![vec![f64::NAN; n]; vs.len()];
    blocked.hvp_block(&refs, &mut outs).unwrap();
    let mut worst: f64 = 0.0;
    for (v, o) in vs.iter().zip(&outs) {
        let mut hv = vec![0.0; n];
        single.hvp(v, &mut hv).unwrap();
        worst = worst.max(rel_err(o, &hv));
    }
    Some((worst, outs))
}

#[test]
fn block_products_equal_single_products_on_every_fixture() {
    let mut rows = vec![];
    for choice in GPU_BACKENDS {
        for (model, bn) in fixture_cases() {
            let p = problem(&model, bn);
            let v = vector(&p, fixtures_dir().join(&model).join("v.safetensors"));
            let hv_ref = vector(&p, ref_dir(&model, bn).join("hv.safetensors"));
            // 7 directions in blocks of 4: a full block and a partial one.
            let vs = directions(p.model.n_params, Some(v), 7, 11);
            let Some((worst, outs)) = block_vs_single(choice, &p, &vs, 4, true) else {
                continue;
            };
            let vs_torch = rel_err(&outs[0], &hv_ref);
            let row = format!(
                "{choice:?} {model} {bn:?}: block vs single {worst:.1e}, vs PyTorch {vs_torch:.1e}"
            );
            eprintln!("{row}");
            rows.push((row, worst, vs_torch));
        }
    }
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| r.1.is_nan() || r.2.is_nan() || r.1 > BLOCK_TOL || r.2 > FIXTURE_TOL)
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

/// Without a cache every block re-uploads its batch and recomputes the
/// forward and backward passes; blocks larger than the directions and of
/// one tangent go through the same programs.
#[test]
fn block_products_without_a_cache_and_at_every_size() {
    let p = problem("cnn-tiny", BnMode::Batch);
    assert!(p.data.batches(p.batch).len() > 1);
    let vs = directions(p.model.n_params, None, 5, 3);
    for (block, cache) in [(3, false), (8, true), (1, true), (5, false)] {
        let Some((worst, _)) = block_vs_single(BackendChoice::Vulkan, &p, &vs, block, cache) else {
            return;
        };
        eprintln!("block {block} cache {cache}: {worst:.1e}");
        assert!(
            worst <= BLOCK_TOL,
            "block {block} cache {cache}: {worst:.1e}"
        );
    }
}

/// resnet20 (residual adds, strided 1×1 shortcuts, global average pool,
/// batch norm in both modes) on a few synthetic samples.
#[test]
fn block_products_on_resnet20() {
    let model = Model::load("resnet20").unwrap();
    let data = synthetic(model.input, model.classes, 4, 5);
    let weights = Weights::init(&model, 9);
    for bn in [BnMode::Batch, BnMode::Running] {
        let p = Problem::new(model.clone(), weights.clone(), data.clone(), 2, bn).unwrap();
        let vs = directions(p.model.n_params, None, 3, 7);
        let Some((worst, _)) = block_vs_single(BackendChoice::Vulkan, &p, &vs, 3, true) else {
            return;
        };
        eprintln!("resnet20 {bn:?}: {worst:.1e}");
        assert!(worst <= BLOCK_TOL, "resnet20 {bn:?}: {worst:.1e}");
    }
}

#[test]
fn a_block_size_out_of_range_is_refused() {
    let p = problem("mlp-tiny", BnMode::Batch);
    for block in [0, 65] {
        let Some(ctx) = gpu_context(BackendChoice::Vulkan) else {
            return;
        };
        let options = EngineOptions {
            block: Some(block),
            ..Default::default()
        };
        let err = GpuEngine::with_options(ctx, &p, options)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("block size"), "{err}");
    }
}

/// `--block K` reaches the GPU engine: a density with SLQ runs in lockstep
/// over GPU block products equals the one-by-one density (the products
/// are bit-identical and the starts the same, so only the f64 host
/// arithmetic's order could differ: bound 1e-9 of the peak).
#[test]
fn cli_density_on_the_gpu_with_blocks() {
    if gpu_context(BackendChoice::Vulkan).is_none() {
        return;
    }
    let run = |block: &str| {
        let (ok, out, err) = hesscope(&[
            "density",
            "--backend",
            "vulkan",
            "--model",
            "cnn-tiny",
            "--samples",
            "64",
            "--batch",
            "32",
            "--steps",
            "8",
            "--runs",
            "5",
            "--grid",
            "200",
            "--block",
            block,
            "--json",
        ]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (one, four) = (run("1"), run("4"));
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (d1, d4) = (floats(&one["density"]), floats(&four["density"]));
    let peak = d1.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    let worst = d1
        .iter()
        .zip(&d4)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-9 * peak, "{worst:e} of peak {peak:e}");
    assert_eq!(four["block"], 4);
    assert_eq!(four["sweeps"], 16);
    assert_eq!(one["sweeps"], 40);
}

//! Block products on the GPU: H·[v₁ … v_K] in one sweep (each layer's
//! R-pass kernels take the K tangents in one dispatch, shaders/tangents.wgsl)
//! against K single products of an engine built for one tangent, on every
//! fixture, on Vulkan (lavapipe in CI) and GL (llvmpipe).

mod common;

use common::*;
use hesscope::data::synthetic;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::kernels::Kernel;
use hesscope::gpu::{BackendChoice, EngineOptions, GpuEngine, ReducePath};
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

/// Reductions split in segments (the GPUs' form, `ReducePath::Split`; 37
/// elements per segment, so every fixture's channels get several, the
/// last ragged) give PyTorch's gradient and Hv on every fixture, and block
/// products through them (each tangent's partials in its own slice) the
/// same Hv as the whole-channel engine. Tolerances: FIXTURE_TOL against
/// float64 as tests/gpu.rs; between the two f32 engines, which sum the
/// same terms in a different order, the same bound (each is within a few
/// f32 roundings of the truth; a partial read from another tangent's or
/// segment's slice errs by O(1)).
#[test]
fn split_reductions_match_pytorch_and_the_whole_channel_engine() {
    let mut rows = vec![];
    for choice in GPU_BACKENDS {
        for (model, bn) in fixture_cases() {
            let p = problem(&model, bn);
            let n = p.model.n_params;
            let v = vector(&p, fixtures_dir().join(&model).join("v.safetensors"));
            let g_ref = vector(&p, ref_dir(&model, bn).join("grad.safetensors"));
            let hv_ref = vector(&p, ref_dir(&model, bn).join("hv.safetensors"));
            let vs = directions(n, Some(v), 3, 5);
            let make = |reduce_path| {
                let ctx = gpu_context(choice)?;
                let options = EngineOptions {
                    block: Some(3),
                    reduce_path,
                    ..Default::default()
                };
                Some(GpuEngine::with_options(ctx, &p, options).unwrap())
            };
            let (Some(mut split), Some(mut whole)) =
                (make(ReducePath::Split(37)), make(ReducePath::Whole))
            else {
                continue;
            };
            let (_, grad) = split.loss_grad().unwrap();
            // The split is in force: two dispatches per reduction.
            let reductions = |e: &mut GpuEngine| {
                let (fb, rp) = e.profile().unwrap();
                let is = |k: &Kernel| {
                    matches!(
                        k,
                        Kernel::BnStats | Kernel::BnParamSums | Kernel::ChannelSums
                    )
                };
                fb.iter().chain(&rp).filter(|t| is(&t.0)).count()
            };
            // (Reductions of at most 37 elements stay whole: the linear
            // layers' bias sums over a batch of 32, in the backward and
            // R-backward; all of cnn-tiny's others have 32·16 or more.)
            let (rs, rw) = (reductions(&mut split), reductions(&mut whole));
            assert!(rw > 0 && rs >= rw, "{model}: {rs} split against {rw} whole");
            if model == "cnn-tiny" {
                assert_eq!(rs, 2 * rw - 2, "{model}: all but the bias sums split");
            }
            let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
            let mut a = vec![vec![f64::NAN; n]; 3];
            let mut b = vec![vec![f64::NAN; n]; 3];
            split.hvp_block(&refs, &mut a).unwrap();
            whole.hvp_block(&refs, &mut b).unwrap();
            let vs_whole = a
                .iter()
                .zip(&b)
                .map(|(x, y)| rel_err(x, y))
                .fold(0.0, f64::max);
            let (eg, eh) = (rel_err(&grad, &g_ref), rel_err(&a[0], &hv_ref));
            let row = format!(
                "{choice:?} {model} {bn:?}: grad {eg:.1e}, Hv {eh:.1e} vs PyTorch; \
                 block vs whole-channel engine {vs_whole:.1e}"
            );
            eprintln!("{row}");
            rows.push((row, eg.max(eh), vs_whole));
        }
    }
    assert!(!rows.is_empty(), "no GPU backend ran");
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| r.1.is_nan() || r.2.is_nan() || r.1 > FIXTURE_TOL || r.2 > FIXTURE_TOL)
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

/// `bench --reductions` chooses how the timed engine reduces per channel,
/// and the report says what its programs ran (null on the CPU reference).
#[test]
fn cli_bench_reports_the_kernel_paths_it_ran() {
    let bench = |backend: &str, reductions: &str| {
        let (ok, out, err) = hesscope(&[
            "bench",
            "--backend",
            backend,
            "--model",
            "cnn-tiny",
            "--samples",
            "32",
            "--batch",
            "32",
            "--reps",
            "1",
            "--no-kernels",
            "--reductions",
            reductions,
            "--json",
        ]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    assert!(bench("cpu", "split")["kernel_paths"].is_null());
    let (ok, _, stderr) = hesscope(&["bench", "--reductions", "halves"]);
    assert!(!ok && stderr.contains("--reductions"), "{stderr}");
    let Some(ctx) = gpu_context(BackendChoice::Vulkan) else {
        return;
    };
    let mut cases = vec![
        ("whole", "reductions a workgroup per channel"),
        ("split", "reductions split in segments of 4096"),
    ];
    // On a CPU adapter (lavapipe) Auto keeps the emulators' forms.
    if ctx.info.device_type == "Cpu" {
        cases.push((
            "auto",
            "conv emulator kernels, reductions a workgroup per channel",
        ));
    }
    for (arg, want) in cases {
        let v = bench("vulkan", arg);
        let k = v["kernel_paths"].as_str().unwrap();
        assert!(k.contains(want) && k.starts_with("conv "), "{arg}: {k}");
    }
}

//! Several engines at once (`--devices`, `hesscope::multi`): whole batches
//! dealt to workers by sample count, their products weighted by their
//! share and summed in float64, against one engine over every batch.
//!
//! The fixture is cnn-tiny's (64 samples, batch norm) in batches of 24:
//! three batches of 24, 24 and 16 samples, dealt 24 | 40 to two workers,
//! so the weights n_w/N are uneven (a plain mean of the workers' losses
//! would be off by 25%).

mod common;

use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::{BackendChoice, EngineOptions};
use hesscope::multi::{self, DeviceSpec, MultiEngine};
use hesscope::operator::Operator;
use hesscope::trace_grad::HoldsDecisions;
use rand::{Rng, SeedableRng};

/// Two float64 engines against one: each worker sums its batches in the
/// single engine's order with 1/n_w instead of 1/N, then is weighted by
/// n_w/N, so the results differ by a few float64 roundings of each term
/// (≈1e-16 relative); 1e-12 leaves room for the cancellation in Hv's
/// elements while a misweighted or missing batch errs by ≥ 1e-2.
const F64_TOL: f64 = 1e-12;

/// Float32 engines (lavapipe, llvmpipe) against one float32 engine: both
/// sides are within the float32 kernels' tolerance of float64 (1e-5, as
/// tests/gpu.rs against PyTorch float64), so within 2e-5 of each other;
/// a misweighted or missing batch errs by ≥ 1e-2.
const F32_TOL: f64 = 1e-5;

fn problem(bn: BnMode) -> Problem {
    let mut p = common::problem("cnn-tiny", bn);
    p.batch = 24;
    p
}

fn directions(n: usize, count: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|k| {
            (0..n)
                .map(|_| (1.0 + k as f64) * (rng.random::<f64>() - 0.5))
                .collect()
        })
        .collect()
}

fn cpu_factory(d: DeviceSpec) -> multi::local::Factory {
    assert_eq!(d, DeviceSpec::Cpu);
    Box::new(|p| Ok(Box::new(CpuReference::new(p)) as Box<dyn HoldsDecisions>))
}

fn gpu_factory(d: DeviceSpec) -> multi::local::Factory {
    Box::new(move |p| {
        let DeviceSpec::Adapter(b, i) = d else {
            panic!("an adapter expected");
        };
        Ok(Box::new(hesscope::gpu::open_with(
            &p,
            b,
            i,
            EngineOptions::default(),
        )?) as Box<dyn HoldsDecisions>)
    })
}

/// Every product of `multi` against `single`: loss, gradient, Hv, a block
/// of three (of H, G and E), (L, ∇L, Hv) together; the worst relative error. Outputs are
/// poisoned with NaN first.
fn compare(multi: &mut dyn Curvature, single: &mut dyn Curvature) -> f64 {
    let n = single.n_params();
    let mut worst: f64 = 0.0;
    let (l1, g1) = multi.loss_grad().unwrap();
    let (l0, g0) = single.loss_grad().unwrap();
    worst = worst.max(((l1 - l0) / l0).abs()).max(rel_err(&g1, &g0));
    let vs = directions(n, 3, 7);
    let mut h1 = vec![f64::NAN; n];
    let mut h0 = vec![0.0; n];
    multi.hvp(&vs[0], &mut h1).unwrap();
    single.hvp(&vs[0], &mut h0).unwrap();
    worst = worst.max(rel_err(&h1, &h0));
    let refs: Vec<&[f64]> = vs.iter().map(Vec::as_slice).collect();
    let mut b1 = vec![vec![f64::NAN; n]; 3];
    let mut b0 = vec![vec![0.0; n]; 3];
    multi.hvp_block(&refs, &mut b1).unwrap();
    single.hvp_block(&refs, &mut b0).unwrap();
    for (a, b) in b1.iter().zip(&b0) {
        worst = worst.max(rel_err(a, b));
    }
    // The Gauss–Newton and residual products are sums over batches too.
    for op in [Operator::Ggn, Operator::Residual] {
        let mut b1 = vec![vec![f64::NAN; n]; 3];
        let mut b0 = vec![vec![0.0; n]; 3];
        multi.product_block(op, &refs, &mut b1).unwrap();
        single.product_block(op, &refs, &mut b0).unwrap();
        for (a, b) in b1.iter().zip(&b0) {
            worst = worst.max(rel_err(a, b));
        }
    }
    let (l1, g1, h1) = multi.loss_grad_hvp(&vs[1]).unwrap();
    let (l0, g0, h0) = single.loss_grad_hvp(&vs[1]).unwrap();
    worst = worst
        .max(((l1 - l0) / l0).abs())
        .max(rel_err(&g1, &g0))
        .max(rel_err(&h1, &h0));
    worst
}

#[test]
fn shares_are_whole_contiguous_and_follow_sample_counts() {
    // 24, 24, 16 over two: the middle of each batch decides.
    let b = [(0, 24), (24, 24), (48, 16)];
    assert_eq!(multi::shares(&b, 2), vec![0..1, 1..3]);
    assert_eq!(multi::shares(&b, 1), vec![0..3]);
    assert_eq!(multi::shares(&b, 3), vec![0..1, 1..2, 2..3]);
    // More workers than batches: some get none, every batch once.
    let s = multi::shares(&b, 5);
    assert_eq!(s.len(), 5);
    let mut all: Vec<usize> = s.iter().flat_map(|r| r.clone()).collect();
    all.dedup();
    assert_eq!(all, vec![0, 1, 2]);
    // Random sizes: contiguous, covering, each worker's samples within a
    // batch of its equal share.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let n: usize = rng.random_range(1..500);
        let batch = rng.random_range(1..40);
        let workers = rng.random_range(1..9);
        let batches: Vec<(usize, usize)> = (0..n)
            .step_by(batch)
            .map(|s| (s, batch.min(n - s)))
            .collect();
        let s = multi::shares(&batches, workers);
        assert_eq!(s.len(), workers);
        assert_eq!(s[0].start, 0);
        assert_eq!(s[workers - 1].end, batches.len());
        for w in 1..workers {
            assert_eq!(s[w].start, s[w - 1].end);
        }
        for r in &s {
            let got: usize = batches[r.clone()].iter().map(|b| b.1).sum();
            let fair = n as f64 / workers as f64;
            assert!(
                (got as f64 - fair).abs() <= batch as f64,
                "{got} samples for a fair share of {fair} (batch {batch})"
            );
        }
    }
}

#[test]
fn the_float64_engine_split_in_two_equals_one() {
    for bn in [BnMode::Batch, BnMode::Running] {
        let p = problem(bn);
        let mut single = CpuReference::new(p.clone());
        let mut two =
            MultiEngine::open(&p, &[DeviceSpec::Cpu, DeviceSpec::Cpu], cpu_factory).unwrap();
        let shares: Vec<f64> = two.shares().iter().map(|s| s.1).collect();
        assert_eq!(shares, vec![24.0 / 64.0, 40.0 / 64.0]);
        let worst = compare(&mut two, &mut single);
        eprintln!("cpu,cpu vs cpu ({bn:?}): worst relative difference {worst:.2e}");
        assert!(worst <= F64_TOL, "{bn:?}: {worst:.3e}");
        // The decisions are counted per batch: the sum is the same count.
        let d1 = two.decision_report().unwrap().unwrap();
        let d0 = single.decision_report().unwrap().unwrap();
        assert_eq!((d1.decisions, d1.near), (d0.decisions, d0.near));
        assert_eq!(d1.layers.len(), d0.layers.len());
        for (a, b) in d1.layers.iter().zip(&d0.layers) {
            assert_eq!(
                (&a.layer, a.decisions, a.near),
                (&b.layer, b.decisions, b.near)
            );
        }
        assert_eq!(two.backend(), "cpu,cpu");
    }
}

#[test]
fn three_workers_and_one_without_a_batch() {
    // Four workers over three batches: the fourth idles, the sum is whole.
    let p = problem(BnMode::Batch);
    let mut single = CpuReference::new(p.clone());
    let mut four = MultiEngine::open(&p, &[DeviceSpec::Cpu; 4], cpu_factory).unwrap();
    assert_eq!(four.shares().len(), 3);
    let worst = compare(&mut four, &mut single);
    assert!(worst <= F64_TOL, "{worst:.3e}");
}

#[test]
fn a_failing_worker_is_named() {
    let p = problem(BnMode::Batch);
    let e = MultiEngine::open(&p, &[DeviceSpec::Cpu, DeviceSpec::Cpu], |d| {
        Box::new(move |p: Problem| {
            if p.data.len() == 40 {
                return Err(hesscope::Error::Gpu("out of device memory".into()));
            }
            cpu_factory(d)(p)
        })
    })
    .err()
    .expect("the second worker fails");
    assert_eq!(e.to_string(), "cpu: GPU: out of device memory");
    // A direction of the wrong length: refused, every worker still serves.
    let mut two = MultiEngine::open(&p, &[DeviceSpec::Cpu, DeviceSpec::Cpu], cpu_factory).unwrap();
    let mut out = vec![0.0; p.model.n_params];
    assert!(two.hvp(&[1.0, 2.0], &mut out).is_err());
    let v = directions(p.model.n_params, 1, 1).remove(0);
    two.hvp(&v, &mut out).unwrap();
    let mut want = vec![0.0; p.model.n_params];
    CpuReference::new(p.clone()).hvp(&v, &mut want).unwrap();
    assert!(rel_err(&out, &want) <= F64_TOL);
}

#[test]
fn bad_device_lists_are_refused_naming_the_entry() {
    let adapters = hesscope::gpu::list_adapters();
    let cases = [
        (
            "vulkan:7",
            "invalid argument --devices vulkan:7: no such adapter (vulkan has",
        ),
        (
            "cuda:0",
            "invalid argument --devices cuda:0: unknown backend `cuda`",
        ),
        (
            "vulkan:x",
            "invalid argument --devices vulkan:x: `x` is not an adapter index",
        ),
        (
            "cpu,,cpu",
            "invalid argument --devices cpu,,cpu: an empty entry",
        ),
        (
            "cpu,all",
            "invalid argument --devices all: `all` stands alone",
        ),
    ];
    for (list, want) in cases {
        let e = multi::parse_devices(list, &adapters)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{list}: {e}");
    }
    let mix = [
        DeviceSpec::Cpu,
        DeviceSpec::Adapter(BackendChoice::Vulkan, 0),
    ];
    let e = multi::check_mix(&mix, "cpu,vulkan:0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not mix"), "{e}");
    assert_eq!(
        multi::parse_devices("cpu, cpu", &adapters).unwrap(),
        vec![DeviceSpec::Cpu; 2]
    );
    // Through the CLI, before any work.
    let (ok, _, err) = hesscope(&["hvp", "--devices", "vulkan:7"]);
    assert!(!ok);
    assert!(err.contains("--devices vulkan:7: no such adapter"), "{err}");
    let (ok, _, err) = hesscope(&["hvp", "--devices", "cpu", "--backend", "cpu"]);
    assert!(!ok);
    assert!(
        err.contains("--backend") && err.contains("--devices"),
        "{err}"
    );
    // (`train` splits mini-batches over --devices: tests/train_parallel.rs.)
    let (ok, _, err) = hesscope(&["bench", "--devices", "cpu,cpu"]);
    assert!(!ok);
    assert!(err.contains("invalid --devices with `bench`"), "{err}");
}

/// The CLI with `--devices cpu,cpu` against `--backend cpu`: the same Hv
/// file and the same density, on the fixture's data in batches of 24.
#[test]
fn cli_hvp_and_density_on_two_float64_engines() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures_dir().join("cnn-tiny/data.safetensors");
    let weights = fixtures_dir().join("cnn-tiny/weights.safetensors");
    let base = |extra: &[&str], out: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "--model",
            "cnn-tiny",
            "--data",
            data.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--batch",
            "24",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push("--out".into());
        a.push(dir.path().join(out).to_str().unwrap().to_string());
        a
    };
    let model = hesscope::model::Model::load("cnn-tiny").unwrap();
    let mut hv = vec![];
    for (which, flags) in [
        ("one", vec!["--backend", "cpu"]),
        ("two", vec!["--devices", "cpu,cpu"]),
    ] {
        let mut args = vec!["hvp".to_string()];
        args.extend(base(&flags, &format!("hv-{which}.safetensors")));
        let (ok, out, err) = hesscope(&args);
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        if which == "two" {
            assert_eq!(j["backend"], "cpu,cpu");
        }
        hv.push(
            hesscope::model::params::load_vector(
                &model,
                &dir.path().join(format!("hv-{which}.safetensors")),
            )
            .unwrap(),
        );
    }
    let e = rel_err(&hv[1], &hv[0]);
    eprintln!("hvp --devices cpu,cpu vs --backend cpu: {e:.2e}");
    assert!(e <= F64_TOL, "{e:.3e}");
    let mut dens = vec![];
    for (which, flags) in [
        ("one", vec!["--backend", "cpu"]),
        ("two", vec!["--devices", "cpu,cpu"]),
    ] {
        let mut args = vec![
            "density".to_string(),
            "--steps".into(),
            "12".into(),
            "--runs".into(),
            "2".into(),
        ];
        args.extend(base(&flags, &format!("density-{which}.json")));
        let (ok, _, err) = hesscope(&args);
        assert!(ok, "{err}");
        let j = json(dir.path().join(format!("density-{which}.json")));
        dens.push(j);
    }
    let nodes = |j: &serde_json::Value| -> Vec<f64> {
        let mut out = vec![];
        collect_numbers(&j["runs"], &mut out);
        out
    };
    let (a, b) = (nodes(&dens[1]), nodes(&dens[0]));
    assert!(!b.is_empty());
    assert_eq!(a.len(), b.len());
    let e = rel_err(&a, &b);
    eprintln!(
        "density --devices cpu,cpu vs --backend cpu: {e:.2e} over {} numbers",
        a.len()
    );
    assert!(e <= F64_TOL, "{e:.3e}");
}

fn collect_numbers(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_numbers(x, out)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                if k != "seconds" {
                    collect_numbers(x, out)
                }
            }
        }
        _ => {}
    }
}

/// lavapipe and llvmpipe side by side against lavapipe alone, and both
/// against the float64 engine, in both BN modes.
#[test]
fn vulkan_and_gl_together_equal_one_device() {
    let specs = [
        DeviceSpec::Adapter(BackendChoice::Vulkan, 0),
        DeviceSpec::Adapter(BackendChoice::Gl, 0),
    ];
    for bn in [BnMode::Batch, BnMode::Running] {
        let p = problem(bn);
        let Some(ctx) = gpu_context(BackendChoice::Vulkan) else {
            return;
        };
        if gpu_context(BackendChoice::Gl).is_none() {
            return;
        }
        let mut single =
            hesscope::gpu::GpuEngine::with_options(ctx, &p, EngineOptions::default()).unwrap();
        let t = std::time::Instant::now();
        let mut two = MultiEngine::open(&p, &specs, gpu_factory).unwrap();
        let open_two = t.elapsed().as_secs_f64();
        let worst = compare(&mut two, &mut single);
        let mut cpu = CpuReference::new(p.clone());
        let vs_f64 = compare(&mut two, &mut cpu);
        eprintln!(
            "vulkan:0,gl:0 vs vulkan:0 ({bn:?}): {worst:.2e}; vs float64 {vs_f64:.2e} \
             (opened in {open_two:.2} s)"
        );
        assert!(vs_f64 <= F32_TOL, "{bn:?} vs float64: {vs_f64:.3e}");
        assert!(worst <= 2.0 * F32_TOL, "{bn:?}: {worst:.3e}");
        let d1 = two.decision_report().unwrap().unwrap();
        let d0 = single.decision_report().unwrap().unwrap();
        assert_eq!(d1.decisions, d0.decisions);
        assert!(two.backend() == "vulkan:0,gl:0");
        assert!(two.adapter().contains(" + "), "{}", two.adapter());
    }
}

/// trace-grad's third derivatives (central differences of Hv along each
/// probe, decisions held) with `--devices cpu,cpu` against `--backend
/// cpu`. The differences divide the products' 1e-16 disagreement by the
/// finite-difference step (Richardson levels down to ~1e-4 of θ's scale),
/// so the tolerance is looser than a product's: 1e-11 (2.6e-14 seen),
/// where a worker that did not move θ or hold its decisions errs by ≥ 1e-3.
#[test]
fn cli_trace_grad_on_two_float64_engines() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures_dir().join("cnn-tiny/data.safetensors");
    let weights = fixtures_dir().join("cnn-tiny/weights.safetensors");
    let model = hesscope::model::Model::load("cnn-tiny").unwrap();
    let mut g = vec![];
    for (which, flags) in [
        ("one", ["--backend", "cpu"]),
        ("two", ["--devices", "cpu,cpu"]),
    ] {
        let out = dir.path().join(format!("tg-{which}.safetensors"));
        let mut args: Vec<String> = [
            "trace-grad",
            "--model",
            "cnn-tiny",
            "--data",
            data.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--batch",
            "24",
            "--probes",
            "1",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(flags.iter().map(|s| s.to_string()));
        let (ok, _, err) = hesscope(&args);
        assert!(ok, "{err}");
        g.push(hesscope::model::params::load_vector(&model, &out).unwrap());
    }
    let e = rel_err(&g[1], &g[0]);
    eprintln!("trace-grad --devices cpu,cpu vs --backend cpu: {e:.2e}");
    assert!(e <= 1e-11, "{e:.3e}");
}

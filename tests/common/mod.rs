//! Helpers shared by the integration tests: the PyTorch fixtures.
#![allow(dead_code)]

pub mod gpu;
pub mod onnx_ref;
pub mod python;

use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Problem};
use hesscope::model::{params, Model, Weights};
use std::path::{Path, PathBuf};

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// Every (model, bn mode) pair the fixtures hold a full reference for
/// (`reference.json`: the built-in models). The networks no one here
/// wrote (`tv-resnet18-trunc`, ...) have their own tests
/// (`tests/decisions.rs`).
pub fn fixture_cases() -> Vec<(String, BnMode)> {
    let mut out = vec![];
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("../shared/fixtures must exist (see README)")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("meta.json").exists())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    dirs.sort();
    for d in dirs {
        for (sub, mode) in [
            ("ref-batch", BnMode::Batch),
            ("ref-running", BnMode::Running),
        ] {
            // The fixtures README's `ref-<bn>/` form (reference.json, grad,
            // hv, ...); the third-party networks' `ref-<bn>/` folders hold
            // loss/grad/hv safetensors only and have their own tests.
            if fixtures_dir()
                .join(&d)
                .join(sub)
                .join("reference.json")
                .exists()
            {
                out.push((d.clone(), mode));
            }
        }
    }
    out
}

pub fn ref_dir(model: &str, bn: BnMode) -> PathBuf {
    fixtures_dir().join(model).join(match bn {
        BnMode::Batch => "ref-batch",
        BnMode::Running => "ref-running",
    })
}

pub fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn meta(model: &str) -> serde_json::Value {
    json(fixtures_dir().join(model).join("meta.json"))
}

pub fn problem(model_name: &str, bn: BnMode) -> Problem {
    let dir = fixtures_dir().join(model_name);
    let model = Model::load(model_name).unwrap();
    let weights = Weights::load(&model, &dir.join("weights.safetensors")).unwrap();
    let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
    let batch = meta(model_name)["batch"].as_u64().unwrap() as usize;
    Problem::new(model, weights, data, batch, bn).unwrap()
}

pub fn vector(p: &Problem, path: PathBuf) -> Vec<f64> {
    params::load_vector(&p.model, &path).unwrap()
}

pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The GPU adapter of a backend for tests. Without one, a test is skipped
/// with a message on a developer machine, but fails under `CI=true`: CI
/// installs Mesa's software drivers, so a missing adapter there is a
/// broken setup, never a pass.
pub fn gpu_context(choice: hesscope::gpu::BackendChoice) -> Option<hesscope::gpu::GpuContext> {
    match hesscope::gpu::GpuContext::open(choice, 0) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            skip(&format!("no {choice:?} adapter ({e})"));
            None
        }
    }
}

/// Whether this run is CI's (`CI=true`, as `.ci/run` sets it).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Every skip of a test goes through here: under `CI=true` it fails (CI
/// installs Mesa's software drivers, so a GPU test that cannot run there
/// is a broken setup, never a pass); elsewhere it prints what was skipped.
pub fn skip(what: &str) {
    assert!(!under_ci(), "CI=true but a test would skip: {what}");
    eprintln!("SKIPPED: {what}");
}

/// Whether a backend's first adapter is a CPU emulator (lavapipe,
/// llvmpipe), for assertions about what `auto` chooses there; None (after
/// [`skip`]) without an adapter.
pub fn is_cpu_adapter(choice: hesscope::gpu::BackendChoice) -> Option<bool> {
    gpu_context(choice).map(|c| c.is_cpu_adapter())
}

/// The backends every GPU test runs on: lavapipe and llvmpipe in CI.
pub const GPU_BACKENDS: [hesscope::gpu::BackendChoice; 2] = [
    hesscope::gpu::BackendChoice::Vulkan,
    hesscope::gpu::BackendChoice::Gl,
];

/// Every backend of `GPU_BACKENDS` that has an adapter here, named
/// (`gpu_context` decides what a missing one means).
pub fn gpu_contexts() -> Vec<(String, hesscope::gpu::GpuContext)> {
    GPU_BACKENDS
        .iter()
        .filter_map(|&c| gpu_context(c).map(|ctx| (format!("{c:?}"), ctx)))
        .collect()
}

/// Runs the built binary: (success, stdout, stderr).
pub fn hesscope<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A train-sgd fixture's folder (PyTorch SGD trajectories).
pub fn train_dir(model: &str) -> PathBuf {
    fixtures_dir().join(model).join("train-sgd")
}

/// `hesscope train` with a train-sgd fixture's recipe (file order), its
/// weights and data, on `backend`, into `out`.
pub fn fixture_args(model: &str, out: &Path, backend: &str) -> Vec<String> {
    let fx = fixtures_dir().join(model);
    let j = json(train_dir(model).join("train.json"));
    let mut a: Vec<String> = [
        "train",
        "--backend",
        backend,
        "--model",
        model,
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
        "--no-shuffle",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, key) in [
        ("--epochs", "epochs"),
        ("--batch", "batch"),
        ("--lr", "lr"),
        ("--momentum", "momentum"),
        ("--weight-decay", "weight_decay"),
        ("--lr-gamma", "lr_gamma"),
    ] {
        a.push(flag.into());
        a.push(j[key].to_string());
    }
    a.push("--milestones".into());
    for m in j["milestones"].as_array().unwrap() {
        a.push(m.to_string());
    }
    a
}

/// The newest complete checkpoint's epoch in a train run's folder (0: none).
pub fn latest_epoch(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_prefix("epoch-")?
                .strip_suffix(".json")?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Starts `hesscope train` with `args` (writing into `dir`), SIGKILLs it
/// once its first checkpoint is complete (failing if that takes over
/// `limit_s` seconds or the run ends first), and returns the epoch of its
/// newest checkpoint.
pub fn kill_after_first_checkpoint(args: &[String], dir: &Path, limit_s: u64) -> usize {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = dir.join("checkpoints/epoch-1.json");
    let t0 = std::time::Instant::now();
    while !first.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed().as_secs() < limit_s, "no first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    latest_epoch(dir)
}

/// One of PyTorch's trace-grad fixtures (`<ref dir>/<tag>/third.json`):
/// the problem, the probes (each checked against the fixture's layer
/// set), the expected gradient, and the fixture's JSON.
pub struct ThirdFixture {
    pub problem: Problem,
    pub set: hesscope::trace_grad::LayerSet,
    pub probes: Vec<Vec<f64>>,
    pub want: Vec<f64>,
    pub json: serde_json::Value,
}

pub fn third_fixture(model: &str, bn: BnMode, tag: &str) -> ThirdFixture {
    let p = problem(model, bn);
    let dir = ref_dir(model, bn).join(tag);
    let j = json(dir.join("third.json"));
    let set =
        hesscope::trace_grad::LayerSet::parse(&p.model, j["layers"].as_str().unwrap()).unwrap();
    let probes: Vec<Vec<f64>> = j["files"]["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| vector(&p, dir.join(f.as_str().unwrap())))
        .collect();
    for (k, v) in probes.iter().enumerate() {
        set.check_probe(&p.model, v, &format!("probe {k}")).unwrap();
    }
    let want = vector(&p, dir.join("trace_grad.safetensors"));
    ThirdFixture {
        problem: p,
        set,
        probes,
        want,
        json: j,
    }
}

/// A JSON array of numbers.
pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The dense Hessian by the float64 reference, columns in parallel (the
/// reference pass is `&self`), symmetrised, as a dense operator.
pub fn dense_hessian(cpu: &hesscope::cpu::CpuReference) -> hesscope::spectral::DenseOperator {
    use rayon::prelude::*;
    let n = cpu.problem.model.n_params;
    let cols: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|j| {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            cpu.pass(Some(&e)).unwrap().hv.unwrap()
        })
        .collect();
    let mut a = vec![0.0; n * n];
    for (j, c) in cols.iter().enumerate() {
        for i in 0..n {
            a[i * n + j] = c[i];
        }
    }
    for i in 0..n {
        for j in 0..i {
            let m = 0.5 * (a[i * n + j] + a[j * n + i]);
            a[i * n + j] = m;
            a[j * n + i] = m;
        }
    }
    hesscope::spectral::DenseOperator { n, a }
}

/// `train` on cnn-tiny as the data-parallel tests run it (tests/
/// train_parallel.rs, tests/mpi.rs): 23 samples in mini-batches of 5 (so
/// 2 or 3 workers get uneven parts, the last mini-batch 3 samples),
/// momentum, weight decay, a milestone, shuffled, 3 epochs, float64,
/// written to `out`; `extra` appended (the backend or `--devices`).
#[allow(dead_code)]
pub fn parallel_train_args(out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let fx = fixtures_dir().join("cnn-tiny");
    let mut a: Vec<String> = [
        "train",
        "--model",
        "cnn-tiny",
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
        "--samples",
        "23",
        "--batch",
        "5",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--weight-decay",
        "5e-4",
        "--milestones",
        "2",
        "--seed",
        "7",
        "--dtype",
        "f64",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

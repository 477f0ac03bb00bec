//! MPI ranks (feature `mpi`): `mpirun -n 2 hesscope ...` against one
//! process, on cnn-tiny's fixture in batches of 24 (three batches of 24,
//! 24 and 16 samples: rank 0 takes 24, rank 1 40). Run with
//! `cargo test --features mpi --test mpi` where OpenMPI's `mpirun` is
//! installed (`.ci/run` installs it); as root OpenMPI needs
//! OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which
//! the tests set.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// As tests/multi_device.rs: float64 ranks each sum their batches in the
/// single process's order with 1/n_r, weighted by n_r/N: a few float64
/// roundings apart (≈1e-16), where a missing or misweighted batch errs
/// by ≥ 1e-2.
const F64_TOL: f64 = 1e-12;

/// Float32 ranks on lavapipe against one lavapipe process: the same
/// kernels on the same batches, summed in another order in float64; both
/// within the kernels' 1e-5 of float64, so within 2e-5 of each other.
const F32_TOL: f64 = 2e-5;

/// Runs `hesscope ARGS` under `mpirun -n ranks` (None: plain).
fn run(ranks: Option<usize>, args: &[String]) -> (bool, String, String) {
    let bin = env!("CARGO_BIN_EXE_hesscope");
    let mut c = match ranks {
        Some(n) => {
            let mut c = Command::new("mpirun");
            c.args(["--oversubscribe", "-n", &n.to_string(), bin]);
            c
        }
        None => Command::new(bin),
    };
    let out = c
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun must be installed for `--features mpi` tests (openmpi-bin)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn args(cmd: &str, extra: &[&str], out: &Path) -> Vec<String> {
    let data = fixtures_dir().join("cnn-tiny/data.safetensors");
    let weights = fixtures_dir().join("cnn-tiny/weights.safetensors");
    let mut a: Vec<String> = vec![
        cmd.into(),
        "--model".into(),
        "cnn-tiny".into(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--weights".into(),
        weights.to_str().unwrap().into(),
        "--batch".into(),
        "24".into(),
        "--json".into(),
        "--out".into(),
        out.to_str().unwrap().into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn numbers(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| numbers(x, out)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                if !k.contains("seconds") {
                    numbers(x, out)
                }
            }
        }
        _ => {}
    }
}

/// Hv and a density on 2 ranks (and `more`) against one process, on
/// `flags`' engine.
fn ranks_equal_one(flags: &[&str], tol: f64, more: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let model = hesscope::model::Model::load("cnn-tiny").unwrap();
    let mut hv = vec![];
    let mut stdout = vec![];
    for ranks in [None, Some(2)].into_iter().chain(more.map(Some)) {
        let out = dir
            .path()
            .join(format!("hv-{}.safetensors", ranks.unwrap_or(1)));
        let (ok, so, err) = run(ranks, &args("hvp", flags, &out));
        assert!(ok, "{ranks:?}: {err}");
        hv.push(hesscope::model::params::load_vector(&model, &out).unwrap());
        stdout.push(so);
    }
    // Only rank 0 prints: one JSON object.
    let j: serde_json::Value = serde_json::from_str(stdout[1].trim()).unwrap();
    assert!(j["backend"].as_str().unwrap().starts_with("mpi:2x"), "{j}");
    for (i, h) in hv.iter().enumerate().skip(1) {
        let e = rel_err(h, &hv[0]);
        eprintln!("hvp {flags:?}: run {i} (2 ranks, then {more:?}) vs 1 process {e:.2e}");
        assert!(e <= tol, "{e:.3e}");
    }
    let mut dens = vec![];
    for ranks in [None, Some(2)].into_iter().chain(more.map(Some)) {
        let out = dir
            .path()
            .join(format!("density-{}.json", ranks.unwrap_or(1)));
        let mut extra = flags.to_vec();
        extra.extend(["--steps", "12", "--runs", "2"]);
        let (ok, _, err) = run(ranks, &args("density", &extra, &out));
        assert!(ok, "{ranks:?}: {err}");
        let mut v = vec![];
        numbers(&json(out)["runs"], &mut v);
        dens.push(v);
    }
    assert!(!dens[0].is_empty());
    for (i, d) in dens.iter().enumerate().skip(1) {
        assert_eq!(dens[0].len(), d.len());
        let e = rel_err(d, &dens[0]);
        eprintln!("density {flags:?}: run {i} (2 ranks, then {more:?}) vs 1 process {e:.2e}");
        assert!(e <= tol, "{e:.3e}");
    }
}

#[test]
fn two_float64_ranks_equal_one_process() {
    // 4 ranks over 3 batches: one rank idles, the sum is whole.
    ranks_equal_one(&["--backend", "cpu"], F64_TOL, Some(4));
}

#[test]
fn two_lavapipe_ranks_equal_one_process() {
    if gpu_context(hesscope::gpu::BackendChoice::Vulkan).is_none() {
        return;
    }
    ranks_equal_one(&["--backend", "vulkan"], F32_TOL, None);
}

#[test]
fn a_failing_rank_ends_every_rank_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hv.safetensors");
    // Rank 1 fails building its engine (a fault injected for this test).
    let a = args("hvp", &["--backend", "cpu"], &out);
    let bin = env!("CARGO_BIN_EXE_hesscope");
    let t = std::time::Instant::now();
    let o = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-n",
            "2",
            "-x",
            "HESSCOPE_TEST_FAIL_RANK=1",
            bin,
        ])
        .args(&a)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("MPI rank 1: cpu: ") && err.contains("injected failure"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 60, "no hang");
    assert!(!out.exists(), "no output after a failure");
    // A command that runs in one process only: refused on every rank.
    let (ok, _, err) = run(Some(2), &["selftest".into()]);
    assert!(!ok);
    assert!(
        err.contains("runs in one process, not over 2 MPI ranks"),
        "{err}"
    );
}

/// Data-parallel `train` (issue 28 item 3; tests/train_parallel.rs for
/// the method): cnn-tiny, 23 samples in mini-batches of 5 (each split
/// 2 + 3 over the ranks, the last 1 + 2), momentum and weight decay,
/// shuffled, 3 epochs.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = parallel_train_args(out, &["--json"]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `mpirun -n 2 hesscope train --backend cpu` against `--devices cpu,cpu`
/// in one process: the same parts summed in the same order (worker order
/// from zero, `multi::train`), so the same bits; against one worker within
/// tests/train_parallel.rs's 1e-12 (float64 rounding of the split sums;
/// unsynchronised batch norm errs by > 1e-3). Only rank 0 writes: a
/// second writer would find the run folder locked and fail, and only one
/// JSON line reaches stdout.
#[test]
fn train_over_two_ranks_equals_two_threads_and_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (mpi, threads, one) = (
        dir.path().join("mpi"),
        dir.path().join("threads"),
        dir.path().join("one"),
    );
    let (ok, so, err) = run(Some(2), &train_args(&mpi, &["--backend", "cpu"]));
    assert!(ok, "{err}");
    assert_eq!(so.trim().lines().count(), 1, "{so}");
    let (ok, _, err) = run(None, &train_args(&threads, &["--devices", "cpu,cpu"]));
    assert!(ok, "{err}");
    let (ok, _, err) = run(None, &train_args(&one, &["--backend", "cpu"]));
    assert!(ok, "{err}");
    for f in ["final.safetensors", "final.optim.safetensors"] {
        assert!(
            std::fs::read(mpi.join(f)).unwrap() == std::fs::read(threads.join(f)).unwrap(),
            "{f}: 2 ranks and 2 threads differ"
        );
    }
    let losses = |d: &Path| f64s(&json(d.join("trajectory.json"))["step_losses"]);
    assert_eq!(losses(&mpi).len(), 15);
    let e = rel_err(&losses(&mpi), &losses(&one));
    eprintln!("train over 2 ranks against one worker: step losses {e:.2e}");
    assert!(e <= F64_TOL, "{e:.3e}");
    // θ and the running buffers, by name (BTreeMap order).
    let state = |d: &Path| -> Vec<f64> {
        hesscope::model::tensorio::read(&d.join("final.safetensors"))
            .unwrap()
            .into_values()
            .flat_map(|t| t.data)
            .collect()
    };
    let e = rel_err(&state(&mpi), &state(&one));
    eprintln!("train over 2 ranks against one worker: final state {e:.2e}");
    assert!(e <= F64_TOL, "{e:.3e}");
}

/// A rank failing its step ends both ranks with that rank's message
/// (agreed before the step's collectives), promptly, writing no final
/// state.
#[test]
fn a_failing_training_rank_ends_both_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let t = std::time::Instant::now();
    let o = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-n",
            "2",
            "-x",
            "HESSCOPE_TEST_FAIL_TRAIN_RANK=1",
            env!("CARGO_BIN_EXE_hesscope"),
        ])
        .args(train_args(&out, &["--backend", "cpu"]))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("MPI rank 1") && err.contains("injected failure"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 60, "no hang");
    assert!(!out.join("final.safetensors").exists());
}

/// `mpirun -n 2 --devices vulkan:0,gl:0` (rank 0 on lavapipe, rank 1 on
/// llvmpipe) against the same list in one process (two threads): the
/// same batches on the same adapters, and the sum of two weighted terms
/// is the same in either order, so the two Hv agree to float64 rounding
/// (1e-15), not merely float32's: a rank that took other batches, or the
/// other rank's device, errs by ≥ 1e-7.
#[test]
fn ranks_on_two_emulators_equal_the_same_list_in_one_process() {
    use hesscope::gpu::BackendChoice;
    if gpu_context(BackendChoice::Vulkan).is_none() || gpu_context(BackendChoice::Gl).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = hesscope::model::Model::load("cnn-tiny").unwrap();
    let mut hv = vec![];
    for ranks in [None, Some(2)] {
        let out = dir
            .path()
            .join(format!("hv-{}.safetensors", ranks.unwrap_or(1)));
        let (ok, so, err) = run(ranks, &args("hvp", &["--devices", "vulkan:0,gl:0"], &out));
        assert!(ok, "{ranks:?}: {err}");
        let j: serde_json::Value = serde_json::from_str(so.trim()).unwrap();
        eprintln!("{ranks:?}: {} on {}", j["backend"], j["adapter"]);
        hv.push(hesscope::model::params::load_vector(&model, &out).unwrap());
    }
    let e = rel_err(&hv[1], &hv[0]);
    eprintln!("hvp --devices vulkan:0,gl:0: 2 ranks vs 2 threads {e:.2e}");
    assert!(e <= 1e-15, "{e:.3e}");
}

/// Issue 28 item 4: at a basis budget too small for a whole basis, 2 and
/// 3 ranks (1400 parameters: slices of 700, or 466, 467 and 467) keep a
/// slice of every Lanczos vector and gather the dot products' partial
/// sums. Density (SLQ, 2 runs in lockstep) and eigs (single-vector and
/// block Lanczos) equal the single process's whole float64 basis within
/// 1e-12: the same products (summed over ranks to rounding, see
/// F64_TOL), the dot products summed in another order (per-rank partials,
/// each compensated); a slice lost or misplaced errs by O(1).
#[test]
fn sharded_bases_on_two_and_three_ranks_equal_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let model = hesscope::model::Model::load("cnn-tiny").unwrap();
    let n = model.n_params;
    // Bytes → GiB for --basis-budget: 0.6 of the whole f64 basis, which
    // holds a slice over 2 or 3 ranks (≤ 0.5 + one entry) but not the
    // whole.
    let gib = |bytes: usize| format!("{:.12}", 0.6 * bytes as f64 / (1u64 << 30) as f64);
    // density: 2 bases of 13 vectors; eigs --steps 60 --block 2: 63.
    let density_budget = gib(n * 13 * 2 * 8);
    let eigs_budget = gib(n * 63 * 8);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "density",
            vec!["--steps", "12", "--runs", "2", "--block", "2"],
            &density_budget,
        ),
        (
            "eigs",
            vec!["--top", "2", "--steps", "60", "--block", "1"],
            &eigs_budget,
        ),
        (
            "eigs",
            vec!["--top", "2", "--steps", "60", "--block", "2"],
            &eigs_budget,
        ),
    ];
    for (cmd, extra, budget) in cases {
        let mut results = vec![];
        for ranks in [None, Some(2), Some(3)] {
            let tag = format!("{cmd}-{}-{}", extra.join(""), ranks.unwrap_or(1));
            let out = dir.path().join(format!("{tag}.json"));
            let vectors = dir.path().join(format!("{tag}.safetensors"));
            let mut flags: Vec<&str> = vec!["--backend", "cpu"];
            flags.extend(&extra);
            if ranks.is_some() {
                flags.extend(["--basis-budget", budget]);
            }
            if cmd == "eigs" {
                flags.extend(["--vectors", vectors.to_str().unwrap()]);
            }
            let (ok, _, err) = run(ranks, &args(cmd, &flags, &out));
            assert!(ok, "{cmd} {ranks:?}: {err}");
            let j = json(out);
            let basis = j["basis"].as_str().unwrap().to_string();
            let want = match ranks {
                None => "host f64".to_string(),
                Some(r) => format!("host f64 sharded over {r} MPI ranks"),
            };
            assert_eq!(basis, want, "{cmd} {extra:?}");
            let mut v = vec![];
            if cmd == "density" {
                numbers(&j["runs"], &mut v);
            } else {
                numbers(&j["eigenvalues"], &mut v);
                for t in hesscope::model::tensorio::read(&vectors)
                    .unwrap()
                    .into_values()
                {
                    v.extend(t.data);
                }
            }
            results.push(v);
        }
        assert!(!results[0].is_empty());
        for (i, r) in results.iter().enumerate().skip(1) {
            assert_eq!(results[0].len(), r.len());
            let e = rel_err(r, &results[0]);
            eprintln!(
                "sharded {cmd} {extra:?}: {} ranks vs one process {e:.2e}",
                i + 1
            );
            assert!(e <= F64_TOL, "{e:.3e}");
        }
    }
}

//! Curvature along training (`hesscope train --spectrum-every`): which
//! epochs get a record, what a record holds, and that each one is the
//! Hessian of the data loss over the stated subset at that epoch's
//! weights: the same numbers `hesscope density/eigs/trace` give on the
//! epoch's checkpoint with `--samples N` (same solvers, seeds and float64
//! reference). Tolerance 1e-12 relative for those comparisons: both sides
//! are the same float64 computation on the same data and weights (the
//! checkpoint's float64 state), so they agree to rounding, and a record
//! taken at other weights, over other samples, in another BN mode or with
//! weight decay mixed in differs by far more (asserted for the last two).

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

const TOL: f64 = 1e-12;

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn args(model: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let fx = fixtures_dir().join(model);
    let mut a: Vec<String> = [
        "train",
        "--backend",
        "cpu",
        "--model",
        model,
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
        "--dtype",
        "f64",
        "--batch",
        "16",
        "--lr",
        "0.05",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A spectral command on a checkpoint of `run` over the first `samples`.
fn spectral(model: &str, weights: &Path, cmd: &[&str], bn: &str, samples: &str) -> Value {
    let fx = fixtures_dir().join(model);
    let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    a.extend(
        [
            "--backend",
            "cpu",
            "--model",
            model,
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            fx.join("data.safetensors").to_str().unwrap(),
            "--samples",
            samples,
            "--batch",
            "16",
            "--bn",
            bn,
            "--seed",
            "2",
            "--json",
        ]
        .map(String::from),
    );
    let (ok, stdout, stderr) = hesscope(&a);
    assert!(ok, "{cmd:?}: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

const MLP_SPECTRUM: [&str; 20] = [
    "--hessian-samples",
    "48",
    "--steps",
    "20",
    "--runs",
    "2",
    "--top",
    "3",
    "--eigs-steps",
    "120",
    "--probes",
    "8",
    "--layerwise",
    "--seed",
    "2",
    "--weight-decay",
    "1e-3",
    "--grid",
    "300",
    "--no-shuffle",
];

#[test]
fn records_are_the_spectral_commands_on_each_epochs_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut extra = MLP_SPECTRUM.to_vec();
    extra.extend(["--epochs", "3", "--spectrum-every", "2"]);
    let (ok, _, stderr) = hesscope(&args("mlp-tiny", &out, &extra));
    assert!(ok, "{stderr}");
    let t = json(out.join("trajectory.json"));
    // At the start, every 2 epochs, and at the end.
    assert!(t["start"]["curvature"].is_object());
    let has: Vec<bool> = t["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["curvature"].is_object())
        .collect();
    assert_eq!(has, vec![false, true, true]);
    for e in t["epochs"].as_array().unwrap() {
        for k in ["train_loss", "train_accuracy", "lr", "steps", "seconds"] {
            assert!(!e[k].is_null(), "{k}");
        }
    }
    let at = |e: usize| -> (&Value, std::path::PathBuf) {
        if e == 0 {
            (
                &t["start"]["curvature"],
                fixtures_dir().join("mlp-tiny/weights.safetensors"),
            )
        } else {
            (
                &t["epochs"][e - 1]["curvature"],
                out.join(format!("checkpoints/epoch-{e}.safetensors")),
            )
        }
    };
    let mut worst: f64 = 0.0;
    for e in [0, 2, 3] {
        let (c, w) = at(e);
        assert_eq!(c["samples"], 48);
        assert_eq!(c["batch"], 16);
        assert_eq!(c["bn"], "batch");
        assert_eq!(c["backend"], "cpu");
        assert_eq!(c["weight_decay_shift"].as_f64().unwrap(), 1e-3);
        let (grid, dens) = (floats(&c["grid"]), floats(&c["density"]));
        assert_eq!(grid.len(), 300);
        let mass: f64 = grid
            .windows(2)
            .zip(dens.windows(2))
            .map(|(g, d)| 0.5 * (g[1] - g[0]) * (d[0] + d[1]))
            .sum();
        assert!((mass - 1.0).abs() < 1e-12, "mass {mass}");
        let eig = spectral(
            "mlp-tiny",
            &w,
            &["eigs", "--top", "3", "--steps", "120"],
            "batch",
            "48",
        );
        let den = spectral(
            "mlp-tiny",
            &w,
            &["density", "--steps", "20", "--runs", "2"],
            "batch",
            "48",
        );
        let tr = spectral("mlp-tiny", &w, &["trace", "--probes", "8"], "batch", "48");
        let pairs = [
            (floats(&c["top_eigenvalues"]), floats(&eig["eigenvalues"])),
            (
                floats(&c["grad_frac_in_top_k"]),
                floats(&eig["grad_frac_in_top_k"]),
            ),
            (
                vec![
                    c["lambda_max"].as_f64().unwrap(),
                    c["slq_trace"].as_f64().unwrap(),
                    c["slq_trace_stderr"].as_f64().unwrap(),
                    c["negative_mass_stderr"].as_f64().unwrap(),
                ],
                vec![
                    den["lambda_max"].as_f64().unwrap(),
                    den["trace"].as_f64().unwrap(),
                    den["trace_stderr"].as_f64().unwrap(),
                    den["negative_mass_stderr"].as_f64().unwrap(),
                ],
            ),
            (
                vec![c["trace"].as_f64().unwrap()],
                vec![tr["traces"][0]["estimates"]["hutchinson"]["estimate"]
                    .as_f64()
                    .unwrap()],
            ),
        ];
        for (got, want) in pairs {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let r = rel(*g, *w);
                worst = worst.max(r);
                assert!(r <= TOL, "epoch {e}: {got:?} vs {want:?}");
            }
        }
        // Residuals are true ones and small.
        for r in floats(&c["residuals"]) {
            assert!(r <= 1e-6 * floats(&c["top_eigenvalues"])[0].abs(), "{r}");
        }
        // Each module: its block's λmax and trace.
        let layers = c["layers"].as_array().unwrap();
        assert_eq!(
            layers
                .iter()
                .map(|l| l["module"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["fc1", "fc2", "fc3"]
        );
        let fc2 = &layers[1];
        let e2 = spectral(
            "mlp-tiny",
            &w,
            &["eigs", "--top", "1", "--steps", "120", "--layer", "fc2"],
            "batch",
            "48",
        );
        let t2 = spectral(
            "mlp-tiny",
            &w,
            &["trace", "--probes", "8", "--layer", "fc2"],
            "batch",
            "48",
        );
        for (g, w) in [
            (
                fc2["lambda_max"].as_f64().unwrap(),
                e2["eigenvalues"][0].as_f64().unwrap(),
            ),
            (
                fc2["trace"].as_f64().unwrap(),
                t2["traces"][0]["estimates"]["hutchinson"]["estimate"]
                    .as_f64()
                    .unwrap(),
            ),
        ] {
            worst = worst.max(rel(g, w));
            assert!(rel(g, w) <= TOL, "fc2 at epoch {e}: {g} vs {w}");
        }
    }
    println!("curvature records vs the spectral commands: worst {worst:.1e}");
    // The records moved with training, and not by the weight decay shift.
    let (l0, l3) = (
        at(0).0["top_eigenvalues"][0].as_f64().unwrap(),
        at(3).0["top_eigenvalues"][0].as_f64().unwrap(),
    );
    assert!(rel(l3, l0) > 1e-3, "{l0} {l3}");
    // Against the spectral command over other samples: not the same.
    let (c, w) = at(3);
    let other = spectral(
        "mlp-tiny",
        &w,
        &["eigs", "--top", "3", "--steps", "120"],
        "batch",
        "64",
    );
    assert!(
        rel(
            c["top_eigenvalues"][0].as_f64().unwrap(),
            other["eigenvalues"][0].as_f64().unwrap()
        ) > 1e-6
    );
    // The plots.
    let d = std::fs::read_to_string(out.join("densities.svg")).unwrap();
    for e in ["epoch 0", "epoch 2", "epoch 3"] {
        assert!(d.contains(e), "densities.svg lacks {e}");
    }
    assert!(!d.contains("epoch 1<"));
    let c = std::fs::read_to_string(out.join("curvature.svg")).unwrap();
    for k in ["λmax", "trace", "‖g‖² fraction", "module λmax", "fc2"] {
        assert!(c.contains(k), "curvature.svg lacks {k}");
    }
    let tsvg = std::fs::read_to_string(out.join("training.svg")).unwrap();
    assert!(tsvg.contains("accuracy") && tsvg.starts_with("<svg"));
}

#[test]
fn zero_means_start_and_end_and_resume_keeps_the_records() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let run = |dir: &Path, epochs: &str, resume: bool| {
        let mut extra = MLP_SPECTRUM.to_vec();
        extra.retain(|x| *x != "--layerwise");
        extra.extend(["--epochs", epochs, "--spectrum-every", "0"]);
        let d = dir.to_str().unwrap().to_string();
        if resume {
            extra.extend(["--resume", &d]);
        }
        let (ok, _, stderr) = hesscope(&args("mlp-tiny", dir, &extra));
        assert!(ok, "{stderr}");
    };
    run(&a, "3", false);
    run(&b, "2", false);
    let tb = json(b.join("trajectory.json"));
    let has: Vec<bool> = tb["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["curvature"].is_object())
        .collect();
    assert_eq!(has, vec![false, true], "0: the end only (and the start)");
    assert_eq!(tb["finished"], true);
    assert!(tb["start"]["curvature"].is_object());
    run(&b, "3", true);
    let (ta, tb) = (
        json(a.join("trajectory.json")),
        json(b.join("trajectory.json")),
    );
    let strip = |mut v: Value| {
        v["seconds"] = Value::Null;
        v
    };
    // The start record is kept from the first run and equals the
    // uninterrupted run's (the same deterministic computation).
    let (sa, sb) = (
        strip(ta["start"]["curvature"].clone()),
        strip(tb["start"]["curvature"].clone()),
    );
    assert_eq!(sa, sb);
    let ends: Vec<bool> = tb["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["curvature"].is_object())
        .collect();
    // The resumed run keeps epoch 2's record (the end of the first run).
    assert_eq!(ends, vec![false, true, true]);
    assert_eq!(
        strip(ta["epochs"][2]["curvature"].clone()),
        strip(tb["epochs"][2]["curvature"].clone())
    );
    // Without --spectrum-every: no curvature, no curvature plots; and with
    // stderr not a terminal, no progress bar on it.
    let c = tmp.path().join("c");
    let (ok, _, stderr) = hesscope(&args("mlp-tiny", &c, &["--epochs", "1"]));
    assert!(ok, "{stderr}");
    assert!(
        !stderr.contains("samples/s") && !stderr.contains("steps"),
        "{stderr}"
    );
    let tc = json(c.join("trajectory.json"));
    assert!(tc["epochs"][0]["curvature"].is_null() && tc["start"]["curvature"].is_null());
    assert!(c.join("training.svg").exists() && !c.join("densities.svg").exists());
}

#[test]
fn running_statistics_mode_is_recorded_and_used() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, stderr) = hesscope(&args(
        "cnn-tiny",
        &out,
        &[
            "--epochs",
            "1",
            "--spectrum-every",
            "0",
            "--hessian-bn",
            "running",
            "--hessian-samples",
            "32",
            "--steps",
            "8",
            "--runs",
            "1",
            "--top",
            "2",
            "--eigs-steps",
            "60",
            "--probes",
            "2",
            "--seed",
            "2",
            "--no-shuffle",
        ],
    ));
    assert!(ok, "{stderr}");
    let t = json(out.join("trajectory.json"));
    let c = &t["epochs"][0]["curvature"];
    assert_eq!(c["bn"], "running");
    let w = out.join("checkpoints/epoch-1.safetensors");
    let cmd = ["eigs", "--top", "2", "--steps", "60"];
    let run = spectral("cnn-tiny", &w, &cmd, "running", "32");
    let got = floats(&c["top_eigenvalues"]);
    let want = floats(&run["eigenvalues"]);
    for (g, w) in got.iter().zip(&want) {
        assert!(rel(*g, *w) <= TOL, "{got:?} vs {want:?}");
    }
    let batch = spectral("cnn-tiny", &w, &cmd, "batch", "32");
    assert!(rel(got[0], batch["eigenvalues"][0].as_f64().unwrap()) > 1e-6);
}

#[test]
fn bad_spectrum_flags_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for (extra, want) in [
        (vec!["--grid", "1"], "invalid --grid"),
        (vec!["--tol", "2"], "invalid --tol"),
        (vec!["--top", "0"], "invalid --top"),
        (vec!["--top", "5000"], "invalid --top"),
        (vec!["--hessian-samples", "0"], "invalid --hessian-samples"),
        (vec!["--steps", "0"], "invalid --steps"),
        (vec!["--sigma", "-1"], "invalid --sigma"),
        (vec!["--block", "0"], "invalid --block"),
    ] {
        let mut e = vec!["--epochs", "1", "--spectrum-every", "1"];
        e.extend(extra.iter());
        let (ok, _, stderr) = hesscope(&args("mlp-tiny", &out, &e));
        assert!(!ok, "{extra:?} accepted");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}

#[test]
fn a_gpu_hessian_backend_measures_while_the_reference_trains() {
    // The Hessian on Vulkan (lavapipe in CI) for the weights the float64
    // reference trained; against the reference's own record of the same
    // run. Tolerance 1e-4 relative on λ1 and the Hutchinson trace: the GPU
    // products are float32 (≤ 1e-5 relative per HVP on these shapes,
    // tests/shapes.rs), λ1 is converged to 1e-6·|λ1| residual, so float32
    // products move it by ~1e-5 relative; a record of other weights or
    // another subset is off by > 1e-3 (see the test above).
    if gpu_context(hesscope::gpu::BackendChoice::Vulkan).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut recs = vec![];
    for backend in ["cpu", "vulkan"] {
        let out = tmp.path().join(backend);
        let mut extra = MLP_SPECTRUM.to_vec();
        extra.retain(|x| *x != "--layerwise");
        extra.extend([
            "--epochs",
            "1",
            "--spectrum-every",
            "0",
            "--hessian-backend",
            backend,
        ]);
        let (ok, _, stderr) = hesscope(&args("mlp-tiny", &out, &extra));
        assert!(ok, "{stderr}");
        recs.push(json(out.join("trajectory.json"))["epochs"][0]["curvature"].clone());
    }
    let (cpu, gpu) = (&recs[0], &recs[1]);
    assert_eq!(cpu["backend"], "cpu");
    assert_eq!(gpu["backend"], "vulkan");
    for key in ["loss", "trace"] {
        let (a, b) = (gpu[key].as_f64().unwrap(), cpu[key].as_f64().unwrap());
        println!("{key}: vulkan {a} vs cpu {b} ({:.1e})", rel(a, b));
        assert!(rel(a, b) <= 1e-4, "{key}: {a} vs {b}");
    }
    let (a, b) = (
        gpu["top_eigenvalues"][0].as_f64().unwrap(),
        cpu["top_eigenvalues"][0].as_f64().unwrap(),
    );
    println!("λ1: vulkan {a} vs cpu {b} ({:.1e})", rel(a, b));
    assert!(rel(a, b) <= 1e-4, "λ1 {a} vs {b}");
}

#[test]
fn block_products_give_the_same_records() {
    // --block 4: SLQ runs in lockstep and trace probes four at a time (the
    // same start vectors and probes: equal to rounding, bound 1e-10 as
    // tests/block.rs), block Lanczos for the top eigenvalues (converged to
    // the residual tolerance 1e-6·|λ1| either way, so within 1e-5·|λ1|).
    let tmp = tempfile::tempdir().unwrap();
    let mut recs = vec![];
    for block in ["1", "4"] {
        let out = tmp.path().join(block);
        let mut extra = MLP_SPECTRUM.to_vec();
        extra.extend(["--epochs", "1", "--spectrum-every", "0", "--block", block]);
        let (ok, _, stderr) = hesscope(&args("mlp-tiny", &out, &extra));
        assert!(ok, "{stderr}");
        recs.push(json(out.join("trajectory.json"))["epochs"][0]["curvature"].clone());
    }
    let (one, four) = (&recs[0], &recs[1]);
    assert_eq!(
        (one["block"].clone(), four["block"].clone()),
        (1.into(), 4.into())
    );
    for key in ["trace", "slq_trace", "lambda_max", "lambda_min"] {
        let (a, b) = (four[key].as_f64().unwrap(), one[key].as_f64().unwrap());
        assert!(rel(a, b) <= 1e-10, "{key}: {a} vs {b}");
    }
    let (a, b) = (
        floats(&four["top_eigenvalues"]),
        floats(&one["top_eigenvalues"]),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * b[0].abs(), "{a:?} vs {b:?}");
    }
}

/// `--papyan`: at every measurement G's and E's SLQ and G's top
/// eigenvalues, each equal to the spectral commands' `--operator ggn` /
/// `residual` on that epoch's checkpoint (same seed, steps and runs), and
/// H = G + E in the SLQ traces: with the same start vectors each run's
/// quadrature trace is n·q̂ᵀAq̂, linear in A, so the three agree to rounding
/// (1e-10 relative; an operator off by any term breaks it by far more).
#[test]
fn papyan_records_g_and_e_beside_h() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut extra = MLP_SPECTRUM.to_vec();
    extra.retain(|a| *a != "--layerwise");
    extra.extend(["--epochs", "1", "--spectrum-every", "1", "--papyan"]);
    let (ok, stdout, stderr) = hesscope(&args("mlp-tiny", &out, &extra));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("G outliers"), "{stdout}");
    let t = json(out.join("trajectory.json"));
    let records = [
        (
            &t["start"]["curvature"],
            fixtures_dir().join("mlp-tiny/weights.safetensors"),
        ),
        (
            &t["epochs"][0]["curvature"],
            out.join("checkpoints/epoch-1.safetensors"),
        ),
    ];
    for (c, w) in records {
        let p = &c["papyan"];
        assert_eq!(p["classes"], 4);
        let (h, g, e) = (
            c["slq_trace"].as_f64().unwrap(),
            p["ggn"]["slq_trace"].as_f64().unwrap(),
            p["residual"]["slq_trace"].as_f64().unwrap(),
        );
        assert!(rel(g + e, h) <= 1e-10, "H {h} vs G + E {}", g + e);
        // G is positive semi-definite: its Ritz values too.
        let (gmin, gmax) = (
            p["ggn"]["lambda_min"].as_f64().unwrap(),
            p["ggn"]["lambda_max"].as_f64().unwrap(),
        );
        assert!(gmin >= -1e-8 * gmax, "G λmin {gmin}, λmax {gmax}");
        for (op, key) in [("ggn", "ggn"), ("residual", "residual")] {
            let den = spectral(
                "mlp-tiny",
                &w,
                &["density", "--steps", "20", "--runs", "2", "--operator", op],
                "batch",
                "48",
            );
            for k in ["lambda_max", "lambda_min", "negative_mass"] {
                let (got, want) = (p[key][k].as_f64().unwrap(), den[k].as_f64().unwrap());
                assert!(rel(got, want) <= TOL, "{op} {k}: {got} vs {want}");
            }
            let (got, want) = (
                p[key]["slq_trace"].as_f64().unwrap(),
                den["trace"].as_f64().unwrap(),
            );
            assert!(rel(got, want) <= TOL, "{op} trace: {got} vs {want}");
        }
        let top = floats(&p["ggn_top"]);
        assert_eq!(top.len(), 10);
        let eig = spectral(
            "mlp-tiny",
            &w,
            &["eigs", "--top", "10", "--steps", "120", "--operator", "ggn"],
            "batch",
            "48",
        );
        for (a, b) in top.iter().zip(&floats(&eig["eigenvalues"])) {
            assert!(
                rel(*a, *b) <= 1e-6,
                "G's top: {top:?} vs {:?}",
                eig["eigenvalues"]
            );
        }
        assert!(p["outliers"].as_u64().unwrap() <= 10);
    }
    assert!(out.join("curvature.svg").exists());
    let svg = std::fs::read_to_string(out.join("curvature.svg")).unwrap();
    assert!(
        svg.contains("G outliers"),
        "curvature.svg lacks the G/E panels"
    );
    // --papyan is a measurement's: refused without one.
    let out2 = tmp.path().join("run2");
    let (ok, _, stderr) = hesscope(&args("mlp-tiny", &out2, &["--epochs", "1", "--papyan"]));
    assert!(!ok);
    assert!(stderr.contains("--papyan"), "{stderr}");
    assert!(!out2.exists());
}

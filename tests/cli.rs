//! The binary as a user runs it: the spec's flags, JSON output, and errors
//! that name the flag, file or tensor.

mod common;
use common::*;
use std::process::Command;

#[test]
fn hvp_on_a_fixture_writes_hv_and_prints_the_spec_json() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixtures_dir().join("cnn-tiny");
    let out = dir.path().join("hv.safetensors");
    let (ok, stdout, stderr) = hesscope(&[
        "hvp",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--batch",
        "32",
        "--json",
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
        "--vector",
        fx.join("v.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in [
        "loss",
        "grad_norm",
        "hv_norm",
        "vhv",
        "backend",
        "adapter",
        "seconds",
    ] {
        assert!(j.get(key).is_some(), "missing {key} in {j}");
    }
    let r = json(ref_dir("cnn-tiny", hesscope::engine::BnMode::Batch).join("reference.json"));
    assert!((j["vhv"].as_f64().unwrap() - r["v_dot_hv"].as_f64().unwrap()).abs() < 1e-12);
    let p = problem("cnn-tiny", hesscope::engine::BnMode::Batch);
    let hv = vector(&p, out);
    let hv_ref = vector(
        &p,
        ref_dir("cnn-tiny", hesscope::engine::BnMode::Batch).join("hv.safetensors"),
    );
    assert!(rel_err(&hv, &hv_ref) < 1e-10);
}

#[test]
fn a_misshapen_tensor_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixtures_dir().join("cnn-tiny");
    let mut t = hesscope::model::tensorio::read(&fx.join("weights.safetensors")).unwrap();
    let bad = t.get_mut("block2.conv2.weight").unwrap();
    bad.shape = vec![8, 4, 3, 3];
    bad.data.truncate(8 * 4 * 9);
    let w: Vec<_> = t.into_iter().map(|(n, t)| (n, t.shape, t.data)).collect();
    let path = dir.path().join("bad.safetensors");
    hesscope::model::tensorio::write_f64(&path, &w).unwrap();
    let (ok, _, stderr) = hesscope(&[
        "grad",
        "--backend",
        "cpu",
        "--weights",
        path.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--weights")
            && stderr.contains("block2.conv2.weight")
            && stderr.contains("[8, 4, 3, 3]"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_flags_are_named() {
    let (ok, _, stderr) = hesscope(&["grad", "--backend", "cpu", "--model", "resnet99"]);
    assert!(
        !ok && stderr.contains("--model resnet99") && stderr.contains("resnet20"),
        "{stderr}"
    );
    let (ok, _, stderr) = hesscope(&["grad", "--backend", "cpu", "--samples", "0"]);
    assert!(!ok && stderr.contains("--samples"), "{stderr}");
    let (ok, _, stderr) = hesscope(&["grad", "--backend", "cpu", "--batch", "0"]);
    assert!(!ok && stderr.contains("--batch"), "{stderr}");
    let (ok, _, stderr) = hesscope(&[
        "grad",
        "--backend",
        "cpu",
        "--data",
        "/nonexistent/d.safetensors",
    ]);
    assert!(
        !ok && stderr.contains("/nonexistent/d.safetensors"),
        "{stderr}"
    );
}

/// `--basis-budget`: out of range, or too small for the bases even in f32
/// (cnn-tiny: 1400 parameters × 21 vectors × 4 bytes = 117,600 bytes), is
/// refused naming the flag; one that fits only f32 bases runs.
#[test]
fn the_basis_budget_is_checked_and_named() {
    let tiny = [
        "density",
        "--backend",
        "cpu",
        "--steps",
        "20",
        "--runs",
        "1",
        "--samples",
        "16",
        "--json",
    ];
    for bad in ["0", "-1", "nan", "2000"] {
        let (ok, _, stderr) = hesscope(&[&tiny[..], &["--basis-budget", bad]].concat());
        assert!(!ok && stderr.contains("--basis-budget"), "{bad}: {stderr}");
    }
    let (ok, _, stderr) = hesscope(&[
        "trace",
        "--backend",
        "cpu",
        "--samples",
        "16",
        "--basis-budget",
        "1",
    ]);
    assert!(!ok && stderr.contains("--basis-budget"), "{stderr}");
    // 1e-4 GiB = 107,374 bytes: not even the f32 basis.
    let (ok, _, stderr) = hesscope(&[&tiny[..], &["--basis-budget", "0.0001"]].concat());
    assert!(
        !ok && stderr.contains("--basis-budget") && stderr.contains("21 vectors × 1400"),
        "{stderr}"
    );
    // 1.5e-4 GiB = 161,061 bytes: the f32 basis, not the f64 one (235,200).
    let (ok, stdout, stderr) = hesscope(&[&tiny[..], &["--basis-budget", "0.00015"]].concat());
    assert!(ok, "{stderr}");
    let (_, wide, _) = hesscope(&tiny);
    let lmax = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["lambda_max"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (lmax(&stdout), lmax(&wide));
    assert!(
        (a - b).abs() <= 1e-5 * b.abs(),
        "f32 basis {a} vs f64 basis {b}"
    );
}

/// `--basis-on`: device keeps the vectors on the GPU (reported as the
/// adapter's f32) and gives the density and eigenvalues of the host basis;
/// on the float64 reference it is refused naming the flag; auto on a CPU
/// emulator stays on the host.
#[test]
fn the_basis_place_is_chosen_reported_and_checked() {
    // A small density with the basis `on`, and `extra` flags.
    let density = |backend: &str, on: &str, extra: &[&str]| {
        let base = [
            "density",
            "--backend",
            backend,
            "--steps",
            "30",
            "--runs",
            "2",
            "--block",
            "2",
            "--samples",
            "32",
            "--basis-on",
            on,
        ];
        hesscope(&[&base[..], extra].concat())
    };
    let (ok, _, stderr) = density("cpu", "device", &["--json"]);
    assert!(!ok && stderr.contains("--basis-on"), "{stderr}");
    let field = |s: &str, k: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()[k].clone();
    for backend in ["vulkan", "gl"] {
        let choice = match backend {
            "vulkan" => hesscope::gpu::BackendChoice::Vulkan,
            _ => hesscope::gpu::BackendChoice::Gl,
        };
        let Some(emulator) = is_cpu_adapter(choice) else {
            continue;
        };
        let (ok, host, stderr) = density(backend, "host", &["--json"]);
        assert!(ok, "{stderr}");
        let (ok, dev, stderr) = density(backend, "device", &["--json"]);
        assert!(ok, "{stderr}");
        let (ok, auto, stderr) = density(backend, "auto", &["--json"]);
        assert!(ok, "{stderr}");
        assert_eq!(field(&host, "basis"), "host f64", "{backend}");
        // `auto` keeps the bases on the host on an emulator (its device
        // memory is the host's), on the device on a GPU.
        let auto_basis = field(&auto, "basis").as_str().unwrap().to_string();
        if emulator {
            assert_eq!(
                auto_basis, "host f64",
                "{backend}: an emulator keeps the host's"
            );
        } else {
            assert!(
                auto_basis.ends_with(" f32") && !auto_basis.starts_with("host"),
                "{backend}: a GPU keeps them in its memory: {auto_basis}"
            );
        }
        let on = field(&dev, "basis").as_str().unwrap().to_string();
        assert!(
            on.ends_with(" f32") && !on.starts_with("host"),
            "{backend}: {on}"
        );
        let (a, b) = (
            field(&host, "lambda_max").as_f64().unwrap(),
            field(&dev, "lambda_max").as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{backend}: λmax host {a} device {b}"
        );
        let (ok, eig, stderr) = hesscope(&[
            "eigs",
            "--backend",
            backend,
            "--top",
            "2",
            "--samples",
            "32",
            "--json",
            "--basis-on",
            "device",
        ]);
        assert!(ok, "{stderr}");
        assert_eq!(field(&eig, "basis").as_str().unwrap(), on, "{backend}");
        // --basis-budget bounds the device's share too: 1e-4 GiB is less
        // than 2 bases × 31 vectors (+ 2 of workspace) × 1400 × 4 bytes.
        let (ok, _, stderr) = density(backend, "device", &["--basis-budget", "0.0001"]);
        assert!(
            !ok && stderr.contains("--basis-budget") && stderr.contains("31 vectors"),
            "{stderr}"
        );
    }
}

fn fixture_args(dir: &std::path::Path) -> Vec<String> {
    let fx = fixtures_dir().join("cnn-tiny");
    let _ = dir;
    [
        "--model",
        "cnn-tiny",
        "--batch",
        "32",
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn density_writes_the_spec_json_and_an_svg() {
    let dir = tempfile::tempdir().unwrap();
    let (json_path, svg) = (dir.path().join("d.json"), dir.path().join("d.svg"));
    let mut args: Vec<String> = [
        "density",
        "--backend",
        "cpu",
        "--steps",
        "20",
        "--runs",
        "2",
        "--grid",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(fixture_args(dir.path()));
    args.extend([
        "--out".into(),
        json_path.display().to_string(),
        "--plot".into(),
        svg.display().to_string(),
    ]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (ok, stdout, stderr) = hesscope(&a);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("λmax"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let grid: Vec<f64> = v["grid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let dens: Vec<f64> = v["density"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(grid.len(), 500);
    let integral: f64 = grid
        .windows(2)
        .zip(dens.windows(2))
        .map(|(g, d)| 0.5 * (g[1] - g[0]) * (d[0] + d[1]))
        .sum();
    assert!((integral - 1.0).abs() < 1e-9, "{integral}");
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    for key in ["lambda_max", "lambda_min", "trace", "negative_mass"] {
        assert!(v[key].is_number(), "{key}");
    }
    let top = json(ref_dir("cnn-tiny", hesscope::engine::BnMode::Batch).join("reference.json"))
        ["dense"]["lambda_max"]
        .as_f64()
        .unwrap();
    let lmax = v["lambda_max"].as_f64().unwrap();
    assert!(
        lmax <= top * (1.0 + 1e-9) && lmax > 0.9 * top,
        "{lmax} vs {top}"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

#[test]
fn eigs_writes_ritz_vectors_with_parameter_names() {
    let dir = tempfile::tempdir().unwrap();
    let (out, vecs) = (dir.path().join("e.json"), dir.path().join("r.safetensors"));
    let mut args: Vec<String> = ["eigs", "--backend", "cpu", "--top", "3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(fixture_args(dir.path()));
    args.extend([
        "--out".into(),
        out.display().to_string(),
        "--vectors".into(),
        vecs.display().to_string(),
    ]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (ok, _, stderr) = hesscope(&a);
    assert!(ok, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["eigenvalues"].as_array().unwrap().len(), 3);
    assert_eq!(v["converged"], true);
    let bytes = std::fs::read(&vecs).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("conv1.weight").unwrap().shape(), &[3, 4, 3, 3, 3]);
}

#[test]
fn exact_refuses_a_large_model_naming_the_limit_and_layer_flags_are_checked() {
    let (ok, _, stderr) = hesscope(&["exact", "--model", "resnet20", "--samples", "4"]);
    assert!(!ok);
    assert!(
        stderr.contains("--max-params") && stderr.contains("density"),
        "{stderr}"
    );
    let (ok, _, stderr) = hesscope(&[
        "eigs",
        "--backend",
        "cpu",
        "--layer",
        "nosuchlayer",
        "--samples",
        "8",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--layer") && stderr.contains("nosuchlayer"),
        "{stderr}"
    );
}

/// Run with extra environment variables.
fn hesscope_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn auto_without_any_adapter_runs_on_the_cpu_engine() {
    // Hide every Vulkan and EGL driver from the loaders.
    let env = [
        ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
        ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
        ("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent/egl.json"),
        ("RUST_LOG", "off"),
    ];
    let (ok, stdout, _) = hesscope_env(&["devices", "--json"], &env);
    assert!(ok);
    let d: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    if !d["adapters"].as_array().unwrap().is_empty() {
        skip(&format!("adapters remain visible without drivers: {d}"));
        return;
    }
    assert_eq!(d["auto"]["kind"], "cpu", "{d}");
    assert!(
        d["auto"]["reason"]
            .as_str()
            .unwrap()
            .contains("no adapter at all"),
        "{d}"
    );
    let (ok, stdout, stderr) = hesscope_env(
        &["grad", "--model", "mlp-tiny", "--samples", "8", "--json"],
        &env,
    );
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(j["backend"], "cpu");
    assert!(stderr.trim().is_empty(), "{stderr}");
    // selftest needs an adapter: refused, not run on the reference.
    let (ok, _, stderr) = hesscope_env(&["selftest"], &env);
    assert!(!ok && stderr.contains("--backend auto"), "{stderr}");
    // A named GPU backend is an error, not a silent fallback.
    let (ok, _, stderr) = hesscope_env(
        &[
            "grad",
            "--model",
            "mlp-tiny",
            "--samples",
            "8",
            "--backend",
            "vulkan",
        ],
        &env,
    );
    assert!(!ok && stderr.contains("--backend vulkan"), "{stderr}");
}

#[test]
fn help_separates_the_problem_from_the_command_and_its_output() {
    let (ok, stdout, _) = hesscope(&["density", "--help"]);
    assert!(ok);
    let (p, o) = (
        stdout.find("Problem:").expect("a Problem heading"),
        stdout.find("Output:").expect("an Output heading"),
    );
    let model = stdout.find("--model").unwrap();
    let steps = stdout.find("--steps").unwrap();
    let out = stdout.find("--out").unwrap();
    assert!(steps < p && p < model, "{stdout}");
    assert!(o < out, "{stdout}");
    // The short help puts each flag's help on its line.
    let (_, short, _) = hesscope(&["density", "-h"]);
    for flag in ["--backend", "--sigma", "--grid", "--plot", "--out"] {
        let line = short.lines().find(|l| l.contains(flag)).unwrap();
        assert!(
            line.trim().len() > flag.len() + 10,
            "no help for {flag}: {line}"
        );
    }
}

/// Every spectral report keeps the keys the README and scripts use, the
/// same on stdout (--json) and in --out.
#[test]
fn spectral_reports_keep_their_keys_in_json_and_out() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["--backend", "cpu", "--model", "mlp-tiny", "--samples", "16"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["density", "--steps", "6", "--runs", "2", "--grid", "50"],
            vec![
                "lambda_max",
                "lambda_min",
                "trace",
                "trace_stderr",
                "negative_mass",
                "n_params",
                "steps",
                "runs_count",
                "sigma",
                "grid_points",
                "hvps",
                "lanczos_seconds",
                "hvp_seconds",
                "settings",
                "grid",
                "density",
                "runs",
            ],
        ),
        (
            vec!["eigs", "--top", "2"],
            vec![
                "eigenvalues",
                "residuals",
                "converged",
                "which",
                "tol",
                "steps",
                "hvps",
                "hvp_seconds",
                "grad_frac_in_top_k",
                "settings",
            ],
        ),
        (
            vec!["trace", "--probes", "6", "--layerwise"],
            vec!["traces", "probes", "seconds", "settings"],
        ),
        (
            vec!["exact", "--grid", "50"],
            vec![
                "lambda_max",
                "lambda_min",
                "trace",
                "negative_mass",
                "frac_negative",
                "top5",
                "bottom5",
                "grad_frac_in_top_k",
                "asymmetry",
                "n_params",
                "sigma",
                "grid",
                "density",
                "eigenvalues",
            ],
        ),
        (
            vec!["layers", "--steps", "4", "--runs", "2"],
            vec![
                "similarity_measure",
                "full",
                "layers",
                "steps",
                "runs",
                "sigma",
            ],
        ),
    ];
    for (args, keys) in cases {
        let path = dir.path().join(format!("{}.json", args[0]));
        let mut a = args.clone();
        a.extend(base);
        a.extend(["--json", "--out", path.to_str().unwrap()]);
        let (ok, stdout, stderr) = hesscope(&a);
        assert!(ok, "{args:?}: {stderr}");
        let printed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for key in keys {
            assert!(printed.get(key).is_some(), "{}: no {key}", args[0]);
        }
        let strip = |mut v: serde_json::Value| {
            v.as_object_mut().unwrap().remove("seconds");
            v.as_object_mut().unwrap().remove("lanczos_seconds");
            v.as_object_mut().unwrap().remove("hvp_seconds");
            v
        };
        assert_eq!(strip(printed.clone()), strip(written), "{}", args[0]);
        if let Some(h) = printed.get("hvp_seconds") {
            let whole = printed
                .get("lanczos_seconds")
                .unwrap_or(&printed["seconds"]);
            assert!(
                h.as_f64().unwrap() <= whole.as_f64().unwrap(),
                "{}: {h} s of products in {whole} s",
                args[0]
            );
        }
        assert_eq!(printed["settings"]["backend"], "cpu", "{}", args[0]);
        assert_eq!(printed["settings"]["bn"], "batch", "{}", args[0]);
    }
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("trace.json")).unwrap())
            .unwrap();
    let rows = t["traces"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "one row per module of mlp-tiny");
    assert!(rows[0]["estimates"]["hutchinson"]["estimate"].is_number());
}

/// The spectral commands' `--layer` takes the tensor sets of `trace-grad`
/// and `train --htr-layers` (`middle`, lists) when they are one contiguous
/// block of parameters, and refuses the others by name.
#[test]
fn layer_sets_in_the_spectral_commands() {
    let model = hesscope::model::Model::load("cnn-tiny").unwrap();
    let middle = hesscope::trace_grad::LayerSet::parse(&model, "middle").unwrap();
    let base = [
        "trace",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--samples",
        "16",
        "--batch",
        "16",
        "--probes",
        "2",
        "--json",
        "--layer",
    ];
    let (ok, out, err) = hesscope(&[&base[..], &["middle"]].concat());
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["traces"][0]["size"], middle.size(&model));
    let (ok, _, err) = hesscope(&[&base[..], &["conv1,fc"]].concat());
    assert!(
        !ok && err.contains("--layer conv1,fc") && err.contains("contiguous"),
        "{err}"
    );
}

/// A conv bias before batch-mode batch norm has an identically zero
/// Hessian block: its density is reported as zero (it read as a negative
/// mass of ~0.8 from 1e-17 rounding noise), while the weight's block of
/// the same layer is not.
#[test]
fn a_block_zero_but_for_rounding_is_reported_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let arch = dir.path().join("zb.arch");
    std::fs::write(
        &arch,
        "model zb\ninput 3 8 8\nclasses 4\nconv c1 4 k=3 pad=1\nbn b1\nrelu\ngap\nlinear fc 4\n",
    )
    .unwrap();
    let run = |layer: &str| {
        let (ok, stdout, stderr) = hesscope(&[
            "density",
            "--backend",
            "cpu",
            "--model",
            arch.to_str().unwrap(),
            "--samples",
            "32",
            "--layer",
            layer,
            "--steps",
            "10",
            "--runs",
            "2",
            "--json",
        ]);
        assert!(ok, "{stderr}");
        (
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap(),
            stderr,
        )
    };
    let (bias, stderr) = run("c1.bias");
    assert!(stderr.contains("zero but for rounding"), "{stderr}");
    for k in ["lambda_max", "lambda_min", "trace", "negative_mass"] {
        assert_eq!(bias[k].as_f64(), Some(0.0), "{k}: {bias}");
    }
    let (weight, stderr) = run("c1.weight");
    assert!(!stderr.contains("zero but for rounding"), "{stderr}");
    assert!(weight["lambda_max"].as_f64().unwrap() > 1e-3, "{weight}");
}

/// Without XDG_RUNTIME_DIR (a server, a container, CI) a GPU run's stderr
/// holds nothing but hesscope's own lines: Mesa's Vulkan device-selection
/// layer would print "error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment." twice before anything else (src/main.rs).
#[test]
fn a_run_without_xdg_runtime_dir_greets_with_no_driver_error() {
    for backend in ["vulkan", "gl"] {
        let choice = match backend {
            "vulkan" => hesscope::gpu::BackendChoice::Vulkan,
            _ => hesscope::gpu::BackendChoice::Gl,
        };
        if gpu_context(choice).is_none() {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hesscope"))
            .args([
                "hvp",
                "--backend",
                backend,
                "--samples",
                "4",
                "--batch",
                "4",
            ])
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("NODEVICE_SELECT")
            .env_remove("MESA_VK_DEVICE_SELECT")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{backend}: {stderr}");
        assert!(
            !stderr.contains("XDG_RUNTIME_DIR"),
            "{backend}: a driver's complaint reached the user:\n{stderr}"
        );
    }
}

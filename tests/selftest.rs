//! `hesscope selftest`: passes on the adapters here (lavapipe, llvmpipe),
//! fails (exit status and report) when a reference disagrees, and refuses
//! what it cannot check.

mod common;
use common::*;
use hesscope::gpu::BackendChoice;

fn report(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Every check on Vulkan and GL: the 6 fixture cases × (loss, grad, hv,
/// cached hv) × 2 engines, eigs on the 5 dense ones, and the density's
/// L1: 54 checks, each within its tolerance, exit 0.
#[test]
fn selftest_passes_on_every_backend_here() {
    let fixtures = fixtures_dir();
    for (choice, backend) in [(BackendChoice::Vulkan, "vulkan"), (BackendChoice::Gl, "gl")] {
        if gpu_context(choice).is_none() {
            continue;
        }
        let (ok, stdout, stderr) = hesscope(&[
            "selftest",
            "--backend",
            backend,
            "--fixtures",
            fixtures.to_str().unwrap(),
            "--json",
        ]);
        let r = report(&stdout);
        let checks = r["checks"].as_array().unwrap();
        for c in checks {
            eprintln!(
                "{backend}: {} {} {} {} (tol {})",
                c["fixture"], c["engine"], c["quantity"], c["error"], c["tolerance"]
            );
        }
        eprintln!("{backend}: skipped {}, {} s", r["skipped"], r["seconds"]);
        assert!(
            ok && r["passed"] == true && r["failed"] == 0,
            "{backend}: {stderr}"
        );
        let cases = fixture_cases().len();
        let dense = fixture_cases()
            .iter()
            .filter(|(m, bn)| ref_dir(m, *bn).join("eigenvalues.json").exists())
            .count();
        assert_eq!(checks.len(), cases * 8 + dense + 1, "{backend}");
        assert_eq!(r["backend"], backend);
        // The forced engine ran the paths it is there for.
        let forced = checks
            .iter()
            .filter(|c| c["engine"] == "tiled+split" && c["fixture"] == "cnn-tiny batch")
            .find_map(|c| c["note"].as_str())
            .unwrap_or_default()
            .to_string();
        assert!(
            forced.contains("tiled") && forced.contains("split"),
            "{backend}: {forced}"
        );
    }
}

/// A fixture whose gradient and Hv references are swapped: the gradient
/// and Hv checks of both engines fail, the report says so, and the exit
/// status is non-zero; the loss checks still pass.
#[test]
fn selftest_fails_when_a_reference_disagrees() {
    if gpu_context(BackendChoice::Vulkan).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("mlp-tiny");
    let dst = tmp.path().join("mlp-tiny");
    std::fs::create_dir_all(dst.join("ref-batch")).unwrap();
    for f in [
        "meta.json",
        "weights.safetensors",
        "data.safetensors",
        "v.safetensors",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    for (from, to) in [
        ("reference.json", "reference.json"),
        ("grad.safetensors", "hv.safetensors"),
        ("hv.safetensors", "grad.safetensors"),
    ] {
        std::fs::copy(
            src.join("ref-batch").join(from),
            dst.join("ref-batch").join(to),
        )
        .unwrap();
    }
    let (ok, stdout, stderr) = hesscope(&[
        "selftest",
        "--backend",
        "vulkan",
        "--fixtures",
        tmp.path().to_str().unwrap(),
        "--json",
    ]);
    assert!(!ok, "a wrong reference passed: {stdout}");
    assert!(stderr.contains("checks failed"), "{stderr}");
    let r = report(&stdout);
    assert_eq!(r["passed"], false);
    let failed: Vec<String> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| {
            format!(
                "{} {}",
                c["engine"].as_str().unwrap(),
                c["quantity"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            "default grad",
            "default hv",
            "default hv cached",
            "tiled+split grad",
            "tiled+split hv",
            "tiled+split hv cached"
        ]
    );
    // No cnn-tiny here: the density check is listed as skipped, not passed.
    assert!(
        r["skipped"].to_string().contains("density"),
        "{}",
        r["skipped"]
    );
}

#[test]
fn selftest_refuses_the_reference_backend_and_a_folder_without_fixtures() {
    let (ok, _, stderr) = hesscope(&["selftest", "--backend", "cpu"]);
    assert!(!ok && stderr.contains("--backend cpu"), "{stderr}");
    if gpu_context(BackendChoice::Vulkan).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = hesscope(&[
        "selftest",
        "--backend",
        "vulkan",
        "--fixtures",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("--fixtures") && stderr.contains("no fixture"),
        "{stderr}"
    );
    let missing = tmp.path().join("nope");
    let (ok, _, stderr) = hesscope(&[
        "selftest",
        "--backend",
        "vulkan",
        "--fixtures",
        missing.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("nope"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

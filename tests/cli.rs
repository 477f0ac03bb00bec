//! The binary as a user runs it: the spec's flags, JSON output, and errors
//! that name the flag, file or tensor.

mod common;
use common::*;
use std::process::Command;

fn hesscope(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

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

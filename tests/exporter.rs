//! The PyTorch exporter (`python/hesscope_export`). Always: its output for
//! the module of `../shared/fixtures/tv-resnet18-trunc/make.py`
//! (`tests/data/tv-resnet18-trunc.exported.arch`, written by
//! `python/tests/export_fixture.py`) is the hand-written model tensor for
//! tensor, and reads torchvision's own state_dict to PyTorch's float64
//! gradient and Hv (float64 reference: 1e-10, the fixtures' bound). Where
//! torch and torchvision are installed: the exporter on torchvision's
//! ResNet-18 itself, run by the built binary against PyTorch float64, its
//! refusal of an op it has no layer for, and its own checks on small
//! modules (python/tests/test_exporter.py).

mod common;

use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::model::{params, Model, Weights};
use std::path::PathBuf;

fn exported() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tv-resnet18-trunc.exported.arch")
}

#[test]
fn the_exported_truncated_resnet18_matches_pytorch_float64() {
    let dir = common::fixtures_dir().join("tv-resnet18-trunc");
    let model = Model::load(exported().to_str().unwrap()).unwrap();
    let hand = Model::load(dir.join("tv-resnet18-trunc.arch").to_str().unwrap()).unwrap();
    let names = |m: &Model| -> Vec<(String, Vec<usize>)> {
        m.params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    };
    assert_eq!(
        names(&model),
        names(&hand),
        "the exported parameters are the hand-written ones"
    );
    // The same layers (torch flattens after its global average pool,
    // the hand-written file's `gap` is flat already).
    let layers = |m: &Model| {
        m.nodes
            .iter()
            .filter(|n| n.kind() != "flatten")
            .map(|n| n.op.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(layers(&model), layers(&hand));
    for bn in [BnMode::Batch, BnMode::Running] {
        let weights = Weights::load(&model, &dir.join("weights.safetensors")).unwrap();
        let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
        let problem = Problem::new(model.clone(), weights, data, 8, bn).unwrap();
        let v = params::load_vector(&model, &dir.join("v.safetensors")).unwrap();
        let rd = common::ref_dir("tv-resnet18-trunc", bn);
        let g_ref = params::load_vector(&model, &rd.join("grad.safetensors")).unwrap();
        let hv_ref = params::load_vector(&model, &rd.join("hv.safetensors")).unwrap();
        let (_, g, hv) = CpuReference::new(problem).loss_grad_hvp(&v).unwrap();
        let (eg, eh) = (common::rel_err(&g, &g_ref), common::rel_err(&hv, &hv_ref));
        eprintln!("exported tv-resnet18-trunc {bn:?}: grad {eg:.1e} Hv {eh:.1e}");
        assert!(
            eg <= 1e-10 && eh <= 1e-10,
            "{bn:?}: gradient {eg:.1e}, Hv {eh:.1e}"
        );
    }
}

/// Needs python3 with torch and torchvision (not in CI: skipped with a
/// message there and wherever they are missing).
#[test]
fn the_exporter_on_torchvision_resnet18_matches_pytorch_float64() {
    let Some(py) = common::python::python_with(&["torch", "torchvision", "safetensors"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let r = py.json(
        "check_torchvision.py",
        &["resnet18", "3", "64", "64", "running"],
        tmp.path(),
        &[],
    );
    eprintln!("{r}");
    let cpu = r["cpu"]["hv_rel"].as_f64().unwrap();
    assert!(cpu <= 1e-10, "float64 reference: {cpu:.1e}");
    // An op hesscope has no layer for is refused at export, naming the
    // module path and the ATen op (Swin's shifted-window attention;
    // ConvNeXt exports since issue 25, tests/convnext_export.rs).
    let out = tmp.path().join("cx.arch");
    let refused = py.run(
        &[
            "-m",
            "hesscope_export",
            "torchvision:swin_t",
            "--kwargs",
            r#"{"num_classes": 10}"#,
            "--input",
            "3",
            "32",
            "32",
            "--out",
            out.to_str().unwrap(),
        ],
        tmp.path(),
        &[],
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("features.1.0.attn: aten.") && err.contains("is not supported"),
        "{err}"
    );
    assert!(
        !tmp.path().join("cx.arch").exists(),
        "no file for a refused module"
    );
    // The GPU, where there is one: within 10× of PyTorch's own float32
    // (the fixtures' goal for networks no one here wrote).
    if let Some(gpu) = r["vulkan"]["hv_rel"].as_f64() {
        let peer = r["pytorch_f32_hv_rel"].as_f64().unwrap();
        assert!(
            gpu <= 10.0 * peer.max(1e-6),
            "GPU {gpu:.1e} against PyTorch float32 {peer:.1e}"
        );
    }
}

/// The exporter's own checks on small modules (python/tests/test_exporter.py:
/// each mapping's text, the refusals naming module path and ATen op, tensor
/// names and parameter order). Needs python3 with torch (skipped with a
/// message where it is missing).
#[test]
fn the_exporter_maps_and_refuses_small_modules() {
    let Some(py) = common::python::python_with(&["torch"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let stdout = py.script("test_exporter.py", &[], tmp.path(), &[]);
    for t in [
        "test_every_mapping",
        "test_parameter_order",
        "test_refusals",
        "test_vision_transformer",
        "test_gpt2",
        "test_sequence_refusals",
    ] {
        assert!(stdout.contains(&format!("{t}: ok")), "{stdout}");
    }
}

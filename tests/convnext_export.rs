//! torchvision's `convnext_tiny` (issue 25 item 3) through the exporter
//! and the `hvp` command: exported at 32×32 (10 classes, its own init with
//! the layer scales drawn from N(0.5, 0.1²) so their second-order terms
//! matter), batch 4, Hv along a random v against PyTorch float64 on the
//! float64 engine (≤ 1e-10: the same arithmetic in another order) and, where
//! a GPU adapter is found, within max(1e-5, 10× PyTorch float32's own
//! error) — the bound for networks no one here wrote.
//! python/tests/check_torchvision.py does the work; python/tests/
//! check_models.py measures gradients too (BENCHMARKS.md).
//!
//! Needs python3 with torch, torchvision and safetensors (skipped with a
//! message where they are missing, as tests/exporter.rs).

mod common;

#[test]
fn exported_convnext_tiny_matches_pytorch_float64() {
    let Some(py) = common::python::python_with(&["torch", "torchvision", "safetensors"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let r = py.json(
        "check_torchvision.py",
        &["convnext_tiny", "3", "32", "32", "running"],
        tmp.path(),
        &[],
    );
    eprintln!("{r}");
    let cpu = r["cpu"]["hv_rel"].as_f64().unwrap();
    assert!(cpu <= 1e-10, "float64 reference: {cpu:.1e}");
    let text = std::fs::read_to_string(tmp.path().join("convnext_tiny.arch")).unwrap();
    for line in [
        "features.1.0.block.1 = tokens(features.1.0.block.0)",
        "features.1.0.block.6 = untokens(features.1.0.block.5) h=8 w=8",
        "= mul_param(features.1.0.block.6) features.1.0.layer_scale",
    ] {
        assert!(text.contains(line), "{line}");
    }
    if let Some(gpu) = r["vulkan"]["hv_rel"].as_f64() {
        let peer = r["pytorch_f32_hv_rel"].as_f64().unwrap();
        assert!(
            gpu <= (10.0 * peer).max(1e-5),
            "GPU {gpu:.1e} against PyTorch float32 {peer:.1e}"
        );
    }
}

//! Helpers shared by the ONNX tests (tests/onnx.rs, tests/onnx_random.rs):
//! the committed files with their PyTorch float64 references, and the
//! rows of python/tests/check_onnx.py's report.

use super::{gpu_context, json, rel_err, GPU_BACKENDS};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::GpuEngine;
use hesscope::model::{onnx, params};
use std::path::PathBuf;

pub fn onnx_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/onnx")
}

/// One committed ONNX file in one BN mode with PyTorch's float64 loss,
/// gradient and Hv along `v` (batch of 4).
pub struct OnnxCase {
    pub file: &'static str,
    pub bn: BnMode,
    pub problem: Problem,
    pub v: Vec<f64>,
    pub loss: f64,
    pub grad: Vec<f64>,
    pub hv: Vec<f64>,
}

/// `file` read with its initializers; data, `v` and the references from
/// the folder `sub` of tests/data/onnx (its `ref-batch`/`ref-running`).
pub fn onnx_case(file: &'static str, sub: &str, bn: BnMode) -> OnnxCase {
    let (model, weights) = onnx::load(&onnx_dir().join(file), None).unwrap();
    let d = onnx_dir().join(sub);
    let data = Dataset::load(&d.join("data.safetensors")).unwrap();
    let rd = d.join(match bn {
        BnMode::Batch => "ref-batch",
        BnMode::Running => "ref-running",
    });
    let v = params::load_vector(&model, &d.join("v.safetensors")).unwrap();
    let grad = params::load_vector(&model, &rd.join("grad.safetensors")).unwrap();
    let hv = params::load_vector(&model, &rd.join("hv.safetensors")).unwrap();
    let loss = json(rd.join("reference.json"))["loss"].as_f64().unwrap();
    let problem = Problem::new(model, weights, data, 4, bn).unwrap();
    OnnxCase {
        file,
        bn,
        problem,
        v,
        loss,
        grad,
        hv,
    }
}

#[track_caller]
fn check_case(c: &OnnxCase, on: &str, (loss, g, hv): (f64, Vec<f64>, Vec<f64>), tol: f64) {
    let el = (loss - c.loss).abs() / c.loss.abs();
    let (eg, eh) = (rel_err(&g, &c.grad), rel_err(&hv, &c.hv));
    eprintln!(
        "{} {:?} {on}: loss {el:.1e} grad {eg:.1e} Hv {eh:.1e}",
        c.file, c.bn
    );
    assert!(
        el <= tol && eg <= tol && eh <= tol,
        "{} {:?} on {on}: loss {el:.1e}, gradient {eg:.1e}, Hv {eh:.1e}",
        c.file,
        c.bn
    );
}

/// The float64 reference's loss, gradient and Hv within `tol` relative
/// of PyTorch's.
#[track_caller]
pub fn check_cases_on_cpu(cases: &[OnnxCase], tol: f64) {
    for c in cases {
        let out = CpuReference::new(c.problem.clone())
            .loss_grad_hvp(&c.v)
            .unwrap();
        check_case(c, "cpu", out, tol);
    }
}

/// The GPU engine's loss, gradient and Hv within `tol` relative of
/// PyTorch's float64, on every backend (`cases` called once per backend).
#[track_caller]
pub fn check_cases_on_gpus(cases: impl Fn() -> Vec<OnnxCase>, tol: f64) {
    for choice in GPU_BACKENDS {
        let backend = format!("{choice:?}");
        for c in cases() {
            let Some(ctx) = gpu_context(choice) else {
                break;
            };
            let mut e = GpuEngine::new(ctx, &c.problem).unwrap();
            let out = e.loss_grad_hvp(&c.v).unwrap();
            check_case(&c, &backend, out, tol);
        }
    }
}

/// check_onnx.py's rows: Hv and loss within `tol` of PyTorch float64 in
/// both BN modes, read with the initializers (`cpu`) and with the
/// state_dict (`cpu-state-dict`). `what` prefixes the messages.
#[track_caller]
pub fn check_hv_loss_rows(r: &serde_json::Value, what: &str, tol: f64) {
    for bn in ["batch", "running"] {
        for run in ["cpu", "cpu-state-dict"] {
            let row = &r[bn][run];
            let hv = row["hv_rel"]
                .as_f64()
                .unwrap_or_else(|| panic!("{what}{bn} {run}: {row}"));
            let loss = row["loss_rel"].as_f64().unwrap();
            assert!(
                hv <= tol && loss <= tol,
                "{what}{bn} {run}: Hv {hv:.1e}, loss {loss:.1e}"
            );
        }
    }
}

/// check_onnx.py's folded export (BN merged into the convs) failed, its
/// message naming `needle` (a batch norm) and the export option to use.
#[track_caller]
pub fn check_folded_refused(r: &serde_json::Value, needle: &str) {
    let folded = &r["folded"];
    assert_ne!(folded["status"].as_i64(), Some(0), "{folded}");
    let err = folded["stderr"].as_str().unwrap();
    assert!(
        err.contains(needle) && err.contains("do_constant_folding=False"),
        "{err}"
    );
}

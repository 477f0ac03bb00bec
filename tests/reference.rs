//! The float64 reference engine against PyTorch's float64 fixtures, finite
//! differences and symmetry.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::BnMode;

/// Fixtures were made by PyTorch in float64; two float64 implementations
/// of the same sums differ only by rounding, far below 1e-10.
const TOL: f64 = 1e-10;

#[test]
fn every_fixture_matches_pytorch_float64() {
    let cases = fixture_cases();
    assert!(
        cases.len() >= 4,
        "expected the shared fixtures, found {cases:?}"
    );
    for (name, bn) in cases {
        let p = problem(&name, bn);
        let dir = fixtures_dir().join(&name);
        let refd = ref_dir(&name, bn);
        let r = json(refd.join("reference.json"));
        let v = vector(&p, dir.join("v.safetensors"));
        let g_ref = vector(&p, refd.join("grad.safetensors"));
        let hv_ref = vector(&p, refd.join("hv.safetensors"));
        let engine = CpuReference::new(p);
        let out = engine.pass(Some(&v)).unwrap();
        let hv = out.hv.unwrap();
        let loss_ref = r["loss"].as_f64().unwrap();
        let e_loss = (out.loss - loss_ref).abs() / loss_ref.abs();
        let e_g = rel_err(&out.grad, &g_ref);
        let e_hv = rel_err(&hv, &hv_ref);
        let e_vhv =
            (dot(&v, &hv) - r["v_dot_hv"].as_f64().unwrap()).abs() / r["hv_norm"].as_f64().unwrap();
        println!("{name} {bn:?}: loss {e_loss:.2e} grad {e_g:.2e} hv {e_hv:.2e} vHv {e_vhv:.2e}");
        assert!(
            e_loss <= TOL && e_g <= TOL && e_hv <= TOL && e_vhv <= TOL,
            "{name} {bn:?}"
        );
    }
}

#[test]
fn hv_matches_central_differences_and_is_symmetric() {
    for (name, bn) in [
        ("cnn-tiny", BnMode::Batch),
        ("cnn-tiny", BnMode::Running),
        ("mlp-tiny", BnMode::Batch),
    ] {
        let p = problem(name, bn);
        let v = vector(&p, fixtures_dir().join(name).join("v.safetensors"));
        let mut engine = CpuReference::new(p);
        let hv = engine.pass(Some(&v)).unwrap().hv.unwrap();
        // Central difference of the gradient: O(eps²) truncation, and the
        // fixture's smallest |pre-activation| (7.6e-6) is far above eps·|v|.
        let eps = 1e-5;
        let theta = engine.problem.weights.theta.clone();
        let grad_at = |e: &mut CpuReference, s: f64| {
            e.problem.weights.theta = theta.iter().zip(&v).map(|(t, d)| t + s * d).collect();
            e.pass(None).unwrap().grad
        };
        let gp = grad_at(&mut engine, eps);
        let gm = grad_at(&mut engine, -eps);
        engine.problem.weights.theta = theta.clone();
        let fd: Vec<f64> = gp
            .iter()
            .zip(&gm)
            .map(|(a, b)| (a - b) / (2.0 * eps))
            .collect();
        let e_fd = rel_err(&fd, &hv);
        // Symmetry: u·Hv = v·Hu for an independent u.
        let u: Vec<f64> = (0..v.len())
            .map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        let hu = engine.pass(Some(&u)).unwrap().hv.unwrap();
        let (a, b) = (dot(&u, &hv), dot(&v, &hu));
        let e_sym = (a - b).abs() / a.abs().max(b.abs());
        println!("{name} {bn:?}: fd {e_fd:.2e} symmetry {e_sym:.2e}");
        assert!(e_fd < 1e-7, "{name} {bn:?}: finite differences {e_fd}");
        assert!(e_sym < 1e-12, "{name} {bn:?}: symmetry {e_sym}");
    }
}

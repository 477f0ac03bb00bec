//! Block products (issue 12): one sweep over the data for K Hessian-vector
//! products, and the solvers that run on them, against K single products
//! and the single-vector solvers.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature};

/// K deterministic directions: the fixture's v, then smooth, signed,
/// distinct patterns of the same size.
fn directions(v: &[f64], k: usize) -> Vec<Vec<f64>> {
    (0..k)
        .map(|j| {
            if j == 0 {
                v.to_vec()
            } else {
                (0..v.len())
                    .map(|i| {
                        (((i * (7919 + 104_729 * j)) % 1009) as f64 / 504.5 - 1.0) * v[i].signum()
                    })
                    .collect()
            }
        })
        .collect()
}

/// The block entry point of the float64 reference runs the same unit
/// passes in the same order as `hvp` (one forward and one backward shared,
/// each tangent's R-forward and R-backward in turn), so the products are
/// equal bit for bit: tolerance 0, on every fixture and both BN modes
/// (cnn-tiny's batch norms keep R-forward state for their R-backward,
/// which running every R-forward before the R-backwards would overwrite).
#[test]
fn cpu_block_products_equal_single_products() {
    let cases = fixture_cases();
    assert!(
        cases
            .iter()
            .any(|(m, b)| m == "cnn-tiny" && *b == BnMode::Batch)
            && cases
                .iter()
                .any(|(m, b)| m == "cnn-tiny" && *b == BnMode::Running),
        "expected cnn-tiny (a BN model) in both modes among {cases:?}"
    );
    for (name, bn) in cases {
        let p = problem(&name, bn);
        let v = vector(&p, fixtures_dir().join(&name).join("v.safetensors"));
        let mut engine = CpuReference::new(p);
        let n = engine.n_params();
        let t = std::time::Instant::now();
        // lenet5 (61706 parameters) takes most of the time: one K there.
        let ks: &[usize] = if name == "lenet5" { &[3] } else { &[1, 3, 5] };
        for &k in ks {
            let dirs = directions(&v, k);
            let singles: Vec<Vec<f64>> = dirs
                .iter()
                .map(|d| {
                    let mut out = vec![0.0; n];
                    engine.hvp(d, &mut out).unwrap();
                    out
                })
                .collect();
            let refs: Vec<&[f64]> = dirs.iter().map(|d| d.as_slice()).collect();
            let mut outs = vec![vec![0.0; n]; k];
            engine.hvp_block(&refs, &mut outs).unwrap();
            for (j, (a, b)) in outs.iter().zip(&singles).enumerate() {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f64, f64::max);
                assert!(
                    worst == 0.0,
                    "{name} {bn:?} K={k} tangent {j}: block differs from single by {worst:e}"
                );
                assert!(a.iter().any(|x| *x != 0.0), "{name} {bn:?}: Hv is zero");
            }
        }
        println!(
            "{name} {bn:?}: {n} parameters, K = {ks:?} equal ({:.2} s)",
            t.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn cpu_block_refuses_mismatched_outputs() {
    let p = problem("mlp-tiny", BnMode::Batch);
    let mut engine = CpuReference::new(p);
    let n = engine.n_params();
    let v = vec![1.0; n];
    let mut outs = vec![vec![0.0; n]; 2];
    assert!(engine.hvp_block(&[&v], &mut outs).is_err());
    let mut short = vec![vec![0.0; n - 1]];
    assert!(engine.hvp_block(&[&v], &mut short).is_err());
    let bad = vec![1.0; n + 1];
    let mut one = vec![vec![0.0; n]];
    assert!(engine.hvp_block(&[&bad], &mut one).is_err());
}

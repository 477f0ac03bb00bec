//! The trace estimators checked where their answer is known exactly, so a
//! wrong estimator (off by a factor, a probe too many) fails outright
//! rather than within a few standard errors:
//! - Rademacher probes: zᵀDz = Σ dᵢzᵢ² = tr D for every probe of a
//!   diagonal D, so Hutchinson's estimate is tr D and its spread zero;
//! - Hutch++ on a matrix of rank below its sketch: the sketch spans the
//!   range, the exact part is the whole trace and the residual zero;
//! - the float64 estimator on a PyTorch fixture through real HVPs, against
//!   the same probes applied (here, independently) to the dense Hessian
//!   that `exact` builds, whose trace is PyTorch's.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Hessian};
use hesscope::spectral::exact::dense_matrix;
use hesscope::spectral::trace::{hutchinson, hutchinson_block, hutchpp_block};
use hesscope::spectral::{DenseOperator, DiagonalOperator, SymOperator};
use rand::{Rng, SeedableRng};

/// Sums of n ≤ 1000 O(1) terms in float64 (compensated dots): the exact
/// identities hold to ~1e-15 relative; 1e-12 is far below any error a
/// wrong estimator makes (a factor 2, a missing probe: ≥ 1e-3).
const EXACT: f64 = 1e-12;

#[test]
fn rademacher_hutchinson_is_exact_on_a_diagonal_matrix() {
    for (n, seed) in [(1, 0), (7, 1), (90, 2), (1000, 3)] {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let d: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 4.0 - 1.5).collect();
        let tr: f64 = d.iter().sum();
        let scale: f64 = d.iter().map(|x| x.abs()).sum();
        for block in [1, 3, 8] {
            let h =
                hutchinson_block(&mut DiagonalOperator { d: d.clone() }, 9, seed, block).unwrap();
            assert!(
                (h.estimate - tr).abs() <= EXACT * scale,
                "n {n} block {block}: {} vs tr D {tr}",
                h.estimate
            );
            // Every probe gives the same value: no spread.
            assert!(h.stderr <= EXACT * scale, "n {n}: stderr {}", h.stderr);
            assert_eq!(h.operator_applications, 9);
        }
    }
}

/// A = Σ_{i<r} λᵢ uᵢuᵢᵀ with random orthonormal-ish uᵢ (Gram–Schmidt).
fn low_rank(n: usize, lambdas: &[f64], seed: u64) -> (DenseOperator, f64) {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut us: Vec<Vec<f64>> = vec![];
    for _ in lambdas {
        let mut u: Vec<f64> = (0..n).map(|_| r.random::<f64>() - 0.5).collect();
        for _ in 0..2 {
            for q in &us {
                let c = dot(&u, q);
                u.iter_mut().zip(q).for_each(|(a, b)| *a -= c * b);
            }
        }
        let s = dot(&u, &u).sqrt();
        us.push(u.into_iter().map(|x| x / s).collect());
    }
    let mut a = vec![0.0; n * n];
    for (l, u) in lambdas.iter().zip(&us) {
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] += l * u[i] * u[j];
            }
        }
    }
    (DenseOperator { n, a }, lambdas.iter().sum())
}

#[test]
fn hutchpp_is_exact_on_a_matrix_of_rank_below_its_sketch() {
    // Rank 5, indefinite; 30 products give a sketch of 10 vectors.
    let lambdas = [3.0, -2.0, 1.5, 0.7, -0.4];
    let scale: f64 = lambdas.iter().map(|x: &f64| x.abs()).sum();
    let (op, tr) = low_rank(60, &lambdas, 5);
    for block in [1, 4] {
        let mut op = DenseOperator {
            n: op.n,
            a: op.a.clone(),
        };
        let e = hutchpp_block(&mut op, 30, 11, block).unwrap();
        // The residual (I − QQᵀ)A(I − QQᵀ) is zero to rounding (1e-15 of
        // ‖A‖); the Gram–Schmidt cut-off at 1e-12 leaves no direction out.
        assert!(
            (e.estimate - tr).abs() <= 1e-10 * scale,
            "block {block}: Hutch++ {} vs tr A {tr}",
            e.estimate
        );
        assert!(e.stderr <= 1e-10 * scale, "stderr {}", e.stderr);
    }
    // Plain Hutchinson on the same matrix is not exact (the contrast that
    // makes the check above mean something).
    let mut op2 = DenseOperator { n: op.n, a: op.a };
    let h = hutchinson(&mut op2, 10, 11).unwrap();
    assert!((h.estimate - tr).abs() > 1e-3, "{} vs {tr}", h.estimate);
}

/// Records every vector an operator is applied to.
struct Recorder<'a> {
    inner: &'a mut dyn SymOperator,
    seen: Vec<Vec<f64>>,
}

impl SymOperator for Recorder<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
        self.seen.push(v.to_vec());
        self.inner.apply(v, out)
    }
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> hesscope::Result<()> {
        self.seen.extend(vs.iter().map(|v| v.to_vec()));
        self.inner.apply_block(vs, outs)
    }
}

/// mlp-tiny (932 parameters) on the float64 reference:
/// Hutchinson over 40 probes (seed 3, blocks of 1 and 4) through real
/// HVPs equals (1/P) Σ zᵀ H z over the same probes with H the dense
/// Hessian `exact` assembles, to 1e-10 relative (both sides are float64
/// sums of the same products; measured ~1e-15). The dense H's trace is
/// PyTorch's (reference.json) to 1e-10, so the estimator is tied to an
/// independent number, and the probes are ±1 vectors of the model's size.
#[test]
fn the_float64_estimator_on_a_fixture_equals_its_probes_on_the_exact_hessian() {
    let (model, bn) = ("mlp-tiny", BnMode::Batch);
    let p = problem(model, bn);
    let n = p.model.n_params;
    let reference = json(ref_dir(model, bn).join("reference.json"));
    let tr_ref = reference["dense"]["trace"].as_f64().unwrap();
    let mut cpu = CpuReference::new(p);
    let (h, _) = dense_matrix(&mut Hessian(&mut cpu), n).unwrap();
    let tr_dense: f64 = (0..n).map(|i| h[i * n + i]).sum();
    let h_abs: f64 = (0..n).map(|i| h[i * n + i].abs()).sum();
    let e_tr = (tr_dense - tr_ref).abs() / h_abs;
    assert!(
        e_tr <= 1e-10,
        "dense trace {tr_dense} vs PyTorch {tr_ref}: {e_tr:.1e}"
    );
    for block in [1, 4] {
        let mut hess = Hessian(&mut cpu);
        let mut rec = Recorder {
            inner: &mut hess,
            seen: vec![],
        };
        let est = hutchinson_block(&mut rec, 40, 3, block).unwrap();
        assert_eq!(rec.seen.len(), 40, "one product per probe");
        let samples: Vec<f64> = rec
            .seen
            .iter()
            .map(|z| {
                assert!(z.len() == n && z.iter().all(|x| x.abs() == 1.0));
                let hz: Vec<f64> = (0..n).map(|i| dot(&h[i * n..(i + 1) * n], z)).collect();
                dot(z, &hz)
            })
            .collect();
        let mean = samples.iter().sum::<f64>() / 40.0;
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 39.0;
        let se = (var / 40.0).sqrt();
        let (e_est, e_se) = (
            (est.estimate - mean).abs() / mean.abs(),
            (est.stderr - se).abs() / se,
        );
        eprintln!(
            "{model} block {block}: estimate {:.10} vs {mean:.10} on the dense H ({e_est:.1e}), \
             stderr {:.6} vs {se:.6} ({e_se:.1e}); exact trace {tr_ref:.6}, dense {e_tr:.1e}",
            est.estimate, est.stderr
        );
        assert!(e_est <= 1e-10 && e_se <= 1e-10, "{e_est:.1e} {e_se:.1e}");
    }
}

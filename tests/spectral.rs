//! The spectral engine on test operators: Lanczos orthogonality against a
//! plain f32 baseline, tridiagonal eigenvalues on Wilkinson matrices, SLQ,
//! eigs, trace estimators and the dense spectrum on known matrices.

use hesscope::spectral::compensated::dot_f32;
use hesscope::spectral::eigs::{eigs, EigsSettings, Which};
use hesscope::spectral::exact::exact_spectrum;
use hesscope::spectral::lanczos::{BasisPrecision, Lanczos};
use hesscope::spectral::slq;
use hesscope::spectral::trace::{hutchinson, hutchpp};
use hesscope::spectral::tridiagonal::tridiagonal_eigen;
use hesscope::spectral::{DenseOperator, DiagonalOperator, SymOperator};
use rand::{Rng, SeedableRng};

/// A wide spectrum: a bulk in [-1, 1] and large outliers of both signs,
/// the shape that makes plain Lanczos lose orthogonality fastest.
fn wide_spectrum(n: usize) -> Vec<f64> {
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let mut d: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect();
    for (i, o) in [1e3, 500.0, 200.0, 100.0, -50.0, -300.0].iter().enumerate() {
        d[i] = *o;
    }
    d
}

/// Plain f32 Lanczos: f32 vectors, f32 dot products, one Gram–Schmidt pass.
fn plain_f32_loss(d: &[f64], steps: usize, start: &[f64]) -> f64 {
    let df: Vec<f32> = d.iter().map(|&x| x as f32).collect();
    let nrm = start.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut q: Vec<Vec<f32>> = vec![start.iter().map(|x| (x / nrm) as f32).collect()];
    let mut beta_prev = 0.0f32;
    for j in 0..steps {
        let mut w: Vec<f32> = q[j].iter().zip(&df).map(|(a, b)| a * b).collect();
        if j > 0 {
            let p = &q[j - 1];
            w.iter_mut().zip(p).for_each(|(x, y)| *x -= beta_prev * y);
        }
        let a = dot_f32(&w, &q[j]);
        w.iter_mut().zip(&q[j]).for_each(|(x, y)| *x -= a * y);
        let c: Vec<f32> = q.iter().map(|qi| dot_f32(&w, qi)).collect();
        for (ci, qi) in c.iter().zip(&q) {
            w.iter_mut().zip(qi).for_each(|(x, y)| *x -= ci * y);
        }
        let b = dot_f32(&w, &w).sqrt();
        beta_prev = b;
        q.push(w.iter().map(|x| x / b).collect());
    }
    let mut worst: f64 = 0.0;
    for i in 0..q.len() {
        for j in 0..q.len() {
            let d: f64 = q[i]
                .iter()
                .zip(&q[j])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            worst = worst.max((d - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    worst
}

#[test]
fn compensated_reorthogonalisation_keeps_the_basis_orthonormal() {
    let n = 2000;
    let steps = 200;
    let d = wide_spectrum(n);
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let start: Vec<f64> = (0..n).map(|_| r.random::<f64>() - 0.5).collect();
    let mut losses = vec![];
    for precision in [BasisPrecision::F32, BasisPrecision::F64] {
        let mut op = DiagonalOperator { d: d.clone() };
        let mut lz = Lanczos::new(&mut op, &start, precision, 0).unwrap();
        while lz.steps() < steps && lz.step().unwrap() {}
        losses.push(lz.orthogonality_loss().unwrap());
    }
    let plain = plain_f32_loss(&d, steps, &start);
    eprintln!(
        "max|QᵀQ − I| after {steps} steps: compensated, f32 basis {:.2e}; compensated, f64 basis {:.2e}; plain f32 {:.2e}",
        losses[0], losses[1], plain
    );
    assert!(
        losses[0] <= 1e-6,
        "f32-stored compensated basis lost orthogonality: {:.2e}",
        losses[0]
    );
    assert!(
        losses[1] <= 1e-12,
        "f64 basis lost orthogonality: {:.2e}",
        losses[1]
    );
    // The baseline shows what the compensation buys.
    assert!(
        plain > 10.0 * losses[0],
        "plain f32 {plain:.2e} vs compensated {:.2e}",
        losses[0]
    );
}

fn dense_eigenvalues(n: usize, a: &[f64]) -> Vec<f64> {
    let mut op = DenseOperator { n, a: a.to_vec() };
    exact_spectrum(&mut op, n).unwrap().values
}

#[test]
fn tridiagonal_eigenvalues_match_a_dense_solver_on_wilkinson_matrices() {
    for m in [21usize, 41, 101] {
        let h = (m / 2) as f64;
        let alpha: Vec<f64> = (0..m).map(|i| (h - i as f64).abs()).collect();
        let beta = vec![1.0; m - 1];
        let t = tridiagonal_eigen(&alpha, &beta).unwrap();
        let mut dense = vec![0.0; m * m];
        for i in 0..m {
            dense[i * m + i] = alpha[i];
            if i + 1 < m {
                dense[i * m + i + 1] = 1.0;
                dense[(i + 1) * m + i] = 1.0;
            }
        }
        let reference = dense_eigenvalues(m, &dense);
        let err = t
            .values
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // W21+'s top pair agrees to 1e-14 and must still be resolved.
        assert!(err < 1e-12, "W{m}+: max |Δλ| = {err:.1e}");
        // Eigenvectors are orthonormal and weights sum to 1.
        let wsum: f64 = t.weights().iter().sum();
        assert!((wsum - 1.0).abs() < 1e-12, "weights sum {wsum}");
        if m == 21 {
            eprintln!(
                "W21+ λmax = {:.15} (dense {:.15})",
                t.values[20], reference[20]
            );
        }
    }
    // Random tridiagonals, including tiny off-diagonals.
    let mut r = rand::rngs::StdRng::seed_from_u64(8);
    for m in [1usize, 2, 3, 60] {
        let alpha: Vec<f64> = (0..m).map(|_| r.random::<f64>() - 0.5).collect();
        let beta: Vec<f64> = (0..m.saturating_sub(1))
            .map(|i| if i % 7 == 3 { 1e-14 } else { r.random::<f64>() })
            .collect();
        let t = tridiagonal_eigen(&alpha, &beta).unwrap();
        let mut dense = vec![0.0; m * m];
        for i in 0..m {
            dense[i * m + i] = alpha[i];
            if i + 1 < m {
                dense[i * m + i + 1] = beta[i];
                dense[(i + 1) * m + i] = beta[i];
            }
        }
        let reference = dense_eigenvalues(m, &dense);
        for (a, b) in t.values.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-12, "m={m}: {a} vs {b}");
        }
    }
}

fn random_symmetric(n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    // Q diag(d) Qᵀ with a known spectrum.
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d: Vec<f64> = (0..n)
        .map(|i| (i as f64 - n as f64 * 0.3) / n as f64)
        .collect();
    d[n - 1] = 5.0;
    d[n - 2] = 3.0;
    d[0] = -4.0;
    let mut q: Vec<Vec<f64>> = vec![];
    for _ in 0..n {
        let mut v: Vec<f64> = (0..n).map(|_| r.random::<f64>() - 0.5).collect();
        for _ in 0..2 {
            for u in &q {
                let c: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= c * b);
            }
        }
        let s = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        q.push(v.into_iter().map(|x| x / s).collect());
    }
    let mut a = vec![0.0; n * n];
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] += d[k] * q[k][i] * q[k][j];
            }
        }
    }
    d.sort_by(|x, y| x.partial_cmp(y).unwrap());
    (a, d)
}

#[test]
fn eigs_finds_both_ends_and_reports_true_residuals() {
    let n = 120;
    let (a, d) = random_symmetric(n, 1);
    for which in [Which::Largest, Which::Smallest, Which::Magnitude] {
        let mut op = DenseOperator { n, a: a.clone() };
        let r = eigs(&mut op, &EigsSettings::new(3, which)).unwrap();
        let want: Vec<f64> = match which {
            Which::Largest => vec![d[n - 1], d[n - 2], d[n - 3]],
            Which::Smallest => vec![d[0], d[1], d[2]],
            Which::Magnitude => vec![5.0, -4.0, 3.0],
        };
        for (got, w) in r.values.iter().zip(&want) {
            assert!((got - w).abs() < 1e-9, "{which:?}: {got} vs {w}");
        }
        assert!(r.converged, "{which:?} residuals {:?}", r.residuals);
        assert!(r.residuals.iter().all(|x| *x <= 1e-6 * 5.0));
    }
    // A step budget too small to converge says so.
    let mut op = DenseOperator { n, a: a.clone() };
    let mut s = EigsSettings::new(5, Which::Largest);
    s.min_steps = 6;
    s.max_steps = 6;
    let r = eigs(&mut op, &s).unwrap();
    assert!(!r.converged);
}

#[test]
fn breakdown_on_an_invariant_subspace_is_handled() {
    // Start vector in a 3-dimensional invariant subspace: β hits 0 at step 3.
    let mut d = vec![1.0; 50];
    d[0] = 3.0;
    d[1] = 2.0;
    let mut op = DiagonalOperator { d };
    let mut start = vec![0.0; 50];
    start[0] = 1.0;
    start[1] = 1.0;
    start[2] = 1.0;
    let mut lz = Lanczos::new(&mut op, &start, BasisPrecision::F64, 0).unwrap();
    for _ in 0..10 {
        lz.step().unwrap();
    }
    assert!(lz.breakdowns >= 1);
    assert!(lz.orthogonality_loss().unwrap() < 1e-12);
    assert!(lz.alpha.iter().chain(&lz.beta).all(|x| x.is_finite()));
}

#[test]
fn slq_density_integrates_to_one_and_estimates_the_trace() {
    let n = 300;
    let (a, d) = random_symmetric(n, 2);
    let mut op = DenseOperator { n, a };
    let runs = slq::slq(&mut op, 60, 10, 0).unwrap();
    let s = slq::summarize(&runs, n);
    let (lo, hi) = slq::extremes(&runs);
    assert!(
        (hi - 5.0).abs() < 1e-8 && (lo + 4.0).abs() < 1e-8,
        "{lo} {hi}"
    );
    let sigma = slq::default_sigma(lo, hi);
    let grid = slq::default_grid(lo, hi, sigma, 10_000);
    let mut dens = slq::density_on(&runs, &grid, sigma);
    slq::normalize(&grid, &mut dens);
    assert!((slq::integrate(&grid, &dens) - 1.0).abs() < 1e-12);
    let exact: f64 = d.iter().sum();
    eprintln!(
        "trace {exact:.4} vs SLQ {:.4} ± {:.4}",
        s.trace, s.trace_stderr
    );
    assert!((s.trace - exact).abs() < 4.0 * s.trace_stderr.max(1e-9));
}

#[test]
fn trace_estimators_agree_with_the_exact_trace() {
    let n = 200;
    let (a, d) = random_symmetric(n, 4);
    let exact: f64 = d.iter().sum();
    let mut op = DenseOperator { n, a };
    let h = hutchinson(&mut op, 300, 1).unwrap();
    let hpp = hutchpp(&mut op, 300, 1).unwrap();
    eprintln!(
        "exact {exact:.4}; Hutchinson {:.4} ± {:.4}; Hutch++ {:.4} ± {:.4}",
        h.estimate, h.stderr, hpp.estimate, hpp.stderr
    );
    assert!((h.estimate - exact).abs() <= 3.0 * h.stderr);
    assert!((hpp.estimate - exact).abs() <= 3.0 * hpp.stderr.max(1e-9));
    assert!(
        hpp.stderr < h.stderr,
        "Hutch++ should be the tighter estimate here"
    );
}

#[test]
fn exact_refuses_a_model_above_the_limit_and_says_why() {
    let mut op = DiagonalOperator { d: vec![1.0; 10] };
    let err = exact_spectrum(&mut op, 5).err().unwrap().to_string();
    assert!(
        err.contains("limit is 5") && err.contains("density"),
        "{err}"
    );
    assert_eq!(op.dim(), 10);
}

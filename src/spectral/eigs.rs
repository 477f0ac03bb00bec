//! Extreme eigenpairs by Lanczos with full reorthogonalisation, continued
//! until every wanted Ritz pair's true residual ‖Av − λv‖ ≤ tol·|λmax| or
//! the step budget runs out. Algebraic ordering by default: in batch-mode
//! BN the largest-magnitude eigenvalue is often negative, and power
//! iteration, which finds that one, reports it as "the top eigenvalue".

use crate::error::{Error, Result};
use crate::spectral::compensated::norm;
use crate::spectral::lanczos::{gaussian_unit, Basis, BasisBudget, BasisPlan, Lanczos};
use crate::spectral::operator::SymOperator;
use rand::SeedableRng;

/// Which end of the spectrum `eigs` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Largest,
    Smallest,
    Magnitude,
}

#[derive(Clone, Debug)]
pub struct EigsSettings {
    pub k: usize,
    pub which: Which,
    pub tol: f64,
    /// Steps before the first convergence check.
    pub min_steps: usize,
    /// Step budget.
    pub max_steps: usize,
    pub seed: u64,
    /// Vectors per block product: 1 runs single-vector Lanczos; b ≥ 2 runs
    /// block Lanczos, b vectors per sweep ([`eigs`]). `min_steps` and
    /// `max_steps` count products (basis vectors) either way.
    pub block: usize,
    /// Host memory the Lanczos basis may take (f64 while it fits, else f32).
    pub basis_budget: BasisBudget,
}

impl EigsSettings {
    pub fn new(k: usize, which: Which) -> EigsSettings {
        EigsSettings {
            k,
            which,
            tol: 1e-6,
            min_steps: (2 * k + 20).max(30),
            max_steps: 400,
            seed: 0,
            block: 1,
            basis_budget: BasisBudget::host_default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EigsResult {
    /// In the order asked for (largest first, most negative first, or largest |λ| first).
    pub values: Vec<f64>,
    pub vectors: Vec<Vec<f64>>,
    /// True residual norms ‖Av − λv‖.
    pub residuals: Vec<f64>,
    pub steps: usize,
    pub converged: bool,
    pub operator_applications: usize,
    /// Calls of `apply_block` (each one sweep over the data for a Hessian)
    /// and of `apply`: with block 1, every application is one.
    pub block_products: usize,
    /// Where the Lanczos vectors were kept (`BasisPlan::describe`).
    pub basis: String,
}

fn order(values: &[f64], which: Which) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| match which {
        Which::Largest => -values[i],
        Which::Smallest => values[i],
        Which::Magnitude => -values[i].abs(),
    };
    idx.sort_by(|&a, &b| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}

/// The k wanted eigenpairs of `op`: single-vector Lanczos for
/// `s.block` = 1, block Lanczos ([`block_eigs`]) for more.
pub fn eigs(op: &mut dyn SymOperator, s: &EigsSettings) -> Result<EigsResult> {
    let n = op.dim();
    if s.k == 0 || s.k > n {
        return Err(Error::Invalid {
            what: "eigenpair count",
            msg: format!("{} must be between 1 and the operator's dimension {n}", s.k),
        });
    }
    if !(s.tol.is_finite() && s.tol > 0.0) {
        return Err(Error::Invalid {
            what: "tolerance",
            msg: format!("{} must be a positive finite number", s.tol),
        });
    }
    if s.max_steps == 0 {
        return Err(Error::Invalid {
            what: "Lanczos steps",
            msg: "the step budget must be at least 1".into(),
        });
    }
    if s.block == 0 {
        return Err(Error::Invalid {
            what: "block size",
            msg: "must be at least 1".into(),
        });
    }
    if s.block > 1 && n > 1 {
        return block_eigs(op, s);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0xe165);
    let start = gaussian_unit(n, &mut rng);
    let max_steps = s.max_steps.min(n).max(s.k);
    let plan = BasisPlan::choose_for(&*op, max_steps, 1, s.basis_budget)?;
    let basis = plan.basis(n, max_steps + 1)?;
    let mut lz = Lanczos::with_basis(op, &start, basis, s.seed)?;
    let mut more = true;
    let mut applications = 0;
    loop {
        while more && lz.steps() < s.min_steps.min(max_steps) {
            more = lz.step()?;
        }
        let t = lz.ritz()?;
        let idx = order(&t.values, s.which);
        let lmax = t.values.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        let beta = lz.last_beta();
        let wanted: Vec<usize> = idx.into_iter().take(s.k).collect();
        let est: Vec<f64> = wanted
            .iter()
            .map(|&i| (beta * t.vectors[i].last().unwrap()).abs())
            .collect();
        let at_end = !more || lz.steps() >= max_steps;
        // The Lanczos estimate |β_m y_m| is cheap; true residuals cost one
        // product per vector, so they are taken only once it says done.
        if at_end || est.iter().all(|e| *e <= s.tol * lmax) {
            let values: Vec<f64> = wanted.iter().map(|&i| t.values[i]).collect();
            let vectors: Vec<Vec<f64>> = wanted
                .iter()
                .map(|&i| lz.combine(&t.vectors[i]))
                .collect::<Result<_>>()?;
            let mut residuals = vec![];
            let mut av = vec![0.0; n];
            for (l, v) in values.iter().zip(&vectors) {
                lz.apply(v, &mut av)?;
                applications += 1;
                let r: Vec<f64> = av.iter().zip(v).map(|(a, x)| a - l * x).collect();
                residuals.push(norm(&r));
            }
            let bound = s.tol * lmax.max(f64::MIN_POSITIVE);
            let converged = residuals.iter().all(|r| *r <= bound);
            if converged || at_end {
                let steps = lz.steps();
                return Ok(EigsResult {
                    values,
                    vectors,
                    residuals,
                    steps,
                    converged,
                    operator_applications: steps + applications,
                    block_products: steps + applications,
                    basis: plan.describe(),
                });
            }
        }
        for _ in 0..10 {
            if lz.steps() >= max_steps || !more {
                break;
            }
            more = lz.step()?;
        }
    }
}
/// Block Lanczos with full reorthogonalisation, `s.block` = b vectors per
/// block product. The basis starts from b Gaussian vectors (the first is
/// the single method's start); each step multiplies the b newest basis
/// vectors in one `apply_block`, orthogonalises every product against the
/// whole basis (two compensated Gram–Schmidt passes, the products of the
/// block in order, so the new vectors come out as a QR factor) and keeps
/// the coefficients: they are the columns of T = Qᵀ A Q, block
/// tridiagonal up to rounding, symmetrised before its dense
/// eigen-decomposition. A rank-deficient product (an invariant subspace)
/// is replaced by a random vector orthogonal to the basis with a zero
/// coupling, as the single method restarts. The residual estimate of a
/// Ritz pair (θ, Q y) is ‖T[pending, :] y‖, the coupling to the block not
/// yet multiplied; true residuals are taken as in the single method, in
/// one block product, once the estimates say done. A cluster or a
/// multiple eigenvalue of up to b members is found from one block.
pub fn block_eigs(op: &mut dyn SymOperator, s: &EigsSettings) -> Result<EigsResult> {
    let n = op.dim();
    let b = s.block.clamp(1, n);
    let max_steps = s.max_steps.min(n).max(s.k);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0xe165);
    let mut restart = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0x1a2c05);
    let plan = BasisPlan::choose_for(&*op, max_steps + b, 1, s.basis_budget)?;
    let mut basis = plan.basis(n, max_steps + b + 1)?;
    // cols[p]: the coefficients of A q_p on q_0, q_1, … (T's column p).
    let mut cols: Vec<Vec<f64>> = vec![];
    let mut scale: f64 = 0.0;
    // w ⟂ the basis, normalised and stored; a random vector instead when
    // w is (numerically) in the span. Returns the coupling (0 for a
    // replacement) or None once the basis spans the space. w is whole;
    // the basis works on its local part (`Basis::local`).
    let mut extend = |basis: &mut Basis, w: Vec<f64>, thresh: f64| -> Result<Option<f64>> {
        if basis.len() >= n {
            return Ok(None);
        }
        let mut w = basis.local(w);
        basis.orthogonalize(&mut w)?;
        let r = basis.norm(&w)?;
        if r > thresh {
            w.iter_mut().for_each(|x| *x /= r);
            basis.push(w)?;
            return Ok(Some(r));
        }
        for _ in 0..3 {
            let mut g = basis.local(gaussian_unit(n, &mut restart));
            basis.orthogonalize(&mut g)?;
            let r = basis.norm(&g)?;
            if r >= 1e-8 {
                g.iter_mut().for_each(|x| *x /= r);
                basis.push(g)?;
                return Ok(Some(0.0));
            }
        }
        Ok(None)
    };
    for _ in 0..b {
        let start = gaussian_unit(n, &mut rng);
        extend(&mut basis, start, 1e-8)?;
    }
    let mut processed = 0usize;
    let mut sweeps = 0usize;
    let mut applications = 0usize;
    let mut next_check = s.min_steps.min(max_steps);
    loop {
        let pending: Vec<usize> = (processed..basis.len()).collect();
        if !pending.is_empty() && processed < max_steps {
            // One block product for the whole pending block (it may be
            // cut at the budget).
            let take = pending.len().min(max_steps - processed);
            let qs: Vec<Vec<f64>> = pending[..take]
                .iter()
                .map(|&j| basis.get(j))
                .collect::<Result<_>>()?;
            let refs: Vec<&[f64]> = qs.iter().map(|q| q.as_slice()).collect();
            let mut ws = vec![vec![0.0; n]; take];
            op.apply_block(&refs, &mut ws)?;
            sweeps += 1;
            for w in ws {
                if let Some(i) = w.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Numerical(format!(
                        "the operator returned {} at entry {i}",
                        w[i]
                    )));
                }
                let mut w = basis.local(w);
                let c1 = basis.dots(&w)?;
                basis.subtract(&mut w, &c1)?;
                let c2 = basis.dots(&w)?;
                basis.subtract(&mut w, &c2)?;
                let mut col: Vec<f64> = c1.iter().zip(&c2).map(|(a, b)| a + b).collect();
                scale = col.iter().fold(scale, |m, x| m.max(x.abs()));
                let r = basis.norm(&w)?;
                if basis.len() < n {
                    if r > 1e-10 * scale.max(f64::MIN_POSITIVE) {
                        w.iter_mut().for_each(|x| *x /= r);
                        basis.push(w)?;
                        col.push(r);
                    } else if extend(&mut basis, vec![0.0; n], f64::INFINITY)?.is_some() {
                        col.push(0.0);
                    }
                }
                cols.push(col);
                processed += 1;
            }
            if processed < next_check && processed < max_steps && basis.len() > processed {
                continue;
            }
        }
        let at_end = processed >= max_steps || basis.len() == processed;
        next_check = processed + 10usize.max(b);
        let m = processed;
        let t = faer::Mat::<f64>::from_fn(m, m, |i, j| {
            let a = cols[j].get(i).copied().unwrap_or(0.0);
            let c = cols[i].get(j).copied().unwrap_or(0.0);
            0.5 * (a + c)
        });
        let evd = t
            .self_adjoint_eigen(faer::Side::Lower)
            .map_err(|e| Error::Numerical(format!("symmetric eigensolver: {e:?}")))?;
        let theta: Vec<f64> = (0..m).map(|i| evd.S().column_vector()[i]).collect();
        let u = evd.U();
        let idx = order(&theta, s.which);
        let lmax = theta.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let wanted: Vec<usize> = idx.into_iter().take(s.k).collect();
        let ys: Vec<Vec<f64>> = wanted
            .iter()
            .map(|&k| (0..m).map(|i| u[(i, k)]).collect())
            .collect();
        let est: Vec<f64> = ys
            .iter()
            .map(|y| {
                (m..basis.len())
                    .map(|i| {
                        y.iter()
                            .enumerate()
                            .map(|(p, yp)| cols[p].get(i).copied().unwrap_or(0.0) * yp)
                            .sum::<f64>()
                            .powi(2)
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        if at_end || est.iter().all(|e| *e <= s.tol * lmax) {
            let values: Vec<f64> = wanted.iter().map(|&k| theta[k]).collect();
            let vectors: Vec<Vec<f64>> = ys
                .iter()
                .map(|y| basis.combine(y, n))
                .collect::<Result<_>>()?;
            let refs: Vec<&[f64]> = vectors.iter().map(|v| v.as_slice()).collect();
            let mut avs = vec![vec![0.0; n]; vectors.len()];
            for lo in (0..vectors.len()).step_by(b) {
                let hi = (lo + b).min(vectors.len());
                op.apply_block(&refs[lo..hi], &mut avs[lo..hi])?;
                sweeps += 1;
            }
            applications += vectors.len();
            let residuals: Vec<f64> = values
                .iter()
                .zip(&vectors)
                .zip(&avs)
                .map(|((l, v), av)| {
                    let r: Vec<f64> = av.iter().zip(v).map(|(a, x)| a - l * x).collect();
                    norm(&r)
                })
                .collect();
            let bound = s.tol * lmax.max(f64::MIN_POSITIVE);
            let converged = residuals.iter().all(|r| *r <= bound);
            if converged || at_end {
                return Ok(EigsResult {
                    values,
                    vectors,
                    residuals,
                    steps: processed,
                    converged,
                    operator_applications: processed + applications,
                    block_products: sweeps,
                    basis: plan.describe(),
                });
            }
        }
    }
}

/// Fraction of ‖g‖² in the span of the first k vectors, k = 1..=len.
/// The vectors must be orthonormal (Ritz vectors of one Lanczos basis are).
pub fn gradient_fractions(g: &[f64], vectors: &[Vec<f64>]) -> Vec<f64> {
    let gg = crate::spectral::compensated::dot(g, g);
    let mut acc = 0.0;
    vectors
        .iter()
        .map(|u| {
            let c = crate::spectral::compensated::dot(g, u);
            acc += c * c;
            if gg > 0.0 {
                acc / gg
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spectral::{DenseOperator, DiagonalOperator};
    use rand::Rng;

    /// Counts single products and block products.
    struct Calls<'a> {
        inner: &'a mut dyn SymOperator,
        apply: usize,
        blocks: usize,
    }

    impl SymOperator for Calls<'_> {
        fn dim(&self) -> usize {
            self.inner.dim()
        }
        fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
            self.apply += 1;
            self.inner.apply(v, out)
        }
        fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
            self.blocks += 1;
            self.inner.apply_block(vs, outs)
        }
    }

    /// (values, calls of `apply`, calls of `apply_block`).
    fn run(op: &mut dyn SymOperator, s: &EigsSettings) -> (EigsResult, usize, usize) {
        let mut c = Calls {
            inner: op,
            apply: 0,
            blocks: 0,
        };
        let r = eigs(&mut c, s).unwrap();
        (r, c.apply, c.blocks)
    }

    /// The k wanted ones of a known spectrum, in `which` order.
    fn truth(d: &[f64], k: usize, which: Which) -> Vec<f64> {
        order(d, which).into_iter().take(k).map(|i| d[i]).collect()
    }

    /// A converged Ritz value has an eigenvalue within its residual (‖r‖ ≤
    /// tol·|λmax|), and k converged orthonormal Ritz pairs match the k
    /// wanted eigenvalues in order: the tolerance is the residual bound.
    fn check_against(r: &EigsResult, want: &[f64], tol: f64, lmax: f64, what: &str) {
        assert!(
            r.converged,
            "{what}: not converged, residuals {:?}",
            r.residuals
        );
        for (i, (a, b)) in r.values.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * lmax,
                "{what}: λ{i} {a} against {b} ({:e})",
                (a - b).abs()
            );
        }
    }

    /// A well-separated top on a wide diagonal: single and block Lanczos
    /// both converge to the known top 5; block Lanczos with b = 4 takes
    /// fewer block products than the single method takes products.
    #[test]
    fn block_lanczos_matches_single_with_fewer_sweeps() {
        let n = 600;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut d: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
        for (i, x) in [50.0, 40.0, 33.0, 30.0, 28.0, -45.0].iter().enumerate() {
            d[i] = *x;
        }
        for which in [Which::Largest, Which::Magnitude, Which::Smallest] {
            let want = truth(&d, 5, which);
            let mut s = EigsSettings::new(5, which);
            let (single, applies, _) = run(&mut DiagonalOperator { d: d.clone() }, &s);
            s.block = 4;
            let (block, _, sweeps) = run(&mut DiagonalOperator { d: d.clone() }, &s);
            check_against(&single, &want, s.tol, 50.0, "single");
            check_against(&block, &want, s.tol, 50.0, "block");
            assert_eq!(single.block_products, applies);
            assert_eq!(block.block_products, sweeps);
            println!(
                "{which:?}: single {applies} products, block-4 {sweeps} block products ({} products)",
                block.operator_applications
            );
            assert!(sweeps < applies, "{which:?}: {sweeps} sweeps ≥ {applies}");
        }
    }

    /// A dense matrix Q diag(d) Qᵀ whose top eigenvalue is triple and
    /// followed by a tight cluster: block Lanczos (b = 4) returns all
    /// three copies and the cluster to the residual tolerance, with fewer
    /// block products than the single method spends (its budget, when it
    /// cannot separate the copies).
    #[test]
    fn block_lanczos_resolves_a_degenerate_top() {
        let n = 160;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut d: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 3.0 - 1.0).collect();
        for (i, x) in [8.0, 8.0, 8.0, 7.5, 7.5 - 1e-4, 7.5 - 2e-4]
            .iter()
            .enumerate()
        {
            d[i] = *x;
        }
        // A random orthogonal Q by Gram–Schmidt (twice) on Gaussian columns.
        let mut q: Vec<Vec<f64>> = vec![];
        while q.len() < n {
            let mut v = gaussian_unit(n, &mut rng);
            for _ in 0..2 {
                for u in &q {
                    let c: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                    v.iter_mut().zip(u).for_each(|(a, b)| *a -= c * b);
                }
            }
            let r = norm(&v);
            v.iter_mut().for_each(|x| *x /= r);
            q.push(v);
        }
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| q[k][i] * d[k] * q[k][j]).sum();
            }
        }
        let want = truth(&d, 6, Which::Largest);
        let mut s = EigsSettings::new(6, Which::Largest);
        s.max_steps = n;
        s.block = 4;
        let (block, _, sweeps) = run(&mut DenseOperator { n, a: a.clone() }, &s);
        check_against(&block, &want, s.tol, 8.0, "block");
        s.block = 1;
        let (single, applies, _) = run(&mut DenseOperator { n, a }, &s);
        println!(
            "single: {applies} products, converged {}, top {:?}; block-4: {sweeps} block products",
            single.converged, single.values
        );
        assert!(sweeps < applies, "{sweeps} sweeps ≥ {applies}");
    }

    #[test]
    fn block_size_zero_is_refused() {
        let mut s = EigsSettings::new(1, Which::Largest);
        s.block = 0;
        let e = eigs(&mut DiagonalOperator { d: vec![1.0, 2.0] }, &s).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Invalid {
                    what: "block size",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Single and block Lanczos both refuse a basis the budget cannot
    /// hold even in f32 (30 entries × 31 vectors × 4 bytes = 3720; block
    /// Lanczos keeps b more), and run within one that holds it in f32 only.
    #[test]
    fn eigs_respects_the_basis_budget() {
        let d: Vec<f64> = (0..30).map(|i| i as f64 * 0.5 - 3.0).collect();
        for block in [1, 3] {
            let mut s = EigsSettings::new(2, Which::Largest);
            s.max_steps = 30;
            s.block = block;
            s.basis_budget = BasisBudget(1000);
            let e = eigs(&mut DiagonalOperator { d: d.clone() }, &s).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Invalid {
                        what: "basis budget",
                        ..
                    }
                ),
                "{e}"
            );
            let extra = if block > 1 { block } else { 0 };
            s.basis_budget = BasisBudget(30 * (31 + extra) * 4);
            let r = eigs(&mut DiagonalOperator { d: d.clone() }, &s).unwrap();
            assert!(
                (r.values[0] - 11.5).abs() < 1e-5,
                "block {block}: {:?}",
                r.values
            );
        }
    }
}

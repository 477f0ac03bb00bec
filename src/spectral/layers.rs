//! Layerwise spectra: the Hessian's diagonal block over a set of parameter
//! indices (one layer's, one name-prefix group's, or one of Q, K, V of a
//! fused attention projection) as an operator of its own, and how block
//! densities compare with the full one and with each other.

use crate::error::Result;
use crate::spectral::operator::SymOperator;
use crate::spectral::slq::integrate;
use std::ops::Range;

/// H restricted to an index set: v ↦ P H Pᵀ v, one full product per
/// application. The set is a list of disjoint ascending ranges (one range
/// for a contiguous block, the fast path: one copy in, one copy out; a
/// strided block such as GPT-2's Q columns of `c_attn.weight` is D runs of
/// D entries); the block's coordinates are the set's indices in order.
pub struct BlockOperator<'a> {
    pub inner: &'a mut dyn SymOperator,
    pub ranges: Vec<Range<usize>>,
    len: usize,
    full_in: Vec<f64>,
    full_out: Vec<f64>,
}

impl<'a> BlockOperator<'a> {
    /// The contiguous block `range`.
    pub fn new(inner: &'a mut dyn SymOperator, range: Range<usize>) -> BlockOperator<'a> {
        Self::with_ranges(inner, vec![range])
    }
    /// The block over the union of `ranges` (disjoint, ascending, each
    /// inside 0..inner.dim(); see [`check_ranges`]).
    pub fn with_ranges(
        inner: &'a mut dyn SymOperator,
        ranges: Vec<Range<usize>>,
    ) -> BlockOperator<'a> {
        let n = inner.dim();
        let len = ranges.iter().map(|r| r.len()).sum();
        BlockOperator {
            inner,
            ranges,
            len,
            full_in: vec![0.0; n],
            full_out: vec![0.0; n],
        }
    }
    fn scatter(&self, v: &[f64], full: &mut [f64]) {
        let mut at = 0;
        for r in &self.ranges {
            full[r.clone()].copy_from_slice(&v[at..at + r.len()]);
            at += r.len();
        }
    }
    fn gather(&self, full: &[f64], out: &mut [f64]) {
        let mut at = 0;
        for r in &self.ranges {
            out[at..at + r.len()].copy_from_slice(&full[r.clone()]);
            at += r.len();
        }
    }
}

impl SymOperator for BlockOperator<'_> {
    fn dim(&self) -> usize {
        self.len
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        let mut full_in = std::mem::take(&mut self.full_in);
        let mut full_out = std::mem::take(&mut self.full_out);
        full_in.iter_mut().for_each(|x| *x = 0.0);
        self.scatter(v, &mut full_in);
        let r = self.inner.apply(&full_in, &mut full_out);
        if r.is_ok() {
            self.gather(&full_out, out);
        }
        self.full_in = full_in;
        self.full_out = full_out;
        r
    }
    /// One block product of the full operator for the whole block.
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        let n = self.inner.dim();
        if self.len == n {
            return self.inner.apply_block(vs, outs);
        }
        let full_in: Vec<Vec<f64>> = vs
            .iter()
            .map(|v| {
                let mut f = vec![0.0; n];
                self.scatter(v, &mut f);
                f
            })
            .collect();
        let refs: Vec<&[f64]> = full_in.iter().map(|v| v.as_slice()).collect();
        let mut full_out = vec![vec![0.0; n]; vs.len()];
        self.inner.apply_block(&refs, &mut full_out)?;
        for (out, f) in outs.iter_mut().zip(&full_out) {
            self.gather(f, out);
        }
        Ok(())
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn crate::spectral::lanczos::BasisDevice>> {
        self.inner.basis_device()
    }
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
        self.inner.basis_ranks()
    }
}

/// Bhattacharyya coefficient ∫ √(p q) of two densities on one grid: 1 for
/// identical shapes, 0 for disjoint supports. Chosen over L1 or KL because
/// it is symmetric, bounded, finite where one density vanishes (KL is not),
/// and weighs the bulk and the outliers by their shared mass rather than
/// by the large pointwise differences of a narrow bulk peak.
pub fn bhattacharyya(grid: &[f64], p: &[f64], q: &[f64]) -> f64 {
    let f: Vec<f64> = p
        .iter()
        .zip(q)
        .map(|(a, b)| (a.max(0.0) * b.max(0.0)).sqrt())
        .collect();
    integrate(grid, &f)
}

/// The Jensen–Shannon distance between two densities sampled on one
/// uniform grid, as Zhang et al. (NeurIPS 2024) compare blocks and as
/// scipy's `jensenshannon(p, q, base=2)`: each density, negatives clamped
/// to 0, is normalised to a discrete distribution over the grid points;
/// JSD = ½ KL(p‖m) + ½ KL(q‖m) with m = (p + q)/2 in log base 2, terms with
/// p_i = 0 counting 0 (the limit of x log x; so do subnormal p_i, whose
/// terms are below 1e-308); the distance is √JSD, in [0, 1]. None where a
/// density has no positive mass on the grid.
pub fn js_distance(p: &[f64], q: &[f64]) -> Option<f64> {
    let sp: f64 = p.iter().map(|x| x.max(0.0)).sum();
    let sq: f64 = q.iter().map(|x| x.max(0.0)).sum();
    if !(sp > 0.0 && sq > 0.0 && sp.is_finite() && sq.is_finite()) {
        return None;
    }
    let mut d = 0.0;
    for (a, b) in p.iter().zip(q) {
        let (a, b) = (a.max(0.0) / sp, b.max(0.0) / sq);
        let m = 0.5 * (a + b);
        // A subnormal probability counts 0 (its term is below 1e-308, and
        // m could round to 0 beside it); for a normal one a/m is in
        // [2.2e-308, 2], so every term is finite.
        if a >= f64::MIN_POSITIVE {
            d += 0.5 * a * (a / m).log2();
        }
        if b >= f64::MIN_POSITIVE {
            d += 0.5 * b * (b / m).log2();
        }
    }
    // Rounding may leave a tiny negative or a hair above 1.
    Some(d.clamp(0.0, 1.0).sqrt())
}

/// The symmetric matrix of [`js_distance`] between every pair of
/// densities, zero on the diagonal (None where undefined).
pub fn js_matrix(densities: &[Vec<f64>]) -> Vec<Vec<Option<f64>>> {
    let k = densities.len();
    let mut m = vec![vec![Some(0.0); k]; k];
    for i in 0..k {
        if js_distance(&densities[i], &densities[i]).is_none() {
            m[i][i] = None;
        }
        for j in i + 1..k {
            let d = js_distance(&densities[i], &densities[j]);
            m[i][j] = d;
            m[j][i] = d;
        }
    }
    m
}

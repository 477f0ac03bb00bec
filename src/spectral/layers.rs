//! Layerwise spectra: the Hessian's diagonal block over one layer's (or one
//! name-prefix group's) parameters, as an operator of its own, and how a
//! layer's density compares with the full one.

use crate::error::Result;
use crate::spectral::operator::SymOperator;
use crate::spectral::slq::integrate;
use std::ops::Range;

/// H restricted to `range`: v ↦ P H Pᵀ v, one full product per application.
pub struct BlockOperator<'a> {
    pub inner: &'a mut dyn SymOperator,
    pub range: Range<usize>,
    full_in: Vec<f64>,
    full_out: Vec<f64>,
}

impl<'a> BlockOperator<'a> {
    pub fn new(inner: &'a mut dyn SymOperator, range: Range<usize>) -> BlockOperator<'a> {
        let n = inner.dim();
        BlockOperator {
            inner,
            range,
            full_in: vec![0.0; n],
            full_out: vec![0.0; n],
        }
    }
}

impl SymOperator for BlockOperator<'_> {
    fn dim(&self) -> usize {
        self.range.len()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.full_in.iter_mut().for_each(|x| *x = 0.0);
        self.full_in[self.range.clone()].copy_from_slice(v);
        self.inner.apply(&self.full_in, &mut self.full_out)?;
        out.copy_from_slice(&self.full_out[self.range.clone()]);
        Ok(())
    }
    /// One block product of the full operator for the whole block.
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        let n = self.inner.dim();
        if self.range.len() == n {
            return self.inner.apply_block(vs, outs);
        }
        let full_in: Vec<Vec<f64>> = vs
            .iter()
            .map(|v| {
                let mut f = vec![0.0; n];
                f[self.range.clone()].copy_from_slice(v);
                f
            })
            .collect();
        let refs: Vec<&[f64]> = full_in.iter().map(|v| v.as_slice()).collect();
        let mut full_out = vec![vec![0.0; n]; vs.len()];
        self.inner.apply_block(&refs, &mut full_out)?;
        for (out, f) in outs.iter_mut().zip(&full_out) {
            out.copy_from_slice(&f[self.range.clone()]);
        }
        Ok(())
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn crate::spectral::lanczos::BasisDevice>> {
        self.inner.basis_device()
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

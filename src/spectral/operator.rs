//! The matrix-free symmetric operator every solver works on: the GPU HVP,
//! the float64 CPU reference, a layer's diagonal block, or a test matrix.

use crate::error::Result;
use crate::spectral::lanczos::BasisDevice;

pub trait SymOperator {
    /// Dimension n of the (n x n) operator.
    fn dim(&self) -> usize;
    /// out = A v. `v` and `out` have length `dim()`.
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()>;
    /// outs[j] = A vs[j] for every j: a block of products. Operators that
    /// share work between the vectors of a block (the executors' block
    /// Hessian products: one sweep over the data for K vectors) override
    /// it; the result is the same as `apply` on each vector.
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        for (v, out) in vs.iter().zip(outs.iter_mut()) {
            self.apply(v, out)?;
        }
        Ok(())
    }
    /// A device the solvers may keep their Lanczos bases on (a GPU
    /// engine's, `BasisPlan::choose`); None: host memory.
    fn basis_device(&self) -> Option<std::rc::Rc<dyn BasisDevice>> {
        None
    }
}

/// A dense symmetric matrix (row-major), for tests and small models.
pub struct DenseOperator {
    pub n: usize,
    pub a: Vec<f64>,
}

impl SymOperator for DenseOperator {
    fn dim(&self) -> usize {
        self.n
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        for (i, o) in out.iter_mut().enumerate() {
            let row = &self.a[i * self.n..(i + 1) * self.n];
            *o = row.iter().zip(v).map(|(a, b)| a * b).sum();
        }
        Ok(())
    }
}

/// A diagonal operator, for orthogonality tests with wide spectra.
pub struct DiagonalOperator {
    pub d: Vec<f64>,
}

impl SymOperator for DiagonalOperator {
    fn dim(&self) -> usize {
        self.d.len()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        for ((o, d), x) in out.iter_mut().zip(&self.d).zip(v) {
            *o = d * x;
        }
        Ok(())
    }
}

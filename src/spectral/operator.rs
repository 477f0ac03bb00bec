//! The matrix-free symmetric operator every solver works on: the GPU HVP,
//! the float64 CPU reference, a layer's diagonal block, or a test matrix.

use crate::error::Result;

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
    /// The ranks whose products this operator sums (MPI), over which the
    /// solvers may shard their Lanczos bases where they do not fit one
    /// rank (`BasisPlan::choose_for`); None: one process.
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
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

/// Basis vectors kept on a device, with the products reorthogonalisation
/// takes. Vectors are stored in f32; products are compensated.
pub trait DeviceBasis {
    /// Vectors stored.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Vectors it has room for.
    fn capacity(&self) -> usize;
    /// Stores q (refused past the capacity) and returns it as stored
    /// (rounded to f32).
    fn push(&mut self, q: &[f64]) -> Result<Vec<f64>>;
    /// Stored vector j.
    fn get(&mut self, j: usize) -> Result<Vec<f64>>;
    /// q_j · w for every stored q_j.
    fn dots(&mut self, w: &[f64]) -> Result<Vec<f64>>;
    /// Σ_j c_j q_j over the first c.len() stored vectors.
    fn combination(&mut self, c: &[f64]) -> Result<Vec<f64>>;
}

/// A device an operator offers for its Lanczos bases.
pub trait BasisDevice {
    /// Bytes the bases of one solve may take there together.
    fn budget(&self) -> usize;
    /// Whether bases must live there (refused where they do not fit), or
    /// only should (the host's otherwise).
    fn required(&self) -> bool;
    /// The device's name, for messages and reports.
    fn name(&self) -> String;
    /// Room for `vectors` vectors of `n` entries.
    fn allocate(&self, n: usize, vectors: usize) -> Result<Box<dyn DeviceBasis>>;
}

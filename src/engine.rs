//! What every executor (float64 CPU reference, GPU) offers the solvers:
//! the loss, its gradient and exact Hessian-vector products over a data set.

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{Model, Weights};
use crate::spectral::SymOperator;

pub use crate::operator::Operator;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BnMode {
    /// PyTorch train(): normalise by each batch's own statistics.
    Batch,
    /// PyTorch eval(): normalise by the running buffers.
    Running,
}

/// A model, its weights and the data the loss is taken over.
#[derive(Clone, Debug)]
pub struct Problem {
    pub model: Model,
    pub weights: Weights,
    pub data: Dataset,
    pub batch: usize,
    pub bn: BnMode,
}

impl Problem {
    pub fn new(
        model: Model,
        weights: Weights,
        data: Dataset,
        batch: usize,
        bn: BnMode,
    ) -> Result<Problem> {
        data.validate(&model)?;
        crate::layers::check_graph(&model)?;
        if batch == 0 {
            return Err(Error::Invalid {
                what: "batch size",
                msg: "must be at least 1".into(),
            });
        }
        if weights.theta.len() != model.n_params {
            return Err(Error::Invalid {
                what: "weights",
                msg: format!(
                    "{} values for {} parameters",
                    weights.theta.len(),
                    model.n_params
                ),
            });
        }
        if bn == BnMode::Batch {
            // PyTorch refuses this too: one value per channel has no variance.
            let smallest = data
                .batches(batch)
                .iter()
                .map(|(_, c)| *c)
                .min()
                .unwrap_or(0);
            let one_value = model.nodes.iter().any(|n| {
                matches!(n.op, crate::model::Op::BatchNorm { .. })
                    && smallest * n.in_shape.spatial() == 1
            });
            if one_value {
                return Err(Error::Invalid {
                    what: "batch size",
                    msg: "a batch of one sample leaves one value per channel at a 1x1 batch norm: no batch statistics".into(),
                });
            }
        }
        Ok(Problem {
            model,
            weights,
            data,
            batch,
            bn,
        })
    }
}

/// Loss, gradient and Hv of L = (1/N)·Σ per-sample losses.
pub trait Curvature {
    fn n_params(&self) -> usize;
    /// (L, ∇L).
    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)>;
    /// out = H v, exactly (R-operator), over every batch.
    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()>;
    /// outs[j] = H vs[j] for every j, exactly as `hvp` on each: executors
    /// that share the forward pass, its caches and the weights between the
    /// K tangents of one sweep override it. `outs[j]` has `n_params()`
    /// values.
    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        if vs.len() != outs.len() {
            return Err(Error::Invalid {
                what: "output vectors",
                msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
            });
        }
        for (v, out) in vs.iter().zip(outs.iter_mut()) {
            self.hvp(v, out)?;
        }
        Ok(())
    }
    /// outs[j] = A vs[j] for the curvature matrix `op` (`crate::operator`):
    /// the Hessian (`hvp_block`), the Gauss–Newton term G = Jᵀ H_L J or the
    /// residual E = H − G. Executors that offer only the Hessian refuse the
    /// others, naming the operator.
    fn product_block(&mut self, op: Operator, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        match op {
            Operator::Hessian => self.hvp_block(vs, outs),
            other => Err(Error::Invalid {
                what: "operator",
                msg: format!(
                    "the {} engine ({}) computes no {} products (`--operator {}`); use --operator hessian",
                    self.backend(),
                    self.adapter(),
                    other.describe(),
                    other.name()
                ),
            }),
        }
    }
    /// out = A v for the curvature matrix `op`: `hvp` for the Hessian,
    /// else a block of one.
    fn product(&mut self, op: Operator, v: &[f64], out: &mut [f64]) -> Result<()> {
        if op == Operator::Hessian {
            return self.hvp(v, out);
        }
        check_out_len(out, self.n_params())?;
        let mut outs = vec![vec![0.0; out.len()]];
        self.product_block(op, &[v], &mut outs)?;
        out.copy_from_slice(&outs[0]);
        Ok(())
    }
    /// The block size one sweep serves best within the executor's memory
    /// (1: block products are K single products).
    fn preferred_block(&self) -> usize {
        1
    }
    /// (L, ∇L, Hv) together; executors that share the forward pass override it.
    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        let (loss, grad) = self.loss_grad()?;
        let mut hv = vec![0.0; v.len()];
        self.hvp(v, &mut hv)?;
        Ok((loss, grad, hv))
    }
    /// A device the solvers may keep their Lanczos bases on
    /// (`SymOperator::basis_device`); None: host memory.
    fn basis_device(&self) -> Option<std::rc::Rc<dyn crate::spectral::lanczos::BasisDevice>> {
        None
    }
    /// The ranks this engine's products are summed over (MPI), for
    /// sharded Lanczos bases (`SymOperator::basis_ranks`); None: one process.
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
        None
    }
    /// The piecewise decisions (ReLU/LeakyReLU sides, max-pool choices)
    /// the products take at the current θ: where they come from and how
    /// many lie within float32 rounding of their threshold, per layer
    /// (`crate::decisions`). None for a model that takes none.
    fn decision_report(&mut self) -> Result<Option<crate::decisions::DecisionReport>> {
        Ok(None)
    }
    /// `cpu`, `vulkan`, `gl`, ...
    fn backend(&self) -> String;
    /// The adapter's name (`float64 reference` for the CPU).
    fn adapter(&self) -> String;
    /// Which kernel variants a GPU engine's programs run, in words (conv
    /// path and tile, reductions whole or split); None for the CPU.
    fn kernel_paths(&self) -> Option<String> {
        None
    }
}

/// Refuses an output slice that is not parameter-shaped.
pub(crate) fn check_out_len(out: &[f64], n_params: usize) -> Result<()> {
    if out.len() != n_params {
        return Err(Error::Invalid {
            what: "output vector",
            msg: format!("{} values for {} parameters", out.len(), n_params),
        });
    }
    Ok(())
}

/// The Hessian as a symmetric operator for the spectral solvers.
pub struct Hessian<'a>(pub &'a mut dyn Curvature);

impl SymOperator for Hessian<'_> {
    fn dim(&self) -> usize {
        self.0.n_params()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.0.hvp(v, out)
    }
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        self.0.hvp_block(vs, outs)
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn crate::spectral::lanczos::BasisDevice>> {
        self.0.basis_device()
    }
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
        self.0.basis_ranks()
    }
}

/// An executor's products of one operator as a symmetric operator for the
/// spectral solvers (`engine::Hessian` is this with `Operator::Hessian`).
pub struct CurvatureOperator<'a> {
    pub engine: &'a mut dyn Curvature,
    pub op: Operator,
}

impl<'a> CurvatureOperator<'a> {
    pub fn new(engine: &'a mut dyn Curvature, op: Operator) -> CurvatureOperator<'a> {
        CurvatureOperator { engine, op }
    }
}

impl SymOperator for CurvatureOperator<'_> {
    fn dim(&self) -> usize {
        self.engine.n_params()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.engine.product(self.op, v, out)
    }
    fn apply_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        self.engine.product_block(self.op, vs, outs)
    }
    fn basis_device(&self) -> Option<std::rc::Rc<dyn crate::spectral::lanczos::BasisDevice>> {
        self.engine.basis_device()
    }
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn crate::spectral::shard::Collective>> {
        self.engine.basis_ranks()
    }
}

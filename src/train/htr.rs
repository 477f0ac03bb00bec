//! The Hessian-trace regulariser's settings, probes and step parts.

use super::recipe::invalid;
use crate::cpu::BnMoments;
use crate::error::Result;
use crate::model::Model;
use crate::trace_grad::LayerSet;

/// Which Hutchinson probes the regulariser draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeDist {
    /// ±1 entries: the lower-variance Hutchinson estimator (see [`Htr`]).
    #[default]
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

/// The Hessian-trace regulariser of Sankar et al.: on a regularised step
/// the gradient gains γ·∇θ[(1/P) Σₖ vₖᵀ H_S vₖ], H_S the Hessian's diagonal
/// block over the layer set S of the step's own mini-batch loss (batch
/// norm on the mini-batch's statistics, as the step's forward), the vₖ
/// drawn by [`htr_probes`] for that step, zero outside S.
///
/// Rademacher probes by default: for a symmetric A the Hutchinson
/// estimate zᵀAz has variance 2(‖A‖²_F − Σᵢ A²ᵢᵢ) with Rademacher z and
/// 2‖A‖²_F with Gaussian z (E z⁴ = 1 against 3), so Rademacher is never
/// worse and removes the diagonal's share entirely; with P = 1 probe per
/// step that variance is the noise the regulariser injects. It is also
/// what PyHessian's trace (and `hesscope trace`/`trace-grad`) use.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Htr {
    /// γ, the regulariser's weight.
    pub gamma: f64,
    /// The layer set S (`all`, `middle`, module names; [`LayerSet::parse`]).
    pub layers: String,
    /// Probes P per regularised step.
    pub probes: usize,
    /// A step is regularised when the steps taken before it are a
    /// multiple of `every` (counted over the whole run) ...
    pub every: usize,
    /// ... and at least `from_epoch` epochs have finished (0: from the
    /// first step).
    pub from_epoch: usize,
    pub dist: ProbeDist,
}

impl Htr {
    pub fn check(&self, model: &Model) -> Result<LayerSet> {
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(invalid(
                "htr gamma",
                format!("{} is not a finite number ≥ 0", self.gamma),
            ));
        }
        if self.probes == 0 {
            return Err(invalid("htr probes", "must be at least 1"));
        }
        if self.every == 0 {
            return Err(invalid("htr every", "must be at least 1"));
        }
        LayerSet::parse(model, &self.layers)
    }

    /// Whether step `step` (0-based over the run) of epoch `epoch`
    /// (0-based) is regularised.
    pub fn active(&self, epoch: usize, step: usize) -> bool {
        epoch >= self.from_epoch && step.is_multiple_of(self.every)
    }
}

/// The probes of step `step` (0-based over the run) in epoch `epoch`
/// (0-based): [`LayerSet::rademacher`] or [`LayerSet::gaussian`] seeded by
/// `seed ^ 0x4854_5200_0000_0000 ^ (epoch+1)·0x9E37_79B9_7F4A_7C15 ^
/// (step+1)·0xC2B2_AE3D_27D4_EB4F`.
pub fn htr_probes(
    model: &Model,
    set: &LayerSet,
    count: usize,
    dist: ProbeDist,
    seed: u64,
    epoch: usize,
    step: usize,
) -> Result<Vec<Vec<f64>>> {
    let s = seed
        ^ 0x4854_5200_0000_0000
        ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    match dist {
        ProbeDist::Rademacher => set.rademacher(model, count, s),
        ProbeDist::Gaussian => set.gaussian(model, count, s),
    }
}

/// The regulariser's part of one step.
#[derive(Clone, Debug)]
pub struct HtrStep {
    /// (1/P) Σₖ vₖᵀ H_S vₖ on the mini-batch.
    pub estimate: f64,
    /// Its gradient ∇θ (not yet multiplied by γ).
    pub grad: Vec<f64>,
    pub probes: Vec<Vec<f64>>,
}

/// What a step's update is made of.
pub struct StepGradient {
    /// The mini-batch's mean cross-entropy.
    pub loss: f64,
    /// Its gradient ∇L_B.
    pub data_grad: Vec<f64>,
    /// On a regularised step.
    pub htr: Option<HtrStep>,
    /// Per batch-norm node, the mini-batch's moments.
    pub bn: Vec<BnMoments>,
}

impl StepGradient {
    /// g = ∇L_B + γ·∇θ(trace estimate) + wd·θ: what momentum and the
    /// learning rate act on.
    pub fn total(&self, gamma: f64, weight_decay: f64, theta: &[f64]) -> Vec<f64> {
        let mut g = self.data_grad.clone();
        if let Some(h) = &self.htr {
            g.iter_mut()
                .zip(&h.grad)
                .for_each(|(gi, t)| *gi += gamma * t);
        }
        if weight_decay != 0.0 {
            g.iter_mut()
                .zip(theta)
                .for_each(|(gi, t)| *gi += weight_decay * t);
        }
        g
    }
}

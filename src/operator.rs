//! Which curvature matrix the products are of: the Hessian H of the loss,
//! its generalised Gauss–Newton term G = Jᵀ H_L J (J the Jacobian of the
//! batch's logits with respect to θ, H_L the Hessian of the loss with
//! respect to the logits: softmax cross-entropy's (diag(p) − p pᵀ)/N per
//! sample, or per labelled token of a language model over N·(T−1)), or
//! the residual E = H − G (Papyan 2019, 2020: G carries the class
//! outliers, E the rest).
//!
//! In batch-mode batch norm the logits of a batch depend on every sample
//! of it; J is then the Jacobian of the whole batch's logits (as
//! `torch.func.jvp`/`vjp` of the batched function give it).

/// The curvature matrix of a product (`Curvature::product_block`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operator {
    /// H, the Hessian of the loss (Pearlmutter's R-operator).
    #[default]
    Hessian,
    /// G = Jᵀ H_L J: an R-forward pass to the logits, the loss Hessian's
    /// product there, and a plain backward pass of that vector.
    Ggn,
    /// E = H − G: the part of H that the network's own second derivatives
    /// weighted by the loss gradient make.
    Residual,
}

impl Operator {
    /// `hessian`, `ggn`, `residual` (the CLI's and the reports' word).
    pub fn name(self) -> &'static str {
        match self {
            Operator::Hessian => "hessian",
            Operator::Ggn => "ggn",
            Operator::Residual => "residual",
        }
    }

    /// A phrase for titles and messages.
    pub fn describe(self) -> &'static str {
        match self {
            Operator::Hessian => "Hessian",
            Operator::Ggn => "Gauss–Newton",
            Operator::Residual => "residual (H − G)",
        }
    }

    /// Every operator, in the order of Papyan's decomposition H = G + E.
    pub const ALL: [Operator; 3] = [Operator::Hessian, Operator::Ggn, Operator::Residual];
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The outliers of a spectrum's top values (largest first): how many lie
/// above the widest ratio gap λ_i/λ_(i+1) among the positive ones, and
/// that ratio (0 and 1 with fewer than two positive values).
pub fn outliers(top: &[f64]) -> (usize, f64) {
    let pos: Vec<f64> = top.iter().copied().take_while(|x| *x > 0.0).collect();
    let mut best = (0, 1.0);
    for i in 1..pos.len() {
        let r = pos[i - 1] / pos[i];
        if r > best.1 {
            best = (i, r);
        }
    }
    best
}

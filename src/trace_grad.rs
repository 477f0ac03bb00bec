//! The gradient of a Hutchinson trace estimate, ∇θ[(1/P) Σₖ vₖᵀ H vₖ],
//! over probes restricted to a layer set S: the term a Hessian-trace
//! regulariser adds to the gradient.
//!
//! Each term ∇θ(vᵀH(θ)v) is the third derivative D³L[v, v, ·], which by
//! symmetry of the third-derivative tensor equals d/dε H(θ+εv)·v at ε = 0.
//! Method: a central difference of exact (R-operator) Hessian-vector
//! products along v, with every piecewise decision (ReLU/LeakyReLU masks,
//! max-pool argmax) frozen at θ ([`CpuReference::frozen`]), refined by
//! Richardson extrapolation over halved steps. Frozen, the loss along the
//! line θ+εv is analytic (the piece of θ continued), so the extrapolated
//! difference converges at O(h^(2·levels)) and is the derivative autograd
//! takes; an unfrozen difference whose step lets a mask flip is wrong by
//! orders of magnitude. Why not a third-order pass: it would need a
//! forward-over-forward-over-reverse pass in every unit on both executors;
//! the frozen differences reuse the exact, tested passes and reach ≤ 7e-12
//! relative on the fixtures, ≤ 1e-13 on two of three (tests/trace_grad.rs
//! measures it; the Richardson tableau's last correction is reported as a
//! conservative error estimate).

use crate::cpu::CpuReference;
use crate::engine::{Curvature, Problem};
use crate::error::{Error, Result};
use crate::model::Model;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A set of trainable tensors (by index in parameter order).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSet {
    /// How it was asked for (`all`, `middle`, `block2,fc`).
    pub spec: String,
    pub tensors: Vec<usize>,
}

impl LayerSet {
    /// `all`; `middle` (Sankar et al.: the tensors with ⌊n/4⌋ ≤ i < ⌊3n/4⌋
    /// of n in parameter order); or comma-separated module names or name
    /// prefixes (`block2,fc`: every tensor named `block2` or `block2.…`).
    pub fn parse(model: &Model, spec: &str) -> Result<LayerSet> {
        let n = model.params.len();
        let tensors: Vec<usize> = match spec.trim() {
            "all" => (0..n).collect(),
            "middle" => (n / 4..3 * n / 4).collect(),
            list => {
                let mut hit = vec![false; n];
                for name in list.split(',').map(str::trim) {
                    if name.is_empty() {
                        return Err(Error::Invalid {
                            what: "layer",
                            msg: format!("empty name in `{spec}`"),
                        });
                    }
                    if name == "all" || name == "middle" {
                        return Err(Error::Invalid {
                            what: "layer",
                            msg: format!(
                                "`{name}` stands alone, it is not a module to list with others \
                                 (`{spec}`)"
                            ),
                        });
                    }
                    let mut any = false;
                    for (i, p) in model.params.iter().enumerate() {
                        if p.name == name || p.name.starts_with(&format!("{name}.")) {
                            hit[i] = true;
                            any = true;
                        }
                    }
                    if !any {
                        return Err(Error::Invalid {
                            what: "layer",
                            msg: format!(
                                "no trainable tensor of {} is named `{name}` or starts with \
                                 `{name}.` (top-level modules: {}; or `all`, `middle`)",
                                model.name,
                                model.top_level_modules().join(", ")
                            ),
                        });
                    }
                }
                (0..n).filter(|&i| hit[i]).collect()
            }
        };
        if tensors.is_empty() {
            return Err(Error::Invalid {
                what: "layer",
                msg: format!("`{spec}` selects no tensor of {} ({n} tensors)", model.name),
            });
        }
        Ok(LayerSet {
            spec: spec.trim().to_string(),
            tensors,
        })
    }

    /// The selected tensors' names.
    pub fn names(&self, model: &Model) -> Vec<String> {
        self.tensors
            .iter()
            .map(|&i| model.params[i].name.clone())
            .collect()
    }

    /// Parameters in the set.
    pub fn size(&self, model: &Model) -> usize {
        self.tensors.iter().map(|&i| model.params[i].numel()).sum()
    }

    /// Whether each flat parameter is in the set.
    pub fn mask(&self, model: &Model) -> Vec<bool> {
        let mut m = vec![false; model.n_params];
        for &i in &self.tensors {
            let p = &model.params[i];
            m[p.offset..p.offset + p.numel()].fill(true);
        }
        m
    }

    /// Refuses a probe of the wrong length, non-finite, or non-zero
    /// outside the set (naming the first such tensor); `label` names the
    /// probe in the error.
    pub fn check_probe(&self, model: &Model, v: &[f64], label: &str) -> Result<()> {
        if v.len() != model.n_params {
            return Err(Error::Invalid {
                what: "probe",
                msg: format!(
                    "{label}: {} values for {} parameters",
                    v.len(),
                    model.n_params
                ),
            });
        }
        let inside = self.mask(model);
        for p in &model.params {
            let r = p.offset..p.offset + p.numel();
            if v[r.clone()].iter().any(|x| !x.is_finite()) {
                return Err(Error::Invalid {
                    what: "probe",
                    msg: format!("{label}: `{}` is not finite", p.name),
                });
            }
            if !inside[r.start] && v[r].iter().any(|&x| x != 0.0) {
                return Err(Error::Invalid {
                    what: "probe",
                    msg: format!(
                        "{label}: `{}` is non-zero, but the layer set `{}` leaves it out \
                         (probes must be zero outside it)",
                        p.name, self.spec
                    ),
                });
            }
        }
        Ok(())
    }

    /// `count` Rademacher (±1) probes on the set, zero outside, from `seed`.
    pub fn rademacher(&self, model: &Model, count: usize, seed: u64) -> Result<Vec<Vec<f64>>> {
        if count == 0 {
            return Err(Error::Invalid {
                what: "trace probes",
                msg: "must be at least 1".into(),
            });
        }
        let inside = self.mask(model);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x3d7ace);
        Ok((0..count)
            .map(|_| {
                inside
                    .iter()
                    .map(|&on| match (on, rng.random::<bool>()) {
                        (false, _) => 0.0,
                        (true, true) => 1.0,
                        (true, false) => -1.0,
                    })
                    .collect()
            })
            .collect())
    }
}

impl LayerSet {
    /// `count` standard-normal probes on the set, zero outside, from `seed`.
    pub fn gaussian(&self, model: &Model, count: usize, seed: u64) -> Result<Vec<Vec<f64>>> {
        if count == 0 {
            return Err(Error::Invalid {
                what: "trace probes",
                msg: "must be at least 1".into(),
            });
        }
        let inside = self.mask(model);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6a055);
        Ok((0..count)
            .map(|_| {
                inside
                    .iter()
                    .map(|&on| {
                        if on {
                            StandardNormal.sample(&mut rng)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect())
    }
}

/// The difference steps: h_j = eps / (2^j · max|v|) for j < levels.
#[derive(Clone, Copy, Debug)]
pub struct Steps {
    /// The largest step, as the largest change of any parameter.
    pub eps: f64,
    /// Halvings (central differences); Richardson removes the h², h⁴, …
    /// terms, leaving O(h^(2·levels)).
    pub levels: usize,
    /// Freeze the piecewise decisions at θ (the derivative autograd
    /// takes). `false` only to show what an unfrozen difference does.
    pub freeze: bool,
    /// δ: the relative accuracy ‖error‖/‖Hv‖ of one Hessian-vector
    /// product of the executor, for the rounding part of the error bound.
    pub hvp_accuracy: f64,
}

impl Default for Steps {
    /// Measured on the fixtures (tests/trace_grad.rs, `step_sweep`): eps
    /// 1e-3 with 3 levels (7 HVPs per probe) lands at 7e-12, 9e-14 and
    /// 1e-13 relative to PyTorch's float64; larger eps leave truncation
    /// (1e-2: 6e-6 at 3 levels), smaller ones or more levels only gain
    /// rounding (1e-4 at 5 levels: 1e-12 to 4e-12).
    fn default() -> Steps {
        Steps {
            eps: 1e-3,
            levels: 3,
            freeze: true,
            hvp_accuracy: 1e-14,
        }
    }
}

impl Steps {
    /// For float32 products (the GPU engines). Measured on the fixtures on
    /// lavapipe and llvmpipe (tests/trace_grad_gpu.rs, `step_sweep`): eps
    /// 1e-2 with 3 levels lands at 3e-6 to 6e-6 relative to PyTorch's
    /// float64; larger steps leave truncation (3e-2: up to 2e-3), smaller
    /// ones gain rounding (3e-3 at 3 levels: up to 1.6e-5), which grows as
    /// δ/h. δ = 1e-6: the GPU products are within 4e-7 of float64 on every
    /// fixture (tests/gpu.rs), with margin for the other points θ ± h·v.
    pub fn for_f32() -> Steps {
        Steps {
            eps: 1e-2,
            levels: 3,
            freeze: true,
            hvp_accuracy: 1e-6,
        }
    }

    /// The Richardson weights wⱼ of the level-j differences in the result,
    /// Σⱼ wⱼ·D(h₀/2ʲ).
    fn weights(&self) -> Vec<f64> {
        let l = self.levels;
        // Row k of the tableau at level j, as coefficients of D_0..D_{l-1}.
        let mut prev: Vec<Vec<f64>> = vec![];
        for j in 0..l {
            let mut e = vec![0.0; l];
            e[j] = 1.0;
            let mut row = vec![e];
            for k in 1..=j {
                let f = 4f64.powi(k as i32) - 1.0;
                let next = row[k - 1]
                    .iter()
                    .zip(&prev[k - 1])
                    .map(|(a, b)| a + (a - b) / f)
                    .collect();
                row.push(next);
            }
            prev = row;
        }
        prev.pop().unwrap_or_default()
    }

    /// The bound on the rounding part of one probe's result, relative to
    /// ‖Hv‖/h₀ (h₀ the largest step along v): each difference D(h) =
    /// (H(θ+hv)v − H(θ−hv)v)/2h carries at most 2δ‖Hv‖/2h of the products'
    /// error, and the tableau sums them with weights wⱼ at h₀/2ʲ:
    /// δ·Σⱼ |wⱼ|·2ʲ.
    pub fn rounding_factor(&self) -> f64 {
        let w = self.weights();
        self.hvp_accuracy
            * w.iter()
                .enumerate()
                .map(|(j, x)| x.abs() * (1u64 << j) as f64)
                .sum::<f64>()
    }
}

/// The gradient of a trace estimate and what it cost.
#[derive(Clone, Debug)]
pub struct TraceGrad {
    /// (1/P) Σₖ vₖᵀ H vₖ.
    pub estimate: f64,
    /// vₖᵀ H vₖ per probe.
    pub per_probe: Vec<f64>,
    /// ∇θ of the estimate, over all parameters.
    pub grad: Vec<f64>,
    /// A bound on the relative error, the largest over probes of (the
    /// last Richardson correction — the truncation left by the level
    /// before — plus the rounding bound δ·Σⱼ|wⱼ|2ʲ·‖Hv‖/h₀ of
    /// [`Steps::rounding_factor`]) / ‖result‖.
    pub error_estimate: f64,
    /// Hessian-vector products computed.
    pub hvps: usize,
}

/// ∇θ[(1/P) Σₖ vₖᵀ H vₖ] on any executor that holds decisions (method:
/// module doc). The probes must hold `n_params` finite values each; θ is
/// restored and the decisions released on return.
pub fn trace_grad<E: HoldsDecisions + ?Sized>(
    cpu: &mut E,
    probes: &[Vec<f64>],
    steps: Steps,
) -> Result<TraceGrad> {
    let np = cpu.n_params();
    if probes.is_empty() {
        return Err(Error::Invalid {
            what: "trace probes",
            msg: "must be at least 1".into(),
        });
    }
    if steps.levels == 0 || !(steps.eps > 0.0 && steps.eps.is_finite()) {
        return Err(Error::Invalid {
            what: "difference steps",
            msg: format!("eps {} with {} levels", steps.eps, steps.levels),
        });
    }
    let theta = cpu.theta();
    if steps.freeze {
        cpu.hold_decisions(true)?;
    }
    let mut result = (|| {
        let mut grad = vec![0.0; np];
        let mut per_probe = vec![];
        let mut error_estimate: f64 = 0.0;
        let mut hvps = 0;
        let mut hv = vec![0.0; np];
        let mut work = vec![0.0; np];
        for v in probes {
            cpu.set_theta(&theta)?;
            cpu.hvp(v, &mut hv)?;
            hvps += 1;
            per_probe.push(v.iter().zip(&hv).map(|(a, b)| a * b).sum::<f64>());
            let vmax = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            if vmax == 0.0 {
                continue;
            }
            // Richardson tableau over h_j = h0 / 2^j.
            let h0 = steps.eps / vmax;
            let mut prev: Vec<Vec<f64>> = vec![];
            let mut last_change = 0.0;
            for j in 0..steps.levels {
                let h = h0 / (1u64 << j) as f64;
                let mut at = |s: f64| -> Result<Vec<f64>> {
                    for ((t, t0), vi) in work.iter_mut().zip(&theta).zip(v) {
                        *t = t0 + s * vi;
                    }
                    cpu.set_theta(&work)?;
                    let mut out = vec![0.0; np];
                    cpu.hvp(v, &mut out)?;
                    Ok(out)
                };
                let plus = at(h)?;
                let minus = at(-h)?;
                hvps += 2;
                let mut row = vec![plus
                    .iter()
                    .zip(&minus)
                    .map(|(p, m)| (p - m) / (2.0 * h))
                    .collect::<Vec<f64>>()];
                for k in 1..=j {
                    let f = 4f64.powi(k as i32) - 1.0;
                    let next: Vec<f64> = row[k - 1]
                        .iter()
                        .zip(&prev[k - 1])
                        .map(|(a, b)| a + (a - b) / f)
                        .collect();
                    if k == j {
                        let d = norm_diff(&next, &row[k - 1]);
                        last_change = d / norm(&next).max(f64::MIN_POSITIVE);
                    }
                    row.push(next);
                }
                prev = row;
            }
            let best = prev.last().expect("at least one level");
            let rounding = steps.rounding_factor() * norm(&hv) / h0;
            let bound = last_change + rounding / norm(best).max(f64::MIN_POSITIVE);
            error_estimate = error_estimate.max(bound);
            grad.iter_mut().zip(best).for_each(|(g, d)| *g += d);
        }
        let p = probes.len() as f64;
        grad.iter_mut().for_each(|g| *g /= p);
        if grad.iter().any(|g| !g.is_finite()) {
            return Err(Error::Numerical(
                "the trace gradient is not finite: the weights or data overflow in float64 \
                 along a probe"
                    .into(),
            ));
        }
        Ok(TraceGrad {
            estimate: per_probe.iter().sum::<f64>() / p,
            per_probe,
            grad,
            error_estimate,
            hvps,
        })
    })();
    // Back at θ, where held decisions are the pass's own.
    let restored = cpu.set_theta(&theta);
    let released = if steps.freeze {
        cpu.hold_decisions(false)
    } else {
        Ok(())
    };
    if result.is_ok() {
        result = restored.and(released).and(result);
    }
    result
}

/// [`trace_grad`] over a problem of its own, e.g. one mini-batch (data =
/// the batch's samples, batch = their count, BN in batch mode): the loss is
/// then that mini-batch's mean cross-entropy, as a training step takes it.
pub fn trace_grad_on(problem: Problem, probes: &[Vec<f64>], steps: Steps) -> Result<TraceGrad> {
    trace_grad(&mut CpuReference::checked(problem)?, probes, steps)
}

/// What the frozen differences need of an executor besides products:
/// moving θ, and holding the piecewise decisions of one θ.
pub trait HoldsDecisions: Curvature {
    /// θ as last set.
    fn theta(&self) -> Vec<f64>;
    fn set_theta(&mut self, theta: &[f64]) -> Result<()>;
    /// `true`: record the decisions at the current θ and replay them in
    /// every later pass; `false`: release them.
    fn hold_decisions(&mut self, hold: bool) -> Result<()>;
}

impl HoldsDecisions for CpuReference {
    fn theta(&self) -> Vec<f64> {
        self.problem.weights.theta.clone()
    }
    fn set_theta(&mut self, theta: &[f64]) -> Result<()> {
        check_len("parameters θ", theta, self.problem.model.n_params)?;
        self.problem.weights.theta.copy_from_slice(theta);
        Ok(())
    }
    fn hold_decisions(&mut self, hold: bool) -> Result<()> {
        self.frozen = hold.then(|| self.decisions());
        Ok(())
    }
}

/// The GPU engine: held decisions need an engine planned for them
/// (`EngineOptions::frozen`), whose passes always replay the last
/// recording; releasing them is then a no-op, since θ is back where they
/// were recorded.
impl HoldsDecisions for crate::gpu::GpuEngine {
    fn theta(&self) -> Vec<f64> {
        crate::gpu::GpuEngine::theta(self).to_vec()
    }
    fn set_theta(&mut self, theta: &[f64]) -> Result<()> {
        crate::gpu::GpuEngine::set_theta(self, theta)
    }
    fn hold_decisions(&mut self, hold: bool) -> Result<()> {
        if !hold && self.is_frozen() {
            return Ok(());
        }
        crate::gpu::GpuEngine::hold_decisions(self, hold)
    }
}

fn check_len(what: &'static str, v: &[f64], n: usize) -> Result<()> {
    if v.len() != n {
        return Err(Error::Invalid {
            what,
            msg: format!("{} values for {n} parameters", v.len()),
        });
    }
    Ok(())
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn norm_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

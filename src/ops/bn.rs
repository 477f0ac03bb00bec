//! Batch norm over [n, c, hw] in float64, with the R-operator terms.
//!
//! With x̂ = (x − μ)·s, y = γx̂ + β. In `batch` mode μ and s = 1/√(σ²+ε)
//! are the batch's own statistics and depend on x; in `running` mode they
//! are constants from the running buffers. R-forward:
//!   batch:   x̂̇ = s(ẋ − mean ẋ − x̂·mean(x̂ẋ)),  ṡ = −s²·mean(x̂ẋ)
//!   running: x̂̇ = s·ẋ
//!   ẏ = γ̇x̂ + γx̂̇ + β̇
//! Backward, with ĝ = γ·gy and T = ĝ − mean ĝ − x̂·mean(ĝx̂):
//!   batch: gx = s·T;  running: gx = s·ĝ
//! R-backward, with R(ĝ) = γ̇·gy + γ·R(gy):
//!   batch: R(gx) = ṡ·T + s·(R(ĝ) − mean R(ĝ) − x̂̇·mean(ĝx̂) − x̂·mean(R(ĝ)x̂ + ĝx̂̇))
//!   running: R(gx) = s·R(ĝ)
//!   R(gγ) = Σ(R(gy)x̂ + gy·x̂̇),  R(gβ) = Σ R(gy)

use rayon::prelude::*;

pub const EPS: f64 = crate::model::graph::BN_EPS;

#[derive(Clone, Copy, Debug)]
pub struct BnGeom {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl BnGeom {
    fn count(&self) -> f64 {
        (self.n * self.hw) as f64
    }
    /// Per channel: Σ over the channel's elements of f(flat index,
    /// channel), the channels on all cores, each summed sample by sample in
    /// order (the same sums whatever the thread count). The channel is
    /// passed in rather than recomputed from the index (two integer
    /// divisions per element were a measurable share of the R-backward).
    fn channel_sums(&self, f: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f64> {
        (0..self.c)
            .into_par_iter()
            .map(|ch| {
                let mut o = 0.0;
                for n in 0..self.n {
                    let base = (n * self.c + ch) * self.hw;
                    o += (base..base + self.hw).map(|i| f(i, ch)).sum::<f64>();
                }
                o
            })
            .collect()
    }
    /// Apply f(flat index, channel) to every element, planes on all cores.
    fn each(&self, out: &mut [f64], f: impl Fn(usize, usize) -> f64 + Sync) {
        let hw = self.hw.max(1);
        out[..self.n * self.c * self.hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(p, o)| {
                let (base, ch) = (p * hw, p % self.c);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = f(base + i, ch);
                }
            });
    }
}

/// Per-channel batch moments: (mean, biased variance Σ(x − μ)²/m).
pub fn batch_moments(g: &BnGeom, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let m = g.count();
    let mean: Vec<f64> = g
        .channel_sums(|i, _| x[i])
        .into_iter()
        .map(|s| s / m)
        .collect();
    let var = g
        .channel_sums(|i, c| (x[i] - mean[c]).powi(2))
        .into_iter()
        .map(|v| v / m)
        .collect();
    (mean, var)
}

/// Per-channel normalisation constants: (mean, 1/sqrt(var + eps)).
pub fn batch_stats(g: &BnGeom, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (mean, var) = batch_moments(g, x);
    (mean, scales(&var))
}

/// 1/sqrt(var + eps) per channel, eps = [`EPS`].
pub fn scales(var: &[f64]) -> Vec<f64> {
    scales_eps(var, EPS)
}

/// 1/sqrt(var + eps) per channel.
pub fn scales_eps(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

pub fn running_stats(rm: &[f64], rv: &[f64]) -> (Vec<f64>, Vec<f64>) {
    running_stats_eps(rm, rv, EPS)
}

/// (running mean, 1/sqrt(running var + eps)).
pub fn running_stats_eps(rm: &[f64], rv: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
    (rm.to_vec(), scales_eps(rv, eps))
}

/// x̂ and y = γx̂ + β.
pub fn forward(
    g: &BnGeom,
    x: &[f64],
    mean: &[f64],
    s: &[f64],
    gamma: &[f64],
    beta: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let mut xhat = vec![0.0; x.len()];
    g.each(&mut xhat, |i, c| (x[i] - mean[c]) * s[c]);
    let mut y = vec![0.0; x.len()];
    g.each(&mut y, |i, c| gamma[c] * xhat[i] + beta[c]);
    (xhat, y)
}

/// Returns (x̂̇, ẏ, mean(x̂ẋ) per channel — zero in running mode).
#[allow(clippy::too_many_arguments)]
pub fn r_forward(
    g: &BnGeom,
    batch: bool,
    xdot: &[f64],
    xhat: &[f64],
    s: &[f64],
    gamma: &[f64],
    dgamma: &[f64],
    dbeta: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = g.count();
    let mut xhat_dot = vec![0.0; xdot.len()];
    let mut m_xx = vec![0.0; g.c];
    if batch {
        let m_x: Vec<f64> = g
            .channel_sums(|i, _| xdot[i])
            .iter()
            .map(|v| v / m)
            .collect();
        m_xx = g
            .channel_sums(|i, _| xhat[i] * xdot[i])
            .iter()
            .map(|v| v / m)
            .collect();
        g.each(&mut xhat_dot, |i, c| {
            s[c] * (xdot[i] - m_x[c] - xhat[i] * m_xx[c])
        });
    } else {
        g.each(&mut xhat_dot, |i, c| s[c] * xdot[i]);
    }
    let mut ydot = vec![0.0; xdot.len()];
    g.each(&mut ydot, |i, c| {
        dgamma[c] * xhat[i] + gamma[c] * xhat_dot[i] + dbeta[c]
    });
    (xhat_dot, ydot, m_xx)
}

/// Returns (gx, gγ, gβ).
pub fn backward(
    g: &BnGeom,
    batch: bool,
    gy: &[f64],
    xhat: &[f64],
    s: &[f64],
    gamma: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = g.count();
    let dgamma = g.channel_sums(|i, _| gy[i] * xhat[i]);
    let dbeta = g.channel_sums(|i, _| gy[i]);
    let mut gx = vec![0.0; gy.len()];
    if batch {
        // mean(ĝ) = γ·Σgy/m and mean(ĝx̂) = γ·Σgy·x̂/m.
        g.each(&mut gx, |i, c| {
            s[c] * gamma[c] * (gy[i] - dbeta[c] / m - xhat[i] * dgamma[c] / m)
        });
    } else {
        g.each(&mut gx, |i, c| s[c] * gamma[c] * gy[i]);
    }
    (gx, dgamma, dbeta)
}

/// The R-backward pass. Returns (R(gx), R(gγ), R(gβ)).
#[allow(clippy::too_many_arguments)]
pub fn r_backward(
    g: &BnGeom,
    batch: bool,
    gy: &[f64],
    rgy: &[f64],
    xhat: &[f64],
    xhat_dot: &[f64],
    s: &[f64],
    m_xx: &[f64],
    gamma: &[f64],
    dgamma: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = g.count();
    let r_ghat = |i: usize, c: usize| dgamma[c] * gy[i] + gamma[c] * rgy[i];
    let r_dgamma = g.channel_sums(|i, _| rgy[i] * xhat[i] + gy[i] * xhat_dot[i]);
    let r_dbeta = g.channel_sums(|i, _| rgy[i]);
    let mut rgx = vec![0.0; gy.len()];
    if batch {
        let ghat = |i: usize, c: usize| gamma[c] * gy[i];
        let m_g: Vec<f64> = g.channel_sums(ghat).iter().map(|v| v / m).collect();
        let m_gx: Vec<f64> = g
            .channel_sums(|i, c| ghat(i, c) * xhat[i])
            .iter()
            .map(|v| v / m)
            .collect();
        let m_rg: Vec<f64> = g.channel_sums(r_ghat).iter().map(|v| v / m).collect();
        let m_mix: Vec<f64> = g
            .channel_sums(|i, c| r_ghat(i, c) * xhat[i] + ghat(i, c) * xhat_dot[i])
            .iter()
            .map(|v| v / m)
            .collect();
        g.each(&mut rgx, |i, c| {
            let t = ghat(i, c) - m_g[c] - xhat[i] * m_gx[c];
            let sdot = -s[c] * s[c] * m_xx[c];
            let tdot = r_ghat(i, c) - m_rg[c] - xhat_dot[i] * m_gx[c] - xhat[i] * m_mix[c];
            sdot * t + s[c] * tdot
        });
    } else {
        g.each(&mut rgx, |i, c| s[c] * r_ghat(i, c));
    }
    (rgx, r_dgamma, r_dbeta)
}

/// A batch's per-channel sums over several workers (SyncBatchNorm): each
/// worker holds some of the batch's samples and `all_sum` returns the sum
/// of every worker's `part` (the same bits on every worker).
pub type AllSum<'a> = &'a (dyn Fn(&[f64]) -> Vec<f64> + Sync);

/// [`batch_moments`] of a batch whose samples are spread over workers
/// (this worker's `x` in `g`): the per-channel Σx and the element count
/// are summed over the workers, then Σ(x − μ)² about the whole batch's
/// mean — the same two rounds as one worker's. Returns (mean, biased
/// variance, the batch's elements per channel).
pub fn batch_moments_synced(g: &BnGeom, x: &[f64], all_sum: AllSum) -> (Vec<f64>, Vec<f64>, f64) {
    let mut part = g.channel_sums(|i, _| x[i]);
    part.push(g.count());
    let mut sums = all_sum(&part);
    let m = sums.pop().unwrap_or(0.0);
    let mean: Vec<f64> = sums.iter().map(|s| s / m).collect();
    let dev = g.channel_sums(|i, c| (x[i] - mean[c]).powi(2));
    let var = all_sum(&dev).into_iter().map(|v| v / m).collect();
    (mean, var, m)
}

/// [`backward`] in batch mode over workers: γ's and β's gradients are this
/// worker's own sums (the workers' gradients are summed later), while the
/// input gradient takes the whole batch's Σgy and Σgy·x̂ over its `m`
/// elements per channel.
pub fn backward_synced(
    g: &BnGeom,
    gy: &[f64],
    xhat: &[f64],
    s: &[f64],
    gamma: &[f64],
    m: f64,
    all_sum: AllSum,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let dgamma = g.channel_sums(|i, _| gy[i] * xhat[i]);
    let dbeta = g.channel_sums(|i, _| gy[i]);
    let part: Vec<f64> = dbeta.iter().chain(&dgamma).copied().collect();
    let total = all_sum(&part);
    let (tb, tg) = total.split_at(g.c);
    let mut gx = vec![0.0; gy.len()];
    g.each(&mut gx, |i, c| {
        s[c] * gamma[c] * (gy[i] - tb[c] / m - xhat[i] * tg[c] / m)
    });
    (gx, dgamma, dbeta)
}

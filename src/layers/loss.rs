//! Mean softmax cross-entropy over the batch, its gradient and R-gradient:
//! with p = softmax(z), ∂L/∂z = (p − onehot(y))·scale and
//! R(∂L/∂z) = (p ⊙ ż − p·(pᵀż))·scale, scale = 1/N over the data set.
//! f64: `crate::ops::loss`; kernels: shaders/loss.wgsl and the loss sum of
//! shaders/reduce.wgsl.

use crate::dispatch::kernels::{
    Kernel, LossParams, ReduceParams, EMULATOR_LOOP_LIMIT, ITERATIONS_PER_TAP,
};
use crate::dispatch::plan::Plan;
use crate::dispatch::step::Grid;
use crate::ops::loss;

/// How many rows of `z` (`k` logits each) have their largest logit, the
/// first on ties, at the row's label.
pub fn count_correct<T: PartialOrd>(z: &[T], k: usize, labels: &[u32]) -> usize {
    let mut correct = 0;
    for (row, &label) in z.chunks(k).zip(labels) {
        let mut best = 0;
        for (j, v) in row.iter().enumerate() {
            if *v > row[best] {
                best = j;
            }
        }
        correct += (best == label as usize) as usize;
    }
    correct
}

/// The float64 loss of a batch: (batch loss · scale, ∂L/∂z, softmax).
pub fn cpu_forward_backward(
    n: usize,
    k: usize,
    z: &[f64],
    y: &[u32],
    scale: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    loss::forward_backward(n, k, z, y, scale)
}

/// The float64 R-gradient of the loss along ż.
pub fn cpu_r_backward(n: usize, k: usize, p: &[f64], zdot: &[f64], scale: f64) -> Vec<f64> {
    loss::r_backward(n, k, p, zdot, scale)
}

/// Buffers of the loss on the GPU.
pub struct LossBufs {
    pub logits: usize,
    pub dlogits: usize,
    pub labels: usize,
    pub probs: usize,
    pub sample_loss: usize,
    pub adj: usize,
    pub radj: usize,
}

/// Whether the loss over `k` classes takes a workgroup per row: on CPU
/// emulators (`Plan::split_loops`) where a thread's three loops over the
/// classes (a vocabulary of 50257 for GPT-2) would pass llvmpipe's loop
/// limit; elsewhere a thread per row, as before.
pub fn by_rows(p: &Plan, k: usize) -> bool {
    p.split_loops && by_rows_at(k)
}

/// Whether a thread's loops over `k` classes would pass the loop limit.
pub fn by_rows_at(k: usize) -> bool {
    3 * k * ITERATIONS_PER_TAP > EMULATOR_LOOP_LIMIT
}

/// Pushes the loss of one batch (`rows` loss rows per sample:
/// `next_token::loss_rows`), its gradient into `b.adj`, and the batch
/// loss into slot `batch` of `losses`.
pub fn plan_forward_backward(
    p: &mut Plan,
    b: &LossBufs,
    k: usize,
    scale: f32,
    batch: usize,
    losses: usize,
    rows: usize,
) {
    let n = p.n * rows;
    let (kernel, grid) = if by_rows(p, k) {
        (Kernel::XentForwardBackwardRows, Grid::Groups(n))
    } else {
        (Kernel::XentForwardBackward, Grid::Threads(n))
    };
    p.push(
        kernel,
        &LossParams {
            n: n as u32,
            k: k as u32,
            scale,
            _p0: 0,
        },
        vec![b.logits, b.labels, b.probs, b.sample_loss, b.adj],
        grid,
    );
    p.push(
        Kernel::SumAll,
        &ReduceParams {
            out_a: batch as u32,
            len: n as u32,
            ..Default::default()
        },
        vec![b.sample_loss, losses],
        Grid::Groups(1),
    );
}

/// Pushes R(∂L/∂z) into `b.radj`.
pub fn plan_r_backward(p: &mut Plan, b: &LossBufs, k: usize, scale: f32, rows: usize) {
    let n = p.n * rows;
    let (kernel, grid) = if by_rows(p, k) {
        (Kernel::XentRBackwardRows, Grid::Groups(n))
    } else {
        (Kernel::XentRBackward, Grid::Threads(n))
    };
    p.push(
        kernel,
        &LossParams {
            n: n as u32,
            k: k as u32,
            scale,
            _p0: 0,
        },
        vec![b.probs, b.dlogits, b.radj],
        grid,
    );
}

//! The float64 loss of a batch whichever the model's kind: softmax
//! cross-entropy against the labels `y` (a classifier: flat logits [K]),
//! or next-token cross-entropy for a language model (token ids in, logits
//! [T, V] out; `Model::next_token`): the logits at positions 0..T−2 of
//! every sample against its ids at 1..T−1, the mean over the N·(T−1)
//! predicted tokens of the data set (Hugging Face's `labels=input_ids`).
//! The last position's logits get a zero adjoint.

use crate::data::Dataset;
use crate::layers::loss::count_correct;
use crate::model::Model;
use crate::ops::loss;

/// Loss of samples `start..start + count` times `scale` (1/N over the
/// data set), ∂L/∂z of the logits `z`, and the softmax the R-backward
/// needs.
pub fn forward_backward(
    model: &Model,
    data: &Dataset,
    start: usize,
    count: usize,
    z: &[f64],
    scale: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let k = model.classes;
    if !model.next_token() {
        let y = &data.y[start..start + count];
        return loss::forward_backward(count, k, z, y, scale);
    }
    let t = model.input.tokens();
    let x = &data.x[start * t..(start + count) * t];
    let (zc, labels) = gather(z, Some(x), count, t, k);
    let (l, gc, p) =
        loss::forward_backward(count * (t - 1), k, &zc, &labels, token_scale(scale, t));
    (l, scatter(&gc, count, t, k), p)
}

/// R(∂L/∂z) along ż, from the softmax `p` of [`forward_backward`].
pub fn r_backward(model: &Model, count: usize, p: &[f64], zdot: &[f64], scale: f64) -> Vec<f64> {
    let k = model.classes;
    if !model.next_token() {
        return loss::r_backward(count, k, p, zdot, scale);
    }
    let t = model.input.tokens();
    let (zc, _) = gather(zdot, None, count, t, k);
    let rc = loss::r_backward(count * (t - 1), k, p, &zc, token_scale(scale, t));
    scatter(&rc, count, t, k)
}

/// How many samples of the batch are classified right (their largest
/// logit, the first on ties, is the label), or for a language model how
/// many tokens are predicted right divided by the T−1 predicted per sample
/// (so that the sum over batches divided by N is the fraction of tokens).
pub fn correct(model: &Model, data: &Dataset, start: usize, count: usize, z: &[f64]) -> f64 {
    let k = model.classes;
    if !model.next_token() {
        return count_correct(z, k, &data.y[start..start + count]) as f64;
    }
    let t = model.input.tokens();
    let x = &data.x[start * t..(start + count) * t];
    let (zc, labels) = gather(z, Some(x), count, t, k);
    count_correct(&zc, k, &labels) as f64 / (t - 1) as f64
}

/// Rows of the loss per sample on the GPU: the T positions of a language
/// model (the last one unlabelled), else one.
pub fn loss_rows(model: &Model) -> usize {
    if model.next_token() {
        model.input.tokens()
    } else {
        1
    }
}

/// The GPU loss's row scale: 1/N per sample, or 1/(N·(T−1)) per
/// predicted token.
pub fn row_scale(model: &Model, scale: f64) -> f64 {
    if model.next_token() {
        token_scale(scale, model.input.tokens())
    } else {
        scale
    }
}

/// The label of no row: the loss kernel gives it zero loss, softmax and
/// adjoint (a language model's last position).
pub const NO_LABEL: u32 = u32::MAX;

/// The GPU's labels of samples `start..start + count`, one per loss row:
/// `y`, or the ids shifted by one with [`NO_LABEL`] at each sample's last
/// position.
pub fn gpu_labels(model: &Model, data: &Dataset, start: usize, count: usize) -> Vec<u32> {
    if !model.next_token() {
        return data.y[start..start + count].to_vec();
    }
    let t = model.input.tokens();
    shifted_labels(&data.x[start * t..(start + count) * t], t)
}

/// The labels of token ids `x` (samples of `t` ids): each sample's ids
/// shifted by one, [`NO_LABEL`] at its last position.
pub fn shifted_labels(x: &[f32], t: usize) -> Vec<u32> {
    x.chunks(t)
        .flat_map(|ids| {
            ids[1..]
                .iter()
                .map(|&v| v as u32)
                .chain(std::iter::once(NO_LABEL))
        })
        .collect()
}

/// 1/N per sample becomes 1/(N·(T−1)) per predicted token.
fn token_scale(scale: f64, t: usize) -> f64 {
    scale / (t - 1) as f64
}

/// The logits rows of positions 0..T−2 of every sample, and (with the
/// ids) their labels, the ids at 1..T−1.
fn gather(z: &[f64], ids: Option<&[f32]>, n: usize, t: usize, k: usize) -> (Vec<f64>, Vec<u32>) {
    let mut zc = Vec::with_capacity(n * (t - 1) * k);
    let mut labels = Vec::with_capacity(n * (t - 1));
    for s in 0..n {
        zc.extend_from_slice(&z[s * t * k..(s * t + t - 1) * k]);
        if let Some(x) = ids {
            labels.extend(x[s * t + 1..(s + 1) * t].iter().map(|&v| v as u32));
        }
    }
    (zc, labels)
}

/// The adjoint of [`gather`]: rows back in place, the last position zero.
fn scatter(gc: &[f64], n: usize, t: usize, k: usize) -> Vec<f64> {
    let mut g = vec![0.0; n * t * k];
    for s in 0..n {
        g[s * t * k..(s * t + t - 1) * k]
            .copy_from_slice(&gc[s * (t - 1) * k..(s + 1) * (t - 1) * k]);
    }
    g
}

//! Divergence: after every step the loss, the parameters, the momentum
//! buffers and the batch-norm running statistics must be finite, and when
//! the state_dict is saved as float32, every saved tensor must stay finite
//! in float32 (|x| ≤ f32::MAX). The first tensor that is not is named.

use crate::model::{Model, Weights};

/// How a value fails: non-finite, or finite in float64 but infinite once
/// cast to float32 (when `f32_saved`).
fn bad(x: f64, f32_saved: bool) -> Option<String> {
    if !x.is_finite() {
        return Some(format!("is {x}"));
    }
    if f32_saved && (x as f32).is_infinite() {
        return Some(format!(
            "is {x:e}, beyond float32's range (the state_dict is saved as float32)"
        ));
    }
    None
}

/// "element I is X".
fn at(i: usize, m: String) -> String {
    format!("element {i} {m}")
}

/// The first element of `v` that fails, as (index, why).
fn first_bad(v: &[f64], f32_saved: bool) -> Option<(usize, String)> {
    v.iter()
        .enumerate()
        .find_map(|(i, &x)| bad(x, f32_saved).map(|m| (i, m)))
}

/// The first tensor of the state that fails, as (tensor name, why): each
/// trainable tensor, its momentum buffer (saved as float64), then each
/// running buffer.
pub fn check_state(
    model: &Model,
    w: &Weights,
    momentum: Option<&[f64]>,
    f32_saved: bool,
) -> Option<(String, String)> {
    for p in &model.params {
        let r = p.offset..p.offset + p.numel();
        if let Some((i, m)) = first_bad(&w.theta[r.clone()], f32_saved) {
            return Some((p.name.clone(), at(i, m)));
        }
        if let Some(buf) = momentum {
            if let Some((i, m)) = first_bad(&buf[r], false) {
                return Some((format!("{} (momentum buffer)", p.name), at(i, m)));
            }
        }
    }
    for (b, v) in model.buffers.iter().zip(&w.buffers) {
        if let Some((i, m)) = first_bad(v, f32_saved) {
            return Some((b.name.clone(), at(i, m)));
        }
    }
    None
}

/// The first value of a named tensor that fails (for the state_dict writer).
pub fn check_tensor(name: &str, v: &[f64], f32_saved: bool) -> Option<String> {
    first_bad(v, f32_saved).map(|(i, m)| format!("`{name}` {}", at(i, m)))
}

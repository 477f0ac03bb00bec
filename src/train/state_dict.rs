//! Writing and reading the whole state_dict: trainable tensors, BN running
//! buffers and `num_batches_tracked`.

use super::guard;
use crate::error::{Error, Result};
use crate::model::{params, tensorio, Model, Op, Weights};
use std::path::Path;

/// The BN module name of a running_mean buffer (`block1.bn1`).
fn bn_module(model: &Model, buffer: usize) -> Option<&str> {
    model.buffers[buffer].name.strip_suffix(".running_mean")
}

/// The indices of the running_mean buffers of the model's BN nodes.
pub(super) fn running_means(model: &Model) -> Vec<usize> {
    model
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::BatchNorm { running_mean, .. } => Some(running_mean),
            _ => None,
        })
        .collect()
}

/// `num_batches_tracked` per buffer index from a state_dict file (0 where
/// the file has none, or without a file).
pub fn initial_counts(model: &Model, weights: Option<&Path>) -> Result<Vec<i64>> {
    let mut out = vec![0; model.buffers.len()];
    let Some(path) = weights else {
        return Ok(out);
    };
    let file = tensorio::File::open(path)?;
    for rm in running_means(model) {
        let Some(module) = bn_module(model, rm) else {
            continue;
        };
        let name = format!("{module}.num_batches_tracked");
        if file.layout().contains_key(&name) {
            let t = file.tensor(&name)?;
            match t.data.as_slice() {
                [v] if *v >= 0.0 && v.fract() == 0.0 => out[rm] = *v as i64,
                _ => {
                    return Err(Error::Invalid {
                        what: "weights",
                        msg: format!("{name} is not one non-negative integer"),
                    })
                }
            }
        }
    }
    Ok(out)
}

/// Write a whole state_dict (see [`Trainer::save`]).
pub fn save_state_dict(
    model: &Model,
    w: &Weights,
    batches_tracked: &[i64],
    path: &Path,
    f64_out: bool,
) -> Result<()> {
    let mut floats = params::named(model, &w.theta);
    for (b, vals) in model.buffers.iter().zip(&w.buffers) {
        floats.push((b.name.clone(), vec![b.len], vals.clone()));
    }
    // Never a non-finite state_dict (the steps' checks stop a run first).
    for (n, _, v) in &floats {
        if let Some(m) = guard::check_tensor(n, v, !f64_out) {
            return Err(Error::Numerical(format!(
                "not writing {}: {m}",
                path.display()
            )));
        }
    }
    let counts: Vec<(String, [i64; 1])> = running_means(model)
        .into_iter()
        .filter_map(|rm| {
            bn_module(model, rm)
                .map(|m| (format!("{m}.num_batches_tracked"), [batches_tracked[rm]]))
        })
        .collect();
    let mut t: Vec<(&str, &[usize], tensorio::Values)> = floats
        .iter()
        .map(|(n, s, d)| {
            let v = if f64_out {
                tensorio::Values::F64(d)
            } else {
                tensorio::Values::F32(d)
            };
            (n.as_str(), s.as_slice(), v)
        })
        .collect();
    for (n, c) in &counts {
        t.push((n.as_str(), &[], tensorio::Values::I64(c)));
    }
    tensorio::write(path, &t)
}

//! Parameter values: the flat vector theta in PyTorch order plus the BN
//! buffers, from a state_dict or from PyTorch's default initialisation.

use super::graph::Init;
use super::tensorio;
use super::Model;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Weights {
    /// Trainable parameters, flattened row-major in registration order.
    pub theta: Vec<f64>,
    /// BN running statistics, indexed like `Model::buffers`.
    pub buffers: Vec<Vec<f64>>,
}

impl Weights {
    /// PyTorch's default initialisation, deterministic in `seed`.
    pub fn init(model: &Model, seed: u64) -> Weights {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut theta = Vec::with_capacity(model.n_params);
        for p in &model.params {
            match p.init {
                Init::UniformFanIn(fan_in) => {
                    let b = 1.0 / (fan_in as f64).sqrt();
                    theta.extend((0..p.numel()).map(|_| rng.random_range(-b..b)));
                }
                Init::Uniform { bound } => {
                    theta.extend((0..p.numel()).map(|_| rng.random_range(-bound..bound)));
                }
                Init::Normal { std } => {
                    let n = rand_distr::Normal::new(0.0, std).expect("a finite positive std");
                    theta.extend((0..p.numel()).map(|_| rng.sample(n)));
                }
                Init::Const(c) => theta.extend(std::iter::repeat_n(c, p.numel())),
            }
        }
        let buffers = model.buffers.iter().map(|b| vec![b.init; b.len]).collect();
        Weights { theta, buffers }
    }

    /// Load a PyTorch state_dict saved with safetensors, by exact names.
    /// The header is checked in full (unexpected and missing tensors, then
    /// dtypes, then shapes) before any tensor is converted.
    pub fn load(model: &Model, path: &Path) -> Result<Weights> {
        let file = tensorio::File::open(path)?;
        let mut wanted: Vec<(&str, Vec<usize>)> = model
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.clone()))
            .collect();
        wanted.extend(model.buffers.iter().map(|b| (b.name.as_str(), vec![b.len])));
        // PyTorch saves this counter with every BN; it plays no part here.
        // A tied parameter's second name may be there too (checked below).
        check_layout(model, &file, &wanted, |name| {
            name.ends_with("num_batches_tracked") || model.tied.iter().any(|(t, _)| t == name)
        })?;
        let mut theta = Vec::with_capacity(model.n_params);
        for p in &model.params {
            theta.extend(take(&file, &p.name)?);
        }
        check_tied(model, &file, &theta)?;
        let mut buffers = Vec::with_capacity(model.buffers.len());
        for b in &model.buffers {
            let data = take(&file, &b.name)?;
            if b.name.ends_with("running_var") {
                if let Some(bad) = data.iter().find(|v| **v < 0.0) {
                    return Err(Error::Tensor {
                        file: file.label.clone(),
                        name: b.name.clone(),
                        msg: format!("a variance must not be negative, found {bad}"),
                    });
                }
            }
            buffers.push(data);
        }
        Ok(Weights { theta, buffers })
    }
}

/// A tied parameter saved under its second name too (PyTorch's state_dict
/// holds both, `lm_head.weight` and `transformer.wte.weight`) must hold
/// the same values, of the same shape.
fn check_tied(model: &Model, file: &tensorio::File, theta: &[f64]) -> Result<()> {
    let layout = file.layout();
    for (alias, i) in &model.tied {
        let Some(t) = layout.get(alias.as_str()) else {
            continue;
        };
        let p = &model.params[*i];
        let err = |msg: String| Error::Tensor {
            file: file.label.clone(),
            name: alias.clone(),
            msg,
        };
        if t.shape != p.shape {
            return Err(err(format!(
                "has shape {:?}, but it is tied to `{}` of shape {:?}",
                t.shape, p.name, p.shape
            )));
        }
        let vals = take(file, alias)?;
        let own = &theta[p.offset..p.offset + p.numel()];
        if let Some(j) = vals.iter().zip(own).position(|(a, b)| a != b) {
            return Err(err(format!(
                "is tied to `{}` (one parameter, two names) but differs from it at element {j} \
                 ({} against {})",
                p.name, vals[j], own[j]
            )));
        }
    }
    Ok(())
}

/// Check a file's header against the tensors wanted (name, shape), all of
/// them floating point: first names (unexpected, then missing), then
/// dtypes, then shapes. `ignored` names may be present with any layout.
fn check_layout(
    model: &Model,
    file: &tensorio::File,
    wanted: &[(&str, Vec<usize>)],
    ignored: impl Fn(&str) -> bool,
) -> Result<()> {
    let layout = file.layout();
    let tensor_err = |name: &str, msg: String| Error::Tensor {
        file: file.label.clone(),
        name: name.to_string(),
        msg,
    };
    let unexpected: Vec<&String> = layout
        .keys()
        .filter(|n| !ignored(n) && !wanted.iter().any(|(w, _)| w == n))
        .collect();
    if let Some(name) = unexpected.first() {
        return Err(tensor_err(
            name,
            format!(
                "unexpected: {} has no tensor of that name{}",
                model.name,
                if unexpected.len() > 1 {
                    format!(" ({} unexpected tensors in all)", unexpected.len())
                } else {
                    String::new()
                }
            ),
        ));
    }
    let missing: Vec<&str> = wanted
        .iter()
        .map(|(w, _)| *w)
        .filter(|w| !layout.contains_key(*w))
        .collect();
    if let Some(name) = missing.first() {
        return Err(tensor_err(
            name,
            if missing.len() > 1 {
                format!("missing ({} tensors missing in all)", missing.len())
            } else {
                "missing".into()
            },
        ));
    }
    for (name, _) in wanted {
        let dtype = layout[*name].dtype;
        if !tensorio::is_float(dtype) {
            return Err(tensor_err(
                name,
                format!(
                    "has dtype {dtype}; parameter tensors must be floating point (F64, F32, F16 or BF16)"
                ),
            ));
        }
    }
    for (name, shape) in wanted {
        let got = &layout[*name].shape;
        if got != shape {
            return Err(tensor_err(
                name,
                format!("has shape {got:?}, the model needs {shape:?}"),
            ));
        }
    }
    Ok(())
}

/// One tensor whose layout was checked, converted, every value finite.
fn take(file: &tensorio::File, name: &str) -> Result<Vec<f64>> {
    let t = file.tensor(name)?;
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Tensor {
            file: file.label.clone(),
            name: name.to_string(),
            msg: format!("element {i} is {} (not finite)", t.data[i]),
        });
    }
    Ok(t.data)
}

/// A vector over the parameters (a direction v, a gradient, Hv) from a
/// safetensors file holding exactly the trainable tensors.
pub fn load_vector(model: &Model, path: &Path) -> Result<Vec<f64>> {
    let file = tensorio::File::open(path)?;
    let wanted: Vec<(&str, Vec<usize>)> = model
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.shape.clone()))
        .collect();
    check_layout(model, &file, &wanted, |_| false)?;
    let mut v = Vec::with_capacity(model.n_params);
    for p in &model.params {
        v.extend(take(&file, &p.name)?);
    }
    Ok(v)
}

/// The named tensors of a flat parameter vector, for writing.
pub fn named(model: &Model, v: &[f64]) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    model
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.shape.clone(),
                v[p.offset..p.offset + p.numel()].to_vec(),
            )
        })
        .collect()
}

pub fn save_vector(model: &Model, path: &Path, v: &[f64]) -> Result<()> {
    if v.len() != model.n_params {
        return Err(Error::Invalid {
            what: "vector length",
            msg: format!(
                "{} values for the {} parameters of {}",
                v.len(),
                model.n_params,
                model.name
            ),
        });
    }
    tensorio::write_f64(path, &named(model, v))
}

/// The full state_dict (parameters, tied parameters' second names and BN
/// buffers), as PyTorch names it.
pub fn save_state_dict(model: &Model, path: &Path, w: &Weights) -> Result<()> {
    if w.theta.len() != model.n_params || w.buffers.len() != model.buffers.len() {
        return Err(Error::Invalid {
            what: "weights",
            msg: format!(
                "{} values and {} buffers for the {} parameters and {} buffers of {}",
                w.theta.len(),
                w.buffers.len(),
                model.n_params,
                model.buffers.len(),
                model.name
            ),
        });
    }
    let mut t = named(model, &w.theta);
    // A tied parameter under its second name too, as PyTorch's state_dict.
    for (alias, i) in &model.tied {
        let p = &model.params[*i];
        let vals = w.theta[p.offset..p.offset + p.numel()].to_vec();
        t.push((alias.clone(), p.shape.clone(), vals));
    }
    for (b, vals) in model.buffers.iter().zip(&w.buffers) {
        t.push((b.name.clone(), vec![b.len], vals.clone()));
    }
    tensorio::write_f64(path, &t)
}

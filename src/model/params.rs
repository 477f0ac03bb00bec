//! Parameter values: the flat vector theta in PyTorch order plus the BN
//! buffers, from a state_dict or from PyTorch's default initialisation.

use super::graph::Init;
use super::tensorio::{self, Tensor};
use super::Model;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
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
                Init::Const(c) => theta.extend(std::iter::repeat_n(c, p.numel())),
            }
        }
        let buffers = model.buffers.iter().map(|b| vec![b.init; b.len]).collect();
        Weights { theta, buffers }
    }

    /// Load a PyTorch state_dict saved with safetensors, by exact names.
    pub fn load(model: &Model, path: &Path) -> Result<Weights> {
        let file = tensorio::file_label(path);
        let mut tensors = tensorio::read(path)?;
        let theta = take_params(model, &file, &mut tensors)?;
        let mut buffers = Vec::with_capacity(model.buffers.len());
        for b in &model.buffers {
            let t = take(&file, &mut tensors, &b.name, &[b.len])?;
            if b.name.ends_with("running_var") {
                if let Some(bad) = t.data.iter().find(|v| **v < 0.0) {
                    return Err(Error::Tensor {
                        file: file.clone(),
                        name: b.name.clone(),
                        msg: format!("a variance must not be negative, found {bad}"),
                    });
                }
            }
            buffers.push(t.data);
        }
        // PyTorch saves this counter with every BN; it plays no part here.
        tensors.retain(|name, _| !name.ends_with("num_batches_tracked"));
        reject_unexpected(model, &file, &tensors)?;
        Ok(Weights { theta, buffers })
    }
}

fn take(
    file: &str,
    tensors: &mut BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let t = tensors.remove(name).ok_or_else(|| Error::Tensor {
        file: file.to_string(),
        name: name.to_string(),
        msg: "missing".into(),
    })?;
    if t.shape != shape {
        return Err(Error::Tensor {
            file: file.to_string(),
            name: name.to_string(),
            msg: format!("has shape {:?}, the model needs {:?}", t.shape, shape),
        });
    }
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Tensor {
            file: file.to_string(),
            name: name.to_string(),
            msg: format!("element {i} is {} (not finite)", t.data[i]),
        });
    }
    Ok(t)
}

/// The trainable tensors of `model` from `tensors`, concatenated in order.
fn take_params(
    model: &Model,
    file: &str,
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<Vec<f64>> {
    let mut theta = Vec::with_capacity(model.n_params);
    for p in &model.params {
        theta.extend(take(file, tensors, &p.name, &p.shape)?.data);
    }
    Ok(theta)
}

fn reject_unexpected(model: &Model, file: &str, rest: &BTreeMap<String, Tensor>) -> Result<()> {
    if let Some(name) = rest.keys().next() {
        return Err(Error::Tensor {
            file: file.to_string(),
            name: name.clone(),
            msg: format!(
                "unexpected: {} has no tensor of that name{}",
                model.name,
                if rest.len() > 1 {
                    format!(" ({} unexpected tensors in all)", rest.len())
                } else {
                    String::new()
                }
            ),
        });
    }
    Ok(())
}

/// A vector over the parameters (a direction v, a gradient, Hv) from a
/// safetensors file holding exactly the trainable tensors.
pub fn load_vector(model: &Model, path: &Path) -> Result<Vec<f64>> {
    let file = tensorio::file_label(path);
    let mut tensors = tensorio::read(path)?;
    let v = take_params(model, &file, &mut tensors)?;
    reject_unexpected(model, &file, &tensors)?;
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
    tensorio::write_f64(path, &named(model, v))
}

/// The full state_dict (parameters and BN buffers), as PyTorch names it.
pub fn save_state_dict(model: &Model, path: &Path, w: &Weights) -> Result<()> {
    let mut t = named(model, &w.theta);
    for (b, vals) in model.buffers.iter().zip(&w.buffers) {
        t.push((b.name.clone(), vec![b.len], vals.clone()));
    }
    tensorio::write_f64(path, &t)
}

//! Data sets: safetensors `x`/`y`, CIFAR-10 binary folders, and a
//! deterministic synthetic class-conditional set.

mod cifar;
mod synthetic;

pub use cifar::{load_cifar_dir, CIFAR_MEAN, CIFAR_STD};
pub use synthetic::synthetic;

use crate::error::{Error, Result};
use crate::model::{tensorio, Model, Shape};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Dataset {
    /// Images, NCHW row-major.
    pub x: Vec<f32>,
    /// Class indices.
    pub y: Vec<u32>,
    pub shape: Shape,
    /// Where it came from, for error messages and reports.
    pub source: String,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Keep the first `n` samples.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.y.truncate(n);
            self.x.truncate(n * self.shape.numel());
        }
    }

    /// Consecutive batches of at most `batch` samples: (first sample, count).
    pub fn batches(&self, batch: usize) -> Vec<(usize, usize)> {
        let b = batch.max(1);
        (0..self.len())
            .step_by(b)
            .map(|s| (s, b.min(self.len() - s)))
            .collect()
    }

    /// Check the data against the model: shape, labels, finiteness, size.
    pub fn validate(&self, model: &Model) -> Result<()> {
        let err = |msg: String| Error::Data {
            file: self.source.clone(),
            msg,
        };
        if self.is_empty() {
            return Err(err("no samples".into()));
        }
        if self.shape != model.input {
            return Err(err(format!(
                "images are {} but {} takes {}",
                self.shape, model.name, model.input
            )));
        }
        if let Some((i, y)) = self
            .y
            .iter()
            .enumerate()
            .find(|(_, y)| **y as usize >= model.classes)
        {
            return Err(err(format!(
                "label {y} of sample {i} is out of range: {} has {} classes (0..{})",
                model.name,
                model.classes,
                model.classes - 1
            )));
        }
        if let Some(i) = self.x.iter().position(|v| !v.is_finite()) {
            return Err(err(format!(
                "x element {i} (sample {}) is {} (not finite)",
                i / self.shape.numel(),
                self.x[i]
            )));
        }
        Ok(())
    }

    /// Load a safetensors file (`x` [N,C,H,W] f32, `y` [N] integer) or a
    /// folder of CIFAR-10 binary batches.
    pub fn load(path: &Path) -> Result<Dataset> {
        if path.is_dir() {
            return load_cifar_dir(path);
        }
        let file = tensorio::file_label(path);
        let mut t = tensorio::read(path)?;
        let err = |msg: String| Error::Data {
            file: file.clone(),
            msg,
        };
        let x = t
            .remove("x")
            .ok_or_else(|| err("missing tensor `x` (images [N, C, H, W])".into()))?;
        let y = t
            .remove("y")
            .ok_or_else(|| err("missing tensor `y` (labels [N])".into()))?;
        if x.shape.len() != 4 {
            return Err(err(format!(
                "`x` must be [N, C, H, W], got shape {:?}",
                x.shape
            )));
        }
        if y.shape.len() != 1 || y.shape[0] != x.shape[0] {
            return Err(err(format!(
                "`y` must be [N] with N = {} like `x`, got shape {:?}",
                x.shape[0], y.shape
            )));
        }
        let mut labels = Vec::with_capacity(y.data.len());
        for (i, &v) in y.data.iter().enumerate() {
            if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
                return Err(err(format!("label {v} of sample {i} is not a class index")));
            }
            labels.push(v as u32);
        }
        Ok(Dataset {
            x: x.data.iter().map(|&v| v as f32).collect(),
            y: labels,
            shape: Shape::new(x.shape[1], x.shape[2], x.shape[3]),
            source: file,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let s = self.shape;
        tensorio::write_f64(
            path,
            &[
                (
                    "x".into(),
                    vec![n, s.c, s.h, s.w],
                    self.x.iter().map(|&v| v as f64).collect(),
                ),
                (
                    "y".into(),
                    vec![n],
                    self.y.iter().map(|&v| v as f64).collect(),
                ),
            ],
        )
    }
}

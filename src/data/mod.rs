//! Data sets: safetensors `x`/`y`, CIFAR-10 binary folders, and a
//! deterministic synthetic class-conditional set.

mod cifar;
mod synthetic;
mod tokens;

pub use cifar::{load_cifar_dir, load_cifar_dir_first, CIFAR_MEAN, CIFAR_STD};
pub use synthetic::{synthetic, try_synthetic};
pub use tokens::{synthetic_tokens, MAX_TOKEN_ID};

use crate::error::{Error, Result};
use crate::model::{tensorio, Model, Shape};
use std::path::Path;

/// The most image values a data set may hold in memory: 2^30 f32 values
/// (4 GiB), e.g. 349,525 CIFAR-10 images or 7,133 ImageNet-sized ones
/// (defined beside the file reader, which `data` builds on).
pub use crate::model::tensorio::MAX_FILE_ELEMENTS as MAX_DATA_ELEMENTS;

/// `n` samples of `shape` as a number of values, refused above
/// [`MAX_DATA_ELEMENTS`] (`what` says where they come from).
pub(crate) fn check_data_size(what: &str, n: usize, shape: Shape) -> Result<()> {
    let total = (n as u128) * (shape.numel() as u128);
    if total > MAX_DATA_ELEMENTS as u128 {
        return Err(Error::Invalid {
            what: "samples",
            msg: format!(
                "{n} samples of {shape} ({what}) are {total} values, above the limit of \
                 {MAX_DATA_ELEMENTS} values held in memory"
            ),
        });
    }
    Ok(())
}

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

    /// Keep the first `n` samples, which must exist (1 ≤ n ≤ len).
    pub fn take_first(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::Invalid {
                what: "samples",
                msg: "must be at least 1".into(),
            });
        }
        if n > self.len() {
            return Err(Error::Invalid {
                what: "samples",
                msg: format!(
                    "{n} is more than the {} samples in {}",
                    self.len(),
                    crate::error::escape(&self.source)
                ),
            });
        }
        self.truncate(n);
        Ok(())
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
        if self.shape.kind == crate::model::Kind::Ids {
            tokens::check_ids(self, model)?;
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

    /// Load a safetensors file (`x` [N,C,H,W] floating point, `y` [N]
    /// integer) or a folder of CIFAR-10 binary batches.
    pub fn load(path: &Path) -> Result<Dataset> {
        Dataset::load_first(path, None)
    }

    /// Like [`Dataset::load`], keeping only the first `samples` (which must
    /// be between 1 and the number the source holds). Everything is checked
    /// from metadata and headers before any value is converted.
    pub fn load_first(path: &Path, samples: Option<usize>) -> Result<Dataset> {
        if samples == Some(0) {
            return Err(Error::Invalid {
                what: "samples",
                msg: "must be at least 1".into(),
            });
        }
        if std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
            return load_cifar_dir_first(path, samples);
        }
        // A CIFAR-10 batch file given alone: its folder is what loads.
        if path.extension().is_some_and(|e| e == "bin") {
            return Err(Error::Data {
                file: path.display().to_string(),
                msg: "a CIFAR-10 .bin batch file is read from its folder: give the folder \
                      that holds data_batch_*.bin (or test_batch.bin), or a safetensors file \
                      with x and y"
                    .into(),
            });
        }
        let file = tensorio::File::open(path)?;
        let label = file.label.clone();
        let err = |msg: String| Error::Data {
            file: label.clone(),
            msg,
        };
        let layout = file.layout();
        if let Some(name) = layout.keys().find(|n| *n != "x" && *n != "y") {
            return Err(err(format!(
                "unexpected tensor `{name}`: a data file holds `x` (images [N, C, H, W]) and `y` (labels [N])"
            )));
        }
        let x = layout
            .get("x")
            .ok_or_else(|| err("missing tensor `x` (images [N, C, H, W])".into()))?;
        if tensorio::is_integer(x.dtype) && x.shape.len() == 2 {
            return tokens::load_tokens(&file, samples);
        }
        let y = layout
            .get("y")
            .ok_or_else(|| err("missing tensor `y` (labels [N])".into()))?;
        if !tensorio::is_float(x.dtype) {
            return Err(err(format!(
                "`x` has dtype {}; images must be floating point (F32, F64, F16 or BF16), \
                 normalised as the model expects (raw U8 pixels are not); token ids are \
                 integer [N, T]",
                x.dtype
            )));
        }
        if !tensorio::is_integer(y.dtype) {
            return Err(err(format!(
                "`y` has dtype {}; labels must be integer class indices (I64 or I32)",
                y.dtype
            )));
        }
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
        // Shape::numel must not overflow, even with N = 0.
        x.shape[1..]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_DATA_ELEMENTS)
            .ok_or_else(|| {
                err(format!(
                    "`x` has shape {:?}: one image alone is above the limit of {MAX_DATA_ELEMENTS} values",
                    x.shape
                ))
            })?;
        let available = x.shape[0];
        let n = samples.unwrap_or(available);
        if n > available {
            return Err(Error::Invalid {
                what: "samples",
                msg: format!("{n} is more than the {available} samples in {label}"),
            });
        }
        let shape = Shape::new(x.shape[1], x.shape[2], x.shape[3]);
        check_data_size(&label, n, shape)?;
        let yt = file.tensor_first("y", n)?;
        let mut labels = Vec::with_capacity(n);
        for (i, &v) in yt.data.iter().take(n).enumerate() {
            if v < 0.0 || v > u32::MAX as f64 {
                return Err(err(format!("label {v} of sample {i} is not a class index")));
            }
            labels.push(v as u32);
        }
        let xt = file.tensor_first("x", n * shape.numel())?;
        Ok(Dataset {
            x: xt.data.iter().map(|&v| v as f32).collect(),
            y: labels,
            shape,
            source: label,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let s = self.shape;
        if s.kind == crate::model::Kind::Ids {
            let x: Vec<i64> = self.x.iter().map(|&v| v as i64).collect();
            return tensorio::write(path, &[("x", &[n, s.c], tensorio::Values::I64(&x))]);
        }
        let x: Vec<f64> = self.x.iter().map(|&v| v as f64).collect();
        let y: Vec<i64> = self.y.iter().map(|&v| v as i64).collect();
        tensorio::write(
            path,
            &[
                ("x", &[n, s.c, s.h, s.w], tensorio::Values::F64(&x)),
                ("y", &[n], tensorio::Values::I64(&y)),
            ],
        )
    }
}

//! CIFAR-10 binary format: records of one label byte then 3072 bytes (the
//! R, G and B planes of a 32x32 image).

use super::Dataset;
use crate::error::{Error, Result};
use crate::model::Shape;
use std::path::Path;

pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
const RECORD: usize = 1 + 3 * 32 * 32;

/// Every `*.bin` file of the folder in name order (`data_batch_1.bin` ..
/// `data_batch_5.bin`, then `test_batch.bin`), scaled to [0, 1] and
/// normalised per channel.
pub fn load_cifar_dir(dir: &Path) -> Result<Dataset> {
    let label = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Data {
            file: label,
            msg: "no CIFAR-10 `.bin` files in this folder".into(),
        });
    }
    let mut x = Vec::new();
    let mut y = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(Error::Data {
                file: f.display().to_string(),
                msg: format!(
                    "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                    bytes.len()
                ),
            });
        }
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            if rec[0] > 9 {
                return Err(Error::Data {
                    file: f.display().to_string(),
                    msg: format!("record {i} has label {} (CIFAR-10 labels are 0..9)", rec[0]),
                });
            }
            y.push(rec[0] as u32);
            for (c, plane) in rec[1..].chunks_exact(1024).enumerate() {
                x.extend(
                    plane
                        .iter()
                        .map(|&p| (p as f32 / 255.0 - CIFAR_MEAN[c]) / CIFAR_STD[c]),
                );
            }
        }
    }
    Ok(Dataset {
        x,
        y,
        shape: Shape::new(3, 32, 32),
        source: label,
    })
}

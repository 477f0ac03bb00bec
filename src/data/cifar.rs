//! CIFAR-10 binary format: records of one label byte then 3072 bytes (the
//! R, G and B planes of a 32x32 image).

use super::{check_data_size, Dataset};
use crate::error::{Error, Result};
use crate::model::{tensorio, Shape};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
const RECORD: usize = 1 + 3 * 32 * 32;

/// Every `*.bin` file of the folder in name order (`data_batch_1.bin` ..
/// `data_batch_5.bin`, then `test_batch.bin`), scaled to [0, 1] and
/// normalised per channel.
pub fn load_cifar_dir(dir: &Path) -> Result<Dataset> {
    load_cifar_dir_first(dir, None)
}

/// Like [`load_cifar_dir`], reading only the first `samples` records. Every
/// file is checked from its metadata first (a regular file, a whole number
/// of records), so a FIFO or device named `*.bin` is refused unopened.
pub fn load_cifar_dir_first(dir: &Path, samples: Option<usize>) -> Result<Dataset> {
    let label = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
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
    let mut records = Vec::with_capacity(files.len());
    for f in &files {
        let name = f.display().to_string();
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        if !meta.is_file() {
            return Err(Error::Data {
                file: name,
                msg: format!(
                    "is {}; CIFAR-10 batches are regular files",
                    tensorio::file_kind(&meta)
                ),
            });
        }
        let len = meta.len();
        if len == 0 || len % RECORD as u64 != 0 {
            return Err(Error::Data {
                file: name,
                msg: format!("{len} bytes is not a whole number of {RECORD}-byte CIFAR-10 records"),
            });
        }
        records.push((len / RECORD as u64) as usize);
    }
    let available: usize = records.iter().sum();
    let n = samples.unwrap_or(available);
    if n > available {
        return Err(Error::Invalid {
            what: "samples",
            msg: format!(
                "{n} is more than the {available} samples in {}",
                crate::error::escape(&label)
            ),
        });
    }
    let shape = Shape::new(3, 32, 32);
    check_data_size(&label, n, shape)?;
    let mut x = Vec::with_capacity(n * shape.numel());
    let mut y = Vec::with_capacity(n);
    for (f, &count) in files.iter().zip(&records) {
        if y.len() == n {
            break;
        }
        let take = count.min(n - y.len());
        let mut bytes = vec![0u8; take * RECORD];
        std::fs::File::open(f)
            .and_then(|mut h| h.read_exact(&mut bytes))
            .map_err(|e| Error::io(f, e))?;
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
        shape,
        source: label,
    })
}

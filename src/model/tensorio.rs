//! safetensors reading and writing: every float dtype PyTorch saves is read
//! into f64; results are written as f64 so nothing is lost.

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor read from a file: its shape and values.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
    pub dtype: Dtype,
}

pub fn file_label(path: &Path) -> String {
    path.display().to_string()
}

/// Read every tensor of a safetensors file, converting floats and integers
/// to f64 (integers are exact below 2^53, which covers labels and counters).
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_bytes(&file_label(path), &bytes)
}

pub fn read_bytes(file: &str, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Format {
        path: file.into(),
        msg: format!("not a valid safetensors file: {e}"),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = convert(&view).map_err(|msg| Error::Tensor {
            file: file.to_string(),
            name: name.clone(),
            msg,
        })?;
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                data,
                dtype: view.dtype(),
            },
        );
    }
    Ok(out)
}

fn convert(view: &TensorView) -> std::result::Result<Vec<f64>, String> {
    let b = view.data();
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| c.try_into().unwrap())
    }
    Ok(match view.dtype() {
        Dtype::F64 => chunks::<8>(b).map(f64::from_le_bytes).collect(),
        Dtype::F32 => chunks::<4>(b)
            .map(|c| f32::from_le_bytes(c) as f64)
            .collect(),
        Dtype::F16 => chunks::<2>(b)
            .map(|c| half::f16::from_le_bytes(c).to_f64())
            .collect(),
        Dtype::BF16 => chunks::<2>(b)
            .map(|c| half::bf16::from_le_bytes(c).to_f64())
            .collect(),
        Dtype::I64 => chunks::<8>(b)
            .map(|c| i64::from_le_bytes(c) as f64)
            .collect(),
        Dtype::I32 => chunks::<4>(b)
            .map(|c| i32::from_le_bytes(c) as f64)
            .collect(),
        Dtype::I16 => chunks::<2>(b)
            .map(|c| i16::from_le_bytes(c) as f64)
            .collect(),
        Dtype::U8 => b.iter().map(|&x| x as f64).collect(),
        Dtype::I8 => b.iter().map(|&x| x as i8 as f64).collect(),
        Dtype::BOOL => b.iter().map(|&x| (x != 0) as u8 as f64).collect(),
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

/// Write named f64 tensors (shape, data) as a safetensors file of f64.
pub fn write_f64(path: &Path, tensors: &[(String, Vec<usize>, Vec<f64>)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F64, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Format {
                    path: path.into(),
                    msg: format!("tensor {n}: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let out = safetensors::serialize(views, None).map_err(|e| Error::Format {
        path: path.into(),
        msg: e.to_string(),
    })?;
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

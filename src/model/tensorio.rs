//! safetensors reading and writing. A file is read in two steps: its
//! header (every tensor's name, dtype and shape) is checked first, then
//! only the tensors wanted are converted to f64. Results are written as
//! f64 so nothing is lost (labels as i64).
//!
//! Only regular files are read: a FIFO, device or directory is refused
//! from its metadata before it is opened, so nothing blocks.

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

/// The most values converted from one tensor of a file (the largest
/// image tensor of a data set).
pub const MAX_FILE_ELEMENTS: usize = crate::data::MAX_DATA_ELEMENTS;

/// A tensor read from a file: its shape and values.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
    pub dtype: Dtype,
}

/// What the header says about one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Layout {
    pub fn numel(&self) -> usize {
        // The header was validated: the byte size, hence the product, fits.
        self.shape.iter().product()
    }
}

/// The floating-point dtypes PyTorch saves weights in.
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Integer dtypes (class labels, counters).
pub fn is_integer(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::I8
            | Dtype::I16
            | Dtype::I32
            | Dtype::I64
            | Dtype::U8
            | Dtype::U16
            | Dtype::U32
            | Dtype::U64
    )
}

pub fn file_label(path: &Path) -> String {
    path.display().to_string()
}

/// What a non-regular file is, in words.
pub fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The metadata of `path`, which must be a regular file (symbolic links
/// are followed). Nothing is opened.
pub fn regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Format {
            path: path.into(),
            msg: format!("is {}, not a regular file", file_kind(&meta)),
        });
    }
    Ok(meta)
}

/// A safetensors file in memory, its header validated.
pub struct File {
    pub label: String,
    bytes: Vec<u8>,
    layout: BTreeMap<String, Layout>,
}

impl File {
    /// Read a regular file and validate its header (offsets, sizes).
    pub fn open(path: &Path) -> Result<File> {
        regular_file(path)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        File::from_bytes(&file_label(path), bytes)
    }

    pub fn from_bytes(label: &str, bytes: Vec<u8>) -> Result<File> {
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Format {
            path: label.into(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let mut layout = BTreeMap::new();
        for (name, info) in meta.tensors() {
            layout.insert(
                name,
                Layout {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                },
            );
        }
        Ok(File {
            label: label.to_string(),
            bytes,
            layout,
        })
    }

    /// Every tensor's dtype and shape, by name, from the header.
    pub fn layout(&self) -> &BTreeMap<String, Layout> {
        &self.layout
    }

    fn tensor_error(&self, name: &str, msg: String) -> Error {
        Error::Tensor {
            file: self.label.clone(),
            name: name.to_string(),
            msg,
        }
    }

    /// Convert one tensor to f64 (integers are exact below 2^53, which
    /// covers labels and counters).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.tensor_first(name, usize::MAX)
    }

    /// The first `count` values (row-major) of a tensor, converted to f64;
    /// all of them if it has fewer. At most [`MAX_FILE_ELEMENTS`] are
    /// converted.
    pub fn tensor_first(&self, name: &str, count: usize) -> Result<Tensor> {
        let layout = self
            .layout
            .get(name)
            .ok_or_else(|| self.tensor_error(name, "missing".into()))?;
        let count = count.min(layout.numel());
        if count > MAX_FILE_ELEMENTS {
            return Err(self.tensor_error(
                name,
                format!(
                    "{count} elements, above the limit of {MAX_FILE_ELEMENTS} read from a tensor"
                ),
            ));
        }
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Format {
            path: self.label.clone().into(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let view = st
            .tensor(name)
            .map_err(|e| self.tensor_error(name, e.to_string()))?;
        let bytes = view.dtype().bitsize() / 8;
        if bytes == 0 {
            return Err(self.tensor_error(name, format!("unsupported dtype {}", view.dtype())));
        }
        let data = convert(view.dtype(), &view.data()[..count * bytes])
            .map_err(|msg| self.tensor_error(name, msg))?;
        Ok(Tensor {
            shape: view.shape().to_vec(),
            data,
            dtype: view.dtype(),
        })
    }
}

/// Read every tensor of a safetensors file, converting floats and integers
/// to f64.
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = File::open(path)?;
    read_all(&f)
}

pub fn read_bytes(file: &str, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let f = File::from_bytes(file, bytes.to_vec())?;
    read_all(&f)
}

fn read_all(f: &File) -> Result<BTreeMap<String, Tensor>> {
    f.layout()
        .keys()
        .map(|name| Ok((name.clone(), f.tensor(name)?)))
        .collect()
}

fn convert(dtype: Dtype, b: &[u8]) -> std::result::Result<Vec<f64>, String> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Ok(match dtype {
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
        Dtype::U64 => chunks::<8>(b)
            .map(|c| u64::from_le_bytes(c) as f64)
            .collect(),
        Dtype::I32 => chunks::<4>(b)
            .map(|c| i32::from_le_bytes(c) as f64)
            .collect(),
        Dtype::U32 => chunks::<4>(b)
            .map(|c| u32::from_le_bytes(c) as f64)
            .collect(),
        Dtype::I16 => chunks::<2>(b)
            .map(|c| i16::from_le_bytes(c) as f64)
            .collect(),
        Dtype::U16 => chunks::<2>(b)
            .map(|c| u16::from_le_bytes(c) as f64)
            .collect(),
        Dtype::U8 => b.iter().map(|&x| x as f64).collect(),
        Dtype::I8 => b.iter().map(|&x| x as i8 as f64).collect(),
        Dtype::BOOL => b.iter().map(|&x| (x != 0) as u8 as f64).collect(),
        other => return Err(format!("unsupported dtype {other}")),
    })
}

/// Values of a tensor to write.
pub enum Values<'a> {
    F64(&'a [f64]),
    /// Rounded to float32 on writing.
    F32(&'a [f64]),
    I64(&'a [i64]),
}

/// Write named tensors (name, shape, values) as a safetensors file.
pub fn write(path: &Path, tensors: &[(&str, &[usize], Values)]) -> Result<()> {
    let bytes: Vec<(Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(_, _, v)| match v {
            Values::F64(d) => (Dtype::F64, d.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Values::F32(d) => (
                Dtype::F32,
                d.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            ),
            Values::I64(d) => (Dtype::I64, d.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), (dtype, b))| {
            TensorView::new(*dtype, s.to_vec(), b)
                .map(|v| (n.to_string(), v))
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

/// Write named f64 tensors (shape, data) as a safetensors file of f64.
pub fn write_f64(path: &Path, tensors: &[(String, Vec<usize>, Vec<f64>)]) -> Result<()> {
    let t: Vec<(&str, &[usize], Values)> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), Values::F64(d)))
        .collect();
    write(path, &t)
}

//! safetensors reading and writing. A file is read in two steps: its
//! header (every tensor's name, dtype and shape) is checked first, then
//! only the tensors wanted are converted to f64. Results are written as
//! f64 so nothing is lost (labels as i64).
//!
//! Only regular files are read: a FIFO, device or directory is refused
//! from its metadata before it is opened, so nothing blocks.

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

/// The most values converted from one tensor of a file (the largest
/// image tensor of a data set: `data::MAX_DATA_ELEMENTS`, 2^30 f32 values,
/// 4 GiB).
pub const MAX_FILE_ELEMENTS: usize = 1 << 30;

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

/// Where a file's tensor data is: in memory, or on disk, read tensor by
/// tensor.
enum Data {
    Memory(Vec<u8>),
    Disk(std::sync::Mutex<std::fs::File>),
}

/// The most header bytes read (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors file, its header read and validated first (every tensor's
/// name, dtype, shape and byte range, each error naming its tensor); the
/// data of a file on disk is read only tensor by tensor as asked for.
pub struct File {
    pub label: String,
    data: Data,
    /// Where the data starts (8 + the header's length).
    start: u64,
    layout: BTreeMap<String, Layout>,
    ranges: BTreeMap<String, (u64, u64)>,
}

impl File {
    /// Open a regular file and validate its header (offsets, sizes); no
    /// tensor data is read.
    pub fn open(path: &Path) -> Result<File> {
        use std::io::Read;
        let len = regular_file(path)?.len();
        let label = file_label(path);
        let bad = |msg: String| Error::Format {
            path: label.clone().into(),
            msg: format!("not a valid safetensors file: {msg}"),
        };
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        if len < 8 {
            return Err(bad(format!(
                "{len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut n8 = [0u8; 8];
        f.read_exact(&mut n8).map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(n8);
        check_header_len(n, len).map_err(bad)?;
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let (layout, ranges) = parse_header(&header, len - 8 - n).map_err(bad)?;
        Ok(File {
            label,
            data: Data::Disk(std::sync::Mutex::new(f)),
            start: 8 + n,
            layout,
            ranges,
        })
    }

    pub fn from_bytes(label: &str, bytes: Vec<u8>) -> Result<File> {
        let bad = |msg: String| Error::Format {
            path: label.into(),
            msg: format!("not a valid safetensors file: {msg}"),
        };
        let len = bytes.len() as u64;
        let Some(n8) = bytes.get(..8) else {
            return Err(bad(format!(
                "{len} bytes, shorter than the 8-byte header length"
            )));
        };
        let n = u64::from_le_bytes(n8.try_into().expect("8 bytes"));
        check_header_len(n, len).map_err(bad)?;
        let (layout, ranges) = parse_header(&bytes[8..8 + n as usize], len - 8 - n).map_err(bad)?;
        Ok(File {
            label: label.to_string(),
            data: Data::Memory(bytes),
            start: 8 + n,
            layout,
            ranges,
        })
    }

    /// `len` bytes of a tensor's data from `offset` (relative to the data).
    fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let at = self.start + offset;
        match &self.data {
            Data::Memory(b) => Ok(b[at as usize..at as usize + len].to_vec()),
            Data::Disk(f) => {
                use std::io::{Read, Seek, SeekFrom};
                let io = |e| Error::io(self.label.clone(), e);
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                f.seek(SeekFrom::Start(at)).map_err(io)?;
                let mut out = Vec::new();
                out.try_reserve_exact(len).map_err(|_| {
                    self.tensor_error_at(offset, format!("no memory for its {len} bytes"))
                })?;
                out.resize(len, 0);
                f.read_exact(&mut out).map_err(io)?;
                Ok(out)
            }
        }
    }

    fn tensor_error_at(&self, offset: u64, msg: String) -> Error {
        let name = self
            .ranges
            .iter()
            .find(|(_, r)| r.0 == offset)
            .map_or("?", |(n, _)| n.as_str());
        self.tensor_error(name, msg)
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
        let bytes = layout.dtype.bitsize() / 8;
        if bytes == 0 || layout.dtype.bitsize() % 8 != 0 {
            return Err(self.tensor_error(name, format!("unsupported dtype {}", layout.dtype)));
        }
        let (s, _) = self.ranges[name];
        let raw = self.read_range(s, count * bytes)?;
        let data = convert(layout.dtype, &raw).map_err(|msg| self.tensor_error(name, msg))?;
        Ok(Tensor {
            shape: layout.shape.clone(),
            data,
            dtype: layout.dtype,
        })
    }
}

/// A header length `n` in a file of `len` bytes.
fn check_header_len(n: u64, len: u64) -> std::result::Result<(), String> {
    if n > MAX_HEADER {
        return Err(format!(
            "its first 8 bytes give a header of {n} bytes, above the limit of {MAX_HEADER} \
             (not a safetensors file?)"
        ));
    }
    if 8 + n > len {
        return Err(format!(
            "its first 8 bytes give a header of {n} bytes, past the end of the file ({len} bytes)"
        ));
    }
    Ok(())
}

type Header = (BTreeMap<String, Layout>, BTreeMap<String, (u64, u64)>);

/// A header's tensors, checked: each tensor's byte range holds exactly
/// its shape × dtype, the ranges tile the `data_len` bytes after the
/// header; every error names its tensor.
fn parse_header(header: &[u8], data_len: u64) -> std::result::Result<Header, String> {
    let text = std::str::from_utf8(header).map_err(|e| format!("its header is not UTF-8 ({e})"))?;
    /// One tensor's entry, as the header spells it.
    #[derive(serde::Deserialize)]
    struct Info {
        dtype: Dtype,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("its header: {e}"))?;
    let mut layout = BTreeMap::new();
    let mut ranges = BTreeMap::new();
    let mut by_start: Vec<(u64, u64, String)> = vec![];
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: Info = serde_json::from_value(v).map_err(|e| {
            format!(
                "tensor `{}` in its header: {e}",
                crate::error::escape(&name)
            )
        })?;
        let (s, e) = info.data_offsets;
        let size = info
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(info.dtype.bitsize() as u64))
            .filter(|b| b % 8 == 0)
            .map(|b| b / 8);
        let shown = crate::error::escape(&name);
        match size {
            None => {
                return Err(format!(
                    "tensor `{shown}`: shape {:?} of {} is not a whole number of bytes that fits \
                     in 64 bits",
                    info.shape, info.dtype
                ))
            }
            Some(b) if e < s || e - s != b => {
                return Err(format!(
                    "tensor `{shown}`: shape {:?} of {} takes {b} bytes, its data_offsets [{s}, \
                     {e}] give {}",
                    info.shape,
                    info.dtype,
                    e as i128 - s as i128
                ))
            }
            _ => {}
        }
        by_start.push((s, e, name.clone()));
        layout.insert(
            name.clone(),
            Layout {
                dtype: info.dtype,
                shape: info.shape.clone(),
            },
        );
        ranges.insert(name, (s, e));
    }
    by_start.sort();
    let mut at = 0;
    for (s, e, name) in &by_start {
        if *s != at {
            return Err(format!(
                "tensor `{}`: its data starts at byte {s}, the tensor before it ends at {at} \
                 (overlapping or a gap)",
                crate::error::escape(name)
            ));
        }
        at = *e;
    }
    if at != data_len {
        return Err(format!(
            "the header describes {at} bytes of tensor data, the file holds {data_len} after it"
        ));
    }
    Ok((layout, ranges))
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

//! ONNX tensors (initializers and `Constant` values) as float64: the
//! element types an exported CNN holds, stored in `raw_data` (little
//! endian), in the typed fields (`float_data`, `double_data`,
//! `int32_data`, `int64_data`), or in an external data file beside the
//! model (what `torch.onnx.export(..., dynamo=True)` writes for large
//! models).

use super::proto::TensorProto;
use crate::model::MAX_ELEMENTS;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// A decoded tensor: its dims and its elements in row-major order.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Vec<f64>,
    /// An integer or boolean tensor (shapes, axes), not a float one.
    pub int: bool,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// `TensorProto.DataType` names, for errors.
fn type_name(t: i32) -> String {
    match t {
        0 => "UNDEFINED".into(),
        1 => "FLOAT".into(),
        2 => "UINT8".into(),
        3 => "INT8".into(),
        4 => "UINT16".into(),
        5 => "INT16".into(),
        6 => "INT32".into(),
        7 => "INT64".into(),
        8 => "STRING".into(),
        9 => "BOOL".into(),
        10 => "FLOAT16".into(),
        11 => "DOUBLE".into(),
        12 => "UINT32".into(),
        13 => "UINT64".into(),
        14 => "COMPLEX64".into(),
        15 => "COMPLEX128".into(),
        16 => "BFLOAT16".into(),
        t => format!("data type {t}"),
    }
}

/// The bytes of `raw_data` or of the external file the tensor names.
fn raw_bytes(t: &TensorProto, dir: &Path) -> Result<Option<Vec<u8>>, String> {
    if t.data_location != 1 {
        return Ok((!t.raw_data.is_empty()).then(|| t.raw_data.clone()));
    }
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let location = get("location").ok_or("external data without a `location`")?;
    let rel = Path::new(location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "external data location `{location}` is not a plain path inside the model's folder"
        ));
    }
    let num = |k: &str| -> Result<Option<u64>, String> {
        get(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("external data `{k}` is not a whole number: `{v}`"))
            })
            .transpose()
    };
    let offset = num("offset")?.unwrap_or(0);
    let path = dir.join(rel);
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let length = match num("length")? {
        Some(l) => l,
        None => size.saturating_sub(offset),
    };
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "external data {}: bytes {offset}..{offset}+{length} lie beyond its {size} bytes",
            path.display()
        ));
    }
    if length > (MAX_ELEMENTS as u64) * 8 {
        return Err(format!(
            "external data of {length} bytes, above the limit of {MAX_ELEMENTS} elements"
        ));
    }
    let mut buf = vec![0u8; length as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(buf))
}

/// Decodes `t` (external data is read relative to `dir`). The error is the
/// reason alone; the caller names the tensor.
pub fn decode(t: &TensorProto, dir: &Path) -> Result<Tensor, String> {
    if t.segment.is_some() {
        return Err("a tensor stored in segments is not supported".into());
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        dims.push(usize::try_from(d).map_err(|_| format!("negative dimension {d}"))?);
    }
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            format!("dims {dims:?} exceed the limit of {MAX_ELEMENTS} elements per tensor")
        })?;
    let raw = raw_bytes(t, dir)?;
    let width = match t.data_type {
        1 | 6 => 4,
        7 | 11 => 8,
        10 | 16 => 2,
        9 => 1,
        other => {
            return Err(format!(
                "element type {} is not supported (FLOAT, DOUBLE, FLOAT16, BFLOAT16, INT32, \
                 INT64 and BOOL are)",
                type_name(other)
            ))
        }
    };
    let int = matches!(t.data_type, 6 | 7 | 9);
    let data: Vec<f64> = if let Some(raw) = raw {
        if raw.len() != numel * width {
            return Err(format!(
                "{} bytes of data for {numel} elements of {}",
                raw.len(),
                type_name(t.data_type)
            ));
        }
        let c = raw.chunks_exact(width);
        match t.data_type {
            1 => c
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            11 => c
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            10 => c
                .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f64())
                .collect(),
            16 => c
                .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64())
                .collect(),
            6 => c
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            7 => c
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            _ => c.map(|b| f64::from(b[0] != 0)).collect(),
        }
    } else {
        match t.data_type {
            1 => t.float_data.iter().map(|&v| v as f64).collect(),
            11 => t.double_data.clone(),
            7 => t.int64_data.iter().map(|&v| v as f64).collect(),
            6 | 9 => t.int32_data.iter().map(|&v| v as f64).collect(),
            10 => t
                .int32_data
                .iter()
                .map(|&v| half::f16::from_bits(v as u16).to_f64())
                .collect(),
            _ => t
                .int32_data
                .iter()
                .map(|&v| half::bf16::from_bits(v as u16).to_f64())
                .collect(),
        }
    };
    if data.len() != numel {
        return Err(format!(
            "{} elements stored for dims {dims:?} ({numel} elements)",
            data.len()
        ));
    }
    Ok(Tensor {
        name: t.name.clone(),
        dims,
        data,
        int,
    })
}

/// An ONNX float attribute (float32) as the float64 its shortest decimal
/// form reads as: 0.01f32 is 0.009999999776…, which a PyTorch float64
/// model holding `negative_slope=0.01` would not match to 1e-10. The
/// shortest decimal that rounds to the same float32 is what the exporter
/// was given in every practical case.
pub fn attr_f64(v: f32) -> f64 {
    format!("{v}").parse::<f64>().unwrap_or(v as f64)
}

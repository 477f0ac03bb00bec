//! Typed library errors. The CLI wraps these with `anyhow` context; the
//! library never panics on bad input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("architecture {file}, line {line}: {msg}")]
    Architecture {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("unknown model `{0}` (known: {1})")]
    UnknownModel(String, String),
    #[error("tensor `{name}` in {file}: {msg}")]
    Tensor {
        file: String,
        name: String,
        msg: String,
    },
    #[error("data {file}: {msg}")]
    Data { file: String, msg: String },
    #[error("invalid argument {flag}: {msg}")]
    Argument { flag: String, msg: String },
    #[error("GPU: {0}")]
    Gpu(String),
    #[error(
        "tensor `{tensor}` needs {bytes} bytes but the device limit {limit_name} is {limit} bytes"
    )]
    DeviceLimit {
        tensor: String,
        bytes: u64,
        limit_name: &'static str,
        limit: u64,
    },
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    #[error("numerical: {0}")]
    Numerical(String),
    #[error("{0}")]
    TooLarge(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

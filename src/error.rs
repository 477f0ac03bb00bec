//! Typed library errors. The CLI wraps these with `anyhow` context; the
//! library never panics on bad input.
//!
//! Every text an error shows that may come from a file (tensor names,
//! architecture lines, CIFAR file names, paths) goes through [`escape`],
//! so a crafted name cannot drive the terminal.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", escape_path(.path))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {}", escape_path(.path), escape(.msg))]
    Format { path: PathBuf, msg: String },
    #[error("architecture {}, line {line}: {}", escape(.file), escape(.msg))]
    Architecture {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("unknown model `{}` (known: {})", escape(.0), .1)]
    UnknownModel(String, String),
    #[error("tensor `{}` in {}: {}", escape(.name), escape(.file), escape(.msg))]
    Tensor {
        file: String,
        name: String,
        msg: String,
    },
    #[error("data {}: {}", escape(.file), escape(.msg))]
    Data { file: String, msg: String },
    /// An input or setting the caller gave is invalid. `what` names it in
    /// the library's terms ("batch size", "direction v"); the CLI maps it to
    /// its flag. Library code uses this, never `Argument`.
    #[error("invalid {what}: {}", escape(.msg))]
    Invalid { what: &'static str, msg: String },
    /// A layer the engine cannot compute on this executor or device: `layer`
    /// is its module name (or kind), `msg` states the limit.
    #[error("layer `{layer}`: {msg}")]
    Unsupported { layer: String, msg: String },
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
    /// Training left the range of the numbers it is computed or saved in:
    /// where (epoch and step, 1-based) and which tensor (`loss` for the
    /// mini-batch loss).
    #[error(
        "training diverged in epoch {epoch}, step {step} of {steps_in_epoch} (step {run_step} \
         of the run): `{}` {}",
        escape(.tensor),
        escape(.msg)
    )]
    Diverged {
        epoch: usize,
        step: usize,
        steps_in_epoch: usize,
        run_step: usize,
        tensor: String,
        msg: String,
    },
    #[error("{0}")]
    TooLarge(String),
    /// One of several workers (an adapter of `--devices`, an MPI rank)
    /// failed: which one, and its error in words.
    #[error("{worker}: {msg}")]
    Worker { worker: String, msg: String },
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

/// Whether `c` can move the cursor, recolour or reorder what a terminal
/// shows: C0/C1 controls (ESC, CR, BEL, ...) and the Unicode bidirectional
/// overrides and isolates.
fn is_terminal_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every terminal control character written as a Rust escape
/// (`\u{1b}`, `\n`, `\u{202e}`), for error messages that quote names read
/// from files. Text without such characters comes back unchanged.
pub fn escape(s: &str) -> String {
    if !s.chars().any(is_terminal_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_terminal_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn escape_path(p: &std::path::Path) -> String {
    escape(&p.display().to_string())
}

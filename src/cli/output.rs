//! Printing results: one JSON object with --json, readable lines otherwise.
//! Everything on stdout goes through [`print`], which turns a closed pipe
//! into [`BrokenPipe`] (the command then ends quietly, as `head` expects)
//! and any other failure (a full disk) into an error naming stdout.

use anyhow::{Context, Result};
use hesscope::decisions::DecisionReport;
use hesscope::report::Exporter;
use serde::Serialize;
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// Writes `path` atomically (`hesscope::train::write_atomic`); under MPI
/// only rank 0 writes, the other ranks computed the same result.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> hesscope::Result<()>,
) -> hesscope::Result<()> {
    if !hesscope::multi::is_root() {
        return Ok(());
    }
    hesscope::train::write_atomic(path, write)
}

/// An output file `path` (given by `flag`) can be written: its folder
/// exists and takes a new file (`NAME.tmp`, created and removed here), and
/// it is not a folder itself. Checked before the computation, so a typo
/// does not cost a run.
pub fn check_writable(flag: &str, path: &Path) -> Result<()> {
    if !hesscope::multi::is_root() {
        return Ok(());
    }
    if path.is_dir() {
        anyhow::bail!("invalid {flag} {}: a folder, not a file", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "invalid {flag} {}: its folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let mut probe = path.as_os_str().to_owned();
    probe.push(".tmp");
    let probe = std::path::PathBuf::from(probe);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&probe)
        .map_err(|e| {
            anyhow::anyhow!("invalid {flag} {}: cannot be written ({e})", path.display())
        })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The reader of stdout went away (`hesscope density --json | head -c 10`).
#[derive(Debug)]
pub struct BrokenPipe;

impl std::fmt::Display for BrokenPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed by its reader")
    }
}

impl std::error::Error for BrokenPipe {}

/// Write `text` to stdout and flush it.
pub fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let r = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(BrokenPipe.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// `text` and a newline on stdout.
pub fn line(text: impl AsRef<str>) -> Result<()> {
    let mut s = text.as_ref().to_string();
    s.push('\n');
    print(&s)
}

/// A one-line notice on stderr; a closed stderr is ignored.
pub fn notice(text: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "{}", text.as_ref());
}

/// ‖v‖₂, scaled by the largest |vᵢ| so that it overflows only when the
/// norm itself does (NaN when an element is).
pub fn vnorm(v: &[f64]) -> f64 {
    if v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if m == 0.0 || m.is_infinite() {
        return m;
    }
    m * v.iter().map(|x| (x / m) * (x / m)).sum::<f64>().sqrt()
}

/// A report: as one JSON line with `json`, otherwise as `key  value` lines.
pub fn emit<T: Serialize>(json: bool, report: &T) -> Result<()> {
    if json {
        return line(Exporter::JsonLine.render(report)?);
    }
    let value = serde_json::to_value(report)?;
    if let Value::Object(map) = value {
        let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
        let mut text = String::new();
        for (k, v) in map {
            if v.is_null() {
                continue;
            }
            // The decision report, as one line.
            if k == "decisions" {
                if let Ok(d) = serde_json::from_value::<DecisionReport>(v.clone()) {
                    text.push_str(&format!("{k:>width$}  {}\n", d.summary()));
                }
                continue;
            }
            let shown = match &v {
                Value::String(s) => s.clone(),
                Value::Number(n) if n.is_f64() => n.as_f64().map(fmt_num).unwrap_or_default(),
                other => other.to_string(),
            };
            text.push_str(&format!("{k:>width$}  {shown}\n"));
        }
        print(&text)?;
    }
    Ok(())
}

/// Print a report as one JSON line when `json` (the prose is the caller's
/// otherwise), and write it to `out` as indented JSON when given.
pub fn export<T: Serialize>(json: bool, out: Option<&std::path::Path>, report: &T) -> Result<()> {
    if let Some(p) = out {
        write_atomic(p, |t| Exporter::JsonPretty.write(t, report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if json {
        line(Exporter::JsonLine.render(report)?)?;
    }
    Ok(())
}

fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        format!("{x:.6e}")
    } else {
        format!("{x:.6}")
    }
}

/// `x` with the given format, or `unknown` when it is not finite.
pub fn or_unknown(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "unknown".into())
}

//! Tests that run a script of `python/tests` where python3 imports torch.
//!
//! Policy: CI installs no torch (`.ci/run` installs Mesa's drivers only),
//! so these tests skip there, as anywhere the modules are missing: a skip
//! prints what was skipped and does not fail under `CI=true` (unlike the
//! GPU tests, whose drivers CI does install).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// python3 with `modules` importable.
pub struct Python {
    root: PathBuf,
}

/// python3, when it imports every module of `modules`; else None, after
/// printing `SKIPPED: ...` naming them.
pub fn python_with(modules: &[&str]) -> Option<Python> {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED: python3 with {} not found (CI installs no torch)",
            modules.join(", ")
        );
        return None;
    }
    Some(Python {
        root: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    })
}

impl Python {
    /// `python3 ARGS` in `dir`, with `PYTHONPATH=python` (the exporter),
    /// `HESSCOPE` the built binary, and `env`.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S], dir: &Path, env: &[(&str, &str)]) -> Output {
        let mut c = Command::new("python3");
        c.args(args)
            .current_dir(dir)
            .env("HESSCOPE", env!("CARGO_BIN_EXE_hesscope"))
            .env("PYTHONPATH", self.root.join("python"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// Script `python/tests/SCRIPT ARGS` in `dir`, which must succeed; its
    /// standard output.
    pub fn script(&self, script: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> String {
        let mut all = vec![self.root.join("python/tests").join(script).into_os_string()];
        all.extend(args.iter().map(|a| a.into()));
        let out = self.run(&all, dir, env);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script} {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// As [`Python::script`], the last line of its output read as JSON.
    pub fn json(
        &self,
        script: &str,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> serde_json::Value {
        let stdout = self.script(script, args, dir, env);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{script}: last line is not JSON ({e}): {stdout}"))
    }
}

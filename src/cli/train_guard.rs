//! What keeps a `hesscope train` run from lying around its computation:
//! one run per output folder (a lock file held for the run's life, and a
//! fresh run refusing a folder that holds another run's files unless
//! `--overwrite`), a resumed run's settings compared with the checkpoint's
//! before its files are read, and progress lines that stop being written
//! when stdout goes away while the training goes on.

use crate::cli::output::{self, notice, BrokenPipe};
use anyhow::{bail, Result};
use hesscope::train::{Augment, CheckpointMeta, Htr, Recipe, RunMeasures};
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The lock file in a run's folder.
pub const LOCK: &str = "train.lock";

/// A run's files directly in its folder (besides `checkpoints/`).
const RUN_FILES: &[&str] = &[
    "final.safetensors",
    "final.f64.safetensors",
    "final.optim.safetensors",
    "final.json",
    "trajectory.json",
    "training.svg",
    "densities.svg",
    "curvature.svg",
];

/// The output folder, held: its lock is released when this is dropped
/// (or the process ends, however it ends).
pub struct RunDir {
    _lock: File,
}

/// The files of a run in `out`: [`RUN_FILES`] and the checkpoints'
/// `epoch-E.*` files (with stray `.tmp`s).
fn run_files(out: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = RUN_FILES
        .iter()
        .flat_map(|f| [out.join(f), out.join(format!("{f}.tmp"))])
        .filter(|p| p.exists())
        .collect();
    if let Ok(entries) = std::fs::read_dir(out.join("checkpoints")) {
        let mut ck: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("epoch-"))
            })
            .map(|e| e.path())
            .collect();
        ck.sort();
        found.extend(ck);
    }
    found
}

/// Take `out` for a run: created if missing (with `checkpoints/`), locked
/// against another `hesscope train` on it, and for a fresh run (not
/// `resume`) free of another run's files, which `overwrite` deletes.
pub fn claim(out: &Path, resume: bool, overwrite: bool) -> Result<RunDir> {
    if out.to_str().is_none() {
        bail!(
            "invalid --out {}: not a UTF-8 path (trajectory.json and the checkpoints record it)",
            out.display()
        );
    }
    let ck = out.join("checkpoints");
    std::fs::create_dir_all(&ck).map_err(|e| {
        anyhow::anyhow!(
            "invalid --out {}: creating {}: {e}",
            out.display(),
            ck.display()
        )
    })?;
    let lock_path = out.join(LOCK);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid --out {}: {}: {e}",
                out.display(),
                lock_path.display()
            )
        })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "invalid --out {}: another hesscope train is running in it (it holds {})",
            out.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            bail!(
                "invalid --out {}: locking {}: {e}",
                out.display(),
                lock_path.display()
            )
        }
    }
    if !resume {
        let old = run_files(out);
        if !old.is_empty() && !overwrite {
            let shown: Vec<String> = old
                .iter()
                .take(3)
                .map(|p| p.display().to_string())
                .collect();
            bail!(
                "invalid --out {}: it holds another run's files ({}{}); continue that run with \
                 --resume {}, choose another folder, or add --overwrite to delete them first",
                out.display(),
                shown.join(", "),
                if old.len() > 3 {
                    format!(" and {} more", old.len() - 3)
                } else {
                    String::new()
                },
                out.display()
            );
        }
        for p in &old {
            std::fs::remove_file(p)
                .map_err(|e| anyhow::anyhow!("--overwrite: deleting {}: {e}", p.display()))?;
        }
        if !old.is_empty() {
            notice(format!(
                "hesscope: --overwrite: deleted {} files of the previous run in {}",
                old.len(),
                out.display()
            ));
        }
    }
    Ok(RunDir { _lock: lock })
}

/// The settings a run was started with, as a resumed run gives them.
pub struct Given<'a> {
    pub recipe: &'a Recipe,
    pub batch: usize,
    pub model: &'a str,
    pub data: Option<&'a Path>,
    pub samples: usize,
    pub dtype: &'a str,
    pub augment: Augment,
    pub htr: Option<&'a Htr>,
    /// [`hesscope::train::run_identity`] of the model and data given.
    pub model_sha256: &'a str,
    pub data_sha256: &'a str,
    pub measures: &'a RunMeasures,
}

/// Every way `m` (a checkpoint of the run) differs from the settings given.
pub fn differences(g: &Given, m: &CheckpointMeta) -> Vec<String> {
    let mut diffs = vec![];
    let mut given = g.recipe.clone();
    given.epochs = m.recipe.epochs;
    if given != m.recipe {
        diffs.push(format!(
            "recipe {:?}, the run's is {:?}",
            g.recipe, m.recipe
        ));
    }
    if g.recipe.epochs < m.epoch {
        diffs.push(format!(
            "--epochs {} but {} epochs are done",
            g.recipe.epochs, m.epoch
        ));
    }
    if g.batch != m.batch {
        diffs.push(format!("--batch {}, the run's is {}", g.batch, m.batch));
    }
    if g.model != m.model {
        diffs.push(format!("--model {}, the run's is {}", g.model, m.model));
    }
    if g.data != m.data.as_deref() || g.samples != m.samples {
        diffs.push(format!(
            "--data {:?} with {} samples, the run's is {:?} with {}",
            g.data, g.samples, m.data, m.samples
        ));
    }
    if g.model == m.model && g.model_sha256 != m.model_sha256 {
        diffs.push(format!(
            "--model {} is not the architecture the run was made with (its layers or \
             tensors changed)",
            g.model
        ));
    }
    if g.data == m.data.as_deref() && g.samples == m.samples && g.data_sha256 != m.data_sha256 {
        diffs.push(format!(
            "--data {:?} holds other samples than the run was trained on (same name and \
             count, other values or labels)",
            g.data
        ));
    }
    if g.measures != &m.measures {
        diffs.push(format!(
            "the measurements (--spectrum-every, the curvature flags, --test-data) {:?}, the \
             run's are {:?}",
            g.measures, m.measures
        ));
    }
    if g.dtype != m.dtype {
        diffs.push(format!("--dtype {}, the run's is {}", g.dtype, m.dtype));
    }
    if g.augment != m.augment {
        diffs.push(format!(
            "--augment {:?}, the run's is {:?}",
            g.augment, m.augment
        ));
    }
    if g.htr != m.htr.as_ref() {
        diffs.push(format!(
            "Hessian-trace regulariser {:?}, the run's is {:?}",
            g.htr, m.htr
        ));
    }
    diffs
}

/// Progress and result lines on stdout that never stop the run: once
/// stdout is closed (`| head -1`) or fails (a full disk), nothing more is
/// written there, a notice goes to stderr once, and the training goes on
/// to write its files. [`Progress::finish`] is an error for a failed
/// stdout, not for a closed one (its reader chose to stop reading).
#[derive(Default)]
pub struct Progress {
    stopped: Cell<bool>,
    failed: RefCell<Option<anyhow::Error>>,
}

impl Progress {
    pub fn line(&self, text: impl AsRef<str>) {
        if self.stopped.get() {
            return;
        }
        if let Err(e) = output::line(text) {
            self.stopped.set(true);
            if e.downcast_ref::<BrokenPipe>().is_some() {
                notice(
                    "hesscope: stdout was closed; training goes on without printing and \
                     writes its files",
                );
            } else {
                notice(format!(
                    "hesscope: {e:#}; training goes on without printing and writes its files"
                ));
                *self.failed.borrow_mut() = Some(e);
            }
        }
    }

    pub fn finish(self) -> Result<()> {
        match self.failed.into_inner() {
            Some(e) => Err(e.context("the run finished and wrote its files, but stdout failed")),
            None => Ok(()),
        }
    }
}

//! Checkpoints: each `epoch-E` is a state_dict, the same state in float64
//! (unless the state_dict is float64 itself), the momentum buffers, and
//! last a small `.json` that records the SHA-256 of every one of those
//! files, this epoch's record and step losses, and the digest of the
//! checkpoint before it. The trajectory up to epoch E is the chain of
//! records from `epoch-1.json` to `epoch-E.json`, each link verified by
//! its digest, so a checkpoint's JSON stays the same size however long the
//! run (it held the whole trajectory before, a quadratic growth).
//!
//! [`latest_checkpoint`] verifies every file a checkpoint names (the
//! float32 state_dict too, which resuming does not otherwise read), that
//! the names are its own epoch's, and the chain of records back to the
//! first epoch; a checkpoint that fails any of it is passed over with the
//! reason, naming the file.

use super::{invalid, save_state_dict, Augment, Htr, Recipe, Trainer};
use crate::error::{Error, Result};
use crate::model::{params, Model, Weights};
use crate::report::{EpochRecord, StartRecord};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file a checkpoint belongs with: its name relative to the JSON's
/// folder, its size and its SHA-256 (lowercase hex).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The digest of `dir/file`.
pub fn digest(dir: &Path, file: &str) -> Result<FileDigest> {
    let path = dir.join(file);
    crate::model::tensorio::regular_file(&path)?;
    let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(FileDigest {
        file: file.to_string(),
        bytes,
        sha256,
    })
}

/// The SHA-256 (lowercase hex) of the bytes of `parts` in order.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What the run trains: the model's graph (its layers, options and
/// tensor layout, as `Debug` prints them) and the training samples as
/// loaded (x as float32 and y as u32, little-endian, in file order), each
/// as a SHA-256, so a resumed run on another architecture file or other
/// data under the same names is told apart.
pub fn run_identity(model: &Model, data: &crate::data::Dataset) -> (String, String) {
    let m = format!("{:?} {:?} {:?}", model.nodes, model.params, model.buffers);
    (sha256_hex(&[m.as_bytes()]), data_sha256(data))
}

/// The SHA-256 of a data set's samples (x as f32, y as u32, little-endian).
pub fn data_sha256(data: &crate::data::Dataset) -> String {
    let x: Vec<u8> = data.x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let y: Vec<u8> = data.y.iter().flat_map(|v| v.to_le_bytes()).collect();
    sha256_hex(&[&x, &y])
}

/// Whether `dir/d.file` still has the digest `d`; the reason when not.
fn verify(dir: &Path, d: &FileDigest) -> std::result::Result<(), String> {
    // The size first, from the metadata: a wrong one is not read.
    let len = crate::model::tensorio::regular_file(&dir.join(&d.file))
        .map_err(|e| e.to_string())?
        .len();
    let now = if len == d.bytes {
        digest(dir, &d.file).map_err(|e| e.to_string())?
    } else {
        FileDigest {
            bytes: len,
            ..d.clone()
        }
    };
    if now.bytes != d.bytes {
        return Err(format!(
            "{}: {} bytes, the checkpoint recorded {}",
            dir.join(&d.file).display(),
            now.bytes,
            d.bytes
        ));
    }
    if now.sha256 != d.sha256 {
        return Err(format!(
            "{}: its SHA-256 is not the one the checkpoint recorded (changed after it was written)",
            dir.join(&d.file).display()
        ));
    }
    Ok(())
}

/// Write a file atomically: to `NAME.tmp` beside it, fsync, rename over
/// `NAME`, fsync the folder; a kill leaves the old file or the new one,
/// never a torn one (a stray `.tmp` is ignored by [`latest_checkpoint`]).
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        // Best effort: some file systems refuse fsync on a folder.
        let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
    }
    Ok(())
}

/// What a run measures besides training (its records depend on it, so a
/// resumed run must measure the same way).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunMeasures {
    /// `--spectrum-every` and, with it, the curvature settings.
    pub spectrum_every: Option<usize>,
    pub curvature: Option<crate::snapshot::SnapshotSettings>,
    pub hessian_samples: usize,
    pub hessian_bn: String,
    pub hessian_backend: String,
    /// The test set: its path and the SHA-256 of its samples as loaded
    /// (as [`run_identity`] hashes the training data).
    pub test_data: Option<PathBuf>,
    pub test_sha256: Option<String>,
}

/// What a checkpoint's `.json` holds besides its tensor files: enough to
/// continue the run exactly (`hesscope train --resume`). It is written
/// last, so a checkpoint is complete iff its `.json` exists and every file
/// it records has the recorded digest.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    /// Epochs finished (the next epoch, 0-based, is this one).
    pub epoch: usize,
    /// SGD steps taken in all.
    pub steps: usize,
    /// The learning rate of the epoch just finished.
    pub lr: f64,
    pub recipe: Recipe,
    pub batch: usize,
    pub samples: usize,
    pub model: String,
    pub data: Option<PathBuf>,
    /// [`run_identity`]: the model's graph and the training samples.
    pub model_sha256: String,
    pub data_sha256: String,
    pub measures: RunMeasures,
    /// Float dtype of the state_dict (`F32`, `F64`).
    pub dtype: String,
    /// File names beside this one: the state_dict, the same state in
    /// float64 (the same file when dtype is F64), and the momentum
    /// buffers named like the parameters (float64; None before a step).
    pub state_dict: String,
    pub state_f64: String,
    pub optim: Option<String>,
    /// The digest of each of those files (filled in by [`save_checkpoint`]).
    pub files: Vec<FileDigest>,
    /// This epoch's record and step losses (None and empty in `final.json`,
    /// which follows the last epoch's checkpoint).
    pub record: Option<EpochRecord>,
    pub step_losses: Vec<f64>,
    /// The checkpoint before this one (`epoch-(E−1).json`, relative to
    /// this one's folder), whose chain holds the records before this epoch.
    pub previous: Option<FileDigest>,
    /// Data augmentation and the Hessian-trace regulariser of the run.
    #[serde(default)]
    pub augment: Augment,
    #[serde(default)]
    pub htr: Option<Htr>,
    /// The record before the first epoch (in `epoch-1.json` only).
    #[serde(default)]
    pub start: Option<StartRecord>,
}

/// Write a checkpoint `DIR/STEM.safetensors` (+ `.f64.safetensors` when the
/// state_dict is float32, `.optim.safetensors`, and last `.json`), each
/// file atomically. `meta`'s file names and digests are filled in here.
/// Returns the state_dict's path and the digest of the `.json` (the next
/// checkpoint's [`CheckpointMeta::previous`]).
pub fn save_checkpoint(
    tr: &Trainer,
    dir: &Path,
    stem: &str,
    f64_out: bool,
    mut meta: CheckpointMeta,
) -> Result<(PathBuf, FileDigest)> {
    let model = tr.model();
    let w = tr.weights();
    let sd = format!("{stem}.safetensors");
    let sd_path = dir.join(&sd);
    write_atomic(&sd_path, |p| {
        save_state_dict(model, w, &tr.batches_tracked, p, f64_out)
    })?;
    meta.files = vec![digest(dir, &sd)?];
    meta.state_dict = sd.clone();
    meta.state_f64 = if f64_out {
        sd
    } else {
        let f = format!("{stem}.f64.safetensors");
        write_atomic(&dir.join(&f), |p| {
            save_state_dict(model, w, &tr.batches_tracked, p, true)
        })?;
        meta.files.push(digest(dir, &f)?);
        f
    };
    meta.optim = match tr.momentum_buffer() {
        Some(m) => {
            let f = format!("{stem}.optim.safetensors");
            write_atomic(&dir.join(&f), |p| params::save_vector(model, p, m))?;
            meta.files.push(digest(dir, &f)?);
            Some(f)
        }
        None => None,
    };
    meta.dtype = if f64_out { "F64" } else { "F32" }.into();
    let name = format!("{stem}.json");
    let js = dir.join(&name);
    let text = serde_json::to_string_pretty(&meta)
        .map_err(|e| invalid("resume", format!("serialising {}: {e}", js.display())))?;
    write_atomic(&js, |p| {
        std::fs::write(p, text).map_err(|e| Error::io(p, e))
    })?;
    Ok((sd_path, digest(dir, &name)?))
}

/// A checkpoint loaded for resuming.
pub struct Resumed {
    pub meta: CheckpointMeta,
    pub weights: Weights,
    pub batches_tracked: Vec<i64>,
    pub momentum: Option<Vec<f64>>,
    /// The records of epochs 1..=E and all their step losses, from the
    /// verified chain of checkpoints, and the record before the first.
    pub epochs: Vec<EpochRecord>,
    pub step_losses: Vec<f64>,
    pub start: Option<StartRecord>,
    /// The digest of the checkpoint's `.json`.
    pub json: FileDigest,
    /// Later checkpoints passed over, with why (each names its file).
    pub skipped: Vec<String>,
}

/// The largest checkpoint JSON read (one epoch's record with a curvature
/// measurement at the largest grid is a few tens of MB).
const MAX_META_BYTES: u64 = 256 << 20;

fn read_meta(json: &Path) -> std::result::Result<CheckpointMeta, String> {
    // A FIFO or device in its place would block or never end: refused
    // from its metadata, as is a file too large to be a checkpoint's.
    let len = crate::model::tensorio::regular_file(json)
        .map_err(|e| e.to_string())?
        .len();
    if len > MAX_META_BYTES {
        return Err(format!(
            "{}: {len} bytes, more than a checkpoint's JSON holds ({MAX_META_BYTES})",
            json.display()
        ));
    }
    let text = std::fs::read_to_string(json).map_err(|e| Error::io(json, e).to_string())?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: not a checkpoint of this version of hesscope ({e})",
            json.display()
        )
    })
}

/// The file names of checkpoint `epoch-E` for its dtype: a JSON naming
/// other files (another epoch's) is refused.
fn check_names(dir: &Path, e: usize, m: &CheckpointMeta) -> std::result::Result<(), String> {
    let stem = format!("epoch-{e}");
    let sd = format!("{stem}.safetensors");
    let f64f = if m.dtype == "F64" {
        sd.clone()
    } else {
        format!("{stem}.f64.safetensors")
    };
    let mut want = vec![sd.clone()];
    if f64f != sd {
        want.push(f64f.clone());
    }
    let optim = m
        .optim
        .as_ref()
        .map(|_| format!("{stem}.optim.safetensors"));
    want.extend(optim.clone());
    let mut have: Vec<String> = m.files.iter().map(|d| d.file.clone()).collect();
    have.sort();
    want.sort();
    if m.state_dict != sd || m.state_f64 != f64f || m.optim != optim || have != want {
        return Err(format!(
            "{}: names files {:?}, not epoch {e}'s own {want:?}",
            dir.join(format!("{stem}.json")).display(),
            have
        ));
    }
    Ok(())
}

/// Checkpoint `epoch-E` verified and loaded (the reason, naming the file,
/// when it cannot be used). `accept` judges its settings first.
fn load_verified(
    model: &Model,
    dir: &Path,
    e: usize,
    accept: &mut dyn FnMut(&Path, &CheckpointMeta) -> Result<()>,
) -> Result<std::result::Result<Resumed, String>> {
    let name = format!("epoch-{e}.json");
    let json = dir.join(&name);
    let meta = match read_meta(&json) {
        Ok(m) => m,
        Err(why) => return Ok(Err(why)),
    };
    if meta.epoch != e {
        return Ok(Err(format!(
            "{}: says epoch {}, not {e}",
            json.display(),
            meta.epoch
        )));
    }
    accept(&json, &meta)?;
    let r = (|| {
        check_names(dir, e, &meta)?;
        for d in &meta.files {
            verify(dir, d)?;
        }
        // The chain of records back to epoch 1.
        let mut records = vec![];
        let mut losses = vec![];
        let mut start = None;
        let mut cur = meta.clone();
        let mut cur_path = json.clone();
        for k in (1..=e).rev() {
            match &cur.record {
                Some(r) if r.epoch == k && cur.epoch == k => records.push(r.clone()),
                _ => {
                    return Err(format!(
                        "{}: holds no record of epoch {k}",
                        cur_path.display()
                    ))
                }
            }
            let ls = std::mem::take(&mut cur.step_losses);
            let mean = ls.iter().sum::<f64>() / ls.len() as f64;
            if records.last().map(|r: &EpochRecord| r.train_loss.to_bits()) != Some(mean.to_bits())
            {
                return Err(format!(
                    "{}: its record's train loss is not the mean of its step losses",
                    cur_path.display()
                ));
            }
            losses.push(ls);
            if k == 1 {
                start = cur.start.take();
                break;
            }
            let prev_name = format!("epoch-{}.json", k - 1);
            match &cur.previous {
                Some(p) if p.file == prev_name => verify(dir, p)?,
                _ => {
                    return Err(format!(
                        "{}: does not link to {prev_name}",
                        cur_path.display()
                    ))
                }
            }
            cur_path = dir.join(&prev_name);
            cur = read_meta(&cur_path)?;
        }
        records.reverse();
        losses.reverse();
        let step_losses: Vec<f64> = losses.into_iter().flatten().collect();
        if records.last().map(|r| r.steps) != Some(meta.steps) || step_losses.len() != meta.steps {
            return Err(format!(
                "{}: {} steps, but its records hold {} step losses",
                json.display(),
                meta.steps,
                step_losses.len()
            ));
        }
        let f64p = dir.join(&meta.state_f64);
        let weights = Weights::load(model, &f64p).map_err(|e| e.to_string())?;
        let batches_tracked =
            super::initial_counts(model, Some(&f64p)).map_err(|e| e.to_string())?;
        let momentum = match &meta.optim {
            Some(f) => Some(params::load_vector(model, &dir.join(f)).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Resumed {
            json: digest(dir, &name).map_err(|e| e.to_string())?,
            meta: meta.clone(),
            weights,
            batches_tracked,
            momentum,
            epochs: records,
            step_losses,
            start,
            skipped: vec![],
        })
    })();
    Ok(r)
}

/// The latest usable checkpoint in `RUN/checkpoints`: `epoch-E.json` whose
/// files all have their recorded digests, named as epoch E's, whose chain
/// of records back to epoch 1 verifies, and whose tensors load for
/// `model`. Later ones that fail are passed over (listed in `skipped`,
/// each naming its file). `accept` judges each candidate's settings before
/// its files are read; its error ends the search (the folder holds a run
/// of other settings). An error when there is no usable checkpoint.
pub fn latest_checkpoint(
    model: &Model,
    run: &Path,
    accept: &mut dyn FnMut(&Path, &CheckpointMeta) -> Result<()>,
) -> Result<Resumed> {
    let dir = run.join("checkpoints");
    let found = checkpoint_epochs(&dir).map_err(|e| {
        invalid(
            "resume",
            format!("{}: no checkpoints folder ({e})", run.display()),
        )
    })?;
    let mut skipped = vec![];
    for e in found.into_iter().rev() {
        match load_verified(model, &dir, e, accept)? {
            Ok(mut r) => {
                r.skipped = skipped;
                return Ok(r);
            }
            Err(why) => skipped.push(format!("epoch-{e}: {why}")),
        }
    }
    let mut msg = format!("{}: no complete checkpoint to resume from", dir.display());
    if !skipped.is_empty() {
        msg += &format!(" ({})", skipped.join("; "));
    }
    Err(invalid("resume", msg))
}

/// The epochs E of the `epoch-E.json` files in `dir`, ascending.
pub fn checkpoint_epochs(dir: &Path) -> std::io::Result<Vec<usize>> {
    let mut found: Vec<usize> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_prefix("epoch-")?
                .strip_suffix(".json")?
                .parse::<usize>()
                .ok()
        })
        .collect();
    found.sort_unstable();
    Ok(found)
}

//! Several engines over one data set (issue 28): whole batches dealt to
//! workers, each worker's products weighted by its share of the samples
//! and summed in float64.
//!
//! The loss is L = (1/N)·Σ_b Σ_{i∈b} ℓ_i over batches b. A worker w that
//! holds the batches of n_w samples computes L_w = (1/n_w)·Σ over its
//! batches, so L = Σ_w (n_w/N)·L_w, and likewise ∇L and H·v. The batches
//! are those a single engine forms (`Dataset::batches`): each worker gets
//! a contiguous run of them ([`shares`]), whose samples are contiguous, so
//! its own batching of its samples gives exactly those batches (only the
//! last batch of the data set can be short, and it stays last).
//!
//! [`local::MultiEngine`] runs one engine per adapter of this process,
//! each on its own thread; `mpi::MpiEngine` (feature `mpi`) one engine per
//! MPI rank.

use crate::data::Dataset;
use crate::decisions::DecisionReport;
use crate::engine::Problem;
use crate::error::{Error, Result};
use crate::gpu::{AdapterReport, BackendChoice};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod train;
pub mod train_gpu;

pub use local::MultiEngine;

/// One entry of `--devices`: the float64 CPU engine or one adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Adapter(BackendChoice, usize),
}

impl DeviceSpec {
    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }
}

fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Auto => "auto",
        BackendChoice::Vulkan => "vulkan",
        BackendChoice::Metal => "metal",
        BackendChoice::Dx12 => "dx12",
        BackendChoice::Gl => "gl",
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Adapter(b, i) => write!(f, "{}:{i}", backend_name(*b)),
        }
    }
}

fn bad(entry: &str, msg: String) -> Error {
    Error::Argument {
        flag: format!("--devices {entry}"),
        msg,
    }
}

/// Parses `--devices`: comma-separated `BACKEND:INDEX` (`vulkan:0`,
/// `gl:0`, `metal:1`, `dx12:0`; `vulkan` alone is `vulkan:0`) or `cpu`
/// (the float64 engine), or `all`: every GPU adapter of the first backend
/// (in auto's order: Vulkan, Metal, DX12, GL) that has one, so that a GPU
/// that two backends both offer runs once. Each adapter must be among
/// `adapters` ([`crate::gpu::list_adapters`]). The float64 engine does not
/// mix with float32 adapters: their sum would carry float32 rounding in a
/// result reported as float64, so such a list is refused.
pub fn parse_devices(list: &str, adapters: &[AdapterReport]) -> Result<Vec<DeviceSpec>> {
    let list = list.trim();
    if list == "all" {
        for b in ["vulkan", "metal", "dx12", "gl"] {
            let gpus: Vec<DeviceSpec> = adapters
                .iter()
                .filter(|a| a.backend == b && crate::dispatch::is_gpu_type(&a.device_type))
                .map(|a| DeviceSpec::Adapter(backend_of(b).unwrap(), a.index))
                .collect();
            if !gpus.is_empty() {
                return Ok(gpus);
            }
        }
        return Err(bad(
            "all",
            "no GPU adapter here (CPU emulators such as lavapipe and llvmpipe are not \
             counted); name adapters, e.g. vulkan:0,gl:0, or cpu"
                .into(),
        ));
    }
    let mut out = vec![];
    for entry in list.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(bad(list, "an empty entry in the list".into()));
        }
        if entry == "cpu" {
            out.push(DeviceSpec::Cpu);
            continue;
        }
        if entry == "all" {
            return Err(bad(entry, "`all` stands alone, not in a list".into()));
        }
        let (name, index) = match entry.split_once(':') {
            Some((n, i)) => (n, i),
            None => (entry, "0"),
        };
        let backend = backend_of(name).ok_or_else(|| {
            bad(
                entry,
                format!(
                    "unknown backend `{}`; one of vulkan, metal, dx12, gl (as \
                     BACKEND:INDEX), cpu, or all",
                    crate::error::escape(name)
                ),
            )
        })?;
        let index: usize = index.parse().map_err(|_| {
            bad(
                entry,
                format!("`{}` is not an adapter index", crate::error::escape(index)),
            )
        })?;
        let of_backend: Vec<&AdapterReport> =
            adapters.iter().filter(|a| a.backend == name).collect();
        if !of_backend.iter().any(|a| a.index == index) {
            let have: Vec<String> = of_backend
                .iter()
                .map(|a| format!("{} {}", a.index, a.name))
                .collect();
            return Err(bad(
                entry,
                format!(
                    "no such adapter ({name} has {}{}); see `hesscope devices`",
                    of_backend.len(),
                    if have.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", have.join(", "))
                    }
                ),
            ));
        }
        out.push(DeviceSpec::Adapter(backend, index));
    }
    check_mix(&out, list)?;
    Ok(out)
}

/// Refuses the float64 engine beside float32 adapters.
pub fn check_mix(devices: &[DeviceSpec], list: &str) -> Result<()> {
    let cpus = devices.iter().filter(|d| d.is_cpu()).count();
    if cpus > 0 && cpus < devices.len() {
        return Err(bad(
            list,
            "the float64 CPU engine (cpu) and float32 adapters do not mix: their sum would \
             carry float32 rounding in a result reported as float64; name only adapters, or \
             only cpu"
                .into(),
        ));
    }
    Ok(())
}

fn backend_of(name: &str) -> Option<BackendChoice> {
    Some(match name {
        "vulkan" => BackendChoice::Vulkan,
        "metal" => BackendChoice::Metal,
        "dx12" => BackendChoice::Dx12,
        "gl" => BackendChoice::Gl,
        _ => return None,
    })
}

/// Which batches each of `workers` workers takes: contiguous runs, batch b
/// (first sample s, c samples) to worker ⌊(s + c/2)·W/N⌋ — the worker
/// whose equal share of the samples holds the batch's middle — so shares
/// follow sample counts and are the same on every run and every rank. A
/// worker may get none (fewer batches than workers).
pub fn shares(batches: &[(usize, usize)], workers: usize) -> Vec<Range<usize>> {
    let workers = workers.max(1);
    let n: usize = batches.iter().map(|b| b.1).sum();
    let owner = |&(s, c): &(usize, usize)| -> usize {
        if n == 0 {
            return 0;
        }
        let mid2 = 2 * s + c; // twice the middle
        ((mid2 as u128 * workers as u128) / (2 * n as u128)).min(workers as u128 - 1) as usize
    };
    let mut out = vec![0..0; workers];
    let mut start = 0;
    for (w, slot) in out.iter_mut().enumerate() {
        let mut end = start;
        while end < batches.len() && owner(&batches[end]) == w {
            end += 1;
        }
        *slot = start..end;
        start = end;
    }
    out
}

/// The problem of a run of batches: the same model, weights, batch size
/// and BN mode over those batches' samples, and their share n_w/N of the
/// data set (the weight of its products in the sum).
pub fn sub_problem(problem: &Problem, batches: Range<usize>) -> Option<(Problem, f64)> {
    let all = problem.data.batches(problem.batch);
    if batches.is_empty() {
        return None;
    }
    let first = all[batches.start].0;
    let last = all[batches.end - 1];
    let end = last.0 + last.1;
    let data = slice_data(&problem.data, first..end);
    let weight = data.len() as f64 / problem.data.len() as f64;
    Some((
        Problem {
            model: problem.model.clone(),
            weights: problem.weights.clone(),
            data,
            batch: problem.batch,
            bn: problem.bn,
        },
        weight,
    ))
}

fn slice_data(d: &Dataset, samples: Range<usize>) -> Dataset {
    let per = d.shape.numel();
    Dataset {
        x: d.x[samples.start * per..samples.end * per].to_vec(),
        y: d.y[samples.clone()].to_vec(),
        shape: d.shape,
        source: format!("{} (samples {}..{})", d.source, samples.start, samples.end),
    }
}

/// Σ_w weight_w·part_w into `out`, in worker order.
pub(crate) fn weighted_sum<'a>(parts: impl IntoIterator<Item = (f64, &'a [f64])>, out: &mut [f64]) {
    out.fill(0.0);
    for (w, p) in parts {
        out.iter_mut().zip(p).for_each(|(o, x)| *o += w * x);
    }
}

/// The decision reports of the workers as one: counts summed per layer
/// (every worker runs the same model, so the same layers in the same
/// order), seconds the longest (the workers run side by side).
pub fn merge_reports(reports: Vec<Option<DecisionReport>>) -> Result<Option<DecisionReport>> {
    let mut out: Option<DecisionReport> = None;
    for r in reports.into_iter().flatten() {
        let Some(m) = out.as_mut() else {
            out = Some(r);
            continue;
        };
        let same = m.source == r.source
            && m.layers.len() == r.layers.len()
            && m.layers
                .iter()
                .zip(&r.layers)
                .all(|(a, b)| a.layer == b.layer);
        if !same {
            return Err(Error::Numerical(
                "the workers' decision reports name different layers".into(),
            ));
        }
        for (a, b) in m.layers.iter_mut().zip(&r.layers) {
            a.decisions += b.decisions;
            a.near += b.near;
            a.flipped = match (a.flipped, b.flipped) {
                (Some(x), Some(y)) => Some(x + y),
                (x, y) => x.or(y),
            };
        }
        m.decisions += r.decisions;
        m.near += r.near;
        m.flipped = match (m.flipped, r.flipped) {
            (Some(x), Some(y)) => Some(x + y),
            (x, y) => x.or(y),
        };
        m.seconds = m.seconds.max(r.seconds);
    }
    Ok(out)
}

/// This process's MPI rank and the number of ranks ((0, 1) outside MPI).
static WORLD: OnceLock<(usize, usize)> = OnceLock::new();
/// Set where an error was agreed among every rank (each returns it), so
/// that the process ends normally instead of aborting the job.
static AGREED: AtomicBool = AtomicBool::new(false);

/// (rank, size) of this process among MPI ranks; (0, 1) outside MPI.
pub fn world() -> (usize, usize) {
    *WORLD.get().unwrap_or(&(0, 1))
}

/// Whether this process writes files, progress and stdout: rank 0.
pub fn is_root() -> bool {
    world().0 == 0
}

/// Whether the last error was agreed by every rank (see [`world`]).
pub fn error_agreed() -> bool {
    AGREED.load(Ordering::SeqCst)
}

#[allow(dead_code)]
pub(crate) fn set_world(rank: usize, size: usize) {
    let _ = WORLD.set((rank, size));
}

/// Marks the error about to be returned as raised alike on every rank
/// (the same arguments, the same check), so that the ranks end normally.
pub fn mark_agreed() {
    AGREED.store(true, Ordering::SeqCst);
}

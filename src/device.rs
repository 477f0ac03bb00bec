//! Where `auto` runs: the one decision between a GPU adapter, the float64
//! CPU engine ([`crate::cpu::CpuReference`]) and a CPU emulator (Mesa's
//! lavapipe and llvmpipe, wgpu adapters of device type `Cpu`).
//!
//! The order is a real GPU (discrete, then integrated, then virtual; Vulkan
//! before Metal, DX12 and GL), then the float64 engine, then an emulator:
//! on one CPU the float64 engine computes in float64 what an emulator
//! approximates in float32 (times side by side in BENCHMARKS.md), so an emulator
//! runs only where it is named (`vulkan`, `gl`) or where a GPU adapter is
//! needed ([`Need::Adapter`]: `selftest`, which checks an adapter).

use crate::dispatch::is_gpu_type;
use crate::error::{Error, Result};
use crate::gpu::{AdapterReport, BackendChoice};
use serde::Serialize;

/// What the caller can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Any engine: a GPU, else the float64 CPU engine.
    Engine,
    /// A GPU adapter: a GPU, else an emulator.
    Adapter,
}

/// The kind of engine picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A GPU adapter (discrete, integrated or virtual).
    Gpu,
    /// The float64 CPU engine.
    Cpu,
    /// A CPU emulator adapter (device type `Cpu`, or one wgpu cannot tell).
    Emulator,
}

/// What `auto` picks, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AutoChoice {
    pub kind: Kind,
    /// The adapter's backend and index within it (as `--backend` and
    /// `--adapter` count them); None for the CPU engine.
    pub backend: Option<BackendChoice>,
    pub adapter: Option<usize>,
    /// The adapter's name, or `float64 CPU engine`.
    pub name: String,
    /// Why, in a sentence.
    pub reason: String,
}

impl AutoChoice {
    /// The adapter to open (backend, index); None: the CPU engine.
    pub fn gpu(&self) -> Option<(BackendChoice, usize)> {
        Some((self.backend?, self.adapter?))
    }
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

/// The rank of an adapter among GPUs (lower first), or None for an
/// emulator.
fn gpu_rank(a: &AdapterReport) -> Option<(u8, u8)> {
    if !is_gpu_type(&a.device_type) {
        return None;
    }
    let ty = match a.device_type.as_str() {
        "DiscreteGpu" => 0,
        "IntegratedGpu" => 1,
        _ => 2,
    };
    Some((ty, backend_rank(&a.backend)))
}

fn backend_rank(b: &str) -> u8 {
    match b {
        "vulkan" => 0,
        "metal" => 1,
        "dx12" => 2,
        "gl" => 3,
        _ => 4,
    }
}

fn pick(kind: Kind, a: &AdapterReport, reason: String) -> AutoChoice {
    AutoChoice {
        kind,
        backend: backend_of(&a.backend),
        adapter: Some(a.index),
        name: a.name.clone(),
        reason,
    }
}

/// What `auto` runs on, among `adapters` (every backend's, as
/// [`crate::gpu::list_adapters`] gives them): the `nth` GPU in the order
/// above (0: the first); without a GPU, the float64 CPU engine, or for
/// [`Need::Adapter`] the `nth` emulator. Refused when `nth` is past the
/// GPUs there are (or, with no GPU, when `nth` > 0).
pub fn choose(adapters: &[AdapterReport], need: Need, nth: usize) -> Result<AutoChoice> {
    let mut gpus: Vec<&AdapterReport> = adapters
        .iter()
        .filter(|a| gpu_rank(a).is_some() && backend_of(&a.backend).is_some())
        .collect();
    gpus.sort_by_key(|a| gpu_rank(a));
    let mut emulators: Vec<&AdapterReport> = adapters
        .iter()
        .filter(|a| gpu_rank(a).is_none() && backend_of(&a.backend).is_some())
        .collect();
    emulators.sort_by_key(|a| (a.device_type != "Cpu", backend_rank(&a.backend)));
    let out_of_range = |what: &str, n: usize| Error::Invalid {
        what: "adapter index",
        msg: format!(
            "{nth} is out of range for auto: {n} {what} adapter(s) here; see `hesscope devices`"
        ),
    };
    if !gpus.is_empty() {
        let a = gpus
            .get(nth)
            .ok_or_else(|| out_of_range("GPU", gpus.len()))?;
        return Ok(pick(
            Kind::Gpu,
            a,
            format!("{} is a GPU ({}): the first choice", a.name, a.device_type),
        ));
    }
    let emus = if emulators.is_empty() {
        "no adapter at all".to_string()
    } else {
        let names: Vec<String> = emulators
            .iter()
            .map(|a| format!("{} ({})", a.name, a.backend))
            .collect();
        format!("only CPU emulators ({})", names.join(", "))
    };
    match need {
        Need::Engine => {
            if nth > 0 {
                return Err(out_of_range("GPU", 0));
            }
            Ok(AutoChoice {
                kind: Kind::Cpu,
                backend: None,
                adapter: None,
                name: "float64 CPU engine".to_string(),
                reason: format!(
                    "no GPU adapter, {emus}: the float64 CPU engine on all cores, which \
                     computes in float64 what an emulator approximates in float32 (name \
                     `vulkan` or `gl` to run an emulator)"
                ),
            })
        }
        Need::Adapter => {
            let a = emulators
                .get(nth)
                .ok_or_else(|| out_of_range("GPU or emulator", emulators.len()))?;
            Ok(pick(
                Kind::Emulator,
                a,
                format!("no GPU adapter, {emus}: a GPU adapter is needed, so the first emulator"),
            ))
        }
    }
}

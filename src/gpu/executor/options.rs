//! How an engine is built (`EngineOptions`), which kernels `Auto` picks
//! per adapter, and the memory budgets derived from the adapter.

use crate::decisions::DecisionSource;
use crate::error::{Error, Result};
use crate::gpu::basis::BasisPlace;
use crate::gpu::context::GpuContext;
use crate::gpu::kernels::{self, ConvTile};
use crate::gpu::memory;
use crate::gpu::reduce::{self, ReducePath};
use crate::model::Model;

/// Bytes of per-batch state kept resident for reuse by every HVP where the
/// adapter's memory is unknown (`cache_budget`).
pub const CACHE_BUDGET_BYTES: usize = 2 << 30;

/// Bytes the tangent buffers of a block product may take at least when the
/// block size is chosen for the user (`block_budget`).
pub const BLOCK_BUDGET_BYTES: usize = 1 << 30;

/// The largest block size chosen for the user: past it the per-vector cost
/// of a block product stops falling (BENCHMARKS.md, "Block products").
pub const DEFAULT_MAX_BLOCK: usize = 16;

/// The most tangents one block product serves (a dispatch's z extent is
/// at least 65,535 everywhere; this bounds the memory a flag can ask for).
pub const MAX_BLOCK: usize = 64;

/// How an engine is built.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Bytes of per-batch state resident for reuse by every HVP while it
    /// fits; None: a quarter of the adapter's memory (`cache_budget`).
    pub cache_budget: Option<usize>,
    /// Tangents per sweep of a block product; None: the most that fit in
    /// `block_budget`, up to `DEFAULT_MAX_BLOCK`.
    pub block: Option<usize>,
    /// Which convolution kernels the engine runs.
    pub conv_path: ConvPath,
    /// How it runs its per-channel reductions (batch-norm statistics and
    /// parameter sums, conv bias sums).
    pub reduce_path: ReducePath,
    /// The tiled kernels' widest tile (narrowed per layer by
    /// `ConvTile::for_rows`); None: `ConvTile::DEFAULT`. Which adapters
    /// run tiled kernels at all: `conv_path`, and their limits.
    pub conv_tile: Option<ConvTile>,
    /// Plan for held piecewise decisions (`GpuEngine::hold_decisions`):
    /// every pass replays the ReLU/LeakyReLU pieces and max-pool argmax
    /// recorded at one θ. Needs every batch resident (the cache budget).
    pub frozen: bool,
    /// Where the piecewise decisions (ReLU/LeakyReLU sides, max-pool
    /// choices) come from: by default the float64 reference's forward
    /// pass at the engine's θ, replayed by every float32 pass
    /// (`crate::decisions`); `Float32`: each pass's own.
    pub decisions: DecisionSource,
    /// With float64 decisions in batch mode, where batch norm's batch
    /// statistics and normalised values x̂ come from: by default the same
    /// float64 forward pass, each rounded once to float32 (uploaded once
    /// per θ and batch; `layers::batchnorm::float64_state`); `Float32`:
    /// the float32 pass's own, as before (for comparison). Ignored with
    /// float32 or held (`frozen`) decisions.
    pub bn_state: DecisionSource,
    /// Where the solvers keep their Lanczos bases (`basis_device`).
    pub basis_place: BasisPlace,
    /// Bytes of device memory those bases may take; None: a quarter of
    /// the adapter's (`device_basis_budget`).
    pub basis_budget: Option<usize>,
}

/// The convolution kernels an engine runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvPath {
    /// Tiled on GPUs (discrete, integrated, virtual), the emulator kernels
    /// on CPU adapters (lavapipe, llvmpipe) and unknown ones.
    #[default]
    Auto,
    /// Workgroup-memory tiled implicit GEMM (shaders/conv_tiled.wgsl).
    Tiled,
    /// The register-blocked kernels shaped for CPU emulators
    /// (shaders/conv.wgsl, conv_weight.wgsl).
    Emulator,
}

pub use crate::dispatch::is_gpu_type;

impl ConvPath {
    /// Bytes of workgroup memory conv_tiled.wgsl's workgroups take (two
    /// slabs of `CONV_TILE_CAP` floats).
    pub const TILED_WORKGROUP_MEMORY: u32 = 2 * 4 * kernels::CONV_TILE_CAP;

    /// Whether an adapter with these limits (workgroup memory, invocations
    /// per workgroup, workgroup size x) runs the tiled kernels' 256-thread
    /// workgroups.
    pub fn tiled_fits(workgroup_memory: u32, invocations: u32, size_x: u32) -> bool {
        workgroup_memory >= Self::TILED_WORKGROUP_MEMORY && invocations >= 256 && size_x >= 256
    }

    /// Whether an adapter of `device_type` (wgpu's `DeviceType`, as
    /// `AdapterReport::device_type` names it) runs the tiled kernels.
    pub fn tiled_on(self, device_type: &str) -> bool {
        match self {
            ConvPath::Tiled => true,
            ConvPath::Emulator => false,
            ConvPath::Auto => is_gpu_type(device_type),
        }
    }

    /// Whether the engine runs the tiled kernels on `ctx`: where this
    /// path picks them for its device type and the adapter runs
    /// conv_tiled.wgsl's workgroups (256 threads, two slabs of
    /// `CONV_TILE_CAP` floats in workgroup memory). Where it cannot,
    /// `Auto` keeps the emulator kernels and `Tiled` is refused.
    pub fn tiled_for(self, ctx: &GpuContext) -> Result<bool> {
        if !self.tiled_on(&ctx.info.device_type) {
            return Ok(false);
        }
        let need_mem = ConvPath::TILED_WORKGROUP_MEMORY;
        let l = &ctx.limits;
        let fits = ConvPath::tiled_fits(
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroup_size_x,
        );
        if !fits && self == ConvPath::Tiled {
            return Err(Error::Invalid {
                what: "conv path",
                msg: format!(
                    "{} cannot run the tiled conv kernels: they need 256 threads per workgroup \
                     and {need_mem} bytes of workgroup memory (it has {} and {})",
                    ctx.info.name,
                    l.max_compute_invocations_per_workgroup,
                    l.max_compute_workgroup_storage_size
                ),
            });
        }
        Ok(fits)
    }
}

/// What an engine's `Auto` options come to on an adapter, before any
/// model is known (`hesscope devices`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AutoChoices {
    /// `tiled` (shaders/conv_tiled.wgsl) or `emulator` (conv.wgsl,
    /// conv_weight.wgsl): `ConvPath::Auto`.
    pub conv: &'static str,
    /// `ReducePath::Auto`, in `reduce::describe`'s words.
    pub reductions: String,
    /// `BasisPlace::Auto`: `device` (where the bases fit its budget, else
    /// the host) or `host`.
    pub lanczos_bases: &'static str,
}

impl AutoChoices {
    /// For an adapter of `device_type` with these limits (as
    /// `ConvPath::tiled_fits` takes them).
    pub fn on(device_type: &str, workgroup_memory: u32, invocations: u32, size_x: u32) -> Self {
        let tiled = ConvPath::Auto.tiled_on(device_type)
            && ConvPath::tiled_fits(workgroup_memory, invocations, size_x);
        let span = ReducePath::Auto
            .span_on(device_type)
            .expect("Auto names no invalid span");
        AutoChoices {
            conv: if tiled { "tiled" } else { "emulator" },
            reductions: reduce::describe(span),
            lanczos_bases: if device_type == "Cpu" {
                "host"
            } else {
                "device"
            },
        }
    }
}

impl EngineOptions {
    /// Whether batch norm takes its statistics and x̂ from the float64
    /// forward pass (`bn_state`): batch mode, float64 decisions, not held.
    pub fn bn_float64(&self, batch_mode: bool) -> bool {
        batch_mode
            && !self.frozen
            && self.decisions == DecisionSource::Float64
            && self.bn_state == DecisionSource::Float64
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_budget: None,
            block: None,
            conv_path: ConvPath::Auto,
            reduce_path: ReducePath::Auto,
            conv_tile: None,
            frozen: false,
            decisions: DecisionSource::Float64,
            bn_state: DecisionSource::Float64,
            basis_place: BasisPlace::Auto,
            basis_budget: None,
        }
    }
}

/// The block size chosen for the user. On a CPU emulator (lavapipe,
/// llvmpipe) 1: its two to few dozen threads are already busy with one
/// tangent's work, so K tangents per dispatch cost K times one (measured,
/// BENCHMARKS.md "Block products"). On a GPU, as many tangents as fit in
/// `block_budget` of tangent buffers, up to `DEFAULT_MAX_BLOCK`: small
/// layers leave most of a GPU idle, and K tangents fill it.
pub(super) fn default_block(ctx: &GpuContext, model: &Model, canon: &[usize], n: usize) -> usize {
    if ctx.is_cpu_adapter() {
        return 1;
    }
    let per = memory::tangent_bytes(model, canon, n, 1).max(1);
    (block_budget(ctx.info.device_memory) / per).clamp(1, DEFAULT_MAX_BLOCK)
}

/// Bytes of tangent buffers a chosen block may take: a sixteenth of the
/// device's memory where the backend reports it, at least
/// `BLOCK_BUDGET_BYTES`.
pub fn block_budget(device_memory: Option<u64>) -> usize {
    device_memory
        .map_or(0, |b| share(b, 16))
        .max(BLOCK_BUDGET_BYTES)
}

/// The device's Lanczos basis budget (`--basis-on`): a quarter of its
/// device-local memory where the backend reports it, else
/// `FALLBACK_DEVICE_BASIS_BYTES`. `--basis-budget` overrides it.
pub fn device_basis_budget(device_memory: Option<u64>) -> usize {
    device_memory.map_or(FALLBACK_DEVICE_BASIS_BYTES, |b| share(b, 4))
}

/// The basis budget of a device whose memory is unknown.
pub const FALLBACK_DEVICE_BASIS_BYTES: usize = 1 << 30;

/// bytes / parts, saturated to usize.
fn share(bytes: u64, parts: u64) -> usize {
    usize::try_from(bytes / parts).unwrap_or(usize::MAX)
}

pub(super) fn default_cache_budget(ctx: &GpuContext) -> usize {
    cache_budget(
        ctx.is_cpu_adapter(),
        ctx.info.device_memory,
        crate::host::available_memory(),
    )
}

/// The default cache budget: on a GPU a quarter of its device-local memory
/// (Vulkan reports it); on a CPU emulator, whose "device memory" is the
/// host's, a quarter of the host's available memory but at most
/// `CACHE_BUDGET_BYTES` (lavapipe reports a 2 GiB heap whatever the
/// host); `CACHE_BUDGET_BYTES` where the memory is unknown.
/// `--cache-budget` overrides it either way.
pub fn cache_budget(
    cpu_adapter: bool,
    device_memory: Option<u64>,
    host_available: Option<usize>,
) -> usize {
    match (cpu_adapter, device_memory, host_available) {
        (true, _, Some(host)) => share(host as u64, 4).min(CACHE_BUDGET_BYTES),
        (false, Some(device), _) => share(device, 4),
        _ => CACHE_BUDGET_BYTES,
    }
}

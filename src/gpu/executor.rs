//! The GPU executor: one engine per problem. It plans every batch once
//! (`plan`), allocates its buffers (`memory`), and at run time uploads
//! batches, submits the programs and reads results back. Activations,
//! adjoints and batch statistics do not depend on v, so while they fit in
//! the cache budget every batch keeps its own workspace and an HVP runs
//! only the R program.

use crate::data::Dataset;
use crate::engine::{check_out_len, BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::gpu::basis::{BasisPlace, GpuBasisDevice};
use crate::gpu::context::GpuContext;
use crate::gpu::kernels::{self, ConvTile, Kernel};
use crate::gpu::memory::{self, Arena, Workspace};
use crate::gpu::plan::{self, Plan};
use crate::gpu::program::{Compiled, Step};
use crate::gpu::reduce::{self, ReducePath};
use crate::layers::{self, StateCx};
use crate::model::{Activation, Model, Op};
use crate::spectral::lanczos::BasisDevice;
use std::rc::Rc;

/// Wall seconds per dispatched kernel, in program order.
pub type KernelTimes = Vec<(Kernel, f64)>;

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

/// Whether `Auto` choices treat an adapter of `device_type` (wgpu's
/// `DeviceType`, as `AdapterReport::device_type` names it) as a GPU:
/// discrete, integrated or virtual; not CPU emulators or unknown ones.
pub fn is_gpu_type(device_type: &str) -> bool {
    matches!(device_type, "DiscreteGpu" | "IntegratedGpu" | "VirtualGpu")
}

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

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_budget: None,
            block: None,
            conv_path: ConvPath::Auto,
            reduce_path: ReducePath::Auto,
            conv_tile: None,
            frozen: false,
            basis_place: BasisPlace::Auto,
            basis_budget: None,
        }
    }
}

struct BatchProgram {
    ws: usize,
    start: usize,
    count: usize,
    forward_backward: Compiled,
    r_pass: Compiled,
    /// A frozen engine's recording forward pass.
    record: Option<Compiled>,
    /// The forward pass and the loss (`evaluate`), compiled on first use
    /// (most engines never evaluate).
    forward_loss: Vec<Step>,
    forward_loss_compiled: Option<Compiled>,
}

pub struct GpuEngine {
    ctx: GpuContext,
    model: Model,
    data: Dataset,
    bn: BnMode,
    arena: Arena,
    v: usize,
    grad: usize,
    hv: usize,
    losses: usize,
    workspaces: Vec<Workspace>,
    programs: Vec<BatchProgram>,
    /// Canonical buffer value of every value (flatten aliases its input).
    canon: Vec<usize>,
    /// Tangents one R-pass dispatch serves (block products).
    kmax: usize,
    theta: usize,
    /// θ as last uploaded.
    theta_host: Vec<f64>,
    /// Planned for held decisions (`EngineOptions::frozen`).
    frozen: bool,
    basis_place: BasisPlace,
    basis_budget: Option<usize>,
    /// Which conv kernels and reductions its programs run, in words.
    kernel_paths: String,
    /// The device handle Lanczos bases use (one pipeline cache for all),
    /// made on first use.
    basis_ctx: std::cell::OnceCell<Rc<GpuContext>>,
}

impl GpuEngine {
    pub fn new(ctx: GpuContext, problem: &Problem) -> Result<GpuEngine> {
        Self::with_options(ctx, problem, EngineOptions::default())
    }

    /// As `new`, keeping every batch's activations resident only while
    /// they take at most `budget` bytes; otherwise one workspace is shared
    /// and each HVP recomputes the forward and backward passes.
    pub fn with_cache_budget(
        ctx: GpuContext,
        problem: &Problem,
        budget: usize,
    ) -> Result<GpuEngine> {
        let options = EngineOptions {
            cache_budget: Some(budget),
            ..Default::default()
        };
        Self::with_options(ctx, problem, options)
    }

    pub fn with_options(
        ctx: GpuContext,
        problem: &Problem,
        options: EngineOptions,
    ) -> Result<GpuEngine> {
        layers::check_model(&problem.model)?;
        let budget = options
            .cache_budget
            .unwrap_or_else(|| default_cache_budget(&ctx));
        let model = problem.model.clone();
        let data = problem.data.clone();
        let batches = data.batches(problem.batch);
        let max_count = batches.iter().map(|b| b.1).max().unwrap_or(0);
        let canon = memory::canonical_values(&model);
        let kmax = match options.block {
            Some(k) if (1..=MAX_BLOCK).contains(&k) => k,
            Some(k) => {
                return Err(Error::Invalid {
                    what: "block size",
                    msg: format!("{k} tangents per sweep: must be 1 to {MAX_BLOCK}"),
                })
            }
            None => default_block(&ctx, &model, &canon, max_count),
        };
        let mut arena = Arena::default();
        let np = model.n_params;
        let theta = arena.weights(&ctx, "parameters θ", np)?;
        // A block product reads v from storage (one slice per tangent).
        let v = if kmax > 1 {
            arena.alloc_tangent(&ctx, "directions v".into(), np, kmax)?
        } else {
            arena.weights(&ctx, "direction v", np)?
        };
        let grad = arena.alloc(&ctx, "gradient".into(), np)?;
        let hv = arena.alloc_tangent(&ctx, "Hv".into(), np, kmax)?;
        let losses = arena.alloc(&ctx, "batch losses".into(), batches.len())?;
        let dummy = arena.alloc(&ctx, "unused binding".into(), 4)?;
        let scratch = model
            .nodes
            .iter()
            .map(|nd| layers::unit(&nd.op).gpu_scratch(nd, max_count))
            .max()
            .unwrap_or(0)
            .max(1);
        let partials =
            arena.alloc_tangent(&ctx, "weight-gradient partial sums".into(), scratch, kmax)?;
        let reduce_span = options.reduce_path.span_on(&ctx.info.device_type)?;
        let reduce_partials = arena.alloc_tangent(
            &ctx,
            "reduction partial sums".into(),
            reduce_span.map_or(1, |s| reduce::partial_floats(&model, max_count, s)),
            kmax,
        )?;
        let theta_f32: Vec<f32> = problem.weights.theta.iter().map(|&x| x as f32).collect();
        // Refused here, not left to propagate: a kernel's result from an
        // infinite weight is the driver's business (llvmpipe's uniform
        // reads, for one, do not carry it through).
        non_finite_error(&model, "the weights", &theta_f32, &ctx.info.name)?;
        ctx.write_f32(&arena.buffers[theta], 0, &theta_f32)?;

        let batch_mode = problem.bn == BnMode::Batch;
        let scx = StateCx {
            model: &model,
            buffers: &problem.weights.buffers,
            batch_mode,
            frozen: options.frozen,
        };
        let ws_bytes = memory::workspace_bytes(&model, &canon, max_count, &scx, kmax);
        let n_ws = if ws_bytes.saturating_mul(batches.len()) <= budget {
            batches.len()
        } else {
            1
        };
        if options.frozen && n_ws < batches.len() {
            return Err(Error::Invalid {
                what: "held decisions",
                msg: format!(
                    "replaying recorded decisions needs every batch resident: {} batches of {} bytes \
                     each exceed the cache budget of {budget} bytes",
                    batches.len(),
                    ws_bytes
                ),
            });
        }
        let tangents = memory::tangent_buffers(&ctx, &mut arena, &model, &canon, max_count, kmax)?;
        let mut workspaces = vec![];
        for w in 0..n_ws {
            let tag = if n_ws > 1 {
                format!(" (batch {w})")
            } else {
                String::new()
            };
            workspaces.push(memory::workspace(
                &ctx, &mut arena, &model, &canon, max_count, &scx, &tag, &tangents, kmax,
            )?);
        }

        let scale = 1.0 / data.len() as f32;
        let window_alignment = ctx.windows_supported().then(|| ctx.window_alignment());
        let conv_tile = match options.conv_tile {
            Some(t) => {
                t.check().map_err(|msg| Error::Invalid {
                    what: "conv tile",
                    msg,
                })?;
                t
            }
            None => ConvTile::DEFAULT,
        };
        let conv_tiled = options.conv_path.tiled_for(&ctx)?;
        let mut programs = vec![];
        for (bi, &(start, count)) in batches.iter().enumerate() {
            let w = bi % n_ws;
            let mut p = Plan::new(
                &model,
                count,
                theta,
                v,
                grad,
                hv,
                dummy,
                partials,
                batch_mode,
                window_alignment,
            );
            p.conv_tiled = conv_tiled;
            p.conv_tile = conv_tile;
            p.reduce_split = reduce_span.map(|s| (s, reduce_partials));
            p.frozen = options.frozen;
            let block = plan::BlockPlan {
                kmax,
                tangent: &arena.tangent,
            };
            let steps = plan::plan_batch(p, &workspaces[w], &canon, bi, losses, scale, Some(block));
            let forward_backward = Compiled::build(
                &ctx,
                &format!("batch {bi} forward/backward"),
                &steps.forward_backward,
                &arena.buffers,
            )?;
            let r_pass = Compiled::build(
                &ctx,
                &format!("batch {bi} R-pass"),
                &steps.r_pass,
                &arena.buffers,
            )?;
            let record = match &steps.record {
                Some(r) => Some(Compiled::build(
                    &ctx,
                    &format!("batch {bi} recording forward"),
                    r,
                    &arena.buffers,
                )?),
                None => None,
            };
            programs.push(BatchProgram {
                ws: w,
                start,
                count,
                forward_backward,
                r_pass,
                record,
                forward_loss: steps.forward_loss,
                forward_loss_compiled: None,
            });
        }
        let kernel_paths = format!(
            "conv {}, reductions {}",
            if conv_tiled {
                format!("tiled (widest tile {conv_tile})")
            } else {
                "emulator kernels".into()
            },
            reduce::describe(reduce_span)
        );
        let mut e = GpuEngine {
            ctx,
            model,
            data,
            bn: problem.bn,
            arena,
            v,
            grad,
            hv,
            losses,
            workspaces,
            programs,
            canon,
            kmax,
            theta,
            theta_host: problem.weights.theta.clone(),
            frozen: options.frozen,
            basis_place: options.basis_place,
            basis_budget: options.basis_budget,
            kernel_paths,
            basis_ctx: Default::default(),
        };
        if n_ws == e.programs.len() {
            for bi in 0..e.programs.len() {
                e.upload_batch(bi)?;
            }
        }
        if e.frozen {
            e.record_decisions()?;
        }
        e.ctx.check()?;
        Ok(e)
    }

    /// θ as last set.
    pub fn theta(&self) -> &[f64] {
        &self.theta_host
    }

    /// Moves the engine to θ: every batch's passes are recomputed at the
    /// next product (a frozen engine keeps its recorded decisions).
    pub fn set_theta(&mut self, theta: &[f64]) -> Result<()> {
        if theta.len() != self.model.n_params {
            return Err(Error::Invalid {
                what: "parameters θ",
                msg: format!(
                    "{} values for {} parameters",
                    theta.len(),
                    self.model.n_params
                ),
            });
        }
        let tf: Vec<f32> = theta.iter().map(|&x| x as f32).collect();
        non_finite_error(&self.model, "the weights", &tf, &self.ctx.info.name)?;
        self.ctx
            .write_f32(&self.arena.buffers[self.theta], 0, &tf)?;
        self.theta_host.copy_from_slice(theta);
        for w in &mut self.workspaces {
            w.resident = None;
        }
        Ok(())
    }

    /// Replaces the samples (as many as the engine was built for, so every
    /// batch keeps its size): a training step's mini-batch.
    pub fn set_samples(&mut self, x: &[f32], y: &[u32]) -> Result<()> {
        if x.len() != self.data.x.len() || y.len() != self.data.y.len() {
            return Err(Error::Invalid {
                what: "samples",
                msg: format!(
                    "{} labels and {} input values for an engine built for {} and {}",
                    y.len(),
                    x.len(),
                    self.data.y.len(),
                    self.data.x.len()
                ),
            });
        }
        self.data.x.copy_from_slice(x);
        self.data.y.copy_from_slice(y);
        self.data.validate(&self.model)?;
        for w in &mut self.workspaces {
            w.resident = None;
        }
        if self.cached_batches() > 0 {
            for bi in 0..self.programs.len() {
                self.upload_batch(bi)?;
            }
        }
        Ok(())
    }

    /// The mean cross-entropy and the accuracy (the fraction of samples
    /// whose largest logit, the first on ties, is the label) over the
    /// data, forward passes only, batch norm in the engine's mode (a
    /// PyTorch `model.eval()` evaluation is `BnMode::Running`). Leaves no
    /// batch resident for the products.
    pub fn evaluate(&mut self) -> Result<(f64, f64)> {
        let lb = self.losses;
        self.submit("clearing the losses", |enc| {
            enc.clear_buffer(&self.arena.buffers[lb].buffer, 0, None);
        })?;
        let shared = self.workspaces.len() < self.programs.len();
        let k = self.model.classes;
        let last = self.canon[self.model.nodes.len()];
        let mut correct = 0usize;
        for bi in 0..self.programs.len() {
            if shared || self.workspaces[self.programs[bi].ws].resident != Some(bi) {
                self.upload_batch(bi)?;
            }
            let p = &mut self.programs[bi];
            if p.forward_loss_compiled.is_none() {
                p.forward_loss_compiled = Some(Compiled::build(
                    &self.ctx,
                    &format!("batch {bi} forward/loss"),
                    &p.forward_loss,
                    &self.arena.buffers,
                )?);
            }
            let p = &self.programs[bi];
            if let Some(forward) = &p.forward_loss_compiled {
                self.submit(&format!("batch {bi} forward"), |enc| forward.record(enc))?;
            }
            let (start, count, w) = (p.start, p.count, p.ws);
            self.check_bn_statistics(&[bi])?;
            let buf = &self.arena.buffers[self.workspaces[w].act[last]];
            let z = self.ctx.read_f32(&[(buf, 0, count * k)])?;
            correct += layers::loss::count_correct(&z[0], k, &self.data.y[start..start + count]);
            self.workspaces[w].resident = None;
        }
        let r = self
            .ctx
            .read_f32(&[(&self.arena.buffers[lb], 0, self.programs.len())])?;
        let loss: f64 = r[0].iter().map(|&x| x as f64).sum();
        if !loss.is_finite() {
            self.diagnose(false)?;
            return Err(Error::Numerical(format!(
                "the evaluation loss is {loss} on {}: the weights or data overflow in float32",
                self.ctx.info.name
            )));
        }
        Ok((loss, correct as f64 / self.data.len() as f64))
    }

    /// Writes batch norm's running statistics (`buffers`, by
    /// `Model::buffers` index) where a running-mode engine reads them.
    pub fn set_running_buffers(&mut self, buffers: &[Vec<f64>]) -> Result<()> {
        if buffers.len() != self.model.buffers.len()
            || buffers
                .iter()
                .zip(&self.model.buffers)
                .any(|(b, m)| b.len() != m.len)
        {
            return Err(Error::Invalid {
                what: "running buffers",
                msg: format!(
                    "{} buffers for the {} of {}",
                    buffers.len(),
                    self.model.buffers.len(),
                    self.model.name
                ),
            });
        }
        if self.bn != BnMode::Running {
            return Ok(());
        }
        for (i, node) in self.model.nodes.iter().enumerate() {
            if let Op::BatchNorm { .. } = node.op {
                let rows = layers::batchnorm::running_rows(node, buffers);
                if rows.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Numerical(format!(
                        "the running statistics of layer `{}` (batch norm) overflow float32 on {}",
                        crate::layers::layer_name(node),
                        self.ctx.info.name
                    )));
                }
                for ws in &self.workspaces {
                    self.ctx
                        .write_f32(&self.arena.buffers[ws.state[i][2]], 0, &rows)?;
                }
            }
        }
        Ok(())
    }

    /// Whether the engine was planned for held decisions.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Runs every batch's recording forward pass at the current θ.
    fn record_decisions(&mut self) -> Result<()> {
        for bi in 0..self.programs.len() {
            let p = &self.programs[bi];
            let rec = p.record.as_ref().expect("a frozen engine records");
            self.submit(&format!("batch {bi} recording"), |enc| rec.record(enc))?;
            // The recording forward leaves the batch's values, not its
            // adjoints: the next product runs the forward/backward pass.
            self.workspaces[p.ws].resident = None;
        }
        Ok(())
    }

    /// `hold`: records the piecewise decisions (ReLU/LeakyReLU pieces,
    /// max-pool argmax) of every batch at the current θ, and every later
    /// pass replays them until the next call — the loss is then the smooth
    /// continuation of the piece holding this θ, the function autograd
    /// differentiates. Needs an engine built with `EngineOptions::frozen`.
    /// `!hold` is accepted only by an engine that was not (its passes
    /// decide for themselves); a frozen one keeps replaying, which at the
    /// recording θ is the plain pass bit for bit.
    pub fn hold_decisions(&mut self, hold: bool) -> Result<()> {
        match (hold, self.frozen) {
            (true, true) => self.record_decisions(),
            (false, false) => Ok(()),
            (true, false) => Err(Error::Invalid {
                what: "held decisions",
                msg: "this engine was not planned for them (EngineOptions::frozen)".into(),
            }),
            (false, true) => Err(Error::Invalid {
                what: "held decisions",
                msg: "an engine planned for them always replays recorded decisions".into(),
            }),
        }
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    pub fn bn_mode(&self) -> BnMode {
        self.bn
    }

    /// How many batches keep their activations resident (1 = recomputed).
    pub fn cached_batches(&self) -> usize {
        if self.workspaces.len() == self.programs.len() {
            self.programs.len()
        } else {
            0
        }
    }

    /// Per-kernel wall times of the first batch's forward/backward and
    /// R-pass programs, each dispatch submitted and waited for alone.
    pub fn profile(&mut self) -> Result<(KernelTimes, KernelTimes)> {
        self.upload_batch(0)?;
        let p = &self.programs[0];
        let fb = p.forward_backward.profile(&self.ctx)?;
        let r = p.r_pass.profile(&self.ctx)?;
        self.workspaces[p.ws].resident = Some(0);
        Ok((fb, r))
    }

    fn upload_batch(&mut self, bi: usize) -> Result<()> {
        let p = &self.programs[bi];
        let ws = &self.workspaces[p.ws];
        let d = self.model.input.numel();
        let x = &self.data.x[p.start * d..(p.start + p.count) * d];
        let y = &self.data.y[p.start..p.start + p.count];
        self.ctx.write_f32(&self.arena.buffers[ws.act[0]], 0, x)?;
        self.ctx.write_u32(&self.arena.buffers[ws.labels], y)?;
        Ok(())
    }

    /// Submits `record` in one command buffer inside error scopes.
    fn submit(&self, what: &str, record: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        self.ctx.scoped(what, || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            record(&mut enc);
            self.ctx.queue.submit([enc.finish()]);
        })
    }

    /// Runs every batch's forward/backward (and with `r`, its R-pass),
    /// reusing resident batches for the R-pass.
    fn run(&mut self, grad: bool, r: bool) -> Result<()> {
        self.run_block(grad, r, 1)
    }

    /// `run` with the R-pass for the first `tangents` slices of v.
    fn run_block(&mut self, grad: bool, r: bool, tangents: usize) -> Result<()> {
        let (gb, hb, lb) = (self.grad, self.hv, self.losses);
        self.submit("clearing the accumulators", |enc| {
            if grad {
                enc.clear_buffer(&self.arena.buffers[gb].buffer, 0, None);
                enc.clear_buffer(&self.arena.buffers[lb].buffer, 0, None);
            }
            if r {
                enc.clear_buffer(&self.arena.buffers[hb].buffer, 0, None);
            }
        })?;
        let shared = self.workspaces.len() < self.programs.len();
        let mut fresh = vec![];
        for bi in 0..self.programs.len() {
            let w = self.programs[bi].ws;
            let resident = self.workspaces[w].resident == Some(bi);
            let need_fb = grad || !resident;
            if need_fb && shared {
                self.upload_batch(bi)?;
            }
            let p = &self.programs[bi];
            self.submit(&format!("batch {bi}"), |enc| {
                if need_fb {
                    p.forward_backward.record(enc);
                }
                if r {
                    p.r_pass.record_block(enc, tangents as u32);
                }
            })?;
            self.workspaces[w].resident = Some(bi);
            if need_fb {
                fresh.push(bi);
                if shared {
                    // The next batch overwrites the statistics.
                    self.check_bn_statistics(&fresh)?;
                    fresh.clear();
                }
            }
        }
        self.check_bn_statistics(&fresh)
    }

    /// Batch statistics that overflow float32 (a variance beyond its range,
    /// which makes 1/√(σ²+ε) zero) give finite but wrong outputs: refused,
    /// naming the layer, for the batches whose forward pass just ran. Their
    /// workspaces are then forgotten, so a later call recomputes and checks
    /// again.
    fn check_bn_statistics(&mut self, batches: &[usize]) -> Result<()> {
        if self.bn != BnMode::Batch || batches.is_empty() {
            return Ok(());
        }
        let bns: Vec<(usize, usize)> = (self.model.nodes.iter().enumerate())
            .filter_map(|(i, n)| match n.op {
                Op::BatchNorm { c, .. } => Some((i, c)),
                _ => None,
            })
            .collect();
        if bns.is_empty() {
            return Ok(());
        }
        let mut ranges = vec![];
        for &bi in batches {
            let ws = &self.workspaces[self.programs[bi].ws];
            for &(i, c) in &bns {
                // Rows MEAN and S (kernels::bn_rows).
                ranges.push((&self.arena.buffers[ws.state[i][2]], 0, 2 * c));
            }
        }
        let rows = self.ctx.read_f32(&ranges)?;
        for (k, r) in rows.iter().enumerate() {
            let (i, c) = bns[k % bns.len()];
            let bad = r[..c].iter().any(|m| !m.is_finite())
                || r[c..].iter().any(|s| !s.is_finite() || *s == 0.0);
            if bad {
                let bi = batches[k / bns.len()];
                let node = &self.model.nodes[i];
                for &b in batches {
                    let w = self.programs[b].ws;
                    self.workspaces[w].resident = None;
                }
                return Err(Error::Numerical(format!(
                    "the batch statistics of layer `{}` (batch norm) overflow float32 on {} (batch {bi}: \
                     a mean or variance beyond its range): the data or weights are too large for float32; \
                     the float64 reference computes in their range",
                    crate::layers::layer_name(node),
                    self.ctx.info.name
                )));
            }
        }
        Ok(())
    }

    fn check_finite(&self, what: &str, xs: &[f32]) -> Result<()> {
        non_finite_error(&self.model, what, xs, &self.ctx.info.name)
    }

    fn upload_v(&mut self, v: &[f64]) -> Result<()> {
        self.upload_v_at(v, 0)
    }

    /// Writes direction `v` into tangent slice `k` of the v buffer.
    fn upload_v_at(&mut self, v: &[f64], k: usize) -> Result<()> {
        if v.len() != self.model.n_params {
            return Err(Error::Invalid {
                what: "direction v",
                msg: format!("{} values for {} parameters", v.len(), self.model.n_params),
            });
        }
        let vf: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        self.check_finite("the direction v", &vf)?;
        let np = self.model.n_params;
        self.ctx.write_f32(&self.arena.buffers[self.v], k * np, &vf)
    }

    /// Tangents one sweep serves.
    pub fn block(&self) -> usize {
        self.kmax
    }

    /// The ReLU masks (input > 0, in f32) per batch and node, as the GPU
    /// sees them: lets tests run the float64 reference with the same kinks.
    pub fn relu_masks(&mut self) -> Result<Vec<Vec<Vec<bool>>>> {
        let mut out = vec![];
        for bi in 0..self.programs.len() {
            let w = self.programs[bi].ws;
            if self.workspaces[w].resident != Some(bi) {
                if self.workspaces.len() < self.programs.len() {
                    self.upload_batch(bi)?;
                }
                let p = &self.programs[bi];
                self.submit(&format!("batch {bi}"), |enc| p.forward_backward.record(enc))?;
                self.workspaces[w].resident = Some(bi);
            }
            let count = self.programs[bi].count;
            let ws = &self.workspaces[w];
            let mut ranges = vec![];
            for node in &self.model.nodes {
                if node.op == Op::Act(Activation::Relu) {
                    let b = ws.act[self.canon[node.inputs[0]]];
                    ranges.push((&self.arena.buffers[b], 0, count * node.in_shape.numel()));
                }
            }
            let vals = self.ctx.read_f32(&ranges)?;
            let mut it = vals.into_iter();
            let masks = self
                .model
                .nodes
                .iter()
                .map(|n| {
                    if n.op == Op::Act(Activation::Relu) {
                        it.next().unwrap().iter().map(|x| *x > 0.0).collect()
                    } else {
                        vec![]
                    }
                })
                .collect();
            out.push(masks);
        }
        Ok(out)
    }

    fn read_loss_grad(&self) -> Result<(f64, Vec<f64>)> {
        let np = self.model.n_params;
        let nb = self.programs.len();
        let r = self.ctx.read_f32(&[
            (&self.arena.buffers[self.losses], 0, nb),
            (&self.arena.buffers[self.grad], 0, np),
        ])?;
        let loss: f64 = r[0].iter().map(|&x| x as f64).sum();
        if !loss.is_finite() || r[1].iter().any(|x| !x.is_finite()) {
            self.diagnose(false)?;
        }
        if !loss.is_finite() {
            return Err(Error::Numerical(format!(
                "the loss is {loss} on {}: the weights or data overflow in float32",
                self.ctx.info.name
            )));
        }
        self.check_finite("the gradient", &r[1])?;
        Ok((loss, r[1].iter().map(|&x| x as f64).collect()))
    }

    /// After a non-finite result: the first layer (in graph order, over the
    /// batches still resident) whose output (`tangents`: its R-forward
    /// output) holds an infinity or NaN, as an error naming it. Ok when
    /// every resident value is finite (the overflow happened later).
    fn diagnose(&self, tangents: bool) -> Result<()> {
        for (bi, prog) in self.programs.iter().enumerate() {
            let ws = &self.workspaces[prog.ws];
            if ws.resident != Some(bi) {
                continue;
            }
            for (i, node) in self.model.nodes.iter().enumerate() {
                if layers::unit(&node.op).is_alias() {
                    continue;
                }
                let v = self.canon[i + 1];
                let buf = if tangents { ws.dact[v] } else { ws.act[v] };
                let len = prog.count * node.out_shape.numel();
                let vals = self.ctx.read_f32(&[(&self.arena.buffers[buf], 0, len)])?;
                if let Some(x) = vals[0].iter().find(|x| !x.is_finite()) {
                    let pass = if tangents { "R-forward" } else { "forward" };
                    return Err(Error::Numerical(format!(
                        "the {pass} pass overflows float32 at layer `{}` ({}) on {} (batch {bi}: an output is {x}): \
                         the weights, data or direction are too large for float32; the float64 reference computes in their range",
                        crate::layers::layer_name(node),
                        node.kind(),
                        self.ctx.info.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The block size chosen for the user. On a CPU emulator (lavapipe,
/// llvmpipe) 1: its two to few dozen threads are already busy with one
/// tangent's work, so K tangents per dispatch cost K times one (measured,
/// BENCHMARKS.md "Block products"). On a GPU, as many tangents as fit in
/// `block_budget` of tangent buffers, up to `DEFAULT_MAX_BLOCK`: small
/// layers leave most of a GPU idle, and K tangents fill it.
fn default_block(ctx: &GpuContext, model: &Model, canon: &[usize], n: usize) -> usize {
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

fn default_cache_budget(ctx: &GpuContext) -> usize {
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

/// An error naming the first non-finite value of a parameter-shaped vector.
fn non_finite_error(model: &Model, what: &str, xs: &[f32], device: &str) -> Result<()> {
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        let name = model
            .params
            .iter()
            .find(|p| i >= p.offset && i < p.offset + p.numel())
            .map(|p| p.name.clone())
            .unwrap_or_default();
        return Err(Error::Numerical(format!(
            "{what} is {} at parameter {i} ({name}) on {device}: the weights, data or direction overflow in float32",
            xs[i]
        )));
    }
    Ok(())
}

impl Curvature for GpuEngine {
    fn n_params(&self) -> usize {
        self.model.n_params
    }

    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        self.run(true, false)?;
        self.read_loss_grad()
    }

    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        check_out_len(out, self.model.n_params)?;
        self.upload_v(v)?;
        self.run(false, true)?;
        let r = self
            .ctx
            .read_f32(&[(&self.arena.buffers[self.hv], 0, self.model.n_params)])?;
        if r[0].iter().any(|x| !x.is_finite()) {
            self.diagnose(true)?;
        }
        self.check_finite("Hv", &r[0])?;
        out.iter_mut().zip(&r[0]).for_each(|(o, &x)| *o = x as f64);
        Ok(())
    }

    /// One sweep over the data per `block()` directions: the forward pass,
    /// its caches and the weights are shared by the tangents, each layer's
    /// R-pass kernels take them together (one dispatch per layer).
    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        if vs.len() != outs.len() {
            return Err(Error::Invalid {
                what: "output vectors",
                msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
            });
        }
        let np = self.model.n_params;
        for o in outs.iter() {
            check_out_len(o, np)?;
        }
        for (vc, oc) in vs.chunks(self.kmax).zip(outs.chunks_mut(self.kmax)) {
            for (k, v) in vc.iter().enumerate() {
                self.upload_v_at(v, k)?;
            }
            self.run_block(false, true, vc.len())?;
            let r = self
                .ctx
                .read_f32(&[(&self.arena.buffers[self.hv], 0, vc.len() * np)])?;
            if r[0].iter().any(|x| !x.is_finite()) {
                self.diagnose(true)?;
            }
            self.check_finite("Hv", &r[0])?;
            for (o, hv) in oc.iter_mut().zip(r[0].chunks(np)) {
                o.iter_mut().zip(hv).for_each(|(a, &b)| *a = b as f64);
            }
        }
        Ok(())
    }

    fn preferred_block(&self) -> usize {
        self.kmax
    }

    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        self.upload_v(v)?;
        self.run(true, true)?;
        let (loss, grad) = self.read_loss_grad()?;
        let r = self
            .ctx
            .read_f32(&[(&self.arena.buffers[self.hv], 0, self.model.n_params)])?;
        self.check_finite("Hv", &r[0])?;
        Ok((loss, grad, r[0].iter().map(|&x| x as f64).collect()))
    }

    fn backend(&self) -> String {
        self.ctx.info.backend.clone()
    }

    fn adapter(&self) -> String {
        self.ctx.info.name.clone()
    }

    fn kernel_paths(&self) -> Option<String> {
        Some(self.kernel_paths.clone())
    }

    /// This GPU, by `EngineOptions::basis_place`: offered (and preferred)
    /// for `Auto` unless it is a CPU emulator, required for `Device`.
    fn basis_device(&self) -> Option<Rc<dyn BasisDevice>> {
        let required = match self.basis_place {
            BasisPlace::Host => return None,
            BasisPlace::Auto if self.ctx.is_cpu_adapter() => return None,
            BasisPlace::Auto => false,
            BasisPlace::Device => true,
        };
        let budget = self
            .basis_budget
            .unwrap_or_else(|| device_basis_budget(self.ctx.info.device_memory));
        let ctx = self.basis_ctx.get_or_init(|| Rc::new(self.ctx.share()));
        Some(Rc::new(GpuBasisDevice::new(ctx.clone(), budget, required)))
    }
}

/// Opens the chosen backend's adapter and builds the engine for a problem.
pub fn open(
    problem: &Problem,
    choice: crate::gpu::BackendChoice,
    adapter: usize,
) -> Result<GpuEngine> {
    open_with(problem, choice, adapter, EngineOptions::default())
}

/// `open` with engine options (block size, cache budget).
pub fn open_with(
    problem: &Problem,
    choice: crate::gpu::BackendChoice,
    adapter: usize,
    options: EngineOptions,
) -> Result<GpuEngine> {
    let ctx = GpuContext::open(choice, adapter)?;
    GpuEngine::with_options(ctx, problem, options)
}

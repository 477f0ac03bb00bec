//! The GPU executor: one engine per problem. It plans every batch once
//! (`plan`), allocates its buffers (`memory`), and at run time uploads
//! batches, submits the programs and reads results back. Activations,
//! adjoints and batch statistics do not depend on v, so while they fit in
//! the cache budget every batch keeps its own workspace and an HVP runs
//! only the R program.

use crate::cpu::CpuReference;
use crate::data::Dataset;
use crate::decisions::DecisionSource;
use crate::engine::{check_out_len, BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::gpu::basis::{BasisPlace, GpuBasisDevice};
use crate::gpu::context::GpuContext;
use crate::gpu::kernels::{ConvTile, Kernel};
use crate::gpu::memory::{self, Arena, Workspace};
use crate::gpu::plan::{self, Plan};
use crate::gpu::program::{Compiled, Step};
use crate::gpu::reduce;
use crate::layers::{self, StateCx};
use crate::model::{Model, Op};
use crate::spectral::lanczos::BasisDevice;
use std::rc::Rc;

mod checks;
mod curvature;
mod decisions;
mod options;
mod param_bufs;

pub(crate) use checks::check_emulator_loops;
use checks::non_finite_error;
pub use checks::ValueKind;
pub use options::*;

/// Wall seconds per dispatched kernel, in program order.
pub type KernelTimes = Vec<(Kernel, f64)>;

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
    /// The forward/backward of a zero loss adjoint (Gauss–Newton
    /// products), compiled on first use.
    zero_adjoint: Vec<Step>,
    zero_adjoint_compiled: Option<Compiled>,
}

pub struct GpuEngine {
    ctx: GpuContext,
    model: Model,
    data: Dataset,
    bn: BnMode,
    arena: Arena,
    /// θ, v, the gradient and Hv: one buffer each, or chunks.
    params: param_bufs::ParamBufs,
    losses: usize,
    workspaces: Vec<Workspace>,
    programs: Vec<BatchProgram>,
    /// Canonical buffer value of every value (flatten aliases its input).
    canon: Vec<usize>,
    /// Tangents one R-pass dispatch serves (block products).
    kmax: usize,
    /// θ as last uploaded.
    theta_host: Vec<f64>,
    /// Planned for held decisions (`EngineOptions::frozen`): kept as θ
    /// moves.
    frozen: bool,
    /// The plans replay decisions held in the units' state (held ones,
    /// or float64 ones of the current θ) instead of taking their own.
    replay: bool,
    held: decisions::Held,
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
        if ctx.is_cpu_adapter() {
            let most = problem.batch.min(problem.data.len()).max(1);
            let split = !options.conv_path.tiled_for(&ctx)?;
            check_emulator_loops(&problem.model, &ctx.info.name, most, split)?;
        }
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
        let batch_mode = problem.bn == BnMode::Batch;
        let replay = options.frozen || options.decisions == DecisionSource::Float64;
        let bn_float64 = options.bn_float64(batch_mode);
        let scx = StateCx {
            model: &model,
            buffers: &problem.weights.buffers,
            batch_mode,
            frozen: replay,
        };
        let mut arena = Arena::default();
        let (params, kmax) = param_bufs::ParamBufs::new(
            &ctx,
            &mut arena,
            &model,
            max_count,
            kmax,
            options.block.is_none(),
            || param_bufs::probe(&model, &canon, max_count, &scx),
        )?;
        let losses = arena.alloc(&ctx, "batch losses".into(), batches.len())?;
        let dummy = arena.alloc(&ctx, "unused binding".into(), 4)?;
        let scratch = params.partial_floats(&model, max_count);
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
        params.write_theta(&ctx, &arena, &theta_f32)?;
        let ws_bytes = memory::workspace_bytes(&model, &canon, max_count, &scx, kmax);
        let n_ws = if ws_bytes.saturating_mul(batches.len()) <= budget {
            batches.len()
        } else {
            1
        };
        // Float32 decisions are recorded into each batch's own workspace;
        // float64 ones are rewritten into a shared one before each pass.
        if options.frozen && options.decisions == DecisionSource::Float32 && n_ws < batches.len() {
            return Err(Error::Invalid {
                what: "held decisions",
                msg: format!(
                    "replaying float32-recorded decisions needs every batch resident: {} batches of {} bytes \
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
            let c = params.first();
            let mut p = Plan::new(
                &model,
                count,
                c.theta,
                c.v,
                c.grad,
                c.hv,
                dummy,
                partials,
                batch_mode,
                window_alignment,
            );
            p.conv_tiled = conv_tiled;
            p.split_loops = ctx.is_cpu_adapter() && !conv_tiled;
            p.conv_tile = conv_tile;
            p.reduce_split = reduce_span.map(|s| (s, reduce_partials));
            p.frozen = replay;
            p.bn_float64 = bn_float64;
            p.split = params.split.as_ref();
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
                zero_adjoint: steps.zero_adjoint,
                zero_adjoint_compiled: None,
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
            params,
            losses,
            workspaces,
            programs,
            canon,
            kmax,
            theta_host: problem.weights.theta.clone(),
            frozen: options.frozen,
            replay,
            held: decisions::Held::new(
                options.decisions,
                (options.decisions == DecisionSource::Float64)
                    .then(|| CpuReference::new(problem.clone())),
                bn_float64,
            ),
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
        self.params.write_theta(&self.ctx, &self.arena, &tf)?;
        self.theta_host.copy_from_slice(theta);
        for w in &mut self.workspaces {
            w.resident = None;
        }
        if !self.frozen {
            self.held.invalidate();
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
        if let Some(r) = &mut self.held.reference {
            r.problem.data.x.copy_from_slice(x);
            r.problem.data.y.copy_from_slice(y);
        }
        if !self.frozen {
            self.held.invalidate();
        }
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
        self.ensure_decisions()?;
        let lb = self.losses;
        self.submit("clearing the losses", |enc| {
            enc.clear_buffer(&self.arena.buffers[lb].buffer, 0, None);
        })?;
        let shared = self.workspaces.len() < self.programs.len();
        let k = self.model.classes;
        let last = self.canon[self.model.nodes.len()];
        let mut correct = 0.0f64;
        for bi in 0..self.programs.len() {
            if shared || self.workspaces[self.programs[bi].ws].resident != Some(bi) {
                self.upload_batch(bi)?;
                if shared {
                    self.upload_held(bi)?;
                }
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
            let rows = layers::next_token::loss_rows(&self.model);
            let z = self.ctx.read_f32(&[(buf, 0, count * rows * k)])?;
            let z: Vec<f64> = z[0].iter().map(|&v| v as f64).collect();
            correct += layers::next_token::correct(&self.model, &self.data, start, count, &z);
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
        Ok((loss, correct / self.data.len() as f64))
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
        if let Some(r) = &mut self.held.reference {
            r.problem.weights.buffers = buffers.to_vec();
        }
        if self.bn != BnMode::Running {
            return Ok(());
        }
        if !self.frozen {
            self.held.invalidate();
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
        self.ensure_decisions()?;
        self.upload_batch(0)?;
        self.upload_held(0)?;
        let p = &self.programs[0];
        let fb = p.forward_backward.profile(&self.ctx)?;
        let r = p.r_pass.profile(&self.ctx)?;
        self.workspaces[p.ws].resident = Some(0);
        self.workspaces[p.ws].zero_adjoint = false;
        Ok((fb, r))
    }

    fn upload_batch(&mut self, bi: usize) -> Result<()> {
        let p = &self.programs[bi];
        let ws = &self.workspaces[p.ws];
        let d = self.model.input.numel();
        let x = &self.data.x[p.start * d..(p.start + p.count) * d];
        let y = layers::next_token::gpu_labels(&self.model, &self.data, p.start, p.count);
        self.ctx.write_f32(&self.arena.buffers[ws.act[0]], 0, x)?;
        self.ctx.write_u32(&self.arena.buffers[ws.labels], &y)?;
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
        self.run_sweep(grad, r, tangents, false)
    }

    /// `run_block`; with `zero_adjoint` (and not `grad`), on the adjoints
    /// of a zero loss adjoint: the R-pass then computes G·v.
    fn run_sweep(
        &mut self,
        grad: bool,
        r: bool,
        tangents: usize,
        zero_adjoint: bool,
    ) -> Result<()> {
        let zero_adjoint = zero_adjoint && !grad;
        self.ensure_decisions()?;
        if zero_adjoint {
            self.compile_zero_adjoint()?;
        }
        let lb = self.losses;
        self.submit("clearing the accumulators", |enc| {
            if grad {
                enc.clear_buffer(&self.arena.buffers[lb].buffer, 0, None);
            }
            self.params.clear(enc, &self.arena, grad, r);
        })?;
        let shared = self.workspaces.len() < self.programs.len();
        let mut fresh = vec![];
        for bi in 0..self.programs.len() {
            let w = self.programs[bi].ws;
            let resident = self.workspaces[w].resident == Some(bi)
                && self.workspaces[w].zero_adjoint == zero_adjoint;
            let need_fb = grad || !resident;
            if need_fb && shared {
                self.upload_batch(bi)?;
                self.upload_held(bi)?;
            }
            let p = &self.programs[bi];
            self.submit(&format!("batch {bi}"), |enc| {
                match (&p.zero_adjoint_compiled, need_fb, zero_adjoint) {
                    (Some(z), true, true) => z.record(enc),
                    (_, true, _) => p.forward_backward.record(enc),
                    _ => {}
                }
                if r {
                    p.r_pass.record_block(enc, tangents as u32);
                }
            })?;
            self.workspaces[w].resident = Some(bi);
            self.workspaces[w].zero_adjoint = zero_adjoint;
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
        self.params.write_v(&self.ctx, &self.arena, k, &vf)
    }

    /// The first `tangents` slices of Hv, as one vector.
    fn read_hv(&self, tangents: usize) -> Result<Vec<Vec<f32>>> {
        let r = self
            .ctx
            .read_f32(&self.params.ranges(&self.arena, true, tangents))?;
        Ok(vec![r.into_iter().flatten().collect()])
    }

    /// How many buffers θ, v, the gradient and Hv are each split in
    /// (1: one each; more where one exceeds a storage binding).
    pub fn param_chunks(&self) -> usize {
        self.params.chunks.len()
    }

    /// Tangents one sweep serves.
    pub fn block(&self) -> usize {
        self.kmax
    }

    fn read_loss_grad(&self) -> Result<(f64, Vec<f64>)> {
        let nb = self.programs.len();
        let mut ranges = vec![(&self.arena.buffers[self.losses], 0, nb)];
        ranges.extend(self.params.ranges(&self.arena, false, 1));
        let mut r = self.ctx.read_f32(&ranges)?;
        let g: Vec<f32> = r.drain(1..).flatten().collect();
        r.push(g);
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

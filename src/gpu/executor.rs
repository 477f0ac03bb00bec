//! The GPU executor: one engine per problem. It plans every batch once
//! (`plan`), allocates its buffers (`memory`), and at run time uploads
//! batches, submits the programs and reads results back. Activations,
//! adjoints and batch statistics do not depend on v, so while they fit in
//! the cache budget every batch keeps its own workspace and an HVP runs
//! only the R program.

use crate::data::Dataset;
use crate::engine::{check_out_len, BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::kernels::Kernel;
use crate::gpu::memory::{self, Arena, Workspace};
use crate::gpu::plan::{self, Plan};
use crate::gpu::program::Compiled;
use crate::layers::{self, StateCx};
use crate::model::{Activation, Model, Op};

/// Wall seconds per dispatched kernel, in program order.
pub type KernelTimes = Vec<(Kernel, f64)>;

/// Bytes of per-batch state kept resident for reuse by every HVP.
pub const CACHE_BUDGET_BYTES: usize = 2 << 30;

struct BatchProgram {
    ws: usize,
    start: usize,
    count: usize,
    forward_backward: Compiled,
    r_pass: Compiled,
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
}

impl GpuEngine {
    pub fn new(ctx: GpuContext, problem: &Problem) -> Result<GpuEngine> {
        Self::with_cache_budget(ctx, problem, CACHE_BUDGET_BYTES)
    }

    /// As `new`, keeping every batch's activations resident only while
    /// they take at most `budget` bytes; otherwise one workspace is shared
    /// and each HVP recomputes the forward and backward passes.
    pub fn with_cache_budget(
        ctx: GpuContext,
        problem: &Problem,
        budget: usize,
    ) -> Result<GpuEngine> {
        layers::check_model(&problem.model)?;
        let model = problem.model.clone();
        let data = problem.data.clone();
        let batches = data.batches(problem.batch);
        let max_count = batches.iter().map(|b| b.1).max().unwrap_or(0);
        let canon = memory::canonical_values(&model);
        let mut arena = Arena { buffers: vec![] };
        let np = model.n_params;
        let theta = arena.weights(&ctx, "parameters θ", np)?;
        let v = arena.weights(&ctx, "direction v", np)?;
        let grad = arena.alloc(&ctx, "gradient".into(), np)?;
        let hv = arena.alloc(&ctx, "Hv".into(), np)?;
        let losses = arena.alloc(&ctx, "batch losses".into(), batches.len())?;
        let dummy = arena.alloc(&ctx, "unused binding".into(), 4)?;
        let scratch = model
            .nodes
            .iter()
            .map(|nd| layers::unit(&nd.op).gpu_scratch(nd, max_count))
            .max()
            .unwrap_or(0)
            .max(1);
        let partials = arena.alloc(&ctx, "weight-gradient partial sums".into(), scratch)?;
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
        };
        let ws_bytes = memory::workspace_bytes(&model, &canon, max_count, &scx);
        let n_ws = if ws_bytes.saturating_mul(batches.len()) <= budget {
            batches.len()
        } else {
            1
        };
        let mut workspaces = vec![];
        for w in 0..n_ws {
            let tag = if n_ws > 1 {
                format!(" (batch {w})")
            } else {
                String::new()
            };
            workspaces.push(memory::workspace(
                &ctx, &mut arena, &model, &canon, max_count, &scx, &tag,
            )?);
        }

        let scale = 1.0 / data.len() as f32;
        let window_alignment = ctx.windows_supported().then(|| ctx.window_alignment());
        let mut programs = vec![];
        for (bi, &(start, count)) in batches.iter().enumerate() {
            let w = bi % n_ws;
            let p = Plan::new(
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
            let steps = plan::plan_batch(p, &workspaces[w], &canon, bi, losses, scale);
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
            programs.push(BatchProgram {
                ws: w,
                start,
                count,
                forward_backward,
                r_pass,
            });
        }
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
        };
        if n_ws == e.programs.len() {
            for bi in 0..e.programs.len() {
                e.upload_batch(bi)?;
            }
        }
        e.ctx.check()?;
        Ok(e)
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
                    p.r_pass.record(enc);
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
        if v.len() != self.model.n_params {
            return Err(Error::Invalid {
                what: "direction v",
                msg: format!("{} values for {} parameters", v.len(), self.model.n_params),
            });
        }
        let vf: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        self.check_finite("the direction v", &vf)?;
        self.ctx.write_f32(&self.arena.buffers[self.v], 0, &vf)
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
}

/// Opens the chosen backend's adapter and builds the engine for a problem.
pub fn open(
    problem: &Problem,
    choice: crate::gpu::BackendChoice,
    adapter: usize,
) -> Result<GpuEngine> {
    let ctx = GpuContext::open(choice, adapter)?;
    GpuEngine::new(ctx, problem)
}

//! SGD training on the GPU (`hesscope::train` with a GPU backend): θ, the
//! momentum buffer and the batch-norm running buffers stay on the device.
//! A step uploads its mini-batch (x and y, ordered and augmented by the
//! host exactly as on the reference path), runs the batch's
//! forward/loss/backward program (`plan::plan_batch` with scale 1/count,
//! so the gradient is that of the mini-batch's mean loss), then the update
//! program of shaders/optim.wgsl: one `bn_running` per batch-norm layer
//! (from the statistics rows μ and σ² its `bn_stats` just wrote) and one
//! `sgd` over θ. Only the batch loss (one f32) is read back per step; θ,
//! the momentum buffer and the running buffers are read by [`GpuTrainer::state`]
//! (at checkpoints and the end).
//!
//! A language model's labels are its ids shifted by one
//! (`next_token::shifted_labels`), one per loss row as `plan_batch` plans
//! them.
//!
//! Batches of different sizes (the last may be smaller) get their own
//! forward/backward programs over one shared workspace sized for the
//! largest; update programs are cached per (count, first step, lr).

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::executor::ConvPath;
use crate::gpu::kernels::{bn_rows, BnRunningParams, Consts, EwParams, Kernel, SgdParams};
use crate::gpu::memory::{self, Arena, Workspace};
use crate::gpu::plan::{self, Plan};
use crate::gpu::program::{Compiled, Grid, Step};
use crate::gpu::reduce::{self, ReducePath};
use crate::layers::{self, StateCx};
use crate::model::{Model, Op, Weights};
use std::collections::HashMap;

/// One batch-norm layer's update: its node (whose workspace state holds
/// its statistics rows), channels and the offsets of its running buffers
/// in `running`.
struct BnLayer {
    node: usize,
    c: usize,
    rm_off: usize,
    rv_off: usize,
}

/// The optimiser's settings one update program is built for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// The momentum buffer becomes the gradient (first step, or momentum 0).
    pub first: bool,
    /// batch-norm running momentum.
    pub bn_momentum: f64,
}

pub struct GpuTrainer {
    ctx: GpuContext,
    model: Model,
    arena: Arena,
    theta: usize,
    grad: usize,
    momentum: usize,
    running: usize,
    losses: usize,
    /// Offsets of each `Model::buffers` entry in `running`.
    buffer_offsets: Vec<usize>,
    bn: Vec<BnLayer>,
    ws: Workspace,
    canon: Vec<usize>,
    max_count: usize,
    forward_backward: HashMap<usize, Compiled>,
    updates: HashMap<(usize, bool, u64), Compiled>,
    dummy: usize,
    partials: usize,
    /// Split reductions: elements per segment and their partials buffer
    /// (`reduce::stages`), as the spectral engine's default path chooses.
    reduce_split: Option<(usize, usize)>,
    /// An extra gradient term added before the update (the regulariser's).
    extra: usize,
    /// grad += extra.
    add_extra: Option<Compiled>,
    /// The running buffers as the last step left them (read back with its
    /// loss, for the divergence check; empty before a step).
    last_running: Vec<f32>,
    /// Two flag words the update's divergence check writes (θ, momentum;
    /// shaders/optim.wgsl `first_nonfinite`), cleared before each step.
    flags: usize,
    /// The first non-finite element of θ and of the momentum buffer after
    /// the last step, with its float32 value.
    last_nonfinite: [Option<(usize, f32)>; 2],
}

impl GpuTrainer {
    /// A trainer for mini-batches of up to `max_count` samples starting
    /// from `weights` (θ and the running buffers) and, when given, a
    /// momentum buffer.
    pub fn new(
        ctx: GpuContext,
        model: &Model,
        weights: &Weights,
        momentum: Option<&[f64]>,
        max_count: usize,
    ) -> Result<GpuTrainer> {
        layers::check_model(model)?;
        if ctx.is_cpu_adapter() {
            let split = !ConvPath::Auto.tiled_for(&ctx)?;
            crate::gpu::executor::check_emulator_loops(model, &ctx.info.name, max_count, split)?;
        }
        let model = model.clone();
        let np = model.n_params;
        let canon = memory::canonical_values(&model);
        let mut arena = Arena::default();
        let theta = arena.weights(&ctx, "parameters θ", np)?;
        let grad = arena.alloc(&ctx, "gradient".into(), np)?;
        let mom = arena.alloc(&ctx, "momentum buffer".into(), np)?;
        let mut buffer_offsets = vec![];
        let mut total = 0;
        for b in &model.buffers {
            buffer_offsets.push(total);
            total += b.len;
        }
        let running = arena.alloc(&ctx, "batch-norm running buffers".into(), total)?;
        let losses = arena.alloc(&ctx, "batch loss".into(), 1)?;
        let dummy = arena.alloc(&ctx, "unused binding".into(), 4)?;
        let flags = arena.alloc(&ctx, "divergence flags".into(), 2)?;
        let extra = arena.alloc(&ctx, "regulariser gradient".into(), np)?;
        let scratch = model
            .nodes
            .iter()
            .map(|nd| layers::unit(&nd.op).gpu_scratch(nd, max_count))
            .max()
            .unwrap_or(0)
            .max(1);
        let partials = arena.alloc(&ctx, "weight-gradient partial sums".into(), scratch)?;
        let reduce_split = match ReducePath::Auto.span_on(&ctx.info.device_type)? {
            Some(span) => {
                let floats = reduce::partial_floats(&model, max_count, span);
                Some((
                    span,
                    arena.alloc(&ctx, "reduction partial sums".into(), floats)?,
                ))
            }
            None => None,
        };
        let scx = StateCx {
            model: &model,
            buffers: &weights.buffers,
            batch_mode: true,
            frozen: false,
        };
        let tangents = memory::tangent_buffers(&ctx, &mut arena, &model, &canon, max_count, 1)?;
        let ws = memory::workspace(
            &ctx, &mut arena, &model, &canon, max_count, &scx, "", &tangents, 1,
        )?;
        let bn = model
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n.op {
                Op::BatchNorm {
                    running_mean,
                    running_var,
                    c,
                    ..
                } => Some(BnLayer {
                    node: i,
                    c,
                    rm_off: buffer_offsets[running_mean],
                    rv_off: buffer_offsets[running_var],
                }),
                _ => None,
            })
            .collect();
        let mut t = GpuTrainer {
            ctx,
            model,
            arena,
            theta,
            grad,
            momentum: mom,
            running,
            losses,
            buffer_offsets,
            last_running: vec![],
            flags,
            last_nonfinite: [None; 2],
            bn,
            ws,
            canon,
            max_count,
            forward_backward: HashMap::new(),
            updates: HashMap::new(),
            dummy,
            partials,
            reduce_split,
            extra,
            add_extra: None,
        };
        t.upload(weights, momentum)?;
        t.ctx.check()?;
        Ok(t)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Writes θ, the running buffers and (when given) the momentum buffer.
    pub fn upload(&mut self, weights: &Weights, momentum: Option<&[f64]>) -> Result<()> {
        let np = self.model.n_params;
        if weights.theta.len() != np {
            return Err(Error::Invalid {
                what: "weights",
                msg: format!("{} values for {np} parameters", weights.theta.len()),
            });
        }
        let th: Vec<f32> = weights.theta.iter().map(|&x| x as f32).collect();
        if let Some(i) = th.iter().position(|x| !x.is_finite()) {
            return Err(Error::Numerical(format!(
                "parameter {i} is {} in float32 on {}",
                th[i], self.ctx.info.name
            )));
        }
        self.ctx
            .write_f32(&self.arena.buffers[self.theta], 0, &th)?;
        let run: Vec<f32> = weights
            .buffers
            .iter()
            .flatten()
            .map(|&x| x as f32)
            .collect();
        self.ctx
            .write_f32(&self.arena.buffers[self.running], 0, &run)?;
        if let Some(m) = momentum {
            if m.len() != np {
                return Err(Error::Invalid {
                    what: "momentum buffer",
                    msg: format!("{} values for {np} parameters", m.len()),
                });
            }
            let mf: Vec<f32> = m.iter().map(|&x| x as f32).collect();
            self.ctx
                .write_f32(&self.arena.buffers[self.momentum], 0, &mf)?;
        }
        Ok(())
    }

    /// θ, the running buffers (as `Weights`) and the momentum buffer, read
    /// back from the device (float32 values, exactly as float64).
    pub fn state(&self) -> Result<(Weights, Vec<f64>)> {
        let np = self.model.n_params;
        let total: usize = self.model.buffers.iter().map(|b| b.len).sum();
        let r = self.ctx.read_f32(&[
            (&self.arena.buffers[self.theta], 0, np),
            (&self.arena.buffers[self.running], 0, total),
            (&self.arena.buffers[self.momentum], 0, np),
        ])?;
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let buffers = self
            .model
            .buffers
            .iter()
            .zip(&self.buffer_offsets)
            .map(|(b, &o)| f(&r[1][o..o + b.len]))
            .collect();
        Ok((
            Weights {
                theta: f(&r[0]),
                buffers,
            },
            f(&r[2]),
        ))
    }

    /// The first running buffer the last step left non-finite on the
    /// device: its name, the element and the value.
    pub fn nonfinite_running(&self) -> Option<(String, usize, f32)> {
        self.model
            .buffers
            .iter()
            .zip(&self.buffer_offsets)
            .find_map(|(b, &o)| {
                let v = self.last_running.get(o..o + b.len)?;
                let i = v.iter().position(|x| !x.is_finite())?;
                Some((b.name.clone(), i, v[i]))
            })
    }

    /// The first parameter tensor θ or the momentum buffer holds a
    /// non-finite value in after the last step (checked on the device
    /// after every update): the tensor's name (`… (momentum buffer)` for
    /// the buffer), the element within it and the value.
    /// Of two, the one the host's `train::check_state` would name: the
    /// earlier tensor, θ before its momentum buffer.
    pub fn nonfinite_state(&self) -> Option<(String, usize, f32)> {
        let params = &self.model.params;
        let tensor = |i: usize| params.iter().position(|p| i < p.offset + p.numel());
        let found = self
            .last_nonfinite
            .iter()
            .enumerate()
            .filter_map(|(which, f)| f.and_then(|(i, v)| Some((tensor(i)?, which, i, v))))
            .min_by_key(|&(t, which, _, _)| (t, which))?;
        let (t, which, i, v) = found;
        let p = &params[t];
        let name = if which == 0 {
            p.name.clone()
        } else {
            format!("{} (momentum buffer)", p.name)
        };
        Some((name, i - p.offset, v))
    }

    fn forward_backward(&mut self, count: usize) -> Result<&Compiled> {
        if !self.forward_backward.contains_key(&count) {
            let window_alignment = self
                .ctx
                .windows_supported()
                .then(|| self.ctx.window_alignment());
            let mut p = Plan::new(
                &self.model,
                count,
                self.theta,
                self.dummy,
                self.grad,
                self.dummy,
                self.dummy,
                self.partials,
                true,
                window_alignment,
            );
            // The conv kernels of the spectral engine's default path.
            p.conv_tiled = ConvPath::Auto.tiled_for(&self.ctx)?;
            p.split_loops = self.ctx.is_cpu_adapter() && !p.conv_tiled;
            p.reduce_split = self.reduce_split;
            let steps = plan::plan_batch(
                p,
                &self.ws,
                &self.canon,
                0,
                self.losses,
                1.0 / count as f32,
                None,
            );
            let c = Compiled::build(
                &self.ctx,
                &format!("training batch of {count} forward/backward"),
                &steps.forward_backward,
                &self.arena.buffers,
            )?;
            self.forward_backward.insert(count, c);
        }
        Ok(&self.forward_backward[&count])
    }

    /// The update steps after a batch of `count`: each batch norm's running
    /// buffers, then SGD over θ.
    pub fn update_steps(&self, count: usize, s: SgdStep) -> Vec<Step> {
        let mut steps = vec![];
        for b in &self.bn {
            let node = &self.model.nodes[b.node];
            let m = (count * node.in_shape.spatial()) as f64;
            let stats = self.ws.state[b.node][2];
            steps.push(Step::new(
                Kernel::BnRunning,
                Default::default(),
                &BnRunningParams {
                    c: b.c as u32,
                    mean_off: (bn_rows::MEAN * b.c) as u32,
                    var_off: (bn_rows::VAR * b.c) as u32,
                    rm_off: b.rm_off as u32,
                    rv_off: b.rv_off as u32,
                    momentum: s.bn_momentum as f32,
                    unbias: (m / (m - 1.0)) as f32,
                    _p0: 0,
                },
                vec![stats, self.running],
                Grid::Threads(b.c),
            ));
        }
        let np = self.model.n_params;
        steps.push(Step::new(
            Kernel::Sgd,
            Default::default(),
            &SgdParams {
                len: np as u32,
                first: s.first as u32,
                lr: s.lr as f32,
                momentum: s.momentum as f32,
                weight_decay: s.weight_decay as f32,
                ..Default::default()
            },
            vec![self.grad, self.theta, self.momentum],
            Grid::Threads(np),
        ));
        // The divergence check of every step: θ into flag 0, the momentum
        // buffer into flag 1.
        for (slot, buf) in [self.theta, self.momentum].into_iter().enumerate() {
            steps.push(Step::new(
                Kernel::FirstNonFinite,
                Default::default(),
                &EwParams {
                    len: np as u32,
                    a_off: 0,
                    out_off: slot as u32,
                    _p0: 0,
                },
                vec![buf, self.flags],
                Grid::Threads(np),
            ));
        }
        steps
    }

    fn update(&mut self, count: usize, s: SgdStep) -> Result<&Compiled> {
        let key = (count, s.first, s.lr.to_bits());
        if !self.updates.contains_key(&key) {
            // A new learning rate retires the old epochs' programs.
            self.updates.retain(|k, _| k.2 == key.2);
            let steps = self.update_steps(count, s);
            let c = Compiled::build(&self.ctx, "training update", &steps, &self.arena.buffers)?;
            self.updates.insert(key, c);
        }
        Ok(&self.updates[&key])
    }

    /// One step on a mini-batch of `y.len()` samples (`x` their inputs):
    /// the batch's mean loss at the current weights, read back; θ, the
    /// momentum buffer and the running buffers are updated on the device.
    pub fn step(&mut self, x: &[f32], y: &[u32], s: SgdStep) -> Result<f64> {
        self.step_with(x, y, s, None)
    }

    /// θ as on the device (float32 values, exactly as float64).
    pub fn theta(&self) -> Result<Vec<f64>> {
        let np = self.model.n_params;
        let r = self
            .ctx
            .read_f32(&[(&self.arena.buffers[self.theta], 0, np)])?;
        Ok(r[0].iter().map(|&x| x as f64).collect())
    }

    /// [`GpuTrainer::step`] with `extra` added to the mini-batch gradient
    /// before the update (weight decay and momentum then act on the sum,
    /// as on the reference): the regulariser's term.
    pub fn step_with(
        &mut self,
        x: &[f32],
        y: &[u32],
        s: SgdStep,
        extra: Option<&[f64]>,
    ) -> Result<f64> {
        let count = y.len();
        if count == 0 || count > self.max_count {
            return Err(Error::Invalid {
                what: "mini-batch",
                msg: format!(
                    "{count} samples; this trainer takes 1 to {}",
                    self.max_count
                ),
            });
        }
        let d = self.model.input.numel();
        if x.len() != count * d {
            return Err(Error::Invalid {
                what: "mini-batch",
                msg: format!("{} input values for {count} samples of {d}", x.len()),
            });
        }
        self.forward_backward(count)?;
        self.update(count, s)?;
        let np = self.model.n_params;
        if let Some(e) = extra {
            if e.len() != np {
                return Err(Error::Invalid {
                    what: "extra gradient",
                    msg: format!("{} values for {np} parameters", e.len()),
                });
            }
            let ef: Vec<f32> = e.iter().map(|&x| x as f32).collect();
            if let Some(i) = ef.iter().position(|x| !x.is_finite()) {
                return Err(Error::Numerical(format!(
                    "the regulariser's gradient is {} at parameter {i} in float32 on {}",
                    ef[i], self.ctx.info.name
                )));
            }
            self.ctx
                .write_f32(&self.arena.buffers[self.extra], 0, &ef)?;
            if self.add_extra.is_none() {
                let step = Step::new(
                    Kernel::Copy,
                    Consts::acc(true),
                    &EwParams {
                        len: np as u32,
                        a_off: 0,
                        out_off: 0,
                        _p0: 0,
                    },
                    vec![self.extra, self.grad],
                    Grid::Threads(np),
                );
                self.add_extra = Some(Compiled::build(
                    &self.ctx,
                    "adding the regulariser's gradient",
                    &[step],
                    &self.arena.buffers,
                )?);
            }
        }
        let key = (count, s.first, s.lr.to_bits());
        let bufs = &self.arena.buffers;
        self.ctx.write_f32(&bufs[self.ws.act[0]], 0, x)?;
        // A language model's labels are its ids shifted by one (the loss
        // rows of `plan_batch`, as the spectral engine's).
        if self.model.next_token() {
            let labels = layers::next_token::shifted_labels(x, self.model.input.tokens());
            self.ctx.write_u32(&bufs[self.ws.labels], &labels)?;
        } else {
            self.ctx.write_u32(&bufs[self.ws.labels], y)?;
        }
        let fb = &self.forward_backward[&count];
        let up = &self.updates[&key];
        let add = extra.and(self.add_extra.as_ref());
        let grad = &bufs[self.grad].buffer;
        let flags = &bufs[self.flags].buffer;
        self.ctx.scoped("a training step", || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            enc.clear_buffer(grad, 0, None);
            enc.clear_buffer(flags, 0, None);
            fb.record(&mut enc);
            if let Some(a) = add {
                a.record(&mut enc);
            }
            up.record(&mut enc);
            self.ctx.queue.submit([enc.finish()]);
        })?;
        let total: usize = self.model.buffers.iter().map(|b| b.len).sum();
        let mut ranges = vec![(&bufs[self.losses], 0, 1), (&bufs[self.flags], 0, 2)];
        if total > 0 {
            ranges.push((&bufs[self.running], 0, total));
        }
        let mut r = self.ctx.read_f32(&ranges)?;
        let loss = r[0][0] as f64;
        self.last_running = if total > 0 { r.swap_remove(2) } else { vec![] };
        for (k, buf) in [self.theta, self.momentum].into_iter().enumerate() {
            self.last_nonfinite[k] = match r[1][k].to_bits() {
                0 => None,
                word => {
                    let i = (u32::MAX - word) as usize;
                    Some((i, self.ctx.read_f32(&[(&bufs[buf], i, 1)])?[0][0]))
                }
            };
        }
        if !loss.is_finite() {
            return Err(Error::Numerical(format!(
                "the mini-batch loss is {loss} on {}: the weights or data overflow in float32 \
                 (a learning rate too large?); the float64 reference (--backend cpu) computes in its range",
                self.ctx.info.name
            )));
        }
        Ok(loss)
    }
}

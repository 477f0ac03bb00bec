//! A program is a fixed list of kernel dispatches with their parameters and
//! buffers, materialised once into bind groups over one uniform buffer, so
//! that running it is a single compute pass with no host work in between.

use crate::error::Result;
use crate::gpu::context::{GpuBuffer, GpuContext, Pipeline};
use crate::gpu::kernels::{Binding, Consts, Kernel, KernelParams, Params, WINDOW_FLOATS};
use std::rc::Rc;

pub use crate::dispatch::step::{check_params, Grid, Step};

/// A binding of `buf` as `kind`: whole for storage, a window from `window`
/// floats for uniform windows.
fn bind(buf: &GpuBuffer, kind: Binding, window: usize) -> wgpu::BindingResource<'_> {
    match kind {
        Binding::Window => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &buf.buffer,
            offset: (window * 4) as u64,
            size: std::num::NonZeroU64::new((WINDOW_FLOATS * 4) as u64),
        }),
        _ => buf.buffer.as_entire_binding(),
    }
}

pub struct Compiled {
    _uniforms: Option<wgpu::Buffer>,
    steps: Vec<(Rc<Pipeline>, wgpu::BindGroup, (u32, u32))>,
    kernels: Vec<Kernel>,
}

/// Folds a launch of `g` workgroups into x·y ≤ the per-dimension limit; the
/// kernels rebuild the flat index from `num_workgroups` and bound-check it.
pub fn fold_grid(g: usize, max_dim: u32) -> Result<(u32, u32)> {
    let max = max_dim as usize;
    if g <= max {
        return Ok((g.max(1) as u32, 1));
    }
    let y = g.div_ceil(max);
    if y > max {
        return Err(crate::Error::Gpu(format!(
            "{g} workgroups exceed the device's {max}² grid"
        )));
    }
    Ok((max as u32, y as u32))
}

impl Compiled {
    pub fn build(
        ctx: &GpuContext,
        label: &str,
        steps: &[Step],
        arena: &[GpuBuffer],
    ) -> Result<Compiled> {
        if steps.is_empty() {
            return Ok(Compiled {
                _uniforms: None,
                steps: vec![],
                kernels: vec![],
            });
        }
        let align = (ctx.limits.min_uniform_buffer_offset_alignment as usize).max(64);
        let mut bytes = vec![0u8; steps.len() * align];
        for (i, s) in steps.iter().enumerate() {
            bytes[i * align..i * align + 64].copy_from_slice(bytemuck::cast_slice(&s.params));
        }
        let uniforms = ctx.uniform(&format!("{label} parameters"), &bytes)?;
        let mut out = Vec::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            let pipeline = ctx.pipeline(s.kernel, s.consts)?;
            debug_assert_eq!(s.buffers.len(), s.kernel.bindings().len(), "{:?}", s.kernel);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &uniforms,
                    offset: (i * align) as u64,
                    size: std::num::NonZeroU64::new(64),
                }),
            }];
            for (j, (&b, &kind)) in s.buffers.iter().zip(s.kernel.bindings()).enumerate() {
                if kind == Binding::Window && arena[b].len < s.window + WINDOW_FLOATS {
                    return Err(crate::Error::Gpu(format!(
                        "{label}: {:?} reads a window of `{}` past its end",
                        s.kernel, arena[b].name
                    )));
                }
                entries.push(wgpu::BindGroupEntry {
                    binding: j as u32 + 1,
                    resource: bind(&arena[b], kind, s.window),
                });
            }
            let bg = ctx.scoped(&format!("{label}: binding {:?}", s.kernel), || {
                ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(s.kernel.entry()),
                    layout: &pipeline.layout,
                    entries: &entries,
                })
            })?;
            let grid = fold_grid(
                s.grid.groups(),
                ctx.limits.max_compute_workgroups_per_dimension,
            )?;
            out.push((pipeline, bg, grid));
        }
        Ok(Compiled {
            _uniforms: Some(uniforms),
            steps: out,
            kernels: steps.iter().map(|s| s.kernel).collect(),
        })
    }

    pub fn record(&self, enc: &mut wgpu::CommandEncoder) {
        self.record_block(enc, 1)
    }

    /// Records the program for `tangents` tangents of a block product: each
    /// step's grid repeated along z, the tangent index of its kernels
    /// (shaders/tangents.wgsl).
    pub fn record_block(&self, enc: &mut wgpu::CommandEncoder, tangents: u32) {
        if self.steps.is_empty() {
            return;
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        for (p, bg, (x, y)) in &self.steps {
            pass.set_pipeline(&p.pipeline);
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(*x, *y, tangents);
        }
    }

    /// Runs each step in its own submission and returns its wall time:
    /// a per-kernel profile (host-timed, so it includes submit latency).
    pub fn profile(&self, ctx: &GpuContext) -> Result<Vec<(Kernel, f64)>> {
        let mut out = vec![];
        for (k, (p, bg, (x, y))) in self.kernels.iter().zip(&self.steps) {
            let t = std::time::Instant::now();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&p.pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(*x, *y, 1);
            }
            ctx.queue.submit([enc.finish()]);
            ctx.wait()?;
            out.push((*k, t.elapsed().as_secs_f64()));
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Runs one kernel once on the given buffers and waits: for kernel tests
/// and benchmarks, not for the engine's hot path. Uniform windows are bound
/// at offset 0.
pub fn dispatch_once<P: KernelParams>(
    ctx: &GpuContext,
    kernel: Kernel,
    consts: Consts,
    params: &P,
    buffers: &[&GpuBuffer],
    grid: Grid,
) -> Result<()> {
    check_params::<P>(kernel, &consts);
    dispatch(ctx, kernel, consts, &params.block(), buffers, grid, false).map(|_| ())
}

/// As `dispatch_once`, returning the kernel's GPU time from timestamp
/// queries written at the start and end of its pass where the adapter has
/// them (`None` otherwise; callers then time on the host).
pub fn dispatch_timed<P: KernelParams>(
    ctx: &GpuContext,
    kernel: Kernel,
    consts: Consts,
    params: &P,
    buffers: &[&GpuBuffer],
    grid: Grid,
) -> Result<Option<f64>> {
    check_params::<P>(kernel, &consts);
    dispatch(ctx, kernel, consts, &params.block(), buffers, grid, true)
}

fn dispatch(
    ctx: &GpuContext,
    kernel: Kernel,
    consts: Consts,
    params: &Params,
    buffers: &[&GpuBuffer],
    grid: Grid,
    timed: bool,
) -> Result<Option<f64>> {
    if buffers.len() != kernel.bindings().len() {
        return Err(crate::Error::Gpu(format!(
            "{:?} takes {} storage buffers, {} given",
            kernel,
            kernel.bindings().len(),
            buffers.len()
        )));
    }
    let pipeline = ctx.pipeline(kernel, consts)?;
    let uniforms = ctx.uniform("kernel parameters", bytemuck::cast_slice(params))?;
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: uniforms.as_entire_binding(),
    }];
    for (j, (b, &kind)) in buffers.iter().zip(kernel.bindings()).enumerate() {
        if kind == Binding::Window && b.len < WINDOW_FLOATS {
            return Err(crate::Error::Gpu(format!(
                "{kernel:?} reads a {WINDOW_FLOATS}-float window of `{}` ({} floats)",
                b.name, b.len
            )));
        }
        entries.push(wgpu::BindGroupEntry {
            binding: j as u32 + 1,
            resource: bind(b, kind, 0),
        });
    }
    let (x, y) = fold_grid(
        grid.groups(),
        ctx.limits.max_compute_workgroups_per_dimension,
    )?;
    let stamps = timed
        && ctx
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY);
    let readback = ctx.scoped(&format!("running {:?}", kernel), || {
        let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry()),
            layout: &pipeline.layout,
            entries: &entries,
        });
        let queries = stamps.then(|| {
            let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (set, resolve, staging)
        });
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: queries.as_ref().map(|(set, _, _)| {
                    wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }
                }),
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
        if let Some((set, resolve, staging)) = &queries {
            enc.resolve_query_set(set, 0..2, resolve, 0);
            enc.copy_buffer_to_buffer(resolve, 0, staging, 0, 16);
        }
        ctx.queue.submit([enc.finish()]);
        queries.map(|q| q.2)
    })?;
    ctx.wait()?;
    let Some(staging) = readback else {
        return Ok(None);
    };
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, move |r| *s2.lock().unwrap() = Some(r));
    ctx.wait()?;
    if !matches!(slot.lock().unwrap().take(), Some(Ok(()))) {
        return Ok(None);
    }
    let view = staging
        .slice(..)
        .get_mapped_range()
        .map_err(|e| crate::Error::Gpu(format!("mapping timestamps: {e}")))?;
    let t: &[u64] = bytemuck::cast_slice(&view[..16]);
    let ticks = t[1].saturating_sub(t[0]) as f64;
    let secs = ticks * ctx.queue.get_timestamp_period() as f64 * 1e-9;
    drop(view);
    staging.unmap();
    Ok((secs > 0.0).then_some(secs))
}

//! A program is a fixed list of kernel dispatches with their parameters and
//! buffers, materialised once into bind groups over one uniform buffer, so
//! that running it is a single compute pass with no host work in between.

use crate::error::Result;
use crate::gpu::context::{GpuBuffer, GpuContext, Pipeline};
use crate::gpu::kernels::{Kernel, Params, WORKGROUP};
use std::rc::Rc;

/// How many workgroups a step launches.
#[derive(Clone, Copy, Debug)]
pub enum Grid {
    /// One thread per element.
    Threads(usize),
    /// One workgroup per item (reductions).
    Groups(usize),
}

impl Grid {
    fn groups(self) -> usize {
        match self {
            Grid::Threads(n) => n.div_ceil(WORKGROUP),
            Grid::Groups(n) => n,
        }
    }
}

pub struct Step {
    pub kernel: Kernel,
    pub params: Params,
    /// Indices into the engine's buffer arena, one per storage binding.
    pub buffers: Vec<usize>,
    pub grid: Grid,
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
            let pipeline = ctx.pipeline(s.kernel)?;
            debug_assert_eq!(s.buffers.len(), s.kernel.bindings().len(), "{:?}", s.kernel);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &uniforms,
                    offset: (i * align) as u64,
                    size: std::num::NonZeroU64::new(64),
                }),
            }];
            for (j, &b) in s.buffers.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: j as u32 + 1,
                    resource: arena[b].buffer.as_entire_binding(),
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
            pass.dispatch_workgroups(*x, *y, 1);
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
/// and benchmarks, not for the engine's hot path.
pub fn dispatch_once(
    ctx: &GpuContext,
    kernel: Kernel,
    params: &Params,
    buffers: &[&GpuBuffer],
    grid: Grid,
) -> Result<()> {
    if buffers.len() != kernel.bindings().len() {
        return Err(crate::Error::Gpu(format!(
            "{:?} takes {} storage buffers, {} given",
            kernel,
            kernel.bindings().len(),
            buffers.len()
        )));
    }
    let pipeline = ctx.pipeline(kernel)?;
    let uniforms = ctx.uniform("kernel parameters", bytemuck::cast_slice(params))?;
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: uniforms.as_entire_binding(),
    }];
    for (j, b) in buffers.iter().enumerate() {
        entries.push(wgpu::BindGroupEntry {
            binding: j as u32 + 1,
            resource: b.buffer.as_entire_binding(),
        });
    }
    let (x, y) = fold_grid(
        grid.groups(),
        ctx.limits.max_compute_workgroups_per_dimension,
    )?;
    ctx.scoped(&format!("running {:?}", kernel), || {
        let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry()),
            layout: &pipeline.layout,
            entries: &entries,
        });
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
        ctx.queue.submit([enc.finish()]);
    })?;
    ctx.wait()
}

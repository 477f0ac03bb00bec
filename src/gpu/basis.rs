//! A Lanczos basis on the GPU (`spectral::lanczos::DeviceBasis`): the
//! vectors in f32 device buffers, the two products of each
//! reorthogonalisation pass (c = Qᵀw and Q·c) by shaders/basis.wgsl with
//! compensated sums. Per pass only w (n floats) goes up and the (sum,
//! error) pairs of c or Q·c (n floats) come back; the O(m·n) reads stay on
//! the device.
//!
//! The vectors are split into chunks of rows, one buffer per chunk holding
//! every vector's rows of it (vector j at j·rows), so that a chunk binds
//! within `max_storage_buffer_binding_size` however long the vectors are.

use crate::error::{Error, Result};
use crate::gpu::context::{GpuBuffer, GpuContext};
use crate::gpu::kernels::{BasisParams, Consts, Kernel, KernelParams, WORKGROUP};
use crate::gpu::program::fold_grid;
use crate::spectral::lanczos::{BasisDevice, DeviceBasis};
use std::rc::Rc;

/// Rows one workgroup of `basis_dots` sums (32 per thread).
pub const SEGMENT_ROWS: usize = 32 * WORKGROUP;

/// Where a GPU engine keeps its Lanczos bases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BasisPlace {
    /// On the device when it is a GPU (not a CPU emulator, whose device is
    /// the host's own cores, where the host's products are faster:
    /// BENCHMARKS.md) and the bases fit in its basis budget; in host
    /// memory otherwise.
    #[default]
    Auto,
    /// In host memory.
    Host,
    /// On the device, refused where the bases do not fit.
    Device,
}

/// A GPU offered for Lanczos bases.
pub struct GpuBasisDevice {
    ctx: Rc<GpuContext>,
    budget: usize,
    required: bool,
    /// Rows per chunk at most (tests force small chunks); None: as many as
    /// the binding limit allows.
    chunk_rows: Option<usize>,
}

impl GpuBasisDevice {
    /// On `ctx`'s device; its bases share `ctx`'s pipelines.
    pub fn new(ctx: Rc<GpuContext>, budget: usize, required: bool) -> GpuBasisDevice {
        GpuBasisDevice {
            ctx,
            budget,
            required,
            chunk_rows: None,
        }
    }

    /// As `new`, with at most `rows` rows per chunk (for tests of the
    /// chunked path on small vectors).
    pub fn with_chunk_rows(mut self, rows: usize) -> GpuBasisDevice {
        self.chunk_rows = Some(rows.max(1));
        self
    }
}

impl BasisDevice for GpuBasisDevice {
    fn budget(&self) -> usize {
        self.budget
    }
    fn required(&self) -> bool {
        self.required
    }
    fn name(&self) -> String {
        format!("{} ({})", self.ctx.info.name, self.ctx.info.backend)
    }
    fn allocate(&self, n: usize, vectors: usize) -> Result<Box<dyn DeviceBasis>> {
        Ok(Box::new(GpuBasis::new(
            self.ctx.clone(),
            n,
            vectors.min(n).max(1),
            self.chunk_rows,
        )?))
    }
}

/// One chunk of rows: every vector's rows `start .. start + rows`.
struct Chunk {
    start: usize,
    rows: usize,
    segments: usize,
    /// capacity × rows: vector j at j·rows.
    basis: GpuBuffer,
    /// The chunk's rows of w, or the coefficients c.
    input: GpuBuffer,
    /// (sum, error) pairs of basis_dots: capacity × segments × 2.
    partials: GpuBuffer,
    /// Q·c's rows.
    combined: GpuBuffer,
}

pub struct GpuBasis {
    ctx: Rc<GpuContext>,
    n: usize,
    capacity: usize,
    len: usize,
    chunks: Vec<Chunk>,
}

impl GpuBasis {
    /// Room for `capacity` vectors of n entries, chunks of at most
    /// `chunk_rows` rows (None: what the binding limit allows).
    pub fn new(
        ctx: Rc<GpuContext>,
        n: usize,
        capacity: usize,
        chunk_rows: Option<usize>,
    ) -> Result<GpuBasis> {
        if n == 0 || capacity == 0 {
            return Err(Error::Invalid {
                what: "device basis",
                msg: format!("{capacity} vectors of {n} entries: nothing to keep"),
            });
        }
        let limit = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size) as usize;
        let fit = limit / 4 / capacity;
        // The coefficients share the input buffer, so a chunk holds at
        // least `capacity` rows of it.
        if fit == 0 || limit / 4 < capacity {
            return Err(Error::DeviceLimit {
                tensor: format!("a Lanczos basis of {capacity} vectors"),
                bytes: (capacity * 4) as u64,
                limit_name: "max_storage_buffer_binding_size",
                limit: limit as u64,
            });
        }
        let per_chunk = fit.min(chunk_rows.unwrap_or(usize::MAX)).max(1);
        let mut chunks = vec![];
        let mut start = 0;
        while start < n {
            let rows = per_chunk.min(n - start);
            let segments = rows.div_ceil(SEGMENT_ROWS);
            let c = chunks.len();
            chunks.push(Chunk {
                start,
                rows,
                segments,
                basis: ctx.storage(&format!("Lanczos basis (chunk {c})"), capacity * rows)?,
                input: ctx.storage(
                    &format!("Lanczos basis input (chunk {c})"),
                    rows.max(capacity),
                )?,
                partials: ctx.storage(
                    &format!("Lanczos basis dots (chunk {c})"),
                    capacity * segments * 2,
                )?,
                combined: ctx.storage(&format!("Lanczos basis combination (chunk {c})"), rows)?,
            });
            start += rows;
        }
        Ok(GpuBasis {
            ctx,
            n,
            capacity,
            len: 0,
            chunks,
        })
    }

    /// Chunks of rows the vectors are split into.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    fn check_len(&self, what: &str, len: usize) -> Result<()> {
        if len != self.n {
            return Err(Error::Numerical(format!(
                "{what} of {len} values for a device basis of {} entries",
                self.n
            )));
        }
        Ok(())
    }

    /// Runs `kernel` once per chunk, `groups(chunk)` workgroups each, on
    /// (basis, input, output(chunk)), in one submission.
    fn run(
        &self,
        kernel: Kernel,
        vectors: usize,
        groups: impl Fn(&Chunk) -> usize,
        output: impl Fn(&Chunk) -> &GpuBuffer,
    ) -> Result<()> {
        let pipeline = self.ctx.pipeline(kernel, Consts::default())?;
        let mut work = vec![];
        for c in &self.chunks {
            let params = BasisParams {
                rows: c.rows as u32,
                stride: c.rows as u32,
                vectors: vectors as u32,
                segments: c.segments as u32,
                seg_rows: SEGMENT_ROWS as u32,
                ..Default::default()
            };
            let uniform = self
                .ctx
                .uniform("basis parameters", bytemuck::cast_slice(&params.block()))?;
            let grid = fold_grid(
                groups(c),
                self.ctx.limits.max_compute_workgroups_per_dimension,
            )?;
            work.push((uniform, grid, c));
        }
        self.ctx.scoped(&format!("running {kernel:?}"), || {
            let groups: Vec<_> = work
                .iter()
                .map(|(uniform, _, c)| {
                    self.ctx
                        .device
                        .create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(kernel.entry()),
                            layout: &pipeline.layout,
                            entries: &[
                                wgpu::BindGroupEntry {
                                    binding: 0,
                                    resource: uniform.as_entire_binding(),
                                },
                                wgpu::BindGroupEntry {
                                    binding: 1,
                                    resource: c.basis.buffer.as_entire_binding(),
                                },
                                wgpu::BindGroupEntry {
                                    binding: 2,
                                    resource: c.input.buffer.as_entire_binding(),
                                },
                                wgpu::BindGroupEntry {
                                    binding: 3,
                                    resource: output(c).buffer.as_entire_binding(),
                                },
                            ],
                        })
                })
                .collect();
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline.pipeline);
                for (bg, (_, (x, y), _)) in groups.iter().zip(&work) {
                    pass.set_bind_group(0, bg, &[]);
                    pass.dispatch_workgroups(*x, *y, 1);
                }
            }
            self.ctx.queue.submit([enc.finish()]);
        })
    }
}

impl DeviceBasis for GpuBasis {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn push(&mut self, q: &[f64]) -> Result<Vec<f64>> {
        self.check_len("a basis vector", q.len())?;
        if self.len >= self.capacity {
            return Err(Error::Numerical(format!(
                "the device basis is full ({} vectors)",
                self.capacity
            )));
        }
        let q32: Vec<f32> = q.iter().map(|&x| x as f32).collect();
        let j = self.len;
        for c in &self.chunks {
            self.ctx
                .write_f32(&c.basis, j * c.rows, &q32[c.start..c.start + c.rows])?;
        }
        self.len += 1;
        Ok(q32.iter().map(|&x| x as f64).collect())
    }

    fn get(&mut self, j: usize) -> Result<Vec<f64>> {
        if j >= self.len {
            return Err(Error::Numerical(format!(
                "basis vector {j} of a device basis of {}",
                self.len
            )));
        }
        let ranges: Vec<_> = self
            .chunks
            .iter()
            .map(|c| (&c.basis, j * c.rows, c.rows))
            .collect();
        let parts = self.ctx.read_f32(&ranges)?;
        Ok(parts.concat().iter().map(|&x| x as f64).collect())
    }

    fn dots(&mut self, w: &[f64]) -> Result<Vec<f64>> {
        self.check_len("a vector to orthogonalise", w.len())?;
        let m = self.len;
        if m == 0 {
            return Ok(vec![]);
        }
        let w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        for c in &self.chunks {
            self.ctx
                .write_f32(&c.input, 0, &w32[c.start..c.start + c.rows])?;
        }
        self.run(Kernel::BasisDots, m, |c| m * c.segments, |c| &c.partials)?;
        let ranges: Vec<_> = self
            .chunks
            .iter()
            .map(|c| (&c.partials, 0, m * c.segments * 2))
            .collect();
        let parts = self.ctx.read_f32(&ranges)?;
        let mut out = vec![0.0f64; m];
        for (c, part) in self.chunks.iter().zip(&parts) {
            for (j, o) in out.iter_mut().enumerate() {
                let pairs = &part[j * c.segments * 2..(j + 1) * c.segments * 2];
                *o += pairs.iter().map(|&x| x as f64).sum::<f64>();
            }
        }
        Ok(out)
    }

    fn combination(&mut self, c: &[f64]) -> Result<Vec<f64>> {
        let k = c.len();
        if k > self.len {
            return Err(Error::Numerical(format!(
                "{k} coefficients for a device basis of {} vectors",
                self.len
            )));
        }
        if k == 0 {
            return Ok(vec![0.0; self.n]);
        }
        let c32: Vec<f32> = c.iter().map(|&x| x as f32).collect();
        for ch in &self.chunks {
            self.ctx.write_f32(&ch.input, 0, &c32)?;
        }
        self.run(
            Kernel::BasisCombine,
            k,
            |ch| ch.rows.div_ceil(WORKGROUP),
            |ch| &ch.combined,
        )?;
        let ranges: Vec<_> = self
            .chunks
            .iter()
            .map(|ch| (&ch.combined, 0, ch.rows))
            .collect();
        let parts = self.ctx.read_f32(&ranges)?;
        Ok(parts.concat().iter().map(|&x| x as f64).collect())
    }
}

//! The wgpu runtime: instance and adapter selection, the device with the
//! adapter's real limits, checked buffer creation, a lazy pipeline
//! registry, one readback path, and GPU errors turned into typed errors.
//! Every wgpu call of the crate lives under `src/gpu/`.

use crate::error::{Error, Result};
use crate::gpu::kernels::{Binding, Consts, Kernel, WINDOW_FLOATS};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// Which wgpu backend to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The first adapter in the order Vulkan, Metal, DX12, GL, preferring
    /// hardware over software rasterisers.
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => wgpu::Backends::all(),
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }
}

/// One adapter as `hesscope devices` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterReport {
    pub index: usize,
    pub backend: String,
    pub name: String,
    /// PCI vendor id (0x10DE NVIDIA, 0x1002 AMD, 0x8086 Intel; 0x10005
    /// Mesa's software rasterisers).
    pub vendor: u32,
    /// PCI device id.
    pub device: u32,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub f64: bool,
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_workgroup_size_x: u32,
    /// Bytes of the adapter's largest device-local memory heap, where the
    /// backend tells (Vulkan); `null` elsewhere. A CPU emulator reports
    /// what its driver chooses (lavapipe: 2 GiB); the budgets use the
    /// host's available memory there instead.
    pub device_memory: Option<u64>,
    /// What the engine's automatic choices are here.
    pub auto: crate::gpu::executor::AutoChoices,
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

fn backend_name(b: wgpu::Backend) -> String {
    match b {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        wgpu::Backend::BrowserWebGpu => "webgpu",
        wgpu::Backend::Noop => "noop",
    }
    .to_string()
}

fn report(index: usize, a: &wgpu::Adapter) -> AdapterReport {
    let info = a.get_info();
    let f = a.features();
    let l = a.limits();
    AdapterReport {
        index,
        backend: backend_name(info.backend),
        name: info.name,
        vendor: info.vendor,
        device: info.device,
        device_type: format!("{:?}", info.device_type),
        driver: info.driver,
        driver_info: info.driver_info,
        f64: f.contains(wgpu::Features::SHADER_F64),
        f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_buffer_size: l.max_buffer_size,
        max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        max_compute_workgroup_size_x: l.max_compute_workgroup_size_x,
        device_memory: device_memory(a),
        auto: crate::gpu::executor::AutoChoices::on(
            &format!("{:?}", info.device_type),
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroup_size_x,
        ),
    }
}

/// The largest device-local heap of a Vulkan adapter (wgpu reports no
/// memory size; its Vulkan backend's physical device does).
#[cfg(not(any(target_vendor = "apple", target_arch = "wasm32")))]
fn device_memory(a: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: the hal adapter is only read (a property query on its
    // physical device) while the guard keeps it alive.
    let hal = unsafe { a.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let props = unsafe {
        hal.shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device())
    };
    let count = (props.memory_heap_count as usize).min(props.memory_heaps.len());
    props.memory_heaps[..count]
        .iter()
        .filter(|h| h.flags.contains(ash::vk::MemoryHeapFlags::DEVICE_LOCAL))
        .map(|h| h.size)
        .max()
        .filter(|&b| b > 0)
}

#[cfg(any(target_vendor = "apple", target_arch = "wasm32"))]
fn device_memory(_: &wgpu::Adapter) -> Option<u64> {
    None
}

/// The adapters of one backend choice, in the order `--adapter N` counts
/// them: hardware first, then software, each in enumeration order.
fn adapters(choice: BackendChoice) -> Vec<wgpu::Adapter> {
    let inst = instance(choice.backends());
    let mut all = pollster::block_on(inst.enumerate_adapters(choice.backends()));
    let rank = |a: &wgpu::Adapter| {
        let info = a.get_info();
        let ty = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other => 3,
            wgpu::DeviceType::Cpu => 4,
        };
        let be = match info.backend {
            wgpu::Backend::Vulkan => 0,
            wgpu::Backend::Metal => 1,
            wgpu::Backend::Dx12 => 2,
            wgpu::Backend::Gl => 3,
            _ => 4,
        };
        (ty, be)
    };
    all.sort_by_key(rank);
    all
}

/// Every adapter of every backend, for `hesscope devices`.
pub fn list_adapters() -> Vec<AdapterReport> {
    let mut out = vec![];
    for choice in [
        BackendChoice::Vulkan,
        BackendChoice::Metal,
        BackendChoice::Dx12,
        BackendChoice::Gl,
    ] {
        for (i, a) in adapters(choice).iter().enumerate() {
            out.push(report(i, a));
        }
    }
    out
}

/// Errors wgpu reports outside any error scope, and device loss: recorded
/// here instead of wgpu's default handler, which panics.
#[derive(Default)]
struct Faults {
    lost: Option<String>,
    uncaptured: Vec<String>,
}

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: AdapterReport,
    pub limits: wgpu::Limits,
    faults: Arc<Mutex<Faults>>,
    pipelines: RefCell<HashMap<(Kernel, Consts), Rc<Pipeline>>>,
}

pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// A storage buffer with the tensor name that errors will use.
pub struct GpuBuffer {
    pub name: String,
    pub buffer: wgpu::Buffer,
    /// Length in 4-byte elements.
    pub len: usize,
}

impl GpuContext {
    pub fn open(choice: BackendChoice, index: usize) -> Result<GpuContext> {
        let list = adapters(choice);
        if list.is_empty() {
            return Err(Error::Gpu(format!(
                "no {choice:?} adapter found (Linux without a GPU: install Mesa's \
                 software drivers, `apt-get install mesa-vulkan-drivers libegl-mesa0`)"
            )));
        }
        let n = list.len();
        let Some(adapter) = list.into_iter().nth(index) else {
            return Err(Error::Invalid {
                what: "adapter index",
                msg: format!("{index} is out of range: the {choice:?} backend has {n} adapter(s); see `hesscope devices`"),
            });
        };
        let info = report(index, &adapter);
        // The adapter's own limits, not wgpu's portable defaults (128 MiB
        // storage bindings would refuse resnet18 at batch 128).
        let limits = adapter.limits();
        let wanted =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let features = adapter.features() & wanted;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("hesscope"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| {
            Error::Gpu(format!(
                "{} ({}): cannot open the device: {e}",
                info.name, info.backend
            ))
        })?;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let f = faults.clone();
        device.set_device_lost_callback(move |reason, msg| {
            f.lock().unwrap().lost = Some(format!("{reason:?}: {msg}"));
        });
        let f = faults.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            f.lock().unwrap().uncaptured.push(e.to_string());
        }));
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            faults,
            pipelines: RefCell::new(HashMap::new()),
        })
    }

    /// Another handle on the same device and queue (buffers of either can
    /// be used by both), with its own pipeline cache: for an engine beside
    /// a trainer. Faults are recorded once, seen by both.
    pub fn share(&self) -> GpuContext {
        GpuContext {
            device: self.device.clone(),
            queue: self.queue.clone(),
            info: self.info.clone(),
            limits: self.limits.clone(),
            faults: self.faults.clone(),
            pipelines: RefCell::new(HashMap::new()),
        }
    }

    /// Turns recorded faults into an error.
    pub fn check(&self) -> Result<()> {
        let mut f = self.faults.lock().unwrap();
        if let Some(l) = &f.lost {
            return Err(Error::DeviceLost(format!(
                "{} ({}): {l}",
                self.info.name, self.info.backend
            )));
        }
        if !f.uncaptured.is_empty() {
            let msg = f.uncaptured.join("; ");
            f.uncaptured.clear();
            return Err(Error::Gpu(msg));
        }
        Ok(())
    }

    /// Runs `body` inside validation and out-of-memory error scopes.
    pub fn scoped<T>(&self, what: &str, body: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = body();
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            return Err(Error::Gpu(format!("{what}: out of device memory: {e}")));
        }
        if let Some(e) = v {
            return Err(Error::Gpu(format!("{what}: {e}")));
        }
        self.check()?;
        Ok(out)
    }

    /// A zeroed storage buffer of `len` f32/u32 elements, refused with an
    /// error naming the tensor when it exceeds the device's limits.
    pub fn storage(&self, name: &str, len: usize) -> Result<GpuBuffer> {
        self.allocate(name, len, wgpu::BufferUsages::empty())
    }

    /// A storage buffer (plus `extra` usages) of `len` elements, checked
    /// against the binding and buffer size limits by the tensor's name.
    fn allocate(&self, name: &str, len: usize, extra: wgpu::BufferUsages) -> Result<GpuBuffer> {
        let bytes = (len.max(1) * 4) as u64;
        for (limit_name, limit) in [
            (
                "max_storage_buffer_binding_size",
                self.limits.max_storage_buffer_binding_size,
            ),
            ("max_buffer_size", self.limits.max_buffer_size),
        ] {
            if bytes > limit {
                return Err(Error::DeviceLimit {
                    tensor: name.to_string(),
                    bytes,
                    limit_name,
                    limit,
                });
            }
        }
        let buffer = self.scoped(&format!("allocating `{name}` ({bytes} bytes)"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC
                    | extra,
                mapped_at_creation: false,
            })
        })?;
        Ok(GpuBuffer {
            name: name.to_string(),
            buffer,
            len,
        })
    }

    /// Whether kernels may read weights through uniform windows of
    /// `WINDOW_FLOATS` floats (every backend allows 64 KiB; this guards
    /// against one that does not).
    /// A CPU emulator (lavapipe, llvmpipe): its threads are busy with one
    /// tangent's work and its "device memory" is the host's.
    pub fn is_cpu_adapter(&self) -> bool {
        self.info.device_type == format!("{:?}", wgpu::DeviceType::Cpu)
    }

    pub fn windows_supported(&self) -> bool {
        self.limits.max_uniform_buffer_binding_size >= (WINDOW_FLOATS * 4) as u64
    }

    /// Floats a uniform window's offset must be a multiple of.
    pub fn window_alignment(&self) -> usize {
        (self.limits.min_uniform_buffer_offset_alignment as usize / 4).max(1)
    }

    /// A parameter-shaped buffer (θ, v) that kernels may also read through
    /// uniform windows: padded by a window so that any window starting
    /// inside it lies inside the buffer.
    pub fn weights(&self, name: &str, len: usize) -> Result<GpuBuffer> {
        let extra = if self.windows_supported() {
            wgpu::BufferUsages::UNIFORM
        } else {
            wgpu::BufferUsages::empty()
        };
        self.allocate(name, len + WINDOW_FLOATS, extra)
    }

    pub fn uniform(&self, name: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        if bytes.len() as u64 > self.limits.max_buffer_size {
            return Err(Error::DeviceLimit {
                tensor: name.to_string(),
                bytes: bytes.len() as u64,
                limit_name: "max_buffer_size",
                limit: self.limits.max_buffer_size,
            });
        }
        let buf = self.scoped(
            &format!("allocating `{name}` ({} bytes)", bytes.len()),
            || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(name),
                    size: bytes.len().max(16) as u64,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            },
        )?;
        self.queue.write_buffer(&buf, 0, bytes);
        Ok(buf)
    }

    pub fn write_f32(&self, buf: &GpuBuffer, offset: usize, data: &[f32]) -> Result<()> {
        if offset + data.len() > buf.len {
            return Err(Error::Gpu(format!(
                "writing {} values at {offset} into `{}` of {}",
                data.len(),
                buf.name,
                buf.len
            )));
        }
        if !data.is_empty() {
            self.queue
                .write_buffer(&buf.buffer, (offset * 4) as u64, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    pub fn write_u32(&self, buf: &GpuBuffer, data: &[u32]) -> Result<()> {
        if data.len() > buf.len {
            return Err(Error::Gpu(format!(
                "writing {} values into `{}`",
                data.len(),
                buf.name
            )));
        }
        self.queue
            .write_buffer(&buf.buffer, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// The compute pipeline of a kernel, compiled on first use.
    pub fn pipeline(&self, k: Kernel, consts: Consts) -> Result<Rc<Pipeline>> {
        if let Some(p) = self.pipelines.borrow().get(&(k, consts)) {
            return Ok(p.clone());
        }
        let (file, src) = k.source();
        let bindings = k.bindings();
        let storage = bindings.iter().filter(|b| **b != Binding::Window).count();
        if storage as u32 > self.limits.max_storage_buffers_per_shader_stage {
            return Err(Error::Gpu(format!(
                "kernel {}::{} binds {} storage buffers; the device allows {}",
                file,
                k.entry(),
                storage,
                self.limits.max_storage_buffers_per_shader_stage
            )));
        }
        let constants = consts.pairs();
        let p = self.scoped(&format!("compiling {file}::{}", k.entry()), || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(file),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                });
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }];
            for (i, b) in bindings.iter().enumerate() {
                let ty = match b {
                    Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Binding::Write => wgpu::BufferBindingType::Storage { read_only: false },
                    Binding::Window => wgpu::BufferBindingType::Uniform,
                };
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: i as u32 + 1,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                });
            }
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(k.entry()),
                    entries: &entries,
                });
            let pl = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(k.entry()),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(k.entry()),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(k.entry()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Every kernel writes the workgroup memory it reads
                        // (conv_tiled.wgsl stages whole slabs, zeros past
                        // the edges; the reductions fill one slot per
                        // thread) before a barrier, so wgpu's zeroing is
                        // dead work, and on GL it is ruinous: naga's GLSL
                        // zeroes each array with a literal of every element,
                        // which llvmpipe took 25–40 s to compile for
                        // conv_tiled's two 1024-float slabs.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            Pipeline { pipeline, layout }
        })?;
        let p = Rc::new(p);
        self.pipelines.borrow_mut().insert((k, consts), p.clone());
        Ok(p)
    }

    /// Waits for the queue; a lost device or a timeout becomes an error.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| {
                self.check().err().unwrap_or_else(|| {
                    Error::DeviceLost(format!("{} ({}): {e}", self.info.name, self.info.backend))
                })
            })?;
        self.check()
    }

    /// Reads `(buffer, offset, len)` ranges back in one staging copy and one map.
    pub fn read_f32(&self, ranges: &[(&GpuBuffer, usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let total: usize = ranges.iter().map(|r| r.2).sum();
        let staging = self.scoped(
            &format!("allocating a readback buffer of {} bytes", total.max(1) * 4),
            || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size: (total.max(1) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            },
        )?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        let mut at = 0u64;
        for (buf, off, len) in ranges {
            if off + len > buf.len {
                return Err(Error::Gpu(format!(
                    "reading {len} values at {off} from `{}` of {}",
                    buf.name, buf.len
                )));
            }
            if *len > 0 {
                enc.copy_buffer_to_buffer(
                    &buf.buffer,
                    (*off * 4) as u64,
                    &staging,
                    at,
                    (*len * 4) as u64,
                );
            }
            at += (*len * 4) as u64;
        }
        self.scoped("reading results back", || {
            self.queue.submit([enc.finish()]);
        })?;
        let slot = Arc::new(Mutex::new(None));
        let s = slot.clone();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            *s.lock().unwrap() = Some(r);
        });
        self.wait()?;
        match slot.lock().unwrap().take() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Gpu(format!("mapping the readback buffer: {e}"))),
            None => return Err(Error::DeviceLost("the readback never completed".into())),
        }
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("mapping the readback buffer: {e}")))?;
        let all: &[f32] = bytemuck::cast_slice(&view[..total * 4]);
        let mut out = vec![];
        let mut at = 0;
        for (_, _, len) in ranges {
            out.push(all[at..at + len].to_vec());
            at += len;
        }
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

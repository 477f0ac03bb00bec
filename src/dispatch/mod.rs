//! GPU work described without wgpu: the kernels and their parameter
//! structs (checked against the WGSL by tests/shaders.rs), steps and
//! their grids, per-channel reductions split in stages, and the plan a
//! layer's unit records its steps into. `layers` (the units) and `gpu`
//! (the walker, the runtime, the engine) both build on it; it depends on
//! neither.

pub mod kernels;
pub mod params;
pub mod plan;
pub mod reduce;
pub mod step;

/// Whether automatic choices treat an adapter of `device_type` (wgpu's
/// `DeviceType`, as `gpu::AdapterReport::device_type` names it) as a GPU:
/// discrete, integrated or virtual; not CPU emulators or unknown ones.
pub fn is_gpu_type(device_type: &str) -> bool {
    matches!(device_type, "DiscreteGpu" | "IntegratedGpu" | "VirtualGpu")
}

//! The GPU executor over wgpu: runtime (context), kernels, programs, engine.

pub mod context;
pub mod engine;
pub mod kernels;
pub mod program;

pub use context::{list_adapters, AdapterReport, BackendChoice, GpuBuffer, GpuContext};
pub use engine::{open, GpuEngine};

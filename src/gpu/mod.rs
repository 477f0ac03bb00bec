//! The GPU executor over wgpu: runtime (context), kernels, programs, engine.

pub mod basis;
pub mod context;
pub mod executor;
pub mod kernels;
pub mod memory;
pub mod params;
pub mod plan;
pub mod program;
pub mod reduce;
pub mod trainer;

pub use basis::BasisPlace;
pub use context::{list_adapters, AdapterReport, BackendChoice, GpuBuffer, GpuContext};
pub use executor::{open, open_with, EngineOptions, GpuEngine};
pub use reduce::ReducePath;

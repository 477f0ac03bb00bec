//! The GPU executor over wgpu: runtime (context), kernels, programs, engine.

pub mod basis;
pub mod context;
pub mod executor;
pub mod memory;
pub mod plan;
pub mod program;
pub mod trainer;

// Moved to `crate::dispatch` (wgpu-free, below `layers`); the old paths stay.
pub use crate::dispatch::{kernels, params, reduce};

pub use basis::BasisPlace;
pub use context::{list_adapters, AdapterReport, BackendChoice, GpuBuffer, GpuContext};
pub use executor::{open, open_with, EngineOptions, GpuEngine};
pub use reduce::ReducePath;

//! hesscope: exact Hessian eigenvalue densities of CNNs on any GPU.
//!
//! Data flows model + data -> passes (forward, backward, R-forward,
//! R-backward) run by the float64 CPU reference or the GPU executor ->
//! the operator v -> Hv -> spectral solvers -> reports.

pub mod bench;
pub mod error;
pub mod gpu;
pub mod host;
pub mod spectral;

pub use error::{Error, Result};
pub mod cpu;
pub mod data;
pub mod decisions;
pub mod device;
pub mod dispatch;
pub mod engine;
pub mod layers;
pub mod model;
pub mod multi;
pub mod operator;
pub mod ops;
pub mod report;
pub mod selftest;
pub mod snapshot;
pub mod trace_grad;
pub mod train;

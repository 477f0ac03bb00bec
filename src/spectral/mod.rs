//! Solvers over a symmetric operator: Lanczos, tridiagonal eigenproblems,
//! stochastic Lanczos quadrature, Ritz pairs, trace estimators, layerwise
//! blocks, dense spectra, plots.

pub mod bands;
pub mod compensated;
pub mod deflate;
pub mod eigs;
pub mod exact;
pub mod heatmap;
pub mod lanczos;
pub mod layers;
pub mod operator;
pub mod plot;
pub mod shard;
pub mod slq;
pub mod trace;
pub mod tridiagonal;

pub use operator::{DenseOperator, DiagonalOperator, SymOperator};

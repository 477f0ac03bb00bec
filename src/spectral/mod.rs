//! Solvers over a symmetric operator: Lanczos, tridiagonal eigenproblems,
//! stochastic Lanczos quadrature, Ritz pairs, trace estimators, dense spectra.

pub mod operator;

pub use operator::{DenseOperator, DiagonalOperator, SymOperator};

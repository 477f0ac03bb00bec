//! Which GEMM the float64 reference's convolutions use, by measurement:
//! faer's `matmul` (sequential) against the `gemm` crate (sequential) on
//! the per-sample products of resnet20's convolutions (row-major, as
//! `ops::gemm` calls them), GFLOP/s per shape.
//!
//!   cargo run --release --example gemm_choice

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use std::time::Instant;

fn faer_mm(m: usize, n: usize, k: usize, a: &[f64], b: &[f64], c: &mut [f64]) {
    let a = MatRef::from_row_major_slice(a, m, k);
    let b = MatRef::from_row_major_slice(b, k, n);
    let c = MatMut::from_row_major_slice_mut(c, m, n);
    matmul(c, Accum::Add, a, b, 1.0, Par::Seq);
}

fn gemm_mm(m: usize, n: usize, k: usize, a: &[f64], b: &[f64], c: &mut [f64]) {
    // Row-major: column stride 1, row stride = columns.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn time(f: &mut dyn FnMut(), flops: f64) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let mut reps = 0;
        while t.elapsed().as_secs_f64() < 0.05 {
            f();
            reps += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    flops / best / 1e9
}

fn main() {
    // (what, m, n, k): forward W·col, data Wᵀ·gy, weight gy·colᵀ per sample.
    let shapes = [
        ("fwd 16x144 · 144x1024", 16, 1024, 144),
        ("fwd 32x288 · 288x256", 32, 256, 288),
        ("fwd 64x576 · 576x64", 64, 64, 576),
        ("data 144x16 · 16x1024", 144, 1024, 16),
        ("data 576x64 · 64x64", 576, 64, 64),
        ("weight 16x1024 · 1024x144", 16, 144, 1024),
        ("weight 64x64 · 64x576", 64, 576, 64),
    ];
    println!("| shape | faer matmul GFLOP/s | gemm 0.19 GFLOP/s |");
    println!("|---|---|---|");
    for (what, m, n, k) in shapes {
        let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 * 0.1).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i % 5) as f64 * 0.1).collect();
        let mut c = vec![0.0; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let f = time(&mut || faer_mm(m, n, k, &a, &b, &mut c), flops);
        let g = time(&mut || gemm_mm(m, n, k, &a, &b, &mut c), flops);
        println!("| {what} | {f:.1} | {g:.1} |");
    }
}

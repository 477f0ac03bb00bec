//! What the host side of Lanczos costs per step, apart from the products:
//! SLQ over a diagonal operator (a product costs one pass over n entries,
//! nothing next to the reorthogonalisation) at a model's parameter count:
//! cargo run --release --example lanczos_host_cost -- N STEPS [RUNS [BLOCK]]
//! e.g. 272474 (resnet20) or 11689512 (resnet18). The seconds per step are
//! what every step of `density` adds to its products on this host.
use hesscope::spectral::lanczos::{BasisBudget, BasisPrecision};
use hesscope::spectral::slq::slq_block;
use hesscope::spectral::DiagonalOperator;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| -> anyhow::Result<usize> {
        Ok(a.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let (n, steps, runs) = (arg(1, 272_474)?, arg(2, 90)?, arg(3, 1)?);
    let block = arg(4, 1)?;
    let d: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0)
        .collect();
    let budget = BasisBudget::host_default();
    let precision = BasisPrecision::for_bases(n, steps, block, budget)?;
    let t = std::time::Instant::now();
    slq_block(&mut DiagonalOperator { d }, steps, runs, 0, block, budget)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "n {n}, {steps} steps × {runs} runs (block {block}), {precision:?} basis, {} threads: \
         {s:.2} s, {:.4} s per step",
        rayon::current_num_threads(),
        s / (steps * runs) as f64
    );
    Ok(())
}

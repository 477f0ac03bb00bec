//! What Lanczos costs per step apart from the products: SLQ over a
//! diagonal operator (a product costs one pass over n entries, nothing
//! next to the reorthogonalisation) at a model's parameter count, with the
//! basis on the host or on a GPU backend's device:
//! cargo run --release --example lanczos_host_cost -- N STEPS [RUNS [BLOCK [host|vulkan|gl|auto]]]
//! e.g. 272474 (resnet20) or 11689512 (resnet18). The seconds per step are
//! what every step of `density` adds to its products.
use hesscope::gpu::basis::GpuBasisDevice;
use hesscope::gpu::executor::device_basis_budget;
use hesscope::gpu::{BackendChoice, GpuContext};
use hesscope::spectral::lanczos::{BasisBudget, BasisDevice};
use hesscope::spectral::slq::{basis_plan, slq_block};
use hesscope::spectral::{DiagonalOperator, SymOperator};
use std::rc::Rc;

/// The diagonal, offering `device` for its bases.
struct OnDevice {
    op: DiagonalOperator,
    device: Option<Rc<dyn BasisDevice>>,
}

impl SymOperator for OnDevice {
    fn dim(&self) -> usize {
        self.op.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
        self.op.apply(v, out)
    }
    fn basis_device(&self) -> Option<Rc<dyn BasisDevice>> {
        self.device.clone()
    }
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| -> anyhow::Result<usize> {
        Ok(a.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let (n, steps, runs) = (arg(1, 272_474)?, arg(2, 90)?, arg(3, 1)?);
    let block = arg(4, 1)?;
    let place = a.get(5).map_or("host", |s| s.as_str());
    let device: Option<Rc<dyn BasisDevice>> = match place {
        "host" => None,
        other => {
            let choice = match other {
                "vulkan" => BackendChoice::Vulkan,
                "gl" => BackendChoice::Gl,
                "auto" => BackendChoice::Auto,
                _ => anyhow::bail!("the place is host, vulkan, gl or auto, not {other}"),
            };
            let ctx = GpuContext::open(choice, 0)?;
            let budget = device_basis_budget(ctx.info.device_memory);
            Some(Rc::new(GpuBasisDevice::new(Rc::new(ctx), budget, true)))
        }
    };
    let d: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0)
        .collect();
    let mut op = OnDevice {
        op: DiagonalOperator { d },
        device,
    };
    let budget = BasisBudget::host_default();
    let plan = basis_plan(&op, steps, runs, block, budget)?;
    let t = std::time::Instant::now();
    slq_block(&mut op, steps, runs, 0, block, budget)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "n {n}, {steps} steps × {runs} runs (block {block}), basis in {}, {} host threads: \
         {s:.2} s, {:.4} s per step",
        plan.describe(),
        rayon::current_num_threads(),
        s / (steps * runs) as f64
    );
    // The same as one JSON line, for benches/device_run.sh.
    println!(
        "{}",
        serde_json::json!({
            "n": n, "steps": steps, "runs": runs, "block": block,
            "basis": plan.describe(), "seconds": s,
            "seconds_per_step": s / (steps * runs) as f64,
        })
    );
    Ok(())
}

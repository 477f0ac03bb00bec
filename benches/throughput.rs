//! Kernel throughput and end-to-end gradient / HVP times on the first GPU
//! adapter, beside the float64 CPU reference:
//!
//!   cargo bench --bench throughput -- [MODEL ...] [--batch B] [--reps R]
//!
//! (default: resnet20 at batch 32). The same table is `hesscope bench`.

use hesscope::bench::{end_to_end, kernel_table};
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Problem};
use hesscope::gpu::{BackendChoice, GpuContext, GpuEngine};
use hesscope::model::{Model, Weights};

fn main() -> anyhow::Result<()> {
    let mut models = vec![];
    let mut batch = 32;
    let mut reps = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => batch = args.next().unwrap().parse()?,
            "--reps" => reps = args.next().unwrap().parse()?,
            "--bench" => {}
            m if !m.starts_with('-') => models.push(m.to_string()),
            _ => {}
        }
    }
    if models.is_empty() {
        models.push("resnet20".into());
    }
    for name in models {
        let model = Model::load(&name)?;
        let weights = Weights::init(&model, 0);
        let data = hesscope::data::synthetic(model.input, model.classes, batch, 0);
        let problem = Problem::new(model.clone(), weights, data, batch, BnMode::Batch)?;
        let ctx = GpuContext::open(BackendChoice::Auto, 0)?;
        let adapter = format!("{} ({})", ctx.info.name, ctx.info.backend);
        let mut gpu = GpuEngine::new(ctx, &problem)?;
        let g = end_to_end(&mut gpu, reps)?;
        let mut cpu = CpuReference::new(problem);
        let c = end_to_end(&mut cpu, 1)?;
        println!("{name}, batch {batch}, bn batch, on {adapter}");
        println!(
            "  GPU f32: gradient {:.4} s, HVP {:.4} s, HVP/gradient {:.2}",
            g.grad_seconds, g.hvp_seconds, g.hvp_over_grad
        );
        println!(
            "  GPU Lanczos step at a {}-vector basis: {:.4} s (HVP + compensated reorthogonalisation)",
            g.lanczos_basis, g.lanczos_step_seconds
        );
        println!(
            "  CPU f64 reference: gradient {:.4} s, HVP {:.4} s, HVP/gradient {:.2}",
            c.grad_seconds, c.hvp_seconds, c.hvp_over_grad
        );
        drop(gpu);
        let ctx = GpuContext::open(BackendChoice::Auto, 0)?;
        let rows = kernel_table(&ctx, &model, batch, reps)?;
        print!("{}", hesscope::bench::format_kernel_table(&rows));
    }
    Ok(())
}

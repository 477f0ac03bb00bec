//! Per-kernel wall times of one batch on a GPU backend:
//! cargo run --release --example profile -- MODEL BATCH [vulkan|gl] [batch|running]
use hesscope::engine::{BnMode, Problem};
use hesscope::gpu::{BackendChoice, GpuContext, GpuEngine};
use hesscope::model::{Model, Weights};
use std::collections::BTreeMap;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let model = Model::load(a.get(1).map(|s| s.as_str()).unwrap_or("resnet20"))?;
    let batch: usize = a.get(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let choice = match a.get(3).map(|s| s.as_str()) {
        Some("gl") => BackendChoice::Gl,
        _ => BackendChoice::Vulkan,
    };
    let bn = match a.get(4).map(|s| s.as_str()) {
        Some("running") => BnMode::Running,
        _ => BnMode::Batch,
    };
    let weights = Weights::init(&model, 0);
    let data = hesscope::data::synthetic(model.input, model.classes, batch, 0);
    let problem = Problem::new(model, weights, data, batch, bn)?;
    let mut e = GpuEngine::new(GpuContext::open(choice, 0)?, &problem)?;
    e.profile()?; // compile and warm up
    let (fb, r) = e.profile()?;
    for (name, prof) in [("forward+backward", fb), ("R-pass", r)] {
        let mut by: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        let total: f64 = prof.iter().map(|p| p.1).sum();
        for (k, t) in prof {
            let e = by.entry(format!("{k:?}")).or_default();
            e.0 += 1;
            e.1 += t;
        }
        println!("{name}: {total:.3} s");
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by(|a, b| b.1 .1.partial_cmp(&a.1 .1).unwrap());
        for (k, (n, t)) in v {
            println!("  {k:<22} {n:>4} dispatches {t:>8.3} s");
        }
    }
    Ok(())
}

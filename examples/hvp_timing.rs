//! Wall and process CPU time of one cached Hessian-vector product, best of
//! five blocks of ten (the noise on a shared machine is ±30 %):
//! cargo run --release --example hvp_timing -- MODEL SAMPLES BATCH [vulkan|gl]
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::{BackendChoice, GpuContext, GpuEngine};
use hesscope::model::{Model, Weights};

/// User + system CPU seconds of this process so far (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let model = Model::load(a.get(1).map(|s| s.as_str()).unwrap_or("cnn-tiny"))?;
    let samples: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let batch: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let choice = match a.get(4).map(|s| s.as_str()) {
        Some("gl") => BackendChoice::Gl,
        _ => BackendChoice::Vulkan,
    };
    let weights = Weights::init(&model, 0);
    let data = hesscope::data::synthetic(model.input, model.classes, samples, 0);
    let problem = Problem::new(model, weights, data, batch, BnMode::Batch)?;
    let mut e = GpuEngine::new(GpuContext::open(choice, 0)?, &problem)?;
    let n = e.n_params();
    let v: Vec<f64> = (0..n).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
    let mut out = vec![0.0; n];
    e.hvp(&v, &mut out)?;
    let mut best = f64::MAX;
    let c0 = cpu_seconds();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        for _ in 0..10 {
            e.hvp(&v, &mut out)?;
        }
        best = best.min(t.elapsed().as_secs_f64() / 10.0);
    }
    println!(
        "{samples} samples, batch {batch}: HVP best {:.2} ms wall, mean {:.2} ms CPU",
        best * 1e3,
        (cpu_seconds() - c0) / 50.0 * 1e3
    );
    Ok(())
}

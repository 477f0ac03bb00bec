//! GPU gradient and Hv against PyTorch float64 on folders made by a
//! fixture's `make.py SEED` (torchvision's ResNet-18 cut after layer2.0),
//! with decisions taken as float64 does (the default) and as float32 does,
//! on every GPU backend here; one JSON line per (folder, backend, BN mode,
//! decision source), beside PyTorch float32's own error from its meta.json.
//!
//! cargo run --release --example decisions_seeds -- ARCH DIR...
//! (batch-mode BN; RUNNING=1 adds running statistics)

use hesscope::data::Dataset;
use hesscope::decisions::DecisionSource;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::{BackendChoice, EngineOptions, GpuContext, GpuEngine};
use hesscope::model::{params, Model, Weights};
use std::path::Path;
use std::time::Instant;

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((arch, dirs)) = args.split_first() else {
        return Err("usage: decisions_seeds ARCH DIR...".into());
    };
    let model = Model::load(arch)?;
    let backends: Vec<(BackendChoice, GpuContext)> = [BackendChoice::Vulkan, BackendChoice::Gl]
        .into_iter()
        .filter_map(|c| GpuContext::open(c, 0).ok().map(|ctx| (c, ctx)))
        .collect();
    for dir in dirs {
        let dir = Path::new(dir);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
        let v = params::load_vector(&model, &dir.join("v.safetensors"))?;
        let modes: &[(BnMode, &str)] = if std::env::var("RUNNING").is_ok_and(|v| v == "1") {
            &[(BnMode::Batch, "batch"), (BnMode::Running, "running")]
        } else {
            &[(BnMode::Batch, "batch")]
        };
        for &(bn, sub) in modes {
            let weights = Weights::load(&model, &dir.join("weights.safetensors"))?;
            let data = Dataset::load(&dir.join("data.safetensors"))?;
            let batch = meta["batch"].as_u64().unwrap_or(8) as usize;
            let problem = Problem::new(model.clone(), weights, data, batch, bn)?;
            let rd = dir.join(format!("ref-{sub}"));
            let g_ref = params::load_vector(&model, &rd.join("grad.safetensors"))?;
            let hv_ref = params::load_vector(&model, &rd.join("hv.safetensors"))?;
            for (choice, ctx) in &backends {
                for source in [DecisionSource::Float64, DecisionSource::Float32] {
                    let options = EngineOptions {
                        decisions: source,
                        ..Default::default()
                    };
                    let mut e = GpuEngine::with_options(ctx.share(), &problem, options)?;
                    let t = Instant::now();
                    let (_, g, hv) = e.loss_grad_hvp(&v)?;
                    let first = t.elapsed().as_secs_f64();
                    let report = e.decision_report()?;
                    let line = serde_json::json!({
                        "dir": dir.display().to_string(),
                        "backend": format!("{choice:?}"),
                        "bn": sub,
                        "decisions": source,
                        "grad": rel(&g, &g_ref),
                        "hv": rel(&hv, &hv_ref),
                        "pytorch_float32": meta["pytorch_float32_rel_error"][sub],
                        "near": report.as_ref().map(|r| r.near),
                        "flipped": report.as_ref().and_then(|r| r.flipped),
                        "first_product_seconds": first,
                    });
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}

//! How far a GPU's float32 forward pass lands from float64 at the inputs
//! of the nodes that decide (ReLU/LeakyReLU, max pool), in units of each
//! node's input root mean square: the scale behind
//! `hesscope::decisions::NEAR_BAND`. Per folder (a fixture's `make.py
//! SEED` output) and backend, batch-mode BN, one JSON line: the largest
//! error over nodes and elements where the float32 pass took the same
//! decisions as float64 everywhere upstream (a flip upstream is not
//! rounding), and the decisions float32 flipped.
//!
//! cargo run --release --example decision_margins -- ARCH DIR...

use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Problem};
use hesscope::gpu::{BackendChoice, GpuContext, GpuEngine};
use hesscope::model::{Model, Weights};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((arch, dirs)) = args.split_first() else {
        return Err("usage: decision_margins ARCH DIR...".into());
    };
    let model = Model::load(arch)?;
    for dir in dirs {
        let dir = Path::new(dir);
        let weights = Weights::load(&model, &dir.join("weights.safetensors"))?;
        let data = Dataset::load(&dir.join("data.safetensors"))?;
        let n = data.len();
        let problem = Problem::new(model.clone(), weights, data, n, BnMode::Batch)?;
        let cpu = CpuReference::new(problem.clone());
        let vals = cpu.values(0, n);
        for choice in [BackendChoice::Vulkan, BackendChoice::Gl] {
            let Ok(ctx) = GpuContext::open(choice, 0) else {
                continue;
            };
            let mut e = GpuEngine::new(ctx, &problem)?;
            let inputs = e.float32_piecewise_inputs(0)?;
            let mut worst = 0.0f64;
            let mut worst_layer = String::new();
            let mut flips = 0usize;
            for (ni, x32) in &inputs {
                let x64 = &vals[model.nodes[*ni].inputs[0]];
                let rms = (x64.iter().map(|v| v * v).sum::<f64>() / x64.len() as f64).sqrt();
                // Upstream of the first flip the errors are rounding.
                if flips > 0 {
                    break;
                }
                for (a, b) in x32.iter().zip(x64) {
                    let err = (*a as f64 - b).abs() / rms;
                    if err > worst {
                        worst = err;
                        worst_layer = hesscope::decisions::label(&model, *ni);
                    }
                }
                flips += x32
                    .iter()
                    .zip(x64)
                    .filter(|(a, b)| (**a > 0.0) != (**b > 0.0))
                    .count();
            }
            println!(
                "{}",
                serde_json::json!({
                    "dir": dir.display().to_string(),
                    "backend": format!("{choice:?}"),
                    "worst_error_over_rms": worst,
                    "at": worst_layer,
                    "relu_sign_flips_at_first_flipping_node": flips,
                })
            );
        }
    }
    Ok(())
}

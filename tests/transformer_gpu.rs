//! The transformer fixtures (`../shared/fixtures/tv-vit-tiny`,
//! `hf-gpt2-tiny`: PyTorch float64 loss, gradient and Hv from the
//! libraries' own code) on the GPU engine, Vulkan (lavapipe) and GL
//! (llvmpipe), running `tests/data/vit-tiny.arch` and `gpt2-tiny.arch`.
//!
//! Tolerance, per fixture: max(1e-5, 10× PyTorch float32's own relative
//! error against its float64 pass on the same fixture), the bound issue 25
//! sets. meta.json records that error (`pytorch_float32_rel_error`);
//! `python/tests/transformer_f32_error.py` measures it again with torch
//! 2.15 (vit-tiny: loss 1.1e-7, gradient 9.1e-7, Hv 8.1e-7, meta.json 8.8e-7
//! and 8.7e-7; gpt2-tiny: gradient 2.7e-7, Hv 3.5e-7, meta.json 3.0e-7 and
//! 3.8e-7; its loss is float32 either way), so the bound is 1e-5 for both.
//! Measured here on lavapipe and llvmpipe: vit-tiny gradient 8.2e-7–8.7e-7,
//! Hv 9.4e-7–9.7e-7; gpt2-tiny gradient 2.8e-7–2.9e-7, Hv 4.8e-7–4.9e-7:
//! PyTorch float32's own level. GPT-2's refs carry the float32 rounding of the logits in
//! Hugging Face's loss (9.1e-8 relative, tests/transformer_fixtures.rs),
//! two orders below it.

mod common;

use common::{fixtures_dir, gpu_contexts, rel_err};
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::GpuEngine;
use hesscope::model::{params, Model, Weights};
use std::path::PathBuf;

fn arch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/{name}.arch"))
}

fn check(fixture: &str, arch_name: &str) {
    let dir = fixtures_dir().join(fixture);
    let meta = common::json(dir.join("meta.json"));
    let f32_err = ["grad", "hv"]
        .iter()
        .map(|k| meta["pytorch_float32_rel_error"][k].as_f64().unwrap())
        .fold(0.0f64, f64::max);
    let tol = f64::max(1e-5, 10.0 * f32_err);
    let model = Model::load(arch(arch_name).to_str().unwrap()).unwrap();
    let weights = Weights::load(&model, &dir.join("weights.safetensors")).unwrap();
    let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
    let n = data.len();
    let v = params::load_vector(&model, &dir.join("v.safetensors")).unwrap();
    let grad_ref = params::load_vector(&model, &dir.join("ref/grad.safetensors")).unwrap();
    let hv_ref = params::load_vector(&model, &dir.join("ref/hv.safetensors")).unwrap();
    let loss_file =
        hesscope::model::tensorio::File::open(&dir.join("ref/loss.safetensors")).unwrap();
    let loss_ref = loss_file.tensor("loss").unwrap().data[0];
    for (backend, ctx) in gpu_contexts() {
        // The whole data set in one batch, and in batches of 3.
        for batch in [n, 3] {
            let problem = Problem::new(
                model.clone(),
                weights.clone(),
                data.clone(),
                batch,
                BnMode::Running,
            )
            .unwrap();
            let t = std::time::Instant::now();
            let mut e = GpuEngine::new(ctx.share(), &problem).unwrap();
            let (l, g, hv) = e.loss_grad_hvp(&v).unwrap();
            let secs = t.elapsed().as_secs_f64();
            let (el, eg, eh) = (
                (l - loss_ref).abs() / loss_ref.abs(),
                rel_err(&g, &grad_ref),
                rel_err(&hv, &hv_ref),
            );
            println!(
                "{fixture} on {backend}, batch {batch}: loss {el:.2e}, grad {eg:.2e}, \
                 hv {eh:.2e} (bound {tol:.1e}; PyTorch f32 {f32_err:.1e}); {secs:.2} s"
            );
            assert!(
                el < tol && eg < tol && eh < tol,
                "{fixture} on {backend}, batch {batch}: loss {el:e}, gradient {eg:e}, Hv {eh:e}"
            );
        }
    }
}

#[test]
fn vit_tiny_matches_pytorch_float64_on_the_gpu() {
    check("tv-vit-tiny", "vit-tiny");
}

#[test]
fn gpt2_tiny_matches_pytorch_float64_on_the_gpu() {
    check("hf-gpt2-tiny", "gpt2-tiny");
}

/// `density` and `eigs` on vit-tiny with the Vulkan backend, end to end.
#[test]
fn vit_tiny_density_and_eigs_run_on_vulkan() {
    let dir = fixtures_dir().join("tv-vit-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let a = arch("vit-tiny");
    let (w, d) = (
        dir.join("weights.safetensors"),
        dir.join("data.safetensors"),
    );
    for cmd in [
        vec!["density", "--steps", "6", "--runs", "1"],
        vec!["eigs", "--top", "1", "--steps", "6"],
    ] {
        let out = tmp.path().join(format!("{}.json", cmd[0]));
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                "--model",
                a.to_str().unwrap(),
                "--weights",
                w.to_str().unwrap(),
                "--data",
                d.to_str().unwrap(),
                "--backend",
                "vulkan",
                "--samples",
                "4",
                "--bn",
                "running",
                "--out",
                out.to_str().unwrap(),
            ]
            .map(String::from),
        );
        let (ok, stdout, stderr) = common::hesscope(&args);
        assert!(ok, "{cmd:?}: {stdout}{stderr}");
        println!("{cmd:?}: {}", stdout.lines().last().unwrap_or(""));
    }
}

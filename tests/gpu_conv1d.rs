//! Hugging Face's Conv1D (`conv1d NAME DOUT`: y = x·W + b, weight
//! [DIN, DOUT]) on the GPU: the direct conv kernels (conv_direct.wgsl)
//! with the weight read transposed (`WT`), over samples · tokens rows —
//! forward, R-forward, backward (dW in [DIN, DOUT]) and R-backward — in
//! whole networks against the float64 reference, on Vulkan (lavapipe) and
//! GL (llvmpipe).

mod common;

use common::{gpu_contexts, rel_err};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::GpuEngine;
use hesscope::model::{arch, Weights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Gradient and Hv (single and as a block of 3 tangents, which runs the
/// kernels on tangent slices) of GPT-2-MLP-shaped networks — tokens, (a class token, an added position
/// parameter, a LayerNorm), conv1d, gelu_tanh, conv1d (the first conv1d
/// right after the parameter-free part in case 0, so its input has no
/// tangent there, and behind the LayerNorm's tangent otherwise), a
/// LayerNorm, select, a flat linear head — on random shapes
/// (tokens, features, widths, batch), against the float64 reference on
/// both backends. `TOL_GPU` = 1e-5 relative, the bound of
/// tests/decisions.rs for whole-model float32 results (chained reductions
/// of ≤ a few hundred terms ≈ u·√L ≈ 1e-6).
#[test]
fn conv1d_networks_match_float64_on_the_gpu() {
    const TOL_GPU: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(2511);
    for case in 0..3 {
        let (c, h, w) = (
            r.random_range(2..=12),
            r.random_range(1..=4),
            r.random_range(1..=5),
        );
        let t = h * w;
        let (d1, d2) = (r.random_range(1..=40), r.random_range(1..=300));
        let pre = if case == 0 {
            ""
        } else {
            "cls_token class_token\nadd_param pos\nlayernorm ln1 eps=1e-6\n"
        };
        let index = r.random_range(0..t + case.min(1));
        let text = format!(
            "model vt{case}\ninput {c} {h} {w}\nclasses 4\ntokens\n{pre}\
             conv1d c1 {d1}\ngelu_tanh g\nconv1d c2 {d2}\nlayernorm ln2\n\
             select index={index}\nlinear fc 4\n"
        );
        let model = arch::parse("vt.arch", &text).unwrap();
        hesscope::layers::check_model(&model).unwrap();
        let theta: Vec<f64> = (0..model.n_params)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        // Batches of 1 to 4 samples, at least 2 in cases 1 and 2.
        let n = r.random_range(1..=2) + 2 * case.min(1);
        let data = Dataset {
            x: (0..n * model.input.numel())
                .map(|_| r.random_range(-2.0f32..2.0))
                .collect(),
            y: (0..n).map(|_| r.random_range(0..4u32)).collect(),
            shape: model.input,
            source: "uniform".into(),
        };
        let weights = Weights {
            theta,
            buffers: vec![],
        };
        let problem = Problem::new(model.clone(), weights, data, n, BnMode::Batch).unwrap();
        let vs: Vec<Vec<f64>> = (0..3)
            .map(|_| {
                (0..model.n_params)
                    .map(|_| r.random_range(-1.0..1.0))
                    .collect()
            })
            .collect();
        let mut cpu = CpuReference::new(problem.clone());
        let (_, g, hv) = cpu.loss_grad_hvp(&vs[0]).unwrap();
        let hvs: Vec<Vec<f64>> = vs
            .iter()
            .map(|v| {
                let mut o = vec![0.0; v.len()];
                cpu.hvp(v, &mut o).unwrap();
                o
            })
            .collect();
        let label =
            format!("case {case}: [{c}, {h}, {w}] -> {t} tokens, widths {d1}, {d2}, batch {n}");
        for (name, ctx) in gpu_contexts() {
            let mut e = GpuEngine::new(ctx.share(), &problem).unwrap();
            let (_, gg, gh) = e.loss_grad_hvp(&vs[0]).unwrap();
            let (eg, eh) = (rel_err(&gg, &g), rel_err(&gh, &hv));
            let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
            let mut outs = vec![vec![0.0; model.n_params]; 3];
            e.hvp_block(&refs, &mut outs).unwrap();
            let eb = (0..3)
                .map(|j| rel_err(&outs[j], &hvs[j]))
                .fold(0.0f64, f64::max);
            eprintln!("{label} on {name}: gradient {eg:.1e}, Hv {eh:.1e}, block of 3 Hv {eb:.1e}");
            assert!(
                eg <= TOL_GPU && eh <= TOL_GPU && eb <= TOL_GPU,
                "{label} on {name}: gradient {eg:.1e}, Hv {eh:.1e}, block {eb:.1e}"
            );
        }
    }
}

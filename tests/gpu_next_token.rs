//! The next-token cross-entropy of a language model on the GPU (issue 25):
//! shaders/loss.wgsl's row kernels over the N·T logits rows, the labels
//! the ids shifted by one and each sample's last row unlabelled
//! (`next_token::NO_LABEL`: zero loss, softmax and adjoint), scaled by
//! 1/(N·(T−1)). Against the float64 reference (src/layers/next_token.rs)
//! kernel by kernel with poisoned outputs, and in whole language models
//! (gradient, Hv, a block of 3 Hv), on Vulkan (lavapipe) and GL
//! (llvmpipe).

mod common;

use common::gpu::*;
use common::{gpu_contexts, rel_err};
use hesscope::data::Dataset;
use hesscope::gpu::kernels::{Consts, Kernel};
use hesscope::gpu::params::LossParams;
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::layers::next_token;
use hesscope::model::arch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn lm(t: usize, v: usize) -> hesscope::model::Model {
    let text =
        format!("model lm\ninput tokens {t}\nclasses {v}\nembedding wte {v} 4\nlinear head {v}\n");
    arch::parse("lm.arch", &text).unwrap()
}

/// The loss rows' forward/backward (loss, softmax, ∂L/∂z) and R-backward
/// (R(∂L/∂z) along ż) against `next_token::forward_backward` and
/// `r_backward` on random shapes (1..4 samples of 2..16 tokens,
/// vocabularies 2..300, logits in ±4). Outputs poisoned with NaN; the
/// unlabelled last rows must come out exactly zero. Tolerance 1e-5
/// relative (L2 over the outputs): each row's softmax sums ≤ 300 float32
/// exponentials (≈ u·√V ≈ 1e-6).
#[test]
fn next_token_loss_kernels_match() {
    const TOL: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(2520);
    for (name, ctx) in gpu_contexts() {
        for case in 0..6 {
            let (n, t, v) = (
                r.random_range(1..=4),
                r.random_range(2..=16),
                r.random_range(2..=300),
            );
            let model = lm(t, v);
            let data = Dataset {
                x: (0..n * t).map(|_| r.random_range(0..v) as f32).collect(),
                y: vec![0; n],
                shape: model.input,
                source: "uniform ids".into(),
            };
            let rows = n * t;
            let z: Vec<f64> = (0..rows * v)
                .map(|_| r.random_range(-4.0..4.0f32) as f64)
                .collect();
            let zdot: Vec<f64> = (0..rows * v)
                .map(|_| r.random_range(-1.0..1.0f32) as f64)
                .collect();
            let scale = 1.0 / (n + r.random_range(0..3)) as f64;
            let (loss, gz, p) = next_token::forward_backward(&model, &data, 0, n, &z, scale);
            let rgz = next_token::r_backward(&model, n, &p, &zdot, scale);
            assert_eq!(next_token::loss_rows(&model), t);
            let labels = next_token::gpu_labels(&model, &data, 0, n);
            assert_eq!(labels.len(), rows);
            let lp = LossParams {
                n: rows as u32,
                k: v as u32,
                scale: next_token::row_scale(&model, scale) as f32,
                _p0: 0,
            };
            let zb = upload(&ctx, "z", &z);
            let lb = ctx.storage("labels", rows).unwrap();
            ctx.write_u32(&lb, &labels).unwrap();
            let (pb, sb, gb) = (
                poisoned(&ctx, "p", rows * v),
                poisoned(&ctx, "loss", rows),
                poisoned(&ctx, "gz", rows * v),
            );
            dispatch_once(
                &ctx,
                Kernel::XentForwardBackward,
                Consts::default(),
                &lp,
                &[&zb, &lb, &pb, &sb, &gb],
                Grid::Threads(rows),
            )
            .unwrap();
            let (gp, gl, gg) = (
                read_n(&ctx, &pb, rows * v),
                read_n(&ctx, &sb, rows),
                read_n(&ctx, &gb, rows * v),
            );
            // The last row of every sample: exactly zero.
            for s in 0..n {
                let last = (s * t + t - 1) * v..(s + 1) * t * v;
                assert!(gg[last.clone()].iter().all(|&x| x == 0.0), "{name}: gz row");
                assert!(gp[last].iter().all(|&x| x == 0.0), "{name}: p row");
                assert_eq!(gl[s * t + t - 1], 0.0, "{name}: loss row");
            }
            // The softmax of the labelled rows, gathered as the float64's.
            let gp_rows: Vec<f64> = (0..n)
                .flat_map(|s| gp[s * t * v..(s * t + t - 1) * v].to_vec())
                .collect();
            let dzb = upload(&ctx, "ż", &zdot);
            let rb = poisoned(&ctx, "R(gz)", rows * v);
            dispatch_once(
                &ctx,
                Kernel::XentRBackward,
                Consts::default(),
                &lp,
                &[&pb, &dzb, &rb],
                Grid::Threads(rows),
            )
            .unwrap();
            let gr = read_n(&ctx, &rb, rows * v);
            let el = (gl.iter().sum::<f64>() - loss).abs() / loss.abs();
            let (ep, eg, er) = (rel_err(&gp_rows, &p), rel_err(&gg, &gz), rel_err(&gr, &rgz));
            eprintln!(
                "{name} case {case}: {n}×{t} tokens, vocabulary {v}: loss {el:.1e}, \
                 softmax {ep:.1e}, gz {eg:.1e}, R(gz) {er:.1e}"
            );
            assert!(
                el <= TOL && ep <= TOL && eg <= TOL && er <= TOL,
                "{name} case {case}: loss {el:.1e}, softmax {ep:.1e}, gz {eg:.1e}, R {er:.1e}"
            );
        }
    }
}

/// Gradient, Hv and a block of 3 Hv of a whole model against the
/// float64 reference on both backends, within `TOL_GPU` = 1e-5 relative
/// (tests/decisions.rs' bound for whole-model float32 results).
fn check_model_on_gpus(label: &str, text: &str, n: usize, seed: u64) {
    const TOL_GPU: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(seed);
    let model = arch::parse("lm.arch", text).unwrap();
    assert!(model.next_token(), "{label}");
    hesscope::layers::check_model(&model).unwrap();
    let (t, v) = (model.input.tokens(), model.classes);
    let theta = uniform_unit(&mut r, model.n_params);
    let data = Dataset {
        x: (0..n * t).map(|_| r.random_range(0..v) as f32).collect(),
        y: vec![0; n],
        shape: model.input,
        source: "uniform ids".into(),
    };
    let problem = problem_of(&model, theta, data, n);
    let vs = tangents(&mut r, 3, model.n_params);
    check_whole_model(label, &problem, &vs, TOL_GPU, true);
}

/// Small language models (embedding, position embedding, a linear or
/// tied head) on random shapes.
#[test]
fn language_models_match_float64_on_the_gpu() {
    let mut r = StdRng::seed_from_u64(2521);
    for case in 0..3 {
        let (t, v, d, n) = (
            r.random_range(2..=9),
            r.random_range(2..=40),
            r.random_range(1..=24),
            r.random_range(1..=4),
        );
        let head = if case == 1 {
            format!("linear lm_head {v} bias=false tie=wte.weight")
        } else {
            format!("linear lm_head {v}")
        };
        let text = format!(
            "model lm{case}\ninput tokens {t}\nclasses {v}\nembedding wte {v} {d}\n\
             pos_embedding wpe {}\ngelu_tanh\n{head}\n",
            t + case
        );
        let label = format!("case {case}: {n}×{t} tokens, vocabulary {v}, width {d}");
        check_model_on_gpus(&label, &text, n, 2522 + case as u64);
    }
}

/// A GPT-2-shaped network without attention: token and position
/// embeddings, a residual MLP block (layernorm, conv1d, gelu_tanh,
/// conv1d), the final layernorm and the head tied to the token embedding,
/// the next-token loss — on random shapes.
#[test]
fn gpt2_shaped_network_without_attention_matches_float64_on_the_gpu() {
    let mut r = StdRng::seed_from_u64(2523);
    for case in 0..2 {
        let (t, v, d, n) = (
            r.random_range(2..=12),
            r.random_range(2..=64),
            r.random_range(1..=32),
            r.random_range(1..=3),
        );
        let f = 4 * d;
        let text = format!(
            "model g{case}\ninput tokens {t}\nclasses {v}\nembedding transformer.wte {v} {d}\n\
             pos_embedding transformer.wpe {t}\nresidual transformer.h.0\n  layernorm ln_2 eps=1e-5\n  \
             conv1d mlp.c_fc {f}\n  gelu_tanh\n  conv1d mlp.c_proj {d}\nend\n\
             layernorm transformer.ln_f eps=1e-5\n\
             linear lm_head {v} bias=false tie=transformer.wte.weight\n"
        );
        let label = format!("GPT-2 MLP case {case}: {n}×{t} tokens, vocabulary {v}, width {d}");
        check_model_on_gpus(&label, &text, n, 2524 + case as u64);
    }
}

//! Convolutions with strides 5..=11 on the GPU (ViT's patch embedding is
//! a k = stride convolution: 8 in tests/data/vit-tiny.arch, 16 in ViT-B/16
//! beyond MAX_K): whole networks against the float64 reference on both
//! conv paths (the emulator kernels of shaders/conv.wgsl, conv_weight.wgsl
//! and the tiled implicit GEMM of conv_tiled.wgsl), on Vulkan and GL —
//! forward, backward data, the weight and bias gradients and their
//! R-forms all enter the gradient and Hv. Random shapes: k 1..=11 with the
//! stride above or equal to it (patches) and below it (gaps between the
//! windows), padding 0..=k/2, 1..=4 input and 1..=6 output channels, images
//! that give 1..=4 output rows and columns, 1..=3 samples.

mod common;

use common::gpu::*;
use common::{gpu_contexts, rel_err};
use hesscope::cpu::CpuReference;
use hesscope::engine::Curvature;
use hesscope::gpu::executor::ConvPath;
use hesscope::gpu::{EngineOptions, GpuEngine};
use hesscope::model::arch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `TOL_GPU` of the other whole-network tests (tests/decisions.rs' bound
/// for whole-model float32 results): a conv output sums ≤ 4·121 products.
const TOL_GPU: f64 = 1e-5;

#[test]
fn large_strides_match_float64_on_both_conv_paths() {
    let mut r = StdRng::seed_from_u64(2510);
    for case in 0..6 {
        let stride = r.random_range(5..=11usize);
        let k = if case % 2 == 0 {
            stride
        } else {
            r.random_range(1..=11usize)
        };
        let pad = if case % 2 == 0 {
            0
        } else {
            r.random_range(0..=k / 2)
        };
        let (oh, ow) = (r.random_range(1..=4usize), r.random_range(1..=4usize));
        // The smallest input giving oh rows, plus up to stride − 1 unused.
        let size = |o: usize, r: &mut StdRng| {
            ((o - 1) * stride + k).saturating_sub(2 * pad).max(1) + r.random_range(0..stride)
        };
        let (h, w) = (size(oh, &mut r), size(ow, &mut r));
        let (cin, cout) = (r.random_range(1..=4usize), r.random_range(1..=6usize));
        let bias = r.random_bool(0.5);
        let text = format!(
            "model s\ninput {cin} {h} {w}\nclasses 5\nconv c {cout} k={k} stride={stride} \
             pad={pad} bias={bias}\ntanh\nflatten\nlinear fc 5\n"
        );
        let model = match arch::parse("s.arch", &text) {
            Ok(m) => m,
            Err(e) => panic!("{text}: {e}"),
        };
        hesscope::layers::check_model(&model).unwrap();
        let n = r.random_range(1..=3usize);
        let theta = uniform_unit(&mut r, model.n_params);
        let data = image_data(&mut r, &model, n, 5);
        let problem = problem_of(&model, theta, data, n);
        let vs = tangents(&mut r, 3, model.n_params);
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
        let tag = format!(
            "k {k} stride {stride} pad {pad} {cin}→{cout} {h}×{w} (out {oh}×{ow}) batch {n}"
        );
        for (backend, ctx) in gpu_contexts() {
            for path in [ConvPath::Emulator, ConvPath::Tiled] {
                let options = EngineOptions {
                    conv_path: path,
                    block: Some(3),
                    ..Default::default()
                };
                let mut e = GpuEngine::with_options(ctx.share(), &problem, options).unwrap();
                let (_, gg, gh) = e.loss_grad_hvp(&vs[0]).unwrap();
                let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
                let mut outs = vec![vec![0.0; model.n_params]; vs.len()];
                e.hvp_block(&refs, &mut outs).unwrap();
                let eb = (0..vs.len())
                    .map(|j| rel_err(&outs[j], &hvs[j]))
                    .fold(0.0f64, f64::max);
                let (eg, eh) = (rel_err(&gg, &g), rel_err(&gh, &hv));
                eprintln!(
                    "{tag} on {backend} {path:?}: gradient {eg:.1e}, Hv {eh:.1e}, block {eb:.1e}"
                );
                assert!(
                    eg <= TOL_GPU && eh <= TOL_GPU && eb <= TOL_GPU,
                    "{tag} on {backend} {path:?}: gradient {eg:.1e}, Hv {eh:.1e}, block {eb:.1e}"
                );
            }
        }
    }
}

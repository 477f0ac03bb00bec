//! nn.Embedding on the GPU (shaders/embedding.wgsl: the gather and its
//! deterministic scatter-add) against the float64 reference
//! (`EmbeddingUnit`), on Vulkan (lavapipe) and GL (llvmpipe), outputs
//! poisoned with NaN; a token classifier built on it against float64. The
//! other sequence layers: tests/gpu_seq.rs; language models (the
//! next-token loss): tests/gpu_next_token.rs.

mod common;

use common::gpu::*;
use common::gpu_contexts;
use hesscope::data::Dataset;
use hesscope::gpu::kernels::{Consts, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::model::arch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The scatter-add's sums: see `embedding_kernels_match`.
const TOL_LN: f64 = 1e-5;

// ------------------------------------------------------------- embedding

/// The gather (forward from θ, R-forward from v) and the scatter-add
/// (gradient from gy, Hv from R(gy)) against `EmbeddingUnit`'s float64
/// passes on random shapes (vocabulary 1..60, width 1..300, 1..3 samples
/// of 1..20 tokens, ids repeating so that rows gather several tokens,
/// vocabulary rows no token uses). The gather moves values: exact. Each
/// scatter sum adds ≤ 60 values serially into a random start: ≈ u·√61 ≈
/// 5e-7 relative, `TOL_LN` (1e-5) as the reductions of tests/gpu_seq.rs. Outputs
/// poisoned; every other parameter of the target keeps its bits.
#[test]
fn embedding_kernels_match() {
    use hesscope::gpu::kernels::EmbParams;
    use hesscope::layers::{embedding::EmbeddingUnit, Layer};
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(2505);
        for case in 0..8 {
            let (vocab, d): (usize, usize) = (r.random_range(1..=60), r.random_range(1..=300));
            let (n, t) = (r.random_range(1..=3), r.random_range(1..=20));
            let text = format!(
                "model e\ninput tokens {t}\nclasses {vocab}\nembedding wte {vocab} {d}\n\
                 select index=0\nlinear fc {vocab}\n"
            );
            let m = arch::parse("e.arch", &text).unwrap();
            let node = &m.nodes[0];
            assert_eq!(node.kind(), "embedding");
            let np = m.n_params;
            let theta = uniform(&mut r, np, -1.0, 1.0);
            let v = uniform(&mut r, np, -1.0, 1.0);
            // Ids from the lower half of the vocabulary in case 0 (rows no
            // token uses must get 0 added), else anywhere.
            let top = if case == 0 { vocab.div_ceil(2) } else { vocab };
            let ids: Vec<f64> = (0..n * t).map(|_| r.random_range(0..top) as f64).collect();
            let len = n * t * d;
            let gy = uniform(&mut r, len, -1.0, 1.0);
            let cx = batch_cx(&m, n, &theta);
            let u = EmbeddingUnit;
            let (y, mut saved) = u.forward(&cx, node, &[&ids]);
            let dy = u.r_forward(&cx, node, &[&ids], &[&ids], &v, &mut saved);
            let mut grad = vec![0.0; np];
            u.backward(&cx, node, &[&ids], &saved, &gy, &mut grad);
            let w = match node.op {
                hesscope::model::Op::Embedding { weight, .. } => weight,
                _ => unreachable!(),
            };
            let off = m.params[w].offset;
            let ep = EmbParams {
                tokens: (n * t) as u32,
                d: d as u32,
                vocab: vocab as u32,
                w_off: off as u32,
                r0: 0,
                rows: vocab as u32,
                ..Default::default()
            };
            let tag = format!("{backend} vocab {vocab} d {d} {n}×{t} tokens");
            let (idb, thb, vb, gyb) = (
                upload(&ctx, "ids", &ids),
                upload(&ctx, "θ", &theta),
                upload(&ctx, "v", &v),
                upload(&ctx, "gy", &gy),
            );
            for (table, want, what) in [(&thb, &y, "forward"), (&vb, &dy, "r_forward")] {
                let out = poisoned(&ctx, "y", len + 3);
                let before = read_raw(&ctx, &out);
                dispatch_once(
                    &ctx,
                    Kernel::EmbGather,
                    Consts::default(),
                    &ep,
                    &[&idb, table, &out],
                    Grid::Threads(len),
                )
                .unwrap();
                let got = read_raw(&ctx, &out);
                for i in 0..len {
                    assert_eq!(got[i] as f64, want[i], "{tag} {what}: element {i}");
                }
                for i in len..len + 3 {
                    assert_eq!(got[i].to_bits(), before[i].to_bits(), "{tag} {what}: tail");
                }
            }
            let t0 = uniform(&mut r, np, -1.0, 1.0);
            let tb = upload(&ctx, "target", &t0);
            let before = read_raw(&ctx, &tb);
            dispatch_once(
                &ctx,
                Kernel::EmbScatter,
                Consts::default(),
                &ep,
                &[&idb, &gyb, &tb],
                Grid::Threads(vocab * d),
            )
            .unwrap();
            let got = read_raw(&ctx, &tb);
            let wlen = vocab * d;
            let want: Vec<f64> = (off..off + wlen).map(|i| grad[i] + t0[i]).collect();
            let g: Vec<f64> = got[off..off + wlen].iter().map(|&x| x as f64).collect();
            let e = rel_l2_f64(&g, &want);
            assert!(e <= TOL_LN, "{tag} scatter: relative L2 {e:.2e}");
            for i in (0..np).filter(|i| !(off..off + wlen).contains(i)) {
                assert_eq!(
                    got[i].to_bits(),
                    before[i].to_bits(),
                    "{tag}: θ[{i}] touched"
                );
            }
            if case == 0 {
                // Rows no token uses keep their start value exactly.
                for vr in top..vocab {
                    for j in 0..d {
                        let i = off + vr * d + j;
                        assert_eq!(got[i].to_bits(), before[i].to_bits(), "{tag}: row {vr}");
                    }
                }
            }
            eprintln!("{tag}: gather exact, scatter relative L2 {e:.1e}");
        }
    }
}

/// A token classifier (embedding, position embedding, layernorm, linear,
/// gelu_tanh, select, head) on the GPU against float64: gradient, Hv and a
/// block of 3 Hv within `TOL_GPU` = 1e-5 as the token networks of
/// tests/gpu_seq.rs (tests/decisions.rs' bound for whole-model float32
/// results).
#[test]
fn embedding_network_matches_float64_on_the_gpu() {
    const TOL_GPU: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(2506);
    let (vocab, t, n) = (11, 6, 4);
    let text = format!(
        "model et\ninput tokens {t}\nclasses {vocab}\nembedding wte {vocab} 16\n\
         pos_embedding wpe 8\nlayernorm ln\nlinear l1 24\ngelu_tanh\nselect index=2\n\
         linear fc {vocab}\n"
    );
    let model = arch::parse("et.arch", &text).unwrap();
    hesscope::layers::check_model(&model).unwrap();
    let theta = uniform_unit(&mut r, model.n_params);
    let data = Dataset {
        x: (0..n * t)
            .map(|_| r.random_range(0..vocab) as f32)
            .collect(),
        y: (0..n).map(|_| r.random_range(0..vocab as u32)).collect(),
        shape: model.input,
        source: "uniform ids".into(),
    };
    let problem = problem_of(&model, theta, data, n);
    let vs = tangents(&mut r, 3, model.n_params);
    check_whole_model("embedding network", &problem, &vs, TOL_GPU, false);
}

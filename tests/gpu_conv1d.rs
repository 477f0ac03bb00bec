//! Hugging Face's Conv1D (`conv1d NAME DOUT`: y = x·W + b, weight
//! [DIN, DOUT]) on the GPU: the direct conv kernels (conv_direct.wgsl)
//! with the weight read transposed (`WT`), over samples · tokens rows —
//! forward, R-forward, backward (dW in [DIN, DOUT]) and R-backward —
//! kernel by kernel against the float64 unit (`SeqLinearUnit`) with
//! poisoned outputs, and in whole networks against the float64 reference,
//! on Vulkan (lavapipe) and GL (llvmpipe).

mod common;

use common::gpu::*;
use common::{gpu_contexts, rel_err};
use hesscope::gpu::kernels::{Consts, ConvParams, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::model::arch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn uniform(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| r.random_range(-1.0..1.0f32) as f64)
        .collect()
}

/// The direct kernels with `WT` (forward with bias, R-forward with both
/// pairs and v's bias, backward data with and without accumulating,
/// R-backward data, the weight gradient's stage one in two chunks and its
/// R pair) against `SeqLinearUnit`'s float64 passes on random shapes
/// (1..4 samples of 1..12 tokens, DIN and DOUT 1..70). Outputs poisoned
/// with NaN (the accumulating one starts from random values). Each output
/// sums ≤ 70 products (rows: ≤ 48) in float32: ≈ u·√70 ≈ 5e-7 relative;
/// `TOL` 1e-5 relative L2, as the kernels of tests/gpu_seq.rs.
#[test]
fn conv1d_kernels_match_the_float64_unit() {
    use hesscope::layers::{seq::SeqLinearUnit, Layer};
    const TOL: f64 = 1e-5;
    let mut r = StdRng::seed_from_u64(2512);
    for (backend, ctx) in gpu_contexts() {
        for case in 0..6 {
            let (n, t) = (r.random_range(1..=4), r.random_range(1..=12));
            let (din, dout) = (r.random_range(1..=70), r.random_range(1..=70));
            let text = format!(
                "model c\ninput {din} 1 {t}\nclasses 2\ntokens\nconv1d proj {dout}\n\
                 select index=0\nlinear fc 2\n"
            );
            let m = arch::parse("c.arch", &text).unwrap();
            let node = &m.nodes[1];
            assert_eq!(node.kind(), "conv1d");
            let (woff, boff) = match node.op {
                hesscope::model::Op::SeqLinear {
                    weight,
                    bias: Some(b),
                    transposed: true,
                    ..
                } => (m.params[weight].offset, m.params[b].offset),
                _ => unreachable!(),
            };
            let np = m.n_params;
            let rows = n * t;
            let (theta, v) = (uniform(&mut r, np), uniform(&mut r, np));
            let (x, dx) = (uniform(&mut r, rows * din), uniform(&mut r, rows * din));
            let (gy, rgy) = (uniform(&mut r, rows * dout), uniform(&mut r, rows * dout));
            let cx = batch_cx(&m, n, &theta);
            let u = SeqLinearUnit;
            let (y, mut saved) = u.forward(&cx, node, &[&x]);
            let ydot = u.r_forward(&cx, node, &[&x], &[&dx], &v, &mut saved);
            let mut grad = vec![0.0; np];
            let gx = u
                .backward(&cx, node, &[&x], &saved, &gy, &mut grad)
                .remove(0);
            let mut hv = vec![0.0; np];
            let rgx = u
                .r_backward(&cx, node, &[&x], &[&dx], &saved, &gy, &rgy, &v, &mut hv)
                .remove(0);
            let per = rows.div_ceil(2);
            let chunks = rows.div_ceil(per);
            let pr = ConvParams {
                n: rows as u32,
                cin: din as u32,
                h: 1,
                w: 1,
                cout: dout as u32,
                k: 1,
                stride: 1,
                pad: 0,
                oh: 1,
                ow: 1,
                wa_off: woff as u32,
                wb_off: woff as u32,
                bias_off: boff as u32,
                rows_per_chunk: per as u32,
                chunks: chunks as u32,
                groups: 1,
            };
            let b = |name: &str, d: &[f64]| upload(&ctx, name, d);
            let (thb, vb, xb, dxb, gyb, rgyb) = (
                b("θ", &theta),
                b("v", &v),
                b("x", &x),
                b("ẋ", &dx),
                b("gy", &gy),
                b("R(gy)", &rgy),
            );
            let wt = |c: Consts| c.with("DIL", 1).with("WT", 1);
            let tag = format!("{backend} case {case}: {n}×{t} rows, {din} -> {dout}");
            let check = |what: &str, got: &[f64], want: &[f64]| {
                let e = rel_err(got, want);
                eprintln!("{tag} {what}: {e:.1e}");
                assert!(e <= TOL, "{tag} {what}: relative L2 {e:.2e}");
            };
            // Forward (θ's bias) and R-forward (W·ẋ + V·x + v's bias).
            for (what, bufs, pair, want) in [
                ("forward", [&xb, &thb, &xb, &thb], false, &y),
                ("R-forward", [&dxb, &thb, &xb, &vb], true, &ydot),
            ] {
                let out = poisoned(&ctx, "y", rows * dout);
                let c = wt(Consts::conv(pair, true, false));
                let bufs = [bufs[0], bufs[1], bufs[2], bufs[3], &out];
                let g = Grid::Threads(rows * dout);
                dispatch_once(&ctx, Kernel::ConvDirectForward, c, &pr, &bufs, g).unwrap();
                check(what, &read(&ctx, &out), want);
            }
            // Backward data (accumulating onto random values in odd cases)
            // and its R pair.
            let acc = case % 2 == 1;
            let start = if acc {
                uniform(&mut r, rows * din)
            } else {
                vec![f64::NAN; rows * din]
            };
            let gx_want: Vec<f64> = if acc {
                gx.iter().zip(&start).map(|(a, b)| a + b).collect()
            } else {
                gx.clone()
            };
            for (what, bufs, pair, acc, want) in [
                (
                    "backward data",
                    [&gyb, &thb, &gyb, &thb],
                    false,
                    acc,
                    &gx_want,
                ),
                (
                    "R-backward data",
                    [&rgyb, &thb, &gyb, &vb],
                    true,
                    false,
                    &rgx,
                ),
            ] {
                let out = upload(&ctx, "gx", &start);
                let c = wt(Consts::conv(pair, false, acc));
                let bufs = [bufs[0], bufs[1], bufs[2], bufs[3], &out];
                let g = Grid::Threads(rows * din);
                dispatch_once(&ctx, Kernel::ConvDirectBackwardData, c, &pr, &bufs, g).unwrap();
                check(what, &read(&ctx, &out), want);
            }
            // The weight gradient in [DIN, DOUT] (two chunks summed) and
            // its R pair (R(gy)·x + gy·ẋ).
            let nw = din * dout;
            for (what, bufs, pair, want) in [
                ("dW", [&gyb, &xb, &gyb, &xb], false, &grad),
                ("R dW", [&rgyb, &xb, &gyb, &dxb], true, &hv),
            ] {
                let parts = poisoned(&ctx, "partials", nw * chunks);
                let c = Consts::new(&[("PAIR_B", pair as u32), ("DIL", 1), ("WT", 1)]);
                let bufs = [bufs[0], bufs[1], bufs[2], bufs[3], &parts];
                let g = Grid::Threads(nw * chunks);
                dispatch_once(&ctx, Kernel::ConvDirectBackwardWeight, c, &pr, &bufs, g).unwrap();
                let p = read(&ctx, &parts);
                let got: Vec<f64> = (0..nw)
                    .map(|i| (0..chunks).map(|c| p[c * nw + i]).sum())
                    .collect();
                check(what, &got, &want[woff..woff + nw]);
            }
        }
    }
}

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
        let s = token_shapes(&mut r);
        let TokenShapes { c, h, w, t, d1, d2 } = s;
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
        check_token_network(&mut r, case, &s, &text, TOL_GPU);
    }
}

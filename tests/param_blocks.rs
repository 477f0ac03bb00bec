//! Zhang et al.'s blockwise Hessian on transformers: the blocks of
//! `layers` (one per module, fused q|k|v projections split into Q, K, V)
//! partition the parameters; the index-set block operator equals P H Pᵀ
//! of the dense float64 Hessian on a small ViT (nn.MultiheadAttention's
//! in_proj: contiguous thirds) and a small GPT-2 (Conv1D c_attn: strided
//! columns); the Jensen–Shannon distance's bounds, symmetry and a hand
//! value; one `layers` run of the CLI with its heat map.

mod common;

use common::hesscope;
use hesscope::cpu::CpuReference;
use hesscope::data;
use hesscope::engine::{BnMode, Hessian, Problem};
use hesscope::model::param_blocks::{check_partition, fused_qkv, param_blocks, ParamBlock};
use hesscope::model::{arch, Kind, Model, Weights};
use hesscope::spectral::layers::{js_distance, js_matrix, BlockOperator};
use hesscope::spectral::SymOperator;
use rand::{Rng, SeedableRng};

const VIT: &str = "model vit-mini
input 3 8 8
classes 5
conv conv_proj 8 k=4 stride=4
tokens
cls_token class_token
add_param encoder.pos_embedding
residual encoder.layers.encoder_layer_0
  layernorm ln_1 eps=1e-6
  attention self_attention heads=2
end
residual encoder.layers.encoder_layer_0
  layernorm ln_2 eps=1e-6
  linear mlp.0 16
  gelu
  linear mlp.3 8
end
layernorm encoder.ln eps=1e-6
select index=0
linear heads.head 5
";

const GPT2: &str = "model gpt2-mini
input tokens 6
classes 11
embedding transformer.wte 11 8
pos_embedding transformer.wpe 6
residual transformer.h.0
  layernorm ln_1 eps=1e-5
  conv1d attn.c_attn 24
  mha attn heads=2 causal=true
  conv1d attn.c_proj 8
end
residual transformer.h.0
  layernorm ln_2 eps=1e-5
  conv1d mlp.c_fc 16
  gelu_tanh
  conv1d mlp.c_proj 8
end
layernorm transformer.ln_f eps=1e-5
linear lm_head 11 bias=false tie=transformer.wte.weight
";

fn model(text: &str) -> Model {
    arch::parse("mini.arch", text).unwrap()
}

fn problem(m: &Model) -> Problem {
    let d = if m.input.kind == Kind::Ids {
        data::synthetic_tokens(m.input.tokens(), m.vocab().unwrap(), 3, 5).unwrap()
    } else {
        data::synthetic(m.input, m.classes, 3, 5)
    };
    Problem::new(m.clone(), Weights::init(m, 2), d, 3, BnMode::Batch).unwrap()
}

fn block<'a>(blocks: &'a [ParamBlock], name: &str) -> &'a ParamBlock {
    blocks
        .iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no block {name}: {:?}", names(blocks)))
}

fn names(blocks: &[ParamBlock]) -> Vec<&str> {
    blocks.iter().map(|b| b.name.as_str()).collect()
}

/// Every parameter in exactly one block, counted independently of
/// `check_partition`; and that function refusing a gap and an overlap.
fn assert_partition(m: &Model, blocks: &[ParamBlock]) {
    let mut all: Vec<usize> = blocks.iter().flat_map(|b| b.indices()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..m.n_params).collect::<Vec<_>>(), "{}", m.name);
    let mut gap = blocks.to_vec();
    gap[0].ranges[0].start += 1;
    assert!(check_partition(&gap, m.n_params).is_err());
    let mut overlap = blocks.to_vec();
    overlap[1].ranges[0].start -= 1;
    assert!(check_partition(&overlap, m.n_params).is_err());
}

/// Which third (q 0, k 1, v 2) of a fused tensor an index is in, from the
/// tensor's layout alone: Conv1D [DIN, 3D] by column, Linear [3D, DIN] by
/// row, a bias [3D] by position.
fn third_of(m: &Model, idx: usize) -> Option<usize> {
    let p = m
        .params
        .iter()
        .find(|p| (p.offset..p.offset + p.numel()).contains(&idx))?;
    let local = idx - p.offset;
    let n = p.shape.len();
    match (n, p.name.ends_with("c_attn.weight")) {
        (2, true) => Some((local % p.shape[1]) / (p.shape[1] / 3)),
        (2, false) => Some((local / p.shape[1]) / (p.shape[0] / 3)),
        _ => Some(local / (p.shape[0] / 3)),
    }
}

#[test]
fn blocks_partition_the_parameters_and_split_q_k_v() {
    for (text, fused, runs) in [
        // ViT: in_proj rows are contiguous thirds: weight + bias = 2 runs.
        (VIT, "encoder.layers.encoder_layer_0.self_attention", 2),
        // GPT-2: c_attn columns, 8 rows of 8 + the bias = 9 runs.
        (GPT2, "transformer.h.0.attn.c_attn", 9),
    ] {
        let m = model(text);
        assert_eq!(fused_qkv(&m).len(), 1, "{}", m.name);
        let whole = param_blocks(&m, false).unwrap();
        assert_partition(&m, &whole);
        // Unsplit: the modules as `Model::modules` lists them (the
        // top-level class_token named by itself).
        let modules: Vec<(String, std::ops::Range<usize>)> = m.modules();
        assert_eq!(whole.len(), modules.len(), "{}", m.name);
        for (b, (name, r)) in whole.iter().zip(&modules) {
            assert_eq!(b.ranges, vec![r.clone()]);
            assert!(name.is_empty() || *name == b.name, "{} vs {name}", b.name);
        }
        let split = param_blocks(&m, true).unwrap();
        assert_partition(&m, &split);
        assert_eq!(split.len(), whole.len() + 2);
        assert!(!names(&split).contains(&fused));
        let d = 8;
        for (part, tag) in ["q", "k", "v"].iter().enumerate() {
            let b = block(&split, &format!("{fused}.{tag}"));
            assert_eq!(b.len(), d * d + d, "{}", b.name);
            assert_eq!(b.ranges.len(), runs, "{}", b.name);
            for i in b.indices() {
                assert_eq!(third_of(&m, i), Some(part), "{} index {i}", b.name);
            }
        }
        eprintln!("{}: {} blocks {:?}", m.name, split.len(), names(&split));
    }
}

/// v ↦ P H Pᵀ v by the index-set operator against the dense Hessian
/// (n products with unit vectors) restricted to the block's rows and
/// columns, for every block and a block of two vectors. Both sides are the
/// same float64 HVP, linear in v: they differ by rounding of the
/// combination only (~1e-16 relative); 1e-12 holds that with margin and
/// catches any misplaced index (an O(1) error).
#[test]
fn block_operator_is_p_h_pt_of_the_dense_hessian() {
    for text in [VIT, GPT2] {
        let m = model(text);
        let n = m.n_params;
        let mut cpu = CpuReference::new(problem(&m));
        let mut h = Hessian(&mut cpu);
        let mut dense = vec![vec![0.0; n]; n];
        let mut e = vec![0.0; n];
        for (i, col) in dense.iter_mut().enumerate() {
            e[i] = 1.0;
            h.apply(&e, col).unwrap();
            e[i] = 0.0;
        }
        let asym = (0..n)
            .flat_map(|i| (0..i).map(move |j| (i, j)))
            .map(|(i, j)| (dense[i][j] - dense[j][i]).abs())
            .fold(0.0f64, f64::max);
        let scale = dense.iter().flatten().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(asym <= 1e-10 * scale, "{}: asymmetry {asym:e}", m.name);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut worst: f64 = 0.0;
        for b in param_blocks(&m, true).unwrap() {
            let idx: Vec<usize> = b.indices().collect();
            let k = idx.len();
            let vs: Vec<Vec<f64>> = (0..2)
                .map(|_| (0..k).map(|_| rng.random::<f64>() - 0.5).collect())
                .collect();
            // P H Pᵀ v from the dense matrix (column c of H is H e_c).
            let want: Vec<Vec<f64>> = vs
                .iter()
                .map(|v| {
                    idx.iter()
                        .map(|&r| idx.iter().zip(v).map(|(&c, x)| dense[c][r] * x).sum())
                        .collect()
                })
                .collect();
            let mut op = BlockOperator::with_ranges(&mut h, b.ranges.clone());
            assert_eq!(op.dim(), k);
            let mut got = vec![0.0; k];
            op.apply(&vs[0], &mut got).unwrap();
            let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
            let mut outs = vec![vec![0.0; k]; 2];
            op.apply_block(&refs, &mut outs).unwrap();
            let norm = want[0]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
                .max(1e-300);
            for (g, w) in [(&got, &want[0]), (&outs[0], &want[0]), (&outs[1], &want[1])] {
                let err = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt();
                let e = err / w.iter().map(|x| x * x).sum::<f64>().sqrt().max(norm * 1e-3);
                assert!(e <= 1e-12, "{} block {}: {e:e}", m.name, b.name);
                worst = worst.max(e);
            }
        }
        eprintln!("{}: every block's P H Pᵀ v within {worst:.1e}", m.name);
    }
}

#[test]
fn jensen_shannon_distance_bounds_and_a_hand_value() {
    let p = [1.0, 0.0];
    let q = [0.5, 0.5];
    // m = (0.75, 0.25): JSD = ½·1·log2(1/0.75) + ½(½·log2(0.5/0.75) + ½·log2(0.5/0.25)).
    let jsd =
        0.5 * (1.0f64 / 0.75).log2() + 0.5 * (0.5 * (0.5f64 / 0.75).log2() + 0.5 * 2f64.log2());
    let d = js_distance(&p, &q).unwrap();
    assert!((d - jsd.sqrt()).abs() <= 1e-15, "{d} vs {}", jsd.sqrt());
    // Unnormalised densities are normalised first; disjoint supports: 1.
    assert_eq!(
        js_distance(&[3.0, 3.0, 0.0, 0.0], &[0.0, 0.0, 2.0, 7.0]),
        Some(1.0)
    );
    assert_eq!(js_distance(&[2.0, 1.0], &[4.0, 2.0]), Some(0.0));
    assert_eq!(js_distance(&[0.0, 0.0], &[1.0, 2.0]), None);
    // Subnormal probabilities (the far tails of a smoothed density) count 0
    // instead of turning 0·∞ into NaN.
    let tiny = js_distance(&[5e-324, 1.0, 0.0], &[0.0, 1.0, 1.0]).unwrap();
    assert!(tiny.is_finite() && tiny > 0.0 && tiny < 1.0, "{tiny}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let ds: Vec<Vec<f64>> = (0..6)
        .map(|_| (0..50).map(|_| rng.random::<f64>().powi(4)).collect())
        .collect();
    let m = js_matrix(&ds);
    assert_eq!(m.len(), 6);
    for (i, row) in m.iter().enumerate() {
        assert_eq!(row[i], Some(0.0));
        for (j, x) in row.iter().enumerate() {
            let v = x.unwrap();
            assert_eq!(*x, m[j][i]);
            assert!((0.0..=1.0).contains(&v));
            if i != j {
                assert!(v > 0.0);
            }
        }
    }
}

/// `layers` on the GPT-2 fixture architecture with synthetic tokens: the
/// Q, K, V blocks of both layers in the report, every block's density on
/// the shared grid, the JS matrix symmetric with a zero diagonal and in
/// [0, 1], and the heat map written with the block names.
#[test]
fn layers_cli_reports_js_matrix_and_heat_map() {
    let dir = tempfile::tempdir().unwrap();
    let (out, svg) = (dir.path().join("l.json"), dir.path().join("js.svg"));
    let arch = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gpt2-tiny.arch");
    let (ok, _, stderr) = hesscope(&[
        "layers",
        "--model",
        arch,
        "--backend",
        "cpu",
        "--samples",
        "4",
        "--steps",
        "6",
        "--runs",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--heatmap",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["split_qkv"], true);
    let rows = r["layers"].as_array().unwrap();
    let grid = r["grid"].as_array().unwrap().len();
    let names: Vec<&str> = rows.iter().map(|x| x["module"].as_str().unwrap()).collect();
    for l in 0..2 {
        for t in ["q", "k", "v"] {
            assert!(
                names.contains(&format!("transformer.h.{l}.attn.c_attn.{t}").as_str()),
                "{names:?}"
            );
        }
    }
    let total: u64 = rows.iter().map(|x| x["size"].as_u64().unwrap()).sum();
    let m = arch::parse("gpt2-tiny.arch", &std::fs::read_to_string(arch).unwrap()).unwrap();
    assert_eq!(total as usize, m.n_params);
    for x in rows {
        assert_eq!(x["density"].as_array().unwrap().len(), grid);
    }
    let js = r["js_distance"].as_array().unwrap();
    assert_eq!(js.len(), rows.len());
    for (i, row) in js.iter().enumerate() {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), js.len());
        assert_eq!(row[i].as_f64(), Some(0.0));
        for (j, x) in row.iter().enumerate() {
            let v = x.as_f64().unwrap();
            assert_eq!(*x, js[j][i]);
            assert!((0.0..=1.0).contains(&v), "{v}");
        }
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.ends_with("</svg>"));
    for n in &names {
        assert!(text.contains(n), "{n} not in the heat map");
    }
    // Unsplit: no Q, K, V blocks.
    let (ok, stdout, stderr) = hesscope(&[
        "layers",
        "--model",
        arch,
        "--backend",
        "cpu",
        "--samples",
        "4",
        "--steps",
        "4",
        "--runs",
        "1",
        "--split-qkv",
        "false",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["split_qkv"], false);
    assert!(r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| !x["module"].as_str().unwrap().ends_with(".q")));
}

//! The sequence layers' float64 passes (embedding, pos_embedding,
//! add_param, cls_token, tokens, select, layernorm, linear and conv1d on
//! a sequence, tied weights, mha fused/separate and causal or not, the
//! attention macro, gelu_tanh, next-token loss) checked by finite
//! differences in float64, one small model per unit around it; and the
//! `.arch` refusals of bad sequence lines, naming file, line and layer.
//!
//! Gradient: g·u against a fourth-order central difference of the loss
//! along u; Hv against the same difference of the gradient along v (which
//! checks the R-forward and R-backward against the backward). With
//! ε = 5e-4 the stencil's truncation error is ~ε⁴·|∂⁵L|/30 and its
//! rounding ~1e-16/ε ≈ 2e-13 relative: measured 1e-13 to 3e-10 on these
//! models, so 1e-8 leaves margin while a missing curvature term
//! (LayerNorm's ṡ, the softmax's Ṗ) errs by 1e-3 or more.

mod common;

use common::rel_err;
use hesscope::cpu::CpuReference;
use hesscope::data::{self, Dataset};
use hesscope::engine::{BnMode, Problem};
use hesscope::model::{arch, Kind, Model, Weights};
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-8;

fn data_for(m: &Model, n: usize) -> Dataset {
    if m.input.kind == Kind::Ids {
        data::synthetic_tokens(m.input.tokens(), m.vocab().unwrap(), n, 3).unwrap()
    } else {
        data::synthetic(m.input, m.classes, n, 3)
    }
}

fn pass(
    m: &Model,
    theta: &[f64],
    d: &Dataset,
    v: Option<&[f64]>,
) -> (f64, Vec<f64>, Option<Vec<f64>>) {
    let mut w = Weights::init(m, 0);
    w.theta = theta.to_vec();
    let p = Problem::new(m.clone(), w, d.clone(), 2, BnMode::Running).unwrap();
    let o = CpuReference::new(p).pass(v).unwrap();
    (o.loss, o.grad, o.hv)
}

/// f'(0) along a line by the fourth-order central stencil.
fn stencil<T, F: Fn(f64) -> T>(f: F, eps: f64, comb: impl Fn(&[T; 4]) -> T) -> T {
    let vals = [f(2.0 * eps), f(eps), f(-eps), f(-2.0 * eps)];
    comb(&vals)
}

fn check(label: &str, text: &str) {
    let m = arch::parse(&format!("{label}.arch"), text).unwrap_or_else(|e| panic!("{label}: {e}"));
    // The explicit form reads back to the same graph and tensors.
    let back = arch::parse("back.arch", &arch::to_text(&m)).unwrap();
    let ops = |m: &Model| {
        m.nodes
            .iter()
            .map(|n| (n.op.clone(), n.inputs.clone()))
            .collect::<Vec<_>>()
    };
    let names = |m: &Model| {
        m.params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (ops(&back), names(&back), &back.tied),
        (ops(&m), names(&m), &m.tied),
        "{label}"
    );
    let d = data_for(&m, 3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let np = m.n_params;
    let theta: Vec<f64> = Weights::init(&m, 1)
        .theta
        .iter()
        .map(|t| t + rng.random_range(-0.4..0.4))
        .collect();
    let u: Vec<f64> = (0..np).map(|_| rng.random_range(-1.0..1.0)).collect();
    let v: Vec<f64> = (0..np).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (_, g, hv) = pass(&m, &theta, &d, Some(&v));
    let hv = hv.unwrap();
    let eps = 5e-4;
    let at = |dir: &[f64], t: f64| -> Vec<f64> {
        theta.iter().zip(dir).map(|(a, b)| a + t * b).collect()
    };
    let gu: f64 = g.iter().zip(&u).map(|(a, b)| a * b).sum();
    let fd_gu = stencil(
        |t| pass(&m, &at(&u, t), &d, None).0,
        eps,
        |[a, b, c, e]| (-a + 8.0 * b - 8.0 * c + e) / (12.0 * eps),
    );
    let fd_hv = stencil(
        |t| pass(&m, &at(&v, t), &d, None).1,
        eps,
        |[a, b, c, e]| {
            (0..np)
                .map(|i| (-a[i] + 8.0 * b[i] - 8.0 * c[i] + e[i]) / (12.0 * eps))
                .collect()
        },
    );
    let eg = (gu - fd_gu).abs() / fd_gu.abs();
    let eh = rel_err(&hv, &fd_hv);
    println!("{label}: gradient {eg:.2e}, Hv {eh:.2e}");
    assert!(
        eg < TOL,
        "{label}: gradient along u: {gu} vs {fd_gu} ({eg:e})"
    );
    assert!(
        eh < TOL,
        "{label}: Hv vs finite differences of the gradient: {eh:e}"
    );
    // Every tensor's block is exercised (no block identically zero).
    for p in &m.params {
        let r = p.offset..p.offset + p.numel();
        assert!(
            hv[r].iter().any(|x| *x != 0.0),
            "{label}: Hv of {} is zero",
            p.name
        );
    }
}

#[test]
fn layernorm_by_finite_differences() {
    check(
        "layernorm",
        "model t\ninput tokens 6\nclasses 7\nembedding e 7 8\nlayernorm ln eps=1e-5\nlinear head 7\n",
    );
}

#[test]
fn causal_fused_attention_conv1d_gelu_tanh_positions_and_tied_head_by_finite_differences() {
    check(
        "gpt",
        "model t\ninput tokens 6\nclasses 7\nembedding wte 7 8\npos_embedding wpe 9\n\
         conv1d c_attn 24\nmha attn heads=2 causal=true\nconv1d c_proj 8\ngelu_tanh\n\
         linear lm_head 7 bias=false tie=wte.weight\n",
    );
}

#[test]
fn separate_qkv_attention_by_finite_differences() {
    check(
        "qkv",
        "model t\ninput tokens 5\nclasses 7\nembedding e 7 8\nq = linear(e) 8\nk = linear(e) 8\n\
         vv = linear(e) 8 bias=false\nm = mha(q, k, vv) heads=2\nout = linear(m) 7\n",
    );
}

#[test]
fn vit_pieces_by_finite_differences() {
    check(
        "vit",
        "model t\ninput 2 4 4\nclasses 3\nconv p 6 k=2 stride=2\ntokens\ncls_token cls\n\
         add_param pos\nresidual b\nlayernorm ln eps=1e-6\nattention sa heads=2\nend\n\
         residual b\nlayernorm ln2\nlinear fc 5\ngelu\nlinear fc2 6\nend\n\
         layernorm lnf\nselect index=2\nlinear head 3\n",
    );
}

#[test]
fn sequence_shapes_and_names() {
    let m = arch::parse(
        "t.arch",
        "model t\ninput 2 4 4\nclasses 3\nconv p 6 k=2 stride=2\ntokens\ncls_token cls\n\
         add_param pos\nattention sa heads=2\nselect index=0\nlinear head 3\n",
    )
    .unwrap();
    let names: Vec<(&str, Vec<usize>)> = m
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.shape.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("p.weight", vec![6, 2, 2, 2]),
            ("p.bias", vec![6]),
            ("cls", vec![1, 1, 6]),
            ("pos", vec![1, 5, 6]),
            ("sa.in_proj_weight", vec![18, 6]),
            ("sa.in_proj_bias", vec![18]),
            ("sa.out_proj.weight", vec![6, 6]),
            ("sa.out_proj.bias", vec![6]),
            ("head.weight", vec![3, 6]),
            ("head.bias", vec![3]),
        ]
    );
    let shapes: Vec<String> = m.nodes.iter().map(|n| n.out_shape.to_string()).collect();
    assert_eq!(shapes[1], "sequence [4, 6]");
    assert_eq!(shapes[2], "sequence [5, 6]");
}

#[test]
fn bad_sequence_lines_are_refused_naming_file_line_and_layer() {
    let head = "model t\ninput tokens 6\nclasses 7\nembedding e 7 8\n";
    for (line, want) in [
        (
            "layernorm ln eps=0",
            "layernorm `ln`: eps must be a positive number",
        ),
        (
            "mha m heads=2",
            "mha `m`: one input holds q | k | v, so its 8 features must be 3·D",
        ),
        ("mha m heads=2 causal=maybe", "causal must be true or false"),
        (
            "attention a heads=3",
            "attention `a`: heads=3 must divide the width D = 8",
        ),
        (
            "select s index=6",
            "select `s`: index=6 is past the input's 6 tokens",
        ),
        (
            "linear h 7 tie=nothing.weight",
            "tie=nothing.weight: no parameter",
        ),
        (
            "linear h 8 tie=e.weight",
            "tie=e.weight has shape [7, 8], the layer needs [8, 8]",
        ),
        (
            "conv c 4 k=1",
            "conv needs an image [C, H, W], but its input is the sequence [6, 8]",
        ),
        (
            "pos_embedding p 5",
            "pos_embedding `p`: 6 tokens but only 5 positions",
        ),
        ("embedding e2 7 8", "reads token ids"),
        ("tokens", "tokens needs an image"),
        ("layernorm ln bogus=1", "unknown option `bogus`"),
    ] {
        let text = format!("{head}{line}\nlinear head 7\n");
        let e = arch::parse("bad.arch", &text).unwrap_err().to_string();
        assert!(
            e.contains("bad.arch") && e.contains("line 5"),
            "{line}: {e}"
        );
        assert!(e.contains(want), "{line}: {e}");
    }
    // An image and a sequence do not add.
    let e = arch::parse(
        "bad.arch",
        "model t\ninput 2 4 4\nclasses 3\nconv p 6 k=2 stride=2\ns = tokens(p)\n\
         x = add(p, s)\nflatten\nlinear head 3\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("line 6") && e.contains("different shapes"),
        "{e}"
    );
    // A language model must end in [T, V] logits.
    let e = arch::parse("bad.arch", &format!("{head}linear head 5\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("logits [T, 7]"), "{e}");
}

#[test]
fn synthetic_tokens_save_and_load_as_int64() {
    let m = arch::parse(
        "t.arch",
        "model t\ninput tokens 6\nclasses 7\nembedding e 7 8\nlinear head 7\n",
    )
    .unwrap();
    let d = data::synthetic_tokens(6, 7, 4, 9).unwrap();
    d.validate(&m).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.safetensors");
    d.save(&path).unwrap();
    let back = Dataset::load(&path).unwrap();
    assert_eq!(back.x, d.x);
    assert_eq!(back.shape, d.shape);
    assert!(d.x.iter().all(|&t| (t as usize) < 7));
}

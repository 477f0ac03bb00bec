//! Default initialisation of the sequence layers (no weights given), as
//! the PyTorch modules' own: nn.Embedding N(0, 1) (token and position
//! embeddings), Hugging Face Conv1D N(0, 0.02²) weight and zero bias,
//! nn.MultiheadAttention's xavier_uniform_ in_proj_weight and zero
//! in_proj / out_proj biases, torchvision ViT's class_token zeros and
//! pos_embedding N(0, 0.02²), LayerNorm ones and zeros. Checked by the
//! sample moments of each tensor: with n ≥ 1024 draws the standard
//! deviation's relative sampling error is about 1/√(2n) ≤ 2.2%, so 8%
//! is 3.6σ (the seed is fixed: the draws do not change) while a wrong law (U(-1, 1) for N(0, 1): std 0.58; a
//! fan-in bound for 0.02) is off by 40% or more.

use hesscope::model::{Model, Weights};

fn tensor<'a>(m: &Model, w: &'a Weights, name: &str) -> &'a [f64] {
    let p = m
        .params
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    &w.theta[p.offset..p.offset + p.numel()]
}

fn moments(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn check_std(m: &Model, w: &Weights, name: &str, std: f64) {
    let x = tensor(m, w, name);
    let (mean, s) = moments(x);
    eprintln!(
        "{name}: {} values, mean {mean:.4}, std {s:.4} (want {std})",
        x.len()
    );
    assert!(x.len() >= 1024, "{name}");
    assert!((s / std - 1.0).abs() <= 0.08, "{name}: std {s} vs {std}");
    assert!(
        mean.abs() <= 4.0 * std / (x.len() as f64).sqrt(),
        "{name}: mean {mean}"
    );
}

fn check_const(m: &Model, w: &Weights, name: &str, c: f64) {
    assert!(
        tensor(m, w, name).iter().all(|&v| v == c),
        "{name} not all {c}"
    );
}

fn load(file: &str) -> (Model, Weights) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    let m = Model::load(path.to_str().unwrap()).unwrap();
    let w = Weights::init(&m, 7);
    (m, w)
}

#[test]
fn gpt2_defaults_are_the_modules_own() {
    let (m, w) = load("gpt2-tiny.arch");
    check_std(&m, &w, "transformer.wte.weight", 1.0);
    check_std(&m, &w, "transformer.wpe.weight", 1.0);
    for l in 0..2 {
        for c in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
            check_std(&m, &w, &format!("transformer.h.{l}.{c}.weight"), 0.02);
            check_const(&m, &w, &format!("transformer.h.{l}.{c}.bias"), 0.0);
        }
        for ln in ["ln_1", "ln_2"] {
            check_const(&m, &w, &format!("transformer.h.{l}.{ln}.weight"), 1.0);
            check_const(&m, &w, &format!("transformer.h.{l}.{ln}.bias"), 0.0);
        }
    }
}

#[test]
fn vit_defaults_are_torchvisions() {
    let (m, w) = load("vit-tiny.arch");
    check_const(&m, &w, "class_token", 0.0);
    check_std(&m, &w, "encoder.pos_embedding", 0.02);
    for l in 0..2 {
        let a = format!("encoder.layers.encoder_layer_{l}.self_attention");
        // xavier_uniform_ on [3D, D]: U(±√(6/(D + 3D))), std bound/√3.
        let bound = (6.0f64 / (4.0 * 64.0)).sqrt();
        let x = tensor(&m, &w, &format!("{a}.in_proj_weight"));
        assert!(x.iter().all(|v| v.abs() < bound));
        check_std(&m, &w, &format!("{a}.in_proj_weight"), bound / 3f64.sqrt());
        check_const(&m, &w, &format!("{a}.in_proj_bias"), 0.0);
        check_const(&m, &w, &format!("{a}.out_proj.bias"), 0.0);
        // out_proj.weight keeps nn.Linear's kaiming_uniform(a=√5): U(±1/√D).
        let ow = tensor(&m, &w, &format!("{a}.out_proj.weight"));
        assert!(ow.iter().all(|v| v.abs() < 1.0 / 8.0));
        check_std(
            &m,
            &w,
            &format!("{a}.out_proj.weight"),
            1.0 / 8.0 / 3f64.sqrt(),
        );
    }
}

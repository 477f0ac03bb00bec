//! The channel layers of torchvision's CNNs in one network
//! (`tests/data/struct-ops.arch`: narrow, concat of three and five values,
//! channel shuffle, squeeze-and-excitation's broadcast mul, an
//! element-wise mul, adaptive average pooling down and up, a concat and a
//! mul of the input itself): the float64 reference against PyTorch
//! float64 (≤ 1e-10, the fixtures' bound: both sides are float64 to
//! ~1e-15, and any wrong term errs by ≥ 1e-3), the GPU against the
//! float64 reference (≤ 1e-5, as every fixture: float32 kernels with
//! float64 decisions), `arch::to_text` writing the layers back, and bad
//! layers refused by name.

mod common;

use hesscope::cpu::CpuReference;
use hesscope::data::{self, Dataset};
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::{EngineOptions, GpuEngine};
use hesscope::model::{arch, params, Model, Op, Weights};
use std::path::PathBuf;

fn arch_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/struct-ops.arch")
}

fn model() -> Model {
    Model::load(arch_path().to_str().unwrap()).unwrap()
}

#[test]
fn the_channel_layers_parse_and_round_trip_through_to_text() {
    let m = model();
    let count = |k: &str| m.nodes.iter().filter(|n| n.kind() == k).count();
    assert_eq!(
        [
            count("narrow"),
            count("concat"),
            count("shuffle"),
            count("mul")
        ],
        [3, 2, 1, 3]
    );
    assert_eq!(count("adaptive_avgpool"), 5);
    let dense = m.nodes.iter().find(|n| n.name == "dense").unwrap();
    assert_eq!(dense.inputs.len(), 5, "one node reads five values");
    assert_eq!(dense.inputs[4], 0, "the input itself");
    assert_eq!(dense.out_shape.c, 8 + 4 + 12 + 3 + 3);
    // mul(in_s, input) is stored as (x, s): the input, then the gate.
    let xin = m.nodes.iter().find(|n| n.name == "xin").unwrap();
    assert_eq!(xin.inputs[0], 0);
    assert_eq!(xin.out_shape, m.input);
    let up = m.nodes.iter().find(|n| n.name == "up").unwrap();
    assert_eq!(up.op, Op::AdaptiveAvgPool { h: 5, w: 6 });
    assert_eq!((up.in_shape.h, up.in_shape.w), (3, 4));

    let text = arch::to_text(&m);
    for want in [
        "a = narrow(r0) start=0 len=4",
        "cat = concat(a, se, a)",
        "sh = shuffle(cat) groups=3",
        "xin = mul(input, in_s)",
        "dense = concat(r0, d1r, sh, xin, input)",
        "up = adaptive_avgpool(down) h=5 w=6",
    ] {
        assert!(text.contains(want), "`{want}` missing from\n{text}");
    }
    let back = arch::parse("struct-ops (explicit)", &text).unwrap();
    assert_eq!(back.n_params, m.n_params);
    for (p, q) in m.params.iter().zip(&back.params) {
        assert_eq!((&p.name, &p.shape, p.offset), (&q.name, &q.shape, q.offset));
    }
    assert_eq!(back.nodes.len(), m.nodes.len());
    for (a, b) in m.nodes.iter().zip(&back.nodes) {
        assert_eq!(
            (&a.op, &a.inputs, a.in_shape, a.out_shape),
            (&b.op, &b.inputs, b.in_shape, b.out_shape),
            "node {}",
            a.name
        );
    }
    assert_eq!(
        arch::to_text(&back),
        text,
        "the written form is a fixed point"
    );

    // The sequential forms of the one-input layers.
    let seq = "model s\ninput 4 5 5\nclasses 2\nconv c 6 k=1\nshuffle groups=2\n\
               narrow n start=1 len=3\nadaptive_avgpool h=7 w=2\nflatten\nlinear fc 2\n";
    let s = arch::parse("seq.arch", seq).unwrap();
    let ops: Vec<&Op> = s.nodes.iter().map(|n| &n.op).collect();
    assert_eq!(ops[1], &Op::ChannelShuffle { groups: 2 });
    assert_eq!(ops[2], &Op::Narrow { start: 1, len: 3 });
    assert_eq!(s.nodes[2].name, "n");
    assert_eq!(s.nodes[3].out_shape, hesscope::model::Shape::new(3, 7, 2));

    // Flat values concatenate (and narrow) as PyTorch's [N, C] do along
    // dim 1: the result stays flat, so `linear` takes it.
    let f = arch::parse("flat.arch", FLAT).unwrap();
    let k = f.nodes.iter().find(|n| n.name == "k").unwrap();
    assert_eq!(k.out_shape, hesscope::model::Shape::new(3 + 12 + 3, 1, 1));
    assert_eq!(f.param("fc.weight").unwrap().shape, vec![2, 5]);
}

#[test]
fn bad_channel_layers_are_refused_naming_the_line_and_layer() {
    let head = "model m\ninput 4 6 6\nclasses 2\nc = conv(input) 6 k=1\n";
    let cases = [
        (
            "n = narrow(c) start=4 len=3\n",
            "narrow `n`",
            "within its input's 6 channels",
        ),
        ("n = narrow(c) start=0 len=0\n", "narrow `n`", "nonempty"),
        ("n = narrow(c) len=2\n", "narrow", "start=N is required"),
        ("n = narrow(c) start=-1 len=2\n", "narrow", "whole number"),
        ("s = shuffle(c) groups=4\n", "shuffle `s`", "must divide"),
        ("s = shuffle(c) groups=0\n", "shuffle `s`", "must divide"),
        (
            "s = shuffle(c) group=2\n",
            "shuffle",
            "unknown option `group`",
        ),
        (
            "p = adaptive_avgpool(c) h=0 w=2\n",
            "adaptive_avgpool `p`",
            "positive",
        ),
        (
            "p = adaptive_avgpool(c) h=2\n",
            "adaptive_avgpool",
            "w=N is required",
        ),
        (
            "f = flatten(c)\np = adaptive_avgpool(f) h=1 w=1\n",
            "adaptive_avgpool",
            "AdaptiveAvgPool2d raises",
        ),
        (
            "k = concat(c)\n",
            "`k = concat(...)`",
            "at least two inputs",
        ),
        (
            "d = conv(input) 2 k=3\nk = concat(c, d)\n",
            "`k = concat(...)`",
            "differ in height and width",
        ),
        (
            "f = flatten(c)\nk = concat(f, f, c)\n",
            "`k = concat(...)`",
            "or one is flat",
        ),
        ("k = mul(c, c, c)\n", "`k = mul(...)`", "takes two inputs"),
        (
            "d = conv(input) 5 k=1\nk = mul(c, d)\n",
            "`k = mul(...)`",
            "the factor must have the other's shape",
        ),
        (
            "p = adaptive_avgpool(c) h=1 w=2\nk = mul(c, p)\n",
            "`k = mul(...)`",
            "[C, 1, 1]",
        ),
        (
            "k = cat(c, c)\n",
            "`k = cat(...)`",
            "known: add, concat, mul",
        ),
    ];
    for (body, layer, want) in cases {
        let e = arch::parse("bad.arch", &format!("{head}{body}"))
            .unwrap_err()
            .to_string();
        let line = format!("line {}", 4 + body.lines().count());
        assert!(
            e.contains(&line) && e.contains(layer) && e.contains(want),
            "{body:?}: {e}"
        );
    }
}

/// Nodes the parser would never make (an importer's bug) are refused by
/// the engine's checks and by `Problem::new` (before the float64
/// reference indexes out of range), naming the layer.
#[test]
fn malformed_channel_nodes_are_refused_by_name() {
    let m = model();
    let node = |name: &str| m.nodes.iter().position(|n| n.name == name).unwrap();
    type Change = Box<dyn Fn(&mut Model, usize)>;
    let cases: Vec<(usize, Change, &str)> = vec![
        (
            node("sh"),
            Box::new(|m, i| m.nodes[i].op = Op::ChannelShuffle { groups: 5 }),
            "groups must divide",
        ),
        (
            node("upn"),
            Box::new(|m, i| m.nodes[i].op = Op::Narrow { start: 10, len: 22 }),
            "within them",
        ),
        (
            node("dense"),
            Box::new(|m, i| {
                m.nodes[i].inputs.pop();
            }),
            "concat of 27 channels",
        ),
        (
            node("se"),
            Box::new(|m, i| m.nodes[i].inputs[1] = 0),
            "s must have x's shape",
        ),
        (
            node("pooled"),
            Box::new(|m, i| m.nodes[i].op = Op::AdaptiveAvgPool { h: 3, w: 2 }),
            "must give",
        ),
    ];
    for (i, change, want) in cases {
        let mut bad = m.clone();
        change(&mut bad, i);
        let e = hesscope::layers::check_model(&bad).unwrap_err().to_string();
        assert!(e.contains(&m.nodes[i].name) && e.contains(want), "{e}");
        // The float64 reference refuses it too, rather than panic.
        let data = data::try_synthetic(bad.input, bad.classes, 2, 1).unwrap();
        let w = Weights::init(&bad, 1);
        let e = Problem::new(bad, w, data, 2, BnMode::Running).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    hesscope::layers::check_model(&m).unwrap();
}

fn has_torch() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import torch, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Needs python3 with torch and safetensors (skipped with a message
/// where they are missing).
#[test]
fn the_float64_reference_matches_pytorch_float64() {
    if !has_torch() {
        eprintln!("SKIPPED: python3 with torch and safetensors not found");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .arg(root.join("python/tests/struct_ops_torch.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let losses: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let m = model();
    let dir = tmp.path();
    for (bn, tag) in [(BnMode::Batch, "batch"), (BnMode::Running, "running")] {
        let weights = Weights::load(&m, &dir.join("weights.safetensors")).unwrap();
        let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
        let p = Problem::new(m.clone(), weights, data, 4, bn).unwrap();
        let v = params::load_vector(&m, &dir.join("v.safetensors")).unwrap();
        let g_ref = params::load_vector(&m, &dir.join(format!("grad-{tag}.safetensors"))).unwrap();
        let hv_ref = params::load_vector(&m, &dir.join(format!("hv-{tag}.safetensors"))).unwrap();
        let (loss, g, hv) = CpuReference::new(p).loss_grad_hvp(&v).unwrap();
        let l_ref = losses[tag].as_f64().unwrap();
        let el = (loss - l_ref).abs() / l_ref.abs();
        let (eg, eh) = (common::rel_err(&g, &g_ref), common::rel_err(&hv, &hv_ref));
        eprintln!("struct-ops {tag}: loss {el:.1e} grad {eg:.1e} Hv {eh:.1e} vs PyTorch float64");
        assert!(
            el <= 1e-10 && eg <= 1e-10 && eh <= 1e-10,
            "{tag}: loss {el:.1e}, gradient {eg:.1e}, Hv {eh:.1e}"
        );
    }
}

/// Flat values through concat (one read twice), narrow and a mul of a
/// value by itself.
const FLAT: &str = "model f\ninput 2 4 4\nclasses 2\nc = conv(input) 3 k=3\ng = gap(c)\n\
                    h = flatten(c)\nk = concat(g, h, g)\nn = narrow(k) start=1 len=5\n\
                    m = mul(n, n)\nlinear fc 2\n";

/// Six samples in batches of 4 and 2, block products of three
/// directions: the GPU's gradient, Hv and block Hv against the float64
/// reference's.
fn gpu_matches(m: &Model, bn: BnMode, label: &str) {
    let data = data::try_synthetic(m.input, m.classes, 6, 11).unwrap();
    let vs: Vec<Vec<f64>> = (0..3u64)
        .map(|s| {
            let w = Weights::init(m, 100 + s);
            w.theta.iter().map(|x| x * 3.0 + 0.01).collect()
        })
        .collect();
    let vrefs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
    let p = Problem::new(m.clone(), Weights::init(m, 7), data, 4, bn).unwrap();
    let mut cpu = CpuReference::new(p.clone());
    let (_, g, hv) = cpu.loss_grad_hvp(&vs[0]).unwrap();
    let block = cpu.hv_block(&vrefs).unwrap();
    for (name, ctx) in common::gpu_contexts() {
        let opts = EngineOptions {
            block: Some(3),
            ..Default::default()
        };
        let mut e = GpuEngine::with_options(ctx, &p, opts).unwrap();
        let (_, g2, hv2) = e.loss_grad_hvp(&vs[0]).unwrap();
        let (eg, eh) = (common::rel_err(&g2, &g), common::rel_err(&hv2, &hv));
        let mut outs = vec![vec![0.0; m.n_params]; 3];
        e.hvp_block(&vrefs, &mut outs).unwrap();
        let eb = outs
            .iter()
            .zip(&block)
            .map(|(a, b)| common::rel_err(a, b))
            .fold(0.0, f64::max);
        eprintln!("{label} {bn:?} {name}: grad {eg:.1e} Hv {eh:.1e} block Hv {eb:.1e}");
        assert!(
            eg <= 1e-5 && eh <= 1e-5 && eb <= 1e-5,
            "{label} {bn:?} {name}: gradient {eg:.1e}, Hv {eh:.1e}, block Hv {eb:.1e}"
        );
    }
}

#[test]
fn the_gpu_matches_the_float64_reference() {
    let m = model();
    for bn in [BnMode::Batch, BnMode::Running] {
        gpu_matches(&m, bn, "struct-ops");
    }
    gpu_matches(
        &arch::parse("flat.arch", FLAT).unwrap(),
        BnMode::Batch,
        "flat",
    );
}

//! A whole model of grouped, depthwise and dilated convolutions and
//! ceil-mode pools (`tests/data/grouped-conv.arch`): its `.arch` syntax,
//! shapes and refusals; the float64 reference against PyTorch float64
//! (where python3 has torch: `python/tests/grouped_conv_reference.py`);
//! the GPU engine against the float64 reference on Vulkan and GL, on both
//! conv paths, single and block products, both batch-norm modes.

mod common;

use common::{gpu_context, rel_err, GPU_BACKENDS};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::executor::{ConvPath, EngineOptions};
use hesscope::gpu::kernels::Kernel;
use hesscope::gpu::GpuEngine;
use hesscope::model::{arch, params, Model, Op, Weights};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn arch_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/grouped-conv.arch")
}

fn model() -> Model {
    Model::load(arch_path().to_str().unwrap()).unwrap()
}

#[test]
fn the_arch_syntax_gives_pytorch_shapes_and_reads_back() {
    let m = model();
    let shape = |name: &str| -> Vec<usize> {
        m.params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .shape
            .clone()
    };
    // PyTorch's weight layout [COUT, CIN/groups, K, K].
    assert_eq!(shape("g2.weight"), vec![8, 4, 3, 3]);
    assert_eq!(shape("d3.weight"), vec![8, 1, 3, 3]);
    assert_eq!(shape("x4.weight"), vec![16, 2, 3, 3]);
    assert_eq!(shape("dw5.weight"), vec![32, 1, 3, 3]);
    assert_eq!(shape("fc.weight"), vec![5, 32 * 3 * 3]);
    let outs: Vec<(usize, usize)> = m
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::MaxPool { .. } | Op::AvgPool { .. }))
        .map(|n| (n.out_shape.h, n.out_shape.w))
        .collect();
    assert_eq!(outs, vec![(8, 8), (5, 5), (3, 3)]);
    // The explicit-edge text writes groups, dilation and ceil, and reads
    // back to the same graph.
    let text = arch::to_text(&m);
    assert!(
        text.contains("groups=16") && text.contains("dilation=2") && text.contains("ceil=true")
    );
    let back = arch::parse("back.arch", &text).unwrap();
    let ops = |m: &Model| m.nodes.iter().map(|n| n.op.clone()).collect::<Vec<_>>();
    assert_eq!(ops(&back), ops(&m));
    // Dilation in the output size: ⌊(H + 2·pad − dilation·(k − 1) − 1)/stride⌋ + 1.
    let one = |line: &str| {
        arch::parse(
            "t.arch",
            &format!("model t\ninput 4 11 11\nclasses 2\n{line}\nflatten\nlinear fc 2\n"),
        )
    };
    let m = one("conv c 4 k=3 stride=2 pad=1 dilation=3").unwrap();
    assert_eq!(m.nodes[0].out_shape.h, (11 + 2 - 3 * 2 - 1) / 2 + 1);
    // Refused with the layer named: groups not dividing CIN or COUT, zero
    // groups or dilation, a dilated kernel past the padded input, a bad flag.
    for (line, want) in [
        ("conv c 6 k=3 groups=3", "groups=3"),
        ("conv c 4 k=3 groups=8", "groups=8"),
        ("conv c 4 k=3 groups=0", "groups"),
        ("conv c 4 k=3 dilation=0", "dilation"),
        ("conv c 4 k=3 dilation=6", "larger than the padded input"),
        ("maxpool k=2 ceil=yes", "ceil must be true or false"),
    ] {
        let e = one(line).unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
        if line.starts_with("conv") {
            assert!(e.contains("conv `c`"), "{line}: {e}");
        }
    }
}

/// Needs python3 with torch and safetensors (skipped with a message
/// wherever they are missing, CI included).
#[test]
fn the_float64_reference_matches_pytorch_float64() {
    let has_torch = std::process::Command::new("python3")
        .args(["-c", "import torch, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        eprintln!("SKIPPED: python3 with torch and safetensors not found");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .arg(root.join("python/tests/grouped_conv_reference.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let m = model();
    // Every layer's output shape is PyTorch's (ceil_mode and dilation).
    let torch_shapes = r["shapes"].as_array().unwrap();
    assert_eq!(torch_shapes.len(), m.nodes.len());
    for (node, t) in m.nodes.iter().zip(torch_shapes) {
        let t: Vec<usize> = t[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let s = node.out_shape;
        let ours = if t.len() == 1 {
            vec![s.numel()]
        } else {
            vec![s.c, s.h, s.w]
        };
        assert_eq!(ours, t, "{} ({})", node.name, node.kind());
    }
    let dir = tmp.path();
    for (bn, tag) in [(BnMode::Batch, "batch"), (BnMode::Running, "running")] {
        let weights = Weights::load(&m, &dir.join("w.safetensors")).unwrap();
        let data = Dataset::load(&dir.join("d.safetensors")).unwrap();
        let p = Problem::new(m.clone(), weights, data, 6, bn).unwrap();
        let v = params::load_vector(&m, &dir.join("v.safetensors")).unwrap();
        let g_ref = params::load_vector(&m, &dir.join(format!("grad-{tag}.safetensors"))).unwrap();
        let hv_ref = params::load_vector(&m, &dir.join(format!("hv-{tag}.safetensors"))).unwrap();
        let (loss, g, hv) = CpuReference::new(p).loss_grad_hvp(&v).unwrap();
        let loss_ref = r[tag].as_f64().unwrap();
        let el = (loss - loss_ref).abs() / loss_ref.abs();
        let (eg, eh) = (rel_err(&g, &g_ref), rel_err(&hv, &hv_ref));
        eprintln!("grouped-conv {tag}: float64 vs PyTorch float64: loss {el:.1e} grad {eg:.1e} Hv {eh:.1e}");
        // Both float64 (the fixtures' bound): 1e-10.
        assert!(
            el <= 1e-10 && eg <= 1e-10 && eh <= 1e-10,
            "{tag}: {el:.1e} {eg:.1e} {eh:.1e}"
        );
    }
}

fn gpu_problem(bn: BnMode) -> Problem {
    let m = model();
    let mut w = Weights::init(&m, 4);
    let mut r = rand::rngs::StdRng::seed_from_u64(8);
    for p in &m.params {
        if p.name.starts_with('b') {
            let (lo, hi) = if p.name.ends_with("weight") {
                (0.5, 1.5)
            } else {
                (-0.2, 0.2)
            };
            for t in &mut w.theta[p.offset..p.offset + p.numel()] {
                *t = lo + (hi - lo) * r.random::<f64>();
            }
        }
    }
    for (i, b) in w.buffers.iter_mut().enumerate() {
        let var = m.buffers[i].name.ends_with("running_var");
        for x in b.iter_mut() {
            *x = if var {
                0.5 + r.random::<f64>()
            } else {
                0.2 * (r.random::<f64>() - 0.5)
            };
        }
    }
    let data = hesscope::data::synthetic(m.input, m.classes, 8, 5);
    Problem::new(m, w, data, 8, bn).unwrap()
}

/// The GPU against the float64 reference (decisions from float64, the
/// default, so the only error is float32 arithmetic): 1e-5, tests/gpu.rs's
/// bound for whole models (PyTorch's own float32 reaches ~5e-7 on such
/// models; any wrong term errs by ≥ 1e-3). Every conv path runs the
/// direct kernels for the grouped and dilated layers.
#[test]
fn the_gpu_matches_the_float64_reference_on_every_path() {
    const TOL: f64 = 1e-5;
    let mut rows = vec![];
    for choice in GPU_BACKENDS {
        for bn in [BnMode::Batch, BnMode::Running] {
            let p = gpu_problem(bn);
            let n = p.model.n_params;
            let mut r = rand::rngs::StdRng::seed_from_u64(21);
            let vs: Vec<Vec<f64>> = (0..3)
                .map(|_| (0..n).map(|_| r.random::<f64>() - 0.5).collect())
                .collect();
            let cpu = CpuReference::new(p.clone());
            let refs: Vec<_> = vs.iter().map(|v| cpu.pass(Some(v)).unwrap()).collect();
            for path in [ConvPath::Emulator, ConvPath::Tiled] {
                let Some(ctx) = gpu_context(choice) else {
                    return;
                };
                let options = EngineOptions {
                    conv_path: path,
                    block: Some(3),
                    ..Default::default()
                };
                let mut e = GpuEngine::with_options(ctx, &p, options).unwrap();
                let (loss, g, hv) = e.loss_grad_hvp(&vs[0]).unwrap();
                let el = (loss - refs[0].loss).abs() / refs[0].loss.abs();
                let eg = rel_err(&g, &refs[0].grad);
                let eh = rel_err(&hv, refs[0].hv.as_ref().unwrap());
                let views: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
                let mut outs = vec![vec![f64::NAN; n]; 3];
                e.hvp_block(&views, &mut outs).unwrap();
                let eb = outs
                    .iter()
                    .zip(&refs)
                    .map(|(o, r)| rel_err(o, r.hv.as_ref().unwrap()))
                    .fold(0.0f64, |m, x| if x.is_nan() { f64::NAN } else { m.max(x) });
                let (fb, rp) = e.profile().unwrap();
                let ks: Vec<Kernel> = fb.iter().chain(&rp).map(|t| t.0).collect();
                for k in [
                    Kernel::ConvDirectForward,
                    Kernel::ConvDirectBackwardData,
                    Kernel::ConvDirectBackwardWeight,
                ] {
                    assert!(ks.contains(&k), "{choice:?} {path:?}: {k:?} not run");
                }
                let row = format!(
                    "{choice:?} {bn:?} {path:?}: loss {el:.1e} grad {eg:.1e} hv {eh:.1e} block of 3 {eb:.1e}"
                );
                eprintln!("{row}");
                let worst = [el, eg, eh, eb].iter().fold(0.0f64, |m, &x| {
                    if x.is_nan() {
                        f64::NAN
                    } else {
                        m.max(x)
                    }
                });
                rows.push((row, worst));
            }
        }
    }
    let bad: Vec<_> = rows.iter().filter(|r| r.1.is_nan() || r.1 > TOL).collect();
    assert!(bad.is_empty(), "above {TOL}: {bad:#?}");
}

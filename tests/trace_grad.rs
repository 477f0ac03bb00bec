//! `trace_grad`: ∇θ[(1/P) Σₖ vₖᵀ H vₖ] (third derivatives D³L[v, v, ·]) by
//! Richardson-extrapolated central differences of exact HVPs with the
//! piecewise decisions frozen, against PyTorch's float64 fixtures.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::data::synthetic;
use hesscope::engine::{BnMode, Problem};
use hesscope::layers::Decision;
use hesscope::model::{Model, Weights};
use hesscope::trace_grad::{trace_grad, LayerSet, Steps};

/// Measured 9.2e-14 to 6.7e-12 against PyTorch's float64 (the three
/// fixtures and the CLI; the README quotes the range); 5e-11 is 7.5× the
/// worst, the room Richardson's last correction leaves (its estimates are
/// 5.8e-12 to 1.5e-8, conservative), and a hundredfold regression fails.
const TOL: f64 = 5e-11;

const FIXTURES: [(&str, BnMode, &str); 3] = [
    ("cnn-tiny", BnMode::Batch, "third-middle"),
    ("cnn-tiny", BnMode::Running, "third-block1"),
    ("cnn-smooth", BnMode::Batch, "third-all"),
];

struct Case {
    cpu: CpuReference,
    probes: Vec<Vec<f64>>,
    want: Vec<f64>,
    estimate: f64,
}

fn case(model: &str, bn: BnMode, tag: &str) -> Case {
    let f = third_fixture(model, bn, tag);
    let selected: Vec<String> = f.json["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        f.set.names(&f.problem.model),
        selected,
        "{model} {tag}: layer set"
    );
    Case {
        cpu: CpuReference::new(f.problem),
        probes: f.probes,
        want: f.want,
        estimate: f.json["estimate"].as_f64().unwrap(),
    }
}

#[test]
fn every_fixture_matches_pytorch_third_derivatives() {
    for (model, bn, tag) in FIXTURES {
        let mut c = case(model, bn, tag);
        let t = trace_grad(&mut c.cpu, &c.probes, Steps::default()).unwrap();
        let e = rel_err(&t.grad, &c.want);
        let e_est = (t.estimate - c.estimate).abs() / c.estimate.abs();
        println!(
            "{model} {bn:?} {tag}: grad rel err {e:.2e} (Richardson estimate {:.2e}), \
             estimate rel err {e_est:.2e}, {} HVPs",
            t.error_estimate, t.hvps
        );
        assert!(e <= TOL, "{model} {tag}: {e:.3e}");
        assert!(e_est <= 1e-10, "{model} {tag}: estimate {e_est:.3e}");
        assert_eq!(t.grad.len(), c.cpu.problem.model.n_params);
        assert!(c.cpu.frozen.is_none(), "decisions are released");
    }
}

#[test]
#[ignore]
fn step_sweep() {
    for (model, bn, tag) in FIXTURES {
        let mut c = case(model, bn, tag);
        for eps in [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4] {
            for levels in [1, 2, 3, 4, 5] {
                let steps = Steps {
                    eps,
                    levels,
                    ..Steps::default()
                };
                let t = trace_grad(&mut c.cpu, &c.probes, steps).unwrap();
                println!(
                    "{model} {tag} eps {eps:.0e} levels {levels}: {:.2e} (est {:.2e})",
                    rel_err(&t.grad, &c.want),
                    t.error_estimate
                );
            }
        }
    }
}

/// The same differences with the decisions taken afresh at every θ+εv:
/// at the default step a ReLU mask flips and the result is far off.
#[test]
fn unfrozen_differences_across_a_kink_are_wrong() {
    let mut c = case("cnn-tiny", BnMode::Batch, "third-middle");
    let steps = Steps {
        freeze: false,
        ..Steps::default()
    };
    let t = trace_grad(&mut c.cpu, &c.probes, steps).unwrap();
    let e = rel_err(&t.grad, &c.want);
    println!("cnn-tiny third-middle unfrozen: rel err {e:.2e}");
    assert!(
        e > 1e-2,
        "unfrozen differences should cross a kink here: {e:.2e}"
    );
}

/// Max-pool argmax and ReLU masks replayed: at θ the frozen passes are the
/// plain ones, and along a step that changes the argmax the frozen
/// gradient stays the smooth continuation whose derivative is the exact Hv.
#[test]
fn frozen_max_pool_and_relu_decisions_give_a_smooth_piece() {
    let model = Model::load("lenet5").unwrap();
    let weights = Weights::init(&model, 3);
    let data = synthetic(model.input, model.classes, 6, 3);
    let p = Problem::new(model, weights, data, 4, BnMode::Batch).unwrap();
    let np = p.model.n_params;
    let mut cpu = CpuReference::new(p);
    let v = LayerSet::parse(&cpu.problem.model, "all")
        .unwrap()
        .rademacher(&cpu.problem.model, 1, 5)
        .unwrap()
        .remove(0);
    let plain = cpu.pass(Some(&v)).unwrap();
    let decisions = cpu.decisions();
    assert_eq!(decisions.len(), 2, "two batches");
    let argmaxes = decisions[0]
        .iter()
        .filter(|d| matches!(d, Decision::Argmax(_)))
        .count();
    assert_eq!(argmaxes, 2, "both max pools record their argmax");
    cpu.frozen = Some(decisions.clone());
    let frozen = cpu.pass(Some(&v)).unwrap();
    assert_eq!(plain.grad, frozen.grad);
    assert_eq!(plain.hv, frozen.hv);

    let theta = cpu.problem.weights.theta.clone();
    let hv = plain.hv.unwrap();
    // (g(θ+hv) − g(θ−hv)) / 2h, Richardson over h and h/2.
    let fd = |cpu: &mut CpuReference, h: f64| -> Vec<f64> {
        let mut g = |s: f64| {
            for ((t, t0), vi) in cpu.problem.weights.theta.iter_mut().zip(&theta).zip(&v) {
                *t = t0 + s * vi;
            }
            cpu.pass(None).unwrap().grad
        };
        let (a, b) = (g(h), g(-h));
        a.iter().zip(&b).map(|(x, y)| (x - y) / (2.0 * h)).collect()
    };
    let rich = |cpu: &mut CpuReference, h: f64| -> Vec<f64> {
        let d1 = fd(cpu, h);
        let d2 = fd(cpu, h / 2.0);
        d2.iter().zip(&d1).map(|(b, a)| b + (b - a) / 3.0).collect()
    };
    let h = 2e-3;
    // The step changes decisions: some argmax or mask differs at θ+hv.
    let moved_theta: Vec<f64> = theta.iter().zip(&v).map(|(t, vi)| t + h * vi).collect();
    cpu.problem.weights.theta.copy_from_slice(&moved_theta);
    cpu.frozen = None;
    let moved = cpu.decisions();
    let changed_pool = decisions[0]
        .iter()
        .zip(&moved[0])
        .any(|(a, b)| matches!(a, Decision::Argmax(_)) && a != b);
    let e_free = rel_err(&rich(&mut cpu, h), &hv);
    cpu.frozen = Some(decisions);
    let e_frozen = rel_err(&rich(&mut cpu, h), &hv);
    cpu.problem.weights.theta.copy_from_slice(&theta);
    println!(
        "lenet5 step {h}: argmax changed {changed_pool}; Hv by differences of the gradient: \
         frozen {e_frozen:.2e}, unfrozen {e_free:.2e} ({np} parameters)"
    );
    assert!(changed_pool, "the step should move some max-pool argmax");
    assert!(e_frozen < 1e-6, "frozen {e_frozen:.2e}");
    assert!(e_free > 100.0 * e_frozen, "unfrozen {e_free:.2e}");
}

fn cnn_tiny_args(bn: &str, backend: &str) -> Vec<String> {
    let fx = fixtures_dir().join("cnn-tiny");
    [
        "trace-grad",
        "--backend",
        backend,
        "--model",
        "cnn-tiny",
        "--batch",
        "32",
        "--bn",
        bn,
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> (bool, String, String) {
    hesscope(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// On the float64 reference within `TOL`; on the GPU engines (lavapipe,
/// llvmpipe: float32 products with held decisions) within the bound the
/// run states, which must meet the 1e-3 aim (tests/trace_grad_gpu.rs
/// derives it; measured 4.6e-6 here).
#[test]
fn cli_writes_the_fixture_gradient_and_the_spec_json() {
    for backend in ["cpu", "vulkan", "gl"] {
        cli_fixture_gradient(backend);
    }
}

fn cli_fixture_gradient(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    let dir = ref_dir("cnn-tiny", BnMode::Running).join("third-block1");
    let mut args = cnn_tiny_args("running", backend);
    args.extend(["--layer", "block1", "--json", "--out"].map(String::from));
    args.push(out.to_str().unwrap().into());
    args.push("--probe".into());
    for k in 0..2 {
        args.push(
            dir.join(format!("probe-{k}.safetensors"))
                .to_str()
                .unwrap()
                .into(),
        );
    }
    let (ok, stdout, stderr) = run(&args);
    if !ok && backend != "cpu" && stderr.contains("no ") && stderr.contains("adapter") {
        skip(&format!("no {backend} adapter: {stderr}"));
        return;
    }
    assert!(ok, "{backend}: {stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in [
        "estimate",
        "grad_norm",
        "probes",
        "layers",
        "backend",
        "selected",
        "error_estimate",
    ] {
        assert!(!j[key].is_null(), "missing {key}: {stdout}");
    }
    assert_eq!(j["probes"], 2);
    assert_eq!(j["layers"], "block1");
    let want = json(dir.join("third.json"));
    let e_est = (j["estimate"].as_f64().unwrap() - want["estimate"].as_f64().unwrap()).abs()
        / want["estimate"].as_f64().unwrap().abs();
    let p = problem("cnn-tiny", BnMode::Running);
    let e = rel_err(
        &vector(&p, out),
        &vector(&p, dir.join("trace_grad.safetensors")),
    );
    let bound = j["error_estimate"].as_f64().unwrap();
    println!("CLI {backend} cnn-tiny running block1: rel err {e:.2e} (stated bound {bound:.2e}), estimate {e_est:.2e}");
    if backend == "cpu" {
        assert_eq!(j["backend"], "cpu");
        assert!(e_est < 1e-10, "estimate {e_est:.2e}");
        assert!(e <= TOL, "{e:.2e}");
    } else {
        assert_ne!(j["backend"], "cpu");
        assert!(
            j["method"].as_str().unwrap().contains("float32"),
            "{stdout}"
        );
        // vᵀHv from one float32 product: its accuracy (4e-7 on every
        // fixture, tests/gpu.rs) with margin.
        assert!(e_est < 1e-5, "estimate {e_est:.2e}");
        // Measured 4.6e-6 on Vulkan and GL (bound 5.6e-5): held 8.7× above
        // it, as tests/trace_grad_gpu.rs holds the library's.
        assert!(
            e <= 4e-5 && e <= bound && bound <= 1e-3,
            "{e:.2e} (bound {bound:.2e})"
        );
    }
}

#[test]
fn cli_draws_rademacher_probes_on_the_layer_set() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    let mut args = cnn_tiny_args("batch", "cpu");
    args.extend(["--layer", "middle", "--probes", "2", "--json", "--out"].map(String::from));
    args.push(out.to_str().unwrap().into());
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(j["probes"], 2);
    assert_eq!(j["selected"].as_array().unwrap().len(), 10);
    assert!(j["grad_norm"].as_f64().unwrap() > 0.0);
    assert!(out.exists());
}

#[test]
fn cli_refuses_bad_inputs_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    let middle = ref_dir("cnn-tiny", BnMode::Batch).join("third-middle");
    let probe = middle.join("probe-0.safetensors");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        // A middle probe is non-zero on block2, outside block1.
        (
            "cpu",
            vec!["--layer", "block1", "--probe", probe.to_str().unwrap()],
            "invalid --probe",
        ),
        (
            "cpu",
            vec!["--layer", "nosuch", "--probes", "1"],
            "invalid --layer",
        ),
        (
            "cpu",
            vec!["--layer", "block1,,fc", "--probes", "1"],
            "invalid --layer",
        ),
        ("cpu", vec!["--probes", "0"], "invalid --probes"),
        // Float32 recordings stay in each batch's workspace; float64
        // decisions (the default) are rewritten into a shared one.
        (
            "vulkan",
            vec![
                "--probes",
                "1",
                "--cache-budget",
                "0",
                "--decisions",
                "float32",
            ],
            "every batch resident",
        ),
        ("cpu", vec![], "--probe"),
    ];
    for (backend, extra, want) in cases {
        let mut args = cnn_tiny_args("batch", backend);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--out".into());
        args.push(out.to_str().unwrap().into());
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote the output");
    }
}

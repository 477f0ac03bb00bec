//! The Hessian-trace regulariser in training (`hesscope train --htr-*`):
//! a regularised step's gradient is the plain one plus γ times exactly
//! what `trace-grad` computes on the same mini-batch and probes, the
//! schedule (every K steps, from epoch E) is as documented, and a resumed
//! run with the regulariser and augmentation on repeats an uninterrupted
//! one bit for bit.
//!
//! Tolerance 1e-8 (the brief's, as for `trace-grad` against PyTorch): both
//! sides are the same float64 computation of D³L[v, v, ·] (7 exact HVPs per
//! probe on the same mini-batch), so what separates them is rounding in
//! the subtraction regularised − plain, ≈ 1e-16·‖g‖/‖γ·∇trace‖, which the
//! tests keep near 1e-14 by choosing γ so that γ·∇trace is not small
//! against g (asserted). An extra term with zero gradient (e.g. γ·trace
//! added to the loss as a detached number) leaves regularised − plain = 0,
//! relative error 1.

mod common;
use common::*;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Problem};
use hesscope::model::{params, tensorio, Model, Weights};
use hesscope::trace_grad::{trace_grad_on, LayerSet, Steps};
use hesscope::train::{
    htr_probes, initial_counts, permutation, samples, Htr, ProbeDist, Recipe, Trainer,
};
use std::path::Path;

const TOL: f64 = 1e-8;

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn recipe(shuffle: bool) -> Recipe {
    Recipe {
        epochs: 3,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        milestones: vec![],
        lr_gamma: 0.1,
        shuffle,
        seed: 7,
    }
}

fn trainer(model: &str, batch: usize, shuffle: bool, htr: Option<Htr>) -> Trainer {
    let dir = fixtures_dir().join(model);
    let m = Model::load(model).unwrap();
    let wpath = dir.join("weights.safetensors");
    let w = Weights::load(&m, &wpath).unwrap();
    let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
    let counts = initial_counts(&m, Some(&wpath)).unwrap();
    let mut t = Trainer::new(m, w, data, batch, recipe(shuffle), counts).unwrap();
    t.set_htr(htr).unwrap();
    t
}

fn htr(gamma: f64, layers: &str, probes: usize, every: usize, from_epoch: usize) -> Htr {
    Htr {
        gamma,
        layers: layers.into(),
        probes,
        every,
        from_epoch,
        dist: ProbeDist::Rademacher,
    }
}

/// The regularised step's total gradient minus the plain one, against γ
/// times `trace_grad` over the mini-batch as its own problem with the
/// documented probes; returns the relative error and ‖γ·∇trace‖/‖g‖.
fn check_step(reg: &Trainer, plain: &Trainer, start: usize, count: usize) -> (f64, f64) {
    let h = reg.htr().unwrap().clone();
    let theta = &reg.weights().theta;
    assert_eq!(theta, &plain.weights().theta);
    let wd = reg.recipe.weight_decay;
    let sg = reg.gradient(start, count).unwrap();
    let sp = plain.gradient(start, count).unwrap();
    assert!(sp.htr.is_none());
    let got: Vec<f64> = sg
        .total(h.gamma, wd, theta)
        .iter()
        .zip(sp.total(0.0, wd, theta))
        .map(|(a, b)| a - b)
        .collect();
    // Independently: the documented probes, the mini-batch as a problem.
    let m = reg.model();
    let set = LayerSet::parse(m, &h.layers).unwrap();
    let probes = htr_probes(
        m,
        &set,
        h.probes,
        h.dist,
        reg.recipe.seed,
        reg.epoch,
        reg.steps,
    )
    .unwrap();
    assert_eq!(probes, sg.htr.as_ref().unwrap().probes);
    let mini = Problem::new(
        m.clone(),
        reg.weights().clone(),
        samples(&reg.cpu.problem.data, start, count),
        count,
        BnMode::Batch,
    )
    .unwrap();
    let tg = trace_grad_on(mini, &probes, Steps::default()).unwrap();
    let want: Vec<f64> = tg.grad.iter().map(|t| h.gamma * t).collect();
    assert_eq!(sg.htr.as_ref().unwrap().estimate, tg.estimate);
    (rel_err(&got, &want), norm(&want) / norm(&sp.data_grad))
}

#[test]
fn the_regularised_gradient_adds_gamma_times_trace_grad() {
    // cnn-tiny (batch norm, ReLU): the middle layers, 2 probes, a batch of
    // 16 of the fixture's 64 samples.
    let h = htr(0.05, "middle", 2, 1, 0);
    let mut reg = trainer("cnn-tiny", 16, true, Some(h));
    let mut plain = trainer("cnn-tiny", 16, true, None);
    let (e, share) = check_step(&reg, &plain, 0, 16);
    println!("cnn-tiny middle, first step: {e:.2e} (‖γ∇trace‖/‖g‖ {share:.2})");
    assert!(share > 0.1, "γ·∇trace too small to test: {share:.2e}");
    assert!(e <= TOL, "{e:.2e}");
    // Later in a shuffled run: after one epoch of both runs (they differ
    // by then), the plain trainer is put on the regularised one's weights,
    // data order and counters; samples 32..48 of the permuted order, with
    // the probes of step 4 of epoch 1.
    reg.epoch().unwrap();
    plain.epoch().unwrap();
    plain.cpu.problem.weights = reg.weights().clone();
    plain.cpu.problem.data = reg.cpu.problem.data.clone();
    plain.steps = reg.steps;
    plain.epoch = reg.epoch;
    let perm = permutation(64, 7, 0);
    assert_ne!(perm, (0..64).collect::<Vec<_>>());
    let (e, share) = check_step(&reg, &plain, 32, 16);
    println!("cnn-tiny middle, after an epoch (shuffled): {e:.2e} (share {share:.2})");
    assert!(share > 0.01 && e <= TOL, "{e:.2e} {share:.2e}");
}

#[test]
fn every_and_from_epoch_choose_the_regularised_steps() {
    // mlp-tiny, batch 16: 4 steps per epoch; every 3 from epoch 1.
    let h = htr(0.1, "all", 1, 3, 1);
    let mut t = trainer("mlp-tiny", 16, false, Some(h.clone()));
    let mut active = vec![];
    for _ in 0..3 {
        let r = t.epoch().unwrap();
        active.push(r.htr.len());
    }
    // Steps 0..12, epoch e holding 4e..4e+4; regularised: epoch ≥ 1 and
    // step % 3 == 0, i.e. step 6 (epoch 1) and step 9 (epoch 2).
    let want: Vec<usize> = (0..3)
        .map(|e| (e * 4..e * 4 + 4).filter(|&s| h.active(e, s)).count())
        .collect();
    assert_eq!(want, vec![0, 1, 1]);
    assert_eq!(active, want);
    // γ = 0 on every step is the plain run, bit for bit (the extra term
    // is added, times zero).
    let mut zero = trainer("mlp-tiny", 16, false, Some(htr(0.0, "all", 1, 1, 0)));
    let mut plain = trainer("mlp-tiny", 16, false, None);
    for _ in 0..2 {
        let (a, b) = (zero.epoch().unwrap(), plain.epoch().unwrap());
        assert_eq!(a.losses, b.losses);
        assert_eq!(a.htr.len(), 4);
    }
    assert_eq!(zero.weights().theta, plain.weights().theta);
}

fn cli_args(out: &Path, extra: &[&str]) -> Vec<String> {
    cli_args_on("cpu", out, extra)
}

fn cli_args_on(backend: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let fx = fixtures_dir().join("cnn-tiny");
    let mut a: Vec<String> = [
        "train",
        "--backend",
        backend,
        "--model",
        "cnn-tiny",
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
        "--dtype",
        "f64",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn one_cli_step_moves_the_weights_by_lr_gamma_times_the_cli_trace_grad() {
    // One step (16 samples, one batch): θ₁ = θ₀ − lr·(g + γ·∇trace) with
    // the momentum buffer = g on the first step and no weight decay, so
    // θ₁(plain) − θ₁(htr) = lr·γ·∇trace, against `hesscope trace-grad`
    // on the same 16 samples and the probes the run drew.
    let tmp = tempfile::tempdir().unwrap();
    let (lr, gamma) = (0.5, 0.2);
    let one = [
        "--samples",
        "16",
        "--batch",
        "16",
        "--epochs",
        "1",
        "--lr",
        "0.5",
        "--seed",
        "5",
    ];
    let plain = tmp.path().join("plain");
    let reg = tmp.path().join("reg");
    let (ok, _, stderr) = hesscope(&cli_args(&plain, &one));
    assert!(ok, "{stderr}");
    let mut extra = one.to_vec();
    extra.extend([
        "--htr-gamma",
        "0.2",
        "--htr-layers",
        "block1,block2.conv1",
        "--htr-probes",
        "2",
        "--json",
    ]);
    let (ok, stdout, stderr) = hesscope(&cli_args(&reg, &extra));
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let m = Model::load("cnn-tiny").unwrap();
    let load = |d: &Path| {
        Weights::load(&m, &d.join("final.safetensors"))
            .unwrap()
            .theta
    };
    let diff: Vec<f64> = load(&plain)
        .iter()
        .zip(load(&reg))
        .map(|(p, r)| (p - r) / (lr * gamma))
        .collect();
    // The run's probes, as documented, written for trace-grad.
    let set = LayerSet::parse(&m, "block1,block2.conv1").unwrap();
    let probes = htr_probes(&m, &set, 2, ProbeDist::Rademacher, 5, 0, 0).unwrap();
    let mut args: Vec<String> = [
        "trace-grad",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--samples",
        "16",
        "--batch",
        "16",
        "--layer",
        "block1,block2.conv1",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let fx = fixtures_dir().join("cnn-tiny");
    for (f, k) in [("--weights", "weights"), ("--data", "data")] {
        args.push(f.into());
        args.push(fx.join(format!("{k}.safetensors")).to_str().unwrap().into());
    }
    let out = tmp.path().join("tg.safetensors");
    args.extend([
        "--out".into(),
        out.to_str().unwrap().into(),
        "--probe".into(),
    ]);
    for (k, v) in probes.iter().enumerate() {
        let p = tmp.path().join(format!("probe-{k}.safetensors"));
        params::save_vector(&m, &p, v).unwrap();
        args.push(p.to_str().unwrap().into());
    }
    let (ok, tg_out, stderr) = hesscope(&args);
    assert!(ok, "{stderr}");
    let want = params::load_vector(&m, &out).unwrap();
    let e = rel_err(&diff, &want);
    let tg: serde_json::Value = serde_json::from_str(tg_out.trim()).unwrap();
    let htr_value = j["epochs"][0]["htr"]["value"].as_f64().unwrap();
    println!(
        "θ(plain) − θ(htr) = lr·γ·trace-grad within {e:.2e}; estimate {htr_value} vs {}",
        tg["estimate"]
    );
    // The difference of two θ₁ of size ~|θ₀| loses digits to
    // cancellation: ε·‖θ₀‖/‖lr·γ·∇trace‖ (bounded below).
    let theta0 = Weights::load(&m, &fx.join("weights.safetensors"))
        .unwrap()
        .theta;
    let lost = 1e-16 * norm(&theta0) / (lr * gamma * norm(&want));
    println!("cancellation allowance {lost:.1e}");
    assert!(lost < 1e-10, "{lost:.1e}");
    assert!(e <= TOL, "{e:.2e}");
    // The run shuffles its 16 samples (one batch, another order than the
    // file's): the same mini-batch as a set, summed in another order, so
    // equal to rounding rather than bit for bit.
    let tg_estimate = tg["estimate"].as_f64().unwrap();
    assert!(
        (htr_value - tg_estimate).abs() <= 1e-12 * tg_estimate.abs(),
        "{htr_value} vs {tg_estimate}"
    );
    assert_eq!(j["epochs"][0]["htr"]["steps"], 1);
    assert_eq!(j["htr"]["dist"], "rademacher");
}

#[test]
fn resume_with_the_regulariser_and_crop_flip_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let run = |dir: &Path, epochs: &str, resume: bool| {
        let mut extra = vec![
            "--batch",
            "16",
            "--lr",
            "0.05",
            "--weight-decay",
            "1e-3",
            "--seed",
            "11",
            "--augment",
            "crop-flip",
            "--htr-gamma",
            "0.01",
            "--htr-every",
            "3",
            "--htr-probes",
            "1",
            "--htr-probe-dist",
            "gaussian",
            "--epochs",
            epochs,
        ];
        let d = dir.to_str().unwrap().to_string();
        if resume {
            extra.extend(["--resume", &d]);
        }
        let (ok, _, stderr) = hesscope(&cli_args(dir, &extra));
        assert!(ok, "{stderr}");
    };
    run(&a, "3", false);
    run(&b, "2", false);
    run(&b, "3", true);
    for f in [
        "final.safetensors",
        "final.optim.safetensors",
        "checkpoints/epoch-3.safetensors",
    ] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let (ta, tb) = (
        json(a.join("trajectory.json")),
        json(b.join("trajectory.json")),
    );
    assert_eq!(ta["step_losses"], tb["step_losses"]);
    for e in 0..3 {
        assert_eq!(ta["epochs"][e]["htr"], tb["epochs"][e]["htr"]);
    }
    // 12 steps, every 3rd regularised: steps 0, 3, 6, 9 → one per epoch of 4.
    assert_eq!(ta["epochs"][2]["htr"]["steps"], 1);
    // Resuming with the regulariser changed (or off) is refused.
    let mut args = cli_args(&b, &["--epochs", "4", "--batch", "16", "--lr", "0.05"]);
    let i = args.iter().position(|x| x == "--out").unwrap();
    args.drain(i..i + 2);
    args.extend([
        "--weight-decay".into(),
        "1e-3".into(),
        "--seed".into(),
        "11".into(),
        "--augment".into(),
        "crop-flip".into(),
        "--resume".into(),
        b.to_str().unwrap().into(),
    ]);
    let (ok, _, stderr) = hesscope(&args);
    assert!(!ok && stderr.contains("invalid --resume"), "{stderr}");
    assert!(stderr.contains("regulariser"), "{stderr}");
    // And the regulariser changed the run (against the same run without).
    let c = tmp.path().join("c");
    let (ok, _, stderr) = hesscope(&cli_args(
        &c,
        &[
            "--batch",
            "16",
            "--lr",
            "0.05",
            "--weight-decay",
            "1e-3",
            "--seed",
            "11",
            "--augment",
            "crop-flip",
            "--epochs",
            "3",
        ],
    ));
    assert!(ok, "{stderr}");
    let fa = tensorio::read(&a.join("final.safetensors")).unwrap();
    let fc = tensorio::read(&c.join("final.safetensors")).unwrap();
    assert!(fa.iter().any(|(k, v)| v.data != fc[k].data));
}

#[test]
fn bad_regulariser_flags_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for (extra, want) in [
        (vec!["--htr-gamma", "-1"], "invalid --htr-gamma"),
        (vec!["--htr-gamma", "NaN"], "invalid --htr-gamma"),
        (
            vec!["--htr-gamma", "1", "--htr-probes", "0"],
            "invalid --htr-probes",
        ),
        (
            vec!["--htr-gamma", "1", "--htr-every", "0"],
            "invalid --htr-every",
        ),
        (
            vec!["--htr-gamma", "1", "--htr-layers", "nope"],
            "invalid --htr-layers",
        ),
    ] {
        let mut e = vec!["--epochs", "1", "--lr", "0.1", "--batch", "16"];
        e.extend(extra.iter());
        let (ok, _, stderr) = hesscope(&cli_args(&out, &e));
        assert!(!ok, "{extra:?} accepted");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}

/// The regulariser on the GPU engines (float32: the step's gradient, and
/// the trace gradient from float32 products with held decisions, Steps::
/// for_f32): every regularised step's estimate and the weights after two
/// epochs (16 steps, 8 regularised, momentum carrying the extra term on)
/// at γ = 1e-3 against the float64 reference on the same run (measured
/// 6e-7), and the first step's
/// extra term — θ(plain) − θ(regularised) on one backend — against the
/// reference's lr·γ·∇trace (an extra term with zero gradient gives 1).
///
/// Tolerances: the estimates 1e-5 (vᵀHv from one float32 product; measured
/// 3.8e-8 to 2.5e-6, 4× below); the weights 4e-6 (measured 6.0e-7; plain
/// training's own is 3.2e-7, tests/train_gpu.rs); the extra term 3e-5
/// (measured 4.4e-6), which must also absorb the cancellation
/// ε₃₂·‖θ₁‖/‖θ(plain) − θ(reg)‖ (printed, 6.1e-8, asserted below 1e-4).
///
/// Why γ = 1e-3 for the run: at γ = 1e-2 this small net runs away into
/// negative curvature (the estimate goes −7.9 → −182 in three regularised
/// steps) and float32 and float64 runs part (2e-2 after two epochs), although
/// every step's trace gradient, recomputed in float64 at the GPU run's own
/// θ, is within 8e-6 of the GPU's: the dynamics amplify differences (the
/// float64 run itself moves 4e-6 from a 2e-7 nudge of θ₀), so that regime
/// tests the weather, not the code.
#[test]
fn gpu_regularised_training_follows_the_reference() {
    for choice in GPU_BACKENDS {
        let Some(_) = gpu_context(choice) else { return };
        let make = |h: Option<Htr>, gpu: bool| {
            let mut t = trainer("cnn-tiny", 8, false, h);
            if gpu {
                t.use_gpu(gpu_context(choice).unwrap()).unwrap();
            }
            t
        };
        let reg = || Some(htr(1.0, "block1,block2.conv1", 2, 2, 0));
        let (mut rg, mut rc) = (make(reg(), true), make(reg(), false));
        let (mut pg, mut pc) = (make(None, true), make(None, false));
        // The first step alone (batch 8).
        let lr = rg.recipe.lr_at(0);
        rg.step(0, 8, lr).unwrap();
        rc.step(0, 8, lr).unwrap();
        pg.step(0, 8, lr).unwrap();
        pc.step(0, 8, lr).unwrap();
        for t in [&mut rg, &mut pg] {
            t.sync().unwrap();
        }
        let diff = |p: &Trainer, r: &Trainer| -> Vec<f64> {
            (p.weights().theta.iter())
                .zip(&r.weights().theta)
                .map(|(a, b)| a - b)
                .collect()
        };
        let (dg, dc) = (diff(&pg, &rg), diff(&pc, &rc));
        let e_first = rel_err(&dg, &dc);
        let lost = 6e-8 * norm(&rg.weights().theta) / norm(&dc);
        println!("{choice:?}: first step's extra term {e_first:.2e} (cancellation {lost:.1e})");
        assert!(lost < 1e-4, "{lost:.1e}");
        // Measured 4.4e-6 on Vulkan and GL (the README's figure): 3e-5 is
        // 6.8× that (the aim for float32 trace gradients, 1e-3, would let a
        // hundredfold regression pass).
        assert!(e_first <= 3e-5, "{e_first:.2e}");
        // Two epochs from the start.
        let reg = || Some(htr(1e-3, "block1,block2.conv1", 2, 2, 0));
        let (mut rg, mut rc) = (make(reg(), true), make(reg(), false));
        for _ in 0..2 {
            let (a, b) = (rg.epoch().unwrap(), rc.epoch().unwrap());
            assert_eq!(a.htr.len(), b.htr.len());
            assert!(!a.htr.is_empty());
            for (x, y) in a.htr.iter().zip(&b.htr) {
                println!(
                    "{choice:?}: estimate {x} vs {y}: {:.2e}",
                    (x - y).abs() / y.abs()
                );
                assert!((x - y).abs() <= 1e-5 * y.abs(), "estimate {x} vs {y}");
            }
        }
        let e = rel_err(&rg.weights().theta, &rc.weights().theta);
        println!("{choice:?}: θ after 2 regularised epochs {e:.2e}");
        // Measured 6.0e-7 (Vulkan, GL): held at 6.7× that.
        assert!(e <= 4e-6, "{e:.2e}");
    }
}

/// `hesscope train --backend vulkan --htr-gamma`: the run regularises on
/// the GPU, records the regulariser's value, lands close to the
/// float64 run (4e-6, as `gpu_regularised_training_follows_the_reference`), and
/// a run stopped after its first epoch resumes to the same bytes.
#[test]
fn cli_regularises_on_the_gpu_and_resumes_bit_for_bit() {
    let Some(_) = gpu_context(GPU_BACKENDS[0]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let flags = |epochs: &'static str| {
        vec![
            "--batch",
            "16",
            "--epochs",
            epochs,
            "--lr",
            "0.05",
            "--seed",
            "3",
            "--htr-gamma",
            "1e-3",
            "--htr-every",
            "3",
            "--htr-probes",
            "1",
            "--json",
        ]
    };
    let m = Model::load("cnn-tiny").unwrap();
    let mut out = vec![];
    for backend in ["vulkan", "cpu"] {
        let dir = tmp.path().join(backend);
        let (ok, stdout, stderr) = hesscope(&cli_args_on(backend, &dir, &flags("2")));
        assert!(ok, "{backend}: {stderr}");
        let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let theta = Weights::load(&m, &dir.join("final.safetensors"))
            .unwrap()
            .theta;
        out.push((j, theta));
    }
    let (gpu, cpu) = (&out[0], &out[1]);
    assert_eq!(gpu.0["settings"]["backend"], "vulkan", "{}", gpu.0);
    for e in 0..2 {
        let (a, b) = (&gpu.0["epochs"][e]["htr"], &cpu.0["epochs"][e]["htr"]);
        assert_eq!(a["steps"], b["steps"]);
        let (va, vb) = (a["value"].as_f64().unwrap(), b["value"].as_f64().unwrap());
        println!("epoch {e}: regulariser value {va} (vulkan) vs {vb} (cpu)");
        assert!((va - vb).abs() <= 1e-5 * vb.abs(), "{va} vs {vb}");
    }
    let e = rel_err(&gpu.1, &cpu.1);
    println!("CLI vulkan vs cpu with the regulariser: θ {e:.2e}");
    // Measured 5.9e-7: held at 6.8× that, as the library's run above.
    assert!(e <= 4e-6, "{e:.2e}");
    // Stopped after epoch 1, resumed to 2: the same bytes as the run above.
    let b = tmp.path().join("resumed");
    let (ok, _, stderr) = hesscope(&cli_args_on("vulkan", &b, &flags("1")));
    assert!(ok, "{stderr}");
    let mut again = flags("2");
    let bs = b.to_str().unwrap().to_string();
    again.extend(["--resume", &bs]);
    let (ok, _, stderr) = hesscope(&cli_args_on("vulkan", &b, &again));
    assert!(ok, "{stderr}");
    for f in ["final.safetensors", "final.optim.safetensors"] {
        let a = tmp.path().join("vulkan").join(f);
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

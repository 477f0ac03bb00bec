//! `hesscope train`: SGD as torch.optim.SGD + MultiStepLR with batch norm
//! in train mode, on the float64 reference, against PyTorch's float64
//! trajectories (../shared/fixtures/<model>/train-sgd/) and an independent
//! recomputation of every step from the reference's whole-batch gradient.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::model::{tensorio, Model, Weights};
use hesscope::train::{initial_counts, permutation, Recipe, Trainer};
use std::collections::BTreeMap;
use std::path::Path;

/// Measured 0 to 1.1e-15 relative (step losses, every final tensor,
/// running statistics, the CLI's files) against PyTorch's float64 and
/// the recomputations; 1e-14 is 9× the worst: float64 rounding of a
/// different summation order, while a hundredfold regression (or any
/// wrong term) fails.
const TOL: f64 = 1e-14;

const FIXTURES: [&str; 2] = ["cnn-tiny", "cnn-tiny-nobn"];

/// The fixture's recipe (file order) and batch size.
fn recipe(model: &str) -> (Recipe, usize) {
    let j = json(train_dir(model).join("train.json"));
    assert!(j["order"].as_str().unwrap().starts_with("file order"));
    let r = Recipe {
        epochs: j["epochs"].as_u64().unwrap() as usize,
        lr: j["lr"].as_f64().unwrap(),
        momentum: j["momentum"].as_f64().unwrap(),
        weight_decay: j["weight_decay"].as_f64().unwrap(),
        milestones: j["milestones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64().unwrap() as usize)
            .collect(),
        lr_gamma: j["lr_gamma"].as_f64().unwrap(),
        shuffle: false,
        seed: 0,
    };
    (r, j["batch"].as_u64().unwrap() as usize)
}

fn losses(model: &str) -> Vec<f64> {
    json(train_dir(model).join("train.json"))["losses_float64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs())
        .fold(0.0, f64::max)
}

fn trainer(model: &str, r: Recipe, batch: usize, samples: Option<usize>) -> Trainer {
    let dir = fixtures_dir().join(model);
    let m = Model::load(model).unwrap();
    let wpath = dir.join("weights.safetensors");
    let w = Weights::load(&m, &wpath).unwrap();
    let mut data = Dataset::load(&dir.join("data.safetensors")).unwrap();
    if let Some(n) = samples {
        data.take_first(n).unwrap();
    }
    let counts = initial_counts(&m, Some(&wpath)).unwrap();
    Trainer::new(m, w, data, batch, r, counts).unwrap()
}

/// Every tensor of a state_dict file ≤ TOL relative to the fixture's
/// (num_batches_tracked equal); the largest error over tensors.
fn compare_state(got: &BTreeMap<String, tensorio::Tensor>, model: &str) -> f64 {
    let want = tensorio::read(&train_dir(model).join("final-float64.safetensors")).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{model}: tensor names"
    );
    let mut worst: f64 = 0.0;
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{name}");
        if name.ends_with("num_batches_tracked") {
            assert_eq!(g.data, w.data, "{name}");
            continue;
        }
        let e = rel_err(&g.data, &w.data);
        assert!(e <= TOL, "{model} {name}: {e:.2e}");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn both_fixture_trajectories_match_pytorch_float64() {
    for model in FIXTURES {
        let (r, batch) = recipe(model);
        let mut t = trainer(model, r.clone(), batch, None);
        let mut got = vec![];
        for e in 0..r.epochs {
            let res = t.epoch().unwrap();
            assert_eq!(res.lr, r.lr_at(e));
            got.extend(res.losses);
        }
        let want = losses(model);
        let e_loss = max_rel(&got, &want);
        assert!(e_loss <= TOL, "{model}: step losses {e_loss:.2e}");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("final.safetensors");
        t.save(&path, true).unwrap();
        let e_state = compare_state(&tensorio::read(&path).unwrap(), model);
        println!(
            "{model}: {} steps, step losses max rel err {e_loss:.2e}, final state_dict \
             (parameters and BN buffers) max rel err per tensor {e_state:.2e}",
            got.len()
        );
    }
}

/// An independent f64 recomputation of a run in file order (or the
/// given per-epoch orders): per mini-batch, the reference's whole-problem
/// loss and gradient of a problem holding just that batch, then the SGD
/// rule written out. Returns the step losses and the final θ.
fn by_hand(
    model: &str,
    r: &Recipe,
    batch: usize,
    samples: usize,
    order: impl Fn(usize) -> Vec<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let dir = fixtures_dir().join(model);
    let m = Model::load(model).unwrap();
    let mut w = Weights::load(&m, &dir.join("weights.safetensors")).unwrap();
    let mut data = Dataset::load(&dir.join("data.safetensors")).unwrap();
    data.take_first(samples).unwrap();
    let d = data.shape.numel();
    let mut buf: Option<Vec<f64>> = None;
    let mut losses = vec![];
    for e in 0..r.epochs {
        let lr = r.lr
            * r.lr_gamma
                .powi(r.milestones.iter().filter(|&&k| k <= e).count() as i32);
        let ord = order(e);
        for chunk in ord.chunks(batch) {
            let mut b = data.clone();
            b.x = chunk
                .iter()
                .flat_map(|&i| data.x[i * d..(i + 1) * d].to_vec())
                .collect();
            b.y = chunk.iter().map(|&i| data.y[i]).collect();
            let p = Problem::new(m.clone(), w.clone(), b, chunk.len(), BnMode::Batch).unwrap();
            let (l, g) = CpuReference::new(p).loss_grad().unwrap();
            losses.push(l);
            let g: Vec<f64> = g
                .iter()
                .zip(&w.theta)
                .map(|(g, t)| g + r.weight_decay * t)
                .collect();
            let nb = match buf {
                None => g,
                Some(b) => b.iter().zip(&g).map(|(b, g)| r.momentum * b + g).collect(),
            };
            for (t, b) in w.theta.iter_mut().zip(&nb) {
                *t -= lr * b;
            }
            buf = Some(nb);
        }
    }
    (losses, w.theta)
}

#[test]
fn a_smaller_last_batch_matches_a_recomputation_by_hand() {
    // 40 samples in batches of 16: 16, 16, 8 per epoch.
    let r = Recipe {
        epochs: 3,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        milestones: vec![1, 2],
        lr_gamma: 0.5,
        shuffle: false,
        seed: 0,
    };
    for model in FIXTURES {
        let mut t = trainer(model, r.clone(), 16, Some(40));
        let mut got = vec![];
        for _ in 0..r.epochs {
            got.extend(t.epoch().unwrap().losses);
        }
        assert_eq!(t.steps, 9);
        let (want, theta) = by_hand(model, &r, 16, 40, |_| (0..40).collect());
        let e_loss = max_rel(&got, &want);
        let e_theta = rel_err(&t.weights().theta, &theta);
        println!("{model} 40 samples / batch 16: losses {e_loss:.2e}, θ {e_theta:.2e}");
        assert!(
            e_loss <= TOL && e_theta <= TOL,
            "{e_loss:.2e} {e_theta:.2e}"
        );
        // num_batches_tracked counts steps, the short one included.
        for n in &t.model().nodes {
            if let hesscope::model::Op::BatchNorm { running_mean, .. } = n.op {
                assert_eq!(t.batches_tracked[running_mean], 9);
            }
        }
    }
}

#[test]
fn shuffled_epochs_follow_the_documented_permutation() {
    let p0 = permutation(40, 7, 0);
    let p1 = permutation(40, 7, 1);
    let mut sorted = p0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..40).collect::<Vec<_>>());
    assert_ne!(p0, p1);
    assert_eq!(p0, permutation(40, 7, 0));
    assert_ne!(p0, permutation(40, 8, 0));
    let r = Recipe {
        epochs: 2,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.0,
        milestones: vec![],
        lr_gamma: 0.1,
        shuffle: true,
        seed: 7,
    };
    let mut t = trainer("cnn-tiny", r.clone(), 16, Some(40));
    let mut got = vec![];
    for _ in 0..r.epochs {
        got.extend(t.epoch().unwrap().losses);
    }
    let (want, theta) = by_hand("cnn-tiny", &r, 16, 40, |e| permutation(40, 7, e));
    let e = max_rel(&got, &want).max(rel_err(&t.weights().theta, &theta));
    println!("cnn-tiny shuffled (seed 7): {e:.2e}");
    assert!(e <= TOL, "{e:.2e}");
}

#[test]
fn recipes_are_checked() {
    let ok = recipe("cnn-tiny").0;
    ok.check().unwrap();
    let bad: Vec<(Recipe, &str)> = vec![
        (
            Recipe {
                epochs: 0,
                ..ok.clone()
            },
            "epochs",
        ),
        (
            Recipe {
                lr: -0.1,
                ..ok.clone()
            },
            "learning rate",
        ),
        (
            Recipe {
                lr: f64::NAN,
                ..ok.clone()
            },
            "learning rate",
        ),
        (
            Recipe {
                momentum: 1.0,
                ..ok.clone()
            },
            "momentum",
        ),
        (
            Recipe {
                weight_decay: -1.0,
                ..ok.clone()
            },
            "weight decay",
        ),
        (
            Recipe {
                lr_gamma: 0.0,
                ..ok.clone()
            },
            "learning-rate gamma",
        ),
        (
            Recipe {
                milestones: vec![3, 2],
                ..ok.clone()
            },
            "milestones",
        ),
        (
            Recipe {
                milestones: vec![2, 2],
                ..ok.clone()
            },
            "milestones",
        ),
        (
            Recipe {
                milestones: vec![0],
                ..ok.clone()
            },
            "milestones",
        ),
    ];
    for (r, want) in bad {
        match r.check() {
            Err(hesscope::Error::Invalid { what, .. }) => assert_eq!(what, want),
            other => panic!("{want}: {other:?}"),
        }
    }
    // MultiStepLR: epoch e runs at lr·gamma^#{milestones ≤ e}.
    let r = Recipe {
        milestones: vec![2, 4],
        ..ok
    };
    let lrs: Vec<f64> = (0..6).map(|e| r.lr_at(e) / r.lr).collect();
    let want = [1.0, 1.0, 0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1];
    for (a, b) in lrs.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "{lrs:?}");
    }
}

#[test]
fn cli_writes_state_dicts_checkpoints_and_the_trajectory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args = fixture_args("cnn-tiny", &out, "cpu");
    args.extend(["--dtype", "f64", "--json"].map(String::from));
    let (ok, stdout, stderr) = hesscope(&args);
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in [
        "recipe",
        "epochs",
        "step_losses",
        "steps",
        "out",
        "dtype",
        "seconds",
        "settings",
    ] {
        assert!(!j[key].is_null(), "missing {key}: {stdout}");
    }
    let traj = json(out.join("trajectory.json"));
    assert_eq!(traj["step_losses"], j["step_losses"]);
    assert_eq!(j["steps"], 12);
    let epochs = j["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 3);
    for (e, rec) in epochs.iter().enumerate() {
        for key in [
            "epoch",
            "train_loss",
            "lr",
            "steps",
            "seconds",
            "checkpoint",
        ] {
            assert!(!rec[key].is_null(), "epoch {e} missing {key}");
        }
        assert_eq!(rec["steps"], 4 * (e + 1));
        assert!(out
            .join(format!("checkpoints/epoch-{}.safetensors", e + 1))
            .exists());
    }
    assert_eq!(epochs[2]["lr"].as_f64().unwrap(), 0.05 * 0.1);
    let steps: Vec<f64> = j["step_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let e_loss = max_rel(&steps, &losses("cnn-tiny"));
    let e_state = compare_state(
        &tensorio::read(&out.join("final.safetensors")).unwrap(),
        "cnn-tiny",
    );
    println!("CLI cnn-tiny: step losses {e_loss:.2e}, final state_dict {e_state:.2e}");
    assert!(e_loss <= TOL);
    // The last checkpoint is the final state.
    assert_eq!(
        std::fs::read(out.join("checkpoints/epoch-3.safetensors")).unwrap(),
        std::fs::read(out.join("final.safetensors")).unwrap()
    );
}

#[test]
fn cli_saves_float32_by_default_with_int64_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, stderr) = hesscope(&fixture_args("cnn-tiny", &out, "cpu"));
    assert!(ok, "{stderr}");
    let f = tensorio::File::open(&out.join("final.safetensors")).unwrap();
    for (name, l) in f.layout() {
        let want = if name.ends_with("num_batches_tracked") {
            assert!(l.shape.is_empty(), "{name} is a scalar");
            "I64"
        } else {
            "F32"
        };
        assert_eq!(format!("{:?}", l.dtype), want, "{name}");
    }
    // float32 rounding of the float64 result, and loadable as weights.
    let got = tensorio::read(&out.join("final.safetensors")).unwrap();
    let want = tensorio::read(&train_dir("cnn-tiny").join("final-float64.safetensors")).unwrap();
    for (name, w) in &want {
        let e = rel_err(&got[name].data, &w.data);
        assert!(e < 1e-6, "{name}: {e:.2e}");
    }
    let m = Model::load("cnn-tiny").unwrap();
    Weights::load(&m, &out.join("final.safetensors")).unwrap();
}

#[test]
fn cli_refuses_bad_flags_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("cpu", vec!["--epochs", "0"], "invalid --epochs"),
        ("cpu", vec!["--lr", "-0.1"], "invalid --lr"),
        ("cpu", vec!["--lr", "NaN"], "invalid --lr"),
        (
            "cpu",
            vec!["--milestones", "3", "2"],
            "invalid --milestones",
        ),
        ("cpu", vec!["--milestones", "0"], "invalid --milestones"),
        ("cpu", vec!["--momentum", "1.5"], "invalid --momentum"),
        (
            "cpu",
            vec!["--weight-decay", "-1"],
            "invalid --weight-decay",
        ),
        ("cpu", vec!["--lr-gamma", "0"], "invalid --lr-gamma"),
        ("cpu", vec!["--bn", "running"], "invalid --bn"),
        ("vulkan", vec!["--htr-gamma", "-1"], "invalid --htr-gamma"),
    ];
    for (backend, extra, want) in cases {
        let mut args = fixture_args("cnn-tiny", &out, backend);
        // Each flag given replaces the fixture's value(s) of that flag.
        if let Some(flag) = extra.first() {
            if let Some(i) = args.iter().position(|a| a == flag) {
                let n = args[i + 1..]
                    .iter()
                    .take_while(|a| !a.starts_with("--"))
                    .count();
                args.drain(i..i + 1 + n);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let (ok, _, stderr) = hesscope(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}

#[test]
fn running_statistics_of_a_smaller_last_batch_use_its_own_count() {
    // Batch norm straight on the input: its batch moments are the data's.
    let tmp = tempfile::tempdir().unwrap();
    let arch = tmp.path().join("bn-first.arch");
    std::fs::write(
        &arch,
        "model bn-first\ninput 3 8 8\nclasses 4\nbn bn0\ngap\nlinear fc 4\n",
    )
    .unwrap();
    let m = Model::load(arch.to_str().unwrap()).unwrap();
    let w = Weights::init(&m, 3);
    let mut data = Dataset::load(&fixtures_dir().join("cnn-tiny/data.safetensors")).unwrap();
    data.take_first(40).unwrap();
    let r = Recipe {
        epochs: 2,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.0,
        milestones: vec![],
        lr_gamma: 0.1,
        shuffle: false,
        seed: 0,
    };
    let counts = initial_counts(&m, None).unwrap();
    let mut t = Trainer::new(m.clone(), w, data.clone(), 16, r, counts).unwrap();
    t.epoch().unwrap();
    t.epoch().unwrap();
    // By hand: per batch (16, 16, 8 samples) and channel, the mean and the
    // unbiased variance over samples × 64 pixels; momentum 0.1.
    let (mut rm, mut rv) = (vec![0.0; 3], vec![1.0; 3]);
    for _ in 0..2 {
        for s in (0..40).step_by(16) {
            let n = 16.min(40 - s);
            for c in 0..3 {
                let xs: Vec<f64> = (s..s + n)
                    .flat_map(|i| {
                        let o = (i * 3 + c) * 64;
                        data.x[o..o + 64]
                            .iter()
                            .map(|&v| v as f64)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let k = xs.len() as f64;
                let mean = xs.iter().sum::<f64>() / k;
                let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0);
                rm[c] = 0.9 * rm[c] + 0.1 * mean;
                rv[c] = 0.9 * rv[c] + 0.1 * var;
            }
        }
    }
    let idx = |name: &str| m.buffers.iter().position(|b| b.name == name).unwrap();
    let w = t.weights();
    let e_mean = rel_err(&w.buffers[idx("bn0.running_mean")], &rm);
    let e_var = rel_err(&w.buffers[idx("bn0.running_var")], &rv);
    println!(
        "bn on the input, batches 16/16/8: running_mean {e_mean:.2e}, running_var {e_var:.2e}"
    );
    assert!(e_mean <= TOL && e_var <= TOL, "{e_mean:.2e} {e_var:.2e}");
    assert_eq!(t.batches_tracked[idx("bn0.running_mean")], 6);
}

/// A run long enough (~3 s here, 20 epochs of 32 steps) that a kill after
/// the first checkpoint lands mid-run; shuffled, with weight decay and
/// milestones, so every part of the state matters.
fn long_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--samples",
        "512",
        "--batch",
        "16",
        "--epochs",
        "20",
        "--lr",
        "0.05",
        "--weight-decay",
        "1e-4",
        "--milestones",
        "5",
        "10",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn without_out(mut args: Vec<String>) -> Vec<String> {
    let i = args.iter().position(|a| a == "--out").unwrap();
    args.drain(i..i + 2);
    args
}

#[test]
fn a_run_killed_mid_run_resumes_to_the_identical_result() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let (ok, _, stderr) = hesscope(&long_args(&a));
    assert!(ok, "{stderr}");
    // The same run, SIGKILLed once its first checkpoint is complete.
    let done = kill_after_first_checkpoint(&long_args(&b), &b, 120);
    assert!(!b.join("final.safetensors").exists(), "the run finished");
    assert!((1..20).contains(&done), "killed after epoch {done}");
    println!("killed after {done} of 20 epochs");
    // A torn later checkpoint (what a non-atomic writer could leave) is
    // passed over with a notice: garbage json and a truncated state.
    let ck = b.join("checkpoints");
    std::fs::write(ck.join(format!("epoch-{}.json", done + 1)), "{\"epoch\": ").unwrap();
    let (ok, stdout, stderr) = hesscope(
        &[
            long_args(&b),
            vec!["--resume".into(), b.to_str().unwrap().into()],
        ]
        .concat(),
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("ignoring checkpoint"), "{stderr}");
    assert!(stdout.contains(&format!("after epoch {done}")), "{stdout}");
    for f in [
        "final.safetensors",
        "final.f64.safetensors",
        "final.optim.safetensors",
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
    assert_eq!(ta["steps"], tb["steps"]);
    assert_eq!(tb["epochs"].as_array().unwrap().len(), 20);
    // Momentum buffers are named like the parameters, float64.
    let m = Model::load("cnn-tiny").unwrap();
    let opt = tensorio::File::open(&b.join("final.optim.safetensors")).unwrap();
    let names: Vec<&String> = opt.layout().keys().collect();
    let mut want: Vec<&String> = m.params.iter().map(|p| &p.name).collect();
    want.sort();
    assert_eq!(names, want);
    assert!(opt
        .layout()
        .values()
        .all(|l| format!("{:?}", l.dtype) == "F64"));
}

#[test]
fn resume_from_a_truncated_last_checkpoint_uses_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for d in [&a, &b] {
        let mut args = fixture_args("cnn-tiny", d, "cpu");
        args.extend(["--dtype", "f64"].map(String::from));
        let (ok, _, stderr) = hesscope(&args);
        assert!(ok, "{stderr}");
    }
    // Truncate b's last checkpoint's state and drop its final state.
    let last = b.join("checkpoints/epoch-3.safetensors");
    let bytes = std::fs::read(&last).unwrap();
    std::fs::write(&last, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(b.join("final.safetensors")).unwrap();
    let mut args = without_out(fixture_args("cnn-tiny", &b, "cpu"));
    args.extend(["--dtype", "f64", "--resume", b.to_str().unwrap()].map(String::from));
    let (ok, stdout, stderr) = hesscope(&args);
    assert!(ok, "{stderr}");
    // The notice names the file that failed its recorded digest.
    assert!(stderr.contains("epoch-3.safetensors"), "{stderr}");
    assert!(stdout.contains("after epoch 2"), "{stdout}");
    assert_eq!(
        std::fs::read(a.join("final.safetensors")).unwrap(),
        std::fs::read(b.join("final.safetensors")).unwrap()
    );
}

#[test]
fn resume_refuses_missing_runs_and_other_recipes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (ok, _, stderr) = hesscope(&fixture_args("cnn-tiny", &run, "cpu"));
    assert!(ok, "{stderr}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let missing = tmp.path().join("missing");
    for (dir, extra, want) in [
        (&empty, vec![], "invalid --resume"),
        (&missing, vec![], "invalid --resume"),
        (&run, vec!["--lr", "0.01"], "invalid --resume"),
        (&run, vec!["--batch", "7"], "invalid --resume"),
        (&run, vec!["--dtype", "f64"], "invalid --resume"),
        (&run, vec!["--epochs", "2"], "invalid --resume"),
    ] {
        let mut args = without_out(fixture_args("cnn-tiny", &run, "cpu"));
        for pair in extra.chunks(2) {
            let i = args.iter().position(|a| a == pair[0]);
            match i {
                Some(i) => args[i + 1] = pair[1].into(),
                None => args.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        args.extend(["--resume".into(), dir.to_str().unwrap().to_string()]);
        let (ok, _, stderr) = hesscope(&args);
        assert!(!ok, "{extra:?} {dir:?} accepted");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
    }
    // --out elsewhere than the run is refused.
    let mut args = fixture_args("cnn-tiny", &tmp.path().join("other"), "cpu");
    args.extend(["--resume".into(), run.to_str().unwrap().to_string()]);
    let (ok, _, stderr) = hesscope(&args);
    assert!(!ok && stderr.contains("invalid --out"), "{stderr}");
    // A finished run resumed with more epochs continues it.
    let mut args = without_out(fixture_args("cnn-tiny", &run, "cpu"));
    let i = args.iter().position(|a| a == "--epochs").unwrap();
    args[i + 1] = "4".into();
    args.extend(["--resume".into(), run.to_str().unwrap().to_string()]);
    let (ok, stdout, stderr) = hesscope(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("after epoch 3"), "{stdout}");
    assert!(run.join("checkpoints/epoch-4.json").exists());
}

#[test]
fn test_data_loss_and_accuracy_per_epoch_use_running_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let fx = fixtures_dir().join("cnn-tiny");
    let test_file = fx.join("data.safetensors");
    let mut args = fixture_args("cnn-tiny", &out, "cpu");
    args.extend(["--dtype", "f64", "--test-data", test_file.to_str().unwrap()].map(String::from));
    let (ok, _, stderr) = hesscope(&args);
    assert!(ok, "{stderr}");
    let traj = json(out.join("trajectory.json"));
    let epochs = traj["epochs"].as_array().unwrap();
    for rec in epochs {
        assert!(rec["test_loss"].as_f64().unwrap().is_finite());
        let acc = rec["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    // Independently for the final weights: the reference's whole-set loss
    // with running statistics, and the argmax of its logits.
    let m = Model::load("cnn-tiny").unwrap();
    let w = Weights::load(&m, &out.join("final.safetensors")).unwrap();
    let data = Dataset::load(&test_file).unwrap();
    let n = data.len();
    let p = Problem::new(m.clone(), w, data.clone(), 5, BnMode::Running).unwrap();
    let mut cpu = CpuReference::new(p);
    let (loss, _) = cpu.loss_grad().unwrap();
    let z = cpu.logits(0, n);
    let correct = z
        .chunks(m.classes)
        .zip(&data.y)
        .filter(|(row, &y)| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (j, v)| if *v > row[b] { j } else { b });
            best == y as usize
        })
        .count();
    let last = epochs.last().unwrap();
    let got_loss = last["test_loss"].as_f64().unwrap();
    println!(
        "test loss {got_loss} vs {loss} ({:.1e}), accuracy {}",
        (got_loss - loss).abs() / loss,
        correct as f64 / n as f64
    );
    assert!((got_loss - loss).abs() <= 1e-12 * loss);
    assert_eq!(
        last["test_accuracy"].as_f64().unwrap(),
        correct as f64 / n as f64
    );
    // Not the train-mode (batch statistics) loss.
    let p = Problem::new(
        m.clone(),
        Weights::load(&m, &out.join("final.safetensors")).unwrap(),
        data,
        5,
        BnMode::Batch,
    )
    .unwrap();
    let (batch_loss, _) = CpuReference::new(p).loss_grad().unwrap();
    assert!((batch_loss - loss).abs() > 1e-9 * loss);
}

//! Bad input gets a clear error naming the file, tensor or flag; every
//! float dtype PyTorch saves is accepted.

mod common;
use hesscope::data::{self, Dataset, CIFAR_MEAN, CIFAR_STD};
use hesscope::engine::{BnMode, Problem};
use hesscope::model::{tensorio, Model, Weights};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// Write tensors given as f64 in the requested dtype.
fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f64>, Dtype)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d, t)| match t {
            Dtype::F64 => d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F32 => d.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
            Dtype::F16 => d
                .iter()
                .flat_map(|x| half::f16::from_f64(*x).to_le_bytes())
                .collect(),
            Dtype::BF16 => d
                .iter()
                .flat_map(|x| half::bf16::from_f64(*x).to_le_bytes())
                .collect(),
            Dtype::I64 => d.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect(),
            Dtype::I32 => d.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
            _ => unimplemented!(),
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _, t), b)| (n.clone(), TensorView::new(*t, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn state_dict(
    model: &Model,
    w: &Weights,
    dtype: Dtype,
) -> Vec<(String, Vec<usize>, Vec<f64>, Dtype)> {
    let mut t: Vec<_> = hesscope::model::params::named(model, &w.theta)
        .into_iter()
        .map(|(n, s, d)| (n, s, d, dtype))
        .collect();
    for (b, v) in model.buffers.iter().zip(&w.buffers) {
        t.push((b.name.clone(), vec![b.len], v.clone(), dtype));
    }
    t
}

fn err_of(r: Result<Weights, hesscope::Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn state_dict_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("cnn-tiny").unwrap();
    let w = Weights::init(&model, 3);
    let path = dir.path().join("w.safetensors");

    let mut t = state_dict(&model, &w, Dtype::F32);
    t[3].1 = vec![4, 4, 9];
    write(&path, &t);
    let e = err_of(Weights::load(&model, &path));
    assert!(
        e.contains("block1.conv1.weight") && e.contains("[4, 4, 9]") && e.contains("w.safetensors"),
        "{e}"
    );

    let mut t = state_dict(&model, &w, Dtype::F32);
    t.remove(5);
    write(&path, &t);
    let e = err_of(Weights::load(&model, &path));
    assert!(
        e.contains("block1.bn1.bias") && e.contains("missing"),
        "{e}"
    );

    let mut t = state_dict(&model, &w, Dtype::F32);
    t.push(("head.weight".into(), vec![2], vec![1.0, 2.0], Dtype::F32));
    write(&path, &t);
    let e = err_of(Weights::load(&model, &path));
    assert!(e.contains("head.weight") && e.contains("unexpected"), "{e}");

    let mut t = state_dict(&model, &w, Dtype::F32);
    t[0].2[5] = f64::NAN;
    write(&path, &t);
    let e = err_of(Weights::load(&model, &path));
    assert!(
        e.contains("conv1.weight") && e.contains("not finite"),
        "{e}"
    );

    let mut t = state_dict(&model, &w, Dtype::F32);
    let rv = t.iter().position(|x| x.0 == "bn1.running_var").unwrap();
    t[rv].2[0] = -1.0;
    write(&path, &t);
    let e = err_of(Weights::load(&model, &path));
    assert!(
        e.contains("bn1.running_var") && e.contains("negative"),
        "{e}"
    );

    std::fs::write(&path, b"not a safetensors file").unwrap();
    let e = err_of(Weights::load(&model, &path));
    assert!(
        e.contains("w.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn every_float_dtype_loads_and_counters_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("cnn-tiny").unwrap();
    let w = Weights::init(&model, 4);
    // Each dtype's own rounding bounds the difference from the f64 values.
    for (dtype, tol) in [
        (Dtype::F64, 0.0),
        (Dtype::F32, 1e-7),
        (Dtype::F16, 1e-3),
        (Dtype::BF16, 8e-3),
    ] {
        let path = dir.path().join("w.safetensors");
        let mut t = state_dict(&model, &w, dtype);
        t.push((
            "bn1.num_batches_tracked".into(),
            vec![],
            vec![7.0],
            Dtype::I64,
        ));
        write(&path, &t);
        let got = Weights::load(&model, &path).unwrap();
        let worst = got
            .theta
            .iter()
            .zip(&w.theta)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-2))
            .fold(0.0, f64::max);
        assert!(worst <= tol, "{dtype:?}: {worst}");
        assert_eq!(got.buffers.len(), model.buffers.len());
    }
}

#[test]
fn init_follows_pytorch_default_bounds() {
    let model = Model::load("resnet20").unwrap();
    let w = Weights::init(&model, 0);
    let conv = model.param("layer3.0.conv2.weight").unwrap();
    let vals = &w.theta[conv.offset..conv.offset + conv.numel()];
    let bound = 1.0 / ((64 * 9) as f64).sqrt();
    assert!(vals.iter().all(|v| v.abs() < bound));
    // U(-b, b) has variance b²/3: the sample variance is within a few percent.
    let var = vals.iter().map(|v| v * v).sum::<f64>() / vals.len() as f64;
    assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.05, "{var}");
    let gamma = model.param("bn1.weight").unwrap();
    assert!(w.theta[gamma.offset..gamma.offset + 16]
        .iter()
        .all(|&g| g == 1.0));
    assert_eq!(
        Weights::init(&model, 0).theta,
        w.theta,
        "deterministic in the seed"
    );
    assert_ne!(Weights::init(&model, 1).theta, w.theta);
}

#[test]
fn data_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("cnn-tiny").unwrap();
    let w = Weights::init(&model, 0);
    let good = data::synthetic(model.input, 4, 8, 0);
    let path = dir.path().join("d.safetensors");
    let x: Vec<f64> = good.x.iter().map(|&v| v as f64).collect();
    let labels = |y: Vec<f64>| ("y".to_string(), vec![y.len()], y, Dtype::I64);

    write(
        &path,
        &[
            ("x".into(), vec![8, 3, 8, 8], x.clone(), Dtype::F32),
            labels(vec![0., 1., 2., 3., 4., 0., 1., 2.]),
        ],
    );
    let d = Dataset::load(&path).unwrap();
    let e = Problem::new(model.clone(), w.clone(), d, 4, BnMode::Batch)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("label 4 of sample 4") && e.contains("d.safetensors"),
        "{e}"
    );

    write(
        &path,
        &[
            ("x".into(), vec![8, 3, 4, 16], x.clone(), Dtype::F32),
            labels(vec![0.; 8]),
        ],
    );
    let d = Dataset::load(&path).unwrap();
    let e = Problem::new(model.clone(), w.clone(), d, 4, BnMode::Batch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[3, 4, 16]") && e.contains("[3, 8, 8]"), "{e}");

    let mut bad = x.clone();
    bad[200] = f64::INFINITY;
    write(
        &path,
        &[
            ("x".into(), vec![8, 3, 8, 8], bad, Dtype::F32),
            labels(vec![0.; 8]),
        ],
    );
    let d = Dataset::load(&path).unwrap();
    let e = Problem::new(model.clone(), w.clone(), d, 4, BnMode::Batch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite") && e.contains("sample 1"), "{e}");

    write(
        &path,
        &[
            ("x".into(), vec![0, 3, 8, 8], vec![], Dtype::F32),
            labels(vec![]),
        ],
    );
    let d = Dataset::load(&path).unwrap();
    let e = Problem::new(model.clone(), w.clone(), d, 4, BnMode::Batch)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no samples"), "{e}");

    write(
        &path,
        &[("x".into(), vec![8, 3, 8, 8], x.clone(), Dtype::F32)],
    );
    let e = Dataset::load(&path).unwrap_err().to_string();
    assert!(e.contains("missing tensor `y`"), "{e}");

    write(
        &path,
        &[
            ("x".into(), vec![8, 3, 8, 8], x, Dtype::F32),
            labels(vec![0.; 7]),
        ],
    );
    let e = Dataset::load(&path).unwrap_err().to_string();
    assert!(e.contains("`y` must be [N]"), "{e}");

    // int32 labels are accepted too.
    write(
        &path,
        &[
            ("x".into(), vec![2, 3, 8, 8], vec![0.5; 384], Dtype::F32),
            ("y".into(), vec![2], vec![1., 3.], Dtype::I32),
        ],
    );
    assert_eq!(Dataset::load(&path).unwrap().y, vec![1, 3]);
}

#[test]
fn cifar_binary_folder_is_read_and_normalised() {
    let dir = tempfile::tempdir().unwrap();
    // Two files in the CIFAR-10 layout: label byte, then R, G, B planes.
    let record = |label: u8, fill: [u8; 3]| {
        let mut r = vec![label];
        for v in fill {
            r.extend(std::iter::repeat_n(v, 1024));
        }
        r
    };
    let mut f1 = record(3, [0, 128, 255]);
    f1.extend(record(9, [10, 20, 30]));
    std::fs::write(dir.path().join("data_batch_1.bin"), &f1).unwrap();
    std::fs::write(
        dir.path().join("test_batch.bin"),
        record(0, [255, 255, 255]),
    )
    .unwrap();
    std::fs::write(dir.path().join("batches.meta.txt"), "airplane\n").unwrap();
    let d = Dataset::load(dir.path()).unwrap();
    assert_eq!(d.y, vec![3, 9, 0]);
    assert_eq!(d.shape, hesscope::model::Shape::new(3, 32, 32));
    let px = |s: usize, c: usize| d.x[s * 3072 + c * 1024 + 517];
    for (s, c, raw) in [
        (0, 0, 0u8),
        (0, 1, 128),
        (0, 2, 255),
        (1, 2, 30),
        (2, 0, 255),
    ] {
        let want = (raw as f32 / 255.0 - CIFAR_MEAN[c]) / CIFAR_STD[c];
        assert!((px(s, c) - want).abs() < 1e-6, "sample {s} channel {c}");
    }
    d.validate(&Model::load("resnet20").unwrap()).unwrap();

    std::fs::write(dir.path().join("data_batch_2.bin"), &f1[..1000]).unwrap();
    let e = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("data_batch_2.bin") && e.contains("records"),
        "{e}"
    );
    let mut bad = record(11, [0, 0, 0]);
    bad[0] = 11;
    std::fs::write(dir.path().join("data_batch_2.bin"), bad).unwrap();
    let e = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("label 11"), "{e}");
}

#[test]
fn architecture_errors_name_the_line() {
    let e =
        hesscope::model::arch::parse("m.arch", "model m\ninput 3 8 8\nclasses 4\nconvv c 4 k=3\n")
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("m.arch, line 4") && e.contains("unknown layer `convv`"),
        "{e}"
    );
    let e = hesscope::model::arch::parse(
        "m.arch",
        "model m\ninput 3 8 8\nclasses 4\nconv c 4 k=3\nlinear fc 4\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 5") && e.contains("flat input"), "{e}");
    let e = hesscope::model::arch::parse(
        "m.arch",
        "model m\ninput 3 8 8\nclasses 4\nresidual b\nconv c 8 k=3 pad=1\nend\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("main branch gives [8, 8, 8] but shortcut gives [3, 8, 8]"),
        "{e}"
    );
    let e = hesscope::model::arch::parse(
        "m.arch",
        "model m\ninput 3 8 8\nclasses 5\nflatten\nlinear fc 4\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("5 classes"), "{e}");
}

#[test]
fn vectors_round_trip_with_parameter_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("mlp-tiny").unwrap();
    let v: Vec<f64> = (0..model.n_params).map(|i| (i as f64).sin()).collect();
    let path = dir.path().join("v.safetensors");
    hesscope::model::params::save_vector(&model, &path, &v).unwrap();
    let names: Vec<String> = tensorio::read(&path).unwrap().keys().cloned().collect();
    assert!(names.contains(&"fc2.weight".to_string()));
    assert_eq!(
        hesscope::model::params::load_vector(&model, &path).unwrap(),
        v
    );
}

#[test]
fn non_float_weights_and_non_integer_labels_are_refused_naming_the_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("mlp-tiny").unwrap();
    let w = Weights::init(&model, 0);
    let path = dir.path().join("w.safetensors");
    for dtype in [Dtype::I64, Dtype::I32] {
        let mut t = state_dict(&model, &w, Dtype::F32);
        t[2].3 = dtype;
        t[2].2.iter_mut().for_each(|v| *v = 0.0);
        write(&path, &t);
        let e = err_of(Weights::load(&model, &path));
        assert!(
            e.contains("fc2.weight") && e.contains(&format!("{dtype}")) && e.contains("floating"),
            "{e}"
        );
    }
    // Names are checked before dtypes and shapes: an unexpected tensor is
    // reported even when another one has a wrong dtype.
    let mut t = state_dict(&model, &w, Dtype::F32);
    t[0].3 = Dtype::I64;
    t.push(("extra".into(), vec![1], vec![0.0], Dtype::F32));
    write(&path, &t);
    let e = err_of(Weights::load(&model, &path));
    assert!(e.contains("extra") && e.contains("unexpected"), "{e}");

    let x: Vec<f64> = vec![0.5; 2 * 36];
    for (xd, yd, needle) in [
        (Dtype::F32, Dtype::F32, "`y` has dtype F32"),
        (Dtype::F32, Dtype::F64, "`y` has dtype F64"),
        (Dtype::I64, Dtype::I64, "`x` has dtype I64"),
        (Dtype::I32, Dtype::I64, "`x` has dtype I32"),
    ] {
        write(
            &path,
            &[
                ("x".into(), vec![2, 1, 6, 6], x.clone(), xd),
                ("y".into(), vec![2], vec![1.0, 2.0], yd),
            ],
        );
        let e = Dataset::load(&path).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("w.safetensors"), "{e}");
    }
}

#[test]
fn synthetic_data_round_trips_with_integer_labels() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("mlp-tiny").unwrap();
    let d = data::try_synthetic(model.input, model.classes, 12, 3).unwrap();
    let path = dir.path().join("d.safetensors");
    d.save(&path).unwrap();
    let t = tensorio::read(&path).unwrap();
    assert_eq!(t["y"].dtype, Dtype::I64, "labels are written as int64");
    let back = Dataset::load(&path).unwrap();
    assert_eq!(back.y, d.y);
    assert_eq!(back.x, d.x);
    let first = Dataset::load_first(&path, Some(5)).unwrap();
    assert_eq!(first.y, d.y[..5]);
    assert_eq!(first.x, d.x[..5 * 36]);
}

#[test]
fn sample_counts_are_checked_against_the_source_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load("mlp-tiny").unwrap();
    let d = data::try_synthetic(model.input, model.classes, 6, 0).unwrap();
    let path = dir.path().join("d.safetensors");
    d.save(&path).unwrap();
    let invalid = |e: hesscope::Error| match e {
        hesscope::Error::Invalid { what, msg } => format!("{what}: {msg}"),
        other => panic!("expected Error::Invalid, got {other}"),
    };
    let e = invalid(Dataset::load_first(&path, Some(7)).unwrap_err());
    assert!(
        e.starts_with("samples: 7 is more than the 6 samples"),
        "{e}"
    );
    let e = invalid(Dataset::load_first(&path, Some(0)).unwrap_err());
    assert!(e.contains("at least 1"), "{e}");
    let mut d2 = d.clone();
    let e = invalid(d2.take_first(9).unwrap_err());
    assert!(e.contains("9 is more than the 6 samples"), "{e}");
    d2.take_first(2).unwrap();
    assert_eq!(d2.len(), 2);
    let e = invalid(data::try_synthetic(model.input, 4, 1_000_000_000, 0).unwrap_err());
    assert!(
        e.contains("1000000000") && e.contains(&data::MAX_DATA_ELEMENTS.to_string()),
        "{e}"
    );
}

fn arch_err(text: &str) -> String {
    match hesscope::model::arch::parse("t.arch", text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_parser_refuses_what_pytorch_refuses() {
    let head = "model m\ninput 3 8 8\nclasses 4\n";
    let tail = "gap\nlinear fc 4\n";
    let with = |mid: &str| format!("{head}{mid}\n{tail}");
    for (mid, needle) in [
        ("conv c 4 k=3 k=5", "option `k` is given twice"),
        ("conv c 4 k=3 padding=1", "unknown option `padding`"),
        ("maxpool k=2 pad=2", "pad should be at most half"),
        ("avgpool k=3 pad=2", "pad should be at most half"),
        ("conv c 4 k=3 pad=100000", "above the limit of 268435456"),
        ("conv c 4 k=4294967297", "larger than the padded input"),
        ("conv c 99999999999 k=1", "above the limit"),
        ("conv c 4 k=9", "larger than the padded input"),
        ("leaky_relu slope=nan", "finite"),
        ("tanh a b", "usage: tanh [NAME]"),
        ("gelu x=1", "gelu takes no options"),
    ] {
        let e = arch_err(&with(mid));
        assert!(
            e.contains("t.arch, line 4") && e.contains(needle),
            "{mid}: {e}"
        );
    }
    for (text, needle) in [
        (format!("{head}flatten\nconv c 4 k=1\n{tail}"), "Conv2d"),
        (format!("{head}gap\nbn b\nlinear fc 4\n"), "BatchNorm2d"),
        (
            format!("{head}flatten\nmaxpool k=1\nlinear fc 4\n"),
            "MaxPool2d",
        ),
        (
            format!("{head}flatten\navgpool k=1\nlinear fc 4\n"),
            "AvgPool2d",
        ),
        (format!("{head}flatten\nlinear fc 4\nbn b\n"), "BatchNorm2d"),
        (
            "model m\ninput 3 100000 100000\nclasses 4\n".into(),
            "268435456",
        ),
        (
            "model m\ninput 4 1 1\nclasses 4\nflatten\n".into(),
            "no trainable parameters",
        ),
        ("model m\ninput 4 1 1\nclasses 4\n".into(), "flat logits"),
    ] {
        let e = arch_err(&text);
        assert!(e.contains("t.arch") && e.contains(needle), "{text}: {e}");
    }
    // Activations keep flatness: these are fine.
    let ok = format!("{head}silu\nflatten\nsigmoid\nlinear fc 8\nleaky_relu\ntanh\nlinear out 4\n");
    let m = hesscope::model::arch::parse("t.arch", &ok).unwrap();
    assert_eq!(
        m.nodes.last().unwrap().out_shape,
        hesscope::model::Shape::new(4, 1, 1)
    );
    assert!(m.nodes.iter().any(|n| n.op
        == hesscope::model::Op::Act(hesscope::model::Activation::LeakyRelu { slope: 0.01 })));
}

#[test]
fn error_text_escapes_terminal_control_characters() {
    use hesscope::error::escape;
    assert_eq!(escape("layer1.conv"), "layer1.conv");
    assert_eq!(escape("a\u{1b}[31mb"), "a\\u{1b}[31mb");
    assert_eq!(escape("x\ny\u{7}"), "x\\ny\\u{7}");
    assert_eq!(escape("rtl\u{202e}"), "rtl\\u{202e}");
    let e = hesscope::Error::Tensor {
        file: "w\u{1b}.safetensors".into(),
        name: "\u{1b}]0;title\u{7}".into(),
        msg: "unexpected".into(),
    }
    .to_string();
    assert!(!e.contains('\u{1b}') && !e.contains('\u{7}'), "{e}");
}

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

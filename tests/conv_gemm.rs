//! The float64 reference's GEMM convolutions and linear layers
//! (`ops::gemm`) against the plain loops of `ops::conv` and `ops::linear`
//! on random shapes (groups, depthwise, dilation, stride, padding wider
//! than the kernel, 1×1 layers on and off the no-im2col path, one and two
//! summed pairs), and their independence from the thread count: the same
//! calls, and whole HVPs of resnet20 and the grouped/dilated test model,
//! bit for bit under rayon pools of 1, 2 and 3 threads.

use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::model::{Model, Weights};
use hesscope::ops::{conv, gemm, linear};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn randv(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect()
}

/// max |a − b| / max |b|. Both sides sum the same float64 products (at
/// most a few hundred per output here, each O(1)) in different orders:
/// they differ by a few ulps of the largest partial sums, ~1e-15 of the
/// output's scale; 1e-13 leaves room for the longest sums and still fails
/// on any wrong index, tap or missing term (those are O(1) relative).
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    assert!(den > 0.0, "an all-zero reference checks nothing");
    num / den
}

const TOL: f64 = 1e-13;

/// A random geometry as PyTorch's Conv2d accepts it: every tenth case a
/// 1×1 stride-1 unpadded layer (the path without im2col), every fifth
/// another 1×1 layer, every seventh from the fourth a depthwise one.
fn random_geom(r: &mut StdRng, case: usize) -> conv::ConvGeom {
    let plain = case.is_multiple_of(10);
    let one = case.is_multiple_of(5);
    let depthwise = case % 7 == 3;
    loop {
        let groups = [1, 1, 2, 3, 4][r.random_range(0..5)];
        let cin_g = if depthwise { 1 } else { r.random_range(1..=4) };
        let cin = cin_g * groups;
        let cout = groups * r.random_range(1..=3) * if depthwise { 1 } else { 2 };
        let k = if one { 1 } else { r.random_range(1..=5) };
        let (stride, dilation, pad) = if plain {
            (1, 1, 0)
        } else {
            (
                r.random_range(1..=3),
                r.random_range(1..=3),
                r.random_range(0..=k + 2),
            )
        };
        let h = r.random_range(1..=11);
        let w = r.random_range(1..=11);
        let span = dilation * (k - 1) + 1;
        if h + 2 * pad < span || w + 2 * pad < span {
            continue;
        }
        return conv::ConvGeom {
            n: r.random_range(1..=5),
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
            oh: (h + 2 * pad - span) / stride + 1,
            ow: (w + 2 * pad - span) / stride + 1,
            groups,
            dilation,
        };
    }
}

/// Every pass of one geometry through both paths: (label, error).
fn compare(g: &conv::ConvGeom, r: &mut StdRng) -> Vec<(&'static str, f64)> {
    let xl = g.n * g.cin * g.h * g.w;
    let yl = g.n * g.cout * g.oh * g.ow;
    let wl = g.cout * g.cin_g() * g.k * g.k;
    let (x, x2) = (randv(r, xl), randv(r, xl));
    let (w, w2) = (randv(r, wl), randv(r, wl));
    let (gy, gy2) = (randv(r, yl), randv(r, yl));
    let mut out = vec![];
    // Outputs start non-zero: every function accumulates.
    let y0 = randv(r, yl);
    let (mut want, mut got) = (y0.clone(), y0.clone());
    conv::forward_acc(g, &x, &w, &mut want);
    gemm::conv_forward_acc(g, &[(&x, &w)], &mut got);
    out.push(("forward", rel(&got, &want)));
    conv::forward_acc(g, &x2, &w2, &mut want);
    let mut got = y0.clone();
    gemm::conv_forward_acc(g, &[(&x, &w), (&x2, &w2)], &mut got);
    out.push(("forward, two pairs", rel(&got, &want)));

    let gx0 = randv(r, xl);
    let (mut want, mut got) = (gx0.clone(), gx0.clone());
    conv::backward_data_acc(g, &gy, &w, &mut want);
    gemm::conv_backward_data_acc(g, &[(&gy, &w)], &mut got);
    out.push(("data", rel(&got, &want)));
    conv::backward_data_acc(g, &gy2, &w2, &mut want);
    let mut got = gx0.clone();
    gemm::conv_backward_data_acc(g, &[(&gy, &w), (&gy2, &w2)], &mut got);
    out.push(("data, two pairs", rel(&got, &want)));

    let gw0 = randv(r, wl);
    let (mut want, mut got) = (gw0.clone(), gw0.clone());
    conv::backward_weight_acc(g, &gy, &x, &mut want);
    gemm::conv_backward_weight_acc(g, &[(&gy, &x)], &mut got);
    out.push(("weight", rel(&got, &want)));
    conv::backward_weight_acc(g, &gy2, &x2, &mut want);
    let mut got = gw0.clone();
    gemm::conv_backward_weight_acc(g, &[(&gy, &x), (&gy2, &x2)], &mut got);
    out.push(("weight, two pairs", rel(&got, &want)));
    out
}

#[test]
fn gemm_convolutions_match_the_plain_loops_on_random_shapes() {
    let mut r = StdRng::seed_from_u64(24);
    let (mut grouped, mut dilated, mut strided, mut plain, mut padded) = (0, 0, 0, 0, 0);
    let mut worst: f64 = 0.0;
    for case in 0..300 {
        let g = random_geom(&mut r, case);
        grouped += (g.groups > 1) as usize;
        dilated += (g.dilation > 1 && g.k > 1) as usize;
        strided += (g.stride > 1) as usize;
        plain += (g.k == 1 && g.stride == 1 && g.pad == 0) as usize;
        padded += (g.pad >= g.k) as usize;
        for (what, e) in compare(&g, &mut r) {
            assert!(e <= TOL, "case {case} {what}: {e:.2e} on {g:?}");
            worst = worst.max(e);
        }
    }
    eprintln!("largest relative error over 300 shapes × 6 passes: {worst:.2e}");
    // The draw covers every kind of layer it claims to.
    assert!(grouped > 50 && dilated > 50 && strided > 50 && plain > 20 && padded > 20);
}

#[test]
fn gemm_convolutions_match_on_resnet_sizes() {
    // Batches larger than a weight-gradient chunk (several partials) and
    // planes larger than one im2col tile row block.
    let mut r = StdRng::seed_from_u64(7);
    let base = conv::ConvGeom {
        n: 37,
        cin: 16,
        h: 32,
        w: 32,
        cout: 32,
        k: 3,
        stride: 2,
        pad: 1,
        oh: 16,
        ow: 16,
        groups: 1,
        dilation: 1,
    };
    let wide = conv::ConvGeom {
        n: 3,
        cin: 64,
        h: 70,
        w: 70,
        cout: 8,
        k: 3,
        stride: 1,
        pad: 1,
        oh: 70,
        ow: 70,
        ..base
    };
    for g in [base, wide] {
        for (what, e) in compare(&g, &mut r) {
            assert!(e <= TOL, "{what}: {e:.2e} on {g:?}");
        }
    }
}

#[test]
fn gemm_linear_layers_match_the_plain_loops() {
    let mut r = StdRng::seed_from_u64(3);
    for &(n, din, dout) in &[
        (1, 1, 1),
        (5, 7, 3),
        (33, 64, 10),
        (70, 130, 41),
        (2, 576, 100),
    ] {
        let (x, w, gy) = (
            randv(&mut r, n * din),
            randv(&mut r, dout * din),
            randv(&mut r, n * dout),
        );
        // The weight as stored: [dout, din] (nn.Linear), or its transpose
        // [din, dout] (Hugging Face's Conv1D), which the GEMMs read in place.
        let wt = transpose(&w, dout, din);
        for transposed in [false, true] {
            let ws = if transposed { &wt } else { &w };
            let y0 = randv(&mut r, n * dout);
            let (mut want, mut got) = (y0.clone(), y0);
            linear::forward_acc(n, din, dout, &x, &w, &mut want);
            gemm::linear_forward_acc(n, din, dout, transposed, &x, ws, &mut got);
            assert!(
                rel(&got, &want) <= TOL,
                "forward {n} {din} {dout} {transposed}"
            );
            let gx0 = randv(&mut r, n * din);
            let (mut want, mut got) = (gx0.clone(), gx0);
            linear::backward_data_acc(n, din, dout, &gy, &w, &mut want);
            gemm::linear_backward_data_acc(n, din, dout, transposed, &gy, ws, &mut got);
            assert!(
                rel(&got, &want) <= TOL,
                "data {n} {din} {dout} {transposed}"
            );
            let gw0 = randv(&mut r, dout * din);
            let (mut want, got) = (gw0.clone(), gw0);
            linear::backward_weight_acc(n, din, dout, &gy, &x, &mut want);
            let got = if transposed {
                let mut got_t = transpose(&got, dout, din);
                gemm::linear_backward_weight_acc(n, din, dout, true, &gy, &x, &mut got_t);
                transpose(&got_t, din, dout)
            } else {
                let mut got = got;
                gemm::linear_backward_weight_acc(n, din, dout, false, &gy, &x, &mut got);
                got
            };
            assert!(
                rel(&got, &want) <= TOL,
                "weight {n} {din} {dout} {transposed}"
            );
        }
    }
}

/// The transpose of a row-major [rows, cols] matrix.
fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gemm_results_do_not_depend_on_the_thread_count() {
    let mut r = StdRng::seed_from_u64(11);
    for case in 0..40 {
        let mut g = random_geom(&mut r, case);
        g.n = r.random_range(1..=40);
        let xl = g.n * g.cin * g.h * g.w;
        let yl = g.n * g.cout * g.oh * g.ow;
        let wl = g.cout * g.cin_g() * g.k * g.k;
        let (x, w, gy) = (randv(&mut r, xl), randv(&mut r, wl), randv(&mut r, yl));
        let run = || {
            let mut y = vec![0.0; yl];
            gemm::conv_forward_acc(&g, &[(&x, &w)], &mut y);
            let mut gx = vec![0.0; xl];
            gemm::conv_backward_data_acc(&g, &[(&gy, &w), (&gy, &w)], &mut gx);
            let mut gw = vec![0.0; wl];
            gemm::conv_backward_weight_acc(&g, &[(&gy, &x), (&gy, &x)], &mut gw);
            [bits(&y), bits(&gx), bits(&gw)]
        };
        let one = in_pool(1, run);
        for t in [2, 3] {
            assert!(in_pool(t, run) == one, "case {case}, {t} threads: {g:?}");
        }
    }
}

fn problem(model: &str, samples: usize, batch: usize) -> Problem {
    let m = Model::load(model).unwrap();
    let w = Weights::init(&m, 5);
    let data = hesscope::data::synthetic(m.input, m.classes, samples, 6);
    Problem::new(m, w, data, batch, BnMode::Batch).unwrap()
}

#[test]
fn whole_hvps_do_not_depend_on_the_thread_count() {
    let grouped = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/grouped-conv.arch")
        .to_string_lossy()
        .into_owned();
    for (model, samples, batch) in [("resnet20", 12, 8), (grouped.as_str(), 20, 9)] {
        let pr = problem(model, samples, batch);
        let mut r = StdRng::seed_from_u64(1);
        let v = randv(&mut r, pr.model.n_params);
        let run = || {
            let mut cpu = CpuReference::new(pr.clone());
            let (loss, grad, hv) = cpu.loss_grad_hvp(&v).unwrap();
            (loss.to_bits(), bits(&grad), bits(&hv))
        };
        let one = in_pool(1, run);
        assert!(one.2.iter().any(|&b| f64::from_bits(b) != 0.0));
        assert!(in_pool(2, run) == one, "{model}: 2 threads differ from 1");
        assert!(in_pool(3, run) == one, "{model}: 3 threads differ from 1");
    }
}

//! A property test of the conv kernels through the whole engine: random
//! small models (one or two convs with k 1..11, stride 1..4, padding 0..k
//! and beyond, odd and 1×1 images, 1-pixel outputs, channel counts on
//! both sides of the kernels' 8-channel blocks, batches of 1..3 samples,
//! then a linear layer), each written as an `.arch` text, and the gradient
//! and Hv of every backend against the float64 reference.
//!
//! Seeds are fixed, so a failure names a model that fails again. Run with
//! `cargo test --test shapes -- --nocapture` to see the worst errors.

mod common;

use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::GpuEngine;
use hesscope::model::{arch, Weights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Models drawn per backend, and how many of them at least must run (the
/// rest are refused by the engine's envelope, e.g. padding above k).
const MODELS: usize = 56;
const AT_LEAST: usize = 40;

/// Relative L2 error allowed against float64. The f32 kernels sum at most
/// a few thousand products per output (cin·k² ≤ 17·121 in the forward and
/// backward-data kernels, n·oh·ow per weight chunk) in orders of their
/// own; such sums err by ~√terms·2⁻²⁴, and the kernels measure ≤ 1.2e-6
/// against float64 at these shapes. A wrong term — a missing or misplaced
/// tap, a channel of the next block, a clamped index — errs by ≥ 1e-3
/// (k ≥ 8 weight gradients erred by 0.5-1.0), so 1e-5 separates the two
/// by two orders of magnitude each way.
const TOL: f64 = 1e-5;

/// One conv layer of a drawn model.
struct Conv {
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    bias: bool,
}

/// Output size of a conv over `len` (the parser's formula).
fn out_len(len: usize, c: &Conv) -> usize {
    (len + 2 * c.pad - c.k) / c.stride + 1
}

fn draw_conv(r: &mut StdRng, h: usize, w: usize) -> Option<Conv> {
    let k = r.random_range(1..=11usize);
    let stride = r.random_range(1..=4usize);
    // Mostly 0..=k; sometimes beyond k (a Conv2d accepts any padding).
    let pad = if r.random_bool(0.15) {
        r.random_range(k + 1..=k + 3)
    } else {
        r.random_range(0..=k)
    };
    let cout = *[1usize, 2, 3, 4, 7, 8, 9, 12, 16, 17]
        .get(r.random_range(0..10))
        .unwrap();
    let c = Conv {
        cout,
        k,
        stride,
        pad,
        bias: r.random_bool(0.6),
    };
    (h + 2 * pad >= k && w + 2 * pad >= k).then_some(c)
}

/// A random model's `.arch` text and a one-line description.
fn draw_model(r: &mut StdRng, id: usize) -> (String, String) {
    loop {
        let cin = *[1usize, 2, 3, 5, 9].get(r.random_range(0..5)).unwrap();
        // Images from 1×1 up to 15×15, odd sizes included.
        let (h, w) = if r.random_bool(0.1) {
            (1, 1)
        } else {
            (r.random_range(1..=15usize), r.random_range(1..=15usize))
        };
        let Some(c1) = draw_conv(r, h, w) else {
            continue;
        };
        let (mut oh, mut ow) = (out_len(h, &c1), out_len(w, &c1));
        let mut layers = vec![c1];
        if r.random_bool(0.5) {
            if let Some(c2) = draw_conv(r, oh, ow) {
                (oh, ow) = (out_len(oh, &c2), out_len(ow, &c2));
                layers.push(c2);
            }
        }
        let features = layers.last().unwrap().cout * oh * ow;
        if features > 4096 {
            continue; // keeps the float64 reference and the run short
        }
        let classes = r.random_range(2..=5usize);
        let mut text = format!("model shape{id}\ninput {cin} {h} {w}\nclasses {classes}\n");
        let mut desc = format!("[{cin},{h},{w}]");
        for (i, c) in layers.iter().enumerate() {
            text += &format!(
                "conv c{} {} k={} stride={} pad={} bias={}\nrelu\n",
                i + 1,
                c.cout,
                c.k,
                c.stride,
                c.pad,
                c.bias
            );
            desc += &format!(
                " conv(cout {} k{} s{} p{}{})",
                c.cout,
                c.k,
                c.stride,
                c.pad,
                if c.bias { " +b" } else { "" }
            );
        }
        text += &format!("flatten\nlinear fc {classes}\n");
        desc += &format!(
            " -> [{},{oh},{ow}] fc {classes}",
            layers.last().unwrap().cout
        );
        return (text, desc);
    }
}

/// The model's problem: PyTorch-default weights and synthetic data, all
/// rounded to f32 so that both executors see the same numbers.
fn problem(r: &mut StdRng, text: &str, desc: &str) -> (Problem, Vec<f64>) {
    let model = arch::parse("shapes.arch", text).unwrap_or_else(|e| panic!("{desc}: {e}\n{text}"));
    let samples = r.random_range(1..=3usize);
    let batch = r.random_range(1..=samples);
    let mut weights = Weights::init(&model, r.random());
    weights.theta.iter_mut().for_each(|t| *t = *t as f32 as f64);
    let data = hesscope::data::synthetic(model.input, model.classes, samples, r.random());
    let n = model.n_params;
    let v: Vec<f64> = (0..n).map(|_| r.random::<f64>() - 0.5).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let v = v.iter().map(|x| (x / norm) as f32 as f64).collect();
    let p = Problem::new(model, weights, data, batch, BnMode::Batch).unwrap();
    (p, v)
}

#[test]
fn random_conv_shapes_match_float64_on_every_gpu_backend() {
    let mut failures = vec![];
    for choice in GPU_BACKENDS {
        // The same models on every backend.
        let mut r = StdRng::seed_from_u64(0x5ba9e5);
        let (mut worst_g, mut worst_h) = ((0.0f64, String::new()), (0.0f64, String::new()));
        let mut ran = 0;
        let mut refused = vec![];
        for id in 0..MODELS {
            let (text, desc) = draw_model(&mut r, id);
            let (p, v) = problem(&mut r, &text, &desc);
            let Some(ctx) = gpu_context(choice) else {
                break;
            };
            let desc = format!("{desc}, {} samples, batch {}", p.data.len(), p.batch);
            let mut e = match GpuEngine::new(ctx, &p) {
                Ok(e) => e,
                // A shape the engine declines, by name: not a wrong answer.
                Err(err @ hesscope::Error::Unsupported { .. }) => {
                    refused.push(format!("{desc}: {err}"));
                    continue;
                }
                Err(err) => panic!("{desc}: {err}"),
            };
            let (_, grad, hv) = e.loss_grad_hvp(&v).unwrap();
            // The float64 reference with the GPU's ReLU masks: an f32
            // pre-activation within rounding of 0 may take the other side
            // of the kink, which is not a kernel error.
            let masks = e.relu_masks().unwrap();
            let mut cpu = CpuReference::new(p);
            cpu.relu_masks = Some(masks);
            let o = cpu.pass(Some(&v)).unwrap();
            let (eg, eh) = (
                rel_err(&grad, &o.grad),
                rel_err(&hv, o.hv.as_ref().unwrap()),
            );
            if eg.is_nan() || eg > worst_g.0 {
                worst_g = (eg, desc.clone());
            }
            if eh.is_nan() || eh > worst_h.0 {
                worst_h = (eh, desc.clone());
            }
            if eg.is_nan() || eh.is_nan() || eg > TOL || eh > TOL {
                failures.push(format!(
                    "{choice:?} {desc}: grad {eg:.2e} hv {eh:.2e}\n{text}"
                ));
            }
            ran += 1;
        }
        if ran + refused.len() > 0 {
            eprintln!(
                "{choice:?}: {ran} models; worst grad {:.2e} ({}); worst hv {:.2e} ({}); {} refused by the engine{}",
                worst_g.0,
                worst_g.1,
                worst_h.0,
                worst_h.1,
                refused.len(),
                refused.first().map(|r| format!(", e.g. {r}")).unwrap_or_default()
            );
            assert!(
                ran >= AT_LEAST,
                "{choice:?}: only {ran} of {MODELS} models ran: {refused:#?}"
            );
        }
    }
    assert!(failures.is_empty(), "above {TOL}:\n{}", failures.join("\n"));
}

//! Helpers shared by the GPU kernel and whole-network tests: buffers
//! (uploaded, poisoned with NaN, read back), seeded random inputs, small
//! random problems, and the whole-model check (gradient, Hv and a block of
//! Hv against the float64 reference on every GPU backend).

use super::{gpu_contexts, rel_err};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::{GpuBuffer, GpuContext, GpuEngine};
use hesscope::model::{Model, Weights};
use rand::rngs::StdRng;
use rand::Rng;

pub fn upload(ctx: &GpuContext, name: &str, v: &[f64]) -> GpuBuffer {
    let b = ctx.storage(name, v.len()).unwrap();
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    ctx.write_f32(&b, 0, &f).unwrap();
    b
}

/// A buffer of `n` NaNs: an output the kernel must overwrite.
pub fn poisoned(ctx: &GpuContext, name: &str, n: usize) -> GpuBuffer {
    let b = ctx.storage(name, n).unwrap();
    ctx.write_f32(&b, 0, &vec![f32::NAN; n]).unwrap();
    b
}

pub fn read_raw(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

/// The whole buffer, widened to f64.
pub fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f64> {
    read_n(ctx, b, b.len)
}

/// The first `n` elements of the buffer, widened to f64.
pub fn read_n(ctx: &GpuContext, b: &GpuBuffer, n: usize) -> Vec<f64> {
    let r = ctx.read_f32(&[(b, 0, n)]).unwrap().remove(0);
    r.iter().map(|&x| x as f64).collect()
}

/// Uniform(lo, hi), f32-exact.
pub fn uniform(r: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| r.random_range(lo..hi) as f32 as f64)
        .collect()
}

/// Relative L2 error of f64 results; an all-zero reference must be
/// matched exactly.
pub fn rel_l2_f64(got: &[f64], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// `n` values uniform in [−1, 1) (f64: parameters, tangents).
pub fn uniform_unit(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-1.0..1.0)).collect()
}

/// `k` tangents of `n` values uniform in [−1, 1).
pub fn tangents(r: &mut StdRng, k: usize, n: usize) -> Vec<Vec<f64>> {
    (0..k).map(|_| uniform_unit(r, n)).collect()
}

/// `n` images of the model's input shape, uniform in [−2, 2), with labels
/// uniform in 0..classes.
pub fn image_data(r: &mut StdRng, model: &Model, n: usize, classes: u32) -> Dataset {
    Dataset {
        x: (0..n * model.input.numel())
            .map(|_| r.random_range(-2.0f32..2.0))
            .collect(),
        y: (0..n).map(|_| r.random_range(0..classes)).collect(),
        shape: model.input,
        source: "uniform".into(),
    }
}

/// A batch-norm-free problem of the whole batch `data` with parameters
/// `theta`.
pub fn problem_of(model: &Model, theta: Vec<f64>, data: Dataset, n: usize) -> Problem {
    let weights = Weights {
        theta,
        buffers: vec![],
    };
    Problem::new(model.clone(), weights, data, n, BnMode::Batch).unwrap()
}

/// Gradient, Hv at `vs[0]` and the block Hv of all of `vs` (which runs
/// the kernels on tangent slices) on every GPU backend against the
/// float64 reference, each within `tol` relative; with `loss`, the loss
/// too.
pub fn check_whole_model(label: &str, problem: &Problem, vs: &[Vec<f64>], tol: f64, loss: bool) {
    let np = problem.model.n_params;
    let mut cpu = CpuReference::new(problem.clone());
    let (l, g, hv) = cpu.loss_grad_hvp(&vs[0]).unwrap();
    let hvs: Vec<Vec<f64>> = vs
        .iter()
        .map(|v| {
            let mut o = vec![0.0; v.len()];
            cpu.hvp(v, &mut o).unwrap();
            o
        })
        .collect();
    for (name, ctx) in gpu_contexts() {
        let mut e = GpuEngine::new(ctx.share(), problem).unwrap();
        let (gl, gg, gh) = e.loss_grad_hvp(&vs[0]).unwrap();
        let el = if loss { (gl - l).abs() / l.abs() } else { 0.0 };
        let (eg, eh) = (rel_err(&gg, &g), rel_err(&gh, &hv));
        let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
        let mut outs = vec![vec![0.0; np]; vs.len()];
        e.hvp_block(&refs, &mut outs).unwrap();
        let eb = (0..vs.len())
            .map(|j| rel_err(&outs[j], &hvs[j]))
            .fold(0.0f64, f64::max);
        eprintln!(
            "{label} on {name}: loss {el:.1e}, gradient {eg:.1e}, Hv {eh:.1e}, \
             block of {} Hv {eb:.1e}",
            vs.len()
        );
        assert!(
            el <= tol && eg <= tol && eh <= tol && eb <= tol,
            "{label} on {name}: loss {el:.1e}, gradient {eg:.1e}, Hv {eh:.1e}, block {eb:.1e}"
        );
    }
}

/// The float64 units' context for a whole batch of `n` samples without
/// buffers, masks or recorded decisions.
pub fn batch_cx<'a>(model: &'a Model, n: usize, theta: &'a [f64]) -> hesscope::layers::CpuCx<'a> {
    hesscope::layers::CpuCx {
        model,
        n,
        theta,
        buffers: &[],
        batch_mode: true,
        mask: None,
        argmax: None,
        pieces: None,
        sync: None,
    }
}

/// Every element finite and within `tol` of `want` relative to `scale`
/// (or within `floor` absolutely; exact where `floor` is 0); the tail
/// past `want` keeps its bits. Returns the worst relative error among the
/// others.
#[track_caller]
pub fn check_scaled(
    what: &str,
    got: &[f32],
    before: &[f32],
    (want, scale): (&[f64], &[f64]),
    tol: f64,
    floor: f64,
) -> f64 {
    let mut worst = 0.0f64;
    for i in 0..want.len() {
        let (g, w) = (got[i] as f64, want[i]);
        assert!(g.is_finite(), "{what}: element {i} is {g} (want {w})");
        let e = (g - w).abs();
        if e <= floor {
            continue;
        }
        let rel = e / scale[i];
        assert!(
            rel <= tol,
            "{what}: element {i}: got {g}, want {w}, {rel:.2e} of {} > {tol:e}",
            scale[i]
        );
        worst = worst.max(rel);
    }
    for i in want.len()..got.len() {
        assert_eq!(got[i].to_bits(), before[i].to_bits(), "{what}: tail {i}");
    }
    worst
}

/// The random shapes of the ViT-like token networks: an image [c, h, w]
/// read as t = h·w tokens, widths d1 ≤ 40 and d2 ≤ 300.
pub struct TokenShapes {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub t: usize,
    pub d1: usize,
    pub d2: usize,
}

pub fn token_shapes(r: &mut StdRng) -> TokenShapes {
    let (c, h, w) = (
        r.random_range(2..=12),
        r.random_range(1..=4),
        r.random_range(1..=5),
    );
    let t = h * w;
    let (d1, d2) = (r.random_range(1..=40), r.random_range(1..=300));
    TokenShapes { c, h, w, t, d1, d2 }
}

/// Case `case` of a token network (`text`, 4 classes) on random
/// parameters, batches of 1 to 4 samples (at least 2 in cases 1 and up),
/// random images and 3 tangents: `check_whole_model` within `tol`.
pub fn check_token_network(r: &mut StdRng, case: usize, s: &TokenShapes, text: &str, tol: f64) {
    let model = hesscope::model::arch::parse("vt.arch", text).unwrap();
    hesscope::layers::check_model(&model).unwrap();
    let theta = uniform_unit(r, model.n_params);
    let n = r.random_range(1..=2) + 2 * case.min(1);
    let data = image_data(r, &model, n, 4);
    let problem = problem_of(&model, theta, data, n);
    let vs = tangents(r, 3, model.n_params);
    let TokenShapes { c, h, w, t, d1, d2 } = s;
    let label = format!("case {case}: [{c}, {h}, {w}] -> {t} tokens, widths {d1}, {d2}, batch {n}");
    check_whole_model(&label, &problem, &vs, tol, false);
}

/// An engine's loss, gradient and Hv at vs[0], and its block product of
/// all `vs` into NaN-poisoned outputs (every element must be written),
/// checked against its single product of vs[1] (the same float32
/// arithmetic, so the same bits).
pub struct Products {
    pub loss: f64,
    pub grad: Vec<f64>,
    pub hv: Vec<f64>,
    pub block: Vec<Vec<f64>>,
}

pub fn products(e: &mut GpuEngine, vs: &[Vec<f64>]) -> Products {
    let n = vs[0].len();
    let (loss, grad, hv) = e.loss_grad_hvp(&vs[0]).unwrap();
    let mut single = vec![f64::NAN; n];
    e.hvp(&vs[1], &mut single).unwrap();
    let refs: Vec<&[f64]> = vs.iter().map(|v| v.as_slice()).collect();
    // Poisoned: every element must be written.
    let mut block = vec![vec![f64::NAN; n]; vs.len()];
    e.hvp_block(&refs, &mut block).unwrap();
    assert!(grad.iter().chain(&hv).chain(&single).all(|x| x.is_finite()));
    assert!(block.iter().flatten().all(|x| x.is_finite()));
    assert_eq!(
        single, block[1],
        "an engine's single and block products are the same float32 arithmetic"
    );
    Products {
        loss,
        grad,
        hv,
        block,
    }
}

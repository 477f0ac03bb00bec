//! Where a GPU's float32 passes part from float64, node by node: one HVP
//! on the first adapter of each backend, then every value's forward,
//! R-forward, adjoint and R-adjoint read back and compared with the
//! float64 reference's (relative 2-norm over the batch), and per batch-norm
//! node in batch mode its conditioning: per channel, rms(x)/σ (how much a
//! rounding of x relative to x grows in x̂) and the same for ẋ against
//! its centred, x̂-orthogonal part (the R-forward's x̂̇/s). One batch.
//!
//! cargo run --release --example bn_precision -- ARCH WEIGHTS DATA VECTOR [batch|running] [vulkan|gl]
//!
//! Prints one line per node whose error grew by more than 2× over its
//! inputs' (or every node with ALL=1), then the worst parameter tensors'
//! gradient and Hv errors.

use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::decisions::DecisionSource;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::executor::ValueKind;
use hesscope::gpu::{BackendChoice, EngineOptions, GpuContext, GpuEngine};
use hesscope::layers::{self, loss, CpuCx};
use hesscope::model::{params, Model, Op, Weights};
use std::path::Path;
use std::time::Instant;

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - y).powi(2);
        den += y * y;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

fn sl<'v>(inputs: &[usize], of: &'v [Vec<f64>]) -> Vec<&'v [f64]> {
    inputs.iter().map(|&i| of[i].as_slice()).collect()
}

/// Float64 values, R-values, adjoints and R-adjoints of every value.
struct Ref {
    vals: Vec<Vec<f64>>,
    dvals: Vec<Vec<f64>>,
    adj: Vec<Vec<f64>>,
    radj: Vec<Vec<f64>>,
}

fn reference(problem: &Problem, v: &[f64]) -> Ref {
    let pr = problem;
    let n = pr.data.len();
    let cx = CpuCx {
        model: &pr.model,
        n,
        theta: &pr.weights.theta,
        buffers: &pr.weights.buffers,
        batch_mode: pr.bn == BnMode::Batch,
        mask: None,
        argmax: None,
        pieces: None,
        sync: None,
    };
    let nodes = &pr.model.nodes;
    let mut vals = vec![pr.data.x.iter().map(|&x| x as f64).collect::<Vec<f64>>()];
    let mut saved = vec![];
    for node in nodes {
        let (y, s) = layers::unit(&node.op).forward(&cx, node, &sl(&node.inputs, &vals));
        vals.push(y);
        saved.push(s);
    }
    let mut dvals = vec![vec![0.0; vals[0].len()]];
    for (ni, node) in nodes.iter().enumerate() {
        let dy = layers::unit(&node.op).r_forward(
            &cx,
            node,
            &sl(&node.inputs, &vals),
            &sl(&node.inputs, &dvals),
            v,
            &mut saved[ni],
        );
        dvals.push(dy);
    }
    let k = pr.model.classes;
    let nv = vals.len();
    let scale = 1.0 / n as f64;
    let (_, gz, p) = loss::cpu_forward_backward(n, k, &vals[nv - 1], &pr.data.y, scale);
    let mut adj: Vec<Vec<f64>> = vals.iter().map(|x| vec![0.0; x.len()]).collect();
    let mut radj = adj.clone();
    adj[nv - 1] = gz;
    radj[nv - 1] = loss::cpu_r_backward(n, k, &p, &dvals[nv - 1], scale);
    let mut grad = vec![0.0; pr.model.n_params];
    let mut hv = vec![0.0; pr.model.n_params];
    for (ni, node) in nodes.iter().enumerate().rev() {
        let unit = layers::unit(&node.op);
        let gy = adj[ni + 1].clone();
        let rgy = radj[ni + 1].clone();
        let xs = sl(&node.inputs, &vals);
        let gxs = unit.backward(&cx, node, &xs, &saved[ni], &gy, &mut grad);
        let rgxs = unit.r_backward(
            &cx,
            node,
            &xs,
            &sl(&node.inputs, &dvals),
            &saved[ni],
            &gy,
            &rgy,
            v,
            &mut hv,
        );
        for (&i, g) in node.inputs.iter().zip(gxs) {
            adj[i].iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        for (&i, g) in node.inputs.iter().zip(rgxs) {
            radj[i].iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
    }
    Ref {
        vals,
        dvals,
        adj,
        radj,
    }
}

/// Per channel of [n, c, hw]: the largest rms(x)/σ(x), and the largest
/// rms(ẋ)/rms(ẋ − mean ẋ − x̂·mean(x̂ẋ)), with the smallest σ.
fn conditioning(x: &[f64], dx: &[f64], n: usize, c: usize, hw: usize) -> (f64, f64, f64) {
    let (mut kx, mut kd, mut smin) = (0.0f64, 0.0f64, f64::INFINITY);
    let m = (n * hw) as f64;
    for ch in 0..c {
        let idx: Vec<usize> = (0..n)
            .flat_map(|s| ((s * c + ch) * hw)..((s * c + ch) * hw + hw))
            .collect();
        let mean = idx.iter().map(|&i| x[i]).sum::<f64>() / m;
        let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f64>() / m;
        let ms = idx.iter().map(|&i| x[i] * x[i]).sum::<f64>() / m;
        let sd = (var + 1e-5).sqrt();
        smin = smin.min(var.sqrt());
        kx = kx.max(ms.sqrt() / sd);
        let xh: Vec<f64> = idx.iter().map(|&i| (x[i] - mean) / sd).collect();
        let md = idx.iter().map(|&i| dx[i]).sum::<f64>() / m;
        let mxd = idx.iter().zip(&xh).map(|(&i, h)| h * dx[i]).sum::<f64>() / m;
        let ms_d = idx.iter().map(|&i| dx[i] * dx[i]).sum::<f64>() / m;
        let cen = idx
            .iter()
            .zip(&xh)
            .map(|(&i, h)| (dx[i] - md - h * mxd).powi(2))
            .sum::<f64>()
            / m;
        if cen > 0.0 {
            kd = kd.max((ms_d / cen).sqrt());
        }
    }
    (kx, kd, smin)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(
            "usage: bn_precision ARCH WEIGHTS DATA VECTOR [batch|running] [vulkan|gl]".into(),
        );
    }
    let model = Model::load(&args[0])?;
    let weights = Weights::load(&model, Path::new(&args[1]))?;
    let data = Dataset::load(Path::new(&args[2]))?;
    let v = params::load_vector(&model, Path::new(&args[3]))?;
    let bn = match args.get(4).map(String::as_str) {
        Some("running") => BnMode::Running,
        _ => BnMode::Batch,
    };
    let choice = match args.get(5).map(String::as_str) {
        Some("gl") => BackendChoice::Gl,
        _ => BackendChoice::Vulkan,
    };
    let all = std::env::var("ALL").is_ok();
    let n = data.len();
    let problem = Problem::new(model.clone(), weights, data, n, bn)?;
    let r = reference(&problem, &v);
    let mut cpu = CpuReference::new(problem.clone());
    let (_, g64, h64) = cpu.loss_grad_hvp(&v)?;
    for state in [DecisionSource::Float32, DecisionSource::Float64] {
        println!("== batch-norm state: {} ==", state.name());
        let options = EngineOptions {
            bn_state: state,
            ..Default::default()
        };
        report(
            &model, &problem, &r, &v, &g64, &h64, choice, options, all, bn,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    model: &Model,
    problem: &Problem,
    r: &Ref,
    v: &[f64],
    g64: &[f64],
    h64: &[f64],
    choice: BackendChoice,
    options: EngineOptions,
    all: bool,
    bn: BnMode,
) -> Result<(), Box<dyn std::error::Error>> {
    let n = problem.data.len();
    let ctx = GpuContext::open(choice, 0)?;
    let mut e = GpuEngine::with_options(ctx, problem, options)?;
    let t = Instant::now();
    let (_, g32, h32) = e.loss_grad_hvp(v)?;
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut out = vec![0.0; v.len()];
    e.hvp(v, &mut out)?;
    let again = t.elapsed().as_secs_f64();
    println!("seconds: loss, gradient and Hv at a new θ {first:.3}; another Hv {again:.3}");
    let fw = e.resident_values(0, ValueKind::Forward)?;
    let tg = e.resident_values(0, ValueKind::Tangent)?;
    let ad = e.resident_values(0, ValueKind::Adjoint)?;
    let ra = e.resident_values(0, ValueKind::RAdjoint)?;
    let errs = |i: usize| {
        [
            rel(&fw[i], &r.vals[i]),
            rel(&tg[i], &r.dvals[i]),
            rel(&ad[i], &r.adj[i]),
            rel(&ra[i], &r.radj[i]),
        ]
    };
    println!("node kind name: forward R-forward adjoint R-adjoint (relative 2-norm) [BN: max rms(x)/σ, max rms(ẋ)/|centred ẋ|, min σ]");
    for (ni, node) in model.nodes.iter().enumerate() {
        let e_out = errs(ni + 1);
        let e_in = node
            .inputs
            .iter()
            .map(|&i| errs(i))
            .fold([0.0f64; 4], |a, b| [0, 1, 2, 3].map(|j| a[j].max(b[j])));
        let grew = (0..2).any(|j| e_out[j] > 2.0 * e_in[j] && e_out[j] > 1e-6);
        let mut extra = String::new();
        if let Op::BatchNorm { c, .. } = node.op {
            if bn == BnMode::Batch {
                let x = &r.vals[node.inputs[0]];
                let dx = &r.dvals[node.inputs[0]];
                let (kx, kd, smin) = conditioning(x, dx, n, c, node.in_shape.spatial());
                extra = format!(
                    " [κx {kx:.1e} κẋ {kd:.1e} σmin {smin:.1e} m {}]",
                    n * node.in_shape.spatial()
                );
            }
        }
        if all || grew || !extra.is_empty() {
            println!(
                "{ni:4} {:<10} {:<32} {:9.2e} {:9.2e} {:9.2e} {:9.2e}{extra}",
                node.kind(),
                layers::layer_name(node),
                e_out[0],
                e_out[1],
                e_out[2],
                e_out[3]
            );
        }
    }
    let total = |a: &[f64], b: &[f64]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    };
    println!(
        "overall: gradient {:.2e}, Hv {:.2e}",
        total(&g32, g64),
        total(&h32, h64)
    );
    let mut per: Vec<(f64, f64, String)> = model
        .params
        .iter()
        .map(|p| {
            let s = p.offset..p.offset + p.numel();
            let ng: f64 = g64[s.clone()].iter().map(|x| x * x).sum::<f64>().sqrt();
            let nh: f64 = h64[s.clone()].iter().map(|x| x * x).sum::<f64>().sqrt();
            let eg: f64 = (s.clone())
                .map(|i| (g32[i] - g64[i]).powi(2))
                .sum::<f64>()
                .sqrt();
            let eh: f64 = s.map(|i| (h32[i] - h64[i]).powi(2)).sum::<f64>().sqrt();
            (eh, eg, format!("{} (|g| {ng:.1e}, |Hv| {nh:.1e})", p.name))
        })
        .collect();
    per.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("largest absolute Hv errors by tensor (Hv error, gradient error):");
    for (eh, eg, name) in per.iter().take(8) {
        println!("  {eh:.2e} {eg:.2e} {name}");
    }
    Ok(())
}

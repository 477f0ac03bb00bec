//! Where the float64 engine's time goes: one batch's forward, R-forward,
//! backward and R-backward timed per node, with the floating-point
//! operations of the GEMM layers (convolutions and linear layers) beside
//! them, and the machine's float64 GEMM peak measured with the same GEMM
//! (faer) on a large square product — what `hesscope bench --backend cpu`
//! prints, and what issue 24's profile asked for.

use super::{add_into, slices, CpuReference};
use crate::layers::{self, next_token};
use crate::model::{Node, Op};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use std::time::Instant;

/// One node's pass times over one batch.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LayerTime {
    /// Index into `Model::nodes`.
    pub node: usize,
    /// The layer's name (its kind where it has none).
    pub name: String,
    pub kind: String,
    /// Seconds of the forward, R-forward, backward and R-backward.
    pub forward_s: f64,
    pub r_forward_s: f64,
    pub backward_s: f64,
    pub r_backward_s: f64,
    /// Floating-point operations of the four passes together (the GEMMs of
    /// a convolution or linear layer: 9 forward products — 1 forward, 2
    /// R-forward, 2 backward, 4 R-backward); 0 for the other layers.
    pub flops: f64,
}

impl LayerTime {
    pub fn seconds(&self) -> f64 {
        self.forward_s + self.r_forward_s + self.backward_s + self.r_backward_s
    }
    /// GFLOP/s over the four passes; None for layers without GEMMs.
    pub fn gflops(&self) -> Option<f64> {
        (self.flops > 0.0 && self.seconds() > 0.0).then(|| self.flops / self.seconds() / 1e9)
    }
}

/// Multiply-adds ×2 of one forward product of a GEMM layer over `n` samples.
fn forward_flops(node: &Node, n: usize) -> f64 {
    match node.op {
        Op::Conv {
            cin,
            cout,
            k,
            groups,
            ..
        } => {
            let out = node.out_shape.spatial() as f64;
            2.0 * n as f64 * cout as f64 * out * (cin / groups.max(1)) as f64 * (k * k) as f64
        }
        Op::Linear { din, dout, .. } => {
            2.0 * n as f64 * (din * dout) as f64 * (node.in_shape.numel() / din.max(1)) as f64
        }
        _ => 0.0,
    }
}

fn timed<R>(acc: &mut f64, f: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    let r = f();
    *acc += t.elapsed().as_secs_f64();
    r
}

impl CpuReference {
    /// The pass times of every node on the first batch (its batch-size
    /// samples), with Hv along `v`: the walk of [`CpuReference::pass`],
    /// timed. Each pass runs on all threads as it does in a product.
    pub fn layer_times(&self, v: &[f64]) -> Vec<LayerTime> {
        let pr = &self.problem;
        let nodes = &pr.model.nodes;
        let count = pr.batch.min(pr.data.len());
        let mut t: Vec<LayerTime> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| LayerTime {
                node: i,
                name: layers::layer_name(n),
                kind: n.kind().to_string(),
                flops: 9.0 * forward_flops(n, count),
                ..Default::default()
            })
            .collect();
        let cx = self.cx(count, None, None, None);
        let d = pr.model.input.numel();
        let mut vals: Vec<Vec<f64>> =
            vec![pr.data.x[..count * d].iter().map(|&x| x as f64).collect()];
        let mut saved = Vec::with_capacity(nodes.len());
        for (ni, node) in nodes.iter().enumerate() {
            let xs = slices(&node.inputs, &vals);
            let (y, s) = timed(&mut t[ni].forward_s, || {
                layers::unit(&node.op).forward(&cx, node, &xs)
            });
            vals.push(y);
            saved.push(s);
        }
        let mut dvals: Vec<Vec<f64>> = vec![vec![0.0; vals[0].len()]];
        for (ni, node) in nodes.iter().enumerate() {
            let (xs, dxs) = (slices(&node.inputs, &vals), slices(&node.inputs, &dvals));
            let s = &mut saved[ni];
            let dy = timed(&mut t[ni].r_forward_s, || {
                layers::unit(&node.op).r_forward(&cx, node, &xs, &dxs, v, s)
            });
            dvals.push(dy);
        }
        let nv = vals.len();
        let scale = 1.0 / pr.data.len() as f64;
        let (_, gz, p) =
            next_token::forward_backward(&pr.model, &pr.data, 0, count, &vals[nv - 1], scale);
        let mut adj: Vec<Option<Vec<f64>>> = vec![None; nv];
        let mut radj: Vec<Option<Vec<f64>>> = vec![None; nv];
        adj[nv - 1] = Some(gz);
        radj[nv - 1] = Some(next_token::r_backward(
            &pr.model,
            count,
            &p,
            &dvals[nv - 1],
            scale,
        ));
        let mut grad = vec![0.0; pr.model.n_params];
        let mut hv = vec![0.0; pr.model.n_params];
        for (ni, node) in nodes.iter().enumerate().rev() {
            let Some(gy) = adj[ni + 1].take() else {
                continue;
            };
            let unit = layers::unit(&node.op);
            let (xs, dxs) = (slices(&node.inputs, &vals), slices(&node.inputs, &dvals));
            let gxs = timed(&mut t[ni].backward_s, || {
                unit.backward(&cx, node, &xs, &saved[ni], &gy, &mut grad)
            });
            if let Some(rgy) = radj[ni + 1].take() {
                let rgxs = timed(&mut t[ni].r_backward_s, || {
                    unit.r_backward(&cx, node, &xs, &dxs, &saved[ni], &gy, &rgy, v, &mut hv)
                });
                for (&i, r) in node.inputs.iter().zip(rgxs) {
                    add_into(&mut radj[i], r);
                }
            }
            for (&i, g) in node.inputs.iter().zip(gxs) {
                add_into(&mut adj[i], g);
            }
        }
        t
    }
}

/// The machine's float64 GEMM rate in GFLOP/s: the best of `reps` n×n·n×n
/// products by faer's `matmul` on all of rayon's threads (`Par::rayon(0)`),
/// or on one thread with `one_thread` — the ceiling the GEMM layers'
/// GFLOP/s are read against.
pub fn gemm_peak_gflops(n: usize, reps: usize, one_thread: bool) -> f64 {
    let a = Mat::<f64>::from_fn(n, n, |i, j| ((i * 7 + j * 3) % 11) as f64 - 5.0);
    let b = Mat::<f64>::from_fn(n, n, |i, j| ((i * 5 + j * 13) % 7) as f64 - 3.0);
    let mut c = Mat::<f64>::zeros(n, n);
    let par = if one_thread { Par::Seq } else { Par::rayon(0) };
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) + 1 {
        let t = Instant::now();
        matmul(c.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0, par);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// `hesscope bench --backend cpu`'s table: per-layer pass times and GEMM
/// rates on the first batch, beside the measured float64 GEMM peak.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuLayers {
    /// rayon's threads (the engine's parallelism).
    pub threads: usize,
    /// The side of the square GEMM timed for the peak.
    pub peak_size: usize,
    /// faer's float64 GEMM on all threads, and on one, GFLOP/s.
    pub gemm_peak_gflops: f64,
    pub gemm_peak_one_thread_gflops: f64,
    /// Samples in the timed batch.
    pub batch: usize,
    /// Per node, each pass's median over the repetitions.
    pub layers: Vec<LayerTime>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// The per-layer times of `cpu` (median of `reps` after a warm-up) along a
/// fixed direction, and the GEMM peak measured in the same run.
pub fn cpu_layers(cpu: &CpuReference, reps: usize) -> CpuLayers {
    let n = cpu.problem.model.n_params;
    let v: Vec<f64> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f64 / 1000.0) - 0.5)
        .collect();
    cpu.layer_times(&v);
    let runs: Vec<Vec<LayerTime>> = (0..reps.max(1)).map(|_| cpu.layer_times(&v)).collect();
    let mut layers = runs[0].clone();
    for (i, l) in layers.iter_mut().enumerate() {
        let pick = |f: fn(&LayerTime) -> f64| median(runs.iter().map(|r| f(&r[i])).collect());
        l.forward_s = pick(|t| t.forward_s);
        l.r_forward_s = pick(|t| t.r_forward_s);
        l.backward_s = pick(|t| t.backward_s);
        l.r_backward_s = pick(|t| t.r_backward_s);
    }
    let peak_size = 1024;
    CpuLayers {
        threads: rayon::current_num_threads(),
        peak_size,
        gemm_peak_gflops: gemm_peak_gflops(peak_size, reps.max(3), false),
        gemm_peak_one_thread_gflops: gemm_peak_gflops(peak_size, reps.max(3), true),
        batch: cpu.problem.batch.min(cpu.problem.data.len()),
        layers,
    }
}

/// The table `hesscope bench` prints for [`CpuLayers`].
pub fn format_cpu_layers(r: &CpuLayers) -> String {
    let mut s = format!(
        "  float64 GEMM peak (faer, {0}×{0}): {1:.1} GFLOP/s on {2} threads, {3:.1} on one\n  \
         per layer, one batch of {4} (forward / R-forward / backward / R-backward, ms):\n",
        r.peak_size, r.gemm_peak_gflops, r.threads, r.gemm_peak_one_thread_gflops, r.batch
    );
    let total: f64 = r.layers.iter().map(LayerTime::seconds).sum();
    for l in &r.layers {
        let rate = l.gflops().map_or(String::new(), |g| {
            format!(
                "  {g:6.1} GFLOP/s ({:.0} % of peak)",
                100.0 * g / r.gemm_peak_gflops
            )
        });
        s.push_str(&format!(
            "    {:<22} {:<10} {:7.2} {:7.2} {:7.2} {:7.2}  {:4.1} %{rate}\n",
            l.name,
            l.kind,
            1e3 * l.forward_s,
            1e3 * l.r_forward_s,
            1e3 * l.backward_s,
            1e3 * l.r_backward_s,
            100.0 * l.seconds() / total.max(f64::MIN_POSITIVE),
        ));
    }
    let flops: f64 = r.layers.iter().map(|l| l.flops).sum();
    let gemm_s: f64 = r
        .layers
        .iter()
        .filter(|l| l.flops > 0.0)
        .map(LayerTime::seconds)
        .sum();
    s.push_str(&format!(
        "    all layers {:.1} ms; the GEMM layers {:.1} ms at {:.1} GFLOP/s\n",
        1e3 * total,
        1e3 * gemm_s,
        flops / gemm_s.max(f64::MIN_POSITIVE) / 1e9
    ));
    s
}

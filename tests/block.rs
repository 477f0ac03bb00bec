//! Block products (issue 12): one sweep over the data for K Hessian-vector
//! products, and the solvers that run on them, against K single products
//! and the single-vector solvers.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Hessian};
use hesscope::spectral::lanczos::BasisBudget;
use hesscope::spectral::slq::{slq, slq_block};
use hesscope::spectral::trace::{hutchinson, hutchinson_block, hutchpp, hutchpp_block};

/// K deterministic directions: the fixture's v, then smooth, signed,
/// distinct patterns of the same size.
fn directions(v: &[f64], k: usize) -> Vec<Vec<f64>> {
    (0..k)
        .map(|j| {
            if j == 0 {
                v.to_vec()
            } else {
                (0..v.len())
                    .map(|i| {
                        (((i * (7919 + 104_729 * j)) % 1009) as f64 / 504.5 - 1.0) * v[i].signum()
                    })
                    .collect()
            }
        })
        .collect()
}

/// The block entry point of the float64 reference runs the same unit
/// passes in the same order as `hvp` (one forward and one backward shared,
/// each tangent's R-forward and R-backward in turn), so the products are
/// equal bit for bit: tolerance 0, on every fixture and both BN modes
/// (cnn-tiny's batch norms keep R-forward state for their R-backward,
/// which running every R-forward before the R-backwards would overwrite).
#[test]
fn cpu_block_products_equal_single_products() {
    let cases = fixture_cases();
    assert!(
        cases
            .iter()
            .any(|(m, b)| m == "cnn-tiny" && *b == BnMode::Batch)
            && cases
                .iter()
                .any(|(m, b)| m == "cnn-tiny" && *b == BnMode::Running),
        "expected cnn-tiny (a BN model) in both modes among {cases:?}"
    );
    for (name, bn) in cases {
        let p = problem(&name, bn);
        let v = vector(&p, fixtures_dir().join(&name).join("v.safetensors"));
        let mut engine = CpuReference::new(p);
        let n = engine.n_params();
        let t = std::time::Instant::now();
        // K = 1, 3, 5 on the BN model; one K elsewhere keeps the test short
        // (lenet5 has 61706 parameters).
        let ks: &[usize] = if name == "cnn-tiny" { &[1, 3, 5] } else { &[3] };
        for &k in ks {
            let dirs = directions(&v, k);
            let singles: Vec<Vec<f64>> = dirs
                .iter()
                .map(|d| {
                    let mut out = vec![0.0; n];
                    engine.hvp(d, &mut out).unwrap();
                    out
                })
                .collect();
            let refs: Vec<&[f64]> = dirs.iter().map(|d| d.as_slice()).collect();
            let mut outs = vec![vec![0.0; n]; k];
            engine.hvp_block(&refs, &mut outs).unwrap();
            for (j, (a, b)) in outs.iter().zip(&singles).enumerate() {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f64, f64::max);
                assert!(
                    worst == 0.0,
                    "{name} {bn:?} K={k} tangent {j}: block differs from single by {worst:e}"
                );
                assert!(a.iter().any(|x| *x != 0.0), "{name} {bn:?}: Hv is zero");
            }
        }
        println!(
            "{name} {bn:?}: {n} parameters, K = {ks:?} equal ({:.2} s)",
            t.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn cpu_block_refuses_mismatched_outputs() {
    let p = problem("mlp-tiny", BnMode::Batch);
    let mut engine = CpuReference::new(p);
    let n = engine.n_params();
    let v = vec![1.0; n];
    let mut outs = vec![vec![0.0; n]; 2];
    assert!(engine.hvp_block(&[&v], &mut outs).is_err());
    let mut short = vec![vec![0.0; n - 1]];
    assert!(engine.hvp_block(&[&v], &mut short).is_err());
    let bad = vec![1.0; n + 1];
    let mut one = vec![vec![0.0; n]];
    assert!(engine.hvp_block(&[&bad], &mut one).is_err());
}

/// The solvers on the float64 Hessian of cnn-tiny (BN in batch mode):
/// SLQ runs in lockstep and trace probes in blocks, through the
/// reference's block products, against block 1. The block products equal
/// single ones bit for bit and every run does its own arithmetic, so the
/// results agree exactly; the bound is the 1e-10 relative.
#[test]
fn solvers_on_the_cpu_hessian_agree_across_blocks() {
    let mut engine = CpuReference::new(problem("cnn-tiny", BnMode::Batch));
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-10 * a.abs().max(b.abs()).max(1e-300),
            "{what}: {a} vs {b}"
        );
    };
    let one = slq(&mut Hessian(&mut engine), 6, 3, 2).unwrap();
    let two = slq_block(
        &mut Hessian(&mut engine),
        6,
        3,
        2,
        2,
        BasisBudget::host_default(),
    )
    .unwrap();
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.nodes.len(), 6);
        for (x, y) in a.nodes.iter().zip(&b.nodes) {
            close(*x, *y, "SLQ node");
        }
        for (x, y) in a.weights.iter().zip(&b.weights) {
            close(*x, *y, "SLQ weight");
        }
    }
    let h1 = hutchinson(&mut Hessian(&mut engine), 5, 1).unwrap();
    let h4 = hutchinson_block(&mut Hessian(&mut engine), 5, 1, 4).unwrap();
    close(h1.estimate, h4.estimate, "Hutchinson");
    let p1 = hutchpp(&mut Hessian(&mut engine), 6, 1).unwrap();
    let p4 = hutchpp_block(&mut Hessian(&mut engine), 6, 1, 4).unwrap();
    close(p1.estimate, p4.estimate, "Hutch++");
}

/// `hesscope <cmd> --json` on mlp-tiny's synthetic data (32 samples,
/// batches of 16) on the float64 reference: the solvers' equivalences do
/// not depend on the model, and the block products' on BN are tested above.
fn run_json(cmd: &[&str]) -> serde_json::Value {
    let mut args: Vec<&str> = cmd.to_vec();
    args.extend([
        "--backend",
        "cpu",
        "--model",
        "mlp-tiny",
        "--samples",
        "32",
        "--batch",
        "16",
        "--json",
    ]);
    let (ok, stdout, stderr) = hesscope(&args);
    assert!(ok, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// SLQ runs in lockstep on block products are the same runs: on the CPU
/// reference the products are bit-identical, so the densities must agree
/// to rounding; 1e-9 relative to the density's peak is the bound
/// (a difference there would mean different runs, not rounding).
#[test]
fn cli_density_block_4_equals_block_1() {
    let base = ["density", "--steps", "10", "--runs", "5", "--grid", "200"];
    let one = run_json(&[&base[..], &["--block", "1"]].concat());
    let four = run_json(&[&base[..], &["--block", "4"]].concat());
    let (d1, d4) = (floats(&one["density"]), floats(&four["density"]));
    assert_eq!(d1.len(), 200);
    let peak = d1.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    let worst = d1
        .iter()
        .zip(&d4)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    assert!(
        worst <= 1e-9 * peak,
        "densities differ by {worst:e} (peak {peak:e})"
    );
    assert_eq!(floats(&one["grid"]), floats(&four["grid"]));
    assert_eq!(one["block"], 1);
    assert_eq!(four["block"], 4);
    assert_eq!(one["hvps"], 50);
    assert_eq!(four["hvps"], 50);
    // Five runs of ten steps: one by one, 50 sweeps; in lockstep, a group
    // of four and a group of one, ten sweeps each.
    assert_eq!(one["sweeps"], 50);
    assert_eq!(four["sweeps"], 20);
}

/// Trace probes in blocks are the same probes (equal estimates), and
/// block Lanczos finds the same top eigenvalues as single Lanczos to the
/// residual tolerance (a Ritz value with residual r ≤ tol·|λmax| is within
/// r of an eigenvalue) in fewer sweeps.
#[test]
fn cli_trace_and_eigs_with_blocks() {
    let t1 = run_json(&["trace", "--probes", "9", "--block", "1"]);
    let t3 = run_json(&["trace", "--probes", "9", "--block", "3"]);
    assert_eq!(t3["block"], 3);
    for est in ["hutchinson", "hutchpp"] {
        let a = t1["traces"][0]["estimates"][est]["estimate"]
            .as_f64()
            .unwrap();
        let b = t3["traces"][0]["estimates"][est]["estimate"]
            .as_f64()
            .unwrap();
        assert!((a - b).abs() <= 1e-12 * a.abs(), "{est}: {a} vs {b}");
    }
    let tol = 1e-6;
    let e1 = run_json(&["eigs", "--top", "3", "--block", "1"]);
    let e4 = run_json(&["eigs", "--top", "3", "--block", "4"]);
    assert_eq!(e1["converged"], true);
    assert_eq!(e4["converged"], true);
    assert_eq!(e4["block"], 4);
    let (l1, l4) = (floats(&e1["eigenvalues"]), floats(&e4["eigenvalues"]));
    let lmax = l1[0].abs();
    for (a, b) in l1.iter().zip(&l4) {
        assert!((a - b).abs() <= 2.0 * tol * lmax, "{l1:?} vs {l4:?}");
    }
    let (s1, s4) = (
        e1["sweeps"].as_u64().unwrap(),
        e4["sweeps"].as_u64().unwrap(),
    );
    assert_eq!(s1, e1["hvps"].as_u64().unwrap());
    assert!(s4 < s1, "block eigs took {s4} sweeps, single {s1}");
}

#[test]
fn cli_bad_block_sizes_name_the_flag() {
    for bad in ["0", "65", "-1", "x"] {
        let (ok, _, stderr) = hesscope(&[
            "density",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--block",
            bad,
        ]);
        assert!(!ok && stderr.contains("--block"), "--block {bad}: {stderr}");
    }
    for bad in ["0", "1,65"] {
        let (ok, _, stderr) = hesscope(&[
            "bench",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--block-sizes",
            bad,
        ]);
        assert!(
            !ok && stderr.contains("--block-sizes"),
            "--block-sizes {bad}: {stderr}"
        );
    }
}

#[test]
fn cli_bench_times_block_products_per_vector() {
    let v = run_json(&[
        "bench",
        "--reps",
        "1",
        "--no-kernels",
        "--block-sizes",
        "1,4",
    ]);
    let rows = v["block_products"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, k) in rows.iter().zip([1.0, 4.0]) {
        assert_eq!(row["block"].as_f64().unwrap(), k);
        let (s, per) = (
            row["seconds"].as_f64().unwrap(),
            row["per_vector_seconds"].as_f64().unwrap(),
        );
        // How many vectors each timed product had is counted, not
        // inferred from these times: block_timings_time_block_products_of_k_vectors.
        assert!(s > 0.0 && per > 0.0, "{row}");
    }
    let (ok, stdout, stderr) = hesscope(&[
        "bench",
        "--backend",
        "cpu",
        "--model",
        "mlp-tiny",
        "--samples",
        "16",
        "--reps",
        "1",
        "--block-sizes",
        "1,3",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.matches("HVP per vector at K").count(), 2, "{stdout}");
}

/// Counts the vectors of every block product an engine is asked for.
struct Counting {
    inner: CpuReference,
    calls: Vec<usize>,
}

impl Curvature for Counting {
    fn n_params(&self) -> usize {
        self.inner.n_params()
    }
    fn loss_grad(&mut self) -> hesscope::Result<(f64, Vec<f64>)> {
        self.inner.loss_grad()
    }
    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
        self.calls.push(1);
        self.inner.hvp(v, out)
    }
    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> hesscope::Result<()> {
        self.calls.push(vs.len());
        self.inner.hvp_block(vs, outs)
    }
    fn backend(&self) -> String {
        self.inner.backend()
    }
    fn adapter(&self) -> String {
        self.inner.adapter()
    }
}

/// What `bench --block-sizes` times is one block product of K distinct
/// vectors per repetition (plus one warm-up), each K in the order asked:
/// counted on a wrapper, not inferred from the times.
#[test]
fn block_timings_time_block_products_of_k_vectors() {
    let p = problem("mlp-tiny", BnMode::Batch);
    let mut e = Counting {
        inner: CpuReference::new(p),
        calls: vec![],
    };
    let reps = 3;
    let rows = hesscope::bench::block_timings(&mut e, &[1, 4, 7], reps).unwrap();
    let want: Vec<usize> = [1, 4, 7]
        .iter()
        .flat_map(|&k| std::iter::repeat_n(k, reps + 1))
        .collect();
    assert_eq!(e.calls, want);
    for (row, k) in rows.iter().zip([1, 4, 7]) {
        assert_eq!(row.block, k);
        assert!(row.seconds > 0.0 && row.per_vector_seconds > 0.0, "{row:?}");
    }
}

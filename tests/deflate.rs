//! `density --deflate`: outlier deflation (`spectral::deflate`) against the
//! dense fixtures' exact smoothed densities at the default budget of 900
//! products, its snapshot on every backend, and the CLI's report.

mod common;

use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Hessian};
use hesscope::spectral::deflate::{deflated_slq, DeflateCount};
use hesscope::spectral::lanczos::BasisBudget;
use hesscope::spectral::{slq, DenseOperator, SymOperator};
use rayon::prelude::*;

/// Counts the products an operator computes.
struct Counting<'a> {
    inner: &'a mut dyn SymOperator,
    count: usize,
}

impl SymOperator for Counting<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
        self.count += 1;
        self.inner.apply(v, out)
    }
}

/// The default budget: Ghorbani et al.'s 90 steps × 10 runs.
const BUDGET: usize = slq::DEFAULT_STEPS * slq::DEFAULT_RUNS;
/// Seeds each estimate is averaged over (the L1 of one seed is a random
/// number with a spread of ~20% of its mean).
const SEEDS: u64 = 4;

/// Today's default (90 steps × 10 runs) and `--deflate auto` at the same
/// 900 products in all (eigs' products, residual checks included,
/// counted), each the mean L1 to the fixture's exact smoothed density
/// (its sigma and grid) over [`SEEDS`] seeds, on every dense fixture.
///
/// Measured (mean of 4 seeds; `auto` deflated its cap of 64 on every
/// fixture, eigs taking 212–252 of the 900 products, the bulk 21–22 runs
/// of 30 steps): cnn-smooth 0.0089 → 0.0063, cnn-tiny batch 0.0236 →
/// 0.0156, cnn-tiny running 0.0152 → 0.0089, cnn-tiny-nobn 0.0189 →
/// 0.0069, mlp-tiny 0.0256 → 0.0095. The target, L1 ≤ 0.01 on
/// every fixture where the default gives 0.015–0.028, is reached on three
/// of the four and not on cnn-tiny in batch mode: what is left there is
/// the sampling error of the bulk's weights (at 90 steps the plain
/// quadrature already equals an n-step one from the same starts to 4
/// digits in a numpy prototype, so the error is the starts', not
/// Lanczos'), and its wide bulk
/// (λ in [−4.6, 4.5] at σ 0.09) does not resolve with fewer steps per run
/// to buy more runs (a numpy prototype of the same method: 20-step bulk
/// runs double its L1). What the test holds: the budget, and
/// deflation at or below 0.7× the default's L1 on every fixture where the
/// default is above 0.012 (measured ratios 0.37–0.66; the seeds are fixed,
/// so this is deterministic), and never worse than the default + 0.002
/// elsewhere (cnn-smooth, 0.71×).
#[test]
fn deflation_within_the_default_budget_against_the_exact_densities() {
    let cases: Vec<_> = fixture_cases()
        .into_iter()
        .filter(|(m, bn)| ref_dir(m, *bn).join("eigenvalues.json").exists())
        .collect();
    assert!(!cases.is_empty(), "no dense fixture");
    let mut table = vec![];
    for (model, bn) in cases {
        let dir = ref_dir(&model, bn);
        let d = json(dir.join("density.json"));
        let grid = f64s(&d["grid"]);
        let want = f64s(&d["density"]);
        let sigma = d["sigma"].as_f64().unwrap();
        let cpu = CpuReference::new(problem(&model, bn));
        let h = dense_hessian(&cpu);
        let n = h.n;
        let results: Vec<(f64, f64, usize, usize, usize)> = (0..SEEDS)
            .into_par_iter()
            .map(|seed| {
                let mut h = DenseOperator { n, a: h.a.clone() };
                let plain = slq::slq(&mut h, slq::DEFAULT_STEPS, slq::DEFAULT_RUNS, seed).unwrap();
                let l1_plain =
                    slq::l1_distance(&grid, &slq::density_on(&plain, &grid, sigma), &want);
                let mut c = Counting {
                    inner: &mut h,
                    count: 0,
                };
                let r = deflated_slq(
                    &mut c,
                    DeflateCount::Auto,
                    BUDGET,
                    hesscope::spectral::deflate::DEFLATED_STEPS,
                    seed,
                    1,
                    BasisBudget::host_default(),
                )
                .unwrap();
                let l1 = slq::l1_distance(&grid, &slq::density_on(&r.runs, &grid, sigma), &want);
                (l1_plain, l1, c.count, r.outliers.values.len(), r.bulk_runs)
            })
            .collect();
        let k = SEEDS as f64;
        let before = results.iter().map(|r| r.0).sum::<f64>() / k;
        let after = results.iter().map(|r| r.1).sum::<f64>() / k;
        let worst = results.iter().map(|r| r.1).fold(0.0, f64::max);
        let hvps = results.iter().map(|r| r.2).max().unwrap();
        eprintln!(
            "{model} {bn:?} (n={n}): L1 default {before:.4} -> deflated {after:.4} (worst seed {worst:.4}); \
             K {:?}, bulk runs {:?} of {} steps, products ≤ {hvps}",
            results.iter().map(|r| r.3).collect::<Vec<_>>(),
            results.iter().map(|r| r.4).collect::<Vec<_>>(),
            hesscope::spectral::deflate::DEFLATED_STEPS
        );
        assert!(hvps <= BUDGET, "{model} {bn:?}: {hvps} products");
        if before > 0.012 {
            assert!(
                after <= 0.7 * before,
                "{model} {bn:?}: deflated L1 {after:.4} vs default {before:.4}"
            );
        } else {
            assert!(
                after <= before + 0.002,
                "{model} {bn:?}: deflated L1 {after:.4} vs default {before:.4}"
            );
        }
        table.push(format!("{model} {bn:?}: {before:.4} -> {after:.4}"));
    }
    eprintln!("{}", table.join("\n"));
}

fn sig3(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let d = 2 - x.abs().log10().floor() as i32;
    let f = 10f64.powi(d);
    (x * f).round() / f
}

/// A small deflated density on `engine`: the 2 eigenpairs of largest |λ|
/// deflated, 150 products in all, bulk runs of 20 steps, rounded to 3
/// significant digits as `spectral_fixtures`' summary (f32 kernels and the
/// float64 reference differ around 1e-7 relative); and the runs.
fn deflated_summary(engine: &mut dyn Curvature) -> (serde_json::Value, Vec<slq::SlqRun>) {
    let n = engine.n_params();
    let r = deflated_slq(
        &mut Hessian(engine),
        DeflateCount::Fixed(2),
        150,
        20,
        3,
        1,
        BasisBudget::host_default(),
    )
    .unwrap();
    let sm = slq::summarize(&r.runs, n);
    let grid = slq::linspace(-5.0, 5.0, 33);
    let fine = slq::linspace(-5.0, 5.0, 3201);
    let d = slq::density_on(&r.runs, &fine, 0.1);
    let bins: Vec<f64> = grid
        .windows(2)
        .map(|w| {
            let idx: Vec<usize> = (0..fine.len())
                .filter(|&i| fine[i] >= w[0] && fine[i] <= w[1])
                .collect();
            let g: Vec<f64> = idx.iter().map(|&i| fine[i]).collect();
            let v: Vec<f64> = idx.iter().map(|&i| d[i]).collect();
            sig3(slq::integrate(&g, &v))
        })
        .collect();
    let value = serde_json::json!({
        "deflated": r.outliers.values.iter().map(|x| sig3(*x)).collect::<Vec<_>>(),
        "bulk_runs": r.bulk_runs,
        "lambda_max": sig3(sm.lambda_max), "lambda_min": sig3(sm.lambda_min),
        "trace": sig3(sm.trace), "negative_mass": sig3(sm.negative_mass),
        "density_32_bins": bins,
    });
    (value, r.runs)
}

/// The deflated density's snapshot: the same seed gives the same runs bit
/// for bit twice on the float64 reference, and the same rounded summary
/// on the float64 reference, Vulkan and GL. Its correctness: the two
/// deflated eigenvalues are the fixture's two of largest |λ| to 1e-6
/// relative on every backend (f32 products: ~1e-7).
#[test]
fn the_deflated_density_is_the_same_on_every_backend() {
    let p = problem("cnn-tiny", BnMode::Batch);
    let evals =
        f64s(&json(ref_dir("cnn-tiny", BnMode::Batch).join("eigenvalues.json"))["eigenvalues"]);
    let mut by_mag = evals.clone();
    by_mag.sort_by(|a, b| b.abs().partial_cmp(&a.abs()).unwrap());
    let check = |v: &serde_json::Value, runs: &[slq::SlqRun], what: &str| {
        // The spikes lead every run: the deflated eigenvalues, unrounded.
        for (i, want) in by_mag.iter().take(2).enumerate() {
            let got = runs[0].nodes[i];
            assert!(
                ((got - want) / want).abs() <= 1e-6,
                "{what}: deflated λ {got} vs exact {want}"
            );
        }
        assert_eq!(v["deflated"].as_array().unwrap().len(), 2, "{what}");
    };
    let mut cpu = CpuReference::new(p.clone());
    let (reference, runs) = deflated_summary(&mut cpu);
    let (again, runs2) = deflated_summary(&mut cpu);
    assert_eq!(reference, again);
    for (a, b) in runs.iter().zip(&runs2) {
        assert_eq!(
            a.nodes.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.nodes.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            a.weights.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.weights.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    check(&reference, &runs, "float64 reference");
    insta::assert_json_snapshot!("cnn-tiny-batch-deflated", reference);
    for choice in GPU_BACKENDS {
        let Some(ctx) = gpu_context(choice) else {
            continue;
        };
        let mut gpu = hesscope::gpu::GpuEngine::new(ctx, &p).unwrap();
        let (got, runs) = deflated_summary(&mut gpu);
        check(&got, &runs, &format!("{choice:?}"));
        insta::assert_json_snapshot!("cnn-tiny-batch-deflated", got);
    }
}

/// `hesscope density --deflate 2 --json` on cnn-tiny: the band beside the
/// density (one standard error per grid point, finite, ≥ 0), the
/// deflation's report (K, eigenvalues with residuals within the bound,
/// the budget's split adding up), and the products within the budget;
/// `--deflate 0`, `--deflate many` refused naming the flag.
#[test]
fn density_deflate_reports_the_band_and_the_deflation() {
    let fx = fixtures_dir().join("cnn-tiny");
    let base: Vec<String> = [
        "density",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--batch",
        "32",
        "--weights",
        fx.join("weights.safetensors").to_str().unwrap(),
        "--data",
        fx.join("data.safetensors").to_str().unwrap(),
        "--grid",
        "400",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        hesscope(&a)
    };
    let (ok, stdout, stderr) = run(&["--deflate", "2", "--steps", "20", "--runs", "6", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let d = &v["deflation"];
    assert_eq!(d["k"], 2, "{d}");
    assert_eq!(d["budget"], 120);
    let (eh, br, bs) = (
        d["eigs_hvps"].as_u64().unwrap(),
        d["bulk_runs"].as_u64().unwrap(),
        d["bulk_steps"].as_u64().unwrap(),
    );
    assert_eq!(bs, 20);
    assert!(br >= 1 && eh + br * bs <= 120, "{d}");
    assert_eq!(v["hvps"].as_u64().unwrap(), eh + br * bs);
    assert_eq!(v["runs_count"].as_u64().unwrap(), br);
    let bound = d["residual_bound"].as_f64().unwrap();
    for r in d["residuals"].as_array().unwrap() {
        assert!(r.as_f64().unwrap() <= bound);
    }
    let dens = f64s(&v["density"]);
    let se = &v["density_stderr"];
    if br >= 2 {
        let se = f64s(se);
        assert_eq!(se.len(), dens.len());
        assert!(se.iter().all(|x| x.is_finite() && *x >= 0.0));
        assert!(se.iter().any(|x| *x > 0.0));
    } else {
        assert!(se.is_null());
    }
    assert!(v["band"].as_str().unwrap().contains("standard error"));
    assert!(v["negative_mass_stderr"].is_number() || br < 2);

    // The text output names the runs the band rests on.
    let (ok, stdout, stderr) = run(&["--deflate", "2", "--steps", "20", "--runs", "6"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("over the {br} runs")) && stdout.contains("deflated 2 of 2"),
        "{stdout}"
    );
    for bad in ["0", "many", "-1"] {
        let (ok, _, stderr) = run(&["--deflate", bad]);
        assert!(!ok && stderr.contains("--deflate"), "{bad}: {stderr}");
    }
}

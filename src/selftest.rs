//! The correctness step (`hesscope selftest`): the GPU engine on the
//! adapter at hand against the PyTorch fixtures' float64 references, so
//! that a new adapter (a user's GPU, the device machine's NVIDIA card) says
//! whether its numbers are right before anyone times it.
//!
//! Checks, each with its measured error and the tolerance it is held to:
//! - every fixture with a `ref-<bn>/reference.json`: the loss, gradient and
//!   Hv (one pass, then the cached HVP alone) of the default engine, and of
//!   an engine with the paths only a GPU picks by itself forced on (tiled
//!   conv kernels, per-channel reductions split in segments), against
//!   `grad.safetensors` / `hv.safetensors`;
//! - every fixture with a dense spectrum (`eigenvalues.json`): eigs' top 5;
//! - cnn-tiny in batch mode: an SLQ density (Ghorbani's defaults) against
//!   the exact smoothed one (`density.json`, L1); its negative mass beside
//!   the exact spectrum's, as a note (10 runs leave it ~0.02 off, and a
//!   scale error does not move it, so it makes no check).
//!
//! A check that cannot run (an engine the adapter refuses, a GPU fault) is
//! a failed check with the error, not an abort: the report lists them all.

use crate::data::Dataset;
use crate::engine::{BnMode, Curvature, Hessian, Problem};
use crate::error::{Error, Result};
use crate::gpu::executor::ConvPath;
use crate::gpu::{EngineOptions, GpuContext, GpuEngine, ReducePath};
use crate::model::{params, Model, Weights};
use crate::spectral::eigs::{eigs, EigsSettings, Which};
use crate::spectral::slq;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Loss, gradient and Hv relative to float64: PyTorch's own float32 lands
/// at ≤ 5e-7 on these fixtures (fixtures/README.md) and lavapipe and
/// llvmpipe at ≤ 3.4e-7 (tests/gpu.rs); a wrong term errs by ≥ 1e-3.
pub const GRAD_HV_TOL: f64 = 1e-5;

/// eigs' top 5, relative to the exact eigenvalues: measured ≤ 7.5e-8 on
/// lavapipe and llvmpipe; tests/spectral_fixtures.rs holds them to the
/// same bound (room for another summation order of the f32 products; a
/// sign or scale error in any kernel is ≥ 1e-2).
pub const EIGS_TOL: f64 = 5e-7;

/// L1 distance between the SLQ density (90 steps, 10 runs, seed 0) and the
/// exact smoothed one: measured 0.024 on lavapipe and llvmpipe (the same
/// as the float64 reference's: the runs agree to f32 rounding; its other
/// fixtures give 0.011 to 0.028, tests/spectral_fixtures.rs, held to the
/// same 0.05): the 10 random starts' sampling error. A wrong operator
/// moves mass by far more (eigenvalues off by 2×: L1 > 1).
pub const DENSITY_L1_TOL: f64 = 0.05;

/// Reductions split in segments of this many elements when forced on: at
/// the fixtures' small channels (64 to 2048 elements) the default GPU
/// span would leave them whole, so a span this small makes them split.
pub const FORCED_SPLIT: usize = 256;

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// `cnn-tiny batch`, or `-` for the adapter itself.
    pub fixture: String,
    /// `default`, or `tiled+split` for the forced GPU paths.
    pub engine: String,
    /// `loss`, `grad`, `hv`, `hv cached`, `eigs top-5`, `density L1`.
    pub quantity: String,
    /// The measured error (relative unless the quantity says otherwise);
    /// None where the check could not run.
    pub error: Option<f64>,
    pub tolerance: f64,
    pub passed: bool,
    /// Why it could not run, or what it ran (kernel paths).
    pub note: Option<String>,
}

/// A fixture case passed over, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub fixture: String,
    pub reason: String,
}

/// Everything `hesscope selftest` found.
#[derive(Clone, Debug, Serialize)]
pub struct SelftestReport {
    pub backend: String,
    pub adapter: String,
    pub device_type: String,
    pub fixtures: PathBuf,
    pub checks: Vec<Check>,
    pub skipped: Vec<Skipped>,
    pub failed: usize,
    pub passed: bool,
    pub seconds: f64,
}

/// One (model, bn mode) reference of the fixtures.
#[derive(Clone, Debug)]
pub struct FixtureCase {
    pub model: String,
    pub bn: BnMode,
    /// `<root>/<model>`.
    pub dir: PathBuf,
    /// `<root>/<model>/ref-<bn>`.
    pub reference: PathBuf,
}

impl FixtureCase {
    pub fn label(&self) -> String {
        format!(
            "{} {}",
            self.model,
            match self.bn {
                BnMode::Batch => "batch",
                BnMode::Running => "running",
            }
        )
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("not JSON: {e}"),
    })
}

fn field<'a>(j: &'a serde_json::Value, key: &str, path: &Path) -> Result<&'a serde_json::Value> {
    j.get(key).ok_or_else(|| Error::Format {
        path: path.to_path_buf(),
        msg: format!("no `{key}`"),
    })
}

fn number(j: &serde_json::Value, key: &str, path: &Path) -> Result<f64> {
    field(j, key, path)?.as_f64().ok_or_else(|| Error::Format {
        path: path.to_path_buf(),
        msg: format!("`{key}` is not a number"),
    })
}

fn numbers(j: &serde_json::Value, key: &str, path: &Path) -> Result<Vec<f64>> {
    let bad = || Error::Format {
        path: path.to_path_buf(),
        msg: format!("`{key}` is not an array of numbers"),
    };
    field(j, key, path)?
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|x| x.as_f64().ok_or_else(bad))
        .collect()
}

/// Every fixture case under `root` in the `ref-<bn>/reference.json` form
/// whose model hesscope knows by name; the others with the reason.
pub fn fixture_cases(root: &Path) -> Result<(Vec<FixtureCase>, Vec<Skipped>)> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("meta.json").is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let (mut cases, mut skipped) = (vec![], vec![]);
    for name in names {
        let dir = root.join(&name);
        let known = Model::load(&name).is_ok();
        let mut any = false;
        for (sub, bn) in [
            ("ref-batch", BnMode::Batch),
            ("ref-running", BnMode::Running),
        ] {
            let reference = dir.join(sub);
            if !reference.is_dir() {
                continue;
            }
            any = true;
            let case = FixtureCase {
                model: name.clone(),
                bn,
                dir: dir.clone(),
                reference,
            };
            let reason = if !known {
                Some("no built-in model of this name".to_string())
            } else if !case.reference.join("reference.json").is_file() {
                Some(format!("no {sub}/reference.json"))
            } else {
                None
            };
            match reason {
                Some(reason) => skipped.push(Skipped {
                    fixture: case.label(),
                    reason,
                }),
                None => cases.push(case),
            }
        }
        if !any {
            skipped.push(Skipped {
                fixture: name,
                reason: "no ref-batch or ref-running folder".into(),
            });
        }
    }
    Ok((cases, skipped))
}

/// The case's model, weights, data and batch as its `meta.json` states.
pub fn load_problem(case: &FixtureCase) -> Result<Problem> {
    let model = Model::load(&case.model)?;
    let weights = Weights::load(&model, &case.dir.join("weights.safetensors"))?;
    let data = Dataset::load(&case.dir.join("data.safetensors"))?;
    let meta_path = case.dir.join("meta.json");
    let batch = number(&read_json(&meta_path)?, "batch", &meta_path)?;
    if !(batch >= 1.0 && batch.fract() == 0.0) {
        return Err(Error::Format {
            path: meta_path,
            msg: format!("`batch` is {batch}, not a positive integer"),
        });
    }
    Problem::new(model, weights, data, batch as usize, case.bn)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Σ|λ| over λ < 0 divided by Σ|λ|.
pub fn negative_mass(values: &[f64]) -> f64 {
    let abs: f64 = values.iter().map(|x| x.abs()).sum();
    let neg: f64 = values.iter().filter(|x| **x < 0.0).map(|x| -x).sum();
    if abs > 0.0 {
        neg / abs
    } else {
        0.0
    }
}

struct Run<'a> {
    ctx: &'a GpuContext,
    checks: Vec<Check>,
}

impl Run<'_> {
    fn push(&mut self, fixture: &str, engine: &str, quantity: &str, error: f64, tol: f64) {
        self.checks.push(Check {
            fixture: fixture.into(),
            engine: engine.into(),
            quantity: quantity.into(),
            error: Some(error),
            tolerance: tol,
            // NaN fails.
            passed: error <= tol,
            note: None,
        });
    }

    fn note_last(&mut self, note: String) {
        if let Some(c) = self.checks.last_mut() {
            c.note = Some(note);
        }
    }

    fn failed_to_run(&mut self, fixture: &str, engine: &str, quantity: &str, tol: f64, e: Error) {
        self.checks.push(Check {
            fixture: fixture.into(),
            engine: engine.into(),
            quantity: quantity.into(),
            error: None,
            tolerance: tol,
            passed: false,
            note: Some(e.to_string()),
        });
    }

    /// Loss, gradient, Hv and the cached Hv of an engine with `options`.
    fn grad_hv(&mut self, case: &FixtureCase, p: &Problem, engine: &str, options: EngineOptions) {
        let label = case.label();
        let r = (|| -> Result<(String, [f64; 4])> {
            let reference_path = case.reference.join("reference.json");
            let loss_ref = number(&read_json(&reference_path)?, "loss", &reference_path)?;
            let grad_ref = params::load_vector(&p.model, &case.reference.join("grad.safetensors"))?;
            let hv_ref = params::load_vector(&p.model, &case.reference.join("hv.safetensors"))?;
            let v = params::load_vector(&p.model, &case.dir.join("v.safetensors"))?;
            let mut e = GpuEngine::with_options(self.ctx.share(), p, options)?;
            let (loss, grad, hv) = e.loss_grad_hvp(&v)?;
            let mut hv_cached = vec![0.0; v.len()];
            e.hvp(&v, &mut hv_cached)?;
            let errs = [
                (loss - loss_ref).abs() / loss_ref.abs(),
                rel_err(&grad, &grad_ref),
                rel_err(&hv, &hv_ref),
                rel_err(&hv_cached, &hv_ref),
            ];
            Ok((e.kernel_paths().unwrap_or_default(), errs))
        })();
        let quantities = ["loss", "grad", "hv", "hv cached"];
        match r {
            Ok((paths, errs)) => {
                for (q, e) in quantities.iter().zip(errs) {
                    self.push(&label, engine, q, e, GRAD_HV_TOL);
                }
                self.note_last(paths);
            }
            Err(e) => self.failed_to_run(&label, engine, "loss, grad, hv", GRAD_HV_TOL, e),
        }
    }

    /// eigs' top 5 (algebraic) against the dense spectrum.
    fn eigs_top5(&mut self, case: &FixtureCase, p: &Problem) {
        let label = case.label();
        let r = (|| -> Result<f64> {
            let path = case.reference.join("eigenvalues.json");
            let evals = numbers(&read_json(&path)?, "eigenvalues", &path)?;
            let mut e = GpuEngine::new(self.ctx.share(), p)?;
            let mut s = EigsSettings::new(10, Which::Largest);
            s.seed = 1;
            let r = eigs(&mut Hessian(&mut e), &s)?;
            let top: Vec<f64> = evals.iter().rev().take(5).copied().collect();
            Ok(top
                .iter()
                .zip(&r.values)
                .map(|(want, got)| (got - want).abs() / want.abs())
                .fold(0.0, f64::max))
        })();
        match r {
            Ok(err) => self.push(&label, "default", "eigs top-5", err, EIGS_TOL),
            Err(e) => self.failed_to_run(&label, "default", "eigs top-5", EIGS_TOL, e),
        }
    }

    /// SLQ (90 steps, 10 runs, seed 0) against the exact smoothed density;
    /// the negative masses as a note.
    fn density(&mut self, case: &FixtureCase, p: &Problem) {
        let label = case.label();
        let r = (|| -> Result<(f64, String)> {
            let path = case.reference.join("density.json");
            let d = read_json(&path)?;
            let (grid, want) = (numbers(&d, "grid", &path)?, numbers(&d, "density", &path)?);
            let sigma = number(&d, "sigma", &path)?;
            let epath = case.reference.join("eigenvalues.json");
            let exact = negative_mass(&numbers(&read_json(&epath)?, "eigenvalues", &epath)?);
            let mut e = GpuEngine::new(self.ctx.share(), p)?;
            let runs = slq::slq(
                &mut Hessian(&mut e),
                slq::DEFAULT_STEPS,
                slq::DEFAULT_RUNS,
                0,
            )?;
            let l1 = slq::l1_distance(&grid, &slq::density_on(&runs, &grid, sigma), &want);
            let got = slq::summarize(&runs, p.model.n_params).negative_mass;
            Ok((l1, format!("negative mass {got:.4}, exact {exact:.4}")))
        })();
        match r {
            Ok((l1, note)) => {
                self.push(&label, "default", "density L1", l1, DENSITY_L1_TOL);
                self.note_last(note);
            }
            Err(e) => self.failed_to_run(&label, "default", "density", DENSITY_L1_TOL, e),
        }
    }
}

/// Every check on the adapter of `ctx` with the fixtures under `root`.
/// Errors only where the fixtures cannot be listed at all; everything else
/// is a check that passed or failed.
pub fn run(ctx: &GpuContext, root: &Path) -> Result<SelftestReport> {
    let t0 = Instant::now();
    let (cases, mut skipped) = fixture_cases(root)?;
    if cases.is_empty() {
        return Err(Error::Invalid {
            what: "fixtures folder",
            msg: format!(
                "{} holds no fixture in the <model>/ref-<bn>/reference.json form \
                 (PyTorch's references, ../shared/fixtures)",
                root.display()
            ),
        });
    }
    let mut run = Run {
        ctx,
        checks: vec![],
    };
    let forced = EngineOptions {
        conv_path: ConvPath::Tiled,
        reduce_path: ReducePath::Split(FORCED_SPLIT),
        ..Default::default()
    };
    let mut density_done = false;
    for case in &cases {
        let p = match load_problem(case) {
            Ok(p) => p,
            Err(e) => {
                run.failed_to_run(&case.label(), "-", "fixture", 0.0, e);
                continue;
            }
        };
        run.grad_hv(case, &p, "default", EngineOptions::default());
        run.grad_hv(case, &p, "tiled+split", forced);
        if case.reference.join("eigenvalues.json").is_file() {
            run.eigs_top5(case, &p);
        }
        if case.model == "cnn-tiny" && case.bn == BnMode::Batch {
            run.density(case, &p);
            density_done = true;
        }
    }
    if !density_done {
        skipped.push(Skipped {
            fixture: "cnn-tiny batch".into(),
            reason: "not among the fixtures: no density check".into(),
        });
    }
    let failed = run.checks.iter().filter(|c| !c.passed).count();
    Ok(SelftestReport {
        backend: ctx.info.backend.clone(),
        adapter: ctx.info.name.clone(),
        device_type: ctx.info.device_type.clone(),
        fixtures: root.to_path_buf(),
        failed,
        passed: failed == 0,
        checks: run.checks,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

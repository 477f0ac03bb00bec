//! The Gauss–Newton and residual products (`hesscope::operator`): G·v =
//! Jᵀ H_L J v and E·v = H·v − G·v on every fixture of ../shared/fixtures
//! that has a model and weights (both batch-norm modes where it has batch
//! norm), against PyTorch float64 (`python/tests/ggn_reference.py`:
//! `torch.func.jvp`/`vjp` of the network's batched logits with the
//! cross-entropy's Hessian between them, and forward-over-reverse Hv) on
//! the float64 engine, and against the float64 engine on the GPU engine
//! (Vulkan and GL), single and block products; G's positive
//! semi-definiteness, its symmetry and H = G + E on the float64 engine.
//!
//! Tolerances. cpu ≤ 1e-10 relative (whole vector, 2-norm), as
//! tests/reference.rs: two float64 computations of the same sums in
//! another order differ by 1e-16–1e-13 on these networks. GPU ≤ 1e-5
//! relative for G·v, the fixtures' float32 bound for Hv (README of the
//! fixtures; PyTorch's own float32 lands within 1e-6). E = H − G is the
//! difference of two float32 products, so its float32 error is theirs,
//! ≤ 1e-5·(‖Hv‖ + ‖Gv‖), which relative to ‖Ev‖ is larger by
//! (‖Hv‖ + ‖Gv‖)/‖Ev‖ (1.1 to about 3 on these fixtures): that is E's
//! bound on the GPU, and the test prints the ratio.

mod common;
use common::python::python_with;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{BnMode, Curvature, Operator, Problem};
use hesscope::model::{params, Model, Weights};
use std::path::PathBuf;

const CPU_TOL: f64 = 1e-10;
const GPU_TOL: f64 = 1e-5;

struct Case {
    fixture: &'static str,
    bn: BnMode,
}

impl Case {
    fn label(&self) -> String {
        format!("{} {:?}", self.fixture, self.bn)
    }
    fn bn_word(&self) -> &'static str {
        match self.bn {
            BnMode::Batch => "batch",
            BnMode::Running => "running",
        }
    }
    /// The model: built in, the fixture's own `.arch`, or the hand-written
    /// transformer ones of tests/data.
    fn model(&self) -> Model {
        let dir = fixtures_dir().join(self.fixture);
        let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let path = match self.fixture {
            "tv-resnet18-trunc" => dir.join("tv-resnet18-trunc.arch"),
            "tv-vit-tiny" => data.join("vit-tiny.arch"),
            "hf-gpt2-tiny" => data.join("gpt2-tiny.arch"),
            name => return Model::load(name).unwrap(),
        };
        Model::load(path.to_str().unwrap()).unwrap()
    }
    fn batch(&self) -> usize {
        meta(self.fixture)["batch"].as_u64().unwrap() as usize
    }
    fn problem(&self) -> Problem {
        let dir = fixtures_dir().join(self.fixture);
        let model = self.model();
        let weights = Weights::load(&model, &dir.join("weights.safetensors")).unwrap();
        let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
        Problem::new(model, weights, data, self.batch(), self.bn).unwrap()
    }
    fn v(&self, p: &Problem) -> Vec<f64> {
        vector(p, fixtures_dir().join(self.fixture).join("v.safetensors"))
    }
}

/// Every fixture with a model and weights; batch norm in both modes where
/// the network has it (the mode is moot elsewhere).
fn cases() -> Vec<Case> {
    use BnMode::*;
    let all = [
        ("cnn-tiny", true),
        ("cnn-tiny-nobn", false),
        ("cnn-smooth", false),
        ("lenet5", false),
        ("mlp-tiny", false),
        ("tv-resnet18-trunc", true),
        ("tv-vit-tiny", false),
        ("hf-gpt2-tiny", false),
    ];
    let mut out = vec![];
    for (fixture, bn) in all {
        out.push(Case {
            fixture,
            bn: if bn { Batch } else { Running },
        });
        if bn {
            out.push(Case {
                fixture,
                bn: Running,
            });
        }
    }
    out
}

fn cpu_products(p: &Problem, vs: &[&[f64]], op: Operator) -> Vec<Vec<f64>> {
    let mut e = CpuReference::new(p.clone());
    let mut outs = vec![vec![0.0; p.model.n_params]; vs.len()];
    e.product_block(op, vs, &mut outs).unwrap();
    outs
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

#[test]
fn ggn_and_residual_match_pytorch_float64_on_cpu() {
    let Some(py) = python_with(&["torch", "torchvision", "transformers", "safetensors"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    let args: Vec<String> = [
        fixtures_dir().display().to_string(),
        tmp.path().display().to_string(),
    ]
    .into_iter()
    .chain(
        cases
            .iter()
            .map(|c| format!("{}:{}:{}", c.fixture, c.bn_word(), c.batch())),
    )
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    py.script("ggn_reference.py", &args, &root, &[]);
    for c in &cases {
        let p = c.problem();
        let v = c.v(&p);
        let out = tmp.path().join(format!("{}-{}", c.fixture, c.bn_word()));
        let gv_ref = vector(&p, out.join("gv.safetensors"));
        let hv_ref = vector(&p, out.join("hv.safetensors"));
        let ev_ref: Vec<f64> = hv_ref.iter().zip(&gv_ref).map(|(h, g)| h - g).collect();
        let got = cpu_products(&p, &[&v], Operator::Ggn).remove(0);
        let e_g = rel_err(&got, &gv_ref);
        let got_e = cpu_products(&p, &[&v], Operator::Residual).remove(0);
        let e_e = rel_err(&got_e, &ev_ref);
        let got_h = cpu_products(&p, &[&v], Operator::Hessian).remove(0);
        let e_h = rel_err(&got_h, &hv_ref);
        println!(
            "{}: cpu Gv {e_g:.2e}  Ev {e_e:.2e}  Hv {e_h:.2e}  (‖Gv‖ {:.3e}, ‖Ev‖ {:.3e})",
            c.label(),
            norm(&gv_ref),
            norm(&ev_ref)
        );
        assert!(e_g <= CPU_TOL, "{}: Gv {e_g:e}", c.label());
        assert!(e_e <= CPU_TOL, "{}: Ev {e_e:e}", c.label());
        assert!(e_h <= CPU_TOL, "{}: Hv {e_h:e}", c.label());
    }
}

/// G and E on the GPU (single products, then a block of three in one
/// sweep) against the float64 engine's.
#[test]
fn ggn_and_residual_on_the_gpu_match_float64() {
    for (name, ctx) in gpu_contexts() {
        drop(ctx);
        let choice = match name.as_str() {
            "Vulkan" => hesscope::gpu::BackendChoice::Vulkan,
            _ => hesscope::gpu::BackendChoice::Gl,
        };
        let mut checked = 0;
        for c in cases() {
            let p = c.problem();
            if let Err(e) = hesscope::layers::check_model(&p.model) {
                println!("{name} {}: outside the GPU kernels ({e})", c.label());
                continue;
            }
            let v = c.v(&p);
            let w = gpu::uniform_unit(&mut rand_rng(7), p.model.n_params);
            let u = gpu::uniform_unit(&mut rand_rng(8), p.model.n_params);
            let vs: [&[f64]; 3] = [&v, &w, &u];
            let want_g = cpu_products(&p, &vs, Operator::Ggn);
            let want_h = cpu_products(&p, &vs, Operator::Hessian);
            let mut eng = hesscope::gpu::open(&p, choice, 0).unwrap();
            let np = p.model.n_params;
            // Single products, G after H and H after G (the workspaces
            // switch between the two kinds of adjoints).
            let mut g1 = vec![0.0; np];
            let mut h1 = vec![0.0; np];
            eng.product(Operator::Hessian, &v, &mut h1).unwrap();
            eng.product(Operator::Ggn, &v, &mut g1).unwrap();
            let mut h2 = vec![0.0; np];
            eng.product(Operator::Hessian, &v, &mut h2).unwrap();
            let mut e1 = vec![0.0; np];
            eng.product(Operator::Residual, &v, &mut e1).unwrap();
            // A block of three tangents per dispatch (software adapters
            // prefer single products): the block R-pass on zero adjoints.
            drop(eng);
            let opts = hesscope::gpu::EngineOptions {
                block: Some(3),
                ..Default::default()
            };
            let mut eng = hesscope::gpu::open_with(&p, choice, 0, opts).unwrap();
            let mut gb = vec![vec![0.0; np]; 3];
            eng.product_block(Operator::Ggn, &vs, &mut gb).unwrap();
            let mut eb = vec![vec![0.0; np]; 3];
            eng.product_block(Operator::Residual, &vs, &mut eb).unwrap();
            let e_g1 = rel_err(&g1, &want_g[0]);
            let e_h = rel_err(&h1, &want_h[0]).max(rel_err(&h2, &want_h[0]));
            assert!(e_h <= GPU_TOL, "{name} {}: Hv {e_h:e}", c.label());
            assert!(e_g1 <= GPU_TOL, "{name} {}: Gv {e_g1:e}", c.label());
            let mut worst_gb: f64 = 0.0;
            let mut worst_e: f64 = 0.0;
            let mut worst_ratio: f64 = 0.0;
            for j in 0..3 {
                let eg = rel_err(&gb[j], &want_g[j]);
                worst_gb = worst_gb.max(eg);
                assert!(eg <= GPU_TOL, "{name} {}: block Gv[{j}] {eg:e}", c.label());
                let want_e: Vec<f64> = want_h[j]
                    .iter()
                    .zip(&want_g[j])
                    .map(|(h, g)| h - g)
                    .collect();
                let ratio = (norm(&want_h[j]) + norm(&want_g[j])) / norm(&want_e);
                for (k, got) in [(0, &eb[j]), (1, &e1)] {
                    if k == 1 && j > 0 {
                        continue;
                    }
                    let ee = rel_err(got, &want_e);
                    worst_e = worst_e.max(ee);
                    assert!(
                        ee <= GPU_TOL * ratio,
                        "{name} {}: Ev[{j}] {ee:e} (bound {:e})",
                        c.label(),
                        GPU_TOL * ratio
                    );
                }
                worst_ratio = worst_ratio.max(ratio);
            }
            println!(
                "{name} {}: Gv {e_g1:.2e}  block Gv {worst_gb:.2e}  Ev {worst_e:.2e} \
                 ((‖Hv‖+‖Gv‖)/‖Ev‖ ≤ {worst_ratio:.2})  Hv {e_h:.2e}  block {}",
                c.label(),
                eng.preferred_block()
            );
            checked += 1;
        }
        // Every case: the transformers' attention and patch conv have GPU
        // kernels now, so nothing is outside them.
        assert!(
            checked >= cases().len(),
            "{name}: only {checked} of {} fixture cases ran on the GPU",
            cases().len()
        );
    }
}

fn rand_rng(seed: u64) -> rand::rngs::StdRng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// On the float64 engine, for the dense-size fixtures: G built column by
/// column is positive semi-definite (smallest eigenvalue ≥ −1e-8·λmax:
/// rounding of eigenvalues that are exactly zero, G having rank at most
/// N·(K−1)), symmetric (vᵀGw = wᵀGv), and G + E = H (to rounding).
#[test]
fn ggn_is_psd_symmetric_and_g_plus_e_is_h() {
    use hesscope::engine::CurvatureOperator;
    use hesscope::spectral::exact::exact_spectrum;
    for c in cases() {
        let p = c.problem();
        let n = p.model.n_params;
        let v = c.v(&p);
        let w = gpu::uniform_unit(&mut rand_rng(3), n);
        let [gv, gw] =
            <[Vec<f64>; 2]>::try_from(cpu_products(&p, &[&v, &w], Operator::Ggn)).unwrap();
        let ev = cpu_products(&p, &[&v], Operator::Residual).remove(0);
        let hv = cpu_products(&p, &[&v], Operator::Hessian).remove(0);
        // Symmetry: both sides are float64 sums of 1e2–1e5 terms.
        let asym = (dot(&w, &gv) - dot(&v, &gw)).abs() / (norm(&gv) * norm(&w));
        let sum: Vec<f64> = gv.iter().zip(&ev).map(|(g, e)| g + e).collect();
        let split = rel_err(&sum, &hv);
        println!(
            "{}: vᵀGw − wᵀGv {asym:.2e}, ‖G v + E v − H v‖/‖Hv‖ {split:.2e}",
            c.label()
        );
        assert!(asym <= 1e-12, "{}: asymmetry {asym:e}", c.label());
        assert!(split <= 1e-12, "{}: G + E vs H {split:e}", c.label());
        if n > 2500 {
            continue;
        }
        let mut e = CpuReference::new(p);
        let mut op = CurvatureOperator::new(&mut e, Operator::Ggn);
        let ex = exact_spectrum(&mut op, 2500).unwrap();
        let (lmin, lmax) = (ex.values[0], ex.values[n - 1]);
        println!(
            "{}: dense G λmin {lmin:.3e} λmax {lmax:.3e} (ratio {:.1e}), asymmetry {:.1e}",
            c.label(),
            lmin / lmax,
            ex.asymmetry
        );
        assert!(lmax > 0.0, "{}", c.label());
        assert!(
            lmin >= -1e-8 * lmax,
            "{}: λmin {lmin:e}, λmax {lmax:e}",
            c.label()
        );
    }
}

/// An executor without Gauss–Newton products refuses them naming the
/// operator (the trait's default).
#[test]
fn an_engine_without_ggn_refuses_naming_it() {
    struct OnlyH(CpuReference);
    impl Curvature for OnlyH {
        fn n_params(&self) -> usize {
            self.0.n_params()
        }
        fn loss_grad(&mut self) -> hesscope::Result<(f64, Vec<f64>)> {
            self.0.loss_grad()
        }
        fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> hesscope::Result<()> {
            self.0.hvp(v, out)
        }
        fn backend(&self) -> String {
            "test".into()
        }
        fn adapter(&self) -> String {
            "Hessian only".into()
        }
    }
    let c = Case {
        fixture: "mlp-tiny",
        bn: BnMode::Running,
    };
    let p = c.problem();
    let v = c.v(&p);
    let mut e = OnlyH(CpuReference::new(p));
    let mut out = vec![0.0; v.len()];
    let err = e
        .product(Operator::Ggn, &v, &mut out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--operator ggn") && err.contains("Gauss"),
        "{err}"
    );
    e.product(Operator::Hessian, &v, &mut out).unwrap();
    assert!(norm(&out) > 0.0);
}

/// The CLI: `hvp --operator ggn` writes G·v (the library's) and says so in
/// its JSON; `trace --operator residual` reports its operator.
#[test]
fn cli_takes_the_operator() {
    let dir = fixtures_dir().join("cnn-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gv.safetensors");
    let p = |f: &str| dir.join(f).display().to_string();
    let (ok, stdout, stderr) = hesscope(&[
        "hvp",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--weights",
        &p("weights.safetensors"),
        "--data",
        &p("data.safetensors"),
        "--batch",
        "32",
        "--vector",
        &p("v.safetensors"),
        "--operator",
        "ggn",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(j["operator"], "ggn", "{j}");
    let c = Case {
        fixture: "cnn-tiny",
        bn: BnMode::Batch,
    };
    let pr = c.problem();
    let v = c.v(&pr);
    let want = cpu_products(&pr, &[&v], Operator::Ggn).remove(0);
    let got = params::load_vector(&pr.model, &out).unwrap();
    let e = rel_err(&got, &want);
    assert!(e < 1e-14, "CLI Gv against the library's: {e:e}");
    let (ok, stdout, stderr) = hesscope(&[
        "trace",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--weights",
        &p("weights.safetensors"),
        "--data",
        &p("data.safetensors"),
        "--probes",
        "4",
        "--operator",
        "residual",
        "--json",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(j["settings"]["operator"], "residual", "{j}");
    let (ok, _, stderr) = hesscope(&["hvp", "--model", "cnn-tiny", "--operator", "gauss"]);
    assert!(!ok && stderr.contains("--operator"), "{stderr}");
}

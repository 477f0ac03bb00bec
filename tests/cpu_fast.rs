//! The fast float64 engine (issue 24): its results do not depend on the
//! thread count, and the products' cache of forward states (src/cpu/
//! sweep.rs) neither changes a product nor outlives the θ, data or
//! decisions it was taken at. Every comparison here is exact (tolerance
//! 0): the engine promises the same sums in the same order, so any
//! difference at all is a bug, not rounding.

mod common;
use common::*;
use hesscope::cpu::CpuReference;
use hesscope::engine::{BnMode, Curvature, Problem};

/// Loss, gradient and Hv bits of one uncached pass, and Hv of a cached
/// product, on a pool of `threads` threads.
fn run_on(threads: usize, p: &Problem, v: &[f64]) -> (u64, Vec<u64>, Vec<u64>, Vec<u64>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut e = CpuReference::new(p.clone());
        let (l, g, hv) = e.loss_grad_hvp(v).unwrap();
        let mut cached = vec![0.0; v.len()];
        e.hvp(v, &mut cached).unwrap();
        let bits = |x: &[f64]| x.iter().map(|f| f.to_bits()).collect::<Vec<u64>>();
        (l.to_bits(), bits(&g), bits(&hv), bits(&cached))
    })
}

/// resnet20 (convolutions with every GEMM path: 3×3 with padding, 1×1
/// stride-2 shortcuts, the linear head; batch norm in both modes) at a
/// batch of 6 and the fixtures' models: loss, gradient and Hv are the same
/// bits on 1, 2 and 3 threads, and the cached product equals the pass.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut cases: Vec<(Problem, Vec<f64>)> = vec![];
    for bn in [BnMode::Batch, BnMode::Running] {
        let model = hesscope::model::Model::load("resnet20").unwrap();
        let w = hesscope::model::Weights::init(&model, 3);
        let data = hesscope::data::synthetic(model.input, model.classes, 6, 5);
        let p = Problem::new(model, w, data, 4, bn).unwrap();
        let v: Vec<f64> = (0..p.model.n_params)
            .map(|i| ((i * 7919 % 1000) as f64 / 1000.0) - 0.5)
            .collect();
        cases.push((p, v));
    }
    for (name, bn) in fixture_cases() {
        let p = problem(&name, bn);
        let v = vector(&p, fixtures_dir().join(&name).join("v.safetensors"));
        cases.push((p, v));
    }
    for (p, v) in &cases {
        let one = run_on(1, p, v);
        assert_eq!(
            one.2, one.3,
            "{}: the cached product differs from the pass",
            p.model.name
        );
        for threads in [2, 3] {
            let many = run_on(threads, p, v);
            let what = format!("{} {:?} on {threads} threads vs 1", p.model.name, p.bn);
            assert_eq!(one.0, many.0, "{what}: loss");
            assert!(one.1 == many.1, "{what}: gradient");
            assert!(one.2 == many.2, "{what}: Hv");
            assert!(one.3 == many.3, "{what}: cached Hv");
        }
    }
}

/// The transformers' float64 passes (attention's products are faer GEMMs
/// per (sample, head), the sequence linears, LayerNorm, embeddings): the
/// ViT and GPT-2 test architectures at a batch of 5 with synthetic data
/// give the same bits on 1, 2 and 3 threads, cached or not.
#[test]
fn transformer_results_do_not_depend_on_the_thread_count() {
    for file in ["vit-tiny.arch", "gpt2-tiny.arch"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(file);
        let model = hesscope::model::Model::load(path.to_str().unwrap()).unwrap();
        let w = hesscope::model::Weights::init(&model, 3);
        let data = if model.input.kind == hesscope::model::Kind::Ids {
            hesscope::data::synthetic_tokens(model.input.tokens(), model.vocab().unwrap(), 5, 5)
                .unwrap()
        } else {
            hesscope::data::synthetic(model.input, model.classes, 5, 5)
        };
        let p = Problem::new(model, w, data, 3, BnMode::Batch).unwrap();
        let v: Vec<f64> = (0..p.model.n_params)
            .map(|i| ((i * 7919 % 1000) as f64 / 1000.0) - 0.5)
            .collect();
        let one = run_on(1, &p, &v);
        assert_eq!(
            one.2, one.3,
            "{file}: the cached product differs from the pass"
        );
        for threads in [2, 3] {
            let many = run_on(threads, &p, &v);
            let what = format!("{file} on {threads} threads vs 1");
            assert_eq!(one.0, many.0, "{what}: loss");
            assert!(one.1 == many.1, "{what}: gradient");
            assert!(one.2 == many.2, "{what}: Hv");
            assert!(one.3 == many.3, "{what}: cached Hv");
        }
    }
}

/// A cached engine whose θ, data, batch size or frozen decisions change
/// gives what a fresh engine gives at the new state (the cache is retaken),
/// and repeated products at one state give the same bits.
#[test]
fn the_cache_follows_theta_data_and_decisions() {
    let p = problem("cnn-tiny", BnMode::Batch);
    let v = vector(&p, fixtures_dir().join("cnn-tiny").join("v.safetensors"));
    let n = v.len();
    let fresh = |p: &Problem, frozen: Option<Vec<Vec<hesscope::layers::Decision>>>| {
        let mut e = CpuReference::new(p.clone());
        e.frozen = frozen;
        e.loss_grad_hvp(&v).unwrap().2
    };
    let mut e = CpuReference::new(p.clone());
    let mut hv = vec![0.0; n];
    let mut again = vec![0.0; n];
    e.hvp(&v, &mut hv).unwrap();
    e.hvp(&v, &mut again).unwrap();
    assert_eq!(hv, again, "two products at one θ");
    assert_eq!(hv, fresh(&p, None));

    // θ moves (as the trainer and trace-grad's differences move it).
    let theta0 = e.problem.weights.theta.clone();
    for (t, d) in e.problem.weights.theta.iter_mut().zip(&v) {
        *t += 1e-3 * d;
    }
    let moved = e.problem.clone();
    e.hvp(&v, &mut hv).unwrap();
    let want = fresh(&moved, None);
    assert_ne!(want, again, "the move changes Hv");
    assert_eq!(hv, want, "after θ moved");

    // Decisions frozen at θ0 replayed at the moved θ.
    let mut at0 = CpuReference::new(p.clone());
    at0.problem.weights.theta = theta0;
    let frozen = at0.decisions();
    e.frozen = Some(frozen.clone());
    e.hvp(&v, &mut hv).unwrap();
    assert_eq!(hv, fresh(&moved, Some(frozen)), "with frozen decisions");
    e.frozen = None;

    // Other data of the same size, then another batch size.
    let mut swapped = moved.clone();
    swapped.data.x.reverse();
    e.problem.data.x.reverse();
    e.hvp(&v, &mut hv).unwrap();
    assert_eq!(hv, fresh(&swapped, None), "after the data changed");
    swapped.batch = 3;
    e.problem.batch = 3;
    e.hvp(&v, &mut hv).unwrap();
    assert_eq!(hv, fresh(&swapped, None), "after the batch size changed");

    // The block entry point reads the same cache.
    let refs = [v.as_slice(), v.as_slice()];
    let mut outs = vec![vec![0.0; n]; 2];
    e.hvp_block(&refs, &mut outs).unwrap();
    assert_eq!(outs[0], hv);
    assert_eq!(outs[1], hv);
}

//! Language models whose token embedding exceeds the device's storage
//! binding limit (GPT-2 small's `transformer.wte.weight`, 50257 × 768
//! floats = 154 MB, against lavapipe's 128 MiB; issue 25): the weight is
//! split by rows between the parameter chunks (`gpu::executor::param_bufs`)
//! and the embedding gathers and scatter-adds one row block at a time
//! (`layers::embedding`), the lm_head (tied to it or not, on a sequence)
//! runs by blocks of output rows (`layers::linear_rows`). Tested by
//! capping the binding limit of a Vulkan (lavapipe) and a GL (llvmpipe)
//! context at 128 KiB (chunks of at most 16 Ki floats, as
//! tests/gpu_windows.rs): loss, gradient, Hv, a single product and a block
//! product against the float64 reference and against the same engine on
//! the uncapped context, host outputs poisoned with NaN.

mod common;

use common::gpu::{problem_of, products, tangents, uniform_unit};
use common::{gpu_context, rel_err, GPU_BACKENDS};
use hesscope::cpu::CpuReference;
use hesscope::data::Dataset;
use hesscope::engine::{Curvature, Problem};
use hesscope::gpu::executor::EngineOptions;
use hesscope::gpu::{GpuContext, GpuEngine};
use hesscope::model::{arch, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// As tests/gpu_windows.rs for whole models: float32 kernels against
/// float64 within 1e-5 relative; a row block read from the wrong rows,
/// chunk or window errs by O(1).
const TOL: f64 = 1e-5;

/// Against the uncapped engine: the embedding's gather and scatter-add are
/// the same float32 operations on the same values (each row's sum over the
/// tokens in the same order); the lm_head's outputs and weight gradient
/// too, but its backward data adds the row blocks one after the other, so
/// the two agree to float32 rounding, not bit for bit: 1e-6 relative (as
/// tests/gpu_windows.rs' rows test: sums of ≤ 1100 terms regrouped, a few
/// u·√L ≈ 1e-7, carried through the layers below).
const SPLIT_TOL: f64 = 1e-6;

/// The capped binding limit (tests/gpu_windows.rs): 32 Ki floats.
const CAP: u64 = 128 << 10;

/// Vocabulary and width: the embedding holds 1100 × 24 = 26 400 floats,
/// more than a 16 Ki-float chunk.
const V: usize = 1100;
const D: usize = 24;
const T: usize = 8;
const N: usize = 2;

/// A GPT-2-shaped model without attention, its lm_head tied to the token
/// embedding (`tied`), or a head of its own with a bias.
fn model(tied: bool) -> Model {
    let head = if tied {
        format!("linear lm_head {V} bias=false tie=transformer.wte.weight")
    } else {
        format!("linear lm_head {V}")
    };
    let f = 2 * D;
    let text = format!(
        "model emb_rows\ninput tokens {T}\nclasses {V}\nembedding transformer.wte {V} {D}\n\
         pos_embedding transformer.wpe {T}\nresidual transformer.h.0\n  layernorm ln_2 eps=1e-5\n  \
         conv1d mlp.c_fc {f}\n  gelu_tanh\n  conv1d mlp.c_proj {D}\nend\n\
         layernorm transformer.ln_f eps=1e-5\n{head}\n"
    );
    arch::parse("emb_rows.arch", &text).unwrap()
}

/// Parameters uniform in [−1, 1), token ids uniform with the first and
/// the last row of the vocabulary present (both ends of the row blocks).
fn problem(m: &Model, r: &mut StdRng) -> Problem {
    let theta = uniform_unit(r, m.n_params);
    let mut x: Vec<f32> = (0..N * T).map(|_| r.random_range(0..V) as f32).collect();
    x[1] = 0.0;
    x[T + 2] = (V - 1) as f32;
    let data = Dataset {
        x,
        y: vec![0; N],
        shape: m.input,
        source: "uniform ids".into(),
    };
    problem_of(m, theta, data, N)
}

fn capped(ctx: &GpuContext) -> GpuContext {
    let mut c = ctx.share();
    c.limits.max_storage_buffer_binding_size = CAP;
    c
}

fn worst(x: &[Vec<f64>], y: &[Vec<f64>]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(x, y)| rel_err(x, y))
        .fold(0.0, f64::max)
}

#[test]
fn an_embedding_larger_than_a_binding_runs_by_row_blocks_tied_or_not() {
    for tied in [true, false] {
        let m = model(tied);
        let mut r = StdRng::seed_from_u64(2550 + tied as u64);
        let p = problem(&m, &mut r);
        let np = m.n_params;
        let vs = tangents(&mut r, 3, np);
        let mut cpu = CpuReference::new(p.clone());
        let (l, g, hv) = cpu.loss_grad_hvp(&vs[0]).unwrap();
        let hvs: Vec<Vec<f64>> = vs
            .iter()
            .map(|v| {
                let mut o = vec![0.0; np];
                cpu.hvp(v, &mut o).unwrap();
                o
            })
            .collect();
        for choice in GPU_BACKENDS {
            let Some(ctx) = gpu_context(choice) else {
                continue;
            };
            let options = EngineOptions {
                block: Some(1),
                ..Default::default()
            };
            let mut whole = GpuEngine::with_options(ctx.share(), &p, options).unwrap();
            assert_eq!(whole.param_chunks(), 1);
            let mut split =
                GpuEngine::with_options(capped(&ctx), &p, EngineOptions::default()).unwrap();
            // Split by rows (one tangent per sweep): the embedding's 26 400
            // floats span two 16 Ki-float chunks.
            assert_eq!(split.block(), 1);
            assert!(split.param_chunks() >= 2, "{}", split.param_chunks());
            let a = products(&mut whole, &vs);
            let b = products(&mut split, &vs);
            let what = format!("{choice:?} tied={tied}");
            let d = [
                (a.loss - b.loss).abs() / a.loss.abs(),
                rel_err(&b.grad, &a.grad),
                rel_err(&b.hv, &a.hv),
                worst(&b.block, &a.block),
            ];
            let e = [
                (b.loss - l).abs() / l.abs(),
                rel_err(&b.grad, &g),
                rel_err(&b.hv, &hv),
                worst(&b.block, &hvs),
            ];
            eprintln!(
                "{what}: {} chunks; vs float64: loss {:.1e} grad {:.1e} Hv {:.1e} block Hv \
                 {:.1e}; vs uncapped: {:.1e} {:.1e} {:.1e} {:.1e}",
                split.param_chunks(),
                e[0],
                e[1],
                e[2],
                e[3],
                d[0],
                d[1],
                d[2],
                d[3]
            );
            assert!(e.iter().all(|&x| x <= TOL), "{what}: vs float64 {e:?}");
            assert!(
                d.iter().all(|&x| x <= SPLIT_TOL),
                "{what}: vs uncapped {d:?}"
            );
        }
    }
}

/// The uncapped engine on the same model is the unsplit one: one chunk,
/// and the block size asked for (no row blocks).
#[test]
fn where_the_embedding_fits_nothing_is_split() {
    let m = model(true);
    let mut r = StdRng::seed_from_u64(2552);
    let p = problem(&m, &mut r);
    for choice in GPU_BACKENDS {
        let Some(ctx) = gpu_context(choice) else {
            continue;
        };
        let options = EngineOptions {
            block: Some(3),
            ..Default::default()
        };
        let e = GpuEngine::with_options(ctx, &p, options).unwrap();
        assert_eq!((e.param_chunks(), e.block()), (1, 3), "{choice:?}");
    }
}

/// The kernels on one row window (shaders/embedding.wgsl with `r0`,
/// `rows`), on random shapes (vocabulary 2..80, width 1..200, 1..3
/// samples of 1..20 tokens, a random window r0..r0 + rows of the
/// vocabulary, held alone at a random offset of its buffer): the gather
/// writes exactly the window's rows for the tokens whose id lies in it and
/// leaves the others' outputs (poisoned) untouched; the scatter-add adds
/// each window row's sum over its tokens (float64 sums, ≤ 60 terms added
/// serially in float32: ≈ u·√61 relative, within 1e-5 as
/// tests/gpu_embedding.rs) and touches nothing outside the window.
#[test]
fn the_window_kernels_gather_and_scatter_only_their_rows() {
    use common::gpu::{poisoned, read_raw, upload};
    use common::gpu_contexts;
    use hesscope::gpu::kernels::{Consts, EmbParams, Kernel};
    use hesscope::gpu::program::{dispatch_once, Grid};
    const TOL_SUM: f64 = 1e-5;
    for (backend, ctx) in gpu_contexts() {
        let mut r = StdRng::seed_from_u64(2553);
        for case in 0..8 {
            let (vocab, d): (usize, usize) = (r.random_range(2..=80), r.random_range(1..=200));
            let (n, t) = (r.random_range(1..=3), r.random_range(1..=20));
            let r0 = r.random_range(0..vocab);
            let rows = r.random_range(1..=vocab - r0);
            let off = r.random_range(0..50);
            let tokens = n * t;
            let ids: Vec<f64> = (0..tokens)
                .map(|_| r.random_range(0..vocab) as f64)
                .collect();
            let inside = |id: f64| (r0..r0 + rows).contains(&(id as usize));
            let blen = off + rows * d + 7;
            let table = uniform_unit(&mut r, blen);
            let gy = uniform_unit(&mut r, tokens * d);
            let ep = EmbParams {
                tokens: tokens as u32,
                d: d as u32,
                vocab: vocab as u32,
                w_off: off as u32,
                r0: r0 as u32,
                rows: rows as u32,
                ..Default::default()
            };
            let tag = format!(
                "{backend} case {case}: vocab {vocab} d {d}, rows {r0}..{}",
                r0 + rows
            );
            let (idb, tb, gyb) = (
                upload(&ctx, "ids", &ids),
                upload(&ctx, "table", &table),
                upload(&ctx, "gy", &gy),
            );
            let out = poisoned(&ctx, "y", tokens * d);
            let before = read_raw(&ctx, &out);
            let grid = Grid::Threads(tokens * d);
            dispatch_once(
                &ctx,
                Kernel::EmbGather,
                Consts::default(),
                &ep,
                &[&idb, &tb, &out],
                grid,
            )
            .unwrap();
            let got = read_raw(&ctx, &out);
            for (k, &id) in ids.iter().enumerate() {
                for j in 0..d {
                    let i = k * d + j;
                    if inside(id) {
                        let want = table[off + (id as usize - r0) * d + j] as f32;
                        assert_eq!(got[i], want, "{tag}: token {k} feature {j}");
                    } else {
                        assert_eq!(got[i].to_bits(), before[i].to_bits(), "{tag}: token {k}");
                    }
                }
            }
            let t0 = uniform_unit(&mut r, blen);
            let target = upload(&ctx, "target", &t0);
            let start = read_raw(&ctx, &target);
            let grid = Grid::Threads(rows * d);
            let bufs = [&idb, &gyb, &target];
            dispatch_once(
                &ctx,
                Kernel::EmbScatter,
                Consts::default(),
                &ep,
                &bufs,
                grid,
            )
            .unwrap();
            let got = read_raw(&ctx, &target);
            let mut want: Vec<f64> = start.iter().map(|&x| x as f64).collect();
            for (k, &id) in ids.iter().enumerate().filter(|(_, &id)| inside(id)) {
                for j in 0..d {
                    want[off + (id as usize - r0) * d + j] += gy[k * d + j];
                }
            }
            let win = off..off + rows * d;
            let g: Vec<f64> = got[win.clone()].iter().map(|&x| x as f64).collect();
            let e = rel_err(&g, &want[win.clone()]);
            assert!(e <= TOL_SUM, "{tag}: scatter relative error {e:.2e}");
            for i in (0..blen).filter(|i| !win.contains(i)) {
                assert_eq!(
                    got[i].to_bits(),
                    start[i].to_bits(),
                    "{tag}: float {i} touched"
                );
            }
        }
    }
}

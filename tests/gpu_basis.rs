//! The device-resident Lanczos basis (src/gpu/basis.rs, shaders/basis.wgsl)
//! on every GPU backend CI has (lavapipe, llvmpipe): its kernels against
//! float64 sums, the store against the host's, and Lanczos, SLQ and eigs
//! keeping their vectors there against the same solvers on the host.

mod common;

use common::{gpu_contexts, problem};
use hesscope::engine::{BnMode, Curvature, Hessian};
use hesscope::gpu::basis::{GpuBasis, GpuBasisDevice, SEGMENT_ROWS};
use hesscope::gpu::kernels::{BasisParams, Consts, Kernel};
use hesscope::gpu::program::{dispatch_once, Grid};
use hesscope::gpu::{BasisPlace, EngineOptions, GpuBuffer, GpuContext, GpuEngine};
use hesscope::spectral::eigs::{eigs, EigsSettings, Which};
use hesscope::spectral::lanczos::{
    Basis, BasisBudget, BasisDevice, BasisPrecision, DeviceBasis, Lanczos,
};
use hesscope::spectral::operator::DiagonalOperator;
use hesscope::spectral::slq::slq_block;
use rand::{Rng, SeedableRng};
use std::rc::Rc;

const EPS32: f64 = 1.0 / (1u64 << 24) as f64;

fn upload(ctx: &GpuContext, name: &str, xs: &[f32]) -> GpuBuffer {
    let b = ctx.storage(name, xs.len()).unwrap();
    ctx.write_f32(&b, 0, xs).unwrap();
    b
}

fn read(ctx: &GpuContext, b: &GpuBuffer) -> Vec<f32> {
    ctx.read_f32(&[(b, 0, b.len)]).unwrap().remove(0)
}

fn random(r: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
}

/// `kernel` on (basis, input) over `rows` rows of `vectors` vectors
/// `stride` apart, into an output of `out_len` values poisoned with NaN
/// (so unwritten ones show) plus two guards past the end.
#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &GpuContext,
    kernel: Kernel,
    basis: &[f32],
    input: &[f32],
    rows: usize,
    stride: usize,
    vectors: usize,
    out_len: usize,
    grid: Grid,
) -> Vec<f32> {
    let b = upload(ctx, "basis", basis);
    let ib = upload(ctx, "input", input);
    let out = upload(ctx, "output", &vec![f32::NAN; out_len + 2]);
    let p = BasisParams {
        rows: rows as u32,
        stride: stride as u32,
        vectors: vectors as u32,
        segments: rows.div_ceil(SEGMENT_ROWS) as u32,
        seg_rows: SEGMENT_ROWS as u32,
        ..Default::default()
    };
    dispatch_once(ctx, kernel, Consts::default(), &p, &[&b, &ib, &out], grid).unwrap();
    read(ctx, &out)
}

/// basis_dots: (sum, error) pairs per (vector, segment), two guards after.
fn run_dots(
    ctx: &GpuContext,
    basis: &[f32],
    w: &[f32],
    rows: usize,
    stride: usize,
    vectors: usize,
) -> Vec<f32> {
    let pairs = vectors * rows.div_ceil(SEGMENT_ROWS);
    let grid = Grid::Groups(pairs);
    run(
        ctx,
        Kernel::BasisDots,
        basis,
        w,
        rows,
        stride,
        vectors,
        2 * pairs,
        grid,
    )
}

#[test]
fn basis_kernels_match_float64_sums_on_random_shapes() {
    for (name, ctx) in gpu_contexts() {
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let mut worst_dot: f64 = 0.0;
        let mut worst_comb: f64 = 0.0;
        for &(rows, pad, vectors) in &[
            (1usize, 0usize, 1usize),
            (255, 1, 3),
            (257, 0, 2),
            (SEGMENT_ROWS, 5, 4),
            (SEGMENT_ROWS + 1, 0, 3),
            (3 * SEGMENT_ROWS + 777, 13, 5),
            (1000, 24, 37),
        ] {
            let stride = rows + pad;
            let segments = rows.div_ceil(SEGMENT_ROWS);
            let basis = random(&mut r, stride * vectors);
            let w = random(&mut r, rows);
            let out = run_dots(&ctx, &basis, &w, rows, stride, vectors);
            assert!(
                out[vectors * segments * 2..].iter().all(|x| x.is_nan()),
                "{name}: basis_dots wrote past its pairs"
            );
            for j in 0..vectors {
                for g in 0..segments {
                    let (lo, hi) = (g * SEGMENT_ROWS, ((g + 1) * SEGMENT_ROWS).min(rows));
                    let terms: Vec<f64> = (lo..hi)
                        .map(|i| basis[j * stride + i] as f64 * w[i] as f64)
                        .collect();
                    let exact: f64 = terms.iter().sum();
                    let abs: f64 = terms.iter().map(|t| t.abs()).sum();
                    let k = 2 * (j * segments + g);
                    let got = out[k] as f64 + out[k + 1] as f64;
                    assert!(got.is_finite(), "{name}: pair ({j}, {g}) unwritten");
                    // Each product is rounded once to f32 (≤ 2⁻²⁴ of it);
                    // the compensated sum adds O(2⁻⁴⁸) of Σ|terms|.
                    let err = (got - exact).abs() / abs.max(f64::MIN_POSITIVE);
                    assert!(
                        err <= 2.0 * EPS32,
                        "{name}: dots {rows}×{vectors} ({j}, {g}): {err:.2e}"
                    );
                    worst_dot = worst_dot.max(err);
                }
            }
            // basis_combine: c of both signs and scales.
            let c: Vec<f32> = (0..vectors)
                .map(|j| (r.random::<f32>() - 0.5) * (j as f32 + 1.0))
                .collect();
            let grid = Grid::Threads(rows);
            let y = run(
                &ctx,
                Kernel::BasisCombine,
                &basis,
                &c,
                rows,
                stride,
                vectors,
                rows,
                grid,
            );
            assert!(
                y[rows..].iter().all(|x| x.is_nan()),
                "{name}: basis_combine wrote past its rows"
            );
            for (i, &yi) in y[..rows].iter().enumerate() {
                let terms: Vec<f64> = (0..vectors)
                    .map(|j| c[j] as f64 * basis[j * stride + i] as f64)
                    .collect();
                let exact: f64 = terms.iter().sum();
                let abs: f64 = terms.iter().map(|t| t.abs()).sum();
                // Products rounded once, the sum compensated, the result
                // rounded to f32 once: ≤ 2⁻²⁴ of Σ|terms| + 2⁻²⁴ of |sum|.
                let err = (yi as f64 - exact).abs() / abs.max(f64::MIN_POSITIVE);
                assert!(
                    yi.is_finite() && err <= 2.0 * EPS32,
                    "{name}: combine row {i}: {err:.2e}"
                );
                worst_comb = worst_comb.max(err);
            }
        }
        eprintln!("{name}: worst |error|/Σ|terms|: basis_dots {worst_dot:.2e}, basis_combine {worst_comb:.2e}");
    }
}

/// The compensation is real (and survives each driver's optimiser): terms
/// exact in f32 whose per-thread running sums grow to 32768, where an f32
/// keeps 2⁻⁸, with parts of 2⁻¹⁰ that plain f32 sums drop. The exact sum
/// is the small parts'; compensated it comes out to f64 rounding, plain
/// (each thread in order, as the kernel strides) is off by far more.
#[test]
fn basis_dots_keeps_what_plain_f32_sums_drop() {
    let rows = SEGMENT_ROWS;
    let w: Vec<f32> = (0..rows)
        .map(|i| {
            let big = if i % 256 < 128 { 1024.0 } else { -1024.0 };
            big + ((i * 7919) % 5) as f32 / 1024.0
        })
        .collect();
    let ones = vec![1.0f32; rows];
    let exact: f64 = w.iter().map(|&x| x as f64).sum();
    // Plain f32 in the kernel's order: a running sum per thread, then the
    // 256 thread sums.
    let mut threads = [0.0f32; 256];
    for (i, &x) in w.iter().enumerate() {
        threads[i % 256] += x;
    }
    let plain: f32 = threads.iter().sum();
    let plain_err = (plain as f64 - exact).abs();
    assert!(
        plain_err > 1.0,
        "plain f32 error {plain_err} (the test needs a large one)"
    );
    for (name, ctx) in gpu_contexts() {
        let out = run_dots(&ctx, &ones, &w, rows, rows, 1);
        let got = out[0] as f64 + out[1] as f64;
        let err = (got - exact).abs();
        eprintln!("{name}: Σ = {exact}: compensated error {err:.2e}, plain f32 {plain_err:.2e}");
        assert!(
            err <= 1e-3,
            "{name}: compensated sum off by {err} (exact {exact})"
        );
    }
}

fn unit(r: &mut rand::rngs::StdRng, n: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..n).map(|_| r.random::<f64>() - 0.5).collect();
    let s = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / s).collect()
}

#[test]
fn the_device_store_matches_the_host_store_in_chunks_or_whole() {
    for (name, ctx) in gpu_contexts() {
        let n = 5003;
        for chunk in [None, Some(1024), Some(SEGMENT_ROWS / 3)] {
            let mut r = rand::rngs::StdRng::seed_from_u64(11);
            let mut dev = GpuBasis::new(Rc::new(ctx.share()), n, 6, chunk).unwrap();
            let expect_chunks = chunk.map_or(1, |c| n.div_ceil(c));
            assert_eq!(dev.chunks(), expect_chunks, "{name}");
            let mut host = Basis::new(BasisPrecision::F32);
            for _ in 0..5 {
                let q = unit(&mut r, n);
                let stored = dev.push(&q).unwrap();
                assert_eq!(stored, host.push(q).unwrap(), "{name}: both round to f32");
            }
            for j in 0..5 {
                assert_eq!(
                    dev.get(j).unwrap(),
                    host.get(j).unwrap(),
                    "{name}: get({j})"
                );
            }
            let w: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 4.0 - 2.0).collect();
            let (d, h) = (dev.dots(&w).unwrap(), host.dots(&w).unwrap());
            let wn = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            for (a, b) in d.iter().zip(&h) {
                // w is rounded to f32 on the way (2⁻²⁴ of each entry) and
                // each product once: ≤ 2·2⁻²⁴·Σ|q_i w_i| ≤ 2·2⁻²⁴·‖w‖.
                assert!(
                    (a - b).abs() <= 2.0 * EPS32 * wn,
                    "{name} {chunk:?}: dot {a} vs {b}"
                );
            }
            let c = [0.5, -1.25, 2.0];
            let y = dev.combination(&c).unwrap();
            let mut hy = vec![0.0; n];
            host.subtract(&mut hy, &c.map(|x| -x)).unwrap();
            let cn: f64 = c.iter().map(|x: &f64| x.abs()).sum();
            for (a, b) in y.iter().zip(&hy) {
                assert!(
                    (a - b).abs() <= 2.0 * EPS32 * cn,
                    "{name} {chunk:?}: Q·c {a} vs {b}"
                );
            }
            // Bad input is refused, not run.
            let q = unit(&mut r, n);
            dev.push(&q).unwrap();
            let full = dev.push(&q).expect_err("a full basis refuses").to_string();
            assert!(full.contains("full"), "{full}");
            let short = dev.dots(&w[..n - 1]).expect_err("refused").to_string();
            assert!(short.contains("5002"), "{short}");
            assert!(dev.combination(&[1.0; 7]).is_err());
        }
    }
}

/// A diagonal with a bulk in [−1, 1] and outliers at ±1e3: a spectrum that
/// loses orthogonality fast without reorthogonalisation.
fn wide_spectrum(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| match i {
            0 => 1e3,
            1 => -1e3,
            2 => 500.0,
            _ => -1.0 + 2.0 * i as f64 / n as f64,
        })
        .collect()
}

#[test]
fn lanczos_on_a_device_basis_stays_orthonormal_and_finds_the_same_ritz_values() {
    let n = 2000;
    let steps = 120;
    let d = wide_spectrum(n);
    let start = unit(&mut rand::rngs::StdRng::seed_from_u64(5), n);
    let run = |basis: Basis| {
        let mut op = DiagonalOperator { d: d.clone() };
        let mut lz = Lanczos::with_basis(&mut op, &start, basis, 0).unwrap();
        while lz.steps() < steps && lz.step().unwrap() {}
        let loss = lz.orthogonality_loss().unwrap();
        let t = lz.ritz().unwrap();
        (loss, t.values)
    };
    let (host_loss, host_values) = run(Basis::new(BasisPrecision::F32));
    for (name, ctx) in gpu_contexts() {
        let dev = GpuBasisDevice::new(Rc::new(ctx.share()), 1 << 30, true).with_chunk_rows(700);
        let (loss, values) = run(Basis::Device(dev.allocate(n, steps + 1).unwrap()));
        let top = |v: &[f64]| (v[0], v[v.len() - 1]);
        let (lo, hi) = top(&values);
        let (hlo, hhi) = top(&host_values);
        eprintln!(
            "{name}: max|QᵀQ − I| device {loss:.2e} (host f32 basis {host_loss:.2e}); \
             Ritz extremes {lo} {hi} vs host {hlo} {hhi}"
        );
        // The host's f32-stored basis bound (tests/spectral.rs): storage
        // rounding is 2⁻²⁴ per entry; w's rounding to f32 adds the same.
        assert!(loss <= 1e-6, "{name}: orthogonality {loss:.2e}");
        assert!(
            (lo - hlo).abs() <= 1e-9 * 1e3 && (hi - hhi).abs() <= 1e-9 * 1e3,
            "{name}"
        );
    }
}

#[test]
fn a_gpu_engine_keeps_bases_where_asked_and_gets_the_same_spectrum() {
    for (name, ctx) in gpu_contexts() {
        let p = problem("cnn-tiny", BnMode::Batch);
        let engine = |place| {
            GpuEngine::with_options(
                ctx.share(),
                &p,
                EngineOptions {
                    basis_place: place,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (mut host, mut dev) = (engine(BasisPlace::Host), engine(BasisPlace::Device));
        assert!(host.basis_device().is_none(), "{name}");
        // A CPU emulator keeps bases on the host unless asked; a GPU offers
        // its memory (not required: the solvers fall back to the host).
        match engine(BasisPlace::Auto).basis_device() {
            None => assert!(ctx.is_cpu_adapter(), "{name}: a GPU offers its memory"),
            Some(d) => assert!(
                !ctx.is_cpu_adapter() && !d.required(),
                "{name}: an emulator keeps the host's; auto never insists"
            ),
        }
        let offered = dev.basis_device().expect("Device offers the GPU");
        assert!(offered.required(), "{name}");
        let budget = BasisBudget::host_default();
        let a = slq_block(&mut Hessian(&mut host), 40, 2, 3, 2, budget).unwrap();
        let b = slq_block(&mut Hessian(&mut dev), 40, 2, 3, 2, budget).unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            let scale = ra.nodes.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (x, y) in ra.nodes.iter().zip(&rb.nodes) {
                // f64 host basis vs f32 device basis, the same f32 HVPs:
                // the nodes agree to the products' own accuracy (~1e-7).
                assert!((x - y).abs() <= 1e-5 * scale, "{name}: node {x} vs {y}");
            }
        }
        let mut s = EigsSettings::new(3, Which::Largest);
        s.tol = 1e-4;
        let (eh, ed) = (
            eigs(&mut Hessian(&mut host), &s).unwrap(),
            eigs(&mut Hessian(&mut dev), &s).unwrap(),
        );
        s.block = 2;
        let eb = eigs(&mut Hessian(&mut dev), &s).unwrap();
        for ((x, y), z) in eh.values.iter().zip(&ed.values).zip(&eb.values) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{name}: eig {x} vs {y}");
            assert!(
                (x - z).abs() <= 1e-4 * x.abs(),
                "{name}: block eig {x} vs {z}"
            );
        }
        eprintln!(
            "{name}: top-3 host {:?} device {:?} block {:?}",
            eh.values, ed.values, eb.values
        );
        // A required device whose budget the bases exceed is refused by name.
        struct Tiny(Rc<dyn BasisDevice>);
        impl BasisDevice for Tiny {
            fn budget(&self) -> usize {
                1000
            }
            fn required(&self) -> bool {
                true
            }
            fn name(&self) -> String {
                self.0.name()
            }
            fn allocate(&self, n: usize, v: usize) -> hesscope::Result<Box<dyn DeviceBasis>> {
                self.0.allocate(n, v)
            }
        }
        let plan = hesscope::spectral::lanczos::BasisPlan::choose(
            Some(Rc::new(Tiny(offered))),
            1400,
            90,
            10,
            budget,
        );
        let err = plan.expect_err("refused").to_string();
        assert!(err.contains("device basis budget"), "{err}");
    }
}

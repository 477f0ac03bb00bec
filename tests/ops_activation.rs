//! The float64 activation and average-pool references (`ops::activation`,
//! `ops::pool::avgpool_*`) against what they must be: f' and f'' against
//! finite differences of f, the normal CDF against tabulated values, the
//! slice passes against the scalar forms, and the average pool's backward
//! as the exact transpose of its forward.

use hesscope::model::Activation;
use hesscope::ops::activation::{self as act, d2f, df, f};
use hesscope::ops::pool;
use rand::{Rng, SeedableRng};

const SMOOTH: [Activation; 5] = [
    Activation::Tanh,
    Activation::Sigmoid,
    Activation::Gelu,
    Activation::Silu,
    Activation::GeluTanh,
];

fn all() -> Vec<Activation> {
    let mut v = vec![
        Activation::Relu,
        Activation::LeakyRelu { slope: 0.01 },
        Activation::LeakyRelu { slope: 0.2 },
    ];
    v.extend(SMOOTH);
    v
}

/// Fourth-order central differences of g at x with step h: the first
/// derivative (error h⁴·g⁽⁵⁾/30) and the second (error h⁴·g⁽⁶⁾/90), each
/// with a rounding error of about ε·|g|/h (resp. /h²).
fn fd1(g: impl Fn(f64) -> f64, x: f64, h: f64) -> f64 {
    (8.0 * (g(x + h) - g(x - h)) - (g(x + 2.0 * h) - g(x - 2.0 * h))) / (12.0 * h)
}
fn fd2(g: impl Fn(f64) -> f64, x: f64, h: f64) -> f64 {
    (-g(x + 2.0 * h) + 16.0 * g(x + h) - 30.0 * g(x) + 16.0 * g(x - h) - g(x - 2.0 * h))
        / (12.0 * h * h)
}

/// Points on [-12, 12]: a fine grid, points near 0 on both sides, and
/// points near the roots of f' and f'' (where only an absolute bound can
/// hold).
fn bulk_points() -> Vec<f64> {
    let mut xs: Vec<f64> = (-480..=480).map(|i| i as f64 * 0.025 + 0.0071).collect();
    for e in [1e-1, 1e-2, 1e-3, 1e-5, 1e-8, 1e-12, 1e-300] {
        xs.push(e);
        xs.push(-e);
    }
    xs.push(0.0);
    xs
}

#[test]
fn first_and_second_derivatives_match_finite_differences() {
    // Step 1e-3 (first) and 1e-2 (second): truncation ≈ 1e-13 and 1e-10,
    // rounding ≈ 1e-13 and 1e-12 for these O(1)-bounded functions, so a
    // wrong formula (off by far more) cannot hide under 1e-8.
    let mut worst = vec![];
    for a in all() {
        let (mut e1, mut e2, mut e3) = (0.0f64, 0.0f64, 0.0f64);
        for &x in &bulk_points() {
            let kinked = matches!(a, Activation::Relu | Activation::LeakyRelu { .. });
            if kinked && x.abs() < 0.05 {
                continue; // differences across the kink; checked below
            }
            let g = |t: f64| f(a, t);
            let d1 = fd1(g, x, 1e-3);
            let d2 = fd2(g, x, 1e-2);
            // f'' also against differences of the analytic f'.
            let d2b = fd1(|t| df(a, t), x, 1e-3);
            let tol = |r: f64| 1e-8 * (1.0 + r.abs());
            let (r1, r2) = (df(a, x) - d1, d2f(a, x) - d2);
            let r3 = d2f(a, x) - d2b;
            assert!(r1.abs() <= tol(d1), "{a:?} f'({x}) = {} vs {d1}", df(a, x));
            assert!(
                r2.abs() <= tol(d2),
                "{a:?} f''({x}) = {} vs {d2}",
                d2f(a, x)
            );
            assert!(
                r3.abs() <= tol(d2b),
                "{a:?} f''({x}) = {} vs {d2b} (from f')",
                d2f(a, x)
            );
            e1 = e1.max(r1.abs());
            e2 = e2.max(r2.abs());
            e3 = e3.max(r3.abs());
        }
        worst.push(format!(
            "{a:?}: |f' - fd| {e1:.1e}, |f'' - fd| {e2:.1e}, |f'' - fd(f')| {e3:.1e}"
        ));
    }
    eprintln!("{}", worst.join("\n"));
}

/// In the lower tails σ, SiLU and GELU are tiny but carried to full
/// relative precision (σ(x) ≈ eˣ; Φ through erfc), so differences of f are
/// relatively accurate there and test f', f'' relatively, not just
/// absolutely, out to where the values underflow.
#[test]
fn derivatives_keep_relative_accuracy_in_the_lower_tails() {
    let tails: [(Activation, &[f64]); 3] = [
        (
            Activation::Sigmoid,
            &[-15.0, -20.0, -30.0, -50.0, -100.0, -300.0, -700.0],
        ),
        (
            Activation::Silu,
            &[-15.0, -20.0, -30.0, -50.0, -100.0, -300.0, -700.0],
        ),
        (
            Activation::Gelu,
            &[-6.0, -8.0, -10.0, -15.0, -20.0, -30.0, -37.0],
        ),
    ];
    for (a, xs) in tails {
        for &x in xs {
            // GELU's f⁽ⁿ⁾ grows like xⁿ·f: a step shrinking with |x| keeps
            // h·|x| small.
            let h = 1e-3 / (1.0 + x.abs() * matches!(a, Activation::Gelu) as u8 as f64);
            let g = |t: f64| f(a, t);
            let (d1, d2) = (fd1(g, x, h), fd2(g, x, 10.0 * h));
            let r1 = (df(a, x) - d1).abs() / d1.abs();
            let r2 = (d2f(a, x) - d2).abs() / d2.abs();
            assert!(d1 != 0.0 && d1.is_finite(), "{a:?} at {x}: fd {d1}");
            assert!(
                r1 < 1e-6,
                "{a:?} f'({x}) = {:e} vs {d1:e} ({r1:.1e})",
                df(a, x)
            );
            assert!(
                r2 < 1e-5,
                "{a:?} f''({x}) = {:e} vs {d2:e} ({r2:.1e})",
                d2f(a, x)
            );
        }
    }
    // tanh(x) = 2σ(2x) − 1, so tanh'(x) = 4σ'(2x) and tanh''(x) = 8σ''(2x):
    // the upper tails of tanh (where 1 − tanh² would cancel to 0) follow
    // from the sigmoid's, which are checked above.
    for x in [-350.0, -40.0, -12.0, -3.0, 0.5, 7.0, 15.0, 25.0, 200.0] {
        let (t1, s1) = (
            df(Activation::Tanh, x),
            4.0 * df(Activation::Sigmoid, 2.0 * x),
        );
        let (t2, s2) = (
            d2f(Activation::Tanh, x),
            8.0 * d2f(Activation::Sigmoid, 2.0 * x),
        );
        assert!(
            (t1 - s1).abs() <= 1e-14 * s1.abs() && t1 > 0.0,
            "tanh'({x}) {t1:e} vs {s1:e}"
        );
        assert!(
            (t2 - s2).abs() <= 1e-14 * s2.abs(),
            "tanh''({x}) {t2:e} vs {s2:e}"
        );
    }
}

#[test]
fn symmetries_hold_in_the_far_tails() {
    for x in [0.3, 3.0, 30.0, 300.0] {
        let t = Activation::Tanh;
        let s = Activation::Sigmoid;
        assert_eq!(df(t, x), df(t, -x));
        assert_eq!(d2f(t, x), -d2f(t, -x));
        assert_eq!(df(s, x), df(s, -x));
        assert_eq!(d2f(s, x), -d2f(s, -x));
        // SiLU: f(x) − f(−x) = x, so f'(x) + f'(−x) = 1 and f'' is even.
        let u = Activation::Silu;
        assert!((df(u, x) + df(u, -x) - 1.0).abs() < 1e-15);
        assert!((d2f(u, x) - d2f(u, -x)).abs() <= 1e-15 * d2f(u, x).abs());
        // GELU: f(x) − f(−x) = x likewise.
        let g = Activation::Gelu;
        assert!((df(g, x) + df(g, -x) - 1.0).abs() < 1e-15);
        assert!((d2f(g, x) - d2f(g, -x)).abs() <= 1e-15 * d2f(g, x).abs());
    }
}

#[test]
fn everything_stays_finite_for_huge_inputs() {
    for a in all() {
        for x in [1e10, 1e30, 1e154, 1e200, 1e300, f64::MAX] {
            for v in [x, -x] {
                for (name, y) in [("f", f(a, v)), ("f'", df(a, v)), ("f''", d2f(a, v))] {
                    assert!(y.is_finite(), "{a:?} {name}({v:e}) = {y}");
                }
            }
        }
    }
    // And they have their limits.
    assert_eq!(f(Activation::Tanh, 1e300), 1.0);
    assert_eq!(f(Activation::Sigmoid, -1e300), 0.0);
    assert_eq!(df(Activation::Gelu, 1e300), 1.0);
    assert_eq!(df(Activation::Silu, -1e300), 0.0);
    assert_eq!(d2f(Activation::Gelu, 1e300), 0.0);
    assert_eq!(f(Activation::GeluTanh, 1e300), 1e300);
    assert_eq!(df(Activation::GeluTanh, 1e300), 1.0);
    assert_eq!(d2f(Activation::GeluTanh, -1e300), 0.0);
}

/// GELU's tanh form against its formula as Hugging Face writes it
/// (`gelu_new`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))) where that
/// form does not cancel, to rounding.
#[test]
fn gelu_tanh_is_hugging_faces_gelu_new() {
    for i in -40..=40 {
        let x = i as f64 * 0.15;
        let hf = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        let y = f(Activation::GeluTanh, x);
        assert!(
            (y - hf).abs() <= 1e-15 * (1.0 + hf.abs()),
            "{x}: {y} vs {hf}"
        );
    }
}

#[test]
fn kinks_take_pytorchs_side() {
    // ReLU: f'(0) = 0. LeakyReLU: f'(0) = slope (PyTorch), f'' = 0.
    assert_eq!(df(Activation::Relu, 0.0), 0.0);
    assert_eq!(df(Activation::Relu, -0.0), 0.0);
    assert_eq!(df(Activation::Relu, 1e-300), 1.0);
    let l = Activation::LeakyRelu { slope: 0.1 };
    assert_eq!(df(l, 0.0), 0.1);
    assert_eq!(df(l, -2.0), 0.1);
    assert_eq!(df(l, 1e-300), 1.0);
    assert_eq!(f(l, -2.0), -0.2);
    for x in [-1.0, 0.0, 1.0] {
        assert_eq!(d2f(Activation::Relu, x), 0.0);
        assert_eq!(d2f(l, x), 0.0);
    }
    // Smooth ones at 0.
    assert_eq!(f(Activation::Gelu, 0.0), 0.0);
    assert_eq!(df(Activation::Gelu, 0.0), 0.5);
    assert_eq!(df(Activation::Tanh, 0.0), 1.0);
    assert_eq!(df(Activation::Sigmoid, 0.0), 0.25);
    assert_eq!(df(Activation::Silu, 0.0), 0.5);
    assert_eq!(d2f(Activation::Tanh, 0.0), 0.0);
    assert_eq!(d2f(Activation::Sigmoid, 0.0), 0.0);
    assert!((d2f(Activation::Silu, 0.0) - 0.5).abs() < 1e-16);
    assert!((d2f(Activation::Gelu, 0.0) - 2.0 * 0.398_942_280_401_432_7).abs() < 1e-16);
}

#[test]
fn erf_and_the_normal_cdf_match_tabulated_values() {
    // erf from Abramowitz & Stegun table 7.1 / high-precision references;
    // Φ from standard normal tables (lower tail to 10σ).
    let erf = [
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ];
    for (x, e) in erf {
        let got = libm::erf(x);
        assert!((got - e).abs() <= 2e-16, "erf({x}) = {got} vs {e}");
        assert!((libm::erf(-x) + e).abs() <= 2e-16);
    }
    let erfc = [
        (5.0, 1.537_459_794_428_034_8e-12),
        (10.0, 2.088_487_583_762_545e-45),
    ];
    for (x, e) in erfc {
        let got = libm::erfc(x);
        assert!((got - e).abs() <= 1e-14 * e, "erfc({x}) = {got:e} vs {e:e}");
    }
    let phi = [
        (0.0, 0.5),
        (1.0, 0.841_344_746_068_542_9),
        (-1.0, 0.158_655_253_931_457_05),
        (2.0, 0.977_249_868_051_820_8),
        (-3.0, 1.349_898_031_630_094_6e-3),
        (-5.0, 2.866_515_718_791_939e-7),
        (-10.0, 7.619_853_024_160_527e-24),
    ];
    for (x, p) in phi {
        let got = act::normal_cdf(x);
        assert!((got - p).abs() <= 1e-14 * p, "Φ({x}) = {got:e} vs {p:e}");
        // GELU is x·Φ(x).
        let g = f(Activation::Gelu, x);
        assert!(
            (g - x * p).abs() <= 1e-14 * (x * p).abs(),
            "gelu({x}) = {g:e}"
        );
    }
}

#[test]
fn slice_passes_agree_with_the_scalar_forms() {
    let mut r = rand::rngs::StdRng::seed_from_u64(7);
    let n = 257;
    let rnd = |r: &mut rand::rngs::StdRng| -> Vec<f64> {
        (0..n).map(|_| r.random::<f64>() * 16.0 - 8.0).collect()
    };
    for a in all() {
        let (x, dx, gy, rgy, base) = (
            rnd(&mut r),
            rnd(&mut r),
            rnd(&mut r),
            rnd(&mut r),
            rnd(&mut r),
        );
        let y = act::forward(a, &x);
        let dy = act::r_forward(a, &x, &dx);
        let mut gx = base.clone();
        act::backward_acc(a, &x, &gy, &mut gx);
        let mut rgx = base.clone();
        act::r_backward_acc(a, &x, &dx, &gy, &rgy, &mut rgx);
        for i in 0..n {
            assert_eq!(y[i], f(a, x[i]));
            assert_eq!(dy[i], df(a, x[i]) * dx[i]);
            assert_eq!(gx[i], base[i] + df(a, x[i]) * gy[i]);
            let want = base[i] + df(a, x[i]) * rgy[i] + d2f(a, x[i]) * dx[i] * gy[i];
            assert!((rgx[i] - want).abs() <= 1e-15 * (1.0 + want.abs()), "{a:?}");
        }
    }
}

/// R(gx) of an activation is the directional derivative of gx = f'(x)·gy
/// along (ẋ, R(gy)): checked against a central difference of the backward
/// pass itself.
#[test]
fn r_backward_is_the_derivative_of_backward() {
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    for a in SMOOTH {
        let n = 64;
        let v: Vec<[f64; 4]> = (0..n)
            .map(|_| [0.0; 4].map(|_: f64| r.random::<f64>() * 8.0 - 4.0))
            .collect();
        let (x, dx, gy, rgy): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = (
            v.iter().map(|q| q[0]).collect(),
            v.iter().map(|q| q[1]).collect(),
            v.iter().map(|q| q[2]).collect(),
            v.iter().map(|q| q[3]).collect(),
        );
        let mut rgx = vec![0.0; n];
        act::r_backward_acc(a, &x, &dx, &gy, &rgy, &mut rgx);
        let h = 1e-4;
        let back = |t: f64| {
            let xs: Vec<f64> = x.iter().zip(&dx).map(|(x, d)| x + t * d).collect();
            let gs: Vec<f64> = gy.iter().zip(&rgy).map(|(g, d)| g + t * d).collect();
            let mut gx = vec![0.0; n];
            act::backward_acc(a, &xs, &gs, &mut gx);
            gx
        };
        let (p, m) = (back(h), back(-h));
        for i in 0..n {
            let fd = (p[i] - m[i]) / (2.0 * h);
            assert!(
                (fd - rgx[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{a:?}: {} vs {fd}",
                rgx[i]
            );
        }
    }
}

#[test]
fn avgpool_backward_is_the_transpose_of_forward() {
    let mut r = rand::rngs::StdRng::seed_from_u64(11);
    let mut cases = 0;
    while cases < 200 {
        let k = r.random_range(1..=5usize);
        let stride = r.random_range(1..=4usize);
        let pad = r.random_range(0..=k / 2);
        let (h, w) = (r.random_range(1..=11usize), r.random_range(1..=11usize));
        if h + 2 * pad < k || w + 2 * pad < k {
            continue;
        }
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let planes = r.random_range(1..=4usize);
        let x: Vec<f64> = (0..planes * h * w)
            .map(|_| r.random::<f64>() - 0.5)
            .collect();
        let y: Vec<f64> = (0..planes * oh * ow)
            .map(|_| r.random::<f64>() - 0.5)
            .collect();
        let ax = pool::avgpool_forward(planes, h, w, k, stride, pad, oh, ow, &x);
        let aty = pool::avgpool_backward(planes, h, w, k, stride, pad, oh, ow, &y);
        assert_eq!((ax.len(), aty.len()), (y.len(), x.len()));
        let lhs: f64 = ax.iter().zip(&y).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&aty).map(|(a, b)| a * b).sum();
        let scale: f64 =
            x.iter().map(|v| v.abs()).sum::<f64>() * y.iter().map(|v| v.abs()).sum::<f64>();
        assert!(
            (lhs - rhs).abs() <= 1e-14 * scale,
            "k{k} s{stride} p{pad} {h}x{w}: <Ax,y> {lhs} vs <x,A'y> {rhs}"
        );
        cases += 1;
    }
}

#[test]
fn avgpool_counts_padding_in_the_divisor() {
    // A 2×2 plane of ones, k = 3, pad 1, stride 1: every window holds the
    // 4 ones and 5 zeros of padding, so every output is 4/9.
    let y = pool::avgpool_forward(1, 2, 2, 3, 1, 1, 2, 2, &[1.0; 4]);
    assert!(y.iter().all(|v| (v - 4.0 / 9.0).abs() < 1e-16), "{y:?}");
    // k = 2, stride 2 on 4×4: plain 2×2 means.
    let x: Vec<f64> = (0..16).map(|i| i as f64).collect();
    let y = pool::avgpool_forward(1, 4, 4, 2, 2, 0, 2, 2, &x);
    assert_eq!(y, vec![2.5, 4.5, 10.5, 12.5]);
    let g = pool::avgpool_backward(1, 4, 4, 2, 2, 0, 2, 2, &[4.0, 8.0, 12.0, 16.0]);
    assert_eq!(&g[..4], &[1.0, 1.0, 2.0, 2.0]);
}

/// shaders/activation.wgsl computes GELU's Φ(x) = erfc(−x/√2)/2 with the
/// Chebyshev fit of Numerical Recipes (erfcc): erfc(z) ≈ t·exp(−z² + P(t)),
/// t = 1/(1 + z/2). Its stated bound is a relative error below 1.2e-7 for
/// every z ≥ 0; this measures it in float64 against libm over the range
/// the shader uses (|x| ≤ 15, z ≤ 10.6), so that the figure quoted there
/// is checked, not copied.
#[test]
fn the_shaders_erfc_approximation_is_within_its_stated_bound() {
    const P: [f64; 10] = [
        -1.26551223,
        1.00002368,
        0.37409196,
        0.09678418,
        -0.18628806,
        0.27886807,
        -1.13520398,
        1.48851587,
        -0.82215223,
        0.17087277,
    ];
    let approx = |z: f64| {
        let t = 1.0 / (1.0 + 0.5 * z);
        let p = P.iter().rev().fold(0.0, |acc, c| acc * t + c);
        t * (-z * z + p).exp()
    };
    let mut worst = (0.0f64, 0.0);
    for i in 0..=212_000 {
        let z = i as f64 * 5e-5;
        let e = (approx(z) / libm::erfc(z) - 1.0).abs();
        if e > worst.0 {
            worst = (e, z);
        }
    }
    eprintln!(
        "erfcc: max relative error {:.2e} at z = {:.4}",
        worst.0, worst.1
    );
    assert!(worst.0 < 1.2e-7, "{worst:?}");
}

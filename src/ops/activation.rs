//! Elementwise activations in float64: f, f' and f'', and the four passes
//! (forward, backward, R-forward, R-backward) over slices.
//!
//! The R-operator of y = f(x) is ẏ = f'(x)·ẋ; the adjoint is gx = f'(x)·gy
//! and its R-derivative R(gx) = f'(x)·R(gy) + f''(x)·ẋ·gy. The last term is
//! the curvature an activation adds to the Hessian; ReLU, LeakyReLU, ReLU6
//! and Hardsigmoid (piecewise linear) have f'' = 0.
//!
//! ReLU6, Hardswish and Hardsigmoid have three pieces ([`piece`]): below
//! the lower kink (inclusive), strictly between the kinks, at or above the
//! upper one — PyTorch's derivative at each kink (measured with
//! torch.autograd in float64: relu6' is 0 at 0 and at 6, hardsigmoid' 0 at
//! ±3, hardswish' 0 at −3 and 1 at 3, hardswish'' 0 at ±3). The `*_on`
//! forms evaluate one piece's polynomial at any x: a frozen decision
//! (`crate::layers::Decision::Piece`) picks the piece, the value the x.
//!
//! Every form is written to stay finite and relatively accurate for large
//! |x|: σ'(x) and tanh'(x) are computed from e^{-|x|}, not as σ(1 − σ) or
//! 1 − tanh² (which cancel to 0 long before the true value underflows),
//! and Φ(x) = erfc(−x/√2)/2 keeps its relative accuracy for x ≪ 0.

use crate::model::Activation;
use rayon::prelude::*;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Standard normal density φ(x).
pub fn normal_pdf(x: f64) -> f64 {
    FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
}

/// Standard normal CDF Φ(x) = erfc(−x/√2)/2 (relatively accurate in the
/// lower tail, where 1 + erf(x/√2) would cancel).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// σ(x) = 1/(1 + e^{−x}), from e^{−|x|} so no exponential overflows.
pub fn sigmoid(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// σ'(x) = σ(x)σ(−x) = e^{−|x|}/(1 + e^{−|x|})² (even in x).
fn sigmoid_d(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    e / ((1.0 + e) * (1.0 + e))
}

/// tanh'(x) = sech²(x) = 4e/(1 + e)² with e = e^{−2|x|}.
fn tanh_d(x: f64) -> f64 {
    let e = (-2.0 * x.abs()).exp();
    4.0 * e / ((1.0 + e) * (1.0 + e))
}

/// GELU-tanh's inner u = √(2/π)(x + 0.044715x³) and its derivatives u', u''.
fn gelu_tanh_u(x: f64) -> (f64, f64, f64) {
    const C: f64 = 0.797_884_560_802_865_4; // √(2/π)
    const A: f64 = 0.044_715;
    (
        C * (x + A * x * x * x),
        C * (1.0 + 3.0 * A * x * x),
        C * 6.0 * A * x,
    )
}

/// The kinks (lower, upper) of a three-piece activation.
pub fn kinks(a: Activation) -> Option<(f64, f64)> {
    match a {
        Activation::Relu6 => Some((0.0, 6.0)),
        Activation::Hardswish | Activation::Hardsigmoid => Some((-3.0, 3.0)),
        _ => None,
    }
}

/// The piece of a three-piece activation x lies on: 0 for x ≤ lower
/// kink (and NaN), 1 strictly between the kinks, 2 for x ≥ upper kink.
pub fn piece(a: Activation, x: f64) -> u8 {
    let (lo, hi) = kinks(a).expect("a three-piece activation");
    if x > lo && x < hi {
        1
    } else if x >= hi {
        2
    } else {
        0
    }
}

/// The distance from x to the nearest kink of a three-piece activation
/// (NaN for a NaN x).
pub fn kink_margin(a: Activation, x: f64) -> f64 {
    let (lo, hi) = kinks(a).expect("a three-piece activation");
    (x - lo).abs().min((x - hi).abs())
}

/// Piece `p`'s f at x. A NaN passes unchanged on every piece, as
/// PyTorch's clamp-based forms keep it.
pub fn f_on(a: Activation, p: u8, x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    match (a, p) {
        (Activation::Relu6 | Activation::Hardswish | Activation::Hardsigmoid, 0) => 0.0,
        (Activation::Relu6, 1) => x,
        (Activation::Relu6, _) => 6.0,
        (Activation::Hardswish, 1) => x * (x + 3.0) / 6.0,
        (Activation::Hardswish, _) => x,
        (Activation::Hardsigmoid, 1) => (x + 3.0) / 6.0,
        (Activation::Hardsigmoid, _) => 1.0,
        _ => unreachable!("f_on: {a:?} has no pieces"),
    }
}

/// Piece `p`'s f' at x.
pub fn df_on(a: Activation, p: u8, x: f64) -> f64 {
    match (a, p) {
        (_, 0) => 0.0,
        (Activation::Relu6, 1) => 1.0,
        (Activation::Hardswish, 1) => (2.0 * x + 3.0) / 6.0,
        (Activation::Hardswish, _) => 1.0,
        (Activation::Hardsigmoid, 1) => 1.0 / 6.0,
        _ => 0.0,
    }
}

/// Piece `p`'s f'': 1/3 on Hardswish's middle piece, else 0.
pub fn d2f_on(a: Activation, p: u8) -> f64 {
    match (a, p) {
        (Activation::Hardswish, 1) => 1.0 / 3.0,
        _ => 0.0,
    }
}

/// f(x).
pub fn f(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        Activation::LeakyRelu { slope } => {
            if x > 0.0 {
                x
            } else {
                slope * x
            }
        }
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => sigmoid(x),
        Activation::Gelu => x * normal_cdf(x),
        Activation::Silu => x * sigmoid(x),
        // 0.5·(1 + tanh u) = σ(2u), which keeps relative accuracy where
        // 1 + tanh u would cancel (x ≪ 0).
        Activation::GeluTanh => x * sigmoid(2.0 * gelu_tanh_u(x).0),
        Activation::Relu6 | Activation::Hardswish | Activation::Hardsigmoid => {
            f_on(a, piece(a, x), x)
        }
    }
}

/// f'(x). ReLU: 0 at 0; LeakyReLU: `slope` for x ≤ 0 (PyTorch's choice at 0).
pub fn df(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::LeakyRelu { slope } => {
            if x > 0.0 {
                1.0
            } else {
                slope
            }
        }
        Activation::Tanh => tanh_d(x),
        Activation::Sigmoid => sigmoid_d(x),
        // Φ(x) + x·φ(x); φ underflows to 0 before x·φ could overflow.
        Activation::Gelu => normal_cdf(x) + x * normal_pdf(x),
        // σ(x) + x·σ'(x).
        Activation::Silu => sigmoid(x) + x * sigmoid_d(x),
        // σ(2u) + 0.5·x·sech²(u)·u' (σ(2u) = 0.5(1 + tanh u)).
        Activation::GeluTanh => {
            let (u, du, _) = gelu_tanh_u(x);
            let s2 = tanh_d(u);
            let xs = if s2 == 0.0 { 0.0 } else { x * s2 * du };
            sigmoid(2.0 * u) + 0.5 * xs
        }
        Activation::Relu6 | Activation::Hardswish | Activation::Hardsigmoid => {
            df_on(a, piece(a, x), x)
        }
    }
}

/// f''(x); 0 for the piecewise-linear ReLU, LeakyReLU, ReLU6 and
/// Hardsigmoid.
pub fn d2f(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu
        | Activation::LeakyRelu { .. }
        | Activation::Relu6
        | Activation::Hardsigmoid => 0.0,
        Activation::Hardswish => d2f_on(a, piece(a, x)),
        // −2·tanh(x)·sech²(x).
        Activation::Tanh => -2.0 * x.tanh() * tanh_d(x),
        // σ'(x)(1 − 2σ(x)) = −σ'(x)·tanh(x/2).
        Activation::Sigmoid => -sigmoid_d(x) * (0.5 * x).tanh(),
        // φ(x)(2 − x²); written so that φ = 0 wins over an infinite x².
        Activation::Gelu => {
            let phi = normal_pdf(x);
            if phi == 0.0 {
                0.0
            } else {
                phi * (2.0 - x * x)
            }
        }
        // sech²(u)·(u' + x/2·(u'' − 2·tanh(u)·u'²)).
        Activation::GeluTanh => {
            let (u, du, d2u) = gelu_tanh_u(x);
            let s2 = tanh_d(u);
            if s2 == 0.0 {
                0.0
            } else {
                s2 * (du + 0.5 * x * (d2u - 2.0 * u.tanh() * du * du))
            }
        }
        // 2σ' + x·σ'' = σ'(x)(2 − x·tanh(x/2)).
        Activation::Silu => {
            let s1 = sigmoid_d(x);
            if s1 == 0.0 {
                0.0
            } else {
                s1 * (2.0 - x * (0.5 * x).tanh())
            }
        }
    }
}

/// Elements per chunk of the element-wise passes, which run the chunks
/// on all cores: every element is computed alone, so the split changes no
/// result.
const CHUNK: usize = 1 << 14;

/// out[i] = f(i, j) for the elements of each chunk (`i` within the chunk,
/// `j` its start), the chunks on all cores.
fn par_fill(out: &mut [f64], f: impl Fn(&mut [f64], usize) + Sync) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, o)| f(o, c * CHUNK));
}

/// y = f(x).
pub fn forward(a: Activation, x: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    par_fill(&mut y, |o, j| {
        for (o, &v) in o.iter_mut().zip(&x[j..]) {
            *o = f(a, v);
        }
    });
    y
}

/// gx += f'(x)·gy.
pub fn backward_acc(a: Activation, x: &[f64], gy: &[f64], gx: &mut [f64]) {
    assert!(x.len() == gy.len() && x.len() == gx.len());
    par_fill(gx, |o, j| {
        for ((g, &v), &d) in o.iter_mut().zip(&x[j..]).zip(&gy[j..]) {
            *g += df(a, v) * d;
        }
    });
}

/// ẏ = f'(x)·ẋ.
pub fn r_forward(a: Activation, x: &[f64], dx: &[f64]) -> Vec<f64> {
    assert_eq!(x.len(), dx.len());
    let mut y = vec![0.0; x.len()];
    par_fill(&mut y, |o, j| {
        for ((o, &v), &d) in o.iter_mut().zip(&x[j..]).zip(&dx[j..]) {
            *o = df(a, v) * d;
        }
    });
    y
}

/// R(gx) += f'(x)·R(gy) + f''(x)·ẋ·gy.
pub fn r_backward_acc(
    a: Activation,
    x: &[f64],
    dx: &[f64],
    gy: &[f64],
    rgy: &[f64],
    rgx: &mut [f64],
) {
    let n = x.len();
    assert!(dx.len() == n && gy.len() == n && rgy.len() == n && rgx.len() == n);
    let curved = !matches!(
        a,
        Activation::Relu
            | Activation::LeakyRelu { .. }
            | Activation::Relu6
            | Activation::Hardsigmoid
    );
    par_fill(rgx, |o, j| {
        let e = j + o.len();
        let (x, dx, gy, rgy) = (&x[j..e], &dx[j..e], &gy[j..e], &rgy[j..e]);
        for i in 0..o.len() {
            let mut r = df(a, x[i]) * rgy[i];
            if curved {
                r += d2f(a, x[i]) * dx[i] * gy[i];
            }
            o[i] += r;
        }
    });
}

/// The four passes with every element's piece given (a three-piece
/// activation replaying frozen decisions): y = f_p(x).
pub fn forward_on(a: Activation, p: &[u8], x: &[f64]) -> Vec<f64> {
    assert_eq!(p.len(), x.len());
    p.iter().zip(x).map(|(&p, &v)| f_on(a, p, v)).collect()
}

/// out = f_p'(x)·g (the R-forward with g = ẋ, the backward with g = gy).
pub fn derivative_on(a: Activation, p: &[u8], x: &[f64], g: &[f64]) -> Vec<f64> {
    assert!(p.len() == x.len() && x.len() == g.len());
    (0..x.len()).map(|i| df_on(a, p[i], x[i]) * g[i]).collect()
}

/// R(gx) = f_p'(x)·R(gy) + f_p''·ẋ·gy.
pub fn r_backward_on(
    a: Activation,
    p: &[u8],
    x: &[f64],
    dx: &[f64],
    gy: &[f64],
    rgy: &[f64],
) -> Vec<f64> {
    let n = x.len();
    assert!(p.len() == n && dx.len() == n && gy.len() == n && rgy.len() == n);
    (0..n)
        .map(|i| df_on(a, p[i], x[i]) * rgy[i] + d2f_on(a, p[i]) * dx[i] * gy[i])
        .collect()
}

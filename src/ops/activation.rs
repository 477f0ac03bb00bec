//! Elementwise activations in float64: f, f' and f'', and the four passes
//! (forward, backward, R-forward, R-backward) over slices.
//!
//! The R-operator of y = f(x) is ẏ = f'(x)·ẋ; the adjoint is gx = f'(x)·gy
//! and its R-derivative R(gx) = f'(x)·R(gy) + f''(x)·ẋ·gy. The last term is
//! the curvature an activation adds to the Hessian; ReLU and LeakyReLU
//! (piecewise linear) have f'' = 0.
//!
//! Every form is written to stay finite and relatively accurate for large
//! |x|: σ'(x) and tanh'(x) are computed from e^{-|x|}, not as σ(1 − σ) or
//! 1 − tanh² (which cancel to 0 long before the true value underflows),
//! and Φ(x) = erfc(−x/√2)/2 keeps its relative accuracy for x ≪ 0.

use crate::model::Activation;

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
    }
}

/// f''(x); 0 for the piecewise-linear ReLU and LeakyReLU.
pub fn d2f(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu | Activation::LeakyRelu { .. } => 0.0,
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

/// y = f(x).
pub fn forward(a: Activation, x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| f(a, v)).collect()
}

/// gx += f'(x)·gy.
pub fn backward_acc(a: Activation, x: &[f64], gy: &[f64], gx: &mut [f64]) {
    assert!(x.len() == gy.len() && x.len() == gx.len());
    for ((g, &v), &d) in gx.iter_mut().zip(x).zip(gy) {
        *g += df(a, v) * d;
    }
}

/// ẏ = f'(x)·ẋ.
pub fn r_forward(a: Activation, x: &[f64], dx: &[f64]) -> Vec<f64> {
    assert_eq!(x.len(), dx.len());
    x.iter().zip(dx).map(|(&v, &d)| df(a, v) * d).collect()
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
    let curved = !matches!(a, Activation::Relu | Activation::LeakyRelu { .. });
    for i in 0..n {
        let mut r = df(a, x[i]) * rgy[i];
        if curved {
            r += d2f(a, x[i]) * dx[i] * gy[i];
        }
        rgx[i] += r;
    }
}

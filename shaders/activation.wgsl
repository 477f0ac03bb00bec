// Elementwise activations y = f(x) and their derivatives. One module for
// every activation: the pipeline-overridable constant ACT picks f
// (0 ReLU, 1 LeakyReLU(p.slope), 2 Tanh, 3 Sigmoid, 4 GELU (exact, x·Φ(x)),
// 5 SiLU), so a pipeline holds only its own activation; ACC adds into the
// output instead of overwriting it. Both are resolved when the pipeline is
// created, so no dispatch branches on them or computes an absent term.
//   act_forward:    y (+)= f(x)
//   act_r_forward:  ẏ (+)= f'(x)·ẋ
//   act_backward:   gx (+)= f'(x)·gy        (also the R-backward of ReLU and
//                                            LeakyReLU, where f'' = 0)
//   act_r_backward: R(gx) (+)= f'(x)·R(gy) + f''(x)·ẋ·gy
// ReLU' is 0 at 0; LeakyReLU' is the slope for x <= 0 (PyTorch).
//
// Accuracy: each f, f', f'' is within a few ulp (measured: 4.7e-7 on
// lavapipe and llvmpipe over [-10, 10]) of the exact value at the f32
// input, relative to the size of the terms it sums (a result near a root
// of f' or f'', e.g. GELU' at x ≈ -0.75, has only that absolute
// accuracy); nothing overflows or turns NaN for any finite x.
// Three things make that so:
//  - every exponential is exp_dd below: Cody-Waite reduction by ln 2 and
//    a degree-8 polynomial, accurate to a few ulp for any argument, unlike
//    the builtin exp whose error bound grows as 3 + 2|x| ulp;
//  - σ'(x) and tanh'(x) are formed from e^{-|x|} (σ' = e/(1+e)²,
//    tanh' = 4e/(1+e)² with e = e^{-2|x|}), not as σ(1-σ) or 1 - tanh²,
//    which cancel to 0 long before the true values underflow; tanh near 0
//    goes through expm1, σ'' = -σ'·tanh(x/2);
//  - x²/2 in e^{-x²/2} is carried exactly as a sum of two f32s (x split
//    into 12 high bits and the rest), since a rounded x² would put an
//    error of x²·2^-24 into the exponent (3e-6 relative at x = 10).
// GELU needs erfc, which WGSL lacks: Φ(x) = erfc(-x/√2)/2 with the
// Chebyshev fit of Numerical Recipes (2nd ed., §6.2, erfcc):
//   erfc(z) ≈ t·exp(-z² + P(t)), t = 1/(1 + z/2), z >= 0,
// P the degree-9 polynomial below, relative error below 1.2e-7 for every
// z >= 0 (tests/ops_activation.rs measures it against libm in f64), so
// Φ keeps its relative accuracy in the lower tail (Φ(-10) = 7.6e-24).

struct ActParams {
    len: u32, slope: f32, _p0: u32, _p1: u32,
}

// The engine always sets ACT; ACC defaults to overwriting.
override ACT: u32 = 0u;
override ACC: bool = false;

const RELU: u32 = 0u;
const LEAKY_RELU: u32 = 1u;
const TANH: u32 = 2u;
const SIGMOID: u32 = 3u;
const GELU: u32 = 4u;
const SILU: u32 = 5u;

const WG: u32 = 256u;
const LOG2E: f32 = 1.4426950408889634;
// ln 2 = LN2_HI + LN2_LO with LN2_HI of 16 significant bits, so n·LN2_HI
// is exact for |n| < 256.
const LN2_HI: f32 = 0.693145751953125;
const LN2_LO: f32 = 1.4286068203094173e-6;
const INV_SQRT2: f32 = 0.7071067811865476;
const INV_SQRT_2PI: f32 = 0.3989422804014327;

@group(0) @binding(0) var<uniform> p: ActParams;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// e^r for |r| <= ln2/2 + ε: Taylor to degree 8 (truncation < 3e-10).
fn exp_poly(r: f32) -> f32 {
    return 1.0 + r * (1.0 + r * (0.5 + r * (1.6666666666666666e-1 + r * (4.1666666666666664e-2
        + r * (8.3333333333333332e-3 + r * (1.3888888888888889e-3 + r * (1.9841269841269841e-4
        + r * 2.4801587301587302e-5)))))));
}

// e^a = 2^n·e^r with n = round(a/ln2) and r = a - n·ln2 reduced in two
// steps (n·LN2_HI exact, a - n·LN2_HI exact where the two are within a
// factor of 2): (e^r, n).
fn exp_reduce(a: f32) -> vec2<f32> {
    let n = round(clamp(a, -104.0, 88.0) * LOG2E);
    let r = (a - n * LN2_HI) - n * LN2_LO;
    return vec2<f32>(exp_poly(r), n);
}

// e^(hi + lo), for hi an exact term (possibly large) and lo a moderate
// one (|lo| <= ~2): 0 below e^-104 (under f32's smallest subnormal), and
// never an infinity or a NaN for a finite or -inf argument. hi and lo are
// reduced separately and their exponentials multiplied: summing them first
// (or reducing hi + lo as one) would round hi + lo to f32, an error of
// |hi|·2^-24 in the exponent; compilers may reassociate a sum of hi, lo
// and n·ln2, but not this product.
fn exp_dd(hi: f32, lo: f32) -> f32 {
    let a = exp_reduce(hi);
    let b = exp_reduce(lo);
    let v = ldexp(a.x * b.x, i32(a.y) + i32(b.y));
    return select(v, 0.0, hi + lo < -104.0);
}

// e^x - 1 for -0.7 <= x <= 0: Taylor to degree 10 (truncation < 1e-9
// relative), no cancellation.
fn expm1_small(x: f32) -> f32 {
    return x * (1.0 + x * (0.5 + x * (1.6666666666666666e-1 + x * (4.1666666666666664e-2
        + x * (8.3333333333333332e-3 + x * (1.3888888888888889e-3 + x * (1.9841269841269841e-4
        + x * (2.4801587301587302e-5 + x * (2.7557319223985893e-6
        + x * 2.7557319223985888e-7)))))))));
}

// tanh(x) = sign(x)·(1 - e)/(1 + e), e = e^{-2|x|}; through expm1 where
// 1 - e would cancel.
fn tanh_(x: f32) -> f32 {
    let a = abs(x);
    let m = expm1_small(-2.0 * a);
    let e = exp_dd(-2.0 * a, 0.0);
    let t = select((1.0 - e) / (1.0 + e), -m / (2.0 + m), a < 0.35);
    return select(-t, t, x >= 0.0);
}

// tanh'(x) = 4e/(1 + e)², e = e^{-2|x|}.
fn tanh_d(x: f32) -> f32 {
    let e = exp_dd(-2.0 * abs(x), 0.0);
    return 4.0 * e / ((1.0 + e) * (1.0 + e));
}

// σ(x) and σ'(x) = e/(1 + e)², e = e^{-|x|}.
fn sigmoid(x: f32) -> f32 {
    let e = exp_dd(-abs(x), 0.0);
    return select(e, 1.0, x >= 0.0) / (1.0 + e);
}
fn sigmoid_d(x: f32) -> f32 {
    let e = exp_dd(-abs(x), 0.0);
    return e / ((1.0 + e) * (1.0 + e));
}

// x² = hi + lo exactly (to ~2^-36 relative): hi is the square of x's top
// 12 significant bits (exact in f32), lo = (x - xh)(x + xh).
fn square_dd(x: f32) -> vec2<f32> {
    let xh = bitcast<f32>(bitcast<u32>(x) & 0xfffff000u);
    return vec2<f32>(xh * xh, (x - xh) * (x + xh));
}

// The standard normal at x, clamped to |x| <= 15 (φ and the tail of Φ are
// below f32's range beyond): (Φ(x), φ(x)).
fn normal(x: f32) -> vec2<f32> {
    let xc = clamp(x, -15.0, 15.0);
    let sq = square_dd(xc);
    let t = 1.0 / (1.0 + 0.5 * INV_SQRT2 * abs(xc));
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    // erfc(|x|/√2) = t·e^{-x²/2 + P(t)}.
    let erfc_abs = t * exp_dd(-0.5 * sq.x, poly - 0.5 * sq.y);
    let cdf = select(0.5 * erfc_abs, 1.0 - 0.5 * erfc_abs, xc > 0.0);
    let pdf = INV_SQRT_2PI * exp_dd(-0.5 * sq.x, -0.5 * sq.y);
    return vec2<f32>(cdf, pdf);
}

fn f(x: f32) -> f32 {
    switch ACT {
        // A NaN or infinite input passes unchanged (PyTorch's relu keeps a
        // NaN), so an overflow upstream reaches the loss instead of being
        // zeroed; tested by its bits, which no backend optimises away (GLSL
        // leaves NaN comparisons undefined).
        case RELU: {
            let special = (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
            return select(select(0.0, x, x > 0.0), x, special);
        }
        case LEAKY_RELU: { return select(p.slope * x, x, x > 0.0); }
        case TANH: { return tanh_(x); }
        case SIGMOID: { return sigmoid(x); }
        case GELU: { return x * normal(x).x; }
        default: { return x * sigmoid(x); }
    }
}

fn df(x: f32) -> f32 {
    switch ACT {
        case RELU: { return select(0.0, 1.0, x > 0.0); }
        case LEAKY_RELU: { return select(p.slope, 1.0, x > 0.0); }
        case TANH: { return tanh_d(x); }
        case SIGMOID: { return sigmoid_d(x); }
        case GELU: {
            // Φ(x) + x·φ(x); φ is 0 where x is clamped.
            let xc = clamp(x, -15.0, 15.0);
            let n = normal(xc);
            return n.x + xc * n.y;
        }
        default: {
            // σ(x) + x·σ'(x) = σ(x)·(1 + x·σ(-x)).
            return sigmoid(x) * (1.0 + x * sigmoid(-x));
        }
    }
}

// f''; 0 for ReLU and LeakyReLU (act_r_backward never calls it for them).
fn d2f(x: f32) -> f32 {
    switch ACT {
        case TANH: { return -2.0 * tanh_(x) * tanh_d(x); }
        case SIGMOID: { return -sigmoid_d(x) * tanh_(0.5 * x); }
        case GELU: {
            // φ(x)·(2 - x²), with 2 - x² exact near its roots ±√2.
            let xc = clamp(x, -15.0, 15.0);
            let sq = square_dd(xc);
            return normal(xc).y * ((2.0 - sq.x) - sq.y);
        }
        case SILU: {
            // 2σ' + x·σ'' = σ'(x)·(2 - x·tanh(x/2)).
            return sigmoid_d(x) * (2.0 - x * tanh_(0.5 * x));
        }
        default: { return 0.0; }
    }
}

// ---- y (+)= f(x)
@group(0) @binding(1) var<storage, read> fw_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> fw_y: array<f32>;

@compute @workgroup_size(256)
fn act_forward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    var v = f(fw_x[i]);
    if (ACC) {
        v += fw_y[i];
    }
    fw_y[i] = v;
}

// ---- ẏ (+)= f'(x)·ẋ and gx (+)= f'(x)·gy: the same product.
@group(0) @binding(1) var<storage, read> d_x: array<f32>;
@group(0) @binding(2) var<storage, read> d_g: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_out: array<f32>;

// With tangent k's slices (tangents.wgsl): x is shared, g and the output
// are the tangent's (ẋ, or R(gy) in ReLU's R-backward).
fn derivative_times(i: u32, k: u32) {
    let o_x = kslice(1u, arrayLength(&d_x), k);
    let o_g = kslice(2u, arrayLength(&d_g), k);
    let o_out = kslice(3u, arrayLength(&d_out), k);
    var v = df(d_x[o_x + i]) * d_g[o_g + i];
    if (ACC) {
        v += d_out[o_out + i];
    }
    d_out[o_out + i] = v;
}

@compute @workgroup_size(256)
fn act_r_forward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    derivative_times(i, wid.z);
}

@compute @workgroup_size(256)
fn act_backward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    derivative_times(i, wid.z);
}

// ---- R(gx) (+)= f'(x)·R(gy) + f''(x)·ẋ·gy
@group(0) @binding(1) var<storage, read> r_x: array<f32>;
@group(0) @binding(2) var<storage, read> r_dx: array<f32>;
@group(0) @binding(3) var<storage, read> r_gy: array<f32>;
@group(0) @binding(4) var<storage, read> r_rgy: array<f32>;
@group(0) @binding(5) var<storage, read_write> r_out: array<f32>;

@compute @workgroup_size(256)
fn act_r_backward(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    // Tangent slices (tangents.wgsl).
    let k = wid.z;
    let o_x = kslice(1u, arrayLength(&r_x), k);
    let o_dx = kslice(2u, arrayLength(&r_dx), k);
    let o_gy = kslice(3u, arrayLength(&r_gy), k);
    let o_rgy = kslice(4u, arrayLength(&r_rgy), k);
    let o_out = kslice(5u, arrayLength(&r_out), k);
    let x = r_x[o_x + i];
    var v = df(x) * r_rgy[o_rgy + i];
    // The curvature term exists only for the smooth activations.
    if (ACT >= TANH) {
        v += d2f(x) * r_dx[o_dx + i] * r_gy[o_gy + i];
    }
    if (ACC) {
        v += r_out[o_out + i];
    }
    r_out[o_out + i] = v;
}

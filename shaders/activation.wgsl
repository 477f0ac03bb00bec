// Elementwise activations y = f(x) and their derivatives. One module for
// every activation: the pipeline-overridable constant ACT picks f
// (0 ReLU, 1 LeakyReLU(p.slope), 2 Tanh, 3 Sigmoid, 4 GELU (exact, x·Φ(x)),
// 5 SiLU, 6 ReLU6, 7 Hardswish, 8 Hardsigmoid, 9 GELU's tanh form
// x·σ(2u), u = √(2/π)(x + 0.044715x³), Hugging Face's gelu_new), so a
// pipeline holds only
// its own activation; ACC adds into the
// output instead of overwriting it. Both are resolved when the pipeline is
// created, so no dispatch branches on them or computes an absent term.
//   act_forward:    y (+)= f(x)
//   act_r_forward:  ẏ (+)= f'(x)·ẋ
//   act_backward:   gx (+)= f'(x)·gy        (also the R-backward of ReLU and
//                                            LeakyReLU, where f'' = 0)
//   act_r_backward: R(gx) (+)= f'(x)·R(gy) + f''(x)·ẋ·gy
// ReLU' is 0 at 0; LeakyReLU' is the slope for x <= 0 (PyTorch).
// ReLU6, Hardswish and Hardsigmoid have three pieces (`piece`): x at or
// below the lower kink, strictly between, at or above the upper kink
// (PyTorch's derivatives at the kinks: relu6' 0 at 0 and 6, hardsigmoid' 0
// at ±3, hardswish' 0 at -3 and 1 at 3). A frozen plan replays them with
// the act_replay_* entry points, which take each element's piece from a
// recorded x0 (binding 1) and evaluate that piece's polynomial at x:
//   act_replay_forward:    y (+)= f_{piece(x0)}(x)
//   act_replay_r_forward:  ẏ = f'_{piece(x0)}(x)·ẋ   (act_replay_backward: gx (+)=)
//   act_replay_r_backward: R(gx) (+)= f'_{piece(x0)}(x)·R(gy) + f''_{piece(x0)}·ẋ·gy
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
const RELU6: u32 = 6u;
const HARDSWISH: u32 = 7u;
const HARDSIGMOID: u32 = 8u;
const GELU_TANH: u32 = 9u;

const WG: u32 = 256u;
const LOG2E: f32 = 1.4426950408889634;
// ln 2 = LN2_HI + LN2_LO with LN2_HI of 16 significant bits, so n·LN2_HI
// is exact for |n| < 256.
const LN2_HI: f32 = 0.693145751953125;
const LN2_LO: f32 = 1.4286068203094173e-6;
const INV_SQRT2: f32 = 0.7071067811865476;
const INV_SQRT_2PI: f32 = 0.3989422804014327;
const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_TANH_A: f32 = 0.044715;

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

// The piece of a three-piece activation x lies on: 0u at or below the
// lower kink, 1u strictly between the kinks, 2u at or above the upper one.
fn piece(x: f32) -> u32 {
    let lo = select(-3.0, 0.0, ACT == RELU6);
    let hi = select(3.0, 6.0, ACT == RELU6);
    return select(select(0u, 2u, x >= hi), 1u, x > lo && x < hi);
}

// Piece q's f at x; a NaN passes unchanged (tested by its bits).
fn f_on(q: u32, x: f32) -> f32 {
    var v = 0.0;
    switch ACT {
        case RELU6: { v = select(select(0.0, x, q == 1u), 6.0, q == 2u); }
        case HARDSWISH: { v = select(select(0.0, x * (x + 3.0) / 6.0, q == 1u), x, q == 2u); }
        default: { v = select(select(0.0, (x + 3.0) / 6.0, q == 1u), 1.0, q == 2u); }
    }
    let nan = (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
    return select(v, x, nan);
}

// Piece q's f' at x.
fn df_on(q: u32, x: f32) -> f32 {
    switch ACT {
        case RELU6: { return select(0.0, 1.0, q == 1u); }
        case HARDSWISH: {
            return select(select(0.0, (2.0 * x + 3.0) / 6.0, q == 1u), 1.0, q == 2u);
        }
        default: { return select(0.0, 1.0 / 6.0, q == 1u); }
    }
}

// Piece q's f'': 1/3 on Hardswish's middle piece, else 0.
fn d2f_on(q: u32) -> f32 {
    return select(0.0, 1.0 / 3.0, ACT == HARDSWISH && q == 1u);
}

// GELU-tanh's inner u = √(2/π)·x·(1 + 0.044715x²) and its derivatives
// u' = √(2/π)(1 + 3·0.044715x²), u'' = √(2/π)·6·0.044715x. Each is a few
// ulp of its value; e^{±2u} then errs by 2|u| times that relative
// rounding (the tails, where the terms below are tiny: see
// tests/gpu_seq.rs). x² overflows to +inf past |x| ≈ 1.8e19, where u = ±inf
// gives σ(2u) = 0 or 1 and sech²(u) = 0 exactly (exp_dd(-inf) = 0).
fn gelu_tanh_u(x: f32) -> vec3<f32> {
    let x2 = x * x;
    return vec3<f32>(
        SQRT_2_OVER_PI * x * (1.0 + GELU_TANH_A * x2),
        SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_A * x2),
        SQRT_2_OVER_PI * 6.0 * GELU_TANH_A * x,
    );
}

// GELU-tanh' = σ(2u) + x/2·sech²(u)·u' (σ(2u) = (1 + tanh u)/2); the
// second term is 0 where sech²(u) underflows (x·u' may be infinite there).
fn gelu_tanh_d(x: f32) -> f32 {
    let u = gelu_tanh_u(x);
    let s2 = tanh_d(u.x);
    return sigmoid(2.0 * u.x) + select(0.5 * x * s2 * u.y, 0.0, s2 == 0.0);
}

// GELU-tanh'' = sech²(u)·(u' + x/2·(u'' - 2·tanh(u)·u'²)); 0 where sech²(u)
// underflows.
fn gelu_tanh_d2(x: f32) -> f32 {
    let u = gelu_tanh_u(x);
    let s2 = tanh_d(u.x);
    let v = s2 * (u.y + 0.5 * x * (u.z - 2.0 * tanh_(u.x) * u.y * u.y));
    return select(v, 0.0, s2 == 0.0);
}

// Whether f'' is non-zero somewhere (the R-backward's curvature term).
fn curved() -> bool {
    return ACT == TANH || ACT == SIGMOID || ACT == GELU || ACT == SILU || ACT == HARDSWISH
        || ACT == GELU_TANH;
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
        // x·σ(2u): no cancellation where x ≪ 0 (1 + tanh u would).
        case GELU_TANH: { return x * sigmoid(2.0 * gelu_tanh_u(x).x); }
        case RELU6, HARDSWISH, HARDSIGMOID: { return f_on(piece(x), x); }
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
        case RELU6, HARDSWISH, HARDSIGMOID: { return df_on(piece(x), x); }
        case GELU_TANH: { return gelu_tanh_d(x); }
        default: {
            // σ(x) + x·σ'(x) = σ(x)·(1 + x·σ(-x)).
            return sigmoid(x) * (1.0 + x * sigmoid(-x));
        }
    }
}

// f''; 0 for ReLU, LeakyReLU, ReLU6 and Hardsigmoid (act_r_backward never
// calls it for them).
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
        case HARDSWISH: { return d2f_on(piece(x)); }
        case GELU_TANH: { return gelu_tanh_d2(x); }
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
    // The curvature term exists only for the curved activations.
    if (curved()) {
        v += d2f(x) * r_dx[o_dx + i] * r_gy[o_gy + i];
    }
    if (ACC) {
        v += r_out[o_out + i];
    }
    r_out[o_out + i] = v;
}

// ---- Three-piece activations replaying frozen decisions: the piece of
// each element from the recorded x0, the value from x.
@group(0) @binding(1) var<storage, read> q_x0: array<f32>;
@group(0) @binding(2) var<storage, read> q_x: array<f32>;
@group(0) @binding(3) var<storage, read_write> q_y: array<f32>;

@compute @workgroup_size(256)
fn act_replay_forward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    var v = f_on(piece(q_x0[i]), q_x[i]);
    if (ACC) {
        v += q_y[i];
    }
    q_y[i] = v;
}

@group(0) @binding(1) var<storage, read> qd_x0: array<f32>;
@group(0) @binding(2) var<storage, read> qd_x: array<f32>;
@group(0) @binding(3) var<storage, read> qd_g: array<f32>;
@group(0) @binding(4) var<storage, read_write> qd_out: array<f32>;

// out (+)= f'_{piece(x0)}(x)·g, with tangent k's slices (x0 and x shared).
fn replay_derivative_times(i: u32, k: u32) {
    let o_x0 = kslice(1u, arrayLength(&qd_x0), k);
    let o_x = kslice(2u, arrayLength(&qd_x), k);
    let o_g = kslice(3u, arrayLength(&qd_g), k);
    let o_out = kslice(4u, arrayLength(&qd_out), k);
    var v = df_on(piece(qd_x0[o_x0 + i]), qd_x[o_x + i]) * qd_g[o_g + i];
    if (ACC) {
        v += qd_out[o_out + i];
    }
    qd_out[o_out + i] = v;
}

@compute @workgroup_size(256)
fn act_replay_r_forward(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    replay_derivative_times(i, wid.z);
}

@compute @workgroup_size(256)
fn act_replay_backward(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    replay_derivative_times(i, wid.z);
}

@group(0) @binding(1) var<storage, read> qr_x0: array<f32>;
@group(0) @binding(2) var<storage, read> qr_x: array<f32>;
@group(0) @binding(3) var<storage, read> qr_dx: array<f32>;
@group(0) @binding(4) var<storage, read> qr_gy: array<f32>;
@group(0) @binding(5) var<storage, read> qr_rgy: array<f32>;
@group(0) @binding(6) var<storage, read_write> qr_out: array<f32>;

@compute @workgroup_size(256)
fn act_replay_r_backward(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    let k = wid.z;
    let o_x0 = kslice(1u, arrayLength(&qr_x0), k);
    let o_x = kslice(2u, arrayLength(&qr_x), k);
    let o_dx = kslice(3u, arrayLength(&qr_dx), k);
    let o_gy = kslice(4u, arrayLength(&qr_gy), k);
    let o_rgy = kslice(5u, arrayLength(&qr_rgy), k);
    let o_out = kslice(6u, arrayLength(&qr_out), k);
    let q = piece(qr_x0[o_x0 + i]);
    let x = qr_x[o_x + i];
    var v = df_on(q, x) * qr_rgy[o_rgy + i] + d2f_on(q) * qr_dx[o_dx + i] * qr_gy[o_gy + i];
    if (ACC) {
        v += qr_out[o_out + i];
    }
    qr_out[o_out + i] = v;
}

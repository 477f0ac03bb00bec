// Max pooling (argmax kept for the gather/scatter passes) and global
// average pooling over planes of [n·c, h, w].

struct PoolParams {
    planes: u32, h: u32, w: u32, k: u32,
    stride: u32, pad: u32, oh: u32, ow: u32,
    _p0: u32, _p1: u32, _p2: u32, _p3: u32,
}

const WG: u32 = 256u;
// Backward passes: add into the output instead of overwriting it.
override ACC: bool = false;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: PoolParams;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// The outputs o (along one axis, `n` of them) whose windows cover input
// position t + pad (`tp`): o·s ≤ tp ≤ o·s + k − 1, as the half-open range
// [⌈(tp − k + 1)/s⌉ clipped at 0, ⌊tp/s⌋ + 1 clipped at n), in unsigned
// arithmetic (no signed division on any back end).
fn covering(tp: u32, n: u32) -> vec2<u32> {
    return vec2<u32>((max(tp + p.stride, p.k) - p.k) / p.stride, min(tp / p.stride + 1u, n));
}

// ---- max pool forward: the first maximum in row-major window order, as
// PyTorch picks it; padding never wins; a NaN wins as in PyTorch.
@group(0) @binding(1) var<storage, read> mp_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> mp_y: array<f32>;
@group(0) @binding(3) var<storage, read_write> mp_arg: array<u32>;

@compute @workgroup_size(256)
fn maxpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let o = flat_index(wid, nwg, lid);
    let plane_out = p.oh * p.ow;
    if (o >= p.planes * plane_out) { return; }
    let pl = o / plane_out;
    let oy = (o % plane_out) / p.ow;
    let ox = o % p.ow;
    let base = pl * p.h * p.w;
    var best = 0.0;
    var arg = NONE;
    for (var ky = 0u; ky < p.k; ky++) {
        let iy = i32(oy * p.stride + ky) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        for (var kx = 0u; kx < p.k; kx++) {
            let ix = i32(ox * p.stride + kx) - i32(p.pad);
            if (ix < 0 || ix >= i32(p.w)) { continue; }
            let idx = u32(iy) * p.w + u32(ix);
            let v = mp_x[base + idx];
            let v_nan = v != v;
            let best_nan = best != best;
            if (arg == NONE || v > best || (v_nan && !best_nan)) {
                best = v;
                arg = idx;
            }
        }
    }
    mp_y[o] = best;
    mp_arg[o] = arg;
}

// ---- gather through the argmax (R-forward).
@group(0) @binding(1) var<storage, read> g_x: array<f32>;
@group(0) @binding(2) var<storage, read> g_arg: array<u32>;
@group(0) @binding(3) var<storage, read_write> g_y: array<f32>;

@compute @workgroup_size(256)
fn maxpool_gather(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let o = flat_index(wid, nwg, lid);
    let plane_out = p.oh * p.ow;
    if (o >= p.planes * plane_out) { return; }
    // Tangent slices (tangents.wgsl); the argmax is shared.
    let o_x = kslice(1u, arrayLength(&g_x), wid.z);
    let o_y = kslice(3u, arrayLength(&g_y), wid.z);
    g_y[o_y + o] = g_x[o_x + (o / plane_out) * p.h * p.w + g_arg[o]];
}

// ---- backward: each input sums the outputs whose argmax it is. Written
// as a gather over the (at most ⌈k/s⌉²) windows covering the input, so
// overlapping windows need no float atomics.
@group(0) @binding(1) var<storage, read> s_gy: array<f32>;
@group(0) @binding(2) var<storage, read> s_arg: array<u32>;
@group(0) @binding(3) var<storage, read_write> s_gx: array<f32>;

@compute @workgroup_size(256)
fn maxpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let plane_in = p.h * p.w;
    if (i >= p.planes * plane_in) { return; }
    // Tangent slices (tangents.wgsl); the argmax is shared.
    let o_gy = kslice(1u, arrayLength(&s_gy), wid.z);
    let o_gx = kslice(3u, arrayLength(&s_gx), wid.z);
    let pl = i / plane_in;
    let idx = i % plane_in;
    let oys = covering(idx / p.w + p.pad, p.oh);
    let oxs = covering(idx % p.w + p.pad, p.ow);
    var acc = 0.0;
    for (var oy = oys.x; oy < oys.y; oy++) {
        for (var ox = oxs.x; ox < oxs.y; ox++) {
            let o = (pl * p.oh + oy) * p.ow + ox;
            if (s_arg[o] == idx) {
                acc += s_gy[o_gy + o];
            }
        }
    }
    if (ACC) {
        acc += s_gx[o_gx + i];
    }
    s_gx[o_gx + i] = acc;
}

// ---- average pool, count_include_pad as PyTorch's default: every window
// divides by its element count inside the padded input, padding included
// (k·k, except for windows that ceil_mode lets run past the padded edge);
// with ACC the backward adds into gx.

@group(0) @binding(1) var<storage, read> av_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> av_out: array<f32>;

// The divisor of output (oy, ox): (min(y0 + k, h + 2·pad) − y0) times the
// same along x, y0 = oy·s in padded coordinates (PyTorch's pool_size).
fn avg_divisor(oy: u32, ox: u32) -> f32 {
    let y0 = oy * p.stride;
    let x0 = ox * p.stride;
    let dy = min(y0 + p.k, p.h + 2u * p.pad) - y0;
    let dx = min(x0 + p.k, p.w + 2u * p.pad) - x0;
    return f32(dy * dx);
}

// Forward, a thread per output: y = Σ over the window's inputs inside the
// image / k². Rows iy = oy·s − pad + t, t < k, clipped to [0, h), in
// unsigned arithmetic (index = position + pad).
@compute @workgroup_size(256)
fn avgpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let o = flat_index(wid, nwg, lid);
    let plane_out = p.oh * p.ow;
    if (o >= p.planes * plane_out) { return; }
    // Tangent slices (tangents.wgsl).
    let o_in = kslice(1u, arrayLength(&av_in), wid.z);
    let o_out = kslice(2u, arrayLength(&av_out), wid.z);
    let pl = o / plane_out;
    let oy = (o % plane_out) / p.ow;
    let ox = o % p.ow;
    let y0 = oy * p.stride;
    let x0 = ox * p.stride;
    let ya = max(y0, p.pad) - p.pad;
    let yb = max(min(y0 + p.k, p.h + p.pad), p.pad) - p.pad;
    let xa = max(x0, p.pad) - p.pad;
    let xb = max(min(x0 + p.k, p.w + p.pad), p.pad) - p.pad;
    var acc = 0.0;
    for (var iy = ya; iy < yb; iy++) {
        let row = o_in + (pl * p.h + iy) * p.w;
        for (var ix = xa; ix < xb; ix++) {
            acc += av_in[row + ix];
        }
    }
    av_out[o_out + o] = acc / avg_divisor(oy, ox);
}

// Backward (the transpose), a thread per input, gathering from the
// outputs whose windows cover it — oy with oy·s ≤ iy + pad ≤ oy·s + k − 1
// (at most ⌈k/s⌉² of them) — so overlapping windows need no atomics.
@compute @workgroup_size(256)
fn avgpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let plane_in = p.h * p.w;
    if (i >= p.planes * plane_in) { return; }
    // Tangent slices (tangents.wgsl).
    let o_in = kslice(1u, arrayLength(&av_in), wid.z);
    let o_out = kslice(2u, arrayLength(&av_out), wid.z);
    let pl = i / plane_in;
    let oys = covering((i % plane_in) / p.w + p.pad, p.oh);
    let oxs = covering(i % p.w + p.pad, p.ow);
    var acc = 0.0;
    for (var oy = oys.x; oy < oys.y; oy++) {
        let row = o_in + (pl * p.oh + oy) * p.ow;
        for (var ox = oxs.x; ox < oxs.y; ox++) {
            acc += av_in[row + ox] / avg_divisor(oy, ox);
        }
    }
    if (ACC) {
        acc += av_out[o_out + i];
    }
    av_out[o_out + i] = acc;
}

// ---- global average pool: y[plane] = mean of the plane (h·w = 64 or fewer
// terms in the reference models, so one serial sum per plane).
@group(0) @binding(1) var<storage, read> ga_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ga_y: array<f32>;

@compute @workgroup_size(256)
fn gap_forward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let pl = flat_index(wid, nwg, lid);
    if (pl >= p.planes) { return; }
    // Tangent slices (tangents.wgsl).
    let o_x = kslice(1u, arrayLength(&ga_x), wid.z);
    let o_y = kslice(2u, arrayLength(&ga_y), wid.z);
    let hw = p.h * p.w;
    var s = 0.0;
    for (var j = 0u; j < hw; j++) {
        s += ga_x[o_x + pl * hw + j];
    }
    ga_y[o_y + pl] = s / f32(hw);
}

@compute @workgroup_size(256)
fn gap_backward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let hw = p.h * p.w;
    if (i >= p.planes * hw) { return; }
    let o_x = kslice(1u, arrayLength(&ga_x), wid.z);
    let o_y = kslice(2u, arrayLength(&ga_y), wid.z);
    var g = ga_x[o_x + i / hw] / f32(hw);
    if (ACC) {
        g += ga_y[o_y + i];
    }
    ga_y[o_y + i] = g;
}

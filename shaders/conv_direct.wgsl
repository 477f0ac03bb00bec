// Direct convolution for the layers the register-blocked (conv.wgsl,
// conv_weight.wgsl) and tiled (conv_tiled.wgsl) kernels do not compute:
// grouped (groups > 1, depthwise included) and dilated ones. The conv unit
// (src/layers/conv.rs) routes every such layer here on either conv path.
// One thread per output element (forward), per input element (backward
// data) and per (chunk of output rows, weight) (the weight gradient's
// stage one; conv_weight_sum in conv_weight.wgsl adds the chunks), each
// looping over its group's channels only: a depthwise layer's thread sums
// its k·k taps, never the other channels.
//
// Bindings, parameters and the override constants PAIR_B, BIAS and ACC
// mean what they mean in conv.wgsl (forward, backward data) and
// conv_weight.wgsl (weight gradient), on the same buffers; the weights are
// read from storage (θ or v at an offset). Layouts are PyTorch's:
// activations [n, c, h, w], weights [cout, cin/groups, k, k]; output
// channel co reads input channels g·cin/groups .. (g+1)·cin/groups,
// g = co / (cout/groups). Block products: every binding is read at
// tangent wid.z's slice where KB marks it (tangents.wgsl).

struct ConvParams {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, k: u32, stride: u32, pad: u32,
    oh: u32, ow: u32, wa_off: u32, wb_off: u32,
    bias_off: u32, rows_per_chunk: u32, chunks: u32, groups: u32,
}

override PAIR_B: bool = false;
override BIAS: bool = false;
override ACC: bool = false;
// The dilation (taps DIL apart): a pipeline constant, as ConvParams's 16
// words are all taken.
override DIL: u32 = 1u;
// Weights stored transposed, [cin, cout] (k = 1, groups = 1 only):
// Hugging Face's Conv1D run as a 1×1 conv over samples · tokens rows.
override WT: bool = false;
// The reduction's channels of the group [RED0, min(RED1, all)), as in
// conv.wgsl: the whole by default, a chunk per dispatch on CPU emulators.
override RED0: u32 = 0u;
override RED1: u32 = 4294967295u;

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> xa: array<f32>;
@group(0) @binding(2) var<storage, read> wa: array<f32>;
@group(0) @binding(3) var<storage, read> xb: array<f32>;
@group(0) @binding(4) var<storage, read> wb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<private> ko_xa: u32;
var<private> ko_wa: u32;
var<private> ko_xb: u32;
var<private> ko_wb: u32;
var<private> ko_out: u32;

fn slices(k: u32) {
    ko_xa = kslice(1u, arrayLength(&xa), k);
    ko_wa = kslice(2u, arrayLength(&wa), k);
    ko_xb = kslice(3u, arrayLength(&xb), k);
    ko_wb = kslice(4u, arrayLength(&wb), k);
    ko_out = kslice(5u, arrayLength(&out), k);
}

// Element i of this tangent's slice of each binding.
fn at_xa(i: u32) -> f32 {
    return xa[min(ko_xa + i, arrayLength(&xa) - 1u)];
}
fn at_wa(i: u32) -> f32 {
    return wa[min(ko_wa + i, arrayLength(&wa) - 1u)];
}
fn at_xb(i: u32) -> f32 {
    return xb[min(ko_xb + i, arrayLength(&xb) - 1u)];
}
fn at_wb(i: u32) -> f32 {
    return wb[min(ko_wb + i, arrayLength(&wb) - 1u)];
}

// The groups (1 where a host left the field 0).
fn groups() -> u32 {
    return max(p.groups, 1u);
}

// Grids wider than 65,535 workgroups fold into y.
fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// Index of weight (co, c, tap) of a group of cig input channels in the
// layer's layout: [cout, cig, k, k], or [cin, cout] with WT.
fn widx(co: u32, c: u32, cig: u32, kk: u32, tap: u32) -> u32 {
    if (WT) {
        return c * p.cout + co;
    }
    return (co * cig + c) * kk + tap;
}

// Writes v (+ what is there, with ACC) at element i of this tangent's
// slice of `out`.
fn store(i: u32, v: f32) {
    let o = ko_out + i;
    var r = v;
    if (ACC) {
        r += out[o];
    }
    out[o] = r;
}

// y[n, co, oy, ox] = Σ_{c, ky, kx} W[co, c, ky, kx] ·
//   x[n, g·cin/groups + c, oy·s + ky·DIL − pad, ox·s + kx·DIL − pad]
// (+ the second pair, + bias from `wb` at bias_off). A thread per output.
@compute @workgroup_size(256)
fn conv_direct_forward(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    slices(wid.z);
    let o = flat_index(wid, nwg, lid);
    let plane = p.oh * p.ow;
    if (o >= p.n * p.cout * plane) { return; }
    let ox = o % p.ow;
    let oy = (o / p.ow) % p.oh;
    let co = (o / plane) % p.cout;
    let n = o / (plane * p.cout);
    let cig = p.cin / groups();
    let ci0 = (co / (p.cout / groups())) * cig;
    let kk = p.k * p.k;
    var acc = 0.0;
    for (var c = RED0; c < min(cig, RED1); c++) {
        let xbase = (n * p.cin + ci0 + c) * p.h * p.w;
        for (var ky = 0u; ky < p.k; ky++) {
            let iy = i32(oy * p.stride + ky * DIL) - i32(p.pad);
            if (iy < 0 || iy >= i32(p.h)) { continue; }
            for (var kx = 0u; kx < p.k; kx++) {
                let ix = i32(ox * p.stride + kx * DIL) - i32(p.pad);
                if (ix < 0 || ix >= i32(p.w)) { continue; }
                let xi = xbase + u32(iy) * p.w + u32(ix);
                let wi = widx(co, c, cig, kk, ky * p.k + kx);
                acc += at_wa(p.wa_off + wi) * at_xa(xi);
                if (PAIR_B) {
                    acc += at_wb(p.wb_off + wi) * at_xb(xi);
                }
            }
        }
    }
    if (BIAS) {
        acc += at_wb(p.bias_off + co);
    }
    store(o, acc);
}

// gx[n, ci, iy, ix] = Σ W[co, ci mod cin/groups, ky, kx] · gy[n, co, oy, ox]
// over the output channels co of ci's group and the taps with
// oy·s = iy + pad − ky·DIL, ox·s = ix + pad − kx·DIL inside the output
// (+ the second pair). A thread per input element.
@compute @workgroup_size(256)
fn conv_direct_backward_data(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    slices(wid.z);
    let i = flat_index(wid, nwg, lid);
    let plane = p.h * p.w;
    if (i >= p.n * p.cin * plane) { return; }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let ci = (i / plane) % p.cin;
    let n = i / (plane * p.cin);
    let cig = p.cin / groups();
    let cog = p.cout / groups();
    let co0 = (ci / cig) * cog;
    let cl = ci % cig;
    let kk = p.k * p.k;
    var acc = 0.0;
    for (var ky = 0u; ky < p.k; ky++) {
        let ty = i32(iy + p.pad) - i32(ky * DIL);
        // ty only falls as ky grows.
        if (ty < 0) { break; }
        let oy = u32(ty) / p.stride;
        if (oy * p.stride != u32(ty) || oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.k; kx++) {
            let tx = i32(ix + p.pad) - i32(kx * DIL);
            if (tx < 0) { break; }
            let ox = u32(tx) / p.stride;
            if (ox * p.stride != u32(tx) || ox >= p.ow) { continue; }
            let tap = ky * p.k + kx;
            for (var c = RED0; c < min(cog, RED1); c++) {
                let co = co0 + c;
                let gi = ((n * p.cout + co) * p.oh + oy) * p.ow + ox;
                let wi = widx(co, cl, cig, kk, tap);
                acc += at_wa(p.wa_off + wi) * at_xa(gi);
                if (PAIR_B) {
                    acc += at_wb(p.wb_off + wi) * at_xb(gi);
                }
            }
        }
    }
    store(i, acc);
}

// The weight gradient's stage one, as conv_backward_weight
// (conv_weight.wgsl): out[chunk · W + w] = Σ over the chunk's output rows
// (n, oy) and columns ox of xa[n, co, oy, ox] · wa[n, ci, iy, ix]
// (+ xb · wb), W = cout·(cin/groups)·k·k; here `xa`/`xb` are adjoints,
// `wa`/`wb` the layer inputs, `out` the partials buffer. A thread per
// (chunk, weight).
@compute @workgroup_size(256)
fn conv_direct_backward_weight(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    slices(wid.z);
    let idx = flat_index(wid, nwg, lid);
    let cig = p.cin / groups();
    let kk = p.k * p.k;
    let nw = p.cout * cig * kk;
    if (idx >= nw * p.chunks) { return; }
    let wi = idx % nw;
    let chunk = idx / nw;
    var kx = wi % p.k;
    var ky = (wi / p.k) % p.k;
    var cl = (wi / kk) % cig;
    var co = wi / (kk * cig);
    if (WT) {
        // wi = cl · cout + co (k = 1).
        kx = 0u;
        ky = 0u;
        co = wi % p.cout;
        cl = wi / p.cout;
    }
    let ci = (co / (p.cout / groups())) * cig + cl;
    let rows = p.n * p.oh;
    let r0 = min(chunk * p.rows_per_chunk, rows);
    let r1 = min(r0 + p.rows_per_chunk, rows);
    var acc = 0.0;
    for (var row = r0; row < r1; row++) {
        let n = row / p.oh;
        let oy = row % p.oh;
        let iy = i32(oy * p.stride + ky * DIL) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        let grow = ((n * p.cout + co) * p.oh + oy) * p.ow;
        let xrow = ((n * p.cin + ci) * p.h + u32(iy)) * p.w;
        for (var ox = 0u; ox < p.ow; ox++) {
            let ix = i32(ox * p.stride + kx * DIL) - i32(p.pad);
            if (ix < 0 || ix >= i32(p.w)) { continue; }
            acc += at_xa(grow + ox) * at_wa(xrow + u32(ix));
            if (PAIR_B) {
                acc += at_xb(grow + ox) * at_wb(xrow + u32(ix));
            }
        }
    }
    out[ko_out + chunk * nw + wi] = acc;
}

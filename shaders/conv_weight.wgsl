// Convolution (and linear) weight gradients: Σ over the batch and the
// output positions of adjoint × input, for every weight, with an optional
// second (adjoint, input) pair so that the R-operator's two terms,
// Σ R(gy)·x + Σ gy·ẋ, run in one dispatch.
//
// Layouts are PyTorch's: activations [n, c, h, w], weights [cout, cin, k, k].

struct ConvParams {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, k: u32, stride: u32, pad: u32,
    oh: u32, ow: u32, wa_off: u32, wb_off: u32,
    // rows_per_chunk, chunks: how stage one splits the n·oh output rows;
    // groups: conv_weight_sum's weights are [cout, cin/groups, k, k]
    // (the other kernels here compute dense layers only).
    bias_off: u32, rows_per_chunk: u32, chunks: u32, groups: u32,
}

const WG: u32 = 256u;
// The second (adjoint, input) pair is present.
override PAIR_B: bool = false;
const COLS: vec4<u32> = vec4<u32>(0u, 1u, 2u, 3u);

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> xa: array<f32>;
@group(0) @binding(2) var<storage, read> wa: array<f32>;
@group(0) @binding(3) var<storage, read> xb: array<f32>;
@group(0) @binding(4) var<storage, read> wb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// The adjoints as vec4s, for conv_backward_weight_k3s1 only (an entry point
// binds one view or the other).
@group(0) @binding(1) var<storage, read> xa4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> xb4: array<vec4<f32>>;

// Tangent k's slices (tangents.wgsl) of the inputs `wa`/`wb`, read by
// tap_input; each entry point sets them (and those of the bindings only it
// reads) before anything else.
var<private> ko_wa: u32;
var<private> ko_wb: u32;

// Grids wider than 65,535 workgroups fold into y.
fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// The weight gradient in two stages, with no barriers (software
// rasterisers pay per barrier and per workgroup, GPUs idle threads when a
// tree has little to sum): stage one gives every (chunk of output rows,
// weight) pair a partial sum of the chunk's products, stage two adds the
// chunks of each weight. No serial chain is longer than ~256 + chunks
// terms. ConvParams' rows_per_chunk and chunks carry the rows per chunk and the number
// of chunks.
//
// Stage one: a thread per (chunk, block of 4 output channels, ci, ky)
// sums the products of its rows for the k taps kx, up to 7 taps per pass
// over the rows (any k): each loaded input feeds 4 products, each loaded
// adjoint min(k, 7). Accumulators are named, not indexed:
// llvmpipe does not unroll loops, and a dynamically indexed private array
// costs it far more than the products.
const WCB: u32 = 4u;

// wa[xrow + ix] where 0 ≤ ix < w and the row is inside the image, else 0.
fn tap_input(xrow: u32, ix: i32, row_ok: bool) -> f32 {
    let ok = row_ok && ix >= 0 && ix < i32(p.w);
    return select(0.0, wa[min(ko_wa + xrow + u32(clamp(ix, 0, i32(p.w) - 1)), arrayLength(&wa) - 1u)], ok);
}
fn tap_input_b(xrow: u32, ix: i32, row_ok: bool) -> f32 {
    let ok = row_ok && ix >= 0 && ix < i32(p.w);
    return select(0.0, wb[min(ko_wb + xrow + u32(clamp(ix, 0, i32(p.w) - 1)), arrayLength(&wb) - 1u)], ok);
}

// out[chunk · W + w] = Σ over the chunk's rows (n, oy) and columns ox of
// xa[n, co, oy, ox] · wa[n, ci, iy, ix] (+ xb · wb): here `xa`/`xb` are
// adjoints, `wa`/`wb` the layer inputs, `out` the partials buffer.
@compute @workgroup_size(256)
fn conv_backward_weight(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    ko_wa = kslice(2u, arrayLength(&wa), wid.z);
    ko_wb = kslice(4u, arrayLength(&wb), wid.z);
    let ko_xa = kslice(1u, arrayLength(&xa), wid.z);
    let ko_xb = kslice(3u, arrayLength(&xb), wid.z);
    let ko_out = kslice(5u, arrayLength(&out), wid.z);
    let idx = flat_index(wid, nwg, lid);
    let cblocks = (p.cout + WCB - 1u) / WCB;
    let nrows_w = cblocks * p.cin * p.k;
    if (idx >= nrows_w * p.chunks) { return; }
    let wr = idx % nrows_w;
    let chunk = idx / nrows_w;
    let ky = wr % p.k;
    let ci = (wr / p.k) % p.cin;
    let co0 = (wr / (p.k * p.cin)) * WCB;
    let rows = p.n * p.oh;
    let r0 = chunk * p.rows_per_chunk;
    let r1 = min(r0 + p.rows_per_chunk, rows);
    let plane = p.oh * p.ow;
    let glast = arrayLength(&xa) - 1u;
    let glast_b = arrayLength(&xb) - 1u;
    // Adjoint offsets of channels co0.. co0+3 (clamped past the last
    // channel; those sums are never stored).
    let coff = (min(vec4<u32>(co0) + COLS, vec4<u32>(p.cout - 1u)) - vec4<u32>(co0)) * plane;
    let kk = p.k * p.k;
    let nw = p.cout * p.cin * kk;
    // Taps kx0 .. kx0 + 6 per pass over the rows, in seven named
    // accumulators: one pass for k <= 7, ⌈k/7⌉ for larger k (each extra
    // pass reads the adjoints again).
    for (var kx0 = 0u; kx0 < p.k; kx0 += 7u) {
        let taps = min(p.k - kx0, 7u);
        var acc0 = vec4<f32>(0.0);
        var acc1 = vec4<f32>(0.0);
        var acc2 = vec4<f32>(0.0);
        var acc3 = vec4<f32>(0.0);
        var acc4 = vec4<f32>(0.0);
        var acc5 = vec4<f32>(0.0);
        var acc6 = vec4<f32>(0.0);
        for (var row = r0; row < r1; row++) {
            let n = row / p.oh;
            let oy = row % p.oh;
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            let row_ok = iy >= 0 && iy < i32(p.h);
            let grow = (n * p.cout + co0) * plane + oy * p.ow;
            let xrow = ((n * p.cin + ci) * p.h + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
            for (var ox = 0u; ox < p.ow; ox++) {
                let gi = min(vec4<u32>(ko_xa + grow + ox) + coff, vec4<u32>(glast));
                let g = vec4<f32>(xa[gi.x], xa[gi.y], xa[gi.z], xa[gi.w]);
                // Input column of tap kx0 + t: ix0 + t.
                let ix0 = i32(ox * p.stride + kx0) - i32(p.pad);
                acc0 += g * tap_input(xrow, ix0 + 0, row_ok);
                if (taps > 1u) {
                    acc1 += g * tap_input(xrow, ix0 + 1, row_ok);
                    acc2 += g * tap_input(xrow, ix0 + 2, row_ok);
                }
                if (taps > 3u) {
                    acc3 += g * tap_input(xrow, ix0 + 3, row_ok);
                    acc4 += g * tap_input(xrow, ix0 + 4, row_ok);
                }
                if (taps > 5u) {
                    acc5 += g * tap_input(xrow, ix0 + 5, row_ok);
                    acc6 += g * tap_input(xrow, ix0 + 6, row_ok);
                }
                if (PAIR_B) {
                    let gb = min(vec4<u32>(ko_xb + grow + ox) + coff, vec4<u32>(glast_b));
                    let g2 = vec4<f32>(xb[gb.x], xb[gb.y], xb[gb.z], xb[gb.w]);
                    acc0 += g2 * tap_input_b(xrow, ix0 + 0, row_ok);
                    if (taps > 1u) {
                        acc1 += g2 * tap_input_b(xrow, ix0 + 1, row_ok);
                        acc2 += g2 * tap_input_b(xrow, ix0 + 2, row_ok);
                    }
                    if (taps > 3u) {
                        acc3 += g2 * tap_input_b(xrow, ix0 + 3, row_ok);
                        acc4 += g2 * tap_input_b(xrow, ix0 + 4, row_ok);
                    }
                    if (taps > 5u) {
                        acc5 += g2 * tap_input_b(xrow, ix0 + 5, row_ok);
                        acc6 += g2 * tap_input_b(xrow, ix0 + 6, row_ok);
                    }
                }
            }
        }
        var acc = array<vec4<f32>, 7>(acc0, acc1, acc2, acc3, acc4, acc5, acc6);
        for (var j = 0u; j < WCB; j++) {
            let co = co0 + j;
            if (co >= p.cout) { break; }
            let base = ko_out + chunk * nw + ((co * p.cin + ci) * p.k + ky) * p.k + kx0;
            for (var t = 0u; t < taps; t++) {
                out[base + t] = acc[t][j];
            }
        }
    }
}

// out[wa_off + w] += Σ_chunk parts[chunk · W + w].
@group(0) @binding(1) var<storage, read> sum_parts: array<f32>;
@group(0) @binding(2) var<storage, read_write> sum_out: array<f32>;

@compute @workgroup_size(256)
fn conv_weight_sum(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let ko_parts = kslice(1u, arrayLength(&sum_parts), wid.z);
    let ko_sum = kslice(2u, arrayLength(&sum_out), wid.z);
    let wi = flat_index(wid, nwg, lid);
    let nw = p.cout * (p.cin / max(p.groups, 1u)) * p.k * p.k;
    if (wi >= nw) { return; }
    var s = 0.0;
    for (var c = 0u; c < p.chunks; c++) {
        s += sum_parts[ko_parts + c * nw + wi];
    }
    sum_out[ko_sum + p.wa_off + wi] += s;
}

// The weight gradient's first stage (as conv_backward_weight) for the most
// common layer: 3×3 taps, stride 1, rows of a multiple of 4 columns. A
// thread steps 4 output columns at a time: the 4 channels' adjoints come in
// as one vec4 load each (llvmpipe, which CI runs, loads a vec4 for about
// the price of two floats), and the 6 inputs under the 4 columns' taps are
// loaded once and shared by the 3 taps (a sliding window), so 4 columns
// cost 4 vec4 + 6 scalar loads instead of 16 + 12.

// Σ over 4 columns of adjoints g (one vec4 per channel) times inputs r.
fn dots(g0: vec4<f32>, g1: vec4<f32>, g2: vec4<f32>, g3: vec4<f32>, r: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(g0, r), dot(g1, r), dot(g2, r), dot(g3, r));
}

// As conv_backward_weight: out[chunk · W + w] = Σ over the chunk's rows of
// xa[n, co, oy, ox] · wa[n, ci, oy + ky − pad, ox + kx − pad] (+ xb · wb).
@compute @workgroup_size(256)
fn conv_backward_weight_k3s1(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    ko_wa = kslice(2u, arrayLength(&wa), wid.z);
    ko_wb = kslice(4u, arrayLength(&wb), wid.z);
    // In vec4s: a slice of the adjoints is a whole number of them (rows of
    // a multiple of 4 columns).
    let ko_xa = kslice(1u, arrayLength(&xa4), wid.z);
    let ko_xb = kslice(3u, arrayLength(&xb4), wid.z);
    let ko_out = kslice(5u, arrayLength(&out), wid.z);
    let idx = flat_index(wid, nwg, lid);
    let cblocks = (p.cout + WCB - 1u) / WCB;
    let nrows_w = cblocks * p.cin * 3u;
    if (idx >= nrows_w * p.chunks) { return; }
    let wr = idx % nrows_w;
    let chunk = idx / nrows_w;
    let ky = wr % 3u;
    let ci = (wr / 3u) % p.cin;
    let co0 = (wr / (3u * p.cin)) * WCB;
    let rows = p.n * p.oh;
    let r0 = chunk * p.rows_per_chunk;
    let r1 = min(r0 + p.rows_per_chunk, rows);
    let plane4 = p.oh * p.ow / 4u;
    let ow4 = p.ow / 4u;
    let glast = arrayLength(&xa4) - 1u;
    let glast_b = arrayLength(&xb4) - 1u;
    // Channels co0..co0+3, clamped past the last (never stored).
    let cos = min(vec4<u32>(co0) + COLS, vec4<u32>(p.cout - 1u));
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    for (var row = r0; row < r1; row++) {
        let n = row / p.oh;
        let oy = row % p.oh;
        let iy = i32(oy + ky) - i32(p.pad);
        let row_ok = iy >= 0 && iy < i32(p.h);
        let xrow = ((n * p.cin + ci) * p.h + u32(clamp(iy, 0, i32(p.h) - 1))) * p.w;
        let grow = (vec4<u32>(n * p.cout) + cos) * plane4 + vec4<u32>(oy * ow4);
        for (var q = 0u; q < ow4; q++) {
            let gi = min(grow + vec4<u32>(ko_xa + q), vec4<u32>(glast));
            let ga0 = xa4[gi.x];
            let ga1 = xa4[gi.y];
            let ga2 = xa4[gi.z];
            let ga3 = xa4[gi.w];
            let ix0 = i32(q * 4u) - i32(p.pad);
            let a0 = tap_input(xrow, ix0, row_ok);
            let a1 = tap_input(xrow, ix0 + 1, row_ok);
            let a2 = tap_input(xrow, ix0 + 2, row_ok);
            let a3 = tap_input(xrow, ix0 + 3, row_ok);
            let a4 = tap_input(xrow, ix0 + 4, row_ok);
            let a5 = tap_input(xrow, ix0 + 5, row_ok);
            acc0 += dots(ga0, ga1, ga2, ga3, vec4<f32>(a0, a1, a2, a3));
            acc1 += dots(ga0, ga1, ga2, ga3, vec4<f32>(a1, a2, a3, a4));
            acc2 += dots(ga0, ga1, ga2, ga3, vec4<f32>(a2, a3, a4, a5));
            if (PAIR_B) {
                let gj = min(grow + vec4<u32>(ko_xb + q), vec4<u32>(glast_b));
                let gb0 = xb4[gj.x];
                let gb1 = xb4[gj.y];
                let gb2 = xb4[gj.z];
                let gb3 = xb4[gj.w];
                let b0 = tap_input_b(xrow, ix0, row_ok);
                let b1 = tap_input_b(xrow, ix0 + 1, row_ok);
                let b2 = tap_input_b(xrow, ix0 + 2, row_ok);
                let b3 = tap_input_b(xrow, ix0 + 3, row_ok);
                let b4 = tap_input_b(xrow, ix0 + 4, row_ok);
                let b5 = tap_input_b(xrow, ix0 + 5, row_ok);
                acc0 += dots(gb0, gb1, gb2, gb3, vec4<f32>(b0, b1, b2, b3));
                acc1 += dots(gb0, gb1, gb2, gb3, vec4<f32>(b1, b2, b3, b4));
                acc2 += dots(gb0, gb1, gb2, gb3, vec4<f32>(b2, b3, b4, b5));
            }
        }
    }
    let nw = p.cout * p.cin * 9u;
    var acc = array<vec4<f32>, 3>(acc0, acc1, acc2);
    for (var j = 0u; j < WCB; j++) {
        let co = co0 + j;
        if (co >= p.cout) { break; }
        let base = ko_out + chunk * nw + ((co * p.cin + ci) * 3u + ky) * 3u;
        out[base] = acc[0][j];
        out[base + 1u] = acc[1][j];
        out[base + 2u] = acc[2][j];
    }
}

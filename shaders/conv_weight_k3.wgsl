// The weight gradient's first stage (see conv_weight.wgsl) for the most
// common layer: 3×3 taps, stride 1, rows of a multiple of 4 columns. A
// thread steps 4 output columns at a time: the 4 channels' adjoints come in
// as one vec4 load each (llvmpipe, which CI runs, loads a vec4 for about
// the price of two floats), and the 6 inputs under the 4 columns' taps are
// loaded once and shared by the 3 taps (a sliding window), so 4 columns
// cost 4 vec4 + 6 scalar loads instead of 16 + 12.

struct ConvParams {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, k: u32, stride: u32, pad: u32,
    oh: u32, ow: u32, wa_off: u32, wb_off: u32,
    // bit 1: second pair present. The last two words: rows per chunk and
    // the number of chunks.
    flags: u32, bias_off: u32, _p0: u32, _p1: u32,
}

const WG: u32 = 256u;
const PAIR_B: u32 = 2u;
const WCB: u32 = 4u;
const COLS: vec4<u32> = vec4<u32>(0u, 1u, 2u, 3u);

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> xa: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> wa: array<f32>;
@group(0) @binding(3) var<storage, read> xb: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> wb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// wa[xrow + ix] where 0 ≤ ix < w and the row is inside the image, else 0.
fn tap_input(xrow: u32, ix: i32, row_ok: bool) -> f32 {
    let ok = row_ok && ix >= 0 && ix < i32(p.w);
    return select(0.0, wa[min(xrow + u32(clamp(ix, 0, i32(p.w) - 1)), arrayLength(&wa) - 1u)], ok);
}
fn tap_input_b(xrow: u32, ix: i32, row_ok: bool, two: bool) -> f32 {
    let ok = two && row_ok && ix >= 0 && ix < i32(p.w);
    return select(0.0, wb[min(xrow + u32(clamp(ix, 0, i32(p.w) - 1)), arrayLength(&wb) - 1u)], ok);
}

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
    let idx = flat_index(wid, nwg, lid);
    let cblocks = (p.cout + WCB - 1u) / WCB;
    let nrows_w = cblocks * p.cin * 3u;
    if (idx >= nrows_w * p._p1) { return; }
    let wr = idx % nrows_w;
    let chunk = idx / nrows_w;
    let ky = wr % 3u;
    let ci = (wr / 3u) % p.cin;
    let co0 = (wr / (3u * p.cin)) * WCB;
    let two = (p.flags & PAIR_B) != 0u;
    let rows = p.n * p.oh;
    let r0 = chunk * p._p0;
    let r1 = min(r0 + p._p0, rows);
    let plane4 = p.oh * p.ow / 4u;
    let ow4 = p.ow / 4u;
    let glast = arrayLength(&xa) - 1u;
    let glast_b = arrayLength(&xb) - 1u;
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
            let gi = min(grow + vec4<u32>(q), vec4<u32>(glast));
            let ga0 = xa[gi.x];
            let ga1 = xa[gi.y];
            let ga2 = xa[gi.z];
            let ga3 = xa[gi.w];
            let gj = min(grow + vec4<u32>(q), vec4<u32>(glast_b));
            let zb = vec4<bool>(two);
            let gb0 = select(vec4<f32>(0.0), xb[gj.x], zb);
            let gb1 = select(vec4<f32>(0.0), xb[gj.y], zb);
            let gb2 = select(vec4<f32>(0.0), xb[gj.z], zb);
            let gb3 = select(vec4<f32>(0.0), xb[gj.w], zb);
            let ix0 = i32(q * 4u) - i32(p.pad);
            let a0 = tap_input(xrow, ix0, row_ok);
            let a1 = tap_input(xrow, ix0 + 1, row_ok);
            let a2 = tap_input(xrow, ix0 + 2, row_ok);
            let a3 = tap_input(xrow, ix0 + 3, row_ok);
            let a4 = tap_input(xrow, ix0 + 4, row_ok);
            let a5 = tap_input(xrow, ix0 + 5, row_ok);
            let b0 = tap_input_b(xrow, ix0, row_ok, two);
            let b1 = tap_input_b(xrow, ix0 + 1, row_ok, two);
            let b2 = tap_input_b(xrow, ix0 + 2, row_ok, two);
            let b3 = tap_input_b(xrow, ix0 + 3, row_ok, two);
            let b4 = tap_input_b(xrow, ix0 + 4, row_ok, two);
            let b5 = tap_input_b(xrow, ix0 + 5, row_ok, two);
            acc0 += dots(ga0, ga1, ga2, ga3, vec4<f32>(a0, a1, a2, a3))
                + dots(gb0, gb1, gb2, gb3, vec4<f32>(b0, b1, b2, b3));
            acc1 += dots(ga0, ga1, ga2, ga3, vec4<f32>(a1, a2, a3, a4))
                + dots(gb0, gb1, gb2, gb3, vec4<f32>(b1, b2, b3, b4));
            acc2 += dots(ga0, ga1, ga2, ga3, vec4<f32>(a2, a3, a4, a5))
                + dots(gb0, gb1, gb2, gb3, vec4<f32>(b2, b3, b4, b5));
        }
    }
    let nw = p.cout * p.cin * 9u;
    var acc = array<vec4<f32>, 3>(acc0, acc1, acc2);
    for (var j = 0u; j < WCB; j++) {
        let co = co0 + j;
        if (co >= p.cout) { break; }
        let base = chunk * nw + ((co * p.cin + ci) * 3u + ky) * 3u;
        out[base] = acc[0][j];
        out[base + 1u] = acc[1][j];
        out[base + 2u] = acc[2][j];
    }
}

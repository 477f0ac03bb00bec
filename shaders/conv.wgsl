// Convolution (and linear layers, as 1x1 convolutions on 1x1 images):
// forward, backward-data and backward-weight, each with an optional second
// (input, weight) pair so that the R-operator's two terms, for example
// conv(ẋ, W) + conv(x, V), run in one dispatch.
//
// Layouts are PyTorch's: activations [n, c, h, w], weights [cout, cin, k, k].
// Weights are read from whole parameter buffers (θ or v) at an offset.

struct ConvParams {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, k: u32, stride: u32, pad: u32,
    oh: u32, ow: u32, wa_off: u32, wb_off: u32,
    // bit 0: accumulate into the output; bit 1: second pair present;
    // bit 2: add a bias (forward) read at bias_off of the `wb` buffer.
    flags: u32, bias_off: u32, _p0: u32, _p1: u32,
}

const WG: u32 = 256u;
const ACC: u32 = 1u;
const PAIR_B: u32 = 2u;
const BIAS: u32 = 4u;

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> xa: array<f32>;
@group(0) @binding(2) var<storage, read> wa: array<f32>;
@group(0) @binding(3) var<storage, read> xb: array<f32>;
@group(0) @binding(4) var<storage, read> wb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// Grids wider than 65,535 workgroups fold into y.
fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// Register blocking: llvmpipe and GPUs alike pay more for a load than for
// an FMA, so each thread computes a CB × XB block of outputs and reuses
// every loaded input and weight CB or XB times.
const CB: u32 = 4u;
const XB: u32 = 4u;

// A weight of channel `c`, or 0 past the last channel (blocks may overhang).
fn weight_a(c: u32, climit: u32, i: u32) -> f32 {
    return select(0.0, wa[min(i, arrayLength(&wa) - 1u)], c < climit);
}
fn weight_b(c: u32, climit: u32, i: u32) -> f32 {
    return select(0.0, wb[min(i, arrayLength(&wb) - 1u)], c < climit);
}

// y[n, co, oy, ox] = Σ_{ci, ky, kx} W[co, ci, ky, kx] · x[n, ci, oy·s + ky − pad, ox·s + kx − pad]
// One thread: channels co0..co0+CB of row oy, columns ox0..ox0+XB.
@compute @workgroup_size(256)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    let cblocks = (p.cout + CB - 1u) / CB;
    let xblocks = (p.ow + XB - 1u) / XB;
    let total = p.n * cblocks * p.oh * xblocks;
    if (idx >= total) { return; }
    let xb_ = idx % xblocks;
    let oy = (idx / xblocks) % p.oh;
    let cb = (idx / (xblocks * p.oh)) % cblocks;
    let n = idx / (xblocks * p.oh * cblocks);
    let co0 = cb * CB;
    let ox0 = xb_ * XB;
    let kk = p.k * p.k;
    let wstride = p.cin * kk;
    let two = (p.flags & PAIR_B) != 0u;
    var acc: array<array<f32, 4>, 4>;
    for (var ci = 0u; ci < p.cin; ci++) {
        let xbase = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < p.k; ky++) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            if (iy < 0 || iy >= i32(p.h)) { continue; }
            let xrow = xbase + u32(iy) * p.w;
            for (var kx = 0u; kx < p.k; kx++) {
                var xv: array<f32, 4>;
                var xv2: array<f32, 4>;
                for (var i = 0u; i < XB; i++) {
                    let ix = i32((ox0 + i) * p.stride + kx) - i32(p.pad);
                    let ok = ix >= 0 && ix < i32(p.w) && ox0 + i < p.ow;
                    let xi = min(xrow + u32(max(ix, 0)), arrayLength(&xa) - 1u);
                    xv[i] = select(0.0, xa[xi], ok);
                    if (two) {
                        xv2[i] = select(0.0, xb[xi], ok);
                    }
                }
                let tap = (co0 * p.cin + ci) * kk + ky * p.k + kx;
                for (var j = 0u; j < CB; j++) {
                    let wv = weight_a(co0 + j, p.cout, p.wa_off + tap + j * wstride);
                    for (var i = 0u; i < XB; i++) {
                        acc[j][i] += wv * xv[i];
                    }
                    if (two) {
                        let wv2 = weight_b(co0 + j, p.cout, p.wb_off + tap + j * wstride);
                        for (var i = 0u; i < XB; i++) {
                            acc[j][i] += wv2 * xv2[i];
                        }
                    }
                }
            }
        }
    }
    let plane = p.oh * p.ow;
    for (var j = 0u; j < CB; j++) {
        let co = co0 + j;
        if (co >= p.cout) { break; }
        var bias = 0.0;
        if ((p.flags & BIAS) != 0u) {
            bias = wb[p.bias_off + co];
        }
        for (var i = 0u; i < XB; i++) {
            if (ox0 + i >= p.ow) { break; }
            let o = (n * p.cout + co) * plane + oy * p.ow + ox0 + i;
            var r = acc[j][i] + bias;
            if ((p.flags & ACC) != 0u) {
                r += out[o];
            }
            out[o] = r;
        }
    }
}

// gx[n, ci, iy, ix] = Σ_{co, ky, kx} W[co, ci, ky, kx] · gy[n, co, oy, ox]
// over the outputs (oy, ox) whose window puts tap (ky, kx) on (iy, ix).
// One thread: channels ci0..ci0+CB of row iy, columns ix0..ix0+XB.
@compute @workgroup_size(256)
fn conv_backward_data(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    let cblocks = (p.cin + CB - 1u) / CB;
    let xblocks = (p.w + XB - 1u) / XB;
    let total = p.n * cblocks * p.h * xblocks;
    if (idx >= total) { return; }
    let xb_ = idx % xblocks;
    let iy = (idx / xblocks) % p.h;
    let cb = (idx / (xblocks * p.h)) % cblocks;
    let n = idx / (xblocks * p.h * cblocks);
    let ci0 = cb * CB;
    let ix0 = xb_ * XB;
    let kk = p.k * p.k;
    let two = (p.flags & PAIR_B) != 0u;
    var acc: array<array<f32, 4>, 4>;
    for (var ky = 0u; ky < p.k; ky++) {
        let ty = i32(iy + p.pad) - i32(ky);
        if (ty < 0 || (u32(ty) % p.stride) != 0u) { continue; }
        let oy = u32(ty) / p.stride;
        if (oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.k; kx++) {
            // Which of the XB columns this tap reaches, and from which output.
            var ok: array<bool, 4>;
            var ox: array<u32, 4>;
            var any_ok = false;
            for (var i = 0u; i < XB; i++) {
                let tx = i32(ix0 + i + p.pad) - i32(kx);
                let o = u32(max(tx, 0)) / p.stride;
                ok[i] = tx >= 0 && (u32(tx) % p.stride) == 0u && o < p.ow && ix0 + i < p.w;
                ox[i] = o;
                any_ok = any_ok || ok[i];
            }
            if (!any_ok) { continue; }
            let tap = ky * p.k + kx;
            for (var co = 0u; co < p.cout; co++) {
                let grow = ((n * p.cout + co) * p.oh + oy) * p.ow;
                var g: array<f32, 4>;
                var g2: array<f32, 4>;
                for (var i = 0u; i < XB; i++) {
                    let gi = min(grow + ox[i], arrayLength(&xa) - 1u);
                    g[i] = select(0.0, xa[gi], ok[i]);
                    if (two) {
                        g2[i] = select(0.0, xb[gi], ok[i]);
                    }
                }
                let wbase = (co * p.cin + ci0) * kk + tap;
                for (var j = 0u; j < CB; j++) {
                    let wv = weight_a(ci0 + j, p.cin, p.wa_off + wbase + j * kk);
                    for (var i = 0u; i < XB; i++) {
                        acc[j][i] += wv * g[i];
                    }
                    if (two) {
                        let wv2 = weight_b(ci0 + j, p.cin, p.wb_off + wbase + j * kk);
                        for (var i = 0u; i < XB; i++) {
                            acc[j][i] += wv2 * g2[i];
                        }
                    }
                }
            }
        }
    }
    let plane = p.h * p.w;
    for (var j = 0u; j < CB; j++) {
        let ci = ci0 + j;
        if (ci >= p.cin) { break; }
        for (var i = 0u; i < XB; i++) {
            if (ix0 + i >= p.w) { break; }
            let o = (n * p.cin + ci) * plane + iy * p.w + ix0 + i;
            var r = acc[j][i];
            if ((p.flags & ACC) != 0u) {
                r += out[o];
            }
            out[o] = r;
        }
    }
}

const KMAX: u32 = 7u;

// The weight gradient in two stages, with no barriers (software
// rasterisers pay per barrier and per workgroup, GPUs idle threads when a
// tree has little to sum): stage one gives every (chunk of output rows,
// weight) pair a thread that sums about 256 products, stage two adds the
// chunks of each weight. No serial chain is longer than ~256 + chunks
// terms. ConvParams' last two words carry the rows per chunk and the number
// of chunks.

// out[chunk · W + w] = Σ over the chunk's rows (n, oy) and columns ox of
// xa[n, co, oy, ox] · wa[n, ci, iy, ix] (+ xb · wb): here `xa`/`xb` are
// adjoints, `wa`/`wb` the layer inputs, `out` the partials buffer.
@compute @workgroup_size(256)
fn conv_backward_weight(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    // One thread per (chunk, kernel row (co, ci, ky)): the row's k taps
    // share each adjoint load.
    let idx = flat_index(wid, nwg, lid);
    let kk = p.k * p.k;
    let nw = p.cout * p.cin * kk;
    let nrows_w = p.cout * p.cin * p.k;
    let rows_per_chunk = p._p0;
    if (idx >= nrows_w * p._p1) { return; }
    let wr = idx % nrows_w;
    let chunk = idx / nrows_w;
    let ky = wr % p.k;
    let ci = (wr / p.k) % p.cin;
    let co = wr / (p.k * p.cin);
    let two = (p.flags & PAIR_B) != 0u;
    let rows = p.n * p.oh;
    let r0 = chunk * rows_per_chunk;
    let r1 = min(r0 + rows_per_chunk, rows);
    let plane = p.oh * p.ow;
    var acc: array<f32, 7>;
    for (var row = r0; row < r1; row++) {
        let n = row / p.oh;
        let oy = row % p.oh;
        let iy = i32(oy * p.stride + ky) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        let grow = (n * p.cout + co) * plane + oy * p.ow;
        let xrow = ((n * p.cin + ci) * p.h + u32(iy)) * p.w;
        for (var ox = 0u; ox < p.ow; ox++) {
            let g = xa[grow + ox];
            var g2 = 0.0;
            if (two) {
                g2 = xb[grow + ox];
            }
            let ix0 = i32(ox * p.stride) - i32(p.pad);
            for (var kx = 0u; kx < KMAX; kx++) {
                if (kx >= p.k) { break; }
                let ix = ix0 + i32(kx);
                if (ix < 0 || ix >= i32(p.w)) { continue; }
                acc[kx] += g * wa[xrow + u32(ix)];
                if (two) {
                    acc[kx] += g2 * wb[xrow + u32(ix)];
                }
            }
        }
    }
    for (var kx = 0u; kx < KMAX; kx++) {
        if (kx >= p.k) { break; }
        out[chunk * nw + wr * p.k + kx] = acc[kx];
    }
}

// out[wa_off + w] += Σ_chunk xa[chunk · W + w]: `xa` is the partials buffer.
@compute @workgroup_size(256)
fn conv_weight_sum(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let wi = flat_index(wid, nwg, lid);
    let nw = p.cout * p.cin * p.k * p.k;
    if (wi >= nw) { return; }
    var s = 0.0;
    for (var c = 0u; c < p._p1; c++) {
        s += xa[c * nw + wi];
    }
    out[p.wa_off + wi] += s;
}

// Convolution (and linear layers, as 1x1 convolutions on 1x1 images):
// forward and backward-data (weight gradients: conv_weight.wgsl), each with an optional second
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
@group(0) @binding(3) var<storage, read> xb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// BEGIN WEIGHTS: read from whole parameter buffers (θ or v) at an offset.
// src/gpu/kernels.rs swaps this block for shaders/conv_weights_uniform.wgsl
// to make the uniform-window variant of these kernels.
@group(0) @binding(2) var<storage, read> wa: array<f32>;
@group(0) @binding(4) var<storage, read> wb: array<f32>;

// A weight of channel `c`, or 0 past the last channel (blocks may overhang).
fn weight_a(c: u32, climit: u32, i: u32) -> f32 {
    return select(0.0, wa[min(i, arrayLength(&wa) - 1u)], c < climit);
}
fn weight_b(c: u32, climit: u32, i: u32) -> f32 {
    return select(0.0, wb[min(i, arrayLength(&wb) - 1u)], c < climit);
}
fn bias_b(i: u32) -> f32 {
    return wb[min(i, arrayLength(&wb) - 1u)];
}
// END WEIGHTS

// Register blocking: each thread computes CB channels × XB columns of one
// row, so every loaded input feeds CB products and every loaded weight XB.
// On llvmpipe (Mesa's CPU driver, what CI runs) each storage load costs
// ~1.5 ns per lane while products are nearly free, and two more things
// cost more than they look (measured, BENCHMARKS.md): a loop over a private
// array (llvmpipe does not unroll it, so every access is indexed), hence
// the named accumulators below; and a branch, even a uniform one, hence
// masks (select) instead of `if` around loads. All lanes of a workgroup
// share one channel block, so weight addresses are workgroup-uniform,
// which GPUs broadcast.
const CB: u32 = 8u;
const XB: u32 = 4u;
const COLS: vec4<u32> = vec4<u32>(0u, 1u, 2u, 3u);

// (channel block, spatial thread) of a launch of cblocks × ⌈spatial/WG⌉ groups.
fn split_launch(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, cblocks: u32) -> vec2<u32> {
    let g = wid.x + wid.y * nwg.x;
    return vec2<u32>(g % cblocks, (g / cblocks) * WG + lid);
}

// y[n, co, oy, ox] = Σ_{ci, ky, kx} W[co, ci, ky, kx] · x[n, ci, oy·s + ky − pad, ox·s + kx − pad]
// One thread: channels co0..co0+CB of row oy, columns ox0..ox0+XB.
@compute @workgroup_size(256)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let cblocks = (p.cout + CB - 1u) / CB;
    let at = split_launch(wid, nwg, lid, cblocks);
    let xblocks = (p.ow + XB - 1u) / XB;
    if (at.y >= p.n * p.oh * xblocks) { return; }
    let xb_ = at.y % xblocks;
    let oy = (at.y / xblocks) % p.oh;
    let n = at.y / (xblocks * p.oh);
    let co0 = at.x * CB;
    let ox0 = xb_ * XB;
    let kk = p.k * p.k;
    let wstride = p.cin * kk;
    let pair = vec4<bool>((p.flags & PAIR_B) != 0u);
    let xlast = arrayLength(&xa) - 1u;
    let xlast_b = arrayLength(&xb) - 1u;
    let cols_ok = vec4<u32>(ox0) + COLS < vec4<u32>(p.ow);
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    for (var ci = 0u; ci < p.cin; ci++) {
        let xbase = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < p.k; ky++) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            let row_ok = iy >= 0 && iy < i32(p.h);
            let xrow = xbase + u32(clamp(iy, 0, i32(p.h) - 1)) * p.w;
            for (var kx = 0u; kx < p.k; kx++) {
                let ix = vec4<i32>(COLS * p.stride + vec4<u32>(ox0 * p.stride + kx)) - vec4<i32>(i32(p.pad));
                let ok = vec4<bool>(row_ok) & ix >= vec4<i32>(0) & ix < vec4<i32>(i32(p.w)) & cols_ok;
                let xi = vec4<u32>(xrow) + vec4<u32>(clamp(ix, vec4<i32>(0), vec4<i32>(i32(p.w) - 1)));
                let xv = select(vec4<f32>(0.0), vec4<f32>(xa[min(xi.x, xlast)], xa[min(xi.y, xlast)],
                                                           xa[min(xi.z, xlast)], xa[min(xi.w, xlast)]), ok);
                // The second pair is read either way and zeroed when absent:
                // a branch costs llvmpipe more than the loads it would skip.
                let xv2 = select(vec4<f32>(0.0), vec4<f32>(xb[min(xi.x, xlast_b)], xb[min(xi.y, xlast_b)],
                                                            xb[min(xi.z, xlast_b)], xb[min(xi.w, xlast_b)]), ok & pair);
                let tap = (co0 * p.cin + ci) * kk + ky * p.k + kx;
                acc0 += weight_a(co0 + 0u, p.cout, p.wa_off + tap + 0u * wstride) * xv
                    + weight_b(co0 + 0u, p.cout, p.wb_off + tap + 0u * wstride) * xv2;
                acc1 += weight_a(co0 + 1u, p.cout, p.wa_off + tap + 1u * wstride) * xv
                    + weight_b(co0 + 1u, p.cout, p.wb_off + tap + 1u * wstride) * xv2;
                acc2 += weight_a(co0 + 2u, p.cout, p.wa_off + tap + 2u * wstride) * xv
                    + weight_b(co0 + 2u, p.cout, p.wb_off + tap + 2u * wstride) * xv2;
                acc3 += weight_a(co0 + 3u, p.cout, p.wa_off + tap + 3u * wstride) * xv
                    + weight_b(co0 + 3u, p.cout, p.wb_off + tap + 3u * wstride) * xv2;
                acc4 += weight_a(co0 + 4u, p.cout, p.wa_off + tap + 4u * wstride) * xv
                    + weight_b(co0 + 4u, p.cout, p.wb_off + tap + 4u * wstride) * xv2;
                acc5 += weight_a(co0 + 5u, p.cout, p.wa_off + tap + 5u * wstride) * xv
                    + weight_b(co0 + 5u, p.cout, p.wb_off + tap + 5u * wstride) * xv2;
                acc6 += weight_a(co0 + 6u, p.cout, p.wa_off + tap + 6u * wstride) * xv
                    + weight_b(co0 + 6u, p.cout, p.wb_off + tap + 6u * wstride) * xv2;
                acc7 += weight_a(co0 + 7u, p.cout, p.wa_off + tap + 7u * wstride) * xv
                    + weight_b(co0 + 7u, p.cout, p.wb_off + tap + 7u * wstride) * xv2;
            }
        }
    }
    var acc = array<vec4<f32>, 8>(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
    let plane = p.oh * p.ow;
    for (var j = 0u; j < CB; j++) {
        let co = co0 + j;
        if (co >= p.cout) { break; }
        var bias = 0.0;
        if ((p.flags & BIAS) != 0u) {
            bias = bias_b(p.bias_off + co);
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
// over the outputs (oy, ox) whose window puts tap (ky, kx) on (iy, ix),
// that is iy + pad − ky = oy·s (and the same for x). Only taps with
// ky ≡ iy + pad (mod s) reach row iy, so threads are split by phase
// (iy mod s, ix mod s): a thread takes channels ci0..ci0+CB of one row
// and XB columns of one phase (ix = px + s·j), and visits only the k²/s²
// taps of that phase. The workgroup shares the channel block.
@compute @workgroup_size(256)
fn conv_backward_data(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let s = p.stride;
    let cblocks = (p.cin + CB - 1u) / CB;
    let at = split_launch(wid, nwg, lid, cblocks);
    let rows = (p.h + s - 1u) / s;
    let xblocks = ((p.w + s - 1u) / s + XB - 1u) / XB;
    if (at.y >= p.n * s * s * rows * xblocks) { return; }
    let xb_ = at.y % xblocks;
    let r = (at.y / xblocks) % rows;
    let phase = (at.y / (xblocks * rows)) % (s * s);
    let n = at.y / (xblocks * rows * s * s);
    let px = phase % s;
    let iy = phase / s + r * s;
    let ci0 = at.x * CB;
    // The thread's columns: ix = px + s·(xb_·XB + j), j < XB.
    let ix = vec4<u32>(px + s * xb_ * XB) + COLS * s;
    let kk = p.k * p.k;
    let pair = vec4<bool>((p.flags & PAIR_B) != 0u);
    let glast = arrayLength(&xa) - 1u;
    let glast_b = arrayLength(&xb) - 1u;
    let cols_ok = ix < vec4<u32>(p.w) & vec4<bool>(iy < p.h);
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    for (var ky = (iy + p.pad) % s; ky < p.k; ky += s) {
        let ty = i32(iy + p.pad) - i32(ky);
        let oy = u32(max(ty, 0)) / s;
        let row_ok = ty >= 0 && oy < p.oh;
        let oyc = min(oy, p.oh - 1u);
        for (var kx = (px + p.pad) % s; kx < p.k; kx += s) {
            // Which of the XB columns this tap reaches, and from which output.
            let tx = vec4<i32>(ix + vec4<u32>(p.pad)) - vec4<i32>(i32(kx));
            let o = vec4<u32>(max(tx, vec4<i32>(0))) / vec4<u32>(s);
            let ok = vec4<bool>(row_ok) & tx >= vec4<i32>(0) & o < vec4<u32>(p.ow) & cols_ok;
            let ox = min(o, vec4<u32>(p.ow - 1u));
            let tap = ky * p.k + kx;
            for (var co = 0u; co < p.cout; co++) {
                let gi = vec4<u32>(((n * p.cout + co) * p.oh + oyc) * p.ow) + ox;
                let g = select(vec4<f32>(0.0), vec4<f32>(xa[min(gi.x, glast)], xa[min(gi.y, glast)],
                                                        xa[min(gi.z, glast)], xa[min(gi.w, glast)]), ok);
                let g2 = select(vec4<f32>(0.0), vec4<f32>(xb[min(gi.x, glast_b)], xb[min(gi.y, glast_b)],
                                                         xb[min(gi.z, glast_b)], xb[min(gi.w, glast_b)]), ok & pair);
                let wbase = (co * p.cin + ci0) * kk + tap;
                acc0 += weight_a(ci0 + 0u, p.cin, p.wa_off + wbase + 0u * kk) * g
                    + weight_b(ci0 + 0u, p.cin, p.wb_off + wbase + 0u * kk) * g2;
                acc1 += weight_a(ci0 + 1u, p.cin, p.wa_off + wbase + 1u * kk) * g
                    + weight_b(ci0 + 1u, p.cin, p.wb_off + wbase + 1u * kk) * g2;
                acc2 += weight_a(ci0 + 2u, p.cin, p.wa_off + wbase + 2u * kk) * g
                    + weight_b(ci0 + 2u, p.cin, p.wb_off + wbase + 2u * kk) * g2;
                acc3 += weight_a(ci0 + 3u, p.cin, p.wa_off + wbase + 3u * kk) * g
                    + weight_b(ci0 + 3u, p.cin, p.wb_off + wbase + 3u * kk) * g2;
                acc4 += weight_a(ci0 + 4u, p.cin, p.wa_off + wbase + 4u * kk) * g
                    + weight_b(ci0 + 4u, p.cin, p.wb_off + wbase + 4u * kk) * g2;
                acc5 += weight_a(ci0 + 5u, p.cin, p.wa_off + wbase + 5u * kk) * g
                    + weight_b(ci0 + 5u, p.cin, p.wb_off + wbase + 5u * kk) * g2;
                acc6 += weight_a(ci0 + 6u, p.cin, p.wa_off + wbase + 6u * kk) * g
                    + weight_b(ci0 + 6u, p.cin, p.wb_off + wbase + 6u * kk) * g2;
                acc7 += weight_a(ci0 + 7u, p.cin, p.wa_off + wbase + 7u * kk) * g
                    + weight_b(ci0 + 7u, p.cin, p.wb_off + wbase + 7u * kk) * g2;
            }
        }
    }
    var acc = array<vec4<f32>, 8>(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
    let plane = p.h * p.w;
    if (iy >= p.h) { return; }
    for (var j = 0u; j < CB; j++) {
        let ci = ci0 + j;
        if (ci >= p.cin) { break; }
        for (var i = 0u; i < XB; i++) {
            if (ix[i] >= p.w) { break; }
            let o = (n * p.cin + ci) * plane + iy * p.w + ix[i];
            var r = acc[j][i];
            if ((p.flags & ACC) != 0u) {
                r += out[o];
            }
            out[o] = r;
        }
    }
}

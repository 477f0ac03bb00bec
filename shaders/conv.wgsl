// Convolution (and linear layers, as 1x1 convolutions on 1x1 images):
// forward and backward-data (weight gradients: conv_weight.wgsl), each with an optional second
// (input, weight) pair so that the R-operator's two terms, for example
// conv(ẋ, W) + conv(x, V), run in one dispatch. Which terms exist is fixed
// per pipeline by override constants, so a dispatch loads and multiplies
// only the terms that are there: PAIR_B (the second pair), BIAS (forward:
// add the bias read at bias_off of the `wb` buffer), ACC (add into the
// output instead of overwriting it).
//
// Layouts are PyTorch's: activations [n, c, h, w], weights [cout, cin, k, k].
// Weights are read from whole parameter buffers (θ or v) at an offset.

struct ConvParams {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, k: u32, stride: u32, pad: u32,
    oh: u32, ow: u32, wa_off: u32, wb_off: u32,
    bias_off: u32, rows_per_chunk: u32, chunks: u32, groups: u32,
}

override PAIR_B: bool = false;
override BIAS: bool = false;
override ACC: bool = false;
// The reduction's channels [RED0, min(RED1, all)): input channels
// (forward) or output channels (backward data). The whole by default; on
// CPU emulators a reduction longer than llvmpipe's loop limit runs as
// several dispatches, one chunk each, the first writing and the rest
// adding (ACC) — src/layers/conv_split.rs.
override RED0: u32 = 0u;
override RED1: u32 = 4294967295u;

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> xa: array<f32>;
@group(0) @binding(3) var<storage, read> xb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// Tangent k's slices of the bindings (tangents.wgsl); the weights' are set
// in the weights block.
var<private> ko_xa: u32;
var<private> ko_xb: u32;
var<private> ko_out: u32;
var<private> ko_wa: u32;
var<private> ko_wb: u32;

fn slices(k: u32) {
    ko_xa = kslice(1u, arrayLength(&xa), k);
    ko_xb = kslice(3u, arrayLength(&xb), k);
    ko_out = kslice(5u, arrayLength(&out), k);
    weight_slices_a(k);
    weight_slices_b(k);
}

// Weights are read from whole parameter buffers (θ or v) at an offset.
// src/gpu/kernels.rs swaps block A (the first pair's weights), or both,
// for those of shaders/conv_weights_uniform.wgsl to make the
// uniform-window variants of these kernels.
// BEGIN WEIGHTS A
@group(0) @binding(2) var<storage, read> wa: array<f32>;

// A weight of channel `c`, or 0 past the last channel (blocks may overhang).
fn weight_a(c: u32, climit: u32, i: u32) -> f32 {
    return select(0.0, wa[min(ko_wa + i, arrayLength(&wa) - 1u)], c < climit);
}
fn weight_slices_a(k: u32) {
    ko_wa = kslice(2u, arrayLength(&wa), k);
}
// END WEIGHTS A
// BEGIN WEIGHTS B
@group(0) @binding(4) var<storage, read> wb: array<f32>;

fn weight_b(c: u32, climit: u32, i: u32) -> f32 {
    return select(0.0, wb[min(ko_wb + i, arrayLength(&wb) - 1u)], c < climit);
}
fn bias_b(i: u32) -> f32 {
    return wb[min(ko_wb + i, arrayLength(&wb) - 1u)];
}
fn weight_slices_b(k: u32) {
    ko_wb = kslice(4u, arrayLength(&wb), k);
}
// END WEIGHTS B

// Register blocking: each thread computes CB channels × XB columns of one
// row, so every loaded input feeds CB products and every loaded weight XB.
// On llvmpipe (Mesa's CPU driver, what CI runs) each storage load costs
// about 1 ns per lane while products are nearly free, and two more things
// cost more than they look (measured, BENCHMARKS.md): a loop over a private
// array (llvmpipe does not unroll it, so every access is indexed), hence
// the named accumulators below; and a branch, even a uniform one, hence
// masks (select) instead of `if` around loads (the `if`s on override
// constants below are resolved when the pipeline is built). All lanes of a workgroup
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

// A thread's block of a [n, cs, hh, ww] output: channels c0..c0+CB of row
// y of sample n, columns x0..x0+XB; `live` is false past the last block.
struct Block {
    live: bool, n: u32, y: u32, x0: u32, c0: u32,
}

fn row_block(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, cs: u32, hh: u32, ww: u32) -> Block {
    let at = split_launch(wid, nwg, lid, (cs + CB - 1u) / CB);
    let xblocks = (ww + XB - 1u) / XB;
    return Block(at.y < p.n * hh * xblocks, at.y / (xblocks * hh), (at.y / xblocks) % hh,
                 (at.y % xblocks) * XB, at.x * CB);
}

// A block's accumulators: CB = 8 channels × XB = 4 columns, as fields (not
// an array, so that nothing is indexed at run time).
struct Acc8 {
    c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>,
    c4: vec4<f32>, c5: vec4<f32>, c6: vec4<f32>, c7: vec4<f32>,
}

// acc + Σ_j W_a[j] · x for the block's channels c0 + j, whose weights are
// at ia + j·stride in `wa`.
fn taps8_a(acc: Acc8, c0: u32, climit: u32, ia: u32, stride: u32, x: vec4<f32>) -> Acc8 {
    var r = acc;
    r.c0 += weight_a(c0 + 0u, climit, ia + 0u * stride) * x;
    r.c1 += weight_a(c0 + 1u, climit, ia + 1u * stride) * x;
    r.c2 += weight_a(c0 + 2u, climit, ia + 2u * stride) * x;
    r.c3 += weight_a(c0 + 3u, climit, ia + 3u * stride) * x;
    r.c4 += weight_a(c0 + 4u, climit, ia + 4u * stride) * x;
    r.c5 += weight_a(c0 + 5u, climit, ia + 5u * stride) * x;
    r.c6 += weight_a(c0 + 6u, climit, ia + 6u * stride) * x;
    r.c7 += weight_a(c0 + 7u, climit, ia + 7u * stride) * x;
    return r;
}

// The same with the second pair's weights `wb`.
fn taps8_b(acc: Acc8, c0: u32, climit: u32, ib: u32, stride: u32, y: vec4<f32>) -> Acc8 {
    var r = acc;
    r.c0 += weight_b(c0 + 0u, climit, ib + 0u * stride) * y;
    r.c1 += weight_b(c0 + 1u, climit, ib + 1u * stride) * y;
    r.c2 += weight_b(c0 + 2u, climit, ib + 2u * stride) * y;
    r.c3 += weight_b(c0 + 3u, climit, ib + 3u * stride) * y;
    r.c4 += weight_b(c0 + 4u, climit, ib + 4u * stride) * y;
    r.c5 += weight_b(c0 + 5u, climit, ib + 5u * stride) * y;
    r.c6 += weight_b(c0 + 6u, climit, ib + 6u * stride) * y;
    r.c7 += weight_b(c0 + 7u, climit, ib + 7u * stride) * y;
    return r;
}

fn channel(a: Acc8, j: u32) -> vec4<f32> {
    switch j {
        case 0u: { return a.c0; }
        case 1u: { return a.c1; }
        case 2u: { return a.c2; }
        case 3u: { return a.c3; }
        case 4u: { return a.c4; }
        case 5u: { return a.c5; }
        case 6u: { return a.c6; }
        default: { return a.c7; }
    }
}

// 4 values of a row of `width` columns starting at `base`, at columns i
// (0 outside [0, width) and where `ok` is false), from `xa` and from `xb`.
fn row4_a(base: u32, i: vec4<i32>, width: u32, ok: vec4<bool>) -> vec4<f32> {
    let m = ok & i >= vec4<i32>(0) & i < vec4<i32>(i32(width));
    let j = min(vec4<u32>(ko_xa + base) + vec4<u32>(clamp(i, vec4<i32>(0), vec4<i32>(i32(width) - 1))),
                vec4<u32>(arrayLength(&xa) - 1u));
    return select(vec4<f32>(0.0), vec4<f32>(xa[j.x], xa[j.y], xa[j.z], xa[j.w]), m);
}
fn row4_b(base: u32, i: vec4<i32>, width: u32, ok: vec4<bool>) -> vec4<f32> {
    let m = ok & i >= vec4<i32>(0) & i < vec4<i32>(i32(width));
    let j = min(vec4<u32>(ko_xb + base) + vec4<u32>(clamp(i, vec4<i32>(0), vec4<i32>(i32(width) - 1))),
                vec4<u32>(arrayLength(&xb) - 1u));
    return select(vec4<f32>(0.0), vec4<f32>(xb[j.x], xb[j.y], xb[j.z], xb[j.w]), m);
}

// out[n, c0 + j, y, x0 + i] (+ bias[c0 + j]) for the block's channels and
// columns inside the layer; with ACC added to what is there.
fn store8(a: Acc8, n: u32, c0: u32, cs: u32, hh: u32, ww: u32, y: u32, x0: u32, xstep: u32) {
    let plane = hh * ww;
    for (var j = 0u; j < CB; j++) {
        let c = c0 + j;
        if (c >= cs) { break; }
        var b = 0.0;
        if (BIAS) {
            b = bias_b(p.bias_off + c);
        }
        let v = channel(a, j);
        for (var i = 0u; i < XB; i++) {
            let x = x0 + i * xstep;
            if (x >= ww) { break; }
            let o = ko_out + (n * cs + c) * plane + y * ww + x;
            var r = v[i] + b;
            if (ACC) {
                r += out[o];
            }
            out[o] = r;
        }
    }
}

// y[n, co, oy, ox] = Σ_{ci, ky, kx} W[co, ci, ky, kx] · x[n, ci, oy·s + ky − pad, ox·s + kx − pad]
// (+ the second pair, + bias). One thread: channels co0..co0+CB of row oy,
// columns ox0..ox0+XB.
@compute @workgroup_size(256)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    slices(wid.z);
    let blk = row_block(wid, nwg, lid, p.cout, p.oh, p.ow);
    if (!blk.live) { return; }
    let n = blk.n;
    let oy = blk.y;
    let ox0 = blk.x0;
    let co0 = blk.c0;
    let kk = p.k * p.k;
    let wstride = p.cin * kk;
    var acc: Acc8;
    for (var ci = RED0; ci < min(p.cin, RED1); ci++) {
        let xbase = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < p.k; ky++) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            let row_ok = vec4<bool>(iy >= 0 && iy < i32(p.h));
            let xrow = xbase + u32(clamp(iy, 0, i32(p.h) - 1)) * p.w;
            for (var kx = 0u; kx < p.k; kx++) {
                let ix = vec4<i32>(COLS * p.stride + vec4<u32>(ox0 * p.stride + kx)) - vec4<i32>(i32(p.pad));
                let tap = (co0 * p.cin + ci) * kk + ky * p.k + kx;
                acc = taps8_a(acc, co0, p.cout, p.wa_off + tap, wstride, row4_a(xrow, ix, p.w, row_ok));
                if (PAIR_B) {
                    acc = taps8_b(acc, co0, p.cout, p.wb_off + tap, wstride, row4_b(xrow, ix, p.w, row_ok));
                }
            }
        }
    }
    store8(acc, n, co0, p.cout, p.oh, p.ow, oy, ox0, 1u);
}

// conv_forward for 3×3 taps at stride 1: the 6 inputs under a thread's 4
// columns are loaded once per row and shared by the 3 taps kx (a sliding
// window), half the loads of the general kernel.
@compute @workgroup_size(256)
fn conv_forward_k3s1(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    slices(wid.z);
    let blk = row_block(wid, nwg, lid, p.cout, p.oh, p.ow);
    if (!blk.live) { return; }
    let n = blk.n;
    let oy = blk.y;
    let ox0 = blk.x0;
    let co0 = blk.c0;
    let wstride = p.cin * 9u;
    let lo = vec4<i32>(COLS) + vec4<i32>(i32(ox0) - i32(p.pad));
    var acc: Acc8;
    for (var ci = RED0; ci < min(p.cin, RED1); ci++) {
        let xbase = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < 3u; ky++) {
            let iy = i32(oy + ky) - i32(p.pad);
            let row_ok = vec4<bool>(iy >= 0 && iy < i32(p.h));
            let xrow = xbase + u32(clamp(iy, 0, i32(p.h) - 1)) * p.w;
            // Columns ox0 − pad + 0..3 and + 4..5 (the window's last two).
            let a = row4_a(xrow, lo, p.w, row_ok);
            let a2 = row4_a(xrow, lo + vec4<i32>(4), p.w, row_ok);
            let tap = (co0 * p.cin + ci) * 9u + ky * 3u;
            acc = taps8_a(acc, co0, p.cout, p.wa_off + tap, wstride, a);
            acc = taps8_a(acc, co0, p.cout, p.wa_off + tap + 1u, wstride, vec4<f32>(a.yzw, a2.x));
            acc = taps8_a(acc, co0, p.cout, p.wa_off + tap + 2u, wstride, vec4<f32>(a.zw, a2.xy));
            if (PAIR_B) {
                let b = row4_b(xrow, lo, p.w, row_ok);
                let b2 = row4_b(xrow, lo + vec4<i32>(4), p.w, row_ok);
                acc = taps8_b(acc, co0, p.cout, p.wb_off + tap, wstride, b);
                acc = taps8_b(acc, co0, p.cout, p.wb_off + tap + 1u, wstride, vec4<f32>(b.yzw, b2.x));
                acc = taps8_b(acc, co0, p.cout, p.wb_off + tap + 2u, wstride, vec4<f32>(b.zw, b2.xy));
            }
        }
    }
    store8(acc, n, co0, p.cout, p.oh, p.ow, oy, ox0, 1u);
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
    slices(wid.z);
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
    let ix0 = px + s * xb_ * XB;
    let ix = vec4<u32>(ix0) + COLS * s;
    let kk = p.k * p.k;
    let cols_ok = ix < vec4<u32>(p.w) & vec4<bool>(iy < p.h);
    var acc: Acc8;
    for (var ky = (iy + p.pad) % s; ky < p.k; ky += s) {
        let ty = i32(iy + p.pad) - i32(ky);
        let oy = u32(max(ty, 0)) / s;
        let row_ok = cols_ok & vec4<bool>(ty >= 0 && oy < p.oh);
        let oyc = min(oy, p.oh - 1u);
        for (var kx = (px + p.pad) % s; kx < p.k; kx += s) {
            // The outputs each column's tap comes from: ox = (ix + pad − kx) / s,
            // exact by the phase; row4 masks those outside [0, ow).
            let tx = vec4<i32>(ix + vec4<u32>(p.pad)) - vec4<i32>(i32(kx));
            let ox = select(vec4<i32>(-1), tx / vec4<i32>(i32(s)), tx >= vec4<i32>(0));
            let tap = ky * p.k + kx;
            for (var co = RED0; co < min(p.cout, RED1); co++) {
                let grow = ((n * p.cout + co) * p.oh + oyc) * p.ow;
                let wbase = (co * p.cin + ci0) * kk + tap;
                acc = taps8_a(acc, ci0, p.cin, p.wa_off + wbase, kk, row4_a(grow, ox, p.ow, row_ok));
                if (PAIR_B) {
                    acc = taps8_b(acc, ci0, p.cin, p.wb_off + wbase, kk, row4_b(grow, ox, p.ow, row_ok));
                }
            }
        }
    }
    if (iy >= p.h) { return; }
    store8(acc, n, ci0, p.cin, p.h, p.w, iy, ix0, s);
}

// conv_backward_data for 3×3 taps at stride 1: column ix takes tap kx
// from output ix + pad − kx, so a thread's 4 columns need the 6 outputs
// ix0 + pad − 2 .. ix0 + pad + 3 of each row, loaded once for the 3 taps.
@compute @workgroup_size(256)
fn conv_backward_data_k3s1(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    slices(wid.z);
    let blk = row_block(wid, nwg, lid, p.cin, p.h, p.w);
    if (!blk.live) { return; }
    let n = blk.n;
    let iy = blk.y;
    let ix0 = blk.x0;
    let ci0 = blk.c0;
    // Outputs ix0 + pad − 2 + 0..3 and + 4..5.
    let lo = vec4<i32>(COLS) + vec4<i32>(i32(ix0 + p.pad) - 2);
    let hi = lo + vec4<i32>(4);
    var acc: Acc8;
    for (var co = RED0; co < min(p.cout, RED1); co++) {
        for (var ky = 0u; ky < 3u; ky++) {
            let oy = i32(iy + p.pad) - i32(ky);
            let row_ok = vec4<bool>(oy >= 0 && oy < i32(p.oh));
            let grow = ((n * p.cout + co) * p.oh + u32(clamp(oy, 0, i32(p.oh) - 1))) * p.ow;
            let g = row4_a(grow, lo, p.ow, row_ok);
            let g2 = row4_a(grow, hi, p.ow, row_ok);
            let wbase = (co * p.cin + ci0) * 9u + ky * 3u;
            // Tap kx for column j is output j + 2 − kx of the window.
            acc = taps8_a(acc, ci0, p.cin, p.wa_off + wbase, 9u, vec4<f32>(g.zw, g2.xy));
            acc = taps8_a(acc, ci0, p.cin, p.wa_off + wbase + 1u, 9u, vec4<f32>(g.yzw, g2.x));
            acc = taps8_a(acc, ci0, p.cin, p.wa_off + wbase + 2u, 9u, g);
            if (PAIR_B) {
                let h = row4_b(grow, lo, p.ow, row_ok);
                let h2 = row4_b(grow, hi, p.ow, row_ok);
                acc = taps8_b(acc, ci0, p.cin, p.wb_off + wbase, 9u, vec4<f32>(h.zw, h2.xy));
                acc = taps8_b(acc, ci0, p.cin, p.wb_off + wbase + 1u, 9u, vec4<f32>(h.yzw, h2.x));
                acc = taps8_b(acc, ci0, p.cin, p.wb_off + wbase + 2u, 9u, h);
            }
        }
    }
    store8(acc, n, ci0, p.cin, p.h, p.w, iy, ix0, 1u);
}

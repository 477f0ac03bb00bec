// Convolution as workgroup-memory tiled implicit GEMM, for GPUs (the
// register-blocked kernels of conv.wgsl and conv_weight.wgsl are shaped
// for CPU emulators; src/gpu/executor.rs `ConvPath` chooses per adapter).
//
// Each is C[M, N] = Σ_K A[M, K] · B[K, N] with one operand gathered on the
// fly from the activations (no im2col buffer):
// - conv_tiled_forward:          M = cout, N = n·oh·ow, K = cin·k·k;
//   A = the weights, B = the input windows.
// - conv_tiled_backward_data:    M = cin,  N = n·h·w,   K = cout·k·k;
//   A = the weights (transposed), B = the adjoints each input position
//   gathers (tap (ky, kx) reaches row iy from output (iy + pad − ky)/s
//   where that is a whole number inside the output), any stride.
// - conv_tiled_backward_weight:  M = cout, N = cin·k·k, K = the output
//   positions of one chunk of rows_per_chunk output rows (n, oy);
//   A = the adjoints, B = the input windows; it writes the per-chunk
//   partials that conv_weight_sum adds up (deterministic: no atomics).
//
// Bindings, parameters and the override constants PAIR_B, BIAS and ACC
// mean what they mean in conv.wgsl (forward, backward data) and
// conv_weight.wgsl (weight gradient), so the conv unit swaps these kernels
// in on the same buffers; the second pair accumulates into the same tile.
// Block products: every binding is read at tangent wid.z's slice where KB
// marks it (tangents.wgsl).
//
// Tiles: a workgroup of 256 threads computes a TM × TN tile of C, staging
// TK-deep slabs of A and B in workgroup memory; each thread owns a
// RM × RN = 4 × 4 register micro-tile, rows ty + i·TM/RM and columns
// tx + j·TN/RN (strided, so the threads of a row read neighbouring
// workgroup-memory words). TM, TN, TK are override constants:
// (TM/RM)·(TN/RN) ≤ 256 threads compute (the rest only load),
// TK·TM ≤ 1024 and TK·TN ≤ 1024 (kernels.rs `ConvTile::check` refuses
// other tiles). The host sets all three per layer: the adapter's widest
// tile (64×64×16 unless overridden) narrowed to the GEMM's rows
// (`ConvTile::for_rows`: 16×256×4 for 16 rows, 32×128×8 for 32), and
// sizes the grid to it (`ConvTile::groups`).

struct ConvParams {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, k: u32, stride: u32, pad: u32,
    oh: u32, ow: u32, wa_off: u32, wb_off: u32,
    bias_off: u32, rows_per_chunk: u32, chunks: u32, groups: u32,
}

override PAIR_B: bool = false;
override BIAS: bool = false;
override ACC: bool = false;
override TM: u32 = 64u;
override TN: u32 = 64u;
override TK: u32 = 16u;

const WG: u32 = 256u;
const RM: u32 = 4u;
const RN: u32 = 4u;
// Capacity of each workgroup-memory slab (floats).
const CAP: u32 = 1024u;

@group(0) @binding(0) var<uniform> p: ConvParams;
@group(0) @binding(1) var<storage, read> xa: array<f32>;
@group(0) @binding(2) var<storage, read> wa: array<f32>;
@group(0) @binding(3) var<storage, read> xb: array<f32>;
@group(0) @binding(4) var<storage, read> wb: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> sa: array<f32, CAP>;
var<workgroup> sb: array<f32, CAP>;

// Tangent k's slices of the bindings.
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

const FORWARD: u32 = 0u;
const DATA: u32 = 1u;
const WEIGHT: u32 = 2u;

// Element i of this tangent's slice of binding xa/xb (binding_w false) or
// wa/wb (true), of the first (second = false) or second pair.
fn read_bind(second: bool, binding_w: bool, i: u32) -> f32 {
    if (binding_w) {
        if (second) {
            return wb[min(ko_wb + i, arrayLength(&wb) - 1u)];
        }
        return wa[min(ko_wa + i, arrayLength(&wa) - 1u)];
    }
    if (second) {
        return xb[min(ko_xb + i, arrayLength(&xb) - 1u)];
    }
    return xa[min(ko_xa + i, arrayLength(&xa) - 1u)];
}

// A[m, kk] (the caller has checked m < M and kk inside the K range).
fn load_a(mode: u32, second: bool, m: u32, kk: u32) -> f32 {
    let taps = p.k * p.k;
    switch mode {
        case 0u: {
            // W[co = m, (ci, ky, kx) = kk].
            let off = select(p.wa_off, p.wb_off, second);
            return read_bind(second, true, off + m * p.cin * taps + kk);
        }
        case 1u: {
            // W[co, ci = m, t] with kk = (co, t).
            let off = select(p.wa_off, p.wb_off, second);
            let co = kk / taps;
            let t = kk % taps;
            return read_bind(second, true, off + (co * p.cin + m) * taps + t);
        }
        default: {
            // gy[n, co = m, oy, ox] with kk = (n, oy, ox).
            let plane = p.oh * p.ow;
            let n = kk / plane;
            let sp = kk % plane;
            return read_bind(second, false, (n * p.cout + m) * plane + sp);
        }
    }
}

// B[kk, col] (the caller has checked col < N and kk inside the K range).
fn load_b(mode: u32, second: bool, kk: u32, col: u32) -> f32 {
    let taps = p.k * p.k;
    let s = p.stride;
    switch mode {
        case 0u: {
            // x[n, ci, oy·s + ky − pad, ox·s + kx − pad], kk = (ci, ky, kx),
            // col = (n, oy, ox).
            let ci = kk / taps;
            let t = kk % taps;
            let plane = p.oh * p.ow;
            let n = col / plane;
            let sp = col % plane;
            let iy = i32((sp / p.ow) * s + t / p.k) - i32(p.pad);
            let ix = i32((sp % p.ow) * s + t % p.k) - i32(p.pad);
            if (iy < 0 || iy >= i32(p.h) || ix < 0 || ix >= i32(p.w)) {
                return 0.0;
            }
            return read_bind(second, false, ((n * p.cin + ci) * p.h + u32(iy)) * p.w + u32(ix));
        }
        case 1u: {
            // gy[n, co, oy, ox] where oy·s = iy + pad − ky (and for x),
            // kk = (co, ky, kx), col = (n, iy, ix).
            let co = kk / taps;
            let t = kk % taps;
            let plane = p.h * p.w;
            let n = col / plane;
            let sp = col % plane;
            let ty = i32(sp / p.w + p.pad) - i32(t / p.k);
            let tx = i32(sp % p.w + p.pad) - i32(t % p.k);
            if (ty < 0 || tx < 0) {
                return 0.0;
            }
            let oy = u32(ty) / s;
            let ox = u32(tx) / s;
            if (oy * s != u32(ty) || ox * s != u32(tx) || oy >= p.oh || ox >= p.ow) {
                return 0.0;
            }
            return read_bind(second, false, ((n * p.cout + co) * p.oh + oy) * p.ow + ox);
        }
        default: {
            // x[n, ci, oy·s + ky − pad, ox·s + kx − pad] from wa/wb, with
            // kk = (n, oy, ox), col = (ci, ky, kx).
            let plane = p.oh * p.ow;
            let n = kk / plane;
            let sp = kk % plane;
            let ci = col / taps;
            let t = col % taps;
            let iy = i32((sp / p.ow) * s + t / p.k) - i32(p.pad);
            let ix = i32((sp % p.ow) * s + t % p.k) - i32(p.pad);
            if (iy < 0 || iy >= i32(p.h) || ix < 0 || ix >= i32(p.w)) {
                return 0.0;
            }
            return read_bind(second, true, ((n * p.cin + ci) * p.h + u32(iy)) * p.w + u32(ix));
        }
    }
}

// The GEMM of `mode`: this workgroup's tile of C (and chunk, for the
// weight gradient), written by `store`.
fn gemm(mode: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    slices(wid.z);
    let taps = p.k * p.k;
    var mm: u32;
    var nn: u32;
    var kdim: u32;
    switch mode {
        case 0u: { mm = p.cout; nn = p.n * p.oh * p.ow; kdim = p.cin * taps; }
        case 1u: { mm = p.cin; nn = p.n * p.h * p.w; kdim = p.cout * taps; }
        default: { mm = p.cout; nn = p.cin * taps; kdim = 0u; }
    }
    let tiles_m = (mm + TM - 1u) / TM;
    let tiles_n = (nn + TN - 1u) / TN;
    let chunks = select(1u, p.chunks, mode == WEIGHT);
    let g = wid.x + wid.y * nwg.x;
    if (g >= tiles_m * tiles_n * chunks) { return; }
    let chunk = g / (tiles_m * tiles_n);
    let tile = g % (tiles_m * tiles_n);
    let m0 = (tile % tiles_m) * TM;
    let n0 = (tile / tiles_m) * TN;
    // The K range [k0, k1).
    var k0 = 0u;
    var k1 = kdim;
    if (mode == WEIGHT) {
        let rows = p.n * p.oh;
        let r0 = min(chunk * p.rows_per_chunk, rows);
        let r1 = min(r0 + p.rows_per_chunk, rows);
        k0 = r0 * p.ow;
        k1 = r1 * p.ow;
    }
    let cols_t = TN / RN;
    let tx = lid % cols_t;
    let ty = lid / cols_t;
    let sm = TM / RM;
    let sn = TN / RN;
    var acc: array<f32, 16>;
    let pairs = select(1u, 2u, PAIR_B);
    for (var pair = 0u; pair < pairs; pair++) {
        let second = pair == 1u;
        for (var kt = k0; kt < k1; kt += TK) {
            // Stage A's TK × TM slab and B's TK × TN slab.
            for (var e = lid; e < TK * TM; e += WG) {
                let r = e % TM;
                let c = e / TM;
                let m = m0 + r;
                let kk = kt + c;
                var v = 0.0;
                if (m < mm && kk < k1) {
                    v = load_a(mode, second, m, kk);
                }
                sa[c * TM + r] = v;
            }
            for (var e = lid; e < TK * TN; e += WG) {
                let r = e % TN;
                let c = e / TN;
                let col = n0 + r;
                let kk = kt + c;
                var v = 0.0;
                if (col < nn && kk < k1) {
                    v = load_b(mode, second, kk, col);
                }
                sb[c * TN + r] = v;
            }
            workgroupBarrier();
            if (ty < sm) {
                for (var c = 0u; c < TK; c++) {
                    var a: array<f32, 4>;
                    var b: array<f32, 4>;
                    for (var i = 0u; i < RM; i++) {
                        a[i] = sa[c * TM + ty + i * sm];
                    }
                    for (var j = 0u; j < RN; j++) {
                        b[j] = sb[c * TN + tx + j * sn];
                    }
                    for (var i = 0u; i < RM; i++) {
                        for (var j = 0u; j < RN; j++) {
                            acc[i * RN + j] = fma(a[i], b[j], acc[i * RN + j]);
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (ty >= sm) { return; }
    for (var i = 0u; i < RM; i++) {
        let m = m0 + ty + i * sm;
        if (m >= mm) { break; }
        for (var j = 0u; j < RN; j++) {
            let col = n0 + tx + j * sn;
            if (col >= nn) { break; }
            store(mode, chunk, m, col, acc[i * RN + j]);
        }
    }
}

// C[m, col] into the output: the forward's y (+ bias), backward data's gx,
// or the weight gradient's partials of `chunk`.
fn store(mode: u32, chunk: u32, m: u32, col: u32, v: f32) {
    switch mode {
        case 0u: {
            let plane = p.oh * p.ow;
            let o = ko_out + ((col / plane) * p.cout + m) * plane + col % plane;
            var r = v;
            if (BIAS) {
                r += wb[min(ko_wb + p.bias_off + m, arrayLength(&wb) - 1u)];
            }
            if (ACC) {
                r += out[o];
            }
            out[o] = r;
        }
        case 1u: {
            let plane = p.h * p.w;
            let o = ko_out + ((col / plane) * p.cin + m) * plane + col % plane;
            var r = v;
            if (ACC) {
                r += out[o];
            }
            out[o] = r;
        }
        default: {
            let nw = p.cout * p.cin * p.k * p.k;
            out[ko_out + chunk * nw + m * p.cin * p.k * p.k + col] = v;
        }
    }
}

// y[n, co, oy, ox] = Σ W[co, ci, ky, kx] · x[n, ci, oy·s + ky − pad, ox·s + kx − pad]
// (+ the second pair, + bias, + y with ACC). Grid: ConvTile::groups.
@compute @workgroup_size(256)
fn conv_tiled_forward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    gemm(FORWARD, wid, nwg, lid);
}

// gx[n, ci, iy, ix] = Σ W[co, ci, ky, kx] · gy[n, co, oy, ox] over the
// taps with oy·s = iy + pad − ky, ox·s = ix + pad − kx (+ the second
// pair, + gx with ACC).
@compute @workgroup_size(256)
fn conv_tiled_backward_data(@builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    gemm(DATA, wid, nwg, lid);
}

// out[chunk · W + w] = Σ over the chunk's output rows of
// xa[n, co, oy, ox] · wa[n, ci, iy, ix] (+ xb · wb), as
// conv_backward_weight (conv_weight.wgsl); conv_weight_sum adds the chunks.
@compute @workgroup_size(256)
fn conv_tiled_backward_weight(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    gemm(WEIGHT, wid, nwg, lid);
}

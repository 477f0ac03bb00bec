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

// y[n, co, oy, ox] = Σ_{ci, ky, kx} W[co, ci, ky, kx] · x[n, ci, oy·s + ky − pad, ox·s + kx − pad]
@compute @workgroup_size(256)
fn conv_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    let total = p.n * p.cout * p.oh * p.ow;
    if (idx >= total) { return; }
    let ox = idx % p.ow;
    let oy = (idx / p.ow) % p.oh;
    let co = (idx / (p.ow * p.oh)) % p.cout;
    let n = idx / (p.ow * p.oh * p.cout);
    let kk = p.k * p.k;
    let iy0 = i32(oy * p.stride) - i32(p.pad);
    let ix0 = i32(ox * p.stride) - i32(p.pad);
    // The kernel window clipped to the image, so the inner loops need no tests.
    let ky0 = u32(max(0, -iy0));
    let ky1 = u32(clamp(i32(p.h) - iy0, 0, i32(p.k)));
    let kx0 = u32(max(0, -ix0));
    let kx1 = u32(clamp(i32(p.w) - ix0, 0, i32(p.k)));
    let two = (p.flags & PAIR_B) != 0u;
    var acc = 0.0;
    for (var ci = 0u; ci < p.cin; ci++) {
        let xbase = (n * p.cin + ci) * p.h * p.w;
        let wbase = (co * p.cin + ci) * kk;
        for (var ky = ky0; ky < ky1; ky++) {
            let xrow = xbase + u32(iy0 + i32(ky)) * p.w;
            let wrow = wbase + ky * p.k;
            for (var kx = kx0; kx < kx1; kx++) {
                let xi = xrow + u32(ix0 + i32(kx));
                acc += wa[p.wa_off + wrow + kx] * xa[xi];
                if (two) {
                    acc += wb[p.wb_off + wrow + kx] * xb[xi];
                }
            }
        }
    }
    if ((p.flags & BIAS) != 0u) {
        acc += wb[p.bias_off + co];
    }
    if ((p.flags & ACC) != 0u) {
        acc += out[idx];
    }
    out[idx] = acc;
}

// gx[n, ci, iy, ix] = Σ_{co, ky, kx} W[co, ci, ky, kx] · gy[n, co, oy, ox]
// over the outputs (oy, ox) whose window puts tap (ky, kx) on (iy, ix).
@compute @workgroup_size(256)
fn conv_backward_data(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    let total = p.n * p.cin * p.h * p.w;
    if (idx >= total) { return; }
    let ix = idx % p.w;
    let iy = (idx / p.w) % p.h;
    let ci = (idx / (p.w * p.h)) % p.cin;
    let n = idx / (p.w * p.h * p.cin);
    let kk = p.k * p.k;
    let two = (p.flags & PAIR_B) != 0u;
    var acc = 0.0;
    for (var ky = 0u; ky < p.k; ky++) {
        let ty = i32(iy + p.pad) - i32(ky);
        if (ty < 0 || (u32(ty) % p.stride) != 0u) { continue; }
        let oy = u32(ty) / p.stride;
        if (oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.k; kx++) {
            let tx = i32(ix + p.pad) - i32(kx);
            if (tx < 0 || (u32(tx) % p.stride) != 0u) { continue; }
            let ox = u32(tx) / p.stride;
            if (ox >= p.ow) { continue; }
            let tap = ky * p.k + kx;
            for (var co = 0u; co < p.cout; co++) {
                let gi = ((n * p.cout + co) * p.oh + oy) * p.ow + ox;
                let wi = (co * p.cin + ci) * kk + tap;
                acc += wa[p.wa_off + wi] * xa[gi];
                if (two) {
                    acc += wb[p.wb_off + wi] * xb[gi];
                }
            }
        }
    }
    if ((p.flags & ACC) != 0u) {
        acc += out[idx];
    }
    out[idx] = acc;
}

var<workgroup> partial: array<f32, 256>;

// out[wa_off + (co, ci, ky, kx)] += Σ_{n, oy, ox} ga[n, co, oy, ox] · xa[n, ci, iy, ix]
//                                  (+ the same for gb, xb).
// Here `xa`/`xb` are adjoints, `wa`/`wb` are the layer inputs, and `out` is
// the gradient (or Hv) buffer. One workgroup reduces one weight: each thread
// sums a strided share, then a tree combines the 256 partial sums, so no
// serial chain is longer than n·oh·ow / 256.
@compute @workgroup_size(256)
fn conv_backward_weight(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let widx = wid.x + wid.y * nwg.x;
    let kk = p.k * p.k;
    let total = p.cout * p.cin * kk;
    // widx is uniform across the workgroup, so this return keeps barriers uniform.
    if (widx >= total) { return; }
    let tap = widx % kk;
    let ky = tap / p.k;
    let kx = tap % p.k;
    let ci = (widx / kk) % p.cin;
    let co = widx / (kk * p.cin);
    let two = (p.flags & PAIR_B) != 0u;
    let plane = p.oh * p.ow;
    let count = p.n * plane;
    var acc = 0.0;
    for (var j = lid; j < count; j += WG) {
        let n = j / plane;
        let r = j % plane;
        let oy = r / p.ow;
        let ox = r % p.ow;
        let iy = i32(oy * p.stride + ky) - i32(p.pad);
        let ix = i32(ox * p.stride + kx) - i32(p.pad);
        if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) { continue; }
        let gi = (n * p.cout + co) * plane + r;
        let xi = ((n * p.cin + ci) * p.h + u32(iy)) * p.w + u32(ix);
        acc += xa[gi] * wa[xi];
        if (two) {
            acc += xb[gi] * wb[xi];
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[p.wa_off + widx] += partial[0];
    }
}

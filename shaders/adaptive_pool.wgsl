// Adaptive average pooling (PyTorch's AdaptiveAvgPool2d) over planes of
// [n·c, h, w] to [n·c, oh, ow], for any sizes: output i averages inputs
// [⌊i·h/oh⌋, ⌈(i+1)·h/oh⌉) along each axis (windows overlap or repeat
// when oh does not divide h, or exceeds it).

struct PoolParams {
    planes: u32, h: u32, w: u32, k: u32,
    stride: u32, pad: u32, oh: u32, ow: u32,
    _p0: u32, _p1: u32, _p2: u32, _p3: u32,
}

const WG: u32 = 256u;
// Backward: add into the output instead of overwriting it.
override ACC: bool = false;

@group(0) @binding(0) var<uniform> p: PoolParams;
@group(0) @binding(1) var<storage, read> ap_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> ap_out: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// The inputs [start, end) output i of `m` averages over `n` inputs.
fn window(i: u32, n: u32, m: u32) -> vec2<u32> {
    return vec2<u32>(i * n / m, ((i + 1u) * n + m - 1u) / m);
}

@compute @workgroup_size(256)
fn adaptive_avgpool_forward(@builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let o = flat_index(wid, nwg, lid);
    let plane_out = p.oh * p.ow;
    if (o >= p.planes * plane_out) { return; }
    // Tangent slices (tangents.wgsl).
    let o_in = kslice(1u, arrayLength(&ap_in), wid.z);
    let o_out = kslice(2u, arrayLength(&ap_out), wid.z);
    let pl = o / plane_out;
    let wy = window((o % plane_out) / p.ow, p.h, p.oh);
    let wx = window(o % p.ow, p.w, p.ow);
    let base = o_in + pl * p.h * p.w;
    var s = 0.0;
    for (var iy = wy.x; iy < wy.y; iy++) {
        for (var ix = wx.x; ix < wx.y; ix++) {
            s += ap_in[base + iy * p.w + ix];
        }
    }
    ap_out[o_out + o] = s / f32((wy.y - wy.x) * (wx.y - wx.x));
}

// A thread per input element: the outputs whose windows hold row iy are
// [⌊iy·oh/h⌋, ⌈(iy+1)·oh/h⌉) (clipped at oh), and likewise for columns.
@compute @workgroup_size(256)
fn adaptive_avgpool_backward(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let plane = p.h * p.w;
    if (i >= p.planes * plane) { return; }
    let o_gy = kslice(1u, arrayLength(&ap_in), wid.z);
    let o_gx = kslice(2u, arrayLength(&ap_out), wid.z);
    let pl = i / plane;
    let iy = (i % plane) / p.w;
    let ix = i % p.w;
    let ry = window(iy, p.oh, p.h);
    let rx = window(ix, p.ow, p.w);
    let base = o_gy + pl * p.oh * p.ow;
    var g = 0.0;
    for (var oy = ry.x; oy < min(ry.y, p.oh); oy++) {
        let wy = window(oy, p.h, p.oh);
        for (var ox = rx.x; ox < min(rx.y, p.ow); ox++) {
            let wx = window(ox, p.w, p.ow);
            g += ap_in[base + oy * p.ow + ox] / f32((wy.y - wy.x) * (wx.y - wx.x));
        }
    }
    if (ACC) {
        ap_out[o_gx + i] += g;
    } else {
        ap_out[o_gx + i] = g;
    }
}

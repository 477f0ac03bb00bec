// Channel moves — concatenation and narrowing along channels (strided
// block copies) and ShuffleNet's channel shuffle — and the product
// y = a·b of squeeze-and-excitation, b per plane (broadcast over h, w) or
// per element, over values [n, c, hw].

struct ChannelParams {
    blocks: u32, len: u32, src_stride: u32, src_off: u32,
    dst_stride: u32, dst_off: u32, c: u32, hw: u32,
    groups: u32, _p0: u32, _p1: u32, _p2: u32,
}

const WG: u32 = 256u;
// Add into the output instead of overwriting it.
override ACC: bool = false;
// block_copy: write zeros over the rest of every destination block too.
override FILL: bool = false;
// mul, plane_dot, channel_dot: add a second product c·d.
override PAIR_B: bool = false;
// mul: b and d are a parameter [c] at src_off of theta / v (ConvNeXt's
// layer scale), shared by the samples: factor (⌊i/hw⌋ mod c) + src_off.
override B_PARAM: bool = false;

@group(0) @binding(0) var<uniform> p: ChannelParams;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// ---- block copy: for each of `blocks` blocks b and j < len,
// dst[b·dst_stride + dst_off + j] (+)= src[b·src_stride + src_off + j].
// With FILL a thread per destination element (blocks·dst_stride of them)
// writes the copied value or zero.
@group(0) @binding(1) var<storage, read> bc_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> bc_dst: array<f32>;

@compute @workgroup_size(256)
fn block_copy(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    // Tangent slices (tangents.wgsl).
    let o_s = kslice(1u, arrayLength(&bc_src), wid.z);
    let o_d = kslice(2u, arrayLength(&bc_dst), wid.z);
    if (FILL) {
        if (i >= p.blocks * p.dst_stride) { return; }
        let b = i / p.dst_stride;
        let j = i % p.dst_stride;
        var v = 0.0;
        if (j >= p.dst_off && j < p.dst_off + p.len) {
            v = bc_src[o_s + b * p.src_stride + p.src_off + (j - p.dst_off)];
        }
        bc_dst[o_d + i] = v;
        return;
    }
    if (i >= p.blocks * p.len) { return; }
    let b = i / p.len;
    let j = i % p.len;
    let v = bc_src[o_s + b * p.src_stride + p.src_off + j];
    let d = o_d + b * p.dst_stride + p.dst_off + j;
    if (ACC) {
        bc_dst[d] += v;
    } else {
        bc_dst[d] = v;
    }
}

// ---- channel shuffle of `blocks` samples [c, hw] with `groups` groups:
// output channel o reads input channel (o mod g)·(c/g) + ⌊o/g⌋ (its
// transpose is the shuffle with c/g groups).
@group(0) @binding(1) var<storage, read> sh_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> sh_y: array<f32>;

@compute @workgroup_size(256)
fn channel_shuffle(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let per = p.c * p.hw;
    if (i >= p.blocks * per) { return; }
    let o_x = kslice(1u, arrayLength(&sh_x), wid.z);
    let o_y = kslice(2u, arrayLength(&sh_y), wid.z);
    let s = i / per;
    let o = (i % per) / p.hw;
    let j = i % p.hw;
    let src = (o % p.groups) * (p.c / p.groups) + o / p.groups;
    let v = sh_x[o_x + (s * p.c + src) * p.hw + j];
    if (ACC) {
        sh_y[o_y + i] += v;
    } else {
        sh_y[o_y + i] = v;
    }
}

// ---- products: `mul` out[i] (+)= a[i]·b[⌊i/hw⌋] (+ c[i]·d[⌊i/hw⌋]) for
// i < len (hw = 1: elementwise; B_PARAM: a parameter per channel);
// `plane_dot` out[pl] (+)= Σ over the plane's hw elements of a·b (+ c·d),
// for pl < blocks (a workgroup each); `channel_dot` out[dst_off + ch] +=
// Σ over the `blocks` samples' planes ch of [blocks, c, hw] of a·b
// (+ c·d), for ch < c (a workgroup each: a layer scale's parameter
// adjoint).
@group(0) @binding(1) var<storage, read> m_a: array<f32>;
@group(0) @binding(2) var<storage, read> m_b: array<f32>;
@group(0) @binding(3) var<storage, read> m_c: array<f32>;
@group(0) @binding(4) var<storage, read> m_d: array<f32>;
@group(0) @binding(5) var<storage, read_write> m_out: array<f32>;

@compute @workgroup_size(256)
fn mul(@builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    let k = wid.z;
    let o_a = kslice(1u, arrayLength(&m_a), k);
    let o_b = kslice(2u, arrayLength(&m_b), k);
    let o_out = kslice(5u, arrayLength(&m_out), k);
    var bi = i / p.hw;
    if (B_PARAM) {
        bi = bi % p.c + p.src_off;
    }
    var v = m_a[o_a + i] * m_b[o_b + bi];
    if (PAIR_B) {
        let o_c = kslice(3u, arrayLength(&m_c), k);
        let o_d = kslice(4u, arrayLength(&m_d), k);
        v += m_c[o_c + i] * m_d[o_d + bi];
    }
    if (ACC) {
        m_out[o_out + i] += v;
    } else {
        m_out[o_out + i] = v;
    }
}

// A workgroup per plane: each thread sums a stride of the plane, then a
// tree over the workgroup.
var<workgroup> pd_sum: array<f32, 256>;

@compute @workgroup_size(256)
fn plane_dot(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    // Uniform per workgroup, so every thread reaches the barriers.
    let pl = wid.x + wid.y * nwg.x;
    if (pl >= p.blocks) { return; }
    let k = wid.z;
    let o_a = kslice(1u, arrayLength(&m_a), k) + pl * p.hw;
    let o_b = kslice(2u, arrayLength(&m_b), k) + pl * p.hw;
    let o_out = kslice(5u, arrayLength(&m_out), k);
    var s = 0.0;
    for (var j = lid; j < p.hw; j += WG) {
        s += m_a[o_a + j] * m_b[o_b + j];
    }
    if (PAIR_B) {
        let o_c = kslice(3u, arrayLength(&m_c), k) + pl * p.hw;
        let o_d = kslice(4u, arrayLength(&m_d), k) + pl * p.hw;
        for (var j = lid; j < p.hw; j += WG) {
            s += m_c[o_c + j] * m_d[o_d + j];
        }
    }
    pd_sum[lid] = s;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            pd_sum[lid] += pd_sum[lid + half];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        if (ACC) {
            m_out[o_out + pl] += pd_sum[0];
        } else {
            m_out[o_out + pl] = pd_sum[0];
        }
    }
}

// A workgroup per channel: each thread sums a stride of the channel's
// blocks·hw elements, then the same tree as plane_dot.
@compute @workgroup_size(256)
fn channel_dot(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    // Uniform per workgroup, so every thread reaches the barriers.
    let ch = wid.x + wid.y * nwg.x;
    if (ch >= p.c) { return; }
    let k = wid.z;
    let o_a = kslice(1u, arrayLength(&m_a), k);
    let o_b = kslice(2u, arrayLength(&m_b), k);
    let o_out = kslice(5u, arrayLength(&m_out), k);
    let count = p.blocks * p.hw;
    var s = 0.0;
    for (var j = lid; j < count; j += WG) {
        let i = ((j / p.hw) * p.c + ch) * p.hw + j % p.hw;
        s += m_a[o_a + i] * m_b[o_b + i];
    }
    if (PAIR_B) {
        let o_c = kslice(3u, arrayLength(&m_c), k);
        let o_d = kslice(4u, arrayLength(&m_d), k);
        for (var j = lid; j < count; j += WG) {
            let i = ((j / p.hw) * p.c + ch) * p.hw + j % p.hw;
            s += m_c[o_c + i] * m_d[o_d + i];
        }
    }
    pd_sum[lid] = s;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            pd_sum[lid] += pd_sum[lid + half];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        if (ACC) {
            m_out[o_out + p.dst_off + ch] += pd_sum[0];
        } else {
            m_out[o_out + p.dst_off + ch] = pd_sum[0];
        }
    }
}

// Elementwise ops: residual adds and offset copies.

struct EwParams {
    len: u32, a_off: u32, out_off: u32, _p0: u32,
}

const WG: u32 = 256u;
// Add into the output instead of overwriting it.
override ACC: bool = false;

@group(0) @binding(0) var<uniform> p: EwParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn store(i: u32, v: f32) {
    if (ACC) {
        out[i] += v;
    } else {
        out[i] = v;
    }
}


// out = a + b.
@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    // Tangent slices (tangents.wgsl).
    let k = wid.z;
    let o_a = kslice(1u, arrayLength(&a), k);
    let o_b = kslice(2u, arrayLength(&b), k);
    let o_out = kslice(3u, arrayLength(&out), k);
    store(o_out + i, a[o_a + i] + b[o_b + i]);
}

// out[out_off + i] (+)= a[a_off + i]: adjoints of residual adds, and
// per-channel sums into the gradient.
@group(0) @binding(2) var<storage, read_write> copy_out: array<f32>;

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.len) { return; }
    // Tangent slices (tangents.wgsl).
    let o_a = kslice(1u, arrayLength(&a), wid.z) + p.a_off;
    let o_out = kslice(2u, arrayLength(&copy_out), wid.z) + p.out_off;
    let v = a[o_a + i];
    if (ACC) {
        copy_out[o_out + i] += v;
    } else {
        copy_out[o_out + i] = v;
    }
}

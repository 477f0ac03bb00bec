// Softmax cross-entropy, scaled by 1/N so that summing over batches gives
// the sample-weighted mean loss. One thread per row: a sample (10 to 1000
// classes), or a token position of a language model (scaled by
// 1/(N·(T−1)); the last position unlabelled). On CPU emulators the `_rows`
// entry points take a workgroup per row instead, its threads striding over
// the classes: a thread's loops over a vocabulary of 50257 would pass
// llvmpipe's loop limit (65535 iterations an invocation, silently cut).

struct LossParams {
    n: u32, k: u32, scale: f32, _p0: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: LossParams;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// ---- forward + backward: softmax p, per-sample loss, gz = scale·(p − onehot).
@group(0) @binding(1) var<storage, read> f_z: array<f32>;
@group(0) @binding(2) var<storage, read> f_labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> f_p: array<f32>;
@group(0) @binding(4) var<storage, read_write> f_loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> f_gz: array<f32>;

@compute @workgroup_size(256)
fn xent_forward_backward(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let s = flat_index(wid, nwg, lid);
    if (s >= p.n) { return; }
    let base = s * p.k;
    var m = f_z[base];
    for (var j = 1u; j < p.k; j++) {
        m = max(m, f_z[base + j]);
    }
    var t = 0.0;
    for (var j = 0u; j < p.k; j++) {
        t += exp(f_z[base + j] - m);
    }
    let y = f_labels[s];
    // An unlabelled row (a language model's last position,
    // next_token::NO_LABEL): no loss, and a zero softmax so that its
    // R-adjoint is zero too.
    if (y == 0xffffffffu) {
        f_loss[s] = 0.0;
        for (var j = 0u; j < p.k; j++) {
            f_p[base + j] = 0.0;
            f_gz[base + j] = 0.0;
        }
        return;
    }
    f_loss[s] = p.scale * (m + log(t) - f_z[base + y]);
    for (var j = 0u; j < p.k; j++) {
        let pj = exp(f_z[base + j] - m) / t;
        f_p[base + j] = pj;
        f_gz[base + j] = p.scale * (pj - select(0.0, 1.0, j == y));
    }
}

// ---- R-backward: R(gz) = scale·(p ⊙ ż − p·(p·ż)), the softmax Jacobian on ż.
@group(0) @binding(1) var<storage, read> r_p: array<f32>;
@group(0) @binding(2) var<storage, read> r_dz: array<f32>;
@group(0) @binding(3) var<storage, read_write> r_rgz: array<f32>;

@compute @workgroup_size(256)
fn xent_r_backward(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let s = flat_index(wid, nwg, lid);
    if (s >= p.n) { return; }
    // Tangent slices (tangents.wgsl); the softmax is shared.
    let o_dz = kslice(2u, arrayLength(&r_dz), wid.z);
    let o_rgz = kslice(3u, arrayLength(&r_rgz), wid.z);
    let base = s * p.k;
    var pz = 0.0;
    for (var j = 0u; j < p.k; j++) {
        pz += r_p[base + j] * r_dz[o_dz + base + j];
    }
    for (var j = 0u; j < p.k; j++) {
        r_rgz[o_rgz + base + j] = p.scale * r_p[base + j] * (r_dz[o_dz + base + j] - pz);
    }
}

// ---- The same two passes with a workgroup (256 threads) per row: each
// thread strides over the classes, the row's max and sums reduced in
// workgroup memory (CPU emulators: src/layers/loss.rs).
var<workgroup> red: array<f32, 256>;

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The max (`is_max`) or sum of every thread's `a`, returned to all.
fn wg_reduce(lid: u32, a: f32, is_max: bool) -> f32 {
    red[lid] = a;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st / 2u) {
        if (lid < st) {
            red[lid] = select(red[lid] + red[lid + st], max(red[lid], red[lid + st]), is_max);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn xent_forward_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let s = row_index(wid, nwg);
    if (s >= p.n) { return; }
    let base = s * p.k;
    var m = f_z[base];
    for (var j = lid; j < p.k; j += WG) {
        m = max(m, f_z[base + j]);
    }
    m = wg_reduce(lid, m, true);
    var t = 0.0;
    for (var j = lid; j < p.k; j += WG) {
        t += exp(f_z[base + j] - m);
    }
    t = wg_reduce(lid, t, false);
    let y = f_labels[s];
    if (y == 0xffffffffu) {
        if (lid == 0u) {
            f_loss[s] = 0.0;
        }
        for (var j = lid; j < p.k; j += WG) {
            f_p[base + j] = 0.0;
            f_gz[base + j] = 0.0;
        }
        return;
    }
    if (lid == 0u) {
        f_loss[s] = p.scale * (m + log(t) - f_z[base + y]);
    }
    for (var j = lid; j < p.k; j += WG) {
        let pj = exp(f_z[base + j] - m) / t;
        f_p[base + j] = pj;
        f_gz[base + j] = p.scale * (pj - select(0.0, 1.0, j == y));
    }
}

@compute @workgroup_size(256)
fn xent_r_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let s = row_index(wid, nwg);
    if (s >= p.n) { return; }
    let o_dz = kslice(2u, arrayLength(&r_dz), wid.z);
    let o_rgz = kslice(3u, arrayLength(&r_rgz), wid.z);
    let base = s * p.k;
    var pz = 0.0;
    for (var j = lid; j < p.k; j += WG) {
        pz += r_p[base + j] * r_dz[o_dz + base + j];
    }
    pz = wg_reduce(lid, pz, false);
    for (var j = lid; j < p.k; j += WG) {
        r_rgz[o_rgz + base + j] = p.scale * r_p[base + j] * (r_dz[o_dz + base + j] - pz);
    }
}

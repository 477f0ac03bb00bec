// Batch norm over [n, c, hw] with its R-operator passes. With x̂ = (x − μ)·s,
// y = γx̂ + β; in batch mode μ and s = 1/√(σ² + ε) are the batch's own and
// depend on x, in running mode they are constants. The formulas are those
// of the float64 reference (src/ops/bn.rs); per-channel sums come from
// reduce.wgsl's channel_sums into this node's stats buffer, laid out as
// ten rows of c values (src/gpu/kernels.rs bn_rows):
//   0 μ, 1 s, 2 Σẋ, 3 Σx̂ẋ, 4 Σgy, 5 Σgy·x̂, 6 Σ R(gy), 7 Σ R(gy)·x̂,
//   8 Σgy·x̂̇, 9 σ² (batch mode: the biased variance bn_stats found, which
//   training folds into the running variance, shaders/optim.wgsl; s alone
//   would give it back only to f32's relative error times 1/(1 − ε·s²)).

struct BnParams {
    n: u32, c: u32, hw: u32, gamma_off: u32,
    // bn_stats split (STAGE 1, 2): segments per channel, elements per
    // segment (the last may have fewer).
    beta_off: u32, eps: f32, seg: u32, span: u32,
}

const WG: u32 = 256u;
// Batch statistics (train mode) or running ones; add into the output.
override BATCH: bool = false;
override ACC: bool = false;
// bn_stats on GPUs, as reduce.wgsl's reductions (src/gpu/reduce.rs):
// STAGE 0 one workgroup per channel; STAGE 1 a workgroup per (channel,
// segment), flattened ch·seg + s, writes the segment's f32 mean mₛ,
// Σ(x − mₛ)² and Σ(x − mₛ) (two-pass within the segment) to st_out rows
// 0, 1 and 2 of c·seg floats; STAGE 2, one workgroup per channel with
// those rows bound as st_x, merges them into the rows STAGE 0 writes.
override STAGE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: BnParams;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// The per-element kernels give a thread up to 4 consecutive elements of one
// (sample, channel) plane, so that the channel's statistics and parameters
// are loaded once per 4 elements: llvmpipe (what CI runs) pays per load.
// Returns (first element, elements, channel), or elements = 0 past the end.
fn quad(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> vec3<u32> {
    let g = flat_index(wid, nwg, lid);
    let hw4 = (p.hw + 3u) / 4u;
    if (g >= p.n * p.c * hw4) { return vec3<u32>(0u); }
    let plane = g / hw4;
    let j0 = (g % hw4) * 4u;
    return vec3<u32>(plane * p.hw + j0, min(4u, p.hw - j0), plane % p.c);
}

fn count() -> f32 {
    return f32(p.n * p.hw);
}

// ---- batch statistics: two-pass (mean, then Σ(x − μ)²) so that a large
// mean does not cancel the variance, one workgroup per channel.
@group(0) @binding(1) var<storage, read> st_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> st_out: array<f32>;

var<workgroup> partial: array<f32, 256>;
var<workgroup> partial16: array<f32, 16>;

// A fan-in-16 tree: two barriers (plus one to free the scratch) instead
// of eight; barriers, not adds, are what a reduction costs on software
// rasterisers.
fn tree_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    if (lid < 16u) {
        var s = 0.0;
        for (var i = 0u; i < 16u; i++) {
            s += partial[lid * 16u + i];
        }
        partial16[lid] = s;
    }
    workgroupBarrier();
    var r = 0.0;
    for (var i = 0u; i < 16u; i++) {
        r += partial16[i];
    }
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn bn_stats(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let m = p.n * p.hw;
    if (STAGE == 2u) {
        let ch = wid.x;
        let row = ch * p.seg;
        let r_q = p.c * p.seg;
        let r_r = 2u * p.c * p.seg;
        var s = 0.0;
        for (var j = lid; j < p.seg; j += WG) {
            let cnt = f32(min(p.span, m - j * p.span));
            s += cnt * st_x[row + j] + st_x[r_r + row + j];
        }
        let mean = tree_sum(lid, s) / f32(m);
        // Σ over the segment of (x − mean)² = Σ(x − mₛ)² + 2(mₛ − mean)·Σ(x − mₛ)
        // + cnt·(mₛ − mean)², exactly: the middle term is not zero for an f32
        // mₛ, and dropping it (Chan's update) would leave mₛ's rounding
        // in the variance to first order (5e-5 of a mean-100 channel's s).
        var q = 0.0;
        for (var j = lid; j < p.seg; j += WG) {
            let cnt = f32(min(p.span, m - j * p.span));
            let d = st_x[row + j] - mean;
            q += st_x[r_q + row + j] + d * (2.0 * st_x[r_r + row + j] + cnt * d);
        }
        let var_ = tree_sum(lid, q) / f32(m);
        if (lid == 0u) {
            st_out[ch] = mean;
            st_out[p.c + ch] = 1.0 / sqrt(var_ + p.eps);
            st_out[9u * p.c + ch] = var_;
        }
        return;
    }
    var ch = wid.x;
    var lo = 0u;
    var hi = m;
    var seg = 0u;
    if (STAGE == 1u) {
        let g = wid.x + wid.y * nwg.x;
        ch = g / p.seg;
        seg = g % p.seg;
        lo = seg * p.span;
        hi = min(lo + p.span, m);
    }
    // A folded grid's padding.
    if (ch >= p.c) { return; }
    var s = 0.0;
    for (var j = lo + lid; j < hi; j += WG) {
        s += st_x[((j / p.hw) * p.c + ch) * p.hw + j % p.hw];
    }
    let mean = tree_sum(lid, s) / f32(hi - lo);
    var q = 0.0;
    var r = 0.0;
    for (var j = lo + lid; j < hi; j += WG) {
        let d = st_x[((j / p.hw) * p.c + ch) * p.hw + j % p.hw] - mean;
        q += d * d;
        r += d;
    }
    let sq = tree_sum(lid, q);
    var sr = 0.0;
    if (STAGE == 1u) {
        sr = tree_sum(lid, r);
    }
    if (lid == 0u) {
        if (STAGE == 1u) {
            st_out[ch * p.seg + seg] = mean;
            st_out[(p.c + ch) * p.seg + seg] = sq;
            st_out[(2u * p.c + ch) * p.seg + seg] = sr;
            return;
        }
        let var_ = sq / f32(m);
        st_out[ch] = mean;
        st_out[p.c + ch] = 1.0 / sqrt(var_ + p.eps);
        st_out[9u * p.c + ch] = var_;
    }
}

// ---- forward: x̂ and y. GIVEN (batch mode, float64 decisions): x̂ and the
// statistics rows were uploaded from the float64 forward pass, each value
// rounded once (src/layers/batchnorm.rs float64_state), and y alone is
// computed from them.
override GIVEN: bool = false;
@group(0) @binding(1) var<storage, read> f_x: array<f32>;
@group(0) @binding(2) var<storage, read> f_stats: array<f32>;
@group(0) @binding(3) var<storage, read> f_theta: array<f32>;
@group(0) @binding(4) var<storage, read_write> f_xhat: array<f32>;
@group(0) @binding(5) var<storage, read_write> f_y: array<f32>;

@compute @workgroup_size(256)
fn bn_forward(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let q = quad(wid, nwg, lid);
    let ch = q.z;
    let mean = f_stats[ch];
    let s = f_stats[p.c + ch];
    let gamma = f_theta[p.gamma_off + ch];
    let beta = f_theta[p.beta_off + ch];
    let given = GIVEN;
    for (var i = q.x; i < q.x + q.y; i++) {
        var xh: f32;
        if (given) {
            xh = f_xhat[i];
        } else {
            xh = (f_x[i] - mean) * s;
            f_xhat[i] = xh;
        }
        f_y[i] = gamma * xh + beta;
    }
}

// ---- R-forward: x̂̇ and ẏ = γ̇x̂ + γx̂̇ + β̇.
@group(0) @binding(1) var<storage, read> rf_dx: array<f32>;
@group(0) @binding(2) var<storage, read> rf_xhat: array<f32>;
@group(0) @binding(3) var<storage, read> rf_stats: array<f32>;
@group(0) @binding(4) var<storage, read> rf_theta: array<f32>;
@group(0) @binding(5) var<storage, read> rf_v: array<f32>;
@group(0) @binding(6) var<storage, read_write> rf_xhd: array<f32>;
@group(0) @binding(7) var<storage, read_write> rf_dy: array<f32>;

@compute @workgroup_size(256)
fn bn_r_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let q = quad(wid, nwg, lid);
    let ch = q.z;
    // Tangent slices (tangents.wgsl). The statistics' forward rows (μ, s)
    // are shared, in slice 0; the R rows (Σẋ, Σx̂ẋ) are the tangent's own.
    let k = wid.z;
    let o_dx = kslice(1u, arrayLength(&rf_dx), k);
    let o_xhat = kslice(2u, arrayLength(&rf_xhat), k);
    let o_st = kslice(3u, arrayLength(&rf_stats), k);
    let o_v = kslice(5u, arrayLength(&rf_v), k);
    let o_xhd = kslice(6u, arrayLength(&rf_xhd), k);
    let o_dy = kslice(7u, arrayLength(&rf_dy), k);
    let s = rf_stats[p.c + ch];
    // Batch mode: x̂̇ = s·(ẋ − Σẋ/m − x̂·Σx̂ẋ/m); running mode: s·ẋ.
    let batch = BATCH;
    let m = count();
    let mean_dx = select(0.0, rf_stats[o_st + 2u * p.c + ch] / m, batch);
    let mean_xdx = select(0.0, rf_stats[o_st + 3u * p.c + ch] / m, batch);
    let dgamma = rf_v[o_v + p.gamma_off + ch];
    let gamma = rf_theta[p.gamma_off + ch];
    let dbeta = rf_v[o_v + p.beta_off + ch];
    for (var i = q.x; i < q.x + q.y; i++) {
        let xh = rf_xhat[o_xhat + i];
        let xhd = s * (rf_dx[o_dx + i] - mean_dx - xh * mean_xdx);
        rf_xhd[o_xhd + i] = xhd;
        rf_dy[o_dy + i] = dgamma * xh + gamma * xhd + dbeta;
    }
}

// ---- backward: gx (parameter gradients are rows 4 and 5 of the stats).
@group(0) @binding(1) var<storage, read> b_gy: array<f32>;
@group(0) @binding(2) var<storage, read> b_xhat: array<f32>;
@group(0) @binding(3) var<storage, read> b_stats: array<f32>;
@group(0) @binding(4) var<storage, read> b_theta: array<f32>;
@group(0) @binding(5) var<storage, read_write> b_gx: array<f32>;

@compute @workgroup_size(256)
fn bn_backward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let q = quad(wid, nwg, lid);
    let ch = q.z;
    let sg = b_stats[p.c + ch] * b_theta[p.gamma_off + ch];
    // Batch mode: gx = sγ·(gy − Σgy/m − x̂·Σgy·x̂/m); running mode: sγ·gy.
    let batch = BATCH;
    let m = count();
    let mean_g = select(0.0, b_stats[4u * p.c + ch] / m, batch);
    let mean_gx = select(0.0, b_stats[5u * p.c + ch] / m, batch);
    let acc = ACC;
    for (var i = q.x; i < q.x + q.y; i++) {
        var g = sg * (b_gy[i] - mean_g - b_xhat[i] * mean_gx);
        if (acc) {
            g += b_gx[i];
        }
        b_gx[i] = g;
    }
}

// ---- R-backward: R(gx) (R(gγ), R(gβ) are rows 7 + 8 and 6 of the stats).
@group(0) @binding(1) var<storage, read> rb_gy: array<f32>;
@group(0) @binding(2) var<storage, read> rb_rgy: array<f32>;
@group(0) @binding(3) var<storage, read> rb_xhat: array<f32>;
@group(0) @binding(4) var<storage, read> rb_xhd: array<f32>;
@group(0) @binding(5) var<storage, read> rb_stats: array<f32>;
@group(0) @binding(6) var<storage, read> rb_theta: array<f32>;
@group(0) @binding(7) var<storage, read> rb_v: array<f32>;
@group(0) @binding(8) var<storage, read_write> rb_rgx: array<f32>;

@compute @workgroup_size(256)
fn bn_r_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let q = quad(wid, nwg, lid);
    let c = p.c;
    let ch = q.z;
    // Tangent slices (tangents.wgsl). The statistics' forward and backward
    // rows (s, Σgy, Σgy·x̂) are shared, in slice 0; the R rows (Σx̂ẋ,
    // ΣR(gy), ΣR(gy)·x̂, Σgy·x̂̇) are the tangent's own.
    let k = wid.z;
    let o_gy = kslice(1u, arrayLength(&rb_gy), k);
    let o_rgy = kslice(2u, arrayLength(&rb_rgy), k);
    let o_xhat = kslice(3u, arrayLength(&rb_xhat), k);
    let o_xhd = kslice(4u, arrayLength(&rb_xhd), k);
    let o_st = kslice(5u, arrayLength(&rb_stats), k);
    let o_v = kslice(7u, arrayLength(&rb_v), k);
    let o_rgx = kslice(8u, arrayLength(&rb_rgx), k);
    let s = rb_stats[c + ch];
    let gamma = rb_theta[p.gamma_off + ch];
    let dgamma = rb_v[o_v + p.gamma_off + ch];
    let batch = BATCH;
    let m = count();
    let sum_gy = rb_stats[4u * c + ch];
    let sum_gy_xh = rb_stats[5u * c + ch];
    let m_g = gamma * sum_gy / m;
    let m_gx = gamma * sum_gy_xh / m;
    let m_rg = (dgamma * sum_gy + gamma * rb_stats[o_st + 6u * c + ch]) / m;
    let m_mix = (dgamma * sum_gy_xh + gamma * rb_stats[o_st + 7u * c + ch]
        + gamma * rb_stats[o_st + 8u * c + ch]) / m;
    let sdot = -s * s * rb_stats[o_st + 3u * c + ch] / m;
    let acc = ACC;
    for (var i = q.x; i < q.x + q.y; i++) {
        let gy = rb_gy[o_gy + i];
        let r_ghat = dgamma * gy + gamma * rb_rgy[o_rgy + i];
        var r = s * r_ghat;
        if (batch) {
            let xh = rb_xhat[o_xhat + i];
            let t = gamma * gy - m_g - xh * m_gx;
            let tdot = r_ghat - m_rg - rb_xhd[o_xhd + i] * m_gx - xh * m_mix;
            r = sdot * t + s * tdot;
        }
        if (acc) {
            r += rb_rgx[o_rgx + i];
        }
        rb_rgx[o_rgx + i] = r;
    }
}

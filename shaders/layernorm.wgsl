// nn.LayerNorm over the last dimension: `rows` rows of `d` features, one
// workgroup per row (a row's sums reduced in workgroup memory), and the
// parameter sums a thread per feature looping over the rows (no atomics:
// deterministic). The passes of src/layers/layernorm.rs, with ⟨a⟩ the mean
// over a row, s = 1/√(σ² + ε), x̂ = (x − μ)·s:
//   ln_forward:     x̂, s, y = γ⊙x̂ + β
//   ln_r_forward:   ẋ̂ = s·(ẋ − ⟨ẋ⟩ − x̂·⟨x̂ẋ⟩), ⟨x̂ẋ⟩, ẏ = γ⊙ẋ̂ + v_γ⊙x̂ + v_β
//   ln_backward:    g = γ⊙gy, gx (+)= s·(g − ⟨g⟩ − x̂·⟨g x̂⟩)
//   ln_r_backward:  R(g) = v_γ⊙gy + γ⊙R(gy), ṡ/s = −s·⟨x̂ẋ⟩,
//                   R(gx) (+)= (ṡ/s)·gx + s·(R(g) − ⟨R(g)⟩ − ẋ̂·⟨g x̂⟩
//                              − x̂·⟨R(g)x̂ + g ẋ̂⟩)
//   ln_param_sums:  tgt[β] += Σ_rows a, tgt[γ] += Σ_rows a·x̂ (+ c·ẋ̂ with
//                   PAIR2): the gradient (a = gy) or Hv (a = R(gy), c = gy)
// The x̂ buffer holds rows·d values x̂ then the rows' s; the ẋ̂ buffer
// rows·d values ẋ̂ then the rows' ⟨x̂ẋ⟩ (a tangent's own, in its slice).
// μ and σ² are two passes over the row (no E[x²] − μ² cancellation).

struct LnParams {
    rows: u32, d: u32, gamma_off: u32, beta_off: u32,
    eps: f32, _p0: u32, _p1: u32, _p2: u32,
}

override ACC: bool = false;
override PAIR2: bool = false;

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: LnParams;

var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The workgroup's sums of every thread's (a, b), to every thread.
fn wg_sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    red_a[lid] = a;
    red_b[lid] = b;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st / 2u) {
        if (lid < st) {
            red_a[lid] += red_a[lid + st];
            red_b[lid] += red_b[lid + st];
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red_a[0], red_b[0]);
    workgroupBarrier();
    return r;
}

// The row means of every thread's partial sums (a, b) over its features.
fn row_means(lid: u32, a: f32, b: f32) -> vec2<f32> {
    return wg_sum2(lid, a, b) * (1.0 / f32(p.d));
}

// ---- forward
@group(0) @binding(1) var<storage, read> f_x: array<f32>;
@group(0) @binding(2) var<storage, read> f_theta: array<f32>;
@group(0) @binding(3) var<storage, read_write> f_xhat: array<f32>;
@group(0) @binding(4) var<storage, read_write> f_y: array<f32>;

@compute @workgroup_size(256)
fn ln_forward(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    var a = 0.0;
    for (var j = lid; j < p.d; j += WG) { a += f_x[base + j]; }
    let mu = row_means(lid, a, 0.0).x;
    var q = 0.0;
    for (var j = lid; j < p.d; j += WG) {
        let c = f_x[base + j] - mu;
        q += c * c;
    }
    let sig2 = row_means(lid, q, 0.0).x;
    let s = 1.0 / sqrt(sig2 + p.eps);
    for (var j = lid; j < p.d; j += WG) {
        let h = (f_x[base + j] - mu) * s;
        f_xhat[base + j] = h;
        f_y[base + j] = f_theta[p.gamma_off + j] * h + f_theta[p.beta_off + j];
    }
    if (lid == 0u) { f_xhat[p.rows * p.d + row] = s; }
}

// ---- R-forward
@group(0) @binding(1) var<storage, read> rf_dx: array<f32>;
@group(0) @binding(2) var<storage, read> rf_xhat: array<f32>;
@group(0) @binding(3) var<storage, read> rf_theta: array<f32>;
@group(0) @binding(4) var<storage, read> rf_v: array<f32>;
@group(0) @binding(5) var<storage, read_write> rf_xhd: array<f32>;
@group(0) @binding(6) var<storage, read_write> rf_dy: array<f32>;

@compute @workgroup_size(256)
fn ln_r_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg);
    if (row >= p.rows) { return; }
    // Tangent slices (tangents.wgsl).
    let k = wid.z;
    let o_dx = kslice(1u, arrayLength(&rf_dx), k);
    let o_v = kslice(4u, arrayLength(&rf_v), k);
    let o_xhd = kslice(5u, arrayLength(&rf_xhd), k);
    let o_dy = kslice(6u, arrayLength(&rf_dy), k);
    let base = row * p.d;
    let s = rf_xhat[p.rows * p.d + row];
    var a = 0.0;
    var b = 0.0;
    for (var j = lid; j < p.d; j += WG) {
        let e = rf_dx[o_dx + base + j];
        a += e;
        b += rf_xhat[base + j] * e;
    }
    let sums = row_means(lid, a, b);
    for (var j = lid; j < p.d; j += WG) {
        let h = rf_xhat[base + j];
        let e = s * (rf_dx[o_dx + base + j] - sums.x - h * sums.y);
        rf_xhd[o_xhd + base + j] = e;
        rf_dy[o_dy + base + j] = rf_theta[p.gamma_off + j] * e + rf_v[o_v + p.gamma_off + j] * h
            + rf_v[o_v + p.beta_off + j];
    }
    if (lid == 0u) { rf_xhd[o_xhd + p.rows * p.d + row] = sums.y; }
}

// ---- backward: gx (+)= s·(g − ⟨g⟩ − x̂·⟨g x̂⟩), g = γ⊙gy
@group(0) @binding(1) var<storage, read> b_gy: array<f32>;
@group(0) @binding(2) var<storage, read> b_xhat: array<f32>;
@group(0) @binding(3) var<storage, read> b_theta: array<f32>;
@group(0) @binding(4) var<storage, read_write> b_gx: array<f32>;

// g = γ⊙gy at feature j of the row at `base`.
fn b_g(base: u32, j: u32) -> f32 {
    return b_theta[p.gamma_off + j] * b_gy[base + j];
}

@compute @workgroup_size(256)
fn ln_backward(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    let s = b_xhat[p.rows * p.d + row];
    var a = 0.0;
    var b = 0.0;
    for (var j = lid; j < p.d; j += WG) {
        let g = b_g(base, j);
        a += g;
        b += g * b_xhat[base + j];
    }
    let sums = row_means(lid, a, b);
    for (var j = lid; j < p.d; j += WG) {
        let g = b_g(base, j);
        var v = s * (g - sums.x - b_xhat[base + j] * sums.y);
        if (ACC) { v += b_gx[base + j]; }
        b_gx[base + j] = v;
    }
}

// ---- R-backward
@group(0) @binding(1) var<storage, read> rb_g: array<f32>;
@group(0) @binding(2) var<storage, read> rb_rgy: array<f32>;
@group(0) @binding(3) var<storage, read> rb_xhat: array<f32>;
@group(0) @binding(4) var<storage, read> rb_xhd: array<f32>;
@group(0) @binding(5) var<storage, read> rb_theta: array<f32>;
@group(0) @binding(6) var<storage, read> rb_v: array<f32>;
@group(0) @binding(7) var<storage, read_write> rb_gx: array<f32>;

// (g, R(g), x̂) at feature j of the row at `base`, tangent offsets o_g,
// o_rgy, o_v: g = γ⊙gy, R(g) = v_γ⊙gy + γ⊙R(gy).
fn rb_terms(base: u32, j: u32, o_g: u32, o_rgy: u32, o_v: u32) -> vec3<f32> {
    let gy = rb_g[o_g + base + j];
    let gamma = rb_theta[p.gamma_off + j];
    let rg = rb_v[o_v + p.gamma_off + j] * gy + gamma * rb_rgy[o_rgy + base + j];
    return vec3<f32>(gamma * gy, rg, rb_xhat[base + j]);
}

@compute @workgroup_size(256)
fn ln_r_backward(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg);
    if (row >= p.rows) { return; }
    let k = wid.z;
    let o_g = kslice(1u, arrayLength(&rb_g), k);
    let o_rgy = kslice(2u, arrayLength(&rb_rgy), k);
    let o_xhd = kslice(4u, arrayLength(&rb_xhd), k);
    let o_v = kslice(6u, arrayLength(&rb_v), k);
    let o_gx = kslice(7u, arrayLength(&rb_gx), k);
    let base = row * p.d;
    let s = rb_xhat[p.rows * p.d + row];
    let xdx = rb_xhd[o_xhd + p.rows * p.d + row];
    var a = 0.0;
    var b = 0.0;
    var c = 0.0;
    var e = 0.0;
    for (var j = lid; j < p.d; j += WG) {
        let t = rb_terms(base, j, o_g, o_rgy, o_v);
        let g = t.x;
        let rg = t.y;
        let h = t.z;
        a += g;
        b += g * h;
        c += rg;
        e += rg * h + g * rb_xhd[o_xhd + base + j];
    }
    let s1 = row_means(lid, a, b);
    let s2 = row_means(lid, c, e);
    let ds_s = -s * xdx;
    for (var j = lid; j < p.d; j += WG) {
        let t = rb_terms(base, j, o_g, o_rgy, o_v);
        let g = t.x;
        let rg = t.y;
        let h = t.z;
        let hd = rb_xhd[o_xhd + base + j];
        let gx = s * (g - s1.x - h * s1.y);
        var v = ds_s * gx + s * (rg - s2.x - hd * s1.y - h * s2.y);
        if (ACC) { v += rb_gx[o_gx + base + j]; }
        rb_gx[o_gx + base + j] = v;
    }
}

// ---- parameter sums: a thread per feature j, rows in order.
@group(0) @binding(1) var<storage, read> ps_a: array<f32>;
@group(0) @binding(2) var<storage, read> ps_xhat: array<f32>;
@group(0) @binding(3) var<storage, read> ps_c: array<f32>;
@group(0) @binding(4) var<storage, read> ps_xhd: array<f32>;
@group(0) @binding(5) var<storage, read_write> ps_tgt: array<f32>;

@compute @workgroup_size(256)
fn ln_param_sums(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let j = (wid.x + wid.y * nwg.x) * WG + lid;
    if (j >= p.d) { return; }
    let k = wid.z;
    let o_a = kslice(1u, arrayLength(&ps_a), k);
    let o_tgt = kslice(5u, arrayLength(&ps_tgt), k);
    var sb = 0.0;
    var sg = 0.0;
    if (PAIR2) {
        let o_c = kslice(3u, arrayLength(&ps_c), k);
        let o_xhd = kslice(4u, arrayLength(&ps_xhd), k);
        for (var r = 0u; r < p.rows; r++) {
            let i = r * p.d + j;
            let av = ps_a[o_a + i];
            sb += av;
            sg += av * ps_xhat[i] + ps_c[o_c + i] * ps_xhd[o_xhd + i];
        }
    } else {
        for (var r = 0u; r < p.rows; r++) {
            let i = r * p.d + j;
            let av = ps_a[o_a + i];
            sb += av;
            sg += av * ps_xhat[i];
        }
    }
    ps_tgt[o_tgt + p.beta_off + j] += sb;
    ps_tgt[o_tgt + p.gamma_off + j] += sg;
}

// Multi-head softmax attention (`mha`; float64 reference and formulas in
// src/layers/attention.rs, plan in src/layers/attention/gpu.rs). Per
// sample s and head h (width e, c = 1/√e), q, k, v the head's [T, e]
// slices of the fused input x [T, 3D] (q | k | v along the features; the
// plan packs three separate inputs into that layout first):
//   S = c·q·kᵀ (j > i masked when causal), P = softmax(S) by rows, O = P·v.
// Kernels (a workgroup per (s, h, row i), or per (s, h, column j) for the
// `_cols` ones; `Grid::Groups(n·H·T)`):
//   attn_forward:          P (state), y = P·v
//   attn_r_forward:        Ṡ = c(q̇kᵀ + qk̇ᵀ), Ṗ = P⊙(Ṡ − rowsum(P⊙Ṡ)) (state),
//                          ẏ = Ṗ·v + P·v̇
//   attn_backward_rows:    gP = gO·vᵀ, gS = P⊙(gP − rowsum(P⊙gP)) (scratch),
//                          gq (+)= c·gS·k
//   attn_backward_cols:    WHICH 0: gk (+)= c·gSᵀ·q; 1: gv (+)= Pᵀ·gO
//   attn_r_backward_rows:  R(gP) = R(gO)·vᵀ + gO·v̇ᵀ,
//                          gS and R(gS) = Ṗ⊙(gP − δ) + P⊙(R(gP) − Rδ)
//                          (scratch),
//                          δ = rowsum(P⊙gP), Rδ = rowsum(Ṗ⊙gP + P⊙R(gP)),
//                          R(gq) (+)= c·(R(gS)·k + gS·k̇)
//   attn_r_backward_cols:  WHICH 0: R(gk) (+)= c·(R(gS)ᵀ·q + gSᵀ·q̇);
//                          1: R(gv) (+)= Ṗᵀ·gO + Pᵀ·R(gO)
// State: `ps` holds P [n, H, T, T], `pd` (one slice per tangent) Ṗ; the
// `sc` scratch (shared by the layers, one slice per tangent) gS, then
// R(gS) at `pt`, written by the rows kernel for the columns kernel that
// follows it. Masked entries are stored as 0.
// A row of T ≤ TMAX scores sits in workgroup memory (`ra`, `rb`), the
// row's q (or gO) of e ≤ 256 in `va`, `vb`; a thread per column computes
// the dot products over e, the products with v (or k, q, gO) split the
// 256 threads in ⌊256/e⌋ parts of e features, summed in workgroup memory.

struct AttnParams {
    n: u32, t: u32, d: u32, heads: u32,
    e: u32, causal: u32, pt: u32, scale: f32,
}

override ACC: bool = false;
override WHICH: u32 = 0u;

const WG: u32 = 256u;
const TMAX: u32 = 1024u;

@group(0) @binding(0) var<uniform> p: AttnParams;

var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;
var<workgroup> va: array<f32, 256>;
var<workgroup> vb: array<f32, 256>;
var<workgroup> ra: array<f32, TMAX>;
var<workgroup> rb: array<f32, TMAX>;

// Sample, head and row (or column) of a workgroup.
struct Item { s: u32, h: u32, i: u32 }

fn item(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn item_of(g: u32) -> Item {
    return Item(g / (p.t * p.heads), (g / p.t) % p.heads, g % p.t);
}

fn items() -> u32 {
    return p.n * p.heads * p.t;
}

// Element f of q (w = 0), k (1) or v (2) of head h, token i, sample s.
fn xi(s: u32, i: u32, w: u32, h: u32, f: u32) -> u32 {
    return (s * p.t + i) * 3u * p.d + w * p.d + h * p.e + f;
}

// Element f of head h's output at token i of sample s ([T, D]).
fn yi(s: u32, i: u32, h: u32, f: u32) -> u32 {
    return (s * p.t + i) * p.d + h * p.e + f;
}

// Entry (i, j) of the [T, T] matrix of (s, h).
fn pi(s: u32, h: u32, i: u32, j: u32) -> u32 {
    return ((s * p.heads + h) * p.t + i) * p.t + j;
}

// Columns of row i that attend: j ≤ i when causal.
fn ncols(i: u32) -> u32 {
    if (p.causal != 0u) {
        return i + 1u;
    }
    return p.t;
}

// The first row that attends to column j.
fn first_row(j: u32) -> u32 {
    if (p.causal != 0u) {
        return j;
    }
    return 0u;
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

// The workgroup's maximum of every thread's a, to every thread.
fn wg_max(lid: u32, a: f32) -> f32 {
    red_a[lid] = a;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st / 2u) {
        if (lid < st) {
            red_a[lid] = max(red_a[lid], red_a[lid + st]);
        }
        workgroupBarrier();
    }
    let r = red_a[0];
    workgroupBarrier();
    return r;
}

// Feature and part of a thread in the products over rows or columns.
fn feat(lid: u32) -> u32 {
    return lid % p.e;
}
fn part(lid: u32) -> u32 {
    return lid / p.e;
}
fn parts() -> u32 {
    return WG / p.e;
}

// Feature lid's total (lid < e) of the parts' partial sums.
fn parts_sum(lid: u32, a: f32) -> f32 {
    red_a[lid] = a;
    workgroupBarrier();
    var tot = 0.0;
    if (lid < p.e) {
        for (var q = 0u; q < parts(); q++) {
            tot += red_a[lid + q * p.e];
        }
    }
    workgroupBarrier();
    return tot;
}

// ---- forward
@group(0) @binding(1) var<storage, read> f_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> f_ps: array<f32>;
@group(0) @binding(3) var<storage, read_write> f_y: array<f32>;

@compute @workgroup_size(256)
fn attn_forward(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let g = item(wid, nwg);
    if (g >= items()) { return; }
    let r = item_of(g);
    let nc = ncols(r.i);
    for (var f = lid; f < p.e; f += WG) {
        va[f] = f_x[xi(r.s, r.i, 0u, r.h, f)];
    }
    workgroupBarrier();
    var m = -3.0e38;
    for (var j = lid; j < nc; j += WG) {
        var acc = 0.0;
        for (var f = 0u; f < p.e; f++) {
            acc += va[f] * f_x[xi(r.s, j, 1u, r.h, f)];
        }
        let sc = acc * p.scale;
        ra[j] = sc;
        m = max(m, sc);
    }
    let mx = wg_max(lid, m);
    var z = 0.0;
    for (var j = lid; j < nc; j += WG) {
        let ex = exp(ra[j] - mx);
        ra[j] = ex;
        z += ex;
    }
    let inv = 1.0 / wg_sum2(lid, z, 0.0).x;
    for (var j = lid; j < p.t; j += WG) {
        var pv = 0.0;
        if (j < nc) {
            pv = ra[j] * inv;
            ra[j] = pv;
        }
        f_ps[pi(r.s, r.h, r.i, j)] = pv;
    }
    workgroupBarrier();
    let c = feat(lid);
    var acc = 0.0;
    if (part(lid) < parts()) {
        for (var j = part(lid); j < nc; j += parts()) {
            acc += ra[j] * f_x[xi(r.s, j, 2u, r.h, c)];
        }
    }
    let o = parts_sum(lid, acc);
    if (lid < p.e) {
        f_y[yi(r.s, r.i, r.h, lid)] = o;
    }
}

// ---- R-forward
@group(0) @binding(1) var<storage, read> rf_x: array<f32>;
@group(0) @binding(2) var<storage, read> rf_dx: array<f32>;
@group(0) @binding(3) var<storage, read> rf_ps: array<f32>;
@group(0) @binding(4) var<storage, read_write> rf_pd: array<f32>;
@group(0) @binding(5) var<storage, read_write> rf_dy: array<f32>;

@compute @workgroup_size(256)
fn attn_r_forward(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let g = item(wid, nwg);
    if (g >= items()) { return; }
    let r = item_of(g);
    let nc = ncols(r.i);
    // Tangent slices (tangents.wgsl).
    let k = wid.z;
    let o_x = kslice(1u, arrayLength(&rf_x), k);
    let o_dx = kslice(2u, arrayLength(&rf_dx), k);
    let o_ps = kslice(3u, arrayLength(&rf_ps), k);
    let o_pd = kslice(4u, arrayLength(&rf_pd), k);
    let o_dy = kslice(5u, arrayLength(&rf_dy), k);
    for (var f = lid; f < p.e; f += WG) {
        va[f] = rf_x[o_x + xi(r.s, r.i, 0u, r.h, f)];
        vb[f] = rf_dx[o_dx + xi(r.s, r.i, 0u, r.h, f)];
    }
    workgroupBarrier();
    var a = 0.0;
    for (var j = lid; j < nc; j += WG) {
        var acc = 0.0;
        for (var f = 0u; f < p.e; f++) {
            let at = xi(r.s, j, 1u, r.h, f);
            acc += vb[f] * rf_x[o_x + at] + va[f] * rf_dx[o_dx + at];
        }
        let sd = acc * p.scale;
        let pv = rf_ps[o_ps + pi(r.s, r.h, r.i, j)];
        ra[j] = pv;
        rb[j] = sd;
        a += pv * sd;
    }
    let mu = wg_sum2(lid, a, 0.0).x;
    for (var j = lid; j < p.t; j += WG) {
        var pd = 0.0;
        if (j < nc) {
            pd = ra[j] * (rb[j] - mu);
            rb[j] = pd;
        }
        rf_pd[o_pd + pi(r.s, r.h, r.i, j)] = pd;
    }
    workgroupBarrier();
    let c = feat(lid);
    var acc = 0.0;
    if (part(lid) < parts()) {
        for (var j = part(lid); j < nc; j += parts()) {
            let at = xi(r.s, j, 2u, r.h, c);
            acc += rb[j] * rf_x[o_x + at] + ra[j] * rf_dx[o_dx + at];
        }
    }
    let o = parts_sum(lid, acc);
    if (lid < p.e) {
        rf_dy[o_dy + yi(r.s, r.i, r.h, lid)] = o;
    }
}

// ---- backward, by rows: gS (state) and gq
@group(0) @binding(1) var<storage, read> br_x: array<f32>;
@group(0) @binding(2) var<storage, read> br_ps: array<f32>;
@group(0) @binding(3) var<storage, read> br_go: array<f32>;
@group(0) @binding(4) var<storage, read_write> br_sc: array<f32>;
@group(0) @binding(5) var<storage, read_write> br_gx: array<f32>;

@compute @workgroup_size(256)
fn attn_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let g = item(wid, nwg);
    if (g >= items()) { return; }
    let r = item_of(g);
    let nc = ncols(r.i);
    for (var f = lid; f < p.e; f += WG) {
        va[f] = br_go[yi(r.s, r.i, r.h, f)];
    }
    workgroupBarrier();
    var a = 0.0;
    for (var j = lid; j < nc; j += WG) {
        var gp = 0.0;
        for (var f = 0u; f < p.e; f++) {
            gp += va[f] * br_x[xi(r.s, j, 2u, r.h, f)];
        }
        let pv = br_ps[pi(r.s, r.h, r.i, j)];
        ra[j] = pv;
        rb[j] = gp;
        a += pv * gp;
    }
    let delta = wg_sum2(lid, a, 0.0).x;
    for (var j = lid; j < p.t; j += WG) {
        var gs = 0.0;
        if (j < nc) {
            gs = ra[j] * (rb[j] - delta);
            rb[j] = gs;
        }
        br_sc[pi(r.s, r.h, r.i, j)] = gs;
    }
    workgroupBarrier();
    let c = feat(lid);
    var acc = 0.0;
    if (part(lid) < parts()) {
        for (var j = part(lid); j < nc; j += parts()) {
            acc += rb[j] * br_x[xi(r.s, j, 1u, r.h, c)];
        }
    }
    let o = parts_sum(lid, acc) * p.scale;
    if (lid < p.e) {
        let at = xi(r.s, r.i, 0u, r.h, lid);
        if (ACC) {
            br_gx[at] += o;
        } else {
            br_gx[at] = o;
        }
    }
}

// ---- backward, by columns: gk (WHICH 0) or gv (WHICH 1)
@group(0) @binding(1) var<storage, read> bc_x: array<f32>;
@group(0) @binding(2) var<storage, read> bc_ps: array<f32>;
@group(0) @binding(3) var<storage, read> bc_go: array<f32>;
@group(0) @binding(4) var<storage, read> bc_sc: array<f32>;
@group(0) @binding(5) var<storage, read_write> bc_gx: array<f32>;

@compute @workgroup_size(256)
fn attn_backward_cols(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let g = item(wid, nwg);
    if (g >= items()) { return; }
    let r = item_of(g);
    let j = r.i;
    let i0 = first_row(j);
    for (var i = i0 + lid; i < p.t; i += WG) {
        if (WHICH == 0u) {
            ra[i] = bc_sc[pi(r.s, r.h, i, j)];
        } else {
            ra[i] = bc_ps[pi(r.s, r.h, i, j)];
        }
    }
    workgroupBarrier();
    let c = feat(lid);
    var acc = 0.0;
    if (part(lid) < parts()) {
        for (var i = i0 + part(lid); i < p.t; i += parts()) {
            if (WHICH == 0u) {
                acc += ra[i] * bc_x[xi(r.s, i, 0u, r.h, c)];
            } else {
                acc += ra[i] * bc_go[yi(r.s, i, r.h, c)];
            }
        }
    }
    var o = parts_sum(lid, acc);
    if (WHICH == 0u) {
        o *= p.scale;
    }
    if (lid < p.e) {
        let at = xi(r.s, j, 1u + WHICH, r.h, lid);
        if (ACC) {
            bc_gx[at] += o;
        } else {
            bc_gx[at] = o;
        }
    }
}

// ---- R-backward, by rows: R(gS) (state) and R(gq)
@group(0) @binding(1) var<storage, read> rr_x: array<f32>;
@group(0) @binding(2) var<storage, read> rr_dx: array<f32>;
@group(0) @binding(3) var<storage, read> rr_ps: array<f32>;
@group(0) @binding(4) var<storage, read> rr_pd: array<f32>;
@group(0) @binding(5) var<storage, read> rr_go: array<f32>;
@group(0) @binding(6) var<storage, read> rr_rgo: array<f32>;
@group(0) @binding(7) var<storage, read_write> rr_sc: array<f32>;
@group(0) @binding(8) var<storage, read_write> rr_gx: array<f32>;

@compute @workgroup_size(256)
fn attn_r_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let g = item(wid, nwg);
    if (g >= items()) { return; }
    let r = item_of(g);
    let nc = ncols(r.i);
    let k = wid.z;
    let o_x = kslice(1u, arrayLength(&rr_x), k);
    let o_dx = kslice(2u, arrayLength(&rr_dx), k);
    let o_ps = kslice(3u, arrayLength(&rr_ps), k);
    let o_pd = kslice(4u, arrayLength(&rr_pd), k);
    let o_go = kslice(5u, arrayLength(&rr_go), k);
    let o_rgo = kslice(6u, arrayLength(&rr_rgo), k);
    let o_sc = kslice(7u, arrayLength(&rr_sc), k);
    let o_gx = kslice(8u, arrayLength(&rr_gx), k);
    for (var f = lid; f < p.e; f += WG) {
        va[f] = rr_go[o_go + yi(r.s, r.i, r.h, f)];
        vb[f] = rr_rgo[o_rgo + yi(r.s, r.i, r.h, f)];
    }
    workgroupBarrier();
    var a = 0.0;
    var b = 0.0;
    for (var j = lid; j < nc; j += WG) {
        var gp = 0.0;
        var rgp = 0.0;
        for (var f = 0u; f < p.e; f++) {
            let at = xi(r.s, j, 2u, r.h, f);
            let vv = rr_x[o_x + at];
            gp += va[f] * vv;
            rgp += vb[f] * vv + va[f] * rr_dx[o_dx + at];
        }
        let at = pi(r.s, r.h, r.i, j);
        let pv = rr_ps[o_ps + at];
        let pd = rr_pd[o_pd + at];
        ra[j] = gp;
        rb[j] = rgp;
        a += pv * gp;
        b += pd * gp + pv * rgp;
    }
    let sums = wg_sum2(lid, a, b);
    for (var j = lid; j < p.t; j += WG) {
        let at = pi(r.s, r.h, r.i, j);
        var gs = 0.0;
        var rgs = 0.0;
        if (j < nc) {
            let pv = rr_ps[o_ps + at];
            let pd = rr_pd[o_pd + at];
            let gp = ra[j] - sums.x;
            gs = pv * gp;
            rgs = pd * gp + pv * (rb[j] - sums.y);
            ra[j] = gs;
            rb[j] = rgs;
        }
        rr_sc[o_sc + at] = gs;
        rr_sc[o_sc + p.pt + at] = rgs;
    }
    workgroupBarrier();
    let c = feat(lid);
    var acc = 0.0;
    if (part(lid) < parts()) {
        for (var j = part(lid); j < nc; j += parts()) {
            let at = xi(r.s, j, 1u, r.h, c);
            acc += rb[j] * rr_x[o_x + at] + ra[j] * rr_dx[o_dx + at];
        }
    }
    let o = parts_sum(lid, acc) * p.scale;
    if (lid < p.e) {
        let at = o_gx + xi(r.s, r.i, 0u, r.h, lid);
        if (ACC) {
            rr_gx[at] += o;
        } else {
            rr_gx[at] = o;
        }
    }
}

// ---- R-backward, by columns: R(gk) (WHICH 0) or R(gv) (WHICH 1)
@group(0) @binding(1) var<storage, read> rc_x: array<f32>;
@group(0) @binding(2) var<storage, read> rc_dx: array<f32>;
@group(0) @binding(3) var<storage, read> rc_ps: array<f32>;
@group(0) @binding(4) var<storage, read> rc_pd: array<f32>;
@group(0) @binding(5) var<storage, read> rc_go: array<f32>;
@group(0) @binding(6) var<storage, read> rc_rgo: array<f32>;
@group(0) @binding(7) var<storage, read> rc_sc: array<f32>;
@group(0) @binding(8) var<storage, read_write> rc_gx: array<f32>;

@compute @workgroup_size(256)
fn attn_r_backward_cols(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let g = item(wid, nwg);
    if (g >= items()) { return; }
    let r = item_of(g);
    let j = r.i;
    let i0 = first_row(j);
    let k = wid.z;
    let o_x = kslice(1u, arrayLength(&rc_x), k);
    let o_dx = kslice(2u, arrayLength(&rc_dx), k);
    let o_ps = kslice(3u, arrayLength(&rc_ps), k);
    let o_pd = kslice(4u, arrayLength(&rc_pd), k);
    let o_go = kslice(5u, arrayLength(&rc_go), k);
    let o_rgo = kslice(6u, arrayLength(&rc_rgo), k);
    let o_sc = kslice(7u, arrayLength(&rc_sc), k);
    let o_gx = kslice(8u, arrayLength(&rc_gx), k);
    for (var i = i0 + lid; i < p.t; i += WG) {
        let at = pi(r.s, r.h, i, j);
        if (WHICH == 0u) {
            // R(gS) and gS.
            ra[i] = rc_sc[o_sc + p.pt + at];
            rb[i] = rc_sc[o_sc + at];
        } else {
            // Ṗ and P.
            ra[i] = rc_pd[o_pd + at];
            rb[i] = rc_ps[o_ps + at];
        }
    }
    workgroupBarrier();
    let c = feat(lid);
    var acc = 0.0;
    if (part(lid) < parts()) {
        for (var i = i0 + part(lid); i < p.t; i += parts()) {
            if (WHICH == 0u) {
                let at = xi(r.s, i, 0u, r.h, c);
                acc += ra[i] * rc_x[o_x + at] + rb[i] * rc_dx[o_dx + at];
            } else {
                let at = yi(r.s, i, r.h, c);
                acc += ra[i] * rc_go[o_go + at] + rb[i] * rc_rgo[o_rgo + at];
            }
        }
    }
    var o = parts_sum(lid, acc);
    if (WHICH == 0u) {
        o *= p.scale;
    }
    if (lid < p.e) {
        let at = o_gx + xi(r.s, j, 1u + WHICH, r.h, lid);
        if (ACC) {
            rc_gx[at] += o;
        } else {
            rc_gx[at] = o;
        }
    }
}

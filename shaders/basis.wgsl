// A Lanczos basis kept on the device (src/gpu/basis.rs): the two
// products full reorthogonalisation takes per pass, c = Qᵀw and Q·c, with
// compensated sums, so that their error does not grow with the length of
// the vectors (resnet18: 11.7M entries) or the number of them.
//
// Q is stored in f32, one chunk of rows per buffer: vector j's rows of a
// chunk at j·stride .. j·stride + rows.
//
// Compensation: every addition is Knuth's TwoSum, which returns the
// rounded sum and its exact rounding error; the errors are added up
// separately and the (sum, error) pairs are kept through the workgroup
// tree and handed to the host, which adds them in f64. What is left is
// the rounding of each product (2⁻²⁴ of it), not of the running sum.
//
// TwoSum only works if every operation is rounded as written. WGSL has no
// `precise`, and drivers may simplify float algebra as if it were exact:
// on Mesa (lavapipe and llvmpipe) a sum whose exact value is 16 came out
// 0.53 off with plain TwoSum (plain f32: 3.98 off), and exact once the
// intermediates pass through `opaque`, an XOR with a uniform zero the
// compiler cannot see through (tests/gpu_basis.rs).

struct BasisParams {
    rows: u32, stride: u32, vectors: u32, segments: u32,
    // Always 0 (see `opaque`).
    seg_rows: u32, zero: u32, _p1: u32, _p2: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: BasisParams;
@group(0) @binding(1) var<storage, read> basis: array<f32>;
// basis_dots: the chunk's rows of w; basis_combine: the coefficients c.
@group(0) @binding(2) var<storage, read> vec_in: array<f32>;
// basis_dots: (sum, error) per (vector, segment); basis_combine: Q·c.
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> part_hi: array<f32, 256>;
var<workgroup> part_lo: array<f32, 256>;

// x, hidden from the compiler's algebra.
fn opaque(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ p.zero);
}

// (a + b rounded, its rounding error): exact whatever the magnitudes.
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = opaque(a + b);
    let bb = opaque(s - a);
    return vec2<f32>(s, (a - opaque(s - bb)) + (b - bb));
}

// acc (sum, error) + x.
fn add_term(acc: vec2<f32>, x: f32) -> vec2<f32> {
    let t = two_sum(acc.x, x);
    return vec2<f32>(t.x, acc.y + t.y);
}

// acc + another (sum, error) pair.
fn add_pair(acc: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let t = two_sum(acc.x, b.x);
    return vec2<f32>(t.x, acc.y + b.y + t.y);
}

// out[2·(j·segments + g) ..] = (sum, error) of Σ basis[j·stride + i]·w[i]
// over segment g's rows i ∈ [g·seg_rows, (g + 1)·seg_rows) ∩ [0, rows):
// one workgroup per (vector j, segment g), threads striding the segment.
@compute @workgroup_size(256)
fn basis_dots(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let gid = wid.x + wid.y * nwg.x;
    // Whole workgroups past the end leave together (the barriers below
    // stay in uniform control flow).
    if (gid >= p.vectors * p.segments) {
        return;
    }
    let j = gid / p.segments;
    let g = gid % p.segments;
    let start = g * p.seg_rows;
    let end = min(start + p.seg_rows, p.rows);
    let base = j * p.stride;
    var acc = vec2<f32>(0.0);
    for (var i = start + lid; i < end; i += WG) {
        acc = add_term(acc, basis[base + i] * vec_in[i]);
    }
    part_hi[lid] = acc.x;
    part_lo[lid] = acc.y;
    workgroupBarrier();
    if (lid < 16u) {
        var t = vec2<f32>(0.0);
        for (var k = 0u; k < 16u; k++) {
            t = add_pair(t, vec2<f32>(part_hi[lid * 16u + k], part_lo[lid * 16u + k]));
        }
        part_hi[lid * 16u] = t.x;
        part_lo[lid * 16u] = t.y;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var t = vec2<f32>(0.0);
        for (var k = 0u; k < 16u; k++) {
            t = add_pair(t, vec2<f32>(part_hi[k * 16u], part_lo[k * 16u]));
        }
        out[2u * gid] = t.x;
        out[2u * gid + 1u] = t.y;
    }
}

// out[i] = Σ_{j < vectors} c[j]·basis[j·stride + i] for i < rows: a thread
// per row, compensated over j.
@compute @workgroup_size(256)
fn basis_combine(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.rows) {
        return;
    }
    var acc = vec2<f32>(0.0);
    for (var j = 0u; j < p.vectors; j++) {
        acc = add_term(acc, vec_in[j] * basis[j * p.stride + i]);
    }
    out[i] = acc.x + acc.y;
}

// Reductions that must stay accurate in f32 at batch 128 on 32x32 images:
// each thread sums a strided share (at most n·hw/256 terms), then a
// workgroup tree combines the 256 partial sums.

struct ReduceParams {
    n: u32, c: u32, hw: u32, out_a: u32,
    out_b: u32, flags: u32, len: u32, _p0: u32,
}

const WG: u32 = 256u;
const HAS_B: u32 = 1u;
const ACC: u32 = 2u;

@group(0) @binding(0) var<uniform> p: ReduceParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> sum_a: array<f32, 256>;
var<workgroup> sum_ab: array<f32, 256>;

// Per channel ch of [n, c, hw]: out[out_a + ch] = Σ a, and with HAS_B
// out[out_b + ch] = Σ a·b. One workgroup per channel.
@compute @workgroup_size(256)
fn channel_sums(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let ch = wid.x;
    let count = p.n * p.hw;
    let has_b = (p.flags & HAS_B) != 0u;
    var sa = 0.0;
    var sab = 0.0;
    for (var j = lid; j < count; j += WG) {
        let i = ((j / p.hw) * p.c + ch) * p.hw + j % p.hw;
        let av = a[i];
        sa += av;
        if (has_b) {
            sab += av * b[i];
        }
    }
    sum_a[lid] = sa;
    sum_ab[lid] = sab;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sum_a[lid] += sum_a[lid + s];
            sum_ab[lid] += sum_ab[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var ra = sum_a[0];
        var rab = sum_ab[0];
        if ((p.flags & ACC) != 0u) {
            ra += out[p.out_a + ch];
            if (has_b) { rab += out[p.out_b + ch]; }
        }
        out[p.out_a + ch] = ra;
        if (has_b) { out[p.out_b + ch] = rab; }
    }
}

// out[out_a] = Σ a[0..len] in one workgroup (the per-sample losses).
@compute @workgroup_size(256)
fn sum_all(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var j = lid; j < p.len; j += WG) {
        s += a[j];
    }
    sum_a[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            sum_a[lid] += sum_a[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[p.out_a] = sum_a[0];
    }
}

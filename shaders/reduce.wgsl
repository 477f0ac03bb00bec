// Reductions that must stay accurate in f32 at batch 128 on 32x32 images:
// each thread sums a strided share (at most n·hw/256 terms), then a
// workgroup tree combines the 256 partial sums.

struct ReduceParams {
    n: u32, c: u32, hw: u32, out_a: u32,
    out_b: u32, len: u32, out_d: u32,
    // bn_param_sums: where Σa and Σa·b (+ Σc·d) go in `tgt`.
    t_a: u32, t_b: u32,
    // Split reductions (STAGE 1, 2): segments per channel, and elements
    // per segment (the last may have fewer).
    seg: u32, span: u32, _p0: u32,
}

const WG: u32 = 256u;
// channel_sums: also Σ a·b; add into the output. bn_param_sums: also Σ c·d.
override HAS_B: bool = false;
override ACC: bool = false;
override PAIR2: bool = false;
// channel_sums and bn_param_sums on GPUs (src/gpu/reduce.rs): a workgroup
// per channel (STAGE 0, the emulators' form: barriers and dispatches are
// what they pay for) leaves most of a GPU idle. Split, STAGE 1 runs a
// workgroup per (channel, segment of `span` elements), flattened
// ch·seg + s, and writes its sums to the first writable binding at
// partial rows of c·seg floats: [(row·c + ch)·seg + s], rows Σa, Σa·b,
// Σc·d. STAGE 2 runs a workgroup per channel that sums the seg partials,
// bound in place of `a`, and finishes as STAGE 0 does.
override STAGE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: ReduceParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// bn_param_sums only.
@group(0) @binding(4) var<storage, read> c: array<f32>;
@group(0) @binding(5) var<storage, read> d: array<f32>;
@group(0) @binding(6) var<storage, read_write> tgt: array<f32>;

var<workgroup> sum_a: array<f32, 256>;
var<workgroup> sum_ab: array<f32, 256>;
var<workgroup> part_a: array<f32, 16>;
var<workgroup> part_ab: array<f32, 16>;

// Fan-in-16 trees over the 256 partial sums: two barriers instead of eight
// (barriers, not adds, are what a reduction costs on software rasterisers).
fn reduce_pair(lid: u32, a: f32, ab: f32) -> vec2<f32> {
    sum_a[lid] = a;
    sum_ab[lid] = ab;
    workgroupBarrier();
    if (lid < 16u) {
        var s = 0.0;
        var t = 0.0;
        for (var i = 0u; i < 16u; i++) {
            s += sum_a[lid * 16u + i];
            t += sum_ab[lid * 16u + i];
        }
        part_a[lid] = s;
        part_ab[lid] = t;
    }
    workgroupBarrier();
    var s = 0.0;
    var t = 0.0;
    for (var i = 0u; i < 16u; i++) {
        s += part_a[i];
        t += part_ab[i];
    }
    return vec2<f32>(s, t);
}

// The j-th of channel ch's n·hw elements in [n, c, hw].
fn channel_element(j: u32, ch: u32) -> u32 {
    return ((j / p.hw) * p.c + ch) * p.hw + j % p.hw;
}

// What one workgroup sums: elements [lo, hi) of channel ch, its segment
// s (STAGE 1), or all n·hw. ch ≥ c: a folded grid's padding.
struct Part { ch: u32, s: u32, lo: u32, hi: u32 }

fn part(wid: vec3<u32>, nwg: vec3<u32>) -> Part {
    let count = p.n * p.hw;
    if (STAGE == 1u) {
        let g = wid.x + wid.y * nwg.x;
        let s = g % p.seg;
        let lo = s * p.span;
        return Part(g / p.seg, s, lo, min(lo + p.span, count));
    }
    return Part(wid.x, 0u, 0u, count);
}

// Partial row `row` of channel ch, segment s, in the slice at o.
fn partial(o: u32, row: u32, ch: u32, s: u32) -> u32 {
    return o + (row * p.c + ch) * p.seg + s;
}

// Per channel ch of [n, c, hw]: out[out_a + ch] = Σ a, and with HAS_B
// out[out_b + ch] = Σ a·b (or their partial rows 0 and 1, STAGE 1).
@compute @workgroup_size(256)
fn channel_sums(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let pt = part(wid, nwg);
    let ch = pt.ch;
    if (ch >= p.c) { return; }
    // Tangent slices (tangents.wgsl).
    let o_a = kslice(1u, arrayLength(&a), wid.z);
    let o_b = kslice(2u, arrayLength(&b), wid.z);
    let o_out = kslice(3u, arrayLength(&out), wid.z);
    let has_b = HAS_B;
    var sa = 0.0;
    var sab = 0.0;
    if (STAGE == 2u) {
        for (var s = lid; s < p.seg; s += WG) {
            sa += a[partial(o_a, 0u, ch, s)];
            if (has_b) {
                sab += a[partial(o_a, 1u, ch, s)];
            }
        }
    } else {
        for (var j = pt.lo + lid; j < pt.hi; j += WG) {
            let i = channel_element(j, ch);
            let av = a[o_a + i];
            sa += av;
            if (has_b) {
                sab += av * b[o_b + i];
            }
        }
    }
    let r = reduce_pair(lid, sa, sab);
    if (lid == 0u) {
        if (STAGE == 1u) {
            out[partial(o_out, 0u, ch, pt.s)] = r.x;
            if (has_b) { out[partial(o_out, 1u, ch, pt.s)] = r.y; }
            return;
        }
        var ra = r.x;
        var rab = r.y;
        if (ACC) {
            ra += out[o_out + p.out_a + ch];
            if (has_b) { rab += out[o_out + p.out_b + ch]; }
        }
        out[o_out + p.out_a + ch] = ra;
        if (has_b) { out[o_out + p.out_b + ch] = rab; }
    }
}

// out[out_a] = Σ a[0..len] in one workgroup (the per-sample losses).
@group(0) @binding(2) var<storage, read_write> sum_out: array<f32>;

@compute @workgroup_size(256)
fn sum_all(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var j = lid; j < p.len; j += WG) {
        s += a[j];
    }
    let r = reduce_pair(lid, s, 0.0);
    if (lid == 0u) {
        sum_out[p.out_a] = r.x;
    }
}

// A batch norm's parameter gradients (or their R-operator) in one
// dispatch, instead of sums then copies: per channel ch of [n, c, hw],
// out[out_a + ch] = Σa, out[out_b + ch] = Σa·b and, with PAIR2,
// out[out_d + ch] = Σc·d (the statistics rows the input gradient needs);
// then tgt[t_a + ch] += Σa (β) and tgt[t_b + ch] += Σa·b (+ Σc·d) (γ).
@compute @workgroup_size(256)
fn bn_param_sums(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let pt = part(wid, nwg);
    let ch = pt.ch;
    if (ch >= p.c) { return; }
    // Tangent slices (tangents.wgsl).
    let k = wid.z;
    let o_a = kslice(1u, arrayLength(&a), k);
    let o_b = kslice(2u, arrayLength(&b), k);
    let o_out = kslice(3u, arrayLength(&out), k);
    let o_c = kslice(4u, arrayLength(&c), k);
    let o_d = kslice(5u, arrayLength(&d), k);
    let o_tgt = kslice(6u, arrayLength(&tgt), k);
    let pair2 = PAIR2;
    var sa = 0.0;
    var sab = 0.0;
    var scd = 0.0;
    if (STAGE == 2u) {
        for (var s = lid; s < p.seg; s += WG) {
            sa += a[partial(o_a, 0u, ch, s)];
            sab += a[partial(o_a, 1u, ch, s)];
            if (pair2) {
                scd += a[partial(o_a, 2u, ch, s)];
            }
        }
    } else {
        for (var j = pt.lo + lid; j < pt.hi; j += WG) {
            let i = channel_element(j, ch);
            let av = a[o_a + i];
            sa += av;
            sab += av * b[o_b + i];
            if (pair2) {
                scd += c[o_c + i] * d[o_d + i];
            }
        }
    }
    let r = reduce_pair(lid, sa, sab);
    var r2 = vec2<f32>(0.0);
    if (pair2) {
        workgroupBarrier();
        r2 = reduce_pair(lid, scd, 0.0);
    }
    if (lid == 0u) {
        if (STAGE == 1u) {
            out[partial(o_out, 0u, ch, pt.s)] = r.x;
            out[partial(o_out, 1u, ch, pt.s)] = r.y;
            if (pair2) { out[partial(o_out, 2u, ch, pt.s)] = r2.x; }
            return;
        }
        out[o_out + p.out_a + ch] = r.x;
        out[o_out + p.out_b + ch] = r.y;
        if (pair2) {
            out[o_out + p.out_d + ch] = r2.x;
        }
        tgt[o_tgt + p.t_a + ch] += r.x;
        tgt[o_tgt + p.t_b + ch] += r.y + r2.x;
    }
}

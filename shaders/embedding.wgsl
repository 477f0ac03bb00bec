// nn.Embedding on the GPU: `tokens` token ids (f32, exact below 2^24) and
// rows r0..r0 + rows of a weight [vocab, d] at `w_off` of θ (or of v, the
// gradient, Hv): the whole weight (r0 = 0, rows = vocab) unless it is
// split by rows between bindings (layers::embedding), one block a dispatch.
//   emb_gather:  y[t·d + j] = w[w_off + (id_t - r0)·d + j] for the tokens
//                whose id lies in the block, the others untouched
//                (forward with θ, R-forward with v)
//   emb_scatter: tgt[w_off + (v - r0)·d + j] += Σ_{t: id_t = v} g[t·d + j]
//                for the block's rows v (the adjoint: gradient from gy, Hv
//                from R(gy)); a thread per (row, feature) looping over the
//                tokens in order, so no atomics and the same sum every run.

struct EmbParams {
    tokens: u32, d: u32, vocab: u32, w_off: u32,
    r0: u32, rows: u32, _p0: u32, _p1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: EmbParams;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@group(0) @binding(1) var<storage, read> g_ids: array<f32>;
@group(0) @binding(2) var<storage, read> g_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> g_y: array<f32>;

@compute @workgroup_size(256)
fn emb_gather(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.tokens * p.d) { return; }
    let k = wid.z;
    let o_w = kslice(2u, arrayLength(&g_w), k);
    let o_y = kslice(3u, arrayLength(&g_y), k);
    let t = i / p.d;
    let j = i % p.d;
    let id = u32(g_ids[t]);
    if (id < p.r0 || id - p.r0 >= p.rows) { return; }
    g_y[o_y + i] = g_w[o_w + p.w_off + (id - p.r0) * p.d + j];
}

@group(0) @binding(1) var<storage, read> s_ids: array<f32>;
@group(0) @binding(2) var<storage, read> s_g: array<f32>;
@group(0) @binding(3) var<storage, read_write> s_tgt: array<f32>;

@compute @workgroup_size(256)
fn emb_scatter(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.rows * p.d) { return; }
    let k = wid.z;
    let o_g = kslice(2u, arrayLength(&s_g), k);
    let o_t = kslice(3u, arrayLength(&s_tgt), k);
    let v = p.r0 + i / p.d;
    let j = i % p.d;
    var s = 0.0;
    for (var t = 0u; t < p.tokens; t++) {
        if (u32(s_ids[t]) == v) {
            s += s_g[o_g + t * p.d + j];
        }
    }
    s_tgt[o_t + p.w_off + i] += s;
}

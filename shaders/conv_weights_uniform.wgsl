// The weight bindings of conv.wgsl as 64 KiB uniform windows of θ and v
// (offsets relative to the window), swapped in by src/gpu/kernels.rs for
// layers whose weights fit: block A (the first pair's weights, θ) alone in
// a block product, whose second pair reads each tangent's slice of v from
// storage; both blocks otherwise. Why: llvmpipe (Mesa's CPU driver, what
// CI runs) loads storage buffers one lane at a time with a bounds check
// each, but uniform buffers with one gather, several times cheaper per
// load (BENCHMARKS.md, examples/llvmpipe_costs.rs); GPUs serve uniform
// reads from their constant caches. A window is one tangent's: it has no
// slices (weight_slices_* do nothing).
// BEGIN WEIGHTS A
const WINDOW: u32 = 16384u;

@group(0) @binding(2) var<uniform> wa: array<vec4<f32>, 4096>;

// A weight of channel `c`, or 0 past the last channel (blocks may overhang).
fn weight_a(c: u32, climit: u32, i: u32) -> f32 {
    let j = min(i, WINDOW - 1u);
    return select(0.0, wa[j >> 2u][j & 3u], c < climit);
}
fn weight_slices_a(k: u32) {}
// END WEIGHTS A
// BEGIN WEIGHTS B
@group(0) @binding(4) var<uniform> wb: array<vec4<f32>, 4096>;

fn weight_b(c: u32, climit: u32, i: u32) -> f32 {
    let j = min(i, WINDOW - 1u);
    return select(0.0, wb[j >> 2u][j & 3u], c < climit);
}
fn bias_b(i: u32) -> f32 {
    let j = min(i, WINDOW - 1u);
    return wb[j >> 2u][j & 3u];
}
fn weight_slices_b(k: u32) {}
// END WEIGHTS B

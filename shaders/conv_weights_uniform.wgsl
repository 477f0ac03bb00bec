// The weight bindings of conv.wgsl as 64 KiB uniform windows of θ and v
// (offsets relative to the window), swapped in by src/gpu/kernels.rs for
// layers whose weights fit. Why: llvmpipe (Mesa's CPU driver, what CI
// runs) loads storage buffers one lane at a time with a bounds check each,
// but uniform buffers with one gather, several times cheaper per load
// (BENCHMARKS.md, examples/llvmpipe_costs.rs);
// GPUs serve uniform reads from their constant caches.
const WINDOW: u32 = 16384u;

@group(0) @binding(2) var<uniform> wa: array<vec4<f32>, 4096>;
@group(0) @binding(4) var<uniform> wb: array<vec4<f32>, 4096>;

// A weight of channel `c`, or 0 past the last channel (blocks may overhang).
fn weight_a(c: u32, climit: u32, i: u32) -> f32 {
    let j = min(i, WINDOW - 1u);
    return select(0.0, wa[j >> 2u][j & 3u], c < climit);
}
fn weight_b(c: u32, climit: u32, i: u32) -> f32 {
    let j = min(i, WINDOW - 1u);
    return select(0.0, wb[j >> 2u][j & 3u], c < climit);
}
fn bias_b(i: u32) -> f32 {
    let j = min(i, WINDOW - 1u);
    return wb[j >> 2u][j & 3u];
}

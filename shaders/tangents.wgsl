// ---- Block products: prepended to every kernel module by
// src/gpu/kernels.rs (`Module::source`).
//
// A step of a block product serves K tangents in one dispatch: its
// workgroup z index is the tangent k (num_workgroups.z = K). A binding
// whose bit b (binding number b) is set in KB holds KMAX equal slices, one
// per tangent — R-forward values, R-adjoints, v, Hv, R-statistics and
// weight-gradient partials — and the kernel reads and writes slice k of
// it; the other bindings (values, adjoints, θ, forward state) are shared
// by the K tangents. With the defaults (KB = 0, KMAX = 1) every slice
// offset is the constant 0: single products compile to what they were.
override KB: u32 = 0u;
override KMAX: u32 = 1u;

// The first element of tangent k's slice of binding b of `len` elements.
fn kslice(b: u32, len: u32, k: u32) -> u32 {
    return select(0u, k * (len / KMAX), ((KB >> b) & 1u) != 0u);
}


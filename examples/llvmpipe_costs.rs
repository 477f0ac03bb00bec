//! What a kernel's operations cost on the chosen backend, the numbers the
//! kernels in shaders/ are shaped by (BENCHMARKS.md, "the cost model"):
//! cargo run --release --example llvmpipe_costs -- [vulkan|gl]
//!
//! Each kernel makes 64 loads per thread at lane-varying addresses inside
//! a 16 KiB table, from a storage buffer, a uniform buffer (scalar and vec4)
//! or workgroup memory; `none` is the same loop without loads. Then the cost
//! of a dispatch that does nothing, and of copying a float.
use hesscope::gpu::{BackendChoice, GpuContext};

const SRC: &str = r#"
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> u: array<vec4<f32>, 1024>;
var<workgroup> sh: array<f32, 4096>;

fn at(g: u32, k: u32) -> u32 { return (g / 64u + k * 61u) & 4095u; }

@compute @workgroup_size(256)
fn none(@builtin(global_invocation_id) g: vec3<u32>) {
    var s = 0.0;
    for (var k = 0u; k < 64u; k++) { s += f32(at(g.x, k)); }
    o[g.x] = s;
}
@compute @workgroup_size(256)
fn from_storage(@builtin(global_invocation_id) g: vec3<u32>) {
    var s = 0.0;
    for (var k = 0u; k < 64u; k++) { s += a[at(g.x, k)]; }
    o[g.x] = s;
}
@compute @workgroup_size(256)
fn from_storage_contiguous(@builtin(global_invocation_id) g: vec3<u32>) {
    var s = 0.0;
    for (var k = 0u; k < 64u; k++) { s += a[(g.x + k * 61u) & 262143u]; }
    o[g.x] = s;
}
@compute @workgroup_size(256)
fn from_storage_uniform(@builtin(global_invocation_id) g: vec3<u32>,
                        @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    for (var k = 0u; k < 64u; k++) { s += a[(w.x + k * 61u) & 4095u]; }
    o[g.x] = s;
}
@compute @workgroup_size(256)
fn from_storage_vec4(@builtin(global_invocation_id) g: vec3<u32>) {
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 16u; k++) { s += a4[(g.x + k * 61u) & 65535u]; }
    o[g.x] = s.x + s.y + s.z + s.w;
}
@compute @workgroup_size(256)
fn from_uniform(@builtin(global_invocation_id) g: vec3<u32>) {
    var s = 0.0;
    for (var k = 0u; k < 64u; k++) { let i = at(g.x, k); s += u[i >> 2u][i & 3u]; }
    o[g.x] = s;
}
@compute @workgroup_size(256)
fn from_uniform_vec4(@builtin(global_invocation_id) g: vec3<u32>) {
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < 16u; k++) { s += u[at(g.x, k) & 1023u]; }
    o[g.x] = s.x + s.y + s.z + s.w;
}
@compute @workgroup_size(256)
fn from_workgroup(@builtin(global_invocation_id) g: vec3<u32>,
             @builtin(local_invocation_index) l: u32) {
    for (var k = 0u; k < 16u; k++) { sh[l * 16u + k] = a[l * 16u + k]; }
    workgroupBarrier();
    var s = 0.0;
    for (var k = 0u; k < 64u; k++) { s += sh[at(g.x, k)]; }
    o[g.x] = s;
}
@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x < arrayLength(&o)) { o[g.x] = a[g.x]; }
}
"#;

fn main() -> anyhow::Result<()> {
    let choice = match std::env::args().nth(1).as_deref() {
        Some("gl") => BackendChoice::Gl,
        _ => BackendChoice::Vulkan,
    };
    let ctx = GpuContext::open(choice, 0)?;
    println!("{}", ctx.info.name);
    let d = &ctx.device;
    let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(SRC.into()),
    });
    let n = 1usize << 18;
    let buffer = |len: usize, usage: wgpu::BufferUsages| {
        d.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (len * 4) as u64,
            usage,
            mapped_at_creation: false,
        })
    };
    let a = buffer(n, wgpu::BufferUsages::STORAGE);
    let o = buffer(n, wgpu::BufferUsages::STORAGE);
    let u = buffer(4096, wgpu::BufferUsages::UNIFORM);
    // Runs `dispatches` launches of `groups` workgroups in one pass; seconds.
    let time = |entry: &str, groups: u32, dispatches: usize| -> anyhow::Result<f64> {
        let p = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let layout = p.get_bind_group_layout(0);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 1,
            resource: o.as_entire_binding(),
        }];
        if entry == "from_storage_vec4" {
            entries.push(wgpu::BindGroupEntry {
                binding: 3,
                resource: a.as_entire_binding(),
            });
        }
        if matches!(
            entry,
            "from_storage"
                | "from_storage_contiguous"
                | "from_storage_uniform"
                | "from_workgroup"
                | "copy"
        ) {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: a.as_entire_binding(),
            });
        }
        if entry.starts_with("from_uniform") {
            entries.push(wgpu::BindGroupEntry {
                binding: 2,
                resource: u.as_entire_binding(),
            });
        }
        let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let mut enc = d.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&p);
                pass.set_bind_group(0, &bg, &[]);
                for _ in 0..dispatches {
                    pass.dispatch_workgroups(groups, 1, 1);
                }
            }
            ctx.queue.submit([enc.finish()]);
            ctx.wait()?;
            best = best.min(t.elapsed().as_secs_f64() / dispatches as f64);
        }
        Ok(best)
    };
    let groups = (n / 256) as u32;
    // Every kernel reads 64 floats per thread (uniform_vec4 in 16 loads).
    for entry in [
        "none",
        "from_storage",
        "from_storage_contiguous",
        "from_storage_uniform",
        "from_storage_vec4",
        "from_uniform",
        "from_uniform_vec4",
        "from_workgroup",
    ] {
        let loads = if entry.ends_with("vec4") { 16.0 } else { 64.0 };
        let t = time(entry, groups, 10)? / n as f64;
        println!(
            "{entry:<18} {:.3} ns per loop iteration, {:.3} ns per float",
            t / loads * 1e9,
            t / 64.0 * 1e9
        );
    }
    println!(
        "empty dispatch (one workgroup) {:.1} us",
        time("none", 1, 200)? * 1e6
    );
    println!(
        "copy           {:.2} ns per float",
        time("copy", groups, 10)? / n as f64 * 1e9
    );
    Ok(())
}

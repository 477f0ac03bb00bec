//! Every kernel under shaders/ must parse, validate, and translate to the
//! shading languages of every wgpu backend, so that a kernel which would
//! break on Metal, DX12 or GL fails here rather than on a user's machine.

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::path::PathBuf;

fn shader_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    files
}

fn check(path: &PathBuf) -> Result<usize, String> {
    let src = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    check_source(&src)
}

fn check_source(src: &str) -> Result<usize, String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    // The capabilities wgpu grants a baseline device: no f64, no f16.
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| format!("validation: {}", e.emit_to_string(src)))?;

    spv::write_vec(&module, &info, &spv::Options::default(), None)
        .map_err(|e| format!("SPIR-V: {e}"))?;

    let mut out = String::new();
    msl::Writer::new(&mut out)
        .write(
            &module,
            &info,
            &msl::Options::default(),
            &msl::PipelineOptions::default(),
        )
        .map_err(|e| format!("MSL: {e}"))?;

    let mut out = String::new();
    let opts = hlsl::Options::default();
    let fragment_entry_point = None;
    let pipeline_opts = hlsl::PipelineOptions::default();
    let mut w = hlsl::Writer::new(&mut out, &opts, &pipeline_opts);
    w.write(&module, &info, fragment_entry_point)
        .map_err(|e| format!("HLSL: {e}"))?;

    // GLSL is written one entry point at a time, as wgpu's GL backend does;
    // GLES 3.1 is the lowest version with compute shaders.
    for ep in &module.entry_points {
        let mut out = String::new();
        let options = glsl::Options {
            version: glsl::Version::Embedded {
                version: 310,
                is_webgl: false,
            },
            ..Default::default()
        };
        let pipeline = glsl::PipelineOptions {
            shader_stage: ep.stage,
            entry_point: ep.name.clone(),
            multiview: None,
        };
        glsl::Writer::new(
            &mut out,
            &module,
            &info,
            &options,
            &pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write())
        .map_err(|e| format!("GLSL ({}): {e}", ep.name))?;
    }
    Ok(module.entry_points.len())
}

#[test]
fn every_shader_validates_and_translates_to_every_backend() {
    let files = shader_files();
    assert!(!files.is_empty(), "no shaders found");
    let mut failures = vec![];
    for f in &files {
        match check(f) {
            Ok(n) => eprintln!("{}: {n} entry points OK", f.display()),
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The modules the engine compiles, including those assembled from
/// several files (conv.wgsl with uniform weight windows), and each
/// kernel's entry point in its module.
#[test]
fn every_kernel_module_validates_and_has_its_entry_point() {
    use hesscope::gpu::kernels::Kernel;
    let mut failures = vec![];
    for k in Kernel::ALL {
        let (name, src) = k.source();
        match check_source(src) {
            Ok(_) => {
                let module = naga::front::wgsl::parse_str(src).unwrap();
                if !module.entry_points.iter().any(|e| e.name == k.entry()) {
                    failures.push(format!("{k:?}: no entry point {} in {name}", k.entry()));
                }
            }
            Err(e) => failures.push(format!("{k:?} ({name}): {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_broken_shader_is_caught() {
    // The check itself must be able to fail: a type error in a kernel.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.wgsl");
    std::fs::write(
        &p,
        "@group(0) @binding(0) var<storage, read_write> a: array<f32>;\n\
         @compute @workgroup_size(64) fn f(@builtin(global_invocation_id) g: vec3<u32>) { a[g.x] = g.x; }",
    )
    .unwrap();
    assert!(check(&p).is_err());
}

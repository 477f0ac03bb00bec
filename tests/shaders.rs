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

/// A file as the engine compiles it: after tangents.wgsl (block products'
/// slices), which every module is prefixed with.
fn check(path: &PathBuf) -> Result<usize, String> {
    let src = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let tangents = hesscope::gpu::kernels::TANGENTS;
    if src == tangents {
        return check_source(&src, &[]);
    }
    check_source(&format!("{tangents}{src}"), &[])
}

/// Parses, validates, specialises the override constants (`consts`, the
/// rest at their defaults, as wgpu does at pipeline creation) and
/// translates to every back end.
fn check_source(src: &str, consts: &[(&str, f64)]) -> Result<usize, String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    // The capabilities wgpu grants a baseline device: no f64, no f16.
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| format!("validation: {}", e.emit_to_string(src)))?;
    let mut constants = naga::back::PipelineConstants::default();
    for (k, v) in consts {
        constants.insert(k.to_string(), *v);
    }
    let (module, info) =
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .map_err(|e| format!("override constants {consts:?}: {e}"))?;
    let (module, info) = (module.as_ref(), info.as_ref());

    spv::write_vec(module, info, &spv::Options::default(), None)
        .map_err(|e| format!("SPIR-V: {e}"))?;

    let mut out = String::new();
    msl::Writer::new(&mut out)
        .write(
            module,
            info,
            &msl::Options::default(),
            &msl::PipelineOptions::default(),
        )
        .map_err(|e| format!("MSL: {e}"))?;

    let mut out = String::new();
    let opts = hlsl::Options::default();
    let fragment_entry_point = None;
    let pipeline_opts = hlsl::PipelineOptions::default();
    let mut w = hlsl::Writer::new(&mut out, &opts, &pipeline_opts);
    w.write(module, info, fragment_entry_point)
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
            module,
            info,
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

/// The values each override constant takes in the engine.
fn override_values(name: &str) -> Vec<f64> {
    match name {
        // layers::activation::act_code: relu .. silu, relu6, hardswish,
        // hardsigmoid, gelu_tanh.
        "ACT" => (0..=9).map(f64::from).collect(),
        // Block products: no tangent bindings, or all; one tangent or 3.
        "KB" => vec![0.0, 510.0],
        "KMAX" => vec![1.0, 3.0],
        // conv_direct.wgsl's dilation: adjacent taps and spread ones.
        "DIL" => vec![1.0, 3.0],
        // conv_tiled.wgsl's tile (kernels::ConvTile): the narrow and the
        // default sides, the smallest and largest slab depth; every
        // combination is a tile ConvTile::check accepts.
        "TM" => vec![16.0, 64.0],
        "TN" => vec![4.0, 64.0],
        "TK" => vec![1.0, 16.0],
        // A split reduction's chunk [RED0, RED1) (src/layers/conv_split.rs):
        // the whole (0, u32::MAX, the defaults) and an inner chunk.
        "RED0" => vec![0.0, 8.0],
        "RED1" => vec![12.0, 4294967295.0],
        _ => vec![0.0, 1.0],
    }
}

/// Every assignment of a kernel's override constants.
fn assignments(names: &[&'static str]) -> Vec<Vec<(&'static str, f64)>> {
    let mut out = vec![vec![]];
    for &n in names {
        out = out
            .into_iter()
            .flat_map(|a: Vec<(&'static str, f64)>| {
                override_values(n).into_iter().map(move |v| {
                    let mut b = a.clone();
                    b.push((n, v));
                    b
                })
            })
            .collect();
    }
    out
}

/// The modules the engine compiles, including those assembled from
/// several files (conv.wgsl with uniform weight windows), under every
/// assignment of the kernel's override constants, and each kernel's entry
/// point in its module.
#[test]
fn every_kernel_module_validates_and_has_its_entry_point() {
    use hesscope::gpu::kernels::Kernel;
    let mut failures = vec![];
    for &k in Kernel::ALL {
        let (name, src) = k.source();
        for consts in assignments(k.spec().overrides) {
            if let Err(e) = check_source(src, &consts) {
                failures.push(format!("{k:?} ({name}) {consts:?}: {e}"));
            }
        }
        let module = naga::front::wgsl::parse_str(src).unwrap();
        if !module.entry_points.iter().any(|e| e.name == k.entry()) {
            failures.push(format!("{k:?}: no entry point {} in {name}", k.entry()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every disagreement between what the host declares for a kernel
/// (`KernelSpec`: bindings, params struct, override constants) and what its
/// WGSL entry point in `src` uses, reflected with naga: binding numbers and
/// access modes, the params struct's name and every member's name and
/// offset (`KernelParams`).
fn interface_errors(k: hesscope::gpu::kernels::Kernel, src: &str) -> Vec<String> {
    use hesscope::gpu::kernels::Binding;
    use naga::{AddressSpace, StorageAccess, TypeInner};
    let structs: std::collections::HashMap<_, _> =
        hesscope::gpu::params::all().into_iter().collect();
    let mut failures = vec![];
    let spec = k.spec();
    let (file, _) = k.source();
    let module = match naga::front::wgsl::parse_str(src) {
        Ok(m) => m,
        Err(e) => return vec![format!("{k:?}: {}", e.emit_to_string(src))],
    };
    let info = match Validator::new(ValidationFlags::all(), Capabilities::empty()).validate(&module)
    {
        Ok(i) => i,
        Err(e) => return vec![format!("{k:?}: {}", e.emit_to_string(src))],
    };
    let Some(ep) = module
        .entry_points
        .iter()
        .position(|e| e.name == spec.entry)
    else {
        return vec![format!("{k:?}: no entry point {}", spec.entry)];
    };
    let used = info.get_entry_point(ep);
    let mut seen = vec![];
    for (h, g) in module.global_variables.iter() {
        let Some(rb) = &g.binding else { continue };
        if used[h].is_empty() {
            continue;
        }
        let at = format!("{k:?} ({file}::{}) binding {}", spec.entry, rb.binding);
        if rb.group != 0 {
            failures.push(format!("{at}: group {}", rb.group));
        }
        seen.push(rb.binding);
        if rb.binding == 0 {
            let ty = &module.types[g.ty];
            if g.space != AddressSpace::Uniform {
                failures.push(format!("{at}: params not a uniform"));
            }
            if ty.name.as_deref() != Some(spec.params) {
                failures.push(format!(
                    "{at}: params struct {:?}, host says {}",
                    ty.name, spec.params
                ));
                continue;
            }
            let TypeInner::Struct { members, .. } = &ty.inner else {
                failures.push(format!("{at}: params not a struct"));
                continue;
            };
            let wgsl: Vec<(String, usize)> = members
                .iter()
                .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
                .collect();
            let host: Vec<(String, usize)> = structs[spec.params]
                .iter()
                .map(|(n, o)| (n.to_string(), *o))
                .collect();
            if wgsl != host {
                failures.push(format!(
                    "{at}: WGSL {} {wgsl:?} vs Rust {host:?}",
                    spec.params
                ));
            }
            continue;
        }
        let Some(&want) = spec.bindings.get(rb.binding as usize - 1) else {
            failures.push(format!("{at}: not in the host's binding table"));
            continue;
        };
        let got = match g.space {
            AddressSpace::Storage { access } if access.contains(StorageAccess::STORE) => {
                Binding::Write
            }
            AddressSpace::Storage { .. } => Binding::Read,
            AddressSpace::Uniform => Binding::Window,
            other => {
                failures.push(format!("{at}: address space {other:?}"));
                continue;
            }
        };
        if got != want {
            failures.push(format!("{at}: WGSL {got:?}, host {want:?}"));
        }
    }
    seen.sort();
    let want: Vec<u32> = (0..=spec.bindings.len() as u32).collect();
    if seen != want {
        failures.push(format!(
            "{k:?}: WGSL uses bindings {seen:?}, host binds {want:?}"
        ));
    }
    for o in spec.overrides {
        if !module
            .overrides
            .iter()
            .any(|(_, ov)| ov.name.as_deref() == Some(*o))
        {
            failures.push(format!("{k:?}: no override constant {o} in {file}"));
        }
    }
    failures
}

#[test]
fn every_kernel_interface_matches_its_wgsl() {
    use hesscope::gpu::kernels::Kernel;
    let failures: Vec<String> = Kernel::ALL
        .iter()
        .flat_map(|&k| interface_errors(k, k.source().1))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reflection must be able to fail: a WGSL params struct with two
/// members swapped, a storage buffer made writable, a binding renumbered
/// and an override renamed are each reported.
#[test]
fn an_interface_mismatch_is_caught() {
    use hesscope::gpu::kernels::Kernel;
    let conv = Kernel::ConvForward.source().1;
    let mutants = [
        (
            "n: u32, cin: u32,",
            "cin: u32, n: u32,",
            Kernel::ConvForward,
            conv,
        ),
        (
            "var<storage, read> xa: array<f32>;",
            "var<storage, read_write> xa: array<f32>;",
            Kernel::ConvForward,
            conv,
        ),
        (
            "@group(0) @binding(5) var<storage, read_write> out",
            "@group(0) @binding(6) var<storage, read_write> out",
            Kernel::ConvForward,
            conv,
        ),
        (
            "override PAIR_B: bool = false;",
            "override PAIR_X: bool = false;\nconst PAIR_B: bool = false;",
            Kernel::ConvForward,
            conv,
        ),
    ];
    for (from, to, k, src) in mutants {
        assert!(src.contains(from), "mutation {from:?} no longer applies");
        let bad = src.replacen(from, to, 1);
        assert!(interface_errors(k, src).is_empty(), "{k:?} unmutated");
        let errs = interface_errors(k, &bad);
        assert!(!errs.is_empty(), "{k:?}: {from:?} -> {to:?} not caught");
    }
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

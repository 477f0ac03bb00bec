//! `--backend auto`: a GPU adapter where there is one, else the float64
//! CPU engine, else (only where an adapter is needed: `selftest`) a CPU
//! emulator; `hesscope devices` says which and why. `--threads` sets the
//! float64 engine's threads, without changing its results.

mod common;

use common::{gpu_context, hesscope, under_ci};
use hesscope::device::{choose, Kind, Need};
use hesscope::gpu::executor::AutoChoices;
use hesscope::gpu::{AdapterReport, BackendChoice};

fn adapter(backend: &str, index: usize, name: &str, device_type: &str) -> AdapterReport {
    AdapterReport {
        index,
        backend: backend.into(),
        name: name.into(),
        vendor: 0,
        device: 0,
        device_type: device_type.into(),
        driver: String::new(),
        driver_info: String::new(),
        f64: false,
        f16: false,
        subgroups: false,
        timestamps: false,
        max_storage_buffer_binding_size: 1 << 30,
        max_buffer_size: 1 << 30,
        max_storage_buffers_per_shader_stage: 8,
        max_compute_workgroup_storage_size: 32768,
        max_compute_invocations_per_workgroup: 256,
        max_compute_workgroups_per_dimension: 65535,
        max_compute_workgroup_size_x: 256,
        device_memory: None,
        auto: AutoChoices::on(device_type, 32768, 256, 256),
    }
}

#[test]
fn auto_prefers_a_gpu_then_the_cpu_engine_then_an_emulator() {
    let lavapipe = adapter("vulkan", 0, "llvmpipe (LLVM 19)", "Cpu");
    let llvmpipe = adapter("gl", 0, "llvmpipe (LLVM 19)", "Cpu");
    let igpu = adapter("vulkan", 1, "Intel UHD", "IntegratedGpu");
    let dgpu = adapter("gl", 0, "NVIDIA H100", "DiscreteGpu");
    let emulators = [llvmpipe.clone(), lavapipe.clone()];

    // Only software rasterisers: the float64 engine, whatever their order.
    let c = choose(&emulators, Need::Engine, 0).unwrap();
    assert_eq!(c.kind, Kind::Cpu);
    assert_eq!(c.gpu(), None);
    assert!(c.reason.contains("only CPU emulators"), "{}", c.reason);
    // Where an adapter is needed: the emulator, Vulkan's before GL's.
    let c = choose(&emulators, Need::Adapter, 0).unwrap();
    assert_eq!(c.kind, Kind::Emulator);
    assert_eq!(c.gpu(), Some((BackendChoice::Vulkan, 0)));
    let c = choose(&emulators, Need::Adapter, 1).unwrap();
    assert_eq!(c.gpu(), Some((BackendChoice::Gl, 0)));

    // Any GPU wins over both; a discrete one over an integrated one, on
    // whichever backend, and `nth` counts GPUs only.
    let all = [
        lavapipe.clone(),
        igpu.clone(),
        llvmpipe.clone(),
        dgpu.clone(),
    ];
    for need in [Need::Engine, Need::Adapter] {
        let c = choose(&all, need, 0).unwrap();
        assert_eq!(c.kind, Kind::Gpu);
        assert_eq!(c.gpu(), Some((BackendChoice::Gl, 0)), "{c:?}");
        assert_eq!(c.name, "NVIDIA H100");
        let c = choose(&all, need, 1).unwrap();
        assert_eq!(c.gpu(), Some((BackendChoice::Vulkan, 1)), "{c:?}");
    }
    let c = choose(&[lavapipe.clone(), igpu.clone()], Need::Engine, 0).unwrap();
    assert_eq!((c.kind, c.name.as_str()), (Kind::Gpu, "Intel UHD"));

    // No adapter at all: the float64 engine; an adapter cannot be had.
    let c = choose(&[], Need::Engine, 0).unwrap();
    assert_eq!(c.kind, Kind::Cpu);
    assert!(c.reason.contains("no adapter at all"), "{}", c.reason);
    assert!(choose(&[], Need::Adapter, 0).is_err());

    // An index past the GPUs is a typed error in the library's words (the
    // CLI names its flags).
    for (list, need) in [
        (&all[..], Need::Engine),
        (&emulators[..], Need::Engine),
        (&emulators[..], Need::Adapter),
    ] {
        let e = choose(list, need, 5).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(
                e,
                hesscope::Error::Invalid {
                    what: "adapter index",
                    ..
                }
            ),
            "{text}"
        );
        assert!(!text.contains("--"), "a flag in a library error: {text}");
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// What `devices --json` says `auto` picks, and whether this machine has a
/// GPU (an adapter of a GPU device type).
fn devices() -> (serde_json::Value, bool) {
    let (ok, out, err) = hesscope(&["devices", "--json"]);
    assert!(ok, "{err}");
    let d = json(&out);
    let gpu = d["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| hesscope::dispatch::is_gpu_type(a["device_type"].as_str().unwrap()));
    (d, gpu)
}

#[test]
fn devices_names_what_auto_picks_and_why() {
    let (d, gpu) = devices();
    let auto = &d["auto"];
    assert!(
        auto["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{d}"
    );
    assert!(d["cpu_threads"].as_u64().unwrap() >= 1, "{d}");
    for a in d["adapters"].as_array().unwrap() {
        assert!(a["device_type"].is_string(), "{a}");
    }
    if gpu {
        assert_eq!(auto["kind"], "gpu", "{d}");
        assert!(
            auto["backend"].is_string() && auto["adapter"].is_u64(),
            "{d}"
        );
    } else {
        // This machine (CI's too): only Mesa's software rasterisers.
        assert_eq!(auto["kind"], "cpu", "{d}");
        assert!(
            auto["backend"].is_null() && auto["adapter"].is_null(),
            "{d}"
        );
        assert_eq!(auto["name"], "float64 CPU engine");
    }
    // The text says the same.
    let (ok, text, err) = hesscope(&["devices"]);
    assert!(ok, "{err}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("--backend auto runs on: ")
            && first.contains(auto["name"].as_str().unwrap()),
        "{text}"
    );
    assert!(text.contains("why: "), "{text}");
    if !gpu && !d["adapters"].as_array().unwrap().is_empty() {
        assert!(text.contains("(Cpu: a CPU emulator)"), "{text}");
    }
}

/// `auto` runs where `devices` says, on every command that has it; an
/// explicit `--backend vulkan` still runs lavapipe here.
#[test]
fn auto_runs_where_devices_says_and_vulkan_still_runs_the_emulator() {
    let (d, gpu) = devices();
    let small = [
        "--model",
        "mlp-tiny",
        "--samples",
        "16",
        "--batch",
        "8",
        "--json",
    ];
    let (ok, out, err) = hesscope(&[&["grad"][..], &small].concat());
    assert!(ok, "{err}");
    let grad = json(&out);
    if gpu {
        assert_eq!(grad["backend"], d["auto"]["backend"], "{out}");
    } else {
        assert_eq!(grad["backend"], "cpu", "{out}");
        // No notice on stderr: the float64 engine is a choice, not a
        // fallback.
        assert!(err.trim().is_empty(), "{err}");
        let (ok, out, err) = hesscope(&[&["trace", "--probes", "2"][..], &small].concat());
        assert!(ok, "{err}");
        assert_eq!(json(&out)["settings"]["backend"], "cpu", "{out}");
    }
    if gpu_context(BackendChoice::Vulkan).is_none() {
        return;
    }
    let lavapipe = d["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["backend"] == "vulkan" && a["index"] == 0)
        .unwrap()
        .clone();
    let (ok, out, err) = hesscope(&[&["grad", "--backend", "vulkan"][..], &small].concat());
    assert!(ok, "{err}");
    let j = json(&out);
    assert_eq!(j["backend"], "vulkan", "{out}");
    assert_eq!(j["adapter"], lavapipe["name"], "{out}");
    if !gpu && under_ci() {
        // CI's adapter is lavapipe: a CPU emulator, named explicitly.
        assert_eq!(lavapipe["device_type"], "Cpu", "{lavapipe}");
    }
    // The float64 engine and the emulator agree to float32 rounding.
    let (a, b) = (grad["loss"].as_f64().unwrap(), j["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-5 * a.abs(), "loss cpu {a} vulkan {b}");
}

/// `--threads N` on the commands that compute: 0 is refused naming the
/// flag; 1 and 2 threads give the same bits (the float64 engine's
/// reductions run in a fixed order).
#[test]
fn threads_sets_the_engine_and_not_its_results() {
    for cmd in ["grad", "hvp", "density", "eigs", "exact", "bench"] {
        let (ok, _, err) = hesscope(&[cmd, "--threads", "0"]);
        assert!(!ok && err.contains("--threads"), "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{cmd}: {err}");
    }
    let (ok, _, err) = hesscope(&["grad", "--threads", "x"]);
    assert!(!ok && err.contains("--threads"), "{err}");
    let run = |threads: &str| {
        let (ok, out, err) = hesscope(&[
            "hvp",
            "--backend",
            "cpu",
            "--model",
            "cnn-tiny",
            "--samples",
            "24",
            "--batch",
            "12",
            "--threads",
            threads,
            "--json",
        ]);
        assert!(ok, "{err}");
        json(&out)
    };
    let (one, two) = (run("1"), run("2"));
    for k in ["loss", "grad_norm", "hv_norm", "vhv"] {
        assert_eq!(
            one[k].as_f64().unwrap().to_bits(),
            two[k].as_f64().unwrap().to_bits(),
            "{k}: 1 thread {} 2 threads {}",
            one[k],
            two[k]
        );
    }
}

/// The trainer and `trace-grad` resolve `auto` as every other command: on
/// a machine without a GPU both run on the float64 CPU engine.
#[test]
fn train_and_trace_grad_resolve_auto_the_same_way() {
    let (d, gpu) = devices();
    let want = match gpu {
        true => d["auto"]["backend"].clone(),
        false => serde_json::Value::from("cpu"),
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let small = [
        "--model",
        "mlp-tiny",
        "--samples",
        "16",
        "--batch",
        "8",
        "--json",
    ];
    let (ok, out, err) = hesscope(
        &[
            &["train", "--epochs", "1", "--lr", "0.01", "--out"][..],
            &[run.to_str().unwrap()],
            &small,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["settings"]["backend"], want, "{out}");
    let g = tmp.path().join("g.safetensors");
    let (ok, out, err) = hesscope(
        &[
            &["trace-grad", "--probes", "1", "--out"][..],
            &[g.to_str().unwrap()],
            &small,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["backend"], want, "{out}");
}

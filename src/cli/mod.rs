//! The `hesscope` command line (see ../shared/spec/cli.md). The library
//! returns typed errors; this layer adds the context a user needs.

mod common;
mod output;
mod spectral_cmds;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use common::Inputs;
use output::{emit, vnorm};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "hesscope",
    version,
    about = "Exact Hessian eigenvalue densities of CNNs on any GPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Adapters per backend, with the features and limits that matter.
    Devices {
        /// Print one JSON object on stdout instead of prose.
        #[arg(long)]
        json: bool,
    },
    /// Loss and gradient.
    Grad {
        #[command(flatten)]
        inputs: Inputs,
        /// Write the gradient as safetensors with the parameter names.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Hessian-vector product Hv for a direction v.
    Hvp {
        #[command(flatten)]
        inputs: Inputs,
        /// The direction, as safetensors with the trainable tensors' names
        /// (default: a random unit Gaussian direction from --seed).
        #[arg(long)]
        vector: Option<PathBuf>,
        /// Write Hv as safetensors with the parameter names.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Stochastic Lanczos quadrature: the Hessian eigenvalue density.
    Density(spectral_cmds::DensityArgs),
    /// Extreme eigenvalues with Ritz vectors and residuals.
    Eigs(spectral_cmds::EigsArgs),
    /// Hutchinson and Hutch++ trace estimates.
    Trace(spectral_cmds::TraceArgs),
    /// The whole spectrum of a small model from its dense Hessian.
    Exact(spectral_cmds::ExactArgs),
    /// Per-layer λmax, trace and density similarity.
    Layers(spectral_cmds::LayersArgs),
    /// Kernel throughput at the model's layer shapes and end-to-end
    /// gradient / HVP times on the chosen backend.
    Bench {
        #[command(flatten)]
        inputs: Inputs,
        /// Timed repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Skip the per-kernel table.
        #[arg(long)]
        no_kernels: bool,
    },
    /// Write the model's deterministic initial weights (a PyTorch state_dict).
    Init {
        #[command(flatten)]
        inputs: Inputs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the built-in synthetic data set as safetensors `x`/`y`.
    Synth {
        #[command(flatten)]
        inputs: Inputs,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices { json } => devices(json),
        Command::Density(a) => spectral_cmds::density(a),
        Command::Eigs(a) => spectral_cmds::eigs_cmd(a),
        Command::Trace(a) => spectral_cmds::trace_cmd(a),
        Command::Exact(a) => spectral_cmds::exact_cmd(a),
        Command::Layers(a) => spectral_cmds::layers_cmd(a),
        Command::Bench {
            inputs,
            reps,
            no_kernels,
        } => bench(&inputs, reps, no_kernels),
        Command::Grad { inputs, out } => {
            let mut engine = inputs.engine()?;
            let t = Instant::now();
            let (loss, grad) = engine.loss_grad().context("computing the gradient")?;
            let seconds = t.elapsed().as_secs_f64();
            if let Some(path) = &out {
                inputs.save_vector(path, &grad)?;
            }
            emit(
                inputs.json,
                serde_json::json!({
                    "loss": loss, "grad_norm": vnorm(&grad),
                    "backend": engine.backend(), "adapter": engine.adapter(), "seconds": seconds,
                    "out": out,
                }),
            )
        }
        Command::Hvp {
            inputs,
            vector,
            out,
        } => {
            let mut engine = inputs.engine()?;
            let v = match &vector {
                Some(p) => inputs.load_vector(p)?,
                None => common::random_unit(engine.n_params(), inputs.seed),
            };
            let t = Instant::now();
            let (loss, grad, hv) = engine.loss_grad_hvp(&v).context("computing Hv")?;
            let seconds = t.elapsed().as_secs_f64();
            if let Some(path) = &out {
                inputs.save_vector(path, &hv)?;
            }
            let vhv: f64 = v.iter().zip(&hv).map(|(a, b)| a * b).sum();
            emit(
                inputs.json,
                serde_json::json!({
                    "loss": loss, "grad_norm": vnorm(&grad), "hv_norm": vnorm(&hv), "vhv": vhv,
                    "backend": engine.backend(), "adapter": engine.adapter(), "seconds": seconds,
                    "vector": vector.map(|p| p.display().to_string()).unwrap_or_else(|| format!("random unit Gaussian (seed {})", inputs.seed)),
                    "out": out,
                }),
            )
        }
        Command::Init { inputs, out } => {
            let (model, weights) = inputs.model_and_weights()?;
            hesscope::model::params::save_state_dict(&model, &out, &weights)
                .with_context(|| format!("writing {}", out.display()))?;
            emit(
                inputs.json,
                serde_json::json!({"model": model.name, "n_params": model.n_params, "out": out}),
            )
        }
        Command::Synth { inputs, out } => {
            let (model, _) = inputs.model_and_weights()?;
            let data = inputs.dataset(&model)?;
            data.save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            emit(
                inputs.json,
                serde_json::json!({"samples": data.len(), "shape": [data.shape.c, data.shape.h, data.shape.w], "out": out}),
            )
        }
    }
}

fn devices(json: bool) -> Result<()> {
    let list = hesscope::gpu::list_adapters();
    if json {
        println!("{}", serde_json::json!({ "adapters": list }));
        return Ok(());
    }
    if list.is_empty() {
        println!("no GPU adapter found (without a GPU on Linux, install Mesa's software drivers: apt-get install mesa-vulkan-drivers libegl-mesa0)");
        return Ok(());
    }
    for a in &list {
        let mib = |b: u64| b / (1 << 20);
        println!(
            "{} adapter {}: {} ({})\n  driver: {} {}\n  features: f64 {}, f16 {}, subgroups {}, timestamps {}\n  limits: storage binding {} MiB, buffer {} MiB, {} storage buffers/stage, {} B workgroup memory, {} invocations/workgroup, {} workgroups/dimension",
            a.backend, a.index, a.name, a.device_type, a.driver, a.driver_info,
            a.f64, a.f16, a.subgroups, a.timestamps,
            mib(a.max_storage_buffer_binding_size), mib(a.max_buffer_size),
            a.max_storage_buffers_per_shader_stage, a.max_compute_workgroup_storage_size,
            a.max_compute_invocations_per_workgroup, a.max_compute_workgroups_per_dimension,
        );
    }
    Ok(())
}

fn bench(inputs: &Inputs, reps: usize, no_kernels: bool) -> Result<()> {
    if reps == 0 {
        anyhow::bail!("--reps must be at least 1");
    }
    let mut engine = inputs.engine()?;
    let (model, _) = inputs.model_and_weights()?;
    let e2e =
        hesscope::bench::end_to_end(engine.as_mut(), reps).context("timing gradient and HVP")?;
    let adapter = engine.adapter();
    let backend = engine.backend();
    drop(engine);
    let mut kernels = vec![];
    if let (Some(choice), false) = (inputs.backend.gpu(), no_kernels) {
        let ctx = hesscope::gpu::GpuContext::open(choice, inputs.adapter)?;
        let n = inputs.batch.min(inputs.samples.unwrap_or(inputs.batch));
        kernels = hesscope::bench::kernel_table(&ctx, &model, n, reps).context("timing kernels")?;
    }
    if inputs.json {
        println!(
            "{}",
            serde_json::json!({
                "model": model.name, "batch": inputs.batch, "bn": inputs.bn,
                "backend": backend, "adapter": adapter, "reps": reps,
                "end_to_end": e2e, "kernels": kernels,
            })
        );
        return Ok(());
    }
    println!(
        "hesscope bench: {} on {} ({backend}), batch {}, bn {:?}, median of {reps}",
        model.name, adapter, inputs.batch, inputs.bn
    );
    println!(
        "  gradient {:.4} s   HVP (cached) {:.4} s   HVP/gradient {:.2}",
        e2e.grad_seconds, e2e.hvp_seconds, e2e.hvp_over_grad
    );
    println!(
        "  Lanczos step at a {}-vector basis {:.4} s (HVP + compensated reorthogonalisation); 900 such steps (a default density) ≈ {:.1} s",
        e2e.lanczos_basis,
        e2e.lanczos_step_seconds,
        900.0 * e2e.lanczos_step_seconds
    );
    if !kernels.is_empty() {
        print!("{}", hesscope::bench::format_kernel_table(&kernels));
    }
    Ok(())
}

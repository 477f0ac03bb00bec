//! The `hesscope` command line (see ../shared/spec/cli.md). The library
//! returns typed errors; this layer adds the context a user needs, maps
//! library input names to flags (`errors`), and prints the typed reports
//! of `hesscope::report`.

mod common;
pub mod errors;
mod layers_cmd;
pub mod output;
mod papyan_cmd;
mod parallel;
mod selftest_cmd;
mod spectral_args;
mod spectral_cmds;
mod trace_grad_cmd;
mod train_cmd;
mod train_guard;
mod train_measures;
mod train_parallel;
mod train_plots;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use common::Inputs;
use hesscope::device::Need;
use hesscope::gpu::ReducePath;
use hesscope::report::{
    BenchReport, DevicesReport, GradReport, HvpReport, InitReport, SynthReport,
};
use hesscope::spectral::slq;
use output::{emit, line, vnorm};
use std::path::PathBuf;
use std::time::Instant;

/// The most timed repetitions `bench` accepts.
pub const MAX_REPS: usize = 10_000;

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
        /// Write the gradient as safetensors with the parameter names.
        #[arg(long, help_heading = "Output")]
        out: Option<PathBuf>,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Hessian-vector product Hv for a direction v (or G·v, E·v: --operator).
    Hvp {
        /// The direction, as safetensors with the trainable tensors' names
        /// (default: a random unit Gaussian direction from --seed).
        #[arg(long)]
        vector: Option<PathBuf>,
        #[command(flatten)]
        operator: spectral_cmds::OperatorArgs,
        /// Write Hv as safetensors with the parameter names.
        #[arg(long, help_heading = "Output")]
        out: Option<PathBuf>,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Stochastic Lanczos quadrature: the Hessian eigenvalue density.
    Density(spectral_cmds::DensityArgs),
    /// Extreme eigenvalues with Ritz vectors and residuals.
    Eigs(spectral_cmds::EigsArgs),
    /// Hutchinson and Hutch++ trace estimates.
    Trace(spectral_cmds::TraceArgs),
    /// The gradient of a Hutchinson trace estimate, ∇θ[(1/P) Σₖ vₖᵀ H vₖ],
    /// over probes on a layer set (third derivatives; float64 reference).
    TraceGrad(trace_grad_cmd::TraceGradArgs),
    /// SGD training as PyTorch's (momentum, weight decay, MultiStepLR; BN
    /// in train mode), on the float64 reference; the Hessian along the way
    /// and the Hessian-trace regulariser.
    Train(train_cmd::TrainArgs),
    /// The whole spectrum of a small model from its dense Hessian.
    Exact(spectral_cmds::ExactArgs),
    /// Per-layer λmax, trace and density similarity.
    Layers(layers_cmd::LayersArgs),
    /// Papyan's view: the densities of H, its Gauss–Newton term G and
    /// E = H − G side by side, with G's outliers against the classes.
    Papyan(papyan_cmd::PapyanArgs),
    /// Kernel throughput at the model's layer shapes and end-to-end
    /// gradient / HVP times on the chosen backend.
    Bench {
        /// Timed repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 5, allow_hyphen_values = true)]
        reps: usize,
        /// Skip the per-kernel table.
        #[arg(long)]
        no_kernels: bool,
        /// Also time block products of these sizes (comma-separated, each
        /// 1..=64, e.g. 1,4,10,16): one sweep for K vectors, reported per
        /// vector.
        #[arg(long, value_delimiter = ',', value_name = "K,...")]
        block_sizes: Vec<usize>,
        /// Which conv kernels the kernel table times: `emulator` (the
        /// register-blocked kernels shaped for CPU emulators), `tiled`
        /// (tiled implicit GEMM for GPUs) beside them, or `auto` (the tiled
        /// ones too where the adapter is a GPU).
        #[arg(long, value_enum, default_value_t = ConvPathArg::Auto)]
        conv_path: ConvPathArg,
        /// How the engine timed (gradient, HVP, block products) runs its
        /// per-channel reductions (batch-norm statistics and parameter
        /// sums, bias sums): `whole` (a workgroup per channel), `split`
        /// (segments of 4096 elements, then one workgroup per channel over
        /// their partials), `auto` (split on GPUs, whole on CPU
        /// emulators). The kernel table times both forms.
        #[arg(long, value_enum, default_value_t = ReductionsArg::Auto)]
        reductions: ReductionsArg,
        /// The tiled conv kernels' widest tile, TMxTNxTK (default
        /// 64x64x16; narrowed per layer as the engine does): for the
        /// engine's gradient and HVPs and the tiled kernel table, which
        /// also times the other candidate tiles.
        #[arg(long, value_name = "TMxTNxTK")]
        conv_tile: Option<hesscope::gpu::kernels::ConvTile>,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Check the GPU engine on an adapter against the PyTorch fixtures'
    /// float64 references (gradients, Hv, eigs, a density, the GPU-only
    /// kernel paths forced on); exits non-zero when a check fails.
    Selftest(selftest_cmd::SelftestArgs),
    /// Write the model's deterministic initial weights (a PyTorch state_dict).
    Init {
        /// The safetensors file to write.
        #[arg(long, help_heading = "Output")]
        out: PathBuf,
        #[command(flatten)]
        inputs: Inputs,
    },
    /// Write the built-in synthetic data set as safetensors `x`/`y`.
    Synth {
        /// The safetensors file to write (`x` f64 [N, C, H, W], `y` i64 [N]; a model
        /// reading token ids: `x` i64 [N, T] only).
        #[arg(long, help_heading = "Output")]
        out: PathBuf,
        #[command(flatten)]
        inputs: Inputs,
    },
}

/// Every output file a command will write, with its flag.
fn outputs(c: &Command) -> Vec<(&'static str, &std::path::Path)> {
    let mut v: Vec<(&'static str, Option<&PathBuf>)> = vec![];
    match c {
        Command::Grad { out, .. } | Command::Hvp { out, .. } => v.push(("--out", out.as_ref())),
        Command::Init { out, .. } | Command::Synth { out, .. } => v.push(("--out", Some(out))),
        Command::Density(a) => v.extend([("--out", a.out.as_ref()), ("--plot", a.plot.as_ref())]),
        Command::Eigs(a) => {
            v.extend([("--out", a.out.as_ref()), ("--vectors", a.vectors.as_ref())])
        }
        Command::Trace(a) => v.push(("--out", a.out.as_ref())),
        Command::Exact(a) => v.extend([("--out", a.out.as_ref()), ("--plot", a.plot.as_ref())]),
        Command::Layers(a) => v.push(("--out", a.out.as_ref())),
        Command::Papyan(a) => v.extend([("--out", a.out.as_ref()), ("--plot", a.plot.as_ref())]),
        Command::TraceGrad(a) => v.push(("--out", Some(&a.out))),
        _ => {}
    }
    v.into_iter()
        .filter_map(|(f, p)| p.map(|p| (f, p.as_path())))
        .collect()
}

/// The shared inputs of a command that computes (None: `devices`,
/// `selftest`).
fn inputs_of(c: &Command) -> Option<&Inputs> {
    Some(match c {
        Command::Grad { inputs, .. }
        | Command::Hvp { inputs, .. }
        | Command::Bench { inputs, .. }
        | Command::Init { inputs, .. }
        | Command::Synth { inputs, .. } => inputs,
        Command::Density(a) => &a.inputs,
        Command::Eigs(a) => &a.inputs,
        Command::Trace(a) => &a.inputs,
        Command::TraceGrad(a) => &a.inputs,
        Command::Train(a) => &a.inputs,
        Command::Exact(a) => &a.inputs,
        Command::Layers(a) => &a.inputs,
        Command::Papyan(a) => &a.inputs,
        Command::Devices { .. } | Command::Selftest(_) => return None,
    })
}

/// `--devices` and MPI ranks serve the commands that sweep data and
/// `train` (data-parallel); the others are refused with them.
fn parallel_scope(c: &Command) -> Result<()> {
    let (name, sweeps) = match c {
        Command::Grad { .. } => ("grad", true),
        Command::Hvp { .. } => ("hvp", true),
        Command::Density(_) => ("density", true),
        Command::Eigs(_) => ("eigs", true),
        Command::Trace(_) => ("trace", true),
        Command::TraceGrad(_) => ("trace-grad", true),
        Command::Exact(_) => ("exact", true),
        Command::Layers(_) => ("layers", true),
        Command::Papyan(_) => ("papyan", true),
        // Data-parallel (`train_parallel`): each mini-batch split.
        Command::Train(_) => ("train", true),
        Command::Bench { .. } => ("bench", false),
        Command::Selftest(_) => ("selftest", false),
        // Deterministic from the seed: every rank computes the same,
        // rank 0 writes it.
        Command::Devices { .. } | Command::Init { .. } | Command::Synth { .. } => return Ok(()),
    };
    if sweeps {
        return Ok(());
    }
    if inputs_of(c).is_some_and(|i| i.devices.is_some()) {
        bail!("invalid --devices with `{name}`: it runs on one engine (--backend, --adapter)");
    }
    let (_, ranks) = hesscope::multi::world();
    if ranks > 1 {
        // Every rank was given the same command.
        hesscope::multi::mark_agreed();
        bail!("`{name}` runs in one process, not over {ranks} MPI ranks");
    }
    Ok(())
}

pub fn run(cli: Cli) -> Result<()> {
    // Output files are checked before any computation.
    for (flag, path) in outputs(&cli.command) {
        output::check_writable(flag, path)?;
    }
    parallel_scope(&cli.command)?;
    // The float64 engine's threads, before any parallel work.
    if let Some(inputs) = inputs_of(&cli.command) {
        hesscope::host::set_threads(inputs.threads)?;
    }
    match cli.command {
        Command::Devices { json } => devices(json),
        Command::Density(a) => spectral_cmds::density(a),
        Command::Eigs(a) => spectral_cmds::eigs_cmd(a),
        Command::Trace(a) => spectral_cmds::trace_cmd(a),
        Command::TraceGrad(a) => trace_grad_cmd::trace_grad_cmd(a),
        Command::Train(a) => train_cmd::train_cmd(a),
        Command::Exact(a) => spectral_cmds::exact_cmd(a),
        Command::Layers(a) => layers_cmd::layers_cmd(a),
        Command::Papyan(a) => papyan_cmd::papyan_cmd(a),
        Command::Selftest(a) => selftest_cmd::selftest_cmd(a),
        Command::Bench {
            inputs,
            reps,
            no_kernels,
            block_sizes,
            conv_path,
            reductions,
            conv_tile,
        } => bench(
            &inputs,
            reps,
            no_kernels,
            &block_sizes,
            conv_path,
            reductions,
            conv_tile,
        ),
        Command::Grad { inputs, out } => grad(&inputs, out),
        Command::Hvp {
            inputs,
            vector,
            operator,
            out,
        } => hvp(&inputs, vector, operator.get(), out),
        Command::Init { inputs, out } => {
            let (model, weights) = inputs.model_and_weights()?;
            output::write_atomic(&out, |t| {
                hesscope::model::params::save_state_dict(&model, t, &weights)
            })
            .with_context(|| format!("writing {}", out.display()))?;
            emit(
                inputs.json,
                &InitReport {
                    model: model.name,
                    n_params: model.n_params,
                    out,
                },
            )
        }
        Command::Synth { inputs, out } => {
            let model = inputs.model()?;
            let data = inputs.dataset(&model)?;
            output::write_atomic(&out, |t| data.save(t))
                .with_context(|| format!("writing {}", out.display()))?;
            emit(
                inputs.json,
                &SynthReport {
                    samples: data.len(),
                    shape: [data.shape.c, data.shape.h, data.shape.w],
                    out,
                },
            )
        }
    }
}

fn grad(inputs: &Inputs, out: Option<PathBuf>) -> Result<()> {
    let mut l = inputs.load()?;
    let t = Instant::now();
    let (loss, grad) = l.engine.loss_grad().context("computing the gradient")?;
    let seconds = t.elapsed().as_secs_f64();
    if let Some(path) = &out {
        inputs.save_vector(&l.model, path, &grad)?;
    }
    let decisions = l
        .engine
        .decision_report()
        .context("taking the piecewise decisions")?;
    emit(
        inputs.json,
        &GradReport {
            loss,
            grad_norm: vnorm(&grad),
            backend: l.engine.backend(),
            adapter: l.engine.adapter(),
            seconds,
            out,
            decisions,
        },
    )
}

fn hvp(
    inputs: &Inputs,
    vector: Option<PathBuf>,
    operator: hesscope::operator::Operator,
    out: Option<PathBuf>,
) -> Result<()> {
    let (model, weights) = inputs.model_and_weights()?;
    // The direction is checked before the engine is built.
    let v = match &vector {
        Some(p) => inputs.load_vector(&model, p)?,
        None => common::random_unit(model.n_params, inputs.seed),
    };
    let mut l = inputs.load_with(model, weights)?;
    let t = Instant::now();
    let (loss, grad, hv) = if operator == hesscope::operator::Operator::Hessian {
        l.engine.loss_grad_hvp(&v).context("computing Hv")?
    } else {
        let (loss, grad) = l.engine.loss_grad().context("computing the gradient")?;
        let mut av = vec![0.0; v.len()];
        l.engine
            .product(operator, &v, &mut av)
            .with_context(|| format!("computing the {} product", operator.describe()))?;
        (loss, grad, av)
    };
    let seconds = t.elapsed().as_secs_f64();
    for (what, x) in [("Hv", &hv), ("the gradient", &grad)] {
        if let Some(i) = x.iter().position(|x| !x.is_finite()) {
            let p = l
                .model
                .params
                .iter()
                .find(|p| (p.offset..p.offset + p.numel()).contains(&i));
            bail!(
                "{what} is not finite: `{}` element {} is {} (the weights or the direction \
                 overflow float64's range)",
                p.map_or("?", |p| p.name.as_str()),
                i - p.map_or(0, |p| p.offset),
                x[i]
            );
        }
    }
    if let Some(path) = &out {
        inputs.save_vector(&l.model, path, &hv)?;
    }
    let vhv: f64 = v.iter().zip(&hv).map(|(a, b)| a * b).sum();
    if !vhv.is_finite() {
        bail!(
            "vᵀHv is {vhv}: it overflows float64 (‖v‖ = {:e}, ‖Hv‖ = {:e}); scale the direction \
             (--vector) down",
            vnorm(&v),
            vnorm(&hv)
        );
    }
    let decisions = l
        .engine
        .decision_report()
        .context("taking the piecewise decisions")?;
    emit(
        inputs.json,
        &HvpReport {
            loss,
            grad_norm: vnorm(&grad),
            hv_norm: vnorm(&hv),
            vhv,
            backend: l.engine.backend(),
            adapter: l.engine.adapter(),
            seconds,
            operator,
            vector: vector
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("random unit Gaussian (seed {})", inputs.seed)),
            out,
            decisions,
        },
    )
}

fn devices(json: bool) -> Result<()> {
    let adapters = hesscope::gpu::list_adapters();
    let report = DevicesReport {
        auto: hesscope::device::choose(&adapters, Need::Engine, 0)?,
        cpu_threads: hesscope::host::cores(),
        adapters,
    };
    if json {
        return line(hesscope::report::Exporter::JsonLine.render(&report)?);
    }
    let auto = &report.auto;
    let at = match auto.gpu() {
        Some((b, i)) => format!(" (--backend {} --adapter {i})", common::backend_flag(b)),
        None => " (--backend cpu)".to_string(),
    };
    let mut text = format!(
        "--backend auto runs on: {}{at}\n  why: {}\ncpu: the float64 CPU engine, {} threads by default (--threads)\n",
        auto.name, auto.reason, report.cpu_threads
    );
    if report.adapters.is_empty() {
        text.push_str("no GPU adapter found (for a GPU path on Linux without a GPU, install Mesa's software drivers: apt-get install mesa-vulkan-drivers libegl-mesa0)\n");
    }
    for a in &report.adapters {
        let mib = |b: u64| b / (1 << 20);
        text.push_str(&format!(
            "{} adapter {}: {} ({}: {})\n  driver: {} {}\n  features: f64 {}, f16 {}, subgroups {}, timestamps {}\n  limits: storage binding {} MiB, buffer {} MiB, {} storage buffers/stage, {} B workgroup memory, {} invocations/workgroup, {} workgroups/dimension\n",
            a.backend, a.index, a.name, a.device_type,
            if hesscope::dispatch::is_gpu_type(&a.device_type) { "a GPU" } else { "a CPU emulator" },
            a.driver, a.driver_info,
            a.f64, a.f16, a.subgroups, a.timestamps,
            mib(a.max_storage_buffer_binding_size), mib(a.max_buffer_size),
            a.max_storage_buffers_per_shader_stage, a.max_compute_workgroup_storage_size,
            a.max_compute_invocations_per_workgroup, a.max_compute_workgroups_per_dimension,
        ));
        if let Some(b) = a.device_memory {
            text.push_str(&format!(
                "  memory: {:.1} GiB device-local\n",
                b as f64 / (1u64 << 30) as f64
            ));
        }
        let bases = match a.auto.lanczos_bases {
            "device" => "on the device where they fit its budget",
            _ => "on the host",
        };
        text.push_str(&format!(
            "  hesscope runs here: {} conv kernels, reductions {}, Lanczos bases {bases}\n",
            a.auto.conv, a.auto.reductions
        ));
    }
    output::print(&text)
}

/// `bench --conv-path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvPathArg {
    Auto,
    Tiled,
    Emulator,
}

/// `bench --reductions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReductionsArg {
    Auto,
    Whole,
    Split,
}

fn bench(
    inputs: &Inputs,
    reps: usize,
    no_kernels: bool,
    block_sizes: &[usize],
    conv_path: ConvPathArg,
    reductions: ReductionsArg,
    conv_tile: Option<hesscope::gpu::kernels::ConvTile>,
) -> Result<()> {
    if reps == 0 || reps > MAX_REPS {
        bail!("invalid --reps: {reps}; between 1 and {MAX_REPS}");
    }
    let max_block = spectral_cmds::MAX_BLOCK;
    if let Some(k) = block_sizes.iter().find(|k| !(1..=max_block).contains(*k)) {
        bail!("invalid --block-sizes: {k}; each block size between 1 and {max_block}");
    }
    // An engine for the largest block timed (GPU tangent buffers for K).
    let reduce_path = match reductions {
        ReductionsArg::Auto => ReducePath::Auto,
        ReductionsArg::Whole => ReducePath::Whole,
        ReductionsArg::Split => ReducePath::Split(hesscope::gpu::reduce::GPU_SPAN),
    };
    let mut l = inputs.load_with_options(hesscope::gpu::EngineOptions {
        block: block_sizes.iter().max().copied(),
        conv_tile,
        reduce_path,
        ..Default::default()
    })?;
    let e2e =
        hesscope::bench::end_to_end(l.engine.as_mut(), reps).context("timing gradient and HVP")?;
    let block_products = hesscope::bench::block_timings(l.engine.as_mut(), block_sizes, reps)
        .context("timing block products")?;
    let decisions = l
        .engine
        .decision_report()
        .context("taking the piecewise decisions")?;
    let adapter = l.engine.adapter();
    let backend = l.engine.backend();
    let kernel_paths = l.engine.kernel_paths();
    drop(l.engine);
    let model = l.model;
    let cpu_layers = if backend == "cpu" {
        let (m, w) = inputs.model_and_weights()?;
        let data = inputs.dataset(&m)?;
        let p = hesscope::engine::Problem::new(m, w, data, inputs.batch, inputs.bn_mode())?;
        let cpu = hesscope::cpu::CpuReference::checked(p)?;
        Some(hesscope::cpu::profile::cpu_layers(&cpu, reps))
    } else {
        None
    };
    let mut kernels = vec![];
    // No kernel table on the float64 CPU engine (`cpu`, or `auto` without
    // a GPU).
    let gpu = match backend == "cpu" {
        true => None,
        false => inputs.backend.resolve(inputs.adapter, Need::Engine)?,
    };
    if let (Some((choice, adapter)), false) = (gpu, no_kernels) {
        let ctx = hesscope::gpu::GpuContext::open(choice, adapter)?;
        let n = inputs.batch.min(inputs.samples.unwrap_or(inputs.batch));
        kernels = hesscope::bench::kernel_table(&ctx, &model, n, reps).context("timing kernels")?;
        let path = match conv_path {
            ConvPathArg::Auto => hesscope::gpu::executor::ConvPath::Auto,
            ConvPathArg::Tiled => hesscope::gpu::executor::ConvPath::Tiled,
            ConvPathArg::Emulator => hesscope::gpu::executor::ConvPath::Emulator,
        };
        if path.tiled_for(&ctx)? {
            let tile = conv_tile.unwrap_or(hesscope::gpu::kernels::ConvTile::DEFAULT);
            let tiled = hesscope::bench::tiled_kernel_table(&ctx, &model, n, reps, tile)
                .context("timing the tiled conv kernels")?;
            kernels.extend(tiled);
        }
    }
    let report = BenchReport {
        model: model.name.clone(),
        batch: inputs.batch,
        bn: inputs.bn_mode(),
        backend,
        adapter,
        kernel_paths,
        reps,
        end_to_end: e2e,
        block_products,
        kernels,
        cpu_layers,
        decisions,
    };
    if inputs.json {
        return emit(true, &report);
    }
    let e2e = &report.end_to_end;
    let default_steps = slq::DEFAULT_STEPS * slq::DEFAULT_RUNS;
    let mut text = format!(
        "hesscope bench: {} on {} ({}), batch {}, bn {:?}, median of {reps}\n",
        model.name, report.adapter, report.backend, inputs.batch, report.bn
    );
    if let Some(k) = &report.kernel_paths {
        text.push_str(&format!(
            "  kernels: {k}
"
        ));
    }
    text.push_str(&format!(
        "  gradient {:.4} s   HVP (cached) {:.4} s   HVP/gradient {:.2}\n",
        e2e.grad_seconds, e2e.hvp_seconds, e2e.hvp_over_grad
    ));
    text.push_str(&format!(
        "  Lanczos step at a {}-vector basis {:.4} s (HVP + compensated reorthogonalisation); \
         {default_steps} such steps (a default density: {} steps × {} runs) ≈ {:.1} s\n",
        e2e.lanczos_basis,
        e2e.lanczos_step_seconds,
        slq::DEFAULT_STEPS,
        slq::DEFAULT_RUNS,
        default_steps as f64 * e2e.lanczos_step_seconds
    ));
    for b in &report.block_products {
        text.push_str(&format!(
            "  HVP per vector at K = {:<3} {:.4} s   (block product {:.4} s; {:.2}× the single HVP)\n",
            b.block,
            b.per_vector_seconds,
            b.seconds,
            b.per_vector_seconds / e2e.hvp_seconds
        ));
    }
    if !report.kernels.is_empty() {
        text.push_str(&hesscope::bench::format_kernel_table(&report.kernels));
    }
    if let Some(c) = &report.cpu_layers {
        text.push_str(&hesscope::cpu::profile::format_cpu_layers(c));
    }
    output::print(&text)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help_text() {
        let cli = Cli::command();
        let mut missing = vec![];
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} --{}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn every_library_input_name_maps_to_a_real_flag() {
        let cli = Cli::command();
        for (what, flag) in super::errors::FLAGS {
            let long = flag.trim_start_matches("--");
            let known = cli
                .get_subcommands()
                .any(|s| s.get_arguments().any(|a| a.get_long() == Some(long)));
            assert!(known, "`{what}` maps to {flag}, which no subcommand has");
        }
    }
}

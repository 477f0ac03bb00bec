//! The inputs shared by the compute subcommands, and how they become an
//! engine: the model and weights are loaded once per command.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use hesscope::cpu::CpuReference;
use hesscope::data::{self, Dataset};
use hesscope::decisions::DecisionSource;
use hesscope::device::Need;
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::BackendChoice;
use hesscope::model::{params, Model, Weights};
use hesscope::report::Settings;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::{Path, PathBuf};

/// Synthetic data size when no --data and no --samples are given.
pub const SYNTHETIC_SAMPLES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A GPU adapter where there is one (discrete, integrated; see
    /// `hesscope devices`), else the float64 CPU engine (`cpu`); CPU
    /// emulators (lavapipe, llvmpipe) only where named (`vulkan`, `gl`).
    Auto,
    /// Vulkan (Linux, Windows, Android; Mesa's lavapipe without a GPU).
    Vulkan,
    /// Metal (macOS, iOS).
    Metal,
    /// Direct3D 12 (Windows).
    Dx12,
    /// OpenGL / GLES (Mesa's llvmpipe without a GPU).
    Gl,
    /// The float64 CPU engine (all cores; `--threads`).
    Cpu,
}

impl Backend {
    /// The adapter this `--backend` and `--adapter` run on (backend, index
    /// within it), or None for the float64 CPU engine. `auto` is decided
    /// by `hesscope::device::choose` (what `hesscope devices` shows); a
    /// caller that needs an adapter (`selftest`) asks with `Need::Adapter`.
    pub fn resolve(self, adapter: usize, need: Need) -> Result<Option<(BackendChoice, usize)>> {
        let choice = match self {
            Backend::Auto => {
                let c = hesscope::device::choose(&hesscope::gpu::list_adapters(), need, adapter)
                    .with_context(|| format!("--backend auto --adapter {adapter}"))?;
                return Ok(c.gpu());
            }
            Backend::Cpu => return Ok(None),
            Backend::Vulkan => BackendChoice::Vulkan,
            Backend::Metal => BackendChoice::Metal,
            Backend::Dx12 => BackendChoice::Dx12,
            Backend::Gl => BackendChoice::Gl,
        };
        Ok(Some((choice, adapter)))
    }
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// The name of a backend as `--backend` spells it.
pub fn backend_flag(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Auto => "auto",
        BackendChoice::Vulkan => "vulkan",
        BackendChoice::Metal => "metal",
        BackendChoice::Dx12 => "dx12",
        BackendChoice::Gl => "gl",
    }
}

/// `--bn`: the CLI's mirror of the library's [`BnMode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BnArg {
    /// PyTorch train(): normalise by each batch's own statistics.
    Batch,
    /// PyTorch eval(): normalise by the running buffers.
    Running,
}

/// `--decisions`: the CLI's mirror of the library's [`DecisionSource`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecisionsArg {
    /// From the float64 reference's forward pass, replayed by every
    /// float32 pass (only the decisions move; every value stays float32).
    Float64,
    /// Each float32 pass's own, as every float32 framework takes them.
    Float32,
}

impl From<DecisionsArg> for DecisionSource {
    fn from(d: DecisionsArg) -> DecisionSource {
        match d {
            DecisionsArg::Float64 => DecisionSource::Float64,
            DecisionsArg::Float32 => DecisionSource::Float32,
        }
    }
}

impl From<BnArg> for BnMode {
    fn from(b: BnArg) -> BnMode {
        match b {
            BnArg::Batch => BnMode::Batch,
            BnArg::Running => BnMode::Running,
        }
    }
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Problem")]
pub struct Inputs {
    /// A model under models/ by name (cnn-tiny, resnet20, lenet5, ...), an
    /// architecture file, or an ONNX file (`.onnx`; its initializers are
    /// the weights unless --weights is given).
    #[arg(long, default_value = "cnn-tiny")]
    pub model: String,
    /// safetensors state_dict with PyTorch names (default: init from --seed;
    /// an ONNX model's own initializers).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// safetensors x/y, or a folder of CIFAR-10 .bin files (default: synthetic).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use the first N samples (default: all; synthetic: 256).
    #[arg(long, allow_hyphen_values = true)]
    pub samples: Option<usize>,
    /// Batch size; the loss is the sample-weighted mean over batches.
    #[arg(long, default_value_t = 128, allow_hyphen_values = true)]
    pub batch: usize,
    /// Batch-norm statistics.
    #[arg(long, value_enum, default_value_t = BnArg::Batch)]
    pub bn: BnArg,
    /// Where the Hessian-vector products run: `auto` (a GPU, else the
    /// float64 CPU engine; `hesscope devices` says which and why), `cpu`
    /// (the float64 engine), or a GPU backend (`vulkan`, `gl` also run
    /// Mesa's CPU emulators lavapipe and llvmpipe).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Which adapter of the backend (see `hesscope devices`); with `auto`,
    /// which GPU in auto's order.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub adapter: usize,
    /// Several engines at once, whole batches dealt to them by sample
    /// count and their products summed in float64: a comma-separated list
    /// of adapters `BACKEND:INDEX` (`vulkan:0,gl:0`, `vulkan:0,vulkan:1`),
    /// `cpu` entries (the float64 engine; not mixed with adapters), or
    /// `all` (every GPU adapter of the first backend that has one). Under
    /// `mpirun`, rank r runs entry r mod the list's length.
    #[arg(long, value_name = "LIST", conflicts_with_all = ["backend", "adapter"])]
    pub devices: Option<String>,
    /// GiB of GPU memory for keeping every batch's forward results resident
    /// between Hessian-vector products (above it each product recomputes
    /// them). Default: a quarter of the adapter's device-local memory
    /// (Vulkan reports it); on a CPU emulator (lavapipe, llvmpipe) a
    /// quarter of the host's available memory, at most 2; else 2.
    #[arg(long, value_name = "GIB", allow_hyphen_values = true)]
    pub cache_budget: Option<f64>,
    /// Where a GPU engine's piecewise decisions (ReLU/LeakyReLU sides,
    /// max-pool choices) come from: `float64`, the float64 reference's
    /// forward pass at θ (once per θ on the host), replayed by every
    /// float32 pass, so that a value within float32 rounding of a kink
    /// cannot flip it; `float32`, each pass's own (as PyTorch's float32).
    /// The float64 reference (`--backend cpu`) takes them in float64.
    #[arg(long, value_enum, default_value_t = DecisionsArg::Float64)]
    pub decisions: DecisionsArg,
    /// With `--bn batch` and `--decisions float64`, where a GPU engine's
    /// batch-norm statistics and normalised values x̂ come from: `float64`,
    /// the same float64 forward pass (each rounded once to float32), so
    /// that a channel whose spread is small against its values does not
    /// amplify float32 rounding; `float32`, the float32 pass's own (as
    /// before, for comparison).
    #[arg(long, value_enum, default_value_t = DecisionsArg::Float64)]
    pub bn_state: DecisionsArg,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub seed: u64,
    /// Threads of the float64 CPU engine (its per-sample and per-block
    /// work and faer's matrix products); default: all cores. Results do
    /// not depend on it.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub threads: Option<usize>,
    /// Print one JSON object on stdout instead of prose.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
}

/// A command's problem, loaded once: the model (for names and blocks) and
/// the engine that holds the weights and data.
pub struct Loaded {
    pub model: Model,
    pub engine: Box<dyn Curvature>,
}

impl Inputs {
    pub fn bn_mode(&self) -> BnMode {
        self.bn.into()
    }

    pub fn model(&self) -> Result<Model> {
        Model::load(&self.model).with_context(|| format!("--model {}", self.model))
    }

    pub fn weights(&self, model: &Model) -> Result<Weights> {
        Ok(match &self.weights {
            Some(p) => {
                Weights::load(model, p).with_context(|| format!("--weights {}", p.display()))?
            }
            None => Weights::init(model, self.seed),
        })
    }

    pub fn model_and_weights(&self) -> Result<(Model, Weights)> {
        if hesscope::model::onnx::is_onnx(&self.model) {
            // The initializers are the weights, unless --weights is given
            // (refused for a graph whose batch norms were folded).
            let path = Path::new(&self.model);
            let (model, weights) = hesscope::model::onnx::load(path, self.weights.as_deref())
                .with_context(|| match &self.weights {
                    Some(p) => format!("--model {} --weights {}", self.model, p.display()),
                    None => format!("--model {}", self.model),
                })?;
            return Ok((model, weights));
        }
        let model = self.model()?;
        let weights = self.weights(&model)?;
        Ok((model, weights))
    }

    pub fn dataset(&self, model: &Model) -> Result<Dataset> {
        match &self.data {
            Some(p) => Dataset::load_first(p, self.samples)
                .with_context(|| format!("--data {}", p.display())),
            None if model.input.kind == hesscope::model::Kind::Ids => Ok(data::synthetic_tokens(
                model.input.tokens(),
                model.vocab().unwrap_or(model.classes),
                self.samples.unwrap_or(SYNTHETIC_SAMPLES),
                self.seed,
            )?),
            None => Ok(data::try_synthetic(
                model.input,
                model.classes,
                self.samples.unwrap_or(SYNTHETIC_SAMPLES),
                self.seed,
            )?),
        }
    }

    /// Model, weights, data and engine, each loaded once.
    pub fn load(&self) -> Result<Loaded> {
        let (model, weights) = self.model_and_weights()?;
        self.load_with(model, weights)
    }

    /// The engine for a model and weights already loaded.
    pub fn load_with(&self, model: Model, weights: Weights) -> Result<Loaded> {
        self.load_with_block(model, weights, None)
    }

    /// `load` with an engine built for block products of up to `block`
    /// vectors per sweep (`--block`; None: the engine's own choice).
    pub fn load_block(&self, block: Option<usize>) -> Result<Loaded> {
        let (model, weights) = self.model_and_weights()?;
        self.load_with_block(model, weights, block)
    }

    pub fn load_with_block(
        &self,
        model: Model,
        weights: Weights,
        block: Option<usize>,
    ) -> Result<Loaded> {
        let options = hesscope::gpu::EngineOptions {
            block,
            ..Default::default()
        };
        self.load_model_with_options(model, weights, options)
    }

    /// `load` with a GPU engine built with `options` (the reference where
    /// --backend asks for it).
    pub fn load_with_options(&self, options: hesscope::gpu::EngineOptions) -> Result<Loaded> {
        let (model, weights) = self.model_and_weights()?;
        self.load_model_with_options(model, weights, options)
    }

    fn load_model_with_options(
        &self,
        model: Model,
        weights: Weights,
        options: hesscope::gpu::EngineOptions,
    ) -> Result<Loaded> {
        let data = self.dataset(&model)?;
        let problem = Problem::new(model.clone(), weights, data, self.batch, self.bn_mode())?;
        let engine = self.engine_with_options(problem, options)?;
        Ok(Loaded { model, engine })
    }

    /// The engine, a GPU one built with `options`.
    pub fn engine_with_options(
        &self,
        problem: Problem,
        options: hesscope::gpu::EngineOptions,
    ) -> Result<Box<dyn Curvature>> {
        if let Some((engine, _)) = crate::cli::parallel::engine(self, &problem, options)? {
            return Ok(engine);
        }
        Ok(match self.gpu_engine(&problem, options)? {
            Some(engine) => Box::new(engine),
            None => Box::new(CpuReference::checked(problem)?),
        })
    }

    /// The GPU engine of --backend with `options` (and --cache-budget);
    /// None for the float64 CPU engine: --backend cpu, or auto without a
    /// GPU adapter.
    pub fn gpu_engine(
        &self,
        problem: &Problem,
        mut options: hesscope::gpu::EngineOptions,
    ) -> Result<Option<hesscope::gpu::GpuEngine>> {
        self.check_cache_budget()?;
        let Some((choice, adapter)) = self.backend.resolve(self.adapter, Need::Engine)? else {
            if self.decisions == DecisionsArg::Float32 {
                let why = match self.backend {
                    Backend::Cpu => "--backend cpu".to_string(),
                    _ => format!(
                        "--backend {} (no GPU adapter here: the float64 CPU engine)",
                        self.backend.name()
                    ),
                };
                anyhow::bail!(
                    "invalid --decisions float32 with {why}: the float64 CPU engine takes \
                     every decision in float64; name a GPU backend (vulkan, gl, ...)"
                );
            }
            return Ok(None);
        };
        options.decisions = self.decisions.into();
        options.bn_state = self.bn_state.into();
        if let Some(gib) = self.cache_budget {
            options.cache_budget = Some(gib_bytes("--cache-budget", gib, true)?);
        }
        hesscope::gpu::open_with(problem, choice, adapter, options)
            .map(Some)
            .map_err(|e| {
                let picked = match self.backend {
                    Backend::Auto => {
                        format!(" (picked {} adapter {adapter})", backend_flag(choice))
                    }
                    _ => String::new(),
                };
                anyhow::Error::new(e).context(format!(
                    "--backend {} --adapter {}{picked}",
                    self.backend.name(),
                    self.adapter
                ))
            })
    }

    /// --cache-budget is checked on every backend, the reference's too
    /// (which does not use it).
    pub fn check_cache_budget(&self) -> Result<()> {
        if let Some(gib) = self.cache_budget {
            gib_bytes("--cache-budget", gib, true)?;
        }
        Ok(())
    }

    /// A direction with the model's trainable tensor names.
    pub fn load_vector(&self, model: &Model, path: &Path) -> Result<Vec<f64>> {
        params::load_vector(model, path).with_context(|| format!("--vector {}", path.display()))
    }

    pub fn save_vector(&self, model: &Model, path: &Path, v: &[f64]) -> Result<()> {
        crate::cli::output::write_atomic(path, |t| params::save_vector(model, t, v))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The settings block of a report, with the engine's piecewise
    /// decisions at its θ (`decisions`: their source and fragility).
    pub fn settings_with_decisions(
        &self,
        engine: &mut dyn Curvature,
        layer: Option<&str>,
    ) -> Result<Settings> {
        let decisions = engine
            .decision_report()
            .context("taking the piecewise decisions")?;
        Ok(Settings {
            decisions,
            ..self.settings(engine, layer)
        })
    }

    /// The settings block of a report (no decision report).
    pub fn settings(&self, engine: &dyn Curvature, layer: Option<&str>) -> Settings {
        Settings {
            model: self.model.clone(),
            weights: self.weights.clone(),
            data: self.data.clone(),
            samples: self.samples,
            batch: self.batch,
            bn: self.bn_mode(),
            seed: self.seed,
            layer: layer.map(str::to_string),
            backend: engine.backend(),
            adapter: engine.adapter(),
            operator: None,
            decisions: None,
        }
    }
}

/// A unit-norm Gaussian direction.
pub fn random_unit(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd1ec7104);
    let mut v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// A memory flag given in GiB, as bytes: finite, at most 1024, and above 0
/// unless `zero_ok` (a budget of nothing).
pub fn gib_bytes(flag: &str, gib: f64, zero_ok: bool) -> Result<usize> {
    let ok = gib.is_finite() && gib <= 1024.0 && (gib > 0.0 || (zero_ok && gib == 0.0));
    if !ok {
        let range = if zero_ok {
            "GiB between 0 and 1024"
        } else {
            "GiB above 0 and at most 1024"
        };
        anyhow::bail!("invalid {flag}: {gib}; {range}");
    }
    Ok((gib * (1u64 << 30) as f64) as usize)
}

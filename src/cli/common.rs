//! The inputs shared by the compute subcommands, and how they become an
//! engine.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hesscope::cpu::CpuReference;
use hesscope::data::{self, Dataset};
use hesscope::engine::{BnMode, Curvature, Problem};
use hesscope::gpu::BackendChoice;
use hesscope::model::{params, Model, Weights};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::{Path, PathBuf};

/// Synthetic data size when no --data and no --samples are given.
pub const SYNTHETIC_SAMPLES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// The float64 CPU reference.
    Cpu,
}

impl Backend {
    pub fn gpu(self) -> Option<BackendChoice> {
        match self {
            Backend::Auto => Some(BackendChoice::Auto),
            Backend::Vulkan => Some(BackendChoice::Vulkan),
            Backend::Metal => Some(BackendChoice::Metal),
            Backend::Dx12 => Some(BackendChoice::Dx12),
            Backend::Gl => Some(BackendChoice::Gl),
            Backend::Cpu => None,
        }
    }
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug, Clone)]
pub struct Inputs {
    /// A model under models/ by name, or an architecture file.
    #[arg(long, default_value = "cnn-tiny")]
    pub model: String,
    /// safetensors state_dict with PyTorch names (default: init from --seed).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// safetensors x/y, or a folder of CIFAR-10 .bin files (default: synthetic).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use the first N samples (synthetic default: 256).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Batch size; the loss is the sample-weighted mean over batches.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Batch-norm statistics.
    #[arg(long, value_enum, default_value_t = BnMode::Batch)]
    pub bn: BnMode,
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Which adapter of the backend (see `hesscope devices`).
    #[arg(long, default_value_t = 0)]
    pub adapter: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of prose.
    #[arg(long)]
    pub json: bool,
}

impl Inputs {
    pub fn model_and_weights(&self) -> Result<(Model, Weights)> {
        let model = Model::load(&self.model).with_context(|| format!("--model {}", self.model))?;
        let weights = match &self.weights {
            Some(p) => {
                Weights::load(&model, p).with_context(|| format!("--weights {}", p.display()))?
            }
            None => Weights::init(&model, self.seed),
        };
        Ok((model, weights))
    }

    pub fn dataset(&self, model: &Model) -> Result<Dataset> {
        let mut data = match &self.data {
            Some(p) => Dataset::load(p).with_context(|| format!("--data {}", p.display()))?,
            None => data::synthetic(
                model.input,
                model.classes,
                self.samples.unwrap_or(SYNTHETIC_SAMPLES),
                self.seed,
            ),
        };
        if let Some(n) = self.samples {
            if n == 0 {
                bail!("--samples must be at least 1");
            }
            data.truncate(n);
        }
        Ok(data)
    }

    pub fn problem(&self) -> Result<Problem> {
        let (model, weights) = self.model_and_weights()?;
        let data = self.dataset(&model)?;
        Ok(Problem::new(model, weights, data, self.batch, self.bn)?)
    }

    pub fn engine(&self) -> Result<Box<dyn Curvature>> {
        let problem = self.problem()?;
        match self.backend {
            Backend::Cpu => Ok(Box::new(CpuReference::new(problem))),
            other => {
                let choice = other.gpu().expect("every backend but cpu is a GPU one");
                let engine =
                    hesscope::gpu::open(&problem, choice, self.adapter).with_context(|| {
                        format!("--backend {} --adapter {}", other.name(), self.adapter)
                    })?;
                Ok(Box::new(engine))
            }
        }
    }

    pub fn load_vector(&self, path: &Path) -> Result<Vec<f64>> {
        let model = Model::load(&self.model)?;
        params::load_vector(&model, path).with_context(|| format!("--vector {}", path.display()))
    }

    pub fn save_vector(&self, path: &Path, v: &[f64]) -> Result<()> {
        let model = Model::load(&self.model)?;
        params::save_vector(&model, path, v).with_context(|| format!("writing {}", path.display()))
    }
}

/// A unit-norm Gaussian direction.
pub fn random_unit(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd1ec7104);
    let mut v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

//! What the commands report, as typed `Serialize` structs: one struct per
//! command, the same for `--json` on stdout and `--out F.json`, so the
//! schema lives in one place. [`Exporter`] turns a report into bytes (JSON
//! now; CSV or Markdown can be added as further formats, as hyperfine's
//! `export` module does).
//!
//! Floats that are unknown (a standard error from one run) are `None` and
//! come out as `null`.

use crate::decisions::DecisionReport;
use crate::engine::BnMode;
use crate::error::{Error, Result};
use crate::spectral::eigs::Which;
use crate::spectral::slq::{SlqRun, SlqSummary};
use crate::spectral::trace::TraceEstimate;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// `Some(x)` for a finite x, `None` (JSON `null`, "unknown") otherwise.
pub fn known(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The problem a spectral report is about, and where it ran.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub model: String,
    pub weights: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub samples: Option<usize>,
    pub batch: usize,
    pub bn: BnMode,
    pub seed: u64,
    /// The `--layer` block, if any.
    pub layer: Option<String>,
    pub backend: String,
    pub adapter: String,
    /// The curvature matrix the products are of (`--operator`: hessian,
    /// ggn, residual), on the commands that take one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<crate::operator::Operator>,
    /// The piecewise decisions the products took (`crate::decisions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<DecisionReport>,
}

/// `hesscope grad`.
#[derive(Clone, Debug, Serialize)]
pub struct GradReport {
    pub loss: f64,
    pub grad_norm: f64,
    pub backend: String,
    pub adapter: String,
    pub seconds: f64,
    pub out: Option<PathBuf>,
    /// The piecewise decisions the pass took (`crate::decisions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<DecisionReport>,
}

/// `hesscope hvp` (the spec's keys, plus the direction and output).
#[derive(Clone, Debug, Serialize)]
pub struct HvpReport {
    pub loss: f64,
    pub grad_norm: f64,
    pub hv_norm: f64,
    pub vhv: f64,
    pub backend: String,
    pub adapter: String,
    pub seconds: f64,
    /// The curvature matrix A of the product (`--operator`): `hv_norm` is
    /// ‖A v‖ and `vhv` vᵀ A v.
    pub operator: crate::operator::Operator,
    /// The direction's file, or how it was drawn.
    pub vector: String,
    pub out: Option<PathBuf>,
    /// The piecewise decisions the passes took (`crate::decisions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<DecisionReport>,
}

/// `hesscope init`.
#[derive(Clone, Debug, Serialize)]
pub struct InitReport {
    pub model: String,
    pub n_params: usize,
    pub out: PathBuf,
}

/// `hesscope synth`.
#[derive(Clone, Debug, Serialize)]
pub struct SynthReport {
    pub samples: usize,
    /// Per-sample [C, H, W].
    pub shape: [usize; 3],
    pub out: PathBuf,
}

/// `hesscope devices`.
#[derive(Clone, Debug, Serialize)]
pub struct DevicesReport {
    /// What `--backend auto` runs on here, and why.
    pub auto: crate::device::AutoChoice,
    /// The float64 CPU engine (`--backend cpu`): the threads it runs by
    /// default (all cores; `--threads`).
    pub cpu_threads: usize,
    /// Every adapter of every backend, each with its device type
    /// (`DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` for an
    /// emulator, `Other`) and its index within its backend.
    pub adapters: Vec<crate::gpu::AdapterReport>,
}

/// `hesscope bench`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub batch: usize,
    pub bn: BnMode,
    pub backend: String,
    pub adapter: String,
    /// The GPU engine's conv path and tile and how it reduces per
    /// channel (`Curvature::kernel_paths`); null on the CPU.
    pub kernel_paths: Option<String>,
    pub reps: usize,
    pub end_to_end: crate::bench::EndToEnd,
    /// With `--block-sizes`: a block product's time and its cost per vector
    /// at each block size (empty otherwise).
    pub block_products: Vec<crate::bench::BlockTiming>,
    pub kernels: Vec<crate::bench::KernelRow>,
    /// On the float64 engine: per-layer pass times and GFLOP/s beside the
    /// machine's measured float64 GEMM peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_layers: Option<crate::cpu::profile::CpuLayers>,
    /// The engine's piecewise decisions, with the seconds taking them
    /// cost (once per θ, in the warm-up: not in `end_to_end`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<DecisionReport>,
}

/// `hesscope density`: the SLQ density and what it summarises.
#[derive(Clone, Debug, Serialize)]
pub struct DensityReport {
    pub lambda_max: f64,
    pub lambda_min: f64,
    pub trace: f64,
    /// Over runs; `null` with one run (unknown, not zero).
    pub trace_stderr: Option<f64>,
    pub negative_mass: f64,
    /// Over runs (ratio estimator); `null` with one run.
    pub negative_mass_stderr: Option<f64>,
    pub n_params: usize,
    /// Lanczos steps per run (with `deflation`: per bulk run).
    pub steps: usize,
    /// The runs the density, its band and its moments rest on.
    pub runs_count: usize,
    pub sigma: f64,
    pub grid_points: usize,
    pub hvps: usize,
    /// Vectors per sweep: runs in lockstep (`--block`).
    pub block: usize,
    /// Block products (sweeps over the data) that computed the `hvps`.
    pub sweeps: usize,
    pub lanczos_seconds: f64,
    /// Of `lanczos_seconds`, the time in Hessian-vector products; the rest
    /// is reorthogonalisation and bookkeeping.
    pub hvp_seconds: f64,
    /// Where the Lanczos vectors were kept: `host f64`, `host f32`, or the
    /// adapter's name and backend with `f32` (`--basis-on`).
    pub basis: String,
    pub seconds: f64,
    pub settings: Settings,
    pub grid: Vec<f64>,
    /// On `grid`, integrating to 1.
    pub density: Vec<f64>,
    /// What `density_stderr` is (`spectral::bands::BAND_METHOD`).
    pub band: &'static str,
    /// The standard error of `density` at every grid point (normalised as
    /// it is); `null` with one run.
    pub density_stderr: Option<Vec<f64>>,
    /// With `--deflate`: the eigenpairs deflated and the budget's split;
    /// `runs` then hold the spikes folded into every bulk run.
    pub deflation: Option<DeflationReport>,
    pub runs: Vec<SlqRun>,
}

/// `hesscope density --deflate`: the outliers taken out before SLQ.
#[derive(Clone, Debug, Serialize)]
pub struct DeflationReport {
    /// `--deflate` as given: K or `auto`.
    pub requested: String,
    /// How the deflated pairs were chosen.
    pub rule: &'static str,
    /// Eigenpairs deflated (spikes of mass 1/n each).
    pub k: usize,
    /// Eigenpairs asked of `eigs`.
    pub asked: usize,
    /// The deflated eigenvalues, largest |λ| first, and their true
    /// residuals ‖Hv − λv‖.
    pub eigenvalues: Vec<f64>,
    pub residuals: Vec<f64>,
    pub residual_bound: f64,
    /// Ritz values `eigs` returned that did not converge (left in the bulk).
    pub not_deflated: Vec<f64>,
    pub eigs_steps: usize,
    /// Products `eigs` took, residual checks included (of `budget`).
    pub eigs_hvps: usize,
    pub bulk_steps: usize,
    pub bulk_runs: usize,
    /// Products in all: 90 × --runs by default (--steps × --runs).
    pub budget: usize,
}

/// `hesscope eigs`.
#[derive(Clone, Debug, Serialize)]
pub struct EigsReport {
    pub eigenvalues: Vec<f64>,
    pub residuals: Vec<f64>,
    pub converged: bool,
    pub which: Which,
    pub tol: f64,
    pub steps: usize,
    pub hvps: usize,
    /// Vectors per sweep (`--block`): 1 is single-vector Lanczos, more is
    /// block Lanczos.
    pub block: usize,
    /// Block products (sweeps over the data) that computed the `hvps`.
    pub sweeps: usize,
    /// Of `seconds`, the time in Hessian-vector products.
    pub hvp_seconds: f64,
    /// Where the Lanczos vectors were kept (as in `DensityReport`).
    pub basis: String,
    pub grad_frac_in_top_k: Vec<f64>,
    pub seconds: f64,
    pub settings: Settings,
    /// Where the Ritz vectors were written.
    pub vectors: Option<PathBuf>,
}

/// Both trace estimates of one block.
#[derive(Clone, Debug, Serialize)]
pub struct TraceEstimates {
    pub hutchinson: TraceEstimate,
    /// `null` when the budget or the block is too small for Hutch++.
    pub hutchpp: Option<TraceEstimate>,
}

/// One row of `hesscope trace`.
#[derive(Clone, Debug, Serialize)]
pub struct TraceRow {
    pub layer: String,
    pub size: usize,
    pub estimates: TraceEstimates,
}

/// `hesscope trace`.
#[derive(Clone, Debug, Serialize)]
pub struct TraceReport {
    pub traces: Vec<TraceRow>,
    pub probes: usize,
    /// Probes per sweep (`--block`).
    pub block: usize,
    pub seconds: f64,
    pub settings: Settings,
}

/// `hesscope trace-grad`: ∇θ[(1/P) Σₖ vₖᵀ H vₖ] over probes on a layer set.
#[derive(Clone, Debug, Serialize)]
pub struct TraceGradReport {
    /// (1/P) Σₖ vₖᵀ H vₖ.
    pub estimate: f64,
    /// ‖∇θ estimate‖ over all parameters.
    pub grad_norm: f64,
    pub probes: usize,
    /// vₖᵀ H vₖ per probe.
    pub per_probe: Vec<f64>,
    /// The layer set as asked for (`all`, `middle`, `block2,fc`).
    pub layers: String,
    /// The trainable tensors it selects, in parameter order.
    pub selected: Vec<String>,
    /// Parameters in the set.
    pub selected_size: usize,
    /// The probe files, or how the probes were drawn.
    pub probe_source: Vec<String>,
    /// How the third derivatives were computed.
    pub method: String,
    /// Largest step, as the largest change of any parameter.
    pub eps: f64,
    /// Richardson levels (halvings of the step).
    pub levels: usize,
    /// The tableau's last relative correction, largest over probes: a
    /// conservative bound on the relative error.
    pub error_estimate: f64,
    pub hvps: usize,
    pub backend: String,
    pub adapter: String,
    pub seconds: f64,
    pub out: PathBuf,
    pub settings: Settings,
}

/// `hesscope exact`: the same summary and density as `density`, plus every
/// eigenvalue.
#[derive(Clone, Debug, Serialize)]
pub struct ExactReport {
    pub lambda_max: f64,
    pub lambda_min: f64,
    pub trace: f64,
    pub negative_mass: f64,
    pub frac_negative: f64,
    pub top5: Vec<f64>,
    pub bottom5: Vec<f64>,
    pub grad_frac_in_top_k: Vec<f64>,
    pub asymmetry: f64,
    pub n_params: usize,
    pub sigma: f64,
    pub seconds: f64,
    pub settings: Settings,
    pub grid: Vec<f64>,
    pub density: Vec<f64>,
    /// Ascending.
    pub eigenvalues: Vec<f64>,
}

/// One module of `hesscope layers`.
#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    /// The block's name: a module, or `MODULE.q` / `.k` / `.v` of a fused
    /// attention projection.
    pub module: String,
    pub size: usize,
    /// How many contiguous runs of the flat parameter vector the block's
    /// indices form (1 but for split or interleaved tensors).
    pub runs_of_indices: usize,
    pub lambda_max: f64,
    pub lambda_min: f64,
    pub trace: f64,
    /// `null` with one run.
    pub trace_stderr: Option<f64>,
    pub negative_mass: f64,
    /// `null` with one run.
    pub negative_mass_stderr: Option<f64>,
    pub similarity: f64,
    /// The block's smoothed SLQ density on the report's `grid`.
    pub density: Vec<f64>,
}

/// `hesscope layers`.
#[derive(Clone, Debug, Serialize)]
pub struct LayersReport {
    pub similarity_measure: &'static str,
    /// How `js_distance` is computed (log base, zero density).
    pub js_measure: &'static str,
    /// Whether fused q|k|v projections were split into Q, K, V blocks.
    pub split_qkv: bool,
    pub full: SlqSummary,
    /// The full Hessian's smoothed density on `grid`.
    pub full_density: Vec<f64>,
    pub layers: Vec<LayerRow>,
    /// js_distance[i][j]: the Jensen–Shannon distance between the
    /// densities of layers[i] and layers[j] (symmetric, zero diagonal;
    /// null where undefined).
    pub js_distance: Vec<Vec<Option<f64>>>,
    pub steps: usize,
    pub runs: usize,
    /// Runs in lockstep per sweep (`--block`).
    pub block: usize,
    /// Where the full Hessian's Lanczos vectors were kept (as in
    /// `DensityReport`; a layer's, being smaller, fit at least as well).
    pub basis: String,
    pub sigma: f64,
    /// The uniform grid every density is sampled on.
    pub grid: Vec<f64>,
    pub seconds: f64,
    pub settings: Settings,
}

/// One epoch of `hesscope train`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean of the epoch's step losses (each the mean cross-entropy of its
    /// mini-batch, before its update).
    pub train_loss: f64,
    pub lr: f64,
    /// Steps taken so far, this epoch's included.
    pub steps: usize,
    pub seconds: f64,
    /// The state_dict written after this epoch.
    pub checkpoint: PathBuf,
    /// With `--test-data`: mean cross-entropy and accuracy on it after this
    /// epoch, batch norm by its running statistics (PyTorch's `eval()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// Top-1 accuracy and mean cross-entropy on the training data (file
    /// order, unaugmented) after this epoch, batch norm by its running
    /// statistics as for the test data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_eval_loss: Option<f64>,
    /// With `--htr-gamma`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub htr: Option<HtrRecord>,
    /// At spectrum epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curvature: Option<CurvatureRecord>,
}

/// One SLQ run's quadrature: Ritz values and their weights.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct QuadratureRun {
    pub nodes: Vec<f64>,
    pub weights: Vec<f64>,
}

/// A layer's (module's) curvature in a training run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LayerCurvature {
    pub module: String,
    pub size: usize,
    /// The largest eigenvalue of the module's diagonal block (Lanczos).
    pub lambda_max: f64,
    /// ‖H_b u − λ u‖ of its Ritz vector.
    pub residual: f64,
    /// Hutchinson estimate of the block's trace, with its standard error.
    pub trace: f64,
    pub trace_stderr: Option<f64>,
}

/// One curvature operator's SLQ at a point of a run (`train --papyan`):
/// its summary and the quadrature the density is drawn from.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct OperatorCurvature {
    /// `ggn` or `residual`.
    pub operator: String,
    pub lambda_max: f64,
    pub lambda_min: f64,
    pub slq_trace: f64,
    pub slq_trace_stderr: Option<f64>,
    pub negative_mass: f64,
    pub negative_mass_stderr: Option<f64>,
    pub runs: Vec<QuadratureRun>,
}

/// Papyan's decomposition H = G + E at a point of a run: the SLQ of the
/// Gauss–Newton term G and of the residual E (same steps, runs and start
/// vectors as the Hessian's), G's top eigenvalues and how many of them lie
/// above the widest ratio gap (`operator::outliers`), beside the classes.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PapyanRecord {
    pub ggn: OperatorCurvature,
    pub residual: OperatorCurvature,
    pub classes: usize,
    /// G's top 2·classes + 2 eigenvalues (largest first), their residuals
    /// ‖Gx − λx‖, and whether all converged.
    pub ggn_top: Vec<f64>,
    pub ggn_residuals: Vec<f64>,
    pub ggn_converged: bool,
    pub outliers: usize,
    pub gap_ratio: f64,
}

/// The Hessian of the data loss (mean cross-entropy, no weight decay) over
/// a fixed subset of the training data at one point of a run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct CurvatureRecord {
    /// The subset: the first `samples` training samples in file order,
    /// unaugmented, in batches of `batch`.
    pub samples: usize,
    pub batch: usize,
    /// Batch norm of the Hessian's loss (`batch` or `running`).
    pub bn: String,
    pub backend: String,
    pub adapter: String,
    /// Loss and ‖gradient‖ of the subset's data loss.
    pub loss: f64,
    pub grad_norm: f64,
    /// Weight decay wd adds wd·I to the Hessian of the training objective:
    /// every eigenvalue below shifts by this much there (not applied here).
    pub weight_decay_shift: f64,
    /// SLQ: extremes of the Ritz values, the trace n·Σwλ and the negative
    /// mass over the runs.
    pub lambda_max: f64,
    pub lambda_min: f64,
    pub slq_trace: f64,
    /// Standard errors over the SLQ runs (`null` with one run).
    pub slq_trace_stderr: Option<f64>,
    pub negative_mass: f64,
    pub negative_mass_stderr: Option<f64>,
    pub slq_steps: usize,
    /// The density on `grid` (integrating to 1), Gaussian kernel `sigma`.
    pub sigma: f64,
    pub grid: Vec<f64>,
    pub density: Vec<f64>,
    pub runs: Vec<QuadratureRun>,
    /// The top-k eigenvalues (algebraic, largest first), with their true
    /// residuals ‖Hu − λu‖ and whether all met the tolerance.
    pub top_eigenvalues: Vec<f64>,
    pub residuals: Vec<f64>,
    pub eigs_converged: bool,
    /// Fraction of ‖g‖² in the span of the top k eigenvectors, k = 1..K
    /// (g the subset's gradient).
    pub grad_frac_in_top_k: Vec<f64>,
    /// Hutchinson estimate of tr H (Rademacher probes) and its standard error.
    pub trace: f64,
    pub trace_stderr: Option<f64>,
    /// Per module with `--layerwise`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerCurvature>,
    /// Vectors per block product (the engine's preferred block).
    #[serde(default = "one")]
    pub block: usize,
    pub hvps: usize,
    pub seconds: f64,
    /// G and E beside H (`train --papyan`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub papyan: Option<PapyanRecord>,
}

fn one() -> usize {
    1
}

/// The regulariser's part of an epoch.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HtrRecord {
    /// Mean over the epoch's regularised steps of (1/P) Σ vᵀH_S v, each on
    /// its mini-batch before its update; `null` when no step was.
    pub value: Option<f64>,
    /// Regularised steps in the epoch.
    pub steps: usize,
}

/// The state before the first epoch (`hesscope train` from scratch).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct StartRecord {
    /// 0.
    pub epoch: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curvature: Option<CurvatureRecord>,
}

/// An output format for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exporter {
    /// One JSON object on one line (stdout, `--json`).
    JsonLine,
    /// Indented JSON (files, `--out`).
    JsonPretty,
}

impl Exporter {
    /// The report as text in this format (non-finite floats as `null`).
    pub fn render<T: Serialize>(self, report: &T) -> Result<String> {
        let r = match self {
            Exporter::JsonLine => serde_json::to_string(report),
            Exporter::JsonPretty => serde_json::to_string_pretty(report),
        };
        r.map_err(|e| Error::Invalid {
            what: "report",
            msg: format!("cannot be written as JSON: {e}"),
        })
    }

    /// Write the report to a file; errors name the file.
    pub fn write<T: Serialize>(self, path: &Path, report: &T) -> Result<()> {
        let mut text = self.render(report)?;
        text.push('\n');
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

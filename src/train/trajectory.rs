//! `hesscope train`'s report (`trajectory.json`, `--json`): the recipe
//! and the records of `crate::report`, beside the trainer that makes them
//! (`report` stays below `train`).

use crate::report::{EpochRecord, Settings, StartRecord};
use crate::train::{Augment, Htr, Recipe};
use serde::Serialize;
use std::path::PathBuf;

/// `hesscope train`: `trajectory.json` and `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub recipe: Recipe,
    /// Data augmentation and the Hessian-trace regulariser of the run.
    pub augment: Augment,
    pub htr: Option<Htr>,
    /// The state before the first epoch (curvature, test metrics).
    pub start: Option<StartRecord>,
    pub epochs: Vec<EpochRecord>,
    /// Every step's mini-batch loss, in order.
    pub step_losses: Vec<f64>,
    pub steps: usize,
    /// The final state_dict (while the run is on: the latest checkpoint's).
    pub out: PathBuf,
    /// False in the copies written after each epoch, true at the end.
    pub finished: bool,
    /// Float dtype of the saved state_dicts (`F32` or `F64`).
    pub dtype: String,
    pub seconds: f64,
    pub settings: Settings,
}

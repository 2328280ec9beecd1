//! `metrics.json` of an `evaluate` stage.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{read_json, write_json, DeclaredRewards, Metric, RecordError, Task};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationRecord {
    /// The tasks the evaluated model was fine-tuned on, in order (empty for the base model).
    pub tasks: Vec<Task>,
    /// How the model was made: `base`, `finetune`, `soup` or `joint`.
    pub origin: String,
    pub metrics: BTreeMap<Metric, f64>,
    pub prompts: usize,
    pub images_per_prompt: usize,
    pub seed: u64,
    /// The rewards the pipeline declared (their metrics are in `metrics` under their names);
    /// absent when it declared none.
    #[serde(default, skip_serializing_if = "DeclaredRewards::is_empty")]
    pub rewards: DeclaredRewards,
}

pub const METRICS_FILE: &str = "metrics.json";
/// The optional sample grid of an evaluation (one row, the first image of each prompt).
pub const GRID_FILE: &str = "grid.png";

impl EvaluationRecord {
    pub fn read(path: &Path) -> Result<Self, RecordError> {
        read_json(path, "an evaluation record")
    }

    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        write_json(path, self)
    }
}

//! A pipeline after expansion, interpolation, defaults and validation: what the executor runs.
//! Serialisable, so that one stage can be frozen to a file and run elsewhere (`exec-stage`).
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::records::RewardDirection;

/// Compute resources a stage asks for (from the pipeline; used by the scheduler and Slurm).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// GPUs the stage needs; `None`: one when the run has GPUs, none otherwise; `Some(0)`: the
    /// stage runs on the CPU even in a GPU run.
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
    pub mem_gb: Option<f64>,
    pub time_min: Option<u64>,
    pub partition: Option<String>,
}

/// A file a stage needs that is not there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissingFile {
    pub param: String,
    pub path: PathBuf,
    /// What the file is and where its public original lives (the parameter's doc).
    pub doc: String,
}

/// A reward the pipeline declares in `rewards:`, as the stages that use it get it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeclaredReward {
    /// The TorchScript archive, absolute (its content hash, not its path, is in the cache key).
    pub torchscript: PathBuf,
    pub direction: RewardDirection,
    /// Column title in tables and charts.
    pub label: String,
    /// Its letter in task orders (`order: AS`).
    pub letter: char,
}

/// One stage, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedStage {
    pub id: String,
    pub kind: String,
    /// Every parameter of the kind, defaults filled in, values typed.
    pub params: Map<String, Value>,
    /// Input name -> upstream stage ids, in the order written.
    pub inputs: BTreeMap<String, Vec<String>>,
    /// External files and folders the stage reads (the `Path` parameters, made absolute).
    pub files: Vec<PathBuf>,
    /// `Path` parameters whose file does not exist (only when resolved for planning; a pipeline
    /// resolved to run refuses them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_files: Vec<MissingFile>,
    /// The declared rewards the stage uses (those its parameters name, or all of them for a
    /// kind that reads every declared reward), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rewards: BTreeMap<String, DeclaredReward>,
    /// Free-form labels (matrix values, task, order...) for reports; not part of the cache key.
    pub meta: BTreeMap<String, String>,
    pub resources: Resources,
}

/// A whole pipeline, stages in a topological order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedPipeline {
    /// The pipeline's name (reports go to `reports/<name>/`).
    pub name: String,
    pub source: PathBuf,
    pub stages: Vec<ResolvedStage>,
}

//! The records stages write for each other and for reports: the evaluation record
//! (`metrics.json`), the training log (`train_log.jsonl`) and summary (`train_summary.json`),
//! and what is known about each metric (its direction, which task targets it).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::exec::StageError;

/// The reward tasks of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Aesthetic,
    Hps,
    Compress,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Aesthetic, Task::Hps, Task::Compress];

    pub fn name(self) -> &'static str {
        match self {
            Task::Aesthetic => "aesthetic",
            Task::Hps => "hps",
            Task::Compress => "compress",
        }
    }

    /// The one-letter code of the paper's task orders (A, H, C).
    pub fn letter(self) -> char {
        match self {
            Task::Aesthetic => 'A',
            Task::Hps => 'H',
            Task::Compress => 'C',
        }
    }

    pub fn parse(s: &str) -> Option<Task> {
        match s {
            "aesthetic" | "A" => Some(Task::Aesthetic),
            "hps" | "H" => Some(Task::Hps),
            "compress" | "C" => Some(Task::Compress),
            _ => None,
        }
    }

    /// The metrics this task optimises (its "target" metrics in the paper's tables).
    pub fn targets(self) -> &'static [Metric] {
        match self {
            Task::Aesthetic => &[Metric::Aesthetic],
            Task::Hps => &[Metric::Hps],
            Task::Compress => &[Metric::PngKb, Metric::JpegKb],
        }
    }
}

/// The evaluation metrics, in the paper's column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Aesthetic,
    Hps,
    PngKb,
    JpegKb,
    ClipScore,
    Fid,
}

impl Metric {
    pub const ALL: [Metric; 6] = [Metric::Aesthetic, Metric::Hps, Metric::PngKb, Metric::JpegKb, Metric::ClipScore, Metric::Fid];

    pub fn key(self) -> &'static str {
        match self {
            Metric::Aesthetic => "aesthetic",
            Metric::Hps => "hps",
            Metric::PngKb => "png_kb",
            Metric::JpegKb => "jpeg_kb",
            Metric::ClipScore => "clip_score",
            Metric::Fid => "fid",
        }
    }

    /// Column title as in the paper.
    pub fn title(self) -> &'static str {
        match self {
            Metric::Aesthetic => "Aesthetic",
            Metric::Hps => "HPS",
            Metric::PngKb => "PNG (kB)",
            Metric::JpegKb => "JPEG (kB)",
            Metric::ClipScore => "CLIP",
            Metric::Fid => "FID",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Aesthetic | Metric::Hps | Metric::ClipScore)
    }

    /// General metrics are reported (and their forgetting measured) after every task.
    pub fn is_general(self) -> bool {
        matches!(self, Metric::ClipScore | Metric::Fid)
    }

    pub fn parse(s: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.key() == s)
    }
}

/// `metrics.json` of an `evaluate` stage.
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
}

pub const METRICS_FILE: &str = "metrics.json";

impl EvaluationRecord {
    pub fn read(path: &Path) -> Result<Self, StageError> {
        let bytes = std::fs::read(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(format!("{} is not an evaluation record: {e}", path.display())))
    }

    pub fn write(&self, path: &Path) -> Result<(), StageError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(StageError::failed)?;
        std::fs::write(path, bytes).map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
    }
}

/// One optimizer step of a fine-tune, a line of `train_log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLogLine {
    /// 1-based optimizer step.
    pub step: u64,
    /// 1-based epoch the step belongs to.
    pub epoch: u64,
    /// Mean reward of the batch (of the mixture, for joint tuning).
    pub reward: f64,
    /// RID's distillation term ||z0 - z0_teacher||^2 (mean); `None` for the baseline.
    pub distill_loss: Option<f64>,
    /// The minimised loss: -reward + lambda * distill.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Wall-clock seconds of this step.
    pub seconds: f64,
}

pub const TRAIN_LOG_FILE: &str = "train_log.jsonl";
pub const TRAIN_SUMMARY_FILE: &str = "train_summary.json";

/// `train_summary.json` of a `finetune` or `joint` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// `baseline`, `rid` or `joint`.
    pub method: String,
    /// The task(s) trained on (several for joint tuning).
    pub tasks: Vec<Task>,
    pub epochs: u64,
    pub steps: u64,
    pub batch_size: u64,
    pub seconds: f64,
    pub seconds_per_epoch: f64,
    /// Mean reward over the first and the last epoch.
    pub reward_first_epoch: f64,
    pub reward_last_epoch: f64,
}

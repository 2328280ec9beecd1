//! The study's records: what the stages write for each other and the report reads. The
//! evaluation record (`metrics.json`), the training log (`train_log.jsonl`) and summary
//! (`train_summary.json`), the forgetting record (`forgetting.json`, with Eq. 3), and what is
//! known about each task and metric (its direction, which task targets it). Plain data with
//! serde: no runner, no tensors.
use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod evaluation;
pub mod forgetting;
pub mod training;

pub use evaluation::{EvaluationRecord, GRID_FILE, METRICS_FILE};
pub use forgetting::{forgetting, ForgettingRecord, FORGETTING_FILE};
pub use training::{read_train_log, TrainLogLine, TrainSummary, TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE};

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not the record it should be (names the file and the problem).
    #[error("{0}")]
    Format(String),
}

/// Reads a JSON record; `what` names it in errors ("an evaluation record").
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, RecordError> {
    let bytes = std::fs::read(path).map_err(|source| RecordError::Io { context: format!("cannot read {}", path.display()), source })?;
    serde_json::from_slice(&bytes).map_err(|e| RecordError::Format(format!("{} is not {what}: {e}", path.display())))
}

/// Writes a record as pretty JSON.
pub fn write_json(path: &Path, record: &impl Serialize) -> Result<(), RecordError> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| RecordError::Format(e.to_string()))?;
    std::fs::write(path, bytes).map_err(|source| RecordError::Io { context: format!("cannot write {}", path.display()), source })
}

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


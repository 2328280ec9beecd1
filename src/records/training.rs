//! `train_log.jsonl` (one line per optimizer step) and `train_summary.json` of a `finetune` or
//! `joint` stage.
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{RecordError, Task};

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

impl TrainSummary {
    /// The summary of a training's log: its seconds and the mean reward of its first and last
    /// epoch (NaN for an epoch without steps).
    pub fn of_log(method: &str, tasks: &[Task], log: &[TrainLogLine], epochs: u64, steps: u64, batch_size: u64) -> Self {
        let epoch_mean = |e: u64| {
            let lines: Vec<f64> = log.iter().filter(|l| l.epoch == e).map(|l| l.reward).collect();
            if lines.is_empty() {
                f64::NAN
            } else {
                lines.iter().sum::<f64>() / lines.len() as f64
            }
        };
        let seconds: f64 = log.iter().map(|l| l.seconds).sum();
        TrainSummary {
            method: method.to_string(),
            tasks: tasks.to_vec(),
            epochs,
            steps,
            batch_size,
            seconds,
            seconds_per_epoch: seconds / epochs as f64,
            reward_first_epoch: epoch_mean(1),
            reward_last_epoch: epoch_mean(epochs),
        }
    }
}

/// Reads `train_log.jsonl`; a line that is not a log record is an error naming the line.
pub fn read_train_log(path: &Path) -> Result<Vec<TrainLogLine>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecordError::Io { context: format!("cannot read {}", path.display()), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| RecordError::Format(format!("{}:{}: not a training log line: {e}", path.display(), i + 1))))
        .collect()
}

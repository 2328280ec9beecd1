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

/// Which way a reward is read. Training always maximises: a `Lower` reward is trained on its
/// negative; evaluation reports the reward's own values and forgetting reads them this way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardDirection {
    /// Higher scores are better (every built-in reward).
    #[default]
    Higher,
    /// Lower scores are better.
    Lower,
}

impl RewardDirection {
    pub fn name(self) -> &'static str {
        match self {
            RewardDirection::Higher => "higher",
            RewardDirection::Lower => "lower",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "higher" => Some(RewardDirection::Higher),
            "lower" => Some(RewardDirection::Lower),
            _ => None,
        }
    }

    pub fn higher_is_better(self) -> bool {
        self == RewardDirection::Higher
    }

    /// +1 or -1: the factor that turns the reward into the quantity training maximises.
    pub fn sign(self) -> f64 {
        match self {
            RewardDirection::Higher => 1.0,
            RewardDirection::Lower => -1.0,
        }
    }
}

/// A reward task: one of the paper's, PickScore, or a reward declared in the pipeline (by its
/// name). Written in records as its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Task {
    Aesthetic,
    Hps,
    Compress,
    /// PickScore (Kirstain et al. 2023), at paper scale.
    PickScore,
    /// A reward declared in the pipeline's `rewards:` (a TorchScript module).
    Declared(String),
}

impl Task {
    /// The paper's three tasks.
    pub const ALL: [Task; 3] = [Task::Aesthetic, Task::Hps, Task::Compress];
    /// Every built-in task: the names a pipeline cannot redeclare.
    pub const BUILTIN: [Task; 4] = [Task::Aesthetic, Task::Hps, Task::Compress, Task::PickScore];

    pub fn name(&self) -> &str {
        match self {
            Task::Aesthetic => "aesthetic",
            Task::Hps => "hps",
            Task::Compress => "compress",
            Task::PickScore => "pickscore",
            Task::Declared(name) => name,
        }
    }

    /// The one-letter code of a built-in task in task orders (A, H, C, P); a declared reward's
    /// letter is in its declaration ([`RewardInfo::letter`]).
    pub fn builtin_letter(&self) -> Option<char> {
        match self {
            Task::Aesthetic => Some('A'),
            Task::Hps => Some('H'),
            Task::Compress => Some('C'),
            Task::PickScore => Some('P'),
            Task::Declared(_) => None,
        }
    }

    /// The one-letter code of the task in task orders (`?` for a declared reward missing from
    /// `declared`).
    pub fn letter(&self, declared: &DeclaredRewards) -> char {
        match self {
            Task::Declared(name) => declared.get(name).map_or('?', |r| r.letter),
            builtin => builtin.builtin_letter().unwrap_or('?'),
        }
    }

    /// A built-in task by name or letter.
    pub fn parse(s: &str) -> Option<Task> {
        Task::BUILTIN.into_iter().find(|t| t.name() == s || t.builtin_letter().is_some_and(|l| s.len() == 1 && s.starts_with(l)))
    }

    /// The task of a name: a built-in one, else a declared reward of that name.
    pub fn from_name(name: &str) -> Task {
        Task::BUILTIN.into_iter().find(|t| t.name() == name).unwrap_or_else(|| Task::Declared(name.to_string()))
    }

    /// The metrics this task optimises (its "target" metrics in the paper's tables).
    pub fn targets(&self) -> Vec<Metric> {
        match self {
            Task::Aesthetic => vec![Metric::Aesthetic],
            Task::Hps => vec![Metric::Hps],
            Task::Compress => vec![Metric::PngKb, Metric::JpegKb],
            Task::PickScore => vec![Metric::PickScore],
            Task::Declared(name) => vec![Metric::Declared(name.clone())],
        }
    }
}

impl From<Task> for String {
    fn from(task: Task) -> String {
        task.name().to_string()
    }
}

impl From<String> for Task {
    fn from(name: String) -> Task {
        Task::from_name(&name)
    }
}

/// The evaluation metrics, in the paper's column order (PickScore after HPS, declared rewards
/// last). Written in records as their keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Metric {
    Aesthetic,
    Hps,
    PickScore,
    PngKb,
    JpegKb,
    ClipScore,
    Fid,
    /// The mean score of a reward declared in the pipeline, by its name.
    Declared(String),
}

impl Metric {
    /// The paper's six metrics.
    pub const ALL: [Metric; 6] = [Metric::Aesthetic, Metric::Hps, Metric::PngKb, Metric::JpegKb, Metric::ClipScore, Metric::Fid];
    /// Every built-in metric, in column order.
    pub const BUILTIN: [Metric; 7] = [Metric::Aesthetic, Metric::Hps, Metric::PickScore, Metric::PngKb, Metric::JpegKb, Metric::ClipScore, Metric::Fid];

    pub fn key(&self) -> &str {
        match self {
            Metric::Aesthetic => "aesthetic",
            Metric::Hps => "hps",
            Metric::PickScore => "pickscore",
            Metric::PngKb => "png_kb",
            Metric::JpegKb => "jpeg_kb",
            Metric::ClipScore => "clip_score",
            Metric::Fid => "fid",
            Metric::Declared(name) => name,
        }
    }

    /// Column title as in the paper; a declared reward's label.
    pub fn title(&self, declared: &DeclaredRewards) -> String {
        match self {
            Metric::Aesthetic => "Aesthetic".into(),
            Metric::Hps => "HPS".into(),
            Metric::PickScore => "PickScore".into(),
            Metric::PngKb => "PNG (kB)".into(),
            Metric::JpegKb => "JPEG (kB)".into(),
            Metric::ClipScore => "CLIP".into(),
            Metric::Fid => "FID".into(),
            Metric::Declared(name) => declared.get(name).map_or_else(|| name.clone(), |r| r.label.clone()),
        }
    }

    /// Whether higher values are better; a declared reward's direction (higher when
    /// `declared` does not know it).
    pub fn higher_is_better(&self, declared: &DeclaredRewards) -> bool {
        match self {
            Metric::Aesthetic | Metric::Hps | Metric::PickScore | Metric::ClipScore => true,
            Metric::PngKb | Metric::JpegKb | Metric::Fid => false,
            Metric::Declared(name) => declared.get(name).is_none_or(|r| r.direction.higher_is_better()),
        }
    }

    /// General metrics are reported (and their forgetting measured) after every task.
    pub fn is_general(&self) -> bool {
        matches!(self, Metric::ClipScore | Metric::Fid)
    }

    /// The metric of a key: a built-in one, else a declared reward of that name.
    pub fn from_key(key: &str) -> Metric {
        Metric::BUILTIN.into_iter().find(|m| m.key() == key).unwrap_or_else(|| Metric::Declared(key.to_string()))
    }
}

impl From<Metric> for String {
    fn from(metric: Metric) -> String {
        metric.key().to_string()
    }
}

impl From<String> for Metric {
    fn from(key: String) -> Metric {
        Metric::from_key(&key)
    }
}

/// How records name a reward declared in a pipeline: its column title, its direction, its
/// letter in task orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardInfo {
    pub label: String,
    pub direction: RewardDirection,
    pub letter: char,
}

/// The rewards declared in a pipeline, by name, as the evaluation and forgetting records carry
/// them (absent from records of a pipeline that declares none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeclaredRewards(pub std::collections::BTreeMap<String, RewardInfo>);

impl DeclaredRewards {
    pub fn get(&self, name: &str) -> Option<&RewardInfo> {
        self.0.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds the rewards of `other` (the first declaration of a name wins).
    pub fn merge(&mut self, other: &DeclaredRewards) {
        for (name, info) in &other.0 {
            self.0.entry(name.clone()).or_insert_with(|| info.clone());
        }
    }

    /// The task of a letter: a built-in one, else the declared reward with that letter.
    pub fn task_of_letter(&self, letter: char) -> Option<Task> {
        Task::parse(&letter.to_string()).or_else(|| self.0.iter().find(|(_, r)| r.letter == letter).map(|(name, _)| Task::Declared(name.clone())))
    }

    /// The built-in metrics, then these rewards', in column order.
    pub fn metrics(&self) -> Vec<Metric> {
        Metric::BUILTIN.into_iter().chain(self.0.keys().map(|name| Metric::Declared(name.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_tasks_and_metrics_read_and_write_as_their_names() {
        for t in Task::BUILTIN {
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.name()));
            assert_eq!(serde_json::from_str::<Task>(&format!("\"{}\"", t.name())).unwrap(), t);
        }
        for m in Metric::BUILTIN {
            assert_eq!(Metric::from_key(m.key()), m);
        }
        let t: Task = serde_json::from_str("\"redness\"").unwrap();
        assert_eq!(t, Task::Declared("redness".into()));
        assert_eq!(t.targets(), vec![Metric::Declared("redness".into())]);
        let map: std::collections::BTreeMap<Metric, f64> = [(Metric::Declared("redness".into()), 1.0), (Metric::Fid, 2.0), (Metric::Aesthetic, 3.0)].into();
        assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"aesthetic":3.0,"fid":2.0,"redness":1.0}"#);
    }

    #[test]
    fn declared_rewards_give_titles_directions_and_letters() {
        let declared = DeclaredRewards([("redness".to_string(), RewardInfo { label: "Redness".into(), direction: RewardDirection::Lower, letter: 'R' })].into());
        let m = Metric::Declared("redness".into());
        assert_eq!(m.title(&declared), "Redness");
        assert!(!m.higher_is_better(&declared));
        assert_eq!(Task::Declared("redness".into()).letter(&declared), 'R');
        assert_eq!(declared.task_of_letter('R'), Some(Task::Declared("redness".into())));
        assert_eq!(declared.task_of_letter('A'), Some(Task::Aesthetic));
        assert_eq!(declared.task_of_letter('Z'), None);
        assert_eq!(declared.metrics().last(), Some(&m));
    }
}

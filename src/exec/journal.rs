//! The journal: for each pipeline, what every stage id last produced (its key and the
//! ingredients of that key). `plan` compares against it to say *why* a stage must run again,
//! and `gc` keeps what journals reference.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic_write;
use super::key::Ingredients;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub key: String,
    pub ingredients: Ingredients,
    pub finished_unix: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// The pipeline file, as last run.
    pub pipeline: PathBuf,
    pub stages: BTreeMap<String, JournalEntry>,
}

impl Journal {
    fn path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.json"))
    }

    /// The journal of pipeline `name` (empty when none was written yet or it is unreadable).
    pub fn load(dir: &Path, name: &str) -> Journal {
        std::fs::read(Self::path(dir, name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Every journal in `dir`, by pipeline name.
    pub fn load_all(dir: &Path) -> BTreeMap<String, Journal> {
        let mut all = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".json") {
                    all.insert(stem.to_string(), Self::load(dir, stem));
                }
            }
        }
        all
    }

    /// Records finished stages, merging with what is on disk (another run of the same pipeline
    /// may have recorded stages meanwhile).
    pub fn record(dir: &Path, name: &str, pipeline: &Path, entries: &[(String, JournalEntry)]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut journal = Self::load(dir, name);
        journal.pipeline = pipeline.to_path_buf();
        for (id, entry) in entries {
            journal.stages.insert(id.clone(), entry.clone());
        }
        let bytes = serde_json::to_vec_pretty(&journal).map_err(std::io::Error::other)?;
        atomic_write(&Self::path(dir, name), &bytes)
    }
}

//! Planning: the key of every stage, whether the cache has it, and why not.
use std::collections::{BTreeMap, HashMap};

use crate::pipeline::{ResolvedPipeline, ResolvedStage};

use super::cache::{Cache, CacheError, ObjectState};
use super::filehash::FileHasher;
use super::journal::Journal;
use super::key::{hash_paths, Ingredients};
use super::kind::{Estimate, Registry};

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// The cache has the finished object.
    Hit,
    /// It must be computed.
    Miss,
    /// The cache has a damaged object; it will be removed and recomputed.
    Corrupt(String),
}

/// `cached`, `not computed`, `damaged: <reason>`.
impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Hit => write!(f, "cached"),
            Status::Miss => write!(f, "not computed"),
            Status::Corrupt(reason) => write!(f, "damaged: {reason}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub stage: ResolvedStage,
    pub key: String,
    pub ingredients: Ingredients,
    pub status: Status,
    /// The earlier stage of this pipeline with the same key: both are one object.
    pub same_as: Option<String>,
    /// Why a miss must run (empty for hits).
    pub why: Vec<String>,
    pub estimate: Estimate,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub pipeline: ResolvedPipeline,
    /// In topological order.
    pub stages: Vec<PlannedStage>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("stage `{stage}` reads {path}, which cannot be hashed: {source}")]
    File {
        stage: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stage `{stage}`: unknown kind `{kind}`")]
    UnknownKind { stage: String, kind: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("the pipeline has no stage `{stage}`{hint}")]
    NoStage { stage: String, hint: String },
    #[error("stage `{stage}` is not in the cache ({why}); nothing is computed here: `{command}` computes it{upstream}")]
    NotCached { stage: String, why: String, command: String, upstream: String },
}

impl Plan {
    /// Stages that are objects of their own (not merged into an earlier identical stage).
    pub fn unique(&self) -> impl Iterator<Item = &PlannedStage> {
        self.stages.iter().filter(|s| s.same_as.is_none())
    }

    /// Unique stages that must run.
    pub fn to_run(&self) -> usize {
        self.unique().filter(|s| s.status != Status::Hit).count()
    }

    /// The finished object of stage `id`, for commands that read one stage's results (`export`,
    /// `sample`, `lora export`). A stage that is not in the cache is refused with why, the
    /// command that computes it (with the `--set` overrides the plan was made with), and the
    /// other stages that run needs.
    pub fn cached_object(&self, cache: &Cache, id: &str, overrides: &[String]) -> Result<std::path::PathBuf, PlanError> {
        let Some(stage) = self.stages.iter().find(|s| s.stage.id == id) else {
            let hint = crate::pipeline::spec::closest(id, self.stages.iter().map(|s| s.stage.id.as_str()))
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            return Err(PlanError::NoStage { stage: id.to_string(), hint });
        };
        if stage.status == Status::Hit {
            return Ok(cache.verified_object(&stage.key, id)?);
        }
        let missing = self.missing_upstream(id);
        let upstream = match missing.len() {
            0 => String::new(),
            n => format!(" and the {n} missing stage{} it needs ({})", if n == 1 { "" } else { "s" }, preview(&missing)),
        };
        let mut command = format!("ril-pipe run {}", self.pipeline.source.display());
        for set in overrides {
            command.push_str(&format!(" --set '{set}'"));
        }
        Err(PlanError::NotCached {
            stage: id.to_string(),
            why: stage.why.join("; "),
            command,
            upstream,
        })
    }

    /// The stages upstream of `id` that are not in the cache, in execution order.
    fn missing_upstream(&self, id: &str) -> Vec<String> {
        let by_id: HashMap<&str, &PlannedStage> = self.stages.iter().map(|s| (s.stage.id.as_str(), s)).collect();
        let mut needed = std::collections::BTreeSet::new();
        let mut todo = vec![id.to_string()];
        while let Some(next) = todo.pop() {
            for upstream in by_id.get(next.as_str()).into_iter().flat_map(|s| s.stage.inputs.values().flatten()) {
                if needed.insert(upstream.clone()) {
                    todo.push(upstream.clone());
                }
            }
        }
        self.stages
            .iter()
            .filter(|s| needed.contains(&s.stage.id) && s.status != Status::Hit && s.same_as.is_none())
            .map(|s| s.stage.id.clone())
            .collect()
    }

    /// Per kind: (stages, unique stages).
    pub fn counts_by_kind(&self) -> BTreeMap<String, (usize, usize)> {
        let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for s in &self.stages {
            let c = counts.entry(s.stage.kind.clone()).or_default();
            c.0 += 1;
            if s.same_as.is_none() {
                c.1 += 1;
            }
        }
        counts
    }
}

/// The first few ids of a list, then a count.
fn preview(ids: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = ids.iter().take(SHOWN).map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    text
}

/// Computes keys and cache status; reads the cache and the external files, writes nothing but
/// the file-hash memo.
pub fn plan(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache, hasher: &FileHasher) -> Result<Plan, PlanError> {
    let journal = Journal::load(&cache.journal_dir(), &pipeline.name);
    let mut key_of: HashMap<String, String> = HashMap::new();
    let mut stage_of_key: HashMap<String, String> = HashMap::new();
    let mut status_of_key: HashMap<String, Status> = HashMap::new();
    let by_id: HashMap<&str, &ResolvedStage> = pipeline.stages.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut planned = Vec::with_capacity(pipeline.stages.len());
    for stage in &pipeline.stages {
        let kind = registry.get(&stage.kind).ok_or_else(|| PlanError::UnknownKind {
            stage: stage.id.clone(),
            kind: stage.kind.clone(),
        })?;
        let schema = kind.schema();
        let mut files = BTreeMap::new();
        for missing in &stage.missing_files {
            files.insert(missing.path.to_string_lossy().into_owned(), "missing".to_string());
        }
        for path in &stage.files {
            let hash = hasher.hash(path).map_err(|source| PlanError::File {
                stage: stage.id.clone(),
                path: path.display().to_string(),
                source,
            })?;
            files.insert(path.to_string_lossy().into_owned(), hash);
        }
        let at_default = |name: &str, value: &serde_json::Value| schema.params.iter().any(|p| p.name == name && p.keyed_when_set && p.default.as_ref() == Some(value));
        let params = stage.params.iter().filter(|(k, v)| !at_default(k, v)).map(|(k, v)| (k.clone(), hash_paths(v, &files))).collect();
        let inputs: BTreeMap<String, Vec<String>> = stage
            .inputs
            .iter()
            .map(|(name, ids)| (name.clone(), ids.iter().filter_map(|id| key_of.get(id).cloned()).collect()))
            .collect();
        let input_labels = schema.uses_input_labels.then(|| {
            stage
                .inputs
                .iter()
                .map(|(name, ids)| {
                    let labelled = ids
                        .iter()
                        .map(|id| (id.clone(), by_id.get(id.as_str()).map(|s| s.meta.clone()).unwrap_or_default()))
                        .collect();
                    (name.clone(), labelled)
                })
                .collect()
        });
        let mut rewards = BTreeMap::new();
        for (name, reward) in &stage.rewards {
            let hash = if stage.missing_files.iter().any(|m| m.path == reward.torchscript) {
                "missing".to_string()
            } else {
                let hash = hasher.hash(&reward.torchscript).map_err(|source| PlanError::File {
                    stage: stage.id.clone(),
                    path: reward.torchscript.display().to_string(),
                    source,
                })?;
                format!("blake3:{hash}")
            };
            let declaration = serde_json::json!({"torchscript": hash, "direction": reward.direction, "label": reward.label, "letter": reward.letter});
            rewards.insert(name.clone(), declaration);
        }
        let ingredients = Ingredients {
            kind: stage.kind.clone(),
            version: schema.version,
            params,
            inputs,
            input_labels,
            files,
            rewards,
        };
        let key = ingredients.key();
        key_of.insert(stage.id.clone(), key.clone());
        let same_as = stage_of_key.get(&key).cloned();
        let status = match status_of_key.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = match cache.lookup(&key)? {
                    ObjectState::Done(_) => Status::Hit,
                    ObjectState::Missing => Status::Miss,
                    ObjectState::Corrupt(reason) => Status::Corrupt(reason),
                };
                status_of_key.insert(key.clone(), s.clone());
                stage_of_key.insert(key.clone(), stage.id.clone());
                s
            }
        };
        let why = match (&status, &same_as) {
            (Status::Hit, _) => Vec::new(),
            (_, Some(first)) => vec![format!("same as {first}")],
            (Status::Corrupt(reason), None) => vec![format!("the cached object is damaged ({reason}); it will be recomputed")],
            (Status::Miss, None) => match journal.stages.get(&stage.id) {
                None => vec!["new stage: never run".to_string()],
                Some(entry) if entry.key == key => vec!["not in the cache: its last run did not finish, or gc removed it".to_string()],
                Some(entry) => {
                    let upstream = |k: &str| stage_of_key.get(k).cloned();
                    let why = ingredients.explain_change(&entry.ingredients, &upstream);
                    if why.is_empty() {
                        vec!["its key changed".to_string()]
                    } else {
                        why
                    }
                }
            },
        };
        let estimate = kind.estimate(stage, pipeline);
        planned.push(PlannedStage {
            stage: stage.clone(),
            key,
            ingredients,
            status,
            same_as,
            why,
            estimate,
        });
    }
    hasher.save();
    Ok(Plan {
        pipeline: pipeline.clone(),
        stages: planned,
    })
}

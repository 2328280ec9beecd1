//! Copies out of the cache: a folder replaced as a whole (`export`, `lora export`, published
//! reports), and a pipeline's stages of one kind (its reports) made sure to be in the cache,
//! computed from cached inputs alone through the runner ([`super::run::run_only`]).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pipeline::spec::is_safe_name;
use crate::pipeline::ResolvedPipeline;

use super::cache::{Cache, CacheError, ObjectState};
use super::kind::{Registry, LOG_FILE};
use super::plan::{plan, PlanError};
use super::launch::Outcome;
use super::run::{run_only, RunError, RunOptions};
use super::{cache, filehash};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("pipeline `{pipeline}` has no stage of kind `{kind}`")]
    NoStageOfKind { pipeline: String, kind: String },
    #[error("the {kind} stages need stages that are not in the cache (run `ril-pipe run` on the pipeline first):\n{}", .list.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n"))]
    MissingInputs { kind: String, list: Vec<String> },
    #[error("stage `{stage}` failed: {error}{}", .log.as_ref().map(|l| format!(" (log: {})", l.display())).unwrap_or_default())]
    StageFailed { stage: String, error: String, log: Option<PathBuf> },
    #[error("stage `{0}` is not in the cache (run `ril-pipe report` or `ril-pipe run` on the pipeline first)")]
    NotCached(String),
    #[error("`{0}` cannot name a folder")]
    BadName(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Run(RunError),
}

/// A finished stage's object in the cache.
#[derive(Debug, Clone)]
pub struct CachedObject {
    pub stage_id: String,
    pub dir: PathBuf,
}

/// Replaces the folder `dest` as a whole with the one `fill` writes: it is assembled beside
/// `dest` and renamed into place, so `dest` is always the old folder or the complete new one.
pub fn replace_folder<T, E: From<std::io::Error>>(dest: &Path, fill: impl FnOnce(&Path) -> Result<T, E>) -> Result<T, E> {
    let at = |e: std::io::Error| E::from(std::io::Error::new(e.kind(), format!("{}: {e}", dest.display())));
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(at)?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = format!("{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
    let staging = parent.join(format!(".{name}.new.{unique}"));
    std::fs::create_dir(&staging).map_err(at)?;
    let value = match fill(&staging) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let old = parent.join(format!(".{name}.old.{unique}"));
    let had_old = dest.exists();
    if had_old {
        if let Err(e) = std::fs::rename(dest, &old) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(at(e));
        }
    }
    if let Err(e) = std::fs::rename(&staging, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        let _ = std::fs::remove_dir_all(&staging);
        return Err(at(e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(value)
}

/// Copies the files of a cache object (all but its manifest and log) into the folder `into`.
fn copy_object(object: &Path, into: &Path) -> std::io::Result<usize> {
    let mut files = Vec::new();
    filehash::list_files(object, object, &mut files)?;
    let mut copied = 0;
    for rel in files {
        if rel == cache::MANIFEST || rel == LOG_FILE {
            continue;
        }
        let target = into.join(&rel);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(object.join(&rel), &target)?;
        copied += 1;
    }
    Ok(copied)
}

/// Copies the files of a cache object (all but its manifest and log) into `dest`, replacing it
/// as a whole; returns the number of files copied.
pub fn export(object: &Path, dest: &Path) -> std::io::Result<usize> {
    replace_folder(dest, |into| copy_object(object, into))
}

/// The objects of a pipeline's (unique) stages of `kind`, all of which must be in the cache.
pub fn cached_of_kind(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache, kind: &str) -> Result<Vec<CachedObject>, PublishError> {
    let plan = plan(pipeline, registry, cache, &cache.file_hasher())?;
    let stages: Vec<_> = plan.unique().filter(|s| s.stage.kind == kind).collect();
    if stages.is_empty() {
        return Err(PublishError::NoStageOfKind { pipeline: pipeline.name.clone(), kind: kind.to_string() });
    }
    stages
        .iter()
        .map(|s| match cache.lookup(&s.key)? {
            ObjectState::Done(_) => Ok(CachedObject { stage_id: s.stage.id.clone(), dir: cache.verified_object(&s.key, &s.stage.id)? }),
            _ => Err(PublishError::NotCached(s.stage.id.clone())),
        })
        .collect()
}

/// The objects of a pipeline's stages of `kind`; those not in the cache yet are computed by the
/// runner from their inputs, which must all be cached ([`PublishError::MissingInputs`] lists
/// those that are not; nothing upstream runs).
pub fn ensure_of_kind(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache, kind: &str) -> Result<Vec<CachedObject>, PublishError> {
    let ids: BTreeSet<String> = pipeline.stages.iter().filter(|s| s.kind == kind).map(|s| s.id.clone()).collect();
    if ids.is_empty() {
        return Err(PublishError::NoStageOfKind { pipeline: pipeline.name.clone(), kind: kind.to_string() });
    }
    let summary = run_only(pipeline, registry, cache, &RunOptions::default(), &ids).map_err(|e| match e {
        RunError::MissingInputs(list) => PublishError::MissingInputs { kind: kind.to_string(), list },
        other => PublishError::Run(other),
    })?;
    for o in summary.outcomes {
        match o.outcome {
            Outcome::Executed { .. } | Outcome::Cached => {}
            Outcome::Failed { error, log } => return Err(PublishError::StageFailed { stage: o.id, error, log }),
            other => return Err(PublishError::StageFailed { stage: o.id, error: format!("{other:?}"), log: None }),
        }
    }
    cached_of_kind(pipeline, registry, cache, kind)
}

/// Copies objects to `<root>/<name>/`, replacing that folder as a whole: one object's files
/// directly, several each into a subfolder named by `subfolder` of its stage id.
pub fn publish_objects(objects: &[CachedObject], root: &Path, name: &str, subfolder: impl Fn(&str) -> String) -> Result<PathBuf, PublishError> {
    if !is_safe_name(name) || name.starts_with('.') {
        return Err(PublishError::BadName(name.to_string()));
    }
    let dest = root.join(name);
    replace_folder(&dest, |into| -> std::io::Result<()> {
        match objects {
            [one] => copy_object(&one.dir, into).map(|_| ()),
            many => many.iter().try_for_each(|o| copy_object(&o.dir, &into.join(subfolder(&o.stage_id))).map(|_| ())),
        }
    })
    .map_err(|source| PublishError::Io { context: format!("cannot publish to {}", dest.display()), source })?;
    Ok(dest)
}

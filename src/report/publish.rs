//! A pipeline's report stages: made sure to be in the cache (computing only the report stages
//! themselves, from cached inputs) and copied to `reports/<pipeline name>/`.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::exec::cache::Cache;
use crate::exec::journal::{Journal, JournalEntry};
use crate::exec::kind::{Registry, LOG_FILE};
use crate::exec::plan::{plan, Plan, PlannedStage, Status};
use crate::exec::progress::StageProgress;
use crate::exec::run::{execute_object, FrozenStage, Outcome};
use crate::pipeline::spec::is_safe_name;
use crate::pipeline::ResolvedPipeline;

use super::check::parse_metrics;
use super::{ReportError, REPORT_METRICS_FILE};

/// The kind name of report stages.
pub const REPORT_KIND: &str = "report";
/// The kind name of the report over seeds, published beside the reports.
pub const SEEDS_REPORT_KIND: &str = "seeds_report";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("pipeline `{0}` has no stage of kind `report`")]
    NoReportStage(String),
    #[error("the report needs stages that are not in the cache (run `ril-pipe run` on the pipeline first):\n{}", .0.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n"))]
    MissingInputs(Vec<String>),
    #[error("report stage `{stage}` failed: {error}{}", .log.as_ref().map(|l| format!(" (log: {})", l.display())).unwrap_or_default())]
    StageFailed { stage: String, error: String, log: Option<PathBuf> },
    #[error("report stage `{0}` is not in the cache (run `ril-pipe report` on the pipeline first)")]
    NotReported(String),
    #[error("`{0}` cannot name a report folder")]
    BadName(String),
    #[error(transparent)]
    Plan(#[from] crate::exec::plan::PlanError),
    #[error(transparent)]
    Cache(#[from] crate::exec::cache::CacheError),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// A report stage's finished object.
#[derive(Debug, Clone)]
pub struct ReportObject {
    pub stage_id: String,
    pub dir: PathBuf,
    /// Output files (relative paths), from the object's manifest.
    pub files: Vec<String>,
}

fn report_stages(plan: &Plan) -> Vec<&PlannedStage> {
    plan.unique().filter(|s| s.stage.kind == REPORT_KIND || s.stage.kind == SEEDS_REPORT_KIND).collect()
}

fn status_text(s: &Status) -> String {
    match s {
        Status::Hit => "cached".into(),
        Status::Miss => "not computed".into(),
        Status::Corrupt(reason) => format!("damaged: {reason}"),
    }
}

fn object(cache: &Cache, stage_id: &str, key: &str) -> Result<ReportObject, PublishError> {
    match cache.lookup(key)? {
        crate::exec::cache::ObjectState::Done(manifest) => Ok(ReportObject {
            stage_id: stage_id.to_string(),
            dir: cache.object_dir(key)?,
            files: manifest.files.keys().cloned().collect(),
        }),
        _ => Err(PublishError::NotReported(stage_id.to_string())),
    }
}

/// The report objects of a pipeline, all of which must be cached already.
pub fn cached_reports(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache) -> Result<Vec<ReportObject>, PublishError> {
    let plan = plan(pipeline, registry, cache, &cache.file_hasher())?;
    let stages = report_stages(&plan);
    if stages.is_empty() {
        return Err(PublishError::NoReportStage(pipeline.name.clone()));
    }
    stages.iter().map(|s| object(cache, &s.stage.id, &s.key)).collect()
}

/// The report objects of a pipeline; report stages that are not cached yet are computed from
/// their inputs, which must all be cached (else [`PublishError::MissingInputs`] lists them).
pub fn ensure_reports(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache) -> Result<Vec<ReportObject>, PublishError> {
    let plan = plan(pipeline, registry, cache, &cache.file_hasher())?;
    let stages = report_stages(&plan);
    if stages.is_empty() {
        return Err(PublishError::NoReportStage(pipeline.name.clone()));
    }
    let by_id: BTreeMap<&str, &PlannedStage> = plan.stages.iter().map(|s| (s.stage.id.as_str(), s)).collect();
    let mut missing = Vec::new();
    for s in stages.iter().filter(|s| s.status != Status::Hit) {
        for id in s.stage.inputs.values().flatten() {
            if let Some(input) = by_id.get(id.as_str()) {
                if input.status != Status::Hit {
                    let line = format!("{id} ({}, {}; needed by {})", input.stage.kind, status_text(&input.status), s.stage.id);
                    if !missing.contains(&line) {
                        missing.push(line);
                    }
                }
            }
        }
    }
    if !missing.is_empty() {
        return Err(PublishError::MissingInputs(missing));
    }
    let to_run: Vec<&&PlannedStage> = stages.iter().filter(|s| s.status != Status::Hit).collect();
    if !to_run.is_empty() {
        let _lock = cache.run_lock(true, &mut |holder| eprintln!("waiting: the cache is in use by {holder}"))?;
        let frozen = FrozenStage::all(&plan);
        for s in to_run {
            let Some(kind) = registry.get(&s.stage.kind) else {
                return Err(PublishError::StageFailed {
                    stage: s.stage.id.clone(),
                    error: format!("unknown kind `{}`", s.stage.kind),
                    log: None,
                });
            };
            let Some(f) = frozen.get(&s.key) else { continue };
            let cancel = Arc::new(AtomicBool::new(false));
            let (outcome, note) = execute_object(cache, kind.as_ref(), f, "cpu", 1, cancel, StageProgress::hidden(&s.stage.id));
            if let Some(note) = note {
                eprintln!("{note}");
            }
            match outcome {
                Outcome::Executed { .. } | Outcome::Cached => {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    let ids: Vec<String> = plan.stages.iter().filter(|p| p.key == s.key).map(|p| p.stage.id.clone()).collect();
                    let entries: Vec<(String, JournalEntry)> = ids
                        .into_iter()
                        .map(|id| {
                            (
                                id,
                                JournalEntry {
                                    key: s.key.clone(),
                                    ingredients: s.ingredients.clone(),
                                    finished_unix: now,
                                },
                            )
                        })
                        .collect();
                    // The journal keeps the new object safe from gc; failing to write it is not
                    // a reason to withhold the report.
                    if let Err(e) = Journal::record(&cache.journal_dir(), &plan.pipeline.name, &plan.pipeline.source, &entries) {
                        eprintln!("warning: cannot update the journal: {e}");
                    }
                }
                Outcome::Failed { error, log } => {
                    return Err(PublishError::StageFailed {
                        stage: s.stage.id.clone(),
                        error,
                        log,
                    })
                }
                other => {
                    return Err(PublishError::StageFailed {
                        stage: s.stage.id.clone(),
                        error: format!("{other:?}"),
                        log: None,
                    })
                }
            }
        }
    }
    stages.iter().map(|s| object(cache, &s.stage.id, &s.key)).collect()
}

/// The union of the reports' flat metrics (`metrics.json`); a key two reports give different
/// values is an error.
pub fn merged_metrics(reports: &[ReportObject]) -> Result<BTreeMap<String, f64>, PublishError> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for r in reports {
        let path = r.dir.join(REPORT_METRICS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ReportError::io(format!("cannot read {}", path.display()), e))?;
        let metrics = parse_metrics(&text, &path.display().to_string()).map_err(|e| ReportError::Input(e.to_string()))?;
        for (k, v) in metrics {
            if let Some(old) = out.insert(k.clone(), v) {
                if old != v {
                    return Err(ReportError::Input(format!("metric `{k}` differs between the report stages ({old} and {v})")).into());
                }
            }
        }
    }
    Ok(out)
}

/// A relative path with plain components only (no `..`, no root): safe to join under a folder.
fn plain_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    p.components().all(|c| matches!(c, Component::Normal(_))).then(|| p.to_path_buf())
}

fn copy_report(report: &ReportObject, dest: &Path) -> Result<(), ReportError> {
    for file in &report.files {
        if file == LOG_FILE {
            continue;
        }
        let rel = plain_relative(file).ok_or_else(|| ReportError::Input(format!("report output `{file}` is not a plain relative path")))?;
        let to = dest.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ReportError::io(format!("cannot create {}", parent.display()), e))?;
        }
        std::fs::copy(report.dir.join(&rel), &to).map_err(|e| ReportError::io(format!("cannot copy {file} to {}", to.display()), e))?;
    }
    Ok(())
}

/// Copies the reports to `<reports_root>/<name>/`: one report's files directly, several each
/// into a subfolder named after its stage id. The folder is assembled beside its final place
/// and renamed into it, so readers see the old report or the new one, never a mix. Returns the
/// folder.
pub fn publish(reports: &[ReportObject], reports_root: &Path, name: &str) -> Result<PathBuf, PublishError> {
    if !is_safe_name(name) || name.starts_with('.') {
        return Err(PublishError::BadName(name.to_string()));
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = format!("{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
    std::fs::create_dir_all(reports_root).map_err(|e| ReportError::io(format!("cannot create {}", reports_root.display()), e))?;
    let tmp = reports_root.join(format!(".{name}.tmp.{unique}"));
    let result = (|| -> Result<(), ReportError> {
        std::fs::create_dir(&tmp).map_err(|e| ReportError::io(format!("cannot create {}", tmp.display()), e))?;
        match reports {
            [one] => copy_report(one, &tmp)?,
            many => {
                for r in many {
                    copy_report(r, &tmp.join(super::charts::file_stem(&r.stage_id)))?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    let dest = reports_root.join(name);
    let old = reports_root.join(format!(".{name}.old.{unique}"));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(&dest, &old).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            ReportError::io(format!("cannot move the previous report {} aside", dest.display()), e)
        })?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        if had_old {
            let _ = std::fs::rename(&old, &dest);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ReportError::io(format!("cannot move the report into {}", dest.display()), e).into());
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(dest)
}

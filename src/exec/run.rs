//! Execution: stages in dependency order, independent ones concurrently up to `jobs`, at most
//! one stage per GPU, every result committed atomically to the cache.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::cache::{Cache, CacheError, POLL};
use super::journal::{Journal, JournalEntry};
use super::kind::Registry;
use super::launch::local::LocalLauncher;
use super::launch::slurm::{SlurmConfig, SlurmLauncher};
use super::launch::{Finished, FrozenStage, Launcher, Outcome};
use super::plan::{plan, Plan, PlanError, PlannedStage, Status};
use super::progress::{format_seconds, ProgressHub};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stages run at the same time.
    pub jobs: usize,
    /// Go on with independent stages after a failure.
    pub keep_going: bool,
    /// GPU devices of this run (`cuda:0`, ...); empty: CPU only.
    pub gpus: Vec<String>,
    /// CPU threads shared out among running stages.
    pub threads: usize,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
    /// Wait for a cache held by `gc` instead of failing.
    pub wait: bool,
    /// Set by Ctrl-C / SIGTERM: no new stage starts, running ones stop at their next check.
    pub cancel: Arc<AtomicBool>,
    pub executor: Executor,
}

/// Where stages run.
#[derive(Debug, Clone, Default)]
pub enum Executor {
    /// In this process, on threads.
    #[default]
    Local,
    /// As Slurm jobs, each running `ril-pipe exec-stage` against the shared cache.
    Slurm(SlurmConfig),
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: 1,
            keep_going: false,
            gpus: Vec::new(),
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            progress: false,
            wait: true,
            cancel: Arc::new(AtomicBool::new(false)),
            executor: Executor::Local,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub id: String,
    pub kind: String,
    pub key: String,
    /// Other stage ids merged into this object.
    pub merged: Vec<String>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub outcomes: Vec<StageOutcome>,
    pub cancelled: bool,
    pub seconds: f64,
    /// Temporary folders of killed runs removed at the start.
    pub cleaned_tmp: usize,
}

impl RunSummary {
    pub fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|o| pred(&o.outcome)).count()
    }

    pub fn executed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Executed { .. }))
    }

    pub fn cached(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Cached))
    }

    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed { .. }))
    }

    pub fn ok(&self) -> bool {
        !self.cancelled && self.outcomes.iter().all(|o| matches!(o.outcome, Outcome::Executed { .. } | Outcome::Cached))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Executor(String),
    /// Stages asked for alone ([`run_only`]) need inputs that are not in the cache: one line
    /// per input, `<id> (<kind>, <status>; needed by <stage>)`.
    #[error("the stages asked for need stages that are not in the cache (run `ril-pipe run` on the pipeline first):\n{}", .0.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n"))]
    MissingInputs(Vec<String>),
}

/// One object to produce, and the stages merged into it.
struct Unit {
    planned: PlannedStage,
    merged: Vec<String>,
    deps: Vec<usize>,
}

/// Runs a pipeline's plan. Finished stages are committed and journalled as they complete, so
/// an interrupted run loses at most the stages that were running.
pub fn run(pipeline: &crate::pipeline::ResolvedPipeline, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<RunSummary, RunError> {
    run_selected(pipeline, registry, cache, opts, None)
}

/// [`run`] of the stages `ids` alone (e.g. a pipeline's reports): those not in the cache are
/// computed from their inputs, which must all be in the cache already; nothing upstream runs
/// ([`RunError::MissingInputs`] lists what is missing).
pub fn run_only(pipeline: &crate::pipeline::ResolvedPipeline, registry: &Registry, cache: &Cache, opts: &RunOptions, ids: &BTreeSet<String>) -> Result<RunSummary, RunError> {
    run_selected(pipeline, registry, cache, opts, Some(ids))
}

/// The inputs of the stages `ids` that must run but are not in the cache.
fn missing_inputs(plan: &Plan, ids: &BTreeSet<String>) -> Vec<String> {
    let by_id: BTreeMap<&str, &PlannedStage> = plan.stages.iter().map(|s| (s.stage.id.as_str(), s)).collect();
    let mut missing = Vec::new();
    for s in plan.stages.iter().filter(|s| ids.contains(&s.stage.id) && s.status != Status::Hit) {
        for id in s.stage.inputs.values().flatten() {
            if let Some(input) = by_id.get(id.as_str()).filter(|i| i.status != Status::Hit) {
                let line = format!("{id} ({}, {}; needed by {})", input.stage.kind, input.status, s.stage.id);
                if !missing.contains(&line) {
                    missing.push(line);
                }
            }
        }
    }
    missing
}

fn run_selected(pipeline: &crate::pipeline::ResolvedPipeline, registry: &Registry, cache: &Cache, opts: &RunOptions, only: Option<&BTreeSet<String>>) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let hub_pre = ProgressHub::new(0, false);
    let _lock = cache.run_lock(opts.wait, &mut |holder| hub_pre.println(&format!("waiting: the cache is in use by {holder}")))?;
    let cleaned_tmp = cache.clean_stale_tmp();
    let hasher = cache.file_hasher();
    let plan = plan(pipeline, registry, cache, &hasher)?;
    if let Some(ids) = only {
        let missing = missing_inputs(&plan, ids);
        if !missing.is_empty() {
            return Err(RunError::MissingInputs(missing));
        }
    }
    let units = build_units(&plan, only);
    let to_run = units.iter().filter(|u| u.planned.status != Status::Hit).count();
    let hub = ProgressHub::new(to_run as u64, opts.progress);
    let mut summary = RunSummary {
        cleaned_tmp,
        ..RunSummary::default()
    };
    let journal_dir = cache.journal_dir();
    // Each call rewrites the whole journal: stages found in the cache go in one call (one per
    // stage made a run of n cached stages cost n^2).
    let record = |stages: Vec<(Vec<String>, &PlannedStage)>| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let entries: Vec<(String, JournalEntry)> = stages
            .into_iter()
            .flat_map(|(ids, p)| {
                ids.into_iter().map(move |id| {
                    (
                        id,
                        JournalEntry {
                            key: p.key.clone(),
                            ingredients: p.ingredients.clone(),
                            finished_unix: now,
                        },
                    )
                })
            })
            .collect();
        if entries.is_empty() {
            return;
        }
        if let Err(e) = Journal::record(&journal_dir, &plan.pipeline.name, &plan.pipeline.source, &entries) {
            hub.println(&format!("warning: cannot update the journal: {e}"));
        }
    };

    #[derive(Clone, PartialEq)]
    enum State {
        Waiting,
        Running,
        Done,
        Failed,
    }
    let mut states: Vec<State> = units.iter().map(|_| State::Waiting).collect();
    let mut outcome_of: Vec<Option<Outcome>> = units.iter().map(|_| None).collect();
    let mut hits = Vec::new();
    for (i, u) in units.iter().enumerate() {
        if u.planned.status == Status::Hit {
            states[i] = State::Done;
            outcome_of[i] = Some(Outcome::Cached);
            hits.push(i);
        }
    }
    let mut launcher_failures: Vec<Finished> = Vec::new();
    let hit_ids = hits
        .iter()
        .map(|&i| {
            let mut ids = vec![units[i].planned.stage.id.clone()];
            ids.extend(units[i].merged.iter().cloned());
            (ids, &units[i].planned)
        })
        .collect();
    record(hit_ids);

    let frozen = FrozenStage::all(&plan);
    let mut launcher: Box<dyn Launcher> = match &opts.executor {
        Executor::Local => Box::new(LocalLauncher::new(registry, cache, opts.cancel.clone())),
        Executor::Slurm(config) => Box::new(SlurmLauncher::new(config.clone(), cache).map_err(RunError::Executor)?),
    };
    let mut free_gpus: Vec<String> = opts.gpus.iter().rev().cloned().collect();
    let mut gpu_of: HashMap<usize, String> = HashMap::new();
    let mut running = 0usize;
    let mut stop = false;
    let mut cancel_sent = false;
    let jobs = opts.jobs.max(1);
    let threads = (opts.threads / jobs).max(1);
    loop {
        if opts.cancel.load(Ordering::SeqCst) {
            stop = true;
            summary.cancelled = true;
            if !cancel_sent {
                launcher.cancel();
                cancel_sent = true;
            }
        }
        // Start what is ready, in plan order.
        if !stop {
            for i in 0..units.len() {
                if running >= jobs {
                    break;
                }
                if states[i] != State::Waiting || !units[i].deps.iter().all(|&d| states[d] == State::Done) {
                    continue;
                }
                let wants_gpu = !launcher.assigns_devices()
                    && match units[i].planned.stage.resources.gpus {
                        Some(n) => n > 0 && !opts.gpus.is_empty(),
                        None => !opts.gpus.is_empty(),
                    };
                let device = if wants_gpu {
                    match free_gpus.pop() {
                        Some(g) => g,
                        None => continue,
                    }
                } else {
                    "cpu".to_string()
                };
                if wants_gpu {
                    gpu_of.insert(i, device.clone());
                }
                let unit_frozen = &frozen[&units[i].planned.key];
                hub.println(&format!("  start   {} ({})", unit_frozen.stage.id, unit_frozen.stage.kind));
                let progress = hub.stage(&unit_frozen.stage.id);
                states[i] = State::Running;
                running += 1;
                if let Err(error) = launcher.start(i, unit_frozen, device, threads, progress) {
                    launcher_failures.push(Finished {
                        unit: i,
                        outcome: Outcome::Failed { error, log: None },
                        note: None,
                    });
                }
            }
        }
        if running == 0 {
            break;
        }
        let mut finished = std::mem::take(&mut launcher_failures);
        if finished.is_empty() {
            finished = launcher.wait(POLL);
        }
        for Finished { unit: i, outcome, note } in finished {
            running -= 1;
            if let Some(g) = gpu_of.remove(&i) {
                free_gpus.push(g);
            }
            if let Some(note) = note {
                hub.println(&note);
            }
            let id = &units[i].planned.stage.id;
            match &outcome {
                Outcome::Executed { seconds } => {
                    hub.println(&format!("  done    {id} in {}", format_seconds(*seconds)));
                    states[i] = State::Done;
                    let mut ids = vec![id.clone()];
                    ids.extend(units[i].merged.iter().cloned());
                    record(vec![(ids, &units[i].planned)]);
                }
                Outcome::Cached => {
                    hub.println(&format!("  cached  {id} (finished by another process)"));
                    states[i] = State::Done;
                    let mut ids = vec![id.clone()];
                    ids.extend(units[i].merged.iter().cloned());
                    record(vec![(ids, &units[i].planned)]);
                }
                Outcome::Failed { error, log } => {
                    let log_note = log.as_ref().map(|l| format!("\n          log: {}", l.display())).unwrap_or_default();
                    hub.println(&format!("  FAILED  {id}: {error}{log_note}"));
                    states[i] = State::Failed;
                    if !opts.keep_going {
                        stop = true;
                    }
                }
                Outcome::Cancelled => {
                    hub.println(&format!("  stopped {id} (interrupted; finished stages are kept)"));
                    states[i] = State::Failed;
                    stop = true;
                }
                Outcome::Skipped { .. } => states[i] = State::Failed,
            }
            outcome_of[i] = Some(outcome);
            hub.advance();
        }
    }
    hub.finish();

    for (i, unit) in units.iter().enumerate() {
        let outcome = outcome_of[i].clone().unwrap_or_else(|| {
            let failed_dep = unit.deps.iter().find(|&&d| states[d] == State::Failed).map(|&d| units[d].planned.stage.id.clone());
            Outcome::Skipped {
                reason: match failed_dep {
                    Some(dep) => format!("input {dep} did not finish"),
                    None if summary.cancelled => "the run was interrupted".to_string(),
                    None => "the run stopped after a failure (use --keep-going to continue with independent stages)".to_string(),
                },
            }
        });
        summary.outcomes.push(StageOutcome {
            id: unit.planned.stage.id.clone(),
            kind: unit.planned.stage.kind.clone(),
            key: unit.planned.key.clone(),
            merged: unit.merged.clone(),
            outcome,
        });
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The unique objects of a plan (of the stages `only`, when given) with their dependencies.
fn build_units(plan: &Plan, only: Option<&BTreeSet<String>>) -> Vec<Unit> {
    let mut index_of_key: HashMap<String, usize> = HashMap::new();
    let mut units: Vec<Unit> = Vec::new();
    for p in plan.stages.iter().filter(|p| only.is_none_or(|ids| ids.contains(&p.stage.id))) {
        match index_of_key.get(&p.key) {
            Some(&i) => units[i].merged.push(p.stage.id.clone()),
            None => {
                index_of_key.insert(p.key.clone(), units.len());
                units.push(Unit {
                    planned: p.clone(),
                    merged: Vec::new(),
                    deps: Vec::new(),
                });
            }
        }
    }
    let key_of: HashMap<&str, &str> = plan.stages.iter().map(|s| (s.stage.id.as_str(), s.key.as_str())).collect();
    for u in &mut units {
        let mut deps: Vec<usize> = u
            .planned
            .stage
            .inputs
            .values()
            .flatten()
            .filter_map(|id| key_of.get(id.as_str()).and_then(|k| index_of_key.get(*k)).copied())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        deps.sort();
        u.deps = deps;
    }
    units
}



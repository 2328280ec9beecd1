//! Execution: stages in dependency order, independent ones concurrently up to `jobs`, at most
//! one stage per GPU, every result committed atomically to the cache.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::pipeline::ResolvedStage;

use super::cache::{Cache, CacheError, ObjectState, POLL};
use super::journal::{Journal, JournalEntry};
use super::key::{short_key, Ingredients};
use super::kind::{InputObject, Registry, StageContext, StageError, LOG_FILE};
use super::plan::{plan, Plan, PlanError, PlannedStage, Status};
use super::progress::{ProgressHub, StageProgress};

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
    Slurm(super::slurm::SlurmConfig),
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

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Computed in this run.
    Executed { seconds: f64 },
    /// Found in the cache (also: finished meanwhile by another process).
    Cached,
    Failed { error: String, log: Option<PathBuf> },
    /// Not run because an input failed or the run stopped.
    Skipped { reason: String },
    Cancelled,
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

/// A unit that finished (or could not start).
pub struct Finished {
    pub unit: usize,
    pub outcome: Outcome,
    pub note: Option<String>,
}

/// Starts units and reports when they finish: threads here, or jobs of a batch system.
pub trait Launcher {
    fn start(&mut self, unit: usize, frozen: &FrozenStage, device: String, threads: usize, progress: StageProgress) -> Result<(), String>;
    /// Units finished since the last call, waiting at most `timeout` for the first.
    fn wait(&mut self, timeout: std::time::Duration) -> Vec<Finished>;
    /// Asks every running unit to stop.
    fn cancel(&mut self);
    /// Whether devices are assigned by the launcher (a batch system) rather than the run.
    fn assigns_devices(&self) -> bool;
}

/// Runs units on threads of this process.
struct LocalLauncher {
    kinds: HashMap<String, Arc<dyn super::kind::StageKind>>,
    cache_root: PathBuf,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<Finished>,
    rx: mpsc::Receiver<Finished>,
}

impl LocalLauncher {
    fn new(registry: &Registry, cache: &Cache, cancel: Arc<AtomicBool>) -> Self {
        let (tx, rx) = mpsc::channel();
        let kinds = registry.schemas().keys().filter_map(|k| registry.get(k).map(|kind| (k.clone(), kind.clone()))).collect();
        LocalLauncher {
            kinds,
            cache_root: cache.root().to_path_buf(),
            cancel,
            tx,
            rx,
        }
    }
}

impl Launcher for LocalLauncher {
    fn start(&mut self, unit: usize, frozen: &FrozenStage, device: String, threads: usize, progress: StageProgress) -> Result<(), String> {
        let kind = self.kinds.get(&frozen.stage.kind).cloned().ok_or_else(|| format!("unknown kind `{}`", frozen.stage.kind))?;
        let frozen = frozen.clone();
        let tx = self.tx.clone();
        let cancel = self.cancel.clone();
        let cache = Cache::new(&self.cache_root);
        std::thread::spawn(move || {
            let (outcome, note) = execute_object(&cache, kind.as_ref(), &frozen, &device, threads, cancel, progress.clone());
            progress.finish();
            let _ = tx.send(Finished { unit, outcome, note });
        });
        Ok(())
    }

    fn wait(&mut self, timeout: std::time::Duration) -> Vec<Finished> {
        let mut done: Vec<Finished> = self.rx.recv_timeout(timeout).into_iter().collect();
        done.extend(self.rx.try_iter());
        done
    }

    fn cancel(&mut self) {
        // Stages poll the shared flag; nothing more to do here.
    }

    fn assigns_devices(&self) -> bool {
        false
    }
}

/// One object to produce, and the stages merged into it.
struct Unit {
    planned: PlannedStage,
    merged: Vec<String>,
    deps: Vec<usize>,
}

/// A frozen stage: everything needed to compute one object without the pipeline file
/// (`ril-pipe exec-stage`, e.g. as a Slurm job on another node).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrozenStage {
    pub stage: ResolvedStage,
    pub key: String,
    pub ingredients: Ingredients,
    /// Input name -> (stage id, key) of each upstream object.
    pub inputs: BTreeMap<String, Vec<(String, String)>>,
    pub input_meta: BTreeMap<String, BTreeMap<String, String>>,
}

impl FrozenStage {
    fn from_plan(p: &PlannedStage, key_of: &HashMap<&str, &str>, meta_of: &HashMap<&str, &BTreeMap<String, String>>) -> Self {
        let mut inputs = BTreeMap::new();
        let mut input_meta = BTreeMap::new();
        for (name, ids) in &p.stage.inputs {
            let mut list = Vec::new();
            for id in ids {
                if let Some(k) = key_of.get(id.as_str()) {
                    list.push((id.clone(), k.to_string()));
                }
                if let Some(m) = meta_of.get(id.as_str()) {
                    input_meta.insert(id.clone(), (*m).clone());
                }
            }
            inputs.insert(name.clone(), list);
        }
        FrozenStage {
            stage: p.stage.clone(),
            key: p.key.clone(),
            ingredients: p.ingredients.clone(),
            inputs,
            input_meta,
        }
    }

    /// The frozen form of every unique stage of a plan, by key.
    pub fn all(plan: &Plan) -> BTreeMap<String, FrozenStage> {
        let key_of: HashMap<&str, &str> = plan.stages.iter().map(|s| (s.stage.id.as_str(), s.key.as_str())).collect();
        let meta_of: HashMap<&str, &BTreeMap<String, String>> = plan.stages.iter().map(|s| (s.stage.id.as_str(), &s.stage.meta)).collect();
        plan.unique().map(|p| (p.key.clone(), FrozenStage::from_plan(p, &key_of, &meta_of))).collect()
    }
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
        Executor::Slurm(config) => Box::new(super::slurm::SlurmLauncher::new(config.clone(), cache)?),
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

pub fn format_seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// Computes one object (or finds it done by another process), holding its lock. Returns the
/// outcome and an optional note for the user.
pub fn execute_object(
    cache: &Cache,
    kind: &dyn super::kind::StageKind,
    frozen: &FrozenStage,
    device: &str,
    threads: usize,
    cancel: Arc<AtomicBool>,
    progress: StageProgress,
) -> (Outcome, Option<String>) {
    let id = frozen.stage.id.clone();
    let failed = |error: String| Outcome::Failed { error, log: None };
    let mut note = None;
    let lock = cache.lock_object(&frozen.key, &mut || {
        eprintln!("  waiting {id}: another process is computing it");
    });
    let _lock = match lock {
        Ok(l) => l,
        Err(e) => return (failed(e.to_string()), None),
    };
    match cache.lookup(&frozen.key) {
        Ok(ObjectState::Done(_)) => return (Outcome::Cached, None),
        Ok(ObjectState::Corrupt(reason)) => {
            note = Some(format!("  damaged {id} ({}): {reason}; removing it and computing again", short_key(&frozen.key)));
            if let Err(e) = cache.remove_object(&frozen.key) {
                return (failed(e.to_string()), note);
            }
        }
        Ok(ObjectState::Missing) => {}
        Err(e) => return (failed(e.to_string()), None),
    }
    let mut inputs = BTreeMap::new();
    for (name, list) in &frozen.inputs {
        let mut objects = Vec::new();
        for (upstream, key) in list {
            let manifest = match checked_input(cache, upstream, key) {
                Ok(m) => m,
                Err(error) => return (failed(error), note),
            };
            let dir = match cache.object_dir(key) {
                Ok(d) => d,
                Err(e) => return (failed(e.to_string()), note),
            };
            objects.push(InputObject {
                stage_id: upstream.clone(),
                kind: manifest.kind.clone(),
                key: key.clone(),
                dir,
                meta: frozen.input_meta.get(upstream).cloned().unwrap_or_default(),
                manifest,
            });
        }
        inputs.insert(name.clone(), objects);
    }
    let tmp = match cache.begin(&frozen.key) {
        Ok(t) => t,
        Err(e) => return (failed(e.to_string()), note),
    };
    let resume = match cache.partial_dir(&frozen.key) {
        Ok(r) => r,
        Err(e) => return (failed(e.to_string()), note),
    };
    let mut ctx = match StageContext::new(frozen.stage.clone(), frozen.key.clone(), inputs, device.to_string(), threads, tmp.clone(), resume.clone(), cancel, progress) {
        Ok(c) => c,
        Err(e) => {
            cache.discard(&tmp);
            return (failed(e.to_string()), note);
        }
    };
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run(&mut ctx)));
    let seconds = started.elapsed().as_secs_f64();
    let result = result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(StageError::Failed(format!("internal error (panic): {what}")))
    });
    match result {
        Ok(()) => {
            ctx.log(format!("finished in {}", format_seconds(seconds)));
            ctx.close_log();
            match cache.commit(&tmp, &frozen.key, &id, &frozen.ingredients, seconds) {
                Ok(_) => {
                    if resume.exists() {
                        let _ = std::fs::remove_dir_all(&resume);
                    }
                    (Outcome::Executed { seconds }, note)
                }
                Err(e) => {
                    cache.discard(&tmp);
                    (failed(format!("cannot store the outputs: {e}")), note)
                }
            }
        }
        Err(StageError::Cancelled) => {
            ctx.close_log();
            cache.discard(&tmp);
            (Outcome::Cancelled, note)
        }
        Err(e) => {
            ctx.log(format!("error: {e}"));
            ctx.close_log();
            let log = keep_failed_log(cache, &id, &frozen.key, &tmp);
            cache.discard(&tmp);
            (Outcome::Failed { error: e.to_string(), log }, note)
        }
    }
}

/// The manifest of an input object after checking every file's hash: a stage never reads a
/// damaged input. A damaged input is removed (so the next run recomputes it) and named.
fn checked_input(cache: &Cache, upstream: &str, key: &str) -> Result<super::cache::Manifest, String> {
    match cache.verify(key) {
        Ok(Ok(manifest)) => Ok(manifest),
        Ok(Err(_)) if matches!(cache.lookup(key), Ok(ObjectState::Missing)) => Err(format!("input {upstream} ({}) is not in the cache", short_key(key))),
        Ok(Err(reason)) => {
            // Under the object's lock, so that a process recomputing it right now is not undone.
            let removed = cache.lock_object(key, &mut || {}).and_then(|_lock| match cache.verify(key)? {
                Ok(manifest) => Ok(Some(manifest)),
                Err(_) => cache.remove_object(key).map(|()| None),
            });
            match removed {
                Ok(Some(manifest)) => Ok(manifest),
                Ok(None) => Err(format!(
                    "input {upstream} ({}) is damaged in the cache: {reason}; it was removed, run again to recompute it",
                    short_key(key)
                )),
                Err(e) => Err(format!("input {upstream} ({}) is damaged in the cache: {reason}; cannot remove it: {e}", short_key(key))),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Moves a failed stage's log to `<cache>/logs/` so the user can read it; the outputs go.
fn keep_failed_log(cache: &Cache, id: &str, key: &str, tmp: &std::path::Path) -> Option<PathBuf> {
    let dir = cache.logs_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let safe: String = id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let dest = dir.join(format!("{safe}.{}.failed.log", short_key(key)));
    std::fs::rename(tmp.join(LOG_FILE), &dest).ok()?;
    Some(dest)
}

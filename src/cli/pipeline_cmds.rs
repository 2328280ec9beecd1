//! `run`, `plan`, `kinds`, `exec-stage`.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use ril_pipe::exec::key::short_key;
use ril_pipe::exec::plan::{plan as make_plan, Plan, Status};
use ril_pipe::exec::progress::StageProgress;
use ril_pipe::exec::launch::local::execute_object;
use ril_pipe::exec::launch::{FrozenStage, Outcome};
use ril_pipe::exec::progress::format_seconds;
use ril_pipe::exec::launch::slurm::SlurmConfig;
use ril_pipe::exec::{Cache, Executor, Registry, RunOptions};
use ril_pipe::pipeline::{load_for_plan, load_resolved, Override, ResolvedPipeline};

use super::PipelineArgs;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Stages run at the same time (each GPU runs one stage at a time).
    #[arg(long, short = 'j', default_value_t = 1)]
    jobs: usize,
    /// After a failure, go on with the stages that do not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Where stages run: cpu, cuda, cuda:N, or auto (CUDA when available).
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads, shared out among running stages (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bars (plain lines only).
    #[arg(long)]
    no_progress: bool,
    /// Fail at once instead of waiting when `gc` holds the cache.
    #[arg(long)]
    no_wait: bool,
    /// Where stages run: in this process, or as Slurm jobs (`sbatch`) against a cache that
    /// every node can reach.
    #[arg(long, value_enum, default_value_t = ExecutorArg::Local)]
    executor: ExecutorArg,
    /// Slurm: partition for stages whose resources name none.
    #[arg(long)]
    partition: Option<String>,
    /// Slurm: least seconds between two job-state queries.
    #[arg(long, default_value_t = 2.0)]
    poll_seconds: f64,
    /// Slurm: an extra sbatch argument for every job (repeatable), e.g. `--sbatch-arg=--account=x`.
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The stage whose outputs to copy.
    #[arg(long)]
    stage: String,
    /// The folder to write (replaced as a whole).
    #[arg(long)]
    to: PathBuf,
}

#[derive(Args)]
pub struct KindsArgs {
    /// Show one kind in full.
    kind: Option<String>,
}

#[derive(Args)]
pub struct ExecStageArgs {
    /// The frozen stage (JSON).
    spec: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    threads: Option<usize>,
}

pub fn registry() -> Registry {
    ril_pipe::stages::registry()
}

fn overrides(args: &PipelineArgs) -> anyhow::Result<Vec<Override>> {
    args.set.iter().map(|s| Override::parse(s).map_err(anyhow::Error::from)).collect()
}

pub fn resolve(args: &PipelineArgs, registry: &Registry) -> anyhow::Result<ResolvedPipeline> {
    let overrides = overrides(args)?;
    Ok(load_resolved(&args.file, &registry.schemas(), &overrides)?)
}

/// Resolves for planning: files that do not exist yet are reported, not refused.
pub fn resolve_for_plan(args: &PipelineArgs, registry: &Registry) -> anyhow::Result<ResolvedPipeline> {
    let overrides = overrides(args)?;
    Ok(load_for_plan(&args.file, &registry.schemas(), &overrides)?)
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Ctrl-C or SIGTERM: the first stops the run at the next safe point, the second exits at once.
fn install_interrupt(cancel: Arc<AtomicBool>) {
    let hits = AtomicUsize::new(0);
    let _ = ctrlc::set_handler(move || {
        if hits.fetch_add(1, Ordering::SeqCst) == 0 {
            cancel.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupted: stopping; finished stages are kept (press Ctrl-C again to quit at once)");
        } else {
            std::process::exit(130);
        }
    });
}

pub fn run(args: RunArgs, cache: &Cache) -> anyhow::Result<i32> {
    let registry = registry();
    let pipeline = resolve(&args.pipeline, &registry)?;
    ril_pipe::stages::reward_set::check_declared(&pipeline)?;
    let executor = match args.executor {
        ExecutorArg::Local => Executor::Local,
        ExecutorArg::Slurm => {
            let mut config = SlurmConfig::new(std::env::current_exe().context("cannot find the ril-pipe binary")?);
            config.partition = args.partition.clone();
            config.poll_interval = std::time::Duration::from_secs_f64(args.poll_seconds.max(0.1));
            config.device = args.device.clone();
            config.extra_args = args.sbatch_args.clone();
            Executor::Slurm(config)
        }
    };
    // With Slurm the nodes' GPUs are Slurm's to hand out; this machine's do not matter.
    let gpus = if args.executor == ExecutorArg::Slurm { Vec::new() } else { ril_pipe::stages::device::gpus_for(&args.device)? };
    let cancel = Arc::new(AtomicBool::new(false));
    install_interrupt(cancel.clone());
    let opts = RunOptions {
        jobs: args.jobs,
        keep_going: args.keep_going,
        gpus,
        threads: args.threads.unwrap_or_else(default_threads),
        progress: !args.no_progress,
        wait: !args.no_wait,
        cancel,
        executor,
    };
    eprintln!(
        "ril-pipe run {} ({} stages; cache {})",
        pipeline.source.display(),
        pipeline.stages.len(),
        cache.root().display()
    );
    let summary = ril_pipe::exec::run(&pipeline, &registry, cache, &opts)?;
    if summary.cleaned_tmp > 0 {
        eprintln!("removed {} unfinished folder(s) left by an interrupted run", summary.cleaned_tmp);
    }
    let skipped = summary.count(|o| matches!(o, Outcome::Skipped { .. }));
    eprintln!(
        "summary: {} executed, {} cached, {} failed, {} skipped, of {} unique stages ({} in the pipeline), in {}",
        summary.executed(),
        summary.cached(),
        summary.failed(),
        skipped,
        summary.outcomes.len(),
        pipeline.stages.len(),
        format_seconds(summary.seconds)
    );
    for o in &summary.outcomes {
        match &o.outcome {
            Outcome::Failed { error, log } => {
                eprintln!("  failed  {}: {error}", o.id);
                if let Some(log) = log {
                    eprintln!("          log: {}", log.display());
                }
            }
            Outcome::Skipped { reason } if skipped <= 20 => eprintln!("  skipped {}: {reason}", o.id),
            _ => {}
        }
    }
    if summary.ok() {
        super::report_cmds::publish_after_run(&pipeline, &registry, cache)?;
    }
    Ok(if summary.cancelled {
        130
    } else if summary.ok() {
        0
    } else {
        1
    })
}

pub fn plan(args: PlanArgs, cache: &Cache) -> anyhow::Result<i32> {
    let registry = registry();
    let pipeline = resolve_for_plan(&args.pipeline, &registry)?;
    ril_pipe::stages::reward_set::check_declared(&pipeline)?;
    let hasher = if cache.root().exists() {
        cache.file_hasher()
    } else {
        ril_pipe::exec::filehash::FileHasher::ephemeral()
    };
    let plan = make_plan(&pipeline, &registry, cache, &hasher)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan_json(&plan))?);
    } else {
        print_plan(&plan);
    }
    Ok(0)
}

fn status_word(s: &Status, merged: bool) -> &'static str {
    match (s, merged) {
        (_, true) => "=",
        (Status::Hit, _) => "hit",
        (Status::Miss, _) => "miss",
        (Status::Corrupt(_), _) => "damaged",
    }
}

fn print_plan(plan: &Plan) {
    let unique = plan.unique().count();
    println!(
        "pipeline {} ({}): {} stages, {} unique after merging identical stages, {} to run",
        plan.pipeline.name,
        plan.pipeline.source.display(),
        plan.stages.len(),
        unique,
        plan.to_run()
    );
    let width = plan.stages.iter().map(|s| s.stage.id.len()).max().unwrap_or(5).clamp(5, 48);
    let kind_width = plan.stages.iter().map(|s| s.stage.kind.len()).max().unwrap_or(4).max(4);
    println!("  {:<7} {:<width$} {:<kind_width$} {:<12}  WHY", "STATUS", "STAGE", "KIND", "KEY");
    for s in &plan.stages {
        let why = s.why.join("; ");
        let est = estimate_text(&s.estimate);
        println!(
            "  {:<7} {:<width$} {:<kind_width$} {:<12}  {}{}",
            status_word(&s.status, s.same_as.is_some()),
            s.stage.id,
            s.stage.kind,
            short_key(&s.key),
            why,
            if est.is_empty() { String::new() } else { format!("  [{est}]") }
        );
    }
    let counts = plan.counts_by_kind();
    let parts: Vec<String> = counts.iter().map(|(k, (n, u))| format!("{k} {u} unique of {n}")).collect();
    println!("by kind: {}", parts.join(", "));
    let mut by_method: std::collections::BTreeMap<(String, String), (usize, usize)> = std::collections::BTreeMap::new();
    for s in &plan.stages {
        if let Some(m) = s.stage.meta.get("method") {
            let c = by_method.entry((s.stage.kind.clone(), m.clone())).or_default();
            c.0 += 1;
            if s.same_as.is_none() {
                c.1 += 1;
            }
        }
    }
    if !by_method.is_empty() {
        let parts: Vec<String> = by_method.iter().map(|((k, m), (n, u))| format!("{k}/{m} {u} unique of {n}")).collect();
        println!("by method: {}", parts.join(", "));
    }
    let missing: Vec<_> = plan.stages.iter().flat_map(|s| s.stage.missing_files.iter().map(move |m| (&s.stage.id, m))).collect();
    if !missing.is_empty() {
        println!("files missing ({}; `ril-pipe run` refuses to start until they exist):", missing.len());
        for (id, m) in missing {
            println!("  {id}.{}: {}\n      {}", m.param, m.path.display(), m.doc);
        }
    }
    let flops: f64 = plan.unique().filter_map(|s| s.estimate.flops).sum();
    if flops > 0.0 {
        let peak = plan.unique().filter_map(|s| s.estimate.peak_memory_bytes).max();
        println!(
            "estimated compute: {:.3e} FLOP in all, about {:.0} GPU-hours at 100 TFLOP/s sustained (UNet only; a lower bound){}",
            flops,
            flops / 1e14 / 3600.0,
            peak.map(|p| format!("; largest stage peak memory {}", super::format_bytes(p))).unwrap_or_default()
        );
    }
}

fn estimate_text(e: &ril_pipe::exec::kind::Estimate) -> String {
    let mut parts = Vec::new();
    if let Some(note) = &e.note {
        parts.push(note.clone());
    }
    if let Some(m) = e.peak_memory_bytes {
        parts.push(format!("peak {}", super::format_bytes(m)));
    }
    parts.join(", ")
}

fn plan_json(plan: &Plan) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = plan
        .stages
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.stage.id,
                "kind": s.stage.kind,
                "key": s.key,
                "status": match &s.status { Status::Hit => "hit", Status::Miss => "miss", Status::Corrupt(_) => "damaged" },
                "same_as": s.same_as,
                "why": s.why,
                "meta": s.stage.meta,
                "params": s.stage.params,
                "inputs": s.stage.inputs,
                "missing_files": s.stage.missing_files,
                "peak_memory_bytes": s.estimate.peak_memory_bytes,
                "flops": s.estimate.flops,
            })
        })
        .collect();
    serde_json::json!({
        "name": plan.pipeline.name,
        "source": plan.pipeline.source,
        "stages": stages,
        "unique": plan.unique().count(),
        "to_run": plan.to_run(),
    })
}

pub fn kinds(args: KindsArgs) -> anyhow::Result<i32> {
    let registry = registry();
    let schemas = registry.schemas();
    for (name, schema) in &schemas {
        if args.kind.as_deref().is_some_and(|k| k != name) {
            continue;
        }
        println!("{name} (version {}): {}", schema.version, schema.doc);
        if args.kind.is_none() {
            continue;
        }
        for input in &schema.inputs {
            println!(
                "  input  {:<18} {}{} - {}",
                input.name,
                if input.required { "required" } else { "optional" },
                if input.many { ", list" } else { "" },
                input.doc
            );
        }
        for p in &schema.params {
            let default = match &p.default {
                Some(v) => format!("default {v}"),
                None => "required".to_string(),
            };
            let range = p.range.map(|r| format!(", range {r}")).unwrap_or_default();
            println!("  param  {:<18} {:?}, {default}{range} - {}", p.name, p.ty, p.doc);
        }
    }
    if let Some(k) = &args.kind {
        if !schemas.contains_key(k) {
            anyhow::bail!("unknown stage kind `{k}` (see `ril-pipe kinds`)");
        }
    }
    Ok(0)
}

pub fn exec_stage(args: ExecStageArgs, cache: &Cache) -> anyhow::Result<i32> {
    let registry = registry();
    let bytes = std::fs::read(&args.spec).with_context(|| format!("cannot read {}", args.spec.display()))?;
    let frozen: FrozenStage = serde_json::from_slice(&bytes).with_context(|| format!("{} is not a frozen stage", args.spec.display()))?;
    let kind = registry
        .get(&frozen.stage.kind)
        .with_context(|| format!("this ril-pipe has no stage kind `{}`", frozen.stage.kind))?;
    let device = ril_pipe::stages::device::gpus_for(&args.device)?.into_iter().next().unwrap_or_else(|| "cpu".into());
    let cancel = Arc::new(AtomicBool::new(false));
    install_interrupt(cancel.clone());
    let progress = StageProgress::hidden(&frozen.stage.id);
    let threads = args.threads.unwrap_or_else(default_threads);
    let (outcome, note) = execute_object(cache, kind.as_ref(), &frozen, &device, threads, cancel, progress);
    if let Some(n) = note {
        eprintln!("{n}");
    }
    match outcome {
        Outcome::Executed { seconds } => {
            eprintln!("done {} in {}", frozen.stage.id, format_seconds(seconds));
            Ok(0)
        }
        Outcome::Cached => {
            eprintln!("{} was already in the cache", frozen.stage.id);
            Ok(0)
        }
        Outcome::Failed { error, log } => {
            eprintln!("failed {}: {error}", frozen.stage.id);
            if let Some(l) = log {
                eprintln!("log: {}", l.display());
            }
            Ok(1)
        }
        Outcome::Cancelled => Ok(130),
        Outcome::Skipped { reason } => {
            eprintln!("skipped: {reason}");
            Ok(1)
        }
    }
}

pub fn export(args: ExportArgs, cache: &Cache) -> anyhow::Result<i32> {
    let registry = registry();
    let pipeline = resolve(&args.pipeline, &registry)?;
    let plan = make_plan(&pipeline, &registry, cache, &ril_pipe::exec::filehash::FileHasher::ephemeral())?;
    let object = plan.cached_object(cache, &args.stage, &args.pipeline.set)?;
    let n = ril_pipe::exec::publish::export(&object, &args.to).with_context(|| format!("cannot write {}", args.to.display()))?;
    eprintln!("exported {} ({n} files) to {}", args.stage, args.to.display());
    Ok(0)
}

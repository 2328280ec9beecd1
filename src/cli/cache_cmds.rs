//! `status`, `verify`, `gc`: looking after the cache.
use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args;
use ril_pipe::exec::cache::ObjectState;
use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::journal::Journal;
use ril_pipe::exec::key::short_key;
use ril_pipe::exec::plan::{plan as make_plan, Status};
use ril_pipe::exec::Cache;

use super::pipeline_cmds::{registry, resolve_for_plan};
use super::{format_bytes, PipelineArgs};

#[derive(Args)]
pub struct StatusArgs {
    /// A pipeline: show the state of its stages instead of the whole cache.
    file: Option<PathBuf>,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Only the objects of this pipeline (default: every object).
    file: Option<PathBuf>,
    /// Remove damaged objects, so the next run recomputes them.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
pub struct GcArgs {
    /// Keep only what these pipelines need (default: what any recorded run produced last).
    files: Vec<PathBuf>,
    /// Show what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Wait for running pipelines to finish instead of failing.
    #[arg(long)]
    wait: bool,
}

fn pipeline_args(file: &std::path::Path) -> PipelineArgs {
    PipelineArgs {
        file: file.to_path_buf(),
        set: Vec::new(),
    }
}

/// The keys of a pipeline's stages as it is written now.
fn pipeline_keys(file: &std::path::Path, cache: &Cache) -> anyhow::Result<BTreeSet<String>> {
    let registry = registry();
    let pipeline = resolve_for_plan(&pipeline_args(file), &registry)?;
    let plan = make_plan(&pipeline, &registry, cache, &FileHasher::ephemeral())?;
    Ok(plan.stages.iter().map(|s| s.key.clone()).collect())
}

pub fn status(args: StatusArgs, cache: &Cache) -> anyhow::Result<i32> {
    if let Some(file) = &args.file {
        let registry = registry();
        let pipeline = resolve_for_plan(&pipeline_args(file), &registry)?;
        let plan = make_plan(&pipeline, &registry, cache, &FileHasher::ephemeral())?;
        let unique: Vec<_> = plan.unique().collect();
        let done = unique.iter().filter(|s| s.status == Status::Hit).count();
        println!("pipeline {}: {done} of {} unique stages done ({} stages in all)", pipeline.name, unique.len(), plan.stages.len());
        for s in unique.iter().filter(|s| s.status != Status::Hit) {
            let state = match &s.status {
                Status::Corrupt(r) => format!("damaged: {r}"),
                _ => "to run".to_string(),
            };
            let partial = cache.partial_dir(&s.key).map(|d| d.exists()).unwrap_or(false);
            println!("  {:<40} {state}{}", s.stage.id, if partial { " (resumable checkpoint kept)" } else { "" });
        }
        return Ok(0);
    }
    if !cache.root().exists() {
        println!("cache {}: empty (not created yet)", cache.root().display());
        return Ok(0);
    }
    let keys = cache.list_objects()?;
    let mut bytes = 0u64;
    let mut damaged = 0usize;
    let mut by_kind: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for key in &keys {
        match cache.lookup(key)? {
            ObjectState::Done(m) => {
                let size = Cache::object_size(&m);
                bytes += size;
                let e = by_kind.entry(m.kind.clone()).or_default();
                e.0 += 1;
                e.1 += size;
            }
            _ => damaged += 1,
        }
    }
    println!("cache {}: {} objects, {}{}", cache.root().display(), keys.len(), format_bytes(bytes), if damaged > 0 { format!(", {damaged} damaged (run `ril-pipe verify --repair`)") } else { String::new() });
    for (kind, (n, size)) in &by_kind {
        println!("  {kind:<16} {n:>5} objects  {}", format_bytes(*size));
    }
    let partial = cache.list_partial();
    if !partial.is_empty() {
        println!("  {} interrupted stage(s) with resumable checkpoints", partial.len());
    }
    for (name, journal) in Journal::load_all(&cache.journal_dir()) {
        println!("  pipeline {name} ({}): {} stages recorded", journal.pipeline.display(), journal.stages.len());
    }
    Ok(0)
}

pub fn verify(args: VerifyArgs, cache: &Cache) -> anyhow::Result<i32> {
    let keys: Vec<String> = match &args.file {
        Some(file) => {
            let present: BTreeSet<String> = cache.list_objects()?.into_iter().collect();
            pipeline_keys(file, cache)?.into_iter().filter(|k| present.contains(k)).collect()
        }
        None => cache.list_objects()?,
    };
    let _lock = if args.repair {
        Some(cache.gc_lock(false, &mut |_| {})?)
    } else {
        None
    };
    let mut damaged = Vec::new();
    for key in &keys {
        if let Err(reason) = cache.verify(key)? {
            let stage = std::fs::read(cache.object_dir(key)?.join(ril_pipe::exec::cache::MANIFEST))
                .ok()
                .and_then(|b| serde_json::from_slice::<ril_pipe::exec::cache::Manifest>(&b).ok())
                .map(|m| m.stage_id)
                .unwrap_or_else(|| "?".into());
            println!("damaged {} (stage {stage}): {reason}", short_key(key));
            damaged.push(key.clone());
        }
    }
    println!("verified {} objects: {} damaged", keys.len(), damaged.len());
    if damaged.is_empty() {
        return Ok(0);
    }
    if args.repair {
        for key in &damaged {
            cache.remove_object(key)?;
        }
        println!("removed {} damaged objects; the next run recomputes them", damaged.len());
        Ok(0)
    } else {
        println!("run `ril-pipe verify --repair` to remove them (the next run recomputes them)");
        Ok(1)
    }
}

pub fn gc(args: GcArgs, cache: &Cache) -> anyhow::Result<i32> {
    if !cache.root().exists() {
        println!("cache {}: nothing to collect", cache.root().display());
        return Ok(0);
    }
    // The lock first: a run that finishes while gc waits for it records its results in the
    // journal, and those must count as referenced.
    let _lock = cache.gc_lock(args.wait, &mut |holder| eprintln!("waiting: the cache is in use by {holder}"))?;
    let roots: BTreeSet<String> = if args.files.is_empty() {
        Journal::load_all(&cache.journal_dir())
            .values()
            .flat_map(|j| j.stages.values().map(|e| e.key.clone()))
            .collect()
    } else {
        let mut keys = BTreeSet::new();
        for f in &args.files {
            keys.extend(pipeline_keys(f, cache)?);
        }
        keys
    };
    let mut removed = 0usize;
    let mut freed = 0u64;
    for key in cache.list_objects()? {
        if roots.contains(&key) {
            continue;
        }
        let (size, stage) = match cache.lookup(&key)? {
            ObjectState::Done(m) => (Cache::object_size(&m), m.stage_id.clone()),
            _ => (0, "damaged object".to_string()),
        };
        println!("{} {} ({stage}, {})", if args.dry_run { "would remove" } else { "remove" }, short_key(&key), format_bytes(size));
        if !args.dry_run {
            cache.remove_object(&key)?;
        }
        removed += 1;
        freed += size;
    }
    for key in cache.list_partial() {
        // A checkpoint is garbage when nothing needs its stage, or when its stage finished
        // (a run killed between the commit and the checkpoint's removal leaves one).
        let finished = matches!(cache.lookup(&key)?, ObjectState::Done(_));
        if !roots.contains(&key) || finished {
            println!("{} resumable checkpoint {}", if args.dry_run { "would remove" } else { "remove" }, short_key(&key));
            if !args.dry_run {
                cache.remove_partial(&key)?;
            }
        }
    }
    let tmp = if args.dry_run { 0 } else { cache.clean_stale_tmp() };
    println!(
        "{} {removed} objects ({}), kept {}{}",
        if args.dry_run { "would remove" } else { "removed" },
        format_bytes(freed),
        roots.len(),
        if tmp > 0 { format!("; cleaned {tmp} unfinished folders") } else { String::new() }
    );
    Ok(0)
}

//! `report` (publish a pipeline's report to `reports/<name>/`) and `check` (the regression gate).
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use ril_pipe::exec::publish::{cached_of_kind, ensure_of_kind, publish_objects};
use ril_pipe::exec::{atomic_write, Cache, Registry};
use ril_pipe::pipeline::ResolvedPipeline;
use ril_pipe::report::charts::file_stem;
use ril_pipe::report::check::{compare, merged_metrics, read_metrics, render, Baseline};
use ril_pipe::report::INDEX_FILE;
use ril_pipe::stages::report::KIND as REPORT_KIND;
use ril_pipe::stages::seeds_report::KIND as SEEDS_REPORT_KIND;

use super::pipeline_cmds::{registry, resolve};
use super::PipelineArgs;

/// Reports are published under this folder of the working directory, and nowhere else.
pub const REPORTS_DIR: &str = "reports";

#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The baseline file (JSON: per metric its value, direction and tolerances).
    #[arg(long)]
    baseline: PathBuf,
    /// The pipeline whose (cached) report to check.
    #[arg(required_unless_present = "metrics", conflicts_with = "metrics")]
    pipeline: Option<PathBuf>,
    /// Overrides for the pipeline, as for `run`.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "pipeline")]
    set: Vec<String>,
    /// A report's flat metrics file instead of a pipeline (e.g. reports/<name>/metrics.json).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Rewrite the baseline's values from this run (tolerances and directions are kept).
    #[arg(long)]
    update: bool,
}

/// Makes sure the report stages are computed (from cached inputs) and copies them to
/// `reports/<name>/` (several reports each into a subfolder named after its stage), with the
/// seeds report when the pipeline has one.
fn publish_pipeline(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache) -> anyhow::Result<PathBuf> {
    let mut reports = ensure_of_kind(pipeline, registry, cache, REPORT_KIND)?;
    if pipeline.stages.iter().any(|s| s.kind == SEEDS_REPORT_KIND) {
        reports.extend(ensure_of_kind(pipeline, registry, cache, SEEDS_REPORT_KIND)?);
    }
    Ok(publish_objects(&reports, Path::new(REPORTS_DIR), &pipeline.name, file_stem)?)
}

pub fn report(args: ReportArgs, cache: &Cache) -> anyhow::Result<i32> {
    let registry = registry();
    let pipeline = resolve(&args.pipeline, &registry)?;
    let dest = publish_pipeline(&pipeline, &registry, cache)?;
    println!("report: {}", dest.join(INDEX_FILE).display());
    Ok(0)
}

/// After a successful `run`: publishes the report when the pipeline has a report stage.
pub fn publish_after_run(pipeline: &ResolvedPipeline, registry: &Registry, cache: &Cache) -> anyhow::Result<()> {
    if pipeline.stages.iter().any(|s| s.kind == REPORT_KIND) {
        let dest = publish_pipeline(pipeline, registry, cache)?;
        eprintln!("report: {}", dest.join(INDEX_FILE).display());
    }
    Ok(())
}

pub fn check(args: CheckArgs, cache: &Cache) -> anyhow::Result<i32> {
    let baseline = Baseline::read(&args.baseline)?;
    let run = match (&args.metrics, &args.pipeline) {
        (Some(path), _) => read_metrics(path)?,
        (None, Some(file)) => {
            let registry = registry();
            let pipeline = resolve(
                &PipelineArgs {
                    file: file.clone(),
                    set: args.set.clone(),
                },
                &registry,
            )?;
            merged_metrics(cached_of_kind(&pipeline, &registry, cache, REPORT_KIND)?.iter().map(|r| r.dir.as_path()))?
        }
        (None, None) => anyhow::bail!("give a pipeline or --metrics FILE"),
    };
    let comparisons = compare(&baseline, &run);
    print!("{}", render(&comparisons));
    let missing = comparisons.iter().filter(|c| c.now.is_none()).count();
    if args.update {
        let doc = baseline.updated(&run);
        let mut text = serde_json::to_string_pretty(&doc)?;
        text.push('\n');
        atomic_write(&args.baseline, text.as_bytes()).with_context(|| format!("cannot write {}", args.baseline.display()))?;
        println!("updated {} value(s) in {}", comparisons.len() - missing, args.baseline.display());
        return Ok(if missing > 0 { 1 } else { 0 });
    }
    Ok(if comparisons.iter().any(|c| c.verdict.fails()) { 1 } else { 0 })
}

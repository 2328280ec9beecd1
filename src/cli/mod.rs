//! Subcommands. Exit codes: 0 success, 1 a stage failed or a check found problems, 2 bad
//! input (pipeline, arguments), 130 interrupted.
mod bench_cmds;
mod cache_cmds;
mod lora_cmds;
mod model_cmds;
mod pipeline_cmds;
mod report_cmds;
mod sample_cmds;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ril-pipe", version, about = "Declarative pipelines for Reward Incremental Learning research on text-to-image diffusion models")]
struct Cli {
    #[command(flatten)]
    cache: CacheArg,
    #[command(subcommand)]
    command: Command,
}

/// `--cache DIR`: one option of the whole command line, accepted before the subcommand or after.
#[derive(Args, Clone)]
pub struct CacheArg {
    /// The cache folder (created on demand).
    #[arg(long, env = "RIL_CACHE", default_value = "cache", global = true)]
    pub cache: PathBuf,
}

#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline file (YAML).
    pub file: PathBuf,
    /// Override a value: `vars.NAME=V`, `defaults.KIND.PARAM=V` or `STAGE.PARAM=V` (STAGE may be
    /// a glob such as `ft/*/AHC/1`). V is read as YAML.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: every stage whose result is not cached, in dependency order.
    Run(pipeline_cmds::RunArgs),
    /// Show the expanded pipeline: stages in order, cache hits and misses and why.
    Plan(pipeline_cmds::PlanArgs),
    /// List the stage kinds and their parameters.
    Kinds(pipeline_cmds::KindsArgs),
    /// Run one frozen stage (written by the Slurm executor); not for direct use.
    #[command(hide = true)]
    ExecStage(pipeline_cmds::ExecStageArgs),
    /// Copy a finished stage's outputs out of the cache into a folder (replaced atomically).
    Export(pipeline_cmds::ExportArgs),
    /// Summarise the cache, or the state of a pipeline's stages in it.
    Status(cache_cmds::StatusArgs),
    /// Check the hashes of cached objects; damaged ones are reported (and removed with --repair).
    Verify(cache_cmds::VerifyArgs),
    /// Remove cached objects that no pipeline references.
    Gc(cache_cmds::GcArgs),
    /// Make a pipeline's report (from cached results) and publish it to reports/<name>/.
    Report(report_cmds::ReportArgs),
    /// Compare a run's metrics with a baseline file; exit 1 on a regression beyond tolerance.
    Check(report_cmds::CheckArgs),
    /// Images from the model of a cached stage, for any prompts, with the evaluation's seeds.
    Sample(sample_cmds::SampleArgs),
    /// A cached model's LoRA adapters as files diffusers loads (`lora export`).
    Lora(lora_cmds::LoraArgs),
    /// Check checkpoints (`model inspect`) and run single components (`model run`).
    Model(model_cmds::ModelArgs),
    /// Time one last-step training update on a UNet with random weights (for scripts/gpu_check.sh).
    #[command(hide = true)]
    BenchStep(bench_cmds::BenchStepArgs),
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let cache = ril_pipe::exec::Cache::new(&cli.cache.cache);
    let result = match cli.command {
        Command::Run(a) => pipeline_cmds::run(a, &cache),
        Command::Plan(a) => pipeline_cmds::plan(a, &cache),
        Command::Kinds(a) => pipeline_cmds::kinds(a),
        Command::ExecStage(a) => pipeline_cmds::exec_stage(a, &cache),
        Command::Export(a) => pipeline_cmds::export(a, &cache),
        Command::Status(a) => cache_cmds::status(a, &cache),
        Command::Verify(a) => cache_cmds::verify(a, &cache),
        Command::Gc(a) => cache_cmds::gc(a, &cache),
        Command::Report(a) => report_cmds::report(a, &cache),
        Command::Check(a) => report_cmds::check(a, &cache),
        Command::Sample(a) => sample_cmds::sample(a, &cache),
        Command::Lora(a) => lora_cmds::main(a, &cache),
        Command::Model(a) => model_cmds::main(a),
        Command::BenchStep(a) => bench_cmds::bench_step(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ril_pipe::pipeline::PipelineError>().is_some() {
                2
            } else {
                1
            }
        }
    }
}

/// Human-readable byte counts.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

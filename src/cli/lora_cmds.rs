//! `lora export`: a model's adapters as diffusers LoRA files. The work is in `stages::lora_export`.
use std::path::PathBuf;

use clap::{Args, Subcommand};
use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::plan as make_plan;
use ril_pipe::exec::Cache;
use ril_pipe::stages::lora_export::export_lora;

use super::pipeline_cmds::{registry, resolve};
use super::PipelineArgs;

#[derive(Args)]
pub struct LoraArgs {
    #[command(subcommand)]
    command: LoraCommand,
}

#[derive(Subcommand)]
enum LoraCommand {
    /// Write the LoRA adapters of a cached model (finetune, soup, joint) as files diffusers
    /// loads with `pipe.load_lora_weights(DIR, weight_name=...)`, with adapters.json giving the
    /// weights for `pipe.set_adapters`.
    Export(ExportArgs),
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The stage whose model to export (it must be in the cache; nothing is computed).
    stage: String,
    /// The folder to write (replaced as a whole).
    #[arg(long)]
    out: PathBuf,
    /// Also write merged.safetensors: the whole group as one LoRA (ranks concatenated, weights
    /// folded in), for tools that take a single LoRA.
    #[arg(long)]
    merged: bool,
}

pub fn main(args: LoraArgs, cache: &Cache) -> anyhow::Result<i32> {
    match args.command {
        LoraCommand::Export(a) => export(a, cache),
    }
}

fn export(args: ExportArgs, cache: &Cache) -> anyhow::Result<i32> {
    let registry = registry();
    let pipeline = resolve(&args.pipeline, &registry)?;
    let plan = make_plan(&pipeline, &registry, cache, &FileHasher::ephemeral())?;
    let object = plan.cached_object(cache, &args.stage, &args.pipeline.set)?;
    let summary = export_lora(&object, &args.stage, &args.out, args.merged)?;
    println!("exported {} adapter{} of `{}` ({}) to {}:", summary.index.adapters.len(), if summary.index.adapters.len() == 1 { "" } else { "s" }, args.stage, summary.index.origin, args.out.display());
    for a in summary.index.adapters.iter().chain(&summary.index.merged) {
        let task = a.task.as_deref().map(|t| format!(", task {t}")).unwrap_or_default();
        println!("  {:<28} rank {:>3}, alpha {}, set_adapters weight {}{task}", a.weight_name, a.rank, a.alpha, a.weight);
    }
    println!("  {}", ril_pipe::models::lora::peft::INDEX_FILE);
    Ok(0)
}

//! `sample`: images from the model of a cached stage. The work is in `stages::sample`.
use std::path::PathBuf;

use clap::Args;
use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::plan as make_plan;
use ril_pipe::exec::progress::StageProgress;
use ril_pipe::exec::Cache;
use ril_pipe::stages::device::{gpus_for, tch_device};
use ril_pipe::pipeline::params::check_param;
use ril_pipe::stages::evaluate::{EvaluateParams, SamplingSettings};
use ril_pipe::models::precision::Precision;
use ril_pipe::stages::sample::{sample_model, SampleRequest};
use ril_pipe::stages::world::{read_prompts, ModelRecord};

use super::pipeline_cmds::{registry, resolve};
use super::PipelineArgs;

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The stage whose model to sample: a world, finetune, soup or joint stage of the pipeline,
    /// already in the cache (nothing is computed).
    stage: String,
    /// A prompt (repeatable); images of prompt j are p<j>_s<k>.png.
    #[arg(long = "prompt", value_name = "TEXT")]
    prompts: Vec<String>,
    /// A file of prompts, one a line (after the --prompt ones). The world's test prompts with
    /// --n = the evaluation's images_per_prompt give the evaluation's images.
    #[arg(long = "prompts", value_name = "FILE")]
    prompts_file: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Seed of the initial noise (default: the evaluation's; image i of the run starts from the
    /// noise of the evaluation's image i).
    #[arg(long)]
    seed: Option<u64>,
    /// Classifier-free guidance scale (default: the evaluation's).
    #[arg(long)]
    guidance: Option<f64>,
    /// DDIM steps (default: the evaluation's).
    #[arg(long)]
    steps: Option<usize>,
    /// Images sampled at once (default: the evaluation's batch size, which the bitwise
    /// reproduction of its images needs).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Dtype of the frozen models: fp32, fp16 or bf16 (default: the evaluation's).
    #[arg(long)]
    precision: Option<String>,
    /// cpu, cuda, cuda:N, or auto (the first GPU when CUDA is available).
    #[arg(long, default_value = "auto")]
    device: String,
    /// The folder to write: one PNG per image, grid.png, samples.json.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar (plain lines only).
    #[arg(long)]
    no_progress: bool,
}

pub fn sample(args: SampleArgs, cache: &Cache) -> anyhow::Result<i32> {
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.prompts_file {
        prompts.extend(read_prompts(file)?);
    }
    if prompts.is_empty() {
        anyhow::bail!("no prompts: give --prompt TEXT (repeatable) or --prompts FILE (one prompt a line; the world's test prompts reproduce its evaluation)");
    }
    if args.n == 0 {
        anyhow::bail!("--n must be at least 1");
    }
    let registry = registry();
    let pipeline = resolve(&args.pipeline, &registry)?;
    let plan = make_plan(&pipeline, &registry, cache, &FileHasher::ephemeral())?;
    let object = plan.cached_object(cache, &args.stage, &args.pipeline.set)?;
    ModelRecord::of_object(&object, &args.stage)?;

    let (mut settings, from) = SamplingSettings::of_pipeline(&pipeline, &args.stage)?;
    if let Some(seed) = args.seed {
        settings.seed = seed;
    }
    // The flags obey the ranges of the evaluation's parameters they stand for.
    let check = |flag: &str, param: &str, value: serde_json::Value| check_param::<EvaluateParams>(param, &value).map_err(|e| anyhow::anyhow!("{flag}: {e}"));
    if let Some(g) = args.guidance {
        check("--guidance", "guidance", g.into())?;
        settings.sampler.guidance = g;
    }
    if let Some(steps) = args.steps {
        check("--steps", "ddim_steps", steps.into())?;
        settings.sampler.steps = steps;
    }
    if let Some(b) = args.batch_size {
        check("--batch-size", "batch_size", b.into())?;
        settings.batch_size = b;
    }
    if let Some(p) = &args.precision {
        settings.precision = Precision::parse(p).ok_or_else(|| anyhow::anyhow!("--precision {p}: expected fp32, fp16 or bf16"))?;
    }
    let device = gpus_for(&args.device)?.first().map(|g| tch_device(g)).unwrap_or(tch::Device::Cpu);
    let s = &settings.sampler;
    eprintln!(
        "sampling `{}`: {} prompt{} x {} image{}, seed {}, {} DDIM steps, eta {}, guidance {}, batch {}, {} on {device:?} (settings of {})",
        args.stage,
        prompts.len(),
        if prompts.len() == 1 { "" } else { "s" },
        args.n,
        if args.n == 1 { "" } else { "s" },
        settings.seed,
        s.steps,
        s.eta,
        s.guidance,
        settings.batch_size,
        settings.precision.name(),
        from.as_deref().map(|id| format!("`{id}`")).unwrap_or_else(|| "the evaluate kind's defaults".into()),
    );
    let request = SampleRequest { stage: &args.stage, prompts: &prompts, per_prompt: args.n, settings, device };
    let progress = StageProgress::standalone("sample", !args.no_progress);
    let summary = sample_model(&object, &request, &args.out, &progress)?;
    println!("wrote {} images, {} and {} to {}", summary.images.len(), ril_pipe::stages::sample::GRID_FILE, ril_pipe::stages::sample::MANIFEST_FILE, args.out.display());
    if let Some(note) = summary.grid_note {
        println!("note: {note}");
    }
    Ok(0)
}

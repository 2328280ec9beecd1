//! The glue of the training stages `finetune` and `joint`: their shared parameters, the memory
//! check, and the run of [`crate::method::train`] on the input model with the stage's seed,
//! progress, cancellation and resume folder; the outputs (model.json, adapters, teacher, log,
//! summary).
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use tch::Tensor;

use crate::exec::kind::Estimate;
use crate::exec::{StageContext, StageError};
use crate::method::noise;
use crate::method::objective::{Backprop, Distill, Objective};
use crate::method::optim::AdamWConfig;
use crate::method::sampling::Sampler;
use crate::method::train::{self as method_train, AdapterChoice, TrainInputs, TrainSettings};
use crate::models::lora::LoraInit;
use crate::models::precision::Precision;
use crate::records::{write_json, Task, TrainSummary, TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE};
use crate::rewards::Reward;
use crate::pipeline::params::StageParams;
use crate::pipeline::{ResolvedPipeline, ResolvedStage};
use crate::stage_params;

use super::estimate;
use super::memory::{self, Job, TrainStep};
use super::monitor::StageMonitor;
use super::params::{precision_param, SamplerParams};
use super::world::{read_prompts, ModelRecord, ADAPTERS_FILE};

stage_params! {
    /// Parameters common to every training stage (AlignProp's recipe as defaults).
    pub struct TrainParams {
        pub epochs: u64 = param(1).min(1).doc("epochs; an epoch is `prompts_per_epoch` prompts (default: every training prompt once)"),
        pub prompts_per_epoch: usize = param(0).min(0).doc("prompts per epoch; 0 = the number of training prompts"),
        pub batch_size: usize = param(8).min(1).doc("prompts per optimizer step (paper: baseline 128, RID 8)"),
        pub micro_batch: usize = param(0).min(0).doc("prompts per forward pass, gradients accumulated over the batch; 0 = the batch"),
        pub lr: f64 = param(5e-5).min(0).max(1).doc("AdamW learning rate (paper: baseline 1e-3, RID 5e-5; 0 keeps the adapter at its initialisation)"),
        pub weight_decay: f64 = param(0.1).min(0).doc("AdamW decoupled weight decay (AlignProp: 0.1)"),
        pub beta1: f64 = param(0.9).min(0).max_exclusive(1).doc("AdamW beta1"),
        pub beta2: f64 = param(0.999).min(0).max_exclusive(1).doc("AdamW beta2"),
        pub adam_eps: f64 = param(1e-8).min_exclusive(0).doc("AdamW epsilon"),
        pub grad_clip: f64 = param(5.0).min_exclusive(0).doc("gradient-norm clip (AlignProp: 5.0)"),
        pub sampler: SamplerParams = flatten(),
        pub lora_rank: i64 = param(4).min(1).doc("rank of the new adapter (paper: 4)"),
        pub lora_init: LoraInit = param(LoraInit::KaimingUniform).doc("initialisation of the adapter's down matrix A (B starts at zero)"),
        pub seed: u64 = param(0).min(0).doc("seed of prompts order, initial noise and adapter initialisation; each stage derives its streams from it and the input model's place in the sequence (its origin and tasks so far), so consecutive tasks differ, variants at the same place compare paired, and a rerun repeats"),
        pub checkpoint_every: u64 = param(20).min(1).doc("optimizer steps between resumable checkpoints"),
        pub grad_checkpointing: bool = param(false).doc("decode and score `decode_chunk` samples at a time on a detached z_0 and push the collected gradient through the last UNet call (AlignProp, DRaFT): the decode's graph of one chunk is alive at a time; same gradients"),
        pub decode_chunk: usize = param(1).min(1).doc("samples decoded and scored at once with `grad_checkpointing`"),
        pub precision: Precision = precision_param(),
    }
}

impl TrainParams {
    /// Prompts per forward pass (the batch when `micro_batch` is 0).
    pub fn micro(&self) -> usize {
        match self.micro_batch {
            0 => self.batch_size,
            m => m.min(self.batch_size),
        }
    }

    /// How `grad_checkpointing` and `decode_chunk` differentiate the decode.
    pub fn backprop(&self) -> Backprop {
        if self.grad_checkpointing {
            Backprop::Checkpointed { chunk: self.decode_chunk }
        } else {
            Backprop::Whole
        }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { lr: self.lr, beta1: self.beta1, beta2: self.beta2, eps: self.adam_eps, weight_decay: self.weight_decay }
    }
}

/// What a training stage optimises.
pub struct TrainSpec {
    /// `baseline`, `rid` or `joint`.
    pub method: String,
    pub objective: Objective,
    /// RID's EMA momentum alpha (Eq. 6); unused otherwise.
    pub ema_momentum: f64,
    pub tasks: Vec<Task>,
    /// Add a new adapter (the paper), or keep training the input's newest one when it has one.
    pub new_adapter: bool,
    pub reward: Box<dyn Reward>,
    pub params: TrainParams,
}

/// Logs the training stage's peak-memory estimate and, on a GPU, fails when it exceeds the free
/// memory: called before any model (the reward's included) is loaded.
pub fn check_memory(ctx: &StageContext, model: &ModelRecord, adapters: Option<&Path>, params: &TrainParams, objective: &Objective, tasks: Vec<Task>) -> Result<(), StageError> {
    // A bad adapter file fails when it is loaded, with its own message.
    let earlier_ranks = adapters.map_or(0, |path| memory::adapter_file_ranks(path).unwrap_or(0));
    let job = training_job(params, objective, tasks, earlier_ranks);
    memory::check_fits(ctx, &model.world, &model.lora_targets, &job, params.precision)
}

/// The resumable checkpoint in the stage's resume folder.
const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Trains (see [`crate::method::train`]) and writes model.json, the adapters, the teacher, the log and
/// the summary into the output.
pub fn train(ctx: &mut StageContext, spec: TrainSpec, model: &ModelRecord, adapters: Option<&Path>) -> Result<(), StageError> {
    let p = &spec.params;
    let device = super::device::tch_device(&ctx.device);
    tch::set_num_threads(ctx.threads.max(1) as i32);
    // Each task draws its own numbers: the seed is derived from the input model's place in the
    // sequence (its origin and the tasks it has learnt). Stages at the same place (the baseline
    // and RID, or an ablation's variants) draw the same numbers, so they compare paired.
    let place = format!("{}:{}", model.origin, model.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(","));
    let seed = noise::derive_seed(p.seed, &place);
    let diffusion = model.load_diffusion(adapters, device, p.precision)?;
    let choice = if spec.new_adapter { AdapterChoice::New { rank: p.lora_rank, init: p.lora_init } } else { AdapterChoice::Newest { rank: p.lora_rank, init: p.lora_init } };
    let adapter_index = method_train::prepare_adapter(&diffusion.lora, choice, &spec.objective, seed).map_err(stage_error)?;
    let sampler = Sampler::new(diffusion.ddim.clone(), p.sampler.config()).map_err(StageError::failed)?;
    let prompts = read_prompts(&model.world.train_prompts)?;
    let settings = TrainSettings {
        objective: spec.objective,
        backprop: p.backprop(),
        ema_momentum: spec.ema_momentum,
        adamw: p.adamw(),
        grad_clip: p.grad_clip,
        epochs: p.epochs,
        prompts_per_epoch: match p.prompts_per_epoch {
            0 => prompts.len(),
            n => n,
        },
        batch: p.batch_size,
        micro: p.micro(),
        checkpoint_every: p.checkpoint_every,
        seed,
    };
    let total_steps = settings.total_steps();
    ctx.log(format!(
        "{} on {}: adapter {} (rank {}), {} steps ({} epochs x {}), batch {} (micro {}), N={}, {} frozen models on {device:?}",
        spec.method,
        spec.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join("+"),
        adapter_index,
        p.lora_rank,
        total_steps,
        settings.epochs,
        settings.steps_per_epoch(),
        settings.batch,
        settings.micro,
        sampler.config.steps,
        p.precision.name()
    ));

    let started = Instant::now();
    let checkpoint = ctx.resume_dir()?.join(CHECKPOINT_FILE);
    let inputs = TrainInputs { diffusion: &diffusion, sampler: &sampler, reward: spec.reward.as_ref(), prompts: &prompts };
    let trained = method_train::train(&inputs, &settings, &checkpoint, &mut StageMonitor::new(ctx, total_steps as usize)).map_err(stage_error)?;

    let out = ctx.out_dir().to_path_buf();
    let lora = &diffusion.lora;
    lora.save(&out.join(ADAPTERS_FILE)).map_err(StageError::failed)?;
    if matches!(spec.objective, Objective::Rid { .. }) {
        let teacher: Vec<(String, Tensor)> = lora.named_tensors().into_iter().filter(|(n, _)| n.contains(".teacher.")).collect();
        Tensor::write_safetensors(&teacher, out.join("teacher.safetensors")).map_err(StageError::failed)?;
    }
    let mut file = std::fs::File::create(out.join(TRAIN_LOG_FILE))?;
    for line in &trained.log {
        writeln!(file, "{}", serde_json::to_string(line).map_err(StageError::failed)?)?;
    }
    let summary = TrainSummary::of_log(&spec.method, &spec.tasks, &trained.log, settings.epochs, total_steps, settings.batch as u64);
    write_json(&out.join(TRAIN_SUMMARY_FILE), &summary)?;
    let mut record = model.clone();
    record.tasks.extend(spec.tasks.iter().cloned());
    record.origin = if spec.method == "joint" { "joint".into() } else { "finetune".into() };
    record.adapters = Some(ADAPTERS_FILE.into());
    record.write(&out)?;
    ctx.log(format!(
        "trained in {:.1}s ({:.2}s/step): reward {:.5} (first epoch) -> {:.5} (last epoch)",
        started.elapsed().as_secs_f64(),
        summary.seconds / (total_steps - trained.resumed_at).max(1) as f64,
        summary.reward_first_epoch,
        summary.reward_last_epoch
    ));
    Ok(())
}

/// The memory-relevant settings of a `finetune` or `joint` stage.
pub fn training_job(params: &TrainParams, objective: &Objective, tasks: Vec<Task>, earlier_ranks: i64) -> Job {
    let teacher = match objective {
        Objective::Rid { space, .. } => Some(*space),
        Objective::Baseline => None,
    };
    Job::Train {
        tasks,
        step: TrainStep {
            micro: params.micro() as i64,
            guided: params.sampler.guided(),
            rank: params.lora_rank,
            earlier_ranks,
            teacher,
            decode_chunk: params.grad_checkpointing.then_some(params.decode_chunk as i64),
        },
    }
}

/// The summed adapter rank of the model a stage writes.
fn model_ranks(stage: &ResolvedStage, pipeline: &ResolvedPipeline, depth: usize) -> i64 {
    if depth > 64 {
        return 0;
    }
    // A training stage adds its adapter to its input model's; a stage of several input models
    // (a soup) holds all of theirs; a world has none.
    match TrainParams::from_params(&stage.params) {
        Ok(train) => train.lora_rank + input_ranks(stage, pipeline, "model", depth),
        Err(_) => input_ranks(stage, pipeline, "models", depth),
    }
}

pub fn input_ranks(stage: &ResolvedStage, pipeline: &ResolvedPipeline, input: &str, depth: usize) -> i64 {
    estimate::input_stage(stage, pipeline, input).into_iter().map(|s| model_ranks(s, pipeline, depth + 1)).sum()
}

/// Training: per prompt, N-1 guided no-grad forwards (2 samples each), one guided forward with
/// gradient (about 3x: forward and backward), RID's teacher forward (or its full trajectory).
pub fn training_estimate(stage: &ResolvedStage, pipeline: &ResolvedPipeline, p: &TrainParams, objective: &Objective, tasks: Vec<Task>) -> Estimate {
    let world = estimate::upstream_world(stage, pipeline);
    let Some((cfg, side)) = world.as_ref().ok().and_then(|(w, _)| w.unet_and_latent_side()) else {
        return Estimate::default();
    };
    let forward = estimate::unet_forward_flops(&cfg, side, 77);
    let n = p.sampler.ddim_steps as f64;
    let guided = if p.sampler.guided() { 2.0 } else { 1.0 };
    let teacher = match objective {
        Objective::Rid { distill: Distill::FullStep, .. } => n * guided,
        Objective::Rid { distill: Distill::LastStep, .. } => guided,
        Objective::Baseline => 0.0,
    };
    let per_prompt = forward * ((n - 1.0) * guided + 3.0 * guided + teacher);
    let batch = p.batch_size as i64;
    let per_epoch = match p.prompts_per_epoch {
        0 => world.as_ref().map_err(Clone::clone).and_then(|(w, _)| estimate::prompt_count(&w.train_prompts)),
        n => Ok(n as i64),
    };
    let per_epoch = match per_epoch {
        Ok(n) => n,
        Err(reason) => return Estimate { note: Some(format!("prompts per epoch unknown: {reason}")), ..Estimate::default() },
    };
    let steps = p.epochs as i64 * ((per_epoch + batch - 1) / batch);
    let job = training_job(p, objective, tasks, input_ranks(stage, pipeline, "model", 0));
    let memory = estimate::peak_memory(&world, &job, p.precision);
    Estimate {
        flops: Some(per_prompt * (steps * batch) as f64),
        peak_memory_bytes: memory.as_ref().ok().copied(),
        note: estimate::with_memory(format!("{steps} steps x {batch} prompts, N={n}"), &memory),
    }
}

/// Errors of training as stage errors (a cancelled run stays a cancellation).
fn stage_error(e: method_train::TrainError) -> StageError {
    match e {
        method_train::TrainError::Cancelled => StageError::Cancelled,
        other => StageError::failed(other),
    }
}

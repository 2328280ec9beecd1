//! The fine-tuning loop shared by `finetune` and `joint`: a new LoRA adapter on the input model,
//! trained with truncated backprop through DDIM sampling; RID adds the EMA teacher and the
//! last-step distillation. Resumable: state is checkpointed into the stage's resume folder.
use std::collections::HashMap;
use std::io::Write as _;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::exec::{atomic_write, StageContext, StageError};
use crate::method::noise;
use crate::method::objective::{Backprop, MicroBatch, Objective, Parts, Step};
use crate::method::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::method::sampling::{CastUnet, Sampler};
use crate::models::lora::LoraInit;
use crate::rewards::Reward;
use crate::stage_params;

use super::memory;
use super::params::{precision_param, SamplerParams};
use crate::models::precision::Precision;
use crate::records::{Task, TrainLogLine, TrainSummary, TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE};
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

#[derive(Serialize, Deserialize)]
struct ResumeState {
    step: u64,
    /// The checkpoint folder (inside the resume folder) holding the tensors of `step`.
    folder: String,
    log: Vec<TrainLogLine>,
}

const RESUME_STATE: &str = "state.json";
const RESUME_ADAPTERS: &str = "adapters.safetensors";
const RESUME_OPTIM: &str = "optimizer.safetensors";

/// Purposes of the noise streams of a training stage.
const STREAM_LATENTS: u32 = 10;

/// Logs the training stage's peak-memory estimate and, on a GPU, fails when it exceeds the free
/// memory: called before any model (the reward's included) is loaded.
pub fn check_memory(ctx: &StageContext, model: &ModelRecord, adapters: Option<&std::path::Path>, params: &TrainParams, objective: &Objective, tasks: Vec<Task>) -> Result<(), StageError> {
    // A bad adapter file fails when it is loaded, with its own message.
    let earlier_ranks = adapters.map_or(0, |path| memory::adapter_file_ranks(path).unwrap_or(0));
    let job = memory::training_job(params, objective, tasks, earlier_ranks);
    memory::check_fits(ctx, &model.world, &model.lora_targets, &job, params.precision)
}

/// Runs the training; writes model.json, adapters, teacher, log and summary into the output.
pub fn train(ctx: &mut StageContext, spec: TrainSpec, model: &ModelRecord, adapters: Option<&std::path::Path>) -> Result<(), StageError> {
    let p = &spec.params;
    let device = super::device::tch_device(&ctx.device);
    tch::set_num_threads(ctx.threads.max(1) as i32);
    // Each task draws its own numbers: the seed is derived from the input model's place in the
    // sequence (its origin and the tasks it has learnt). Stages at the same place (the baseline
    // and RID, or an ablation's variants) draw the same numbers, so they compare paired.
    let place = format!("{}:{}", model.origin, model.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(","));
    let seed = noise::derive_seed(p.seed, &place);
    let precision = p.precision;
    let diffusion = model.load_diffusion(adapters, device, precision)?;
    let lora = &diffusion.lora;
    let adapter_index = match lora.num_adapters() {
        n if n > 0 && !spec.new_adapter => n - 1,
        _ => lora.add_adapter(p.lora_rank, p.lora_init, seed).map_err(StageError::failed)?,
    };
    let rid = matches!(spec.objective, Objective::Rid { .. });
    if rid {
        lora.init_teacher().map_err(StageError::failed)?;
    }
    let sampler = Sampler::new(diffusion.ddim.clone(), p.sampler.config()).map_err(StageError::failed)?;
    let prompts = read_prompts(&model.world.train_prompts)?;
    let batch = p.batch_size;
    let micro = p.micro();
    let per_epoch = match p.prompts_per_epoch {
        0 => prompts.len(),
        n => n,
    };
    let epochs = p.epochs;
    let steps_per_epoch = per_epoch.div_ceil(batch) as u64;
    let total_steps = epochs * steps_per_epoch;
    let clip = p.grad_clip;
    let checkpoint_every = p.checkpoint_every;
    let config = p.adamw();

    // Resume from the last checkpoint of this exact stage, if an earlier run was interrupted.
    let resume_dir = ctx.resume_dir()?.to_path_buf();
    let mut log: Vec<TrainLogLine> = Vec::new();
    let mut start = 0u64;
    let state_path = resume_dir.join(RESUME_STATE);
    let resumed = match std::fs::read(&state_path).ok().and_then(|b| serde_json::from_slice::<ResumeState>(&b).ok()) {
        Some(state) => {
            lora.load(&resume_dir.join(&state.folder).join(RESUME_ADAPTERS)).map_err(StageError::failed)?;
            start = state.step;
            log = state.log;
            Some(state.folder)
        }
        None => None,
    };
    let mut opt = AdamW::new(lora.trainable_tensors(), config);
    if let Some(folder) = &resumed {
        let named: HashMap<String, Tensor> = Tensor::read_safetensors(resume_dir.join(folder).join(RESUME_OPTIM)).map_err(StageError::failed)?.into_iter().collect();
        opt.load_state(&named).ok_or_else(|| StageError::Failed("the resumable checkpoint does not fit this stage; remove it with `ril-pipe gc`".into()))?;
        ctx.log(format!("resumed at step {start} of {total_steps}"));
    }
    ctx.log(format!(
        "{} on {}: adapter {} (rank {}), {} steps ({} epochs x {}), batch {batch} (micro {micro}), N={}, {} frozen models on {device:?}",
        spec.method,
        spec.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join("+"),
        adapter_index,
        p.lora_rank,
        total_steps,
        epochs,
        steps_per_epoch,
        sampler.config.steps,
        precision.name()
    ));

    let uncond = diffusion.uncond()?;
    let decode = |z: &Tensor| diffusion.decode(z);
    let reward = |images: &Tensor, prompts: &[String]| spec.reward.score(images, prompts).map_err(|e| e.to_string());
    let denoiser = CastUnet::of(&diffusion);
    let method_step = Step {
        objective: spec.objective,
        backprop: p.backprop(),
        sampler: &sampler,
        parts: Parts { model: &denoiser, lora, decode: &decode, reward: &reward },
    };
    let started = Instant::now();
    ctx.progress.set_length(total_steps);
    ctx.progress.inc(start);
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = u64::MAX;
    for step in start..total_steps {
        ctx.check_cancelled()?;
        let step_started = Instant::now();
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = (0..prompts.len()).collect();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            rng.set_stream(epoch + 1);
            order.shuffle(&mut rng);
            order_epoch = epoch;
        }
        let in_epoch = (step % steps_per_epoch) as usize;
        let batch_prompts: Vec<String> = (0..batch).map(|k| prompts[order[(in_epoch * batch + k) % order.len()]].clone()).collect();
        let mut reward_sum = 0.0;
        let mut distill_sum = 0.0;
        let mut loss_sum = 0.0;
        for (m, chunk) in batch_prompts.chunks(micro).enumerate() {
            let cond = diffusion.encode_prompts(chunk)?;
            let first = step * batch as u64 + (m * micro) as u64;
            let z_n = Tensor::cat(
                &(0..chunk.len() as u64)
                    .map(|k| noise::gaussian(seed, noise::stream(STREAM_LATENTS, first + k), &[1, diffusion.latent_shape[0], diffusion.latent_shape[1], diffusion.latent_shape[2]], device))
                    .collect::<Vec<_>>(),
                0,
            );
            let micro_batch = MicroBatch { cond: &cond, uncond: &uncond, prompts: chunk, seed: seed ^ (first << 8) };
            let weight = chunk.len() as f64 / batch as f64;
            let out = method_step.micro_batch_backward(&micro_batch, &z_n, weight).map_err(StageError::failed)?;
            if !out.loss.is_finite() || !out.reward.is_finite() {
                return Err(StageError::Failed(format!(
                    "non-finite training values at step {} (loss {}, reward {}); nothing was cached",
                    step + 1,
                    out.loss,
                    out.reward
                )));
            }
            reward_sum += out.reward * weight;
            distill_sum += out.distill.unwrap_or(0.0) * weight;
            loss_sum += out.loss * weight;
        }
        let grad_norm = clip_grad_norm(opt.params(), clip);
        if !grad_norm.is_finite() {
            return Err(StageError::Failed(format!("non-finite gradient norm at step {}: {grad_norm}; nothing was cached", step + 1)));
        }
        opt.step();
        opt.zero_grad();
        if let Objective::Rid { .. } = spec.objective {
            lora.ema_update(spec.ema_momentum).map_err(StageError::failed)?;
        }
        log.push(TrainLogLine {
            step: step + 1,
            epoch: epoch + 1,
            reward: reward_sum,
            distill_loss: rid.then_some(distill_sum),
            loss: loss_sum,
            grad_norm,
            lr: config.lr,
            seconds: step_started.elapsed().as_secs_f64(),
        });
        ctx.progress.inc(1);
        if (step + 1) % checkpoint_every == 0 && step + 1 < total_steps {
            save_resume(&resume_dir, lora, &opt, step + 1, &log)?;
        }
        if (step + 1) % steps_per_epoch == 0 {
            let epoch_lines = &log[log.len() - (steps_per_epoch as usize).min(log.len())..];
            let mean = epoch_lines.iter().map(|l| l.reward).sum::<f64>() / epoch_lines.len() as f64;
            ctx.log(format!("epoch {}/{epochs}: mean reward {mean:.5}", epoch + 1));
        }
    }
    let out = ctx.out_dir().to_path_buf();
    lora.save(&out.join(ADAPTERS_FILE)).map_err(StageError::failed)?;
    if rid {
        let teacher: Vec<(String, Tensor)> = lora.named_tensors().into_iter().filter(|(n, _)| n.contains(".teacher.")).collect();
        Tensor::write_safetensors(&teacher, out.join("teacher.safetensors")).map_err(StageError::failed)?;
    }
    let mut file = std::fs::File::create(out.join(TRAIN_LOG_FILE))?;
    for line in &log {
        writeln!(file, "{}", serde_json::to_string(line).map_err(StageError::failed)?)?;
    }
    let epoch_mean = |e: u64| {
        let lines: Vec<f64> = log.iter().filter(|l| l.epoch == e).map(|l| l.reward).collect();
        if lines.is_empty() {
            f64::NAN
        } else {
            lines.iter().sum::<f64>() / lines.len() as f64
        }
    };
    let seconds: f64 = log.iter().map(|l| l.seconds).sum();
    let summary = TrainSummary {
        method: spec.method.clone(),
        tasks: spec.tasks.clone(),
        epochs,
        steps: total_steps,
        batch_size: batch as u64,
        seconds,
        seconds_per_epoch: seconds / epochs as f64,
        reward_first_epoch: epoch_mean(1),
        reward_last_epoch: epoch_mean(epochs),
    };
    std::fs::write(out.join(TRAIN_SUMMARY_FILE), serde_json::to_vec_pretty(&summary).map_err(StageError::failed)?)?;
    let mut record = model.clone();
    record.tasks.extend(spec.tasks.iter().copied());
    record.origin = if spec.method == "joint" { "joint".into() } else { "finetune".into() };
    record.adapters = Some(ADAPTERS_FILE.into());
    record.write(&out)?;
    ctx.log(format!(
        "trained in {:.1}s ({:.2}s/step): reward {:.5} (first epoch) -> {:.5} (last epoch)",
        started.elapsed().as_secs_f64(),
        seconds / (total_steps - start).max(1) as f64,
        summary.reward_first_epoch,
        summary.reward_last_epoch
    ));
    Ok(())
}

fn save_resume(dir: &std::path::Path, lora: &crate::models::lora::LoraGroup, opt: &AdamW, step: u64, log: &[TrainLogLine]) -> Result<(), StageError> {
    // The tensors go into a new folder; the state file, written last and atomically, points at
    // it. A crash at any point leaves the previous checkpoint usable.
    let folder = format!("step-{step}");
    let staging = dir.join(format!("{folder}.tmp"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    lora.save(&staging.join(RESUME_ADAPTERS)).map_err(StageError::failed)?;
    Tensor::write_safetensors(&opt.state(), staging.join(RESUME_OPTIM)).map_err(StageError::failed)?;
    let final_dir = dir.join(&folder);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&staging, &final_dir)?;
    let state = ResumeState {
        step,
        folder: folder.clone(),
        log: log.to_vec(),
    };
    atomic_write(&dir.join(RESUME_STATE), &serde_json::to_vec(&state).map_err(StageError::failed)?)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && name != folder {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

//! The fine-tuning loop of the `finetune` and `joint` stages: the newest adapter of the model's
//! group trained with truncated backprop through DDIM sampling ([`super::objective`]), RID with
//! its EMA teacher; AdamW with global-norm clipping, micro-batches with gradient accumulation.
//! Resumable: every `checkpoint_every` steps the adapters, the optimizer and the log so far go
//! into a [`Checkpoint`]; a run that finds one continues from it to bitwise the same result.
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tch::Tensor;

use crate::models::diffusion::Diffusion;
use crate::models::lora::{LoraGroup, LoraInit};
use crate::records::TrainLogLine;
use crate::rewards::Reward;

use super::checkpoint::{prefixed, Checkpoint};
use super::monitor::{Cancelled, Monitor};
use super::noise;
use super::objective::{Backprop, MicroBatch, Objective, Parts, Step};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::sampling::{CastUnet, Sampler};

/// Purposes of the noise streams of a training stage.
const STREAM_LATENTS: u32 = 10;

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cancelled")]
    Cancelled,
    /// A NaN or infinite loss, reward or gradient norm (nothing is kept).
    #[error("{0}")]
    NonFinite(String),
    #[error("{0}")]
    Failed(String),
}

impl From<Cancelled> for TrainError {
    fn from(_: Cancelled) -> Self {
        TrainError::Cancelled
    }
}

fn failed(e: impl std::fmt::Display) -> TrainError {
    TrainError::Failed(e.to_string())
}

/// Which adapter a stage trains: a new one of the group (the paper) or the newest one it has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdapterChoice {
    New { rank: i64, init: LoraInit },
    /// The input's newest adapter (a new one when the input has none).
    Newest { rank: i64, init: LoraInit },
}

/// How one stage trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainSettings {
    pub objective: Objective,
    pub backprop: Backprop,
    /// RID's EMA momentum alpha (Eq. 6); unused otherwise.
    pub ema_momentum: f64,
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    pub epochs: u64,
    pub prompts_per_epoch: usize,
    /// Prompts per optimizer step.
    pub batch: usize,
    /// Prompts per forward pass.
    pub micro: usize,
    pub checkpoint_every: u64,
    /// The stage's seed (of prompt order, initial noise and adapter initialisation).
    pub seed: u64,
}

impl TrainSettings {
    pub fn steps_per_epoch(&self) -> u64 {
        self.prompts_per_epoch.div_ceil(self.batch) as u64
    }

    pub fn total_steps(&self) -> u64 {
        self.epochs * self.steps_per_epoch()
    }
}

/// Adds the adapter to train to the group (or picks the newest one) and, for RID, the EMA
/// teacher; returns its index.
pub fn prepare_adapter(lora: &LoraGroup, choice: AdapterChoice, objective: &Objective, seed: u64) -> Result<usize, TrainError> {
    let index = match (choice, lora.num_adapters()) {
        (AdapterChoice::Newest { .. }, n) if n > 0 => n - 1,
        (AdapterChoice::New { rank, init } | AdapterChoice::Newest { rank, init }, _) => lora.add_adapter(rank, init, seed).map_err(failed)?,
    };
    if matches!(objective, Objective::Rid { .. }) {
        lora.init_teacher().map_err(failed)?;
    }
    Ok(index)
}

/// What the loop trains with: the model (its group's newest adapter is trained), the sampler of
/// the last step, the reward and the training prompts.
pub struct TrainInputs<'a> {
    pub diffusion: &'a Diffusion,
    pub sampler: &'a Sampler,
    pub reward: &'a dyn Reward,
    pub prompts: &'a [String],
}

/// What a training did.
pub struct Trained {
    /// Every optimizer step, those before a resume included.
    pub log: Vec<TrainLogLine>,
    /// The step this run resumed from (0: a fresh start).
    pub resumed_at: u64,
}

/// Trains the newest adapter of `inputs.diffusion`'s group for `settings.total_steps()`
/// optimizer steps, resuming from the checkpoint at `checkpoint` when there is one.
pub fn train(inputs: &TrainInputs, settings: &TrainSettings, checkpoint: &Path, monitor: &mut dyn Monitor) -> Result<Trained, TrainError> {
    let TrainInputs { diffusion, sampler, reward, prompts } = *inputs;
    let lora = &diffusion.lora;
    let (batch, micro, seed) = (settings.batch, settings.micro, settings.seed);
    let steps_per_epoch = settings.steps_per_epoch();
    let total_steps = settings.total_steps();
    let rid = matches!(settings.objective, Objective::Rid { .. });

    // Resume from the last checkpoint of this exact stage, if an earlier run was interrupted.
    let mut log: Vec<TrainLogLine> = Vec::new();
    let mut start = 0u64;
    let saved = Checkpoint::load(checkpoint);
    if let Some(saved) = &saved {
        lora.load_tensors(&saved.with_prefix(CHECKPOINT_ADAPTERS).into_iter().collect(), checkpoint).map_err(failed)?;
        start = saved.step as u64;
        log = saved.state().ok_or_else(|| TrainError::Failed(format!("{}: no training log in the checkpoint", checkpoint.display())))?;
    }
    let mut opt = AdamW::new(lora.trainable_tensors(), settings.adamw);
    if let Some(saved) = &saved {
        opt.load_state(&saved.with_prefix(CHECKPOINT_OPTIMIZER)).ok_or_else(|| TrainError::Failed("the resumable checkpoint does not fit this stage; remove it with `ril-pipe gc`".into()))?;
        monitor.log(&format!("resumed at step {start} of {total_steps}"));
    }

    let uncond = diffusion.uncond().map_err(failed)?;
    let decode = |z: &Tensor| diffusion.decode(z);
    let score = |images: &Tensor, prompts: &[String]| reward.score(images, prompts).map_err(|e| e.to_string());
    let denoiser = CastUnet::of(diffusion);
    let method_step = Step {
        objective: settings.objective,
        backprop: settings.backprop,
        sampler,
        parts: Parts { model: &denoiser, lora, decode: &decode, reward: &score },
    };
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = u64::MAX;
    for step in start..total_steps {
        monitor.step(step as usize, total_steps as usize)?;
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
            let cond = diffusion.encode_prompts(chunk).map_err(failed)?;
            let first = step * batch as u64 + (m * micro) as u64;
            let [c, h, w] = diffusion.latent_shape;
            let z_n = Tensor::cat(&(0..chunk.len() as u64).map(|k| noise::gaussian(seed, noise::stream(STREAM_LATENTS, first + k), &[1, c, h, w], diffusion.device)).collect::<Vec<_>>(), 0);
            let micro_batch = MicroBatch { cond: &cond, uncond: &uncond, prompts: chunk, seed: seed ^ (first << 8) };
            let weight = chunk.len() as f64 / batch as f64;
            let out = method_step.micro_batch_backward(&micro_batch, &z_n, weight).map_err(failed)?;
            if !out.loss.is_finite() || !out.reward.is_finite() {
                return Err(TrainError::NonFinite(format!("non-finite training values at step {} (loss {}, reward {}); nothing was cached", step + 1, out.loss, out.reward)));
            }
            reward_sum += out.reward * weight;
            distill_sum += out.distill.unwrap_or(0.0) * weight;
            loss_sum += out.loss * weight;
        }
        let grad_norm = clip_grad_norm(opt.params(), settings.grad_clip);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite(format!("non-finite gradient norm at step {}: {grad_norm}; nothing was cached", step + 1)));
        }
        opt.step();
        opt.zero_grad();
        if rid {
            lora.ema_update(settings.ema_momentum).map_err(failed)?;
        }
        log.push(TrainLogLine {
            step: step + 1,
            epoch: epoch + 1,
            reward: reward_sum,
            distill_loss: rid.then_some(distill_sum),
            loss: loss_sum,
            grad_norm,
            lr: settings.adamw.lr,
            seconds: step_started.elapsed().as_secs_f64(),
        });
        if (step + 1) % settings.checkpoint_every == 0 && step + 1 < total_steps {
            let mut tensors = prefixed(CHECKPOINT_ADAPTERS, lora.named_tensors());
            tensors.extend(prefixed(CHECKPOINT_OPTIMIZER, opt.state()));
            Checkpoint::save_with_state(checkpoint, (step + 1) as usize, &tensors, &log).map_err(failed)?;
        }
        if (step + 1) % steps_per_epoch == 0 {
            let epoch_lines = &log[log.len() - (steps_per_epoch as usize).min(log.len())..];
            let mean = epoch_lines.iter().map(|l| l.reward).sum::<f64>() / epoch_lines.len() as f64;
            monitor.log(&format!("epoch {}/{}: mean reward {mean:.5}", epoch + 1, settings.epochs));
        }
    }
    // Done: a cancellation asked for now changes nothing.
    let _ = monitor.step(total_steps as usize, total_steps as usize);
    Ok(Trained { log, resumed_at: start })
}

/// Prefixes of the adapters' and the optimizer's tensors in a checkpoint.
const CHECKPOINT_ADAPTERS: &str = "lora.";
const CHECKPOINT_OPTIMIZER: &str = "opt.";

//! Pretraining of the tiny world's models, with the paper-scale modules in small configs.
//!
//! - [`vocab`]: the small CLIP BPE vocabulary (each caption word one token).
//! - [`data`]: seeded batches of captioned renders, ratings and preference pairs.
//! - [`clip`]: a small CLIP (transformers `CLIPModel` layout), contrastive on renders and captions.
//! - [`vae`]: a small `AutoencoderKL` (32x32x3 <-> 8x8x4).
//! - [`unet`]: a small `UNet2DConditionModel` on the VAE latents, conditioned on the CLIP text
//!   encoder's hidden states (DDPM, epsilon prediction, SD1.5 noise schedule, prompt dropout).
//! - [`aesthetic`]: a LAION-style head on the CLIP image embedding, fit to the procedural rating.
//! - [`preference`]: a copy of the CLIP fine-tuned on preference pairs as HPSv2 was.
//! - [`shape_probe`]: a small classifier reading the shape of the object in one-object images
//!   (the shape gate's instrument).
//! - [`gates`]: the quality measurements (retrieval, PSNR, Pearson r, pairwise accuracy, CLIP
//!   score, FID).
//! - [`io`]: safetensors writing (f32 or f16); checkpoints are [`crate::method::checkpoint`]'s.
//!
//! Here: what every trainer shares: the [`Schedule`] (AdamW, warm-up and cosine decay,
//! clipping, checkpoints), the loss track of its [`TrainSummary`], seeded generators and
//! initialisation, the EMA of weights.
//!
//! Everything is a pure function of its seed: weights are initialised and batches drawn from
//! seeded generators, never from libtorch's global generator, which stages running side by side
//! in one process share.
pub mod aesthetic;
pub mod clip;
pub mod data;
pub mod gates;
pub mod io;
pub mod preference;
pub mod shape_probe;
pub mod unet;
pub mod vae;
pub mod vocab;

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::method::checkpoint::{prefixed, Checkpoint};
use crate::method::monitor::Monitor;
use crate::method::optim::{clip_grad_norm, AdamW, AdamWConfig};

/// Errors of pretraining.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("{0}")]
    Model(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

impl TrainError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TrainError::Io { context: context.into(), source }
    }

    /// Any displayable error of a model, loader or file format.
    pub fn other(e: impl std::fmt::Display) -> Self {
        TrainError::Model(e.to_string())
    }
}

impl From<crate::method::monitor::Cancelled> for TrainError {
    fn from(_: crate::method::monitor::Cancelled) -> Self {
        TrainError::Cancelled
    }
}

impl From<crate::method::checkpoint::CheckpointError> for TrainError {
    fn from(e: crate::method::checkpoint::CheckpointError) -> Self {
        TrainError::Model(e.to_string())
    }
}

impl From<crate::tiny::TinyError> for TrainError {
    fn from(e: crate::tiny::TinyError) -> Self {
        TrainError::Model(e.to_string())
    }
}

/// Optimisation settings shared by the tiny models' trainers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub seed: u64,
    /// Save a resumable checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
}

/// What a trainer reports: the loss at the start and the end (means over a window of steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Step the run resumed from (0: a fresh start).
    pub resumed_at: usize,
}

/// Running means of the loss over the first and last `window` steps.
pub(crate) struct LossTrack {
    window: usize,
    first: Vec<f64>,
    recent: std::collections::VecDeque<f64>,
}

impl LossTrack {
    /// Means over `window` steps, at most `max`.
    pub(crate) fn new(window: usize, max: usize) -> Self {
        LossTrack { window: window.clamp(1, max), first: Vec::new(), recent: Default::default() }
    }

    pub(crate) fn push(&mut self, loss: f64) {
        if self.first.len() < self.window {
            self.first.push(loss);
        }
        self.recent.push_back(loss);
        if self.recent.len() > self.window {
            self.recent.pop_front();
        }
    }

    pub(crate) fn recent(&self) -> f64 {
        self.recent.iter().sum::<f64>() / self.recent.len().max(1) as f64
    }

    pub(crate) fn summary(&self, steps: usize, resumed_at: usize) -> TrainSummary {
        let first = self.first.iter().sum::<f64>() / self.first.len().max(1) as f64;
        TrainSummary { steps, first_loss: first, last_loss: self.recent(), resumed_at }
    }
}

impl Schedule {
    /// One optimizer update of `loss` at `step`: gradients, their norm clipped at 1, the
    /// learning rate of the warm-up and cosine schedule.
    pub(crate) fn update(&self, optimizer: &mut AdamW, params: &[Tensor], loss: &Tensor, step: usize) {
        optimizer.zero_grad();
        loss.backward();
        clip_grad_norm(params, 1.0);
        optimizer.config.lr = learning_rate(self.lr, step, self.steps, self.warmup);
        optimizer.step();
    }

    /// Saves a resumable checkpoint of `step` to `path` when one is due (every
    /// `checkpoint_every` steps, none after the last): the model's variables, `extra` ones
    /// (an EMA, a probe) and the optimizer's state.
    pub(crate) fn checkpoint(&self, path: Option<&Path>, step: usize, model: &VarStore, extra: impl FnOnce() -> Vec<(String, Tensor)>, optimizer: &AdamW) -> Result<(), TrainError> {
        let Some(path) = path else { return Ok(()) };
        if self.checkpoint_every == 0 || !(step + 1).is_multiple_of(self.checkpoint_every) || step + 1 >= self.steps {
            return Ok(());
        }
        let mut named = prefixed("model.", model.variables());
        named.extend(extra());
        named.extend(prefixed("opt.", optimizer.state()));
        Ok(Checkpoint::save(path, step + 1, &named)?)
    }
}

pub(crate) fn adamw(params: &[Tensor], schedule: &Schedule) -> AdamW {
    AdamW::new(params.iter().map(Tensor::shallow_clone).collect(), AdamWConfig { lr: schedule.lr, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: schedule.weight_decay })
}

/// Purposes of [`rng`] streams, so that no two uses of one seed share random numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    Init = 1,
    Batch = 2,
    Noise = 3,
    Eval = 4,
}

/// The generator for item `index` (e.g. the step) of `purpose` under `seed`: a batch can be
/// drawn for any step without replaying the earlier ones, so resumed runs see the same data.
pub fn rng(seed: u64, purpose: Purpose, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(((purpose as u64) << 48) ^ index);
    r
}

/// A stream id for [`crate::method::noise::gaussian`] of item `index` of `purpose`.
pub fn noise_stream(purpose: Purpose, index: u64) -> u64 {
    ((purpose as u64) << 48) ^ index
}

/// Uniform samples in [lo, hi) of `shape` from stream `stream` of `seed`.
fn uniform(seed: u64, stream: u64, shape: &[i64], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().map(|&d| d.max(0) as usize).product();
    let mut r = ChaCha20Rng::seed_from_u64(seed);
    r.set_stream(stream);
    let values: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * r.random::<f64>()) as f32).collect();
    Tensor::from_slice(&values).reshape(shape)
}

/// Overwrites every variable of `vs` from `seed`, by name and shape, with PyTorch's default
/// initialisations: norm weights 1 and biases 0 (1-D `weight` / `bias`), embeddings
/// `N(0, 0.02)`, CLIP's class embedding `N(0, width^-1/2)`, `logit_scale` ln(1/0.07), other
/// weights `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (`nn.Linear` / `nn.Conv2d`'s bound).
pub fn seeded_init(vs: &VarStore, seed: u64) {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (index, (name, mut var)) in variables.into_iter().enumerate() {
            let shape = var.size();
            let stream = noise_stream(Purpose::Init, index as u64);
            let values = if name.ends_with("logit_scale") {
                Tensor::full(shape.as_slice(), (1.0f64 / 0.07).ln(), (Kind::Float, tch::Device::Cpu))
            } else if name.ends_with("class_embedding") {
                crate::method::noise::gaussian(seed, stream, &shape, tch::Device::Cpu) * (shape[0] as f64).powf(-0.5)
            } else if name.contains("embedding.weight") && shape.len() == 2 {
                crate::method::noise::gaussian(seed, stream, &shape, tch::Device::Cpu) * 0.02
            } else if shape.len() <= 1 && name.ends_with("bias") {
                Tensor::zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
            } else if shape.len() <= 1 {
                Tensor::ones(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
            } else {
                let fan_in: i64 = shape[1..].iter().product();
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                uniform(seed, stream, &shape, -bound, bound)
            };
            var.copy_(&values.to_kind(var.kind()).to_device(var.device()));
        }
    });
}

/// The learning rate of step `step` (0-based) of `total`: linear warm-up over `warmup` steps,
/// then a cosine decay to 10% of `peak`.
pub fn learning_rate(peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// The step a trainer resumes at: the checkpoint's, once the stores (each under its prefix), the
/// optimizer (under `opt.`) and `restore_more` have all taken the saved state; 0 without one.
pub fn resume(checkpoint: Option<&Path>, stores: &[(&VarStore, &str)], optimizer: &mut AdamW, restore_more: impl FnOnce(&Checkpoint) -> bool, monitor: &mut dyn Monitor) -> usize {
    let Some(state) = checkpoint.and_then(Checkpoint::load) else {
        return 0;
    };
    let restored = stores.iter().all(|(vs, prefix)| io::restore_store(vs, &state.tensors, prefix)) && optimizer.load_state(&state.with_prefix("opt.")).is_some() && restore_more(&state);
    if !restored {
        return 0;
    }
    monitor.log(&format!("resumed at step {}", state.step));
    state.step
}

/// The trainable variables of a store, sorted by name (a stable order for optimizer states).
pub fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// An exponential moving average of a model's variables (the weights diffusion models ship).
pub struct Ema {
    pub decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let shadow = trainable(vs).into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        Ema { decay, shadow }
    }

    /// `shadow <- d shadow + (1 - d) current`, with the warm-up `d = min(decay, (1+n)/(10+n))`.
    pub fn update(&mut self, vs: &VarStore, step: usize) {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        let current = vs.variables();
        tch::no_grad(|| {
            for (name, shadow) in &mut self.shadow {
                if let Some(v) = current.get(name) {
                    let _ = shadow.lerp_(v, 1.0 - d);
                }
            }
        });
    }

    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Replaces the shadow by saved tensors (a resumed run); false when they do not fit.
    pub fn restore(&mut self, saved: &std::collections::BTreeMap<String, Tensor>, prefix: &str) -> bool {
        tch::no_grad(|| {
            for (name, shadow) in &mut self.shadow {
                match saved.get(&format!("{prefix}{name}")) {
                    Some(t) if t.size() == shadow.size() => {
                        shadow.copy_(t);
                    }
                    _ => return false,
                }
            }
            true
        })
    }

    /// Copies the averaged weights into the store's variables.
    pub fn copy_to(&self, vs: &VarStore) {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, shadow) in &self.shadow {
                if let Some(v) = vars.get(name) {
                    let mut v = v.shallow_clone();
                    v.copy_(shadow);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    #[test]
    fn seeded_init_is_a_function_of_the_seed() {
        let make = |seed| {
            let vs = VarStore::new(tch::Device::Cpu);
            let root = vs.root();
            let _l = nn::linear(&root / "fc", 16, 8, Default::default());
            let _n = nn::layer_norm(&root / "norm", vec![8], Default::default());
            let _e = nn::embedding(&root / "token_embedding", 10, 8, Default::default());
            seeded_init(&vs, seed);
            vs
        };
        let (a, b, c) = (make(1), make(1), make(2));
        for (name, t) in a.variables() {
            assert!(t.equal(&b.variables()[&name]), "{name}");
        }
        assert!(!a.variables()["fc.weight"].equal(&c.variables()["fc.weight"]));
        assert_eq!(a.variables()["norm.weight"].sum(Kind::Float).double_value(&[]), 8.0);
        assert_eq!(a.variables()["fc.bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
        let bound = a.variables()["fc.weight"].abs().max().double_value(&[]);
        assert!(bound <= 0.25 && bound > 0.2, "{bound}");
        let std = a.variables()["token_embedding.weight"].std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.006, "{std}");
    }

    #[test]
    fn schedule_warms_up_and_decays() {
        assert!((learning_rate(1.0, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1.0, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 100, 100, 10) - 0.1).abs() < 1e-12);
        assert!(learning_rate(1.0, 50, 100, 10) < 0.9);
    }

    #[test]
    fn batches_are_addressable_by_step() {
        let draw = |step| rng(5, Purpose::Batch, step).random::<u64>();
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        assert_ne!(rng(5, Purpose::Batch, 3).random::<u64>(), rng(5, Purpose::Noise, 3).random::<u64>());
    }
}

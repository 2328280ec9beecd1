//! The small UNet2DConditionModel: DDPM on the VAE's scaled latents with Stable Diffusion
//! v1.5's noise schedule (scaled-linear betas 0.00085-0.012, 1000 steps), epsilon prediction,
//! conditioned on the CLIP text encoder's last hidden state, with prompt dropout (the empty
//! prompt) so that classifier-free guidance works. The loss is the squared error of the
//! predicted noise, optionally weighted by Min-SNR-gamma (`min(SNR, gamma) / SNR`, Hang et al.
//! 2023), which speeds up convergence; the shipped weights are an exponential moving average.
//!
//! The training latents come from a pool of encoded training renders (posterior mean and
//! standard deviation; a fresh posterior sample each time one is drawn), so that the VAE
//! encoder runs once per render rather than once per step.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::clip::token_ids;
use super::{adamw, resume, LossTrack, Schedule, TrainSummary};
use super::data::{scene_batch, Excluded};
use crate::method::checkpoint::prefixed;
use super::io::{write_json, write_safetensors, Precision};
use super::vae::chunks;
use super::{noise_stream, rng, seeded_init, trainable, Ema, Purpose, TrainError};
use crate::method::monitor::Monitor;
use crate::method::noise::gaussian;
use crate::models::clip::{Clip, ClipConfig, ClipTextTransformer};
use crate::models::ddim::DdimConfig;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;
use crate::models::weights::Extra;

/// The shape of the small UNet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyUnetConfig {
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    /// Attention heads per block (diffusers' `attention_head_dim`).
    pub attention_heads: i64,
    pub norm_num_groups: i64,
    /// Which down blocks have cross-attention (the up blocks mirror them).
    pub cross_attention: Vec<bool>,
}

impl Default for TinyUnetConfig {
    fn default() -> Self {
        TinyUnetConfig { block_out_channels: vec![24, 48], layers_per_block: 1, attention_heads: 1, norm_num_groups: 8, cross_attention: vec![true, false] }
    }
}

impl TinyUnetConfig {
    pub fn diffusers(&self, latent_channels: i64, latent_size: i64, cross_attention_dim: i64) -> Result<UNet2DConditionConfig, TrainError> {
        if self.cross_attention.len() != self.block_out_channels.len() {
            return Err(TrainError::Config(format!("{} cross_attention flags for {} blocks", self.cross_attention.len(), self.block_out_channels.len())));
        }
        let down: Vec<String> = self.cross_attention.iter().map(|&c| if c { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string()).collect();
        let up: Vec<String> = self.cross_attention.iter().rev().map(|&c| if c { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string()).collect();
        let config = UNet2DConditionConfig {
            sample_size: Some(latent_size),
            in_channels: latent_channels,
            out_channels: latent_channels,
            down_block_types: down,
            up_block_types: up,
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: PerBlock::All(self.layers_per_block),
            attention_head_dim: PerBlock::All(self.attention_heads),
            norm_num_groups: Some(self.norm_num_groups),
            cross_attention_dim,
            ..UNet2DConditionConfig::default()
        };
        config.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        Ok(config)
    }
}

/// diffusers' `unet/config.json` of a config.
pub fn config_json(config: &UNet2DConditionConfig) -> Result<serde_json::Value, TrainError> {
    let mut value = serde_json::to_value(config).map_err(TrainError::other)?;
    value["_class_name"] = json!("UNet2DConditionModel");
    value["_diffusers_version"] = json!("0.30.0");
    Ok(value)
}

/// Stable Diffusion v1.5's `scheduler/scheduler_config.json` (the DDIM settings of SPEC 3).
pub fn sd15_scheduler_json() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.30.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

pub struct TrainableUnet {
    pub vs: VarStore,
    pub unet: UNet2DConditionModel,
    pub config: UNet2DConditionConfig,
}

impl TrainableUnet {
    pub fn new(config: &UNet2DConditionConfig, seed: u64, device: Device) -> Result<Self, TrainError> {
        let vs = VarStore::new(device);
        let unet = UNet2DConditionModel::new(vs.root(), config, None).map_err(TrainError::other)?;
        seeded_init(&vs, seed);
        Ok(TrainableUnet { vs, unet, config: config.clone() })
    }

    /// Writes `unet/` with the given weights (the EMA's, normally).
    pub fn save(&self, dir: &Path, weights: &[(String, Tensor)], precision: Precision) -> Result<(), TrainError> {
        write_json(&dir.join("config.json"), &config_json(&self.config)?)?;
        write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), weights, precision)
    }
}

/// A `CLIPTextModel` folder's text tower, frozen (as `Diffusion::load` reads it).
pub fn load_text_encoder(dir: &Path, device: Device) -> Result<(VarStore, ClipTextTransformer), TrainError> {
    let config = ClipConfig::from_transformers_json(&dir.join("config.json")).map_err(TrainError::other)?;
    let vs = VarStore::new(device);
    let clip = Clip::load(&vs, &config, dir, Extra::Reject).map_err(TrainError::other)?;
    let text = clip.text.ok_or_else(|| TrainError::Model(format!("{}: no text tower", dir.display())))?;
    for (_, mut v) in vs.variables() {
        let _ = v.requires_grad_(false);
    }
    Ok((vs, text))
}

/// Encoded training renders: posterior means and standard deviations (unscaled) and captions.
pub struct LatentPool {
    pub means: Tensor,
    pub stds: Tensor,
    pub captions: Vec<String>,
}

impl LatentPool {
    pub fn encode(vae: &AutoencoderKL, excluded: &Excluded, size: usize, seed: u64, device: Device) -> Result<Self, TrainError> {
        let (mut means, mut stds, mut captions) = (Vec::new(), Vec::new(), Vec::new());
        for (i, n) in chunks(size, 256).enumerate() {
            let batch = scene_batch(seed, 6, i as u64, n, excluded, device)?;
            let (mean, logvar) = tch::no_grad(|| vae.encode(&(&batch.images * 2.0 - 1.0)));
            means.push(mean);
            stds.push((logvar * 0.5).exp());
            captions.extend(batch.captions);
        }
        Ok(LatentPool { means: Tensor::cat(&means, 0), stds: Tensor::cat(&stds, 0), captions })
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

/// Diffusion-specific settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiffusionSettings {
    /// Probability of training on the empty prompt (for classifier-free guidance).
    pub prompt_dropout: f64,
    /// Min-SNR-gamma loss weight; 0 for the plain (unweighted) loss.
    pub min_snr_gamma: f64,
    pub ema_decay: f64,
    /// VAE `scaling_factor`.
    pub scaling_factor: f64,
}

/// The frozen conditioning: tokenizer and text tower.
pub struct TextConditioning<'a> {
    pub tokenizer: &'a ClipTokenizer,
    pub text: &'a ClipTextTransformer,
}

impl TextConditioning<'_> {
    /// Last hidden states `[B, L, D]` of prompts.
    pub fn encode(&self, prompts: &[String], device: Device) -> Result<Tensor, TrainError> {
        let ids = token_ids(self.tokenizer, prompts, self.text.config().context_length as usize, device)?;
        tch::no_grad(|| self.text.forward(&ids)).map(|o| o.last_hidden_state).map_err(TrainError::other)
    }
}

/// DDPM training on the pool; returns the summary and the EMA of the weights.
pub fn train(model: &TrainableUnet, conditioning: &TextConditioning, pool: &LatentPool, schedule: &Schedule, settings: &DiffusionSettings, checkpoint: Option<&Path>, monitor: &mut dyn Monitor) -> Result<(TrainSummary, Ema), TrainError> {
    if pool.is_empty() {
        return Err(TrainError::Config("empty latent pool".into()));
    }
    let device = model.vs.device();
    let ddim = DdimConfig::default();
    let alphas = ddim.alphas_cumprod();
    let params: Vec<Tensor> = trainable(&model.vs).into_iter().map(|(_, t)| t).collect();
    let mut optimizer = adamw(&params, schedule);
    optimizer.config.beta2 = 0.999;
    optimizer.config.eps = 1e-8;
    let mut ema = Ema::new(&model.vs, settings.ema_decay);
    let start = resume(checkpoint, &[(&model.vs, "model.")], &mut optimizer, |state| ema.restore(&state.tensors, "ema."), monitor);
    let latent_shape = pool.means.size()[1..].to_vec();
    let mut track = LossTrack::new(schedule.steps / 5, 100);
    let b = schedule.batch as i64;
    for step in start..schedule.steps {
        let mut r = rng(schedule.seed, Purpose::Batch, step as u64);
        let picks: Vec<i64> = (0..b).map(|_| rand::Rng::random_range(&mut r, 0..pool.len() as i64)).collect();
        let timesteps: Vec<i64> = (0..b).map(|_| rand::Rng::random_range(&mut r, 0..ddim.num_train_timesteps as i64)).collect();
        let prompts: Vec<String> = picks
            .iter()
            .map(|&i| if rand::Rng::random_bool(&mut r, settings.prompt_dropout) { String::new() } else { pool.captions[i as usize].clone() })
            .collect();
        let index = Tensor::from_slice(&picks).to_device(device);
        let mut shape = vec![b];
        shape.extend(&latent_shape);
        let posterior = gaussian(schedule.seed, noise_stream(Purpose::Noise, 2 * step as u64), &shape, device);
        let noise = gaussian(schedule.seed, noise_stream(Purpose::Noise, 2 * step as u64 + 1), &shape, device);
        let z0 = (pool.means.index_select(0, &index) + pool.stds.index_select(0, &index) * posterior) * settings.scaling_factor;
        let t = Tensor::from_slice(&timesteps).to_device(device);
        let zt = ddim.add_noise(&z0, &noise, &t).map_err(TrainError::other)?;
        let context = conditioning.encode(&prompts, device)?;
        let pred = model.unet.forward(&zt, &t, &context);
        let per_sample = (pred - &noise).square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        let loss = if settings.min_snr_gamma > 0.0 {
            let weights: Vec<f32> = timesteps
                .iter()
                .map(|&t| {
                    let a = alphas[t as usize];
                    let snr = a / (1.0 - a);
                    (snr.min(settings.min_snr_gamma) / snr) as f32
                })
                .collect();
            (per_sample * Tensor::from_slice(&weights).to_device(device)).mean(Kind::Float)
        } else {
            per_sample.mean(Kind::Float)
        };
        schedule.update(&mut optimizer, &params, &loss, step);
        ema.update(&model.vs, step);
        track.push(loss.double_value(&[]));
        if (step + 1) % 200 == 0 {
            monitor.log(&format!("step {}: diffusion loss {:.4}", step + 1, track.recent()));
        }
        schedule.checkpoint(checkpoint, step, &model.vs, || prefixed("ema.", ema.tensors().iter().map(|(n, t)| (n.clone(), t.shallow_clone()))), &optimizer)?;
        monitor.step(step + 1, schedule.steps)?;
    }
    Ok((track.summary(schedule.steps, start), ema))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::prompt_split;
    use crate::tiny::train::clip::{TinyClipConfig, TrainableClip};
    use crate::tiny::train::vae::{TinyVaeConfig, TrainableVae};
    use crate::tiny::train::vocab::{caption_words, Vocabulary};
    use crate::method::monitor::{Cancelled, Monitor, Quiet};

    #[test]
    fn training_is_seeded_and_lowers_the_loss() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = Vocabulary::for_words(&caption_words(&[])).unwrap();
        vocab.write_folder(&dir.path().join("tokenizer"), 20).unwrap();
        let clip_cfg = TinyClipConfig { text_width: 16, text_layers: 1, vision_width: 16, vision_layers: 1, embed_dim: 8, patch_size: 8, text_heads: 2, vision_heads: 2, ..TinyClipConfig::default() };
        write_json(&dir.path().join("config.json"), &clip_cfg.clip_model_json(&vocab)).unwrap();
        let clip = TrainableClip::new(&dir.path().join("config.json"), 1, Device::Cpu).unwrap();
        clip.save_text_encoder(&dir.path().join("text_encoder"), &clip_cfg.text_encoder_json(&vocab), Precision::F32).unwrap();
        let (_text_vs, text) = load_text_encoder(&dir.path().join("text_encoder"), Device::Cpu).unwrap();
        let tokenizer = ClipTokenizer::from_hf_folder(&dir.path().join("tokenizer")).unwrap();
        let excluded = Excluded::new(&prompt_split(0).test);
        let vae = TrainableVae::new(&TinyVaeConfig { block_out_channels: vec![8, 8, 8], ..TinyVaeConfig::default() }.diffusers(32), 1, Device::Cpu).unwrap();
        let pool = LatentPool::encode(&vae.vae, &excluded, 64, 0, Device::Cpu).unwrap();
        assert_eq!(pool.means.size(), vec![64, 4, 8, 8]);
        let unet_cfg = TinyUnetConfig { block_out_channels: vec![16, 32], attention_heads: 2, ..TinyUnetConfig::default() }.diffusers(4, 8, 16).unwrap();
        let schedule = Schedule { steps: 40, batch: 16, lr: 2e-3, warmup: 4, weight_decay: 0.0, seed: 5, checkpoint_every: 0 };
        let settings = DiffusionSettings { prompt_dropout: 0.1, min_snr_gamma: 5.0, ema_decay: 0.99, scaling_factor: 1.0 };
        let conditioning = TextConditioning { tokenizer: &tokenizer, text: &text };
        let run = || {
            let model = TrainableUnet::new(&unet_cfg, 2, Device::Cpu).unwrap();
            let (summary, ema) = train(&model, &conditioning, &pool, &schedule, &settings, None, &mut Quiet::default()).unwrap();
            (model, summary, ema)
        };
        let (a, summary, ema) = run();
        assert!(summary.last_loss < 0.8 * summary.first_loss, "{summary:?}");
        let (b, _, _) = run();
        for (name, t) in a.vs.variables() {
            assert!(t.equal(&b.vs.variables()[&name]), "{name}");
        }
        // The EMA differs from the last weights but has their names and shapes.
        let vars = a.vs.variables();
        assert!(ema.tensors().iter().all(|(n, t)| vars[n].size() == t.size()));
        assert!(ema.tensors().iter().any(|(n, t)| !vars[n].equal(t)));
        a.save(&dir.path().join("unet"), ema.tensors(), Precision::F16).unwrap();
        let cfg = UNet2DConditionConfig::from_file(&dir.path().join("unet/config.json")).unwrap();
        assert_eq!(cfg, unet_cfg);

        // Stopped after the checkpoint at step 20 and resumed in a fresh model, the run ends with
        // the weights and the EMA of the uninterrupted one.
        struct StopAt(usize);
        impl Monitor for StopAt {
            fn step(&mut self, step: usize, _: usize) -> Result<(), Cancelled> {
                if step == self.0 { Err(Cancelled) } else { Ok(()) }
            }
            fn log(&mut self, _: &str) {}
        }
        let ckpt = dir.path().join("ckpt.safetensors");
        let checkpointed = Schedule { checkpoint_every: 20, ..schedule };
        let stopped = TrainableUnet::new(&unet_cfg, 2, Device::Cpu).unwrap();
        assert!(matches!(train(&stopped, &conditioning, &pool, &checkpointed, &settings, Some(&ckpt), &mut StopAt(25)), Err(TrainError::Cancelled)));
        let resumed = TrainableUnet::new(&unet_cfg, 2, Device::Cpu).unwrap();
        let (summary, resumed_ema) = train(&resumed, &conditioning, &pool, &checkpointed, &settings, Some(&ckpt), &mut Quiet::default()).unwrap();
        assert_eq!(summary.resumed_at, 20);
        for (name, t) in a.vs.variables() {
            let diff = (&t - &resumed.vs.variables()[&name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
        }
        for ((name, t), (_, r)) in ema.tensors().iter().zip(resumed_ema.tensors()) {
            let diff = (t - r).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "EMA {name}: {diff}");
        }
    }
}

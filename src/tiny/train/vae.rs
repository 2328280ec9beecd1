//! The small AutoencoderKL: 32x32x3 images in [-1, 1] <-> 8x8x4 latents (three blocks, f = 4).
//!
//! Trained as Stable Diffusion's VAE without its perceptual and adversarial terms: the squared
//! error of the decoded posterior sample plus `kl_weight` times the KL divergence to N(0, I),
//! both summed per image (so `kl_weight` means what it means in SD's config, 1e-6). The
//! `scaling_factor` of its config is 1 / std of the latents over training renders, as SD's
//! 0.18215 was chosen, so that the diffusion model sees latents of unit variance.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{adamw, resume, LossTrack, Schedule, TrainSummary};
use super::data::{prompt_scenes, scene_batch, Excluded};
use super::io::{write_json, write_safetensors, Precision};
use super::{noise_stream, seeded_init, trainable, Purpose, TrainError};
use crate::method::monitor::Monitor;
use crate::method::noise::gaussian;
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};

/// The shape of the small VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyVaeConfig {
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
}

impl Default for TinyVaeConfig {
    fn default() -> Self {
        TinyVaeConfig { block_out_channels: vec![16, 32, 32], layers_per_block: 1, latent_channels: 4, norm_num_groups: 8 }
    }
}

impl TinyVaeConfig {
    /// The diffusers config (scaling factor 1 until measured).
    pub fn diffusers(&self, image_size: i64) -> AutoencoderKLConfig {
        let n = self.block_out_channels.len();
        AutoencoderKLConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            sample_size: Some(json!(image_size)),
            scaling_factor: 1.0,
            ..AutoencoderKLConfig::default()
        }
    }
}

/// diffusers' `vae/config.json` of a config (with the class name diffusers reads).
pub fn config_json(config: &AutoencoderKLConfig) -> Result<serde_json::Value, TrainError> {
    let mut value = serde_json::to_value(config).map_err(TrainError::other)?;
    value["_class_name"] = json!("AutoencoderKL");
    value["_diffusers_version"] = json!("0.30.0");
    value["force_upcast"] = json!(false);
    Ok(value)
}

pub struct TrainableVae {
    pub vs: VarStore,
    pub vae: AutoencoderKL,
    pub config: AutoencoderKLConfig,
}

impl TrainableVae {
    pub fn new(config: &AutoencoderKLConfig, seed: u64, device: Device) -> Result<Self, TrainError> {
        let vs = VarStore::new(device);
        let vae = AutoencoderKL::new(vs.root(), config).map_err(TrainError::other)?;
        seeded_init(&vs, seed);
        Ok(TrainableVae { vs, vae, config: config.clone() })
    }

    /// A `vae/` folder (config.json + diffusion_pytorch_model.safetensors).
    pub fn load(dir: &Path, device: Device) -> Result<Self, TrainError> {
        let config = AutoencoderKLConfig::from_file(&dir.join("config.json")).map_err(TrainError::other)?;
        let vs = VarStore::new(device);
        let vae = AutoencoderKL::new(vs.root(), &config).map_err(TrainError::other)?;
        crate::models::vae::load_weights(&vs, &dir.join("diffusion_pytorch_model.safetensors")).map_err(TrainError::other)?;
        Ok(TrainableVae { vs, vae, config })
    }

    pub fn save(&self, dir: &Path, precision: Precision) -> Result<(), TrainError> {
        write_json(&dir.join("config.json"), &config_json(&self.config)?)?;
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &named, precision)
    }
}

/// The terms of the VAE's loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VaeLoss {
    /// Weight of the KL divergence to N(0, I) (per-image sums, as SD's VAE: 1e-6).
    pub kl_weight: f64,
    /// Weight of the edge term: the mean absolute difference of the horizontal and vertical
    /// pixel differences of reconstruction and image (0: none). Squared error alone blurs the
    /// outlines of small objects (it is dominated by the flat background), where SD's VAE has
    /// its perceptual and adversarial terms; this cheap term stands in for them.
    pub edge_weight: f64,
}

/// Absolute differences of the horizontal and vertical neighbour differences of `a` and `b`
/// (`[B, C, H, W]`), averaged over their elements and summed over the two directions.
fn edge_error(a: &Tensor, b: &Tensor) -> Tensor {
    let d = a - b;
    let (h, w) = (d.size()[2], d.size()[3]);
    let dx = d.narrow(3, 1, w - 1) - d.narrow(3, 0, w - 1);
    let dy = d.narrow(2, 1, h - 1) - d.narrow(2, 0, h - 1);
    dx.abs().mean(Kind::Float) + dy.abs().mean(Kind::Float)
}

/// Squared error of the decoded posterior sample + `kl_weight` KL (summed per image, divided by
/// the elements of an image) + `edge_weight` times the edge term; returns the loss and the
/// squared error alone.
fn vae_loss(vae: &AutoencoderKL, images: &Tensor, eps: &Tensor, terms: &VaeLoss) -> (Tensor, Tensor) {
    let x = images * 2.0 - 1.0;
    let (mean, logvar) = vae.encode(&x);
    let z = &mean + (&logvar * 0.5).exp() * eps;
    let y = vae.decode(&z);
    let rec = (&y - &x).square().mean(Kind::Float);
    let kl = (mean.square() + logvar.exp() - 1.0 - &logvar).sum(Kind::Float) * 0.5 / x.numel() as f64;
    let mut loss = &rec + kl * terms.kl_weight;
    if terms.edge_weight > 0.0 {
        loss += edge_error(&y, &x) * terms.edge_weight;
    }
    (loss, rec)
}

/// Trains on fresh renders each step (resuming from `checkpoint` when it holds this run).
pub fn train(model: &TrainableVae, excluded: &Excluded, schedule: &Schedule, terms: &VaeLoss, checkpoint: Option<&Path>, monitor: &mut dyn Monitor) -> Result<TrainSummary, TrainError> {
    let device = model.vs.device();
    let params: Vec<Tensor> = trainable(&model.vs).into_iter().map(|(_, t)| t).collect();
    let mut optimizer = adamw(&params, schedule);
    optimizer.config.beta2 = 0.999;
    optimizer.config.eps = 1e-8;
    let start = resume(checkpoint, &[(&model.vs, "model.")], &mut optimizer, |_| true, monitor);
    let mut track = LossTrack::new(schedule.steps / 5, 50);
    let latent = model.config.latent_channels;
    let side = 32 / (1 << (model.config.block_out_channels.len() - 1));
    for step in start..schedule.steps {
        let batch = scene_batch(schedule.seed, 2, step as u64, schedule.batch, excluded, device)?;
        let eps = gaussian(schedule.seed, noise_stream(Purpose::Noise, step as u64), &[schedule.batch as i64, latent, side, side], device);
        let (loss, rec) = vae_loss(&model.vae, &batch.images, &eps, terms);
        schedule.update(&mut optimizer, &params, &loss, step);
        // The squared error of [-1, 1] images is 4x that of [0, 1] images.
        track.push(rec.double_value(&[]) / 4.0);
        if (step + 1) % 100 == 0 {
            monitor.log(&format!("step {}: reconstruction MSE {:.5} ({:.2} dB)", step + 1, track.recent(), -10.0 * track.recent().log10()));
        }
        schedule.checkpoint(checkpoint, step, &model.vs, Vec::new, &optimizer)?;
        monitor.step(step + 1, schedule.steps)?;
    }
    Ok(track.summary(schedule.steps, start))
}

/// Decoded posterior means of images in [0, 1], back in [0, 1] (clamped), without graph.
pub fn reconstruct(vae: &AutoencoderKL, images: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let (mean, _) = vae.encode(&(images * 2.0 - 1.0));
        (vae.decode(&mean) / 2.0 + 0.5).clamp(0.0, 1.0)
    })
}

/// 1 / std of posterior samples of `count` training renders (the latent scaling factor).
pub fn latent_scale(vae: &AutoencoderKL, excluded: &Excluded, count: usize, seed: u64, device: Device) -> Result<f64, TrainError> {
    let mut samples = Vec::new();
    for (i, size) in chunks(count, 128).enumerate() {
        let batch = scene_batch(seed, 3, i as u64, size, excluded, device)?;
        let z = tch::no_grad(|| {
            let (mean, logvar) = vae.encode(&(&batch.images * 2.0 - 1.0));
            let eps = gaussian(seed, noise_stream(Purpose::Eval, i as u64), &mean.size(), device);
            mean + (logvar * 0.5).exp() * eps
        });
        samples.push(z.flatten(0, -1));
    }
    let std = Tensor::cat(&samples, 0).to_kind(Kind::Double).std(true).double_value(&[]);
    if !(std.is_finite() && std > 0.0) {
        return Err(TrainError::Model(format!("latent standard deviation {std}")));
    }
    Ok(1.0 / std)
}

/// Sizes of `chunk`-sized pieces of `total`.
pub(crate) fn chunks(total: usize, chunk: usize) -> impl Iterator<Item = usize> {
    (0..total.div_ceil(chunk)).map(move |i| chunk.min(total - i * chunk))
}

/// Reconstruction PSNR (dB, of the mean squared error over all pixels) of `per_prompt` renders
/// of each prompt.
pub fn reconstruction_psnr(vae: &AutoencoderKL, prompts: &[String], per_prompt: usize, seed: u64, device: Device) -> Result<f64, TrainError> {
    let batch = prompt_scenes(prompts, per_prompt, seed, device)?;
    let mut errors = Vec::new();
    for (i, n) in chunks(batch.captions.len(), 128).enumerate() {
        let images = batch.images.narrow(0, (i * 128) as i64, n as i64);
        errors.push((reconstruct(vae, &images).to_kind(Kind::Double) - images.to_kind(Kind::Double)).square().flatten(0, -1));
    }
    let mse = Tensor::cat(&errors, 0).mean(Kind::Double).double_value(&[]);
    Ok(-10.0 * mse.max(1e-20).log10())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::prompt_split;
    use crate::method::monitor::Quiet;

    const TERMS: VaeLoss = VaeLoss { kl_weight: 1e-6, edge_weight: 0.5 };

    #[test]
    fn edge_error_sees_outlines_not_offsets() {
        let a = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        // A constant offset has the same neighbour differences: no edge error.
        assert_eq!(edge_error(&(&a + 0.3), &a).double_value(&[]), 0.0);
        // One bright pixel: 2 horizontal and 2 vertical differences of 1 among 12 each.
        let b = a.copy();
        let _ = b.get(0).get(0).get(1).get(1).fill_(1.0);
        assert!((edge_error(&b, &a).double_value(&[]) - 4.0 / 12.0).abs() < 1e-6);
    }

    #[test]
    fn training_is_seeded_lowers_the_loss_and_round_trips_through_the_folder() {
        let split = prompt_split(0);
        let excluded = Excluded::new(&split.test);
        let cfg = TinyVaeConfig { block_out_channels: vec![8, 16, 16], ..TinyVaeConfig::default() }.diffusers(32);
        let schedule = Schedule { steps: 25, batch: 8, lr: 2e-3, warmup: 2, weight_decay: 0.0, seed: 2, checkpoint_every: 0 };
        let a = TrainableVae::new(&cfg, 1, Device::Cpu).unwrap();
        let summary = train(&a, &excluded, &schedule, &TERMS, None, &mut Quiet::default()).unwrap();
        assert!(summary.last_loss < 0.7 * summary.first_loss, "{summary:?}");
        let b = TrainableVae::new(&cfg, 1, Device::Cpu).unwrap();
        train(&b, &excluded, &schedule, &TERMS, None, &mut Quiet::default()).unwrap();
        for (name, t) in a.vs.variables() {
            assert!(t.equal(&b.vs.variables()[&name]), "{name}");
        }
        let scale = latent_scale(&a.vae, &excluded, 64, 0, Device::Cpu).unwrap();
        assert!(scale.is_finite() && scale > 0.0);
        let dir = tempfile::tempdir().unwrap();
        let saved = TrainableVae { config: AutoencoderKLConfig { scaling_factor: scale, ..cfg.clone() }, ..a };
        saved.save(dir.path(), Precision::F32).unwrap();
        let back = TrainableVae::load(dir.path(), Device::Cpu).unwrap();
        assert!((back.config.scaling_factor - scale).abs() < 1e-12 * scale);
        let images = scene_batch(0, 9, 0, 4, &excluded, Device::Cpu).unwrap().images;
        let diff = (reconstruct(&back.vae, &images) - reconstruct(&saved.vae, &images)).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn chunk_sizes_cover_the_total() {
        assert_eq!(chunks(300, 128).collect::<Vec<_>>(), vec![128, 128, 44]);
        assert_eq!(chunks(0, 128).count(), 0);
    }
}

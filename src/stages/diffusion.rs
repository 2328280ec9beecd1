//! A diffusion model loaded from a world's diffusers folder, with its adapter group: what
//! fine-tuning and evaluation stages sample from.
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::exec::StageError;
use crate::method::sampling::{initial_latents, CastUnet, Sampler};
use crate::models::clip::{Clip, ClipConfig, ClipTextTransformer};
use crate::models::ddim::DdimConfig;
use crate::models::lora::LoraGroup;
use crate::models::tokenizer::{ClipTokenizer, Padding};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{rename_legacy_attention, AutoencoderKL, AutoencoderKLConfig};
use crate::models::weights::{self, Extra};

use super::precision::Precision;
use super::world::ModelRecord;

pub struct Diffusion {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text: ClipTextTransformer,
    pub tokenizer: ClipTokenizer,
    pub ddim: DdimConfig,
    pub lora: LoraGroup,
    pub device: Device,
    /// Dtype of the frozen UNet, VAE and text encoder (the adapters stay fp32).
    pub precision: Precision,
    /// Latent `[C, h, w]` of one sample.
    pub latent_shape: [i64; 3],
    context_length: usize,
    /// The models' variables; kept alive with the models.
    stores: Vec<VarStore>,
}

fn failed(what: &str, path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::Failed(format!("{what} ({}): {e}", path.display()))
}

impl Diffusion {
    /// Loads the world's UNet, VAE, text encoder, tokenizer and scheduler config, and the adapter
    /// group of `adapters` (none for the base model). The frozen weights are never trained and
    /// are held in `precision`; the adapter group stays fp32.
    pub fn load(record: &ModelRecord, adapters: Option<&Path>, device: Device, precision: Precision) -> Result<Self, StageError> {
        let root = &record.world.diffusion;
        let lora = LoraGroup::new(record.lora_targets.clone());

        let unet_dir = root.join("unet");
        let unet_cfg = UNet2DConditionConfig::from_file(&unet_dir.join("config.json")).map_err(|e| failed("UNet config", &unet_dir, e))?;
        let mut unet_vs = precision.new_store(device);
        let unet = UNet2DConditionModel::new(unet_vs.root(), &unet_cfg, Some(&lora)).map_err(|e| failed("UNet", &unet_dir, e))?;
        precision.cast_store(&mut unet_vs);
        let tensors = weights::load_weights(&unet_dir).map_err(StageError::failed)?;
        weights::assign(&unet_vs, &tensors, Extra::Reject, &unet_dir).map_err(StageError::failed)?;
        if let Some(path) = adapters {
            lora.load(path).map_err(|e| failed("adapters", path, e))?;
        }

        let vae_dir = root.join("vae");
        let vae_cfg = AutoencoderKLConfig::from_file(&vae_dir.join("config.json")).map_err(|e| failed("VAE config", &vae_dir, e))?;
        let mut vae_vs = precision.new_store(device);
        let vae = AutoencoderKL::new(vae_vs.root(), &vae_cfg).map_err(|e| failed("VAE", &vae_dir, e))?;
        precision.cast_store(&mut vae_vs);
        let tensors = rename_legacy_attention(weights::load_weights(&vae_dir).map_err(StageError::failed)?);
        weights::assign(&vae_vs, &tensors, Extra::Reject, &vae_dir).map_err(StageError::failed)?;

        let text_dir = root.join("text_encoder");
        let text_cfg = ClipConfig::from_transformers_json(&text_dir.join("config.json")).map_err(StageError::failed)?;
        let mut text_vs = precision.new_store(device);
        // Older text encoders carry a `position_ids` buffer, which is not a weight.
        let clip = Clip::load(&text_vs, &text_cfg, &text_dir, Extra::Ignore).map_err(StageError::failed)?;
        precision.cast_store(&mut text_vs);
        let text = clip.text.ok_or_else(|| failed("text encoder", &text_dir, "the config has no text tower"))?;
        let context_length = text.config().context_length as usize;

        let tokenizer = ClipTokenizer::from_hf_folder(&root.join("tokenizer")).map_err(StageError::failed)?;
        let ddim = DdimConfig::from_json_file(&root.join("scheduler").join("scheduler_config.json")).map_err(StageError::failed)?;

        let side = vae_cfg.latent_side(record.world.resolution);
        for vs in [&unet_vs, &vae_vs, &text_vs] {
            for (_, mut v) in vs.variables() {
                let _ = v.requires_grad_(false);
            }
        }
        Ok(Diffusion {
            unet,
            vae,
            text,
            tokenizer,
            ddim,
            lora,
            device,
            precision,
            latent_shape: [unet_cfg.in_channels, side, side],
            context_length,
            stores: vec![unet_vs, vae_vs, text_vs],
        })
    }

    /// The UNet as the sampler sees it: fp32 latents in, fp32 noise prediction out.
    pub fn denoiser(&self) -> CastUnet<'_> {
        CastUnet { unet: &self.unet, compute: self.precision.kind() }
    }

    /// Text-encoder hidden states `[B, L, D]` of prompts (the UNet's context, in the models'
    /// precision), without graph. The token ids go to the models' device.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor, StageError> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = self.tokenizer.tokenize(&refs, self.context_length, Padding::EndOfText).map_err(StageError::failed)?;
        tch::no_grad(|| self.text.forward(&ids.to_device(self.device)))
            .map(|o| o.last_hidden_state)
            .map_err(StageError::failed)
    }

    /// The unconditional context, `encode("")`, `[1, L, D]`.
    pub fn uncond(&self) -> Result<Tensor, StageError> {
        self.encode_prompts(&[String::new()])
    }

    /// Latents to images in [0, 1] (differentiable): `(vae.decode(z / s) / 2 + 0.5).clamp(0, 1)`,
    /// decoded in the models' precision, mapped and clamped in fp32.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        self.vae.decode_images(latents, self.precision.kind())
    }

    /// Images `[B, 3, H, W]` in [0, 1] of samples `first .. first + B` of a run, one per prompt,
    /// without graph: the evaluation's noise convention, shared by `evaluate` and `ril-pipe
    /// sample`. Sample `i` starts from `z_N` = noise stream `i` of `seed` (whatever the batch it
    /// falls in); DDIM's variance noise (eta > 0) is drawn for the batch from `seed ^ first`.
    pub fn generate(&self, sampler: &Sampler, prompts: &[String], uncond: &Tensor, seed: u64, first: u64) -> Result<Tensor, StageError> {
        let cond = self.encode_prompts(prompts)?;
        let z_n = initial_latents(seed, first, prompts.len() as i64, self.latent_shape, self.device);
        tch::no_grad(|| {
            let z_0 = sampler.sample(&self.denoiser(), &z_n, &cond, uncond, seed ^ first).map_err(StageError::failed)?;
            Ok(self.decode(&z_0))
        })
    }

    /// Number of frozen parameters (for logs).
    pub fn frozen_parameters(&self) -> i64 {
        self.stores.iter().flat_map(|vs| vs.variables().into_values()).map(|t| t.numel() as i64).sum()
    }
}

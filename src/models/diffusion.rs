//! A Stable-Diffusion-style model assembled from a diffusers folder (UNet with its adapter
//! group, VAE, text encoder, tokenizer, scheduler config): what fine-tuning and evaluation
//! sample from ([`crate::method::sampling`] drives it).
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::clip::{Clip, ClipConfig, ClipTextTransformer};
use super::ddim::DdimConfig;
use super::lora::LoraGroup;
use crate::models::precision::Precision;
use super::tokenizer::{ClipTokenizer, Padding};
use super::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use super::vae::{rename_legacy_attention, AutoencoderKL, AutoencoderKLConfig};
use super::weights::{self, Extra};

/// Why a diffusion model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("{what} ({}): {reason}", path.display())]
    Load { what: &'static str, path: PathBuf, reason: String },
    #[error("{0}")]
    Model(String),
}

impl DiffusionError {
    /// Any displayable error of a model, loader or file format.
    pub fn model(e: impl std::fmt::Display) -> Self {
        DiffusionError::Model(e.to_string())
    }
}

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
    _stores: Vec<VarStore>,
}

fn failed(what: &'static str, path: &Path, e: impl std::fmt::Display) -> DiffusionError {
    DiffusionError::Load { what, path: path.to_path_buf(), reason: e.to_string() }
}

impl Diffusion {
    /// Loads the UNet, VAE, text encoder, tokenizer and scheduler config of the diffusers folder
    /// `root` for `resolution` x `resolution` images, with an adapter group on the layers
    /// `lora_targets` holding the adapters of the file `adapters` (none for a base model). The
    /// frozen weights are never trained and are held in `precision`; the adapter group stays fp32.
    pub fn load(root: &Path, resolution: i64, lora_targets: Vec<String>, adapters: Option<&Path>, device: Device, precision: Precision) -> Result<Self, DiffusionError> {
        let lora = LoraGroup::new(lora_targets);

        let unet_dir = root.join("unet");
        let unet_cfg = UNet2DConditionConfig::from_file(&unet_dir.join("config.json")).map_err(|e| failed("UNet config", &unet_dir, e))?;
        let mut unet_vs = precision.new_store(device);
        let unet = UNet2DConditionModel::new(unet_vs.root(), &unet_cfg, Some(&lora)).map_err(|e| failed("UNet", &unet_dir, e))?;
        precision.cast_store(&mut unet_vs);
        let tensors = weights::load_weights(&unet_dir).map_err(DiffusionError::model)?;
        weights::assign(&unet_vs, &tensors, Extra::Reject, &unet_dir).map_err(DiffusionError::model)?;
        if let Some(path) = adapters {
            lora.load(path).map_err(|e| failed("adapters", path, e))?;
        }

        let vae_dir = root.join("vae");
        let vae_cfg = AutoencoderKLConfig::from_file(&vae_dir.join("config.json")).map_err(|e| failed("VAE config", &vae_dir, e))?;
        let mut vae_vs = precision.new_store(device);
        let vae = AutoencoderKL::new(vae_vs.root(), &vae_cfg).map_err(|e| failed("VAE", &vae_dir, e))?;
        precision.cast_store(&mut vae_vs);
        let tensors = rename_legacy_attention(weights::load_weights(&vae_dir).map_err(DiffusionError::model)?);
        weights::assign(&vae_vs, &tensors, Extra::Reject, &vae_dir).map_err(DiffusionError::model)?;

        let text_dir = root.join("text_encoder");
        let text_cfg = ClipConfig::from_transformers_json(&text_dir.join("config.json")).map_err(DiffusionError::model)?;
        let mut text_vs = precision.new_store(device);
        // Older text encoders carry a `position_ids` buffer, which is not a weight.
        let clip = Clip::load(&text_vs, &text_cfg, &text_dir, Extra::Ignore).map_err(DiffusionError::model)?;
        precision.cast_store(&mut text_vs);
        let text = clip.text.ok_or_else(|| failed("text encoder", &text_dir, "the config has no text tower"))?;
        let context_length = text.config().context_length as usize;

        let tokenizer = ClipTokenizer::from_hf_folder(&root.join("tokenizer")).map_err(DiffusionError::model)?;
        let ddim = DdimConfig::from_json_file(&root.join("scheduler").join("scheduler_config.json")).map_err(DiffusionError::model)?;

        let side = vae_cfg.latent_side(resolution);
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
            _stores: vec![unet_vs, vae_vs, text_vs],
        })
    }

    /// Text-encoder hidden states `[B, L, D]` of prompts (the UNet's context, in the models'
    /// precision), without graph. The token ids go to the models' device.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor, DiffusionError> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = self.tokenizer.tokenize(&refs, self.context_length, Padding::EndOfText).map_err(DiffusionError::model)?;
        tch::no_grad(|| self.text.forward(&ids.to_device(self.device)))
            .map(|o| o.last_hidden_state)
            .map_err(DiffusionError::model)
    }

    /// The unconditional context, `encode("")`, `[1, L, D]`.
    pub fn uncond(&self) -> Result<Tensor, DiffusionError> {
        self.encode_prompts(&[String::new()])
    }

    /// Latents to images in [0, 1] (differentiable): `(vae.decode(z / s) / 2 + 0.5).clamp(0, 1)`,
    /// decoded in the models' precision, mapped and clamped in fp32.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        self.vae.decode_images(latents, self.precision.kind())
    }
}

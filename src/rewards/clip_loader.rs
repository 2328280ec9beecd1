//! Loading the CLIP models that rewards and metrics use, from either checkpoint layout, frozen.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::models::clip::{normalize, preprocess, Clip, ClipConfig, Layout, VisionConfig};
use crate::models::tokenizer::{ClipTokenizer, Padding};
use crate::models::weights::Extra;

/// Which checkpoint layout a CLIP model comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipLayout {
    /// A transformers folder (`config.json` + weights); tokenizer padded with EOT.
    Transformers,
    /// An open_clip checkpoint with its model-config JSON; tokenizer padded with zeros.
    OpenClip,
}

/// Where a CLIP model's files are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipFiles {
    pub layout: ClipLayout,
    /// transformers: the folder; open_clip: the checkpoint file.
    pub weights: PathBuf,
    /// open_clip: the model-config JSON (e.g. ViT-H-14.json).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// A transformers `tokenizer/` folder (or a folder holding vocab.json and merges.txt), or
    /// the CLIP BPE `.txt.gz`.
    pub tokenizer: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClipLoadError {
    #[error("CLIP {path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

/// A frozen CLIP with its tokenizer. Its weights may be half precision; the embeddings it
/// returns are fp32.
pub struct FrozenClip {
    pub clip: Clip,
    /// `None` for a model built without files (an image tower with random weights, for benches).
    pub tokenizer: Option<ClipTokenizer>,
    pub padding: Padding,
    pub device: Device,
    vs: VarStore,
}

impl FrozenClip {
    /// Loads the model on `device` with its floating-point weights in `kind` (fp32, fp16, bf16).
    pub fn load(files: &ClipFiles, device: Device, kind: Kind) -> Result<Self, ClipLoadError> {
        let fail = |path: &Path, reason: String| ClipLoadError::Load {
            path: path.to_path_buf(),
            reason,
        };
        let config = match files.layout {
            ClipLayout::Transformers => ClipConfig::from_transformers_json(&files.weights.join("config.json")),
            ClipLayout::OpenClip => {
                let cfg = files.config.as_ref().ok_or_else(|| fail(&files.weights, "an open_clip checkpoint needs its model-config JSON".into()))?;
                ClipConfig::from_open_clip_json(cfg)
            }
        }
        .map_err(|e| fail(&files.weights, e.to_string()))?;
        let mut vs = VarStore::new(device);
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        // HPSv2 and CLIPModel checkpoints carry tensors (logit bias, position ids) no tower uses.
        let clip = Clip::load(&vs, &config, &files.weights, Extra::Ignore).map_err(|e| fail(&files.weights, e.to_string()))?;
        // Variables a constructor made with an explicit dtype follow too.
        tch::no_grad(|| match kind {
            Kind::Half => vs.half(),
            Kind::BFloat16 => vs.bfloat16(),
            _ => {}
        });
        for (_, mut v) in vs.variables() {
            let _ = v.requires_grad_(false);
        }
        let tokenizer = if files.tokenizer.is_dir() {
            ClipTokenizer::from_hf_folder(&files.tokenizer)
        } else {
            ClipTokenizer::from_bpe_gz(&files.tokenizer)
        }
        .map_err(|e| fail(&files.tokenizer, e.to_string()))?;
        let padding = match files.layout {
            ClipLayout::Transformers => Padding::EndOfText,
            ClipLayout::OpenClip => Padding::Zeros,
        };
        Ok(FrozenClip {
            clip,
            tokenizer: Some(tokenizer),
            padding,
            device,
            vs,
        })
    }

    /// An image tower of `vision`'s shape with random weights (for benchmarks at upstream
    /// sizes without their checkpoints), frozen, its weights in `kind`.
    pub fn random_vision(vision: &VisionConfig, device: Device, kind: Kind) -> Self {
        let mut vs = VarStore::new(device);
        let config = ClipConfig { layout: Layout::Transformers, text: None, vision: Some(vision.clone()), logit_scale: false };
        let clip = tch::no_grad(|| Clip::new(&vs.root(), &config));
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        vs.freeze();
        FrozenClip { clip, tokenizer: None, padding: Padding::EndOfText, device, vs }
    }

    /// Number of weights.
    pub fn parameters(&self) -> u64 {
        self.vs.variables().values().map(|t| t.numel() as u64).sum()
    }

    fn missing(&self, tower: &str) -> ClipLoadError {
        ClipLoadError::Load {
            path: PathBuf::new(),
            reason: format!("this CLIP has no {tower} tower with a projection"),
        }
    }

    /// L2-normalised fp32 image embeddings `[B, E]` of images `[B, 3, H, W]` in [0, 1]
    /// (differentiable in the images).
    pub fn image_embeddings(&self, images: &Tensor) -> Result<Tensor, ClipLoadError> {
        let vision = self.clip.vision.as_ref().ok_or_else(|| self.missing("vision"))?;
        let size = vision.config().image_size;
        let pixels = preprocess(images, size).map_err(|e| ClipLoadError::Load { path: PathBuf::new(), reason: e.to_string() })?;
        self.pixel_embeddings(&pixels)
    }

    /// L2-normalised fp32 image embeddings `[B, E]` of pixel values already preprocessed for
    /// the model (`[B, 3, S, S]`, e.g. by a processor config), differentiable in them.
    pub fn pixel_embeddings(&self, pixels: &Tensor) -> Result<Tensor, ClipLoadError> {
        let vision = self.clip.vision.as_ref().ok_or_else(|| self.missing("vision"))?;
        let out = vision.forward(pixels).map_err(|e| ClipLoadError::Load { path: PathBuf::new(), reason: e.to_string() })?;
        let embeds = out.embeds.ok_or_else(|| self.missing("vision"))?;
        Ok(normalize(&embeds.to_kind(Kind::Float)))
    }

    /// L2-normalised fp32 text embeddings `[B, E]` (no graph: prompts are fixed).
    pub fn text_embeddings(&self, prompts: &[String]) -> Result<Tensor, ClipLoadError> {
        let text = self.clip.text.as_ref().ok_or_else(|| self.missing("text"))?;
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| self.missing("text"))?;
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let err = |reason: String| ClipLoadError::Load { path: PathBuf::new(), reason };
        let ids = tokenizer.tokenize(&refs, text.config().context_length as usize, self.padding).map_err(|e| err(e.to_string()))?;
        let out = tch::no_grad(|| text.forward(&ids.to_device(self.device))).map_err(|e| err(e.to_string()))?;
        let embeds = out.embeds.ok_or_else(|| self.missing("text"))?;
        Ok(normalize(&embeds.to_kind(Kind::Float)))
    }
}

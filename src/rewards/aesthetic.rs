//! Aesthetic reward: CLIP image embedding (L2-normalised) -> LAION MLP head. The reward to
//! maximise is the head's score (AlignProp's loss 0.01 |score - 10| has the same gradient).
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::models::aesthetic::{AestheticConfig, AestheticHead};
use crate::models::clip::VisionConfig;
use crate::models::weights::{self, Extra};

use super::clip_loader::{ClipFiles, ClipLoadError, FrozenClip};
use super::{Reward, RewardError};

pub struct AestheticReward {
    clip: FrozenClip,
    head: AestheticHead,
    /// Dtype of the head's weights.
    kind: Kind,
    vs: VarStore,
}

fn fail(path: &Path, reason: impl ToString) -> ClipLoadError {
    ClipLoadError::Load {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The head's layer widths, read off its tensors `layers.{i}.weight` (LAION: 768-1024-128-64-16-1).
fn head_config(tensors: &weights::TensorMap, path: &Path) -> Result<AestheticConfig, ClipLoadError> {
    let mut layers: Vec<(usize, Vec<i64>)> = tensors
        .iter()
        .filter_map(|(name, t)| {
            let index = name.strip_prefix("layers.")?.strip_suffix(".weight")?.parse().ok()?;
            Some((index, t.size()))
        })
        .collect();
    layers.sort();
    let first = layers.first().ok_or_else(|| fail(path, "no `layers.N.weight` tensors: not an aesthetic head"))?;
    let mut dims = vec![first.1.get(1).copied().unwrap_or(0)];
    dims.extend(layers.iter().map(|(_, s)| s[0]));
    let config = AestheticConfig { dims };
    let indices: Vec<usize> = layers.iter().map(|(i, _)| *i).collect();
    if config.linear_indices() != indices {
        return Err(fail(path, format!("layer indices {indices:?} do not follow the LAION head's layout {:?}", config.linear_indices())));
    }
    Ok(config)
}

impl AestheticReward {
    /// Loads the CLIP and the head on `device` with their weights in `kind` (fp32, fp16, bf16).
    pub fn load(clip: &ClipFiles, head: &Path, device: Device, kind: Kind) -> Result<Self, ClipLoadError> {
        let clip = FrozenClip::load(clip, device, kind)?;
        let tensors = weights::load_weights(head).map_err(|e| fail(head, e))?;
        let config = head_config(&tensors, head)?;
        let mut vs = VarStore::new(device);
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let model = AestheticHead::new(&vs.root(), &config).map_err(|e| fail(head, e))?;
        weights::assign(&vs, &tensors, Extra::Reject, head).map_err(|e| fail(head, e))?;
        for (_, mut v) in vs.variables() {
            let _ = v.requires_grad_(false);
        }
        Ok(AestheticReward { clip, head: model, kind, vs })
    }

    /// A reward of the LAION head's shape on a CLIP image tower of `vision`'s shape, with random
    /// weights: the same computation as a loaded one, for benchmarks at upstream sizes.
    pub fn random(vision: &VisionConfig, device: Device, kind: Kind) -> Result<Self, ClipLoadError> {
        let clip = FrozenClip::random_vision(vision, device, kind);
        let config = AestheticConfig { dims: vec![vision.projection_dim.unwrap_or(vision.transformer.width), 1024, 128, 64, 16, 1] };
        let mut vs = VarStore::new(device);
        let head = tch::no_grad(|| AestheticHead::new(&vs.root(), &config)).map_err(|e| fail(Path::new("aesthetic head"), e))?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        vs.freeze();
        Ok(AestheticReward { clip, head, kind, vs })
    }

    /// Number of weights of the CLIP and the head.
    pub fn parameters(&self) -> u64 {
        self.clip.parameters() + self.vs.variables().values().map(|t| t.numel() as u64).sum::<u64>()
    }

    /// fp32 scores `[B]` of images `[B, 3, H, W]` in [0, 1], differentiable in the images.
    pub fn score(&self, images: &Tensor) -> Result<Tensor, ClipLoadError> {
        let emb = self.clip.image_embeddings(images)?;
        let out = self.head.forward(&emb.to_kind(self.kind)).map_err(|e| fail(Path::new("aesthetic head"), e))?;
        Ok(out.squeeze_dim(-1).to_kind(Kind::Float))
    }
}

impl Reward for AestheticReward {
    fn name(&self) -> &str {
        "aesthetic"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor, RewardError> {
        AestheticReward::score(self, images).map_err(|e| RewardError::Model(Box::new(e)))
    }
}

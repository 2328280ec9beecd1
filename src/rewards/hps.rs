//! Human-preference reward with HPSv2's structure: the cosine of the L2-normalised CLIP image
//! and text features (no logit scale). Typical values at paper scale: 0.2-0.3.
use tch::{Device, Kind, Tensor};

use super::clip_loader::{ClipFiles, ClipLoadError, FrozenClip};
use super::{Reward, RewardError};

pub struct HpsReward {
    clip: FrozenClip,
}

impl HpsReward {
    /// Loads the model on `device` with its weights in `kind` (fp32, fp16, bf16).
    pub fn load(files: &ClipFiles, device: Device, kind: Kind) -> Result<Self, ClipLoadError> {
        Ok(HpsReward {
            clip: FrozenClip::load(files, device, kind)?,
        })
    }

    /// fp32 scores `[B]`: image `i` against prompt `i`, differentiable in the images.
    pub fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, ClipLoadError> {
        let img = self.clip.image_embeddings(images)?;
        let txt = self.clip.text_embeddings(prompts)?;
        Ok((img * txt).sum_dim_intlist(-1, false, Kind::Float))
    }
}

impl Reward for HpsReward {
    fn name(&self) -> &str {
        "hps"
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError> {
        super::check_prompts(images.size()[0], prompts)?;
        HpsReward::score(self, images, prompts).map_err(|e| RewardError::Model(Box::new(e)))
    }
}

//! Differentiable rewards on decoded images; the same code serves both scales.
//!
//! A reward maps a batch of images `[B, 3, H, W]` in [0, 1] (the decoded last-step samples, still
//! in the autograd graph) and their prompts to one score per image, higher is better. The
//! fine-tuning stages maximise it; the evaluation stages report its mean.
pub mod aesthetic;
pub mod clip_loader;
pub mod compressibility;
pub mod diff_jpeg;
pub mod hps;
pub mod mixture;

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("expected images of shape [B, 3, H, W], got {0:?}")]
    ImageShape(Vec<i64>),
    #[error("image height and width must be multiples of {multiple}, got {height}x{width}")]
    ImageSize {
        multiple: i64,
        height: i64,
        width: i64,
    },
    #[error("{images} images but {prompts} prompts: one prompt per image is needed")]
    PromptCount { images: i64, prompts: usize },
    #[error("JPEG quality must be in 1..=100, got {0}")]
    JpegQuality(u8),
    #[error("invalid reward configuration: {0}")]
    Config(String),
    /// A failure inside a reward model (CLIP towers, heads, weight loading).
    #[error("reward model failed: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The error of one term of a mixture, with the term's name.
    #[error("reward `{reward}`: {source}")]
    InReward {
        reward: String,
        #[source]
        source: Box<RewardError>,
    },
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// A differentiable reward.
pub trait Reward {
    /// A short identifier (`aesthetic`, `hps`, `compressibility`, ...), used in logs and reports.
    fn name(&self) -> &str;

    /// Scores `images` ([B, 3, H, W] in [0, 1], float; gradients flow back through them) given
    /// their prompts (one per image; rewards that do not read prompts ignore them). Returns [B].
    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError>;
}

/// Checks that `images` is [B, 3, H, W] and returns (B, H, W).
pub fn check_images(images: &Tensor) -> Result<(i64, i64, i64), RewardError> {
    match images.size().as_slice() {
        &[b, 3, h, w] if b > 0 && h > 0 && w > 0 => Ok((b, h, w)),
        other => Err(RewardError::ImageShape(other.to_vec())),
    }
}

/// Checks that there is exactly one prompt per image (for prompt-conditioned rewards).
pub fn check_prompts(batch: i64, prompts: &[String]) -> Result<(), RewardError> {
    if prompts.len() as i64 == batch {
        Ok(())
    } else {
        Err(RewardError::PromptCount {
            images: batch,
            prompts: prompts.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn image_and_prompt_checks() {
        let ok = Tensor::zeros([2, 3, 4, 6], (Kind::Float, Device::Cpu));
        assert_eq!(check_images(&ok).unwrap(), (2, 4, 6));
        for bad in [vec![3, 4, 6], vec![2, 1, 4, 6], vec![0, 3, 4, 6]] {
            let t = Tensor::zeros(bad.as_slice(), (Kind::Float, Device::Cpu));
            assert!(matches!(check_images(&t), Err(RewardError::ImageShape(s)) if s == bad));
        }
        let prompts = vec!["a".to_string(), "b".to_string()];
        assert!(check_prompts(2, &prompts).is_ok());
        assert!(matches!(
            check_prompts(3, &prompts),
            Err(RewardError::PromptCount {
                images: 3,
                prompts: 2
            })
        ));
    }
}

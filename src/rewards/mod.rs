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
pub mod pickscore;
pub mod torchscript;

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

pub use crate::records::RewardDirection;

impl RewardDirection {
    /// The reward wrapped so that maximising its scores is what this direction asks: itself for
    /// `Higher`, its negative for `Lower` (same name, so logs still say which reward it is).
    pub fn for_training(self, reward: Box<dyn Reward>) -> Box<dyn Reward> {
        match self {
            RewardDirection::Higher => reward,
            RewardDirection::Lower => Box::new(Negated(reward)),
        }
    }
}

/// A `lower` reward as training maximises it: `-R(x)`.
struct Negated(Box<dyn Reward>);

impl Reward for Negated {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError> {
        Ok(self.0.score(images, prompts)?.f_neg()?)
    }
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

    /// The mean of the red channel: a reward whose gradient is known.
    struct Red;

    impl Reward for Red {
        fn name(&self) -> &str {
            "red"
        }

        fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor, RewardError> {
            Ok(images.select(1, 0).mean_dim([1i64, 2].as_slice(), false, Kind::Float))
        }
    }

    #[test]
    fn a_lower_reward_is_trained_on_its_negative() {
        let images = Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let raw = Red.score(&images, &[]).unwrap();
        let lower = RewardDirection::Lower.for_training(Box::new(Red));
        assert_eq!(lower.name(), "red");
        let trained = lower.score(&images, &[]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&trained).unwrap(), Vec::<f32>::try_from(&raw.neg()).unwrap());
        trained.sum(Kind::Float).backward();
        // d(-mean red)/dx: -1/16 on the red channel, 0 elsewhere.
        let grad = images.grad();
        assert_eq!(grad.select(1, 0).max().double_value(&[]), -1.0 / 16.0);
        assert_eq!(grad.narrow(1, 1, 2).abs().max().double_value(&[]), 0.0);
        let higher = RewardDirection::Higher.for_training(Box::new(Red));
        let same = higher.score(&images, &[]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&same).unwrap(), Vec::<f32>::try_from(&raw).unwrap());
    }

    #[test]
    fn directions_read_and_write_as_in_a_pipeline() {
        for d in [RewardDirection::Higher, RewardDirection::Lower] {
            assert_eq!(RewardDirection::parse(d.name()), Some(d));
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{}\"", d.name()));
            assert_eq!(serde_json::from_str::<RewardDirection>(&format!("\"{}\"", d.name())).unwrap(), d);
        }
        assert_eq!(RewardDirection::parse("up"), None);
        assert!(serde_json::from_str::<RewardDirection>("\"Higher\"").is_err());
        assert_eq!(RewardDirection::default(), RewardDirection::Higher);
        assert_eq!((RewardDirection::Higher.sign(), RewardDirection::Lower.sign()), (1.0, -1.0));
        assert!(RewardDirection::Higher.higher_is_better() && !RewardDirection::Lower.higher_is_better());
    }

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

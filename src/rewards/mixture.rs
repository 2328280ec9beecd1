//! Weighted mixtures of rewards (joint tuning, Eq. 10).
//!
//! `R(x) = sum_i w_i R_i(x)`; the paper's joint tuning uses `0.01 R_a + 2 R_h + R_c`, weights
//! the caller supplies.
use tch::Tensor;

use super::{Reward, RewardError};

/// A weighted sum of rewards, itself a reward.
pub struct RewardMixture {
    name: String,
    terms: Vec<(f64, Box<dyn Reward>)>,
}

impl RewardMixture {
    /// At least one term; weights must be finite.
    pub fn new(terms: Vec<(f64, Box<dyn Reward>)>) -> Result<Self, RewardError> {
        if terms.is_empty() {
            return Err(RewardError::Config(
                "a reward mixture needs at least one term".into(),
            ));
        }
        if let Some((w, r)) = terms.iter().find(|(w, _)| !w.is_finite()) {
            return Err(RewardError::Config(format!(
                "weight {w} of `{}` is not finite",
                r.name()
            )));
        }
        let name = terms
            .iter()
            .map(|(w, r)| format!("{w}*{}", r.name()))
            .collect::<Vec<_>>()
            .join("+");
        Ok(Self { name, terms })
    }

    /// (weight, reward name) of each term, in order.
    pub fn terms(&self) -> impl Iterator<Item = (f64, &str)> {
        self.terms.iter().map(|(w, r)| (*w, r.name()))
    }
}

impl Reward for RewardMixture {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError> {
        let mut total: Option<Tensor> = None;
        for (weight, reward) in &self.terms {
            let score = reward
                .score(images, prompts)
                .map_err(|e| RewardError::InReward {
                    reward: reward.name().to_string(),
                    source: Box::new(e),
                })?;
            let weighted = score.f_mul_scalar(*weight)?;
            total = Some(match total {
                None => weighted,
                Some(t) => t.f_add(&weighted)?,
            });
        }
        // `new` guarantees at least one term.
        total.ok_or_else(|| RewardError::Config("empty reward mixture".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewards::compressibility::Compressibility;
    use crate::rewards::{check_images, check_prompts};
    use tch::{Device, Kind};

    /// Mean brightness per image.
    struct Brightness;
    impl Reward for Brightness {
        fn name(&self) -> &str {
            "brightness"
        }
        fn score(&self, images: &Tensor, _: &[String]) -> Result<Tensor, RewardError> {
            Ok(images.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float))
        }
    }

    /// Prompt length per image; needs one prompt per image.
    struct PromptLength;
    impl Reward for PromptLength {
        fn name(&self) -> &str {
            "prompt_length"
        }
        fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError> {
            let (b, _, _) = check_images(images)?;
            check_prompts(b, prompts)?;
            Ok(Tensor::from_slice(
                &prompts.iter().map(|p| p.len() as f32).collect::<Vec<_>>(),
            ))
        }
    }

    #[test]
    fn equals_the_weighted_sum() {
        let images = Tensor::rand([3, 3, 16, 16], (Kind::Float, Device::Cpu));
        let prompts: Vec<String> = ["a cat", "two red squares", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mixture = RewardMixture::new(vec![
            (0.01, Box::new(Brightness) as Box<dyn Reward>),
            (2.0, Box::new(PromptLength)),
            (1.0, Box::new(Compressibility::default())),
        ])
        .unwrap();
        assert_eq!(
            mixture.name(),
            "0.01*brightness+2*prompt_length+1*compressibility"
        );
        assert_eq!(
            mixture.terms().map(|(w, _)| w).collect::<Vec<_>>(),
            [0.01, 2.0, 1.0]
        );
        let expected = Brightness.score(&images, &prompts).unwrap() * 0.01
            + PromptLength.score(&images, &prompts).unwrap() * 2.0
            + Compressibility::default().score(&images, &prompts).unwrap();
        let got = mixture.score(&images, &prompts).unwrap();
        assert!(
            got.allclose(&expected, 1e-6, 1e-6, false),
            "{got:?} vs {expected:?}"
        );
    }

    #[test]
    fn gradients_flow_through_every_term() {
        let images =
            Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mixture = RewardMixture::new(vec![
            (0.5, Box::new(Brightness) as Box<dyn Reward>),
            (1.0, Box::new(Compressibility::default())),
        ])
        .unwrap();
        mixture
            .score(&images, &[])
            .unwrap()
            .sum(Kind::Float)
            .backward();
        let grad = images.grad();
        assert!(
            grad.isfinite().all().int64_value(&[]) == 1
                && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0
        );
    }

    #[test]
    fn errors_name_the_failing_term_and_bad_configs_are_rejected() {
        let images = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let mixture =
            RewardMixture::new(vec![(1.0, Box::new(PromptLength) as Box<dyn Reward>)]).unwrap();
        let err = mixture
            .score(&images, &["only one".to_string()])
            .unwrap_err();
        assert!(
            matches!(&err, RewardError::InReward { reward, source } if reward == "prompt_length" && matches!(**source, RewardError::PromptCount { .. }))
        );
        assert!(matches!(
            RewardMixture::new(vec![]),
            Err(RewardError::Config(_))
        ));
        assert!(matches!(
            RewardMixture::new(vec![(f64::NAN, Box::new(Brightness) as Box<dyn Reward>)]),
            Err(RewardError::Config(_))
        ));
    }
}

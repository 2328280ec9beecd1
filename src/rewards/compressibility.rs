//! Compressibility reward: -||x - C(x)||^2 with C the differentiable JPEG (Eq. 2).
//!
//! Eq. 2 is a sum over channels and pixels ([`Reduction::Sum`]); the mean ([`Reduction::Mean`])
//! is the sum divided by 3*H*W, so it does not grow with the image size. With Adam a global
//! scale does not change the baseline's update, but it sets the balance against RID's lambda and
//! the weights of joint tuning's mixture (Eq. 10). The ranking of images is the same.
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::diff_jpeg::DiffJpeg;
use super::{check_images, Reward, RewardError};

/// How the squared error is reduced over channels and pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// The paper's Eq. 2.
    Sum,
    #[default]
    Mean,
}

impl Reduction {
    pub fn name(self) -> &'static str {
        match self {
            Reduction::Sum => "sum",
            Reduction::Mean => "mean",
        }
    }
}

/// `R(x) = -sum_{c,h,w} (x - C(x))^2` (or the mean) per image, x in [0, 1].
#[derive(Debug, Default)]
pub struct Compressibility {
    jpeg: DiffJpeg,
    reduction: Reduction,
}

impl Compressibility {
    pub fn new(jpeg: DiffJpeg, reduction: Reduction) -> Self {
        Self { jpeg, reduction }
    }

    pub fn jpeg(&self) -> &DiffJpeg {
        &self.jpeg
    }
}

impl Reward for Compressibility {
    fn name(&self) -> &str {
        "compressibility"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor, RewardError> {
        check_images(images)?;
        let compressed = self.jpeg.forward(images)?;
        let kind = compressed.kind();
        let error = images.f_to_kind(kind)?.f_sub(&compressed)?.f_square()?;
        let dims = [1i64, 2, 3];
        let reduced = match self.reduction {
            Reduction::Sum => error.f_sum_dim_intlist(dims.as_slice(), false, kind)?,
            Reduction::Mean => error.f_mean_dim(dims.as_slice(), false, kind)?,
        };
        Ok(reduced.f_neg()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn flat_scores_higher_than_noise() {
        let flat = Tensor::full([1, 3, 32, 32], 0.4, (Kind::Float, Device::Cpu));
        let noise = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        let reward = Compressibility::default();
        let scores = reward
            .score(&Tensor::cat(&[&flat, &noise], 0), &[])
            .unwrap();
        assert_eq!(scores.size(), [2]);
        let (flat_score, noise_score) = (scores.double_value(&[0]), scores.double_value(&[1]));
        assert!(flat_score <= 0.0 && noise_score < 0.0);
        assert!(
            flat_score > noise_score,
            "flat {flat_score} noise {noise_score}"
        );
        assert!(
            flat_score > -1e-4,
            "a flat image survives JPEG almost unchanged: {flat_score}"
        );
    }

    #[test]
    fn is_the_mean_squared_jpeg_error() {
        let x = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let reward = Compressibility::default();
        let c = reward.jpeg().forward(&x).unwrap();
        let expected = -(&x - c)
            .square()
            .view([2, -1])
            .mean_dim(1, false, Kind::Float);
        assert!(reward
            .score(&x, &[])
            .unwrap()
            .allclose(&expected, 1e-6, 1e-9, false));
    }

    #[test]
    fn the_sum_of_eq_2_is_the_mean_times_the_elements() {
        let x = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let mean = Compressibility::new(DiffJpeg::default(), Reduction::Mean).score(&x, &[]).unwrap();
        let sum = Compressibility::new(DiffJpeg::default(), Reduction::Sum).score(&x, &[]).unwrap();
        assert!(sum.allclose(&(mean * (3.0 * 16.0 * 16.0)), 1e-5, 1e-7, false));
    }

    #[test]
    fn gradient_pushes_noise_towards_compressible() {
        let x = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let reward = Compressibility::default();
        let before = reward.score(&x, &[]).unwrap();
        before.sum(Kind::Float).backward();
        let stepped = tch::no_grad(|| (&x + x.grad() * 50.0).clamp(0.0, 1.0));
        let after = reward.score(&stepped, &[]).unwrap();
        assert!(after.double_value(&[0]) > before.double_value(&[0]));
    }
}

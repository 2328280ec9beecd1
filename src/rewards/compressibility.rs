//! Compressibility reward: -||x - C(x)||^2 with C the differentiable JPEG.
//!
//! The squared norm is taken as the mean over channels and pixels (not the sum): the reward then
//! does not grow with the image size, so one learning rate and one mixture weight serve the
//! 32x32 tiny world and 512x512 SD images alike. It equals the sum divided by 3*H*W, which
//! only rescales the gradient; the ranking of images is unchanged.
use tch::Tensor;

use super::diff_jpeg::DiffJpeg;
use super::{check_images, Reward, RewardError};

/// `R(x) = -mean_{c,h,w} (x - C(x))^2` per image, x in [0, 1].
#[derive(Debug, Default)]
pub struct Compressibility {
    jpeg: DiffJpeg,
}

impl Compressibility {
    pub fn new(jpeg: DiffJpeg) -> Self {
        Self { jpeg }
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
        Ok(error
            .f_mean_dim([1i64, 2, 3].as_slice(), false, kind)?
            .f_neg()?)
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

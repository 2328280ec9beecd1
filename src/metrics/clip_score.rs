//! CLIP score: 100 * cos(image, text), mean over images, clamped at 0.
//!
//! torchmetrics semantics (`torchmetrics.multimodal.CLIPScore`): both feature sets are
//! L2-normalised, each image is paired with its own caption, the per-pair score is
//! `100 * <img, txt>`, and the clamp `max(mean, 0)` is applied once, after the mean (a single
//! negative pair does not get clamped on its own). The features come from the CLIP towers in
//! [`crate::models::clip`] (image embeddings after `visual_projection`, text embeddings after
//! `text_projection`).
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ClipScoreError {
    #[error("image and text features must both be [N, D] with the same shape, got {image:?} and {text:?}")]
    Shape { image: Vec<i64>, text: Vec<i64> },
    #[error("the CLIP score needs at least one image-text pair")]
    Empty,
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// Per-pair `100 * cos(image_i, text_i)`, shape [N] (f64 for f64 features, f32 otherwise).
pub fn clip_pair_scores(
    image_features: &Tensor,
    text_features: &Tensor,
) -> Result<Tensor, ClipScoreError> {
    let (image, text) = (image_features.size(), text_features.size());
    if image.len() != 2 || image != text {
        return Err(ClipScoreError::Shape { image, text });
    }
    if image[0] == 0 {
        return Err(ClipScoreError::Empty);
    }
    let normalise = |t: &Tensor| -> Result<Tensor, tch::TchError> {
        // Half-precision features are scored in f32; f64 stays f64.
        let t = t.f_to_kind(if t.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        })?;
        let norm = t.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?;
        t.f_div(&norm)
    };
    let (image, text) = (normalise(image_features)?, normalise(text_features)?);
    Ok(image
        .f_mul(&text)?
        .f_sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)?
        .f_mul_scalar(100.0)?)
}

/// The CLIP score of a set: `max(mean_i 100 * cos(image_i, text_i), 0)`.
pub fn clip_score(image_features: &Tensor, text_features: &Tensor) -> Result<f64, ClipScoreError> {
    let scores = tch::no_grad(|| clip_pair_scores(image_features, text_features))?;
    let mean = scores
        .f_to_kind(Kind::Double)?
        .f_mean(Kind::Double)?
        .f_double_value(&[])?;
    Ok(mean.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], rows: i64) -> Tensor {
        Tensor::from_slice(values).reshape([rows, -1])
    }

    #[test]
    fn cosine_times_100_independent_of_scale() {
        let image = t(&[3.0, 4.0, 0.0, 0.0, 2.0, 0.0], 2);
        let text = t(&[6.0, 8.0, 0.0, 1.0, 1.0, 0.0], 2);
        let pairs = clip_pair_scores(&image, &text).unwrap();
        let expected = [100.0, 100.0 / 2f64.sqrt()];
        for (i, e) in expected.iter().enumerate() {
            assert!((pairs.double_value(&[i as i64]) - e).abs() < 1e-4);
        }
        let score = clip_score(&image, &text).unwrap();
        assert!((score - (expected[0] + expected[1]) / 2.0).abs() < 1e-4);
    }

    #[test]
    fn clamp_comes_after_the_mean() {
        // Pair scores +100 and -50: the mean 25 stands (clamping each pair first would give 50).
        let image = t(&[1.0, 0.0, 1.0, 0.0], 2);
        let text = t(&[1.0, 0.0, -0.5, 0.75f32.sqrt()], 2);
        assert!((clip_score(&image, &text).unwrap() - 25.0).abs() < 1e-4);
        // All pairs negative: the mean is negative and clamps to 0.
        let text = t(&[-1.0, 0.0, -1.0, 0.0], 2);
        assert_eq!(clip_score(&image, &text).unwrap(), 0.0);
    }

    #[test]
    fn rejects_mismatched_or_empty_features() {
        let a = t(&[1.0, 0.0, 1.0, 0.0], 2);
        let b = t(&[1.0, 0.0], 1);
        assert!(matches!(
            clip_score(&a, &b),
            Err(ClipScoreError::Shape { .. })
        ));
        let empty = Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(
            clip_score(&empty, &empty),
            Err(ClipScoreError::Empty)
        ));
    }
}

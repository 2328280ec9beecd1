//! Frechet Inception Distance in f64 (pytorch-fid formula, eigenvalue square root).
//!
//! `FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})` with unbiased covariances.
//! pytorch-fid takes `scipy.linalg.sqrtm(S1 S2)`; we use the identity
//! `Tr((S1 S2)^{1/2}) = sum_i sqrt(eig_i(A S2 A))` with `A = S1^{1/2}`: `A S2 A` is symmetric
//! positive semi-definite and similar to `S1 S2`, so two symmetric eigendecompositions replace a
//! general matrix square root, and tiny negative eigenvalues from rounding are clamped to 0.
//! The features (for example the 2048-d Inception pool features of [`crate::models::inception`])
//! are converted to f64 before any statistic is taken.
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum FidError {
    #[error("features must be a matrix [N, D], got shape {0:?}")]
    FeatureShape(Vec<i64>),
    #[error("an unbiased covariance needs at least 2 samples, got {0}")]
    TooFewSamples(i64),
    #[error("statistics need a mean [D] and a covariance [D, D], got {mean:?} and {covariance:?}")]
    StatsShape {
        mean: Vec<i64>,
        covariance: Vec<i64>,
    },
    #[error("feature dimensions differ: {0} vs {1}")]
    DimensionMismatch(i64, i64),
    #[error("statistics contain NaN or infinite values")]
    NotFinite,
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// Mean and unbiased covariance of a feature set, in f64.
#[derive(Debug)]
pub struct FeatureStats {
    mean: Tensor,
    covariance: Tensor,
}

fn all_finite(t: &Tensor) -> Result<bool, FidError> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}

impl FeatureStats {
    /// Statistics of features [N, D] (N >= 2): `mean(axis=0)` and `np.cov(rowvar=False)`.
    pub fn from_features(features: &Tensor) -> Result<Self, FidError> {
        let size = features.size();
        let &[n, _dim] = size.as_slice() else {
            return Err(FidError::FeatureShape(size));
        };
        if n < 2 {
            return Err(FidError::TooFewSamples(n));
        }
        let (mean, covariance) = tch::no_grad(|| -> Result<_, FidError> {
            let x = features.f_detach()?.f_to_kind(Kind::Double)?;
            let mean = x.f_mean_dim(0, false, Kind::Double)?;
            let centred = x.f_sub(&mean)?;
            let covariance = centred
                .f_tr()?
                .f_matmul(&centred)?
                .f_div_scalar((n - 1) as f64)?;
            Ok((mean, covariance))
        })?;
        Self::new(mean, covariance)
    }

    /// Precomputed statistics (for example a reference set's), converted to f64.
    pub fn new(mean: Tensor, covariance: Tensor) -> Result<Self, FidError> {
        let (m, c) = (mean.size(), covariance.size());
        if m.len() != 1 || c.len() != 2 || c[0] != m[0] || c[1] != m[0] {
            return Err(FidError::StatsShape {
                mean: m,
                covariance: c,
            });
        }
        let mean = mean.f_detach()?.f_to_kind(Kind::Double)?;
        let covariance = covariance.f_detach()?.f_to_kind(Kind::Double)?;
        if !all_finite(&mean)? || !all_finite(&covariance)? {
            return Err(FidError::NotFinite);
        }
        Ok(Self { mean, covariance })
    }

    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    pub fn covariance(&self) -> &Tensor {
        &self.covariance
    }

    pub fn dim(&self) -> i64 {
        self.mean.size()[0]
    }
}

/// Eigenvalues of a symmetric matrix, symmetrised first so rounding asymmetry cannot matter.
fn symmetric_eigvals(m: &Tensor) -> Result<Tensor, FidError> {
    let sym = m.f_add(&m.f_tr()?)?.f_mul_scalar(0.5)?;
    Ok(sym.f_linalg_eigvalsh("L")?)
}

/// The Frechet distance between two Gaussians given by their feature statistics.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64, FidError> {
    if a.dim() != b.dim() {
        return Err(FidError::DimensionMismatch(a.dim(), b.dim()));
    }
    tch::no_grad(|| {
        let device = a.mean.device();
        let (mu2, s2) = (
            b.mean.f_to_device(device)?,
            b.covariance.f_to_device(device)?,
        );
        let s1 = &a.covariance;
        let diff = a.mean.f_sub(&mu2)?;
        let mean_term = diff.f_dot(&diff)?.f_double_value(&[])?;

        let sym1 = s1.f_add(&s1.f_tr()?)?.f_mul_scalar(0.5)?;
        let (eigvals, eigvecs) = sym1.f_linalg_eigh("L")?;
        let sqrt_s1 = eigvecs
            .f_mul(&eigvals.f_clamp_min(0.0)?.f_sqrt()?.f_unsqueeze(0)?)?
            .f_matmul(&eigvecs.f_tr()?)?;
        let inner = sqrt_s1.f_matmul(&s2)?.f_matmul(&sqrt_s1)?;
        let tr_sqrt = symmetric_eigvals(&inner)?
            .f_clamp_min(0.0)?
            .f_sqrt()?
            .f_sum(Kind::Double)?
            .f_double_value(&[])?;

        let trace_term = s1.f_trace()?.f_double_value(&[])? + s2.f_trace()?.f_double_value(&[])?;
        let fid = mean_term + trace_term - 2.0 * tr_sqrt;
        if fid.is_finite() {
            Ok(fid)
        } else {
            Err(FidError::NotFinite)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(features: &[f64], n: i64, d: i64) -> FeatureStats {
        FeatureStats::from_features(&Tensor::from_slice(features).reshape([n, d])).unwrap()
    }

    #[test]
    fn one_dimensional_closed_form() {
        // For 1-d Gaussians FID = (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
        let a = stats(&[1.0, 3.0, 5.0], 3, 1); // mean 3, var 4
        let b = stats(&[0.0, 1.0, 2.0], 3, 1); // mean 1, var 1
        let fid = frechet_distance(&a, &b).unwrap();
        assert!((fid - (4.0 + 1.0)).abs() < 1e-12, "{fid}");
    }

    #[test]
    fn diagonal_closed_form() {
        let a = FeatureStats::new(
            Tensor::from_slice(&[0.0f64, 1.0]),
            Tensor::from_slice(&[4.0f64, 0.0, 0.0, 9.0]).reshape([2, 2]),
        )
        .unwrap();
        let b = FeatureStats::new(
            Tensor::from_slice(&[1.0f64, 1.0]),
            Tensor::from_slice(&[1.0f64, 0.0, 0.0, 16.0]).reshape([2, 2]),
        )
        .unwrap();
        // 1 + (2-1)^2 + (3-4)^2
        assert!((frechet_distance(&a, &b).unwrap() - 3.0).abs() < 1e-12);
    }

    #[test]
    fn unbiased_covariance() {
        let s = stats(&[0.0, 0.0, 2.0, 4.0], 2, 2);
        let expected = Tensor::from_slice(&[2.0f64, 4.0, 4.0, 8.0]).reshape([2, 2]);
        assert!(s.covariance().allclose(&expected, 0.0, 1e-12, false));
    }

    #[test]
    fn rejects_bad_input() {
        let one = Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(
            FeatureStats::from_features(&one),
            Err(FidError::TooFewSamples(1))
        ));
        let vec = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(
            FeatureStats::from_features(&vec),
            Err(FidError::FeatureShape(_))
        ));
        let a = stats(&[0.0, 1.0, 2.0, 3.0], 2, 2);
        let b = stats(&[0.0, 1.0, 2.0], 3, 1);
        assert!(matches!(
            frechet_distance(&a, &b),
            Err(FidError::DimensionMismatch(2, 1))
        ));
        let nan = Tensor::from_slice(&[f64::NAN, 1.0]);
        let cov = Tensor::eye(2, (Kind::Double, tch::Device::Cpu));
        assert!(matches!(
            FeatureStats::new(nan, cov),
            Err(FidError::NotFinite)
        ));
    }
}

//! Frechet Inception Distance in f64 (pytorch-fid formula, eigenvalue square root).
//!
//! `FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})` with unbiased covariances.
//! pytorch-fid takes `scipy.linalg.sqrtm(S1 S2)`; we use the identity
//! `Tr((S1 S2)^{1/2}) = sum_i sqrt(eig_i(A S2 A))` with `A = S1^{1/2}`: `A S2 A` is symmetric
//! positive semi-definite and similar to `S1 S2`, so two symmetric eigendecompositions replace a
//! general matrix square root, and tiny negative eigenvalues from rounding are clamped to 0.
//! The features (for example the 2048-d Inception pool features of [`crate::models::inception`])
//! are converted to f64 before any statistic is taken.
use std::path::Path;

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum FidError {
    #[error("FID statistics {path}: {reason}")]
    StatsFile { path: String, reason: String },
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

    /// Reference statistics from a file: a `.safetensors` with `mu` [D] and `sigma` [D, D] (as
    /// the `fid_stats` stage writes), or pytorch-fid's `--save-stats` `.npz` (`mu.npy` and
    /// `sigma.npy`, little-endian f64 or f32, C order).
    pub fn read(path: &Path) -> Result<Self, FidError> {
        let fail = |reason: String| FidError::StatsFile { path: path.display().to_string(), reason };
        let (mu, sigma) = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz")) {
            let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
            let mut archive = zip::ZipArchive::new(file).map_err(|e| fail(format!("not an .npz (zip) archive: {e}")))?;
            let mut array = |name: &str| -> Result<Tensor, FidError> {
                let mut entry = archive.by_name(&format!("{name}.npy")).map_err(|_| fail(format!("no array `{name}`")))?;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(|e| fail(e.to_string()))?;
                npy_array(&bytes).map_err(|reason| fail(format!("`{name}.npy`: {reason}")))
            };
            (array("mu")?, array("sigma")?)
        } else {
            let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path).map_err(|e| fail(e.to_string()))?.into_iter().collect();
            let get = |name: &str| tensors.get(name).map(Tensor::shallow_clone).ok_or_else(|| fail(format!("no tensor `{name}`")));
            (get("mu")?, get("sigma")?)
        };
        Self::new(mu, sigma).map_err(|e| fail(e.to_string()))
    }

    /// Writes `mu` and `sigma` (f64) as safetensors.
    pub fn write(&self, path: &Path) -> Result<(), FidError> {
        Tensor::write_safetensors(&[("mu", &self.mean), ("sigma", &self.covariance)], path).map_err(|e| FidError::StatsFile { path: path.display().to_string(), reason: e.to_string() })
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

/// A NumPy `.npy` array of little-endian f64 or f32 in C order, as f64.
fn npy_array(bytes: &[u8]) -> Result<Tensor, String> {
    let magic = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != magic {
        return Err("not a .npy array".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + header_len).map(String::from_utf8_lossy).ok_or("truncated header")?;
    let field = |key: &str| -> Option<&str> {
        let after = header.split_once(&format!("'{key}':"))?.1.trim_start();
        Some(after)
    };
    let descr = field("descr").and_then(|v| v.strip_prefix('\'')).and_then(|v| v.split('\'').next()).ok_or("no dtype")?;
    let (kind, width) = match descr {
        "<f8" => (Kind::Double, 8),
        "<f4" => (Kind::Float, 4),
        other => return Err(format!("dtype {other} (expected <f8 or <f4)")),
    };
    if !field("fortran_order").is_some_and(|v| v.starts_with("False")) {
        return Err("Fortran order is not supported".into());
    }
    let shape_text = field("shape").and_then(|v| v.strip_prefix('(')).and_then(|v| v.split(')').next()).ok_or("no shape")?;
    let shape: Vec<i64> = shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<Result<_, _>>().map_err(|_| format!("shape ({shape_text})"))?;
    let data = &bytes[start + header_len..];
    let count: i64 = shape.iter().product();
    if data.len() as i64 != count * width {
        return Err(format!("{} bytes of data for shape {shape:?}", data.len()));
    }
    let values: Vec<f64> = match kind {
        Kind::Double => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        _ => data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))).collect(),
    };
    Ok(Tensor::from_slice(&values).view(shape.as_slice()))
}

/// Mean and unbiased covariance of features that arrive in batches, so that a large image set
/// (MS-COCO's 30,000) never has to be held at once: sums of the features and of their outer
/// products in f64, shifted by the first batch's mean so that the covariance does not come from
/// the difference of two large numbers.
#[derive(Debug, Default)]
pub struct StatsAccumulator {
    shift: Option<Tensor>,
    sum: Option<Tensor>,
    outer: Option<Tensor>,
    count: i64,
}

impl StatsAccumulator {
    /// Adds features `[B, D]`.
    pub fn push(&mut self, features: &Tensor) -> Result<(), FidError> {
        let size = features.size();
        let &[b, d] = size.as_slice() else {
            return Err(FidError::FeatureShape(size));
        };
        if b == 0 {
            return Ok(());
        }
        tch::no_grad(|| -> Result<(), FidError> {
            let x = features.f_detach()?.f_to_kind(Kind::Double)?;
            let shift = match &self.shift {
                Some(shift) if shift.size()[0] == d => shift.shallow_clone(),
                Some(shift) => return Err(FidError::DimensionMismatch(shift.size()[0], d)),
                None => {
                    let shift = x.f_mean_dim(0, false, Kind::Double)?;
                    self.shift = Some(shift.shallow_clone());
                    shift
                }
            };
            let centred = x.f_sub(&shift)?;
            let sum = centred.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
            let outer = centred.f_tr()?.f_matmul(&centred)?;
            self.sum = Some(match self.sum.take() {
                Some(total) => total.f_add(&sum)?,
                None => sum,
            });
            self.outer = Some(match self.outer.take() {
                Some(total) => total.f_add(&outer)?,
                None => outer,
            });
            self.count += b;
            Ok(())
        })
    }

    pub fn count(&self) -> i64 {
        self.count
    }

    /// The statistics of every feature pushed (at least 2).
    pub fn finish(self) -> Result<FeatureStats, FidError> {
        let (Some(shift), Some(sum), Some(outer)) = (self.shift, self.sum, self.outer) else {
            return Err(FidError::TooFewSamples(0));
        };
        let n = self.count;
        if n < 2 {
            return Err(FidError::TooFewSamples(n));
        }
        let (mean, covariance) = tch::no_grad(|| -> Result<_, FidError> {
            let centred_mean = sum.f_div_scalar(n as f64)?;
            let correction = centred_mean.f_outer(&centred_mean)?.f_mul_scalar(n as f64)?;
            let covariance = outer.f_sub(&correction)?.f_div_scalar((n - 1) as f64)?;
            Ok((shift.f_add(&centred_mean)?, covariance))
        })?;
        FeatureStats::new(mean, covariance)
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

    #[test]
    fn batched_statistics_equal_those_of_the_whole_set() {
        let features = (Tensor::randn([37, 5], (Kind::Double, tch::Device::Cpu)) * 3.0 + 100.0).to_kind(Kind::Float);
        let whole = FeatureStats::from_features(&features).unwrap();
        let mut acc = StatsAccumulator::default();
        for chunk in features.split(8, 0) {
            acc.push(&chunk).unwrap();
        }
        assert_eq!(acc.count(), 37);
        let batched = acc.finish().unwrap();
        let rel = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
        assert!(rel(batched.mean(), whole.mean()) < 1e-12);
        assert!(rel(batched.covariance(), whole.covariance()) < 1e-10, "{}", rel(batched.covariance(), whole.covariance()));
        let mut one = StatsAccumulator::default();
        one.push(&features.narrow(0, 0, 1)).unwrap();
        assert!(matches!(one.finish(), Err(FidError::TooFewSamples(1))));
        let mut mixed = StatsAccumulator::default();
        mixed.push(&features).unwrap();
        assert!(matches!(mixed.push(&Tensor::zeros([2, 4], (Kind::Float, tch::Device::Cpu))), Err(FidError::DimensionMismatch(5, 4))));
    }

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

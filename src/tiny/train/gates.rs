//! Quality gates of the tiny world: measured values against fixed thresholds, on held-out data.
//!
//! The measurements: text-to-image retrieval accuracy, reconstruction PSNR, Pearson r,
//! pairwise preference accuracy, CLIP score (`100 cos`, clamped at 0 after the mean) and the
//! Frechet distance of feature statistics (f64, unbiased covariances, the trace of the matrix
//! square root from the eigenvalues of `A S2 A` with `A = S1^{1/2}`, as pytorch-fid's formula).
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::io::write_json;
use super::TrainError;

/// Which side of the threshold passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

/// One measured gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub name: String,
    pub value: f64,
    pub comparison: Comparison,
    pub threshold: f64,
    pub passed: bool,
    /// What was measured on what.
    pub detail: String,
}

impl Gate {
    pub fn new(name: &str, value: f64, comparison: Comparison, threshold: f64, detail: impl Into<String>) -> Self {
        let passed = match comparison {
            Comparison::AtLeast => value >= threshold,
            Comparison::AtMost => value <= threshold,
        };
        Gate { name: name.to_string(), value, comparison, threshold, passed: passed && value.is_finite(), detail: detail.into() }
    }

    /// One line: `PASS clip.retrieval_top1 = 0.9400 (>= 0.3): ...`.
    pub fn line(&self) -> String {
        let op = match self.comparison {
            Comparison::AtLeast => ">=",
            Comparison::AtMost => "<=",
        };
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        format!("{verdict} {} = {:.4} ({op} {}): {}", self.name, self.value, self.threshold, self.detail)
    }
}

/// `gates.json`: the gates of a stage and further measurements worth recording.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub gates: Vec<Gate>,
    pub measurements: serde_json::Map<String, serde_json::Value>,
}

pub const GATES_FILE: &str = "gates.json";

impl GateReport {
    pub fn push(&mut self, gate: Gate) {
        self.gates.push(gate);
    }

    pub fn measure(&mut self, name: &str, value: impl Serialize) {
        self.measurements.insert(name.to_string(), serde_json::to_value(value).unwrap_or(serde_json::Value::Null));
    }

    pub fn all_passed(&self) -> bool {
        self.gates.iter().all(|g| g.passed)
    }

    pub fn write(&self, dir: &Path) -> Result<(), TrainError> {
        write_json(&dir.join(GATES_FILE), self)
    }

    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(format!("cannot read {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Model(format!("{}: {e}", path.display())))
    }
}

/// Text-to-image retrieval: the fraction of texts whose own image (same row) is among the `k`
/// most similar images. Embeddings `[N, E]`, L2-normalised.
pub fn retrieval_accuracy(text: &Tensor, image: &Tensor, k: i64) -> f64 {
    let sims = text.to_kind(Kind::Double).matmul(&image.to_kind(Kind::Double).tr());
    let own = sims.diagonal(0, 0, 1).unsqueeze(1);
    // Rank of the own image: how many other images score at least as high (ties count against).
    let better = sims.ge_tensor(&own).sum_dim_intlist(1, false, Kind::Int64) - 1;
    better.lt(k).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

/// PSNR in dB of the mean squared error over all pixels of images in [0, 1].
pub fn psnr(reconstruction: &Tensor, target: &Tensor) -> f64 {
    let mse = (reconstruction.to_kind(Kind::Double) - target.to_kind(Kind::Double)).square().mean(Kind::Double).double_value(&[]);
    -10.0 * mse.max(1e-20).log10()
}

/// Pearson correlation of two equally long series.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// CLIP score: `100 * mean cos(image_i, text_i)`, clamped at 0 after the mean. Embeddings
/// `[N, E]`, L2-normalised.
pub fn clip_score(image: &Tensor, text: &Tensor) -> f64 {
    let cos = (image.to_kind(Kind::Double) * text.to_kind(Kind::Double)).sum_dim_intlist(-1, false, Kind::Double);
    (100.0 * cos.mean(Kind::Double).double_value(&[])).max(0.0)
}

/// Mean `[D]` and unbiased covariance `[D, D]` (f64) of features `[N, D]`.
pub fn feature_stats(features: &Tensor) -> Result<(Tensor, Tensor), TrainError> {
    let f = features.to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let n = f.size().first().copied().unwrap_or(0);
    if f.dim() != 2 || n < 2 {
        return Err(TrainError::Model(format!("feature statistics need [N >= 2, D] features, got {:?}", f.size())));
    }
    let mu = f.mean_dim(0, false, Kind::Double);
    let centred = &f - mu.unsqueeze(0);
    let sigma = centred.tr().matmul(&centred) / (n - 1) as f64;
    Ok((mu, sigma))
}

/// Symmetric PSD square root via the eigendecomposition (negative rounding clamped to 0).
fn sqrt_psd(m: &Tensor) -> Tensor {
    let (values, vectors) = m.linalg_eigh("L");
    let root = values.clamp_min(0.0).sqrt();
    (&vectors * root.unsqueeze(0)).matmul(&vectors.tr())
}

/// Frechet distance of two Gaussians: `|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})`.
pub fn frechet_distance(mu1: &Tensor, sigma1: &Tensor, mu2: &Tensor, sigma2: &Tensor) -> f64 {
    let (mu1, s1, mu2, s2) = (mu1.to_kind(Kind::Double), sigma1.to_kind(Kind::Double), mu2.to_kind(Kind::Double), sigma2.to_kind(Kind::Double));
    let a = sqrt_psd(&s1);
    let inner = a.matmul(&s2).matmul(&a);
    let inner = (&inner + inner.tr()) / 2.0;
    let tr_sqrt = inner.linalg_eigvalsh("L").clamp_min(0.0).sqrt().sum(Kind::Double).double_value(&[]);
    let diff = (mu1 - mu2).square().sum(Kind::Double).double_value(&[]);
    diff + s1.trace().double_value(&[]) + s2.trace().double_value(&[]) - 2.0 * tr_sqrt
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn retrieval_counts_the_own_row() {
        let t = Tensor::eye(4, (Kind::Float, Device::Cpu));
        assert_eq!(retrieval_accuracy(&t, &t, 1), 1.0);
        // Image 0 now looks like text 1 better than image 1 does.
        let img = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]).view([4, 4]);
        // Text 0 ties with every image (all similarities 0): a miss until k = 4.
        assert_eq!(retrieval_accuracy(&t, &img, 1), 0.5);
        assert_eq!(retrieval_accuracy(&t, &img, 2), 0.75);
        assert_eq!(retrieval_accuracy(&t, &img, 4), 1.0);
    }

    #[test]
    fn frechet_distance_of_known_gaussians() {
        let mu1 = Tensor::from_slice(&[0.0f64, 0.0]);
        let mu2 = Tensor::from_slice(&[3.0f64, 4.0]);
        let s1 = Tensor::from_slice(&[4.0f64, 0.0, 0.0, 1.0]).view([2, 2]);
        let s2 = Tensor::from_slice(&[1.0f64, 0.0, 0.0, 9.0]).view([2, 2]);
        // 25 + (4 + 1) + (1 + 9) - 2 (sqrt(4) + sqrt(9)) = 30.
        assert!((frechet_distance(&mu1, &s1, &mu2, &s2) - 30.0).abs() < 1e-9);
        assert!(frechet_distance(&mu1, &s1, &mu1, &s1).abs() < 1e-9);
        let f = crate::method::noise::gaussian(1, 0, &[500, 3], Device::Cpu);
        let (mu, sigma) = feature_stats(&f).unwrap();
        assert!(mu.abs().max().double_value(&[]) < 0.15);
        assert!((sigma.diagonal(0, 0, 1) - 1.0).abs().max().double_value(&[]) < 0.15);
    }

    #[test]
    fn pearson_psnr_and_gates() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.9986).abs() < 1e-3);
        let a = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
        assert!((psnr(&(&a + 0.1), &a) - 20.0).abs() < 1e-5);
        assert!(Gate::new("x", 0.5, Comparison::AtLeast, 0.3, "").passed);
        assert!(!Gate::new("x", f64::NAN, Comparison::AtMost, 0.3, "").passed);
        assert!(Gate::new("x", 0.5, Comparison::AtLeast, 0.6, "d").line().starts_with("FAIL x = 0.5000 (>= 0.6)"));
    }
}

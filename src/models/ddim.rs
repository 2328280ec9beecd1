//! DDIM scheduler (diffusers `DDIMScheduler`), with Stable Diffusion v1.5 settings as default.
//!
//! The noise schedule is computed in f64 (diffusers uses f32; the two agree to about 1e-7) and
//! applied to tensors as scalars, so `step` and `add_noise` are differentiable in their tensor
//! inputs and keep the inputs' dtype and device.
use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum DdimError {
    #[error("{path}: cannot read scheduler config: {reason}")]
    Config { path: String, reason: String },
    #[error("scheduler config: {0}")]
    Unsupported(String),
    #[error("DDIM: {0}")]
    Usage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// A diffusers `scheduler_config.json`. Missing fields take the diffusers `DDIMScheduler`
/// constructor defaults (as `from_config` does); [`DdimConfig::default`] is SD1.5's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DdimConfig {
    #[serde(default = "defaults::num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "defaults::beta_start")]
    pub beta_start: f64,
    #[serde(default = "defaults::beta_end")]
    pub beta_end: f64,
    #[serde(default = "defaults::beta_schedule")]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "defaults::yes")]
    pub clip_sample: bool,
    #[serde(default = "defaults::one")]
    pub clip_sample_range: f64,
    #[serde(default = "defaults::yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default = "defaults::prediction_type")]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "defaults::timestep_spacing")]
    pub timestep_spacing: TimestepSpacing,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

mod defaults {
    use super::*;
    pub fn num_train_timesteps() -> usize {
        1000
    }
    pub fn beta_start() -> f64 {
        0.0001
    }
    pub fn beta_end() -> f64 {
        0.02
    }
    pub fn beta_schedule() -> BetaSchedule {
        BetaSchedule::Linear
    }
    pub fn yes() -> bool {
        true
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn prediction_type() -> PredictionType {
        PredictionType::Epsilon
    }
    pub fn timestep_spacing() -> TimestepSpacing {
        TimestepSpacing::Leading
    }
}

impl Default for DdimConfig {
    /// Stable Diffusion v1.5's `scheduler/scheduler_config.json` (SPEC section 3).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// Reads a diffusers `scheduler_config.json` (fields of other schedulers are ignored).
    pub fn from_json_file(path: &Path) -> Result<Self, DdimError> {
        let err = |reason: String| DdimError::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings this implementation does not reproduce.
    pub fn validate(&self) -> Result<(), DdimError> {
        if self.num_train_timesteps == 0 {
            return Err(DdimError::Unsupported("num_train_timesteps must be positive".into()));
        }
        if self.thresholding {
            return Err(DdimError::Unsupported("dynamic thresholding is not supported".into()));
        }
        if self.rescale_betas_zero_snr {
            return Err(DdimError::Unsupported("rescale_betas_zero_snr is not supported".into()));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(DdimError::Unsupported(format!(
                    "trained_betas has {} values, num_train_timesteps is {}",
                    betas.len(),
                    self.num_train_timesteps
                )));
            }
        }
        if self.betas().iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(DdimError::Unsupported("betas must lie in [0, 1)".into()));
        }
        Ok(())
    }

    /// The training betas, as diffusers builds them.
    pub fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            if n == 1 {
                return vec![a];
            }
            (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
        };
        if let Some(betas) = &self.trained_betas {
            return betas.clone();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => {
                // diffusers' betas_for_alpha_bar with the cosine alpha_bar, max_beta 0.999.
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        }
    }

    /// `cumprod(1 - betas)`, one value per training timestep.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let mut acc = 1.0;
        self.betas()
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }

    /// The inference timesteps for `n` steps, in sampling order (descending), as diffusers'
    /// `set_timesteps` computes them.
    pub fn timesteps(&self, n: usize) -> Result<Vec<i64>, DdimError> {
        let train = self.num_train_timesteps;
        if n == 0 || n > train {
            return Err(DdimError::Usage(format!("number of inference steps {n} must be in 1..={train}")));
        }
        let steps: Vec<i64> = match self.timestep_spacing {
            TimestepSpacing::Linspace => {
                let last = (train - 1) as f64;
                (0..n)
                    .rev()
                    .map(|i| {
                        let x = if n == 1 { 0.0 } else { last * i as f64 / (n - 1) as f64 };
                        round_half_even(x) as i64
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = (train / n) as i64;
                (0..n as i64).rev().map(|i| i * ratio + self.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / n as f64;
                // np.arange(train, 0, -ratio): values train - k*ratio while > 0.
                let mut out = Vec::with_capacity(n);
                let mut k = 0usize;
                loop {
                    let v = train as f64 - k as f64 * ratio;
                    if v <= 0.0 {
                        break;
                    }
                    out.push(round_half_even(v) as i64 - 1);
                    k += 1;
                }
                out
            }
        };
        if let Some(t) = steps.iter().find(|&&t| t < 0 || t >= train as i64) {
            return Err(DdimError::Unsupported(format!(
                "timestep {t} outside 0..{train} (check steps_offset)"
            )));
        }
        Ok(steps)
    }

    /// Forward diffusion for DDPM training: `sqrt(a_t) x0 + sqrt(1 - a_t) noise`, with one
    /// timestep per sample (`timesteps` is an integer tensor of shape [B]).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor, DdimError> {
        let batch = x0.size().first().copied().unwrap_or(0);
        if timesteps.size() != [batch] {
            return Err(DdimError::Usage(format!(
                "timesteps of shape {:?} for a batch of {batch}",
                timesteps.size()
            )));
        }
        if noise.size() != x0.size() {
            return Err(DdimError::Usage(format!(
                "noise of shape {:?} for samples of shape {:?}",
                noise.size(),
                x0.size()
            )));
        }
        let train = self.num_train_timesteps as i64;
        let ts = timesteps.to_kind(Kind::Int64).to_device(tch::Device::Cpu);
        if batch > 0 {
            let (lo, hi) = (ts.min().int64_value(&[]), ts.max().int64_value(&[]));
            if lo < 0 || hi >= train {
                return Err(DdimError::Usage(format!("timesteps must lie in 0..{train}, got {lo}..={hi}")));
            }
        }
        let table = Tensor::from_slice(&self.alphas_cumprod());
        let a = table.index_select(0, &ts).to_device(x0.device()).to_kind(x0.kind());
        let mut shape = vec![batch];
        shape.resize(x0.dim(), 1);
        let sqrt_a = a.sqrt().view(shape.as_slice());
        let sqrt_1ma = (a.ones_like() - &a).sqrt().view(shape.as_slice());
        Ok(sqrt_a * x0 + sqrt_1ma * noise)
    }
}

/// numpy's `round` (half to even), used by diffusers for timesteps.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The DDIM sampler for a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    num_inference_steps: usize,
    timesteps: Vec<i64>,
}

/// The result of one DDIM step.
pub struct DdimStep {
    pub prev_sample: Tensor,
    pub pred_original_sample: Tensor,
}

impl Ddim {
    pub fn new(config: DdimConfig, num_inference_steps: usize) -> Result<Self, DdimError> {
        config.validate()?;
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let timesteps = config.timesteps(num_inference_steps)?;
        Ok(Self { config, alphas_cumprod, final_alpha_cumprod, num_inference_steps, timesteps })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Sampling timesteps, descending (SD1.5, 50 steps: 981, 961, ..., 1).
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// One DDIM update from timestep `t` (DDIM paper Eq. 12 and 16, as diffusers' `step`).
    /// `noise` is the variance noise z, required when `eta > 0`.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: i64,
        sample: &Tensor,
        eta: f64,
        noise: Option<&Tensor>,
    ) -> Result<DdimStep, DdimError> {
        let train = self.config.num_train_timesteps as i64;
        if t < 0 || t >= train {
            return Err(DdimError::Usage(format!("timestep {t} outside 0..{train}")));
        }
        if model_output.size() != sample.size() {
            return Err(DdimError::Usage(format!(
                "model output of shape {:?} for a sample of shape {:?}",
                model_output.size(),
                sample.size()
            )));
        }
        let prev_t = t - train / self.num_inference_steps as i64;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => ((sample - b_t.sqrt() * model_output) / a_t.sqrt(), model_output.shallow_clone()),
            PredictionType::Sample => {
                (model_output.shallow_clone(), (sample - a_t.sqrt() * model_output) / b_t.sqrt())
            }
            PredictionType::VPrediction => (
                a_t.sqrt() * sample - b_t.sqrt() * model_output,
                a_t.sqrt() * model_output + b_t.sqrt() * sample,
            ),
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r);
        }
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let sigma = eta * variance.sqrt();
        let direction = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt() * &eps;
        let mut prev = a_prev.sqrt() * &x0 + direction;
        if eta > 0.0 {
            let z = noise.ok_or_else(|| DdimError::Usage("eta > 0 needs variance noise".into()))?;
            if z.size() != sample.size() {
                return Err(DdimError::Usage(format!(
                    "variance noise of shape {:?} for a sample of shape {:?}",
                    z.size(),
                    sample.size()
                )));
            }
            prev += sigma * z;
        }
        Ok(DdimStep { prev_sample: prev, pred_original_sample: x0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_schedule_matches_spec_checks() {
        let a = DdimConfig::default().alphas_cumprod();
        assert_eq!(a.len(), 1000);
        assert!((a[0] - 0.99915).abs() < 1e-6, "{}", a[0]);
        assert!((a[981] - 0.0057755).abs() < 1e-6, "{}", a[981]);
        assert!((a[999] - 0.0046601).abs() < 1e-6, "{}", a[999]);
    }

    #[test]
    fn sd15_leading_timesteps() {
        let ts = DdimConfig::default().timesteps(50).unwrap();
        assert_eq!(ts.len(), 50);
        assert_eq!(ts[0], 981);
        assert_eq!(ts[1], 961);
        assert_eq!(*ts.last().unwrap(), 1);
        assert!(DdimConfig::default().timesteps(0).is_err());
        assert!(DdimConfig::default().timesteps(1001).is_err());
    }

    #[test]
    fn json_missing_fields_take_diffusers_defaults() {
        let c: DdimConfig = serde_json::from_str(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#).unwrap();
        assert!(c.clip_sample && c.set_alpha_to_one);
        assert_eq!(c.beta_schedule, BetaSchedule::Linear);
        let bad: Result<DdimConfig, _> = serde_json::from_str(r#"{"beta_schedule": "sigmoid"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn eta_zero_step_inverts_add_noise_prediction() {
        let ddim = Ddim::new(DdimConfig::default(), 50).unwrap();
        let x0 = Tensor::randn([2, 4, 3, 3], (Kind::Double, tch::Device::Cpu));
        let eps = Tensor::randn([2, 4, 3, 3], (Kind::Double, tch::Device::Cpu));
        let t = 981;
        let xt = ddim.config().add_noise(&x0, &eps, &Tensor::from_slice(&[t, t])).unwrap();
        let out = ddim.step(&eps, t, &xt, 0.0, None).unwrap();
        let diff = (out.pred_original_sample - &x0).abs().max().double_value(&[]);
        assert!(diff < 1e-9, "{diff}");
        assert!(ddim.step(&eps, t, &xt, 1.0, None).is_err());
    }
}

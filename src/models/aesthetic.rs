//! LAION-style aesthetic MLP head.
//!
//! The improved-aesthetic-predictor head is `nn.Sequential(Linear(768, 1024), Dropout,
//! Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1))`: no
//! activations, dropout only in training, so its Linear layers sit at indices 0, 2, 4, 6, 7 and
//! the weights are named `layers.{i}.{weight,bias}`. The widths are configurable (the tiny world
//! uses a smaller head); the index pattern (a dropout after each layer but the last two) is kept.
use serde::Deserialize;
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum AestheticError {
    #[error("aesthetic head config: {0}")]
    Config(String),
    #[error("aesthetic head input: {0}")]
    Input(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AestheticConfig {
    /// Layer widths from the input embedding to the score, e.g. `[768, 1024, 128, 64, 16, 1]`.
    pub dims: Vec<i64>,
}

impl Default for AestheticConfig {
    /// The LAION aesthetic predictor v2 head on CLIP ViT-L/14 image embeddings.
    fn default() -> Self {
        Self { dims: vec![768, 1024, 128, 64, 16, 1] }
    }
}

impl AestheticConfig {
    pub fn validate(&self) -> Result<(), AestheticError> {
        if self.dims.len() < 2 {
            return Err(AestheticError::Config(format!("needs at least two widths, got {:?}", self.dims)));
        }
        if self.dims.iter().any(|&d| d <= 0) {
            return Err(AestheticError::Config(format!("widths must be positive, got {:?}", self.dims)));
        }
        if self.dims.last() != Some(&1) {
            return Err(AestheticError::Config(format!("the last width must be 1 (one score), got {:?}", self.dims)));
        }
        Ok(())
    }

    /// `nn.Sequential` indices of the Linear layers: a dropout follows every layer but the last two.
    pub fn linear_indices(&self) -> Vec<usize> {
        let n = self.dims.len() - 1;
        let mut index = 0;
        (0..n)
            .map(|i| {
                let at = index;
                index += if i + 2 < n { 2 } else { 1 };
                at
            })
            .collect()
    }
}

pub struct AestheticHead {
    layers: Vec<nn::Linear>,
    input_dim: i64,
}

impl AestheticHead {
    /// Variables `layers.{i}.{weight,bias}` under `root`.
    pub fn new(root: &nn::Path, config: &AestheticConfig) -> Result<Self, AestheticError> {
        config.validate()?;
        let seq = root / "layers";
        let layers = config
            .linear_indices()
            .into_iter()
            .zip(config.dims.windows(2))
            .map(|(i, w)| nn::linear(&seq / i, w[0], w[1], Default::default()))
            .collect();
        Ok(Self { layers, input_dim: config.dims[0] })
    }

    /// Scores `[B, 1]` for embeddings `[B, D]` (the caller L2-normalises them, as upstream).
    pub fn forward(&self, embeddings: &Tensor) -> Result<Tensor, AestheticError> {
        let size = embeddings.size();
        if size.len() != 2 || size[1] != self.input_dim {
            return Err(AestheticError::Input(format!("embeddings of shape {size:?}, expected [B, {}]", self.input_dim)));
        }
        Ok(self.layers.iter().fold(embeddings.shallow_clone(), |x, l| l.forward(&x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laion_indices() {
        assert_eq!(AestheticConfig::default().linear_indices(), vec![0, 2, 4, 6, 7]);
        assert_eq!(AestheticConfig { dims: vec![8, 4, 1] }.linear_indices(), vec![0, 1]);
        assert_eq!(AestheticConfig { dims: vec![8, 6, 4, 1] }.linear_indices(), vec![0, 2, 3]);
    }

    #[test]
    fn rejects_bad_configs_and_inputs() {
        assert!(AestheticConfig { dims: vec![8] }.validate().is_err());
        assert!(AestheticConfig { dims: vec![8, 2] }.validate().is_err());
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let head = AestheticHead::new(&vs.root(), &AestheticConfig { dims: vec![8, 4, 1] }).unwrap();
        assert!(head.forward(&Tensor::zeros([2, 7], tch::kind::FLOAT_CPU)).is_err());
        assert_eq!(head.forward(&Tensor::zeros([2, 8], tch::kind::FLOAT_CPU)).unwrap().size(), [2, 1]);
    }
}

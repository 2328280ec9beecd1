//! Inception v3 as pytorch-fid builds it (FID features).
//!
//! pytorch-fid 0.3.0's `InceptionV3([3])` with `fid_inception_v3()`: torchvision's Inception v3
//! with the blocks of TensorFlow's FID graph (`FIDInceptionA/C/E_1` average-pool without
//! counting padding, `FIDInceptionE_2` max-pools), eval-mode batch norm (eps 0.001). Weights are
//! read under the names of the `pt_inception-2015-12-05` checkpoint
//! (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...); its classifier
//! (`fc.*`) is not used.
use std::path::Path;

use tch::nn::{self, Init};
use tch::Tensor;

use super::weights::{self, Extra, TensorMap, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum InceptionError {
    #[error("Inception input: {0}")]
    Input(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Conv (no bias) + BatchNorm (eps 0.001, running statistics) + ReLU: torchvision's BasicConv2d.
struct BasicConv2d {
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
}

impl BasicConv2d {
    fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: [i64; 2], stride: i64, padding: [i64; 2]) -> Self {
        let conv = &p / "conv";
        let bn = &p / "bn";
        let fan_in = c_in * kernel[0] * kernel[1];
        let bound = 1.0 / (fan_in as f64).sqrt();
        Self {
            weight: conv.var("weight", &[c_out, c_in, kernel[0], kernel[1]], Init::Uniform { lo: -bound, up: bound }),
            bn_weight: bn.var("weight", &[c_out], Init::Const(1.0)),
            bn_bias: bn.var("bias", &[c_out], Init::Const(0.0)),
            running_mean: bn.zeros_no_train("running_mean", &[c_out]),
            running_var: bn.ones_no_train("running_var", &[c_out]),
            stride: [stride, stride],
            padding,
        }
    }

    fn square(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, pad: i64) -> Self {
        Self::new(p, c_in, c_out, [k, k], stride, [pad, pad])
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, None::<Tensor>, self.stride, self.padding, [1, 1], 1)
            .batch_norm(
                Some(&self.bn_weight),
                Some(&self.bn_bias),
                Some(&self.running_mean),
                Some(&self.running_var),
                false,
                0.1,
                1e-3,
                true,
            )
            .relu()
    }
}

fn avg_pool_3x3(x: &Tensor) -> Tensor {
    // count_include_pad=False: the FID graph averages only over real pixels at the border.
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

fn max_pool(x: &Tensor, stride: i64, padding: i64) -> Tensor {
    x.max_pool2d([3, 3], [stride, stride], [padding, padding], [1, 1], false)
}

/// FIDInceptionA (Mixed_5b/c/d).
struct BlockA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl BlockA {
    fn new(p: nn::Path, c_in: i64, pool_features: i64) -> Self {
        Self {
            branch1x1: BasicConv2d::square(&p / "branch1x1", c_in, 64, 1, 1, 0),
            branch5x5_1: BasicConv2d::square(&p / "branch5x5_1", c_in, 48, 1, 1, 0),
            branch5x5_2: BasicConv2d::square(&p / "branch5x5_2", 48, 64, 5, 1, 2),
            branch3x3dbl_1: BasicConv2d::square(&p / "branch3x3dbl_1", c_in, 64, 1, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            branch3x3dbl_3: BasicConv2d::square(&p / "branch3x3dbl_3", 96, 96, 3, 1, 1),
            branch_pool: BasicConv2d::square(&p / "branch_pool", c_in, pool_features, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let b5 = self.branch5x5_2.forward(&self.branch5x5_1.forward(x));
        let b3 = self.branch3x3dbl_3.forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        let bp = self.branch_pool.forward(&avg_pool_3x3(x));
        Tensor::cat(&[b1, b5, b3, bp], 1)
    }
}

/// InceptionB (Mixed_6a): grid reduction.
struct BlockB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
}

impl BlockB {
    fn new(p: nn::Path, c_in: i64) -> Self {
        Self {
            branch3x3: BasicConv2d::square(&p / "branch3x3", c_in, 384, 3, 2, 0),
            branch3x3dbl_1: BasicConv2d::square(&p / "branch3x3dbl_1", c_in, 64, 1, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            branch3x3dbl_3: BasicConv2d::square(&p / "branch3x3dbl_3", 96, 96, 3, 2, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3.forward(x);
        let bd = self.branch3x3dbl_3.forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        Tensor::cat(&[b3, bd, max_pool(x, 2, 0)], 1)
    }
}

/// FIDInceptionC (Mixed_6b..e): factorised 7x7 convolutions.
struct BlockC {
    branch1x1: BasicConv2d,
    branch7x7: [BasicConv2d; 3],
    branch7x7dbl: [BasicConv2d; 5],
    branch_pool: BasicConv2d,
}

impl BlockC {
    fn new(p: nn::Path, c_in: i64, c7: i64) -> Self {
        let row = |name: &str, i: i64, o: i64| BasicConv2d::new(&p / name, i, o, [1, 7], 1, [0, 3]);
        let col = |name: &str, i: i64, o: i64| BasicConv2d::new(&p / name, i, o, [7, 1], 1, [3, 0]);
        Self {
            branch1x1: BasicConv2d::square(&p / "branch1x1", c_in, 192, 1, 1, 0),
            branch7x7: [
                BasicConv2d::square(&p / "branch7x7_1", c_in, c7, 1, 1, 0),
                row("branch7x7_2", c7, c7),
                col("branch7x7_3", c7, 192),
            ],
            branch7x7dbl: [
                BasicConv2d::square(&p / "branch7x7dbl_1", c_in, c7, 1, 1, 0),
                col("branch7x7dbl_2", c7, c7),
                row("branch7x7dbl_3", c7, c7),
                col("branch7x7dbl_4", c7, c7),
                row("branch7x7dbl_5", c7, 192),
            ],
            branch_pool: BasicConv2d::square(&p / "branch_pool", c_in, 192, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let chain = |convs: &[BasicConv2d]| convs.iter().fold(x.shallow_clone(), |h, c| c.forward(&h));
        let b1 = self.branch1x1.forward(x);
        let b7 = chain(&self.branch7x7);
        let bd = chain(&self.branch7x7dbl);
        let bp = self.branch_pool.forward(&avg_pool_3x3(x));
        Tensor::cat(&[b1, b7, bd, bp], 1)
    }
}

/// InceptionD (Mixed_7a): grid reduction.
struct BlockD {
    branch3x3: [BasicConv2d; 2],
    branch7x7x3: [BasicConv2d; 4],
}

impl BlockD {
    fn new(p: nn::Path, c_in: i64) -> Self {
        Self {
            branch3x3: [
                BasicConv2d::square(&p / "branch3x3_1", c_in, 192, 1, 1, 0),
                BasicConv2d::square(&p / "branch3x3_2", 192, 320, 3, 2, 0),
            ],
            branch7x7x3: [
                BasicConv2d::square(&p / "branch7x7x3_1", c_in, 192, 1, 1, 0),
                BasicConv2d::new(&p / "branch7x7x3_2", 192, 192, [1, 7], 1, [0, 3]),
                BasicConv2d::new(&p / "branch7x7x3_3", 192, 192, [7, 1], 1, [3, 0]),
                BasicConv2d::square(&p / "branch7x7x3_4", 192, 192, 3, 2, 0),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let chain = |convs: &[BasicConv2d]| convs.iter().fold(x.shallow_clone(), |h, c| c.forward(&h));
        Tensor::cat(&[chain(&self.branch3x3), chain(&self.branch7x7x3), max_pool(x, 2, 0)], 1)
    }
}

/// FIDInceptionE_1 (Mixed_7b, average pool) and FIDInceptionE_2 (Mixed_7c, max pool).
struct BlockE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
    max_pool: bool,
}

impl BlockE {
    fn new(p: nn::Path, c_in: i64, max_pool: bool) -> Self {
        let row = |name: &str| BasicConv2d::new(&p / name, 384, 384, [1, 3], 1, [0, 1]);
        let col = |name: &str| BasicConv2d::new(&p / name, 384, 384, [3, 1], 1, [1, 0]);
        Self {
            branch1x1: BasicConv2d::square(&p / "branch1x1", c_in, 320, 1, 1, 0),
            branch3x3_1: BasicConv2d::square(&p / "branch3x3_1", c_in, 384, 1, 1, 0),
            branch3x3_2a: row("branch3x3_2a"),
            branch3x3_2b: col("branch3x3_2b"),
            branch3x3dbl_1: BasicConv2d::square(&p / "branch3x3dbl_1", c_in, 448, 1, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&p / "branch3x3dbl_2", 448, 384, 3, 1, 1),
            branch3x3dbl_3a: row("branch3x3dbl_3a"),
            branch3x3dbl_3b: col("branch3x3dbl_3b"),
            branch_pool: BasicConv2d::square(&p / "branch_pool", c_in, 192, 1, 1, 0),
            max_pool,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let b3 = self.branch3x3_1.forward(x);
        let b3 = Tensor::cat(&[self.branch3x3_2a.forward(&b3), self.branch3x3_2b.forward(&b3)], 1);
        let bd = self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x));
        let bd = Tensor::cat(&[self.branch3x3dbl_3a.forward(&bd), self.branch3x3dbl_3b.forward(&bd)], 1);
        let pooled = if self.max_pool { max_pool(x, 1, 1) } else { avg_pool_3x3(x) };
        let bp = self.branch_pool.forward(&pooled);
        Tensor::cat(&[b1, b3, bd, bp], 1)
    }
}

/// The FID feature extractor: images in [0, 1] to 2048-d pool features.
pub struct InceptionV3 {
    stem1: [BasicConv2d; 3],
    stem2: [BasicConv2d; 2],
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7b: BlockE,
    mixed_7c: BlockE,
}

impl InceptionV3 {
    pub const FEATURES: i64 = 2048;
    pub const INPUT_SIZE: i64 = 299;

    /// Variables under `root` with the `pt_inception-2015-12-05` names.
    pub fn new(root: &nn::Path) -> Self {
        let r = |name: &str| root / name;
        Self {
            stem1: [
                BasicConv2d::square(r("Conv2d_1a_3x3"), 3, 32, 3, 2, 0),
                BasicConv2d::square(r("Conv2d_2a_3x3"), 32, 32, 3, 1, 0),
                BasicConv2d::square(r("Conv2d_2b_3x3"), 32, 64, 3, 1, 1),
            ],
            stem2: [
                BasicConv2d::square(r("Conv2d_3b_1x1"), 64, 80, 1, 1, 0),
                BasicConv2d::square(r("Conv2d_4a_3x3"), 80, 192, 3, 1, 0),
            ],
            mixed_5: [BlockA::new(r("Mixed_5b"), 192, 32), BlockA::new(r("Mixed_5c"), 256, 64), BlockA::new(r("Mixed_5d"), 288, 64)],
            mixed_6a: BlockB::new(r("Mixed_6a"), 288),
            mixed_6: [
                BlockC::new(r("Mixed_6b"), 768, 128),
                BlockC::new(r("Mixed_6c"), 768, 160),
                BlockC::new(r("Mixed_6d"), 768, 160),
                BlockC::new(r("Mixed_6e"), 768, 192),
            ],
            mixed_7a: BlockD::new(r("Mixed_7a"), 768),
            mixed_7b: BlockE::new(r("Mixed_7b"), 1280, false),
            mixed_7c: BlockE::new(r("Mixed_7c"), 2048, true),
        }
    }

    /// Builds the model in `vs` and loads a `pt_inception-2015-12-05`-style checkpoint; its
    /// classifier and batch-norm counters are skipped, any other unknown tensor is an error.
    pub fn load(vs: &nn::VarStore, path: &Path) -> Result<Self, InceptionError> {
        let model = Self::new(&vs.root());
        let tensors: TensorMap = weights::load_weights(path)?.into_iter().filter(|(k, _)| !Self::is_unused_tensor(k)).collect();
        weights::assign(vs, &tensors, Extra::Reject, path)?;
        Ok(model)
    }

    /// Tensors of an FID checkpoint that the feature extractor does not use: the classifier and
    /// the batch-norm counters.
    pub fn is_unused_tensor(name: &str) -> bool {
        name.starts_with("fc.") || name.ends_with(".num_batches_tracked")
    }

    /// Pool features `[B, 2048]` of images `[B, 3, H, W]` in [0, 1]: bilinear resize to 299
    /// (align_corners false), scale to [-1, 1], the network, global average pool.
    pub fn features(&self, images: &Tensor) -> Result<Tensor, InceptionError> {
        let dims = images.size();
        if dims.len() != 4 || dims[1] != 3 {
            return Err(InceptionError::Input(format!("images of shape {dims:?}, expected [B, 3, H, W]")));
        }
        let s = Self::INPUT_SIZE;
        let x = images.upsample_bilinear2d([s, s], false, None, None) * 2.0 - 1.0;
        let x = self.stem1.iter().fold(x, |h, c| c.forward(&h));
        let x = max_pool(&x, 2, 0);
        let x = self.stem2.iter().fold(x, |h, c| c.forward(&h));
        let x = max_pool(&x, 2, 0);
        let x = self.mixed_5.iter().fold(x, |h, b| b.forward(&h));
        let x = self.mixed_6a.forward(&x);
        let x = self.mixed_6.iter().fold(x, |h, b| b.forward(&h));
        let x = self.mixed_7c.forward(&self.mixed_7b.forward(&self.mixed_7a.forward(&x)));
        Ok(x.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_names_follow_the_fid_checkpoint() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = InceptionV3::new(&vs.root());
        let vars = vs.variables();
        for name in [
            "Conv2d_1a_3x3.conv.weight",
            "Conv2d_1a_3x3.bn.running_var",
            "Mixed_5b.branch_pool.bn.bias",
            "Mixed_6e.branch7x7dbl_5.conv.weight",
            "Mixed_7a.branch7x7x3_4.bn.running_mean",
            "Mixed_7c.branch3x3dbl_3b.conv.weight",
        ] {
            assert!(vars.contains_key(name), "{name}");
        }
        assert_eq!(vars["Mixed_6b.branch7x7_2.conv.weight"].size(), [128, 128, 1, 7]);
        // 94 BasicConv2d blocks with conv weight + 4 batch-norm tensors each.
        assert_eq!(vars.len(), 94 * 5);
    }
}

//! AutoencoderKL (diffusers): the latent autoencoder of Stable Diffusion.
//!
//! `encode` gives the parameters of the diagonal Gaussian posterior, `decode` maps latents back to
//! images in [-1, 1]. Latents are unscaled: the diffusion model works on `scaling_factor * z`,
//! so callers multiply after encoding and divide before decoding.
use std::collections::BTreeMap;
use std::path::Path;

use tch::nn::{self, Module};
use tch::Tensor;

use super::lora::LoraError;
use super::nn::{
    conv2d, group_norm, Attention, AttentionConfig, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D,
};
use super::weights::{self, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("{path}: cannot read the VAE config: {reason}")]
    ConfigFile { path: std::path::PathBuf, reason: String },
    #[error("unsupported VAE config: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// The fields of a diffusers `vae/config.json` (defaults of the diffusers constructor except
/// `scaling_factor`, which every SD checkpoint sets). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: Option<serde_json::Value>,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string()],
            up_block_types: vec!["UpDecoderBlock2D".to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: None,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Stable Diffusion v1.5's `vae/config.json`.
    pub fn sd15() -> Self {
        let blocks = |name: &str| vec![name.to_string(); 4];
        Self {
            down_block_types: blocks("DownEncoderBlock2D"),
            up_block_types: blocks("UpDecoderBlock2D"),
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: Some(serde_json::json!(512)),
            ..Self::default()
        }
    }

    /// The side of the latents of `image_side` x `image_side` images (each block but the last
    /// halves it).
    pub fn latent_side(&self, image_side: i64) -> i64 {
        image_side >> self.block_out_channels.len().saturating_sub(1)
    }

    pub fn from_file(path: &Path) -> Result<Self, VaeError> {
        let err = |reason: String| VaeError::ConfigFile { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), VaeError> {
        let unsupported = |what: String| Err(VaeError::Unsupported(what));
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported(format!(
                "{} down blocks, {} up blocks and {} block_out_channels: they must be the same non-zero count",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            ));
        }
        if let Some(other) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return unsupported(format!("down block `{other}` (only DownEncoderBlock2D)"));
        }
        if let Some(other) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return unsupported(format!("up block `{other}` (only UpDecoderBlock2D)"));
        }
        if self.act_fn != "silu" {
            return unsupported(format!("act_fn `{}` (only silu)", self.act_fn));
        }
        if self.layers_per_block <= 0 || self.latent_channels <= 0 {
            return unsupported("non-positive layers_per_block or latent_channels".to_string());
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| **c <= 0 || **c % self.norm_num_groups != 0) {
            return unsupported(format!(
                "{c} channels are not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        Ok(())
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, optional self attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Option<Attention>,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    fn new(path: nn::Path, channels: i64, groups: i64, add_attention: bool) -> Result<Self, LoraError> {
        let rc = ResnetBlock2DConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };
        // One head as wide as the block (`attention_head_dim = block_out_channels[-1]`).
        let attention = AttentionConfig {
            query_dim: channels,
            cross_attention_dim: None,
            heads: 1,
            dim_head: channels,
            qkv_bias: true,
            group_norm: Some((groups, 1e-6)),
            residual_connection: true,
            rescale_output_factor: 1.0,
        };
        Ok(Self {
            resnet_in: ResnetBlock2D::new(&path / "resnets" / 0, rc, None)?,
            attention: if add_attention {
                Some(Attention::new(&path / "attentions" / 0, attention, None)?)
            } else {
                None
            },
            resnet_out: ResnetBlock2D::new(&path / "resnets" / 1, rc, None)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.resnet_in.forward(xs, None);
        let h = match &self.attention {
            Some(attention) => attention.forward(&h, None),
            None => h,
        };
        self.resnet_out.forward(&h, None)
    }
}

fn resnet(path: nn::Path, in_channels: i64, out_channels: i64, groups: i64) -> Result<ResnetBlock2D, LoraError> {
    let rc = ResnetBlock2DConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::new(path, rc, None)
}

#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(path: nn::Path, cfg: &AutoencoderKLConfig) -> Result<Self, LoraError> {
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let groups = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = channels[0];
        for (i, &channel) in channels.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channel;
            let block = &path / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let in_ch = if j == 0 { input_channel } else { output_channel };
                    resnet(&block / "resnets" / j, in_ch, output_channel, groups)
                })
                .collect::<Result<_, _>>()?;
            let downsampler = (i + 1 < n).then(|| Downsample2D::new(&block / "downsamplers" / 0, output_channel, 0));
            down_blocks.push((resnets, downsampler));
        }
        Ok(Self {
            conv_in: conv2d(&path / "conv_in", cfg.in_channels, channels[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&path / "mid_block", channels[n - 1], groups, cfg.mid_block_add_attention)?,
            conv_norm_out: group_norm(&path / "conv_norm_out", groups, channels[n - 1], 1e-6),
            conv_out: conv2d(&path / "conv_out", channels[n - 1], 2 * cfg.latent_channels, 3, 1, 1),
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(xs);
        for (resnets, downsampler) in &self.down_blocks {
            for resnet in resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(down) = downsampler {
                h = down.forward(&h);
            }
        }
        let h = self.mid_block.forward(&h);
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(path: nn::Path, cfg: &AutoencoderKLConfig) -> Result<Self, LoraError> {
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = reversed.len();
        let groups = cfg.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = reversed[0];
        for (i, &channel) in reversed.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = channel;
            let block = &path / "up_blocks" / i;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let in_ch = if j == 0 { prev_output_channel } else { output_channel };
                    resnet(&block / "resnets" / j, in_ch, output_channel, groups)
                })
                .collect::<Result<_, _>>()?;
            let upsampler = (i + 1 < n).then(|| Upsample2D::new(&block / "upsamplers" / 0, output_channel));
            up_blocks.push((resnets, upsampler));
        }
        Ok(Self {
            conv_in: conv2d(&path / "conv_in", cfg.latent_channels, reversed[0], 3, 1, 1),
            mid_block: MidBlock::new(&path / "mid_block", reversed[0], groups, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: group_norm(&path / "conv_norm_out", groups, reversed[n - 1], 1e-6),
            conv_out: conv2d(&path / "conv_out", reversed[n - 1], cfg.out_channels, 3, 1, 1),
        })
    }

    fn forward(&self, zs: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(zs));
        for (resnets, upsampler) in &self.up_blocks {
            for resnet in resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(up) = upsampler {
                h = up.forward(&h, None);
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl AutoencoderKL {
    pub fn new(path: nn::Path, cfg: &AutoencoderKLConfig) -> Result<Self, VaeError> {
        cfg.validate()?;
        let latent = cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(&path / "encoder", cfg)?,
            decoder: Decoder::new(&path / "decoder", cfg)?,
            quant_conv: cfg.use_quant_conv.then(|| conv2d(&path / "quant_conv", 2 * latent, 2 * latent, 1, 1, 0)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv2d(&path / "post_quant_conv", latent, latent, 1, 1, 0)),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Images `[B, 3, H, W]` in [-1, 1] -> `(mean, logvar)`, each `[B, latent, H/f, W/f]`, with
    /// logvar clamped to [-30, 20] as `DiagonalGaussianDistribution` does.
    pub fn encode(&self, xs: &Tensor) -> (Tensor, Tensor) {
        let h = self.encoder.forward(xs);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&h),
            None => h,
        };
        let halves = moments.chunk(2, 1);
        (halves[0].shallow_clone(), halves[1].clamp(-30.0, 20.0))
    }

    /// Unscaled latents `[B, latent, h, w]` -> images `[B, 3, h*f, w*f]` (about [-1, 1]).
    pub fn decode(&self, zs: &Tensor) -> Tensor {
        let zs = match &self.post_quant_conv {
            Some(conv) => conv.forward(zs),
            None => zs.shallow_clone(),
        };
        self.decoder.forward(&zs)
    }

    /// Diffusion latents (scaled by `scaling_factor`) to images in [0, 1], differentiable:
    /// `(decode(z / s) / 2 + 0.5).clamp(0, 1)`, decoded in `compute` (the weights' dtype),
    /// mapped and clamped in fp32.
    pub fn decode_images(&self, latents: &Tensor, compute: tch::Kind) -> Tensor {
        let decoded = self.decode(&(latents / self.config.scaling_factor).to_kind(compute));
        (decoded.to_kind(tch::Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0)
    }
}

/// Renames the mid-block attention tensors of old checkpoints (`query`, `key`, `value`,
/// `proj_attn`) to the current names (`to_q`, `to_k`, `to_v`, `to_out.0`), as diffusers'
/// `_convert_deprecated_attention_blocks` does. Current names pass through unchanged.
/// Generic in the value so that name listings (without tensor data) go through the same rules.
pub fn rename_legacy_attention<T>(tensors: BTreeMap<String, T>) -> BTreeMap<String, T> {
    const RENAMES: [(&str, &str); 4] = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];
    tensors
        .into_iter()
        .map(|(name, tensor)| {
            let renamed =
                ["encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0."].iter().find_map(|block| {
                    let rest = name.strip_prefix(block)?;
                    let (old, param) = rest.split_once('.')?;
                    let new = RENAMES.iter().find(|(from, _)| *from == old)?.1;
                    Some(format!("{block}{new}.{param}"))
                });
            (renamed.unwrap_or(name), tensor)
        })
        .collect()
}

/// Loads a diffusers VAE checkpoint (either attention naming) into `vs` strictly.
pub fn load_weights(vs: &nn::VarStore, file: &Path) -> Result<(), WeightsError> {
    let tensors = rename_legacy_attention(weights::read_safetensors(file)?);
    weights::assign(vs, &tensors, weights::Extra::Reject, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::weights::TensorMap;
    use tch::{Device, Kind};

    #[test]
    fn legacy_names_are_renamed_and_others_kept() {
        let t = || Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let names = [
            "encoder.mid_block.attentions.0.query.weight",
            "decoder.mid_block.attentions.0.proj_attn.bias",
            "decoder.mid_block.attentions.0.group_norm.weight",
            "encoder.mid_block.attentions.0.to_k.weight",
            "encoder.down_blocks.0.resnets.0.conv1.weight",
        ];
        let map: TensorMap = names.iter().map(|n| (n.to_string(), t())).collect();
        let renamed: Vec<String> = rename_legacy_attention(map).into_keys().collect();
        assert_eq!(
            renamed,
            vec![
                "decoder.mid_block.attentions.0.group_norm.weight",
                "decoder.mid_block.attentions.0.to_out.0.bias",
                "encoder.down_blocks.0.resnets.0.conv1.weight",
                "encoder.mid_block.attentions.0.to_k.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
            ]
        );
    }

    #[test]
    fn shapes_and_config() {
        let cfg = AutoencoderKLConfig {
            block_out_channels: vec![32, 64],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            norm_num_groups: 8,
            ..AutoencoderKLConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let vae = AutoencoderKL::new(vs.root(), &cfg).unwrap();
        let (mean, logvar) = tch::no_grad(|| vae.encode(&Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu))));
        assert_eq!(mean.size(), vec![2, 4, 8, 8]);
        assert_eq!(logvar.size(), vec![2, 4, 8, 8]);
        let image = tch::no_grad(|| vae.decode(&mean));
        assert_eq!(image.size(), vec![2, 3, 16, 16]);
        let bad = AutoencoderKLConfig { up_block_types: vec!["AttnUpDecoderBlock2D".into(); 2], ..cfg };
        assert!(bad.validate().unwrap_err().to_string().contains("AttnUpDecoderBlock2D"));
        assert_eq!(AutoencoderKLConfig::sd15().scaling_factor, 0.18215);
    }
}

//! Building blocks shared by the diffusers models (ResNet blocks, attention, transformer blocks).
//!
//! Each block is created under a `tch::nn::Path` with the sub-names diffusers uses, so a
//! diffusers state dict maps one-to-one onto the `VarStore`. Every `nn.Linear` of diffusers is a
//! [`lora::Linear`] here, which an adapter group may wrap by name.
use tch::nn::{self, Module};
use tch::Tensor;

use super::lora::{self, LoraError, LoraGroup};

/// A 2-D convolution with the diffusers defaults (bias, square kernel).
pub fn conv2d(
    path: nn::Path,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    let config = nn::ConvConfig { stride, padding, ..Default::default() };
    nn::conv2d(path, in_channels, out_channels, kernel, config)
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm(path: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(path, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// `torch.nn.LayerNorm(dim, eps)` with affine parameters.
pub fn layer_norm(path: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(path, vec![dim], nn::LayerNormConfig { eps, ..Default::default() })
}

/// `diffusers.models.resnet.ResnetBlock2D` with `time_embedding_norm="default"`, SiLU and no
/// dropout: `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<lora::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the time embedding; `None` for the VAE's blocks, which have no `time_emb_proj`.
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(path: nn::Path, cfg: ResnetBlock2DConfig, lora: Option<&LoraGroup>) -> Result<Self, LoraError> {
        let time_emb_proj = match cfg.temb_channels {
            Some(temb) => Some(lora::linear(&path / "time_emb_proj", temb, cfg.out_channels, true, lora)?),
            None => None,
        };
        let conv_shortcut = (cfg.in_channels != cfg.out_channels)
            .then(|| conv2d(&path / "conv_shortcut", cfg.in_channels, cfg.out_channels, 1, 1, 0));
        Ok(Self {
            norm1: group_norm(&path / "norm1", cfg.groups, cfg.in_channels, cfg.eps),
            conv1: conv2d(&path / "conv1", cfg.in_channels, cfg.out_channels, 3, 1, 1),
            time_emb_proj,
            norm2: group_norm(&path / "norm2", cfg.groups, cfg.out_channels, cfg.eps),
            conv2: conv2d(&path / "conv2", cfg.out_channels, cfg.out_channels, 3, 1, 1),
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(xs).silu());
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => h + proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1),
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `diffusers.models.attention_processor.Attention` with the `AttnProcessor2_0` forward.
/// The UNet uses it on token sequences `[B, L, C]`; the VAE mid block on feature maps `[B, C, H, W]`
/// with a group norm in front, a residual connection and bias on q/k/v.
#[derive(Debug)]
pub struct Attention {
    group_norm: Option<nn::GroupNorm>,
    to_q: lora::Linear,
    to_k: lora::Linear,
    to_v: lora::Linear,
    to_out: lora::Linear,
    heads: i64,
    residual_connection: bool,
    rescale_output_factor: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: i64,
    /// Width of the context for cross attention; `None` for self attention.
    pub cross_attention_dim: Option<i64>,
    pub heads: i64,
    pub dim_head: i64,
    /// Bias on `to_q`, `to_k`, `to_v` (`to_out.0` always has one).
    pub qkv_bias: bool,
    /// `(groups, eps)` of the group norm applied before the projections.
    pub group_norm: Option<(i64, f64)>,
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
}

impl Attention {
    pub fn new(path: nn::Path, cfg: AttentionConfig, lora: Option<&LoraGroup>) -> Result<Self, LoraError> {
        let inner = cfg.heads * cfg.dim_head;
        let context_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        Ok(Self {
            group_norm: cfg
                .group_norm
                .map(|(groups, eps)| group_norm(&path / "group_norm", groups, cfg.query_dim, eps)),
            to_q: lora::linear(&path / "to_q", cfg.query_dim, inner, cfg.qkv_bias, lora)?,
            to_k: lora::linear(&path / "to_k", context_dim, inner, cfg.qkv_bias, lora)?,
            to_v: lora::linear(&path / "to_v", context_dim, inner, cfg.qkv_bias, lora)?,
            to_out: lora::linear(&path / "to_out" / 0, inner, cfg.query_dim, true, lora)?,
            heads: cfg.heads,
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        })
    }

    /// `xs`: `[B, L, C]` or `[B, C, H, W]`; `context`: `[B, L', D]` for cross attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let input_shape = xs.size();
        let tokens = if input_shape.len() == 4 {
            let (b, c) = (input_shape[0], input_shape[1]);
            xs.view([b, c, -1]).transpose(1, 2)
        } else {
            xs.shallow_clone()
        };
        let tokens = match &self.group_norm {
            Some(norm) => norm.forward(&tokens.transpose(1, 2)).transpose(1, 2),
            None => tokens,
        };
        let context = context.unwrap_or(&tokens);
        let b = tokens.size()[0];
        let split_heads = |t: Tensor| t.view([b, -1, self.heads, t.size()[2] / self.heads]).transpose(1, 2);
        let q = split_heads(self.to_q.forward(&tokens));
        let k = split_heads(self.to_k.forward(context));
        let v = split_heads(self.to_v.forward(context));
        let attn = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let (h, d) = (attn.size()[1], attn.size()[3]);
        let out = self.to_out.forward(&attn.transpose(1, 2).reshape([b, -1, h * d]));
        let out = if input_shape.len() == 4 { out.transpose(-1, -2).reshape(&input_shape[..]) } else { out };
        let out = if self.residual_connection { out + xs } else { out };
        if self.rescale_output_factor == 1.0 {
            out
        } else {
            out / self.rescale_output_factor
        }
    }
}

/// `FeedForward(dim, activation_fn="geglu")`: `net.2(h * gelu(gate))` with `[h, gate] = net.0.proj(x)`.
#[derive(Debug)]
pub struct FeedForward {
    proj_in: lora::Linear,
    proj_out: lora::Linear,
}

impl FeedForward {
    pub fn new(path: nn::Path, dim: i64, mult: i64, lora: Option<&LoraGroup>) -> Result<Self, LoraError> {
        let inner = dim * mult;
        Ok(Self {
            proj_in: lora::linear(&path / "net" / 0 / "proj", dim, inner * 2, true, lora)?,
            proj_out: lora::linear(&path / "net" / 2, inner, dim, true, lora)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let projected = self.proj_in.forward(xs);
        let halves = projected.chunk(2, -1);
        self.proj_out.forward(&(&halves[0] * halves[1].gelu("none")))
    }
}

/// `BasicTransformerBlock` with layer norms: self attention, cross attention, GEGLU feed-forward,
/// each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        path: nn::Path,
        dim: i64,
        heads: i64,
        dim_head: i64,
        cross_attention_dim: i64,
        lora: Option<&LoraGroup>,
    ) -> Result<Self, LoraError> {
        let attention = |cross_attention_dim| AttentionConfig {
            query_dim: dim,
            cross_attention_dim,
            heads,
            dim_head,
            qkv_bias: false,
            group_norm: None,
            residual_connection: false,
            rescale_output_factor: 1.0,
        };
        Ok(Self {
            norm1: layer_norm(&path / "norm1", dim, 1e-5),
            attn1: Attention::new(&path / "attn1", attention(None), lora)?,
            norm2: layer_norm(&path / "norm2", dim, 1e-5),
            attn2: Attention::new(&path / "attn2", attention(Some(cross_attention_dim)), lora)?,
            norm3: layer_norm(&path / "norm3", dim, 1e-5),
            ff: FeedForward::new(&path / "ff", dim, 4, lora)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let xs = self.attn1.forward(&self.norm1.forward(xs), None) + xs;
        let xs = self.attn2.forward(&self.norm2.forward(&xs), Some(context)) + xs;
        self.ff.forward(&self.norm3.forward(&xs)) + xs
    }
}

#[derive(Debug)]
enum Projection {
    Conv(nn::Conv2D),
    Linear(lora::Linear),
}

/// `Transformer2DModel` on continuous inputs: group norm, `proj_in` (1x1 conv or linear per
/// `use_linear_projection`), transformer blocks over the `H*W` tokens, `proj_out`, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub heads: i64,
    pub dim_head: i64,
    pub in_channels: i64,
    pub num_layers: i64,
    pub cross_attention_dim: i64,
    pub norm_num_groups: i64,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(path: nn::Path, cfg: Transformer2DConfig, lora: Option<&LoraGroup>) -> Result<Self, LoraError> {
        let inner = cfg.heads * cfg.dim_head;
        let projection = |name: &str, from: i64, to: i64| -> Result<Projection, LoraError> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(lora::linear(&path / name, from, to, true, lora)?)
            } else {
                Projection::Conv(conv2d(&path / name, from, to, 1, 1, 0))
            })
        };
        let proj_in = projection("proj_in", cfg.in_channels, inner)?;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &path / "transformer_blocks" / i,
                    inner,
                    cfg.heads,
                    cfg.dim_head,
                    cfg.cross_attention_dim,
                    lora,
                )
            })
            .collect::<Result<_, _>>()?;
        let proj_out = projection("proj_out", inner, cfg.in_channels)?;
        Ok(Self {
            norm: group_norm(&path / "norm", cfg.norm_num_groups, cfg.in_channels, 1e-6),
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let shape = xs.size();
        let (b, h, w) = (shape[0], shape[2], shape[3]);
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let normed = self.norm.forward(xs);
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)),
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context);
        }
        let to_map = |t: &Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)),
            Projection::Linear(linear) => to_map(&linear.forward(&tokens)),
        };
        out + xs
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3x3 conv named `conv`. With `padding == 0`
/// diffusers pads right and bottom by one first (the VAE encoder).
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(path: nn::Path, channels: i64, padding: i64) -> Self {
        Self { conv: conv2d(&path / "conv", channels, channels, 3, 2, padding), pad_right_bottom: padding == 0 }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour upsampling then a 3x3 conv named `conv`.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(path: nn::Path, channels: i64) -> Self {
        Self { conv: conv2d(&path / "conv", channels, channels, 3, 1, 1) }
    }

    /// `size`: the output height and width (the UNet passes its skip connection's, so odd sizes
    /// round-trip); `None` doubles them.
    pub fn forward(&self, xs: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let size = size.unwrap_or_else(|| {
            let s = xs.size();
            [s[2] * 2, s[3] * 2]
        });
        self.conv.forward(&xs.upsample_nearest2d(size, None, None))
    }
}

/// Sinusoidal timestep embedding (`diffusers.models.embeddings.get_timestep_embedding`, max
/// period 10000): `[B] -> [B, dim]`, `[sin, cos]` or `[cos, sin]` with `flip_sin_to_cos`.
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (tch::Kind::Float, timesteps.device())) * (-(10000f64.ln()));
    let exponent = exponent / (half as f64 - freq_shift);
    let args = timesteps.to_kind(tch::Kind::Float).unsqueeze(-1) * exponent.exp().unsqueeze(0);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[args.cos(), args.sin()], -1)
    } else {
        Tensor::cat(&[args.sin(), args.cos()], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(t)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: lora::Linear,
    linear_2: lora::Linear,
}

impl TimestepEmbedding {
    pub fn new(path: nn::Path, in_dim: i64, time_embed_dim: i64, lora: Option<&LoraGroup>) -> Result<Self, LoraError> {
        Ok(Self {
            linear_1: lora::linear(&path / "linear_1", in_dim, time_embed_dim, true, lora)?,
            linear_2: lora::linear(&path / "linear_2", time_embed_dim, time_embed_dim, true, lora)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

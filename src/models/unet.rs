//! UNet2DConditionModel (diffusers): the epsilon predictor of Stable Diffusion.
//!
//! Configured by a diffusers `unet/config.json` ([`UNet2DConditionConfig`]); built under a
//! `VarStore` path with the upstream parameter names, so `weights::assign` loads a diffusers
//! checkpoint as is. The LoRA adapter group, when given, wraps every target linear layer by its
//! full name (e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`).
use std::path::Path;

use tch::nn::{self, Module};
use tch::Tensor;

use super::lora::{LoraError, LoraGroup};
use super::nn::{
    conv2d, group_norm, timestep_embedding, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, TimestepEmbedding,
    Transformer2DConfig, Transformer2DModel, Upsample2D,
};

#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    #[error("{path}: cannot read the UNet config: {reason}")]
    ConfigFile { path: std::path::PathBuf, reason: String },
    #[error("unsupported UNet config: {0}")]
    Unsupported(String),
    #[error("invalid UNet config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// An int or a per-block list, as diffusers accepts for several fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    All(i64),
    Each(Vec<i64>),
}

impl PerBlock {
    /// The value for each of `n` blocks.
    fn expand(&self, n: usize, field: &str) -> Result<Vec<i64>, UnetError> {
        match self {
            PerBlock::All(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => {
                Err(UnetError::Invalid(format!("`{field}` has {} entries for {n} down blocks", v.len())))
            }
        }
    }
}

/// `only_cross_attention`: a bool or a per-block list of bools.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum BoolPerBlock {
    All(bool),
    Each(Vec<bool>),
}

/// The fields of a diffusers `unet/config.json`. Defaults are those of the diffusers constructor;
/// unknown fields are ignored; values this implementation lacks are rejected by [`Self::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<i64>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: BoolPerBlock,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: i64,
    pub transformer_layers_per_block: PerBlock,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads per block (diffusers' historical misnomer), used when
    /// `num_attention_heads` is null.
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<i64>,
    /// Softmax in fp32; diffusers' default `AttnProcessor2_0` (fused attention) ignores it, and
    /// so does this implementation, which uses the same fused kernel.
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub projection_class_embeddings_input_dim: Option<i64>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: strings(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            only_cross_attention: BoolPerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::All(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_string(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
        }
    }
}

/// The per-block numbers the model is built from, after validation (the builder and the memory
/// estimate walk them).
#[derive(Debug, Clone)]
pub struct BlockPlan {
    pub cross_attention: Vec<bool>,
    pub layers: Vec<i64>,
    pub heads: Vec<i64>,
    pub transformer_layers: Vec<i64>,
    pub groups: i64,
}

impl UNet2DConditionConfig {
    /// Stable Diffusion v1.5's `unet/config.json`.
    pub fn sd15() -> Self {
        Self { sample_size: Some(64), cross_attention_dim: 768, ..Self::default() }
    }

    pub fn from_file(path: &Path) -> Result<Self, UnetError> {
        let err = |reason: String| UnetError::ConfigFile { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects what this implementation does not have (class / addition embeddings, dual cross
    /// attention, other time embeddings, ...) and inconsistent block lists.
    pub fn validate(&self) -> Result<(), UnetError> {
        self.plan().map(|_| ())
    }

    /// Validates the config and expands its per-block lists.
    pub fn plan(&self) -> Result<BlockPlan, UnetError> {
        let unsupported = |what: &str| Err(UnetError::Unsupported(what.to_string()));
        let set = |name: &str, value: &dyn std::fmt::Debug| format!("`{name}` = {value:?} (only null is supported)");
        let optional_fields: [(&str, bool, &dyn std::fmt::Debug); 13] = [
            ("class_embed_type", self.class_embed_type.is_some(), &self.class_embed_type),
            ("addition_embed_type", self.addition_embed_type.is_some(), &self.addition_embed_type),
            ("num_class_embeds", self.num_class_embeds.is_some(), &self.num_class_embeds),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some(), &self.encoder_hid_dim),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some(), &self.encoder_hid_dim_type),
            ("time_embedding_dim", self.time_embedding_dim.is_some(), &self.time_embedding_dim),
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_some(), &self.time_embedding_act_fn),
            ("timestep_post_act", self.timestep_post_act.is_some(), &self.timestep_post_act),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some(), &self.time_cond_proj_dim),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim.is_some(),
                &self.projection_class_embeddings_input_dim,
            ),
            ("cross_attention_norm", self.cross_attention_norm.is_some(), &self.cross_attention_norm),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block.is_some(),
                &self.reverse_transformer_layers_per_block,
            ),
            ("num_attention_heads", self.num_attention_heads.is_some(), &self.num_attention_heads),
        ];
        if let Some((name, _, value)) = optional_fields.iter().find(|(_, present, _)| *present) {
            return Err(UnetError::Unsupported(set(name, value)));
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention");
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat");
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act");
        }
        if self.act_fn != "silu" {
            return Err(UnetError::Unsupported(format!("act_fn `{}` (only silu)", self.act_fn)));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(UnetError::Unsupported(format!(
                "resnet_time_scale_shift `{}` (only default)",
                self.resnet_time_scale_shift
            )));
        }
        if self.time_embedding_type != "positional" {
            return Err(UnetError::Unsupported(format!(
                "time_embedding_type `{}` (only positional)",
                self.time_embedding_type
            )));
        }
        if self.attention_type != "default" {
            return Err(UnetError::Unsupported(format!("attention_type `{}` (only default)", self.attention_type)));
        }
        if self.resnet_out_scale_factor != 1.0 {
            return unsupported("resnet_out_scale_factor other than 1");
        }
        if self.dropout != 0.0 {
            return unsupported("dropout other than 0 (the model has no dropout)");
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return unsupported("even conv_in_kernel / conv_out_kernel");
        }
        let only_cross = match &self.only_cross_attention {
            BoolPerBlock::All(v) => *v,
            BoolPerBlock::Each(v) => v.iter().any(|b| *b),
        };
        if only_cross || self.mid_block_only_cross_attention == Some(true) {
            return unsupported("only_cross_attention");
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(UnetError::Unsupported(format!(
                "mid_block_type {:?} (only UNetMidBlock2DCrossAttn)",
                self.mid_block_type
            )));
        }
        let groups = self.norm_num_groups.ok_or_else(|| UnetError::Unsupported("norm_num_groups null".to_string()))?;

        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(UnetError::Invalid(format!(
                "{} down blocks, {} up blocks and {} block_out_channels: they must be the same non-zero count",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            )));
        }
        let cross_attention = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(UnetError::Unsupported(format!("down block `{other}`"))),
            })
            .collect::<Result<Vec<bool>, _>>()?;
        for (i, t) in self.up_block_types.iter().enumerate() {
            let cross = match t.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return Err(UnetError::Unsupported(format!("up block `{other}`"))),
            };
            // The up block at position i mirrors the down block n-1-i; diffusers does not require
            // it, but every released SD-family UNet has it and this builder's skip plan assumes it.
            if cross != cross_attention[n - 1 - i] {
                return Err(UnetError::Unsupported(format!(
                    "up block {i} `{t}` does not mirror down block {} `{}`",
                    n - 1 - i,
                    self.down_block_types[n - 1 - i]
                )));
            }
        }
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        let transformer_layers = self.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        if layers.iter().chain(&heads).chain(&transformer_layers).any(|v| *v <= 0) {
            return Err(UnetError::Invalid("layer and head counts must be positive".to_string()));
        }
        for (i, (&channels, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if channels <= 0 || channels % groups != 0 {
                return Err(UnetError::Invalid(format!(
                    "block_out_channels[{i}] = {channels} is not a positive multiple of norm_num_groups {groups}"
                )));
            }
            if cross_attention[i] && channels % h != 0 {
                return Err(UnetError::Invalid(format!(
                    "block {i}: {channels} channels do not split into {h} attention heads"
                )));
            }
        }
        if self.block_out_channels[n - 1] % heads[n - 1] != 0 {
            return Err(UnetError::Invalid("mid block channels do not split into its attention heads".to_string()));
        }
        Ok(BlockPlan { cross_attention, layers, heads, transformer_layers, groups })
    }
}

/// A down or up block: resnets, optional transformers after each, optional resampler.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_out: ResnetBlock2D,
}

/// diffusers' `UNet2DConditionModel` with the blocks of SD 1.x / 2.x.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: nn::Conv2D,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl UNet2DConditionModel {
    /// Builds the model under `path` (its root for a diffusers checkpoint) with fresh variables;
    /// load weights with `weights::assign`. With `lora`, the group's target layers register.
    pub fn new(path: nn::Path, cfg: &UNet2DConditionConfig, lora: Option<&LoraGroup>) -> Result<Self, UnetError> {
        let plan = cfg.plan()?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let eps = cfg.norm_eps;
        let temb_dim = channels[0] * 4;
        let resnet = |path: nn::Path, in_channels: i64, out_channels: i64, scale: f64| {
            let rc = ResnetBlock2DConfig {
                in_channels,
                out_channels,
                temb_channels: Some(temb_dim),
                groups: plan.groups,
                eps,
                output_scale_factor: scale,
            };
            ResnetBlock2D::new(path, rc, lora)
        };
        let transformer = |path: nn::Path, channels: i64, heads: i64, layers: i64| {
            let tc = Transformer2DConfig {
                heads,
                dim_head: channels / heads,
                in_channels: channels,
                num_layers: layers,
                cross_attention_dim: cfg.cross_attention_dim,
                norm_num_groups: plan.groups,
                use_linear_projection: cfg.use_linear_projection,
            };
            Transformer2DModel::new(path, tc, lora)
        };

        let conv_in = conv2d(
            &path / "conv_in",
            cfg.in_channels,
            channels[0],
            cfg.conv_in_kernel,
            1,
            (cfg.conv_in_kernel - 1) / 2,
        );
        let time_embedding = TimestepEmbedding::new(&path / "time_embedding", channels[0], temb_dim, lora)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = channels[0];
        for (i, &channel) in channels.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channel;
            let block_path = &path / "down_blocks" / i;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..plan.layers[i] {
                let in_ch = if j == 0 { input_channel } else { output_channel };
                resnets.push(resnet(&block_path / "resnets" / j, in_ch, output_channel, 1.0)?);
                if plan.cross_attention[i] {
                    attentions.push(transformer(
                        &block_path / "attentions" / j,
                        output_channel,
                        plan.heads[i],
                        plan.transformer_layers[i],
                    )?);
                }
            }
            let downsampler = (i + 1 < n)
                .then(|| Downsample2D::new(&block_path / "downsamplers" / 0, output_channel, cfg.downsample_padding));
            down_blocks.push(DownBlock { resnets, attentions, downsampler });
        }

        let mid_path = &path / "mid_block";
        let mid_channels = channels[n - 1];
        let mid_block = MidBlock {
            resnet_in: resnet(&mid_path / "resnets" / 0, mid_channels, mid_channels, cfg.mid_block_scale_factor)?,
            attention: transformer(
                &mid_path / "attentions" / 0,
                mid_channels,
                plan.heads[n - 1],
                plan.transformer_layers[n - 1],
            )?,
            resnet_out: resnet(&mid_path / "resnets" / 1, mid_channels, mid_channels, cfg.mid_block_scale_factor)?,
        };

        let mut up_blocks = Vec::with_capacity(n);
        let reversed: Vec<i64> = channels.iter().rev().copied().collect();
        let mut output_channel = reversed[0];
        for (i, &channel) in reversed.iter().enumerate() {
            let down_index = n - 1 - i;
            let prev_output_channel = output_channel;
            output_channel = channel;
            let input_channel = reversed[(i + 1).min(n - 1)];
            let block_path = &path / "up_blocks" / i;
            let num_layers = plan.layers[down_index] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip_channels = if j == num_layers - 1 { input_channel } else { output_channel };
                let in_ch = if j == 0 { prev_output_channel } else { output_channel };
                resnets.push(resnet(&block_path / "resnets" / j, in_ch + skip_channels, output_channel, 1.0)?);
                if plan.cross_attention[down_index] {
                    attentions.push(transformer(
                        &block_path / "attentions" / j,
                        output_channel,
                        plan.heads[down_index],
                        plan.transformer_layers[down_index],
                    )?);
                }
            }
            let upsampler = (i + 1 < n).then(|| Upsample2D::new(&block_path / "upsamplers" / 0, output_channel));
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
        }

        let conv_norm_out = group_norm(&path / "conv_norm_out", plan.groups, channels[0], eps);
        let conv_out = conv2d(
            &path / "conv_out",
            channels[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            (cfg.conv_out_kernel - 1) / 2,
        );
        if let Some(group) = lora {
            group.check_bound()?;
        }
        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// `sample [B, C, h, w]`, `timesteps [B]` (per sample; a single value is broadcast),
    /// `encoder_hidden_states [B, L, D]` -> the prediction `[B, out_channels, h, w]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Tensor {
        let batch = sample.size()[0];
        let sample = if self.config.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let timesteps = timesteps.to_device(sample.device()).reshape([-1]).expand([batch], false);
        let t_emb = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        );
        let emb = self.time_embedding.forward(&t_emb.to_kind(sample.kind()));
        let context = encoder_hidden_states;

        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, Some(&emb));
                if let Some(attention) = block.attentions.get(j) {
                    h = attention.forward(&h, context);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h);
                skips.push(h.shallow_clone());
            }
        }

        h = self.mid_block.resnet_in.forward(&h, Some(&emb));
        h = self.mid_block.attention.forward(&h, context);
        h = self.mid_block.resnet_out.forward(&h, Some(&emb));

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().unwrap_or_else(|| unreachable!("the down path pushes one skip per up resnet"));
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1), Some(&emb));
                if let Some(attention) = block.attentions.get(j) {
                    h = attention.forward(&h, context);
                }
            }
            if let Some(up) = &block.upsampler {
                // The next skip fixes the size, so odd latent sizes come back exactly.
                let size = skips.last().map(|s| {
                    let shape = s.size();
                    [shape[2], shape[3]]
                });
                h = up.forward(&h, size);
            }
        }

        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny() -> UNet2DConditionConfig {
        UNet2DConditionConfig {
            block_out_channels: vec![32, 64],
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            layers_per_block: PerBlock::All(1),
            cross_attention_dim: 16,
            norm_num_groups: Some(8),
            attention_head_dim: PerBlock::All(2),
            ..UNet2DConditionConfig::default()
        }
    }

    #[test]
    fn reads_a_diffusers_config_and_ignores_unknown_fields() {
        let json = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
            "act_fn": "silu", "attention_head_dim": [2, 4], "block_out_channels": [32, 64],
            "center_input_sample": false, "cross_attention_dim": 16,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1,
            "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 8, "out_channels": 4,
            "sample_size": 8, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#;
        let cfg: UNet2DConditionConfig = serde_json::from_str(json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.attention_head_dim, PerBlock::Each(vec![2, 4]));
        assert_eq!(cfg.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
    }

    #[test]
    fn rejects_unsupported_values_by_name() {
        let cases: Vec<(UNet2DConditionConfig, &str)> = vec![
            (UNet2DConditionConfig { class_embed_type: Some("timestep".into()), ..tiny() }, "class_embed_type"),
            (UNet2DConditionConfig { addition_embed_type: Some("text_time".into()), ..tiny() }, "addition_embed_type"),
            (UNet2DConditionConfig { dual_cross_attention: true, ..tiny() }, "dual_cross_attention"),
            (UNet2DConditionConfig { num_attention_heads: Some(PerBlock::All(2)), ..tiny() }, "num_attention_heads"),
            (UNet2DConditionConfig { act_fn: "gelu".into(), ..tiny() }, "act_fn"),
            (UNet2DConditionConfig { mid_block_type: None, ..tiny() }, "mid_block_type"),
            (UNet2DConditionConfig { attention_head_dim: PerBlock::Each(vec![2]), ..tiny() }, "attention_head_dim"),
            (UNet2DConditionConfig { attention_head_dim: PerBlock::All(3), ..tiny() }, "heads"),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "`{err}` does not name `{needle}`");
        }
    }

    #[test]
    fn lora_wraps_the_four_projections_of_every_attention_module() {
        let vs = nn::VarStore::new(Device::Cpu);
        let group = LoraGroup::new(crate::models::lora::default_targets());
        let _unet = UNet2DConditionModel::new(vs.root(), &tiny(), Some(&group)).unwrap();
        // Transformers: 1 in down block 0, 1 in the mid block, 2 in up block 1; two attention
        // modules each, four projections each.
        let names = group.layer_names();
        assert_eq!(names.len(), 4 * 2 * 4);
        assert!(names.contains(&"up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0".to_string()));
        assert!(names.iter().all(|n| vs.variables().contains_key(&format!("{n}.weight"))));
    }

    #[test]
    fn odd_latent_sizes_come_back_exactly() {
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), &tiny(), None).unwrap();
        let out = tch::no_grad(|| {
            unet.forward(
                &Tensor::randn([2, 4, 7, 9], (Kind::Float, Device::Cpu)),
                &Tensor::from_slice(&[10i64, 900]),
                &Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)),
            )
        });
        assert_eq!(out.size(), vec![2, 4, 7, 9]);
    }
}

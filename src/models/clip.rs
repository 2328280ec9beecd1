//! CLIP text and vision towers (transformers and open_clip layouts).
//!
//! One pre-LN transformer serves both towers and both checkpoint layouts; a [`Layout`] only
//! decides the tensor names (and whether q/k/v are three linears or one packed `in_proj`), so
//! transformers' `CLIPModel`/`CLIPTextModel`/`CLIPVisionModelWithProjection` checkpoints and
//! open_clip's `CLIP` state dicts load as they are. Configs are read from transformers'
//! `config.json` or open_clip's model-config JSON; small configs (the tiny world) use the same code.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::weights::{self, Extra, WeightsError};

/// CLIP's image normalisation (OpenAI statistics).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{path}: cannot read CLIP config: {reason}")]
    Config { path: String, reason: String },
    #[error("CLIP config: {0}")]
    Unsupported(String),
    #[error("CLIP input: {0}")]
    Input(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Which upstream package's tensor names the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers `CLIPModel` (`text_model.*`, `vision_model.*`, `*_projection.weight`).
    Transformers,
    /// open_clip `CLIP` (`token_embedding`, `transformer.resblocks.*`, `visual.*`).
    OpenClip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD's text encoder).
    QuickGelu,
    /// exact (erf) GELU (open_clip's default, e.g. ViT-H-14).
    Gelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
        }
    }

    fn from_hf(name: &str) -> Result<Self, ClipError> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(ClipError::Unsupported(format!("hidden_act `{other}` (supported: quick_gelu, gelu)"))),
        }
    }
}

/// The shape of one transformer stack.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub mlp_width: i64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl TransformerConfig {
    fn validate(&self, tower: &str) -> Result<(), ClipError> {
        if self.width <= 0 || self.layers < 0 || self.heads <= 0 || self.mlp_width <= 0 {
            return Err(ClipError::Unsupported(format!("{tower}: non-positive dimensions in {self:?}")));
        }
        if self.width % self.heads != 0 {
            return Err(ClipError::Unsupported(format!(
                "{tower}: width {} is not a multiple of {} heads",
                self.width, self.heads
            )));
        }
        Ok(())
    }
}

/// Where the text tower reads its pooled feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooling {
    /// At `argmax(ids)`: the EOT token, the largest id (open_clip; transformers with eos id 2).
    ArgmaxId,
    /// At the first occurrence of this id (transformers with a real `eos_token_id`).
    FirstOf(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub transformer: TransformerConfig,
    pub vocab_size: i64,
    pub context_length: i64,
    pub pooling: TextPooling,
    /// Output size of `text_projection`; `None` for a tower without one (SD's `CLIPTextModel`).
    pub projection_dim: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub transformer: TransformerConfig,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    /// Output size of the visual projection; `None` for a bare `CLIPVisionModel`.
    pub projection_dim: Option<i64>,
}

impl VisionConfig {
    /// OpenAI CLIP ViT-L/14's image tower (the aesthetic reward's and the CLIP score's), as
    /// transformers' `CLIPVisionConfig` of `openai/clip-vit-large-patch14`.
    pub fn vit_l14() -> Self {
        VisionConfig {
            transformer: TransformerConfig { width: 1024, layers: 24, heads: 16, mlp_width: 4096, layer_norm_eps: 1e-5, activation: Activation::QuickGelu },
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            projection_dim: Some(768),
        }
    }

    pub fn num_positions(&self) -> i64 {
        let grid = self.image_size / self.patch_size;
        grid * grid + 1
    }
}

/// A whole CLIP (either tower may be absent) and the layout of its checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub layout: Layout,
    pub text: Option<TextConfig>,
    pub vision: Option<VisionConfig>,
    /// Whether the checkpoint carries `logit_scale` (full two-tower models).
    pub logit_scale: bool,
}

// ---------------------------------------------------------------------------------------------
// Config files

/// transformers `CLIPTextConfig` (defaults as in transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub struct HfTextConfig {
    #[serde(default = "hf::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "hf::text_hidden")]
    pub hidden_size: i64,
    #[serde(default = "hf::text_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "hf::projection_dim")]
    pub projection_dim: i64,
    #[serde(default = "hf::layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "hf::text_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "hf::context")]
    pub max_position_embeddings: i64,
    #[serde(default = "hf::act")]
    pub hidden_act: String,
    #[serde(default = "hf::eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "hf::eos")]
    pub eos_token_id: i64,
}

/// transformers `CLIPVisionConfig` (defaults as in transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub struct HfVisionConfig {
    #[serde(default = "hf::vision_hidden")]
    pub hidden_size: i64,
    #[serde(default = "hf::vision_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "hf::projection_dim")]
    pub projection_dim: i64,
    #[serde(default = "hf::layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "hf::vision_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "hf::channels")]
    pub num_channels: i64,
    #[serde(default = "hf::image_size")]
    pub image_size: i64,
    #[serde(default = "hf::patch_size")]
    pub patch_size: i64,
    #[serde(default = "hf::act")]
    pub hidden_act: String,
    #[serde(default = "hf::eps")]
    pub layer_norm_eps: f64,
}

mod hf {
    pub fn vocab_size() -> i64 {
        49408
    }
    pub fn text_hidden() -> i64 {
        512
    }
    pub fn text_intermediate() -> i64 {
        2048
    }
    pub fn projection_dim() -> i64 {
        512
    }
    pub fn layers() -> i64 {
        12
    }
    pub fn text_heads() -> i64 {
        8
    }
    pub fn context() -> i64 {
        77
    }
    pub fn act() -> String {
        "quick_gelu".into()
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn eos() -> i64 {
        49407
    }
    pub fn vision_hidden() -> i64 {
        768
    }
    pub fn vision_intermediate() -> i64 {
        3072
    }
    pub fn vision_heads() -> i64 {
        12
    }
    pub fn channels() -> i64 {
        3
    }
    pub fn image_size() -> i64 {
        224
    }
    pub fn patch_size() -> i64 {
        32
    }
}

impl HfTextConfig {
    pub fn to_text_config(&self, projection_dim: Option<i64>) -> Result<TextConfig, ClipError> {
        let cfg = TextConfig {
            transformer: TransformerConfig {
                width: self.hidden_size,
                layers: self.num_hidden_layers,
                heads: self.num_attention_heads,
                mlp_width: self.intermediate_size,
                layer_norm_eps: self.layer_norm_eps,
                activation: Activation::from_hf(&self.hidden_act)?,
            },
            vocab_size: self.vocab_size,
            context_length: self.max_position_embeddings,
            // transformers keeps argmax pooling for configs saved before eos_token_id was fixed.
            pooling: if self.eos_token_id == 2 { TextPooling::ArgmaxId } else { TextPooling::FirstOf(self.eos_token_id) },
            projection_dim,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl HfVisionConfig {
    pub fn to_vision_config(&self, projection_dim: Option<i64>) -> Result<VisionConfig, ClipError> {
        let cfg = VisionConfig {
            transformer: TransformerConfig {
                width: self.hidden_size,
                layers: self.num_hidden_layers,
                heads: self.num_attention_heads,
                mlp_width: self.intermediate_size,
                layer_norm_eps: self.layer_norm_eps,
                activation: Activation::from_hf(&self.hidden_act)?,
            },
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
            projection_dim,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The fields of a transformers `config.json` that tell which CLIP it describes.
#[derive(Debug, Deserialize)]
struct HfAnyConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    text_config: Option<HfTextConfig>,
    #[serde(default)]
    vision_config: Option<HfVisionConfig>,
    #[serde(default = "hf::projection_dim")]
    projection_dim: i64,
}

/// open_clip `CLIPVisionCfg` (defaults as in open_clip 3.3; unsupported options are rejected).
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipVisionCfg {
    #[serde(default = "oc::layers")]
    pub layers: i64,
    #[serde(default = "oc::vision_width")]
    pub width: i64,
    #[serde(default = "oc::head_width")]
    pub head_width: i64,
    #[serde(default = "oc::mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "oc::patch_size")]
    pub patch_size: i64,
    #[serde(default = "oc::image_size")]
    pub image_size: serde_json::Value,
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    #[serde(default)]
    pub attentional_pool: bool,
    #[serde(default)]
    pub no_ln_pre: bool,
    #[serde(default = "oc::learnable")]
    pub pos_embed_type: String,
    #[serde(default = "oc::tok")]
    pub pool_type: String,
    #[serde(default)]
    pub timm_model_name: Option<String>,
    #[serde(default)]
    pub block_type: Option<String>,
}

/// open_clip `CLIPTextCfg` (defaults as in open_clip 3.3; unsupported options are rejected).
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipTextCfg {
    #[serde(default = "oc::context")]
    pub context_length: i64,
    #[serde(default = "oc::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "oc::text_width")]
    pub width: i64,
    #[serde(default = "oc::heads")]
    pub heads: i64,
    #[serde(default = "oc::layers")]
    pub layers: i64,
    #[serde(default = "oc::mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    #[serde(default)]
    pub embed_cls: bool,
    #[serde(default)]
    pub no_causal_mask: bool,
    #[serde(default = "oc::argmax")]
    pub pool_type: String,
    #[serde(default = "oc::linear")]
    pub proj_type: String,
    #[serde(default)]
    pub proj_bias: bool,
    #[serde(default)]
    pub hf_model_name: Option<String>,
    #[serde(default)]
    pub block_type: Option<String>,
}

/// open_clip's model-config JSON (`model_configs/ViT-H-14.json` and the like).
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipModelConfig {
    pub embed_dim: i64,
    #[serde(default)]
    pub quick_gelu: bool,
    #[serde(default)]
    pub custom_text: bool,
    pub vision_cfg: OpenClipVisionCfg,
    pub text_cfg: OpenClipTextCfg,
}

mod oc {
    pub fn layers() -> i64 {
        12
    }
    pub fn vision_width() -> i64 {
        768
    }
    pub fn head_width() -> i64 {
        64
    }
    pub fn mlp_ratio() -> f64 {
        4.0
    }
    pub fn patch_size() -> i64 {
        16
    }
    pub fn image_size() -> serde_json::Value {
        serde_json::Value::from(224)
    }
    pub fn learnable() -> String {
        "learnable".into()
    }
    pub fn tok() -> String {
        "tok".into()
    }
    pub fn context() -> i64 {
        77
    }
    pub fn vocab_size() -> i64 {
        49408
    }
    pub fn text_width() -> i64 {
        512
    }
    pub fn heads() -> i64 {
        8
    }
    pub fn argmax() -> String {
        "argmax".into()
    }
    pub fn linear() -> String {
        "linear".into()
    }
}

fn square_size(value: &serde_json::Value, what: &str) -> Result<i64, ClipError> {
    let bad = || ClipError::Unsupported(format!("{what} {value} (a positive int or an equal pair)"));
    match value {
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(bad),
        serde_json::Value::Array(v) if v.len() == 2 && v[0] == v[1] => v[0].as_i64().ok_or_else(bad),
        _ => Err(bad()),
    }
}

impl OpenClipModelConfig {
    pub fn to_clip_config(&self) -> Result<ClipConfig, ClipError> {
        let (v, t) = (&self.vision_cfg, &self.text_cfg);
        let unsupported = |what: &str| Err(ClipError::Unsupported(format!("open_clip option {what}")));
        if self.custom_text {
            return unsupported("custom_text (CustomTextCLIP layout)");
        }
        if v.ls_init_value.is_some() || t.ls_init_value.is_some() {
            return unsupported("ls_init_value (layer scale)");
        }
        if v.attentional_pool || v.no_ln_pre || v.pos_embed_type != "learnable" || v.pool_type != "tok" {
            return unsupported("vision_cfg attentional_pool / no_ln_pre / pos_embed_type / pool_type");
        }
        if v.timm_model_name.is_some() || t.hf_model_name.is_some() {
            return unsupported("timm_model_name / hf_model_name (external towers)");
        }
        if v.block_type.as_deref().is_some_and(|b| b != "default") || t.block_type.as_deref().is_some_and(|b| b != "default") {
            return unsupported("block_type other than default");
        }
        if t.embed_cls || t.no_causal_mask || t.pool_type != "argmax" || t.proj_type != "linear" || t.proj_bias {
            return unsupported("text_cfg embed_cls / no_causal_mask / pool_type / proj_type / proj_bias");
        }
        let activation = if self.quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
        if v.head_width <= 0 || v.width % v.head_width != 0 {
            return Err(ClipError::Unsupported(format!("vision width {} not a multiple of head_width {}", v.width, v.head_width)));
        }
        let vision = VisionConfig {
            transformer: TransformerConfig {
                width: v.width,
                layers: v.layers,
                heads: v.width / v.head_width,
                mlp_width: (v.width as f64 * v.mlp_ratio) as i64,
                layer_norm_eps: 1e-5,
                activation,
            },
            image_size: square_size(&v.image_size, "image_size")?,
            patch_size: v.patch_size,
            num_channels: 3,
            projection_dim: Some(self.embed_dim),
        };
        let text = TextConfig {
            transformer: TransformerConfig {
                width: t.width,
                layers: t.layers,
                heads: t.heads,
                mlp_width: (t.width as f64 * t.mlp_ratio) as i64,
                layer_norm_eps: 1e-5,
                activation,
            },
            vocab_size: t.vocab_size,
            context_length: t.context_length,
            pooling: TextPooling::ArgmaxId,
            projection_dim: Some(self.embed_dim),
        };
        vision.validate()?;
        text.validate()?;
        Ok(ClipConfig { layout: Layout::OpenClip, text: Some(text), vision: Some(vision), logit_scale: true })
    }
}

impl TextConfig {
    fn validate(&self) -> Result<(), ClipError> {
        self.transformer.validate("text")?;
        if self.vocab_size <= 0 || self.context_length <= 0 || self.projection_dim.is_some_and(|p| p <= 0) {
            return Err(ClipError::Unsupported(format!("text: non-positive sizes in {self:?}")));
        }
        Ok(())
    }
}

impl VisionConfig {
    fn validate(&self) -> Result<(), ClipError> {
        self.transformer.validate("vision")?;
        if self.patch_size <= 0 || self.image_size <= 0 || self.image_size % self.patch_size != 0 {
            return Err(ClipError::Unsupported(format!(
                "vision: image size {} is not a positive multiple of patch size {}",
                self.image_size, self.patch_size
            )));
        }
        if self.num_channels <= 0 || self.projection_dim.is_some_and(|p| p <= 0) {
            return Err(ClipError::Unsupported(format!("vision: non-positive sizes in {self:?}")));
        }
        Ok(())
    }
}

impl ClipConfig {
    /// Reads a transformers `config.json`: `CLIPConfig` (both towers and projections), or a
    /// `CLIPTextConfig` / `CLIPVisionConfig`, whose projection is present when `architectures`
    /// names a `...WithProjection` model.
    pub fn from_transformers_json(path: &Path) -> Result<Self, ClipError> {
        let err = |reason: String| ClipError::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse_transformers(&text).map_err(|e| match e {
            ClipError::Config { reason, .. } => err(reason),
            other => other,
        })
    }

    fn parse_transformers(text: &str) -> Result<Self, ClipError> {
        let json_err = |e: serde_json::Error| ClipError::Config { path: String::new(), reason: e.to_string() };
        let any: HfAnyConfig = serde_json::from_str(text).map_err(json_err)?;
        let with_projection = any.architectures.iter().any(|a| a.ends_with("WithProjection"));
        match any.model_type.as_deref() {
            Some("clip") => {
                let t = any.text_config.unwrap_or(serde_json::from_str("{}").map_err(json_err)?);
                let v = any.vision_config.unwrap_or(serde_json::from_str("{}").map_err(json_err)?);
                Ok(ClipConfig {
                    layout: Layout::Transformers,
                    text: Some(t.to_text_config(Some(any.projection_dim))?),
                    vision: Some(v.to_vision_config(Some(any.projection_dim))?),
                    logit_scale: true,
                })
            }
            Some("clip_text_model") => {
                let t: HfTextConfig = serde_json::from_str(text).map_err(json_err)?;
                let proj = with_projection.then_some(t.projection_dim);
                Ok(ClipConfig { layout: Layout::Transformers, text: Some(t.to_text_config(proj)?), vision: None, logit_scale: false })
            }
            Some("clip_vision_model") => {
                let v: HfVisionConfig = serde_json::from_str(text).map_err(json_err)?;
                let proj = with_projection.then_some(v.projection_dim);
                Ok(ClipConfig { layout: Layout::Transformers, text: None, vision: Some(v.to_vision_config(proj)?), logit_scale: false })
            }
            other => Err(ClipError::Unsupported(format!("model_type {other:?} is not a CLIP config"))),
        }
    }

    /// Reads an open_clip model-config JSON.
    pub fn from_open_clip_json(path: &Path) -> Result<Self, ClipError> {
        let err = |reason: String| ClipError::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: OpenClipModelConfig = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.to_clip_config()
    }
}

// ---------------------------------------------------------------------------------------------
// Modules

/// Creates the variable `dotted` (e.g. `"visual.ln_pre.weight"`) under `root`.
fn var(root: &nn::Path, dotted: &str, dims: &[i64], init: Init) -> Tensor {
    let Some((prefix, leaf)) = dotted.rsplit_once('.') else {
        return root.var(dotted, dims, init);
    };
    let mut segments = prefix.split('.');
    let first = segments.next().unwrap_or(prefix);
    segments.fold(root.sub(first), |p, s| p.sub(s)).var(leaf, dims, init)
}

fn kaiming(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(root: &nn::Path, name: &str, d_in: i64, d_out: i64, bias: bool) -> Self {
        let weight = var(root, &format!("{name}.weight"), &[d_out, d_in], kaiming(d_in));
        let bias = bias.then(|| var(root, &format!("{name}.bias"), &[d_out], kaiming(d_in)));
        Self { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(root: &nn::Path, name: &str, width: i64, eps: f64) -> Self {
        Self {
            weight: var(root, &format!("{name}.weight"), &[width], Init::Const(1.0)),
            bias: var(root, &format!("{name}.bias"), &[width], Init::Const(0.0)),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.weight.size()[0]], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// q/k/v as three linears (transformers) or one packed `in_proj` (torch MultiheadAttention).
enum QkvProjection {
    Separate { q: Linear, k: Linear, v: Linear },
    Packed(Linear),
}

struct Attention {
    qkv: QkvProjection,
    out: Linear,
    heads: i64,
}

impl Attention {
    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (b, l, w) = x.size3().unwrap_or((0, 0, 0));
        let (q, k, v) = match &self.qkv {
            QkvProjection::Separate { q, k, v } => (q.forward(x), k.forward(x), v.forward(x)),
            QkvProjection::Packed(p) => {
                let qkv = p.forward(x).chunk(3, -1);
                (qkv[0].shallow_clone(), qkv[1].shallow_clone(), qkv[2].shallow_clone())
            }
        };
        let head_dim = w / self.heads;
        let split = |t: Tensor| t.view([b, l, self.heads, head_dim]).transpose(1, 2);
        let out = Tensor::scaled_dot_product_attention(
            &split(q),
            &split(k),
            &split(v),
            None::<Tensor>,
            0.0,
            causal,
            None,
            false,
        );
        self.out.forward(&out.transpose(1, 2).reshape([b, l, w]))
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    fc: Linear,
    proj: Linear,
    activation: Activation,
}

impl Block {
    fn new(root: &nn::Path, prefix: &str, cfg: &TransformerConfig, layout: Layout) -> Self {
        let (w, eps) = (cfg.width, cfg.layer_norm_eps);
        let name = |s: &str| format!("{prefix}.{s}");
        match layout {
            Layout::Transformers => Self {
                ln_1: LayerNorm::new(root, &name("layer_norm1"), w, eps),
                attn: Attention {
                    qkv: QkvProjection::Separate {
                        q: Linear::new(root, &name("self_attn.q_proj"), w, w, true),
                        k: Linear::new(root, &name("self_attn.k_proj"), w, w, true),
                        v: Linear::new(root, &name("self_attn.v_proj"), w, w, true),
                    },
                    out: Linear::new(root, &name("self_attn.out_proj"), w, w, true),
                    heads: cfg.heads,
                },
                ln_2: LayerNorm::new(root, &name("layer_norm2"), w, eps),
                fc: Linear::new(root, &name("mlp.fc1"), w, cfg.mlp_width, true),
                proj: Linear::new(root, &name("mlp.fc2"), cfg.mlp_width, w, true),
                activation: cfg.activation,
            },
            Layout::OpenClip => Self {
                ln_1: LayerNorm::new(root, &name("ln_1"), w, eps),
                attn: Attention {
                    qkv: QkvProjection::Packed(Linear {
                        weight: var(root, &name("attn.in_proj_weight"), &[3 * w, w], kaiming(w)),
                        bias: Some(var(root, &name("attn.in_proj_bias"), &[3 * w], Init::Const(0.0))),
                    }),
                    out: Linear::new(root, &name("attn.out_proj"), w, w, true),
                    heads: cfg.heads,
                },
                ln_2: LayerNorm::new(root, &name("ln_2"), w, eps),
                fc: Linear::new(root, &name("mlp.c_fc"), w, cfg.mlp_width, true),
                proj: Linear::new(root, &name("mlp.c_proj"), cfg.mlp_width, w, true),
                activation: cfg.activation,
            },
        }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), causal);
        let h = self.activation.apply(&self.fc.forward(&self.ln_2.forward(&x)));
        &x + self.proj.forward(&h)
    }
}

struct Encoder {
    blocks: Vec<Block>,
}

impl Encoder {
    /// `prefix` is the stack's name: `text_model.encoder.layers` / `transformer.resblocks` / ...
    fn new(root: &nn::Path, prefix: &str, cfg: &TransformerConfig, layout: Layout) -> Self {
        let blocks = (0..cfg.layers).map(|i| Block::new(root, &format!("{prefix}.{i}"), cfg, layout)).collect();
        Self { blocks }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        self.blocks.iter().fold(x.shallow_clone(), |h, b| b.forward(&h, causal))
    }
}

/// A learned projection: a bias-free `nn.Linear` (`[out, in]`, transformers) or a raw
/// `[in, out]` matrix used as `x @ P` (open_clip).
enum Projection {
    Linear(Tensor),
    Matrix(Tensor),
}

impl Projection {
    fn new(root: &nn::Path, layout: Layout, hf_name: &str, oc_name: &str, d_in: i64, d_out: i64) -> Self {
        match layout {
            Layout::Transformers => Projection::Linear(var(root, &format!("{hf_name}.weight"), &[d_out, d_in], kaiming(d_in))),
            Layout::OpenClip => {
                Projection::Matrix(var(root, oc_name, &[d_in, d_out], Init::Randn { mean: 0.0, stdev: (d_in as f64).powf(-0.5) }))
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Projection::Linear(w) => x.linear(w, None::<Tensor>),
            Projection::Matrix(p) => x.matmul(p),
        }
    }
}

/// The outputs of the text tower.
pub struct TextOutput {
    /// After the final layer norm, `[B, L, W]`: Stable Diffusion's UNet context.
    pub last_hidden_state: Tensor,
    /// The hidden state at the EOT position, `[B, W]`.
    pub pooled: Tensor,
    /// `pooled` through `text_projection`, `[B, E]`, when the tower has one.
    pub embeds: Option<Tensor>,
}

pub struct ClipTextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_ln: LayerNorm,
    projection: Option<Projection>,
    config: TextConfig,
}

impl ClipTextTransformer {
    /// Variables under `root` with the layout's names (`text_model.*` / top-level open_clip names).
    pub fn new(root: &nn::Path, config: &TextConfig, layout: Layout) -> Self {
        let t = &config.transformer;
        let (tok, pos, stack, final_ln) = match layout {
            Layout::Transformers => (
                "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight",
                "text_model.encoder.layers",
                "text_model.final_layer_norm",
            ),
            Layout::OpenClip => ("token_embedding.weight", "positional_embedding", "transformer.resblocks", "ln_final"),
        };
        let token_embedding =
            var(root, tok, &[config.vocab_size, t.width], Init::Randn { mean: 0.0, stdev: 0.02 });
        let position_embedding =
            var(root, pos, &[config.context_length, t.width], Init::Randn { mean: 0.0, stdev: 0.01 });
        let projection = config
            .projection_dim
            .map(|e| Projection::new(root, layout, "text_projection", "text_projection", t.width, e));
        Self {
            token_embedding,
            position_embedding,
            encoder: Encoder::new(root, stack, t, layout),
            final_ln: LayerNorm::new(root, final_ln, t.width, t.layer_norm_eps),
            projection,
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// `ids`: token ids `[B, L]` (L <= context length), as the tokenizer makes them.
    pub fn forward(&self, ids: &Tensor) -> Result<TextOutput, ClipError> {
        let (b, l) = ids.size2().map_err(|_| ClipError::Input(format!("token ids of shape {:?}, expected [B, L]", ids.size())))?;
        if l > self.config.context_length || l == 0 {
            return Err(ClipError::Input(format!("{l} tokens for a context of {}", self.config.context_length)));
        }
        let ids = ids.to_kind(Kind::Int64).to_device(self.token_embedding.device());
        let x = Tensor::embedding(&self.token_embedding, &ids, -1, false, false) + self.position_embedding.narrow(0, 0, l);
        let hidden = self.final_ln.forward(&self.encoder.forward(&x, true));
        let at = match self.config.pooling {
            TextPooling::ArgmaxId => ids.argmax(-1, false),
            TextPooling::FirstOf(eos) => ids.eq(eos).to_kind(Kind::Int).argmax(-1, false),
        };
        let rows = Tensor::arange(b, (Kind::Int64, ids.device()));
        let pooled = hidden.index(&[Some(rows), Some(at)]);
        let embeds = self.projection.as_ref().map(|p| p.forward(&pooled));
        Ok(TextOutput { last_hidden_state: hidden, pooled, embeds })
    }
}

/// The outputs of the vision tower.
pub struct VisionOutput {
    /// The class token after the post layer norm, `[B, W]`.
    pub pooled: Tensor,
    /// `pooled` through the visual projection, `[B, E]`, when the tower has one.
    pub embeds: Option<Tensor>,
}

pub struct ClipVisionTransformer {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    encoder: Encoder,
    post_ln: LayerNorm,
    projection: Option<Projection>,
    config: VisionConfig,
}

impl ClipVisionTransformer {
    /// Variables under `root` with the layout's names (`vision_model.*` / `visual.*`).
    pub fn new(root: &nn::Path, config: &VisionConfig, layout: Layout) -> Self {
        let t = &config.transformer;
        let (patch, class, pos, pre, stack, post) = match layout {
            Layout::Transformers => (
                "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.class_embedding",
                "vision_model.embeddings.position_embedding.weight",
                "vision_model.pre_layrnorm",
                "vision_model.encoder.layers",
                "vision_model.post_layernorm",
            ),
            Layout::OpenClip => (
                "visual.conv1.weight",
                "visual.class_embedding",
                "visual.positional_embedding",
                "visual.ln_pre",
                "visual.transformer.resblocks",
                "visual.ln_post",
            ),
        };
        let p = config.patch_size;
        let scale = (t.width as f64).powf(-0.5);
        let patch_embedding = var(root, patch, &[t.width, config.num_channels, p, p], kaiming(config.num_channels * p * p));
        let class_embedding = var(root, class, &[t.width], Init::Randn { mean: 0.0, stdev: scale });
        let position_embedding = var(root, pos, &[config.num_positions(), t.width], Init::Randn { mean: 0.0, stdev: scale });
        let projection = config
            .projection_dim
            .map(|e| Projection::new(root, layout, "visual_projection", "visual.proj", t.width, e));
        Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_ln: LayerNorm::new(root, pre, t.width, t.layer_norm_eps),
            encoder: Encoder::new(root, stack, t, layout),
            post_ln: LayerNorm::new(root, post, t.width, t.layer_norm_eps),
            projection,
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// `pixels`: normalised images `[B, C, S, S]` at the model's image size (see [`preprocess`]).
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput, ClipError> {
        let c = &self.config;
        let s = c.image_size;
        if pixels.size().len() != 4 || pixels.size()[1..] != [c.num_channels, s, s] {
            return Err(ClipError::Input(format!(
                "images of shape {:?}, the model takes [B, {}, {s}, {s}]",
                pixels.size(),
                c.num_channels
            )));
        }
        let b = pixels.size()[0];
        let w = c.transformer.width;
        let x = pixels
            .to_kind(self.patch_embedding.kind())
            .conv2d(&self.patch_embedding, None::<Tensor>, [c.patch_size, c.patch_size], [0, 0], [1, 1], 1)
            .flatten(2, -1)
            .transpose(1, 2);
        let class = self.class_embedding.view([1, 1, w]).expand([b, 1, w], false);
        let x = Tensor::cat(&[class, x], 1) + &self.position_embedding;
        let x = self.encoder.forward(&self.pre_ln.forward(&x), false);
        let pooled = self.post_ln.forward(&x.select(1, 0));
        let embeds = self.projection.as_ref().map(|p| p.forward(&pooled));
        Ok(VisionOutput { pooled, embeds })
    }
}

/// Both towers and the logit scale.
pub struct Clip {
    pub text: Option<ClipTextTransformer>,
    pub vision: Option<ClipVisionTransformer>,
    pub logit_scale: Option<Tensor>,
}

impl Clip {
    pub fn new(root: &nn::Path, config: &ClipConfig) -> Self {
        Self {
            text: config.text.as_ref().map(|t| ClipTextTransformer::new(root, t, config.layout)),
            vision: config.vision.as_ref().map(|v| ClipVisionTransformer::new(root, v, config.layout)),
            logit_scale: config.logit_scale.then(|| root.var("logit_scale", &[], Init::Const((1.0f64 / 0.07).ln()))),
        }
    }
}

impl Clip {
    /// Builds the model in `vs` and loads its weights from `path` (a file or a component
    /// folder, see [`weights::load_weights`]). `extra` decides whether checkpoint tensors the
    /// model does not use (e.g. the vision tower when loading only the text tower) are an error.
    pub fn load(vs: &nn::VarStore, config: &ClipConfig, path: &Path, extra: Extra) -> Result<Self, ClipError> {
        let model = Self::new(&vs.root(), config);
        let tensors = canonical_names(config, weights::load_weights(path)?);
        weights::assign(vs, &tensors, extra, path)?;
        Ok(model)
    }
}

/// transformers 5 saves a bare `CLIPTextModel` / `CLIPVisionModel` without the `text_model.` /
/// `vision_model.` prefix that transformers 4 wrote (and SD1.5's `text_encoder` has); this adds
/// it back so that both load under the one set of names.
/// Generic in the value so that name listings (without tensor data) go through the same rules.
pub fn canonical_names<T>(config: &ClipConfig, tensors: BTreeMap<String, T>) -> BTreeMap<String, T> {
    if config.layout != Layout::Transformers {
        return tensors;
    }
    let prefix = match (&config.text, &config.vision) {
        (Some(t), None) if t.projection_dim.is_none() => "text_model.",
        (None, Some(v)) if v.projection_dim.is_none() => "vision_model.",
        _ => return tensors,
    };
    if tensors.keys().any(|k| k.starts_with(prefix)) {
        return tensors;
    }
    tensors.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect()
}

/// L2 normalisation along the last dimension (as `F.normalize`, eps 1e-12).
pub fn normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
    x / norm
}

/// Reward-model preprocessing: images `[B, 3, H, W]` in [0, 1] -> bilinear resize to
/// `size` x `size` (differentiable, align_corners false, no antialiasing: as
/// `F.interpolate(mode="bilinear")`) -> CLIP mean/std normalisation.
pub fn preprocess(images: &Tensor, size: i64) -> Result<Tensor, ClipError> {
    let dims = images.size();
    if dims.len() != 4 || dims[1] != 3 {
        return Err(ClipError::Input(format!("images of shape {dims:?}, expected [B, 3, H, W]")));
    }
    let resized = images.upsample_bilinear2d([size, size], false, None, None);
    let opts = (images.kind(), images.device());
    let mean = Tensor::from_slice(&CLIP_MEAN).view([1, 3, 1, 1]).to_kind(opts.0).to_device(opts.1);
    let std = Tensor::from_slice(&CLIP_STD).view([1, 3, 1, 1]).to_kind(opts.0).to_device(opts.1);
    Ok((resized - mean) / std)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny_text(layout: Layout) -> (nn::VarStore, ClipTextTransformer) {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = TextConfig {
            transformer: TransformerConfig { width: 16, layers: 2, heads: 2, mlp_width: 64, layer_norm_eps: 1e-5, activation: Activation::Gelu },
            vocab_size: 50,
            context_length: 8,
            pooling: TextPooling::ArgmaxId,
            projection_dim: Some(12),
        };
        let m = ClipTextTransformer::new(&vs.root(), &cfg, layout);
        (vs, m)
    }

    #[test]
    fn layouts_name_their_variables_as_upstream() {
        let (vs, _) = tiny_text(Layout::OpenClip);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for n in ["token_embedding.weight", "positional_embedding", "transformer.resblocks.1.attn.in_proj_weight", "ln_final.bias", "text_projection"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let (vs, _) = tiny_text(Layout::Transformers);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for n in ["text_model.embeddings.position_embedding.weight", "text_model.encoder.layers.0.self_attn.q_proj.bias", "text_projection.weight"] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
    }

    #[test]
    fn causal_mask_hides_later_tokens() {
        let (_vs, m) = tiny_text(Layout::OpenClip);
        let a = Tensor::from_slice(&[1i64, 2, 3, 49, 0, 0]).view([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 49, 7, 8]).view([1, 6]);
        let (ha, hb) = (m.forward(&a).unwrap().last_hidden_state, m.forward(&b).unwrap().last_hidden_state);
        let diff = (ha.narrow(1, 0, 4) - hb.narrow(1, 0, 4)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        assert!(m.forward(&Tensor::zeros([1, 9], (Kind::Int64, Device::Cpu))).is_err());
    }

    #[test]
    fn unsupported_open_clip_options_are_rejected() {
        let json = r#"{"embed_dim": 8, "vision_cfg": {"layers": 1, "width": 16, "patch_size": 4, "image_size": 8, "head_width": 8, "ls_init_value": 0.1}, "text_cfg": {"width": 16, "heads": 2, "layers": 1}}"#;
        let cfg: OpenClipModelConfig = serde_json::from_str(json).unwrap();
        assert!(cfg.to_clip_config().is_err());
    }
}

//! Peak accelerator memory of a training or evaluation stage: shown by `plan`, and checked
//! against the GPU's free memory before a stage loads anything.
//!
//! The estimate adds up what libtorch allocates, in bytes (`p` = bytes per element of the
//! stage's `precision`, 4 for fp32 and 2 for fp16/bf16):
//!
//! - **weights**: the floating-point elements of every model the stage loads, counted from the
//!   weight files' headers, times `p`: the UNet, the VAE (encoder and decoder: both are built),
//!   the text encoder, and the reward models of the task (aesthetic: its CLIP and head; HPS: its
//!   CLIP; compressibility: none) or, for `evaluate`, every reward and metric model.
//! - **adapters**: every adapter of the group, fp32 (4 bytes per element). Training adds, for the
//!   new adapter, its gradient and AdamW's two moments (3 x 4 bytes per element) and, for RID,
//!   the EMA teacher (4 more).
//! - **activations** of one micro-batch of `m` prompts (guidance doubles the UNet's batch to
//!   `2m`): the tensors autograd keeps for the backward pass of the last UNet call, the VAE
//!   decode and the reward model, no gradient checkpointing. They are counted op by op from the
//!   configs, by the rules autograd follows (measured with PyTorch's saved-tensor hooks): a
//!   convolution, group or layer norm, SiLU or GELU keeps its input; a linear layer with a
//!   frozen weight keeps nothing, an adapted one keeps its input and its down projection (`r`
//!   per row); fused attention keeps q, k, v and its output (and the `T x T` weights too where a
//!   head is wider than 256, which CUDA's fused kernels do not take); GEGLU keeps its 8c-wide
//!   projection and GELU's output; quick-GELU keeps its input and its sigmoid. Per sample that
//!   is `3 c_in + 3 c_out` per pixel for a ResNet block, `25 c` per token for an SD transformer
//!   block with adapters on its attention projections (`21 c` without), `6 w + 2 m_w` per token
//!   for a CLIP vision layer (`6 w + m_w` with GELU). Before the first adapted layer nothing
//!   needs a gradient, so the UNet's first ResNet keeps nothing. The count is checked against
//!   PyTorch's saved tensors for a UNet, a VAE decode and CLIP towers (`tests/parity/memory.rs`,
//!   within 5%). The backward pass then holds the gradients of about three of the largest tensors
//!   and those of the skip connections. With gradient checkpointing (`grad_checkpointing`) the
//!   decode and the reward keep their tensors for `decode_chunk` samples at a time instead of the
//!   micro-batch. RID's teacher pass (no gradient: a UNet call and, for image distillation, a
//!   decode) runs before the student's step, so it peaks alone; its target (the teacher's images
//!   or latents) is a buffer through the step.
//! - **sampling**: a UNet call without gradient keeps its skip connections and about three of
//!   its largest tensors; a VAE decode about three of its largest. Training samples steps N..2
//!   this way before the last step; evaluation samples `batch_size` images (UNet batch doubled by
//!   guidance) and decodes them at once; the peak is the larger of the passes.
//! - **buffers**: latents, text contexts and the decoded fp32 images of one batch.
//!
//! The sum is raised by 5% for the CUDA caching allocator's rounding and fragmentation, plus
//! 256 MiB for cuBLAS/cuDNN workspaces. The CUDA context itself (a few hundred MB) is not
//! counted: the free memory the check compares with is read once the context exists.

use std::path::Path;

use crate::exec::{StageContext, StageError};
use crate::models::clip::{Activation, ClipConfig, VisionConfig};
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use crate::method::objective::DistillSpace;
use crate::models::weights;
use crate::rewards::clip_loader::{ClipFiles, ClipLayout};

use crate::models::precision::Precision;
use crate::records::Task;
use super::world::{FidFeatures, WorldSpec};

/// The allocator's rounding and fragmentation, as a fraction of the tensors' bytes. Calibrated
/// on an H200 (benches/results/gpu_check.json, 2026-12-04): at the SD1.5 configs the device
/// memory in use grew by 0.97 to 1.02 times the tensors counted here, for micro-batches 1 to 8
/// with and without gradient checkpointing; 5% and the workspaces keep the estimate above
/// every measured peak.
pub const FRAGMENTATION: f64 = 0.05;
/// cuBLAS / cuDNN workspaces and small allocations.
pub const WORKSPACE_BYTES: u64 = 256 << 20;
/// Tokens of the text context (CLIP's 77).
const CONTEXT_TOKENS: i64 = 77;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Config(String),
}

fn file_err(path: &Path, reason: impl ToString) -> MemoryError {
    MemoryError::File { path: path.display().to_string(), reason: reason.to_string() }
}

/// The parts of a stage's peak memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub adapters: u64,
    /// The largest set of activations alive at once (gradient step or sampling pass).
    pub activations: u64,
    pub buffers: u64,
}

impl MemoryEstimate {
    /// The tensors' bytes with the allocator allowance and the workspaces.
    pub fn peak(&self) -> u64 {
        let tensors = (self.weights + self.adapters + self.activations + self.buffers) as f64;
        (tensors * (1.0 + FRAGMENTATION)) as u64 + WORKSPACE_BYTES
    }

    /// One line for logs and error messages.
    pub fn describe(&self) -> String {
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        format!(
            "{} (weights {}, adapters and optimizer {}, activations {}, buffers {}, +{:.0}% and {} MiB for the allocator)",
            gb(self.peak()),
            gb(self.weights),
            gb(self.adapters),
            gb(self.activations),
            gb(self.buffers),
            FRAGMENTATION * 100.0,
            WORKSPACE_BYTES >> 20
        )
    }
}

/// What a stage does, as far as memory goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// A fine-tune or joint stage: one optimizer step on micro-batches of `micro` prompts.
    Train { tasks: Vec<Task>, step: TrainStep },
    /// An evaluation: `batch` images sampled and scored at once.
    Evaluate { batch: i64, guided: bool, ranks: i64 },
}

/// The memory-relevant settings of one training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainStep {
    pub micro: i64,
    pub guided: bool,
    /// Rank of the new adapter.
    pub rank: i64,
    /// Sum of the ranks of the adapters the input model already has.
    pub earlier_ranks: i64,
    /// RID: an EMA teacher, its pass without gradient, and where its target lives.
    pub teacher: Option<DistillSpace>,
    /// Gradient checkpointing: samples decoded and scored at once (`None`: the whole micro-batch
    /// in one graph).
    pub decode_chunk: Option<i64>,
}

/// The networks a training step runs through, as far as memory goes.
pub struct TrainShapes<'a> {
    pub unet: &'a UNet2DConditionConfig,
    pub vae: &'a AutoencoderKLConfig,
    /// Image side in pixels.
    pub resolution: i64,
    /// The reward models' vision towers (differentiated through).
    pub reward_towers: Vec<VisionConfig>,
    /// Image-sized fp32 tensors the rewards keep per sample (the differentiable JPEG's).
    pub reward_fp32_images: f64,
}

/// Elements per sample of one network pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Kept by autograd for the backward pass (a pass with gradient).
    pub saved: f64,
    /// The largest single tensor of the pass.
    pub largest: f64,
    /// Held through a pass without gradient (the UNet's skip connections).
    pub held: f64,
}

impl Tally {
    fn keep(&mut self, elements: f64) {
        self.saved += elements;
        self.see(elements);
    }

    fn see(&mut self, elements: f64) {
        self.largest = self.largest.max(elements);
    }

    /// Elements alive at the peak of a pass without gradient.
    pub fn no_grad_peak(&self) -> f64 {
        self.held + 3.0 * self.largest
    }
}

/// LoRA settings that change the UNet's activations: the adapted layer-name suffixes and the
/// summed rank of the adapters the forward pass evaluates.
#[derive(Debug, Clone, Copy)]
pub struct Adapted<'a> {
    pub targets: &'a [String],
    pub ranks: i64,
}

impl Adapted<'_> {
    fn adapts(&self, layer: &str) -> bool {
        self.ranks > 0 && self.targets.iter().any(|t| layer == t || layer.ends_with(&format!(".{t}")))
    }
}

/// A ResNet block at `pixels` per sample: norm1's input, SiLU's input and conv1's input, then
/// the same three for the output width (the shortcut reads the block's input, kept already).
fn resnet(t: &mut Tally, c_in: i64, c_out: i64, pixels: i64, grad: bool) {
    let (a, b) = ((c_in * pixels) as f64, (c_out * pixels) as f64);
    t.see(a.max(b));
    if grad {
        t.keep(a);
        t.keep(a);
        t.keep(a);
        t.keep(b);
        t.keep(b);
        t.keep(b);
    }
}

/// Fused attention of `heads` heads over `tokens` queries and `keys` keys: q, k, v and the
/// output; CUDA's fused kernels take heads up to 256 wide, wider ones keep the weights.
fn attention_core(t: &mut Tally, width: i64, heads: i64, tokens: i64, keys: i64) {
    t.keep((width * tokens) as f64);
    t.keep((width * keys) as f64);
    t.keep((width * keys) as f64);
    t.keep((width * tokens) as f64);
    if width / heads.max(1) > 256 {
        t.keep((2 * heads * tokens * keys) as f64);
    }
}

/// A linear layer keeps nothing when its weight is frozen (its input's gradient needs only the
/// weight); an adapted one keeps its input (for the gradient of A) and its down projections
/// (`r` per row, for the gradient of B). `input_kept` says the input is kept already.
fn linear(t: &mut Tally, lora: Adapted, layer: &str, input: f64, rows: i64, input_kept: bool) -> bool {
    if !lora.adapts(layer) {
        return input_kept;
    }
    if !input_kept {
        t.keep(input);
    }
    t.keep((lora.ranks * rows) as f64);
    true
}

/// `BasicTransformerBlock` of width `c` over `tokens` tokens (self attention, cross attention
/// with `CONTEXT_TOKENS` keys, GEGLU feed-forward), with its LoRA down projections.
fn transformer_block(t: &mut Tally, name: &str, c: i64, heads: i64, tokens: i64, lora: Adapted, input_needs_grad: bool) {
    let n = (c * tokens) as f64;
    let layer = |l: &str| format!("{name}.{l}");
    // Self attention: norm1 keeps its input (when it needs a gradient); q, k, v read norm1's
    // output; to_out reads the attention output (a copy of it, re-laid out).
    if input_needs_grad {
        t.keep(n);
    }
    let mut kept = false;
    for l in ["attn1.to_q", "attn1.to_k", "attn1.to_v"] {
        kept = linear(t, lora, &layer(l), n, tokens, kept);
    }
    attention_core(t, c, heads, tokens, tokens);
    linear(t, lora, &layer("attn1.to_out.0"), n, tokens, false);
    // Cross attention: keys and values come from the text context, which needs no gradient.
    t.keep(n);
    linear(t, lora, &layer("attn2.to_q"), n, tokens, false);
    attention_core(t, c, heads, tokens, CONTEXT_TOKENS);
    for l in ["attn2.to_k", "attn2.to_v"] {
        if lora.adapts(&layer(l)) {
            t.keep((lora.ranks * CONTEXT_TOKENS) as f64);
        }
    }
    linear(t, lora, &layer("attn2.to_out.0"), n, tokens, false);
    // GEGLU: norm3's input, the 8c-wide projection (GELU reads its gate half, the product
    // its other half) and GELU's output; the projections keep their inputs only when adapted.
    t.keep(n);
    linear(t, lora, &layer("ff.net.0.proj"), n, tokens, false);
    t.keep(8.0 * n);
    t.keep(4.0 * n);
    linear(t, lora, &layer("ff.net.2"), 4.0 * n, tokens, false);
}

/// `Transformer2DModel`: group norm, proj_in, the blocks, proj_out. A 1x1-conv projection keeps
/// its input (convolutions keep it even with frozen weights), a linear one only when adapted.
#[allow(clippy::too_many_arguments)]
fn transformer2d(t: &mut Tally, name: &str, c: i64, heads: i64, layers: i64, pixels: i64, conv_projection: bool, lora: Adapted, grad_before: bool) {
    let n = (c * pixels) as f64;
    if grad_before {
        t.keep(n);
        if conv_projection {
            t.keep(n);
        } else {
            linear(t, lora, &format!("{name}.proj_in"), n, pixels, false);
        }
    }
    for i in 0..layers {
        transformer_block(t, &format!("{name}.transformer_blocks.{i}"), c, heads, pixels, lora, grad_before || i > 0);
    }
    if conv_projection {
        t.keep(n);
    } else {
        linear(t, lora, &format!("{name}.proj_out"), n, pixels, false);
    }
}

/// Elements per sample of one UNet call at `side` x `side` latents, with the last step's
/// gradient (the graph starts at the first adapted layer).
pub fn unet_tally(cfg: &UNet2DConditionConfig, side: i64, lora: Adapted) -> Result<Tally, MemoryError> {
    let plan = cfg.plan().map_err(|e| MemoryError::Config(e.to_string()))?;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let conv = !cfg.use_linear_projection;
    let mut t = Tally::default();
    let mut s = side;
    // Nothing before the first adapted layer (inside the first transformer) needs a gradient.
    let mut grad = false;
    t.held += (ch[0] * s * s) as f64;
    let mut c_in = ch[0];
    let mut skips: Vec<(i64, i64)> = vec![(ch[0], s)];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..plan.layers[i] {
            resnet(&mut t, c_in, c, s * s, grad);
            if plan.cross_attention[i] {
                let name = format!("down_blocks.{i}.attentions.{j}");
                transformer2d(&mut t, &name, c, plan.heads[i], plan.transformer_layers[i], s * s, conv, lora, grad);
                grad = true;
            }
            c_in = c;
            skips.push((c, s));
            t.held += (c * s * s) as f64;
        }
        if i + 1 < n {
            if grad {
                t.keep((c * s * s) as f64);
            }
            s = (s + 1) / 2;
            skips.push((c, s));
            t.held += (c * s * s) as f64;
        }
    }
    let c = ch[n - 1];
    resnet(&mut t, c, c, s * s, grad);
    transformer2d(&mut t, "mid_block.attentions.0", c, plan.heads[n - 1], plan.transformer_layers[n - 1], s * s, conv, lora, grad);
    grad = true;
    resnet(&mut t, c, c, s * s, grad);
    let mut c_in = c;
    for i in 0..n {
        let down = n - 1 - i;
        let c = ch[down];
        for j in 0..=plan.layers[down] {
            let (skip_c, skip_s) = skips.pop().unwrap_or((c, s));
            s = skip_s;
            resnet(&mut t, c_in + skip_c, c, s * s, grad);
            if plan.cross_attention[down] {
                let name = format!("up_blocks.{i}.attentions.{j}");
                transformer2d(&mut t, &name, c, plan.heads[down], plan.transformer_layers[down], s * s, conv, lora, grad);
            }
            c_in = c;
        }
        if i + 1 < n {
            // Nearest upsampling keeps nothing; the conv after it keeps its (upsampled) input.
            let up = skips.last().map_or(s * 2, |&(_, ss)| ss);
            t.keep((c * up * up) as f64);
            s = up;
        }
    }
    for _ in 0..3 {
        t.keep((ch[0] * s * s) as f64);
    }
    Ok(t)
}

/// Elements per sample of a VAE decode from `side` x `side` latents, with gradient.
pub fn vae_decoder_tally(cfg: &AutoencoderKLConfig, side: i64) -> Tally {
    let mut t = Tally::default();
    let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
    let Some(&top) = rev.first() else { return t };
    let mut s = side;
    let latent = (cfg.latent_channels * s * s) as f64;
    if cfg.use_post_quant_conv {
        t.keep(latent);
    }
    t.keep(latent);
    resnet(&mut t, top, top, s * s, true);
    if cfg.mid_block_add_attention {
        // Group norm's input, then q, k, v and the output (the projections are frozen).
        t.keep((top * s * s) as f64);
        attention_core(&mut t, top, 1, s * s, s * s);
    }
    resnet(&mut t, top, top, s * s, true);
    let mut c_in = top;
    for (i, &c) in rev.iter().enumerate() {
        for _ in 0..=cfg.layers_per_block {
            resnet(&mut t, c_in, c, s * s, true);
            c_in = c;
        }
        if i + 1 < rev.len() {
            s *= 2;
            t.keep((c * s * s) as f64);
        }
    }
    let last = *rev.last().unwrap_or(&top);
    for _ in 0..3 {
        t.keep((last * s * s) as f64);
    }
    t
}

/// Elements per sample of a CLIP vision tower on one image, with gradient (the reward's graph).
pub fn vision_tally(cfg: &VisionConfig) -> Tally {
    let mut t = Tally::default();
    let tokens = cfg.num_positions();
    let tr = &cfg.transformer;
    let s = cfg.image_size;
    t.keep((cfg.num_channels * s * s) as f64);
    let n = (tr.width * tokens) as f64;
    let mlp = (tr.mlp_width * tokens) as f64;
    t.keep(n);
    for _ in 0..tr.layers {
        // ln_1's input, q, k, v, the attention output, ln_2's input, and the activation's
        // input (quick-GELU `x sigmoid(1.702 x)` keeps its sigmoid too); the frozen linear
        // layers keep nothing.
        t.keep(n);
        attention_core(&mut t, tr.width, tr.heads, tokens, tokens);
        t.keep(n);
        t.keep(mlp);
        if tr.activation == Activation::QuickGelu {
            t.keep(mlp);
        }
    }
    // The pooled class token is a view of the last hidden state: its layer norm keeps all of it.
    t.keep(n);
    t
}

/// Float elements of a checkpoint (a file or a component folder), read from its header: a
/// `.safetensors` header, a shard index and its shards' headers, or a PyTorch zip's pickle.
pub fn checkpoint_elements(path: &Path) -> Result<u64, MemoryError> {
    let file = if path.is_dir() { weights::find_weight_file(path).map_err(|e| file_err(path, e))? } else { path.to_path_buf() };
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".index.json") {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&file).map_err(|e| file_err(&file, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| file_err(&file, e))?;
        let mut shards: Vec<&String> = index.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let dir = file.parent().unwrap_or(Path::new("."));
        return shards.iter().try_fold(0u64, |acc, shard| Ok(acc + checkpoint_elements(&dir.join(shard))?));
    }
    match file.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => {
            let header = safetensors_header(&file)?;
            let floats = ["F16", "BF16", "F32", "F64"];
            Ok(header
                .iter()
                .filter(|(name, v)| *name != "__metadata__" && v["dtype"].as_str().is_some_and(|d| floats.contains(&d)))
                .map(|(_, v)| v["shape"].as_array().map_or(0, |dims| dims.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>()))
                .sum())
        }
        Some("pt" | "pth" | "bin" | "ckpt") => {
            let shapes = crate::models::pickle::read_state_dict_shapes(&file).map_err(|e| file_err(&file, e))?;
            Ok(shapes
                .iter()
                .filter(|(_, kind, _)| matches!(kind, tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Float | tch::Kind::Double))
                .map(|(_, _, shape)| shape.iter().map(|&d| d.max(0) as u64).product::<u64>())
                .sum())
        }
        _ => Err(file_err(&file, "unknown weight format")),
    }
}

fn clip_config(files: &ClipFiles) -> Result<ClipConfig, MemoryError> {
    match files.layout {
        ClipLayout::Transformers => {
            let path = files.weights.join("config.json");
            ClipConfig::from_transformers_json(&path).map_err(|e| file_err(&path, e))
        }
        ClipLayout::OpenClip => {
            let path = files.config.as_ref().ok_or_else(|| file_err(&files.weights, "an open_clip checkpoint needs its model config"))?;
            ClipConfig::from_open_clip_json(path).map_err(|e| file_err(path, e))
        }
    }
}

/// The CLIP files of the world's PickScore folder.
fn pickscore_files(world: &WorldSpec) -> Result<ClipFiles, MemoryError> {
    world.pickscore.as_deref().map(crate::rewards::pickscore::PickScoreReward::files).ok_or_else(|| MemoryError::Config("the world names no PickScore folder".into()))
}

fn vision_of(files: &ClipFiles) -> Result<VisionConfig, MemoryError> {
    clip_config(files)?.vision.ok_or_else(|| file_err(&files.weights, "this CLIP has no vision tower"))
}

/// The estimate of `job` on `world` (its files are read for their configs and header sizes).
pub fn estimate(world: &WorldSpec, targets: &[String], job: &Job, precision: Precision) -> Result<MemoryEstimate, MemoryError> {
    let p = precision.bytes() as f64;
    let root = &world.diffusion;
    let unet_cfg = UNet2DConditionConfig::from_file(&root.join("unet/config.json")).map_err(|e| MemoryError::Config(e.to_string()))?;
    let vae_cfg = AutoencoderKLConfig::from_file(&root.join("vae/config.json")).map_err(|e| MemoryError::Config(e.to_string()))?;
    let side = vae_cfg.latent_side(world.resolution);
    let image = (3 * world.resolution * world.resolution) as f64;
    let context = (CONTEXT_TOKENS * unet_cfg.cross_attention_dim) as f64;
    let latent = (unet_cfg.in_channels * side * side) as f64;

    let mut elements = 0u64;
    for dir in ["unet", "vae", "text_encoder"] {
        elements += checkpoint_elements(&root.join(dir))?;
    }
    let aesthetic = |e: &mut u64| -> Result<(), MemoryError> {
        *e += checkpoint_elements(&world.aesthetic_clip.weights)? + checkpoint_elements(&world.aesthetic_head)?;
        Ok(())
    };
    let estimate = match job {
        Job::Train { tasks, step } => {
            let mut shapes = TrainShapes { unet: &unet_cfg, vae: &vae_cfg, resolution: world.resolution, reward_towers: Vec::new(), reward_fp32_images: 0.0 };
            for task in tasks {
                match task {
                    Task::Aesthetic => {
                        aesthetic(&mut elements)?;
                        shapes.reward_towers.push(vision_of(&world.aesthetic_clip)?);
                    }
                    Task::Hps => {
                        elements += checkpoint_elements(&world.hps.weights)?;
                        shapes.reward_towers.push(vision_of(&world.hps)?);
                    }
                    // The differentiable JPEG runs in fp32 on the images: about a dozen
                    // image-sized tensors are kept.
                    Task::Compress => shapes.reward_fp32_images += 12.0,
                    Task::PickScore => {
                        let files = pickscore_files(world)?;
                        elements += checkpoint_elements(&files.weights)?;
                        shapes.reward_towers.push(vision_of(&files)?);
                    }
                    // Not estimated: a declared reward's module is the user's own.
                    Task::Declared(_) => {}
                }
            }
            training_estimate(&shapes, targets, step, precision)?
        }
        Job::Evaluate { batch, guided, ranks } => {
            aesthetic(&mut elements)?;
            elements += checkpoint_elements(&world.hps.weights)? + checkpoint_elements(&world.clip_score.weights)?;
            if world.fid_features == FidFeatures::Inception {
                if let Some(path) = &world.inception {
                    elements += checkpoint_elements(path)?;
                }
            }
            let b = *batch as f64;
            let g = if *guided { 2.0 } else { 1.0 };
            let adapters = 4.0 * lora_elements(&unet_cfg, targets, *ranks)? as f64;
            let unet = unet_tally(&unet_cfg, side, Adapted { targets, ranks: *ranks })?;
            let vae = vae_decoder_tally(&vae_cfg, side);
            let pickscore = world.pickscore.as_ref().map(|_| pickscore_files(world)).transpose()?;
            if let Some(files) = &pickscore {
                elements += checkpoint_elements(&files.weights)?;
            }
            let vision = [&world.aesthetic_clip, &world.hps, &world.clip_score]
                .into_iter()
                .chain(pickscore.as_ref())
                .map(|f| vision_of(f).map(|v| vision_tally(&v).largest))
                .collect::<Result<Vec<f64>, _>>()?
                .into_iter()
                .fold(0.0, f64::max);
            let sampling = (unet.no_grad_peak() * g).max(3.0 * vae.largest).max(3.0 * vision) * b * p;
            MemoryEstimate {
                weights: 0,
                adapters: adapters as u64,
                activations: sampling as u64,
                buffers: (4.0 * (2.0 * latent * b + image * b) + p * context * (b + 1.0)) as u64,
            }
        }
    };
    Ok(MemoryEstimate { weights: (elements as f64 * p) as u64, ..estimate })
}

/// Logs the stage's estimate and, on a GPU, refuses to start when it exceeds the device's free
/// memory (a stage that cannot be estimated, or whose device cannot be asked, runs with a note).
pub fn check_fits(ctx: &StageContext, world: &WorldSpec, targets: &[String], job: &Job, precision: Precision) -> Result<(), StageError> {
    let estimate = match estimate(world, targets, job, precision) {
        Ok(e) => e,
        Err(e) => {
            ctx.log(format!("peak memory not estimated ({e}); the stage starts without the memory check"));
            return Ok(());
        }
    };
    ctx.log(format!("estimated peak memory {}", estimate.describe()));
    let tch::Device::Cuda(index) = super::device::tch_device(&ctx.device) else {
        return Ok(());
    };
    let note = fits(&estimate, &ctx.device, super::device::cuda_memory(index)).map_err(StageError::Failed)?;
    ctx.log(note);
    Ok(())
}

/// The verdict on `estimate` for a device with `memory` = (free, total) bytes: a note for the
/// log when it fits or the free memory is unknown, the reason to refuse it otherwise.
pub fn fits(estimate: &MemoryEstimate, device: &str, memory: Result<(u64, u64), String>) -> Result<String, String> {
    let gb = |b: u64| b as f64 / 1e9;
    match memory {
        Ok((free, total)) if estimate.peak() > free => Err(format!(
            "not enough GPU memory on {device}: the stage needs about {} but {:.2} GB of {:.2} GB are free; lower `micro_batch` / `batch_size` or use `precision: fp16`",
            estimate.describe(),
            gb(free),
            gb(total)
        )),
        Ok((free, total)) => Ok(format!("{device}: {:.2} GB of {:.2} GB free", gb(free), gb(total))),
        Err(reason) => Ok(format!("free memory of {device} unknown ({reason}); the memory check is skipped")),
    }
}

/// The summed rank of the adapters in an adapter file (from its header: the `lora_A.<i>` tensors
/// of its first layer).
pub fn adapter_file_ranks(path: &Path) -> Result<i64, MemoryError> {
    let header = safetensors_header(path)?;
    let mut layers = header.keys().filter_map(|k| k.split_once(".lora_A.").map(|(layer, _)| layer)).collect::<Vec<_>>();
    layers.sort();
    let Some(first) = layers.first() else { return Ok(0) };
    Ok(header
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(first)
                .and_then(|rest| rest.strip_prefix(".lora_A."))
                .and_then(|rest| rest.strip_suffix(".weight"))
                .is_some_and(|i| i.parse::<usize>().is_ok())
        })
        .map(|(_, v)| v["shape"][0].as_i64().unwrap_or(0))
        .sum())
}

/// The JSON header of a `.safetensors` file (tensor names to dtype, shape and offsets).
fn safetensors_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, MemoryError> {
    use std::io::Read;
    let mut handle = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let mut len = [0u8; 8];
    handle.read_exact(&mut len).map_err(|e| file_err(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(file_err(path, format!("a safetensors header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    handle.read_exact(&mut header).map_err(|e| file_err(path, e))?;
    serde_json::from_slice(&header).map_err(|e| file_err(path, e))
}

/// Adapters of a training stage in fp32: the earlier ones, and the new one with its gradient,
/// AdamW's two moments and (RID) the EMA teacher.
fn training_adapters(cfg: &UNet2DConditionConfig, targets: &[String], rank: i64, earlier_ranks: i64, teacher: bool) -> Result<u64, MemoryError> {
    let copies = if teacher { 5 } else { 4 };
    Ok(4 * (lora_elements(cfg, targets, earlier_ranks)? + copies * lora_elements(cfg, targets, rank)?))
}

/// The adapters, activations and buffers of a training step on `shapes` (weights: 0, the caller
/// counts them from the files). At its peak a micro-batch of `m` prompts holds the last UNet
/// call's saved tensors (2m samples with guidance), those of the decode and the reward (m
/// samples, or `c` = `decode_chunk` with gradient checkpointing) and the gradients in flight of
/// the backward pass; before it, the sampling of steps N..2 and RID's teacher pass (a UNet call
/// and, for image distillation, a decode of `c` samples, both without gradient) each peak alone.
pub fn training_estimate(shapes: &TrainShapes, targets: &[String], step: &TrainStep, precision: Precision) -> Result<MemoryEstimate, MemoryError> {
    let p = precision.bytes() as f64;
    let cfg = shapes.unet;
    let side = shapes.vae.latent_side(shapes.resolution);
    let image = (3 * shapes.resolution * shapes.resolution) as f64;
    let latent = (cfg.in_channels * side * side) as f64;
    let context = (CONTEXT_TOKENS * cfg.cross_attention_dim) as f64;
    let m = step.micro as f64;
    let c = step.decode_chunk.map_or(m, |c| (c as f64).min(m));
    let g = if step.guided { 2.0 } else { 1.0 };

    let unet = unet_tally(cfg, side, Adapted { targets, ranks: step.earlier_ranks + step.rank })?;
    let vae = vae_decoder_tally(shapes.vae, side);
    let mut after = vae;
    for tower in &shapes.reward_towers {
        add(&mut after, vision_tally(tower));
    }
    // The decoded images, their clamp and the rewards' fp32 work on them.
    let fp32_saved = 4.0 * (shapes.reward_fp32_images + 4.0) * image * c;
    let saved = p * (unet.saved * g * m + after.saved * c) + fp32_saved;
    let largest = p * (unet.largest * g * m).max(after.largest * c);
    // In the backward pass: the gradients of the skip connections wait for the down path.
    let backward = 3.0 * largest + p * unet.held * g * m;
    let sampling = p * unet.no_grad_peak() * g * m;
    let teacher_decode = match step.teacher {
        Some(DistillSpace::Image) => p * vae.no_grad_peak() * c,
        _ => 0.0,
    };
    // The teacher's target waits through the student's step: images, or latents.
    let teacher_target = match step.teacher {
        Some(DistillSpace::Image) => 4.0 * image * m,
        Some(DistillSpace::Latent) => 4.0 * latent * m,
        None => 0.0,
    };
    Ok(MemoryEstimate {
        weights: 0,
        adapters: training_adapters(cfg, targets, step.rank, step.earlier_ranks, step.teacher.is_some())?,
        activations: (saved + backward).max(sampling).max(teacher_decode) as u64,
        buffers: (4.0 * (2.0 * latent * m + image * m) + teacher_target + p * context * (m + 1.0)) as u64,
    })
}

fn add(total: &mut Tally, t: Tally) {
    total.saved += t.saved;
    total.largest = total.largest.max(t.largest);
    total.held += t.held;
}

/// Elements of adapters of total rank `ranks` on the UNet's layers matching `targets` (the
/// attention projections and the feed-forward of every transformer block, by their names
/// inside the block).
pub fn lora_elements(cfg: &UNet2DConditionConfig, targets: &[String], ranks: i64) -> Result<u64, MemoryError> {
    let plan = cfg.plan().map_err(|e| MemoryError::Config(e.to_string()))?;
    let adapted = Adapted { targets, ranks: 1 };
    let d = cfg.cross_attention_dim;
    let block = |c: i64| -> i64 {
        let layers = [
            ("attn1.to_q", c, c),
            ("attn1.to_k", c, c),
            ("attn1.to_v", c, c),
            ("attn1.to_out.0", c, c),
            ("attn2.to_q", c, c),
            ("attn2.to_k", d, c),
            ("attn2.to_v", d, c),
            ("attn2.to_out.0", c, c),
            ("ff.net.0.proj", c, 8 * c),
            ("ff.net.2", 4 * c, c),
        ];
        layers
            .iter()
            .filter(|(name, _, _)| adapted.adapts(&format!("transformer_blocks.0.{name}")))
            .map(|(_, i, o)| i + o)
            .sum()
    };
    let n = cfg.block_out_channels.len();
    let mut per_rank = 0i64;
    for i in 0..n {
        if plan.cross_attention[i] {
            let c = cfg.block_out_channels[i];
            // Down block i has `layers` transformers, its mirrored up block one more.
            per_rank += (2 * plan.layers[i] + 1) * plan.transformer_layers[i] * block(c);
        }
    }
    per_rank += plan.transformer_layers[n - 1] * block(cfg.block_out_channels[n - 1]);
    Ok((per_rank * ranks).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_targets() -> Vec<String> {
        crate::models::lora::default_targets()
    }

    #[test]
    fn sd15_lora_has_the_paper_parameter_count() {
        // SPEC: about 0.8 M trainable parameters per task at r = 4 on to_q, to_k, to_v, to_out.0.
        let n = lora_elements(&UNet2DConditionConfig::sd15(), &default_targets(), 4).unwrap();
        assert_eq!(n, 797_184);
        assert_eq!(lora_elements(&UNet2DConditionConfig::sd15(), &["to_q".to_string()], 4).unwrap(), 199_680);
        assert_eq!(lora_elements(&UNet2DConditionConfig::sd15(), &[], 4).unwrap(), 0);
    }

    #[test]
    fn activations_grow_with_resolution_and_adapters() {
        let cfg = UNet2DConditionConfig::sd15();
        let targets = default_targets();
        let none = Adapted { targets: &targets, ranks: 0 };
        let four = Adapted { targets: &targets, ranks: 4 };
        let small = unet_tally(&cfg, 32, four).unwrap();
        let large = unet_tally(&cfg, 64, four).unwrap();
        assert!(large.saved > 3.9 * small.saved, "{} vs {}", large.saved, small.saved);
        assert!(unet_tally(&cfg, 64, none).unwrap().saved < large.saved);
        // SD1.5 at 64x64 keeps on the order of a gigabyte per sample in half precision.
        let gb = large.saved * 2.0 / 1e9;
        assert!(gb > 0.3 && gb < 3.0, "{gb} GB per sample");
        // The skip connections of a pass without gradient are far less than the saved tensors.
        assert!(large.held < 0.1 * large.saved);
    }

    #[test]
    fn the_vae_decode_at_512_pixels_dominates_a_sample() {
        let vae = vae_decoder_tally(&AutoencoderKLConfig::sd15(), 64);
        // The top level alone: 3 ResNets of 6 x 128 x 512^2 elements.
        assert!(vae.saved > 3.0 * 6.0 * 128.0 * 512.0 * 512.0);
        assert_eq!(vae.largest, 256.0 * 512.0 * 512.0);
    }

    #[test]
    fn a_stage_that_does_not_fit_is_refused_with_the_numbers() {
        let e = MemoryEstimate { weights: 20_000_000_000, adapters: 0, activations: 0, buffers: 0 };
        let refused = fits(&e, "cuda:1", Ok((10_000_000_000, 80_000_000_000))).unwrap_err();
        assert!(refused.contains("cuda:1") && refused.contains("21.27 GB") && refused.contains("10.00 GB of 80.00 GB are free"), "{refused}");
        let note = fits(&e, "cuda:0", Ok((30_000_000_000, 80_000_000_000))).unwrap();
        assert!(note.contains("30.00 GB of 80.00 GB free"), "{note}");
        let unknown = fits(&e, "cuda:0", Err("no driver".into())).unwrap();
        assert!(unknown.contains("unknown (no driver)") && unknown.contains("skipped"), "{unknown}");
    }

    #[test]
    fn the_peak_adds_the_allowance() {
        let e = MemoryEstimate { weights: 1_000_000_000, adapters: 0, activations: 0, buffers: 0 };
        assert_eq!(e.peak(), 1_050_000_000 + WORKSPACE_BYTES);
        assert!(e.describe().starts_with("1.32 GB"), "{}", e.describe());
    }
}

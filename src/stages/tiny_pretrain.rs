//! The tiny world's pretraining stages (`pipelines/tiny_world.yaml`), each writing its model
//! in the upstream layout and its quality gates (`gates.json`, also printed):
//!
//! - `tiny_prompts`: the 750/50 prompt split and the small CLIP BPE tokenizer.
//! - `tiny_clip`: the small CLIP (`clip/`, a transformers `CLIPModel` folder) and its text tower
//!   as the diffusion model's `text_encoder/`; gate: text-to-image retrieval among the test
//!   prompts.
//! - `tiny_vae`: the small AutoencoderKL (`vae/`); gate: reconstruction PSNR on test renders.
//! - `tiny_aesthetic`: the LAION-style head on the CLIP image embedding; gate: Pearson r with
//!   the procedural rating on test renders.
//! - `tiny_preference`: the HPSv2-style preference model (`hps/`); gate: pairwise accuracy on
//!   pairs of test prompts.
//! - `tiny_unet`: the small UNet2DConditionModel (`unet/`, EMA weights).
//! - `tiny_export`: the shipped bundle (f16 weights, `world.json`, prompts, FID reference,
//!   `MANIFEST.txt` of blake3 hashes), loaded back through `tiny_world`'s manifest reader,
//!   `Diffusion::load` and the rewards, and every gate measured again on it, plus the sample
//!   gates (CLIP score with the own vs a shuffled prompt, FID vs pure noise) and a sample grid.
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::exec::{InputObject, StageContext, StageError, StageKind};
use crate::method::sampling::{initial_latents, CastUnet, Sampler, SamplerConfig};
use crate::models::aesthetic::AestheticConfig;
use crate::models::tokenizer::ClipTokenizer;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::rewards::aesthetic::AestheticReward;
use crate::rewards::clip_loader::{ClipFiles, ClipLayout, FrozenClip};
use crate::rewards::hps::HpsReward;
use crate::tiny::train::clip::{self as tclip, Schedule, TinyClipConfig, TrainableClip};
use crate::tiny::train::data::{prompt_scenes, tensor_images, Excluded, LOOK_WORDS};
use crate::tiny::train::gates::{clip_score, feature_stats, frechet_distance, Comparison, Gate, GateReport};
use crate::tiny::train::io::{read_safetensors, write_file, write_json, write_safetensors, Precision};
use crate::tiny::train::unet::{self as tunet, DiffusionSettings, LatentPool, TextConditioning, TinyUnetConfig, TrainableUnet};
use crate::tiny::train::vae::{self as tvae, TinyVaeConfig, TrainableVae};
use crate::tiny::train::vocab::{caption_words, Vocabulary};
use crate::tiny::train::{aesthetic as taesthetic, preference as tpreference, TrainError};
use crate::stage_params;
use crate::tiny::{prompt_split, write_png_grid, write_prompts, IMAGE_SIZE};

use super::device::tch_device;
use super::monitor::StageMonitor;
use crate::models::diffusion::Diffusion;
use crate::models::precision::Precision as ComputePrecision;
use super::world::{read_prompts, tiny_world_spec, ModelRecord, BUNDLE_MANIFEST};

const TOKENIZER_DIR: &str = "tokenizer";
const TRAIN_PROMPTS: &str = "prompts/train.txt";
const TEST_PROMPTS: &str = "prompts/test.txt";
const CLIP_DIR: &str = "clip";
const TEXT_ENCODER_DIR: &str = "text_encoder";
const VAE_DIR: &str = "vae";
const UNET_DIR: &str = "unet";
const HPS_DIR: &str = "hps";
const HEAD_FILE: &str = "aesthetic_head.safetensors";
const TRAIN_FILE: &str = "train.json";
/// Most look words of an alt-text (one per quality, see `tiny::train::data`).
const LOOK_WORDS_PER_TEXT: usize = 8;

fn input(name: &'static str, doc: &'static str) -> InputSpec {
    InputSpec { name, required: true, many: false, doc }
}

stage_params! {
    /// The optimisation parameters every trainer has (each kind gives its own defaults).
    pub struct ScheduleParams {
        pub seed: u64 = required().min(0).doc("seed of the initialisation and of every batch"),
        pub steps: usize = required().min(1).doc("optimizer steps"),
        pub batch: usize = required().min(1).doc("batch size"),
        pub lr: f64 = required().min(0).max(1).doc("peak learning rate (AdamW; linear warm-up, cosine decay to 10%)"),
        pub warmup: usize = required().min(0).doc("warm-up steps"),
        pub weight_decay: f64 = required().min(0).doc("AdamW weight decay"),
    }
}

/// A trainer's schedule defaults: seed 0 and these.
fn schedule_defaults(steps: usize, batch: usize, lr: f64, warmup: usize, weight_decay: f64) -> ScheduleParams {
    ScheduleParams { seed: 0, steps, batch, lr, warmup, weight_decay }
}

impl ScheduleParams {
    fn schedule(&self, checkpoint_every: usize) -> Schedule {
        Schedule { steps: self.steps, batch: self.batch, lr: self.lr, warmup: self.warmup, weight_decay: self.weight_decay, seed: self.seed, checkpoint_every }
    }
}

/// Errors of training as stage errors (a cancelled run stays a cancellation).
fn stage_error(e: TrainError) -> StageError {
    match e {
        TrainError::Cancelled => StageError::Cancelled,
        other => StageError::Failed(other.to_string()),
    }
}

/// The stage's device. On the CPU these models run one intra-op thread: their operations are
/// too small to split, and on a loaded 2-core machine a second thread costs up to 5x in
/// synchronisation (measured); run independent stages side by side instead (`-j 2`).
fn device_of(ctx: &StageContext) -> Device {
    tch::set_num_threads(1);
    ctx.log(format!("device {}, 1 intra-op thread (of {} offered)", ctx.device, ctx.threads));
    tch_device(&ctx.device)
}

/// Writes `gates.json` and prints every gate.
fn publish(ctx: &StageContext, report: &GateReport) -> Result<(), StageError> {
    for gate in &report.gates {
        let line = gate.line();
        ctx.log(&line);
        ctx.progress.println(&line);
    }
    report.write(ctx.out_dir()).map_err(stage_error)
}

/// A folder of an input's outputs (its files are checked against the input's manifest).
fn input_dir(object: &InputObject, dir: &str, marker: &str) -> Result<PathBuf, StageError> {
    object.file(&format!("{dir}/{marker}"))?;
    Ok(object.dir.join(dir))
}

/// What every training stage reads of `tiny_prompts`.
struct PromptsInput {
    tokenizer_dir: PathBuf,
    tokenizer: ClipTokenizer,
    test: Vec<String>,
    excluded: Excluded,
}

fn prompts_input(ctx: &StageContext) -> Result<PromptsInput, StageError> {
    let object = ctx.input("prompts")?;
    let tokenizer_dir = input_dir(object, TOKENIZER_DIR, "vocab.json")?;
    let tokenizer = ClipTokenizer::from_hf_folder(&tokenizer_dir).map_err(StageError::failed)?;
    let test = read_prompts(&object.file(TEST_PROMPTS)?)?;
    let excluded = Excluded::new(&test);
    Ok(PromptsInput { tokenizer_dir, tokenizer, test, excluded })
}

fn clip_files(dir: PathBuf, tokenizer: &Path) -> ClipFiles {
    ClipFiles { layout: ClipLayout::Transformers, weights: dir, config: None, tokenizer: tokenizer.to_path_buf() }
}

fn frozen_clip(files: &ClipFiles, device: Device) -> Result<FrozenClip, StageError> {
    FrozenClip::load(files, device, Kind::Float).map_err(StageError::failed)
}

// ---------------------------------------------------------------------------------------------

/// `tiny_prompts`: the prompt split and the tokenizer.
pub struct TinyPrompts;

stage_params! {
    /// The parameters of a `tiny_prompts` stage.
    pub struct TinyPromptsParams {
        pub split_seed: u64 = param(0).min(0).doc("seed of the prompt split"),
        pub context_length: usize = param(28).min(26).max(512).doc("token positions of the text encoders (the longest alt-text: 16 caption words, 8 look words, start and end)"),
    }
}

impl StageKind for TinyPrompts {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_prompts",
            version: 1,
            doc: "the tiny world's 750/50 prompt split (held-out shape-colour pairs) and its small CLIP BPE tokenizer (each caption word one token)",
            uses_input_labels: false,
            params: TinyPromptsParams::specs(),
            inputs: Vec::new(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyPromptsParams = ctx.typed_params()?;
        let context = p.context_length;
        let split = prompt_split(p.split_seed);
        let out = ctx.out_dir().to_path_buf();
        let vocab = Vocabulary::for_words(&caption_words(&LOOK_WORDS)).map_err(stage_error)?;
        vocab.write_folder(&out.join(TOKENIZER_DIR), context).map_err(stage_error)?;
        std::fs::create_dir_all(out.join("prompts"))?;
        write_prompts(&out.join(TRAIN_PROMPTS), &split.train).map_err(StageError::failed)?;
        write_prompts(&out.join(TEST_PROMPTS), &split.test).map_err(StageError::failed)?;
        let held_out: Vec<[&str; 2]> = split.held_out.iter().map(|(s, c)| [s.name(), c.name()]).collect();
        write_json(&out.join("split.json"), &json!({"seed": split.seed, "held_out_pairs": held_out})).map_err(stage_error)?;
        // The tokenizer must give every caption one token per word and fit the context.
        let tokenizer = ClipTokenizer::from_hf_folder(&out.join(TOKENIZER_DIR)).map_err(StageError::failed)?;
        for caption in split.train.iter().chain(&split.test) {
            let ids = tokenizer.encode(caption).map_err(StageError::failed)?;
            if ids.len() != caption.split(' ').count() || ids.len() + 2 + LOOK_WORDS_PER_TEXT > context {
                return Err(StageError::Failed(format!("caption {caption:?} tokenises into {} tokens (context {context}, with up to {LOOK_WORDS_PER_TEXT} look words)", ids.len())));
            }
        }
        ctx.log(format!("{} tokens, {} merges; {} training and {} test prompts", vocab.len(), vocab.merges.len(), split.train.len(), split.test.len()));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// `tiny_clip`: the small CLIP, contrastive on captioned renders.
pub struct TinyClip;

stage_params! {
    /// The parameters of a `tiny_clip` stage.
    pub struct TinyClipParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(1200, 128, 1e-3, 100, 0.1)),
        pub text_width: i64 = param(64).min(1).doc("text tower width (the UNet's cross-attention dimension)"),
        pub text_layers: i64 = param(3).min(1).doc("text tower layers"),
        pub text_heads: i64 = param(4).min(1).doc("text tower heads"),
        pub vision_width: i64 = param(64).min(1).doc("vision tower width"),
        pub vision_layers: i64 = param(3).min(1).doc("vision tower layers"),
        pub vision_heads: i64 = param(4).min(1).doc("vision tower heads"),
        pub patch_size: i64 = param(8).min(1).max(32).doc("ViT patch size (32 / patch_size patches a side)"),
        pub embed_dim: i64 = param(64).min(1).doc("joint embedding size"),
        pub alt_text: f64 = param(0.8).min(0).max(1).doc("probability that a training text is the render's alt-text (caption + look words) rather than its caption"),
        pub look_weight: f64 = param(1.0).min(0).doc("weight of the look-grading loss (a linear probe per quality on the image embedding, not shipped)"),
        pub eval_sets: usize = param(4).min(1).doc("independent render sets of the test prompts for the retrieval gate"),
    }
}

impl StageKind for TinyClip {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_clip",
            version: 1,
            doc: "the tiny world's CLIP (transformers CLIPModel layout), contrastive on captioned renders; its text tower is the diffusion model's text encoder",
            uses_input_labels: false,
            params: TinyClipParams::specs(),
            inputs: vec![input("prompts", "a tiny_prompts stage")],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyClipParams = ctx.typed_params()?;
        let device = device_of(ctx);
        let prompts = prompts_input(ctx)?;
        let vocab = Vocabulary::read_folder(&prompts.tokenizer_dir).map_err(stage_error)?;
        let context_length = Vocabulary::context_length(&prompts.tokenizer_dir).map_err(stage_error)?;
        let config = TinyClipConfig {
            text_width: p.text_width,
            text_layers: p.text_layers,
            text_heads: p.text_heads,
            context_length: context_length as i64,
            vision_width: p.vision_width,
            vision_layers: p.vision_layers,
            vision_heads: p.vision_heads,
            image_size: IMAGE_SIZE as i64,
            patch_size: p.patch_size,
            embed_dim: p.embed_dim,
        };
        let schedule = p.schedule.schedule(250);
        let out = ctx.out_dir().to_path_buf();
        let clip_json = config.clip_model_json(&vocab);
        write_json(&out.join(CLIP_DIR).join("config.json"), &clip_json).map_err(stage_error)?;
        let model = TrainableClip::new(&out.join(CLIP_DIR).join("config.json"), schedule.seed, device).map_err(stage_error)?;
        let checkpoint = ctx.resume_dir()?.join("checkpoint.safetensors");
        let summary = {
            let mut monitor = StageMonitor::new(ctx, schedule.steps);
            let look = tclip::LookSettings { alt_text: p.alt_text, look_weight: p.look_weight };
            tclip::train(&model, &prompts.tokenizer, &prompts.excluded, &schedule, &look, Some(&checkpoint), &mut monitor).map_err(stage_error)?
        };
        model.save(&out.join(CLIP_DIR), &clip_json, Precision::F32).map_err(stage_error)?;
        model.save_text_encoder(&out.join(TEXT_ENCODER_DIR), &config.text_encoder_json(&vocab), Precision::F32).map_err(stage_error)?;
        write_json(&out.join(TRAIN_FILE), &json!({"summary": summary, "config": config, "schedule": schedule})).map_err(stage_error)?;

        let frozen = frozen_clip(&clip_files(out.join(CLIP_DIR), &prompts.tokenizer_dir), device)?;
        let mut report = GateReport::default();
        retrieval_gates(&mut report, &frozen, &prompts.test, p.eval_sets)?;
        publish(ctx, &report)
    }
}

fn retrieval_gates(report: &mut GateReport, clip: &FrozenClip, test: &[String], sets: usize) -> Result<(), StageError> {
    let (top1, top5) = tclip::retrieval(clip, test, sets, 1000).map_err(stage_error)?;
    let detail = format!("text-to-image retrieval among the {} test prompts, mean of {sets} render sets", test.len());
    report.push(Gate::new("clip.retrieval_top1", top1, Comparison::AtLeast, 0.30, detail.clone()));
    report.push(Gate::new("clip.retrieval_top5", top5, Comparison::AtLeast, 0.60, detail));
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `tiny_vae`: the small AutoencoderKL.
pub struct TinyVae;

stage_params! {
    /// The parameters of a `tiny_vae` stage.
    pub struct TinyVaeParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(1500, 32, 1e-3, 100, 0.0)),
        pub block_out_channels: Vec<i64> = param(vec![16, 32, 32]).min(1).doc("channels per block (3 blocks: 32x32 -> 8x8 latents)"),
        pub latent_channels: i64 = param(4).min(1).doc("latent channels"),
        pub norm_num_groups: i64 = param(8).min(1).doc("GroupNorm groups"),
        pub kl_weight: f64 = param(1e-6).min(0).doc("weight of the KL term (per-image sums, as SD's VAE)"),
        pub eval_renders: usize = param(8).min(1).doc("renders per test prompt for the PSNR gate"),
    }
}

impl StageKind for TinyVae {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_vae",
            version: 1,
            doc: "the tiny world's AutoencoderKL (diffusers layout), 32x32x3 <-> 8x8x4, with its latent scaling factor",
            uses_input_labels: false,
            params: TinyVaeParams::specs(),
            inputs: vec![input("prompts", "a tiny_prompts stage")],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyVaeParams = ctx.typed_params()?;
        let device = device_of(ctx);
        let prompts = prompts_input(ctx)?;
        let config = TinyVaeConfig {
            block_out_channels: p.block_out_channels.clone(),
            layers_per_block: 1,
            latent_channels: p.latent_channels,
            norm_num_groups: p.norm_num_groups,
        }
        .diffusers(IMAGE_SIZE as i64);
        let schedule = p.schedule.schedule(250);
        let mut model = TrainableVae::new(&config, schedule.seed, device).map_err(stage_error)?;
        let checkpoint = ctx.resume_dir()?.join("checkpoint.safetensors");
        let summary = {
            let mut monitor = StageMonitor::new(ctx, schedule.steps);
            tvae::train(&model, &prompts.excluded, &schedule, p.kl_weight, Some(&checkpoint), &mut monitor).map_err(stage_error)?
        };
        model.config.scaling_factor = tvae::latent_scale(&model.vae, &prompts.excluded, 4096, schedule.seed, device).map_err(stage_error)?;
        let out = ctx.out_dir().to_path_buf();
        model.save(&out.join(VAE_DIR), Precision::F32).map_err(stage_error)?;
        write_json(&out.join(TRAIN_FILE), &json!({"summary": summary, "schedule": schedule, "scaling_factor": model.config.scaling_factor})).map_err(stage_error)?;

        let saved = TrainableVae::load(&out.join(VAE_DIR), device).map_err(stage_error)?;
        let mut report = GateReport::default();
        psnr_gate(&mut report, &saved.vae, &prompts.test, p.eval_renders, device)?;
        report.measure("vae.scaling_factor", saved.config.scaling_factor);
        publish(ctx, &report)
    }
}

fn psnr_gate(report: &mut GateReport, vae: &crate::models::vae::AutoencoderKL, test: &[String], per_prompt: usize, device: Device) -> Result<(), StageError> {
    let psnr = tvae::reconstruction_psnr(vae, test, per_prompt, 1001, device).map_err(stage_error)?;
    report.push(Gate::new("vae.psnr_db", psnr, Comparison::AtLeast, 25.0, format!("reconstruction of {per_prompt} renders of each test prompt (MSE over all pixels)")));
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `tiny_aesthetic`: the aesthetic head on the frozen CLIP.
pub struct TinyAesthetic;

stage_params! {
    /// The parameters of a `tiny_aesthetic` stage.
    pub struct TinyAestheticParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(4000, 256, 1e-3, 100, 0.0)),
        pub hidden: Vec<i64> = param(vec![256, 64, 32, 16]).min(1).doc("hidden widths of the head (LAION's: 1024, 128, 64, 16)"),
        pub pool: usize = param(20000).min(1).doc("training renders (embedded once by the frozen CLIP)"),
        pub eval_renders: usize = param(20).min(1).doc("renders per test prompt for the Pearson gate"),
    }
}

impl StageKind for TinyAesthetic {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_aesthetic",
            version: 1,
            doc: "the tiny world's aesthetic head (LAION improved-aesthetic-predictor layout) on the CLIP image embedding, fit to the procedural rating",
            uses_input_labels: false,
            params: TinyAestheticParams::specs(),
            inputs: vec![input("prompts", "a tiny_prompts stage"), input("clip", "a tiny_clip stage")],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyAestheticParams = ctx.typed_params()?;
        let device = device_of(ctx);
        let prompts = prompts_input(ctx)?;
        let files = clip_files(input_dir(ctx.input("clip")?, CLIP_DIR, "config.json")?, &prompts.tokenizer_dir);
        let clip = frozen_clip(&files, device)?;
        let schedule = p.schedule.schedule(0);
        let (embeddings, ratings) = taesthetic::embedded_ratings(&clip, &prompts.excluded, p.pool, schedule.seed, device).map_err(stage_error)?;
        let mut dims = vec![embeddings.size()[1]];
        dims.extend(p.hidden.clone());
        dims.push(1);
        AestheticConfig { dims: dims.clone() }.validate().map_err(StageError::failed)?;
        let (vs, _head, summary) = {
            let mut monitor = StageMonitor::new(ctx, schedule.steps);
            taesthetic::train(&embeddings, &ratings, &dims, &schedule, &mut monitor).map_err(stage_error)?
        };
        let out = ctx.out_dir().to_path_buf();
        taesthetic::save(&vs, &out.join(HEAD_FILE), Precision::F32).map_err(stage_error)?;
        write_json(&out.join(TRAIN_FILE), &json!({"summary": summary, "schedule": schedule, "dims": dims})).map_err(stage_error)?;

        let reward = AestheticReward::load(&files, &out.join(HEAD_FILE), device, Kind::Float).map_err(StageError::failed)?;
        let mut report = GateReport::default();
        pearson_gate(&mut report, &reward, &prompts.test, p.eval_renders, device)?;
        publish(ctx, &report)
    }
}

fn pearson_gate(report: &mut GateReport, reward: &AestheticReward, test: &[String], per_prompt: usize, device: Device) -> Result<(), StageError> {
    let r = taesthetic::rating_correlation(reward, test, per_prompt, 1002, device).map_err(stage_error)?;
    report.push(Gate::new("aesthetic.pearson_r", r, Comparison::AtLeast, 0.8, format!("head score vs procedural rating on {per_prompt} renders of each test prompt")));
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `tiny_preference`: the HPSv2-style preference model.
pub struct TinyPreference;

stage_params! {
    /// The parameters of a `tiny_preference` stage.
    pub struct TinyPreferenceParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(600, 64, 1e-4, 50, 0.1)),
        pub eval_pairs: usize = param(20).min(1).doc("labelled pairs per test prompt for the accuracy gate"),
    }
}

impl StageKind for TinyPreference {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_preference",
            version: 1,
            doc: "the tiny world's human-preference model: a copy of the CLIP fine-tuned on preference pairs as HPSv2, scored as cosine",
            uses_input_labels: false,
            params: TinyPreferenceParams::specs(),
            inputs: vec![input("prompts", "a tiny_prompts stage"), input("clip", "a tiny_clip stage")],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyPreferenceParams = ctx.typed_params()?;
        let device = device_of(ctx);
        let prompts = prompts_input(ctx)?;
        let clip_dir = input_dir(ctx.input("clip")?, CLIP_DIR, "config.json")?;
        let model = TrainableClip::load(&clip_dir, device).map_err(stage_error)?;
        let schedule = p.schedule.schedule(200);
        let checkpoint = ctx.resume_dir()?.join("checkpoint.safetensors");
        let summary = {
            let mut monitor = StageMonitor::new(ctx, schedule.steps);
            tpreference::train(&model, &prompts.tokenizer, &prompts.excluded, &schedule, Some(&checkpoint), &mut monitor).map_err(stage_error)?
        };
        let out = ctx.out_dir().to_path_buf();
        let config: Value = serde_json::from_slice(&std::fs::read(clip_dir.join("config.json"))?).map_err(StageError::failed)?;
        model.save(&out.join(HPS_DIR), &config, Precision::F32).map_err(stage_error)?;
        write_json(&out.join(TRAIN_FILE), &json!({"summary": summary, "schedule": schedule})).map_err(stage_error)?;

        let per_prompt = p.eval_pairs;
        let mut report = GateReport::default();
        let hps = HpsReward::load(&clip_files(out.join(HPS_DIR), &prompts.tokenizer_dir), device, Kind::Float).map_err(StageError::failed)?;
        preference_gate(&mut report, &hps, &prompts.test, per_prompt, device)?;
        let base = HpsReward::load(&clip_files(clip_dir, &prompts.tokenizer_dir), device, Kind::Float).map_err(StageError::failed)?;
        let score = |images: &Tensor, captions: &[String]| base.score(images, captions).map_err(TrainError::other);
        let before = tpreference::preference_accuracy(&score, &prompts.test, per_prompt, 1003, device).map_err(stage_error)?;
        report.measure("preference.base_clip_pairwise_accuracy", before);
        publish(ctx, &report)
    }
}

fn preference_gate(report: &mut GateReport, hps: &HpsReward, test: &[String], per_prompt: usize, device: Device) -> Result<(), StageError> {
    let score = |images: &Tensor, captions: &[String]| hps.score(images, captions).map_err(TrainError::other);
    let accuracy = tpreference::preference_accuracy(&score, test, per_prompt, 1003, device).map_err(stage_error)?;
    report.push(Gate::new("preference.pairwise_accuracy", accuracy, Comparison::AtLeast, 0.8, format!("{per_prompt} labelled pairs of each test prompt")));
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `tiny_unet`: the small UNet2DConditionModel.
pub struct TinyUnet;

stage_params! {
    /// The parameters of a `tiny_unet` stage.
    pub struct TinyUnetParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(5000, 64, 1e-3, 200, 0.0)),
        pub block_out_channels: Vec<i64> = param(vec![24, 48]).min(1).doc("channels per block"),
        pub layers_per_block: i64 = param(1).min(1).doc("resnets per down block"),
        pub attention_heads: i64 = param(1).min(1).doc("attention heads per block (diffusers' attention_head_dim; one wide head is several times faster on a CPU than several narrow ones)"),
        pub norm_num_groups: i64 = param(8).min(1).doc("GroupNorm groups"),
        pub cross_attention: Vec<bool> = param(vec![true, false]).doc("which down blocks have cross-attention (up blocks mirror them)"),
        pub prompt_dropout: f64 = param(0.1).min(0).max(1).doc("probability of the empty prompt (classifier-free guidance)"),
        pub min_snr_gamma: f64 = param(5.0).min(0).doc("Min-SNR-gamma loss weighting (0: unweighted)"),
        pub ema_decay: f64 = param(0.999).min(0).max(1).doc("decay of the weights' moving average (the shipped weights)"),
        pub pool: usize = param(20000).min(1).doc("training renders encoded once by the VAE"),
    }
}

impl StageKind for TinyUnet {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_unet",
            version: 1,
            doc: "the tiny world's UNet2DConditionModel (diffusers layout): DDPM on the VAE latents, SD1.5 noise schedule, epsilon prediction, conditioned on the CLIP text encoder",
            uses_input_labels: false,
            params: TinyUnetParams::specs(),
            inputs: vec![input("prompts", "a tiny_prompts stage"), input("clip", "a tiny_clip stage"), input("vae", "a tiny_vae stage")],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyUnetParams = ctx.typed_params()?;
        let device = device_of(ctx);
        let prompts = prompts_input(ctx)?;
        let (_text_vs, text) = tunet::load_text_encoder(&input_dir(ctx.input("clip")?, TEXT_ENCODER_DIR, "config.json")?, device).map_err(stage_error)?;
        let vae = TrainableVae::load(&input_dir(ctx.input("vae")?, VAE_DIR, "config.json")?, device).map_err(stage_error)?;
        let latent_size = vae.config.latent_side(IMAGE_SIZE as i64);
        let config = TinyUnetConfig {
            block_out_channels: p.block_out_channels.clone(),
            layers_per_block: p.layers_per_block,
            attention_heads: p.attention_heads,
            norm_num_groups: p.norm_num_groups,
            cross_attention: p.cross_attention.clone(),
        }
        .diffusers(vae.config.latent_channels, latent_size, text.config().transformer.width)
        .map_err(stage_error)?;
        let schedule = p.schedule.schedule(500);
        let settings = DiffusionSettings {
            prompt_dropout: p.prompt_dropout,
            min_snr_gamma: p.min_snr_gamma,
            ema_decay: p.ema_decay,
            scaling_factor: vae.config.scaling_factor,
        };
        ctx.log("encoding the latent pool");
        let pool = LatentPool::encode(&vae.vae, &prompts.excluded, p.pool, schedule.seed, device).map_err(stage_error)?;
        drop(vae);
        let model = TrainableUnet::new(&config, schedule.seed, device).map_err(stage_error)?;
        let parameters: i64 = model.vs.variables().values().map(|t| t.numel() as i64).sum();
        ctx.log(format!("UNet with {parameters} parameters"));
        let checkpoint = ctx.resume_dir()?.join("checkpoint.safetensors");
        let conditioning = TextConditioning { tokenizer: &prompts.tokenizer, text: &text };
        let (summary, ema) = {
            let mut monitor = StageMonitor::new(ctx, schedule.steps);
            tunet::train(&model, &conditioning, &pool, &schedule, &settings, Some(&checkpoint), &mut monitor).map_err(stage_error)?
        };
        let out = ctx.out_dir().to_path_buf();
        model.save(&out.join(UNET_DIR), ema.tensors(), Precision::F32).map_err(stage_error)?;
        write_json(&out.join(TRAIN_FILE), &json!({"summary": summary, "schedule": schedule, "settings": settings, "parameters": parameters})).map_err(stage_error)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// `tiny_export`: the shipped bundle, checked through the study's loaders.
pub struct TinyExport;

stage_params! {
    /// The parameters of a `tiny_export` stage.
    pub struct TinyExportParams {
        pub seed: u64 = param(0).min(0).doc("seed of the samples and of the evaluation renders"),
        pub sample_steps: usize = param(10).min(1).max(1000).doc("DDIM steps of the sample gates (the study's)"),
        pub guidance: f64 = param(3.0).min(0).doc("classifier-free guidance of the sample gates (the study's, pipelines/all_orders.yaml)"),
        pub guidance_sweep: Vec<f64> = param(vec![1.0, 5.0, 7.5]).min(0).doc("further guidance scales whose sample measurements gates.json records"),
        pub samples_per_prompt: usize = param(8).min(1).doc("samples of each test prompt for the sample gates"),
        pub fid_renders: usize = param(40).min(2).doc("renders of each test prompt for the FID reference"),
        pub grid_prompts: usize = param(10).min(0).doc("test prompts shown in samples.png"),
        pub retrieval_sets: usize = param(4).min(1).doc("render sets of the test prompts for the retrieval gate"),
        pub psnr_renders: usize = param(8).min(1).doc("renders per test prompt for the PSNR gate"),
        pub rating_renders: usize = param(20).min(1).doc("renders per test prompt for the Pearson gate"),
        pub preference_pairs: usize = param(20).min(1).doc("labelled pairs per test prompt for the preference gate"),
        pub jpeg_quality: f64 = param(80.0).min(1).max(100).doc("JPEG quality of the compressibility reward (world.json)"),
    }
}

impl StageKind for TinyExport {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_export",
            version: 1,
            doc: "the tiny world's bundle (f16 weights, world.json, prompts, FID reference, MANIFEST.txt of blake3 hashes), loaded back through tiny_world, Diffusion::load and the rewards, with every quality gate measured on it",
            uses_input_labels: false,
            params: TinyExportParams::specs(),
            inputs: vec![
                input("prompts", "a tiny_prompts stage"),
                input("clip", "a tiny_clip stage"),
                input("vae", "a tiny_vae stage"),
                input("aesthetic", "a tiny_aesthetic stage"),
                input("preference", "a tiny_preference stage"),
                input("unet", "a tiny_unet stage"),
            ],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyExportParams = ctx.typed_params()?;
        let device = device_of(ctx);
        let out = ctx.out_dir().to_path_buf();
        write_bundle(ctx, &out, p.jpeg_quality)?;

        // The FID reference: the CLIP-score model's embeddings of renders of the test prompts.
        let test = read_prompts(&out.join(TEST_PROMPTS))?;
        let seed = p.seed;
        let clip = frozen_clip(&clip_files(out.join(CLIP_DIR), &out.join("diffusion").join(TOKENIZER_DIR)), device)?;
        let renders = prompt_scenes(&test, p.fid_renders, seed + 2000, device).map_err(stage_error)?;
        let (mu, sigma) = feature_stats(&embed_images(&clip, &renders.images)?).map_err(stage_error)?;
        write_safetensors(&out.join("fid_reference.safetensors"), &[("mu".into(), mu.shallow_clone()), ("sigma".into(), sigma.shallow_clone())], Precision::F32).map_err(stage_error)?;
        drop(clip);

        // Everything below reads the bundle as a study does.
        let world = tiny_world_spec(&out)?;
        let record = ModelRecord { world: world.clone(), tasks: Vec::new(), origin: "base".into(), adapters: None, lora_targets: crate::models::lora::default_targets() };
        let diffusion = record.load_diffusion(None, device, ComputePrecision::Fp32)?;
        let clip = frozen_clip(&world.clip_score, device)?;
        let mut report = GateReport::default();
        retrieval_gates(&mut report, &clip, &test, p.retrieval_sets)?;
        psnr_gate(&mut report, &diffusion.vae, &test, p.psnr_renders, device)?;
        let aesthetic = AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, device, Kind::Float).map_err(StageError::failed)?;
        pearson_gate(&mut report, &aesthetic, &test, p.rating_renders, device)?;
        let hps = HpsReward::load(&world.hps, device, Kind::Float).map_err(StageError::failed)?;
        preference_gate(&mut report, &hps, &test, p.preference_pairs, device)?;
        let reference = read_safetensors(&world.fid_reference).map_err(stage_error)?;
        let reference = (reference.get("mu").map(Tensor::shallow_clone), reference.get("sigma").map(Tensor::shallow_clone));
        let (Some(mu), Some(sigma)) = reference else {
            return Err(StageError::Failed("fid_reference.safetensors lacks mu or sigma".into()));
        };
        let settings = SampleSettings {
            steps: p.sample_steps,
            guidance: p.guidance,
            per_prompt: p.samples_per_prompt,
            seed,
            sweep: p.guidance_sweep.clone(),
        };
        sample_gates(ctx, &mut report, &diffusion, &clip, &test, &settings, (&mu, &sigma), p.grid_prompts)?;
        publish(ctx, &report)?;
        write_manifest(&out)
    }
}

/// Writes the bundle's files (f16 weights, configs, tokenizer, prompts, world.json) from the
/// inputs.
fn write_bundle(ctx: &StageContext, out: &Path, jpeg_quality: f64) -> Result<(), StageError> {
    let prompts = ctx.input("prompts")?;
    let diffusion = out.join("diffusion");
    copy_folder(&input_dir(prompts, TOKENIZER_DIR, "vocab.json")?, &diffusion.join(TOKENIZER_DIR))?;
    for name in [TRAIN_PROMPTS, TEST_PROMPTS] {
        copy_file(&prompts.file(name)?, &out.join(name))?;
    }
    let clip = ctx.input("clip")?;
    half_folder(&input_dir(clip, CLIP_DIR, "model.safetensors")?, &out.join(CLIP_DIR))?;
    half_folder(&input_dir(clip, TEXT_ENCODER_DIR, "model.safetensors")?, &diffusion.join(TEXT_ENCODER_DIR))?;
    half_folder(&input_dir(ctx.input("vae")?, VAE_DIR, "diffusion_pytorch_model.safetensors")?, &diffusion.join(VAE_DIR))?;
    half_folder(&input_dir(ctx.input("unet")?, UNET_DIR, "diffusion_pytorch_model.safetensors")?, &diffusion.join(UNET_DIR))?;
    half_folder(&input_dir(ctx.input("preference")?, HPS_DIR, "model.safetensors")?, &out.join(HPS_DIR))?;
    half_file(&ctx.input("aesthetic")?.file(HEAD_FILE)?, &out.join(HEAD_FILE))?;
    write_json(&diffusion.join("scheduler").join("scheduler_config.json"), &tunet::sd15_scheduler_json()).map_err(stage_error)?;
    let model_index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    write_json(&diffusion.join("model_index.json"), &model_index).map_err(stage_error)?;
    let world = json!({
        "diffusion": "diffusion",
        "resolution": IMAGE_SIZE,
        "aesthetic_clip": CLIP_DIR,
        "aesthetic_head": HEAD_FILE,
        "hps": HPS_DIR,
        "clip_score": CLIP_DIR,
        "tokenizer": format!("diffusion/{TOKENIZER_DIR}"),
        "fid_reference": "fid_reference.safetensors",
        "train_prompts": TRAIN_PROMPTS,
        "test_prompts": TEST_PROMPTS,
        "jpeg_quality": jpeg_quality,
    });
    write_json(&out.join("world.json"), &world).map_err(stage_error)
}

fn copy_file(from: &Path, to: &Path) -> Result<(), StageError> {
    let bytes = std::fs::read(from).map_err(|e| StageError::io(format!("cannot read {}", from.display()), e))?;
    write_file(to, &bytes).map_err(stage_error)
}

fn copy_folder(from: &Path, to: &Path) -> Result<(), StageError> {
    for entry in std::fs::read_dir(from).map_err(|e| StageError::io(format!("cannot list {}", from.display()), e))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            copy_file(&path, &to.join(name))?;
        }
    }
    Ok(())
}

/// A model folder with its `.safetensors` in f16 and its other files as they are.
fn half_folder(from: &Path, to: &Path) -> Result<(), StageError> {
    for entry in std::fs::read_dir(from).map_err(|e| StageError::io(format!("cannot list {}", from.display()), e))? {
        let path = entry?.path();
        let Some(name) = path.file_name() else { continue };
        if path.extension().is_some_and(|e| e == "safetensors") {
            half_file(&path, &to.join(name))?;
        } else {
            copy_file(&path, &to.join(name))?;
        }
    }
    Ok(())
}

fn half_file(from: &Path, to: &Path) -> Result<(), StageError> {
    let tensors: Vec<(String, Tensor)> = read_safetensors(from).map_err(stage_error)?.into_iter().collect();
    write_safetensors(to, &tensors, Precision::F16).map_err(stage_error)
}

/// L2-normalised CLIP image embeddings of images, in chunks, without graph.
fn embed_images(clip: &FrozenClip, images: &Tensor) -> Result<Tensor, StageError> {
    let n = images.size()[0];
    let mut out = Vec::new();
    for start in (0..n).step_by(256) {
        let chunk = images.narrow(0, start, (n - start).min(256));
        out.push(tch::no_grad(|| clip.image_embeddings(&chunk)).map_err(StageError::failed)?);
    }
    Ok(Tensor::cat(&out, 0))
}

struct SampleSettings {
    steps: usize,
    guidance: f64,
    per_prompt: usize,
    seed: u64,
    /// Further guidance scales whose sample measurements are recorded (not gated).
    sweep: Vec<f64>,
}

/// Samples `[N, 3, H, W]` in [0, 1] of each prompt (prompt-major), DDIM with guidance, with the
/// initial latents of `initial_latents(seed, i)` for sample i.
fn sample(diffusion: &Diffusion, prompts: &[String], settings: &SampleSettings) -> Result<Tensor, StageError> {
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps: settings.steps, eta: 0.0, guidance: settings.guidance }).map_err(StageError::failed)?;
    let uncond = diffusion.uncond()?;
    let all: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), settings.per_prompt)).collect();
    let mut images = Vec::new();
    for (k, chunk) in all.chunks(64).enumerate() {
        let cond = diffusion.encode_prompts(chunk)?;
        let z = initial_latents(settings.seed, (k * 64) as u64, chunk.len() as i64, diffusion.latent_shape, diffusion.device);
        let z0 = sampler.sample(&CastUnet::of(diffusion), &z, &cond, &uncond, settings.seed).map_err(StageError::failed)?;
        images.push(tch::no_grad(|| diffusion.decode(&z0)));
    }
    Ok(Tensor::cat(&images, 0))
}

/// The sample gates: CLIP score with the own prompt vs a shuffled one (each sample scored
/// against the next prompt's text), FID of the samples vs that of pure-noise images (and of
/// fresh renders, the floor); the sample grid.
#[allow(clippy::too_many_arguments)]
fn sample_gates(ctx: &StageContext, report: &mut GateReport, diffusion: &Diffusion, clip: &FrozenClip, test: &[String], settings: &SampleSettings, reference: (&Tensor, &Tensor), grid_prompts: usize) -> Result<(), StageError> {
    let device = diffusion.device;
    let per = settings.per_prompt;
    let samples = sample(diffusion, test, settings)?;
    let n = samples.size()[0];
    let own: Vec<String> = test.iter().flat_map(|p| std::iter::repeat_n(p.clone(), per)).collect();
    let shuffled: Vec<String> = (0..test.len()).flat_map(|i| std::iter::repeat_n(test[(i + 1) % test.len()].clone(), per)).collect();
    let text_of = |prompts: &[String]| -> Result<Tensor, StageError> {
        let mut out = Vec::new();
        for chunk in prompts.chunks(256) {
            out.push(clip.text_embeddings(chunk).map_err(StageError::failed)?);
        }
        Ok(Tensor::cat(&out, 0))
    };
    let (own_text, shuffled_text) = (text_of(&own)?, text_of(&shuffled)?);
    let sample_emb = embed_images(clip, &samples)?;
    let renders = prompt_scenes(test, per, settings.seed + 3000, device).map_err(stage_error)?;
    let render_emb = embed_images(clip, &renders.images)?;
    let noise = crate::tiny::train::data::images_tensor(&noise_images(n as usize, settings.seed), device).map_err(stage_error)?;
    let noise_emb = embed_images(clip, &noise)?;

    let score_own = clip_score(&sample_emb, &own_text);
    let score_shuffled = clip_score(&sample_emb, &shuffled_text);
    let (mu, sigma) = reference;
    let fid = |emb: &Tensor| -> Result<f64, StageError> {
        let (m, s) = feature_stats(emb).map_err(stage_error)?;
        Ok(frechet_distance(&m, &s, mu, sigma))
    };
    let (fid_samples, fid_noise, fid_renders) = (fid(&sample_emb)?, fid(&noise_emb)?, fid(&render_emb)?);
    let how = format!("{per} samples of each test prompt, DDIM {} steps, guidance {}", settings.steps, settings.guidance);
    report.push(Gate::new("samples.clip_score_margin", score_own - score_shuffled, Comparison::AtLeast, 10.0, format!("CLIP score with the own prompt ({score_own:.2}) minus with a shuffled prompt ({score_shuffled:.2}); {how}")));
    report.push(Gate::new("samples.fid_vs_noise", fid_samples / fid_noise, Comparison::AtMost, 0.25, format!("FID of the samples ({fid_samples:.4}) over that of uniform-noise images ({fid_noise:.4}); {how}")));
    report.measure("samples.clip_score_own", score_own);
    report.measure("samples.clip_score_shuffled", score_shuffled);
    report.measure("renders.clip_score_own", clip_score(&render_emb, &own_text));
    report.measure("renders.clip_score_shuffled", clip_score(&render_emb, &shuffled_text));
    report.measure("samples.fid", fid_samples);
    report.measure("noise.fid", fid_noise);
    report.measure("renders.fid", fid_renders);
    let mut sweep = Vec::new();
    for &guidance in &settings.sweep {
        let other = SampleSettings { guidance, sweep: Vec::new(), ..*settings };
        let emb = embed_images(clip, &sample(diffusion, test, &other)?)?;
        let (own, shuffled, fid) = (clip_score(&emb, &own_text), clip_score(&emb, &shuffled_text), fid(&emb)?);
        sweep.push(json!({"guidance": guidance, "clip_score_own": own, "clip_score_margin": own - shuffled, "fid": fid, "fid_vs_noise": fid / fid_noise}));
    }
    report.measure("samples.guidance_sweep", sweep);

    // The grid: per row, a render of the prompt then its first samples.
    let shown = grid_prompts.min(test.len());
    let columns = per.min(5) + 1;
    let sample_images = tensor_images(&samples).map_err(stage_error)?;
    let render_images = tensor_images(&renders.images).map_err(stage_error)?;
    let mut grid = Vec::new();
    for i in 0..shown {
        grid.push(render_images[i * per].clone());
        grid.extend(sample_images[i * per..i * per + columns - 1].iter().cloned());
    }
    write_png_grid(&ctx.out_dir().join("samples.png"), &grid, columns, 4).map_err(StageError::failed)?;
    let legend: String = test[..shown].iter().enumerate().map(|(i, p)| format!("row {}: {p}\n", i + 1)).collect();
    write_file(&ctx.out_dir().join("samples.txt"), format!("first column: a render of the prompt; then base-model samples ({how})\n{legend}").as_bytes()).map_err(stage_error)?;
    Ok(())
}

/// Images of independent uniform pixels, seeded.
fn noise_images(count: usize, seed: u64) -> Vec<crate::tiny::RgbImage> {
    let mut r = crate::tiny::train::rng(seed, crate::tiny::train::Purpose::Eval, u64::MAX);
    (0..count)
        .map(|_| crate::tiny::RgbImage { width: IMAGE_SIZE, height: IMAGE_SIZE, data: (0..IMAGE_SIZE * IMAGE_SIZE * 3).map(|_| rand::Rng::random::<u8>(&mut r)).collect() })
        .collect()
}

/// `MANIFEST.txt`: `<blake3>  <path>` of every bundle file (not the stage log), sorted.
fn write_manifest(out: &Path) -> Result<(), StageError> {
    let mut files = Vec::new();
    collect_files(out, out, &mut files)?;
    files.sort();
    let mut text = String::new();
    for rel in files {
        if rel == BUNDLE_MANIFEST || rel == crate::exec::kind::LOG_FILE {
            continue;
        }
        let bytes = std::fs::read(out.join(&rel))?;
        text.push_str(&format!("{}  {rel}\n", blake3::hash(&bytes).to_hex()));
    }
    write_file(&out.join(BUNDLE_MANIFEST), text.as_bytes()).map_err(stage_error)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), StageError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(format!("cannot list {}", dir.display()), e))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ddim::DdimConfig;

    #[test]
    fn scheduler_json_is_sd15s() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        write_json(&path, &tunet::sd15_scheduler_json()).unwrap();
        assert_eq!(DdimConfig::from_json_file(&path).unwrap(), DdimConfig::default());
    }
}

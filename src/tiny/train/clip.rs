//! The small CLIP: transformers `CLIPModel` layout (text and vision towers, projections,
//! logit scale), trained contrastively on captioned renders (symmetric InfoNCE, as CLIP).
//!
//! Its folder (`config.json` with `model_type: clip` + `model.safetensors`) is what the
//! rewards' `FrozenClip` loads; its text tower alone, as a `CLIPTextModel` folder, is the
//! diffusion model's `text_encoder/`.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::data::{self, prompt_scenes, scene_batch, Excluded};
use super::gates::retrieval_accuracy;
use crate::method::checkpoint::prefixed;
use super::io::{write_json, write_safetensors, Precision};
use super::vocab::Vocabulary;
use super::{adamw, resume, rng, seeded_init, trainable, LossTrack, Purpose, Schedule, TrainError, TrainSummary};
use crate::method::monitor::Monitor;
use rand::Rng;
use crate::models::clip::{normalize, preprocess, Clip, ClipConfig};
use crate::models::tokenizer::{ClipTokenizer, Padding};
use crate::rewards::clip_loader::FrozenClip;

/// The shape of the small CLIP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyClipConfig {
    pub text_width: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    /// Token positions (start, caption words, end, padding).
    pub context_length: i64,
    pub vision_width: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    /// Joint embedding size (`projection_dim`).
    pub embed_dim: i64,
}

impl Default for TinyClipConfig {
    fn default() -> Self {
        TinyClipConfig {
            text_width: 64,
            text_layers: 3,
            text_heads: 4,
            context_length: 28,
            vision_width: 64,
            vision_layers: 3,
            vision_heads: 4,
            image_size: 32,
            patch_size: 4,
            embed_dim: 64,
        }
    }
}

impl TinyClipConfig {
    fn text_config(&self, vocab: &Vocabulary) -> serde_json::Value {
        json!({
            "model_type": "clip_text_model",
            "vocab_size": vocab.len(),
            "hidden_size": self.text_width,
            "intermediate_size": 4 * self.text_width,
            "projection_dim": self.embed_dim,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "max_position_embeddings": self.context_length,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "bos_token_id": vocab.start_of_text(),
            "eos_token_id": vocab.end_of_text(),
            "pad_token_id": vocab.end_of_text(),
        })
    }

    /// transformers `CLIPModel`'s `config.json`.
    pub fn clip_model_json(&self, vocab: &Vocabulary) -> serde_json::Value {
        json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.embed_dim,
            "logit_scale_init_value": 2.6592,
            "initializer_factor": 1.0,
            "text_config": self.text_config(vocab),
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.vision_width,
                "intermediate_size": 4 * self.vision_width,
                "projection_dim": self.embed_dim,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "num_channels": 3,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "initializer_factor": 1.0,
            },
        })
    }

    /// transformers `CLIPTextModel`'s `config.json` (Stable Diffusion's `text_encoder/`).
    pub fn text_encoder_json(&self, vocab: &Vocabulary) -> serde_json::Value {
        let mut config = self.text_config(vocab);
        config["architectures"] = json!(["CLIPTextModel"]);
        config
    }
}

/// A trainable CLIP with its variables.
pub struct TrainableClip {
    pub vs: VarStore,
    pub clip: Clip,
    pub config: ClipConfig,
}

impl TrainableClip {
    /// A freshly initialised model of the `config.json` at `config_path`.
    pub fn new(config_path: &Path, seed: u64, device: Device) -> Result<Self, TrainError> {
        let config = ClipConfig::from_transformers_json(config_path).map_err(TrainError::other)?;
        let vs = VarStore::new(device);
        let clip = Clip::new(&vs.root(), &config);
        seeded_init(&vs, seed);
        Ok(TrainableClip { vs, clip, config })
    }

    /// The model of a folder (config.json + model.safetensors), trainable.
    pub fn load(dir: &Path, device: Device) -> Result<Self, TrainError> {
        let config = ClipConfig::from_transformers_json(&dir.join("config.json")).map_err(TrainError::other)?;
        let vs = VarStore::new(device);
        let clip = Clip::load(&vs, &config, dir, crate::models::weights::Extra::Reject).map_err(TrainError::other)?;
        Ok(TrainableClip { vs, clip, config })
    }

    /// L2-normalised image embeddings `[B, E]` of images in [0, 1] (in the graph).
    pub fn image_features(&self, images: &Tensor) -> Result<Tensor, TrainError> {
        let vision = self.clip.vision.as_ref().ok_or_else(|| TrainError::Model("the CLIP has no vision tower".into()))?;
        let pixels = preprocess(images, vision.config().image_size).map_err(TrainError::other)?;
        let out = vision.forward(&pixels).map_err(TrainError::other)?;
        out.embeds.map(|e| normalize(&e)).ok_or_else(|| TrainError::Model("the vision tower has no projection".into()))
    }

    /// L2-normalised text embeddings `[B, E]` of token ids (in the graph).
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor, TrainError> {
        let text = self.clip.text.as_ref().ok_or_else(|| TrainError::Model("the CLIP has no text tower".into()))?;
        let out = text.forward(ids).map_err(TrainError::other)?;
        out.embeds.map(|e| normalize(&e)).ok_or_else(|| TrainError::Model("the text tower has no projection".into()))
    }

    /// `exp(logit_scale)`, clamped at 100 as CLIP does.
    pub fn logit_scale(&self) -> Tensor {
        match &self.clip.logit_scale {
            Some(s) => s.exp().clamp_max(100.0),
            None => Tensor::from(1.0f32 / 0.07),
        }
    }

    /// The joint embedding size (`projection_dim`).
    pub fn embed_dim(&self) -> Result<i64, TrainError> {
        self.config.vision.as_ref().and_then(|v| v.projection_dim).ok_or_else(|| TrainError::Model("the CLIP has no vision projection".into()))
    }

    /// Token positions of the text tower.
    pub fn context_length(&self) -> usize {
        self.clip.text.as_ref().map_or(0, |t| t.config().context_length as usize)
    }

    /// Writes the `CLIPModel` folder: `config.json` (given) and `model.safetensors`.
    pub fn save(&self, dir: &Path, config_json: &serde_json::Value, precision: Precision) -> Result<(), TrainError> {
        write_json(&dir.join("config.json"), config_json)?;
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        write_safetensors(&dir.join("model.safetensors"), &named, precision)
    }

    /// Writes the text tower alone as a `CLIPTextModel` folder (`text_model.*` tensors).
    pub fn save_text_encoder(&self, dir: &Path, config_json: &serde_json::Value, precision: Precision) -> Result<(), TrainError> {
        write_json(&dir.join("config.json"), config_json)?;
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().filter(|(n, _)| n.starts_with("text_model.")).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        write_safetensors(&dir.join("model.safetensors"), &named, precision)
    }
}

/// Symmetric InfoNCE of matched rows: `(CE(s I T^T) + CE(s T I^T)) / 2`.
pub fn contrastive_loss(image: &Tensor, text: &Tensor, scale: &Tensor) -> Tensor {
    let logits = image.matmul(&text.tr()) * scale;
    let targets = Tensor::arange(logits.size()[0], (Kind::Int64, logits.device()));
    (logits.cross_entropy_for_logits(&targets) + logits.tr().cross_entropy_for_logits(&targets)) / 2.0
}

/// Token ids `[B, L]` of captions, padded with the end token (transformers' convention).
pub fn token_ids(tokenizer: &ClipTokenizer, captions: &[String], context_length: usize, device: Device) -> Result<Tensor, TrainError> {
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    Ok(tokenizer.tokenize(&refs, context_length, Padding::EndOfText).map_err(TrainError::other)?.to_device(device))
}

/// What the CLIP's training texts and look grades add to the contrastive loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LookSettings {
    /// Probability that a training text is the render's alt-text rather than its caption.
    pub alt_text: f64,
    /// Weight of the look-grading loss: cross-entropy of a linear probe per quality on the
    /// image embedding (the probe is not part of the shipped model); 0 for none.
    pub look_weight: f64,
    /// Weight of the factor loss: squared error of a linear probe on the image embedding
    /// predicting the eight factors of the aesthetic rating (harmony, composition, contrast,
    /// texture, shading, saturation, clutter, grain; each in [0, 1], mapped to [-1, 1]); the
    /// probe is not shipped; 0 for none.
    pub factor_weight: f64,
}

/// Contrastive training on fresh renders each step, each described by its alt-text with
/// probability `look.alt_text` and by its plain caption otherwise, plus the look-grading loss;
/// resumes from `checkpoint` when it holds a state of this run.
///
/// The grading loss is there because the contrastive loss alone learns only the salient looks
/// (weave, saturation): in a batch of different captions the content tells texts apart, and
/// subtle qualities such as grain or specks never get the gradient that would make either
/// tower notice them (measured: probes of the image embedding found grain, specks, shading and
/// composition at r < 0.1). Web CLIP saw enough alt-texts to learn them; the tiny one gets the
/// grades as a direct signal, the way the alt-text words would name them.
pub fn train(model: &TrainableClip, tokenizer: &ClipTokenizer, excluded: &Excluded, schedule: &Schedule, look: &LookSettings, checkpoint: Option<&Path>, monitor: &mut dyn Monitor) -> Result<TrainSummary, TrainError> {
    let device = model.vs.device();
    let embed = model.embed_dim()?;
    let probe_vs = VarStore::new(device);
    let qualities = data::LOOK_QUALITIES.len() as i64;
    let probe = tch::nn::linear(probe_vs.root() / "look_probe", embed, 3 * qualities, Default::default());
    let factor_probe = tch::nn::linear(probe_vs.root() / "factor_probe", embed, data::FACTORS as i64, Default::default());
    seeded_init(&probe_vs, schedule.seed ^ 0x100);
    let mut params: Vec<Tensor> = trainable(&model.vs).into_iter().map(|(_, t)| t).collect();
    if look.look_weight > 0.0 || look.factor_weight > 0.0 {
        params.extend(trainable(&probe_vs).into_iter().map(|(_, t)| t));
    }
    let mut optimizer = adamw(&params, schedule);
    let start = resume(checkpoint, &[(&model.vs, "model."), (&probe_vs, "probe.")], &mut optimizer, |_| true, monitor);
    let mut track = LossTrack::new(schedule.steps / 5, 50);
    let context = model.context_length();
    for step in start..schedule.steps {
        let batch = scene_batch(schedule.seed, 1, step as u64, schedule.batch, excluded, device)?;
        let mut r = rng(schedule.seed, Purpose::Batch, step as u64);
        let texts: Vec<String> = batch
            .captions
            .iter()
            .zip(&batch.scenes)
            .map(|(caption, scene)| if r.random_bool(look.alt_text) { data::alt_text(caption, scene) } else { caption.clone() })
            .collect();
        let ids = token_ids(tokenizer, &texts, context, device)?;
        let image = model.image_features(&batch.images)?;
        let mut loss = contrastive_loss(&image, &model.text_features(&ids)?, &model.logit_scale());
        if look.look_weight > 0.0 {
            let grades: Vec<i64> = batch.scenes.iter().flat_map(|s| data::look_bins(s).map(|g| g as i64)).collect();
            let targets = Tensor::from_slice(&grades).to_device(device);
            // The embedding is unit-length: scale it so that the probe's logits can be large.
            let logits = tch::nn::Module::forward(&probe, &(&image * 10.0)).view([-1, 3]);
            loss += logits.cross_entropy_for_logits(&targets) * look.look_weight;
        }
        if look.factor_weight > 0.0 {
            let factors: Vec<f32> = batch.scenes.iter().flat_map(data::factor_values).collect();
            let targets = Tensor::from_slice(&factors).view([-1, data::FACTORS as i64]).to_device(device) * 2.0 - 1.0;
            let predicted = tch::nn::Module::forward(&factor_probe, &(&image * 10.0));
            loss += (predicted - targets).square().mean(Kind::Float) * look.factor_weight;
        }
        schedule.update(&mut optimizer, &params, &loss, step);
        track.push(loss.double_value(&[]));
        if (step + 1) % 100 == 0 {
            monitor.log(&format!("step {}: loss {:.4}, logit scale {:.1}", step + 1, track.recent(), model.logit_scale().double_value(&[])));
        }
        schedule.checkpoint(checkpoint, step, &model.vs, || prefixed("probe.", probe_vs.variables()), &optimizer)?;
        monitor.step(step + 1, schedule.steps)?;
    }
    Ok(track.summary(schedule.steps, start))
}

/// Text-to-image retrieval among the prompts, averaged over `sets` independent renders of
/// each: `(top-1, top-5)` accuracy.
pub fn retrieval(clip: &FrozenClip, prompts: &[String], sets: usize, seed: u64) -> Result<(f64, f64), TrainError> {
    let text = clip.text_embeddings(prompts).map_err(TrainError::other)?;
    let (mut top1, mut top5) = (0.0, 0.0);
    for set in 0..sets {
        let batch = prompt_scenes(prompts, 1, seed + set as u64, clip.device)?;
        let image = tch::no_grad(|| clip.image_embeddings(&batch.images)).map_err(TrainError::other)?;
        top1 += retrieval_accuracy(&text, &image, 1);
        top5 += retrieval_accuracy(&text, &image, 5);
    }
    Ok((top1 / sets as f64, top5 / sets as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::prompt_split;
    use crate::tiny::train::data::LOOK_WORDS;
    use crate::tiny::train::vocab::caption_words;
    use crate::method::monitor::{Cancelled, Quiet};

    const LOOK: LookSettings = LookSettings { alt_text: 0.5, look_weight: 1.0, factor_weight: 1.0 };

    fn tiny(dir: &Path) -> (TrainableClip, ClipTokenizer, serde_json::Value) {
        let vocab = Vocabulary::for_words(&caption_words(&LOOK_WORDS)).unwrap();
        vocab.write_folder(&dir.join("tokenizer"), 28).unwrap();
        let cfg = TinyClipConfig { text_width: 32, text_layers: 1, vision_width: 32, vision_layers: 1, embed_dim: 16, patch_size: 8, ..TinyClipConfig::default() };
        let json = cfg.clip_model_json(&vocab);
        write_json(&dir.join("config.json"), &json).unwrap();
        let model = TrainableClip::new(&dir.join("config.json"), 3, Device::Cpu).unwrap();
        let tokenizer = ClipTokenizer::from_hf_folder(&dir.join("tokenizer")).unwrap();
        (model, tokenizer, json)
    }

    #[test]
    fn training_is_seeded_lowers_the_loss_and_saves_a_loadable_folder() {
        let split = prompt_split(0);
        let excluded = Excluded::new(&split.test);
        let schedule = Schedule { steps: 30, batch: 32, lr: 2e-3, warmup: 3, weight_decay: 0.0, seed: 1, checkpoint_every: 0 };
        let dir = tempfile::tempdir().unwrap();
        let (a, tokenizer, json) = tiny(dir.path());
        let summary = train(&a, &tokenizer, &excluded, &schedule, &LOOK, None, &mut Quiet::default()).unwrap();
        assert!(summary.last_loss < summary.first_loss - 0.2, "{summary:?}");
        let (b, _, _) = tiny(dir.path());
        train(&b, &tokenizer, &excluded, &schedule, &LOOK, None, &mut Quiet::default()).unwrap();
        for (name, t) in a.vs.variables() {
            assert!(t.equal(&b.vs.variables()[&name]), "{name} differs between two runs of one seed");
        }
        a.save(&dir.path().join("clip"), &json, Precision::F32).unwrap();
        let files = crate::rewards::clip_loader::ClipFiles {
            layout: crate::rewards::clip_loader::ClipLayout::Transformers,
            weights: dir.path().join("clip"),
            config: None,
            tokenizer: dir.path().join("tokenizer"),
        };
        let frozen = crate::rewards::clip_loader::FrozenClip::load(&files, Device::Cpu, Kind::Float).unwrap();
        let batch = scene_batch(9, 1, 0, 4, &excluded, Device::Cpu).unwrap();
        let ours = tch::no_grad(|| a.image_features(&batch.images).unwrap());
        let theirs = frozen.image_embeddings(&batch.images).unwrap();
        assert!((ours - theirs).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
        let split = prompt_split(0);
        let excluded = Excluded::new(&split.test);
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt.safetensors");
        let full = Schedule { steps: 6, batch: 8, lr: 1e-3, warmup: 2, weight_decay: 0.1, seed: 4, checkpoint_every: 3 };
        let (a, tokenizer, _) = tiny(dir.path());
        train(&a, &tokenizer, &excluded, &full, &LOOK, None, &mut Quiet::default()).unwrap();
        // Stop after the checkpoint at step 3 ...
        struct StopAt(usize);
        impl Monitor for StopAt {
            fn step(&mut self, step: usize, _: usize) -> Result<(), Cancelled> {
                if step == self.0 { Err(Cancelled) } else { Ok(()) }
            }
            fn log(&mut self, _: &str) {}
        }
        let (b, _, _) = tiny(dir.path());
        assert!(matches!(train(&b, &tokenizer, &excluded, &full, &LOOK, Some(&ckpt), &mut StopAt(4)), Err(TrainError::Cancelled)));
        // ... and resume in a fresh model.
        let (c, _, _) = tiny(dir.path());
        let mut log = Quiet::default();
        let summary = train(&c, &tokenizer, &excluded, &full, &LOOK, Some(&ckpt), &mut log).unwrap();
        assert_eq!(summary.resumed_at, 3);
        for (name, t) in a.vs.variables() {
            let diff = (&t - &c.vs.variables()[&name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
        }
    }
}

//! `tiny_clip`: the small CLIP (`clip/`, a transformers `CLIPModel` folder) and its text tower as
//! the diffusion model's `text_encoder/`; gate: text-to-image retrieval among the test prompts.
use serde_json::json;

use crate::exec::{StageContext, StageError};
use crate::pipeline::schema::InputSpec;
use crate::rewards::clip_loader::FrozenClip;
use crate::stage_params;
use crate::tiny::IMAGE_SIZE;
use crate::tiny::train::clip::{self as tclip, TinyClipConfig, TrainableClip};
use crate::tiny::train::gates::{Comparison, Gate, GateReport};
use crate::tiny::train::io::{write_json, Precision};
use crate::tiny::train::vocab::Vocabulary;

use crate::stages::monitor::StageMonitor;
use super::{CLIP_DIR, TEXT_ENCODER_DIR, TRAIN_FILE, input, ScheduleParams, schedule_defaults, stage_error, device_of, publish, prompts_input, clip_files, frozen_clip, TinyKind};

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
        pub patch_size: i64 = param(4).min(1).max(32).doc("ViT patch size (32 / patch_size patches a side; 8 loses the grain, specks and shading that the aesthetic rating weighs)"),
        pub embed_dim: i64 = param(64).min(1).doc("joint embedding size"),
        pub alt_text: f64 = param(0.8).min(0).max(1).doc("probability that a training text is the render's alt-text (caption + look words) rather than its caption"),
        pub look_weight: f64 = param(1.0).min(0).doc("weight of the look-grading loss (a linear probe per quality on the image embedding, not shipped)"),
        pub factor_weight: f64 = param(5.0).min(0).doc("weight of the factor loss (a linear probe on the image embedding regressing the aesthetic rating's eight factors, not shipped; 0: none)"),
        pub eval_sets: usize = param(4).min(1).doc("independent render sets of the test prompts for the retrieval gate"),
    }
}

impl TinyKind for TinyClip {
    const KIND: &'static str = "tiny_clip";
    const DOC: &'static str = "the tiny world's CLIP (transformers CLIPModel layout), contrastive on captioned renders; its text tower is the diffusion model's text encoder";
    type Params = TinyClipParams;

    fn inputs() -> Vec<InputSpec> {
        vec![input("prompts", "a tiny_prompts stage")]
    }

    fn run(&self, ctx: &mut StageContext, p: TinyClipParams) -> Result<(), StageError> {
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
            let look = tclip::LookSettings { alt_text: p.alt_text, look_weight: p.look_weight, factor_weight: p.factor_weight };
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

pub(super) fn retrieval_gates(report: &mut GateReport, clip: &FrozenClip, test: &[String], sets: usize) -> Result<(), StageError> {
    let (top1, top5) = tclip::retrieval(clip, test, sets, 1000).map_err(stage_error)?;
    let detail = format!("text-to-image retrieval among the {} test prompts, mean of {sets} render sets", test.len());
    report.push(Gate::new("clip.retrieval_top1", top1, Comparison::AtLeast, 0.30, detail.clone()));
    report.push(Gate::new("clip.retrieval_top5", top5, Comparison::AtLeast, 0.60, detail));
    Ok(())
}


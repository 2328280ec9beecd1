//! `tiny_preference`: the HPSv2-style preference model (`hps/`); gate: pairwise accuracy on
//! pairs of test prompts.
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::exec::{StageContext, StageError};
use crate::pipeline::schema::InputSpec;
use crate::rewards::hps::HpsReward;
use crate::stage_params;
use crate::tiny::train::clip::TrainableClip;
use crate::tiny::train::gates::{Comparison, Gate, GateReport};
use crate::tiny::train::io::{write_json, Precision};
use crate::tiny::train::{preference as tpreference, TrainError};

use crate::stages::monitor::StageMonitor;
use super::{CLIP_DIR, HPS_DIR, TRAIN_FILE, input, ScheduleParams, schedule_defaults, stage_error, device_of, publish, input_dir, prompts_input, clip_files, TinyKind};

/// `tiny_preference`: the HPSv2-style preference model.
pub struct TinyPreference;

stage_params! {
    /// The parameters of a `tiny_preference` stage.
    pub struct TinyPreferenceParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(600, 64, 1e-4, 50, 0.1)),
        pub eval_pairs: usize = param(20).min(1).doc("labelled pairs per test prompt for the accuracy gate"),
    }
}

impl TinyKind for TinyPreference {
    const KIND: &'static str = "tiny_preference";
    const DOC: &'static str = "the tiny world's human-preference model: a copy of the CLIP fine-tuned on preference pairs as HPSv2, scored as cosine";
    type Params = TinyPreferenceParams;

    fn inputs() -> Vec<InputSpec> {
        vec![input("prompts", "a tiny_prompts stage"), input("clip", "a tiny_clip stage")]
    }

    fn run(&self, ctx: &mut StageContext, p: TinyPreferenceParams) -> Result<(), StageError> {
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

pub(super) fn preference_gate(report: &mut GateReport, hps: &HpsReward, test: &[String], per_prompt: usize, device: Device) -> Result<(), StageError> {
    let score = |images: &Tensor, captions: &[String]| hps.score(images, captions).map_err(TrainError::other);
    let accuracy = tpreference::preference_accuracy(&score, test, per_prompt, 1003, device).map_err(stage_error)?;
    report.push(Gate::new("preference.pairwise_accuracy", accuracy, Comparison::AtLeast, 0.8, format!("{per_prompt} labelled pairs of each test prompt")));
    Ok(())
}


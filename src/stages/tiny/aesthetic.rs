//! `tiny_aesthetic`: the LAION-style head on the CLIP image embedding; gate: Pearson r with the
//! procedural rating on test renders.
use serde_json::json;
use tch::{Device, Kind};

use crate::exec::{StageContext, StageError};
use crate::models::aesthetic::AestheticConfig;
use crate::pipeline::schema::InputSpec;
use crate::rewards::aesthetic::AestheticReward;
use crate::stage_params;
use crate::tiny::train::aesthetic as taesthetic;
use crate::tiny::train::gates::{Comparison, Gate, GateReport};
use crate::tiny::train::io::{write_json, Precision};

use crate::stages::monitor::StageMonitor;
use super::{CLIP_DIR, HEAD_FILE, TRAIN_FILE, input, ScheduleParams, schedule_defaults, stage_error, device_of, publish, input_dir, prompts_input, clip_files, frozen_clip, TinyKind};

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

impl TinyKind for TinyAesthetic {
    const KIND: &'static str = "tiny_aesthetic";
    const DOC: &'static str = "the tiny world's aesthetic head (LAION improved-aesthetic-predictor layout) on the CLIP image embedding, fit to the procedural rating";
    type Params = TinyAestheticParams;

    fn inputs() -> Vec<InputSpec> {
        vec![input("prompts", "a tiny_prompts stage"), input("clip", "a tiny_clip stage")]
    }

    fn run(&self, ctx: &mut StageContext, p: TinyAestheticParams) -> Result<(), StageError> {
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

pub(super) fn pearson_gate(report: &mut GateReport, reward: &AestheticReward, test: &[String], per_prompt: usize, device: Device) -> Result<(), StageError> {
    let r = taesthetic::rating_correlation(reward, test, per_prompt, taesthetic::GATE_RENDER_SEED, device).map_err(stage_error)?;
    report.push(Gate::new("aesthetic.pearson_r", r, Comparison::AtLeast, 0.8, format!("head score vs procedural rating on {per_prompt} renders of each test prompt")));
    Ok(())
}


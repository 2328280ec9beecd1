//! `tiny_vae`: the small AutoencoderKL (`vae/`); gate: reconstruction PSNR on test renders.
use serde_json::json;
use tch::Device;

use crate::exec::{StageContext, StageError};
use crate::pipeline::schema::InputSpec;
use crate::stage_params;
use crate::tiny::IMAGE_SIZE;
use crate::tiny::train::gates::{Comparison, Gate, GateReport};
use crate::tiny::train::io::{write_json, Precision};
use crate::tiny::train::vae::{self as tvae, TinyVaeConfig, TrainableVae};

use crate::stages::monitor::StageMonitor;
use super::{VAE_DIR, TRAIN_FILE, input, ScheduleParams, schedule_defaults, stage_error, device_of, publish, prompts_input, TinyKind};

/// `tiny_vae`: the small AutoencoderKL.
pub struct TinyVae;

stage_params! {
    /// The parameters of a `tiny_vae` stage.
    pub struct TinyVaeParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(4500, 32, 1e-3, 100, 0.0)),
        pub block_out_channels: Vec<i64> = param(vec![16, 32, 32]).min(1).doc("channels per block (3 blocks: 32x32 -> 8x8 latents)"),
        pub latent_channels: i64 = param(4).min(1).doc("latent channels"),
        pub norm_num_groups: i64 = param(8).min(1).doc("GroupNorm groups"),
        pub kl_weight: f64 = param(1e-6).min(0).doc("weight of the KL term (per-image sums, as SD's VAE)"),
        pub edge_weight: f64 = param(0.0).min(0).doc("weight of the edge term (mean absolute difference of neighbour-pixel differences; 0: none)"),
        pub eval_renders: usize = param(8).min(1).doc("renders per test prompt for the PSNR gate"),
    }
}

impl TinyKind for TinyVae {
    const KIND: &'static str = "tiny_vae";
    const DOC: &'static str = "the tiny world's AutoencoderKL (diffusers layout), 32x32x3 <-> 8x8x4, with its latent scaling factor";
    type Params = TinyVaeParams;

    fn inputs() -> Vec<InputSpec> {
        vec![input("prompts", "a tiny_prompts stage")]
    }

    fn run(&self, ctx: &mut StageContext, p: TinyVaeParams) -> Result<(), StageError> {
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
            let terms = tvae::VaeLoss { kl_weight: p.kl_weight, edge_weight: p.edge_weight };
            tvae::train(&model, &prompts.excluded, &schedule, &terms, Some(&checkpoint), &mut monitor).map_err(stage_error)?
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

pub(super) fn psnr_gate(report: &mut GateReport, vae: &crate::models::vae::AutoencoderKL, test: &[String], per_prompt: usize, device: Device) -> Result<(), StageError> {
    let psnr = tvae::reconstruction_psnr(vae, test, per_prompt, 1001, device).map_err(stage_error)?;
    report.push(Gate::new("vae.psnr_db", psnr, Comparison::AtLeast, 25.0, format!("reconstruction of {per_prompt} renders of each test prompt (MSE over all pixels)")));
    Ok(())
}


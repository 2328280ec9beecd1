//! `tiny_unet`: the small UNet2DConditionModel (`unet/`, EMA weights).
use serde_json::json;

use crate::exec::{StageContext, StageError};
use crate::pipeline::schema::InputSpec;
use crate::stage_params;
use crate::tiny::IMAGE_SIZE;
use crate::tiny::train::io::{write_json, Precision};
use crate::tiny::train::unet::{self as tunet, DiffusionSettings, LatentPool, TextConditioning, TinyUnetConfig, TrainableUnet};
use crate::tiny::train::vae::TrainableVae;

use crate::stages::monitor::StageMonitor;
use super::{TEXT_ENCODER_DIR, VAE_DIR, UNET_DIR, TRAIN_FILE, input, ScheduleParams, schedule_defaults, stage_error, device_of, input_dir, prompts_input, TinyKind};

/// `tiny_unet`: the small UNet2DConditionModel.
pub struct TinyUnet;

stage_params! {
    /// The parameters of a `tiny_unet` stage.
    pub struct TinyUnetParams {
        pub schedule: ScheduleParams = flatten_with(schedule_defaults(13000, 64, 1e-3, 200, 0.0)),
        pub block_out_channels: Vec<i64> = param(vec![32, 64, 64]).min(1).doc("channels per block (8x8, 4x4 and 2x2 latents)"),
        pub layers_per_block: i64 = param(1).min(1).doc("resnets per down block"),
        pub attention_heads: i64 = param(1).min(1).doc("attention heads per block (diffusers' attention_head_dim; one wide head is several times faster on a CPU than several narrow ones)"),
        pub norm_num_groups: i64 = param(8).min(1).doc("GroupNorm groups"),
        pub cross_attention: Vec<bool> = param(vec![true, true, false]).doc("which down blocks have cross-attention (up blocks mirror them)"),
        pub prompt_dropout: f64 = param(0.1).min(0).max(1).doc("probability of the empty prompt (classifier-free guidance)"),
        pub min_snr_gamma: f64 = param(5.0).min(0).doc("Min-SNR-gamma loss weighting (0: unweighted)"),
        pub ema_decay: f64 = param(0.999).min(0).max(1).doc("decay of the weights' moving average (the shipped weights)"),
        pub pool: usize = param(40000).min(1).doc("training renders encoded once by the VAE"),
    }
}

impl TinyKind for TinyUnet {
    const KIND: &'static str = "tiny_unet";
    const DOC: &'static str = "the tiny world's UNet2DConditionModel (diffusers layout): DDPM on the VAE latents, SD1.5 noise schedule, epsilon prediction, conditioned on the CLIP text encoder";
    type Params = TinyUnetParams;

    fn inputs() -> Vec<InputSpec> {
        vec![input("prompts", "a tiny_prompts stage"), input("clip", "a tiny_clip stage"), input("vae", "a tiny_vae stage")]
    }

    fn run(&self, ctx: &mut StageContext, p: TinyUnetParams) -> Result<(), StageError> {
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


//! What the compute estimates of `plan` share (the training and evaluation kinds make theirs):
//! floating-point operations of the UNet, the part of training and sampling that dominates at
//! both scales, from its diffusers config. A count of the
//! multiply-adds of convolutions, projections and attention (x2 for FLOP); norms, activations
//! and the VAE are left out, so the figure is a lower bound good to a few tens of percent.
//! Peak memory comes from [`super::memory`], from the world's files. What the estimates know of
//! the world (the UNet, the latent side, the number of prompts) comes from the world's record.
use crate::models::precision::Precision;
use crate::models::unet::{PerBlock, UNet2DConditionConfig};
use crate::pipeline::{ResolvedPipeline, ResolvedStage};

use super::memory::{self, Job};
use super::world::{read_prompts, world_of_stage, WorldSpec};

fn conv(k: i64, cin: i64, cout: i64, side: i64) -> f64 {
    2.0 * (k * k * cin * cout) as f64 * (side * side) as f64
}

fn resnet(cin: i64, cout: i64, side: i64, temb: i64) -> f64 {
    let shortcut = if cin != cout { conv(1, cin, cout, side) } else { 0.0 };
    conv(3, cin, cout, side) + conv(3, cout, cout, side) + 2.0 * (temb * cout) as f64 + shortcut
}

fn transformer(c: i64, side: i64, context_len: i64, cross_dim: i64) -> f64 {
    let t = (side * side) as f64;
    let c = c as f64;
    let (l, d) = (context_len as f64, cross_dim as f64);
    let proj = 2.0 * 2.0 * t * c * c;
    let self_attn = 2.0 * 4.0 * t * c * c + 2.0 * 2.0 * t * t * c;
    let cross = 2.0 * (2.0 * t * c * c + 2.0 * l * d * c) + 2.0 * 2.0 * t * l * c;
    let ff = 2.0 * t * c * 8.0 * c + 2.0 * t * 4.0 * c * c;
    proj + self_attn + cross + ff
}

/// FLOPs of one UNet forward pass of one sample at `side` x `side` latents.
pub fn unet_forward_flops(cfg: &UNet2DConditionConfig, side: i64, context_len: i64) -> f64 {
    let ch = &cfg.block_out_channels;
    let Some(&first) = ch.first() else { return 0.0 };
    let layers = match &cfg.layers_per_block {
        PerBlock::All(v) => *v,
        PerBlock::Each(v) => v.first().copied().unwrap_or(1),
    };
    let temb = first * 4;
    let cross = cfg.cross_attention_dim;
    let mut flops = conv(3, cfg.in_channels, first, side);
    let mut s = side;
    let mut skips = vec![first];
    let mut cin = first;
    for (i, &cout) in ch.iter().enumerate() {
        let attn = cfg.down_block_types.get(i).is_some_and(|t| t.starts_with("CrossAttn"));
        for _ in 0..layers {
            flops += resnet(cin, cout, s, temb);
            if attn {
                flops += transformer(cout, s, context_len, cross);
            }
            cin = cout;
            skips.push(cout);
        }
        if i + 1 < ch.len() {
            flops += conv(3, cout, cout, s / 2);
            s /= 2;
            skips.push(cout);
        }
    }
    let last = *ch.last().unwrap_or(&first);
    flops += 2.0 * resnet(last, last, s, temb) + transformer(last, s, context_len, cross);
    let mut cin = last;
    for (i, &cout) in ch.iter().rev().enumerate() {
        let attn = cfg.up_block_types.get(i).is_some_and(|t| t.starts_with("CrossAttn"));
        for _ in 0..=layers {
            let skip = skips.pop().unwrap_or(cout);
            flops += resnet(cin + skip, cout, s, temb);
            if attn {
                flops += transformer(cout, s, context_len, cross);
            }
            cin = cout;
        }
        if i + 1 < ch.len() {
            s *= 2;
            flops += conv(3, cout, cout, s);
        }
    }
    flops + conv(3, first, cfg.out_channels, side)
}

pub fn input_stage<'a>(stage: &ResolvedStage, pipeline: &'a ResolvedPipeline, input: &str) -> Vec<&'a ResolvedStage> {
    stage.inputs.get(input).into_iter().flatten().filter_map(|id| pipeline.stages.iter().find(|s| &s.id == id)).collect()
}

/// The world a stage's model comes from and the world stage's LoRA targets, following `model`
/// and `models` inputs up to the world stage.
pub fn upstream_world(stage: &ResolvedStage, pipeline: &ResolvedPipeline) -> Result<(WorldSpec, Vec<String>), String> {
    let mut current = stage;
    for _ in 0..64 {
        if let Some(world) = world_of_stage(current) {
            return world.map_err(|e| e.to_string());
        }
        current = input_stage(current, pipeline, "model").into_iter().chain(input_stage(current, pipeline, "models")).next().ok_or("no world upstream")?;
    }
    Err("no world upstream".into())
}

/// The peak memory of `job` (made with the ranks of the stage's input model), or why it is
/// unknown.
pub fn peak_memory(world: &Result<(WorldSpec, Vec<String>), String>, job: &Job, precision: Precision) -> Result<u64, String> {
    let (world, targets) = world.as_ref().map_err(Clone::clone)?;
    memory::estimate(world, targets, job, precision).map(|e| e.peak()).map_err(|e| e.to_string())
}

/// The estimate's note, with why the peak memory is unknown when it is.
pub fn with_memory(note: String, memory: &Result<u64, String>) -> Option<String> {
    Some(match memory {
        Ok(_) => note,
        Err(reason) => format!("{note}; peak memory unknown: {reason}"),
    })
}

/// The number of prompts in a world's prompt file, or why it is unknown.
pub fn prompt_count(path: &std::path::Path) -> Result<i64, String> {
    read_prompts(path).map(|p| p.len() as i64).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_unet_forward_is_a_few_hundred_gigaflops() {
        // Published figures for SD1.5's UNet at 64x64 latents are about 0.4 TMAC (0.8 TFLOP).
        let f = unet_forward_flops(&UNet2DConditionConfig::sd15(), 64, 77);
        assert!(f > 5e11 && f < 1.2e12, "{f:e}");
        // Quadrupling the area roughly quadruples convolutions and more for attention.
        assert!(unet_forward_flops(&UNet2DConditionConfig::sd15(), 128, 77) > 4.0 * f);
    }
}

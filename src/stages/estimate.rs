//! Compute estimates for `plan`: floating-point operations of the UNet, the part of training and
//! sampling that dominates at both scales, from its diffusers config. A count of the
//! multiply-adds of convolutions, projections and attention (x2 for FLOP); norms, activations
//! and the VAE are left out, so the figure is a lower bound good to a few tens of percent.
//! Peak memory comes from [`super::memory`], from the world's files.
use crate::exec::kind::Estimate;
use crate::exec::Params;
use crate::models::unet::{PerBlock, UNet2DConditionConfig};
use crate::pipeline::{ResolvedPipeline, ResolvedStage};

use super::memory;
use super::precision::Precision;
use super::records::Task;
use super::world::{sd15_world_spec, tiny_world_spec, WorldSpec};

/// The UNet config of the world a stage's model comes from, its latent side and the context
/// length, following `model` / `models` inputs up to the world stage.
pub fn world_unet(stage: &ResolvedStage, pipeline: &ResolvedPipeline) -> Option<(UNet2DConditionConfig, i64)> {
    let mut current = stage;
    for _ in 0..64 {
        match current.kind.as_str() {
            "sd15_world" => {
                let path = std::path::Path::new(current.params.opt_str("sd15")?).join("unet/config.json");
                let cfg = UNet2DConditionConfig::from_file(&path).unwrap_or_else(|_| UNet2DConditionConfig::sd15());
                let resolution = current.params.i64_of("resolution").ok()?;
                return Some((cfg, resolution / 8));
            }
            "tiny_world" => {
                let root = std::path::Path::new(current.params.opt_str("root")?);
                let cfg = UNet2DConditionConfig::from_file(&root.join("diffusion/unet/config.json")).ok()?;
                let side = cfg.sample_size.unwrap_or(8);
                return Some((cfg, side));
            }
            _ => {}
        }
        let upstream = current.inputs.get("model").or_else(|| current.inputs.get("models"))?.first()?;
        current = pipeline.stages.iter().find(|s| &s.id == upstream)?;
    }
    None
}

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

fn input_stage<'a>(stage: &ResolvedStage, pipeline: &'a ResolvedPipeline, input: &str) -> Vec<&'a ResolvedStage> {
    stage.inputs.get(input).into_iter().flatten().filter_map(|id| pipeline.stages.iter().find(|s| &s.id == id)).collect()
}

/// The world a stage's model comes from, and the world stage's LoRA targets.
fn upstream_world(stage: &ResolvedStage, pipeline: &ResolvedPipeline) -> Result<(WorldSpec, Vec<String>), String> {
    let mut current = stage;
    for _ in 0..64 {
        let world = match current.kind.as_str() {
            "tiny_world" => Some(tiny_world_spec(std::path::Path::new(current.params.opt_str("root").unwrap_or_default()))),
            "sd15_world" => Some(sd15_world_spec(&current.params)),
            _ => None,
        };
        if let Some(world) = world {
            let targets = current.params.get("lora_targets").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect()).unwrap_or_default();
            return world.map(|w| (w, targets)).map_err(|e| e.to_string());
        }
        current = input_stage(current, pipeline, "model").into_iter().chain(input_stage(current, pipeline, "models")).next().ok_or("no world upstream")?;
    }
    Err("no world upstream".into())
}

/// The summed adapter rank of the model a stage writes (fine-tunes add theirs, soups hold all
/// their members').
fn model_ranks(stage: &ResolvedStage, pipeline: &ResolvedPipeline, depth: usize) -> i64 {
    if depth > 64 {
        return 0;
    }
    match stage.kind.as_str() {
        "finetune" | "joint" => stage.params.i64_of("lora_rank").unwrap_or(4) + input_ranks(stage, pipeline, "model", depth),
        "soup" => input_ranks(stage, pipeline, "models", depth),
        _ => 0,
    }
}

fn input_ranks(stage: &ResolvedStage, pipeline: &ResolvedPipeline, input: &str, depth: usize) -> i64 {
    input_stage(stage, pipeline, input).into_iter().map(|s| model_ranks(s, pipeline, depth + 1)).sum()
}

/// The peak memory of a training (`train: true`) or evaluation stage, or why it is unknown.
fn peak_memory(stage: &ResolvedStage, pipeline: &ResolvedPipeline) -> Result<u64, String> {
    let (world, targets) = upstream_world(stage, pipeline)?;
    let precision = Precision::of_params(&stage.params).map_err(|e| e.to_string())?;
    let earlier = input_ranks(stage, pipeline, "model", 0);
    let job = match stage.kind.as_str() {
        "evaluate" => memory::evaluation_job(&stage.params, earlier),
        "joint" => {
            let weights = stage.params.get("weights").and_then(|v| v.as_object()).cloned().unwrap_or_default();
            let mut tasks: Vec<Task> = weights.keys().filter_map(|k| Task::parse(k)).collect();
            tasks.sort();
            memory::training_job(&stage.params, tasks, earlier)
        }
        _ => {
            let task = stage.params.opt_str("task").and_then(Task::parse).ok_or("no task")?;
            memory::training_job(&stage.params, vec![task], earlier)
        }
    };
    memory::estimate(&world, &targets, &job, precision).map(|e| e.peak()).map_err(|e| e.to_string())
}

/// The estimate's note, with why the peak memory is unknown when it is.
fn with_memory(note: String, memory: &Result<u64, String>) -> Option<String> {
    Some(match memory {
        Ok(_) => note,
        Err(reason) => format!("{note}; peak memory unknown: {reason}"),
    })
}

/// Training: per prompt, N-1 guided no-grad forwards (2 samples each), one guided forward with
/// gradient (about 3x: forward and backward), RID's teacher forward (or its full trajectory).
pub fn training_estimate(stage: &ResolvedStage, pipeline: &ResolvedPipeline, prompts_per_epoch_default: i64) -> Estimate {
    let p = &stage.params;
    let Some((cfg, side)) = world_unet(stage, pipeline) else {
        return Estimate::default();
    };
    let forward = unet_forward_flops(&cfg, side, 77);
    let n = p.i64_of("ddim_steps").unwrap_or(50) as f64;
    let guided = if p.f64_of("guidance").unwrap_or(7.5) == 1.0 { 1.0 } else { 2.0 };
    let teacher = match (p.opt_str("method"), p.opt_str("distill")) {
        (Some("rid"), Some("full_step")) => n * guided,
        (Some("rid"), Some("last_step")) => guided,
        _ => 0.0,
    };
    let per_prompt = forward * ((n - 1.0) * guided + 3.0 * guided + teacher);
    let batch = p.i64_of("batch_size").unwrap_or(8).max(1);
    let per_epoch = match p.i64_of("prompts_per_epoch").unwrap_or(0) {
        n if n > 0 => n,
        _ => prompts_per_epoch_default,
    };
    let steps = p.i64_of("epochs").unwrap_or(1) * ((per_epoch + batch - 1) / batch);
    let memory = peak_memory(stage, pipeline);
    Estimate {
        flops: Some(per_prompt * (steps * batch) as f64),
        peak_memory_bytes: memory.as_ref().ok().copied(),
        note: with_memory(format!("{steps} steps x {batch} prompts, N={n}"), &memory),
    }
}

/// Sampling for evaluation: N guided forwards per image.
pub fn sampling_estimate(stage: &ResolvedStage, pipeline: &ResolvedPipeline, prompts_default: i64) -> Estimate {
    let p = &stage.params;
    let Some((cfg, side)) = world_unet(stage, pipeline) else {
        return Estimate::default();
    };
    let n = p.i64_of("ddim_steps").unwrap_or(50) as f64;
    let guided = if p.f64_of("guidance").unwrap_or(7.5) == 1.0 { 1.0 } else { 2.0 };
    let prompts = match p.i64_of("max_prompts").unwrap_or(0) {
        m if m > 0 => m,
        _ => prompts_default,
    };
    let images = prompts * p.i64_of("images_per_prompt").unwrap_or(1);
    let memory = peak_memory(stage, pipeline);
    Estimate {
        flops: Some(unet_forward_flops(&cfg, side, 77) * n * guided * images as f64),
        peak_memory_bytes: memory.as_ref().ok().copied(),
        note: with_memory(format!("{images} images, N={n}"), &memory),
    }
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

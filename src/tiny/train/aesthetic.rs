//! The aesthetic head: LAION's improved-aesthetic-predictor structure (Linear layers without
//! activations, `layers.{i}.{weight,bias}`) on the frozen small CLIP's L2-normalised image
//! embedding, fit by squared error to the procedural rating (1-10) of training renders.
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{adamw, LossTrack, Schedule, TrainSummary};
use super::data::{prompt_scenes, scene_batch, Excluded};
use super::gates::pearson;
use super::io::{write_safetensors, Precision};
use super::vae::chunks;
use super::{rng, seeded_init, trainable, Purpose, TrainError};
use crate::method::monitor::Monitor;
use crate::models::aesthetic::{AestheticConfig, AestheticHead};
use crate::rewards::aesthetic::AestheticReward;
use crate::rewards::clip_loader::FrozenClip;
use crate::tiny::aesthetic_rating;

/// Frozen-CLIP embeddings `[N, E]` of `count` training renders and their ratings `[N]`.
pub fn embedded_ratings(clip: &FrozenClip, excluded: &Excluded, count: usize, seed: u64, device: Device) -> Result<(Tensor, Tensor), TrainError> {
    let mut embeddings = Vec::new();
    let mut ratings = Vec::new();
    for (i, size) in chunks(count, 256).enumerate() {
        let batch = scene_batch(seed, 4, i as u64, size, excluded, device)?;
        embeddings.push(tch::no_grad(|| clip.image_embeddings(&batch.images)).map_err(TrainError::other)?);
        ratings.extend(batch.scenes.iter().map(aesthetic_rating));
    }
    Ok((Tensor::cat(&embeddings, 0), Tensor::from_slice(&ratings).to_device(device)))
}

/// Fits a head of widths `dims` to a pool of embeddings and ratings (mini-batches drawn from the
/// pool by the schedule's seed). Short and cheap: no checkpoints.
pub fn train(embeddings: &Tensor, ratings: &Tensor, dims: &[i64], schedule: &Schedule, monitor: &mut dyn Monitor) -> Result<(VarStore, AestheticHead, TrainSummary), TrainError> {
    let device = embeddings.device();
    let vs = VarStore::new(device);
    let head = AestheticHead::new(&vs.root(), &AestheticConfig { dims: dims.to_vec() }).map_err(TrainError::other)?;
    seeded_init(&vs, schedule.seed);
    let params: Vec<Tensor> = trainable(&vs).into_iter().map(|(_, t)| t).collect();
    let mut optimizer = adamw(&params, schedule);
    optimizer.config.beta2 = 0.999;
    optimizer.config.eps = 1e-8;
    let n = embeddings.size()[0];
    let mut track = LossTrack::new(schedule.steps / 5, 50);
    for step in 0..schedule.steps {
        let mut r = rng(schedule.seed, Purpose::Batch, step as u64);
        let picks: Vec<i64> = (0..schedule.batch).map(|_| rand::Rng::random_range(&mut r, 0..n)).collect();
        let index = Tensor::from_slice(&picks).to_device(device);
        let x = embeddings.index_select(0, &index);
        let y = ratings.index_select(0, &index);
        let loss = (head.forward(&x).map_err(TrainError::other)?.squeeze_dim(-1) - y).square().mean(Kind::Float);
        schedule.update(&mut optimizer, &params, &loss, step);
        track.push(loss.double_value(&[]));
        if (step + 1) % 500 == 0 {
            monitor.log(&format!("step {}: rating MSE {:.4}", step + 1, track.recent()));
        }
        monitor.step(step + 1, schedule.steps)?;
    }
    Ok((vs, head, track.summary(schedule.steps, 0)))
}

/// Writes the head as LAION's file layout (`layers.{i}.{weight,bias}`).
pub fn save(vs: &VarStore, path: &Path, precision: Precision) -> Result<(), TrainError> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(path, &named, precision)
}

/// Seed of the test-prompt renders the aesthetic gate scores (and `examples/embedding_probe.rs`
/// reads, so that its held-out r is the gate's).
pub const GATE_RENDER_SEED: u64 = 1002;

/// Pearson r of the reward's scores and the procedural rating over `per_prompt` renders of each
/// prompt.
pub fn rating_correlation(reward: &AestheticReward, prompts: &[String], per_prompt: usize, seed: u64, device: Device) -> Result<f64, TrainError> {
    let batch = prompt_scenes(prompts, per_prompt, seed, device)?;
    let mut scores = Vec::new();
    for (i, n) in chunks(batch.captions.len(), 256).enumerate() {
        let images = batch.images.narrow(0, (i * 256) as i64, n as i64);
        let s = tch::no_grad(|| reward.score(&images)).map_err(TrainError::other)?;
        scores.extend(Vec::<f64>::try_from(s.to_kind(Kind::Double)).map_err(TrainError::other)?);
    }
    let ratings: Vec<f64> = batch.scenes.iter().map(|s| f64::from(aesthetic_rating(s))).collect();
    Ok(pearson(&scores, &ratings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::monitor::Quiet;

    #[test]
    fn fits_a_linear_rating_and_is_seeded() {
        // Ratings that are a linear function of the embedding: the head must learn them.
        let x = crate::method::noise::gaussian(1, 0, &[512, 8], Device::Cpu);
        let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.0, 0.0, 1.5, 0.0, 0.3]);
        let y = x.matmul(&w) + 5.0;
        let schedule = Schedule { steps: 300, batch: 64, lr: 1e-2, warmup: 10, weight_decay: 0.0, seed: 3, checkpoint_every: 0 };
        let (vs, head, summary) = train(&x, &y, &[8, 16, 4, 1], &schedule, &mut Quiet::default()).unwrap();
        assert!(summary.last_loss < 0.01 * summary.first_loss, "{summary:?}");
        let (vs2, _, _) = train(&x, &y, &[8, 16, 4, 1], &schedule, &mut Quiet::default()).unwrap();
        for (name, t) in vs.variables() {
            assert!(t.equal(&vs2.variables()[&name]), "{name}");
        }
        let dir = tempfile::tempdir().unwrap();
        save(&vs, &dir.path().join("head.safetensors"), Precision::F32).unwrap();
        let names: Vec<String> = crate::tiny::train::io::read_safetensors(&dir.path().join("head.safetensors")).unwrap().into_keys().collect();
        assert_eq!(names, ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight", "layers.3.bias", "layers.3.weight"]);
        let pred = head.forward(&x).unwrap().squeeze_dim(-1);
        let r = crate::tiny::train::gates::pearson(&Vec::<f64>::try_from(pred.to_kind(Kind::Double)).unwrap(), &Vec::<f64>::try_from(y.to_kind(Kind::Double)).unwrap());
        assert!(r > 0.99, "{r}");
    }
}

//! The preference model: a copy of the small CLIP fine-tuned on labelled preference pairs as
//! HPSv2 was (for a caption and two images, cross-entropy of the logit-scaled cosines against
//! the human's pick), then scored as the plain cosine of image and text embeddings.
use std::path::Path;

use tch::{Kind, Tensor};

use super::clip::{token_ids, TrainableClip};
use super::{adamw, resume, LossTrack, Schedule, TrainSummary};
use super::data::{pair_images, preference_batch, prompt_preference_pairs, Excluded};
use super::{trainable, TrainError};
use crate::method::monitor::Monitor;
use crate::models::tokenizer::ClipTokenizer;
use crate::tiny::{PreferencePair, Side};

/// Labels `[N]`: 0 when the human picked image A, 1 for B.
pub fn labels(pairs: &[PreferencePair], device: tch::Device) -> Tensor {
    let l: Vec<i64> = pairs.iter().map(|p| i64::from(p.preferred == Side::B)).collect();
    Tensor::from_slice(&l).to_device(device)
}

/// HPSv2's pair loss: `CE(s [cos(t, a), cos(t, b)], label)`.
fn pair_loss(model: &TrainableClip, tokenizer: &ClipTokenizer, pairs: &[PreferencePair]) -> Result<Tensor, TrainError> {
    let device = model.vs.device();
    let captions: Vec<String> = pairs.iter().map(|p| p.caption.clone()).collect();
    let text = model.text_features(&token_ids(tokenizer, &captions, model.context_length(), device)?)?;
    let (a, b) = pair_images(pairs, device)?;
    let n = pairs.len() as i64;
    let images = model.image_features(&Tensor::cat(&[a, b], 0))?;
    let cos_a = (&text * images.narrow(0, 0, n)).sum_dim_intlist(-1, false, Kind::Float);
    let cos_b = (&text * images.narrow(0, n, n)).sum_dim_intlist(-1, false, Kind::Float);
    let logits = Tensor::stack(&[cos_a, cos_b], 1) * model.logit_scale();
    Ok(logits.cross_entropy_for_logits(&labels(pairs, device)))
}

/// Fine-tunes `model` (both towers) on fresh preference pairs of training captions.
pub fn train(model: &TrainableClip, tokenizer: &ClipTokenizer, excluded: &Excluded, schedule: &Schedule, checkpoint: Option<&Path>, monitor: &mut dyn Monitor) -> Result<TrainSummary, TrainError> {
    let params: Vec<Tensor> = trainable(&model.vs).into_iter().map(|(_, t)| t).collect();
    let mut optimizer = adamw(&params, schedule);
    let start = resume(checkpoint, &[(&model.vs, "model.")], &mut optimizer, |_| true, monitor);
    let mut track = LossTrack::new(schedule.steps / 5, 50);
    for step in start..schedule.steps {
        let pairs = preference_batch(schedule.seed, 5, step as u64, schedule.batch, excluded);
        let loss = pair_loss(model, tokenizer, &pairs)?;
        schedule.update(&mut optimizer, &params, &loss, step);
        track.push(loss.double_value(&[]));
        if (step + 1) % 100 == 0 {
            monitor.log(&format!("step {}: preference loss {:.4}", step + 1, track.recent()));
        }
        schedule.checkpoint(checkpoint, step, &model.vs, Vec::new, &optimizer)?;
        monitor.step(step + 1, schedule.steps)?;
    }
    Ok(track.summary(schedule.steps, start))
}

/// The fraction of pairs where the score of the picked image is the higher (a tie counts as
/// a miss).
pub fn pairwise_accuracy(score_a: &[f64], score_b: &[f64], pairs: &[PreferencePair]) -> f64 {
    let hits = pairs
        .iter()
        .zip(score_a.iter().zip(score_b))
        .filter(|(p, (a, b))| match p.preferred {
            Side::A => a > b,
            Side::B => b > a,
        })
        .count();
    hits as f64 / pairs.len().max(1) as f64
}

/// A preference scorer: `score(images, prompts)` gives one score per image.
pub type PairScorer<'a> = dyn Fn(&Tensor, &[String]) -> Result<Tensor, TrainError> + 'a;

/// Pairwise accuracy of a preference scorer on `per_prompt` labelled pairs of each prompt.
pub fn preference_accuracy(score: &PairScorer, prompts: &[String], per_prompt: usize, seed: u64, device: tch::Device) -> Result<f64, TrainError> {
    let pairs = prompt_preference_pairs(prompts, per_prompt, seed)?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(128) {
        let (ia, ib) = pair_images(chunk, device)?;
        let captions: Vec<String> = chunk.iter().map(|p| p.caption.clone()).collect();
        let to_vec = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double)).map_err(TrainError::other);
        a.extend(to_vec(tch::no_grad(|| score(&ia, &captions))?)?);
        b.extend(to_vec(tch::no_grad(|| score(&ib, &captions))?)?);
    }
    Ok(pairwise_accuracy(&a, &b, &pairs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::prompt_split;
    use crate::tiny::train::clip::TinyClipConfig;
    use crate::tiny::train::io::write_json;
    use crate::tiny::train::vocab::{caption_words, Vocabulary};
    use crate::method::monitor::Quiet;

    #[test]
    fn fine_tuning_lowers_the_pair_loss_and_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = Vocabulary::for_words(&caption_words(&[])).unwrap();
        vocab.write_folder(&dir.path().join("tokenizer"), 20).unwrap();
        let cfg = TinyClipConfig { text_width: 32, text_layers: 1, vision_width: 32, vision_layers: 1, embed_dim: 16, patch_size: 8, ..TinyClipConfig::default() };
        write_json(&dir.path().join("config.json"), &cfg.clip_model_json(&vocab)).unwrap();
        let tokenizer = ClipTokenizer::from_hf_folder(&dir.path().join("tokenizer")).unwrap();
        let excluded = Excluded::new(&prompt_split(0).test);
        let schedule = Schedule { steps: 40, batch: 16, lr: 2e-3, warmup: 4, weight_decay: 0.0, seed: 7, checkpoint_every: 0 };
        let run = || {
            let model = TrainableClip::new(&dir.path().join("config.json"), 1, tch::Device::Cpu).unwrap();
            let summary = train(&model, &tokenizer, &excluded, &schedule, None, &mut Quiet::default()).unwrap();
            (model, summary)
        };
        let (a, summary) = run();
        assert!(summary.last_loss < summary.first_loss - 0.05, "{summary:?}");
        let (b, _) = run();
        for (name, t) in a.vs.variables() {
            assert!(t.equal(&b.vs.variables()[&name]), "{name}");
        }
    }

    #[test]
    fn accuracy_counts_ties_as_misses() {
        let excluded = Excluded::default();
        let pairs = preference_batch(0, 0, 0, 2, &excluded);
        let picked = |p: &PreferencePair| if p.preferred == Side::A { (1.0, 0.0) } else { (0.0, 1.0) };
        let (a, b): (Vec<f64>, Vec<f64>) = pairs.iter().map(picked).unzip();
        assert_eq!(pairwise_accuracy(&a, &b, &pairs), 1.0);
        assert_eq!(pairwise_accuracy(&b, &a, &pairs), 0.0);
        assert_eq!(pairwise_accuracy(&[0.5, 0.5], &[0.5, 0.5], &pairs), 0.0);
    }
}

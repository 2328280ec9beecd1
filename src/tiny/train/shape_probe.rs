//! The shape probe: a small convolutional classifier that reads the shape (circle, square,
//! triangle) of the object in an image of a one-object scene. It is a measuring instrument of
//! the tiny world's quality gates, not a model of the study: trained on renders of one-object
//! training captions (every style: weave, grain, specks), checked on renders of the test
//! prompts first, then used to read the base model's samples of the one-object test prompts.
//!
//! Architecture: four 3x3 convolutions with ReLU (32, 32, 64, 64 channels; 2x2 max pooling after
//! the second and the third), a global max pool (the object may be anywhere) and a linear layer
//! to the three shapes. Inputs are images in [0, 1], `[B, 3, 32, 32]`.
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use super::data::{images_tensor, prompt_scenes, Excluded};
use super::gates::{Comparison, Gate, GateReport};
use super::vae::chunks;
use super::{adamw, rng, seeded_init, trainable, LossTrack, Purpose, Schedule, TrainError, TrainSummary};
use crate::method::monitor::Monitor;
use crate::tiny::{random_caption_spec, render, sample_scene_for, CaptionSpec, Layout, Shape};

/// The shape a one-object caption names (`None` for a caption of two objects).
pub fn single_shape(spec: &CaptionSpec) -> Option<Shape> {
    match spec.layout {
        Layout::Single { object, .. } => Some(object.shape),
        Layout::Pair { .. } => None,
    }
}

fn class_of(shape: Shape) -> i64 {
    Shape::ALL.iter().position(|&s| s == shape).unwrap_or(0) as i64
}

/// The trained classifier with its variables.
pub struct ShapeProbe {
    pub vs: VarStore,
    net: nn::Sequential,
}

impl ShapeProbe {
    /// A freshly initialised probe (seeded).
    pub fn new(seed: u64, device: Device) -> Self {
        let vs = VarStore::new(device);
        let root = vs.root();
        let conv = |name: &str, i: i64, o: i64| nn::conv2d(&root / name, i, o, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        let net = nn::seq()
            .add_fn(|x| (x - 0.5) * 4.0)
            .add(conv("conv1", 3, 32))
            .add_fn(|x| x.relu())
            .add(conv("conv2", 32, 32))
            .add_fn(|x| x.relu().max_pool2d_default(2))
            .add(conv("conv3", 32, 64))
            .add_fn(|x| x.relu().max_pool2d_default(2))
            .add(conv("conv4", 64, 64))
            .add_fn(|x| x.relu().amax([2i64, 3].as_slice(), false))
            .add(nn::linear(&root / "head", 64, Shape::ALL.len() as i64, Default::default()));
        seeded_init(&vs, seed);
        ShapeProbe { vs, net }
    }

    /// Logits `[B, 3]` (in the order of [`Shape::ALL`]) of images `[B, 3, H, W]` in [0, 1].
    pub fn logits(&self, images: &Tensor) -> Tensor {
        self.net.forward(&images.to_kind(Kind::Float))
    }

    /// The shape read in each image, in chunks, without graph.
    pub fn read(&self, images: &Tensor) -> Vec<Shape> {
        let n = images.size()[0] as usize;
        let mut out = Vec::with_capacity(n);
        for (i, size) in chunks(n, 256).enumerate() {
            let chunk = images.narrow(0, (i * 256) as i64, size as i64).to_device(self.vs.device());
            let classes = tch::no_grad(|| self.logits(&chunk).argmax(-1, false));
            let classes: Vec<i64> = Vec::try_from(classes.to_device(Device::Cpu)).unwrap_or_default();
            out.extend(classes.into_iter().map(|c| Shape::ALL[c.clamp(0, 2) as usize]));
        }
        out
    }

    /// The fraction of images whose shape is read as `expected` (one expected shape per image).
    pub fn agreement(&self, images: &Tensor, expected: &[Shape]) -> f64 {
        let read = self.read(images);
        let hits = read.iter().zip(expected).filter(|(a, b)| a == b).count();
        hits as f64 / expected.len().max(1) as f64
    }
}

/// Renders `[B, 3, 32, 32]` of `size` random one-object training captions and their shapes
/// (batch `step` of `seed`, stream `stream`).
pub fn single_object_batch(seed: u64, stream: u64, step: u64, size: usize, excluded: &Excluded, device: Device) -> Result<(Tensor, Vec<Shape>), TrainError> {
    let mut r = rng(seed ^ stream.rotate_left(32), Purpose::Batch, step);
    let mut images = Vec::with_capacity(size);
    let mut shapes = Vec::with_capacity(size);
    while images.len() < size {
        let spec = random_caption_spec(&mut r);
        let Some(shape) = single_shape(&spec) else { continue };
        if excluded.contains(&spec.to_string()) {
            continue;
        }
        images.push(render(&sample_scene_for(&spec, &mut r)));
        shapes.push(shape);
    }
    Ok((images_tensor(&images, device)?, shapes))
}

/// Gaussian blur of images `[B, C, H, W]` with standard deviation `sigma` pixels (5x5 kernel,
/// edges replicated); `sigma <= 0` returns the images unchanged.
pub fn blur(images: &Tensor, sigma: f64) -> Tensor {
    if sigma <= 0.0 {
        return images.shallow_clone();
    }
    let taps: Vec<f32> = (-2..=2).map(|i: i32| (-(f64::from(i * i)) / (2.0 * sigma * sigma)).exp() as f32).collect();
    let sum: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / sum).collect();
    let c = images.size()[1];
    let k = Tensor::from_slice(&taps).to_device(images.device());
    let kernel = (k.view([5, 1]) * k.view([1, 5])).view([1, 1, 5, 5]).repeat([c, 1, 1, 1]);
    images.replication_pad2d([2, 2, 2, 2]).conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
}

/// Blur levels of the training images (pixels): samples of a diffusion model are smoother than
/// renders, and the probe must read shapes, not the crispness of their edges.
const TRAIN_BLURS: [f64; 4] = [0.0, 0.5, 0.8, 1.1];

/// Trains a probe by cross-entropy on fresh renders each step, a quarter of them at each of
/// [`TRAIN_BLURS`]. Short (about a minute on one
/// core at the defaults of `tiny_export`): no checkpoints.
pub fn train(schedule: &Schedule, excluded: &Excluded, device: Device, monitor: &mut dyn Monitor) -> Result<(ShapeProbe, TrainSummary), TrainError> {
    let probe = ShapeProbe::new(schedule.seed, device);
    let params: Vec<Tensor> = trainable(&probe.vs).into_iter().map(|(_, t)| t).collect();
    let mut optimizer = adamw(&params, schedule);
    let mut track = LossTrack::new(schedule.steps / 5, 50);
    for step in 0..schedule.steps {
        let (images, shapes) = single_object_batch(schedule.seed, 8, step as u64, schedule.batch, excluded, device)?;
        let quarter = (schedule.batch / TRAIN_BLURS.len()) as i64;
        let images = Tensor::cat(
            &TRAIN_BLURS
                .iter()
                .enumerate()
                .map(|(i, &sigma)| {
                    let from = i as i64 * quarter;
                    let len = if i + 1 == TRAIN_BLURS.len() { images.size()[0] - from } else { quarter };
                    blur(&images.narrow(0, from, len), sigma)
                })
                .collect::<Vec<_>>(),
            0,
        );
        let targets = Tensor::from_slice(&shapes.iter().map(|&s| class_of(s)).collect::<Vec<i64>>()).to_device(device);
        let loss = probe.logits(&images).cross_entropy_for_logits(&targets);
        schedule.update(&mut optimizer, &params, &loss, step);
        track.push(loss.double_value(&[]));
        if (step + 1) % 100 == 0 {
            monitor.log(&format!("shape probe step {}: loss {:.4}", step + 1, track.recent()));
        }
        monitor.step(step + 1, schedule.steps)?;
    }
    Ok((probe, track.summary(schedule.steps, 0)))
}

/// The one-object prompts among `prompts` with their shapes (prompts that do not parse are
/// skipped: the caller's prompts come from the world's own split).
pub fn single_object_prompts(prompts: &[String]) -> Vec<(String, Shape)> {
    prompts.iter().filter_map(|p| p.parse::<CaptionSpec>().ok().and_then(|s| single_shape(&s)).map(|s| (p.clone(), s))).collect()
}

/// Least agreement of the probe with the captions on renders of the one-object test prompts
/// (the instrument's own gate: a probe that cannot read renders cannot judge samples).
pub const RENDER_THRESHOLD: f64 = 0.95;
/// Least agreement on the base model's samples of the one-object test prompts.
pub const SAMPLE_THRESHOLD: f64 = 0.8;

/// The shape gates: the probe's agreement with the captions of the one-object prompts among
/// `test` on their renders (`per_prompt` each, seeded by `seed`) and on `samples` (all of
/// `test`, prompt-major, `per_prompt` each, as the sample gates draw them); the agreement on
/// the renders' `reconstruct`ions (the VAE's share of the loss) and the samples' confusion
/// counts are recorded as measurements.
pub fn shape_gates(report: &mut GateReport, probe: &ShapeProbe, test: &[String], samples: &Tensor, per_prompt: usize, seed: u64, reconstruct: &dyn Fn(&Tensor) -> Tensor) -> Result<(), TrainError> {
    let singles: Vec<(usize, Shape)> = test.iter().enumerate().filter_map(|(i, p)| p.parse::<CaptionSpec>().ok().and_then(|s| single_shape(&s)).map(|s| (i, s))).collect();
    if singles.is_empty() || samples.size()[0] != (test.len() * per_prompt) as i64 {
        return Err(TrainError::Config(format!("{} one-object prompts, {} samples for {} prompts x {per_prompt}", singles.len(), samples.size()[0], test.len())));
    }
    let device = samples.device();
    let prompts: Vec<String> = singles.iter().map(|&(i, _)| test[i].clone()).collect();
    let expected: Vec<Shape> = singles.iter().flat_map(|&(_, s)| std::iter::repeat_n(s, per_prompt)).collect();
    let renders = prompt_scenes(&prompts, per_prompt, seed, device)?;
    let index: Vec<i64> = singles.iter().flat_map(|&(i, _)| (0..per_prompt).map(move |k| (i * per_prompt + k) as i64)).collect();
    let own = samples.index_select(0, &Tensor::from_slice(&index).to_device(device));
    let how = format!("{} one-object test prompts x {per_prompt}", singles.len());
    report.push(Gate::new("shape_probe.renders", probe.agreement(&renders.images, &expected), Comparison::AtLeast, RENDER_THRESHOLD, format!("shape probe agreement with the caption on renders, {how}")));
    report.push(Gate::new("samples.shape_agreement", probe.agreement(&own, &expected), Comparison::AtLeast, SAMPLE_THRESHOLD, format!("shape probe agreement with the caption on base-model samples, {how} (chance 1/3)")));
    report.measure("vae.shape_agreement", probe.agreement(&reconstruct(&renders.images), &expected));
    let read = probe.read(&own);
    let mut confusion = serde_json::Map::new();
    for truth in Shape::ALL {
        let row: serde_json::Map<String, serde_json::Value> = Shape::ALL
            .iter()
            .map(|&r| (r.name().to_string(), read.iter().zip(&expected).filter(|&(a, e)| *e == truth && *a == r).count().into()))
            .collect();
        confusion.insert(truth.name().to_string(), row.into());
    }
    report.measure("samples.shape_confusion", confusion);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::prompt_split;
    use crate::tiny::train::data::prompt_scenes;
    use crate::method::monitor::Quiet;

    #[test]
    fn single_object_prompts_are_read_from_the_captions() {
        let prompts = vec![
            "a small red circle at the bottom on a white background".to_string(),
            "a red circle to the left of a large purple triangle on a grey background".to_string(),
            "a purple square on the left on a red background".to_string(),
        ];
        let singles = single_object_prompts(&prompts);
        assert_eq!(singles, vec![(prompts[0].clone(), Shape::Circle), (prompts[2].clone(), Shape::Square)]);
    }

    #[test]
    fn a_short_training_reads_held_out_renders_and_is_seeded() {
        let split = prompt_split(0);
        let excluded = Excluded::new(&split.test);
        let schedule = Schedule { steps: 300, batch: 64, lr: 3e-3, warmup: 10, weight_decay: 0.0, seed: 2, checkpoint_every: 0 };
        let (probe, summary) = train(&schedule, &excluded, Device::Cpu, &mut Quiet::default()).unwrap();
        assert!(summary.last_loss < 0.5 * summary.first_loss, "{summary:?}");
        // Held-out renders: the one-object test prompts, 4 renders each.
        let singles = single_object_prompts(&split.test);
        assert!(singles.len() >= 10, "{}", singles.len());
        let prompts: Vec<String> = singles.iter().map(|(p, _)| p.clone()).collect();
        let expected: Vec<Shape> = singles.iter().flat_map(|&(_, s)| std::iter::repeat_n(s, 4)).collect();
        let renders = prompt_scenes(&prompts, 4, 7, Device::Cpu).unwrap();
        let agreement = probe.agreement(&renders.images, &expected);
        assert!(agreement >= 0.9, "agreement on held-out renders {agreement}");
        // Uniform grey images carry no shape: the probe reads one class for all, so a third
        // of a balanced set at most.
        let grey = Tensor::full([30, 3, 32, 32], 0.5, (Kind::Float, Device::Cpu));
        let balanced: Vec<Shape> = (0..30).map(|i| Shape::ALL[i % 3]).collect();
        assert!((probe.agreement(&grey, &balanced) - 1.0 / 3.0).abs() < 1e-9);
        // A function of the seed: two short runs of one seed agree, another seed differs.
        let short = |seed| train(&Schedule { steps: 5, seed, ..schedule }, &excluded, Device::Cpu, &mut Quiet::default()).unwrap().0;
        let (a, b, c) = (short(4), short(4), short(5));
        for (name, t) in a.vs.variables() {
            assert!(t.equal(&b.vs.variables()[&name]), "{name}");
        }
        assert!(!a.vs.variables()["head.weight"].equal(&c.vs.variables()["head.weight"]));
    }
}

//! Seeded training and evaluation data: captioned renders, ratings and preference pairs.
//!
//! Training captions are random drawable captions ([`random_caption_spec`]) other than the
//! test captions; the held-out shape-colour pairs may appear (the paper's setting: the base
//! model knows every concept, only the reward fine-tuning never sees the test prompts).
//! Batch `k` of a seed is a function of `(seed, k)` alone.
//!
//! # Alt-texts
//!
//! Web CLIP learned what pictures look like from alt-texts that say so ("vivid", "grainy",
//! "cluttered"), which is why an aesthetic head on its embedding works. The tiny CLIP's
//! pretraining texts are alt-texts too: the caption followed by [`look_words`], one word per
//! visible quality of the render, binned:
//! - saturation: `pale` (< 0.67), `rich` (< 0.85), `vivid`;
//! - luminance contrast of objects and background (the rating's K): `dim` (< 0.3), `striking`
//!   (> 0.7), else nothing;
//! - shading: `flat` (< 0.33), `soft` (< 0.67), `glossy`;
//! - background weave: `plain` (none), `textured` (< 0.6), `woven`;
//! - grain: `clean` (none), `gritty` (< 0.03), `grainy`;
//! - specks: `tidy` (none), `dotted` (1-3), `cluttered` (4-8);
//! - colour harmony (the rating's H): `clashing` (< 0.35), `harmonious` (> 0.65), else nothing;
//! - composition (the rating's C): `awkward` (< 0.35), `balanced` (> 0.65), else nothing.
//!
//! The study's prompts stay plain captions.
use std::collections::HashSet;

use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::{rng, Purpose, TrainError};
use crate::tiny::rating::aesthetic_factors;
use crate::tiny::{preference_pair, random_caption_spec, render, sample_scene_for, to_chw_batch, CaptionSpec, PreferencePair, RgbImage, Scene};

/// The qualities [`look_bins`] grades, each with the word of each of its three grades (an
/// empty word: the alt-text says nothing of that grade).
pub const LOOK_QUALITIES: [(&str, [&str; 3]); 8] = [
    ("saturation", ["pale", "rich", "vivid"]),
    ("contrast", ["dim", "", "striking"]),
    ("shading", ["flat", "soft", "glossy"]),
    ("weave", ["plain", "textured", "woven"]),
    ("grain", ["clean", "gritty", "grainy"]),
    ("specks", ["tidy", "dotted", "cluttered"]),
    ("harmony", ["clashing", "", "harmonious"]),
    ("composition", ["awkward", "", "balanced"]),
];

/// Every word [`look_words`] can give (for the vocabulary).
pub const LOOK_WORDS: [&str; 21] = [
    "pale", "rich", "vivid", "dim", "striking", "flat", "soft", "glossy", "plain", "textured", "woven", "clean", "gritty", "grainy", "tidy", "dotted",
    "cluttered", "clashing", "harmonious", "awkward", "balanced",
];

/// The grade (0, 1, 2) of each of [`LOOK_QUALITIES`] of a render (see the module docs).
pub fn look_bins(scene: &Scene) -> [usize; 8] {
    let style = &scene.style;
    let factors = aesthetic_factors(scene);
    let bin = |v: f32, cuts: [f32; 2]| cuts.iter().filter(|&&c| v >= c).count();
    let graded = |v: f32, cut: f32| if v <= 0.0 { 0 } else { 1 + usize::from(v >= cut) };
    [
        bin(style.saturation, [0.67, 0.85]),
        bin(factors.contrast, [0.3, 0.7]),
        bin(style.shading, [0.33, 0.67]),
        graded(style.texture, 0.6),
        graded(style.noise, 0.03),
        bin(scene.specks.len() as f32, [1.0, 4.0]),
        bin(factors.harmony, [0.35, 0.65]),
        bin(factors.composition, [0.35, 0.65]),
    ]
}

/// How many factors the aesthetic rating has ([`factor_values`]).
pub const FACTORS: usize = 8;

/// The eight factors of a render's aesthetic rating, each in [0, 1] (see `tiny::rating`):
/// harmony, composition, contrast, texture, shading, saturation, clutter, grain.
pub fn factor_values(scene: &Scene) -> [f32; FACTORS] {
    let f = aesthetic_factors(scene);
    [f.harmony, f.composition, f.contrast, f.texture, f.shading, f.saturation, f.clutter, f.noise]
}

/// The words of a render's alt-text after its caption (see the module docs), in a fixed order.
pub fn look_words(scene: &Scene) -> Vec<&'static str> {
    look_bins(scene).iter().zip(LOOK_QUALITIES).map(|(&b, (_, words))| words[b]).filter(|w| !w.is_empty()).collect()
}

/// The alt-text of a render: its caption and its [`look_words`].
pub fn alt_text(caption: &str, scene: &Scene) -> String {
    let mut text = caption.to_string();
    for word in look_words(scene) {
        text.push(' ');
        text.push_str(word);
    }
    text
}

/// Captions that training must never draw (the test prompts).
#[derive(Debug, Clone, Default)]
pub struct Excluded(HashSet<String>);

impl Excluded {
    pub fn new(prompts: &[String]) -> Self {
        Excluded(prompts.iter().cloned().collect())
    }

    pub fn contains(&self, caption: &str) -> bool {
        self.0.contains(caption)
    }
}

/// A random drawable caption that is not excluded.
pub fn training_spec(rng: &mut ChaCha8Rng, excluded: &Excluded) -> CaptionSpec {
    loop {
        let spec = random_caption_spec(rng);
        if !excluded.contains(&spec.to_string()) {
            return spec;
        }
    }
}

/// Images `[B, 3, 32, 32]` in [0, 1] (f32) of 8-bit renders.
pub fn images_tensor(images: &[RgbImage], device: Device) -> Result<Tensor, TrainError> {
    let batch = to_chw_batch(images)?;
    let shape: Vec<i64> = batch.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&batch.data).view(shape.as_slice()).to_device(device))
}

/// 8-bit images of a `[B, 3, H, W]` tensor in [0, 1] (rounded, clamped).
pub fn tensor_images(images: &Tensor) -> Result<Vec<RgbImage>, TrainError> {
    let size = images.size();
    let [b, 3, h, w] = size[..] else {
        return Err(TrainError::Model(format!("images of shape {size:?}, expected [B, 3, H, W]")));
    };
    let bytes = (images.detach().to_device(Device::Cpu).to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let flat: Vec<u8> = Vec::try_from(bytes.view([-1])).map_err(TrainError::other)?;
    let per = (h * w * 3) as usize;
    Ok(flat.chunks(per).take(b as usize).map(|data| RgbImage { width: w as usize, height: h as usize, data: data.to_vec() }).collect())
}

/// Captioned scenes with their renders.
pub struct SceneBatch {
    pub specs: Vec<CaptionSpec>,
    pub captions: Vec<String>,
    pub scenes: Vec<Scene>,
    /// `[B, 3, 32, 32]` in [0, 1].
    pub images: Tensor,
}

impl SceneBatch {
    fn of(specs: Vec<CaptionSpec>, scenes: Vec<Scene>, device: Device) -> Result<Self, TrainError> {
        let renders: Vec<RgbImage> = scenes.iter().map(render).collect();
        Ok(SceneBatch {
            captions: specs.iter().map(ToString::to_string).collect(),
            specs,
            images: images_tensor(&renders, device)?,
            scenes,
        })
    }
}

/// Training batch `step` of `seed` (of purpose [`Purpose::Batch`] under `stream`, so that
/// different models draw different scenes from one seed).
pub fn scene_batch(seed: u64, stream: u64, step: u64, size: usize, excluded: &Excluded, device: Device) -> Result<SceneBatch, TrainError> {
    let mut r = rng(seed ^ stream.rotate_left(32), Purpose::Batch, step);
    let specs: Vec<CaptionSpec> = (0..size).map(|_| training_spec(&mut r, excluded)).collect();
    let scenes = specs.iter().map(|s| sample_scene_for(s, &mut r)).collect();
    SceneBatch::of(specs, scenes, device)
}

/// `per_prompt` renders of each prompt (prompt-major order), seeded by `seed` (evaluation).
pub fn prompt_scenes(prompts: &[String], per_prompt: usize, seed: u64, device: Device) -> Result<SceneBatch, TrainError> {
    let mut specs = Vec::with_capacity(prompts.len() * per_prompt);
    let mut scenes = Vec::with_capacity(prompts.len() * per_prompt);
    for (i, prompt) in prompts.iter().enumerate() {
        let spec: CaptionSpec = prompt.parse()?;
        let mut r = rng(seed, Purpose::Eval, i as u64);
        for _ in 0..per_prompt {
            scenes.push(sample_scene_for(&spec, &mut r));
            specs.push(spec);
        }
    }
    SceneBatch::of(specs, scenes, device)
}

/// Preference pairs for training batch `step` (or evaluation, with another stream).
pub fn preference_batch(seed: u64, stream: u64, step: u64, size: usize, excluded: &Excluded) -> Vec<PreferencePair> {
    let mut r = rng(seed ^ stream.rotate_left(32), Purpose::Batch, step);
    (0..size)
        .map(|_| {
            let spec = training_spec(&mut r, excluded);
            preference_pair(&spec, &mut r)
        })
        .collect()
}

/// Preference pairs for the given prompts (`per_prompt` each), seeded (evaluation).
pub fn prompt_preference_pairs(prompts: &[String], per_prompt: usize, seed: u64) -> Result<Vec<PreferencePair>, TrainError> {
    let mut pairs = Vec::with_capacity(prompts.len() * per_prompt);
    for (i, prompt) in prompts.iter().enumerate() {
        let spec: CaptionSpec = prompt.parse()?;
        let mut r = rng(seed, Purpose::Eval, i as u64);
        pairs.extend((0..per_prompt).map(|_| preference_pair(&spec, &mut r)));
    }
    Ok(pairs)
}

/// Renders of the two sides of preference pairs: `(a, b)`, each `[N, 3, 32, 32]`.
pub fn pair_images(pairs: &[PreferencePair], device: Device) -> Result<(Tensor, Tensor), TrainError> {
    let a: Vec<RgbImage> = pairs.iter().map(|p| render(&p.a)).collect();
    let b: Vec<RgbImage> = pairs.iter().map(|p| render(&p.b)).collect();
    Ok((images_tensor(&a, device)?, images_tensor(&b, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::prompt_split;

    #[test]
    fn batches_are_seeded_and_never_draw_test_captions() {
        let split = prompt_split(0);
        let excluded = Excluded::new(&split.test);
        let a = scene_batch(3, 1, 7, 64, &excluded, Device::Cpu).unwrap();
        let b = scene_batch(3, 1, 7, 64, &excluded, Device::Cpu).unwrap();
        assert_eq!(a.captions, b.captions);
        assert!(a.images.equal(&b.images));
        assert_eq!(a.images.size(), vec![64, 3, 32, 32]);
        assert_ne!(a.captions, scene_batch(3, 2, 7, 64, &excluded, Device::Cpu).unwrap().captions);
        assert_ne!(a.captions, scene_batch(3, 1, 8, 64, &excluded, Device::Cpu).unwrap().captions);
        // A rigged exclusion set: every caption of the unrestricted batch is refused.
        let all = Excluded::new(&a.captions);
        let c = scene_batch(3, 1, 7, 64, &all, Device::Cpu).unwrap();
        assert!(c.captions.iter().all(|x| !a.captions.contains(x)));
    }

    #[test]
    fn alt_texts_describe_the_look() {
        let excluded = Excluded::default();
        let batch = scene_batch(1, 1, 0, 400, &excluded, Device::Cpu).unwrap();
        let mut seen = HashSet::new();
        for (caption, scene) in batch.captions.iter().zip(&batch.scenes) {
            let words = look_words(scene);
            assert!(words.len() >= 5 && words.iter().all(|w| LOOK_WORDS.contains(w)), "{words:?}");
            let text = alt_text(caption, scene);
            assert!(text.starts_with(caption.as_str()) && text.split(' ').count() == caption.split(' ').count() + words.len());
            seen.extend(words);
        }
        // Every word occurs in a few hundred renders.
        assert_eq!(seen.len(), LOOK_WORDS.len(), "{seen:?}");
        let listed: HashSet<&str> = LOOK_QUALITIES.iter().flat_map(|(_, w)| w.iter().copied()).filter(|w| !w.is_empty()).collect();
        assert_eq!(listed, LOOK_WORDS.iter().copied().collect());
    }

    #[test]
    fn images_round_trip_through_tensors() {
        let split = prompt_split(0);
        let batch = prompt_scenes(&split.test[..3], 2, 0, Device::Cpu).unwrap();
        assert_eq!(batch.captions[0], split.test[0]);
        assert_eq!(batch.captions[2], split.test[1]);
        let images = tensor_images(&batch.images).unwrap();
        assert_eq!(images[0], render(&batch.scenes[0]));
        assert_eq!(images.len(), 6);
    }
}

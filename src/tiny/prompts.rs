//! The tiny world's prompt split, shaped like the paper's: 750 training and 50 test captions,
//! the test ones built around shape-colour pairs that no training caption contains.
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::caption::{CaptionSpec, Colour, Layout, Shape};
use super::scene::random_caption_spec;
use super::TinyError;

pub const TRAIN_PROMPTS: usize = 750;
pub const TEST_PROMPTS: usize = 50;
/// Shape-colour pairs held out of training (4 of the 24).
pub const HELD_OUT_PAIRS: usize = 4;

/// Deterministic train/test captions and the shape-colour pairs that separate them.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSplit {
    pub seed: u64,
    /// Pairs that occur in every test caption and in no training caption.
    pub held_out: Vec<(Shape, Colour)>,
    pub train: Vec<String>,
    pub test: Vec<String>,
}

/// Whether captions for pretraining may show the held-out pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOutPairs {
    /// The paper's setting: the base model knows every concept and only the reward fine-tuning
    /// never sees the test combinations.
    Include,
    /// A stricter compositional test: the base model never sees the held-out pairs either.
    Exclude,
}

/// Builds the split for a seed:
/// - held-out pairs: 4 distinct colours (a seeded shuffle), given shapes in a shuffled cycle
///   (so one shape loses two colours and the others one each; every shape and colour still
///   occurs in training);
/// - test: 50 distinct drawable captions from [`random_caption_spec`] with one object (random,
///   for pairs) replaced by the held-out pairs in turn, so each pair is in at least 12;
/// - train: the first 750 distinct drawable captions from [`random_caption_spec`] that contain
///   no held-out pair.
pub fn prompt_split(seed: u64) -> PromptSplit {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut colours = Colour::ALL;
    colours.shuffle(&mut rng);
    let mut shapes = Shape::ALL;
    shapes.shuffle(&mut rng);
    let held_out: Vec<(Shape, Colour)> = (0..HELD_OUT_PAIRS)
        .map(|k| (shapes[k % shapes.len()], colours[k]))
        .collect();
    let mut split = PromptSplit {
        seed,
        held_out,
        train: Vec::with_capacity(TRAIN_PROMPTS),
        test: Vec::with_capacity(TEST_PROMPTS),
    };

    let mut seen = HashSet::new();
    while split.test.len() < TEST_PROMPTS {
        let mut spec = random_caption_spec(&mut rng);
        let (shape, colour) = split.held_out[split.test.len() % HELD_OUT_PAIRS];
        let target = match &mut spec.layout {
            Layout::Single { object, .. } => object,
            Layout::Pair { first, second, .. } => {
                if rng.random_bool(0.5) {
                    first
                } else {
                    second
                }
            }
        };
        target.shape = shape;
        target.colour = colour;
        let caption = spec.to_string();
        if spec.is_drawable() && seen.insert(caption.clone()) {
            split.test.push(caption);
        }
    }
    while split.train.len() < TRAIN_PROMPTS {
        let spec = random_caption_spec(&mut rng);
        let caption = spec.to_string();
        if !split.holds_out(&spec) && seen.insert(caption.clone()) {
            split.train.push(caption);
        }
    }
    split
}

impl PromptSplit {
    /// Whether a caption names any held-out shape-colour pair.
    pub fn holds_out(&self, spec: &CaptionSpec) -> bool {
        spec.objects()
            .iter()
            .any(|o| self.held_out.contains(&(o.shape, o.colour)))
    }

    /// `count` random captions (repeats possible) for pretraining the tiny models, never one of
    /// the test captions, and without the held-out pairs if `held_out` says so.
    pub fn pretraining_captions(
        &self,
        count: usize,
        held_out: HeldOutPairs,
        seed: u64,
    ) -> Vec<String> {
        let test: HashSet<&str> = self.test.iter().map(String::as_str).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut captions = Vec::with_capacity(count);
        while captions.len() < count {
            let spec = random_caption_spec(&mut rng);
            if held_out == HeldOutPairs::Exclude && self.holds_out(&spec) {
                continue;
            }
            let caption = spec.to_string();
            if !test.contains(caption.as_str()) {
                captions.push(caption);
            }
        }
        captions
    }
}

/// Writes prompts one per line, each ending in a newline (the `hpd_photo/*.txt` format).
pub fn write_prompts(path: &Path, prompts: &[String]) -> Result<(), TinyError> {
    if let Some(bad) = prompts
        .iter()
        .find(|p| p.trim().is_empty() || p.contains('\n'))
    {
        return Err(TinyError::Prompt(format!(
            "a prompt must be one non-empty line, got {bad:?}"
        )));
    }
    let mut file = BufWriter::new(File::create(path)?);
    for prompt in prompts {
        writeln!(file, "{prompt}")?;
    }
    file.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_sized() {
        let split = prompt_split(0);
        assert_eq!(split, prompt_split(0));
        assert_ne!(split.train, prompt_split(1).train);
        assert_eq!(split.train.len(), TRAIN_PROMPTS);
        assert_eq!(split.test.len(), TEST_PROMPTS);
        let all: HashSet<&String> = split.train.iter().chain(&split.test).collect();
        assert_eq!(all.len(), TRAIN_PROMPTS + TEST_PROMPTS, "duplicates");
    }

    #[test]
    fn test_combinations_never_occur_in_training() {
        for seed in 0..5 {
            let split = prompt_split(seed);
            let colours: HashSet<Colour> = split.held_out.iter().map(|p| p.1).collect();
            assert_eq!(colours.len(), HELD_OUT_PAIRS);
            let pairs_in = |captions: &[String]| -> HashSet<(Shape, Colour)> {
                captions
                    .iter()
                    .flat_map(|c| c.parse::<CaptionSpec>().unwrap().objects())
                    .map(|o| (o.shape, o.colour))
                    .collect()
            };
            let train_pairs = pairs_in(&split.train);
            for pair in &split.held_out {
                assert!(!train_pairs.contains(pair), "{pair:?} in training");
            }
            // Everything else, every shape and every colour is still trained.
            assert_eq!(train_pairs.len(), 24 - HELD_OUT_PAIRS);
            for caption in &split.test {
                let spec: CaptionSpec = caption.parse().unwrap();
                assert!(split.holds_out(&spec) && spec.is_drawable(), "{caption}");
            }
            for pair in &split.held_out {
                let count = split
                    .test
                    .iter()
                    .filter(|c| {
                        c.parse::<CaptionSpec>()
                            .unwrap()
                            .objects()
                            .iter()
                            .any(|o| (o.shape, o.colour) == *pair)
                    })
                    .count();
                assert!(
                    count >= TEST_PROMPTS / HELD_OUT_PAIRS,
                    "{pair:?} in {count}"
                );
            }
        }
    }

    #[test]
    fn pretraining_pool_respects_the_split() {
        let split = prompt_split(3);
        let strict = split.pretraining_captions(3000, HeldOutPairs::Exclude, 9);
        let open = split.pretraining_captions(3000, HeldOutPairs::Include, 9);
        assert_eq!(strict.len(), 3000);
        assert_eq!(
            strict,
            split.pretraining_captions(3000, HeldOutPairs::Exclude, 9)
        );
        let test: HashSet<&String> = split.test.iter().collect();
        assert!(strict.iter().chain(&open).all(|c| !test.contains(c)));
        let holding = |pool: &[String]| {
            pool.iter()
                .filter(|c| split.holds_out(&c.parse().unwrap()))
                .count()
        };
        assert_eq!(holding(&strict), 0);
        assert!(
            holding(&open) > 300,
            "held-out pairs should be common when included"
        );
    }

    #[test]
    fn prompt_files_are_one_caption_per_line() {
        let split = prompt_split(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.txt");
        write_prompts(&path, &split.train).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), TRAIN_PROMPTS);
        assert!(lines.iter().all(|l| !l.trim().is_empty()));
        assert_eq!(
            lines,
            split.train.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert!(write_prompts(&path, &["ok".to_string(), String::new()]).is_err());
        assert!(write_prompts(&path, &["two\nlines".to_string()]).is_err());
    }
}

//! PickScore (Kirstain et al. 2023): a transformers `CLIPModel` (ViT-H/14 for PickScore_v1)
//! fine-tuned on Pick-a-Pic preferences. The score of image `x` for prompt `p` is
//! `logit_scale.exp() * cos(E_img(x), E_txt(p))`, the image preprocessed as the processor
//! config that ships with the model says (resize, center crop, normalisation), here on tensors
//! so the score stays differentiable in the images.
//!
//! The folder holds the model as `CLIPModel.save_pretrained` writes it (`config.json`, the
//! weights: `model.safetensors`, `pytorch_model.bin` or a sharded index) and the processor's
//! files as the hub repositories ship them: `preprocessor_config.json` (or the
//! `processor_config.json` of transformers 5's `CLIPProcessor.save_pretrained`) and the
//! tokenizer's `vocab.json` and `merges.txt` (`tokenizer.json` alone is not read).
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::models::image_processor::ImageProcessor;

use super::clip_loader::{ClipFiles, ClipLayout, ClipLoadError, FrozenClip};
use super::{check_images, check_prompts, Reward, RewardError};

/// The processor config's file name in a PickScore folder.
pub const PROCESSOR_CONFIG: &str = "preprocessor_config.json";
/// Where transformers 5's `CLIPProcessor.save_pretrained` puts it instead (nested).
pub const PROCESSOR_CONFIG_V5: &str = "processor_config.json";

pub struct PickScoreReward {
    clip: FrozenClip,
    processor: ImageProcessor,
    /// `logit_scale.exp()`, read from the checkpoint.
    scale: f64,
}

fn fail(path: &Path, reason: impl ToString) -> ClipLoadError {
    ClipLoadError::Load { path: path.to_path_buf(), reason: reason.to_string() }
}

impl PickScoreReward {
    /// The CLIP files of a PickScore folder (transformers layout, tokenizer in the folder).
    pub fn files(folder: &Path) -> ClipFiles {
        ClipFiles { layout: ClipLayout::Transformers, weights: folder.to_path_buf(), config: None, tokenizer: folder.to_path_buf() }
    }

    /// Loads the folder's model on `device` with its weights in `kind` (fp32, fp16, bf16).
    pub fn load(folder: &Path, device: Device, kind: Kind) -> Result<Self, ClipLoadError> {
        if !folder.is_dir() {
            return Err(fail(folder, "not a folder: PickScore is a transformers CLIPModel folder with its preprocessor_config.json"));
        }
        let processor_path: PathBuf = [PROCESSOR_CONFIG, PROCESSOR_CONFIG_V5]
            .iter()
            .map(|name| folder.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| fail(&folder.join(PROCESSOR_CONFIG), "missing: PickScore's images are preprocessed as its processor config says (PickScore_v1 uses the one of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"))?;
        let processor = ImageProcessor::from_json(&processor_path).map_err(|e| fail(&processor_path, e))?;
        if !folder.join("vocab.json").is_file() && folder.join("tokenizer.json").is_file() {
            return Err(fail(&folder.join("vocab.json"), "missing: the tokenizer is read from vocab.json and merges.txt (as the hub repositories ship them); tokenizer.json alone is not read"));
        }
        let clip = FrozenClip::load(&Self::files(folder), device, kind)?;
        let config = folder.join("config.json");
        let (Some(_), Some(vision)) = (clip.clip.text.as_ref(), clip.clip.vision.as_ref()) else {
            return Err(fail(&config, "not a two-tower CLIPModel (PickScore needs the text and the vision tower)"));
        };
        let image_size = vision.config().image_size;
        match processor.output_size() {
            Some((h, w)) if (h, w) != (image_size, image_size) => {
                return Err(fail(&processor_path, format!("makes {h}x{w} images, the model (config.json) takes {image_size}x{image_size}")));
            }
            _ => {}
        }
        let logit_scale = clip.clip.logit_scale.as_ref().ok_or_else(|| fail(&config, "the checkpoint has no logit_scale"))?;
        let scale = logit_scale.to_kind(Kind::Double).exp().double_value(&[]);
        if !scale.is_finite() {
            return Err(fail(folder, format!("logit_scale.exp() = {scale} is not finite")));
        }
        Ok(PickScoreReward { clip, processor, scale })
    }

    /// `logit_scale.exp()` of the checkpoint.
    pub fn logit_scale(&self) -> f64 {
        self.scale
    }

    /// The image preprocessing read from the folder's processor config.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// fp32 scores `[B]`: image `i` against prompt `i`, differentiable in the images.
    pub fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, ClipLoadError> {
        let pixels = self.processor.apply(images).map_err(|e| fail(Path::new(PROCESSOR_CONFIG), e))?;
        let img = self.clip.pixel_embeddings(&pixels)?;
        let txt = self.clip.text_embeddings(prompts)?;
        Ok((img * txt).sum_dim_intlist(-1, false, Kind::Float) * self.scale)
    }
}

impl Reward for PickScoreReward {
    fn name(&self) -> &str {
        "pickscore"
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError> {
        let (batch, _, _) = check_images(images)?;
        check_prompts(batch, prompts)?;
        PickScoreReward::score(self, images, prompts).map_err(|e| RewardError::Model(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_its_processor_config_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = PickScoreReward::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(err.contains("preprocessor_config.json") && err.contains("missing"), "{err}");
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"").unwrap();
        let err = PickScoreReward::load(&file, Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("not a folder"), "{err}");
        std::fs::write(dir.path().join(PROCESSOR_CONFIG), r#"{"resample": 1}"#).unwrap();
        let err = PickScoreReward::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(err.contains("preprocessor_config.json") && err.contains("resample 1"), "{err}");
        std::fs::write(dir.path().join(PROCESSOR_CONFIG), "{}").unwrap();
        let err = PickScoreReward::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}

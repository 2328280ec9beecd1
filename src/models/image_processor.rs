//! transformers' `CLIPImageProcessor` (its `preprocessor_config.json`) as differentiable tensor
//! operations, for rewards that score images still in the autograd graph.
//!
//! transformers 5 runs this processor with torchvision on tensors: resize (`shortest_edge`: the
//! short side to that size, the long side `int(size * long / short)`; or an exact
//! `height`/`width`) with antialiasing, bilinear or bicubic as `resample` says (PIL codes 2 and
//! 3), a center crop (zero padding when the crop is larger, the offset `int((H - h) / 2)`),
//! rescaling and normalisation. Images here are `[B, 3, H, W]` in [0, 1], i.e. the processor's
//! uint8 range divided by 255, so the pixels it would see are `255 x`.
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::clip::{CLIP_MEAN, CLIP_STD};

#[derive(Debug, thiserror::Error)]
pub enum ImageProcessorError {
    #[error("{}: cannot read the image processor config: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: unsupported image processor setting: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("image processor input: {0}")]
    Input(String),
}

/// A `size` / `crop_size` entry: an int (legacy configs) or a dict.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum HfSize {
    Int(i64),
    Dict {
        #[serde(default)]
        shortest_edge: Option<i64>,
        #[serde(default)]
        longest_edge: Option<i64>,
        #[serde(default)]
        height: Option<i64>,
        #[serde(default)]
        width: Option<i64>,
    },
}

/// `image_mean` / `image_std`: three values or one for every channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum HfChannels {
    One(f64),
    Each(Vec<f64>),
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` (defaults as its class attributes in
/// transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub struct HfImageProcessorConfig {
    #[serde(default)]
    pub image_processor_type: Option<String>,
    #[serde(default)]
    pub feature_extractor_type: Option<String>,
    #[serde(default = "defaults::yes")]
    pub do_resize: bool,
    #[serde(default = "defaults::size")]
    pub size: HfSize,
    /// PIL resampling code: 2 bilinear, 3 bicubic (others are refused).
    #[serde(default = "defaults::bicubic")]
    pub resample: i64,
    #[serde(default = "defaults::yes")]
    pub do_center_crop: bool,
    #[serde(default = "defaults::size")]
    pub crop_size: HfSize,
    #[serde(default = "defaults::yes")]
    pub do_rescale: bool,
    #[serde(default = "defaults::rescale_factor")]
    pub rescale_factor: f64,
    #[serde(default = "defaults::yes")]
    pub do_normalize: bool,
    #[serde(default = "defaults::mean")]
    pub image_mean: HfChannels,
    #[serde(default = "defaults::std")]
    pub image_std: HfChannels,
    /// Images here are RGB already; the setting changes nothing.
    #[serde(default = "defaults::yes")]
    pub do_convert_rgb: bool,
}

mod defaults {
    use super::{HfChannels, HfSize, CLIP_MEAN, CLIP_STD};

    pub fn yes() -> bool {
        true
    }
    pub fn size() -> HfSize {
        HfSize::Int(224)
    }
    pub fn bicubic() -> i64 {
        3
    }
    pub fn rescale_factor() -> f64 {
        1.0 / 255.0
    }
    pub fn mean() -> HfChannels {
        HfChannels::Each(CLIP_MEAN.to_vec())
    }
    pub fn std() -> HfChannels {
        HfChannels::Each(CLIP_STD.to_vec())
    }
}

/// The processor types whose preprocessing this module reproduces.
const CLIP_PROCESSORS: [&str; 4] = ["CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor"];

/// How images are resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The short side to this size, the long side `int(size * long / short)`.
    ShortestEdge(i64),
    /// Exactly this height and width.
    Exact { height: i64, width: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

/// The processor's steps, resolved from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<(Resize, Filter)>,
    /// (height, width) of the center crop.
    pub crop: Option<(i64, i64)>,
    /// Factor from images in [0, 1] to the values normalised: `255 * rescale_factor` (1 with
    /// the usual 1/255), or 255 without rescaling.
    pub scale: f64,
    /// Per-channel mean and std, when normalising.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

impl ImageProcessor {
    /// Reads an image processor config: `preprocessor_config.json` as the hub ships it, or the
    /// `image_processor` entry of the `processor_config.json` that transformers 5's
    /// `CLIPProcessor.save_pretrained` writes.
    pub fn from_json(path: &Path) -> Result<Self, ImageProcessorError> {
        let config_err = |reason: String| ImageProcessorError::Config { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| config_err(e.to_string()))?;
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(|e| config_err(e.to_string()))?;
        if let Some(inner) = value.get_mut("image_processor") {
            value = inner.take();
        }
        let config: HfImageProcessorConfig = serde_json::from_value(value).map_err(|e| config_err(e.to_string()))?;
        Self::from_config(&config).map_err(|reason| ImageProcessorError::Unsupported { path: path.to_path_buf(), reason })
    }

    /// The steps of `config`; the error says which setting is not supported.
    pub fn from_config(config: &HfImageProcessorConfig) -> Result<Self, String> {
        for kind in [&config.image_processor_type, &config.feature_extractor_type].into_iter().flatten() {
            if !CLIP_PROCESSORS.contains(&kind.as_str()) {
                return Err(format!("processor type `{kind}` (supported: {})", CLIP_PROCESSORS.join(", ")));
            }
        }
        let positive = |v: i64, what: &str| if v > 0 { Ok(v) } else { Err(format!("{what} {v} is not positive")) };
        let resize = if config.do_resize {
            let resize = match config.size {
                HfSize::Int(s) => Resize::ShortestEdge(positive(s, "size")?),
                HfSize::Dict { shortest_edge: Some(s), longest_edge: None, height: None, width: None } => Resize::ShortestEdge(positive(s, "size.shortest_edge")?),
                HfSize::Dict { shortest_edge: None, longest_edge: None, height: Some(h), width: Some(w) } => {
                    Resize::Exact { height: positive(h, "size.height")?, width: positive(w, "size.width")? }
                }
                ref other => return Err(format!("size {other:?} (supported: an int, {{shortest_edge}} or {{height, width}})")),
            };
            let filter = match config.resample {
                2 => Filter::Bilinear,
                3 => Filter::Bicubic,
                other => return Err(format!("resample {other} (supported: 2 bilinear, 3 bicubic)")),
            };
            Some((resize, filter))
        } else {
            None
        };
        let crop = if config.do_center_crop {
            Some(match config.crop_size {
                HfSize::Int(s) => (positive(s, "crop_size")?, s),
                HfSize::Dict { height: Some(h), width: Some(w), shortest_edge: None, longest_edge: None } => {
                    (positive(h, "crop_size.height")?, positive(w, "crop_size.width")?)
                }
                ref other => return Err(format!("crop_size {other:?} (supported: an int or {{height, width}})")),
            })
        } else {
            None
        };
        if config.do_rescale && !(config.rescale_factor.is_finite() && config.rescale_factor > 0.0) {
            return Err(format!("rescale_factor {} is not a positive number", config.rescale_factor));
        }
        let scale = if config.do_rescale { 255.0 * config.rescale_factor } else { 255.0 };
        let channels = |c: &HfChannels, what: &str| -> Result<[f64; 3], String> {
            match c {
                HfChannels::One(v) => Ok([*v; 3]),
                HfChannels::Each(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                HfChannels::Each(v) => Err(format!("{what} has {} values, 3 (RGB) expected", v.len())),
            }
        };
        let normalize = if config.do_normalize {
            let (mean, std) = (channels(&config.image_mean, "image_mean")?, channels(&config.image_std, "image_std")?);
            if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
                return Err(format!("image_std {s} cannot divide"));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(ImageProcessor { resize, crop, scale, normalize })
    }

    /// The (height, width) every image comes out at, when it does not depend on the input
    /// (a crop, or an exact resize).
    pub fn output_size(&self) -> Option<(i64, i64)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some((Resize::Exact { height, width }, _))) => Some((height, width)),
            _ => None,
        }
    }

    /// The size an `height` x `width` image is resized to.
    pub fn resized_size(&self, height: i64, width: i64) -> (i64, i64) {
        match self.resize {
            None => (height, width),
            Some((Resize::Exact { height, width }, _)) => (height, width),
            Some((Resize::ShortestEdge(size), _)) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = (size as f64 * long as f64 / short as f64) as i64;
                if width <= height {
                    (new_long, size)
                } else {
                    (size, new_long)
                }
            }
        }
    }

    /// Images `[B, 3, H, W]` in [0, 1] (float, any graph) -> the model's pixel values, fp32,
    /// differentiable in the images.
    pub fn apply(&self, images: &Tensor) -> Result<Tensor, ImageProcessorError> {
        let (height, width) = match images.size().as_slice() {
            &[b, 3, h, w] if b > 0 && h > 0 && w > 0 => (h, w),
            other => return Err(ImageProcessorError::Input(format!("images of shape {other:?}, expected [B, 3, H, W]"))),
        };
        let mut x = images.to_kind(Kind::Float);
        if let Some((_, filter)) = self.resize {
            let (h, w) = self.resized_size(height, width);
            if (h, w) != (height, width) {
                x = match filter {
                    Filter::Bilinear => x.internal_upsample_bilinear2d_aa([h, w], false, None, None),
                    Filter::Bicubic => x.internal_upsample_bicubic2d_aa([h, w], false, None, None),
                };
            }
        }
        if let Some((ch, cw)) = self.crop {
            let (h, w) = (x.size()[2], x.size()[3]);
            if ch > h || cw > w {
                // torchvision's padding: left/top (crop - size) / 2, right/bottom the rest.
                let pad_w = (cw - w).max(0);
                let pad_h = (ch - h).max(0);
                x = x.constant_pad_nd([pad_w / 2, (pad_w + 1) / 2, pad_h / 2, (pad_h + 1) / 2]);
            }
            let (h, w) = (x.size()[2], x.size()[3]);
            let top = ((h - ch) as f64 / 2.0) as i64;
            let left = ((w - cw) as f64 / 2.0) as i64;
            x = x.narrow(2, top, ch).narrow(3, left, cw);
        }
        if self.scale != 1.0 {
            // Out of place: `x` may still share the caller's storage (`to_kind` of a float tensor).
            #[allow(clippy::assign_op_pattern)]
            {
                x = x * self.scale;
            }
        }
        if let Some((mean, std)) = self.normalize {
            let opts = (Kind::Float, x.device());
            let mean = Tensor::from_slice(&mean).to_kind(opts.0).to_device(opts.1).view([1, 3, 1, 1]);
            let std = Tensor::from_slice(&std).to_kind(opts.0).to_device(opts.1).view([1, 3, 1, 1]);
            x = (x - mean) / std;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn parse(json: &str) -> Result<ImageProcessor, String> {
        ImageProcessor::from_config(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn legacy_and_current_configs_mean_the_same() {
        let legacy = parse(r#"{"size": 224, "crop_size": 224, "resample": 3, "feature_extractor_type": "CLIPFeatureExtractor"}"#).unwrap();
        let current = parse(r#"{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "image_processor_type": "CLIPImageProcessor"}"#).unwrap();
        assert_eq!(legacy, current);
        assert_eq!(current.resize, Some((Resize::ShortestEdge(224), Filter::Bicubic)));
        assert_eq!(current.output_size(), Some((224, 224)));
        assert!((current.scale - 1.0).abs() < 1e-12);
        assert_eq!(parse("{}").unwrap(), current);
    }

    #[test]
    fn unsupported_settings_are_named() {
        for (json, word) in [
            (r#"{"resample": 1}"#, "resample 1"),
            (r#"{"size": {"shortest_edge": 224, "longest_edge": 300}}"#, "size"),
            (r#"{"crop_size": {"shortest_edge": 224}}"#, "crop_size"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
            (r#"{"image_std": 0}"#, "image_std"),
            (r#"{"size": 0}"#, "size 0"),
            (r#"{"image_processor_type": "SiglipImageProcessor"}"#, "SiglipImageProcessor"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(word), "{json}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");
        std::fs::write(&path, r#"{"resample": 0}"#).unwrap();
        let err = ImageProcessor::from_json(&path).unwrap_err().to_string();
        assert!(err.contains("preprocessor_config.json") && err.contains("resample 0"), "{err}");
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(ImageProcessor::from_json(&path), Err(ImageProcessorError::Config { .. })));
        std::fs::write(&path, r#"{"size": "large"}"#).unwrap();
        assert!(matches!(ImageProcessor::from_json(&path), Err(ImageProcessorError::Config { .. })));
        // transformers 5's processor_config.json nests the image processor's settings.
        let nested = dir.path().join("processor_config.json");
        std::fs::write(&nested, r#"{"image_processor": {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}, "processor_class": "CLIPProcessor"}"#).unwrap();
        let p = ImageProcessor::from_json(&nested).unwrap();
        assert_eq!((p.resize, p.output_size()), (Some((Resize::ShortestEdge(36), Filter::Bicubic)), Some((32, 32))));
    }

    #[test]
    fn shortest_edge_sizes_follow_transformers() {
        let p = parse(r#"{"size": {"shortest_edge": 224}}"#).unwrap();
        assert_eq!(p.resized_size(512, 512), (224, 224));
        assert_eq!(p.resized_size(480, 640), (224, 298)); // int(224 * 640 / 480) = 298
        assert_eq!(p.resized_size(640, 480), (298, 224));
        assert_eq!(p.resized_size(100, 333), (224, 745)); // int(745.92)
    }

    #[test]
    fn crop_pads_when_larger_and_takes_the_centre() {
        let p = parse(r#"{"do_resize": false, "crop_size": {"height": 4, "width": 3}, "do_normalize": false}"#).unwrap();
        let x = Tensor::arange(2 * 3 * 2 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 2, 5]) / 255.0;
        let y = p.apply(&x).unwrap();
        assert_eq!(y.size(), [2, 3, 4, 3]);
        // Two rows of zeros padded, one above and one below; columns 1..4 of the original.
        assert_eq!(y.get(0).get(0).get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(y.get(0).get(0).get(3).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Rescaled by 255 * (1/255): the values in [0, 1] come out as they went in.
        let kept = y.narrow(2, 1, 2);
        assert!((kept - x.narrow(3, 1, 3)).abs().max().double_value(&[]) < 1e-6);
        // Without rescaling the model sees 0..255.
        let raw = parse(r#"{"do_resize": false, "do_center_crop": false, "do_rescale": false, "do_normalize": false}"#).unwrap();
        let before = x.copy();
        assert!((raw.apply(&x).unwrap() - &x * 255.0).abs().max().double_value(&[]) < 1e-4);
        assert_eq!((&x - before).abs().max().double_value(&[]), 0.0, "the caller's images changed");
    }
}

//! PickScore against transformers: a small random CLIPModel in PickScore's folder layout, scored
//! as PickScore's reference code scores it (scores within 1e-4, gradients in the images too),
//! and transformers' CLIP image processor on tensors for several configs (fixtures by
//! `fixtures_pickscore.py`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ril_pipe::models::image_processor::ImageProcessor;
use ril_pipe::rewards::pickscore::PickScoreReward;
use ril_pipe::rewards::Reward;
use tch::{Device, Kind, Tensor};

use crate::support::{fixtures, max_abs_diff};

fn index() -> serde_json::Value {
    let path = fixtures("pickscore").join("pickscore.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn folder() -> PathBuf {
    fixtures("pickscore").join(index()["pickscore"]["folder"].as_str().unwrap())
}

/// (case, prompts) of the PickScore fixtures.
fn cases() -> Vec<(String, Vec<String>)> {
    index()["pickscore"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let prompts = c["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
            (c["case"].as_str().unwrap().to_string(), prompts)
        })
        .collect()
}

#[test]
fn pickscore_matches_transformers() {
    let reward = PickScoreReward::load(&folder(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(Reward::name(&reward), "pickscore");
    let expected_scale = index()["pickscore"]["logit_scale"].as_f64().unwrap();
    assert!((reward.logit_scale() - expected_scale).abs() < 1e-4, "logit scale {} vs {expected_scale}", reward.logit_scale());
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for (case, prompts) in cases() {
        let t = tensors(&fixtures("pickscore").join(format!("pickscore_{case}.safetensors")));
        let pixels = reward.processor().apply(&t["images"]).unwrap();
        let pixel_diff = max_abs_diff(&pixels, &t["pixel_values"]);
        let images = t["images"].copy().set_requires_grad(true);
        let scores = Reward::score(&reward, &images, &prompts).unwrap();
        let score_diff = max_abs_diff(&scores, &t["scores"]);
        (&scores * &t["weight"]).sum(Kind::Float).backward();
        let grad_diff = max_abs_diff(&images.grad(), &t["grad"]);
        let grad_scale = t["grad"].abs().max().double_value(&[]);
        let spread = (t["scores"].max() - t["scores"].min()).double_value(&[]);
        println!(
            "{case}: pixels {pixel_diff:.2e}, scores {score_diff:.2e} (scores {:?}), gradient {grad_diff:.2e} of {grad_scale:.2e}",
            Vec::<f64>::try_from(&t["scores"].to_kind(Kind::Double)).unwrap()
        );
        assert!(pixel_diff < 1e-4, "{case}: pixel values differ by {pixel_diff}");
        assert!(score_diff < 1e-4, "{case}: scores differ by {score_diff}");
        assert!(grad_diff < 1e-4 * grad_scale, "{case}: gradients differ by {grad_diff} of {grad_scale}");
        assert!(grad_scale > 1e-3, "{case}: the gradient checked is too small to tell anything");
        assert!(spread > 1e-2 || t["scores"].numel() == 1, "{case}: the scores do not tell the images apart");
        worst = (worst.0.max(pixel_diff), worst.1.max(score_diff), worst.2.max(grad_diff / grad_scale));
    }
    println!("pickscore: worst pixels {:.2e}, worst scores {:.2e}, worst relative gradient {:.2e}", worst.0, worst.1, worst.2);
}

/// PickScore's users feed the processor PIL images, which its PIL backend resizes in uint8
/// (rounding each resized pixel and clamping the bicubic overshoot); the tensor path (what
/// training differentiates) on the same quantised images stays close on natural-like images.
/// White noise, whose overshoot is largest, is measured and bounded more loosely.
#[test]
fn pickscore_is_close_to_the_pil_processor() {
    let reward = PickScoreReward::load(&folder(), Device::Cpu, Kind::Float).unwrap();
    let compare = |t: &HashMap<String, Tensor>, prompts: &[String]| {
        let quantised = (&t["images"] * 255.0).round() / 255.0;
        let pixels = reward.processor().apply(&quantised).unwrap();
        let scores = tch::no_grad(|| Reward::score(&reward, &quantised, prompts).unwrap());
        (max_abs_diff(&pixels, &t["pil_pixel_values"]), max_abs_diff(&scores, &t["pil_scores"]))
    };
    let mut noise = (0.0f64, 0.0f64);
    for (case, prompts) in cases() {
        let t = tensors(&fixtures("pickscore").join(format!("pickscore_{case}.safetensors")));
        let (pixels, scores) = compare(&t, &prompts);
        println!("{case} (white noise): against the PIL processor, pixels {pixels:.2e}, scores {scores:.2e}");
        noise = (noise.0.max(pixels), noise.1.max(scores));
    }
    let prompts: Vec<String> =
        index()["pickscore"]["pil_natural_prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let t = tensors(&fixtures("pickscore").join("pickscore_pil_natural.safetensors"));
    let natural = compare(&t, &prompts);
    println!("pickscore vs PIL: natural-like pixels {:.2e}, scores {:.2e}; white noise pixels {:.2e}, scores {:.2e}", natural.0, natural.1, noise.0, noise.1);
    // One uint8 level after normalisation is 1 / 255 / 0.26 = 0.015: within 4 levels (PIL clamps
    // the overshoot at the discs' edges), scores (about 50) within 0.1.
    assert!(natural.0 < 4.0 * 0.015, "natural-like pixels differ from PIL's by {}", natural.0);
    assert!(natural.1 < 0.1, "natural-like scores differ from PIL's by {}", natural.1);
    assert!(noise.1 < 0.2, "white-noise scores differ from PIL's by {}", noise.1);
}

#[test]
fn image_processor_matches_transformers() {
    let names: Vec<String> = index()["processors"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    assert!(names.len() >= 5, "{names:?}");
    let mut worst = 0.0f64;
    for name in names {
        let dir = fixtures("pickscore").join(format!("processor_{name}"));
        let config = ["preprocessor_config.json", "processor_config.json"].iter().map(|f| dir.join(f)).find(|p| p.is_file()).unwrap();
        let processor = ImageProcessor::from_json(&config).unwrap();
        let t = tensors(&dir.join("reference.safetensors"));
        let mut shapes: Vec<&String> = t.keys().filter_map(|k| k.strip_prefix("images_").map(|_| k)).collect();
        shapes.sort();
        assert!(!shapes.is_empty());
        for key in shapes {
            let shape = key.strip_prefix("images_").unwrap();
            let reference = &t[&format!("pixel_values_{shape}")];
            let ours = processor.apply(&t[key]).unwrap();
            // Relative to the values' range (without rescaling they reach hundreds).
            let scale = reference.abs().max().double_value(&[]).max(1.0);
            let d = max_abs_diff(&ours, reference) / scale;
            println!("processor {name} {shape} -> {:?}: {d:.2e} (relative to {scale:.1})", reference.size());
            assert!(d < 1e-5, "processor {name} {shape}: pixel values differ by {d} (relative)");
            worst = worst.max(d);
        }
    }
    println!("image processor: worst relative difference {worst:.2e}");
}

/// A processor config that makes images of another size than the model takes is refused at
/// load, naming the file.
#[test]
fn a_processor_that_does_not_fit_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config = dir.path().join("preprocessor_config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["crop_size"] = serde_json::json!(28);
    std::fs::write(&config, json.to_string()).unwrap();
    let err = PickScoreReward::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(err.contains("preprocessor_config.json") && err.contains("28x28") && err.contains("32x32"), "{err}");
    // Without vocab.json the tokenizer's file is named.
    json["crop_size"] = serde_json::json!(32);
    std::fs::write(&config, json.to_string()).unwrap();
    PickScoreReward::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    std::fs::remove_file(dir.path().join("vocab.json")).unwrap();
    let err = PickScoreReward::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(err.contains("vocab.json"), "{err}");
}

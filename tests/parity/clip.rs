//! CLIP towers against transformers (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection,
//! CLIPVisionModelWithProjection) and open_clip (CLIP from a model-config dict), random weights.
use std::collections::HashMap;

use ril_pipe::models::clip::{preprocess, Clip, ClipConfig};
use ril_pipe::models::weights::Extra;
use tch::{nn, Device, Tensor};

use crate::support::{fixtures, max_abs_diff};

const TOL: f64 = 1e-4;

fn reference(case: &str) -> HashMap<String, Tensor> {
    let path = fixtures("clip").join(case).join("reference.safetensors");
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// Builds the model from the case's config, loads every checkpoint tensor (an unused one is an
/// error) and compares every reference output the case has. Returns the largest difference.
fn check(case: &str, open_clip: bool, weights_path: Option<&str>) -> f64 {
    let folder = fixtures("clip").join(case);
    let config = if open_clip {
        ClipConfig::from_open_clip_json(&folder.join("open_clip_config.json")).unwrap()
    } else {
        ClipConfig::from_transformers_json(&folder.join("config.json")).unwrap()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::load(&vs, &config, &weights_path.map(|f| folder.join(f)).unwrap_or(folder.clone()), Extra::Reject).unwrap();
    let r = reference(case);
    let mut worst = 0.0f64;
    let mut compared = 0;
    let mut cmp = |ours: &Tensor, key: &str| {
        let d = max_abs_diff(ours, &r[key]);
        assert!(d < TOL, "{case}: {key} differs by {d}");
        worst = worst.max(d);
        compared += 1;
    };
    tch::no_grad(|| {
        if let Some(text) = &model.text {
            let out = text.forward(&r["input_ids"]).unwrap();
            cmp(&out.last_hidden_state, "last_hidden_state");
            if r.contains_key("text_pooled") {
                cmp(&out.pooled, "text_pooled");
            }
            match (&out.embeds, r.contains_key("text_embeds")) {
                (Some(e), true) => cmp(e, "text_embeds"),
                (None, false) => {}
                (ours, theirs) => panic!("{case}: text projection present here {} / upstream {theirs}", ours.is_some()),
            }
        }
        if let Some(vision) = &model.vision {
            let out = vision.forward(&r["pixel_values"]).unwrap();
            cmp(&out.pooled, "image_pooled");
            cmp(out.embeds.as_ref().unwrap(), "image_embeds");
        }
    });
    let expected = r.keys().filter(|k| !["input_ids", "pixel_values"].contains(&k.as_str())).count();
    assert_eq!(compared, expected, "{case}: every reference output compared");
    eprintln!("{case}: max abs diff {worst:.2e}");
    worst
}

#[test]
fn clip_transformers_clipmodel() {
    check("hf_clip", false, None);
}

#[test]
fn clip_transformers_sd_text_encoder() {
    // Saved by transformers 5 (no `text_model.` prefix) and as transformers 4 / SD1.5 wrote it.
    check("hf_text_sd", false, None);
    check("hf_text_sd", false, Some("v4_layout.safetensors"));
}

#[test]
fn clip_transformers_text_with_projection() {
    check("hf_text_proj", false, None);
}

#[test]
fn clip_transformers_vision_with_projection() {
    check("hf_vision_proj", false, None);
}

#[test]
fn clip_transformers_vit_l14_names_and_widths() {
    check("hf_vit_l14_depth1", false, None);
}

#[test]
fn clip_open_clip_small() {
    check("oc_small", true, None);
}

#[test]
fn clip_open_clip_quick_gelu() {
    check("oc_quickgelu", true, None);
}

#[test]
fn clip_open_clip_vit_h14_names_and_widths() {
    check("oc_vit_h14_depth1", true, None);
}

#[test]
fn clip_preprocess_matches_interpolate_and_normalise() {
    let path = fixtures("clip").join("preprocess.safetensors");
    let r: HashMap<String, Tensor> = Tensor::read_safetensors(path).unwrap().into_iter().collect();
    for size in [32, 224] {
        let ours = preprocess(&r["images"], size).unwrap();
        let d = max_abs_diff(&ours, &r[&format!("preprocessed_{size}")]);
        assert!(d < TOL, "preprocess to {size}: {d}");
    }
}

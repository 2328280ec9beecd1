//! `ril-pipe model inspect` and `model run`, through the built binary, on the parity fixtures
//! (`$RIL_FIXTURES`, written by `make fixtures`), the real LAION head (the repository's `data/`), and
//! damaged copies of them made in temporary folders.
use std::path::{Path, PathBuf};
use std::process::Command;

use ril_pipe::models::weights::{read_safetensors, TensorMap};
use serde_json::{json, Value};
use tch::{Kind, Tensor};
use crate::support::{data_dir, fixtures, max_abs_diff};

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

fn ril(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_ril-pipe")).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    let outcome = Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!outcome.stderr.contains("panicked"), "the binary panicked: {}", outcome.stderr);
    outcome
}

fn inspect(path: &Path) -> Outcome {
    ril(&[&"model", &"inspect", &path])
}

fn inspect_json(path: &Path) -> Outcome {
    ril(&[&"model", &"inspect", &path, &"--json"])
}

fn copy_files(from: &Path, to: &Path, files: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn write_tensors(path: &Path, tensors: &TensorMap) {
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&list, path).unwrap();
}

fn edit_tensors(path: &Path, edit: impl FnOnce(&mut TensorMap)) {
    let mut tensors = read_safetensors(path).unwrap();
    edit(&mut tensors);
    write_tensors(path, &tensors);
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

const DIFFUSERS_FILES: [&str; 2] = ["config.json", "diffusion_pytorch_model.safetensors"];
const UNET_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// A copy of a UNet fixture (config and weights only) in `tmp`.
fn unet_copy(tmp: &Path, case: &str) -> PathBuf {
    let dir = tmp.join(case);
    copy_files(&fixtures("unet").join(case), &dir, &DIFFUSERS_FILES);
    dir
}

/// A CLIP tokenizer folder whose ids fit a 1000-token text encoder: the special tokens and a
/// few words, no merges.
fn small_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let vocab = json!({"a</w>": 0, "b</w>": 1, "c</w>": 2, "<|startoftext|>": 3, "<|endoftext|>": 4});
    std::fs::write(dir.join("vocab.json"), vocab.to_string()).unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\n").unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), json!({"model_max_length": 12}).to_string()).unwrap();
}

/// A diffusers pipeline folder from the fixtures whose components fit together: UNet
/// (cross-attention 32, 4 channels), VAE (4 latent channels), a 32-wide text encoder, a small
/// tokenizer, SD1.5's scheduler config.
fn pipeline(tmp: &Path) -> PathBuf {
    let dir = tmp.join("pipeline");
    copy_files(&fixtures("unet").join("plain_xattn"), &dir.join("unet"), &DIFFUSERS_FILES);
    copy_files(&fixtures("vae").join("two_blocks"), &dir.join("vae"), &DIFFUSERS_FILES);
    copy_files(&fixtures("clip").join("hf_text_proj"), &dir.join("text_encoder"), &["config.json", "model.safetensors"]);
    small_tokenizer(&dir.join("tokenizer"));
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    std::fs::copy(fixtures("ddim").join("sd15_scheduler_config.json"), dir.join("scheduler/scheduler_config.json")).unwrap();
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    });
    std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// inspect: clean checkpoints

#[test]
fn inspect_reports_every_component_of_a_pipeline_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline(tmp.path());
    let text = inspect(&dir);
    assert_eq!(text.code, 0, "{}{}", text.stdout, text.stderr);
    assert!(text.stdout.contains("StableDiffusionPipeline (model_index.json)"), "{}", text.stdout);
    assert!(text.stdout.contains("OK: 5 components load cleanly"), "{}", text.stdout);
    assert!(text.stdout.contains("skipped, not used by ril-pipe: feature_extractor (CLIPImageProcessor)"), "{}", text.stdout);

    let report = inspect_json(&dir).json();
    assert_eq!(report["ok"], true);
    assert_eq!(report["pipeline"], "StableDiffusionPipeline");
    let components = report["components"].as_array().unwrap();
    let names: Vec<&str> = components.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]);
    let kinds: Vec<&str> = components.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["unet", "vae", "clip_text_encoder", "tokenizer", "scheduler"]);

    let unet = &components[0];
    let file_tensors = read_safetensors(&dir.join("unet").join(UNET_WEIGHTS)).unwrap();
    let parameters: i64 = file_tensors.values().map(|t| t.numel() as i64).sum();
    assert_eq!(unet["weights"]["tensors"], file_tensors.len());
    assert_eq!(unet["weights"]["parameters"], parameters);
    assert_eq!(unet["weights"]["dtypes"], json!({"F32": file_tensors.len()}));
    assert_eq!(unet["check"]["expected"], file_tensors.len());
    assert_eq!(unet["check"]["matched"], file_tensors.len());
    assert_eq!(unet["config"]["block_out_channels"], json!([32, 64]));
    assert_eq!(unet["config"]["cross_attention_dim"], 32);
    assert_eq!(components[2]["config"]["text"]["width"], 32);
    assert_eq!(components[3]["config"]["vocab_size"], 5);
    assert_eq!(components[3]["config"]["model_max_length"], 12);
    assert_eq!(components[4]["config"]["beta_schedule"], "scaled_linear");
    assert_eq!(components[4]["config"]["steps_offset"], 1);
    assert_eq!(report["skipped"], json!([{"name": "feature_extractor", "class": "CLIPImageProcessor"}]));
}

#[test]
fn inspect_reports_components_that_do_not_fit_together() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline(tmp.path());
    // A UNet with 16-wide cross attention against the 32-wide text encoder, and the full
    // 49408-token tokenizer against its 1000-token vocabulary.
    copy_files(&fixtures("unet").join("xattn_plain"), &dir.join("unet"), &DIFFUSERS_FILES);
    copy_files(&fixtures("tokenizer").join("hf_tokenizer"), &dir.join("tokenizer"), &["vocab.json", "merges.txt"]);
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let out = inspect(&dir);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("problem: the UNet's cross_attention_dim is 16, the text encoder's hidden states are 32 wide"), "{}", out.stdout);
    assert!(out.stdout.contains("the tokenizer has 49408 tokens, the text encoder's vocab_size is 1000"), "{}", out.stdout);
    assert!(out.stdout.contains("no `vae/` folder (AutoencoderKL)"), "{}", out.stdout);
    let report = inspect_json(&dir).json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"].as_array().unwrap().len(), 2);
    let vae = report["components"].as_array().unwrap().iter().find(|c| c["name"] == "vae").unwrap();
    assert_eq!(vae["ok"], false);
}

#[test]
fn inspect_without_model_index_reads_the_standard_subfolders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pipeline(tmp.path());
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    let report = inspect_json(&dir).json();
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["components"].as_array().unwrap().len(), 5);
    assert!(report["notes"][0].as_str().unwrap().contains("no model_index.json"));
}

/// (path, expected kind), each a component that loads cleanly.
fn clean_components() -> Vec<(PathBuf, &'static str)> {
    let weights = data_dir().join("weights");
    vec![
        (fixtures("unet").join("three_blocks_linear"), "unet"),
        (fixtures("unet").join("all_xattn_odd").join(UNET_WEIGHTS), "unet"),
        (fixtures("vae").join("no_attention_no_quant"), "vae"),
        (fixtures("vae").join("three_blocks_legacy_names"), "vae"),
        (fixtures("clip").join("hf_clip"), "clip_model"),
        (fixtures("clip").join("hf_text_sd"), "clip_text_encoder"),
        (fixtures("clip").join("hf_text_sd").join("v4_layout.safetensors"), "clip_text_encoder"),
        (fixtures("clip").join("hf_vision_proj"), "clip_vision_encoder"),
        (fixtures("clip").join("oc_vit_h14_depth1"), "open_clip"),
        (fixtures("clip").join("oc_quickgelu").join("open_clip_model.safetensors"), "open_clip"),
        (weights.join("laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.pth"), "aesthetic_head"),
        (weights.join("laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.safetensors"), "aesthetic_head"),
        (fixtures("aesthetic").join("small_head.safetensors"), "aesthetic_head"),
        (fixtures("inception").join("pt_inception_random.pth"), "inception_fid"),
        (fixtures("ddim").join("sd15_scheduler_config.json"), "scheduler"),
        (fixtures("tokenizer").join("hf_tokenizer"), "tokenizer"),
        (data_dir().join("bpe_simple_vocab_16e6.txt.gz"), "tokenizer"),
    ]
}

#[test]
fn inspect_recognises_single_components_of_every_kind() {
    for (path, kind) in clean_components() {
        let out = inspect_json(&path);
        let report = out.json();
        assert_eq!(out.code, 0, "{}: {report:#}", path.display());
        assert_eq!(report["ok"], true);
        let components = report["components"].as_array().unwrap();
        assert_eq!(components.len(), 1, "{}", path.display());
        assert_eq!(components[0]["kind"], kind, "{}", path.display());
        if let Some(check) = components[0].get("check").filter(|c| !c.is_null()) {
            assert!(check["expected"].as_u64().unwrap() > 0);
            assert_eq!(check["expected"], check["matched"], "{}", path.display());
        }
    }
}

#[test]
fn inspect_shows_what_it_read_off_each_checkpoint() {
    let laion = inspect_json(&data_dir().join("weights/laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.safetensors")).json();
    assert_eq!(laion["components"][0]["config"]["dims"], json!([768, 1024, 128, 64, 16, 1]));
    let small = inspect_json(&fixtures("aesthetic").join("small_head.safetensors")).json();
    assert_eq!(small["components"][0]["config"]["dims"], json!([32, 24, 8, 1]));

    let inception = inspect_json(&fixtures("inception").join("pt_inception_random.pth")).json();
    let check = &inception["components"][0]["check"];
    assert_eq!(check["expected"], 94 * 5);
    let aside: Vec<&str> = check["set_aside"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(aside.contains(&"fc.weight") && aside.iter().filter(|n| n.ends_with("num_batches_tracked")).count() == 94);
    assert_eq!(inception["components"][0]["weights"]["dtypes"]["I64"], 94);

    let legacy = inspect(&fixtures("vae").join("three_blocks_legacy_names"));
    assert!(legacy.stdout.contains("old mid-block attention names (query/key/value/proj_attn), renamed"), "{}", legacy.stdout);

    let clip = inspect_json(&fixtures("clip").join("hf_clip")).json();
    let c = &clip["components"][0]["config"];
    assert_eq!((c["text"]["projection_dim"].clone(), c["vision"]["patch_size"].clone()), (json!(24), json!(8)));
}

#[test]
fn inspect_takes_the_open_clip_config_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures("clip").join("oc_small");
    copy_files(&src, tmp.path(), &["open_clip_model.safetensors"]);
    let weights = tmp.path().join("open_clip_model.safetensors");
    let without = inspect(&weights);
    assert_eq!(without.code, 1);
    assert!(without.stdout.contains("pass its model config with --config FILE"), "{}", without.stdout);
    let config = src.join("open_clip_config.json");
    let with = ril(&[&"model", &"inspect", &weights, &"--config", &config]);
    assert_eq!(with.code, 0, "{}", with.stdout);
    assert!(with.stdout.contains("CLIP (open_clip)"));
    // The Hugging Face hub's open_clip_config.json wraps the model config in `model_cfg`.
    let hub = tmp.path().join("open_clip_config.json");
    let model_cfg: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    std::fs::write(&hub, json!({"model_cfg": model_cfg, "preprocess_cfg": {}}).to_string()).unwrap();
    assert_eq!(inspect(tmp.path()).code, 0);
}

// ---------------------------------------------------------------------------------------------
// inspect: damaged checkpoints

const TO_K: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";

#[test]
fn inspect_names_a_removed_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    edit_tensors(&dir.join(UNET_WEIGHTS), |t| {
        assert!(t.remove(TO_K).is_some());
    });
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains(&format!("missing: `{TO_K}` [32, 16]")), "{}", out.stdout);
    assert!(out.stdout.contains("1 missing, 0 unexpected"), "{}", out.stdout);
    let check = inspect_json(&dir).json()["components"][0]["check"].clone();
    assert_eq!(check["missing"], json!([{"name": TO_K, "shape": [32, 16]}]));
    assert_eq!(check["matched"].as_u64().unwrap() + 1, check["expected"].as_u64().unwrap());
}

#[test]
fn inspect_names_both_sides_of_a_renamed_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    let (old, new) = ("mid_block.resnets.0.conv1.weight", "mid_block.resnets.0.conv_1.weight");
    edit_tensors(&dir.join(UNET_WEIGHTS), |t| {
        let tensor = t.remove(old).unwrap();
        t.insert(new.to_string(), tensor);
    });
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains(&format!("missing: `{old}` [64, 64, 3, 3]")), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("unexpected: `{new}` [64, 64, 3, 3]")), "{}", out.stdout);
}

#[test]
fn inspect_names_a_reshaped_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    edit_tensors(&dir.join(UNET_WEIGHTS), |t| {
        t.insert("conv_in.weight".into(), Tensor::zeros([32, 4, 1, 1], (Kind::Float, tch::Device::Cpu)));
    });
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains("wrong shape: `conv_in.weight`: [32, 4, 1, 1] in the file, the model expects [32, 4, 3, 3]"),
        "{}",
        out.stdout
    );
}

#[test]
fn inspect_names_integer_tensors_where_weights_belong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    edit_tensors(&dir.join(UNET_WEIGHTS), |t| {
        t.insert("conv_in.bias".into(), Tensor::zeros([32], (Kind::Int64, tch::Device::Cpu)));
    });
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("wrong dtype: `conv_in.bias`: I64 in the file, the model needs floats"), "{}", out.stdout);
}

#[test]
fn inspect_checks_the_weights_against_a_wrong_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    edit_json(&dir.join("config.json"), |c| c["cross_attention_dim"] = json!(24));
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    // Four cross-attention modules, to_k and to_v each: eight, five shown.
    assert!(out.stdout.contains("8 with the wrong shape"), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("wrong shape: `{TO_K}`: [32, 16] in the file, the model expects [32, 24]")), "{}", out.stdout);
    assert!(out.stdout.contains("... and 3 more wrong shape"), "{}", out.stdout);
    let check = inspect_json(&dir).json()["components"][0]["check"].clone();
    assert_eq!(check["wrong_shape"].as_array().unwrap().len(), 8);
}

#[test]
fn inspect_lists_the_first_few_problems_and_counts_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    let mut removed = 0;
    edit_tensors(&dir.join(UNET_WEIGHTS), |t| {
        let names: Vec<String> = t.keys().filter(|k| k.starts_with("up_blocks.")).cloned().collect();
        removed = names.len();
        for n in names {
            t.remove(&n);
        }
    });
    assert!(removed > 5);
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout.matches("    missing: `up_blocks.").count(), 5, "{}", out.stdout);
    assert!(out.stdout.contains(&format!("... and {} more missing", removed - 5)), "{}", out.stdout);
}

#[test]
fn inspect_rejects_unsupported_and_mismatched_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    edit_json(&dir.join("config.json"), |c| c["class_embed_type"] = json!("timestep"));
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("class_embed_type"), "{}", out.stdout);

    // A UNet config beside VAE weights.
    let dir = unet_copy(tmp.path(), "plain_xattn");
    std::fs::copy(fixtures("vae").join("two_blocks").join(UNET_WEIGHTS), dir.join(UNET_WEIGHTS)).unwrap();
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("the config is for: UNet2DConditionModel (diffusers); the tensors are those of: AutoencoderKL"), "{}", out.stdout);
}

#[test]
fn inspect_fails_cleanly_on_unreadable_and_unknown_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = unet_copy(tmp.path(), "xattn_plain");
    let file = dir.join(UNET_WEIGHTS);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("problem:") && out.stdout.contains("cannot read weights"), "{}", out.stdout);

    // Not a model: alone, and beside the config of one.
    let alone = tmp.path().join("io");
    copy_files(&fixtures("unet").join("xattn_plain"), &alone, &["io.safetensors"]);
    let io = inspect(&alone.join("io.safetensors"));
    assert_eq!(io.code, 1);
    assert!(io.stdout.contains("not recognised") && io.stdout.contains("first: context, out, sample"), "{}", io.stdout);
    let io = inspect(&fixtures("unet").join("xattn_plain").join("io.safetensors"));
    assert_eq!(io.code, 1);
    assert!(io.stdout.contains("tensor names not recognised") && io.stdout.contains("208 missing, 4 unexpected"), "{}", io.stdout);

    let original = tmp.path().join("v1-5-pruned.safetensors");
    let t = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("model.diffusion_model.input_blocks.0.0.weight", &t)], &original).unwrap();
    let out = inspect(&original);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("single-file Stable Diffusion checkpoint") && out.stdout.contains("from_single_file"), "{}", out.stdout);

    let lone = tmp.path().join("lone");
    copy_files(&fixtures("unet").join("xattn_plain"), &lone, &[UNET_WEIGHTS]);
    let out = inspect(&lone);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("no config beside the weights") && out.stdout.contains("--config FILE"), "{}", out.stdout);

    let missing = inspect(&tmp.path().join("nowhere"));
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("no such file or folder"), "{}", missing.stderr);
}

#[test]
fn inspect_tolerates_extra_clip_tensors_but_not_missing_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("text_encoder");
    // transformers 4's layout, with the `text_model.` prefix (as SD1.5's text_encoder).
    copy_files(&fixtures("clip").join("hf_text_sd"), &dir, &["config.json"]);
    let weights = dir.join("model.safetensors");
    std::fs::copy(fixtures("clip").join("hf_text_sd").join("v4_layout.safetensors"), &weights).unwrap();
    edit_tensors(&weights, |t| {
        t.insert("logit_scale".into(), Tensor::zeros([], (Kind::Float, tch::Device::Cpu)));
        t.insert("text_model.embeddings.position_ids".into(), Tensor::arange(16, (Kind::Int64, tch::Device::Cpu)).view([1, 16]));
    });
    let out = inspect_json(&dir);
    let check = out.json()["components"][0]["check"].clone();
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(check["unexpected"], json!([{"name": "logit_scale", "shape": []}]));
    assert_eq!(check["set_aside"], json!(["text_model.embeddings.position_ids"]));

    edit_tensors(&weights, |t| {
        assert!(t.remove("text_model.final_layer_norm.weight").is_some());
    });
    let out = inspect(&dir);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("missing: `text_model.final_layer_norm.weight` [48]"), "{}", out.stdout);
}

// ---------------------------------------------------------------------------------------------
// run

fn run_component(component: &str, weights: &Path, inputs: &[(&str, &Tensor)], extra: &[&str]) -> (Outcome, TensorMap) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.safetensors");
    let output = tmp.path().join("out.safetensors");
    Tensor::write_safetensors(inputs, &input).unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"model", &"run", &component, &"--weights", &weights, &"--input", &input, &"--output", &output];
    args.extend(extra.iter().map(|e| e as &dyn AsRef<std::ffi::OsStr>));
    let out = ril(&args);
    let tensors = if out.code == 0 { read_safetensors(&output).unwrap() } else { TensorMap::new() };
    (out, tensors)
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let d = max_abs_diff(ours, reference);
    println!("{what}: max abs diff {d:.2e}");
    assert!(d <= 1e-4, "{what}: max abs diff {d}");
}

#[test]
fn run_unet_reproduces_the_diffusers_outputs() {
    for (case, timestep_name) in
        [("xattn_plain", "timestep"), ("three_blocks_linear", "timesteps"), ("all_xattn_odd", "timestep"), ("plain_xattn", "timesteps")]
    {
        let dir = fixtures("unet").join(case);
        let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
        let inputs = [("sample", &io["sample"]), (timestep_name, &io["timesteps"]), ("encoder_hidden_states", &io["context"])];
        let (out, tensors) = run_component("unet", &dir, &inputs, &[]);
        assert_eq!(out.code, 0, "{case}: {}", out.stderr);
        assert_eq!(tensors.keys().collect::<Vec<_>>(), ["sample"]);
        assert_close(&format!("unet {case}"), &tensors["sample"], &io["out"]);
    }
}

#[test]
fn run_vae_reproduces_the_diffusers_outputs() {
    for case in ["two_blocks", "three_blocks_legacy_names", "no_attention_no_quant"] {
        let dir = fixtures("vae").join(case);
        let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
        let (out, encoded) = run_component("vae-encode", &dir.join(UNET_WEIGHTS), &[("sample", &io["image"])], &[]);
        assert_eq!(out.code, 0, "{case}: {}", out.stderr);
        assert_close(&format!("vae {case} mean"), &encoded["mean"], &io["mean"]);
        assert_close(&format!("vae {case} logvar"), &encoded["logvar"], &io["logvar"]);
        let (out, decoded) = run_component("vae-decode", &dir, &[("latents", &io["latent"])], &[]);
        assert_eq!(out.code, 0, "{case}: {}", out.stderr);
        assert_close(&format!("vae {case} decoded"), &decoded["sample"], &io["decoded"]);
    }
}

#[test]
fn run_clip_towers_reproduce_the_reference_outputs() {
    let clip = fixtures("clip");
    let reference = |case: &str| read_safetensors(&clip.join(case).join("reference.safetensors")).unwrap();

    let r = reference("hf_text_sd");
    let (out, t) = run_component("clip-text", &clip.join("hf_text_sd"), &[("input_ids", &r["input_ids"])], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!t.contains_key("text_embeds"), "SD's text encoder has no projection");
    assert_close("hf_text_sd last_hidden_state", &t["last_hidden_state"], &r["last_hidden_state"]);
    assert_close("hf_text_sd pooler_output", &t["pooler_output"], &r["text_pooled"]);

    let r = reference("hf_clip");
    let (out, t) = run_component("clip-text", &clip.join("hf_clip"), &[("input_ids", &r["input_ids"])], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("hf_clip text_embeds", &t["text_embeds"], &r["text_embeds"]);
    let (out, v) = run_component("clip-vision", &clip.join("hf_clip"), &[("pixel_values", &r["pixel_values"])], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("hf_clip image_embeds", &v["image_embeds"], &r["image_embeds"]);
    assert_close("hf_clip image pooler_output", &v["pooler_output"], &r["image_pooled"]);

    let r = reference("hf_vision_proj");
    let (out, v) = run_component("clip-vision", &clip.join("hf_vision_proj"), &[("pixel_values", &r["pixel_values"])], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("hf_vision_proj image_embeds", &v["image_embeds"], &r["image_embeds"]);

    // open_clip weights alone in a folder, the model config on the command line.
    let tmp = tempfile::tempdir().unwrap();
    copy_files(&clip.join("oc_small"), tmp.path(), &["open_clip_model.safetensors"]);
    let weights = tmp.path().join("open_clip_model.safetensors");
    let config = clip.join("oc_small").join("open_clip_config.json");
    let config = config.to_str().unwrap();
    let r = reference("oc_small");
    let (out, t) = run_component("clip-text", &weights, &[("input_ids", &r["input_ids"])], &["--config", config]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("oc_small text_embeds", &t["text_embeds"], &r["text_embeds"]);
    let (out, v) = run_component("clip-vision", &weights, &[("pixel_values", &r["pixel_values"])], &["--config", config]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("oc_small image_embeds", &v["image_embeds"], &r["image_embeds"]);
}

#[test]
fn run_aesthetic_and_inception_reproduce_the_reference_outputs() {
    let r = read_safetensors(&fixtures("aesthetic").join("laion.safetensors")).unwrap();
    let head = data_dir().join("weights/laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.pth");
    let (out, t) = run_component("aesthetic", &head, &[("embeddings", &r["embeddings"])], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("laion scores", &t["scores"], &r["scores"]);

    let r = read_safetensors(&fixtures("inception").join("reference.safetensors")).unwrap();
    let net = fixtures("inception").join("pt_inception_random.pth");
    let (out, t) = run_component("inception", &net, &[("images", &r["images_64x64"])], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_close("inception 64x64 features", &t["features"], &r["features_64x64"]);
}

#[test]
fn run_names_missing_and_mis_shaped_inputs() {
    let dir = fixtures("unet").join("xattn_plain");
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let (out, _) = run_component("unet", &dir, &[("sample", &io["sample"]), ("timestep", &io["timesteps"])], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no tensor `encoder_hidden_states`") && out.stderr.contains("sample [3, 4, 8, 8]"), "{}", out.stderr);

    let three_channels = io["sample"].narrow(1, 0, 3).contiguous();
    let inputs = [("sample", &three_channels), ("timestep", &io["timesteps"]), ("encoder_hidden_states", &io["context"])];
    let (out, _) = run_component("unet", &dir, &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("input `sample` has shape [3, 3, 8, 8]") && out.stderr.contains("[B, 4, h, w]"), "{}", out.stderr);

    let two_steps = io["timesteps"].narrow(0, 0, 2).contiguous();
    let inputs = [("sample", &io["sample"]), ("timestep", &two_steps), ("encoder_hidden_states", &io["context"])];
    let (out, _) = run_component("unet", &dir, &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("input `timestep` has shape [2]"), "{}", out.stderr);

    let wide = Tensor::zeros([3, 5, 24], (Kind::Float, tch::Device::Cpu));
    let inputs = [("sample", &io["sample"]), ("timestep", &io["timesteps"]), ("encoder_hidden_states", &wide)];
    let (out, _) = run_component("unet", &dir, &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("`encoder_hidden_states` has shape [3, 5, 24]") && out.stderr.contains("[3, L, 16]"), "{}", out.stderr);

    let clip = fixtures("clip").join("hf_text_sd");
    let ids = Tensor::from_slice(&[0i64, 5, 1000]).view([1, 3]);
    let (out, _) = run_component("clip-text", &clip, &[("input_ids", &ids)], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("ids in [0, 1000)") && out.stderr.contains("found ids from 0 to 1000"), "{}", out.stderr);
    let float_ids = ids.to_kind(Kind::Float);
    let (out, _) = run_component("clip-text", &clip, &[("input_ids", &float_ids)], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("integer token ids"), "{}", out.stderr);

    let vae = fixtures("vae").join("three_blocks_legacy_names");
    let tiny = Tensor::zeros([1, 3, 2, 2], (Kind::Float, tch::Device::Cpu));
    let (out, _) = run_component("vae-encode", &vae, &[("sample", &tiny)], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("too small for 2 downsampling steps"), "{}", out.stderr);
}

#[test]
fn run_refuses_the_wrong_component_or_a_missing_config() {
    let io = read_safetensors(&fixtures("unet").join("xattn_plain").join("io.safetensors")).unwrap();
    let inputs = [("sample", &io["sample"])];
    let (out, _) = run_component("vae-decode", &fixtures("unet").join("xattn_plain"), &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("`vae-decode` cannot run a UNet2DConditionModel"), "{}", out.stderr);

    let (out, _) = run_component("clip-text", &fixtures("clip").join("hf_vision_proj"), &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("without a text tower"), "{}", out.stderr);

    let tmp = tempfile::tempdir().unwrap();
    copy_files(&fixtures("unet").join("xattn_plain"), tmp.path(), &[UNET_WEIGHTS]);
    let (out, _) = run_component("unet", &tmp.path().join(UNET_WEIGHTS), &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no config file beside the weights") && out.stderr.contains("--config FILE"), "{}", out.stderr);

    // Damaged weights fail the load with the tensor named.
    let dir = unet_copy(tmp.path(), "xattn_plain");
    edit_tensors(&dir.join(UNET_WEIGHTS), |t| {
        assert!(t.remove(TO_K).is_some());
    });
    let (out, _) = run_component("unet", &dir, &inputs, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("missing tensor `{TO_K}`")), "{}", out.stderr);

    let nowhere = tmp.path().join("nowhere.safetensors");
    let out = ril(&[&"model", &"run", &"unet", &"--weights", &fixtures("unet").join("xattn_plain"), &"--input", &nowhere, &"--output", &tmp.path().join("o.safetensors")]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nowhere.safetensors: cannot read the inputs"), "{}", out.stderr);

    let (out, _) = run_component("controlnet", &dir, &inputs, &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}

#[test]
fn run_unet_with_exported_lora_adapters_reproduces_diffusers() {
    // fixtures_lora_export.py: diffusers' UNet output with the adapters of a folder in the
    // `lora export` layout, loaded and weighted by diffusers.
    let unet = Path::new(env!("CARGO_MANIFEST_DIR")).join("tiny/weights/diffusion/unet");
    for case in ["rid", "soup"] {
        let dir = fixtures("lora_export").join(case);
        let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
        let inputs = [("sample", &io["sample"]), ("timesteps", &io["timesteps"]), ("encoder_hidden_states", &io["context"])];
        let peft = dir.join("peft");
        let (out, tensors) = run_component("unet", &unet, &inputs, &["--lora", peft.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{case}: {}", out.stderr);
        assert!(out.stdout.contains("LoRA adapters of"), "{}", out.stdout);
        let d = max_abs_diff(&tensors["sample"], &io["out"]);
        assert!(d <= 1e-5, "{case}: with the adapters of {}: max abs diff {d}", peft.display());
        assert!(max_abs_diff(&io["out"], &io["base"]) > 1e-2, "{case}: the adapters should matter");
        let merged = peft.join("merged.safetensors");
        let (out, tensors) = run_component("unet", &unet, &inputs, &["--lora", merged.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{case}: {}", out.stderr);
        let d = max_abs_diff(&tensors["sample"], &io["out_merged"]);
        assert!(d <= 1e-5, "{case}: merged file: max abs diff {d}");
    }

    // Adapters for layers the model does not have, or for another component, are refused.
    let io = read_safetensors(&fixtures("unet").join("xattn_plain").join("io.safetensors")).unwrap();
    let inputs = [("sample", &io["sample"]), ("timesteps", &io["timesteps"]), ("encoder_hidden_states", &io["context"])];
    let peft = fixtures("lora_export").join("rid/peft");
    let (out, _) = run_component("unet", &fixtures("unet").join("xattn_plain"), &inputs, &["--lora", peft.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("layer `"), "{}", out.stderr);
    let (out, _) = run_component("vae-decode", &fixtures("vae").join("two_blocks"), &[("latents", &io["sample"])], &["--lora", peft.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("LoRA adapters apply to a UNet"), "{}", out.stderr);
    let nowhere = peft.join("nowhere");
    let (out, _) = run_component("unet", &unet, &inputs, &["--lora", nowhere.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nowhere"), "{}", out.stderr);
}

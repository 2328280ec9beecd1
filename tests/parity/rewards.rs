//! The differentiable JPEG and the compressibility reward against an independent torch
//! implementation of the same formulas, and against Pillow's real JPEG codec.
use std::collections::HashMap;

use ril_pipe::rewards::compressibility::{Compressibility, Reduction};
use ril_pipe::rewards::diff_jpeg::DiffJpeg;
use ril_pipe::rewards::Reward;
use tch::{Kind, Tensor};

use crate::support::{fixtures, max_abs_diff};

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures("rewards").join(name);
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

fn index() -> serde_json::Value {
    let path = fixtures("rewards").join("rewards.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn qualities() -> Vec<u8> {
    index()["qualities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_u64().unwrap() as u8)
        .collect()
}

fn cases() -> Vec<String> {
    index()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn diff_jpeg_matches_reference_f64() {
    let mut worst = (0.0f64, 0.0f64);
    for case in cases() {
        let t = load(&format!("jpeg_{case}.safetensors"));
        for q in qualities() {
            let jpeg = DiffJpeg::new(q).unwrap();
            let x = t["x"].copy().set_requires_grad(true);
            let c = jpeg.forward(&x).unwrap();
            assert_eq!(c.kind(), Kind::Double);
            let out_diff = max_abs_diff(&c, &t[&format!("c_q{q}")]);
            (&c * &t[&format!("weight_q{q}")])
                .sum(Kind::Double)
                .backward();
            let grad_diff = max_abs_diff(&x.grad(), &t[&format!("grad_q{q}")]);
            println!("{case} q{q}: output {out_diff:.2e}, gradient {grad_diff:.2e}");
            assert!(out_diff < 1e-14, "{case} q{q}: output differs by {out_diff}");
            assert!(
                grad_diff < 1e-12,
                "{case} q{q}: gradient differs by {grad_diff}"
            );
            worst = (worst.0.max(out_diff), worst.1.max(grad_diff));
        }
    }
    println!(
        "diff jpeg f64: worst output {:.2e}, worst gradient {:.2e}",
        worst.0, worst.1
    );
}

/// In f32 as training runs it; the reference is f64.
#[test]
fn diff_jpeg_matches_reference_f32() {
    let mut worst = 0.0f64;
    for case in cases() {
        let t = load(&format!("jpeg_{case}.safetensors"));
        let x = t["x"].to_kind(Kind::Float);
        for q in qualities() {
            let c = DiffJpeg::new(q).unwrap().forward(&x).unwrap();
            assert_eq!(c.kind(), Kind::Float);
            let diff = max_abs_diff(&c, &t[&format!("c_q{q}")]);
            println!("{case} q{q} f32: output {diff:.2e}");
            assert!(diff < 1e-6, "{case} q{q}: f32 output differs by {diff}");
            worst = worst.max(diff);
        }
    }
    println!("diff jpeg f32: worst output {worst:.2e}");
}

#[test]
fn compressibility_matches_reference() {
    for case in cases() {
        let t = load(&format!("jpeg_{case}.safetensors"));
        for q in qualities() {
            let reward = Compressibility::new(DiffJpeg::new(q).unwrap(), Reduction::Mean);
            let x = t["x"].copy().set_requires_grad(true);
            let score = reward.score(&x, &[]).unwrap();
            let score_diff = max_abs_diff(&score, &t[&format!("reward_q{q}")]);
            score.sum(Kind::Double).backward();
            let grad_diff = max_abs_diff(&x.grad(), &t[&format!("reward_grad_q{q}")]);
            assert!(
                score_diff < 1e-10,
                "{case} q{q}: reward differs by {score_diff}"
            );
            assert!(
                grad_diff < 1e-10,
                "{case} q{q}: reward gradient differs by {grad_diff}"
            );
        }
    }
}

/// The differentiable JPEG approximates a real codec: closer to Pillow's decode than the input
/// itself is (the differences left: libjpeg's integer DCT and fancy chroma upsampling).
#[test]
fn diff_jpeg_is_close_to_pillow() {
    let t = load("pillow.safetensors");
    let info = &index()["pillow"];
    let quality = info["quality"].as_u64().unwrap() as u8;
    let c = DiffJpeg::new(quality).unwrap().forward(&t["x"]).unwrap();
    let mae = (&c - &t["decoded"])
        .abs()
        .mean(Kind::Double)
        .double_value(&[]);
    let identity = info["mae_identity"].as_f64().unwrap();
    println!(
        "Pillow q{quality}: mean abs error {mae:.5} ({:.2}/255); input vs decode {identity:.5} ({:.2}/255); reference {:.5}",
        mae * 255.0,
        identity * 255.0,
        info["mae_reference"].as_f64().unwrap()
    );
    assert!(mae < 4.0 / 255.0, "mean abs error {mae}");
    assert!(
        mae < 0.6 * identity,
        "no closer to the codec than the input: {mae} vs {identity}"
    );
}

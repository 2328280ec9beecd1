//! Metrics against their references: Pillow file sizes, diffusers' uint8 conversion, pytorch-fid.
use std::collections::HashMap;

use ril_pipe::metrics::fid::{frechet_distance, FeatureStats};
use ril_pipe::metrics::filesize::{jpeg_size, png_bytes, png_size, to_uint8_images, RgbImage};
use ril_pipe::metrics::zlib_deflate::{zlib_level6, Strategy};
use tch::Tensor;

use crate::support::{fixtures, max_abs_diff};

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures("metrics").join(name);
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

fn load_json(name: &str) -> serde_json::Value {
    let path = fixtures("metrics").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.flatten(0, -1)).unwrap()
}

fn fixture_image(images: &HashMap<String, Tensor>, name: &str) -> RgbImage {
    let hwc = &images[name];
    RgbImage::new(hwc.size()[1] as u32, hwc.size()[0] as u32, bytes(hwc)).unwrap()
}

/// Worst |ours / Pillow - 1| over the set for one codec, asserting the 1% bound per image.
fn check_sizes(codec: &str, encode: impl Fn(&RgbImage) -> usize) -> f64 {
    let index = load_json("filesize.json");
    let images = load("filesize_images.safetensors");
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    for entry in index["images"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let reference = entry[codec].as_u64().unwrap() as f64;
        let ours = encode(&fixture_image(&images, name)) as f64;
        let deviation = ours / reference - 1.0;
        println!(
            "{codec} {name}: ours {ours} Pillow {reference} ratio {:.5}",
            ours / reference
        );
        if deviation.abs() > 0.01 {
            failures.push(format!("{name}: ours {ours} bytes, Pillow {reference}"));
        }
        if deviation.abs() >= worst.0.abs() {
            worst = (deviation, name.to_string());
        }
    }
    println!("{codec}: worst ratio {:.5} ({})", 1.0 + worst.0, worst.1);
    assert!(
        failures.is_empty(),
        "{codec} sizes off by more than 1%: {failures:#?}"
    );
    worst.0
}

#[test]
fn png_sizes_match_pillow() {
    check_sizes("png", |image| png_size(image).unwrap());
}

/// Beyond the 1% bound: the whole PNG file is Pillow's, byte for byte.
#[test]
fn png_files_identical_to_pillow() {
    let images = load("filesize_images.safetensors");
    let pillow = load("filesize_png.safetensors");
    for (name, reference) in &pillow {
        let ours = png_bytes(&fixture_image(&images, name)).unwrap();
        assert!(
            ours == bytes(reference),
            "{name}: PNG bytes differ from Pillow's"
        );
    }
    println!("png: {} files identical to Pillow's", pillow.len());
}

/// The zlib port against the system zlib on non-image data, both strategies.
#[test]
fn zlib_port_matches_zlib() {
    let t = load("zlib.safetensors");
    let index = load_json("zlib.json");
    println!("reference zlib {}", index["zlib"]);
    for name in index["names"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let input = bytes(&t[&format!("input_{name}")]);
        for (label, strategy) in [
            ("default", Strategy::Default),
            ("filtered", Strategy::Filtered),
        ] {
            let reference = bytes(&t[&format!("{label}_{name}")]);
            let ours = zlib_level6(&input, input.len().max(1), strategy);
            assert!(
                ours == reference,
                "{name} {label}: {} bytes, zlib {}",
                ours.len(),
                reference.len()
            );
        }
    }
}

#[test]
fn jpeg_sizes_match_pillow() {
    let index = load_json("filesize.json");
    for quality in index["jpeg_qualities"].as_array().unwrap() {
        let quality = quality.as_u64().unwrap() as u8;
        check_sizes(&format!("jpeg_q{quality}"), |image| {
            jpeg_size(image, quality).unwrap()
        });
    }
}

#[test]
fn uint8_conversion_matches_diffusers() {
    let t = load("to_uint8.safetensors");
    let images = to_uint8_images(&t["x"]).unwrap();
    let expected = &t["expected"];
    assert_eq!(images.len() as i64, expected.size()[0]);
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            image.data(),
            bytes(&expected.get(i as i64)).as_slice(),
            "image {i}"
        );
    }
}

/// Our statistics and FID against pytorch-fid on the fixture cases with `dim` in `dims`;
/// returns the worst relative FID difference.
fn check_fid(dims: std::ops::RangeInclusive<u64>, check_self: bool) -> f64 {
    let index = load_json("fid.json");
    let mut worst = 0.0f64;
    for entry in index
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| dims.contains(&e["dim"].as_u64().unwrap()))
    {
        let name = entry["name"].as_str().unwrap();
        let reference = entry["fid"].as_f64().unwrap();
        let t = load(&format!("fid_{name}.safetensors"));
        let stats1 = FeatureStats::from_features(&t["feats1"]).unwrap();
        let stats2 = FeatureStats::from_features(&t["feats2"]).unwrap();
        let mu_diff =
            max_abs_diff(stats1.mean(), &t["mu1"]).max(max_abs_diff(stats2.mean(), &t["mu2"]));
        assert!(mu_diff < 1e-12, "{name}: mean differs by {mu_diff}");
        if let (Some(s1), Some(s2)) = (t.get("sigma1"), t.get("sigma2")) {
            let sigma_diff =
                max_abs_diff(stats1.covariance(), s1).max(max_abs_diff(stats2.covariance(), s2));
            assert!(
                sigma_diff < 1e-12,
                "{name}: covariance differs by {sigma_diff}"
            );
        }
        let ours = frechet_distance(&stats1, &stats2).unwrap();
        let rel = (ours - reference).abs() / reference.abs();
        println!("fid {name}: ours {ours:.12} pytorch-fid {reference:.12} rel {rel:.3e}");
        assert!(rel < 1e-6, "{name}: ours {ours}, pytorch-fid {reference}");
        worst = worst.max(rel);

        if check_self {
            let self_fid = frechet_distance(&stats1, &stats1).unwrap();
            let scale = stats1.covariance().trace().double_value(&[]);
            println!("fid {name}: self {self_fid:.3e} (trace {scale:.3e})");
            // Null directions of a singular covariance (N <= D) leave sqrt(rounding) ~ 1e-8 terms.
            assert!(
                self_fid.abs() < 1e-6 * scale,
                "{name}: FID of a set against itself is {self_fid}"
            );
        }
    }
    println!("fid: worst relative difference {worst:.3e}");
    worst
}

#[test]
fn fid_matches_pytorch_fid() {
    check_fid(1..=256, true);
}

/// Inception's 2048 dimensions, N below and above D (each 2048-d eigendecomposition is slow on CPU).
#[test]
fn fid_2048_matches_pytorch_fid() {
    check_fid(2048..=2048, false);
}

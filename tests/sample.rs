//! `ril-pipe sample` on the committed tiny world, through the built binary: the evaluation's
//! images come out again bitwise, and a stage that is not in the cache is refused with the
//! command that computes it, training nothing.

use ril_pipe::report::montage::{read_png, Rgb};
use crate::support::{output_text, ril_in, tiny_weights};

/// The base model and its evaluation: 3 test prompts x 2 images in batches of 4, so that a batch
/// ends inside a prompt's images.
fn pipeline(extra: &str) -> String {
    format!(
        "stages:\n  - id: base\n    kind: tiny_world\n    params: {{root: {}}}\n  - id: eval/base\n    kind: evaluate\n    inputs: {{model: base}}\n    params: {{images_per_prompt: 2, max_prompts: 3, grid_prompts: 3, batch_size: 4, ddim_steps: 3, guidance: 3.0, seed: 77}}\n{extra}",
        tiny_weights().display()
    )
}

/// Columns of a one-row grid of `n` images `side` pixels wide with 2-pixel gaps.
fn crop(grid: &Rgb, column: u32, side: u32) -> Vec<u8> {
    let x0 = column * (side + 2);
    (0..side).flat_map(|y| grid.pixels[((y * grid.width + x0) * 3) as usize..((y * grid.width + x0 + side) * 3) as usize].to_vec()).collect()
}

#[test]
fn sample_gives_the_evaluations_images_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("p.yaml"), pipeline("")).unwrap();
    let out = ril_in(dir, &["run", "p.yaml", "--device", "cpu", "--no-progress"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = ril_in(dir, &["export", "p.yaml", "--stage", "eval/base", "--to", "eval"]);
    assert!(out.status.success(), "{}", output_text(&out));

    // The evaluation's prompts, in order, with its images per prompt; its seed and sampler by
    // default (taken from eval/base).
    let test_prompts: Vec<String> = std::fs::read_to_string(tiny_weights().join("prompts/test.txt")).unwrap().lines().take(3).map(str::to_string).collect();
    std::fs::write(dir.join("prompts.txt"), test_prompts.join("\n")).unwrap();
    let out = ril_in(dir, &["sample", "p.yaml", "base", "--prompts", "prompts.txt", "--n", "2", "--device", "cpu", "--out", "samples"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("seed 77, 3 DDIM steps") && output_text(&out).contains("settings of `eval/base`"), "{}", output_text(&out));

    // The evaluation's grid holds image 0 of each prompt: the same pixels.
    let grid = read_png(&dir.join("eval/grid.png")).unwrap();
    for j in 0..3u32 {
        let ours = read_png(&dir.join(format!("samples/p{j:03}_s000.png"))).unwrap();
        assert_eq!((ours.width, ours.height), (32, 32));
        assert!(ours.pixels == crop(&grid, j, 32), "prompt {j}, image 0 differs from the evaluation's");
    }
    // Every image: the size of its PNG is the one the evaluation recorded for that image.
    let scores = std::fs::read_to_string(dir.join("eval/scores.jsonl")).unwrap();
    let mut seen = 0;
    for line in scores.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (j, k) = (v["prompt"].as_u64().unwrap(), v["image"].as_u64().unwrap());
        let file = dir.join(format!("samples/p{j:03}_s{k:03}.png"));
        assert_eq!(std::fs::metadata(&file).unwrap().len(), v["png_bytes"].as_u64().unwrap(), "prompt {j} image {k}");
        assert_eq!(v["text"].as_str().unwrap(), test_prompts[j as usize]);
        seen += 1;
    }
    assert_eq!(seen, 6);

    // Another seed gives other images; the grid and the manifest are written.
    let out = ril_in(dir, &["sample", "p.yaml", "base", "--prompts", "prompts.txt", "--n", "2", "--seed", "78", "--device", "cpu", "--out", "other"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_ne!(std::fs::read(dir.join("other/p000_s000.png")).unwrap(), std::fs::read(dir.join("samples/p000_s000.png")).unwrap());
    let grid = read_png(&dir.join("samples/grid.png")).unwrap();
    assert!(grid.width > 2 * 32 && grid.height > 3 * 32, "{}x{}", grid.width, grid.height);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("samples/samples.json")).unwrap()).unwrap();
    assert_eq!(manifest["images"].as_array().unwrap().len(), 6);
    assert_eq!(manifest["images"][3]["index"], 3);
    assert_eq!(manifest["seed"], 77);

    // Flags that stand for an evaluation's parameters obey their ranges; nothing is written.
    for (flag, value, expected) in [("--guidance", "-1", "--guidance: expected a value >= 0, found -1.0"), ("--steps", "0", "--steps: expected a value in [1, 1000], found 0"), ("--batch-size", "0", "--batch-size: expected a value >= 1, found 0")] {
        let flag_value = format!("{flag}={value}");
        let out = ril_in(dir, &["sample", "p.yaml", "base", "--prompt", "a red circle", &flag_value, "--device", "cpu", "--out", "refused"]);
        assert!(!out.status.success() && output_text(&out).contains(expected), "{flag} {value}: {}", output_text(&out));
        assert!(!dir.join("refused").exists());
    }
}

#[test]
fn sample_refuses_a_stage_not_in_the_cache_and_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let finetune = "  - id: ft/rid/A\n    kind: finetune\n    inputs: {model: base}\n    params: {task: aesthetic, method: rid, prompts_per_epoch: 4, batch_size: 2, ddim_steps: 2}\n";
    std::fs::write(dir.join("p.yaml"), pipeline(finetune)).unwrap();
    let out = ril_in(dir, &["sample", "p.yaml", "ft/rid/A", "--prompt", "a red circle", "--out", "samples"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let message = output_text(&out);
    assert!(message.contains("stage `ft/rid/A` is not in the cache") && message.contains("`ril-pipe run p.yaml` computes it"), "{message}");
    assert!(!dir.join("samples").exists());
    assert!(!dir.join("cache/objects").exists() || std::fs::read_dir(dir.join("cache/objects")).unwrap().next().is_none(), "sample computed something");

    // A typo is answered with the nearest stage; a stage without a model is refused.
    let out = ril_in(dir, &["sample", "p.yaml", "ft/rid/B", "--prompt", "x", "--out", "samples"]);
    assert!(output_text(&out).contains("did you mean `ft/rid/A`?"), "{}", output_text(&out));
    let out = ril_in(dir, &["sample", "p.yaml", "base", "--out", "samples"]);
    assert!(output_text(&out).contains("no prompts"), "{}", output_text(&out));
}

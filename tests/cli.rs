//! The command line as a user types it: options that belong to the whole tool.

use std::path::Path;

use crate::support::{output_text, ril_in, tiny_weights};

/// A one-stage pipeline on the committed tiny world: running it only checks the bundle's hashes.
fn world_pipeline(dir: &Path) -> String {
    let root = tiny_weights();
    let file = dir.join("p.yaml");
    std::fs::write(&file, format!("stages:\n  - id: base\n    kind: tiny_world\n    params: {{root: {}}}\n", root.display())).unwrap();
    file.to_string_lossy().into_owned()
}

#[test]
fn cache_is_accepted_before_the_subcommand_as_well_as_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = world_pipeline(tmp.path());

    // Before the subcommand: the run's object lands in that folder, and no ./cache appears.
    let out = ril_in(tmp.path(), &["--cache", "before", "run", &pipeline, "--device", "cpu", "--no-progress"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(tmp.path().join("before/objects").is_dir(), "{}", output_text(&out));
    assert!(!tmp.path().join("cache").exists(), "the default cache was used: {}", output_text(&out));

    // The same folder given either way is the same cache: the plan sees the stage as done.
    for args in [vec!["--cache", "before", "plan", &pipeline, "--json"], vec!["plan", &pipeline, "--json", "--cache", "before"]] {
        let out = ril_in(tmp.path(), &args);
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stages = plan["stages"].as_array().unwrap_or_else(|| panic!("{plan}"));
        assert_eq!(stages[0]["status"], "hit", "{args:?}: {plan}");
    }
    let out = ril_in(tmp.path(), &["--cache", "elsewhere", "plan", &pipeline, "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["stages"][0]["status"], "miss", "{plan}");

    // Given twice, the one after the subcommand wins (it is the nearer); `status` names it.
    let out = ril_in(tmp.path(), &["--cache", "elsewhere", "status", "--cache", "before"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("cache before: 1 objects"), "{}", output_text(&out));

    // Commands that keep no cache accept the option too, as the README says every command does.
    let out = ril_in(tmp.path(), &["--cache", "before", "kinds"]);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// Changes one byte of a file inside the cache without changing its size (bit rot, a stray edit).
fn flip_a_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] = if bytes[i] == b'7' { b'8' } else { b'7' };
    std::fs::write(path, bytes).unwrap();
}

/// The object folder of a stage, from `plan --json`.
fn object_of(dir: &Path, stage: &str) -> std::path::PathBuf {
    let out = ril_in(dir, &["plan", "p.yaml", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = plan["stages"].as_array().unwrap().iter().find(|s| s["id"] == stage).unwrap()["key"].as_str().unwrap().to_string();
    dir.join("cache/objects").join(&key[..2]).join(key)
}

#[test]
fn every_reader_of_the_cache_refuses_an_object_whose_bytes_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pipeline = format!(
        "name: damage\nstages:\n  - id: base\n    kind: tiny_world\n    params: {{root: {}}}\n  - id: ft\n    kind: finetune\n    inputs: {{model: base}}\n    params: {{task: aesthetic, method: baseline, epochs: 1, prompts_per_epoch: 2, batch_size: 2, ddim_steps: 2, guidance: 3.0}}\n  - id: eval/base\n    kind: evaluate\n    inputs: {{model: base}}\n    params: {{images_per_prompt: 1, max_prompts: 2, ddim_steps: 2, guidance: 3.0}}\n  - id: report\n    kind: report\n    inputs: {{base: eval/base}}\n",
        tiny_weights().display()
    );
    std::fs::write(dir.join("p.yaml"), pipeline).unwrap();
    let out = ril_in(dir, &["run", "p.yaml", "--device", "cpu", "--no-progress"]);
    assert!(out.status.success(), "{}", output_text(&out));
    // A baseline of the run's own value: `check` passes before the damage.
    std::fs::write(dir.join("baseline.json"), r#"{"defaults": {"direction": "both", "abs_tol": 0}, "metrics": {"eval/base/aesthetic": {"value": 0}}}"#).unwrap();
    let out = ril_in(dir, &["check", "--update", "--baseline", "baseline.json", "p.yaml"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = ril_in(dir, &["check", "--baseline", "baseline.json", "p.yaml"]);
    assert!(out.status.success(), "{}", output_text(&out));

    // One digit of the report's metrics.json, the size unchanged.
    let published = std::fs::read(dir.join("reports/damage/metrics.json")).unwrap();
    let report = object_of(dir, "report");
    let metrics = std::fs::read_to_string(report.join("metrics.json")).unwrap();
    flip_a_byte(&report.join("metrics.json"), metrics.find(|c: char| c.is_ascii_digit()).unwrap());
    for args in [vec!["check", "--baseline", "baseline.json", "p.yaml"], vec!["report", "p.yaml"], vec!["export", "p.yaml", "--stage", "report", "--to", "out"]] {
        let out = ril_in(dir, &args);
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?} read a damaged object: {text}");
        assert!(text.contains("damaged") && text.contains("`report`") && text.contains("verify --repair"), "{args:?}: {text}");
    }
    assert_eq!(std::fs::read(dir.join("reports/damage/metrics.json")).unwrap(), published, "the damaged report was published");
    assert!(!dir.join("out").exists(), "the damaged report was exported");

    // One byte inside the fine-tune's adapters: sample and lora export refuse it too.
    let ft = object_of(dir, "ft");
    let size = std::fs::metadata(ft.join("adapters.safetensors")).unwrap().len() as usize;
    flip_a_byte(&ft.join("adapters.safetensors"), size - 3);
    for args in [vec!["sample", "p.yaml", "ft", "--prompt", "a red circle", "--device", "cpu", "--out", "samples"], vec!["lora", "export", "p.yaml", "ft", "--out", "lora"]] {
        let out = ril_in(dir, &args);
        let text = output_text(&out);
        assert!(!out.status.success() && text.contains("damaged") && text.contains("`ft`"), "{args:?}: {text}");
    }

    // As the message says: verify --repair removes them, run computes them again, check passes.
    let out = ril_in(dir, &["verify", "--repair"]);
    let text = output_text(&out);
    assert!(out.status.success() && text.contains("(stage report)") && text.contains("(stage ft)") && text.contains("removed 2 damaged objects"), "{text}");
    let out = ril_in(dir, &["run", "p.yaml", "--device", "cpu", "--no-progress"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = ril_in(dir, &["check", "--baseline", "baseline.json", "p.yaml"]);
    assert!(out.status.success(), "{}", output_text(&out));
}

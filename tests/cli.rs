//! The command line as a user types it: options that belong to the whole tool.
mod support;

use std::path::Path;

use support::{output_text, ril_in, tiny_weights};

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

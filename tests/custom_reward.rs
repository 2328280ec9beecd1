//! Rewards of one's own (docs/rewards.md): a pipeline's `rewards:` declarations, checked at
//! validation and when a stage starts, trained on by `finetune` and `joint`, reported by
//! `evaluate`, `forgetting` and the report, and keyed by their file's content.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::launch::Outcome;
use ril_pipe::exec::plan::plan;
use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::pipeline::{load_for_plan, load_resolved, ResolvedPipeline};
use ril_pipe::records::{read_json, EvaluationRecord, ForgettingRecord, Metric, RewardDirection, Task, TrainSummary};
use ril_pipe::stages::registry;
use ril_pipe::stages::reward_set::check_declared;

use crate::support::{fixtures, object, repo, tiny_weights};

/// The saturation reward of `examples/rewards/saturation.py`, as the example pipeline ships it.
fn saturation() -> PathBuf {
    repo().join("pipelines/examples/rewards/saturation.pt")
}

/// A pipeline on the tiny world with `rewards` (the YAML of the block's entries) and `stages`
/// after the world stage `base`, written into `dir` with a copy of each `(name, file)` beside it.
fn pipeline(dir: &Path, files: &[(&str, &Path)], rewards: &str, stages: &str) -> PathBuf {
    for (name, file) in files {
        std::fs::copy(file, dir.join(name)).unwrap();
    }
    let text = format!(
        r#"
rewards:
{rewards}
defaults:
  finetune: {{epochs: 1, prompts_per_epoch: 64, ddim_steps: 10, guidance: 3.0, lora_rank: 4, lambda: 0.1, ema_momentum: 0.9, seed: 0}}
  joint: {{epochs: 1, prompts_per_epoch: 64, batch_size: 32, lr: 1.0e-2, ddim_steps: 10, guidance: 3.0, lora_rank: 4, seed: 0}}
  evaluate: {{images_per_prompt: 1, ddim_steps: 10, guidance: 3.0, seed: 1234, batch_size: 50}}
stages:
  - id: base
    kind: tiny_world
    params: {{root: "{root}"}}
{stages}"#,
        root = tiny_weights().display()
    );
    let path = dir.join("p.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn resolve(file: &Path) -> ResolvedPipeline {
    load_resolved(file, &registry().schemas(), &[]).unwrap()
}

/// The validation error of a pipeline, as the command line shows it.
fn refusal(file: &Path) -> String {
    load_resolved(file, &registry().schemas(), &[]).unwrap_err().to_string()
}

fn run_all(p: &ResolvedPipeline, cache: &Cache) {
    let summary = run(p, &registry(), cache, &RunOptions::default()).unwrap();
    for o in &summary.outcomes {
        if let Outcome::Failed { error, log } = &o.outcome {
            let log = log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
            panic!("stage {} failed: {error}\n{log}", o.id);
        }
    }
}

fn keys(p: &ResolvedPipeline) -> BTreeMap<String, String> {
    let cache_dir = tempfile::tempdir().unwrap();
    let pl = plan(p, &registry(), &Cache::new(cache_dir.path()), &FileHasher::ephemeral()).unwrap();
    pl.stages.iter().map(|s| (s.stage.id.clone(), s.key.clone())).collect()
}

const STUDY: &str = r#"
  - id: ft/${direction}
    kind: finetune
    matrix: {direction: [up, down]}
    params: {task: "${direction}", method: rid, batch_size: 8, lr: 2.0e-3}
    inputs: {model: base}
  - id: ft/up/2
    kind: finetune
    params: {task: aesthetic, method: rid, batch_size: 8, lr: 2.0e-3}
    inputs: {model: ft/up}
  - id: joint
    kind: joint
    params: {weights: {aesthetic: 0.01, up: 1}}
    inputs: {model: base}
  - id: eval/base
    kind: evaluate
    inputs: {model: base}
  - id: eval/${direction}
    kind: evaluate
    matrix: {direction: [up, down]}
    meta: {method: rid, order: SA}
    inputs: {model: "ft/${direction}"}
  - id: eval/rid/SA/2
    kind: evaluate
    meta: {method: rid, order: SA}
    inputs: {model: ft/up/2}
  - id: eval/joint
    kind: evaluate
    inputs: {model: joint}
  - id: forgetting/rid/SA
    kind: forgetting
    meta: {method: rid, order: SA}
    inputs: {evals: [eval/base, eval/up, eval/rid/SA/2]}
  - id: report
    kind: report
    params: {title: custom, table2_order: SA}
    inputs: {base: eval/base, evals: [eval/up, eval/rid/SA/2], forgetting: [forgetting/rid/SA], joint: eval/joint}
"#;

#[test]
fn a_declared_reward_is_trained_evaluated_forgotten_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    // The same saturation module twice: `up` read as higher-is-better, `down` as lower.
    let rewards = "  up: {torchscript: sat.pt, label: Saturation, letter: S}\n  down: {torchscript: sat.pt, direction: lower, label: Greyness, letter: G}";
    let text_path = pipeline(dir.path(), &[("sat.pt", &saturation())], rewards, STUDY);
    let p = resolve(&text_path);
    assert_eq!(check_declared(&p).unwrap(), 1, "one file at one image size, checked once");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    run_all(&p, &cache);
    let record = |id: &str| EvaluationRecord::read(&object(&p, &cache, id).join("metrics.json")).unwrap();
    let (up, down) = (Metric::Declared("up".into()), Metric::Declared("down".into()));
    let base = record("eval/base");
    assert_eq!(base.metrics.len(), 8, "the six metrics and both declared rewards");
    assert_eq!(base.rewards.get("down").unwrap().direction, RewardDirection::Lower);
    // Both names score the same module: equal values, read in opposite directions.
    assert_eq!(base.metrics[&up], base.metrics[&down]);
    let (raised, lowered) = (record("eval/up"), record("eval/down"));
    eprintln!("saturation on the held-out prompts: base {:.5}, RID on `up` {:.5}, RID on `down` (lower) {:.5}", base.metrics[&up], raised.metrics[&up], lowered.metrics[&up]);
    assert!(raised.metrics[&up] > base.metrics[&up], "RID on a higher-is-better reward raises it");
    assert!(lowered.metrics[&down] < base.metrics[&down], "RID on a lower-is-better reward lowers it");
    assert_eq!(raised.tasks, vec![Task::Declared("up".into())]);

    // Per image in scores.jsonl, their mean is the metric.
    let scores = std::fs::read_to_string(object(&p, &cache, "eval/up").join("scores.jsonl")).unwrap();
    let values: Vec<f64> = scores.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["up"].as_f64().unwrap()).collect();
    assert_eq!(values.len(), raised.prompts);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert!((mean - raised.metrics[&up]).abs() < 1e-12);

    // Joint tuning with a declared reward's weight trains on both and raises saturation.
    let summary: TrainSummary = read_json(&object(&p, &cache, "joint").join("train_summary.json"), "a summary").unwrap();
    assert_eq!(summary.tasks, vec![Task::Aesthetic, Task::Declared("up".into())]);
    let joint = record("eval/joint");
    eprintln!("joint 0.01 aesthetic + 1 saturation: saturation {:.5}", joint.metrics[&up]);
    assert!(joint.metrics[&up] > base.metrics[&up]);

    // Forgetting reads each declared reward in its direction.
    let f: ForgettingRecord = read_json(&object(&p, &cache, "forgetting/rid/SA").join("forgetting.json"), "a forgetting record").unwrap();
    assert_eq!(f.tasks, vec![Task::Declared("up".into()), Task::Aesthetic]);
    let t_up = &f.trajectory[&up];
    let best_up = t_up.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(f.forgetting[&up], Some(best_up - t_up[2]), "a finished task's target, read higher-is-better");
    let t_down = &f.trajectory[&down];
    let best_down = t_down.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(f.forgetting[&down], None, "`down` was not a task of this order");
    assert!(t_down[2] - best_down >= 0.0);
    assert_eq!(f.rewards.get("up").unwrap().letter, 'S');

    // The report: columns titled by the label, charts, flat metrics named like the others.
    let report = object(&p, &cache, "report");
    let table2 = std::fs::read_to_string(report.join("tables/table2.md")).unwrap();
    assert!(table2.contains("Saturation ↑") && table2.contains("Greyness ↓"), "{table2}");
    assert!(table2.contains("1. Saturation") && table2.contains("2. Aesthetic"), "{table2}");
    let table3 = std::fs::read_to_string(report.join("tables/table3.csv")).unwrap();
    let header = table3.lines().next().unwrap();
    assert!(header.ends_with(",down,down_forgetting,up,up_forgetting"), "declared rewards after the built-in metrics, by name: {header}"); assert!(header.contains(",fid,fid_forgetting,down"), "{header}");
    assert!(std::fs::read_to_string(report.join("tables/table6.md")).unwrap().contains("Saturation ↑"));
    for chart in ["trajectory_up.png", "trajectory_up.svg", "trajectory_down.png", "forgetting.svg"] {
        assert!(report.join("charts").join(chart).is_file(), "{chart}");
    }
    let svg = std::fs::read_to_string(report.join("charts/trajectory_up.svg")).unwrap();
    assert!(svg.contains("Saturation after each task") && svg.contains("+Saturation"), "the chart titles the reward by its label");
    let flat: BTreeMap<String, f64> = read_json(&report.join("metrics.json"), "flat metrics").unwrap();
    assert_eq!(flat["eval/up/up"], record("eval/up").metrics[&up]);
    assert_eq!(flat["forgetting/rid/SA/up"], f.forgetting[&up].unwrap());
    assert!(flat.contains_key("average/rid/forgetting/up") && flat.contains_key("eval/joint/down"));
}

#[test]
fn the_cache_key_follows_the_files_content_not_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let stages = "  - id: ft\n    kind: finetune\n    params: {task: sat, method: rid}\n    inputs: {model: base}\n  - id: ft/a\n    kind: finetune\n    params: {task: aesthetic, method: rid}\n    inputs: {model: base}\n  - id: eval\n    kind: evaluate\n    inputs: {model: base}\n";
    let file = pipeline(dir.path(), &[("sat.pt", &saturation())], "  sat: {torchscript: sat.pt}", stages);
    let before = keys(&resolve(&file));
    // Renamed (and moved into a folder): the same keys.
    std::fs::create_dir(dir.path().join("rewards")).unwrap();
    std::fs::rename(dir.path().join("sat.pt"), dir.path().join("rewards/renamed.pt")).unwrap();
    let text = std::fs::read_to_string(&file).unwrap().replace("torchscript: sat.pt", "torchscript: rewards/renamed.pt");
    std::fs::write(&file, text).unwrap();
    assert_eq!(keys(&resolve(&file)), before);
    // Other bytes (another module): the stages that use the reward change, the others do not.
    std::fs::copy(fixtures("torchscript").join("clip_phrase.pt"), dir.path().join("rewards/renamed.pt")).unwrap();
    let after = keys(&resolve(&file));
    assert_ne!(after["ft"], before["ft"]);
    assert_ne!(after["eval"], before["eval"], "an evaluation reports every declared reward");
    assert_eq!(after["ft/a"], before["ft/a"], "a built-in task's fine-tune does not read the declared reward");
    assert_eq!(after["base"], before["base"]);
    // Its direction and label are part of the declaration, hence of the key.
    let text = std::fs::read_to_string(&file).unwrap().replace("rewards/renamed.pt}", "rewards/renamed.pt, direction: lower}");
    std::fs::write(&file, text).unwrap();
    let lower = keys(&resolve(&file));
    assert_ne!(lower["ft"], after["ft"]);
    // Without a declaration, the pipeline's keys are those of a pipeline that never had one.
    let plain = pipeline(dir.path(), &[], "", "  - id: ft/a\n    kind: finetune\n    params: {task: aesthetic, method: rid}\n    inputs: {model: base}\n  - id: eval\n    kind: evaluate\n    inputs: {model: base}\n");
    let text = std::fs::read_to_string(&plain).unwrap().replace("rewards:\n\n", "");
    std::fs::write(&plain, text).unwrap();
    let plain = keys(&resolve(&plain));
    assert_eq!(plain["ft/a"], before["ft/a"]);
    assert_ne!(plain["eval"], before["eval"]);
}

#[test]
fn declarations_are_refused_with_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let ft = |task: &str| format!("  - id: ft\n    kind: finetune\n    params: {{task: {task}, method: rid}}\n    inputs: {{model: base}}\n");
    let cases: Vec<(&str, String, &str)> = vec![
        ("  hps: {torchscript: sat.pt}", ft("aesthetic"), "`rewards.hps`: `hps` is a built-in reward and cannot be redeclared (built-in: aesthetic, hps, compress, pickscore)"),
        ("  pickscore: {torchscript: sat.pt}", ft("aesthetic"), "`pickscore` is a built-in reward and cannot be redeclared"),
        ("  fid: {torchscript: sat.pt}", ft("aesthetic"), "`fid` names a built-in metric or a field of `scores.jsonl`"),
        ("  sat: {torchscript: sat.pt}", ft("saturation"), "parameter `task`: unknown task `saturation` (built-in: aesthetic, hps, compress, pickscore; declared in `rewards:`: sat)"),
        ("  sat: {torchscript: sat.pt}", "  - id: j\n    kind: joint\n    params: {weights: {sat: 1, redness: 2}}\n    inputs: {model: base}\n".into(), "parameter `weights`: unknown task `redness`"),
        ("  sat: {torchscript: missing.pt}", ft("sat"), "`rewards.sat.torchscript`: reward `sat`: "),
        ("  sat: {torchscript: sat.pt, direction: up}", ft("sat"), "`rewards.sat.direction`: `direction` must be `higher` or `lower`, found `up`"),
        ("  sat: {torchscript: sat.pt}\n  sharp: {torchscript: sat.pt}", ft("sat"), "`rewards.sharp`: reward `sharp`: letter S (its letter in task orders) is `sat`'s already"),
        ("  hue: {torchscript: sat.pt}", ft("hue"), "letter H (its letter in task orders) is `hps`'s already; give it another with `letter:`"),
        ("  sat: {path: sat.pt}", ft("sat"), "unknown key `path` in reward `sat`"),
    ];
    for (rewards, stages, expected) in cases {
        let file = pipeline(dir.path(), &[("sat.pt", &saturation())], rewards, &stages);
        let message = refusal(&file);
        assert!(message.contains(expected), "{rewards}: expected `{expected}` in\n{message}");
        assert!(message.contains("p.yaml:"), "the message names the file and line: {message}");
    }
    // A missing file: refused to run, recorded to plan.
    let file = pipeline(dir.path(), &[], "  sat: {torchscript: missing.pt}", &ft("sat"));
    assert!(refusal(&file).contains("missing.pt does not exist"), "{}", refusal(&file));
    let planned = load_for_plan(&file, &registry().schemas(), &[]).unwrap();
    let stage = planned.stages.iter().find(|s| s.id == "ft").unwrap();
    assert_eq!(stage.missing_files[0].param, "rewards.sat");
    assert_eq!(keys(&planned).len(), 2, "a plan is made with the file missing");
}

/// One fixture module per way a TorchScript reward can be wrong (tests/parity/fixtures_torchscript.py).
const BAD: [(&str, &str); 5] = [
    ("not_ts_text.pt", "not a TorchScript archive"),
    ("signature_prompt_is_str.pt", "wrong signature"),
    ("output_keepdim.pt", "wrong output"),
    ("nonfinite_nan.pt", "non-finite scores"),
    ("nondiff_detached.pt", "not differentiable in the images"),
];

#[test]
fn a_wrong_module_is_refused_at_validation_and_when_the_stage_starts_and_nothing_is_cached() {
    for (case, expected) in BAD {
        let dir = tempfile::tempdir().unwrap();
        let stages = "  - id: ft\n    kind: finetune\n    params: {task: bad, method: rid}\n    inputs: {model: base}\n  - id: eval\n    kind: evaluate\n    inputs: {model: base}\n";
        let file = pipeline(dir.path(), &[("bad.pt", &fixtures("torchscript").join(case))], "  bad: {torchscript: bad.pt}", stages);
        let p = resolve(&file);
        let at_validation = check_declared(&p).unwrap_err().to_string();
        assert!(at_validation.contains(expected) && at_validation.contains("bad.pt") && at_validation.contains("declared reward `bad`"), "{case}: {at_validation}");
        // Run without the validation: each stage that uses it refuses it when it starts.
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(cache_dir.path());
        let summary = run(&p, &registry(), &cache, &RunOptions { keep_going: true, ..RunOptions::default() }).unwrap();
        let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
        for id in ["ft", "eval"] {
            match &summary.outcomes.iter().find(|o| o.id == id).unwrap().outcome {
                Outcome::Failed { error, .. } => assert!(error.contains(expected) && error.contains("bad.pt"), "{case} {id}: {error}"),
                other => panic!("{case} {id}: expected a refusal, got {other:?}"),
            }
            let key = &pl.stages.iter().find(|s| s.stage.id == id).unwrap().key;
            assert!(!cache.object_dir(key).unwrap().exists(), "{case} {id}: nothing is cached");
        }
    }
}

#[test]
fn the_example_pipeline_declares_a_usable_reward() {
    let file = repo().join("pipelines/examples/custom_reward.yaml");
    let p = resolve(&file);
    assert_eq!(check_declared(&p).unwrap(), 1);
    let ft = p.stages.iter().find(|s| s.id == "ft/rid/SA/1").unwrap();
    assert_eq!(ft.params["task"], "saturation");
    assert_eq!(ft.rewards["saturation"].torchscript, saturation().canonicalize().unwrap());
    assert_eq!(ft.rewards["saturation"].letter, 'S');
    let aesthetic = p.stages.iter().find(|s| s.id == "ft/rid/AS/1").unwrap();
    assert!(aesthetic.rewards.is_empty(), "a built-in task's fine-tune takes no declared reward");
    assert!(p.stages.iter().filter(|s| s.kind == "evaluate").all(|s| s.rewards.contains_key("saturation")));
    assert_eq!(p.stages.iter().find(|s| s.id == "joint").unwrap().rewards.len(), 1);
}

#[test]
fn pickscore_is_a_task_and_a_metric_of_a_world_that_names_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = fixtures("pickscore").join("pickscore_small");
    let text = format!(
        r#"
defaults:
  finetune: {{epochs: 1, prompts_per_epoch: 4, batch_size: 2, lr: 1.0e-2, ddim_steps: 3, guidance: 2.0, lora_rank: 2}}
  evaluate: {{images_per_prompt: 2, ddim_steps: 3, guidance: 2.0, batch_size: 4}}
stages:
  - id: base
    kind: tiny_world
    params: {{root: "{root}", pickscore: "{folder}"}}
  - id: plain
    kind: tiny_world
    params: {{root: "{root}"}}
  - id: ft
    kind: finetune
    params: {{task: pickscore, method: baseline}}
    inputs: {{model: base}}
  - id: ft/plain
    kind: finetune
    params: {{task: pickscore, method: baseline}}
    inputs: {{model: plain}}
  - id: eval/${{model}}
    kind: evaluate
    matrix: {{model: [base, ft, plain]}}
    inputs: {{model: "${{model}}"}}
"#,
        root = crate::support::world("random").display(),
        folder = folder.display()
    );
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, text).unwrap();
    let p = resolve(&file);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let summary = run(&p, &registry(), &cache, &RunOptions { keep_going: true, ..RunOptions::default() }).unwrap();
    let outcome = |id: &str| &summary.outcomes.iter().find(|o| o.id == id).unwrap().outcome;
    for id in ["base", "ft", "eval/base", "eval/ft", "eval/plain"] {
        assert!(matches!(outcome(id), Outcome::Executed { .. }), "{id}: {:?}", outcome(id));
    }
    match outcome("ft/plain") {
        Outcome::Failed { error, .. } => assert!(error.contains("names no PickScore folder"), "{error}"),
        other => panic!("a world without PickScore cannot train on it: {other:?}"),
    }
    let record = |id: &str| EvaluationRecord::read(&object(&p, &cache, id).join("metrics.json")).unwrap();
    let (base, tuned) = (record("eval/base"), record("eval/ft"));
    assert!(base.metrics[&Metric::PickScore].is_finite());
    assert_ne!(tuned.metrics[&Metric::PickScore], base.metrics[&Metric::PickScore], "the fine-tune moved the model");
    assert_eq!(tuned.tasks, vec![Task::PickScore]);
    assert!(!record("eval/plain").metrics.contains_key(&Metric::PickScore), "a world without PickScore does not report it");
    // The other metrics do not depend on whether the world has PickScore.
    for (m, v) in &record("eval/plain").metrics {
        assert_eq!(base.metrics[m], *v, "{m:?}");
    }
    let scores = std::fs::read_to_string(object(&p, &cache, "eval/base").join("scores.jsonl")).unwrap();
    let values: Vec<f64> = scores.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["pickscore"].as_f64().unwrap()).collect();
    assert!((values.iter().sum::<f64>() / values.len() as f64 - base.metrics[&Metric::PickScore]).abs() < 1e-12);
    // The folder is in the key of the world that names it only.
    let keys = keys(&p);
    assert_ne!(keys["base"], keys["plain"]);
}

#[test]
fn a_declared_path_may_use_variables() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rewards")).unwrap();
    std::fs::copy(saturation(), dir.path().join("rewards/sat.pt")).unwrap();
    let stages = "  - id: ft\n    kind: finetune\n    params: {task: sat, method: rid}\n    inputs: {model: base}\n";
    let file = pipeline(dir.path(), &[], "  sat: {torchscript: \"${where}/sat.pt\"}", stages);
    let text = std::fs::read_to_string(&file).unwrap().replace("rewards:\n", "vars:\n  where: rewards\nrewards:\n");
    std::fs::write(&file, text).unwrap();
    let p = resolve(&file);
    let ft = p.stages.iter().find(|s| s.id == "ft").unwrap();
    assert_eq!(ft.rewards["sat"].torchscript, dir.path().join("rewards/sat.pt").canonicalize().unwrap());
    let text = std::fs::read_to_string(&file).unwrap().replace("${where}", "${nowhere}");
    std::fs::write(&file, text).unwrap();
    assert!(refusal(&file).contains("`rewards.sat.torchscript`"), "{}", refusal(&file));
}

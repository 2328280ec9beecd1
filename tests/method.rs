//! The method's stage kinds end to end on a miniature random world (saved by diffusers and
//! transformers themselves, `tests/parity/fixtures_world.py`): what the paper's method promises
//! must hold for the real stages, not only for the functions inside them.
use std::path::{Path, PathBuf};

use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::plan;
use ril_pipe::exec::launch::Outcome;
use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::method::checkpoint::Checkpoint;
use ril_pipe::pipeline::{load_resolved, Override, ResolvedPipeline};
use ril_pipe::records::{EvaluationRecord, Metric, TrainLogLine};
use ril_pipe::stages::registry;
use crate::support::{object, tensors, world};

/// Fine-tunes of a few steps on the random world: cheap, and enough to move the adapters.
fn pipeline(dir: &Path, world_name: &str, stages: &str) -> PathBuf {
    let text = format!(
        r#"
vars:
  root: {root}
defaults:
  finetune: {{epochs: 1, prompts_per_epoch: 4, batch_size: 2, micro_batch: 1, lr: 1.0e-2, ddim_steps: 3, guidance: 2.0, lora_rank: 2, checkpoint_every: 1}}
  joint: {{epochs: 1, prompts_per_epoch: 4, batch_size: 2, lr: 1.0e-2, ddim_steps: 3, guidance: 2.0, lora_rank: 2}}
  evaluate: {{images_per_prompt: 2, ddim_steps: 3, guidance: 2.0, batch_size: 4, grid_prompts: 4}}
stages:
  - id: base
    kind: tiny_world
    params: {{root: "${{root}}"}}
{stages}"#,
        root = world(world_name).display()
    );
    let path = dir.join("p.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn resolve(file: &Path, sets: &[&str]) -> ResolvedPipeline {
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    load_resolved(file, &registry().schemas(), &overrides).unwrap()
}

fn run_all(p: &ResolvedPipeline, cache: &Cache) -> ril_pipe::exec::RunSummary {
    let summary = run(p, &registry(), cache, &RunOptions::default()).unwrap();
    for o in &summary.outcomes {
        if let Outcome::Failed { error, log } = &o.outcome {
            let log = log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
            panic!("stage {} failed: {error}\n{log}", o.id);
        }
    }
    summary
}

const CHAIN: &str = r#"
  - id: ft/${method}/${step}
    kind: finetune
    matrix: {method: [baseline, rid]}
    chain: {over: [aesthetic, compress], as: task, link: model, first: base}
    params: {task: "${task}", method: "${method}"}
"#;

#[test]
fn only_the_newest_adapter_trains_and_earlier_ones_stay_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let p = resolve(&pipeline(dir.path(), "random", CHAIN), &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    run_all(&p, &cache);
    for method in ["baseline", "rid"] {
        let first = tensors(&object(&p, &cache, &format!("ft/{method}/1")).join("adapters.safetensors"));
        let second = tensors(&object(&p, &cache, &format!("ft/{method}/2")).join("adapters.safetensors"));
        let adapter0: Vec<&String> = first.keys().filter(|k| k.contains(".lora_A.0.") || k.contains(".lora_B.0.")).collect();
        assert!(!adapter0.is_empty());
        for name in &adapter0 {
            assert!(first[*name].equal(&second[*name]), "{method}: {name} changed in the second task");
        }
        // The second task's adapter moved away from its initialisation (B starts at zero).
        let b1: Vec<&String> = second.keys().filter(|k| k.contains(".lora_B.1.")).collect();
        assert!(!b1.is_empty());
        assert!(b1.iter().any(|k| second[*k].abs().sum(tch::Kind::Float).double_value(&[]) > 0.0), "{method}: adapter 1 did not train");
        let scales = &second["lora_scales"];
        assert_eq!(scales.size(), vec![2]);
        // The record tracks the sequence.
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(object(&p, &cache, &format!("ft/{method}/2")).join("model.json")).unwrap()).unwrap();
        assert_eq!(record["tasks"], serde_json::json!(["aesthetic", "compress"]));
    }
    // RID writes its EMA teacher and logs the distillation term; the baseline does neither.
    let rid = object(&p, &cache, "ft/rid/1");
    assert!(rid.join("teacher.safetensors").exists());
    assert!(!object(&p, &cache, "ft/baseline/1").join("teacher.safetensors").exists());
    let log: Vec<TrainLogLine> = std::fs::read_to_string(rid.join("train_log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|l| l.distill_loss.is_some() && l.reward.is_finite() && l.grad_norm.is_finite()));
    // The first step's student equals its teacher: the distance starts at exactly zero.
    assert_eq!(log[0].distill_loss, Some(0.0));
    assert!(log[1].distill_loss.unwrap() > 0.0);
}

#[test]
fn each_task_draws_its_own_numbers_and_a_rerun_repeats_them() {
    // lr 0: the adapters stay at their initialisation, which comes from the stage's streams.
    let stages = r#"
  - id: ft/${step}
    kind: finetune
    chain: {over: [aesthetic, aesthetic], as: task, link: model, first: base}
    params: {task: "${task}", method: baseline, lr: 0.0, weight_decay: 0.0}
"#;
    let dir = tempfile::tempdir().unwrap();
    let p = resolve(&pipeline(dir.path(), "random", stages), &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    run_all(&p, &cache);
    let second = tensors(&object(&p, &cache, "ft/2").join("adapters.safetensors"));
    let (a0, a1): (Vec<_>, Vec<_>) = (second.iter().filter(|(k, _)| k.contains(".lora_A.0.")).collect(), second.iter().filter(|(k, _)| k.contains(".lora_A.1.")).collect());
    assert!(!a0.is_empty() && a0.len() == a1.len());
    for ((n0, t0), (_, t1)) in a0.iter().zip(&a1) {
        assert!(!t0.equal(t1), "{n0}: the second task's adapter starts where the first one's did");
    }
    let log = |id: &str| std::fs::read_to_string(object(&p, &cache, id).join("train_log.jsonl")).unwrap();
    assert_ne!(log("ft/1"), log("ft/2"), "the same prompts and noise in both tasks");
    // A rerun of the same stage (a fresh cache) draws the same numbers: bitwise the same adapters.
    let again_dir = tempfile::tempdir().unwrap();
    let again = Cache::new(again_dir.path());
    run_all(&p, &again);
    let rerun = std::fs::read(object(&p, &again, "ft/2").join("adapters.safetensors")).unwrap();
    assert_eq!(rerun, std::fs::read(object(&p, &cache, "ft/2").join("adapters.safetensors")).unwrap());
}

#[test]
fn a_shared_adapter_keeps_training_one_lora_across_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let stages = CHAIN.replace(r#"method: "${method}"}"#, r#"method: "${method}", adapter: shared}"#);
    let p = resolve(&pipeline(dir.path(), "random", &stages), &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    run_all(&p, &cache);
    for method in ["baseline", "rid"] {
        let first = tensors(&object(&p, &cache, &format!("ft/{method}/1")).join("adapters.safetensors"));
        let second = tensors(&object(&p, &cache, &format!("ft/{method}/2")).join("adapters.safetensors"));
        // One adapter after both tasks, and the second task moved it.
        assert_eq!(second["lora_scales"].size(), vec![1], "{method}");
        assert!(!second.keys().any(|k| k.contains(".lora_A.1.")), "{method}: a second adapter was added");
        let moved = first.keys().filter(|k| k.contains(".lora_B.0.")).any(|k| !first[k].equal(&second[k]));
        assert!(moved, "{method}: the shared adapter did not train in the second task");
    }
}

#[test]
fn rid_with_lambda_zero_equals_the_baseline_and_reruns_are_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let stages = r#"
  - id: baseline
    kind: finetune
    inputs: {model: base}
    params: {task: hps, method: baseline}
  - id: rid0
    kind: finetune
    inputs: {model: base}
    params: {task: hps, method: rid, lambda: 0.0}
"#;
    let p = resolve(&pipeline(dir.path(), "random", stages), &[]);
    let (c1, c2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cache1, cache2) = (Cache::new(c1.path()), Cache::new(c2.path()));
    run_all(&p, &cache1);
    let base = tensors(&object(&p, &cache1, "baseline").join("adapters.safetensors"));
    let rid0 = tensors(&object(&p, &cache1, "rid0").join("adapters.safetensors"));
    let student: Vec<&String> = base.keys().filter(|k| !k.contains("teacher")).collect();
    for name in &student {
        assert!(base[*name].equal(&rid0[*name]), "{name} differs between baseline and RID with lambda 0");
    }
    // Same seed, same machine, another cache: the same bytes.
    run_all(&p, &cache2);
    for id in ["baseline", "rid0"] {
        let a = std::fs::read(object(&p, &cache1, id).join("adapters.safetensors")).unwrap();
        let b = std::fs::read(object(&p, &cache2, id).join("adapters.safetensors")).unwrap();
        assert_eq!(a, b, "{id} is not reproducible");
    }
}

#[test]
fn an_interrupted_finetune_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let stages = "  - id: ft\n    kind: finetune\n    inputs: {model: base}\n    params: {task: aesthetic, method: rid, prompts_per_epoch: 12}\n";
    let p = resolve(&pipeline(dir.path(), "random", stages), &[]);
    let whole = tempfile::tempdir().unwrap();
    run_all(&p, &Cache::new(whole.path()));

    let broken = tempfile::tempdir().unwrap();
    let cache = Cache::new(broken.path());
    let opts = RunOptions::default();
    let cancel = opts.cancel.clone();
    // Stop the run once the fine-tune has checkpointed its third step.
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    let partial = cache.partial_dir(&pl.stages[1].key).unwrap().join("checkpoint.safetensors");
    let watcher = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(300) {
            if Checkpoint::saved_step(&partial) >= Some(3) {
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    });
    let first = run(&p, &registry(), &cache, &opts).unwrap();
    assert!(watcher.join().unwrap());
    assert!(first.cancelled);
    let summary = run_all(&p, &cache);
    assert_eq!(summary.executed(), 1);
    let log = std::fs::read_to_string(object(&p, &cache, "ft").join("log.txt")).unwrap();
    assert!(log.contains("resumed at step"), "{log}");
    let a = tensors(&object(&p, &Cache::new(whole.path()), "ft").join("adapters.safetensors"));
    let b = tensors(&object(&p, &cache, "ft").join("adapters.safetensors"));
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after resuming");
    }
}

#[test]
fn a_non_finite_reward_stops_the_stage_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stages = "  - id: ft\n    kind: finetune\n    inputs: {model: base}\n    params: {task: aesthetic, method: baseline}\n";
    let p = resolve(&pipeline(dir.path(), "nan_head", stages), &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let summary = run(&p, &registry(), &cache, &RunOptions::default()).unwrap();
    let ft = summary.outcomes.iter().find(|o| o.id == "ft").unwrap();
    match &ft.outcome {
        Outcome::Failed { error, .. } => assert!(error.contains("non-finite") && error.contains("step 1"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    assert!(!cache.object_dir(&pl.stages[1].key).unwrap().exists());
}

#[test]
fn evaluation_soup_joint_and_forgetting_run_as_the_paper_defines_them() {
    let dir = tempfile::tempdir().unwrap();
    let stages = r#"
  - id: ft/${task}
    kind: finetune
    matrix: {task: [aesthetic, hps, compress]}
    inputs: {model: base}
    params: {task: "${task}", method: baseline}
  - id: seq/${step}
    kind: finetune
    chain: {over: [aesthetic, hps], as: task, link: model, first: base}
    params: {task: "${task}", method: rid}
  - id: soup
    kind: soup
    inputs: {models: [ft/aesthetic, ft/hps, ft/compress]}
  - id: joint
    kind: joint
    inputs: {model: base}
  - id: eval/base
    kind: evaluate
    inputs: {model: base}
  - id: eval/again
    kind: evaluate
    inputs: {model: base}
    params: {batch_size: 3}
  - id: eval/seq/${step}
    kind: evaluate
    matrix: {step: [1, 2]}
    inputs: {model: "seq/${step}"}
  - id: eval/soup
    kind: evaluate
    inputs: {model: soup}
  - id: eval/joint
    kind: evaluate
    inputs: {model: joint}
  - id: forgetting
    kind: forgetting
    inputs: {evals: [eval/base, "eval/seq/*"]}
"#;
    let p = resolve(&pipeline(dir.path(), "random", stages), &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    run_all(&p, &cache);
    let record = |id: &str| EvaluationRecord::read(&object(&p, &cache, id).join("metrics.json")).unwrap();
    let base = record("eval/base");
    assert_eq!(base.metrics.len(), 6);
    assert!(base.metrics.values().all(|v| v.is_finite()));
    assert_eq!((base.prompts, base.images_per_prompt), (4, 2));
    assert!(base.metrics[&Metric::PngKb] > 0.0 && base.metrics[&Metric::JpegKb] > 0.0);
    // The initial noise depends on (seed, prompt, image) only: batching changes nothing but the
    // float rounding of batched matrix products, which can move a pixel by one level of 255 and
    // a file by a byte or two. Scores within 1e-4; file sizes within 2 bytes per image.
    let again = record("eval/again");
    for (m, v) in &base.metrics {
        let tolerance = match m {
            Metric::PngKb | Metric::JpegKb => 2e-3,
            _ => 1e-4 * v.abs().max(1.0),
        };
        assert!((v - again.metrics[m]).abs() <= tolerance, "{m:?}: {v} vs {}", again.metrics[m]);
    }
    assert!(object(&p, &cache, "eval/base").join("grid.png").exists());
    let scores = std::fs::read_to_string(object(&p, &cache, "eval/base").join("scores.jsonl")).unwrap();
    assert_eq!(scores.lines().count(), 8);
    assert_eq!(record("eval/seq/2").tasks.len(), 2);
    assert_eq!(record("eval/soup").origin, "soup");
    assert_eq!(record("eval/joint").origin, "joint");

    // The soup's adapters are the members' adapters, each scaled by 1/3.
    let soup = tensors(&object(&p, &cache, "soup").join("adapters.safetensors"));
    let scales: Vec<f64> = Vec::<f64>::try_from(&soup["lora_scales"]).unwrap();
    assert_eq!(scales.len(), 3);
    assert!(scales.iter().all(|s| (s - 1.0 / 3.0).abs() < 1e-12), "{scales:?}");
    for (i, member) in ["ft/aesthetic", "ft/hps", "ft/compress"].iter().enumerate() {
        let m = tensors(&object(&p, &cache, member).join("adapters.safetensors"));
        for (name, t) in m.iter().filter(|(n, _)| n.contains(".lora_A.0.") || n.contains(".lora_B.0.")) {
            let soup_name = name.replace(".lora_A.0.", &format!(".lora_A.{i}.")).replace(".lora_B.0.", &format!(".lora_B.{i}."));
            assert!(t.equal(&soup[&soup_name]), "{soup_name}");
        }
    }

    let f: serde_json::Value = serde_json::from_slice(&std::fs::read(object(&p, &cache, "forgetting").join("forgetting.json")).unwrap()).unwrap();
    assert!(f["forgetting"]["fid"].is_number() && f["forgetting"]["clip_score"].is_number());
    assert!(f["forgetting"]["aesthetic"].is_number(), "the first task's target, with a later task: reported");
    assert!(f["forgetting"]["hps"].is_null(), "the last task's target: \"-\"");
    assert_eq!(f["trajectory"]["fid"].as_array().unwrap().len(), 3);
}

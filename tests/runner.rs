//! The runner end to end with test-only kinds: expansion, validation messages, cache keys,
//! atomic commits, resume after a killed run, locking, plan's reasons, gc.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::{plan, Status};
use ril_pipe::exec::launch::Outcome;
use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::pipeline::{load_resolved, Override, PipelineError, ResolvedPipeline};
use crate::support::{executions, registry, write_pipeline};
use crate::support::wait_for;

fn resolve(file: &Path, sets: &[&str]) -> Result<ResolvedPipeline, PipelineError> {
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    load_resolved(file, &registry().schemas(), &overrides)
}

fn run_quiet(p: &ResolvedPipeline, cache: &Cache) -> ril_pipe::exec::RunSummary {
    run(p, &registry(), cache, &RunOptions::default()).unwrap()
}

/// The first diagnostic of an invalid pipeline as "line:col: message".
fn first_error(file: &Path) -> String {
    let err = resolve(file, &[]).unwrap_err();
    let d = err.diagnostics().first().unwrap_or_else(|| panic!("no diagnostics: {err}"));
    let p = d.position.unwrap();
    format!("{}:{}: {}", p.line, p.column, d.message)
}

const ORDERS: &str = r#"
name: orders
vars:
  orders: [AB, BA, AC]
  text: {A: "a", B: "b", C: "c"}
stages:
  - id: base
    kind: write
    params: {text: "base;"}
  - id: ft/${order}/${step}
    kind: write
    matrix: {order: "${orders}"}
    chain: {over: "${order}", as: task, link: deps, first: base}
    params: {text: "${text.${task}}"}
  - id: eval/${order}/${step}
    kind: write
    matrix: {order: "${orders}", step: [1, 2]}
    inputs: {deps: "ft/${order}/${step}"}
    params: {text: "eval:"}
  - id: summary
    kind: write
    inputs: {deps: ["eval/**"]}
"#;

#[test]
fn matrix_and_chain_expand_and_identical_stages_merge() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", ORDERS);
    let p = resolve(&file, &[]).unwrap();
    // base + 3 orders x 2 steps + 6 evals + summary
    assert_eq!(p.stages.len(), 14);
    let ft = p.stages.iter().find(|s| s.id == "ft/BA/2").unwrap();
    assert_eq!(ft.inputs["deps"], vec!["ft/BA/1"]);
    assert_eq!(ft.params["text"], "a");
    assert_eq!(ft.meta["task"], "A");
    assert_eq!(ft.meta["order"], "BA");
    let summary = p.stages.iter().find(|s| s.id == "summary").unwrap();
    assert_eq!(summary.inputs["deps"].len(), 6);
    // Dependencies come first.
    let pos = |id: &str| p.stages.iter().position(|s| s.id == id).unwrap();
    assert!(pos("base") < pos("ft/AB/1") && pos("ft/AB/1") < pos("ft/AB/2") && pos("ft/AB/2") < pos("eval/AB/2"));

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    // AB/1 and AC/1 are the same stage (same text, same input): one object.
    let ac1 = pl.stages.iter().find(|s| s.stage.id == "ft/AC/1").unwrap();
    assert_eq!(ac1.same_as.as_deref(), Some("ft/AB/1"));
    // eval/AB/1 and eval/AC/1 then merge too.
    assert_eq!(pl.unique().count(), 14 - 2);
    assert!(!cache_dir.path().join("objects").exists(), "plan writes nothing");

    let summary = run_quiet(&p, &cache);
    assert!(summary.ok());
    assert_eq!(summary.executed(), 12);
    let out = std::fs::read_to_string(cache.object_dir(&pl.stages.iter().find(|s| s.stage.id == "ft/BA/2").unwrap().key).unwrap().join("out.txt")).unwrap();
    assert_eq!(out, "abbase;");
    // Second run: nothing executes.
    let again = run_quiet(&p, &cache);
    assert_eq!((again.executed(), again.cached()), (0, 12));
}

#[test]
fn validation_errors_name_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, text: &str| first_error(&write_pipeline(dir.path(), name, text));

    let e = case("unknown_key.yaml", "stages:\n  - id: a\n    kind: write\n    parms: {text: x}\n");
    assert!(e.starts_with("4:5: unknown key `parms` in a stage"), "{e}");
    assert!(e.contains("did you mean `params`?"), "{e}");

    let e = case("unknown_kind.yaml", "stages:\n  - id: a\n    kind: wrte\n");
    assert!(e.starts_with("3:11: unknown stage kind `wrte`") && e.contains("did you mean `write`"), "{e}");

    let e = case("dangling.yaml", "stages:\n  - id: a\n    kind: write\n  - id: b\n    kind: write\n    inputs:\n      deps: [a, c]\n");
    assert!(e.starts_with("7:13: stage `b`: input `deps` refers to unknown stage `c`"), "{e}");

    let e = case("cycle.yaml", "stages:\n  - id: a\n    kind: write\n    inputs: {deps: b}\n  - id: b\n    kind: write\n    inputs: {deps: a}\n");
    assert!(e.starts_with("4:13: stages form a cycle: a -> b -> a"), "{e}");

    let e = case("type.yaml", "stages:\n  - id: a\n    kind: write\n    params:\n      steps: many\n");
    assert!(e.starts_with("5:14: stage `a`: parameter `steps`: expected an integer, found string `\"many\"`"), "{e}");

    let e = case("range.yaml", "stages:\n  - id: a\n    kind: write\n    params:\n      steps: 0\n");
    assert!(e.starts_with("5:14: stage `a`: parameter `steps`: expected a value >= 1, found 0"), "{e}");

    let e = case("range_default.yaml", "defaults: {write: {rate: -1}}\nstages:\n  - id: a\n    kind: write\n");
    assert!(e.starts_with("1:26: stage `a`: parameter `rate`: expected a value in [0, 10], found -1.0"), "{e}");

    let e = case("enum.yaml", "stages:\n  - id: a\n    kind: write\n    params: {mode: c}\n");
    assert!(e.starts_with("4:20: stage `a`: parameter `mode`: expected one of a, b, found string `\"c\"`"), "{e}");
    assert!(!e.contains("did you mean"), "no suggestion for one-letter words: {e}");

    let e = case("file.yaml", "stages:\n  - id: a\n    kind: write\n    params: {data: no/such/file.bin}\n");
    assert!(e.starts_with("4:20: stage `a`: parameter `data`:") && e.contains("does not exist"), "{e}");

    let e = case("var.yaml", "vars: {x: 1}\nstages:\n  - id: a\n    kind: write\n    params: {text: \"${y}\"}\n");
    assert!(e.starts_with("5:20: unknown variable `y` (known: x)"), "{e}");

    let e = case("dup.yaml", "stages:\n  - id: a\n    kind: write\n  - id: a\n    kind: write\n");
    assert!(e.starts_with("4:9: stage id `a` is also produced by stages[0]"), "{e}");

    let e = case("top.yaml", "stagez: []\n");
    assert!(e.starts_with("1:1: unknown key `stagez` in the pipeline"), "{e}");

    // Syntax errors carry the parser's position.
    let file = write_pipeline(dir.path(), "syntax.yaml", "stages:\n  - id: a\n   kind: [\n");
    match resolve(&file, &[]).unwrap_err() {
        PipelineError::Syntax { line, .. } => assert!(line >= 2),
        other => panic!("expected a syntax error, got {other}"),
    }
}

#[test]
fn huge_matrices_are_refused_before_expanding() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("vars:\n  ten: [0,1,2,3,4,5,6,7,8,9]\nstages:\n  - id: s/${a}${b}${c}${d}${e}\n    kind: write\n    matrix:\n");
    for v in ["a", "b", "c", "d", "e"] {
        text.push_str(&format!("      {v}: \"${{ten}}\"\n"));
    }
    let e = first_error(&write_pipeline(dir.path(), "huge.yaml", &text));
    assert!(e.contains("more than 10000 combinations"), "{e}");
}

#[test]
fn overrides_reach_variables_defaults_and_stages() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", ORDERS);
    let p = resolve(&file, &["vars.text.A=z", "ft/*/1.steps=3", "defaults.write.rate=2"]).unwrap();
    let s = |id: &str| p.stages.iter().find(|s| s.id == id).unwrap().clone();
    assert_eq!(s("ft/AB/1").params["text"], "z");
    assert_eq!(s("ft/AB/1").params["steps"], 3);
    assert_eq!(s("ft/AB/2").params["steps"], 1);
    assert_eq!(s("base").params["rate"], 2.0);
    for bad in ["vars.nope=1", "nothing/*.steps=1", "base.nosuch=1", "defaults.write.x=1"] {
        let err = resolve(&file, &[bad]).unwrap_err();
        assert!(matches!(err, PipelineError::Override { .. }), "{bad}: {err}");
    }
    let err = resolve(&file, &["ft/AB/1.steps=lots"]).unwrap_err();
    assert!(err.to_string().contains("expected an integer"), "{err}");
    let err = resolve(&file, &["ft/AB/1.steps=0"]).unwrap_err();
    assert!(err.to_string().contains("parameter `steps`: expected a value >= 1, found 0"), "{err}");
}

#[test]
fn a_changed_parameter_changes_exactly_the_downstream_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", ORDERS);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let keys = |sets: &[&str]| -> std::collections::BTreeMap<String, String> {
        let p = resolve(&file, sets).unwrap();
        plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap().stages.into_iter().map(|s| (s.stage.id, s.key)).collect()
    };
    let before = keys(&[]);
    let after = keys(&["ft/BA/1.rate=0.25"]);
    let changed: Vec<&String> = before.keys().filter(|id| before[*id] != after[*id]).collect();
    assert_eq!(changed, vec!["eval/BA/1", "eval/BA/2", "ft/BA/1", "ft/BA/2", "summary"]);
    // Relabelling is not a change of content: the same parameters give the same keys.
    assert_eq!(keys(&[]), before);
}

#[test]
fn plan_says_why_a_stage_must_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", ORDERS);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let fresh = resolve(&file, &[]).unwrap();
    let first = plan(&fresh, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    assert_eq!(first.stages[0].why, vec!["new stage: never run"]);
    run_quiet(&fresh, &cache);

    let changed = resolve(&file, &["base.text=other;"]).unwrap();
    let pl = plan(&changed, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    let why = |id: &str| pl.stages.iter().find(|s| s.stage.id == id).unwrap().why.join("; ");
    assert_eq!(why("base"), "param text: \"base;\" -> \"other;\"");
    assert_eq!(why("ft/AB/1"), "input deps changed upstream: base");
    assert_eq!(why("ft/AC/1"), "same as ft/AB/1");
    assert!(pl.stages.iter().all(|s| s.status != Status::Hit));

    // An object removed from the cache is explained as such.
    let unchanged = plan(&fresh, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    let base_key = &unchanged.stages[0].key;
    cache.remove_object(base_key).unwrap();
    let after_rm = plan(&fresh, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    assert!(after_rm.stages[0].why[0].starts_with("not in the cache"), "{:?}", after_rm.stages[0].why);
    assert_eq!(after_rm.stages[1].status, Status::Hit, "downstream results stay valid");
}

#[test]
fn external_files_enter_the_key_by_content() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), b"v1").unwrap();
    let file = write_pipeline(dir.path(), "f.yaml", "stages:\n  - id: a\n    kind: write\n    params: {data: w.bin}\n");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let key = || plan(&resolve(&file, &[]).unwrap(), &registry(), &cache, &FileHasher::ephemeral()).unwrap().stages[0].key.clone();
    let k1 = key();
    run_quiet(&resolve(&file, &[]).unwrap(), &cache);
    std::fs::write(dir.path().join("w.bin"), b"v2").unwrap();
    assert_ne!(key(), k1);
    let pl = plan(&resolve(&file, &[]).unwrap(), &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    assert_eq!(pl.stages[0].why.len(), 1, "{:?}", pl.stages[0].why);
    assert!(pl.stages[0].why[0].contains("w.bin: content changed"), "{:?}", pl.stages[0].why);
    std::fs::write(dir.path().join("w.bin"), b"v1").unwrap();
    assert_eq!(key(), k1);
}

#[test]
fn failures_and_panics_leave_nothing_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "fail.yaml",
        "stages:\n  - id: good\n    kind: write\n  - id: bad\n    kind: write\n    params: {fail: true}\n  - id: boom\n    kind: write\n    params: {panic: true, text: x}\n  - id: after_bad\n    kind: write\n    inputs: {deps: bad}\n",
    );
    let p = resolve(&file, &[]).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let opts = RunOptions {
        keep_going: true,
        ..RunOptions::default()
    };
    let summary = run(&p, &registry(), &cache, &opts).unwrap();
    let outcome = |id: &str| summary.outcomes.iter().find(|o| o.id == id).unwrap().outcome.clone();
    assert!(matches!(outcome("good"), Outcome::Executed { .. }));
    match outcome("bad") {
        Outcome::Failed { error, log } => {
            assert_eq!(error, "asked to fail");
            let log = std::fs::read_to_string(log.unwrap()).unwrap();
            assert!(log.contains("error: asked to fail"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(outcome("boom"), Outcome::Failed { error, .. } if error.contains("panic")));
    assert!(matches!(outcome("after_bad"), Outcome::Skipped { reason } if reason.contains("bad")));
    assert_eq!(cache.list_objects().unwrap().len(), 1, "only the good stage is stored");
    let tmp: Vec<_> = std::fs::read_dir(cache_dir.path().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no temporary folder is left behind");

    // Without --keep-going the run stops at the first failure.
    let stop = run(&p, &registry(), &cache, &RunOptions::default()).unwrap();
    assert!(!stop.ok());
}

#[test]
fn damaged_objects_are_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", ORDERS);
    let p = resolve(&file, &[]).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    run_quiet(&p, &cache);
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    let key = pl.stages.iter().find(|s| s.stage.id == "ft/AB/1").unwrap().key.clone();
    std::fs::write(cache.object_dir(&key).unwrap().join("out.txt"), b"truncated").unwrap();
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    let st = pl.stages.iter().find(|s| s.stage.id == "ft/AB/1").unwrap();
    assert!(matches!(&st.status, Status::Corrupt(r) if r.contains("bytes")), "{:?}", st.status);
    let summary = run_quiet(&p, &cache);
    assert_eq!(summary.executed(), 1);
    assert!(cache.verify(&key).unwrap().is_ok());
}

#[test]
fn cancellation_stops_the_run_and_keeps_finished_stages() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "slow.yaml",
        "stages:\n  - id: quick\n    kind: write\n  - id: slow\n    kind: write\n    params: {steps: 200, sleep_ms: 10}\n    inputs: {deps: quick}\n",
    );
    let p = resolve(&file, &[]).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let opts = RunOptions::default();
    let cancel = opts.cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.store(true, Ordering::SeqCst);
    });
    let summary = run(&p, &registry(), &cache, &opts).unwrap();
    assert!(summary.cancelled);
    assert_eq!(summary.executed(), 1);
    // The interrupted stage left a checkpoint; the next run resumes from it.
    let again = run_quiet(&p, &cache);
    assert_eq!((again.executed(), again.cached()), (1, 1));
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    let slow = cache.object_dir(&pl.stages[1].key).unwrap();
    let resumed: u64 = std::fs::read_to_string(slow.join("resumed.txt")).unwrap().parse().unwrap();
    assert!(resumed > 0 && resumed < 200, "resumed at {resumed}");
    assert!(!cache.partial_dir(&pl.stages[1].key).unwrap().exists());
}

/// Re-runs this test binary as a separate process that runs one pipeline (see `child_entry`).
fn spawn_child(pipeline: &Path, cache: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "runner::child_entry", "--ignored", "--nocapture", "--test-threads=1"])
        .env("RIL_TEST_CHILD_PIPELINE", pipeline)
        .env("RIL_TEST_CHILD_CACHE", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Not a test of its own: the body of the child processes of the tests below.
#[test]
#[ignore]
fn child_entry() {
    let (Some(pipeline), Some(cache)) = (std::env::var_os("RIL_TEST_CHILD_PIPELINE"), std::env::var_os("RIL_TEST_CHILD_CACHE")) else {
        return;
    };
    let p = resolve(Path::new(&pipeline), &[]).unwrap();
    let summary = run(&p, &registry(), &Cache::new(PathBuf::from(cache)), &RunOptions::default()).unwrap();
    assert!(summary.ok());
}

#[test]
fn a_killed_run_resumes_and_reuses_finished_stages() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count.txt");
    let text = format!(
        "stages:\n  - id: first\n    kind: write\n    params: {{count_file: {c}}}\n  - id: long\n    kind: write\n    params: {{steps: 100, sleep_ms: 20, count_file: {c}}}\n    inputs: {{deps: first}}\n  - id: last\n    kind: write\n    params: {{count_file: {c}}}\n    inputs: {{deps: long}}\n",
        c = count.display()
    );
    let file = write_pipeline(dir.path(), "kill.yaml", &text);
    let cache_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(&file, cache_dir.path());
    // Kill -9 in the middle of `long`, once it has checkpointed a few steps.
    let p = resolve(&file, &[]).unwrap();
    let pl = plan(&p, &registry(), &Cache::new(cache_dir.path()), &FileHasher::ephemeral()).unwrap();
    let partial = cache_dir.path().join("partial").join(&pl.stages[1].key).join("step.txt");
    assert!(wait_for(|| std::fs::read_to_string(&partial).is_ok_and(|s| s.trim().parse::<u32>().unwrap_or(0) >= 10), Duration::from_secs(60)));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(executions(&count), vec!["first", "long"]);

    let cache = Cache::new(cache_dir.path());
    let summary = run_quiet(&p, &cache);
    assert!(summary.ok());
    assert_eq!(summary.cleaned_tmp, 1, "the killed stage's temporary folder is cleaned up");
    assert_eq!(executions(&count), vec!["first", "long", "long", "last"], "first is reused, long resumes, last runs");
    let long = cache.object_dir(&pl.stages[1].key).unwrap();
    assert!(std::fs::read_to_string(long.join("resumed.txt")).unwrap().parse::<u32>().unwrap() >= 10);
    for s in &pl.stages {
        assert!(cache.verify(&s.key).unwrap().is_ok());
    }
}

#[test]
fn two_concurrent_runs_compute_each_stage_once() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count.txt");
    let mut text = String::from("stages:\n");
    for i in 0..6 {
        text.push_str(&format!("  - id: s{i}\n    kind: write\n    params: {{steps: 5, sleep_ms: 20, text: \"{i}\", count_file: {}}}\n", count.display()));
        if i > 0 && i % 2 == 0 {
            text.push_str(&format!("    inputs: {{deps: [s{}]}}\n", i - 1));
        }
    }
    let file = write_pipeline(dir.path(), "twice.yaml", &text);
    let cache_dir = tempfile::tempdir().unwrap();
    let mut a = spawn_child(&file, cache_dir.path());
    let mut b = spawn_child(&file, cache_dir.path());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let mut runs = executions(&count);
    runs.sort();
    assert_eq!(runs, vec!["s0", "s1", "s2", "s3", "s4", "s5"], "no stage ran twice");
    let cache = Cache::new(cache_dir.path());
    let again = run_quiet(&resolve(&file, &[]).unwrap(), &cache);
    assert_eq!(again.cached(), 6);
}

#[test]
fn gc_waits_for_runs_and_removes_only_unreferenced_objects() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", ORDERS);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let p = resolve(&file, &[]).unwrap();
    run_quiet(&p, &cache);
    let changed = resolve(&file, &["base.text=other;"]).unwrap();
    run_quiet(&changed, &cache);
    assert_eq!(cache.list_objects().unwrap().len(), 24);
    // The journal now references the changed pipeline only.
    let journal = ril_pipe::exec::journal::Journal::load(&cache.journal_dir(), "orders");
    let referenced: std::collections::BTreeSet<String> = journal.stages.values().map(|e| e.key.clone()).collect();
    assert_eq!(referenced.len(), 12);
    // While a run holds the cache, gc cannot take it.
    let held = cache.run_lock(true, &mut |_| {}).unwrap();
    let busy = cache.gc_lock(false, &mut |_| {});
    assert!(matches!(busy, Err(ril_pipe::exec::CacheError::Busy { .. })));
    drop(held);
    let _gc = cache.gc_lock(false, &mut |_| {}).unwrap();
    let busy_run = cache.run_lock(false, &mut |_| {});
    assert!(busy_run.is_err(), "a run does not start while gc holds the cache");
}

/// Not a test of its own: what `ril-pipe exec-stage` does, with the test kinds (the fake Slurm
/// below runs it as its jobs).
#[test]
#[ignore]
fn exec_stage_entry() {
    let (Some(spec), Some(cache)) = (std::env::var_os("RIL_TEST_EXEC_SPEC"), std::env::var_os("RIL_TEST_EXEC_CACHE")) else {
        return;
    };
    let frozen: ril_pipe::exec::launch::FrozenStage = serde_json::from_slice(&std::fs::read(spec).unwrap()).unwrap();
    let registry = registry();
    let kind = registry.get(&frozen.stage.kind).unwrap();
    let (outcome, _) = ril_pipe::exec::launch::local::execute_object(
        &Cache::new(PathBuf::from(cache)),
        kind.as_ref(),
        &frozen,
        "cpu",
        1,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ril_pipe::exec::progress::StageProgress::hidden(&frozen.stage.id),
    );
    assert!(matches!(outcome, Outcome::Executed { .. } | Outcome::Cached), "{outcome:?}");
}

/// A stand-in for sbatch/squeue/scancel: jobs run at once in the background; squeue lists the
/// ones whose process is alive.
fn fake_slurm(dir: &Path) -> ril_pipe::exec::launch::slurm::SlurmCommands {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p.to_string_lossy().into_owned()
    };
    let state = dir.join("jobs");
    std::fs::create_dir_all(&state).unwrap();
    let sbatch = write(
        "sbatch",
        &format!(
            "#!/bin/sh\nout=/dev/null\nfor a in \"$@\"; do case \"$a\" in --output=*) out=\"${{a#--output=}}\";; esac; script=\"$a\"; done\necho \"$*\" >> {s}/args\nid=$(( $(ls {s} | wc -l) + 100 ))\nsh \"$script\" > \"$out\" 2>&1 &\necho $! > {s}/$id.pid\necho \"$id;cluster\"\n",
            s = state.display()
        ),
    );
    let squeue = write(
        "squeue",
        &format!(
            "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in --jobs=*) ids=\"${{a#--jobs=}}\";; esac; done\nfor id in $(echo \"$ids\" | tr ',' ' '); do pid=$(cat {s}/$id.pid 2>/dev/null) && kill -0 $pid 2>/dev/null && echo \"$id RUNNING\"; done\nexit 0\n",
            s = state.display()
        ),
    );
    let scancel = write("scancel", &format!("#!/bin/sh\nfor id in \"$@\"; do kill $(cat {s}/$id.pid) 2>/dev/null; done\n", s = state.display()));
    ril_pipe::exec::launch::slurm::SlurmCommands { sbatch, squeue, scancel }
}

#[test]
fn slurm_executor_submits_each_stage_and_matches_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "orders.yaml", &ORDERS.replace("kind: write\n    params: {text: \"base;\"}", "kind: write\n    params: {text: \"base;\"}\n    resources: {cpus: 2, mem_gb: 1.5, time_min: 10, partition: debug}"));
    let p = resolve(&file, &[]).unwrap();
    // The job's "ril-pipe" is this test binary in its exec-stage role.
    let wrapper = dir.path().join("ril-pipe");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# exec-stage SPEC --cache DIR ...\nRIL_TEST_EXEC_SPEC=\"$2\" RIL_TEST_EXEC_CACHE=\"$4\" exec {} --exact runner::exec_stage_entry --ignored --test-threads=1\n",
            std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut config = ril_pipe::exec::launch::slurm::SlurmConfig::new(wrapper);
    config.commands = fake_slurm(dir.path());
    config.poll_interval = Duration::from_millis(100);
    let slurm_cache = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        jobs: 4,
        executor: ril_pipe::exec::Executor::Slurm(config),
        ..RunOptions::default()
    };
    let summary = run(&p, &registry(), &Cache::new(slurm_cache.path()), &opts).unwrap();
    assert!(summary.ok(), "{:?}", summary.outcomes);
    assert_eq!(summary.executed(), 12);
    let args = std::fs::read_to_string(dir.path().join("jobs/args")).unwrap();
    assert_eq!(args.lines().count(), 12, "one job per unique stage");
    assert!(args.contains("--partition=debug") && args.contains("--cpus-per-task=2") && args.contains("--mem=1536M") && args.contains("--time=10"), "{args}");
    // Same objects, same bytes as a local run.
    let local_cache = tempfile::tempdir().unwrap();
    run_quiet(&p, &Cache::new(local_cache.path()));
    let slurm = Cache::new(slurm_cache.path());
    let local = Cache::new(local_cache.path());
    assert_eq!(slurm.list_objects().unwrap(), local.list_objects().unwrap());
    for key in local.list_objects().unwrap() {
        let a = std::fs::read(local.object_dir(&key).unwrap().join("out.txt")).unwrap();
        let b = std::fs::read(slurm.object_dir(&key).unwrap().join("out.txt")).unwrap();
        assert_eq!(a, b);
    }
}

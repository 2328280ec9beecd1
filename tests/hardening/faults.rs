//! Faults survived: kill -9 at random points (a real pipeline; commits and journal writes of
//! many small stages; gc), damaged cache objects, a full disk, two runs and a gc on one cache,
//! non-finite training values.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::pipeline::{load_resolved, Override};

use super::support::{executions, registry};
use super::*;

/// The stage each `start` line names, in order.
fn started(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("  start   ")).map(|l| l.split(' ').next().unwrap_or("").to_string()).collect()
}

/// The stage that was running when the output stops (started, not yet done or cached).
fn running_at_end(text: &str) -> Option<String> {
    let mut running: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("  start   ") {
            running.push(rest.split(' ').next().unwrap_or("").to_string());
        }
        for done in ["  done    ", "  cached  ", "  FAILED  "] {
            if let Some(rest) = line.strip_prefix(done) {
                let id = rest.split([' ', ':']).next().unwrap_or("");
                running.retain(|r| r != id);
            }
        }
    }
    running.pop()
}

/// One kill of the real pipeline and the rerun after it.
struct KillRound {
    place: String,
    finished_before: usize,
    resumed: usize,
    recovered: bool,
    equal: bool,
    reused: bool,
    clean: bool,
    report: String,
}

/// The (stage, file) pairs whose contents differ.
fn differences(want: &BTreeMap<String, BTreeMap<String, Vec<u8>>>, got: &BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, files) in want {
        for (name, bytes) in files {
            if got.get(id).and_then(|g| g.get(name)) != Some(bytes) {
                out.push(format!("{id}/{name}"));
            }
        }
    }
    out
}

/// A random point of the run: a stage, chosen with the odds of its share of the run's time,
/// and a moment inside it (up to a tenth past its end: its commit, the journal, the next
/// stage's start).
fn random_point(r: &Reference, rng: &mut Rng) -> (String, u64) {
    let total: f64 = r.stage_seconds.iter().map(|(_, t)| t.max(0.05)).sum();
    let mut at = (rng.below(1_000_000) as f64 / 1e6) * total;
    for (id, t) in &r.stage_seconds {
        let t = t.max(0.05);
        if at < t {
            return (id.clone(), (at * 1100.0) as u64);
        }
        at -= t;
    }
    let (id, t) = r.stage_seconds.last().unwrap();
    (id.clone(), (t * 1000.0) as u64)
}

/// The step of a fine-tune's last checkpoint in `cache` (0: none yet).
fn checkpoint_step(cache: &Path, key: &str) -> u64 {
    ril_pipe::method::checkpoint::Checkpoint::saved_step(&cache.join("partial").join(key).join("checkpoint.safetensors")).unwrap_or(0) as u64
}

/// Starts the run and kills it `delay_ms` after it starts `stage` (after that stage's
/// checkpoint of step `after_checkpoint`, when given); the killed run's output.
fn kill_at(r: &Reference, cache: &Path, stage: &str, after_checkpoint: Option<u64>, delay_ms: u64) -> Output {
    use std::io::BufRead as _;
    let mut child = spawn_ril(&run_args(s(&r.pipeline), s(cache)));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut text = String::new();
    let wanted = format!("  start   {stage} ");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(300)) {
        let hit = line.starts_with(&wanted);
        text.push_str(&line);
        text.push('\n');
        if hit {
            break;
        }
    }
    if let Some(step) = after_checkpoint {
        let key = &r.keys[stage];
        wait_for(|| checkpoint_step(cache, key) >= step, Duration::from_secs(120));
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    let _ = child.kill();
    let status = child.wait().unwrap();
    let _ = reader.join();
    text.extend(rx.try_iter().map(|l| l + "\n"));
    Output { code: status.code(), text }
}

fn kill_real_once(r: &Reference, cache: &Path, rng: &mut Rng) -> KillRound {
    // Half of the kills in a fine-tune come after one of its checkpoints (its set-up takes
    // most of its time otherwise), so that resuming is tried often.
    let (stage, mut delay_ms) = random_point(r, rng);
    let after_checkpoint = (stage.starts_with("ft/") && rng.below(2) == 0).then(|| 1 + rng.below(3));
    if after_checkpoint.is_some() {
        delay_ms = rng.below(150);
    }
    let killed = kill_at(r, cache, &stage, after_checkpoint, delay_ms);
    let before = finished(cache);
    let place = match (killed.code, running_at_end(&killed.text)) {
        (Some(_), _) => "after the run had finished".to_string(),
        (None, Some(id)) if id.starts_with("ft/") => "during training".to_string(),
        (None, Some(id)) if id == "eval" => "during the evaluation".to_string(),
        (None, Some(id)) => format!("while {id} ran"),
        (None, None) => "between stages (commit, journal)".to_string(),
    };
    let delay_ms = match after_checkpoint {
        Some(step) => format!("{delay_ms} ms after checkpoint {step} of {stage}"),
        None => format!("{delay_ms} ms into {stage}"),
    };
    let out = ril(&run_args(s(&r.pipeline), s(cache)));
    let recovered = out.code == Some(0);
    let again: Vec<String> = started(&out.text).into_iter().filter(|id| before.contains(&r.keys[id])).collect();
    let got = if recovered { all_results(&r.keys, cache) } else { BTreeMap::new() };
    let differ = differences(&r.results, &got);
    let equal = recovered && differ.is_empty();
    let clean = objects_verify(cache) && tmp_entries(cache).is_empty();
    let resumed = r
        .keys
        .iter()
        .filter(|(id, key)| id.starts_with("ft/") && !before.contains(*key))
        .filter(|(_, key)| std::fs::read_to_string(object_dir(cache, key).join("log.txt")).is_ok_and(|l| l.contains("resumed at step")))
        .count();
    let report = format!("kill {delay_ms} ({place}): exit {:?}, differing {differ:?}, recomputed {again:?}, clean {clean}\n{}", out.code, out.text);
    KillRound {
        place,
        finished_before: before.len(),
        resumed,
        recovered,
        equal,
        reused: again.is_empty(),
        clean,
        report,
    }
}

#[test]
fn kill9_at_random_points_of_a_real_pipeline() {
    let r = reference();
    let n = repeat(50);
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    // Two workers, each with its own caches and random delays.
    let rounds: Vec<KillRound> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|w| {
                let dir = dir.path();
                scope.spawn(move || {
                    let mut rng = Rng(seed ^ (w + 1));
                    (0..n as u64)
                        .filter(|i| i % 2 == w)
                        .map(|i| {
                            let cache = dir.join(format!("c{i}"));
                            let round = kill_real_once(r, &cache, &mut rng);
                            std::fs::remove_dir_all(&cache).unwrap();
                            round
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let count = |f: fn(&KillRound) -> bool| rounds.iter().filter(|k| f(k)).count();
    let mut landed: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &rounds {
        *landed.entry(k.place.as_str()).or_default() += 1;
    }
    let places: Vec<String> = landed.iter().map(|(k, v)| format!("{v} {k}")).collect();
    report(&format!(
        "kill -9 (real pipeline, {n} kills at random points of its {:.1} s, seed {seed}): {}/{n} runs recovered, results equal {}/{n}, finished stages reused {}/{n} ({} stages finished before a kill, none recomputed), verify clean {}/{n}; {} fine-tunes resumed from their checkpoint; kills landed: {}",
        r.seconds,
        count(|k| k.recovered),
        count(|k| k.equal),
        count(|k| k.reused),
        rounds.iter().map(|k| k.finished_before).sum::<usize>(),
        count(|k| k.clean),
        rounds.iter().map(|k| k.resumed).sum::<usize>(),
        places.join(", ")
    ));
    let failures: Vec<&str> = rounds.iter().filter(|k| !(k.recovered && k.equal && k.reused && k.clean)).map(|k| k.report.as_str()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Many small stages: commits, checkpoints and journal writes make up most of the time, so
/// random kills land inside them.
fn small_stages(dir: &Path, count: &Path, n: usize, suffix: &str) -> PathBuf {
    let mut text = String::from("name: many\nstages:\n");
    for i in 0..n {
        text.push_str(&format!("  - id: s{i}\n    kind: write\n    params: {{text: \"{i}{suffix};\", count_file: {}}}\n", count.display()));
        if i % 3 != 0 {
            text.push_str(&format!("    inputs: {{deps: [s{}]}}\n", i - 1));
        }
    }
    support::write_pipeline(dir, &format!("many{suffix}.yaml"), &text)
}

fn run_library(pipeline: &Path, cache: &Path, sets: &[&str]) -> ril_pipe::exec::RunSummary {
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let p = load_resolved(pipeline, &registry().schemas(), &overrides).unwrap();
    run(&p, &registry(), &Cache::new(cache), &RunOptions::default()).unwrap()
}

/// The body of the child processes below (runs the pipeline of `RIL_TEST_CHILD_PIPELINE`).
#[test]
#[ignore]
fn child_entry() {
    let (Some(pipeline), Some(cache)) = (std::env::var_os("RIL_TEST_CHILD_PIPELINE"), std::env::var_os("RIL_TEST_CHILD_CACHE")) else {
        return;
    };
    assert!(run_library(Path::new(&pipeline), Path::new(&cache), &[]).ok());
}

fn spawn_child(pipeline: &Path, cache: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "faults::child_entry", "--ignored", "--test-threads=1"])
        .env("RIL_TEST_CHILD_PIPELINE", pipeline)
        .env("RIL_TEST_CHILD_CACHE", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Leftovers that show where a kill landed.
fn kill_site(cache: &Path) -> &'static str {
    if !manifests_in_tmp(cache).is_empty() {
        return "in a commit, between the manifest and the rename";
    }
    if !journal_writes(cache).is_empty() {
        return "in a journal write";
    }
    if !checkpoint_writes(cache).is_empty() {
        return "in a checkpoint write";
    }
    if !tmp_entries(cache).is_empty() {
        return "while a stage ran or was hashed";
    }
    "between stages"
}

/// Temporary folders that hold a manifest: a commit between writing it and the rename.
fn manifests_in_tmp(cache: &Path) -> Vec<String> {
    tmp_entries(cache).into_iter().filter(|t| cache.join("tmp").join(t).join("MANIFEST.json").exists()).collect()
}

/// Temporary files of the journal's atomic writes.
fn journal_writes(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("runs")).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp.")).collect()
}

/// Temporary files of checkpoint writes in the resumable folders.
fn checkpoint_writes(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("partial"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|p| std::fs::read_dir(p.path()).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.contains(".tmp."))
        .collect()
}

/// The small-stage pipeline's reference outputs: stage id -> (key, out.txt).
fn small_reference(pipeline: &Path, cache: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    assert!(spawn_child(pipeline, cache).wait().unwrap().success());
    let p = load_resolved(pipeline, &registry().schemas(), &[]).unwrap();
    let pl = ril_pipe::exec::plan::plan(&p, &registry(), &Cache::new(cache), &ril_pipe::exec::filehash::FileHasher::ephemeral()).unwrap();
    pl.stages.iter().map(|s| (s.stage.id.clone(), (s.key.clone(), std::fs::read(object_dir(cache, &s.key).join("out.txt")).unwrap()))).collect()
}

/// After a kill: rerun in this process and check that it finished, reused every finished
/// stage, produced the reference outputs and left a clean cache. `Err` says what failed.
fn rerun_after_kill(pipeline: &Path, cache: &Path, count: &Path, reference: &BTreeMap<String, (String, Vec<u8>)>) -> Result<(), String> {
    let before = finished(cache);
    let before_runs = executions(count).len();
    let summary = run_library(pipeline, cache, &[]);
    let again: Vec<String> = executions(count)[before_runs..].iter().filter(|id| before.contains(&reference[*id].0)).cloned().collect();
    let same = reference.values().all(|(k, out)| std::fs::read(object_dir(cache, k).join("out.txt")).ok().as_ref() == Some(out));
    let clean = objects_verify(cache) && tmp_entries(cache).is_empty();
    if summary.ok() && same && again.is_empty() && clean {
        Ok(())
    } else {
        Err(format!("ok {}, equal {same}, recomputed {again:?}, clean {clean}", summary.ok()))
    }
}

#[test]
fn kill9_during_commits_and_journal_writes() {
    let seed = seed();
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let mut lines = Vec::new();

    // Random kills, in memory (fast; a kill does not test fsync).
    let dir = memory_tempdir();
    let n_stages = 30;
    let count = dir.path().join("count.txt");
    let pipeline = small_stages(dir.path(), &count, n_stages, "");
    let reference = small_reference(&pipeline, &dir.path().join("reference"));
    let probe = dir.path().join("probe");
    let mut child = spawn_child(&pipeline, &probe);
    wait_for_holder(&probe, ".run", &mut child);
    let started = Instant::now();
    assert!(child.wait().unwrap().success());
    let limit_ms = started.elapsed().as_millis() as u64;
    let n = repeat(30);
    let mut ok = 0;
    let mut sites: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..n {
        let cache = dir.path().join(format!("c{i}"));
        let delay = rng.below(limit_ms);
        let mut child = spawn_child(&pipeline, &cache);
        wait_for_holder(&cache, ".run", &mut child);
        std::thread::sleep(Duration::from_millis(delay));
        kill9(&mut child);
        *sites.entry(kill_site(&cache)).or_default() += 1;
        match rerun_after_kill(&pipeline, &cache, &count, &reference) {
            Ok(()) => ok += 1,
            Err(e) => failures.push(format!("random kill {i} (seed {seed}, {delay} ms): {e}")),
        }
        std::fs::remove_dir_all(&cache).unwrap();
    }
    let sites: Vec<String> = sites.iter().map(|(k, v)| format!("{v} {k}")).collect();
    lines.push(format!("{n} at random points of its {limit_ms} ms: {ok}/{n} recovered ({})", sites.join(", ")));

    // Targeted kills, on disk (where flushing makes these moments long enough to hit): the
    // killer watches for the moment and kills at once, at the k-th such moment of the run.
    let disk = tempfile::tempdir().unwrap();
    let n_small = 8;
    let count = disk.path().join("count.txt");
    let pipeline = small_stages(disk.path(), &count, n_small, "");
    let reference = small_reference(&pipeline, &disk.path().join("reference"));
    type Moment = fn(&Path) -> Vec<String>;
    let moments: [(&str, Moment); 3] = [
        ("in a commit, between the manifest and the rename", manifests_in_tmp),
        ("in a journal write", journal_writes),
        ("in a checkpoint write", checkpoint_writes),
    ];
    let per_moment = repeat(8);
    for (what, moment) in moments {
        let (mut hit, mut ok) = (0, 0);
        for j in 0..per_moment {
            let cache = disk.path().join(format!("t{j}"));
            let k = 1 + rng.below(n_small as u64) as usize;
            let mut child = spawn_child(&pipeline, &cache);
            let mut seen = std::collections::HashSet::new();
            let watch = Instant::now();
            while seen.len() < k && watch.elapsed() < Duration::from_secs(60) && child.try_wait().ok().flatten().is_none() {
                seen.extend(moment(&cache));
            }
            kill9(&mut child);
            hit += usize::from(!moment(&cache).is_empty());
            match rerun_after_kill(&pipeline, &cache, &count, &reference) {
                Ok(()) => ok += 1,
                Err(e) => failures.push(format!("kill {what} #{k} (seed {seed}): {e}")),
            }
            std::fs::remove_dir_all(&cache).unwrap();
        }
        lines.push(format!("{per_moment} {what}: {ok}/{per_moment} recovered ({hit} left the half-done write behind, the rest landed just after it)"));
    }
    report(&format!("kill -9 (small stages of a test kind; commits, journal and checkpoint writes): {}; every recovered run reused its finished stages, gave the reference outputs and a clean cache", lines.join("; ")));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kill9_during_gc() {
    let dir = memory_tempdir();
    let count = dir.path().join("count.txt");
    let n_stages = 50;
    let pipeline = small_stages(dir.path(), &count, n_stages, "");
    let snapshot = dir.path().join("snapshot");
    assert!(run_library(&pipeline, &snapshot, &[]).ok());
    // Garbage: copies of a finished object under keys that no journal references.
    let template = object_dir(&snapshot, finished(&snapshot).first().unwrap());
    let mut rng = Rng(seed());
    let garbage = 1000;
    for _ in 0..garbage {
        let key = format!("{:016x}{:016x}{:016x}{:016x}", rng.next(), rng.next(), rng.next(), rng.next());
        let dest = object_dir(&snapshot, &key);
        copy_tree(&template, &dest);
        let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dest.join("MANIFEST.json")).unwrap()).unwrap();
        manifest["key"] = serde_json::json!(key);
        std::fs::write(dest.join("MANIFEST.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    }
    let all = finished(&snapshot).len();
    assert_eq!(all, n_stages + garbage);
    let newer = pipeline;

    // How long an uninterrupted gc takes once it holds the cache.
    let probe = dir.path().join("probe");
    copy_tree(&snapshot, &probe);
    let mut child = spawn_ril(&["gc", "--cache", s(&probe)]);
    wait_for_holder(&probe, ".gc", &mut child);
    let started = Instant::now();
    let out = finish(child);
    let limit_ms = (started.elapsed().as_millis() as u64).max(1);
    assert_eq!(out.code, Some(0), "{}", out.text);
    assert_eq!(finished(&probe).len(), n_stages, "{}", out.text);

    let n = repeat(30);
    let seed = seed();
    let mut rng = Rng(seed);
    let (mut mid, mut clean, mut kept, mut completed) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for i in 0..n {
        let cache = dir.path().join(format!("c{i}"));
        copy_tree(&snapshot, &cache);
        let delay = rng.below(limit_ms);
        let mut child = spawn_ril(&["gc", "--cache", s(&cache)]);
        wait_for_holder(&cache, ".gc", &mut child);
        std::thread::sleep(Duration::from_millis(delay));
        kill9(&mut child);
        let left = finished(&cache).len();
        mid += usize::from(left > n_stages && left < all);
        // Every object left is whole (what `ril-pipe verify` checks).
        let verified = objects_verify(&cache);
        // Nothing the journal references is lost: the recorded pipeline is all cached.
        let before_runs = executions(&count).len();
        let summary = run_library(&newer, &cache, &[]);
        let recomputed = executions(&count).len() - before_runs;
        // The run removed the killed gc's leftovers; the rest is still garbage for the next gc.
        let done = tmp_entries(&cache).is_empty() && objects_verify(&cache);
        clean += usize::from(verified);
        kept += usize::from(summary.ok() && recomputed == 0);
        completed += usize::from(done);
        if !(verified && summary.ok() && recomputed == 0 && done) {
            failures.push(format!("iteration {i} (seed {seed}, kill after {delay} ms): verify clean {verified}, recomputed {recomputed}, leftovers {:?}", tmp_entries(&cache)));
        }
        std::fs::remove_dir_all(&cache).unwrap();
    }
    // The gc after a killed one completes.
    let last = dir.path().join("last");
    copy_tree(&snapshot, &last);
    let mut child = spawn_ril(&["gc", "--cache", s(&last)]);
    wait_for_holder(&last, ".gc", &mut child);
    std::thread::sleep(Duration::from_millis(limit_ms / 2));
    kill9(&mut child);
    let again = ril(&["gc", "--cache", s(&last)]);
    let second_gc = again.code == Some(0) && finished(&last).len() == n_stages && tmp_entries(&last).is_empty() && verify_clean(&last);
    report(&format!(
        "kill -9 during gc ({n} kills at random points of its {limit_ms} ms, {garbage} of {all} objects to remove; {mid} kills in the middle of removing): verify clean {clean}/{n}, referenced results kept {kept}/{n}, leftovers cleaned by the next run {completed}/{n}; a gc after a killed one completes: {}",
        yes(second_gc)
    ));
    assert!(second_gc, "{}", again.text);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Flips a byte in the middle, cuts the file in half, or deletes it.
fn damage(file: &Path, mode: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    match mode {
        "flip" => {
            let at = bytes.len() / 2;
            bytes[at] ^= 0x01;
            std::fs::write(file, bytes).unwrap();
        }
        "truncate" => std::fs::write(file, &bytes[..bytes.len() / 2]).unwrap(),
        _ => std::fs::remove_file(file).unwrap(),
    }
}

#[test]
fn damaged_objects_are_named_and_recomputed() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed());
    let (mut cases, mut named, mut recomputed, mut equal, mut run_noticed) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    // One round per kind of damage: one file of every object is damaged at once.
    for (round, mode) in ["flip", "truncate", "delete"].iter().enumerate() {
        let cache = dir.path().join(format!("round{round}"));
        copy_tree(&r.cache, &cache);
        let mut damaged: BTreeMap<String, String> = BTreeMap::new();
        for (id, key) in &r.keys {
            let odir = object_dir(&cache, key);
            let mut files: Vec<String> = r.results[id].keys().cloned().collect();
            files.retain(|f| !(mode == &"truncate" && std::fs::metadata(odir.join(f)).unwrap().len() < 2));
            let file = files[rng.below(files.len() as u64) as usize].clone();
            damage(&odir.join(&file), mode);
            damaged.insert(id.clone(), file);
        }
        cases += damaged.len();
        let out = ril(&["verify", "--cache", s(&cache)]);
        for (id, file) in &damaged {
            let line = out.text.lines().find(|l| l.contains(&format!("(stage {id})")));
            let ok = out.code == Some(1) && line.is_some_and(|l| l.contains(file.as_str()));
            named += usize::from(ok);
            if !ok {
                failures.push(format!("{mode}: verify does not name {id} / {file}:\n{}", out.text));
            }
        }
        // A size check on every read: a run notices truncated and missing files by itself.
        if *mode != "flip" {
            let out = ril(&run_args(s(&r.pipeline), s(&cache)));
            let noticed = damaged.keys().filter(|id| out.text.contains(&format!("  damaged {id} "))).count();
            run_noticed += noticed;
            if noticed != damaged.len() || out.code != Some(0) {
                failures.push(format!("{mode}: the run noticed {noticed} of {} damaged objects:\n{}", damaged.len(), out.text));
            }
        } else {
            let out = ril(&["verify", "--cache", s(&cache), "--repair"]);
            assert!(out.text.contains(&format!("removed {} damaged objects", damaged.len())), "{}", out.text);
        }
        let out = ril(&run_args(s(&r.pipeline), s(&cache)));
        let executed = started(&out.text).len();
        let fixed = out.code == Some(0) && objects_verify(&cache);
        let same = all_results(&r.keys, &cache) == r.results;
        recomputed += if fixed && (*mode != "flip" || executed == damaged.len()) { damaged.len() } else { 0 };
        equal += if same { damaged.len() } else { 0 };
        if !fixed || !same {
            failures.push(format!("{mode}: after recomputing: clean {fixed}, equal {same}:\n{}", out.text));
        }
    }

    // A downstream stage never reads a damaged input: flip a byte of ft/1's adapters and drop
    // ft/2, which reads them.
    let cache = dir.path().join("downstream");
    copy_tree(&r.cache, &cache);
    damage(&object_dir(&cache, &r.keys["ft/1"]).join("adapters.safetensors"), "flip");
    let c = Cache::new(&cache);
    c.remove_object(&r.keys["ft/2"]).unwrap();
    let first = ril(&run_args(s(&r.pipeline), s(&cache)));
    let refused = first.code == Some(1) && first.text.contains("input ft/1") && first.text.contains("damaged") && !object_dir(&cache, &r.keys["ft/2"]).exists();
    let second = ril(&run_args(s(&r.pipeline), s(&cache)));
    let redone = started(&second.text);
    let downstream_ok = refused && second.code == Some(0) && redone == ["ft/1", "ft/2"] && all_results(&r.keys, &cache) == r.results && objects_verify(&cache);
    if !downstream_ok {
        failures.push(format!("downstream of a damaged input:\n{}\n---\n{}", first.text, second.text));
    }
    report(&format!(
        "corruption ({cases} objects damaged: a flipped byte, a truncated or a deleted file): named by verify {named}/{cases}, truncated or deleted noticed by the next run {run_noticed}/{}, recomputed {recomputed}/{cases}, results equal {equal}/{cases}; a stage whose input has a flipped byte refuses to read it: {}",
        2 * r.keys.len(),
        if downstream_ok { "1/1" } else { "0/1" }
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Mounts a tmpfs of `bytes` at `dir`; the reason when that is refused.
fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", s(dir)]).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn remount(dir: &Path, bytes: u64) -> bool {
    Command::new("mount").args(["-o", &format!("remount,size={bytes}"), s(dir)]).status().is_ok_and(|s| s.success())
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { bytes_under(&entry.path()) } else { meta.len().div_ceil(4096) * 4096 };
    }
    total
}

#[test]
fn a_full_disk_fails_the_stage_cleanly_and_the_run_resumes() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    if let Err(reason) = mount_tmpfs(&probe, 1 << 20) {
        report(&format!("disk full: SKIPPED: cannot mount a tmpfs ({reason}); run as root to check it"));
        return;
    }
    umount(&probe);
    let needed = bytes_under(&r.cache);
    let fractions = [0.15, 0.4, 0.65, 0.9];
    let (mut failed_clearly, mut no_partial, mut resumed, mut equal) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for (i, f) in fractions.iter().enumerate() {
        let mount = dir.path().join(format!("disk{i}"));
        let size = ((needed as f64 * f) as u64).max(64 << 10) / 4096 * 4096;
        mount_tmpfs(&mount, size).unwrap();
        let cache = mount.join("cache");
        let full = ril(&run_args(s(&r.pipeline), s(&cache)));
        let clear = full.code == Some(1) && full.text.contains("No space left on device") && full.text.contains("  FAILED  ");
        let leftovers = tmp_entries(&cache);
        let objects_ok = objects_verify(&cache);
        failed_clearly += usize::from(clear);
        no_partial += usize::from(leftovers.is_empty() && objects_ok);
        let kept = finished(&cache);
        remount(&mount, needed * 4);
        let out = ril(&run_args(s(&r.pipeline), s(&cache)));
        let again: Vec<String> = started(&out.text).into_iter().filter(|id| kept.contains(&r.keys[id])).collect();
        let ok = out.code == Some(0) && again.is_empty() && objects_verify(&cache);
        let same = ok && all_results(&r.keys, &cache) == r.results;
        resumed += usize::from(ok);
        equal += usize::from(same);
        if !(clear && leftovers.is_empty() && objects_ok && ok && same) {
            failures.push(format!(
                "disk of {size} bytes: clear error {clear}, leftovers {leftovers:?}, verify clean {objects_ok}, resumed {ok}, equal {same}\n--- full disk:\n{}\n--- after freeing space:\n{}",
                full.text, out.text
            ));
        }
        umount(&mount);
    }
    let n = fractions.len();
    report(&format!(
        "disk full (cache on a tmpfs of 15-90% of the {} kB the pipeline needs, {n} sizes): failed with a clear error {failed_clearly}/{n}, no partial object left {no_partial}/{n}, resumed once space was freed {resumed}/{n} (results equal {equal}/{n})",
        needed / 1000
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn two_runs_and_a_gc_on_one_cache() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let stages = r.keys.len();
    let rounds = repeat(3);
    let (mut both_ok, mut once, mut equal, mut clean, mut told) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    for round in 0..rounds {
        let cache = dir.path().join(format!("two{round}"));
        let a = spawn_ril(&run_args(s(&r.pipeline), s(&cache)));
        std::thread::sleep(Duration::from_millis(300 * round as u64));
        let b = spawn_ril(&run_args(s(&r.pipeline), s(&cache)));
        let (a, b) = (finish(a), finish(b));
        let ok = a.code == Some(0) && b.code == Some(0);
        let done = |t: &str| t.lines().filter(|l| l.starts_with("  done    ")).count();
        let computed = done(&a.text) + done(&b.text);
        // The process that finds a stage being computed says so, and reuses the result.
        let said = [&a.text, &b.text].iter().any(|t| t.contains("another process is computing it") || t.contains("(finished by another process)"));
        let same = ok && all_results(&r.keys, &cache) == r.results;
        let verified = objects_verify(&cache);
        both_ok += usize::from(ok);
        once += usize::from(computed == stages);
        equal += usize::from(same);
        clean += usize::from(verified);
        told += usize::from(said);
        if !(ok && computed == stages && same && verified && said) {
            failures.push(format!("round {round}: ok {ok}, computed {computed} of {stages}, equal {same}, clean {verified}, said {said}\n{}\n---\n{}", a.text, b.text));
        }
    }

    // gc while a run is active: it refuses with the run's name, or waits with --wait; the run
    // loses nothing either way.
    let cache = dir.path().join("gc");
    let mut run_child = spawn_ril(&run_args(s(&r.pipeline), s(&cache)));
    let journal = cache.join("runs").join("small.json");
    assert!(wait_for(|| journal.exists(), Duration::from_secs(120)), "the run recorded nothing");
    let refused = ril(&["gc", "--cache", s(&cache)]);
    let refusal_clear = refused.code == Some(1) && refused.text.contains("in use by ril-pipe run (pid");
    let repair = ril(&["verify", "--cache", s(&cache), "--repair"]);
    let repair_clear = repair.code == Some(1) && repair.text.contains("in use by ril-pipe run (pid");
    let waiting = spawn_ril(&["gc", "--cache", s(&cache), "--wait"]);
    let run_done = run_child.wait().unwrap().success();
    let waited = finish(waiting);
    let wait_clear = waited.code == Some(0) && waited.text.contains("waiting: the cache is in use by ril-pipe run");
    let after = ril(&run_args(s(&r.pipeline), s(&cache)));
    let nothing_lost = run_done && after.code == Some(0) && started(&after.text).is_empty() && all_results(&r.keys, &cache) == r.results && objects_verify(&cache);
    if !(refusal_clear && repair_clear && wait_clear && nothing_lost) {
        failures.push(format!(
            "gc during a run: refused clearly {refusal_clear}, repair refused {repair_clear}, waited {wait_clear}, nothing lost {nothing_lost}\n{}\n---\n{}\n---\n{}\n---\n{}",
            refused.text, repair.text, waited.text, after.text
        ));
    }
    report(&format!(
        "concurrency: two runs on one cache {rounds} times: both finished {both_ok}/{rounds}, each stage computed once {once}/{rounds}, the waiting run said so {told}/{rounds}, results equal {equal}/{rounds}, verify clean {clean}/{rounds}; gc during a run: refused naming the run {}, verify --repair refused {}, gc --wait waited and then removed nothing the run made {}",
        yes(refusal_clear),
        yes(repair_clear),
        yes(wait_clear && nothing_lost)
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn yes(b: bool) -> &'static str {
    if b {
        "1/1"
    } else {
        "0/1"
    }
}

/// A copy of the random world whose aesthetic head ends in `bias`.
/// A copy of the random world whose reward head's last layer has `bias` as its bias and its
/// weights multiplied by `weight_scale`.
fn world_with_head(dir: &Path, bias: Option<f64>, weight_scale: f64) -> PathBuf {
    let copy = dir.join(format!("world_bias_{bias:?}_scale_{weight_scale}"));
    copy_tree(&world("random"), &copy);
    let head = copy.join("aesthetic_head.safetensors");
    let mut tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&head).unwrap();
    let layer = |n: &str| n.split('.').nth(1).and_then(|i| i.parse::<u32>().ok()).unwrap_or(0);
    let last = tensors.iter().map(|(n, _)| layer(n)).max().unwrap();
    for (name, t) in tensors.iter_mut() {
        if layer(name) != last {
            continue;
        }
        if name.ends_with(".bias") {
            if let Some(bias) = bias {
                *t = t.full_like(bias);
            }
        } else if name.ends_with(".weight") {
            *t = &*t * weight_scale;
        }
    }
    tch::Tensor::write_safetensors(&tensors, &head).unwrap();
    copy
}

#[test]
fn non_finite_training_values_stop_the_stage_and_cache_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ft = "  - id: ft\n    kind: finetune\n    inputs: {model: base}\n    params: {task: aesthetic, method: baseline}\n";
    let inf_world = world_with_head(dir.path(), Some(f64::INFINITY), 1.0);
    // A finite reward of about 1e30 whose gradient overflows float32 in the backward pass.
    let huge_world = world_with_head(dir.path(), None, 1e30);
    // (case, world, extra --set, expected step, expected value in the message)
    let cases: Vec<(&str, PathBuf, Vec<&str>, &str, &str)> = vec![
        ("a reward head with NaN weights", world("nan_head"), vec![], "step 1", "NaN"),
        ("a reward head with an infinite bias", inf_world, vec![], "step 1", "inf"),
        ("a reward head with weights of 1e30 (finite loss, overflowing gradient)", huge_world, vec![], "gradient norm at step 1", "inf"),
    ];
    let mut stopped = 0;
    let mut failures = Vec::new();
    for (i, (what, world_dir, sets, step, value)) in cases.iter().enumerate() {
        let case_dir = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(&case_dir).unwrap();
        let text = format!(
            "name: nonfinite\ndefaults:\n{SMALL_DEFAULTS}stages:\n  - id: base\n    kind: tiny_world\n    params: {{root: \"{}\"}}\n{ft}",
            world_dir.display()
        );
        let pipeline = case_dir.join("p.yaml");
        std::fs::write(&pipeline, text).unwrap();
        let cache = case_dir.join("cache");
        let mut args = run_args(s(&pipeline), s(&cache));
        for set in sets {
            args.push("--set");
            args.push(set);
        }
        let out = ril(&args);
        let mut keys_args = vec!["plan", s(&pipeline), "--cache", s(&cache), "--json"];
        for set in sets {
            keys_args.push("--set");
            keys_args.push(set);
        }
        let plan = ril(&keys_args);
        let ft_key = plan.text.split("\"id\": \"ft\"").nth(1).and_then(|t| t.split("\"key\": \"").nth(1)).map(|t| t[..64].to_string()).unwrap();
        let message = out.text.lines().find(|l| l.starts_with("  FAILED  ft:")).unwrap_or("").to_string();
        let ok = out.code == Some(1)
            && message.contains("non-finite")
            && message.contains(step)
            && message.contains(value)
            && !object_dir(&cache, &ft_key).exists()
            && tmp_entries(&cache).is_empty();
        stopped += usize::from(ok);
        if !ok {
            failures.push(format!("{what}: {}", out.text));
        } else {
            report(&format!("  non-finite: {what}: {}", message.trim()));
        }
    }
    let n = cases.len();
    report(&format!("non-finite values: {stopped}/{n} fine-tunes stopped with the step and the value, nothing cached"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

//! Hardening (issue 9), measured: faults injected into real runs and survived, bad input
//! refused with a message, files kept inside the cache and report roots. Every check prints
//! its counts (`kill -9: 50/50 runs recovered, ...`); docs/reliability.md quotes them. Run with
//! `make hardening` (it is not part of a plain `cargo test`: it takes minutes).
//!
//! Real pipelines run the shipped binary with the real stage kinds on the miniature random
//! world of `tests/parity/fixtures_world.py`; checks that need to hit a precise moment (a
//! commit, a journal write) use the test-only kinds of `tests/support` through the library,
//! in child processes of this test binary.
#[path = "support/mod.rs"]
mod support;

#[path = "hardening/faults.rs"]
mod faults;
#[path = "hardening/input.rs"]
mod input;
#[path = "hardening/paths.rs"]
mod paths;

pub use support::{wait_for, world};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shipped binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ril-pipe")
}

/// Settings that keep fine-tunes and evaluations of the random world to about a second.
pub const SMALL_DEFAULTS: &str = concat!(
    "  finetune: {epochs: 2, prompts_per_epoch: 2, batch_size: 1, micro_batch: 1, lr: 1.0e-2, ddim_steps: 2, guidance: 2.0, lora_rank: 2, checkpoint_every: 1}\n",
    "  evaluate: {images_per_prompt: 1, ddim_steps: 2, guidance: 2.0, batch_size: 4, grid_prompts: 4}\n",
);

/// The small real pipeline of the fault checks: the base model, two RID tasks in sequence
/// (4 optimizer steps each, checkpointed after every step) and an evaluation of the result.
pub fn real_pipeline(dir: &Path, world_name: &str) -> PathBuf {
    let stages = r#"
  - id: ft/${step}
    kind: finetune
    chain: {over: [aesthetic, compress], as: task, link: model, first: base}
    params: {task: "${task}", method: rid}
  - id: eval
    kind: evaluate
    inputs: {model: ft/2}
"#;
    world_pipeline(dir, "small.yaml", world_name, SMALL_DEFAULTS, stages)
}

/// A pipeline on a world: `base` plus `stages`.
pub fn world_pipeline(dir: &Path, file: &str, world_name: &str, defaults: &str, stages: &str) -> PathBuf {
    let text = format!(
        "name: small\nvars:\n  root: {root}\ndefaults:\n{defaults}stages:\n  - id: base\n    kind: tiny_world\n    params: {{root: \"${{root}}\"}}\n{stages}",
        root = world(world_name).display()
    );
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// Prints a check's counts where `cargo test` shows them without `--nocapture` (the test
/// harness captures `println!`, not the process's standard output).
pub fn report(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// What a finished command left: exit code (None: killed by a signal) and its output.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub text: String,
}

fn collect(out: std::process::Output) -> Output {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Output { code: out.status.code(), text }
}

fn command(args: &[&str], cwd: Option<&Path>) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("RIL_CACHE").stdin(Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd
}

/// Runs ril-pipe to the end.
pub fn ril(args: &[&str]) -> Output {
    ril_in(args, None)
}

pub fn ril_in(args: &[&str], cwd: Option<&Path>) -> Output {
    collect(command(args, cwd).output().unwrap())
}

/// Starts ril-pipe in the background, its output captured.
pub fn spawn_ril(args: &[&str]) -> Child {
    command(args, None).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

pub fn finish(child: Child) -> Output {
    collect(child.wait_with_output().unwrap())
}

/// `ril-pipe run` on CPU with one thread and plain output.
pub fn run_args<'a>(pipeline: &'a str, cache: &'a str) -> Vec<&'a str> {
    vec!["run", pipeline, "--cache", cache, "--device", "cpu", "--threads", "1", "--no-progress"]
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Stage id -> cache key, from `ril-pipe plan --json`.
pub fn plan_keys(pipeline: &Path, cache: &Path) -> BTreeMap<String, String> {
    let out = ril(&["plan", s(pipeline), "--cache", s(cache), "--json"]);
    assert_eq!(out.code, Some(0), "{}", out.text);
    let json_start = out.text.find('{').unwrap();
    let mut de = serde_json::Deserializer::from_str(&out.text[json_start..]).into_iter::<serde_json::Value>();
    let plan = de.next().unwrap().unwrap();
    plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| (st["id"].as_str().unwrap().to_string(), st["key"].as_str().unwrap().to_string()))
        .collect()
}

pub fn object_dir(cache: &Path, key: &str) -> PathBuf {
    cache.join("objects").join(&key[..2]).join(key)
}

/// Keys of the finished objects (with a manifest) in a cache.
pub fn finished(cache: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let Ok(shards) = std::fs::read_dir(cache.join("objects")) else {
        return keys;
    };
    for shard in shards.flatten() {
        for entry in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            if entry.path().join("MANIFEST.json").exists() {
                keys.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    keys
}

/// An object's files as a run's results: everything but the log, with wall-clock times taken
/// out of the training records (they differ between any two runs).
pub fn results(cache: &Path, key: &str) -> BTreeMap<String, Vec<u8>> {
    let dir = object_dir(cache, key);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for name in manifest["files"].as_object().unwrap().keys() {
        if name == "log.txt" {
            continue;
        }
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let bytes = match name.as_str() {
            "train_log.jsonl" => String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| without_times(serde_json::from_str(l).unwrap()).to_string() + "\n")
                .collect::<String>()
                .into_bytes(),
            "train_summary.json" => without_times(serde_json::from_slice(&bytes).unwrap()).to_string().into_bytes(),
            _ => bytes,
        };
        out.insert(name.clone(), bytes);
    }
    out
}

fn without_times(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(map) = v.as_object_mut() {
        map.remove("seconds");
        map.remove("seconds_per_epoch");
    }
    v
}

/// Every stage's results, by stage id.
pub fn all_results(keys: &BTreeMap<String, String>, cache: &Path) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    keys.iter().map(|(id, key)| (id.clone(), results(cache, key))).collect()
}

/// `ril-pipe verify` finds nothing wrong.
pub fn verify_clean(cache: &Path) -> bool {
    let out = ril(&["verify", "--cache", s(cache)]);
    out.code == Some(0) && out.text.contains(" 0 damaged")
}

/// What `ril-pipe verify` checks, through the library (no process start): every object in
/// the cache matches its manifest.
pub fn objects_verify(cache: &Path) -> bool {
    let c = ril_pipe::exec::Cache::new(cache);
    c.list_objects().unwrap().iter().all(|k| c.verify(k).unwrap().is_ok())
}

/// Waits until a process has taken the cache (its holder file appears); the seconds waited.
pub fn wait_for_holder(cache: &Path, what: &str, child: &mut Child) -> Option<f64> {
    let started = Instant::now();
    let holders = cache.join("holders");
    while started.elapsed() < Duration::from_secs(120) {
        let found = std::fs::read_dir(&holders).into_iter().flatten().flatten().any(|e| e.file_name().to_string_lossy().ends_with(what));
        if found {
            return Some(started.elapsed().as_secs_f64());
        }
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Leftovers of a stage being computed: temporary folders in `tmp/`.
pub fn tmp_entries(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// A small deterministic generator (splitmix64), so a failing iteration can be replayed from
/// the seed it prints.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed of this run's random choices: `RIL_HARDENING_SEED`, else the clock.
pub fn seed() -> u64 {
    std::env::var("RIL_HARDENING_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
}

/// Sends SIGKILL (what `kill -9` does) and reaps the process.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// How many times a check repeats: `default`, or `RIL_HARDENING_SCALE` times it.
pub fn repeat(default: usize) -> usize {
    let scale: f64 = std::env::var("RIL_HARDENING_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((default as f64) * scale).ceil().max(1.0) as usize
}

/// A reference run of the small real pipeline, made once and shared by the checks.
pub struct Reference {
    pub dir: tempfile::TempDir,
    pub pipeline: PathBuf,
    pub cache: PathBuf,
    pub keys: BTreeMap<String, String>,
    pub results: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Wall-clock seconds of the uninterrupted run, from taking the cache to exit.
    pub seconds: f64,
    /// Each stage's seconds in that run, in the order they ran.
    pub stage_seconds: Vec<(String, f64)>,
}

pub fn reference() -> &'static Reference {
    static REFERENCE: std::sync::OnceLock<Reference> = std::sync::OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = real_pipeline(dir.path(), "random");
        let cache = dir.path().join("cache");
        let mut child = spawn_ril(&run_args(s(&pipeline), s(&cache)));
        let startup = wait_for_holder(&cache, ".run", &mut child).unwrap_or(0.0);
        let started = Instant::now();
        let out = finish(child);
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(out.code, Some(0), "reference run failed:\n{}", out.text);
        let keys = plan_keys(&pipeline, &cache);
        let results = all_results(&keys, &cache);
        // Results are reproducible: a second uninterrupted run in another cache gives the same.
        let again = dir.path().join("again");
        let out = ril(&run_args(s(&pipeline), s(&again)));
        assert_eq!(out.code, Some(0), "{}", out.text);
        assert_eq!(all_results(&keys, &again), results, "two uninterrupted runs differ");
        std::fs::remove_dir_all(&again).unwrap();
        report(&format!("reference: the small real pipeline ({} stages) runs in {seconds:.1}s after {startup:.1}s of process start", keys.len()));
        let stage_seconds = out
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("  done    "))
            .filter_map(|l| l.split_once(" in ").and_then(|(id, t)| t.strip_suffix('s').and_then(|t| t.parse().ok()).map(|t| (id.to_string(), t))))
            .collect();
        Reference {
            dir,
            pipeline,
            cache,
            keys,
            results,
            seconds,
            stage_seconds,
        }
    })
}

/// A temporary folder in memory (`/dev/shm`) where there is one: the checks that kill
/// processes many times spend their time in fsync otherwise, which a kill does not test.
pub fn memory_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap()
}

/// Copies a folder tree (a cache) to `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

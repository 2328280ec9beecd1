//! What the tests share: the fixtures and the repository's folders, helpers for cached objects
//! and tensors, running the built binary, and test-only stage kinds (the shipped binary has none
//! of these). Used by the integration tests (`tests/main.rs`) and by `make hardening`.
#![allow(dead_code)]
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ril_pipe::exec::kind::{StageContext, StageError, StageKind};
use ril_pipe::exec::{atomic_write, Registry};
use ril_pipe::pipeline::params::StageParams;
use ril_pipe::pipeline::schema::{InputSpec, KindSchema};

/// Writes `out.txt` = its `text` followed by its inputs' `out.txt`, in `steps` steps of
/// `sleep_ms` each, with a resumable checkpoint after every step. Appends a line to
/// `count_file` (outside the cache) each time it really executes, so tests can count runs.
pub struct WriteKind;

ril_pipe::stage_params! {
    pub struct WriteParams {
        pub text: String = param(String::new()).doc("text to write"),
        pub steps: u64 = param(1).min(1).doc("steps"),
        pub sleep_ms: u64 = param(0).min(0).doc("sleep per step"),
        pub fail: bool = param(false).doc("fail at the end"),
        pub panic: bool = param(false).doc("panic at the end"),
        pub count_file: String = param(String::new()).doc("append a line per execution"),
        pub data: Option<PathBuf> = param(None).doc("an external file"),
        pub rate: f64 = param(0.5).min(0).max(10).doc("a float"),
        pub mode: WriteMode = param(WriteMode::A).doc("an enum"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WriteMode {
    A,
    B,
}

impl WriteMode {
    fn name(self) -> &'static str {
        match self {
            WriteMode::A => "a",
            WriteMode::B => "b",
        }
    }
}

ril_pipe::enum_param!(WriteMode { A, B });

impl StageKind for WriteKind {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "write",
            version: 1,
            doc: "test kind",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: WriteParams::specs(),
            inputs: vec![InputSpec {
                name: "deps",
                required: false,
                many: true,
                doc: "upstream stages",
            }],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let params: WriteParams = ctx.typed_params()?;
        let count_file = &params.count_file;
        if !count_file.is_empty() {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(count_file)?;
            writeln!(f, "{}", ctx.stage.id)?;
        }
        let (steps, sleep) = (params.steps, params.sleep_ms);
        let ckpt = ctx.resume_dir()?.join("step.txt");
        let mut start = 0;
        if let Ok(text) = std::fs::read_to_string(&ckpt) {
            start = text.trim().parse().unwrap_or(0);
            ctx.log(format!("resumed at step {start}"));
        }
        ctx.progress.set_length(steps);
        ctx.progress.inc(start);
        for step in start..steps {
            ctx.check_cancelled()?;
            std::thread::sleep(std::time::Duration::from_millis(sleep));
            atomic_write(&ckpt, (step + 1).to_string().as_bytes())?;
            ctx.progress.inc(1);
        }
        let mut out = params.text.clone();
        for dep in ctx.input_list("deps") {
            out.push_str(&std::fs::read_to_string(dep.file("out.txt")?)?);
        }
        std::fs::write(ctx.out_dir().join("out.txt"), &out)?;
        if start > 0 {
            std::fs::write(ctx.out_dir().join("resumed.txt"), start.to_string())?;
        }
        if params.panic {
            panic!("test panic");
        }
        if params.fail {
            return Err(StageError::Failed("asked to fail".into()));
        }
        Ok(())
    }
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(WriteKind);
    r
}

/// Writes a pipeline file into `dir` and returns its path.
pub fn write_pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Lines of a count file (stage ids, one per execution).
pub fn executions(count_file: &Path) -> Vec<String> {
    std::fs::read_to_string(count_file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs the built `ril-pipe` in `dir` (without `$RIL_CACHE`, so `./cache` is the default).
pub fn ril_in(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ril-pipe")).args(args).current_dir(dir).env_remove("RIL_CACHE").output().unwrap()
}

/// A finished command's stdout and stderr, for assertions and their messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The committed tiny world.
pub fn tiny_weights() -> PathBuf {
    repo().join("tiny/weights")
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The public data the repository carries (`data/README.md`: origins and licences).
pub fn data_dir() -> PathBuf {
    repo().join("data")
}

/// The fixture folder of one area (`$RIL_FIXTURES/<area>/`, written by `make fixtures`); panics
/// with the command that builds it when absent.
pub fn fixtures(area: &str) -> PathBuf {
    let root = std::env::var_os("RIL_FIXTURES")
        .map(PathBuf::from)
        .expect("RIL_FIXTURES is not set: run the tests through `make test` (or `make fixtures` and source scripts/dev-env.sh)");
    let dir = root.join(area);
    assert!(dir.join(".stamp").exists(), "fixtures for `{area}` missing in {}: run `make fixtures`", dir.display());
    dir
}

/// A miniature world of the fixtures (`random`: random weights in the real layouts).
pub fn world(name: &str) -> PathBuf {
    fixtures("world").join(name)
}

/// The cache folder of stage `id` of a pipeline (planned with the shipped kinds).
pub fn object(pipeline: &ril_pipe::pipeline::ResolvedPipeline, cache: &ril_pipe::exec::Cache, id: &str) -> PathBuf {
    let plan = ril_pipe::exec::plan::plan(pipeline, &ril_pipe::stages::registry(), cache, &ril_pipe::exec::filehash::FileHasher::ephemeral()).unwrap();
    let stage = plan.stages.iter().find(|s| s.stage.id == id).unwrap_or_else(|| panic!("no stage {id}"));
    cache.object_dir(&stage.key).unwrap()
}

/// Every tensor of a safetensors file, by name.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// Max absolute difference between two tensors of the same shape (f64).
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
}

/// Whether `pred` holds within `limit` (polled every 10 ms).
pub fn wait_for(pred: impl Fn() -> bool, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if pred() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

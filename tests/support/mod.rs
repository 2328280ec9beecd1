//! Test-only stage kinds and helpers for the runner tests. The shipped binary has none of these.
#![allow(dead_code)]
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ril_pipe::exec::kind::{StageContext, StageError, StageKind};
use ril_pipe::exec::{atomic_write, Params, Registry};
use ril_pipe::pipeline::schema::{InputSpec, KindSchema, ParamSpec, ParamType};
use serde_json::json;

/// Writes `out.txt` = its `text` followed by its inputs' `out.txt`, in `steps` steps of
/// `sleep_ms` each, with a resumable checkpoint after every step. Appends a line to
/// `count_file` (outside the cache) each time it really executes, so tests can count runs.
pub struct WriteKind;

impl StageKind for WriteKind {
    fn schema(&self) -> KindSchema {
        let p = |name, ty, default: serde_json::Value, doc| ParamSpec {
            name,
            ty,
            default: Some(default),
            doc,
        };
        KindSchema {
            kind: "write",
            version: 1,
            doc: "test kind",
            uses_input_labels: false,
            params: vec![
                p("text", ParamType::String, json!(""), "text to write"),
                p("steps", ParamType::Int, json!(1), "steps"),
                p("sleep_ms", ParamType::Int, json!(0), "sleep per step"),
                p("fail", ParamType::Bool, json!(false), "fail at the end"),
                p("panic", ParamType::Bool, json!(false), "panic at the end"),
                p("count_file", ParamType::String, json!(""), "append a line per execution"),
                p("data", ParamType::Path, serde_json::Value::Null, "an external file"),
                p("rate", ParamType::Float, json!(0.5), "a float"),
                p("mode", ParamType::Enum(vec!["a", "b"]), json!("a"), "an enum"),
            ],
            inputs: vec![InputSpec {
                name: "deps",
                required: false,
                many: true,
                doc: "upstream stages",
            }],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let params = ctx.params().clone();
        let count_file = params.str_of("count_file")?;
        if !count_file.is_empty() {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(count_file)?;
            writeln!(f, "{}", ctx.stage.id)?;
        }
        let steps = params.i64_of("steps")?.max(1) as u64;
        let sleep = params.i64_of("sleep_ms")? as u64;
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
        let mut out = params.str_of("text")?.to_string();
        for dep in ctx.input_list("deps") {
            out.push_str(&std::fs::read_to_string(dep.file("out.txt")?)?);
        }
        std::fs::write(ctx.out_dir().join("out.txt"), &out)?;
        if start > 0 {
            std::fs::write(ctx.out_dir().join("resumed.txt"), start.to_string())?;
        }
        if params.bool_of("panic")? {
            panic!("test panic");
        }
        if params.bool_of("fail")? {
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tiny/weights")
}

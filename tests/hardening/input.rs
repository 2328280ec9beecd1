//! Bad input tried: a generator of random and mutated pipelines through the YAML front end
//! (parse, expand, validate), hostile pipelines (values that double, deep nesting, huge
//! matrices and chains), a battery of malformed pipelines and of malformed weight files.
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use ril_pipe::pipeline::interp::Env;
use ril_pipe::pipeline::{resolve_with, FileCheck, Override};
use serde_json::{json, Map, Value};

use super::*;

// ---------------------------------------------------------------- the pipeline generator

struct FakeEnv;

impl Env for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "HOME").then(|| "/home/x".to_string())
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "method", "order", "task", "step", "prev", "orders", "tasks", "item", "deps", "text"]).prop_map(String::from),
        1 => "[a-z_][a-z0-9_-]{0,5}",
    ]
}

/// Strings as pipelines write them: plain words, ids, globs, paths and every `${...}` form,
/// well-formed or not.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9_/+=.*-]{0,10}",
        3 => name().prop_map(|n| format!("${{{n}}}")),
        1 => (name(), name()).prop_map(|(a, b)| format!("${{{a}.{b}}}")),
        1 => (name(), 0..4usize).prop_map(|(a, i)| format!("${{{a}[{i}]}}")),
        1 => (name(), name()).prop_map(|(a, b)| format!("${{{a}.${{{b}}}}}")),
        1 => (name(), name(), "[a-z/]{0,3}").prop_map(|(a, b, t)| format!("x/${{{a}}}/{t}${{{b}}}")),
        1 => prop::sample::select(vec![
            "${env.HOME}", "${env.NOPE:-x}", "${env.NOPE}", "${env.}", "$${a}", "${a", "${}", "${a b}", "${a.}", "${a[x]}", "}", "$", "**", "eval/*",
            "ft/**", "*/*", "../up", "/abs", ".", "", " ", "a//b", "AHC", "aesthetic", "hps", "compress", "rid", "baseline",
        ])
        .prop_map(String::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => text().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => (-5i64..20).prop_map(Value::from),
        1 => (-1.0e6f64..1.0e6).prop_map(|f| json!(f)),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(name(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn map_of(keys: impl Strategy<Value = String>, values: impl Strategy<Value = Value>, n: std::ops::Range<usize>) -> impl Strategy<Value = Value> {
    prop::collection::btree_map(keys, values, n).prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn kinds() -> Vec<String> {
    let mut k: Vec<String> = registry_schemas().keys().cloned().collect();
    k.extend(["wrte", "", "report2"].map(String::from));
    k
}

/// The real kinds and the test kind `write`.
fn registry_schemas() -> ril_pipe::pipeline::Schemas {
    let mut s = ril_pipe::stages::registry().schemas();
    s.extend(support::registry().schemas());
    s
}

fn param_names() -> Vec<String> {
    let mut names: Vec<String> = registry_schemas().values().flat_map(|k| k.params.iter().map(|p| p.name.to_string())).collect();
    names.sort();
    names.dedup();
    names.push("nosuch".into());
    names
}

fn input_names() -> Vec<String> {
    let mut names: Vec<String> = registry_schemas().values().flat_map(|k| k.inputs.iter().map(|p| p.name.to_string())).collect();
    names.sort();
    names.dedup();
    names.push("nosuch".into());
    names
}

fn stage() -> impl Strategy<Value = Value> {
    let id = prop_oneof![3 => text(), 2 => (name(), name()).prop_map(|(a, b)| format!("s/${{{a}}}/${{{b}}}")), 2 => "s[0-9]"];
    let reference = prop_oneof![3 => "s[0-9]", 1 => text()];
    let inputs = map_of(prop::sample::select(input_names()), prop_oneof![reference.clone().prop_map(Value::String), prop::collection::vec(reference.prop_map(Value::String), 0..3).prop_map(Value::Array)], 0..3);
    let matrix = prop_oneof![
        3 => map_of(name(), prop_oneof![prop::collection::vec(leaf(), 0..4).prop_map(Value::Array), text().prop_map(Value::String)], 1..3),
        1 => value(),
    ];
    let chain = (prop_oneof![prop::collection::vec(leaf(), 0..4).prop_map(Value::Array), text().prop_map(Value::String)], name(), prop::sample::select(input_names()), text())
        .prop_map(|(over, var, link, first)| json!({"over": over, "as": var, "link": link, "first": first}));
    (
        id,
        prop::sample::select(kinds()),
        map_of(prop::sample::select(param_names()), value(), 0..4),
        inputs,
        prop::option::of(matrix),
        prop::option::of(prop::collection::vec(value(), 0..2)),
        prop::option::of(chain),
        prop::option::of(value()),
        prop::option::of(value()),
    )
        .prop_map(|(id, kind, params, inputs, matrix, exclude, chain, resources, meta)| {
            let mut m = Map::new();
            m.insert("id".into(), Value::String(id));
            m.insert("kind".into(), Value::String(kind));
            m.insert("params".into(), params);
            m.insert("inputs".into(), inputs);
            for (k, v) in [("matrix", matrix), ("chain", chain), ("resources", resources), ("meta", meta)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if let Some(e) = exclude {
                m.insert("exclude".into(), Value::Array(e));
            }
            Value::Object(m)
        })
}

fn pipeline() -> impl Strategy<Value = Value> {
    (
        prop::option::of(text()),
        map_of(name(), value(), 0..5),
        map_of(prop::sample::select(kinds()), map_of(prop::sample::select(param_names()), value(), 0..3), 0..2),
        prop::collection::vec(stage(), 0..6),
    )
        .prop_map(|(name, vars, defaults, stages)| {
            let mut m = Map::new();
            if let Some(n) = name {
                m.insert("name".into(), Value::String(n));
            }
            m.insert("vars".into(), vars);
            m.insert("defaults".into(), defaults);
            m.insert("stages".into(), Value::Array(stages));
            Value::Object(m)
        })
}

/// Pipelines of the test kind `write` that are mostly valid: matrices, chains, globs and
/// `${...}` that resolve, so that expansion and validation are exercised past the parser.
fn sane_pipeline() -> impl Strategy<Value = Value> {
    let stage = (
        prop::option::of(prop::collection::vec(0..5i64, 1..4)),
        prop::option::of(prop::collection::vec(prop::sample::select(vec!["A", "B", "C"]), 1..4)),
        any::<prop::sample::Index>(),
        prop::option::of(0..6usize),
        1..4i64,
        prop::sample::select(vec!["a", "b"]),
        prop::option::of(prop::collection::vec(0..5i64, 1..3)),
    );
    (prop::collection::vec(stage, 1..7), any::<bool>()).prop_map(|(stages, defaults)| {
        let mut list = Vec::new();
        let mut grouped = Vec::new();
        for (i, (matrix, chain, text, dep, steps, mode, exclude)) in stages.into_iter().enumerate() {
            let (matrix, chain) = if i == 0 { (None, None) } else { (matrix, chain) };
            // Texts that resolve where the stage is (matrix and chain variables where they exist).
            let mut texts = vec!["hello", "${greeting}", "${words[1]}", "${env.HOME}", "$${literal}"];
            if matrix.is_some() {
                texts.push("v${m}");
            }
            if chain.is_some() {
                texts.extend(["${table.${t}}", "${t}${step}", "from ${prev}"]);
            }
            let text = texts[text.index(texts.len())];
            let mut id = format!("s{i}");
            let mut st = Map::new();
            if let Some(values) = &matrix {
                id.push_str("/${m}");
                st.insert("matrix".into(), json!({"m": values}));
                if let Some(ex) = exclude {
                    st.insert("exclude".into(), json!(ex.iter().map(|v| json!({"m": v})).collect::<Vec<_>>()));
                }
            }
            if let Some(over) = &chain {
                id.push_str("/${step}");
                st.insert("chain".into(), json!({"over": over, "as": "t", "link": "deps", "first": "s0"}));
            } else if let Some(d) = dep.filter(|&d| d < i) {
                let target: Value = if grouped[d] { json!(format!("s{d}/**")) } else { json!(format!("s{d}")) };
                st.insert("inputs".into(), json!({"deps": [target]}));
            }
            grouped.push(matrix.is_some() || chain.is_some());
            st.insert("id".into(), json!(id));
            st.insert("kind".into(), json!("write"));
            st.insert("params".into(), json!({"text": text, "steps": steps, "mode": mode}));
            list.push(Value::Object(st));
        }
        let mut doc = json!({
            "vars": {"greeting": "hi", "words": ["a", "b", "c"], "table": {"A": 1, "B": 2, "C": 3}},
            "stages": list,
        });
        if defaults {
            doc["defaults"] = json!({"write": {"rate": 0.25, "text": "${greeting}"}});
        }
        doc
    })
}

/// Pieces that break YAML in interesting ways.
const SPLICES: &[&str] = &["{", "}", "[", "]", ":", "- ", "\n", "  ", "\t", "'", "\"", "&a ", "*a", "<<: *a\n", "!!binary ", "!tag ", "%YAML 1.2\n", "---\n", "...\n", "? ", "|\n", ">-\n", "#", ",", "${", "\u{0}", "\u{feff}", "~", ".nan", "-.inf", "0x10", "1e400"];

/// A generated pipeline as text, with up to three edits at the byte level.
fn pipeline_text() -> impl Strategy<Value = (String, Vec<String>)> {
    let edit = (0..3u8, any::<prop::sample::Index>(), any::<prop::sample::Index>(), prop::sample::select(SPLICES));
    let set = prop_oneof![
        (name(), leaf()).prop_map(|(n, v)| format!("vars.{n}={v}")),
        (prop::sample::select(kinds()), prop::sample::select(param_names()), leaf()).prop_map(|(k, p, v)| format!("defaults.{k}.{p}={v}")),
        (text(), prop::sample::select(param_names()), leaf()).prop_map(|(s, p, v)| format!("{s}.{p}={v}")),
        text(),
    ];
    let doc = prop_oneof![sane_pipeline(), pipeline()];
    let edits = prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(edit, 1..4)];
    let sets = prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(set, 1..3)];
    (doc, edits, sets).prop_map(|(doc, edits, sets)| {
        let mut text = yaml_serde::to_string(&doc).unwrap_or_default();
        for (op, at, len, piece) in edits {
            if text.is_empty() {
                text.push_str(piece);
                continue;
            }
            let boundary = |i: usize, t: &str| (0..=i.min(t.len())).rev().find(|&j| t.is_char_boundary(j)).unwrap_or(0);
            let start = boundary(at.index(text.len() + 1), &text);
            match op {
                0 => text.insert_str(start, piece),
                1 => {
                    let end = boundary(start + len.index(16), &text);
                    text.replace_range(start..end, "");
                }
                _ => {
                    let end = boundary(start + len.index(64), &text);
                    let copy = text[start..end].to_string();
                    text.insert_str(end, &copy);
                }
            }
        }
        (text, sets)
    })
}

/// What one generated pipeline came to.
#[derive(Debug, PartialEq)]
enum Verdict {
    Valid(usize),
    Refused,
}

fn front_end(file: &Path, text: &str, sets: &[String], schemas: &ril_pipe::pipeline::Schemas) -> Verdict {
    let Ok(spec) = ril_pipe::pipeline::spec::parse(file, text.to_string()) else {
        return Verdict::Refused;
    };
    let Ok(overrides) = sets.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>() else {
        return Verdict::Refused;
    };
    match resolve_with(&spec, schemas, &overrides, &FakeEnv, FileCheck::Record) {
        Ok(p) => Verdict::Valid(p.stages.len()),
        Err(e) => {
            // A refusal is a message, never an empty one.
            assert!(!e.to_string().trim().is_empty(), "empty message for:\n{text}");
            Verdict::Refused
        }
    }
}

fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()))
        .unwrap_or(0)
        / 1024
}

#[test]
fn fuzz_the_pipeline_front_end() {
    let seconds: u64 = std::env::var("RIL_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a/b/fuzz.yaml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let schemas = registry_schemas();
    let strategy = pipeline_text();
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    // A case that runs longer than this is a hang: the watchdog stops the whole process.
    let case_started = Arc::new(AtomicU64::new(u64::MAX));
    let watch = case_started.clone();
    let epoch = Instant::now();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let t = watch.load(Ordering::SeqCst);
        if t != u64::MAX && epoch.elapsed().as_millis() as u64 > t + 20_000 {
            report(&format!("fuzz: a case has run for 20 s (seed {seed}): a hang"));
            std::process::abort();
        }
    });
    let (mut cases, mut valid, mut refused, mut stages) = (0usize, 0usize, 0usize, 0usize);
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let mut tree = strategy.new_tree(&mut runner).unwrap();
        let (text, sets) = tree.current();
        case_started.store(epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(|| front_end(&file, &text, &sets, &schemas));
        slowest = slowest.max(t.elapsed());
        case_started.store(u64::MAX, Ordering::SeqCst);
        cases += 1;
        match outcome {
            Ok(Verdict::Valid(n)) => {
                valid += 1;
                stages += n;
            }
            Ok(Verdict::Refused) => refused += 1,
            Err(_) => {
                // Shrink to a small input that still panics, then report it.
                while tree.simplify() {
                    let (t, s) = tree.current();
                    if std::panic::catch_unwind(|| front_end(&file, &t, &s, &schemas)).is_ok() && !tree.complicate() {
                        break;
                    }
                }
                let (t, s) = tree.current();
                panic!("the front end panicked (seed {seed}) on:\n{t}\n--set {s:?}");
            }
        }
    }
    let rss = peak_rss_mb();
    report(&format!(
        "fuzz (proptest generator, {seconds} s, seed {seed}): {cases} pipelines through parse, expand and validate: {valid} valid ({stages} stages), {refused} refused with a message, 0 panics, slowest {} ms, peak memory of the test process {rss} MB",
        slowest.as_millis()
    ));
    assert!(slowest < Duration::from_secs(5), "a case took {slowest:?}");
    assert!(rss < 2048, "peak memory {rss} MB");
}

// ---------------------------------------------------------------- hostile and malformed pipelines

/// `ril-pipe run` on a pipeline text: exit code, output, seconds.
fn run_text(dir: &Path, name: &str, text: &[u8], sets: &[&str]) -> (Option<i32>, String, f64) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let cache = dir.join("cache");
    let mut args = vec!["run", s(&file), "--cache", s(&cache), "--device", "cpu", "--no-progress"];
    for set in sets {
        args.push("--set");
        args.push(set);
    }
    let t = Instant::now();
    let out = ril(&args);
    (out.code, out.text, t.elapsed().as_secs_f64())
}

fn doubling_vars(levels: usize, make: impl Fn(usize) -> String) -> String {
    let mut text = String::from("vars:\n");
    for i in 0..levels {
        text.push_str(&format!("  v{i}: {}\n", make(i)));
    }
    text.push_str("stages:\n  - id: a\n    kind: write\n");
    text
}

#[test]
fn hostile_pipelines_are_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let ten: String = (0..10).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let many_vars: String = (0..100_000).map(|i| format!("  v{i}: {i}\n")).collect();
    let big = "x".repeat(1 << 20);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("lists that double 40 times", doubling_vars(40, |i| if i == 0 { "[x, x]".into() } else { format!("[\"${{v{}}}\", \"${{v{}}}\"]", i - 1, i - 1) }).into_bytes(), "expand to more than 64 MiB"),
        ("strings that double 40 times", doubling_vars(40, |i| if i == 0 { "xxxxxxxx".into() } else { format!("\"${{v{}}}${{v{}}}\"", i - 1, i - 1) }).into_bytes(), "expand to more than 64 MiB"),
        ("a list nested 100 deep through variables", doubling_vars(100, |i| if i == 0 { "[1]".into() } else { format!("[\"${{v{}}}\"]", i - 1) }).into_bytes(), "nest at most 64"),
        ("`${` nested 10,000 deep", format!("stages:\n  - id: a\n    kind: write\n    params: {{text: \"{}x{}\"}}\n", "${".repeat(10_000), "}".repeat(10_000)).into_bytes(), "nests more than 16 deep"),
        ("a matrix of 10^7 combinations", format!("vars: {{ten: [{ten}]}}\nstages:\n  - id: s/${{a}}${{b}}${{c}}${{d}}${{e}}${{f}}${{g}}\n    kind: write\n    matrix: {{a: \"${{ten}}\", b: \"${{ten}}\", c: \"${{ten}}\", d: \"${{ten}}\", e: \"${{ten}}\", f: \"${{ten}}\", g: \"${{ten}}\"}}\n").into_bytes(), "more than 10000 combinations"),
        ("a chain of a million elements", format!("stages:\n  - id: base\n    kind: write\n  - id: c/${{step}}\n    kind: write\n    chain: {{over: \"{}\", link: deps, first: base}}\n", "A".repeat(1_000_000)).into_bytes(), "more than 10000 stages"),
        ("10,000 stages each copying a 1 MB variable", format!("vars:\n  big: \"{big}\"\n  n: [{}]\nstages:\n  - id: s/${{i}}\n    kind: write\n    matrix: {{i: \"${{n}}\"}}\n    params: {{text: \"${{big}}\"}}\n", (0..10_000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")).into_bytes(), "expand to more than 64 MiB"),
        ("YAML aliases that double 30 times (billion laughs)", {
            let mut t = String::from("vars:\n  l0: &l0 [x, x]\n");
            for i in 1..30 {
                t.push_str(&format!("  l{i}: &l{i} [*l{}, *l{}]\n", i - 1, i - 1));
            }
            t.push_str("stages:\n  - id: a\n    kind: write\n");
            t.into_bytes()
        }, "repetition limit"),
        ("YAML nested 1,000,000 deep (the parser takes the square of the depth)", format!("vars: {{x: {}{}}}\nstages: []\n", "[".repeat(1_000_000), "]".repeat(1_000_000)).into_bytes(), "nest more than 128 deep"),
        ("a 5 MB pipeline file", format!("# {}\nstages: []\n", "x".repeat(5 << 20)).into_bytes(), "larger than the"),
        ("a parameter naming a device (/dev/zero would be hashed forever)", b"stages:\n  - id: a\n    kind: write\n    params: {data: /dev/zero}\n".to_vec(), "not a regular file or folder"),
        ("100,000 variables, each seeing the ones before it", format!("vars:\n{many_vars}stages:\n  - id: a\n    kind: write\n    params: {{text: \"x${{v99999}}\"}}\n").into_bytes(), ""),
    ];
    let mut refused = 0;
    let mut failures = Vec::new();
    let mut slowest = (0.0f64, "");
    let mut peak = (0u64, "");
    for (what, text, expected) in &cases {
        // `write` is a test kind the binary does not have: use the library for these.
        let (code, out, secs) = plan_library(dir.path(), text);
        let mb = out.split("FRONT-END: peak ").nth(1).and_then(|t| t.split(' ').next()).and_then(|t| t.parse().ok()).unwrap_or(0);
        if mb > peak.0 {
            peak = (mb, what);
        }
        if secs > slowest.0 {
            slowest = (secs, what);
        }
        let ok = if expected.is_empty() { code == Some(0) } else { code == Some(2) && out.contains(expected) };
        refused += usize::from(ok);
        if !ok || secs > 20.0 {
            failures.push(format!("{what}: exit {code:?} in {secs:.1}s, expected `{expected}`:\n{}", &out[..out.len().min(2000)]));
        }
    }
    let n = cases.len();
    report(&format!(
        "hostile pipelines: {refused}/{n} handled as expected (refused with a message, or accepted when legitimate), 0 crashes; slowest {:.1}s ({}, process start included), largest peak memory {} MB ({}; libtorch alone takes about 400 MB)",
        slowest.0, slowest.1, peak.0, peak.1
    ));
    assert!(peak.0 < 2048, "peak memory {} MB", peak.0);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Parse, expand and validate with the test kinds in a child process (so that a crash or a
/// stack overflow shows as such): exit 0 valid, 2 refused.
fn plan_library(dir: &Path, text: &[u8]) -> (Option<i32>, String, f64) {
    let file = dir.join("hostile.yaml");
    std::fs::write(&file, text).unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "input::front_end_entry", "--ignored", "--nocapture", "--test-threads=1"])
        .env("RIL_TEST_FRONT_END", &file)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let code = if text.contains("FRONT-END: valid") {
        Some(0)
    } else if text.contains("FRONT-END: refused") {
        Some(2)
    } else {
        out.status.code().map(|c| 100 + c)
    };
    (code, text, t.elapsed().as_secs_f64())
}

/// The body of [`plan_library`]'s child.
#[test]
#[ignore]
fn front_end_entry() {
    let Some(file) = std::env::var_os("RIL_TEST_FRONT_END") else { return };
    match ril_pipe::pipeline::load_resolved(Path::new(&file), &registry_schemas(), &[]) {
        Ok(p) => report(&format!("FRONT-END: valid, {} stages", p.stages.len())),
        Err(e) => report(&format!("FRONT-END: refused: {e}")),
    }
    report(&format!("FRONT-END: peak {} MB", peak_rss_mb()));
}

#[test]
fn malformed_pipelines_are_refused_with_a_position_and_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let world = world("random");
    let base = format!("  - id: base\n    kind: tiny_world\n    params: {{root: {}}}\n", world.display());
    let with_base = |rest: &str| format!("stages:\n{base}{rest}").into_bytes();
    // (what, text, --set, expected in the message)
    let cases: Vec<(&str, Vec<u8>, Vec<&str>, &str)> = vec![
        ("YAML syntax error", b"stages:\n  - id: a\n   kind: [\n".to_vec(), vec![], "YAML syntax error"),
        ("tab indentation", b"stages:\n\t- id: a\n".to_vec(), vec![], "YAML syntax error"),
        ("an empty file", b"".to_vec(), vec![], "missing `stages:`"),
        ("a list at the top", b"- a\n- b\n".to_vec(), vec![], "must be a mapping"),
        ("random bytes", (0..=255u8).cycle().take(3000).collect(), vec![], "small.yaml"),
        ("not UTF-8", b"stages:\n  - id: \xff\xfe\n".to_vec(), vec![], "small.yaml"),
        ("an unknown top-level key", b"stagez: []\n".to_vec(), vec![], "unknown key `stagez`"),
        ("`stages` not a list", b"stages: {a: 1}\n".to_vec(), vec![], "must be a list"),
        ("`stages` empty", b"stages: []\n".to_vec(), vec![], "`stages` is empty"),
        ("a stage without kind", b"stages:\n  - id: a\n".to_vec(), vec![], "stage without `kind`"),
        ("an unknown kind", with_base("  - id: a\n    kind: finetun\n"), vec![], "did you mean `finetune`"),
        ("an unknown parameter", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    params: {imgs: 3}\n"), vec![], "unknown key `imgs`"),
        ("a wrong type", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    params: {images_per_prompt: many}\n"), vec![], "expected an integer"),
        ("a bad enum value", with_base("  - id: f\n    kind: finetune\n    inputs: {model: base}\n    params: {task: aesthetic, method: ridd}\n"), vec![], "expected one of"),
        ("an unknown task", with_base("  - id: f\n    kind: finetune\n    inputs: {model: base}\n    params: {task: beauty, method: rid}\n"), vec![], "unknown task `beauty`"),
        ("a missing file", b"stages:\n  - id: base\n    kind: tiny_world\n    params: {root: /no/such/world}\n".to_vec(), vec![], "does not exist"),
        ("a device as a file", b"stages:\n  - id: base\n    kind: tiny_world\n    params: {root: /dev/zero}\n".to_vec(), vec![], "not a regular file or folder"),
        ("a missing required input", with_base("  - id: e\n    kind: evaluate\n"), vec![], "missing required input `model`"),
        ("a dangling input", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: bse}\n"), vec![], "refers to unknown stage `bse`"),
        ("a glob that matches nothing", with_base("  - id: f\n    kind: forgetting\n    inputs: {evals: [\"eval/*\"]}\n"), vec![], "matches no stage"),
        ("a stage that reads itself", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: e}\n"), vec![], "takes itself as input"),
        ("a cycle", with_base("  - id: a\n    kind: finetune\n    inputs: {model: b}\n    params: {task: hps, method: rid}\n  - id: b\n    kind: finetune\n    inputs: {model: a}\n    params: {task: hps, method: rid}\n"), vec![], "stages form a cycle"),
        ("a duplicate id", with_base("  - id: base\n    kind: evaluate\n    inputs: {model: base}\n"), vec![], "also produced by stages[0]"),
        ("an id with ..", with_base("  - id: ../escape\n    kind: evaluate\n    inputs: {model: base}\n"), vec![], "not a valid stage id"),
        ("an absolute id", with_base("  - id: /etc/x\n    kind: evaluate\n    inputs: {model: base}\n"), vec![], "not a valid stage id"),
        ("a pipeline name with a slash", format!("name: ../../evil\nstages:\n{base}").into_bytes(), vec![], "not a valid pipeline name"),
        ("an unknown variable", with_base("  - id: e/${x}\n    kind: evaluate\n    inputs: {model: base}\n"), vec![], "unknown variable `x`"),
        ("an unclosed ${", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    params: {seed: \"${x\"}\n"), vec![], "unclosed"),
        ("an unset environment variable", b"vars: {r: \"${env.RIL_SURELY_UNSET}\"}\nstages:\n  - id: a\n    kind: tiny_world\n    params: {root: \"${r}\"}\n".to_vec(), vec![], "is not set"),
        ("a list spliced into text", with_base("  - id: e/${l}\n    kind: evaluate\n    inputs: {model: base}\n").into_iter().chain(b"vars: {l: [1, 2]}\n".iter().copied()).collect(), vec![], "cannot be spliced"),
        ("a matrix axis that is not a list", with_base("  - id: e/${m}\n    kind: evaluate\n    matrix: {m: 3}\n    inputs: {model: base}\n"), vec![], "must be a list"),
        ("an id without its matrix variable", with_base("  - id: e\n    kind: evaluate\n    matrix: {m: [1, 2]}\n    inputs: {model: base}\n"), vec![], "produced twice by this template"),
        ("an exclude of an unknown variable", with_base("  - id: e/${m}\n    kind: evaluate\n    matrix: {m: [1, 2]}\n    exclude: [{n: 1}]\n    inputs: {model: base}\n"), vec![], "is not a matrix variable"),
        ("an empty chain", with_base("  - id: c/${step}\n    kind: finetune\n    chain: {over: [], link: model, first: base}\n    params: {task: hps}\n"), vec![], "`chain.over` is empty"),
        ("a chain whose link is also given", with_base("  - id: c/${step}\n    kind: finetune\n    chain: {over: [hps], as: t, link: model, first: base}\n    inputs: {model: base}\n    params: {task: hps}\n"), vec![], "is set by the chain"),
        ("negative resources", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    resources: {gpus: -1}\n"), vec![], "non-negative integer"),
        ("a partition with a shell character", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    resources: {partition: \"gpu;rm\"}\n"), vec![], "must be a partition name"),
        ("a YAML tag", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    params: {seed: !custom 3}\n"), vec![], "YAML tags"),
        ("NaN as a number", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n    params: {guidance: .nan}\n"), vec![], "not a finite number"),
        ("a mapping key that is a list", b"vars: {[a, b]: 1}\nstages: []\n".to_vec(), vec![], "mapping keys must be plain text"),
        ("defaults of an unknown kind", format!("defaults: {{evalute: {{seed: 1}}}}\nstages:\n{base}").into_bytes(), vec![], "unknown stage kind `evalute`"),
        ("a --set of an unknown stage", with_base(""), vec!["nosuch.seed=1"], "no stage matches `nosuch`"),
        ("a --set that is not KEY=VALUE", with_base(""), vec!["novalue"], "expected KEY=VALUE"),
        ("a --set out of range", with_base("  - id: e\n    kind: evaluate\n    inputs: {model: base}\n"), vec!["e.guidance=-1"], "parameter `guidance`: expected a value >= 0, found -1.0"),
        ("a default out of range", format!("defaults: {{evaluate: {{images_per_prompt: 0}}}}\nstages:\n{base}  - id: e\n    kind: evaluate\n    inputs: {{model: base}}\n").into_bytes(), vec![], "parameter `images_per_prompt`: expected a value >= 1, found 0"),
    ];
    // Every numeric parameter of every shipped kind, just outside each end of its range.
    let generated = out_of_range_cases(&world, &base);
    assert!(generated.len() > 100, "{} out-of-range cases", generated.len());
    let cases: Vec<(String, Vec<u8>, Vec<&str>, String)> = cases.into_iter().map(|(what, text, sets, expected)| (what.to_string(), text, sets, expected.to_string())).chain(generated).collect();
    let mut refused = 0;
    let mut positioned = 0;
    let mut failures = Vec::new();
    for (what, text, sets, expected) in &cases {
        let (code, out, _) = run_text(dir.path(), "small.yaml", text, sets);
        // A message names the file, and (for problems inside it) its line and column.
        let named = out.contains("small.yaml:") || out.contains("--set ");
        let at_position = out.split("small.yaml:").skip(1).any(|rest| {
            let mut parts = rest.splitn(3, ':');
            parts.next().is_some_and(|n| n.parse::<usize>().is_ok()) && parts.next().is_some_and(|n| n.parse::<usize>().is_ok())
        });
        let ok = code == Some(2) && named && out.contains(expected.as_str()) && !dir.path().join("cache").exists();
        refused += usize::from(ok);
        positioned += usize::from(at_position);
        if !ok {
            failures.push(format!("{what}: exit {code:?}, expected `{expected}`:\n{out}"));
        }
    }
    let n = cases.len();
    report(&format!("malformed pipelines: {refused}/{n} refused by `ril-pipe run` with exit 2, a message naming the file and the problem ({positioned} with line:column) and nothing written, 0 crashes"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// For each numeric parameter of each shipped kind, a pipeline whose stage of that kind is valid
/// but for a value of that parameter just outside one end of its range (a list or mapping
/// parameter gets one such element); expected: the parameter, the range and the value.
fn out_of_range_cases(world: &Path, base: &str) -> Vec<(String, Vec<u8>, Vec<&'static str>, String)> {
    use ril_pipe::pipeline::schema::ParamType;
    let mut cases = Vec::new();
    for (kind, schema) in ril_pipe::stages::registry().schemas() {
        // The required parameters and inputs, valid (validation does not look at what an input is).
        let mut required = Map::new();
        for p in schema.params.iter().filter(|p| p.default.is_none()) {
            let value = match &p.ty {
                ParamType::Path => json!(world),
                ParamType::Enum(options) => json!(options[0]),
                ParamType::Reward => json!("aesthetic"),
                other => panic!("`{kind}.{}`: no valid value of {other:?} made up for a required parameter", p.name),
            };
            required.insert(p.name.to_string(), value);
        }
        let inputs: Map<String, Value> = schema.inputs.iter().filter(|i| i.required).map(|i| (i.name.to_string(), json!("base"))).collect();
        for p in schema.params.iter().filter(|p| p.ty.is_numeric()) {
            let range = p.range.unwrap_or_else(|| panic!("`{kind}.{}` has no range", p.name));
            let integer = matches!(&p.ty, ParamType::Int) || matches!(&p.ty, ParamType::List(t) | ParamType::Map(t) if **t == ParamType::Int);
            let step = if integer { 1.0 } else { 0.5 };
            let outside = [range.min.map(|b| if b.inclusive { b.value - step } else { b.value }), range.max.map(|b| if b.inclusive { b.value + step } else { b.value })];
            for bad in outside.into_iter().flatten() {
                let number = if integer { json!(bad as i64) } else { json!(bad) };
                let (value, at) = match &p.ty {
                    ParamType::List(_) => (json!([number]), "element 0: "),
                    ParamType::Map(_) | ParamType::RewardMap(_) => (json!({"aesthetic": number}), "key `aesthetic`: "),
                    _ => (number.clone(), ""),
                };
                let mut params = required.clone();
                params.insert(p.name.to_string(), value);
                let stage = format!("  - id: s\n    kind: {kind}\n    params: {}\n    inputs: {}\n", Value::Object(params), Value::Object(inputs.clone()));
                let found = if integer { number.to_string() } else { format!("{:?}", bad) };
                cases.push((
                    format!("`{kind}.{}` = {number}, outside {range}", p.name),
                    format!("stages:\n{base}{stage}").into_bytes(),
                    vec![],
                    format!("parameter `{}`: {at}", p.name) + &format!("expected a value {}", if range.min.is_some() && range.max.is_some() { format!("in {range}") } else { range.to_string() }) + &format!(", found {found}"),
                ));
            }
        }
    }
    cases
}

#[test]
fn defaults_are_interpolated() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count.txt");
    let text = format!(
        "vars:\n  greeting: hello\n  count: {}\n  steps: 3\ndefaults:\n  write: {{text: \"${{greeting}} world\", count_file: \"${{count}}\", steps: \"${{steps}}\"}}\nstages:\n  - id: a\n    kind: write\n",
        count.display()
    );
    let file = support::write_pipeline(dir.path(), "d.yaml", &text);
    let p = ril_pipe::pipeline::load_resolved(&file, &support::registry().schemas(), &[]).unwrap();
    assert_eq!(p.stages[0].params["text"], "hello world");
    assert_eq!(p.stages[0].params["count_file"], count.to_str().unwrap());
    assert_eq!(p.stages[0].params["steps"], 3, "a whole `${{...}}` keeps its type in defaults too");
    // `--set defaults.KIND.PARAM=V` is taken as written, like every --set value.
    let set = Override::parse("defaults.write.text=$${literal}").unwrap();
    let p = ril_pipe::pipeline::load_resolved(&file, &support::registry().schemas(), &[set]).unwrap();
    assert_eq!(p.stages[0].params["text"], "$${literal}");
    // An unknown variable in a default is an error at the default.
    let bad = support::write_pipeline(dir.path(), "bad.yaml", "defaults:\n  write: {text: \"${nope}\"}\nstages:\n  - id: a\n    kind: write\n");
    let err = ril_pipe::pipeline::load_resolved(&bad, &support::registry().schemas(), &[]).unwrap_err();
    let d = &err.diagnostics()[0];
    assert!(d.message.contains("unknown variable `nope`"), "{err}");
    assert_eq!(d.position.as_ref().map(|p| p.line), Some(2), "{err}");
    report(&format!("defaults: `${{...}}` in `defaults:` is interpolated (text, path, typed integer), errors located at the default"));
}

// ---------------------------------------------------------------- malformed weight files

/// A safetensors file from a header (as JSON text) and data bytes.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A tiny pickle writer for the opcodes torch.save uses.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(self, s: &str) -> Self {
        let mut b = vec![b'X'];
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
        self.op(&b)
    }
    fn int(self, v: i64) -> Self {
        let mut b = vec![0x8a, 8];
        b.extend_from_slice(&v.to_le_bytes());
        self.op(&b)
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn tuple(mut self, items: impl FnOnce(Self) -> Self) -> Self {
        self = self.op(b"(");
        items(self).op(b"t")
    }
    /// `_rebuild_tensor_v2(storage(key, numel), offset, size, stride, False, OrderedDict())`
    fn tensor(self, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Self {
        let (size, stride) = (size.to_vec(), stride.to_vec());
        self.global("torch._utils", "_rebuild_tensor_v2")
            .tuple(|p| {
                let p = p.tuple(|p| p.str("storage").global("torch", "FloatStorage").str(key).str("cpu").int(numel)).op(b"Q").int(offset);
                let p = size.iter().fold(p.op(b"("), |p, &v| p.int(v)).op(b"t");
                stride.iter().fold(p.op(b"("), |p, &v| p.int(v)).op(b"t").op(&[0x89]).global("collections", "OrderedDict").op(b")R")
            })
            .op(b"R")
    }
    /// `{name: tensor, ...}` of float storages `0`, `1`, ...
    fn state_dict(tensors: &[(&str, i64, i64, &[i64], &[i64])]) -> Self {
        let mut p = Pickle::default().op(&[0x80, 2]).op(b"}(");
        for (i, (name, numel, offset, size, stride)) in tensors.iter().enumerate() {
            p = p.str(name).tensor(&i.to_string(), *numel, *offset, size, stride);
        }
        p.op(b"u.")
    }
}

/// A torch.save-style zip: `archive/data.pkl` and `archive/data/<key>` entries.
fn torch_zip(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    torch_zip_with(pickle, storages, "data.pkl", b"little")
}

fn torch_zip_with(pickle: &[u8], storages: &[(&str, Vec<u8>)], pickle_name: &str, byteorder: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file(format!("archive/{pickle_name}"), opts).unwrap();
        zip.write_all(pickle).unwrap();
        zip.start_file("archive/byteorder", opts).unwrap();
        zip.write_all(byteorder).unwrap();
        for (key, data) in storages {
            zip.start_file(format!("archive/data/{key}"), opts).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }
    buf.into_inner()
}

fn floats(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

/// What reading a weight file came to, in this process (the library) and in the binary.
fn check_weights_file(path: &Path) -> (Result<usize, String>, Option<i32>, String) {
    let path_buf = path.to_path_buf();
    let library = std::panic::catch_unwind(move || ril_pipe::models::weights::load_weights(&path_buf).map(|t| t.len()).map_err(|e| e.to_string()))
        .unwrap_or_else(|_| Err("PANIC".into()));
    let out = ril(&["model", "inspect", s(path)]);
    (library, out.code, out.text)
}

#[test]
fn malformed_weight_files_are_rejected_with_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let valid_st = safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &floats(4));
    let mut cases: Vec<(String, &str, Vec<u8>, &str)> = vec![
        ("an empty safetensors file".into(), "safetensors", vec![], "header too small"),
        ("a header length cut short".into(), "safetensors", vec![1, 2, 3, 4], "header too small"),
        ("a header length of 2^63".into(), "safetensors", safetensors_bytes("{}", &[]).into_iter().enumerate().map(|(i, b)| if i == 7 { 0x80 } else { b }).collect(), "header too large"),
        ("a header longer than the file".into(), "safetensors", { let mut b = safetensors_bytes("{}", &[]); b[0] = 200; b }, "invalid header length"),
        ("a header that is not JSON".into(), "safetensors", safetensors_bytes("{not json", &[]), "invalid JSON in header"),
        ("a header that is not an object".into(), "safetensors", safetensors_bytes("[1, 2]", &[]), "invalid JSON in header"),
        ("data offsets beyond the file".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,1600]}}"#, &floats(4)), "invalid shape, data type, or offset"),
        ("a shape that lies about the data size".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,16]}}"#, &floats(4)), "invalid shape, data type, or offset"),
        ("a shape whose product overflows".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#, &floats(4)), "overflow computing buffer size"),
        ("an empty tensor with a dimension of 2^63".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}"#, &[]), "has a dimension of 9223372036854775808"),
        ("an empty tensor whose other dimensions overflow".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[0,0]}}"#, &[]), "overflow computing buffer size"),
        ("an unknown dtype".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#, &[0; 16]), "unknown variant `F128`"),
        ("overlapping tensors".into(), "safetensors", safetensors_bytes(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &floats(4)), "invalid offset for tensor"),
        ("a negative dimension".into(), "safetensors", safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}"#, &floats(4)), "expected usize"),
    ];
    for cut in [9, 20, 40, valid_st.len() - 1] {
        let expected = if cut < valid_st.len() - 16 { "invalid header length" } else { "incomplete metadata" };
        cases.push((format!("a safetensors file truncated to {cut} of {} bytes", valid_st.len()), "safetensors", valid_st[..cut].to_vec(), expected));
    }
    let marker = dir.path().join("pwned");
    let evil = |module: &str, name: &str, stack: bool| {
        let p = Pickle::default().op(&[0x80, 2]);
        let p = if stack { p.str(module).str(name).op(&[0x93]) } else { p.global(module, name) };
        torch_zip(&p.tuple(|p| p.str(&format!("touch {}", marker.display()))).op(b"R.").0, &[])
    };
    let one = Pickle::state_dict(&[("w", 4, 0, &[2, 2], &[2, 1])]).0;
    let mut truncated_zip = torch_zip(&one, &[("0", floats(4))]);
    truncated_zip.truncate(truncated_zip.len() / 2);
    let pickles: Vec<(String, &str, Vec<u8>, &str)> = vec![
        ("a pickle calling os.system".into(), "pt", evil("os", "system", false), "refused global `os.system`"),
        ("a pickle calling posix.system via STACK_GLOBAL".into(), "pt", evil("posix", "system", true), "refused global `posix.system`"),
        ("a pickle calling builtins.eval".into(), "bin", evil("builtins", "eval", false), "refused global `builtins.eval`"),
        ("a pickle calling subprocess.Popen".into(), "ckpt", evil("subprocess", "Popen", true), "refused global `subprocess.Popen`"),
        ("a pickle reaching for __builtin__.getattr".into(), "pth", evil("__builtin__", "getattr", false), "refused global `__builtin__.getattr`"),
        ("a string that declares 2^62 bytes".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, 0x8d]).op(&(1u64 << 62).to_le_bytes()).op(b"abc").0, &[]), "truncated file?"),
        ("bytes that declare 4 GB".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, b'B', 0xff, 0xff, 0xff, 0xff]).0, &[]), "truncated file?"),
        ("a storage that declares 2^60 elements".into(), "pt", torch_zip(&Pickle::state_dict(&[("w", 1 << 60, 0, &[2], &[1])]).0, &[("0", floats(2))]), "expected"),
        ("a view past its storage".into(), "pt", torch_zip(&Pickle::state_dict(&[("w", 4, 2, &[2, 2], &[2, 1])]).0, &[("0", floats(4))]), "exceeds its storage"),
        ("an offset of 2^63-1".into(), "pt", torch_zip(&Pickle::state_dict(&[("w", 4, i64::MAX, &[1], &[1])]).0, &[("0", floats(4))]), "exceeds its storage"),
        ("a negative size".into(), "pt", torch_zip(&Pickle::state_dict(&[("w", 4, 0, &[-4], &[1])]).0, &[("0", floats(4))]), "negative"),
        ("a size whose product overflows".into(), "pt", torch_zip(&Pickle::state_dict(&[("w", 4, 0, &[1 << 40, 1 << 40], &[0, 0])]).0, &[("0", floats(4))]), "size overflows"),
        ("a stride-0 view of 10^12 elements over one float".into(), "pt", torch_zip(&Pickle::state_dict(&[("w", 1, 0, &[1_000_000, 1_000_000], &[0, 0])]).0, &[("0", floats(1))]), "would take more than"),
        ("a storage entry shorter than declared".into(), "pt", torch_zip(&one, &[("0", floats(3))]), "holds 12 bytes, 16 expected"),
        ("a missing storage entry".into(), "pt", torch_zip(&one, &[]), "archive/data/0"),
        ("a memo reference to nothing".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, b'h', 7, b'.']).0, &[]), "memo key 7 not found"),
        ("a stack underflow".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, b's', b'.']).0, &[]), "stack underflow"),
        ("an unknown opcode".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, b'i']).0, &[]), "unsupported opcode"),
        ("a pickle that ends without STOP".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, b'}']).0, &[]), "truncated"),
        ("a root that is not a dict".into(), "pt", torch_zip(&Pickle::default().op(&[0x80, 2, b'N', b'.']).0, &[]), "not a state dict"),
        ("a legacy (pre-zip) pickle".into(), "pt", vec![0x80, 2, b'}', b'.'], "legacy"),
        ("random bytes".into(), "pt", (0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(), "not a PyTorch checkpoint"),
        ("a zip without data.pkl".into(), "pt", torch_zip_with(&one, &[("0", floats(4))], "data.pkx", b"little"), "data.pkl"),
        ("a zip cut in half".into(), "pt", truncated_zip, "zip"),
        ("big-endian storages".into(), "pt", torch_zip_with(&one, &[("0", floats(4))], "data.pkl", b"big"), "byte order `big`"),
    ];
    cases.extend(pickles);
    // A sharded index that points outside its folder.
    let index_case = ("a shard index naming ../ files".to_string(), "index.json", br#"{"weight_map": {"w": "../../etc/passwd.safetensors"}}"#.to_vec(), "not a weight file beside the index");
    cases.push(index_case);

    let mut rejected = 0;
    let mut crashes = 0;
    let mut failures = Vec::new();
    for (i, (what, ext, bytes, expected)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("case{i}.{ext}"));
        let file = if *ext == "index.json" { dir.path().join(format!("case{i}.safetensors.index.json")) } else { file };
        std::fs::write(&file, bytes).unwrap();
        let (library, code, text) = check_weights_file(&file);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let lib_ok = library.as_ref().is_err_and(|e| e != "PANIC" && e.contains(&name) && e.contains(expected));
        let bin_ok = code == Some(1) && text.contains(&name) && text.contains(expected);
        crashes += usize::from(code.is_none() || code == Some(101) || library.as_ref().is_err_and(|e| e == "PANIC"));
        rejected += usize::from(lib_ok && bin_ok);
        if !(lib_ok && bin_ok) {
            failures.push(format!("{what}: library {library:?}; `model inspect` exit {code:?}:\n{text}"));
        }
    }
    assert!(!marker.exists(), "a pickle ran code");

    // Right names, wrong contents: the random world's VAE with one tensor reshaped, or stored
    // as integers; checked by `model inspect` and by loading it to run (`model run`).
    let vae = world("random").join("diffusion/vae");
    let weights_name = "diffusion_pytorch_model.safetensors";
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(vae.join(weights_name)).unwrap();
    let target = "decoder.conv_in.weight";
    let latents = dir.path().join("latents.safetensors");
    tch::Tensor::write_safetensors(&[("latents", tch::Tensor::zeros([1, 4, 4, 4], (tch::Kind::Float, tch::Device::Cpu)))], &latents).unwrap();
    let wrong: Vec<(&str, fn(&tch::Tensor) -> tch::Tensor, &str, &str)> = vec![
        ("a VAE with a tensor of the wrong shape", |t| t.flatten(0, -1), "wrong shape", "has shape"),
        ("a VAE with integer weights", |t| t.to_kind(tch::Kind::Int64), "I64", "Int64"),
    ];
    for (i, (what, change, inspect_says, run_says)) in wrong.iter().enumerate() {
        let folder = dir.path().join(format!("vae{i}"));
        copy_tree(&vae, &folder);
        let changed: Vec<(String, tch::Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), if n == target { change(t) } else { t.shallow_clone() })).collect();
        tch::Tensor::write_safetensors(&changed, folder.join(weights_name)).unwrap();
        let inspect = ril(&["model", "inspect", s(&folder)]);
        let out = dir.path().join(format!("out{i}.safetensors"));
        let run = ril(&["model", "run", "vae-decode", "--weights", s(&folder), "--input", s(&latents), "--output", s(&out)]);
        let ok = inspect.code == Some(1)
            && inspect.text.contains(inspect_says)
            && inspect.text.contains(target)
            && run.code == Some(1)
            && run.text.contains(s(&folder))
            && run.text.contains(target)
            && run.text.contains(run_says)
            && !out.exists();
        rejected += usize::from(ok);
        if !ok {
            failures.push(format!("{what}: inspect exit {:?}:\n{}\nrun exit {:?}:\n{}", inspect.code, inspect.text, run.code, run.text));
        }
    }
    let n = cases.len() + wrong.len();
    report(&format!("malformed weight files: {rejected}/{n} rejected with a message naming the file and the problem (by the library and by `ril-pipe model inspect`), {crashes} crashes; no pickle ran code"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(crashes, 0);
}

#[test]
fn mutated_checkpoints_never_crash_the_readers() {
    let dir = tempfile::tempdir().unwrap();
    let n = repeat(6000);
    let mut rng = Rng(seed());
    let pickle = Pickle::state_dict(&[("a", 6, 0, &[2, 3], &[3, 1]), ("b", 4, 1, &[3], &[1])]).0;
    let storages = vec![("0", floats(6)), ("1", floats(4))];
    let zipped = torch_zip(&pickle, &storages);
    let st = safetensors_bytes(r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F16","shape":[4],"data_offsets":[24,32]}}"#, &floats(8));
    let (mut loaded, mut rejected, mut panics) = (0, 0, 0);
    let mut panicked = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let mutate = |bytes: &[u8], rng: &mut super::Rng| {
            let mut b = bytes.to_vec();
            for _ in 0..=rng.below(3) {
                let at = rng.below(b.len() as u64) as usize;
                match rng.below(3) {
                    0 => b[at] = rng.next() as u8,
                    1 => b.truncate(at.max(1)),
                    _ => b.insert(at, rng.next() as u8),
                }
            }
            b
        };
        // Pickle bytes mutated inside a valid zip (the VM is what is tried), the zip itself, or
        // the raw safetensors bytes, through the library's reader and through tch's (adapters,
        // checkpoints and FID references are read with it).
        let (file, bytes) = match i % 3 {
            0 => (dir.path().join(format!("m{i}.pt")), torch_zip(&mutate(&pickle, &mut rng), &storages)),
            1 => (dir.path().join(format!("m{i}.pt")), mutate(&zipped, &mut rng)),
            _ => (dir.path().join(format!("m{i}.safetensors")), mutate(&st, &mut rng)),
        };
        std::fs::write(&file, &bytes).unwrap();
        let f = file.clone();
        let outcome = std::panic::catch_unwind(move || {
            let ours = ril_pipe::models::weights::load_weights(&f).is_ok();
            if f.extension().is_some_and(|e| e == "safetensors") {
                let _ = tch::Tensor::read_safetensors(&f);
            }
            ours
        });
        match outcome {
            Ok(true) => loaded += 1,
            Ok(false) => rejected += 1,
            Err(_) => {
                panics += 1;
                panicked.push(file.display().to_string());
                continue;
            }
        }
        std::fs::remove_file(&file).unwrap();
    }
    report(&format!(
        "mutated checkpoints: {n} mutated pickles, zip archives and safetensors files ({:.1}s): {loaded} loaded, {rejected} rejected with an error, {panics} panics, 0 crashes",
        started.elapsed().as_secs_f64()
    ));
    assert!(panicked.is_empty(), "panics on: {panicked:?}");
}

/// A dict of 200,000 entries: filling it must stay linear.
#[test]
fn a_pickle_with_a_huge_dict_is_read_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pickle::default().op(&[0x80, 2]).op(b"}(");
    for i in 0..200_000 {
        p = p.str(&format!("k{i}")).op(b"K\x01");
    }
    let file = dir.path().join("huge_dict.pt");
    std::fs::write(&file, torch_zip(&p.op(b"u.").0, &[])).unwrap();
    let t = Instant::now();
    let err = ril_pipe::models::weights::load_weights(&file).unwrap_err().to_string();
    let secs = t.elapsed().as_secs_f64();
    assert!(err.contains("is a int, not a tensor"), "{err}");
    report(&format!("huge pickle dict: 200,000 entries read and refused (not tensors) in {secs:.2}s"));
    assert!(secs < 10.0);
}


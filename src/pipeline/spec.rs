//! The pipeline file as written: top-level structure and stage templates, before expansion.
//!
//! ```yaml
//! name: demo                 # optional; default: the file name without extension
//! description: ...           # optional
//! vars: {...}                # variables for ${...}; --set vars.NAME=VALUE overrides them
//! defaults: {KIND: {...}}    # parameter defaults per stage kind
//! rewards:                   # rewards of your own, used by name wherever a task is named
//!   redness: {torchscript: rewards/redness.pt, direction: higher, label: Redness, letter: R}
//! stages:
//!   - id: ft/${method}/${order}/${step}
//!     kind: finetune
//!     matrix: {method: [baseline, rid], order: ${orders}}
//!     exclude: [{method: baseline, order: AHC}]
//!     chain: {over: ${order}, as: task, link: model, first: base}
//!     inputs: {reward_models: rewards}
//!     params: {task: ${task}}
//!     resources: {gpus: 1, cpus: 4, mem_gb: 32, time_min: 240, partition: gpu}
//!     meta: {label: ...}
//! ```
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::records::{Metric, RewardDirection, Task};

use super::error::{Diagnostic, PipelineError};
use super::locate::YamlPath;

/// A parsed pipeline file.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub file: PathBuf,
    /// The text, kept to locate errors found later.
    pub source: String,
    pub name: String,
    pub description: Option<String>,
    pub vars: Map<String, Value>,
    pub defaults: Map<String, Value>,
    /// The rewards declared in `rewards:`, by name.
    pub rewards: BTreeMap<String, RewardSpec>,
    pub stages: Vec<StageTemplate>,
}

/// One entry of `rewards:`: a TorchScript reward of the user's.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSpec {
    /// The archive as written (relative paths are read from the pipeline's folder).
    pub torchscript: String,
    pub direction: RewardDirection,
    /// Column title in tables and charts (default: the name).
    pub label: String,
    /// Its letter in task orders (default: the name's first letter, upper case).
    pub letter: char,
}

impl RewardSpec {
    pub fn path(name: &str) -> YamlPath {
        YamlPath::root().key("rewards").key(name)
    }
}

/// One entry of `stages:`; expands into one or more stages.
#[derive(Debug, Clone)]
pub struct StageTemplate {
    /// Position in `stages:` (for error paths).
    pub index: usize,
    pub id: String,
    pub kind: String,
    /// A mapping, or a `${...}` string that evaluates to one (as for `inputs`, `resources`,
    /// `meta`).
    pub params: Value,
    pub inputs: Value,
    pub matrix: Option<Value>,
    pub exclude: Vec<Value>,
    pub chain: Option<ChainSpec>,
    pub resources: Value,
    pub meta: Value,
}

impl StageTemplate {
    pub fn path(&self) -> YamlPath {
        YamlPath::root().key("stages").index(self.index)
    }
}

/// A chain: one stage per element of `over`, each taking the previous one as its `link` input.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    /// A list, or a string whose characters are the elements (`AHC` -> A, H, C).
    pub over: Value,
    /// The variable bound to the element (default `item`); `step` (1-based) and `prev` are
    /// bound too.
    pub var: String,
    /// The input that receives the previous stage of the chain.
    pub link: String,
    /// The stage the first element takes as its `link` input.
    pub first: String,
}

const TOP_KEYS: &[&str] = &["name", "description", "vars", "defaults", "rewards", "stages"];
const REWARD_KEYS: &[&str] = &["torchscript", "direction", "label", "letter"];
/// The fields of an evaluation's `scores.jsonl` besides the metrics (a declared reward's score
/// is a field of it too).
const SCORE_FIELDS: [&str; 5] = ["prompt", "image", "text", "png_bytes", "jpeg_bytes"];
const STAGE_KEYS: &[&str] = &["id", "kind", "params", "inputs", "matrix", "exclude", "chain", "resources", "meta"];
const CHAIN_KEYS: &[&str] = &["over", "as", "link", "first"];

/// Largest size accepted for a pipeline file; anything larger is not a hand-written pipeline.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Reads and parses a pipeline file.
pub fn load(file: &Path) -> Result<PipelineSpec, PipelineError> {
    let read_err = |reason: String| PipelineError::Read {
        file: file.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(file).map_err(|e| read_err(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(read_err(format!("{} bytes is larger than the {} bytes a pipeline may have", meta.len(), MAX_FILE_BYTES)));
    }
    let source = std::fs::read_to_string(file).map_err(|e| read_err(e.to_string()))?;
    parse(file, source)
}

/// Parses pipeline text (`file` is used for names and messages only).
pub fn parse(file: &Path, source: String) -> Result<PipelineSpec, PipelineError> {
    let value = parse_yaml(file, &source)?;
    let mut diags = Vec::new();
    let spec = build(file, &source, value, &mut diags);
    if !diags.is_empty() {
        return Err(PipelineError::invalid(file.to_path_buf(), &source, diags));
    }
    Ok(spec)
}

/// YAML text to a JSON value (the typed form every later step works on).
fn parse_yaml(file: &Path, source: &str) -> Result<Value, PipelineError> {
    let syntax = |e: yaml_serde::Error| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        PipelineError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: e.to_string(),
        }
    };
    if let Some((line, column)) = deep_flow_nesting(source) {
        return Err(PipelineError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: format!("`[` and `{{` nest more than {MAX_FLOW_DEPTH} deep"),
        });
    }
    let mut value: yaml_serde::Value = yaml_serde::from_str(source).map_err(syntax)?;
    value.apply_merge().map_err(syntax)?;
    let mut diags = Vec::new();
    let json = yaml_to_json(&value, &YamlPath::root(), &mut diags);
    if !diags.is_empty() {
        return Err(PipelineError::invalid(file.to_path_buf(), source, diags));
    }
    Ok(json)
}

/// The YAML parser refuses documents nested deeper than 128 levels, but only after reading
/// them, in time that grows with the square of the depth (hours for a 4 MB file of `[`).
const MAX_FLOW_DEPTH: usize = 128;

/// Where `[` or `{` first nest deeper than [`MAX_FLOW_DEPTH`] (outside quotes and comments), as
/// 1-based line and column.
fn deep_flow_nesting(source: &str) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let (mut single, mut double, mut comment, mut escaped) = (false, false, false, false);
    let mut previous = '\n';
    for c in source.chars() {
        column += 1;
        if c == '\n' {
            (line, column, comment) = (line + 1, 0, false);
        } else if double {
            double = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if single {
            single = c != '\'';
        } else if !comment {
            // Quotes open a scalar only where one can start (`don't` is plain text).
            let at_start = previous.is_whitespace() || matches!(previous, '[' | '{' | ',' | ':');
            match c {
                '"' if at_start => double = true,
                '\'' if at_start => single = true,
                '#' if previous.is_whitespace() => comment = true,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some((line, column));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        previous = c;
    }
    None
}

/// Converts a YAML value, reporting what JSON cannot hold (non-string keys, tags, NaN).
pub fn yaml_to_json(value: &yaml_serde::Value, path: &YamlPath, diags: &mut Vec<Diagnostic>) -> Value {
    use yaml_serde::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match serde_json::Number::from_f64(f) {
                    Some(num) => Value::Number(num),
                    None => {
                        diags.push(Diagnostic::new(path.clone(), format!("{f} is not a finite number")));
                        Value::Null
                    }
                }
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(items) => Value::Array(items.iter().enumerate().map(|(i, v)| yaml_to_json(v, &path.index(i), diags)).collect()),
        Y::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => {
                        diags.push(Diagnostic::new(path.clone(), "mapping keys must be plain text"));
                        continue;
                    }
                };
                let v = yaml_to_json(v, &path.key(&key), diags);
                out.insert(key, v);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            diags.push(Diagnostic::new(path.clone(), format!("YAML tags ({}) are not supported here", t.tag)));
            Value::Null
        }
    }
}

/// Keys of `map` not in `allowed` as diagnostics on the key itself.
pub fn check_keys(map: &Map<String, Value>, allowed: &[&str], path: &YamlPath, what: &str, diags: &mut Vec<Diagnostic>) {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            let hint = closest(key, allowed.iter().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            diags.push(Diagnostic::new(
                path.key_name(key),
                format!("unknown key `{key}` in {what} (allowed: {}){hint}", allowed.join(", ")),
            ));
        }
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = word.chars().count();
    if len < 3 {
        return None;
    }
    let limit = (len / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn as_map(value: &Value, path: &YamlPath, what: &str, diags: &mut Vec<Diagnostic>) -> Map<String, Value> {
    match value {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => {
            diags.push(Diagnostic::new(path.clone(), format!("{what} must be a mapping, found a {}", super::interp::type_name(other))));
            Map::new()
        }
    }
}

/// A mapping, or a string (a `${...}` that must evaluate to a mapping at expansion).
fn map_or_expression(value: Option<&Value>, path: &YamlPath, what: &str, diags: &mut Vec<Diagnostic>) -> Value {
    match value {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(v @ Value::String(s)) if s.contains("${") => v.clone(),
        Some(other) => {
            diags.push(Diagnostic::new(path.clone(), format!("{what} must be a mapping (or a ${{...}} that gives one), found a {}", super::interp::type_name(other))));
            Value::Object(Map::new())
        }
    }
}

fn as_string(value: Option<&Value>, path: &YamlPath, what: &str, diags: &mut Vec<Diagnostic>) -> Option<String> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            diags.push(Diagnostic::new(path.clone(), format!("{what} must not be empty")));
            None
        }
        Some(other) => {
            diags.push(Diagnostic::new(path.clone(), format!("{what} must be a string, found a {}", super::interp::type_name(other))));
            None
        }
        None => None,
    }
}

fn build(file: &Path, source: &str, doc: Value, diags: &mut Vec<Diagnostic>) -> PipelineSpec {
    let root = YamlPath::root();
    let top = match doc {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => {
            diags.push(Diagnostic::new(root.clone(), format!("a pipeline must be a mapping with `stages:`, found a {}", super::interp::type_name(&other))));
            Map::new()
        }
    };
    check_keys(&top, TOP_KEYS, &root, "the pipeline", diags);
    let default_name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into());
    let name = as_string(top.get("name"), &root.key("name"), "`name`", diags).unwrap_or(default_name);
    if !is_safe_name(&name) {
        diags.push(Diagnostic::new(root.key("name"), format!("`{name}` is not a valid pipeline name (letters, digits, `_`, `-`, `.`; it names the report folder)")));
    }
    let description = as_string(top.get("description"), &root.key("description"), "`description`", diags);
    let vars = as_map(top.get("vars").unwrap_or(&Value::Null), &root.key("vars"), "`vars`", diags);
    let defaults = as_map(top.get("defaults").unwrap_or(&Value::Null), &root.key("defaults"), "`defaults`", diags);
    for (kind, params) in &defaults {
        if !params.is_object() {
            diags.push(Diagnostic::new(root.key("defaults").key(kind), "defaults of a kind must be a mapping of parameters"));
        }
    }
    let rewards = build_rewards(top.get("rewards").unwrap_or(&Value::Null), diags);
    let mut stages = Vec::new();
    match top.get("stages") {
        Some(Value::Array(items)) => {
            if items.is_empty() {
                diags.push(Diagnostic::new(root.key("stages"), "`stages` is empty"));
            }
            for (index, item) in items.iter().enumerate() {
                if let Some(t) = build_stage(index, item, diags) {
                    stages.push(t);
                }
            }
        }
        Some(other) => diags.push(Diagnostic::new(root.key("stages"), format!("`stages` must be a list, found a {}", super::interp::type_name(other)))),
        None => diags.push(Diagnostic::new(root, "missing `stages:` (the list of stages to run)")),
    }
    PipelineSpec {
        file: file.to_path_buf(),
        source: source.to_string(),
        name,
        description,
        vars,
        defaults,
        rewards,
        stages,
    }
}

/// `rewards:`: each name declared once, not a built-in one, with a TorchScript file, a direction
/// and a letter of its own.
fn build_rewards(value: &Value, diags: &mut Vec<Diagnostic>) -> BTreeMap<String, RewardSpec> {
    let root = YamlPath::root().key("rewards");
    let builtin: Vec<&str> = Task::BUILTIN.iter().map(Task::name).collect();
    let mut out: BTreeMap<String, RewardSpec> = BTreeMap::new();
    for (name, entry) in as_map(value, &root, "`rewards`", diags) {
        let path = RewardSpec::path(&name);
        if builtin.contains(&name.as_str()) {
            diags.push(Diagnostic::new(root.key_name(&name), format!("`{name}` is a built-in reward and cannot be redeclared (built-in: {}); give yours another name", builtin.join(", "))));
            continue;
        }
        let reserved = Metric::BUILTIN.iter().map(Metric::key).chain(SCORE_FIELDS).find(|k| *k == name);
        if let Some(key) = reserved {
            diags.push(Diagnostic::new(root.key_name(&name), format!("`{key}` names a built-in metric or a field of `scores.jsonl`; give your reward another name")));
            continue;
        }
        if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) || !is_safe_name(&name) || name.contains('.') {
            diags.push(Diagnostic::new(root.key_name(&name), format!("`{name}` is not a valid reward name (a letter, then letters, digits, `_` or `-`; it names metrics and columns)")));
            continue;
        }
        let Value::Object(map) = &entry else {
            diags.push(Diagnostic::new(path, format!("reward `{name}` must be a mapping with `torchscript` (and `direction`, `label`, `letter`)")));
            continue;
        };
        check_keys(map, REWARD_KEYS, &path, &format!("reward `{name}`"), diags);
        let torchscript = as_string(map.get("torchscript"), &path.key("torchscript"), "`torchscript`", diags);
        if map.get("torchscript").is_none() {
            diags.push(Diagnostic::new(path.clone(), format!("reward `{name}` needs `torchscript` (the path of its TorchScript archive, relative to the pipeline file)")));
        }
        let direction = match map.get("direction") {
            None => Some(RewardDirection::Higher),
            Some(v) => match v.as_str().and_then(RewardDirection::parse) {
                Some(d) => Some(d),
                None => {
                    diags.push(Diagnostic::new(path.key("direction"), format!("`direction` must be `higher` or `lower`, found `{}`", v.as_str().map_or_else(|| v.to_string(), str::to_string))));
                    None
                }
            },
        };
        let label = as_string(map.get("label"), &path.key("label"), "`label`", diags).unwrap_or_else(|| name.clone());
        let default_letter = name.chars().next().map(|c| c.to_ascii_uppercase());
        let letter = match map.get("letter") {
            None => default_letter,
            Some(Value::String(s)) if s.len() == 1 && s.chars().all(|c| c.is_ascii_uppercase()) => s.chars().next(),
            Some(other) => {
                diags.push(Diagnostic::new(path.key("letter"), format!("`letter` must be one upper-case letter (A-Z), found `{}`", other.as_str().map_or_else(|| other.to_string(), str::to_string))));
                None
            }
        };
        if let Some(l) = letter {
            let taken = Task::BUILTIN.iter().find(|t| t.builtin_letter() == Some(l)).map(|t| t.name().to_string()).or_else(|| out.iter().find(|(_, r)| r.letter == l).map(|(n, _)| n.clone()));
            if let Some(other) = taken {
                let key = if map.contains_key("letter") { path.key("letter") } else { path.clone() };
                diags.push(Diagnostic::new(key, format!("reward `{name}`: letter {l} (its letter in task orders) is `{other}`'s already; give it another with `letter:`")));
                continue;
            }
        }
        if let (Some(torchscript), Some(direction), Some(letter)) = (torchscript, direction, letter) {
            out.insert(name, RewardSpec { torchscript, direction, label, letter });
        }
    }
    out
}

/// Names that become file or folder names.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn build_stage(index: usize, item: &Value, diags: &mut Vec<Diagnostic>) -> Option<StageTemplate> {
    let path = YamlPath::root().key("stages").index(index);
    let Value::Object(map) = item else {
        diags.push(Diagnostic::new(path, "a stage must be a mapping with `id` and `kind`"));
        return None;
    };
    check_keys(map, STAGE_KEYS, &path, "a stage", diags);
    let id = as_string(map.get("id"), &path.key("id"), "`id`", diags);
    let kind = as_string(map.get("kind"), &path.key("kind"), "`kind`", diags);
    if map.get("id").is_none() {
        diags.push(Diagnostic::new(path.clone(), "stage without `id`"));
    }
    if map.get("kind").is_none() {
        diags.push(Diagnostic::new(path.clone(), "stage without `kind`"));
    }
    let params = map_or_expression(map.get("params"), &path.key("params"), "`params`", diags);
    let inputs = map_or_expression(map.get("inputs"), &path.key("inputs"), "`inputs`", diags);
    let resources = map_or_expression(map.get("resources"), &path.key("resources"), "`resources`", diags);
    let meta = map_or_expression(map.get("meta"), &path.key("meta"), "`meta`", diags);
    let exclude = match map.get("exclude") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(other) => {
            diags.push(Diagnostic::new(path.key("exclude"), format!("`exclude` must be a list of mappings, found a {}", super::interp::type_name(other))));
            Vec::new()
        }
    };
    let chain = map.get("chain").and_then(|c| build_chain(c, &path.key("chain"), diags));
    Some(StageTemplate {
        index,
        id: id?,
        kind: kind?,
        params,
        inputs,
        matrix: map.get("matrix").cloned(),
        exclude,
        chain,
        resources,
        meta,
    })
}

fn build_chain(value: &Value, path: &YamlPath, diags: &mut Vec<Diagnostic>) -> Option<ChainSpec> {
    let Value::Object(map) = value else {
        diags.push(Diagnostic::new(path.clone(), "`chain` must be a mapping with `over`, `link` and `first`"));
        return None;
    };
    check_keys(map, CHAIN_KEYS, path, "`chain`", diags);
    let Some(over) = map.get("over").cloned() else {
        diags.push(Diagnostic::new(path.clone(), "`chain` needs `over` (a list, or a string of one-letter elements)"));
        return None;
    };
    let var = as_string(map.get("as"), &path.key("as"), "`chain.as`", diags).unwrap_or_else(|| "item".to_string());
    let link = as_string(map.get("link"), &path.key("link"), "`chain.link`", diags);
    let first = as_string(map.get("first"), &path.key("first"), "`chain.first`", diags);
    if link.is_none() {
        diags.push(Diagnostic::new(path.clone(), "`chain` needs `link` (the input that takes the previous stage)"));
    }
    if first.is_none() {
        diags.push(Diagnostic::new(path.clone(), "`chain` needs `first` (the stage the first element starts from)"));
    }
    Some(ChainSpec {
        over,
        var,
        link: link?,
        first: first?,
    })
}

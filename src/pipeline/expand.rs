//! Expansion: variables, `--set` overrides, matrices and chains turn stage templates into
//! concrete stages; then each stage is checked against its kind's schema and the references
//! between stages are resolved.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Map, Value};

use super::error::{Diagnostic, PipelineError};
use super::interp::{interpolate, interpolate_str, scalar_to_text, type_name, Env, Scope};
use super::locate::YamlPath;
use super::resolved::{DeclaredReward, MissingFile, ResolvedPipeline, ResolvedStage, Resources};
use super::schema::{KindSchema, ParamType, Range};
use super::spec::{check_keys, closest, PipelineSpec, RewardSpec, StageTemplate};
use super::{dag, glob};

/// A pipeline refuses to expand into more stages than this (a typo in a matrix should not
/// allocate millions of stages).
pub const MAX_STAGES: usize = 10_000;

/// A `--set KEY=VALUE` from the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as given, for messages.
    pub arg: String,
    pub target: OverrideTarget,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OverrideTarget {
    /// `vars.NAME[.KEY...]`: a variable, before expansion.
    Var(Vec<String>),
    /// `defaults.KIND.PARAM`: a kind's default in this pipeline.
    Default { kind: String, param: String },
    /// `STAGE.PARAM`, where STAGE is an expanded stage id or a glob over them (`ft/*/AHC/1`).
    Stage { pattern: String, param: String },
}

impl Override {
    /// Parses `KEY=VALUE`; VALUE is read as YAML (`1e-4` is a number, `[a, b]` a list).
    pub fn parse(arg: &str) -> Result<Override, PipelineError> {
        let fail = |message: String| PipelineError::Override {
            arg: arg.to_string(),
            message,
        };
        let (key, raw) = arg.split_once('=').ok_or_else(|| fail("expected KEY=VALUE".into()))?;
        let key = key.trim();
        let yaml: yaml_serde::Value = yaml_serde::from_str(raw).map_err(|e| fail(format!("value is not valid YAML: {e}")))?;
        let mut diags = Vec::new();
        let value = super::spec::yaml_to_json(&yaml, &YamlPath::root(), &mut diags);
        if let Some(d) = diags.first() {
            return Err(fail(d.message.clone()));
        }
        let target = if let Some(rest) = key.strip_prefix("vars.") {
            let segs: Vec<String> = rest.split('.').map(str::to_string).collect();
            if segs.iter().any(String::is_empty) {
                return Err(fail("expected vars.NAME or vars.NAME.KEY".into()));
            }
            OverrideTarget::Var(segs)
        } else if let Some(rest) = key.strip_prefix("defaults.") {
            let (kind, param) = rest.split_once('.').ok_or_else(|| fail("expected defaults.KIND.PARAM".into()))?;
            if kind.is_empty() || param.is_empty() || param.contains('.') {
                return Err(fail("expected defaults.KIND.PARAM".into()));
            }
            OverrideTarget::Default {
                kind: kind.to_string(),
                param: param.to_string(),
            }
        } else {
            let (pattern, param) = key
                .rsplit_once('.')
                .ok_or_else(|| fail("expected STAGE.PARAM, vars.NAME or defaults.KIND.PARAM".into()))?;
            if pattern.is_empty() || param.is_empty() {
                return Err(fail("expected STAGE.PARAM".into()));
            }
            OverrideTarget::Stage {
                pattern: pattern.to_string(),
                param: param.to_string(),
            }
        };
        Ok(Override {
            arg: arg.to_string(),
            target,
            value,
        })
    }
}

/// The kinds the pipeline may use, by name.
pub type Schemas = BTreeMap<String, KindSchema>;

/// Whether files named by `Path` parameters must exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    /// To run: a missing file is an error.
    Require,
    /// To plan: missing files are recorded in the stage (`missing_files`) and reported.
    Record,
}

/// Expands and validates a parsed pipeline, to run it. Nothing is run and nothing is written.
pub fn resolve(spec: &PipelineSpec, schemas: &Schemas, overrides: &[Override], env: &dyn Env) -> Result<ResolvedPipeline, PipelineError> {
    resolve_with(spec, schemas, overrides, env, FileCheck::Require)
}

/// [`resolve`], choosing how missing files are treated.
pub fn resolve_with(spec: &PipelineSpec, schemas: &Schemas, overrides: &[Override], env: &dyn Env, file_check: FileCheck) -> Result<ResolvedPipeline, PipelineError> {
    let mut spec = spec.clone();
    apply_spec_overrides(&mut spec, schemas, overrides)?;
    let mut diags = Vec::new();
    let scope = resolve_vars(&spec, env, &mut diags);
    interpolate_defaults(&mut spec, overrides, &scope, env, &mut diags);
    check_defaults(&spec, schemas, &mut diags);
    let mut raw = Vec::new();
    if diags.is_empty() {
        expand_all(&spec, &scope, env, &mut raw, &mut diags);
    }
    if !diags.is_empty() {
        return Err(PipelineError::invalid(spec.file.clone(), &spec.source, diags));
    }
    apply_stage_overrides(&mut raw, schemas, overrides)?;
    let base_dir = spec.file.parent().map(Path::to_path_buf).unwrap_or_default();
    let rewards = resolve_rewards(&spec, &scope, env, &base_dir, file_check, &mut diags);
    let stages = finish_stages(&spec, &raw, schemas, &base_dir, file_check, &rewards, &mut diags);
    if !diags.is_empty() {
        return Err(PipelineError::invalid(spec.file.clone(), &spec.source, diags));
    }
    let ordered = dag::topological(&stages).map_err(|cycle| {
        let first = &raw[raw.iter().position(|r| r.id == cycle[0]).unwrap_or(0)];
        let mut path = first.path.clone();
        path = path.key("inputs");
        PipelineError::invalid(
            spec.file.clone(),
            &spec.source,
            vec![Diagnostic::new(path, format!("stages form a cycle: {} -> {}", cycle.join(" -> "), cycle[0]))],
        )
    })?;
    Ok(ResolvedPipeline {
        name: spec.name.clone(),
        source: spec.file.clone(),
        stages: ordered,
    })
}

fn apply_spec_overrides(spec: &mut PipelineSpec, schemas: &Schemas, overrides: &[Override]) -> Result<(), PipelineError> {
    for o in overrides {
        let fail = |message: String| PipelineError::Override {
            arg: o.arg.clone(),
            message,
        };
        match &o.target {
            OverrideTarget::Var(segs) => set_var(&mut spec.vars, segs, 0, &o.value).map_err(fail)?,
            OverrideTarget::Default { kind, param } => {
                let schema = schemas.get(kind).ok_or_else(|| fail(format!("unknown stage kind `{kind}`")))?;
                if !schema.params.iter().any(|p| p.name == param) {
                    return Err(fail(format!("kind `{kind}` has no parameter `{param}`")));
                }
                let entry = spec.defaults.entry(kind.clone()).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = entry {
                    m.insert(param.clone(), o.value.clone());
                }
            }
            OverrideTarget::Stage { .. } => {}
        }
    }
    Ok(())
}

/// Replaces the existing variable at `segs[depth..]` inside `map`.
fn set_var(map: &mut Map<String, Value>, segs: &[String], depth: usize, value: &Value) -> Result<(), String> {
    let name = &segs[depth];
    let known: Vec<String> = map.keys().cloned().collect();
    let Some(slot) = map.get_mut(name) else {
        return Err(format!("the pipeline has no variable `{}` (known here: {})", segs[..=depth].join("."), known.join(", ")));
    };
    if depth + 1 == segs.len() {
        *slot = value.clone();
        return Ok(());
    }
    match slot {
        Value::Object(inner) => set_var(inner, segs, depth + 1, value),
        _ => Err(format!("`vars.{}` is not a mapping", segs[..=depth].join("."))),
    }
}

/// Variables are resolved in the order written; each may use the ones before it and `env`.
fn resolve_vars(spec: &PipelineSpec, env: &dyn Env, diags: &mut Vec<Diagnostic>) -> Scope {
    let mut scope = Scope::new(Map::new());
    for (name, value) in &spec.vars {
        match interpolate(value, &scope, env) {
            Ok(v) => scope.set(name.clone(), v),
            Err(e) => diags.push(Diagnostic::new(YamlPath::root().key("vars").key(name), e)),
        }
        if scope.exhausted() {
            break;
        }
    }
    scope
}

/// `defaults:` values may use `${...}` like stage values, with the pipeline's variables and the
/// environment (a default is shared by every stage of its kind, so matrix and chain variables
/// are not visible). Values given with `--set defaults.KIND.PARAM=V` are taken as they are, as
/// are all `--set` values.
fn interpolate_defaults(spec: &mut PipelineSpec, overrides: &[Override], scope: &Scope, env: &dyn Env, diags: &mut Vec<Diagnostic>) {
    let from_command_line = |kind: &str, param: &str| {
        overrides.iter().any(|o| matches!(&o.target, OverrideTarget::Default { kind: k, param: p } if k == kind && p == param))
    };
    for (kind, params) in spec.defaults.iter_mut() {
        let Value::Object(params) = params else { continue };
        for (name, value) in params.iter_mut() {
            if from_command_line(kind, name) {
                continue;
            }
            match interpolate(value, scope, env) {
                Ok(v) => *value = v,
                Err(e) => diags.push(Diagnostic::new(YamlPath::root().key("defaults").key(kind).key(name), e)),
            }
        }
    }
}

fn check_defaults(spec: &PipelineSpec, schemas: &Schemas, diags: &mut Vec<Diagnostic>) {
    let root = YamlPath::root().key("defaults");
    for (kind, params) in &spec.defaults {
        let Some(schema) = schemas.get(kind) else {
            diags.push(Diagnostic::new(root.key_name(kind), unknown_kind(kind, schemas)));
            continue;
        };
        if let Value::Object(params) = params {
            let names: Vec<&str> = schema.params.iter().map(|p| p.name).collect();
            check_keys(params, &names, &root.key(kind), &format!("the parameters of `{kind}`"), diags);
        }
    }
}

fn unknown_kind(kind: &str, schemas: &Schemas) -> String {
    let hint = closest(kind, schemas.keys().map(String::as_str)).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
    let known: Vec<&str> = schemas.keys().map(String::as_str).collect();
    format!("unknown stage kind `{kind}` (known: {}){hint}", known.join(", "))
}

/// A stage after expansion, before type checks.
#[derive(Debug, Clone)]
struct RawStage {
    id: String,
    template: usize,
    path: YamlPath,
    kind: String,
    params: Map<String, Value>,
    inputs: Map<String, Value>,
    resources: Map<String, Value>,
    meta: BTreeMap<String, String>,
    /// Parameters set by `--set` (kept apart: they win over everything else).
    overridden: Map<String, Value>,
}

fn expand_all(spec: &PipelineSpec, scope: &Scope, env: &dyn Env, raw: &mut Vec<RawStage>, diags: &mut Vec<Diagnostic>) {
    for template in &spec.stages {
        let path = template.path();
        let combos = match matrix_combos(template, scope, env) {
            Ok(c) => c,
            Err(d) => {
                diags.push(d);
                continue;
            }
        };
        for combo in combos {
            let combo_scope = scope.child(combo.clone());
            let mut labels: BTreeMap<String, String> = combo
                .iter()
                .filter_map(|(k, v)| scalar_to_text(v).map(|t| (k.clone(), t)))
                .collect();
            match &template.chain {
                None => expand_one(template, &combo_scope, env, &labels, None, raw, diags),
                Some(chain) => {
                    let elements = match interpolate(&chain.over, &combo_scope, env) {
                        Ok(Value::Array(items)) => items,
                        Ok(Value::String(s)) => s.chars().map(|c| Value::String(c.to_string())).collect(),
                        Ok(other) => {
                            diags.push(Diagnostic::new(path.key("chain").key("over"), format!("`chain.over` must be a list or a string, found a {}", type_name(&other))));
                            continue;
                        }
                        Err(e) => {
                            diags.push(Diagnostic::new(path.key("chain").key("over"), e));
                            continue;
                        }
                    };
                    if elements.is_empty() {
                        diags.push(Diagnostic::new(path.key("chain").key("over"), "`chain.over` is empty"));
                        continue;
                    }
                    if raw.len() + elements.len() > MAX_STAGES {
                        diags.push(Diagnostic::new(path.key("chain").key("over"), format!("the pipeline expands to more than {MAX_STAGES} stages (this chain has {} elements)", elements.len())));
                        return;
                    }
                    let mut prev = match interpolate_str(&chain.first, &combo_scope, env) {
                        Ok(Value::String(s)) => s,
                        Ok(other) => {
                            diags.push(Diagnostic::new(path.key("chain").key("first"), format!("`chain.first` must name a stage, found a {}", type_name(&other))));
                            continue;
                        }
                        Err(e) => {
                            diags.push(Diagnostic::new(path.key("chain").key("first"), e));
                            continue;
                        }
                    };
                    if template.inputs.get(&chain.link).is_some() {
                        diags.push(Diagnostic::new(path.key("inputs").key_name(&chain.link), format!("input `{}` is set by the chain (`chain.link`); remove it here", chain.link)));
                        continue;
                    }
                    for (i, element) in elements.iter().enumerate() {
                        let mut vars = Map::new();
                        vars.insert(chain.var.clone(), element.clone());
                        vars.insert("step".into(), Value::from(i + 1));
                        vars.insert("prev".into(), Value::String(prev.clone()));
                        let step_scope = combo_scope.child(vars);
                        if let Some(t) = scalar_to_text(element) {
                            labels.insert(chain.var.clone(), t);
                        }
                        labels.insert("step".into(), (i + 1).to_string());
                        let before = raw.len();
                        expand_one(template, &step_scope, env, &labels, Some((&chain.link, &prev)), raw, diags);
                        match raw.get(before) {
                            Some(stage) if raw.len() > before => prev = stage.id.clone(),
                            _ => break,
                        }
                    }
                }
            }
            if raw.len() > MAX_STAGES {
                diags.push(Diagnostic::new(path.clone(), format!("the pipeline expands to more than {MAX_STAGES} stages; check the matrices")));
                return;
            }
            if scope.exhausted() {
                return;
            }
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for stage in raw.iter() {
        if let Some(&other) = seen.get(&stage.id) {
            let msg = if other == stage.template {
                format!("stage id `{}` is produced twice by this template: put the matrix and chain variables into the id", stage.id)
            } else {
                format!("stage id `{}` is also produced by stages[{other}]", stage.id)
            };
            diags.push(Diagnostic::new(stage.path.key("id"), msg));
            if diags.len() > 50 {
                return;
            }
        } else {
            seen.insert(stage.id.clone(), stage.template);
        }
    }
}

/// The matrix combinations of a template (one empty combination without a matrix).
fn matrix_combos(template: &StageTemplate, scope: &Scope, env: &dyn Env) -> Result<Vec<Map<String, Value>>, Diagnostic> {
    let path = template.path().key("matrix");
    let Some(matrix) = &template.matrix else {
        return Ok(vec![Map::new()]);
    };
    let matrix = interpolate(matrix, scope, env).map_err(|e| Diagnostic::new(path.clone(), e))?;
    let Value::Object(axes) = matrix else {
        return Err(Diagnostic::new(path, "`matrix` must map variable names to lists of values"));
    };
    let mut total: usize = 1;
    let mut lists = Vec::new();
    for (name, values) in &axes {
        let values = match values {
            Value::Array(v) if !v.is_empty() => v.clone(),
            Value::Array(_) => return Err(Diagnostic::new(path.key(name), format!("matrix variable `{name}` has no values"))),
            other => return Err(Diagnostic::new(path.key(name), format!("matrix variable `{name}` must be a list, found a {}", type_name(other)))),
        };
        total = total.saturating_mul(values.len());
        if total > MAX_STAGES {
            return Err(Diagnostic::new(path, format!("the matrix has more than {MAX_STAGES} combinations; a pipeline may expand to at most {MAX_STAGES} stages")));
        }
        lists.push((name.clone(), values));
    }
    // Every combination holds a copy of one value of each axis: count them before they exist.
    for (name, values) in &lists {
        let copies = total / values.len();
        for v in values {
            scope.charge_copies(v, 1, copies).map_err(|e| Diagnostic::new(path.key(name), e))?;
        }
    }
    let mut combos = vec![Map::new()];
    for (name, values) in &lists {
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for combo in &combos {
            for v in values {
                let mut c = combo.clone();
                c.insert(name.clone(), v.clone());
                next.push(c);
            }
        }
        combos = next;
    }
    for (i, rule) in template.exclude.iter().enumerate() {
        let rule_path = template.path().key("exclude").index(i);
        let rule = interpolate(rule, scope, env).map_err(|e| Diagnostic::new(rule_path.clone(), e))?;
        let Value::Object(rule) = rule else {
            return Err(Diagnostic::new(rule_path, "an `exclude` entry must be a mapping of matrix variables to values"));
        };
        for k in rule.keys() {
            if !axes.contains_key(k) {
                return Err(Diagnostic::new(rule_path.key_name(k), format!("`{k}` is not a matrix variable of this stage")));
            }
        }
        combos.retain(|c| !rule.iter().all(|(k, v)| c.get(k) == Some(v)));
    }
    Ok(combos)
}

fn expand_one(
    template: &StageTemplate,
    scope: &Scope,
    env: &dyn Env,
    labels: &BTreeMap<String, String>,
    link: Option<(&String, &String)>,
    raw: &mut Vec<RawStage>,
    diags: &mut Vec<Diagnostic>,
) {
    let path = template.path();
    let before = diags.len();
    let mut field = |value: &Value, key: &str| -> Map<String, Value> {
        let mut out = Map::new();
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match interpolate(v, scope, env) {
                        Ok(v) => {
                            out.insert(k.clone(), v);
                        }
                        Err(e) => diags.push(Diagnostic::new(path.key(key).key(k), e)),
                    }
                }
            }
            other => match interpolate(other, scope, env) {
                Ok(Value::Object(map)) => out = map,
                Ok(v) => diags.push(Diagnostic::new(path.key(key), format!("`{key}` must give a mapping, `{other}` gives a {}", type_name(&v)))),
                Err(e) => diags.push(Diagnostic::new(path.key(key), e)),
            },
        }
        out
    };
    let params = field(&template.params, "params");
    let mut inputs = field(&template.inputs, "inputs");
    let resources = field(&template.resources, "resources");
    let meta_values = field(&template.meta, "meta");
    let id = match interpolate_str(&template.id, scope, env) {
        Ok(Value::String(s)) => s,
        Ok(other) => scalar_to_text(&other).unwrap_or_default(),
        Err(e) => {
            diags.push(Diagnostic::new(path.key("id"), e));
            return;
        }
    };
    if let Err(e) = check_stage_id(&id) {
        diags.push(Diagnostic::new(path.key("id"), e));
    }
    if diags.len() > before {
        return;
    }
    if let Some((name, prev)) = link {
        inputs.insert(name.clone(), Value::String(prev.clone()));
    }
    let mut meta = labels.clone();
    for (k, v) in meta_values {
        match scalar_to_text(&v) {
            Some(t) => {
                meta.insert(k, t);
            }
            None => diags.push(Diagnostic::new(path.key("meta").key(&k), "labels in `meta` must be scalars")),
        }
    }
    raw.push(RawStage {
        id,
        template: template.index,
        path,
        kind: template.kind.clone(),
        params,
        inputs,
        resources,
        meta,
        overridden: Map::new(),
    });
}

/// Stage ids are names in the journal and in messages: letters, digits and `_ - / + =`,
/// no dots (they separate the parameter in `--set STAGE.PARAM`), no empty path parts.
pub fn check_stage_id(id: &str) -> Result<(), String> {
    let ok_chars = id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | '+' | '='));
    if id.is_empty() || !ok_chars || id.split('/').any(str::is_empty) {
        return Err(format!("`{id}` is not a valid stage id (letters, digits, `_ - / + =`; no dots, no empty `/` parts)"));
    }
    Ok(())
}

fn apply_stage_overrides(raw: &mut [RawStage], schemas: &Schemas, overrides: &[Override]) -> Result<(), PipelineError> {
    for o in overrides {
        let OverrideTarget::Stage { pattern, param } = &o.target else {
            continue;
        };
        let fail = |message: String| PipelineError::Override {
            arg: o.arg.clone(),
            message,
        };
        let mut matched = 0;
        for stage in raw.iter_mut().filter(|s| glob::matches(pattern, &s.id)) {
            matched += 1;
            let known = schemas.get(&stage.kind).is_some_and(|s| s.params.iter().any(|p| p.name == param));
            if !known {
                return Err(fail(format!("stage `{}` (kind `{}`) has no parameter `{param}`", stage.id, stage.kind)));
            }
            stage.overridden.insert(param.clone(), o.value.clone());
        }
        if matched == 0 {
            let ids: Vec<&str> = raw.iter().map(|s| s.id.as_str()).collect();
            let hint = closest(pattern, ids.iter().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            return Err(fail(format!("no stage matches `{pattern}`{hint}")));
        }
    }
    Ok(())
}

/// A declared reward with its file made absolute; `missing` when the file is not there (only
/// when resolved for planning).
struct RewardFile {
    reward: DeclaredReward,
    missing: bool,
}

/// The `rewards:` of the pipeline with their files checked: each path (which may use `${...}`)
/// must exist (to run) or is recorded as missing (to plan). What the file holds is checked when
/// it is loaded.
fn resolve_rewards(spec: &PipelineSpec, scope: &Scope, env: &dyn Env, base_dir: &Path, file_check: FileCheck, diags: &mut Vec<Diagnostic>) -> BTreeMap<String, RewardFile> {
    let mut out = BTreeMap::new();
    for (name, r) in &spec.rewards {
        let at = RewardSpec::path(name).key("torchscript");
        let written = match interpolate_str(&r.torchscript, scope, env) {
            Ok(Value::String(s)) => std::path::PathBuf::from(s),
            Ok(other) => {
                diags.push(Diagnostic::new(at, format!("reward `{name}`: `torchscript` must be a path, found a {}", type_name(&other))));
                continue;
            }
            Err(e) => {
                diags.push(Diagnostic::new(at, e));
                continue;
            }
        };
        let full = if written.is_absolute() { written } else { base_dir.join(written) };
        let (torchscript, missing) = match full.canonicalize() {
            Ok(abs) if abs.is_file() => (abs, false),
            Ok(abs) => {
                diags.push(Diagnostic::new(at, format!("reward `{name}`: {} is not a file (a TorchScript archive is one `.pt` file)", abs.display())));
                continue;
            }
            Err(_) if file_check == FileCheck::Record => (full, true),
            Err(e) => {
                diags.push(Diagnostic::new(at, format!("reward `{name}`: {} does not exist or cannot be read ({e}); relative paths are read from the pipeline's folder", full.display())));
                continue;
            }
        };
        let reward = DeclaredReward { torchscript, direction: r.direction, label: r.label.clone(), letter: r.letter };
        out.insert(name.clone(), RewardFile { reward, missing });
    }
    out
}

fn finish_stages(
    spec: &PipelineSpec,
    raw: &[RawStage],
    schemas: &Schemas,
    base_dir: &Path,
    file_check: FileCheck,
    rewards: &BTreeMap<String, RewardFile>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<ResolvedStage> {
    let ids: Vec<&str> = raw.iter().map(|s| s.id.as_str()).collect();
    let mut stages = Vec::with_capacity(raw.len());
    // One message per template and problem is enough: a matrix repeats its mistakes.
    let mut reported: std::collections::HashSet<(YamlPath, String)> = std::collections::HashSet::new();
    let mut push = |diags: &mut Vec<Diagnostic>, d: Diagnostic| {
        if reported.insert((d.path.clone(), d.message.clone())) {
            diags.push(d);
        }
    };
    for stage in raw {
        let Some(schema) = schemas.get(&stage.kind) else {
            push(diags, Diagnostic::new(stage.path.key("kind"), unknown_kind(&stage.kind, schemas)));
            continue;
        };
        let mut local = Vec::new();
        let mut files = FileSink {
            check: file_check,
            declared: spec.rewards.keys().cloned().collect(),
            ..FileSink::default()
        };
        let mut missing_files = Vec::new();
        let params = type_params(spec, stage, schema, base_dir, &mut files, &mut missing_files, &mut local);
        let mut used = BTreeMap::new();
        for (name, file) in rewards.iter().filter(|(name, _)| schema.reads_declared_rewards || files.rewards.contains(name)) {
            if file.missing {
                missing_files.push(MissingFile {
                    param: format!("rewards.{name}"),
                    path: file.reward.torchscript.clone(),
                    doc: format!("the TorchScript archive of reward `{name}`"),
                });
            }
            used.insert(name.clone(), file.reward.clone());
        }
        let inputs = resolve_inputs(stage, schema, &ids, &mut local);
        let resources = parse_resources(&stage.resources, &stage.path.key("resources"), &mut local);
        let failed = !local.is_empty();
        for d in local {
            push(diags, d);
        }
        if failed {
            continue;
        }
        let mut files = files.found;
        files.sort();
        files.dedup();
        stages.push(ResolvedStage {
            id: stage.id.clone(),
            kind: stage.kind.clone(),
            params,
            inputs,
            files,
            missing_files,
            rewards: used,
            meta: stage.meta.clone(),
            resources,
        });
    }
    stages
}

/// Where [`check_type`] puts the files of `Path` parameters and the declared rewards that
/// `Reward` parameters name.
#[derive(Debug)]
pub struct FileSink {
    pub check: FileCheck,
    /// Existing files, absolute.
    pub found: Vec<std::path::PathBuf>,
    /// Files that do not exist (with [`FileCheck::Record`]).
    pub missing: Vec<std::path::PathBuf>,
    /// The names the pipeline declares in `rewards:` (besides the built-in ones, the tasks a
    /// `Reward` parameter may name).
    pub declared: Vec<String>,
    /// The declared rewards named so far.
    pub rewards: Vec<String>,
}

impl Default for FileSink {
    fn default() -> Self {
        FileSink {
            check: FileCheck::Require,
            found: Vec::new(),
            missing: Vec::new(),
            declared: Vec::new(),
            rewards: Vec::new(),
        }
    }
}

/// Checks that `name` is a built-in reward task or one the pipeline declares (recorded in
/// `files.rewards`).
fn check_reward(name: &str, files: &mut FileSink) -> Result<(), String> {
    let builtin: Vec<&str> = crate::records::Task::BUILTIN.iter().map(crate::records::Task::name).collect();
    if builtin.contains(&name) {
        return Ok(());
    }
    if files.declared.iter().any(|d| d == name) {
        if !files.rewards.iter().any(|r| r == name) {
            files.rewards.push(name.to_string());
        }
        return Ok(());
    }
    let declared = if files.declared.is_empty() { "none; declare yours in `rewards:`".to_string() } else { files.declared.join(", ") };
    let hint = closest(name, builtin.iter().copied().chain(files.declared.iter().map(String::as_str))).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
    Err(format!("unknown task `{name}` (built-in: {}; declared in `rewards:`: {declared}){hint}", builtin.join(", ")))
}

fn type_params(
    spec: &PipelineSpec,
    stage: &RawStage,
    schema: &KindSchema,
    base_dir: &Path,
    files: &mut FileSink,
    missing_files: &mut Vec<super::resolved::MissingFile>,
    diags: &mut Vec<Diagnostic>,
) -> Map<String, Value> {
    let path = stage.path.key("params");
    let names: Vec<&str> = schema.params.iter().map(|p| p.name).collect();
    check_keys(&stage.params, &names, &path, &format!("the parameters of `{}`", schema.kind), diags);
    let pipeline_defaults = spec.defaults.get(&stage.kind).and_then(Value::as_object);
    let mut out = Map::new();
    for p in &schema.params {
        let (value, where_) = if let Some(v) = stage.overridden.get(p.name) {
            (v.clone(), path.key(p.name))
        } else if let Some(v) = stage.params.get(p.name) {
            (v.clone(), path.key(p.name))
        } else if let Some(v) = pipeline_defaults.and_then(|d| d.get(p.name)) {
            (v.clone(), YamlPath::root().key("defaults").key(&stage.kind).key(p.name))
        } else if let Some(v) = &p.default {
            (v.clone(), path.clone())
        } else {
            diags.push(Diagnostic::new(path.clone(), format!("stage `{}`: missing required parameter `{}` ({})", stage.id, p.name, p.doc)));
            continue;
        };
        let optional = p.default.as_ref().is_some_and(Value::is_null);
        if value.is_null() && optional {
            out.insert(p.name.to_string(), Value::Null);
            continue;
        }
        let missing_before = files.missing.len();
        let checked = check_type(&value, &p.ty, base_dir, files).and_then(|v| match &p.range {
            Some(range) => check_range(&v, range).map(|()| v),
            None => Ok(v),
        });
        match checked {
            Ok(v) => {
                for path in &files.missing[missing_before..] {
                    missing_files.push(super::resolved::MissingFile {
                        param: p.name.to_string(),
                        path: path.clone(),
                        doc: p.doc.to_string(),
                    });
                }
                out.insert(p.name.to_string(), v);
            }
            Err(e) => {
                // For files, say what the file is and where it comes from (the parameter's doc).
                let what = if matches!(p.ty, ParamType::Path) { format!("; this is {}", p.doc) } else { String::new() };
                diags.push(Diagnostic::new(where_, format!("stage `{}`: parameter `{}`: {e}{what}", stage.id, p.name)));
            }
        }
    }
    out
}

/// Checks a value against a parameter type, converting where the conversion is lossless
/// (an integer given for a float). `Path` values become absolute and are recorded in `files`.
pub fn check_type(value: &Value, ty: &ParamType, base_dir: &Path, files: &mut FileSink) -> Result<Value, String> {
    let found = || format!("found {} `{}`", type_name(value), short(value));
    match ty {
        ParamType::Bool => value.as_bool().map(Value::Bool).ok_or_else(|| format!("expected true or false, {}", found())),
        ParamType::Int => match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Value::from(f as i64)),
                _ => Err(format!("expected an integer, {}", found())),
            },
            _ => Err(format!("expected an integer, {}", found())),
        },
        ParamType::Float => match value.as_f64() {
            Some(f) if value.is_number() => serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| "not a finite number".to_string()),
            _ => Err(format!("expected a number, {}", found())),
        },
        ParamType::String => match value {
            Value::String(_) => Ok(value.clone()),
            _ => Err(format!("expected a string, {}", found())),
        },
        ParamType::Enum(options) => match value.as_str() {
            Some(s) if options.contains(&s) => Ok(value.clone()),
            _ => {
                let hint = value.as_str().and_then(|s| closest(s, options.iter().copied())).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
                Err(format!("expected one of {}, {}{hint}", options.join(", "), found()))
            }
        },
        ParamType::Path => {
            let Some(s) = value.as_str() else {
                return Err(format!("expected a path, {}", found()));
            };
            let candidate = Path::new(s);
            let full = if candidate.is_absolute() { candidate.to_path_buf() } else { base_dir.join(candidate) };
            match full.canonicalize() {
                // A device or a pipe would be read (hashed) forever.
                Ok(abs) if !(abs.is_file() || abs.is_dir()) => Err(format!("{} is not a regular file or folder", abs.display())),
                Ok(abs) => {
                    files.found.push(abs.clone());
                    Ok(Value::String(abs.to_string_lossy().into_owned()))
                }
                Err(_) if files.check == FileCheck::Record => {
                    files.missing.push(full.clone());
                    Ok(Value::String(full.to_string_lossy().into_owned()))
                }
                Err(e) => Err(format!("{} does not exist or cannot be read ({e}); relative paths are read from the pipeline's folder", full.display())),
            }
        }
        ParamType::Reward => match value.as_str() {
            Some(name) => check_reward(name, files).map(|()| value.clone()),
            None => Err(format!("expected the name of a reward task, {}", found())),
        },
        ParamType::RewardMap(inner) => match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    check_reward(k, files)?;
                    out.insert(k.clone(), check_type(v, inner, base_dir, files).map_err(|e| format!("key `{k}`: {e}"))?);
                }
                Ok(Value::Object(out))
            }
            _ => Err(format!("expected a mapping from reward tasks to values, {}", found())),
        },
        ParamType::List(inner) => match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| check_type(v, inner, base_dir, files).map_err(|e| format!("element {i}: {e}")))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            _ => Err(format!("expected a list, {}", found())),
        },
        ParamType::Map(inner) => match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    out.insert(k.clone(), check_type(v, inner, base_dir, files).map_err(|e| format!("key `{k}`: {e}"))?);
                }
                Ok(Value::Object(out))
            }
            _ => Err(format!("expected a mapping, {}", found())),
        },
        ParamType::Any => Ok(value.clone()),
    }
}

/// Checks every number of a typed value (a number, or the numbers of a list or mapping)
/// against a parameter's range.
pub fn check_range(value: &Value, range: &Range) -> Result<(), String> {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(x) if range.contains(x) => Ok(()),
            _ => {
                let wanted = if range.min.is_some() && range.max.is_some() { format!("in {range}") } else { range.to_string() };
                Err(format!("expected a value {wanted}, found {n}"))
            }
        },
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| check_range(v, range).map_err(|e| format!("element {i}: {e}"))),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| check_range(v, range).map_err(|e| format!("key `{k}`: {e}"))),
        _ => Ok(()),
    }
}

fn short(value: &Value) -> String {
    let s = value.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

fn resolve_inputs(stage: &RawStage, schema: &KindSchema, ids: &[&str], diags: &mut Vec<Diagnostic>) -> BTreeMap<String, Vec<String>> {
    let path = stage.path.key("inputs");
    let names: Vec<&str> = schema.inputs.iter().map(|i| i.name).collect();
    check_keys(&stage.inputs, &names, &path, &format!("the inputs of `{}`", schema.kind), diags);
    let mut out = BTreeMap::new();
    for spec in &schema.inputs {
        let Some(value) = stage.inputs.get(spec.name) else {
            if spec.required {
                diags.push(Diagnostic::new(path.clone(), format!("stage `{}`: missing required input `{}` ({})", stage.id, spec.name, spec.doc)));
            }
            continue;
        };
        let refs: Vec<String> = match value {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) if items.iter().all(Value::is_string) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            other => {
                diags.push(Diagnostic::new(path.key(spec.name), format!("an input must be a stage id or a list of them, found a {}", type_name(other))));
                continue;
            }
        };
        let mut resolved = Vec::new();
        for r in &refs {
            if glob::is_pattern(r) {
                let hits: Vec<String> = ids.iter().filter(|id| glob::matches(r, id)).map(|s| s.to_string()).collect();
                if hits.is_empty() {
                    diags.push(Diagnostic::new(path.key(spec.name), format!("stage `{}`: input pattern `{r}` matches no stage", stage.id)));
                }
                resolved.extend(hits);
            } else if ids.contains(&r.as_str()) {
                resolved.push(r.clone());
            } else {
                let hint = closest(r, ids.iter().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
                diags.push(Diagnostic::new(path.key(spec.name), format!("stage `{}`: input `{}` refers to unknown stage `{r}`{hint}", stage.id, spec.name)));
            }
        }
        resolved.retain(|r| r != &stage.id || {
            diags.push(Diagnostic::new(path.key(spec.name), format!("stage `{}` takes itself as input `{}`", stage.id, spec.name)));
            false
        });
        if !spec.many && resolved.len() > 1 {
            diags.push(Diagnostic::new(path.key(spec.name), format!("stage `{}`: input `{}` takes one stage, found {}", stage.id, spec.name, resolved.len())));
        }
        out.insert(spec.name.to_string(), resolved);
    }
    out
}

const RESOURCE_KEYS: &[&str] = &["gpus", "cpus", "mem_gb", "time_min", "partition"];

fn parse_resources(map: &Map<String, Value>, path: &YamlPath, diags: &mut Vec<Diagnostic>) -> Resources {
    check_keys(map, RESOURCE_KEYS, path, "`resources`", diags);
    let mut r = Resources::default();
    let int = |key: &str, diags: &mut Vec<Diagnostic>| -> Option<u64> {
        let v = map.get(key)?;
        match v.as_u64() {
            Some(n) => Some(n),
            None => {
                diags.push(Diagnostic::new(path.key(key), format!("`{key}` must be a non-negative integer, found {} `{v}`", type_name(v))));
                None
            }
        }
    };
    if let Some(g) = int("gpus", diags) {
        r.gpus = Some(u32::try_from(g).unwrap_or(u32::MAX));
    }
    r.cpus = int("cpus", diags).map(|c| u32::try_from(c).unwrap_or(u32::MAX));
    r.time_min = int("time_min", diags);
    if let Some(v) = map.get("mem_gb") {
        match v.as_f64() {
            Some(m) if m > 0.0 => r.mem_gb = Some(m),
            _ => diags.push(Diagnostic::new(path.key("mem_gb"), format!("`mem_gb` must be a positive number, found `{v}`"))),
        }
    }
    if let Some(v) = map.get("partition") {
        match v.as_str() {
            Some(p) if !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ',')) => r.partition = Some(p.to_string()),
            _ => diags.push(Diagnostic::new(path.key("partition"), format!("`partition` must be a partition name, found `{v}`"))),
        }
    }
    r
}

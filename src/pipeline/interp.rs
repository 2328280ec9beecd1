//! `${...}` interpolation in pipeline values.
//!
//! - `${name}`, `${name.key}`, `${name[0]}`: a variable (pipeline `vars`, matrix and chain
//!   variables), with map keys and list indices after it.
//! - `${env.NAME}` and `${env.NAME:-default}`: an environment variable.
//! - Nesting is resolved from the inside out: `${epochs.${task}}`.
//! - A string that is exactly one `${...}` takes the type of the value (a number, a list, a
//!   map); anywhere else the value is spliced into the text, which needs a scalar.
//! - `$${` writes a literal `${`.
//!
//! Variables may copy each other, so a small file could describe values that double at every
//! step. Everything interpolation produces for one pipeline is therefore counted against one
//! budget ([`MAX_EXPANDED_BYTES`]), values may nest only [`MAX_DEPTH`] deep, and `${` only
//! [`MAX_NESTING`] deep.
use std::cell::Cell;
use std::rc::Rc;

use serde_json::{Map, Value};

/// What all values interpolated for one pipeline may add up to, in approximate bytes (a string
/// counts its length, every other value [`NODE_BYTES`]).
pub const MAX_EXPANDED_BYTES: usize = 64 << 20;
/// The deepest a value may nest (lists and mappings inside each other) after interpolation.
pub const MAX_DEPTH: usize = 64;
/// The deepest `${` may nest inside `${`.
pub const MAX_NESTING: usize = 16;
const NODE_BYTES: usize = 32;

/// Variables visible to an expression: layers searched from the innermost out. Children share
/// their parent's layers (cheap to make) and its budget.
#[derive(Debug, Clone)]
pub struct Scope {
    layers: Vec<Rc<Map<String, Value>>>,
    /// Approximate bytes interpolation may still produce.
    budget: Rc<Cell<usize>>,
}

impl Scope {
    pub fn new(vars: Map<String, Value>) -> Self {
        Scope {
            layers: vec![Rc::new(vars)],
            budget: Rc::new(Cell::new(MAX_EXPANDED_BYTES)),
        }
    }

    /// A scope with `vars` shadowing this one.
    pub fn child(&self, vars: Map<String, Value>) -> Self {
        let mut layers = self.layers.clone();
        layers.push(Rc::new(vars));
        Scope {
            layers,
            budget: self.budget.clone(),
        }
    }

    /// Adds (or replaces) a variable of the innermost layer.
    pub fn set(&mut self, name: String, value: Value) {
        if let Some(last) = self.layers.last_mut() {
            Rc::make_mut(last).insert(name, value);
        }
    }

    /// Whether the expansion budget is spent: an interpolation failed for it, and every further
    /// one fails too.
    pub fn exhausted(&self) -> bool {
        self.budget.get() == 0
    }

    /// Counts `bytes` against the budget.
    pub fn charge(&self, bytes: usize) -> Result<(), String> {
        match self.budget.get().checked_sub(bytes) {
            Some(left) if left > 0 => {
                self.budget.set(left);
                Ok(())
            }
            _ => {
                self.budget.set(0);
                Err(format!(
                    "the pipeline's values expand to more than {} MiB (variables that copy each other many times?)",
                    MAX_EXPANDED_BYTES >> 20
                ))
            }
        }
    }

    /// Counts `copies` copies of `value` placed `depth` levels deep against the budget and the
    /// depth limit, before they are made.
    pub fn charge_copies(&self, value: &Value, depth: usize, copies: usize) -> Result<(), String> {
        match measure(value, depth, self.budget.get()) {
            Ok(bytes) => self.charge(bytes.saturating_mul(copies)),
            Err(Measure::TooDeep) => Err(too_deep()),
            Err(Measure::TooLarge) => self.charge(usize::MAX),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.layers.iter().rev().find_map(|l| l.get(name))
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.layers.iter().flat_map(|l| l.keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
    }
}

enum Measure {
    TooDeep,
    TooLarge,
}

fn too_deep() -> String {
    format!("values may nest at most {MAX_DEPTH} lists or mappings deep")
}

/// The approximate size of `value` placed `depth` levels deep; stops as soon as it exceeds
/// `limit` or [`MAX_DEPTH`], so measuring costs no more than the budget allows.
fn measure(value: &Value, depth: usize, limit: usize) -> Result<usize, Measure> {
    if depth > MAX_DEPTH {
        return Err(Measure::TooDeep);
    }
    let mut total = NODE_BYTES;
    match value {
        Value::String(s) => total = total.saturating_add(s.len()),
        Value::Array(items) => {
            for v in items {
                total = total.saturating_add(measure(v, depth + 1, limit)?);
                if total > limit {
                    return Err(Measure::TooLarge);
                }
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                total = total.saturating_add(k.len()).saturating_add(measure(v, depth + 1, limit)?);
                if total > limit {
                    return Err(Measure::TooLarge);
                }
            }
        }
        _ => {}
    }
    if total > limit {
        Err(Measure::TooLarge)
    } else {
        Ok(total)
    }
}

/// Reads environment variables; a trait so tests need not touch the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Expr(Vec<Part>),
}

fn parse(s: &str) -> Result<Vec<Part>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut pos = 0;
    let parts = parse_parts(&chars, &mut pos, 0)?;
    Ok(parts)
}

/// `nesting`: how many `${` enclose this part (0 at the top).
fn parse_parts(chars: &[char], pos: &mut usize, nesting: usize) -> Result<Vec<Part>, String> {
    if nesting > MAX_NESTING {
        return Err(format!("`${{` nests more than {MAX_NESTING} deep"));
    }
    let inside = nesting > 0;
    let mut parts = Vec::new();
    let mut text = String::new();
    while *pos < chars.len() {
        let c = chars[*pos];
        if c == '$' && chars.get(*pos + 1) == Some(&'$') && chars.get(*pos + 2) == Some(&'{') {
            text.push_str("${");
            *pos += 3;
        } else if c == '$' && chars.get(*pos + 1) == Some(&'{') {
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            *pos += 2;
            let inner = parse_parts(chars, pos, nesting + 1)?;
            parts.push(Part::Expr(inner));
        } else if c == '}' && inside {
            *pos += 1;
            if !text.is_empty() {
                parts.push(Part::Text(text));
            }
            return Ok(parts);
        } else {
            text.push(c);
            *pos += 1;
        }
    }
    if inside {
        return Err("unclosed `${`".to_string());
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// Interpolates every string inside `value`.
pub fn interpolate(value: &Value, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    interpolate_at(value, 0, scope, env)
}

/// [`interpolate`] for a value placed `depth` levels deep.
fn interpolate_at(value: &Value, depth: usize, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    match value {
        Value::String(s) => interpolate_str_at(s, depth, scope, env),
        Value::Array(items) => {
            scope.charge(NODE_BYTES)?;
            items
                .iter()
                .map(|v| interpolate_at(v, depth + 1, scope, env))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Value::Object(map) => {
            scope.charge(NODE_BYTES)?;
            let mut out = Map::new();
            for (k, v) in map {
                scope.charge(k.len())?;
                out.insert(k.clone(), interpolate_at(v, depth + 1, scope, env)?);
            }
            Ok(Value::Object(out))
        }
        other => {
            scope.charge(NODE_BYTES)?;
            Ok(other.clone())
        }
    }
}

/// Interpolates one string; see the module documentation.
pub fn interpolate_str(s: &str, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    interpolate_str_at(s, 0, scope, env)
}

fn interpolate_str_at(s: &str, depth: usize, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    if !s.contains('$') {
        scope.charge(NODE_BYTES + s.len())?;
        return Ok(Value::String(s.to_string()));
    }
    let parts = parse(s)?;
    if let [Part::Expr(inner)] = parts.as_slice() {
        let expr = render(inner, scope, env)?;
        return evaluate(&expr, depth, scope, env);
    }
    render(&parts, scope, env).map(Value::String)
}

fn render(parts: &[Part], scope: &Scope, env: &dyn Env) -> Result<String, String> {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(t) => {
                scope.charge(t.len())?;
                out.push_str(t);
            }
            Part::Expr(inner) => {
                let expr = render(inner, scope, env)?;
                let value = evaluate(&expr, 0, scope, env)?;
                out.push_str(&scalar_to_text(&value).ok_or_else(|| {
                    format!("`${{{expr}}}` is a {} and cannot be spliced into text", type_name(&value))
                })?);
            }
        }
    }
    Ok(out)
}

/// Text of a scalar as it is spliced into strings (and used in stage labels).
pub fn scalar_to_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "mapping",
    }
}

#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn evaluate(expr: &str, depth: usize, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    let expr = expr.trim();
    if let Some(rest) = expr.strip_prefix("env.") {
        let (name, default) = match rest.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (rest, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{expr}}}`: `{name}` is not an environment variable name"));
        }
        let text = match (env.var(name), default) {
            (Some(v), _) if !v.is_empty() => v,
            (_, Some(d)) => d.to_string(),
            (_, None) => return Err(format!("environment variable `{name}` is not set (write `${{env.{name}:-default}}` to give a default)")),
        };
        scope.charge(NODE_BYTES + text.len())?;
        return Ok(Value::String(text));
    }
    let (name, steps) = parse_reference(expr)?;
    let mut value = scope.get(&name).ok_or_else(|| {
        let known = scope.names();
        format!("unknown variable `{name}` (known: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })
    })?;
    let mut walked = name.clone();
    for step in steps {
        value = match (&step, value) {
            (Step::Key(k), Value::Object(map)) => map.get(k).ok_or_else(|| {
                let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                format!("`{walked}` has no key `{k}` (keys: {})", keys.join(", "))
            })?,
            (Step::Index(i), Value::Array(items)) => items
                .get(*i)
                .ok_or_else(|| format!("`{walked}` has {} elements, index {i} is out of range", items.len()))?,
            (Step::Index(i), Value::String(s)) => {
                // Indexing a string picks a character: `${order[0]}` of "AHC" is "A".
                let c = s.chars().nth(*i).ok_or_else(|| format!("`{walked}` has {} characters, index {i} is out of range", s.chars().count()))?;
                scope.charge(NODE_BYTES + c.len_utf8())?;
                return Ok(Value::String(c.to_string()));
            }
            (Step::Key(k), other) => return Err(format!("`{walked}` is a {}, not a mapping: cannot take key `{k}`", type_name(other))),
            (Step::Index(i), other) => return Err(format!("`{walked}` is a {}, not a list: cannot take index {i}", type_name(other))),
        };
        match step {
            Step::Key(k) => walked = format!("{walked}.{k}"),
            Step::Index(i) => walked = format!("{walked}[{i}]"),
        }
    }
    scope.charge_copies(value, depth, 1)?;
    Ok(value.clone())
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

fn parse_reference(expr: &str) -> Result<(String, Vec<Step>), String> {
    let bad = || format!("`${{{expr}}}` is not a valid reference (expected `name`, `name.key` or `name[0]`)");
    let chars: Vec<char> = expr.chars().collect();
    let mut pos = 0;
    let take_name = |pos: &mut usize| {
        let start = *pos;
        while *pos < chars.len() && is_name_char(chars[*pos]) {
            *pos += 1;
        }
        chars[start..*pos].iter().collect::<String>()
    };
    let name = take_name(&mut pos);
    if name.is_empty() {
        return Err(bad());
    }
    let mut steps = Vec::new();
    while pos < chars.len() {
        match chars[pos] {
            '.' => {
                pos += 1;
                let key = take_name(&mut pos);
                if key.is_empty() {
                    return Err(bad());
                }
                steps.push(Step::Key(key));
            }
            '[' => {
                pos += 1;
                let start = pos;
                while pos < chars.len() && chars[pos].is_ascii_digit() {
                    pos += 1;
                }
                let digits: String = chars[start..pos].iter().collect();
                if digits.is_empty() || chars.get(pos) != Some(&']') {
                    return Err(bad());
                }
                pos += 1;
                steps.push(Step::Index(digits.parse().map_err(|_| bad())?));
            }
            _ => return Err(bad()),
        }
    }
    Ok((name, steps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct FakeEnv;
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            (name == "HOME_DIR").then(|| "/home/x".to_string())
        }
    }

    fn scope() -> Scope {
        let vars = json!({
            "lr": 0.001, "task": "A", "orders": ["AHC", "ACH"],
            "epochs": {"A": 10, "H": 120}, "name": "rid"
        });
        Scope::new(vars.as_object().unwrap().clone())
    }

    fn eval(s: &str) -> Result<Value, String> {
        interpolate_str(s, &scope(), &FakeEnv)
    }

    #[test]
    fn whole_expressions_keep_their_type() {
        assert_eq!(eval("${lr}").unwrap(), json!(0.001));
        assert_eq!(eval("${orders}").unwrap(), json!(["AHC", "ACH"]));
        assert_eq!(eval("${epochs.${task}}").unwrap(), json!(10));
        assert_eq!(eval("${orders[1]}").unwrap(), json!("ACH"));
        assert_eq!(eval("${orders[1][2]}").unwrap(), json!("H"));
    }

    #[test]
    fn text_splices_scalars() {
        assert_eq!(eval("ft/${name}/${task}-${epochs.A}").unwrap(), json!("ft/rid/A-10"));
        assert_eq!(eval("no dollars").unwrap(), json!("no dollars"));
        assert_eq!(eval("cost $$5 and $${lr}").unwrap(), json!("cost $$5 and ${lr}"));
        assert!(eval("x ${orders}").unwrap_err().contains("cannot be spliced"));
    }

    #[test]
    fn environment_with_defaults() {
        assert_eq!(eval("${env.HOME_DIR}/w").unwrap(), json!("/home/x/w"));
        assert_eq!(eval("${env.NOPE:-../weights}").unwrap(), json!("../weights"));
        assert!(eval("${env.NOPE}").unwrap_err().contains("not set"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(eval("${nope}").unwrap_err().contains("unknown variable `nope`"));
        assert!(eval("${epochs.C}").unwrap_err().contains("has no key `C`"));
        assert!(eval("${orders[5]}").unwrap_err().contains("out of range"));
        assert!(eval("${lr.x}").unwrap_err().contains("not a mapping"));
        assert!(eval("${lr").unwrap_err().contains("unclosed"));
        assert!(eval("${a b}").unwrap_err().contains("not a valid reference"));
    }

    #[test]
    fn child_scopes_shadow() {
        let inner = scope().child(json!({"task": "H"}).as_object().unwrap().clone());
        assert_eq!(interpolate_str("${epochs.${task}}", &inner, &FakeEnv).unwrap(), json!(120));
    }
}

//! `${...}` interpolation in pipeline values.
//!
//! - `${name}`, `${name.key}`, `${name[0]}`: a variable (pipeline `vars`, matrix and chain
//!   variables), with map keys and list indices after it.
//! - `${env.NAME}` and `${env.NAME:-default}`: an environment variable.
//! - Nesting is resolved from the inside out: `${epochs.${task}}`.
//! - A string that is exactly one `${...}` takes the type of the value (a number, a list, a
//!   map); anywhere else the value is spliced into the text, which needs a scalar.
//! - `$${` writes a literal `${`.
use serde_json::{Map, Value};

/// Variables visible to an expression: layers searched from the innermost out.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    layers: Vec<Map<String, Value>>,
}

impl Scope {
    pub fn new(vars: Map<String, Value>) -> Self {
        Scope { layers: vec![vars] }
    }

    /// A scope with `vars` shadowing this one.
    pub fn child(&self, vars: Map<String, Value>) -> Self {
        let mut layers = self.layers.clone();
        layers.push(vars);
        Scope { layers }
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
    let parts = parse_parts(&chars, &mut pos, false)?;
    Ok(parts)
}

fn parse_parts(chars: &[char], pos: &mut usize, inside: bool) -> Result<Vec<Part>, String> {
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
            let inner = parse_parts(chars, pos, true)?;
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
    match value {
        Value::String(s) => interpolate_str(s, scope, env),
        Value::Array(items) => items
            .iter()
            .map(|v| interpolate(v, scope, env))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.clone(), interpolate(v, scope, env)?);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// Interpolates one string; see the module documentation.
pub fn interpolate_str(s: &str, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    if !s.contains('$') {
        return Ok(Value::String(s.to_string()));
    }
    let parts = parse(s)?;
    if let [Part::Expr(inner)] = parts.as_slice() {
        let expr = render(inner, scope, env)?;
        return evaluate(&expr, scope, env);
    }
    render(&parts, scope, env).map(Value::String)
}

fn render(parts: &[Part], scope: &Scope, env: &dyn Env) -> Result<String, String> {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Expr(inner) => {
                let expr = render(inner, scope, env)?;
                let value = evaluate(&expr, scope, env)?;
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

fn evaluate(expr: &str, scope: &Scope, env: &dyn Env) -> Result<Value, String> {
    let expr = expr.trim();
    if let Some(rest) = expr.strip_prefix("env.") {
        let (name, default) = match rest.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (rest, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{expr}}}`: `{name}` is not an environment variable name"));
        }
        return match (env.var(name), default) {
            (Some(v), _) if !v.is_empty() => Ok(Value::String(v)),
            (_, Some(d)) => Ok(Value::String(d.to_string())),
            (_, None) => Err(format!("environment variable `{name}` is not set (write `${{env.{name}:-default}}` to give a default)")),
        };
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
        assert_eq!(eval("${env.NOPE:-../shared}").unwrap(), json!("../shared"));
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

//! Cache keys: blake3 over everything a stage's outputs depend on.
//!
//! A key covers the kind, its algorithm version, the canonical parameters (sorted keys, typed
//! values), the keys of the input stages (so a change upstream changes every key downstream),
//! and the content hashes of the external files the stage reads. File paths are replaced by
//! their content hash, so moving a weights folder does not invalidate results.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Input name -> (stage id, labels) of each upstream stage.
pub type InputLabels = BTreeMap<String, Vec<(String, BTreeMap<String, String>)>>;

/// What a key is computed from; kept in manifests and the journal to explain cache misses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingredients {
    pub kind: String,
    pub version: u32,
    /// Parameters with file paths replaced by `blake3:<hash>`.
    pub params: BTreeMap<String, Value>,
    /// Input name -> keys of the upstream objects, in order.
    pub inputs: BTreeMap<String, Vec<String>>,
    /// Input name -> ids and labels of the upstream stages, for kinds whose outputs depend on
    /// them (reports); `None` for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_labels: Option<InputLabels>,
    /// Absolute path -> content hash of each external file or folder.
    pub files: BTreeMap<String, String>,
    /// Name -> declaration of each declared reward the stage uses, its TorchScript archive by
    /// content hash only (renaming or moving the file keeps the key); absent when none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rewards: BTreeMap<String, Value>,
}

impl Ingredients {
    /// The key: 64 hex digits.
    pub fn key(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ril-pipe stage key v1\0");
        let mut text = String::new();
        canonical_json(&serde_json::to_value(self).unwrap_or(Value::Null), &mut text);
        hasher.update(text.as_bytes());
        hasher.finalize().to_hex().to_string()
    }

    /// Human-readable differences from an earlier version of the same stage, for `plan`.
    /// `upstream` names the stage ids behind input keys, where known.
    pub fn explain_change(&self, before: &Ingredients, upstream: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let mut why = Vec::new();
        if self.kind != before.kind {
            why.push(format!("kind changed: {} -> {}", before.kind, self.kind));
            return why;
        }
        if self.version != before.version {
            why.push(format!("code version of `{}` changed: {} -> {}", self.kind, before.version, self.version));
        }
        let is_file = |v: &Value| v.as_str().is_some_and(|s| s.starts_with("blake3:"));
        for (name, value) in &self.params {
            match before.params.get(name) {
                Some(old) if old == value => {}
                // A file whose content changed: reported below with its path.
                Some(old) if is_file(old) && is_file(value) => {}
                Some(old) => why.push(format!("param {name}: {} -> {}", brief(old), brief(value))),
                None => why.push(format!("param {name}: new, = {}", brief(value))),
            }
        }
        for name in before.params.keys().filter(|k| !self.params.contains_key(*k)) {
            why.push(format!("param {name}: removed"));
        }
        for (path, hash) in &self.files {
            match before.files.get(path) {
                Some(old) if old == hash => {}
                Some(_) => why.push(format!("file {path}: content changed")),
                None => why.push(format!("file {path}: new input file")),
            }
        }
        for (name, keys) in &self.inputs {
            if before.inputs.get(name) == Some(keys) {
                continue;
            }
            let changed: Vec<String> = keys
                .iter()
                .filter(|k| !before.inputs.get(name).is_some_and(|old| old.contains(k)))
                .map(|k| upstream(k).unwrap_or_else(|| short_key(k).to_string()))
                .collect();
            if changed.is_empty() {
                why.push(format!("input {name}: stages removed or reordered"));
            } else {
                why.push(format!("input {name} changed upstream: {}", changed.join(", ")));
            }
        }
        for (name, declaration) in &self.rewards {
            match before.rewards.get(name) {
                Some(old) if old == declaration => {}
                Some(old) if old.get("torchscript") != declaration.get("torchscript") => why.push(format!("reward {name}: its TorchScript file's content changed")),
                Some(_) => why.push(format!("reward {name}: its declaration changed")),
                None => why.push(format!("reward {name}: newly used")),
            }
        }
        for name in before.rewards.keys().filter(|k| !self.rewards.contains_key(*k)) {
            why.push(format!("reward {name}: no longer used"));
        }
        if self.input_labels != before.input_labels && why.is_empty() {
            why.push("input stage ids or labels changed".to_string());
        }
        why
    }
}

/// The first 12 hex digits, as shown to users.
pub fn short_key(key: &str) -> &str {
    &key[..key.len().min(12)]
}

fn brief(value: &Value) -> String {
    let s = value.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// JSON with object keys sorted at every level and no whitespace: one text per value.
pub fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                canonical_json(&map[*k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Replaces every string equal to one of `files` by `blake3:<hash>`.
pub fn hash_paths(value: &Value, files: &BTreeMap<String, String>) -> Value {
    match value {
        Value::String(s) => match files.get(s) {
            Some(h) => Value::String(format!("blake3:{h}")),
            None => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| hash_paths(v, files)).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), hash_paths(v, files))).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingredients(lr: f64) -> Ingredients {
        Ingredients {
            kind: "finetune".into(),
            version: 1,
            params: [("lr".to_string(), json!(lr)), ("steps".to_string(), json!(10))].into_iter().collect(),
            inputs: [("model".to_string(), vec!["a".repeat(64)])].into_iter().collect(),
            input_labels: None,
            files: BTreeMap::new(),
            rewards: BTreeMap::new(),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let mut a = String::new();
        canonical_json(&json!({"b": 1, "a": {"d": [1, 2.5], "c": "x"}}), &mut a);
        assert_eq!(a, r#"{"a":{"c":"x","d":[1,2.5]},"b":1}"#);
    }

    #[test]
    fn keys_change_with_any_ingredient_and_only_then() {
        let base = ingredients(1e-3);
        assert_eq!(base.key(), ingredients(1e-3).key());
        assert_eq!(base.key().len(), 64);
        assert_ne!(base.key(), ingredients(5e-4).key());
        let mut v = base.clone();
        v.version = 2;
        assert_ne!(base.key(), v.key());
        let mut i = base.clone();
        i.inputs.insert("model".into(), vec!["b".repeat(64)]);
        assert_ne!(base.key(), i.key());
        // Integers and floats are different values.
        let mut t = base.clone();
        t.params.insert("steps".into(), json!(10.0));
        assert_ne!(base.key(), t.key());
    }

    #[test]
    fn changes_are_explained() {
        let before = ingredients(1e-3);
        let mut after = ingredients(5e-4);
        after.version = 2;
        let why = after.explain_change(&before, &|_| Some("ft/a".into()));
        assert_eq!(why, vec!["code version of `finetune` changed: 1 -> 2", "param lr: 0.001 -> 0.0005"]);
        let mut moved = ingredients(1e-3);
        moved.inputs.insert("model".into(), vec!["c".repeat(64)]);
        assert_eq!(moved.explain_change(&before, &|_| Some("ft/a".into())), vec!["input model changed upstream: ft/a"]);
    }

    #[test]
    fn paths_are_replaced_by_content_hashes() {
        let files: BTreeMap<String, String> = [("/w/x".to_string(), "ab".to_string())].into_iter().collect();
        assert_eq!(hash_paths(&json!({"w": "/w/x", "l": ["/w/x", "y"]}), &files), json!({"w": "blake3:ab", "l": ["blake3:ab", "y"]}));
    }
}

//! The regression gate: a run's flat metrics against a committed baseline file.
//!
//! ```json
//! {
//!   "defaults": {"rel_tol": 0.05},
//!   "metrics": {
//!     "average/rid/aesthetic": {"value": 5.55, "direction": "higher", "abs_tol": 0.05},
//!     "average/rid/fid": {"value": 85.95, "direction": "lower"}
//!   }
//! }
//! ```
//!
//! The tolerance of a metric is the larger of `abs_tol` and `rel_tol * |baseline|` (each taken
//! from the metric, else from `defaults`, else 0). A change within the tolerance is `ok`, also
//! exactly at it; beyond it a change in the metric's direction is `improved` (reported, never a
//! failure) and one against it a `REGRESSION`. A metric with `direction: both` has no good
//! direction: a change beyond its tolerance either way is `CHANGED`, a failure (in a
//! reproduction a far jump in the "good" direction is as suspect as one in the bad: a bug that
//! stops training "improves" forgetting to 0). A baseline metric the run lacks is `missing`.
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Higher,
    Lower,
    /// Any change beyond the tolerance fails.
    Both,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    direction: Option<Direction>,
    abs_tol: Option<f64>,
    rel_tol: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    value: f64,
    direction: Option<Direction>,
    abs_tol: Option<f64>,
    rel_tol: Option<f64>,
}

/// One metric of a baseline, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineMetric {
    pub key: String,
    pub value: f64,
    pub direction: Direction,
    pub abs_tol: f64,
    pub rel_tol: f64,
}

impl BaselineMetric {
    /// The allowed change: the larger of the absolute and the relative tolerance.
    pub fn tolerance(&self) -> f64 {
        self.abs_tol.max(self.rel_tol * self.value.abs())
    }
}

/// A parsed baseline file; keeps the JSON it came from so that `--update` changes only values.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub metrics: Vec<BaselineMetric>,
    document: Value,
}

fn invalid(path: &str, message: impl Into<String>) -> BaselineError {
    BaselineError::Invalid {
        path: path.to_string(),
        message: message.into(),
    }
}

fn check_tolerance(path: &str, what: &str, v: Option<f64>) -> Result<Option<f64>, BaselineError> {
    match v {
        Some(t) if !t.is_finite() || t < 0.0 => Err(invalid(path, format!("{what} must be a finite number >= 0, found {t}"))),
        other => Ok(other),
    }
}

impl Baseline {
    pub fn parse(text: &str, path: &str) -> Result<Self, BaselineError> {
        let document: Value = serde_json::from_str(text).map_err(|e| invalid(path, format!("not JSON: {e}")))?;
        let Value::Object(top) = &document else {
            return Err(invalid(path, "a baseline file is a JSON object with `metrics` (and optional `defaults`)"));
        };
        if let Some(unknown) = top.keys().find(|k| !matches!(k.as_str(), "defaults" | "metrics" | "description")) {
            return Err(invalid(path, format!("unknown top-level key `{unknown}` (expected `defaults`, `metrics`, `description`)")));
        }
        let defaults: Defaults = match top.get("defaults") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| invalid(path, format!("`defaults`: {e}")))?,
            None => Defaults::default(),
        };
        check_tolerance(path, "`defaults.abs_tol`", defaults.abs_tol)?;
        check_tolerance(path, "`defaults.rel_tol`", defaults.rel_tol)?;
        let Some(Value::Object(entries)) = top.get("metrics") else {
            return Err(invalid(path, "`metrics` must be an object: metric key -> {value, direction, abs_tol, rel_tol}"));
        };
        let mut metrics = Vec::new();
        for (key, v) in entries {
            let e: Entry = serde_json::from_value(v.clone()).map_err(|e| invalid(path, format!("metric `{key}`: {e}")))?;
            if !e.value.is_finite() {
                return Err(invalid(path, format!("metric `{key}`: value must be finite")));
            }
            let direction = e
                .direction
                .or(defaults.direction)
                .ok_or_else(|| invalid(path, format!("metric `{key}`: no `direction` (higher, lower or both), and none in `defaults`")))?;
            let abs_tol = check_tolerance(path, &format!("metric `{key}`: abs_tol"), e.abs_tol)?.or(defaults.abs_tol).unwrap_or(0.0);
            let rel_tol = check_tolerance(path, &format!("metric `{key}`: rel_tol"), e.rel_tol)?.or(defaults.rel_tol).unwrap_or(0.0);
            metrics.push(BaselineMetric {
                key: key.clone(),
                value: e.value,
                direction,
                abs_tol,
                rel_tol,
            });
        }
        Ok(Baseline { metrics, document })
    }

    pub fn read(path: &Path) -> Result<Self, BaselineError> {
        let text = std::fs::read_to_string(path).map_err(|error| BaselineError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The baseline document with every value the run has replaced by the run's; tolerances,
    /// directions, order and any other field stay as they were.
    pub fn updated(&self, run: &BTreeMap<String, f64>) -> Value {
        let mut doc = self.document.clone();
        if let Some(Value::Object(entries)) = doc.get_mut("metrics") {
            for (key, entry) in entries.iter_mut() {
                if let (Some(now), Value::Object(fields)) = (run.get(key), entry) {
                    if let Some(n) = serde_json::Number::from_f64(*now) {
                        fields.insert("value".into(), Value::Number(n));
                    }
                }
            }
        }
        doc
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Improved,
    Regression,
    /// Beyond the tolerance of a `direction: both` metric.
    Changed,
    Missing,
}

impl Verdict {
    pub fn fails(self) -> bool {
        matches!(self, Verdict::Regression | Verdict::Changed | Verdict::Missing)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::Improved => "improved",
            Verdict::Regression => "REGRESSION",
            Verdict::Changed => "CHANGED",
            Verdict::Missing => "missing",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub metric: BaselineMetric,
    pub now: Option<f64>,
    /// now - baseline.
    pub delta: Option<f64>,
    pub verdict: Verdict,
}

/// Verdict of one metric. A change equal to the tolerance is within it: the comparison allows
/// for the rounding of the subtraction itself (a few ulps of the operands).
pub fn judge(metric: &BaselineMetric, now: f64) -> Verdict {
    let delta = now - metric.value;
    let rounding = 4.0 * f64::EPSILON * metric.value.abs().max(now.abs());
    if delta.abs() <= metric.tolerance() + rounding {
        return Verdict::Ok;
    }
    let better = match metric.direction {
        Direction::Higher => delta,
        Direction::Lower => -delta,
        Direction::Both => return Verdict::Changed,
    };
    if better > 0.0 {
        Verdict::Improved
    } else {
        Verdict::Regression
    }
}

pub fn compare(baseline: &Baseline, run: &BTreeMap<String, f64>) -> Vec<Comparison> {
    baseline
        .metrics
        .iter()
        .map(|m| {
            let now = run.get(&m.key).copied().filter(|v| v.is_finite());
            Comparison {
                metric: m.clone(),
                now,
                delta: now.map(|n| n - m.value),
                verdict: now.map_or(Verdict::Missing, |n| judge(m, n)),
            }
        })
        .collect()
}

fn number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e5 || v.abs() < 1e-3 {
        format!("{v:.4e}")
    } else {
        format!("{v:.6}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The comparison as an aligned text table, with a summary line.
pub fn render(comparisons: &[Comparison]) -> String {
    let mut rows = vec![["metric", "baseline", "now", "delta", "tolerance", "verdict"].map(String::from).to_vec()];
    for c in comparisons {
        let arrow = match c.metric.direction {
            Direction::Higher => "↑",
            Direction::Lower => "↓",
            Direction::Both => "↕",
        };
        rows.push(vec![
            format!("{} {arrow}", c.metric.key),
            number(c.metric.value),
            c.now.map(number).unwrap_or_else(|| "-".into()),
            c.delta.map(|d| if d > 0.0 { format!("+{}", number(d)) } else { number(d) }).unwrap_or_else(|| "-".into()),
            format!("±{}", number(c.metric.tolerance())),
            c.verdict.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(j, c)| {
                let pad = widths[j] - c.chars().count();
                if j == 0 || j == 5 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        s.push_str(cells.join("  ").trim_end());
        s.push('\n');
    }
    let count = |v: Verdict| comparisons.iter().filter(|c| c.verdict == v).count();
    s.push_str(&format!(
        "{} metrics: {} ok, {} improved, {} regressions, {} changed, {} missing\n",
        comparisons.len(),
        count(Verdict::Ok),
        count(Verdict::Improved),
        count(Verdict::Regression),
        count(Verdict::Changed),
        count(Verdict::Missing)
    ));
    s
}

/// Reads a flat metrics file (`reports/<name>/metrics.json`).
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, f64>, BaselineError> {
    let text = std::fs::read_to_string(path).map_err(|error| BaselineError::Read {
        path: path.display().to_string(),
        error,
    })?;
    parse_metrics(&text, &path.display().to_string())
}

/// The union of several reports' metrics files (`metrics.json` in each folder); a key that two
/// reports give different values is an error.
pub fn merged_metrics<'a>(report_dirs: impl IntoIterator<Item = &'a Path>) -> Result<BTreeMap<String, f64>, BaselineError> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for dir in report_dirs {
        let path = dir.join(super::REPORT_METRICS_FILE);
        for (k, v) in read_metrics(&path)? {
            if let Some(old) = out.insert(k.clone(), v) {
                if old != v {
                    return Err(invalid(&path.display().to_string(), format!("metric `{k}` differs between the report stages ({old} and {v})")));
                }
            }
        }
    }
    Ok(out)
}

pub fn parse_metrics(text: &str, path: &str) -> Result<BTreeMap<String, f64>, BaselineError> {
    let map: Map<String, Value> = serde_json::from_str(text).map_err(|e| invalid(path, format!("not a metrics file (an object of numbers): {e}")))?;
    map.into_iter()
        .map(|(k, v)| match v.as_f64() {
            Some(f) => Ok((k, f)),
            None => Err(invalid(path, format!("`{k}` is not a number"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(value: f64, direction: Direction, abs_tol: f64, rel_tol: f64) -> BaselineMetric {
        BaselineMetric {
            key: "m".into(),
            value,
            direction,
            abs_tol,
            rel_tol,
        }
    }

    #[test]
    fn tolerance_is_the_larger_of_absolute_and_relative() {
        assert_eq!(metric(200.0, Direction::Lower, 1.0, 0.01).tolerance(), 2.0);
        assert_eq!(metric(200.0, Direction::Lower, 3.0, 0.01).tolerance(), 3.0);
        assert_eq!(metric(-200.0, Direction::Lower, 0.0, 0.01).tolerance(), 2.0);
    }

    #[test]
    fn defaults_fill_in_and_bad_files_are_rejected() {
        let b = Baseline::parse(r#"{"defaults": {"rel_tol": 0.1, "direction": "lower"}, "metrics": {"a": {"value": 2.0}, "b": {"value": 1.0, "direction": "higher", "rel_tol": 0.0, "abs_tol": 0.5}}}"#, "f").unwrap();
        assert_eq!(b.metrics[0].direction, Direction::Lower);
        assert_eq!(b.metrics[0].rel_tol, 0.1);
        assert_eq!(b.metrics[1].rel_tol, 0.0);
        assert_eq!(b.metrics[1].abs_tol, 0.5);
        let err = |text: &str| Baseline::parse(text, "f").unwrap_err().to_string();
        assert!(err(r#"{"metrics": {"a": {"value": 1}}}"#).contains("no `direction`"));
        assert!(err(r#"{"metrics": {"a": {"value": 1, "direction": "up"}}}"#).contains("metric `a`"));
        assert!(err(r#"{"metrics": {"a": {"value": 1, "direction": "lower", "abs_tol": -1}}}"#).contains(">= 0"));
        assert!(err(r#"{"metrics": {"a": {"value": 1, "direction": "lower", "tol": 1}}}"#).contains("unknown field"));
        assert!(err(r#"{"metric": {}}"#).contains("unknown top-level key"));
    }

    #[test]
    fn a_metric_without_a_good_direction_fails_on_a_change_either_way() {
        let m = metric(2.0, Direction::Both, 0.1, 0.0);
        assert_eq!(judge(&m, 2.1), Verdict::Ok, "at the tolerance");
        assert_eq!(judge(&m, 1.95), Verdict::Ok);
        assert_eq!(judge(&m, 2.2), Verdict::Changed);
        assert_eq!(judge(&m, 0.0), Verdict::Changed, "a drop to 0 (forgetting that vanished) fails");
        assert!(Verdict::Changed.fails());
        // The same changes on a metric with a direction: one improves, one regresses.
        assert_eq!(judge(&metric(2.0, Direction::Lower, 0.1, 0.0), 0.0), Verdict::Improved);
        assert_eq!(judge(&metric(2.0, Direction::Lower, 0.1, 0.0), 2.2), Verdict::Regression);
        let b = Baseline::parse(r#"{"metrics": {"f": {"value": 1.0, "direction": "both", "abs_tol": 0.1}}}"#, "f").unwrap();
        assert_eq!(b.metrics[0].direction, Direction::Both);
        let table = render(&compare(&b, &BTreeMap::from([("f".to_string(), 3.0)])));
        assert!(table.contains("f ↕") && table.contains("CHANGED") && table.contains("1 changed"), "{table}");
    }

    #[test]
    fn update_changes_only_values() {
        let text = r#"{"defaults": {"abs_tol": 0.1}, "metrics": {"x": {"value": 1.0, "direction": "higher", "rel_tol": 0.2}, "y": {"value": 3.0, "direction": "lower"}}}"#;
        let b = Baseline::parse(text, "f").unwrap();
        let run = BTreeMap::from([("x".to_string(), 1.5)]);
        let doc = b.updated(&run);
        assert_eq!(doc["metrics"]["x"]["value"], 1.5);
        assert_eq!(doc["metrics"]["x"]["rel_tol"], 0.2);
        assert_eq!(doc["metrics"]["y"]["value"], 3.0, "a metric the run lacks keeps its value");
        assert_eq!(doc["defaults"]["abs_tol"], 0.1);
        let keys: Vec<&String> = doc["metrics"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["x", "y"], "order kept");
    }
}

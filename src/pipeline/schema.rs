//! What a stage kind accepts, as plain data: the pipeline layer validates against it without
//! knowing what the kind does.
use serde::Serialize;
use serde_json::Value;

/// The type of one parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ParamType {
    Bool,
    Int,
    Float,
    String,
    /// One of the listed strings.
    Enum(Vec<&'static str>),
    /// A path to an existing file or folder; its content hash goes into the stage's cache key.
    Path,
    /// The name of a reward task: a built-in one or one the pipeline declares in `rewards:`
    /// (whose declaration then goes into the stage's cache key).
    Reward,
    /// A mapping from reward task names (as [`ParamType::Reward`]) to values of one type.
    RewardMap(Box<ParamType>),
    List(Box<ParamType>),
    /// A mapping from strings to values of one type.
    Map(Box<ParamType>),
    /// Any JSON-like value (kind-specific structure checked by the kind itself).
    Any,
}

/// One parameter of a stage kind.
#[derive(Debug, Clone, Serialize)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None`: the parameter is required.
    pub default: Option<Value>,
    /// The valid values of a numeric parameter (of every number in a list or mapping).
    pub range: Option<Range>,
    pub doc: &'static str,
    /// A parameter added to a kind after its results were cached: left out of the cache key
    /// while it has its default, so that stages that do not set it keep their keys.
    pub keyed_when_set: bool,
}

impl ParamType {
    /// Whether values of this type are numbers, or lists or mappings of numbers.
    pub fn is_numeric(&self) -> bool {
        match self {
            ParamType::Int | ParamType::Float => true,
            ParamType::List(inner) | ParamType::Map(inner) | ParamType::RewardMap(inner) => inner.is_numeric(),
            _ => false,
        }
    }
}

/// One end of a [`Range`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bound {
    pub value: f64,
    pub inclusive: bool,
}

/// The interval a numeric parameter must lie in; an absent end is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Range {
    pub min: Option<Bound>,
    pub max: Option<Bound>,
}

impl Range {
    pub fn contains(&self, x: f64) -> bool {
        let above = self.min.is_none_or(|b| if b.inclusive { x >= b.value } else { x > b.value });
        let below = self.max.is_none_or(|b| if b.inclusive { x <= b.value } else { x < b.value });
        above && below
    }
}

/// `[1, 100]`, `[0, 1)`, `>= 1`, `> 0`, `<= 5`.
impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => {
                let open = if lo.inclusive { '[' } else { '(' };
                let close = if hi.inclusive { ']' } else { ')' };
                write!(f, "{open}{}, {}{close}", lo.value, hi.value)
            }
            (Some(lo), None) => write!(f, "{} {}", if lo.inclusive { ">=" } else { ">" }, lo.value),
            (None, Some(hi)) => write!(f, "{} {}", if hi.inclusive { "<=" } else { "<" }, hi.value),
            (None, None) => write!(f, "any number"),
        }
    }
}

/// One named input of a stage kind: references to other stages' outputs.
#[derive(Debug, Clone, Serialize)]
pub struct InputSpec {
    pub name: &'static str,
    pub required: bool,
    /// Whether the input takes a list of stages (e.g. the evaluations of a forgetting stage).
    pub many: bool,
    pub doc: &'static str,
}

/// Everything the pipeline layer knows about a stage kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindSchema {
    pub kind: &'static str,
    /// Algorithm version: bump it when a change of the kind's code changes its outputs, so that
    /// cached results of the old code are not reused.
    pub version: u32,
    pub doc: &'static str,
    /// Whether the outputs depend on the ids and labels of the input stages (a report lays out
    /// tables by them), not only on their contents; then those go into the cache key too.
    pub uses_input_labels: bool,
    /// Whether the stage reads every reward the pipeline declares (an evaluation reports them
    /// all), not only those its parameters name; their declarations go into its cache key.
    pub reads_declared_rewards: bool,
    pub params: Vec<ParamSpec>,
    pub inputs: Vec<InputSpec>,
}

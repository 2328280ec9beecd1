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
    pub doc: &'static str,
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
    pub params: Vec<ParamSpec>,
    pub inputs: Vec<InputSpec>,
}

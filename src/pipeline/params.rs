//! Typed stage parameters. A kind declares its parameters once, with [`stage_params!`]: each
//! field names its Rust type, its default (or that it is required) and its doc. The declaration
//! gives both the struct the stage reads ([`StageParams::from_params`]) and the schema the
//! pipeline layer validates against ([`StageParams::specs`]), so the two cannot drift apart.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::schema::{Bound, ParamSpec, ParamType, Range};

/// A resolved parameter that does not have its schema's type: a bug in the kind (the pipeline
/// layer checked every value against the schema the same declaration made).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("parameter `{name}`: expected {expected}, found `{found}`")]
pub struct ParamError {
    pub name: String,
    pub expected: String,
    pub found: String,
}

/// A Rust type a parameter can have, with its schema type.
pub trait ParamValue: Sized {
    fn param_type() -> ParamType;
    /// The value of a validated parameter; `None` when it does not have [`Self::param_type`].
    fn from_value(value: &Value) -> Option<Self>;
    fn to_value(&self) -> Value;
}

impl ParamValue for bool {
    fn param_type() -> ParamType {
        ParamType::Bool
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_bool()
    }
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}

impl ParamValue for i64 {
    fn param_type() -> ParamType {
        ParamType::Int
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_i64()
    }
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

/// Counts and sizes (the schema's range keeps them non-negative before a stage reads them).
impl ParamValue for u64 {
    fn param_type() -> ParamType {
        ParamType::Int
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_u64()
    }
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

impl ParamValue for usize {
    fn param_type() -> ParamType {
        ParamType::Int
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_u64().and_then(|v| usize::try_from(v).ok())
    }
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

impl ParamValue for f64 {
    fn param_type() -> ParamType {
        ParamType::Float
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_f64()
    }
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

impl ParamValue for String {
    fn param_type() -> ParamType {
        ParamType::String
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(str::to_string)
    }
    fn to_value(&self) -> Value {
        Value::String(self.clone())
    }
}

/// A file or folder: the pipeline layer makes it absolute and hashes its content into the key.
impl ParamValue for PathBuf {
    fn param_type() -> ParamType {
        ParamType::Path
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(PathBuf::from)
    }
    fn to_value(&self) -> Value {
        Value::String(self.to_string_lossy().into_owned())
    }
}

impl<T: ParamValue> ParamValue for Vec<T> {
    fn param_type() -> ParamType {
        ParamType::List(Box::new(T::param_type()))
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_array()?.iter().map(T::from_value).collect()
    }
    fn to_value(&self) -> Value {
        Value::Array(self.iter().map(T::to_value).collect())
    }
}

/// An optional parameter: `null` (its default) when not given.
impl<T: ParamValue> ParamValue for Option<T> {
    fn param_type() -> ParamType {
        T::param_type()
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_value)
    }
}

impl<T: ParamValue> ParamValue for BTreeMap<String, T> {
    fn param_type() -> ParamType {
        ParamType::Map(Box::new(T::param_type()))
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_object()?.iter().map(|(k, v)| Some((k.clone(), T::from_value(v)?))).collect()
    }
    fn to_value(&self) -> Value {
        Value::Object(self.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
    }
}

/// Implements [`ParamValue`] for a fieldless enum with a `name(self) -> &'static str` method:
/// the parameter is one of the variants' names.
#[macro_export]
macro_rules! enum_param {
    ($ty:ty { $($variant:ident),+ $(,)? }) => {
        impl $crate::pipeline::params::ParamValue for $ty {
            fn param_type() -> $crate::pipeline::schema::ParamType {
                $crate::pipeline::schema::ParamType::Enum(vec![$(<$ty>::$variant.name()),+])
            }
            fn from_value(value: &serde_json::Value) -> Option<Self> {
                let name = value.as_str()?;
                [$(<$ty>::$variant),+].into_iter().find(|v| v.name() == name)
            }
            fn to_value(&self) -> serde_json::Value {
                serde_json::Value::String(self.name().to_string())
            }
        }
    };
}

/// How one field of a [`stage_params!`] struct is declared: a parameter ([`Field`]) or a
/// group of parameters shared by several kinds ([`Flatten`]).
pub trait FieldDef<T> {
    fn specs(&self, name: &'static str) -> Vec<ParamSpec>;
    fn read(&self, name: &'static str, params: &Map<String, Value>) -> Result<T, ParamError>;
    /// Puts the field's value into `params` as a stage would give it.
    fn write(&self, name: &'static str, value: &T, params: &mut Map<String, Value>);
}

/// One parameter: its default (`None`: required), its range and doc.
pub struct Field<T> {
    default: Option<T>,
    range: Option<Range>,
    doc: &'static str,
    keyed_when_set: bool,
}

/// A parameter with a default.
pub fn param<T: ParamValue>(default: T) -> Field<T> {
    Field { default: Some(default), range: None, doc: "", keyed_when_set: false }
}

/// A parameter every stage of the kind must give.
pub fn required<T: ParamValue>() -> Field<T> {
    Field { default: None, range: None, doc: "", keyed_when_set: false }
}

impl<T> Field<T> {
    /// What the parameter is (shown by `ril-pipe kinds` and in messages about it).
    pub fn doc(self, doc: &'static str) -> Self {
        Field { doc, ..self }
    }

    /// A parameter added to a kind after its results were cached: in the cache key only when a
    /// stage gives it a value other than its default ([`ParamSpec::keyed_when_set`]).
    pub fn keyed_when_set(self) -> Self {
        Field { keyed_when_set: true, ..self }
    }
}

/// Types whose values are numbers, or lists or mappings of numbers: the ones with a range.
pub trait Numeric {}
impl Numeric for i64 {}
impl Numeric for u64 {}
impl Numeric for usize {}
impl Numeric for f64 {}
impl<T: Numeric> Numeric for Vec<T> {}
impl<T: Numeric> Numeric for BTreeMap<String, T> {}

/// A bound as written in a declaration: an integer or a float literal.
pub trait BoundValue {
    fn into_f64(self) -> f64;
}

impl BoundValue for i32 {
    fn into_f64(self) -> f64 {
        f64::from(self)
    }
}

impl BoundValue for f64 {
    fn into_f64(self) -> f64 {
        self
    }
}

impl<T: Numeric> Field<T> {
    /// Values `>= min`.
    pub fn min(self, min: impl BoundValue) -> Self {
        self.bound(|r| r.min = Some(Bound { value: min.into_f64(), inclusive: true }))
    }

    /// Values `> min`.
    pub fn min_exclusive(self, min: impl BoundValue) -> Self {
        self.bound(|r| r.min = Some(Bound { value: min.into_f64(), inclusive: false }))
    }

    /// Values `<= max`.
    pub fn max(self, max: impl BoundValue) -> Self {
        self.bound(|r| r.max = Some(Bound { value: max.into_f64(), inclusive: true }))
    }

    /// Values `< max`.
    pub fn max_exclusive(self, max: impl BoundValue) -> Self {
        self.bound(|r| r.max = Some(Bound { value: max.into_f64(), inclusive: false }))
    }

    fn bound(self, set: impl FnOnce(&mut Range)) -> Self {
        let mut range = self.range.unwrap_or_default();
        set(&mut range);
        Field { range: Some(range), ..self }
    }
}

impl<T: ParamValue> FieldDef<T> for Field<T> {
    fn specs(&self, name: &'static str) -> Vec<ParamSpec> {
        vec![ParamSpec { name, ty: T::param_type(), default: self.default.as_ref().map(T::to_value), range: self.range, doc: self.doc, keyed_when_set: self.keyed_when_set }]
    }

    fn read(&self, name: &'static str, params: &Map<String, Value>) -> Result<T, ParamError> {
        let value = params.get(name).unwrap_or(&Value::Null);
        T::from_value(value).ok_or_else(|| ParamError { name: name.to_string(), expected: format!("{:?}", T::param_type()), found: value.to_string() })
    }

    fn write(&self, name: &'static str, value: &T, params: &mut Map<String, Value>) {
        params.insert(name.to_string(), value.to_value());
    }
}

/// The parameters of another [`StageParams`] struct, in line (e.g. the training parameters
/// every training kind shares), with its defaults or with defaults of this kind's own.
pub struct Flatten<T> {
    defaults: Option<T>,
}

/// The group's parameters with the group's defaults.
pub fn flatten<T: StageParams>() -> Flatten<T> {
    Flatten { defaults: None }
}

/// The group's parameters with `defaults` as their defaults (e.g. each trainer's own schedule).
pub fn flatten_with<T: StageParams>(defaults: T) -> Flatten<T> {
    Flatten { defaults: Some(defaults) }
}

impl<T: StageParams> FieldDef<T> for Flatten<T> {
    fn specs(&self, _name: &'static str) -> Vec<ParamSpec> {
        let mut specs = T::specs();
        if let Some(defaults) = &self.defaults {
            let values = defaults.to_params();
            for spec in &mut specs {
                spec.default = values.get(spec.name).cloned();
            }
        }
        specs
    }

    fn read(&self, _name: &'static str, params: &Map<String, Value>) -> Result<T, ParamError> {
        T::from_params(params)
    }

    fn write(&self, _name: &'static str, value: &T, params: &mut Map<String, Value>) {
        params.extend(value.to_params());
    }
}

/// A kind's typed parameters (made by [`stage_params!`]).
pub trait StageParams: Sized {
    /// The schema of every parameter, in declaration order.
    fn specs() -> Vec<ParamSpec>;
    /// The struct from a stage's resolved parameters.
    fn from_params(params: &Map<String, Value>) -> Result<Self, ParamError>;
    /// The parameters as a stage gives them (the inverse of [`Self::from_params`]).
    fn to_params(&self) -> Map<String, Value>;

    /// The struct with every default (`None` when a parameter is required).
    fn defaults() -> Option<Self> {
        let mut map = Map::new();
        for spec in Self::specs() {
            map.insert(spec.name.to_string(), spec.default?);
        }
        Self::from_params(&map).ok()
    }
}

/// Checks a value given outside a pipeline (a command-line flag) against the type and range of
/// parameter `name` of `P`, as validation checks a pipeline's.
pub fn check_param<P: StageParams>(name: &str, value: &Value) -> Result<(), String> {
    let spec = P::specs().into_iter().find(|s| s.name == name).ok_or_else(|| format!("no parameter `{name}`"))?;
    let typed = super::expand::check_type(value, &spec.ty, std::path::Path::new("."), &mut super::expand::FileSink::default())?;
    spec.range.map_or(Ok(()), |range| super::expand::check_range(&typed, &range))
}

/// Declares a kind's parameters: a struct whose fields are read from a stage's parameters, and
/// its [`StageParams`] schema. Each field is `name: Type = declaration`, the declaration being
/// [`param`]`(default)` or [`required`]`()` with `.doc(...)`, or [`flatten`]`()` (or
/// [`flatten_with`]`(defaults)`) for a nested [`StageParams`] struct whose parameters appear in
/// line.
#[macro_export]
macro_rules! stage_params {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$field_meta:meta])* $field_vis:vis $field:ident : $ty:ty = $decl:expr),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis struct $name {
            $($(#[$field_meta])* $field_vis $field: $ty,)*
        }

        impl $crate::pipeline::params::StageParams for $name {
            fn specs() -> Vec<$crate::pipeline::schema::ParamSpec> {
                #[allow(unused_imports)]
                use $crate::pipeline::params::*;
                let mut specs = Vec::new();
                $(specs.extend(<_ as FieldDef<$ty>>::specs(&$decl, stringify!($field)));)*
                specs
            }

            fn from_params(params: &serde_json::Map<String, serde_json::Value>) -> Result<Self, $crate::pipeline::params::ParamError> {
                #[allow(unused_imports)]
                use $crate::pipeline::params::*;
                Ok($name {
                    $($field: <_ as FieldDef<$ty>>::read(&$decl, stringify!($field), params)?,)*
                })
            }

            fn to_params(&self) -> serde_json::Map<String, serde_json::Value> {
                #[allow(unused_imports)]
                use $crate::pipeline::params::*;
                #[allow(unused_mut)]
                let mut params = serde_json::Map::new();
                $(<_ as FieldDef<$ty>>::write(&$decl, stringify!($field), &self.$field, &mut params);)*
                params
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Colour {
        Red,
        Blue,
    }

    impl Colour {
        fn name(self) -> &'static str {
            match self {
                Colour::Red => "red",
                Colour::Blue => "blue",
            }
        }
    }

    crate::enum_param!(Colour { Red, Blue });

    crate::stage_params! {
        struct Inner {
            steps: u64 = param(3).min(1).doc("steps"),
        }
    }

    crate::stage_params! {
        struct Outer {
            name: String = required().doc("a name"),
            colour: Colour = param(Colour::Blue).doc("a colour"),
            weights: BTreeMap<String, f64> = param(BTreeMap::from([("a".to_string(), 0.5)])).doc("weights"),
            inner: Inner = flatten(),
            sizes: Vec<f64> = param(vec![1.0, 2.0]).min_exclusive(0).max(10.5).doc("sizes"),
        }
    }

    #[test]
    fn one_declaration_gives_the_schema_and_the_struct() {
        let specs = Outer::specs();
        let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        assert_eq!(names, ["name", "colour", "weights", "steps", "sizes"]);
        assert_eq!(specs[0].default, None);
        assert_eq!(specs[1].ty, ParamType::Enum(vec!["red", "blue"]));
        assert_eq!(specs[1].default, Some(json!("blue")));
        assert_eq!(specs[2].ty, ParamType::Map(Box::new(ParamType::Float)));
        assert_eq!(specs[4].default, Some(json!([1.0, 2.0])));
        assert_eq!(specs[3].range.map(|r| r.to_string()).as_deref(), Some(">= 1"));
        assert_eq!(specs[4].range.map(|r| r.to_string()).as_deref(), Some("(0, 10.5]"));
        assert_eq!(specs[0].range, None);
        let params = json!({"name": "x", "colour": "red", "weights": {"b": 2.0}, "steps": 7, "sizes": []});
        assert!(Outer::from_params(json!({"name": "x", "colour": "red", "weights": {}, "steps": -7, "sizes": []}).as_object().unwrap()).is_err(), "a count is not negative");
        let outer = Outer::from_params(params.as_object().unwrap()).unwrap();
        assert_eq!(outer, Outer { name: "x".into(), colour: Colour::Red, weights: BTreeMap::from([("b".into(), 2.0)]), inner: Inner { steps: 7 }, sizes: vec![] });
        assert_eq!(Outer::defaults(), None, "`name` is required");
        assert_eq!(Inner::defaults(), Some(Inner { steps: 3 }));
        assert_eq!(Outer::from_params(&outer.to_params()).unwrap(), outer);
    }

    crate::stage_params! {
        struct WithOwnDefaults {
            inner: Inner = flatten_with(Inner { steps: 9 }),
        }
    }

    #[test]
    fn ranges_contain_their_ends_as_declared() {
        let spec = |field: Field<f64>| field.specs("x")[0].range.unwrap();
        let r = spec(param(0.5).min(0).max_exclusive(1));
        assert!(r.contains(0.0) && r.contains(0.999) && !r.contains(1.0) && !r.contains(-0.1));
        assert_eq!(r.to_string(), "[0, 1)");
        let r = spec(param(1.0).min_exclusive(0));
        assert!(!r.contains(0.0) && r.contains(1e-300) && r.contains(f64::MAX));
        assert_eq!(r.to_string(), "> 0");
        assert_eq!(spec(param(1.0).max(5)).to_string(), "<= 5");
    }

    #[test]
    fn a_group_takes_the_defaults_of_the_kind_that_uses_it() {
        assert_eq!(WithOwnDefaults::specs()[0].default, Some(json!(9)));
        assert_eq!(WithOwnDefaults::specs()[0].doc, "steps");
        assert_eq!(Inner::specs()[0].default, Some(json!(3)));
    }

    #[test]
    fn a_value_of_another_type_names_the_parameter() {
        let params = json!({"name": "x", "colour": "green", "weights": {}, "steps": 1, "sizes": []});
        let e = Outer::from_params(params.as_object().unwrap()).unwrap_err();
        assert_eq!(e.name, "colour");
        assert!(e.to_string().contains("green"), "{e}");
    }
}

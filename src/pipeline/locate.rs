//! Line and column of a node of a YAML document, given its path.
//!
//! `yaml_serde` reports positions only for errors raised while a node is being deserialized, and
//! its `Value` keeps none. Errors found later (an unknown stage kind, a dangling reference) still
//! need to point at the file. So we walk the document again with a visitor that follows the path
//! and fails on purpose at the target node: the deserializer stamps that failure with the node's
//! mark, which is exactly the position we want. Documents are small and errors rare, so a second
//! parse per error costs nothing that matters.
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into a YAML document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seg {
    /// The value under a mapping key.
    Key(String),
    /// An element of a sequence.
    Index(usize),
    /// The key itself (for "unknown key" errors, which should point at the key, not its value).
    KeyName(String),
}

/// A path from the document root, e.g. `stages[2].params.lr`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct YamlPath(pub Vec<Seg>);

impl YamlPath {
    pub fn root() -> Self {
        YamlPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        self.with(Seg::Key(key.to_string()))
    }

    pub fn index(&self, index: usize) -> Self {
        self.with(Seg::Index(index))
    }

    /// The key `key` itself, inside the mapping at this path.
    pub fn key_name(&self, key: &str) -> Self {
        self.with(Seg::KeyName(key.to_string()))
    }

    fn with(&self, seg: Seg) -> Self {
        let mut segs = self.0.clone();
        segs.push(seg);
        YamlPath(segs)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) | Seg::KeyName(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        if first {
            f.write_str("(document)")?;
        }
        Ok(())
    }
}

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

const MARKER: &str = "\u{0}ril-pipe-locate";

/// Position of the node at `path` in `source`; when the path does not exist (a value produced by
/// expansion, a merged key), the position of its nearest existing ancestor.
pub fn locate(source: &str, path: &YamlPath) -> Option<Position> {
    let mut segs = path.0.as_slice();
    loop {
        if let Some(pos) = locate_exact(source, segs) {
            return Some(pos);
        }
        if segs.is_empty() {
            return None;
        }
        // A missing key name falls back to its mapping, a missing value to its parent.
        segs = &segs[..segs.len() - 1];
    }
}

fn locate_exact(source: &str, segs: &[Seg]) -> Option<Position> {
    let de = yaml_serde::Deserializer::from_str(source);
    // Only the first document matters (pipelines are single-document).
    let doc = de.into_iter().next()?;
    match (Locator { segs }).deserialize(doc) {
        Ok(()) => None,
        Err(err) if err.to_string().contains(MARKER) => err.location().map(|l| Position {
            line: l.line(),
            column: l.column(),
        }),
        Err(_) => None,
    }
}

struct Locator<'a> {
    segs: &'a [Seg],
}

/// Outcome of a walk that did not reach the target: a plain error that `locate_exact` ignores.
fn not_found<E: de::Error>() -> E {
    E::custom("path not found")
}

impl<'de> DeserializeSeed<'de> for Locator<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locator<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.segs.split_first() else {
            return Err(de::Error::custom(MARKER));
        };
        match first {
            Seg::Key(wanted) => {
                while let Some(key) = map.next_key::<KeyText>()? {
                    if key.0.as_deref() == Some(wanted.as_str()) {
                        return map.next_value_seed(Locator { segs: rest });
                    }
                    map.next_value::<IgnoredAny>()?;
                }
                Err(not_found())
            }
            Seg::KeyName(wanted) => {
                if !rest.is_empty() {
                    return Err(not_found());
                }
                while map.next_key_seed(KeyMatcher { wanted })?.is_some() {
                    map.next_value::<IgnoredAny>()?;
                }
                Err(not_found())
            }
            Seg::Index(_) => Err(not_found()),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.segs.split_first() else {
            return Err(de::Error::custom(MARKER));
        };
        let Seg::Index(wanted) = first else {
            return Err(not_found());
        };
        let mut index = 0;
        while index < *wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(not_found());
            }
            index += 1;
        }
        match seq.next_element_seed(Locator { segs: rest })? {
            Some(()) => Err(not_found()),
            None => Err(not_found()),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): the tag is where the node starts.
        if self.segs.is_empty() {
            Err(de::Error::custom(MARKER))
        } else {
            Err(not_found())
        }
    }
}

impl Locator<'_> {
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        if self.segs.is_empty() {
            Err(E::custom(MARKER))
        } else {
            Err(not_found())
        }
    }
}

/// A mapping key as text (`None` for keys that are not scalars).
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = <yaml_serde::Value as de::Deserialize>::deserialize(d)?;
        Ok(KeyText(scalar_text(&value)))
    }
}

fn scalar_text(value: &yaml_serde::Value) -> Option<String> {
    match value {
        yaml_serde::Value::String(s) => Some(s.clone()),
        yaml_serde::Value::Number(n) => Some(n.to_string()),
        yaml_serde::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Fails (with the marker) while deserializing the key equal to `wanted`, so the key's own
/// position is reported.
struct KeyMatcher<'a> {
    wanted: &'a str,
}

impl<'de> DeserializeSeed<'de> for KeyMatcher<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyMatcher<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if v == self.wanted {
            Err(E::custom(MARKER))
        } else {
            Ok(())
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.visit_str(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.visit_str(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "name: demo\nvars:\n  lr: 0.1\nstages:\n  - id: a\n    kind: touch\n  - id: b\n    kind: touch\n    params:\n      size: 3\n      bogus: [1, 2]\n";

    fn at(path: YamlPath) -> (usize, usize) {
        let p = locate(DOC, &path).unwrap();
        (p.line, p.column)
    }

    #[test]
    fn finds_values_keys_and_elements() {
        let root = YamlPath::root();
        assert_eq!(at(root.key("vars").key("lr")), (3, 7));
        assert_eq!(at(root.key("stages").index(1).key("kind")), (8, 11));
        assert_eq!(at(root.key("stages").index(1).key("params").key_name("bogus")), (11, 7));
        assert_eq!(at(root.key("stages").index(1).key("params").key("bogus").index(1)), (11, 18));
        assert_eq!(at(root.key("stages").index(0)), (5, 5));
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_ancestor() {
        let root = YamlPath::root();
        // A block mapping starts at its first key.
        assert_eq!(at(root.key("stages").index(1).key("params").key("nothing")), (10, 7));
        assert_eq!(at(root.key("stages").index(7)), (5, 3));
    }

    #[test]
    fn aliases_point_at_their_anchor() {
        let doc = "base: &b\n  lr: 1\nother: *b\n";
        let p = locate(doc, &YamlPath::root().key("other").key("lr")).unwrap();
        assert_eq!((p.line, p.column), (2, 7));
    }

    #[test]
    fn display_of_paths() {
        let p = YamlPath::root().key("stages").index(2).key("params").key_name("lr");
        assert_eq!(p.to_string(), "stages[2].params.lr");
        assert_eq!(YamlPath::root().to_string(), "(document)");
    }
}

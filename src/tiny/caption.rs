//! Caption attributes, the structured caption ([`CaptionSpec`]) and its plain-English text.
//!
//! Grammar of a caption (words separated by single spaces, lower case; the parser also accepts
//! "an"/"a" interchangeably, "center" and "gray", and any run of whitespace):
//!
//! ```text
//! caption  := article object arrange " on " article background " background"
//! arrange  := " " position | " " relation " " article object
//! object   := [size " "] colour " " shape
//! position := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"
//! relation := "above" | "below" | "to the left of" | "to the right of"
//! ```
//!
//! e.g. "a small red circle above a blue square on a white background". A size left out means
//! "any size". `Display` writes the canonical text and `FromStr` parses it back, so
//! `caption.parse::<CaptionSpec>()` recovers exactly the attributes a caption names.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::TinyError;

/// Object shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Named object colour. Each has a nominal HSV colour; the scene's saturation scales its S.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Cyan,
    Blue,
    Purple,
    Pink,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Cyan,
        Colour::Blue,
        Colour::Purple,
        Colour::Pink,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Cyan => "cyan",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::Pink => "pink",
        }
    }

    /// Nominal (hue in degrees, saturation, value) before the scene's saturation is applied.
    pub fn hsv(self) -> (f32, f32, f32) {
        match self {
            Colour::Red => (0.0, 0.90, 0.90),
            Colour::Orange => (28.0, 0.95, 0.97),
            Colour::Yellow => (55.0, 0.95, 0.95),
            Colour::Green => (120.0, 0.85, 0.72),
            Colour::Cyan => (185.0, 0.85, 0.85),
            Colour::Blue => (225.0, 0.85, 0.92),
            Colour::Purple => (280.0, 0.70, 0.75),
            Colour::Pink => (330.0, 0.50, 1.00),
        }
    }
}

/// Object size class; the radius ranges are in [`super::scene`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

/// Named background colour: three neutrals and five muted hues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    White,
    Black,
    Grey,
    Red,
    Yellow,
    Green,
    Blue,
    Purple,
}

impl Background {
    pub const ALL: [Background; 8] = [
        Background::White,
        Background::Black,
        Background::Grey,
        Background::Red,
        Background::Yellow,
        Background::Green,
        Background::Blue,
        Background::Purple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Background::White => "white",
            Background::Black => "black",
            Background::Grey => "grey",
            Background::Red => "red",
            Background::Yellow => "yellow",
            Background::Green => "green",
            Background::Blue => "blue",
            Background::Purple => "purple",
        }
    }

    /// Rendered colour (sRGB in [0, 1]) before the scene's contrast is applied.
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Background::White => [0.94, 0.94, 0.92],
            Background::Black => [0.09, 0.09, 0.10],
            Background::Grey => [0.50, 0.50, 0.50],
            Background::Red => [0.62, 0.25, 0.23],
            Background::Yellow => [0.86, 0.80, 0.46],
            Background::Green => [0.29, 0.53, 0.31],
            Background::Blue => [0.24, 0.34, 0.62],
            Background::Purple => [0.45, 0.30, 0.58],
        }
    }

    /// Hue in degrees for the colour-harmony rule; `None` for the neutrals.
    pub fn hue(self) -> Option<f32> {
        match self {
            Background::White | Background::Black | Background::Grey => None,
            Background::Red => Some(3.0),
            Background::Yellow => Some(50.0),
            Background::Green => Some(125.0),
            Background::Blue => Some(224.0),
            Background::Purple => Some(272.0),
        }
    }

    /// The object colour of the same name, which would vanish into this background.
    pub fn same_named_colour(self) -> Option<Colour> {
        match self {
            Background::White | Background::Black | Background::Grey => None,
            Background::Red => Some(Colour::Red),
            Background::Yellow => Some(Colour::Yellow),
            Background::Green => Some(Colour::Green),
            Background::Blue => Some(Colour::Blue),
            Background::Purple => Some(Colour::Purple),
        }
    }
}

/// Where a single object sits in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Centre,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
        Position::Centre,
    ];

    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
            Position::Centre => "in the centre",
        }
    }
}

/// Where the first object of a pair is relative to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    pub fn phrase(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }
}

/// One object as a caption names it. `size: None` means the caption leaves the size open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Option<Size>,
}

/// The arrangement a caption names: one placed object, or two related objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Single {
        object: ObjectSpec,
        position: Position,
    },
    Pair {
        first: ObjectSpec,
        relation: Relation,
        second: ObjectSpec,
    },
}

/// Everything a caption says about a scene; `to_string()` is the caption text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CaptionSpec {
    pub layout: Layout,
    pub background: Background,
}

impl CaptionSpec {
    /// The named objects in caption order (one or two).
    pub fn objects(&self) -> Vec<ObjectSpec> {
        match self.layout {
            Layout::Single { object, .. } => vec![object],
            Layout::Pair { first, second, .. } => vec![first, second],
        }
    }

    /// Whether the caption can be drawn unambiguously: no object in the background's own colour,
    /// and the two objects of a pair differ in shape or colour (so they can be told apart).
    pub fn is_drawable(&self) -> bool {
        let objects = self.objects();
        let hidden = self.background.same_named_colour();
        if objects.iter().any(|o| Some(o.colour) == hidden) {
            return false;
        }
        match objects.as_slice() {
            [a, b] => (a.shape, a.colour) != (b.shape, b.colour),
            _ => true,
        }
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

impl fmt::Display for ObjectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.size.map_or(self.colour.name(), Size::name);
        write!(f, "{} ", article(first))?;
        if let Some(size) = self.size {
            write!(f, "{} ", size.name())?;
        }
        write!(f, "{} {}", self.colour.name(), self.shape.name())
    }
}

impl fmt::Display for CaptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layout {
            Layout::Single { object, position } => write!(f, "{object} {}", position.phrase())?,
            Layout::Pair {
                first,
                relation,
                second,
            } => write!(f, "{first} {} {second}", relation.phrase())?,
        }
        let bg = self.background.name();
        write!(f, " on {} {bg} background", article(bg))
    }
}

/// Token cursor for the caption grammar.
struct Words<'a> {
    words: Vec<&'a str>,
    at: usize,
}

impl<'a> Words<'a> {
    fn peek(&self, ahead: usize) -> Option<&'a str> {
        self.words.get(self.at + ahead).copied()
    }

    fn next(&mut self) -> Option<&'a str> {
        let word = self.peek(0);
        self.at += usize::from(word.is_some());
        word
    }

    /// Consumes `phrase` if the next words are exactly it.
    fn eat(&mut self, phrase: &str) -> bool {
        let n = phrase.split(' ').count();
        let matches = phrase
            .split(' ')
            .enumerate()
            .all(|(i, w)| self.peek(i) == Some(w));
        if matches {
            self.at += n;
        }
        matches
    }

    fn expect_article(&mut self) -> Result<(), String> {
        match self.next() {
            Some("a" | "an") => Ok(()),
            other => Err(format!("expected \"a\" or \"an\", found {}", shown(other))),
        }
    }

    fn object(&mut self) -> Result<ObjectSpec, String> {
        let size = Size::ALL
            .into_iter()
            .find(|s| self.peek(0) == Some(s.name()));
        self.at += usize::from(size.is_some());
        let word = self.next();
        let colour = Colour::ALL
            .into_iter()
            .find(|c| word == Some(c.name()))
            .ok_or_else(|| format!("expected a colour, found {}", shown(word)))?;
        let word = self.next();
        let shape = Shape::ALL
            .into_iter()
            .find(|s| word == Some(s.name()))
            .ok_or_else(|| format!("expected a shape, found {}", shown(word)))?;
        Ok(ObjectSpec {
            shape,
            colour,
            size,
        })
    }
}

fn shown(word: Option<&str>) -> String {
    word.map_or_else(|| "the end".to_string(), |w| format!("\"{w}\""))
}

fn parse_words(words: &mut Words<'_>) -> Result<CaptionSpec, String> {
    words.expect_article()?;
    let object = words.object()?;
    let layout = if let Some(position) = Position::ALL.into_iter().find(|p| words.eat(p.phrase())) {
        Layout::Single { object, position }
    } else if let Some(relation) = Relation::ALL.into_iter().find(|r| words.eat(r.phrase())) {
        words.expect_article()?;
        let second = words.object()?;
        Layout::Pair {
            first: object,
            relation,
            second,
        }
    } else {
        return Err(format!(
            "expected a position or a relation after the object, found {}",
            shown(words.peek(0))
        ));
    };
    if !words.eat("on") {
        return Err(format!("expected \"on\", found {}", shown(words.peek(0))));
    }
    words.expect_article()?;
    let word = words.next();
    let background = Background::ALL
        .into_iter()
        .find(|b| word == Some(b.name()))
        .ok_or_else(|| format!("expected a background colour, found {}", shown(word)))?;
    if !words.eat("background") {
        return Err(format!(
            "expected \"background\", found {}",
            shown(words.peek(0))
        ));
    }
    if let Some(extra) = words.peek(0) {
        return Err(format!("unexpected \"{extra}\" after the caption"));
    }
    Ok(CaptionSpec { layout, background })
}

impl FromStr for CaptionSpec {
    type Err = TinyError;

    fn from_str(caption: &str) -> Result<Self, TinyError> {
        let lower = caption.to_lowercase();
        let words = lower
            .split_whitespace()
            .map(|w| match w {
                "center" => "centre",
                "gray" => "grey",
                other => other,
            })
            .collect();
        parse_words(&mut Words { words, at: 0 }).map_err(|reason| TinyError::Caption {
            caption: caption.to_string(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(caption: &str) -> CaptionSpec {
        caption.parse().unwrap()
    }

    #[test]
    fn example_caption_parses_to_its_attributes() {
        let parsed = spec("a small red circle above a blue square on a white background");
        assert_eq!(
            parsed,
            CaptionSpec {
                layout: Layout::Pair {
                    first: ObjectSpec {
                        shape: Shape::Circle,
                        colour: Colour::Red,
                        size: Some(Size::Small)
                    },
                    relation: Relation::Above,
                    second: ObjectSpec {
                        shape: Shape::Square,
                        colour: Colour::Blue,
                        size: None
                    },
                },
                background: Background::White,
            }
        );
    }

    #[test]
    fn every_attribute_round_trips_through_text() {
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for size in [None, Some(Size::Small), Some(Size::Large)] {
                    for background in Background::ALL {
                        let object = ObjectSpec {
                            shape,
                            colour,
                            size,
                        };
                        let mut layouts: Vec<Layout> = Position::ALL
                            .into_iter()
                            .map(|position| Layout::Single { object, position })
                            .collect();
                        layouts.extend(Relation::ALL.into_iter().map(|relation| Layout::Pair {
                            first: object,
                            relation,
                            second: ObjectSpec {
                                shape: Shape::Triangle,
                                colour: Colour::Orange,
                                size: Some(Size::Large),
                            },
                        }));
                        for layout in layouts {
                            let original = CaptionSpec { layout, background };
                            let text = original.to_string();
                            assert_eq!(spec(&text), original, "{text}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn articles_follow_english() {
        let text = spec("a orange triangle in the center on a gray background").to_string();
        assert_eq!(
            text,
            "an orange triangle in the centre on a grey background"
        );
        let text =
            spec("A Large Orange square  to the left of an pink circle on a black background")
                .to_string();
        assert_eq!(
            text,
            "a large orange square to the left of a pink circle on a black background"
        );
    }

    #[test]
    fn malformed_captions_are_rejected() {
        for bad in [
            "",
            "a red circle",
            "a red circle on the left",
            "a red circle on a white background",
            "a red blob on the left on a white background",
            "a red circle on the left on a white background please",
            "a red circle near a blue square on a white background",
            "a red circle on the left on a mauve background",
            "the red circle on the left on a white background",
            "a small circle on the left on a white background",
        ] {
            assert!(bad.parse::<CaptionSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn drawability_rules() {
        assert!(!spec("a red circle on the left on a red background").is_drawable());
        assert!(spec("a red circle on the left on a white background").is_drawable());
        assert!(
            !spec("a small red circle above a large red circle on a white background")
                .is_drawable()
        );
        assert!(spec("a red circle above a red square on a white background").is_drawable());
    }
}

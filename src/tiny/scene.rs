//! Scenes: the plain data a render is a pure function of, and their seeded sampling.
//!
//! Coordinates are fractions of the image side, x to the right and y down, so scenes do not
//! depend on the render resolution. An object's `radius` is the half-extent of its bounding box.
//!
//! Sampling ([`sample_scene_for`]), all uniform unless stated:
//! - radius: small in [0.10, 0.14], large in [0.18, 0.22]; an unnamed size is small or large
//!   with probability 1/2. Every object's bounding box stays at least 0.03 inside the frame.
//! - single object, centre offset (dx, dy) from the image centre: left dx in [-0.28, -0.14] and
//!   |dy| <= 0.09 (right, top, bottom alike by symmetry); centre |dx|, |dy| <= 0.05.
//! - pair: along the relation's axis the centres are r1 + r2 + gap apart, gap in [0.04, 0.10]
//!   (less where two large objects would not fit); across it they are offset by at most 0.3 of
//!   that distance; the pair is placed anywhere it fits.
//! - style: saturation in [0.55, 1], contrast in [0.6, 1], shading in [0, 1]; texture 0 with
//!   probability 1/2, else in [0.2, 1]; noise 0 with probability 0.6, else in [0.01, 0.05];
//!   clutter: no specks with probability 1/2, else 1 to 8 specks of radius [0.02, 0.035]
//!   anywhere in the frame, each a random hue (S in [0.5, 1], V in [0.4, 1]).
//!
//! [`describe`] reads the caption back from the geometry: size small below radius 0.16;
//! a single object is "in the centre" when max(|dx|, |dy|) < 0.1, else on the side of its larger
//! offset; for a pair, the vector from the second centre to the first decides the relation by
//! its larger component (vertical wins only when strictly larger). Every sampled scene
//! describes back to the caption it was sampled for.
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::caption::{
    Background, CaptionSpec, Colour, Layout, ObjectSpec, Position, Relation, Shape, Size,
};
use super::TinyError;

/// Most distractor specks a sampled scene carries; the clutter factor is `specks / MAX_SPECKS`.
pub const MAX_SPECKS: usize = 8;
/// Largest per-pixel grain amplitude a sampled scene carries.
pub const MAX_NOISE: f32 = 0.05;
/// Lowest saturation a sampled scene carries (colours stay nameable above it).
pub const MIN_SATURATION: f32 = 0.55;

const SMALL_RADIUS: (f32, f32) = (0.10, 0.14);
const LARGE_RADIUS: (f32, f32) = (0.18, 0.22);
const SIZE_THRESHOLD: f32 = 0.16;
const FRAME_MARGIN: f32 = 0.03;
const CENTRE_ZONE: f32 = 0.1;

/// A renderable scene. Objects are drawn in order, over the specks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub objects: Vec<SceneObject>,
    pub specks: Vec<Speck>,
    pub style: Style,
    /// Seed of the per-pixel grain (a hash of seed and pixel, so renders need no RNG state).
    pub noise_seed: u64,
}

/// A placed object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    pub shape: Shape,
    pub colour: Colour,
    /// Centre (x, y) in image fractions.
    pub centre: [f32; 2],
    /// Half-extent of the bounding box in image fractions.
    pub radius: f32,
}

impl SceneObject {
    /// The size class a viewer would name.
    pub fn size(&self) -> Size {
        if self.radius < SIZE_THRESHOLD {
            Size::Small
        } else {
            Size::Large
        }
    }

    /// Area in image fractions squared (square half-side is 0.9 r, triangle base 2r, height 1.75r).
    pub fn area(&self) -> f32 {
        let r2 = self.radius * self.radius;
        match self.shape {
            Shape::Circle => std::f32::consts::PI * r2,
            Shape::Square => 3.24 * r2,
            Shape::Triangle => 1.75 * r2,
        }
    }
}

/// A small distractor dot of a flat colour.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Speck {
    pub centre: [f32; 2],
    pub radius: f32,
    /// sRGB in [0, 1].
    pub rgb: [f32; 3],
}

/// Style parameters a caption does not name; their effects are documented in [the renderer](mod@super::render).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Style {
    /// Multiplier of the object colours' HSV saturation.
    pub saturation: f32,
    /// Global contrast about mid-grey: v' = 0.5 + contrast (v - 0.5).
    pub contrast: f32,
    /// Strength in [0, 1] of a light-from-top-left gradient across each object.
    pub shading: f32,
    /// Strength in [0, 1] of a diagonal weave on the background.
    pub texture: f32,
    /// Amplitude of the uniform per-pixel, per-channel grain (fraction of full scale).
    pub noise: f32,
}

/// Image-centre offset of an object's centre.
fn offset(object: &SceneObject) -> (f32, f32) {
    (object.centre[0] - 0.5, object.centre[1] - 0.5)
}

fn range(rng: &mut ChaCha8Rng, (lo, hi): (f32, f32)) -> f32 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

fn radius_for(size: Option<Size>, rng: &mut ChaCha8Rng) -> f32 {
    let size = size.unwrap_or_else(|| Size::ALL[rng.random_range(0..Size::ALL.len())]);
    match size {
        Size::Small => range(rng, SMALL_RADIUS),
        Size::Large => range(rng, LARGE_RADIUS),
    }
}

/// Allowed centre coordinates for a bounding-box half-extent `r`.
fn in_frame(r: f32) -> (f32, f32) {
    (r + FRAME_MARGIN, 1.0 - r - FRAME_MARGIN)
}

fn intersect(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    (a.0.max(b.0), a.1.min(b.1))
}

fn place_single(position: Position, r: f32, rng: &mut ChaCha8Rng) -> [f32; 2] {
    let frame = in_frame(r);
    let along = |rng: &mut ChaCha8Rng, sign: f32| {
        let (near, far) = (0.5 + sign * 0.14, 0.5 + sign * 0.28);
        range(rng, intersect((near.min(far), near.max(far)), frame))
    };
    let across = |rng: &mut ChaCha8Rng| range(rng, intersect((0.41, 0.59), frame));
    match position {
        Position::Left => [along(rng, -1.0), across(rng)],
        Position::Right => [along(rng, 1.0), across(rng)],
        Position::Top => [across(rng), along(rng, -1.0)],
        Position::Bottom => [across(rng), along(rng, 1.0)],
        Position::Centre => [range(rng, (0.45, 0.55)), range(rng, (0.45, 0.55))],
    }
}

/// Centres of (first, second) so that first stands in `relation` to second.
fn place_pair(relation: Relation, r1: f32, r2: f32, rng: &mut ChaCha8Rng) -> ([f32; 2], [f32; 2]) {
    let max_gap = (1.0 - 2.0 * FRAME_MARGIN - 2.0 * (r1 + r2)).min(0.10);
    let gap = range(rng, (0.04_f32.min(max_gap), max_gap));
    let distance = r1 + r2 + gap;
    // Signed distance from second to first along the axis: negative = above / left of.
    let signed = match relation {
        Relation::Above | Relation::LeftOf => -distance,
        Relation::Below | Relation::RightOf => distance,
    };
    let cross = range(rng, (-0.3 * distance, 0.3 * distance));
    let (f1, f2) = (in_frame(r1), in_frame(r2));
    // first = second + (signed, cross) in (along, across) coordinates.
    let along = range(rng, intersect(f1, (f2.0 + signed, f2.1 + signed)));
    let across = range(rng, intersect(f1, (f2.0 + cross, f2.1 + cross)));
    let first = (along, across);
    let second = (along - signed, across - cross);
    match relation {
        Relation::Above | Relation::Below => ([first.1, first.0], [second.1, second.0]),
        Relation::LeftOf | Relation::RightOf => ([first.0, first.1], [second.0, second.1]),
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

/// An object colour as rendered under a given style saturation (sRGB in [0, 1]).
pub(super) fn object_rgb(colour: Colour, saturation: f32) -> [f32; 3] {
    let (h, s, v) = colour.hsv();
    hsv_to_rgb(h, (s * saturation).clamp(0.0, 1.0), v)
}

fn sample_style(rng: &mut ChaCha8Rng) -> Style {
    Style {
        saturation: range(rng, (MIN_SATURATION, 1.0)),
        contrast: range(rng, (0.6, 1.0)),
        shading: range(rng, (0.0, 1.0)),
        texture: if rng.random_bool(0.5) {
            0.0
        } else {
            range(rng, (0.2, 1.0))
        },
        noise: if rng.random_bool(0.6) {
            0.0
        } else {
            range(rng, (0.01, MAX_NOISE))
        },
    }
}

fn sample_specks(rng: &mut ChaCha8Rng) -> Vec<Speck> {
    let count = if rng.random_bool(0.5) {
        0
    } else {
        rng.random_range(1..=MAX_SPECKS)
    };
    (0..count)
        .map(|_| Speck {
            centre: [range(rng, (0.03, 0.97)), range(rng, (0.03, 0.97))],
            radius: range(rng, (0.02, 0.035)),
            rgb: hsv_to_rgb(
                range(rng, (0.0, 360.0)),
                range(rng, (0.5, 1.0)),
                range(rng, (0.4, 1.0)),
            ),
        })
        .collect()
}

fn placed(spec: ObjectSpec, centre: [f32; 2], radius: f32) -> SceneObject {
    SceneObject {
        shape: spec.shape,
        colour: spec.colour,
        centre,
        radius,
    }
}

/// Draws a random scene that matches `spec`: free sizes, jittered positions, random style.
/// The draw order of the RNG is fixed, so a seed gives the same scene on every platform.
/// A caption that is not [`CaptionSpec::is_drawable`] is drawn all the same (an object in
/// the background's colour stays faintly visible); callers that want clean data check first.
pub fn sample_scene_for(spec: &CaptionSpec, rng: &mut ChaCha8Rng) -> Scene {
    let objects = match spec.layout {
        Layout::Single { object, position } => {
            let r = radius_for(object.size, rng);
            vec![placed(object, place_single(position, r, rng), r)]
        }
        Layout::Pair {
            first,
            relation,
            second,
        } => {
            let r1 = radius_for(first.size, rng);
            let r2 = radius_for(second.size, rng);
            let (c1, c2) = place_pair(relation, r1, r2, rng);
            vec![placed(first, c1, r1), placed(second, c2, r2)]
        }
    };
    Scene {
        background: spec.background,
        objects,
        specks: sample_specks(rng),
        style: sample_style(rng),
        noise_seed: rng.random(),
    }
}

/// A uniformly random object; its size is unnamed, small or large with probability 1/3 each.
pub(super) fn random_object(rng: &mut ChaCha8Rng) -> ObjectSpec {
    ObjectSpec {
        shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
        colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
        size: match rng.random_range(0..3) {
            0 => None,
            1 => Some(Size::Small),
            _ => Some(Size::Large),
        },
    }
}

/// A random drawable caption: a single object with probability 0.4, else a pair; each object's
/// size is unnamed, small or large with probability 1/3; everything else uniform.
pub fn random_caption_spec(rng: &mut ChaCha8Rng) -> CaptionSpec {
    loop {
        let layout = if rng.random_bool(0.4) {
            Layout::Single {
                object: random_object(rng),
                position: Position::ALL[rng.random_range(0..Position::ALL.len())],
            }
        } else {
            Layout::Pair {
                first: random_object(rng),
                relation: Relation::ALL[rng.random_range(0..Relation::ALL.len())],
                second: random_object(rng),
            }
        };
        let spec = CaptionSpec {
            layout,
            background: Background::ALL[rng.random_range(0..Background::ALL.len())],
        };
        if spec.is_drawable() {
            return spec;
        }
    }
}

/// The position a viewer would name for a lone object.
pub(super) fn position_of(object: &SceneObject) -> Position {
    let (dx, dy) = offset(object);
    if dx.abs().max(dy.abs()) < CENTRE_ZONE {
        Position::Centre
    } else if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            Position::Left
        } else {
            Position::Right
        }
    } else if dy < 0.0 {
        Position::Top
    } else {
        Position::Bottom
    }
}

/// The relation a viewer would name for `first` relative to `second`.
pub(super) fn relation_of(first: &SceneObject, second: &SceneObject) -> Relation {
    let dx = first.centre[0] - second.centre[0];
    let dy = first.centre[1] - second.centre[1];
    if dy.abs() > dx.abs() {
        if dy < 0.0 {
            Relation::Above
        } else {
            Relation::Below
        }
    } else if dx < 0.0 {
        Relation::LeftOf
    } else {
        Relation::RightOf
    }
}

/// The fully specified caption (sizes named) of a scene's content, read from its geometry.
pub fn describe(scene: &Scene) -> Result<CaptionSpec, TinyError> {
    let spec_of = |o: &SceneObject| ObjectSpec {
        shape: o.shape,
        colour: o.colour,
        size: Some(o.size()),
    };
    let layout = match scene.objects.as_slice() {
        [object] => Layout::Single {
            object: spec_of(object),
            position: position_of(object),
        },
        [first, second] => Layout::Pair {
            first: spec_of(first),
            relation: relation_of(first, second),
            second: spec_of(second),
        },
        other => {
            return Err(TinyError::Scene(format!(
                "a scene has 1 or 2 objects, this one has {}",
                other.len()
            )))
        }
    };
    Ok(CaptionSpec {
        layout,
        background: scene.background,
    })
}

/// Whether a fully specified description matches a caption (the caption may leave sizes open).
pub fn matches(caption: &CaptionSpec, description: &CaptionSpec) -> bool {
    let object_matches = |c: &ObjectSpec, d: &ObjectSpec| {
        c.shape == d.shape && c.colour == d.colour && c.size.is_none_or(|s| Some(s) == d.size)
    };
    let layouts = match (caption.layout, description.layout) {
        (
            Layout::Single { object, position },
            Layout::Single {
                object: o,
                position: p,
            },
        ) => object_matches(&object, &o) && position == p,
        (
            Layout::Pair {
                first,
                relation,
                second,
            },
            Layout::Pair {
                first: f,
                relation: r,
                second: s,
            },
        ) => object_matches(&first, &f) && relation == r && object_matches(&second, &s),
        _ => false,
    };
    layouts && caption.background == description.background
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn same_seed_same_scene() {
        let spec = "a small red circle above a blue square on a white background"
            .parse()
            .unwrap();
        let a = sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(7));
        let b = sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(7));
        let c = sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn sampled_scenes_describe_back_to_their_caption() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..5000 {
            let spec = random_caption_spec(&mut rng);
            let scene = sample_scene_for(&spec, &mut rng);
            let description = describe(&scene).unwrap();
            assert!(
                matches(&spec, &description),
                "{spec} drawn as {description}"
            );
            for o in &scene.objects {
                assert!(o.centre[0] - o.radius >= FRAME_MARGIN - 1e-6);
                assert!(o.centre[0] + o.radius <= 1.0 - FRAME_MARGIN + 1e-6);
                assert!(o.centre[1] - o.radius >= FRAME_MARGIN - 1e-6);
                assert!(o.centre[1] + o.radius <= 1.0 - FRAME_MARGIN + 1e-6);
            }
            if let [a, b] = scene.objects.as_slice() {
                // Bounding boxes are separated along at least one axis: objects never overlap.
                let apart_x = (a.centre[0] - b.centre[0]).abs() >= a.radius + b.radius;
                let apart_y = (a.centre[1] - b.centre[1]).abs() >= a.radius + b.radius;
                assert!(apart_x || apart_y, "{spec}: overlapping objects");
            }
        }
    }

    #[test]
    fn style_stays_in_documented_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (mut noisy, mut textured, mut cluttered) = (0, 0, 0);
        for _ in 0..2000 {
            let spec = random_caption_spec(&mut rng);
            let s = sample_scene_for(&spec, &mut rng);
            assert!((MIN_SATURATION..=1.0).contains(&s.style.saturation));
            assert!((0.6..=1.0).contains(&s.style.contrast));
            assert!((0.0..=1.0).contains(&s.style.shading));
            assert!((0.0..=1.0).contains(&s.style.texture));
            assert!((0.0..=MAX_NOISE).contains(&s.style.noise));
            assert!(s.specks.len() <= MAX_SPECKS);
            noisy += usize::from(s.style.noise > 0.0);
            textured += usize::from(s.style.texture > 0.0);
            cluttered += usize::from(!s.specks.is_empty());
        }
        // Probabilities 0.4, 0.5 and 0.5 of 2000.
        for (count, expected) in [(noisy, 800), (textured, 1000), (cluttered, 1000)] {
            assert!(
                count.abs_diff(expected) < 120,
                "{count} of 2000, expected {expected}"
            );
        }
    }

    #[test]
    fn describe_reads_geometry() {
        let object = |x: f32, y: f32, radius: f32| SceneObject {
            shape: Shape::Square,
            colour: Colour::Green,
            centre: [x, y],
            radius,
        };
        assert_eq!(position_of(&object(0.3, 0.55, 0.1)), Position::Left);
        assert_eq!(position_of(&object(0.55, 0.8, 0.1)), Position::Bottom);
        assert_eq!(position_of(&object(0.52, 0.45, 0.1)), Position::Centre);
        assert_eq!(object(0.5, 0.5, 0.15).size(), Size::Small);
        assert_eq!(object(0.5, 0.5, 0.17).size(), Size::Large);
        assert_eq!(
            relation_of(&object(0.5, 0.2, 0.1), &object(0.6, 0.7, 0.1)),
            Relation::Above
        );
        assert_eq!(
            relation_of(&object(0.8, 0.5, 0.1), &object(0.3, 0.6, 0.1)),
            Relation::RightOf
        );
        let mut scene = sample_scene_for(
            &"a red circle on the left on a white background"
                .parse()
                .unwrap(),
            &mut ChaCha8Rng::seed_from_u64(3),
        );
        scene.objects.clear();
        assert!(describe(&scene).is_err());
    }

    #[test]
    fn scenes_round_trip_through_json() {
        let spec = random_caption_spec(&mut ChaCha8Rng::seed_from_u64(4));
        let scene = sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(5));
        let json = serde_json::to_string(&scene).unwrap();
        assert_eq!(serde_json::from_str::<Scene>(&json).unwrap(), scene);
    }
}

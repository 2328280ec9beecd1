//! The simulated human: faithfulness to the caption first, then a style taste that differs from
//! the aesthetic rule. The rule is documented in [`super`].
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::caption::{
    Background, CaptionSpec, Colour, Layout, ObjectSpec, Position, Relation, Shape, Size,
};
use super::scene::{
    position_of, random_object, relation_of, sample_scene_for, Scene, SceneObject, MAX_NOISE,
    MIN_SATURATION,
};

/// Smallest taste difference a generated style-only pair has, so its label is clear-cut.
pub const TASTE_MARGIN: f32 = 0.05;

/// The simulated human's style taste in [0, 1], a liking for bold, clean pictures:
/// `0.30 saturation + 0.30 size + 0.15 centring + 0.10 (1 - grain) + 0.15 (1 - texture)`,
/// where saturation is (saturation - 0.55) / 0.45, size the objects' total area over 0.25
/// (capped at 1), centring 1 - (distance of the area-weighted centroid from the image centre)
/// / 0.3 (floored at 0), grain noise / 0.05 and texture the background weave strength.
pub fn taste(scene: &Scene) -> f32 {
    let unit = |v: f32| v.clamp(0.0, 1.0);
    let saturation = unit((scene.style.saturation - MIN_SATURATION) / (1.0 - MIN_SATURATION));
    let total: f32 = scene.objects.iter().map(SceneObject::area).sum();
    let size = unit(total / 0.25);
    let centring = if total > 0.0 {
        let cx = scene
            .objects
            .iter()
            .map(|o| o.area() * o.centre[0])
            .sum::<f32>()
            / total;
        let cy = scene
            .objects
            .iter()
            .map(|o| o.area() * o.centre[1])
            .sum::<f32>()
            / total;
        unit(1.0 - ((cx - 0.5).powi(2) + (cy - 0.5).powi(2)).sqrt() / 0.3)
    } else {
        0.0
    };
    let grain = unit(scene.style.noise / MAX_NOISE);
    let texture = unit(scene.style.texture);
    0.30 * saturation
        + 0.30 * size
        + 0.15 * centring
        + 0.10 * (1.0 - grain)
        + 0.15 * (1.0 - texture)
}

/// Attribute mismatches between a named object and a drawn one (shape, colour, named size).
fn object_mismatches(named: &ObjectSpec, drawn: &SceneObject) -> u32 {
    u32::from(named.shape != drawn.shape)
        + u32::from(named.colour != drawn.colour)
        + u32::from(named.size.is_some_and(|s| s != drawn.size()))
}

/// How many ways a scene contradicts a caption: 1 for a wrong background; with the right object
/// count, 1 per wrong shape, colour, named size and the position (one object) or relation (two,
/// matching caption objects to drawn ones in whichever order gives fewer mismatches); with the
/// wrong count, 2 plus the shape, colour and size mismatches of the best-matching object.
pub fn violations(spec: &CaptionSpec, scene: &Scene) -> u32 {
    let background = u32::from(spec.background != scene.background);
    let content = match (spec.layout, scene.objects.as_slice()) {
        (Layout::Single { object, position }, [drawn]) => {
            object_mismatches(&object, drawn) + u32::from(position != position_of(drawn))
        }
        (
            Layout::Pair {
                first,
                relation,
                second,
            },
            [a, b],
        ) => {
            let cost = |x: &SceneObject, y: &SceneObject| {
                object_mismatches(&first, x)
                    + object_mismatches(&second, y)
                    + u32::from(relation != relation_of(x, y))
            };
            cost(a, b).min(cost(b, a))
        }
        (_, drawn) => {
            let best = spec
                .objects()
                .iter()
                .flat_map(|named| drawn.iter().map(move |d| object_mismatches(named, d)))
                .min()
                .unwrap_or(3);
            2 + best
        }
    };
    background + content
}

/// One of the two images of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    A,
    B,
}

/// Which image the simulated human prefers for a caption: fewer [`violations`] wins; with equal
/// violations the higher [`taste`] wins; an exact tie goes to A.
pub fn preferred(spec: &CaptionSpec, a: &Scene, b: &Scene) -> Side {
    let (va, vb) = (violations(spec, a), violations(spec, b));
    if va != vb {
        return if va < vb { Side::A } else { Side::B };
    }
    if taste(b) > taste(a) {
        Side::B
    } else {
        Side::A
    }
}

/// A labelled comparison, as in HPDv2: a caption, two images, the one a human picked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub caption: String,
    pub a: Scene,
    pub b: Scene,
    pub preferred: Side,
}

fn other<T: Copy + PartialEq>(all: &[T], not: T, rng: &mut ChaCha8Rng) -> T {
    let choices: Vec<T> = all.iter().copied().filter(|&v| v != not).collect();
    choices[rng.random_range(0..choices.len())]
}

fn pick<T: Copy>(all: &[T], rng: &mut ChaCha8Rng) -> T {
    all[rng.random_range(0..all.len())]
}

/// Changes one object attribute of a caption (`kind` 0: colour, 1: shape, 2: size).
fn corrupt_object(object: &mut ObjectSpec, kind: u32, rng: &mut ChaCha8Rng) {
    match kind {
        0 => object.colour = other(&Colour::ALL, object.colour, rng),
        1 => object.shape = other(&Shape::ALL, object.shape, rng),
        _ => {
            object.size = Some(match object.size {
                Some(size) => other(&Size::ALL, size, rng),
                None => pick(&Size::ALL, rng),
            })
        }
    }
}

/// A drawable caption that differs from `spec` in one respect, chosen uniformly among: an
/// object's colour, shape or (named) size, the object count, the position or relation, and
/// the background.
pub fn corrupt(spec: &CaptionSpec, rng: &mut ChaCha8Rng) -> CaptionSpec {
    let sized = spec.objects().iter().any(|o| o.size.is_some());
    loop {
        let mut wrong = *spec;
        let kind = rng.random_range(0..6);
        match (kind, &mut wrong.layout) {
            (0 | 1, Layout::Single { object, .. }) => corrupt_object(object, kind, rng),
            (0 | 1, Layout::Pair { first, second, .. }) => {
                let target = if rng.random_bool(0.5) { first } else { second };
                corrupt_object(target, kind, rng);
            }
            (2, _) if !sized => continue,
            (2, Layout::Single { object, .. }) => corrupt_object(object, 2, rng),
            (2, Layout::Pair { first, second, .. }) => {
                let target = match (first.size, second.size) {
                    (Some(_), None) => first,
                    (None, Some(_)) => second,
                    _ if rng.random_bool(0.5) => first,
                    _ => second,
                };
                corrupt_object(target, 2, rng);
            }
            (3, Layout::Single { object, .. }) => {
                let object = *object;
                wrong.layout = Layout::Pair {
                    first: object,
                    relation: pick(&Relation::ALL, rng),
                    second: random_object(rng),
                };
            }
            (3, Layout::Pair { first, second, .. }) => {
                let object = if rng.random_bool(0.5) {
                    *first
                } else {
                    *second
                };
                wrong.layout = Layout::Single {
                    object,
                    position: pick(&Position::ALL, rng),
                };
            }
            (4, Layout::Single { position, .. }) => {
                *position = other(&Position::ALL, *position, rng)
            }
            (4, Layout::Pair { relation, .. }) => *relation = other(&Relation::ALL, *relation, rng),
            _ => wrong.background = other(&Background::ALL, spec.background, rng),
        }
        if wrong.is_drawable() && wrong != *spec {
            return wrong;
        }
    }
}

/// A labelled preference pair for a caption. With probability 1/2 both images are faithful and
/// differ in taste by at least [`TASTE_MARGIN`] (redrawn up to 32 times); otherwise, or when no
/// such draw comes, one image is drawn from a [`corrupt`]ed caption. The images' order is random
/// and the label is [`preferred`].
pub fn preference_pair(spec: &CaptionSpec, rng: &mut ChaCha8Rng) -> PreferencePair {
    let faithful = sample_scene_for(spec, rng);
    let mut rival = None;
    if rng.random_bool(0.5) {
        for _ in 0..32 {
            let candidate = sample_scene_for(spec, rng);
            if (taste(&candidate) - taste(&faithful)).abs() >= TASTE_MARGIN {
                rival = Some(candidate);
                break;
            }
        }
    }
    let rival = rival.unwrap_or_else(|| {
        let wrong = corrupt(spec, rng);
        sample_scene_for(&wrong, rng)
    });
    let (a, b) = if rng.random_bool(0.5) {
        (faithful, rival)
    } else {
        (rival, faithful)
    };
    let preferred = preferred(spec, &a, &b);
    PreferencePair {
        caption: spec.to_string(),
        a,
        b,
        preferred,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::scene::random_caption_spec;
    use rand::SeedableRng;

    #[test]
    fn faithful_scenes_have_no_violations_and_corrupted_ones_do() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for _ in 0..3000 {
            let spec = random_caption_spec(&mut rng);
            let scene = sample_scene_for(&spec, &mut rng);
            assert_eq!(violations(&spec, &scene), 0, "{spec}");
            let wrong = corrupt(&spec, &mut rng);
            assert!(wrong.is_drawable());
            let bad = sample_scene_for(&wrong, &mut rng);
            assert!(violations(&spec, &bad) >= 1, "{spec} vs {wrong}");
        }
    }

    #[test]
    fn violations_count_each_kind_of_error() {
        let spec: CaptionSpec = "a small red circle above a blue square on a white background"
            .parse()
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let scene = sample_scene_for(&spec, &mut rng);
        let edit = |f: &dyn Fn(&mut Scene)| {
            let mut s = scene.clone();
            f(&mut s);
            violations(&spec, &s)
        };
        assert_eq!(edit(&|_| ()), 0);
        assert_eq!(edit(&|s| s.background = Background::Black), 1);
        assert_eq!(edit(&|s| s.objects[0].colour = Colour::Green), 1);
        assert_eq!(edit(&|s| s.objects[0].shape = Shape::Triangle), 1);
        assert_eq!(edit(&|s| s.objects[0].radius = 0.2), 1);
        // The second object's size is not named, so any size is faithful.
        assert_eq!(edit(&|s| s.objects[1].radius = 0.2), 0);
        assert_eq!(edit(&|s| s.objects.swap(0, 1)), 0);
        assert_eq!(
            edit(&|s| {
                let (c0, c1) = (s.objects[0].centre, s.objects[1].centre);
                s.objects[0].centre = c1;
                s.objects[1].centre = c0;
            }),
            1
        );
        assert_eq!(edit(&|s| s.objects.truncate(1)), 2);
        assert_eq!(
            edit(&|s| {
                s.objects.truncate(1);
                s.objects[0].colour = Colour::Pink;
            }),
            3
        );
        assert_eq!(
            edit(&|s| {
                s.objects.truncate(1);
                s.objects[0].colour = Colour::Pink;
                s.objects[0].shape = Shape::Triangle;
            }),
            4
        );
    }

    #[test]
    fn taste_likes_saturation_size_centring_and_plain_images() {
        let spec: CaptionSpec = "a red circle on the left on a white background"
            .parse()
            .unwrap();
        let scene = sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(23));
        let base = taste(&scene);
        let edit = |f: &dyn Fn(&mut Scene)| {
            let mut s = scene.clone();
            f(&mut s);
            taste(&s)
        };
        assert!(edit(&|s| s.style.saturation = 1.0) > edit(&|s| s.style.saturation = 0.6));
        assert!(edit(&|s| s.objects[0].radius = 0.22) > edit(&|s| s.objects[0].radius = 0.1));
        assert!(
            edit(&|s| s.objects[0].centre = [0.5, 0.5])
                > edit(&|s| s.objects[0].centre = [0.25, 0.5])
        );
        assert!(edit(&|s| s.style.noise = 0.0) > edit(&|s| s.style.noise = MAX_NOISE));
        assert!(edit(&|s| s.style.texture = 0.0) > edit(&|s| s.style.texture = 1.0));
        // Shading and specks do not matter to this rater.
        assert_eq!(edit(&|s| s.style.shading = 1.0 - s.style.shading), base);
        assert_eq!(edit(&|s| s.specks.clear()), base);
        assert!((0.0..=1.0).contains(&base));
    }

    #[test]
    fn labels_follow_the_documented_rule() {
        let mut rng = ChaCha8Rng::seed_from_u64(24);
        let (mut style_pairs, mut content_pairs, mut a_wins) = (0, 0, 0);
        for _ in 0..2000 {
            let spec = random_caption_spec(&mut rng);
            let pair = preference_pair(&spec, &mut rng);
            assert_eq!(pair.caption.parse::<CaptionSpec>().unwrap(), spec);
            let (va, vb) = (violations(&spec, &pair.a), violations(&spec, &pair.b));
            let (ta, tb) = (taste(&pair.a), taste(&pair.b));
            // One image is always faithful.
            assert_eq!(va.min(vb), 0);
            let expected = if va != vb {
                content_pairs += 1;
                if va < vb {
                    Side::A
                } else {
                    Side::B
                }
            } else {
                style_pairs += 1;
                assert!((ta - tb).abs() >= TASTE_MARGIN);
                if ta > tb {
                    Side::A
                } else {
                    Side::B
                }
            };
            assert_eq!(pair.preferred, expected);
            a_wins += usize::from(pair.preferred == Side::A);
        }
        assert!(
            (800..1200).contains(&style_pairs),
            "{style_pairs} style pairs"
        );
        assert!(
            (800..1200).contains(&content_pairs),
            "{content_pairs} content pairs"
        );
        assert!(
            (850..1150).contains(&a_wins),
            "A preferred {a_wins} of 2000"
        );
    }

    #[test]
    fn faithfulness_beats_taste() {
        let spec: CaptionSpec =
            "a large blue triangle below a small yellow circle on a grey background"
                .parse()
                .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(25);
        let good = sample_scene_for(&spec, &mut rng);
        let mut wrong = good.clone();
        wrong.objects[0].colour = Colour::Green;
        wrong.style.saturation = 1.0;
        wrong.style.noise = 0.0;
        let mut plain = good.clone();
        plain.style.saturation = MIN_SATURATION;
        plain.style.noise = MAX_NOISE;
        assert!(taste(&wrong) > taste(&plain));
        assert_eq!(preferred(&spec, &wrong, &plain), Side::B);
        assert_eq!(preferred(&spec, &plain, &wrong), Side::A);
    }
}

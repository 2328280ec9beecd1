//! The procedural aesthetic rating (1-10) of a scene, and a check that the three tiny-world
//! rewards pull in different directions. The rule itself is documented in [`super`].
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::caption::{Background, Colour};
use super::preference::taste;
use super::render::{render, RgbImage};
use super::scene::{
    object_rgb, random_caption_spec, sample_scene_for, Scene, SceneObject, MAX_NOISE, MAX_SPECKS,
};
use super::TinyError;

/// The aesthetic rating's factors, each in [0, 1]; see the module docs of [`super`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AestheticFactors {
    pub harmony: f32,
    pub composition: f32,
    pub contrast: f32,
    pub texture: f32,
    pub shading: f32,
    pub saturation: f32,
    pub clutter: f32,
    pub noise: f32,
}

/// Weights of the positive factors (they sum to 1) and of the two penalties.
const WEIGHTS: [f32; 6] = [0.20, 0.20, 0.15, 0.25, 0.10, 0.10];
const CLUTTER_WEIGHT: f32 = 0.25;
const NOISE_WEIGHT: f32 = 0.25;

/// Harmony of two hues by their circular distance in degrees: piecewise linear through
/// (0, 0.25), (30, 0.85), (60, 0.4), (90, 0.1), (120, 0.4), (150, 0.9), (180, 1.0):
/// analogous and complementary pairs are pleasing, hues a quarter-turn apart clash.
fn hue_harmony(a: f32, b: f32) -> f32 {
    const KNOTS: [(f32, f32); 7] = [
        (0.0, 0.25),
        (30.0, 0.85),
        (60.0, 0.4),
        (90.0, 0.1),
        (120.0, 0.4),
        (150.0, 0.9),
        (180.0, 1.0),
    ];
    let d = (a - b).rem_euclid(360.0);
    let d = d.min(360.0 - d);
    for pair in KNOTS.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        if d <= x1 {
            return y0 + (y1 - y0) * (d - x0) / (x1 - x0);
        }
    }
    KNOTS[KNOTS.len() - 1].1
}

/// Harmony of an object colour with a background: [`hue_harmony`], or 0.5 on a neutral.
fn background_harmony(colour: Colour, background: Background) -> f32 {
    background
        .hue()
        .map_or(0.5, |hue| hue_harmony(colour.hsv().0, hue))
}

fn luma(rgb: [f32; 3]) -> f32 {
    0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
}

/// Per-axis closeness to a rule-of-thirds line: 1 on the line, 0 from 0.12 away.
fn thirds_line(v: f32) -> f32 {
    let d = (v - 1.0 / 3.0).abs().min((v - 2.0 / 3.0).abs());
    (1.0 - d / 0.12).max(0.0)
}

/// Closeness of the bounding box to the frame: 0 at the sampler's 0.03 margin, 1 from 0.10.
fn margin(object: &SceneObject) -> f32 {
    let [x, y] = object.centre;
    let r = object.radius;
    let m = (x - r).min(1.0 - x - r).min(y - r).min(1.0 - y - r);
    ((m - 0.03) / 0.07).clamp(0.0, 1.0)
}

fn composition(objects: &[SceneObject]) -> f32 {
    match objects {
        [o] => {
            let thirds = 0.5 * (thirds_line(o.centre[0]) + thirds_line(o.centre[1]));
            0.7 * thirds + 0.3 * margin(o)
        }
        [a, b] => {
            let (wa, wb) = (a.area(), b.area());
            let total = (wa + wb).max(1e-9);
            let cx = (wa * a.centre[0] + wb * b.centre[0]) / total;
            let cy = (wa * a.centre[1] + wb * b.centre[1]) / total;
            let off = ((cx - 0.5).powi(2) + (cy - 0.5).powi(2)).sqrt();
            let balance = (1.0 - off / 0.15).max(0.0);
            let gap = ((a.centre[0] - b.centre[0]).abs()).max((a.centre[1] - b.centre[1]).abs())
                - a.radius
                - b.radius;
            let spacing = (gap / 0.08).clamp(0.0, 1.0);
            0.5 * balance + 0.25 * spacing + 0.25 * margin(a).min(margin(b))
        }
        _ => 0.0,
    }
}

/// The factors of [`aesthetic_rating`], for inspection and tests.
pub fn aesthetic_factors(scene: &Scene) -> AestheticFactors {
    let style = &scene.style;
    let objects = &scene.objects;
    let mut harmonies: Vec<f32> = objects
        .iter()
        .map(|o| background_harmony(o.colour, scene.background))
        .collect();
    if let [a, b] = objects.as_slice() {
        harmonies.push(hue_harmony(a.colour.hsv().0, b.colour.hsv().0));
    }
    let mean = |v: &[f32]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f32>() / v.len() as f32
        }
    };
    let bg_luma = luma(scene.background.rgb());
    let luma_gaps: Vec<f32> = objects
        .iter()
        .map(|o| (luma(object_rgb(o.colour, style.saturation)) - bg_luma).abs())
        .collect();
    AestheticFactors {
        harmony: mean(&harmonies),
        composition: composition(objects),
        contrast: (style.contrast * mean(&luma_gaps) / 0.5).clamp(0.0, 1.0),
        texture: (1.0 - ((style.texture - 0.8) / 0.8).powi(2)).clamp(0.0, 1.0),
        shading: style.shading.clamp(0.0, 1.0),
        saturation: (1.0 - (style.saturation - 0.7).abs() / 0.3).clamp(0.0, 1.0),
        clutter: (scene.specks.len() as f32 / MAX_SPECKS as f32).clamp(0.0, 1.0),
        noise: (style.noise / MAX_NOISE).clamp(0.0, 1.0),
    }
}

/// The procedural aesthetic rating in [1, 10] of a scene, from its parameters alone.
pub fn aesthetic_rating(scene: &Scene) -> f32 {
    let f = aesthetic_factors(scene);
    let positive = [
        f.harmony,
        f.composition,
        f.contrast,
        f.texture,
        f.shading,
        f.saturation,
    ];
    let raw = WEIGHTS
        .iter()
        .zip(positive)
        .map(|(w, v)| w * v)
        .sum::<f32>()
        - CLUTTER_WEIGHT * f.clutter
        - NOISE_WEIGHT * f.noise;
    1.0 + 9.0 * raw.clamp(0.0, 1.0)
}

/// JPEG file size in bytes at quality 80 with 4:2:0 chroma (the compressibility metric's
/// setting), from the pure-Rust encoder.
pub fn jpeg_size(image: &RgbImage) -> Result<usize, TinyError> {
    let mut bytes = Vec::new();
    let too_big = || TinyError::Image(format!("{}x{} is too large", image.width, image.height));
    let w = u16::try_from(image.width).map_err(|_| too_big())?;
    let h = u16::try_from(image.height).map_err(|_| too_big())?;
    let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 80);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    encoder
        .encode(&image.data, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| TinyError::Image(format!("JPEG encoding failed: {e}")))?;
    Ok(bytes.len())
}

/// Pearson correlations over random faithful scenes between what each reward wants.
/// Compressibility wants a small JPEG, so a positive correlation with `jpeg_size` means
/// that reward pulls against compressibility.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardDirections {
    pub scenes: usize,
    pub aesthetic_vs_jpeg_size: f64,
    pub taste_vs_jpeg_size: f64,
    pub aesthetic_vs_taste: f64,
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// Measures [`RewardDirections`] over `scenes` random caption-faithful scenes from `seed`.
pub fn reward_directions(scenes: usize, seed: u64) -> Result<RewardDirections, TinyError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut aesthetic, mut preference, mut size) = (vec![], vec![], vec![]);
    for _ in 0..scenes {
        let spec = random_caption_spec(&mut rng);
        let scene = sample_scene_for(&spec, &mut rng);
        aesthetic.push(f64::from(aesthetic_rating(&scene)));
        preference.push(f64::from(taste(&scene)));
        size.push(jpeg_size(&render(&scene))? as f64);
    }
    Ok(RewardDirections {
        scenes,
        aesthetic_vs_jpeg_size: pearson(&aesthetic, &size),
        taste_vs_jpeg_size: pearson(&preference, &size),
        aesthetic_vs_taste: pearson(&aesthetic, &preference),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::caption::{CaptionSpec, Shape};
    use crate::tiny::scene::{Speck, Style};

    /// A blue circle on a black background with middling style: no factor at an extreme.
    fn base_scene() -> Scene {
        Scene {
            background: Background::Black,
            objects: vec![SceneObject {
                shape: Shape::Circle,
                colour: Colour::Blue,
                centre: [0.40, 0.55],
                radius: 0.15,
            }],
            specks: vec![],
            style: Style {
                saturation: 0.85,
                contrast: 0.8,
                shading: 0.5,
                texture: 0.4,
                noise: 0.0,
            },
            noise_seed: 1,
        }
    }

    fn edited(f: impl Fn(&mut Scene)) -> Scene {
        let mut s = base_scene();
        f(&mut s);
        s
    }

    #[test]
    fn ratings_stay_in_range_and_spread() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let ratings: Vec<f32> = (0..5000)
            .map(|_| {
                let spec = random_caption_spec(&mut rng);
                aesthetic_rating(&sample_scene_for(&spec, &mut rng))
            })
            .collect();
        assert!(ratings.iter().all(|r| (1.0..=10.0).contains(r)));
        let low = ratings.iter().filter(|&&r| r < 3.0).count();
        let high = ratings.iter().filter(|&&r| r > 6.0).count();
        assert!(low > 500 && high > 250, "{low} below 3, {high} above 6");
    }

    #[test]
    fn rating_is_the_documented_weighted_sum() {
        let mut rng = ChaCha8Rng::seed_from_u64(32);
        for _ in 0..500 {
            let spec = random_caption_spec(&mut rng);
            let scene = sample_scene_for(&spec, &mut rng);
            let f = aesthetic_factors(&scene);
            let raw = 0.20 * f.harmony
                + 0.20 * f.composition
                + 0.15 * f.contrast
                + 0.25 * f.texture
                + 0.10 * f.shading
                + 0.10 * f.saturation
                - 0.25 * f.clutter
                - 0.25 * f.noise;
            let expected = 1.0 + 9.0 * raw.clamp(0.0, 1.0);
            assert!((aesthetic_rating(&scene) - expected).abs() < 1e-5);
        }
    }

    #[test]
    fn hue_harmony_prefers_analogous_and_complementary() {
        assert!((hue_harmony(0.0, 180.0) - 1.0).abs() < 1e-6);
        assert!((hue_harmony(10.0, 100.0) - 0.1).abs() < 1e-6);
        assert!((hue_harmony(350.0, 20.0) - 0.85).abs() < 1e-6);
        assert!((hue_harmony(45.0, 45.0) - 0.25).abs() < 1e-6);
        assert!(hue_harmony(0.0, 30.0) > hue_harmony(0.0, 60.0));
        assert!(hue_harmony(0.0, 165.0) > hue_harmony(0.0, 120.0));
    }

    #[test]
    fn rating_responds_to_each_factor() {
        let base = base_scene();
        let f0 = aesthetic_factors(&base);
        let r0 = aesthetic_rating(&base);
        assert!(
            r0 > 2.0 && r0 < 9.0,
            "base rating {r0} should leave room both ways"
        );
        let check = |name: &str, scene: Scene, factor: fn(&AestheticFactors) -> f32, up: bool| {
            let f = aesthetic_factors(&scene);
            let r = aesthetic_rating(&scene);
            let (df, dr) = (factor(&f) - factor(&f0), r - r0);
            assert!(df.abs() > 0.05, "{name}: factor moved only {df}");
            assert_eq!(dr > 0.0, up, "{name}: rating {r0} -> {r}");
            assert!(dr.abs() > 0.1, "{name}: rating moved only {dr}");
        };
        // Blue on yellow is complementary, on green a clash.
        check(
            "harmony",
            edited(|s| s.background = Background::Yellow),
            |f| f.harmony,
            true,
        );
        check(
            "clash",
            edited(|s| s.background = Background::Green),
            |f| f.harmony,
            false,
        );
        check(
            "thirds",
            edited(|s| s.objects[0].centre = [1.0 / 3.0, 2.0 / 3.0]),
            |f| f.composition,
            true,
        );
        check(
            "dead centre",
            edited(|s| s.objects[0].centre = [0.5, 0.5]),
            |f| f.composition,
            false,
        );
        check(
            "contrast",
            edited(|s| s.style.contrast = 1.0),
            |f| f.contrast,
            true,
        );
        check(
            "texture",
            edited(|s| s.style.texture = 0.8),
            |f| f.texture,
            true,
        );
        check(
            "no texture",
            edited(|s| s.style.texture = 0.0),
            |f| f.texture,
            false,
        );
        check(
            "shading",
            edited(|s| s.style.shading = 1.0),
            |f| f.shading,
            true,
        );
        check(
            "moderate saturation",
            edited(|s| s.style.saturation = 0.7),
            |f| f.saturation,
            true,
        );
        check(
            "full saturation",
            edited(|s| s.style.saturation = 1.0),
            |f| f.saturation,
            false,
        );
        let speck = Speck {
            centre: [0.8, 0.2],
            radius: 0.03,
            rgb: [1.0, 0.0, 0.0],
        };
        check(
            "clutter",
            edited(|s| s.specks = vec![speck; 4]),
            |f| f.clutter,
            false,
        );
        check(
            "grain",
            edited(|s| s.style.noise = 0.03),
            |f| f.noise,
            false,
        );
        // A pair: balanced and well spaced beats crowded into one corner.
        let spec: CaptionSpec = "a blue circle to the left of a orange square on a grey background"
            .parse()
            .unwrap();
        let mut pair = sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(33));
        pair.style = base.style;
        pair.specks.clear();
        pair.objects[0].centre = [0.3, 0.5];
        pair.objects[1].centre = [0.7, 0.5];
        let balanced = aesthetic_rating(&pair);
        pair.objects[0].centre = [0.2, 0.2];
        pair.objects[1].centre = [
            0.2 + pair.objects[0].radius + pair.objects[1].radius + 0.01,
            0.2,
        ];
        assert!(aesthetic_rating(&pair) < balanced - 0.5);
    }

    #[test]
    fn rewards_pull_in_different_directions() {
        let d = reward_directions(1500, 34).unwrap();
        assert_eq!(d, reward_directions(1500, 34).unwrap());
        // Aesthetics wants bytes (against compressibility), clearly more than the human does.
        assert!(d.aesthetic_vs_jpeg_size > 0.15, "{d:?}");
        assert!(
            d.aesthetic_vs_jpeg_size > d.taste_vs_jpeg_size + 0.15,
            "{d:?}"
        );
        // Aesthetics and the human's taste are nearly independent.
        assert!(d.aesthetic_vs_taste.abs() < 0.4, "{d:?}");

        // Factor by factor, for one scene: what each reward would change.
        let base = base_scene();
        let jpeg = |s: &Scene| jpeg_size(&render(s)).unwrap();
        let textured = edited(|s| s.style.texture = 0.8);
        let flat = edited(|s| s.style.texture = 0.0);
        assert!(jpeg(&textured) > jpeg(&flat) + 40, "weave costs bytes");
        assert!(aesthetic_rating(&textured) > aesthetic_rating(&flat));
        assert!(taste(&textured) < taste(&flat));
        let vivid = edited(|s| s.style.saturation = 1.0);
        let moderate = edited(|s| s.style.saturation = 0.7);
        assert!(taste(&vivid) > taste(&moderate));
        assert!(aesthetic_rating(&vivid) < aesthetic_rating(&moderate));
        let centred = edited(|s| s.objects[0].centre = [0.5, 0.5]);
        let thirds = edited(|s| s.objects[0].centre = [1.0 / 3.0, 2.0 / 3.0]);
        assert!(taste(&centred) > taste(&thirds));
        assert!(aesthetic_rating(&centred) < aesthetic_rating(&thirds));
        let grainy = edited(|s| s.style.noise = MAX_NOISE);
        assert!(jpeg(&grainy) > jpeg(&base));
        assert!(
            taste(&grainy) < taste(&base) && aesthetic_rating(&grainy) < aesthetic_rating(&base)
        );
    }
}

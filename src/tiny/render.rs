//! The renderer: a scene to a 32x32 anti-aliased RGB image, batches to f32 CHW, PNG grids.
//!
//! Per pixel (i, j), centre (i + 0.5, j + 0.5) in pixel units, all in sRGB floats in [0, 1]:
//! 1. background colour plus `texture * 0.10 * w(i, j)`, with the diagonal weave
//!    w = (1, 0, -1, 0) for (i - j) mod 4 = (0, 1, 2, 3) (period 4 px);
//! 2. specks, then objects in order, composited "over" with their coverage of the pixel (so
//!    edges are anti-aliased): the mean over 4 sub-rows at heights j + 1/8, 3/8, 5/8, 7/8 of the
//!    exact length of the shape's horizontal span inside the pixel;
//!    an object's colour is its named colour at the scene's saturation, times
//!    `1 + 0.3 * shading * g` with g = ((cx - x) + (cy - y)) / (2r) the light-from-top-left
//!    gradient, clamped to [-1, 1];
//! 3. contrast about mid-grey, v = 0.5 + contrast (v - 0.5);
//! 4. grain: plus `noise * u`, u uniform in [-1, 1) from a hash of (noise_seed, pixel, channel);
//! 5. v clamped to [0, 1] and rounded to 8 bits.
//!
//! Only IEEE-exact arithmetic (no trigonometry), so renders are bit-identical across platforms.
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use super::caption::Shape;
use super::scene::{object_rgb, Scene, SceneObject};
use super::TinyError;

/// Side of a rendered image in pixels.
pub const IMAGE_SIZE: usize = 32;

const TEXTURE_AMPLITUDE: f32 = 0.10;
const SHADING_AMPLITUDE: f32 = 0.3;
/// Sub-rows per pixel row over which coverage is averaged.
const SUBROWS: usize = 4;

/// An 8-bit RGB image, row-major, channels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let at = 3 * (y * self.width + x);
        [self.data[at], self.data[at + 1], self.data[at + 2]]
    }
}

/// A batch of images as f32 in [0, 1], laid out NCHW.
#[derive(Debug, Clone, PartialEq)]
pub struct ChwBatch {
    /// [batch, channels, height, width]
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

/// A filled shape in pixel coordinates.
struct Primitive {
    shape: Shape,
    cx: f32,
    cy: f32,
    r: f32,
}

impl Primitive {
    fn of(object: &SceneObject, scale: f32) -> Primitive {
        Primitive {
            shape: object.shape,
            cx: object.centre[0] * scale,
            cy: object.centre[1] * scale,
            r: object.radius.max(0.0) * scale,
        }
    }

    /// Half-width of the shape's horizontal span at height `y` (negative where it has none).
    fn half_width(&self, y: f32) -> f32 {
        let (dy, r) = (y - self.cy, self.r);
        match self.shape {
            Shape::Circle => {
                let h2 = r * r - dy * dy;
                if h2 > 0.0 {
                    h2.sqrt()
                } else {
                    -1.0
                }
            }
            Shape::Square => {
                if dy.abs() <= 0.9 * r {
                    0.9 * r
                } else {
                    -1.0
                }
            }
            // Apex (0, -r), base corners (+-r, 0.75 r): the width grows linearly downwards.
            Shape::Triangle => {
                if dy >= -r && dy <= 0.75 * r {
                    (dy + r) / 1.75
                } else {
                    -1.0
                }
            }
        }
    }

    /// Calls `paint(x, y, coverage)` for every pixel the shape touches. Coverage is exact
    /// horizontally and averaged over [`SUBROWS`] evenly spaced sub-rows vertically.
    fn fill(&self, size: usize, mut paint: impl FnMut(usize, usize, f32)) {
        let top = (self.cy - self.r).floor().max(0.0) as usize;
        let bottom = ((self.cy + self.r).ceil().max(0.0) as usize).min(size);
        let mut spans = [(0.0f32, 0.0f32); SUBROWS];
        for y in top..bottom {
            let (mut left, mut right) = (f32::INFINITY, f32::NEG_INFINITY);
            for (k, span) in spans.iter_mut().enumerate() {
                let h = self.half_width(y as f32 + (k as f32 + 0.5) / SUBROWS as f32);
                *span = (self.cx - h, self.cx + h);
                if h >= 0.0 {
                    left = left.min(span.0);
                    right = right.max(span.1);
                }
            }
            if left > right {
                continue;
            }
            let x_lo = left.floor().max(0.0) as usize;
            let x_hi = (right.ceil().max(0.0) as usize).min(size);
            for x in x_lo..x_hi {
                let (x0, x1) = (x as f32, x as f32 + 1.0);
                let mut covered = 0.0;
                for &(lo, hi) in &spans {
                    covered += (hi.min(x1) - lo.max(x0)).max(0.0);
                }
                if covered > 0.0 {
                    paint(x, y, covered / SUBROWS as f32);
                }
            }
        }
    }
}

/// Output `index` of the SplitMix64 stream seeded with `seed` (Steele et al. 2014).
fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform grain sample in [-1, 1) for one pixel channel.
fn grain(seed: u64, index: usize) -> f32 {
    (splitmix64(seed, index as u64) >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0
}

/// Composites `colour` over the pixel at `at` (an index into the HWC float buffer).
fn blend(pixels: &mut [f32], at: usize, colour: [f32; 3], coverage: f32) {
    for c in 0..3 {
        pixels[at + c] += (colour[c] - pixels[at + c]) * coverage;
    }
}

/// Renders a scene at [`IMAGE_SIZE`] x [`IMAGE_SIZE`]. Out-of-range style values in a
/// hand-made scene are clamped rather than rejected.
// Plain index loops: the crate builds at opt-level 0, where iterator adaptors cost several
// times more than the arithmetic.
pub fn render(scene: &Scene) -> RgbImage {
    let n = IMAGE_SIZE;
    let scale = n as f32;
    let style = &scene.style;
    let texture = style.texture.clamp(0.0, 1.0) * TEXTURE_AMPLITUDE;
    let bg = scene.background.rgb();
    // The weave adds (1, 0, -1, 0) * texture for (x - y) mod 4 = 0, 1, 2, 3.
    let phases = [1.0, 0.0, -1.0, 0.0].map(|w: f32| bg.map(|c| c + texture * w));
    let mut pixels = vec![0.0f32; 3 * n * n];
    for y in 0..n {
        for x in 0..n {
            let colour = phases[(x + 4 * n - y) % 4];
            let at = 3 * (y * n + x);
            pixels[at] = colour[0];
            pixels[at + 1] = colour[1];
            pixels[at + 2] = colour[2];
        }
    }

    for speck in &scene.specks {
        let dot = Primitive {
            shape: Shape::Circle,
            cx: speck.centre[0] * scale,
            cy: speck.centre[1] * scale,
            r: speck.radius.max(0.0) * scale,
        };
        dot.fill(n, |x, y, coverage| {
            blend(&mut pixels, 3 * (y * n + x), speck.rgb, coverage)
        });
    }

    let shading = style.shading.clamp(0.0, 1.0) * SHADING_AMPLITUDE;
    for object in &scene.objects {
        let shape = Primitive::of(object, scale);
        let base = object_rgb(object.colour, style.saturation);
        let inv_extent = 1.0 / (2.0 * shape.r).max(1e-6);
        shape.fill(n, |x, y, coverage| {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let g = ((shape.cx - px) + (shape.cy - py)) * inv_extent;
            let light = 1.0 + shading * g.clamp(-1.0, 1.0);
            let lit = [base[0] * light, base[1] * light, base[2] * light];
            blend(&mut pixels, 3 * (y * n + x), lit, coverage);
        });
    }

    let contrast = style.contrast;
    let noise = style.noise.max(0.0);
    let mut data = vec![0u8; 3 * n * n];
    for (i, byte) in data.iter_mut().enumerate() {
        let mut v = 0.5 + contrast * (pixels[i] - 0.5);
        if noise > 0.0 {
            v += noise * grain(scene.noise_seed, i);
        }
        // The saturating cast clamps to [0, 255] (and maps NaN to 0); +0.5 rounds.
        *byte = (v * 255.0 + 0.5) as u8;
    }
    RgbImage {
        width: n,
        height: n,
        data,
    }
}

/// Stacks images of one size into an NCHW f32 batch in [0, 1].
pub fn to_chw_batch(images: &[RgbImage]) -> Result<ChwBatch, TinyError> {
    let first = images
        .first()
        .ok_or_else(|| TinyError::Image("empty batch".to_string()))?;
    let (w, h) = (first.width, first.height);
    let plane = w * h;
    let mut data = vec![0.0f32; images.len() * 3 * plane];
    for (k, image) in images.iter().enumerate() {
        if (image.width, image.height) != (w, h) || image.data.len() != 3 * plane {
            return Err(TinyError::Image(format!(
                "batch mixes {w}x{h} with a {}x{} image of {} bytes",
                image.width,
                image.height,
                image.data.len()
            )));
        }
        let out = &mut data[k * 3 * plane..(k + 1) * 3 * plane];
        let (red, rest) = out.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        for (i, rgb) in image.data.chunks_exact(3).enumerate() {
            red[i] = f32::from(rgb[0]) / 255.0;
            green[i] = f32::from(rgb[1]) / 255.0;
            blue[i] = f32::from(rgb[2]) / 255.0;
        }
    }
    Ok(ChwBatch {
        shape: [images.len(), 3, h, w],
        data,
    })
}

/// Encodes an image as PNG bytes (zlib "balanced", close to Pillow's default level 6).
fn encode_png(image: &RgbImage) -> Result<Vec<u8>, TinyError> {
    let mut bytes = Vec::new();
    let (w, h) = dims(image)?;
    let mut encoder = png::Encoder::new(&mut bytes, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.data)?;
    writer.finish()?;
    Ok(bytes)
}

fn dims(image: &RgbImage) -> Result<(u32, u32), TinyError> {
    let too_big = || TinyError::Image(format!("{}x{} is too large", image.width, image.height));
    let w = u32::try_from(image.width).map_err(|_| too_big())?;
    let h = u32::try_from(image.height).map_err(|_| too_big())?;
    if image.data.len() != 3 * image.width * image.height {
        return Err(TinyError::Image(format!(
            "{}x{} image holds {} bytes",
            image.width,
            image.height,
            image.data.len()
        )));
    }
    Ok((w, h))
}

/// Tiles images (all of one size) into a grid, `columns` wide, each pixel magnified `zoom`
/// times, with 2-pixel grey gutters, for looking at.
fn grid(images: &[RgbImage], columns: usize, zoom: usize) -> Result<RgbImage, TinyError> {
    let first = images
        .first()
        .ok_or_else(|| TinyError::Image("empty grid".to_string()))?;
    let (columns, zoom) = (columns.max(1), zoom.max(1));
    let rows = images.len().div_ceil(columns);
    let gutter = 2;
    let (cell_w, cell_h) = (first.width * zoom + gutter, first.height * zoom + gutter);
    let (width, height) = (columns * cell_w + gutter, rows * cell_h + gutter);
    let mut data = vec![128u8; 3 * width * height];
    for (k, image) in images.iter().enumerate() {
        dims(image)?;
        if (image.width, image.height) != (first.width, first.height) {
            return Err(TinyError::Image("grid images differ in size".to_string()));
        }
        let (ox, oy) = (
            gutter + (k % columns) * cell_w,
            gutter + (k / columns) * cell_h,
        );
        for y in 0..image.height * zoom {
            for x in 0..image.width * zoom {
                let src = image.pixel(x / zoom, y / zoom);
                let at = 3 * ((oy + y) * width + ox + x);
                data[at..at + 3].copy_from_slice(&src);
            }
        }
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// Writes the images to a PNG file as a grid, `columns` wide, each pixel magnified `zoom`
/// times, with 2-pixel grey gutters, for looking at.
pub fn write_png_grid(
    path: &Path,
    images: &[RgbImage],
    columns: usize,
    zoom: usize,
) -> Result<(), TinyError> {
    let sheet = grid(images, columns, zoom)?;
    let bytes = encode_png(&sheet)?;
    let mut file = BufWriter::new(File::create(path)?);
    std::io::Write::write_all(&mut file, &bytes)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::caption::{Background, CaptionSpec, Colour};
    use crate::tiny::scene::{random_caption_spec, sample_scene_for, Style};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn flat_scene(shape: Shape) -> Scene {
        Scene {
            background: Background::Black,
            objects: vec![SceneObject {
                shape,
                colour: Colour::Yellow,
                centre: [0.5, 0.5],
                radius: 0.3,
            }],
            specks: vec![],
            style: Style {
                saturation: 1.0,
                contrast: 1.0,
                shading: 0.0,
                texture: 0.0,
                noise: 0.0,
            },
            noise_seed: 0,
        }
    }

    #[test]
    fn same_scene_same_bytes() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..50 {
            let spec = random_caption_spec(&mut rng);
            let seed = rng.random_range(0..u64::MAX);
            let a = render(&sample_scene_for(
                &spec,
                &mut ChaCha8Rng::seed_from_u64(seed),
            ));
            let b = render(&sample_scene_for(
                &spec,
                &mut ChaCha8Rng::seed_from_u64(seed),
            ));
            assert_eq!(a, b);
            assert_eq!(a.data.len(), 3 * IMAGE_SIZE * IMAGE_SIZE);
        }
    }

    use rand::Rng;

    #[test]
    fn edges_are_anti_aliased() {
        for shape in Shape::ALL {
            let image = render(&flat_scene(shape));
            let bg = image.pixel(0, 0);
            let fill = image.pixel(16, 16);
            assert_ne!(bg, fill);
            // Green channel: background 23, yellow fill 230.
            let greens: Vec<u8> = image.data.iter().skip(1).step_by(3).copied().collect();
            let partial = greens
                .iter()
                .filter(|&&g| g > bg[1] + 10 && g < fill[1] - 10)
                .count();
            let full = greens.iter().filter(|&&g| g == fill[1]).count();
            assert!(
                partial >= 20,
                "{shape:?}: only {partial} intermediate edge pixels"
            );
            assert!(
                full > partial,
                "{shape:?}: {full} fill pixels vs {partial} edge pixels"
            );
        }
    }

    #[test]
    fn coverage_matches_shape_area() {
        // Summed coverage approximates the analytic area (radius 0.3 of 32 px = 9.6 px); with
        // exact horizontal coverage and 4 sub-rows an edge is misplaced by at most 1/8 px, so
        // the error is within perimeter / 8.
        let r = 9.6_f32;
        let pi = std::f32::consts::PI;
        for (shape, area, perimeter) in [
            (Shape::Circle, pi * r * r, 2.0 * pi * r),
            (Shape::Square, 3.24 * r * r, 7.2 * r),
            (Shape::Triangle, 1.75 * r * r, (2.0 + 2.0 * 2.0156) * r),
        ] {
            let p = Primitive {
                shape,
                cx: 16.0,
                cy: 16.0,
                r,
            };
            let mut total = 0.0;
            p.fill(32, |_, _, coverage| total += coverage);
            assert!(
                (total - area).abs() <= perimeter / 8.0,
                "{shape:?}: {total} vs {area}"
            );
        }
    }

    #[test]
    fn style_parameters_change_the_render() {
        let base = flat_scene(Shape::Circle);
        let plain = render(&base);
        let with = |f: &dyn Fn(&mut Scene)| {
            let mut s = base.clone();
            f(&mut s);
            render(&s)
        };
        let noisy = with(&|s| s.style.noise = 0.05);
        let textured = with(&|s| s.style.texture = 1.0);
        let shaded = with(&|s| s.style.shading = 1.0);
        let flat = with(&|s| s.style.contrast = 0.6);
        let pale = with(&|s| s.style.saturation = 0.6);
        for other in [&noisy, &textured, &shaded, &flat, &pale] {
            assert_ne!(&plain, other);
        }
        // Shading lights the top-left of the object and darkens its bottom-right.
        assert!(shaded.pixel(12, 12)[0] > plain.pixel(12, 12)[0]);
        assert!(shaded.pixel(20, 20)[0] < plain.pixel(20, 20)[0]);
        // Lower contrast pulls the black background toward grey.
        assert!(flat.pixel(0, 0)[0] > plain.pixel(0, 0)[0]);
    }

    #[test]
    fn batch_is_chw_in_unit_range() {
        let spec: CaptionSpec = "a large red square in the centre on a blue background"
            .parse()
            .unwrap();
        let images: Vec<RgbImage> = (0..3)
            .map(|s| render(&sample_scene_for(&spec, &mut ChaCha8Rng::seed_from_u64(s))))
            .collect();
        let batch = to_chw_batch(&images).unwrap();
        assert_eq!(batch.shape, [3, 3, 32, 32]);
        assert_eq!(batch.data.len(), 3 * 3 * 32 * 32);
        let (n, c, y, x) = (2, 1, 5, 7);
        let value = batch.data[((n * 3 + c) * 32 + y) * 32 + x];
        assert_eq!(value, f32::from(images[n].pixel(x, y)[c]) / 255.0);
        assert!(batch.data.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(to_chw_batch(&[]).is_err());
        let odd = RgbImage {
            width: 2,
            height: 2,
            data: vec![0; 12],
        };
        assert!(to_chw_batch(&[images[0].clone(), odd]).is_err());
    }

    #[test]
    fn png_grid_decodes_to_the_tiles() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let images: Vec<RgbImage> = (0..5)
            .map(|_| {
                let spec = random_caption_spec(&mut rng);
                render(&sample_scene_for(&spec, &mut rng))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        write_png_grid(&path, &images, 3, 2).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3 * 66 + 2, 2 * 66 + 2));
        // Tile 4 (row 1, column 1), source pixel (10, 3), magnified pixel (21, 7).
        let (x, y) = (2 + 66 + 21, 2 + 66 + 7);
        let at = 3 * (y * info.width as usize + x);
        assert_eq!(buf[at..at + 3], images[4].pixel(10, 3));
    }
}

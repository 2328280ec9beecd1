//! PNG and JPEG file sizes of uint8 images, from real encoders that match Pillow.
//!
//! The paper's "PNG kB" and "JPEG kB" columns are Pillow file sizes, so the encoders follow
//! Pillow 13's settings (PNG files come out byte-identical, JPEG sizes within about 0.5%):
//! - PNG (`Image.save(format="PNG")`): Pillow's own per-row filter choice (`ZipEncode.c`: None,
//!   Up, Sub, Paeth in that order, the smallest sum of |signed byte| wins, ties keep the earlier;
//!   Average only with `optimize`), deflated with zlib level 6, strategy `Z_FILTERED`, window 15,
//!   memLevel 9, one scanline per `deflate` call, as Pillow configures it. Pillow's wheels use
//!   the system's classic zlib (manylinux wheels do not bundle it), which
//!   [`super::zlib_deflate`] reproduces byte for byte; a system whose libz is zlib-ng would give
//!   Pillow different sizes. IDAT chunks are cut every 64 KiB like Pillow's encoder buffer.
//! - JPEG (`save(format="JPEG", quality=q)`): baseline, Annex K tables scaled by libjpeg's
//!   quality formula, standard Huffman tables, 4:2:0 chroma from a 2x2 box average, JFIF header,
//!   from the `jpeg-encoder` crate (its integer DCT and colour conversion round a little
//!   differently from libjpeg-turbo's, hence the small size differences).
//!
//! Sizes are reported in kB of 1000 bytes, as DDPO / AlignProp compute them.
use tch::{Kind, Tensor};

use super::zlib_deflate::{zlib_level6, Strategy};

/// JPEG quality of the paper's "JPEG kB" metric.
pub const DEFAULT_JPEG_QUALITY: u8 = 80;

/// Pillow's encoder buffer (`ImageFile.MAXBLOCK`): each buffer-full becomes one IDAT chunk.
const PILLOW_MAXBLOCK: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum ImageCodecError {
    #[error("expected an image batch of shape [B, 3, H, W], got {0:?}")]
    BatchShape(Vec<i64>),
    #[error("an RGB image of {width}x{height} needs {expected} bytes, got {got}")]
    BufferSize {
        width: u32,
        height: u32,
        expected: usize,
        got: usize,
    },
    #[error("image dimensions must be positive, got {width}x{height}")]
    EmptyImage { width: u32, height: u32 },
    #[error("JPEG supports at most 65535x65535 pixels, got {width}x{height}")]
    JpegTooLarge { width: u32, height: u32 },
    #[error("JPEG quality must be in 1..=100, got {0}")]
    JpegQuality(u8),
    #[error("PNG encoding failed: {0}")]
    Png(#[from] png::EncodingError),
    #[error("JPEG encoding failed: {0}")]
    Jpeg(#[from] jpeg_encoder::EncodingError),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC), as Pillow's mode "RGB".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self, ImageCodecError> {
        if width == 0 || height == 0 {
            return Err(ImageCodecError::EmptyImage { width, height });
        }
        let expected = width as usize * height as usize * 3;
        if data.len() != expected {
            return Err(ImageCodecError::BufferSize {
                width,
                height,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels, HWC interleaved.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Float images [B, 3, H, W] in [0, 1] to uint8 images as diffusers' `numpy_to_pil` makes them:
/// float32, `(x * 255).round()` (half to even), clamped to [0, 255].
pub fn to_uint8_images(images: &Tensor) -> Result<Vec<RgbImage>, ImageCodecError> {
    let size = images.size();
    let &[batch, 3, height, width] = size.as_slice() else {
        return Err(ImageCodecError::BatchShape(size));
    };
    let hwc = tch::no_grad(|| {
        (images
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .permute([0, 2, 3, 1])
            .contiguous()
    });
    let (width, height) = (width as u32, height as u32);
    (0..batch)
        .map(|i| {
            let data = Vec::<u8>::try_from(hwc.get(i).flatten(0, -1))?;
            RgbImage::new(width, height, data)
        })
        .collect()
}

/// The signed-byte cost Pillow (after libpng) minimises when choosing a row filter.
fn filter_cost(row: &[u8]) -> u64 {
    row.iter()
        .map(|&v| if v < 128 { v as u64 } else { 256 - v as u64 })
        .sum()
}

fn paeth_predictor(a: u8, b: u8, c: u8) -> u8 {
    let (a16, b16, c16) = (a as i16, b as i16, c as i16);
    let pa = (b16 - c16).abs();
    let pb = (a16 - c16).abs();
    let pc = (a16 + b16 - 2 * c16).abs();
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

/// The filtered scanlines (filter type byte + filtered row) with Pillow's filter choice.
fn pillow_filtered_scanlines(image: &RgbImage) -> Vec<u8> {
    const BPP: usize = 3;
    let stride = image.width as usize * BPP;
    let zeros = vec![0u8; stride];
    let mut out = Vec::with_capacity((stride + 1) * image.height as usize);
    let (mut up, mut sub, mut paeth) = (vec![0u8; stride], vec![0u8; stride], vec![0u8; stride]);
    for (y, row) in image.data.chunks_exact(stride).enumerate() {
        let prev = if y == 0 {
            &zeros[..]
        } else {
            &image.data[(y - 1) * stride..y * stride]
        };
        let mut best: (u8, &[u8]) = (0, row);
        let mut best_cost = filter_cost(row);
        if best_cost > 0 {
            for i in 0..stride {
                up[i] = row[i].wrapping_sub(prev[i]);
            }
            let cost = filter_cost(&up);
            if cost < best_cost {
                (best, best_cost) = ((2, &up[..]), cost);
            }
        }
        if best_cost > 0 {
            for i in 0..stride {
                let left = if i >= BPP { row[i - BPP] } else { 0 };
                sub[i] = row[i].wrapping_sub(left);
            }
            let cost = filter_cost(&sub);
            if cost < best_cost {
                (best, best_cost) = ((1, &sub[..]), cost);
            }
        }
        if best_cost > 0 {
            for i in 0..stride {
                let (left, up_left) = if i >= BPP {
                    (row[i - BPP], prev[i - BPP])
                } else {
                    (0, 0)
                };
                paeth[i] = row[i].wrapping_sub(paeth_predictor(left, prev[i], up_left));
            }
            if filter_cost(&paeth) < best_cost {
                best = (4, &paeth[..]);
            }
        }
        out.push(best.0);
        out.extend_from_slice(best.1);
    }
    out
}

/// The PNG file Pillow's `save(format="PNG")` writes for this image (8-bit RGB, no extra chunks).
pub fn png_bytes(image: &RgbImage) -> Result<Vec<u8>, ImageCodecError> {
    let row_bytes = image.width as usize * 3 + 1;
    let compressed = zlib_level6(
        &pillow_filtered_scanlines(image),
        row_bytes,
        Strategy::Filtered,
    );
    let mut file = Vec::with_capacity(compressed.len() + 64);
    let mut encoder = png::Encoder::new(&mut file, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    for chunk in compressed.chunks(PILLOW_MAXBLOCK.max(image.width as usize * 4)) {
        writer.write_chunk(png::chunk::IDAT, chunk)?;
    }
    writer.finish()?;
    Ok(file)
}

/// A baseline JPEG as Pillow / libjpeg-turbo write it at `quality` (4:2:0, standard tables).
pub fn jpeg_bytes(image: &RgbImage, quality: u8) -> Result<Vec<u8>, ImageCodecError> {
    if !(1..=100).contains(&quality) {
        return Err(ImageCodecError::JpegQuality(quality));
    }
    let (Ok(width), Ok(height)) = (u16::try_from(image.width), u16::try_from(image.height)) else {
        return Err(ImageCodecError::JpegTooLarge {
            width: image.width,
            height: image.height,
        });
    };
    let mut file = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut file, quality);
    // Pillow keeps 4:2:0 at every quality (the crate would switch to 4:4:4 from 90 on) and
    // libjpeg averages each 2x2 block (the crate's default takes the top-left pixel).
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    encoder.set_chroma_subsampling_method(jpeg_encoder::ChromaSubsamplingMethod::Average);
    encoder.set_optimized_huffman_tables(false);
    encoder.set_progressive(false);
    encoder.encode(&image.data, width, height, jpeg_encoder::ColorType::Rgb)?;
    Ok(file)
}

/// PNG file size in bytes (see [`png_bytes`]).
pub fn png_size(image: &RgbImage) -> Result<usize, ImageCodecError> {
    Ok(png_bytes(image)?.len())
}

/// JPEG file size in bytes (see [`jpeg_bytes`]).
pub fn jpeg_size(image: &RgbImage, quality: u8) -> Result<usize, ImageCodecError> {
    Ok(jpeg_bytes(image, quality)?.len())
}

fn mean_kb(
    sizes: impl ExactSizeIterator<Item = Result<usize, ImageCodecError>>,
) -> Result<f64, ImageCodecError> {
    let n = sizes.len();
    let mut total = 0usize;
    for size in sizes {
        total += size?;
    }
    Ok(if n == 0 {
        0.0
    } else {
        total as f64 / n as f64 / 1000.0
    })
}

/// The "PNG kB" metric: mean PNG size in kB (1000 bytes); 0 for no images.
pub fn mean_png_kb(images: &[RgbImage]) -> Result<f64, ImageCodecError> {
    mean_kb(images.iter().map(png_size))
}

/// The "JPEG kB" metric: mean JPEG size in kB (1000 bytes) at `quality`; 0 for no images.
pub fn mean_jpeg_kb(images: &[RgbImage], quality: u8) -> Result<f64, ImageCodecError> {
    mean_kb(images.iter().map(|image| jpeg_size(image, quality)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> RgbImage {
        let data = (0..height)
            .flat_map(|y| {
                (0..width).flat_map(move |x| [(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
            })
            .collect();
        RgbImage::new(width, height, data).unwrap()
    }

    fn unfilter(filtered: &[u8], width: usize, height: usize) -> Vec<u8> {
        let stride = width * 3;
        let mut out = vec![0u8; stride * height];
        for y in 0..height {
            let line = &filtered[y * (stride + 1)..(y + 1) * (stride + 1)];
            for i in 0..stride {
                let a = if i >= 3 { out[y * stride + i - 3] } else { 0 };
                let b = if y > 0 { out[(y - 1) * stride + i] } else { 0 };
                let c = if y > 0 && i >= 3 {
                    out[(y - 1) * stride + i - 3]
                } else {
                    0
                };
                let pred = match line[0] {
                    0 => 0,
                    1 => a,
                    2 => b,
                    4 => paeth_predictor(a, b, c),
                    other => panic!("unexpected filter {other}"),
                };
                out[y * stride + i] = line[1 + i].wrapping_add(pred);
            }
        }
        out
    }

    #[test]
    fn filtered_scanlines_invert() {
        let image = gradient(13, 9);
        let filtered = pillow_filtered_scanlines(&image);
        assert_eq!(filtered.len(), 9 * (13 * 3 + 1));
        assert_eq!(unfilter(&filtered, 13, 9), image.data());
    }

    #[test]
    fn png_round_trips_through_a_decoder() {
        let image = gradient(40, 33);
        let bytes = png_bytes(&image).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (40, 33));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], image.data());
    }

    #[test]
    fn jpeg_has_markers_and_rejects_bad_quality() {
        let image = gradient(24, 16);
        let bytes = jpeg_bytes(&image, DEFAULT_JPEG_QUALITY).unwrap();
        assert_eq!(&bytes[..2], &[0xFF, 0xD8]);
        assert_eq!(&bytes[bytes.len() - 2..], &[0xFF, 0xD9]);
        assert!(matches!(
            jpeg_bytes(&image, 0),
            Err(ImageCodecError::JpegQuality(0))
        ));
        assert!(matches!(
            jpeg_bytes(&image, 101),
            Err(ImageCodecError::JpegQuality(101))
        ));
    }

    #[test]
    fn rgb_image_checks_its_buffer() {
        assert!(matches!(
            RgbImage::new(2, 2, vec![0; 11]),
            Err(ImageCodecError::BufferSize { .. })
        ));
        assert!(matches!(
            RgbImage::new(0, 2, vec![]),
            Err(ImageCodecError::EmptyImage { .. })
        ));
    }

    #[test]
    fn to_uint8_rounds_and_clamps() {
        // x * 255 is exact in f32 for these values, so the expected bytes are unambiguous.
        let x = Tensor::from_slice(&[-0.2f32, 0.25, 0.125, 0.5, 1.0, 1.3]).reshape([1, 3, 1, 2]);
        let images = to_uint8_images(&x).unwrap();
        assert_eq!(images.len(), 1);
        // HWC: pixel 0 = channels (x[0], x[2], x[4]), pixel 1 = (x[1], x[3], x[5]).
        assert_eq!(images[0].data(), &[0, 32, 255, 64, 128, 255]);
        assert!(matches!(
            to_uint8_images(&Tensor::zeros([2, 4, 4], (Kind::Float, tch::Device::Cpu))),
            Err(ImageCodecError::BatchShape(_))
        ));
    }

    #[test]
    fn flat_images_compress_better_than_noise() {
        let flat = RgbImage::new(64, 64, vec![90; 64 * 64 * 3]).unwrap();
        let mut state = 12345u32;
        let noise: Vec<u8> = (0..64 * 64 * 3)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 23) as u8
            })
            .collect();
        let noise = RgbImage::new(64, 64, noise).unwrap();
        assert!(png_size(&flat).unwrap() * 10 < png_size(&noise).unwrap());
        assert!(jpeg_size(&flat, 80).unwrap() * 2 < jpeg_size(&noise, 80).unwrap());
    }

    #[test]
    fn mean_sizes_are_in_kilobytes() {
        let images = [gradient(32, 32), gradient(48, 16)];
        let png_total = png_size(&images[0]).unwrap() + png_size(&images[1]).unwrap();
        assert_eq!(mean_png_kb(&images).unwrap(), png_total as f64 / 2000.0);
        let jpeg_total = jpeg_size(&images[0], 80).unwrap() + jpeg_size(&images[1], 80).unwrap();
        assert_eq!(
            mean_jpeg_kb(&images, 80).unwrap(),
            jpeg_total as f64 / 2000.0
        );
        assert_eq!(mean_png_kb(&[]).unwrap(), 0.0);
    }
}

//! Differentiable JPEG (Shin & Song 2017).
//!
//! `C(x)`: RGB -> YCbCr (JPEG full-range constants), 4:2:0 chroma by 2x2 averages, 8x8 block
//! DCT (orthonormal, the JPEG DCT), quantisation by the Annex K luminance / chrominance tables
//! scaled by `factor(q) = (5000/q if q < 50 else 200 - 2q) / 100`, the differentiable rounding
//! `round(u) + (u - round(u))^3`, dequantisation, inverse DCT, nearest-neighbour chroma
//! upsampling, YCbCr -> RGB, clamped to [0, 255]. Images are [B, 3, H, W] in [0, 1], H and W
//! multiples of 16 (one 4:2:0 macroblock), in f32 or f64; the output has the input's shape and
//! kind and is differentiable with respect to the input.
//!
//! One deviation from the bare formula: a scaled quantiser step below 1 is raised to 1, as
//! libjpeg clamps its tables. This only matters above quality 95 (the smallest table entry is
//! 10) and keeps quality 100 (factor 0) from dividing by zero.
use tch::{Kind, Tensor};

use super::RewardError;

/// JPEG quality of the compressibility reward (the paper's "JPEG kB" metric uses 80 too).
pub const DEFAULT_QUALITY: u8 = 80;

/// ITU-T T.81 Annex K.1, row-major (row = vertical frequency).
const LUMA_TABLE: [f64; 64] = [
    16., 11., 10., 16., 24., 40., 51., 61., 12., 12., 14., 19., 26., 58., 60., 55., 14., 13., 16.,
    24., 40., 57., 69., 56., 14., 17., 22., 29., 51., 87., 80., 62., 18., 22., 37., 56., 68., 109.,
    103., 77., 24., 35., 55., 64., 81., 104., 113., 92., 49., 64., 78., 87., 103., 121., 120.,
    101., 72., 92., 95., 98., 112., 100., 103., 99.,
];
/// ITU-T T.81 Annex K.2.
const CHROMA_TABLE: [f64; 64] = [
    17., 18., 24., 47., 99., 99., 99., 99., 18., 21., 26., 66., 99., 99., 99., 99., 24., 26., 56.,
    99., 99., 99., 99., 99., 47., 66., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99.,
    99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99., 99.,
    99., 99., 99., 99., 99., 99., 99.,
];

/// RGB -> YCbCr rows (JFIF full range); Cb and Cr are offset by 128 afterwards.
const RGB_TO_YCBCR: [f64; 9] = [
    0.299, 0.587, 0.114, -0.168736, -0.331264, 0.5, 0.5, -0.418688, -0.081312,
];
/// YCbCr (Cb, Cr centred) -> RGB rows.
const YCBCR_TO_RGB: [f64; 9] = [1.0, 0.0, 1.402, 1.0, -0.344136, -0.714136, 1.0, 1.772, 0.0];

/// The quality scaling of the quantisation tables, `factor(q)`.
pub fn quality_factor(quality: u8) -> f64 {
    let q = quality as f64;
    (if quality < 50 {
        5000.0 / q
    } else {
        200.0 - 2.0 * q
    }) / 100.0
}

/// The 8x8 orthonormal DCT-II matrix `D[k, n] = c(k) cos((2n + 1) k pi / 16)`.
fn dct_matrix() -> [f64; 64] {
    let mut d = [0.0; 64];
    for k in 0..8 {
        let c = if k == 0 { (1.0f64 / 8.0).sqrt() } else { 0.5 };
        for n in 0..8 {
            d[k * 8 + n] = c * ((2 * n + 1) as f64 * k as f64 * std::f64::consts::PI / 16.0).cos();
        }
    }
    d
}

/// The differentiable JPEG round trip at one quality.
#[derive(Debug)]
pub struct DiffJpeg {
    quality: u8,
    luma_steps: [f64; 64],
    chroma_steps: [f64; 64],
}

impl DiffJpeg {
    pub fn new(quality: u8) -> Result<Self, RewardError> {
        if !(1..=100).contains(&quality) {
            return Err(RewardError::JpegQuality(quality));
        }
        Ok(Self::with_valid_quality(quality))
    }

    fn with_valid_quality(quality: u8) -> Self {
        let factor = quality_factor(quality);
        let steps = |table: &[f64; 64]| table.map(|t| (t * factor).max(1.0));
        Self {
            quality,
            luma_steps: steps(&LUMA_TABLE),
            chroma_steps: steps(&CHROMA_TABLE),
        }
    }

    pub fn quality(&self) -> u8 {
        self.quality
    }

    /// `C(x)` for images [B, 3, H, W] in [0, 1] (f32 or f64), H and W multiples of 16.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor, RewardError> {
        let (batch, height, width) = super::check_images(images)?;
        if height % 16 != 0 || width % 16 != 0 {
            return Err(RewardError::ImageSize {
                multiple: 16,
                height,
                width,
            });
        }
        let kind = match images.kind() {
            Kind::Double => Kind::Double,
            _ => Kind::Float,
        };
        let device = images.device();
        let constant = |values: &[f64], shape: &[i64]| -> Result<Tensor, RewardError> {
            Ok(Tensor::from_slice(values)
                .f_to_kind(kind)?
                .f_to_device(device)?
                .f_reshape(shape)?)
        };
        let to_ycbcr = constant(&RGB_TO_YCBCR, &[3, 3])?;
        let to_rgb = constant(&YCBCR_TO_RGB, &[3, 3])?;
        let chroma_offset = constant(&[0.0, 128.0, 128.0], &[1, 3, 1])?;
        let dct = constant(&dct_matrix(), &[8, 8])?;
        let luma_steps = constant(&self.luma_steps, &[8, 8])?;
        let chroma_steps = constant(&self.chroma_steps, &[8, 8])?;

        let rgb =
            images
                .f_to_kind(kind)?
                .f_mul_scalar(255.0)?
                .f_reshape([batch, 3, height * width])?;
        let ycbcr = to_ycbcr
            .f_matmul(&rgb)?
            .f_add(&chroma_offset)?
            .f_reshape([batch, 3, height, width])?;
        let luma = ycbcr.f_narrow(1, 0, 1)?;
        let chroma = ycbcr.f_narrow(1, 1, 2)?.f_avg_pool2d(
            [2, 2],
            [2, 2],
            [0, 0],
            false,
            true,
            None::<i64>,
        )?;

        let luma = lossy_blocks(&luma, &dct, &luma_steps)?;
        let chroma = lossy_blocks(&chroma, &dct, &chroma_steps)?;
        let (h2, w2) = (height / 2, width / 2);
        let chroma = chroma
            .f_reshape([batch, 2, h2, 1, w2, 1])?
            .f_expand([batch, 2, h2, 2, w2, 2], false)?
            .f_reshape([batch, 2, height, width])?;

        let centred = Tensor::f_cat(&[luma, chroma], 1)?
            .f_reshape([batch, 3, height * width])?
            .f_sub(&chroma_offset)?;
        let rgb = to_rgb
            .f_matmul(&centred)?
            .f_reshape([batch, 3, height, width])?;
        Ok(rgb.f_clamp(0.0, 255.0)?.f_div_scalar(255.0)?)
    }
}

impl Default for DiffJpeg {
    fn default() -> Self {
        Self::with_valid_quality(DEFAULT_QUALITY)
    }
}

/// DCT, quantise with the differentiable rounding, dequantise and invert, block by block, for
/// planes [B, C, h, w] (h, w multiples of 8) in the 0..255 range.
fn lossy_blocks(planes: &Tensor, dct: &Tensor, steps: &Tensor) -> Result<Tensor, RewardError> {
    let size = planes.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    let blocks = planes
        .f_reshape([b, c, h / 8, 8, w / 8, 8])?
        .f_permute([0, 1, 2, 4, 3, 5])?
        .f_sub_scalar(128.0)?;
    let coefficients = dct.f_matmul(&blocks)?.f_matmul(&dct.f_tr()?)?;
    let scaled = coefficients.f_div(steps)?;
    let rounded = scaled.f_round()?;
    let quantised = rounded.f_add(&scaled.f_sub(&rounded)?.f_pow_tensor_scalar(3)?)?;
    let restored = dct
        .f_tr()?
        .f_matmul(&quantised.f_mul(steps)?)?
        .f_matmul(dct)?
        .f_add_scalar(128.0)?;
    Ok(restored
        .f_permute([0, 1, 2, 4, 3, 5])?
        .f_reshape([b, c, h, w])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn smooth_images(batch: i64, h: i64, w: i64, kind: Kind) -> Tensor {
        let y = Tensor::linspace(0.0, 1.0, h, (kind, Device::Cpu)).view([1, 1, h, 1]);
        let x = Tensor::linspace(0.0, 1.0, w, (kind, Device::Cpu)).view([1, 1, 1, w]);
        let r = (&y * 0.6 + &x * 0.3 + 0.05).expand([batch, 1, h, w], false);
        let g = (&x * 0.5 + 0.25).expand([batch, 1, h, w], false);
        let b = ((&x + &y) * 0.35 + 0.1).expand([batch, 1, h, w], false);
        Tensor::cat(&[r, g, b], 1)
    }

    #[test]
    fn quality_factor_formula() {
        assert_eq!(quality_factor(50), 1.0);
        assert!((quality_factor(80) - 0.4).abs() < 1e-12);
        assert!((quality_factor(10) - 5.0).abs() < 1e-12);
        assert_eq!(quality_factor(100), 0.0);
        assert_eq!(DiffJpeg::default().quality(), DEFAULT_QUALITY);
        assert_eq!(
            DiffJpeg::default().luma_steps,
            DiffJpeg::new(DEFAULT_QUALITY).unwrap().luma_steps
        );
    }

    #[test]
    fn dct_is_orthonormal() {
        let d = Tensor::from_slice(&dct_matrix()).view([8, 8]);
        let eye = Tensor::eye(8, (Kind::Double, Device::Cpu));
        assert!(d.matmul(&d.tr()).allclose(&eye, 1e-12, 1e-12, false));
    }

    /// Mean and max abs error of C(x) in 1/255 units.
    fn round_trip_error(jpeg: &DiffJpeg, x: &Tensor) -> (f64, f64) {
        let err = (jpeg.forward(x).unwrap() - x).abs() * 255.0;
        (
            err.mean(Kind::Float).double_value(&[]),
            err.max().double_value(&[]),
        )
    }

    #[test]
    fn quality_100_is_nearly_identity() {
        let jpeg = DiffJpeg::new(100).unwrap();
        // Grey images (constant chroma): only the rounding of unit-step coefficients remains.
        let grey = (smooth_images(2, 32, 48, Kind::Float).mean_dim(1, true, Kind::Float)
            + Tensor::rand([2, 1, 32, 48], (Kind::Float, Device::Cpu)) * 0.2)
            .expand([2, 3, 32, 48], false)
            * 0.8;
        let (mean, max) = round_trip_error(&jpeg, &grey);
        println!("quality 100, grey: mean abs {mean:.4}/255, max {max:.4}/255");
        assert!(
            mean < 0.4 && max < 1.5,
            "grey: mean {mean}/255, max {max}/255"
        );
        // Colour gradients also lose what 4:2:0 subsampling drops.
        let (mean, max) = round_trip_error(&jpeg, &smooth_images(2, 32, 48, Kind::Float));
        println!("quality 100, colour: mean abs {mean:.4}/255, max {max:.4}/255");
        assert!(
            mean < 1.5 && max < 4.0,
            "colour: mean {mean}/255, max {max}/255"
        );
    }

    #[test]
    fn lower_quality_loses_more() {
        let noise = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        let err = |q: u8| {
            (DiffJpeg::new(q).unwrap().forward(&noise).unwrap() - &noise)
                .square()
                .mean(Kind::Float)
                .double_value(&[])
        };
        let (e20, e80, e100) = (err(20), err(80), err(100));
        assert!(e20 > e80 && e80 > e100, "{e20} {e80} {e100}");
    }

    #[test]
    fn gradients_are_finite_and_nonzero() {
        let x = (smooth_images(1, 16, 32, Kind::Float) * 0.8
            + Tensor::rand([1, 3, 16, 32], (Kind::Float, Device::Cpu)) * 0.1)
            .set_requires_grad(true);
        let y = DiffJpeg::default().forward(&x).unwrap();
        (&y - &x).square().sum(Kind::Float).backward();
        let grad = x.grad();
        assert!(grad.isfinite().all().int64_value(&[]) == 1);
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn rejects_bad_sizes_and_qualities() {
        let x = Tensor::zeros([1, 3, 24, 32], (Kind::Float, Device::Cpu));
        assert!(matches!(
            DiffJpeg::default().forward(&x),
            Err(RewardError::ImageSize {
                multiple: 16,
                height: 24,
                width: 32
            })
        ));
        let x = Tensor::zeros([1, 1, 16, 16], (Kind::Float, Device::Cpu));
        assert!(matches!(
            DiffJpeg::default().forward(&x),
            Err(RewardError::ImageShape(_))
        ));
        assert!(matches!(DiffJpeg::new(0), Err(RewardError::JpegQuality(0))));
        assert!(matches!(
            DiffJpeg::new(101),
            Err(RewardError::JpegQuality(101))
        ));
    }
}

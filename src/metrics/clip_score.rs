//! CLIP score: 100 * cos(image, text), mean over images, clamped at 0.

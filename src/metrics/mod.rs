//! Evaluation metrics: file sizes from real encoders (a zlib port makes PNGs Pillow-exact), FID, CLIP score.
pub mod clip_score;
pub mod fid;
pub mod filesize;
pub mod image_folder;
pub mod zlib_deflate;

//! Differentiable rewards on decoded images; the same code serves both scales.
pub mod aesthetic;
pub mod clip_loader;
pub mod compressibility;
pub mod diff_jpeg;
pub mod hps;
pub mod mixture;

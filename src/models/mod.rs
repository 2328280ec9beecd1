//! Models of both scales. Paper scale and tiny world are configs of the same modules; weights
//! are looked up under their upstream (diffusers / transformers / open_clip) names.
pub mod weights;

//! Models of both scales. Paper scale and tiny world are configs of the same modules; weights
//! are looked up under their upstream (diffusers / transformers / open_clip) names.
pub mod aesthetic;
pub mod clip;
pub mod component;
pub mod ddim;
pub mod diffusion;
pub mod image_processor;
pub mod inception;
pub mod inspect;
pub mod lora;
pub mod nn;
pub mod pickle;
pub mod precision;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

//! ril-pipe: declarative pipelines for Reward Incremental Learning (RIL) research.
//!
//! Layers, from the bottom up:
//! - [`pipeline`]: YAML spec, matrix expansion, validation, DAG. Knows nothing of tensors.
//! - [`exec`]: content-hashed cache, journal, scheduler; runs any stage through one trait.
//! - [`models`]: UNet, VAE, CLIP, LoRA, DDIM, Inception, aesthetic head, weight loading.
//! - [`rewards`] and [`metrics`]: differentiable rewards and evaluation metrics.
//! - [`tiny`]: the embedded tiny world (procedural scenes, prompts, ratings).
//! - [`records`]: what stages write for each other and the report reads (evaluations, training
//!   logs, forgetting); plain data.
//! - [`method`]: sampling with truncated backprop, baseline and RID objectives, AdamW.
//! - [`stages`]: one file per stage kind, gluing the pipeline to the models.
//! - [`report`]: paper-style tables (polars) and charts (plotters).
pub mod exec;
pub mod method;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod records;
pub mod report;
pub mod rewards;
pub mod stages;
pub mod tiny;

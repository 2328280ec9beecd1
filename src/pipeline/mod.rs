//! The pipeline layer: YAML spec, matrix expansion, validation, DAG. Knows nothing of tensors.
//!
//! Its output is a [`resolved::ResolvedPipeline`]; stage kinds describe their parameters to it
//! through [`schema::KindSchema`].
pub mod resolved;
pub mod schema;

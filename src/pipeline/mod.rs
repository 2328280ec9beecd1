//! The pipeline layer: YAML spec, matrix expansion, validation, DAG. Knows nothing of tensors.
//!
//! [`load`] reads a file, [`expand::resolve`] turns it into a [`resolved::ResolvedPipeline`];
//! stage kinds describe their parameters to it through [`schema::KindSchema`], declared as typed
//! structs with [`params::StageParams`].
pub mod dag;
pub mod error;
pub mod expand;
pub mod glob;
pub mod interp;
pub mod locate;
pub mod params;
pub mod resolved;
pub mod schema;
pub mod spec;

pub use error::{Diagnostic, PipelineError};
pub use expand::{resolve, resolve_with, FileCheck, Override, Schemas};
pub use resolved::{ResolvedPipeline, ResolvedStage};
pub use spec::{load, PipelineSpec};

/// Reads, expands and validates a pipeline file in one step, to run it (every file must exist).
pub fn load_resolved(file: &std::path::Path, schemas: &Schemas, overrides: &[Override]) -> Result<ResolvedPipeline, PipelineError> {
    let spec = load(file)?;
    resolve(&spec, schemas, overrides, &interp::ProcessEnv)
}

/// [`load_resolved`] for planning: missing files are recorded in the stages, not refused.
pub fn load_for_plan(file: &std::path::Path, schemas: &Schemas, overrides: &[Override]) -> Result<ResolvedPipeline, PipelineError> {
    let spec = load(file)?;
    resolve_with(&spec, schemas, overrides, &interp::ProcessEnv, FileCheck::Record)
}

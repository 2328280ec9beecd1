//! Stage kinds, one file per kind: the glue between the pipeline runner and the models.
pub mod device;

use crate::exec::Registry;

/// Every stage kind of the shipped binary.
pub fn registry() -> Registry {
    Registry::new()
}

//! Stage kinds, one file per kind: the glue between the pipeline runner and the models.
pub mod device;
pub mod records;
pub mod forgetting;
pub mod report;

use crate::exec::Registry;

/// Every stage kind of the shipped binary.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(forgetting::Forgetting);
    r.register(report::Report);
    r
}

//! Stage kinds, one file per kind: the glue between the pipeline runner and the models.
pub mod device;
pub mod estimate;
pub mod evaluate;
pub mod fid_stats;
pub mod finetune;
pub mod forgetting;
pub mod joint;
pub mod lora_export;
pub mod memory;
pub mod monitor;
pub mod params;
pub mod report;
pub mod reward_set;
pub mod sample;
pub mod seeds_report;
pub mod soup;
pub mod tiny;
pub mod train;
pub mod world;

use crate::exec::{Registry, StageError};
use crate::models::diffusion::DiffusionError;

/// A diffusion model that cannot be loaded or run fails the stage with the reason.
impl From<DiffusionError> for StageError {
    fn from(e: DiffusionError) -> Self {
        StageError::failed(e)
    }
}

/// Every stage kind of the shipped binary.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(world::TinyWorld);
    r.register(world::Sd15World);
    r.register(finetune::Finetune);
    r.register(joint::Joint);
    r.register(soup::Soup);
    r.register(evaluate::Evaluate);
    r.register(fid_stats::FidStats);
    r.register(forgetting::Forgetting);
    r.register(report::Report);
    r.register(seeds_report::SeedsReport);
    r.register(tiny::Tiny(tiny::prompts::TinyPrompts));
    r.register(tiny::Tiny(tiny::clip::TinyClip));
    r.register(tiny::Tiny(tiny::vae::TinyVae));
    r.register(tiny::Tiny(tiny::aesthetic::TinyAesthetic));
    r.register(tiny::Tiny(tiny::preference::TinyPreference));
    r.register(tiny::Tiny(tiny::unet::TinyUnet));
    r.register(tiny::Tiny(tiny::export::TinyExport));
    r
}

#[cfg(test)]
mod tests {
    use crate::pipeline::expand::check_range;

    #[test]
    fn every_numeric_parameter_has_a_range_that_holds_its_default() {
        let mut numeric = 0;
        for (kind, schema) in super::registry().schemas() {
            for p in &schema.params {
                assert_eq!(p.ty.is_numeric(), p.range.is_some(), "`{kind}.{}`: a numeric parameter has a range, another has none", p.name);
                if let (Some(range), Some(default)) = (&p.range, &p.default) {
                    numeric += 1;
                    check_range(default, range).unwrap_or_else(|e| panic!("`{kind}.{}`: the default {default}: {e}", p.name));
                }
            }
        }
        assert!(numeric > 90, "{numeric} numeric parameters");
    }
}

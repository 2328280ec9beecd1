//! The study pipelines agree: `pipelines/all_orders_seeds.yaml` (`make study`) is
//! `pipelines/all_orders.yaml` (`make demo`, where the recipe is documented) repeated over
//! seeds, so its seed-0 stages are the demo's stages, with the same cache keys (after `make
//! demo` they come from the cache), and its other seeds differ from them only in the seed.
use std::collections::BTreeMap;

use ril_pipe::exec::plan::plan;
use ril_pipe::exec::Cache;
use ril_pipe::pipeline::load_resolved;
use ril_pipe::stages::registry;

use crate::support::repo;

/// Stage id -> (kind, cache key) of a pipeline's plan against an empty cache.
fn keys(file: &str) -> BTreeMap<String, (String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    let pipeline = load_resolved(&repo().join(file), &registry().schemas(), &[]).unwrap();
    let plan = plan(&pipeline, &registry(), &cache, &cache.file_hasher()).unwrap();
    plan.stages.iter().map(|s| (s.stage.id.clone(), (s.stage.kind.clone(), s.key.clone()))).collect()
}

/// The seeds pipeline's id of a demo stage for `seed`: the seed after the first part
/// (`ft/rid/AHC/1` -> `ft/0/rid/AHC/1`, `soup` -> `soup/0`, `eval/soup` -> `eval/0/soup`).
fn with_seed(id: &str, seed: u32) -> String {
    match id.split_once('/') {
        Some((head, rest)) => format!("{head}/{seed}/{rest}"),
        None => format!("{id}/{seed}"),
    }
}

#[test]
fn the_seeds_study_repeats_the_demo_over_seeds() {
    let demo = keys("pipelines/all_orders.yaml");
    let seeds = keys("pipelines/all_orders_seeds.yaml");
    let mut compared = 0;
    for (id, (kind, key)) in &demo {
        if kind == "report" {
            continue;
        }
        if matches!(kind.as_str(), "tiny_world") || id == "eval/base" {
            assert_eq!(seeds.get(id), Some(&(kind.clone(), key.clone())), "{id}: the shared stages");
            continue;
        }
        let zero = seeds.get(&with_seed(id, 0)).unwrap_or_else(|| panic!("{id}: no seed-0 stage {}", with_seed(id, 0)));
        assert_eq!(zero, &(kind.clone(), key.clone()), "{id}: seed 0 must be the demo's stage (same kind, parameters and inputs)");
        for seed in [1, 2] {
            let other = &seeds[&with_seed(id, seed)];
            assert_eq!(other.0, *kind);
            assert_ne!(other.1, *key, "{id}: seed {seed} must train differently");
        }
        compared += 1;
    }
    // 36 fine-tunes, 36 evaluations after tasks, 12 forgetting records, soup, joint and theirs.
    assert!(compared >= 88, "{compared} stages compared");
    assert!(seeds.values().any(|(kind, _)| kind == "seeds_report"));
}

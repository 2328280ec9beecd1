//! Helpers shared by the parity tests.
use std::path::PathBuf;

/// The fixture folder of one area; panics with the command that builds it when absent.
pub fn fixture_dir(area: &str) -> PathBuf {
    let root = std::env::var_os("RIL_FIXTURES")
        .map(PathBuf::from)
        .expect("RIL_FIXTURES is not set: run the tests through `make test` (or `make fixtures` and source scripts/dev-env.sh)");
    let dir = root.join(area);
    assert!(
        dir.join(".stamp").exists(),
        "fixtures for `{area}` missing in {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// The public data the repository carries (`data/README.md`: origins and licences).
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// Max absolute difference between two tensors of the same shape (f64).
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

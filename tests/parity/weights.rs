//! Weight loading: torch.save checkpoints in several forms against safetensors references,
//! the real LAION head in both formats, component folders, and files that must be refused.
use std::path::PathBuf;

use ril_pipe::models::pickle::PickleError;
use ril_pipe::models::weights::{load_weights, read_safetensors, TensorMap, WeightsError};
use tch::Kind;

use crate::support::fixtures;

fn dir() -> PathBuf {
    fixtures("weights")
}

/// Same names, dtypes, shapes and bitwise-equal values.
fn assert_identical(ours: &TensorMap, reference: &TensorMap, what: &str) {
    let names: Vec<&String> = ours.keys().collect();
    let expected: Vec<&String> = reference.keys().collect();
    assert_eq!(names, expected, "{what}: tensor names");
    for (name, r) in reference {
        let o = &ours[name];
        assert_eq!(o.kind(), r.kind(), "{what}: dtype of {name}");
        assert_eq!(o.size(), r.size(), "{what}: shape of {name}");
        assert!(o.equal(r), "{what}: values of {name}");
    }
}

fn check_against_reference(file: &str, reference: &str) {
    let ours = load_weights(&dir().join(file)).unwrap();
    let reference = read_safetensors(&dir().join(format!("{reference}.reference.safetensors"))).unwrap();
    assert_identical(&ours, &reference, file);
}

#[test]
fn weights_plain_dict() {
    check_against_reference("plain_dict.pt", "plain_dict");
}

#[test]
fn weights_ordered_dict_with_metadata() {
    check_against_reference("ordered.pth", "ordered");
}

#[test]
fn weights_nested_state_dict() {
    check_against_reference("nested.ckpt", "ordered");
}

#[test]
fn weights_half_and_bfloat16_kept_as_stored() {
    check_against_reference("fp16.bin", "fp16");
    check_against_reference("bf16.bin", "bf16");
    let half = load_weights(&dir().join("fp16.bin")).unwrap();
    assert_eq!(half["a"].kind(), Kind::Half);
}

#[test]
fn weights_views_offsets_strides_and_parameters() {
    check_against_reference("views.pt", "views");
}

#[test]
fn weights_refuses_foreign_global() {
    let err = load_weights(&dir().join("evil.pt")).unwrap_err();
    match &err {
        WeightsError::Pickle { source: PickleError::ForbiddenGlobal { module, name }, .. } => {
            assert_eq!((module.as_str(), name.as_str()), ("posix", "system"));
        }
        other => panic!("expected a refused global, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("evil.pt") && msg.contains("posix.system"), "{msg}");
}

#[test]
fn weights_truncated_files_are_errors() {
    let err = load_weights(&dir().join("truncated.pt")).unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { source: PickleError::Zip(_), .. }), "{err}");
    assert!(err.to_string().contains("truncated.pt"), "{err}");
    let err = load_weights(&dir().join("truncated_pickle.pt")).unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { source: PickleError::Malformed { .. }, .. }), "{err}");
}

#[test]
fn weights_legacy_format_gets_clear_error() {
    let err = load_weights(&dir().join("legacy.pt")).unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { source: PickleError::LegacyFormat, .. }), "{err}");
    assert!(err.to_string().contains("legacy"), "{err}");
}

#[test]
fn weights_component_folders() {
    let sharded = load_weights(&dir().join("sharded")).unwrap();
    let reference = read_safetensors(&dir().join("plain_dict.reference.safetensors")).unwrap();
    assert_identical(&sharded, &reference, "sharded folder");
    // safetensors preferred over the .bin beside it (they hold different values).
    let both = load_weights(&dir().join("both")).unwrap();
    assert_eq!(both["w"].sum(Kind::Float).double_value(&[]), 2.0);
    let bin_only = load_weights(&dir().join("bin_only")).unwrap();
    let reference = read_safetensors(&dir().join("ordered.reference.safetensors")).unwrap();
    assert_identical(&bin_only, &reference, "pytorch_model.bin folder");
    let err = load_weights(&dir().join("sharded").join("..").join("views.reference.safetensors.missing")).unwrap_err();
    assert!(matches!(err, WeightsError::UnknownFormat { .. }), "{err}");
}

#[test]
fn weights_real_laion_head_pth_equals_safetensors() {
    let data = crate::support::data_dir().join("weights");
    let pth = load_weights(&data.join("laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.pth")).unwrap();
    let st = load_weights(&data.join("laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.safetensors")).unwrap();
    assert_identical(&pth, &st, "LAION head");
    let shapes: Vec<(String, Vec<i64>)> = pth.iter().map(|(k, v)| (k.clone(), v.size())).collect();
    let expected: Vec<(String, Vec<i64>)> = [
        ("layers.0.bias", vec![1024]),
        ("layers.0.weight", vec![1024, 768]),
        ("layers.2.bias", vec![128]),
        ("layers.2.weight", vec![128, 1024]),
        ("layers.4.bias", vec![64]),
        ("layers.4.weight", vec![64, 128]),
        ("layers.6.bias", vec![16]),
        ("layers.6.weight", vec![16, 64]),
        ("layers.7.bias", vec![1]),
        ("layers.7.weight", vec![1, 16]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), s))
    .collect();
    assert_eq!(shapes, expected);
}


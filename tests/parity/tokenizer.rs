//! CLIP tokenizer against open_clip's SimpleTokenizer and transformers' CLIPTokenizer.
use std::collections::HashMap;
use std::path::PathBuf;

use ril_pipe::models::tokenizer::{ClipTokenizer, Padding};
use tch::Tensor;

use crate::support::fixtures;

fn prompts() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixtures("tokenizer").join("prompts.json")).unwrap()).unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures("tokenizer").join("ids.safetensors")).unwrap().into_iter().collect()
}

fn check(tokenizer: &ClipTokenizer, key: &str, context: usize, padding: Padding) {
    let texts = prompts();
    assert!(texts.len() > 800, "expected the HPD prompts and the tricky ones, got {}", texts.len());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = tokenizer.tokenize(&refs, context, padding).unwrap();
    let theirs = &reference()[key];
    assert_eq!(ours.size(), theirs.size());
    let mismatches: Vec<String> = (0..texts.len() as i64)
        .filter(|&i| !ours.get(i).equal(&theirs.get(i)))
        .map(|i| format!("{:?}\n  ours   {:?}\n  theirs {:?}", texts[i as usize], Vec::<i64>::try_from(ours.get(i)).unwrap(), Vec::<i64>::try_from(theirs.get(i)).unwrap()))
        .collect();
    assert!(mismatches.is_empty(), "{key}: {} of {} prompts differ:\n{}", mismatches.len(), texts.len(), mismatches.join("\n"));
}

fn bpe_path() -> PathBuf {
    crate::support::data_dir().join("bpe_simple_vocab_16e6.txt.gz")
}

#[test]
fn tokenizer_matches_open_clip() {
    let tok = ClipTokenizer::from_bpe_gz(&bpe_path()).unwrap();
    assert_eq!((tok.sot(), tok.eot(), tok.vocab_size()), (49406, 49407, 49408));
    check(&tok, "open_clip_77", 77, Padding::Zeros);
    check(&tok, "open_clip_16", 16, Padding::Zeros);
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = ClipTokenizer::from_hf_folder(&fixtures("tokenizer").join("hf_tokenizer")).unwrap();
    assert_eq!((tok.sot(), tok.eot()), (49406, 49407));
    check(&tok, "transformers_77", 77, Padding::EndOfText);
    check(&tok, "transformers_16", 16, Padding::EndOfText);
}

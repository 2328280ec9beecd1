//! A small CLIP BPE vocabulary for the tiny world: every word of the captions is one token.
//!
//! The full CLIP vocabulary (49408 tokens) would make each text embedding table 49408 x width,
//! far too big to ship, so the tiny world writes its own `vocab.json` + `merges.txt` in the CLIP
//! format (transformers `CLIPTokenizer`): the 256 byte characters, the same with `</w>`, the
//! merge results, then `<|startoftext|>` and `<|endoftext|>` (the largest id, as in CLIP). The
//! merges are chosen so that BPE joins each caption word into one `word</w>` token; any other
//! text still tokenises, character by character.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::json;

use super::TrainError;
use crate::models::tokenizer::{bpe_word, byte_characters};
use crate::tiny::{Background, Colour, Position, Relation, Shape, Size};

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Every word a caption can contain (including the spellings the caption parser accepts),
/// plus `extra` words, sorted and without repeats.
pub fn caption_words(extra: &[&str]) -> Vec<String> {
    let mut words: Vec<String> = ["a", "an", "on", "background", "center", "gray"].iter().map(|w| w.to_string()).collect();
    words.extend(Shape::ALL.iter().map(|s| s.name().to_string()));
    words.extend(Colour::ALL.iter().map(|c| c.name().to_string()));
    words.extend(Size::ALL.iter().map(|s| s.name().to_string()));
    words.extend(Background::ALL.iter().map(|b| b.name().to_string()));
    let phrases = Position::ALL.iter().map(|p| p.phrase()).chain(Relation::ALL.iter().map(|r| r.phrase()));
    for phrase in phrases {
        words.extend(phrase.split(' ').map(str::to_string));
    }
    words.extend(extra.iter().map(|w| w.to_string()));
    words.sort();
    words.dedup();
    words
}

/// A CLIP BPE vocabulary: token ids and ranked merges.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocabulary {
    pub tokens: BTreeMap<String, i64>,
    pub merges: Vec<(String, String)>,
}

impl Vocabulary {
    /// The vocabulary in which each of `words` (lower-case ASCII letters) is a single token.
    ///
    /// Merges are appended word by word: while BPE leaves a word in several parts, the first
    /// two parts are merged by a new merge of the highest rank so far. A new merge never
    /// changes how earlier words tokenise (BPE prefers every earlier, lower-ranked merge
    /// wherever one applies), so each word ends as one token.
    pub fn for_words(words: &[String]) -> Result<Self, TrainError> {
        if let Some(bad) = words.iter().find(|w| w.is_empty() || !w.bytes().all(|b| b.is_ascii_lowercase())) {
            return Err(TrainError::Config(format!("vocabulary word {bad:?} is not lower-case ASCII letters")));
        }
        let mut ranks: HashMap<(String, String), usize> = HashMap::new();
        let mut merges: Vec<(String, String)> = Vec::new();
        for word in words {
            loop {
                let parts = bpe_word(word, &ranks);
                if parts.len() == 1 {
                    break;
                }
                let pair = (parts[0].clone(), parts[1].clone());
                ranks.insert(pair.clone(), merges.len());
                merges.push(pair);
            }
        }
        let base: Vec<char> = byte_characters().into_iter().map(|(_, c)| c).collect();
        let mut ordered: Vec<String> = base.iter().map(|c| c.to_string()).collect();
        ordered.extend(base.iter().map(|c| format!("{c}</w>")));
        ordered.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        ordered.push(START_OF_TEXT.to_string());
        ordered.push(END_OF_TEXT.to_string());
        let tokens = ordered.into_iter().enumerate().map(|(i, t)| (t, i as i64)).collect();
        Ok(Vocabulary { tokens, merges })
    }

    /// Reads a tokenizer folder written by [`Self::write_folder`] (or any CLIP tokenizer folder).
    pub fn read_folder(dir: &Path) -> Result<Self, TrainError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| TrainError::io(format!("cannot read {}", path.display()), e))
        };
        let tokens: BTreeMap<String, i64> = serde_json::from_str(&read("vocab.json")?).map_err(|e| TrainError::Model(format!("{}: {e}", dir.join("vocab.json").display())))?;
        let mut merges = Vec::new();
        for line in read("merges.txt")?.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()) {
            match line.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => merges.push((a.to_string(), b.to_string())),
                _ => return Err(TrainError::Model(format!("{}: malformed merge `{line}`", dir.join("merges.txt").display()))),
            }
        }
        for special in [START_OF_TEXT, END_OF_TEXT] {
            if !tokens.contains_key(special) {
                return Err(TrainError::Model(format!("{}: no `{special}` token", dir.display())));
            }
        }
        Ok(Vocabulary { tokens, merges })
    }

    /// The `model_max_length` of a tokenizer folder's `tokenizer_config.json`.
    pub fn context_length(dir: &Path) -> Result<usize, TrainError> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(format!("cannot read {}", path.display()), e))?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainError::Model(format!("{}: {e}", path.display())))?;
        config["model_max_length"].as_u64().map(|n| n as usize).ok_or_else(|| TrainError::Model(format!("{}: no model_max_length", path.display())))
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn start_of_text(&self) -> i64 {
        self.tokens[START_OF_TEXT]
    }

    pub fn end_of_text(&self) -> i64 {
        self.tokens[END_OF_TEXT]
    }

    /// Writes a transformers tokenizer folder: `vocab.json`, `merges.txt` (with the
    /// `#version: 0.2` header), `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn write_folder(&self, dir: &Path, context_length: usize) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(format!("cannot create {}", dir.display()), e))?;
        // vocab.json lists tokens by id, as transformers writes it.
        let mut by_id: Vec<(&String, &i64)> = self.tokens.iter().collect();
        by_id.sort_by_key(|(_, id)| **id);
        let vocab: serde_json::Map<String, serde_json::Value> = by_id.into_iter().map(|(t, id)| (t.clone(), json!(id))).collect();
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            merges.push_str(&format!("{a} {b}\n"));
        }
        let special = |content: &str| json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false});
        let config = json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": context_length,
            "bos_token": special(START_OF_TEXT),
            "eos_token": special(END_OF_TEXT),
            "unk_token": special(END_OF_TEXT),
            "pad_token": special(END_OF_TEXT),
            "do_lower_case": true,
            "errors": "replace",
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": true,
        });
        let specials = json!({
            "bos_token": START_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": END_OF_TEXT,
            "pad_token": END_OF_TEXT,
        });
        let files: [(&str, Vec<u8>); 4] = [
            ("vocab.json", serde_json::to_vec(&vocab).map_err(TrainError::other)?),
            ("merges.txt", merges.into_bytes()),
            ("tokenizer_config.json", serde_json::to_vec_pretty(&config).map_err(TrainError::other)?),
            ("special_tokens_map.json", serde_json::to_vec_pretty(&specials).map_err(TrainError::other)?),
        ];
        for (name, bytes) in files {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| TrainError::io(format!("cannot write {}", path.display()), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tokenizer::{ClipTokenizer, Padding};
    use crate::tiny::prompt_split;

    #[test]
    fn every_caption_word_is_one_token_through_the_hf_loader() {
        let words = caption_words(&crate::tiny::train::data::LOOK_WORDS);
        let vocab = Vocabulary::for_words(&words).unwrap();
        let dir = tempfile::tempdir().unwrap();
        vocab.write_folder(dir.path(), 20).unwrap();
        assert_eq!(Vocabulary::read_folder(dir.path()).unwrap(), vocab);
        assert_eq!(Vocabulary::context_length(dir.path()).unwrap(), 20);
        let tokenizer = ClipTokenizer::from_hf_folder(dir.path()).unwrap();
        assert_eq!(tokenizer.vocab_size(), vocab.len());
        assert_eq!(tokenizer.sot(), vocab.start_of_text());
        assert_eq!(tokenizer.eot(), vocab.len() as i64 - 1, "EOT is the largest id, as in CLIP");
        for word in &words {
            let ids = tokenizer.encode(word).unwrap();
            assert_eq!(ids, vec![vocab.tokens[&format!("{word}</w>")]], "{word}");
        }
        let split = prompt_split(0);
        let mut longest = 0;
        for caption in split.train.iter().chain(&split.test) {
            let ids = tokenizer.encode(caption).unwrap();
            let expected: Vec<i64> = caption.split(' ').map(|w| vocab.tokens[&format!("{w}</w>")]).collect();
            assert_eq!(ids, expected, "{caption}");
            longest = longest.max(ids.len());
        }
        assert!(longest + 2 <= 20, "captions of {longest} words do not fit a context of 20");
        // Text outside the caption words still tokenises (per character), and padding is EOT.
        assert!(tokenizer.encode("a red zebra").unwrap().len() > 3);
        let ids = tokenizer.tokenize(&["a red circle"], 8, Padding::EndOfText).unwrap();
        let row: Vec<i64> = Vec::try_from(ids.view([-1])).unwrap();
        assert_eq!(row[0], tokenizer.sot());
        assert_eq!(&row[4..], &[tokenizer.eot(); 4]);
    }

    #[test]
    fn merges_are_deterministic_and_rejects_bad_words() {
        let words = caption_words(&[]);
        assert_eq!(Vocabulary::for_words(&words).unwrap(), Vocabulary::for_words(&words).unwrap());
        assert!(Vocabulary::for_words(&["Red".to_string()]).is_err());
        assert!(Vocabulary::for_words(&[String::new()]).is_err());
    }
}

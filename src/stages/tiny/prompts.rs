//! `tiny_prompts`: the tiny world's 750/50 prompt split (held-out shape-colour pairs) and its
//! small CLIP BPE tokenizer (each caption word one token).
use serde_json::json;

use crate::exec::{StageContext, StageError};
use crate::models::tokenizer::ClipTokenizer;
use crate::pipeline::schema::InputSpec;
use crate::stage_params;
use crate::tiny::train::data::LOOK_WORDS;
use crate::tiny::train::io::write_json;
use crate::tiny::train::vocab::{caption_words, Vocabulary};
use crate::tiny::{prompt_split, write_prompts};

use super::{TOKENIZER_DIR, TRAIN_PROMPTS, TEST_PROMPTS, LOOK_WORDS_PER_TEXT, stage_error, TinyKind};

/// `tiny_prompts`: the prompt split and the tokenizer.
pub struct TinyPrompts;

stage_params! {
    /// The parameters of a `tiny_prompts` stage.
    pub struct TinyPromptsParams {
        pub split_seed: u64 = param(0).min(0).doc("seed of the prompt split"),
        pub context_length: usize = param(28).min(26).max(512).doc("token positions of the text encoders (the longest alt-text: 16 caption words, 8 look words, start and end)"),
    }
}

impl TinyKind for TinyPrompts {
    const KIND: &'static str = "tiny_prompts";
    const DOC: &'static str = "the tiny world's 750/50 prompt split (held-out shape-colour pairs) and its small CLIP BPE tokenizer (each caption word one token)";
    type Params = TinyPromptsParams;

    fn inputs() -> Vec<InputSpec> {
        Vec::new()
    }

    fn run(&self, ctx: &mut StageContext, p: TinyPromptsParams) -> Result<(), StageError> {
        let context = p.context_length;
        let split = prompt_split(p.split_seed);
        let out = ctx.out_dir().to_path_buf();
        let vocab = Vocabulary::for_words(&caption_words(&LOOK_WORDS)).map_err(stage_error)?;
        vocab.write_folder(&out.join(TOKENIZER_DIR), context).map_err(stage_error)?;
        std::fs::create_dir_all(out.join("prompts"))?;
        write_prompts(&out.join(TRAIN_PROMPTS), &split.train).map_err(StageError::failed)?;
        write_prompts(&out.join(TEST_PROMPTS), &split.test).map_err(StageError::failed)?;
        let held_out: Vec<[&str; 2]> = split.held_out.iter().map(|(s, c)| [s.name(), c.name()]).collect();
        write_json(&out.join("split.json"), &json!({"seed": split.seed, "held_out_pairs": held_out})).map_err(stage_error)?;
        // The tokenizer must give every caption one token per word and fit the context.
        let tokenizer = ClipTokenizer::from_hf_folder(&out.join(TOKENIZER_DIR)).map_err(StageError::failed)?;
        for caption in split.train.iter().chain(&split.test) {
            let ids = tokenizer.encode(caption).map_err(StageError::failed)?;
            if ids.len() != caption.split(' ').count() || ids.len() + 2 + LOOK_WORDS_PER_TEXT > context {
                return Err(StageError::Failed(format!("caption {caption:?} tokenises into {} tokens (context {context}, with up to {LOOK_WORDS_PER_TEXT} look words)", ids.len())));
            }
        }
        ctx.log(format!("{} tokens, {} merges; {} training and {} test prompts", vocab.len(), vocab.merges.len(), split.train.len(), split.test.len()));
        Ok(())
    }
}


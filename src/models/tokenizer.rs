//! CLIP BPE tokenizer.
//!
//! Byte-level BPE with `</w>` word ends, as OpenAI CLIP, open_clip and transformers'
//! `CLIPTokenizer` do it. Two sources, each with its upstream's text cleaning:
//! - `bpe_simple_vocab_16e6.txt.gz` (OpenAI / open_clip): open_clip 3.3 cleans with
//!   `ftfy.fix_text`, `html.unescape` twice, whitespace collapse and `str.lower`. ftfy is a
//!   hard dependency of open_clip, so it always runs; we reproduce its deterministic fixers
//!   (HTML entities, C1 controls, Latin ligatures, character width, curly quotes, terminal
//!   escapes, control characters, NFC) but not its mojibake repair (`fix_encoding`), so text
//!   that is itself mis-decoded UTF-8 can tokenise differently. HTML entities: numeric ones and
//!   the common named ones (`amp lt gt quot apos nbsp`); other named entities stay as written.
//! - a diffusers / transformers `tokenizer/` folder (`vocab.json` + `merges.txt`):
//!   transformers 5 normalises with NFC, `\s+` -> " " and per-character lowercase (no ftfy,
//!   no HTML unescaping), and splits `<|startoftext|>` / `<|endoftext|>` out of the raw text.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use regex::Regex;
use tch::Tensor;
use unicode_normalization::UnicodeNormalization;

pub const CONTEXT_LENGTH: usize = 77;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot read tokenizer file: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    #[error("token `{0}` is not in the vocabulary")]
    UnknownToken(String),
    #[error("context length {0} is too short (needs room for start and end tokens)")]
    ContextLength(usize),
}

/// How [`ClipTokenizer::tokenize`] fills the rows after the end token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// With the end-of-text id (Stable Diffusion, transformers' `CLIPTokenizer`).
    EndOfText,
    /// With zeros (open_clip, HPSv2).
    Zeros,
}

/// Which upstream's text cleaning to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleaning {
    OpenClip,
    Transformers,
}

pub struct ClipTokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pattern: Regex,
    specials: Vec<(String, i64)>,
    sot: i64,
    eot: i64,
    cleaning: Cleaning,
}

/// GPT-2's byte-to-character pairs, in the order CLIP lists its base vocabulary: printable bytes
/// first (as themselves), then the others remapped to 256, 257, ...
pub(crate) fn byte_characters() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable.into_iter().zip(chars).map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('\u{fffd}'))).collect()
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    for (b, c) in byte_characters() {
        table[b as usize] = c;
    }
    table
}

/// Merges the characters of one word under `ranks`, lowest-ranked pair first and every
/// occurrence of it at once (OpenAI CLIP's `bpe`).
pub(crate) fn bpe_word(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let mut parts: Vec<String> = word.chars().map(|c| c.to_string()).collect();
    if let Some(last) = parts.last_mut() {
        last.push_str("</w>");
    }
    while parts.len() > 1 {
        let best = parts
            .windows(2)
            .filter_map(|w| ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, w[0].clone(), w[1].clone())))
            .min_by_key(|(r, _, _)| *r);
        let Some((_, first, second)) = best else { break };
        let mut merged = Vec::with_capacity(parts.len());
        let mut i = 0;
        while i < parts.len() {
            if i + 1 < parts.len() && parts[i] == first && parts[i + 1] == second {
                merged.push(format!("{first}{second}"));
                i += 2;
            } else {
                merged.push(std::mem::take(&mut parts[i]));
                i += 1;
            }
        }
        parts = merged;
    }
    parts
}

const SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

impl ClipTokenizer {
    /// The OpenAI / open_clip merges file (gzip; first line a header; 48894 merges used).
    pub fn from_bpe_gz(path: &Path) -> Result<Self, TokenizerError> {
        let read_err = |reason: String| TokenizerError::Read { path: path.display().to_string(), reason };
        let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file).read_to_string(&mut text).map_err(|e| read_err(e.to_string()))?;
        let lines: Vec<&str> = text.split('\n').collect();
        let wanted = 49152 - 256 - 2;
        if lines.len() < wanted + 1 {
            return Err(TokenizerError::Format {
                path: path.display().to_string(),
                reason: format!("{} lines, expected at least {}", lines.len(), wanted + 1),
            });
        }
        let merges = parse_merges(&lines[1..=wanted], path)?;
        // The base vocabulary lists the byte characters in `bytes_to_unicode`'s insertion
        // order: printable bytes first, then the remapped ones (whose characters are >= 256).
        let mut base: Vec<char> = bytes_to_unicode().to_vec();
        base.sort_by_key(|&c| if (c as u32) < 256 { (0, c as u32) } else { (1, c as u32) });
        let mut vocab: Vec<String> = base.iter().map(|c| c.to_string()).collect();
        vocab.extend(base.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder: HashMap<String, i64> = vocab.into_iter().enumerate().map(|(i, t)| (t, i as i64)).collect();
        Self::build(encoder, merges, ("<start_of_text>", "<end_of_text>"), Cleaning::OpenClip, path)
    }

    /// A transformers / diffusers tokenizer folder: `vocab.json` and `merges.txt`.
    pub fn from_hf_folder(dir: &Path) -> Result<Self, TokenizerError> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| TokenizerError::Read { path: p.display().to_string(), reason: e.to_string() })
        };
        let encoder: HashMap<String, i64> = serde_json::from_str(&read(&vocab_path)?)
            .map_err(|e| TokenizerError::Format { path: vocab_path.display().to_string(), reason: e.to_string() })?;
        let text = read(&merges_path)?;
        let lines: Vec<&str> =
            text.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).collect();
        let merges = parse_merges(&lines, &merges_path)?;
        Self::build(encoder, merges, ("<|startoftext|>", "<|endoftext|>"), Cleaning::Transformers, &vocab_path)
    }

    fn build(
        encoder: HashMap<String, i64>,
        merges: Vec<(String, String)>,
        (sot_name, eot_name): (&str, &str),
        cleaning: Cleaning,
        path: &Path,
    ) -> Result<Self, TokenizerError> {
        let id = |name: &str| {
            encoder.get(name).copied().ok_or_else(|| TokenizerError::Format {
                path: path.display().to_string(),
                reason: format!("special token `{name}` missing from the vocabulary"),
            })
        };
        let (sot, eot) = (id(sot_name)?, id(eot_name)?);
        let specials = vec![(sot_name.to_string(), sot), (eot_name.to_string(), eot)];
        let alternatives: Vec<String> = specials.iter().map(|(s, _)| regex::escape(s)).collect();
        let pattern = Regex::new(&format!("{}|{SPLIT}", alternatives.join("|"))).map_err(|e| TokenizerError::Format {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        Ok(Self { encoder, ranks, byte_encoder: bytes_to_unicode(), pattern, specials, sot, eot, cleaning })
    }

    pub fn sot(&self) -> i64 {
        self.sot
    }

    pub fn eot(&self) -> i64 {
        self.eot
    }

    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// Token ids of `text`, without start and end tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let mut ids = Vec::new();
        match self.cleaning {
            Cleaning::OpenClip => self.encode_clean(&clean_open_clip(text), &mut ids)?,
            Cleaning::Transformers => {
                // Added special tokens are matched in the raw text, before normalisation.
                let mut rest = text;
                while let Some((at, (name, id))) =
                    self.specials.iter().filter_map(|s| rest.find(&s.0).map(|i| (i, s))).min_by_key(|(i, _)| *i)
                {
                    self.encode_clean(&normalize_transformers(&rest[..at]), &mut ids)?;
                    ids.push(*id);
                    rest = &rest[at + name.len()..];
                }
                self.encode_clean(&normalize_transformers(rest), &mut ids)?;
            }
        }
        Ok(ids)
    }

    fn encode_clean(&self, text: &str, ids: &mut Vec<i64>) -> Result<(), TokenizerError> {
        for piece in self.pattern.find_iter(text) {
            let piece = piece.as_str();
            if let Some((_, id)) = self.specials.iter().find(|(s, _)| s == piece) {
                ids.push(*id);
                continue;
            }
            let encoded: String = piece.bytes().map(|b| self.byte_encoder[b as usize]).collect();
            for token in self.bpe(&encoded) {
                match self.encoder.get(&token) {
                    Some(&id) => ids.push(id),
                    // transformers maps unknown pieces to its unk token (<|endoftext|>).
                    None if self.cleaning == Cleaning::Transformers => ids.push(self.eot),
                    None => return Err(TokenizerError::UnknownToken(token)),
                }
            }
        }
        Ok(())
    }

    /// Merges the characters of one word, lowest-ranked pair first (OpenAI CLIP's `bpe`).
    fn bpe(&self, word: &str) -> Vec<String> {
        bpe_word(word, &self.ranks)
    }

    /// `[B, context_length]` Int64 ids: start token, the text's tokens, end token, padding.
    /// Longer texts are cut so that the end token stays last.
    pub fn tokenize(&self, texts: &[&str], context_length: usize, padding: Padding) -> Result<Tensor, TokenizerError> {
        if context_length < 2 {
            return Err(TokenizerError::ContextLength(context_length));
        }
        let pad = match padding {
            Padding::EndOfText => self.eot,
            Padding::Zeros => 0,
        };
        let mut all = Vec::with_capacity(texts.len() * context_length);
        for text in texts {
            let mut ids = vec![self.sot];
            ids.extend(self.encode(text)?);
            ids.truncate(context_length - 1);
            ids.push(self.eot);
            ids.resize(context_length, pad);
            all.extend(ids);
        }
        Ok(Tensor::from_slice(&all).view([texts.len() as i64, context_length as i64]))
    }
}

fn parse_merges(lines: &[&str], path: &Path) -> Result<Vec<(String, String)>, TokenizerError> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut it = line.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(TokenizerError::Format {
                    path: path.display().to_string(),
                    reason: format!("merge {} is not two symbols: `{line}`", i + 1),
                }),
            }
        })
        .collect()
}

/// Python's `str.isspace` (Rust's `char::is_whitespace` plus the information separators).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// open_clip's `_clean_lower`: ftfy, HTML unescaping twice, whitespace collapse, lowercase.
pub fn clean_open_clip(text: &str) -> String {
    let text = html_unescape(&html_unescape(&ftfy_fix_text(text)));
    let words: Vec<&str> = text.split(is_py_space).filter(|w| !w.is_empty()).collect();
    words.join(" ").to_lowercase()
}

/// transformers' CLIP normaliser: NFC, whitespace runs to one space, per-character lowercase
/// (the `tokenizers` Lowercase normaliser maps each character on its own: no final sigma).
pub fn normalize_transformers(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    let mut out = String::with_capacity(nfc.len());
    let mut in_space = false;
    for c in nfc.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// The deterministic fixers of `ftfy.fix_text` (default config), applied per line until
/// nothing changes, as ftfy does. Mojibake repair is not reproduced (see the module docs).
pub fn ftfy_fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for segment in text.split_inclusive('\n') {
        // ftfy leaves entities alone in a line that has a literal `<` (it may be real HTML).
        let unescape = !segment.contains('<');
        let mut current = segment.to_string();
        for _ in 0..16 {
            let mut next = if unescape { unescape_entities(&current, true) } else { current.clone() };
            next = fix_c1_and_chars(&next);
            next = remove_terminal_escapes(&next);
            next = next.chars().filter(|&c| !is_ftfy_control(c)).collect();
            next = next.nfc().collect();
            if next == current {
                break;
            }
            current = next;
        }
        out.push_str(&current);
    }
    out
}

/// The windows-1252 characters of bytes 0x80..=0x9F (ftfy's "sloppy" codec keeps the five
/// undefined ones as they are).
const CP1252_C1: [u32; 32] = [
    0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0x8D,
    0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A,
    0x0153, 0x9D, 0x017E, 0x0178,
];

/// C1 controls, Latin ligatures, character width, curly quotes, in ftfy's order (its
/// line-break fixes are left out: the whitespace collapse that follows makes them irrelevant).
fn fix_c1_and_chars(text: &str) -> String {
    let step = |text: &str, f: &dyn Fn(char, &mut String)| {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            f(c, &mut out);
        }
        out
    };
    let text = step(text, &|c, out| match c as u32 {
        0x80..=0x9F => out.push(char::from_u32(CP1252_C1[(c as u32 - 0x80) as usize]).unwrap_or(c)),
        _ => out.push(c),
    });
    let text = step(&text, &|c, out| match ligature(c) {
        Some(s) => out.push_str(s),
        None => out.push(c),
    });
    let text = step(&text, &|c, out| match c as u32 {
        0x3000 => out.push(' '),
        0xFF01..=0xFFEF => out.extend(std::iter::once(c).nfkc()),
        _ => out.push(c),
    });
    step(&text, &|c, out| match c as u32 {
        0x02BC | 0x2018..=0x201B => out.push('\''),
        0x201C..=0x201F => out.push('"'),
        _ => out.push(c),
    })
}

/// ftfy's `remove_control_chars` set.
fn is_ftfy_control(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{132}' => "IJ",
        '\u{133}' => "ij",
        '\u{149}' => "\u{2bc}n",
        '\u{1f1}' => "DZ",
        '\u{1f2}' => "Dz",
        '\u{1f3}' => "dz",
        '\u{1c4}' => "D\u{17d}",
        '\u{1c5}' => "D\u{17e}",
        '\u{1c6}' => "d\u{17e}",
        '\u{1c7}' => "LJ",
        '\u{1c8}' => "Lj",
        '\u{1c9}' => "lj",
        '\u{1ca}' => "NJ",
        '\u{1cb}' => "Nj",
        '\u{1cc}' => "nj",
        '\u{fb00}' => "ff",
        '\u{fb01}' => "fi",
        '\u{fb02}' => "fl",
        '\u{fb03}' => "ffi",
        '\u{fb04}' => "ffl",
        '\u{fb05}' => "\u{17f}t",
        '\u{fb06}' => "st",
        _ => return None,
    })
}

/// ftfy's `remove_terminal_escapes`: ESC `[` digits-or-semicolons letter.
fn remove_terminal_escapes(text: &str) -> String {
    if !text.contains('\u{1b}') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\u{1b}[") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 2..];
        let params = tail.find(|c: char| !(c.is_ascii_digit() || c == ';')).unwrap_or(tail.len());
        match tail[params..].chars().next() {
            Some(c) if c.is_ascii_alphabetic() => rest = &tail[params + 1..],
            _ => {
                out.push_str("\u{1b}[");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Python's `html.unescape` for numeric references and the common named entities.
pub fn html_unescape(text: &str) -> String {
    unescape_entities(text, false)
}

/// `require_semicolon`: ftfy only decodes entities that end in `;`; `html.unescape` also
/// decodes the legacy ones without it (`&amp`, `&lt`, ... and numeric references).
fn unescape_entities(text: &str, require_semicolon: bool) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        match decode_entity(tail, require_semicolon) {
            Some((decoded, used)) => {
                out.push_str(&decoded);
                rest = &tail[used..];
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes the entity at the start of `s` (after `&`): the text and the bytes consumed.
fn decode_entity(s: &str, require_semicolon: bool) -> Option<(String, usize)> {
    if let Some(num) = s.strip_prefix('#') {
        let (hex, digits) = match num.strip_prefix(['x', 'X']) {
            Some(h) => (true, h),
            None => (false, num),
        };
        let len = digits.find(|c: char| !(if hex { c.is_ascii_hexdigit() } else { c.is_ascii_digit() })).unwrap_or(digits.len());
        if len == 0 {
            return None;
        }
        let semicolon = digits[len..].starts_with(';');
        if require_semicolon && !semicolon {
            return None;
        }
        let used = 1 + usize::from(hex) + len + usize::from(semicolon);
        let value = u32::from_str_radix(&digits[..len], if hex { 16 } else { 10 }).unwrap_or(u32::MAX);
        return Some((numeric_char(value), used));
    }
    const NAMED: [(&str, &str, bool); 6] = [
        ("amp", "&", true),
        ("lt", "<", true),
        ("gt", ">", true),
        ("quot", "\"", true),
        ("nbsp", "\u{a0}", true),
        ("apos", "'", false),
    ];
    for (name, value, legacy) in NAMED {
        if let Some(after) = s.strip_prefix(name) {
            if after.starts_with(';') {
                return Some((value.to_string(), name.len() + 1));
            }
            if legacy && !require_semicolon {
                return Some((value.to_string(), name.len()));
            }
        }
    }
    None
}

/// `html.unescape`'s treatment of a numeric reference.
fn numeric_char(value: u32) -> String {
    match value {
        0x80..=0x9F => char::from_u32(CP1252_C1[(value - 0x80) as usize]).unwrap_or('\u{fffd}').to_string(),
        0 | 0xD800..=0xDFFF => "\u{fffd}".into(),
        v if v > 0x10FFFF => "\u{fffd}".into(),
        // Python drops these invalid code points (control characters and non-characters).
        0x1..=0x8 | 0xB | 0xE..=0x1F | 0x7F | 0xFDD0..=0xFDEF => String::new(),
        v if (v & 0xFFFE) == 0xFFFE => String::new(),
        v => char::from_u32(v).map(String::from).unwrap_or_else(|| "\u{fffd}".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_map_is_a_bijection() {
        let t = bytes_to_unicode();
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}');
    }

    #[test]
    fn html_unescaping() {
        assert_eq!(html_unescape("a &amp; b &lt;3 &#39;x&#39; &#x41; &amp"), "a & b <3 'x' A &");
        assert_eq!(html_unescape("&#128; &#0; &unknown;"), "\u{20ac} \u{fffd} &unknown;");
        assert_eq!(unescape_entities("&amp &amp;", true), "&amp &");
    }

    #[test]
    fn ftfy_fixers() {
        assert_eq!(ftfy_fix_text("“curly” ‘q’ ﬁne ＡＢＣ\u{7}"), "\"curly\" 'q' fine ABC");
        assert_eq!(ftfy_fix_text("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(ftfy_fix_text("e\u{301}"), "\u{e9}");
        assert_eq!(ftfy_fix_text("a < b &amp; c"), "a < b &amp; c");
    }

    #[test]
    fn cleaning_differs_as_upstream() {
        // Python's str.lower has the final-sigma rule; tokenizers lowercases char by char.
        assert_eq!(clean_open_clip("  \u{39f}\u{394}\u{39f}\u{3a3}\tX  "), "\u{3bf}\u{3b4}\u{3bf}\u{3c2} x");
        assert_eq!(normalize_transformers("\u{39f}\u{394}\u{39f}\u{3a3}  X"), "\u{3bf}\u{3b4}\u{3bf}\u{3c3} x");
    }
}

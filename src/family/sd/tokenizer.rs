//! The CLIP byte-level BPE tokenizer of Stable Diffusion, read from a diffusers `tokenizer/`
//! folder (`vocab.json` + `merges.txt`).
//!
//! It reproduces transformers' `CLIPTokenizer` as the diffusers pipeline calls it (padding to the
//! maximum length, truncation): clean whitespace and lower-case, split with the CLIP pattern,
//! map bytes to printable unicode, merge by rank with `</w>` marking word ends, then wrap in
//! `<|startoftext|>` .. `<|endoftext|>` and pad to 77 with the pad token. We write it ourselves
//! rather than depend on the `tokenizers` crate (and its regex / onig stack) for ~150 lines.
//!
//! The split is the CLIP regex
//! `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//! written by hand with char classes: a letter is `char::is_alphabetic` minus numerics (this also
//! admits the few combining marks Unicode calls Other_Alphabetic, which `\p{L}` does not; it only
//! matters for such marks, never for ASCII prompts). `ftfy` text repair is not done (transformers
//! skips it too when ftfy is not installed).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Context length of the CLIP text encoder.
pub const MAX_LEN: usize = 77;
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// transformers reads only this many merges (the rest of the BPE budget is bytes and specials).
const MAX_MERGES: usize = 49152 - 256 - 2;
const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

/// CLIP BPE tokenizer: text -> 77 token ids.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    bos: u32,
    eos: u32,
    pad: u32,
}

impl ClipTokenizer {
    /// Loads `vocab.json` and `merges.txt` (and the pad token from `special_tokens_map.json` when
    /// present; the end-of-text token otherwise, as in Stable Diffusion v1) from `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let vocab = read_vocab(&dir.join("vocab.json"))?;
        let ranks = read_merges(&dir.join("merges.txt"))?;
        let id = |tok: &str, file: &Path| -> Result<u32> {
            vocab
                .get(tok)
                .copied()
                .with_context(|| format!("{}: no token {tok:?}", file.display()))
        };
        let vocab_file = dir.join("vocab.json");
        let (bos, eos) = (id(BOS, &vocab_file)?, id(EOS, &vocab_file)?);
        let pad = match read_pad_token(&dir.join("special_tokens_map.json"))? {
            Some(tok) => id(&tok, &vocab_file)?,
            None => eos,
        };
        Ok(Self {
            vocab,
            ranks,
            byte_chars: byte_to_unicode(),
            bos,
            eos,
            pad,
        })
    }

    /// The end-of-text token's id: the first one in a prompt's ids is the token whose state CLIP
    /// pools.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Token ids of `text`: bos, at most 75 BPE tokens, eos, then padding, 77 in all.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        for piece in split(&clean(text)) {
            ids.extend(self.encode_piece(&piece)?);
        }
        ids.truncate(MAX_LEN - 1);
        ids.push(self.eos);
        ids.resize(MAX_LEN, self.pad);
        Ok(ids)
    }

    /// Token ids of one piece of the split (a special token, a word, a digit, punctuation).
    fn encode_piece(&self, piece: &str) -> Result<Vec<u32>> {
        if piece == BOS || piece == EOS {
            return Ok(vec![if piece == BOS { self.bos } else { self.eos }]);
        }
        let mapped: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
        self.bpe(&mapped)
            .iter()
            .map(|tok| {
                self.vocab
                    .get(tok)
                    .copied()
                    .with_context(|| format!("vocab.json: no token {tok:?} (from {piece:?})"))
            })
            .collect()
    }

    /// Byte-pair merges of one byte-mapped word, lowest rank first, last symbol ending in `</w>`.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0].clone(), p[1].clone())).map(|r| (*r, p)))
                .min_by_key(|(r, _)| *r)
                .map(|(_, p)| (p[0].clone(), p[1].clone()));
            let Some((a, b)) = best else { break };
            symbols = merge_pair(symbols, &a, &b);
        }
        symbols
    }
}

/// Replaces every adjacent (a, b), left to right, by their concatenation.
fn merge_pair(symbols: Vec<String>, a: &str, b: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && symbols[i] == a && symbols[i + 1] == b {
            out.push(format!("{a}{b}"));
            i += 2;
        } else {
            out.push(symbols[i].clone());
            i += 1;
        }
    }
    out
}

/// Whitespace runs collapsed to one space, trimmed, lower-cased.
fn clean(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric()
}

fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !c.is_numeric()
}

/// The CLIP regex split (see the module docs), by hand.
fn split(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let rest: String = chars[i..chars.len().min(i + BOS.len())].iter().collect();
        let literal = [BOS, EOS].into_iter().chain(CONTRACTIONS).find(|p| rest.starts_with(p));
        let len = if let Some(p) = literal {
            p.chars().count()
        } else if is_letter(chars[i]) {
            run_len(&chars[i..], is_letter)
        } else if chars[i].is_numeric() {
            1
        } else if is_other(chars[i]) {
            run_len(&chars[i..], is_other)
        } else {
            i += 1; // whitespace: matched by no alternative
            continue;
        };
        pieces.push(chars[i..i + len].iter().collect());
        i += len;
    }
    pieces
}

fn run_len(chars: &[char], class: fn(char) -> bool) -> usize {
    chars.iter().take_while(|&&c| class(c)).count()
}

/// GPT-2's reversible byte -> printable-unicode map.
fn byte_to_unicode() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading tokenizer file {}", path.display()))
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    serde_json::from_str(&read_text(path)?)
        .with_context(|| format!("{}: expected a JSON object of token -> id", path.display()))
}

/// Merge ranks from `merges.txt` (first line is a `#version` header).
fn read_merges(path: &Path) -> Result<HashMap<(String, String), usize>> {
    let text = read_text(path)?;
    let mut ranks = HashMap::new();
    for (rank, line) in text.trim().lines().skip(1).take(MAX_MERGES).enumerate() {
        let Some((a, b)) = line.split_once(' ') else {
            bail!("{}: line {} is not a merge pair: {line:?}", path.display(), rank + 2)
        };
        ranks.insert((a.to_string(), b.to_string()), rank);
    }
    Ok(ranks)
}

/// `pad_token` of `special_tokens_map.json` (a string or an object with `content`), if any.
fn read_pad_token(path: &Path) -> Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    let json: serde_json::Value =
        serde_json::from_str(&read_text(path)?).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let pad = match &json["pad_token"] {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(
            other["content"]
                .as_str()
                .with_context(|| format!("{}: field pad_token has no string content", path.display()))?
                .to_string(),
        ),
    };
    Ok(pad)
}

//! Word-level tokenizer over the shapes world's vocabulary.
//!
//! Token ids are baked into shipped model weights, so the vocabulary is a fixed
//! list in code: new words may only ever be appended to [`WORDS`].

use std::collections::HashMap;

pub const PAD: &str = "<pad>";
pub const BOS: &str = "<bos>";
pub const EOS: &str = "<eos>";
pub const UNK: &str = "<unk>";

pub const PAD_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
pub const UNK_ID: u32 = 3;

/// The default context length: every grammar caption (at most 14 words) fits.
pub const DEFAULT_MAX_LEN: usize = 16;

/// The vocabulary in id order: the specials, then every word the grammar can produce.
pub const WORDS: [&str; 40] = [
    PAD,
    BOS,
    EOS,
    UNK, //
    "a",
    "an",
    "two",
    "three",
    "small",
    "large", //
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple", //
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "star", //
    "circles",
    "squares",
    "triangles",
    "crosses",
    "rings",
    "diamonds",
    "stars", //
    "above",
    "below",
    "left",
    "right",
    "of",
    "and",
    "on",
    "background",
];

/// Lower-cases `text` and splits it into words at whitespace and punctuation.
pub fn split_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Maps text to fixed-length id sequences: `<bos> words.. <eos> <pad>..`.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    max_len: usize,
    ids: HashMap<&'static str, u32>,
}

impl Tokenizer {
    /// The shapes-world tokenizer; `max_len` is raised to 2 if smaller, the
    /// least that holds `<bos>` and `<eos>`.
    pub fn shapes_world(max_len: usize) -> Self {
        let ids = WORDS
            .iter()
            .enumerate()
            .map(|(i, &w)| (w, i as u32))
            .collect();
        Self {
            max_len: max_len.max(2),
            ids,
        }
    }

    /// Length of every encoded sequence.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn vocab_size(&self) -> usize {
        WORDS.len()
    }

    /// The id of a vocabulary word (specials included), if it is one.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// Exactly `max_len` ids. Unknown words become `<unk>`; text too long is
    /// truncated so that `<eos>` stays last. Empty text gives the unconditional
    /// prompt `<bos> <eos> <pad>..`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(BOS_ID);
        let words = split_words(text);
        let room = self.max_len - 2;
        ids.extend(
            words
                .iter()
                .take(room)
                .map(|w| self.id(w).unwrap_or(UNK_ID)),
        );
        ids.push(EOS_ID);
        ids.resize(self.max_len, PAD_ID);
        ids
    }

    /// `texts.len() * max_len` ids, row after row.
    pub fn encode_batch(&self, texts: &[&str]) -> Vec<u32> {
        texts.iter().flat_map(|t| self.encode(t)).collect()
    }

    /// The words of `ids` up to the first `<eos>`, skipping `<bos>` and `<pad>`;
    /// ids outside the vocabulary read as `<unk>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .take_while(|&&id| id != EOS_ID)
            .filter(|&&id| id != BOS_ID && id != PAD_ID)
            .map(|&id| WORDS.get(id as usize).copied().unwrap_or(UNK))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::shapes_world(DEFAULT_MAX_LEN)
    }
}

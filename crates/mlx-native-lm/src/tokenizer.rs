//! Tokenizers, through the `tokenizers` crate: loaded from `tokenizer.json`, or rebuilt from a
//! GGUF vocabulary (gpt2-style byte-level BPE with its pre-tokenizer, or a SentencePiece/llama
//! vocabulary whose merges are recovered from the token scores, with byte fallback).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::error::{LmError, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// A vocabulary as GGUF metadata describes it (`tokenizer.ggml.*`).
#[derive(Clone, Debug, Default)]
pub struct VocabSpec {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer of a gpt2-style vocabulary.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Vec<f32>,
    /// `"left right"` pairs in rank order.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Extra end-of-generation ids (e.g. `<end_of_turn>`, `<|im_end|>`).
    pub eog: Vec<u32>,
    pub add_bos: bool,
    pub add_space_prefix: bool,
}

/// The pre-tokenizer regexes of gpt2-style vocabularies, by `tokenizer.ggml.pre`.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer types this build knows.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "starcoder",
    "llama-bpe",
    "llama3",
    "qwen2",
];

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    let s = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| LmError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
    Ok(PreTokenizerWrapper::Split(s))
}

fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    // ByteLevel without its own regex: the splits above decide the words.
    let bytes = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
    let parts = match pre {
        "default" | "gpt2" => vec![split(GPT2_REGEX)?, bytes],
        // Digits one by one, then the gpt2 regex (llama.cpp's SMOLLM/STARCODER pre-type).
        "smollm" | "starcoder" => vec![split(r"\p{N}")?, split(GPT2_REGEX)?, bytes],
        "llama-bpe" | "llama3" => vec![split(LLAMA3_REGEX)?, bytes],
        "qwen2" => vec![split(QWEN2_REGEX)?, bytes],
        other => {
            return Err(LmError::Unsupported(format!(
                "tokenizer.ggml.pre = {other:?}; supported: {}",
                SUPPORTED_PRE.join(", ")
            )))
        }
    };
    Ok(PreTokenizerWrapper::Sequence(PreSequence::new(parts)))
}

/// Recover SentencePiece-BPE merges from scores: every split of a piece into two pieces of the
/// vocabulary is a merge, ranked by the merged piece's score (higher first), as llama.cpp's
/// SPM tokenizer ranks its candidate pairs.
fn spm_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(token_type::NORMAL) != token_type::NORMAL {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if index.contains_key(l) && index.contains_key(r) {
                merges.push((score, id, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    merges.into_iter().map(|(_, _, l, r)| (l, r)).collect()
}

/// How llama.cpp turns SentencePiece ids back into text: normal pieces with '▁' as spaces,
/// byte tokens as raw bytes, control and user-defined tokens verbatim; the bytes are then
/// read as UTF-8, each invalid sequence becoming one U+FFFD. (The `tokenizers` ByteFallback
/// decoder instead turns every byte of an invalid run into U+FFFD, valid neighbours included.)
struct SpmDecode {
    /// Per id: `Some(byte)` for `<0xXX>` byte tokens.
    bytes: Vec<Option<u8>>,
    /// Per id: the piece is normal text whose '▁' are spaces.
    normal: Vec<bool>,
    /// Drop one leading space of the text (`add_space_prefix`).
    strip_space: bool,
}

/// A tokenizer with the model's special-token rules.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    spm: Option<SpmDecode>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Every id that ends generation (EOS and the model's end-of-turn tokens).
    pub eog: Vec<u32>,
    pub add_bos: bool,
}

fn tk_err(e: impl std::fmt::Display) -> LmError {
    LmError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Rebuild the tokenizer a GGUF file describes.
    pub fn from_vocab(v: &VocabSpec) -> Result<Self> {
        let n = v.tokens.len();
        if n == 0 {
            return Err(LmError::Tokenizer("vocabulary is empty".into()));
        }
        if !v.token_types.is_empty() && v.token_types.len() != n {
            return Err(LmError::Tokenizer(format!(
                "token_type has {} entries, tokens has {n}",
                v.token_types.len()
            )));
        }
        let vocab: tokenizers::models::bpe::Vocab = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut tok = match v.model.as_str() {
            "gpt2" => {
                let mut merges = Vec::with_capacity(v.merges.len());
                for (i, m) in v.merges.iter().enumerate() {
                    let (l, r) = m.split_once(' ').ok_or_else(|| {
                        LmError::Tokenizer(format!("merge {i} {m:?} has no space"))
                    })?;
                    merges.push((l.to_string(), r.to_string()));
                }
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(tk_err)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let pre = v.pre.as_deref().unwrap_or("default");
                t.with_pre_tokenizer(Some(gpt2_pre_tokenizer(pre)?));
                t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
                t
            }
            "llama" => {
                let merges = spm_merges(&v.tokens, &v.scores, &v.token_types);
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .unk_token("<unk>".into())
                    .build()
                    .map_err(tk_err)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let mut norms = Vec::new();
                if v.add_space_prefix {
                    norms.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
                }
                norms.push(NormalizerWrapper::Replace(
                    Replace::new(" ", "▁").map_err(tk_err)?,
                ));
                t.with_normalizer(Some(NormalizerWrapper::Sequence(
                    tokenizers::normalizers::Sequence::new(norms),
                )));
                let mut decs = vec![
                    DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tk_err)?),
                    DecoderWrapper::ByteFallback(ByteFallback::default()),
                    DecoderWrapper::Fuse(Fuse::default()),
                ];
                if v.add_space_prefix {
                    decs.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
                }
                t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decs))));
                t
            }
            other => {
                return Err(LmError::Unsupported(format!(
                    "tokenizer.ggml.model = {other:?}; supported: gpt2, llama"
                )))
            }
        };
        // Control and user-defined tokens are matched whole in text, as llama.cpp does when it
        // parses special tokens.
        let specials: Vec<AddedToken> = v
            .tokens
            .iter()
            .zip(&v.token_types)
            .filter(|(_, &t)| t == token_type::CONTROL || t == token_type::USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == token_type::CONTROL))
            .collect();
        tok.add_special_tokens(&specials);
        let mut eog = v.eog.clone();
        if let Some(e) = v.eos {
            if !eog.contains(&e) {
                eog.push(e);
            }
        }
        let spm = (v.model == "llama").then(|| {
            let ty = |i: usize| v.token_types.get(i).copied().unwrap_or(token_type::NORMAL);
            SpmDecode {
                bytes: v
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
                        (ty(i) == token_type::BYTE).then(|| u8::from_str_radix(hex, 16).ok())?
                    })
                    .collect(),
                normal: (0..n).map(|i| ty(i) == token_type::NORMAL).collect(),
                strip_space: v.add_space_prefix,
            }
        });
        Ok(Tokenizer {
            inner: tok,
            spm,
            bos: v.bos,
            eos: v.eos,
            eog,
            add_bos: v.add_bos,
        })
    }

    /// Load `tokenizer.json` (and the BOS/EOS rules the caller read from the model's config).
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Vec<u32>, add_bos: bool) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| LmError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer {
            inner,
            spm: None,
            bos,
            eos: eos.first().copied(),
            eog: eos,
            add_bos,
        })
    }

    /// Token ids of `text`, with the model's BOS when `add_bos` and the model asks for it.
    /// Special tokens written in the text are matched as such.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tk_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` (special tokens included, as llama.cpp's detokenizer renders them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let Some(spm) = &self.spm else {
            return self.inner.decode(ids, false).map_err(tk_err);
        };
        let mut out = Vec::new();
        for &id in ids {
            let i = id as usize;
            if let Some(&Some(b)) = spm.bytes.get(i) {
                out.push(b);
            } else if let Some(piece) = self.inner.id_to_token(id) {
                if spm.normal.get(i).copied().unwrap_or(false) {
                    out.extend_from_slice(piece.replace('▁', " ").as_bytes());
                } else {
                    out.extend_from_slice(piece.as_bytes());
                }
            }
        }
        let text = String::from_utf8_lossy(&out);
        let text = match text.strip_prefix(' ') {
            Some(rest) if spm.strip_space => rest,
            _ => &text,
        };
        Ok(text.to_string())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// True when `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The string of one token, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Turns a growing list of ids into text pieces, holding back bytes that do not yet form
/// valid UTF-8 (a multi-byte character split across tokens).
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Add a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl VocabSpec {
    /// Read `tokenizer.ggml.*` from a GGUF file.
    pub fn from_gguf(f: &mlx_native::weights::gguf::GgufFile) -> Result<Self> {
        let strings = |key: &str| -> Result<Vec<String>> {
            match f.value(key) {
                None => Ok(Vec::new()),
                Some(_) => f
                    .get_array(key)?
                    .as_strings()
                    .map(<[String]>::to_vec)
                    .ok_or_else(|| {
                        LmError::Config(format!("{}: {key} is not a string array", f.name()))
                    }),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(LmError::Config(format!(
                "{}: no tokenizer.ggml.tokens",
                f.name()
            )));
        }
        let token_types = match f.value("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => f
                .get_array("tokenizer.ggml.token_type")?
                .to_i64s()
                .ok_or_else(|| {
                    LmError::Config(format!("{}: token_type is not an integer array", f.name()))
                })?
                .into_iter()
                .map(|t| t as i32)
                .collect(),
        };
        let scores = match f.value("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(_) => f
                .get_array("tokenizer.ggml.scores")?
                .as_f32s()
                .map(<[f32]>::to_vec)
                .ok_or_else(|| {
                    LmError::Config(format!("{}: scores is not an f32 array", f.name()))
                })?,
        };
        let model: String = f.get_str("tokenizer.ggml.model")?.to_string();
        let id = |key: &str| -> Result<Option<u32>> { Ok(f.get_opt::<u32>(key)?) };
        let mut eog = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(e) = id(key)? {
                eog.push(e);
            }
        }
        // Models whose end-of-turn token is not in metadata: llama.cpp also stops on these.
        for name in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = tokens.iter().position(|t| t == name) {
                if !eog.contains(&(i as u32)) {
                    eog.push(i as u32);
                }
            }
        }
        Ok(VocabSpec {
            add_bos: f
                .get_opt::<bool>("tokenizer.ggml.add_bos_token")?
                .unwrap_or(model == "llama"),
            add_space_prefix: f
                .get_opt::<bool>("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(model == "llama"),
            pre: f.get_opt::<&str>("tokenizer.ggml.pre")?.map(str::to_string),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            merges: strings("tokenizer.ggml.merges")?,
            model,
            tokens,
            token_types,
            scores,
            eog,
        })
    }
}

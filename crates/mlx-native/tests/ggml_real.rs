//! GGML kernels on a real model: the first layer's weights and the token embedding of
//! SmolLM2-135M-Instruct (GGUF, Q4_1 with some Q8_0/F32 tensors), uploaded as `GgmlWeight`s,
//! against the CPU dequantization (`GgufFile::dequantize_tensor`, checked against the
//! `gguf` Python package) and an f64 matmul.
//!
//! The model is read from `models/` (what `scripts/fetch-default-model` writes) or
//! `.cache/models/` at the repository root; when it is absent the test says so and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mlx_native::ops::{ggml_embedding, ggml_linear, ggml_matvec};
use mlx_native::weights::ggml_weight::GgmlWeight;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::{DeviceOptions, MlxBuffer, MlxDevice};
use std::path::{Path, PathBuf};

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let found = ["models", ".cache/models"]
        .iter()
        .map(|d| root.join(d).join(FILE))
        .find(|p| p.exists());
    if found.is_none() {
        eprintln!(
            "skipping: {FILE} not in models/ or .cache/models/ (scripts/fetch-default-model)"
        );
    }
    found
}

/// Deterministic inputs in [-1, 1).
fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn first_layer_and_embedding_match_cpu_dequantization() {
    let Some(path) = model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let gpu = MlxDevice::with_options(DeviceOptions {
        poison_allocations: true,
        ..DeviceOptions::default()
    })
    .unwrap();
    let names: Vec<String> = f
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.0.") && t.shape.len() == 2)
        .map(|t| t.name.clone())
        .chain(["token_embd.weight".to_string()])
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in &names {
        let t = f.tensor(name).unwrap();
        let (n, k) = (t.shape[0], t.shape[1]);
        let w = GgmlWeight::from_gguf(&gpu, &f, name).unwrap();
        let wd = f.dequantize_tensor(name).unwrap();
        for m in [1usize, 3, 12] {
            let x = inputs(m * k, n as u64 + m as u64);
            let gx = MlxBuffer::from_slice(&gpu, &x, &[m, k]).unwrap();
            let mut pass = gpu.begin();
            let y = if m == 1 {
                ggml_matvec(&mut pass, &gx, &w).unwrap()
            } else {
                ggml_linear(&mut pass, &gx, &w).unwrap()
            };
            pass.commit_and_wait().unwrap();
            let y = y.to_vec::<f32>(&gpu).unwrap();
            // f32 accumulation over K terms against f64: see ops::ggml_matmul's tests.
            let tol = 1e-6 * (k as f64).sqrt();
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for c in 0..k {
                        let p = x[i * k + c] as f64 * wd[j * k + c] as f64;
                        want += p;
                        mag += p.abs();
                    }
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= tol * mag + 1e-30,
                        "{name} ({}) m={m} [{i}, {j}]: got {got}, want {want}",
                        t.kind
                    );
                }
            }
        }
        println!("{name}: {} [{n}, {k}] ok", t.kind);
    }
    // Token embedding rows, including an id past the vocabulary (zeros).
    let emb = GgmlWeight::from_gguf(&gpu, &f, "token_embd.weight").unwrap();
    let wd = f.dequantize_tensor("token_embd.weight").unwrap();
    let (n, k) = (emb.rows(), emb.cols());
    let ids = [0u32, 1, 2, 17, 4_242, n as u32 - 1, n as u32];
    let gi = MlxBuffer::from_slice(&gpu, &ids, &[ids.len()]).unwrap();
    let mut pass = gpu.begin();
    let e = ggml_embedding(&mut pass, &emb, &gi).unwrap();
    pass.commit_and_wait().unwrap();
    let e = e.to_vec::<f32>(&gpu).unwrap();
    for (r, &id) in ids.iter().enumerate() {
        let got = &e[r * k..(r + 1) * k];
        if id as usize >= n {
            assert!(got.iter().all(|&v| v == 0.0));
            continue;
        }
        let want = &wd[id as usize * k..(id as usize + 1) * k];
        let big = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() <= big * 2f32.powi(-22),
                "token {id}: {a} vs {b}"
            );
        }
    }
}

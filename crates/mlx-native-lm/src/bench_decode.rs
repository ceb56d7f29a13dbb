//! `bench decode`: single-stream decode of real model *shapes* with synthetic weights, against
//! the bandwidth roofline.
//!
//! Each shape builds a [`Transformer`] directly (no file): every weight has the format, type
//! mix and shape of the real model file, filled with random bits and finite random scales
//! (never zeros), uploaded tensor by tensor so host memory stays at one tensor. Then, with one
//! measured read bandwidth for the whole run:
//!
//! - **bytes per token**: every layer weight (read once per token; of a mixture-of-experts
//!   layer, the router and the `top_k` experts one token is routed to), the LM head, one
//!   embedding row, the norms, and the KV cache the attention reads at that context (K and V
//!   rows of `min(pos + 1, window)` positions per layer, in the bytes the cache format
//!   stores: f16 by default, or `DecodeOptions::kv_format`);
//! - **roofline tok/s** = bandwidth / bytes per token;
//! - **decode tok/s** at each context: prefill the context with synthetic ids, then time
//!   decode steps by wall clock (record + submit + GPU + the id readback, greedy argmax on the
//!   GPU, the next step fed the returned id), and GPU µs per token as the sum of per-dispatch
//!   timestamps of profiled steps;
//! - **prefill tok/s** of one chunk of `prefill_tokens`;
//! - **dispatches** and **CPU record µs** per decode step;
//! - **per-linear** GPU time: each projection role timed over all layers in one pass (so every
//!   weight is read from memory, as in decode, not from cache), with its achieved bandwidth.
//!
//! Checks: the logits are finite and depend on the input (two different ids at the same
//! position give different logits).

use std::collections::HashMap;
use std::time::Instant;

use half::{bf16, f16};
use mlx_native::kv_quant::{KvFormat, KvStore};
use mlx_native::ops::activation::Act;
use mlx_native::ops::moe::MoeExperts;
use mlx_native::ops::{self, RopeConfig, RopeScaling, RopeStyle, RopeTable};
use mlx_native::weights::expert_weight::{ExpertWeight, GgmlExperts, QuantExperts};
use mlx_native::weights::ggml::GgmlType;
use mlx_native::weights::quant::QuantParams;
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{DType, MlxBuffer, MlxDevice, Pass, TokenVars};
use serde::Serialize;

use crate::bench::{read_bandwidth, Bandwidth};
use crate::config::{Family, ModelConfig, MoeSpec};
use crate::error::{LmError, Result};
use crate::layers::mlp::{Ffn, MoeMlp};
use crate::layers::{Attention, DecoderLayer, Linear, Mlp};
use crate::models::{Transformer, PREFILL_CHUNK};
use crate::replay::DecodeLoop;

/// Which weight a tensor is, for the per-role type table and the per-linear timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    Head,
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// The MoE router (`mlp.gate`, `[experts, hidden]`); the routed experts use `Gate`, `Up`
    /// and `Down`.
    Router,
}

impl Role {
    pub const LAYER: [Role; 8] = [
        Role::Q,
        Role::K,
        Role::V,
        Role::O,
        Role::Router,
        Role::Gate,
        Role::Up,
        Role::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Embed => "embed",
            Role::Head => "lm_head",
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::Down => "down",
            Role::Router => "router",
        }
    }
}

/// How a shape's weights are stored.
#[derive(Clone, Copy, Debug)]
pub enum WeightFormat {
    /// GGUF blocks; the type of each tensor from `(role, layer, n_layers)`.
    Gguf(fn(Role, usize, usize) -> GgmlType),
    /// MLX affine quantization of every linear and the embedding; scales, biases and norms
    /// in `dtype`. A MoE router is 8-bit g64, as mlx-lm's `convert` quantizes `mlp.gate` of
    /// qwen3_moe (its `quant_predicate`).
    Mlx {
        bits: u32,
        group_size: u32,
        dtype: DType,
    },
}

/// A model shape: the hyper-parameters and the weight format of a real model file.
#[derive(Clone, Debug)]
pub struct ShapeSpec {
    pub name: &'static str,
    /// What the format is, in words ("GGUF Q4_1, Q8_0 embeddings").
    pub format_desc: &'static str,
    pub family: Family,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied: bool,
    /// Sliding window and the period of global layers (layer `i` is global when
    /// `(i + 1) % period == 0`; Gemma 3: 6).
    pub window: Option<(usize, usize)>,
    pub rope: RopeConfig,
    pub rope_local_base: Option<f32>,
    pub format: WeightFormat,
    /// Mixture-of-experts FFN in every layer (`ffn` is then unused).
    pub moe: Option<MoeSpec>,
    /// `Some(reason)`: not runnable yet; reported as a "not yet" row.
    pub not_yet: Option<&'static str>,
}

fn smollm2_types(role: Role, _: usize, _: usize) -> GgmlType {
    match role {
        Role::Embed | Role::Head => GgmlType::Q8_0,
        _ => GgmlType::Q4_1,
    }
}

/// llama.cpp's `use_more_bits` layers of Q4_K_M (attn_v and ffn_down get more bits there).
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type mix of gemma-3-270m-q4_k_m.gguf: K = 640 is not a multiple of 256, so the
/// projections reading the hidden state fall back from K-quants to Q5_0 (Q8_0 for the
/// more-bits attn_v); attn_output (K = 1024) and ffn_down (K = 2048) are Q4_K / Q6_K.
fn gemma270m_types(role: Role, i: usize, n: usize) -> GgmlType {
    match role {
        Role::Embed | Role::Head => GgmlType::Q8_0,
        Role::Q | Role::K | Role::Gate | Role::Up | Role::Router => GgmlType::Q5_0,
        Role::V if more_bits(i, n) => GgmlType::Q8_0,
        Role::V => GgmlType::Q5_0,
        Role::O => GgmlType::Q4_K,
        Role::Down if more_bits(i, n) => GgmlType::Q6_K,
        Role::Down => GgmlType::Q4_K,
    }
}

/// llama.cpp's Q4_0 files keep the output matrix at Q6_K.
fn llama_q4_0_types(role: Role, _: usize, _: usize) -> GgmlType {
    match role {
        Role::Head => GgmlType::Q6_K,
        _ => GgmlType::Q4_0,
    }
}

fn tiny_types(role: Role, i: usize, _: usize) -> GgmlType {
    match role {
        Role::Embed | Role::Head => GgmlType::Q8_0,
        Role::V if i == 0 => GgmlType::Q5_0,
        Role::Down => GgmlType::Q4_1,
        _ => GgmlType::Q4_0,
    }
}

fn llama31_rope(head_dim: usize, style: RopeStyle) -> RopeConfig {
    RopeConfig {
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
        ..RopeConfig::new(head_dim, 500_000.0, style)
    }
}

const MLX4: WeightFormat = WeightFormat::Mlx {
    bits: 4,
    group_size: 64,
    dtype: DType::BF16,
};

/// Every shape `bench decode` knows, in report order.
pub const SHAPES: &[&str] = &[
    "smollm2-135m",
    "gemma3-270m",
    "gemma-3-4b-mlx4",
    "llama-3.1-8b-mlx4",
    "llama-3.1-8b-q4_0",
    "qwen3-30b-a3b",
];

/// Expand a `--shape` argument: a shape name, `llama-3.1-8b` (both layouts), `gemma-3-4b`,
/// or `all`.
pub fn expand_shapes(arg: &str) -> Result<Vec<&'static str>> {
    Ok(match arg {
        "all" => SHAPES.to_vec(),
        "llama-3.1-8b" => vec!["llama-3.1-8b-mlx4", "llama-3.1-8b-q4_0"],
        "gemma-3-4b" => vec!["gemma-3-4b-mlx4"],
        other => match SHAPES.iter().chain(TEST_SHAPES).find(|&&s| s == other) {
            Some(&s) => vec![s],
            None => {
                return Err(LmError::Invalid(format!(
                "bench decode: unknown shape {other:?}; known: all, llama-3.1-8b, gemma-3-4b, {}",
                SHAPES.join(", ")
            )))
            }
        },
    })
}

/// Tiny shapes that run in seconds on a software rasterizer (tests, CI).
pub const TEST_SHAPES: &[&str] = &[
    "tiny-gguf",
    "tiny-llama-mlx",
    "tiny-gemma-mlx",
    "tiny-qwen3-moe",
];

/// The spec of a named shape.
pub fn shape(name: &str) -> Result<ShapeSpec> {
    let llama = |name, format_desc, format, style| ShapeSpec {
        name,
        format_desc,
        family: Family::Llama,
        n_layers: 32,
        hidden: 4096,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        ffn: 14336,
        vocab: 128_256,
        tied: false,
        window: None,
        rope: llama31_rope(128, style),
        rope_local_base: None,
        format,
        moe: None,
        not_yet: None,
    };
    Ok(match name {
        "smollm2-135m" => ShapeSpec {
            name: "smollm2-135m",
            format_desc: "GGUF Q4_1, Q8_0 tied embeddings",
            family: Family::Llama,
            n_layers: 30,
            hidden: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49_152,
            tied: true,
            window: None,
            rope: RopeConfig::new(64, 100_000.0, RopeStyle::Traditional),
            rope_local_base: None,
            format: WeightFormat::Gguf(smollm2_types),
            moe: None,
            not_yet: None,
        },
        "gemma3-270m" => ShapeSpec {
            name: "gemma3-270m",
            format_desc: "GGUF Q4_K_M mix (Q5_0/Q8_0/Q4_K/Q6_K), Q8_0 tied embeddings",
            family: Family::Gemma3,
            n_layers: 18,
            hidden: 640,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 256,
            ffn: 2048,
            vocab: 262_144,
            tied: true,
            window: Some((512, 6)),
            rope: RopeConfig::new(256, 1_000_000.0, RopeStyle::Neox),
            rope_local_base: Some(10_000.0),
            format: WeightFormat::Gguf(gemma270m_types),
            moe: None,
            not_yet: None,
        },
        "llama-3.1-8b-mlx4" => llama(
            "llama-3.1-8b-mlx4",
            "MLX 4-bit g64, bf16 scales (embeddings and lm_head too)",
            MLX4,
            RopeStyle::Neox,
        ),
        "llama-3.1-8b-q4_0" => llama(
            "llama-3.1-8b-q4_0",
            "GGUF Q4_0, Q6_K output",
            WeightFormat::Gguf(llama_q4_0_types),
            RopeStyle::Traditional,
        ),
        "gemma-3-4b-mlx4" => ShapeSpec {
            name: "gemma-3-4b-mlx4",
            format_desc: "MLX 4-bit g64, bf16 scales, tied quantized embeddings",
            family: Family::Gemma3,
            n_layers: 34,
            hidden: 2560,
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 256,
            ffn: 10240,
            vocab: 262_208,
            tied: true,
            window: Some((1024, 6)),
            rope: RopeConfig {
                scaling: RopeScaling::Linear { factor: 8.0 },
                ..RopeConfig::new(256, 1_000_000.0, RopeStyle::Neox)
            },
            rope_local_base: Some(10_000.0),
            format: MLX4,
            moe: None,
            not_yet: None,
        },
        "qwen3-30b-a3b" => ShapeSpec {
            name: "qwen3-30b-a3b",
            format_desc: "MLX 4-bit g64 bf16, MoE 128 experts top-8, 8-bit router, untied",
            family: Family::Qwen3Moe,
            n_layers: 48,
            hidden: 2048,
            n_heads: 32,
            n_kv_heads: 4,
            head_dim: 128,
            ffn: 6144,
            vocab: 151_936,
            tied: false,
            window: None,
            rope: RopeConfig::new(128, 1_000_000.0, RopeStyle::Neox),
            rope_local_base: None,
            format: MLX4,
            moe: Some(MoeSpec {
                experts: 128,
                top_k: 8,
                ffn: 768,
                norm_topk_prob: true,
            }),
            not_yet: None,
        },
        "tiny-qwen3-moe" => ShapeSpec {
            name: "tiny-qwen3-moe",
            format_desc: "MLX 4-bit g64 bf16, MoE 8 experts top-2, 8-bit router, untied",
            family: Family::Qwen3Moe,
            n_layers: 2,
            hidden: 64,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 64,
            ffn: 128,
            vocab: 320,
            tied: false,
            window: None,
            rope: RopeConfig::new(64, 1_000_000.0, RopeStyle::Neox),
            rope_local_base: None,
            format: MLX4,
            moe: Some(MoeSpec {
                experts: 8,
                top_k: 2,
                ffn: 64,
                norm_topk_prob: true,
            }),
            not_yet: None,
        },
        "tiny-gguf" => ShapeSpec {
            name: "tiny-gguf",
            format_desc: "GGUF Q4_0/Q5_0/Q4_1, Q8_0 embeddings, untied",
            family: Family::Llama,
            n_layers: 2,
            hidden: 64,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 64,
            ffn: 96,
            vocab: 300,
            tied: false,
            window: None,
            rope: llama31_rope(64, RopeStyle::Traditional),
            rope_local_base: None,
            format: WeightFormat::Gguf(tiny_types),
            moe: None,
            not_yet: None,
        },
        "tiny-llama-mlx" => ShapeSpec {
            name: "tiny-llama-mlx",
            format_desc: "MLX 4-bit g64 bf16, untied",
            family: Family::Llama,
            n_layers: 2,
            hidden: 128,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 64,
            ffn: 192,
            vocab: 300,
            tied: false,
            window: None,
            rope: llama31_rope(64, RopeStyle::Neox),
            rope_local_base: None,
            format: MLX4,
            moe: None,
            not_yet: None,
        },
        "tiny-gemma-mlx" => ShapeSpec {
            name: "tiny-gemma-mlx",
            format_desc: "MLX 4-bit g64 bf16, tied, window 8 on layer 0",
            family: Family::Gemma3,
            n_layers: 2,
            hidden: 64,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 64,
            ffn: 128,
            vocab: 320,
            tied: true,
            window: Some((8, 2)),
            rope: RopeConfig::new(64, 1_000_000.0, RopeStyle::Neox),
            rope_local_base: Some(10_000.0),
            format: MLX4,
            moe: None,
            not_yet: None,
        },
        other => {
            return Err(LmError::Invalid(format!(
                "bench decode: unknown shape {other:?}; known: {}",
                SHAPES.join(", ")
            )))
        }
    })
}

impl ShapeSpec {
    /// The `ModelConfig` the forward pass reads.
    pub fn config(&self) -> ModelConfig {
        let gemma = self.family == Family::Gemma3;
        let sliding_layers = (0..self.n_layers)
            .map(|i| self.window.is_some_and(|(_, p)| (i + 1) % p != 0))
            .collect();
        ModelConfig {
            family: self.family,
            arch: self.name.to_string(),
            n_layers: self.n_layers,
            hidden: self.hidden,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            ffn: self.ffn,
            vocab: self.vocab,
            norm_eps: if gemma { 1e-6 } else { 1e-5 },
            rope: self.rope,
            rope_local_base: self.rope_local_base,
            max_context: 131_072,
            sliding_window: self.window.map(|(w, _)| w),
            sliding_layers,
            qk_norm: gemma || matches!(self.family, Family::Qwen3 | Family::Qwen3Moe),
            act: if gemma { Act::GeluTanh } else { Act::Silu },
            embed_scale: gemma.then(|| (self.hidden as f32).sqrt()),
            attn_scale: 1.0 / (self.head_dim as f32).sqrt(),
            tied_embeddings: self.tied,
            moe: self.moe,
            moe_layers: vec![self.moe.is_some(); self.n_layers],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic weights

/// Random bytes without regenerating them per tensor: a pool of random words read at
/// pseudo-random offsets (the content of distinct tensors differs and looks random; the GPU
/// reads distinct buffers either way).
struct Bits {
    pool: Vec<u8>,
    state: u64,
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Bits {
    fn new(seed: u64, pool_words: usize) -> Self {
        let mut s = seed;
        let pool = (0..pool_words.max(1024))
            .flat_map(|_| splitmix(&mut s).to_le_bytes())
            .collect();
        Bits {
            pool,
            state: seed ^ 0xD1B5_4A32_D192_ED03,
        }
    }

    fn next(&mut self) -> u64 {
        splitmix(&mut self.state)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Fill `out` with random bytes: runs of up to 4 KiB copied from random pool offsets.
    fn fill(&mut self, out: &mut [u8]) {
        let pool = &self.pool;
        const RUN: usize = 4096;
        let span = pool.len().saturating_sub(RUN).max(1);
        for chunk in out.chunks_mut(RUN) {
            let at = (splitmix(&mut self.state) as usize) % span;
            let n = chunk.len().min(pool.len() - at);
            chunk[..n].copy_from_slice(&pool[at..at + n]);
        }
    }

    /// Random words (see [`Bits::fill`]).
    fn fill_words(&mut self, out: &mut [u32]) {
        const RUN: usize = 1024;
        let span = (self.pool.len() / 4).saturating_sub(RUN).max(1);
        for chunk in out.chunks_mut(RUN) {
            let at = 4 * ((self.next() as usize) % span);
            for (w, b) in chunk.iter_mut().zip(self.pool[at..].chunks_exact(4)) {
                *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }

    /// `±magnitude · 2^u`, `u` uniform in [-1, 1]: finite, nonzero, either sign.
    fn signed(&mut self, magnitude: f32) -> f32 {
        let m = magnitude * 2f32.powf(2.0 * self.unit() - 1.0);
        if self.next() & 1 == 0 {
            m
        } else {
            -m
        }
    }
}

/// Byte offsets of the f16 fields of a GGML block, with a magnitude that keeps the weights
/// near `1/sqrt(K)` (so activations stay O(1) over many layers). Every magnitude is a normal
/// f16 (>= 2^-14).
fn half_fields(kind: GgmlType, k: usize) -> Result<Vec<(usize, f32)>> {
    let r = 1.0 / (k as f32).sqrt();
    let f = |x: f32| x.max(1.0 / 16384.0);
    Ok(match kind {
        GgmlType::Q4_0 => vec![(0, f(0.22 * r))],
        GgmlType::Q5_0 => vec![(0, f(0.11 * r))],
        GgmlType::Q8_0 => vec![(0, f(0.0135 * r))],
        GgmlType::Q4_1 | GgmlType::Q5_1 => vec![(0, f(0.11 * r)), (2, f(0.8 * r))],
        GgmlType::Q4_K | GgmlType::Q5_K => vec![(0, f(0.004 * r)), (2, f(0.004 * r))],
        GgmlType::Q2_K => vec![(80, f(0.02 * r)), (82, f(0.02 * r))],
        GgmlType::Q3_K => vec![(108, f(0.01 * r))],
        GgmlType::Q6_K => vec![(208, f(0.0008 * r))],
        other => {
            return Err(LmError::Unsupported(format!(
                "bench decode: synthetic {other} weights"
            )))
        }
    })
}

/// Random GGML blocks of `rows` rows of K = `k`, with finite scales.
fn ggml_bytes(bits: &mut Bits, kind: GgmlType, rows: usize, k: usize) -> Result<Vec<u8>> {
    let row = kind.row_bytes(k as u64)? as usize;
    let mut b = vec![0u8; rows * row];
    bits.fill(&mut b);
    let fields = half_fields(kind, k)?;
    for blk in b.chunks_exact_mut(kind.block_bytes()) {
        for &(at, mag) in &fields {
            let h = f16::from_f32(bits.signed(mag)).to_bits().to_le_bytes();
            blk[at..at + 2].copy_from_slice(&h);
        }
    }
    Ok(b)
}

fn float_bytes(v: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        other => {
            return Err(LmError::Unsupported(format!(
                "bench decode: {other} scales"
            )))
        }
    })
}

fn mlx_random(
    gpu: &MlxDevice,
    bits: &mut Bits,
    n: usize,
    k: usize,
    params: QuantParams,
    dtype: DType,
) -> Result<QuantWeight> {
    let words = n * k * params.bits as usize / 32;
    let mut packed = vec![0u32; words];
    bits.fill_words(&mut packed);
    let groups = n * k / params.group_size as usize;
    // w = scale * q + bias with q in [0, 2^bits): centre the codes, |w| near 1/sqrt(K).
    let levels = (1u32 << params.bits) as f32;
    let mag = 1.8 / (levels * (k as f32).sqrt());
    let mut scales = Vec::with_capacity(groups);
    let mut biases = Vec::with_capacity(groups);
    for _ in 0..groups {
        let s = bits.signed(mag);
        scales.push(s);
        biases.push(-s * (levels - 1.0) * (0.4 + 0.2 * bits.unit()));
    }
    Ok(QuantWeight::from_raw(
        gpu,
        &packed,
        &float_bytes(&scales, dtype)?,
        Some(&float_bytes(&biases, dtype)?),
        [n, k],
        params,
        dtype,
    )?)
}

fn random_linear(
    gpu: &MlxDevice,
    bits: &mut Bits,
    spec: &ShapeSpec,
    role: Role,
    layer: usize,
    n: usize,
    k: usize,
) -> Result<Linear> {
    Ok(match spec.format {
        WeightFormat::Gguf(types) => {
            // As the GGUF loader takes them (Q4_0 and Q4_1 as MLX affine weights).
            let kind = types(role, layer, spec.n_layers);
            Linear::from_ggml(gpu, kind, n, k, &ggml_bytes(bits, kind, n, k)?)?
        }
        WeightFormat::Mlx {
            bits: b,
            group_size,
            dtype,
        } => {
            let params = match role {
                Role::Router => ROUTER_PARAMS,
                _ => QuantParams::affine(b, group_size),
            };
            Linear::Quant(mlx_random(gpu, bits, n, k, params, dtype)?)
        }
    })
}

/// mlx-lm's `convert` quantizes the qwen3_moe router (`mlp.gate`) at 8 bits, group 64.
const ROUTER_PARAMS: QuantParams = QuantParams::affine(8, 64);

/// Stacked experts `[E, N, K]` in `spec`'s format (the type of `role` in layer `layer`).
fn random_experts(
    gpu: &MlxDevice,
    bits: &mut Bits,
    spec: &ShapeSpec,
    role: Role,
    layer: usize,
    shape: [usize; 3],
) -> Result<ExpertWeight> {
    let [e, n, k] = shape;
    Ok(match spec.format {
        WeightFormat::Gguf(types) => {
            let kind = types(role, layer, spec.n_layers);
            let b = ggml_bytes(bits, kind, e * n, k)?;
            ExpertWeight::Ggml(GgmlExperts::upload(gpu, kind, shape, &b)?)
        }
        WeightFormat::Mlx {
            bits: b,
            group_size,
            dtype,
        } => {
            let params = QuantParams::affine(b, group_size);
            let w = mlx_random(gpu, bits, e * n, k, params, dtype)?;
            ExpertWeight::Mlx(QuantExperts::new(w, e)?)
        }
    })
}

/// A norm weight: f32 for GGUF (llama.cpp stores them so), the model dtype for MLX; values
/// in [0.5, 1.5).
fn random_vector(
    gpu: &MlxDevice,
    bits: &mut Bits,
    spec: &ShapeSpec,
    len: usize,
) -> Result<MlxBuffer> {
    // f32 in every format, as both loaders keep norm weights (MLX's 16-bit ones are
    // widened at load; the folded decode norms take f32).
    let v: Vec<f32> = (0..len)
        .map(|_| {
            let x = 0.5 + bits.unit();
            match spec.format {
                // The values a 16-bit file could hold.
                WeightFormat::Mlx { dtype, .. } => {
                    mlx_native::weights::quant::round_to_dtype(x, dtype).unwrap_or(x)
                }
                WeightFormat::Gguf(_) => x,
            }
        })
        .collect();
    Ok(MlxBuffer::from_slice(gpu, &v, &[len])?)
}

/// Weights of `roles` (rows each, `k` columns) of layer `layer`: GGUF ones stacked into one
/// weight when they share a type (as the GGUF loader does), returned with the parts as
/// views; otherwise each on its own (MLX ones are stacked by `Attention::prepare` /
/// `Mlp::fuse_gate_up`, as the MLX loader does).
fn random_stacked(
    gpu: &MlxDevice,
    bits: &mut Bits,
    spec: &ShapeSpec,
    layer: usize,
    roles: &[(Role, usize)],
    k: usize,
) -> Result<(Vec<Linear>, Option<Linear>)> {
    if let WeightFormat::Gguf(types) = spec.format {
        let mut parts = Vec::with_capacity(roles.len());
        for &(role, n) in roles {
            let t = types(role, layer, spec.n_layers);
            parts.push((t, n, ggml_bytes(bits, t, n, k)?));
        }
        let refs: Vec<(GgmlType, &[u8])> =
            parts.iter().map(|(t, _, b)| (*t, b.as_slice())).collect();
        if let Some((fused, views)) = Linear::ggml_stacked(gpu, k, &refs)? {
            return Ok((views, Some(fused)));
        }
        let mut one = Vec::with_capacity(parts.len());
        for (t, n, b) in &parts {
            one.push(Linear::from_ggml(gpu, *t, *n, k, b)?);
        }
        return Ok((one, None));
    }
    let mut one = Vec::with_capacity(roles.len());
    for &(role, n) in roles {
        one.push(random_linear(gpu, bits, spec, role, layer, n, k)?);
    }
    Ok((one, None))
}

/// Build a `Transformer` of `spec`'s shape and weight format with random weights (seeded).
pub fn build(gpu: &MlxDevice, spec: &ShapeSpec, seed: u64) -> Result<Transformer> {
    if let Some(why) = spec.not_yet {
        return Err(LmError::Unsupported(format!("{}: {why}", spec.name)));
    }
    let cfg = spec.config();
    cfg.validate()?;
    let mut bits = Bits::new(seed, 1 << 20);
    let (h, hd, nh, nkv) = (cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    let embed = random_linear(gpu, &mut bits, spec, Role::Embed, 0, cfg.vocab, h)?;
    let gemma = cfg.family == Family::Gemma3;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let (qkv, qkv_fused) = random_stacked(
            gpu,
            &mut bits,
            spec,
            i,
            &[(Role::Q, nh * hd), (Role::K, nkv * hd), (Role::V, nkv * hd)],
            h,
        )?;
        let [q, k, v] = <[Linear; 3]>::try_from(qkv)
            .map_err(|_| LmError::Invalid("q, k, v: expected three weights".into()))?;
        let (gu, gate_up) = match cfg.moe.filter(|_| cfg.moe_layers[i]) {
            None => random_stacked(
                gpu,
                &mut bits,
                spec,
                i,
                &[(Role::Gate, cfg.ffn), (Role::Up, cfg.ffn)],
                h,
            )?,
            Some(_) => (Vec::new(), None),
        };
        let mut lin = |role, n, k| random_linear(gpu, &mut bits, spec, role, i, n, k);
        let o = lin(Role::O, h, nh * hd)?;
        let mlp = match cfg.moe.filter(|_| cfg.moe_layers[i]) {
            None => {
                let [gate, up] = <[Linear; 2]>::try_from(gu)
                    .map_err(|_| LmError::Invalid("gate, up: expected two weights".into()))?;
                let mut m = Mlp {
                    gate,
                    up,
                    down: lin(Role::Down, h, cfg.ffn)?,
                    act: cfg.act,
                    gate_up,
                };
                m.fuse_gate_up(gpu)?;
                Ffn::Dense(m)
            }
            Some(moe) => {
                let router = lin(Role::Router, moe.experts, h)?;
                let mut exp =
                    |role, n, k| random_experts(gpu, &mut bits, spec, role, i, [moe.experts, n, k]);
                Ffn::Moe(MoeMlp {
                    router,
                    experts: MoeExperts {
                        gate: exp(Role::Gate, moe.ffn, h)?,
                        up: exp(Role::Up, moe.ffn, h)?,
                        down: exp(Role::Down, h, moe.ffn)?,
                        gate_up: None,
                    }
                    .stack_gate_up(gpu)?,
                    top_k: moe.top_k,
                    norm_topk_prob: moe.norm_topk_prob,
                    act: cfg.act,
                })
            }
        };
        let mut vec = |len| random_vector(gpu, &mut bits, spec, len);
        let sliding = cfg.sliding_layers.get(i).copied().unwrap_or(false);
        let mut attn = Attention {
            q,
            k,
            v,
            o,
            q_bias: None,
            k_bias: None,
            v_bias: None,
            q_norm: if cfg.qk_norm { Some(vec(hd)?) } else { None },
            k_norm: if cfg.qk_norm { Some(vec(hd)?) } else { None },
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            norm_eps: cfg.norm_eps,
            scale: cfg.attn_scale,
            window: if sliding { cfg.sliding_window } else { None },
            qkv: qkv_fused.map(|w| (w, None)),
        };
        attn.prepare(gpu)?;
        layers.push(DecoderLayer {
            attn_norm: vec(h)?,
            attn,
            post_attn_norm: if gemma { Some(vec(h)?) } else { None },
            ffn_norm: vec(h)?,
            mlp,
            post_ffn_norm: if gemma { Some(vec(h)?) } else { None },
            fold: crate::layers::decoder::Folding::DEFAULT,
            eps: cfg.norm_eps,
            rope: usize::from(sliding && cfg.rope_local_base.is_some()),
        });
        // Flush this layer's uploads so their staging memory is freed before the next one.
        gpu.wgpu_queue().submit([]);
        gpu.wait_idle()?;
    }
    let norm = random_vector(gpu, &mut bits, spec, h)?;
    let head = if cfg.tied_embeddings {
        None
    } else {
        Some(random_linear(
            gpu,
            &mut bits,
            spec,
            Role::Head,
            0,
            cfg.vocab,
            h,
        )?)
    };
    let mut ropes = vec![RopeTable::new(gpu, &cfg.rope)?];
    if let Some(base) = cfg.rope_local_base {
        let mut local = cfg.rope;
        local.base = base;
        local.scaling = RopeScaling::None;
        ropes.push(RopeTable::new(gpu, &local)?);
    }
    Ok(Transformer {
        cfg,
        gpu: gpu.clone(),
        embed,
        layers,
        norm,
        head,
        ropes,
    })
}

// ---------------------------------------------------------------------------------------------
// Byte accounting

/// Bytes a `Linear::forward` reads of its weight (everything stored).
pub fn linear_bytes(l: &Linear) -> u64 {
    match l {
        Linear::Ggml(w) => w.gpu_bytes(),
        Linear::Quant(w) => {
            w.packed().byte_len()
                + w.scales().byte_len()
                + w.biases().map_or(0, MlxBuffer::byte_len)
        }
        Linear::Dense(w) => w.byte_len(),
    }
}

/// Bytes of one row of an embedding table (what one token's lookup reads).
pub fn embed_row_bytes(l: &Linear) -> u64 {
    let rows = l.shape()[0].max(1) as u64;
    linear_bytes(l).div_ceil(rows)
}

/// Bytes of a whole expert stack (all experts).
pub fn expert_bytes(w: &ExpertWeight) -> u64 {
    match w {
        ExpertWeight::Mlx(e) => {
            let w = e.weight();
            w.packed().byte_len()
                + w.scales().byte_len()
                + w.biases().map_or(0, MlxBuffer::byte_len)
        }
        ExpertWeight::Ggml(e) => e.shards().iter().map(|s| s.buffer.byte_len()).sum(),
    }
}

fn opt_bytes(b: &Option<MlxBuffer>) -> u64 {
    b.as_ref().map_or(0, MlxBuffer::byte_len)
}

/// Weight bytes one decode step reads, by part.
#[derive(Clone, Debug, Serialize)]
pub struct WeightBytes {
    /// Every layer's projections: attention, dense FFN, and for MoE layers the router plus
    /// the `top_k` experts one token is routed to (`top_k / experts` of each expert stack).
    pub layers: u64,
    /// The routed experts' part of `layers`.
    pub experts_per_token: u64,
    /// Norm weights (all layers and the final norm).
    pub norms: u64,
    pub lm_head: u64,
    pub embed_row: u64,
    /// All weights resident on the GPU (embeddings counted once when tied).
    pub resident: u64,
}

impl WeightBytes {
    pub fn per_token(&self) -> u64 {
        self.layers + self.norms + self.lm_head + self.embed_row
    }
}

pub fn weight_bytes(m: &Transformer) -> WeightBytes {
    let mut layers = 0;
    let mut experts_per_token = 0;
    let mut experts_resident = 0;
    let mut norms = m.norm.byte_len();
    for l in &m.layers {
        let a = &l.attn;
        layers += [&a.q, &a.k, &a.v, &a.o]
            .into_iter()
            .map(linear_bytes)
            .sum::<u64>();
        layers += match &l.mlp {
            Ffn::Dense(m) => [&m.gate, &m.up, &m.down]
                .into_iter()
                .map(linear_bytes)
                .sum::<u64>(),
            Ffn::Moe(m) => {
                let e = &m.experts;
                let all: u64 = [&e.gate, &e.up, &e.down]
                    .into_iter()
                    .map(expert_bytes)
                    .sum();
                let n = e.gate.shape()[0].max(1) as u64;
                // One token at decode reads top_k distinct experts' rows.
                let routed = all * m.top_k as u64 / n;
                experts_per_token += routed;
                experts_resident += all;
                linear_bytes(&m.router) + routed
            }
        };
        norms += l.attn_norm.byte_len()
            + l.ffn_norm.byte_len()
            + opt_bytes(&l.post_attn_norm)
            + opt_bytes(&l.post_ffn_norm)
            + opt_bytes(&a.q_norm)
            + opt_bytes(&a.k_norm)
            + opt_bytes(&a.q_bias)
            + opt_bytes(&a.k_bias)
            + opt_bytes(&a.v_bias);
    }
    let embed = linear_bytes(&m.embed);
    let lm_head = m.head.as_ref().map_or(embed, linear_bytes);
    let resident = layers - experts_per_token
        + experts_resident
        + norms
        + embed
        + m.head.as_ref().map_or(0, linear_bytes);
    WeightBytes {
        layers,
        experts_per_token,
        norms,
        lm_head,
        embed_row: embed_row_bytes(&m.embed),
        resident,
    }
}

/// KV cache bytes the attention of one decode step at position `pos` reads from a cache in
/// `format`: K and V rows of `min(pos + 1, window)` positions per layer, each row as the
/// format stores it (f16: 2 bytes an element; compressed: codes plus scales or norms,
/// [`KvFormat::row_words`]).
pub fn kv_bytes(m: &Transformer, pos: usize, format: KvFormat) -> u64 {
    m.layers
        .iter()
        .map(|l| {
            let keys = l.attn.window.map_or(pos + 1, |w| w.min(pos + 1));
            (2 * l.attn.n_kv_heads * keys * format.row_words(l.attn.head_dim) * 4) as u64
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// What to measure.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// Contexts (positions already in the cache) at which decode is timed, ascending.
    pub contexts: Vec<usize>,
    /// Warm-up decode steps before each timing.
    pub warmup: usize,
    /// Timed decode steps per context (wall clock).
    pub steps: usize,
    /// Profiled decode steps per context (GPU timestamps; median of their sums).
    pub profiled_steps: usize,
    /// Prefill chunk timed for prefill tok/s (0: skip).
    pub prefill_tokens: usize,
    pub prefill_reps: usize,
    /// Time each projection role over all layers (GPU timestamps).
    pub per_linear: bool,
    /// Time the floor of the token's dispatch structure ([`ShapeReport::structure_floor`]).
    pub structure_floor: bool,
    /// Bytes the bandwidth probe reads (MiB).
    pub probe_mib: u64,
    pub seed: u64,
    /// Progress lines on stderr.
    pub verbose: bool,
    /// Positions below this are filled by the model's own prefill of synthetic ids, beyond
    /// it by appends of synthetic K/V rows (decode reads the same bytes either way; the
    /// model's prefill to 4096 positions of an 8B model costs seconds of device time).
    pub model_prefill_max: usize,
    /// How the KV cache stores K and V (f16, or a compressed format).
    pub kv_format: KvFormat,
    /// Keep the fused projections (q|k|v, gate|up) the loaders build; false times the
    /// separate matvecs instead (the before/after of that fusion).
    pub fused: bool,
    /// Which small ops ride in the decode matvecs (`DecoderLayer::fold`); `Folding::NONE`
    /// times them as separate dispatches.
    pub fold: crate::layers::decoder::Folding,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            contexts: vec![128, 4096],
            warmup: 4,
            steps: 32,
            profiled_steps: 5,
            prefill_tokens: 512,
            prefill_reps: 2,
            per_linear: true,
            structure_floor: true,
            probe_mib: 1024,
            seed: 0x5EED,
            verbose: true,
            model_prefill_max: 512,
            kv_format: KvFormat::F16,
            fused: true,
            fold: crate::layers::decoder::Folding::DEFAULT,
        }
    }
}

/// Decode at one context.
#[derive(Clone, Debug, Serialize)]
pub struct ContextRow {
    /// Positions in the cache before the timed steps.
    pub context: usize,
    /// Weights + KV bytes one step reads (KV at the mean position of the timed steps).
    pub bytes_per_token: u64,
    pub kv_bytes: u64,
    pub roofline_tok_s: f64,
    /// Wall clock: record + submit + GPU + id readback, median step.
    pub decode_tok_s: f64,
    pub wall_us_per_token: f64,
    /// Sum of per-dispatch GPU timestamps of one step (median of the profiled steps).
    pub gpu_us_per_token: Option<f64>,
    /// GPU time of one step as it runs in production (one compute pass between two
    /// timestamps, no per-dispatch timing), median of 5 steps.
    pub gpu_pass_us_per_token: Option<f64>,
    /// `decode_tok_s / roofline_tok_s`.
    pub roofline_fraction: f64,
    /// GPU-time tok/s over the roofline (what the kernels alone reach).
    pub gpu_roofline_fraction: Option<f64>,
    /// Steps recorded and submitted back to back, the id fed back on the GPU, one wait at the
    /// end: decode with the host overlapped with the GPU (mean over `steps`).
    pub overlapped_tok_s: f64,
    pub overlapped_roofline_fraction: f64,
    /// CPU time to record one step (forward + argmax), median.
    pub record_us: f64,
    /// CPU time of `Pass::commit` (encoding into wgpu and submitting), median.
    pub submit_us: f64,
    /// The same steps replayed from one recording (`replay::DecodeLoop`), the id read back
    /// after each: wall clock tok/s (median step).
    pub replay_tok_s: f64,
    /// Replayed steps submitted back to back (as `overlapped_tok_s`).
    pub replay_overlapped_tok_s: f64,
    pub replay_overlapped_roofline_fraction: f64,
    /// CPU time to submit one replayed step (position written, cache lengths advanced,
    /// params set, encoded, submitted), median: what replaces `record_us + submit_us`.
    pub replay_us: f64,
    /// Its parts (medians): parameters set and uploaded, steps encoded into a wgpu command
    /// buffer, submitted.
    pub replay_split_us: [f64; 3],
    /// Steps the replay rows recorded again (the attention's plan changed shape).
    pub replay_recorded: usize,
}

/// GPU time of one projection role over all layers.
#[derive(Clone, Debug, Serialize)]
pub struct LinearRow {
    pub role: String,
    pub shape: [usize; 2],
    pub kind: String,
    /// Bytes of one weight.
    pub bytes: u64,
    /// GPU µs of one dispatch (sum over all layers / layers).
    pub gpu_us: f64,
    pub gb_s: f64,
    pub roofline_fraction: f64,
    /// This role's share of one decode step's GPU time (all layers).
    pub share_of_step: Option<f64>,
}

/// GPU time per kernel label within one decode step.
#[derive(Clone, Debug, Serialize)]
pub struct KernelShare {
    pub label: String,
    pub count: usize,
    pub gpu_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Checks {
    pub finite: bool,
    /// Two different ids at the same position give different logits.
    pub input_dependent: bool,
    pub max_abs_logit: f32,
    pub max_abs_logit_diff: f32,
}

/// One shape's results (or why it was not run).
#[derive(Clone, Debug, Serialize)]
pub struct ShapeReport {
    pub shape: String,
    pub format: String,
    /// "ok", or "not yet: ..." / "error: ...".
    pub status: String,
    /// The KV cache format (`f16`, `q8`, `tq3`, ...).
    pub kv_cache: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub weights: Option<WeightBytes>,
    pub load_secs: Option<f64>,
    /// Decode at the first context over its roofline (the headline number).
    pub roofline_fraction: Option<f64>,
    pub contexts: Vec<ContextRow>,
    pub prefill_tokens: usize,
    pub prefill_tok_s: Option<f64>,
    pub dispatches_per_token: Option<usize>,
    pub checks: Option<Checks>,
    pub linears: Vec<LinearRow>,
    /// Kernels by GPU time in one decode step at the first context, largest first.
    pub top_kernels: Vec<KernelShare>,
    /// The floor of this token's dispatch structure at the first context: the GPU time of a
    /// pass of as many dependent dispatches that only read, each weight-reading dispatch
    /// over its bytes and every other one 4 KiB ([`structure_floor`]).
    pub structure_floor: Option<StructureFloor>,
    /// Sum of per-dispatch GPU timestamps of one profiled prefill chunk.
    pub prefill_gpu_us: Option<f64>,
    /// Kernels by GPU time in that prefill chunk, largest first.
    pub prefill_kernels: Vec<KernelShare>,
}

impl ShapeReport {
    fn skipped(spec: &ShapeSpec, kv: KvFormat, status: String) -> Self {
        ShapeReport {
            shape: spec.name.into(),
            format: spec.format_desc.into(),
            status,
            kv_cache: kv.name().into(),
            n_layers: spec.n_layers,
            hidden: spec.hidden,
            vocab: spec.vocab,
            weights: None,
            load_secs: None,
            roofline_fraction: None,
            contexts: Vec::new(),
            prefill_tokens: 0,
            prefill_tok_s: None,
            dispatches_per_token: None,
            checks: None,
            linears: Vec::new(),
            top_kernels: Vec::new(),
            structure_floor: None,
            prefill_gpu_us: None,
            prefill_kernels: Vec::new(),
        }
    }
}

/// The `bench decode` report.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeReport {
    pub adapter: String,
    pub backend: String,
    pub driver: String,
    /// UTC date of the run (YYYY-MM-DD).
    pub date: String,
    pub git_commit: String,
    pub bandwidth: Bandwidth,
    /// How the context before the timed decode steps was filled.
    pub context_fill: String,
    pub shapes: Vec<ShapeReport>,
}

struct StepTime {
    record: f64,
    submit: f64,
    wall: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// One greedy decode step of `id` at `pos`; returns the next id.
fn decode_step(
    m: &Transformer,
    cache: &mut KvStore,
    id: u32,
    pos: usize,
) -> Result<(u32, StepTime)> {
    let t0 = Instant::now();
    let mut pass = m.gpu.begin();
    let logits = m.forward(&mut pass, &[id], pos, cache)?;
    let next = ops::argmax(&mut pass, &logits)?;
    let record = secs(t0);
    let t1 = Instant::now();
    pass.commit()?;
    let submit = secs(t1);
    let id = next
        .to_vec::<u32>(&m.gpu)?
        .first()
        .copied()
        .ok_or_else(|| LmError::Invalid("argmax returned nothing".into()))?;
    Ok((
        id,
        StepTime {
            record,
            submit,
            wall: secs(t0),
        },
    ))
}

/// `n` greedy decode steps recorded and submitted back to back, each embedding the previous
/// step's argmax on the GPU; one wait at the end. Returns seconds. This is decode with the
/// host's record and submit overlapped with the GPU (what pipelining the engine would give).
fn overlapped_decode(
    m: &Transformer,
    cache: &mut KvStore,
    first: u32,
    pos: &mut usize,
    n: usize,
) -> Result<(f64, u32)> {
    let mut ids = MlxBuffer::from_slice(&m.gpu, &[first], &[1])?;
    m.gpu.wait_idle()?;
    let t0 = Instant::now();
    for _ in 0..n {
        let mut pass = m.gpu.begin();
        let logits = m.forward_ids(&mut pass, &ids, *pos, cache)?;
        ids = ops::argmax(&mut pass, &logits)?.reshape(&[1])?;
        pass.commit()?;
        *pos += 1;
    }
    m.gpu.wait_idle()?;
    let t = secs(t0);
    let last = ids.to_vec::<u32>(&m.gpu)?.first().copied().unwrap_or(0);
    Ok((t, last))
}

/// What the replayed rows measured.
struct ReplayTimes {
    /// Median wall clock of a step with its id read back.
    wall: f64,
    /// Seconds of `n` steps submitted back to back.
    overlapped: f64,
    /// Median CPU time of a replayed step's submission, and of its parts.
    host: f64,
    split: [f64; 3],
    recorded: usize,
}

/// `n` greedy steps replayed from one recording (made first, not timed; a step whose plan
/// changed shape is recorded again and counted) with the id read back after each, then `n`
/// submitted back to back; returns the times and the last id.
fn replayed_decode(
    m: &Transformer,
    cache: &mut KvStore,
    first: u32,
    pos: &mut usize,
    n: usize,
) -> Result<(ReplayTimes, u32)> {
    let mut steps = DecodeLoop::new(&m.gpu, true)?;
    steps.ids().write(&m.gpu, &[first])?;
    let tail = |pass: &mut Pass, logits: &MlxBuffer| -> Result<MlxBuffer> {
        Ok(ops::argmax(pass, logits)?.reshape(&[1])?)
    };
    let mut splits = Vec::new();
    let mut step = |cache: &mut KvStore, pos: &mut usize, readback: bool| {
        let at = TokenVars {
            pos: *pos,
            coin: 0.0,
        };
        let t0 = Instant::now();
        let rb = steps.step(m, cache, at, &tail, readback)?;
        let host = secs(t0);
        if readback {
            splits.push(steps.host_split());
        }
        *pos += 1;
        if let Some(rb) = rb {
            rb.wait_bytes()?;
        }
        Ok::<_, LmError>((host, secs(t0)))
    };
    // The recording, then the timed replays.
    step(cache, pos, true)?;
    let (mut walls, mut hosts) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (host, wall) = step(cache, pos, true)?;
        walls.push(wall);
        hosts.push(host);
    }
    m.gpu.wait_idle()?;
    let t0 = Instant::now();
    // Back to back (the host times above are of the steps read back, as `record_us` and
    // `submit_us` are).
    for _ in 0..n {
        step(cache, pos, false)?;
    }
    m.gpu.wait_idle()?;
    let overlapped = secs(t0);
    let last = steps
        .ids()
        .to_vec::<u32>(&m.gpu)?
        .first()
        .copied()
        .unwrap_or(first);
    let part = |i: usize| median(splits.iter().skip(1).map(|s| s[i]).collect());
    Ok((
        ReplayTimes {
            wall: median(walls),
            overlapped,
            host: median(hosts),
            split: [part(0), part(1), part(2)],
            recorded: steps.stats().recorded.saturating_sub(1),
        },
        last,
    ))
}

/// A profiled decode step: per-dispatch timings and the dispatch count.
fn profiled_step(
    m: &Transformer,
    cache: &mut KvStore,
    id: u32,
    pos: usize,
) -> Result<(Vec<mlx_native::KernelTiming>, usize)> {
    let mut pass = m.gpu.begin().with_profiling(true);
    let logits = m.forward(&mut pass, &[id], pos, cache)?;
    ops::argmax(&mut pass, &logits)?;
    let n = pass.len();
    Ok((pass.commit_and_wait()?, n))
}

fn synthetic_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| (splitmix(&mut s) % vocab as u64) as u32)
        .collect()
}

/// Fill the cache from its current length up to `target` positions: the model's own
/// prefill of synthetic ids below `model_max` positions, then appends of synthetic K/V rows
/// to every layer.
fn prefill_to(
    m: &Transformer,
    cache: &mut KvStore,
    pos: &mut usize,
    target: usize,
    model_max: usize,
    seed: u64,
) -> Result<()> {
    let chunk = cache.max_chunk().min(PREFILL_CHUNK);
    while *pos < target.min(model_max) {
        let n = chunk.min(target.min(model_max) - *pos);
        let ids = synthetic_ids(n, m.cfg.vocab, seed ^ *pos as u64);
        let mut pass = m.gpu.begin();
        m.forward(&mut pass, &ids, *pos, cache)?;
        pass.commit()?;
        *pos += n;
    }
    if *pos < target {
        let (kvh, hd) = (m.cfg.n_kv_heads, m.cfg.head_dim);
        let mut bits = Bits::new(seed, 1024);
        let rows = |bits: &mut Bits| -> Result<MlxBuffer> {
            let v: Vec<f32> = (0..chunk * kvh * hd)
                .map(|_| 2.0 * bits.unit() - 1.0)
                .collect();
            Ok(MlxBuffer::from_slice(&m.gpu, &v, &[chunk, kvh, hd])?)
        };
        let (k, v) = (rows(&mut bits)?, rows(&mut bits)?);
        while *pos < target {
            let n = chunk.min(target - *pos);
            let (kn, vn) = (k.view(0, &[n, kvh, hd])?, v.view(0, &[n, kvh, hd])?);
            let mut pass = m.gpu.begin();
            for layer in 0..m.layers.len() {
                cache.append(&mut pass, layer, &kn, &vn, *pos)?;
            }
            pass.commit()?;
            *pos += n;
        }
    }
    m.gpu.wait_idle()?;
    Ok(())
}

fn logits_at(m: &Transformer, cache: &mut KvStore, id: u32, pos: usize) -> Result<Vec<f32>> {
    let mut pass = m.gpu.begin();
    let l = m.forward(&mut pass, &[id], pos, cache)?;
    pass.commit()?;
    Ok(l.to_vec::<f32>(&m.gpu)?)
}

fn check_logits(m: &Transformer, cache: &mut KvStore, pos: usize) -> Result<Checks> {
    let v = m.cfg.vocab as u32;
    let (a, b) = (7 % v, (v / 2 + 3) % v);
    let la = logits_at(m, cache, a, pos)?;
    // Rewind: the same position again with another id.
    let lb = logits_at(m, cache, b, pos)?;
    let finite = la.iter().chain(&lb).all(|x| x.is_finite());
    let max_abs_logit = la.iter().chain(&lb).fold(0f32, |acc, x| acc.max(x.abs()));
    let max_abs_logit_diff = la
        .iter()
        .zip(&lb)
        .fold(0f32, |acc, (x, y)| acc.max((x - y).abs()));
    Ok(Checks {
        finite,
        input_dependent: a != b && max_abs_logit_diff > 1e-6 * max_abs_logit.max(1e-30),
        max_abs_logit,
        max_abs_logit_diff,
    })
}

fn role_weights(m: &Transformer, role: Role) -> Vec<&Linear> {
    match role {
        Role::Embed => vec![&m.embed],
        Role::Head => vec![m.head.as_ref().unwrap_or(&m.embed)],
        _ => m
            .layers
            .iter()
            .filter_map(|l| match (role, &l.mlp) {
                (Role::Router, Ffn::Moe(f)) => Some(&f.router),
                (Role::Router, Ffn::Dense(_)) => None,
                (Role::Q, _) => Some(&l.attn.q),
                (Role::K, _) => Some(&l.attn.k),
                (Role::V, _) => Some(&l.attn.v),
                (Role::O, _) => Some(&l.attn.o),
                (Role::Gate, Ffn::Dense(f)) => Some(&f.gate),
                (Role::Up, Ffn::Dense(f)) => Some(&f.up),
                (_, Ffn::Dense(f)) => Some(&f.down),
                (_, Ffn::Moe(_)) => None,
            })
            .collect(),
    }
}

fn kind_name(l: &Linear) -> String {
    match l {
        Linear::Ggml(w) => w.kind().to_string(),
        Linear::Quant(w) => format!("mlx{}g{} {}", w.bits(), w.group_size(), w.dtype()),
        Linear::Dense(w) => w.dtype().to_string(),
    }
}

/// Each role's matvec over all layers in one profiled pass.
fn time_linears(m: &Transformer, bw: f64, step_us: Option<f64>) -> Result<Vec<LinearRow>> {
    let timer = crate::bench::Timer::new(&m.gpu)?;
    let mut rows = Vec::new();
    for role in Role::LAYER.into_iter().chain([Role::Head]) {
        let ws = role_weights(m, role);
        let Some(first) = ws.first() else { continue };
        let [_, k] = first.shape();
        let x = MlxBuffer::from_slice(
            &m.gpu,
            &(0..k)
                .map(|i| ((i % 7) as f32 - 3.0) / 4.0)
                .collect::<Vec<f32>>(),
            &[1, k],
        )?;
        let ns = timer.median_ns(|pass: &mut Pass| {
            for w in &ws {
                w.forward(pass, &x).map_err(|e| match e {
                    LmError::Mlx(e) => e,
                    other => mlx_native::MlxError::invalid(other.to_string()),
                })?;
            }
            Ok(())
        })?;
        let bytes: u64 = ws.iter().map(|w| linear_bytes(w)).sum();
        let per_us = ns / 1e3 / ws.len() as f64;
        let gb_s = bytes as f64 / ns;
        rows.push(LinearRow {
            role: role.name().into(),
            shape: first.shape(),
            kind: kind_name(first),
            bytes: linear_bytes(first),
            gpu_us: per_us,
            gb_s,
            roofline_fraction: gb_s / bw,
            share_of_step: step_us.map(|s| ns / 1e3 / s),
        });
    }
    Ok(rows)
}

/// Per-kernel GPU time of decode steps (each a list of per-dispatch timings), averaged over
/// the steps, largest first.
pub fn top_kernels(steps: &[Vec<mlx_native::KernelTiming>]) -> Vec<KernelShare> {
    let mut by: HashMap<String, (usize, f64)> = HashMap::new();
    for s in steps {
        for k in s {
            let e = by.entry(k.label.to_string()).or_default();
            e.0 += 1;
            e.1 += k.nanos;
        }
    }
    let n = steps.len().max(1);
    let mut v: Vec<KernelShare> = by
        .into_iter()
        .map(|(label, (c, ns))| KernelShare {
            label,
            count: c / n,
            gpu_us: ns / 1e3 / n as f64,
        })
        .collect();
    v.sort_by(|a, b| b.gpu_us.total_cmp(&a.gpu_us));
    v
}

/// Build and measure one shape with the run's bandwidth `bw`.
pub fn bench_shape(
    gpu: &MlxDevice,
    spec: &ShapeSpec,
    opts: &DecodeOptions,
    bw: &Bandwidth,
) -> Result<ShapeReport> {
    if let Some(why) = spec.not_yet {
        return Ok(ShapeReport::skipped(spec, opts.kv_format, why.into()));
    }
    let profile = gpu.caps().timestamps;
    let t_load = Instant::now();
    let say = |what: &str| {
        if opts.verbose {
            eprintln!("[{:7.2}s] {}: {what}", secs(t_load), spec.name);
        }
    };
    let mut m = build(gpu, spec, opts.seed)?;
    for l in &mut m.layers {
        l.fold = opts.fold;
    }
    if !opts.fused {
        for l in &mut m.layers {
            l.attn.qkv = None;
            if let crate::layers::mlp::Ffn::Dense(f) = &mut l.mlp {
                f.gate_up = None;
            }
        }
    }
    gpu.wait_idle()?;
    let load_secs = secs(t_load);
    say("built");
    let wb = weight_bytes(&m);
    let mut report = ShapeReport::skipped(spec, opts.kv_format, "ok".into());
    report.load_secs = Some(load_secs);

    // Warm-up, timed, overlapped, replayed (one recording, read back, overlapped), profiled,
    // pass-timed and checked steps.
    let per_ctx_steps = opts.warmup + 4 * opts.steps + 1 + opts.profiled_steps + 5 + 2;
    let max_ctx = opts.contexts.iter().copied().max().unwrap_or(0);
    let mut cache = m.new_cache_with(
        max_ctx + opts.contexts.len() * per_ctx_steps + 2,
        opts.kv_format,
    )?;
    let mut pos = 0;
    let mut id = 1 % m.cfg.vocab as u32;
    let mut first_profile = Vec::new();
    for (ci, &ctx) in opts.contexts.iter().enumerate() {
        let target = ctx.max(pos);
        prefill_to(
            &m,
            &mut cache,
            &mut pos,
            target,
            opts.model_prefill_max,
            opts.seed ^ 0xC0,
        )?;
        say(&format!("context {target} filled"));
        let start = pos;
        for _ in 0..opts.warmup {
            id = decode_step(&m, &mut cache, id, pos)?.0;
            pos += 1;
        }
        let mean_pos = pos + opts.steps / 2;
        let mut times = Vec::with_capacity(opts.steps);
        for _ in 0..opts.steps {
            let (next, t) = decode_step(&m, &mut cache, id, pos)?;
            id = next;
            pos += 1;
            times.push(t);
        }
        let (ov_secs, next) = overlapped_decode(&m, &mut cache, id, &mut pos, opts.steps)?;
        id = next;
        let mut gpu_sums = Vec::new();
        let mut profiles = Vec::new();
        let mut dispatches = 0;
        if profile {
            for _ in 0..opts.profiled_steps {
                let (t, n) = profiled_step(&m, &mut cache, id, pos)?;
                pos += 1;
                dispatches = n;
                gpu_sums.push(t.iter().map(|k| k.nanos).sum::<f64>() / 1e3);
                profiles.push(t);
            }
        } else {
            let mut pass = gpu.begin();
            let logits = m.forward(&mut pass, &[id], pos, &mut cache)?;
            ops::argmax(&mut pass, &logits)?;
            dispatches = pass.len();
            pass.commit()?;
            gpu.wait_idle()?;
            pos += 1;
        }
        let mut pass_us = Vec::new();
        for _ in 0..5 {
            let mut pass = gpu.begin().with_pass_timing(true);
            let logits = m.forward(&mut pass, &[id], pos, &mut cache)?;
            ops::argmax(&mut pass, &logits)?;
            pos += 1;
            if let Some(t) = pass.commit_and_wait()?.first() {
                pass_us.push(t.nanos / 1e3);
            }
        }
        let gpu_pass_us = (!pass_us.is_empty()).then(|| median(pass_us));
        // After the GPU timings, which therefore stay at the positions they had before
        // replay was measured.
        let replay = match cache {
            KvStore::Plain(_) => {
                let (r, next) = replayed_decode(&m, &mut cache, id, &mut pos, opts.steps)?;
                id = next;
                Some(r)
            }
            // Compressed caches are not replayed.
            KvStore::Compressed(_) => None,
        };
        if ci == 0 {
            report.dispatches_per_token = Some(dispatches);
            report.checks = Some(check_logits(&m, &mut cache, pos)?);
            first_profile = profiles;
        }
        let kv = kv_bytes(&m, mean_pos, opts.kv_format);
        let bytes = wb.per_token() + kv;
        let roofline = bw.gb_s * 1e9 / bytes as f64;
        let wall = median(times.iter().map(|t| t.wall).collect());
        let gpu_us = (!gpu_sums.is_empty()).then(|| median(gpu_sums));
        let row = ContextRow {
            context: start,
            bytes_per_token: bytes,
            kv_bytes: kv,
            roofline_tok_s: roofline,
            decode_tok_s: 1.0 / wall,
            wall_us_per_token: wall * 1e6,
            gpu_us_per_token: gpu_us,
            gpu_pass_us_per_token: gpu_pass_us,
            roofline_fraction: (1.0 / wall) / roofline,
            gpu_roofline_fraction: gpu_us.map(|u| (1e6 / u) / roofline),
            overlapped_tok_s: opts.steps as f64 / ov_secs,
            overlapped_roofline_fraction: (opts.steps as f64 / ov_secs) / roofline,
            record_us: median(times.iter().map(|t| t.record).collect()) * 1e6,
            submit_us: median(times.iter().map(|t| t.submit).collect()) * 1e6,
            replay_tok_s: replay.as_ref().map_or(0.0, |r| 1.0 / r.wall),
            replay_overlapped_tok_s: replay
                .as_ref()
                .map_or(0.0, |r| opts.steps as f64 / r.overlapped),
            replay_overlapped_roofline_fraction: replay
                .as_ref()
                .map_or(0.0, |r| opts.steps as f64 / r.overlapped / roofline),
            replay_us: replay.as_ref().map_or(0.0, |r| r.host * 1e6),
            replay_split_us: replay
                .as_ref()
                .map_or([0.0; 3], |r| r.split.map(|x| x * 1e6)),
            replay_recorded: replay.as_ref().map_or(0, |r| r.recorded),
        };
        say(&format!(
            "context {start}: {:.1} tok/s, overlapped {:.1} tok/s, gpu {:?} us (profiled), {:?} us (one pass); replayed {:.1} tok/s, overlapped {:.1} tok/s, host {:.0} us a step (params {:.0}, encode {:.0}, submit {:.0})",
            row.decode_tok_s, row.overlapped_tok_s, row.gpu_us_per_token, row.gpu_pass_us_per_token,
            row.replay_tok_s, row.replay_overlapped_tok_s, row.replay_us, row.replay_split_us[0],
            row.replay_split_us[1], row.replay_split_us[2]
        ));
        report.contexts.push(row);
    }
    drop(cache);
    report.roofline_fraction = report.contexts.first().map(|r| r.roofline_fraction);
    report.top_kernels = top_kernels(&first_profile);
    if let (true, true, Some(n), Some(row)) = (
        opts.structure_floor,
        profile,
        report.dispatches_per_token,
        report.contexts.first(),
    ) {
        // A measurement beside the report: where it cannot run (a read larger than one
        // storage binding), the report goes on without it.
        match structure_floor(&m, n, row.kv_bytes, row.roofline_tok_s) {
            Ok(f) => {
                report.structure_floor = Some(f);
                say("structure floor timed");
            }
            Err(e) => say(&format!("no structure floor: {e}")),
        }
    }

    if opts.prefill_tokens > 0 {
        let n = opts.prefill_tokens.min(PREFILL_CHUNK);
        let mut cache = m.new_cache_with(n, opts.kv_format)?;
        let ids = synthetic_ids(n, m.cfg.vocab, opts.seed ^ 0x9F);
        let mut t = Vec::new();
        for r in 0..opts.prefill_reps + 1 {
            let t0 = Instant::now();
            let mut pass = gpu.begin();
            let logits = m.forward(&mut pass, &ids, 0, &mut cache)?;
            pass.commit()?;
            logits.to_vec::<f32>(gpu)?;
            let dt = secs(t0);
            // A slow prefill (seconds per chunk) is timed once: repeats would only cost
            // device time.
            if r > 0 || dt > 2.0 {
                t.push(dt);
            }
            if dt > 2.0 {
                break;
            }
        }
        report.prefill_tokens = n;
        report.prefill_tok_s = Some(n as f64 / median(t));
        say("prefill timed");
        if profile {
            // One more chunk with a timestamp around every dispatch: where prefill goes.
            let mut pass = gpu.begin().with_profiling(true);
            m.forward(&mut pass, &ids, 0, &mut cache)?;
            let timings = pass.commit_and_wait()?;
            report.prefill_gpu_us = Some(timings.iter().map(|k| k.nanos).sum::<f64>() / 1e3);
            report.prefill_kernels = top_kernels(&[timings]);
        }
    }
    if opts.per_linear && profile {
        let step = report.contexts.first().and_then(|r| r.gpu_us_per_token);
        report.linears = time_linears(&m, bw.gb_s, step)?;
        say("linears timed");
    }
    report.weights = Some(wb);
    Ok(report)
}

/// What a token's dispatch structure costs by itself.
#[derive(Clone, Debug, Serialize)]
pub struct StructureFloor {
    /// Dispatches a token takes (the profiled step's count).
    pub dispatches: usize,
    /// Those that read weights or the KV cache, with their bytes, in the estimate.
    pub reading_dispatches: usize,
    /// GPU µs of the floor: each reading dispatch's bytes read by the probe as one of a chain
    /// of dependent dispatches, every other dispatch a 4 KiB read, summed.
    pub gpu_us: f64,
    /// The decode rate at that GPU time over the roofline rate.
    pub roofline_fraction: f64,
    /// Its parts: (bytes a dispatch reads, dispatches of that size, probe µs a dispatch).
    pub parts: Vec<(u64, usize, f64)>,
}

/// Bytes each weight- or cache-reading dispatch of one decode token reads, as decode
/// dispatches them: q|k|v (or q, k, v), the attention (this layer's share of `kv_bytes`),
/// o, gate|up (or gate, up) and down; for a MoE layer the router and the routed experts'
/// gate|up (or gate, up) and down; the LM head. Norms, RoPE, sampling and the like read next to nothing.
fn reading_dispatch_bytes(m: &Transformer, kv_bytes: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let kv_layer = kv_bytes / m.layers.len().max(1) as u64;
    for l in &m.layers {
        let a = &l.attn;
        match &a.qkv {
            Some((w, _)) => out.push(linear_bytes(w)),
            None => out.extend([&a.q, &a.k, &a.v].map(linear_bytes)),
        }
        out.push(kv_layer);
        out.push(linear_bytes(&a.o));
        match &l.mlp {
            Ffn::Dense(f) => {
                match &f.gate_up {
                    Some(w) => out.push(linear_bytes(w)),
                    None => out.extend([&f.gate, &f.up].map(linear_bytes)),
                }
                out.push(linear_bytes(&f.down));
            }
            Ffn::Moe(f) => {
                out.push(linear_bytes(&f.router));
                let e = &f.experts;
                let n = e.gate.shape()[0].max(1) as u64;
                let routed = |w| expert_bytes(w) * f.top_k as u64 / n;
                // Stacked gate|up experts are one dispatch at decode.
                if e.gate_up.is_some() {
                    out.push(routed(&e.gate) + routed(&e.up));
                } else {
                    out.extend([routed(&e.gate), routed(&e.up)]);
                }
                out.push(routed(&e.down));
            }
        }
    }
    out.push(
        m.head
            .as_ref()
            .map_or_else(|| linear_bytes(&m.embed), linear_bytes),
    );
    out
}

/// The floor of a token's dispatch structure (`dispatches` dependent dispatches, their reads
/// from [`reading_dispatch_bytes`]): each distinct byte count timed by the read probe as a
/// chain of dependent dispatches over buffers of that size (`bench::read_in_pass`), then
/// summed over the token's dispatches. How fast decode would be if every kernel read its
/// bytes as fast as a pure read does inside a pass: what is left above it is the kernels'.
fn structure_floor(
    m: &Transformer,
    dispatches: usize,
    kv_bytes: u64,
    roofline_tok_s: f64,
) -> Result<StructureFloor> {
    const SMALL: u64 = 4096;
    let reads = reading_dispatch_bytes(m, kv_bytes);
    let small = dispatches.saturating_sub(reads.len());
    let mut sizes: Vec<u64> = reads.iter().map(|&b| b.max(SMALL) / 16 * 16).collect();
    sizes.extend(std::iter::repeat_n(SMALL, small));
    let mut distinct = sizes.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let max_binding = m.gpu.caps().max_storage_binding;
    if let Some(&b) = distinct.last().filter(|&&b| b > max_binding) {
        return Err(LmError::Invalid(format!(
            "structure floor: a dispatch reads {b} bytes, more than one storage binding \
             ({max_binding})"
        )));
    }
    let timer = crate::bench::Timer::new(&m.gpu)?;
    let mut us = 0.0;
    let mut parts = Vec::new();
    for b in distinct {
        let count = sizes.iter().filter(|&&s| s == b).count();
        // Enough buffers to average over and to exceed L2: up to 32, within ~2 GiB, but at
        // least two (one read after another of the same buffer would hit L2).
        let bufs = count.clamp(4, 32).min(((2u64 << 30) / b).max(2) as usize);
        let per = crate::bench::read_in_pass(&m.gpu, &timer, b, bufs)? / 1e3;
        us += per * count as f64;
        parts.push((b, count, per));
    }
    Ok(StructureFloor {
        dispatches,
        reading_dispatches: reads.len(),
        gpu_us: us,
        roofline_fraction: (1e6 / us) / roofline_tok_s,
        parts,
    })
}

/// The git commit this binary was built from: `MLX_NATIVE_GIT_COMMIT` at build time, else
/// `git rev-parse` now, else "unknown".
pub fn git_commit() -> String {
    if let Some(c) = option_env!("MLX_NATIVE_GIT_COMMIT") {
        return c.to_string();
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Today's UTC date, YYYY-MM-DD.
pub fn utc_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Run `bench decode` on the named shapes (see [`expand_shapes`]). A shape that fails is
/// reported with an "error: ..." status and the others still run. `on_shape` sees the report
/// so far after each shape (to save partial results).
pub fn bench_decode(
    gpu: &MlxDevice,
    shapes: &[&str],
    opts: &DecodeOptions,
    on_shape: &mut dyn FnMut(&DecodeReport),
) -> Result<DecodeReport> {
    let specs = shapes
        .iter()
        .map(|n| shape(n))
        .collect::<Result<Vec<_>>>()?;
    let mut report = DecodeReport {
        adapter: gpu.caps().adapter_name.clone(),
        backend: gpu.caps().backend.clone(),
        driver: gpu.caps().driver.clone(),
        date: utc_date(),
        git_commit: git_commit(),
        bandwidth: read_bandwidth(gpu, opts.probe_mib)?,
        context_fill: format!(
            "model prefill of synthetic ids up to {} positions, synthetic K/V appends beyond",
            opts.model_prefill_max
        ),
        shapes: Vec::new(),
    };
    for spec in &specs {
        let r = match bench_shape(gpu, spec, opts, &report.bandwidth) {
            Ok(r) => r,
            Err(e) => ShapeReport::skipped(spec, opts.kv_format, format!("error: {e}")),
        };
        gpu.pool().trim();
        report.shapes.push(r);
        on_shape(&report);
    }
    Ok(report)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

impl DecodeReport {
    /// The table printed on stdout: per-shape details, then one summary row per shape.
    pub fn table(&self) -> String {
        let mut s = format!(
            "device: {} ({}, {})  date {}  commit {}\nread bandwidth: {:.1} GB/s\n",
            self.adapter,
            self.backend,
            self.driver,
            self.date,
            self.git_commit,
            self.bandwidth.gb_s
        );
        for r in &self.shapes {
            if r.linears.is_empty() && r.top_kernels.is_empty() && r.prefill_kernels.is_empty() {
                continue;
            }
            s.push_str(&format!(
                "\n{} ({}; KV cache {})\n",
                r.shape, r.format, r.kv_cache
            ));
            if !r.linears.is_empty() {
                s.push_str(&format!(
                    "  {:<8} {:<16} {:<14} {:>11} {:>9} {:>8} {:>7} {:>7}\n",
                    "linear", "shape", "kind", "bytes", "us", "GB/s", "roof", "step"
                ));
                for l in &r.linears {
                    s.push_str(&format!(
                        "  {:<8} {:<16} {:<14} {:>11} {:>9.2} {:>8.1} {:>6.1}% {:>6}\n",
                        l.role,
                        format!("{:?}", l.shape),
                        l.kind,
                        l.bytes,
                        l.gpu_us,
                        l.gb_s,
                        100.0 * l.roofline_fraction,
                        l.share_of_step
                            .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
                    ));
                }
            }
            for k in r.top_kernels.iter().take(6) {
                s.push_str(&format!(
                    "  kernel {:<44} x{:<4} {:>9.1} us\n",
                    k.label, k.count, k.gpu_us
                ));
            }
            if let Some(f) = &r.structure_floor {
                s.push_str(&format!(
                    "  structure floor: {} dispatches ({} reading) as pure reads: {:.0} us a token ({:.1}% of the roofline)\n",
                    f.dispatches,
                    f.reading_dispatches,
                    f.gpu_us,
                    100.0 * f.roofline_fraction
                ));
            }
            if let Some(us) = r.prefill_gpu_us {
                s.push_str(&format!(
                    "  prefill of {} tokens: {:.0} us of GPU time (profiled)\n",
                    r.prefill_tokens, us
                ));
            }
            for k in r.prefill_kernels.iter().take(6) {
                s.push_str(&format!(
                    "  prefill {:<43} x{:<4} {:>9.1} us\n",
                    k.label, k.count, k.gpu_us
                ));
            }
        }
        s.push_str(&format!(
            "\n{:<18} {:>5} {:>5} {:>5} {:>8} {:>7} {:>8} {:>8} {:>6} {:>7} {:>6} {:>8} {:>4} {:>6} {:>6} {:>7} {:>7} {:>6} {:>6} {:>5}\n",
            "shape", "kv", "ctx", "MB/t", "roof t/s", "tok/s", "wall us", "gpu us", "roof%", "ovl t/s",
            "ovl%", "pf tok/s", "disp", "rec us", "sub us", "rpl t/s", "rpl ovl", "rpl%", "rpl us",
            "check"
        ));
        for r in &self.shapes {
            if r.contexts.is_empty() {
                s.push_str(&format!("{:<18} {}\n", r.shape, r.status));
                continue;
            }
            let check = r.checks.as_ref().map_or("-", |c| {
                if c.finite && c.input_dependent {
                    "ok"
                } else {
                    "FAIL"
                }
            });
            for (i, c) in r.contexts.iter().enumerate() {
                let first = i == 0;
                s.push_str(&format!(
                    "{:<18} {:>5} {:>5} {:>5.0} {:>8.1} {:>7.1} {:>8.1} {:>8} {:>5.1}% {:>7.1} {:>5.1}% {:>8} {:>4} {:>6.0} {:>6.0} {:>7.1} {:>7.1} {:>5.1}% {:>6.0} {:>5}\n",
                    if first { r.shape.as_str() } else { "" },
                    if first { r.kv_cache.as_str() } else { "" },
                    c.context,
                    c.bytes_per_token as f64 / 1e6,
                    c.roofline_tok_s,
                    c.decode_tok_s,
                    c.wall_us_per_token,
                    opt(c.gpu_us_per_token, 1),
                    100.0 * c.roofline_fraction,
                    c.overlapped_tok_s,
                    100.0 * c.overlapped_roofline_fraction,
                    if first { opt(r.prefill_tok_s, 0) } else { String::new() },
                    match (first, r.dispatches_per_token) {
                        (true, Some(d)) => d.to_string(),
                        _ => String::new(),
                    },
                    c.record_us,
                    c.submit_us,
                    c.replay_tok_s,
                    c.replay_overlapped_tok_s,
                    100.0 * c.replay_overlapped_roofline_fraction,
                    c.replay_us,
                    if first { check } else { "" },
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> MlxDevice {
        MlxDevice::new().unwrap()
    }

    fn tiny_opts() -> DecodeOptions {
        DecodeOptions {
            // The second context passes the tiny Gemma's window of 8.
            contexts: vec![5, 21],
            warmup: 1,
            steps: 2,
            profiled_steps: 1,
            prefill_tokens: 16,
            prefill_reps: 1,
            per_linear: true,
            structure_floor: true,
            probe_mib: 4,
            seed: 11,
            verbose: false,
            // The second context is filled by K/V appends.
            model_prefill_max: 8,
            kv_format: KvFormat::F16,
            fused: true,
            fold: crate::layers::decoder::Folding::DEFAULT,
        }
    }

    #[test]
    fn tiny_shapes_decode_finite_input_dependent_logits() {
        let g = gpu();
        let bw = Bandwidth {
            bytes: 1,
            gpu_us: 1.0,
            gb_s: 1.0,
        };
        for name in TEST_SHAPES {
            let spec = shape(name).unwrap();
            let r = bench_shape(&g, &spec, &tiny_opts(), &bw).unwrap();
            assert_eq!(r.status, "ok", "{name}");
            let c = r.checks.as_ref().unwrap();
            assert!(c.finite, "{name}: {c:?}");
            assert!(c.input_dependent, "{name}: {c:?}");
            assert!(c.max_abs_logit > 0.0, "{name}: {c:?}");
            assert_eq!(r.contexts.len(), 2, "{name}");
            assert_eq!(r.contexts[0].context, 5);
            // The second context starts after the first one's decode steps.
            assert_eq!(r.contexts[1].context, 21);
            for c in &r.contexts {
                assert!(
                    c.decode_tok_s > 0.0 && c.roofline_tok_s > 0.0,
                    "{name}: {c:?}"
                );
                assert!(c.bytes_per_token > r.weights.as_ref().unwrap().per_token());
            }
            // At least q|k|v, RoPE + append, attention, o, gate|up (or the router and
            // experts) and down a layer, however much else is folded.
            assert!(r.dispatches_per_token.unwrap() >= 6 * spec.n_layers);
            assert!(r.prefill_tok_s.unwrap() > 0.0);
        }
    }

    /// The fused projections (q|k|v and gate|up stacked into one weight, MLX-quantized and
    /// GGUF layers) give the logits of the separate ones, at decode (one token) and prefill.
    /// With MLX-quantized stacks, decode also folds the norms, the GLU and the residual adds
    /// into the matvecs (`DecoderLayer::forward_folded`): Llama-style, Gemma 3's post-norms
    /// and an MoE FFN each take a different branch of it.
    #[test]
    fn fused_projections_match_the_separate_ones() {
        use crate::layers::decoder::Folding;
        let g = gpu();
        let foldings = [
            Folding::NONE,
            Folding::DEFAULT,
            Folding::ALL,
            Folding {
                glu: true,
                ..Folding::NONE
            },
            Folding {
                norms: true,
                ..Folding::NONE
            },
            Folding {
                rope_append: true,
                ..Folding::NONE
            },
            // The tiny models' matvecs are small enough for `small_norms`: without it the
            // norms are split across the matvecs (`norm_out`) and gate|up applies the GLU
            // (`glu_out`).
            Folding {
                small_norms: false,
                ..Folding::DEFAULT
            },
        ];
        for name in [
            "tiny-llama-mlx",
            "tiny-gemma-mlx",
            "tiny-qwen3-moe",
            "tiny-gguf",
        ] {
            let mut fused = build(&g, &shape(name).unwrap(), 9).unwrap();
            assert!(fused.layers.iter().any(|l| l.attn.qkv.is_some()), "{name}");
            let mut split = build(&g, &shape(name).unwrap(), 9).unwrap();
            let mut stacked_mlps = 0;
            for l in &mut split.layers {
                l.attn.qkv = None;
                if let crate::layers::mlp::Ffn::Dense(m) = &mut l.mlp {
                    stacked_mlps += usize::from(m.gate_up.take().is_some());
                }
            }
            assert!(stacked_mlps > 0 || name.contains("moe"), "{name}");
            let prompt = [3u32, 17, 5, 11, 2, 40, 8];
            let run = |m: &Transformer| -> Vec<Vec<f32>> {
                let mut cache = m.new_cache(16).unwrap();
                let mut out = vec![logits_at_all(m, &mut cache, &prompt, 0)];
                for (i, id) in [9u32, 4, 30].into_iter().enumerate() {
                    out.push(logits_at(m, &mut cache, id, prompt.len() + i).unwrap());
                }
                out
            };
            let decode_dispatches = |m: &Transformer| {
                let mut cache = m.new_cache(16).unwrap();
                let mut pass = m.gpu.begin();
                m.forward(&mut pass, &[3], 0, &mut cache).unwrap();
                pass.len()
            };
            let b = run(&split);
            let ds = decode_dispatches(&split);
            for fold in foldings {
                for l in &mut fused.layers {
                    l.fold = fold;
                }
                let a = run(&fused);
                // One decode step's dispatches per layer (the tiny models have 2 layers and
                // the same head): with every fold, the Llama-style layer runs q|k|v (norm
                // folded), RoPE + cache append (`rope_append`), attention (2), o
                // (+ residual), gate|up (norm folded) and down (GLU + residual): 7, where the
                // separate projections take 16 (the norm, q, k, v, two RoPEs, the append,
                // attention (2), o, the add + norm, gate, up, the GLU, down and the add).
                let df = decode_dispatches(&fused);
                println!("{name} {fold:?}: decode dispatches {df}, separate {ds}");
                if name == "tiny-llama-mlx" && fold == Folding::ALL {
                    assert_eq!(ds - df, 2 * (16 - 7), "{name}: {df} against {ds}");
                }
                // As many with the norms split across the matvecs and the GLU in gate|up:
                // q|k|v, RoPE + append, attention (2), o, gate|up and down a layer, the first
                // layer's norm, and no final norm (the last down writes the head's input).
                if name == "tiny-llama-mlx" && !fold.small_norms && fold.norm_out {
                    assert_eq!(ds - df, 2 * (16 - 7), "{name}: {df} against {ds}");
                }
                for (step, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(x.len(), y.len());
                    for (i, (p, q)) in x.iter().zip(y).enumerate() {
                        // Same kernels and the same per-row summation order, the norm's
                        // 1/rms applied before or after the sum; qmv quantizes its x to 16
                        // bits per 32-element chunk (ops::qmatmul), the folded and separate
                        // paths at different points (x·w or x·w/rms, act(g)·u or its f32
                        // copy): each within 2^-15 of a chunk's largest element, which two
                        // layers carry to ~1e-4 of a logit. A wrong fold is off by O(1).
                        assert!(
                            (p - q).abs() <= 1e-3 * (1.0 + q.abs()),
                            "{name} {fold:?} step {step} logit {i}: {p} vs {q}"
                        );
                    }
                }
            }
        }
    }

    fn logits_at_all(m: &Transformer, cache: &mut KvStore, ids: &[u32], pos: usize) -> Vec<f32> {
        let mut pass = m.gpu.begin();
        let l = m.forward(&mut pass, ids, pos, cache).unwrap();
        pass.commit().unwrap();
        l.to_vec::<f32>(&m.gpu).unwrap()
    }

    /// After a few steps, a decode step records every dispatch with a cached bind group
    /// (its scratch buffers come back from the pool in the same order): no bind group is
    /// created per token.
    #[test]
    fn steady_decode_creates_no_bind_groups() {
        let g = gpu();
        for name in TEST_SHAPES {
            let m = build(&g, &shape(name).unwrap(), 5).unwrap();
            let mut cache = m.new_cache(64).unwrap();
            let mut created = Vec::new();
            for pos in 0..8 {
                let before = g.bind_groups_created();
                logits_at(&m, &mut cache, 7, pos).unwrap();
                created.push(g.bind_groups_created() - before);
            }
            println!("{name}: bind groups created per step {created:?}");
            assert_eq!(created[4..], [0, 0, 0, 0], "{name}: {created:?}");
        }
    }

    #[test]
    fn forward_ids_matches_the_engine_forward() {
        let g = gpu();
        for name in TEST_SHAPES {
            let m = build(&g, &shape(name).unwrap(), 5).unwrap();
            let mut cache = m.new_cache(32).unwrap();
            let mut pos = 0;
            prefill_to(&m, &mut cache, &mut pos, 12, 10, 1).unwrap();
            let want = logits_at(&m, &mut cache, 42, pos).unwrap();
            let ids = MlxBuffer::from_slice(&g, &[42u32], &[1]).unwrap();
            let mut pass = g.begin();
            let got = m.forward_ids(&mut pass, &ids, pos, &mut cache).unwrap();
            pass.commit().unwrap();
            assert_eq!(got.to_vec::<f32>(&g).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn byte_accounting_matches_the_formats() {
        let g = gpu();
        // GGUF Q5_0 22 B / 32 and Q8_0 34 B / 32 as GGML blocks; Q4_0 and Q4_1 load as MLX
        // 4-bit g32 (16 B of codes, f16 scale and bias: 20 B / 32).
        let spec = shape("tiny-gguf").unwrap();
        let m = build(&g, &spec, 3).unwrap();
        let wb = weight_bytes(&m);
        let b = |n: usize, k: usize, bytes: usize| (n * k / 32 * bytes) as u64;
        let q = b(128, 64, 20);
        let kv = b(64, 64, 20);
        let o = b(64, 128, 20);
        let gu = 2 * b(96, 64, 20);
        let down = b(64, 96, 20);
        let v0 = b(64, 64, 22);
        let want = 2 * (q + kv + o + gu + down) + kv + v0;
        assert_eq!(wb.layers, want);
        assert_eq!(wb.lm_head, b(300, 64, 34));
        assert_eq!(wb.embed_row, 64 / 32 * 34);
        assert_eq!(wb.norms, (2 * 2 * 64 + 64) * 4);
        // KV: 2 layers x (K, V) x 1 head x 64 x f16 per position.
        assert_eq!(kv_bytes(&m, 9, KvFormat::F16), 2 * 2 * 10 * 64 * 2);
        // q8: 32 bytes of codes and 2 of f16 scale per 32 elements (+ word padding: 17 words
        // per 64-element row); tq3: 3 bits an element plus one f32 norm per row.
        assert_eq!(kv_bytes(&m, 9, KvFormat::Q8), 2 * 2 * 10 * 17 * 4);
        assert_eq!(kv_bytes(&m, 9, KvFormat::Tq3), 2 * 2 * 10 * (1 + 6) * 4);

        // MLX 4-bit g64 bf16: K/2 packed bytes + 4 bytes of scale and bias per 64 values.
        let spec = shape("tiny-gemma-mlx").unwrap();
        let m = build(&g, &spec, 4).unwrap();
        let wb = weight_bytes(&m);
        let b = |n: usize, k: usize| (n * k / 2 + n * k / 64 * 4) as u64;
        assert_eq!(
            wb.layers,
            2 * (b(128, 64) + 2 * b(64, 64) + b(64, 128) + 3 * b(128, 64))
        );
        assert_eq!(wb.lm_head, b(320, 64));
        assert_eq!(wb.embed_row, b(1, 64));
        // Layer 0 slides over 8 positions, layer 1 is global.
        assert_eq!(
            kv_bytes(&m, 30, KvFormat::F16),
            (2 * 8 * 64 * 2 + 2 * 31 * 64 * 2) as u64
        );

        // MoE: attention, the 8-bit router (K + 4 bytes of scale and bias per 64), and 2 of
        // the 8 experts of each stack per layer; the whole stacks are resident.
        let spec = shape("tiny-qwen3-moe").unwrap();
        let m = build(&g, &spec, 5).unwrap();
        let wb = weight_bytes(&m);
        let attn = b(128, 64) + 2 * b(64, 64) + b(64, 128);
        let router = (8 * 64 + 8 * 64 / 64 * 4) as u64;
        let expert = 3 * b(64, 64);
        assert_eq!(wb.experts_per_token, 2 * 2 * expert);
        assert_eq!(wb.layers, 2 * (attn + router + 2 * expert));
        assert_eq!(wb.lm_head, b(320, 64));
        assert_eq!(
            wb.resident,
            2 * (attn + router + 8 * expert) + wb.norms + 2 * b(320, 64)
        );
    }

    #[test]
    fn compressed_kv_caches_decode() {
        let g = gpu();
        let bw = Bandwidth {
            bytes: 1,
            gpu_us: 1.0,
            gb_s: 1.0,
        };
        let spec = shape("tiny-gguf").unwrap();
        let mut f16_kv = 0;
        for kv in [KvFormat::F16, KvFormat::Q8, KvFormat::Tq3] {
            let opts = DecodeOptions {
                kv_format: kv,
                per_linear: false,
                prefill_tokens: 0,
                ..tiny_opts()
            };
            let r = bench_shape(&g, &spec, &opts, &bw).unwrap();
            assert_eq!(r.kv_cache, kv.name());
            let c = r.checks.as_ref().unwrap();
            assert!(c.finite && c.input_dependent, "{kv}: {c:?}");
            let row = &r.contexts[1];
            let m_kv = row.kv_bytes;
            if kv == KvFormat::F16 {
                f16_kv = m_kv;
            } else {
                // The same positions at the format's words per row (f16: 32 at head_dim 64).
                let words = kv.row_words(64) as u64;
                assert_eq!(m_kv, f16_kv * words / 32, "{kv}");
            }
        }
    }

    #[test]
    fn shapes_expand_and_unknown_names_are_named() {
        assert_eq!(
            expand_shapes("llama-3.1-8b").unwrap(),
            ["llama-3.1-8b-mlx4", "llama-3.1-8b-q4_0"]
        );
        assert_eq!(expand_shapes("all").unwrap().len(), SHAPES.len());
        for s in SHAPES {
            let spec = shape(s).unwrap();
            spec.config().validate().unwrap();
        }
        let e = expand_shapes("llama-9b").unwrap_err().to_string();
        assert!(
            e.starts_with("bench decode: unknown shape \"llama-9b\""),
            "{e}"
        );
        // Qwen3-30B-A3B (built on the GPU machine only: ~17 GB of weights).
        let q = shape("qwen3-30b-a3b").unwrap();
        assert!(q.not_yet.is_none());
        let c = q.config();
        assert_eq!(c.family, Family::Qwen3Moe);
        assert!(c.qk_norm && !c.tied_embeddings && c.moe_layers.iter().all(|&x| x));
        let moe = c.moe.unwrap();
        assert_eq!((moe.experts, moe.top_k, moe.ffn), (128, 8, 768));
        assert!(moe.norm_topk_prob);
    }

    #[test]
    fn utc_date_is_well_formed() {
        let d = utc_date();
        assert_eq!(d.len(), 10, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}

//! Model hyper-parameters, read from GGUF metadata or an mlx-lm `config.json`, normalized
//! into one `ModelConfig` the architectures share.

use mlx_native::ops::activation::Act;
use mlx_native::ops::{RopeConfig, RopeScaling, RopeStyle};
use mlx_native::weights::gguf::GgufFile;

use crate::error::{LmError, Result};

/// Architecture families this build implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3/3.1, SmolLM/SmolLM2, Mistral.
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Qwen3 (per-head q/k RMS norm).
    Qwen3,
    /// Gemma 3 text (sliding/global layers, four norms per layer, GeGLU).
    Gemma3,
    /// Qwen3-MoE (Qwen3 attention, mixture-of-experts FFN).
    Qwen3Moe,
}

/// The mixture-of-experts FFN of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub ffn: usize,
    pub norm_topk_prob: bool,
}

impl MoeSpec {
    /// Check the numbers against what the routing kernels take.
    pub fn validate(&self) -> Result<()> {
        use mlx_native::ops::moe::{MAX_EXPERTS, MAX_TOP_K};
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return Err(LmError::Unsupported(format!(
                "{} experts; supported: 1 to {MAX_EXPERTS}",
                self.experts
            )));
        }
        if self.top_k == 0 || self.top_k > self.experts.min(MAX_TOP_K) {
            return Err(LmError::Unsupported(format!(
                "{} experts per token of {}; supported: 1 to {}",
                self.top_k,
                self.experts,
                self.experts.min(MAX_TOP_K)
            )));
        }
        if self.ffn == 0 {
            return Err(LmError::Config("expert intermediate size is 0".into()));
        }
        Ok(())
    }
}

/// GGUF `general.architecture` values (and mlx-lm `model_type`s) this build loads.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "qwen3_moe",
    "gemma3",
    "gemma3_text",
];

impl Family {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "qwen3moe" | "qwen3_moe" => Family::Qwen3Moe,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            other => {
                return Err(LmError::Unsupported(format!(
                    "architecture {other:?}; supported: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                )))
            }
        })
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub family: Family,
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub norm_eps: f32,
    /// RoPE of global (full-attention) layers.
    pub rope: RopeConfig,
    /// RoPE base of sliding-window layers, where it differs (Gemma 3: 10,000).
    pub rope_local_base: Option<f32>,
    /// The model's trained context length.
    pub max_context: usize,
    /// Sliding window size and which layers use it.
    pub sliding_window: Option<usize>,
    pub sliding_layers: Vec<bool>,
    pub qk_norm: bool,
    pub act: Act,
    /// Multiplier of the token embeddings (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// Attention logit scale (1/sqrt(head_dim) unless the model says otherwise).
    pub attn_scale: f32,
    pub tied_embeddings: bool,
    /// Mixture-of-experts FFN, when the model has one; `moe_layers` says which layers use
    /// it.
    pub moe: Option<MoeSpec>,
    /// Per layer: true where the FFN is the mixture of experts, false where it is the dense
    /// gated MLP of size `ffn` (Qwen3-MoE's `mlp_only_layers` / `decoder_sparse_step`).
    pub moe_layers: Vec<bool>,
}

impl ModelConfig {
    /// Read the hyper-parameters of a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.get_str("general.architecture")?.to_string();
        let family = Family::from_name(&arch)?;
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| -> Result<usize> { Ok(f.get::<u64>(&key(k))? as usize) };
        let u_opt = |k: &str| -> Result<Option<usize>> {
            Ok(f.get_opt::<u64>(&key(k))?.map(|v| v as usize))
        };
        let hidden = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        if n_heads == 0 || hidden == 0 {
            return Err(LmError::Config(format!(
                "{}: head_count or embedding_length is 0",
                f.name()
            )));
        }
        let n_kv_heads = u_opt("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = u_opt("attention.key_length")?.unwrap_or(hidden / n_heads);
        let n_layers = u("block_count")?;
        let vocab = match u_opt("vocab_size")? {
            Some(v) => v,
            None => f
                .get_array("tokenizer.ggml.tokens")
                .map(|a| a.len())
                .map_err(|_| {
                    LmError::Config(format!(
                        "{}: no vocab_size and no tokenizer.ggml.tokens",
                        f.name()
                    ))
                })?,
        };
        let base = f
            .get_opt::<f32>(&key("rope.freq_base"))?
            .unwrap_or(10_000.0);
        let rotary_dims = u_opt("rope.dimension_count")?.unwrap_or(head_dim);
        // llama.cpp rotates adjacent pairs for llama (its GGUF q/k rows are permuted for
        // that) and halves (NEOX) for the others.
        let style = match family {
            Family::Llama => RopeStyle::Traditional,
            _ => RopeStyle::Neox,
        };
        let scaling = match f.get_opt::<&str>(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: f.get::<f32>(&key("rope.scaling.factor"))?,
            },
            Some(other) => {
                return Err(LmError::Unsupported(format!(
                    "{}: {} = {other:?}; supported: none, linear",
                    f.name(),
                    key("rope.scaling.type")
                )))
            }
        };
        if f.tensor("rope_freqs.weight").is_some() {
            return Err(LmError::Unsupported(format!(
                "{}: rope_freqs.weight (llama3-style frequency factors in a tensor) is not implemented",
                f.name()
            )));
        }
        let rope = RopeConfig {
            head_dim,
            rotary_dims,
            base,
            style,
            scaling,
        };
        let sliding_window = u_opt("attention.sliding_window")?;
        let (sliding_layers, rope_local_base, embed_scale, act) = match family {
            Family::Gemma3 => {
                // The GGUF has no layer pattern: llama.cpp takes every 6th layer as global.
                let pattern = (0..n_layers).map(|i| (i + 1) % 6 != 0).collect();
                (
                    pattern,
                    Some(10_000.0),
                    Some((hidden as f32).sqrt()),
                    Act::GeluTanh,
                )
            }
            _ => (vec![false; n_layers], None, None, Act::Silu),
        };
        let ffn = u("feed_forward_length")?;
        // llama.cpp's gemma3 hparams: queries scale by 1/sqrt(query_pre_attn_scalar), which is
        // head_dim except for the 27B (62 layers), where it is hidden / n_heads.
        let attn_scale = match family {
            Family::Gemma3 if n_layers == 62 => 1.0 / ((hidden / n_heads) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let moe = match u_opt("expert_count")? {
            Some(experts) if experts > 0 => Some(MoeSpec {
                experts,
                top_k: u("expert_used_count")?,
                ffn: u_opt("expert_feed_forward_length")?.unwrap_or(ffn),
                // llama.cpp renormalizes the top-k weights of qwen3moe.
                norm_topk_prob: true,
            }),
            _ => None,
        };
        if f.get_opt::<f32>(&key("final_logit_softcapping"))?
            .is_some_and(|c| c != 0.0)
        {
            return Err(LmError::Unsupported(format!(
                "{}: {} (final logit softcapping) is not implemented",
                f.name(),
                key("final_logit_softcapping")
            )));
        }
        Ok(ModelConfig {
            family,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn,
            vocab,
            norm_eps: f
                .get_opt::<f32>(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope,
            rope_local_base,
            max_context: u_opt("context_length")?.unwrap_or(4096),
            sliding_window: if family == Family::Gemma3 {
                sliding_window
            } else {
                None
            },
            sliding_layers,
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3),
            act,
            embed_scale,
            attn_scale,
            tied_embeddings: f.tensor("output.weight").is_none(),
            moe_layers: vec![moe.is_some(); n_layers],
            moe,
            arch,
        })
    }

    /// Check that the shape numbers fit together.
    pub fn validate(&self) -> Result<()> {
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(LmError::Config(format!(
                "{} attention heads do not divide into {} kv heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.n_layers == 0 || self.vocab == 0 || self.head_dim == 0 {
            return Err(LmError::Config(
                "n_layers, vocab and head_dim must be nonzero".into(),
            ));
        }
        if self.moe_layers.len() != self.n_layers {
            return Err(LmError::Config(format!(
                "{} MoE layer flags for {} layers",
                self.moe_layers.len(),
                self.n_layers
            )));
        }
        if let Some(m) = &self.moe {
            m.validate()?;
        } else if self.moe_layers.iter().any(|&b| b) {
            return Err(LmError::Config(
                "MoE layers without a mixture-of-experts spec".into(),
            ));
        }
        self.rope.validate()?;
        Ok(())
    }
}

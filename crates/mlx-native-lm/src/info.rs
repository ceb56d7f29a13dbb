//! `describe(path)`: what a model file or folder holds, without touching the GPU: format,
//! architecture, hyper-parameters, tensor count, quantization types with their byte totals,
//! tokenizer kind. Serializable for `mlx-native info --json`.

use std::collections::BTreeMap;
use std::path::Path;

use mlx_native::ops::{RopeScaling, RopeStyle};
use mlx_native::weights::gguf::GgufFile;
use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::models::mlx::MlxFolder;
use crate::models::{model_format, ModelFormat};

/// Tensors of one storage type and how many bytes they take.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct QuantSummary {
    /// `Q4_K`, `F32` (GGUF); `affine 4-bit g64`, `mxfp4`, `bf16` (mlx-lm).
    pub kind: String,
    /// Tensors (GGUF) or modules (mlx-lm quantized linears: weight, scales and biases).
    pub tensors: usize,
    pub bytes: u64,
}

/// The shape of the network.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HyperParams {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub norm_eps: f32,
    pub rope_base: f32,
    pub rope_style: String,
    pub rope_scaling: String,
    pub rope_local_base: Option<f32>,
    pub max_context: usize,
    pub sliding_window: Option<usize>,
    pub sliding_layers: usize,
    pub tied_embeddings: bool,
    /// Mixture of experts: experts per MoE layer, experts per token, each expert's
    /// intermediate size, and how many layers are MoE (`None` / 0 for dense models).
    pub experts: Option<usize>,
    pub experts_per_token: Option<usize>,
    pub expert_ffn: Option<usize>,
    pub moe_layers: usize,
}

/// A summary of a model file or folder.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelInfo {
    pub path: String,
    /// `gguf` or `mlx`.
    pub format: String,
    /// GGUF `general.architecture` / mlx-lm `model_type`.
    pub architecture: String,
    pub hyper: HyperParams,
    pub tensor_count: usize,
    pub total_bytes: u64,
    /// By kind, largest first.
    pub quant: Vec<QuantSummary>,
    /// `gguf:<tokenizer.ggml.model>`, `tokenizer.json:<model type>` or `none`.
    pub tokenizer: String,
    /// Whether a chat template is present.
    pub chat_template: bool,
}

fn hyper(c: &ModelConfig) -> HyperParams {
    HyperParams {
        layers: c.n_layers,
        hidden: c.hidden,
        heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        ffn: c.ffn,
        vocab: c.vocab,
        norm_eps: c.norm_eps,
        rope_base: c.rope.base,
        rope_style: match c.rope.style {
            RopeStyle::Traditional => "traditional",
            RopeStyle::Neox => "neox",
        }
        .into(),
        rope_scaling: match c.rope.scaling {
            RopeScaling::None => "none".into(),
            RopeScaling::Linear { factor } => format!("linear x{factor}"),
            RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
            RopeScaling::Yarn { factor, .. } => format!("yarn x{factor}"),
        },
        rope_local_base: c.rope_local_base,
        max_context: c.max_context,
        sliding_window: c.sliding_window,
        sliding_layers: c.sliding_layers.iter().filter(|s| **s).count(),
        tied_embeddings: c.tied_embeddings,
        experts: c.moe.map(|m| m.experts),
        experts_per_token: c.moe.map(|m| m.top_k),
        expert_ffn: c.moe.map(|m| m.ffn),
        moe_layers: c.moe_layers.iter().filter(|m| **m).count(),
    }
}

fn summarize(kinds: BTreeMap<String, (usize, u64)>) -> Vec<QuantSummary> {
    let mut v: Vec<QuantSummary> = kinds
        .into_iter()
        .map(|(kind, (tensors, bytes))| QuantSummary {
            kind,
            tensors,
            bytes,
        })
        .collect();
    v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.kind.cmp(&b.kind)));
    v
}

/// Describe the GGUF file or mlx-lm folder at `path`.
pub fn describe(path: impl AsRef<Path>) -> Result<ModelInfo> {
    let path = path.as_ref();
    match model_format(path)? {
        ModelFormat::Gguf => describe_gguf(path),
        ModelFormat::MlxFolder(dir) => describe_mlx(&dir),
    }
}

fn describe_gguf(path: &Path) -> Result<ModelInfo> {
    let f = GgufFile::open(path)?;
    let cfg = ModelConfig::from_gguf(&f)?;
    let mut kinds: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in f.tensors() {
        let e = kinds.entry(t.kind.to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes() as u64;
    }
    let total_bytes = f.tensors().iter().map(|t| t.n_bytes() as u64).sum();
    let tokenizer = match f.get_opt::<&str>("tokenizer.ggml.model")? {
        Some(m) => format!("gguf:{m}"),
        None => "none".into(),
    };
    Ok(ModelInfo {
        path: path.display().to_string(),
        format: "gguf".into(),
        architecture: cfg.arch.clone(),
        hyper: hyper(&cfg),
        tensor_count: f.tensors().len(),
        total_bytes,
        quant: summarize(kinds),
        tokenizer,
        chat_template: f.value("tokenizer.chat_template").is_some(),
    })
}

fn describe_mlx(dir: &Path) -> Result<ModelInfo> {
    let folder = MlxFolder::open(dir)?;
    let w = &folder.weights;
    let q = &folder.config.quantization;
    let mut kinds: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let size = |n: &str| w.tensor(n).map_or(0, |t| t.n_bytes() as u64);
    let mut counted = std::collections::BTreeSet::new();
    for name in w.names() {
        if counted.contains(name) {
            continue;
        }
        let module = name.strip_suffix(".weight").filter(|m| w.is_quantized(m));
        let (kind, bytes) = match module.map(|m| (m, q.for_module(m))) {
            Some((m, Some(p))) => {
                let parts = [
                    format!("{m}.weight"),
                    format!("{m}.scales"),
                    format!("{m}.biases"),
                ];
                let bytes = parts.iter().map(|p| size(p)).sum();
                counted.extend(parts);
                let kind = match p.mode {
                    mlx_native::weights::quant::QuantMode::Mxfp4 => "mxfp4".to_string(),
                    _ => format!("{} {}-bit g{}", p.mode, p.bits, p.group_size),
                };
                (kind, bytes)
            }
            _ => {
                if name.ends_with(".scales") || name.ends_with(".biases") {
                    // Counted with their module (or reported under their dtype below when
                    // the module is not).
                    let m = name.rsplit_once('.').map_or(name, |(m, _)| m);
                    if q.for_module(m).is_some() && w.tensor(&format!("{m}.weight")).is_some() {
                        continue;
                    }
                }
                let dt = w
                    .tensor(name)
                    .map_or("?".to_string(), |t| t.dtype.to_string());
                (dt, size(name))
            }
        };
        let e = kinds.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    let total_bytes = w.names().map(size).sum();
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        let kind = std::fs::read_to_string(&tok_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model")?.get("type")?.as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        format!("tokenizer.json:{kind}")
    } else {
        "none".into()
    };
    let chat_template = folder.chat_template()?.is_some();
    let cfg = &folder.config.model;
    let mut hp = hyper(cfg);
    hp.tied_embeddings = folder.config.tie_word_embeddings.unwrap_or_else(|| {
        w.tensor(&format!("{}.weight", folder.config.layout.lm_head))
            .is_none()
    });
    Ok(ModelInfo {
        path: dir.display().to_string(),
        format: "mlx".into(),
        architecture: cfg.arch.clone(),
        hyper: hp,
        tensor_count: w.len(),
        total_bytes,
        quant: summarize(kinds),
        tokenizer,
        chat_template,
    })
}

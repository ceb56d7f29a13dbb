//! Hyper-parameters of an mlx-lm model folder (`config.json`, Hugging Face keys) and its
//! quantization table, with mlx-lm's defaults per `model_type`.
//!
//! mlx-lm folders hold the HF weight layout: RoPE rotates halves (`Neox`) unless the config
//! says `rope_traditional`, and Gemma norm weights hold `w` (the loader adds the 1).
//! Gemma 3 follows mlx-lm's `gemma3_text`: the embedding scale is `sqrt(hidden)` rounded to
//! bf16, attention scales by `query_pre_attn_scalar^-0.5`, sliding layers use
//! `rope_local_base_freq` without scaling.
//! Qwen3-MoE follows mlx-lm's `qwen3_moe` (sparse layers, router, experts), except that a
//! `rope_scaling` entry is applied as for `qwen3` (its Hugging Face meaning), where mlx-lm's
//! `qwen3_moe` ignores it.

use std::collections::BTreeMap;
use std::path::Path;

use mlx_native::ops::activation::Act;
use mlx_native::ops::{RopeConfig, RopeScaling, RopeStyle};
use mlx_native::weights::quant::{QuantMode, QuantParams};
use serde_json::{Map, Value};

use crate::config::{Family, ModelConfig, MoeSpec, SUPPORTED_ARCHITECTURES};
use crate::error::{LmError, Result};

/// Reads keys of one JSON object, with errors naming the file and key.
struct Keys<'a> {
    file: &'a str,
    /// Key prefix shown in errors (`text_config.`).
    prefix: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn missing(&self, k: &str) -> LmError {
        LmError::Config(format!("{}: missing key {}{k}", self.file, self.prefix))
    }

    fn bad(&self, k: &str, v: &Value, want: &str) -> LmError {
        LmError::Config(format!(
            "{}: {}{k} = {v}, expected {want}",
            self.file, self.prefix
        ))
    }

    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.bad(k, v, "a non-negative integer")),
        }
    }

    fn usize(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?.ok_or_else(|| self.missing(k))
    }

    fn f32_opt(&self, k: &str) -> Result<Option<f32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.bad(k, v, "a number")),
        }
    }

    fn f32(&self, k: &str) -> Result<f32> {
        self.f32_opt(k)?.ok_or_else(|| self.missing(k))
    }

    fn bool_opt(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(k, v, "true or false")),
        }
    }

    fn str_opt(&self, k: &str) -> Result<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(k, v, "a string")),
        }
    }
}

/// Quantization of an mlx-lm folder: the default `{group_size, bits, mode}` and per-module
/// overrides (a module path with its own parameters, or `false` for a module left dense).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MlxQuantization {
    pub default: Option<QuantParams>,
    pub overrides: BTreeMap<String, Option<QuantParams>>,
}

impl MlxQuantization {
    /// The parameters of the module at `path` (`model.layers.0.mlp.down_proj`); `None` when
    /// the module is not quantized.
    pub fn for_module(&self, path: &str) -> Option<QuantParams> {
        match self.overrides.get(path) {
            Some(p) => *p,
            None => self.default,
        }
    }

    /// Parse `config.json`'s `quantization` (or, failing that, `quantization_config`) map.
    pub fn from_config(file: &str, cfg: &Value) -> Result<Self> {
        let (key, q) = match (cfg.get("quantization"), cfg.get("quantization_config")) {
            (Some(q), _) if !q.is_null() => ("quantization", q),
            (_, Some(q)) if !q.is_null() => ("quantization_config", q),
            _ => return Ok(MlxQuantization::default()),
        };
        let obj = q
            .as_object()
            .ok_or_else(|| LmError::Config(format!("{file}: {key} = {q}, expected an object")))?;
        if let Some(m) = obj.get("quant_method").and_then(Value::as_str) {
            if !obj.contains_key("bits") && m != "mxfp4" {
                return Err(LmError::Unsupported(format!(
                    "{file}: {key}.quant_method = {m:?}; supported: MLX quantization (group_size, bits, mode affine or mxfp4)"
                )));
            }
            if m == "mxfp4" && !obj.contains_key("bits") {
                return Ok(MlxQuantization {
                    default: Some(QuantParams::mxfp4()),
                    overrides: BTreeMap::new(),
                });
            }
        }
        let default = params_of(file, key, obj, None)?;
        let mut overrides = BTreeMap::new();
        for (k, v) in obj {
            match v {
                Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                Value::Object(o) => {
                    let p = params_of(file, &format!("{key}.{k}"), o, Some(default))?;
                    overrides.insert(k.clone(), Some(p));
                }
                _ => {}
            }
        }
        Ok(MlxQuantization {
            default: Some(default),
            overrides,
        })
    }
}

fn params_of(
    file: &str,
    key: &str,
    o: &Map<String, Value>,
    inherit: Option<QuantParams>,
) -> Result<QuantParams> {
    let k = Keys {
        file,
        prefix: "",
        obj: o,
    };
    let full = |name: &str| format!("{key}.{name}");
    let mode = match k.str_opt("mode")? {
        None => inherit.map_or(QuantMode::Affine, |p| p.mode),
        Some("affine") => QuantMode::Affine,
        Some("mxfp4") => QuantMode::Mxfp4,
        Some(other) => {
            return Err(LmError::Unsupported(format!(
                "{file}: {} = {other:?}; supported modes: affine, mxfp4",
                full("mode")
            )))
        }
    };
    let num = |name: &str, fallback: Option<u32>| -> Result<u32> {
        match o.get(name) {
            None => fallback
                .ok_or_else(|| LmError::Config(format!("{file}: missing key {}", full(name)))),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    LmError::Config(format!(
                        "{file}: {} = {v}, expected a positive integer",
                        full(name)
                    ))
                }),
        }
    };
    let (bits0, gs0) = match (mode, inherit) {
        (QuantMode::Mxfp4, _) => (Some(4), Some(32)),
        (_, Some(p)) => (Some(p.bits), Some(p.group_size)),
        _ => (None, Some(64)),
    };
    let p = QuantParams {
        bits: num("bits", bits0)?,
        group_size: num("group_size", gs0)?,
        mode,
    };
    p.validate().map_err(|e| {
        let msg = e.to_string();
        let msg = msg
            .strip_prefix("unsupported: ")
            .unwrap_or(&msg)
            .to_string();
        LmError::Unsupported(format!("{file}: {key}: {msg}"))
    })?;
    Ok(p)
}

/// Where the weights of the text model sit in the folder's tensor names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlxLayout {
    /// Prefix of `embed_tokens`, `layers.N`, `norm` (`model.` or `language_model.model.`).
    pub model: String,
    /// Name of the output projection module (`lm_head` or `language_model.lm_head`).
    pub lm_head: String,
}

/// What `config.json` says beyond `ModelConfig`.
#[derive(Clone, Debug)]
pub struct MlxConfig {
    pub model: ModelConfig,
    pub quantization: MlxQuantization,
    pub layout: MlxLayout,
    /// `tie_word_embeddings` as the config (or mlx-lm's default) states it; `None` where
    /// mlx-lm decides by the presence of `lm_head.weight` (Gemma 3).
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The raw `config.json`.
    pub raw: Value,
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

fn rope_scaling(k: &Keys<'_>, key: &str) -> Result<RopeScaling> {
    let Some(v) = k.get(key) else {
        return Ok(RopeScaling::None);
    };
    let obj = v
        .as_object()
        .ok_or_else(|| k.bad(key, v, "an object or null"))?;
    let prefix = format!("{}{key}.", k.prefix);
    let s = Keys {
        file: k.file,
        prefix: &prefix,
        obj,
    };
    let (tkey, ty) = match (s.str_opt("type")?, s.str_opt("rope_type")?) {
        (Some(t), _) => ("type", t),
        (None, Some(t)) => ("rope_type", t),
        (None, None) => ("rope_type", "default"),
    };
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: s.f32("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: s.f32("factor")?,
            low_freq_factor: s.f32_opt("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: s.f32_opt("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: s
                .usize_opt("original_max_position_embeddings")?
                .unwrap_or(8192),
        },
        "yarn" => RopeScaling::Yarn {
            factor: s.f32("factor")?,
            original_max_position_embeddings: s
                .usize_opt("original_max_position_embeddings")?
                .unwrap_or(4096),
            beta_fast: s.f32_opt("beta_fast")?.unwrap_or(32.0),
            beta_slow: s.f32_opt("beta_slow")?.unwrap_or(1.0),
            mscale: s.f32_opt("mscale")?.unwrap_or(1.0),
            mscale_all_dim: s.f32_opt("mscale_all_dim")?.unwrap_or(0.0),
            attention_factor: s.f32_opt("attention_factor")?,
        },
        other => {
            return Err(LmError::Unsupported(format!(
                "{}: {prefix}{tkey} = {other:?}; supported RoPE types: default, linear, llama3, yarn",
                k.file
            )));
        }
    })
}

/// The mixture of experts of mlx-lm's `qwen3_moe` (`Qwen3MoeSparseMoeBlock`): layer `i` is
/// sparse when `num_experts > 0`, `i` is not in `mlp_only_layers` and
/// `(i + 1) % decoder_sparse_step == 0`; the other layers use the dense MLP of
/// `intermediate_size`. Absent optional keys take Hugging Face's `Qwen3MoeConfig` defaults
/// (`decoder_sparse_step` 1, `mlp_only_layers` [], `norm_topk_prob` false). Qwen3-MoE has no
/// shared expert: a positive `shared_expert_intermediate_size` is refused.
fn qwen3_moe(k: &Keys<'_>, n_layers: usize) -> Result<(Option<MoeSpec>, Vec<bool>)> {
    let unsupported = |key: &str, v: &Value, why: &str| {
        LmError::Unsupported(format!("{}: {}{key} = {v}: {why}", k.file, k.prefix))
    };
    let experts = k.usize("num_experts")?;
    let top_k = k.usize("num_experts_per_tok")?;
    let ffn = k.usize("moe_intermediate_size")?;
    let norm_topk_prob = k.bool_opt("norm_topk_prob")?.unwrap_or(false);
    let step = k.usize_opt("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(k.bad("decoder_sparse_step", &Value::from(0), "a positive integer"));
    }
    let mut dense = vec![false; n_layers];
    match k.get("mlp_only_layers") {
        None => {}
        Some(Value::Array(a)) => {
            for v in a {
                match v.as_u64().and_then(|i| usize::try_from(i).ok()) {
                    Some(i) if i < n_layers => dense[i] = true,
                    _ => {
                        return Err(k.bad(
                            "mlp_only_layers",
                            v,
                            &format!("layer indices below num_hidden_layers ({n_layers})"),
                        ))
                    }
                }
            }
        }
        Some(other) => return Err(k.bad("mlp_only_layers", other, "a list of layer indices")),
    }
    if let Some(v) = k.get("shared_expert_intermediate_size") {
        if v.as_u64() != Some(0) {
            return Err(unsupported(
                "shared_expert_intermediate_size",
                v,
                "qwen3_moe has no shared expert",
            ));
        }
    }
    if experts == 0 {
        return Ok((None, vec![false; n_layers]));
    }
    use mlx_native::ops::moe::{MAX_EXPERTS, MAX_TOP_K};
    if experts > MAX_EXPERTS {
        return Err(unsupported(
            "num_experts",
            &Value::from(experts),
            &format!("supported: up to {MAX_EXPERTS}"),
        ));
    }
    if top_k == 0 || top_k > experts.min(MAX_TOP_K) {
        return Err(unsupported(
            "num_experts_per_tok",
            &Value::from(top_k),
            &format!(
                "supported: 1 to {} with num_experts = {experts}",
                experts.min(MAX_TOP_K)
            ),
        ));
    }
    if ffn == 0 {
        return Err(k.bad(
            "moe_intermediate_size",
            &Value::from(0),
            "a positive integer",
        ));
    }
    let layers = (0..n_layers)
        .map(|i| !dense[i] && (i + 1) % step == 0)
        .collect();
    Ok((
        Some(MoeSpec {
            experts,
            top_k,
            ffn,
            norm_topk_prob,
        }),
        layers,
    ))
}

impl ModelConfig {
    /// Read `config.json` of an mlx-lm model folder.
    pub fn from_mlx_folder(dir: &Path) -> Result<Self> {
        Ok(MlxConfig::from_folder(dir)?.model)
    }

    /// Hyper-parameters from a parsed HF/mlx-lm `config.json`; `file` appears in errors.
    pub fn from_hf_config(file: &str, cfg: &Value) -> Result<Self> {
        Ok(MlxConfig::from_json(file, cfg)?.model)
    }
}

impl MlxConfig {
    /// Read and interpret `<dir>/config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let shown = path.display().to_string();
        if !dir.is_dir() {
            return Err(LmError::Config(format!(
                "{}: not a directory",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            LmError::Config(format!(
                "{}: not an mlx-lm model folder: {shown}: {e}",
                dir.display()
            ))
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LmError::Config(format!("{shown}: invalid JSON: {e}")))?;
        Self::from_json(&shown, &v)
    }

    /// Interpret a parsed `config.json`; `file` appears in errors.
    pub fn from_json(file: &str, cfg: &Value) -> Result<Self> {
        let top = cfg
            .as_object()
            .ok_or_else(|| LmError::Config(format!("{file}: expected a JSON object")))?;
        let top_keys = Keys {
            file,
            prefix: "",
            obj: top,
        };
        let model_type = top_keys
            .str_opt("model_type")?
            .ok_or_else(|| top_keys.missing("model_type"))?;
        let supported = || {
            LmError::Unsupported(format!(
                "{file}: model_type {model_type:?}; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ))
        };
        let family = Family::from_name(model_type).map_err(|_| supported())?;
        // `gemma3` (multimodal) nests the text model in `text_config`.
        let (k, layout) = if model_type == "gemma3" {
            let tc = top
                .get("text_config")
                .and_then(Value::as_object)
                .ok_or_else(|| top_keys.missing("text_config"))?;
            (
                Keys {
                    file,
                    prefix: "text_config.",
                    obj: tc,
                },
                MlxLayout {
                    model: "language_model.model.".into(),
                    lm_head: "language_model.lm_head".into(),
                },
            )
        } else {
            (
                Keys {
                    file,
                    prefix: "",
                    obj: top,
                },
                MlxLayout {
                    model: "model.".into(),
                    lm_head: "lm_head".into(),
                },
            )
        };
        let gemma = family == Family::Gemma3;
        let g = |key: &str, default: usize| -> Result<usize> {
            if gemma {
                Ok(k.usize_opt(key)?.unwrap_or(default))
            } else {
                k.usize(key)
            }
        };
        let hidden = g("hidden_size", 1152)?;
        let n_layers = g("num_hidden_layers", 26)?;
        let ffn = g("intermediate_size", 6912)?;
        let n_heads = if model_type == "gemma3" {
            k.usize_opt("num_attention_heads")?.unwrap_or(8)
        } else {
            g("num_attention_heads", 4)?
        };
        let n_kv_heads = match (k.usize_opt("num_key_value_heads")?, model_type) {
            (Some(n), _) => n,
            (None, "gemma3") => 4,
            (None, "gemma3_text") => 1,
            (None, "qwen2" | "qwen3" | "qwen3_moe") => return Err(k.missing("num_key_value_heads")),
            (None, _) => n_heads,
        };
        if n_heads == 0 || hidden == 0 {
            return Err(LmError::Config(format!(
                "{file}: num_attention_heads or hidden_size is 0"
            )));
        }
        let head_dim = match (k.usize_opt("head_dim")?, family) {
            (Some(d), _) => d,
            (None, Family::Gemma3) => 256,
            (None, Family::Qwen3 | Family::Qwen3Moe) => return Err(k.missing("head_dim")),
            (None, _) => hidden / n_heads,
        };
        // `gemma3`'s top-level vocab_size overrides text_config's (mlx-lm's gemma3.ModelArgs).
        let vocab = if model_type == "gemma3" {
            top_keys.usize_opt("vocab_size")?.unwrap_or(262_208)
        } else if gemma {
            k.usize_opt("vocab_size")?.unwrap_or(262_144)
        } else {
            k.usize("vocab_size")?
        };
        let norm_eps = match k.f32_opt("rms_norm_eps")? {
            Some(e) => e,
            None if gemma => 1e-6,
            None => return Err(k.missing("rms_norm_eps")),
        };
        let max_context = k
            .usize_opt("max_position_embeddings")?
            .unwrap_or(match family {
                Family::Gemma3 => 32_768,
                Family::Qwen2 => 32_768,
                _ => 4096,
            });
        // transformers >= 5 nests rope_theta / scaling under rope_parameters.
        let rope_params_key =
            if k.get("rope_scaling").is_none() && k.get("rope_parameters").is_some() {
                "rope_parameters"
            } else {
                "rope_scaling"
            };
        let base = match k.f32_opt("rope_theta")? {
            Some(b) => b,
            None => match k
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
            {
                Some(b) => b as f32,
                None => match family {
                    Family::Llama => 10_000.0,
                    _ => 1_000_000.0,
                },
            },
        };
        let scaling = rope_scaling(&k, rope_params_key)?;
        let style = if k.bool_opt("rope_traditional")?.unwrap_or(false) {
            RopeStyle::Traditional
        } else {
            RopeStyle::Neox
        };
        let rotary_dims = match k.f32_opt("partial_rotary_factor")? {
            Some(f) => ((head_dim as f32 * f) as usize) & !1,
            None => head_dim,
        };
        let rope = RopeConfig {
            head_dim,
            rotary_dims,
            base,
            style,
            scaling,
        };
        let sliding_window = k.usize_opt("sliding_window")?;
        let layer_types: Option<Vec<bool>> = match k.get("layer_types") {
            None => None,
            Some(Value::Array(a)) => {
                if a.len() != n_layers {
                    return Err(LmError::Config(format!(
                        "{file}: {}layer_types has {} entries, num_hidden_layers is {n_layers}",
                        k.prefix,
                        a.len()
                    )));
                }
                Some(
                    a.iter()
                        .map(|t| match t.as_str() {
                            Some("sliding_attention") => Ok(true),
                            Some("full_attention") => Ok(false),
                            _ => Err(k.bad(
                                "layer_types",
                                t,
                                "\"sliding_attention\" or \"full_attention\"",
                            )),
                        })
                        .collect::<Result<_>>()?,
                )
            }
            Some(other) => return Err(k.bad("layer_types", other, "a list")),
        };
        let (sliding_window, sliding_layers, rope_local_base, embed_scale, act, attn_scale) =
            if gemma {
                let pattern = k.usize_opt("sliding_window_pattern")?.unwrap_or(6).max(1);
                let layers = layer_types
                    .unwrap_or_else(|| (0..n_layers).map(|i| (i + 1) % pattern != 0).collect());
                let scalar = k.f32_opt("query_pre_attn_scalar")?.unwrap_or(256.0);
                // mlx-lm multiplies by sqrt(hidden) rounded to bf16.
                let scale = half::bf16::from_f32((hidden as f32).sqrt()).to_f32();
                (
                    Some(sliding_window.unwrap_or(512)),
                    layers,
                    Some(k.f32_opt("rope_local_base_freq")?.unwrap_or(10_000.0)),
                    Some(scale),
                    Act::GeluTanh,
                    1.0 / scalar.sqrt(),
                )
            } else {
                let layers = layer_types.unwrap_or_else(|| vec![false; n_layers]);
                let window = if layers.iter().any(|&s| s) {
                    Some(sliding_window.ok_or_else(|| k.missing("sliding_window"))?)
                } else {
                    None
                };
                (
                    window,
                    layers,
                    None,
                    None,
                    Act::Silu,
                    1.0 / (head_dim as f32).sqrt(),
                )
            };
        if k.bool_opt("mlp_bias")?.unwrap_or(false) {
            return Err(LmError::Unsupported(format!(
                "{file}: {}mlp_bias = true",
                k.prefix
            )));
        }
        let (moe, moe_layers) = if family == Family::Qwen3Moe {
            qwen3_moe(&k, n_layers)?
        } else {
            (None, vec![false; n_layers])
        };
        let tie = if gemma {
            None
        } else {
            Some(
                k.bool_opt("tie_word_embeddings")?
                    .unwrap_or(!matches!(family, Family::Qwen3 | Family::Qwen3Moe)),
            )
        };
        let model = ModelConfig {
            family,
            arch: model_type.to_string(),
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn,
            vocab,
            norm_eps,
            rope,
            rope_local_base,
            max_context,
            sliding_window,
            sliding_layers,
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3),
            act,
            embed_scale,
            attn_scale,
            tied_embeddings: tie.unwrap_or(true),
            moe,
            moe_layers,
        };
        model.validate()?;
        let mut eos = ids_of(top.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids_of(k.get("eos_token_id"));
        }
        let bos = ids_of(top.get("bos_token_id"))
            .first()
            .copied()
            .or_else(|| ids_of(k.get("bos_token_id")).first().copied());
        Ok(MlxConfig {
            model,
            quantization: MlxQuantization::from_config(file, cfg)?,
            layout,
            tie_word_embeddings: tie,
            bos_token_id: bos,
            eos_token_ids: eos,
            raw: cfg.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "vocab_size": 100, "rope_theta": 10000.0,
        })
    }

    #[test]
    fn llama_defaults() {
        let c = MlxConfig::from_json("c.json", &llama()).unwrap();
        assert_eq!(c.model.head_dim, 16);
        assert_eq!(c.model.rope.style, RopeStyle::Neox);
        assert_eq!(c.model.family, Family::Llama);
        assert_eq!(c.tie_word_embeddings, Some(true));
        assert!(c.quantization.default.is_none());
    }

    #[test]
    fn missing_key_and_bad_type() {
        let mut v = llama();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(e, "c.json: missing key hidden_size");
        let mut v = llama();
        v["model_type"] = json!("gpt2");
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported: c.json: model_type \"gpt2\"; supported: llama, mistral, qwen2, qwen3, qwen3moe, qwen3_moe, gemma3, gemma3_text"
        );
        let mut v = llama();
        v["num_hidden_layers"] = json!("two");
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "c.json: num_hidden_layers = \"two\", expected a non-negative integer"
        );
    }

    #[test]
    fn rope_scaling_kinds() {
        let mut v = llama();
        v["rope_scaling"] =
            json!({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192});
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert!(
            matches!(c.model.rope.scaling, RopeScaling::Llama3 { factor, high_freq_factor, .. } if factor == 8.0 && high_freq_factor == 4.0)
        );
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert_eq!(c.model.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        v["rope_scaling"] =
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert!(
            matches!(c.model.rope.scaling, RopeScaling::Yarn { factor, beta_fast, .. } if factor == 4.0 && beta_fast == 32.0)
        );
        v["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported: c.json: rope_scaling.rope_type = \"dynamic\"; supported RoPE types: default, linear, llama3, yarn"
        );
    }

    #[test]
    fn quantization_table() {
        let mut v = llama();
        v["quantization"] = json!({
            "group_size": 64, "bits": 4,
            "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8},
            "model.layers.1.self_attn.v_proj": false,
        });
        let q = MlxConfig::from_json("c.json", &v).unwrap().quantization;
        assert_eq!(
            q.for_module("model.layers.0.self_attn.q_proj"),
            Some(QuantParams::affine(4, 64))
        );
        assert_eq!(
            q.for_module("model.layers.0.mlp.down_proj"),
            Some(QuantParams::affine(8, 32))
        );
        assert_eq!(q.for_module("model.layers.1.self_attn.v_proj"), None);
        v["quantization"] = json!({"group_size": 64, "bits": 7});
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported: c.json: quantization: affine quantization with bits=7; supported bits are 2, 3, 4, 5, 6, 8"
        );
        v["quantization"] =
            json!({"group_size": 64, "bits": 4, "model.layers.0.mlp.up_proj": {"bits": 1}});
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported: c.json: quantization.model.layers.0.mlp.up_proj: affine quantization with bits=1; supported bits are 2, 3, 4, 5, 6, 8"
        );
        v["quantization"] = json!({"group_size": 32, "bits": 4, "mode": "nvfp4"});
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported: c.json: quantization.mode = \"nvfp4\"; supported modes: affine, mxfp4"
        );
        v["quantization"] = json!({"group_size": 32, "bits": 4, "mode": "mxfp4"});
        let q = MlxConfig::from_json("c.json", &v).unwrap().quantization;
        assert_eq!(q.default, Some(QuantParams::mxfp4()));
    }

    fn qwen3_moe() -> Value {
        json!({
            "model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 4,
            "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8,
            "num_experts_per_tok": 2, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "rms_norm_eps": 1e-6, "vocab_size": 100, "rope_theta": 1e6,
            "tie_word_embeddings": false,
            "quantization": {"group_size": 64, "bits": 4,
                "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}},
        })
    }

    #[test]
    fn qwen3_moe_layers_and_defaults() {
        let c = MlxConfig::from_json("c.json", &qwen3_moe()).unwrap();
        assert_eq!(c.model.family, Family::Qwen3Moe);
        assert!(c.model.qk_norm);
        assert_eq!(
            c.model.moe,
            Some(MoeSpec {
                experts: 8,
                top_k: 2,
                ffn: 64,
                norm_topk_prob: true
            })
        );
        assert_eq!(c.model.moe_layers, [true; 4]);
        assert_eq!(
            c.quantization.for_module("model.layers.0.mlp.gate"),
            Some(QuantParams::affine(8, 64))
        );
        let mut v = qwen3_moe();
        v["mlp_only_layers"] = json!([1]);
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert_eq!(c.model.moe_layers, [true, false, true, true]);
        // Sparse every second layer (1 and 3), minus layer 3.
        v["decoder_sparse_step"] = json!(2);
        v["mlp_only_layers"] = json!([3]);
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert_eq!(c.model.moe_layers, [false, true, false, false]);
        // Hugging Face defaults: step 1, no dense layers, no renormalization, untied.
        let mut v = qwen3_moe();
        for key in [
            "decoder_sparse_step",
            "mlp_only_layers",
            "norm_topk_prob",
            "tie_word_embeddings",
        ] {
            v.as_object_mut().unwrap().remove(key);
        }
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert_eq!(c.model.moe_layers, [true; 4]);
        assert!(!c.model.moe.unwrap().norm_topk_prob);
        assert_eq!(c.tie_word_embeddings, Some(false));
        // No experts: every layer dense.
        v["num_experts"] = json!(0);
        let c = MlxConfig::from_json("c.json", &v).unwrap();
        assert!(c.model.moe.is_none() && c.model.moe_layers == [false; 4]);
    }

    #[test]
    fn qwen3_moe_bad_values_are_named() {
        let err = |key: &str, val: Value| {
            let mut v = qwen3_moe();
            v[key] = val;
            MlxConfig::from_json("c.json", &v).unwrap_err().to_string()
        };
        assert_eq!(
            err("num_experts_per_tok", json!(0)),
            "unsupported: c.json: num_experts_per_tok = 0: supported: 1 to 8 with num_experts = 8"
        );
        assert_eq!(
            err("num_experts_per_tok", json!(9)),
            "unsupported: c.json: num_experts_per_tok = 9: supported: 1 to 8 with num_experts = 8"
        );
        assert_eq!(
            err("num_experts", json!(512)),
            "unsupported: c.json: num_experts = 512: supported: up to 256"
        );
        assert_eq!(
            err("decoder_sparse_step", json!(0)),
            "c.json: decoder_sparse_step = 0, expected a positive integer"
        );
        assert_eq!(
            err("mlp_only_layers", json!([1, 4])),
            "c.json: mlp_only_layers = 4, expected layer indices below num_hidden_layers (4)"
        );
        assert_eq!(
            err("mlp_only_layers", json!("none")),
            "c.json: mlp_only_layers = \"none\", expected a list of layer indices"
        );
        assert_eq!(
            err("norm_topk_prob", json!("yes")),
            "c.json: norm_topk_prob = \"yes\", expected true or false"
        );
        assert_eq!(
            err("shared_expert_intermediate_size", json!(512)),
            "unsupported: c.json: shared_expert_intermediate_size = 512: qwen3_moe has no shared expert"
        );
        let mut v = qwen3_moe();
        v.as_object_mut().unwrap().remove("moe_intermediate_size");
        let e = MlxConfig::from_json("c.json", &v).unwrap_err().to_string();
        assert_eq!(e, "c.json: missing key moe_intermediate_size");
    }

    #[test]
    fn gemma3_text_and_nested() {
        let tc = json!({
            "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
            "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "vocab_size": 262144,
        });
        let c = MlxConfig::from_json("c.json", &tc).unwrap();
        assert_eq!(c.model.family, Family::Gemma3);
        assert_eq!(c.model.embed_scale, Some(25.25));
        assert_eq!(c.model.sliding_layers.iter().filter(|s| !**s).count(), 3);
        assert!(!c.model.sliding_layers[5] && c.model.sliding_layers[4]);
        assert_eq!(c.model.rope_local_base, Some(10_000.0));
        assert_eq!(c.layout.model, "model.");
        let nested = json!({"model_type": "gemma3", "text_config": tc, "vocab_size": 262208});
        let c = MlxConfig::from_json("c.json", &nested).unwrap();
        assert_eq!(c.model.vocab, 262_208);
        assert_eq!(c.layout.model, "language_model.model.");
        let e = MlxConfig::from_json("c.json", &json!({"model_type": "gemma3"}))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "c.json: missing key text_config");
    }
}

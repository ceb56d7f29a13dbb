//! Loading a `Transformer` from an mlx-lm model folder: `config.json`, safetensors weights
//! (one file or shards with `model.safetensors.index.json`) in the HF layout, MLX-quantized
//! linears (`.weight` packed, `.scales`, `.biases`) or dense f32/f16/bf16 ones, Qwen3-MoE's
//! router (`mlp.gate`) and MLX-quantized stacked experts (`mlp.switch_mlp.{gate,up,down}_proj`,
//! `[E, N, K]`), and `tokenizer.json` / `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use mlx_native::ops::RopeTable;
use mlx_native::weights::safetensors::SafetensorsSet;
use mlx_native::{MlxBuffer, MlxDevice};

use super::Transformer;
use crate::config::Family;
use crate::error::{LmError, Result};
use crate::layers::mlp::{Ffn, MoeMlp};
use crate::layers::{Attention, DecoderLayer, Linear, Mlp};
use crate::mlx_config::MlxConfig;
use crate::tokenizer::Tokenizer;
use mlx_native::ops::moe::MoeExperts;
use mlx_native::weights::expert_weight::{ExpertWeight, QuantExperts};

/// An opened mlx-lm model folder: its config and its (mapped, validated) weights.
#[derive(Debug)]
pub struct MlxFolder {
    pub dir: PathBuf,
    pub config: MlxConfig,
    pub weights: SafetensorsSet,
}

impl MlxFolder {
    /// Read `config.json` and map the weights of `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = MlxConfig::from_folder(dir)?;
        let weights = SafetensorsSet::open_folder(dir)?;
        Ok(MlxFolder {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// The tokenizer (`tokenizer.json`), with BOS/EOS from `config.json` and `add_bos_token`
    /// from `tokenizer_config.json`; `None` when the folder has no `tokenizer.json`.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let path = self.dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let tc = self.tokenizer_config()?;
        let add_bos = tc
            .as_ref()
            .and_then(|v| v.get("add_bos_token"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let cfg = &self.config;
        Ok(Some(Tokenizer::from_file(
            &path,
            cfg.bos_token_id,
            cfg.eos_token_ids.clone(),
            add_bos,
        )?))
    }

    /// `tokenizer_config.json`, if present.
    pub fn tokenizer_config(&self) -> Result<Option<serde_json::Value>> {
        let path = self.dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| LmError::Io {
            path: shown.clone(),
            source,
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LmError::Config(format!("{shown}: invalid JSON: {e}")))
    }

    /// The chat template: `tokenizer_config.json`'s `chat_template` (a string, or the
    /// `default` entry of a list of named templates), else `chat_template.jinja`.
    pub fn chat_template(&self) -> Result<Option<String>> {
        if let Some(tc) = self.tokenizer_config()? {
            match tc.get("chat_template") {
                Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
                Some(serde_json::Value::Array(list)) => {
                    let pick = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| list.first());
                    if let Some(s) = pick
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                    {
                        return Ok(Some(s.to_string()));
                    }
                }
                _ => {}
            }
        }
        let jinja = self.dir.join("chat_template.jinja");
        if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|source| LmError::Io {
                path: jinja.display().to_string(),
                source,
            })?;
            return Ok(Some(text));
        }
        Ok(None)
    }
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("loading {bar:30} {bytes}/{total_bytes} {msg}")
    {
        pb.set_style(style);
    }
    pb
}

/// Open and load the folder `dir`.
pub fn load_dir(gpu: &MlxDevice, dir: impl AsRef<Path>, quiet: bool) -> Result<Transformer> {
    load(gpu, &MlxFolder::open(dir)?, quiet)
}

/// Upload every weight of `folder` to `gpu`.
pub fn load(gpu: &MlxDevice, folder: &MlxFolder, quiet: bool) -> Result<Transformer> {
    let mc = &folder.config;
    let cfg = mc.model.clone();
    let w = &folder.weights;
    let quant = &mc.quantization;
    let total: u64 = w
        .names()
        .filter_map(|n| w.tensor(n))
        .map(|t| t.n_bytes() as u64)
        .sum();
    let pb = progress(total, quiet);
    let size = |name: &str| w.tensor(name).map_or(0, |t| t.n_bytes() as u64);
    let gemma = cfg.family == Family::Gemma3;
    let shown = folder.dir.display().to_string();

    // A linear module at `path` (`model.layers.0.mlp.up_proj`), quantized or dense.
    let linear = |path: &str, out: usize, inp: usize| -> Result<Linear> {
        let wname = format!("{path}.weight");
        let l = if w.is_quantized(path) {
            let params = quant.for_module(path).ok_or_else(|| {
                LmError::Config(format!(
                    "{shown}: {path}.scales exists but config.json's quantization {}",
                    if quant.default.is_none() {
                        "is absent".to_string()
                    } else {
                        format!("marks {path} as not quantized")
                    }
                ))
            })?;
            let q = w.upload_quant(gpu, path, params)?;
            pb.inc(
                size(&wname) + size(&format!("{path}.scales")) + size(&format!("{path}.biases")),
            );
            Linear::Quant(q)
        } else {
            let d = w.upload_dense(gpu, &wname)?;
            pb.inc(size(&wname));
            Linear::Dense(d)
        };
        l.expect_shape(&wname, out, inp)?;
        Ok(l)
    };
    // A vector (norm weight, bias) as f32; Gemma's norms get the 1 of `1 + w` added.
    let vector = |name: &str, len: usize, norm: bool| -> Result<MlxBuffer> {
        let mut v = w.to_f32(name)?;
        if v.len() != len {
            return Err(LmError::Config(format!(
                "{shown}: tensor {name} has {} elements, the model's config expects {len}",
                v.len()
            )));
        }
        if norm && gemma {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        pb.inc(size(name));
        Ok(MlxBuffer::from_slice(gpu, &v, &[len])?)
    };
    let optional = |name: &str, len: usize, norm: bool| -> Result<Option<MlxBuffer>> {
        if w.tensor(name).is_some() {
            Ok(Some(vector(name, len, norm)?))
        } else {
            Ok(None)
        }
    };
    let unsupported_tensor = |name: &str| -> Result<()> {
        if w.tensor(name).is_some() {
            return Err(LmError::Unsupported(format!(
                "{shown}: tensor {name} (a bias this engine does not implement)"
            )));
        }
        Ok(())
    };

    // The stacked experts at `path` (`model.layers.0.mlp.switch_mlp.up_proj`), as mlx-lm's
    // `QuantizedSwitchLinear` stores them.
    let quant_experts = |path: &str, want: [usize; 3]| -> Result<QuantExperts> {
        let wname = format!("{path}.weight");
        if !w.is_quantized(path) {
            let hf = path.replace("switch_mlp.", "experts.0.");
            return Err(if w.tensor(&wname).is_some() {
                LmError::Unsupported(format!(
                    "{shown}: tensor {wname} is not quantized; dense (unquantized) experts are \
                     not supported"
                ))
            } else if w.tensor(&format!("{hf}.weight")).is_some() {
                LmError::Unsupported(format!(
                    "{shown}: tensor {wname} is missing: the folder holds per-expert tensors \
                     ({hf}.weight, the Hugging Face layout); convert it with mlx_lm.convert, \
                     which stacks them"
                ))
            } else {
                LmError::Config(format!("{shown}: missing tensor {wname}"))
            });
        }
        let params = quant.for_module(path).ok_or_else(|| {
            LmError::Config(format!(
                "{shown}: {path}.scales exists but config.json's quantization does not cover {path}"
            ))
        })?;
        let e = w.upload_quant_experts(gpu, path, params)?;
        if e.shape() != want {
            return Err(LmError::Config(format!(
                "{shown}: tensor {wname}: experts of shape {:?}, the model's config expects {want:?}",
                e.shape()
            )));
        }
        pb.inc(size(&wname) + size(&format!("{path}.scales")) + size(&format!("{path}.biases")));
        Ok(e)
    };

    let m = &mc.layout.model;
    let (h, hd, nh, nkv) = (cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    let embed = linear(&format!("{m}embed_tokens"), cfg.vocab, h)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = |s: &str| format!("{m}layers.{i}.{s}");
        let sliding = cfg.sliding_layers.get(i).copied().unwrap_or(false);
        for b in [
            "self_attn.o_proj.bias",
            "mlp.gate_proj.bias",
            "mlp.up_proj.bias",
            "mlp.down_proj.bias",
        ] {
            unsupported_tensor(&p(b))?;
        }
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(vector(&p("self_attn.q_norm.weight"), hd, true)?),
                Some(vector(&p("self_attn.k_norm.weight"), hd, true)?),
            )
        } else {
            (None, None)
        };
        let mut attn = Attention {
            q: linear(&p("self_attn.q_proj"), nh * hd, h)?,
            k: linear(&p("self_attn.k_proj"), nkv * hd, h)?,
            v: linear(&p("self_attn.v_proj"), nkv * hd, h)?,
            o: linear(&p("self_attn.o_proj"), h, nh * hd)?,
            q_bias: optional(&p("self_attn.q_proj.bias"), nh * hd, false)?,
            k_bias: optional(&p("self_attn.k_proj.bias"), nkv * hd, false)?,
            v_bias: optional(&p("self_attn.v_proj.bias"), nkv * hd, false)?,
            q_norm,
            k_norm,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            norm_eps: cfg.norm_eps,
            scale: cfg.attn_scale,
            window: if sliding { cfg.sliding_window } else { None },
            qkv: None,
        };
        attn.prepare(gpu)?;
        let mlp = match cfg
            .moe
            .filter(|_| cfg.moe_layers.get(i).copied().unwrap_or(false))
        {
            None => {
                let mut m = Mlp {
                    gate: linear(&p("mlp.gate_proj"), cfg.ffn, h)?,
                    up: linear(&p("mlp.up_proj"), cfg.ffn, h)?,
                    down: linear(&p("mlp.down_proj"), h, cfg.ffn)?,
                    act: cfg.act,
                    gate_up: None,
                };
                m.fuse_gate_up(gpu)?;
                Ffn::Dense(m)
            }
            Some(moe) => {
                for b in [
                    "mlp.gate.bias",
                    "mlp.switch_mlp.gate_proj.bias",
                    "mlp.switch_mlp.up_proj.bias",
                    "mlp.switch_mlp.down_proj.bias",
                ] {
                    unsupported_tensor(&p(b))?;
                }
                let experts = |name: &str, n: usize, k: usize| -> Result<ExpertWeight> {
                    Ok(ExpertWeight::Mlx(quant_experts(
                        &p(name),
                        [moe.experts, n, k],
                    )?))
                };
                Ffn::Moe(MoeMlp {
                    router: linear(&p("mlp.gate"), moe.experts, h)?,
                    // Gate and up stacked: decode routes both in one dispatch.
                    experts: MoeExperts {
                        gate: experts("mlp.switch_mlp.gate_proj", moe.ffn, h)?,
                        up: experts("mlp.switch_mlp.up_proj", moe.ffn, h)?,
                        down: experts("mlp.switch_mlp.down_proj", h, moe.ffn)?,
                        gate_up: None,
                    }
                    .stack_gate_up(gpu)?,
                    top_k: moe.top_k,
                    norm_topk_prob: moe.norm_topk_prob,
                    act: cfg.act,
                })
            }
        };
        // HF names: Llama/Qwen's `post_attention_layernorm` is the MLP's pre-norm; Gemma 3
        // has four norms.
        let (ffn_norm, post_attn_norm, post_ffn_norm) = if gemma {
            (
                vector(&p("pre_feedforward_layernorm.weight"), h, true)?,
                Some(vector(&p("post_attention_layernorm.weight"), h, true)?),
                Some(vector(&p("post_feedforward_layernorm.weight"), h, true)?),
            )
        } else {
            (
                vector(&p("post_attention_layernorm.weight"), h, true)?,
                None,
                None,
            )
        };
        layers.push(DecoderLayer {
            attn_norm: vector(&p("input_layernorm.weight"), h, true)?,
            attn,
            post_attn_norm,
            ffn_norm,
            mlp,
            post_ffn_norm,
            fold: crate::layers::decoder::Folding::DEFAULT,
            eps: cfg.norm_eps,
            rope: usize::from(sliding && cfg.rope_local_base.is_some()),
        });
    }
    let norm = vector(&format!("{m}norm.weight"), h, true)?;
    let head_path = &mc.layout.lm_head;
    let has_head = w.tensor(&format!("{head_path}.weight")).is_some();
    let tied = mc.tie_word_embeddings.unwrap_or(!has_head);
    let head = if tied {
        None
    } else {
        Some(linear(head_path, cfg.vocab, h)?)
    };
    let mut ropes = vec![RopeTable::new(gpu, &cfg.rope)?];
    if let Some(base) = cfg.rope_local_base {
        let mut local = cfg.rope;
        local.base = base;
        // Gemma 3 scales the RoPE of global layers only.
        local.scaling = mlx_native::ops::RopeScaling::None;
        ropes.push(RopeTable::new(gpu, &local)?);
    }
    pb.finish_and_clear();
    let mut cfg = cfg;
    cfg.tied_embeddings = tied;
    Ok(Transformer {
        gpu: gpu.clone(),
        embed,
        layers,
        norm,
        head,
        ropes,
        cfg,
    })
}

//! Loading a `Transformer` from a GGUF file: llama.cpp's tensor names, any supported family.
//! Tensors stream to the GPU one by one (peak host memory: the mapped file plus one tensor),
//! with a progress bar on stderr.

use indicatif::{ProgressBar, ProgressStyle};
use mlx_native::ops::RopeTable;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::MlxDevice;

use super::Transformer;
use crate::config::{Family, ModelConfig};
use crate::error::Result;
use crate::layers::linear::vector_from_gguf;
use crate::layers::mlp::{Ffn, MoeMlp};
use crate::layers::{Attention, DecoderLayer, Linear, Mlp};
use mlx_native::ops::moe::MoeExperts;
use mlx_native::weights::expert_weight::{ExpertWeight, GgmlExperts};

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

/// Load every tensor of `f` onto `gpu`.
pub fn load(gpu: &MlxDevice, f: &GgufFile, quiet: bool) -> Result<Transformer> {
    let cfg = ModelConfig::from_gguf(f)?;
    cfg.validate()?;
    let total: u64 = f.tensors().iter().map(|t| t.n_bytes() as u64).sum();
    let pb = progress(total, quiet);
    let bytes_of = |name: &str| f.tensor(name).map_or(0, |t| t.n_bytes() as u64);
    let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
        let l = Linear::from_gguf(gpu, f, name)?;
        l.expect_shape(name, out, inp)?;
        pb.inc(bytes_of(name));
        Ok(l)
    };
    let vector = |name: &str, len: usize| -> Result<mlx_native::MlxBuffer> {
        let v = vector_from_gguf(gpu, f, name, len)?;
        pb.inc(bytes_of(name));
        Ok(v)
    };
    let optional = |name: &str, len: usize| -> Result<Option<mlx_native::MlxBuffer>> {
        if f.tensor(name).is_some() {
            Ok(Some(vector(name, len)?))
        } else {
            Ok(None)
        }
    };
    // Tensors `names` (each `[rows_i, k]`) stacked into one weight when they share a type
    // (q|k|v, gate|up: one matvec at decode), else loaded one by one.
    let stacked = |names: &[(String, usize)], k: usize| -> Result<(Vec<Linear>, Option<Linear>)> {
        let mut parts = Vec::with_capacity(names.len());
        for (name, rows) in names {
            let t = f.tensor(name).ok_or_else(|| {
                crate::LmError::Config(format!("{}: no tensor named '{name}'", f.name()))
            })?;
            if t.shape != [*rows, k] {
                // Let the one-by-one path report the shape.
                parts.clear();
                break;
            }
            parts.push((t.kind, f.tensor_bytes(name)?));
        }
        if parts.len() == names.len() {
            if let Some((fused, views)) = Linear::ggml_stacked(gpu, k, &parts)? {
                for (name, _) in names {
                    pb.inc(bytes_of(name));
                }
                return Ok((views, Some(fused)));
            }
        }
        let mut one = Vec::with_capacity(names.len());
        for (name, rows) in names {
            one.push(linear(name, *rows, k)?);
        }
        Ok((one, None))
    };
    let (h, hd, nh, nkv) = (cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    let embed = linear("token_embd.weight", cfg.vocab, h)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        let sliding = cfg.sliding_layers.get(i).copied().unwrap_or(false);
        let (qkv, fused) = stacked(
            &[
                (p("attn_q.weight"), nh * hd),
                (p("attn_k.weight"), nkv * hd),
                (p("attn_v.weight"), nkv * hd),
            ],
            h,
        )?;
        let [q, k, v] = <[Linear; 3]>::try_from(qkv)
            .map_err(|_| crate::LmError::Invalid("q, k, v: expected three weights".into()))?;
        let (q_bias, k_bias, v_bias) = (
            optional(&p("attn_q.bias"), nh * hd)?,
            optional(&p("attn_k.bias"), nkv * hd)?,
            optional(&p("attn_v.bias"), nkv * hd)?,
        );
        let qkv = match (fused, &q_bias, &k_bias, &v_bias) {
            (Some(w), None, None, None) => Some((w, None)),
            (Some(w), Some(a), Some(b), Some(c)) => Some((
                w,
                Some(mlx_native::MlxBuffer::concat(
                    gpu,
                    &[a, b, c],
                    &[a.len() + b.len() + c.len()],
                )?),
            )),
            _ => None,
        };
        let attn = Attention {
            q,
            k,
            v,
            o: linear(&p("attn_output.weight"), h, nh * hd)?,
            q_bias,
            k_bias,
            v_bias,
            q_norm: optional(&p("attn_q_norm.weight"), hd)?,
            k_norm: optional(&p("attn_k_norm.weight"), hd)?,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            norm_eps: cfg.norm_eps,
            scale: cfg.attn_scale,
            window: if sliding { cfg.sliding_window } else { None },
            qkv,
        };
        let mlp = match cfg.moe {
            None => {
                let (gu, gate_up) = stacked(
                    &[
                        (p("ffn_gate.weight"), cfg.ffn),
                        (p("ffn_up.weight"), cfg.ffn),
                    ],
                    h,
                )?;
                let [gate, up] = <[Linear; 2]>::try_from(gu).map_err(|_| {
                    crate::LmError::Invalid("gate, up: expected two weights".into())
                })?;
                Ffn::Dense(Mlp {
                    gate,
                    up,
                    down: linear(&p("ffn_down.weight"), h, cfg.ffn)?,
                    act: cfg.act,
                    gate_up,
                })
            }
            Some(moe) => {
                let experts = |name: &str, n: usize, k: usize| -> Result<ExpertWeight> {
                    let w = GgmlExperts::from_gguf(gpu, f, name)?;
                    let want = [moe.experts, n, k];
                    if w.shape() != want {
                        return Err(crate::LmError::Config(format!(
                            "tensor {name}: shape {:?}, the model's config expects {want:?}",
                            w.shape()
                        )));
                    }
                    pb.inc(bytes_of(name));
                    Ok(ExpertWeight::Ggml(w))
                };
                Ffn::Moe(MoeMlp {
                    router: linear(&p("ffn_gate_inp.weight"), moe.experts, h)?,
                    experts: MoeExperts {
                        gate: experts(&p("ffn_gate_exps.weight"), moe.ffn, h)?,
                        up: experts(&p("ffn_up_exps.weight"), moe.ffn, h)?,
                        down: experts(&p("ffn_down_exps.weight"), h, moe.ffn)?,
                        gate_up: None,
                    },
                    top_k: moe.top_k,
                    norm_topk_prob: moe.norm_topk_prob,
                    act: cfg.act,
                })
            }
        };
        layers.push(DecoderLayer {
            attn_norm: vector(&p("attn_norm.weight"), h)?,
            attn,
            post_attn_norm: optional(&p("post_attention_norm.weight"), h)?,
            ffn_norm: vector(&p("ffn_norm.weight"), h)?,
            mlp,
            post_ffn_norm: optional(&p("post_ffw_norm.weight"), h)?,
            fold: crate::layers::decoder::Folding::DEFAULT,
            eps: cfg.norm_eps,
            rope: usize::from(sliding && cfg.rope_local_base.is_some()),
        });
    }
    let norm = vector("output_norm.weight", h)?;
    let head = if f.tensor("output.weight").is_some() {
        Some(linear("output.weight", cfg.vocab, h)?)
    } else {
        None
    };
    let mut ropes = vec![RopeTable::new(gpu, &cfg.rope)?];
    if let Some(base) = cfg.rope_local_base {
        let mut local = cfg.rope;
        local.base = base;
        // Gemma 3's linear scaling (large variants) applies to global layers only.
        local.scaling = mlx_native::ops::RopeScaling::None;
        ropes.push(RopeTable::new(gpu, &local)?);
    }
    pb.finish_and_clear();
    if cfg.family == Family::Gemma3 && cfg.sliding_window.is_none() {
        return Err(crate::LmError::Config(format!(
            "{}: gemma3 without gemma3.attention.sliding_window",
            f.name()
        )));
    }
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

//! Attention with the KV cache: projections, optional biases (Qwen2) and per-head q/k RMS
//! norm (Qwen3, Gemma 3), RoPE at explicit positions, cache append, then flash attention
//! (decode for one token, prefill for a chunk).

use mlx_native::kv_quant::KvStore;
use mlx_native::ops::kv::RopeAppend;
use mlx_native::ops::{self, MatvecX, NormOut, QmvFusion, QuantizedX, RopeTable, SdpaOptions};
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{MlxBuffer, MlxDevice, Pass};

use super::Linear;
use crate::error::Result;

#[derive(Clone, Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_bias: Option<MlxBuffer>,
    pub k_bias: Option<MlxBuffer>,
    pub v_bias: Option<MlxBuffer>,
    /// Per-head RMS norm weights `[head_dim]` applied to q and k before RoPE.
    pub q_norm: Option<MlxBuffer>,
    pub k_norm: Option<MlxBuffer>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f32,
    pub scale: f32,
    /// Sliding window of this layer, if any.
    pub window: Option<usize>,
    /// q, k and v stacked in one weight (and their biases in one vector) when their format
    /// allows it ([`Attention::fuse_qkv`]): decode then projects with one matvec. `q`, `k`
    /// and `v` are views into it (no second copy of the weights).
    pub qkv: Option<(Linear, Option<MlxBuffer>)>,
}

/// What an attention block reads and adds: `residual + attention(norm(x))`, the norm and the
/// residual optional. At decode with a stacked MLX-quantized q|k|v, the norm is folded into
/// the q|k|v matvec and the residual add into o's ([`Linear::forward_fused`]).
pub struct BlockInput<'a> {
    pub x: &'a MlxBuffer,
    /// RMS norm weight and eps applied to x first.
    pub norm: Option<(&'a MlxBuffer, f32)>,
    /// Added to the block's output.
    pub residual: Option<&'a MlxBuffer>,
    /// At decode with the stacked q|k|v, rotate and append in one dispatch
    /// (`ops::kv::rope_append`) rather than RoPE then the cache append.
    pub rope_append: bool,
    /// At decode, the normed x already quantized for the stacked q|k|v matvec
    /// (`ops::rms_norm_xq`, or a matvec with the norm pending): read instead of `x` (then
    /// `norm` is None).
    pub xq: Option<&'a QuantizedX>,
    /// At decode, o also writes the input of the matvec after this RMS norm, where it can
    /// ([`Linear::can_norm_out`]; [`Attention::forward_out`] returns it).
    pub norm_out: Option<NormOut<'a>>,
    /// At decode, the attention writes its output quantized for o where the cache and o
    /// allow it (`KvStore::sdpa_decode_xq`; `Folding::o_xq`).
    pub o_xq: bool,
}

impl<'a> BlockInput<'a> {
    /// x as it is, nothing added.
    pub fn plain(x: &'a MlxBuffer) -> Self {
        BlockInput {
            x,
            norm: None,
            residual: None,
            rope_append: true,
            xq: None,
            norm_out: None,
            o_xq: false,
        }
    }
}

/// Where the tokens of this step sit.
pub struct Step<'a> {
    /// u32 `[T]`: absolute positions of the tokens.
    pub positions: &'a MlxBuffer,
    /// Position of the first token.
    pub pos0: usize,
    /// Tokens in this step.
    pub tokens: usize,
}

impl Attention {
    /// Load-time preparation for decode: the q/k norm weights in f32 (the fused norm+RoPE
    /// kernel takes f32 weights; 16-bit ones would cost a separate norm dispatch per
    /// projection), and [`Attention::fuse_qkv`].
    pub fn prepare(&mut self, gpu: &MlxDevice) -> Result<()> {
        for norm in [&mut self.q_norm, &mut self.k_norm].into_iter().flatten() {
            if norm.dtype() != mlx_native::DType::F32 {
                let v = norm.to_f32(gpu)?;
                *norm = MlxBuffer::from_slice(gpu, &v, &[v.len()])?;
            }
        }
        self.fuse_qkv(gpu)
    }

    /// Stack q, k and v into [`Attention::qkv`] when all three are MLX-quantized with the same
    /// format (and all or none have biases); otherwise leave them as they are.
    pub fn fuse_qkv(&mut self, gpu: &MlxDevice) -> Result<()> {
        let (Linear::Quant(q), Linear::Quant(k), Linear::Quant(v)) = (&self.q, &self.k, &self.v)
        else {
            return Ok(());
        };
        let bias = match (&self.q_bias, &self.k_bias, &self.v_bias) {
            (None, None, None) => None,
            (Some(a), Some(b), Some(c)) => Some(MlxBuffer::concat(
                gpu,
                &[a, b, c],
                &[a.len() + b.len() + c.len()],
            )?),
            _ => return Ok(()),
        };
        if let Some((fused, views)) = QuantWeight::concat_rows(gpu, &[q, k, v])? {
            if let [q, k, v] = &views[..] {
                self.q = Linear::Quant(q.clone());
                self.k = Linear::Quant(k.clone());
                self.v = Linear::Quant(v.clone());
                self.qkv = Some((Linear::Quant(fused), bias));
            }
        }
        Ok(())
    }

    /// Project and add the bias: `[T, heads, head_dim]`.
    fn project(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        w: &Linear,
        bias: &Option<MlxBuffer>,
        heads: usize,
    ) -> Result<MlxBuffer> {
        let mut y = w.forward(pass, x)?;
        if let Some(b) = bias {
            y = ops::add(pass, &y, b)?;
        }
        let t = y.len() / (heads * self.head_dim);
        Ok(y.reshape(&[t, heads, self.head_dim])?)
    }

    /// RoPE, with the per-head RMS norm fused in where the model has one.
    fn rotate(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        norm: &Option<MlxBuffer>,
        positions: &MlxBuffer,
        rope: &RopeTable,
    ) -> Result<MlxBuffer> {
        Ok(match norm {
            Some(w) => ops::norm_rope(pass, x, w, self.norm_eps, positions, rope)?,
            None => ops::rope(pass, x, positions, rope)?,
        })
    }

    /// Whether decode folds the input norm into the q|k|v matvec.
    pub fn folds_norm(&self) -> bool {
        matches!(&self.qkv, Some((w, _)) if w.fuses())
    }

    /// Decode from the stacked q|k|v output `y` with RoPE and the cache append as separate
    /// dispatches: compressed caches (their append quantizes), and the measurement of what
    /// `rope_append` fuses.
    #[allow(clippy::too_many_arguments)]
    fn finish_separately(
        &self,
        pass: &mut Pass,
        y: &MlxBuffer,
        step: &Step<'_>,
        rope: &RopeTable,
        cache: &mut KvStore,
        layer: usize,
        input: &BlockInput<'_>,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let v = y.view((nh + nkv) * hd, &[1, nkv, hd])?;
        let (q, k) = if self.q_norm.is_none() && self.k_norm.is_none() {
            // q and k are adjacent heads of one buffer: one RoPE dispatch for both.
            let qk = y.view(0, &[1, nh + nkv, hd])?;
            let qk = ops::rope(pass, &qk, step.positions, rope)?;
            (qk.view(0, &[1, nh, hd])?, qk.view(nh * hd, &[1, nkv, hd])?)
        } else {
            let q = y.view(0, &[1, nh, hd])?;
            let k = y.view(nh * hd, &[1, nkv, hd])?;
            (
                self.rotate(pass, &q, &self.q_norm, step.positions, rope)?,
                self.rotate(pass, &k, &self.k_norm, step.positions, rope)?,
            )
        };
        cache.append(pass, layer, &k, &v, step.pos0)?;
        self.attend(pass, &q, step, cache, layer, input)
    }

    /// `x [T, hidden] -> [T, hidden]` ([`BlockInput`]), appending this step's K/V to `cache`
    /// at `layer`.
    pub fn forward(
        &self,
        pass: &mut Pass,
        input: &BlockInput<'_>,
        step: &Step<'_>,
        rope: &RopeTable,
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<MlxBuffer> {
        Ok(self.forward_out(pass, input, step, rope, cache, layer)?.0)
    }

    /// [`Attention::forward`], and the input of the matvec after `input.norm_out` where o
    /// wrote it.
    pub fn forward_out(
        &self,
        pass: &mut Pass,
        input: &BlockInput<'_>,
        step: &Step<'_>,
        rope: &RopeTable,
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let normed;
        let x = match (input.norm, &self.qkv, step.tokens) {
            (Some((w, eps)), None, _) | (Some((w, eps)), Some(_), 2..) => {
                normed = ops::rms_norm(pass, input.x, w, eps)?;
                &normed
            }
            _ => input.x,
        };
        let q = match (&self.qkv, step.tokens) {
            // Decode: one matvec for all three (the norm folded in), then one dispatch that
            // normalizes and rotates q and k and writes k and v into the cache.
            (Some((w, bias)), 1) => {
                let fusion = QmvFusion {
                    norm: input.norm,
                    ..QmvFusion::default()
                };
                let mut y = match input.xq {
                    Some(xq) => w.forward_xq(pass, xq, None)?,
                    None => w.forward_fused(pass, x, &fusion)?,
                };
                if let Some(b) = bias {
                    y = ops::add(pass, &y, b)?;
                }
                let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
                // A compressed cache quantizes on its own append: rotate separately.
                let plain = match cache {
                    KvStore::Plain(c) if input.rope_append => c,
                    _ => return self.finish_separately(pass, &y, step, rope, cache, layer, input),
                };
                let qk_norm = match (&self.q_norm, &self.k_norm) {
                    (Some(qn), Some(kn)) => Some((qn, kn, self.norm_eps)),
                    (None, None) => None,
                    _ => {
                        return Err(crate::LmError::Config(
                            "attention: a q norm without a k norm (or the reverse)".into(),
                        ))
                    }
                };
                let args = RopeAppend {
                    qkv: &y.reshape(&[1, nh + 2 * nkv, hd])?,
                    n_heads: nh,
                    positions: step.positions,
                    rope,
                    qk_norm,
                };
                plain.rope_append(pass, layer, &args, step.pos0)?
            }
            _ => {
                let q = self.project(pass, x, &self.q, &self.q_bias, self.n_heads)?;
                let k = self.project(pass, x, &self.k, &self.k_bias, self.n_kv_heads)?;
                let v = self.project(pass, x, &self.v, &self.v_bias, self.n_kv_heads)?;
                let q = self.rotate(pass, &q, &self.q_norm, step.positions, rope)?;
                let k = self.rotate(pass, &k, &self.k_norm, step.positions, rope)?;
                cache.append(pass, layer, &k, &v, step.pos0)?;
                q
            }
        };
        self.attend(pass, &q, step, cache, layer, input)
    }

    /// Attention of `q` over the cache, then o (with the block's residual added, and the
    /// next norm's matvec input written where `input.norm_out` asks and o can).
    fn attend(
        &self,
        pass: &mut Pass,
        q: &MlxBuffer,
        step: &Step<'_>,
        cache: &mut KvStore,
        layer: usize,
        input: &BlockInput<'_>,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let opts = SdpaOptions {
            scale: self.scale,
            window: self.window,
            ..SdpaOptions::new(self.head_dim)
        };
        // At decode, the attention output quantized for o too, where it can be.
        let o_form = self.o.xq_form().filter(|_| input.o_xq && step.tokens == 1);
        let with_q = match o_form {
            Some(form) => cache.sdpa_decode_xq(pass, q, layer, step.pos0 + 1, &opts, form)?,
            None => None,
        };
        let (attn, attn_q) = match with_q {
            Some((a, c)) => (a, Some(c)),
            None if step.tokens == 1 => (
                cache.sdpa_decode(pass, q, layer, step.pos0 + 1, &opts)?,
                None,
            ),
            None => (cache.sdpa_prefill(pass, q, layer, step.pos0, &opts)?, None),
        };
        let attn = attn.reshape(&[step.tokens, self.n_heads * self.head_dim])?;
        let attn_x = match &attn_q {
            Some(c) => MatvecX::Quantized(c),
            None => MatvecX::F32(&attn),
        };
        let norm_out = input
            .norm_out
            .as_ref()
            .filter(|o| step.tokens == 1 && self.o.can_norm_out(o, pass.caps()));
        if let Some(out) = norm_out {
            // Measurement (`decoder::set_bound_skip` bit 4): o reads the attention output's
            // words as if they were quantized chunks (the bound of attention writing them).
            let fake;
            let x = match self.o.xq_form() {
                Some(form) if super::decoder::bound_bit(4) => {
                    fake = QuantizedX::reinterpret(&attn, 1, attn.len(), form)?;
                    MatvecX::Quantized(&fake)
                }
                _ => attn_x,
            };
            let (y, q) = self.o.forward_norm_out(pass, x, input.residual, out)?;
            return Ok((y, Some(q)));
        }
        if let Some(c) = &attn_q {
            return Ok((self.o.forward_xq(pass, c, input.residual)?, None));
        }
        let fusion = QmvFusion::residual(input.residual);
        Ok((self.o.forward_fused(pass, &attn, &fusion)?, None))
    }
}

//! One transformer block: pre-norm attention and MLP with residual adds; Gemma 3 adds a norm
//! after each of them (four norms per layer).

use mlx_native::kv_quant::KvStore;
use mlx_native::ops::{self, RopeTable};
use mlx_native::{MlxBuffer, Pass};

use super::attention::{BlockInput, Step};
use super::mlp::Ffn;
use super::Attention;
use crate::error::Result;

#[derive(Debug)]
pub struct DecoderLayer {
    pub attn_norm: MlxBuffer,
    pub attn: Attention,
    pub post_attn_norm: Option<MlxBuffer>,
    pub ffn_norm: MlxBuffer,
    pub mlp: Ffn,
    pub post_ffn_norm: Option<MlxBuffer>,
    pub eps: f32,
    /// Index into the model's RoPE tables (global or local).
    pub rope: usize,
    /// At decode, fold the norms, the GLU and the residual adds into the matvecs where the
    /// weights allow it ([`DecoderLayer::forward_folded`]); false runs them as separate
    /// dispatches (the loaders set true; benchmarks compare).
    pub fold_decode: bool,
}

impl DecoderLayer {
    /// `x [T, hidden]` (the residual stream) -> the new residual stream.
    pub fn forward(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        step: &Step<'_>,
        ropes: &[RopeTable],
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<MlxBuffer> {
        let rope = ropes.get(self.rope).ok_or_else(|| {
            crate::LmError::Config(format!("layer {layer}: no RoPE table {}", self.rope))
        })?;
        if self.fold_decode && step.tokens == 1 && self.attn.folds_norm() {
            return self.forward_folded(pass, x, step, rope, cache, layer);
        }
        let h = ops::rms_norm(pass, x, &self.attn_norm, self.eps)?;
        let mut a = self
            .attn
            .forward(pass, &BlockInput::plain(&h), step, rope, cache, layer)?;
        if let Some(n) = &self.post_attn_norm {
            a = ops::rms_norm(pass, &a, n, self.eps)?;
        }
        // Residual add fused into the MLP's pre-norm.
        let (x, h) = ops::rms_norm_residual(pass, x, &a, &self.ffn_norm, self.eps)?;
        let mut m = self.mlp.forward(pass, &h)?;
        if let Some(n) = &self.post_ffn_norm {
            m = ops::rms_norm(pass, &m, n, self.eps)?;
        }
        Ok(ops::add(pass, &x, &m)?)
    }

    /// Decode with MLX-quantized projections: the pre-norms and the residual adds ride in
    /// the matvecs (`ops::qmv_fused`), 4 dispatches fewer per Llama-style layer (2 with
    /// Gemma's post-norms, 1 with an MoE FFN).
    fn forward_folded(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        step: &Step<'_>,
        rope: &RopeTable,
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<MlxBuffer> {
        let input = BlockInput {
            x,
            norm: Some((&self.attn_norm, self.eps)),
            residual: self.post_attn_norm.is_none().then_some(x),
        };
        let a = self.attn.forward(pass, &input, step, rope, cache, layer)?;
        let x = match &self.post_attn_norm {
            None => a,
            Some(n) => {
                let a = ops::rms_norm(pass, &a, n, self.eps)?;
                ops::add(pass, x, &a)?
            }
        };
        let mlp = match &self.mlp {
            Ffn::Dense(m) if m.folds() => m,
            ffn => {
                let h = ops::rms_norm(pass, &x, &self.ffn_norm, self.eps)?;
                let mut m = ffn.forward(pass, &h)?;
                if let Some(n) = &self.post_ffn_norm {
                    m = ops::rms_norm(pass, &m, n, self.eps)?;
                }
                return Ok(ops::add(pass, &x, &m)?);
            }
        };
        let norm = (&self.ffn_norm, self.eps);
        match &self.post_ffn_norm {
            None => mlp.forward_fused(pass, &x, norm, Some(&x)),
            Some(n) => {
                let m = mlp.forward_fused(pass, &x, norm, None)?;
                let m = ops::rms_norm(pass, &m, n, self.eps)?;
                Ok(ops::add(pass, &x, &m)?)
            }
        }
    }
}

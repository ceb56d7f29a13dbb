//! Feed-forward blocks: the gated MLP `down(act(gate(x)) * up(x))` (SwiGLU for Llama/Qwen,
//! GeGLU for Gemma), and the mixture of experts (Qwen3-MoE) that routes each token to its
//! top-k experts on the GPU, reading only the selected experts' weights at decode.

use mlx_native::ops::activation::{glu, glu_split, glu_split_xq, Act};
use mlx_native::ops::moe::{
    experts_xq_form, moe_ffn, moe_ffn_xq, moe_ffn_xq_into, MoeConfig, MoeExperts, RouterConfig,
    RouterKind,
};
use mlx_native::ops::qmatmul::{MatvecX, NormOut, QuantizedX};
use mlx_native::ops::QmvFusion;
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{MlxBuffer, MlxDevice, Pass};

use super::decoder::Folding;
use super::Linear;
use crate::error::Result;

/// A decode FFN's input: f32 rows, or rows already quantized for the stacked gate|up
/// matvec (by the norm before it, `ops::rms_norm_xq`, or by o with the norm pending).
pub type FfnInput<'a> = MatvecX<'a>;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Act,
    /// gate and up stacked in one weight when their format allows it
    /// ([`Mlp::fuse_gate_up`]): one matvec (or matmul) then gives both, each row holding
    /// gate then up. `gate` and `up` are views into it.
    pub gate_up: Option<Linear>,
}

impl Mlp {
    /// Stack gate and up into [`Mlp::gate_up`] when both are MLX-quantized with the same
    /// format; otherwise leave them as they are.
    pub fn fuse_gate_up(&mut self, gpu: &MlxDevice) -> Result<()> {
        let (Linear::Quant(g), Linear::Quant(u)) = (&self.gate, &self.up) else {
            return Ok(());
        };
        if let Some((fused, views)) = QuantWeight::concat_rows(gpu, &[g, u])? {
            if let [g, u] = &views[..] {
                self.gate = Linear::Quant(g.clone());
                self.up = Linear::Quant(u.clone());
                self.gate_up = Some(Linear::Quant(fused));
            }
        }
        Ok(())
    }

    /// Whether decode folds the norm, the GLU and the residual add into the matvecs.
    pub fn folds(&self) -> bool {
        matches!(&self.gate_up, Some(w) if w.fuses()) && self.down.fuses()
    }

    /// `residual + mlp(rms_norm(x))` at decode (`mlp(x)` without a norm, no add without a
    /// residual): the norm folded into the gate|up matvec, the GLU (when `fold.glu`) and the
    /// residual add into the down matvec ([`Linear::forward_fused`]; separate ops where the
    /// weights do not allow it).
    ///
    /// `x` may come quantized for gate|up already ([`FfnInput::Quantized`]); the GLU then
    /// writes down's input quantized too, where down takes it ([`Linear::xq_form`]), and
    /// down may write the input of the matvec after the next norm (`norm_out`, returned
    /// beside y where down could: [`Linear::can_norm_out`]).
    pub fn forward_fused(
        &self,
        pass: &mut Pass,
        x: FfnInput<'_>,
        norm: Option<(&MlxBuffer, f32)>,
        fold: Folding,
        residual: Option<&MlxBuffer>,
        norm_out: Option<&NormOut<'_>>,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let x = match x {
            FfnInput::F32(x) => x,
            FfnInput::Quantized(xq) => {
                let w = self.gate_up.as_ref().ok_or_else(|| {
                    crate::LmError::Config("mlp: quantized x needs the stacked gate|up".into())
                })?;
                if let Some(hq) = self.glu_out(pass, w, FfnInput::Quantized(xq), fold)? {
                    return self.down_xq(pass, &hq, residual, norm_out);
                }
                let gate_up = w.forward_xq(pass, xq, None)?;
                return self.down_of(pass, &gate_up, fold, residual, norm_out);
            }
        };
        if let Some(w) = &self.gate_up {
            if norm.is_none() {
                if let Some(hq) = self.glu_out(pass, w, FfnInput::F32(x), fold)? {
                    return self.down_xq(pass, &hq, residual, norm_out);
                }
            }
            let up_fusion = QmvFusion {
                norm,
                ..QmvFusion::default()
            };
            let gate_up = w.forward_fused(pass, x, &up_fusion)?;
            return self.down_of(pass, &gate_up, fold, residual, norm_out);
        }
        let h = match norm {
            Some((w, eps)) => mlx_native::ops::rms_norm(pass, x, w, eps)?,
            None => x.clone(),
        };
        let g = self.gate.forward(pass, &h)?;
        let u = self.up.forward(pass, &h)?;
        let fusion = QmvFusion {
            residual,
            ..QmvFusion::default()
        };
        let h = glu(pass, &g, &u, self.act)?;
        Ok((self.down.forward_fused(pass, &h, &fusion)?, None))
    }

    /// The down projection of the stacked gate|up output (plus `residual`): the GLU folded
    /// into it (`fold.glu`), or its own dispatch writing down's input quantized where down
    /// takes that (`fold.quantized_x`), or in f32.
    fn down_of(
        &self,
        pass: &mut Pass,
        gate_up: &MlxBuffer,
        fold: Folding,
        residual: Option<&MlxBuffer>,
        norm_out: Option<&NormOut<'_>>,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        if fold.glu {
            let fusion = QmvFusion {
                glu: Some(self.act),
                residual,
                ..QmvFusion::default()
            };
            return Ok((self.down.forward_fused(pass, gate_up, &fusion)?, None));
        }
        if let Some(form) = self.down.xq_form().filter(|_| fold.quantized_x) {
            let hq = super::decoder::bound_reuse(2, 2, || {
                Ok(glu_split_xq(pass, gate_up, self.act, form)?)
            })?;
            return self.down_xq(pass, &hq, residual, norm_out);
        }
        let h = glu_split(pass, gate_up, self.act)?;
        let fusion = QmvFusion {
            residual,
            ..QmvFusion::default()
        };
        Ok((self.down.forward_fused(pass, &h, &fusion)?, None))
    }

    /// With `fold.glu_out`, the stacked gate|up matvec `w` of x with the GLU applied to its
    /// own rows, writing down's input quantized ([`Linear::forward_glu_out`]), where down
    /// reads that form and the device fits the kernel; else None.
    fn glu_out(
        &self,
        pass: &mut Pass,
        w: &Linear,
        x: FfnInput<'_>,
        fold: Folding,
    ) -> Result<Option<QuantizedX>> {
        let form = self
            .down
            .xq_form()
            .filter(|_| fold.glu_out && fold.quantized_x);
        match form {
            Some(form) if w.can_glu_out(form, pass.caps()) => {
                Ok(Some(w.forward_glu_out(pass, x, self.act, form)?))
            }
            _ => Ok(None),
        }
    }

    /// down of its quantized input (plus `residual`), writing the next norm's matvec input
    /// too where `norm_out` asks and down can.
    fn down_xq(
        &self,
        pass: &mut Pass,
        hq: &QuantizedX,
        residual: Option<&MlxBuffer>,
        norm_out: Option<&NormOut<'_>>,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        if let Some(out) = norm_out.filter(|o| self.down.can_norm_out(o, pass.caps())) {
            let hx = MatvecX::Quantized(hq);
            let (y, q) = self.down.forward_norm_out(pass, hx, residual, out)?;
            return Ok((y, Some(q)));
        }
        Ok((self.down.forward_xq(pass, hq, residual)?, None))
    }

    pub fn forward(&self, pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
        let h = match &self.gate_up {
            Some(w) => {
                let gu = w.forward(pass, x)?;
                glu_split(pass, &gu, self.act)?
            }
            None => {
                let g = self.gate.forward(pass, x)?;
                let u = self.up.forward(pass, x)?;
                glu(pass, &g, &u, self.act)?
            }
        };
        self.down.forward(pass, &h)
    }
}

/// A mixture-of-experts FFN: softmax router, top-k, optional renormalization.
pub struct MoeMlp {
    pub router: Linear,
    pub experts: MoeExperts,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub act: Act,
}

impl std::fmt::Debug for MoeMlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeMlp")
            .field("top_k", &self.top_k)
            .finish()
    }
}

impl MoeMlp {
    pub fn forward(&self, pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
        self.forward_residual(pass, x, None)
    }

    /// `residual + moe(x)`: the residual rides in the experts' weighted sum (one dispatch
    /// fewer than a separate add).
    pub fn forward_residual(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        residual: Option<&MlxBuffer>,
    ) -> Result<MlxBuffer> {
        self.forward_with(pass, x, None, residual)
    }

    /// [`MoeMlp::forward_residual`] at decode with x also quantized for the experts
    /// (`xq`: `ops::rms_norm_and_xq` in [`MoeMlp::xq_form`]): the router still reads f32 x.
    pub fn forward_with(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        xq: Option<&QuantizedX>,
        residual: Option<&MlxBuffer>,
    ) -> Result<MlxBuffer> {
        // f32 x: a rounded x can flip a top-k choice (Linear::forward_f32_x).
        let logits = self.router.forward_f32_x(pass, x)?;
        let cfg = self.config();
        Ok(match xq {
            Some(q) => moe_ffn_xq(pass, q, &logits, &self.experts, &cfg, residual)?,
            None => moe_ffn(pass, x, &logits, &self.experts, &cfg, residual)?,
        })
    }

    /// Decode with x quantized for the experts (`xq`; the router reads f32 `x`, normed here
    /// first with `norm` when `xq` carries that norm pending, from o's `NormOut`): the FFN's
    /// output added into `acc` (the residual stream, f32 `[T, H]`) in place, the down
    /// experts and the weighted sum in one dispatch (`ops::moe::moe_ffn_xq_into`).
    pub fn forward_into(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        xq: &QuantizedX,
        acc: &MlxBuffer,
        fold: MoeFold<'_>,
    ) -> Result<()> {
        let logits = match fold.norm {
            Some(n) => self.router.forward_f32_x_normed(pass, x, n)?,
            None => self.router.forward_f32_x(pass, x)?,
        };
        let cfg = MoeConfig {
            glu_out: fold.glu_out,
            ..self.config()
        };
        Ok(moe_ffn_xq_into(
            pass,
            xq,
            &logits,
            &self.experts,
            &cfg,
            acc,
        )?)
    }

    fn config(&self) -> MoeConfig<'static> {
        MoeConfig {
            router: RouterConfig {
                top_k: self.top_k,
                kind: RouterKind::SoftmaxTopK {
                    norm_topk_prob: self.norm_topk_prob,
                },
            },
            act: self.act,
            glu_out: false,
        }
    }

    /// The form of quantized x the gate and up experts read at decode, if they read one.
    pub fn xq_form(&self) -> Option<mlx_native::ops::XqForm> {
        experts_xq_form(&self.experts).map(|(gate_up, _)| gate_up)
    }
}

/// What [`MoeMlp::forward_into`] folds: the FFN norm the router applies (x's chunks carry
/// it pending), and the GLU into the stacked gate|up (`ops::moe::gather_qmv_xq_glu`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeFold<'a> {
    pub norm: Option<(&'a MlxBuffer, f32)>,
    pub glu_out: bool,
}

/// The FFN of one layer: dense or mixture of experts. (One per layer, built once and never
/// moved on a hot path, so the variants' size difference does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    Dense(Mlp),
    Moe(MoeMlp),
}

impl Ffn {
    pub fn forward(&self, pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
        match self {
            Ffn::Dense(m) => m.forward(pass, x),
            Ffn::Moe(m) => m.forward(pass, x),
        }
    }
}

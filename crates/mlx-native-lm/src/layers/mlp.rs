//! Feed-forward blocks: the gated MLP `down(act(gate(x)) * up(x))` (SwiGLU for Llama/Qwen,
//! GeGLU for Gemma), and the mixture of experts (Qwen3-MoE) that routes each token to its
//! top-k experts on the GPU, reading only the selected experts' weights at decode.

use mlx_native::ops::activation::{glu, Act};
use mlx_native::ops::moe::{moe_ffn, MoeConfig, MoeExperts, RouterConfig, RouterKind};
use mlx_native::{MlxBuffer, Pass};

use super::Linear;
use crate::error::Result;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Act,
}

impl Mlp {
    pub fn forward(&self, pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
        let g = self.gate.forward(pass, x)?;
        let u = self.up.forward(pass, x)?;
        let h = glu(pass, &g, &u, self.act)?;
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
        let logits = self.router.forward(pass, x)?;
        let cfg = MoeConfig {
            router: RouterConfig {
                top_k: self.top_k,
                kind: RouterKind::SoftmaxTopK {
                    norm_topk_prob: self.norm_topk_prob,
                },
            },
            act: self.act,
        };
        Ok(moe_ffn(pass, x, &logits, &self.experts, &cfg, None)?)
    }
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

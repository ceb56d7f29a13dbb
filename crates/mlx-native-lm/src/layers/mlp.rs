//! The gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU for Llama/Qwen, GeGLU for Gemma).

use mlx_native::ops::activation::{glu, Act};
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

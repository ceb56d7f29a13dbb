//! `Linear`: `y = x · Wᵀ` for a weight in any format we load (GGML blocks from GGUF, MLX
//! affine-quantized, dense f32/f16/bf16), and row gathers for embedding tables.

use mlx_native::ops::qmatmul::{self, QmvFusion, MAX_VEC_M};
use mlx_native::ops::{activation, dense, ggml_matmul};
use mlx_native::weights::ggml_weight::GgmlWeight;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{MlxBuffer, MlxDevice, Pass};

use crate::error::{LmError, Result};

/// A weight matrix `[out_features, in_features]` in the format the file had.
#[derive(Clone, Debug)]
pub enum Linear {
    Ggml(GgmlWeight),
    Quant(QuantWeight),
    Dense(MlxBuffer),
}

impl Linear {
    /// The GGUF tensor `name`.
    pub fn from_gguf(gpu: &MlxDevice, f: &GgufFile, name: &str) -> Result<Self> {
        Ok(Linear::Ggml(GgmlWeight::from_gguf(gpu, f, name)?))
    }

    /// GGML tensors (`parts`: type and bytes, `k` columns each) stacked into one weight, and
    /// each part as a view of it ([`GgmlWeight::upload_stacked`]); `None` when their types
    /// differ or the stack does not fit one shard (load them separately then).
    pub fn ggml_stacked(
        gpu: &MlxDevice,
        k: usize,
        parts: &[(mlx_native::weights::ggml::GgmlType, &[u8])],
    ) -> Result<Option<(Linear, Vec<Linear>)>> {
        let Some(&(kind, _)) = parts.first() else {
            return Ok(None);
        };
        if parts.iter().any(|&(t, _)| t != kind) {
            return Ok(None);
        }
        let bytes: Vec<&[u8]> = parts.iter().map(|&(_, b)| b).collect();
        Ok(
            GgmlWeight::upload_stacked(gpu, kind, k, &bytes)?.map(|(fused, views)| {
                (
                    Linear::Ggml(fused),
                    views.into_iter().map(Linear::Ggml).collect(),
                )
            }),
        )
    }

    /// `x [.., in] -> [.., out]`.
    pub fn forward(&self, pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
        Ok(match self {
            Linear::Ggml(w) => ggml_matmul::ggml_linear(pass, x, w)?,
            Linear::Quant(w) => qmatmul::qmatmul(pass, x, w)?,
            Linear::Dense(w) => dense::matmul(pass, x, w)?,
        })
    }

    /// `forward` with an MLX-quantized weight's matvec taking x in f32
    /// ([`qmatmul::qmatmul_f32_x`]): for outputs that make discrete choices (routers).
    pub fn forward_f32_x(&self, pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
        match self {
            Linear::Quant(w) => Ok(qmatmul::qmatmul_f32_x(pass, x, w)?),
            _ => self.forward(pass, x),
        }
    }

    /// `forward` with the work of `fusion` around it (a GLU on x, an RMS norm on x, a residual
    /// added to y; [`QmvFusion`]). Folded into one matvec ([`qmatmul::qmv_fused`]) for an
    /// MLX-quantized weight and at most 8 rows; otherwise run as the separate ops, so the
    /// result is the same either way.
    pub fn forward_fused(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        fusion: &QmvFusion<'_>,
    ) -> Result<MlxBuffer> {
        if let Linear::Quant(w) = self {
            if Self::folds(x, fusion) {
                return Ok(qmatmul::qmv_fused(pass, x, w, fusion)?);
            }
        }
        let mut h = x.clone();
        if let Some(act) = fusion.glu {
            h = activation::glu_split(pass, &h, act)?;
        }
        if let Some((w, eps)) = fusion.norm {
            h = mlx_native::ops::rms_norm(pass, &h, w, eps)?;
        }
        let y = self.forward(pass, &h)?;
        Ok(match fusion.residual {
            Some(r) => mlx_native::ops::add(pass, r, &y)?,
            None => y,
        })
    }

    /// Whether the matvec kernel takes `x` and `fusion` as they are.
    fn folds(x: &MlxBuffer, fusion: &QmvFusion<'_>) -> bool {
        let rows = x.shape().iter().rev().skip(1).product::<usize>();
        let norm_ok = fusion.norm.is_none_or(|(w, _)| {
            w.dtype() == mlx_native::DType::F32 && w.elem_offset().is_multiple_of(4)
        });
        rows <= MAX_VEC_M && norm_ok
    }

    /// Whether [`Linear::forward_fused`] folds its work into one matvec at decode.
    pub fn fuses(&self) -> bool {
        matches!(self, Linear::Quant(_))
    }

    /// Rows `ids` of the table, as f32 `[n, in_features]` (embedding lookup).
    pub fn gather(&self, pass: &mut Pass, ids: &MlxBuffer) -> Result<MlxBuffer> {
        Ok(match self {
            Linear::Ggml(w) => ggml_matmul::ggml_embedding(pass, w, ids)?,
            Linear::Quant(w) => qmatmul::gather_rows_quantized(pass, w, ids)?,
            Linear::Dense(w) => mlx_native::ops::embedding(pass, w, ids)?,
        })
    }

    /// `[out_features, in_features]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Linear::Ggml(w) => w.shape(),
            Linear::Quant(w) => w.shape(),
            Linear::Dense(w) => {
                let s = w.shape();
                [
                    s.first().copied().unwrap_or(0),
                    s.get(1).copied().unwrap_or(0),
                ]
            }
        }
    }

    /// Check the shape a model expects for the tensor `name`.
    pub fn expect_shape(&self, name: &str, out: usize, inp: usize) -> Result<()> {
        let s = self.shape();
        if s != [out, inp] {
            return Err(LmError::Config(format!(
                "tensor {name}: shape {s:?}, the model's config expects [{out}, {inp}]"
            )));
        }
        Ok(())
    }
}

/// A 1-D f32 vector (norm weights, biases) from a GGUF tensor of any float type.
pub fn vector_from_gguf(
    gpu: &MlxDevice,
    f: &GgufFile,
    name: &str,
    len: usize,
) -> Result<MlxBuffer> {
    let v = f.dequantize_tensor(name)?;
    if v.len() != len {
        return Err(LmError::Config(format!(
            "{}: tensor {name} has {} elements, the model's config expects {len}",
            f.name(),
            v.len()
        )));
    }
    Ok(MlxBuffer::from_slice(gpu, &v, &[len])?)
}

//! `Linear`: `y = x · Wᵀ` for a weight in any format we load (GGML blocks from GGUF, MLX
//! affine-quantized, dense f32/f16/bf16), and row gathers for embedding tables.

use mlx_native::ops::{dense, ggml_matmul, qmatmul};
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

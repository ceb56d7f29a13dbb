//! `Linear`: `y = x · Wᵀ` for a weight in any format we load (GGML blocks from GGUF, MLX
//! affine-quantized, dense f32/f16/bf16), and row gathers for embedding tables.

use mlx_native::ops::qmatmul::{self, MatvecX, NormOut, QmvFusion, QuantizedX, XqForm, MAX_VEC_M};
use mlx_native::ops::{activation, dense, ggml_matmul};
use mlx_native::weights::ggml::{legacy_to_affine, GgmlType};
use mlx_native::weights::ggml_weight::GgmlWeight;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{MlxBuffer, MlxDevice, Pass};

use crate::error::{LmError, Result};

/// A weight matrix `[out_features, in_features]` in the format the file had (GGUF's Q4_0
/// and Q4_1 become the identical MLX affine weights: [`Linear::from_ggml`]).
#[derive(Clone, Debug)]
pub enum Linear {
    Ggml(GgmlWeight),
    Quant(QuantWeight),
    Dense(MlxBuffer),
}

impl Linear {
    /// The GGUF tensor `name`.
    pub fn from_gguf(gpu: &MlxDevice, f: &GgufFile, name: &str) -> Result<Self> {
        let t = f
            .tensor(name)
            .ok_or_else(|| LmError::Config(format!("{}: no tensor named '{name}'", f.name())))?;
        if let [rows, cols] = t.shape[..] {
            if let Some(q) = affine_form(gpu, t.kind, f.tensor_bytes(name)?, rows, cols)? {
                return Ok(Linear::Quant(q));
            }
        }
        Ok(Linear::Ggml(GgmlWeight::from_gguf(gpu, f, name)?))
    }

    /// A GGML weight `[rows, cols]` of type `kind` from its blocks: Q4_0 and Q4_1 as the
    /// identical MLX affine weight (4 bits, group 32, f16 scales and biases;
    /// `weights::ggml::legacy_to_affine`), whose matvec (`ops::qmv`, integer dot products)
    /// is faster than the GGML block kernels; other types as GGML blocks.
    pub fn from_ggml(
        gpu: &MlxDevice,
        kind: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self> {
        if let Some(q) = affine_form(gpu, kind, bytes, rows, cols)? {
            return Ok(Linear::Quant(q));
        }
        Ok(Linear::Ggml(GgmlWeight::upload(
            gpu,
            kind,
            &[rows, cols],
            bytes,
        )?))
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
        let rows_of = |b: &[u8]| -> Result<usize> {
            let row = kind.row_bytes(k as u64)? as usize;
            Ok(b.len() / row.max(1))
        };
        // The MLX affine form, stacked like MLX weights (`QuantWeight::concat_rows`).
        let mut affine = Vec::with_capacity(parts.len());
        for &(_, b) in parts {
            match affine_form(gpu, kind, b, rows_of(b)?, k)? {
                Some(q) => affine.push(q),
                None => break,
            }
        }
        if affine.len() == parts.len() {
            let refs: Vec<&QuantWeight> = affine.iter().collect();
            return Ok(QuantWeight::concat_rows(gpu, &refs)?.map(|(fused, views)| {
                (
                    Linear::Quant(fused),
                    views.into_iter().map(Linear::Quant).collect(),
                )
            }));
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

    /// [`Linear::forward_f32_x`] of `rms_norm(x)` (`norm`: weight and eps), the norm folded
    /// into an MLX-quantized weight's matvec where it can be ([`qmatmul::qmv_fused_f32_x`]).
    pub fn forward_f32_x_normed(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        norm: (&MlxBuffer, f32),
    ) -> Result<MlxBuffer> {
        let fusion = QmvFusion {
            norm: Some(norm),
            ..QmvFusion::default()
        };
        if let Linear::Quant(w) = self {
            if Self::folds(x, &fusion) {
                return Ok(qmatmul::qmv_fused_f32_x(pass, x, w, &fusion)?);
            }
        }
        let h = mlx_native::ops::rms_norm(pass, x, norm.0, norm.1)?;
        self.forward_f32_x(pass, &h)
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

    /// The form of quantized x this weight's decode matvec reads ([`XqForm::of`]), if any:
    /// producers that write x in it (`ops::rms_norm_xq`, `glu_split_xq`) save the matvec
    /// quantizing it again in each of its row-sets.
    pub fn xq_form(&self) -> Option<XqForm> {
        match self {
            Linear::Quant(w) => XqForm::of(w),
            _ => None,
        }
    }

    /// The decode matvec of x already quantized for this weight ([`Linear::xq_form`]), with
    /// `residual` added.
    pub fn forward_xq(
        &self,
        pass: &mut Pass,
        x: &QuantizedX,
        residual: Option<&MlxBuffer>,
    ) -> Result<MlxBuffer> {
        match self {
            Linear::Quant(w) => Ok(qmatmul::qmv_xq(pass, x, w, residual)?),
            _ => Err(LmError::Config(
                "forward_xq: quantized x is only read by MLX-quantized weights".into(),
            )),
        }
    }

    /// Whether this weight's decode matvec can also write the input of the matvec after the
    /// RMS norm `out` ([`Linear::forward_norm_out`]): an MLX-quantized weight whose own x form
    /// is `out.form`, an f32 norm weight of its output width, a device that fits the
    /// kernel's workgroup.
    pub fn can_norm_out(&self, out: &NormOut<'_>, caps: &mlx_native::Caps) -> bool {
        match self {
            Linear::Quant(w) => {
                XqForm::of(w) == Some(out.form)
                    && out.weight.dtype() == mlx_native::DType::F32
                    && out.weight.len() == w.shape()[0]
                    && out.weight.elem_offset().is_multiple_of(4)
                    && qmatmul::norm_out_fits_weight(w, caps)
            }
            _ => false,
        }
    }

    /// The decode matvec plus `residual` ([`qmatmul::qmv_norm_out`]), also written as the
    /// input of the matvec after the RMS norm `out`, whose norm is then pending (that
    /// matvec finishes it). Only where [`Linear::can_norm_out`].
    pub fn forward_norm_out(
        &self,
        pass: &mut Pass,
        x: MatvecX<'_>,
        residual: Option<&MlxBuffer>,
        out: &NormOut<'_>,
    ) -> Result<(MlxBuffer, QuantizedX)> {
        match self {
            Linear::Quant(w) => Ok(qmatmul::qmv_norm_out(pass, x, w, residual, out)?),
            _ => Err(LmError::Config(
                "forward_norm_out: only MLX-quantized weights write quantized x".into(),
            )),
        }
    }

    /// Whether this stacked gate|up weight's decode matvec can apply the GLU to its own rows
    /// and write down's input in `form` ([`Linear::forward_glu_out`]): an MLX-quantized weight
    /// whose own x form is `form`, on a device that fits the kernel's workgroup.
    pub fn can_glu_out(&self, form: XqForm, caps: &mlx_native::Caps) -> bool {
        match self {
            Linear::Quant(w) => {
                XqForm::of(w) == Some(form)
                    && w.shape()[0].is_multiple_of(64)
                    && qmatmul::glu_out_fits_weight(w, caps)
            }
            _ => false,
        }
    }

    /// act(gate)·up of this stacked gate|up weight's decode matvec, quantized in `form` for
    /// the down matvec ([`qmatmul::qmv_glu_out`]). Only where [`Linear::can_glu_out`].
    pub fn forward_glu_out(
        &self,
        pass: &mut Pass,
        x: MatvecX<'_>,
        act: activation::Act,
        form: XqForm,
    ) -> Result<QuantizedX> {
        match self {
            Linear::Quant(w) => Ok(qmatmul::qmv_glu_out(pass, x, w, act, form)?),
            _ => Err(LmError::Config(
                "forward_glu_out: only MLX-quantized weights write quantized x".into(),
            )),
        }
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

/// The MLX affine form of a GGML weight where it has one and it pays: Q4_0 and Q4_1 (biases
/// within f16) that fit one storage binding (the GGML path shards larger tensors). Q8_0
/// stays GGML: its block kernel was already the fastest GGML one (~50 % of the read
/// bandwidth at 14336 x 4096 on an H100), the affine form reads 6 % more bytes (a bias per
/// block), and its matvec rounds x to 16 bits, where the GGML kernel keeps f32.
fn affine_form(
    gpu: &MlxDevice,
    kind: GgmlType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<QuantWeight>> {
    if !matches!(kind, GgmlType::Q4_0 | GgmlType::Q4_1)
        || bytes.len() as u64 > gpu.caps().max_storage_binding
    {
        return Ok(None);
    }
    match legacy_to_affine(kind, bytes, rows, cols)? {
        Some(q) => Ok(Some(QuantWeight::upload(gpu, &q)?)),
        None => Ok(None),
    }
}

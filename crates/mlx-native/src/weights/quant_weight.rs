//! `QuantWeight`: an MLX-quantized weight resident on the GPU, in MLX's own layout.
//!
//! The packed words stay exactly as `mx.quantize` wrote them (`[N, K * bits / 32]` u32, one
//! little-endian bit stream per row): the kernels read a row 32 codes at a time, which is
//! always `bits` whole, word-aligned words (K is a multiple of the group size, itself a
//! multiple of 32), so even 3/5/6-bit codes that straddle words need no load-time repack.
//! Scales and biases (`[N, K / group_size]`) stay in the model's dtype (f32, f16, bf16);
//! MXFP4 has one e8m0 byte per 32 values and no biases.

use half::{bf16, f16};

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::error::{MlxError, Result};
use crate::weights::quant::{QuantLayout, QuantMode, QuantParams, Quantized, Scales};

const OP: &str = "QuantWeight";

/// A quantized `[N, K]` weight on the GPU; `y = x · Wᵀ` via [`crate::ops::qmatmul()`].
#[derive(Clone, Debug)]
pub struct QuantWeight {
    packed: MlxBuffer,
    scales: MlxBuffer,
    biases: Option<MlxBuffer>,
    params: QuantParams,
    dtype: DType,
    layout: QuantLayout,
}

fn expect_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(MlxError::invalid(format!(
            "{OP}: {what} has {got} elements, expected {expected}"
        )));
    }
    Ok(())
}

fn expect_dtype(what: &str, got: DType, expected: DType) -> Result<()> {
    if got != expected {
        return Err(MlxError::invalid(format!(
            "{OP}: {what} is {got}, expected {expected}"
        )));
    }
    Ok(())
}

/// Float values (exactly representable in `dtype`) as little-endian bytes of `dtype`.
fn float_bytes(v: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        other => {
            return Err(MlxError::unsupported(format!(
                "{OP}: scales of dtype {other}; affine scales are f32, f16 or bf16"
            )))
        }
    })
}

impl QuantWeight {
    /// Upload a CPU-quantized weight; scales and biases are stored in `q.dtype`.
    pub fn upload(gpu: &MlxDevice, q: &Quantized) -> Result<Self> {
        let (scale_bytes, bias_bytes) = match (&q.scales, &q.biases) {
            (Scales::Float(s), Some(b)) => {
                (float_bytes(s, q.dtype)?, Some(float_bytes(b, q.dtype)?))
            }
            (Scales::E8m0(s), None) => (s.clone(), None),
            (Scales::Float(_), None) => {
                return Err(MlxError::invalid(format!(
                    "{OP}: affine weights need biases, got none"
                )))
            }
            (Scales::E8m0(_), Some(_)) => {
                return Err(MlxError::invalid(format!(
                    "{OP}: mxfp4 weights have no biases, got some"
                )))
            }
        };
        Self::from_raw(
            gpu,
            &q.packed,
            &scale_bytes,
            bias_bytes.as_deref(),
            [q.rows, q.cols],
            q.params,
            q.dtype,
        )
    }

    /// Upload from raw parts as stored in an MLX safetensors file: `packed` words, `scales`
    /// and `biases` as little-endian bytes of `dtype` (affine) or e8m0 bytes (MXFP4, no
    /// biases), for a logical `[N, K]` weight. `dtype` is the model dtype (for MXFP4 it only
    /// records the model's dtype; the scales are bytes).
    pub fn from_raw(
        gpu: &MlxDevice,
        packed: &[u32],
        scales: &[u8],
        biases: Option<&[u8]>,
        shape: [usize; 2],
        params: QuantParams,
        dtype: DType,
    ) -> Result<Self> {
        let layout = Self::check(shape, params, dtype)?;
        expect_len("packed", packed.len(), layout.words())?;
        let sdt = Self::scale_dtype(params, dtype);
        let per = sdt.size();
        if !scales.len().is_multiple_of(per) {
            return Err(MlxError::invalid(format!(
                "{OP}: scales has {} bytes, not a whole number of {sdt} values",
                scales.len()
            )));
        }
        expect_len("scales", scales.len() / per, layout.groups())?;
        let gshape = [layout.rows, layout.groups_per_row];
        let biases = match (params.mode, biases) {
            (QuantMode::Affine, Some(b)) => {
                if !b.len().is_multiple_of(per) {
                    return Err(MlxError::invalid(format!(
                        "{OP}: biases has {} bytes, not a whole number of {sdt} values",
                        b.len()
                    )));
                }
                expect_len("biases", b.len() / per, layout.groups())?;
                Some(MlxBuffer::from_bytes(gpu, b, sdt, &gshape)?)
            }
            (QuantMode::Affine, None) => {
                return Err(MlxError::invalid(format!(
                    "{OP}: affine weights need biases, got none"
                )))
            }
            (QuantMode::Mxfp4, Some(_)) => {
                return Err(MlxError::invalid(format!(
                    "{OP}: mxfp4 weights have no biases, got some"
                )))
            }
            (QuantMode::Mxfp4, None) => None,
        };
        Ok(QuantWeight {
            packed: MlxBuffer::from_slice(gpu, packed, &[layout.rows, layout.words_per_row])?,
            scales: MlxBuffer::from_bytes(gpu, scales, sdt, &gshape)?,
            biases,
            params,
            dtype,
            layout,
        })
    }

    /// Wrap buffers already on the GPU (for example a shard of a larger tensor). Checked like
    /// [`QuantWeight::from_raw`]; the packed buffer must start on a 16-byte boundary.
    pub fn from_buffers(
        packed: MlxBuffer,
        scales: MlxBuffer,
        biases: Option<MlxBuffer>,
        shape: [usize; 2],
        params: QuantParams,
    ) -> Result<Self> {
        let dtype = match params.mode {
            QuantMode::Affine => scales.dtype(),
            QuantMode::Mxfp4 => DType::F32,
        };
        let layout = Self::check(shape, params, dtype)?;
        expect_dtype("packed", packed.dtype(), DType::U32)?;
        expect_len("packed", packed.len(), layout.words())?;
        if !packed.elem_offset().is_multiple_of(4) {
            return Err(MlxError::invalid(format!(
                "{OP}: packed starts at word {}, expected a multiple of 4",
                packed.elem_offset()
            )));
        }
        expect_dtype("scales", scales.dtype(), Self::scale_dtype(params, dtype))?;
        expect_len("scales", scales.len(), layout.groups())?;
        match (params.mode, &biases) {
            (QuantMode::Affine, Some(b)) => {
                expect_dtype("biases", b.dtype(), dtype)?;
                expect_len("biases", b.len(), layout.groups())?;
            }
            (QuantMode::Affine, None) => {
                return Err(MlxError::invalid(format!(
                    "{OP}: affine weights need biases, got none"
                )))
            }
            (QuantMode::Mxfp4, Some(_)) => {
                return Err(MlxError::invalid(format!(
                    "{OP}: mxfp4 weights have no biases, got some"
                )))
            }
            (QuantMode::Mxfp4, None) => {}
        }
        Ok(QuantWeight {
            packed,
            scales,
            biases,
            params,
            dtype,
            layout,
        })
    }

    fn scale_dtype(params: QuantParams, dtype: DType) -> DType {
        match params.mode {
            QuantMode::Affine => dtype,
            QuantMode::Mxfp4 => DType::U8,
        }
    }

    fn check(shape: [usize; 2], params: QuantParams, dtype: DType) -> Result<QuantLayout> {
        if !dtype.is_float() {
            return Err(MlxError::unsupported(format!(
                "{OP}: dtype {dtype}; quantized weights are f32, f16 or bf16"
            )));
        }
        params
            .validate()
            .map_err(|e| MlxError::unsupported(format!("{OP}: {}", strip(&e))))?;
        let [n, k] = shape;
        if !k.is_multiple_of(params.group_size as usize) || k == 0 || n == 0 {
            return Err(MlxError::invalid(format!(
                "{OP}: shape [{n}, {k}]: K = {k} is not a positive multiple of group_size {}",
                params.group_size
            )));
        }
        QuantLayout::new(n, k, params)
    }

    /// The weights `parts` stacked along N (same K, bits, group size, mode and scale dtype),
    /// copied on the GPU into one weight, and the parts again as views into it (so they share
    /// its memory): one matvec then computes several projections of the same input. `None`
    /// when the parts differ in format or their buffers cannot be copied at 4-byte
    /// granularity.
    pub fn concat_rows(
        gpu: &MlxDevice,
        parts: &[&QuantWeight],
    ) -> Result<Option<(Self, Vec<Self>)>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let k = first.shape()[1];
        let same = parts.iter().all(|w| {
            w.shape()[1] == k
                && w.params == first.params
                && w.dtype == first.dtype
                && w.biases.is_some() == first.biases.is_some()
        });
        let aligned =
            |b: &MlxBuffer| b.offset.is_multiple_of(16) && b.byte_len().is_multiple_of(16);
        let all_aligned = parts.iter().all(|w| {
            aligned(&w.packed) && aligned(&w.scales) && w.biases.as_ref().is_none_or(aligned)
        });
        if !same || !all_aligned {
            return Ok(None);
        }
        let n: usize = parts.iter().map(|w| w.shape()[0]).sum();
        let cat = |get: &dyn Fn(&QuantWeight) -> &MlxBuffer| -> Result<MlxBuffer> {
            let bufs: Vec<&MlxBuffer> = parts.iter().map(|w| get(w)).collect();
            let len: usize = bufs.iter().map(|b| b.len()).sum();
            MlxBuffer::concat(gpu, &bufs, &[len])
        };
        let packed = cat(&|w| &w.packed)?;
        let scales = cat(&|w| &w.scales)?;
        let biases = match first.biases {
            Some(_) => Some(cat(&|w| w.biases.as_ref().unwrap_or(&w.scales))?),
            None => None,
        };
        let fused = Self::from_buffers(packed, scales, biases, [n, k], first.params)?;
        let mut views = Vec::with_capacity(parts.len());
        let (mut pw, mut sw) = (0, 0);
        for w in parts {
            let (wl, sl) = (w.packed.len(), w.scales.len());
            let view = |b: &MlxBuffer, at: usize, len: usize| b.view(at, &[len]);
            views.push(Self::from_buffers(
                view(&fused.packed, pw, wl)?,
                view(&fused.scales, sw, sl)?,
                match &fused.biases {
                    Some(b) => Some(view(b, sw, sl)?),
                    None => None,
                },
                w.shape(),
                w.params,
            )?);
            pw += wl;
            sw += sl;
        }
        Ok(Some((fused, views)))
    }

    /// Packed words `[N, K * bits / 32]` (u32).
    pub fn packed(&self) -> &MlxBuffer {
        &self.packed
    }

    /// Scales `[N, K / group_size]`: the model dtype (affine) or e8m0 bytes (u8, MXFP4).
    pub fn scales(&self) -> &MlxBuffer {
        &self.scales
    }

    /// Biases `[N, K / group_size]` (affine only).
    pub fn biases(&self) -> Option<&MlxBuffer> {
        self.biases.as_ref()
    }

    pub fn params(&self) -> QuantParams {
        self.params
    }

    pub fn bits(&self) -> u32 {
        self.params.bits
    }

    pub fn group_size(&self) -> u32 {
        self.params.group_size
    }

    pub fn mode(&self) -> QuantMode {
        self.params.mode
    }

    /// The model dtype the scales (affine) are stored in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The logical shape `[N, K]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.layout.rows, self.layout.cols]
    }

    /// Words and groups per row.
    pub fn layout(&self) -> QuantLayout {
        self.layout
    }
}

/// `Unsupported`'s message without its "unsupported: " prefix (it is re-wrapped).
fn strip(e: &MlxError) -> String {
    match e {
        MlxError::Unsupported(m) | MlxError::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

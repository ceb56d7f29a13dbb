//! Stacked expert weights of a Mixture-of-Experts layer, `[E, N, K]`, for the routed
//! matmuls of [`crate::ops::moe`]:
//! - [`QuantExperts`]: MLX-quantized (`switch_mlp.{gate,up,down}_proj` as mlx-lm stores them:
//!   packed `[E, N, K * bits / 32]`, scales and biases `[E, N, K / group_size]`). Held as one
//!   [`QuantWeight`] of `[E * N, K]`: experts are consecutive blocks of N rows, so the
//!   layout is MLX's own, unchanged.
//! - [`GgmlExperts`]: GGUF `ffn_{gate,up,down}_exps` (`[E, N, K]` row-major), repacked as
//!   [`crate::weights::ggml_weight`] does, and split into shards of whole experts that each
//!   fit one storage binding.
//! - [`ExpertWeight`]: either, for [`crate::ops::moe::moe_ffn`].

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::error::{MlxError, Result};
use crate::weights::ggml::GgmlType;
use crate::weights::ggml_weight::{repack, scale_offset};
use crate::weights::gguf::GgufFile;
use crate::weights::quant::{QuantParams, Quantized, Scales};
use crate::weights::quant_weight::QuantWeight;

/// MLX-quantized stacked experts `[E, N, K]`.
#[derive(Clone, Debug)]
pub struct QuantExperts {
    weight: QuantWeight,
    experts: usize,
}

impl QuantExperts {
    /// From a weight of `[E * N, K]` whose rows are the experts' rows, expert by expert.
    pub fn new(weight: QuantWeight, experts: usize) -> Result<Self> {
        let [rows, k] = weight.shape();
        if experts == 0 || !rows.is_multiple_of(experts) {
            return Err(MlxError::invalid(format!(
                "QuantExperts: {rows} rows of K = {k} do not split into {experts} experts"
            )));
        }
        Ok(QuantExperts { weight, experts })
    }

    /// Upload from raw parts as stored in an MLX safetensors file (`packed`: u32 words of
    /// `[E, N, K * bits / 32]`; `scales` / `biases`: bytes of `[E, N, K / group_size]`).
    pub fn from_raw(
        gpu: &MlxDevice,
        packed: &[u32],
        scales: &[u8],
        biases: Option<&[u8]>,
        shape: [usize; 3],
        params: QuantParams,
        dtype: DType,
    ) -> Result<Self> {
        let [e, n, k] = shape;
        let rows = e.checked_mul(n).ok_or_else(|| {
            MlxError::invalid(format!("QuantExperts: shape {shape:?} is too large"))
        })?;
        let w = QuantWeight::from_raw(gpu, packed, scales, biases, [rows, k], params, dtype)?;
        Self::new(w, e)
    }

    /// Upload CPU-quantized experts (each `[N, K]`, same format) as one stack.
    pub fn upload(gpu: &MlxDevice, experts: &[Quantized]) -> Result<Self> {
        let first = experts
            .first()
            .ok_or_else(|| MlxError::invalid("QuantExperts: no experts".to_string()))?;
        let mut packed = Vec::new();
        let mut scales = Vec::new();
        let mut biases = Vec::new();
        let mut e8m0 = Vec::new();
        for (i, q) in experts.iter().enumerate() {
            if (q.rows, q.cols, q.params, q.dtype)
                != (first.rows, first.cols, first.params, first.dtype)
            {
                return Err(MlxError::invalid(format!(
                    "QuantExperts: expert {i} is [{}, {}] {:?} {}, expert 0 is [{}, {}] {:?} {}",
                    q.rows,
                    q.cols,
                    q.params,
                    q.dtype,
                    first.rows,
                    first.cols,
                    first.params,
                    first.dtype
                )));
            }
            packed.extend_from_slice(&q.packed);
            match &q.scales {
                Scales::Float(s) => scales.extend_from_slice(s),
                Scales::E8m0(s) => e8m0.extend_from_slice(s),
            }
            if let Some(b) = &q.biases {
                biases.extend_from_slice(b);
            }
        }
        let all = Quantized {
            packed,
            scales: match first.scales {
                Scales::Float(_) => Scales::Float(scales),
                Scales::E8m0(_) => Scales::E8m0(e8m0),
            },
            biases: first.biases.as_ref().map(|_| biases),
            rows: first.rows * experts.len(),
            cols: first.cols,
            params: first.params,
            dtype: first.dtype,
        };
        Self::new(QuantWeight::upload(gpu, &all)?, experts.len())
    }

    /// The whole stack as one `[E * N, K]` weight.
    pub fn weight(&self) -> &QuantWeight {
        &self.weight
    }

    /// `[E, N, K]`.
    pub fn shape(&self) -> [usize; 3] {
        let [rows, k] = self.weight.shape();
        [self.experts, rows / self.experts, k]
    }

    pub fn experts(&self) -> usize {
        self.experts
    }
}

/// Whole experts `e0 .. e0 + experts` of a [`GgmlExperts`], in one buffer.
#[derive(Clone, Debug)]
pub struct GgmlExpertShard {
    pub e0: usize,
    pub experts: usize,
    /// Repacked words (`DType::U32`).
    pub buffer: MlxBuffer,
    /// Word offset of the f16 scale array (split layouts; 0 otherwise).
    pub scale_off: usize,
}

/// GGUF stacked experts `[E, N, K]` of one GGML type on the GPU.
#[derive(Clone, Debug)]
pub struct GgmlExperts {
    kind: GgmlType,
    shape: [usize; 3],
    shards: Vec<GgmlExpertShard>,
}

impl GgmlExperts {
    /// Upload a `[E, N, K]` tensor from its GGUF bytes (row-major: expert, row, column).
    pub fn upload(
        gpu: &MlxDevice,
        kind: GgmlType,
        shape: [usize; 3],
        bytes: &[u8],
    ) -> Result<Self> {
        Self::upload_with_limit(gpu, kind, shape, bytes, gpu.caps().max_storage_binding)
    }

    /// [`GgmlExperts::upload`] of the GGUF tensor `name` (a 3-D `ffn_*_exps`).
    pub fn from_gguf(gpu: &MlxDevice, file: &GgufFile, name: &str) -> Result<Self> {
        let t = file
            .tensor(name)
            .ok_or_else(|| MlxError::format(file.name(), format!("no tensor named '{name}'")))?;
        let shape: [usize; 3] = t.shape.as_slice().try_into().map_err(|_| {
            MlxError::format(
                file.name(),
                format!(
                    "tensor '{name}': shape {:?} is not [experts, rows, cols]",
                    t.shape
                ),
            )
        })?;
        Self::upload(gpu, t.kind, shape, file.tensor_bytes(name)?)
            .map_err(|e| MlxError::format(file.name(), format!("tensor '{name}': {e}")))
    }

    pub(crate) fn upload_with_limit(
        gpu: &MlxDevice,
        kind: GgmlType,
        shape: [usize; 3],
        bytes: &[u8],
        max_binding: u64,
    ) -> Result<Self> {
        let op = "GgmlExperts::upload";
        let [e, n, k] = shape;
        if e == 0 || n == 0 || k == 0 {
            return Err(MlxError::invalid(format!(
                "{op}: shape {shape:?} has a zero-size dimension"
            )));
        }
        let row = kind
            .row_bytes(k as u64)
            .map_err(|err| MlxError::invalid(format!("{op}: {err}")))?;
        let expert = row.checked_mul(n as u64);
        let want = expert.and_then(|x| x.checked_mul(e as u64));
        if want != Some(bytes.len() as u64) {
            let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
            return Err(MlxError::invalid(format!(
                "{op}: {kind} {shape:?} needs {want} bytes, got {}",
                bytes.len()
            )));
        }
        let expert = expert.unwrap_or(u64::MAX);
        // Word indices in the kernels are u32: at most 2 GiB per shard.
        let limit = max_binding.min(1 << 31);
        let one = expert.div_ceil(4) * 4;
        if one > limit {
            return Err(MlxError::invalid(format!(
                "{op}: one {kind} expert of [{n}, {k}] needs {one} bytes, more than the \
                 storage-binding limit of {limit} bytes"
            )));
        }
        let per = ((limit / expert.max(1)) as usize).clamp(1, e);
        let expert = expert as usize;
        let mut shards = Vec::with_capacity(e.div_ceil(per));
        let mut e0 = 0;
        while e0 < e {
            let experts = per.min(e - e0);
            let words = repack(kind, &bytes[e0 * expert..(e0 + experts) * expert]);
            let buffer = MlxBuffer::from_slice(gpu, &words, &[words.len()])?;
            let blocks = experts * n * (k / kind.block_elems());
            shards.push(GgmlExpertShard {
                e0,
                experts,
                buffer,
                scale_off: scale_offset(kind, blocks),
            });
            e0 += experts;
        }
        Ok(GgmlExperts {
            kind,
            shape,
            shards,
        })
    }

    pub fn kind(&self) -> GgmlType {
        self.kind
    }

    /// `[E, N, K]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    pub fn experts(&self) -> usize {
        self.shape[0]
    }

    pub fn shards(&self) -> &[GgmlExpertShard] {
        &self.shards
    }
}

/// Stacked experts in either format.
#[derive(Clone, Debug)]
pub enum ExpertWeight {
    Mlx(QuantExperts),
    Ggml(GgmlExperts),
}

impl ExpertWeight {
    /// `[E, N, K]`.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            ExpertWeight::Mlx(w) => w.shape(),
            ExpertWeight::Ggml(w) => w.shape(),
        }
    }
}

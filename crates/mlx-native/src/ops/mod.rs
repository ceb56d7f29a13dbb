//! Ops: one module per family, each with its WGSL in `shaders/<family>.wgsl`.

pub mod activation;
pub mod bandwidth;
pub mod dense;
pub mod elementwise;
pub mod embedding;
pub mod fill;
pub mod ggml_matmul;
pub mod kv;
pub mod kv_quant;
pub mod layout;
pub mod moe;
pub mod norm;
pub mod qmatmul;
pub mod rope;
pub mod sample;
pub mod sdpa;
pub mod select;
pub mod softmax;

pub use activation::{gelu, glu, glu_split, glu_split_xq, glu_xq, silu, softcap, Act, GeluApprox};
pub use dense::matmul;
pub use elementwise::{add, add_scaled, mul, scale};
pub use embedding::{embedding, embedding_scaled};
pub use fill::fill;
pub use ggml_matmul::{ggml_embedding, ggml_linear, ggml_matmul, ggml_matvec};
pub use kv::kv_append;
pub use kv_quant::{kv_quant_append, kv_quant_dequant, sdpa_decode_quant, sdpa_prefill_quant};
pub use layout::{concat_last, copy, transpose, transpose_last2};
pub use moe::{
    expert_ids, gather_matmul, gather_qmm, ggml_gather_matvec, moe_combine, moe_ffn, moe_glu,
    moe_route, MoeConfig, MoeExperts, RouterConfig, RouterKind,
};
pub use norm::{
    layer_norm, rms_norm, rms_norm_and_xq, rms_norm_post_residual_xq, rms_norm_residual,
    rms_norm_residual_xq, rms_norm_xq,
};
pub use qmatmul::{
    dequantize, gather_rows_quantized, qmatmul, qmm, qmv, qmv_fused, qmv_glu_out, qmv_norm_out,
    qmv_xq, quantize_x, MatvecX, NormOut, QmvFusion, QuantizedX, XqForm,
};
pub use rope::{norm_rope, rope, RopeConfig, RopeScaling, RopeStyle, RopeTable};
pub use sdpa::{sdpa_decode, sdpa_prefill, SdpaOptions};
pub use select::{argmax, argsort, top_k};
pub use softmax::softmax;

use crate::device::Caps;

/// Workgroup size and subgroup use for kernels that give one workgroup to a row.
pub(crate) fn row_wg(caps: &Caps, n: usize) -> (u32, bool) {
    // Short rows waste lanes at 256; the reduction needs a power of two.
    let wg = if n <= 64 {
        64
    } else if n <= 128 {
        128
    } else {
        256
    };
    (
        wg.min(caps.max_invocations_per_workgroup.max(64)),
        caps.subgroups,
    )
}

/// Workgroup sizes `row_wg` can choose.
pub(crate) const ROW_WGS: [u32; 3] = [64, 128, 256];

/// The float dtypes weights come in.
pub(crate) const FLOAT_DTYPES: [crate::DType; 3] =
    [crate::DType::F32, crate::DType::F16, crate::DType::BF16];

/// Every (kernel, spec) any op can dispatch: the shader validation test compiles each one.
/// Each op module lists its own, built by the same functions its dispatches use.
pub fn all_specs() -> crate::Result<Vec<(crate::Kernel, crate::Spec)>> {
    let mut v = Vec::new();
    v.extend(bandwidth::specs());
    v.extend(fill::specs());
    v.extend(elementwise::specs());
    v.extend(norm::specs()?);
    v.extend(softmax::specs()?);
    v.extend(activation::specs()?);
    v.extend(rope::specs()?);
    v.extend(embedding::specs());
    v.extend(select::specs()?);
    v.extend(layout::specs());
    v.extend(kv::specs()?);
    v.extend(sdpa::specs()?);
    v.extend(kv_quant::specs()?);
    v.extend(sample::specs());
    v.extend(ggml_matmul::specs()?);
    v.extend(qmatmul::specs()?);
    v.extend(dense::specs()?);
    v.extend(moe::specs()?);
    Ok(v)
}

//! Mixture-of-Experts on the GPU: routing, routed (gathered) expert matmuls over stacked
//! quantized experts, the gated activation, the weighted combine, and a whole MoE FFN layer
//! recorded into one [`Pass`] with no CPU round trip (expert ids never leave the GPU).
//!
//! - [`moe_route`]: router logits `[T, E]` -> `(weights f32 [T, k], ids u32 [T, k])` for
//!   Qwen3-MoE / Mixtral (softmax, top-k, optional renormalization), Gemma-4-style
//!   (softmax, top-k, renormalize, per-expert scale) and DeepSeek-V3 (sigmoid, top-k on the
//!   score plus a selection bias, weights from the unbiased scores). One workgroup of 256 per
//!   token, one expert per invocation (E <= 256), k rounds of a workgroup arg-max (k <= 16);
//!   ties pick the lowest expert index. Softmax variants select on the logits (the same order
//!   as the probabilities, minus ties invented by rounding `exp`).
//! - [`gather_qmm`]: `mx.gather_qmm(x, w, rhs_indices=ids, transpose=True)` for MLX stacked
//!   experts ([`QuantExperts`], any format `qmatmul` takes). Output `[T, k, N]`, one row
//!   per (token, slot) pair; x is `[T, K]` (shared by a token's slots: gate/up projections)
//!   or `[T, k, K]` (one row per pair: the down projection).
//!   - *decode* (T <= 8, [`GatherPath::Vector`]): `gqmv`, the qmv kernel with one pair per
//!     workgroup and `2 * RPT` rows of its expert. Only the selected experts' rows are read
//!     (top-8 of 128 at Qwen3-30B-A3B shapes: 1/16 of the layer), each row by 32 invocations
//!     striding over 32-code chunks, so consecutive invocations read consecutive 16-byte
//!     (4-bit) / 32-byte (8-bit) chunks: coalesced vec4 loads. Two tokens that pick the same
//!     expert read its rows twice (the second read mostly from cache).
//!   - *prefill* ([`GatherPath::Sorted`]): a one-workgroup counting sort of the `T * k` pairs
//!     by expert (histogram in workgroup atomics, prefix sum, scatter) that also writes a
//!     table of tiles (runs of <= 64 pairs of one expert), then `gqmm`, the 64 x 64 tiled
//!     qmm over the gathered x rows, one workgroup per (tile, 64 outputs). The grid is the
//!     worst case (`ceil(P / 64) + min(E + 1, P)` tiles); workgroups past the real tile
//!     count do nothing. Each expert's weight is read once per tile row of 64 pairs, not
//!     once per pair. No cooperative-matrix variant yet.
//! - [`ggml_gather_matvec`]: the same routed product for GGUF stacked experts
//!   ([`GgmlExperts`], every GGML type the matvec takes): one workgroup per (pair, output
//!   row) with the GGML matvec's unit decoding (eight invocations per 32-element unit),
//!   dispatched per shard of whole experts. Used for decode and prefill alike (no sorted
//!   tiled path for GGML yet).
//! - [`moe_glu`], [`moe_combine`] (weighted sum over the k slots plus an optional shared
//!   expert output), and [`moe_ffn`]: route -> gate/up gathers -> GLU -> down gather ->
//!   combine.
//!
//! Expert ids are not checked on the GPU path (they are GPU data): an id `>= E` never
//! indexes the weights (clamped) and its output rows are zeros. [`expert_ids`] uploads
//! CPU-known ids and rejects out-of-range ones.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};
use crate::ops::activation::{glu, Act};
use crate::ops::qmatmul::{self, plan, CoopParams, MatmulPlan, QuantizedX, XqForm};
use crate::weights::expert_weight::{ExpertWeight, GgmlExperts, QuantExperts};
use crate::weights::ggml::GgmlType;
use crate::weights::quant::{QuantParams, AFFINE_BITS, AFFINE_GROUP_SIZES};
use crate::weights::quant_weight::QuantWeight;
use crate::Caps;

/// Most experts the router takes (one per invocation of a workgroup of 256).
pub const MAX_EXPERTS: usize = 256;
/// Largest top-k the router takes.
pub const MAX_TOP_K: usize = 16;
/// Most tokens the decode path ([`GatherPath::Vector`]) is chosen for.
pub const MAX_VEC_TOKENS: usize = 8;
/// Pairs per tile of the sorted path.
const TILE_PAIRS: usize = 64;
const WG: u32 = 256;
const GQMV_WG: u32 = 64;
/// gqmv_combine: 8 row-blocks of 32 invocations (moe_quant.wgsl's CB).
const GQMV_COMBINE_WG: u32 = 256;
/// gqmv_glu: 16 row-blocks of 32 invocations (32 gate rows and 32 up rows of 4 a block).
const GQMV_GLU_WG: u32 = 512;
const ACTS: [Act; 3] = [Act::Silu, Act::GeluTanh, Act::GeluErf];
const GQMM_WG: u32 = 256;
const RPTS: [u32; 3] = [1, 2, 4];

/// Rows per row-block forced on the routed matvec (benchmarks; 0 = the plan's).
static GQMV_RPT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Force the routed matvec's rows per row-block (1, 2 or 4; `None`: the plan's), for A/B
/// timings.
#[doc(hidden)]
pub fn set_gqmv_rpt(rpt: Option<u32>) -> Result<()> {
    let v = rpt.unwrap_or(0);
    if !matches!(v, 0 | 1 | 2 | 4) {
        return Err(MlxError::invalid(format!("gqmv: rpt {v} is not 1, 2 or 4")));
    }
    GQMV_RPT.store(v, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
const GGML_WGS: [u32; 3] = [64, 128, 256];

/// How the router turns logits into expert weights.
#[derive(Clone, Copy, Debug)]
pub enum RouterKind<'a> {
    /// Qwen3-MoE, Mixtral, OLMoE: softmax over all experts, top-k of the probabilities,
    /// divided by their sum when `norm_topk_prob`.
    SoftmaxTopK { norm_topk_prob: bool },
    /// Gemma-4 style: softmax, top-k, renormalized to sum 1, then each times
    /// `per_expert_scale[expert]` (f32 `[E]`).
    SoftmaxTopKScaled { per_expert_scale: &'a MlxBuffer },
    /// DeepSeek-V3: `s = sigmoid(logits)`; the top-k of `s + bias` (f32 `[E]`, selection
    /// only) are chosen; their weights are `s / Σ s` over the chosen, times
    /// `routed_scaling_factor`. (Group-limited selection, `n_group` / `topk_group`, is not
    /// applied.)
    SigmoidBiased {
        bias: &'a MlxBuffer,
        routed_scaling_factor: f32,
    },
}

/// Router settings: the experts per token and the scoring.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig<'a> {
    pub top_k: usize,
    pub kind: RouterKind<'a>,
}

/// Which kernels [`gather_qmm`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatherPath {
    /// One pair per workgroup (decode).
    Vector,
    /// Pairs sorted by expert, then 64 x 64 tiles over runs of one expert (prefill).
    Sorted,
}

/// The path for `tokens` rows of x.
pub fn gather_path(tokens: usize) -> GatherPath {
    if tokens <= MAX_VEC_TOKENS {
        GatherPath::Vector
    } else {
        GatherPath::Sorted
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RouteParams {
    t: u32,
    e: u32,
    k: u32,
    kind: u32,
    norm: u32,
    scale: f32,
    _pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<RouteParams>() == 32);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MoeParams {
    n: u32,
    top_k: u32,
    h: u32,
    experts: u32,
    max_tiles: u32,
    order_at: u32,
    bm: u32,
    has_shared: u32,
}
const _: () = assert!(std::mem::size_of::<MoeParams>() == 32);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GatherParams {
    pairs: u32,
    n: u32,
    k: u32,
    wpr: u32,
    gpr: u32,
    top_k: u32,
    experts: u32,
    max_tiles: u32,
    /// gqmv over chunks with a pending norm: its epsilon.
    eps: f32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<GatherParams>() == 48);

/// ggml_common.wgsl's `Params`, with the fields this file gives other meanings.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GgmlGatherParams {
    pairs: u32,
    k: u32,
    n: u32,
    shard_experts: u32,
    shard_e0: u32,
    bpr: u32,
    scale_off: u32,
    units: u32,
    first_shard: u32,
    /// ggml_common's `xvec`: the routed kernel reads x through `x4`, never as vec4s.
    xvec: u32,
    experts: u32,
    x_div: u32,
}
const _: () = assert!(std::mem::size_of::<GgmlGatherParams>() == 48);

// ---------------------------------------------------------------------------------------
// specs

fn quant_formats() -> Vec<(QuantParams, DType)> {
    let mut v = Vec::new();
    for bits in AFFINE_BITS {
        for gs in AFFINE_GROUP_SIZES {
            for dt in super::FLOAT_DTYPES {
                v.push((QuantParams::affine(bits, gs), dt));
            }
        }
    }
    v.push((QuantParams::mxfp4(), DType::U8));
    v
}

fn qspec(entry: &'static str, params: QuantParams, dt: DType, wg: u32) -> Result<Spec> {
    Spec::new(entry, dt, wg)
        .with_const("BITS", params.bits)?
        .with_const("GROUP_SIZE", params.group_size)
}

/// The routed matvec's spec: `xsrc` x comes as [`QuantizedX`] chunks in the `xq` form, `gu`
/// the weight is the stacked gate|up (`MoeExperts::gate_up`), `pend` the chunks carry a
/// pending norm ([`QuantizedX::pending_norm`]).
fn gqmv_spec(
    params: QuantParams,
    dt: DType,
    rpt: u32,
    sg: bool,
    xq: u32,
    (xsrc, gu, pend): (bool, bool, bool),
) -> Result<Spec> {
    let mode = u32::from(pend) << 8 | u32::from(gu) << 7 | u32::from(xsrc) << 6;
    Ok(qspec("gqmv", params, dt, GQMV_WG)?
        .with_const("GQMV", mode | xq << 4 | rpt)?
        .with_subgroups(sg))
}

/// The stacked gate|up matvec with the GLU on its own rows (`gqmv_glu`): x as
/// [`QuantizedX`] chunks in the `xq` form, with a pending norm (`pend`) or not.
fn gqmv_glu_spec(
    params: QuantParams,
    dt: DType,
    sg: bool,
    (xq, pend): (u32, bool),
    act: Act,
) -> Result<Spec> {
    let mode = act.code() << 9 | u32::from(pend) << 8 | 1 << 7 | 1 << 6 | xq << 4 | 4;
    Ok(qspec("gqmv_glu", params, dt, GQMV_GLU_WG)?
        .with_const("GQMV", mode)?
        .with_subgroups(sg))
}

/// The routed matvec with the weighted sum over a token's slots (`gqmv_combine`): x as
/// [`QuantizedX`] chunks in the `xq` form.
fn gqmv_combine_spec(params: QuantParams, dt: DType, rpt: u32, sg: bool, xq: u32) -> Result<Spec> {
    Ok(qspec("gqmv_combine", params, dt, GQMV_COMBINE_WG)?
        .with_const("GQMV", 1 << 6 | xq << 4 | rpt)?
        .with_subgroups(sg))
}

fn ggml_spec(kind: GgmlType, wg: u32, sg: bool) -> Result<(Kernel, Spec)> {
    let entry = "moe_matvec";
    let (kernel, spec) = match kind {
        GgmlType::F32 => (Kernel::MoeGgmlDense, Spec::new(entry, DType::F32, wg)),
        GgmlType::F16 => (Kernel::MoeGgmlDense, Spec::new(entry, DType::F16, wg)),
        GgmlType::BF16 => (Kernel::MoeGgmlDense, Spec::new(entry, DType::BF16, wg)),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => (
            Kernel::MoeGgmlLegacy,
            Spec::new(entry, DType::F32, wg).with_const("QTYPE", kind.id())?,
        ),
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => (
            Kernel::MoeGgmlK,
            Spec::new(entry, DType::F32, wg).with_const("QTYPE", kind.id())?,
        ),
    };
    Ok((kernel, spec.with_subgroups(sg)))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = vec![
        (Kernel::MoeRoute, Spec::new("route", DType::F32, WG)),
        (
            Kernel::MoeRoute,
            Spec::new("route", DType::F32, WG).with_subgroups(true),
        ),
        (Kernel::Moe, Spec::new("sort_pairs", DType::F32, WG)),
        (Kernel::Moe, Spec::new("combine", DType::F32, WG)),
    ];
    for (params, dt) in quant_formats() {
        for rpt in RPTS {
            for sg in [false, true] {
                for xq in [0, qmatmul::default_xq(params)] {
                    let modes: &[(bool, bool, bool)] = if xq != 0 {
                        &[
                            (false, false, false),
                            (true, false, false),
                            (true, true, false),
                            (true, false, true),
                            (true, true, true),
                        ]
                    } else {
                        &[(false, false, false)]
                    };
                    for &mode in modes {
                        v.push((Kernel::MoeQuant, gqmv_spec(params, dt, rpt, sg, xq, mode)?));
                    }
                    if xq != 0 && rpt == 4 {
                        let spec = gqmv_combine_spec(params, dt, rpt, sg, xq)?;
                        v.push((Kernel::MoeQuant, spec));
                        for pend in [false, true] {
                            for act in ACTS {
                                let spec = gqmv_glu_spec(params, dt, sg, (xq, pend), act)?;
                                v.push((Kernel::MoeQuant, spec));
                            }
                        }
                    }
                }
            }
        }
        v.push((Kernel::MoeQuant, qspec("gqmm", params, dt, GQMM_WG)?));
    }
    for kind in GgmlType::ALL {
        for wg in GGML_WGS {
            for sg in [false, true] {
                v.push(ggml_spec(kind, wg, sg)?);
            }
        }
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// routing

/// The router kernel: subgroup reductions where every subgroup has at least 4 invocations
/// (moe_route.wgsl keeps a partial per subgroup, at most 64).
fn route_spec(caps: &Caps) -> Spec {
    let sg = caps.subgroups && caps.subgroup_min_size >= 4;
    Spec::new("route", DType::F32, WG).with_subgroups(sg)
}

/// Route each token: `logits` f32 `[T, E]` (any leading shape; E <= 256) to the chosen
/// experts' weights (f32 `[T, top_k]`) and ids (u32 `[T, top_k]`), best first.
pub fn moe_route(
    pass: &mut Pass,
    logits: &MlxBuffer,
    cfg: &RouterConfig<'_>,
) -> Result<(MlxBuffer, MlxBuffer)> {
    let op = "moe_route";
    check::dtype(logits, &[DType::F32], op, "logits")?;
    let (t, e) = check::rows(logits, op, "logits")?;
    check::ensure(e <= MAX_EXPERTS, op, || {
        format!("logits has {e} experts, at most {MAX_EXPERTS}")
    })?;
    let k = cfg.top_k;
    check::ensure((1..=MAX_TOP_K).contains(&k), op, || {
        format!("top_k = {k}, expected 1..={MAX_TOP_K}")
    })?;
    check::ensure(k <= e, op, || {
        format!("top_k = {k} exceeds the {e} experts")
    })?;
    let (kind, norm, scale, table) = match cfg.kind {
        RouterKind::SoftmaxTopK { norm_topk_prob } => (0, norm_topk_prob, 1.0, None),
        RouterKind::SoftmaxTopKScaled { per_expert_scale } => {
            check::dtype(per_expert_scale, &[DType::F32], op, "per_expert_scale")?;
            check::len(per_expert_scale, e, op, "per_expert_scale")?;
            (1, true, 1.0, Some(per_expert_scale))
        }
        RouterKind::SigmoidBiased {
            bias,
            routed_scaling_factor,
        } => {
            check::dtype(bias, &[DType::F32], op, "bias")?;
            check::len(bias, e, op, "bias")?;
            (2, true, routed_scaling_factor, Some(bias))
        }
    };
    let t32 = check::fits_u32(t, op, "tokens")?;
    let weights = pass.alloc(DType::F32, &[t, k])?;
    let ids = pass.alloc(DType::U32, &[t, k])?;
    let params = RouteParams {
        t: t32,
        e: e as u32,
        k: k as u32,
        kind,
        norm: u32::from(norm),
        scale,
        _pad: [0; 2],
    };
    let tb = table.unwrap_or(logits);
    let spec = route_spec(pass.caps());
    pass.dispatch(
        Kernel::MoeRoute,
        spec,
        &params,
        &[logits, tb, &weights, &ids],
        t32,
    )?;
    Ok((weights, ids))
}

/// Upload CPU-known expert ids (`[T, top_k]`), rejecting any `>= experts`.
pub fn expert_ids(
    gpu: &MlxDevice,
    ids: &[u32],
    shape: [usize; 2],
    experts: usize,
) -> Result<MlxBuffer> {
    let op = "expert_ids";
    check::ensure(ids.len() == shape[0] * shape[1], op, || {
        format!("{} ids for shape {shape:?}", ids.len())
    })?;
    if let Some(i) = ids.iter().position(|&e| e as usize >= experts) {
        return Err(MlxError::invalid(format!(
            "{op}: id {} at [{}, {}] is out of range for {experts} experts",
            ids[i],
            i / shape[1].max(1),
            i % shape[1].max(1)
        )));
    }
    MlxBuffer::from_slice(gpu, ids, &shape)
}

// ---------------------------------------------------------------------------------------
// routed matmuls

/// Checked shapes of a routed matmul.
struct Routed {
    tokens: usize,
    top_k: usize,
    pairs: u32,
    /// Pairs per x row: top_k for x [T, K], 1 for x [T, k, K].
    x_div: u32,
}

fn check_routed(op: &str, x: &MlxBuffer, ids: &MlxBuffer, shape: [usize; 3]) -> Result<Routed> {
    let [e, n, k] = shape;
    check::dtype(x, &[DType::F32], op, "x")?;
    check::dtype(ids, &[DType::U32], op, "ids")?;
    let ish = ids.shape();
    check::ensure(ish.len() == 2 && ish[0] > 0 && ish[1] > 0, op, || {
        format!("ids has shape {ish:?}, expected [T, top_k]")
    })?;
    let (tokens, top_k) = (ish[0], ish[1]);
    let xs = x.shape();
    let x_div = match *xs {
        [t, xk] if t == tokens && xk == k => top_k,
        [t, j, xk] if t == tokens && j == top_k && xk == k => 1,
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: x has shape {xs:?}, expected [{tokens}, {k}] or [{tokens}, {top_k}, {k}] \
                 (ids {ish:?}, experts [{e}, {n}, {k}])"
            )))
        }
    };
    let pairs = check::fits_u32(tokens * top_k, op, "pairs")?;
    check::fits_u32(x.len(), op, "x elements")?;
    check::fits_u32(
        (tokens * top_k).saturating_mul(n.max(k)),
        op,
        "output elements",
    )?;
    Ok(Routed {
        tokens,
        top_k,
        pairs,
        x_div: x_div as u32,
    })
}

/// `y[t, j, :] = x[t] · W[ids[t, j]]ᵀ` (`mx.gather_qmm(x, w, rhs_indices=ids,
/// transpose=True)`): `x` f32 `[T, K]` or `[T, k, K]`, `ids` u32 `[T, k]`, `w` `[E, N, K]`;
/// returns f32 `[T, k, N]`. Path by [`gather_path`].
pub fn gather_qmm(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &QuantExperts,
    ids: &MlxBuffer,
) -> Result<MlxBuffer> {
    let tokens = ids.shape().first().copied().unwrap_or(0);
    gather_qmm_with(pass, x, w, ids, gather_path(tokens))
}

/// [`gather_qmm`] on an explicit path.
pub fn gather_qmm_with(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &QuantExperts,
    ids: &MlxBuffer,
    path: GatherPath,
) -> Result<MlxBuffer> {
    let op = "gather_qmm";
    let [e, n, k] = w.shape();
    let r = check_routed(op, x, ids, [e, n, k])?;
    let qw = w.weight();
    let sdt = qmatmul::scale_dtype(qw.params(), qw.dtype());
    // The kernels read x as vec4: it must start on a 16-byte boundary of its binding.
    let align = pass.caps().storage_offset_alignment;
    let xa = if x.elem_offset().is_multiple_of(4) && align.is_multiple_of(16) {
        x.clone()
    } else {
        super::layout::copy(pass, x)?
    };
    let y = pass.alloc(DType::F32, &[r.tokens, r.top_k, n])?;
    let mut params = gather_params(op, qw, [e, n, k], r.pairs, r.x_div)?;
    let biases = qw.biases().unwrap_or(qw.scales());
    match path {
        GatherPath::Vector => {
            let xq = qmatmul::default_xq(qw.params());
            let mode = (xq, false, false, false);
            dispatch_gqmv(pass, op, &xa, mode, qw, ids, &params, &y)?;
        }
        GatherPath::Sorted => {
            let sorted = sort_pairs(pass, op, ids, r.pairs as usize, e)?;
            params.max_tiles = sorted.1;
            if plan(r.pairs as usize, n, k, pass.caps()) == (MatmulPlan::Coop { tile: 16 }) {
                // Tensor cores: each tile of <= 64 pairs of one expert is a 64-row block of
                // the 16 x 16 cooperative kernel (4 subgroups: 64 x rows, which must hold a
                // whole tile), x rows gathered through the pair order.
                const _: () = assert!(TILE_PAIRS == 64);
                let mut cp =
                    CoopParams::new(params.pairs, params.n, params.k, params.wpr, params.gpr);
                cp.x_div = params.top_k;
                cp.experts = params.experts;
                cp.max_tiles = sorted.1;
                let spec = qmatmul::qspec("gqmm_coop16", qw.params(), sdt, 4 * qmatmul::COOP_SG)?;
                let wb = [qw.packed(), qw.scales(), biases, qw.packed()];
                qmatmul::dispatch_coop(pass, 16, spec, cp, x, wb, &y, Some(&sorted.0), op)?;
                return Ok(y);
            }
            let groups = (sorted.1 as usize).saturating_mul(n.div_ceil(64));
            let groups = check::fits_u32(groups, op, "workgroups")?;
            let spec = qspec("gqmm", qw.params(), sdt, GQMM_WG)?;
            let bufs = [
                &xa,
                qw.packed(),
                qw.scales(),
                biases,
                &y,
                qw.packed(),
                ids,
                &sorted.0,
            ];
            pass.dispatch(Kernel::MoeQuant, spec, &params, &bufs, groups)?;
        }
    }
    Ok(y)
}

/// The routed kernels' params for experts `[E, N, K]` of `qw`'s layout: `pairs` products,
/// x row `pair / x_div`.
fn gather_params(
    op: &str,
    qw: &QuantWeight,
    [e, n, k]: [usize; 3],
    pairs: u32,
    x_div: u32,
) -> Result<GatherParams> {
    let l = qw.layout();
    Ok(GatherParams {
        pairs,
        n: n as u32,
        k: k as u32,
        wpr: check::fits_u32(l.words_per_row, op, "words per row")?,
        gpr: check::fits_u32(l.groups_per_row, op, "groups per row")?,
        top_k: x_div,
        experts: check::fits_u32(e, op, "experts")?,
        max_tiles: 0,
        eps: 0.0,
        _pad: [0; 3],
    })
}

/// The decode kernel of the routed product (one workgroup per pair and 2·RPT rows): x f32
/// (`xq`: its in-kernel quantization), or already quantized chunks in that form (`xsrc`).
#[allow(clippy::too_many_arguments)]
fn dispatch_gqmv(
    pass: &mut Pass,
    op: &str,
    x: &MlxBuffer,
    (xq, xsrc, gu, pend): (u32, bool, bool, bool),
    qw: &QuantWeight,
    ids: &MlxBuffer,
    params: &GatherParams,
    y: &MlxBuffer,
) -> Result<()> {
    let (n, k) = (params.n as usize, params.k as usize);
    let sdt = qmatmul::scale_dtype(qw.params(), qw.dtype());
    let (mut rpt, sg) = match plan(1, n, k, pass.caps()) {
        MatmulPlan::Vector { rpt, subgroups } => (rpt, subgroups),
        _ => (1, false),
    };
    if xq != 0 {
        // The most rows per row-block: each lane quantizes (or loads) its x chunk once for
        // all of them. Measured on an H200: a Qwen3-30B-A3B decode step 5406 -> 4705 us
        // against the plan's 2 rows (experts of 768 and 2048 rows).
        rpt = 4;
    }
    let forced = GQMV_RPT.load(std::sync::atomic::Ordering::Relaxed);
    if forced != 0 {
        rpt = forced;
    }
    let spec = gqmv_spec(qw.params(), sdt, rpt, sg, xq, (xsrc, gu, pend))?;
    let per_wg = 2 * rpt as usize;
    let groups = (params.pairs as usize).saturating_mul(n.div_ceil(per_wg));
    let groups = check::fits_u32(groups, op, "workgroups")?;
    let bufs = gqmv_buffers(x, qw, y, ids);
    pass.dispatch(Kernel::MoeQuant, spec, params, &bufs, groups)
}

/// The routed matvecs of quantized x: x's checks (its form, K, rows) and ids' against the
/// experts `w`, then the kernel's params (x's pending norm's eps in them), the tokens and
/// top_k.
fn xq_gather(
    op: &str,
    x: &QuantizedX,
    w: &QuantExperts,
    ids: &MlxBuffer,
) -> Result<(GatherParams, usize, usize)> {
    let [e, n, k] = w.shape();
    let qw = w.weight();
    check::dtype(ids, &[DType::U32], op, "ids")?;
    let &[tokens, top_k] = ids.shape() else {
        return Err(MlxError::invalid(format!(
            "{op}: ids has shape {:?}, expected [T, top_k]",
            ids.shape()
        )));
    };
    check::ensure(tokens > 0 && top_k > 0, op, || "ids is empty".into())?;
    check::ensure(XqForm::of(qw) == Some(x.form()), op, || {
        format!(
            "x was quantized as {:?}, the experts take {:?}",
            x.form(),
            XqForm::of(qw)
        )
    })?;
    check::ensure(x.k() == k, op, || {
        format!("x has {} values a row, the experts' K is {k}", x.k())
    })?;

    let x_div = if x.rows() == tokens {
        top_k
    } else if x.rows() == tokens * top_k {
        1
    } else {
        return Err(MlxError::invalid(format!(
            "{op}: x has {} rows, expected {tokens} or {} (ids {:?})",
            x.rows(),
            tokens * top_k,
            ids.shape()
        )));
    };
    let pairs = check::fits_u32(tokens * top_k, op, "pairs")?;
    check::fits_u32((tokens * top_k).saturating_mul(n), op, "output elements")?;
    let params = GatherParams {
        eps: x.pending_norm().unwrap_or(0.0),
        ..gather_params(op, qw, [e, n, k], pairs, x_div as u32)?
    };
    Ok((params, tokens, top_k))
}

/// The experts' stacked gate|up weight (`[E, 2I, K]`), checked against gate's shape.
fn stacked_gate_up<'a>(op: &str, experts: &'a MoeExperts) -> Result<&'a QuantExperts> {
    let stacked = experts.gate_up.as_ref().ok_or_else(|| {
        MlxError::invalid(format!("{op}: the experts' gate and up are not stacked"))
    })?;
    let [e, two_i, k] = stacked.shape();
    check::ensure([e, two_i / 2, k] == experts.gate.shape(), op, || {
        format!(
            "the stacked weight is {:?}, gate {:?}",
            stacked.shape(),
            experts.gate.shape()
        )
    })?;
    Ok(stacked)
}

/// The routed matvecs' bindings 0..6: x, the weight (packed, scales, biases), the output,
/// the packed words as vec4, the expert ids.
fn gqmv_buffers<'a>(
    x: &'a MlxBuffer,
    qw: &'a QuantWeight,
    y: &'a MlxBuffer,
    ids: &'a MlxBuffer,
) -> [&'a MlxBuffer; 7] {
    let biases = qw.biases().unwrap_or(qw.scales());
    [x, qw.packed(), qw.scales(), biases, y, qw.packed(), ids]
}

/// The decode form of [`gather_qmm`] over x already quantized for the experts
/// ([`QuantizedX`] of `XqForm::of(w.weight())`): `x` `[T, K]` (every slot of a token reads
/// its row) or `[T * k, K]` (a row per pair), `ids` u32 `[T, k]`, T * k pairs of at most
/// [`MAX_VEC_M`](qmatmul::MAX_VEC_M) tokens; returns f32 `[T, k, N]`.
pub fn gather_qmv_xq(
    pass: &mut Pass,
    x: &QuantizedX,
    w: &QuantExperts,
    ids: &MlxBuffer,
) -> Result<MlxBuffer> {
    let op = "gather_qmv_xq";
    let (params, tokens, top_k) = xq_gather(op, x, w, ids)?;
    let y = pass.alloc(DType::F32, &[tokens, top_k, params.n as usize])?;
    let mode = (x.form().xq(), true, false, x.pending_norm().is_some());
    dispatch_gqmv(pass, op, x.buffer(), mode, w.weight(), ids, &params, &y)?;
    Ok(y)
}

/// [`gather_qmv_xq`] of the gate and up experts at once, over their stacked weight
/// ([`MoeExperts::gate_up`]): returns f32 `[T, k, 2I]`, each pair's gate row then its up
/// row (what [`crate::ops::glu_split_xq`] takes). One dispatch instead of two.
pub fn gather_qmv_xq_gate_up(
    pass: &mut Pass,
    x: &QuantizedX,
    experts: &MoeExperts,
    ids: &MlxBuffer,
) -> Result<MlxBuffer> {
    let op = "gather_qmv_xq_gate_up";
    let stacked = stacked_gate_up(op, experts)?;
    let (params, tokens, top_k) = xq_gather(op, x, stacked, ids)?;
    let y = pass.alloc(DType::F32, &[tokens, top_k, params.n as usize])?;
    let mode = (x.form().xq(), true, true, x.pending_norm().is_some());
    dispatch_gqmv(
        pass,
        op,
        x.buffer(),
        mode,
        stacked.weight(),
        ids,
        &params,
        &y,
    )?;
    Ok(y)
}

/// Whether [`gather_qmv_xq_glu`] runs for these experts on this device: MLX experts with
/// gate and up stacked, I a multiple of 32, down reading x in the gate|up experts' own form
/// (the chunks are quantized in it), and workgroups of 512 invocations.
pub fn can_glu_out(experts: &MoeExperts, caps: &Caps) -> bool {
    let (Some(stacked), Some((gate_up, down))) = (&experts.gate_up, experts_xq_form(experts))
    else {
        return false;
    };
    let [_, two_i, _] = stacked.shape();
    gate_up == down
        && XqForm::of(stacked.weight()) == Some(gate_up)
        && two_i % 64 == 0
        && caps.max_invocations_per_workgroup >= GQMV_GLU_WG
}

/// The stacked gate|up experts of decode tokens with the GLU applied to their own rows
/// ([`gather_qmv_xq_gate_up`] then [`crate::ops::activation::glu_split_xq`] in one
/// dispatch): returns `act(gate) · up` as a row per pair (`[T·k, I]`), quantized in the
/// experts' form for down ([`gather_qmv_xq`] or [`gather_qmv_xq_combine`]). `x` may carry a
/// pending norm. Where [`can_glu_out`] holds.
pub fn gather_qmv_xq_glu(
    pass: &mut Pass,
    x: &QuantizedX,
    experts: &MoeExperts,
    ids: &MlxBuffer,
    act: Act,
) -> Result<QuantizedX> {
    let op = "gather_qmv_xq_glu";
    check::ensure(can_glu_out(experts, pass.caps()), op, || {
        "needs MLX experts with gate and up stacked, I a multiple of 32, down reading the \
         gate|up form, and workgroups of 512 invocations"
            .into()
    })?;
    let stacked = stacked_gate_up(op, experts)?;
    let (params, _, _) = xq_gather(op, x, stacked, ids)?;
    let fused = stacked.weight();
    let (pairs, i) = (params.pairs as usize, params.n as usize / 2);
    let out = pass.alloc(DType::U32, &[pairs, i / 32 * qmatmul::XQ_CHUNK_WORDS])?;
    let caps = pass.caps();
    let sg = caps.subgroups && caps.subgroup_min_size >= 4 && caps.subgroup_max_size <= 32;
    let spec = gqmv_glu_spec(
        fused.params(),
        qmatmul::scale_dtype(fused.params(), fused.dtype()),
        sg,
        (x.form().xq(), x.pending_norm().is_some()),
        act,
    )?;
    let groups = check::fits_u32(pairs * (i / 32), op, "workgroups")?;
    let bufs = gqmv_buffers(x.buffer(), fused, &out, ids);
    pass.dispatch(Kernel::MoeQuant, spec, &params, &bufs, groups)?;
    Ok(QuantizedX::from_words(out, pairs, i, x.form()))
}

/// The down experts of decode tokens and their weighted sum in one dispatch
/// ([`gather_qmv_xq`] then [`moe_combine`]), added into `acc` in place: `acc[t, :] +=
/// Σ_j weights[t, j] · (x[t·k + j, :] · W[ids[t, j]]ᵀ)`. `x`: a row per pair (`[T·k, K]`,
/// quantized for `w`), `ids` u32 and `weights` f32 `[T, k]`, `acc` f32 `[T, N]` (the
/// residual stream the FFN's output joins).
pub fn gather_qmv_xq_combine(
    pass: &mut Pass,
    x: &QuantizedX,
    w: &QuantExperts,
    (ids, weights): (&MlxBuffer, &MlxBuffer),
    acc: &MlxBuffer,
) -> Result<()> {
    let op = "gather_qmv_xq_combine";
    let [_, n, k] = w.shape();
    let qw = w.weight();
    let (params, tokens, top_k) = xq_gather(op, x, w, ids)?;
    check::ensure(params.top_k == 1, op, || {
        format!(
            "x has {} rows, expected one per pair ({})",
            x.rows(),
            params.pairs
        )
    })?;
    check::ensure(x.pending_norm().is_none(), op, || {
        "x still needs its RMS norm (a NormOut matvec's chunks)".into()
    })?;
    check::dtype(weights, &[DType::F32], op, "weights")?;
    check::shape(weights, &[tokens, top_k], op, "weights")?;
    check::dtype(acc, &[DType::F32], op, "acc")?;
    check::shape(acc, &[tokens, n], op, "acc")?;
    // The kernel reads a token's slots as top_k (x comes a row per pair).
    let params = GatherParams {
        top_k: top_k as u32,
        ..params
    };
    let sdt = qmatmul::scale_dtype(qw.params(), qw.dtype());
    let sg = matches!(
        plan(1, n, k, pass.caps()),
        MatmulPlan::Vector {
            subgroups: true,
            ..
        }
    );
    // As the routed matvec of quantized x: 4 rows a row-block.
    let rpt = 4;
    let spec = gqmv_combine_spec(qw.params(), sdt, rpt, sg, x.form().xq())?;
    let groups = check::fits_u32(
        tokens.saturating_mul(n.div_ceil(rpt as usize)),
        op,
        "workgroups",
    )?;
    let wbits = weights.bitcast(DType::U32, weights.shape())?;
    let [b0, b1, b2, b3, b4, b5, b6] = gqmv_buffers(x.buffer(), qw, acc, ids);
    let bufs = [b0, b1, b2, b3, b4, b5, b6, &wbits];
    pass.dispatch(Kernel::MoeQuant, spec, &params, &bufs, groups)
}

/// Sort the pairs by expert on the GPU: returns the `sorted` buffer (tile count, tile table,
/// pair order) and its number of tile entries.
fn sort_pairs(
    pass: &mut Pass,
    op: &str,
    ids: &MlxBuffer,
    pairs: usize,
    experts: usize,
) -> Result<(MlxBuffer, u32)> {
    // One workgroup-memory bin per expert (plus one for ids out of range).
    check::ensure(experts <= MAX_EXPERTS, op, || {
        format!("{experts} experts, the sorted path takes at most {MAX_EXPERTS}")
    })?;
    let max_tiles = pairs.div_ceil(TILE_PAIRS) + (experts + 1).min(pairs);
    let order_at = 4 + 4 * max_tiles;
    let len = order_at + pairs;
    check::fits_u32(len, op, "sort buffer")?;
    let sorted = pass.alloc(DType::U32, &[len])?;
    let params = MoeParams {
        n: pairs as u32,
        top_k: 0,
        h: 0,
        experts: experts as u32,
        max_tiles: max_tiles as u32,
        order_at: order_at as u32,
        bm: TILE_PAIRS as u32,
        has_shared: 0,
    };
    let spec = Spec::new("sort_pairs", DType::F32, WG);
    pass.dispatch(Kernel::Moe, spec, &params, &[ids, &sorted], 1)?;
    Ok((sorted, max_tiles as u32))
}

/// The routed product of [`gather_qmm`] for GGUF stacked experts: one workgroup per (pair,
/// output row), per shard of whole experts. `x` f32 `[T, K]` or `[T, k, K]`, `ids` u32
/// `[T, k]`; returns f32 `[T, k, N]`.
pub fn ggml_gather_matvec(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &GgmlExperts,
    ids: &MlxBuffer,
) -> Result<MlxBuffer> {
    let op = "ggml_gather_matvec";
    let [e, n, k] = w.shape();
    let r = check_routed(op, x, ids, [e, n, k])?;
    let y = pass.alloc(DType::F32, &[r.tokens, r.top_k, n])?;
    let wg = super::ggml_matmul::matvec_wg(k);
    let (kernel, spec) = ggml_spec(w.kind(), wg, pass.caps().subgroups)?;
    let groups = check::fits_u32((r.pairs as usize).saturating_mul(n), op, "workgroups")?;
    for (i, s) in w.shards().iter().enumerate() {
        let p = GgmlGatherParams {
            pairs: r.pairs,
            k: k as u32,
            n: n as u32,
            shard_experts: s.experts as u32,
            shard_e0: s.e0 as u32,
            bpr: (k / w.kind().block_elems()) as u32,
            scale_off: check::fits_u32(s.scale_off, op, "scale offset")?,
            units: k.div_ceil(32) as u32,
            first_shard: u32::from(i == 0),
            xvec: 0,
            experts: e as u32,
            x_div: r.x_div,
        };
        pass.dispatch(kernel, spec, &p, &[x, &s.buffer, &y, ids], groups)?;
    }
    Ok(y)
}

/// The routed product for either expert format: [`gather_qmm`] or [`ggml_gather_matvec`].
pub fn gather_matmul(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &ExpertWeight,
    ids: &MlxBuffer,
) -> Result<MlxBuffer> {
    match w {
        ExpertWeight::Mlx(q) => gather_qmm(pass, x, q, ids),
        ExpertWeight::Ggml(g) => ggml_gather_matvec(pass, x, g, ids),
    }
}

// ---------------------------------------------------------------------------------------
// activation, combine, layer

/// `act(gate) * up` of the routed gate and up projections (`[T, k, N]` each).
pub fn moe_glu(pass: &mut Pass, gate: &MlxBuffer, up: &MlxBuffer, act: Act) -> Result<MlxBuffer> {
    let op = "moe_glu";
    check::ensure(gate.shape().len() == 3, op, || {
        format!("gate has shape {:?}, expected [T, k, N]", gate.shape())
    })?;
    check::same_shape(gate, up, op, "gate", "up")?;
    glu(pass, gate, up, act)
}

/// `out[t, :] = Σ_j weights[t, j] · y[t, j, :]` (+ `shared[t, :]`): `y` f32 `[T, k, H]`,
/// `weights` f32 `[T, k]`, `shared` f32 `[T, H]`; returns f32 `[T, H]`.
pub fn moe_combine(
    pass: &mut Pass,
    y: &MlxBuffer,
    weights: &MlxBuffer,
    shared: Option<&MlxBuffer>,
) -> Result<MlxBuffer> {
    let op = "moe_combine";
    check::dtype(y, &[DType::F32], op, "y")?;
    check::dtype(weights, &[DType::F32], op, "weights")?;
    let &[t, k, h] = y.shape() else {
        return Err(MlxError::invalid(format!(
            "{op}: y has shape {:?}, expected [T, k, H]",
            y.shape()
        )));
    };
    check::shape(weights, &[t, k], op, "weights")?;
    if let Some(s) = shared {
        check::dtype(s, &[DType::F32], op, "shared")?;
        check::shape(s, &[t, h], op, "shared")?;
    }
    let n = check::fits_u32(t * h, op, "outputs")?;
    check::fits_u32(y.len(), op, "y elements")?;
    let out = pass.alloc(DType::F32, &[t, h])?;
    let params = MoeParams {
        n: t as u32,
        top_k: k as u32,
        h: h as u32,
        experts: 0,
        max_tiles: 0,
        order_at: 0,
        bm: 0,
        has_shared: u32::from(shared.is_some()),
    };
    let sb = shared.unwrap_or(y);
    let spec = Spec::new("combine", DType::F32, WG);
    pass.dispatch(
        Kernel::Moe,
        spec,
        &params,
        &[y, y, y, weights, &out, sb],
        n.div_ceil(WG),
    )?;
    Ok(out)
}

/// The routed experts of one MoE FFN layer: gate and up `[E, I, H]`, down `[E, H, I]`.
#[derive(Clone, Debug)]
pub struct MoeExperts {
    pub gate: ExpertWeight,
    pub up: ExpertWeight,
    pub down: ExpertWeight,
    /// MLX experts: gate's rows, then up's, in one weight whose views `gate` and `up` are
    /// ([`MoeExperts::stack_gate_up`]), so decode routes both in one dispatch
    /// ([`gather_qmv_xq_gate_up`]). Held as E experts of 2I rows (`[E, 2I, H]`), though an
    /// expert's rows are not adjacent: the first E·I rows are the gates, the rest the ups
    /// (the kernel's GU mode maps them).
    pub gate_up: Option<QuantExperts>,
}

impl MoeExperts {
    /// The experts, with gate and up stacked into one weight (`gate_up`) where both are
    /// MLX-quantized alike and their buffers copy at 4-byte granularity: `gate` and `up`
    /// become views into it (no second copy). Otherwise unchanged.
    pub fn stack_gate_up(self, gpu: &MlxDevice) -> Result<Self> {
        let (ExpertWeight::Mlx(g), ExpertWeight::Mlx(u)) = (&self.gate, &self.up) else {
            return Ok(self);
        };
        let e = g.shape()[0];
        let Some((fused, views)) = QuantWeight::concat_rows(gpu, &[g.weight(), u.weight()])? else {
            return Ok(self);
        };
        let mut views = views.into_iter();
        let (Some(gv), Some(uv)) = (views.next(), views.next()) else {
            return Ok(self);
        };
        Ok(MoeExperts {
            gate: ExpertWeight::Mlx(QuantExperts::new(gv, e)?),
            up: ExpertWeight::Mlx(QuantExperts::new(uv, e)?),
            down: self.down,
            gate_up: Some(QuantExperts::new(fused, e)?),
        })
    }
}

/// One MoE FFN layer's settings.
#[derive(Clone, Copy, Debug)]
pub struct MoeConfig<'a> {
    pub router: RouterConfig<'a>,
    /// The gate activation (SwiGLU: [`Act::Silu`]).
    pub act: Act,
    /// At decode with quantized x ([`moe_ffn_xq`], [`moe_ffn_xq_into`]): the GLU applied by
    /// the stacked gate|up matvec to its own rows ([`gather_qmv_xq_glu`]) where
    /// [`can_glu_out`] holds, instead of its own dispatch.
    pub glu_out: bool,
}

/// A whole MoE FFN layer: `x` f32 `[T, H]`, `router_logits` f32 `[T, E]` (x times the
/// router weight, computed by the caller) -> f32 `[T, H]`:
/// route -> gate/up gathers -> `act(gate) * up` -> down gather -> weighted sum, plus
/// `shared` (a shared expert's output, or the residual stream, `[T, H]`) when given. Records into `pass` only: no
/// submit, no readback.
pub fn moe_ffn(
    pass: &mut Pass,
    x: &MlxBuffer,
    router_logits: &MlxBuffer,
    experts: &MoeExperts,
    cfg: &MoeConfig<'_>,
    shared: Option<&MlxBuffer>,
) -> Result<MlxBuffer> {
    let op = "moe_ffn";
    let [e, _, h] = check_experts(op, experts)?;
    check::dtype(x, &[DType::F32], op, "x")?;
    let (t, xh) = check::rows(x, op, "x")?;
    check::ensure(xh == h, op, || {
        format!("x has {xh} columns, expected the experts' hidden size {h}")
    })?;
    check::shape(router_logits, &[t, e], op, "router_logits")?;
    let x2 = x.reshape(&[t, h])?;
    let (weights, ids) = moe_route(pass, router_logits, &cfg.router)?;
    let gate = gather_matmul(pass, &x2, &experts.gate, &ids)?;
    let up = gather_matmul(pass, &x2, &experts.up, &ids)?;
    let act = moe_glu(pass, &gate, &up, cfg.act)?;
    let y = gather_matmul(pass, &act, &experts.down, &ids)?;
    moe_combine(pass, &y, &weights, shared)
}

/// The experts' `[E, I, H]` (gate's), with up's and down's shapes checked against it.
fn check_experts(op: &str, experts: &MoeExperts) -> Result<[usize; 3]> {
    let [e, i, h] = experts.gate.shape();
    check::ensure(experts.up.shape() == [e, i, h], op, || {
        format!(
            "up is {:?}, gate is {:?}",
            experts.up.shape(),
            experts.gate.shape()
        )
    })?;
    check::ensure(experts.down.shape() == [e, h, i], op, || {
        format!(
            "down is {:?}, expected [{e}, {h}, {i}] (gate is {:?})",
            experts.down.shape(),
            experts.gate.shape()
        )
    })?;
    Ok([e, i, h])
}

/// The form of quantized x the decode expert matvecs of `experts` read, if they all read
/// one ([`gather_qmv_xq`]: MLX 4- or 8-bit experts, gate and up alike).
pub fn experts_xq_form(experts: &MoeExperts) -> Option<(XqForm, XqForm)> {
    let form = |w: &ExpertWeight| match w {
        ExpertWeight::Mlx(q) => XqForm::of(q.weight()),
        ExpertWeight::Ggml(_) => None,
    };
    let (g, u, d) = (
        form(&experts.gate)?,
        form(&experts.up)?,
        form(&experts.down)?,
    );
    (g == u).then_some((g, d))
}

/// [`moe_ffn`] at decode with x also quantized for the gate and up experts (`xq`, of the
/// gate form of [`experts_xq_form`]; the router reads f32 `x`): the gate/up products read
/// it ([`gather_qmv_xq`]) and the GLU writes the down experts' input quantized too, so no
/// expert matvec quantizes x in each of its row-blocks.
pub fn moe_ffn_xq(
    pass: &mut Pass,
    xq: &QuantizedX,
    router_logits: &MlxBuffer,
    experts: &MoeExperts,
    cfg: &MoeConfig<'_>,
    shared: Option<&MlxBuffer>,
) -> Result<MlxBuffer> {
    let op = "moe_ffn_xq";
    let (act, ids, weights) = experts_act_xq(pass, op, xq, router_logits, experts, cfg)?;
    let ExpertWeight::Mlx(dw) = &experts.down else {
        return Err(MlxError::invalid(format!(
            "{op}: quantized x is read by MLX-quantized experts only"
        )));
    };
    let y = gather_qmv_xq(pass, &act, dw, &ids)?;
    moe_combine(pass, &y, &weights, shared)
}

/// What [`moe_ffn_xq`] does before the down experts: the route, then the gate and up
/// experts and their GLU, written quantized for down (a row per pair). Returns those rows,
/// the expert ids and their weights.
fn experts_act_xq(
    pass: &mut Pass,
    op: &str,
    xq: &QuantizedX,
    router_logits: &MlxBuffer,
    experts: &MoeExperts,
    cfg: &MoeConfig<'_>,
) -> Result<(QuantizedX, MlxBuffer, MlxBuffer)> {
    let (ExpertWeight::Mlx(gw), ExpertWeight::Mlx(uw), ExpertWeight::Mlx(_)) =
        (&experts.gate, &experts.up, &experts.down)
    else {
        return Err(MlxError::invalid(format!(
            "{op}: quantized x is read by MLX-quantized experts only"
        )));
    };
    let (_, down_form) = experts_xq_form(experts)
        .ok_or_else(|| MlxError::invalid(format!("{op}: these experts take f32 x")))?;
    let [e, i, h] = check_experts(op, experts)?;
    check::ensure(xq.k() == h, op, || {
        format!(
            "x has {} values a row, expected the experts' hidden size {h}",
            xq.k()
        )
    })?;
    check::shape(router_logits, &[xq.rows(), e], op, "router_logits")?;
    let (weights, ids) = moe_route(pass, router_logits, &cfg.router)?;
    let act = if cfg.glu_out && can_glu_out(experts, pass.caps()) {
        gather_qmv_xq_glu(pass, xq, experts, &ids, cfg.act)?
    } else if experts.gate_up.is_some() {
        // [T, k, 2I] as one row per pair: its gate half, then its up half.
        let gu = gather_qmv_xq_gate_up(pass, xq, experts, &ids)?;
        let pairs = gu.len() / (2 * i);
        let gu2 = gu.reshape(&[pairs, 2 * i])?;
        super::activation::glu_split_xq(pass, &gu2, cfg.act, down_form)?
    } else {
        let gate = gather_qmv_xq(pass, xq, gw, &ids)?;
        let up = gather_qmv_xq(pass, xq, uw, &ids)?;
        // [T, k, I] as one row per pair.
        let pairs = gate.len() / i;
        let gate2 = gate.reshape(&[pairs, i])?;
        let up2 = up.reshape(&[pairs, i])?;
        super::activation::glu_xq(pass, &gate2, &up2, cfg.act, down_form)?
    };
    Ok((act, ids, weights))
}

/// [`moe_ffn_xq`] with its output added into `acc` (f32 `[T, H]`, the residual stream) in
/// place, the down experts and the weighted sum in one dispatch
/// ([`gather_qmv_xq_combine`]).
pub fn moe_ffn_xq_into(
    pass: &mut Pass,
    xq: &QuantizedX,
    router_logits: &MlxBuffer,
    experts: &MoeExperts,
    cfg: &MoeConfig<'_>,
    acc: &MlxBuffer,
) -> Result<()> {
    let op = "moe_ffn_xq_into";
    let (act, ids, weights) = experts_act_xq(pass, op, xq, router_logits, experts, cfg)?;
    let ExpertWeight::Mlx(dw) = &experts.down else {
        return Err(MlxError::invalid(format!(
            "{op}: quantized x is read by MLX-quantized experts only"
        )));
    };
    gather_qmv_xq_combine(pass, &act, dw, (&ids, &weights), acc)
}

#[cfg(test)]
#[path = "moe_tests.rs"]
mod tests;

//! MLX quantized matmul on the GPU: `y = x · Wᵀ` for a [`QuantWeight`] `W [N, K]` (affine
//! 2/3/4/5/6/8 bits x groups 32/64/128 with f32/f16/bf16 scales, and MXFP4), plus GPU
//! dequantization and quantized row gathers (embedding lookups of a quantized table).
//!
//! Design (`shaders/qmatmul.wgsl`, `shaders/common/quant.wgsl`, `shaders/matmul_coop.wgsl`):
//! - **Layout**: MLX's own, no repack. A *chunk* is 32 codes of a row = `bits` u32 words,
//!   word-aligned and inside one group, so one scale (and bias) per chunk; codes that straddle
//!   words (3/5/6 bits) are decoded from a 32-bit window over two words.
//! - **qmv** (decode, M ≤ 8): a row-set of TPR (8..256; below 32 a segment of one subgroup
//!   where subgroups are that wide) invocations owns RPT (1..16) weight
//!   rows; its invocations stride over the chunks, so consecutive invocations read
//!   consecutive chunks of a row (coalesced; 4- and 8-bit chunks are single vec4 loads);
//!   WG / TPR row-sets per workgroup ([`QmvConfig`], from the shape: for N ≥ 4096 the most
//!   rows per row-set that still leave ~1536 warps, else RPT 1..8 by N and TPR by K). Each x
//!   chunk (8 vec4) is loaded once for the RPT rows. One scalar accumulator per row; x rows
//!   are walked in turn, each reduced (`subgroupAdd` when the subgroup size divides TPR, then
//!   one workgroup-memory step; else through workgroup memory) before the next.
//! - **Integer dot products** (qmv, 4- and 8-bit affine; `QmvConfig::xq`, on by default): each
//!   row-set quantizes its x chunk to a 16-bit integer per element (scale amax/32512 per 32
//!   elements, split into a signed high and an unsigned low byte) and takes Σ x·q with packed
//!   4-byte dot products (`dot4I8Packed` / `dot4U8Packed`: DP4A on NVIDIA, a polyfill
//!   elsewhere): a word of eight 4-bit codes is 3 integer operations and 4 dot products,
//!   where decoding the codes to floats took ~4 instructions per code and bounded the kernel.
//!   Per chunk `scale·d·Σ t·q + bias·Σ x` with Σx in f32. The error (amax/65024 per element)
//!   is below f16's at the chunk's largest element; one int8 level (llama.cpp's q8_1
//!   activations, `xq` 1) is ~4 % faster per decode step and 256x coarser. Measured on an
//!   H200 (docs/PERFORMANCE.md, in-pass): gate|up 28672 x 4096 40.9 → 30.8 us, down
//!   4096 x 14336 22.6 → 18.2 us. A pure read of the same bytes is still ~2x faster: what
//!   bounds the rest is not known (no shader-level profile was taken).
//!   Before (f32 x): codes turned into floats by the 2^23 mantissa trick, constant indices
//!   only (private arrays indexed dynamically spilled to local memory).
//! - **Chunks for the next matvec** (decode): a qmv of x quantized by its producer
//!   ([`QuantizedX`], [`qmv_xq`]) runs shorter row-sets (nothing to share among rows); a
//!   qmv can write the next matvec's quantized input itself: the next RMS norm's, before its
//!   1/rms, which that matvec applies ([`NormOut`], [`qmv_norm_out`]: workgroups of 32 rows,
//!   one chunk), or the GLU of a stacked gate|up's own rows ([`qmv_glu_out`]: 32 gate and
//!   the same 32 up rows a workgroup). The norm's and the GLU's dispatches go.
//! - **qmm** (prefill, M > 8): 64 x 64 output tiles per workgroup of 256 (4 x 4 outputs per
//!   invocation), K in steps of 32, x and dequantized W tiles in 16 KiB of workgroup memory
//!   (lavapipe allows 32 KiB). Neighbouring workgroups share a W tile (M blocks vary fastest).
//! - **Cooperative matrix** (when `Caps::coop_tile(16)` or `(8)`, f16 shaders, and a fixed
//!   subgroup size of 32): 4 subgroups per workgroup. 16 x 16 tiles: 128 W rows x 64 x rows
//!   per workgroup, 4 x 2 tiles per subgroup, K in steps of 64 whose global reads are in
//!   flight during the two previous steps' multiply-adds, x as f16 (one small dispatch); 8 x 8 tiles: 32 x 32, 2 x 2 per
//!   subgroup. x and W go to f16 in workgroup memory, accumulate in f32. Not runnable on
//!   lavapipe: its test runs where the adapter has cooperative matrices and is skipped
//!   (with a note) elsewhere.
//! - x must start at a multiple of 4 elements for the vec4 loads: other views are copied
//!   first (one small dispatch).
//!
//! Accuracy: f32 products and sums over K terms (tiled qmm; qmv with f32 x); qmv's default
//! represents x to amax/65024 per 32-element chunk, then sums exactly in integers and in
//! f32 across chunks; the cooperative path rounds x and the dequantized W to f16 (relative
//! 2^-11 per term) and accumulates in f32.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::device::Caps;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};
use crate::ops::activation::{Act, ACTS};
use crate::weights::quant::{QuantMode, QuantParams, AFFINE_BITS, AFFINE_GROUP_SIZES};
use crate::weights::quant_weight::QuantWeight;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QmatmulParams {
    m: u32,
    n: u32,
    k: u32,
    wpr: u32,
    gpr: u32,
    rows: u32,
    use_ids: u32,
    eps: f32,
    /// qmv with a [`NormOut`]: the chunks' first word, counted from y's.
    xo: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<QmatmulParams>() == 48);

/// Largest M the matrix-vector kernels take.
pub const MAX_VEC_M: usize = 8;
/// Workgroup size of the dense matrix-vector kernel (`dense.rs`): two row-blocks of 32.
pub(crate) const VEC_WG: u32 = 64;
/// Rows per row-block the plan dispatches for the dense matrix-vector kernel.
pub(crate) const VEC_RPTS: [u32; 3] = [1, 2, 4];

/// Shape of a qmv dispatch: `rpt` weight rows per row-set of `tpr` invocations, `wg`
/// invocations (`wg / tpr` row-sets) per workgroup.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QmvConfig {
    pub rpt: u32,
    pub tpr: u32,
    pub wg: u32,
    /// Measurement switches of the kernel (`QX` in qmatmul.wgsl); 0 in production. Other
    /// values give wrong results on purpose (they remove a part of the work to time it).
    pub exp: u32,
    /// x quantized to integers per chunk for 4-bit dot products (`XQ` in qmatmul.wgsl): 0
    /// off (f32), 1 one int8 level, 2 two levels. Applies to 4- and 8-bit affine weights
    /// only (ignored for other formats).
    pub xq: u32,
}

impl QmvConfig {
    fn validate(self) -> Result<Self> {
        let ok = matches!(self.rpt, 1 | 2 | 4 | 8 | 16)
            && self.tpr.is_power_of_two()
            && (8..=256).contains(&self.tpr)
            // The final sums take one invocation a row: a row-set's rows fit its invocations.
            && self.rpt <= self.tpr
            && matches!(self.wg, 64 | 128 | 256)
            && self.wg.is_multiple_of(self.tpr)
            && self.wg * self.rpt <= 2048
            && self.exp < 16
            && self.xq <= 2;
        if ok {
            Ok(self)
        } else {
            Err(MlxError::invalid(format!(
                "qmv: unsupported config {self:?}"
            )))
        }
    }
}

/// A dispatch shape forced on every default qmv dispatch (benchmarks: `rpt, tpr, wg, exp`
/// packed 16 bits each as `exp | xq << 8, rpt, tpr, wg`, high to low; 0 = none).
static QMV_OVERRIDE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Force `cfg` on every default qmv dispatch from now on (`None`: back to the shape rule).
/// For benchmarks: a `cfg.exp` other than 0 or 8 gives wrong results on purpose.
#[doc(hidden)]
pub fn set_qmv_override(cfg: Option<QmvConfig>) -> Result<()> {
    let packed = match cfg {
        None => 0,
        Some(c) => {
            let c = c.validate()?;
            u64::from(c.exp | c.xq << 8) << 48
                | u64::from(c.rpt) << 32
                | u64::from(c.tpr) << 16
                | u64::from(c.wg)
        }
    };
    QMV_OVERRIDE.store(packed, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The x quantization forced on every default qmv dispatch (benchmarks; 0 = the shape
/// rule's, else `xq + 1`).
static QMV_XQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Force `xq` ([`QmvConfig::xq`]) on every default qmv dispatch from now on (`None`: back to
/// the default). For A/B timings of whole decode steps.
#[doc(hidden)]
pub fn set_qmv_xq(xq: Option<u32>) -> Result<()> {
    let v = match xq {
        None => 0,
        Some(x) if x <= 2 => x + 1,
        Some(x) => return Err(MlxError::invalid(format!("qmv: xq {x} is not 0, 1 or 2"))),
    };
    QMV_XQ.store(v, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The qmv shape for a weight of `n` rows and `k` columns.
pub(crate) fn qmv_config(n: usize, k: usize) -> QmvConfig {
    let mut cfg = qmv_shape(n, k);
    if let Some(xq) = forced_xq() {
        cfg.xq = xq;
    }
    cfg
}

/// What `set_qmv_xq` forces, if anything.
fn forced_xq() -> Option<u32> {
    QMV_XQ
        .load(std::sync::atomic::Ordering::Relaxed)
        .checked_sub(1)
}

fn qmv_shape(n: usize, k: usize) -> QmvConfig {
    let o = QMV_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed);
    if o != 0 {
        let field = |shift: u32| ((o >> shift) & 0xffff) as u32;
        return QmvConfig {
            rpt: field(32),
            tpr: field(16),
            wg: field(0),
            exp: field(48) & 0xff,
            xq: field(48) >> 8,
        };
    }
    let chunks = k / 32;
    // Large matrices: as many rows per row-set (16, then 8) as still leave at least
    // QMV_MIN_WARPS warps, with the fewest invocations per row-set that reach it. More rows
    // share each x chunk's quantization and load; fewer invocations per row-set walk more
    // chunks each and reduce less. Measured on an H200 (docs/PERFORMANCE.md): gate|up
    // 28672 x 4096 29.0 us at (16 rows, 32) against 37.8 at (8, 128); o 4096 x 4096 7.8 us
    // at (8, 128) against 9.0 at (16, 128), whose 1024 warps are too few to keep the
    // memory busy.
    for rpt in [16u32, 8] {
        for tpr in [32u32, 64, 128] {
            let warps = n / rpt as usize * (tpr as usize / 32);
            if n >= 4096 && tpr as usize <= chunks && warps >= QMV_MIN_WARPS {
                return QmvConfig {
                    rpt,
                    tpr,
                    wg: 128,
                    exp: 0,
                    xq: QMV_DEFAULT_XQ,
                };
            }
        }
    }
    let tpr = if chunks >= 128 {
        128
    } else if chunks >= 64 {
        64
    } else {
        32
    };
    let rpt = if n >= 4096 {
        8
    } else if n >= 1024 {
        4
    } else if n >= 256 {
        2
    } else {
        1
    };
    QmvConfig {
        rpt,
        tpr,
        wg: tpr.max(64),
        exp: 0,
        xq: QMV_DEFAULT_XQ,
    }
}

/// Fewest warps (32 invocations) a large qmv dispatch should have (see `qmv_shape`;
/// tuned on an H200's 132 SMs, ~12 warps each).
const QMV_MIN_WARPS: usize = 1536;

/// x as 16-bit integers (`QmvConfig::xq` 2) by default: measured on an H200 it takes a
/// Llama-3.1-8B decode step from 4001 to 3732 us (int8 x: 3571); its error (amax/65024 per
/// element of a 32-element chunk) is below f16's, where int8's (amax/254) would be
/// visible against MLX's f32 products.
const QMV_DEFAULT_XQ: u32 = 2;

/// Every config [`qmv_config`] can return (each with f32 x too: `set_qmv_xq`).
fn qmv_configs() -> Vec<QmvConfig> {
    let mut v = Vec::new();
    for xq in [0, QMV_DEFAULT_XQ] {
        for tpr in [32, 64, 128] {
            for rpt in [1, 2, 4, 8] {
                v.push(QmvConfig {
                    rpt,
                    tpr,
                    wg: tpr.max(64),
                    exp: 0,
                    xq,
                });
            }
            // 8 and 16: the large matvecs; 4: quantized x (`xsrc_config`).
            for rpt in [4, 8, 16] {
                let c = QmvConfig {
                    rpt,
                    tpr,
                    wg: 128,
                    exp: 0,
                    xq,
                };
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
    }
    v
}

/// The qmv shape of a matvec that writes the next norm's chunks ([`NormOut`]): its default
/// rows per row-set and invocations per row-set, with workgroups of 32 rows (one chunk:
/// the chunk is quantized where its values are). Without subgroups the partial sums take
/// TPR slots a row, so rows of 32 invocations keep them in the kernel's 2048.
fn norm_out_config(n: usize, k: usize, subgroups: bool, max_wg: u32) -> QmvConfig {
    let base = qmv_config(n, k);
    if !norm_out_probe(18) {
        if let Some(c) = probe_shape(base, NORM_OUT_ROWS, subgroups) {
            return c;
        }
    }
    norm_out_shape(base, subgroups, max_wg)
}

/// The largest workgroup a chunk-writing matvec takes on this device.
fn out_max_wg(caps: &Caps) -> u32 {
    caps.max_invocations_per_workgroup.min(NORM_OUT_MAX_WG)
}

/// The shape [`set_norm_out_probe`] forces on `base` (workgroups of `rows` rows), if one is
/// forced and it keeps the kernel's limits (at most 1024
/// invocations, the partial sums inside `red` and `red_ss` as in [`rows_shape`]); a shape
/// that does not is ignored rather than run with clamped indices.
fn probe_shape(base: QmvConfig, rows: u32, subgroups: bool) -> Option<QmvConfig> {
    let probe = NORM_OUT_PROBE.load(std::sync::atomic::Ordering::Relaxed);
    let (rpt, tpr) = (probe & 0xff, (probe >> 8) & 0xff);
    if !matches!(rpt, 1 | 2 | 4 | 8 | 16) || !tpr.is_power_of_two() || !(16..=256).contains(&tpr) {
        return None;
    }
    let wg = rows / rpt * tpr;
    let sets = wg / tpr;
    // Row-sets narrower than 32 may take the workgroup-memory path even with subgroups
    // (`narrow_fits`): size them for it.
    let slots = if subgroups && tpr >= 32 { tpr / 4 } else { tpr };
    let ok = wg <= NORM_OUT_MAX_WG && sets * slots <= 256 && sets * rpt * slots <= 2048;
    ok.then_some(QmvConfig {
        rpt,
        tpr,
        wg,
        ..base
    })
}

/// Measurement only (timing; bit 16 gives wrong results): `rpt | tpr << 8` forces the
/// [`NormOut`] matvecs' shape (workgroups of 32 rows), bit 16 skips writing their chunks,
/// bit 18 gives the forced shape to the GLU-writing matvecs instead (64 rows a workgroup).
/// (Session 8's switches that reshaped every matvec with a residual, or of quantized x, were
/// removed once measured: docs/PERFORMANCE.md.)
#[doc(hidden)]
pub fn set_norm_out_probe(bits: u32) {
    NORM_OUT_PROBE.store(bits, std::sync::atomic::Ordering::Relaxed);
}
static NORM_OUT_PROBE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Measurement only: `rpt | tpr << 8 | wg << 16` forces the shape of the matvecs of
/// quantized x ([`qmv_xq`] and the pending-norm paths) other than LM heads (`head` false) or
/// of the LM heads (N >= 65536); 0 gives the rule back. A shape the kernel cannot take is
/// ignored.
#[doc(hidden)]
pub fn set_xsrc_probe(head: bool, bits: u32) {
    XSRC_PROBE[usize::from(head)].store(bits, std::sync::atomic::Ordering::Relaxed);
}
static XSRC_PROBE: [std::sync::atomic::AtomicU32; 2] = [
    std::sync::atomic::AtomicU32::new(0),
    std::sync::atomic::AtomicU32::new(0),
];

fn norm_out_probe(bit: u32) -> bool {
    NORM_OUT_PROBE.load(std::sync::atomic::Ordering::Relaxed) >> bit & 1 != 0
}

fn norm_out_shape(base: QmvConfig, subgroups: bool, max_wg: u32) -> QmvConfig {
    rows_shape(
        base,
        base.rpt.min(NORM_OUT_MAX_RPT),
        NORM_OUT_ROWS,
        subgroups,
        max_wg,
    )
}

/// A qmv shape of `rows` rows a workgroup from `rpt` rows per row-set and the default
/// invocations per row-set (32 without subgroups), within the kernel's limits: at most
/// `max_wg` invocations (the device's, at most NORM_OUT_MAX_WG), and partial sums that fit its arrays (`red_ss`: row-sets x
/// slots <= 256, slots = TPR / 4 at worst with subgroups, TPR without; `red`: rows x slots
/// <= 2048), by more rows per row-set or fewer invocations.
fn rows_shape(base: QmvConfig, rpt: u32, rows: u32, subgroups: bool, max_wg: u32) -> QmvConfig {
    let mut rpt = rpt.clamp(1, 16);
    let mut tpr = if subgroups { base.tpr } else { 32 };
    let div = if subgroups { 4 } else { 1 };
    let fits = |rpt: u32, tpr: u32| {
        let sets = rows / rpt;
        sets * tpr <= max_wg && sets * tpr / div <= 256 && rows * tpr / div <= 2048
    };
    while !fits(rpt, tpr) {
        if tpr > 32 {
            tpr /= 2;
        } else if rpt < 16 {
            rpt *= 2;
        } else {
            break;
        }
    }
    QmvConfig {
        rpt,
        tpr,
        wg: rows / rpt * tpr,
        ..base
    }
}

/// Rows per row-set of a [`NormOut`] matvec, at most. Measured on an H200 (Llama-3.1-8B's
/// o and down, 4096 rows, `decode_ab`, µs a token): the default shape's 8 rows and 128
/// invocations in workgroups of 32 rows (4 row-sets, 512 invocations) made the step 3246 ->
/// 3563 without chunks; 4 rows (8 row-sets of 128, 1024 invocations, twice the warps) gave
/// 3137 with them (docs/PERFORMANCE.md, session 8).
/// Session 9 (same tool, `AB_XSRC=1`): 2 rows x 64 (16 row-sets, 1024 invocations) against
/// 4 x 128, -48 to -86 on Llama-3.1-8B MLX 4-bit, -54 on its Q4_0, Gemma-3-4B and
/// Qwen3-30B-A3B within their noise; 1 x 32 and 2 x 32 were slower (+170, +400).
const NORM_OUT_MAX_RPT: u32 = 2;

/// Rows of a [`NormOut`] matvec's workgroup, and its largest workgroup.
const NORM_OUT_ROWS: u32 = 32;
const NORM_OUT_MAX_WG: u32 = 1024;

/// Every (shape, subgroups) a [`NormOut`] matvec can dispatch.
fn norm_out_configs() -> Vec<(QmvConfig, bool)> {
    out_configs(norm_out_shape)
}

/// Every (shape, subgroups) that `shape` makes of the default shapes.
/// A chunk-writing shape rule: (default shape, subgroups, largest workgroup) -> shape.
pub(crate) type OutShape = fn(QmvConfig, bool, u32) -> QmvConfig;

fn out_configs(shape: OutShape) -> Vec<(QmvConfig, bool)> {
    let mut v = Vec::new();
    for base in qmv_configs().into_iter().filter(|c| c.xq != 0) {
        for sg in [false, true] {
            // The kernel's limit and smaller devices' (`out_max_wg`): each gives its shapes.
            for max_wg in [NORM_OUT_MAX_WG, 512, 256] {
                let c = (shape(base, sg, max_wg), sg);
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
    }
    v
}

/// The qmv shape of a stacked gate|up matvec that applies the GLU to its own rows
/// ([`qmv_glu_out`]): workgroups of 32 gate and the same 32 up rows (one chunk of the
/// GLU's output), the default rows and invocations per row-set where they give that
/// (Llama-3.1-8B's 28672 x 4096: 16 rows, 32 invocations, 4 row-sets: its default shape).
fn glu_out_shape(base: QmvConfig, subgroups: bool, max_wg: u32) -> QmvConfig {
    let base = QmvConfig {
        tpr: GLU_OUT_TPR,
        ..base
    };
    rows_shape(base, GLU_OUT_RPT, 2 * NORM_OUT_ROWS, subgroups, max_wg)
}

/// Rows per row-set of a matvec of quantized x, and of an LM head's (N >= 65536).
const XSRC_RPT: u32 = 4;
const XSRC_HEAD_RPT: u32 = 8;
/// An LM head's shape of quantized x where subgroups are at least 16 wide: 4 rows, row-sets
/// of 16 invocations (half a 32-wide subgroup, each invocation walking twice the chunks).
/// Measured on an H200 (`decode_ab AB_XSRC=4`, µs a token, two rounds each): Gemma-3-4B
/// 2431 / 2441 -> 2410 / 2412, Llama-3.1-8B, Qwen3-30B-A3B, Gemma 3 270M and SmolLM2 within
/// their noise; alone, in steady state (`bench qmatmul`'s streaming rows) the 128256 x 4096
/// head streams at 104 % of the 1 GiB read bandwidth against 100 % at (8, 32)
/// (docs/PERFORMANCE.md, session 12).
const XSRC_HEAD_NARROW: (u32, u32) = (4, 16);

/// Whether a qmv of `tpr` invocations a row-set can sum its rows within subgroups on this
/// device: row-sets narrower than 32 are aligned segments of one subgroup only where every
/// subgroup is at least that wide (else the kernel's workgroup-memory path runs).
fn narrow_fits(tpr: u32, caps: &Caps) -> bool {
    tpr >= 32 || caps.subgroup_min_size >= tpr
}

/// The qmv shape of a matvec of quantized x ([`qmv_xq`]): with no x quantization to share
/// among a row-set's rows, 4 rows a row-set, and the fewest invocations a row-set (32, 64,
/// 128; more than 32 only where K has that many chunks) that still give QMV_MIN_WARPS warps,
/// else the widest of those; LM heads (N >= 65536, thousands of warps at any shape) 8 rows
/// and 32 invocations. Measured on an H200 (`decode_ab` `AB_XSRC=1`, µs a token, each
/// against the rule with that one part as before): Llama-3.1-8B's q|k|v (6144 x 4096) at
/// (4, 32) instead of (4, 128) -70; its head at (8, 32) instead of the f32-x default's
/// (16, 32) -36, Gemma-3-4B's -34; Gemma-3-4B's q|k|v (4096 x 2560) and Qwen3-30B-A3B's
/// keep (4, 64): (4, 32) there made the step slower (+140, +105). Alone, matvecs that do not
/// wait on each other (`bench_matmul stream`), (8, 32) streams the 128256 x 4096 head at up
/// to 100 % of the read probe's bandwidth, (16, 32) at 78 % (docs/PERFORMANCE.md, session 9).
/// With `narrow` (subgroups of at least 16) a head takes XSRC_HEAD_NARROW instead.
/// Row-sets of 16 elsewhere stream faster alone (4096 x 4096 at (8, 16): 91.5 % against
/// 82 % at (8, 32) and 71 % at this rule's (4, 64)) but made decode slower, where each
/// matvec waits on the one before and needs the warps (`AB_XSRC=3`: Llama-3.1-8B's q|k|v
/// at (8, 16) +180 µs a token, Gemma-3-4B's +990; session 12).
fn xsrc_config(n: usize, k: usize, narrow: bool) -> QmvConfig {
    let base = qmv_config(n, k);
    let head = n >= 65536;
    let probe = XSRC_PROBE[usize::from(head)].load(std::sync::atomic::Ordering::Relaxed);
    if probe != 0 {
        let forced = QmvConfig {
            rpt: probe & 0xff,
            tpr: (probe >> 8) & 0xff,
            wg: probe >> 16,
            ..base
        };
        if let Ok(c) = forced.validate() {
            return c;
        }
    }
    if QMV_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        return base;
    }
    if head {
        let (rpt, tpr) = if narrow {
            XSRC_HEAD_NARROW
        } else {
            (XSRC_HEAD_RPT, 32)
        };
        return QmvConfig {
            rpt,
            tpr,
            wg: 128,
            ..base
        };
    }
    let chunks = (k / 32) as u32;
    let warps = |tpr: u32| n / XSRC_RPT as usize * (tpr as usize / 32);
    let fit = [32, 64, 128]
        .into_iter()
        .filter(|&t| t == 32 || t <= chunks);
    let tpr = fit
        .clone()
        .find(|&t| warps(t) >= QMV_MIN_WARPS)
        .or_else(|| fit.max())
        .unwrap_or(32);
    QmvConfig {
        rpt: XSRC_RPT,
        tpr,
        wg: 128,
        ..base
    }
}

/// Rows and invocations per row-set of a GLU-writing gate|up matvec (8 row-sets, 256
/// invocations). Measured on an H200 (`decode_ab`, µs a token, against the GLU as its own
/// dispatch): Gemma-3-4B (20480 x 2560) 3185 -> 2972, where its default shape (16, 64) in
/// 64-row workgroups gave 3318 and (16, 32) 3234; Llama-3.1-8B (28672 x 4096) 2992 -> 2852,
/// where its default (16, 32) gave 2986 (docs/PERFORMANCE.md, session 8).
const GLU_OUT_RPT: u32 = 8;
const GLU_OUT_TPR: u32 = 32;

fn glu_out_configs() -> Vec<(QmvConfig, bool)> {
    out_configs(glu_out_shape)
}
/// Workgroup size and output tile of the scalar tiled kernels.
pub(crate) const TILED_WG: u32 = 256;
pub(crate) const TILED_BLOCK: usize = 64;
/// Subgroup size the cooperative kernels are built for (4 subgroups per workgroup).
pub(crate) const COOP_SG: u32 = 32;
/// Workgroup memory of the cooperative kernels: `coop16` (W tile, x tile of up to 128 rows,
/// one output tile per subgroup for up to 8) and `coop8`.
fn coop_workgroup_bytes(tile: u32) -> u32 {
    if tile == 16 {
        8704 * 2 + 9216 * 2 + 2048 * 4 + 2 * 128 * 4
    } else {
        2048 * 2 * 2 + 4096 * 4
    }
}
const DEQUANT_WG: u32 = 256;

/// Which kernel a matmul of a given shape runs, and how. A pure function of the shapes and
/// [`Caps`] ([`plan`]), shared by the quantized and dense matmuls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPlan {
    /// Matrix-vector kernel (M ≤ 8): `rpt` weight rows per row-block of 32 invocations,
    /// reductions with subgroup operations or workgroup memory.
    Vector { rpt: u32, subgroups: bool },
    /// 64 x 64 tiles of f32 FMAs, tiles in workgroup memory.
    Tiled,
    /// Cooperative-matrix tiles of `tile` x `tile` (16: NVIDIA, 8: Apple).
    Coop { tile: u32 },
}

/// The variant for `y[M, N] = x[M, K] · Wᵀ` on a device with `caps`.
pub fn plan(m: usize, n: usize, _k: usize, caps: &Caps) -> MatmulPlan {
    if m <= MAX_VEC_M {
        // One row per row-block: measured on an H200, qmv is bound by the latency of each
        // invocation's chain of loads, so more, shorter-lived invocations win (RPT 4 took
        // 25 us for 4096 x 4096 at 4 bits).
        let rpt = if n >= 4096 {
            4
        } else if n >= 512 {
            2
        } else {
            1
        };
        // Subgroups must tile a row-block of 32 exactly. At least 4 invocations: kept from a
        // session-7 experiment that sized the partial sums for it (reverted); devices with
        // smaller subgroups take the workgroup-memory path, which serves any size.
        let sg = caps.subgroups
            && caps.subgroup_min_size >= 4
            && caps.subgroup_max_size <= 32
            && caps.subgroup_min_size.is_power_of_two()
            && caps.subgroup_max_size.is_power_of_two();
        return MatmulPlan::Vector { rpt, subgroups: sg };
    }
    let coop_ok = caps.shader_f16
        && caps.subgroups
        && caps.subgroup_min_size == COOP_SG
        && caps.subgroup_max_size == COOP_SG
        && caps.max_invocations_per_workgroup >= 4 * COOP_SG;
    if coop_ok {
        for tile in [16, 8] {
            if caps.coop_tile(tile).is_some()
                && caps.max_workgroup_storage >= coop_workgroup_bytes(tile)
            {
                return MatmulPlan::Coop { tile };
            }
        }
    }
    MatmulPlan::Tiled
}

/// The tiled plan when the cooperative one is not wanted (for `qmm` with M ≤ 8).
fn matrix_plan(m: usize, n: usize, k: usize, caps: &Caps) -> MatmulPlan {
    match plan(m.max(MAX_VEC_M + 1), n, k, caps) {
        MatmulPlan::Vector { .. } => MatmulPlan::Tiled,
        p => p,
    }
}

/// The dtype that selects the scales' WGSL type: U8 for MXFP4's e8m0 bytes.
pub(crate) fn scale_dtype(params: QuantParams, dtype: DType) -> DType {
    match params.mode {
        QuantMode::Affine => dtype,
        QuantMode::Mxfp4 => DType::U8,
    }
}

pub(crate) fn qspec(entry: &'static str, params: QuantParams, dt: DType, wg: u32) -> Result<Spec> {
    Spec::new(entry, dt, wg)
        .with_const("BITS", params.bits)?
        .with_const("GROUP_SIZE", params.group_size)
}

/// Work folded into a decode matvec ([`qmv_fused`]); each part saves a dispatch and the
/// barrier before it. Applied in this order: GLU, norm, matvec, residual.
#[derive(Clone, Copy, Debug, Default)]
pub struct QmvFusion<'a> {
    /// x holds rows `[gate | up]` of 2K elements; the matvec's input is `act(gate) * up`
    /// (what [`crate::ops::activation::glu_split`] computes).
    pub glu: Option<Act>,
    /// RMS-normalize the input first, `x * rsqrt(mean(x²) + eps) * weight` (what
    /// [`crate::ops::rms_norm`] computes): the f32 weight of K elements, and eps.
    pub norm: Option<(&'a MlxBuffer, f32)>,
    /// Added to the output, `y = x · Wᵀ + residual` (f32, M x N elements).
    pub residual: Option<&'a MlxBuffer>,
}

impl<'a> QmvFusion<'a> {
    /// Only a residual added (or nothing).
    pub fn residual(residual: Option<&'a MlxBuffer>) -> Self {
        QmvFusion {
            residual,
            ..QmvFusion::default()
        }
    }

    /// The kernel's FUSE and ACT bits (qmatmul.wgsl).
    fn code(&self) -> u32 {
        let fuse = u32::from(self.norm.is_some())
            | u32::from(self.glu.is_some()) << 1
            | u32::from(self.residual.is_some()) << 2;
        fuse | self.glu.map_or(0, Act::code) << 3
    }
}

/// The fusion codes the engine's decode path dispatches ([`QmvFusion::code`]): none, norm
/// (q|k|v and gate|up), residual (o), GLU with and without the residual (down), per
/// activation.
fn fusion_codes() -> Vec<u32> {
    let mut v = vec![0, 1, 4];
    for act in ACTS {
        v.push(2 | act.code() << 3);
        v.push(6 | act.code() << 3);
    }
    v
}

/// Whether x may be quantized for integer dot products: 4- and 8-bit affine codes.
fn xq_applies(params: QuantParams) -> bool {
    params.mode == QuantMode::Affine && matches!(params.bits, 4 | 8)
}

/// The x quantization of the routed matvec (`gqmv`, ops::moe) for this format: the qmv
/// default (or what `set_qmv_xq` forces), 0 where it does not apply.
pub(crate) fn default_xq(params: QuantParams) -> u32 {
    if !xq_applies(params) {
        return 0;
    }
    forced_xq().unwrap_or(QMV_DEFAULT_XQ)
}

/// How a [`QuantizedX`] is encoded, fixed by the weight that consumes it: the codes' width
/// (4 or 8 bits: it orders the bytes) and the x mode (`QmvConfig::xq`: 1 one int8 level, 2
/// a 16-bit integer as two bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XqForm {
    bits: u32,
    xq: u32,
}

impl XqForm {
    /// The form `w`'s decode matvec takes, if it takes quantized x at all (MLX affine 4- and
    /// 8-bit codes, x quantization on).
    pub fn of(w: &QuantWeight) -> Option<XqForm> {
        let xq = default_xq(w.params());
        (xq != 0).then_some(XqForm {
            bits: w.params().bits,
            xq,
        })
    }

    /// The x mode (`QmvConfig::xq`: 1 one int8 level, 2 two bytes).
    pub fn xq(self) -> u32 {
        self.xq
    }

    /// The form of a kernel's `XQ_OUT` code (tests).
    #[cfg(test)]
    pub(crate) fn from_code(code: u32) -> XqForm {
        XqForm {
            bits: code >> 2,
            xq: code & 3,
        }
    }

    /// The kernels' `XQ_OUT` constant: BITS << 2 | XQ.
    pub(crate) fn code(self) -> u32 {
        self.bits << 2 | self.xq
    }
}

/// `XqForm::code` of every form (4- and 8-bit codes, x modes 1 and 2): the producers'
/// kernel variants.
pub(crate) const XQ_FORM_CODES: [u32; 4] = [4 << 2 | 1, 4 << 2 | 2, 8 << 2 | 1, 8 << 2 | 2];

/// u32 words of one quantized 32-element chunk (common/xq_quantize.wgsl: h, l, d, s, hs).
pub(crate) const XQ_CHUNK_WORDS: usize = 20;

/// f32 activations quantized per 32-element chunk for the integer-dot decode matvecs
/// ([`qmv_xq`], `ops::moe::gather_qmv_xq`) by the op that produced them
/// ([`crate::ops::norm::rms_norm_xq`] and its residual / f32-too variants,
/// [`crate::ops::activation::glu_split_xq`], `glu_xq`, or [`quantize_x`]). A matvec with
/// f32 x loads and quantizes every chunk again in each of its row-sets; reading chunks
/// quantized once made decode steps on an H200 3.8 % (Llama-3.1-8B), 6.8 % (Gemma-3-4B) and
/// 4.9 % (Qwen3-30B-A3B) faster (docs/PERFORMANCE.md, session 7).
///
/// Chunks written by a matvec with a [`NormOut`] hold x·g before the RMS norm's 1/rms (and
/// each chunk's Σx²): [`QuantizedX::pending_norm`] is then the norm's eps, and the matvec
/// that reads them ([`qmv_xq`]) finishes the norm.
#[derive(Clone, Debug)]
pub struct QuantizedX {
    buf: MlxBuffer,
    rows: usize,
    k: usize,
    form: XqForm,
    pending_norm: Option<f32>,
}

impl QuantizedX {
    /// Room for `rows` rows of `k` values in `form` (k a positive multiple of 32).
    pub(crate) fn alloc(
        pass: &mut Pass,
        op: &str,
        rows: usize,
        k: usize,
        form: XqForm,
    ) -> Result<QuantizedX> {
        check::ensure(k.is_multiple_of(32) && k > 0, op, || {
            format!("rows of {k} values cannot be quantized in chunks of 32")
        })?;
        check::fits_u32(rows * k, op, "elements")?;
        let buf = pass.alloc(DType::U32, &[rows, k / 32 * XQ_CHUNK_WORDS])?;
        Ok(QuantizedX {
            buf,
            rows,
            k,
            form,
            pending_norm: None,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn form(&self) -> XqForm {
        self.form
    }

    /// The chunks' words (u32).
    pub fn buffer(&self) -> &MlxBuffer {
        &self.buf
    }

    /// Chunks another op wrote into `buf` (u32 `[rows, k / 32 * 20]`).
    pub(crate) fn from_words(buf: MlxBuffer, rows: usize, k: usize, form: XqForm) -> Self {
        QuantizedX {
            buf,
            rows,
            k,
            form,
            pending_norm: None,
        }
    }

    /// Measurement only (timing, wrong results): `buf`'s words read as chunks of `rows` rows
    /// of `k` values in `form`, so a matvec of them still waits on whatever wrote `buf`.
    #[doc(hidden)]
    pub fn reinterpret(buf: &MlxBuffer, rows: usize, k: usize, form: XqForm) -> Result<Self> {
        let words = rows * k / 32 * XQ_CHUNK_WORDS;
        check::ensure(buf.byte_len() >= 4 * words as u64, "reinterpret", || {
            format!("{} bytes hold fewer than {words} words", buf.byte_len())
        })?;
        Ok(QuantizedX {
            buf: buf.clone(),
            rows,
            k,
            form,
            pending_norm: None,
        })
    }

    /// The eps of an RMS norm the chunks still need ([`NormOut`]): they hold x·g, unscaled,
    /// and each chunk's Σx² in its last word. None for normed or plain x.
    pub fn pending_norm(&self) -> Option<f32> {
        self.pending_norm
    }
}

/// The RMS norm after a decode matvec, split across the boundary ([`qmv_norm_out`]): the
/// matvec writes its output y (the residual stream, plus the residual) and also y·weight
/// quantized in `form` for the matvec after the norm, with each chunk's Σy²; that matvec
/// ([`qmv_xq`]) sums them over its row and scales its sums by 1/rms. The norm's own dispatch
/// goes (on an H200 a Llama-3.1-8B decode step ran 18 % faster with its pre-norms not
/// dispatched at all, the bound; docs/PERFORMANCE.md, session 8).
#[derive(Clone, Copy, Debug)]
pub struct NormOut<'a> {
    /// The norm's weight, f32 `[N]` (N the matvec's output width).
    pub weight: &'a MlxBuffer,
    pub eps: f32,
    /// What the next matvec reads ([`XqForm::of`] its weight); must be this matvec's own
    /// (the kernel quantizes with its own code width and x mode).
    pub form: XqForm,
}

/// f32 `x` `[rows, K]` (K a multiple of 32) quantized for a matvec of weights in `form`, in
/// one dispatch: for x that comes from no quantizing producer.
pub fn quantize_x(pass: &mut Pass, x: &MlxBuffer, form: XqForm) -> Result<QuantizedX> {
    let op = "quantize_x";
    check::dtype(x, &[DType::F32], op, "x")?;
    let (rows, k) = check::rows(x, op, "x")?;
    let q = QuantizedX::alloc(pass, op, rows, k, form)?;
    super::activation::quantize_chunks(pass, x, &q)?;
    Ok(q)
}

/// The qmv variant: `xsrc` reads x as [`QuantizedX`] chunks (then there is no GLU fold, which
/// needs f32 x, and the norm fold means a pending norm: `QuantizedX::pending_norm`);
/// `xqo` writes chunks for the next matvec: 1 the next norm's too ([`NormOut`]), 2 the
/// GLU's of a stacked gate|up instead of y ([`qmv_glu_out`]).
fn vec_spec(
    params: QuantParams,
    dt: DType,
    cfg: QmvConfig,
    sg: bool,
    fuse: u32,
    xsrc: bool,
    xqo: u32,
) -> Result<Spec> {
    let xq = if xq_applies(params) { cfg.xq } else { 0 };
    let xsrc = u32::from(xsrc && xq != 0 && fuse & 2 == 0);
    let xqo = if xq != 0 { xqo } else { 0 };
    let packed =
        xqo << 28 | xsrc << 27 | xq << 25 | fuse << 20 | cfg.exp << 16 | cfg.tpr << 5 | cfg.rpt;
    Ok(qspec("qmv", params, dt, cfg.wg)?
        .with_const("QMV", packed)?
        .with_subgroups(sg))
}

/// The params block of `matmul_coop.wgsl` (dense W leaves `wpr` and `gpr` at 0).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CoopParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub wpr: u32,
    pub gpr: u32,
    /// Row length of the f16 copy of x (set by `dispatch_coop`).
    pub kp: u32,
    /// `gqmm_coop16` (m = pairs): a pair's x row is pair / x_div.
    pub x_div: u32,
    pub experts: u32,
    /// `gqmm_coop16`: entries of the tile table.
    pub max_tiles: u32,
    pub _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<CoopParams>() == 48);

impl CoopParams {
    /// y[M, N] = x · Wᵀ over K; `wpr`/`gpr` the quantized W's words and groups per row.
    pub(crate) fn new(m: u32, n: u32, k: u32, wpr: u32, gpr: u32) -> Self {
        CoopParams {
            m,
            n,
            k,
            wpr,
            gpr,
            kp: 0,
            x_div: 1,
            experts: 0,
            max_tiles: 0,
            _pad: [0; 3],
        }
    }
}

/// x `[rows, K]` f32 as the f16 rows the 16 x 16 cooperative kernels read: rows of `kp` (K
/// rounded up to their step) halves, zeros past K, as u32 pairs. Returns it and `kp`.
pub(crate) fn coop_x16(
    pass: &mut Pass,
    x: &MlxBuffer,
    rows: usize,
    k: usize,
    op: &str,
) -> Result<(MlxBuffer, u32)> {
    let kp = k.div_ceil(COOP16_KB) * COOP16_KB;
    let mut params = CoopParams::new(
        check::fits_u32(rows, op, "x rows")?,
        0,
        check::fits_u32(k, op, "K")?,
        0,
        0,
    );
    params.kp = check::fits_u32(kp, op, "K")?;
    let pairs = rows
        .checked_mul(kp / 2)
        .ok_or_else(|| MlxError::invalid(format!("{op}: x too large")))?;
    check::fits_u32(pairs, op, "x elements")?;
    let x16 = pass.alloc(DType::U32, &[rows, kp / 2])?;
    let conv = Spec::new("x_to_f16", DType::F32, X_TO_F16_WG);
    let groups = check::fits_u32(pairs.div_ceil(X_TO_F16_WG as usize), op, "workgroups")?;
    pass.dispatch(
        Kernel::MatmulCoop,
        conv,
        &params,
        &[x, x, x, x, x, x, &x16],
        groups,
    )?;
    Ok((x16, params.kp))
}

/// K step of the 16 x 16 cooperative kernel: the f16 copy of x has rows of a multiple of it.
const COOP16_KB: usize = 64;
const X_TO_F16_WG: u32 = 256;

/// `y = x · Wᵀ` on the cooperative kernel `spec` (tile 16 or 8); `w` holds the W bindings
/// 1, 2, 3 and 5 (packed, scales, biases, dense). The 16 x 16 kernel reads x as f16 rows of
/// K rounded up to its step (zeros past K), which one small dispatch writes first: its loads
/// are then 16 bytes wide, unconditional, and need no conversion. With `sorted` (the routed
/// prefill, `gqmm_coop16`: the pairs sorted by expert, `params` giving x_div, experts and
/// max_tiles), M counts pairs, x has pairs / x_div rows, and a workgroup takes one tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch_coop(
    pass: &mut Pass,
    tile: u32,
    spec: Spec,
    mut params: CoopParams,
    x: &MlxBuffer,
    w: [&MlxBuffer; 4],
    y: &MlxBuffer,
    sorted: Option<&MlxBuffer>,
    op: &str,
) -> Result<()> {
    let (m, n) = (params.m as usize, params.n as usize);
    let [packed, scales, biases, dense] = w;
    if tile != 16 {
        let groups = check::fits_u32(m.div_ceil(32) * n.div_ceil(32), op, "workgroups")?;
        let bufs = [x, packed, scales, biases, y, dense];
        return pass.dispatch(Kernel::MatmulCoop, spec, &params, &bufs, groups);
    }
    let x_rows = if sorted.is_some() {
        m / params.x_div.max(1) as usize
    } else {
        m
    };
    let (x16, kp) = coop_x16(pass, x, x_rows, params.k as usize, op)?;
    params.kp = kp;
    // Row blocks: the tiles of the sorted pairs, or half the workgroup size in x rows (4 or
    // 8 subgroups of 32).
    let blocks = match sorted {
        Some(_) => params.max_tiles as usize,
        None => m.div_ceil((spec.wg / 2).max(1) as usize),
    };
    let groups = check::fits_u32(blocks.saturating_mul(n.div_ceil(128)), op, "workgroups")?;
    // Binding 0 is the packed words as vectors here (x itself is read as x16), read for 4-
    // and 8-bit codes (a chunk is 16 or 32 bytes). A dense weight's kernel, or words shorter
    // than one vector (3 bits, one row), read none: x16 fills it (at least 16 bytes).
    let vec_words = !spec.entry.starts_with("matmul") && packed.byte_len() >= 16;
    let words = if vec_words { packed } else { &x16 };
    // Binding 6: the sorted pairs (gathered) or, unread, x16 again.
    let bufs = [
        words,
        packed,
        scales,
        biases,
        y,
        dense,
        sorted.unwrap_or(&x16),
        &x16,
    ];
    pass.dispatch(Kernel::MatmulCoop, spec, &params, &bufs, groups)
}

/// Workgroup size of the cooperative kernels for M rows of x: the 16 x 16 kernel takes 8
/// subgroups (128 x rows per workgroup, each W tile's loads and dequantization shared by
/// twice the rows: 1.4-1.6x faster at M = 512 on an H200) when M > 64, else 4.
pub(crate) fn coop_wg(tile: u32, m: usize, caps: &Caps) -> u32 {
    if tile == 16 && m > 64 && caps.max_invocations_per_workgroup >= 8 * COOP_SG {
        8 * COOP_SG
    } else {
        4 * COOP_SG
    }
}

pub(crate) fn coop_entry(tile: u32, quant: bool) -> &'static str {
    match (tile, quant) {
        (16, true) => "qmm_coop16",
        (16, false) => "matmul_coop16",
        (_, true) => "qmm_coop8",
        (_, false) => "matmul_coop8",
    }
}

/// Every quantization format the kernels take, with the scale dtypes.
fn formats() -> Vec<(QuantParams, DType)> {
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

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = vec![(Kernel::Qmatmul, Spec::new("copy_x", DType::F32, DEQUANT_WG))];
    for (params, dt) in formats() {
        // x quantization only where it applies (vec_spec drops it elsewhere: duplicates).
        let cfgs = qmv_configs()
            .into_iter()
            .filter(|c| c.xq == 0 || xq_applies(params));
        for cfg in cfgs {
            for sg in [false, true] {
                for fuse in fusion_codes() {
                    let spec = vec_spec(params, dt, cfg, sg, fuse, false, 0)?;
                    v.push((Kernel::Qmatmul, spec));
                    // Quantized x: plain, with the residual, or with a pending norm.
                    if cfg.xq != 0 && fuse & 2 == 0 && xq_applies(params) {
                        let spec = vec_spec(params, dt, cfg, sg, fuse, true, 0)?;
                        v.push((Kernel::Qmatmul, spec));
                    }
                }
                if cfg.xq != 0 && xq_applies(params) {
                    // A pending norm with a residual.
                    let spec = vec_spec(params, dt, cfg, sg, 5, true, 0)?;
                    v.push((Kernel::Qmatmul, spec));
                }
            }
        }
        if xq_applies(params) {
            // The narrow LM-head shape (quantized x only): plain, residual, pending norm,
            // both.
            let (rpt, tpr) = XSRC_HEAD_NARROW;
            let cfg = QmvConfig {
                rpt,
                tpr,
                wg: 128,
                exp: 0,
                xq: QMV_DEFAULT_XQ,
            };
            for sg in [false, true] {
                for fuse in [0, 1, 4, 5] {
                    v.push((
                        Kernel::Qmatmul,
                        vec_spec(params, dt, cfg, sg, fuse, true, 0)?,
                    ));
                }
            }
            for (cfg, sg) in norm_out_configs() {
                for (fuse, xsrc) in [(0, false), (4, false), (0, true), (4, true)] {
                    let spec = vec_spec(params, dt, cfg, sg, fuse, xsrc, 1)?;
                    v.push((Kernel::Qmatmul, spec));
                }
            }
            for (cfg, sg) in glu_out_configs() {
                for act in ACTS {
                    // f32 x, quantized x, quantized x with a pending norm.
                    for (fuse, xsrc) in [(0, false), (0, true), (1, true)] {
                        let fuse = fuse | act.code() << 3;
                        let spec = vec_spec(params, dt, cfg, sg, fuse, xsrc, 2)?;
                        v.push((Kernel::Qmatmul, spec));
                    }
                }
            }
        }
        v.push((Kernel::Qmatmul, qspec("qmm", params, dt, TILED_WG)?));
        v.push((Kernel::Qmatmul, qspec("dequant", params, dt, DEQUANT_WG)?));
        for (tile, sgs) in [(16, 4), (16, 8), (8, 4)] {
            let s = qspec(coop_entry(tile, true), params, dt, sgs * COOP_SG)?;
            v.push((Kernel::MatmulCoop, s));
        }
        v.push((
            Kernel::MatmulCoop,
            qspec("gqmm_coop16", params, dt, 4 * COOP_SG)?,
        ));
    }
    v.push((
        Kernel::MatmulCoop,
        Spec::new("x_to_f16", DType::F32, X_TO_F16_WG),
    ));
    Ok(v)
}

fn params_for(w: &QuantWeight, m: usize) -> Result<QmatmulParams> {
    let l = w.layout();
    let [n, k] = w.shape();
    Ok(QmatmulParams {
        m: check::fits_u32(m, "qmatmul", "M")?,
        n: check::fits_u32(n, "qmatmul", "N")?,
        k: check::fits_u32(k, "qmatmul", "K")?,
        wpr: check::fits_u32(l.words_per_row, "qmatmul", "words per row")?,
        gpr: check::fits_u32(l.groups_per_row, "qmatmul", "groups per row")?,
        rows: 0,
        use_ids: 0,
        eps: 0.0,
        xo: 0,
        _pad: [0; 3],
    })
}

/// Validates x against W: f32, last dimension K. Returns (M, output shape).
fn check_x(op: &str, x: &MlxBuffer, k: usize, n: usize) -> Result<(usize, Vec<usize>)> {
    check::dtype(x, &[DType::F32], op, "x")?;
    let (m, xk) = check::rows(x, op, "x")?;
    check::ensure(xk == k, op, || {
        format!(
            "x has {xk} columns (shape {:?}), expected K = {k}",
            x.shape()
        )
    })?;
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Ok((m, shape))
}

/// `x` itself when its first element sits on a 16-byte boundary of the binding (the kernels
/// read it as vec4), else an aligned copy.
fn aligned_x(pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
    let align = pass.caps().storage_offset_alignment;
    if x.elem_offset().is_multiple_of(4) && align.is_multiple_of(16) {
        return Ok(x.clone());
    }
    let n = check::fits_u32(x.len(), "qmatmul", "x elements")?;
    let out = pass.alloc(DType::F32, x.shape())?;
    let params = QmatmulParams {
        m: 0,
        n: 0,
        k: 0,
        wpr: 0,
        gpr: 0,
        rows: n,
        use_ids: 0,
        eps: 0.0,
        xo: 0,
        _pad: [0; 3],
    };
    let spec = Spec::new("copy_x", DType::F32, DEQUANT_WG);
    let bufs = [&out, &out, &out, &out, &out, &out, x];
    pass.dispatch(
        Kernel::Qmatmul,
        spec,
        &params,
        &bufs,
        n.div_ceil(DEQUANT_WG),
    )?;
    Ok(out)
}

/// `y = x · Wᵀ`, choosing the kernel with [`plan`]: qmv for M ≤ 8, else qmm.
/// `x` is f32 `[..., K]`; `y` is f32 `[..., N]`.
pub fn qmatmul(pass: &mut Pass, x: &MlxBuffer, w: &QuantWeight) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, _) = check_x("qmatmul", x, k, n)?;
    let p = plan(m, n, k, pass.caps());
    run(pass, "qmatmul", x, w, p, false)
}

/// [`qmatmul`] with the matvec path's x kept in f32 (no integer quantization, `QmvConfig::xq`
/// 0): for products whose outputs make discrete choices, an MoE router's top-k, where
/// rounding x could flip a choice that f32 arithmetic (and MLX) would make. Measured: the
/// tiny Qwen3-MoE parity model picked another expert, and from then other tokens, with
/// a 16-bit x in its router. Routers are small (experts x hidden), so this costs nothing.
pub fn qmatmul_f32_x(pass: &mut Pass, x: &MlxBuffer, w: &QuantWeight) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, _) = check_x("qmatmul", x, k, n)?;
    let p = plan(m, n, k, pass.caps());
    run(pass, "qmatmul", x, w, p, true)
}

/// Matrix-vector `y = x · Wᵀ` for M ≤ 8 rows of x (the decode path).
pub fn qmv(pass: &mut Pass, x: &MlxBuffer, w: &QuantWeight) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, _) = check_x("qmv", x, k, n)?;
    check::ensure(m <= MAX_VEC_M, "qmv", || {
        format!("x has {m} rows, at most {MAX_VEC_M} (use qmm or qmatmul)")
    })?;
    let p = plan(m, n, k, pass.caps());
    run(pass, "qmv", x, w, p, false)
}

/// [`qmv`] with an explicit dispatch shape (for tuning; the default comes from the shape).
#[doc(hidden)]
pub fn qmv_with(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &QuantWeight,
    cfg: QmvConfig,
) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, yshape) = check_x("qmv", x, k, n)?;
    check::ensure(m <= MAX_VEC_M, "qmv", || {
        format!("x has {m} rows, at most {MAX_VEC_M} (use qmm or qmatmul)")
    })?;
    let vec = VecRun {
        op: "qmv",
        m,
        yshape,
        cfg: cfg.validate()?,
        subgroups: vec_subgroups(m, n, k, pass.caps()),
        xsrc: None,
        out: None,
    };
    Ok(run_vec(pass, x, w, &vec, &QmvFusion::default())?.0)
}

/// [`qmv`] with work folded in around it ([`QmvFusion`]): the decode path's RMS norm before
/// a projection, the GLU before the down projection and the residual add after one, in a
/// single dispatch. `x` is f32 `[M, K]` (`[M, 2K]` with a GLU), M ≤ 8; `y` is f32 `[M, N]`.
pub fn qmv_fused(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &QuantWeight,
    fusion: &QmvFusion<'_>,
) -> Result<MlxBuffer> {
    let run = fused_run(pass, "qmv_fused", x, w, fusion)?;
    Ok(run_vec(pass, x, w, &run, fusion)?.0)
}

/// [`qmv_fused`] with x kept in f32 in the kernel (as [`qmatmul_f32_x`]): for outputs that
/// make discrete choices (routers), with the norm before them folded in.
pub fn qmv_fused_f32_x(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &QuantWeight,
    fusion: &QmvFusion<'_>,
) -> Result<MlxBuffer> {
    let mut run = fused_run(pass, "qmv_fused_f32_x", x, w, fusion)?;
    run.cfg.xq = 0;
    Ok(run_vec(pass, x, w, &run, fusion)?.0)
}

/// Validates [`qmv_fused`]'s input; its dispatch shape.
fn fused_run<'a>(
    pass: &Pass,
    op: &'a str,
    x: &MlxBuffer,
    w: &QuantWeight,
    fusion: &QmvFusion<'_>,
) -> Result<VecRun<'a>> {
    let [n, k] = w.shape();
    check::dtype(x, &[DType::F32], op, "x")?;
    let (m, xk) = check::rows(x, op, "x")?;
    let want = if fusion.glu.is_some() { 2 * k } else { k };
    check::ensure(xk == want, op, || {
        let what = if fusion.glu.is_some() {
            "2K (gate and up)"
        } else {
            "K"
        };
        format!(
            "x has {xk} columns (shape {:?}), expected {what} = {want}",
            x.shape()
        )
    })?;
    check::ensure(m <= MAX_VEC_M, op, || {
        format!("x has {m} rows, at most {MAX_VEC_M}")
    })?;
    if let Some((nw, _)) = fusion.norm {
        check::dtype(nw, &[DType::F32], op, "norm weight")?;
        check::len(nw, k, op, "norm weight")?;
        vec4_view(pass, nw, op, "the norm weight")?;
    }
    check_residual(fusion.residual, m * n, op)?;
    let mut yshape = x.shape().to_vec();
    if let Some(last) = yshape.last_mut() {
        *last = n;
    }
    Ok(VecRun {
        op,
        m,
        yshape,
        cfg: qmv_config(n, k),
        subgroups: vec_subgroups(m, n, k, pass.caps()),
        xsrc: None,
        out: None,
    })
}

/// A view read as vec4 must start on 16 bytes of its binding.
fn vec4_view(pass: &Pass, b: &MlxBuffer, op: &str, what: &str) -> Result<()> {
    let align = pass.caps().storage_offset_alignment;
    check::ensure(
        b.elem_offset().is_multiple_of(4) && align.is_multiple_of(16),
        op,
        || {
            format!(
                "{what} view starts at element {}, not a multiple of 4",
                b.elem_offset()
            )
        },
    )
}

fn check_residual(residual: Option<&MlxBuffer>, len: usize, op: &str) -> Result<()> {
    if let Some(r) = residual {
        check::dtype(r, &[DType::F32], op, "residual")?;
        check::len(r, len, op, "residual")?;
    }
    Ok(())
}

/// The decode matvec `y = x · Wᵀ (+ residual)` of x already quantized for W
/// ([`QuantizedX`], whose form must be `XqForm::of(w)`): x `[M, K]`, M ≤ 8; `residual` f32
/// `[M, N]` is added to y (as `QmvFusion::residual`). y is f32 `[M, N]`. Chunks with a
/// pending norm ([`QuantizedX::pending_norm`]) get it here.
pub fn qmv_xq(
    pass: &mut Pass,
    x: &QuantizedX,
    w: &QuantWeight,
    residual: Option<&MlxBuffer>,
) -> Result<MlxBuffer> {
    let run = xq_run(pass, "qmv_xq", x, w, residual)?;
    Ok(run_vec(pass, &x.buf, w, &run, &QmvFusion::residual(residual))?.0)
}

/// [`qmv_xq`] in a given dispatch shape (benchmarks and tests; `cfg.xq` is the chunks').
#[doc(hidden)]
pub fn qmv_xq_with(
    pass: &mut Pass,
    x: &QuantizedX,
    w: &QuantWeight,
    cfg: QmvConfig,
) -> Result<MlxBuffer> {
    let mut run = xq_run(pass, "qmv_xq", x, w, None)?;
    run.cfg = QmvConfig {
        xq: x.form.xq,
        ..cfg.validate()?
    };
    Ok(run_vec(pass, &x.buf, w, &run, &QmvFusion::default())?.0)
}

/// Validates [`qmv_xq`]'s input; its dispatch shape.
fn xq_run<'a>(
    pass: &Pass,
    op: &'a str,
    x: &'a QuantizedX,
    w: &QuantWeight,
    residual: Option<&MlxBuffer>,
) -> Result<VecRun<'a>> {
    let [n, k] = w.shape();
    let want = XqForm::of(w);
    check::ensure(want == Some(x.form), op, || match want {
        Some(f) => format!(
            "x was quantized for {}-bit codes (x mode {}), the weight takes {}-bit (x mode {})",
            x.form.bits, x.form.xq, f.bits, f.xq
        ),
        None => format!(
            "the weight ({:?}, {} bits) takes f32 x, not quantized chunks",
            w.params().mode,
            w.params().bits
        ),
    })?;
    check::ensure(x.k == k, op, || {
        format!("x has {} values a row, expected K = {k}", x.k)
    })?;
    let m = x.rows;
    check::ensure(m <= MAX_VEC_M && m > 0, op, || {
        format!("x has {m} rows, expected 1 to {MAX_VEC_M}")
    })?;
    check_residual(residual, m * n, op)?;
    let subgroups = vec_subgroups(m, n, k, pass.caps());
    let narrow = subgroups && narrow_fits(XSRC_HEAD_NARROW.1, pass.caps());
    let mut cfg = xsrc_config(n, k, narrow);
    cfg.xq = x.form.xq;
    Ok(VecRun {
        op,
        m,
        yshape: vec![m, n],
        cfg,
        subgroups,
        xsrc: Some(x),
        out: None,
    })
}

/// A decode matvec's x: f32 rows, or rows already quantized for its weight.
#[derive(Clone, Copy, Debug)]
pub enum MatvecX<'a> {
    F32(&'a MlxBuffer),
    Quantized(&'a QuantizedX),
}

/// [`qmv_fused`] (f32 x, only the residual fold) or [`qmv_xq`] (quantized x) that also
/// writes its output, y plus the residual, as the quantized input of the matvec after the
/// RMS norm `out` ([`NormOut`]). Returns y and those chunks, whose norm is pending.
pub fn qmv_norm_out(
    pass: &mut Pass,
    x: MatvecX<'_>,
    w: &QuantWeight,
    residual: Option<&MlxBuffer>,
    out: &NormOut<'_>,
) -> Result<(MlxBuffer, QuantizedX)> {
    let op = "qmv_norm_out";
    let fusion = QmvFusion::residual(residual);
    let (mut run, xbuf) = match x {
        MatvecX::F32(x) => (fused_run(pass, op, x, w, &fusion)?, x),
        MatvecX::Quantized(q) => (xq_run(pass, op, q, w, residual)?, &q.buf),
    };
    let [n, k] = w.shape();
    check::ensure(XqForm::of(w) == Some(out.form), op, || {
        format!(
            "the chunks are quantized as the matvec's own x ({:?}), not as {:?}",
            XqForm::of(w),
            out.form
        )
    })?;
    check::ensure(n.is_multiple_of(32), op, || {
        format!("N = {n} is not a multiple of 32 (a chunk)")
    })?;
    check::dtype(out.weight, &[DType::F32], op, "norm weight")?;
    check::len(out.weight, n, op, "norm weight")?;
    vec4_view(pass, out.weight, op, "the norm weight")?;
    run.cfg = norm_out_config(n, k, run.subgroups, out_max_wg(pass.caps()));
    run.cfg.xq = out.form.xq;
    check_fits(pass, &run, op)?;
    run.out = Some(ChunksOut::Norm(*out));
    let (y, chunks) = run_vec(pass, xbuf, w, &run, &fusion)?;
    let mut q = chunks.ok_or_else(|| MlxError::invalid(format!("{op}: no chunks written")))?;
    q.pending_norm = Some(out.eps);
    Ok((y, q))
}

/// The GLU after a stacked gate|up matvec, applied by the matvec to its own rows: `w` holds
/// rows `[gate | up]` (2I of them), x is f32 or quantized for `w` (a pending norm is
/// applied); returns act(gate)·up `[M, I]` quantized in `form` for the down matvec (which
/// must be `w`'s own form), and writes no f32 output. The GLU's dispatch goes.
pub fn qmv_glu_out(
    pass: &mut Pass,
    x: MatvecX<'_>,
    w: &QuantWeight,
    act: Act,
    form: XqForm,
) -> Result<QuantizedX> {
    let op = "qmv_glu_out";
    let none = QmvFusion::default();
    let (mut run, xbuf) = match x {
        MatvecX::F32(x) => (fused_run(pass, op, x, w, &none)?, x),
        MatvecX::Quantized(q) => (xq_run(pass, op, q, w, None)?, &q.buf),
    };
    let [n, _] = w.shape();
    check::ensure(XqForm::of(w) == Some(form), op, || {
        format!(
            "the chunks are quantized as the matvec's own x ({:?}), not as {form:?}",
            XqForm::of(w)
        )
    })?;
    check::ensure(n.is_multiple_of(64), op, || {
        format!("N = {n} is not [gate | up] of a multiple of 32 rows each")
    })?;
    run.cfg = QmvConfig {
        xq: form.xq,
        ..glu_out_shape(run.cfg, run.subgroups, out_max_wg(pass.caps()))
    };
    if norm_out_probe(18) {
        if let Some(c) = probe_shape(run.cfg, 2 * NORM_OUT_ROWS, run.subgroups) {
            run.cfg = c;
        }
    }
    check_fits(pass, &run, op)?;
    run.out = Some(ChunksOut::Glu(form, act));
    let (_, chunks) = run_vec(pass, xbuf, w, &run, &none)?;
    chunks.ok_or_else(|| MlxError::invalid(format!("{op}: no chunks written")))
}

/// Whether [`qmv_glu_out`] of `w` runs on this device (its workgroup of 64 rows).
pub fn glu_out_fits_weight(w: &QuantWeight, caps: &Caps) -> bool {
    let [n, k] = w.shape();
    let sg = vec_subgroups(1, n, k, caps);
    out_fits(
        glu_out_shape(qmv_config(n, k), sg, out_max_wg(caps)),
        sg,
        caps,
    )
}

/// Whether a [`NormOut`] matvec of `w` runs on this device (its workgroup of 32 rows).
pub fn norm_out_fits_weight(w: &QuantWeight, caps: &Caps) -> bool {
    let [n, k] = w.shape();
    let sg = vec_subgroups(1, n, k, caps);
    out_fits(norm_out_config(n, k, sg, out_max_wg(caps)), sg, caps)
}

/// A chunk-writing run's workgroup fits the device, or the error says why.
fn check_fits(pass: &Pass, run: &VecRun<'_>, op: &str) -> Result<()> {
    let caps = pass.caps();
    check::ensure(out_fits(run.cfg, run.sg(caps), caps), op, || {
        format!(
            "a workgroup of {} invocations does not fit the device ({} invocations, {} bytes \
             of workgroup memory)",
            run.cfg.wg, caps.max_invocations_per_workgroup, caps.max_workgroup_storage
        )
    })
}

fn out_fits(cfg: QmvConfig, subgroups: bool, caps: &Caps) -> bool {
    // red and red_ss, yrows, and without subgroups quantize_part's exchange (20 bytes an
    // invocation).
    let exchange = if subgroups { 0 } else { 20 * cfg.wg };
    let bytes = 2048 * 4 + 256 * 4 + 64 * 4 + exchange;
    cfg.wg <= caps.max_invocations_per_workgroup && bytes <= caps.max_workgroup_storage
}

/// Whether the matvec plan reduces with subgroups on this device.
fn vec_subgroups(m: usize, n: usize, k: usize, caps: &Caps) -> bool {
    match plan(m, n, k, caps) {
        MatmulPlan::Vector { subgroups, .. } => subgroups,
        _ => false,
    }
}

impl VecRun<'_> {
    /// Whether the dispatch reduces with subgroups: the plan's choice, for row-sets narrower
    /// than 32 only where every subgroup is that wide.
    fn sg(&self, caps: &Caps) -> bool {
        self.subgroups && narrow_fits(self.cfg.tpr, caps)
    }
}

/// What a qmv dispatch needs besides its buffers.
struct VecRun<'a> {
    op: &'a str,
    m: usize,
    yshape: Vec<usize>,
    cfg: QmvConfig,
    subgroups: bool,
    /// x holds these [`QuantizedX`] chunks.
    xsrc: Option<&'a QuantizedX>,
    /// Chunks for the next matvec: the next norm's too, or the GLU's instead of y.
    out: Option<ChunksOut<'a>>,
}

/// What a qmv writes for the matvec after it, as that matvec's quantized x.
#[derive(Clone, Copy)]
enum ChunksOut<'a> {
    /// y and y·g before the norm's 1/rms ([`qmv_norm_out`]).
    Norm(NormOut<'a>),
    /// act(gate)·up of a stacked gate|up's rows, no y ([`qmv_glu_out`]).
    Glu(XqForm, Act),
}

impl ChunksOut<'_> {
    /// The kernel's XQO.
    fn code(self) -> u32 {
        match self {
            ChunksOut::Norm(_) => 1,
            ChunksOut::Glu(..) => 2,
        }
    }
}

/// One qmv dispatch: y (or, with the GLU's chunks, their buffer), and the chunks when the
/// run asks for them.
fn run_vec(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &QuantWeight,
    run: &VecRun<'_>,
    fusion: &QmvFusion<'_>,
) -> Result<(MlxBuffer, Option<QuantizedX>)> {
    let [n, _] = w.shape();
    let mut params = params_for(w, run.m)?;
    // A norm folded into f32 x, or one pending in quantized x.
    let pending = run.xsrc.and_then(|q| q.pending_norm);
    params.eps = fusion.norm.map_or(pending.unwrap_or(0.0), |(_, eps)| eps);
    let glu_act = match run.out {
        Some(ChunksOut::Glu(_, act)) => act.code() << 3,
        _ => 0,
    };
    let fuse = fusion.code() | u32::from(pending.is_some()) | glu_act;
    let dt = scale_dtype(w.params(), w.dtype());
    let biases = w.biases().unwrap_or(w.scales());
    // Quantized chunks come in fresh allocations (16-byte aligned).
    let xa = if run.xsrc.is_some() {
        x.clone()
    } else {
        aligned_x(pass, x)?
    };
    let ylen = run.m * n;
    // With chunks: one allocation, y then the chunks, bound whole at y's binding.
    let (yall, y, chunks) = match &run.out {
        Some(ChunksOut::Glu(form, _)) => {
            let words = run.m * (n / 64) * XQ_CHUNK_WORDS;
            let c = pass.alloc(DType::U32, &[run.m, words / run.m])?;
            let q = QuantizedX {
                buf: c.clone(),
                rows: run.m,
                k: n / 2,
                form: *form,
                pending_norm: None,
            };
            (c.clone(), c, Some(q))
        }
        Some(ChunksOut::Norm(out)) => {
            let words = run.m * (n / 32) * XQ_CHUNK_WORDS;
            let all = pass.alloc(DType::F32, &[ylen + words])?;
            let y = all.view(0, &run.yshape)?;
            let c = all
                .view(ylen, &[words])?
                .bitcast(DType::U32, &[run.m, words / run.m])?;
            params.xo = check::fits_u32(ylen, run.op, "y")?;
            let q = QuantizedX {
                buf: c,
                rows: run.m,
                k: n,
                form: out.form,
                pending_norm: None,
            };
            (all, y, Some(q))
        }
        None => {
            let y = pass.alloc(DType::F32, &run.yshape)?;
            (y.clone(), y, None)
        }
    };
    let sg = run.sg(pass.caps());
    let spec = vec_spec(
        w.params(),
        dt,
        run.cfg,
        sg,
        fuse,
        run.xsrc.is_some(),
        run.out
            .map_or(0, |o| if norm_out_probe(16) { 0 } else { o.code() }),
    )?;
    let rows_per_wg = (run.cfg.wg / run.cfg.tpr) as usize * run.cfg.rpt as usize;
    let groups = check::fits_u32(n.div_ceil(rows_per_wg), run.op, "workgroups")?;
    // Bindings the variant does not read get x (read-only, any size).
    let normw = match (&run.out, fusion.norm) {
        (Some(ChunksOut::Norm(out)), _) => out.weight,
        (_, Some((b, _))) => b,
        _ => &xa,
    };
    let resid = fusion.residual.unwrap_or(&xa);
    let bufs = [
        &xa,
        w.packed(),
        w.scales(),
        biases,
        &yall,
        w.packed(),
        resid,
        normw,
    ];
    pass.dispatch(Kernel::Qmatmul, spec, &params, &bufs, groups)?;
    Ok((y, chunks))
}

/// Matrix-matrix `y = x · Wᵀ` for any M (the prefill path): cooperative matrices when the
/// device has them, else the tiled scalar kernel.
pub fn qmm(pass: &mut Pass, x: &MlxBuffer, w: &QuantWeight) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, _) = check_x("qmm", x, k, n)?;
    let p = matrix_plan(m, n, k, pass.caps());
    run(pass, "qmm", x, w, p, false)
}

/// [`qmm`] on the cooperative-matrix kernel with its measurement switches `exp & 15` set (the
/// `CX` constant of matmul_coop.wgsl; 0 is production), and always 4 subgroups per
/// workgroup (64 x rows) with `exp & 16`: for finding what bounds it.
#[doc(hidden)]
pub fn qmm_with(pass: &mut Pass, x: &MlxBuffer, w: &QuantWeight, exp: u32) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, _) = check_x("qmm", x, k, n)?;
    let p = matrix_plan(m, n, k, pass.caps());
    check::ensure(matches!(p, MatmulPlan::Coop { .. }), "qmm_with", || {
        "the device has no cooperative-matrix plan".to_string()
    })?;
    run_with(pass, "qmm", x, w, p, false, exp)
}

fn run(
    pass: &mut Pass,
    op: &str,
    x: &MlxBuffer,
    w: &QuantWeight,
    plan: MatmulPlan,
    f32_x: bool,
) -> Result<MlxBuffer> {
    run_with(pass, op, x, w, plan, f32_x, 0)
}

fn run_with(
    pass: &mut Pass,
    op: &str,
    x: &MlxBuffer,
    w: &QuantWeight,
    plan: MatmulPlan,
    f32_x: bool,
    coop_exp: u32,
) -> Result<MlxBuffer> {
    let [n, k] = w.shape();
    let (m, yshape) = check_x(op, x, k, n)?;
    if let MatmulPlan::Vector { subgroups, .. } = plan {
        let mut cfg = qmv_config(n, k);
        if f32_x {
            cfg.xq = 0;
        }
        let vec = VecRun {
            op,
            m,
            yshape,
            cfg,
            subgroups,
            xsrc: None,
            out: None,
        };
        return Ok(run_vec(pass, x, w, &vec, &QmvFusion::default())?.0);
    }
    let params = params_for(w, m)?;
    let dt = scale_dtype(w.params(), w.dtype());
    let y = pass.alloc(DType::F32, &yshape)?;
    let biases = w.biases().unwrap_or(w.scales());
    match plan {
        MatmulPlan::Vector { .. } => {}
        MatmulPlan::Tiled => {
            let xa = aligned_x(pass, x)?;
            let spec = qspec("qmm", w.params(), dt, TILED_WG)?;
            let tiles = m.div_ceil(TILED_BLOCK) * n.div_ceil(TILED_BLOCK);
            let groups = check::fits_u32(tiles, op, "workgroups")?;
            let bufs = [&xa, w.packed(), w.scales(), biases, &y];
            pass.dispatch(Kernel::Qmatmul, spec, &params, &bufs, groups)?;
        }
        MatmulPlan::Coop { tile } => {
            let wg = if coop_exp & 16 != 0 {
                4 * COOP_SG
            } else {
                coop_wg(tile, m, pass.caps())
            };
            let mut spec = qspec(coop_entry(tile, true), w.params(), dt, wg)?;
            if coop_exp & 15 != 0 {
                spec = spec.with_const("CX", coop_exp & 15)?;
            }
            let cp = CoopParams::new(params.m, params.n, params.k, params.wpr, params.gpr);
            let wb = [w.packed(), w.scales(), biases, w.packed()];
            dispatch_coop(pass, tile, spec, cp, x, wb, &y, None, op)?;
        }
    }
    Ok(y)
}

fn dequant_rows(
    pass: &mut Pass,
    w: &QuantWeight,
    ids: Option<&MlxBuffer>,
    rows: usize,
    op: &str,
) -> Result<MlxBuffer> {
    let [_, k] = w.shape();
    let mut params = params_for(w, 0)?;
    params.rows = check::fits_u32(rows, op, "rows")?;
    params.use_ids = u32::from(ids.is_some());
    let invocations = rows
        .checked_mul(k / 32)
        .ok_or_else(|| MlxError::invalid(format!("{op}: output too large")))?;
    let groups = check::fits_u32(invocations.div_ceil(DEQUANT_WG as usize), op, "workgroups")?;
    let dt = scale_dtype(w.params(), w.dtype());
    let y = pass.alloc(DType::F32, &[rows, k])?;
    let spec = qspec("dequant", w.params(), dt, DEQUANT_WG)?;
    let biases = w.biases().unwrap_or(w.scales());
    let idb = ids.unwrap_or(w.packed());
    let bufs = [&y, w.packed(), w.scales(), biases, &y, &y, idb];
    pass.dispatch(Kernel::Qmatmul, spec, &params, &bufs, groups)?;
    Ok(y)
}

/// The whole weight dequantized to f32 `[N, K]` (`scale * q + bias` in f32).
pub fn dequantize(pass: &mut Pass, w: &QuantWeight) -> Result<MlxBuffer> {
    let [n, _] = w.shape();
    dequant_rows(pass, w, None, n, "dequantize")
}

/// Rows `ids` (u32 or i32, any shape) of the weight, dequantized: f32 `[ids.len(), K]`.
/// The embedding lookup of a quantized `embed_tokens`; an id outside `0..N` gives a row of
/// NaN.
pub fn gather_rows_quantized(
    pass: &mut Pass,
    w: &QuantWeight,
    ids: &MlxBuffer,
) -> Result<MlxBuffer> {
    let op = "gather_rows_quantized";
    check::dtype(ids, &[DType::U32, DType::I32], op, "ids")?;
    let ids32 = ids.bitcast(DType::U32, &[ids.len()])?;
    dequant_rows(pass, w, Some(&ids32), ids.len(), op)
}

#[cfg(test)]
#[path = "qmatmul_tests.rs"]
pub(crate) mod tests;

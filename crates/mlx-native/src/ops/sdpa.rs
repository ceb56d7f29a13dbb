//! Scaled dot-product attention over a [`KvCache`] layer:
//! - [`sdpa_decode`]: one query token per head, split-K flash decoding (partials per block of
//!   positions, then a reduction dispatch);
//! - [`sdpa_prefill`]: a chunk of T query tokens at an offset into the cache, tiled flash
//!   attention with online softmax (cooperative-matrix path where the device has it).
//!
//! Both handle GQA/MQA by index mapping (a kv head serves `n_heads / kv_heads` query heads;
//! K/V are never repeated), sliding windows (ring-buffer layers included), logit softcapping
//! (Gemma 2), attention sinks (gpt-oss) and f16 or f32 K/V. See `shaders/sdpa.wgsl`.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};
use crate::kv_cache::{supported_head_dims, KvCache, SUPPORTED_HEAD_DIMS};
use crate::ops::qmatmul::{QuantizedX, XqForm, XQ_CHUNK_WORDS, XQ_FORM_CODES};

/// Options shared by both attention ops.
#[derive(Clone, Copy, Debug)]
pub struct SdpaOptions<'a> {
    /// Multiplies q.k; usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Prefill: query `i` sees keys up to its own position. Decode is always causal.
    pub causal: bool,
    /// Sliding window: the query at position `p` sees keys `k` with `p - window < k <= p`.
    pub window: Option<usize>,
    /// Gemma 2 logit softcapping: `s = cap * tanh(s / cap)` (after scaling, before the mask).
    pub softcap: Option<f32>,
    /// gpt-oss attention sinks: f32 `[n_heads]`, a logit per head that joins the softmax
    /// denominator and contributes no value.
    pub sinks: Option<&'a MlxBuffer>,
    /// Prefill: additive f32 mask `[T, kv_len]` with `kv_len = q_start_pos + T`, indexed by
    /// absolute key position (applied on top of `causal` and `window`).
    pub mask: Option<&'a MlxBuffer>,
}

impl SdpaOptions<'_> {
    /// Causal attention scaled by `1 / sqrt(head_dim)`, no window, softcap, sinks or mask.
    pub fn new(head_dim: usize) -> Self {
        SdpaOptions {
            scale: 1.0 / (head_dim as f32).sqrt(),
            causal: true,
            window: None,
            softcap: None,
            sinks: None,
            mask: None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
pub(crate) struct SdpaParams {
    pub(crate) n_heads: u32,
    pub(crate) kv_heads: u32,
    pub(crate) group: u32,
    pub(crate) slots: u32,
    pub(crate) kv_lo: u32,
    pub(crate) kv_hi: u32,
    pub(crate) split_len: u32,
    pub(crate) n_splits: u32,
    pub(crate) g_tiles: u32,
    pub(crate) tokens: u32,
    pub(crate) q0: u32,
    pub(crate) window: u32,
    pub(crate) causal: u32,
    pub(crate) has_mask: u32,
    pub(crate) mask_stride: u32,
    pub(crate) has_sinks: u32,
    pub(crate) scale: f32,
    pub(crate) softcap: f32,
    pub(crate) row_tiles: u32,
    /// Decode with quantized output chunks: their first word, counted from out's.
    pub(crate) xo: u32,
}
const _: () = assert!(std::mem::size_of::<SdpaParams>() == 80);

/// The compressed-cache decode (`kv_quant`) aims for about this many workgroups in flight
/// (~4 per SM on a 132-SM GPU).
pub(crate) const DECODE_TARGET_WGS: usize = 512;
/// `sdpa_decode` aims for this many: on an H200, 256 beat 128, 384, 512 and 1024 at 8k
/// and 32k keys, alone and in a pass of 32 layers (session 7), when the kernel took 17 KiB
/// of workgroup memory (two workgroups an SM there: more ran in two waves). Its subgroup
/// path takes 9 KiB since session 12; the target was not measured again since
/// (docs/PERFORMANCE.md).
const DIRECT_TARGET_WGS: usize = 256;

thread_local! {
    /// The workgroup target of the f16/f32 decode, forced (benchmarks; 0 = DIRECT_TARGET_WGS).
    /// This and the other measurement switches below are per thread: a switch applies to the
    /// passes its own thread records. (As process-wide values, a test forcing eight heads a
    /// workgroup changed the plan under another test running beside it.)
    static DECODE_TARGET_OVERRIDE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Force the number of workgroups the f16/f32 decode aims for (`None`: the default), for
/// timing probes.
#[doc(hidden)]
pub fn set_decode_target_wgs(target: Option<usize>) {
    DECODE_TARGET_OVERRIDE.with(|c| c.set(target.unwrap_or(0)));
}

thread_local! {
    /// Extra dispatches of the decode's split and reduce kernels (measurement: each repeat is a
    /// dependent copy of the same work, so a pass with one more of them costs one kernel more).
    static DECODE_REPEAT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Dispatch each f16/f32 decode's split kernel `1 + split` times and its reduce `1 + reduce`
/// times (same results), for timing one kernel inside a real decode pass.
#[doc(hidden)]
pub fn set_decode_repeat(split: u16, reduce: u16) {
    let v = u32::from(split) << 16 | u32::from(reduce);
    DECODE_REPEAT.with(|c| c.set(v));
}

/// The workgroups the f16/f32 decode aims for now (the default, or the forced target).
#[doc(hidden)]
pub fn decode_target_wgs() -> usize {
    match DECODE_TARGET_OVERRIDE.with(std::cell::Cell::get) {
        0 => DIRECT_TARGET_WGS,
        t => t,
    }
}
const DECODE_GTS: [u32; 4] = [1, 2, 4, 8];

/// The f16/f32 decode runs as one split per workgroup of one query head, which normalizes
/// its own output (no reduce dispatch), when the visible keys take at most SINGLE_SPLIT_TRIPS
/// trips of the kernel and there are at least SINGLE_SPLIT_MIN_HEADS query heads (as many
/// workgroups). Measured on an H200 (`decode_ab` over 129..225 keys, docs/PERFORMANCE.md
/// session 6): Llama-3.1-8B 3425 -> 3332 us a token, Qwen3-30B-A3B 3946 -> 3809; Gemma-3-4B
/// (8 heads of 256: 8 workgroups of 9+ trips) 3440 -> 3606, hence the head floor; over
/// 250..346 keys no gain, hence the trip cap.
const SINGLE_SPLIT_TRIPS: usize = 7;
const SINGLE_SPLIT_MIN_HEADS: usize = 16;

thread_local! {
    /// The one-split decode's reach forced (measurement: 0 = the rule, else max keys + 1).
    static DECODE_SINGLE_OVERRIDE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Force the one-split decode up to `max_keys` visible keys (0: never), whatever the head
/// count, with `set_decode_gt`'s heads per workgroup if forced (else one); `None`: the rule.
/// For timing probes.
#[doc(hidden)]
pub fn set_decode_single(max_keys: Option<u32>) {
    let v = max_keys.map_or(0, |k| k.saturating_add(1));
    DECODE_SINGLE_OVERRIDE.with(|c| c.set(v));
}

/// Heads per workgroup of the one-split decode over `keys` visible keys (`kt` keys a trip),
/// or None (split-K).
fn single_split_gt(keys: usize, kt: usize, n_heads: usize, group: usize) -> Option<u32> {
    let fits = match DECODE_SINGLE_OVERRIDE.with(std::cell::Cell::get) {
        0 => keys <= SINGLE_SPLIT_TRIPS * kt && n_heads >= SINGLE_SPLIT_MIN_HEADS,
        o => keys < o as usize,
    };
    let forced = DECODE_GT_OVERRIDE.with(std::cell::Cell::get);
    fits.then(|| forced.max(1).min(decode_gt(group)))
}

thread_local! {
    /// Query heads per workgroup of the f16/f32 decode forced (measurement: 0 = the rule).
    static DECODE_GT_OVERRIDE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Force the query heads per f16/f32 decode workgroup (1, 2, 4 or 8; `None`: the rule).
#[doc(hidden)]
pub fn set_decode_gt(gt: Option<u32>) {
    let v = gt.filter(|g| DECODE_GTS.contains(g)).unwrap_or(0);
    DECODE_GT_OVERRIDE.with(|c| c.set(v));
}

/// Query heads per workgroup of the f16/f32 decode: `decode_gt`, at most 4. Eight heads a
/// workgroup (two sets of running state) measured slower at every context: Qwen3-30B-A3B's
/// groups of 8 as two tiles of 4 (twice the workgroups, half the work each, K/V read twice)
/// took its decode step on an H100 from 5380 to 4550 us a token at 4096 keys, 5741 to 4840
/// at 8192 and 4718 to 4108 at 128 (docs/PERFORMANCE.md, session 6). Eight stays for the
/// compressed caches (ops::kv_quant, not measured) and `set_decode_gt`.
fn direct_decode_gt(group: usize) -> u32 {
    match DECODE_GT_OVERRIDE.with(std::cell::Cell::get) {
        0 => decode_gt(group).min(4),
        g => g,
    }
}

/// Query heads per decode workgroup for a GQA group size.
pub(crate) fn decode_gt(group: usize) -> u32 {
    match group {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// Quads (16 bytes) per K/V row in the decode; it works on `128 / quads` rows at a time.
fn decode_quads(dtype: DType, head_dim: usize) -> usize {
    (head_dim * dtype.size() / 16).max(1)
}

/// Keys per trip of the decode (four per row of invocations); splits are whole trips.
pub(crate) fn decode_kt(dtype: DType, head_dim: usize) -> usize {
    4 * (128 / decode_quads(dtype, head_dim))
}

/// The decode sums a row's partial dots with subgroup shuffles when its quads per row are a
/// power of two that fits every subgroup (`subgroup_min` lanes or more, dividing 128).
fn decode_sg(dtype: DType, head_dim: usize, subgroup_min: u32) -> bool {
    let w = decode_quads(dtype, head_dim);
    let m = subgroup_min as usize;
    w.is_power_of_two() && w <= m && m > 0 && 128 % m == 0
}

thread_local! {
    /// Measurement switches of the f16/f32 decode kernel (`DX` in sdpa.wgsl; 0 in production).
    static DECODE_EXP: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Set the decode kernel's measurement switches (sdpa.wgsl `DX`: bit 0 loads only, bit 1 no
/// row-sum shuffles, both giving wrong results; bit 2 the rows' merge in rounds without the
/// pairs' shuffle, valid results). Timing probes only.
#[doc(hidden)]
pub fn set_decode_exp(bits: u32) {
    DECODE_EXP.with(|c| c.set(bits));
}

/// The decode kernel; `xq_out` (an `XqForm` code, 0 none) writes the output's chunks too
/// (three constants at most: the measurement switch DX is not taken with it).
fn decode_spec(dtype: DType, head_dim: usize, gt: u32, sg: bool, xq_out: u32) -> Result<Spec> {
    let spec = Spec::new("sdpa_decode", dtype, 128)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("GT", gt)?
        .with_subgroups(sg);
    if xq_out != 0 {
        return spec.with_const("XQ_OUT", xq_out);
    }
    match DECODE_EXP.with(std::cell::Cell::get) {
        0 => Ok(spec),
        bits => spec.with_const("DX", bits),
    }
}

fn reduce_spec(head_dim: usize, xq_out: u32) -> Result<Spec> {
    let spec =
        Spec::new("sdpa_decode_reduce", DType::F32, 128).with_const("HEAD_DIM", head_dim as u32)?;
    if xq_out != 0 {
        return spec.with_const("XQ_OUT", xq_out);
    }
    Ok(spec)
}

/// Scalar prefill tile (rows, keys) per head dim: Q, one K/V tile and the scores fit 30 KiB
/// of workgroup memory (lavapipe allows 32 KiB), with 128 invocations.
fn prefill_tile(head_dim: usize) -> (u32, u32) {
    match head_dim {
        256 => (16, 8),
        128 => (32, 16),
        _ => (32, 32),
    }
}

fn prefill_spec(dtype: DType, head_dim: usize) -> Result<Spec> {
    let (bm, bn) = prefill_tile(head_dim);
    Spec::new("sdpa_prefill", dtype, 128)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("BM", bm)?
        .with_const("BN", bn)
}

/// Subgroup size of the cooperative-matrix prefill (four subgroups per workgroup).
const COOP_WG: u32 = 32;

/// True when `sdpa_prefill` takes the cooperative-matrix path on this device: 16x16 f16
/// tiles, f16 shaders, a fixed subgroup size of 32, workgroups of 4 subgroups and room for
/// the kernel's workgroup memory (and, per call, K/V views on a multiple of 4 elements).
pub fn prefill_uses_coop(caps: &crate::Caps) -> bool {
    caps.coop_tile(16).is_some()
        && caps.shader_f16
        && caps.subgroups
        && caps.subgroup_min_size == COOP_WG
        && caps.subgroup_max_size == COOP_WG
        && caps.max_invocations_per_workgroup >= 4 * COOP_WG
        && caps.max_workgroup_storage >= COOP4_SMEM
}

/// Workgroup memory of the four-subgroup prefill (`sdpa_prefill_coop4`), bytes.
const COOP4_SMEM: u32 = 8704 * 2 + 4096 * 4 + 4608 * 2 + 4 * 4;
/// Subgroups sharing a row group of the four-subgroup prefill (each owns head_dim / split
/// dims, at most 128: O's tiles and Q's fragments live in registers).
fn coop4_split(head_dim: usize) -> u32 {
    if head_dim > 128 {
        2
    } else {
        1
    }
}

/// Rows (query, head) per workgroup of the four-subgroup prefill.
fn coop4_rows(head_dim: usize) -> u32 {
    64 / coop4_split(head_dim)
}

/// The cooperative prefill reads K/V as vec4: their views must start on a multiple of 4
/// elements (other views take the scalar kernel).
fn coop4_fits(k: &MlxBuffer, v: &MlxBuffer) -> bool {
    k.elem_offset().is_multiple_of(4) && v.elem_offset().is_multiple_of(4)
}

fn coop4_spec(dtype: DType, head_dim: usize) -> Result<Spec> {
    Spec::new("sdpa_prefill_coop4", dtype, 4 * COOP_WG)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("SPLIT", coop4_split(head_dim))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for &d in &SUPPORTED_HEAD_DIMS {
        for dt in crate::ops::kv::KV_DTYPES {
            // The output's chunks too where a chunk fits a head (`sdpa_decode_xq`).
            let forms = std::iter::once(0).chain(XQ_FORM_CODES.into_iter().filter(|_| d % 32 == 0));
            for xq in forms {
                for gt in DECODE_GTS {
                    v.push((Kernel::Sdpa, decode_spec(dt, d, gt, false, xq)?));
                    if decode_sg(dt, d, 64) {
                        v.push((Kernel::Sdpa, decode_spec(dt, d, gt, true, xq)?));
                    }
                }
            }
            v.push((Kernel::Sdpa, prefill_spec(dt, d)?));
            v.push((Kernel::SdpaCoop, coop4_spec(dt, d)?));
        }
        v.push((Kernel::Sdpa, reduce_spec(d, 0)?));
        if d % 32 == 0 {
            for xq in XQ_FORM_CODES {
                v.push((Kernel::Sdpa, reduce_spec(d, xq)?));
            }
        }
    }
    Ok(v)
}

/// Validated shapes shared by both ops.
struct Heads {
    n_heads: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
}

fn check_common(
    op: &str,
    q: &MlxBuffer,
    n_heads: usize,
    cache: &KvCache,
    opts: &SdpaOptions<'_>,
) -> Result<Heads> {
    check::dtype(q, &[DType::F32], op, "q")?;
    let head_dim = *q.shape().last().unwrap_or(&0);
    if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return Err(MlxError::unsupported(format!(
            "{op}: head_dim {head_dim} is not supported; supported head dims: {}",
            supported_head_dims()
        )));
    }
    check::ensure(head_dim == cache.head_dim(), op, || {
        format!(
            "q has head_dim {head_dim} but the cache has {}",
            cache.head_dim()
        )
    })?;
    let kv_heads = cache.kv_heads();
    check::ensure(n_heads.is_multiple_of(kv_heads), op, || {
        format!("{n_heads} query heads are not a multiple of {kv_heads} kv heads")
    })?;
    check::ensure(opts.scale.is_finite(), op, || {
        format!("scale {} is not finite", opts.scale)
    })?;
    if let Some(c) = opts.softcap {
        check::ensure(c.is_finite() && c > 0.0, op, || {
            format!("softcap {c} must be positive and finite")
        })?;
    }
    if let Some(w) = opts.window {
        check::ensure(w > 0, op, || "window must be at least 1 position".into())?;
    }
    if let Some(s) = opts.sinks {
        check::dtype(s, &[DType::F32], op, "sinks")?;
        check::len(s, n_heads, op, "sinks")?;
    }
    Ok(Heads {
        n_heads,
        kv_heads,
        group: n_heads / kv_heads,
        head_dim,
    })
}

fn window_u32(opts: &SdpaOptions<'_>) -> u32 {
    opts.window.map_or(0, |w| w.min(u32::MAX as usize) as u32)
}

/// What a decode split plan depends on besides the key range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanShape {
    pub n_heads: usize,
    pub kv_heads: usize,
    pub gt: u32,
    pub kt: usize,
    pub target_wgs: usize,
    pub window: u32,
    pub has_sinks: u32,
    pub scale: f32,
    pub softcap: f32,
}

impl PlanShape {
    fn g_tiles(&self) -> usize {
        (self.n_heads / self.kv_heads).div_ceil(self.gt as usize)
    }

    /// The most splits a plan of this shape takes at any length.
    fn max_splits(&self) -> usize {
        self.target_wgs
            .div_ceil(self.kv_heads * self.g_tiles())
            .max(1)
    }

    /// Split the visible keys `lo..seq_len` (`range` = (lo, seq_len, ring slots)) into about
    /// `target_wgs` workgroups of whole `kt`-key tiles (the kernel's tile), `gt` query heads
    /// per workgroup: a split takes `ceil(tiles / want)` tiles, `want` being the splits that
    /// bring the grid to the target (at least 1, at most one per tile). Returns the params
    /// and the workgroups.
    fn params(
        &self,
        op: &str,
        (lo, seq_len, slots): (usize, usize, usize),
    ) -> Result<(SdpaParams, u32)> {
        let group = self.n_heads / self.kv_heads;
        let g_tiles = self.g_tiles();
        let kv_len = seq_len.saturating_sub(lo);
        let tiles = kv_len.div_ceil(self.kt);
        let want = self
            .target_wgs
            .div_ceil(self.kv_heads * g_tiles)
            .clamp(1, tiles.max(1));
        let split_len = tiles.div_ceil(want).max(1) * self.kt;
        let n_splits = kv_len.div_ceil(split_len);
        let params = SdpaParams {
            n_heads: self.n_heads as u32,
            kv_heads: self.kv_heads as u32,
            group: group as u32,
            slots: slots as u32,
            kv_lo: lo as u32,
            kv_hi: check::fits_u32(seq_len, op, "seq_len")?,
            split_len: split_len as u32,
            n_splits: n_splits as u32,
            g_tiles: g_tiles as u32,
            window: self.window,
            has_sinks: self.has_sinks,
            scale: self.scale,
            softcap: self.softcap,
            ..SdpaParams::default()
        };
        let wgs = check::fits_u32(self.kv_heads * g_tiles * n_splits, op, "workgroups")?;
        Ok((params, wgs))
    }
}

/// A split-K decode dispatch: its params, grid and scratch, shared by every decode kernel
/// (f16/f32 caches here, compressed caches in `kv_quant`).
pub(crate) struct DecodePlan {
    pub params: SdpaParams,
    pub workgroups: u32,
    pub shape: PlanShape,
    /// Splits `part_o` and `part_ml` hold (the plan's, or while the pass is captured for
    /// replay, the most any length takes).
    pub splits_held: usize,
    /// Per-split partial outputs `[n_heads, n_splits, head_dim]` and (max, sum) pairs.
    pub part_o: MlxBuffer,
    pub part_ml: MlxBuffer,
    /// The combined output `[n_heads, head_dim]`.
    pub out: MlxBuffer,
}

/// The plan of [`PlanShape::params`] and its scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_plan(
    pass: &mut Pass,
    op: &str,
    n_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    gt: u32,
    kt: usize,
    target_wgs: usize,
    range: (usize, usize, usize),
    opts: &SdpaOptions<'_>,
) -> Result<DecodePlan> {
    let shape = PlanShape {
        n_heads,
        kv_heads,
        gt,
        kt,
        target_wgs,
        window: window_u32(opts),
        has_sinks: u32::from(opts.sinks.is_some()),
        scale: opts.scale,
        softcap: opts.softcap.unwrap_or(0.0),
    };
    let (params, workgroups) = shape.params(op, range)?;
    let splits_held = if pass.is_capturing() {
        shape.max_splits().max(params.n_splits as usize)
    } else {
        params.n_splits as usize
    };
    Ok(DecodePlan {
        params,
        workgroups,
        shape,
        splits_held,
        part_o: pass.alloc(DType::F32, &[n_heads, splits_held, head_dim])?,
        part_ml: pass.alloc(DType::F32, &[n_heads, splits_held, 2])?,
        out: pass.alloc(DType::F32, &[n_heads, head_dim])?,
    })
}

/// While a pass is captured for replay: the decode's params and workgroups as the key range
/// grows with the token (`single`: whether the plan is the one-split kernel). None (record
/// again) when the rule would pick the other kernel, or the splits outgrow the scratch or
/// cross between one (no reduce recorded) and several.
fn follow_plan(
    plan: &DecodePlan,
    recorded: &SdpaParams,
    (lo0, seq0, slots): (usize, usize, usize),
    (single, workgroups): (bool, Option<u32>),
) -> impl Fn(&crate::graph::Advance) -> Result<Option<(SdpaParams, u32)>> + Send + 'static {
    let (shape, held, xo) = (plan.shape, plan.splits_held, recorded.xo);
    let one = recorded.n_splits == 1;
    let group = shape.n_heads / shape.kv_heads;
    move |a| {
        let seq = seq0 + a.steps;
        // A window (the plan's, 0 none) moves the range's start with the token.
        let lo = match shape.window {
            0 => lo0,
            w => seq.saturating_sub(w as usize),
        };
        if single_split_gt(seq - lo, shape.kt, shape.n_heads, group).is_some() != single {
            return Ok(None);
        }
        let (params, wgs) = shape.params("sdpa_decode", (lo, seq, slots))?;
        let n = params.n_splits as usize;
        if n > held || (n == 1) != one {
            return Ok(None);
        }
        Ok(Some((
            SdpaParams { xo, ..params },
            workgroups.unwrap_or(wgs),
        )))
    }
}

/// Attention of one query token per head over positions `0..seq_len` of `layer`
/// (`seq_len` counts the current token, already appended). `q`: f32 `[n_heads, head_dim]`
/// (or `[1, n_heads, head_dim]`); returns f32 `[n_heads, head_dim]`.
pub fn sdpa_decode(
    pass: &mut Pass,
    q: &MlxBuffer,
    cache: &KvCache,
    layer: usize,
    seq_len: usize,
    opts: &SdpaOptions<'_>,
) -> Result<MlxBuffer> {
    Ok(decode_impl(pass, q, cache, layer, seq_len, opts, None)?.0)
}

/// [`sdpa_decode`] that also writes its output quantized in `form` for o's decode matvec
/// ([`crate::ops::qmatmul::qmv_xq`], `qmv_norm_out`), which then quantizes no x in each of
/// its row-sets: on an H200 that made a Llama-3.1-8B decode step 4.6 % faster as a bound
/// (docs/PERFORMANCE.md, session 8). Head dims that are multiples of 32 (a chunk never
/// straddles two heads' workgroups). Returns the f32 output and the chunks (one row).
pub fn sdpa_decode_xq(
    pass: &mut Pass,
    q: &MlxBuffer,
    cache: &KvCache,
    layer: usize,
    seq_len: usize,
    opts: &SdpaOptions<'_>,
    form: XqForm,
) -> Result<(MlxBuffer, QuantizedX)> {
    let (out, chunks) = decode_impl(pass, q, cache, layer, seq_len, opts, Some(form))?;
    chunks
        .ok_or_else(|| MlxError::invalid("sdpa_decode_xq: no chunks written"))
        .map(|c| (out, c))
}

fn decode_impl(
    pass: &mut Pass,
    q: &MlxBuffer,
    cache: &KvCache,
    layer: usize,
    seq_len: usize,
    opts: &SdpaOptions<'_>,
    form: Option<XqForm>,
) -> Result<(MlxBuffer, Option<QuantizedX>)> {
    let op = if form.is_some() {
        "sdpa_decode_xq"
    } else {
        "sdpa_decode"
    };
    let n_heads = match *q.shape() {
        [h, _] | [1, h, _] => h,
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: q has shape {:?}, expected [n_heads, head_dim]",
                q.shape()
            )))
        }
    };
    let hd = check_common(op, q, n_heads, cache, opts)?;
    check::ensure(opts.mask.is_none(), op, || {
        "an explicit mask is only supported by sdpa_prefill".into()
    })?;
    check::ensure(seq_len > 0, op, || "seq_len must be at least 1".into())?;
    let lo = opts.window.map_or(0, |w| seq_len.saturating_sub(w));
    let slots = cache.check_range(op, layer, lo, seq_len)?;
    let (k, v) = cache.buffers(layer)?;
    if form.is_some() {
        check::ensure(hd.head_dim.is_multiple_of(32), op, || {
            format!(
                "head dim {} is not a multiple of 32 (a quantized chunk)",
                hd.head_dim
            )
        })?;
    }

    // Short contexts: one split per workgroup (the kernel normalizes, no reduce).
    let kt = decode_kt(cache.dtype(), hd.head_dim);
    let single = single_split_gt(seq_len - lo, kt, hd.n_heads, hd.group);
    let gt = single.unwrap_or_else(|| direct_decode_gt(hd.group));
    let plan = decode_plan(
        pass,
        op,
        hd.n_heads,
        hd.kv_heads,
        hd.head_dim,
        gt,
        kt,
        if single.is_some() {
            1
        } else {
            decode_target_wgs()
        },
        (lo, seq_len, slots),
        opts,
    )?;
    let caps = pass.caps();
    let sg = caps.subgroups
        && caps.subgroup_max_size <= 128
        && decode_sg(cache.dtype(), hd.head_dim, caps.subgroup_min_size);
    let xq_out = form.map_or(0, XqForm::code);
    let spec = decode_spec(cache.dtype(), hd.head_dim, gt, sg, xq_out)?;
    let mut params = plan.params;
    // With chunks: one allocation, out then the chunks, bound whole at out's binding.
    let n = hd.n_heads * hd.head_dim;
    let (outs, out, chunks) = match form {
        Some(form) => {
            let words = n / 32 * XQ_CHUNK_WORDS;
            let all = pass.alloc(DType::F32, &[n + words])?;
            let out = all.view(0, &[hd.n_heads, hd.head_dim])?;
            let c = all.view(n, &[words])?.bitcast(DType::U32, &[1, words])?;
            params.xo = check::fits_u32(n, op, "out")?;
            (all, out, Some(QuantizedX::from_words(c, 1, n, form)))
        }
        None => (plan.out.clone(), plan.out.clone(), None),
    };
    let repeat = DECODE_REPEAT.with(std::cell::Cell::get);
    let sinks = opts.sinks.unwrap_or(q);
    let range = (lo, seq_len, slots);
    for _ in 0..=repeat >> 16 {
        pass.dispatch(
            Kernel::Sdpa,
            spec,
            &params,
            &[q, k, v, &plan.part_o, &plan.part_ml, sinks, &outs],
            plan.workgroups,
        )?;
        let follow = (single.is_some(), None);
        pass.vary_last(follow_plan(&plan, &params, range, follow));
    }
    if params.n_splits == 1 {
        return Ok((out, chunks));
    }
    for _ in 0..=repeat & 0xffff {
        pass.dispatch(
            Kernel::Sdpa,
            reduce_spec(hd.head_dim, xq_out)?,
            &params,
            &[q, q, q, &plan.part_o, &plan.part_ml, sinks, &outs],
            hd.n_heads as u32,
        )?;
        let follow = (single.is_some(), Some(hd.n_heads as u32));
        pass.vary_last(follow_plan(&plan, &params, range, follow));
    }
    Ok((out, chunks))
}

/// Attention of T query tokens at positions `q_start_pos..q_start_pos + T` over `layer`,
/// whose K/V for those positions were already appended: each query sees the cache before
/// the chunk and, causally (`opts.causal`), the chunk itself. `q`: f32
/// `[T, n_heads, head_dim]`; returns f32 `[T, n_heads, head_dim]`.
pub fn sdpa_prefill(
    pass: &mut Pass,
    q: &MlxBuffer,
    cache: &KvCache,
    layer: usize,
    q_start_pos: usize,
    opts: &SdpaOptions<'_>,
) -> Result<MlxBuffer> {
    // Its query offset and key range are not followed per token.
    pass.refuse_replay("sdpa_prefill");
    let op = "sdpa_prefill";
    let (tokens, n_heads) = match *q.shape() {
        [t, h, _] => (t, h),
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: q has shape {:?}, expected [tokens, n_heads, head_dim]",
                q.shape()
            )))
        }
    };
    let hd = check_common(op, q, n_heads, cache, opts)?;
    let kv_len = q_start_pos + tokens;
    if let Some(mask) = opts.mask {
        check::dtype(mask, &[DType::F32], op, "mask")?;
        check::shape(mask, &[tokens, kv_len], op, "mask")?;
    }
    let lo = opts
        .window
        .map_or(0, |w| (q_start_pos + 1).saturating_sub(w));
    let slots = cache.check_range(op, layer, lo, kv_len)?;
    let (k, v) = cache.buffers(layer)?;

    let out = pass.alloc(DType::F32, &[tokens, hd.n_heads, hd.head_dim])?;
    let coop = prefill_uses_coop(pass.caps()) && coop4_fits(k, v);
    let bm = if coop {
        coop4_rows(hd.head_dim)
    } else {
        prefill_tile(hd.head_dim).0
    };
    let rows = tokens * hd.group;
    let row_tiles = rows.div_ceil(bm as usize);
    let params = SdpaParams {
        n_heads: hd.n_heads as u32,
        kv_heads: hd.kv_heads as u32,
        group: hd.group as u32,
        slots: slots as u32,
        tokens: check::fits_u32(tokens, op, "tokens")?,
        q0: check::fits_u32(q_start_pos, op, "q_start_pos")?,
        window: window_u32(opts),
        causal: u32::from(opts.causal),
        has_mask: u32::from(opts.mask.is_some()),
        mask_stride: kv_len as u32,
        has_sinks: u32::from(opts.sinks.is_some()),
        scale: opts.scale,
        softcap: opts.softcap.unwrap_or(0.0),
        row_tiles: check::fits_u32(row_tiles, op, "row tiles")?,
        ..SdpaParams::default()
    };
    let wgs = check::fits_u32(hd.kv_heads * row_tiles, op, "workgroups")?;
    let sinks = opts.sinks.unwrap_or(q);
    let mask = opts.mask.unwrap_or(q);
    let (kernel, spec) = if coop {
        (Kernel::SdpaCoop, coop4_spec(cache.dtype(), hd.head_dim)?)
    } else {
        (Kernel::Sdpa, prefill_spec(cache.dtype(), hd.head_dim)?)
    };
    pass.dispatch(
        kernel,
        spec,
        &params,
        &[q, k, v, &out, q, sinks, q, mask],
        wgs,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::kv_cache::KvCacheConfig;
    use crate::testutil::{assert_close, devices, gpu, Rng};
    use crate::MlxDevice;

    // Tolerance. The reference runs in f64 on exactly the K/V the kernels read (the cache is
    // read back, so f16 rounding is shared). What remains is f32 arithmetic: q.k over at most
    // 256 products of O(1) terms (~1e-6 relative on logits of O(1)), exp, and sums of up to a
    // few thousand weights: errors observed are ~1e-6; 5e-5 absolute + relative is tight
    // enough to catch one wrong key, position, head or mask entry (each moves outputs by
    // ~1e-2 or more at these lengths).
    const ATOL: f64 = 5e-5;
    const RTOL: f64 = 5e-5;
    // The cooperative-matrix prefill (where the device has it) multiplies f16 Q and f16
    // probabilities: the reference takes Q rounded to f16, and P's rounding (2^-11 relative
    // per weight, the denominator kept in f32) bounds the error by 2^-11 * max|v| ~ 2e-3.
    const COOP_TOL: f64 = 2e-3;

    /// Q as the prefill kernel sees it and the tolerance of that path.
    fn prefill_view(g: &MlxDevice, q: &[f32]) -> (Vec<f32>, f64) {
        if prefill_uses_coop(g.caps()) {
            let r = q.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
            (r, COOP_TOL)
        } else {
            (q.to_vec(), ATOL)
        }
    }

    /// What the reference needs besides Q, K and V.
    #[derive(Clone, Copy, Default)]
    struct RefOpts<'a> {
        scale: f64,
        causal: bool,
        window: Option<usize>,
        softcap: Option<f64>,
        sinks: Option<&'a [f32]>,
        mask: Option<&'a [f32]>,
    }

    /// Naive softmax attention in f64. `k`, `v`: [kv_heads][kv_len * d] by absolute
    /// position (NaN where the cache no longer holds a position). Returns [t, nh, d].
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        t: usize,
        nh: usize,
        d: usize,
        q0: usize,
        k: &[Vec<f64>],
        v: &[Vec<f64>],
        o: &RefOpts<'_>,
    ) -> Vec<f64> {
        let kvh = k.len();
        let group = nh / kvh;
        let kv_len = q0 + t;
        let mut out = vec![0.0; t * nh * d];
        for ti in 0..t {
            let qp = q0 + ti;
            for h in 0..nh {
                let kh = h / group;
                let qr = &q[(ti * nh + h) * d..][..d];
                let mut logits = Vec::new();
                for kp in 0..kv_len {
                    if o.causal && kp > qp {
                        continue;
                    }
                    if let Some(w) = o.window {
                        if kp + w <= qp {
                            continue;
                        }
                    }
                    let kr = &k[kh][kp * d..][..d];
                    let mut s: f64 = qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b).sum();
                    s *= o.scale;
                    if let Some(c) = o.softcap {
                        s = c * (s / c).tanh();
                    }
                    if let Some(m) = o.mask {
                        s += m[ti * kv_len + kp] as f64;
                    }
                    if s != f64::NEG_INFINITY {
                        logits.push((kp, s));
                    }
                }
                let sink = o.sinks.map(|s| s[h] as f64);
                let mut mx = logits.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                if let Some(s) = sink {
                    mx = mx.max(s);
                }
                let mut den = sink.map_or(0.0, |s| (s - mx).exp());
                let orow = &mut out[(ti * nh + h) * d..][..d];
                for &(kp, s) in &logits {
                    let w = (s - mx).exp();
                    den += w;
                    for (oo, &vv) in orow.iter_mut().zip(&v[kh][kp * d..][..d]) {
                        *oo += w * vv;
                    }
                }
                for oo in orow.iter_mut() {
                    *oo = if den > 0.0 { *oo / den } else { 0.0 };
                }
            }
        }
        out
    }

    /// A one-layer cache filled with `len` random tokens appended in chunks of `chunk`.
    struct Filled {
        cache: KvCache,
        k_host: Vec<f32>,
        v_host: Vec<f32>,
    }

    #[allow(clippy::too_many_arguments)]
    fn filled(
        g: &MlxDevice,
        rng: &mut Rng,
        kvh: usize,
        d: usize,
        dtype: DType,
        capacity: usize,
        window: Option<usize>,
        max_chunk: usize,
        len: usize,
    ) -> Result<Filled> {
        let mut cfg = KvCacheConfig::new(1, kvh, d, capacity);
        cfg.dtype = dtype;
        cfg.windows = vec![window];
        cfg.max_chunk = max_chunk;
        let mut cache = KvCache::new(g, &cfg)?;
        let k_host = rng.normals(len * kvh * d, 1.0);
        let v_host = rng.normals(len * kvh * d, 1.0);
        append_range(g, &mut cache, &k_host, &v_host, 0, len, max_chunk)?;
        Ok(Filled {
            cache,
            k_host,
            v_host,
        })
    }

    fn append_range(
        g: &MlxDevice,
        cache: &mut KvCache,
        k: &[f32],
        v: &[f32],
        from: usize,
        to: usize,
        chunk: usize,
    ) -> Result<()> {
        let (kvh, d) = (cache.kv_heads(), cache.head_dim());
        let row = kvh * d;
        let mut pos = from;
        while pos < to {
            let n = chunk.min(to - pos);
            let kb = MlxBuffer::from_slice(g, &k[pos * row..(pos + n) * row], &[n, kvh, d])?;
            let vb = MlxBuffer::from_slice(g, &v[pos * row..(pos + n) * row], &[n, kvh, d])?;
            let mut pass = g.begin();
            cache.append(&mut pass, 0, &kb, &vb, pos)?;
            pass.commit_and_wait()?;
            pos += n;
        }
        Ok(())
    }

    /// The cache's K and V as the kernels see them, by absolute position: [kv_heads][len * d],
    /// NaN where the ring no longer holds a position.
    /// K and V by position: [kv_heads][len * head_dim] each.
    type ByPosition = (Vec<Vec<f64>>, Vec<Vec<f64>>);

    fn cache_by_position(g: &MlxDevice, cache: &KvCache) -> Result<ByPosition> {
        let (kvh, d, slots, len) = (
            cache.kv_heads(),
            cache.head_dim(),
            cache.slots(0),
            cache.len(0),
        );
        let (kb, vb) = cache.buffers(0)?;
        let (kf, vf) = (kb.to_f32(g)?, vb.to_f32(g)?);
        let oldest = len.saturating_sub(slots);
        let by_pos = |f: &[f32]| -> Vec<Vec<f64>> {
            (0..kvh)
                .map(|h| {
                    (0..len)
                        .flat_map(|p| {
                            let s = p % slots;
                            (0..d).map(move |i| {
                                if p < oldest {
                                    f64::NAN
                                } else {
                                    f[(h * slots + s) * d + i] as f64
                                }
                            })
                        })
                        .collect()
                })
                .collect()
        };
        Ok((by_pos(&kf), by_pos(&vf)))
    }

    struct DecodeCase {
        d: usize,
        nh: usize,
        kvh: usize,
        len: usize,
        window: Option<usize>,
        softcap: Option<f32>,
        sinks: bool,
        dtype: DType,
    }

    fn run_decode(c: &DecodeCase, seed: u64) -> Result<()> {
        for g in devices() {
            let mut rng = Rng::new(seed);
            let f = filled(
                g,
                &mut rng,
                c.kvh,
                c.d,
                c.dtype,
                c.len + 3,
                None,
                512,
                c.len,
            )?;
            let q = rng.normals(c.nh * c.d, 1.0);
            let sinks = rng.normals(c.nh, 2.0);
            let gq = MlxBuffer::from_slice(g, &q, &[c.nh, c.d])?;
            let gs = MlxBuffer::from_slice(g, &sinks, &[c.nh])?;
            let mut opts = SdpaOptions::new(c.d);
            opts.window = c.window;
            opts.softcap = c.softcap;
            opts.sinks = c.sinks.then_some(&gs);
            let mut pass = g.begin();
            let out = sdpa_decode(&mut pass, &gq, &f.cache, 0, c.len, &opts)?;
            pass.commit_and_wait()?;
            let (k, v) = cache_by_position(g, &f.cache)?;
            let ro = RefOpts {
                scale: opts.scale as f64,
                causal: true,
                window: c.window,
                softcap: c.softcap.map(f64::from),
                sinks: c.sinks.then_some(&sinks[..]),
                mask: None,
            };
            let want = reference(&q, 1, c.nh, c.d, c.len - 1, &k, &v, &ro);
            let what = format!(
                "decode d={} heads {}/{} len {} window {:?} softcap {:?} sinks {} {} sg={}",
                c.d,
                c.nh,
                c.kvh,
                c.len,
                c.window,
                c.softcap,
                c.sinks,
                c.dtype,
                g.caps().subgroups
            );
            assert_close(&out.to_vec(g)?, &want, ATOL, RTOL, &what);
        }
        Ok(())
    }

    fn dc(d: usize, nh: usize, kvh: usize, len: usize, dtype: DType) -> DecodeCase {
        DecodeCase {
            d,
            nh,
            kvh,
            len,
            window: None,
            softcap: None,
            sinks: false,
            dtype,
        }
    }

    /// `sdpa_decode_xq`: its f32 output is `sdpa_decode`'s bit for bit, and its chunks are
    /// `quantize_x` of that output word for word (the quantization qmv would do). One split
    /// (GT 1 and 8 heads a workgroup, f16 and f32, head dims 64 and 128) and split-K (the
    /// reduce writes them: head dims 128 and 256, GQA 16, a window, sinks); 4- and 8-bit
    /// forms, one and two levels; both reduction paths; allocations poisoned.
    #[test]
    fn decode_xq_writes_the_chunks_of_its_output() -> Result<()> {
        let cases = [
            dc(128, 32, 8, 100, DType::F16),
            DecodeCase {
                sinks: true,
                ..dc(64, 32, 4, 7, DType::F32)
            },
            dc(128, 8, 1, 60, DType::F16),
            DecodeCase {
                sinks: true,
                ..dc(128, 16, 4, 225, DType::F16)
            },
            DecodeCase {
                window: Some(300),
                ..dc(256, 64, 4, 700, DType::F16)
            },
        ];
        let forms = [XqForm::from_code(4 << 2 | 2), XqForm::from_code(8 << 2 | 1)];
        for base in devices() {
            let g = &MlxDevice::with_options(crate::DeviceOptions {
                poison_allocations: true,
                disable_subgroups: !base.caps().subgroups,
                ..crate::DeviceOptions::default()
            })?;
            for (i, c) in cases.iter().enumerate() {
                let mut rng = Rng::new(300 + i as u64);
                let f = filled(
                    g,
                    &mut rng,
                    c.kvh,
                    c.d,
                    c.dtype,
                    c.len + 3,
                    None,
                    512,
                    c.len,
                )?;
                let gq = MlxBuffer::from_slice(g, &rng.normals(c.nh * c.d, 1.0), &[c.nh, c.d])?;
                let gs = MlxBuffer::from_slice(g, &rng.normals(c.nh, 2.0), &[c.nh])?;
                let mut opts = SdpaOptions::new(c.d);
                opts.window = c.window;
                opts.sinks = c.sinks.then_some(&gs);
                for form in forms {
                    let mut pass = g.begin();
                    let plain = sdpa_decode(&mut pass, &gq, &f.cache, 0, c.len, &opts)?;
                    let (out, chunks) =
                        sdpa_decode_xq(&mut pass, &gq, &f.cache, 0, c.len, &opts, form)?;
                    let again =
                        crate::ops::quantize_x(&mut pass, &out.reshape(&[1, c.nh * c.d])?, form)?;
                    pass.commit_and_wait()?;
                    let what = format!(
                        "d={} heads {}/{} len {} {} {form:?} sg={}",
                        c.d,
                        c.nh,
                        c.kvh,
                        c.len,
                        c.dtype,
                        g.caps().subgroups
                    );
                    let (a, b): (Vec<f32>, Vec<f32>) = (plain.to_vec(g)?, out.to_vec(g)?);
                    assert!(a.iter().all(|v| v.is_finite()), "{what}: not finite");
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{what}: the f32 output differs from sdpa_decode's");
                    assert_eq!(chunks.k(), c.nh * c.d, "{what}");
                    let (w, want): (Vec<u32>, Vec<u32>) =
                        (chunks.buffer().to_vec(g)?, again.buffer().to_vec(g)?);
                    assert_eq!(
                        w, want,
                        "{what}: chunks differ from quantize_x of the output"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn decode_matches_f64_over_head_dims_gqa_and_lengths() -> Result<()> {
        let cases = [
            dc(64, 4, 4, 1, DType::F16),
            DecodeCase {
                softcap: Some(30.0),
                ..dc(80, 8, 2, 7, DType::F32)
            },
            DecodeCase {
                window: Some(100),
                sinks: true,
                ..dc(96, 8, 1, 255, DType::F16)
            },
            DecodeCase {
                sinks: true,
                ..dc(128, 16, 2, 1024, DType::F16)
            },
            DecodeCase {
                window: Some(64),
                softcap: Some(5.0),
                ..dc(256, 4, 1, 300, DType::F32)
            },
            // GQA 7 (two tiles of 4 heads, the second partial), window longer than the
            // sequence.
            DecodeCase {
                window: Some(5000),
                ..dc(128, 14, 2, 1024, DType::F16)
            },
            // GQA 3 (partial tile of 4), MQA with 32 heads (8 tiles of 4 at 129 keys).
            dc(64, 12, 4, 500, DType::F16),
            DecodeCase {
                sinks: true,
                ..dc(64, 32, 1, 129, DType::F32)
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            run_decode(c, 100 + i as u64)?;
        }
        Ok(())
    }

    #[test]
    fn decode_tiles_and_splits() -> Result<()> {
        // Cases around the trip (KT = decode_kt keys) and split boundaries: lengths not a
        // multiple of KT, splits of several trips (the next trip's loads in flight) whose
        // last one ends mid-trip, windows starting mid-trip, GQA 8 and 16 (tiles of 4 heads).
        // The per-case notes give the figures of the earlier staged-tile kernel (its KT); the
        // cases stay as awkward lengths for this one.
        let cases = [
            // KT 32: one full tile and one key.
            dc(128, 4, 1, 33, DType::F16),
            // Llama-3.1-8B heads: 66 tiles, 33 splits of 2 tiles, the last of 52 keys.
            DecodeCase {
                sinks: true,
                ..dc(128, 32, 8, 2100, DType::F16)
            },
            // f32, KT 16: 132 tiles from position 400, 2 per split.
            DecodeCase {
                window: Some(2100),
                softcap: Some(10.0),
                ..dc(80, 8, 4, 2500, DType::F32)
            },
            // GQA 1 (GT 1), KT 64: 69 tiles from position 100, 3 per split.
            DecodeCase {
                window: Some(4400),
                sinks: true,
                ..dc(64, 16, 16, 4500, DType::F16)
            },
            // GQA 16: four head tiles of 4, KT 16, 3 tiles per split.
            dc(256, 64, 4, 2100, DType::F16),
            // GQA 8 with head dim 96 (KT 32), a window of 45: two splits of one tile each
            // from position 955, the second of 13 keys.
            DecodeCase {
                window: Some(45),
                ..dc(96, 16, 2, 1000, DType::F16)
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            run_decode(c, 150 + i as u64)?;
        }
        Ok(())
    }

    /// The one-split decode (16+ query heads, at most 7 trips of keys: the kernel normalizes
    /// its own output, no reduce): with sinks, softcap, a window, GQA 1, 4 and 8, f16 and
    /// f32, and one key; and the same shapes one trip past the cap (split-K).
    #[test]
    fn decode_one_split_per_head() -> Result<()> {
        let cases = [
            // f16 head dim 128 (KT 32): 100 keys, sinks.
            DecodeCase {
                sinks: true,
                ..dc(128, 16, 4, 100, DType::F16)
            },
            // f32 head dim 64 (KT 32): one key; then 7 with a softcap.
            dc(64, 32, 8, 1, DType::F32),
            DecodeCase {
                softcap: Some(20.0),
                ..dc(64, 32, 8, 7, DType::F32)
            },
            // f16 head dim 96 (KT 40): a window of 150 over 900 positions, GQA 1.
            DecodeCase {
                window: Some(150),
                sinks: true,
                ..dc(96, 16, 16, 900, DType::F16)
            },
            // f16 head dim 128: 225 keys (8 trips): split-K.
            DecodeCase {
                sinks: true,
                ..dc(128, 16, 4, 225, DType::F16)
            },
            // f16 head dim 128: 224 keys (7 trips), sinks.
            DecodeCase {
                sinks: true,
                ..dc(128, 32, 8, 224, DType::F16)
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            run_decode(c, 190 + i as u64)?;
        }
        Ok(())
    }

    /// Eight query heads a workgroup (two sets of running state), which only `set_decode_gt`
    /// reaches in the f16/f32 decode: GQA 8 and a partial tile of 7, over several splits (head
    /// dim 64 f16 takes the subgroup path on lavapipe, 128 the workgroup-memory one).
    /// (Other tests running meanwhile take the same path; their results do not change.)
    #[test]
    fn decode_eight_heads_a_workgroup() -> Result<()> {
        set_decode_gt(Some(8));
        let r = [
            DecodeCase {
                sinks: true,
                ..dc(128, 16, 2, 2090, DType::F16)
            },
            DecodeCase {
                window: Some(300),
                ..dc(64, 14, 2, 700, DType::F16)
            },
        ]
        .iter()
        .enumerate()
        .try_for_each(|(i, c)| run_decode(c, 170 + i as u64));
        set_decode_gt(None);
        r
    }

    /// A captured decode's params follow the token: at every length from 1 to past 2k keys
    /// the replayed params and grids (split and reduce) equal a fresh recording's, with a
    /// new capture only where the kernel or the reduce's presence changes (the one-split
    /// kernel up to 7 trips for Llama-3.1-8B's 32 heads; a window; an f32 cache).
    #[test]
    fn decode_params_follow_the_token() -> Result<()> {
        use crate::graph::TokenVars;
        let g = gpu();
        let mut rng = Rng::new(41);
        for (nh, kvh, window, dtype, recaptures) in [
            (32, 8, None, DType::F16, 1..=1),
            (16, 16, None, DType::F32, 1..=1),
            (8, 2, Some(300), DType::F16, 1..=1),
            (2, 1, None, DType::F16, 1..=1),
        ] {
            let d = 128;
            let mut cfg = KvCacheConfig::new(1, kvh, d, 2200);
            cfg.dtype = dtype;
            cfg.windows = vec![window];
            let mut cache = KvCache::new(g, &cfg)?;
            let q = MlxBuffer::from_slice(g, &rng.normals(nh * d, 1.0), &[nh, d])?;
            let opts = SdpaOptions {
                window,
                ..SdpaOptions::new(d)
            };
            let mut graph: Option<crate::Graph> = None;
            let mut captures = 0;
            let lens = (1..400).chain((400..2200).step_by(37));
            for seq in lens {
                let have = cache.len(0);
                cache.advance(have, seq - have)?;
                let at = TokenVars {
                    pos: seq - 1,
                    coin: 0.0,
                };
                // The attention's steps (not the poisoning fills of its scratch).
                let attention = |v: Vec<crate::graph::StepParams>| {
                    v.into_iter()
                        .filter(|s| s.0.starts_with("sdpa"))
                        .collect::<Vec<_>>()
                };
                let mut fresh = g.begin();
                sdpa_decode(&mut fresh, &q, &cache, 0, seq, &opts)?;
                let want = attention(fresh.params_now());
                let got = match graph.as_mut() {
                    Some(gr) => gr.params_at(at)?.map(attention),
                    None => None,
                };
                match got {
                    Some(got) => assert_eq!(got, want, "{nh}/{kvh} {window:?}: {seq} keys"),
                    None => {
                        let mut pass = g.begin().capture(at);
                        sdpa_decode(&mut pass, &q, &cache, 0, seq, &opts)?;
                        assert_eq!(attention(pass.params_now()), want);
                        graph = Some(pass.into_graph()?);
                        captures += 1;
                    }
                }
            }
            println!("{nh}/{kvh} {window:?} {dtype}: {captures} captures");
            assert!(
                recaptures.contains(&(captures - 1)),
                "{nh}/{kvh} {window:?}: {captures} captures"
            );
        }
        Ok(())
    }

    #[test]
    fn decode_tile_and_split_rule() -> Result<()> {
        // The kernel's 128 invocations take rows of W4 quads (16 bytes), 128 / W4 rows at a
        // time, four keys per row a trip; its workgroup memory holds 4 * 128 * GQ partial
        // dots (two buffers when GQ = 1) and the merge of [4 heads, HEAD_DIM / 4, rows].
        let want_f16 = [(64, 64), (80, 48), (96, 40), (128, 32), (256, 16)];
        let want_f32 = [(64, 32), (80, 24), (96, 20), (128, 16), (256, 8)];
        for ((d, k16), (_, k32)) in want_f16.into_iter().zip(want_f32) {
            assert_eq!(decode_kt(DType::F16, d), k16, "f16 d={d}");
            assert_eq!(decode_kt(DType::F32, d), k32, "f32 d={d}");
        }
        for &d in &SUPPORTED_HEAD_DIMS {
            for dt in crate::ops::kv::KV_DTYPES {
                let w4 = decode_quads(dt, d);
                let rows = 128 / w4;
                assert!(w4 <= 128 && d * dt.size() == 16 * w4, "{dt} d={d}");
                // The merge buffer: 4 heads * (d / 4) dim quads * rows <= 1024 vec4s; the
                // (max, sum) buffers: rows * 2 <= 32.
                assert!(d * rows <= 1024 && rows * 2 <= 32, "{dt} d={d}");
                // The subgroup path merges in 512: pairs of rows summed by a shuffle where a
                // subgroup holds two, else rounds of an even number of dim quads each.
                for ss in [8, 16, 32, 64] {
                    if !decode_sg(dt, d, ss) {
                        continue;
                    }
                    let merged = if 2 * w4 <= ss as usize {
                        rows / 2
                    } else {
                        rows
                    };
                    let nh = (d * merged / 512).max(1);
                    let hq = d / 4 / nh;
                    let f16 = dt == DType::F16;
                    assert!(
                        d * merged / nh <= 512
                            && hq * nh == d / 4
                            && (nh == 1 || !f16 || hq % 2 == 0),
                        "{dt} d={d} subgroup {ss}"
                    );
                }
            }
            // Subgroup rows: a power of two no wider than the subgroup.
            assert_eq!(
                decode_sg(DType::F16, d, 32),
                d == 64 || d == 128 || d == 256
            );
            assert_eq!(decode_sg(DType::F32, d, 32), d == 64 || d == 128);
            assert!(!decode_sg(DType::F16, d, 0));
        }
        assert!(decode_sg(DType::F16, 64, 8) && !decode_sg(DType::F16, 128, 8));
        // Llama-3.1-8B: 32 query heads over 8 kv heads, head dim 128, f16 (32 keys a trip).
        let g = gpu();
        let mut pass = g.begin();
        let opts = SdpaOptions::new(128);
        let plan = |pass: &mut Pass, len: usize| {
            decode_plan(
                pass,
                "t",
                32,
                8,
                128,
                4,
                32,
                DIRECT_TARGET_WGS,
                (0, len, len),
                &opts,
            )
        };
        let p = plan(&mut pass, 128)?;
        assert_eq!(
            (p.params.split_len, p.params.n_splits, p.workgroups),
            (32, 4, 32)
        );
        let p = plan(&mut pass, 8192)?;
        assert_eq!(
            (p.params.split_len, p.params.n_splits, p.workgroups),
            (256, 32, 256)
        );
        let p = plan(&mut pass, 32768)?;
        assert_eq!(
            (p.params.split_len, p.params.n_splits, p.workgroups),
            (1024, 32, 256)
        );
        let p = plan(&mut pass, 1)?;
        assert_eq!(
            (p.params.split_len, p.params.n_splits, p.workgroups),
            (32, 1, 8)
        );
        Ok(())
    }

    #[test]
    fn decode_and_prefill_long_sweep() -> Result<()> {
        // 4099 positions for every head dim: minutes on lavapipe, seconds on a GPU.
        if std::env::var("MLX_NATIVE_FULL_SWEEP").as_deref() != Ok("1") {
            println!("skipped: set MLX_NATIVE_FULL_SWEEP=1 for the 4099-position sweep");
            return Ok(());
        }
        for (i, &d) in SUPPORTED_HEAD_DIMS.iter().enumerate() {
            run_decode(
                &DecodeCase {
                    sinks: i % 2 == 0,
                    window: (i == 3).then_some(1000),
                    ..dc(d, 8, 2, 4099, DType::F16)
                },
                200 + i as u64,
            )?;
            run_prefill(
                &PrefillCase {
                    q0: 4000,
                    t: 99,
                    ..pc(d, 8, 1, DType::F16)
                },
                300 + i as u64,
            )?;
        }
        Ok(())
    }

    struct PrefillCase {
        d: usize,
        nh: usize,
        kvh: usize,
        q0: usize,
        t: usize,
        causal: bool,
        window: Option<usize>,
        softcap: Option<f32>,
        sinks: bool,
        mask: bool,
        // The mask is 0 on keys 0..64 and +12 from key 64 on (instead of random): a later
        // key tile dominates every row that reaches it, so the cooperative kernel's lazy
        // maximum must rescale O.
        jump: bool,
        dtype: DType,
    }

    fn pc(d: usize, nh: usize, kvh: usize, dtype: DType) -> PrefillCase {
        PrefillCase {
            d,
            nh,
            kvh,
            q0: 0,
            t: 1,
            causal: true,
            window: None,
            softcap: None,
            sinks: false,
            mask: false,
            jump: false,
            dtype,
        }
    }

    fn run_prefill(c: &PrefillCase, seed: u64) -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(seed);
        let kv_len = c.q0 + c.t;
        // The cache before the chunk, then the chunk appended in one call.
        let f = filled(
            g,
            &mut rng,
            c.kvh,
            c.d,
            c.dtype,
            kv_len + 5,
            None,
            kv_len,
            kv_len,
        )?;
        let q = rng.normals(c.t * c.nh * c.d, 1.0);
        let sinks = rng.normals(c.nh, 2.0);
        // Mask: random biases with some -inf entries (or the jump).
        let mask: Vec<f32> = (0..c.t * kv_len)
            .map(|i| {
                if c.jump {
                    if i % kv_len >= 64 {
                        12.0
                    } else {
                        0.0
                    }
                } else if rng.below(9) == 0 {
                    f32::NEG_INFINITY
                } else {
                    rng.uniform(-2.0, 1.0)
                }
            })
            .collect();
        let gq = MlxBuffer::from_slice(g, &q, &[c.t, c.nh, c.d])?;
        let gs = MlxBuffer::from_slice(g, &sinks, &[c.nh])?;
        let gm = MlxBuffer::from_slice(g, &mask, &[c.t, kv_len])?;
        let mut opts = SdpaOptions::new(c.d);
        opts.causal = c.causal;
        opts.window = c.window;
        opts.softcap = c.softcap;
        opts.sinks = c.sinks.then_some(&gs);
        opts.mask = c.mask.then_some(&gm);
        let mut pass = g.begin();
        let out = sdpa_prefill(&mut pass, &gq, &f.cache, 0, c.q0, &opts)?;
        pass.commit_and_wait()?;
        let (k, v) = cache_by_position(g, &f.cache)?;
        let ro = RefOpts {
            scale: opts.scale as f64,
            causal: c.causal,
            window: c.window,
            softcap: c.softcap.map(f64::from),
            sinks: c.sinks.then_some(&sinks[..]),
            mask: c.mask.then_some(&mask[..]),
        };
        let (qr, tol) = prefill_view(g, &q);
        let want = reference(&qr, c.t, c.nh, c.d, c.q0, &k, &v, &ro);
        let what = format!(
            "prefill d={} heads {}/{} q0 {} t {} causal {} window {:?} softcap {:?} sinks {} \
             mask {} {}",
            c.d, c.nh, c.kvh, c.q0, c.t, c.causal, c.window, c.softcap, c.sinks, c.mask, c.dtype
        );
        assert_close(&out.to_vec(g)?, &want, tol, tol.max(RTOL), &what);
        drop(f.k_host);
        drop(f.v_host);
        Ok(())
    }

    #[test]
    fn prefill_matches_f64_over_head_dims_gqa_and_masks() -> Result<()> {
        let cases = [
            PrefillCase {
                t: 7,
                ..pc(64, 4, 4, DType::F16)
            },
            PrefillCase {
                q0: 5,
                t: 33,
                window: Some(10),
                softcap: Some(20.0),
                ..pc(80, 8, 2, DType::F32)
            },
            PrefillCase {
                t: 255,
                sinks: true,
                ..pc(96, 8, 1, DType::F16)
            },
            PrefillCase {
                q0: 100,
                t: 64,
                sinks: true,
                mask: true,
                ..pc(128, 16, 2, DType::F16)
            },
            // Bidirectional with a mask, window and softcap.
            PrefillCase {
                q0: 3,
                t: 40,
                causal: false,
                mask: true,
                window: Some(20),
                softcap: Some(8.0),
                ..pc(256, 4, 1, DType::F32)
            },
            PrefillCase {
                t: 1024,
                ..pc(64, 2, 1, DType::F16)
            },
            // Chunked prefill deep into the cache, GQA 7, window shorter than the cache.
            PrefillCase {
                q0: 1000,
                t: 24,
                window: Some(300),
                ..pc(128, 14, 2, DType::F16)
            },
            // One query token through the prefill path, GQA 3.
            PrefillCase {
                q0: 9,
                t: 1,
                ..pc(80, 12, 4, DType::F32)
            },
            // Logits jumping by 12 at key 64: O rescaled, with one subgroup per row group
            // and with the head dim split over two.
            PrefillCase {
                q0: 30,
                t: 130,
                mask: true,
                jump: true,
                ..pc(128, 8, 2, DType::F16)
            },
            PrefillCase {
                t: 100,
                mask: true,
                jump: true,
                sinks: true,
                ..pc(256, 4, 1, DType::F16)
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            run_prefill(c, 400 + i as u64)?;
        }
        Ok(())
    }

    #[test]
    fn ring_buffer_layer_wraps_with_correct_positions() -> Result<()> {
        // Window 16, chunks of up to 8: a ring of 23 slots. 100 positions in chunks of 8,
        // each chunk checked through prefill, then decode steps past another wrap.
        let g = gpu();
        let (kvh, d, nh, w, chunk) = (2, 64, 8, 16, 8);
        let mut rng = Rng::new(77);
        let total = 130;
        let mut cfg = KvCacheConfig::new(1, kvh, d, 1000);
        cfg.windows = vec![Some(w)];
        cfg.max_chunk = chunk;
        let mut cache = KvCache::new(g, &cfg)?;
        assert_eq!(cache.slots(0), w + chunk - 1);
        let k_host = rng.normals(total * kvh * d, 1.0);
        let v_host = rng.normals(total * kvh * d, 1.0);
        let mut opts = SdpaOptions::new(d);
        opts.window = Some(w);
        let mut pos = 0;
        while pos < 100 {
            let n = chunk.min(100 - pos);
            append_range(g, &mut cache, &k_host, &v_host, pos, pos + n, chunk)?;
            let q = rng.normals(n * nh * d, 1.0);
            let gq = MlxBuffer::from_slice(g, &q, &[n, nh, d])?;
            let mut pass = g.begin();
            let out = sdpa_prefill(&mut pass, &gq, &cache, 0, pos, &opts)?;
            pass.commit_and_wait()?;
            let (k, v) = cache_by_position(g, &cache)?;
            let ro = RefOpts {
                scale: opts.scale as f64,
                causal: true,
                window: Some(w),
                ..RefOpts::default()
            };
            let (qr, tol) = prefill_view(g, &q);
            let want = reference(&qr, n, nh, d, pos, &k, &v, &ro);
            let what = format!("ring chunk at {pos}");
            assert_close(&out.to_vec(g)?, &want, tol, tol.max(RTOL), &what);
            pos += n;
        }
        for pos in 100..total {
            append_range(g, &mut cache, &k_host, &v_host, pos, pos + 1, 1)?;
            let q = rng.normals(nh * d, 1.0);
            let gq = MlxBuffer::from_slice(g, &q, &[nh, d])?;
            let mut pass = g.begin();
            let out = sdpa_decode(&mut pass, &gq, &cache, 0, pos + 1, &opts)?;
            pass.commit_and_wait()?;
            let (k, v) = cache_by_position(g, &cache)?;
            // The ring holds the right positions: the last `w` equal the appended tokens.
            for h in 0..kvh {
                for p in pos + 1 - w..=pos {
                    for i in 0..d {
                        let want = half::f16::from_f32(k_host[(p * kvh + h) * d + i]).to_f64();
                        assert_eq!(k[h][p * d + i], want, "K at position {p}");
                    }
                }
            }
            let ro = RefOpts {
                scale: opts.scale as f64,
                causal: true,
                window: Some(w),
                ..RefOpts::default()
            };
            let want = reference(&q, 1, nh, d, pos, &k, &v, &ro);
            assert_close(
                &out.to_vec(g)?,
                &want,
                ATOL,
                RTOL,
                &format!("ring decode at {pos}"),
            );
        }
        Ok(())
    }

    #[test]
    fn prefill_coop_path_matches_the_scalar_path() -> Result<()> {
        // Runs only where the device has 16x16 f16 cooperative matrices (not lavapipe); the
        // other prefill tests then go through the cooperative path too.
        let g = gpu();
        if !prefill_uses_coop(g.caps()) {
            println!(
                "skipped: {} has no 16x16 f16 cooperative matrix with a fixed subgroup of 32",
                g.caps().adapter_name
            );
            return Ok(());
        }
        let scalar = MlxDevice::with_options(crate::DeviceOptions {
            disable_cooperative_matrix: true,
            poison_allocations: true,
            ..Default::default()
        })?;
        assert!(!prefill_uses_coop(scalar.caps()));
        for (i, &d) in SUPPORTED_HEAD_DIMS.iter().enumerate() {
            for dtype in crate::ops::kv::KV_DTYPES {
                // Both paths see f16-representable Q, so they differ by P's rounding only.
                let mut rng = Rng::new(600 + i as u64);
                let (kvh, nh, q0, t) = (2, 8, 37, 77);
                let mut outs = Vec::new();
                let q: Vec<f32> = rng
                    .normals(t * nh * d, 1.0)
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect();
                for dev in [g, &scalar] {
                    let mut r2 = Rng::new(700 + i as u64);
                    let f = filled(dev, &mut r2, kvh, d, dtype, q0 + t, Some(50), 128, q0 + t)?;
                    let gq = MlxBuffer::from_slice(dev, &q, &[t, nh, d])?;
                    let mut opts = SdpaOptions::new(d);
                    opts.window = Some(50);
                    let mut pass = dev.begin();
                    let o = sdpa_prefill(&mut pass, &gq, &f.cache, 0, q0, &opts)?;
                    pass.commit_and_wait()?;
                    outs.push(o.to_vec::<f32>(dev)?);
                }
                let want: Vec<f64> = outs[1].iter().map(|&x| x as f64).collect();
                assert_close(
                    &outs[0],
                    &want,
                    COOP_TOL,
                    COOP_TOL,
                    &format!("coop d={d} {dtype}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(5);
        let f = filled(g, &mut rng, 4, 64, DType::F16, 32, None, 16, 10)?;
        let opts = SdpaOptions::new(64);
        let mut pass = g.begin();
        let q6 = MlxBuffer::from_slice(g, &rng.normals(6 * 64, 1.0), &[6, 64])?;
        let e = sdpa_decode(&mut pass, &q6, &f.cache, 0, 10, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: 6 query heads are not a multiple of 4 kv heads"
        );
        let q72 = MlxBuffer::from_slice(g, &rng.normals(8 * 72, 1.0), &[8, 72])?;
        let e = sdpa_decode(&mut pass, &q72, &f.cache, 0, 10, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported: sdpa_decode: head_dim 72 is not supported; supported head dims: \
             64, 80, 96, 128, 256"
        );
        let q128 = MlxBuffer::from_slice(g, &rng.normals(8 * 128, 1.0), &[8, 128])?;
        let e = sdpa_decode(&mut pass, &q128, &f.cache, 0, 10, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: q has head_dim 128 but the cache has 64"
        );
        let q = MlxBuffer::from_slice(g, &rng.normals(8 * 64, 1.0), &[8, 64])?;
        let e = sdpa_decode(&mut pass, &q, &f.cache, 0, 11, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: attention needs positions up to 10 but layer 0 holds 10 positions"
        );
        let e = sdpa_decode(&mut pass, &q, &f.cache, 1, 10, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: layer 1 is out of range (the cache has 1 layers)"
        );
        let qp = MlxBuffer::from_slice(g, &rng.normals(3 * 8 * 64, 1.0), &[3, 8, 64])?;
        let e = sdpa_prefill(&mut pass, &qp, &f.cache, 0, 8, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_prefill: attention needs positions up to 10 but layer 0 holds 10 positions"
        );
        let m = MlxBuffer::from_slice(g, &[0.0f32; 3 * 9], &[3, 9])?;
        let mut mo = opts;
        mo.mask = Some(&m);
        let e = sdpa_prefill(&mut pass, &qp, &f.cache, 0, 7, &mo).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_prefill: mask has shape [3, 9], expected [3, 10]"
        );
        let s = MlxBuffer::from_slice(g, &[0.0f32; 4], &[4])?;
        let mut so = opts;
        so.sinks = Some(&s);
        let e = sdpa_decode(&mut pass, &q, &f.cache, 0, 10, &so).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: sinks has 4 elements, expected 8"
        );

        // A ring layer asked for more than it keeps.
        let mut cfg = KvCacheConfig::new(1, 4, 64, 100);
        cfg.windows = vec![Some(8)];
        cfg.max_chunk = 4;
        let mut ring = KvCache::new(g, &cfg)?;
        let k = MlxBuffer::from_slice(g, &rng.normals(4 * 4 * 64, 1.0), &[4, 4, 64])?;
        for p in (0..40).step_by(4) {
            ring.append(&mut pass, 0, &k, &k, p)?;
        }
        let mut wide = opts;
        wide.window = Some(64);
        let e = sdpa_decode(&mut pass, &q, &ring, 0, 40, &wide).unwrap_err();
        assert_eq!(
            e.to_string(),
            "capacity exceeded: sdpa_decode: attention needs position 0 but layer 0 keeps only \
             the last 11 positions (a sliding-window ring; positions below 29 were overwritten)"
        );
        Ok(())
    }

    /// Timing probe for a real GPU (`--ignored --nocapture`): f16 decode attention at
    /// Llama-3.1-8B heads (32 q, 8 kv, 128) over 1k, 8k and 32k positions, for several
    /// workgroup targets and heads per workgroup, interleaved round by round. Each variant is
    /// timed as 32 layers in one pass, every layer over its own cache (as in a decode step:
    /// no layer finds its K/V in L2); printed per layer. PROBE_CTX, PROBE_TARGETS, PROBE_GTS
    /// and PROBE_DX (comma-separated) replace the swept values.
    #[test]
    #[ignore]
    fn decode_timing_probe() -> Result<()> {
        let g = gpu();
        println!("{} ({})", g.caps().adapter_name, g.caps().backend);
        let list = |name: &str, default: &[usize]| -> Vec<usize> {
            std::env::var(name).map_or(default.to_vec(), |v| {
                v.split(',').map(|t| t.trim().parse().unwrap()).collect()
            })
        };
        let targets = list("PROBE_TARGETS", &[128, 256, 512, 1024]);
        let gts = list("PROBE_GTS", &[4]);
        // Measurement switches (set_decode_exp): 0 the kernel, 1 loads only, 2 no shuffles.
        let dxs = list("PROBE_DX", &[0]);
        let mut rng = Rng::new(77);
        let (nh, kvh, d, layers) = (32, 8, 128, 32);
        let mut cases = Vec::new();
        for ctx in list("PROBE_CTX", &[1024, 8192, 32768]) {
            let mut cfg = KvCacheConfig::new(layers, kvh, d, ctx);
            cfg.max_chunk = 512;
            let mut cache = KvCache::new(g, &cfg)?;
            for c in 0..ctx / 512 {
                let k = MlxBuffer::from_slice(g, &rng.normals(512 * kvh * d, 1.0), &[512, kvh, d])?;
                let v = MlxBuffer::from_slice(g, &rng.normals(512 * kvh * d, 1.0), &[512, kvh, d])?;
                let mut pass = g.begin();
                for l in 0..layers {
                    cache.append(&mut pass, l, &k, &v, c * 512)?;
                }
                pass.commit_and_wait()?;
            }
            let q = MlxBuffer::from_slice(g, &rng.normals(nh * d, 1.0), &[nh, d])?;
            cases.push((ctx, cache, q));
        }
        let mut variants = Vec::new();
        for &t in &targets {
            for &gt in &gts {
                variants.extend(dxs.iter().map(|&dx| (t, gt, dx)));
            }
        }
        let mut best = vec![f64::INFINITY; cases.len() * variants.len()];
        for round in 0..6 {
            for (ci, (ctx, cache, q)) in cases.iter().enumerate() {
                for (vi, &(t, gt, dx)) in variants.iter().enumerate() {
                    set_decode_target_wgs(Some(t));
                    set_decode_gt(Some(gt as u32));
                    set_decode_exp(dx as u32);
                    let mut pass = g.begin().with_pass_timing(true);
                    for l in 0..layers {
                        sdpa_decode(&mut pass, q, cache, l, *ctx, &SdpaOptions::new(d))?;
                    }
                    let times = pass.commit_and_wait()?;
                    if round > 0 {
                        let us = times.iter().map(|k| k.nanos).sum::<f64>() / layers as f64 / 1e3;
                        let b = &mut best[ci * variants.len() + vi];
                        *b = b.min(us);
                    }
                }
            }
        }
        set_decode_target_wgs(None);
        set_decode_gt(None);
        set_decode_exp(0);
        for (ci, (ctx, ..)) in cases.iter().enumerate() {
            // K and V, f16.
            let bytes = (2 * ctx * kvh * d * 2) as f64;
            for (vi, (t, gt, dx)) in variants.iter().enumerate() {
                let us = best[ci * variants.len() + vi];
                println!(
                    "decode f16 ctx {ctx} target {t} gt {gt} dx {dx}: {us:.2} us a layer in a pass of {layers} ({:.0} GB/s)",
                    bytes / us / 1e3
                );
            }
        }
        Ok(())
    }
}

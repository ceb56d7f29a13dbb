//! Kernels of the compressed KV caches ([`crate::kv_quant`]):
//! - [`kv_quant_append`]: quantize new f32 K/V rows into a layer (ring slots as `kv_append`);
//! - [`kv_quant_dequant`]: read positions back as f32 rows (inverse rotation included);
//! - [`sdpa_decode_quant`]: flash decode directly over the packed cache (Q rotated once per
//!   workgroup, K/V dequantized in registers, split-K, the output rotated back);
//! - [`sdpa_prefill_quant`]: dequantizes the positions a chunk needs into an f16 scratch
//!   layer and runs `sdpa_prefill` on it (see docs/KV_QUANT.md for why).
//!
//! See `shaders/kv_quant.wgsl`, `shaders/sdpa_quant.wgsl`, `shaders/kv_quant_common.wgsl`.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};
use crate::kv_quant::{
    check_head_dim, side_words, CompressedKvCache, KvFormat, QuantTables, QUANT_HEAD_DIMS,
    RECENT_POSITIONS, SIDE_ROWS,
};
use crate::ops::sdpa::{decode_plan, SdpaOptions, SdpaParams};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KvQuantParams {
    tokens: u32,
    kv_heads: u32,
    slots: u32,
    start: u32,
    row_words: u32,
    rows: u32,
    inv_sqrt_d: f32,
    /// dequant: positions from here on are read from the exact recent ring.
    win_lo: u32,
    tables: QuantTables,
}
const _: () = assert!(std::mem::size_of::<KvQuantParams>() == 176);

/// The f16 decode's params (same layout, so the WGSL struct extends it) plus the
/// compressed row's size, the rotation's normalization and the codebooks.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SdpaQuantParams {
    base: SdpaParams,
    row_words: u32,
    inv_sqrt_d: f32,
    /// Positions from here to the end are read from the exact recent ring.
    win_lo: u32,
    _pad1: u32,
    tables: QuantTables,
}
const _: () = assert!(std::mem::size_of::<SdpaQuantParams>() == 240);

const WG: u32 = 128;
/// Words of one K (or V) tile in the compressed decode's workgroup memory (`TILE_WORDS` in
/// sdpa_quant.wgsl): 7.5 KiB each, next to the query, its rotation scratch and the scores.
const DECODE_TILE_WORDS: usize = 1920;

/// Keys per compressed decode tile, as `KT` in sdpa_quant.wgsl: the largest power of two
/// from 8 to 64 whose rows, padded to an odd number of words, fit `DECODE_TILE_WORDS`.
fn decode_kt(format: KvFormat, head_dim: usize) -> usize {
    let padded = format.row_words(head_dim) | 1;
    let mut kt = 64;
    while kt > 8 && kt * padded > DECODE_TILE_WORDS {
        kt /= 2;
    }
    kt
}

fn mode(format: KvFormat, op: &str) -> Result<u32> {
    format.mode().ok_or_else(|| {
        MlxError::invalid(format!(
            "{op}: format {format} is not a compressed KV format"
        ))
    })
}

fn quant_spec(entry: &'static str, head_dim: usize, mode: u32) -> Result<Spec> {
    Spec::new(entry, DType::U32, WG)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("MODE", mode)
}

/// Query heads per decode workgroup: as sdpa_decode, at most 4 for head dim 512 (the
/// workgroup holds GT * head_dim query values and output accumulators).
fn decode_gt(group: usize, head_dim: usize) -> u32 {
    let gt = crate::ops::sdpa::decode_gt(group);
    if head_dim > 256 {
        gt.min(4)
    } else {
        gt
    }
}

fn decode_gts(head_dim: usize) -> &'static [u32] {
    if head_dim > 256 {
        &[1, 2, 4]
    } else {
        &[1, 2, 4, 8]
    }
}

fn decode_spec(head_dim: usize, mode: u32, gt: u32) -> Result<Spec> {
    Spec::new("sdpa_quant_decode", DType::U32, WG)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("MODE", mode)?
        .with_const("GT", gt)
}

fn reduce_spec(head_dim: usize, mode: u32) -> Result<Spec> {
    Spec::new("sdpa_quant_reduce", DType::U32, WG)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("MODE", mode)
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for &d in &QUANT_HEAD_DIMS {
        for f in KvFormat::COMPRESSED {
            let m = mode(f, "specs")?;
            v.push((Kernel::KvQuant, quant_spec("kv_quant_mean", d, m)?));
            v.push((Kernel::KvQuant, quant_spec("kv_quant_append", d, m)?));
            v.push((Kernel::KvQuant, quant_spec("kv_quant_dequant", d, m)?));
            for &gt in decode_gts(d) {
                v.push((Kernel::SdpaQuant, decode_spec(d, m, gt)?));
            }
            v.push((Kernel::SdpaQuant, reduce_spec(d, m)?));
        }
    }
    Ok(v)
}

/// `[kv_heads, slots, row_words]` of a packed cache buffer pair, checked against `format`.
fn cache_dims(
    op: &str,
    format: KvFormat,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
) -> Result<(usize, usize, usize)> {
    check::dtype(k_cache, &[DType::U32], op, "k_cache")?;
    check::dtype(v_cache, &[DType::U32], op, "v_cache")?;
    check::same_shape(k_cache, v_cache, op, "k_cache", "v_cache")?;
    match *k_cache.shape() {
        [h, s, w] if h > 0 && s > 0 => Ok((h, s, w)),
        _ => Err(MlxError::invalid(format!(
            "{op}: k_cache has shape {:?}, expected [kv_heads, slots, row_words] ({format})",
            k_cache.shape()
        ))),
    }
}

fn head_dim_of_row(op: &str, format: KvFormat, row_words: usize, head_dim: usize) -> Result<()> {
    check::ensure(format.row_words(head_dim) == row_words, op, || {
        format!(
            "the cache has {row_words} words per row but {format} at head_dim {head_dim} \
             needs {}",
            format.row_words(head_dim)
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn tables_params(
    format: KvFormat,
    tokens: usize,
    kv_heads: usize,
    slots: usize,
    start: usize,
    row_words: usize,
    head_dim: usize,
    op: &str,
) -> Result<KvQuantParams> {
    Ok(KvQuantParams {
        tokens: check::fits_u32(tokens, op, "tokens")?,
        kv_heads: kv_heads as u32,
        slots: check::fits_u32(slots, op, "slots")?,
        start: check::fits_u32(start, op, "start")?,
        row_words: row_words as u32,
        rows: check::fits_u32(tokens * kv_heads * 2, op, "rows")?,
        inv_sqrt_d: 1.0 / (head_dim as f32).sqrt(),
        win_lo: 0,
        tables: QuantTables::new(format),
    })
}

/// `side` (u32 `[kv_heads, side_words(head_dim)]`: see [`crate::kv_quant::side_words`])
/// must match the cache's heads and head dim.
fn check_side(op: &str, side: &MlxBuffer, kv_heads: usize, head_dim: usize) -> Result<()> {
    check::dtype(side, &[DType::U32], op, "side")?;
    check::ensure(side.len() == kv_heads * side_words(head_dim), op, || {
        format!(
            "side has {} words, expected {kv_heads} kv heads * {} ({SIDE_ROWS} f32 rows and \
             {} f16 rows of {head_dim})",
            side.len(),
            side_words(head_dim),
            2 * RECENT_POSITIONS
        )
    })
}

/// Set f32 row 0 of every kv head's block of `side` (u32 `[kv_heads, side_words]`) to
/// the per-channel mean of the rows of `k_new` (f32 `[T, kv_heads, head_dim]`, T >= 1):
/// the centre keys are stored around (see [`kv_quant_append`]).
pub fn kv_quant_mean(
    pass: &mut Pass,
    format: KvFormat,
    k_new: &MlxBuffer,
    side: &MlxBuffer,
) -> Result<()> {
    let op = "kv_quant_mean";
    let m = mode(format, op)?;
    check::dtype(k_new, &[DType::F32], op, "k_new")?;
    let (tokens, kv_heads, head_dim) = match *k_new.shape() {
        [t, h, d] if t > 0 && h > 0 => (t, h, d),
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: k_new has shape {:?}, expected [tokens >= 1, kv_heads, head_dim]",
                k_new.shape()
            )))
        }
    };
    check_head_dim(op, format, head_dim)?;
    check_side(op, side, kv_heads, head_dim)?;
    let params = tables_params(format, tokens, kv_heads, 1, 0, 0, head_dim, op)?;
    pass.dispatch(
        Kernel::KvQuant,
        quant_spec("kv_quant_mean", head_dim, m)?,
        &params,
        &[k_new, k_new, k_new, k_new, k_new, k_new, side],
        kv_heads as u32,
    )
}

/// Quantize `k_new`, `v_new` (f32 `[T, kv_heads, head_dim]`) into a compressed layer
/// (`k_cache`, `v_cache`: u32 `[kv_heads, slots, row_words]` in `format`) at positions
/// `start..start + T`, slot `position % slots`, with the layer's side data `side` (u32
/// `[kv_heads, side_words(head_dim)]`): keys are centered on f32 row 0 (from
/// [`kv_quant_mean`]; k - mean is quantized), positions below
/// [`crate::kv_quant::SINK_POSITIONS`] are written exact to the side rows instead of
/// compressed, and the last [`RECENT_POSITIONS`] of the T rows past the sinks are also
/// written exact (f16) to the recent ring. `CompressedKvCache::append` is the usual entry
/// point (it also sets the mean, tracks which positions the ring holds and checks capacity
/// and rings).
#[allow(clippy::too_many_arguments)]
pub fn kv_quant_append(
    pass: &mut Pass,
    format: KvFormat,
    k_new: &MlxBuffer,
    v_new: &MlxBuffer,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
    side: &MlxBuffer,
    start: usize,
) -> Result<()> {
    pass.refuse_replay("kv_quant_append (a compressed KV cache)");
    let op = "kv_quant_append";
    let m = mode(format, op)?;
    check::dtype(k_new, &[DType::F32], op, "k_new")?;
    check::dtype(v_new, &[DType::F32], op, "v_new")?;
    let (kv_heads, slots, row_words) = cache_dims(op, format, k_cache, v_cache)?;
    let (tokens, head_dim) = match *k_new.shape() {
        [t, h, d] if h == kv_heads => (t, d),
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: k_new has shape {:?}, expected [tokens, {kv_heads}, head_dim]",
                k_new.shape()
            )))
        }
    };
    check::same_shape(k_new, v_new, op, "k_new", "v_new")?;
    check_head_dim(op, format, head_dim)?;
    head_dim_of_row(op, format, row_words, head_dim)?;
    check_side(op, side, kv_heads, head_dim)?;
    check::ensure(tokens <= slots, op, || {
        format!("{tokens} tokens do not fit {slots} slots without overwriting each other")
    })?;
    if tokens == 0 {
        return Ok(());
    }
    let params = tables_params(
        format, tokens, kv_heads, slots, start, row_words, head_dim, op,
    )?;
    pass.dispatch(
        Kernel::KvQuant,
        quant_spec("kv_quant_append", head_dim, m)?,
        &params,
        &[k_new, v_new, k_cache, v_cache, k_new, k_new, side],
        params.rows,
    )
}

/// Positions `start..start + tokens` of a compressed layer (slot `position % slots`) as f32
/// `[tokens, kv_heads, head_dim]` K and V, rotated back to the model's basis, with the
/// layer's `side` data as written by [`kv_quant_append`] (the key mean added back, sink
/// positions and positions at or after `exact_from` read exact, the latter from the recent
/// ring: pass [`CompressedKvCache::exact_from`], or `usize::MAX` for the compressed rows).
#[allow(clippy::too_many_arguments)]
pub fn kv_quant_dequant(
    pass: &mut Pass,
    format: KvFormat,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
    side: &MlxBuffer,
    head_dim: usize,
    start: usize,
    tokens: usize,
    exact_from: usize,
) -> Result<(MlxBuffer, MlxBuffer)> {
    pass.refuse_replay("kv_quant_dequant (a compressed KV cache)");
    let op = "kv_quant_dequant";
    let m = mode(format, op)?;
    let (kv_heads, slots, row_words) = cache_dims(op, format, k_cache, v_cache)?;
    check_head_dim(op, format, head_dim)?;
    head_dim_of_row(op, format, row_words, head_dim)?;
    check_side(op, side, kv_heads, head_dim)?;
    check::ensure(tokens > 0, op, || "tokens must be at least 1".into())?;
    let k = pass.alloc(DType::F32, &[tokens, kv_heads, head_dim])?;
    let v = pass.alloc(DType::F32, &[tokens, kv_heads, head_dim])?;
    let mut params = tables_params(
        format, tokens, kv_heads, slots, start, row_words, head_dim, op,
    )?;
    // Past u32 (usize::MAX included): no position is read from the ring.
    params.win_lo = u32::try_from(exact_from).unwrap_or(u32::MAX);
    check::ensure(start + tokens <= u32::MAX as usize, op, || {
        format!("positions up to {} exceed 2^32-1", start + tokens)
    })?;
    pass.dispatch(
        Kernel::KvQuant,
        quant_spec("kv_quant_dequant", head_dim, m)?,
        &params,
        &[k_cache, k_cache, k_cache, v_cache, &k, &v, side],
        params.rows,
    )?;
    Ok((k, v))
}

fn check_opts(op: &str, n_heads: usize, kv_heads: usize, opts: &SdpaOptions<'_>) -> Result<()> {
    check::ensure(n_heads > 0 && n_heads.is_multiple_of(kv_heads), op, || {
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
    Ok(())
}

/// Attention of one query token per head over positions `0..seq_len` of a compressed
/// `layer` (as [`crate::ops::sdpa_decode`]): `q` f32 `[n_heads, head_dim]` (or
/// `[1, n_heads, head_dim]`); returns f32 `[n_heads, head_dim]`.
pub fn sdpa_decode_quant(
    pass: &mut Pass,
    q: &MlxBuffer,
    cache: &CompressedKvCache,
    layer: usize,
    seq_len: usize,
    opts: &SdpaOptions<'_>,
) -> Result<MlxBuffer> {
    let op = "sdpa_decode";
    let format = cache.format();
    let m = mode(format, op)?;
    check::dtype(q, &[DType::F32], op, "q")?;
    let (n_heads, head_dim) = match *q.shape() {
        [h, d] | [1, h, d] => (h, d),
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: q has shape {:?}, expected [n_heads, head_dim]",
                q.shape()
            )))
        }
    };
    check::ensure(head_dim == cache.head_dim(), op, || {
        format!(
            "q has head_dim {head_dim} but the cache has {}",
            cache.head_dim()
        )
    })?;
    let kv_heads = cache.kv_heads();
    check_opts(op, n_heads, kv_heads, opts)?;
    check::ensure(opts.mask.is_none(), op, || {
        "an explicit mask is only supported by sdpa_prefill".into()
    })?;
    check::ensure(seq_len > 0, op, || "seq_len must be at least 1".into())?;
    let lo = opts.window.map_or(0, |w| seq_len.saturating_sub(w));
    let slots = cache.check_range(op, layer, lo, seq_len)?;
    let (k, v) = cache.buffers(layer)?;
    let side = cache.side(layer)?;

    // Its split plan and the cache's centering are not followed per token.
    pass.refuse_replay("sdpa_decode_quant (a compressed KV cache)");
    let gt = decode_gt(n_heads / kv_heads, head_dim);
    let plan = decode_plan(
        pass,
        op,
        n_heads,
        kv_heads,
        head_dim,
        gt,
        decode_kt(format, head_dim),
        crate::ops::sdpa::DECODE_TARGET_WGS,
        (lo, seq_len, slots),
        opts,
    )?;
    let params = SdpaQuantParams {
        // Cosmetic for the decode kernels (they read neither), kept as before.
        base: SdpaParams {
            tokens: 1,
            causal: 1,
            ..plan.params
        },
        row_words: cache.row_words() as u32,
        inv_sqrt_d: 1.0 / (head_dim as f32).sqrt(),
        // Positions below u32::MAX: check_range held them within the cache's capacity.
        win_lo: u32::try_from(cache.exact_from(layer)).unwrap_or(u32::MAX),
        _pad1: 0,
        tables: QuantTables::new(format),
    };
    let spec = decode_spec(head_dim, m, gt)?;
    pass.dispatch(
        Kernel::SdpaQuant,
        spec,
        &params,
        &[q, k, v, &plan.part_o, &plan.part_ml, q, q, side],
        plan.workgroups,
    )?;
    let sinks = opts.sinks.unwrap_or(q);
    pass.dispatch(
        Kernel::SdpaQuant,
        reduce_spec(head_dim, m)?,
        &params,
        &[q, q, q, &plan.part_o, &plan.part_ml, sinks, &plan.out],
        n_heads as u32,
    )?;
    Ok(plan.out)
}

/// Attention of T query tokens at positions `q_start_pos..q_start_pos + T` over a
/// compressed `layer` (as [`crate::ops::sdpa_prefill`], whose K/V for the chunk were already
/// appended). The positions the chunk needs are dequantized into the cache's f16 scratch
/// layer, shifted to start at 0 (attention depends on positions only through the causal
/// and window masks), and `sdpa_prefill` runs on it. With an explicit mask no shift is
/// made (the mask is indexed by absolute position). Head dim 512 is not supported here
/// (`sdpa_prefill` has no 512 kernel).
pub fn sdpa_prefill_quant(
    pass: &mut Pass,
    q: &MlxBuffer,
    cache: &mut CompressedKvCache,
    layer: usize,
    q_start_pos: usize,
    opts: &SdpaOptions<'_>,
) -> Result<MlxBuffer> {
    pass.refuse_replay("sdpa_prefill_quant (a compressed KV cache)");
    let op = "sdpa_prefill";
    let tokens = match *q.shape() {
        [t, _, _] => t,
        _ => {
            return Err(MlxError::invalid(format!(
                "{op}: q has shape {:?}, expected [tokens, n_heads, head_dim]",
                q.shape()
            )))
        }
    };
    let head_dim = cache.head_dim();
    if !crate::kv_cache::SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return Err(MlxError::unsupported(format!(
            "{op}: head_dim {head_dim} over a compressed cache is supported by decode only; \
             prefill supports head dims {}",
            crate::kv_cache::supported_head_dims()
        )));
    }
    let kv_len = q_start_pos + tokens;
    let lo = opts
        .window
        .map_or(0, |w| (q_start_pos + 1).saturating_sub(w));
    cache.check_range(op, layer, lo, kv_len)?;
    // Without a mask the range starts at lo; with one, at 0 (positions the ring no longer
    // holds dequantize to whatever their slot holds now, and the window masks them).
    let shift = if opts.mask.is_some() { 0 } else { lo };
    let n = kv_len - shift;
    let format = cache.format();
    let (kq, vq) = cache.buffers(layer)?;
    let (kq, vq) = (kq.clone(), vq.clone());
    let side = cache.side(layer)?.clone();
    let exact_from = cache.exact_from(layer);
    let gpu = pass.gpu().clone();
    let scratch = cache.scratch(&gpu)?;
    if n > scratch.capacity() {
        return Err(MlxError::unsupported(format!(
            "{op}: an explicit mask over a compressed sliding-window layer needs all {n} \
             positions but the prefill scratch holds {}",
            scratch.capacity()
        )));
    }
    let (kf, vf) = kv_quant_dequant(
        pass, format, &kq, &vq, &side, head_dim, shift, n, exact_from,
    )?;
    scratch.clear();
    scratch.append(pass, 0, &kf, &vf, 0)?;
    crate::ops::sdpa_prefill(pass, q, scratch, 0, q_start_pos - shift, opts)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::needless_range_loop
    )]
    use super::*;
    use crate::kv_cache::KvCacheConfig;
    use crate::kv_quant::{lloyd_max, sign_words, SINK_POSITIONS};
    use crate::testutil::{assert_close, devices, gpu, Rng};
    use crate::MlxDevice;
    use half::f16;

    // ---- CPU reference of the same algorithm, in f64 ----

    fn sign(i: usize) -> f64 {
        if (sign_words()[i / 32] >> (i % 32)) & 1 == 1 {
            -1.0
        } else {
            1.0
        }
    }

    /// Unnormalized Walsh-Hadamard transform.
    fn fwht(x: &mut [f64]) {
        let n = x.len();
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (x[j], x[j + h]);
                    x[j] = a + b;
                    x[j + h] = a - b;
                }
            }
            h *= 2;
        }
    }

    /// Per 32-coordinate group of a rotated row: (bits, first word, 2-bit book).
    fn groups(f: KvFormat, d: usize) -> Vec<(usize, usize, bool)> {
        let mut word = 1;
        (0..d / 32)
            .map(|g| {
                let (bits, two) = match f {
                    KvFormat::Tq4 => (4, false),
                    KvFormat::Tq3 => (3, false),
                    KvFormat::Tq2 => (2, false),
                    _ if g < d / 64 => (3, false),
                    _ => (2, true),
                };
                let r = (bits, word, two);
                word += bits;
                r
            })
            .collect()
    }

    /// The book coordinate `i` of a rotated row uses.
    fn book(f: KvFormat, d: usize, i: usize) -> &'static [f64] {
        let (bits, _, two) = groups(f, d)[i / 32];
        lloyd_max(if two { 2 } else { bits })
    }

    /// A row as stored: rotated (norm, indices), affine (per-block scale and min, q), or a
    /// sink position's exact side row (in the decoder's basis: rotated for tq*).
    #[derive(Clone, Debug, PartialEq)]
    enum Row {
        Tq(f32, Vec<u32>),
        Affine(Vec<f32>, Vec<f32>, Vec<i32>),
        Exact(Vec<f64>),
    }

    fn unpack(f: KvFormat, d: usize, w: &[u32]) -> Row {
        let nb = d / 32;
        match f {
            KvFormat::Q8 => {
                let s = (0..nb)
                    .map(|b| f16::from_bits((w[b / 2] >> (16 * (b % 2))) as u16).to_f32())
                    .collect();
                let q = (0..d)
                    .map(|i| (w[nb / 2 + i / 4] >> (8 * (i % 4))) as u8 as i8 as i32)
                    .collect();
                Row::Affine(s, vec![0.0; nb], q)
            }
            KvFormat::Q4 => {
                let s = (0..nb)
                    .map(|b| f16::from_bits(w[b] as u16).to_f32())
                    .collect();
                let m = (0..nb)
                    .map(|b| f16::from_bits((w[b] >> 16) as u16).to_f32())
                    .collect();
                let q = (0..d)
                    .map(|i| ((w[nb + i / 8] >> (4 * (i % 8))) & 15) as i32)
                    .collect();
                Row::Affine(s, m, q)
            }
            _ => {
                let gs = groups(f, d);
                let idx = (0..d)
                    .map(|i| {
                        let (bits, start, _) = gs[i / 32];
                        (0..bits)
                            .map(|b| ((w[start + b] >> (i % 32)) & 1) << b)
                            .sum()
                    })
                    .collect();
                Row::Tq(f32::from_bits(w[0]), idx)
            }
        }
    }

    fn pack(f: KvFormat, d: usize, r: &Row) -> Vec<u32> {
        let mut w = vec![0u32; f.row_words(d)];
        let nb = d / 32;
        match r {
            Row::Affine(s, m, q) if f == KvFormat::Q8 => {
                for b in 0..nb {
                    w[b / 2] |= (f16::from_f32(s[b]).to_bits() as u32) << (16 * (b % 2));
                }
                for (i, &v) in q.iter().enumerate() {
                    w[nb / 2 + i / 4] |= (v as u8 as u32) << (8 * (i % 4));
                }
                let _ = m;
            }
            Row::Affine(s, m, q) => {
                for b in 0..nb {
                    w[b] = f16::from_f32(s[b]).to_bits() as u32
                        | (f16::from_f32(m[b]).to_bits() as u32) << 16;
                }
                for (i, &v) in q.iter().enumerate() {
                    w[nb + i / 8] |= (v as u32) << (4 * (i % 8));
                }
            }
            Row::Exact(_) => unreachable!("exact rows are not packed"),
            Row::Tq(norm, idx) => {
                w[0] = norm.to_bits();
                let gs = groups(f, d);
                for (i, &k) in idx.iter().enumerate() {
                    let (bits, start, _) = gs[i / 32];
                    for b in 0..bits {
                        w[start + b] |= ((k >> b) & 1) << (i % 32);
                    }
                }
            }
        }
        w
    }

    /// The sink row of `x` as the side buffer holds it: H (s * x) / sqrt(d) for tq*, x for
    /// the affine formats.
    fn decoder_basis(f: KvFormat, x: &[f32]) -> Vec<f64> {
        let d = x.len();
        if !f.is_rotated() {
            return x.iter().map(|&v| v as f64).collect();
        }
        let mut z: Vec<f64> = (0..d).map(|i| sign(i) * x[i] as f64).collect();
        fwht(&mut z);
        z.iter().map(|v| v / (d as f64).sqrt()).collect()
    }

    /// The row in the model's basis (without the key mean).
    fn dequant(f: KvFormat, d: usize, r: &Row) -> Vec<f64> {
        match r {
            Row::Exact(y) if f.is_rotated() => {
                let mut y = y.clone();
                fwht(&mut y);
                let sd = (d as f64).sqrt();
                (0..d).map(|i| sign(i) * y[i] / sd).collect()
            }
            Row::Exact(y) => y.clone(),
            Row::Affine(s, m, q) => (0..d)
                .map(|i| s[i / 32] as f64 * q[i] as f64 + m[i / 32] as f64)
                .collect(),
            Row::Tq(norm, idx) => {
                let sd = (d as f64).sqrt();
                let mut y: Vec<f64> = (0..d)
                    .map(|i| book(f, d, i)[idx[i] as usize] * *norm as f64 / sd)
                    .collect();
                fwht(&mut y);
                (0..d).map(|i| sign(i) * y[i] / sd).collect()
            }
        }
    }

    /// Check a stored row against the reference quantization of `x`: scales/norm to their
    /// rounding, every index equal except within 1e-4 of a decision boundary (f32 vs f64),
    /// and the packing exact. Returns the number of near-tie differences.
    fn check_row(f: KvFormat, d: usize, x: &[f32], words: &[u32], what: &str) -> usize {
        let got = unpack(f, d, words);
        assert_eq!(
            pack(f, d, &got),
            words,
            "{what}: packing (unused bits included)"
        );
        let mut ties = 0;
        let mut near = |ok: bool, tie: bool, i: usize, g: i64, w: i64, t: f64| {
            if !ok {
                assert!(
                    tie && (g - w).abs() == 1,
                    "{what}: element {i}: index {g}, reference {w} (scaled value {t})"
                );
                ties += 1;
            }
        };
        match &got {
            Row::Tq(norm, idx) => {
                let n = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                assert!(
                    (*norm as f64 - n).abs() <= 1e-5 * n,
                    "{what}: norm {norm} vs {n}"
                );
                let mut z: Vec<f64> = (0..d).map(|i| sign(i) * x[i] as f64).collect();
                fwht(&mut z);
                for i in 0..d {
                    let u = z[i] / n;
                    let c = book(f, d, i);
                    let mids: Vec<f64> = c.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
                    let want = mids.iter().filter(|&&m| u > m).count() as i64;
                    let tie = mids.iter().any(|&m| (u - m).abs() < 1e-4);
                    near(idx[i] as i64 == want, tie, i, idx[i] as i64, want, u);
                }
            }
            Row::Affine(s, m, q) => {
                for b in 0..d / 32 {
                    let blk: Vec<f64> = x[b * 32..][..32].iter().map(|&v| v as f64).collect();
                    let mn = blk.iter().copied().fold(f64::INFINITY, f64::min);
                    let mx = blk.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let (ws, wm) = if f == KvFormat::Q8 {
                        (mx.max(-mn) / 127.0, 0.0)
                    } else {
                        ((mx - mn) / 15.0, mn)
                    };
                    for (g, w) in [(s[b], ws), (m[b], wm)] {
                        let (g, w) = (f16::from_f32(g).to_bits(), f16::from_f64(w).to_bits());
                        assert!(
                            (g as i32 - w as i32).abs() <= 1,
                            "{what}: block {b} scale/min bits {g:#x} vs {w:#x}"
                        );
                    }
                    // Indices against the stored scale and min.
                    for j in 0..32 {
                        let i = b * 32 + j;
                        let t = (blk[j] - m[b] as f64) / s[b] as f64;
                        let (lo, hi) = if f == KvFormat::Q8 {
                            (-127.0, 127.0)
                        } else {
                            (0.0, 15.0)
                        };
                        let want = if s[b] > 0.0 {
                            t.round_ties_even().clamp(lo, hi) as i64
                        } else {
                            0
                        };
                        let tie = ((t - t.floor()) - 0.5).abs() < 1e-4;
                        near(q[i] as i64 == want, tie, i, q[i] as i64, want, t);
                    }
                }
            }
            Row::Exact(_) => unreachable!("unpack gives packed rows"),
        }
        ties
    }

    // ---- cache building ----

    struct Built {
        cache: CompressedKvCache,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        g: &MlxDevice,
        rng: &mut Rng,
        f: KvFormat,
        kvh: usize,
        d: usize,
        cap: usize,
        window: Option<usize>,
        chunk: usize,
        len: usize,
    ) -> Result<Built> {
        let mut cfg = KvCacheConfig::new(1, kvh, d, cap);
        cfg.windows = vec![window];
        cfg.max_chunk = chunk;
        let mut cache = CompressedKvCache::new(g, &cfg, f)?;
        let k = rng.normals(len * kvh * d, 1.5);
        let v = rng.normals(len * kvh * d, 1.0);
        let row = kvh * d;
        // Uploaded once behind 3 junk elements: every chunk is a view at an odd offset.
        let up = |x: &[f32]| {
            let mut h = vec![7.0f32; 3];
            h.extend_from_slice(x);
            MlxBuffer::from_slice(g, &h, &[h.len()])
        };
        let (ka, va) = (up(&k)?, up(&v)?);
        let mut pos = 0;
        while pos < len {
            let n = chunk.min(len - pos);
            let kb = ka.view(3 + pos * row, &[n, kvh, d])?;
            let vb = va.view(3 + pos * row, &[n, kvh, d])?;
            let mut pass = g.begin();
            cache.append(&mut pass, 0, &kb, &vb, pos)?;
            pass.commit_and_wait()?;
            pos += n;
        }
        Ok(Built { cache, k, v })
    }

    /// Stored rows by absolute position: [kv_heads][len] of (K row, V row).
    type Rows = Vec<Vec<Option<(Row, Row)>>>;

    /// What a layer holds.
    struct Stored {
        /// The rows the decoder reads: sink positions and positions from `exact_from` on from
        /// their exact side rows, the others packed (None where the ring overwrote them).
        rows: Rows,
        /// The packed rows of the positions past the sinks (None where the ring overwrote
        /// them and for the sinks), whether or not the recent ring also holds them.
        packed: Rows,
        /// Per kv head, the key mean (side row 0).
        mean: Vec<Vec<f64>>,
    }

    /// A layer's side buffer by kv head: the u32 words of each head's block.
    fn side_words_of(g: &MlxDevice, c: &CompressedKvCache) -> Result<Vec<Vec<u32>>> {
        let s = c.side(0)?.to_vec::<u32>(g)?;
        Ok(s.chunks(side_words(c.head_dim()))
            .map(|h| h.to_vec())
            .collect())
    }

    /// A layer's f32 side rows [kv_heads][SIDE_ROWS][d] (key mean, sink K, sink V).
    fn side_rows(g: &MlxDevice, c: &CompressedKvCache) -> Result<Vec<Vec<Vec<f64>>>> {
        let d = c.head_dim();
        Ok(side_words_of(g, c)?
            .iter()
            .map(|h| {
                h[..SIDE_ROWS * d]
                    .chunks(d)
                    .map(|r| r.iter().map(|&w| f32::from_bits(w) as f64).collect())
                    .collect()
            })
            .collect())
    }

    /// The recent ring's f16 row of position `pos` (K or V) in one head's side words.
    fn ring_row(head: &[u32], d: usize, pos: usize, is_v: bool) -> Vec<f64> {
        let r = pos % RECENT_POSITIONS + if is_v { RECENT_POSITIONS } else { 0 };
        let o = SIDE_ROWS * d + r * d / 2;
        (0..d)
            .map(|i| f16::from_bits((head[o + i / 2] >> (16 * (i % 2))) as u16).to_f64())
            .collect()
    }

    /// The f64 per-channel mean of K rows `lo..hi` of kv head `h` (x: [len, kvh, d]).
    fn mean_ref(x: &[f32], kvh: usize, d: usize, h: usize, lo: usize, hi: usize) -> Vec<f64> {
        (0..d)
            .map(|i| {
                (lo..hi)
                    .map(|p| x[(p * kvh + h) * d + i] as f64)
                    .sum::<f64>()
                    / (hi - lo) as f64
            })
            .collect()
    }

    fn stored(g: &MlxDevice, c: &CompressedKvCache) -> Result<Stored> {
        let (kb, vb) = c.buffers(0)?;
        let (kw, vw) = (kb.to_vec::<u32>(g)?, vb.to_vec::<u32>(g)?);
        let words = side_words_of(g, c)?;
        let side = side_rows(g, c)?;
        let (f, d, slots, len, rw) = (
            c.format(),
            c.head_dim(),
            c.slots(0),
            c.len(0),
            c.row_words(),
        );
        let (oldest, exact_from) = (len.saturating_sub(slots), c.exact_from(0));
        let packed: Rows = (0..c.kv_heads())
            .map(|h| {
                (0..len)
                    .map(|p| {
                        (p >= oldest && p >= SINK_POSITIONS).then(|| {
                            let o = (h * slots + p % slots) * rw;
                            (unpack(f, d, &kw[o..o + rw]), unpack(f, d, &vw[o..o + rw]))
                        })
                    })
                    .collect()
            })
            .collect();
        let rows = (0..c.kv_heads())
            .map(|h| {
                (0..len)
                    .map(|p| {
                        if p < SINK_POSITIONS {
                            let (k, v) = (1 + p, 1 + SINK_POSITIONS + p);
                            Some((
                                Row::Exact(side[h][k].clone()),
                                Row::Exact(side[h][v].clone()),
                            ))
                        } else if p >= exact_from {
                            Some((
                                Row::Exact(ring_row(&words[h], d, p, false)),
                                Row::Exact(ring_row(&words[h], d, p, true)),
                            ))
                        } else {
                            packed[h][p].clone()
                        }
                    })
                    .collect()
            })
            .collect();
        let mean = side.iter().map(|h| h[0].clone()).collect();
        Ok(Stored { rows, packed, mean })
    }

    // ---- append + dequant ----

    #[test]
    fn append_quantizes_like_the_reference_and_dequant_inverts_it() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(71);
        let mut ties = 0;
        let mut total = 0;
        for (ci, f) in KvFormat::COMPRESSED.into_iter().enumerate() {
            for d in [64, 128, 256, 512] {
                if d == 512 && ci % 2 == 1 {
                    continue;
                }
                // A ring of 5 + 3 - 1 = 7 slots, 17 positions in chunks of 3: wraps twice.
                // The chunk 3..6 covers the first compressed position (4): the key mean is
                // the mean of its rows.
                let kvh = 1 + rng.below(3);
                let b = build(g, &mut rng, f, kvh, d, 40, Some(5), 3, 17)?;
                let (rw, slots) = (b.cache.row_words(), b.cache.slots(0));
                assert_eq!(slots, 7);
                let (kb, vb) = b.cache.buffers(0)?;
                let (kw, vw) = (kb.to_vec::<u32>(g)?, vb.to_vec::<u32>(g)?);
                let side = side_rows(g, &b.cache)?;
                let (lo, len) = (17 - slots, 17);
                let mut want_k = Vec::new();
                let mut want_v = Vec::new();
                let mut want_sk = Vec::new();
                let mut want_sv = Vec::new();
                for h in 0..kvh {
                    let mu = &side[h][0];
                    let want = mean_ref(&b.k, kvh, d, h, 3, 6);
                    // An f32 sum of 3 values of O(1): ~1e-7.
                    assert_close(
                        &mu.iter().map(|&m| m as f32).collect::<Vec<_>>(),
                        &want,
                        1e-5,
                        1e-5,
                        &format!("{f} d={d} key mean, head {h}"),
                    );
                    // Sink rows: exact, in the decoder's basis (f32 transform: ~1e-6).
                    for p in 0..SINK_POSITIONS {
                        let x = (p * kvh + h) * d;
                        for (src, r) in [(&b.k, 1 + p), (&b.v, 1 + SINK_POSITIONS + p)] {
                            let got: Vec<f32> = side[h][r].iter().map(|&v| v as f32).collect();
                            let want = decoder_basis(f, &src[x..x + d]);
                            assert_close(&got, &want, 2e-5, 2e-5, &format!("{f} d={d} sink {p}"));
                        }
                    }
                }
                for p in 0..SINK_POSITIONS {
                    for h in 0..kvh {
                        let x = (p * kvh + h) * d;
                        want_sk.extend(b.k[x..x + d].iter().map(|&v| v as f64));
                        want_sv.extend(b.v[x..x + d].iter().map(|&v| v as f64));
                    }
                }
                for p in lo..len {
                    for h in 0..kvh {
                        let o = (h * slots + p % slots) * rw;
                        let x = (p * kvh + h) * d;
                        let mu = &side[h][0];
                        // K is quantized minus the mean (the same f32 subtraction as the
                        // kernel), V as it is.
                        let kc: Vec<f32> = (0..d).map(|i| b.k[x + i] - mu[i] as f32).collect();
                        let what = format!("{f} d={d} pos {p} head {h}");
                        ties += check_row(f, d, &kc, &kw[o..o + rw], &what);
                        ties += check_row(f, d, &b.v[x..x + d], &vw[o..o + rw], &what);
                        total += 2 * d;
                        let dk = dequant(f, d, &unpack(f, d, &kw[o..o + rw]));
                        want_k.extend(dk.iter().zip(mu).map(|(a, m)| a + m));
                        want_v.extend(dequant(f, d, &unpack(f, d, &vw[o..o + rw])));
                    }
                }
                // Every position is among the last RECENT_POSITIONS of its append: the ring
                // holds them all, exact (f16 of the decoder's basis, not centered).
                assert_eq!(b.cache.exact_from(0), 0);
                let words = side_words_of(g, &b.cache)?;
                let mut want_rk = Vec::new();
                let mut want_rv = Vec::new();
                for p in lo..len {
                    for h in 0..kvh {
                        let x = (p * kvh + h) * d;
                        for (src, is_v) in [(&b.k, false), (&b.v, true)] {
                            let got: Vec<f32> = ring_row(&words[h], d, p, is_v)
                                .iter()
                                .map(|&v| v as f32)
                                .collect();
                            let want = decoder_basis(f, &src[x..x + d]);
                            // f16 rounding (2^-11 relative) of values of O(1).
                            let what = format!("{f} d={d} ring row of {p} v={is_v}");
                            assert_close(&got, &want, 1e-3, 1e-3, &what);
                        }
                        want_rk.extend(b.k[x..x + d].iter().map(|&v| v as f64));
                        want_rv.extend(b.v[x..x + d].iter().map(|&v| v as f64));
                    }
                }
                let side_buf = b.cache.side(0)?;
                let mut pass = g.begin();
                // usize::MAX: the packed rows, even of positions the ring holds.
                let (gk, gv) =
                    kv_quant_dequant(&mut pass, f, kb, vb, side_buf, d, lo, len - lo, usize::MAX)?;
                let (sk, sv) =
                    kv_quant_dequant(&mut pass, f, kb, vb, side_buf, d, 0, 4, usize::MAX)?;
                let (rk, rv) =
                    kv_quant_dequant(&mut pass, f, kb, vb, side_buf, d, lo, len - lo, 0)?;
                pass.commit_and_wait()?;
                // The ring's rows come back exact but for the f16 rounding (through the
                // inverse rotation for tq*: errors of ~5e-4 of O(1) values mix).
                let what = format!("dequant ring {f} d={d}");
                assert_close(&rk.to_vec(g)?, &want_rk, 2e-3, 2e-3, &what);
                assert_close(&rv.to_vec(g)?, &want_rv, 2e-3, 2e-3, &what);
                // f32 dequantization and transform over <= 512 terms of O(1): ~1e-6.
                let what = format!("dequant {f} d={d}");
                assert_close(&gk.to_vec(g)?, &want_k, 2e-5, 2e-5, &what);
                assert_close(&gv.to_vec(g)?, &want_v, 2e-5, 2e-5, &what);
                // Sink positions come back exact (two f32 transforms: ~1e-6).
                let what = format!("dequant sinks {f} d={d}");
                assert_close(&sk.to_vec(g)?, &want_sk, 2e-5, 2e-5, &what);
                assert_close(&sv.to_vec(g)?, &want_sv, 2e-5, 2e-5, &what);
            }
        }
        // Near-ties (f32 on the GPU vs f64 here) must stay rare.
        assert!(
            ties * 1000 < total,
            "{ties} near-tie differences of {total}"
        );
        Ok(())
    }

    #[test]
    fn rotated_quantization_error_matches_the_lloyd_max_distortion() -> Result<()> {
        // Over many rows the rotated coordinates are ~N(0, 1): the mean squared error per
        // coordinate, relative to ||x||^2 / d, is close to the codebook's Gaussian
        // distortion (0.1175, 0.03454, 0.009497 for 2, 3, 4 bits). Loose bounds: the
        // distribution is only approximately Gaussian at finite d.
        let g = gpu();
        let mut rng = Rng::new(5);
        for (f, want) in [
            (KvFormat::Tq2, 0.1175),
            (KvFormat::Tq2_5, 0.5 * (0.1175 + 0.03454)),
            (KvFormat::Tq3, 0.03454),
            (KvFormat::Tq4, 0.009497),
        ] {
            let d = 256;
            let b = build(g, &mut rng, f, 2, d, 64, None, 64, 64)?;
            let st = stored(g, &b.cache)?;
            let (mut err, mut norm) = (0.0, 0.0);
            for (h, hr) in st.packed.iter().enumerate() {
                // Compressed positions (all of them in the recent ring too: their packed rows);
                // what is quantized is the key minus the mean.
                for (p, r) in hr.iter().enumerate().skip(SINK_POSITIONS) {
                    let (kr, _) = r.as_ref().unwrap();
                    let x: Vec<f64> = b.k[(p * 2 + h) * d..][..d]
                        .iter()
                        .zip(&st.mean[h])
                        .map(|(&a, m)| a as f64 - m)
                        .collect();
                    let y = dequant(f, d, kr);
                    err += x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
                    norm += x.iter().map(|a| a.powi(2)).sum::<f64>();
                }
            }
            let rel = err / norm;
            println!("{f}: relative MSE {rel:.5} (Lloyd-Max distortion {want:.5})");
            assert!(rel > 0.7 * want && rel < 1.3 * want, "{f}: {rel} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn key_mean_and_sinks_follow_appends_and_rewinds() -> Result<()> {
        // Keys with a large shared per-channel offset (8x their spread, as real models'
        // keys have) appended in steps, with rewinds. The key mean must be the mean of the
        // rows of the append that covers position SINK_POSITIONS and stay fixed otherwise;
        // sink positions come back exact; compressed keys carry the quantization error of
        // the centered key (tq4: ~0.1 of its norm), where without centering it would be
        // ~0.1 of the whole key, ~8 times more.
        let g = gpu();
        let mut rng = Rng::new(44);
        let (kvh, d, nh) = (2, 64, 4);
        let offset = rng.normals(kvh * d, 8.0);
        let mut k_all = vec![0f32; 32 * kvh * d];
        let mut v_all = vec![0f32; 32 * kvh * d];
        for f in [KvFormat::Tq4, KvFormat::Q4] {
            let mut cfg = KvCacheConfig::new(1, kvh, d, 32);
            cfg.max_chunk = 16;
            let mut cache = CompressedKvCache::new(g, &cfg, f)?;
            // The rows of the append that set the mean (later appends may overwrite them).
            let mut mean_src = (Vec::new(), 0);
            // (start, tokens): sinks only; covers position 4 (sets the mean); plain; a
            // rewind past 4 (keeps it); a rewind to before 4 (sets it again).
            for (start, n) in [(0, 2), (2, 10), (12, 8), (7, 8), (3, 6)] {
                let k: Vec<f32> = rng
                    .normals(n * kvh * d, 1.0)
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| x + offset[i % (kvh * d)])
                    .collect();
                let v = rng.normals(n * kvh * d, 1.0);
                k_all[start * kvh * d..][..k.len()].copy_from_slice(&k);
                v_all[start * kvh * d..][..v.len()].copy_from_slice(&v);
                if (start..start + n).contains(&SINK_POSITIONS) {
                    mean_src = (k.clone(), n);
                }
                let kb = MlxBuffer::from_slice(g, &k, &[n, kvh, d])?;
                let vb = MlxBuffer::from_slice(g, &v, &[n, kvh, d])?;
                let mut pass = g.begin();
                cache.append(&mut pass, 0, &kb, &vb, start)?;
                pass.commit_and_wait()?;
                let len = start + n;
                assert_eq!(cache.len(0), len);
                if len <= SINK_POSITIONS {
                    continue;
                }
                let st = stored(g, &cache)?;
                for h in 0..kvh {
                    let want = mean_ref(&mean_src.0, kvh, d, h, 0, mean_src.1);
                    let got: Vec<f32> = st.mean[h].iter().map(|&m| m as f32).collect();
                    // f32 sums of <= 10 values of O(8).
                    assert_close(&got, &want, 1e-5, 1e-5, &format!("{f} mean after {start}"));
                }
                let (kq, vq) = cache.buffers(0)?;
                let mut pass = g.begin();
                // The packed rows (every position here is in the recent ring too).
                let (gk, gv) =
                    kv_quant_dequant(&mut pass, f, kq, vq, cache.side(0)?, d, 0, len, usize::MAX)?;
                pass.commit_and_wait()?;
                let (gk, gv) = (gk.to_vec::<f32>(g)?, gv.to_vec::<f32>(g)?);
                for p in 0..len {
                    for h in 0..kvh {
                        let o = (p * kvh + h) * d;
                        let (x, y) = (&k_all[o..o + d], &gk[o..o + d]);
                        let err = x.iter().zip(y).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
                        if p < SINK_POSITIONS {
                            // Exact (two f32 transforms of values of O(8)).
                            assert!(err.sqrt() < 1e-4, "{f} sink key {p}: error {}", err.sqrt());
                            let e = v_all[o..o + d]
                                .iter()
                                .zip(&gv[o..o + d])
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, f32::max);
                            assert!(e < 1e-5, "{f} sink value {p}: error {e}");
                            continue;
                        }
                        let cen: f32 = x
                            .iter()
                            .zip(&st.mean[h])
                            .map(|(a, m)| (a - *m as f32).powi(2))
                            .sum();
                        let rel = (err / cen).sqrt();
                        assert!(
                            rel < 0.3,
                            "{f} key {p} head {h}: error {rel} of the centered norm"
                        );
                    }
                }
            }
            // Decode and prefill over the rewound cache (positions 0..9, the first four
            // exact) against f64 attention over the dequantized cache.
            let len = 9;
            let q = rng.normals(nh * d, 0.3);
            let gq = MlxBuffer::from_slice(g, &q, &[nh, d])?;
            let qp = rng.normals(3 * nh * d, 0.3);
            let gqp = MlxBuffer::from_slice(g, &qp, &[3, nh, d])?;
            let opts = SdpaOptions::new(d);
            let mut pass = g.begin();
            let out = sdpa_decode_quant(&mut pass, &gq, &cache, 0, len, &opts)?;
            let outp = sdpa_prefill_quant(&mut pass, &gqp, &mut cache, 0, len - 3, &opts)?;
            pass.commit_and_wait()?;
            let st = stored(g, &cache)?;
            let (k, v) = dequant_by_pos(&cache, &st, false);
            let want = attention(&q, 1, nh, d, len - 1, &k, &v, None, None, None);
            // As decode_matches_f64_over_the_dequantized_cache, logits of O(10) here.
            assert_close(
                &out.to_vec::<f32>(g)?,
                &want,
                2e-4,
                2e-4,
                &format!("{f} decode"),
            );
            let (k, v) = dequant_by_pos(&cache, &st, true);
            let want = attention(&qp, 3, nh, d, len - 3, &k, &v, None, None, None);
            // As prefill_matches_f64_over_the_dequantized_cache (f16 scratch: keys of
            // O(8) round to 2^-8).
            assert_close(
                &outp.to_vec::<f32>(g)?,
                &want,
                1e-2,
                1e-2,
                &format!("{f} prefill"),
            );
        }
        Ok(())
    }

    #[test]
    fn recent_window_follows_appends_rewinds_and_rings() -> Result<()> {
        // The recent ring against an independent model of it: every write of a position gets
        // a new stamp; the last RECENT_POSITIONS positions of an append (past the sinks) put
        // (position, stamp) in ring row position % RECENT_POSITIONS; a position is exact iff
        // its ring row holds its current stamp. Appends of odd sizes (one of 150 >
        // RECENT_POSITIONS: its first 22 rows are compressed only), a rewind into the exact
        // window (positions before it stay exact), one to before it (only the new positions
        // are exact), one after which rows overwritten by rewound-away positions stay
        // compressed (a shorter window), on a full-attention layer and on a wrapped
        // sliding-window ring. Keys carry a shared offset (centering matters; exact rows are
        // not centered). After every append each readable position dequantizes to its exact
        // row (f16) or to the reference dequantization of its packed row, as the model says;
        // at the end decode and prefill (GQA 3) match f64 attention over those rows and each
        // other.
        let g = gpu();
        let (kvh, d, nh, cap) = (2, 64, 6, 400);
        let r = RECENT_POSITIONS;
        // (start, tokens) and the exact_from each append leaves (hand-computed from the rule
        // in CompressedKvCache::append; the model below checks the rule itself).
        let full: &[(usize, usize, usize)] = &[
            (0, 37, 0),
            (37, 1, 0),
            (38, 45, 0),
            (83, 48, 3),
            (131, 47, 50),
            (100, 3, 50),
            (103, 40, 50),
            (143, 60, 75),
            (60, 2, 60),
            (62, 150, 84),
            (212, 1, 85),
        ];
        // Window 40, max_chunk 48: 87 slots, wrapped twice; rewinds as far as the window allows.
        let ring: &[(usize, usize, usize)] = &[
            (0, 37, 0),
            (37, 1, 0),
            (38, 45, 0),
            (83, 48, 3),
            (131, 47, 50),
            (150, 3, 50),
            (153, 48, 73),
            (201, 1, 74),
            (180, 5, 74),
            (185, 48, 105),
            (233, 1, 106),
        ];
        let mut rng = Rng::new(61);
        let offset = rng.normals(kvh * d, 4.0);
        for f in [KvFormat::Tq4, KvFormat::Tq2_5, KvFormat::Q8] {
            for (window, steps) in [(None, full), (Some(40), ring)] {
                let what = format!("{f} window {window:?}");
                let mut cfg = KvCacheConfig::new(1, kvh, d, cap);
                cfg.windows = vec![window];
                cfg.max_chunk = 48;
                let mut cache = CompressedKvCache::new(g, &cfg, f)?;
                let slots = cache.slots(0);
                let row = kvh * d;
                let (mut k_all, mut v_all) = (vec![0f32; cap * row], vec![0f32; cap * row]);
                let mut stamp = 0;
                let mut cur = vec![0usize; cap];
                let mut ring_rows = vec![None; r];
                let mut packed_slots = vec![None; slots];
                for &(start, n, want_from) in steps {
                    let k: Vec<f32> = rng
                        .normals(n * row, 1.0)
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| x + offset[i % row])
                        .collect();
                    let v = rng.normals(n * row, 1.0);
                    k_all[start * row..][..k.len()].copy_from_slice(&k);
                    v_all[start * row..][..v.len()].copy_from_slice(&v);
                    for t in 0..n {
                        let p = start + t;
                        stamp += 1;
                        cur[p] = stamp;
                        if p >= SINK_POSITIONS {
                            packed_slots[p % slots] = Some((p, stamp));
                            if t + r >= n {
                                ring_rows[p % r] = Some((p, stamp));
                            }
                        }
                    }
                    let kb = MlxBuffer::from_slice(g, &k, &[n, kvh, d])?;
                    let vb = MlxBuffer::from_slice(g, &v, &[n, kvh, d])?;
                    let mut pass = g.begin();
                    cache.append(&mut pass, 0, &kb, &vb, start)?;
                    pass.commit_and_wait()?;
                    let len = start + n;
                    let exact: Vec<usize> = (SINK_POSITIONS..len)
                        .filter(|&p| ring_rows[p % r] == Some((p, cur[p])))
                        .collect();
                    let from = cache.exact_from(0);
                    assert_eq!(from, want_from, "{what}: exact_from after {start}+{n}");
                    assert_eq!(
                        exact,
                        (from.max(SINK_POSITIONS)..len).collect::<Vec<_>>(),
                        "{what}: exact positions after {start}+{n}"
                    );
                    let st = stored(g, &cache)?;
                    let (kq, vq) = cache.buffers(0)?;
                    let mut pass = g.begin();
                    let (gk, gv) =
                        kv_quant_dequant(&mut pass, f, kq, vq, cache.side(0)?, d, 0, len, from)?;
                    pass.commit_and_wait()?;
                    let (gk, gv) = (gk.to_vec::<f32>(g)?, gv.to_vec::<f32>(g)?);
                    for p in 0..len {
                        let readable = packed_slots[p % slots] == Some((p, cur[p]));
                        for h in 0..kvh {
                            let o = (p * kvh + h) * d;
                            let (yk, yv) = (&gk[o..o + d], &gv[o..o + d]);
                            let at = format!("{what}: after {start}+{n}, position {p} head {h}");
                            if p < SINK_POSITIONS || exact.contains(&p) {
                                // Sinks: f32 (two transforms, values of O(4)); the ring: f16
                                // rounding (2^-11 relative), mixed by the inverse rotation.
                                let tol = if p < SINK_POSITIONS { 1e-4 } else { 5e-3 };
                                for (y, x) in [(yk, &k_all[o..o + d]), (yv, &v_all[o..o + d])] {
                                    let x: Vec<f64> = x.iter().map(|&a| a as f64).collect();
                                    assert_close(y, &x, tol, tol, &format!("{at} exact"));
                                }
                            } else if readable {
                                let (kr, vr) = st.packed[h][p].as_ref().expect("packed row");
                                let wk: Vec<f64> = dequant(f, d, kr)
                                    .iter()
                                    .zip(&st.mean[h])
                                    .map(|(a, m)| a + m)
                                    .collect();
                                // As the append test (values of O(4) here).
                                assert_close(yk, &wk, 1e-4, 1e-4, &format!("{at} packed K"));
                                let wv = dequant(f, d, vr);
                                assert_close(yv, &wv, 1e-4, 1e-4, &format!("{at} packed V"));
                            } else {
                                // Overwritten by the sliding-window ring: outside the window.
                                assert!(
                                    window.is_some_and(|w| p + w < len),
                                    "{at}: needed but neither exact nor packed"
                                );
                            }
                        }
                    }
                }
                // Decode at the end (the last append was one token, as in generation), a
                // one-token prefill of the same query, and a three-token prefill.
                let len = cache.len(0);
                let q = rng.normals(nh * d, 0.3);
                let gq = MlxBuffer::from_slice(g, &q, &[nh, d])?;
                let gq1 = MlxBuffer::from_slice(g, &q, &[1, nh, d])?;
                let qp = rng.normals(3 * nh * d, 0.3);
                let gqp = MlxBuffer::from_slice(g, &qp, &[3, nh, d])?;
                let mut opts = SdpaOptions::new(d);
                opts.window = window;
                let mut pass = g.begin();
                let out = sdpa_decode_quant(&mut pass, &gq, &cache, 0, len, &opts)?;
                let out1 = sdpa_prefill_quant(&mut pass, &gq1, &mut cache, 0, len - 1, &opts)?;
                let outp = sdpa_prefill_quant(&mut pass, &gqp, &mut cache, 0, len - 3, &opts)?;
                pass.commit_and_wait()?;
                let st = stored(g, &cache)?;
                let (k, v) = dequant_by_pos(&cache, &st, false);
                let want = attention(&q, 1, nh, d, len - 1, &k, &v, window, None, None);
                let out = out.to_vec::<f32>(g)?;
                // As key_mean_and_sinks_follow_appends_and_rewinds (keys of O(4)).
                assert_close(&out, &want, 2e-4, 2e-4, &format!("{what} decode"));
                let want: Vec<f64> = out.iter().map(|&x| x as f64).collect();
                // The f16 scratch rounds the rows decode reads in f32 (keys of O(4): 2^-9).
                let at = format!("{what} one-token prefill vs decode");
                assert_close(&out1.to_vec::<f32>(g)?, &want, 1e-2, 1e-2, &at);
                let (k, v) = dequant_by_pos(&cache, &st, true);
                let want = attention(&qp, 3, nh, d, len - 3, &k, &v, window, None, None);
                let at = format!("{what} prefill");
                assert_close(&outp.to_vec::<f32>(g)?, &want, 1e-2, 1e-2, &at);
            }
        }
        Ok(())
    }

    // ---- attention ----

    /// Naive softmax attention in f64 for queries at positions q0..q0+t over K/V by
    /// position ([kv_heads][len] rows; None where unavailable, which must be masked).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        q: &[f32],
        t: usize,
        nh: usize,
        d: usize,
        q0: usize,
        k: &[Vec<Option<Vec<f64>>>],
        v: &[Vec<Option<Vec<f64>>>],
        window: Option<usize>,
        softcap: Option<f64>,
        sinks: Option<&[f32]>,
    ) -> Vec<f64> {
        let group = nh / k.len();
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0.0; t * nh * d];
        for ti in 0..t {
            let qp = q0 + ti;
            for h in 0..nh {
                let kh = h / group;
                let qr = &q[(ti * nh + h) * d..][..d];
                let mut ls = Vec::new();
                for kp in 0..=qp {
                    if window.is_some_and(|w| kp + w <= qp) {
                        continue;
                    }
                    let kr = k[kh][kp].as_ref().expect("needed position missing");
                    let mut s: f64 =
                        qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b).sum::<f64>() * scale;
                    if let Some(c) = softcap {
                        s = c * (s / c).tanh();
                    }
                    ls.push((kp, s));
                }
                let sink = sinks.map(|s| s[h] as f64);
                let mx = ls
                    .iter()
                    .map(|x| x.1)
                    .fold(sink.unwrap_or(f64::NEG_INFINITY), f64::max);
                let mut den = sink.map_or(0.0, |s| (s - mx).exp());
                let o = &mut out[(ti * nh + h) * d..][..d];
                for &(kp, s) in &ls {
                    let w = (s - mx).exp();
                    den += w;
                    for (oo, vv) in o.iter_mut().zip(v[kh][kp].as_ref().unwrap()) {
                        *oo += w * vv;
                    }
                }
                for oo in o.iter_mut() {
                    *oo /= den;
                }
            }
        }
        out
    }

    type ByPos = Vec<Vec<Option<Vec<f64>>>>;

    /// Reference-dequantized K and V by position (compressed keys plus the key mean; sink
    /// rows rotated back), optionally rounded to f16.
    fn dequant_by_pos(c: &CompressedKvCache, st: &Stored, f16_round: bool) -> (ByPos, ByPos) {
        let (f, d) = (c.format(), c.head_dim());
        let r = |x: Vec<f64>| -> Vec<f64> {
            if f16_round {
                x.iter().map(|&v| f16::from_f64(v).to_f64()).collect()
            } else {
                x
            }
        };
        let pick = |is_v: bool| -> ByPos {
            st.rows
                .iter()
                .zip(&st.mean)
                .map(|(hr, mu)| {
                    hr.iter()
                        .map(|o| {
                            o.as_ref().map(|(kr, vr)| {
                                let row = if is_v { vr } else { kr };
                                let mut x = dequant(f, d, row);
                                if !is_v && !matches!(row, Row::Exact(_)) {
                                    x.iter_mut().zip(mu).for_each(|(a, m)| *a += m);
                                }
                                r(x)
                            })
                        })
                        .collect()
                })
                .collect()
        };
        (pick(false), pick(true))
    }

    /// The original K/V by position.
    fn exact_by_pos(x: &[f32], kvh: usize, d: usize, len: usize) -> ByPos {
        (0..kvh)
            .map(|h| {
                (0..len)
                    .map(|p| {
                        Some(
                            x[(p * kvh + h) * d..][..d]
                                .iter()
                                .map(|&a| a as f64)
                                .collect(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    fn rel_rms(got: &[f32], want: &[f64]) -> f64 {
        let e: f64 = got
            .iter()
            .zip(want)
            .map(|(&a, b)| (a as f64 - b).powi(2))
            .sum();
        let n: f64 = want.iter().map(|b| b * b).sum();
        (e / n).sqrt()
    }

    struct Case {
        f: KvFormat,
        d: usize,
        nh: usize,
        kvh: usize,
        len: usize,
        window: Option<usize>,
        softcap: Option<f32>,
        sinks: bool,
    }

    fn case(f: KvFormat, d: usize, nh: usize, kvh: usize, len: usize) -> Case {
        Case {
            f,
            d,
            nh,
            kvh,
            len,
            window: None,
            softcap: None,
            sinks: false,
        }
    }

    #[test]
    fn decode_matches_f64_over_the_dequantized_cache() -> Result<()> {
        use KvFormat::*;
        // Lengths past RECENT_POSITIONS + SINK_POSITIONS (and windows past
        // RECENT_POSITIONS), so that decode reads packed rows as well as exact ones; a window
        // of 37 reads only the recent ring, and one position only the sinks.
        let cases = [
            case(Tq4, 128, 8, 2, 300),
            Case {
                softcap: Some(5.0),
                ..case(Tq3, 64, 12, 4, 257)
            },
            Case {
                window: Some(200),
                sinks: true,
                ..case(Tq2_5, 256, 8, 1, 400)
            },
            case(Tq2, 64, 4, 4, 1),
            case(Tq2, 64, 4, 4, 190),
            Case {
                sinks: true,
                ..case(Q8, 128, 14, 2, 200)
            },
            Case {
                window: Some(170),
                softcap: Some(30.0),
                ..case(Q4, 256, 2, 1, 350)
            },
            Case {
                window: Some(37),
                ..case(Q4, 64, 2, 1, 150)
            },
            case(Tq3, 512, 8, 1, 250),
            case(Q4, 512, 2, 2, 200),
        ];
        let mut report = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            for g in devices() {
                let mut rng = Rng::new(100 + i as u64);
                // Window layers get a ring (max_chunk 16) the appends wrap around.
                let b = build(g, &mut rng, c.f, c.kvh, c.d, c.len + 5, c.window, 16, c.len)?;
                let q = rng.normals(c.nh * c.d, 1.0);
                let sinks = rng.normals(c.nh, 1.0);
                let gq = MlxBuffer::from_slice(g, &q, &[c.nh, c.d])?;
                let gs = MlxBuffer::from_slice(g, &sinks, &[c.nh])?;
                let mut opts = SdpaOptions::new(c.d);
                opts.window = c.window;
                opts.softcap = c.softcap;
                opts.sinks = c.sinks.then_some(&gs);
                let mut pass = g.begin();
                let out = sdpa_decode_quant(&mut pass, &gq, &b.cache, 0, c.len, &opts)?;
                pass.commit_and_wait()?;
                let got = out.to_vec::<f32>(g)?;
                let st = stored(g, &b.cache)?;
                let (k, v) = dequant_by_pos(&b.cache, &st, false);
                let sk = c.sinks.then_some(&sinks[..]);
                let cap = c.softcap.map(f64::from);
                let want = attention(&q, 1, c.nh, c.d, c.len - 1, &k, &v, c.window, cap, sk);
                let what = format!(
                    "decode {} d={} heads {}/{} len {} window {:?} sg={}",
                    c.f,
                    c.d,
                    c.nh,
                    c.kvh,
                    c.len,
                    c.window,
                    g.caps().subgroups
                );
                // The reference uses exactly the stored indices and scales; what remains is
                // f32 arithmetic (rotation, dots over <= 512 terms, softmax): ~1e-6.
                assert_close(&got, &want, 1e-4, 1e-4, &what);
                let (ek, ev) = (
                    exact_by_pos(&b.k, c.kvh, c.d, c.len),
                    exact_by_pos(&b.v, c.kvh, c.d, c.len),
                );
                let exact = attention(&q, 1, c.nh, c.d, c.len - 1, &ek, &ev, c.window, cap, sk);
                report.push(format!(
                    "{what}: rel RMS vs exact {:.4}",
                    rel_rms(&got, &exact)
                ));
            }
        }
        println!("{}", report.join("\n"));
        Ok(())
    }

    #[test]
    fn decode_multi_tile_splits_match_f64() -> Result<()> {
        // Splits of several tiles (loads a tile ahead), the last ending mid-tile, windows,
        // GQA 1, 4 and 16, for each tile size decode_kt picks (64 down to 8 keys).
        use KvFormat::*;
        let cases = [
            // KT 64: 33 tiles from position 100 over 16 kv heads, 2 per split.
            Case {
                window: Some(2100),
                sinks: true,
                ..case(Tq4, 128, 16, 16, 2200)
            },
            // KT 32: 47 tiles, 2 per split over 8 kv heads x 2 head tiles.
            Case {
                softcap: Some(20.0),
                ..case(Q8, 128, 128, 8, 1500)
            },
            // KT 16, GQA 4.
            case(Q4, 512, 32, 8, 1300),
            // KT 8.
            case(Q8, 512, 8, 8, 700),
        ];
        for (i, c) in cases.iter().enumerate() {
            let kt = decode_kt(c.f, c.d);
            let tiles = (c.len - c.window.map_or(0, |w| c.len - w)).div_ceil(kt);
            let head_tiles = c.kvh * (c.nh / c.kvh).div_ceil(decode_gt(c.nh / c.kvh, c.d) as usize);
            assert!(tiles > 512 / head_tiles, "case {i}: one tile per split");
            let g = gpu();
            let mut rng = Rng::new(900 + i as u64);
            let b = build(g, &mut rng, c.f, c.kvh, c.d, c.len + 5, c.window, 16, c.len)?;
            let q = rng.normals(c.nh * c.d, 1.0);
            let sinks = rng.normals(c.nh, 1.0);
            let gq = MlxBuffer::from_slice(g, &q, &[c.nh, c.d])?;
            let gs = MlxBuffer::from_slice(g, &sinks, &[c.nh])?;
            let mut opts = SdpaOptions::new(c.d);
            opts.window = c.window;
            opts.softcap = c.softcap;
            opts.sinks = c.sinks.then_some(&gs);
            let mut pass = g.begin();
            let out = sdpa_decode_quant(&mut pass, &gq, &b.cache, 0, c.len, &opts)?;
            pass.commit_and_wait()?;
            let st = stored(g, &b.cache)?;
            let (k, v) = dequant_by_pos(&b.cache, &st, false);
            let sk = c.sinks.then_some(&sinks[..]);
            let cap = c.softcap.map(f64::from);
            let want = attention(&q, 1, c.nh, c.d, c.len - 1, &k, &v, c.window, cap, sk);
            let what = format!(
                "decode {} d={} heads {}/{} len {}",
                c.f, c.d, c.nh, c.kvh, c.len
            );
            // As decode_matches_f64_over_the_dequantized_cache.
            assert_close(&out.to_vec::<f32>(g)?, &want, 1e-4, 1e-4, &what);
        }
        Ok(())
    }

    #[test]
    fn decode_tile_matches_the_kernel() -> Result<()> {
        // The plan splits in whole tiles of decode_kt; the kernel derives KT from MODE and
        // HEAD_DIM itself. Read the kernel's value back through naga for every variant.
        for (kernel, spec) in specs()? {
            if spec.entry != "sdpa_quant_decode" {
                continue;
            }
            let src = crate::kernels::preprocess(kernel, &spec, false)?;
            let (module, info) = crate::kernels::parse_and_validate(kernel, &spec, &src)?;
            let mut constants = naga::back::PipelineConstants::default();
            for (name, value) in spec.constants() {
                constants.insert(name.to_string(), value);
            }
            let (module, _) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, spec.entry)),
                &constants,
            )
            .map_err(|e| MlxError::invalid(format!("{e:?}")))?;
            let value = |name: &str| {
                let c = module
                    .constants
                    .iter()
                    .find(|(_, c)| c.name.as_deref() == Some(name))
                    .unwrap()
                    .1;
                match module.global_expressions[c.init] {
                    naga::Expression::Literal(naga::Literal::U32(v)) => v as usize,
                    ref e => panic!("{name}: {e:?}"),
                }
            };
            let (d, m) = (value("HEAD_DIM"), value("MODE"));
            let f = KvFormat::COMPRESSED[m];
            assert_eq!(value("RW"), f.row_words(d), "{f} d={d}");
            assert_eq!(value("KT"), decode_kt(f, d), "{f} d={d}");
            // The side layout's constants are the Rust ones.
            assert_eq!(value("SINKS"), SINK_POSITIONS);
            assert_eq!(value("RECENT"), RECENT_POSITIONS);
        }
        let want = [
            (KvFormat::Q8, 512, 8),
            (KvFormat::Q4, 512, 16),
            (KvFormat::Tq2, 64, 64),
        ];
        for (f, d, kt) in want {
            assert_eq!(decode_kt(f, d), kt, "{f} d={d}");
        }
        Ok(())
    }

    #[test]
    fn prefill_matches_f64_over_the_dequantized_cache() -> Result<()> {
        use KvFormat::*;
        let g = gpu();
        // (format, d, heads, kv heads, positions before the chunk, chunk, window)
        // Past RECENT_POSITIONS, so that packed rows are read as well as exact ones (but
        // for the first chunk and the window of 7, which read only exact rows).
        let cases = [
            (Tq3, 128, 4, 2, 200, 9, None),
            (Tq2_5, 64, 6, 3, 200, 16, Some(150)),
            (Q8, 256, 2, 1, 0, 12, None),
            (Tq4, 256, 8, 2, 180, 5, Some(7)),
            (Q4, 64, 4, 1, 170, 7, Some(140)),
        ];
        for (i, &(f, d, nh, kvh, past, t, window)) in cases.iter().enumerate() {
            let mut rng = Rng::new(300 + i as u64);
            let len = past + t;
            // Appended in chunks of t: the last append is exactly the prefill chunk.
            let mut b = build(g, &mut rng, f, kvh, d, len + 3, window, t, len)?;
            let q = rng.normals(t * nh * d, 1.0);
            let gq = MlxBuffer::from_slice(g, &q, &[t, nh, d])?;
            let mut opts = SdpaOptions::new(d);
            opts.window = window;
            let mut pass = g.begin();
            let out = sdpa_prefill_quant(&mut pass, &gq, &mut b.cache, 0, past, &opts)?;
            pass.commit_and_wait()?;
            let st = stored(g, &b.cache)?;
            let (k, v) = dequant_by_pos(&b.cache, &st, true);
            let want = attention(&q, t, nh, d, past, &k, &v, window, None, None);
            // The scratch is f16: the reference rounds the same values, but GPU (f32) and
            // reference (f64) dequantization can round to neighbouring halves (2^-11
            // relative); the cooperative-matrix prefill also rounds Q and P to f16.
            let what = format!("prefill {f} d={d} heads {nh}/{kvh} past {past} t {t} {window:?}");
            assert_close(&out.to_vec(g)?, &want, 3e-3, 3e-3, &what);
        }
        Ok(())
    }

    #[test]
    fn kv_store_runs_every_format_through_one_api() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(9);
        let (kvh, d, nh) = (2, 64, 4);
        let cfg = KvCacheConfig::new(2, kvh, d, 32);
        let k = MlxBuffer::from_slice(g, &rng.normals(5 * kvh * d, 1.0), &[5, kvh, d])?;
        let q = MlxBuffer::from_slice(g, &rng.normals(nh * d, 1.0), &[nh, d])?;
        let qp = MlxBuffer::from_slice(g, &rng.normals(5 * nh * d, 1.0), &[5, nh, d])?;
        let mut outs = Vec::new();
        for f in KvFormat::ALL {
            let mut s = crate::kv_quant::KvStore::new(g, &cfg, f)?;
            assert_eq!(s.format(), f);
            let bytes = s.bytes_per_layer(1);
            // K and V, plus the side data of the compressed formats: 9 f32 rows and the
            // recent ring's 2 * 128 f16 rows per kv head.
            let side = if f.is_compressed() {
                kvh * (SIDE_ROWS * d * 4 + 2 * RECENT_POSITIONS * d * 2)
            } else {
                0
            };
            assert_eq!(
                bytes,
                (2 * kvh * 32 * f.row_words(d) * 4 + side) as u64,
                "{f}"
            );
            let mut pass = g.begin();
            s.append(&mut pass, 1, &k, &k, 0)?;
            let o = s.sdpa_decode(&mut pass, &q, 1, 5, &SdpaOptions::new(d))?;
            let op = s.sdpa_prefill(&mut pass, &qp, 1, 0, &SdpaOptions::new(d))?;
            pass.commit_and_wait()?;
            assert_eq!(s.len(1), 5);
            outs.push((f, o.to_vec::<f32>(g)?, op.to_vec::<f32>(g)?));
        }
        // Every format approximates the f32 result (wiring check; the quality on iid
        // Gaussian K/V, a hard case, is reported by the decode test).
        let (_, o32, p32) = &outs[1];
        let rel = |a: &[f32], b: &[f32]| {
            let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
            (e / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
        };
        for (f, o, p) in &outs {
            let (e, ep) = (rel(o, o32), rel(p, p32));
            println!("{f}: rel RMS vs f32: decode {e:.4}, prefill {ep:.4}");
            assert!(e < 0.7 && ep < 0.7, "{f}: {e} {ep}");
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_named() -> Result<()> {
        let g = gpu();
        let e = CompressedKvCache::new(g, &KvCacheConfig::new(1, 2, 80, 16), KvFormat::Tq3)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported: CompressedKvCache: head_dim 80 is not supported by the tq3 KV \
             format; supported head dims: 64, 128, 256, 512"
        );
        let e = CompressedKvCache::new(g, &KvCacheConfig::new(1, 2, 64, 16), KvFormat::F16)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CompressedKvCache: format f16 is not compressed; use KvCache (or KvStore)"
        );
        let mut rng = Rng::new(1);
        let mut c = CompressedKvCache::new(g, &KvCacheConfig::new(1, 2, 64, 16), KvFormat::Q4)?;
        let (kb, vb) = c.buffers(0)?;
        let sb = c.side(0)?.clone();
        let x = MlxBuffer::from_slice(g, &rng.normals(3 * 2 * 96, 1.0), &[3, 2, 96])?;
        let mut pass = g.begin();
        let e = kv_quant_append(&mut pass, KvFormat::Q4, &x, &x, kb, vb, &sb, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported: kv_quant_append: head_dim 96 is not supported by the q4 KV format; \
             supported head dims: 64, 128, 256, 512"
        );
        let x = MlxBuffer::from_slice(g, &rng.normals(3 * 2 * 64, 1.0), &[3, 2, 64])?;
        let e = kv_quant_append(&mut pass, KvFormat::Tq4, &x, &x, kb, vb, &sb, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kv_quant_append: the cache has 10 words per row but tq4 at head_dim 64 needs 9"
        );
        let e = kv_quant_append(&mut pass, KvFormat::F32, &x, &x, kb, vb, &sb, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kv_quant_append: format f32 is not a compressed KV format"
        );
        let short = sb.view(0, &[64])?;
        let e = kv_quant_append(&mut pass, KvFormat::Q4, &x, &x, kb, vb, &short, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kv_quant_append: side has 64 words, expected 2 kv heads * 8768 (9 f32 rows and \
             256 f16 rows of 64)"
        );
        let e = kv_quant_mean(&mut pass, KvFormat::Q4, &x, &short).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kv_quant_mean: side has 64 words, expected 2 kv heads * 8768 (9 f32 rows and 256 \
             f16 rows of 64)"
        );
        c.append(&mut pass, 0, &x, &x, 0)?;
        let q = MlxBuffer::from_slice(g, &rng.normals(3 * 64, 1.0), &[3, 64])?;
        let e = sdpa_decode_quant(&mut pass, &q, &c, 0, 3, &SdpaOptions::new(64)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: 3 query heads are not a multiple of 2 kv heads"
        );
        let q = MlxBuffer::from_slice(g, &rng.normals(4 * 64, 1.0), &[4, 64])?;
        let e = sdpa_decode_quant(&mut pass, &q, &c, 0, 4, &SdpaOptions::new(64)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sdpa_decode: attention needs positions up to 3 but layer 0 holds 3 positions"
        );
        pass.commit_and_wait()?;
        Ok(())
    }
}

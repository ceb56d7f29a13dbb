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
use crate::kv_quant::{check_head_dim, CompressedKvCache, KvFormat, QuantTables, QUANT_HEAD_DIMS};
use crate::ops::sdpa::SdpaOptions;

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
    _pad: u32,
    tables: QuantTables,
}
const _: () = assert!(std::mem::size_of::<KvQuantParams>() == 176);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SdpaQuantParams {
    n_heads: u32,
    kv_heads: u32,
    group: u32,
    slots: u32,
    kv_lo: u32,
    kv_hi: u32,
    split_len: u32,
    n_splits: u32,
    g_tiles: u32,
    tokens: u32,
    q0: u32,
    window: u32,
    causal: u32,
    has_mask: u32,
    mask_stride: u32,
    has_sinks: u32,
    scale: f32,
    softcap: f32,
    row_tiles: u32,
    _pad: u32,
    row_words: u32,
    inv_sqrt_d: f32,
    _pad1: [u32; 2],
    tables: QuantTables,
}
const _: () = assert!(std::mem::size_of::<SdpaQuantParams>() == 240);

const WG: u32 = 128;
/// Keys per decode tile (the decode workgroup size).
const KT: usize = 128;
const DECODE_TARGET_WGS: usize = 512;

fn mode(format: KvFormat, op: &str) -> Result<u32> {
    format.mode().ok_or_else(|| {
        MlxError::invalid(format!("{op}: format {format} is not a compressed KV format"))
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
    let gt = match group {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    };
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

fn decode_spec(head_dim: usize, mode: u32, gt: u32, subgroups: bool) -> Result<Spec> {
    Spec::new("sdpa_quant_decode", DType::U32, KT as u32)
        .with_subgroups(subgroups)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("MODE", mode)?
        .with_const("GT", gt)
}

fn reduce_spec(head_dim: usize, mode: u32) -> Result<Spec> {
    Spec::new("sdpa_quant_reduce", DType::U32, KT as u32)
        .with_const("HEAD_DIM", head_dim as u32)?
        .with_const("MODE", mode)
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for &d in &QUANT_HEAD_DIMS {
        for f in KvFormat::COMPRESSED {
            let m = mode(f, "specs")?;
            v.push((Kernel::KvQuant, quant_spec("kv_quant_append", d, m)?));
            v.push((Kernel::KvQuant, quant_spec("kv_quant_dequant", d, m)?));
            for &gt in decode_gts(d) {
                for sg in [false, true] {
                    v.push((Kernel::SdpaQuant, decode_spec(d, m, gt, sg)?));
                }
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
        _pad: 0,
        tables: QuantTables::new(format),
    })
}

/// Quantize `k_new`, `v_new` (f32 `[T, kv_heads, head_dim]`) into a compressed layer
/// (`k_cache`, `v_cache`: u32 `[kv_heads, slots, row_words]` in `format`) at positions
/// `start..start + T`, slot `position % slots`. `CompressedKvCache::append` is the usual
/// entry point (it also checks capacity and rings).
pub fn kv_quant_append(
    pass: &mut Pass,
    format: KvFormat,
    k_new: &MlxBuffer,
    v_new: &MlxBuffer,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
    start: usize,
) -> Result<()> {
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
        &[k_new, v_new, k_cache, v_cache],
        params.rows,
    )
}

/// Positions `start..start + tokens` of a compressed layer (slot `position % slots`) as f32
/// `[tokens, kv_heads, head_dim]` K and V, rotated back to the model's basis.
#[allow(clippy::too_many_arguments)]
pub fn kv_quant_dequant(
    pass: &mut Pass,
    format: KvFormat,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
    head_dim: usize,
    start: usize,
    tokens: usize,
) -> Result<(MlxBuffer, MlxBuffer)> {
    let op = "kv_quant_dequant";
    let m = mode(format, op)?;
    let (kv_heads, slots, row_words) = cache_dims(op, format, k_cache, v_cache)?;
    check_head_dim(op, format, head_dim)?;
    head_dim_of_row(op, format, row_words, head_dim)?;
    check::ensure(tokens > 0, op, || "tokens must be at least 1".into())?;
    let k = pass.alloc(DType::F32, &[tokens, kv_heads, head_dim])?;
    let v = pass.alloc(DType::F32, &[tokens, kv_heads, head_dim])?;
    let params = tables_params(
        format, tokens, kv_heads, slots, start, row_words, head_dim, op,
    )?;
    pass.dispatch(
        Kernel::KvQuant,
        quant_spec("kv_quant_dequant", head_dim, m)?,
        &params,
        &[k_cache, k_cache, k_cache, k_cache, k_cache, v_cache, &k, &v],
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

    let group = n_heads / kv_heads;
    let gt = decode_gt(group, head_dim);
    let g_tiles = group.div_ceil(gt as usize);
    let kv_len = seq_len - lo;
    let tiles = kv_len.div_ceil(KT);
    let want = DECODE_TARGET_WGS
        .div_ceil(kv_heads * g_tiles)
        .clamp(1, tiles);
    let split_len = tiles.div_ceil(want) * KT;
    let n_splits = kv_len.div_ceil(split_len);

    let part_o = pass.alloc(DType::F32, &[n_heads, n_splits, head_dim])?;
    let part_ml = pass.alloc(DType::F32, &[n_heads, n_splits, 2])?;
    let out = pass.alloc(DType::F32, &[n_heads, head_dim])?;
    let params = SdpaQuantParams {
        n_heads: n_heads as u32,
        kv_heads: kv_heads as u32,
        group: group as u32,
        slots: slots as u32,
        kv_lo: lo as u32,
        kv_hi: check::fits_u32(seq_len, op, "seq_len")?,
        split_len: split_len as u32,
        n_splits: n_splits as u32,
        g_tiles: g_tiles as u32,
        tokens: 1,
        q0: 0,
        window: opts.window.map_or(0, |w| w.min(u32::MAX as usize) as u32),
        causal: 1,
        has_mask: 0,
        mask_stride: 0,
        has_sinks: u32::from(opts.sinks.is_some()),
        scale: opts.scale,
        softcap: opts.softcap.unwrap_or(0.0),
        row_tiles: 0,
        _pad: 0,
        row_words: cache.row_words() as u32,
        inv_sqrt_d: 1.0 / (head_dim as f32).sqrt(),
        _pad1: [0; 2],
        tables: QuantTables::new(format),
    };
    let wgs = check::fits_u32(kv_heads * g_tiles * n_splits, op, "workgroups")?;
    let spec = decode_spec(head_dim, m, gt, pass.caps().subgroups)?;
    pass.dispatch(
        Kernel::SdpaQuant,
        spec,
        &params,
        &[q, k, v, &part_o, &part_ml],
        wgs,
    )?;
    let sinks = opts.sinks.unwrap_or(q);
    pass.dispatch(
        Kernel::SdpaQuant,
        reduce_spec(head_dim, m)?,
        &params,
        &[q, q, q, &part_o, &part_ml, sinks, &out],
        n_heads as u32,
    )?;
    Ok(out)
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
    let gpu = pass.gpu().clone();
    let scratch = cache.scratch(&gpu)?;
    if n > scratch.capacity() {
        return Err(MlxError::unsupported(format!(
            "{op}: an explicit mask over a compressed sliding-window layer needs all {n} \
             positions but the prefill scratch holds {}",
            scratch.capacity()
        )));
    }
    let (kf, vf) = kv_quant_dequant(pass, format, &kq, &vq, head_dim, shift, n)?;
    scratch.clear();
    scratch.append(pass, 0, &kf, &vf, 0)?;
    crate::ops::sdpa_prefill(pass, q, scratch, 0, q_start_pos - shift, opts)
}

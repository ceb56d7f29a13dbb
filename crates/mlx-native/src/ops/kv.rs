//! `kv_append`: write new K/V rows into a layer's cache buffers at a position, by kernel,
//! converting f32 activations to the cache dtype (f16 or f32). `KvCache::append` is the
//! usual entry point; this is the dispatch underneath.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KvAppendParams {
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    slots: u32,
    start: u32,
    row_words: u32,
    items: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<KvAppendParams>() == 32);

const WG: u32 = 256;

/// The dtypes a KV cache may have.
pub const KV_DTYPES: [DType; 2] = [DType::F16, DType::F32];

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    KV_DTYPES
        .iter()
        .map(|&dt| (Kernel::Kv, Spec::new("kv_append", dt, WG)))
        .collect()
}

/// Write `k_new`, `v_new` (f32 `[T, kv_heads, head_dim]`) into `k_cache`, `v_cache`
/// (`[1, kv_heads, slots, head_dim]`, f16 or f32) at positions `start..start + T`, slot
/// `position % slots`. The caller guarantees that no two of the T positions share a slot
/// (`T <= slots`); `KvCache::append` checks that and the capacity.
pub fn kv_append(
    pass: &mut Pass,
    k_new: &MlxBuffer,
    v_new: &MlxBuffer,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
    start: usize,
) -> Result<()> {
    let op = "kv_append";
    check::dtype(k_new, &[DType::F32], op, "k_new")?;
    check::dtype(v_new, &[DType::F32], op, "v_new")?;
    check::dtype(k_cache, &KV_DTYPES, op, "k_cache")?;
    check::same_shape(k_cache, v_cache, op, "k_cache", "v_cache")?;
    check::ensure(k_cache.dtype() == v_cache.dtype(), op, || {
        format!(
            "k_cache is {} but v_cache is {}",
            k_cache.dtype(),
            v_cache.dtype()
        )
    })?;
    let (batch, kv_heads, slots, head_dim) = match *k_cache.shape() {
        [b, h, s, d] => (b, h, s, d),
        _ => {
            return Err(crate::MlxError::invalid(format!(
                "{op}: k_cache has shape {:?}, expected [1, kv_heads, slots, head_dim]",
                k_cache.shape()
            )))
        }
    };
    check::ensure(batch == 1, op, || {
        format!("batch {batch} is not supported yet (1 only)")
    })?;
    check::ensure(head_dim % 2 == 0, op, || {
        format!("head_dim {head_dim} must be even")
    })?;
    let tokens = match *k_new.shape() {
        [t, h, d] if h == kv_heads && d == head_dim => t,
        _ => {
            return Err(crate::MlxError::invalid(format!(
                "{op}: k_new has shape {:?}, expected [tokens, {kv_heads}, {head_dim}]",
                k_new.shape()
            )))
        }
    };
    check::same_shape(k_new, v_new, op, "k_new", "v_new")?;
    check::ensure(tokens <= slots, op, || {
        format!("{tokens} tokens do not fit {slots} slots without overwriting each other")
    })?;
    let f16 = k_cache.dtype() == DType::F16;
    for (b, name) in [(k_cache, "k_cache"), (v_cache, "v_cache")] {
        check::ensure(!f16 || b.elem_offset() % 2 == 0, op, || {
            format!("{name} view must start on a 32-bit word")
        })?;
    }
    let row_words = if f16 { head_dim / 2 } else { head_dim };
    let items = check::fits_u32(tokens * kv_heads * row_words, op, "words")?;
    let params = KvAppendParams {
        tokens: tokens as u32,
        kv_heads: kv_heads as u32,
        head_dim: head_dim as u32,
        slots: check::fits_u32(slots, op, "slots")?,
        start: check::fits_u32(start, op, "start")?,
        row_words: row_words as u32,
        items,
        _pad: 0,
    };
    pass.dispatch(
        Kernel::Kv,
        Spec::new("kv_append", k_cache.dtype(), WG),
        &params,
        &[k_new, v_new, k_cache, v_cache],
        items.div_ceil(WG),
    )
}

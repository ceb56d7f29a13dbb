//! `KvCache`: per-layer K and V buffers on the GPU, preallocated for a caller-given capacity
//! (the engine's context size, never the model's maximum).
//!
//! Layout of each layer's K and V: `[1 (batch), kv_heads, slots, head_dim]`, f16 (default)
//! or f32, one buffer each. A position `p` lives in slot `p % slots`:
//! - full-attention layers have `slots == capacity`, so the slot is the position;
//! - sliding-window layers (Gemma 2/3, Mistral, gpt-oss) keep a ring of
//!   `window + max_chunk - 1` slots (or `capacity`, whichever is smaller): the last
//!   `window` positions before a chunk plus the chunk itself, so that every query of a
//!   prefill chunk of up to `max_chunk` tokens still finds the keys its window needs after
//!   the chunk was appended. Decode appends one token; the ring then holds more than the
//!   window, which the attention kernels ignore.
//!
//! The cache counts how many positions each layer holds (`len`). Attention kernels read
//! positions, not slots: they map each key position to its slot, and `sdpa_*` check that
//! every position they need is still present (not beyond `len`, not overwritten by the ring).

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};

/// Head dimensions the attention kernels support.
pub const SUPPORTED_HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// "64, 80, 96, 128, 256", for error messages.
pub(crate) fn supported_head_dims() -> String {
    SUPPORTED_HEAD_DIMS
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How to build a [`KvCache`].
#[derive(Clone, Debug)]
pub struct KvCacheConfig {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions the cache holds (the context size).
    pub capacity: usize,
    /// `F16` (default) or `F32`.
    pub dtype: DType,
    /// Per layer: `Some(w)` for a sliding-window layer (keys `p - w < k <= p` are visible
    /// to the query at `p`), `None` for full attention. Length `layers`.
    pub windows: Vec<Option<usize>>,
    /// Most tokens appended to a sliding-window layer in one call (the prefill chunk size).
    pub max_chunk: usize,
}

impl KvCacheConfig {
    /// Full attention on every layer, f16, prefill chunks of up to 512 tokens.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        KvCacheConfig {
            layers,
            kv_heads,
            head_dim,
            capacity,
            dtype: DType::F16,
            windows: vec![None; layers],
            max_chunk: 512,
        }
    }
}

/// One layer's storage.
#[derive(Clone, Debug)]
struct Layer {
    k: MlxBuffer,
    v: MlxBuffer,
    slots: usize,
    window: Option<usize>,
    len: usize,
}

impl Layer {
    fn ring(&self) -> RingState {
        RingState {
            len: self.len,
            slots: self.slots,
            window: self.window,
        }
    }
}

/// K and V for every layer. See the module docs for the layout.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Layer>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    dtype: DType,
    max_chunk: usize,
}

impl KvCache {
    /// Allocate every layer's K and V for `cfg.capacity` positions (rings for window layers).
    pub fn new(gpu: &MlxDevice, cfg: &KvCacheConfig) -> Result<Self> {
        let what = "KvCache";
        let bad = |m: String| Err(MlxError::invalid(format!("{what}: {m}")));
        if !crate::ops::kv::KV_DTYPES.contains(&cfg.dtype) {
            return bad(format!("dtype {} is not supported (f16 or f32)", cfg.dtype));
        }
        if !SUPPORTED_HEAD_DIMS.contains(&cfg.head_dim) {
            return bad(format!(
                "head_dim {} is not supported; supported head dims: {}",
                cfg.head_dim,
                supported_head_dims()
            ));
        }
        if cfg.layers == 0 || cfg.kv_heads == 0 || cfg.capacity == 0 || cfg.max_chunk == 0 {
            return bad(format!(
                "layers ({}), kv_heads ({}), capacity ({}) and max_chunk ({}) must be positive",
                cfg.layers, cfg.kv_heads, cfg.capacity, cfg.max_chunk
            ));
        }
        if cfg.windows.len() != cfg.layers {
            return bad(format!(
                "windows has {} entries, expected one per layer ({})",
                cfg.windows.len(),
                cfg.layers
            ));
        }
        if u32::try_from(cfg.capacity).is_err() {
            return bad(format!("capacity {} exceeds 2^32-1", cfg.capacity));
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for (i, &window) in cfg.windows.iter().enumerate() {
            let slots = match window {
                Some(0) => return bad(format!("layer {i} has a window of 0 positions")),
                Some(w) => w.saturating_add(cfg.max_chunk - 1).min(cfg.capacity),
                None => cfg.capacity,
            };
            let shape = [1, cfg.kv_heads, slots, cfg.head_dim];
            let bytes = (cfg.kv_heads * slots * cfg.head_dim * cfg.dtype.size()) as u64;
            let limit = gpu.caps().max_storage_binding;
            if bytes > limit {
                return Err(MlxError::Capacity(format!(
                    "{what}: layer {i} needs {bytes} bytes for K, over the device's \
                     storage-binding limit of {limit} bytes; lower the context size"
                )));
            }
            layers.push(Layer {
                k: MlxBuffer::new(gpu, cfg.dtype, &shape)?,
                v: MlxBuffer::new(gpu, cfg.dtype, &shape)?,
                slots,
                window,
                len: 0,
            });
        }
        Ok(KvCache {
            layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            capacity: cfg.capacity,
            dtype: cfg.dtype,
            max_chunk: cfg.max_chunk,
        })
    }

    fn layer(&self, layer: usize, op: &str) -> Result<&Layer> {
        self.layers.get(layer).ok_or_else(|| {
            MlxError::invalid(format!(
                "{op}: layer {layer} is out of range (the cache has {} layers)",
                self.layers.len()
            ))
        })
    }

    /// Write `k_new`, `v_new` (f32 `[T, kv_heads, head_dim]`) at positions
    /// `start_pos..start_pos + T` of `layer`, by kernel, converting to the cache dtype.
    /// `start_pos` may rewind (at most to `len`; on a ring layer no further back than the
    /// ring still reaches); the layer then holds `start_pos + T` positions.
    pub fn append(
        &mut self,
        pass: &mut Pass,
        layer: usize,
        k_new: &MlxBuffer,
        v_new: &MlxBuffer,
        start_pos: usize,
    ) -> Result<()> {
        let tokens = k_new.shape().first().copied().unwrap_or(0);
        self.write(layer, start_pos, tokens, "KvCache::append", |k, v| {
            crate::ops::kv::kv_append(pass, k_new, v_new, k, v, start_pos)
        })
    }

    /// The decode step's fused helper ([`crate::ops::kv::rope_append`]): the q|k|v rows of
    /// `T` tokens, q and k normalized per head (optionally) and rotated, k and v written at
    /// positions `start_pos..start_pos + T` of `layer` as [`KvCache::append`] does. Returns
    /// q, f32 `[T, n_heads, head_dim]`.
    pub fn rope_append(
        &mut self,
        pass: &mut Pass,
        layer: usize,
        args: &crate::ops::kv::RopeAppend<'_>,
        start_pos: usize,
    ) -> Result<MlxBuffer> {
        let tokens = args.qkv.shape().first().copied().unwrap_or(0);
        self.write(layer, start_pos, tokens, "KvCache::rope_append", |k, v| {
            crate::ops::kv::rope_append(pass, args, k, v, start_pos)
        })
    }

    /// Checks an append of `tokens` positions at `start_pos` to `layer`, runs `f` on the
    /// layer's K and V buffers, then records the new length.
    fn write<T>(
        &mut self,
        layer: usize,
        start_pos: usize,
        tokens: usize,
        op: &str,
        f: impl FnOnce(&MlxBuffer, &MlxBuffer) -> Result<T>,
    ) -> Result<T> {
        let capacity = self.capacity;
        let max_chunk = self.max_chunk;
        let l = self.layer(layer, op)?;
        let end = check_append(op, layer, start_pos, tokens, l.ring(), capacity, max_chunk)?;
        let out = f(&l.k, &l.v)?;
        if let Some(l) = self.layers.get_mut(layer) {
            l.len = end;
        }
        Ok(out)
    }

    /// Account for `tokens` positions at `start_pos` written to every layer by a replayed
    /// step ([`crate::Graph`]): the same checks as [`KvCache::append`] (capacity, gaps,
    /// rings), done before the replay is submitted, then the new lengths.
    pub fn advance(&mut self, start_pos: usize, tokens: usize) -> Result<()> {
        let (capacity, max_chunk) = (self.capacity, self.max_chunk);
        let op = "KvCache::advance";
        // All layers checked before any changes.
        let ends = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| check_append(op, i, start_pos, tokens, l.ring(), capacity, max_chunk))
            .collect::<Result<Vec<_>>>()?;
        for (l, end) in self.layers.iter_mut().zip(ends) {
            l.len = end;
        }
        Ok(())
    }

    /// Positions `layer` holds (the next position to append).
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }

    /// True when no layer holds any position.
    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|l| l.len == 0)
    }

    /// Forget every position of every layer (the buffers stay allocated).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.len = 0;
        }
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }

    /// Slots of `layer`'s buffers: `capacity`, or the ring size of a sliding-window layer.
    pub fn slots(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.slots)
    }

    /// The sliding window `layer` was built for (`None`: full attention).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.layers.get(layer).and_then(|l| l.window)
    }

    /// `layer`'s K and V buffers, `[1, kv_heads, slots, head_dim]`.
    pub fn buffers(&self, layer: usize) -> Result<(&MlxBuffer, &MlxBuffer)> {
        let l = self.layer(layer, "KvCache::buffers")?;
        Ok((&l.k, &l.v))
    }

    /// Check that positions `lo..hi` of `layer` are all present: `hi <= len` and none was
    /// overwritten by the ring. Returns the slot count.
    pub(crate) fn check_range(
        &self,
        op: &str,
        layer: usize,
        lo: usize,
        hi: usize,
    ) -> Result<usize> {
        let l = self.layer(layer, op)?;
        check_present(op, layer, lo, hi, l.ring())
    }
}

/// The positions a cache layer holds, as its append checks need them.
pub(crate) struct RingState {
    pub len: usize,
    pub slots: usize,
    pub window: Option<usize>,
}

/// That positions `lo..hi` are all present in a layer: `hi <= len` and none was
/// overwritten by the ring (every cache format). Returns the slot count.
pub(crate) fn check_present(
    op: &str,
    layer: usize,
    lo: usize,
    hi: usize,
    l: RingState,
) -> Result<usize> {
    if hi > l.len {
        return Err(MlxError::invalid(format!(
            "{op}: attention needs positions up to {} but layer {layer} holds {} positions",
            hi.saturating_sub(1),
            l.len
        )));
    }
    let oldest = l.len.saturating_sub(l.slots);
    if lo < oldest {
        return Err(MlxError::Capacity(format!(
            "{op}: attention needs position {lo} but layer {layer} keeps only the last {} \
             positions (a sliding-window ring; positions below {oldest} were overwritten)",
            l.slots
        )));
    }
    Ok(l.slots)
}

/// Where appending `tokens` positions at `start_pos` may go wrong, shared by every cache
/// format: past the capacity, a gap, a ring chunk larger than `max_chunk`, or a rewind further
/// back than the ring still reaches. Returns the new length.
pub(crate) fn check_append(
    op: &str,
    layer: usize,
    start_pos: usize,
    tokens: usize,
    l: RingState,
    capacity: usize,
    max_chunk: usize,
) -> Result<usize> {
    let end = start_pos.saturating_add(tokens);
    if end > capacity {
        return Err(MlxError::Capacity(format!(
            "{op}: layer {layer}: positions {start_pos}..{end} pass the cache capacity of \
             {capacity}"
        )));
    }
    if start_pos > l.len {
        return Err(MlxError::invalid(format!(
            "{op}: layer {layer}: start_pos {start_pos} leaves a gap after the {} positions \
             the layer holds",
            l.len
        )));
    }
    if l.slots < capacity {
        if tokens > max_chunk {
            return Err(MlxError::Capacity(format!(
                "{op}: layer {layer}: a chunk of {tokens} tokens exceeds max_chunk \
                 {max_chunk} of this sliding-window ring ({} slots); it would overwrite \
                 keys its own queries still need",
                l.slots
            )));
        }
        // The chunk's first query needs the `window - 1` positions before it.
        let oldest = l.len.saturating_sub(l.slots);
        let needed = (start_pos + 1).saturating_sub(l.window.unwrap_or(l.slots));
        if needed < oldest {
            return Err(MlxError::Capacity(format!(
                "{op}: layer {layer}: cannot rewind to position {start_pos}: its window \
                 needs position {needed} but the ring no longer holds positions below {oldest}"
            )));
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::testutil::{gpu, Rng};
    use half::f16;

    #[test]
    fn append_writes_rounded_rows_at_their_slots() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(31);
        for dtype in [DType::F16, DType::F32] {
            let (kvh, d, cap) = (3, 80, 20);
            let mut cfg = KvCacheConfig::new(2, kvh, d, cap);
            cfg.dtype = dtype;
            let mut cache = KvCache::new(g, &cfg)?;
            let k = rng.normals(13 * kvh * d, 3.0);
            let v = rng.normals(13 * kvh * d, 3.0);
            // Positions 0..6 then 6..13 on layer 1, through a view at an odd offset.
            let kb = MlxBuffer::from_slice(g, &k, &[13, kvh, d])?;
            let vb = MlxBuffer::from_slice(g, &v, &[13, kvh, d])?;
            let mut pass = g.begin();
            cache.append(
                &mut pass,
                1,
                &kb.view(0, &[6, kvh, d])?,
                &vb.view(0, &[6, kvh, d])?,
                0,
            )?;
            let n = 7 * kvh * d;
            let (k2, v2) = (
                kb.view(6 * kvh * d, &[7, kvh, d])?,
                vb.view(6 * kvh * d, &[7, kvh, d])?,
            );
            cache.append(&mut pass, 1, &k2, &v2, 6)?;
            pass.commit_and_wait()?;
            assert_eq!((cache.len(0), cache.len(1)), (0, 13));
            assert_eq!(n, k2.len());
            let (gk, gv) = cache.buffers(1)?;
            assert_eq!(gk.shape(), &[1, kvh, cap, d]);
            let (gk, gv) = (gk.to_f32(g)?, gv.to_f32(g)?);
            for (host, got, what) in [(&k, &gk, "K"), (&v, &gv, "V")] {
                for p in 0..13 {
                    for h in 0..kvh {
                        for i in 0..d {
                            let x = host[(p * kvh + h) * d + i];
                            // f16: round to nearest even (what WGSL's pack2x16float does on
                            // every driver we have seen); f32: exact.
                            let want = match dtype {
                                DType::F16 => f16::from_f32(x).to_f32(),
                                _ => x,
                            };
                            let got = got[(h * cap + p) * d + i];
                            assert_eq!(got, want, "{what} {dtype} position {p} head {h} dim {i}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn ring_layers_size_and_wrap() -> Result<()> {
        let g = gpu();
        let mut cfg = KvCacheConfig::new(3, 1, 64, 100);
        cfg.windows = vec![None, Some(10), Some(1000)];
        cfg.max_chunk = 4;
        let mut cache = KvCache::new(g, &cfg)?;
        assert_eq!(
            (cache.slots(0), cache.slots(1), cache.slots(2)),
            (100, 13, 100)
        );
        assert_eq!(cache.window(1), Some(10));
        let mut rng = Rng::new(3);
        let k = MlxBuffer::from_slice(g, &rng.normals(4 * 64, 1.0), &[4, 1, 64])?;
        let mut pass = g.begin();
        for p in (0..40).step_by(4) {
            cache.append(&mut pass, 1, &k, &k, p)?;
        }
        // Rewinding one decode step is fine; to where the window's keys are gone is not.
        let k1 = k.view(0, &[1, 1, 64])?;
        cache.append(&mut pass, 1, &k1, &k1, 39)?;
        let e = cache.append(&mut pass, 1, &k1, &k1, 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "capacity exceeded: KvCache::append: layer 1: cannot rewind to position 20: its \
             window needs position 11 but the ring no longer holds positions below 27"
        );
        pass.commit_and_wait()?;
        Ok(())
    }

    #[test]
    fn bad_configs_and_appends_are_named() -> Result<()> {
        let g = gpu();
        let e = KvCache::new(g, &KvCacheConfig::new(1, 2, 72, 16)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KvCache: head_dim 72 is not supported; supported head dims: 64, 80, 96, 128, 256"
        );
        let mut cfg = KvCacheConfig::new(2, 2, 64, 16);
        cfg.windows = vec![None];
        let e = KvCache::new(g, &cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KvCache: windows has 1 entries, expected one per layer (2)"
        );
        cfg.windows = vec![None, Some(0)];
        let e = KvCache::new(g, &cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KvCache: layer 1 has a window of 0 positions"
        );
        cfg.windows = vec![None, Some(4)];
        cfg.max_chunk = 2;
        cfg.dtype = DType::BF16;
        let e = KvCache::new(g, &cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KvCache: dtype bf16 is not supported (f16 or f32)"
        );
        cfg.dtype = DType::F16;
        let mut cache = KvCache::new(g, &cfg)?;
        let mut rng = Rng::new(4);
        let k3 = MlxBuffer::from_slice(g, &rng.normals(3 * 2 * 64, 1.0), &[3, 2, 64])?;
        let mut pass = g.begin();
        cache.append(&mut pass, 0, &k3, &k3, 0)?;
        let e = cache.append(&mut pass, 0, &k3, &k3, 14).unwrap_err();
        assert_eq!(
            e.to_string(),
            "capacity exceeded: KvCache::append: layer 0: positions 14..17 pass the cache \
             capacity of 16"
        );
        let e = cache.append(&mut pass, 0, &k3, &k3, 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KvCache::append: layer 0: start_pos 5 leaves a gap after the 3 positions the \
             layer holds"
        );
        let e = cache.append(&mut pass, 1, &k3, &k3, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "capacity exceeded: KvCache::append: layer 1: a chunk of 3 tokens exceeds \
             max_chunk 2 of this sliding-window ring (5 slots); it would overwrite keys its \
             own queries still need"
        );
        let bad = MlxBuffer::from_slice(g, &rng.normals(3 * 64, 1.0), &[3, 1, 64])?;
        let e = cache.append(&mut pass, 0, &bad, &bad, 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kv_append: k_new has shape [3, 1, 64], expected [tokens, 2, 64]"
        );
        let e = cache.append(&mut pass, 2, &k3, &k3, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "KvCache::append: layer 2 is out of range (the cache has 2 layers)"
        );
        pass.commit_and_wait()?;
        Ok(())
    }
}

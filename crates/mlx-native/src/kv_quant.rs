//! Compressed KV caches: TurboQuant-style rotated scalar quantization (`tq4`, `tq3`,
//! `tq2.5`, `tq2`) and llama.cpp-style affine blocks (`q8`, `q4`). See docs/KV_QUANT.md.
//!
//! - [`KvFormat`]: every KV format, f16/f32 included, with `parse("tq2.5")`.
//! - [`lloyd_max`]: the Gaussian Lloyd–Max codebooks TurboQuant uses, computed here in f64.
//! - [`CompressedKvCache`]: per-layer packed K and V (`u32` words, one row of `row_words`
//!   per (kv head, slot); rings for sliding windows exactly like [`KvCache`]).
//! - [`KvStore`]: either a plain [`KvCache`] or a [`CompressedKvCache`] behind one API
//!   (create with a format, append, `sdpa_decode`, `sdpa_prefill`): what an engine holds.
//!
//! Row layouts (u32 words, little-endian bit order), `d` = head_dim:
//! - `tq*`: word 0 = the row's L2 norm (f32 bits); then, per group of 32 rotated coordinates,
//!   one bit plane per index bit (plane b holds bit b of the 32 indices, coordinate j of the
//!   group at bit j). `tq2.5`: the first d/2 coordinates (groups `< d/64`) have 3 planes,
//!   the others 2.
//! - `q8`: d/64 words of two f16 block scales (block b in half b % 2 of word b / 2), then d/4
//!   words of four i8 (element 4w + k at byte k). x ≈ scale * q, q in -127..=127.
//! - `q4`: d/32 words (f16 scale, f16 min) per block (scale in the low half), then d/8 words
//!   of eight 4-bit q (element 8w + k at nibble k). x ≈ scale * q + min, q in 0..=15.
//!
//! Side data, every compressed format, per layer: u32 words `[kv_heads, side_words(d)]`; per
//! kv head, [`SIDE_ROWS`] f32 rows, then `2 * RECENT_POSITIONS` f16 rows (two per word,
//! element 2w in the low half of word w). f32 row 0 is the key channel mean mu_k: keys are
//! stored as k - mu_k (their large shared component would otherwise set the quantization
//! error of every key). f32 rows 1..=4 and 5..=8 are K and V of positions 0..4 kept exact
//! (attention sinks). The f16 rows are a ring of the exact K (first [`RECENT_POSITIONS`])
//! and V rows of the most recent positions (position p in ring row p % RECENT_POSITIONS;
//! KIVI's residual window); which positions it holds is [`CompressedKvCache::exact_from`].
//! Exact rows are in the decoder's basis (rotated for `tq*`) and not centered. See
//! docs/KV_QUANT.md for why and the measurements.

use std::sync::OnceLock;

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kv_cache::{check_present, KvCache, KvCacheConfig, RingState};
use crate::ops::sdpa::SdpaOptions;

/// How a KV cache stores K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvFormat {
    F16,
    F32,
    /// Affine 8-bit, symmetric, one f16 scale per 32 elements (llama.cpp q8_0): 8.5 bits.
    Q8,
    /// Affine 4-bit with f16 scale and min per 32 elements (llama.cpp q4_1): 5 bits.
    Q4,
    /// Rotated, 4-bit Lloyd–Max indices plus an f32 norm per row.
    Tq4,
    /// Rotated, 3-bit.
    Tq3,
    /// Rotated, half the coordinates at 3 bits and half at 2.
    Tq2_5,
    /// Rotated, 2-bit.
    Tq2,
}

/// Head dims the compressed formats support (the Walsh–Hadamard transform needs a power of
/// two; the affine formats share the list to keep one set of kernels).
pub const QUANT_HEAD_DIMS: [usize; 4] = [64, 128, 256, 512];

/// Seed of the fixed random sign flips applied before the Walsh–Hadamard transform.
pub const SIGN_SEED: u64 = 0x5451_4b56_2025_0001;

/// Positions `0..SINK_POSITIONS` of every layer are stored exact (f32 side rows) instead of
/// compressed: the first tokens (BOS) take a large share of the attention of every later
/// query, so their quantization error reaches every output (`SINKS` in the kernels).
pub const SINK_POSITIONS: usize = 4;

/// The most recent positions of every layer are also kept exact (f16 rows of a ring in the
/// side buffer, besides their compressed rows): the next queries attend mostly to them, so
/// their quantization error costs the most (KIVI's residual window; `RECENT` in the
/// kernels). 128 (docs/KV_QUANT.md has the measurements): f16 rows, as the f16 cache the
/// formats are scored against, half the memory of f32 (per layer and kv head
/// 2 * 128 * head_dim * 2 bytes, independent of the context length).
pub const RECENT_POSITIONS: usize = 128;

/// f32 rows per kv head at the start of a layer's side buffer: the key mean, then the sink
/// K and V rows.
pub const SIDE_ROWS: usize = 1 + 2 * SINK_POSITIONS;

/// u32 words per kv head of a layer's side buffer: [`SIDE_ROWS`] f32 rows, then the recent
/// ring's `2 * RECENT_POSITIONS` f16 rows (K, then V).
pub const fn side_words(head_dim: usize) -> usize {
    SIDE_ROWS * head_dim + RECENT_POSITIONS * head_dim
}

impl KvFormat {
    pub const ALL: [KvFormat; 8] = [
        KvFormat::F16,
        KvFormat::F32,
        KvFormat::Q8,
        KvFormat::Q4,
        KvFormat::Tq4,
        KvFormat::Tq3,
        KvFormat::Tq2_5,
        KvFormat::Tq2,
    ];

    /// The compressed formats, in kernel-mode order.
    pub const COMPRESSED: [KvFormat; 6] = [
        KvFormat::Q8,
        KvFormat::Q4,
        KvFormat::Tq4,
        KvFormat::Tq3,
        KvFormat::Tq2_5,
        KvFormat::Tq2,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            KvFormat::F16 => "f16",
            KvFormat::F32 => "f32",
            KvFormat::Q8 => "q8",
            KvFormat::Q4 => "q4",
            KvFormat::Tq4 => "tq4",
            KvFormat::Tq3 => "tq3",
            KvFormat::Tq2_5 => "tq2.5",
            KvFormat::Tq2 => "tq2",
        }
    }

    /// Parse a format name (case-insensitive): f16, f32, q8, q4, tq4, tq3, tq2.5, tq2.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        KvFormat::ALL
            .iter()
            .copied()
            .find(|f| f.name() == t)
            .ok_or_else(|| {
                MlxError::invalid(format!(
                    "unknown KV cache format `{s}`; expected one of: {}",
                    KvFormat::ALL.map(|f| f.name()).join(", ")
                ))
            })
    }

    pub const fn is_compressed(self) -> bool {
        !matches!(self, KvFormat::F16 | KvFormat::F32)
    }

    /// True for the rotated (TurboQuant) formats.
    pub const fn is_rotated(self) -> bool {
        matches!(
            self,
            KvFormat::Tq4 | KvFormat::Tq3 | KvFormat::Tq2_5 | KvFormat::Tq2
        )
    }

    /// The kernels' `MODE` constant (q8 0, q4 1, tq4 2, tq3 3, tq2.5 4, tq2 5).
    pub(crate) fn mode(self) -> Option<u32> {
        KvFormat::COMPRESSED
            .iter()
            .position(|&f| f == self)
            .map(|m| m as u32)
    }

    /// u32 words per (head, slot) row for `head_dim` (compressed formats; a multiple of 64).
    pub fn row_words(self, head_dim: usize) -> usize {
        let d = head_dim;
        match self {
            KvFormat::F16 => d / 2,
            KvFormat::F32 => d,
            KvFormat::Q8 => d / 64 + d / 4,
            KvFormat::Q4 => d / 32 + d / 8,
            KvFormat::Tq4 => 1 + d / 8,
            KvFormat::Tq3 => 1 + 3 * d / 32,
            KvFormat::Tq2_5 => 1 + 5 * d / 64,
            KvFormat::Tq2 => 1 + d / 16,
        }
    }

    /// Storage bits per element, scales and norms included.
    pub fn bits_per_element(self, head_dim: usize) -> f64 {
        32.0 * self.row_words(head_dim) as f64 / head_dim as f64
    }

    /// The codebook (ascending levels) of the 2/3/4-bit (main) indices of a rotated format.
    pub(crate) fn main_bits(self) -> usize {
        match self {
            KvFormat::Tq4 => 4,
            KvFormat::Tq3 | KvFormat::Tq2_5 => 3,
            _ => 2,
        }
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------
// Gaussian Lloyd–Max codebooks

/// erf by the everywhere-convergent series erf(x) = 2/sqrt(pi) e^{-x^2} sum 2^n x^{2n+1} /
/// (1*3*...*(2n+1)) (all terms positive: no cancellation); 1 beyond |x| = 9.
pub fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x > 9.0 {
        return 1.0;
    }
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x2).exp() * sum
}

fn pdf(x: f64) -> f64 {
    if x.is_infinite() {
        return 0.0;
    }
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

fn cdf(x: f64) -> f64 {
    if x == f64::INFINITY {
        return 1.0;
    }
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// E[X | a < X < b] for X ~ N(0, 1): (pdf(a) - pdf(b)) / (cdf(b) - cdf(a)).
pub(crate) fn centroid(a: f64, b: f64) -> f64 {
    let mass = cdf(b) - cdf(a);
    if mass <= 0.0 {
        return 0.5 * (a + b);
    }
    (pdf(a) - pdf(b)) / mass
}

fn compute_lloyd_max(bits: usize) -> Vec<f64> {
    let n = 1usize << bits;
    // Start from uniform levels over [-2.5, 2.5]; Lloyd's iteration converges linearly.
    let mut c: Vec<f64> = (0..n)
        .map(|i| -2.5 + 5.0 * (i as f64 + 0.5) / n as f64)
        .collect();
    for _ in 0..100_000 {
        let mut next = Vec::with_capacity(n);
        for i in 0..n {
            let a = if i == 0 {
                f64::NEG_INFINITY
            } else {
                0.5 * (c[i - 1] + c[i])
            };
            let b = if i + 1 == n {
                f64::INFINITY
            } else {
                0.5 * (c[i] + c[i + 1])
            };
            next.push(centroid(a, b));
        }
        let delta = c
            .iter()
            .zip(&next)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        c = next;
        if delta < 1e-14 {
            break;
        }
    }
    c
}

/// The Lloyd–Max (MSE-optimal scalar) quantizer of N(0, 1) with `2^bits` levels, ascending,
/// for bits 2, 3 or 4; computed once in f64 (Lloyd iteration on the exact Gaussian cell
/// centroids, erf from [`erf`]). Other `bits` give an empty slice.
pub fn lloyd_max(bits: usize) -> &'static [f64] {
    static BOOKS: [OnceLock<Vec<f64>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    match bits {
        2..=4 => BOOKS[bits - 2].get_or_init(|| compute_lloyd_max(bits)),
        _ => &[],
    }
}

/// The fixed random signs (true = flip) applied to coordinates 0..512 before the transform:
/// splitmix64 from [`SIGN_SEED`], one bit per coordinate; a head dim d uses the first d.
pub fn sign_words() -> [u32; 16] {
    let mut s = SIGN_SEED;
    let mut out = [0u32; 16];
    for w in out.iter_mut() {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        *w = z as u32;
    }
    out
}

/// Codebooks and signs as the kernels' uniform blocks take them.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
pub(crate) struct QuantTables {
    /// Main codebook (up to 16 levels, ascending; unused entries 0).
    pub cb: [f32; 16],
    /// The 2-bit codebook for the low half of tq2.5.
    pub cb2: [f32; 4],
    pub signs: [u32; 16],
}
const _: () = assert!(std::mem::size_of::<QuantTables>() == 144);

impl QuantTables {
    pub(crate) fn new(format: KvFormat) -> Self {
        let mut t = QuantTables {
            signs: sign_words(),
            ..QuantTables::default()
        };
        if format.is_rotated() {
            for (o, &c) in t.cb.iter_mut().zip(lloyd_max(format.main_bits())) {
                *o = c as f32;
            }
            for (o, &c) in t.cb2.iter_mut().zip(lloyd_max(2)) {
                *o = c as f32;
            }
        }
        t
    }
}

// ---------------------------------------------------------------------------------------
// The compressed cache

#[derive(Clone, Debug)]
struct QLayer {
    k: MlxBuffer,
    v: MlxBuffer,
    /// u32 `[kv_heads, side_words(head_dim)]`: the key mean (set by the append that covers
    /// position `SINK_POSITIONS`, from its rows), the exact sink rows and the recent ring.
    side: MlxBuffer,
    slots: usize,
    window: Option<usize>,
    len: usize,
    /// Positions `exact_from..len` are held exact by the recent ring (see `append`).
    exact_from: usize,
}

impl QLayer {
    fn ring(&self) -> RingState {
        RingState {
            len: self.len,
            slots: self.slots,
            window: self.window,
        }
    }
}

/// K and V of every layer in a compressed format. Same positions, rings, rewinds and checks
/// as [`KvCache`]; each layer's K and V are u32 `[kv_heads, slots, row_words]`.
#[derive(Clone, Debug)]
pub struct CompressedKvCache {
    layers: Vec<QLayer>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    format: KvFormat,
    max_chunk: usize,
    /// f16 scratch of one layer for `sdpa_prefill` (allocated on first use).
    scratch: Option<KvCache>,
}

impl CompressedKvCache {
    /// Allocate every layer for `cfg.capacity` positions in `format` (`cfg.dtype` is ignored).
    pub fn new(gpu: &MlxDevice, cfg: &KvCacheConfig, format: KvFormat) -> Result<Self> {
        let what = "CompressedKvCache";
        let bad = |m: String| Err(MlxError::invalid(format!("{what}: {m}")));
        if !format.is_compressed() {
            return bad(format!(
                "format {format} is not compressed; use KvCache (or KvStore)"
            ));
        }
        check_head_dim(what, format, cfg.head_dim)?;
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
        let rw = format.row_words(cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.layers);
        for (i, &window) in cfg.windows.iter().enumerate() {
            let slots = match window {
                Some(0) => return bad(format!("layer {i} has a window of 0 positions")),
                Some(w) => w.saturating_add(cfg.max_chunk - 1).min(cfg.capacity),
                None => cfg.capacity,
            };
            let shape = [cfg.kv_heads, slots, rw];
            let bytes = (cfg.kv_heads * slots * rw * 4) as u64;
            let limit = gpu.caps().max_storage_binding;
            if bytes > limit {
                return Err(MlxError::Capacity(format!(
                    "{what}: layer {i} needs {bytes} bytes for K, over the device's \
                     storage-binding limit of {limit} bytes; lower the context size"
                )));
            }
            layers.push(QLayer {
                k: MlxBuffer::new(gpu, DType::U32, &shape)?,
                v: MlxBuffer::new(gpu, DType::U32, &shape)?,
                side: MlxBuffer::new(gpu, DType::U32, &[cfg.kv_heads, side_words(cfg.head_dim)])?,
                slots,
                window,
                len: 0,
                exact_from: 0,
            });
        }
        Ok(CompressedKvCache {
            layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            capacity: cfg.capacity,
            format,
            max_chunk: cfg.max_chunk,
            scratch: None,
        })
    }

    fn layer(&self, layer: usize, op: &str) -> Result<&QLayer> {
        self.layers.get(layer).ok_or_else(|| {
            MlxError::invalid(format!(
                "{op}: layer {layer} is out of range (the cache has {} layers)",
                self.layers.len()
            ))
        })
    }

    /// Quantize `k_new`, `v_new` (f32 `[T, kv_heads, head_dim]`) into positions
    /// `start_pos..start_pos + T` of `layer`, by kernel. Same rules as [`KvCache::append`].
    ///
    /// The recent ring: the append writes the exact rows of its positions at and after
    /// `end - RECENT_POSITIONS` (`end = start_pos + T`) to ring row `position %
    /// RECENT_POSITIONS`. Afterwards the ring holds exactly positions
    /// `max(min(exact_from, start_pos), end - RECENT_POSITIONS)..end` (the new
    /// [`Self::exact_from`]): a position below `start_pos` stays exact only if it was exact
    /// before and no position of this append shares its ring row. A rewind therefore keeps
    /// the positions that the rewound-away ones had not overwritten, and one to before
    /// `exact_from` leaves only the new positions exact; every other position is read from its
    /// compressed row, which every append writes for every position past the sinks.
    pub fn append(
        &mut self,
        pass: &mut Pass,
        layer: usize,
        k_new: &MlxBuffer,
        v_new: &MlxBuffer,
        start_pos: usize,
    ) -> Result<()> {
        let op = "CompressedKvCache::append";
        let capacity = self.capacity;
        let max_chunk = self.max_chunk;
        let format = self.format;
        let l = self.layer(layer, op)?;
        let end = crate::kv_cache::check_append(
            op,
            layer,
            start_pos,
            k_new.shape().first().copied().unwrap_or(0),
            l.ring(),
            capacity,
            max_chunk,
        )?;
        // The append that covers the first compressed position sets the key mean from all
        // its rows (sink rows included: measured slightly better than without, on two
        // texts). Every later compressed row comes after it, and an append that rewinds to
        // or before that position rewrites all of them: stored rows and mean always match.
        if (start_pos..end).contains(&SINK_POSITIONS) {
            crate::ops::kv_quant::kv_quant_mean(pass, format, k_new, &l.side)?;
        }
        crate::ops::kv_quant::kv_quant_append(
            pass, format, k_new, v_new, &l.k, &l.v, &l.side, start_pos,
        )?;
        if let Some(l) = self.layers.get_mut(layer) {
            l.exact_from = l
                .exact_from
                .min(start_pos)
                .max(end.saturating_sub(RECENT_POSITIONS));
            l.len = end;
        }
        Ok(())
    }

    /// Positions `layer` holds.
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }

    /// The first position of `layer` held exact by the recent ring: positions
    /// `exact_from..len` (at most [`RECENT_POSITIONS`] of them) are read from exact rows,
    /// like the sinks; the others past the sinks from their compressed rows.
    pub fn exact_from(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.exact_from)
    }

    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|l| l.len == 0)
    }

    /// Forget every position (buffers stay allocated).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.len = 0;
            l.exact_from = 0;
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

    pub fn format(&self) -> KvFormat {
        self.format
    }

    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }

    pub fn slots(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.slots)
    }

    pub fn window(&self, layer: usize) -> Option<usize> {
        self.layers.get(layer).and_then(|l| l.window)
    }

    /// u32 words per (head, slot) row.
    pub fn row_words(&self) -> usize {
        self.format.row_words(self.head_dim)
    }

    /// Bytes of K plus V of `layer`, side data (key mean, sinks, recent ring) included (0 for
    /// a layer out of range).
    pub fn bytes_per_layer(&self, layer: usize) -> u64 {
        self.layers
            .get(layer)
            .map_or(0, |l| l.k.byte_len() + l.v.byte_len() + l.side.byte_len())
    }

    /// Bytes of the prefill scratch (one f16 layer; 0 until the first `sdpa_prefill`).
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch.as_ref().map_or(0, |s| {
            s.buffers(0).map_or(0, |(k, v)| k.byte_len() + v.byte_len())
        })
    }

    /// `layer`'s packed K and V, u32 `[kv_heads, slots, row_words]`.
    pub fn buffers(&self, layer: usize) -> Result<(&MlxBuffer, &MlxBuffer)> {
        let l = self.layer(layer, "CompressedKvCache::buffers")?;
        Ok((&l.k, &l.v))
    }

    /// `layer`'s side data, u32 `[kv_heads, side_words(head_dim)]`: per kv head, f32 row 0
    /// the key mean, f32 rows `1..=SINK_POSITIONS` the exact K rows of positions
    /// `0..SINK_POSITIONS`, then their V rows, then the recent ring's f16 K rows and V rows
    /// (exact rows rotated for `tq*`, as the decoder reads them). See the module docs.
    pub fn side(&self, layer: usize) -> Result<&MlxBuffer> {
        Ok(&self.layer(layer, "CompressedKvCache::side")?.side)
    }

    /// Check that positions `lo..hi` of `layer` are present; returns the slot count.
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

    /// The f16 prefill scratch, allocated on first use for the longest range a prefill can
    /// need: `capacity` if a layer has full attention, else the largest ring.
    pub(crate) fn scratch(&mut self, gpu: &MlxDevice) -> Result<&mut KvCache> {
        if self.scratch.is_none() {
            let cap = self.layers.iter().map(|l| l.slots).max().unwrap_or(1);
            let cfg = KvCacheConfig::new(1, self.kv_heads, self.head_dim, cap);
            self.scratch = Some(KvCache::new(gpu, &cfg)?);
        }
        self.scratch
            .as_mut()
            .ok_or_else(|| MlxError::Gpu("prefill scratch missing".into()))
    }
}

/// A compressed format's head dim must be one of [`QUANT_HEAD_DIMS`].
pub(crate) fn check_head_dim(op: &str, format: KvFormat, head_dim: usize) -> Result<()> {
    if QUANT_HEAD_DIMS.contains(&head_dim) {
        return Ok(());
    }
    Err(MlxError::unsupported(format!(
        "{op}: head_dim {head_dim} is not supported by the {format} KV format; supported \
         head dims: {}",
        QUANT_HEAD_DIMS.map(|d| d.to_string()).join(", ")
    )))
}

// ---------------------------------------------------------------------------------------
// One handle for either kind of cache

/// A KV cache in any [`KvFormat`]: what an engine holds. Every method dispatches to
/// [`KvCache`] (f16, f32) or [`CompressedKvCache`] (the rest).
#[derive(Clone, Debug)]
pub enum KvStore {
    Plain(KvCache),
    Compressed(CompressedKvCache),
}

impl KvStore {
    /// A cache for `cfg` in `format` (`cfg.dtype` is replaced by the format).
    pub fn new(gpu: &MlxDevice, cfg: &KvCacheConfig, format: KvFormat) -> Result<Self> {
        match format {
            KvFormat::F16 | KvFormat::F32 => {
                let mut c = cfg.clone();
                c.dtype = if format == KvFormat::F16 {
                    DType::F16
                } else {
                    DType::F32
                };
                Ok(KvStore::Plain(KvCache::new(gpu, &c)?))
            }
            _ => Ok(KvStore::Compressed(CompressedKvCache::new(
                gpu, cfg, format,
            )?)),
        }
    }

    /// [`KvCache::advance`] for a replayed step; a compressed cache is never replayed (its
    /// ops refuse capture), so it reports that.
    pub fn advance(&mut self, start_pos: usize, tokens: usize) -> Result<()> {
        match self {
            KvStore::Plain(c) => c.advance(start_pos, tokens),
            KvStore::Compressed(_) => Err(MlxError::Unsupported(
                "KvStore::advance: a compressed KV cache is not replayed".into(),
            )),
        }
    }

    /// Positions the cache holds.
    pub fn capacity(&self) -> usize {
        match self {
            KvStore::Plain(c) => c.capacity(),
            KvStore::Compressed(c) => c.capacity(),
        }
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        match self {
            KvStore::Plain(c) => c.layers(),
            KvStore::Compressed(c) => c.layers(),
        }
    }

    /// Most tokens one append may bring (the prefill chunk size).
    pub fn max_chunk(&self) -> usize {
        match self {
            KvStore::Plain(c) => c.max_chunk(),
            KvStore::Compressed(c) => c.max_chunk(),
        }
    }

    pub fn format(&self) -> KvFormat {
        match self {
            KvStore::Plain(c) if c.dtype() == DType::F32 => KvFormat::F32,
            KvStore::Plain(_) => KvFormat::F16,
            KvStore::Compressed(c) => c.format(),
        }
    }

    /// See [`KvCache::append`].
    pub fn append(
        &mut self,
        pass: &mut Pass,
        layer: usize,
        k_new: &MlxBuffer,
        v_new: &MlxBuffer,
        start_pos: usize,
    ) -> Result<()> {
        match self {
            KvStore::Plain(c) => c.append(pass, layer, k_new, v_new, start_pos),
            KvStore::Compressed(c) => c.append(pass, layer, k_new, v_new, start_pos),
        }
    }

    /// See [`crate::ops::sdpa_decode`].
    pub fn sdpa_decode(
        &self,
        pass: &mut Pass,
        q: &MlxBuffer,
        layer: usize,
        seq_len: usize,
        opts: &SdpaOptions<'_>,
    ) -> Result<MlxBuffer> {
        match self {
            KvStore::Plain(c) => crate::ops::sdpa_decode(pass, q, c, layer, seq_len, opts),
            KvStore::Compressed(c) => {
                crate::ops::kv_quant::sdpa_decode_quant(pass, q, c, layer, seq_len, opts)
            }
        }
    }

    /// See [`crate::ops::sdpa::sdpa_decode_xq`]: the output also quantized in `form` for o's
    /// matvec, where the cache is plain and the head dim a multiple of 32; None otherwise
    /// (then [`KvStore::sdpa_decode`]).
    pub fn sdpa_decode_xq(
        &self,
        pass: &mut Pass,
        q: &MlxBuffer,
        layer: usize,
        seq_len: usize,
        opts: &SdpaOptions<'_>,
        form: crate::ops::XqForm,
    ) -> Result<Option<(MlxBuffer, crate::ops::QuantizedX)>> {
        match self {
            KvStore::Plain(c) if q.shape().last().is_some_and(|d| d % 32 == 0) => Ok(Some(
                crate::ops::sdpa::sdpa_decode_xq(pass, q, c, layer, seq_len, opts, form)?,
            )),
            _ => Ok(None),
        }
    }

    /// See [`crate::ops::sdpa_prefill`]. `&mut`: a compressed cache reuses a scratch layer.
    pub fn sdpa_prefill(
        &mut self,
        pass: &mut Pass,
        q: &MlxBuffer,
        layer: usize,
        q_start_pos: usize,
        opts: &SdpaOptions<'_>,
    ) -> Result<MlxBuffer> {
        match self {
            KvStore::Plain(c) => crate::ops::sdpa_prefill(pass, q, c, layer, q_start_pos, opts),
            KvStore::Compressed(c) => {
                crate::ops::kv_quant::sdpa_prefill_quant(pass, q, c, layer, q_start_pos, opts)
            }
        }
    }

    pub fn len(&self, layer: usize) -> usize {
        match self {
            KvStore::Plain(c) => c.len(layer),
            KvStore::Compressed(c) => c.len(layer),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            KvStore::Plain(c) => c.is_empty(),
            KvStore::Compressed(c) => c.is_empty(),
        }
    }

    pub fn clear(&mut self) {
        match self {
            KvStore::Plain(c) => c.clear(),
            KvStore::Compressed(c) => c.clear(),
        }
    }

    /// Bytes of K plus V of `layer`.
    pub fn bytes_per_layer(&self, layer: usize) -> u64 {
        match self {
            KvStore::Plain(c) => c
                .buffers(layer)
                .map_or(0, |(k, v)| k.byte_len() + v.byte_len()),
            KvStore::Compressed(c) => c.bytes_per_layer(layer),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn lloyd_max_codebooks_are_fixed_points_with_the_known_levels() {
        let known: [(usize, &[f64]); 3] = [
            (2, &[0.4528, 1.5104]),
            (3, &[0.2451, 0.7560, 1.3439, 2.1520]),
            (4, &[2.7326]),
        ];
        for (bits, want) in known {
            let c = lloyd_max(bits);
            let n = 1 << bits;
            assert_eq!(c.len(), n);
            // Fixed point: every level is the centroid of its nearest-neighbour cell.
            for i in 0..n {
                let a = if i == 0 {
                    f64::NEG_INFINITY
                } else {
                    0.5 * (c[i - 1] + c[i])
                };
                let b = if i + 1 == n {
                    f64::INFINITY
                } else {
                    0.5 * (c[i] + c[i + 1])
                };
                assert!(
                    (centroid(a, b) - c[i]).abs() < 1e-6,
                    "{bits}-bit level {i}: {} vs centroid {}",
                    c[i],
                    centroid(a, b)
                );
                // Symmetric about 0.
                assert!((c[i] + c[n - 1 - i]).abs() < 1e-9);
            }
            // Known positive levels (Max 1960), to the 4 decimals published.
            let pos: Vec<f64> = c[n / 2..].to_vec();
            let check: Vec<f64> = if bits == 4 {
                vec![pos[pos.len() - 1]]
            } else {
                pos
            };
            for (g, w) in check.iter().zip(want) {
                assert!((g - w).abs() < 6e-5, "{bits}-bit: level {g} vs known {w}");
            }
        }
        assert!(lloyd_max(5).is_empty());
        // erf against known values.
        assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
        assert!((erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-15);
    }

    #[test]
    fn formats_parse_and_name_the_choices() {
        for f in KvFormat::ALL {
            assert_eq!(KvFormat::parse(f.name()).unwrap(), f);
        }
        assert_eq!(KvFormat::parse("TQ2.5").unwrap(), KvFormat::Tq2_5);
        assert_eq!(
            KvFormat::parse("tq5").unwrap_err().to_string(),
            "unknown KV cache format `tq5`; expected one of: f16, f32, q8, q4, tq4, tq3, \
             tq2.5, tq2"
        );
        let bits: Vec<f64> = KvFormat::COMPRESSED
            .iter()
            .map(|f| f.bits_per_element(128))
            .collect();
        assert_eq!(bits, vec![8.5, 5.0, 4.25, 3.25, 2.75, 2.25]);
    }
}

//! `GgmlWeight`: a GGUF tensor (GGML block type or F32/F16/BF16) resident on the GPU, repacked
//! at upload into a layout whose every field the kernels read as aligned u32 words, and split
//! by rows into shards that each fit one storage binding.
//!
//! # Layouts
//! Per shard, one buffer of u32 words:
//! - **raw**: the GGML blocks unchanged, back to back. Used where the block size is a multiple
//!   of 4 bytes and every field is 4-byte aligned inside it: Q4_1 (20 B), Q5_1 (24 B), Q2_K
//!   (84 B), Q4_K (144 B), Q5_K (176 B); and the dense types (F32, F16, BF16: rows of K
//!   elements back to back, the last word zero-padded).
//! - **split**: the block with its f16 scale `d` taken out (the "body", a multiple of 4 bytes,
//!   other fields in their GGML order) for every block of the shard, then the scales of all
//!   blocks as a packed f16 array starting at word `scale_off` (block `b`'s scale is half
//!   `b & 1` of word `scale_off + b / 2`). Used for Q4_0 (body 16 B), Q5_0 (20 B), Q8_0
//!   (32 B), Q3_K (108 B) and Q6_K (208 B), whose 18/22/34/110/210-byte blocks would put
//!   quants at unaligned offsets. Taking the scale out costs no bytes, unlike padding each
//!   block to a multiple of 4 (+11 % for Q4_0): the decode matvec reads exactly the bytes
//!   GGUF stores.
//!
//! Blocks are numbered row-major within a shard: block `b` of the shard's row `r` is
//! `r * (K / block_elems) + b`.
//!
//! # Shards
//! A tensor whose repacked bytes exceed `Caps::max_storage_binding` (128 MiB on lavapipe;
//! Gemma 3's 178 MB Q8_0 `token_embd`) is split into shards of whole rows, each its own
//! buffer. Ops dispatch once per shard and write their rows' output columns (matvec,
//! matmul) or gathered rows (embedding). A single row must fit one binding.

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::error::{MlxError, Result};
use crate::weights::ggml::GgmlType;
use crate::weights::gguf::GgufFile;

/// How a type's blocks are stored on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Blocks (or dense elements) unchanged.
    Raw,
    /// The f16 scale at byte `d_at` of each block moved to a trailing scale array.
    Split { d_at: usize },
}

pub(crate) fn layout(kind: GgmlType) -> Layout {
    match kind {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Layout::Split { d_at: 0 },
        GgmlType::Q3_K => Layout::Split { d_at: 108 },
        GgmlType::Q6_K => Layout::Split { d_at: 208 },
        GgmlType::F32
        | GgmlType::F16
        | GgmlType::BF16
        | GgmlType::Q4_1
        | GgmlType::Q5_1
        | GgmlType::Q2_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K => Layout::Raw,
    }
}

/// Bytes of `rows` rows of `k` elements after repacking (always a multiple of 4).
fn repacked_bytes(kind: GgmlType, rows: u64, k: u64) -> Option<u64> {
    let row = kind.row_bytes(k).ok()?;
    let n = rows.checked_mul(row)?;
    // Both layouts store exactly the GGML bytes, rounded up to a whole word (split: the
    // bodies are whole words, the f16 scale array is rounded up).
    Some(n.div_ceil(4) * 4)
}

/// Repack `rows` consecutive rows (`bytes`, GGML layout) into the GPU layout, as words.
pub(crate) fn repack(kind: GgmlType, bytes: &[u8]) -> Vec<u32> {
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() + 4);
    match layout(kind) {
        Layout::Raw => out.extend_from_slice(bytes),
        Layout::Split { d_at } => {
            let bb = kind.block_bytes();
            for blk in bytes.chunks_exact(bb) {
                out.extend_from_slice(&blk[..d_at]);
                out.extend_from_slice(&blk[d_at + 2..]);
            }
            for blk in bytes.chunks_exact(bb) {
                out.extend_from_slice(&blk[d_at..d_at + 2]);
            }
        }
    }
    out.resize(out.len().div_ceil(4) * 4, 0);
    out.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Word offset of the scale array in a shard of `blocks` blocks (0 for raw layouts).
pub(crate) fn scale_offset(kind: GgmlType, blocks: usize) -> usize {
    match layout(kind) {
        Layout::Raw => 0,
        Layout::Split { .. } => blocks * (kind.block_bytes() - 2) / 4,
    }
}

/// One row range of a weight, in its own GPU buffer.
#[derive(Clone, Debug)]
pub struct GgmlShard {
    /// First row of the tensor in this shard.
    pub row0: usize,
    /// Rows in this shard.
    pub rows: usize,
    /// The repacked words (`DType::U32`).
    pub buffer: MlxBuffer,
    /// Word offset of the f16 scale array (split layouts; 0 otherwise).
    pub scale_off: usize,
}

/// A GGUF weight matrix on the GPU: `kind`, logical shape `[N rows, K cols]`, shards.
#[derive(Clone, Debug)]
pub struct GgmlWeight {
    kind: GgmlType,
    shape: [usize; 2],
    shards: Vec<GgmlShard>,
}

impl GgmlWeight {
    /// Upload a tensor of `kind` and row-major `shape` (`[N, K]`, or `[K]` for one row) from
    /// its GGUF bytes, repacking and splitting by rows as the device's binding limit needs.
    pub fn upload(gpu: &MlxDevice, kind: GgmlType, shape: &[usize], bytes: &[u8]) -> Result<Self> {
        Self::upload_with_limit(gpu, kind, shape, bytes, gpu.caps().max_storage_binding)
    }

    /// Tensors of one type and width (`parts`: their GGUF bytes, `k` columns each) stacked
    /// along rows and uploaded as one weight, plus each part as a view of it (the parts
    /// share its memory): one matvec then computes several projections of the same input.
    /// `None` when the stack needs more than one shard or a part would not start on a word
    /// (upload the parts separately then).
    pub fn upload_stacked(
        gpu: &MlxDevice,
        kind: GgmlType,
        k: usize,
        parts: &[&[u8]],
    ) -> Result<Option<(Self, Vec<Self>)>> {
        let op = "GgmlWeight::upload_stacked";
        let row = kind
            .row_bytes(k as u64)
            .map_err(|e| MlxError::invalid(format!("{op}: {e}")))? as usize;
        let mut rows = Vec::with_capacity(parts.len());
        for (i, b) in parts.iter().enumerate() {
            if row == 0 || b.len() % row != 0 || b.is_empty() {
                return Err(MlxError::invalid(format!(
                    "{op}: part {i} has {} bytes, not a whole number of {kind} rows of {k}",
                    b.len()
                )));
            }
            rows.push(b.len() / row);
        }
        let n: usize = rows.iter().sum();
        // Word offsets of a part's first row: its body, and (split layouts) its scales.
        let bpr = k / kind.block_elems().max(1);
        let (body_row, scale_row) = match layout(kind) {
            Layout::Raw => (row, 0),
            Layout::Split { .. } => (bpr * (kind.block_bytes() - 2), bpr * 2),
        };
        if !body_row.is_multiple_of(4) || !scale_row.is_multiple_of(4) {
            return Ok(None);
        }
        if repacked_bytes(kind, n as u64, k as u64)
            .is_none_or(|b| b > gpu.caps().max_storage_binding.min(1 << 31))
        {
            return Ok(None);
        }
        let bytes = parts.concat();
        let fused = Self::upload(gpu, kind, &[n, k], &bytes)?;
        let [shard] = &fused.shards[..] else {
            return Ok(None);
        };
        let words = shard.buffer.len();
        let mut views = Vec::with_capacity(parts.len());
        let mut r0 = 0;
        for &r in &rows {
            let body = r0 * body_row / 4;
            views.push(GgmlWeight {
                kind,
                shape: [r, k],
                shards: vec![GgmlShard {
                    row0: 0,
                    rows: r,
                    buffer: shard.buffer.view(body, &[words - body])?,
                    // The part's scales, counted from the view's start.
                    scale_off: match layout(kind) {
                        Layout::Raw => 0,
                        Layout::Split { .. } => shard.scale_off + r0 * scale_row / 4 - body,
                    },
                }],
            });
            r0 += r;
        }
        Ok(Some((fused, views)))
    }

    /// [`GgmlWeight::upload`] of the GGUF tensor `name`.
    pub fn from_gguf(gpu: &MlxDevice, file: &GgufFile, name: &str) -> Result<Self> {
        let t = file
            .tensor(name)
            .ok_or_else(|| MlxError::format(file.name(), format!("no tensor named '{name}'")))?;
        Self::upload(gpu, t.kind, &t.shape, file.tensor_bytes(name)?)
            .map_err(|e| MlxError::format(file.name(), format!("tensor '{name}': {e}")))
    }

    fn upload_with_limit(
        gpu: &MlxDevice,
        kind: GgmlType,
        shape: &[usize],
        bytes: &[u8],
        max_binding: u64,
    ) -> Result<Self> {
        let op = "GgmlWeight::upload";
        let [n, k] = match *shape {
            [k] => [1, k],
            [n, k] => [n, k],
            _ => {
                return Err(MlxError::invalid(format!(
                    "{op}: shape {shape:?} is not [rows, cols]"
                )))
            }
        };
        if n == 0 || k == 0 {
            return Err(MlxError::invalid(format!(
                "{op}: shape {shape:?} has a zero-size dimension"
            )));
        }
        if n > u32::MAX as usize || k > u32::MAX as usize {
            return Err(MlxError::invalid(format!(
                "{op}: shape {shape:?} exceeds 2^32-1 rows or columns"
            )));
        }
        let row = kind
            .row_bytes(k as u64)
            .map_err(|e| MlxError::invalid(format!("{op}: {e}")))?;
        let want = row.checked_mul(n as u64);
        if want != Some(bytes.len() as u64) {
            let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
            return Err(MlxError::invalid(format!(
                "{op}: {kind} {shape:?} needs {want} bytes, got {}",
                bytes.len()
            )));
        }
        // Word indices in the kernels are u32: cap shards at 2 GiB whatever the device says.
        let limit = max_binding.min(1 << 31);
        let one = repacked_bytes(kind, 1, k as u64).unwrap_or(u64::MAX);
        if one > limit {
            return Err(MlxError::invalid(format!(
                "{op}: one {kind} row of {k} elements needs {one} bytes, more than the \
                 storage-binding limit of {limit} bytes"
            )));
        }
        // Largest row count whose repacked size fits (monotone in rows; `one` fits).
        let mut per = (limit / row.max(1)).clamp(1, n as u64);
        while per > 1 && repacked_bytes(kind, per, k as u64).is_none_or(|b| b > limit) {
            per -= 1;
        }
        let per = per as usize;
        let row = row as usize;
        let mut shards = Vec::with_capacity(n.div_ceil(per));
        let mut row0 = 0;
        while row0 < n {
            let rows = per.min(n - row0);
            let words = repack(kind, &bytes[row0 * row..(row0 + rows) * row]);
            let buffer = MlxBuffer::from_slice(gpu, &words, &[words.len()])?;
            let blocks = rows * (k / kind.block_elems());
            shards.push(GgmlShard {
                row0,
                rows,
                buffer,
                scale_off: scale_offset(kind, blocks),
            });
            row0 += rows;
        }
        Ok(GgmlWeight {
            kind,
            shape: [n, k],
            shards,
        })
    }

    /// The GGML type.
    pub fn kind(&self) -> GgmlType {
        self.kind
    }

    /// `[N rows, K cols]`.
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }

    /// Rows (N): outputs of a matvec, entries of an embedding table.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Columns (K): inputs of a matvec, width of an embedding.
    pub fn cols(&self) -> usize {
        self.shape[1]
    }

    /// The row ranges and their buffers, in row order.
    pub fn shards(&self) -> &[GgmlShard] {
        &self.shards
    }

    /// Bytes held on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        // The weight's own rows (a view into a stacked weight binds up to the stack's end).
        self.shards
            .iter()
            .map(|s| repacked_bytes(self.kind, s.rows as u64, self.shape[1] as u64).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::testutil::{gpu, Rng};
    use half::f16;

    /// Byte offsets of the f16 fields of a block that must hold finite values.
    fn half_fields(kind: GgmlType) -> &'static [usize] {
        match kind {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            _ => &[],
        }
    }

    /// Random blocks with finite random scales (as the gguf fixture script makes them);
    /// dense types get random finite values of moderate size.
    pub(crate) fn random_tensor(rng: &mut Rng, kind: GgmlType, n: usize, k: usize) -> Vec<u8> {
        let len = kind.row_bytes(k as u64).unwrap() as usize * n;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let put = |b: &mut [u8], at: usize, x: f32, kind: GgmlType| match kind {
            GgmlType::F32 => b[at..at + 4].copy_from_slice(&x.to_le_bytes()),
            GgmlType::BF16 => {
                b[at..at + 2].copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())
            }
            _ => b[at..at + 2].copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
        };
        match kind {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let es = kind.block_bytes();
                for i in 0..n * k {
                    put(&mut b, i * es, rng.normal(), kind);
                }
            }
            _ => {
                let bb = kind.block_bytes();
                for blk in 0..len / bb {
                    for &f in half_fields(kind) {
                        // magnitude in [2^-9, 2^-3]: normal f16, no subnormals
                        let mag = 2f32.powf(rng.uniform(-9.0, -3.0));
                        let s = if rng.next_u64() & 1 == 0 { mag } else { -mag };
                        put(&mut b, blk * bb + f, s, kind);
                    }
                }
            }
        }
        b
    }

    /// Inverse of `repack` on whole blocks, for the round-trip test.
    fn unrepack(kind: GgmlType, words: &[u32], blocks: usize) -> Vec<u8> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let bb = kind.block_bytes();
        match layout(kind) {
            Layout::Raw => bytes[..blocks * bb].to_vec(),
            Layout::Split { d_at } => {
                let body = bb - 2;
                let so = scale_offset(kind, blocks) * 4;
                assert_eq!(so, blocks * body);
                let mut out = Vec::new();
                for i in 0..blocks {
                    let bd = &bytes[i * body..(i + 1) * body];
                    out.extend_from_slice(&bd[..d_at]);
                    out.extend_from_slice(&bytes[so + 2 * i..so + 2 * i + 2]);
                    out.extend_from_slice(&bd[d_at..]);
                }
                out
            }
        }
    }

    #[test]
    fn repack_round_trips_every_type() {
        let mut rng = Rng::new(40);
        for kind in GgmlType::ALL {
            let blocks = 7;
            let k = kind.block_elems() * blocks;
            let b = random_tensor(&mut rng, kind, 1, k);
            let w = repack(kind, &b);
            assert_eq!(w.len(), b.len().div_ceil(4), "{kind}: no bytes added");
            let back = unrepack(kind, &w, b.len() / kind.block_bytes());
            assert_eq!(back, b, "{kind}");
        }
    }

    #[test]
    fn shards_split_rows_under_the_limit() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(41);
        let (n, k) = (33, 512);
        let b = random_tensor(&mut rng, GgmlType::Q6_K, n, k);
        let row = GgmlType::Q6_K.row_bytes(k as u64)?; // 420
        let w = GgmlWeight::upload_with_limit(g, GgmlType::Q6_K, &[n, k], &b, 4 * row + 4)?;
        let rows: Vec<(usize, usize)> = w.shards().iter().map(|s| (s.row0, s.rows)).collect();
        assert_eq!(rows.len(), 9);
        assert!(rows.iter().all(|&(_, r)| r == 4 || r == 1));
        assert_eq!(rows.iter().map(|r| r.1).sum::<usize>(), n);
        for s in w.shards() {
            assert!(s.buffer.byte_len() <= 4 * row + 4);
            assert_eq!(s.scale_off, s.rows * 2 * 208 / 4);
        }
        let w = GgmlWeight::upload(g, GgmlType::Q6_K, &[n, k], &b)?;
        assert_eq!(w.shards().len(), 1);
        assert_eq!(w.gpu_bytes(), (n as u64 * row).div_ceil(4) * 4);
        Ok(())
    }

    #[test]
    fn bad_uploads_are_named() {
        let g = gpu();
        let up = |kind, shape: &[usize], len| {
            GgmlWeight::upload(g, kind, shape, &vec![0u8; len])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            up(GgmlType::Q8_0, &[7, 64], 475),
            "GgmlWeight::upload: Q8_0 [7, 64] needs 476 bytes, got 475"
        );
        assert_eq!(
            up(GgmlType::Q4_0, &[2, 33], 36),
            "GgmlWeight::upload: Q4_0: 33 elements is not a multiple of the block size 32"
        );
        assert_eq!(
            up(GgmlType::F16, &[2, 3, 4], 48),
            "GgmlWeight::upload: shape [2, 3, 4] is not [rows, cols]"
        );
        assert_eq!(
            up(GgmlType::F32, &[0, 4], 0),
            "GgmlWeight::upload: shape [0, 4] has a zero-size dimension"
        );
        let e = GgmlWeight::upload_with_limit(g, GgmlType::Q4_K, &[1, 512], &[0; 288], 256)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "GgmlWeight::upload: one Q4_K row of 512 elements needs 288 bytes, more than the \
             storage-binding limit of 256 bytes"
        );
        let w = GgmlWeight::upload(g, GgmlType::Q4_K, &[512], &[0; 288]).unwrap();
        assert_eq!((w.rows(), w.cols(), w.kind()), (1, 512, GgmlType::Q4_K));
    }
}

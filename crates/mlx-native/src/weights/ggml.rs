//! GGML block types as stored in GGUF files, and their CPU dequantization.
//!
//! Every quantized type packs a fixed number of elements (`block_elems`) into a block of
//! fixed size (`block_bytes`). Scales are little-endian f16. The layouts follow the GGML
//! format definitions (`block_q4_0` … `block_q6_K` in ggml-common.h); the arithmetic below
//! is done in f32 in the same order as ggml's reference `dequantize_row_*` (one rounding
//! per multiply or add, no fused multiply-add), so results are bit-identical to it and to
//! the `gguf` Python package (checked against fixtures in `tests/fixtures/gguf/`).

use crate::error::{MlxError, Result};
use half::f16;

/// Elements in a K-quant super-block.
const QK_K: usize = 256;

/// The GGML tensor element types this crate reads.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// The GGML name of a type id, for supported types and for those GGML defines but this
/// crate does not read; `None` for ids GGML does not define.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    if let Ok(t) = GgmlType::from_u32(id) {
        return Some(t.name());
    }
    unsupported_name(id)
}

/// Names of GGML type ids this crate knows of but does not read.
fn unsupported_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2 (removed from GGML)",
        5 => "Q4_3 (removed from GGML)",
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        _ => return None,
    })
}

impl GgmlType {
    /// All supported types, in GGUF id order.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The type for a GGUF tensor type id; unknown and unsupported ids are an error that
    /// names the id (and the type, where GGML defines one).
    pub fn from_u32(id: u32) -> Result<Self> {
        if let Some(t) = Self::ALL.iter().find(|t| t.id() == id) {
            return Ok(*t);
        }
        Err(match unsupported_name(id) {
            Some(name) => MlxError::unsupported(format!("GGML type {id} ({name})")),
            None => MlxError::unsupported(format!("GGML type {id} (unknown id)")),
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The GGML name, as llama.cpp and the `gguf` package print it.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                QK_K
            }
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q2_K => 16 + 64 + 2 + 2,
            GgmlType::Q3_K => 32 + 64 + 12 + 2,
            GgmlType::Q4_K => 2 + 2 + 12 + 128,
            GgmlType::Q5_K => 2 + 2 + 12 + 32 + 128,
            GgmlType::Q6_K => 128 + 64 + 16 + 2,
        }
    }

    /// Bytes holding `n` consecutive elements. `n` must be a whole number of blocks;
    /// overflow is an error, not a wrap.
    pub fn row_bytes(self, n: u64) -> Result<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return Err(MlxError::invalid(format!(
                "{}: {n} elements is not a multiple of the block size {be}",
                self.name()
            )));
        }
        (n / be)
            .checked_mul(self.block_bytes() as u64)
            .ok_or_else(|| {
                MlxError::invalid(format!(
                    "{}: byte size of {n} elements overflows u64",
                    self.name()
                ))
            })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantize `n_elems` elements of type `kind` from `bytes` to f32. The byte length must be
/// exactly the size of `n_elems` elements.
pub fn dequantize(kind: GgmlType, bytes: &[u8], n_elems: usize) -> Result<Vec<f32>> {
    let expected = kind.row_bytes(n_elems as u64)?;
    if bytes.len() as u64 != expected {
        return Err(MlxError::invalid(format!(
            "dequantize {kind}: {} bytes for {n_elems} elements, expected {expected}",
            bytes.len()
        )));
    }
    // n_elems is bounded by the byte length just checked.
    let mut out = vec![0f32; n_elems];
    let be = kind.block_elems();
    let blocks = bytes.chunks_exact(kind.block_bytes());
    for (b, o) in blocks.zip(out.chunks_exact_mut(be)) {
        dequantize_block(kind, b, o);
    }
    Ok(out)
}

/// A GGML tensor of the 32-element types whose values are exactly an MLX affine 4- or 8-bit
/// weight with group size 32 and f16 scales and biases, in that form: Q4_0 `d·(q - 8)`
/// (scale d, bias -8d), Q4_1 `d·q + m` (scale d, bias m), Q8_0 `d·q` with q in -128..127
/// (codes q + 128, scale d, bias -128d). The dequantized values are identical (the GPU
/// computes `fma(code, scale, bias)` exactly). Why: the MLX matvec (`ops::qmv`, integer dot
/// products) is faster than the GGML block kernels, and these are llama.cpp's most common
/// legacy types. `Ok(None)` for other types, and where a bias would not be an f16
/// (|8d| or |128d| past f16's range, a non-finite scale): those stay GGML.
/// `bytes` must hold exactly `rows x cols` elements of `kind`.
pub fn legacy_to_affine(
    kind: GgmlType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<crate::weights::quant::Quantized>> {
    use crate::weights::quant::{QuantParams, Quantized, Scales};
    let (bits, offset) = match kind {
        GgmlType::Q4_0 => (4u32, -8.0f32),
        GgmlType::Q4_1 => (4, 0.0),
        GgmlType::Q8_0 => (8, -128.0),
        _ => return Ok(None),
    };
    let n_elems = rows.checked_mul(cols).ok_or_else(|| {
        MlxError::invalid(format!(
            "legacy_to_affine {kind}: {rows} x {cols} overflows"
        ))
    })?;
    let expected = kind.row_bytes(n_elems as u64)?;
    if !cols.is_multiple_of(32) || bytes.len() as u64 != expected {
        return Err(MlxError::invalid(format!(
            "legacy_to_affine {kind}: {} bytes for {rows} x {cols}, expected {expected} \
             (and a multiple of 32 columns)",
            bytes.len()
        )));
    }
    let blocks = n_elems / 32;
    // Sizes bounded by the byte length just checked.
    let mut packed = Vec::with_capacity(blocks * bits as usize);
    let mut scales = Vec::with_capacity(blocks);
    let mut biases = Vec::with_capacity(blocks);
    for b in bytes.chunks_exact(kind.block_bytes()) {
        let d = half_at(b, 0);
        let bias = if kind == GgmlType::Q4_1 {
            half_at(b, 2)
        } else {
            offset * d
        };
        // A power-of-two multiple of an f16 is an f16 unless it overflows.
        if !d.is_finite() || !bias.is_finite() || f16::from_f32(bias).to_f32() != bias {
            return Ok(None);
        }
        scales.push(d);
        biases.push(bias);
        match kind {
            GgmlType::Q8_0 => {
                // Codes q + 128 (the i8 byte with its sign bit flipped), four to a word.
                for w in b[2..34].chunks_exact(4) {
                    packed.push(u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ 0x8080_8080);
                }
            }
            _ => {
                // MLX: code j at bits 4j of the block's 128 bits; GGML: element i < 16 is
                // the low nibble of qs byte i, element 16 + i its high nibble.
                let qs = if kind == GgmlType::Q4_1 {
                    &b[4..20]
                } else {
                    &b[2..18]
                };
                for word in 0..4 {
                    let mut w = 0u32;
                    for t in 0..8 {
                        let j = 8 * word + t;
                        w |= u32::from(nibble(qs, j)) << (4 * t);
                    }
                    packed.push(w);
                }
            }
        }
    }
    Ok(Some(Quantized {
        packed,
        scales: Scales::Float(scales),
        biases: Some(biases),
        rows,
        cols,
        params: QuantParams::affine(bits, 32),
        dtype: crate::dtype::DType::F16,
    }))
}

/// Dequantize one block. `b` has `kind.block_bytes()` bytes and `o` has `kind.block_elems()`
/// elements (guaranteed by the caller's `chunks_exact`); indexing below stays within those
/// fixed sizes.
fn dequantize_block(kind: GgmlType, b: &[u8], o: &mut [f32]) {
    match kind {
        GgmlType::F32 => o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => o[0] = half_at(b, 0),
        GgmlType::BF16 => o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        GgmlType::Q4_0 => {
            let d = half_at(b, 0);
            for (i, x) in o.iter_mut().enumerate() {
                *x = (nibble(&b[2..18], i) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (half_at(b, 0), half_at(b, 2));
            for (i, x) in o.iter_mut().enumerate() {
                *x = nibble(&b[4..20], i) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = half_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (i, x) in o.iter_mut().enumerate() {
                let q = nibble(&b[6..22], i) | ((((qh >> i) & 1) as u8) << 4);
                *x = (q as i32 - 16) as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let (d, m) = (half_at(b, 0), half_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for (i, x) in o.iter_mut().enumerate() {
                let q = nibble(&b[8..24], i) | ((((qh >> i) & 1) as u8) << 4);
                *x = q as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = half_at(b, 0);
            for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                *x = q as i8 as f32 * d;
            }
        }
        GgmlType::Q2_K => dequantize_q2_k(b, o),
        GgmlType::Q3_K => dequantize_q3_k(b, o),
        GgmlType::Q4_K => dequantize_q45_k(b, o, false),
        GgmlType::Q5_K => dequantize_q45_k(b, o, true),
        GgmlType::Q6_K => dequantize_q6_k(b, o),
    }
}

/// Element `i` (0..32) of a 32-element block's 16 packed bytes: elements 0..16 are the low
/// nibbles, 16..32 the high nibbles.
fn nibble(qs: &[u8], i: usize) -> u8 {
    (qs[i % 16] >> (4 * (i / 16))) & 0xF
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q2_K: scales[16] (low nibble scale, high nibble min, per 16 elements), qs[64] (2-bit),
/// d, dmin. Element `c*128 + s*32 + l` is bits `2s..2s+2` of `qs[c*32 + l]`.
fn dequantize_q2_k(b: &[u8], o: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for (i, x) in o.iter_mut().enumerate() {
        let sc = scales[i / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        let (c, s, l) = (i / 128, (i / 32) % 4, i % 32);
        let q = (qs[c * 32 + l] >> (2 * s)) & 3;
        *x = dl * q as f32 - ml;
    }
}

/// Q3_K: hmask[32] (high bit, inverted: set means +0, clear means -4), qs[64] (low 2 bits),
/// scales[12] (16 six-bit scales, biased by 32), d.
fn dequantize_q3_k(b: &[u8], o: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = half_at(b, 108);
    let mut scales = [0f32; 16];
    for (k, s) in scales.iter_mut().enumerate() {
        let low = (sc[k % 8] >> (4 * (k / 8))) & 0xF;
        let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 3;
        *s = d * ((low | (high << 4)) as i32 - 32) as f32;
    }
    for (i, x) in o.iter_mut().enumerate() {
        let (c, s, l) = (i / 128, (i / 32) % 4, i % 32);
        let low = ((qs[c * 32 + l] >> (2 * s)) & 3) as i32;
        let high = (hmask[i % 32] >> (i / 32)) & 1;
        let q = if high == 0 { low - 4 } else { low };
        *x = scales[i / 16] * q as f32;
    }
}

/// Six-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: d, dmin, scales[12], qs[128]; Q5_K adds qh[32] before qs. Eight sub-blocks of 32:
/// sub-block `j` uses nibble `j % 2` of `qs[(j / 2) * 32 + l]` and (Q5_K) bit `j` of `qh[l]`.
fn dequantize_q45_k(b: &[u8], o: &mut [f32], five: bool) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let sc = &b[4..16];
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for (j, sub) in o.chunks_exact_mut(32).enumerate() {
        let (s, m) = scale_min_k4(j, sc);
        let dl = d * s as f32;
        let ml = dmin * m as f32;
        for (l, x) in sub.iter_mut().enumerate() {
            let mut q = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0xF;
            if five {
                q |= ((qh[l] >> j) & 1) << 4;
            }
            *x = dl * q as f32 - ml;
        }
    }
}

/// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8, per 16), d.
/// Element `c*128 + r`: nibble `r / 64` of `ql[c*64 + r % 64]`, bits `2*(r/32)..` of
/// `qh[c*32 + r % 32]`, biased by 32.
fn dequantize_q6_k(b: &[u8], o: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = half_at(b, 208);
    for (i, x) in o.iter_mut().enumerate() {
        let (c, r) = (i / 128, i % 128);
        let low = (ql[c * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
        let high = (qh[c * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        *x = d * scales[i / 16] as i8 as f32 * q as f32;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn ids_names_and_sizes() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.id()).unwrap(), t);
            assert_eq!(ggml_type_name(t.id()), Some(t.name()));
            assert_eq!(t.to_string(), t.name());
        }
        let sizes: Vec<(usize, usize)> = GgmlType::ALL
            .iter()
            .map(|t| (t.block_elems(), t.block_bytes()))
            .collect();
        // ggml's type traits (GGML_QUANT_SIZES), in id order
        assert_eq!(
            sizes,
            [
                (1, 4),
                (1, 2),
                (32, 18),
                (32, 20),
                (32, 22),
                (32, 24),
                (32, 34),
                (256, 84),
                (256, 110),
                (256, 144),
                (256, 176),
                (256, 210),
                (1, 2)
            ]
        );
    }

    #[test]
    fn unsupported_ids_name_themselves() {
        let e = GgmlType::from_u32(99).unwrap_err();
        assert!(matches!(e, MlxError::Unsupported(_)));
        assert_eq!(e.to_string(), "unsupported: GGML type 99 (unknown id)");
        let e = GgmlType::from_u32(20).unwrap_err().to_string();
        assert_eq!(e, "unsupported: GGML type 20 (IQ4_NL)");
        assert_eq!(ggml_type_name(15), Some("Q8_K"));
        assert_eq!(ggml_type_name(31), None);
    }

    #[test]
    fn row_bytes_is_checked() {
        assert_eq!(GgmlType::Q4_K.row_bytes(512).unwrap(), 288);
        assert_eq!(GgmlType::Q8_0.row_bytes(0).unwrap(), 0);
        assert_eq!(GgmlType::BF16.row_bytes(3).unwrap(), 6);
        let e = GgmlType::Q4_K.row_bytes(100).unwrap_err().to_string();
        assert_eq!(
            e,
            "Q4_K: 100 elements is not a multiple of the block size 256"
        );
        let e = GgmlType::F32.row_bytes(u64::MAX).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        assert!(GgmlType::Q6_K.row_bytes(u64::MAX - 255).is_ok());
    }

    #[test]
    fn dequantize_checks_lengths() {
        let e = dequantize(GgmlType::Q4_0, &[0; 17], 32)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "dequantize Q4_0: 17 bytes for 32 elements, expected 18");
        let e = dequantize(GgmlType::Q4_0, &[0; 18], 31)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple of the block size 32"), "{e}");
        assert!(dequantize(GgmlType::Q6_K, &[], 0).unwrap().is_empty());
    }

    #[test]
    fn float_types_keep_specials() {
        let v = dequantize(GgmlType::F16, &[0, 0x7c, 0, 0xfc, 0, 0x7e, 1, 0], 4).unwrap();
        assert_eq!(v[0], f32::INFINITY);
        assert_eq!(v[1], f32::NEG_INFINITY);
        assert!(v[2].is_nan());
        assert_eq!(v[3], f16::from_bits(1).to_f32()); // smallest subnormal
        let v = dequantize(GgmlType::BF16, &[0x80, 0x3f, 0xc0, 0x7f], 2).unwrap();
        assert_eq!(v[0], 1.0);
        assert!(v[1].is_nan());
        let v = dequantize(GgmlType::F32, &(-2.5f32).to_le_bytes(), 1).unwrap();
        assert_eq!(v, [-2.5]);
    }

    #[test]
    fn q4_0_and_q4_1_by_hand() {
        // low nibbles are elements 0..16, high nibbles 16..32
        let mut b = h(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(v[16 + j], 2.0 * (7.0 - j as f32));
        }
        let mut b = [h(0.5), h(-1.0)].concat();
        b.extend([0x21u8; 16]);
        let v = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!((v[0], v[16]), (0.5 - 1.0, 1.0 - 1.0));
    }

    #[test]
    fn q5_and_q8_by_hand() {
        // Q5_0: element i takes bit i of qh as its fifth bit
        let mut b = h(1.0).to_vec();
        b.extend(0x8000_0001u32.to_le_bytes());
        b.extend([0u8; 16]);
        let v = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!(v[0], 0.0); // 16 - 16
        assert_eq!(v[1], -16.0);
        assert_eq!(v[31], 0.0);
        let mut b = [h(1.0), h(100.0)].concat();
        b.extend(0x0001_0000u32.to_le_bytes());
        b.extend([0x0fu8; 16]);
        let v = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert_eq!((v[0], v[15], v[16], v[17]), (115.0, 115.0, 116.0, 100.0));
        let mut b = h(-0.25).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!((v[0], v[16], v[31]), (4.0, 0.0, -3.75));
    }

    #[test]
    fn q4_k_scales_unpack() {
        // sub-blocks 0..4 use the low 6 bits of bytes 0..4 (scale) and 4..8 (min);
        // sub-blocks 4..8 combine nibbles of bytes 8..12 with the top bits of bytes 0..8
        let s = [
            0b01_000001,
            2,
            3,
            4,
            0b10_000101,
            6,
            7,
            8,
            0x9a,
            0xbc,
            0xde,
            0xf0,
        ];
        assert_eq!(scale_min_k4(0, &s), (1, 5));
        assert_eq!(scale_min_k4(3, &s), (4, 8));
        assert_eq!(scale_min_k4(4, &s), (0xa | (1 << 4), 0x9 | (2 << 4)));
        assert_eq!(scale_min_k4(7, &s), (0x0, 0xf));
        let mut b = [h(1.0), h(1.0)].concat();
        b.extend(s);
        b.extend((0..128).map(|l| if l < 32 { 0x73u8 } else { 0 }));
        let v = dequantize(GgmlType::Q4_K, &b, 256).unwrap();
        assert_eq!(v[0], 1.0 * 3.0 - 5.0); // sub-block 0: low nibble
        assert_eq!(v[32], 2.0 * 7.0 - 6.0); // sub-block 1: high nibble of the same bytes
        assert_eq!(v[64], -7.0);
    }

    /// Q4_0, Q4_1 and Q8_0 as MLX affine weights: MLX's own dequantization of the converted
    /// words, scales and biases equals GGML's of the blocks exactly (random blocks, f16
    /// scales of both signs, subnormal ones included); other types, overflowing biases and
    /// non-finite scales are left to GGML; a wrong byte length is an error.
    #[test]
    fn legacy_blocks_convert_to_identical_affine_weights() {
        use crate::testutil::Rng;
        use crate::weights::ggml_weight::tests::random_tensor;
        use crate::weights::quant::dequantize as mlx_dequantize;
        let mut rng = Rng::new(31);
        for kind in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols) = (5, 96);
            let mut bytes = random_tensor(&mut rng, kind, rows, cols);
            // A subnormal scale in the first block.
            bytes[0..2].copy_from_slice(&f16::from_bits(3).to_bits().to_le_bytes());
            let want = dequantize(kind, &bytes, rows * cols).unwrap();
            let q = legacy_to_affine(kind, &bytes, rows, cols).unwrap().unwrap();
            let got = mlx_dequantize(
                &q.packed,
                q.scales.as_view(),
                q.biases.as_deref(),
                rows,
                cols,
                q.params,
            )
            .unwrap();
            // Equal values (a zero may differ in sign: GGML's 0·d against MLX's d·q + b).
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{kind} element {i}: {g} vs {w}");
            }
            // Past f16's range once multiplied (Q4_1's bias is stored, never computed).
            let mut big = bytes.clone();
            big[0..2].copy_from_slice(&h(30000.0));
            let kept = legacy_to_affine(kind, &big, rows, cols).unwrap();
            assert_eq!(kept.is_none(), kind != GgmlType::Q4_1, "{kind}");
            let mut inf = bytes.clone();
            inf[0..2].copy_from_slice(&h(f32::INFINITY));
            assert!(legacy_to_affine(kind, &inf, rows, cols).unwrap().is_none());
            let e = legacy_to_affine(kind, &bytes[1..], rows, cols).unwrap_err();
            assert!(e.to_string().contains("bytes for 5 x 96"), "{e}");
        }
        let q5 = random_tensor(&mut rng, GgmlType::Q5_0, 2, 32);
        assert!(legacy_to_affine(GgmlType::Q5_0, &q5, 2, 32)
            .unwrap()
            .is_none());
    }
}

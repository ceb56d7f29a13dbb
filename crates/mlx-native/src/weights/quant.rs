//! CPU quantization and dequantization in MLX's formats, bit-exact with `mx.quantize` and
//! `mx.dequantize` (checked against MLX 0.32.4 on its CPU backend by
//! `tests/mlx_quant_parity.rs`).
//!
//! **Layout.** A weight `[rows, cols]` is quantized along `cols` in groups of `group_size`.
//! Each row packs into `cols * bits / 32` little-endian `u32` words: code `j` of the row
//! occupies bits `[j*bits, (j+1)*bits)` of the row's bit stream, so for 3, 5 and 6 bits a
//! code may straddle two words. Scales (and biases) are one per group, row-major.
//!
//! **Affine** (`w ≈ scale * q + bias`, `q` in `0..2^bits`), computed in f32 from the input
//! values whatever their dtype: with `min`/`max` of the group, `scale = max((max-min)/n, 1e-7)`,
//! negated unless `|min| > |max|`; `edge` is the larger-magnitude end, `q0 = rint(edge/scale)`,
//! and when `q0 != 0` the scale becomes `edge/q0` and the bias `edge` (so `edge` itself is
//! exact); otherwise the bias is 0. Codes are `clamp(rint((w-bias)/scale), 0, n)` with the
//! unrounded f32 scale and bias; only then are scale and bias rounded to the weight's dtype.
//! `rint` rounds half to even.
//!
//! **MXFP4** (`w ≈ 2^(e-127) * fp4`): one e8m0 exponent byte per 32 values and E2M1 codes.
//! MLX's CPU backend computes it in the weight's dtype, so intermediates are rounded to that
//! dtype here too: `s = amax/6`; `e` is the smallest exponent with `2^e >= s` (0 when
//! `s == 0`; rounding up keeps the largest values inside the FP4 range); values are divided
//! by `2^e` and the code is the *first* LUT entry with the smallest `|x - lut|`. Ties
//! therefore go to the smaller magnitude (1.75 -> 1.5, 3.5 -> 3) and small negative values
//! get code 0 (+0), not 8 (-0). MLX's Metal kernel (`fp4_e2m1` in
//! `backend/metal/kernels/fp4.h`) breaks those ties to the even code and keeps the sign of
//! zero instead, so Metal-made MXFP4 weights may differ from these codes on exact ties; both
//! dequantize the same way.
//!
//! **Which MLX backend.** Everything here is MLX's CPU backend (what `pip install mlx[cpu]`
//! runs, and what the fixtures prove). MLX's Metal `affine_quantize` kernel (read in the
//! 0.32.4 headers, not run here) differs: it starts the group maximum at 0 rather than
//! `-inf` (so an all-negative group gets `max = 0` and a different scale), and uses
//! `round` (half away from zero) for `q0` and the codes. Weights converted on Apple GPUs
//! can therefore differ from [`quantize`]'s output; [`dequantize`] reads either exactly.
//!
//! **Dequantize** reproduces MLX's arithmetic in the output dtype: affine `(q * scale) + bias`
//! with a rounding after the product and after the sum (no fused multiply-add); MXFP4
//! `lut[code] * 2^(e-127)`.

use half::{bf16, f16};

use crate::{DType, MlxError, Result};

/// Bit widths `mx.quantize` accepts in affine mode (and this module implements).
pub const AFFINE_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes `mx.quantize` accepts in affine mode.
pub const AFFINE_GROUP_SIZES: [u32; 3] = [32, 64, 128];
/// The sixteen E2M1 values an MXFP4 code stands for, in code order.
pub const FP4_E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

const MXFP4_BITS: u32 = 4;
const MXFP4_GROUP_SIZE: u32 = 32;
const MXFP4_MAX: f32 = 6.0;
const AFFINE_EPS: f32 = 1e-7;

/// How values map to codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantMode {
    /// `scale * q + bias` per group; MLX's default and what mlx-lm models use.
    Affine,
    /// OCP microscaling FP4: E2M1 codes with one e8m0 power-of-two scale per 32 values.
    Mxfp4,
}

impl QuantMode {
    /// The name MLX uses (`mode="affine"`).
    pub const fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
        }
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bits, group size and mode of a quantized tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantParams {
    pub bits: u32,
    pub group_size: u32,
    pub mode: QuantMode,
}

impl QuantParams {
    /// Affine quantization (not validated; see [`QuantParams::validate`]).
    pub const fn affine(bits: u32, group_size: u32) -> Self {
        QuantParams {
            bits,
            group_size,
            mode: QuantMode::Affine,
        }
    }

    /// MXFP4: 4 bits, groups of 32.
    pub const fn mxfp4() -> Self {
        QuantParams {
            bits: MXFP4_BITS,
            group_size: MXFP4_GROUP_SIZE,
            mode: QuantMode::Mxfp4,
        }
    }

    /// `Unsupported` unless MLX (and this crate) implement this combination.
    pub fn validate(&self) -> Result<()> {
        match self.mode {
            QuantMode::Affine => {
                if !AFFINE_BITS.contains(&self.bits) {
                    return Err(MlxError::unsupported(format!(
                        "affine quantization with bits={}; supported bits are 2, 3, 4, 5, 6, 8",
                        self.bits
                    )));
                }
                if !AFFINE_GROUP_SIZES.contains(&self.group_size) {
                    return Err(MlxError::unsupported(format!(
                        "affine quantization with group_size={}; supported group sizes are 32, 64, 128",
                        self.group_size
                    )));
                }
            }
            QuantMode::Mxfp4 => {
                if self.bits != MXFP4_BITS || self.group_size != MXFP4_GROUP_SIZE {
                    return Err(MlxError::unsupported(format!(
                        "mxfp4 quantization with bits={}, group_size={}; mxfp4 requires bits=4, group_size=32",
                        self.bits, self.group_size
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Packed `u32` words one row of `cols` values takes at `bits` bits per value.
/// Errors when the row does not fill whole words (MLX requires `cols * bits % 32 == 0`).
pub fn packed_words_per_row(cols: usize, bits: u32) -> Result<usize> {
    let total_bits = usize::try_from(bits)
        .ok()
        .and_then(|b| cols.checked_mul(b))
        .ok_or_else(|| {
            MlxError::invalid(format!("quant: {cols} columns of {bits} bits overflow"))
        })?;
    if bits == 0 || !total_bits.is_multiple_of(32) {
        return Err(MlxError::invalid(format!(
            "quant: a row of {cols} values at {bits} bits is {total_bits} bits, not a whole number of 32-bit words"
        )));
    }
    Ok(total_bits / 32)
}

/// Groups (scales) per row. Errors unless `group_size` divides `cols`.
pub fn groups_per_row(cols: usize, group_size: u32) -> Result<usize> {
    let gs = usize::try_from(group_size).unwrap_or(0);
    if gs == 0 || !cols.is_multiple_of(gs) {
        return Err(MlxError::invalid(format!(
            "quant: {cols} columns are not divisible by group_size {group_size}"
        )));
    }
    Ok(cols / gs)
}

/// Sizes of a quantized `[rows, cols]` tensor, checked once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantLayout {
    pub rows: usize,
    pub cols: usize,
    /// `u32` words per row.
    pub words_per_row: usize,
    /// Scales (and biases) per row.
    pub groups_per_row: usize,
}

impl QuantLayout {
    /// Validates `params` and the shape: `cols` a positive multiple of the group size, all
    /// element counts representable.
    pub fn new(rows: usize, cols: usize, params: QuantParams) -> Result<Self> {
        params.validate()?;
        if rows == 0 || cols == 0 {
            return Err(MlxError::invalid(format!(
                "quant: shape [{rows}, {cols}] is empty"
            )));
        }
        let layout = QuantLayout {
            rows,
            cols,
            words_per_row: packed_words_per_row(cols, params.bits)?,
            groups_per_row: groups_per_row(cols, params.group_size)?,
        };
        // Every total must fit in usize.
        for (what, per_row) in [
            ("elements", cols),
            ("words", layout.words_per_row),
            ("groups", layout.groups_per_row),
        ] {
            rows.checked_mul(per_row).ok_or_else(|| {
                MlxError::invalid(format!("quant: [{rows}, {cols}] has too many {what}"))
            })?;
        }
        Ok(layout)
    }

    /// `rows * cols` (checked in `new`).
    pub fn elements(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    /// Total packed `u32` words.
    pub fn words(&self) -> usize {
        self.rows.saturating_mul(self.words_per_row)
    }

    /// Total scales (and biases).
    pub fn groups(&self) -> usize {
        self.rows.saturating_mul(self.groups_per_row)
    }
}

/// Per-group scales as MLX stores them.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// Affine: one float per group; the values are exactly representable in the tensor's dtype.
    Float(Vec<f32>),
    /// MXFP4: one e8m0 byte per group, the scale being `2^(byte - 127)`.
    E8m0(Vec<u8>),
}

impl Scales {
    /// A borrowed view, as [`dequantize`] takes it.
    pub fn as_view(&self) -> ScalesRef<'_> {
        match self {
            Scales::Float(v) => ScalesRef::Float(v),
            Scales::E8m0(v) => ScalesRef::E8m0(v),
        }
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        match self {
            Scales::Float(v) => v.len(),
            Scales::E8m0(v) => v.len(),
        }
    }

    /// True when there are no groups.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Borrowed per-group scales.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalesRef<'a> {
    Float(&'a [f32]),
    E8m0(&'a [u8]),
}

impl ScalesRef<'_> {
    fn len(&self) -> usize {
        match self {
            ScalesRef::Float(v) => v.len(),
            ScalesRef::E8m0(v) => v.len(),
        }
    }
}

/// The output of [`quantize`]: what `mx.quantize` returns, plus the shape and format.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// `rows * words_per_row` packed words (MLX's `uint32` weight).
    pub packed: Vec<u32>,
    /// `rows * groups_per_row` scales.
    pub scales: Scales,
    /// Affine biases, one per group; `None` for MXFP4.
    pub biases: Option<Vec<f32>>,
    pub rows: usize,
    pub cols: usize,
    pub params: QuantParams,
    /// The dtype of the quantized weight; affine scales and biases are stored in it and
    /// [`Quantized::dequantize`] computes in it.
    pub dtype: DType,
}

impl Quantized {
    /// Dequantizes in `self.dtype`, as `mx.dequantize` does for affine weights (and for
    /// MXFP4 with `dtype=` the weight's dtype).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        dequantize_as(
            &self.packed,
            self.scales.as_view(),
            self.biases.as_deref(),
            self.rows,
            self.cols,
            self.params,
            self.dtype,
        )
    }
}

/// Rounding to a float dtype, applied after each MLX array op that produces that dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Precision {
    F32,
    F16,
    BF16,
}

impl Precision {
    fn of(dtype: DType, op: &str) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Precision::F32),
            DType::F16 => Ok(Precision::F16),
            DType::BF16 => Ok(Precision::BF16),
            other => Err(MlxError::unsupported(format!(
                "{op}: dtype {other}; quantized weights are f32, f16 or bf16"
            ))),
        }
    }

    /// Round-to-nearest-even into this precision, returned widened to f32.
    fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::F16 => f16::from_f32(x).to_f32(),
            Precision::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// `x` rounded (to nearest, ties to even) to `dtype` and widened back to f32: how an f32
/// scale or bias is stored for a bf16/f16 weight. Errors for non-float dtypes.
pub fn round_to_dtype(x: f32, dtype: DType) -> Result<f32> {
    Ok(Precision::of(dtype, "round_to_dtype")?.round(x))
}

/// The scale an e8m0 byte stands for: `2^(e - 127)` (`255` gives infinity).
pub fn e8m0_to_f32(e: u8) -> f32 {
    (f32::from(e) - 127.0).exp2()
}

/// Quantizes an f32 weight `[rows, cols]` (row-major) like `mx.quantize` on an f32 array.
pub fn quantize(w: &[f32], rows: usize, cols: usize, params: QuantParams) -> Result<Quantized> {
    quantize_as(w, rows, cols, params, DType::F32)
}

/// Quantizes a weight whose dtype is `dtype` (f32, f16 or bf16), given as its f32 values:
/// reproduces `mx.quantize` on an array of that dtype. Each value must be exactly
/// representable in `dtype` (convert with `half` first) and finite.
pub fn quantize_as(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: QuantParams,
    dtype: DType,
) -> Result<Quantized> {
    let prec = Precision::of(dtype, "quantize")?;
    let layout = QuantLayout::new(rows, cols, params)?;
    if w.len() != layout.elements() {
        return Err(MlxError::invalid(format!(
            "quantize: w has {} elements, expected {} ({rows} x {cols})",
            w.len(),
            layout.elements()
        )));
    }
    if let Some((i, v)) = w.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(MlxError::invalid(format!(
            "quantize: w[{i}] is {v}; only finite values can be quantized"
        )));
    }
    if let Some((i, v)) = w.iter().enumerate().find(|(_, v)| prec.round(**v) != **v) {
        return Err(MlxError::invalid(format!(
            "quantize: w[{i}] = {v:e} is not representable in {dtype}"
        )));
    }
    let group = layout.cols / layout.groups_per_row;
    let mut packed = vec![0u32; layout.words()];
    let mut codes = vec![0u32; group];
    match params.mode {
        QuantMode::Affine => {
            let mut scales = Vec::with_capacity(layout.groups());
            let mut biases = Vec::with_capacity(layout.groups());
            for (g, values) in w.chunks_exact(group).enumerate() {
                let (scale, bias) = affine_group(values, params.bits, &mut codes);
                scales.push(prec.round(scale));
                biases.push(prec.round(bias));
                write_codes(&mut packed, &layout, params.bits, g, group, &codes)?;
            }
            Ok(Quantized {
                packed,
                scales: Scales::Float(scales),
                biases: Some(biases),
                rows,
                cols,
                params,
                dtype,
            })
        }
        QuantMode::Mxfp4 => {
            let mut scales = Vec::with_capacity(layout.groups());
            for (g, values) in w.chunks_exact(group).enumerate() {
                scales.push(mxfp4_group(values, prec, &mut codes));
                write_codes(&mut packed, &layout, params.bits, g, group, &codes)?;
            }
            Ok(Quantized {
                packed,
                scales: Scales::E8m0(scales),
                biases: None,
                rows,
                cols,
                params,
                dtype,
            })
        }
    }
}

/// One affine group in f32 (MLX's CPU `quantize`); returns the unrounded scale and bias.
fn affine_group(values: &[f32], bits: u32, codes: &mut [u32]) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let (mut w_min, mut w_max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in values {
        w_max = w_max.max(v);
        w_min = w_min.min(v);
    }
    let min_is_edge = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(AFFINE_EPS);
    if !min_is_edge {
        scale = -scale;
    }
    let edge = if min_is_edge { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    for (c, &v) in codes.iter_mut().zip(values) {
        // Finite input and |scale| >= eps keep this finite; the clamp bounds the cast.
        *c = ((v - bias) / scale).round_ties_even().clamp(0.0, n_bins) as u32;
    }
    (scale, bias)
}

/// One MXFP4 group with MLX's CPU arithmetic in `prec`; returns the e8m0 byte.
fn mxfp4_group(values: &[f32], prec: Precision, codes: &mut [u32]) -> u8 {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = prec.round(amax / MXFP4_MAX);
    let exponent = if scale == 0.0 { 0 } else { ceil_log2(scale) };
    let pow2 = prec.round((exponent as f32).exp2());
    for (c, &v) in codes.iter_mut().zip(values) {
        let x = prec.round(v / pow2);
        let mut best = 0u32;
        let mut best_dist = f32::INFINITY;
        for (i, &lut) in (0u32..).zip(FP4_E2M1_VALUES.iter()) {
            let dist = prec.round(x - lut).abs();
            if dist < best_dist {
                best = i;
                best_dist = dist;
            }
        }
        *c = best;
    }
    // e8m0 covers 2^-127 ..= 2^127; finite f32/f16/bf16 groups stay inside it.
    (exponent + 127).clamp(0, 254) as u8
}

/// The smallest `e` with `2^e >= x`, exactly, for a positive finite `x`.
fn ceil_log2(x: f32) -> i32 {
    // Every f32 is a normal f64, so the exponent and mantissa fields are exact.
    let bits = f64::from(x).to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let fraction = bits & ((1u64 << 52) - 1);
    exponent + i32::from(fraction != 0)
}

/// Writes the codes of group `g` (flat index over all groups) into the row bit stream.
fn write_codes(
    packed: &mut [u32],
    layout: &QuantLayout,
    bits: u32,
    g: usize,
    group: usize,
    codes: &[u32],
) -> Result<()> {
    let row = g / layout.groups_per_row;
    let first = (g % layout.groups_per_row) * group;
    let start = row * layout.words_per_row;
    let words = packed
        .get_mut(start..start + layout.words_per_row)
        .ok_or_else(|| MlxError::invalid(format!("quantize: group {g} is out of range")))?;
    for (j, &code) in (first..).zip(codes) {
        let bit = j * bits as usize;
        let (word, shift) = (bit / 32, (bit % 32) as u32);
        if let Some(w) = words.get_mut(word) {
            *w |= code << shift;
        }
        if shift + bits > 32 {
            if let Some(w) = words.get_mut(word + 1) {
                *w |= code >> (32 - shift);
            }
        }
    }
    Ok(())
}

/// Reads code `j` of a row's words.
fn read_code(words: &[u32], bits: u32, j: usize) -> u32 {
    let bit = j * bits as usize;
    let (word, shift) = (bit / 32, (bit % 32) as u32);
    let lo = words.get(word).map_or(0, |w| w >> shift);
    let hi = if shift + bits > 32 {
        words.get(word + 1).map_or(0, |w| w << (32 - shift))
    } else {
        0
    };
    (lo | hi) & ((1u32 << bits) - 1)
}

/// The integer codes of a packed `[rows, cols]` tensor, row-major (for tests and repacking).
pub fn unpack_codes(packed: &[u32], rows: usize, cols: usize, bits: u32) -> Result<Vec<u8>> {
    if !(1..=8).contains(&bits) {
        return Err(MlxError::unsupported(format!(
            "unpack_codes: bits={bits}; codes are 1 to 8 bits"
        )));
    }
    let words_per_row = packed_words_per_row(cols, bits)?;
    let expected = rows
        .checked_mul(words_per_row)
        .ok_or_else(|| MlxError::invalid("unpack_codes: shape overflows"))?;
    expect_len("unpack_codes", "packed", packed.len(), expected)?;
    let mut out = Vec::with_capacity(rows.saturating_mul(cols));
    for words in packed.chunks_exact(words_per_row.max(1)) {
        out.extend((0..cols).map(|j| read_code(words, bits, j) as u8));
    }
    Ok(out)
}

fn expect_len(op: &str, what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(MlxError::invalid(format!(
            "{op}: {what} has {got} elements, expected {expected}"
        )));
    }
    Ok(())
}

/// Dequantizes in f32 arithmetic: `mx.dequantize` of a weight whose scales are f32.
pub fn dequantize(
    packed: &[u32],
    scales: ScalesRef<'_>,
    biases: Option<&[f32]>,
    rows: usize,
    cols: usize,
    params: QuantParams,
) -> Result<Vec<f32>> {
    dequantize_as(packed, scales, biases, rows, cols, params, DType::F32)
}

/// Dequantizes with every intermediate rounded to `dtype`, reproducing `mx.dequantize`
/// with that output dtype (for affine weights, the dtype of the scales). The result values
/// are representable in `dtype`.
pub fn dequantize_as(
    packed: &[u32],
    scales: ScalesRef<'_>,
    biases: Option<&[f32]>,
    rows: usize,
    cols: usize,
    params: QuantParams,
    dtype: DType,
) -> Result<Vec<f32>> {
    const OP: &str = "dequantize";
    let prec = Precision::of(dtype, OP)?;
    let layout = QuantLayout::new(rows, cols, params)?;
    expect_len(OP, "packed", packed.len(), layout.words())?;
    expect_len(OP, "scales", scales.len(), layout.groups())?;
    let group = layout.cols / layout.groups_per_row;
    let bits = params.bits;
    let mut out = Vec::with_capacity(layout.elements());
    match (params.mode, scales, biases) {
        (QuantMode::Affine, ScalesRef::Float(scales), Some(biases)) => {
            expect_len(OP, "biases", biases.len(), layout.groups())?;
            for (row, words) in packed.chunks_exact(layout.words_per_row).enumerate() {
                for j in 0..layout.cols {
                    let g = row * layout.groups_per_row + j / group;
                    let (s, b) = match (scales.get(g), biases.get(g)) {
                        (Some(&s), Some(&b)) => (s, b),
                        _ => return Err(MlxError::invalid(format!("{OP}: group {g} missing"))),
                    };
                    let q = read_code(words, bits, j) as f32;
                    out.push(prec.round(prec.round(q * s) + b));
                }
            }
        }
        (QuantMode::Mxfp4, ScalesRef::E8m0(scales), None) => {
            for (row, words) in packed.chunks_exact(layout.words_per_row).enumerate() {
                for j in 0..layout.cols {
                    let g = row * layout.groups_per_row + j / group;
                    let e = scales
                        .get(g)
                        .ok_or_else(|| MlxError::invalid(format!("{OP}: group {g} missing")))?;
                    let scale = prec.round(e8m0_to_f32(*e));
                    let code = read_code(words, bits, j) as usize;
                    let v = FP4_E2M1_VALUES.get(code).copied().unwrap_or(f32::NAN);
                    out.push(prec.round(v * scale));
                }
            }
        }
        (QuantMode::Affine, ScalesRef::E8m0(_), _) => {
            return Err(MlxError::invalid(format!(
                "{OP}: affine weights take float scales, got e8m0 bytes"
            )))
        }
        (QuantMode::Affine, ScalesRef::Float(_), None) => {
            return Err(MlxError::invalid(format!(
                "{OP}: affine weights need biases, got none"
            )))
        }
        (QuantMode::Mxfp4, ScalesRef::Float(_), _) => {
            return Err(MlxError::invalid(format!(
                "{OP}: mxfp4 weights take e8m0 byte scales, got floats"
            )))
        }
        (QuantMode::Mxfp4, ScalesRef::E8m0(_), Some(_)) => {
            return Err(MlxError::invalid(format!(
                "{OP}: mxfp4 weights have no biases, got some"
            )))
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// splitmix64 + Box-Muller: deterministic normal samples without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let u1 = self.uniform().max(1e-300);
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        }
    }

    /// `rows x cols` values: normal, per-row scale 1e-3..10, every third row shifted off zero.
    fn weight(rng: &mut Rng, rows: usize, cols: usize, dtype: DType) -> Vec<f32> {
        let prec = Precision::of(dtype, "test").unwrap();
        let mut w = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let scale = 10f64.powf(rng.uniform() * 4.0 - 3.0);
            let shift = [0.0, 3.0, -2.5][r % 3];
            for _ in 0..cols {
                w.push(prec.round(((rng.normal() + shift) * scale) as f32));
            }
        }
        w
    }

    /// Code `j` of a row, read one bit at a time (independent of `read_code`).
    fn code_by_bits(words: &[u32], bits: u32, j: usize) -> u32 {
        (0..bits)
            .map(|b| {
                let bit = j * bits as usize + b as usize;
                ((words[bit / 32] >> (bit % 32)) & 1) << b
            })
            .sum()
    }

    fn unit_roundoff(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => 2f64.powi(-24),
            DType::F16 => 2f64.powi(-11),
            _ => 2f64.powi(-8),
        }
    }

    #[test]
    fn validate_accepts_exactly_what_mlx_supports() {
        for bits in 0..=16 {
            for gs in [0, 16, 32, 48, 64, 128, 256] {
                let ok = QuantParams::affine(bits, gs).validate().is_ok();
                assert_eq!(
                    ok,
                    AFFINE_BITS.contains(&bits) && AFFINE_GROUP_SIZES.contains(&gs),
                    "b{bits} g{gs}"
                );
                let mx = QuantParams {
                    bits,
                    group_size: gs,
                    mode: QuantMode::Mxfp4,
                };
                assert_eq!(
                    mx.validate().is_ok(),
                    bits == 4 && gs == 32,
                    "mxfp4 b{bits} g{gs}"
                );
            }
        }
        let err = QuantParams::affine(7, 64).validate().unwrap_err();
        assert!(matches!(err, MlxError::Unsupported(_)));
        assert_eq!(
            err.to_string(),
            "unsupported: affine quantization with bits=7; supported bits are 2, 3, 4, 5, 6, 8"
        );
        let err = QuantParams::affine(4, 256)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("group_size=256") && err.contains("32, 64, 128"),
            "{err}"
        );
        let err = QuantParams {
            bits: 4,
            group_size: 64,
            mode: QuantMode::Mxfp4,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("group_size=64") && err.contains("bits=4, group_size=32"),
            "{err}"
        );
    }

    #[test]
    fn layout_helpers() {
        assert_eq!(packed_words_per_row(256, 4).unwrap(), 32);
        assert_eq!(packed_words_per_row(32, 3).unwrap(), 3);
        assert_eq!(packed_words_per_row(384, 5).unwrap(), 60);
        assert_eq!(packed_words_per_row(32, 6).unwrap(), 6);
        assert!(packed_words_per_row(10, 3).is_err());
        assert!(packed_words_per_row(usize::MAX, 8).is_err());
        assert_eq!(groups_per_row(384, 128).unwrap(), 3);
        assert!(groups_per_row(384, 256).is_err());
        assert!(groups_per_row(100, 0).is_err());
        let l = QuantLayout::new(5, 384, QuantParams::affine(6, 64)).unwrap();
        assert_eq!((l.words(), l.groups(), l.elements()), (5 * 72, 30, 1920));
        assert!(QuantLayout::new(0, 64, QuantParams::affine(4, 64)).is_err());
        assert!(QuantLayout::new(usize::MAX / 2, 64, QuantParams::affine(4, 64)).is_err());
    }

    #[test]
    fn codes_are_a_little_endian_bit_stream_that_straddles_words() {
        let mut rng = Rng(7);
        for bits in AFFINE_BITS {
            let cols = 128;
            let words_per_row = packed_words_per_row(cols, bits).unwrap();
            let codes: Vec<u32> = (0..2 * cols)
                .map(|_| (rng.next_u64() as u32) & ((1 << bits) - 1))
                .collect();
            let layout = QuantLayout::new(2, cols, QuantParams::affine(bits, 32)).unwrap();
            let mut packed = vec![0u32; layout.words()];
            for g in 0..layout.groups() {
                write_codes(
                    &mut packed,
                    &layout,
                    bits,
                    g,
                    32,
                    &codes[g * 32..(g + 1) * 32],
                )
                .unwrap();
            }
            for r in 0..2 {
                let row = &packed[r * words_per_row..(r + 1) * words_per_row];
                for j in 0..cols {
                    assert_eq!(
                        code_by_bits(row, bits, j),
                        codes[r * cols + j],
                        "b{bits} row {r} code {j}"
                    );
                }
            }
            let unpacked = unpack_codes(&packed, 2, cols, bits).unwrap();
            assert!(
                unpacked
                    .iter()
                    .zip(&codes)
                    .all(|(&a, &b)| u32::from(a) == b),
                "b{bits}"
            );
        }
        // 3 bits: code 10 occupies bits 30..33, the top two bits of word 0 and bit 0 of word 1.
        let mut words = [0u32; 3];
        words[0] = 0b10 << 30;
        words[1] = 0b1;
        assert_eq!(read_code(&words, 3, 10), 0b110);
        assert_eq!(read_code(&words, 3, 9), 0);
        assert_eq!(read_code(&words, 3, 11), 0);
    }

    #[test]
    fn affine_round_trip_is_within_one_step_of_the_f64_reference() {
        let mut rng = Rng(1);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let u = unit_roundoff(dtype);
            for bits in AFFINE_BITS {
                for gs in AFFINE_GROUP_SIZES {
                    let (rows, cols) = (7, 384);
                    let w = weight(&mut rng, rows, cols, dtype);
                    let params = QuantParams::affine(bits, gs);
                    let q = quantize_as(&w, rows, cols, params, dtype).unwrap();
                    let deq = q.dequantize().unwrap();
                    let Scales::Float(scales) = &q.scales else {
                        panic!("affine scales")
                    };
                    let biases = q.biases.as_ref().unwrap();
                    let wpr = packed_words_per_row(cols, bits).unwrap();
                    let n = f64::from((1u32 << bits) - 1);
                    for r in 0..rows {
                        for j in 0..cols {
                            let g = r * (cols / gs as usize) + j / gs as usize;
                            let (s, b) = (f64::from(scales[g]), f64::from(biases[g]));
                            let code = code_by_bits(&q.packed[r * wpr..(r + 1) * wpr], bits, j);
                            let reference = f64::from(code) * s + b;
                            let got = f64::from(deq[r * cols + j]);
                            // dequantize rounds the product and the sum to dtype
                            let slack = 2.0 * u * (f64::from(code) * s.abs() + b.abs());
                            assert!(
                                (got - reference).abs() <= slack,
                                "{dtype} b{bits} g{gs} [{r},{j}]: {got} vs {reference}"
                            );
                            // The error to the input is at most one step (half a step when the
                            // code is not clamped), plus the rounding of scale and bias to dtype.
                            let x = f64::from(w[r * cols + j]);
                            let stored = u * (n * s.abs() + b.abs()) * 2.0 + slack;
                            let step = if code == 0 || f64::from(code) == n {
                                1.0
                            } else {
                                0.5
                            };
                            let err = (x - reference).abs();
                            assert!(err <= step * s.abs() + stored, "{dtype} b{bits} g{gs} [{r},{j}]: |{x} - {reference}| > {step} * {s}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn affine_edge_value_is_exact_and_zero_groups_stay_zero() {
        // The larger-magnitude end of each group dequantizes exactly (f32 arithmetic).
        let mut rng = Rng(3);
        let w = weight(&mut rng, 4, 256, DType::F32);
        for bits in AFFINE_BITS {
            let q = quantize(&w, 4, 256, QuantParams::affine(bits, 64)).unwrap();
            let deq = q.dequantize().unwrap();
            for (g, (vals, back)) in w.chunks(64).zip(deq.chunks(64)).enumerate() {
                let edge = vals
                    .iter()
                    .copied()
                    .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let i = vals.iter().position(|&v| v == edge).unwrap();
                let rel = ((back[i] - edge) / edge).abs();
                assert!(
                    rel <= 2.0 * f32::EPSILON,
                    "b{bits} group {g}: edge {edge} -> {}",
                    back[i]
                );
            }
        }
        let zeros = vec![0.0; 2 * 128];
        for bits in AFFINE_BITS {
            let q = quantize(&zeros, 2, 128, QuantParams::affine(bits, 32)).unwrap();
            assert!(q.dequantize().unwrap().iter().all(|&v| v == 0.0), "b{bits}");
        }
    }

    #[test]
    fn affine_rounds_half_to_even_like_mlx() {
        // Group [0, 3, 1.5, 0.5, 2.5, 0...] at 2 bits: scale -1, bias 3, q = rint(3 - w):
        // 1.5 -> 2, 0.5 -> 2 (not 3), 2.5 -> 0 (not 1). MLX 0.32.4 gives word 0xFFFFFCA3.
        let mut w = vec![0.0f32; 32];
        w[..5].copy_from_slice(&[0.0, 3.0, 1.5, 0.5, 2.5]);
        let q = quantize(&w, 1, 32, QuantParams::affine(2, 32)).unwrap();
        assert_eq!(q.packed, [0xFFFF_FCA3, 0xFFFF_FFFF]);
        assert_eq!(q.scales, Scales::Float(vec![-1.0]));
        assert_eq!(q.biases, Some(vec![3.0]));
    }

    #[test]
    fn mxfp4_ties_scales_and_zero_groups_match_mlx() {
        // Checked against MLX 0.32.4 (CPU): ties go to the smaller magnitude, tiny negatives to +0.
        let mut w = vec![0.0f32; 64];
        w[..14].copy_from_slice(&[
            6.0, 3.5, 2.5, 1.25, 0.25, 5.0, 1.75, 0.75, -3.5, -2.5, -0.25, -0.1, -5.0, -0.75,
        ]);
        let q = quantize(&w, 1, 64, QuantParams::mxfp4()).unwrap();
        let codes = unpack_codes(&q.packed, 1, 64, 4).unwrap();
        assert_eq!(codes[..14], [7, 5, 4, 2, 0, 6, 3, 1, 13, 12, 0, 0, 14, 9]);
        assert!(codes[14..].iter().all(|&c| c == 0));
        // Second group is all zeros: scale byte 127 (2^0).
        assert_eq!(q.scales, Scales::E8m0(vec![127, 127]));
        // amax/6 just above a power of two rounds the scale up: 6.0000005 / 6 > 1 -> 2^1.
        let mut w = vec![1.0f32; 32];
        w[0] = f32::from_bits(6.0f32.to_bits() + 1);
        let q = quantize(&w, 1, 32, QuantParams::mxfp4()).unwrap();
        assert_eq!(q.scales, Scales::E8m0(vec![128]));
        let deq = q.dequantize().unwrap();
        assert_eq!((deq[0], deq[1]), (6.0, 1.0));
        // Extremes (MLX: 1e-30 -> byte 25, code 7; 3e38 -> byte 253, code 6).
        let mut w = vec![0.0f32; 64];
        w[0] = 1e-30;
        w[32] = 3e38;
        let q = quantize(&w, 1, 64, QuantParams::mxfp4()).unwrap();
        assert_eq!(q.scales, Scales::E8m0(vec![25, 253]));
        assert_eq!(q.packed[0] & 0xf, 7);
        assert_eq!(q.packed[4] & 0xf, 6);
    }

    #[test]
    fn mxfp4_round_trip_error_is_within_half_the_widest_fp4_gap() {
        let mut rng = Rng(11);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = weight(&mut rng, 6, 256, dtype);
            let q = quantize_as(&w, 6, 256, QuantParams::mxfp4(), dtype).unwrap();
            let deq = q.dequantize().unwrap();
            let Scales::E8m0(bytes) = &q.scales else {
                panic!("mxfp4 scales")
            };
            for (i, (&x, &y)) in w.iter().zip(&deq).enumerate() {
                let s = f64::from(e8m0_to_f32(bytes[i / 32]));
                let (x, y) = (f64::from(x), f64::from(y));
                // The FP4 grid's widest gap is 2 (between 4 and 6); values never exceed 6*s.
                assert!(
                    (x - y).abs() <= s * 1.0 * (1.0 + 1e-6),
                    "{dtype} [{i}]: {x} -> {y} (scale {s})"
                );
                assert!(x.abs() <= 6.0 * s, "{dtype} [{i}]: {x} beyond 6 * {s}");
            }
        }
    }

    #[test]
    fn invalid_arguments_are_reported_with_got_and_expected() {
        let w = vec![0.5f32; 2 * 64];
        let msg = |e: MlxError| e.to_string();
        assert_eq!(
            msg(quantize(&w[..100], 2, 64, QuantParams::affine(4, 32)).unwrap_err()),
            "quantize: w has 100 elements, expected 128 (2 x 64)"
        );
        assert!(
            msg(quantize(&w, 2, 64, QuantParams::affine(4, 128)).unwrap_err())
                .contains("not divisible by group_size 128")
        );
        let mut bad = w.clone();
        bad[5] = f32::NAN;
        assert!(
            msg(quantize(&bad, 2, 64, QuantParams::affine(4, 32)).unwrap_err())
                .contains("w[5] is NaN")
        );
        let mut bad = w.clone();
        bad[3] = 1.0 + f32::EPSILON;
        assert!(msg(
            quantize_as(&bad, 2, 64, QuantParams::affine(4, 32), DType::BF16).unwrap_err()
        )
        .contains("not representable in bf16"));
        assert!(matches!(
            quantize_as(&w, 2, 64, QuantParams::affine(4, 32), DType::U32),
            Err(MlxError::Unsupported(_))
        ));
        assert!(matches!(
            quantize(&w, 2, 64, QuantParams::affine(7, 32)),
            Err(MlxError::Unsupported(_))
        ));

        let q = quantize(&w, 2, 64, QuantParams::affine(4, 32)).unwrap();
        let Scales::Float(s) = &q.scales else {
            panic!("affine scales")
        };
        let b = q.biases.as_deref().unwrap();
        let p = QuantParams::affine(4, 32);
        assert_eq!(
            msg(dequantize(&q.packed, ScalesRef::Float(&s[..3]), Some(b), 2, 64, p).unwrap_err()),
            "dequantize: scales has 3 elements, expected 4"
        );
        assert_eq!(
            msg(dequantize(&q.packed[..15], ScalesRef::Float(s), Some(b), 2, 64, p).unwrap_err()),
            "dequantize: packed has 15 elements, expected 16"
        );
        assert_eq!(
            msg(dequantize(&q.packed, ScalesRef::Float(s), Some(&b[..1]), 2, 64, p).unwrap_err()),
            "dequantize: biases has 1 elements, expected 4"
        );
        assert!(
            msg(dequantize(&q.packed, ScalesRef::Float(s), None, 2, 64, p).unwrap_err())
                .contains("need biases")
        );
        assert!(msg(
            dequantize(&q.packed, ScalesRef::E8m0(&[127; 4]), Some(b), 2, 64, p).unwrap_err()
        )
        .contains("float scales"));
        let mx = QuantParams::mxfp4();
        assert!(
            msg(dequantize(&q.packed, ScalesRef::Float(s), None, 2, 64, mx).unwrap_err())
                .contains("e8m0")
        );
        assert!(msg(
            dequantize(&q.packed, ScalesRef::E8m0(&[127; 4]), Some(b), 2, 64, mx).unwrap_err()
        )
        .contains("no biases"));
        assert!(dequantize(&q.packed, ScalesRef::E8m0(&[127; 4]), None, 2, 64, mx).is_ok());
        assert!(
            msg(dequantize(&q.packed, ScalesRef::Float(s), Some(b), 2, 60, p).unwrap_err())
                .contains("not a whole number")
        );
        assert!(matches!(
            dequantize_as(
                &q.packed,
                ScalesRef::Float(s),
                Some(b),
                2,
                64,
                p,
                DType::I32
            ),
            Err(MlxError::Unsupported(_))
        ));
        assert!(unpack_codes(&q.packed, 3, 64, 4).is_err());
        assert!(unpack_codes(&q.packed, 2, 64, 9).is_err());
    }

    #[test]
    fn rounding_helpers() {
        assert_eq!(
            round_to_dtype(1.0 + f32::EPSILON, DType::BF16).unwrap(),
            1.0
        );
        assert_eq!(
            round_to_dtype(0.1, DType::F16).unwrap(),
            f16::from_f32(0.1).to_f32()
        );
        assert_eq!(round_to_dtype(0.1, DType::F32).unwrap(), 0.1);
        assert!(round_to_dtype(0.1, DType::U8).is_err());
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert!(e8m0_to_f32(255).is_infinite());
        assert_eq!(ceil_log2(1.0), 0);
        assert_eq!(ceil_log2(1.0000001), 1);
        assert_eq!(ceil_log2(0.75), 0);
        assert_eq!(ceil_log2(0.5), -1);
        assert_eq!(ceil_log2(f32::from_bits(1)), -149);
    }
}

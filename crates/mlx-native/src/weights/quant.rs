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
    if bits == 0 || total_bits % 32 != 0 {
        return Err(MlxError::invalid(format!(
            "quant: a row of {cols} values at {bits} bits is {total_bits} bits, not a whole number of 32-bit words"
        )));
    }
    Ok(total_bits / 32)
}

/// Groups (scales) per row. Errors unless `group_size` divides `cols`.
pub fn groups_per_row(cols: usize, group_size: u32) -> Result<usize> {
    let gs = usize::try_from(group_size).unwrap_or(0);
    if gs == 0 || cols % gs != 0 {
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

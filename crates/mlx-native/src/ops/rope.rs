//! Rotary position embedding: `rope` over f32 activations with an explicit position per token.
//!
//! Layout: `x` is `[tokens, heads, head_dim]` row-major, or the same memory seen as
//! `[tokens, heads * head_dim]` (a fused QKV projection output, split by views); `positions`
//! is `[tokens]` of u32 or i32, one position per token in any order, so chunked prefill,
//! sliding windows and batched decode all pass their own. Every head of a token uses the
//! token's position. The output has the shape of `x`.
//!
//! Frequencies are a `RopeTable`, built once per model from a `RopeConfig` (f64 on the CPU,
//! uploaded once): a dispatch uploads nothing. Scalings follow mlx-lm's `rope_utils.py` and
//! HF transformers' `modeling_rope_utils.py`: linear, llama3 (Llama 3.1 smoothing between
//! low- and high-frequency bands) and YaRN (ramp between interpolated and extrapolated
//! frequencies plus the attention factor `mscale`, applied to the rotated elements only).
//!
//! Precision: the kernel reduces `position * inv_freq` modulo one turn with exact partial
//! products (see `turns()` in rope.wgsl), so the angle is good to about 1e-6 turns (6e-6 rad)
//! for any |position| < 2^24, where a plain f32 product errs by about `position * 2^-24` rad
//! (0.006 rad at 100,000). What remains is the device's f32 `sin`/`cos` on [-pi, pi]: about
//! 1e-7 on most hardware (Vulkan itself only promises 2^-11 absolute there).

use crate::buffer::MlxBuffer;
use crate::check;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

/// Which elements of a head form a rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: MLX `traditional=True`, llama.cpp NORM (GPT-J style).
    Traditional,
    /// Halves `(i, i + rotary_dims / 2)`: llama.cpp NEOX, HF `rotate_half`, MLX
    /// `traditional=False`.
    Neox,
}

/// How the base frequencies are rescaled for long context.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1: wavelengths above `original_max_position_embeddings / low_freq_factor`
    /// divided by `factor`, below `original / high_freq_factor` kept, smooth in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN. Config defaults: `beta_fast` 32, `beta_slow` 1, `mscale` 1, `mscale_all_dim` 0.
    /// `attention_factor`, when set, replaces the computed attention factor (HF semantics).
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        mscale: f32,
        mscale_all_dim: f32,
        attention_factor: Option<f32>,
    },
}

/// Rotary embedding of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// Elements per head (even).
    pub head_dim: usize,
    /// Leading elements of each head that rotate (even, <= head_dim); the rest pass through.
    /// The frequency exponent runs over `rotary_dims`, as in HF `partial_rotary_factor`.
    pub rotary_dims: usize,
    /// `rope_theta`.
    pub base: f32,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

const OP: &str = "rope";

fn finite_positive(v: f32, what: &str) -> Result<()> {
    check::ensure(v.is_finite() && v > 0.0, OP, || {
        format!("{what} is {v}, expected a finite number > 0")
    })
}

impl RopeConfig {
    /// Full rotary, no scaling.
    pub fn new(head_dim: usize, base: f32, style: RopeStyle) -> Self {
        RopeConfig {
            head_dim,
            rotary_dims: head_dim,
            base,
            style,
            scaling: RopeScaling::None,
        }
    }

    /// Check every field; `RopeTable::new` calls it.
    pub fn validate(&self) -> Result<()> {
        let hd = self.head_dim;
        check::ensure(hd > 0 && hd.is_multiple_of(2), OP, || {
            format!("head_dim is {hd}, expected an even number > 0")
        })?;
        let rd = self.rotary_dims;
        check::ensure(rd >= 2 && rd.is_multiple_of(2) && rd <= hd, OP, || {
            format!("rotary_dims is {rd}, expected an even number in 2..={hd}")
        })?;
        check::ensure(self.base.is_finite() && self.base > 1.0, OP, || {
            format!("base is {}, expected a finite number > 1", self.base)
        })?;
        match self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => finite_positive(factor, "linear factor")?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                finite_positive(factor, "llama3 factor")?;
                finite_positive(low_freq_factor, "llama3 low_freq_factor")?;
                finite_positive(high_freq_factor, "llama3 high_freq_factor")?;
                check::ensure(high_freq_factor > low_freq_factor, OP, || {
                    format!(
                        "llama3 high_freq_factor is {high_freq_factor}, expected more than \
                         low_freq_factor {low_freq_factor}"
                    )
                })?;
                check::ensure(original_max_position_embeddings > 0, OP, || {
                    "llama3 original_max_position_embeddings is 0".into()
                })?;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            } => {
                finite_positive(factor, "yarn factor")?;
                finite_positive(beta_fast, "yarn beta_fast")?;
                finite_positive(beta_slow, "yarn beta_slow")?;
                check::ensure(mscale.is_finite() && mscale_all_dim.is_finite(), OP, || {
                    format!("yarn mscale {mscale} / mscale_all_dim {mscale_all_dim} not finite")
                })?;
                if let Some(a) = attention_factor {
                    finite_positive(a, "yarn attention_factor")?;
                }
                check::ensure(original_max_position_embeddings > 0, OP, || {
                    "yarn original_max_position_embeddings is 0".into()
                })?;
            }
        }
        Ok(())
    }

    /// Inverse frequency (radians per position) of each of the `rotary_dims / 2` pairs, in f64.
    pub fn inv_freqs(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let d = self.rotary_dims as f64;
        let base = f64::from(self.base);
        let plain = (0..self.rotary_dims / 2).map(move |i| base.powf(-2.0 * i as f64 / d));
        let two_pi = 2.0 * std::f64::consts::PI;
        Ok(match self.scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / f64::from(factor)).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let factor = f64::from(factor);
                let (lo, hi) = (f64::from(low_freq_factor), f64::from(high_freq_factor));
                let ctx = original_max_position_embeddings as f64;
                // Wavelengths (positions per turn) bounding the smoothed band.
                let (long_wl, short_wl) = (ctx / lo, ctx / hi);
                plain
                    .map(|f| {
                        let wl = two_pi / f;
                        if wl < short_wl {
                            f
                        } else if wl > long_wl {
                            f / factor
                        } else {
                            // Inclusive at both ends, as HF: continuous there.
                            let s = (ctx / wl - lo) / (hi - lo);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                ..
            } => {
                let factor = f64::from(factor);
                let ctx = original_max_position_embeddings as f64;
                // The pair index at which a frequency makes `rotations` turns over the
                // original context.
                let dim_of =
                    |rotations: f64| d * (ctx / (rotations * two_pi)).ln() / (2.0 * base.ln());
                let low = dim_of(f64::from(beta_fast)).floor().max(0.0);
                let mut high = dim_of(f64::from(beta_slow)).ceil().min(d - 1.0);
                if low == high {
                    high += 0.001;
                }
                plain
                    .enumerate()
                    .map(|(i, f)| {
                        // 0 below `low`: keep the trained frequency (extrapolate); 1 above
                        // `high`: interpolate (divide by factor).
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f * (1.0 - ramp) + f / factor * ramp
                    })
                    .collect()
            }
        })
    }

    /// Factor on the rotated elements: YaRN's attention factor, 1 for the other scalings.
    pub fn attention_scale(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => {
                if let Some(a) = attention_factor {
                    return f64::from(a);
                }
                let f = f64::from(factor);
                let m = |k: f32| {
                    if f <= 1.0 {
                        1.0
                    } else {
                        0.1 * f64::from(k) * f.ln() + 1.0
                    }
                };
                m(mscale) / m(mscale_all_dim)
            }
            _ => 1.0,
        }
    }
}

/// A `RopeConfig` with its frequencies on the GPU: build once per model (or per distinct
/// layer config), pass to every `rope` call.
#[derive(Clone, Debug)]
pub struct RopeTable {
    cfg: RopeConfig,
    /// Per pair: `f = inv_freq / 2pi` (turns per position) as `[fh, fl, f2, 0]`, where `fh`
    /// and `fl` have at most 12 significant bits, `fh + fl = f32(f)`, `f2 = f32(f - f32(f))`.
    freqs: MlxBuffer,
    mscale: f32,
}

impl RopeTable {
    pub fn new(gpu: &MlxDevice, cfg: &RopeConfig) -> Result<Self> {
        let inv = cfg.inv_freqs()?;
        let mut words = Vec::with_capacity(4 * inv.len());
        for f in inv {
            let t = f / (2.0 * std::f64::consts::PI);
            let t1 = t as f32;
            let fh = f32::from_bits(t1.to_bits() & 0xFFFF_F000);
            words.extend_from_slice(&[fh, t1 - fh, (t - f64::from(t1)) as f32, 0.0]);
        }
        Ok(RopeTable {
            cfg: *cfg,
            freqs: MlxBuffer::from_slice(gpu, &words, &[words.len()])?,
            mscale: cfg.attention_scale() as f32,
        })
    }

    pub fn config(&self) -> &RopeConfig {
        &self.cfg
    }

    /// The factor applied to rotated elements (YaRN attention factor, else 1).
    pub fn attention_scale(&self) -> f32 {
        self.mscale
    }

    /// The per-pair frequency table the kernels read.
    pub(crate) fn freqs(&self) -> &MlxBuffer {
        &self.freqs
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    total: u32,
    heads: u32,
    head_dim: u32,
    half: u32,
    rot_half: u32,
    mscale: f32,
    _pad0: u32,
    _pad1: u32,
}
const _: () = assert!(std::mem::size_of::<RopeParams>() == 32);

const WG: u32 = 256;
const POSITION_DTYPES: [DType; 2] = [DType::U32, DType::I32];

fn spec(pos_dtype: DType, style: RopeStyle) -> Result<Spec> {
    Spec::new("rope", pos_dtype, WG).with_const("NEOX", u32::from(style == RopeStyle::Neox))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for dt in POSITION_DTYPES {
        for style in [RopeStyle::Traditional, RopeStyle::Neox] {
            v.push((Kernel::Rope, spec(dt, style)?));
            for wg in super::ROW_WGS {
                for sg in [false, true] {
                    v.push((Kernel::Rope, norm_spec(dt, style, wg, sg)?));
                }
            }
        }
    }
    Ok(v)
}

/// Rotate `x` (`[tokens, heads, head_dim]` or `[tokens, heads * head_dim]`, f32) by the
/// angles `positions[t] * inv_freq` (`positions`: `[tokens]` u32 or i32; |position| < 2^24
/// for full angle precision). Returns a new buffer shaped like `x`.
pub fn rope(
    pass: &mut Pass,
    x: &MlxBuffer,
    positions: &MlxBuffer,
    table: &RopeTable,
) -> Result<MlxBuffer> {
    let (params, y) = prepare(pass, OP, x, positions, table)?;
    let total = params.total;
    pass.dispatch(
        Kernel::Rope,
        spec(positions.dtype(), table.cfg.style)?,
        &params,
        &[x, positions, &table.freqs, &y],
        total.div_ceil(WG),
    )?;
    Ok(y)
}

/// Per-head RMS norm (f32 `weight [head_dim]`, `eps`) then RoPE, in one dispatch: the q/k
/// norm of Qwen3 and Gemma 3. Same layouts as [`rope`].
pub fn norm_rope(
    pass: &mut Pass,
    x: &MlxBuffer,
    weight: &MlxBuffer,
    eps: f32,
    positions: &MlxBuffer,
    table: &RopeTable,
) -> Result<MlxBuffer> {
    let op = "norm_rope";
    check::dtype(weight, &[DType::F32, DType::F16, DType::BF16], op, "weight")?;
    check::len(weight, table.cfg.head_dim, op, "weight")?;
    if weight.dtype() != DType::F32 {
        // The fused kernel's dtype slot selects the position type; 16-bit norm weights
        // take the two-dispatch path (same math).
        let rows = x.reshape(&[x.len() / table.cfg.head_dim, table.cfg.head_dim])?;
        let normed = super::rms_norm(pass, &rows, weight, eps)?.reshape(x.shape())?;
        return rope(pass, &normed, positions, table);
    }
    let (mut params, y) = prepare(pass, op, x, positions, table)?;
    let rows = check::fits_u32(x.len() / table.cfg.head_dim, op, "rows")?;
    params.total = rows;
    params._pad0 = eps.to_bits();
    let (wg, sg) = super::row_wg(pass.caps(), table.cfg.head_dim / 2);
    let spec = norm_spec(positions.dtype(), table.cfg.style, wg, sg)?;
    pass.dispatch(
        Kernel::Rope,
        spec,
        &params,
        &[x, positions, &table.freqs, &y, weight],
        rows,
    )?;
    Ok(y)
}

fn norm_spec(pos_dtype: DType, style: RopeStyle, wg: u32, sg: bool) -> Result<Spec> {
    Spec::new("norm_rope", pos_dtype, wg)
        .with_subgroups(sg)
        .with_const("NEOX", u32::from(style == RopeStyle::Neox))
}

/// Shared argument checks; the output buffer and the params of a per-pair dispatch.
fn prepare(
    pass: &mut Pass,
    op: &str,
    x: &MlxBuffer,
    positions: &MlxBuffer,
    table: &RopeTable,
) -> Result<(RopeParams, MlxBuffer)> {
    let cfg = &table.cfg;
    let hd = cfg.head_dim;
    check::dtype(x, &[DType::F32], op, "x")?;
    check::dtype(positions, &POSITION_DTYPES, op, "positions")?;
    let s = x.shape();
    let shape_ok = match s {
        [_, _, d] => *d == hd,
        [_, n] => n.is_multiple_of(hd),
        _ => false,
    };
    check::ensure(shape_ok, op, || {
        format!("x has shape {s:?}, expected [tokens, heads, {hd}] or [tokens, heads * {hd}]")
    })?;
    let tokens = s[0];
    check::len(positions, tokens, op, "positions")?;
    let total = check::fits_u32(x.len() / 2, op, "pairs")?;
    let y = pass.alloc_like(x)?;
    let params = RopeParams {
        total,
        heads: (x.len() / hd / tokens) as u32,
        head_dim: hd as u32,
        half: (hd / 2) as u32,
        rot_half: (cfg.rotary_dims / 2) as u32,
        mscale: table.mscale,
        _pad0: 0,
        _pad1: 0,
    };
    Ok((params, y))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, devices, gpu, Rng};
    use std::f64::consts::PI;

    // Frequencies written independently, in mlx-lm's form: periods `base^(2i/d)` (positions
    // per radian) that the scalings stretch; the inverse frequency is 1 / period.
    fn ref_inv_freqs(cfg: &RopeConfig) -> Vec<f64> {
        let d = cfg.rotary_dims;
        let base = cfg.base as f64;
        let periods: Vec<f64> = (0..d)
            .step_by(2)
            .map(|e| base.powf(e as f64 / d as f64))
            .collect();
        let out: Vec<f64> = match cfg.scaling {
            RopeScaling::None => periods,
            RopeScaling::Linear { factor } => periods.iter().map(|p| p * factor as f64).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lf,
                high_freq_factor: hf,
                original_max_position_embeddings: ctx,
            } => {
                let (f, lf, hf, ctx) = (factor as f64, lf as f64, hf as f64, ctx as f64);
                periods
                    .iter()
                    .map(|&p| {
                        let wavelen = 2.0 * PI * p;
                        if wavelen > ctx / lf {
                            p * f
                        } else if wavelen >= ctx / hf {
                            let sm = (ctx / wavelen - lf) / (hf - lf);
                            p / ((1.0 - sm) / f + sm)
                        } else {
                            p
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: ctx,
                beta_fast,
                beta_slow,
                ..
            } => {
                let corr = |rot: f32| {
                    d as f64 * (ctx as f64 / (rot as f64 * 2.0 * PI)).ln() / (2.0 * base.ln())
                };
                let lo = (corr(beta_fast).floor() as i64).max(0) as f64;
                let mut hi = (corr(beta_slow).ceil() as i64).min(d as i64 - 1) as f64;
                if lo == hi {
                    hi += 0.001;
                }
                periods
                    .iter()
                    .enumerate()
                    .map(|(i, &extra)| {
                        let inter = factor as f64 * extra;
                        let mask = 1.0 - ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        inter * extra / (inter * mask + extra * (1.0 - mask))
                    })
                    .collect()
            }
        };
        out.iter().map(|p| 1.0 / p).collect()
    }

    fn ref_mscale(cfg: &RopeConfig) -> f64 {
        match cfg.scaling {
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                attention_factor: None,
                ..
            } => {
                let g = |m: f32| 0.1 * m as f64 * (factor as f64).ln() + 1.0;
                g(mscale) / g(mscale_all_dim)
            }
            RopeScaling::Yarn {
                attention_factor: Some(a),
                ..
            } => a as f64,
            _ => 1.0,
        }
    }

    /// f64 rope of one `[tokens, heads * head_dim]` block.
    fn ref_rope(x: &[f32], pos: &[i64], cfg: &RopeConfig) -> Vec<f64> {
        let inv = ref_inv_freqs(cfg);
        let m = ref_mscale(cfg);
        let (hd, rd) = (cfg.head_dim, cfg.rotary_dims);
        let row_len = x.len() / pos.len();
        let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (t, &p) in pos.iter().enumerate() {
            for h in 0..row_len / hd {
                let o = t * row_len + h * hd;
                for (j, &w) in inv.iter().enumerate() {
                    let (i0, i1) = match cfg.style {
                        RopeStyle::Traditional => (2 * j, 2 * j + 1),
                        RopeStyle::Neox => (j, j + rd / 2),
                    };
                    let (c, s) = ((p as f64 * w).cos(), (p as f64 * w).sin());
                    let (a, b) = (x[o + i0] as f64, x[o + i1] as f64);
                    y[o + i0] = (a * c - b * s) * m;
                    y[o + i1] = (a * s + b * c) * m;
                }
            }
        }
        y
    }

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    fn yarn(attention_factor: Option<f32>) -> RopeScaling {
        RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 0.0,
            attention_factor,
        }
    }

    // Angle: reduced modulo one turn to about 1e-6 turns = 6.3e-6 rad (see the module doc);
    // sin/cos of lavapipe (LLVM) a few ulp; outputs |x| <= ~5 for unit normals. So the error
    // is at most about 5 * 7e-6 = 3.5e-5 absolute; 5e-5 catches any wrong pair, position,
    // frequency (the smallest frequency step between neighbours is far larger) or style.
    const ATOL: f64 = 5e-5;

    #[test]
    fn frequencies_match_the_period_form() -> Result<()> {
        for scaling in [
            RopeScaling::None,
            RopeScaling::Linear { factor: 4.0 },
            llama3(),
            yarn(None),
        ] {
            for (hd, rd, base) in [(128, 128, 500_000.0), (128, 64, 10_000.0), (80, 80, 1e6)] {
                let cfg = RopeConfig {
                    rotary_dims: rd,
                    scaling,
                    ..RopeConfig::new(hd, base, RopeStyle::Neox)
                };
                let got = cfg.inv_freqs()?;
                let want = ref_inv_freqs(&cfg);
                assert_eq!(got.len(), rd / 2);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-12 * w.abs(),
                        "{scaling:?} hd {hd} rd {rd} pair {i}: {g} vs {w}"
                    );
                }
                assert!((cfg.attention_scale() - ref_mscale(&cfg)).abs() < 1e-12);
            }
        }
        // Llama 3.1 8B: the highest frequency is untouched, the lowest divided by 8, and the
        // smoothed band lies in between.
        let cfg = RopeConfig {
            scaling: llama3(),
            ..RopeConfig::new(128, 500_000.0, RopeStyle::Neox)
        };
        let (got, plain) = (
            cfg.inv_freqs()?,
            RopeConfig::new(128, 500_000.0, RopeStyle::Neox),
        );
        let plain = plain.inv_freqs()?;
        assert_eq!(got[0], plain[0]);
        assert!((got[63] - plain[63] / 8.0).abs() < 1e-18);
        // YaRN factor 40, mscale 1: attention factor 0.1 ln 40 + 1.
        let cfg = RopeConfig {
            scaling: yarn(None),
            ..RopeConfig::new(64, 10_000.0, RopeStyle::Neox)
        };
        assert!((cfg.attention_scale() - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
        Ok(())
    }

    fn run(
        g: &MlxDevice,
        x: &[f32],
        shape: &[usize],
        pos: &[i64],
        pos_i32: bool,
        cfg: &RopeConfig,
    ) -> Result<Vec<f32>> {
        let gx = MlxBuffer::from_slice(g, x, shape)?;
        let gp = if pos_i32 {
            let p: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
            MlxBuffer::from_slice(g, &p, &[p.len()])?
        } else {
            let p: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
            MlxBuffer::from_slice(g, &p, &[p.len()])?
        };
        let table = RopeTable::new(g, cfg)?;
        let mut pass = g.begin();
        let y = rope(&mut pass, &gx, &gp, &table)?;
        pass.commit_and_wait()?;
        assert_eq!(y.shape(), shape);
        y.to_vec(g)
    }

    #[test]
    fn rope_matches_f64_for_styles_scalings_and_head_dims() -> Result<()> {
        let mut rng = Rng::new(40);
        let g = gpu();
        let scalings = [
            RopeScaling::None,
            RopeScaling::Linear { factor: 2.5 },
            llama3(),
            yarn(None),
            yarn(Some(1.0)),
        ];
        let mut case = 0;
        for style in [RopeStyle::Traditional, RopeStyle::Neox] {
            for &(hd, rd) in &[
                (64, 64),
                (80, 80),
                (128, 128),
                (256, 256),
                (128, 64),
                (80, 32),
            ] {
                for scaling in scalings {
                    case += 1;
                    let (tokens, heads) = (3 + case % 4, 1 + case % 3);
                    // Positions out of order, up to 100,000.
                    let pos: Vec<i64> = (0..tokens)
                        .map(|t| {
                            if t == 0 {
                                100_000
                            } else {
                                rng.below(100_001) as i64
                            }
                        })
                        .collect();
                    let cfg = RopeConfig {
                        head_dim: hd,
                        rotary_dims: rd,
                        base: if hd == 128 { 500_000.0 } else { 10_000.0 },
                        style,
                        scaling,
                    };
                    let x = rng.normals(tokens * heads * hd, 1.0);
                    let pos_i32 = case % 2 == 0;
                    let got = run(g, &x, &[tokens, heads, hd], &pos, pos_i32, &cfg)?;
                    let want = ref_rope(&x, &pos, &cfg);
                    let what = format!("{style:?} hd {hd} rd {rd} {scaling:?} i32={pos_i32}");
                    assert_close(&got, &want, ATOL, 0.0, &what);
                    // Pass-through elements are copied bit for bit.
                    for (k, (&a, &b)) in got.iter().zip(&x).enumerate() {
                        if k % hd >= rd {
                            assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {k}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn norm_rope_equals_rms_norm_then_rope_in_f64() -> Result<()> {
        let mut rng = Rng::new(41);
        for g in devices() {
            for &(hd, rd, style) in &[
                (64usize, 64usize, RopeStyle::Neox),
                (128, 128, RopeStyle::Neox),
                (256, 256, RopeStyle::Neox),
                (128, 64, RopeStyle::Traditional),
            ] {
                let (tokens, heads) = (5, 3);
                let cfg = RopeConfig {
                    rotary_dims: rd,
                    ..RopeConfig::new(hd, 1_000_000.0, style)
                };
                let x = rng.normals(tokens * heads * hd, 2.0);
                let w = rng.normals(hd, 1.0);
                let pos: Vec<i64> = (0..tokens).map(|_| rng.below(50_000) as i64).collect();
                // Reference: RMS norm per head row in f64, then the independent rope reference.
                let normed: Vec<f32> = x
                    .chunks(hd)
                    .flat_map(|row| {
                        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hd as f64;
                        let inv = 1.0 / (ms + 1e-6).sqrt();
                        row.iter()
                            .zip(&w)
                            .map(move |(&v, &wi)| (v as f64 * inv * wi as f64) as f32)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let want = ref_rope(&normed, &pos, &cfg);
                let gx = MlxBuffer::from_slice(g, &x, &[tokens, heads, hd])?;
                let gw = MlxBuffer::from_slice(g, &w, &[hd])?;
                let p: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
                let gp = MlxBuffer::from_slice(g, &p, &[tokens])?;
                let table = RopeTable::new(g, &cfg)?;
                let mut pass = g.begin();
                let y = norm_rope(&mut pass, &gx, &gw, 1e-6, &gp, &table)?;
                pass.commit_and_wait()?;
                // Rope's angle error plus the norm's f32 reduction (values ~ |w| * 3).
                assert_close(
                    &y.to_vec(g)?,
                    &want,
                    2e-4,
                    2e-5,
                    &format!("norm_rope hd {hd} rd {rd}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn single_token_many_tokens_and_flat_layout() -> Result<()> {
        let mut rng = Rng::new(41);
        for g in devices() {
            let cfg = RopeConfig::new(64, 10_000.0, RopeStyle::Neox);
            // One token (decode) at position 0: the identity.
            let x = rng.normals(64, 1.0);
            let got = run(g, &x, &[1, 1, 64], &[0], false, &cfg)?;
            let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            assert_close(&got, &want, 1e-7, 0.0, "position 0");
            // 9000 tokens x 1 head x 64 (> 8192 rows), positions shuffled, flat layout.
            let tokens = 9000;
            let mut pos: Vec<i64> = (0..tokens as i64).map(|t| t * 11).collect();
            for i in (1..tokens).rev() {
                pos.swap(i, rng.below(i + 1));
            }
            let x = rng.normals(tokens * 64, 1.0);
            let got = run(g, &x, &[tokens, 64], &pos, false, &cfg)?;
            assert_close(&got, &ref_rope(&x, &pos, &cfg), ATOL, 0.0, "9000 tokens");
            // [tokens, heads * head_dim] with several heads, traditional, negative i32 positions.
            let cfg = RopeConfig::new(80, 10_000.0, RopeStyle::Traditional);
            let pos = [-5i64, 70_000, 3];
            let x = rng.normals(3 * 4 * 80, 1.0);
            let got = run(g, &x, &[3, 320], &pos, true, &cfg)?;
            assert_close(&got, &ref_rope(&x, &pos, &cfg), ATOL, 0.0, "flat 4 heads");
        }
        Ok(())
    }

    #[test]
    fn views_at_odd_offsets() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(42);
        let (tokens, heads, hd) = (5, 3, 64);
        let n = tokens * heads * hd;
        let data = rng.normals(n + 100, 1.0);
        let base = MlxBuffer::from_slice(g, &data, &[n + 100])?;
        let x = base.view(37, &[tokens, heads, hd])?;
        let pos_data: Vec<u32> = (0..20).map(|_| rng.below(100_000) as u32).collect();
        let pbase = MlxBuffer::from_slice(g, &pos_data, &[20])?;
        let positions = pbase.view(7, &[tokens])?;
        let cfg = RopeConfig {
            rotary_dims: 32,
            scaling: yarn(None),
            ..RopeConfig::new(hd, 10_000.0, RopeStyle::Neox)
        };
        let table = RopeTable::new(g, &cfg)?;
        let mut pass = g.begin();
        let y = rope(&mut pass, &x, &positions, &table)?;
        pass.commit_and_wait()?;
        let pos: Vec<i64> = pos_data[7..7 + tokens].iter().map(|&p| p as i64).collect();
        let want = ref_rope(&data[37..37 + n], &pos, &cfg);
        assert_close(&y.to_vec(g)?, &want, ATOL, 0.0, "views");
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let cfg = RopeConfig::new(8, 10_000.0, RopeStyle::Neox);
        let err = |c: RopeConfig| RopeTable::new(g, &c).unwrap_err().to_string();
        assert_eq!(
            err(RopeConfig::new(7, 10_000.0, RopeStyle::Neox)),
            "rope: head_dim is 7, expected an even number > 0"
        );
        let msg = "rope: rotary_dims is 10, expected an even number in 2..=8";
        assert_eq!(
            err(RopeConfig {
                rotary_dims: 10,
                ..cfg
            }),
            msg
        );
        let msg = "rope: rotary_dims is 5, expected an even number in 2..=8";
        assert_eq!(
            err(RopeConfig {
                rotary_dims: 5,
                ..cfg
            }),
            msg
        );
        assert_eq!(
            err(RopeConfig { base: 0.0, ..cfg }),
            "rope: base is 0, expected a finite number > 1"
        );
        let bad_llama = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(
            err(RopeConfig {
                scaling: bad_llama,
                ..cfg
            }),
            "rope: llama3 high_freq_factor is 4, expected more than low_freq_factor 4"
        );
        assert_eq!(
            err(RopeConfig {
                scaling: RopeScaling::Linear { factor: 0.0 },
                ..cfg
            }),
            "rope: linear factor is 0, expected a finite number > 0"
        );

        let table = RopeTable::new(g, &cfg)?;
        let x = MlxBuffer::from_slice(g, &[1.0f32; 48], &[3, 2, 8])?;
        let p3 = MlxBuffer::from_slice(g, &[0u32, 1, 2], &[3])?;
        let p4 = MlxBuffer::from_slice(g, &[0u32; 4], &[4])?;
        let pf = MlxBuffer::from_slice(g, &[0.0f32; 3], &[3])?;
        let xh = MlxBuffer::from_slice(g, &[half::f16::ONE; 48], &[3, 2, 8])?;
        let mut pass = g.begin();
        let e = |r: Result<MlxBuffer>| r.unwrap_err().to_string();
        assert_eq!(
            e(rope(&mut pass, &x, &p4, &table)),
            "rope: positions has 4 elements, expected 3"
        );
        assert_eq!(
            e(rope(&mut pass, &x, &pf, &table)),
            "rope: positions is f32, expected u32 or i32"
        );
        assert_eq!(
            e(rope(&mut pass, &xh, &p3, &table)),
            "rope: x is f16, expected f32"
        );
        let x12 = x.reshape(&[3, 16])?.view(0, &[3, 12])?;
        assert_eq!(
            e(rope(&mut pass, &x12, &p3, &table)),
            "rope: x has shape [3, 12], expected [tokens, heads, 8] or [tokens, heads * 8]"
        );
        let x4 = x.reshape(&[3, 2, 4, 2])?;
        assert_eq!(
            e(rope(&mut pass, &x4, &p3, &table)),
            "rope: x has shape [3, 2, 4, 2], expected [tokens, heads, 8] or [tokens, heads * 8]"
        );
        Ok(())
    }
}

//! Writes into a layer's KV cache buffers at a position, by kernel, converting f32
//! activations to the cache dtype (f16 or f32):
//! - `kv_append`: new K/V rows. `KvCache::append` is the usual entry point.
//! - `rope_append`: the decode step's fused helper over a stacked q|k|v projection: per-head
//!   RMS norm (Qwen3, Gemma 3) and RoPE on q and k, q written out, k and v into the cache, in
//!   one dispatch where rope (or two norm_ropes) and kv_append take two or three.
//!   `KvCache::rope_append` is the entry point (compressed caches rotate, then quantize
//!   on their own append).

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};
use crate::ops::rope::{RopeStyle, RopeTable};

/// Params of both entries (kv.wgsl); rope_append's fields are 0 for kv_append.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct KvParams {
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    slots: u32,
    start: u32,
    row_words: u32,
    items: u32,
    n_heads: u32,
    half: u32,
    rot_half: u32,
    mscale: f32,
    eps: f32,
}
const _: () = assert!(std::mem::size_of::<KvParams>() == 48);

const WG: u32 = 256;
/// rope_append: one workgroup per head row, an invocation per pair for head_dim <= 128.
const ROPE_APPEND_WG: u32 = 64;
/// Largest head_dim rope_append stages in workgroup memory.
const ROPE_APPEND_MAX_HEAD_DIM: usize = 512;

/// The dtypes a KV cache may have.
pub const KV_DTYPES: [DType; 2] = [DType::F16, DType::F32];

fn rope_append_spec(dt: DType, style: RopeStyle, norm: bool, sg: bool) -> Result<Spec> {
    Spec::new("rope_append", dt, ROPE_APPEND_WG)
        .with_subgroups(sg)
        .with_const("NEOX", u32::from(style == RopeStyle::Neox))?
        .with_const("NORM", u32::from(norm))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for dt in KV_DTYPES {
        v.push((Kernel::Kv, Spec::new("kv_append", dt, WG)));
        for style in [RopeStyle::Traditional, RopeStyle::Neox] {
            for norm in [false, true] {
                for sg in [false, true] {
                    v.push((Kernel::Kv, rope_append_spec(dt, style, norm, sg)?));
                }
            }
        }
    }
    Ok(v)
}

/// Cache buffers' shape `[1, kv_heads, slots, head_dim]` and dtype, checked for `op`:
/// (kv_heads, slots, head_dim).
fn cache_shape(op: &str, k_cache: &MlxBuffer, v_cache: &MlxBuffer) -> Result<[usize; 3]> {
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
    let f16 = k_cache.dtype() == DType::F16;
    for (b, name) in [(k_cache, "k_cache"), (v_cache, "v_cache")] {
        check::ensure(!f16 || b.elem_offset() % 2 == 0, op, || {
            format!("{name} view must start on a 32-bit word")
        })?;
    }
    Ok([kv_heads, slots, head_dim])
}

/// The cache-write fields of the params of writing `tokens` rows at position `start` into a
/// cache of `[kv_heads, slots, head_dim]` (kv_append, rope_append), once the rows are known
/// not to overwrite each other.
fn write_params(
    op: &str,
    tokens: usize,
    [kv_heads, slots, head_dim]: [usize; 3],
    k_cache: &MlxBuffer,
    start: usize,
) -> Result<KvParams> {
    check::ensure(tokens <= slots, op, || {
        format!("{tokens} tokens do not fit {slots} slots without overwriting each other")
    })?;
    // f16 rows are written two elements to a word.
    let row_words = if k_cache.dtype() == DType::F16 {
        head_dim / 2
    } else {
        head_dim
    };
    Ok(KvParams {
        tokens: tokens as u32,
        kv_heads: kv_heads as u32,
        head_dim: head_dim as u32,
        slots: check::fits_u32(slots, op, "slots")?,
        start: check::fits_u32(start, op, "start")?,
        row_words: row_words as u32,
        ..KvParams::default()
    })
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
    let [kv_heads, slots, head_dim] = cache_shape(op, k_cache, v_cache)?;
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
    let mut params = write_params(op, tokens, [kv_heads, slots, head_dim], k_cache, start)?;
    let items = check::fits_u32(tokens * kv_heads * params.row_words as usize, op, "words")?;
    params.items = items;
    pass.dispatch(
        Kernel::Kv,
        Spec::new("kv_append", k_cache.dtype(), WG),
        &params,
        &[k_new, v_new, k_cache, v_cache],
        items.div_ceil(WG),
    )?;
    follow_start(pass, params, items.div_ceil(WG));
    Ok(())
}

/// While a pass is captured for replay: the rows are written at the position that follows
/// the token (the slot is `start % slots`, taken in the kernel).
fn follow_start(pass: &mut Pass, params: KvParams, workgroups: u32) {
    pass.vary_last(move |a| {
        let start = (params.start as usize)
            .checked_add(a.steps)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| crate::MlxError::invalid("kv append: the position passes u32"))?;
        Ok(Some((KvParams { start, ..params }, workgroups)))
    });
}

/// The stacked q|k|v rows of a step and what [`rope_append`] does to them.
#[derive(Clone, Copy, Debug)]
pub struct RopeAppend<'a> {
    /// f32 `[T, n_heads + 2 * kv_heads, head_dim]`: q heads, then k heads, then v heads.
    pub qkv: &'a MlxBuffer,
    /// Query heads.
    pub n_heads: usize,
    /// u32 `[T]`: the tokens' positions (the angles).
    pub positions: &'a MlxBuffer,
    pub rope: &'a RopeTable,
    /// Per-head RMS norm before the rotation: the q weight, the k weight (f32
    /// `[head_dim]`) and eps (Qwen3, Gemma 3).
    pub qk_norm: Option<(&'a MlxBuffer, &'a MlxBuffer, f32)>,
}

/// q and k of `args.qkv` normalized per head (with `qk_norm`) and rotated (`rope`), k and v
/// written into `k_cache`, `v_cache` (`[1, kv_heads, slots, head_dim]`, f16 or f32) at
/// positions `start..start + T`, slot `position % slots`, like [`kv_append`]; returns q, f32
/// `[T, n_heads, head_dim]`. The same arithmetic as `rope` / `norm_rope` then `kv_append`.
/// Measurement only (timing, wrong results): `rope_append` dispatches nothing and returns
/// q|k|v's q rows unrotated, so attention still waits on the q|k|v matvec: what the
/// rotation and append cost inside a decode pass, the bound of folding them elsewhere.
#[doc(hidden)]
pub fn set_rope_append_skip(on: bool) {
    ROPE_APPEND_SKIP.store(on, std::sync::atomic::Ordering::Relaxed);
}
static ROPE_APPEND_SKIP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn rope_append(
    pass: &mut Pass,
    args: &RopeAppend<'_>,
    k_cache: &MlxBuffer,
    v_cache: &MlxBuffer,
    start: usize,
) -> Result<MlxBuffer> {
    let op = "rope_append";
    let [kv_heads, slots, head_dim] = cache_shape(op, k_cache, v_cache)?;
    let cfg = args.rope.config();
    check::ensure(cfg.head_dim == head_dim, op, || {
        format!(
            "the RoPE table is for head_dim {}, the cache has {head_dim}",
            cfg.head_dim
        )
    })?;
    check::ensure(head_dim <= ROPE_APPEND_MAX_HEAD_DIM, op, || {
        format!("head_dim {head_dim} is above {ROPE_APPEND_MAX_HEAD_DIM}")
    })?;
    let qkv = args.qkv;
    check::dtype(qkv, &[DType::F32], op, "qkv")?;
    let heads = args.n_heads + 2 * kv_heads;
    let tokens = match *qkv.shape() {
        [t, h, d] if h == heads && d == head_dim => t,
        _ => {
            return Err(crate::MlxError::invalid(format!(
                "{op}: qkv has shape {:?}, expected [tokens, {heads}, {head_dim}] ({} q \
                 heads and {kv_heads} each of k and v)",
                qkv.shape(),
                args.n_heads
            )))
        }
    };
    check::dtype(args.positions, &[DType::U32], op, "positions")?;
    check::len(args.positions, tokens, op, "positions")?;
    let base = write_params(op, tokens, [kv_heads, slots, head_dim], k_cache, start)?;
    if let Some((qw, kw, _)) = args.qk_norm {
        for (w, name) in [(qw, "q norm weight"), (kw, "k norm weight")] {
            check::dtype(w, &[DType::F32], op, name)?;
            check::len(w, head_dim, op, name)?;
        }
    }
    let rows = check::fits_u32(tokens * heads, op, "rows")?;
    let params = KvParams {
        n_heads: check::fits_u32(args.n_heads, op, "n_heads")?,
        half: (head_dim / 2) as u32,
        rot_half: (cfg.rotary_dims / 2) as u32,
        mscale: args.rope.attention_scale(),
        eps: args.qk_norm.map_or(0.0, |(_, _, eps)| eps),
        ..base
    };
    if ROPE_APPEND_SKIP.load(std::sync::atomic::Ordering::Relaxed) {
        // Measurement: q unrotated, the cache not written (see set_rope_append_skip).
        return qkv.view(0, &[tokens, args.n_heads, head_dim]);
    }
    let q = pass.alloc(DType::F32, &[tokens, args.n_heads, head_dim])?;
    let spec = rope_append_spec(
        k_cache.dtype(),
        cfg.style,
        args.qk_norm.is_some(),
        pass.caps().subgroups,
    )?;
    let (qw, kw) = args.qk_norm.map_or((qkv, qkv), |(q, k, _)| (q, k));
    let bufs = [
        qkv,
        qw,
        k_cache,
        v_cache,
        args.positions,
        args.rope.freqs(),
        &q,
        kw,
    ];
    pass.dispatch(Kernel::Kv, spec, &params, &bufs, rows)?;
    follow_start(pass, params, rows);
    Ok(q)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeConfig;
    use crate::testutil::{devices, Rng};
    use crate::MlxDevice;
    use half::f16;

    /// f64 reference of one head row: optional RMS norm with weight `w`, then RoPE with
    /// inverse frequencies `base^(-2j/rd)` (written here from the formula, not from
    /// `RopeConfig`), pairs by style, elements past the rotary dims passed through.
    fn ref_row(x: &[f32], w: Option<&[f32]>, eps: f32, pos: u32, cfg: &RopeConfig) -> Vec<f64> {
        let hd = x.len();
        let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
        if let Some(w) = w {
            let ms = v.iter().map(|a| a * a).sum::<f64>() / hd as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for (a, &wi) in v.iter_mut().zip(w) {
                *a *= inv * wi as f64;
            }
        }
        let rd = cfg.rotary_dims;
        let mut y = v.clone();
        for j in 0..rd / 2 {
            let f = (cfg.base as f64).powf(-(2.0 * j as f64) / rd as f64);
            let (s, c) = (pos as f64 * f).sin_cos();
            let (i0, i1) = match cfg.style {
                RopeStyle::Traditional => (2 * j, 2 * j + 1),
                RopeStyle::Neox => (j, j + rd / 2),
            };
            y[i0] = v[i0] * c - v[i1] * s;
            y[i1] = v[i0] * s + v[i1] * c;
        }
        y
    }

    struct Case {
        dt: DType,
        style: RopeStyle,
        norm: bool,
        head_dim: usize,
        rotary_dims: usize,
        n_heads: usize,
        kv_heads: usize,
        tokens: usize,
        slots: usize,
        start: usize,
    }

    fn run_case(g: &MlxDevice, rng: &mut Rng, c: &Case) {
        let (hd, nh, nkv, t) = (c.head_dim, c.n_heads, c.kv_heads, c.tokens);
        let heads = nh + 2 * nkv;
        let cfg = RopeConfig {
            rotary_dims: c.rotary_dims,
            ..RopeConfig::new(hd, 10_000.0, c.style)
        };
        let table = RopeTable::new(g, &cfg).unwrap();
        let qkv = rng.normals(t * heads * hd, 1.0);
        let positions: Vec<u32> = (0..t).map(|_| rng.below(5000) as u32).collect();
        let qw: Vec<f32> = (0..hd).map(|_| rng.uniform(0.5, 1.5)).collect();
        let kw: Vec<f32> = (0..hd).map(|_| rng.uniform(0.5, 1.5)).collect();
        let eps = 1e-6f32;
        // Caches filled with a known pattern: slots the append does not own must keep it.
        let cache_len = nkv * c.slots * hd;
        let k0 = rng.normals(cache_len, 3.0);
        let v0 = rng.normals(cache_len, 3.0);
        let upload = |v: &[f32]| match c.dt {
            DType::F16 => {
                let h: Vec<f16> = v.iter().map(|&a| f16::from_f32(a)).collect();
                MlxBuffer::from_slice(g, &h, &[1, nkv, c.slots, hd]).unwrap()
            }
            _ => MlxBuffer::from_slice(g, v, &[1, nkv, c.slots, hd]).unwrap(),
        };
        let (kc, vc) = (upload(&k0), upload(&v0));
        let gqkv = MlxBuffer::from_slice(g, &qkv, &[t, heads, hd]).unwrap();
        let gpos = MlxBuffer::from_slice(g, &positions, &[t]).unwrap();
        let gqw = MlxBuffer::from_slice(g, &qw, &[hd]).unwrap();
        let gkw = MlxBuffer::from_slice(g, &kw, &[hd]).unwrap();
        let args = RopeAppend {
            qkv: &gqkv,
            n_heads: nh,
            positions: &gpos,
            rope: &table,
            qk_norm: c.norm.then_some((&gqw, &gkw, eps)),
        };
        let mut pass = g.begin();
        let q = rope_append(&mut pass, &args, &kc, &vc, c.start).unwrap();
        pass.commit_and_wait().unwrap();
        assert_eq!(q.shape(), &[t, nh, hd]);
        let read = |b: &MlxBuffer| -> Vec<f32> {
            match c.dt {
                DType::F16 => b
                    .to_vec::<f16>(g)
                    .unwrap()
                    .into_iter()
                    .map(f16::to_f32)
                    .collect(),
                _ => b.to_vec(g).unwrap(),
            }
        };
        let (gq, gk, gv) = (q.to_vec::<f32>(g).unwrap(), read(&kc), read(&vc));
        // Angles to ~1e-6 turns and a few ulp of sin/cos (the rope tests' 5e-5 for outputs
        // of unit-normal size; normalized rows times weights up to 1.5 stay within ~5);
        // f16 cache entries add their rounding, 2^-11 relative.
        let f16_rel = if c.dt == DType::F16 {
            2f64.powi(-11)
        } else {
            0.0
        };
        let what = format!(
            "{} {:?} norm={} hd {hd} rd {} heads {nh}/{nkv} T {t} slots {} start {}",
            c.dt, c.style, c.norm, c.rotary_dims, c.slots, c.start
        );
        let mut want_k = k0.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let mut want_v = v0.iter().map(|&a| a as f64).collect::<Vec<_>>();
        if c.dt == DType::F16 {
            for w in want_k.iter_mut().chain(want_v.iter_mut()) {
                *w = f16::from_f64(*w).to_f64();
            }
        }
        for ti in 0..t {
            let slot = (c.start + ti) % c.slots;
            for h in 0..heads {
                let row = &qkv[(ti * heads + h) * hd..(ti * heads + h + 1) * hd];
                let (want, got_row, rel): (Vec<f64>, &[f32], f64) = if h < nh {
                    let w = c.norm.then_some(&qw[..]);
                    let o = (ti * nh + h) * hd;
                    (
                        ref_row(row, w, eps, positions[ti], &cfg),
                        &gq[o..o + hd],
                        0.0,
                    )
                } else {
                    let is_v = h >= nh + nkv;
                    let kvh = if is_v { h - nh - nkv } else { h - nh };
                    let o = (kvh * c.slots + slot) * hd;
                    let want = if is_v {
                        row.iter().map(|&a| a as f64).collect()
                    } else {
                        let w = c.norm.then_some(&kw[..]);
                        ref_row(row, w, eps, positions[ti], &cfg)
                    };
                    let dst = if is_v { &mut want_v } else { &mut want_k };
                    dst[o..o + hd].copy_from_slice(&want);
                    (
                        want,
                        if is_v { &gv[o..o + hd] } else { &gk[o..o + hd] },
                        f16_rel,
                    )
                };
                for (i, (&gv_, &wv)) in got_row.iter().zip(&want).enumerate() {
                    let tol = 5e-5 + rel * wv.abs();
                    assert!(
                        ((gv_ as f64) - wv).abs() <= tol,
                        "{what}: token {ti} head {h} elem {i}: {gv_} vs {wv}"
                    );
                }
            }
        }
        // Every other slot is untouched.
        for (name, got, want) in [("k", &gk, &want_k), ("v", &gv, &want_v)] {
            for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    ((a as f64) - b).abs() <= 5e-5 + f16_rel * b.abs(),
                    "{what}: {name} cache element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rope_append_matches_norm_rope_and_append_in_f64() {
        let mut rng = Rng::new(61);
        for g in devices() {
            for (i, &(dt, style, norm)) in [
                (DType::F16, RopeStyle::Neox, false),
                (DType::F16, RopeStyle::Neox, true),
                (DType::F32, RopeStyle::Traditional, false),
                (DType::F32, RopeStyle::Neox, true),
                (DType::F16, RopeStyle::Traditional, true),
            ]
            .iter()
            .enumerate()
            {
                let (head_dim, rotary_dims) =
                    [(64, 64), (128, 128), (128, 64), (256, 256), (80, 80)][i];
                // Decode (one token) and a short chunk that wraps a ring of 4 slots.
                for (tokens, slots, start) in [(1, 16, 7), (3, 4, 5)] {
                    let c = Case {
                        dt,
                        style,
                        norm,
                        head_dim,
                        rotary_dims,
                        n_heads: 4,
                        kv_heads: 2,
                        tokens,
                        slots,
                        start,
                    };
                    run_case(g, &mut rng, &c);
                }
            }
        }
    }

    #[test]
    fn rope_append_bad_inputs_are_named() {
        let g = crate::testutil::gpu();
        let cfg = RopeConfig::new(64, 10_000.0, RopeStyle::Neox);
        let table = RopeTable::new(g, &cfg).unwrap();
        let kc = MlxBuffer::new(g, DType::F16, &[1, 2, 8, 64]).unwrap();
        let vc = MlxBuffer::new(g, DType::F16, &[1, 2, 8, 64]).unwrap();
        let pos = MlxBuffer::from_slice(g, &[3u32], &[1]).unwrap();
        let qkv = MlxBuffer::from_slice(g, &[0.5f32; 7 * 64], &[1, 7, 64]).unwrap();
        let args = RopeAppend {
            qkv: &qkv,
            n_heads: 4,
            positions: &pos,
            rope: &table,
            qk_norm: None,
        };
        let mut pass = g.begin();
        let e = rope_append(&mut pass, &args, &kc, &vc, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rope_append: qkv has shape [1, 7, 64], expected [tokens, 8, 64] (4 q heads and 2 \
             each of k and v)"
        );
        let cfg2 = RopeConfig::new(128, 10_000.0, RopeStyle::Neox);
        let table2 = RopeTable::new(g, &cfg2).unwrap();
        let qkv8 = MlxBuffer::from_slice(g, &[0.5f32; 8 * 64], &[1, 8, 64]).unwrap();
        let args2 = RopeAppend {
            qkv: &qkv8,
            rope: &table2,
            ..args
        };
        let e = rope_append(&mut pass, &args2, &kc, &vc, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rope_append: the RoPE table is for head_dim 128, the cache has 64"
        );
        let w = MlxBuffer::from_slice(g, &[1.0f32; 63], &[63]).unwrap();
        let args3 = RopeAppend {
            qkv: &qkv8,
            qk_norm: Some((&w, &w, 1e-6)),
            ..args
        };
        let e = rope_append(&mut pass, &args3, &kc, &vc, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "rope_append: q norm weight has 63 elements, expected 64");
    }
}

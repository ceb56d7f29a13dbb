//! GGML weights in linear layers and embeddings: `ggml_matvec` (decode, M <= 8),
//! `ggml_matmul` (prefill, tiled), `ggml_linear` (picks one by M), `ggml_embedding`.
//! `y = x · Wᵀ` for f32 activations `x [.., K]` and a [`GgmlWeight`] `W [N, K]` of any
//! supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K).
//!
//! Kernels (`shaders/ggml_common.wgsl` with one dequantizer per file: `ggml_dense.wgsl`,
//! `ggml_legacy.wgsl`, `ggml_k.wgsl`) share one primitive, `dq_unit(row, u)`: 32 consecutive
//! elements of a weight row, dequantized in f32 in the same operation order as
//! [`crate::weights::ggml`] (the CPU oracle). Choices:
//! - **matvec**: RPW (1, 2, 4; 4 from N = 2048) weight rows per workgroup of `WG` (64..256 by
//!   K; at most 128 from M = 4) invocations; 8 / GPL invocations share each 32-element unit
//!   (GPL = 2: two 4-element groups each), and the workgroup strides over the row's units.
//!   Neighbouring invocations read neighbouring x and weight words (coalesced u32 loads; the
//!   repacked layouts keep every field word-aligned); each weight byte is read once. Per unit
//!   and group, x (M rows, read as vec4 when K and x's offset are multiples of 4) is loaded
//!   once for the RPW rows, whose header and weight loads are independent (in flight
//!   together). Integer fields become floats through the 2^23 mantissa trick (`ufloat4`,
//!   `sbytes4`): NVIDIA's integer-to-float conversion runs at a quarter of the FMA rate and
//!   bounded the kernel (Q8_0 14336 x 4096: 64 us with conversions, 42 us without).
//!   Accumulators are named vectors, never indexed private arrays (which NVIDIA places in
//!   local memory). The (row, m) partial sums go through `subgroupAdd` plus one
//!   workgroup-memory pass, or a workgroup-memory tree per row without subgroups. Measured
//!   on an H100 (Vulkan, M = 1; docs/PERFORMANCE.md): 1.35–2.1x faster than one row per
//!   workgroup with scalar x loads, e.g. Q4_0 4096 x 4096 18 us (was 25), Q8_0 14336 x 4096
//!   42 us (was 89). A pure read of the same bytes takes 13.5 us and 27 us there.
//!   `bench_matmul` in mlx-native-lm measures it.
//! - **matmul**: 64 × 64 output tiles, 64 invocations computing 8 × 8 each, K in steps of 32:
//!   each invocation dequantizes one unit of one weight row into workgroup memory per step
//!   (17 KiB of workgroup memory in all, under lavapipe's 32 KiB). No cooperative-matrix path.
//! - **shards**: one dispatch per shard of the weight, writing its output columns (or
//!   gathered rows).
//! - **embedding**: one workgroup per id; ids `>= N` produce rows of zeros.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::device::Caps;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};
use crate::weights::ggml::GgmlType;
use crate::weights::ggml_weight::GgmlWeight;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GgmlParams {
    m: u32,
    k: u32,
    n: u32,
    rows: u32,
    row0: u32,
    bpr: u32,
    scale_off: u32,
    units: u32,
    zero_oob: u32,
    xvec: u32,
    _pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<GgmlParams>() == 48);

/// Most rows of x `ggml_matvec` takes.
pub const MATVEC_MAX_M: usize = 8;

/// Which kernel `ggml_linear` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlPath {
    Matvec,
    Matmul,
}

/// The path for `m` rows of x: matvec up to [`MATVEC_MAX_M`] rows (it reads the weight once
/// for all of them), the tiled matmul above.
pub fn linear_path(m: usize, _caps: &Caps) -> GgmlPath {
    if m <= MATVEC_MAX_M {
        GgmlPath::Matvec
    } else {
        GgmlPath::Matmul
    }
}

/// Matvec workgroup size for rows of `k` elements (eight invocations per 32-element unit).
/// The kernel needs `M * wg <= 2048`.
pub(crate) fn matvec_wg(k: usize) -> u32 {
    match k.div_ceil(32) {
        0..=15 => 64,
        16..=31 => 128,
        _ => 256,
    }
}

/// Workgroup sizes `matvec_wg` can choose.
const MATVEC_WGS: [u32; 3] = [64, 128, 256];

/// Shape of a matvec dispatch: `wg` invocations per workgroup, `rpw` weight rows per
/// workgroup (1, 2, 4), `gpl` groups of four elements per invocation and unit (1, 2).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GgmlMatvecConfig {
    pub wg: u32,
    pub rpw: u32,
    pub gpl: u32,
}

impl std::fmt::Display for GgmlMatvecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "wg{} rpw{} gpl{}", self.wg, self.rpw, self.gpl)
    }
}

impl GgmlMatvecConfig {
    fn validate(self, m: usize) -> Result<Self> {
        let ok = MATVEC_WGS.contains(&self.wg)
            && matches!(self.rpw, 1 | 2 | 4)
            && matches!(self.gpl, 1 | 2)
            && (m as u32) * self.wg <= 2048;
        check::ensure(ok, "ggml_matvec", || format!("unsupported config {self:?}"))?;
        Ok(self)
    }

    fn mv(self) -> u32 {
        self.rpw * 16 + self.gpl
    }
}

/// The matvec shape for a weight of `n` rows and `k` columns.
/// The matvec shape for `m` rows of x and a weight of `n` rows and `k` columns. Measured on an
/// H100 (Vulkan, K = 4096): four rows per workgroup and two groups per invocation were
/// fastest or within noise of it for every type timed (M = 1, Q4_0 14336 x 4096: 49 us vs 61
/// at two rows and 110 at one row, one group); from M = 4 on, 128 invocations beat 256 at
/// N = 14336 (Q4_0, M = 8: 129 us vs 176).
pub(crate) fn matvec_config(m: usize, n: usize, k: usize) -> GgmlMatvecConfig {
    let wg = matvec_wg(k);
    GgmlMatvecConfig {
        wg: if m >= 4 { wg.min(128) } else { wg },
        rpw: if n >= 2048 { 4 } else { 2 },
        gpl: 2,
    }
}

/// Rows per workgroup `matvec_config` can choose.
const MATVEC_RPWS: [u32; 2] = [2, 4];

const EMBED_WG: u32 = 64;
const MATMUL_WG: u32 = 64;

/// The kernel family and base spec for `kind`.
fn kernel_spec(entry: &'static str, kind: GgmlType, wg: u32) -> Result<(Kernel, Spec)> {
    Ok(match kind {
        GgmlType::F32 => (Kernel::GgmlDense, Spec::new(entry, DType::F32, wg)),
        GgmlType::F16 => (Kernel::GgmlDense, Spec::new(entry, DType::F16, wg)),
        GgmlType::BF16 => (Kernel::GgmlDense, Spec::new(entry, DType::BF16, wg)),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => (
            Kernel::GgmlLegacy,
            Spec::new(entry, DType::F32, wg).with_const("QTYPE", kind.id())?,
        ),
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => (
            Kernel::GgmlK,
            Spec::new(entry, DType::F32, wg).with_const("QTYPE", kind.id())?,
        ),
    })
}

fn matvec_spec(
    kind: GgmlType,
    m: usize,
    cfg: GgmlMatvecConfig,
    subgroups: bool,
) -> Result<(Kernel, Spec)> {
    let (kernel, spec) = kernel_spec("matvec", kind, cfg.wg)?;
    let spec = spec
        .with_subgroups(subgroups)
        .with_const("M", m as u32)?
        .with_const("MV", cfg.mv())?;
    Ok((kernel, spec))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for kind in GgmlType::ALL {
        for m in 1..=MATVEC_MAX_M {
            for wg in MATVEC_WGS {
                for rpw in MATVEC_RPWS {
                    for sg in [false, true] {
                        let cfg = GgmlMatvecConfig { wg, rpw, gpl: 2 };
                        v.push(matvec_spec(kind, m, cfg, sg)?);
                    }
                }
            }
        }
        v.push(kernel_spec("matmul", kind, MATMUL_WG)?);
        v.push(kernel_spec("embedding", kind, EMBED_WG)?);
    }
    Ok(v)
}

/// Per-shard params, the same for every entry point but `m` and `zero_oob`.
fn params(w: &GgmlWeight, m: u32, row0: usize, rows: usize, scale_off: usize) -> GgmlParams {
    let [n, k] = w.shape();
    GgmlParams {
        m,
        k: k as u32,
        n: n as u32,
        rows: rows as u32,
        row0: row0 as u32,
        bpr: (k / w.kind().block_elems()) as u32,
        scale_off: scale_off as u32,
        units: k.div_ceil(32) as u32,
        zero_oob: 0,
        xvec: 0,
        _pad: [0; 2],
    }
}

/// Validate x against w: returns (rows of x, output shape).
fn x_rows(op: &str, x: &MlxBuffer, w: &GgmlWeight) -> Result<(usize, Vec<usize>)> {
    check::dtype(x, &[DType::F32], op, "x")?;
    let (m, k) = check::rows(x, op, "x")?;
    check::ensure(k == w.cols(), op, || {
        format!(
            "x has {k} columns, expected {} (the {} weight's K)",
            w.cols(),
            w.kind()
        )
    })?;
    check::fits_u32(m.saturating_mul(w.rows()), op, "output elements")?;
    check::fits_u32(x.len(), op, "x elements")?;
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = w.rows();
    }
    Ok((m, shape))
}

/// `y = x · Wᵀ` for `x [.., K]` with at most [`MATVEC_MAX_M`] rows: `y [.., N]`.
pub fn ggml_matvec(pass: &mut Pass, x: &MlxBuffer, w: &GgmlWeight) -> Result<MlxBuffer> {
    let (m, _) = x_rows("ggml_matvec", x, w)?;
    ggml_matvec_with(pass, x, w, matvec_config(m, w.rows(), w.cols()))
}

/// [`ggml_matvec`] with an explicit dispatch shape (for tuning).
#[doc(hidden)]
pub fn ggml_matvec_with(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &GgmlWeight,
    cfg: GgmlMatvecConfig,
) -> Result<MlxBuffer> {
    let op = "ggml_matvec";
    let (m, shape) = x_rows(op, x, w)?;
    check::ensure(m <= MATVEC_MAX_M, op, || {
        format!("x has {m} rows, at most {MATVEC_MAX_M} supported (use ggml_matmul)")
    })?;
    let cfg = cfg.validate(m)?;
    // x read as vec4 where every row starts on a 16-byte boundary of the binding.
    let xvec = w.cols().is_multiple_of(4)
        && x.elem_offset().is_multiple_of(4)
        && pass.caps().storage_offset_alignment.is_multiple_of(16);
    let y = pass.alloc(DType::F32, &shape)?;
    let (kernel, spec) = matvec_spec(w.kind(), m, cfg, pass.caps().subgroups)?;
    let rpw = cfg.rpw as usize;
    for s in w.shards() {
        let mut p = params(w, m as u32, s.row0, s.rows, s.scale_off);
        p.xvec = u32::from(xvec);
        let groups = check::fits_u32(s.rows.div_ceil(rpw), op, "workgroups")?;
        pass.dispatch(kernel, spec, &p, &[x, &s.buffer, &y, x, x], groups)?;
    }
    Ok(y)
}

/// `y = x · Wᵀ` for any number of rows of x, through 64 × 64 tiles.
pub fn ggml_matmul(pass: &mut Pass, x: &MlxBuffer, w: &GgmlWeight) -> Result<MlxBuffer> {
    let op = "ggml_matmul";
    let (m, shape) = x_rows(op, x, w)?;
    let y = pass.alloc(DType::F32, &shape)?;
    let (kernel, spec) = kernel_spec("matmul", w.kind(), MATMUL_WG)?;
    for s in w.shards() {
        let p = params(w, m as u32, s.row0, s.rows, s.scale_off);
        let tiles = (m.div_ceil(64) as u64) * (s.rows.div_ceil(64) as u64);
        let groups = check::fits_u32(tiles as usize, op, "workgroups")?;
        pass.dispatch(kernel, spec, &p, &[x, &s.buffer, &y], groups)?;
    }
    Ok(y)
}

/// `y = x · Wᵀ`, by [`linear_path`]: matvec for decode-sized M, matmul above.
pub fn ggml_linear(pass: &mut Pass, x: &MlxBuffer, w: &GgmlWeight) -> Result<MlxBuffer> {
    let (m, _) = x_rows("ggml_linear", x, w)?;
    match linear_path(m, pass.caps()) {
        GgmlPath::Matvec => ggml_matvec(pass, x, w),
        GgmlPath::Matmul => ggml_matmul(pass, x, w),
    }
}

/// Rows `ids` of the table `w [N, K]`, dequantized: `y [ids.., K]` f32. Ids `>= N` give rows
/// of zeros.
pub fn ggml_embedding(pass: &mut Pass, w: &GgmlWeight, ids: &MlxBuffer) -> Result<MlxBuffer> {
    let op = "ggml_embedding";
    check::dtype(ids, &[DType::U32], op, "ids")?;
    let n_ids = check::fits_u32(ids.len(), op, "ids")?;
    check::fits_u32(ids.len().saturating_mul(w.cols()), op, "output elements")?;
    let mut shape = ids.shape().to_vec();
    shape.push(w.cols());
    let y = pass.alloc(DType::F32, &shape)?;
    let (kernel, spec) = kernel_spec("embedding", w.kind(), EMBED_WG)?;
    for (i, s) in w.shards().iter().enumerate() {
        let mut p = params(w, n_ids, s.row0, s.rows, s.scale_off);
        p.zero_oob = u32::from(i == 0);
        // Slot 0 (x) is unused by this entry point: ids fills it.
        pass.dispatch(kernel, spec, &p, &[ids, &s.buffer, &y, ids], n_ids)?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::device::{DeviceOptions, MlxDevice};
    use crate::testutil::{devices, gpu, Rng};
    use crate::weights::ggml::dequantize;
    use crate::weights::ggml_weight::tests::random_tensor;

    /// y = x · Wᵀ in f64 over the CPU oracle's dequantization of the original bytes, and
    /// Σ_k |x_k w_k| per output for the tolerance.
    fn reference(x: &[f32], wd: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; m * n];
        let mut mag = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for t in 0..k {
                    let p = x[i * k + t] as f64 * wd[j * k + t] as f64;
                    y[i * n + j] += p;
                    mag[i * n + j] += p.abs();
                }
            }
        }
        (y, mag)
    }

    // Tolerance: the GPU sums K products in f32 (per-invocation runs of 32-element dot
    // products, then a tree across invocations), and may fuse a dequantization multiply-add
    // (one rounding instead of two). Each rounding is at most 2^-24 relative to a partial sum
    // bounded by Σ|x_k w_k|; with O(sqrt K) growth of accumulated rounding error in practice
    // and a margin, |err| <= 1e-6 · sqrt(K) · Σ|x_k w_k|. A single wrong weight (bad index or
    // bit) moves a result by about Σ|x_k w_k| / K, far above this for K <= 4096.
    fn assert_matmul_close(got: &[f32], want: &(Vec<f64>, Vec<f64>), k: usize, what: &str) {
        assert_eq!(got.len(), want.0.len(), "{what}: length");
        let f = 1e-6 * (k as f64).sqrt();
        for (i, (&g, (&w, &mag))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
            let tol = f * mag + 1e-30;
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: element {i}: got {g}, want {w} (tol {tol:e})"
            );
        }
    }

    fn setup(
        g: &MlxDevice,
        rng: &mut Rng,
        kind: GgmlType,
        n: usize,
        k: usize,
    ) -> (GgmlWeight, Vec<f32>) {
        let b = random_tensor(rng, kind, n, k);
        let wd = dequantize(kind, &b, n * k).unwrap();
        (GgmlWeight::upload(g, kind, &[n, k], &b).unwrap(), wd)
    }

    /// x [m, k] as a view at element offset 3 of a larger buffer.
    fn x_view(g: &MlxDevice, x: &[f32], m: usize, k: usize) -> MlxBuffer {
        let mut padded = vec![7.0f32; 3];
        padded.extend_from_slice(x);
        padded.push(9.0);
        let buf = MlxBuffer::from_slice(g, &padded, &[padded.len()]).unwrap();
        buf.view(3, &[m, k]).unwrap()
    }

    fn big_k(kind: GgmlType) -> usize {
        if kind.block_elems() == 256 {
            1024
        } else {
            1056
        }
    }

    #[test]
    fn matvec_matches_f64_for_every_type_on_both_reduction_paths() {
        let mut rng = Rng::new(50);
        for g in devices() {
            for kind in GgmlType::ALL {
                // K = 256, 512, 1056/1024 and 4160/4096 take workgroups of 64, 128, 256 and
                // 256 invocations; the last walks several units per invocation.
                let mut cases = vec![
                    (1, 1, 256),
                    (3, 7, 512),
                    (8, 33, big_k(kind)),
                    (2, 3, 2 * big_k(kind) + 2048),
                ];
                if kind.block_elems() == 1 {
                    cases.push((2, 5, 77)); // dense: K not a multiple of 32
                }
                for (m, n, k) in cases {
                    let (w, wd) = setup(g, &mut rng, kind, n, k);
                    let x = rng.normals(m * k, 1.0);
                    let gx = x_view(g, &x, m, k);
                    let mut pass = g.begin();
                    let y = ggml_matvec(&mut pass, &gx, &w).unwrap();
                    pass.commit_and_wait().unwrap();
                    assert_eq!(y.shape(), [m, n]);
                    let what = format!("matvec {kind} m{m} n{n} k{k} sg={}", g.caps().subgroups);
                    assert_matmul_close(
                        &y.to_vec::<f32>(g).unwrap(),
                        &reference(&x, &wd, m, n, k),
                        k,
                        &what,
                    );
                }
            }
        }
    }

    /// Three tensors stacked by `GgmlWeight::upload_stacked`: the fused weight and each
    /// part's view (matvec and matmul) give the products of the parts' own bytes, for every
    /// type (split layouts keep each part's scales at an offset inside the shared buffer).
    #[test]
    fn stacked_weights_and_their_views_match_the_parts() {
        let mut rng = Rng::new(54);
        let g = gpu();
        for kind in GgmlType::ALL {
            let k = if kind.block_elems() == 256 { 512 } else { 128 };
            let ns = [8usize, 3, 5];
            let parts: Vec<Vec<u8>> = ns
                .iter()
                .map(|&n| random_tensor(&mut rng, kind, n, k))
                .collect();
            let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let (fused, views) = GgmlWeight::upload_stacked(g, kind, k, &slices)
                .unwrap()
                .unwrap_or_else(|| panic!("{kind}: these shapes stack"));
            let wd: Vec<Vec<f32>> = parts
                .iter()
                .zip(ns)
                .map(|(b, n)| dequantize(kind, b, n * k).unwrap())
                .collect();
            let all: Vec<f32> = wd.concat();
            for m in [1usize, 3, 9] {
                let x = rng.normals(m * k, 1.0);
                let gx = x_view(g, &x, m, k);
                let mut pass = g.begin();
                let y = ggml_linear(&mut pass, &gx, &fused).unwrap();
                let ys: Vec<MlxBuffer> = views
                    .iter()
                    .map(|v| ggml_linear(&mut pass, &gx, v).unwrap())
                    .collect();
                pass.commit_and_wait().unwrap();
                let n_all: usize = ns.iter().sum();
                let what = format!("stacked {kind} m{m}");
                assert_matmul_close(
                    &y.to_vec::<f32>(g).unwrap(),
                    &reference(&x, &all, m, n_all, k),
                    k,
                    &what,
                );
                for (i, (yv, (w, n))) in ys.iter().zip(wd.iter().zip(ns)).enumerate() {
                    let what = format!("{what} part {i}");
                    assert_matmul_close(
                        &yv.to_vec::<f32>(g).unwrap(),
                        &reference(&x, w, m, n, k),
                        k,
                        &what,
                    );
                }
            }
        }
    }

    /// Every matvec dispatch shape on both reduction paths, x read as vec4 (aligned) and
    /// as scalars (a view at offset 3), a partial last workgroup (N = 7 with four rows per
    /// workgroup) and invocations walking several units (K = 1056: 33 units, more than one
    /// pass of the workgroup for every shape).
    #[test]
    fn matvec_every_dispatch_shape() {
        let mut rng = Rng::new(53);
        for g in devices() {
            for kind in [
                GgmlType::Q4_0,
                GgmlType::Q4_K,
                GgmlType::Q6_K,
                GgmlType::F16,
            ] {
                let k = big_k(kind);
                for (m, n) in [(1, 7), (5, 6)] {
                    let (w, wd) = setup(g, &mut rng, kind, n, k);
                    let x = rng.normals(m * k, 1.0);
                    let want = reference(&x, &wd, m, n, k);
                    let aligned = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
                    let view = x_view(g, &x, m, k);
                    for wg in MATVEC_WGS {
                        for rpw in [1, 2, 4] {
                            for gpl in [1, 2] {
                                let cfg = GgmlMatvecConfig { wg, rpw, gpl };
                                for (xb, how) in [(&aligned, "vec4"), (&view, "scalar")] {
                                    let mut pass = g.begin();
                                    let y = ggml_matvec_with(&mut pass, xb, &w, cfg).unwrap();
                                    pass.commit_and_wait().unwrap();
                                    let what = format!(
                                        "{kind} m{m} n{n} {cfg} x {how} sg={}",
                                        g.caps().subgroups
                                    );
                                    assert_matmul_close(
                                        &y.to_vec::<f32>(g).unwrap(),
                                        &want,
                                        k,
                                        &what,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        let g = gpu();
        let (w, _) = setup(g, &mut rng, GgmlType::Q4_0, 4, 64);
        let x = MlxBuffer::from_slice(g, &rng.normals(64, 1.0), &[1, 64]).unwrap();
        let mut pass = g.begin();
        let bad = GgmlMatvecConfig {
            wg: 256,
            rpw: 3,
            gpl: 2,
        };
        let e = ggml_matvec_with(&mut pass, &x, &w, bad)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "ggml_matvec: unsupported config GgmlMatvecConfig { wg: 256, rpw: 3, gpl: 2 }"
        );
    }

    #[test]
    fn matmul_matches_f64_for_every_type() {
        let mut rng = Rng::new(51);
        let g = gpu();
        for kind in GgmlType::ALL {
            let mut cases = vec![(33, 7, 256), (70, 65, 512), (9, 33, big_k(kind))];
            if kind.block_elems() == 1 {
                cases.push((3, 5, 77));
            }
            for (m, n, k) in cases {
                let (w, wd) = setup(g, &mut rng, kind, n, k);
                let x = rng.normals(m * k, 1.0);
                let gx = x_view(g, &x, m, k);
                let mut pass = g.begin();
                let y = ggml_matmul(&mut pass, &gx, &w).unwrap();
                pass.commit_and_wait().unwrap();
                assert_matmul_close(
                    &y.to_vec::<f32>(g).unwrap(),
                    &reference(&x, &wd, m, n, k),
                    k,
                    &format!("matmul {kind} m{m} n{n} k{k}"),
                );
            }
        }
    }

    #[test]
    fn embedding_reproduces_cpu_dequantization_of_the_original_bytes() {
        let mut rng = Rng::new(52);
        for kind in GgmlType::ALL {
            let g = gpu();
            let (n, k) = (7, if kind.block_elems() == 1 { 45 } else { 512 });
            let (w, wd) = setup(g, &mut rng, kind, n, k);
            let ids: Vec<u32> = vec![3, 0, 6, 7, 1, 2, u32::MAX, 4, 5, 6];
            let gi = MlxBuffer::from_slice(g, &ids, &[2, 5]).unwrap();
            let mut pass = g.begin();
            let y = ggml_embedding(&mut pass, &w, &gi).unwrap();
            pass.commit_and_wait().unwrap();
            assert_eq!(y.shape(), [2, 5, k]);
            let got = y.to_vec::<f32>(g).unwrap();
            // Same f32 operations as the CPU oracle; a fused multiply-add in `d * q + m` or
            // `dl * q - ml` may round once instead of twice: 2^-22 of the row's largest
            // magnitude bounds that.
            for (r, &id) in ids.iter().enumerate() {
                let row = &got[r * k..(r + 1) * k];
                if id as usize >= n {
                    assert!(row.iter().all(|&v| v == 0.0), "{kind}: id {id} not zeros");
                    continue;
                }
                let want = &wd[id as usize * k..(id as usize + 1) * k];
                let big = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (c, (&a, &b)) in row.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= big * 2f32.powi(-22),
                        "{kind}: id {id} col {c}: got {a}, want {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn linear_path_is_a_function_of_m() {
        let caps = gpu().caps();
        assert_eq!(linear_path(1, caps), GgmlPath::Matvec);
        assert_eq!(linear_path(8, caps), GgmlPath::Matvec);
        assert_eq!(linear_path(9, caps), GgmlPath::Matmul);
        assert_eq!(linear_path(512, caps), GgmlPath::Matmul);
        for k in [32, 4096, 8192, 14336, 1 << 20] {
            let wg = matvec_wg(k);
            assert!(MATVEC_WGS.contains(&wg) && MATVEC_MAX_M as u32 * wg <= 2048);
        }
    }

    #[test]
    fn linear_agrees_with_matvec_and_matmul() {
        let mut rng = Rng::new(53);
        let g = gpu();
        let (n, k) = (17, 256);
        let (w, wd) = setup(g, &mut rng, GgmlType::Q4_K, n, k);
        for m in [8, 33] {
            let x = rng.normals(m * k, 1.0);
            let gx = MlxBuffer::from_slice(g, &x, &[1, m, k]).unwrap();
            let mut pass = g.begin();
            let y = ggml_linear(&mut pass, &gx, &w).unwrap();
            pass.commit_and_wait().unwrap();
            assert_eq!(y.shape(), [1, m, n]);
            let want = reference(&x, &wd, m, n, k);
            assert_matmul_close(&y.to_vec::<f32>(g).unwrap(), &want, k, "linear");
        }
    }

    #[test]
    fn many_rows_fold_the_grid() {
        // 140,000 rows, one workgroup each, and the embedding of 70,000 ids: more than
        // 65,535 workgroups.
        let mut rng = Rng::new(54);
        let g = gpu();
        let (n, k) = (140_000, 32);
        let (w, wd) = setup(g, &mut rng, GgmlType::Q4_0, n, k);
        let x = rng.normals(k, 1.0);
        let gx = MlxBuffer::from_slice(g, &x, &[1, k]).unwrap();
        let ids: Vec<u32> = (0..70_000u32).map(|i| (i * 2 + 1) % n as u32).collect();
        let gi = MlxBuffer::from_slice(g, &ids, &[ids.len()]).unwrap();
        let mut pass = g.begin();
        let y = ggml_matvec(&mut pass, &gx, &w).unwrap();
        let e = ggml_embedding(&mut pass, &w, &gi).unwrap();
        pass.commit_and_wait().unwrap();
        assert_matmul_close(
            &y.to_vec::<f32>(g).unwrap(),
            &reference(&x, &wd, 1, n, k),
            k,
            "matvec 140000 rows",
        );
        let e = e.to_vec::<f32>(g).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let want = &wd[id as usize * k..(id as usize + 1) * k];
            assert_eq!(&e[r * k..(r + 1) * k], want, "id {id}");
        }
    }

    #[test]
    fn split_weights_dispatch_per_shard() {
        // A 4 KiB binding limit splits 33 rows of 272 bytes (Q8_0, K = 256) into shards of
        // 15, 15 and 3 rows; Q6_K rows (210 B) into shards of 19 and 14.
        let g = MlxDevice::with_options(DeviceOptions {
            max_storage_binding: Some(4096),
            poison_allocations: true,
            ..DeviceOptions::default()
        })
        .unwrap();
        let mut rng = Rng::new(55);
        for kind in [GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::BF16] {
            let (n, k, m) = (33, 256, 3);
            let (w, wd) = setup(&g, &mut rng, kind, n, k);
            assert!(w.shards().len() >= 2, "{kind}: {} shards", w.shards().len());
            let x = rng.normals(m * k, 1.0);
            let gx = MlxBuffer::from_slice(&g, &x, &[m, k]).unwrap();
            let ids: Vec<u32> = vec![32, 99, 0];
            let gi = MlxBuffer::from_slice(&g, &ids, &[3]).unwrap();
            let mut pass = g.begin();
            let yv = ggml_matvec(&mut pass, &gx, &w).unwrap();
            let ym = ggml_matmul(&mut pass, &gx, &w).unwrap();
            let e = ggml_embedding(&mut pass, &w, &gi).unwrap();
            pass.commit_and_wait().unwrap();
            let want = reference(&x, &wd, m, n, k);
            assert_matmul_close(&yv.to_vec::<f32>(&g).unwrap(), &want, k, "split matvec");
            assert_matmul_close(&ym.to_vec::<f32>(&g).unwrap(), &want, k, "split matmul");
            let e = e.to_vec::<f32>(&g).unwrap();
            assert_eq!(&e[..k], &wd[32 * k..33 * k], "{kind}: row 32");
            assert!(e[k..2 * k].iter().all(|&v| v == 0.0), "{kind}: id 99");
            assert_eq!(&e[2 * k..], &wd[..k], "{kind}: row 0");
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let g = gpu();
        let mut rng = Rng::new(56);
        let (w, _) = setup(g, &mut rng, GgmlType::Q5_0, 3, 64);
        let mut pass = g.begin();
        let x = MlxBuffer::from_slice(g, &[0.5f32; 96], &[1, 96]).unwrap();
        let e = ggml_matvec(&mut pass, &x, &w).unwrap_err().to_string();
        assert_eq!(
            e,
            "ggml_matvec: x has 96 columns, expected 64 (the Q5_0 weight's K)"
        );
        let x = MlxBuffer::from_slice(g, &[0.5f32; 9 * 64], &[9, 64]).unwrap();
        let e = ggml_matvec(&mut pass, &x, &w).unwrap_err().to_string();
        assert_eq!(
            e,
            "ggml_matvec: x has 9 rows, at most 8 supported (use ggml_matmul)"
        );
        let xi = MlxBuffer::from_slice(g, &[1i32; 64], &[1, 64]).unwrap();
        let e = ggml_matmul(&mut pass, &xi, &w).unwrap_err().to_string();
        assert_eq!(e, "ggml_matmul: x is i32, expected f32");
        let e = ggml_embedding(&mut pass, &w, &xi).unwrap_err().to_string();
        assert_eq!(e, "ggml_embedding: ids is i32, expected u32");
    }

    /// Decode matvec bandwidth on the GPU machine:
    /// `cargo test --release --lib ggml_matmul::tests::bench_matvec -- --ignored --nocapture`.
    /// Weights rotate over copies totalling > 256 MB so L2 does not serve them.
    #[test]
    #[ignore]
    fn bench_matvec() {
        let g = MlxDevice::new().unwrap();
        println!("{} ({})", g.caps().adapter_name, g.caps().backend);
        let mut rng = Rng::new(60);
        // roofline
        let words = 64 << 20;
        let src = MlxBuffer::new(&g, DType::U32, &[words]).unwrap();
        let sink = MlxBuffer::new(&g, DType::U32, &[65536]).unwrap();
        let mut pass = g.begin().with_profiling(true);
        for _ in 0..20 {
            crate::ops::bandwidth::read_probe(&mut pass, &src, &sink, 65535).unwrap();
        }
        let t = pass.commit_and_wait().unwrap();
        let mut ns: Vec<f64> = t.iter().map(|t| t.nanos).collect();
        ns.sort_by(f64::total_cmp);
        let roof = (words * 4) as f64 / ns[ns.len() / 2];
        println!("read_probe: {roof:.0} GB/s");
        let configs: Vec<u32> = std::env::var("GGML_BENCH_WGS")
            .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
            .unwrap_or_else(|_| vec![0]);
        let ms: Vec<usize> = std::env::var("GGML_BENCH_M")
            .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
            .unwrap_or_else(|_| vec![1]);
        for kind in [
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q5_0,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::F16,
        ] {
            for (n, k) in [(4096, 4096), (14336, 4096), (4096, 14336)] {
                let b = random_tensor(&mut rng, kind, n, k);
                let copies = (256_000_000 / b.len()).max(2);
                let ws: Vec<GgmlWeight> = (0..copies)
                    .map(|_| GgmlWeight::upload(&g, kind, &[n, k], &b).unwrap())
                    .collect();
                for &m in &ms {
                    let x = MlxBuffer::from_slice(&g, &rng.normals(m * k, 1.0), &[m, k]).unwrap();
                    for &cfg in &configs {
                        let mut c = matvec_config(m, n, k);
                        if cfg != 0 {
                            c.wg = cfg;
                        }
                        let cfg = c;
                        let mut pass = g.begin().with_profiling(true);
                        for i in 0..3 * copies.max(10) {
                            let _ = ggml_matvec_with(&mut pass, &x, &ws[i % copies], cfg).unwrap();
                        }
                        let t = pass.commit_and_wait().unwrap();
                        let mut ns: Vec<f64> = t
                            .iter()
                            .filter(|t| t.label.contains("matvec"))
                            .map(|t| t.nanos)
                            .collect();
                        ns.sort_by(f64::total_cmp);
                        let med = ns[ns.len() / 2];
                        let gbs = b.len() as f64 / med;
                        println!(
                            "{kind:>5} N={n:>5} K={k:>5} M={m} {cfg}: {:7.1} us {gbs:6.0} GB/s {:4.0}%",
                            med / 1e3, 100.0 * gbs / roof
                        );
                    }
                }
            }
        }
    }
}

//! Row normalizations: `rms_norm`, `rms_norm_residual` (fused residual add), `layer_norm`;
//! `rms_norm_xq` / `rms_norm_residual_xq` write the normalized rows quantized for the decode
//! matvec (`ops::qmatmul::QuantizedX`).
//! Activations are f32; weights and biases f32, f16 or bf16.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};
use crate::ops::qmatmul::{QuantizedX, XqForm, XQ_FORM_CODES};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    n: u32,
    eps: f32,
    /// The post-norm's eps (`rms_norm_post_residual_xq`).
    post_eps: f32,
}
const _: () = assert!(std::mem::size_of::<NormParams>() == 16);

const WEIGHT_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];

struct Rows {
    rows: u32,
    n: usize,
}

fn rows_and_weight(op: &str, x: &MlxBuffer, w: Option<&MlxBuffer>) -> Result<Rows> {
    check::dtype(x, &[DType::F32], op, "x")?;
    let (rows, n) = check::rows(x, op, "x")?;
    if let Some(w) = w {
        check::dtype(w, WEIGHT_DTYPES, op, "weight")?;
        check::len(w, n, op, "weight")?;
    }
    Ok(Rows {
        rows: check::fits_u32(rows, op, "rows")?,
        n,
    })
}

/// Workgroup sizes of the one-round-trip RMS norms of a few rows (decode).
const FEW_ROWS_WGS: [u32; 2] = [512, 1024];

fn spec(pass: &Pass, entry: &'static str, wdtype: DType, n: usize, rows: u32) -> Spec {
    let (mut wg, sg) = super::row_wg(pass.caps(), n);
    // A few rows (decode): a workgroup wide enough to hold its row in registers, 4 elements
    // per invocation, so the kernel makes one memory round trip instead of n / WG.
    if rows <= 8 && entry != "layer_norm" && n > 4 * wg as usize {
        let want = n.div_ceil(4).next_power_of_two() as u32;
        let cap = pass.caps().max_invocations_per_workgroup.min(1024);
        if let Some(&w) = FEW_ROWS_WGS.iter().find(|&&w| w >= want && w <= cap) {
            wg = w;
        } else if cap >= 1024 {
            wg = 1024;
        }
    }
    Spec::new(entry, wdtype, wg).with_subgroups(sg)
}

/// The quantized-output variant: sized as for half the row (it holds 8 values an
/// invocation), subgroups only where a chunk's four parts can be lanes of one.
fn xq_spec(
    pass: &Pass,
    entry: &'static str,
    wdtype: DType,
    r: &Rows,
    form: XqForm,
) -> Result<Spec> {
    let mut s = spec(pass, entry, wdtype, r.n / 2, r.rows);
    let sg = s.subgroups && crate::ops::activation::xq_subgroups(pass.caps(), s.wg);
    if !sg {
        // The workgroup-memory exchange takes 20 bytes an invocation beside the reduction's
        // 4 KiB: a narrower workgroup where the device allows less (the row then loops).
        let limit = pass.caps().max_workgroup_storage;
        while s.wg > 64 && 20 * s.wg + 4096 > limit {
            s.wg /= 2;
        }
    }
    s.with_subgroups(sg).with_const("XQ_OUT", form.code())
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for dt in super::FLOAT_DTYPES {
        for wg in super::ROW_WGS.into_iter().chain(FEW_ROWS_WGS) {
            for sg in [false, true] {
                for entry in ["rms_norm", "rms_norm_residual"] {
                    let s = Spec::new(entry, dt, wg).with_subgroups(sg);
                    v.push((Kernel::Norm, s));
                    for form in XQ_FORM_CODES {
                        let q = s.with_const("XQ_OUT", form)?;
                        for keep_y in [0, 1] {
                            v.push((Kernel::Norm, q.with_const("XQ_Y", keep_y)?));
                        }
                        if entry == "rms_norm_residual" {
                            let post = q.with_const("XQ_Y", 0)?.with_const("POST", 1)?;
                            v.push((Kernel::Norm, post));
                        }
                    }
                }
                for affine in 0..4 {
                    let s = Spec::new("layer_norm", dt, wg).with_subgroups(sg);
                    v.push((Kernel::Norm, s.with_const("AFFINE", affine)?));
                }
            }
        }
    }
    Ok(v)
}

/// `x * rsqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(pass: &mut Pass, x: &MlxBuffer, w: &MlxBuffer, eps: f32) -> Result<MlxBuffer> {
    let r = rows_and_weight("rms_norm", x, Some(w))?;
    let y = pass.alloc_like(x)?;
    let params = NormParams {
        rows: r.rows,
        n: r.n as u32,
        eps,
        post_eps: 0.0,
    };
    let spec = spec(pass, "rms_norm", w.dtype(), r.n, r.rows);
    // The entry also declares the residual variant's and the quantized output's bindings
    // (3 r, 4 h, 6 yq): x fills the read-only one, y the writable ones.
    pass.dispatch(
        Kernel::Norm,
        spec,
        &params,
        &[x, w, &y, x, &y, x, &y],
        r.rows,
    )?;
    Ok(y)
}

/// [`rms_norm`] with the rows written quantized for the decode matvec of weights in `form`
/// (`ops::qmatmul::qmv_xq`); the row length must be a multiple of 32.
pub fn rms_norm_xq(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &MlxBuffer,
    eps: f32,
    form: XqForm,
) -> Result<QuantizedX> {
    Ok(norm_xq(pass, "rms_norm_xq", x, None, w, eps, form, false, None)?.2)
}

/// [`rms_norm`] written both in f32 and quantized for the decode matvec of weights in
/// `form` (an MoE layer: the router reads f32, the experts the quantized rows). Returns
/// `(y, y quantized)`.
pub fn rms_norm_and_xq(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: &MlxBuffer,
    eps: f32,
    form: XqForm,
) -> Result<(MlxBuffer, QuantizedX)> {
    let (_, y, q) = norm_xq(pass, "rms_norm_and_xq", x, None, w, eps, form, true, None)?;
    Ok((y.unwrap_or_else(|| x.clone()), q))
}

/// Fused residual add and norm: returns `(h, y)` with `h = x + residual` (the new residual
/// stream) and `y = rms_norm(h, w, eps)`.
pub fn rms_norm_residual(
    pass: &mut Pass,
    x: &MlxBuffer,
    residual: &MlxBuffer,
    w: &MlxBuffer,
    eps: f32,
) -> Result<(MlxBuffer, MlxBuffer)> {
    let op = "rms_norm_residual";
    let r = rows_and_weight(op, x, Some(w))?;
    check::dtype(residual, &[DType::F32], op, "residual")?;
    check::same_shape(x, residual, op, "x", "residual")?;
    let h = pass.alloc_like(x)?;
    let y = pass.alloc_like(x)?;
    let params = NormParams {
        rows: r.rows,
        n: r.n as u32,
        eps,
        post_eps: 0.0,
    };
    let spec = spec(pass, op, w.dtype(), r.n, r.rows);
    pass.dispatch(
        Kernel::Norm,
        spec,
        &params,
        &[x, w, &y, residual, &h, x, &y],
        r.rows,
    )?;
    Ok((h, y))
}

/// [`rms_norm_residual`] with y written quantized for the decode matvec of weights in
/// `form` (`ops::qmatmul::qmv_xq`): returns `(h, y)`, h = x + residual in f32.
pub fn rms_norm_residual_xq(
    pass: &mut Pass,
    x: &MlxBuffer,
    residual: &MlxBuffer,
    w: &MlxBuffer,
    eps: f32,
    form: XqForm,
) -> Result<(MlxBuffer, QuantizedX)> {
    let op = "rms_norm_residual_xq";
    let (h, _, q) = norm_xq(pass, op, x, Some(residual), w, eps, form, false, None)?;
    Ok((h.unwrap_or_else(|| x.clone()), q))
}

/// Gemma's post-norm, its residual add and the next pre-norm in one dispatch: h = x +
/// rms_norm(r, post_w, post_eps), y = rms_norm(h, w, eps) written quantized for the decode
/// matvec of weights in `form`. Returns `(h, y)`. The weights share a dtype. One dispatch
/// where a row fits the workgroup's registers (8 values an invocation: 8192 on most
/// devices), else the post-norm and then [`rms_norm_residual_xq`]. It replaces three
/// dispatches between Gemma 3's down and the next q|k|v (the post-norm, the add and the
/// input norm) and two between o and gate|up.
pub fn rms_norm_post_residual_xq(
    pass: &mut Pass,
    x: &MlxBuffer,
    r: &MlxBuffer,
    post: (&MlxBuffer, f32),
    w: &MlxBuffer,
    eps: f32,
    form: XqForm,
) -> Result<(MlxBuffer, QuantizedX)> {
    let op = "rms_norm_post_residual_xq";
    let (h, _, q) = norm_xq(pass, op, x, Some(r), w, eps, form, false, Some(post))?;
    Ok((h.unwrap_or_else(|| x.clone()), q))
}

/// The quantized-output norms: of x, or (with `residual`) of x + residual, whose sum is
/// returned too; with `keep_y` the f32 rows as well; with `post` (and a residual) the
/// residual RMS-normalized first with that weight and eps, in the same dispatch where the
/// row fits the workgroup's registers, else by its own `rms_norm` first. Returns (sum, f32
/// rows, quantized).
#[allow(clippy::too_many_arguments)]
fn norm_xq(
    pass: &mut Pass,
    op: &str,
    x: &MlxBuffer,
    residual: Option<&MlxBuffer>,
    w: &MlxBuffer,
    eps: f32,
    form: XqForm,
    keep_y: bool,
    post: Option<(&MlxBuffer, f32)>,
) -> Result<(Option<MlxBuffer>, Option<MlxBuffer>, QuantizedX)> {
    let r = rows_and_weight(op, x, Some(w))?;
    if let Some(res) = residual {
        check::dtype(res, &[DType::F32], op, "residual")?;
        check::same_shape(x, res, op, "x", "residual")?;
    }
    if let Some((pw, _)) = post {
        check::len(pw, r.n, op, "post-norm weight")?;
        check::ensure(pw.dtype() == w.dtype(), op, || {
            format!(
                "the post-norm weight is {}, the norm weight {}",
                pw.dtype(),
                w.dtype()
            )
        })?;
    }
    let entry = if residual.is_some() {
        "rms_norm_residual"
    } else {
        "rms_norm"
    };
    let mut spec = xq_spec(pass, entry, w.dtype(), &r, form)?;
    let post = match (post, residual) {
        // The post-norm in the kernel needs the row in registers (8 values an invocation).
        (Some((pw, pe)), Some(res)) if r.n > 8 * spec.wg as usize => {
            let rn = rms_norm(pass, res, pw, pe)?;
            return norm_xq(pass, op, x, Some(&rn), w, eps, form, keep_y, None);
        }
        (Some(p), Some(_)) => Some(p),
        _ => None,
    };
    spec = spec.with_const("XQ_Y", u32::from(keep_y))?;
    if post.is_some() {
        spec = spec.with_const("POST", 1)?;
    }
    let h = residual.map(|_| pass.alloc_like(x)).transpose()?;
    let y = keep_y.then(|| pass.alloc_like(x)).transpose()?;
    let q = QuantizedX::alloc(pass, op, r.rows as usize, r.n, form)?;
    let params = NormParams {
        rows: r.rows,
        n: r.n as u32,
        eps,
        post_eps: post.map_or(0.0, |(_, pe)| pe),
    };
    let yq = q.buffer();
    // Bindings 0 x, 1 w, 2 y (yq fills it when unused), 3 r, 4 h, 5 the post-norm's weight
    // (x when there is none), 6 yq.
    let bufs = [
        x,
        w,
        y.as_ref().unwrap_or(yq),
        residual.unwrap_or(x),
        h.as_ref().unwrap_or(yq),
        post.map_or(x, |(pw, _)| pw),
        yq,
    ];
    pass.dispatch(Kernel::Norm, spec, &params, &bufs, r.rows)?;
    Ok((h, y, q))
}

/// `(x - mean) * rsqrt(var + eps) * w + b` over the last dimension; `w` and `b` optional.
pub fn layer_norm(
    pass: &mut Pass,
    x: &MlxBuffer,
    w: Option<&MlxBuffer>,
    b: Option<&MlxBuffer>,
    eps: f32,
) -> Result<MlxBuffer> {
    let op = "layer_norm";
    let r = rows_and_weight(op, x, w)?;
    if let Some(b) = b {
        check::dtype(b, WEIGHT_DTYPES, op, "bias")?;
        check::len(b, r.n, op, "bias")?;
        if let Some(w) = w {
            check::ensure(w.dtype() == b.dtype(), op, || {
                format!("weight is {} but bias is {}", w.dtype(), b.dtype())
            })?;
        }
    }
    let wdtype = w.or(b).map_or(DType::F32, MlxBuffer::dtype);
    let affine = u32::from(w.is_some()) | (u32::from(b.is_some()) << 1);
    let y = pass.alloc_like(x)?;
    let params = NormParams {
        rows: r.rows,
        n: r.n as u32,
        eps,
        post_eps: 0.0,
    };
    let spec = spec(pass, op, wdtype, r.n, r.rows).with_const("AFFINE", affine)?;
    // Absent weight/bias slots are filled with x: the kernel never reads them.
    let wb = w.unwrap_or(x);
    let bb = b.unwrap_or(x);
    pass.dispatch(Kernel::Norm, spec, &params, &[x, wb, &y, x, x, bb], r.rows)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, devices, Rng};
    use half::{bf16, f16};

    fn ref_rms(x: &[f32], w: &[f64], n: usize, eps: f64) -> Vec<f64> {
        x.chunks(n)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                row.iter().zip(w).map(move |(&v, &wi)| v as f64 * inv * wi)
            })
            .collect()
    }

    fn upload_weight(g: &crate::MlxDevice, w: &[f32], dt: DType) -> Result<(MlxBuffer, Vec<f64>)> {
        Ok(match dt {
            DType::F32 => (
                MlxBuffer::from_slice(g, w, &[w.len()])?,
                w.iter().map(|&v| v as f64).collect(),
            ),
            DType::F16 => {
                let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let r = h.iter().map(|v| v.to_f64()).collect();
                (MlxBuffer::from_slice(g, &h, &[w.len()])?, r)
            }
            _ => {
                let h: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let r = h.iter().map(|v| v.to_f64()).collect();
                (MlxBuffer::from_slice(g, &h, &[w.len()])?, r)
            }
        })
    }

    // Tolerance: f32 sum of n squares (relative error ~ n * 2^-24 worst case, far less in
    // practice with tree/subgroup order) plus rsqrt (a few ulp): 2e-5 relative is generous
    // yet catches any wrong element, row or weight index.
    const RTOL: f64 = 2e-5;

    #[test]
    fn rms_norm_matches_f64_on_both_reduction_paths() -> Result<()> {
        let mut rng = Rng::new(10);
        for g in devices() {
            for &(rows, n, dt) in &[
                (1usize, 1usize, DType::F32),
                (3, 7, DType::F16),
                (5, 4096, DType::BF16),
                (2, 1001, DType::F32),
                // A few rows: 512 invocations (one round trip), and past 4 x 1024 elements
                // the loop with 1024.
                (3, 1500, DType::F16),
                (1, 5000, DType::F32),
                (9000, 64, DType::BF16),
            ] {
                let x = rng.normals(rows * n, 2.0);
                let w = rng.normals(n, 1.0);
                let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
                let (gw, w64) = upload_weight(g, &w, dt)?;
                let mut pass = g.begin();
                let y = rms_norm(&mut pass, &gx, &gw, 1e-5)?;
                pass.commit_and_wait()?;
                let want = ref_rms(&x, &w64, n, 1e-5);
                assert_close(
                    &y.to_vec(g)?,
                    &want,
                    1e-6,
                    RTOL,
                    &format!("rms_norm {rows}x{n} {dt}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rms_norm_residual_writes_sum_and_norm() -> Result<()> {
        let mut rng = Rng::new(11);
        for (g, (rows, n)) in devices()
            .into_iter()
            .flat_map(|g| [(g, (4, 333)), (g, (1, 3000))])
        {
            let x = rng.normals(rows * n, 1.0);
            let r = rng.normals(rows * n, 1.0);
            let w = rng.normals(n, 1.0);
            let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
            let gr = MlxBuffer::from_slice(g, &r, &[rows, n])?;
            let (gw, w64) = upload_weight(g, &w, DType::F16)?;
            let mut pass = g.begin();
            let (h, y) = rms_norm_residual(&mut pass, &gx, &gr, &gw, 1e-6)?;
            pass.commit_and_wait()?;
            let hsum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
            let want_h: Vec<f64> = hsum.iter().map(|&v| v as f64).collect();
            assert_close(&h.to_vec(g)?, &want_h, 0.0, 0.0, "residual sum");
            assert_close(
                &y.to_vec(g)?,
                &ref_rms(&hsum, &w64, n, 1e-6),
                1e-6,
                RTOL,
                "norm of sum",
            );
        }
        Ok(())
    }

    #[test]
    fn layer_norm_with_and_without_affine() -> Result<()> {
        let mut rng = Rng::new(12);
        for g in devices() {
            let (rows, n) = (3, 515);
            // A large mean: the two-pass variance must still be accurate.
            let x: Vec<f32> = rng
                .normals(rows * n, 1.0)
                .iter()
                .map(|v| v + 50.0)
                .collect();
            let w = rng.normals(n, 1.0);
            let b = rng.normals(n, 1.0);
            let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
            let (gw, w64) = upload_weight(g, &w, DType::BF16)?;
            let (gb, b64) = upload_weight(g, &b, DType::BF16)?;
            for (use_w, use_b) in [(true, true), (false, false), (true, false), (false, true)] {
                let mut pass = g.begin();
                let y = layer_norm(
                    &mut pass,
                    &gx,
                    use_w.then_some(&gw),
                    use_b.then_some(&gb),
                    1e-5,
                )?;
                pass.commit_and_wait()?;
                let want: Vec<f64> = x
                    .chunks(n)
                    .flat_map(|row| {
                        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
                        let var =
                            row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
                        let inv = 1.0 / (var + 1e-5).sqrt();
                        let (w64, b64) = (&w64, &b64);
                        row.iter().enumerate().map(move |(i, &v)| {
                            let mut o = (v as f64 - mean) * inv;
                            if use_w {
                                o *= w64[i];
                            }
                            if use_b {
                                o += b64[i];
                            }
                            o
                        })
                    })
                    .collect();
                // x ~ 50 in f32 carries 2^-24 * 50 absolute error into (x - mean): 1e-4 abs.
                assert_close(
                    &y.to_vec(g)?,
                    &want,
                    1e-4,
                    1e-4,
                    &format!("layer_norm w={use_w} b={use_b}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = devices()[0];
        let x = MlxBuffer::from_slice(g, &[1.0f32; 8], &[2, 4])?;
        let w = MlxBuffer::from_slice(g, &[1.0f32; 3], &[3])?;
        let mut pass = g.begin();
        let e = rms_norm(&mut pass, &x, &w, 1e-6).unwrap_err().to_string();
        assert_eq!(e, "rms_norm: weight has 3 elements, expected 4");
        let wi = MlxBuffer::from_slice(g, &[1i32; 4], &[4])?;
        let e = rms_norm(&mut pass, &x, &wi, 1e-6).unwrap_err().to_string();
        assert_eq!(e, "rms_norm: weight is i32, expected f32 or f16 or bf16");
        Ok(())
    }
}

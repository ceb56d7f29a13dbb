//! Row softmax over the last dimension: `softmax(x * scale + mask)` on f32 activations, with
//! an optional additive f32 mask broadcast over x's leading dimensions.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SoftmaxParams {
    rows: u32,
    n: u32,
    mask_rows: u32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<SoftmaxParams>() == 16);

fn spec(pass: &Pass, n: usize, masked: bool) -> Result<Spec> {
    let (wg, sg) = super::row_wg(pass.caps(), n);
    Spec::new("softmax", DType::F32, wg)
        .with_subgroups(sg)
        .with_const("MASK", u32::from(masked))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for wg in super::ROW_WGS {
        for sg in [false, true] {
            for mask in [0, 1] {
                let s = Spec::new("softmax", DType::F32, wg).with_subgroups(sg);
                v.push((Kernel::Softmax, s.with_const("MASK", mask)?));
            }
        }
    }
    Ok(v)
}

/// Rows of the mask: the mask must be x's shape (leading dimensions may be flattened
/// differently: same element count and last dimension), or, after dropping its leading 1s,
/// a suffix of x's shape, so that x row `r` reads mask row `r % mask_rows`.
fn mask_rows(op: &str, x: &MlxBuffer, mask: &MlxBuffer, rows: usize, n: usize) -> Result<usize> {
    check::dtype(mask, &[DType::F32], op, "mask")?;
    let (mrows, mn) = check::rows(mask, op, "mask")?;
    let ms = mask.shape();
    let lead = ms.iter().take_while(|&&d| d == 1).count();
    let core = &ms[lead.min(ms.len() - 1)..];
    let ok = mn == n && (mrows == rows || x.shape().ends_with(core));
    check::ensure(ok, op, || {
        format!(
            "mask has shape {ms:?}, expected x's shape {:?} or a suffix of it \
             (broadcast over leading dimensions)",
            x.shape()
        )
    })?;
    Ok(mrows)
}

/// `softmax(x * scale + mask)` over the last dimension of f32 `x`.
///
/// `mask` (additive, f32) is either x's shape or a shape that broadcasts over x's leading
/// dimensions: after dropping leading 1s it is a suffix of x's shape, e.g. a causal mask
/// `[L, S]` (or `[1, 1, L, S]`) against scores `[B, H, L, S]`; x row `r` reads mask row
/// `r % mask_rows`. Use `-inf` (or a large negative value) for masked positions. Numerically
/// stable (the row max is subtracted); a row whose logits are all `-inf` comes out as zeros,
/// not NaN.
pub fn softmax(
    pass: &mut Pass,
    x: &MlxBuffer,
    scale: f32,
    mask: Option<&MlxBuffer>,
) -> Result<MlxBuffer> {
    let op = "softmax";
    check::dtype(x, &[DType::F32], op, "x")?;
    let (rows, n) = check::rows(x, op, "x")?;
    check::fits_u32(x.len(), op, "elements")?;
    let mrows = match mask {
        Some(m) => mask_rows(op, x, m, rows, n)?,
        None => 1,
    };
    let y = pass.alloc_like(x)?;
    let params = SoftmaxParams {
        rows: rows as u32,
        n: n as u32,
        mask_rows: mrows as u32,
        scale,
    };
    let spec = spec(pass, n, mask.is_some())?;
    // Without a mask, x fills the mask slot: the MASK = 0 variant never reads it.
    let m = mask.unwrap_or(x);
    pass.dispatch(Kernel::Softmax, spec, &params, &[x, m, &y], rows as u32)?;
    Ok(y)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, devices, gpu, Rng};

    /// f64 softmax of `x * scale + mask[row % mask_rows]`; all -inf rows give zeros.
    fn reference(x: &[f32], n: usize, scale: f64, mask: Option<&[f32]>) -> Vec<f64> {
        let mrows = mask.map_or(1, |m| m.len() / n);
        x.chunks(n)
            .enumerate()
            .flat_map(|(r, row)| {
                let v: Vec<f64> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &xi)| {
                        let add = mask.map_or(0.0, |m| m[(r % mrows) * n + i] as f64);
                        xi as f64 * scale + add
                    })
                    .collect();
                let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    return vec![0.0; n];
                }
                let e: Vec<f64> = v.iter().map(|&t| (t - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(|t| t / sum).collect()
            })
            .collect()
    }

    // Tolerance: each output is exp(v - max) / sum. v = x * scale rounds to f32 (relative
    // 2^-24, so exp picks up |v| * 6e-8 relative: < 1e-6 for |v| < 16), exp is a few ulp,
    // and the f32 sum of up to 50,000 positive terms stays within ~1e-6 relative with the
    // strided + tree order. 1e-5 relative catches any wrong element, row, max or sum; the
    // 1e-12 absolute floor only matters for outputs that are ~0.
    const RTOL: f64 = 1e-5;
    const ATOL: f64 = 1e-12;

    #[test]
    fn softmax_matches_f64_with_and_without_mask() -> Result<()> {
        let mut rng = Rng::new(20);
        for g in devices() {
            for &(rows, n, scale) in &[
                (1usize, 1usize, 1.0f32),
                (3, 7, 0.125),
                (4, 64, 1.0),
                (5, 1000, 0.5),
                (2, 4097, 2.0),
                (9000, 12, 1.0),
            ] {
                let x = rng.normals(rows * n, 3.0);
                let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
                // Full-shape mask with some -inf holes (never a whole row here).
                let mask: Vec<f32> = (0..rows * n)
                    .map(|k| {
                        if k % n != 0 && rng.below(5) == 0 {
                            f32::NEG_INFINITY
                        } else {
                            rng.normal()
                        }
                    })
                    .collect();
                let gm = MlxBuffer::from_slice(g, &mask, &[rows, n])?;
                let mut pass = g.begin();
                let plain = softmax(&mut pass, &gx, scale, None)?;
                let masked = softmax(&mut pass, &gx, scale, Some(&gm))?;
                pass.commit_and_wait()?;
                let what = format!("softmax {rows}x{n} scale {scale}");
                let want = reference(&x, n, scale as f64, None);
                assert_close(&plain.to_vec(g)?, &want, ATOL, RTOL, &what);
                let want = reference(&x, n, scale as f64, Some(&mask));
                assert_close(&masked.to_vec(g)?, &want, ATOL, RTOL, &(what + " masked"));
            }
        }
        Ok(())
    }

    #[test]
    fn one_huge_row_and_many_short_rows_with_broadcast_mask() -> Result<()> {
        let mut rng = Rng::new(21);
        for g in devices() {
            // 1 x 50,000: each invocation folds ~200 elements into its running max and sum.
            let n = 50_000;
            let x = rng.normals(n, 4.0);
            let gx = MlxBuffer::from_slice(g, &x, &[1, n])?;
            // 70,000 rows of 8 (> 65,535 workgroups: a folded grid) as [17500, 4, 8] with a
            // causal [4, 8] mask broadcast over the leading dimension.
            let (b, l, s) = (17_500, 4, 8);
            let xs = rng.normals(b * l * s, 2.0);
            let gxs = MlxBuffer::from_slice(g, &xs, &[b, l, s])?;
            let causal: Vec<f32> = (0..l * s)
                .map(|k| {
                    if k % s > k / s + 4 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let gc = MlxBuffer::from_slice(g, &causal, &[l, s])?;
            let mut pass = g.begin();
            let big = softmax(&mut pass, &gx, 1.0, None)?;
            let many = softmax(&mut pass, &gxs, 0.5, Some(&gc))?;
            pass.commit_and_wait()?;
            let want = reference(&x, n, 1.0, None);
            assert_close(&big.to_vec(g)?, &want, ATOL, RTOL, "softmax 1x50000");
            let want = reference(&xs, s, 0.5, Some(&causal));
            assert_close(&many.to_vec(g)?, &want, ATOL, RTOL, "softmax 70000x8");
        }
        Ok(())
    }

    #[test]
    fn large_logits_and_fully_masked_rows() -> Result<()> {
        let mut rng = Rng::new(22);
        for g in devices() {
            let (rows, n) = (6, 300);
            // Logits near +-80: exp without max subtraction would overflow f32.
            let x: Vec<f32> = (0..rows * n).map(|_| rng.uniform(-80.0, 80.0)).collect();
            let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
            // Row 1 fully -inf (must give zeros), row 3 fully f32::MIN (finite: uniform over
            // x), row 4 all -inf but one element (must give 1 there).
            let mut mask = vec![0.0f32; rows * n];
            mask[n..2 * n].fill(f32::NEG_INFINITY);
            mask[3 * n..4 * n].fill(f32::MIN);
            mask[4 * n..5 * n].fill(f32::NEG_INFINITY);
            mask[4 * n + 123] = 0.0;
            let gm = MlxBuffer::from_slice(g, &mask, &[rows, n])?;
            let mut pass = g.begin();
            let y = softmax(&mut pass, &gx, 1.0, Some(&gm))?;
            pass.commit_and_wait()?;
            let got = y.to_vec::<f32>(g)?;
            assert!(got[n..2 * n].iter().all(|&v| v == 0.0), "fully masked row");
            assert_eq!(got[4 * n + 123], 1.0, "single survivor");
            // |v| <= 80 with scale 1: v is exact, only exp's ulps and the sum remain; rows
            // with f32::MIN added round x away (x + MIN == MIN): a uniform 1/n.
            let mut want = reference(&x, n, 1.0, Some(&mask));
            let mrow: Vec<f32> = (0..n).map(|i| x[3 * n + i] + f32::MIN).collect();
            let m64 = reference(&mrow, n, 1.0, None);
            want[3 * n..4 * n].copy_from_slice(&m64);
            assert_close(&got, &want, ATOL, RTOL, "large logits, masked rows");
        }
        Ok(())
    }

    #[test]
    fn views_at_odd_offsets() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(23);
        let data = rng.normals(4000, 2.0);
        let base = MlxBuffer::from_slice(g, &data, &[4000])?;
        let x = base.view(37, &[3, 333])?;
        let mask = base.view(1501, &[333])?;
        let mut pass = g.begin();
        let y = softmax(&mut pass, &x, 0.7, Some(&mask))?;
        pass.commit_and_wait()?;
        let want = reference(
            &data[37..37 + 999],
            333,
            0.7f32 as f64,
            Some(&data[1501..1834]),
        );
        assert_close(&y.to_vec(g)?, &want, ATOL, RTOL, "softmax of views");
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let x = MlxBuffer::from_slice(g, &[1.0f32; 24], &[2, 3, 4])?;
        let mut pass = g.begin();
        let m = MlxBuffer::from_slice(g, &[0.0f32; 8], &[2, 1, 4])?;
        let e = softmax(&mut pass, &x, 1.0, Some(&m))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "softmax: mask has shape [2, 1, 4], expected x's shape [2, 3, 4] or a suffix of it \
             (broadcast over leading dimensions)"
        );
        let m = MlxBuffer::from_slice(g, &[0.0f32; 15], &[3, 5])?;
        let e = softmax(&mut pass, &x, 1.0, Some(&m))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("softmax: mask has shape [3, 5], expected"),
            "{e}"
        );
        let m = MlxBuffer::from_slice(g, &[half::bf16::ZERO; 12], &[3, 4])?;
        let e = softmax(&mut pass, &x, 1.0, Some(&m))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "softmax: mask is bf16, expected f32");
        let h = MlxBuffer::from_slice(g, &[half::f16::ONE; 4], &[4])?;
        let e = softmax(&mut pass, &h, 1.0, None).unwrap_err().to_string();
        assert_eq!(e, "softmax: x is f16, expected f32");
        // Accepted broadcasts: a suffix, with or without leading 1s, and x's flattened shape.
        for shape in [vec![3usize, 4], vec![1, 1, 3, 4], vec![4], vec![6, 4]] {
            let len = shape.iter().product();
            let m = MlxBuffer::from_slice(g, &vec![0.0f32; len], &shape)?;
            softmax(&mut pass, &x, 1.0, Some(&m))?;
        }
        Ok(())
    }
}

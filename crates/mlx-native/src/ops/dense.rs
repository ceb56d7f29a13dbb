//! Dense matmul `y = x · Wᵀ` for an f32/f16/bf16 weight `W [N, K]` and f32 activations.
//!
//! The same variant choice as the quantized matmul ([`super::qmatmul::plan`]): a
//! matrix-vector kernel for M ≤ 8 (row-blocks of 32 invocations reading consecutive elements
//! of RPT rows, x read once per element for all of them, subgroup or workgroup-memory
//! reduction), 64 x 64 scalar tiles for larger M, and the cooperative-matrix kernel of
//! `shaders/matmul_coop.wgsl` (shared with `qmm`) where the device has it. Any K (no
//! alignment); accumulation in f32 (the cooperative path rounds x and W to f16).

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

use super::qmatmul::{
    coop_entry, coop_wg, dispatch_coop, plan, CoopParams, MatmulPlan, COOP_SG, TILED_BLOCK,
    TILED_WG, VEC_RPTS, VEC_WG,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DenseParams {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<DenseParams>() == 16);

fn vec_spec(dt: DType, rpt: u32, sg: bool) -> Result<Spec> {
    Ok(Spec::new("matvec", dt, VEC_WG)
        .with_const("RPT", rpt)?
        .with_subgroups(sg))
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for dt in super::FLOAT_DTYPES {
        for rpt in VEC_RPTS {
            for sg in [false, true] {
                v.push((Kernel::Dense, vec_spec(dt, rpt, sg)?));
            }
        }
        v.push((Kernel::Dense, Spec::new("mm", dt, TILED_WG)));
        for (tile, sgs) in [(16, 4), (16, 8), (8, 4)] {
            v.push((
                Kernel::MatmulCoop,
                Spec::new(coop_entry(tile, false), dt, sgs * COOP_SG),
            ));
        }
    }
    Ok(v)
}

/// `y = x · Wᵀ`: x f32 `[..., K]`, w `[N, K]` f32/f16/bf16, y f32 `[..., N]`.
pub fn matmul(pass: &mut Pass, x: &MlxBuffer, w: &MlxBuffer) -> Result<MlxBuffer> {
    let op = "matmul";
    check::dtype(x, &[DType::F32], op, "x")?;
    check::dtype(w, &super::FLOAT_DTYPES, op, "w")?;
    let (m, k) = check::rows(x, op, "x")?;
    check::ensure(w.shape().len() == 2 && w.shape()[1] == k, op, || {
        format!("w has shape {:?}, expected [N, {k}]", w.shape())
    })?;
    let n = w.shape()[0];
    let mut yshape = x.shape().to_vec();
    if let Some(last) = yshape.last_mut() {
        *last = n;
    }
    let (mu, nu, ku) = (
        check::fits_u32(m, op, "M")?,
        check::fits_u32(n, op, "N")?,
        check::fits_u32(k, op, "K")?,
    );
    check::fits_u32(n.saturating_mul(k), op, "weight elements")?;
    let y = pass.alloc(DType::F32, &yshape)?;
    let params = DenseParams {
        m: mu,
        n: nu,
        k: ku,
        _pad: 0,
    };
    match plan(m, n, k, pass.caps()) {
        MatmulPlan::Vector { rpt, subgroups } => {
            let rows_per_wg = (VEC_WG / 32) as usize * rpt as usize;
            let groups = check::fits_u32(n.div_ceil(rows_per_wg), op, "workgroups")?;
            let spec = vec_spec(w.dtype(), rpt, subgroups)?;
            pass.dispatch(Kernel::Dense, spec, &params, &[x, w, &y], groups)?;
        }
        MatmulPlan::Tiled => {
            let tiles = m.div_ceil(TILED_BLOCK) * n.div_ceil(TILED_BLOCK);
            let groups = check::fits_u32(tiles, op, "workgroups")?;
            let spec = Spec::new("mm", w.dtype(), TILED_WG);
            pass.dispatch(Kernel::Dense, spec, &params, &[x, w, &y], groups)?;
        }
        MatmulPlan::Coop { tile } => {
            let spec = Spec::new(
                coop_entry(tile, false),
                w.dtype(),
                coop_wg(tile, m, pass.caps()),
            );
            let cp = CoopParams::new(mu, nu, ku, 0, 0);
            // Bindings 1..3 (quantized W) are unused here: filled with w.
            dispatch_coop(pass, tile, spec, cp, x, [w, w, w, w], &y, None, op)?;
        }
    }
    Ok(y)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::testutil::{devices, gpu, Rng};
    use half::{bf16, f16};

    fn upload(
        g: &crate::MlxDevice,
        w: &[f32],
        shape: &[usize],
        dt: DType,
    ) -> (MlxBuffer, Vec<f64>) {
        match dt {
            DType::F32 => (
                MlxBuffer::from_slice(g, w, shape).unwrap(),
                w.iter().map(|&v| v as f64).collect(),
            ),
            DType::F16 => {
                let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let r = h.iter().map(|v| v.to_f64()).collect();
                (MlxBuffer::from_slice(g, &h, shape).unwrap(), r)
            }
            _ => {
                let h: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let r = h.iter().map(|v| v.to_f64()).collect();
                (MlxBuffer::from_slice(g, &h, shape).unwrap(), r)
            }
        }
    }

    /// Checks y against the f64 product. Tolerance: f32 accumulation over K terms has a
    /// typical error of a few sqrt(K) units of 2^-24 relative to Σ|x·w| (Higham §3.5; the
    /// order of the sum differs between kernels); 4·sqrt(K) leaves margin without hiding a
    /// wrong element. The cooperative path rounds x and W to f16: 2·2^-11 per term on top.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_product(
        got: &[f32],
        x: &[f32],
        w: &[f64],
        m: usize,
        n: usize,
        k: usize,
        f16_inputs: bool,
        what: &str,
    ) {
        check_product_with(got, x, w, m, n, k, f16_inputs, &|_, _| 0.0, what);
    }

    /// [`check_product`] with `extra(i, j)` added to the tolerance of y[i, j] (a kernel's own
    /// stated approximation, e.g. qmv's quantized x).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_product_with(
        got: &[f32],
        x: &[f32],
        w: &[f64],
        m: usize,
        n: usize,
        k: usize,
        f16_inputs: bool,
        extra: &dyn Fn(usize, usize) -> f64,
        what: &str,
    ) {
        assert_eq!(got.len(), m * n, "{what}: length");
        let u = 2f64.powi(-24);
        for i in 0..m {
            for j in 0..n {
                let (mut dot, mut abs) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let p = x[i * k + l] as f64 * w[j * k + l];
                    dot += p;
                    abs += p.abs();
                }
                let mut tol = (4.0 * (k as f64).sqrt() + 2.0) * u * abs + 1e-30;
                if f16_inputs {
                    tol += 2.0 * 2f64.powi(-11) * abs;
                }
                tol += extra(i, j);
                let g = got[i * n + j] as f64;
                assert!(
                    g.is_finite() && (g - dot).abs() <= tol,
                    "{what}: y[{i},{j}] = {g:e}, want {dot:e} (err {:e} > tol {tol:e})",
                    (g - dot).abs()
                );
            }
        }
    }

    #[test]
    fn matmul_matches_f64_all_dtypes_and_paths() -> Result<()> {
        let mut rng = Rng::new(40);
        for g in devices() {
            let coop = matches!(plan(64, 64, 64, g.caps()), MatmulPlan::Coop { .. });
            for &(m, n, k, dt) in &[
                (1usize, 1usize, 1usize, DType::F32),
                (1, 7, 33, DType::F16),
                (3, 515, 96, DType::BF16),
                (8, 4097, 64, DType::F16),
                (2, 33, 1000, DType::F32),
                (9, 70, 37, DType::BF16),
                (33, 65, 100, DType::F32),
                (130, 17, 64, DType::F16),
                // Several cooperative blocks (128 W rows by 128 x rows), tails in M, N, K.
                (200, 300, 200, DType::BF16),
            ] {
                let x = rng.normals(m * k, 1.0);
                let wv = rng.normals(n * k, 0.5);
                let gx = MlxBuffer::from_slice(g, &x, &[m, k])?;
                let (gw, w64) = upload(g, &wv, &[n, k], dt);
                let mut pass = g.begin();
                let y = matmul(&mut pass, &gx, &gw)?;
                pass.commit_and_wait()?;
                assert_eq!(y.shape(), &[m, n]);
                check_product(
                    &y.to_vec(g)?,
                    &x,
                    &w64,
                    m,
                    n,
                    k,
                    coop && m > 8,
                    &format!("matmul {m}x{n}x{k} {dt}"),
                );
            }
        }
        Ok(())
    }

    #[test]
    fn matmul_reads_views_and_batches() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(41);
        let (m, n, k) = (2usize, 9usize, 40usize);
        let xb = rng.normals(3 + 2 * m * k, 1.0);
        let wb = rng.normals(5 + n * k, 1.0);
        let gxb = MlxBuffer::from_slice(g, &xb, &[xb.len()])?;
        let gwb = MlxBuffer::from_slice(g, &wb, &[wb.len()])?;
        let x = gxb.view(3, &[2, m, k])?;
        let w = gwb.view(5, &[n, k])?;
        let mut pass = g.begin();
        let y = matmul(&mut pass, &x, &w)?;
        pass.commit_and_wait()?;
        assert_eq!(y.shape(), &[2, m, n]);
        let w64: Vec<f64> = wb[5..].iter().map(|&v| v as f64).collect();
        check_product(&y.to_vec(g)?, &xb[3..], &w64, 2 * m, n, k, false, "views");
        Ok(())
    }

    #[test]
    fn matmul_bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let x = MlxBuffer::from_slice(g, &[1.0f32; 8], &[2, 4])?;
        let w = MlxBuffer::from_slice(g, &[1.0f32; 15], &[3, 5])?;
        let mut pass = g.begin();
        let e = matmul(&mut pass, &x, &w).unwrap_err().to_string();
        assert_eq!(e, "matmul: w has shape [3, 5], expected [N, 4]");
        let wi = MlxBuffer::from_slice(g, &[1i32; 12], &[3, 4])?;
        let e = matmul(&mut pass, &x, &wi).unwrap_err().to_string();
        assert_eq!(e, "matmul: w is i32, expected f32 or f16 or bf16");
        Ok(())
    }
}

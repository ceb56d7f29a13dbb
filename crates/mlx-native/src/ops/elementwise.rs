//! Elementwise arithmetic on f32 activations: `add`, `mul`, `add_scaled`, `scale`.
//! `b` is either the same shape as `a` or one row (`a`'s last dimension) broadcast over rows.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ElementwiseParams {
    n: u32,
    b_len: u32,
    s: f32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<ElementwiseParams>() == 16);

const WG: u32 = 256;
const ENTRIES: [&str; 4] = ["add", "mul", "add_scaled", "scale"];

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    ENTRIES
        .iter()
        .map(|e| (Kernel::Elementwise, Spec::new(e, DType::F32, WG)))
        .collect()
}

fn binary(
    pass: &mut Pass,
    op: &'static str,
    a: &MlxBuffer,
    b: &MlxBuffer,
    s: f32,
) -> Result<MlxBuffer> {
    check::dtype(a, &[DType::F32], op, "a")?;
    check::dtype(b, &[DType::F32], op, "b")?;
    let (_, row) = check::rows(a, op, "a")?;
    check::ensure(b.len() == a.len() || b.len() == row, op, || {
        format!(
            "b has shape {:?}; expected a's shape {:?} or one row of {row}",
            b.shape(),
            a.shape()
        )
    })?;
    let n = check::fits_u32(a.len(), op, "elements")?;
    let out = pass.alloc_like(a)?;
    let params = ElementwiseParams {
        n,
        b_len: b.len() as u32,
        s,
        _pad: 0,
    };
    pass.dispatch(
        Kernel::Elementwise,
        Spec::new(op, DType::F32, WG),
        &params,
        &[a, b, &out],
        n.div_ceil(WG),
    )?;
    Ok(out)
}

/// `a + b` (also the residual add).
pub fn add(pass: &mut Pass, a: &MlxBuffer, b: &MlxBuffer) -> Result<MlxBuffer> {
    binary(pass, "add", a, b, 0.0)
}

/// `a * b`.
pub fn mul(pass: &mut Pass, a: &MlxBuffer, b: &MlxBuffer) -> Result<MlxBuffer> {
    binary(pass, "mul", a, b, 0.0)
}

/// `a + s * b`.
pub fn add_scaled(pass: &mut Pass, a: &MlxBuffer, b: &MlxBuffer, s: f32) -> Result<MlxBuffer> {
    binary(pass, "add_scaled", a, b, s)
}

/// `a * s`.
pub fn scale(pass: &mut Pass, a: &MlxBuffer, s: f32) -> Result<MlxBuffer> {
    // `b` is unused by the kernel; `a` fills its slot.
    binary(pass, "scale", a, a, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, gpu, Rng};

    // f32 arithmetic of one operation: exact up to one rounding, so 1 ulp-ish relative.
    const RTOL: f64 = 2e-7;

    #[test]
    fn binary_ops_match_f64_over_awkward_shapes() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(1);
        // 70_000 * 256 / 256 workgroups > 65,535: exercises the folded grid.
        for shape in [vec![1usize], vec![3, 7], vec![257], vec![70_000, 256]] {
            let n: usize = shape.iter().product();
            let row = *shape.last().unwrap();
            let a = rng.normals(n, 3.0);
            let b_full = rng.normals(n, 2.0);
            let b_row = rng.normals(row, 2.0);
            let ga = MlxBuffer::from_slice(g, &a, &shape)?;
            let gbf = MlxBuffer::from_slice(g, &b_full, &shape)?;
            let gbr = MlxBuffer::from_slice(g, &b_row, &[row])?;
            let mut pass = g.begin();
            let add_o = add(&mut pass, &ga, &gbf)?;
            let mul_o = mul(&mut pass, &ga, &gbr)?;
            let axpy_o = add_scaled(&mut pass, &ga, &gbf, -0.75)?;
            let scale_o = scale(&mut pass, &ga, 1.5)?;
            pass.commit_and_wait()?;
            let f = |k: usize| a[k] as f64;
            let want_add: Vec<f64> = (0..n).map(|k| f(k) + b_full[k] as f64).collect();
            let want_mul: Vec<f64> = (0..n).map(|k| f(k) * b_row[k % row] as f64).collect();
            let want_axpy: Vec<f64> = (0..n).map(|k| f(k) - 0.75 * b_full[k] as f64).collect();
            let want_scale: Vec<f64> = (0..n).map(|k| f(k) * 1.5).collect();
            assert_close(&add_o.to_vec(g)?, &want_add, 1e-6, RTOL, "add");
            assert_close(&mul_o.to_vec(g)?, &want_mul, 1e-6, RTOL, "mul");
            assert_close(&axpy_o.to_vec(g)?, &want_axpy, 1e-6, 4e-7, "add_scaled");
            assert_close(&scale_o.to_vec(g)?, &want_scale, 1e-6, RTOL, "scale");
        }
        Ok(())
    }

    #[test]
    fn views_at_odd_offsets_read_the_right_elements() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(2);
        let data = rng.normals(1000, 1.0);
        let base = MlxBuffer::from_slice(g, &data, &[1000])?;
        let a = base.view(13, &[5, 9])?;
        let b = base.view(501, &[5, 9])?;
        let mut pass = g.begin();
        let o = add(&mut pass, &a, &b)?;
        pass.commit_and_wait()?;
        let want: Vec<f64> = (0..45)
            .map(|k| data[13 + k] as f64 + data[501 + k] as f64)
            .collect();
        assert_close(&o.to_vec(g)?, &want, 1e-6, RTOL, "add of views");
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let a = MlxBuffer::from_slice(g, &[1.0f32; 12], &[3, 4])?;
        let b = MlxBuffer::from_slice(g, &[1.0f32; 5], &[5])?;
        let h = MlxBuffer::from_slice(g, &[half::f16::ONE; 12], &[3, 4])?;
        let mut pass = g.begin();
        let e = add(&mut pass, &a, &b).unwrap_err().to_string();
        assert!(e.contains("add: b has shape [5]"), "{e}");
        let e = mul(&mut pass, &h, &a).unwrap_err().to_string();
        assert_eq!(e, "mul: a is f16, expected f32");
        Ok(())
    }
}

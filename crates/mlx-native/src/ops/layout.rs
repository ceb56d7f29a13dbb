//! Data movement: `copy` (a view into a fresh contiguous buffer), `transpose_last2` (tiled),
//! `transpose` (any permutation of up to 4 dimensions) and `concat_last`. Elements are moved
//! as bits: 32-bit dtypes (f32, u32, i32) everywhere, 16-bit ones (f16, bf16, u16) in `copy`.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LayoutParams {
    n: u32,
    a: u32,
    b: u32,
    off: u32,
    dims: [u32; 4],
    strides: [u32; 4],
}
const _: () = assert!(std::mem::size_of::<LayoutParams>() == 48);

const WG: u32 = 256;
/// Side of the square tile of `transpose_last2`.
const TILE: usize = 32;
const WORD_DTYPES: [DType; 3] = [DType::F32, DType::U32, DType::I32];
const COPY_DTYPES: [DType; 6] = [
    DType::F32,
    DType::U32,
    DType::I32,
    DType::F16,
    DType::BF16,
    DType::U16,
];
const ENTRIES: [&str; 5] = [
    "copy_u32",
    "copy_u16",
    "transpose_tiled",
    "gather4",
    "concat_part",
];

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    ENTRIES
        .iter()
        .map(|e| (Kernel::Layout, Spec::new(e, DType::U32, WG)))
        .collect()
}

fn params(n: u32) -> LayoutParams {
    LayoutParams {
        n,
        a: 0,
        b: 0,
        off: 0,
        dims: [1; 4],
        strides: [0; 4],
    }
}

fn run(
    pass: &mut Pass,
    entry: &'static str,
    p: &LayoutParams,
    x: &MlxBuffer,
    out: &MlxBuffer,
    workgroups: u32,
) -> Result<()> {
    pass.dispatch(
        Kernel::Layout,
        Spec::new(entry, DType::U32, WG),
        p,
        &[x, out],
        workgroups,
    )
}

/// A contiguous copy of `x` (a view at any element offset) into a fresh buffer of the same
/// dtype and shape. 32-bit and 16-bit dtypes.
pub fn copy(pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
    let op = "copy";
    check::dtype(x, &COPY_DTYPES, op, "x")?;
    let n = check::fits_u32(x.len(), op, "elements")?;
    if x.dtype().size() == 4 {
        let out = pass.alloc_like(x)?;
        run(pass, "copy_u32", &params(n), x, &out, n.div_ceil(WG))?;
        return Ok(out);
    }
    // One invocation per output word (two halves). The allocation is rounded up to whole
    // words (the kernel writes the pad half) and the result is a view of the real length.
    let words = x.len().div_ceil(2);
    let out = pass.alloc(x.dtype(), &[2 * words])?;
    run(pass, "copy_u16", &params(n), x, &out, n.div_ceil(2 * WG))?;
    out.view(0, x.shape())
}

/// Swap the last two dimensions: `[.., a, b] -> [.., b, a]`, 32-bit dtypes, through 32x32
/// tiles in workgroup memory so that both the reads and the writes are row-contiguous.
pub fn transpose_last2(pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
    let op = "transpose_last2";
    check::dtype(x, &WORD_DTYPES, op, "x")?;
    let shape = x.shape();
    check::ensure(shape.len() >= 2, op, || {
        format!("x has shape {shape:?}, expected at least 2 dimensions")
    })?;
    let r = shape.len();
    let mut out_shape = shape.to_vec();
    out_shape.swap(r - 2, r - 1);
    tiled(pass, op, x, &out_shape)
}

/// The tiled kernel over `x` seen as [batch, a, b]; `out_shape` is the caller's shape.
fn tiled(pass: &mut Pass, op: &str, x: &MlxBuffer, out_shape: &[usize]) -> Result<MlxBuffer> {
    let shape = x.shape();
    let r = shape.len();
    let (a, b) = (shape[r - 2], shape[r - 1]);
    let batch = x.len() / (a * b);
    check::fits_u32(x.len(), op, "elements")?;
    let tiles = batch * a.div_ceil(TILE) * b.div_ceil(TILE);
    let groups = check::fits_u32(tiles, op, "tiles")?;
    let out = pass.alloc(x.dtype(), out_shape)?;
    let mut p = params(batch as u32);
    p.a = a as u32;
    p.b = b as u32;
    run(pass, "transpose_tiled", &p, x, &out, groups)?;
    Ok(out)
}

/// Permute the dimensions of `x` (up to 4, 32-bit dtypes): output dimension `d` is input
/// dimension `perm[d]`, as `numpy.transpose`. Swapping only the last two takes the tiled
/// kernel, the identity a copy, anything else a strided gather.
pub fn transpose(pass: &mut Pass, x: &MlxBuffer, perm: &[usize]) -> Result<MlxBuffer> {
    let op = "transpose";
    check::dtype(x, &WORD_DTYPES, op, "x")?;
    let shape = x.shape();
    let r = shape.len();
    check::ensure(r <= 4, op, || {
        format!("x has {r} dimensions, at most 4 are supported")
    })?;
    let mut seen = [false; 4];
    let valid = perm.len() == r
        && perm
            .iter()
            .all(|&d| d < r && !std::mem::replace(&mut seen[d], true));
    check::ensure(valid, op, || {
        format!("perm {perm:?} is not a permutation of 0..{r}")
    })?;
    let out_shape: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
    let n = check::fits_u32(x.len(), op, "elements")?;
    if perm.iter().enumerate().all(|(i, &d)| i == d) {
        let out = pass.alloc_like(x)?;
        run(pass, "copy_u32", &params(n), x, &out, n.div_ceil(WG))?;
        return Ok(out);
    }
    if r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &d)| i == d)
    {
        return tiled(pass, op, x, &out_shape);
    }
    let mut in_strides = vec![1usize; r];
    for d in (0..r.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * shape[d + 1];
    }
    let mut p = params(n);
    // Right-align the output dimensions in the 4 slots; leading slots are size 1.
    for (d, &src) in perm.iter().enumerate() {
        p.dims[4 - r + d] = shape[src] as u32;
        p.strides[4 - r + d] = in_strides[src] as u32;
    }
    let out = pass.alloc(x.dtype(), &out_shape)?;
    run(pass, "gather4", &p, x, &out, n.div_ceil(WG))?;
    Ok(out)
}

/// Concatenate along the last dimension: inputs [.., n_i] with equal leading dimensions and
/// one 32-bit dtype give [.., sum n_i]. One dispatch per input writes its columns.
pub fn concat_last(pass: &mut Pass, inputs: &[&MlxBuffer]) -> Result<MlxBuffer> {
    let op = "concat_last";
    let first = inputs
        .first()
        .ok_or_else(|| crate::MlxError::invalid("concat_last: no inputs"))?;
    check::dtype(first, &WORD_DTYPES, op, "inputs[0]")?;
    let lead = &first.shape()[..first.shape().len() - 1];
    let mut total = 0usize;
    for (i, x) in inputs.iter().enumerate() {
        let name = format!("inputs[{i}]");
        check::dtype(x, &[first.dtype()], op, &name)?;
        let s = x.shape();
        check::ensure(
            s.len() == first.shape().len() && &s[..s.len() - 1] == lead,
            op,
            || {
                format!(
                    "{name} has shape {s:?} but inputs[0] has shape {:?}: all but the last \
                 dimension must match",
                    first.shape()
                )
            },
        )?;
        total += s[s.len() - 1];
    }
    let mut out_shape = first.shape().to_vec();
    if let Some(last) = out_shape.last_mut() {
        *last = total;
    }
    let rows: usize = lead.iter().product();
    check::fits_u32(rows * total, op, "output elements")?;
    let out = pass.alloc(first.dtype(), &out_shape)?;
    let mut off = 0usize;
    for x in inputs {
        let w = x.shape()[x.shape().len() - 1];
        let n = x.len() as u32;
        let mut p = params(n);
        p.a = w as u32;
        p.b = total as u32;
        p.off = off as u32;
        run(pass, "concat_part", &p, x, &out, n.div_ceil(WG))?;
        off += w;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::testutil::{gpu, Rng};
    use half::{bf16, f16};

    // Layout ops move bits: every comparison is exact (compared as bit patterns, so NaN
    // poison in an unwritten element fails too).

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Row-major CPU permutation, independent of the kernel's stride arithmetic.
    fn ref_transpose(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
        let r = shape.len();
        let out_shape: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
        let n: usize = shape.iter().product();
        let mut out = vec![0.0f32; n];
        let mut coord = vec![0usize; r];
        for (o, slot) in out.iter_mut().enumerate() {
            // Output coordinate of element o.
            let mut t = o;
            for d in (0..r).rev() {
                coord[d] = t % out_shape[d];
                t /= out_shape[d];
            }
            // Input coordinate: in[perm[d]] = out[d].
            let mut src = 0;
            let mut inc = vec![0usize; r];
            for d in 0..r {
                inc[perm[d]] = coord[d];
            }
            for d in 0..r {
                src = src * shape[d] + inc[d];
            }
            *slot = x[src];
        }
        out
    }

    fn perms(r: usize) -> Vec<Vec<usize>> {
        if r == 0 {
            return vec![vec![]];
        }
        let mut v = Vec::new();
        for p in perms(r - 1) {
            for pos in 0..r {
                let mut q = p.clone();
                q.insert(pos, r - 1);
                v.push(q);
            }
        }
        v
    }

    #[test]
    fn copy_of_views_at_odd_offsets_all_dtypes() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(40);
        let data = rng.normals(1000, 1.0);
        let base = MlxBuffer::from_slice(g, &data, &[1000])?;
        let mut pass = g.begin();
        let c32 = copy(&mut pass, &base.view(13, &[5, 9])?)?;
        // 70,000 * 256 elements / 256 a workgroup: more than 65,535 workgroups.
        let big = rng.normals(70_000 * 256, 1.0);
        let gbig = MlxBuffer::from_slice(g, &big, &[70_000, 256])?;
        let cbig = copy(&mut pass, &gbig)?;
        let hdata: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        let bdata: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let hbase = MlxBuffer::from_slice(g, &hdata, &[1000])?;
        let bbase = MlxBuffer::from_slice(g, &bdata, &[1000])?;
        // Odd offset with odd length, even offset with odd length, odd offset with even.
        let h1 = copy(&mut pass, &hbase.view(7, &[5, 9])?)?;
        let h2 = copy(&mut pass, &hbase.view(100, &[1])?)?;
        let b1 = copy(&mut pass, &bbase.view(333, &[2, 31])?)?;
        pass.commit_and_wait()?;
        assert_eq!(c32.shape(), &[5, 9]);
        assert_eq!(bits(&c32.to_vec::<f32>(g)?), bits(&data[13..58]));
        assert_eq!(bits(&cbig.to_vec::<f32>(g)?), bits(&big));
        assert_eq!(h1.to_vec::<f16>(g)?, hdata[7..52].to_vec());
        assert_eq!(h2.to_vec::<f16>(g)?, hdata[100..101].to_vec());
        assert_eq!(b1.to_vec::<bf16>(g)?, bdata[333..395].to_vec());
        Ok(())
    }

    #[test]
    fn transpose_last2_tiles_cover_ragged_edges() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(41);
        // [66000, 2, 2]: 66,000 tiles, more than 65,535 workgroups.
        for shape in [
            vec![1usize, 1],
            vec![3, 5, 7],
            vec![2, 33, 65],
            vec![64, 32],
            vec![2, 3, 100, 3],
            vec![66_000, 2, 2],
        ] {
            let n: usize = shape.iter().product();
            let x = rng.normals(n, 1.0);
            let gx = MlxBuffer::from_slice(g, &x, &shape)?;
            let mut pass = g.begin();
            let y = transpose_last2(&mut pass, &gx)?;
            pass.commit_and_wait()?;
            let r = shape.len();
            let mut perm: Vec<usize> = (0..r).collect();
            perm.swap(r - 2, r - 1);
            assert_eq!(
                y.shape(),
                &perm.iter().map(|&d| shape[d]).collect::<Vec<_>>()[..]
            );
            assert_eq!(
                bits(&y.to_vec::<f32>(g)?),
                bits(&ref_transpose(&x, &shape, &perm)),
                "transpose_last2 {shape:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn transpose_every_permutation_of_3_and_4_dims() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(42);
        for shape in [vec![7usize], vec![4, 9], vec![3, 5, 7], vec![2, 3, 4, 5]] {
            let n: usize = shape.iter().product();
            // A view at an odd offset of a larger buffer.
            let data = rng.normals(n + 5, 1.0);
            let base = MlxBuffer::from_slice(g, &data, &[n + 5])?;
            let gx = base.view(5, &shape)?;
            let x = &data[5..];
            for perm in perms(shape.len()) {
                let mut pass = g.begin();
                let y = transpose(&mut pass, &gx, &perm)?;
                pass.commit_and_wait()?;
                let want_shape: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
                assert_eq!(y.shape(), &want_shape[..]);
                assert_eq!(
                    bits(&y.to_vec::<f32>(g)?),
                    bits(&ref_transpose(x, &shape, &perm)),
                    "transpose {shape:?} by {perm:?}"
                );
            }
        }
        // Integer dtypes move the same way.
        let xi: Vec<i32> = (0..60).map(|v| v * 7 - 100).collect();
        let gi = MlxBuffer::from_slice(g, &xi, &[3, 4, 5])?;
        let mut pass = g.begin();
        let yi = transpose(&mut pass, &gi, &[2, 0, 1])?;
        pass.commit_and_wait()?;
        let xf: Vec<f32> = xi.iter().map(|&v| v as f32).collect();
        let want: Vec<i32> = ref_transpose(&xf, &[3, 4, 5], &[2, 0, 1])
            .iter()
            .map(|&v| v as i32)
            .collect();
        assert_eq!(yi.to_vec::<i32>(g)?, want);
        Ok(())
    }

    #[test]
    fn concat_last_places_columns() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(43);
        for widths in [vec![5usize, 1, 7], vec![3, 3], vec![1, 2, 3, 4], vec![9]] {
            for lead in [vec![3usize], vec![2, 3], vec![]] {
                let rows: usize = lead.iter().product();
                let datas: Vec<Vec<f32>> = widths
                    .iter()
                    .map(|&w| rng.normals(rows * w + 3, 1.0))
                    .collect();
                let bases: Vec<MlxBuffer> = datas
                    .iter()
                    .map(|d| MlxBuffer::from_slice(g, d, &[d.len()]))
                    .collect::<Result<_>>()?;
                // Each input a view at offset 3 of its buffer.
                let views: Vec<MlxBuffer> = bases
                    .iter()
                    .zip(&widths)
                    .map(|(b, &w)| {
                        let mut s = lead.clone();
                        s.push(w);
                        b.view(3, &s)
                    })
                    .collect::<Result<_>>()?;
                let refs: Vec<&MlxBuffer> = views.iter().collect();
                let mut pass = g.begin();
                let y = concat_last(&mut pass, &refs)?;
                pass.commit_and_wait()?;
                let total: usize = widths.iter().sum();
                let mut want_shape = lead.clone();
                want_shape.push(total);
                assert_eq!(y.shape(), &want_shape[..]);
                let mut want = Vec::new();
                for r in 0..rows {
                    for (d, &w) in datas.iter().zip(&widths) {
                        want.extend_from_slice(&d[3 + r * w..3 + (r + 1) * w]);
                    }
                }
                assert_eq!(
                    bits(&y.to_vec::<f32>(g)?),
                    bits(&want),
                    "concat {lead:?} {widths:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let x = MlxBuffer::from_slice(g, &[1.0f32; 24], &[2, 3, 4])?;
        let y = MlxBuffer::from_slice(g, &[1.0f32; 8], &[4, 2])?;
        let h = MlxBuffer::from_slice(g, &[f16::ONE; 24], &[2, 3, 4])?;
        let u8s = MlxBuffer::from_slice(g, &[1u8; 8], &[8])?;
        let x5 = MlxBuffer::from_slice(g, &[1.0f32; 32], &[2, 2, 2, 2, 2])?;
        let v = MlxBuffer::from_slice(g, &[1.0f32; 4], &[4])?;
        let mut pass = g.begin();
        let e = transpose(&mut pass, &x, &[0, 0, 1])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "transpose: perm [0, 0, 1] is not a permutation of 0..3");
        let e = transpose(&mut pass, &x, &[0, 1]).unwrap_err().to_string();
        assert_eq!(e, "transpose: perm [0, 1] is not a permutation of 0..3");
        let e = transpose(&mut pass, &x, &[0, 1, 3])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "transpose: perm [0, 1, 3] is not a permutation of 0..3");
        let e = transpose(&mut pass, &x5, &[0, 1, 2, 3, 4])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "transpose: x has 5 dimensions, at most 4 are supported");
        let e = transpose(&mut pass, &h, &[2, 1, 0])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "transpose: x is f16, expected f32 or u32 or i32");
        let e = transpose_last2(&mut pass, &v).unwrap_err().to_string();
        assert_eq!(
            e,
            "transpose_last2: x has shape [4], expected at least 2 dimensions"
        );
        let e = copy(&mut pass, &u8s).unwrap_err().to_string();
        assert_eq!(
            e,
            "copy: x is u8, expected f32 or u32 or i32 or f16 or bf16 or u16"
        );
        let e = concat_last(&mut pass, &[&x, &y]).unwrap_err().to_string();
        assert_eq!(
            e,
            "concat_last: inputs[1] has shape [4, 2] but inputs[0] has shape [2, 3, 4]: all \
             but the last dimension must match"
        );
        let x2 = x.reshape(&[6, 4])?;
        let e = concat_last(&mut pass, &[&x2, &y]).unwrap_err().to_string();
        assert_eq!(
            e,
            "concat_last: inputs[1] has shape [4, 2] but inputs[0] has shape [6, 4]: all \
             but the last dimension must match"
        );
        let yi = MlxBuffer::from_slice(g, &[1i32; 12], &[6, 2])?;
        let e = concat_last(&mut pass, &[&x2, &yi]).unwrap_err().to_string();
        assert_eq!(e, "concat_last: inputs[1] is i32, expected f32");
        let e = concat_last(&mut pass, &[]).unwrap_err().to_string();
        assert_eq!(e, "concat_last: no inputs");
        Ok(())
    }
}

//! Token embedding lookup: `embedding`, `embedding_scaled` (Gemma multiplies by sqrt(dim)).
//!
//! `table` is `[vocab, dim]` f32, f16 or bf16; `ids` holds `n` u32 or i32 token ids (any
//! shape); the result is f32 `[n, dim]`. Ids come from the GPU sampler, so they are not
//! checked on the CPU: an id >= vocab, or a negative i32, reads nothing and yields a row of
//! zeros (never an out-of-bounds read).

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbeddingParams {
    total: u32,
    dim: u32,
    vocab: u32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingParams>() == 16);

const WG: u32 = 256;

fn spec(table_dtype: DType) -> Spec {
    Spec::new("embedding", table_dtype, WG)
}

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    super::FLOAT_DTYPES
        .iter()
        .map(|&dt| (Kernel::Embedding, spec(dt)))
        .collect()
}

/// Rows `table[ids[i]]` as f32 `[n, dim]`; out-of-range ids give zero rows.
pub fn embedding(pass: &mut Pass, table: &MlxBuffer, ids: &MlxBuffer) -> Result<MlxBuffer> {
    lookup(pass, "embedding", table, ids, 1.0)
}

/// `embedding(table, ids) * scale`, fused (e.g. Gemma's `sqrt(dim)`).
pub fn embedding_scaled(
    pass: &mut Pass,
    table: &MlxBuffer,
    ids: &MlxBuffer,
    scale: f32,
) -> Result<MlxBuffer> {
    lookup(pass, "embedding_scaled", table, ids, scale)
}

fn lookup(
    pass: &mut Pass,
    op: &str,
    table: &MlxBuffer,
    ids: &MlxBuffer,
    scale: f32,
) -> Result<MlxBuffer> {
    check::dtype(table, &super::FLOAT_DTYPES, op, "table")?;
    check::dtype(ids, &[DType::U32, DType::I32], op, "ids")?;
    let &[vocab, dim] = table.shape() else {
        return Err(crate::error::MlxError::invalid(format!(
            "{op}: table has shape {:?}, expected [vocab, dim]",
            table.shape()
        )));
    };
    check::fits_u32(table.len(), op, "table elements")?;
    let n = ids.len();
    let total = check::fits_u32(n * dim, op, "output elements")?;
    let out = pass.alloc(DType::F32, &[n, dim])?;
    let params = EmbeddingParams {
        total,
        dim: dim as u32,
        vocab: vocab as u32,
        scale,
    };
    pass.dispatch(
        Kernel::Embedding,
        spec(table.dtype()),
        &params,
        &[table, ids, &out],
        total.div_ceil(WG),
    )?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, gpu, Rng};
    use crate::MlxDevice;
    use half::{bf16, f16};

    /// Upload `w` as `dt`; also return the values the GPU sees, in f64.
    fn upload(g: &MlxDevice, w: &[f32], dt: DType, shape: &[usize]) -> (MlxBuffer, Vec<f64>) {
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

    fn ref_lookup(t: &[f64], vocab: usize, dim: usize, ids: &[i64], scale: f64) -> Vec<f64> {
        ids.iter()
            .flat_map(|&id| {
                (0..dim).map(move |c| {
                    if id >= 0 && (id as usize) < vocab {
                        t[id as usize * dim + c] * scale
                    } else {
                        0.0
                    }
                })
            })
            .collect()
    }

    // A lookup is a copy (f16/bf16 -> f32 widening is exact): unscaled must match exactly.
    // Scaled is one f32 multiply of exact operands: correctly rounded, 2^-24 relative.
    const SCALED_RTOL: f64 = 6e-8;

    #[test]
    fn lookup_matches_for_every_table_dtype() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(50);
        let (vocab, dim) = (301, 97);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let w = rng.normals(vocab * dim, 1.0);
            let (gt, t64) = upload(g, &w, dt, &[vocab, dim]);
            // First and last ids, repeats, random ids and out-of-range ones.
            let mut ids: Vec<i64> = vec![0, vocab as i64 - 1, 0, 5];
            ids.extend((0..40).map(|_| rng.below(vocab) as i64));
            ids.extend([vocab as i64, vocab as i64 + 7, u32::MAX as i64]);
            let ids_u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let gi = MlxBuffer::from_slice(g, &ids_u, &[ids.len()])?;
            // The same ids as i32, with a negative one in place of u32::MAX.
            let mut ids_i = ids.clone();
            *ids_i.last_mut().unwrap() = -1;
            let ids_i32: Vec<i32> = ids_i.iter().map(|&i| i as i32).collect();
            let gi32 = MlxBuffer::from_slice(g, &ids_i32, &[1, ids.len()])?;
            let mut pass = g.begin();
            let plain = embedding(&mut pass, &gt, &gi)?;
            let scaled = embedding_scaled(&mut pass, &gt, &gi32, 9.848_858)?;
            pass.commit_and_wait()?;
            assert_eq!(plain.shape(), &[ids.len(), dim]);
            let want = ref_lookup(&t64, vocab, dim, &ids, 1.0);
            assert_close(&plain.to_vec(g)?, &want, 0.0, 0.0, &format!("{dt}"));
            let want = ref_lookup(&t64, vocab, dim, &ids_i, 9.848_858f32 as f64);
            let what = format!("{dt} scaled, i32 ids");
            assert_close(&scaled.to_vec(g)?, &want, 0.0, SCALED_RTOL, &what);
        }
        Ok(())
    }

    #[test]
    fn views_at_odd_offsets() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(51);
        let (vocab, dim) = (17, 33);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let w = rng.normals(vocab * dim + 10, 1.0);
            let (base, t64) = upload(g, &w, dt, &[vocab * dim + 10]);
            // Odd element offset: 16-bit rows straddle u32 words.
            let table = base.view(3, &[vocab, dim])?;
            let id_data: Vec<u32> = (0..11).map(|_| rng.below(vocab) as u32).collect();
            let ibase = MlxBuffer::from_slice(g, &id_data, &[11])?;
            let ids = ibase.view(5, &[6])?;
            let mut pass = g.begin();
            let y = embedding(&mut pass, &table, &ids)?;
            pass.commit_and_wait()?;
            let idv: Vec<i64> = id_data[5..].iter().map(|&i| i as i64).collect();
            let want = ref_lookup(&t64[3..3 + vocab * dim], vocab, dim, &idv, 1.0);
            assert_close(&y.to_vec(g)?, &want, 0.0, 0.0, &format!("{dt} views"));
        }
        Ok(())
    }

    #[test]
    fn more_than_65535_workgroups() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(52);
        // 65,600 ids x 256 = 65,600 workgroups of 256: the folded grid.
        let (vocab, dim, n) = (1000, 256, 65_600);
        let w = rng.normals(vocab * dim, 1.0);
        let table = MlxBuffer::from_slice(g, &w, &[vocab, dim])?;
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        let gi = MlxBuffer::from_slice(g, &ids, &[n])?;
        let mut pass = g.begin();
        let y = embedding(&mut pass, &table, &gi)?;
        pass.commit_and_wait()?;
        let got = y.to_vec::<f32>(g)?;
        for (r, &id) in ids.iter().enumerate() {
            let want = &w[id as usize * dim..][..dim];
            let row = &got[r * dim..][..dim];
            assert!(
                row.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} (id {id}) differs"
            );
        }
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let t = MlxBuffer::from_slice(g, &[1.0f32; 12], &[3, 4])?;
        let t1 = t.reshape(&[12])?;
        let ti = MlxBuffer::from_slice(g, &[1i32; 12], &[3, 4])?;
        let ids = MlxBuffer::from_slice(g, &[0u32, 2], &[2])?;
        let idf = MlxBuffer::from_slice(g, &[0.0f32, 2.0], &[2])?;
        let mut pass = g.begin();
        let e = |r: Result<MlxBuffer>| r.unwrap_err().to_string();
        assert_eq!(
            e(embedding(&mut pass, &ti, &ids)),
            "embedding: table is i32, expected f32 or f16 or bf16"
        );
        assert_eq!(
            e(embedding(&mut pass, &t1, &ids)),
            "embedding: table has shape [12], expected [vocab, dim]"
        );
        assert_eq!(
            e(embedding_scaled(&mut pass, &t, &idf, 2.0)),
            "embedding_scaled: ids is f32, expected u32 or i32"
        );
        Ok(())
    }
}

//! Row-wise selection over the last dimension of f32 `x` [.., n]: `argmax`, `top_k`, `argsort`.
//!
//! Order: floats compare totally through a 32-bit key. NaN ranks above `+inf` (so `argmax`
//! returns the first NaN of a row, like numpy), `-0.0` equals `+0.0`, and equal values rank
//! by lowest column index (ties: lowest index first, like numpy and MLX; `argsort` is stable
//! in both directions). `argsort` ascending puts NaN last, as numpy does.
//!
//! Algorithms:
//! - `argmax`: one workgroup per row with a subgroup (or workgroup-memory) reduction of
//!   (key, index); rows longer than 8192 first reduce chunks of 2048 in parallel, then merge.
//! - `top_k`: the row is cut into chunks of up to 2048; each workgroup bitonic-sorts a chunk in
//!   workgroup memory (16 KiB) and keeps its first k; passes repeat over the candidates until
//!   one chunk per row is left (262,144 with k = 64: 3 passes). `k = 1` uses `argmax`.
//! - `argsort`: one workgroup per row bitonic-sorts the row in workgroup memory when it fits:
//!   rows up to the largest power of two whose 8 bytes per element fit
//!   `Caps::max_workgroup_storage` (4096 on lavapipe's 32 KiB), 8192 at most. Longer rows run
//!   the same bitonic network over global scratch: chunks sorted in workgroup memory, then
//!   per block size one dispatch per long stride and one in-chunk merge (262,144 in chunks of
//!   4096: 28 dispatches).

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SelectParams {
    rows: u32,
    len: u32,
    nch: u32,
    k: u32,
    n: u32,
    desc: u32,
    chunk: u32,
    size: u32,
    stride: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<SelectParams>() == 48);

/// Largest `k` `top_k` accepts (half the chunk, so every merge pass at least halves the work).
pub const TOP_K_MAX: usize = 1024;
/// Chunk of `top_k` passes: 2048 (key, index) pairs are 16 KiB of workgroup memory, the
/// WebGPU minimum.
const TOPK_CHUNK: u32 = 2048;
/// Rows longer than this take the two-pass `argmax`.
const ARGMAX_SINGLE_MAX: usize = 8192;
/// Elements per workgroup of the first `argmax` pass.
const ARGMAX_CHUNK: usize = 2048;
const ARGMAX_WG: u32 = 256;
/// Sort sizes the `SORT_N` override takes.
const SORT_SIZES: [u32; 8] = [64, 128, 256, 512, 1024, 2048, 4096, 8192];
const TOPK_ENTRIES: [&str; 4] = [
    "topk_x_cand",
    "topk_cand_cand",
    "topk_x_final",
    "topk_cand_final",
];

const ARGSORT_ENTRIES: [&str; 4] = [
    "argsort_rows",
    "argsort_chunks",
    "argsort_merge",
    "argsort_merge_final",
];
/// Workgroup size of `argsort_global_step` (one invocation per compared pair).
const STEP_WG: u32 = 256;

fn sort_spec(entry: &'static str, size: u32) -> Result<Spec> {
    Spec::new(entry, DType::F32, (size / 2).clamp(64, 256)).with_const("SORT_N", size)
}

/// Power-of-two sort size for `len` elements, at least 64.
fn sort_size(len: usize) -> u32 {
    len.next_power_of_two().max(64) as u32
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for sg in [false, true] {
        for wg in super::ROW_WGS {
            for entry in ["argmax_rows", "argmax_merge"] {
                v.push((
                    Kernel::Select,
                    Spec::new(entry, DType::F32, wg).with_subgroups(sg),
                ));
            }
        }
        v.push((
            Kernel::Select,
            Spec::new("argmax_partial", DType::F32, ARGMAX_WG).with_subgroups(sg),
        ));
    }
    v.push((
        Kernel::Select,
        Spec::new("argsort_global_step", DType::F32, STEP_WG),
    ));
    for size in SORT_SIZES {
        if size <= TOPK_CHUNK {
            for entry in TOPK_ENTRIES {
                v.push((Kernel::Select, sort_spec(entry, size)?));
            }
        }
        for entry in ARGSORT_ENTRIES {
            v.push((Kernel::Select, sort_spec(entry, size)?));
        }
    }
    Ok(v)
}

struct Rows {
    rows: u32,
    n: usize,
    /// Leading dimensions of `x` (`[1]` for a 1-D `x`).
    lead: Vec<usize>,
}

fn rows_of(op: &str, x: &MlxBuffer) -> Result<Rows> {
    check::dtype(x, &[DType::F32], op, "x")?;
    let (rows, n) = check::rows(x, op, "x")?;
    check::fits_u32(x.len(), op, "elements")?;
    let shape = x.shape();
    let lead = if shape.len() > 1 {
        shape[..shape.len() - 1].to_vec()
    } else {
        vec![1]
    };
    Ok(Rows {
        rows: check::fits_u32(rows, op, "rows")?,
        n,
        lead,
    })
}

fn params(r: &Rows) -> SelectParams {
    SelectParams {
        rows: r.rows,
        len: r.n as u32,
        nch: 1,
        k: 1,
        n: r.n as u32,
        desc: 0,
        chunk: 0,
        size: 0,
        stride: 0,
        _pad: [0; 3],
    }
}

/// Max value and its index per row: (values f32 [rows], indices u32 [rows]).
fn argmax_rows(
    pass: &mut Pass,
    op: &str,
    x: &MlxBuffer,
    r: &Rows,
) -> Result<(MlxBuffer, MlxBuffer)> {
    let rows = r.rows as usize;
    let val = pass.alloc(DType::F32, &[rows])?;
    let idx = pass.alloc(DType::U32, &[rows])?;
    let sg = pass.caps().subgroups;
    let mut p = params(r);
    if r.n <= ARGMAX_SINGLE_MAX {
        let (wg, sg) = super::row_wg(pass.caps(), r.n);
        let spec = Spec::new("argmax_rows", DType::F32, wg).with_subgroups(sg);
        pass.dispatch(Kernel::Select, spec, &p, &[x, &val, &idx], r.rows)?;
        return Ok((val, idx));
    }
    let nch = r.n.div_ceil(ARGMAX_CHUNK);
    let groups = check::fits_u32(rows * nch, op, "rows x chunks")?;
    let ck = pass.alloc(DType::U32, &[rows, nch])?;
    let ci = pass.alloc(DType::U32, &[rows, nch])?;
    p.nch = nch as u32;
    p.chunk = ARGMAX_CHUNK as u32;
    let spec = Spec::new("argmax_partial", DType::F32, ARGMAX_WG).with_subgroups(sg);
    pass.dispatch(Kernel::Select, spec, &p, &[x, x, x, &ck, &ci], groups)?;
    let (wg, sg) = super::row_wg(pass.caps(), nch);
    let spec = Spec::new("argmax_merge", DType::F32, wg).with_subgroups(sg);
    pass.dispatch(
        Kernel::Select,
        spec,
        &p,
        &[x, &val, &idx, x, x, &ck, &ci],
        r.rows,
    )?;
    Ok((val, idx))
}

/// Index of the largest element of each row of f32 `x` [.., n]: u32 of shape `[..]` (`[1]`
/// for a 1-D `x`). Ties give the lowest index; a NaN counts as the largest value.
pub fn argmax(pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
    let r = rows_of("argmax", x)?;
    let (_, idx) = argmax_rows(pass, "argmax", x, &r)?;
    idx.reshape(&r.lead)
}

/// The `k` largest elements of each row of f32 `x` [.., n], in descending order (equal values:
/// lowest index first; NaN above everything): `(values f32 [.., k], indices u32 [.., k])`.
/// `1 <= k <= min(n, TOP_K_MAX)`.
pub fn top_k(pass: &mut Pass, x: &MlxBuffer, k: usize) -> Result<(MlxBuffer, MlxBuffer)> {
    let op = "top_k";
    let r = rows_of(op, x)?;
    check::ensure(k >= 1 && k <= r.n, op, || {
        format!("k = {k} is outside 1..={} (the row length)", r.n)
    })?;
    check::ensure(k <= TOP_K_MAX, op, || {
        format!("k = {k} exceeds the largest supported k, {TOP_K_MAX}")
    })?;
    let mut out_shape = x.shape().to_vec();
    if let Some(last) = out_shape.last_mut() {
        *last = k;
    }
    if k == 1 {
        let (val, idx) = argmax_rows(pass, op, x, &r)?;
        return Ok((val.reshape(&out_shape)?, idx.reshape(&out_shape)?));
    }
    let rows = r.rows as usize;
    let mut p = params(&r);
    p.k = k as u32;
    // Candidates (keys, column indices) of the last pass, [rows, len].
    let mut cand: Option<(MlxBuffer, MlxBuffer)> = None;
    loop {
        let len = p.len as usize;
        let size = sort_size(len).min(TOPK_CHUNK);
        let nch = len.div_ceil(size as usize);
        p.nch = nch as u32;
        if nch == 1 {
            let val = pass.alloc(DType::F32, &out_shape)?;
            let idx = pass.alloc(DType::U32, &out_shape)?;
            match &cand {
                None => {
                    let spec = sort_spec("topk_x_final", size)?;
                    pass.dispatch(Kernel::Select, spec, &p, &[x, &val, &idx], r.rows)?;
                }
                Some((ck, ci)) => {
                    let spec = sort_spec("topk_cand_final", size)?;
                    pass.dispatch(
                        Kernel::Select,
                        spec,
                        &p,
                        &[x, &val, &idx, x, x, ck, ci],
                        r.rows,
                    )?;
                }
            }
            return Ok((val, idx));
        }
        let groups = check::fits_u32(rows * nch, op, "rows x chunks")?;
        let next_len = check::fits_u32(nch * k, op, "candidates per row")?;
        let ck_out = pass.alloc(DType::U32, &[rows, nch * k])?;
        let ci_out = pass.alloc(DType::U32, &[rows, nch * k])?;
        match &cand {
            None => {
                let spec = sort_spec("topk_x_cand", size)?;
                pass.dispatch(
                    Kernel::Select,
                    spec,
                    &p,
                    &[x, x, x, &ck_out, &ci_out],
                    groups,
                )?;
            }
            Some((ck, ci)) => {
                let spec = sort_spec("topk_cand_cand", size)?;
                pass.dispatch(
                    Kernel::Select,
                    spec,
                    &p,
                    &[x, x, x, &ck_out, &ci_out, ck, ci],
                    groups,
                )?;
            }
        }
        cand = Some((ck_out, ci_out));
        p.len = next_len;
    }
}

/// Indices that sort each row of f32 `x` [.., n]: u32 of `x`'s shape. Stable (equal values keep
/// their order) in both directions; NaN ranks above `+inf` (last ascending, first descending).
/// Rows that fit one workgroup's memory (8 bytes an element, rounded up to a power of two) sort
/// in one dispatch; longer rows run a bitonic network over the row padded to a power of two,
/// with scratch of 8 bytes an element, in `O(log^2 n)` dispatches.
pub fn argsort(pass: &mut Pass, x: &MlxBuffer, descending: bool) -> Result<MlxBuffer> {
    let max_storage = pass.caps().max_workgroup_storage;
    let largest = SORT_SIZES
        .iter()
        .copied()
        .filter(|&s| s * 8 <= max_storage)
        .max()
        .ok_or_else(|| {
            MlxError::unsupported(format!(
                "argsort: {max_storage} bytes of workgroup memory cannot hold 64 keys"
            ))
        })?;
    argsort_chunked(pass, x, descending, largest)
}

/// `argsort` with workgroup sorts of at most `chunk` (a power of two in `SORT_SIZES`).
fn argsort_chunked(
    pass: &mut Pass,
    x: &MlxBuffer,
    descending: bool,
    chunk: u32,
) -> Result<MlxBuffer> {
    let op = "argsort";
    let r = rows_of(op, x)?;
    let out = pass.alloc(DType::U32, x.shape())?;
    let mut p = params(&r);
    p.desc = u32::from(descending);
    let size = sort_size(r.n);
    if size <= chunk {
        let spec = sort_spec("argsort_rows", size)?;
        pass.dispatch(Kernel::Select, spec, &p, &[x, x, &out], r.rows)?;
        return Ok(out);
    }
    let rows = r.rows as usize;
    let len = size as usize;
    let nch = len / chunk as usize;
    check::fits_u32(rows * len, op, "rows x padded row length")?;
    p.len = size;
    p.nch = nch as u32;
    let groups = check::fits_u32(rows * nch, op, "rows x chunks")?;
    let pairs = (rows * len / 2) as u32;
    let keys = pass.alloc(DType::U32, &[rows, len])?;
    let idx = pass.alloc(DType::U32, &[rows, len])?;
    let spec = sort_spec("argsort_chunks", chunk)?;
    pass.dispatch(Kernel::Select, spec, &p, &[x, x, x, &keys, &idx], groups)?;
    let mut block = 2 * chunk;
    while block <= size {
        p.size = block;
        let mut stride = block / 2;
        while stride >= chunk {
            p.stride = stride;
            let spec = Spec::new("argsort_global_step", DType::F32, STEP_WG);
            pass.dispatch(
                Kernel::Select,
                spec,
                &p,
                &[x, x, x, &keys, &idx],
                pairs.div_ceil(STEP_WG),
            )?;
            stride /= 2;
        }
        if block == size {
            let spec = sort_spec("argsort_merge_final", chunk)?;
            pass.dispatch(Kernel::Select, spec, &p, &[x, x, &out, &keys, &idx], groups)?;
        } else {
            let spec = sort_spec("argsort_merge", chunk)?;
            pass.dispatch(Kernel::Select, spec, &p, &[x, x, x, &keys, &idx], groups)?;
        }
        block *= 2;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::testutil::{devices, gpu, Rng};
    use std::cmp::Ordering;

    // Everything here is exact: indices are integers and values are copied bits, so results
    // must equal the reference exactly (no tolerance).

    /// The documented value order, written independently of the key trick: NaN above
    /// everything, otherwise numeric (so -0 == +0). `Less` = `a` ranks first (larger).
    fn value_desc(x: &[f32], a: usize, b: usize) -> Ordering {
        let (va, vb) = (x[a], x[b]);
        match (va.is_nan(), vb.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            _ => (vb as f64).partial_cmp(&(va as f64)).unwrap(),
        }
    }

    /// Descending with ties by lower index first.
    fn rank_desc(x: &[f32], a: usize, b: usize) -> Ordering {
        value_desc(x, a, b).then(a.cmp(&b))
    }

    fn ref_sorted(row: &[f32], descending: bool) -> Vec<u32> {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        if descending {
            idx.sort_by(|&a, &b| rank_desc(row, a, b));
        } else {
            idx.sort_by(|&a, &b| value_desc(row, b, a).then(a.cmp(&b)));
        }
        idx.into_iter().map(|i| i as u32).collect()
    }

    /// Values with many exact duplicates (a few levels) so ties decide the result.
    fn tied(rng: &mut Rng, n: usize, levels: usize) -> Vec<f32> {
        (0..n)
            .map(|_| rng.below(levels) as f32 * 0.25 - levels as f32 * 0.125)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn argmax_matches_reference_with_ties_on_both_reduction_paths() -> Result<()> {
        let mut rng = Rng::new(30);
        for g in devices() {
            // (rows, n, levels): 1x262,144 takes the two-pass path; 70,000 rows is more
            // than 65,535 workgroups; 3x20,001 is two-pass with a ragged last chunk.
            for &(rows, n, levels) in &[
                (1usize, 1usize, 3usize),
                (3, 7, 3),
                (5, 1000, 50),
                (2, 8192, 100),
                (3, 20_001, 1000),
                (1, 262_144, 5000),
                (70_000, 4, 3),
            ] {
                let x = tied(&mut rng, rows * n, levels);
                let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
                let mut pass = g.begin();
                let idx = argmax(&mut pass, &gx)?;
                pass.commit_and_wait()?;
                assert_eq!(idx.shape(), &[rows]);
                let got = idx.to_vec::<u32>(g)?;
                for (r, row) in x.chunks(n).enumerate() {
                    let want = (0..n).min_by(|&a, &b| rank_desc(row, a, b)).unwrap();
                    assert_eq!(got[r], want as u32, "argmax {rows}x{n} row {r}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn argmax_nan_and_signed_zero() -> Result<()> {
        for g in devices() {
            let nan = f32::NAN;
            let x = [
                1.0,
                nan,
                3.0,
                nan, // first NaN wins
                -0.0,
                0.0,
                -1.0,
                -2.0, // -0 == +0: lowest index
                -3.0,
                f32::NEG_INFINITY,
                -3.0,
                -7.0, // ties on negatives
                f32::INFINITY,
                1e38,
                f32::INFINITY,
                0.0,
            ];
            let gx = MlxBuffer::from_slice(g, &x, &[4, 4])?;
            let mut pass = g.begin();
            let idx = argmax(&mut pass, &gx)?;
            pass.commit_and_wait()?;
            assert_eq!(idx.to_vec::<u32>(g)?, vec![1, 0, 0, 0]);
        }
        Ok(())
    }

    #[test]
    fn top_k_on_vocab_rows_with_duplicates() -> Result<()> {
        let mut rng = Rng::new(31);
        // One Gemma-3 vocabulary row (262,144: 3 passes) and a few shorter ones, with ~50
        // copies of every value so the top k always crosses ties.
        let cases: [(usize, usize, &[usize]); 4] = [
            (1, 262_144, &[64, 40]),
            (3, 50_000, &[1, 5, 40, 64]),
            (2, 2048, &[5, 1024]),
            (1, 1, &[1]),
        ];
        for g in devices() {
            for &(rows, n, ks) in &cases {
                let x = tied(&mut rng, rows * n, (n / 50).max(2));
                let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
                for &k in ks {
                    let mut pass = g.begin();
                    let (val, idx) = top_k(&mut pass, &gx, k)?;
                    pass.commit_and_wait()?;
                    assert_eq!(val.shape(), &[rows, k]);
                    assert_eq!(idx.shape(), &[rows, k]);
                    let (gv, gi) = (val.to_vec::<f32>(g)?, idx.to_vec::<u32>(g)?);
                    for (r, row) in x.chunks(n).enumerate() {
                        let want: Vec<u32> = ref_sorted(row, true)[..k].to_vec();
                        let got = &gi[r * k..(r + 1) * k];
                        assert_eq!(got, &want[..], "top_k {rows}x{n} k={k} row {r} indices");
                        let want_v: Vec<f32> = want.iter().map(|&i| row[i as usize]).collect();
                        assert_eq!(bits(&gv[r * k..(r + 1) * k]), bits(&want_v), "values");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn top_k_many_rows_views_and_nan() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(32);
        // 70,000 rows of 3: more than 65,535 workgroups; a view at an odd offset.
        let (rows, n, k) = (70_000usize, 3usize, 2usize);
        let data = tied(&mut rng, rows * n + 13, 4);
        let base = MlxBuffer::from_slice(g, &data, &[rows * n + 13])?;
        let gx = base.view(13, &[rows, n])?;
        let mut nanrow = rng.normals(3000, 1.0);
        nanrow[2999] = f32::NAN;
        nanrow[7] = f32::NAN;
        nanrow[100] = f32::INFINITY;
        let gn = MlxBuffer::from_slice(g, &nanrow, &[3000])?;
        let mut pass = g.begin();
        let (_, idx) = top_k(&mut pass, &gx, k)?;
        let (nv, ni) = top_k(&mut pass, &gn, 4)?;
        pass.commit_and_wait()?;
        let gi = idx.to_vec::<u32>(g)?;
        for (r, row) in data[13..].chunks(n).enumerate() {
            assert_eq!(
                &gi[r * k..(r + 1) * k],
                &ref_sorted(row, true)[..k],
                "row {r}"
            );
        }
        assert_eq!(nv.shape(), &[4]);
        let want = ref_sorted(&nanrow, true);
        assert_eq!(&want[..3], &[7, 2999, 100]);
        assert_eq!(ni.to_vec::<u32>(g)?, want[..4].to_vec());
        let want_v: Vec<f32> = want[..4].iter().map(|&i| nanrow[i as usize]).collect();
        assert_eq!(bits(&nv.to_vec::<f32>(g)?), bits(&want_v));
        Ok(())
    }

    #[test]
    fn argsort_is_stable_both_ways() -> Result<()> {
        let mut rng = Rng::new(33);
        let max_n = SORT_SIZES
            .iter()
            .copied()
            .filter(|&s| s * 8 <= gpu().caps().max_workgroup_storage)
            .max()
            .unwrap() as usize;
        for g in devices() {
            for &(rows, n) in &[(1usize, 1usize), (3, 1000), (2, 64), (1, max_n), (9000, 5)] {
                let mut x = tied(&mut rng, rows * n, (n / 8).max(2));
                if n >= 8 {
                    x[3] = f32::NAN;
                    x[4] = -0.0;
                    x[5] = 0.0;
                    x[6] = f32::NEG_INFINITY;
                }
                let base = MlxBuffer::from_slice(g, &x, &[rows * n])?;
                let gx = base.reshape(&[rows, n])?;
                for desc in [false, true] {
                    let mut pass = g.begin();
                    let idx = argsort(&mut pass, &gx, desc)?;
                    pass.commit_and_wait()?;
                    assert_eq!(idx.shape(), &[rows, n]);
                    let got = idx.to_vec::<u32>(g)?;
                    for (r, row) in x.chunks(n).enumerate() {
                        assert_eq!(
                            &got[r * n..(r + 1) * n],
                            &ref_sorted(row, desc)[..],
                            "argsort {rows}x{n} desc={desc} row {r}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn argsort_beyond_workgroup_memory_is_multi_pass_and_stable() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(34);
        // (rows, n, chunk): small chunks make many global levels cheap on lavapipe; the
        // public entry takes the device's largest chunk (n = 10,000 > 4096 on lavapipe).
        for &(rows, n, chunk) in &[
            (3usize, 1000usize, 64u32),
            (2, 65, 64),
            (700, 129, 64),
            (1, 4097, 256),
            (2, 10_000, 0),
        ] {
            let mut x = tied(&mut rng, rows * n, (n / 8).max(2));
            x[3] = f32::NAN;
            x[4] = -0.0;
            x[5] = 0.0;
            let gx = MlxBuffer::from_slice(g, &x, &[rows, n])?;
            for desc in [false, true] {
                let mut pass = g.begin();
                let idx = if chunk == 0 {
                    argsort(&mut pass, &gx, desc)?
                } else {
                    argsort_chunked(&mut pass, &gx, desc, chunk)?
                };
                pass.commit_and_wait()?;
                let got = idx.to_vec::<u32>(g)?;
                for (r, row) in x.chunks(n).enumerate() {
                    assert_eq!(
                        &got[r * n..(r + 1) * n],
                        &ref_sorted(row, desc)[..],
                        "argsort {rows}x{n} chunk {chunk} desc={desc} row {r}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn reference_ascending_order_is_what_we_document() {
        // The test's own reference: NaN last ascending, -0 and +0 tied in index order.
        let x = [1.0, f32::NAN, -0.0, 0.0, -1.0, 1.0];
        assert_eq!(ref_sorted(&x, false), vec![4, 2, 3, 0, 5, 1]);
        assert_eq!(ref_sorted(&x, true), vec![1, 0, 5, 2, 3, 4]);
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let x = MlxBuffer::from_slice(g, &[1.0f32; 8], &[2, 4])?;
        let xi = MlxBuffer::from_slice(g, &[1i32; 8], &[2, 4])?;
        let mut pass = g.begin();
        let e = top_k(&mut pass, &x, 0).unwrap_err().to_string();
        assert_eq!(e, "top_k: k = 0 is outside 1..=4 (the row length)");
        let e = top_k(&mut pass, &x, 5).unwrap_err().to_string();
        assert_eq!(e, "top_k: k = 5 is outside 1..=4 (the row length)");
        let big = MlxBuffer::from_slice(g, &vec![1.0f32; 4096], &[4096])?;
        let e = top_k(&mut pass, &big, 1025).unwrap_err().to_string();
        assert_eq!(e, "top_k: k = 1025 exceeds the largest supported k, 1024");
        let e = argmax(&mut pass, &xi).unwrap_err().to_string();
        assert_eq!(e, "argmax: x is i32, expected f32");
        let e = argsort(&mut pass, &xi, true).unwrap_err().to_string();
        assert_eq!(e, "argsort: x is i32, expected f32");
        Ok(())
    }
}

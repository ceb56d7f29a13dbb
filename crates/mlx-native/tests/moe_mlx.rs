//! GPU routed quantized matmul against MLX 0.32.4's `mx.gather_qmm(x, w, scales, biases,
//! rhs_indices=idx, transpose=True, group_size=64, bits=4)` on 3 stacked experts of
//! [16, 128] (`tests/fixtures/mlx/qmm.safetensors`, `gather.{f32,bf16}.b4.g64.*`), with
//! MLX's own packed words, scales and biases loaded through `QuantExperts::from_raw`, on both
//! the decode (one pair per workgroup) and the sorted (tiled) path.
//!
//! The fixture's x is `[5, 2, 128]` with one expert per batch entry; here each of the ten
//! rows is a token with `top_k = 1` whose id is its batch entry's expert.
//!
//! Tolerance, as in `tests/qmatmul_mlx.rs`: with `dot` the f64 product over the weights
//! dequantized in the model dtype, `tol = (2·sqrt(K+1) + 2)·u·Σ|x·w| + u·|dot|` (`u` the unit
//! roundoff of the activation dtype, which MLX sums in); the GPU must be within `tol` of
//! `dot` and `2·tol` of MLX. The decode path represents x as 16-bit integers per
//! 32-element chunk c (`ops::qmatmul`), within `amax_c / 65024` per element, multiplying
//! scale·q = w - bias: `Σ_c amax_c/65024 · Σ_{l∈c}|w_l - bias_l|` more there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use half::bf16;
use mlx_native::ops::moe::{gather_qmm_with, GatherPath};
use mlx_native::ops::qmatmul::{plan, MatmulPlan};
use mlx_native::weights::expert_weight::QuantExperts;
use mlx_native::weights::quant::{dequantize_as, QuantParams, ScalesRef};
use mlx_native::{DType, DeviceOptions, MlxBuffer, MlxDevice};
use safetensors::{Dtype, SafeTensors};

fn floats(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

fn words(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn gather_qmm_matches_mlx_gather_qmm() {
    let g = MlxDevice::with_options(DeviceOptions {
        poison_allocations: true,
        ..DeviceOptions::default()
    })
    .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"));
    let path = format!(
        "{}/tests/fixtures/mlx/qmm.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (e, n, k) = (3usize, 16usize, 128usize);
    let params = QuantParams::affine(4, 64);
    for (dname, dtype, u) in [
        ("f32", DType::F32, f64::powi(2.0, -24)),
        ("bf16", DType::BF16, f64::powi(2.0, -8)),
    ] {
        let p = format!("gather.{dname}.b4.g64");
        let packed = words(&st, &format!("{p}.wq"));
        let scales = st.tensor(&format!("{p}.scales")).unwrap();
        let biases = st.tensor(&format!("{p}.biases")).unwrap();
        let w = QuantExperts::from_raw(
            &g,
            &packed,
            scales.data(),
            Some(biases.data()),
            [e, n, k],
            params,
            dtype,
        )
        .unwrap();
        let sf = floats(&st, &format!("{p}.scales"));
        let bf = floats(&st, &format!("{p}.biases"));
        let wd = dequantize_as(
            &packed,
            ScalesRef::Float(&sf),
            Some(&bf),
            e * n,
            k,
            params,
            dtype,
        )
        .unwrap();
        let x = floats(&st, &format!("{p}.x"));
        let y = floats(&st, &format!("{p}.y"));
        let idx = words(&st, &format!("{p}.rhs_indices"));
        let (batch, m) = (idx.len(), x.len() / (idx.len() * k));
        let t = batch * m;
        let ids: Vec<u32> = (0..t).map(|r| idx[r / m]).collect();
        let gx = MlxBuffer::from_slice(&g, &x, &[t, k]).unwrap();
        let gids = MlxBuffer::from_slice(&g, &ids, &[t, 1]).unwrap();
        let coop16 = plan(t, n, k, g.caps()) == (MatmulPlan::Coop { tile: 16 });
        for route in [GatherPath::Vector, GatherPath::Sorted] {
            let mut pass = g.begin();
            let out = gather_qmm_with(&mut pass, &gx, &w, &gids, route).unwrap();
            pass.commit_and_wait().unwrap();
            let got = out.to_vec::<f32>(&g).unwrap();
            assert_eq!(out.shape(), [t, 1, n]);
            for r in 0..t {
                let ex = ids[r] as usize;
                for j in 0..n {
                    let (mut dot, mut abs) = (0.0f64, 0.0f64);
                    for l in 0..k {
                        let pr = f64::from(x[r * k + l]) * f64::from(wd[(ex * n + j) * k + l]);
                        dot += pr;
                        abs += pr.abs();
                    }
                    let mut tol = (2.0 * ((k + 1) as f64).sqrt() + 2.0) * u * abs + u * dot.abs();
                    if route == GatherPath::Sorted && coop16 {
                        // The cooperative-matrix path rounds x and W to f16.
                        tol += 2f64.powi(-10) * abs;
                    }
                    if route == GatherPath::Vector {
                        for c in 0..k / 32 {
                            let xs = &x[r * k + 32 * c..r * k + 32 * c + 32];
                            let amax = xs.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
                            let row = (ex * n + j) * k + 32 * c;
                            let sq: f64 = (0..32)
                                .map(|l| {
                                    let bias = bf[(row + l) / 64];
                                    f64::from(wd[row + l] - bias).abs()
                                })
                                .sum();
                            tol += amax / 65024.0 * sq;
                        }
                    }
                    let gv = f64::from(got[r * n + j]);
                    let mv = f64::from(y[r * n + j]);
                    assert!(
                        (gv - dot).abs() <= tol && (gv - mv).abs() <= 2.0 * tol,
                        "{p} {route:?}: y[{r},{j}] (expert {ex}): GPU {gv:e}, MLX {mv:e}, \
                         f64 {dot:e}, tolerance {tol:e}"
                    );
                }
            }
        }
    }
}

//! GPU quantized matmul against MLX 0.32.4: MLX's own packed words, scales and biases (from
//! `tests/fixtures/mlx/quant_*.safetensors`, loaded as raw bytes through
//! `QuantWeight::from_raw`) times the fixture activations must reproduce
//! `mx.quantized_matmul(..., transpose=True)` (`qmm.safetensors`).
//!
//! Tolerance, as in `tests/mlx_quant_parity.rs`: with `dot` the f64 product over the weights
//! dequantized in the model dtype, MLX satisfies `|y - dot| <= tol` where
//! `tol = (2·sqrt(K+1) + 2)·u·Σ|x·w| + u·|dot|` and `u` is the unit roundoff of the
//! activation dtype (MLX sums in it). The GPU dequantizes and sums in f32, which deviates
//! from `dot` by at most `u·Σ|x·w|` (the dtype rounding of the weights it skips) plus f32
//! summation error, so it must satisfy the same bound, and then `|gpu - y| <= 2·tol`. The
//! cooperative-matrix path (f16 tiles) adds `2·2^-11·Σ|x·w|`. qmv of 4- and 8-bit affine
//! weights represents x as 16-bit integers per 32-element chunk c (`ops::qmatmul`), within
//! `amax_c / 65024` per element, and x multiplies scale·q only (the bias term sums x in
//! f32): `Σ_c amax_c/65024 · Σ_{l∈c}|w_l - bias_l|` more.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use half::{bf16, f16};
use mlx_native::ops::qmatmul::{plan, MatmulPlan};
use mlx_native::weights::quant::{dequantize_as, QuantParams, ScalesRef};
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{ops, DType, DeviceOptions, MlxBuffer, MlxDevice};
use safetensors::{Dtype, SafeTensors};

/// The test device (integration tests cannot see `testutil`): allocations poisoned with NaN.
fn gpu() -> MlxDevice {
    MlxDevice::with_options(DeviceOptions {
        poison_allocations: true,
        ..DeviceOptions::default()
    })
    .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"))
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/mlx/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A float tensor widened to f32.
fn floats(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes(b.try_into().unwrap()).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
            .collect(),
        other => panic!("{name}: expected a float tensor, found {other:?}"),
    }
}

fn raw<'a>(st: &'a SafeTensors<'_>, name: &str) -> &'a [u8] {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
}

fn words(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    raw(st, name)
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::powi(2.0, -24),
        DType::F16 => f64::powi(2.0, -11),
        _ => f64::powi(2.0, -8),
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    key: &str,
    gpu_y: &[f32],
    mlx_y: &[f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    coop: bool,
    // qmv's quantized x: |w - bias| per element (scale·q), when it applies.
    int_x: Option<&[f32]>,
) -> f64 {
    let u = unit_roundoff(dtype);
    let mut worst = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut abs) = (0.0f64, 0.0f64);
            for l in 0..k {
                let p = f64::from(x[i * k + l]) * f64::from(w[j * k + l]);
                dot += p;
                abs += p.abs();
            }
            let mut tol = (2.0 * ((k + 1) as f64).sqrt() + 2.0) * u * abs + u * dot.abs();
            if coop {
                tol += 2.0 * f64::powi(2.0, -11) * abs;
            }
            if let Some(sq) = int_x {
                for c in 0..k / 32 {
                    let xs = &x[i * k + 32 * c..i * k + 32 * c + 32];
                    let amax = xs.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
                    let ws: f64 = sq[j * k + 32 * c..j * k + 32 * c + 32]
                        .iter()
                        .map(|&v| f64::from(v).abs())
                        .sum();
                    tol += amax / 65024.0 * ws;
                }
            }
            let g = f64::from(gpu_y[i * n + j]);
            let y = f64::from(mlx_y[i * n + j]);
            assert!(
                (g - dot).abs() <= tol && (g - y).abs() <= 2.0 * tol,
                "{key}: y[{i},{j}]: GPU {g:e}, MLX {y:e}, f64 {dot:e}, tolerance {tol:e}"
            );
            worst = worst.max((g - y).abs() / (2.0 * tol).max(f64::MIN_POSITIVE));
        }
    }
    worst
}

/// One fixture weight: its key, the GPU weight, the weight dequantized in the model dtype,
/// and scale·q = w - bias per element where qmv quantizes x (4- and 8-bit affine).
struct Case {
    key: String,
    w: QuantWeight,
    wd: Vec<f32>,
    sq: Option<Vec<f32>>,
}

#[test]
fn gpu_quantized_matmul_matches_mlx() {
    let g = gpu();
    let qbytes = read_fixture("qmm.safetensors");
    let qmm = SafeTensors::deserialize(&qbytes).unwrap();
    let (n, k) = (8usize, 256usize);
    let configs = [
        (2, 32),
        (3, 64),
        (4, 64),
        (5, 32),
        (6, 128),
        (8, 128),
        (4, 128),
    ];
    for (dname, dtype) in [
        ("f32", DType::F32),
        ("f16", DType::F16),
        ("bf16", DType::BF16),
    ] {
        let bytes = read_fixture(&format!("quant_{dname}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut cases: Vec<Case> = Vec::new();
        for (bits, gs) in configs {
            let p = format!("8x256.b{bits}.g{gs}");
            let params = QuantParams::affine(bits, gs);
            let packed = words(&st, &format!("{p}.wq"));
            let scales = raw(&st, &format!("{p}.scales"));
            let biases = raw(&st, &format!("{p}.biases"));
            let w = QuantWeight::from_raw(&g, &packed, scales, Some(biases), [n, k], params, dtype)
                .unwrap();
            let sf = floats(&st, &format!("{p}.scales"));
            let bf = floats(&st, &format!("{p}.biases"));
            let wd = dequantize_as(
                &packed,
                ScalesRef::Float(&sf),
                Some(&bf),
                n,
                k,
                params,
                dtype,
            )
            .unwrap();
            // scale·q = w - bias of the element's group, where qmv quantizes x.
            let sq: Option<Vec<f32>> = matches!(bits, 4 | 8).then(|| {
                let gs = gs as usize;
                wd.iter()
                    .enumerate()
                    .map(|(i, &v)| v - bf[(i / k) * (k / gs) + (i % k) / gs])
                    .collect()
            });
            cases.push(Case {
                key: format!("{dname}.b{bits}.g{gs}.t"),
                w,
                wd,
                sq,
            });
        }
        let packed = words(&st, "8x256.mxfp4.wq");
        let scales = raw(&st, "8x256.mxfp4.scales");
        let w = QuantWeight::from_raw(
            &g,
            &packed,
            scales,
            None,
            [n, k],
            QuantParams::mxfp4(),
            dtype,
        )
        .unwrap();
        let wd = dequantize_as(
            &packed,
            ScalesRef::E8m0(scales),
            None,
            n,
            k,
            QuantParams::mxfp4(),
            dtype,
        )
        .unwrap();
        cases.push(Case {
            key: format!("{dname}.mxfp4.t"),
            w,
            wd,
            sq: None,
        });

        let mut worst = 0.0f64;
        for Case { key, w, wd, sq } in &cases {
            for m in [1usize, 3, 8] {
                let x = floats(&qmm, &format!("{key}.x{m}"));
                let y = floats(&qmm, &format!("{key}.y{m}"));
                let gx = MlxBuffer::from_slice(&g, &x, &[m, k]).unwrap();
                let mut pass = g.begin();
                let yv = ops::qmv(&mut pass, &gx, w).unwrap();
                let ym = ops::qmm(&mut pass, &gx, w).unwrap();
                pass.commit_and_wait().unwrap();
                let coop = matches!(plan(9, n, k, g.caps()), MatmulPlan::Coop { .. });
                worst = worst.max(check(
                    &format!("{key}.y{m} qmv"),
                    &yv.to_vec(&g).unwrap(),
                    &y,
                    &x,
                    wd,
                    m,
                    n,
                    k,
                    dtype,
                    false,
                    sq.as_deref(),
                ));
                worst = worst.max(check(
                    &format!("{key}.y{m} qmm"),
                    &ym.to_vec(&g).unwrap(),
                    &y,
                    &x,
                    wd,
                    m,
                    n,
                    k,
                    dtype,
                    coop,
                    None,
                ));
            }
        }
        eprintln!("{dname}: worst |GPU - MLX| is {worst:.3} of the tolerance");
    }
}

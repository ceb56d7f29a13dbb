//! Parity with MLX's own quantization: fixtures written by `scripts/fixtures/mlx_quant.py`
//! with MLX 0.32.4 (`mlx[cpu]`, Linux) hold weights, `mx.quantize` / `mx.dequantize` outputs,
//! and `mx.quantized_matmul` / `mx.gather_qmm` results.
//!
//! - quantize: packed words, scales and biases (and MXFP4 e8m0 bytes) are bit-identical.
//! - dequantize: bit-identical to `mx.dequantize` in the weight's dtype.
//! - matmul: an f64 product over our dequantized weights (in the weight dtype) agrees with
//!   `mx.quantized_matmul` / `mx.gather_qmm` within the rounding error of MLX's own
//!   summation in the activation dtype (see [`matmul_tolerance`]); this is the oracle GPU
//!   kernels reuse.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use half::{bf16, f16};
use mlx_native::weights::quant::{
    dequantize_as, quantize_as, unpack_codes, QuantParams, Scales, ScalesRef,
};
use mlx_native::DType;
use safetensors::{Dtype, SafeTensors};

const DTYPES: [(&str, DType); 3] = [
    ("f32", DType::F32),
    ("f16", DType::F16),
    ("bf16", DType::BF16),
];
const WEIGHTS: [&str; 3] = ["8x256", "5x384", "ties"];
const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
const GROUPS: [u32; 3] = [32, 64, 128];

fn read_fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/mlx/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (run scripts/fixtures/mlx_quant.py)"))
}

/// A float tensor widened to f32, with its dtype and shape.
fn floats(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, DType, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let d = t.data();
    let (v, dt) = match t.dtype() {
        Dtype::F32 => (
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            DType::F32,
        ),
        Dtype::F16 => (
            d.chunks_exact(2)
                .map(|b| f16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            DType::F16,
        ),
        Dtype::BF16 => (
            d.chunks_exact(2)
                .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            DType::BF16,
        ),
        other => panic!("{name}: expected a float tensor, found {other:?}"),
    };
    (v, dt, t.shape().to_vec())
}

fn u32s(st: &SafeTensors<'_>, name: &str) -> (Vec<u32>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::U32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

fn u8s(st: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::U8, "{name}");
    t.data().to_vec()
}

/// Bitwise equality of two float slices; returns a description of the first few differences.
fn bit_diffs(what: &str, ours: &[f32], mlx: &[f32]) -> Vec<String> {
    if ours.len() != mlx.len() {
        return vec![format!(
            "{what}: {} values, MLX has {}",
            ours.len(),
            mlx.len()
        )];
    }
    ours.iter()
        .zip(mlx)
        .enumerate()
        .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
        .take(3)
        .map(|(i, (a, b))| format!("{what}[{i}]: ours {a:e}, MLX {b:e}"))
        .collect()
}

fn word_diffs(what: &str, ours: &[u32], mlx: &[u32], cols: usize, bits: u32) -> Vec<String> {
    if ours == mlx {
        return vec![];
    }
    let rows = mlx.len() * 32 / bits as usize / cols;
    let a = unpack_codes(ours, rows, cols, bits).unwrap();
    let b = unpack_codes(mlx, rows, cols, bits).unwrap();
    let n = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    vec![format!(
        "{what}: {n} of {} codes differ, first at {first:?}",
        a.len()
    )]
}

#[test]
fn fixtures_record_the_mlx_version() {
    for file in ["quant_f32.safetensors", "qmm.safetensors"] {
        let bytes = read_fixture(file);
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let version = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("mlx_version"))
            .cloned();
        assert_eq!(version.as_deref(), Some("0.32.4"), "{file}");
    }
}

#[test]
fn affine_quantize_is_bit_identical_to_mlx() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (dname, dtype) in DTYPES {
        let bytes = read_fixture(&format!("quant_{dname}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for wname in WEIGHTS {
            let (w, wdt, shape) = floats(&st, &format!("w.{wname}"));
            assert_eq!(wdt, dtype);
            let (rows, cols) = (shape[0], shape[1]);
            for bits in BITS {
                for gs in GROUPS {
                    let key = format!("{dname}/{wname}.b{bits}.g{gs}");
                    let p = format!("{wname}.b{bits}.g{gs}");
                    let q =
                        quantize_as(&w, rows, cols, QuantParams::affine(bits, gs), dtype).unwrap();
                    let (wq, wq_shape) = u32s(&st, &format!("{p}.wq"));
                    assert_eq!(wq_shape, [rows, cols * bits as usize / 32]);
                    let (scales, sdt, _) = floats(&st, &format!("{p}.scales"));
                    let (biases, bdt, _) = floats(&st, &format!("{p}.biases"));
                    assert_eq!(
                        (sdt, bdt),
                        (dtype, dtype),
                        "{key}: MLX stores scales in the weight dtype"
                    );
                    failures.extend(word_diffs(
                        &format!("{key} packed"),
                        &q.packed,
                        &wq,
                        cols,
                        bits,
                    ));
                    let Scales::Float(our_scales) = &q.scales else {
                        panic!("{key}: affine scales")
                    };
                    failures.extend(bit_diffs(&format!("{key} scales"), our_scales, &scales));
                    failures.extend(bit_diffs(
                        &format!("{key} biases"),
                        q.biases.as_deref().unwrap(),
                        &biases,
                    ));
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 3 * 6 * 3);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn mxfp4_quantize_is_bit_identical_to_mlx() {
    let mut failures = Vec::new();
    for (dname, dtype) in DTYPES {
        let bytes = read_fixture(&format!("quant_{dname}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for wname in WEIGHTS {
            let key = format!("{dname}/{wname}.mxfp4");
            let (w, _, shape) = floats(&st, &format!("w.{wname}"));
            let (rows, cols) = (shape[0], shape[1]);
            let q = quantize_as(&w, rows, cols, QuantParams::mxfp4(), dtype).unwrap();
            let (wq, _) = u32s(&st, &format!("{wname}.mxfp4.wq"));
            let scales = u8s(&st, &format!("{wname}.mxfp4.scales"));
            failures.extend(word_diffs(
                &format!("{key} packed"),
                &q.packed,
                &wq,
                cols,
                4,
            ));
            assert_eq!(q.scales, Scales::E8m0(scales), "{key} scales");
            assert!(q.biases.is_none());
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn dequantize_is_bit_identical_to_mlx() {
    let mut failures = Vec::new();
    for (dname, dtype) in DTYPES {
        let bytes = read_fixture(&format!("quant_{dname}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for wname in WEIGHTS {
            let (_, _, shape) = floats(&st, &format!("w.{wname}"));
            let (rows, cols) = (shape[0], shape[1]);
            for bits in BITS {
                for gs in GROUPS {
                    let p = format!("{wname}.b{bits}.g{gs}");
                    let (wq, _) = u32s(&st, &format!("{p}.wq"));
                    let (scales, _, _) = floats(&st, &format!("{p}.scales"));
                    let (biases, _, _) = floats(&st, &format!("{p}.biases"));
                    let (deq, ddt, _) = floats(&st, &format!("{p}.deq"));
                    assert_eq!(ddt, dtype);
                    let ours = dequantize_as(
                        &wq,
                        ScalesRef::Float(&scales),
                        Some(&biases),
                        rows,
                        cols,
                        QuantParams::affine(bits, gs),
                        dtype,
                    )
                    .unwrap();
                    failures.extend(bit_diffs(&format!("{dname}/{p} deq"), &ours, &deq));
                }
            }
            let (wq, _) = u32s(&st, &format!("{wname}.mxfp4.wq"));
            let scales = u8s(&st, &format!("{wname}.mxfp4.scales"));
            let (deq, _, _) = floats(&st, &format!("{wname}.mxfp4.deq"));
            let ours = dequantize_as(
                &wq,
                ScalesRef::E8m0(&scales),
                None,
                rows,
                cols,
                QuantParams::mxfp4(),
                dtype,
            )
            .unwrap();
            failures.extend(bit_diffs(
                &format!("{dname}/{wname}.mxfp4 deq"),
                &ours,
                &deq,
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Unit roundoff of the dtype MLX's CPU kernels accumulate in (they sum in the activation
/// dtype, one product and one addition rounded per term).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::powi(2.0, -24),
        DType::F16 => f64::powi(2.0, -11),
        _ => f64::powi(2.0, -8),
    }
}

/// Allowed |MLX - f64 reference| for one output of a K-term dot product.
///
/// MLX's CPU kernels sum in the activation dtype, rounding each product and each partial sum
/// (possibly in another order: SIMD lanes, per-group partial sums for MXFP4), then round the
/// output. The worst-case bound, `gamma_(K+1) * sum|x_k w_k|` with `gamma_n = n*u/(1-n*u)`,
/// is about `1.0 * sum|x w|` for bf16 at K = 256 and proves nothing. Rounding errors of a
/// sum grow like `sqrt(K)` in practice (Higham, *Accuracy and Stability*, §3.5), so the
/// tolerance is `(2*sqrt(K+1) + 2) * u * sum|x_k w_k| + u * |y|`. On the MLX 0.32.4
/// fixtures the largest error seen is 4.1 `u * sum|x w|` (K = 8 and K = 256 alike), under
/// half this tolerance.
fn matmul_tolerance(k: usize, abs_dot: f64, y: f64, dtype: DType) -> f64 {
    let u = unit_roundoff(dtype);
    (2.0 * ((k + 1) as f64).sqrt() + 2.0) * u * abs_dot + u * y.abs()
}

struct MatmulCheck {
    worst_ratio: f64,
    worst_rel_to_u: f64,
    count: usize,
}

impl MatmulCheck {
    fn new() -> Self {
        MatmulCheck {
            worst_ratio: 0.0,
            worst_rel_to_u: 0.0,
            count: 0,
        }
    }

    /// `x`: [m, k]; `w` row-major [n, k] (transpose) or [k, n]; `y`: [m, n] from MLX.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        key: &str,
        x: &[f32],
        w: &[f32],
        y: &[f32],
        m: usize,
        k: usize,
        n: usize,
        transpose: bool,
        dtype: DType,
    ) {
        assert_eq!(x.len(), m * k, "{key} x");
        assert_eq!(w.len(), k * n, "{key} w");
        assert_eq!(y.len(), m * n, "{key} y");
        let u = unit_roundoff(dtype);
        for i in 0..m {
            for j in 0..n {
                let (mut dot, mut abs_dot) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let wv = if transpose {
                        w[j * k + l]
                    } else {
                        w[l * n + j]
                    };
                    let p = f64::from(x[i * k + l]) * f64::from(wv);
                    dot += p;
                    abs_dot += p.abs();
                }
                let got = f64::from(y[i * n + j]);
                let err = (got - dot).abs();
                let tol = matmul_tolerance(k, abs_dot, dot, dtype);
                assert!(
                    err <= tol,
                    "{key}: y[{i},{j}] = {got:e}, f64 reference {dot:e}, error {err:e} > tolerance {tol:e}"
                );
                self.worst_ratio = self.worst_ratio.max(err / tol.max(f64::MIN_POSITIVE));
                self.worst_rel_to_u = self
                    .worst_rel_to_u
                    .max(err / (u * abs_dot).max(f64::MIN_POSITIVE));
                self.count += 1;
            }
        }
    }
}

#[test]
fn quantized_matmul_matches_f64_reference_over_our_dequantized_weights() {
    let qbytes = read_fixture("qmm.safetensors");
    let qmm = SafeTensors::deserialize(&qbytes).unwrap();
    let configs = [
        (2, 32),
        (3, 64),
        (4, 64),
        (5, 32),
        (6, 128),
        (8, 128),
        (4, 128),
    ];
    for (dname, dtype) in DTYPES {
        let mut stats = MatmulCheck::new();
        let bytes = read_fixture(&format!("quant_{dname}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (w, _, _) = floats(&st, "w.8x256");
        let (n, k) = (8, 256);
        for (bits, gs) in configs {
            // Our own quantization of the weight (bit-identical to MLX's, tested above).
            let q = quantize_as(&w, n, k, QuantParams::affine(bits, gs), dtype).unwrap();
            let wd = q.dequantize().unwrap();
            for m in [1, 3, 8] {
                let key = format!("{dname}.b{bits}.g{gs}");
                let (x, _, _) = floats(&qmm, &format!("{key}.t.x{m}"));
                let (y, _, _) = floats(&qmm, &format!("{key}.t.y{m}"));
                stats.check(&format!("{key}.t.y{m}"), &x, &wd, &y, m, k, n, true, dtype);
                // transpose=False: the same words read as w [K=8, N=256].
                let (x, _, _) = floats(&qmm, &format!("{key}.n.x{m}"));
                let (y, _, _) = floats(&qmm, &format!("{key}.n.y{m}"));
                stats.check(&format!("{key}.n.y{m}"), &x, &wd, &y, m, n, k, false, dtype);
            }
        }
        let q = quantize_as(&w, n, k, QuantParams::mxfp4(), dtype).unwrap();
        let wd = q.dequantize().unwrap();
        for m in [1, 3, 8] {
            let key = format!("{dname}.mxfp4.t");
            let (x, _, _) = floats(&qmm, &format!("{key}.x{m}"));
            let (y, _, _) = floats(&qmm, &format!("{key}.y{m}"));
            stats.check(&format!("{key}.y{m}"), &x, &wd, &y, m, k, n, true, dtype);
        }
        eprintln!(
            "{dname}: {} outputs, worst error {:.3} of tolerance, {:.2} u * sum|x*w|",
            stats.count, stats.worst_ratio, stats.worst_rel_to_u
        );
    }
}

#[test]
fn gather_qmm_matches_f64_reference() {
    let qbytes = read_fixture("qmm.safetensors");
    let qmm = SafeTensors::deserialize(&qbytes).unwrap();
    for (dname, dtype) in [("f32", DType::F32), ("bf16", DType::BF16)] {
        let p = format!("gather.{dname}.b4.g64");
        let (w, _, wshape) = floats(&qmm, &format!("{p}.w"));
        let (experts, n, k) = (wshape[0], wshape[1], wshape[2]);
        let (wq, _) = u32s(&qmm, &format!("{p}.wq"));
        let (x, _, xshape) = floats(&qmm, &format!("{p}.x"));
        let (batch, m) = (xshape[0], xshape[1]);
        let (y, _, _) = floats(&qmm, &format!("{p}.y"));
        let t = qmm.tensor(&format!("{p}.rhs_indices")).unwrap();
        let idx: Vec<usize> = t
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect();
        // Quantize each expert ourselves; the packed words must equal MLX's.
        let mut deq = Vec::new();
        for e in 0..experts {
            let q = quantize_as(
                &w[e * n * k..(e + 1) * n * k],
                n,
                k,
                QuantParams::affine(4, 64),
                dtype,
            )
            .unwrap();
            let words = q.packed.len();
            assert_eq!(
                q.packed,
                wq[e * words..(e + 1) * words],
                "{p}: expert {e} packed"
            );
            deq.push(q.dequantize().unwrap());
        }
        let mut stats = MatmulCheck::new();
        for b in 0..batch {
            let e = idx[b];
            stats.check(
                &format!("{p}.y[{b}] (expert {e})"),
                &x[b * m * k..(b + 1) * m * k],
                &deq[e],
                &y[b * m * n..(b + 1) * m * n],
                m,
                k,
                n,
                true,
                dtype,
            );
        }
        eprintln!("{p}: worst error {:.3} of tolerance", stats.worst_ratio);
    }
}

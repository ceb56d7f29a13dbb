#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Tests of `ops::qmatmul` against an f64 product over the CPU dequantization of
//! `weights::quant` (which is bit-exact with MLX).
//!
//! Tolerances: the CPU reference dequantizes in f32 (`round(round(q*s) + b)`) and the GPU
//! with one fma, so weights differ by at most 1 ulp of |q*s| + |b|; the GPU sums K products
//! in f32 in its own order. Both are covered by `(4·sqrt(K) + 2)·2^-24·Σ|x·w|` (typical f32
//! summation error grows like sqrt(K); Higham §3.5), the same for f32, f16 and bf16 scales
//! since the scale values themselves are exact. The cooperative path rounds x and W to f16:
//! `2·2^-11·Σ|x·w|` more.
use super::*;
use crate::ops::dense::tests::{check_product, check_product_with};
use crate::testutil::{devices, gpu, Rng};
use crate::weights::quant::{dequantize as cpu_dequantize, quantize_as, round_to_dtype, Quantized};
use crate::MlxDevice;

fn weight(rng: &mut Rng, n: usize, k: usize, dt: DType) -> Vec<f32> {
    rng.normals(n * k, 0.3)
        .into_iter()
        .map(|v| round_to_dtype(v, dt).unwrap())
        .collect()
}

fn quant(rng: &mut Rng, n: usize, k: usize, params: QuantParams, dt: DType) -> Quantized {
    quantize_as(&weight(rng, n, k, dt), n, k, params, dt).unwrap()
}

/// The reference weights: f32 dequantization of the stored codes, scales and biases.
fn reference(q: &Quantized) -> Vec<f64> {
    cpu_dequantize(
        &q.packed,
        q.scales.as_view(),
        q.biases.as_deref(),
        q.rows,
        q.cols,
        q.params,
    )
    .unwrap()
    .into_iter()
    .map(f64::from)
    .collect()
}

fn is_coop(g: &MlxDevice, m: usize, n: usize, k: usize) -> bool {
    matches!(matrix_plan(m, n, k, g.caps()), MatmulPlan::Coop { .. })
}

type Op = fn(&mut Pass, &MlxBuffer, &QuantWeight) -> Result<MlxBuffer>;

#[allow(clippy::too_many_arguments)]
fn run_case(
    g: &MlxDevice,
    rng: &mut Rng,
    op: Op,
    coop: bool,
    m: usize,
    n: usize,
    params: QuantParams,
    k: usize,
    dt: DType,
) {
    let q = quant(rng, n, k, params, dt);
    let w = QuantWeight::upload(g, &q).unwrap();
    let x = rng.normals(m * k, 1.0);
    let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
    let mut pass = g.begin();
    let y = op(&mut pass, &gx, &w).unwrap();
    pass.commit_and_wait().unwrap();
    assert_eq!(y.shape(), &[m, n]);
    let what = format!(
        "{} b{} g{} {dt} {m}x{n}x{k} sg={}",
        params.mode,
        params.bits,
        params.group_size,
        g.caps().subgroups
    );
    let want = reference(&q);
    let sq = code_part(&q, &want);
    // The matvec kernel's quantized x (`QmvConfig::xq`) where the default shape uses it.
    let xq = if m <= MAX_VEC_M {
        default_xq(n, k, params)
    } else {
        0
    };
    let tol = xq_tolerance(&x, &sq, k, xq);
    let extra = |i, j| if xq == 0 { 0.0 } else { tol(i, j) };
    check_product_with(
        &y.to_vec(g).unwrap(),
        &x,
        &want,
        m,
        n,
        k,
        coop,
        &extra,
        &what,
    );
}

/// The x quantization a default qmv dispatch of this weight uses.
fn default_xq(n: usize, k: usize, params: QuantParams) -> u32 {
    if xq_applies(params) {
        qmv_config(n, k).xq
    } else {
        0
    }
}

fn all_formats() -> Vec<(QuantParams, DType)> {
    let mut v = Vec::new();
    for bits in AFFINE_BITS {
        for gs in AFFINE_GROUP_SIZES {
            for dt in super::super::FLOAT_DTYPES {
                v.push((QuantParams::affine(bits, gs), dt));
            }
        }
    }
    for dt in super::super::FLOAT_DTYPES {
        v.push((QuantParams::mxfp4(), dt));
    }
    v
}

#[test]
fn plan_depends_only_on_shapes_and_caps() {
    let mut caps = gpu().caps().clone();
    caps.subgroups = true;
    caps.subgroup_min_size = 32;
    caps.subgroup_max_size = 32;
    caps.shader_f16 = true;
    caps.cooperative_matrix = vec![];
    let v = |rpt, subgroups| MatmulPlan::Vector { rpt, subgroups };
    assert_eq!(plan(1, 4096, 4096, &caps), v(4, true));
    assert_eq!(plan(8, 14336, 4096, &caps), v(4, true));
    assert_eq!(plan(3, 1000, 64, &caps), v(2, true));
    assert_eq!(plan(1, 7, 96, &caps), v(1, true));
    assert_eq!(plan(9, 7, 96, &caps), MatmulPlan::Tiled);
    caps.cooperative_matrix = vec![crate::device::CoopShape {
        m: 16,
        n: 16,
        k: 16,
    }];
    // The 16 x 16 kernel declares 44 KiB of workgroup memory (NVIDIA allows 48).
    caps.max_workgroup_storage = 32 * 1024;
    assert_eq!(plan(512, 4096, 4096, &caps), MatmulPlan::Tiled);
    caps.max_workgroup_storage = 48 * 1024;
    assert_eq!(plan(512, 4096, 4096, &caps), MatmulPlan::Coop { tile: 16 });
    assert_eq!(plan(8, 4096, 4096, &caps), v(4, true));
    caps.cooperative_matrix = vec![crate::device::CoopShape { m: 8, n: 8, k: 8 }];
    assert_eq!(plan(33, 64, 64, &caps), MatmulPlan::Coop { tile: 8 });
    // A variable subgroup size: no cooperative kernels; wave64 reduces through memory.
    caps.subgroup_max_size = 64;
    assert_eq!(plan(33, 64, 64, &caps), MatmulPlan::Tiled);
    assert_eq!(plan(1, 64, 64, &caps), v(1, false));
    // Subgroups of fewer than 4: the kernels' partial-sum arrays are sized for 4 or more.
    caps.subgroup_max_size = 32;
    caps.subgroup_min_size = 2;
    assert_eq!(plan(1, 64, 64, &caps), v(1, false));
    caps.subgroup_min_size = 32;
    caps.subgroups = false;
    caps.subgroup_max_size = 32;
    assert_eq!(plan(1, 64, 64, &caps), v(1, false));
}

#[test]
fn qmv_every_format_on_both_reduction_paths() {
    let mut rng = Rng::new(50);
    for (i, g) in devices().into_iter().enumerate() {
        let c = g.caps();
        println!(
            "{}: subgroups {} (sizes {}..={}): qmv plan {:?}",
            c.adapter_name,
            c.subgroups,
            c.subgroup_min_size,
            c.subgroup_max_size,
            plan(1, 7, 96, c)
        );
        for (j, (params, dt)) in all_formats().into_iter().enumerate() {
            // The fallback device gets a third of the formats (every bit width still).
            if i > 0 && j % 3 != 1 {
                continue;
            }
            let gs = params.group_size as usize;
            // K = 3 groups: not a multiple of 128 for gs 32 and 64 (96, 192), nor of 512.
            let (m, n) = [(1, 7), (3, 33), (8, 1)][j % 3];
            run_case(g, &mut rng, qmv, false, m, n, params, 3 * gs, dt);
        }
    }
}

/// Every dispatch shape the plan can pick, plus the widest ones `qmv_with` takes, on both
/// reduction paths: row-sets of 32..256 invocations striding over more than one chunk each
/// (K = 258 chunks), a partial last workgroup (N = 37), several rows of x.
#[test]
fn qmv_every_dispatch_shape() {
    let mut rng = Rng::new(52);
    let mut cfgs = qmv_configs();
    cfgs.push(QmvConfig {
        rpt: 8,
        tpr: 256,
        wg: 256,
        exp: 0,
        xq: 0,
    });
    cfgs.push(QmvConfig {
        rpt: 8,
        tpr: 32,
        wg: 256,
        exp: 0,
        xq: 0,
    });
    // The 4-bit decoding by mantissa bits (`exp` 8) must give the same products.
    for (rpt, tpr) in [(8, 128), (4, 32), (1, 64)] {
        cfgs.push(QmvConfig {
            rpt,
            tpr,
            wg: tpr.max(64),
            exp: 8,
            xq: 0,
        });
    }
    // 16 rows per row-set, with each x quantization.
    for (tpr, wg, xq) in [(32, 128, 0), (64, 128, 1), (128, 128, 2)] {
        cfgs.push(QmvConfig {
            rpt: 16,
            tpr,
            wg,
            exp: 0,
            xq,
        });
    }
    let params = QuantParams::affine(4, 64);
    let (m, n, k) = (3, 37, 258 * 32);
    let q = quant(&mut rng, n, k, params, DType::BF16);
    let x = rng.normals(m * k, 1.0);
    let want = reference(&q);
    let sq = code_part(&q, &want);
    for g in devices() {
        let w = QuantWeight::upload(g, &q).unwrap();
        let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
        for &cfg in &cfgs {
            let mut pass = g.begin();
            let y = qmv_with(&mut pass, &gx, &w, cfg).unwrap();
            pass.commit_and_wait().unwrap();
            let what = format!("{cfg:?} sg={}", g.caps().subgroups);
            check_qmv(
                &y.to_vec(g).unwrap(),
                &x,
                &want,
                &sq,
                [m, n, k],
                cfg.xq,
                &what,
            );
        }
    }
    let g = gpu();
    let w = QuantWeight::upload(g, &q).unwrap();
    let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
    let mut pass = g.begin();
    let bad = QmvConfig {
        rpt: 3,
        tpr: 32,
        wg: 64,
        exp: 0,
        xq: 0,
    };
    let e = qmv_with(&mut pass, &gx, &w, bad).unwrap_err().to_string();
    assert_eq!(
        e,
        "qmv: unsupported config QmvConfig { rpt: 3, tpr: 32, wg: 64, exp: 0, xq: 0 }"
    );
}

/// |scale·q| per weight element, what multiplies the quantized x (the bias term takes Σx
/// in f32): |w - bias| of its group.
pub(crate) fn code_part(q: &Quantized, w: &[f64]) -> Vec<f64> {
    let gs = q.params.group_size as usize;
    let gpr = q.cols / gs;
    w.iter()
        .enumerate()
        .map(|(i, &v)| {
            let b = q.biases.as_ref().map_or(0.0, |b| {
                f64::from(b[(i / q.cols) * gpr + (i % q.cols) / gs])
            });
            (v - b).abs()
        })
        .collect()
}

/// The tolerance qmv's quantized x (`QmvConfig::xq`) adds to y[i, j]: per 32-element chunk
/// c of x row i, x is represented to within e_c = amax_c / 254 with one int8 level and
/// amax_c / 65024 with two (a 16-bit integer: amax ↦ 32512), and it multiplies scale·q
/// only (`sq`, from `code_part`), so y moves by at most e_c · Σ_{l∈c} |sq_jl| (1 % margin
/// for the f32 arithmetic of the scales).
pub(crate) fn xq_tolerance<'a>(
    x: &'a [f32],
    w: &'a [f64],
    k: usize,
    xq: u32,
) -> impl Fn(usize, usize) -> f64 + 'a {
    let unit = if xq == 1 { 254.0 } else { 65024.0 };
    move |i, j| {
        let mut t = 0.0;
        for c in 0..k / 32 {
            let xs = &x[i * k + 32 * c..i * k + 32 * c + 32];
            let amax = xs.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
            let ws: f64 = w[j * k + 32 * c..j * k + 32 * c + 32]
                .iter()
                .map(|v| v.abs())
                .sum();
            t += amax / unit * ws;
        }
        1.01 * t
    }
}

/// `check_product` of a qmv result with the tolerance of its x quantization `xq` added (`sq`:
/// scale·q per weight element, from `code_part`).
#[allow(clippy::too_many_arguments)]
fn check_qmv(
    got: &[f32],
    x: &[f32],
    want: &[f64],
    sq: &[f64],
    mnk: [usize; 3],
    xq: u32,
    what: &str,
) {
    let [m, n, k] = mnk;
    let tol = xq_tolerance(x, sq, k, xq);
    let extra = |i, j| if xq == 0 { 0.0 } else { tol(i, j) };
    check_product_with(got, x, want, m, n, k, false, &extra, what);
}

/// qmv with x quantized per chunk for integer dot products: 4- and 8-bit codes, every
/// group size and scale dtype, one and two levels, 1..8 rows of x (one chunk of zeros, one
/// with an outlier 100x its neighbours), both reduction paths, row-sets striding over
/// several chunks. Other formats ignore `xq` (checked at the f32 tolerance).
#[test]
fn qmv_quantized_x_matches_f64() {
    let mut rng = Rng::new(57);
    for g in devices() {
        let mut case = 0;
        for bits in [4u32, 8, 3] {
            for gs in [32u32, 64, 128] {
                for dt in super::super::FLOAT_DTYPES {
                    case += 1;
                    let params = QuantParams::affine(bits, gs);
                    let (m, n, k) = [(1, 37, 384), (3, 8, 1152), (8, 65, 384)][case % 3];
                    let q = quant(&mut rng, n, k, params, dt);
                    let w = QuantWeight::upload(g, &q).unwrap();
                    let want = reference(&q);
                    let sq = code_part(&q, &want);
                    let mut x = rng.normals(m * k, 1.0);
                    x[..32].fill(0.0);
                    x[40] *= 100.0;
                    let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
                    for xq in [1u32, 2] {
                        let cfg = QmvConfig {
                            rpt: 4,
                            tpr: 32,
                            wg: 64,
                            exp: 0,
                            xq,
                        };
                        let mut pass = g.begin();
                        let y = qmv_with(&mut pass, &gx, &w, cfg).unwrap();
                        pass.commit_and_wait().unwrap();
                        let what = format!(
                            "b{bits} g{gs} {dt} {m}x{n}x{k} xq{xq} sg={}",
                            g.caps().subgroups
                        );
                        // 3-bit codes ignore xq: the f32 tolerance.
                        let applied = if bits == 3 { 0 } else { xq };
                        check_qmv(
                            &y.to_vec(g).unwrap(),
                            &x,
                            &want,
                            &sq,
                            [m, n, k],
                            applied,
                            &what,
                        );
                    }
                }
            }
        }
    }
}

/// `qmatmul_f32_x` (routers): the matvec with x in f32, at the f32 tolerance, where the
/// default 4-bit matvec quantizes x.
#[test]
fn qmatmul_f32_x_keeps_x_in_f32() {
    let mut rng = Rng::new(59);
    let g = gpu();
    let (m, n, k) = (2, 37, 384);
    let params = QuantParams::affine(4, 64);
    assert_ne!(default_xq(n, k, params), 0);
    let q = quant(&mut rng, n, k, params, DType::BF16);
    let w = QuantWeight::upload(g, &q).unwrap();
    let x = rng.normals(m * k, 1.0);
    let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
    let mut pass = g.begin();
    let y = qmatmul_f32_x(&mut pass, &gx, &w).unwrap();
    pass.commit_and_wait().unwrap();
    check_product(
        &y.to_vec(g).unwrap(),
        &x,
        &reference(&q),
        m,
        n,
        k,
        false,
        "f32 x",
    );
}

#[test]
fn qmv_large_shapes() {
    let mut rng = Rng::new(51);
    let g = gpu();
    // N = 4097 runs RPT 4 with a partial last row-block; 600 runs RPT 2.
    run_case(
        g,
        &mut rng,
        qmv,
        false,
        1,
        4097,
        QuantParams::affine(4, 64),
        1024 + 64,
        DType::BF16,
    );
    run_case(
        g,
        &mut rng,
        qmv,
        false,
        2,
        600,
        QuantParams::affine(3, 32),
        4096 + 32,
        DType::F16,
    );
    run_case(
        g,
        &mut rng,
        qmatmul,
        false,
        8,
        4100,
        QuantParams::mxfp4(),
        256,
        DType::BF16,
    );
}

#[test]
fn qmm_tiled_and_cooperative_every_bit_width() {
    let mut rng = Rng::new(52);
    for g in devices() {
        for (j, (params, dt)) in all_formats().into_iter().enumerate() {
            if j % 4 != 0 && params.mode == QuantMode::Affine {
                continue;
            }
            let gs = params.group_size as usize;
            let (m, n, k) = [(33, 70, 3 * gs), (9, 1, 2 * gs), (65, 129, gs)][j % 3];
            let coop = is_coop(g, m, n, k);
            run_case(g, &mut rng, qmm, coop, m, n, params, k, dt);
        }
        // M = 512 through the dispatcher; and qmm with M <= 8 (tiled or cooperative).
        let coop = is_coop(g, 512, 40, 384);
        run_case(
            g,
            &mut rng,
            qmatmul,
            coop,
            512,
            40,
            QuantParams::affine(4, 128),
            384,
            DType::BF16,
        );
        let coop = is_coop(g, 3, 65, 96);
        run_case(
            g,
            &mut rng,
            qmm,
            coop,
            3,
            65,
            QuantParams::affine(6, 32),
            96,
            DType::F32,
        );
    }
}

#[test]
fn cooperative_matrix_path_where_available() {
    let g = gpu();
    if !is_coop(g, 64, 64, 64) {
        println!(
            "cooperative_matrix_path_where_available: skipped, {} has no usable cooperative \
             matrix (the tiled path ran instead)",
            g.caps().adapter_name
        );
        return;
    }
    let mut rng = Rng::new(53);
    for &(m, n, k, bits) in &[
        (64usize, 64usize, 64usize, 4u32),
        (100, 130, 320, 3),
        (17, 33, 96, 8),
        // Several blocks of the 16 x 16 kernel (128 W rows by 64 x rows with 4 subgroups,
        // 128 with 8), tails in M and N, an odd number of chunks (the last K step half
        // empty); 8-bit over several blocks.
        (200, 300, 352, 4),
        (40, 300, 128, 4),
        (150, 260, 192, 8),
    ] {
        run_case(
            g,
            &mut rng,
            qmm,
            true,
            m,
            n,
            QuantParams::affine(bits, 32),
            k,
            DType::F16,
        );
    }
    run_case(
        g,
        &mut rng,
        qmm,
        true,
        40,
        70,
        QuantParams::mxfp4(),
        128,
        DType::BF16,
    );
}

#[test]
fn dequantize_and_gather_match_cpu() {
    let mut rng = Rng::new(54);
    let g = gpu();
    for (j, (params, dt)) in all_formats().into_iter().enumerate() {
        if j % 5 != 0 && params.mode == QuantMode::Affine {
            continue;
        }
        let (n, k) = (5, 2 * params.group_size as usize);
        let q = quant(&mut rng, n, k, params, dt);
        let want = reference(&q);
        let w = QuantWeight::upload(g, &q).unwrap();
        let ids_host = [4u32, 0, 4, 2];
        let ids = MlxBuffer::from_slice(g, &ids_host, &[2, 2]).unwrap();
        let mut pass = g.begin();
        let full = dequantize(&mut pass, &w).unwrap();
        let rows = gather_rows_quantized(&mut pass, &w, &ids).unwrap();
        pass.commit_and_wait().unwrap();
        let full = full.to_vec::<f32>(g).unwrap();
        // One fma against two roundings: 1 ulp of |q*s| + |b|; |w| <= 2 covers it as 2^-22.
        for (i, (&a, &b)) in full.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 2f64.powi(-22) * (1.0 + b.abs()),
                "{params:?} {dt} [{i}]: {a} vs {b}"
            );
        }
        let rows = rows.to_vec::<f32>(g).unwrap();
        for (r, &id) in ids_host.iter().enumerate() {
            let id = id as usize;
            assert_eq!(
                rows[r * k..(r + 1) * k],
                full[id * k..(id + 1) * k],
                "gather row {r}"
            );
        }
    }
}

#[test]
fn gather_of_an_out_of_range_id_is_nan() {
    let g = gpu();
    let mut rng = Rng::new(55);
    let q = quant(&mut rng, 3, 64, QuantParams::affine(4, 64), DType::F32);
    let w = QuantWeight::upload(g, &q).unwrap();
    let ids = MlxBuffer::from_slice(g, &[1i32, -1, 3], &[3]).unwrap();
    let mut pass = g.begin();
    let rows = gather_rows_quantized(&mut pass, &w, &ids).unwrap();
    pass.commit_and_wait().unwrap();
    let rows = rows.to_vec::<f32>(g).unwrap();
    assert!(rows[..64].iter().all(|v| v.is_finite()));
    assert!(rows[64..].iter().all(|v| v.is_nan()));
}

#[test]
fn x_views_at_any_offset() {
    let g = gpu();
    let mut rng = Rng::new(56);
    let (n, k) = (9, 64);
    let q = quant(&mut rng, n, k, QuantParams::affine(5, 32), DType::BF16);
    let w = QuantWeight::upload(g, &q).unwrap();
    let base = rng.normals(7 + 3 * k, 1.0);
    let gb = MlxBuffer::from_slice(g, &base, &[base.len()]).unwrap();
    for off in [0usize, 3, 4, 7] {
        for m in [1usize, 2] {
            let x = gb.view(off, &[m, k]).unwrap();
            for (op, name) in [(qmv as Op, "qmv"), (qmm as Op, "qmm")] {
                let mut pass = g.begin();
                let y = op(&mut pass, &x, &w).unwrap();
                pass.commit_and_wait().unwrap();
                let coop = name == "qmm" && is_coop(g, m, n, k);
                let what = format!("{name} view at {off}");
                check_product(
                    &y.to_vec(g).unwrap(),
                    &base[off..],
                    &reference(&q),
                    m,
                    n,
                    k,
                    coop,
                    &what,
                );
            }
        }
    }
}

/// The activations of `QmvFusion::glu` in f64 (independent of the WGSL: erf from
/// `kv_quant::erf`, tanh from std).
fn act_f64(act: Act, g: f64) -> f64 {
    match act {
        Act::Silu => g / (1.0 + (-g).exp()),
        Act::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
            0.5 * g * (1.0 + u.tanh())
        }
        Act::GeluErf => 0.5 * g * (1.0 + crate::kv_quant::erf(g / std::f64::consts::SQRT_2)),
    }
}

/// qmv with a GLU before it, an RMS norm on its input and a residual added after, against
/// the same steps in f64: every combination the engine uses and all three together, on both
/// reduction paths, x rows at an unaligned offset (the GLU input is copied first then), and
/// several x rows (each row has its own norm).
///
/// Tolerance: the f32 matvec bound of `check_product` over the fused input x' (each x'
/// element carries a few ulp from the activation, the 1/rms and the weight: 8 more ulp of
/// Σ|x'·w|), plus one rounding of the residual add.
#[test]
fn qmv_fused_matches_the_unfused_steps_in_f64() {
    let mut rng = Rng::new(58);
    let eps = 1e-5f32;
    for g in devices() {
        for (case, (params, dt)) in [
            (QuantParams::affine(4, 64), DType::BF16),
            (QuantParams::affine(3, 32), DType::F16),
            (QuantParams::affine(8, 128), DType::F32),
        ]
        .into_iter()
        .enumerate()
        {
            let gs = params.group_size as usize;
            let k = 3 * gs;
            let n = [37, 5, 130][case];
            let q = quant(&mut rng, n, k, params, dt);
            let w = QuantWeight::upload(g, &q).unwrap();
            let wref = reference(&q);
            let sq = code_part(&q, &wref);
            for (norm, glu, residual) in [
                (true, None, false),
                (false, None, true),
                (false, Some(Act::Silu), true),
                (false, Some(Act::GeluTanh), false),
                (false, Some(Act::GeluErf), true),
                (true, Some(Act::Silu), true),
            ] {
                let m = 1 + rng.below(3);
                let off = [0usize, 3][rng.below(2)];
                let xk = if glu.is_some() { 2 * k } else { k };
                let raw = rng.normals(off + m * xk, 1.5);
                let nw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
                let res = rng.normals(m * n, 2.0);
                let graw = MlxBuffer::from_slice(g, &raw, &[raw.len()]).unwrap();
                let gx = graw.view(off, &[m, xk]).unwrap();
                let gnw = MlxBuffer::from_slice(g, &nw, &[k]).unwrap();
                let gres = MlxBuffer::from_slice(g, &res, &[m, n]).unwrap();
                let fusion = QmvFusion {
                    glu,
                    norm: norm.then_some((&gnw, eps)),
                    residual: residual.then_some(&gres),
                };
                let mut pass = g.begin();
                let y = qmv_fused(&mut pass, &gx, &w, &fusion).unwrap();
                pass.commit_and_wait().unwrap();
                assert_eq!(y.shape(), &[m, n]);
                let got: Vec<f32> = y.to_vec(g).unwrap();
                let what = format!(
                    "{} b{} g{gs} {dt} m{m} n{n} norm={norm} glu={glu:?} residual={residual} \
                     off={off} sg={}",
                    params.mode,
                    params.bits,
                    g.caps().subgroups
                );
                let u = 2f64.powi(-24);
                for i in 0..m {
                    let row = &raw[off + i * xk..off + (i + 1) * xk];
                    let mut xi: Vec<f64> = match glu {
                        Some(a) => (0..k)
                            .map(|j| act_f64(a, row[j] as f64) * row[k + j] as f64)
                            .collect(),
                        None => row.iter().map(|&v| v as f64).collect(),
                    };
                    if norm {
                        let ms = xi.iter().map(|v| v * v).sum::<f64>() / k as f64;
                        let inv = 1.0 / (ms + eps as f64).sqrt();
                        for (v, &wv) in xi.iter_mut().zip(&nw) {
                            *v *= inv * wv as f64;
                        }
                    }
                    // The kernel quantizes the fused input per chunk (`xq`), before the
                    // 1/rms it applies to the sums: the same relative error on xi.
                    let xif: Vec<f32> = xi.iter().map(|&v| v as f32).collect();
                    let xq = default_xq(n, k, params);
                    let xq_tol = xq_tolerance(&xif, &sq, k, xq);
                    for j in 0..n {
                        let (mut dot, mut abs) = (0.0f64, 0.0f64);
                        for l in 0..k {
                            let p = xi[l] * wref[j * k + l];
                            dot += p;
                            abs += p.abs();
                        }
                        let r = if residual { res[i * n + j] as f64 } else { 0.0 };
                        let want = dot + r;
                        let mut tol =
                            (4.0 * (k as f64).sqrt() + 10.0) * u * abs + 2.0 * u * want.abs();
                        if xq != 0 {
                            tol += xq_tol(0, j);
                        }
                        let got = got[i * n + j] as f64;
                        assert!(
                            got.is_finite() && (got - want).abs() <= tol,
                            "{what}: y[{i},{j}] = {got:e}, want {want:e} (err {:e} > {tol:e})",
                            (got - want).abs()
                        );
                    }
                }
            }
        }
    }
}

/// x quantized once by its producer (`quantize_x`, `rms_norm_xq`, `rms_norm_residual_xq`,
/// `glu_split_xq`) and read by `qmv_xq`. `quantize_x` makes the chunks qmv makes in-kernel,
/// so its result equals the f32-x path's bit for bit (a wrong layout, order or unwritten
/// chunk breaks that); every producer's matches an f64 reference of the unfused steps
/// within qmv's x quantization tolerance. 4- and 8-bit codes, 1 and 3 rows (several
/// workgroups of chunks at K = 4608), both reduction paths.
#[test]
fn qmv_of_producer_quantized_x() {
    let mut rng = Rng::new(61);
    let eps = 1e-5f32;
    for g in devices() {
        for (case, (params, dt)) in [
            (QuantParams::affine(4, 64), DType::BF16),
            (QuantParams::affine(8, 32), DType::F16),
            (QuantParams::affine(4, 32), DType::F32),
        ]
        .into_iter()
        .enumerate()
        {
            let (m, n, k) = [(1, 37, 384), (3, 70, 1152), (1, 130, 4608)][case];
            let (w, form, wref, sq) = xq_weight(g, &mut rng, (n, k), params, dt);
            let x = rng.normals(m * k, 1.5);
            let r = rng.normals(m * k, 1.0);
            let gu = rng.normals(m * 2 * k, 1.5);
            let nw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
            let res = rng.normals(m * n, 2.0);
            let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
            let gr = MlxBuffer::from_slice(g, &r, &[m, k]).unwrap();
            let ggu = MlxBuffer::from_slice(g, &gu, &[m, 2 * k]).unwrap();
            let gnw = MlxBuffer::from_slice(g, &nw, &[k]).unwrap();
            let gres = MlxBuffer::from_slice(g, &res, &[m, n]).unwrap();
            let what = format!(
                "b{} g{} {dt} {m}x{n}x{k} sg={}",
                params.bits,
                params.group_size,
                g.caps().subgroups
            );
            let mut pass = g.begin();
            // f32 x through qmv, and x quantized by each producer.
            let direct = qmv(&mut pass, &gx, &w).unwrap();
            let xq = quantize_x(&mut pass, &gx, form).unwrap();
            let from_x = qmv_xq(&mut pass, &xq, &w, None).unwrap();
            let nq = crate::ops::rms_norm_xq(&mut pass, &gx, &gnw, eps, form).unwrap();
            let from_norm = qmv_xq(&mut pass, &nq, &w, Some(&gres)).unwrap();
            let (h, _) = crate::ops::rms_norm_residual(&mut pass, &gx, &gr, &gnw, eps).unwrap();
            let (hq, rq) =
                crate::ops::rms_norm_residual_xq(&mut pass, &gx, &gr, &gnw, eps, form).unwrap();
            let from_res = qmv_xq(&mut pass, &rq, &w, None).unwrap();
            let gq = crate::ops::glu_split_xq(&mut pass, &ggu, Act::Silu, form).unwrap();
            let from_glu = qmv_xq(&mut pass, &gq, &w, None).unwrap();
            pass.commit_and_wait().unwrap();
            let v = |b: &MlxBuffer| -> Vec<f32> { b.to_vec(g).unwrap() };
            // The same inputs, the same chunks: bit for bit. (The producers that compute
            // their values may round them differently from the separate kernels, e.g. by
            // contracting a product into an fma (lavapipe does): those are held to the f64
            // reference below.)
            for (a, b, name) in [
                (&direct, &from_x, "quantize_x"),
                (&h, &hq, "rms_norm_residual_xq's h"),
            ] {
                let (a, b) = (v(a), v(b));
                assert!(a.iter().all(|t| t.is_finite()), "{what} {name}: not finite");
                let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{what} {name}: differs from the f32-x path");
            }
            // f64 inputs: x, the normed x (x · rsqrt(mean x² + eps) · w), the normed x + r,
            // and the GLU's act(gate) · up.
            let normed64 = |row: Vec<f64>| -> Vec<f32> {
                let ms = row.iter().map(|t| t * t).sum::<f64>() / k as f64;
                let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                row.iter()
                    .zip(&nw)
                    .map(|(t, &wv)| (t * inv * f64::from(wv)) as f32)
                    .collect()
            };
            let (mut xn, mut xr, mut xg) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..m {
                let row = &x[i * k..(i + 1) * k];
                xn.extend(normed64(row.iter().map(|&t| f64::from(t)).collect()));
                let sum = row.iter().zip(&r[i * k..(i + 1) * k]);
                xr.extend(normed64(sum.map(|(&a, &b)| f64::from(a + b)).collect()));
                for j in 0..k {
                    let (ga, up) = (gu[i * 2 * k + j], gu[i * 2 * k + k + j]);
                    xg.push((act_f64(Act::Silu, f64::from(ga)) * f64::from(up)) as f32);
                }
            }
            let minus_res: Vec<f32> = v(&from_norm).iter().zip(&res).map(|(y, r)| y - r).collect();
            for (got, xin, name) in [
                (v(&from_x), &x, "quantize_x"),
                (minus_res, &xn, "rms_norm_xq"),
                (v(&from_res), &xr, "rms_norm_residual_xq"),
                (v(&from_glu), &xg, "glu_split_xq"),
            ] {
                let what = format!("{what} {name}");
                check_qmv(&got, xin, &wref, &sq, [m, n, k], form.xq, &what);
            }
        }
    }
}

/// Every shape a chunk-writing matvec can take keeps the kernel's limits: whole chunks a
/// workgroup (32 rows with a norm, 32 gate and 32 up rows with the GLU), at most the
/// device's invocations (1024, 512, 256), partial sums inside `red` (2048) and `red_ss` (256) at the smallest
/// subgroup the plan takes (4) or without subgroups (one slot an invocation).
#[test]
fn chunk_writing_shapes_fit_the_kernel() {
    let shapes: [(OutShape, u32); 2] = [(norm_out_shape, 32), (glu_out_shape, 64)];
    for (shape, rows) in shapes {
        // The kernel's own limit, and devices that allow fewer invocations a workgroup.
        for max_wg in [1024, 512, 256] {
            for base in qmv_configs() {
                for sg in [false, true] {
                    let c = shape(base, sg, max_wg);
                    let sets = c.wg / c.tpr;
                    let slots = if sg { c.tpr / 4 } else { c.tpr };
                    let what = format!("{c:?} sg={sg} max {max_wg}");
                    assert_eq!(sets * c.rpt, rows, "{what}");
                    assert!(c.wg <= max_wg && c.wg.is_multiple_of(c.tpr), "{what}");
                    assert!(rows * slots <= 2048 && sets * slots <= 256, "{what}");
                }
            }
        }
    }
}

/// The RMS norm split across two matvecs ([`qmv_norm_out`], then [`qmv_xq`] of its chunks):
/// the producer's y (plus its residual) matches an f64 product; its chunks decode to y·g
/// (half a level) with Σy² of each chunk in the last word; the consumer matches the f64
/// product of the normed y (y · rsqrt(mean y² + eps) · g, from the GPU's own y). f32 and
/// quantized producer input, with and without residuals (the consumer's too), 4- and 8-bit
/// codes, 1 and 3 rows, a 4096-wide norm (the Llama shape's 8-row row-sets), both
/// reduction paths. Allocations are poisoned, so an unwritten chunk word fails.
#[test]
fn qmv_norm_out_feeds_the_matvec_after_the_norm() {
    let mut rng = Rng::new(66);
    let eps = 1e-5f32;
    let poisoned = poisoned_devices();
    for g in &poisoned {
        for case in 0..3 {
            let (params, dt) = [
                (QuantParams::affine(4, 64), DType::BF16),
                (QuantParams::affine(8, 32), DType::F16),
                (QuantParams::affine(4, 32), DType::F32),
            ][case];
            // (rows, producer N = the norm's width, producer K, consumer N)
            let (m, n1, k1, n2) =
                [(1, 512, 384, 70), (3, 1024, 576, 37), (1, 4096, 256, 130)][case];
            let qp = quant(&mut rng, n1, k1, params, dt);
            let qc = quant(&mut rng, n2, n1, params, dt);
            let (wp, wc) = (
                QuantWeight::upload(g, &qp).unwrap(),
                QuantWeight::upload(g, &qc).unwrap(),
            );
            let form = XqForm::of(&wp).unwrap();
            let (wpref, wcref) = (reference(&qp), reference(&qc));
            let (sqp, sqc) = (code_part(&qp, &wpref), code_part(&qc, &wcref));
            let x = rng.normals(m * k1, 1.5);
            let r = rng.normals(m * n1, 1.0);
            let r2 = rng.normals(m * n2, 1.0);
            let nw: Vec<f32> = (0..n1).map(|_| rng.uniform(0.5, 1.5)).collect();
            let gx = MlxBuffer::from_slice(g, &x, &[m, k1]).unwrap();
            let gr = MlxBuffer::from_slice(g, &r, &[m, n1]).unwrap();
            let gr2 = MlxBuffer::from_slice(g, &r2, &[m, n2]).unwrap();
            let gnw = MlxBuffer::from_slice(g, &nw, &[n1]).unwrap();
            let (with_res, quantized_in) = [(true, false), (true, true), (false, false)][case];
            let what = format!(
                "b{} g{} {dt} {m}x{n1}x{k1} -> {n2} sg={}",
                params.bits,
                params.group_size,
                g.caps().subgroups
            );
            let out = NormOut {
                weight: &gnw,
                eps,
                form,
            };
            let mut pass = g.begin();
            let resid = with_res.then_some(&gr);
            let xq;
            let xin = if quantized_in {
                xq = quantize_x(&mut pass, &gx, form).unwrap();
                MatvecX::Quantized(&xq)
            } else {
                MatvecX::F32(&gx)
            };
            let (y, chunks) = qmv_norm_out(&mut pass, xin, &wp, resid, &out).unwrap();
            assert_eq!(chunks.pending_norm(), Some(eps));
            let z = qmv_xq(&mut pass, &chunks, &wc, with_res.then_some(&gr2)).unwrap();
            // The same consumer in row-sets narrower than 32 (the LM head's shape where
            // subgroups allow), whose norm sums take the narrow reduction too.
            let narrow: Vec<MlxBuffer> = [(4, 16, 128), (1, 8, 64)]
                .into_iter()
                .map(|(rpt, tpr, wg)| {
                    let cfg = QmvConfig {
                        rpt,
                        tpr,
                        wg,
                        exp: 0,
                        xq: form.xq,
                    };
                    qmv_xq_with(&mut pass, &chunks, &wc, cfg).unwrap()
                })
                .collect();
            pass.commit_and_wait().unwrap();
            let yv: Vec<f32> = y.to_vec(g).unwrap();
            let minus_r: Vec<f32> = if with_res {
                yv.iter().zip(&r).map(|(a, b)| a - b).collect()
            } else {
                yv.clone()
            };
            check_qmv(
                &minus_r,
                &x,
                &wpref,
                &sqp,
                [m, n1, k1],
                form.xq,
                &format!("{what} y"),
            );
            // The chunks: y·g to half a level, Σy² per chunk.
            let cw: Vec<u32> = chunks.buffer().to_vec(g).unwrap();
            for i in 0..m {
                for c in 0..n1 / 32 {
                    let w = &cw[(i * n1 / 32 + c) * 20..(i * n1 / 32 + c + 1) * 20];
                    let ys = &yv[i * n1 + 32 * c..i * n1 + 32 * c + 32];
                    let vals: Vec<f64> = ys
                        .iter()
                        .zip(&nw[32 * c..32 * c + 32])
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .collect();
                    let d = f64::from(f32::from_bits(w[16]));
                    let amax = vals.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                    let (ts, _) = chunk_levels(w, params.bits, form.xq);
                    for (e, (&t, &v)) in ts.iter().zip(&vals).enumerate() {
                        let got = d * t as f64;
                        assert!(
                            (got - v).abs() <= d * 0.5 + amax * 1e-6,
                            "{what} row {i} chunk {c} element {e}: {got} vs {v}"
                        );
                    }
                    let ss = f64::from(f32::from_bits(w[19]));
                    let ss64: f64 = ys.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
                    assert!(
                        (ss - ss64).abs() <= 1e-5 * ss64,
                        "{what} row {i} chunk {c}: Σy² {ss} vs {ss64}"
                    );
                }
            }
            // The consumer against the f64 norm of the GPU's y.
            let mut xn = Vec::new();
            for i in 0..m {
                let row = &yv[i * n1..(i + 1) * n1];
                let ms = row.iter().map(|&t| f64::from(t).powi(2)).sum::<f64>() / n1 as f64;
                let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                xn.extend(
                    row.iter()
                        .zip(&nw)
                        .map(|(&t, &wv)| (f64::from(t) * inv * f64::from(wv)) as f32),
                );
            }
            let zv: Vec<f32> = z.to_vec(g).unwrap();
            let zv: Vec<f32> = if with_res {
                zv.iter().zip(&r2).map(|(a, b)| a - b).collect()
            } else {
                zv
            };
            check_qmv(
                &zv,
                &xn,
                &wcref,
                &sqc,
                [m, n2, n1],
                form.xq,
                &format!("{what} z"),
            );
            for (i, zb) in narrow.iter().enumerate() {
                let zv: Vec<f32> = zb.to_vec(g).unwrap();
                let what = format!("{what} z, narrow shape {i}");
                check_qmv(&zv, &xn, &wcref, &sqc, [m, n2, n1], form.xq, &what);
            }
        }
    }
}

/// The GLU applied by a stacked gate|up matvec to its own rows ([`qmv_glu_out`]), read by
/// the down matvec ([`qmv_xq`]): the chunks decode to act(gate)·up of the GPU's own gate|up
/// product (`qmv_xq` / `qmv` of the same x, the same per-row sums) to half a level, and
/// down matches the f64 product of those values. f32 x, quantized x, and quantized x with a
/// pending norm (from [`qmv_norm_out`]); SiLU and both GELUs; 4- and 8-bit codes; 1 and 3
/// rows; both reduction paths; allocations poisoned.
#[test]
fn qmv_glu_out_feeds_the_down_matvec() {
    let mut rng = Rng::new(67);
    let poisoned = poisoned_devices();
    for g in &poisoned {
        for case in 0..3 {
            let (params, dt, act) = [
                (QuantParams::affine(4, 64), DType::BF16, Act::Silu),
                (QuantParams::affine(8, 32), DType::F16, Act::GeluTanh),
                (QuantParams::affine(4, 32), DType::F32, Act::GeluErf),
            ][case];
            // (rows, I, K, down's N)
            let (m, i, k, n2) = [(1, 64, 384, 70), (3, 512, 576, 37), (1, 1024, 256, 130)][case];
            let qgu = quant(&mut rng, 2 * i, k, params, dt);
            let qd = quant(&mut rng, n2, i, params, dt);
            let wgu = QuantWeight::upload(g, &qgu).unwrap();
            let wd = QuantWeight::upload(g, &qd).unwrap();
            let form = XqForm::of(&wgu).unwrap();
            let wdref = reference(&qd);
            let sqd = code_part(&qd, &wdref);
            let x = rng.normals(m * k, 1.5);
            let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
            let what = format!(
                "b{} {dt} {act:?} {m}x{k} -> 2x{i} -> {n2} sg={}",
                params.bits,
                g.caps().subgroups
            );
            let mut pass = g.begin();
            // The input: f32, quantized, or quantized with a pending norm (a producer
            // [K, 256] of another x).
            let (xq, pre);
            let (xin, gate_up) = match case {
                0 => (MatvecX::F32(&gx), qmv(&mut pass, &gx, &wgu).unwrap()),
                1 => {
                    let qp = quant(&mut rng, k, 256, params, dt);
                    let wp = QuantWeight::upload(g, &qp).unwrap();
                    let x0 =
                        MlxBuffer::from_slice(g, &rng.normals(m * 256, 1.0), &[m, 256]).unwrap();
                    let nw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
                    pre = MlxBuffer::from_slice(g, &nw, &[k]).unwrap();
                    let out = NormOut {
                        weight: &pre,
                        eps: 1e-5,
                        form,
                    };
                    let (_, q) =
                        qmv_norm_out(&mut pass, MatvecX::F32(&x0), &wp, None, &out).unwrap();
                    xq = q;
                    let gu = qmv_xq(&mut pass, &xq, &wgu, None).unwrap();
                    (MatvecX::Quantized(&xq), gu)
                }
                _ => {
                    xq = quantize_x(&mut pass, &gx, form).unwrap();
                    let gu = qmv_xq(&mut pass, &xq, &wgu, None).unwrap();
                    (MatvecX::Quantized(&xq), gu)
                }
            };
            let h = qmv_glu_out(&mut pass, xin, &wgu, act, form).unwrap();
            assert_eq!((h.rows(), h.k(), h.pending_norm()), (m, i, None));
            let z = qmv_xq(&mut pass, &h, &wd, None).unwrap();
            pass.commit_and_wait().unwrap();
            let gu: Vec<f32> = gate_up.to_vec(g).unwrap();
            let hv: Vec<f32> = (0..m * i)
                .map(|e| {
                    let (r, j) = (e / i, e % i);
                    let gate = f64::from(gu[r * 2 * i + j]);
                    (act_f64(act, gate) * f64::from(gu[r * 2 * i + i + j])) as f32
                })
                .collect();
            let cw: Vec<u32> = h.buffer().to_vec(g).unwrap();
            for r in 0..m {
                for c in 0..i / 32 {
                    let w = &cw[(r * i / 32 + c) * 20..(r * i / 32 + c + 1) * 20];
                    let vals = &hv[r * i + 32 * c..r * i + 32 * c + 32];
                    let d = f64::from(f32::from_bits(w[16]));
                    let amax = vals.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
                    let (ts, _) = chunk_levels(w, params.bits, form.xq);
                    for (e, (&t, &v)) in ts.iter().zip(vals).enumerate() {
                        let got = d * t as f64;
                        assert!(
                            (got - f64::from(v)).abs() <= d * 0.5 + amax * 1e-5,
                            "{what} row {r} chunk {c} element {e}: {got} vs {v}"
                        );
                    }
                }
            }
            let zv: Vec<f32> = z.to_vec(g).unwrap();
            check_qmv(
                &zv,
                &hv,
                &wdref,
                &sqd,
                [m, n2, i],
                form.xq,
                &format!("{what} down"),
            );
        }
    }
}

/// [`devices`] again, each with its allocations poisoned (an unwritten output fails).
fn poisoned_devices() -> Vec<MlxDevice> {
    devices()
        .iter()
        .map(|d| {
            MlxDevice::with_options(crate::DeviceOptions {
                poison_allocations: true,
                disable_subgroups: !d.caps().subgroups,
                ..crate::DeviceOptions::default()
            })
            .unwrap()
        })
        .collect()
}

/// The chunk format itself, decoded on the CPU (h, l bytes in code order, d, s, hs) against
/// the f64 values the producer quantized: every value within half a level (d/2) plus f32
/// rounding, Σx within f32 rounding. Rows of 8192 and 10 rows take the norms' looping path
/// (the row does not fit the workgroup's registers), 576 the one-round-trip path; 4- and
/// 8-bit orders, one and two levels.
#[test]
fn quantized_chunks_decode_to_their_values() {
    let mut rng = Rng::new(63);
    let eps = 1e-5f32;
    for (gi, g) in devices().into_iter().enumerate() {
        for (bits, xq) in [(4u32, 2u32), (8, 2), (4, 1), (8, 1)] {
            let form = XqForm { bits, xq };
            for (rows, k) in [(1usize, 576usize), (10, 8192)] {
                let x = rng.normals(rows * k, 2.0);
                let r = rng.normals(rows * k, 1.0);
                let nw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
                let gx = MlxBuffer::from_slice(g, &x, &[rows, k]).unwrap();
                let gr = MlxBuffer::from_slice(g, &r, &[rows, k]).unwrap();
                let gnw = MlxBuffer::from_slice(g, &nw, &[k]).unwrap();
                let mut pass = g.begin();
                let plain = quantize_x(&mut pass, &gx, form).unwrap();
                let normed = crate::ops::rms_norm_xq(&mut pass, &gx, &gnw, eps, form).unwrap();
                let (_, res) =
                    crate::ops::rms_norm_residual_xq(&mut pass, &gx, &gr, &gnw, eps, form).unwrap();
                pass.commit_and_wait().unwrap();
                let norm64 = |i: usize, add: bool| -> Vec<f64> {
                    let row: Vec<f64> = (0..k)
                        .map(|j| {
                            let v = f64::from(x[i * k + j]);
                            if add {
                                v + f64::from(r[i * k + j])
                            } else {
                                v
                            }
                        })
                        .collect();
                    let inv = 1.0
                        / (row.iter().map(|v| v * v).sum::<f64>() / k as f64 + f64::from(eps))
                            .sqrt();
                    row.iter()
                        .zip(&nw)
                        .map(|(v, &w)| v * inv * f64::from(w))
                        .collect()
                };
                for (q, name) in [
                    (&plain, "quantize_x"),
                    (&normed, "rms_norm_xq"),
                    (&res, "rms_norm_residual_xq"),
                ] {
                    let words: Vec<u32> = q.buffer().to_vec(g).unwrap();
                    for i in 0..rows {
                        let want: Vec<f64> = match name {
                            "quantize_x" => x[i * k..(i + 1) * k]
                                .iter()
                                .map(|&v| f64::from(v))
                                .collect(),
                            "rms_norm_xq" => norm64(i, false),
                            _ => norm64(i, true),
                        };
                        for c in 0..k / 32 {
                            let w = &words[(i * k / 32 + c) * 20..(i * k / 32 + c + 1) * 20];
                            let d = f64::from(f32::from_bits(w[16]));
                            let sum = f64::from(f32::from_bits(w[17]));
                            let vals = &want[c * 32..c * 32 + 32];
                            let amax = vals.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                            let what = format!(
                                "{name} b{bits} xq{xq} {rows}x{k} row {i} chunk {c} dev {gi}"
                            );
                            let (ts, hs) = chunk_levels(w, bits, xq);
                            for (e, (&t, &v)) in ts.iter().zip(vals).enumerate() {
                                let got = d * t as f64;
                                let tol = d * 0.5 + amax * 1e-6;
                                assert!(
                                    (got - v).abs() <= tol,
                                    "{what}: element {e} decodes to {got}, want {v} (tol {tol:e})"
                                );
                            }
                            let top = if xq == 2 { 32512.0 } else { 127.0 };
                            assert!(
                                (d - amax / top).abs() <= 1e-6 * amax / top + 1e-30,
                                "{what}: d"
                            );
                            let s64: f64 = vals.iter().sum();
                            let sabs: f64 = vals.iter().map(|v| v.abs()).sum();
                            assert!(
                                (sum - s64).abs() <= 1e-5 * sabs + 1e-30,
                                "{what}: s {sum} vs {s64}"
                            );
                            if bits == 8 {
                                assert_eq!(i64::from(w[18] as i32), hs, "{what}: hs");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Gemma's post-norm, residual add and next norm in one dispatch
/// (`ops::rms_norm_post_residual_xq`): h = x + rms_norm(r) matches f64 to f32 rounding and
/// the chunks decode to rms_norm(h) (f64, from the GPU's h) within half a level. Rows of
/// 576 and 2560 (one dispatch) and 10240 (wider than any workgroup's registers: the
/// separate norms), two eps, both reduction paths, allocations poisoned.
#[test]
fn rms_norm_post_residual_xq_matches_f64() {
    let mut rng = Rng::new(68);
    let (eps, post_eps) = (1e-6f32, 1e-5f32);
    let poisoned = poisoned_devices();
    for g in &poisoned {
        for (rows, k, bits) in [(1usize, 576usize, 4u32), (3, 2560, 8), (1, 10240, 4)] {
            let form = XqForm { bits, xq: 2 };
            let x = rng.normals(rows * k, 2.0);
            let r = rng.normals(rows * k, 30.0);
            let pw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
            let nw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
            let up = |v: &[f32], s: &[usize]| MlxBuffer::from_slice(g, v, s).unwrap();
            let (gx, gr) = (up(&x, &[rows, k]), up(&r, &[rows, k]));
            let (gpw, gnw) = (up(&pw, &[k]), up(&nw, &[k]));
            let mut pass = g.begin();
            let (h, q) = crate::ops::rms_norm_post_residual_xq(
                &mut pass,
                &gx,
                &gr,
                (&gpw, post_eps),
                &gnw,
                eps,
                form,
            )
            .unwrap();
            pass.commit_and_wait().unwrap();
            let what = format!("{rows}x{k} b{bits} sg={}", g.caps().subgroups);
            let hv: Vec<f32> = h.to_vec(g).unwrap();
            let words: Vec<u32> = q.buffer().to_vec(g).unwrap();
            for i in 0..rows {
                let rr = &r[i * k..(i + 1) * k];
                let ms = rr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / k as f64;
                let inv_r = 1.0 / (ms + f64::from(post_eps)).sqrt();
                for j in 0..k {
                    let want =
                        f64::from(x[i * k + j]) + f64::from(rr[j]) * inv_r * f64::from(pw[j]);
                    let got = f64::from(hv[i * k + j]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (want.abs() + 1.0),
                        "{what}: h[{i}, {j}] {got} vs {want}"
                    );
                }
                let hr = &hv[i * k..(i + 1) * k];
                let ms = hr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / k as f64;
                let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                for c in 0..k / 32 {
                    let w = &words[(i * k / 32 + c) * 20..(i * k / 32 + c + 1) * 20];
                    let vals: Vec<f64> = (0..32)
                        .map(|e| f64::from(hr[32 * c + e]) * inv * f64::from(nw[32 * c + e]))
                        .collect();
                    let amax = vals.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                    let d = f64::from(f32::from_bits(w[16]));
                    let (ts, _) = chunk_levels(w, bits, 2);
                    for (e, (&t, &v)) in ts.iter().zip(&vals).enumerate() {
                        let got = d * t as f64;
                        assert!(
                            (got - v).abs() <= d * 0.5 + amax * 1e-5,
                            "{what} row {i} chunk {c} element {e}: {got} vs {v}"
                        );
                    }
                }
            }
        }
    }
}

/// `rms_norm_and_xq` (an MoE layer's norm: f32 for the router, chunks for the experts):
/// its f32 rows match `rms_norm`'s within f32 rounding of the sum of squares, and its chunks
/// are exactly `quantize_x` of those rows. One row of 2048 (registers) and 10 of 8192
/// (looping), both reduction paths.
#[test]
fn rms_norm_and_xq_keeps_both_forms() {
    let mut rng = Rng::new(64);
    for g in devices() {
        for (rows, k) in [(1usize, 2048usize), (10, 8192)] {
            let form = XqForm { bits: 4, xq: 2 };
            let x = rng.normals(rows * k, 1.5);
            let nw: Vec<f32> = (0..k).map(|_| rng.uniform(0.5, 1.5)).collect();
            let gx = MlxBuffer::from_slice(g, &x, &[rows, k]).unwrap();
            let gnw = MlxBuffer::from_slice(g, &nw, &[k]).unwrap();
            let mut pass = g.begin();
            let (y, yq) = crate::ops::rms_norm_and_xq(&mut pass, &gx, &gnw, 1e-5, form).unwrap();
            let plain = crate::ops::rms_norm(&mut pass, &gx, &gnw, 1e-5).unwrap();
            let again = quantize_x(&mut pass, &y, form).unwrap();
            pass.commit_and_wait().unwrap();
            let what = format!("{rows}x{k} sg={}", g.caps().subgroups);
            let (y, plain): (Vec<f32>, Vec<f32>) = (y.to_vec(g).unwrap(), plain.to_vec(g).unwrap());
            for (j, (a, b)) in y.iter().zip(&plain).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs() + 1e-7,
                    "{what}: y[{j}] {a} vs {b}"
                );
            }
            let (q, r): (Vec<u32>, Vec<u32>) = (
                yq.buffer().to_vec(g).unwrap(),
                again.buffer().to_vec(g).unwrap(),
            );
            assert_eq!(
                q, r,
                "{what}: chunks differ from quantize_x of the f32 rows"
            );
        }
    }
}

/// A quantized chunk's 32 integer levels (t = 256·h + l, or h with one level) and Σh, read
/// from its words as the format says: h bytes in words 0..8, l in 8..16, element e's byte
/// in code order (4-bit codes: word 2·(e/8) + e%2 holds the even or odd elements of each 8).
fn chunk_levels(w: &[u32], bits: u32, xq: u32) -> (Vec<i64>, i64) {
    let mut hs = 0;
    let ts = (0..32usize)
        .map(|e| {
            let (word, byte) = if bits == 4 {
                (2 * (e / 8) + e % 2, (e % 8) / 2)
            } else {
                (e / 4, e % 4)
            };
            let h = i64::from(((w[word] >> (8 * byte)) & 0xff) as u8 as i8);
            let l = i64::from((w[8 + word] >> (8 * byte)) & 0xff);
            hs += h;
            if xq == 2 {
                256 * h + l
            } else {
                h
            }
        })
        .collect();
    (ts, hs)
}

/// Quantized x of the wrong form, length or row count is refused with the reason.
#[test]
fn qmv_xq_bad_inputs_are_named() {
    let g = gpu();
    let mut rng = Rng::new(62);
    let w4 = QuantWeight::upload(
        g,
        &quant(&mut rng, 8, 64, QuantParams::affine(4, 32), DType::F16),
    )
    .unwrap();
    let w8 = QuantWeight::upload(
        g,
        &quant(&mut rng, 8, 64, QuantParams::affine(8, 32), DType::F16),
    )
    .unwrap();
    let w3 = QuantWeight::upload(
        g,
        &quant(&mut rng, 8, 64, QuantParams::affine(3, 32), DType::F16),
    )
    .unwrap();
    let w128 = QuantWeight::upload(
        g,
        &quant(&mut rng, 8, 128, QuantParams::affine(4, 32), DType::F16),
    )
    .unwrap();
    assert!(XqForm::of(&w3).is_none());
    let x = MlxBuffer::from_slice(g, &rng.normals(64, 1.0), &[1, 64]).unwrap();
    let x9 = MlxBuffer::from_slice(g, &rng.normals(9 * 64, 1.0), &[9, 64]).unwrap();
    let x40 = MlxBuffer::from_slice(g, &rng.normals(40, 1.0), &[1, 40]).unwrap();
    let mut pass = g.begin();
    let form4 = XqForm::of(&w4).unwrap();
    let q4 = quantize_x(&mut pass, &x, form4).unwrap();
    let err = |r: Result<MlxBuffer>| r.unwrap_err().to_string();
    assert!(err(qmv_xq(&mut pass, &q4, &w8, None)).contains("quantized for 4-bit codes"));
    assert!(err(qmv_xq(&mut pass, &q4, &w3, None)).contains("takes f32 x"));
    assert!(err(qmv_xq(&mut pass, &q4, &w128, None)).contains("expected K = 128"));
    let q9 = quantize_x(&mut pass, &x9, form4).unwrap();
    assert!(err(qmv_xq(&mut pass, &q9, &w4, None)).contains("9 rows"));
    let e = quantize_x(&mut pass, &x40, form4).unwrap_err().to_string();
    assert!(e.contains("chunks of 32"), "{e}");
    let short = MlxBuffer::from_slice(g, &[0f32; 3], &[3]).unwrap();
    assert!(err(qmv_xq(&mut pass, &q4, &w4, Some(&short))).contains("residual"));
    // NormOut: chunks in another form than the matvec's own, a norm weight of the wrong
    // width, N not a whole number of chunks.
    let nw32 = MlxBuffer::from_slice(g, &[1f32; 32], &[32]).unwrap();
    let nw8 = MlxBuffer::from_slice(g, &[1f32; 8], &[8]).unwrap();
    let w40 = QuantWeight::upload(
        g,
        &quant(&mut rng, 40, 64, QuantParams::affine(4, 32), DType::F16),
    )
    .unwrap();
    let nw40 = MlxBuffer::from_slice(g, &[1f32; 40], &[40]).unwrap();
    let out = |weight, form| NormOut {
        weight,
        eps: 1e-5,
        form,
    };
    let err2 = |r: Result<(MlxBuffer, QuantizedX)>| r.unwrap_err().to_string();
    let form8 = XqForm::of(&w8).unwrap();
    let xf = MatvecX::F32(&x);
    let e = err2(qmv_norm_out(&mut pass, xf, &w8, None, &out(&nw8, form4)));
    assert!(e.contains("quantized as the matvec's own"), "{e}");
    let w8x32 = QuantWeight::upload(
        g,
        &quant(&mut rng, 32, 64, QuantParams::affine(8, 32), DType::F16),
    )
    .unwrap();
    let e = err2(qmv_norm_out(&mut pass, xf, &w8x32, None, &out(&nw8, form8)));
    assert!(e.contains("norm weight"), "{e}");
    assert!(qmv_norm_out(&mut pass, xf, &w8x32, None, &out(&nw32, form8)).is_ok());
    let e = err2(qmv_norm_out(&mut pass, xf, &w40, None, &out(&nw40, form4)));
    assert!(e.contains("multiple of 32"), "{e}");
    // GLU out: another form, rows that are not [gate | up] of whole chunks.
    let err3 = |r: Result<QuantizedX>| r.unwrap_err().to_string();
    let e = err3(qmv_glu_out(&mut pass, xf, &w8x32, Act::Silu, form4));
    assert!(e.contains("quantized as the matvec's own"), "{e}");
    let e = err3(qmv_glu_out(&mut pass, xf, &w8x32, Act::Silu, form8));
    assert!(e.contains("[gate | up]"), "{e}");
}

#[test]
fn bad_inputs_are_named() {
    let g = gpu();
    let mut rng = Rng::new(57);
    let p4 = QuantParams::affine(4, 64);
    // K not divisible by the group size.
    let e = QuantWeight::from_raw(
        g,
        &[0; 48],
        &[0; 12],
        Some(&[0; 12]),
        [4, 96],
        p4,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "QuantWeight: shape [4, 96]: K = 96 is not a positive multiple of group_size 64"
    );
    // Scales of the wrong length: [6, 128] at g64 has 12 groups.
    let words = vec![0u32; 6 * 16];
    let e = QuantWeight::from_raw(
        g,
        &words,
        &[0; 20],
        Some(&[0; 24]),
        [6, 128],
        p4,
        DType::F16,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, "QuantWeight: scales has 10 elements, expected 12");
    let e = QuantWeight::from_raw(g, &words, &[0; 24], None, [6, 128], p4, DType::F16)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "QuantWeight: affine weights need biases, got none");
    let e = QuantWeight::from_raw(
        g,
        &words[1..],
        &[0; 24],
        Some(&[0; 24]),
        [6, 128],
        p4,
        DType::F16,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, "QuantWeight: packed has 95 elements, expected 96");
    // Unsupported bits.
    let e = QuantWeight::from_raw(
        g,
        &words,
        &[0; 24],
        Some(&[0; 24]),
        [6, 128],
        QuantParams::affine(7, 64),
        DType::F16,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "unsupported: QuantWeight: affine quantization with bits=7; supported bits are 2, 3, 4, 5, 6, 8"
    );
    // x that does not fit.
    let q = quant(&mut rng, 3, 64, p4, DType::F32);
    let w = QuantWeight::upload(g, &q).unwrap();
    let x = MlxBuffer::from_slice(g, &[1.0f32; 96], &[1, 96]).unwrap();
    let mut pass = g.begin();
    let e = qmatmul(&mut pass, &x, &w).unwrap_err().to_string();
    assert_eq!(
        e,
        "qmatmul: x has 96 columns (shape [1, 96]), expected K = 64"
    );
    let x9 = MlxBuffer::from_slice(g, &[1.0f32; 9 * 64], &[9, 64]).unwrap();
    let e = qmv(&mut pass, &x9, &w).unwrap_err().to_string();
    assert_eq!(e, "qmv: x has 9 rows, at most 8 (use qmm or qmatmul)");
    let xh = MlxBuffer::from_slice(g, &[half::f16::ONE; 64], &[1, 64]).unwrap();
    let e = qmm(&mut pass, &xh, &w).unwrap_err().to_string();
    assert_eq!(e, "qmm: x is f16, expected f32");
    let ids = MlxBuffer::from_slice(g, &[1.0f32], &[1]).unwrap();
    let e = gather_rows_quantized(&mut pass, &w, &ids)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "gather_rows_quantized: ids is f32, expected u32 or i32");
    // Fused matvec: a GLU input must hold gate and up; the norm weight and the residual must
    // match K and the output.
    let glu = QmvFusion {
        glu: Some(Act::Silu),
        ..QmvFusion::default()
    };
    let e = qmv_fused(&mut pass, &x, &w, &glu).unwrap_err().to_string();
    assert_eq!(
        e,
        "qmv_fused: x has 96 columns (shape [1, 96]), expected 2K (gate and up) = 128"
    );
    let x1 = MlxBuffer::from_slice(g, &[1.0f32; 64], &[1, 64]).unwrap();
    let nw = MlxBuffer::from_slice(g, &[1.0f32; 63], &[63]).unwrap();
    let norm = QmvFusion {
        norm: Some((&nw, 1e-5)),
        ..QmvFusion::default()
    };
    let e = qmv_fused(&mut pass, &x1, &w, &norm)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "qmv_fused: norm weight has 63 elements, expected 64");
    let nw = MlxBuffer::from_slice(g, &[1.0f32; 65], &[65]).unwrap();
    let nwv = nw.view(1, &[64]).unwrap();
    let norm = QmvFusion {
        norm: Some((&nwv, 1e-5)),
        ..QmvFusion::default()
    };
    let e = qmv_fused(&mut pass, &x1, &w, &norm)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "qmv_fused: the norm weight view starts at element 1, not a multiple of 4"
    );
    let r = MlxBuffer::from_slice(g, &[1.0f32; 4], &[4]).unwrap();
    let res = QmvFusion {
        residual: Some(&r),
        ..QmvFusion::default()
    };
    let e = qmv_fused(&mut pass, &x1, &w, &res).unwrap_err().to_string();
    assert_eq!(e, "qmv_fused: residual has 4 elements, expected 3");
}

/// A weight of random codes with bf16 scales and biases of decode-typical size (timing
/// probes: the values only need to be finite).
fn random_bf16_weight(
    g: &MlxDevice,
    rng: &mut Rng,
    n: usize,
    k: usize,
    params: QuantParams,
) -> QuantWeight {
    let wpr = k * params.bits as usize / 32;
    let packed: Vec<u32> = (0..n * wpr).map(|_| rng.next_u64() as u32).collect();
    let groups = n * k / params.group_size as usize;
    let s: Vec<half::bf16> = (0..groups)
        .map(|_| half::bf16::from_f32(rng.uniform(0.001, 0.01)))
        .collect();
    let b: Vec<half::bf16> = (0..groups)
        .map(|_| half::bf16::from_f32(rng.uniform(-0.05, 0.05)))
        .collect();
    QuantWeight::from_raw(
        g,
        &packed,
        bytemuck::cast_slice(&s),
        Some(bytemuck::cast_slice(&b)),
        [n, k],
        params,
        DType::BF16,
    )
    .unwrap()
}

/// Timing probe for a real GPU (`--ignored --nocapture`): qmv at decode shapes against the
/// measured read bandwidth, and qmm/matmul at a prefill shape.
#[test]
#[ignore]
fn timing_probe() {
    let g = gpu();
    println!("{} ({})", g.caps().adapter_name, g.caps().backend);
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let time = |f: &dyn Fn(&mut Pass)| {
        let mut pass = g.begin().with_profiling(true);
        for _ in 0..25 {
            f(&mut pass);
        }
        let t = pass.commit_and_wait().unwrap();
        median(t.iter().skip(5).map(|k| k.nanos).collect())
    };
    let words = 32usize << 20;
    let src = MlxBuffer::new(g, DType::U32, &[words]).unwrap();
    let sink = MlxBuffer::new(g, DType::U32, &[65536]).unwrap();
    let ns = time(&|p| crate::ops::bandwidth::read_probe(p, &src, &sink, 65535).unwrap());
    let roof = (words * 4) as f64 / ns;
    println!("read_probe: {roof:.0} GB/s");
    let mut rng = Rng::new(99);
    for &(n, k, bits, gs) in &[
        (4096usize, 4096usize, 4u32, 64u32),
        (14336, 4096, 4, 64),
        (4096, 14336, 4, 64),
        (4096, 4096, 8, 64),
        (4096, 4096, 3, 64),
        (4096, 4096, 6, 64),
    ] {
        let w = random_bf16_weight(g, &mut rng, n, k, QuantParams::affine(bits, gs));
        let bytes = (n * k * bits as usize / 8 + n * k / gs as usize * 4) as f64;
        for m in [1usize, 4, 8] {
            let x = MlxBuffer::from_slice(g, &rng.normals(m * k, 1.0), &[m, k]).unwrap();
            let ns = time(&|p| {
                qmv(p, &x, &w).unwrap();
            });
            println!(
                "qmv b{bits} g{gs} M={m} {n}x{k} {:?}: {:.2} us, {:.0} GB/s ({:.0}% of read_probe)",
                plan(m, n, k, g.caps()),
                ns / 1e3,
                bytes / ns,
                100.0 * bytes / ns / roof
            );
        }
        if bits == 4 && n == 4096 && k == 4096 {
            let m = 512;
            let x = MlxBuffer::from_slice(g, &rng.normals(m * k, 1.0), &[m, k]).unwrap();
            let ns = time(&|p| {
                qmm(p, &x, &w).unwrap();
            });
            println!(
                "qmm {m}x{n}x{k} {:?}: {:.1} us, {:.1} TFLOP/s",
                matrix_plan(m, n, k, g.caps()),
                ns / 1e3,
                2.0 * (m * n * k) as f64 / ns / 1e3
            );
            let wd: Vec<half::bf16> = (0..n * k)
                .map(|_| half::bf16::from_f32(rng.normal() * 0.02))
                .collect();
            let wd = MlxBuffer::from_slice(g, &wd, &[n, k]).unwrap();
            let ns = time(&|p| {
                crate::ops::matmul(p, &x, &wd).unwrap();
            });
            println!(
                "matmul bf16 {m}x{n}x{k}: {:.1} us, {:.1} TFLOP/s",
                ns / 1e3,
                2.0 * (m * n * k) as f64 / ns / 1e3
            );
            let x1 = MlxBuffer::from_slice(g, &rng.normals(k, 1.0), &[1, k]).unwrap();
            let ns = time(&|p| {
                crate::ops::matmul(p, &x1, &wd).unwrap();
            });
            println!(
                "matvec bf16 1x{n}x{k}: {:.2} us, {:.0} GB/s",
                ns / 1e3,
                (n * k * 2) as f64 / ns
            );
        }
    }
}

/// Timing probe for a real GPU (`--ignored --nocapture`): the fused matvec variants against
/// the plain one at Llama-3.1-8B decode shapes, for each dispatch shape (rows per row-set).
/// Every variant is compiled first, then all are timed in turn for several rounds (the
/// minimum of each is printed): a GPU that idles between measurements clocks down, so
/// variants timed one after another in one long run are not comparable.
#[test]
#[ignore]
fn fused_timing_probe() {
    let g = gpu();
    println!("{} ({})", g.caps().adapter_name, g.caps().backend);
    let mut rng = Rng::new(98);
    let mut weights = Vec::new();
    for &(n, k, name) in &[
        (6144usize, 4096usize, "qkv"),
        (4096, 4096, "o"),
        (28672, 4096, "gate_up"),
        (4096, 14336, "down"),
    ] {
        let w = random_bf16_weight(g, &mut rng, n, k, QuantParams::affine(4, 64));
        let x = MlxBuffer::from_slice(g, &rng.normals(k, 1.0), &[1, k]).unwrap();
        let x2 = MlxBuffer::from_slice(g, &rng.normals(2 * k, 1.0), &[1, 2 * k]).unwrap();
        let nw = MlxBuffer::from_slice(g, &rng.normals(k, 1.0), &[k]).unwrap();
        let r = MlxBuffer::from_slice(g, &rng.normals(n, 1.0), &[1, n]).unwrap();
        weights.push((name, n, k, w, x, x2, nw, r));
    }
    // (label, shape index, rpt, variant); PROBE_CFGS="rpt,tpr,wg,xq;..." times those
    // shapes (plain matvecs only) instead of the default shape's fusions and x modes.
    let mut cases = Vec::new();
    let forced: Vec<QmvConfig> = std::env::var("PROBE_CFGS")
        .unwrap_or_default()
        .split(';')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            let v: Vec<u32> = t.split(',').map(|f| f.trim().parse().unwrap()).collect();
            QmvConfig {
                rpt: v[0],
                tpr: v[1],
                wg: v[2],
                exp: 0,
                xq: v[3],
            }
        })
        .collect();
    for (wi, (_, n, k, ..)) in weights.iter().enumerate() {
        let base = qmv_config(*n, *k);
        if !forced.is_empty() {
            cases.extend(forced.iter().map(|&c| (wi, c, 0)));
            continue;
        }
        // The default shape with each x quantization (the default's first).
        for xq in [base.xq, 0, 1] {
            for variant in [0, 3] {
                cases.push((wi, QmvConfig { xq, ..base }, variant));
            }
        }
    }
    let run = |p: &mut Pass, &(wi, _, variant): &(usize, QmvConfig, usize)| {
        let (_, _, _, w, x, x2, nw, r) = &weights[wi];
        let f = match variant {
            0 => QmvFusion::default(),
            1 => QmvFusion {
                norm: Some((nw, 1e-5)),
                ..QmvFusion::default()
            },
            2 => QmvFusion {
                residual: Some(r),
                ..QmvFusion::default()
            },
            _ => QmvFusion {
                glu: Some(Act::Silu),
                residual: Some(r),
                ..QmvFusion::default()
            },
        };
        let xin = if f.glu.is_some() { x2 } else { x };
        qmv_fused(p, xin, w, &f).unwrap();
    };
    let mut best = vec![f64::INFINITY; cases.len()];
    for round in 0..6 {
        for (ci, c) in cases.iter().enumerate() {
            set_qmv_override(Some(c.1)).unwrap();
            let mut pass = g.begin().with_pass_timing(true);
            for _ in 0..100 {
                run(&mut pass, c);
            }
            let t = pass.commit_and_wait().unwrap();
            if round > 0 {
                let us = t.iter().map(|k| k.nanos).sum::<f64>() / 100.0 / 1e3;
                best[ci] = best[ci].min(us);
            }
        }
    }
    set_qmv_override(None).unwrap();
    let names = ["plain", "norm", "residual", "glu+residual"];
    for (ci, &(wi, cfg, variant)) in cases.iter().enumerate() {
        let (name, n, k, ..) = &weights[wi];
        println!(
            "{name} {n}x{k} rpt {} tpr {} wg {} xq {} {:>12}: {:.2} us (min of 5 rounds, 100 in a pass)",
            cfg.rpt, cfg.tpr, cfg.wg, cfg.xq, names[variant], best[ci]
        );
    }
}

/// The shapes the quantized-x rule picks (`xsrc_config`) on matrices shaped to reach each:
/// an LM head (N >= 65536: 8 rows x 32), a tall matrix with warps enough at 32 invocations a
/// row-set (4 x 32), a shorter one that needs 64 (4 x 64), and one that reaches them at no
/// width (the widest its K allows: 4 x 128). Each against the f64 product,
/// 1 and 3 rows of x, poisoned allocations, both reduction paths.
#[test]
fn qmv_xq_in_the_rule_shapes_matches_f64() {
    let mut rng = Rng::new(71);
    for g in &poisoned_devices() {
        for (n, k, want) in [
            (65_600, 64, (8, 32)),
            (6144, 128, (4, 32)),
            (3072, 2048, (4, 64)),
            (512, 4096, (4, 128)),
        ] {
            let c = xsrc_config(n, k, false);
            assert_eq!((c.rpt, c.tpr, c.wg), (want.0, want.1, 128), "{n}x{k}");
            // With subgroups of 16 or more only the LM head changes.
            let c = xsrc_config(n, k, true);
            let narrow = if n >= 65536 { XSRC_HEAD_NARROW } else { want };
            assert_eq!((c.rpt, c.tpr, c.wg), (narrow.0, narrow.1, 128), "{n}x{k}");
            let params = QuantParams::affine(4, 64);
            let (w, form, wref, sq) = xq_weight(g, &mut rng, (n, k), params, DType::BF16);
            for m in [1, 3] {
                let x = rng.normals(m * k, 1.5);
                let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
                let mut pass = g.begin();
                let xq = quantize_x(&mut pass, &gx, form).unwrap();
                let y = qmv_xq(&mut pass, &xq, &w, None).unwrap();
                pass.commit_and_wait().unwrap();
                let got: Vec<f32> = y.to_vec(g).unwrap();
                let what = format!("{m}x{n}x{k} sg={}", g.caps().subgroups);
                check_qmv(&got, &x, &wref, &sq, [m, n, k], form.xq, &what);
            }
        }
    }
}

/// A random `n x k` weight on `g`, its quantized-x form, its f64 values and their code part
/// (`code_part`), for tests of matvecs of quantized x.
fn xq_weight(
    g: &MlxDevice,
    rng: &mut Rng,
    (n, k): (usize, usize),
    params: QuantParams,
    dt: DType,
) -> (QuantWeight, XqForm, Vec<f64>, Vec<f64>) {
    let q = quant(rng, n, k, params, dt);
    let w = QuantWeight::upload(g, &q).unwrap();
    let form = XqForm::of(&w).unwrap();
    let wref = reference(&q);
    let sq = code_part(&q, &wref);
    (w, form, wref, sq)
}

/// Row-sets narrower than 32 invocations (8 and 16: segments of a subgroup, summed by
/// shuffles where every subgroup is at least that wide, else through workgroup memory), f32
/// x and quantized x, several rows of x, a partial last workgroup and invocations walking
/// several chunks, against the f64 product. On lavapipe (subgroups of 8) the 8-wide sets take
/// the shuffle path and the 16-wide ones the workgroup-memory path.
#[test]
fn narrow_row_sets_match_f64() {
    let mut rng = Rng::new(73);
    let params = QuantParams::affine(4, 64);
    for g in &poisoned_devices() {
        for (n, k) in [(37, 576), (300, 2048)] {
            let (w, form, wref, sq) = xq_weight(g, &mut rng, (n, k), params, DType::BF16);
            // More rows than invocations a row-set: no invocation would sum the extra rows.
            let wide = QmvConfig {
                rpt: 16,
                tpr: 8,
                wg: 64,
                exp: 0,
                xq: QMV_DEFAULT_XQ,
            };
            let mut pass = g.begin();
            assert!(qmv_with(
                &mut pass,
                &MlxBuffer::from_slice(g, &vec![1.0f32; k], &[1, k]).unwrap(),
                &w,
                wide
            )
            .is_err());
            drop(pass);
            for (rpt, tpr, wg) in [
                (1, 8, 64),
                (2, 8, 64),
                (4, 16, 128),
                (8, 16, 128),
                (16, 16, 128),
            ] {
                let cfg = QmvConfig {
                    rpt,
                    tpr,
                    wg,
                    exp: 0,
                    xq: QMV_DEFAULT_XQ,
                };
                for m in [1, 3] {
                    let x = rng.normals(m * k, 1.5);
                    let gx = MlxBuffer::from_slice(g, &x, &[m, k]).unwrap();
                    let mut pass = g.begin();
                    let xq = quantize_x(&mut pass, &gx, form).unwrap();
                    let yq = qmv_xq_with(&mut pass, &xq, &w, cfg).unwrap();
                    let yf = qmv_with(&mut pass, &gx, &w, cfg).unwrap();
                    pass.commit_and_wait().unwrap();
                    let what = format!("{m}x{n}x{k} rpt {rpt} tpr {tpr} sg={}", g.caps().subgroups);
                    let got: Vec<f32> = yq.to_vec(g).unwrap();
                    check_qmv(
                        &got,
                        &x,
                        &wref,
                        &sq,
                        [m, n, k],
                        form.xq,
                        &format!("{what} xq"),
                    );
                    let got: Vec<f32> = yf.to_vec(g).unwrap();
                    check_qmv(
                        &got,
                        &x,
                        &wref,
                        &sq,
                        [m, n, k],
                        cfg.xq,
                        &format!("{what} f32 x"),
                    );
                }
            }
        }
    }
}

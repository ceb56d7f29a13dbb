#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Tests of `ops::moe` against f64 references written here: routing in f64, experts
//! dequantized on the CPU (`weights::quant`, bit-exact with MLX; `weights::ggml`, the GGML
//! oracle), products in f64.
//!
//! Tolerances:
//! - router weights: f32 softmax / sigmoid (exp and division a few ulp each) and a sum of
//!   <= 16 terms: 1e-5 relative plus 1e-7 absolute. Ids are compared exactly; inputs are
//!   random normals (no near-ties closer than f32 resolution) or exact ties.
//! - routed products: each output is a K-term f32 dot product (and, for MLX weights, one fma
//!   per weight against the CPU's two roundings): `(4·sqrt(K) + 2)·2^-24·Σ|x·w|`, the bound of
//!   `qmatmul_tests` (typical f32 summation error grows like sqrt(K)). A wrong expert or row
//!   moves an output by about Σ|x·w| / sqrt(K), far above it.
//! - moe_ffn: the down projection's inputs carry the gate/up errors through SiLU (Lipschitz
//!   ~1.1) times |up| plus |silu(gate)| times the up error; bounded with the same per-product
//!   rule applied to a magnitude reference (Σ|x|·|w| propagated through the layer), times 4.
//! - the decode matvec (`gqmv`) of 4- and 8-bit affine experts represents x as 16-bit
//!   integers per 32-element chunk (`ops::qmatmul`): within amax_c/65024 per element of chunk
//!   c, multiplying scale·q = w - bias only, so `Σ_c amax_c/65024 · Σ_{l∈c}|w_l - bias_l|`
//!   more (`xq_bound`); in moe_ffn propagated like the other errors.
use super::*;
use crate::ops::qmatmul::tests::{code_part, xq_tolerance};
use crate::ops::qmatmul::XqForm;
use crate::testutil::{devices, gpu, Rng};
use crate::weights::ggml::dequantize as ggml_dequantize;
use crate::weights::ggml_weight::tests::random_tensor;
use crate::weights::quant::{dequantize as cpu_dequantize, quantize_as, round_to_dtype, Quantized};

// ---------------------------------------------------------------------------------------
// references

/// (ids, weights) per token in f64: the routing of `RouterKind` written out.
fn ref_route(
    logits: &[f32],
    e: usize,
    k: usize,
    kind: u32,
    norm: bool,
    table: &[f32],
    scale: f64,
) -> (Vec<u32>, Vec<f64>) {
    let mut ids = Vec::new();
    let mut ws = Vec::new();
    for row in logits.chunks(e) {
        let l: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let (prob, key): (Vec<f64>, Vec<f64>) = if kind == 2 {
            let s: Vec<f64> = l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let key = s.iter().zip(table).map(|(a, &b)| a + b as f64).collect();
            (s, key)
        } else {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = ex.iter().sum();
            (ex.iter().map(|v| v / z).collect(), l.clone())
        };
        let mut order: Vec<usize> = (0..e).collect();
        // descending key, then ascending index
        order.sort_by(|&a, &b| key[b].partial_cmp(&key[a]).unwrap().then(a.cmp(&b)));
        let pick = &order[..k];
        let sum: f64 = pick.iter().map(|&i| prob[i]).sum();
        for &i in pick {
            let mut w = prob[i];
            if norm {
                w /= sum;
            }
            if kind == 1 {
                w *= table[i] as f64;
            }
            if kind == 2 {
                w *= scale;
            }
            ids.push(i as u32);
            ws.push(w);
        }
    }
    (ids, ws)
}

/// y[p, n] = x[p / x_div] · W[ids[p]][n] and Σ|x·w| for the tolerance. `w`: [E, N, K].
fn ref_gather(
    x: &[f32],
    w: &[f64],
    ids: &[u32],
    x_div: usize,
    n: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let e = w.len() / (n * k);
    let mut y = Vec::new();
    let mut mag = Vec::new();
    for (p, &id) in ids.iter().enumerate() {
        let xr = &x[(p / x_div) * k..(p / x_div + 1) * k];
        for j in 0..n {
            if id as usize >= e {
                y.push(0.0);
                mag.push(0.0);
                continue;
            }
            let wr = &w[(id as usize * n + j) * k..][..k];
            let (mut s, mut a) = (0.0, 0.0);
            for (xv, wv) in xr.iter().zip(wr) {
                s += *xv as f64 * wv;
                a += (*xv as f64 * wv).abs();
            }
            y.push(s);
            mag.push(a);
        }
    }
    (y, mag)
}

/// Per output of a routed product, the bound of the 16-bit x quantization
/// (`qmatmul_tests::xq_tolerance` on the pair's x row and its expert's weight row; `sq`:
/// |w - bias| per element, [E, N, K]).
fn xq_bound(x: &[f32], sq: &[f64], ids: &[u32], x_div: usize, n: usize, k: usize) -> Vec<f64> {
    let e = sq.len() / (n * k);
    let tol = xq_tolerance(x, sq, k, 2);
    let mut out = Vec::new();
    for (p, &id) in ids.iter().enumerate() {
        for j in 0..n {
            let valid = (id as usize) < e;
            out.push(if valid {
                tol(p / x_div, id as usize * n + j)
            } else {
                0.0
            });
        }
    }
    out
}

/// |scale·q| = |w - bias| per element of the experts (`deq` from `quant_experts`).
fn code_parts(qs: &[Quantized], deq: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(deq.len());
    for q in qs {
        let at = out.len();
        out.extend(code_part(q, &deq[at..at + q.rows * q.cols]));
    }
    out
}

/// Whether the decode matvec quantizes x for these experts.
fn int_x(params: QuantParams) -> bool {
    crate::ops::qmatmul::default_xq(params) != 0
}

fn assert_product(got: &[f32], want: &(Vec<f64>, Vec<f64>), k: usize, factor: f64, what: &str) {
    assert_product_with(got, want, k, factor, &[], what);
}

/// [`assert_product`] with `extra[i]` added to element i's tolerance (empty: none).
fn assert_product_with(
    got: &[f32],
    want: &(Vec<f64>, Vec<f64>),
    k: usize,
    factor: f64,
    extra: &[f64],
    what: &str,
) {
    assert_eq!(got.len(), want.0.len(), "{what}: length");
    let f = factor * (4.0 * (k as f64).sqrt() + 2.0) * 2f64.powi(-24);
    for (i, (&g, (&w, &m))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
        let tol = f * m + extra.get(i).copied().unwrap_or(0.0) + 1e-30;
        assert!(
            g.is_finite() && (g as f64 - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tol {tol:e})"
        );
    }
}

fn quant_experts(
    rng: &mut Rng,
    e: usize,
    n: usize,
    k: usize,
    params: QuantParams,
    dt: DType,
) -> (Vec<Quantized>, Vec<f64>) {
    let mut qs = Vec::new();
    let mut deq = Vec::new();
    for _ in 0..e {
        let w: Vec<f32> = rng
            .normals(n * k, 0.3)
            .into_iter()
            .map(|v| round_to_dtype(v, dt).unwrap())
            .collect();
        let q = quantize_as(&w, n, k, params, dt).unwrap();
        let d = cpu_dequantize(
            &q.packed,
            q.scales.as_view(),
            q.biases.as_deref(),
            n,
            k,
            params,
        )
        .unwrap();
        deq.extend(d.into_iter().map(f64::from));
        qs.push(q);
    }
    (qs, deq)
}

/// Quantized experts and their f64 dequantization (`quant_experts`).
type HostExperts = (Vec<Quantized>, Vec<f64>);

/// MLX experts of `params` in `dt` (gate and up `[E, I, H]`, down `[E, H, I]`) with gate
/// and up stacked, and the gate's and up's quantized experts with their f64 dequantization.
fn stacked_experts(
    g: &MlxDevice,
    rng: &mut Rng,
    [e, i, h]: [usize; 3],
    params: QuantParams,
    dt: DType,
) -> (MoeExperts, [HostExperts; 2]) {
    let gate = quant_experts(rng, e, i, h, params, dt);
    let upq = quant_experts(rng, e, i, h, params, dt);
    let (dq, _) = quant_experts(rng, e, h, i, params, dt);
    let up = |q| ExpertWeight::Mlx(QuantExperts::upload(g, q).unwrap());
    let experts = MoeExperts {
        gate: up(&gate.0),
        up: up(&upq.0),
        down: up(&dq),
        gate_up: None,
    }
    .stack_gate_up(g)
    .unwrap();
    (experts, [gate, upq])
}

fn random_ids(rng: &mut Rng, t: usize, k: usize, e: usize) -> Vec<u32> {
    // Distinct experts per token, as a router gives.
    let mut v = Vec::new();
    for _ in 0..t {
        let mut row: Vec<u32> = Vec::new();
        while row.len() < k {
            let c = rng.below(e) as u32;
            if !row.contains(&c) {
                row.push(c);
            }
        }
        v.extend(row);
    }
    v
}

// ---------------------------------------------------------------------------------------
// router

#[allow(clippy::too_many_arguments)]
fn run_route(
    g: &MlxDevice,
    logits: &[f32],
    e: usize,
    k: usize,
    kind: u32,
    norm: bool,
    table: &[f32],
    scale: f32,
) -> (Vec<u32>, Vec<f32>) {
    let t = logits.len() / e;
    let gl = MlxBuffer::from_slice(g, logits, &[t, e]).unwrap();
    let gt = MlxBuffer::from_slice(g, table, &[table.len()]).unwrap();
    let kind = match kind {
        0 => RouterKind::SoftmaxTopK {
            norm_topk_prob: norm,
        },
        1 => RouterKind::SoftmaxTopKScaled {
            per_expert_scale: &gt,
        },
        _ => RouterKind::SigmoidBiased {
            bias: &gt,
            routed_scaling_factor: scale,
        },
    };
    let mut pass = g.begin();
    let (w, ids) = moe_route(&mut pass, &gl, &RouterConfig { top_k: k, kind }).unwrap();
    pass.commit_and_wait().unwrap();
    assert_eq!(w.shape(), [t, k]);
    (ids.to_vec(g).unwrap(), w.to_vec(g).unwrap())
}

#[test]
fn router_variants_match_f64() {
    let mut rng = Rng::new(900);
    // Both reductions: subgroups, and the workgroup-memory tree (the fallback device).
    for g in devices() {
        for &(t, e, k) in &[
            (3, 8, 2),
            (5, 128, 8),
            (2, 256, 16),
            (4, 60, 1),
            (1, 16, 16),
            (3, 13, 5),
        ] {
            let logits = rng.normals(t * e, 2.0);
            let scales: Vec<f32> = (0..e).map(|_| rng.uniform(0.5, 2.0)).collect();
            let bias = rng.normals(e, 0.5);
            for (kind, norm, table, scale) in [
                (0u32, true, &scales, 1.0f32),
                (0, false, &scales, 1.0),
                (1, true, &scales, 1.0),
                (2, true, &bias, 2.5),
            ] {
                let (ids, w) = run_route(g, &logits, e, k, kind, norm, table, scale);
                let (rids, rw) = ref_route(&logits, e, k, kind, norm, table, scale as f64);
                let what = format!(
                    "route kind {kind} norm {norm} t{t} e{e} k{k} sg={}",
                    g.caps().subgroups
                );
                assert_eq!(ids, rids, "{what}: ids");
                crate::testutil::assert_close(&w, &rw, 1e-7, 1e-5, &what);
            }
        }
    }
}

#[test]
fn router_ties_pick_the_lowest_index() {
    let g = gpu();
    // All equal: experts 0..k in order. Pairs of equal values: the lower index first.
    let e = 12;
    let flat = vec![0.25f32; e];
    let (ids, w) = run_route(g, &flat, e, 5, 0, true, &[0.0; 12], 1.0);
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    assert!(w.iter().all(|&v| (v - 0.2).abs() < 1e-6), "{w:?}");
    let l = [
        1.0f32, 3.0, 2.0, 3.0, 1.0, 2.0, 0.0, 3.0, -1.0, 0.5, 2.0, 0.0,
    ];
    let (ids, _) = run_route(g, &l, e, 7, 0, false, &[0.0; 12], 1.0);
    assert_eq!(ids, [1, 3, 7, 2, 5, 10, 0]);
    // Sigmoid with a bias that makes ties in the selection key.
    let l = [0.0f32; 4];
    let bias = [0.5f32, 1.0, 1.0, 0.5];
    let (ids, w) = run_route(g, &l, 4, 3, 2, true, &bias, 1.0);
    assert_eq!(ids, [1, 2, 0]);
    assert!(w.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6), "{w:?}");
}

#[test]
fn router_rejects_bad_configs() {
    let g = gpu();
    let l = MlxBuffer::from_slice(g, &[0.0f32; 16], &[2, 8]).unwrap();
    let s3 = MlxBuffer::from_slice(g, &[1.0f32; 3], &[3]).unwrap();
    let big = MlxBuffer::from_slice(g, &vec![0.0f32; 300], &[1, 300]).unwrap();
    let mut pass = g.begin();
    let soft = RouterKind::SoftmaxTopK {
        norm_topk_prob: true,
    };
    let mut err = |x: &MlxBuffer, top_k, kind| {
        moe_route(&mut pass, x, &RouterConfig { top_k, kind })
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&l, 9, soft),
        "moe_route: top_k = 9 exceeds the 8 experts"
    );
    assert_eq!(err(&l, 17, soft), "moe_route: top_k = 17, expected 1..=16");
    assert_eq!(err(&l, 0, soft), "moe_route: top_k = 0, expected 1..=16");
    assert_eq!(
        err(&big, 2, soft),
        "moe_route: logits has 300 experts, at most 256"
    );
    assert_eq!(
        err(
            &l,
            2,
            RouterKind::SoftmaxTopKScaled {
                per_expert_scale: &s3
            }
        ),
        "moe_route: per_expert_scale has 3 elements, expected 8"
    );
}

// ---------------------------------------------------------------------------------------
// gather_qmm

#[allow(clippy::too_many_arguments)]
fn gather_case(
    g: &MlxDevice,
    rng: &mut Rng,
    (t, k, e, n, kd): (usize, usize, usize, usize, usize),
    params: QuantParams,
    dt: DType,
    per_pair_x: bool,
    x_offset: usize,
    bad_ids: bool,
) {
    let (qs, deq) = quant_experts(rng, e, n, kd, params, dt);
    let w = QuantExperts::upload(g, &qs).unwrap();
    assert_eq!(w.shape(), [e, n, kd]);
    let rows = if per_pair_x { t * k } else { t };
    let x = rng.normals(rows * kd, 1.0);
    let mut padded = vec![5.0f32; x_offset];
    padded.extend_from_slice(&x);
    let buf = MlxBuffer::from_slice(g, &padded, &[padded.len()]).unwrap();
    let xshape: Vec<usize> = if per_pair_x {
        vec![t, k, kd]
    } else {
        vec![t, kd]
    };
    let gx = buf.view(x_offset, &xshape).unwrap();
    let mut ids = random_ids(rng, t, k, e);
    if bad_ids {
        ids[0] = e as u32;
        let l = ids.len();
        ids[l - 1] = u32::MAX;
    }
    let gids = MlxBuffer::from_slice(g, &ids, &[t, k]).unwrap();
    let x_div = if per_pair_x { 1 } else { k };
    let want = ref_gather(&x, &deq, &ids, x_div, n, kd);
    let xq = xq_bound(&x, &code_parts(&qs, &deq), &ids, x_div, n, kd);
    for path in [GatherPath::Vector, GatherPath::Sorted] {
        let mut pass = g.begin();
        let y = gather_qmm_with(&mut pass, &gx, &w, &gids, path).unwrap();
        pass.commit_and_wait().unwrap();
        assert_eq!(y.shape(), [t, k, n]);
        let what = format!(
            "gather {path:?} b{} g{} {dt} t{t} k{k} e{e} n{n} K{kd} pair_x {per_pair_x} sg {}",
            params.bits,
            params.group_size,
            g.caps().subgroups
        );
        // The cooperative-matrix prefill rounds x and W to f16: 2·2^-11 per term.
        let coop16 = path == GatherPath::Sorted
            && plan(t * k, n, kd, g.caps()) == (MatmulPlan::Coop { tile: 16 });
        let coop_tol: Vec<f64> = want.1.iter().map(|m| 2f64.powi(-10) * m).collect();
        let extra: &[f64] = if path == GatherPath::Vector && int_x(params) {
            &xq
        } else if coop16 {
            &coop_tol
        } else {
            &[]
        };
        assert_product_with(&y.to_vec(g).unwrap(), &want, kd, 1.0, extra, &what);
    }
}

#[test]
fn gather_qmm_decode_matches_f64() {
    let mut rng = Rng::new(901);
    for g in devices() {
        // Qwen3-style decode: one token, 8 of 32 experts.
        gather_case(
            g,
            &mut rng,
            (1, 8, 32, 96, 256),
            QuantParams::affine(4, 64),
            DType::F32,
            false,
            0,
            false,
        );
        gather_case(
            g,
            &mut rng,
            (1, 8, 32, 40, 256),
            QuantParams::affine(8, 64),
            DType::BF16,
            false,
            0,
            false,
        );
        // The down projection: one x row per pair; x at an odd offset.
        gather_case(
            g,
            &mut rng,
            (2, 4, 8, 33, 128),
            QuantParams::affine(4, 64),
            DType::F16,
            true,
            3,
            false,
        );
        gather_case(
            g,
            &mut rng,
            (1, 2, 4, 16, 128),
            QuantParams::affine(3, 32),
            DType::F32,
            false,
            0,
            false,
        );
        gather_case(
            g,
            &mut rng,
            (1, 3, 5, 16, 64),
            QuantParams::mxfp4(),
            DType::BF16,
            false,
            0,
            false,
        );
    }
}

#[test]
fn gather_qmm_prefill_matches_f64() {
    let mut rng = Rng::new(902);
    let g = gpu();
    gather_case(
        g,
        &mut rng,
        (33, 4, 8, 80, 128),
        QuantParams::affine(4, 64),
        DType::F32,
        false,
        0,
        false,
    );
    gather_case(
        g,
        &mut rng,
        (33, 4, 8, 70, 128),
        QuantParams::affine(8, 64),
        DType::BF16,
        false,
        0,
        false,
    );
    // The cooperative path (where the device has it) over several 128-row blocks of W, with
    // 3-bit codes (word-by-word loads) and mxfp4.
    gather_case(
        g,
        &mut rng,
        (33, 4, 8, 300, 128),
        QuantParams::affine(4, 64),
        DType::BF16,
        false,
        0,
        false,
    );
    gather_case(
        g,
        &mut rng,
        (20, 2, 4, 200, 96),
        QuantParams::affine(3, 32),
        DType::F16,
        false,
        0,
        false,
    );
    gather_case(
        g,
        &mut rng,
        (20, 2, 4, 140, 64),
        QuantParams::mxfp4(),
        DType::BF16,
        false,
        0,
        false,
    );
    // > 64 pairs of one expert (several tiles per run), per-pair x.
    gather_case(
        g,
        &mut rng,
        (40, 2, 3, 65, 64),
        QuantParams::affine(4, 64),
        DType::F32,
        true,
        1,
        false,
    );
}

#[test]
fn out_of_range_ids_give_zero_rows_and_read_nothing_else() {
    let mut rng = Rng::new(903);
    let g = gpu();
    gather_case(
        g,
        &mut rng,
        (3, 4, 8, 40, 128),
        QuantParams::affine(4, 64),
        DType::F32,
        false,
        0,
        true,
    );
    gather_case(
        g,
        &mut rng,
        (12, 2, 5, 20, 64),
        QuantParams::affine(8, 32),
        DType::F32,
        false,
        0,
        true,
    );
}

// ---------------------------------------------------------------------------------------
// GGML

fn ggml_case(
    g: &MlxDevice,
    rng: &mut Rng,
    kind: GgmlType,
    (t, k, e, n, kd): (usize, usize, usize, usize, usize),
    limit: Option<u64>,
    bad: bool,
) {
    let bytes = random_tensor(rng, kind, e * n, kd);
    let deq: Vec<f64> = ggml_dequantize(kind, &bytes, e * n * kd)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let w = match limit {
        Some(l) => GgmlExperts::upload_with_limit(g, kind, [e, n, kd], &bytes, l).unwrap(),
        None => GgmlExperts::upload(g, kind, [e, n, kd], &bytes).unwrap(),
    };
    if limit.is_some() {
        assert!(w.shards().len() > 1, "{kind}: sharded");
    }
    let x = rng.normals(t * kd, 1.0);
    let gx = MlxBuffer::from_slice(g, &x, &[t, kd]).unwrap();
    let mut ids = random_ids(rng, t, k, e);
    if bad {
        ids[1] = e as u32 + 3;
    }
    let gids = MlxBuffer::from_slice(g, &ids, &[t, k]).unwrap();
    let mut pass = g.begin();
    let y = ggml_gather_matvec(&mut pass, &gx, &w, &gids).unwrap();
    pass.commit_and_wait().unwrap();
    let what = format!(
        "ggml {kind} t{t} k{k} e{e} n{n} K{kd} shards {} sg {}",
        w.shards().len(),
        g.caps().subgroups
    );
    assert_product(
        &y.to_vec(g).unwrap(),
        &ref_gather(&x, &deq, &ids, k, n, kd),
        kd,
        1.0,
        &what,
    );
}

#[test]
fn ggml_routed_matvec_matches_f64() {
    let mut rng = Rng::new(904);
    for g in devices() {
        for kind in [
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            ggml_case(g, &mut rng, kind, (1, 8, 16, 24, 512), None, false);
            ggml_case(g, &mut rng, kind, (5, 2, 6, 7, 256), None, true);
        }
    }
    let g = gpu();
    let mut rng = Rng::new(905);
    // Shards of two experts: 5 experts of [3, 256] Q4_K are 3 * 144 bytes each.
    ggml_case(
        g,
        &mut rng,
        GgmlType::Q4_K,
        (3, 3, 5, 3, 256),
        Some(2 * 3 * 144 + 4),
        true,
    );
    ggml_case(
        g,
        &mut rng,
        GgmlType::Q8_0,
        (2, 2, 5, 3, 256),
        Some(2 * 3 * 272),
        false,
    );
    ggml_case(g, &mut rng, GgmlType::F16, (2, 2, 3, 5, 77), None, false);
    // 33 * 8 * 256 = 67,584 workgroups: a folded grid.
    ggml_case(
        g,
        &mut rng,
        GgmlType::Q4_0,
        (33, 8, 16, 256, 64),
        None,
        false,
    );
}

// ---------------------------------------------------------------------------------------
// combine, layer

#[test]
fn combine_weights_slots_and_adds_shared() {
    let mut rng = Rng::new(906);
    let g = gpu();
    let (t, k, h) = (3, 5, 70);
    let y = rng.normals(t * k * h, 1.0);
    let w = rng.normals(t * k, 1.0);
    let s = rng.normals(t * h, 1.0);
    let gy = MlxBuffer::from_slice(g, &y, &[t, k, h]).unwrap();
    let gw = MlxBuffer::from_slice(g, &w, &[t, k]).unwrap();
    let gs = MlxBuffer::from_slice(g, &s, &[t, h]).unwrap();
    for shared in [false, true] {
        let mut pass = g.begin();
        let out = moe_combine(&mut pass, &gy, &gw, shared.then_some(&gs)).unwrap();
        pass.commit_and_wait().unwrap();
        let mut want = vec![0.0f64; t * h];
        for ti in 0..t {
            for c in 0..h {
                let mut v = if shared { s[ti * h + c] as f64 } else { 0.0 };
                for j in 0..k {
                    v += w[ti * k + j] as f64 * y[(ti * k + j) * h + c] as f64;
                }
                want[ti * h + c] = v;
            }
        }
        // k + 1 f32 terms of size ~1: 1e-5 absolute.
        crate::testutil::assert_close(&out.to_vec(g).unwrap(), &want, 1e-5, 1e-6, "combine");
    }
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// The whole layer in f64 from routed weights/ids (computed by `ref_route`), with a
/// magnitude bound per output for the tolerance.
#[allow(clippy::too_many_arguments)]
fn ref_ffn(
    x: &[f32],
    ids: &[u32],
    rw: &[f64],
    gate: &[f64],
    up: &[f64],
    down: &[f64],
    t: usize,
    k: usize,
    h: usize,
    i: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (gy, gm) = ref_gather(x, gate, ids, k, i, h);
    let (uy, um) = ref_gather(x, up, ids, k, i, h);
    let a: Vec<f64> = gy.iter().zip(&uy).map(|(&g, &u)| silu(g) * u).collect();
    // |d act| <= 1.1·|dg|·|u| + |silu(g)|·|du|, with |dg| <~ gm, |du| <~ um (scaled later)
    let am: Vec<f64> = (0..a.len())
        .map(|j| 1.1 * gm[j] * uy[j].abs() + silu(gy[j]).abs() * um[j] + a[j].abs())
        .collect();
    let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
    let am32: Vec<f32> = am.iter().map(|&v| v as f32).collect();
    let (dy, _) = ref_gather(&a32, down, ids, 1, h, i);
    let dabs: Vec<f64> = down.iter().map(|v| v.abs()).collect();
    let (dm, _) = ref_gather(&am32, &dabs, ids, 1, h, i);
    let mut out = vec![0.0; t * h];
    let mut mag = vec![0.0; t * h];
    for ti in 0..t {
        for j in 0..k {
            let p = ti * k + j;
            for c in 0..h {
                out[ti * h + c] += rw[p] * dy[p * h + c];
                mag[ti * h + c] += rw[p].abs() * dm[p * h + c];
            }
        }
    }
    (out, mag)
}

/// The decode path's x-quantization bound (`xq_bound`) through the whole layer: gate and up
/// outputs move by their bounds, the GLU carries them (SiLU Lipschitz ~1.1) into the down
/// input, which down's full weights carry on, plus down's own quantization of its input;
/// weighted by the routing weights. `sq_*`: |w - bias| per element.
#[allow(clippy::too_many_arguments)]
fn ffn_xq_extra(
    x: &[f32],
    ids: &[u32],
    rw: &[f64],
    (gate, up, down): (&[f64], &[f64], &[f64]),
    (sq_g, sq_u, sq_d): (&[f64], &[f64], &[f64]),
    t: usize,
    k: usize,
    h: usize,
    i: usize,
) -> Vec<f64> {
    let (gy, _) = ref_gather(x, gate, ids, k, i, h);
    let (uy, _) = ref_gather(x, up, ids, k, i, h);
    let bg = xq_bound(x, sq_g, ids, k, i, h);
    let bu = xq_bound(x, sq_u, ids, k, i, h);
    let a32: Vec<f32> = gy
        .iter()
        .zip(&uy)
        .map(|(&g, &u)| (silu(g) * u) as f32)
        .collect();
    let da: Vec<f32> = (0..gy.len())
        .map(|j| (1.1 * bg[j] * (uy[j].abs() + bu[j]) + silu(gy[j]).abs() * bu[j]) as f32)
        .collect();
    let dabs: Vec<f64> = down.iter().map(|v| v.abs()).collect();
    let (prop, _) = ref_gather(&da, &dabs, ids, 1, h, i);
    let own = xq_bound(&a32, sq_d, ids, 1, h, i);
    let mut out = vec![0.0; t * h];
    for ti in 0..t {
        for j in 0..k {
            let p = ti * k + j;
            for c in 0..h {
                out[ti * h + c] += rw[p].abs() * 1.01 * (prop[p * h + c] + own[p * h + c]);
            }
        }
    }
    out
}

#[test]
fn moe_ffn_layer_matches_f64_in_one_submit() {
    let mut rng = Rng::new(907);
    // Its own device: the submit counter must not see other tests' work.
    let dev = MlxDevice::with_options(crate::DeviceOptions {
        poison_allocations: true,
        ..crate::DeviceOptions::default()
    })
    .unwrap();
    let g = &dev;
    let (e, h, i) = (16, 128, 64);
    let params = QuantParams::affine(4, 32);
    let (gq, gd) = quant_experts(&mut rng, e, i, h, params, DType::F32);
    let (uq, ud) = quant_experts(&mut rng, e, i, h, params, DType::F32);
    let (dq, dd) = quant_experts(&mut rng, e, h, i, params, DType::F32);
    let sq = (
        code_parts(&gq, &gd),
        code_parts(&uq, &ud),
        code_parts(&dq, &dd),
    );
    let mlx_experts = || MoeExperts {
        gate: ExpertWeight::Mlx(QuantExperts::upload(g, &gq).unwrap()),
        up: ExpertWeight::Mlx(QuantExperts::upload(g, &uq).unwrap()),
        down: ExpertWeight::Mlx(QuantExperts::upload(g, &dq).unwrap()),
        gate_up: None,
    };
    let mlx = mlx_experts();
    // The same experts with gate and up stacked: decode routes both in one dispatch.
    let stacked = mlx_experts().stack_gate_up(g).unwrap();
    assert!(stacked.gate_up.is_some(), "these experts stack");
    // GGML Q8_0 experts (K = h or i, multiples of 32).
    let gb = random_tensor(&mut rng, GgmlType::Q8_0, e * i, h);
    let ub = random_tensor(&mut rng, GgmlType::Q8_0, e * i, h);
    let db = random_tensor(&mut rng, GgmlType::Q8_0, e * h, i);
    let deq = |b: &[u8], len| -> Vec<f64> {
        ggml_dequantize(GgmlType::Q8_0, b, len)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let ggml = MoeExperts {
        gate: ExpertWeight::Ggml(GgmlExperts::upload(g, GgmlType::Q8_0, [e, i, h], &gb).unwrap()),
        up: ExpertWeight::Ggml(GgmlExperts::upload(g, GgmlType::Q8_0, [e, i, h], &ub).unwrap()),
        down: ExpertWeight::Ggml(GgmlExperts::upload(g, GgmlType::Q8_0, [e, h, i], &db).unwrap()),
        gate_up: None,
    };
    let ggml_ref = (
        deq(&gb, e * i * h),
        deq(&ub, e * i * h),
        deq(&db, e * h * i),
    );
    for (name, experts, (wg, wu, wdn)) in [
        ("mlx", &mlx, (&gd, &ud, &dd)),
        ("mlx stacked", &stacked, (&gd, &ud, &dd)),
        ("ggml q8_0", &ggml, (&ggml_ref.0, &ggml_ref.1, &ggml_ref.2)),
    ] {
        for &(t, k) in &[(1usize, 4usize), (12, 2)] {
            let x = rng.normals(t * h, 1.0);
            let logits = rng.normals(t * e, 1.5);
            let shared = rng.normals(t * h, 1.0);
            let gx = MlxBuffer::from_slice(g, &x, &[t, h]).unwrap();
            let gl = MlxBuffer::from_slice(g, &logits, &[t, e]).unwrap();
            let gs = MlxBuffer::from_slice(g, &shared, &[t, h]).unwrap();
            let cfg = MoeConfig {
                router: RouterConfig {
                    top_k: k,
                    kind: RouterKind::SoftmaxTopK {
                        norm_topk_prob: true,
                    },
                },
                act: Act::Silu,
                glu_out: true,
            };
            let before = g.submit_and_map_counts();
            let mut pass = g.begin();
            let out = moe_ffn(&mut pass, &gx, &gl, experts, &cfg, Some(&gs)).unwrap();
            pass.commit_and_wait().unwrap();
            let after = g.submit_and_map_counts();
            assert_eq!(
                (after.0 - before.0, after.1 - before.1),
                (1, 0),
                "{name}: one submit, no maps for the whole layer"
            );
            let (ids, rw) = ref_route(&logits, e, k, 0, true, &[], 1.0);
            let (mut want, mag) = ref_ffn(&x, &ids, &rw, wg, wu, wdn, t, k, h, i);
            for (w, s) in want.iter_mut().zip(&shared) {
                *w += *s as f64;
            }
            let got = out.to_vec::<f32>(g).unwrap();
            let f = 4.0 * (4.0 * (h.max(i) as f64).sqrt() + 2.0) * 2f64.powi(-24);
            // One token decodes through gqmv, which quantizes x for these 4-bit experts.
            let mlx = name.starts_with("mlx");
            let extra = if mlx && t == 1 && int_x(params) {
                ffn_xq_extra(
                    &x,
                    &ids,
                    &rw,
                    (wg, wu, wdn),
                    (&sq.0, &sq.1, &sq.2),
                    t,
                    k,
                    h,
                    i,
                )
            } else {
                vec![0.0; t * h]
            };
            // Prefill of MLX experts on tensor cores rounds x, W and the GLU output to f16:
            // 2·2^-11 relative per matmul level, which `mag` propagates.
            let coop16 = mlx
                && gather_path(t) == GatherPath::Sorted
                && plan(t * k, i, h, g.caps()) == (MatmulPlan::Coop { tile: 16 });
            let coop = if coop16 { 2f64.powi(-10) } else { 0.0 };
            // Decode with x quantized by its producer (moe_ffn_xq): the same chunks, the
            // same bound.
            let mut outs = vec![("f32 x", got)];
            if let (1, Some((form, _))) = (t, experts_xq_form(experts)) {
                let mut pass = g.begin();
                let xq = qmatmul::quantize_x(&mut pass, &gx, form).unwrap();
                let out = moe_ffn_xq(&mut pass, &xq, &gl, experts, &cfg, Some(&gs)).unwrap();
                pass.commit_and_wait().unwrap();
                outs.push(("quantized x", out.to_vec::<f32>(g).unwrap()));
            }
            for (how, got) in outs {
                for (j, (&gv, (&wv, &m))) in got.iter().zip(want.iter().zip(&mag)).enumerate() {
                    let tol = (f + coop) * m + extra[j] + 1e-6;
                    assert!(
                        (gv as f64 - wv).abs() <= tol,
                        "{name} t{t} k{k} {how}: element {j}: got {gv}, want {wv} (tol {tol:e})"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// bad input

/// A device whose allocations are poisoned (an unwritten output fails), with or without
/// subgroups (both reduction paths).
fn poisoned(no_subgroups: bool) -> MlxDevice {
    MlxDevice::with_options(crate::DeviceOptions {
        poison_allocations: true,
        disable_subgroups: no_subgroups,
        ..crate::DeviceOptions::default()
    })
    .unwrap()
}

/// `gather_qmv_xq` over `quantize_x`'s chunks equals `gather_qmm` (whose decode kernel
/// quantizes x in-kernel) bit for bit, on both reduction paths, with outputs poisoned; 4-
/// and 8-bit experts, x as one row per token and one per pair. (`moe_ffn_xq` is held to f64
/// in `moe_ffn_layer_matches_f64_in_one_submit`.)
#[test]
fn gather_qmv_xq_equals_the_in_kernel_quantization() {
    let mut rng = Rng::new(911);
    for no_sg in [false, true] {
        let g = &poisoned(no_sg);
        let (e, n, kk, top) = (16, 96, 128, 4);
        for params in [QuantParams::affine(4, 32), QuantParams::affine(8, 64)] {
            let (wq, _) = quant_experts(&mut rng, e, n, kk, params, DType::BF16);
            let w = QuantExperts::upload(g, &wq).unwrap();
            let form = XqForm::of(w.weight()).unwrap();
            let ids = random_ids(&mut rng, 1, top, e);
            let gids = MlxBuffer::from_slice(g, &ids, &[1, top]).unwrap();
            for rows in [1, top] {
                let x = rng.normals(rows * kk, 1.0);
                let shape: &[usize] = if rows == 1 { &[1, kk] } else { &[1, top, kk] };
                let gx = MlxBuffer::from_slice(g, &x, shape).unwrap();
                let flat = gx.reshape(&[rows, kk]).unwrap();
                let mut pass = g.begin();
                let xq = qmatmul::quantize_x(&mut pass, &flat, form).unwrap();
                let direct = gather_qmm(&mut pass, &gx, &w, &gids).unwrap();
                let from_q = gather_qmv_xq(&mut pass, &xq, &w, &gids).unwrap();
                pass.commit_and_wait().unwrap();
                let d: Vec<f32> = direct.to_vec(g).unwrap();
                let q: Vec<f32> = from_q.to_vec(g).unwrap();
                let what = format!("b{} rows {rows} subgroups off {no_sg}", params.bits);
                assert_eq!(from_q.shape(), &[1, top, n], "{what}");
                assert!(d.iter().all(|v| v.is_finite()), "{what}");
                let same = d.iter().zip(&q).all(|(p, r)| p.to_bits() == r.to_bits());
                assert!(same, "{what}: differs from gather_qmm");
            }
        }
    }
}

/// The stacked gate|up matvec (`gather_qmv_xq_gate_up`, one dispatch over
/// `MoeExperts::gate_up`) equals `gather_qmv_xq` of gate and of up, each pair's gate row
/// then its up row, bit for bit: both reduction paths, poisoned outputs, 4- and 8-bit
/// experts, an id past the experts (rows of zeros), x as one row per token and per pair.
#[test]
fn stacked_gate_up_equals_the_two_matvecs() {
    let mut rng = Rng::new(913);
    for no_sg in [false, true] {
        let g = &poisoned(no_sg);
        let (e, i, h, top) = (8, 96, 128, 4);
        for params in [QuantParams::affine(4, 32), QuantParams::affine(8, 32)] {
            let (experts, _) = stacked_experts(g, &mut rng, [e, i, h], params, DType::BF16);
            let (ExpertWeight::Mlx(gw), ExpertWeight::Mlx(uw)) = (&experts.gate, &experts.up)
            else {
                panic!("MLX experts");
            };
            let form = XqForm::of(gw.weight()).unwrap();
            let mut ids = random_ids(&mut rng, 1, top, e);
            ids[1] = e as u32 + 3;
            let gids = MlxBuffer::from_slice(g, &ids, &[1, top]).unwrap();
            for rows in [1, top] {
                let x = rng.normals(rows * h, 1.0);
                let gx = MlxBuffer::from_slice(g, &x, &[rows, h]).unwrap();
                let mut pass = g.begin();
                let xq = qmatmul::quantize_x(&mut pass, &gx, form).unwrap();
                let gate = gather_qmv_xq(&mut pass, &xq, gw, &gids).unwrap();
                let upo = gather_qmv_xq(&mut pass, &xq, uw, &gids).unwrap();
                let gu = gather_qmv_xq_gate_up(&mut pass, &xq, &experts, &gids).unwrap();
                pass.commit_and_wait().unwrap();
                let what = format!("b{} rows {rows} subgroups off {no_sg}", params.bits);
                assert_eq!(gu.shape(), &[1, top, 2 * i], "{what}");
                let (a, b): (Vec<f32>, Vec<f32>) =
                    (gate.to_vec(g).unwrap(), upo.to_vec(g).unwrap());
                let c: Vec<f32> = gu.to_vec(g).unwrap();
                for p in 0..top {
                    let want = a[p * i..(p + 1) * i].iter().chain(&b[p * i..(p + 1) * i]);
                    let got = &c[p * 2 * i..(p + 1) * 2 * i];
                    let same = got
                        .iter()
                        .zip(want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{what}: pair {p} differs from the two matvecs");
                }
            }
        }
    }
}

/// `gather_qmv_xq_combine` adds Σ_j w_j · y_j into the accumulator, y the down experts'
/// products of `gather_qmv_xq` (held to f64 above) and the sum and add done here in f64:
/// tokens 1 and 2, top_k 2, 8 and 10 (more slots than the kernel's 8 row-blocks), an
/// expert id out of range (its slot adds nothing), 4- and 8-bit, N not a multiple of the
/// 4 rows a row-block, both reduction paths, poisoned allocations. Tolerance: the kernel
/// sums the same f32 partials in another order (weighted before the reduction): 1e-5 of
/// Σ_j |w_j·y_j| plus |acc|·2^-23.
#[test]
fn down_and_combine_in_one_dispatch_match_the_two() {
    let mut rng = Rng::new(917);
    for no_sg in [false, true] {
        let g = &poisoned(no_sg);
        let (e, n, k) = (12, 100, 128);
        for params in [QuantParams::affine(4, 32), QuantParams::affine(8, 64)] {
            let (dq, _) = quant_experts(&mut rng, e, n, k, params, DType::BF16);
            let w = QuantExperts::upload(g, &dq).unwrap();
            let form = XqForm::of(w.weight()).unwrap();
            for (t, top) in [(1, 2), (1, 8), (2, 10)] {
                let mut ids = random_ids(&mut rng, t, top, e);
                ids[1] = e as u32 + 5;
                let wts: Vec<f32> = (0..t * top).map(|_| rng.uniform(0.05, 1.0)).collect();
                let acc0 = rng.normals(t * n, 1.0);
                let x = rng.normals(t * top * k, 1.0);
                let gids = MlxBuffer::from_slice(g, &ids, &[t, top]).unwrap();
                let gw = MlxBuffer::from_slice(g, &wts, &[t, top]).unwrap();
                let gx = MlxBuffer::from_slice(g, &x, &[t * top, k]).unwrap();
                let acc = MlxBuffer::from_slice(g, &acc0, &[t, n]).unwrap();
                let mut pass = g.begin();
                let xq = qmatmul::quantize_x(&mut pass, &gx, form).unwrap();
                let y = gather_qmv_xq(&mut pass, &xq, &w, &gids).unwrap();
                gather_qmv_xq_combine(&mut pass, &xq, &w, (&gids, &gw), &acc).unwrap();
                pass.commit_and_wait().unwrap();
                let y: Vec<f32> = y.to_vec(g).unwrap();
                let got: Vec<f32> = acc.to_vec(g).unwrap();
                let what = format!("b{} T {t} top {top} subgroups off {no_sg}", params.bits);
                for ti in 0..t {
                    for ni in 0..n {
                        let (mut want, mut mag) = (f64::from(acc0[ti * n + ni]), 0.0);
                        for j in 0..top {
                            let p = ti * top + j;
                            let v = f64::from(wts[p]) * f64::from(y[p * n + ni]);
                            want += v;
                            mag += v.abs();
                        }
                        let o = got[ti * n + ni];
                        let tol = 1e-5 * mag + want.abs() * 2f64.powi(-23);
                        assert!(
                            (f64::from(o) - want).abs() <= tol,
                            "{what}: [{ti}, {ni}] {o} vs {want} (tol {tol})"
                        );
                    }
                }
            }
        }
    }
}

/// The fused down-and-combine names what it refuses: x a row per token, weights of another
/// shape, an accumulator of another width.
#[test]
fn down_and_combine_bad_inputs_are_named() {
    let g = gpu();
    let mut rng = Rng::new(918);
    let (dq, _) = quant_experts(&mut rng, 4, 8, 64, QuantParams::affine(4, 64), DType::F32);
    let w = QuantExperts::upload(g, &dq).unwrap();
    let form = XqForm::of(w.weight()).unwrap();
    let ids = MlxBuffer::from_slice(g, &[0u32, 1], &[1, 2]).unwrap();
    let wts = MlxBuffer::from_slice(g, &[0.5f32, 0.5], &[1, 2]).unwrap();
    let wts_bad = MlxBuffer::from_slice(g, &[0.5f32, 0.5, 0.1], &[1, 3]).unwrap();
    let acc = MlxBuffer::from_slice(g, &[0f32; 8], &[1, 8]).unwrap();
    let acc_bad = MlxBuffer::from_slice(g, &[0f32; 7], &[1, 7]).unwrap();
    let x_token = MlxBuffer::from_slice(g, &rng.normals(64, 1.0), &[1, 64]).unwrap();
    let x_pairs = MlxBuffer::from_slice(g, &rng.normals(128, 1.0), &[2, 64]).unwrap();
    let mut pass = g.begin();
    let qt = qmatmul::quantize_x(&mut pass, &x_token, form).unwrap();
    let qp = qmatmul::quantize_x(&mut pass, &x_pairs, form).unwrap();
    let err = |r: Result<()>| r.unwrap_err().to_string();
    let e1 = err(gather_qmv_xq_combine(
        &mut pass,
        &qt,
        &w,
        (&ids, &wts),
        &acc,
    ));
    assert!(
        e1.contains("x has 1 rows, expected one per pair (2)"),
        "{e1}"
    );
    let e2 = err(gather_qmv_xq_combine(
        &mut pass,
        &qp,
        &w,
        (&ids, &wts_bad),
        &acc,
    ));
    assert!(e2.starts_with("gather_qmv_xq_combine: weights"), "{e2}");
    let e3 = err(gather_qmv_xq_combine(
        &mut pass,
        &qp,
        &w,
        (&ids, &wts),
        &acc_bad,
    ));
    assert!(e3.starts_with("gather_qmv_xq_combine: acc"), "{e3}");
}

/// The routed matvecs finish a producer's pending RMS norm ([`qmatmul::qmv_norm_out`]'s
/// chunks of y·g with their Σy²), as `qmv_xq` does: the stacked gate|up and a plain routed
/// matvec against the f64 products of the normed y (y read back, normed here), within the
/// product rule plus the 16-bit x bound (`xq_bound`) and the f32 1/rms (2e-6 of Σ|x·w|).
/// 4- and 8-bit, an id out of range, both reduction paths, poisoned.
#[test]
fn routed_matvecs_finish_a_pending_norm() {
    let mut rng = Rng::new(921);
    for no_sg in [false, true] {
        let g = &poisoned(no_sg);
        let (e, i, h, top, k0) = (6, 64, 128, 3, 256);
        for (params, dt) in [
            (QuantParams::affine(4, 64), DType::BF16),
            (QuantParams::affine(8, 32), DType::F16),
        ] {
            let (experts, [(gq, gdeq), (uq, udeq)]) =
                stacked_experts(g, &mut rng, [e, i, h], params, dt);
            let ExpertWeight::Mlx(gw) = &experts.gate else {
                panic!("MLX experts");
            };
            let form = XqForm::of(gw.weight()).unwrap();
            // The producer: a matvec [h, k0] writing y and its chunks with the norm pending.
            let wv: Vec<f32> = (rng.normals(h * k0, 0.3).into_iter())
                .map(|v| round_to_dtype(v, dt).unwrap())
                .collect();
            let wp = quantize_as(&wv, h, k0, params, dt).unwrap();
            let wp = QuantWeight::upload(g, &wp).unwrap();
            let x0 = MlxBuffer::from_slice(g, &rng.normals(k0, 1.0), &[1, k0]).unwrap();
            let nw: Vec<f32> = (0..h).map(|_| rng.uniform(0.5, 1.5)).collect();
            let gnw = MlxBuffer::from_slice(g, &nw, &[h]).unwrap();
            let eps = 1e-5;
            let out = qmatmul::NormOut {
                weight: &gnw,
                eps,
                form,
            };
            let mut ids = random_ids(&mut rng, 1, top, e);
            ids[2] = e as u32 + 1;
            let gids = MlxBuffer::from_slice(g, &ids, &[1, top]).unwrap();
            let mut pass = g.begin();
            let xin = qmatmul::MatvecX::F32(&x0);
            let (y, chunks) = qmatmul::qmv_norm_out(&mut pass, xin, &wp, None, &out).unwrap();
            assert_eq!(chunks.pending_norm(), Some(eps));
            let gu = gather_qmv_xq_gate_up(&mut pass, &chunks, &experts, &gids).unwrap();
            let gate = gather_qmv_xq(&mut pass, &chunks, gw, &gids).unwrap();
            pass.commit_and_wait().unwrap();
            let y: Vec<f32> = y.to_vec(g).unwrap();
            let ms = y.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            let xn: Vec<f32> = (y.iter().zip(&nw))
                .map(|(&v, &w)| (f64::from(v) * f64::from(w) * inv) as f32)
                .collect();
            let what = format!("b{} {dt} subgroups off {no_sg}", params.bits);
            let check = |got: &[f32], deq: &[f64], qs: &[Quantized], what: &str| {
                let want = ref_gather(&xn, deq, &ids, top, i, h);
                let mut extra = xq_bound(&xn, &code_parts(qs, deq), &ids, top, i, h);
                for (x, m) in extra.iter_mut().zip(&want.1) {
                    *x += 2e-6 * m;
                }
                assert_product_with(got, &want, h, 2.0, &extra, what);
            };
            let gate: Vec<f32> = gate.to_vec(g).unwrap();
            check(&gate, &gdeq, &gq, &format!("{what}: gate"));
            let gu: Vec<f32> = gu.to_vec(g).unwrap();
            let half = |u: usize| -> Vec<f32> {
                (0..top)
                    .flat_map(|p| gu[p * 2 * i + u * i..p * 2 * i + (u + 1) * i].to_vec())
                    .collect()
            };
            check(&half(0), &gdeq, &gq, &format!("{what}: stacked gate"));
            check(&half(1), &udeq, &uq, &format!("{what}: stacked up"));
        }
    }
}

/// `gather_qmv_xq_glu` (the GLU on the stacked gate|up's own rows) writes the chunks that
/// `gather_qmv_xq_gate_up` then `glu_split_xq` write, word for word: the same row sums in
/// the same order, the same activation and the same cooperative quantization. x plain and
/// with a pending norm (`qmv_norm_out`'s chunks); SiLU and GELU (tanh); 4- and 8-bit; an id
/// out of range; two tokens; both reduction paths; poisoned allocations.
#[test]
fn gate_up_glu_in_one_dispatch_matches_the_two() {
    let mut rng = Rng::new(931);
    for no_sg in [false, true] {
        let g = &poisoned(no_sg);
        let (e, i, h, top, t) = (6, 128, 128, 3, 2);
        for (params, dt, act) in [
            (QuantParams::affine(4, 32), DType::BF16, Act::Silu),
            (QuantParams::affine(8, 64), DType::F16, Act::GeluTanh),
        ] {
            let (experts, _) = stacked_experts(g, &mut rng, [e, i, h], params, dt);
            assert!(can_glu_out(&experts, g.caps()));
            let form = experts_xq_form(&experts).unwrap().0;
            let mut ids = random_ids(&mut rng, t, top, e);
            ids[1] = e as u32 + 2;
            let gids = MlxBuffer::from_slice(g, &ids, &[t, top]).unwrap();
            let x = MlxBuffer::from_slice(g, &rng.normals(t * h, 1.0), &[t, h]).unwrap();
            // A producer writing the chunks with the norm pending: [h, 64] over x0.
            let wv: Vec<f32> = (rng.normals(h * 64, 0.3).into_iter())
                .map(|v| round_to_dtype(v, dt).unwrap())
                .collect();
            let wp = QuantWeight::upload(g, &quantize_as(&wv, h, 64, params, dt).unwrap()).unwrap();
            let x0 = MlxBuffer::from_slice(g, &rng.normals(t * 64, 1.0), &[t, 64]).unwrap();
            let nw: Vec<f32> = (0..h).map(|_| rng.uniform(0.5, 1.5)).collect();
            let gnw = MlxBuffer::from_slice(g, &nw, &[h]).unwrap();
            let out = qmatmul::NormOut {
                weight: &gnw,
                eps: 1e-6,
                form,
            };
            for pending in [false, true] {
                let mut pass = g.begin();
                let xq = if pending {
                    let xin = qmatmul::MatvecX::F32(&x0);
                    qmatmul::qmv_norm_out(&mut pass, xin, &wp, None, &out)
                        .unwrap()
                        .1
                } else {
                    qmatmul::quantize_x(&mut pass, &x, form).unwrap()
                };
                let fused = gather_qmv_xq_glu(&mut pass, &xq, &experts, &gids, act).unwrap();
                let gu = gather_qmv_xq_gate_up(&mut pass, &xq, &experts, &gids).unwrap();
                let gu2 = gu.reshape(&[t * top, 2 * i]).unwrap();
                let apart =
                    crate::ops::activation::glu_split_xq(&mut pass, &gu2, act, form).unwrap();
                pass.commit_and_wait().unwrap();
                let what = format!(
                    "b{} {act:?} pending {pending} subgroups off {no_sg}",
                    params.bits
                );
                assert_eq!((fused.rows(), fused.k()), (t * top, i), "{what}");
                let a: Vec<u32> = fused.buffer().to_vec(g).unwrap();
                let b: Vec<u32> = apart.buffer().to_vec(g).unwrap();
                assert_eq!(a.len(), b.len(), "{what}");
                for (w, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(x, y, "{what}: word {w} (chunk {})", w / 20);
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_named() {
    let g = gpu();
    let mut rng = Rng::new(908);
    let (qs, _) = quant_experts(&mut rng, 4, 8, 64, QuantParams::affine(4, 64), DType::F32);
    let w = QuantExperts::upload(g, &qs).unwrap();
    let x = MlxBuffer::from_slice(g, &rng.normals(2 * 64, 1.0), &[2, 64]).unwrap();
    let x_bad = MlxBuffer::from_slice(g, &rng.normals(2 * 32, 1.0), &[2, 32]).unwrap();
    let ids = MlxBuffer::from_slice(g, &[0u32, 1, 2, 3], &[2, 2]).unwrap();
    let ids3 = MlxBuffer::from_slice(g, &[0u32, 1, 2], &[3, 1]).unwrap();
    let ids_i = MlxBuffer::from_slice(g, &[0i32, 1, 2, 3], &[2, 2]).unwrap();
    let mut pass = g.begin();
    let e = gather_qmm(&mut pass, &x_bad, &w, &ids)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "gather_qmm: x has shape [2, 32], expected [2, 64] or [2, 2, 64] \
         (ids [2, 2], experts [4, 8, 64])"
    );
    let e = gather_qmm(&mut pass, &x, &w, &ids3)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "gather_qmm: x has shape [2, 64], expected [3, 64] or [3, 1, 64] \
         (ids [3, 1], experts [4, 8, 64])"
    );
    let e = gather_qmm(&mut pass, &x, &w, &ids_i)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "gather_qmm: ids is i32, expected u32");
    let (qs, _) = quant_experts(&mut rng, 257, 1, 32, QuantParams::affine(4, 32), DType::F32);
    let w257 = QuantExperts::upload(g, &qs).unwrap();
    let x32 = MlxBuffer::from_slice(g, &[1.0f32; 32], &[1, 32]).unwrap();
    let id1 = MlxBuffer::from_slice(g, &[256u32], &[1, 1]).unwrap();
    let e = gather_qmm_with(&mut pass, &x32, &w257, &id1, GatherPath::Sorted)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "gather_qmm: 257 experts, the sorted path takes at most 256"
    );
    let e = expert_ids(g, &[0, 1, 4, 2], [2, 2], 4)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "expert_ids: id 4 at [1, 0] is out of range for 4 experts"
    );
    assert!(expert_ids(g, &[0, 1, 3, 2], [2, 2], 4).is_ok());
    let y = MlxBuffer::from_slice(g, &[0.0f32; 12], &[2, 2, 3]).unwrap();
    let wts = MlxBuffer::from_slice(g, &[0.0f32; 6], &[2, 3]).unwrap();
    let e = moe_combine(&mut pass, &y, &wts, None)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "moe_combine: weights has shape [2, 3], expected [2, 2]");
    let e = QuantExperts::new(w.weight().clone(), 3)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "QuantExperts: 32 rows of K = 64 do not split into 3 experts"
    );
    let e = GgmlExperts::upload(g, GgmlType::Q8_0, [2, 3, 64], &[0u8; 100])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "GgmlExperts::upload: Q8_0 [2, 3, 64] needs 408 bytes, got 100"
    );
}

// Routed MLX quantized matmul (mx.gather_qmm with rhs_indices): for each of the P = T * top_k
// (token, slot) pairs, y[pair, :] = x[pair / top_k, :] · W[ids[pair]]ᵀ with W stacked experts
// [E, N, K] (common/quant.wgsl: experts are consecutive blocks of N rows, so expert e's row n
// is packed row e * N + n and its scales are at (e * N + n) * gpr).
//   gqmv  decode: a workgroup takes one pair and 2 * RPT rows of its expert (row-blocks of 32
//         invocations striding over the 32-code chunks: consecutive invocations read
//         consecutive 16/32-byte chunks of a row), so only the chosen experts' rows are read.
//   gqmm  prefill: over the pairs sorted by expert (moe.wgsl sort_pairs), one workgroup per
//         (tile of <= 64 pairs of one expert, 64 outputs): 64 x 64 tiles as in qmm, x rows
//         gathered through the pair order.
// Expert ids >= E never index the weights (clamped) and give rows of zeros.
//   gqmv_combine  decode: gqmv of the down experts with the weighted sum over a token's
//         slots added into an accumulator (below).
// Bindings: 0 x (f32 as vec4: offset a multiple of 4), 1 packed, 2 scales, 3 biases, 4 y f32
// [P, N] (gqmv_combine: the accumulator [T, N]), 5 packed as vec4, 6 ids u32 [P] (gqmv),
// 7 sorted u32 (gqmm: see moe.wgsl; gqmv_combine: the slots' weights f32 [P] as bits).
struct Params {
    pairs: u32,
    n: u32,
    k: u32,
    wpr: u32,
    gpr: u32,
    top_k: u32,
    experts: u32,
    // gqmm: tile entries in `sorted`; the pair order starts at word 4 + 4 * max_tiles
    max_tiles: u32,
    // gqmv with PEND: the RMS norm's epsilon.
    eps: f32,
}

// gqmv: rows per row-block RPT (1, 2 or 4) and XQ, x chunks as integers for packed byte
// dot products (common/quant_xq.wgsl; 4- and 8-bit affine codes only: 0 off, 1 int8,
// 2 16-bit), XSRC: binding 0 holds x already quantized in XQ's form (ops::qmatmul::
// QuantizedX), and GU: the weight is the experts' gate rows then their up rows stacked
// ([2 * E * I, K], ops::moe::MoeExperts::gate_up), N = 2I, and a pair's output row n < I is
// its expert's gate row n, row I + n its up row n: the gate and up matvecs in one dispatch.
// PEND: x's chunks carry an RMS norm still to finish (a matvec's NormOut chunks of y·g, each
// with its Σy² in its last word: ops::qmatmul::QuantizedX::pending_norm): the row's sums of
// those words give 1/rms, which scales every output, as qmatmul.wgsl's XSRC with NORM does.
// ACT (gqmv_glu): the gate's activation (common/act.wgsl: 0 SiLU, 1 GELU tanh, 2 GELU erf).
// Packed as GQMV = ACT << 9 | PEND << 8 | GU << 7 | XSRC << 6 | XQ << 4 | RPT (a spec has
// three constants).
override GQMV: u32 = 1u;
override PEND: u32 = (GQMV >> 8u) & 1u;
override ACT: u32 = (GQMV >> 9u) & 3u;
override RPT: u32 = GQMV & 15u;
override XQ: u32 = (GQMV >> 4u) & 3u;
override XSRC: u32 = (GQMV >> 6u) & 1u;
override GU: u32 = (GQMV >> 7u) & 1u;
const TPR: u32 = 32u;

@group(0) @binding(0) var<storage, read> xv: array<vec4<u32>>;
fn xf(i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(xv[i]);
}
// y's words: f32 bits (gqmv, gqmm, gqmv_combine) or quantized chunks (gqmv_glu).
@group(0) @binding(4) var<storage, read_write> y: array<u32>;
@group(0) @binding(5) var<storage, read> packed4: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> ids: array<u32>;
@group(0) @binding(7) var<storage, read> sorted: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

// ---------------------------------------------------------------------------------------
// gqmv (the chunk helpers are qmatmul.wgsl's qmv's and common/quant.wgsl's)

var<workgroup> red: array<f32, 256>;
// PEND: each row-block's partial Σy² of its x row, [block][slot].
var<workgroup> red_ss: array<f32, 64>;

// The packed row of expert e's output row n: e's block of N rows, or with GU its gate row
// (n < N/2, in the gate half) or its up row (in the up half, E * N/2 rows further).
fn expert_row(e: u32, n: u32) -> u32 {
    if GU != 0u {
        let half = p.n / 2u;
        return select(e * half + n, (p.experts + e) * half + (n - half), n >= half);
    }
    return e * p.n + n;
}

fn chunk_words(row: u32, c: u32) -> array<u32, 8> {
    var w: array<u32, 8>;
    let base = row * p.wpr + c * BITS;
    if BITS == 4u {
        let v = packed4[base / 4u];
        w = array<u32, 8>(v.x, v.y, v.z, v.w, 0u, 0u, 0u, 0u);
    } else if BITS == 8u {
        let v0 = packed4[base / 4u];
        let v1 = packed4[base / 4u + 1u];
        w = array<u32, 8>(v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w);
    } else {
        let o = view(1u) + base;
        w = array<u32, 8>(packed[o], packed[o + 1u], packed[o + min(2u, BITS - 1u)],
                          packed[o + min(3u, BITS - 1u)], packed[o + min(4u, BITS - 1u)],
                          packed[o + min(5u, BITS - 1u)], packed[o + min(6u, BITS - 1u)],
                          packed[o + min(7u, BITS - 1u)]);
    }
    return w;
}

fn chunk_sum(w: array<u32, 8>, x: array<vec4<f32>, 8>, g: u32) -> f32 {
    let d = chunk_dot(w, x);
#if DT_U8
    return scale_at(g) * d;
#else
    let xs4 = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
    return scale_at(g) * d + bias_at(g) * ((xs4.x + xs4.y) + (xs4.z + xs4.w));
#endif
}

// One row's contribution of chunk c (group column gc), from x or its quantized form.
fn row_chunk(row: u32, c: u32, gc: u32, x: array<vec4<f32>, 8>, xq: XChunk) -> f32 {
    if XQ != 0u {
        return chunk_sum_xq(chunk_words(row, c), xq, row * p.gpr + gc);
    }
    return chunk_sum(chunk_words(row, c), x, row * p.gpr + gc);
}

fn x_chunk(o: u32) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(xf(o), xf(o + 1u), xf(o + 2u), xf(o + 3u), xf(o + 4u),
                               xf(o + 5u), xf(o + 6u), xf(o + 7u));
}

@compute @workgroup_size(64)
fn gqmv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
        , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_size) ss: u32
#endif
) {
    let block = lid / TPR;
    let lane = lid % TPR;
    let per_wg = 2u * RPT;
    let nrb = (p.n + per_wg - 1u) / per_wg;
    let g = flat_wg(wid, nwg);
    let pair = min(g / nrb, p.pairs - 1u);
    let live = g / nrb < p.pairs;
    let n0 = (g % nrb) * per_wg + block * RPT;
    let e = ids[view(6u) + pair];
    let valid = e < p.experts;
    let ec = min(e, p.experts - 1u);
    let chunks = p.k / 32u;
    let xo = view(0u) / 4u + (pair / p.top_k) * (p.k / 4u);
#if SUBGROUPS
    let slots = TPR / ss;
    let slot = lane / ss;
#else
    let slots = TPR;
    let slot = lane;
#endif
    let r0 = expert_row(ec, min(n0, p.n - 1u));
    let r1 = expert_row(ec, min(n0 + 1u, p.n - 1u));
    let r2 = expert_row(ec, min(n0 + 2u, p.n - 1u));
    let r3 = expert_row(ec, min(n0 + 3u, p.n - 1u));
    var s = vec4<f32>(0.0);
    var sq_part = 0.0;
    // XSRC: the pair's x row as quantized chunks (the same row index as xo's).
    let qo = view(0u) / 4u + (pair / p.top_k) * chunks * XQ_VEC4S;
    for (var c = lane; c < chunks; c += TPR) {
        var x: array<vec4<f32>, 8>;
        var xq: XChunk;
        if XSRC != 0u {
            let o = qo + c * XQ_VEC4S;
            xq = xchunk_from(xv[o], xv[o + 1u], xv[o + 2u], xv[o + 3u], xv[o + 4u]);
            if PEND != 0u {
                sq_part += bitcast<f32>(xv[o + 4u].w);
            }
        } else {
            x = x_chunk(xo + c * 8u);
            if XQ != 0u {
                xq = quantize_x(x);
            }
        }
        let gc = (c * 32u) / GROUP_SIZE;
        s.x += row_chunk(r0, c, gc, x, xq);
        if RPT > 1u {
            s.y += row_chunk(r1, c, gc, x, xq);
        }
        if RPT > 2u {
            s.z += row_chunk(r2, c, gc, x, xq);
            s.w += row_chunk(r3, c, gc, x, xq);
        }
    }
    for (var r = 0u; r < RPT; r++) {
#if SUBGROUPS
        let t = subgroupAdd(s[r]);
        if sl == 0u {
            red[(block * RPT + r) * TPR + slot] = t;
        }
#else
        red[(block * RPT + r) * TPR + slot] = s[r];
#endif
    }
    if PEND != 0u {
#if SUBGROUPS
        let u = subgroupAdd(sq_part);
        if sl == 0u {
            red_ss[block * TPR + slot] = u;
        }
#else
        red_ss[block * TPR + slot] = sq_part;
#endif
    }
    workgroupBarrier();
    // One invocation per (row-block, r).
    let fb = lid / RPT;
    let fr = lid % RPT;
    let n = (g % nrb) * per_wg + fb * RPT + fr;
    if live && fb < 2u && n < p.n {
        var t = 0.0;
        let o = (fb * RPT + fr) * TPR;
        for (var i = 0u; i < slots; i++) {
            t += red[o + i];
        }
        if PEND != 0u {
            var sq = 0.0;
            for (var i = 0u; i < slots; i++) {
                sq += red_ss[fb * TPR + i];
            }
            t *= inverseSqrt(sq / f32(p.k) + p.eps);
        }
        y[view(4u) + pair * p.n + n] = bitcast<u32>(select(0.0, t, valid));
    }
}

// ---------------------------------------------------------------------------------------
// gqmv_combine: the down experts of one decode token and the weighted sum over its top_k
// slots in one dispatch (gather_qmv_xq then moe_combine): acc[t, n] += Σ_j w[t, j] ·
// (x[t * top_k + j, :] · W[ids[t, j], n, :]). A workgroup takes RPT output rows n0.. of
// token t; its 8 row-blocks of 32 invocations take the slots j = block, block + 8, ...,
// each scaling its lanes' partial sums by the slot's weight, so one reduction over blocks
// and lanes gives the sum. x comes as quantized chunks (XSRC), a row per slot. Binding 4 is
// acc (read and written), binding 7 the weights f32 [T, top_k] as bits.

const CB: u32 = 8u;
var<workgroup> red_c: array<f32, 1024>;

@compute @workgroup_size(256)
fn gqmv_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
                , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_size) ss: u32
#endif
) {
    let block = lid / TPR;
    let lane = lid % TPR;
    let nrb = (p.n + RPT - 1u) / RPT;
    let g = flat_wg(wid, nwg);
    let tokens = p.pairs / p.top_k;
    let t = min(g / nrb, tokens - 1u);
    let live = g / nrb < tokens;
    let n0 = (g % nrb) * RPT;
    let chunks = p.k / 32u;
#if SUBGROUPS
    // A subgroup wider than a row-block sums several blocks' partials at once (the sum is
    // over every block anyway): its first lane stores them, the other blocks' first lanes a
    // zero (workgroup memory is not zeroed at launch).
    let slots = max(TPR / ss, 1u);
    let slot = lane / ss;
#else
    let slots = TPR;
    let slot = lane;
#endif
    var s = vec4<f32>(0.0);
    for (var j = block; j < p.top_k; j += CB) {
        let pair = t * p.top_k + j;
        let e = ids[view(6u) + pair];
        let wj = bitcast<f32>(sorted[view(7u) + pair]);
        if e < p.experts {
            let r0 = expert_row(e, min(n0, p.n - 1u));
            let r1 = expert_row(e, min(n0 + 1u, p.n - 1u));
            let r2 = expert_row(e, min(n0 + 2u, p.n - 1u));
            let r3 = expert_row(e, min(n0 + 3u, p.n - 1u));
            let qo = view(0u) / 4u + pair * chunks * XQ_VEC4S;
            var sj = vec4<f32>(0.0);
            for (var c = lane; c < chunks; c += TPR) {
                let o = qo + c * XQ_VEC4S;
                let xq = xchunk_from(xv[o], xv[o + 1u], xv[o + 2u], xv[o + 3u], xv[o + 4u]);
                var x: array<vec4<f32>, 8>;
                let gc = (c * 32u) / GROUP_SIZE;
                sj.x += row_chunk(r0, c, gc, x, xq);
                if RPT > 1u {
                    sj.y += row_chunk(r1, c, gc, x, xq);
                }
                if RPT > 2u {
                    sj.z += row_chunk(r2, c, gc, x, xq);
                    sj.w += row_chunk(r3, c, gc, x, xq);
                }
            }
            s += wj * sj;
        }
    }
    for (var r = 0u; r < RPT; r++) {
#if SUBGROUPS
        let v = subgroupAdd(s[r]);
        if sl == 0u {
            red_c[(block * RPT + r) * TPR + slot] = v;
        } else if lane == 0u {
            red_c[(block * RPT + r) * TPR] = 0.0;
        }
#else
        red_c[(block * RPT + r) * TPR + slot] = s[r];
#endif
    }
    workgroupBarrier();
    // One invocation per row: the blocks' and lanes' partials, then the accumulator.
    let n = n0 + lid;
    if live && lid < RPT && n < p.n {
        var v = 0.0;
        for (var b = 0u; b < CB; b++) {
            let o = (b * RPT + lid) * TPR;
            for (var i = 0u; i < slots; i++) {
                v += red_c[o + i];
            }
        }
        let a = view(4u) + t * p.n + n;
        y[a] = bitcast<u32>(bitcast<f32>(y[a]) + v);
    }
}

// ---------------------------------------------------------------------------------------
// gqmv_glu: the stacked gate|up experts (GU) with the GLU applied to their own rows, writing
// down's input quantized (qmatmul.wgsl's XQO 2 for routed experts): a workgroup takes one
// pair and gate rows 32w..32w+31 of its expert with the same up rows (16 row-blocks of RPT =
// 4 rows: blocks 0..7 gate, 8..15 up), and writes chunk w of the pair's act(gate)·up row in
// this kernel's own form (BITS, XQ). With PEND, x's pending norm is finished first. The
// GLU's dispatch, and its barrier, go.

const GLU_BLOCKS: u32 = 16u;
var<workgroup> red_g: array<f32, 2048>;
var<workgroup> red_gs: array<f32, 512>;

@compute @workgroup_size(512)
fn gqmv_glu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
            , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_size) ss: u32,
            @builtin(subgroup_id) si: u32
#endif
) {
    let block = lid / TPR;
    let lane = lid % TPR;
    let half = p.n / 2u;
    let cpr = half / 32u;
    let g = flat_wg(wid, nwg);
    let pair = min(g / cpr, p.pairs - 1u);
    let live = g / cpr < p.pairs;
    let w = g % cpr;
    // Row-block b's first row of the pair's [gate | up] output row.
    let n0 = select(w * 32u + 4u * block, half + w * 32u + 4u * (block - 8u), block >= 8u);
    let e = ids[view(6u) + pair];
    let valid = e < p.experts;
    let ec = min(e, p.experts - 1u);
    let chunks = p.k / 32u;
#if SUBGROUPS
    let slots = max(TPR / ss, 1u);
    let slot = lane / ss;
    let part_slot = si * ss + sl;
#else
    let slots = TPR;
    let slot = lane;
    let part_slot = lid;
#endif
    let r0 = expert_row(ec, n0);
    let r1 = expert_row(ec, n0 + 1u);
    let r2 = expert_row(ec, n0 + 2u);
    let r3 = expert_row(ec, n0 + 3u);
    var s = vec4<f32>(0.0);
    var sq_part = 0.0;
    let qo = view(0u) / 4u + (pair / p.top_k) * chunks * XQ_VEC4S;
    for (var c = lane; c < chunks; c += TPR) {
        let o = qo + c * XQ_VEC4S;
        let xq = xchunk_from(xv[o], xv[o + 1u], xv[o + 2u], xv[o + 3u], xv[o + 4u]);
        if PEND != 0u {
            sq_part += bitcast<f32>(xv[o + 4u].w);
        }
        var x: array<vec4<f32>, 8>;
        let gc = (c * 32u) / GROUP_SIZE;
        s.x += row_chunk(r0, c, gc, x, xq);
        s.y += row_chunk(r1, c, gc, x, xq);
        s.z += row_chunk(r2, c, gc, x, xq);
        s.w += row_chunk(r3, c, gc, x, xq);
    }
    for (var r = 0u; r < 4u; r++) {
#if SUBGROUPS
        let v = subgroupAdd(s[r]);
        if sl == 0u {
            red_g[(block * 4u + r) * TPR + slot] = v;
        } else if lane == 0u {
            red_g[(block * 4u + r) * TPR] = 0.0;
        }
#else
        red_g[(block * 4u + r) * TPR + slot] = s[r];
#endif
    }
    if PEND != 0u {
#if SUBGROUPS
        let u = subgroupAdd(sq_part);
        if sl == 0u {
            red_gs[block * TPR + slot] = u;
        } else if lane == 0u {
            red_gs[block * TPR] = 0.0;
        }
#else
        red_gs[block * TPR + slot] = sq_part;
#endif
    }
    workgroupBarrier();
    // Row j of the workgroup's 64 (32 gate, then 32 up) into yrows.
    if lid < 64u {
        var t = 0.0;
        for (var i = 0u; i < slots; i++) {
            t += red_g[lid * TPR + i];
        }
        if PEND != 0u {
            // Every block summed the same x row: block 0's partials.
            var sq = 0.0;
            for (var i = 0u; i < slots; i++) {
                sq += red_gs[i];
            }
            t *= inverseSqrt(sq / f32(p.k) + p.eps);
        }
        yrows[lid] = select(0.0, t, valid);
    }
    workgroupBarrier();
    // The chunk (common/glu_chunk.wgsl; every invocation calls it).
    store_glu_chunk_at(view(4u) + (pair * cpr + w) * 4u * XQ_VEC4S, part_slot, live);
}

// ---------------------------------------------------------------------------------------
// gqmm (tiled, scalar; the tile loop of qmatmul.wgsl's qmm over gathered rows)

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 32u;
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> ws: array<vec4<f32>, 512>;
// The pair of each tile row.
var<workgroup> tile_pairs: array<u32, 64>;

fn set_xs(k: u32, i: u32, v: f32) {
    xs[k * 16u + i / 4u][i % 4u] = v;
}
fn set_ws(k: u32, i: u32, v: f32) {
    ws[k * 16u + i / 4u][i % 4u] = v;
}

@compute @workgroup_size(256)
fn gqmm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    // Tiles vary fastest: the tiles of one expert are neighbours and share its W tile.
    let tile = g % p.max_tiles;
    let bn = g / p.max_tiles;
    let so = view(7u);
    let ntiles = min(sorted[so], p.max_tiles);
    let live = tile < ntiles && bn * BN < p.n;
    let te = so + 4u + 4u * tile;
    // Entries past the count are never read as indices: all clamped, len forced to 0.
    let bin = min(sorted[te], p.experts);
    let start = min(sorted[te + 1u], p.pairs);
    let len = select(0u, min(sorted[te + 2u], min(BM, p.pairs - start)), live);
    let valid = bin < p.experts;
    let ebase = min(bin, p.experts - 1u) * p.n;
    let order = so + 4u + 4u * p.max_tiles;
    if lid < BM {
        tile_pairs[lid] = min(sorted[order + min(start + lid, p.pairs - 1u)], p.pairs - 1u);
    }
    workgroupBarrier();
    let n0 = bn * BN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    let lr = lid / 4u;
    let lk = (lid % 4u) * 8u;
    let xrow = tile_pairs[lr] / p.top_k;
    let wrow = n0 + lr;
    let xbase = view(0u) / 4u;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        if lr < len {
            let o = xbase + (xrow * p.k + k0 + lk) / 4u;
            let a = xf(o);
            let b = xf(o + 1u);
            for (var i = 0u; i < 4u; i++) {
                set_xs(lk + i, lr, a[i]);
                set_xs(lk + 4u + i, lr, b[i]);
            }
        } else {
            for (var i = 0u; i < 8u; i++) {
                set_xs(lk + i, lr, 0.0);
            }
        }
        if live && wrow < p.n {
            for (var i = 0u; i < 8u; i++) {
                set_ws(lk + i, lr, dequant_at(ebase + wrow, k0 + lk + i, p.wpr, p.gpr));
            }
        } else {
            for (var i = 0u; i < 8u; i++) {
                set_ws(lk + i, lr, 0.0);
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < BK; k++) {
            let a = xs[k * 16u + ty];
            let b = ws[k * 16u + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = ty * 4u + i;
        if r < len {
            let pair = tile_pairs[r];
            for (var j = 0u; j < 4u; j++) {
                let n = n0 + tx * 4u + j;
                if n < p.n {
                    y[view(4u) + pair * p.n + n] = bitcast<u32>(select(0.0, acc[i][j], valid));
                }
            }
        }
    }
}

// Cooperative-matrix (tensor core) matmul y[M, N] = x[M, K] · Wᵀ, f16 inputs, f32
// accumulation, for quantized W (qmm_coop*, common/quant.wgsl) and dense W (matmul_coop*).
// Compiled only on adapters with EXPERIMENTAL_COOPERATIVE_MATRIX and SHADER_F16.
//
// Two designs, both with W in the A role and x in the B role: coopLoad/coopStore are
// column-major, so a k-major W tile loads as [n, k], a row-major x tile as [k, m], and the
// column-major store of yᵀ is row-major y (see ARCHITECTURE.md, "Kernels").
//   T = 16 (NVIDIA; qmm_coop16, matmul_coop16): 4 or 8 subgroups, 128 W rows x 64 or 128 x
//            rows per workgroup, x read as f16 (x_to_f16), reads two K steps ahead (below).
//   T = 8 (Apple; qmm_coop8, matmul_coop8): 4 subgroups own a 32 x 32 block of y, each 2 x 2
//            tiles; K in steps of BK = 32, x converted to f16 and W dequantized (or
//            converted) element by element into xt [BM][BK] and wt [BK][BN]; tiles are
//            staged through ct [BM][BN] f32 so partial edge tiles are stored with guards.
// Pointer offsets are computed into a `let` first (naga's SPIR-V backend needs it).
// Bindings: 0 x (f32; the packed words as vectors in the 16 x 16 kernels), 1 packed, 2 scales,
// 3 biases (quantized), 4 y (f32), 5 w (dense), 6 x as f16 pairs (x_to_f16 writes), 7 the
// same read as vectors (16 x 16 kernels).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    wpr: u32,
    gpr: u32,
    // Row length of x16 (K rounded up to KB): x_to_f16 and the 16 x 16 kernel.
    kp: u32,
    // gqmm_coop16 (m = pairs): x row of a pair = pair / x_div; experts; entries of the tile
    // table in `sorted` (moe.wgsl sort_pairs).
    x_div: u32,
    experts: u32,
    max_tiles: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const BK: u32 = 32u;
// Largest block (T = 16): 64 x 64.
const BMAX: u32 = 64u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(5) var<storage, read> w: array<f32>;
fn dense_at(i: u32) -> f32 {
    return w[view(5u) + i];
}
#else
@group(0) @binding(5) var<storage, read> w: array<u32>;
fn dense_at(i: u32) -> f32 {
    let j = view(5u) + i;
    return half_at(w[j >> 1u], j);
}
#endif

var<workgroup> xt: array<f16, 2048>;
var<workgroup> wt: array<f16, 2048>;
var<workgroup> ct: array<f32, 4096>;

// Block coordinates of this workgroup: M blocks vary fastest so neighbours share W tiles.
fn block_origin(t: u32, bsz: u32) -> vec3<u32> {
    let nbm = (p.m + bsz - 1u) / bsz;
    let nbn = (p.n + bsz - 1u) / bsz;
    let bn = t / nbm;
    return vec3<u32>((t % nbm) * bsz, bn * bsz, u32(bn < nbn));
}

// Fill xt [bsz][BK] and wt [BK][bsz] for the K step at k0 (QUANT: dequantize W).
fn load_tiles(lid: u32, o: vec3<u32>, k0: u32, bsz: u32, quant: bool) {
    for (var e = lid; e < bsz * BK; e += WG) {
        let r = e / BK;
        let k = e % BK;
        let m = o.x + r;
        var a = 0.0;
        if o.z != 0u && m < p.m && k0 + k < p.k {
            a = x[view(0u) + m * p.k + k0 + k];
        }
        xt[r * BK + k] = f16(a);
        let n = o.y + r;
        var b = 0.0;
        if o.z != 0u && n < p.n && k0 + k < p.k {
            if quant {
                b = dequant_at(n, k0 + k, p.wpr, p.gpr);
            } else {
                b = dense_at(n * p.k + k0 + k);
            }
        }
        wt[k * bsz + r] = f16(b);
    }
}

fn zero_ct(lid: u32, bsz: u32) {
    for (var e = lid; e < bsz * bsz; e += WG) {
        ct[e] = 0.0;
    }
}

fn store_ct(lid: u32, o: vec3<u32>, bsz: u32) {
    if o.z == 0u {
        return;
    }
    for (var e = lid; e < bsz * bsz; e += WG) {
        let m = o.x + e / bsz;
        let n = o.y + e % bsz;
        if m < p.m && n < p.n {
            y[view(4u) + m * p.n + n] = ct[e];
        }
    }
}

// T = 16 (NVIDIA): a workgroup of WG = 128 or 256 (4 or 8 subgroups) owns NB = 128 W rows x
// MB = WG / 2 (64 or 128) x rows of y; subgroup sg owns W rows sn.. (64, 4 tiles) x x rows
// sm.. (32, 2 tiles): 8 accumulators, 6 fragment loads per 8 multiply-adds. With 8
// subgroups each W tile (its loads and dequantization) serves twice the x rows. K goes in steps of KB = 64 (two chunks). x comes as f16 rows of kp
// halves (x_to_f16, zeros past K). Each step's global reads (the quantized W words, scales,
// biases and the x halves) are issued into registers two steps ahead (one with CX bit 2;
// two measured 5 % faster on an H200), so their latency hides behind the multiply-adds; dequantization happens when the
// registers are written to the tiles. Tile rows are padded by 8 halves so the
// column-major fragment loads spread over the banks.
// Measurement switches (0 in production; `qmm_with`): bit 0 tiles written at the first
// K step only (no global reads or dequantization after it), bit 1 no multiply-adds, bit 2
// reads one step ahead only, bit 3 codes not decoded (the loads and tile stores kept).
override CX: u32 = 0u;
const NB: u32 = 128u;
override MB: u32 = WG / 2u;
const KB: u32 = 64u;
const WTS: u32 = 136u;
const XTS: u32 = 72u;

// x as f16 pairs: written by x_to_f16 (binding 6), read by the 16 x 16 kernels (binding 7).
@group(0) @binding(6) var<storage, read_write> xh: array<u32>;
// gqmm_coop16: the pairs sorted by expert (tile count, tile table, pair order; moe.wgsl).
@group(0) @binding(6) var<storage, read> sorted: array<u32>;
@group(0) @binding(7) var<storage, read> x16: array<vec4<f16>>;

var<workgroup> wt16: array<f16, 8704>; // [KB][WTS]: W tile, k-major (A role: [n, k])
var<workgroup> xt16: array<f16, 9216>; // [MB][XTS]: x tile, row-major (B role: [k, m])
var<workgroup> cs16: array<f32, 2048>; // one 16 x 16 output tile per subgroup
// gqmm_coop16: the pair and the x row of each tile row.
var<workgroup> g_pair: array<u32, 128>;
var<workgroup> g_row: array<u32, 128>;

// A workgroup's block: rows m0.. of y (or, gathered, the tile's pairs), W rows ebase + n0..
// (ebase: the expert's first row), len live rows; store: write them; zero: as zeros (an
// expert id out of range).
struct Blk {
    m0: u32,
    n0: u32,
    ebase: u32,
    len: u32,
    store: bool,
    zero: bool,
}

// Registers carried from one K step's global reads to its tiles.
struct Pre {
    // Chunks of W slots lid and (WG = 128) lid + WG (slot s: row s / 2, chunk s % 2 of the
    // step).
    wa: array<u32, 8>,
    wb: array<u32, 8>,
    sa: f32,
    ba: f32,
    sb: f32,
    bb: f32,
    // x16 slots lid + WG * i (i < 4) of the step: row slot / 8, halves 8 * (slot % 8)...
    x0: X8,
    x1: X8,
    x2: X8,
    x3: X8,
}

// Eight consecutive halves of x (16 bytes).
struct X8 {
    lo: vec4<f16>,
    hi: vec4<f16>,
}

// x [M, K] f32 -> xh [M, kp] f16 (pairs per u32, zeros past K): one invocation per pair.
@compute @workgroup_size(WG)
fn x_to_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    let half_row = p.kp / 2u;
    if i >= p.m * half_row {
        return;
    }
    let m = i / half_row;
    let k = (i % half_row) * 2u;
    let o = view(0u) + m * p.k + k;
    var a = vec2<f32>(0.0);
    if k < p.k {
        a.x = x[o];
    }
    if k + 1u < p.k {
        a.y = x[o + 1u];
    }
    xh[view(6u) + i] = pack2x16float(a);
}

fn x16_at(e: u32, m0: u32, k0: u32, gather: bool) -> X8 {
    var m = min(m0 + e / 8u, p.m - 1u);
    if gather {
        m = g_row[e / 8u];
    }
    // view(7) counts u32 words (the buffer's dtype): 2 per vec4<f16>.
    let i = view(7u) / 2u + (m * p.kp + k0) / 4u + (e % 8u) * 2u;
    return X8(x16[i], x16[i + 1u]);
}

fn put_x8(e: u32, v: X8) {
    let o = (e / 8u) * XTS + (e % 8u) * 8u;
    xt16[o] = v.lo.x;
    xt16[o + 1u] = v.lo.y;
    xt16[o + 2u] = v.lo.z;
    xt16[o + 3u] = v.lo.w;
    xt16[o + 4u] = v.hi.x;
    xt16[o + 5u] = v.hi.y;
    xt16[o + 6u] = v.hi.z;
    xt16[o + 7u] = v.hi.w;
}

// The packed words again as 16-byte vectors (bound by the 16 x 16 kernels; binding 0's f32 x
// belongs to the other entry points): a 4-bit chunk is one load, an 8-bit chunk two, where
// the words' view starts on a multiple of 4. Scalar loads of a chunk's words, each touching
// as many cache lines as the subgroup reads rows, bounded the kernel.
@group(0) @binding(0) var<storage, read> packed4: array<vec4<u32>>;

// The BITS words of chunk c of W row n; zeros past the row's last chunk.
fn w_chunk(n: u32, c: u32) -> array<u32, 8> {
    var w: array<u32, 8>;
    let vec_ok = (view(0u) & 3u) == 0u;
    if c < p.k / 32u && BITS == 4u && vec_ok {
        let v = packed4[(view(0u) + n * p.wpr + c * 4u) / 4u];
        w = array<u32, 8>(v.x, v.y, v.z, v.w, 0u, 0u, 0u, 0u);
    } else if c < p.k / 32u && BITS == 8u && vec_ok {
        let i = (view(0u) + n * p.wpr + c * 8u) / 4u;
        let v0 = packed4[i];
        let v1 = packed4[i + 1u];
        w = array<u32, 8>(v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w);
    } else if c < p.k / 32u {
        let o = view(1u) + n * p.wpr + c * BITS;
        let l = BITS - 1u;
        w = array<u32, 8>(packed[o], packed[o + min(1u, l)], packed[o + min(2u, l)],
                          packed[o + min(3u, l)], packed[o + min(4u, l)],
                          packed[o + min(5u, l)], packed[o + min(6u, l)],
                          packed[o + min(7u, l)]);
    }
    return w;
}

// Scale (or bias) of chunk c of row n: 0 past the row's end, so that chunk decodes to 0.
fn chunk_scale(n: u32, c: u32, bias: bool) -> f32 {
    if c >= p.k / 32u {
        return 0.0;
    }
    let g = n * p.gpr + (c * 32u) / GROUP_SIZE;
    return select(scale_at(g), bias_at(g), bias);
}

fn fetch(lid: u32, b: Blk, k0: u32, quant: bool, gather: bool) -> Pre {
    var r: Pre;
    let n0 = b.n0;
    let m0 = b.m0;
    if quant {
        let c = k0 / 32u + (lid & 1u);
        let na = b.ebase + min(n0 + lid / 2u, p.n - 1u);
        r.wa = w_chunk(na, c);
        r.sa = chunk_scale(na, c, false);
        r.ba = chunk_scale(na, c, true);
        if WG == 128u {
            let nb = b.ebase + min(n0 + (lid + WG) / 2u, p.n - 1u);
            r.wb = w_chunk(nb, c);
            r.sb = chunk_scale(nb, c, false);
            r.bb = chunk_scale(nb, c, true);
        }
    }
    r.x0 = x16_at(lid, m0, k0, gather);
    r.x1 = x16_at(lid + WG, m0, k0, gather);
    r.x2 = x16_at(lid + 2u * WG, m0, k0, gather);
    r.x3 = x16_at(lid + 3u * WG, m0, k0, gather);
    return r;
}

// Codes 4i..4i+3 of chunk w (its scale s, bias b) into tile column n, rows k..k+3.
fn put_w4(w: array<u32, 8>, i: u32, s: f32, b: f32, n: u32, k: u32) {
    var v = fma(codes4(w, i), vec4<f32>(s), vec4<f32>(b));
    if (CX & 8u) != 0u {
        // Measurement: no decoding (a word's low bits and the scale as every value).
        v = vec4<f32>(f32(w[i / 2u] & 15u) * s);
    }
    let o = k * WTS + n;
    wt16[o] = f16(v.x);
    wt16[o + WTS] = f16(v.y);
    wt16[o + 2u * WTS] = f16(v.z);
    wt16[o + 3u * WTS] = f16(v.w);
}

fn put_chunk(w: array<u32, 8>, s: f32, b: f32, slot: u32) {
    let n = slot / 2u;
    let k = (slot & 1u) * 32u;
    put_w4(w, 0u, s, b, n, k);
    put_w4(w, 1u, s, b, n, k + 4u);
    put_w4(w, 2u, s, b, n, k + 8u);
    put_w4(w, 3u, s, b, n, k + 12u);
    put_w4(w, 4u, s, b, n, k + 16u);
    put_w4(w, 5u, s, b, n, k + 20u);
    put_w4(w, 6u, s, b, n, k + 24u);
    put_w4(w, 7u, s, b, n, k + 28u);
}

// Element e of the dense W tile at (n0, k0): row e / KB, column e % KB (coalesced); 0 past
// N or K.
fn dense_or_zero(n0: u32, k0: u32, e: u32) -> f32 {
    let n = n0 + e / KB;
    let k = k0 + e % KB;
    if n < p.n && k < p.k {
        return dense_at(n * p.k + k);
    }
    return 0.0;
}

// Dense W straight into the tile, 16 loads in flight per invocation at a time (written out:
// a loop of single loads would wait for each).
fn put_dense(lid: u32, n0: u32, k0: u32) {
    for (var g = 0u; g < NB * KB / (16u * WG); g++) {
        let e0 = lid + g * 16u * WG;
        let w0 = dense_or_zero(n0, k0, e0 + 0u * WG);
        let w1 = dense_or_zero(n0, k0, e0 + 1u * WG);
        let w2 = dense_or_zero(n0, k0, e0 + 2u * WG);
        let w3 = dense_or_zero(n0, k0, e0 + 3u * WG);
        let w4 = dense_or_zero(n0, k0, e0 + 4u * WG);
        let w5 = dense_or_zero(n0, k0, e0 + 5u * WG);
        let w6 = dense_or_zero(n0, k0, e0 + 6u * WG);
        let w7 = dense_or_zero(n0, k0, e0 + 7u * WG);
        let w8 = dense_or_zero(n0, k0, e0 + 8u * WG);
        let w9 = dense_or_zero(n0, k0, e0 + 9u * WG);
        let w10 = dense_or_zero(n0, k0, e0 + 10u * WG);
        let w11 = dense_or_zero(n0, k0, e0 + 11u * WG);
        let w12 = dense_or_zero(n0, k0, e0 + 12u * WG);
        let w13 = dense_or_zero(n0, k0, e0 + 13u * WG);
        let w14 = dense_or_zero(n0, k0, e0 + 14u * WG);
        let w15 = dense_or_zero(n0, k0, e0 + 15u * WG);
        wt16[((e0 + 0u * WG) % KB) * WTS + (e0 + 0u * WG) / KB] = f16(w0);
        wt16[((e0 + 1u * WG) % KB) * WTS + (e0 + 1u * WG) / KB] = f16(w1);
        wt16[((e0 + 2u * WG) % KB) * WTS + (e0 + 2u * WG) / KB] = f16(w2);
        wt16[((e0 + 3u * WG) % KB) * WTS + (e0 + 3u * WG) / KB] = f16(w3);
        wt16[((e0 + 4u * WG) % KB) * WTS + (e0 + 4u * WG) / KB] = f16(w4);
        wt16[((e0 + 5u * WG) % KB) * WTS + (e0 + 5u * WG) / KB] = f16(w5);
        wt16[((e0 + 6u * WG) % KB) * WTS + (e0 + 6u * WG) / KB] = f16(w6);
        wt16[((e0 + 7u * WG) % KB) * WTS + (e0 + 7u * WG) / KB] = f16(w7);
        wt16[((e0 + 8u * WG) % KB) * WTS + (e0 + 8u * WG) / KB] = f16(w8);
        wt16[((e0 + 9u * WG) % KB) * WTS + (e0 + 9u * WG) / KB] = f16(w9);
        wt16[((e0 + 10u * WG) % KB) * WTS + (e0 + 10u * WG) / KB] = f16(w10);
        wt16[((e0 + 11u * WG) % KB) * WTS + (e0 + 11u * WG) / KB] = f16(w11);
        wt16[((e0 + 12u * WG) % KB) * WTS + (e0 + 12u * WG) / KB] = f16(w12);
        wt16[((e0 + 13u * WG) % KB) * WTS + (e0 + 13u * WG) / KB] = f16(w13);
        wt16[((e0 + 14u * WG) % KB) * WTS + (e0 + 14u * WG) / KB] = f16(w14);
        wt16[((e0 + 15u * WG) % KB) * WTS + (e0 + 15u * WG) / KB] = f16(w15);
    }
}

fn put(r: Pre, lid: u32, n0: u32, k0: u32, quant: bool) {
    if quant {
        put_chunk(r.wa, r.sa, r.ba, lid);
        if WG == 128u {
            put_chunk(r.wb, r.sb, r.bb, lid + WG);
        }
    } else {
        put_dense(lid, n0, k0);
    }
    put_x8(lid, r.x0);
    put_x8(lid + WG, r.x1);
    put_x8(lid + 2u * WG, r.x2);
    put_x8(lid + 3u * WG, r.x3);
}

// Output tile of subgroup sg, staged in cs16, to block rows ml.. (local), columns n.. (lane: 8
// elements, consecutive lanes on consecutive columns).
fn write_tile(sg: u32, lane: u32, n: u32, ml: u32, b: Blk, gather: bool) {
    for (var t = 0u; t < 8u; t++) {
        let e = lane + 32u * t;
        let nn = n + e % 16u;
        let lr = ml + e / 16u;
        if b.store && nn < p.n && lr < b.len {
            var row = b.m0 + lr;
            if gather {
                row = g_pair[lr];
            }
            y[view(4u) + row * p.n + nn] = select(cs16[sg * 256u + e], 0.0, b.zero);
        }
    }
}

// The block of workgroup t: M blocks vary fastest (plain), or tiles of one expert's pairs
// (gathered), so neighbouring workgroups share W tiles (from L2). Workgroups past the grid
// (folding) compute a clamped block and store nothing: no early return around
// cooperative-matrix operations.
fn block(t: u32, lid: u32, gather: bool) -> Blk {
    var b: Blk;
    let nbn = (p.n + NB - 1u) / NB;
    if gather {
        let tile = t % p.max_tiles;
        let bn = t / p.max_tiles;
        let so = view(6u);
        let ntiles = min(sorted[so], p.max_tiles);
        let te = so + 4u + 4u * tile;
        // Entries past the count are never read as indices: all clamped, len forced to 0.
        let bin = min(sorted[te], p.experts);
        let start = min(sorted[te + 1u], p.m);
        b.store = tile < ntiles && bn < nbn;
        b.len = select(0u, min(sorted[te + 2u], min(MB, p.m - start)), b.store);
        b.zero = bin >= p.experts;
        b.ebase = min(bin, p.experts - 1u) * p.n;
        b.n0 = min(bn, nbn - 1u) * NB;
        if lid < MB {
            let order = so + 4u + 4u * p.max_tiles;
            let pr = min(sorted[order + min(start + lid, p.m - 1u)], p.m - 1u);
            g_pair[lid] = pr;
            g_row[lid] = pr / p.x_div;
        }
    } else {
        let nbm = (p.m + MB - 1u) / MB;
        b.store = t < nbm * nbn;
        let tc = min(t, nbm * nbn - 1u);
        b.m0 = (tc % nbm) * MB;
        b.n0 = (tc / nbm) * NB;
        b.len = min(MB, p.m - b.m0);
    }
    return b;
}

fn coop16(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, sg: u32, lane: u32, quant: bool,
          gather: bool) {
    let b = block(flat_wg(wid, nwg), lid, gather);
    workgroupBarrier();
    let n0 = b.n0;
    let sn = (sg % 2u) * 64u;
    let sm = (sg / 2u) * 32u;
    // cIJ: W rows sn + 16 I.., x rows sm + 16 J...
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>();
    var c21 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>();
    var c31 = coop_mat16x16<f32, C>();
    let steps = (p.k + KB - 1u) / KB;
    let ahead2 = (CX & 4u) == 0u;
    var r = fetch(lid, b, 0u, quant, gather);
    var r2: Pre;
    if ahead2 && steps > 1u {
        r2 = fetch(lid, b, KB, quant, gather);
    }
    for (var s = 0u; s < steps; s++) {
        let k0 = s * KB;
        workgroupBarrier();
        if s == 0u || (CX & 1u) == 0u {
            put(r, lid, n0, k0, quant);
        }
        workgroupBarrier();
        if (CX & 1u) == 0u {
            if ahead2 {
                r = r2;
                if s + 2u < steps {
                    r2 = fetch(lid, b, k0 + 2u * KB, quant, gather);
                }
            } else if s + 1u < steps {
                r = fetch(lid, b, k0 + KB, quant, gather);
            }
        }
        for (var kk = 0u; kk < KB && (CX & 2u) == 0u; kk += 16u) {
            let a0o = kk * WTS + sn;
            let a1o = kk * WTS + sn + 16u;
            let a2o = kk * WTS + sn + 32u;
            let a3o = kk * WTS + sn + 48u;
            let b0o = sm * XTS + kk;
            let b1o = (sm + 16u) * XTS + kk;
            let a0 = coopLoad<coop_mat16x16<f16, A>>(&wt16[a0o], WTS);
            let a1 = coopLoad<coop_mat16x16<f16, A>>(&wt16[a1o], WTS);
            let a2 = coopLoad<coop_mat16x16<f16, A>>(&wt16[a2o], WTS);
            let a3 = coopLoad<coop_mat16x16<f16, A>>(&wt16[a3o], WTS);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&xt16[b0o], XTS);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&xt16[b1o], XTS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
        }
    }
    let so = sg * 256u;
    let n = n0 + sn;
    let m = sm;
    // Column-major stores of yᵀ tiles: element (n, m) at cs16[so + m * 16 + n].
    coopStore(c00, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n, m, b, gather);
    workgroupBarrier();
    coopStore(c01, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n, m + 16u, b, gather);
    workgroupBarrier();
    coopStore(c10, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n + 16u, m, b, gather);
    workgroupBarrier();
    coopStore(c11, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n + 16u, m + 16u, b, gather);
    workgroupBarrier();
    coopStore(c20, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n + 32u, m, b, gather);
    workgroupBarrier();
    coopStore(c21, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n + 32u, m + 16u, b, gather);
    workgroupBarrier();
    coopStore(c30, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n + 48u, m, b, gather);
    workgroupBarrier();
    coopStore(c31, &cs16[so], 16u);
    workgroupBarrier();
    write_tile(sg, lane, n + 48u, m + 16u, b, gather);
}

// T = 8: the same with 8 x 8 tiles.
fn coop8(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, sg: u32, quant: bool) {
    let T = 8u;
    let bsz = 4u * T;
    let o = block_origin(flat_wg(wid, nwg), bsz);
    let sm = (sg / 2u) * 2u * T;
    let sn = (sg % 2u) * 2u * T;
    zero_ct(lid, bsz);
    workgroupBarrier();
    let c00o = sm * bsz + sn;
    let c01o = sm * bsz + sn + T;
    let c10o = (sm + T) * bsz + sn;
    let c11o = (sm + T) * bsz + sn + T;
    var c00 = coopLoad<coop_mat8x8<f32, C>>(&ct[c00o], bsz);
    var c01 = coopLoad<coop_mat8x8<f32, C>>(&ct[c01o], bsz);
    var c10 = coopLoad<coop_mat8x8<f32, C>>(&ct[c10o], bsz);
    var c11 = coopLoad<coop_mat8x8<f32, C>>(&ct[c11o], bsz);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        workgroupBarrier();
        load_tiles(lid, o, k0, bsz, quant);
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += T) {
            let a0o = kk * bsz + sn;
            let a1o = kk * bsz + sn + T;
            let b0o = sm * BK + kk;
            let b1o = (sm + T) * BK + kk;
            let a0 = coopLoad<coop_mat8x8<f16, A>>(&wt[a0o], bsz);
            let a1 = coopLoad<coop_mat8x8<f16, A>>(&wt[a1o], bsz);
            let b0 = coopLoad<coop_mat8x8<f16, B>>(&xt[b0o], BK);
            let b1 = coopLoad<coop_mat8x8<f16, B>>(&xt[b1o], BK);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a1, b0, c01);
            c10 = coopMultiplyAdd(a0, b1, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
    }
    workgroupBarrier();
    coopStore(c00, &ct[c00o], bsz);
    coopStore(c01, &ct[c01o], bsz);
    coopStore(c10, &ct[c10o], bsz);
    coopStore(c11, &ct[c11o], bsz);
    workgroupBarrier();
    store_ct(lid, o, bsz);
}

@compute @workgroup_size(WG)
fn qmm_coop16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32,
              @builtin(subgroup_invocation_id) lane: u32) {
    coop16(wid, nwg, lid, sg, lane, true, false);
}

// The routed prefill matmul (moe.rs gather_qmm, sorted path): y[pair] = x[pair / x_div] ·
// W[expert]ᵀ over tiles of <= 64 pairs of one expert (WG = 128).
@compute @workgroup_size(WG)
fn gqmm_coop16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32) {
    coop16(wid, nwg, lid, sg, lane, true, true);
}

@compute @workgroup_size(WG)
fn matmul_coop16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32,
                 @builtin(subgroup_invocation_id) lane: u32) {
    coop16(wid, nwg, lid, sg, lane, false, false);
}

@compute @workgroup_size(WG)
fn qmm_coop8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    coop8(wid, nwg, lid, sg, true);
}

@compute @workgroup_size(WG)
fn matmul_coop8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    coop8(wid, nwg, lid, sg, false);
}

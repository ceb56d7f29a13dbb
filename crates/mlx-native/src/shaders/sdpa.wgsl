// sdpa: scaled dot-product attention of f32 queries over one KvCache layer (f16 or f32 K/V
// laid out [1, kv_heads, slots, head_dim]; key position k lives in slot k % slots).
//
//   sdpa_decode         one query per head (the token at position kv_hi - 1), split-K: each
//                       workgroup takes one kv head, GT of its query heads (GQA: K/V read once
//                       for all of them) and split_len positions, and writes a partial (max,
//                       sum, unnormalized output) per head and split; with one split it
//                       writes the normalized output itself. See "Decode" below.
//   sdpa_decode_reduce  one workgroup per head combines the splits (and the sink) into out.
//   sdpa_prefill        T queries at positions q0..q0+T, tiled flash attention with online
//                       softmax: a workgroup takes BM (query, head) rows of one kv head and
//                       streams BN keys at a time through workgroup memory.
//
// Logits: s = q.k * scale; with softcap c > 0, s = c * tanh(s / c); plus the additive mask
// (prefill). A sink (per head) joins the softmax denominator with no value.
// Key k is visible to the query at position qp when k <= qp (causal; decode always),
// and k > qp - window when window > 0.
//
// Bindings: 0 q f32, 1 k cache, 2 v cache, 3 part_o (decode) / out (prefill) f32,
// 4 part_ml f32 [n_heads, n_splits, 2], 5 sinks f32 [n_heads], 6 out (decode_reduce, and
// decode with one split) f32 as bits (then XQ_OUT's chunks), 7 mask f32 [T, mask_stride]
// (prefill).
struct Params {
    n_heads: u32,
    kv_heads: u32,
    group: u32,
    slots: u32,
    kv_lo: u32,
    kv_hi: u32,
    split_len: u32,
    n_splits: u32,
    g_tiles: u32,
    tokens: u32,
    q0: u32,
    window: u32,
    causal: u32,
    has_mask: u32,
    mask_stride: u32,
    has_sinks: u32,
    scale: f32,
    softcap: f32,
    row_tiles: u32,
    // XQ_OUT: the chunks' first word, counted from out's.
    xo: u32,
}

override HEAD_DIM: u32 = 128u;
// Query heads per decode workgroup (1, 2, 4 or 8).
override GT: u32 = 8u;
// Prefill tile: BM (query, head) rows by BN keys.
override BM: u32 = 32u;
override BN: u32 = 32u;
override C4: u32 = HEAD_DIM / 4u;
// Decode (one split) and decode_reduce: the normalized output also written quantized per
// 32-element chunk for o's matvec (common/xq_quantize.wgsl: BITS << 2 | XQ of o's weights;
// ops::qmatmul::QuantizedX), which then quantizes no x in its row-sets. 0: f32 only.
override XQ_OUT: u32 = 0u;
override BITS: u32 = XQ_OUT >> 2u;
override XQ: u32 = XQ_OUT & 3u;

const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<u32>;
@group(0) @binding(7) var<storage, read> mask: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

// The caches are read in 16-byte quads (KVQ): 4 f32 or 8 f16 elements. Cache views start at
// a multiple of 8 elements (the cache owns its buffers: they start at offset 0).
// W4: quads per K/V row. load_k/load_v (prefill): 4 elements at element 4 * c of a row.
#if DT_F32
alias KVQ = vec4<f32>;
override W4: u32 = HEAD_DIM / 4u;
@group(0) @binding(1) var<storage, read> kc: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vc: array<vec4<f32>>;
fn load_k(row: u32, c: u32) -> vec4<f32> {
    return kc[view(1u) / 4u + row * C4 + c];
}
fn load_v(row: u32, c: u32) -> vec4<f32> {
    return vc[view(2u) / 4u + row * C4 + c];
}
fn k_quad(i: u32) -> KVQ {
    return kc[view(1u) / 4u + i];
}
fn v_quad(i: u32) -> KVQ {
    return vc[view(2u) / 4u + i];
}
#else
alias KVQ = vec4<u32>;
override W4: u32 = HEAD_DIM / 8u;
@group(0) @binding(1) var<storage, read> kc: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> vc: array<vec4<u32>>;
fn halves(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
// Chunk c of a row is half of quad c / 2 (rows hold an even number of chunks).
fn load_k(row: u32, c: u32) -> vec4<f32> {
    let w = kc[view(1u) / 8u + (row * C4 + c) / 2u];
    return halves(select(w.xy, w.zw, (c & 1u) != 0u));
}
fn load_v(row: u32, c: u32) -> vec4<f32> {
    let w = vc[view(2u) / 8u + (row * C4 + c) / 2u];
    return halves(select(w.xy, w.zw, (c & 1u) != 0u));
}
fn k_quad(i: u32) -> KVQ {
    return kc[view(1u) / 8u + i];
}
fn v_quad(i: u32) -> KVQ {
    return vc[view(2u) / 8u + i];
}
#endif

fn logit(dot_qk: f32) -> f32 {
    var s = dot_qk * p.scale;
    if p.softcap > 0.0 {
        // tanh saturates in f32 beyond |x| = 10; clamping avoids exp overflow inside it.
        s = p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0));
    }
    return s;
}

// Slot of position `pos`, given the slot `s0` of a position at most `slots` before it.
fn wrap(s: u32) -> u32 {
    return select(s, s - p.slots, s >= p.slots);
}

// ---------------------------------------------------------------------------------------
// Decode: K and V are read straight from the cache (no staging in workgroup memory).
//
// Invocation (row r = lid / W4, quad c = lid % W4) works on quad c of KR = 128 / W4 key rows
// at a time and keeps its own online softmax: per trip of KI = 4 * KR keys it holds the K
// and V quads of keys t0 + r + u * KR (u = 0..3), loaded straight from the cache (the W4
// invocations of a row read one contiguous row in 16-byte loads), its query dims as columns
// of mat4x4s (heads 0..3, and 4..7 in a second set) and its dims of the GT accumulators.
// Subgroup path (W4 a power of two that fits the subgroup; rows are taken from subgroup
// lanes): the next trip's K and V are issued first, then the partial dots of the four keys
// are summed over the row by shuffles (every lane gets the logits), then the softmax step
// and p * V. No barrier in the loop.
// Workgroup-memory path: partial dots go to dr_sh, the next K is issued, barrier; each
// invocation sums its row's W4 partials for its four keys, steps, adds p * V, then issues
// the next V. One barrier per trip (two when GT > 4: dr_sh is double-buffered only for one
// head quad).
// At the end the KR rows merge (max, sum, output) through workgroup memory (see dr_sh).
// H200 (Vulkan), Llama-3.1-8B heads, f16, 256 workgroups: 30 us at 8k keys, 70 us at 32k
// (47% of read bandwidth), 110 us at 64k (59%); the staged-tile kernel this replaced took
// 45 / 148 / 268 us. The workgroup-memory path: 36 / 103 us at 8k / 32k. More workgroups
// were slower (512: 36 / 76 us; 1024: 48 / 87 us), fewer too (128: 33 / 87 us).
override KR: u32 = 128u / W4;
override KI: u32 = 4u * KR;
// Head quads (vec4s of per-head values): 1, or 2 when GT = 8.
override GQ: u32 = (GT + 3u) / 4u;
// Measurement switches of the subgroup loop (0 in production; ops::sdpa::set_decode_exp),
// results invalid when set: bit 0 loads only (the K and V words folded into the
// accumulator, no dots or softmax), bit 1 no row-sum shuffles (a lane's partial dot taken
// as the logit). docs/PERFORMANCE.md (session 7) has what they showed and the variants
// measured and dropped (halves by integer operations, loads two trips ahead, a per-head
// merge in a quarter of the workgroup memory); bit 2 merges in rounds without the pairs'
// shuffle (valid results).
override DX: u32 = 0u;

// The rows' merge takes 4 * C4 * KR vec4s (16 KiB for f16 at any head dim, 8 for f32); the
// subgroup path needs dr_sh for nothing else and merges in 8 KiB: pairs of rows summed by a
// shuffle first where a subgroup holds both, else in rounds of a dim slice each. Measured on
// an H200 (`bench attention`, Llama heads, f16, of the read bandwidth; 16 KiB -> 8 KiB with
// the pairs' shuffle): 8k keys in a pass 41.6 -> 43.9 %, streaming 55.6 -> 70.5 %; 32k in a
// pass 64.6 -> 64.1 %, streaming 68.7 -> 77.2 %; 1k in a pass 10.0 -> 11.5 %. qmv showed the
// same: 8-9 KiB a workgroup streams fastest on that driver (docs/PERFORMANCE.md, session
// 12).
#if SUBGROUPS
const DR_LEN: u32 = 512u;
#else
const DR_LEN: u32 = 1024u;
#endif
var<workgroup> dr_sh: array<vec4<f32>, DR_LEN>;
var<workgroup> dm_sh: array<vec4<f32>, 32>;
var<workgroup> dl_sh: array<vec4<f32>, 32>;

// Quad c of key position t0 + j (slot wrap(s0 + j)) of K (is_v false) or V; zeros when the
// position is >= k_end or the invocation is idle (no memory read).
fn d_load(is_v: bool, on: bool, rowbase: u32, t0: u32, s0: u32, j: u32, c: u32,
          k_end: u32) -> KVQ {
    var r = KVQ();
    if on && t0 + j < k_end {
        let o = (rowbase + wrap(s0 + j)) * W4 + c;
        if is_v {
            r = v_quad(o);
        } else {
            r = k_quad(o);
        }
    }
    return r;
}

// Query dims d0..d0 + 3 of head g (zeros past ng).
fn d_qcol(h0: u32, ng: u32, g: u32, d0: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if g < ng {
        let o = view(0u) + (h0 + g) * HEAD_DIM + d0;
        v = vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
    }
    return v;
}

// Dots of a K quad with four heads (their dims as columns of qa, and qb for f16's upper
// half).
fn d_dots(kq: KVQ, qa: mat4x4<f32>, qb: mat4x4<f32>) -> vec4<f32> {
#if DT_F32
    return kq * qa;
#else
    return halves(kq.xy) * qa + halves(kq.zw) * qb;
#endif
}

// a * diag(al) + sum over u of outer(v_u, p_u).
fn d_acc(a: mat4x4<f32>, al: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>,
         v3: vec4<f32>, p0: vec4<f32>, p1: vec4<f32>, p2: vec4<f32>,
         p3: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(
        a[0] * al.x + v0 * p0.x + v1 * p1.x + v2 * p2.x + v3 * p3.x,
        a[1] * al.y + v0 * p0.y + v1 * p1.y + v2 * p2.y + v3 * p3.y,
        a[2] * al.z + v0 * p0.z + v1 * p1.z + v2 * p2.z + v3 * p3.z,
        a[3] * al.w + v0 * p0.w + v1 * p1.w + v2 * p2.w + v3 * p3.w);
}

fn d_logits(d: vec4<f32>, valid: bool) -> vec4<f32> {
    return select(vec4<f32>(M_INIT), vec4<f32>(logit(d.x), logit(d.y), logit(d.z),
                  logit(d.w)), valid);
}

fn d_lo(v: KVQ) -> vec4<f32> {
#if DT_F32
    return v;
#else
    return halves(v.xy);
#endif
}

fn d_hi(v: KVQ) -> vec4<f32> {
#if DT_F32
    return vec4<f32>(0.0);
#else
    return halves(v.zw);
#endif
}

// Running state of four heads: max, sum, accumulators (dims of the low and high half).
struct DState {
    m: vec4<f32>,
    l: vec4<f32>,
    oa: mat4x4<f32>,
    ob: mat4x4<f32>,
}

// Sum of row r's partials for keys u = 0..3 at dr_sh offset b (head quad gq).
struct D4 {
    s0: vec4<f32>,
    s1: vec4<f32>,
    s2: vec4<f32>,
    s3: vec4<f32>,
}

fn d_sum(b: u32, r: u32, gq: u32) -> D4 {
    var o = D4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var cc = 0u; cc < W4; cc++) {
        let i = r * W4 + cc;
        o.s0 += dr_sh[b + i * GQ + gq];
        o.s1 += dr_sh[b + (128u + i) * GQ + gq];
        o.s2 += dr_sh[b + (256u + i) * GQ + gq];
        o.s3 += dr_sh[b + (384u + i) * GQ + gq];
    }
    return o;
}

// Online-softmax step of four heads over four keys (logits in d, validity per key).
fn d_step(st: DState, d: D4, ok0: bool, ok1: bool, ok2: bool, ok3: bool, v0: KVQ, v1: KVQ,
          v2: KVQ, v3: KVQ) -> DState {
    let g0 = d_logits(d.s0, ok0);
    let g1 = d_logits(d.s1, ok1);
    let g2 = d_logits(d.s2, ok2);
    let g3 = d_logits(d.s3, ok3);
    let mn = max(st.m, max(max(g0, g1), max(g2, g3)));
    let al = exp(st.m - mn);
    let z = vec4<f32>(0.0);
    let p0 = select(z, exp(g0 - mn), ok0);
    let p1 = select(z, exp(g1 - mn), ok1);
    let p2 = select(z, exp(g2 - mn), ok2);
    let p3 = select(z, exp(g3 - mn), ok3);
    var o = st;
    o.m = mn;
    o.l = st.l * al + (p0 + p1) + (p2 + p3);
    o.oa = d_acc(st.oa, al, d_lo(v0), d_lo(v1), d_lo(v2), d_lo(v3), p0, p1, p2, p3);
#if !DT_F32
    o.ob = d_acc(st.ob, al, d_hi(v0), d_hi(v1), d_hi(v2), d_hi(v3), p0, p1, p2, p3);
#endif
    return o;
}

// The merge's values of row r's accumulators of four heads, scaled by f: dim quad 2c (or c
// for f32) of each head in [0..3], quad 2c + 1 in [4..7] (f16; zeros for f32).
fn d_scaled(st: DState, f: vec4<f32>) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(st.oa[0] * f.x, st.oa[1] * f.y, st.oa[2] * f.z,
                               st.oa[3] * f.w, st.ob[0] * f.x, st.ob[1] * f.y,
                               st.ob[2] * f.z, st.ob[3] * f.w);
}

// Merge round hh: the values v of row slot rs (of `rows`) for the round's dim quads
// hh * hq.. into dr_sh [head, dim quad - hh * hq, row slot]; invocations whose quads lie in
// another round write nothing.
fn d_put(v: array<vec4<f32>, 8>, rs: u32, rows: u32, c: u32, hh: u32, hq: u32) {
#if DT_F32
    if c / hq == hh {
        let d = c - hh * hq;
        dr_sh[(0u * hq + d) * rows + rs] = v[0];
        dr_sh[(1u * hq + d) * rows + rs] = v[1];
        dr_sh[(2u * hq + d) * rows + rs] = v[2];
        dr_sh[(3u * hq + d) * rows + rs] = v[3];
    }
#else
    // Quads 2c and 2c + 1 (hq is even) lie in the same round.
    if (2u * c) / hq == hh {
        let d = 2u * c - hh * hq;
        dr_sh[(0u * hq + d) * rows + rs] = v[0];
        dr_sh[(1u * hq + d) * rows + rs] = v[1];
        dr_sh[(2u * hq + d) * rows + rs] = v[2];
        dr_sh[(3u * hq + d) * rows + rs] = v[3];
        dr_sh[(0u * hq + d + 1u) * rows + rs] = v[4];
        dr_sh[(1u * hq + d + 1u) * rows + rs] = v[5];
        dr_sh[(2u * hq + d + 1u) * rows + rs] = v[6];
        dr_sh[(3u * hq + d + 1u) * rows + rs] = v[7];
    }
#endif
}

// Measurement (DX bit 0): quads mixed into one value that keeps their loads alive.
fn d_mix(a: KVQ, b: KVQ) -> KVQ {
#if DT_F32
    return a + b;
#else
    return a ^ b;
#endif
}
fn d_fold(a: KVQ, b: KVQ) -> vec4<f32> {
#if DT_F32
    return a + b;
#else
    return bitcast<vec4<f32>>(a ^ b) * 1e-30;
#endif
}

// Output quad o4 of head g (workgroup-relative) from the rows' sum a: normalized into out
// when there is one split (the sink joins the denominator as in combine_splits; no reduce
// dispatch follows), else into the split's partial.
fn d_emit(g: u32, o4: u32, a: vec4<f32>, hm: f32, den0: f32, h0: u32, split: u32) {
    if p.n_splits == 1u {
        var den = den0;
        if p.has_sinks != 0u {
            den += exp(sinks[view(5u) + h0 + g] - hm);
        }
        let inv = select(0.0, 1.0 / den, den > 0.0);
        let oo = view(6u) + (h0 + g) * HEAD_DIM + o4 * 4u;
        out[oo] = bitcast<u32>(a.x * inv);
        out[oo + 1u] = bitcast<u32>(a.y * inv);
        out[oo + 2u] = bitcast<u32>(a.z * inv);
        out[oo + 3u] = bitcast<u32>(a.w * inv);
    } else {
        let po = view(3u) + ((h0 + g) * p.n_splits + split) * HEAD_DIM + o4 * 4u;
        part_o[po] = a.x;
        part_o[po + 1u] = a.y;
        part_o[po + 2u] = a.z;
        part_o[po + 3u] = a.w;
    }
}

#if SUBGROUPS
// Sum over the W4 invocations of a row (adjacent lanes of one subgroup; W4 is a power of
// two no larger than the subgroup): every lane gets the row's sum.
fn d_rowsum(v: vec4<f32>) -> vec4<f32> {
    var s = v;
    for (var m = 1u; m < W4; m <<= 1u) {
        s += subgroupShuffleXor(s, m);
    }
    return s;
}
#endif

@compute @workgroup_size(128)
fn sdpa_decode(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
                      , @builtin(subgroup_invocation_id) sl: u32,
                      @builtin(subgroup_id) si: u32, @builtin(subgroup_size) ssz: u32
#endif
) {
    let wg = flat_wg(wid, nwg);
    let split = wg % p.n_splits;
    let rest = wg / p.n_splits;
    let gtile = rest % p.g_tiles;
    let kvh = rest / p.g_tiles;
    if kvh >= p.kv_heads {
        return;
    }
    let g0 = gtile * GT;
    let ng = min(GT, p.group - g0);
    let h0 = kvh * p.group + g0;
    let k_start = p.kv_lo + split * p.split_len;
    let k_end = min(p.kv_hi, k_start + p.split_len);
    let rowbase = kvh * p.slots;
#if SUBGROUPS
    // Rows are taken from subgroup lanes, so a row never straddles two subgroups.
    let me = si * ssz + sl;
#else
    let me = lid;
#endif
    let c = me % W4;
    let r = me / W4;
    let on = r < KR;

#if DT_F32
    let da = 4u * c;
#else
    let da = 8u * c;
#endif
    let qa = mat4x4<f32>(d_qcol(h0, ng, 0u, da), d_qcol(h0, ng, 1u, da),
                         d_qcol(h0, ng, 2u, da), d_qcol(h0, ng, 3u, da));
    let qa2 = mat4x4<f32>(d_qcol(h0, ng, 4u, da), d_qcol(h0, ng, 5u, da),
                          d_qcol(h0, ng, 6u, da), d_qcol(h0, ng, 7u, da));
#if DT_F32
    let qb = mat4x4<f32>();
    let qb2 = mat4x4<f32>();
#else
    let db = da + 4u;
    let qb = mat4x4<f32>(d_qcol(h0, ng, 0u, db), d_qcol(h0, ng, 1u, db),
                         d_qcol(h0, ng, 2u, db), d_qcol(h0, ng, 3u, db));
    let qb2 = mat4x4<f32>(d_qcol(h0, ng, 4u, db), d_qcol(h0, ng, 5u, db),
                          d_qcol(h0, ng, 6u, db), d_qcol(h0, ng, 7u, db));
#endif

    let z = mat4x4<f32>();
    var st = DState(vec4<f32>(M_INIT), vec4<f32>(0.0), z, z);
    var st2 = DState(vec4<f32>(M_INIT), vec4<f32>(0.0), z, z);
    var s0 = k_start % p.slots;
    var k0 = d_load(false, on, rowbase, k_start, s0, r, c, k_end);
    var k1 = d_load(false, on, rowbase, k_start, s0, r + KR, c, k_end);
    var k2 = d_load(false, on, rowbase, k_start, s0, r + 2u * KR, c, k_end);
    var k3 = d_load(false, on, rowbase, k_start, s0, r + 3u * KR, c, k_end);
    var v0 = d_load(true, on, rowbase, k_start, s0, r, c, k_end);
    var v1 = d_load(true, on, rowbase, k_start, s0, r + KR, c, k_end);
    var v2 = d_load(true, on, rowbase, k_start, s0, r + 2u * KR, c, k_end);
    var v3 = d_load(true, on, rowbase, k_start, s0, r + 3u * KR, c, k_end);
    var odd = false;
    for (var t0 = k_start; t0 < k_end; t0 += KI) {
        let tn = t0 + KI;
        let sn = tn % p.slots;
        let ok0 = on && t0 + r < k_end;
        let ok1 = on && t0 + r + KR < k_end;
        let ok2 = on && t0 + r + 2u * KR < k_end;
        let ok3 = on && t0 + r + 3u * KR < k_end;
#if SUBGROUPS
        // Every invocation is on (W4 divides the subgroup, which divides 128): dots, the
        // next K, row sums by shuffles, softmax step, p * V, the next V. No barrier.
        // The next trip's K and V are issued first: a whole trip in flight.
        let nk0 = d_load(false, on, rowbase, tn, sn, r, c, k_end);
        let nk1 = d_load(false, on, rowbase, tn, sn, r + KR, c, k_end);
        let nk2 = d_load(false, on, rowbase, tn, sn, r + 2u * KR, c, k_end);
        let nk3 = d_load(false, on, rowbase, tn, sn, r + 3u * KR, c, k_end);
        let nv0 = d_load(true, on, rowbase, tn, sn, r, c, k_end);
        let nv1 = d_load(true, on, rowbase, tn, sn, r + KR, c, k_end);
        let nv2 = d_load(true, on, rowbase, tn, sn, r + 2u * KR, c, k_end);
        let nv3 = d_load(true, on, rowbase, tn, sn, r + 3u * KR, c, k_end);
        if (DX & 1u) != 0u {
            st.oa[0] += d_fold(d_mix(d_mix(k0, k1), d_mix(k2, k3)),
                               d_mix(d_mix(v0, v1), d_mix(v2, v3)));
        } else {
            let e0 = d_dots(k0, qa, qb);
            let e1 = d_dots(k1, qa, qb);
            let e2 = d_dots(k2, qa, qb);
            let e3 = d_dots(k3, qa, qb);
            var f0 = vec4<f32>(0.0);
            var f1 = vec4<f32>(0.0);
            var f2 = vec4<f32>(0.0);
            var f3 = vec4<f32>(0.0);
            if GT > 4u {
                f0 = d_dots(k0, qa2, qb2);
                f1 = d_dots(k1, qa2, qb2);
                f2 = d_dots(k2, qa2, qb2);
                f3 = d_dots(k3, qa2, qb2);
            }
            var ds = D4(e0, e1, e2, e3);
            if (DX & 2u) == 0u {
                ds = D4(d_rowsum(e0), d_rowsum(e1), d_rowsum(e2), d_rowsum(e3));
            }
            st = d_step(st, ds, ok0, ok1, ok2, ok3, v0, v1, v2, v3);
            if GT > 4u {
                let ds2 = D4(d_rowsum(f0), d_rowsum(f1), d_rowsum(f2), d_rowsum(f3));
                st2 = d_step(st2, ds2, ok0, ok1, ok2, ok3, v0, v1, v2, v3);
            }
        }
        k0 = nk0;
        k1 = nk1;
        k2 = nk2;
        k3 = nk3;
        v0 = nv0;
        v1 = nv1;
        v2 = nv2;
        v3 = nv3;
#else
        // 1. Partial dots, then the next trip's K.
        let b = select(0u, 512u, GQ == 1u && odd);
        dr_sh[b + lid * GQ] = d_dots(k0, qa, qb);
        dr_sh[b + (128u + lid) * GQ] = d_dots(k1, qa, qb);
        dr_sh[b + (256u + lid) * GQ] = d_dots(k2, qa, qb);
        dr_sh[b + (384u + lid) * GQ] = d_dots(k3, qa, qb);
        if GT > 4u {
            dr_sh[b + lid * GQ + 1u] = d_dots(k0, qa2, qb2);
            dr_sh[b + (128u + lid) * GQ + 1u] = d_dots(k1, qa2, qb2);
            dr_sh[b + (256u + lid) * GQ + 1u] = d_dots(k2, qa2, qb2);
            dr_sh[b + (384u + lid) * GQ + 1u] = d_dots(k3, qa2, qb2);
        }
        k0 = d_load(false, on, rowbase, tn, sn, r, c, k_end);
        k1 = d_load(false, on, rowbase, tn, sn, r + KR, c, k_end);
        k2 = d_load(false, on, rowbase, tn, sn, r + 2u * KR, c, k_end);
        k3 = d_load(false, on, rowbase, tn, sn, r + 3u * KR, c, k_end);
        workgroupBarrier();

        // 2. Logits of this row's four keys, softmax step, p * V; then the next V.
        if on {
            st = d_step(st, d_sum(b, r, 0u), ok0, ok1, ok2, ok3, v0, v1, v2, v3);
            if GT > 4u {
                st2 = d_step(st2, d_sum(b, r, 1u), ok0, ok1, ok2, ok3, v0, v1, v2, v3);
            }
        }
        if GQ > 1u {
            workgroupBarrier();
        }
        odd = !odd;
        v0 = d_load(true, on, rowbase, tn, sn, r, c, k_end);
        v1 = d_load(true, on, rowbase, tn, sn, r + KR, c, k_end);
        v2 = d_load(true, on, rowbase, tn, sn, r + 2u * KR, c, k_end);
        v3 = d_load(true, on, rowbase, tn, sn, r + 3u * KR, c, k_end);
#endif
    }

    // Merge the KR rows: maxima and sums, then the outputs four heads a round.
    if on && c == 0u {
        dm_sh[r * GQ] = st.m;
        dl_sh[r * GQ] = st.l;
        if GQ > 1u {
            dm_sh[r * GQ + 1u] = st2.m;
            dl_sh[r * GQ + 1u] = st2.l;
        }
    }
    workgroupBarrier();
    var mx = vec4<f32>(M_INIT);
    var mx2 = vec4<f32>(M_INIT);
    for (var rr = 0u; rr < KR; rr++) {
        mx = max(mx, dm_sh[rr * GQ]);
        if GQ > 1u {
            mx2 = max(mx2, dm_sh[rr * GQ + 1u]);
        }
    }
    var lt = vec4<f32>(0.0);
    var lt2 = vec4<f32>(0.0);
    for (var rr = 0u; rr < KR; rr++) {
        lt += dl_sh[rr * GQ] * exp(dm_sh[rr * GQ] - mx);
        if GQ > 1u {
            lt2 += dl_sh[rr * GQ + 1u] * exp(dm_sh[rr * GQ + 1u] - mx2);
        }
    }
    // Where a subgroup holds two rows (2 W4 lanes), each pair is summed by one shuffle
    // first: half the rows to merge, in one round (DX bit 2: rounds instead, measurement).
#if SUBGROUPS
    let pre = 2u * W4 <= ssz && (DX & 4u) == 0u;
#else
    let pre = false;
#endif
    let rows = select(KR, KR / 2u, pre);
    let nh = max(4u * C4 * rows / DR_LEN, 1u);
    let hq = C4 / nh;
    for (var rd = 0u; rd < GQ; rd++) {
        var v: array<vec4<f32>, 8>;
        if rd == 0u {
            v = d_scaled(st, exp(st.m - mx));
        } else {
            v = d_scaled(st2, exp(st2.m - mx2));
        }
#if SUBGROUPS
        // Rows r and r ^ 1 are lanes me and me ^ W4 of one subgroup (every lane is on; pre
        // is the same in every subgroup: all are ssz wide, as `me` assumes).
        if pre {
            let w = array<vec4<f32>, 8>(subgroupShuffleXor(v[0], W4),
                                        subgroupShuffleXor(v[1], W4),
                                        subgroupShuffleXor(v[2], W4),
                                        subgroupShuffleXor(v[3], W4),
                                        subgroupShuffleXor(v[4], W4),
                                        subgroupShuffleXor(v[5], W4),
                                        subgroupShuffleXor(v[6], W4),
                                        subgroupShuffleXor(v[7], W4));
            v = array<vec4<f32>, 8>(v[0] + w[0], v[1] + w[1], v[2] + w[2], v[3] + w[3],
                                    v[4] + w[4], v[5] + w[5], v[6] + w[6], v[7] + w[7]);
        }
#endif
        for (var hh = 0u; hh < nh; hh++) {
            if rd > 0u || hh > 0u {
                workgroupBarrier();
            }
            if on && (!pre || (r & 1u) == 0u) {
                d_put(v, select(r, r / 2u, pre), rows, c, hh, hq);
            }
            workgroupBarrier();
            for (var o = lid; o < 4u * hq; o += 128u) {
                let g = 4u * rd + o / hq;
                if g < ng {
                    var a = vec4<f32>(0.0);
                    for (var rr = 0u; rr < rows; rr++) {
                        a += dr_sh[o * rows + rr];
                    }
                    let hm = select(mx, mx2, rd > 0u)[g % 4u];
                    let den = select(lt, lt2, rd > 0u)[g % 4u];
                    d_emit(g, hh * hq + o % hq, a, hm, den, h0, split);
                }
            }
        }
    }
    if XQ_OUT != 0u && p.n_splits == 1u {
        store_out_chunks(h0, ng, me);
    }
    if lid < ng && p.n_splits > 1u {
        let hi = lid >= 4u;
        let o = view(4u) + ((h0 + lid) * p.n_splits + split) * 2u;
        part_ml[o] = select(mx, mx2, hi)[lid % 4u];
        part_ml[o + 1u] = select(lt, lt2, hi)[lid % 4u];
    }
}

// One workgroup per head (common/split_reduce.wgsl).
@compute @workgroup_size(128)
fn sdpa_decode_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let h = flat_wg(wid, nwg);
    if h >= p.n_heads {
        return;
    }
    let t = combine_splits(h, lid);
    if lid < C4 {
        let o = view(6u) + h * HEAD_DIM + lid * 4u;
        out[o] = bitcast<u32>(t.x);
        out[o + 1u] = bitcast<u32>(t.y);
        out[o + 2u] = bitcast<u32>(t.z);
        out[o + 3u] = bitcast<u32>(t.w);
    }
    if XQ_OUT != 0u {
        // `slot` in quantize_part's order: the reduce has no subgroup path, its exchange
        // is the workgroup-memory one.
        store_out_chunks(h, 1u, lid);
    }
}

// XQ_OUT: heads h0..h0 + ng of out (written by this workgroup) quantized into chunks after
// them: four invocations a chunk, 8 values each, read back from out (storageBarrier makes
// the workgroup's own stores visible). `slot` in quantize_part's order. Called by the
// whole workgroup.
fn store_out_chunks(h0: u32, ng: u32, slot: u32) {
    storageBarrier();
    workgroupBarrier();
    let parts = ng * HEAD_DIM / 8u;
    for (var base = 0u; base < parts; base += 128u) {
        let part = base + slot;
        let on = part < parts;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        let e = view(6u) + h0 * HEAD_DIM + 8u * part;
        if on {
            a = bitcast<vec4<f32>>(vec4<u32>(out[e], out[e + 1u], out[e + 2u], out[e + 3u]));
            b = bitcast<vec4<f32>>(vec4<u32>(out[e + 4u], out[e + 5u], out[e + 6u],
                                             out[e + 7u]));
        }
        let q = quantize_part(a, b, slot);
        if on {
            let chunk = (h0 * HEAD_DIM) / 32u + part / 4u;
            let o = view(6u) + p.xo + chunk * 4u * XQ_VEC4S;
            let t = part % 4u;
            let off = part_offsets(t);
            let val = part_values(q);
            for (var j = 0u; j < 4u; j++) {
                out[o + off[j]] = val[j];
            }
            if t == 0u {
                for (var j = 0u; j < 4u; j++) {
                    out[o + 16u + j] = q.tail[j];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Prefill, tiled scalar path

// Row stride in workgroup memory, padded by one so rows start on different banks.
override DS: u32 = HEAD_DIM + 1u;
// Invocations per row, dims and keys each of them owns.
override TPR: u32 = 128u / BM;
override DPT: u32 = HEAD_DIM / TPR;
override KPT: u32 = BN / TPR;
// Q tile [BM, DS] at 0, K or V tile [BN, DS] at KV_OFF, scores/probabilities [BM, BN] at
// S_OFF. The Rust side picks BM and BN per head dim so that this fits 30 KiB.
override KV_OFF: u32 = BM * DS;
override S_OFF: u32 = (BM + BN) * DS;
var<workgroup> smem: array<f32, 7680>;

fn load_kv_tile(is_v: bool, rowbase: u32, kt: u32, khi: u32, lid: u32) {
    for (var i = lid; i < BN * C4; i += 128u) {
        let j = i / C4;
        let c = i % C4;
        let kp = kt + j;
        var v = vec4<f32>(0.0);
        if kp < khi {
            let row = rowbase + kp % p.slots;
            if is_v {
                v = load_v(row, c);
            } else {
                v = load_k(row, c);
            }
        }
        let o = KV_OFF + j * DS + c * 4u;
        smem[o] = v.x;
        smem[o + 1u] = v.y;
        smem[o + 2u] = v.z;
        smem[o + 3u] = v.w;
    }
}

@compute @workgroup_size(128)
fn sdpa_prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let wg = flat_wg(wid, nwg);
    let tile = wg % p.row_tiles;
    let kvh = wg / p.row_tiles;
    if kvh >= p.kv_heads {
        return;
    }
    let rows_total = p.tokens * p.group;
    let row0 = tile * BM;
    let row_end = min(row0 + BM, rows_total);
    let t_min = row0 / p.group;
    let t_max = (row_end - 1u) / p.group;
    let kv_len = p.q0 + p.tokens;
    var khi = kv_len;
    if p.causal != 0u {
        khi = min(kv_len, p.q0 + t_max + 1u);
    }
    var klo = 0u;
    if p.window > 0u {
        klo = max(p.q0 + t_min + 1u, p.window) - p.window;
    }
    for (var i = lid; i < BM * HEAD_DIM; i += 128u) {
        let r = i / HEAD_DIM;
        let d = i % HEAD_DIM;
        let rg = row0 + r;
        var v = 0.0;
        if rg < rows_total {
            let h = kvh * p.group + rg % p.group;
            v = q[view(0u) + ((rg / p.group) * p.n_heads + h) * HEAD_DIM + d];
        }
        smem[r * DS + d] = v;
    }
    let r = lid / TPR;
    let lane = lid % TPR;
    let rg = row0 + r;
    let row_ok = rg < rows_total;
    let tq = rg / p.group;
    let h = kvh * p.group + rg % p.group;
    let qpos = p.q0 + tq;
    let rowbase = kvh * p.slots;
    var m = M_INIT;
    var lsum = 0.0;
    var o: array<f32, 32>;
    for (var i = 0u; i < DPT; i++) {
        o[i] = 0.0;
    }
    var sc: array<f32, 8>;
    for (var kt = klo; kt < khi; kt += BN) {
        workgroupBarrier();
        load_kv_tile(false, rowbase, kt, khi, lid);
        workgroupBarrier();
        for (var kk = 0u; kk < KPT; kk++) {
            let j = lane + TPR * kk;
            let kp = kt + j;
            var ok = row_ok && kp < khi;
            if p.causal != 0u {
                ok = ok && kp <= qpos;
            }
            if p.window > 0u {
                ok = ok && kp + p.window > qpos;
            }
            var s = M_INIT;
            if ok {
                var d_acc = 0.0;
                for (var d = 0u; d < HEAD_DIM; d++) {
                    d_acc += smem[r * DS + d] * smem[KV_OFF + j * DS + d];
                }
                s = logit(d_acc);
                if p.has_mask != 0u {
                    s += mask[view(7u) + tq * p.mask_stride + kp];
                }
                // A -inf mask entry (or below M_INIT) counts as masked.
                s = max(s, M_INIT);
            }
            sc[kk] = s;
            smem[S_OFF + r * BN + j] = s;
        }
        workgroupBarrier();
        var tmax = M_INIT;
        for (var j = 0u; j < BN; j++) {
            tmax = max(tmax, smem[S_OFF + r * BN + j]);
        }
        let mn = max(m, tmax);
        let alpha = exp(m - mn);
        m = mn;
        lsum *= alpha;
        workgroupBarrier();
        for (var kk = 0u; kk < KPT; kk++) {
            let pv = select(0.0, exp(sc[kk] - mn), sc[kk] > M_INIT);
            lsum += pv;
            smem[S_OFF + r * BN + lane + TPR * kk] = pv;
        }
        load_kv_tile(true, rowbase, kt, khi, lid);
        workgroupBarrier();
        for (var i = 0u; i < DPT; i++) {
            let d = lane + TPR * i;
            var a = o[i] * alpha;
            for (var j = 0u; j < BN; j++) {
                a += smem[S_OFF + r * BN + j] * smem[KV_OFF + j * DS + d];
            }
            o[i] = a;
        }
    }
    workgroupBarrier();
    smem[S_OFF + lid] = lsum;
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < TPR; i++) {
        total += smem[S_OFF + r * TPR + i];
    }
    var keep = 1.0;
    if p.has_sinks != 0u && row_ok {
        let sk = sinks[view(5u) + h];
        let mf = max(m, sk);
        keep = exp(m - mf);
        total = total * keep + exp(sk - mf);
    }
    let inv = select(0.0, keep / total, total > 0.0);
    if row_ok {
        let ob = view(3u) + (tq * p.n_heads + h) * HEAD_DIM;
        for (var i = 0u; i < DPT; i++) {
            part_o[ob + lane + TPR * i] = o[i] * inv;
        }
    }
}

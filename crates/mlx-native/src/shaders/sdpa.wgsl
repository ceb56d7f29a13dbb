// sdpa: scaled dot-product attention of f32 queries over one KvCache layer (f16 or f32 K/V
// laid out [1, kv_heads, slots, head_dim]; key position k lives in slot k % slots).
//
//   sdpa_decode         one query per head (the token at position kv_hi - 1), split-K: each
//                       workgroup takes one kv head, GT of its query heads (GQA: K/V read once
//                       for the whole tile) and split_len positions (whole tiles of KT keys),
//                       and writes a partial (max, sum, unnormalized output) per head and
//                       split. See "Decode" below for the tile pipeline.
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
// 4 part_ml f32 [n_heads, n_splits, 2], 5 sinks f32 [n_heads], 6 out (decode_reduce) f32,
// 7 mask f32 [T, mask_stride] (prefill).
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
    _pad: u32,
}

override HEAD_DIM: u32 = 128u;
// Query heads per decode workgroup (1, 2, 4 or 8).
override GT: u32 = 8u;
// Keys per decode tile (the Rust side's decode_kt: one K tile and one V tile take 16 KiB
// at most).
override KT: u32 = 32u;
// Prefill tile: BM (query, head) rows by BN keys.
override BM: u32 = 32u;
override BN: u32 = 32u;
override C4: u32 = HEAD_DIM / 4u;

const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
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
// Decode
//
// A workgroup of 128 invocations streams its split through workgroup memory one tile of KT
// keys at a time (KT from decode_kt: KT * HEAD_DIM elements of K take at most 8 KiB). Per
// tile:
//   1. store: the tile's K and V quads, loaded into registers during the previous tile,
//      go to kt_sh / vt_sh; then the next tile's loads are issued (all of them before any
//      use: 16 KiB in flight per workgroup while this tile computes). Invocation i loads
//      quads i, i + 128, ...: consecutive invocations read consecutive 16 bytes of a row.
//      Positions outside the split (the tile's tail) load zeros and read no memory.
//   2. scores: invocation (key k = lid % KT, slice sl = lid / KT) dots quads sl, sl + NS,
//      ... of K row k with the GT query heads (q_sh); the KT keys of a slice are adjacent
//      invocations, so q reads are broadcasts and K reads (rows RQ quads apart, RQ odd)
//      hit distinct banks. Partial dots go to sc_sh [slice][key][head quad].
//   3. logits: invocation (key k, head quad hq) sums its NS partials and applies scale and
//      softcap (M_INIT past k_end), into sc_sh [key][quad] (the slice-0 entry it alone read).
//   4. softmax: the same invocation takes the tile max of its four heads over the KT keys
//      (broadcast reads), the new running max mn and p = exp(s - mn) into sc_sh at P_OFF
//      [key][quad]; the key-0 invocation publishes alpha = exp(m_old - mn) and mn.
//   5. values: invocation (key subset ks = lid / C4, four-dim chunk c = lid % C4) scales its
//      GT accumulators (and partial sums of p) by alpha and adds p * V for keys ks, ks + KS...
// Phases 2, 4 and 5 take two quads, four keys and two keys per loop trip with every
// workgroup-memory read of a trip issued before its arithmetic (the driver does not unroll
// naga's bounded loops, so independent reads must be written side by side).
// H100 (Vulkan), Llama-3.1-8B heads, f16: 63 us at 8k keys, 192 us at 32k (24% of read
// bandwidth); without any K/V reads the kernel takes 70 / 210 us and without its compute
// 44 / 116 us, so it is latency-bound, not bandwidth-bound, in both halves.
// Five barriers per tile (before and after the store, after phases 2, 3 and 4). Every
// workgroup-memory write is a whole scalar or vector by one invocation.
// Workgroup memory (bytes): q_sh 8192 + kt_sh 9216 + vt_sh 8192 + sc_sh 4096 + 320 = 30016.

// K tile row stride in quads: one quad of padding makes it odd, so the 8 invocations of a
// quarter subgroup reading quad u of 8 consecutive rows use distinct banks.
override RQ: u32 = W4 + 1u;
// Score phase slices per key; value phase key subsets.
override NS: u32 = 128u / KT;
override KS: u32 = 128u / C4;
// Quads in one K (or V) tile; at most 512 (4 per invocation).
override TQ: u32 = KT * W4;
// Head quads (vec4s of per-head values) and where p starts in sc_sh.
override GQ: u32 = (GT + 3u) / 4u;
override P_OFF: u32 = KT * GQ;

var<workgroup> q_sh: array<vec4<f32>, 512>;
var<workgroup> kt_sh: array<KVQ, 576>;
#if DT_F32
var<workgroup> vt_sh: array<vec4<f32>, 512>;
fn v_chunk(j: u32, c: u32) -> vec4<f32> {
    return vt_sh[j * C4 + c];
}
#else
var<workgroup> vt_sh: array<vec2<u32>, 1024>;
fn v_chunk(j: u32, c: u32) -> vec4<f32> {
    return halves(vt_sh[j * C4 + c]);
}
#endif
var<workgroup> sc_sh: array<vec4<f32>, 256>;
var<workgroup> alpha_sh: array<vec4<f32>, 2>;
var<workgroup> m_sh: array<vec4<f32>, 2>;
// Partial sums of p per key subset and head quad [ks][quad] (KS * GQ <= 16).
var<workgroup> l_sh: array<vec4<f32>, 16>;

// Private state is scalars and vectors only, never an array: on NVIDIA (Vulkan) a private
// array indexed by a loop variable that the driver does not unroll (naga bounds every loop,
// which keeps it from unrolling) lives in local memory, and a load into such an array waits
// for its data, serializing the tile loads. So the in-flight quads are four named (K, V)
// pairs, the per-head sums are named vectors, and the head loops are written out.
struct KvPair {
    k: KVQ,
    v: KVQ,
}

// Load tile quad `it` of the tile at position t0 (slot s0): zeros past TQ or at positions
// >= k_end (no memory read).
fn load_pair(it: u32, rowbase: u32, t0: u32, s0: u32, k_end: u32) -> KvPair {
    var r = KvPair(KVQ(), KVQ());
    let j = it / W4;
    if it < TQ && t0 + j < k_end {
        // j < slots here (the visible positions fit the ring), so one wrap suffices.
        let o = (rowbase + wrap(s0 + j)) * W4 + it % W4;
        r.k = k_quad(o);
        r.v = v_quad(o);
    }
    return r;
}

fn store_pair(it: u32, r: KvPair) {
    if it < TQ {
        kt_sh[(it / W4) * RQ + it % W4] = r.k;
#if DT_F32
        vt_sh[it] = r.v;
#else
        vt_sh[2u * it] = r.v.xy;
        vt_sh[2u * it + 1u] = r.v.zw;
#endif
    }
}

// Dot of query head g (q_sh) with K quad u of a row, given as two four-element halves
// (f32: ka is the quad, kb unused).
fn qk(g: u32, u: u32, ka: vec4<f32>, kb: vec4<f32>) -> f32 {
#if DT_F32
    return dot(q_sh[g * C4 + u], ka);
#else
    let b = g * C4 + 2u * u;
    return dot(q_sh[b], ka) + dot(q_sh[b + 1u], kb);
#endif
}

fn qk4(g: u32, u: u32, ka: vec4<f32>, kb: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(qk(g, u, ka, kb), qk(g + 1u, u, ka, kb), qk(g + 2u, u, ka, kb),
                     qk(g + 3u, u, ka, kb));
}

// Dots of K quad u (kq) with heads g..g + 3 (g = 0: only the first GT of them).
fn qk_heads(u: u32, kq: KVQ, g: u32) -> vec4<f32> {
#if DT_F32
    let ka = kq;
    let kb = kq;
#else
    let ka = halves(kq.xy);
    let kb = halves(kq.zw);
#endif
    if GT >= 4u {
        return qk4(g, u, ka, kb);
    }
    var r = vec4<f32>(qk(0u, u, ka, kb), 0.0, 0.0, 0.0);
    if GT == 2u {
        r.y = qk(1u, u, ka, kb);
    }
    return r;
}

@compute @workgroup_size(128)
fn sdpa_decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
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
    for (var i = lid; i < GT * C4; i += 128u) {
        let g = i / C4;
        var v = vec4<f32>(0.0);
        if g < ng {
            let o = view(0u) + (h0 + g) * HEAD_DIM + (i % C4) * 4u;
            v = vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
        }
        q_sh[i] = v;
    }
    let k_start = p.kv_lo + split * p.split_len;
    let k_end = min(p.kv_hi, k_start + p.split_len);
    let rowbase = kvh * p.slots;

    // Phase 2 role.
    let sk = lid % KT;
    let sl = lid / KT;
    // Phase 5 role.
    let vcol = lid % C4;
    let ks = lid / C4;
    let v_on = ks < KS;
    // Phase 3/4 role, and the running max of its four heads.
    let pk = lid % KT;
    let pq = lid / KT;
    let p_on = pq < GQ;
    var mr = vec4<f32>(M_INIT);
    // Accumulators of heads 0..7 (those >= GT stay unused) and partial sums of p per head
    // quad.
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0);
    var la = vec4<f32>(0.0);
    var lb = vec4<f32>(0.0);
    // The next tile's quads lid, lid + 128, lid + 256, lid + 384.
    var s0 = k_start % p.slots;
    var r0 = load_pair(lid, rowbase, k_start, s0, k_end);
    var r1 = load_pair(lid + 128u, rowbase, k_start, s0, k_end);
    var r2 = load_pair(lid + 256u, rowbase, k_start, s0, k_end);
    var r3 = load_pair(lid + 384u, rowbase, k_start, s0, k_end);
    for (var t0 = k_start; t0 < k_end; t0 += KT) {
        // 1. The previous tile's phase 5 is done with vt_sh and p.
        workgroupBarrier();
        store_pair(lid, r0);
        store_pair(lid + 128u, r1);
        store_pair(lid + 256u, r2);
        store_pair(lid + 384u, r3);
        workgroupBarrier();
        let tn = t0 + KT;
        if tn < k_end {
            s0 = tn % p.slots;
            r0 = load_pair(lid, rowbase, tn, s0, k_end);
            r1 = load_pair(lid + 128u, rowbase, tn, s0, k_end);
            r2 = load_pair(lid + 256u, rowbase, tn, s0, k_end);
            r3 = load_pair(lid + 384u, rowbase, tn, s0, k_end);
        }

        // 2. Partial dots: heads 0..3 in pa, 4..7 in pb.
        var pa = vec4<f32>(0.0);
        var pb = vec4<f32>(0.0);
        // Two quads per trip, both loaded before use.
        for (var i = 0u; i < (W4 + 2u * NS - 1u) / (2u * NS); i++) {
            let u0 = sl + 2u * i * NS;
            let u1 = u0 + NS;
            let kq0 = kt_sh[sk * RQ + min(u0, W4 - 1u)];
            let kq1 = kt_sh[sk * RQ + min(u1, W4 - 1u)];
            if u0 < W4 {
                pa += qk_heads(u0, kq0, 0u);
                if GT > 4u {
                    pb += qk_heads(u0, kq0, 4u);
                }
            }
            if u1 < W4 {
                pa += qk_heads(u1, kq1, 0u);
                if GT > 4u {
                    pb += qk_heads(u1, kq1, 4u);
                }
            }
        }
        sc_sh[(sl * KT + sk) * GQ] = pa;
        if GQ > 1u {
            sc_sh[(sl * KT + sk) * GQ + 1u] = pb;
        }
        workgroupBarrier();

        // 3. Logits of this invocation's key and four heads.
        let valid = t0 + pk < k_end;
        var sv = vec4<f32>(M_INIT);
        if p_on {
            var d = vec4<f32>(0.0);
            for (var s = 0u; s < NS; s++) {
                d += sc_sh[(s * KT + pk) * GQ + pq];
            }
            if valid {
                sv = vec4<f32>(logit(d.x), logit(d.y), logit(d.z), logit(d.w));
            }
            sc_sh[pk * GQ + pq] = sv;
        }
        workgroupBarrier();

        // 4. Tile max, running max, probabilities.
        if p_on {
            // Four independent chains (KT is a multiple of 4).
            var tm = vec4<f32>(M_INIT);
            var tm1 = vec4<f32>(M_INIT);
            var tm2 = vec4<f32>(M_INIT);
            var tm3 = vec4<f32>(M_INIT);
            for (var j = 0u; j < KT; j += 4u) {
                tm = max(tm, sc_sh[j * GQ + pq]);
                tm1 = max(tm1, sc_sh[(j + 1u) * GQ + pq]);
                tm2 = max(tm2, sc_sh[(j + 2u) * GQ + pq]);
                tm3 = max(tm3, sc_sh[(j + 3u) * GQ + pq]);
            }
            tm = max(max(tm, tm1), max(tm2, tm3));
            let mn = max(mr, tm);
            if pk == 0u {
                alpha_sh[pq] = exp(mr - mn);
                m_sh[pq] = mn;
            }
            mr = mn;
            sc_sh[P_OFF + pk * GQ + pq] = select(vec4<f32>(0.0), exp(sv - mn), valid);
        }
        workgroupBarrier();

        // 5. p * V.
        if v_on {
            let aa = alpha_sh[0];
            a0 *= aa.x;
            a1 *= aa.y;
            a2 *= aa.z;
            a3 *= aa.w;
            la *= aa;
            if GT > 4u {
                let ab = alpha_sh[1];
                a4 *= ab.x;
                a5 *= ab.y;
                a6 *= ab.z;
                a7 *= ab.w;
                lb *= ab;
            }
            // Keys past k_end have p = 0 and V = 0 (loaded as zeros): no bound needed.
            // Two keys per trip, both loaded before use (a key past KT reads key KT - 1
            // with p = 0).
            for (var jj = 0u; jj < (KT + 2u * KS - 1u) / (2u * KS); jj++) {
                let j0 = ks + 2u * jj * KS;
                let j1 = j0 + KS;
                let jc0 = min(j0, KT - 1u);
                let jc1 = min(j1, KT - 1u);
                let vv0 = v_chunk(jc0, vcol);
                let vv1 = v_chunk(jc1, vcol);
                let pa0 = select(vec4<f32>(0.0), sc_sh[P_OFF + jc0 * GQ], j0 < KT);
                let pa1 = select(vec4<f32>(0.0), sc_sh[P_OFF + jc1 * GQ], j1 < KT);
                a0 += pa0.x * vv0 + pa1.x * vv1;
                a1 += pa0.y * vv0 + pa1.y * vv1;
                a2 += pa0.z * vv0 + pa1.z * vv1;
                a3 += pa0.w * vv0 + pa1.w * vv1;
                la += pa0 + pa1;
                if GT > 4u {
                    let pb0 = select(vec4<f32>(0.0), sc_sh[P_OFF + jc0 * GQ + 1u], j0 < KT);
                    let pb1 = select(vec4<f32>(0.0), sc_sh[P_OFF + jc1 * GQ + 1u], j1 < KT);
                    a4 += pb0.x * vv0 + pb1.x * vv1;
                    a5 += pb0.y * vv0 + pb1.y * vv1;
                    a6 += pb0.z * vv0 + pb1.z * vv1;
                    a7 += pb0.w * vv0 + pb1.w * vv1;
                    lb += pb0 + pb1;
                }
            }
        }
    }

    // Combine the KS key subsets, four heads a round, through q_sh: its last reads (phase 2
    // of the last tile) are behind that tile's barriers.
    for (var r = 0u; r < GQ; r++) {
        if r > 0u {
            workgroupBarrier();
        }
        if v_on {
            let hi = r > 0u;
            q_sh[lid] = select(a0, a4, hi);
            q_sh[128u + lid] = select(a1, a5, hi);
            q_sh[256u + lid] = select(a2, a6, hi);
            q_sh[384u + lid] = select(a3, a7, hi);
            if r == 0u && vcol == 0u {
                l_sh[ks * GQ] = la;
                if GQ > 1u {
                    l_sh[ks * GQ + 1u] = lb;
                }
            }
        }
        workgroupBarrier();
        for (var it = lid; it < 4u * C4; it += 128u) {
            let e = it / C4;
            let c = it % C4;
            let g = 4u * r + e;
            if g < ng {
                var a = vec4<f32>(0.0);
                for (var s = 0u; s < KS; s++) {
                    a += q_sh[e * 128u + s * C4 + c];
                }
                let o = view(3u) + ((h0 + g) * p.n_splits + split) * HEAD_DIM + c * 4u;
                part_o[o] = a.x;
                part_o[o + 1u] = a.y;
                part_o[o + 2u] = a.z;
                part_o[o + 3u] = a.w;
            }
        }
        if r == 0u && lid < ng {
            var l = 0.0;
            for (var s = 0u; s < KS; s++) {
                l += l_sh[s * GQ + lid / 4u][lid % 4u];
            }
            let o = view(4u) + ((h0 + lid) * p.n_splits + split) * 2u;
            part_ml[o] = m_sh[lid / 4u][lid % 4u];
            part_ml[o + 1u] = l;
        }
    }
}

var<workgroup> red_m: array<vec2<f32>, 128>;
var<workgroup> red_o: array<vec4<f32>, 128>;

// Online-softmax merge of two (max, sum) pairs.
fn merge_ml(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// One workgroup per head: invocation (split group sg = lid / C4, chunk c = lid % C4) adds
// the splits sg, sg + sg_n, ... of its four dims, so 128 loads are in flight per step.
@compute @workgroup_size(128)
fn sdpa_decode_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let h = flat_wg(wid, nwg);
    if h >= p.n_heads {
        return;
    }
    let ml = view(4u) + h * p.n_splits * 2u;
    var mine = vec2<f32>(M_INIT, 0.0);
    for (var s = lid; s < p.n_splits; s += 128u) {
        mine = merge_ml(mine, vec2<f32>(part_ml[ml + 2u * s], part_ml[ml + 2u * s + 1u]));
    }
    red_m[lid] = mine;
    workgroupBarrier();
    for (var w = 64u; w > 0u; w >>= 1u) {
        if lid < w {
            red_m[lid] = merge_ml(red_m[lid], red_m[lid + w]);
        }
        workgroupBarrier();
    }
    var tot = red_m[0];
    if p.has_sinks != 0u {
        tot = merge_ml(tot, vec2<f32>(sinks[view(5u) + h], 1.0));
    }
    let mx = tot.x;
    let inv = select(0.0, 1.0 / tot.y, tot.y > 0.0);
    let sg_n = 128u / C4;
    let sg = lid / C4;
    let c = lid % C4;
    let po = view(3u) + h * p.n_splits * HEAD_DIM + c * 4u;
    var a = vec4<f32>(0.0);
    if sg < sg_n {
        for (var s = sg; s < p.n_splits; s += sg_n) {
            let o = po + s * HEAD_DIM;
            let w = exp(part_ml[ml + 2u * s] - mx);
            a += w * vec4<f32>(part_o[o], part_o[o + 1u], part_o[o + 2u], part_o[o + 3u]);
        }
    }
    red_o[lid] = a;
    workgroupBarrier();
    if lid < C4 {
        var t = vec4<f32>(0.0);
        for (var s = 0u; s < sg_n; s++) {
            t += red_o[s * C4 + lid];
        }
        let o = view(6u) + h * HEAD_DIM + lid * 4u;
        out[o] = t.x * inv;
        out[o + 1u] = t.y * inv;
        out[o + 2u] = t.z * inv;
        out[o + 3u] = t.w * inv;
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

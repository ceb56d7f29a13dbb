// sdpa_quant: flash decode over a compressed KV cache layer (u32 [kv_heads, slots,
// row_words]; position k in slot k % slots; layouts in kv_quant.rs). Same structure as
// sdpa_decode in sdpa.wgsl (split-K partials, then a reduction dispatch), with:
//   - rotated modes: each workgroup rotates its GT query heads once, q' = H (s * q) / sqrt(d)
//     (s the fixed signs, H the Walsh-Hadamard matrix; orthogonal, so q.k = q'.k'), and
//     dots q' with K dequantized in the rotated basis; the output accumulates rotated V and
//     the reduction rotates it back, o = s * (H o') / sqrt(d);
//   - K and V staged packed in workgroup memory and dequantized from there, 4 elements at
//     a time (deq4), once per key for all GT heads.
//   - the side buffer (kv_quant_common.wgsl): compressed keys are centered on mu_k, so
//     their logits get q.mu_k back (computed once per head from the unrotated q; a
//     constant shift, but it matters against the exact sink positions, a sink logit and
//     softcap); positions 0..SINKS and win_lo..kv_hi (the recent ring) are read exact
//     from their side rows instead of the packed tile, and get no q.mu_k (not centered).
// GQA, sliding window (kv_lo), softcap and sinks as in sdpa.wgsl.
//
// Bindings: 0 q f32, 1 k cache u32, 2 v cache u32, 3 part_o f32, 4 part_ml f32
// [n_heads, n_splits, 2], 5 sinks f32 [n_heads], 6 out f32 (reduce), 7 side u32
// [kv_heads, side_words()] (decode).
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
    row_words: u32,
    inv_sqrt_d: f32,
    // Positions win_lo..kv_hi are in the exact recent ring (kv_quant.rs: exact_from).
    win_lo: u32,
    _pad1: u32,
    cb: array<vec4<f32>, 4>,
    cb2: vec4<f32>,
    signs: array<vec4<u32>, 4>,
}

// Query heads per decode workgroup (1, 2, 4 or 8; at most 4 for HEAD_DIM 512).
override GT: u32 = 8u;

const NT: u32 = 128u;
const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> kc: array<u32>;
@group(0) @binding(2) var<storage, read> vc: array<u32>;
@group(0) @binding(3) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read> side: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

// Words per row (KvFormat::row_words).
override RW: u32 = select(select(select(select(select(1u + HEAD_DIM / 16u,
    1u + 5u * HEAD_DIM / 64u, MODE == 4u), 1u + 3u * HEAD_DIM / 32u, MODE == 3u),
    1u + HEAD_DIM / 8u, MODE == 2u), HEAD_DIM / 32u + HEAD_DIM / 8u, MODE == 1u),
    HEAD_DIM / 64u + HEAD_DIM / 4u, MODE == 0u);
// Row stride in the workgroup tiles: odd, so the invocations of a subgroup reading the
// same word of consecutive rows use distinct banks.
override RWP: u32 = RW | 1u;
// Keys per tile (kv_quant.rs: decode_kt): the largest power of two up to 64 whose padded
// rows fit TILE_WORDS.
override KT: u32 = select(select(select(8u, 16u, 16u * RWP <= TILE_WORDS), 32u,
    32u * RWP <= TILE_WORDS), 64u, 64u * RWP <= TILE_WORDS);
const TILE_WORDS: u32 = 1920u;
// Words in one K (or V) tile and loads per invocation (at most 15).
override TW: u32 = KT * RW;
override NS: u32 = 128u / KT;
override KS: u32 = 128u / C4;
override GQ: u32 = (GT + 3u) / 4u;

// The decode stages packed K/V tiles in workgroup memory and dequantizes from there.
fn wd(is_v: bool, i: u32) -> u32 {
    if is_v {
        return vt_sh[i];
    }
    return kt_sh[i];
}

fn sw(i: u32) -> u32 {
    return side[view(7u) + i];
}

// Position pos (< kv_hi) is read from an exact side row: a sink or in the recent ring.
fn is_exact(pos: u32) -> bool {
    return pos < SINKS || pos >= p.win_lo;
}

fn logit(dot_qk: f32) -> f32 {
    var s = dot_qk * p.scale;
    if p.softcap > 0.0 {
        s = p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0));
    }
    return s;
}

fn wrap(s: u32) -> u32 {
    return select(s, s - p.slots, s >= p.slots);
}

// Decode: the tile pipeline of sdpa_decode (sdpa.wgsl), on packed rows: each tile's K and V
// words (u32 loads, consecutive invocations on consecutive words, issued a tile ahead) are
// staged in kt_sh / vt_sh with rows RWP words apart; phase 2 dequantizes K chunks (deq4,
// through wd) once per key for the GT heads, phase 5 V chunks once per key for the GT heads.
// Scratch: scr holds the query rotation first, then per tile the partial dots
// [slice][key][head quad], logits [key][quad] (slice 0's place) and p at P_OFF [key][quad],
// four floats per entry.
// Workgroup memory (bytes): q_sh 8192 + scr 8192 + kt_sh 7680 + vt_sh 7680 + 320 = 32064
// (lavapipe allows 32768).
var<workgroup> q_sh: array<vec4<f32>, 512>;
var<workgroup> scr: array<f32, 2048>;
var<workgroup> kt_sh: array<u32, TILE_WORDS>;
var<workgroup> vt_sh: array<u32, TILE_WORDS>;
var<workgroup> alpha_sh: array<vec4<f32>, 2>;
var<workgroup> m_sh: array<vec4<f32>, 2>;
// Partial sums of p per key subset and head quad [ks][quad] (KS * GQ <= 16).
var<workgroup> l_sh: array<vec4<f32>, 16>;
// q.mu_k of the GT heads, by quad.
var<workgroup> qmu_sh: array<vec4<f32>, 2>;

override P_OFF: u32 = 4u * KT * GQ;

fn scr4(i: u32) -> vec4<f32> {
    return vec4<f32>(scr[4u * i], scr[4u * i + 1u], scr[4u * i + 2u], scr[4u * i + 3u]);
}
fn set_scr4(i: u32, v: vec4<f32>) {
    scr[4u * i] = v.x;
    scr[4u * i + 1u] = v.y;
    scr[4u * i + 2u] = v.z;
    scr[4u * i + 3u] = v.w;
}

// No private arrays (as sdpa_decode): the 15 in-flight words of K and V an invocation
// loads per tile are four named (K, V) vec4 pairs, words 4b..4b + 3 in pair b (the 16th
// always past TW).
struct KvWords {
    k: vec4<u32>,
    v: vec4<u32>,
}

fn load_word(it: u32, rowbase: u32, t0: u32, s0: u32, k_end: u32) -> vec2<u32> {
    var r = vec2<u32>(0u);
    let j = it / RW;
    if it < TW && t0 + j < k_end {
        let o = (rowbase + wrap(s0 + j)) * RW + it % RW;
        r = vec2<u32>(kc[view(1u) + o], vc[view(2u) + o]);
    }
    return r;
}

// Words lid + 128 * (4b + e), e = 0..3, of the tile at position t0 (slot s0).
fn load_words(b: u32, lid: u32, rowbase: u32, t0: u32, s0: u32, k_end: u32) -> KvWords {
    let it = lid + 512u * b;
    let w0 = load_word(it, rowbase, t0, s0, k_end);
    let w1 = load_word(it + 128u, rowbase, t0, s0, k_end);
    let w2 = load_word(it + 256u, rowbase, t0, s0, k_end);
    let w3 = load_word(it + 384u, rowbase, t0, s0, k_end);
    return KvWords(vec4<u32>(w0.x, w1.x, w2.x, w3.x), vec4<u32>(w0.y, w1.y, w2.y, w3.y));
}

fn store_word(it: u32, k: u32, v: u32) {
    if it < TW {
        let o = (it / RW) * RWP + it % RW;
        kt_sh[o] = k;
        vt_sh[o] = v;
    }
}

fn store_words(b: u32, lid: u32, r: KvWords) {
    let it = lid + 512u * b;
    store_word(it, r.k.x, r.v.x);
    store_word(it + 128u, r.k.y, r.v.y);
    store_word(it + 256u, r.k.z, r.v.z);
    store_word(it + 384u, r.k.w, r.v.w);
}

// Elements 4c..4c + 3 of key (is_v false) or value j of the tile at position t0: packed
// row j of the staged tile, or for a sink or recent position its exact side row (positions
// past kv_hi read the tile's zero words like any key past the split's end).
fn kv4(is_v: bool, kvh: u32, t0: u32, j: u32, c: u32) -> vec4<f32> {
    let pos = t0 + j;
    if pos < p.kv_hi && is_exact(pos) {
        return exact4(kvh, pos, is_v, c);
    }
    return deq4(is_v, j * RWP, c);
}

fn qk4(g: u32, c: u32, kv: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(q_sh[g * C4 + c], kv), dot(q_sh[(g + 1u) * C4 + c], kv),
                     dot(q_sh[(g + 2u) * C4 + c], kv), dot(q_sh[(g + 3u) * C4 + c], kv));
}

@compute @workgroup_size(128)
fn sdpa_quant_decode(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
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
    if ROT {
        for (var i = lid; i < GT * HEAD_DIM; i += NT) {
            let g = i / HEAD_DIM;
            let d = i % HEAD_DIM;
            var v = 0.0;
            if g < ng {
                v = q[view(0u) + (h0 + g) * HEAD_DIM + d] * sgn(d);
            }
            scr[i] = v;
        }
        workgroupBarrier();
        fwht(GT, lid);
        for (var i = lid; i < GT * C4; i += NT) {
            q_sh[i] = scr4(i) * p.inv_sqrt_d;
        }
    } else {
        for (var i = lid; i < GT * C4; i += NT) {
            let g = i / C4;
            var v = vec4<f32>(0.0);
            if g < ng {
                let o = view(0u) + (h0 + g) * HEAD_DIM + (i % C4) * 4u;
                v = vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
            }
            q_sh[i] = v;
        }
    }
    // q.mu_k, one invocation per head (HEAD_DIM terms, once per workgroup; read in phase 3
    // after the tile loop's first barrier).
    if lid < GT {
        var acc = 0.0;
        if lid < ng {
            let qo = view(0u) + (h0 + lid) * HEAD_DIM;
            let mo = view(7u) + side_row(kvh, 0u);
            for (var d = 0u; d < HEAD_DIM; d++) {
                acc += q[qo + d] * bitcast<f32>(side[mo + d]);
            }
        }
        qmu_sh[lid / 4u][lid % 4u] = acc;
    }
    let k_start = p.kv_lo + split * p.split_len;
    let k_end = min(p.kv_hi, k_start + p.split_len);
    let rowbase = kvh * p.slots;

    let sk = lid % KT;
    let sl = lid / KT;
    let vcol = lid % C4;
    let ks = lid / C4;
    let v_on = ks < KS;
    let pk = lid % KT;
    let pq = lid / KT;
    let p_on = pq < GQ;
    var mr = vec4<f32>(M_INIT);
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
    var s0 = k_start % p.slots;
    var r0 = load_words(0u, lid, rowbase, k_start, s0, k_end);
    var r1 = load_words(1u, lid, rowbase, k_start, s0, k_end);
    var r2 = load_words(2u, lid, rowbase, k_start, s0, k_end);
    var r3 = load_words(3u, lid, rowbase, k_start, s0, k_end);
    for (var t0 = k_start; t0 < k_end; t0 += KT) {
        // 1. The previous tile's phase 5 (and the query rotation) are done with the tiles
        //    and scr.
        workgroupBarrier();
        store_words(0u, lid, r0);
        store_words(1u, lid, r1);
        store_words(2u, lid, r2);
        store_words(3u, lid, r3);
        workgroupBarrier();
        let tn = t0 + KT;
        if tn < k_end {
            s0 = tn % p.slots;
            r0 = load_words(0u, lid, rowbase, tn, s0, k_end);
            r1 = load_words(1u, lid, rowbase, tn, s0, k_end);
            r2 = load_words(2u, lid, rowbase, tn, s0, k_end);
            r3 = load_words(3u, lid, rowbase, tn, s0, k_end);
        }

        // 2. Partial dots.
        var pa = vec4<f32>(0.0);
        var pb = vec4<f32>(0.0);
        for (var i = 0u; i < (C4 + NS - 1u) / NS; i++) {
            let c = sl + i * NS;
            if c < C4 {
                let kv = kv4(false, kvh, t0, sk, c);
                if GT >= 4u {
                    pa += qk4(0u, c, kv);
                } else {
                    pa.x += dot(q_sh[c], kv);
                    if GT == 2u {
                        pa.y += dot(q_sh[C4 + c], kv);
                    }
                }
                if GT > 4u {
                    pb += qk4(4u, c, kv);
                }
            }
        }
        set_scr4((sl * KT + sk) * GQ, pa);
        if GQ > 1u {
            set_scr4((sl * KT + sk) * GQ + 1u, pb);
        }
        workgroupBarrier();

        // 3. Logits.
        let valid = t0 + pk < k_end;
        var sv = vec4<f32>(M_INIT);
        if p_on {
            var d = vec4<f32>(0.0);
            for (var s = 0u; s < NS; s++) {
                d += scr4((s * KT + pk) * GQ + pq);
            }
            if valid {
                if !is_exact(t0 + pk) {
                    d += qmu_sh[pq];
                }
                sv = vec4<f32>(logit(d.x), logit(d.y), logit(d.z), logit(d.w));
            }
            set_scr4(pk * GQ + pq, sv);
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
                tm = max(tm, scr4(j * GQ + pq));
                tm1 = max(tm1, scr4((j + 1u) * GQ + pq));
                tm2 = max(tm2, scr4((j + 2u) * GQ + pq));
                tm3 = max(tm3, scr4((j + 3u) * GQ + pq));
            }
            tm = max(max(tm, tm1), max(tm2, tm3));
            let mn = max(mr, tm);
            if pk == 0u {
                alpha_sh[pq] = exp(mr - mn);
                m_sh[pq] = mn;
            }
            mr = mn;
            set_scr4(P_OFF / 4u + pk * GQ + pq, select(vec4<f32>(0.0), exp(sv - mn), valid));
        }
        workgroupBarrier();

        // 5. p * V (keys past k_end: p = 0 and zero words, which dequantize to 0).
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
            // Two keys per trip, both read before use (a key past KT reads key KT - 1
            // with p = 0).
            for (var jj = 0u; jj < (KT + 2u * KS - 1u) / (2u * KS); jj++) {
                let j0 = ks + 2u * jj * KS;
                let j1 = j0 + KS;
                let jc0 = min(j0, KT - 1u);
                let jc1 = min(j1, KT - 1u);
                let vv0 = kv4(true, kvh, t0, jc0, vcol);
                let vv1 = kv4(true, kvh, t0, jc1, vcol);
                let pa0 = select(vec4<f32>(0.0), scr4(P_OFF / 4u + jc0 * GQ), j0 < KT);
                let pa1 = select(vec4<f32>(0.0), scr4(P_OFF / 4u + jc1 * GQ), j1 < KT);
                a0 += pa0.x * vv0 + pa1.x * vv1;
                a1 += pa0.y * vv0 + pa1.y * vv1;
                a2 += pa0.z * vv0 + pa1.z * vv1;
                a3 += pa0.w * vv0 + pa1.w * vv1;
                la += pa0 + pa1;
                if GT > 4u {
                    let pb0 = select(vec4<f32>(0.0), scr4(P_OFF / 4u + jc0 * GQ + 1u), j0 < KT);
                    let pb1 = select(vec4<f32>(0.0), scr4(P_OFF / 4u + jc1 * GQ + 1u), j1 < KT);
                    a4 += pb0.x * vv0 + pb1.x * vv1;
                    a5 += pb0.y * vv0 + pb1.y * vv1;
                    a6 += pb0.z * vv0 + pb1.z * vv1;
                    a7 += pb0.w * vv0 + pb1.w * vv1;
                    lb += pb0 + pb1;
                }
            }
        }
    }

    // Combine the KS key subsets through q_sh, four heads a round (as sdpa_decode).
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

// As sdpa_decode_reduce (common/split_reduce.wgsl), then rotated modes rotate the output
// back.
@compute @workgroup_size(128)
fn sdpa_quant_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let h = flat_wg(wid, nwg);
    if h >= p.n_heads {
        return;
    }
    let t = combine_splits(h, lid);
    if ROT && lid < C4 {
        scr[4u * lid] = t.x;
        scr[4u * lid + 1u] = t.y;
        scr[4u * lid + 2u] = t.z;
        scr[4u * lid + 3u] = t.w;
    }
    if ROT {
        workgroupBarrier();
        fwht(1u, lid);
        for (var d = lid; d < HEAD_DIM; d += 128u) {
            out[view(6u) + h * HEAD_DIM + d] = scr[d] * sgn(d) * p.inv_sqrt_d;
        }
    } else if lid < C4 {
        let o = view(6u) + h * HEAD_DIM + lid * 4u;
        out[o] = t.x;
        out[o + 1u] = t.y;
        out[o + 2u] = t.z;
        out[o + 3u] = t.w;
    }
}

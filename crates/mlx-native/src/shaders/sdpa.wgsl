// sdpa: scaled dot-product attention of f32 queries over one KvCache layer (f16 or f32 K/V
// laid out [1, kv_heads, slots, head_dim]; key position k lives in slot k % slots).
//
//   sdpa_decode         one query per head (the token at position kv_hi - 1), split-K: each
//                       workgroup takes one kv head, GT of its query heads (GQA: K/V read once
//                       for the whole tile) and split_len positions, and writes a partial
//                       (max, sum, unnormalized output) per head and split.
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
// Prefill tile: BM (query, head) rows by BN keys.
override BM: u32 = 32u;
override BN: u32 = 32u;
override C4: u32 = HEAD_DIM / 4u;

const KT: u32 = 128u;
const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read> mask: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

// Cache views start at a multiple of 4 elements (checked on the Rust side).
#if DT_F32
@group(0) @binding(1) var<storage, read> kc: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vc: array<vec4<f32>>;
fn load_k(row: u32, c: u32) -> vec4<f32> {
    return kc[view(1u) / 4u + row * C4 + c];
}
fn load_v(row: u32, c: u32) -> vec4<f32> {
    return vc[view(2u) / 4u + row * C4 + c];
}
#else
@group(0) @binding(1) var<storage, read> kc: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> vc: array<vec2<u32>>;
fn load_k(row: u32, c: u32) -> vec4<f32> {
    let w = kc[view(1u) / 4u + row * C4 + c];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
fn load_v(row: u32, c: u32) -> vec4<f32> {
    let w = vc[view(2u) / 4u + row * C4 + c];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
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

var<workgroup> q_sh: array<vec4<f32>, 512>;
var<workgroup> p_sh: array<f32, 1024>;
var<workgroup> red_sh: array<f32, 1024>;
var<workgroup> acc_sh: array<vec4<f32>, 512>;
var<workgroup> alpha_sh: array<f32, 8>;
var<private> sg_lane: u32;
var<private> sg_index: u32;
var<private> sg_count: u32;

// Reduce v[g] (g < GT) over the workgroup's KT invocations; every invocation gets the result.
// Call from uniform control flow. red_sh is free again once every invocation has passed
// the next workgroup barrier.
fn tile_reduce(v: ptr<function, array<f32, 8>>, lid: u32, is_max: bool) {
#if SUBGROUPS
    for (var g = 0u; g < GT; g++) {
        let x = (*v)[g];
        let r = select(subgroupAdd(x), subgroupMax(x), is_max);
        if sg_lane == 0u {
            red_sh[g * KT + sg_index] = r;
        }
    }
    workgroupBarrier();
    for (var g = 0u; g < GT; g++) {
        var t = red_sh[g * KT];
        for (var i = 1u; i < sg_count; i++) {
            let y = red_sh[g * KT + i];
            t = select(t + y, max(t, y), is_max);
        }
        (*v)[g] = t;
    }
#else
    for (var g = 0u; g < GT; g++) {
        red_sh[g * KT + lid] = (*v)[g];
    }
    workgroupBarrier();
    for (var s = KT / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            for (var g = 0u; g < GT; g++) {
                let a = red_sh[g * KT + lid];
                let b = red_sh[g * KT + lid + s];
                red_sh[g * KT + lid] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < GT; g++) {
        (*v)[g] = red_sh[g * KT];
    }
#endif
}

@compute @workgroup_size(128)
fn sdpa_decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
               , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
               @builtin(num_subgroups) sc: u32
#endif
) {
#if SUBGROUPS
    sg_lane = sl;
    sg_index = si;
    sg_count = sc;
#endif
    let wg = flat_wg(wid, nwg);
    let split = wg % p.n_splits;
    let rest = wg / p.n_splits;
    let gt = rest % p.g_tiles;
    let kvh = rest / p.g_tiles;
    if kvh >= p.kv_heads {
        return;
    }
    let g0 = gt * GT;
    let ng = min(GT, p.group - g0);
    let h0 = kvh * p.group + g0;
    for (var i = lid; i < GT * C4; i += KT) {
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
    // Value phase: item = (key subset ks, head g, chunk c); KS subsets split the tile's keys.
    let ngc = GT * C4;
    let ks_n = max(1u, KT / ngc);
    let items = ks_n * ngc;
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    for (var g = 0u; g < 8u; g++) {
        m[g] = M_INIT;
        l[g] = 0.0;
    }
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    workgroupBarrier();
    for (var t0 = k_start; t0 < k_end; t0 += KT) {
        let s0 = t0 % p.slots;
        let valid = t0 + lid < k_end;
        var s: array<f32, 8>;
        for (var g = 0u; g < GT; g++) {
            s[g] = 0.0;
        }
        if valid {
            let row = rowbase + wrap(s0 + lid);
            for (var c = 0u; c < C4; c++) {
                let kv = load_k(row, c);
                for (var g = 0u; g < GT; g++) {
                    s[g] += dot(q_sh[g * C4 + c], kv);
                }
            }
            for (var g = 0u; g < GT; g++) {
                s[g] = logit(s[g]);
            }
        } else {
            for (var g = 0u; g < GT; g++) {
                s[g] = M_INIT;
            }
        }
        var tm = s;
        tile_reduce(&tm, lid, true);
        for (var g = 0u; g < GT; g++) {
            let mn = max(m[g], tm[g]);
            let a = exp(m[g] - mn);
            m[g] = mn;
            let pv = select(0.0, exp(s[g] - mn), valid);
            l[g] = l[g] * a + pv;
            p_sh[g * KT + lid] = pv;
            if lid == 0u {
                alpha_sh[g] = a;
            }
        }
        workgroupBarrier();
        let nk = min(KT, k_end - t0);
        for (var ii = 0u; ii < 4u; ii++) {
            let it = lid + ii * KT;
            if it < items {
                let gc = it % ngc;
                let g = gc / C4;
                let c = gc % C4;
                var a = acc[ii] * alpha_sh[g];
                for (var j = it / ngc; j < nk; j += ks_n) {
                    a += p_sh[g * KT + j] * load_v(rowbase + wrap(s0 + j), c);
                }
                acc[ii] = a;
            }
        }
        // The next tile writes p_sh and alpha_sh only after tile_reduce's barrier.
    }
    tile_reduce(&l, lid, false);
    for (var ii = 0u; ii < 4u; ii++) {
        let it = lid + ii * KT;
        if it < items {
            acc_sh[it] = acc[ii];
        }
    }
    workgroupBarrier();
    for (var ii = 0u; ii < 4u; ii++) {
        let gc = lid + ii * KT;
        if gc < ngc && gc / C4 < ng {
            var a = vec4<f32>(0.0);
            for (var ks = 0u; ks < ks_n; ks++) {
                a += acc_sh[ks * ngc + gc];
            }
            let h = h0 + gc / C4;
            let o = view(3u) + (h * p.n_splits + split) * HEAD_DIM + (gc % C4) * 4u;
            part_o[o] = a.x;
            part_o[o + 1u] = a.y;
            part_o[o + 2u] = a.z;
            part_o[o + 3u] = a.w;
        }
    }
    for (var g = 0u; g < GT; g++) {
        if lid == g && g < ng {
            let o = view(4u) + ((h0 + g) * p.n_splits + split) * 2u;
            part_ml[o] = m[g];
            part_ml[o + 1u] = l[g];
        }
    }
}

@compute @workgroup_size(128)
fn sdpa_decode_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let h = flat_wg(wid, nwg);
    if h >= p.n_heads {
        return;
    }
    let ml = view(4u) + h * p.n_splits * 2u;
    var mx = M_INIT;
    for (var s = 0u; s < p.n_splits; s++) {
        mx = max(mx, part_ml[ml + 2u * s]);
    }
    var sink = M_INIT;
    if p.has_sinks != 0u {
        sink = sinks[view(5u) + h];
        mx = max(mx, sink);
    }
    var total = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        total += part_ml[ml + 2u * s + 1u] * exp(part_ml[ml + 2u * s] - mx);
    }
    if p.has_sinks != 0u {
        total += exp(sink - mx);
    }
    let inv = select(0.0, 1.0 / total, total > 0.0);
    let po = view(3u) + h * p.n_splits * HEAD_DIM;
    for (var d = lid; d < HEAD_DIM; d += 128u) {
        var a = 0.0;
        for (var s = 0u; s < p.n_splits; s++) {
            a += part_o[po + s * HEAD_DIM + d] * exp(part_ml[ml + 2u * s] - mx);
        }
        out[view(6u) + h * HEAD_DIM + d] = a * inv;
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

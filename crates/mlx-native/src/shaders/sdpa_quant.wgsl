// sdpa_quant: flash decode over a compressed KV cache layer (u32 [kv_heads, slots,
// row_words]; position k in slot k % slots; layouts in kv_quant.rs). Same structure as
// sdpa_decode in sdpa.wgsl (split-K partials, then a reduction dispatch), with:
//   - rotated modes: each workgroup rotates its GT query heads once, q' = H (s * q) / sqrt(d)
//     (s the fixed signs, H the Walsh-Hadamard matrix; orthogonal, so q.k = q'.k'), and
//     dots q' with K dequantized in the rotated basis; the output accumulates rotated V and
//     the reduction rotates it back, o = s * (H o') / sqrt(d);
//   - K and V dequantized in registers, 4 elements at a time (deq4).
// GQA, sliding window (kv_lo), softcap and sinks as in sdpa.wgsl.
//
// Bindings: 0 q f32, 1 k cache u32, 2 v cache u32, 3 part_o f32, 4 part_ml f32
// [n_heads, n_splits, 2], 5 sinks f32 [n_heads], 6 out f32 (reduce).
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
    _pad1: u32,
    _pad2: u32,
    cb: array<vec4<f32>, 4>,
    cb2: vec4<f32>,
    signs: array<vec4<u32>, 4>,
}

// Query heads per decode workgroup (1, 2, 4 or 8; at most 4 for HEAD_DIM 512).
override GT: u32 = 8u;

const KT: u32 = 128u;
const NT: u32 = 128u;
const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> kc: array<u32>;
@group(0) @binding(2) var<storage, read> vc: array<u32>;
@group(0) @binding(3) var<storage, read_write> part_o: array<f32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

fn wd(is_v: bool, i: u32) -> u32 {
    if is_v {
        return vc[i];
    }
    return kc[i];
}

fn load_k(row: u32, c: u32) -> vec4<f32> {
    return deq4(false, view(1u) + row * p.row_words, c);
}

fn load_v(row: u32, c: u32) -> vec4<f32> {
    return deq4(true, view(2u) + row * p.row_words, c);
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

var<workgroup> q_sh: array<vec4<f32>, 512>;
// Probabilities at [0, 1024), reduction scratch at [1024, 2048); the query rotation uses
// all of it before either.
var<workgroup> scr: array<f32, 2048>;
var<workgroup> acc_sh: array<vec4<f32>, 512>;
var<workgroup> alpha_sh: array<f32, 8>;
var<private> sg_lane: u32;
var<private> sg_index: u32;
var<private> sg_count: u32;

const RED: u32 = 1024u;

fn tile_reduce(v: ptr<function, array<f32, 8>>, lid: u32, is_max: bool) {
#if SUBGROUPS
    for (var g = 0u; g < GT; g++) {
        let x = (*v)[g];
        let r = select(subgroupAdd(x), subgroupMax(x), is_max);
        if sg_lane == 0u {
            scr[RED + g * KT + sg_index] = r;
        }
    }
    workgroupBarrier();
    for (var g = 0u; g < GT; g++) {
        var t = scr[RED + g * KT];
        for (var i = 1u; i < sg_count; i++) {
            let y = scr[RED + g * KT + i];
            t = select(t + y, max(t, y), is_max);
        }
        (*v)[g] = t;
    }
#else
    for (var g = 0u; g < GT; g++) {
        scr[RED + g * KT + lid] = (*v)[g];
    }
    workgroupBarrier();
    for (var s = KT / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            for (var g = 0u; g < GT; g++) {
                let a = scr[RED + g * KT + lid];
                let b = scr[RED + g * KT + lid + s];
                scr[RED + g * KT + lid] = select(a + b, max(a, b), is_max);
            }
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < GT; g++) {
        (*v)[g] = scr[RED + g * KT];
    }
#endif
}

@compute @workgroup_size(128)
fn sdpa_quant_decode(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
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
    if ROT {
        for (var i = lid; i < GT * HEAD_DIM; i += KT) {
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
        for (var i = lid; i < GT * C4; i += KT) {
            q_sh[i] = vec4<f32>(scr[4u * i], scr[4u * i + 1u], scr[4u * i + 2u],
                                scr[4u * i + 3u]) * p.inv_sqrt_d;
        }
    } else {
        for (var i = lid; i < GT * C4; i += KT) {
            let g = i / C4;
            var v = vec4<f32>(0.0);
            if g < ng {
                let o = view(0u) + (h0 + g) * HEAD_DIM + (i % C4) * 4u;
                v = vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
            }
            q_sh[i] = v;
        }
    }
    let k_start = p.kv_lo + split * p.split_len;
    let k_end = min(p.kv_hi, k_start + p.split_len);
    let rowbase = kvh * p.slots;
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
            scr[g * KT + lid] = pv;
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
                    a += scr[g * KT + j] * load_v(rowbase + wrap(s0 + j), c);
                }
                acc[ii] = a;
            }
        }
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
fn sdpa_quant_reduce(@builtin(workgroup_id) wid: vec3<u32>,
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
        if ROT {
            scr[d] = a * inv;
        } else {
            out[view(6u) + h * HEAD_DIM + d] = a * inv;
        }
    }
    if ROT {
        workgroupBarrier();
        fwht(1u, lid);
        for (var d = lid; d < HEAD_DIM; d += 128u) {
            out[view(6u) + h * HEAD_DIM + d] = scr[d] * sgn(d) * p.inv_sqrt_d;
        }
    }
}

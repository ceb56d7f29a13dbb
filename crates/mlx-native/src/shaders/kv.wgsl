// Writes into a layer's KV cache ([1, kv_heads, slots, head_dim], f16 or f32 by the variant)
// at positions start..start+T, slot = position % slots (a ring for sliding-window layers,
// the identity for full ones).
//   kv_append    T new tokens of K and V (f32 [T, kv_heads, head_dim]). One invocation per
//                cache word: f16 caches pack two halves per u32 word, so no two invocations
//                write the same word.
//   rope_append  the decode step's fused helper: rows [T, n_heads + 2 kv_heads, head_dim]
//                of a stacked q|k|v projection; q and k heads get the optional per-head RMS
//                norm (NORM) and RoPE, q is written out, k and v go into the cache. One
//                workgroup per (token, head) row, the row staged in workgroup memory so that
//                rotated neox pairs (j, j + rot_half) can be packed as adjacent f16 halves.
// Bindings: 0 a (f32): k_new | the q|k|v rows; 1 b (f32): v_new | the q norm weight;
// 2 k_cache, 3 v_cache; rope_append only: 4 positions (u32), 5 the RoPE table (4 f32 per
// pair, common/rope_turns.wgsl), 6 q out (f32 [T, n_heads, head_dim]), 7 the k norm weight.
struct Params {
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    slots: u32,
    start: u32,
    // Cache words per row: head_dim / 2 for f16, head_dim for f32.
    row_words: u32,
    // kv_append: tokens * kv_heads * row_words.
    items: u32,
    // rope_append: query heads.
    n_heads: u32,
    // rope_append: pairs per head, rotated pairs, the rotation's scale and the norm's eps.
    half: u32,
    rot_half: u32,
    mscale: f32,
    eps: f32,
}
override NEOX: u32 = 0u;
override NORM: u32 = 0u;

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<storage, read> freq: array<f32>;
@group(0) @binding(6) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(7) var<storage, read> k_norm: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;
#else
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
#endif

@compute @workgroup_size(WG)
fn kv_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    if i >= p.items {
        return;
    }
    let w = i % p.row_words;
    let th = i / p.row_words;
    let h = th % p.kv_heads;
    let t = th / p.kv_heads;
    let slot = (p.start + t) % p.slots;
    let dst = (h * p.slots + slot) * p.row_words + w;
    let src = th * p.head_dim;
#if DT_F32
    k_cache[view(2u) + dst] = a[view(0u) + src + w];
    v_cache[view(3u) + dst] = b[view(1u) + src + w];
#else
    let s = src + 2u * w;
    let ks = view(0u) + s;
    let vs = view(1u) + s;
    // Cache views start on a word (checked on the Rust side): view / 2 is the word offset.
    k_cache[view(2u) / 2u + dst] = pack2x16float(vec2<f32>(a[ks], a[ks + 1u]));
    v_cache[view(3u) / 2u + dst] = pack2x16float(vec2<f32>(b[vs], b[vs + 1u]));
#endif
}

// One row of rope_append (head_dim <= 512).
var<workgroup> rowbuf: array<f32, 512>;

@compute @workgroup_size(WG)
fn rope_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
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
    let heads = p.n_heads + 2u * p.kv_heads;
    // The row is uniform over the workgroup, so every branch below on it is too.
    let row = flat_wg(wid, nwg);
    if row >= p.tokens * heads {
        return;
    }
    let t = row / heads;
    let h = row % heads;
    let hd = p.head_dim;
    let src = view(0u) + row * hd;
    for (var i = lid; i < hd; i += WG) {
        rowbuf[i] = a[src + i];
    }
    workgroupBarrier();
    let is_q = h < p.n_heads;
    let is_v = h >= p.n_heads + p.kv_heads;
    if !is_v {
        var inv = 1.0;
        if NORM != 0u {
            var ss = 0.0;
            for (var i = lid; i < hd; i += WG) {
                ss += rowbuf[i] * rowbuf[i];
            }
            inv = inverseSqrt(wg_sum(ss, lid) / f32(hd) + p.eps);
        }
        let pw = pos[view(4u) + t];
        for (var j = lid; j < p.half; j += WG) {
            var i0 = 2u * j;
            var i1 = i0 + 1u;
            if NEOX == 1u && j < p.rot_half {
                i0 = j;
                i1 = j + p.rot_half;
            }
            var x0 = rowbuf[i0];
            var x1 = rowbuf[i1];
            if NORM != 0u {
                if is_q {
                    x0 *= inv * b[view(1u) + i0];
                    x1 *= inv * b[view(1u) + i1];
                } else {
                    x0 *= inv * k_norm[view(7u) + i0];
                    x1 *= inv * k_norm[view(7u) + i1];
                }
            }
            if j < p.rot_half {
                let fo = view(5u) + 4u * j;
                let ang = 6.283185307179586 * turns_of(pw, freq[fo], freq[fo + 1u],
                                                       freq[fo + 2u]);
                let c = cos(ang) * p.mscale;
                let s = sin(ang) * p.mscale;
                rowbuf[i0] = x0 * c - x1 * s;
                rowbuf[i1] = x0 * s + x1 * c;
            } else {
                // Past the rotary dims (partial rotary): elements 2j and 2j + 1 pass through.
                rowbuf[i0] = x0;
                rowbuf[i1] = x1;
            }
        }
        workgroupBarrier();
    }
    if is_q {
        let dst = view(6u) + (t * p.n_heads + h) * hd;
        for (var i = lid; i < hd; i += WG) {
            q_out[dst + i] = rowbuf[i];
        }
        return;
    }
    let slot = (p.start + t) % p.slots;
    let kvh = select(h - p.n_heads, h - p.n_heads - p.kv_heads, is_v);
    let dst = (kvh * p.slots + slot) * p.row_words;
    for (var w = lid; w < p.row_words; w += WG) {
#if DT_F32
        let v = rowbuf[w];
        if is_v {
            v_cache[view(3u) + dst + w] = v;
        } else {
            k_cache[view(2u) + dst + w] = v;
        }
#else
        let v = pack2x16float(vec2<f32>(rowbuf[2u * w], rowbuf[2u * w + 1u]));
        if is_v {
            v_cache[view(3u) / 2u + dst + w] = v;
        } else {
            k_cache[view(2u) / 2u + dst + w] = v;
        }
#endif
    }
}

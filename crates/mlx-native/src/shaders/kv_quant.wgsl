// kv_quant: write new K/V rows into a compressed KV cache layer (u32 [kv_heads, slots,
// row_words], position start + t in slot (start + t) % slots, like kv_append), and read a
// range of positions back as f32. Row layouts: kv_quant.rs; helpers: kv_quant_common.wgsl.
//
// Two kinds of side data (the side buffer, kv_quant_common.wgsl), for every mode:
//   - keys are stored centered on mu_k, the per-(kv head, channel) mean of the K rows of
//     the append that covers the first compressed position: x = k - mu_k is quantized and mu_k added back on reading.
//     Keys share a large common component (per-channel offsets that RoPE leaves nearly in
//     place) that says nothing about which key to attend to, while a per-row quantizer's
//     error grows with the whole row's norm; centering removes it. V is not centered
//     (its mean is small next to its spread);
//   - positions 0..SINKS (attention sinks, which take a large share of the attention) are
//     written exact to the side buffer instead of compressed;
//   - the last RECENT positions of every append are also written exact (f16) to the side
//     buffer's ring (KIVI's residual window: the most recent keys take most of the attention
//     of the next queries), besides their compressed rows, which take over once the ring
//     moves past them.
//
//   kv_quant_mean     one workgroup per kv head: mu_k = the mean of the new K rows (run for
//                     the append that covers position SINKS, the first compressed one).
//   kv_quant_append   one workgroup per (token, kv head, K or V) row; a sink position's
//                     row goes to the side buffer (after the rotation, not centered), the
//                     others are compressed (K minus mu_k), and those among the last RECENT
//                     of the append also go to their ring row (rotated, not centered, f16).
//                     Rotated modes: x times
//                     the fixed signs, unnormalized FWHT z, norm = ||x||, u = z / norm (unit
//                     variance per coordinate), index = nearest Lloyd-Max level (the number of
//                     cell boundaries u exceeds), bit planes of 32 indices per word. q8: per
//                     32-block scale f16(amax / 127), q = round(x / scale). q4: per block
//                     scale f16((max - min) / 15) and min f16(min), q = round((x - min) / scale)
//                     clamped to 0..15 (scale 0: q = 0).
//   kv_quant_dequant  one workgroup per (position, kv head, K or V) row of positions
//                     start..start + tokens: dequantize (sinks and positions >= win_lo:
//                     read the exact side row),
//                     inverse-rotate, add mu_k to compressed keys, write f32 rows
//                     [tokens, kv_heads, HEAD_DIM].
//
// Bindings (at most 8 per kernel, so dequant reads the caches through the append's
// read_write bindings): append: 0 k_new f32, 1 v_new f32, 2 k_cache u32, 3 v_cache u32,
// 6 side u32; dequant: 2 k_cache, 3 v_cache, 4 k_out f32, 5 v_out f32, 6 side;
// mean: 0 k_new, 6 side (row 0 written).
struct Params {
    tokens: u32,
    kv_heads: u32,
    slots: u32,
    start: u32,
    row_words: u32,
    // tokens * kv_heads * 2 (K and V).
    rows: u32,
    inv_sqrt_d: f32,
    // dequant: positions >= win_lo (up to the layer's length) are in the exact ring.
    win_lo: u32,
    cb: array<vec4<f32>, 4>,
    cb2: vec4<f32>,
    signs: array<vec4<u32>, 4>,
}

const NT: u32 = 128u;

@group(0) @binding(0) var<storage, read> k_new: array<f32>;
@group(0) @binding(1) var<storage, read> v_new: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> side: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

var<workgroup> scr: array<f32, 512>;
var<workgroup> ix: array<u32, 512>;
var<workgroup> red: array<f32, 128>;
var<workgroup> bs: array<vec2<f32>, 16>;

fn wd(is_v: bool, i: u32) -> u32 {
    if is_v {
        return v_cache[i];
    }
    return k_cache[i];
}

fn sw(i: u32) -> u32 {
    return side[view(6u) + i];
}

@compute @workgroup_size(128)
fn kv_quant_mean(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let h = flat_wg(wid, nwg);
    if h >= p.kv_heads {
        return;
    }
    let inv = 1.0 / f32(p.tokens);
    for (var i = lid; i < HEAD_DIM; i += NT) {
        var acc = 0.0;
        for (var t = 0u; t < p.tokens; t++) {
            acc += k_new[view(0u) + (t * p.kv_heads + h) * HEAD_DIM + i];
        }
        side[view(6u) + side_row(h, 0u) + i] = bitcast<u32>(acc * inv);
    }
}

@compute @workgroup_size(128)
fn kv_quant_append(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let wg = flat_wg(wid, nwg);
    if wg >= p.rows {
        return;
    }
    let is_v = (wg & 1u) == 1u;
    let th = wg / 2u;
    let h = th % p.kv_heads;
    let t = th / p.kv_heads;
    let src = th * HEAD_DIM;
    let pos = p.start + t;
    let sink = pos < SINKS;
    let mrow = view(6u) + side_row(h, 0u);
    // The last RECENT rows of the append (earlier ones share their ring rows with later
    // rows of the same append) also go exact to the ring: the row as it is (K not
    // centered), in the decoder's basis. Uniform over the workgroup.
    if !sink && t + RECENT >= p.tokens {
        for (var i = lid; i < HEAD_DIM; i += NT) {
            var x: f32;
            if is_v {
                x = v_new[view(1u) + src + i];
            } else {
                x = k_new[view(0u) + src + i];
            }
            scr[i] = select(x, x * sgn(i), ROT);
        }
        workgroupBarrier();
        if ROT {
            fwht(1u, lid);
        }
        let ro = view(6u) + recent_row(h, pos, is_v);
        let s = select(1.0, p.inv_sqrt_d, ROT);
        for (var w = lid; w < HEAD_DIM / 2u; w += NT) {
            side[ro + w] = pack2x16float(vec2<f32>(scr[2u * w], scr[2u * w + 1u]) * s);
        }
        // scr is reused below.
        workgroupBarrier();
    }
    var ss = 0.0;
    for (var i = lid; i < HEAD_DIM; i += NT) {
        var x: f32;
        if is_v {
            x = v_new[view(1u) + src + i];
        } else {
            x = k_new[view(0u) + src + i];
            if !sink {
                x -= bitcast<f32>(side[mrow + i]);
            }
        }
        ss += x * x;
        scr[i] = select(x, x * sgn(i), ROT);
    }
    red[lid] = ss;
    workgroupBarrier();
    var nrm = 0.0;
    if sink {
        // Exact, in the decoder's basis (sink is uniform over the workgroup).
        if ROT {
            fwht(1u, lid);
        }
        let so = view(6u) + sink_row(h, pos, is_v);
        for (var i = lid; i < HEAD_DIM; i += NT) {
            side[so + i] = bitcast<u32>(select(scr[i], scr[i] * p.inv_sqrt_d, ROT));
        }
        return;
    }
    if ROT {
        fwht(1u, lid);
        var tot = 0.0;
        for (var i = 0u; i < NT; i++) {
            tot += red[i];
        }
        nrm = sqrt(tot);
        let inv = select(0.0, 1.0 / nrm, nrm > 0.0);
        for (var i = lid; i < HEAD_DIM; i += NT) {
            let u = scr[i] * inv;
            let two = MODE == 4u && i >= HEAD_DIM / 2u;
            let n = select(1u << tq_bits(), 4u, two);
            var k = 0u;
            for (var j = 0u; j + 1u < n; j++) {
                if u > 0.5 * (lvl(j, two) + lvl(j + 1u, two)) {
                    k = j + 1u;
                }
            }
            ix[i] = k;
        }
    } else {
        if lid < NB {
            var mn = 3.0e38;
            var mx = -3.0e38;
            for (var j = 0u; j < 32u; j++) {
                let x = scr[lid * 32u + j];
                mn = min(mn, x);
                mx = max(mx, x);
            }
            if MODE == 0u {
                let amax = max(mx, -mn);
                bs[lid] = vec2<f32>(to_f16_value(amax / 127.0), 0.0);
            } else {
                bs[lid] = vec2<f32>(to_f16_value((mx - mn) / 15.0), to_f16_value(mn));
            }
        }
        workgroupBarrier();
        for (var i = lid; i < HEAD_DIM; i += NT) {
            let s = bs[i / 32u];
            let x = scr[i];
            var q = 0u;
            if s.x > 0.0 {
                if MODE == 0u {
                    q = bitcast<u32>(i32(clamp(round(x / s.x), -127.0, 127.0))) & 255u;
                } else {
                    q = u32(clamp(round((x - s.y) / s.x), 0.0, 15.0));
                }
            }
            ix[i] = q;
        }
    }
    workgroupBarrier();
    let slot = (p.start + t) % p.slots;
    let dst = (h * p.slots + slot) * p.row_words;
    for (var w = lid; w < p.row_words; w += NT) {
        var word = 0u;
        if ROT {
            if w == 0u {
                word = bitcast<u32>(nrm);
            } else {
                var gi: u32;
                var b: u32;
                let k = w - 1u;
                if MODE == 4u {
                    let half = HEAD_DIM / 64u;
                    if k < half * 3u {
                        gi = k / 3u;
                        b = k % 3u;
                    } else {
                        gi = half + (k - half * 3u) / 2u;
                        b = (k - half * 3u) % 2u;
                    }
                } else {
                    gi = k / tq_bits();
                    b = k % tq_bits();
                }
                for (var j = 0u; j < 32u; j++) {
                    word |= ((ix[gi * 32u + j] >> b) & 1u) << j;
                }
            }
        } else if MODE == 0u {
            let sw = HEAD_DIM / 64u;
            if w < sw {
                word = pack2x16float(vec2<f32>(bs[2u * w].x, bs[2u * w + 1u].x));
            } else {
                let k = w - sw;
                for (var j = 0u; j < 4u; j++) {
                    word |= ix[4u * k + j] << (8u * j);
                }
            }
        } else {
            if w < NB {
                word = pack2x16float(bs[w]);
            } else {
                let k = w - NB;
                for (var j = 0u; j < 8u; j++) {
                    word |= ix[8u * k + j] << (4u * j);
                }
            }
        }
        if is_v {
            v_cache[view(3u) + dst + w] = word;
        } else {
            k_cache[view(2u) + dst + w] = word;
        }
    }
}

@compute @workgroup_size(128)
fn kv_quant_dequant(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let wg = flat_wg(wid, nwg);
    if wg >= p.rows {
        return;
    }
    let is_v = (wg & 1u) == 1u;
    let th = wg / 2u;
    let h = th % p.kv_heads;
    let t = th / p.kv_heads;
    let pos = p.start + t;
    let exact = pos < SINKS || pos >= p.win_lo;
    let slot = pos % p.slots;
    let rb = select(view(2u), view(3u), is_v) + (h * p.slots + slot) * p.row_words;
    for (var c = lid; c < C4; c += NT) {
        var x: vec4<f32>;
        if exact {
            x = exact4(h, pos, is_v, c);
        } else {
            x = deq4(is_v, rb, c);
        }
        scr[4u * c] = x.x;
        scr[4u * c + 1u] = x.y;
        scr[4u * c + 2u] = x.z;
        scr[4u * c + 3u] = x.w;
    }
    workgroupBarrier();
    if ROT {
        fwht(1u, lid);
    }
    let dst = th * HEAD_DIM;
    for (var i = lid; i < HEAD_DIM; i += NT) {
        var x = scr[i];
        if ROT {
            x = x * sgn(i) * p.inv_sqrt_d;
        }
        if is_v {
            v_out[view(5u) + dst + i] = x;
        } else {
            if !exact {
                x += bitcast<f32>(side[view(6u) + side_row(h, 0u) + i]);
            }
            k_out[view(4u) + dst + i] = x;
        }
    }
}

// v rounded to the nearest f16 value (ties to even), as an f32. Done on the bits: an H100's
// Vulkan driver folded unpack2x16float(pack2x16float(v)) into v, so indices were computed
// against an unrounded scale while the rounded one was stored. Exact for f16 normals; the
// scales and minima of K/V blocks never come near f16's subnormal range (< 6.1e-5) in
// practice, and there the result is still an f32 within one f16 step.
fn to_f16_value(v: f32) -> f32 {
    let b = bitcast<u32>(v);
    let r = b + 0xFFFu + ((b >> 13u) & 1u);
    return bitcast<f32>(r & 0xFFFFE000u);
}

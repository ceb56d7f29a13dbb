// GGML K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (QTYPE = the GGML type id): 256-element
// super-blocks, one unit = one 32-element sub-block j = u % 8 of block u / 8.
// Repacked layouts (word offsets within a block, see ggml_weight.rs):
//   Q2_K raw,   21 words: scales[16] (w0..3), qs[64] (w4..19), d|dmin (w20)
//   Q3_K split, 27 words: hmask[32] (w0..7), qs[64] (w8..23), scales[12] (w24..26); d in
//               the shard's f16 scale array
//   Q4_K raw,   36 words: d|dmin (w0), scales[12] (w1..3), qs[128] (w4..35)
//   Q5_K raw,   44 words: d|dmin (w0), scales[12] (w1..3), qh[32] (w4..11), qs[128] (w12..43)
//   Q6_K split, 52 words: ql[128] (w0..31), qh[64] (w32..47), scales[16] i8 (w48..51); d in
//               the scale array
override QTYPE: u32 = 12u;

// Six-bit scale (x) and min (y) of sub-block j from the 12 scale bytes at byte s of the words
// at o (Q4_K, Q5_K).
fn scale_min_k4(o: u32, s: u32, j: u32) -> vec2<f32> {
    if j < 4u {
        return vec2<f32>(f32(byte_at(o, s + j) & 63u), f32(byte_at(o, s + j + 4u) & 63u));
    }
    let a = byte_at(o, s + j + 4u);
    let lo = byte_at(o, s + j - 4u);
    let hi = byte_at(o, s + j);
    return vec2<f32>(f32((a & 0xFu) | ((lo >> 6u) << 4u)), f32((a >> 4u) | ((hi >> 6u) << 4u)));
}

// Sixteen 6-bit Q3_K scales, biased by 32, from the 12 bytes at byte 96 of the words at o.
fn q3_scale(o: u32, k: u32) -> f32 {
    let low = (byte_at(o, 96u + k % 8u) >> (4u * (k / 8u))) & 0xFu;
    let high = (byte_at(o, 104u + k % 4u) >> (2u * (k / 4u))) & 3u;
    return f32(i32(low | (high << 4u)) - 32);
}

// Unit header: the scale (x) and min (y) of the sub-block's first 16 elements, (z, w) of
// its last 16 (equal for Q4_K and Q5_K, whose scales cover 32).
fn unit_hdr(row: u32, u: u32) -> vec4<f32> {
    let b = row * p.bpr + u / 8u;
    let j = u % 8u;
    switch QTYPE {
        case 10u: {
            let o = b * 21u;
            let dd = wword(o + 20u);
            let d = hf(dd, 0u);
            let dmin = hf(dd, 1u);
            let s0 = byte_at(o, 2u * j);
            let s1 = byte_at(o, 2u * j + 1u);
            return vec4<f32>(d * f32(s0 & 0xFu), dmin * f32(s0 >> 4u),
                             d * f32(s1 & 0xFu), dmin * f32(s1 >> 4u));
        }
        case 11u: {
            let o = b * 27u;
            let d = split_scale(b);
            return vec4<f32>(d * q3_scale(o, 2u * j), 0.0, d * q3_scale(o, 2u * j + 1u), 0.0);
        }
        case 13u: {
            let o = b * 44u;
            let dd = wword(o);
            let sm = scale_min_k4(o, 4u, j);
            let dl = hf(dd, 0u) * sm.x;
            let ml = hf(dd, 1u) * sm.y;
            return vec4<f32>(dl, ml, dl, ml);
        }
        case 14u: {
            let o = b * 52u;
            let d = split_scale(b);
            let s0 = byte_at(o, 192u + 2u * j);
            let s1 = byte_at(o, 193u + 2u * j);
            return vec4<f32>(d * f32(i32(s0 << 24u) >> 24u), 0.0, d * f32(i32(s1 << 24u) >> 24u), 0.0);
        }
        default: {
            // Q4_K
            let o = b * 36u;
            let dd = wword(o);
            let sm = scale_min_k4(o, 4u, j);
            let dl = hf(dd, 0u) * sm.x;
            let ml = hf(dd, 1u) * sm.y;
            return vec4<f32>(dl, ml, dl, ml);
        }
    }
}

// Elements 4g..4g+4 of the unit, given its header h.
fn dq_group(row: u32, u: u32, g: u32, h: vec4<f32>) -> vec4<f32> {
    let b = row * p.bpr + u / 8u;
    let j = u % 8u;
    let sm = select(h.zw, h.xy, g < 4u);
    switch QTYPE {
        case 10u: {
            let o = b * 21u;
            return sm.x * crumb4(wword(o + 4u + (j / 4u) * 8u + g), 2u * (j % 4u)) - sm.y;
        }
        case 11u: {
            let o = b * 27u;
            // high bit set: +0, clear: -4
            let q = crumb4(wword(o + 8u + (j / 4u) * 8u + g), 2u * (j % 4u))
                + 4.0 * bit4(wword(o + g), j) - 4.0;
            return sm.x * q;
        }
        case 13u: {
            let o = b * 44u;
            let q = nib4(wword(o + 12u + (j / 2u) * 8u + g), 4u * (j % 2u))
                + 16.0 * bit4(wword(o + 4u + g), j);
            return sm.x * q - sm.y;
        }
        case 14u: {
            let o = b * 52u;
            let c = j / 4u;
            let ql = nib4(wword(o + c * 16u + (j % 2u) * 8u + g), 4u * ((j % 4u) / 2u));
            let qh = crumb4(wword(o + 32u + c * 8u + g), 2u * (j % 4u));
            return sm.x * (ql + 16.0 * qh - 32.0);
        }
        default: {
            // Q4_K
            let o = b * 36u;
            return sm.x * nib4(wword(o + 4u + (j / 2u) * 8u + g), 4u * (j % 2u)) - sm.y;
        }
    }
}

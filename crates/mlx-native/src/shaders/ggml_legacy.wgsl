// GGML 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (QTYPE = the GGML type id).
// One unit is one block. Repacked layouts (word offsets within a block, see ggml_weight.rs):
//   Q4_0 split, 4 words: qs[16]               scale d in the shard's f16 scale array
//   Q5_0 split, 5 words: qh u32, qs[16]       scale d in the scale array
//   Q8_0 split, 8 words: qs[32] (i8)          scale d in the scale array
//   Q4_1 raw,   5 words: d|m, qs[16]
//   Q5_1 raw,   6 words: d|m, qh, qs[16]
// qs: elements 0..16 are the low nibbles of bytes 0..16, elements 16..32 the high nibbles.
override QTYPE: u32 = 2u;

// Unit header: (d, m) of the block.
fn unit_hdr(row: u32, u: u32) -> vec4<f32> {
    let b = row * p.bpr + u;
    switch QTYPE {
        case 3u: {
            let dm = wword(b * 5u);
            return vec4<f32>(hf(dm, 0u), hf(dm, 1u), 0.0, 0.0);
        }
        case 7u: {
            let dm = wword(b * 6u);
            return vec4<f32>(hf(dm, 0u), hf(dm, 1u), 0.0, 0.0);
        }
        default: {
            return vec4<f32>(split_scale(b), 0.0, 0.0, 0.0);
        }
    }
}

// Elements 4g..4g+4 of the unit, given its header h.
fn dq_group(row: u32, u: u32, g: u32, h: vec4<f32>) -> vec4<f32> {
    let b = row * p.bpr + u;
    let d = h.x;
    // groups 0..4: low nibbles of qs word g; groups 4..8: high nibbles of word g - 4
    let i = g % 4u;
    let sh = 4u * (g / 4u);
    switch QTYPE {
        case 2u: {
            return (nib4(wword(b * 4u + i), sh) - 8.0) * d;
        }
        case 3u: {
            return nib4(wword(b * 5u + 1u + i), sh) * d + h.y;
        }
        case 6u: {
            let o = b * 5u;
            let q = nib4(wword(o + 1u + i), sh) + 16.0 * spread4(wword(o) >> (4u * g));
            return (q - 16.0) * d;
        }
        case 7u: {
            let o = b * 6u;
            let q = nib4(wword(o + 2u + i), sh) + 16.0 * spread4(wword(o + 1u) >> (4u * g));
            return q * d + h.y;
        }
        default: {
            // Q8_0
            return sbytes4(wword(b * 8u + g)) * d;
        }
    }
}

// The low four bits of h, one per component.
fn spread4(h: u32) -> vec4<f32> {
    return ufloat4(vec4<u32>(h, h >> 1u, h >> 2u, h >> 3u) & vec4<u32>(1u));
}

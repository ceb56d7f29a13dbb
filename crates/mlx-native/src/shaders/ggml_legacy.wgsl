// GGML 32-element block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (QTYPE = the GGML type id).
// One unit is one block. Repacked layouts (word offsets within a block, see ggml_weight.rs):
//   Q4_0 split, 4 words: qs[16]               scale d in the shard's f16 scale array
//   Q5_0 split, 5 words: qh u32, qs[16]       scale d in the scale array
//   Q8_0 split, 8 words: qs[32] (i8)          scale d in the scale array
//   Q4_1 raw,   5 words: d|m, qs[16]
//   Q5_1 raw,   6 words: d|m, qh, qs[16]
// qs: elements 0..16 are the low nibbles of bytes 0..16, elements 16..32 the high nibbles.
override QTYPE: u32 = 2u;

fn dq_unit(row: u32, u: u32) -> array<vec4<f32>, 8> {
    let b = row * p.bpr + u;
    var v: array<vec4<f32>, 8>;
    switch QTYPE {
        case 2u: {
            let d = split_scale(b);
            for (var i = 0u; i < 4u; i++) {
                let w = wword(b * 4u + i);
                v[i] = (nib4(w, 0u) - 8.0) * d;
                v[i + 4u] = (nib4(w, 4u) - 8.0) * d;
            }
        }
        case 3u: {
            let o = b * 5u;
            let dm = wword(o);
            let d = hf(dm, 0u);
            let m = hf(dm, 1u);
            for (var i = 0u; i < 4u; i++) {
                let w = wword(o + 1u + i);
                v[i] = nib4(w, 0u) * d + m;
                v[i + 4u] = nib4(w, 4u) * d + m;
            }
        }
        case 6u: {
            let o = b * 5u;
            let d = split_scale(b);
            let qh = wword(o);
            for (var i = 0u; i < 4u; i++) {
                let w = wword(o + 1u + i);
                v[i] = (nib4(w, 0u) + 16.0 * spread4(qh >> (4u * i)) - 16.0) * d;
                v[i + 4u] = (nib4(w, 4u) + 16.0 * spread4(qh >> (16u + 4u * i)) - 16.0) * d;
            }
        }
        case 7u: {
            let o = b * 6u;
            let dm = wword(o);
            let d = hf(dm, 0u);
            let m = hf(dm, 1u);
            let qh = wword(o + 1u);
            for (var i = 0u; i < 4u; i++) {
                let w = wword(o + 2u + i);
                v[i] = (nib4(w, 0u) + 16.0 * spread4(qh >> (4u * i))) * d + m;
                v[i + 4u] = (nib4(w, 4u) + 16.0 * spread4(qh >> (16u + 4u * i))) * d + m;
            }
        }
        default: {
            // Q8_0
            let d = split_scale(b);
            for (var i = 0u; i < 8u; i++) {
                v[i] = vec4<f32>(unpack4xI8(wword(b * 8u + i))) * d;
            }
        }
    }
    return v;
}

// The low four bits of h, one per component.
fn spread4(h: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(h, h >> 1u, h >> 2u, h >> 3u) & vec4<u32>(1u));
}

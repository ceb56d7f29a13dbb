// Dense GGUF weights (F32, F16, BF16 by the variant's dtype) through the GGML kernels:
// rows of K elements stored back to back as u32 words (two 16-bit elements a word).
// K need not be a multiple of 32: elements past K read as zero.

fn dense_at(i: u32) -> f32 {
#if DT_F32
    return bitcast<f32>(wword(i));
#else
    return half_at(wword(i >> 1u), i);
#endif
}

fn dq_unit(row: u32, u: u32) -> array<vec4<f32>, 8> {
    let base = row * p.k;
    let k0 = u * 32u;
    var v: array<vec4<f32>, 8>;
    if k0 + 32u <= p.k {
        for (var g = 0u; g < 8u; g++) {
            let i = base + k0 + 4u * g;
            v[g] = vec4<f32>(dense_at(i), dense_at(i + 1u), dense_at(i + 2u), dense_at(i + 3u));
        }
    } else {
        for (var g = 0u; g < 8u; g++) {
            for (var c = 0u; c < 4u; c++) {
                let k = k0 + 4u * g + c;
                if k < p.k {
                    v[g][c] = dense_at(base + k);
                }
            }
        }
    }
    return v;
}

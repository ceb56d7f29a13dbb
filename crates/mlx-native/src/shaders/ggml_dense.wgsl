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

fn unit_hdr(row: u32, u: u32) -> vec4<f32> {
    return vec4<f32>(0.0);
}

fn dq_group(row: u32, u: u32, g: u32, h: vec4<f32>) -> vec4<f32> {
    let k = u * 32u + 4u * g;
    let i = row * p.k + k;
    if k + 4u <= p.k {
        return vec4<f32>(dense_at(i), dense_at(i + 1u), dense_at(i + 2u), dense_at(i + 3u));
    }
    var v = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if k + c < p.k {
            v[c] = dense_at(i + c);
        }
    }
    return v;
}

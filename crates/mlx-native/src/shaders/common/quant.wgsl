// MLX quantized weights (weights/quant.rs): bindings 1 packed words, 2 scales, 3 biases, and
// decoding helpers. A row is one little-endian bit stream, code j at bits [j*BITS, (j+1)*BITS).
//   affine (DT_F32/DT_F16/DT_BF16, the scales' dtype): w = scale * q + bias
//   mxfp4  (DT_U8: e8m0 byte scales, no biases):        w = fp4_e2m1(q) * 2^(e - 127)
override BITS: u32 = 4u;
override GROUP_SIZE: u32 = 64u;

@group(0) @binding(1) var<storage, read> packed: array<u32>;
#if DT_F32
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> biases: array<f32>;
fn scale_at(g: u32) -> f32 {
    return scales[view(2u) + g];
}
fn bias_at(g: u32) -> f32 {
    return biases[view(3u) + g];
}
#else
@group(0) @binding(2) var<storage, read> scales: array<u32>;
#if DT_U8
// e8m0: 2^(e - 127), built from the bits (exp2 may flush the subnormal 2^-127).
fn scale_at(g: u32) -> f32 {
    let j = view(2u) + g;
    let e = (scales[j >> 2u] >> ((j & 3u) * 8u)) & 0xffu;
    return select(bitcast<f32>(e << 23u), bitcast<f32>(0x00400000u), e == 0u);
}
fn bias_at(g: u32) -> f32 {
    return 0.0;
}
#else
@group(0) @binding(3) var<storage, read> biases: array<u32>;
fn scale_at(g: u32) -> f32 {
    let j = view(2u) + g;
    return half_at(scales[j >> 1u], j);
}
fn bias_at(g: u32) -> f32 {
    let j = view(3u) + g;
    return half_at(biases[j >> 1u], j);
}
#endif
#endif

// The value of a code before scaling: q itself (affine) or its E2M1 value (mxfp4).
fn code_value(q: u32) -> f32 {
#if DT_U8
    let e = (q >> 1u) & 3u;
    let m = q & 1u;
    // e > 0: (1 + m/2) * 2^(e-1); e == 0: m / 2.
    let normal = bitcast<f32>(((e + 126u) << 23u) | (m << 22u));
    let mag = select(normal, f32(m) * 0.5, e == 0u);
    return select(mag, -mag, (q & 8u) != 0u);
#else
    return f32(q);
#endif
}

// u32 values below 2^23 as f32, exactly, without integer-to-float conversions (a
// quarter-rate instruction on NVIDIA, which bounded qmv): 2^23 + v has v as its mantissa.
fn u2f4(v: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(v | vec4<u32>(0x4B000000u)) - vec4<f32>(8388608.0);
}

// Four consecutive codes from the low 4*BITS bits of `win`.
fn code_values4(win: u32) -> vec4<f32> {
    let mask = (1u << BITS) - 1u;
    let q = vec4<u32>(win, win >> BITS, win >> (2u * BITS), win >> (3u * BITS)) & vec4<u32>(mask);
#if DT_U8
    return vec4<f32>(code_value(q.x), code_value(q.y), code_value(q.z), code_value(q.w));
#else
    return u2f4(q);
#endif
}

// The 32 bits starting at bit `sh` of the pair (w0, w1); only the low 4*BITS are used.
fn window(w0: u32, w1: u32, sh: u32) -> u32 {
    // sh + 4*BITS > 32 only when sh > 0, so the second shift is in range when it is used.
    return select(w0 >> sh, (w0 >> sh) | (w1 << ((32u - sh) & 31u)), sh + 4u * BITS > 32u);
}

// Code j of packed row `row` (`wpr` words per row); may straddle two words.
fn code_at(row: u32, j: u32, wpr: u32) -> u32 {
    let bit = j * BITS;
    let base = view(1u) + row * wpr + (bit >> 5u);
    let sh = bit & 31u;
    var v = packed[base] >> sh;
    if sh + BITS > 32u {
        v |= packed[base + 1u] << (32u - sh);
    }
    return v & ((1u << BITS) - 1u);
}

// Dequantized weight (row, j) in f32 arithmetic on the stored scale and bias.
fn dequant_at(row: u32, j: u32, wpr: u32, gpr: u32) -> f32 {
    let g = row * gpr + j / GROUP_SIZE;
#if DT_U8
    return code_value(code_at(row, j, wpr)) * scale_at(g);
#else
    return fma(f32(code_at(row, j, wpr)), scale_at(g), bias_at(g));
#endif
}

// A chunk: 32 consecutive codes of a row, held as BITS words in w (matvec kernels).
// Codes 4i..4i+3 of a chunk held in w (BITS words) as values. After inlining, i and BITS
// are constants, so every index below is too and w stays in registers.
fn codes4(w: array<u32, 8>, i: u32) -> vec4<f32> {
    let bit = i * 4u * BITS;
    let lo = bit >> 5u;
    return code_values4(window(w[lo], w[min(lo + 1u, 7u)], bit & 31u));
}

// Σ x·code over one chunk, written out so no private array is indexed dynamically.
fn chunk_dot(w: array<u32, 8>, x: array<vec4<f32>, 8>) -> f32 {
    let a = dot(x[0], codes4(w, 0u)) + dot(x[1], codes4(w, 1u));
    let b = dot(x[2], codes4(w, 2u)) + dot(x[3], codes4(w, 3u));
    let c = dot(x[4], codes4(w, 4u)) + dot(x[5], codes4(w, 5u));
    let d = dot(x[6], codes4(w, 6u)) + dot(x[7], codes4(w, 7u));
    return (a + b) + (c + d);
}

// Quantized-x dot products for the matvec kernels (qmv, gqmv), 4- and 8-bit affine codes:
// the codes' bytes against an x chunk quantized by common/xq_quantize.wgsl (included
// before this file), with packed 4-byte dot products (DP4A on NVIDIA). common/quant.wgsl's
// BITS, scale_at and bias_at are used.

// The chunk's codes as bytes in x_words' order.
fn code_bytes(w: array<u32, 8>) -> array<u32, 8> {
    var o: array<u32, 8>;
    if BITS == 4u {
        let k = 0x0F0F0F0Fu;
        o = array<u32, 8>(w[0] & k, (w[0] >> 4u) & k, w[1] & k, (w[1] >> 4u) & k,
                          w[2] & k, (w[2] >> 4u) & k, w[3] & k, (w[3] >> 4u) & k);
    } else {
        o = w;
    }
    return o;
}

// Σ code·h (signed h); 8-bit codes go in as q - 128 (signed bytes), undone with 128·Σh.
fn dot_signed(c: array<u32, 8>, xq: XChunk) -> i32 {
    var a = c;
    if BITS == 8u {
        let f = 0x80808080u;
        a = array<u32, 8>(c[0] ^ f, c[1] ^ f, c[2] ^ f, c[3] ^ f, c[4] ^ f, c[5] ^ f, c[6] ^ f,
                          c[7] ^ f);
    }
    let h = xq.h;
    var v = ((dot4I8Packed(a[0], h[0]) + dot4I8Packed(a[1], h[1]))
           + (dot4I8Packed(a[2], h[2]) + dot4I8Packed(a[3], h[3])))
          + ((dot4I8Packed(a[4], h[4]) + dot4I8Packed(a[5], h[5]))
           + (dot4I8Packed(a[6], h[6]) + dot4I8Packed(a[7], h[7])));
    if BITS == 8u {
        v += 128 * xq.hs;
    }
    return v;
}

// Σ code·l (both unsigned).
fn dot_unsigned(c: array<u32, 8>, l: array<u32, 8>) -> u32 {
    return ((dot4U8Packed(c[0], l[0]) + dot4U8Packed(c[1], l[1]))
          + (dot4U8Packed(c[2], l[2]) + dot4U8Packed(c[3], l[3])))
         + ((dot4U8Packed(c[4], l[4]) + dot4U8Packed(c[5], l[5]))
          + (dot4U8Packed(c[6], l[6]) + dot4U8Packed(c[7], l[7])));
}

// Σ t·q of a chunk's codes against a quantized x chunk (t the chunk's integer levels).
fn chunk_dot_xq(w: array<u32, 8>, xq: XChunk) -> i32 {
    let cb = code_bytes(w);
    var t = dot_signed(cb, xq);
    if XQ == 2u {
        // |256·Σh·q| < 2^31 for 8-bit codes (256·32·127·255), Σl·q < 2^21.
        t = 256 * t + i32(dot_unsigned(cb, xq.l));
    }
    return t;
}

// chunk_sum against a quantized x chunk: scale·d·Σ t·q + bias·Σx.
fn chunk_sum_xq(w: array<u32, 8>, xq: XChunk, g: u32) -> f32 {
    let t = chunk_dot_xq(w, xq);
#if DT_U8
    // Never dispatched: mxfp4 codes are not integers (QmvConfig::xq is 0 for them).
    return 0.0;
#else
    return scale_at(g) * (xq.d * f32(t)) + bias_at(g) * xq.s;
#endif
}

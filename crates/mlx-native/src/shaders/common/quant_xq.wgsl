// Quantized-x dot products for the matvec kernels (qmv, gqmv), 4- and 8-bit affine codes:
// x chunks (32 elements) as integers, the codes' bytes against them with packed 4-byte dot
// products (DP4A on NVIDIA). The includer defines `override XQ: u32` (1: one int8 level,
// 2: a 16-bit integer as two bytes; see ops::qmatmul) and common/quant.wgsl's BITS,
// scale_at and bias_at are used.

// An x chunk quantized for XQ. One level: x_i ≈ d·h_i, h int8 (|h| ≤ 127, d = amax/127).
// Two: x_i ≈ d·(256·h_i + l_i), t = 256·h + l = round(x·32512/amax) a 16-bit integer whose
// high byte h is signed and low byte l unsigned (d = amax/32512). h and l are packed four
// to a word in the order the codes' bytes come in (code_bytes); hs = Σh (8-bit codes'
// offset); s = Σx in f32 (the bias term).
struct XChunk {
    h: array<u32, 8>,
    l: array<u32, 8>,
    d: f32,
    s: f32,
    hs: i32,
}

// 1.5·2^23: fma(x, a, MAGIC) rounds x·a (|x·a| < 2^22) to an integer held in the
// mantissa's low bits as two's complement. Read only through bitcast, integer operations
// after it: a float expression like MAGIC - fma(x, a, MAGIC) may be folded to -x·a by a
// shader compiler (lavapipe does).
const MAGIC: f32 = 12582912.0;

// Words of x bytes in the order code_bytes gives the codes (4-bit: word 2j holds codes 8j,
// 8j+2, 8j+4, 8j+6 of the chunk, word 2j+1 the odd ones; 8-bit: word j codes 4j..4j+3),
// from the low byte of each of the chunk's 32 values in b.
fn x_words(b: array<vec4<u32>, 8>) -> array<u32, 8> {
    var o: array<u32, 8>;
    if BITS == 4u {
        o = array<u32, 8>(
            pack_even(b[0], b[1]), pack_odd(b[0], b[1]), pack_even(b[2], b[3]), pack_odd(b[2], b[3]),
            pack_even(b[4], b[5]), pack_odd(b[4], b[5]), pack_even(b[6], b[7]), pack_odd(b[6], b[7]));
    } else {
        o = array<u32, 8>(pack_bytes(b[0]), pack_bytes(b[1]), pack_bytes(b[2]), pack_bytes(b[3]),
                          pack_bytes(b[4]), pack_bytes(b[5]), pack_bytes(b[6]), pack_bytes(b[7]));
    }
    return o;
}

fn pack_bytes(b: vec4<u32>) -> u32 {
    return pack4xU8(b & vec4<u32>(0xFFu));
}
fn pack_even(a: vec4<u32>, b: vec4<u32>) -> u32 {
    return pack_bytes(vec4<u32>(a.x, a.z, b.x, b.z));
}
fn pack_odd(a: vec4<u32>, b: vec4<u32>) -> u32 {
    return pack_bytes(vec4<u32>(a.y, a.w, b.y, b.w));
}

fn shr8(b: array<vec4<u32>, 8>) -> array<vec4<u32>, 8> {
    let e = vec4<u32>(8u);
    return array<vec4<u32>, 8>(b[0] >> e, b[1] >> e, b[2] >> e, b[3] >> e, b[4] >> e,
                               b[5] >> e, b[6] >> e, b[7] >> e);
}

fn quantize_x(x: array<vec4<f32>, 8>) -> XChunk {
    let a = max(max(max(abs(x[0]), abs(x[1])), max(abs(x[2]), abs(x[3]))),
                max(max(abs(x[4]), abs(x[5])), max(abs(x[6]), abs(x[7]))));
    let amax = max(max(a.x, a.y), max(a.z, a.w));
    let top = select(127.0, 32512.0, XQ == 2u);
    let inv = vec4<f32>(select(top / amax, 0.0, amax == 0.0));
    let m = vec4<f32>(MAGIC);
    // Written out: constant indices keep b in registers.
    let b = array<vec4<u32>, 8>(
        bitcast<vec4<u32>>(fma(x[0], inv, m)), bitcast<vec4<u32>>(fma(x[1], inv, m)),
        bitcast<vec4<u32>>(fma(x[2], inv, m)), bitcast<vec4<u32>>(fma(x[3], inv, m)),
        bitcast<vec4<u32>>(fma(x[4], inv, m)), bitcast<vec4<u32>>(fma(x[5], inv, m)),
        bitcast<vec4<u32>>(fma(x[6], inv, m)), bitcast<vec4<u32>>(fma(x[7], inv, m)));
    var o: XChunk;
    if XQ == 2u {
        o.h = x_words(shr8(b));
        o.l = x_words(b);
    } else {
        o.h = x_words(b);
    }
    o.d = amax / top;
    let xs4 = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
    o.s = (xs4.x + xs4.y) + (xs4.z + xs4.w);
    if BITS == 8u {
        let one = 0x01010101u;
        let h = o.h;
        o.hs = ((dot4I8Packed(h[0], one) + dot4I8Packed(h[1], one))
              + (dot4I8Packed(h[2], one) + dot4I8Packed(h[3], one)))
             + ((dot4I8Packed(h[4], one) + dot4I8Packed(h[5], one))
              + (dot4I8Packed(h[6], one) + dot4I8Packed(h[7], one)));
    }
    return o;
}

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

// chunk_sum against a quantized x chunk: scale·d·Σ t·q + bias·Σx.
fn chunk_sum_xq(w: array<u32, 8>, xq: XChunk, g: u32) -> f32 {
    let cb = code_bytes(w);
    var t = dot_signed(cb, xq);
    if XQ == 2u {
        // |256·Σh·q| < 2^31 for 8-bit codes (256·32·127·255), Σl·q < 2^21.
        t = 256 * t + i32(dot_unsigned(cb, xq.l));
    }
#if DT_U8
    // Never dispatched: mxfp4 codes are not integers (QmvConfig::xq is 0 for them).
    return 0.0;
#else
    return scale_at(g) * (xq.d * f32(t)) + bias_at(g) * xq.s;
#endif
}

// x quantized per 32-element chunk for the integer-dot matvecs (common/quant_xq.wgsl has
// the dot side): the includer defines `override BITS: u32` (the consumer's code width, 4 or
// 8: it fixes the byte order) and `override XQ: u32` (1: one int8 level, 2: a 16-bit
// integer as two bytes; see ops::qmatmul). Producers that quantize x once for every
// row-set of a matvec (rms_norm, glu, qmatmul's quantize_x) store a chunk as XQ_VEC4S
// vec4<u32>: h, l, then (d, s, hs, 0) as bits.

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


const XQ_VEC4S: u32 = 5u;

// The chunk's XQ_VEC4S words, in store order.
fn xchunk_words(q: XChunk) -> array<vec4<u32>, 5> {
    return array<vec4<u32>, 5>(vec4<u32>(q.h[0], q.h[1], q.h[2], q.h[3]),
                               vec4<u32>(q.h[4], q.h[5], q.h[6], q.h[7]),
                               vec4<u32>(q.l[0], q.l[1], q.l[2], q.l[3]),
                               vec4<u32>(q.l[4], q.l[5], q.l[6], q.l[7]),
                               vec4<u32>(bitcast<u32>(q.d), bitcast<u32>(q.s),
                                         bitcast<u32>(q.hs), 0u));
}

// The chunk stored as xchunk_words gives it.
fn xchunk_from(a: vec4<u32>, b: vec4<u32>, c: vec4<u32>, d: vec4<u32>, e: vec4<u32>) -> XChunk {
    return XChunk(array<u32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w),
                  array<u32, 8>(c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w),
                  bitcast<f32>(e.x), bitcast<f32>(e.y), bitcast<i32>(e.z));
}

// Cooperative quantization for the producers: four invocations share a chunk, part t holding
// its values 8t..8t+7 (a, b), and each writes its own words. A chunk quantized by one
// invocation (quantize_x) is a long serial chain: a norm of 4096 values is 128 of those,
// which took ~15 us on an H200 against ~8 for the f32 norm. The chunk comes out bit for bit
// as quantize_x makes it (same amax, same fma, the same order of the Σx sums up to
// commutation, integer Σh). `slot`: the invocation's index in the workgroup in the order
// parts are assigned (chunk slot / 4, part slot % 4). With SUBGROUPS the four are adjacent
// lanes of one subgroup (slot = subgroup index * size + lane; subgroups of at least 4) and
// exchange through shuffles; without, through workgroup memory, and every invocation of
// the workgroup must call this (it has barriers). Invocations without a part pass zeros and
// ignore the result.
var<workgroup> xq_sum: array<vec4<f32>, WG>;
var<workgroup> xq_aux: array<u32, WG>;

// Part t's words: h (chunk words 2t, 2t + 1), l (8 + 2t, 9 + 2t); tail (d, s, hs, 0) as
// bits, the chunk's words 16..19, valid in every part.
struct XqPart {
    h: vec2<u32>,
    l: vec2<u32>,
    tail: vec4<u32>,
}

// Where part t's four words go in its chunk (h, then l), and their values: every part
// writes these; part 0 also writes the tail (words 16..19).
fn part_offsets(t: u32) -> vec4<u32> {
    return vec4<u32>(2u * t, 2u * t + 1u, 8u + 2u * t, 9u + 2u * t);
}
fn part_values(q: XqPart) -> vec4<u32> {
    return vec4<u32>(q.h.x, q.h.y, q.l.x, q.l.y);
}

// The two words of eight values' low bytes (p: values 0..3, q: 4..7) in code order.
fn part_words(p: vec4<u32>, q: vec4<u32>) -> vec2<u32> {
    if BITS == 4u {
        return vec2<u32>(pack_even(p, q), pack_odd(p, q));
    }
    return vec2<u32>(pack_bytes(p), pack_bytes(q));
}

// The part's words once its chunk's amax is known (d, s, hs filled by the caller).
fn part_codes(a: vec4<f32>, b: vec4<f32>, amax: f32) -> XqPart {
    let top = select(127.0, 32512.0, XQ == 2u);
    let inv = vec4<f32>(select(top / amax, 0.0, amax == 0.0));
    let m = vec4<f32>(MAGIC);
    let ba = bitcast<vec4<u32>>(fma(a, inv, m));
    let bb = bitcast<vec4<u32>>(fma(b, inv, m));
    var o: XqPart;
    if XQ == 2u {
        let e = vec4<u32>(8u);
        o.h = part_words(ba >> e, bb >> e);
        o.l = part_words(ba, bb);
    } else {
        o.h = part_words(ba, bb);
    }
    return o;
}

fn part_hs(h: vec2<u32>) -> i32 {
    let one = 0x01010101u;
    return dot4I8Packed(h.x, one) + dot4I8Packed(h.y, one);
}

fn part_tail(amax: f32, xs4: vec4<f32>, hs: i32) -> vec4<u32> {
    let top = select(127.0, 32512.0, XQ == 2u);
    let s = (xs4.x + xs4.y) + (xs4.z + xs4.w);
    return vec4<u32>(bitcast<u32>(amax / top), bitcast<u32>(s), bitcast<u32>(hs), 0u);
}

#if SUBGROUPS
fn quantize_part(a: vec4<f32>, b: vec4<f32>, slot: u32) -> XqPart {
    let m4 = max(abs(a), abs(b));
    var amax = max(max(m4.x, m4.y), max(m4.z, m4.w));
    amax = max(amax, subgroupShuffleXor(amax, 1u));
    amax = max(amax, subgroupShuffleXor(amax, 2u));
    // Lane 0 gets (P0 + P1) + (P2 + P3), the others the same sums commuted (equal bits).
    var xs4 = a + b;
    xs4 += subgroupShuffleXor(xs4, 1u);
    xs4 += subgroupShuffleXor(xs4, 2u);
    var o = part_codes(a, b, amax);
    var hs = 0;
    if BITS == 8u {
        hs = part_hs(o.h);
        hs += subgroupShuffleXor(hs, 1u);
        hs += subgroupShuffleXor(hs, 2u);
    }
    o.tail = part_tail(amax, xs4, hs);
    return o;
}
#else
fn quantize_part(a: vec4<f32>, b: vec4<f32>, slot: u32) -> XqPart {
    xq_sum[slot] = a + b;
    let m4 = max(abs(a), abs(b));
    xq_aux[slot] = bitcast<u32>(max(max(m4.x, m4.y), max(m4.z, m4.w)));
    workgroupBarrier();
    let c0 = slot & ~3u;
    let amax = max(max(bitcast<f32>(xq_aux[c0]), bitcast<f32>(xq_aux[c0 + 1u])),
                   max(bitcast<f32>(xq_aux[c0 + 2u]), bitcast<f32>(xq_aux[c0 + 3u])));
    let xs4 = (xq_sum[c0] + xq_sum[c0 + 1u]) + (xq_sum[c0 + 2u] + xq_sum[c0 + 3u]);
    var o = part_codes(a, b, amax);
    var hs = 0;
    if BITS == 8u {
        workgroupBarrier();
        xq_aux[slot] = bitcast<u32>(part_hs(o.h));
        workgroupBarrier();
        hs = (bitcast<i32>(xq_aux[c0]) + bitcast<i32>(xq_aux[c0 + 1u]))
           + (bitcast<i32>(xq_aux[c0 + 2u]) + bitcast<i32>(xq_aux[c0 + 3u]));
    }
    o.tail = part_tail(amax, xs4, hs);
    // The next call's first stores must not overtake this call's reads.
    workgroupBarrier();
    return o;
}
#endif

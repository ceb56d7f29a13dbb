// MLX quantized matmul y[M, N] = x[M, K] · Wᵀ, W [N, K] quantized along K (common/quant.wgsl
// has the layout and decoding). A "chunk" is 32 consecutive codes of a row = BITS u32 words:
// always word-aligned (K is a multiple of the group size, itself a multiple of 32) and inside
// one group, so a chunk has one scale (and bias).
// Entries:
//   qmv      M <= 8: row-sets of TPR invocations, each owning RPT weight rows; the set's
//            invocations stride over the chunks, WG / TPR row-sets per workgroup. Optional
//            fusions (FUSE) around it: an RMS norm or a GLU on x, a residual added to y.
//   qmm      tiled: 64 x 64 outputs per workgroup of 256, K in steps of one chunk, x and
//            dequantized W tiles in workgroup memory (16 KiB).
//   dequant  y[i, :] = W[ids[i], :] (use_ids) or W[i, :]: one invocation per chunk.
//   copy_x   y = xraw: realigns an x view whose offset is not a multiple of 4.
// Bindings: 0 x (f32 seen as vec4: its offset is a multiple of 4), 1 packed words, 2 scales,
// 3 biases (affine), 4 y (f32 as bits; qmv with XQO: then the next norm's chunks), 5 packed words again as vec4 (qmv, BITS 4 and 8),
// 6 aux, u32 words: ids (dequant), the f32 bits of the unaligned x (copy_x) or of the
// residual (qmv with RESIDUAL), 7 the norm weight (f32 as vec4; qmv with NORM). Eight
// storage bindings at most: wgpu's default limit per shader stage.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    // u32 words per packed row.
    wpr: u32,
    // Groups (scales) per row.
    gpr: u32,
    // Rows of the output (dequant).
    rows: u32,
    // dequant: 1 to read row numbers from ids.
    use_ids: u32,
    // qmv with NORM: the RMS norm's epsilon.
    eps: f32,
    // qmv with XQO: the chunks' first word, counted from y's.
    xo: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// qmv: weight rows per row-set RPT (1, 2, 4, 8 or 16) and invocations per row-set TPR (a
// power of two, 8 <= TPR <= WG; below 32 a row-set is a segment of a subgroup, see
// row_set_sum), packed with the switches below as
// QMV = XQO << 28 | XSRC << 27 | XQ << 25 | ACT << 23 | FUSE << 20 | QX << 16 | TPR << 5 | RPT
// (a spec has three constants); a workgroup holds WG / TPR row-sets.
override QMV: u32 = 4104u;
override RPT: u32 = QMV & 31u;
override TPR: u32 = (QMV >> 5u) & 2047u;
// Measurement switches (0 in production; `QmvConfig::exp`): bit 0 skip code decoding (the
// weight words' bits as floats; with XQ no dot products), bit 1 no x loads, bit 2 no
// scale/bias loads (with XQ too), bit 3 4-bit codes decoded as 1 + q/16 straight from
// their bits (see chunk_sum).
override QX: u32 = (QMV >> 16u) & 15u;
// Fusions (`QmvFusion`), each saving a dispatch and its barrier on the decode path:
//   bit 0 NORM      x -> x * rsqrt(mean(x^2) + eps) * w (binding 7): every row-set sees
//                   all of x anyway, so Σx² is summed beside the dot products and the
//                   1/rms applied to the row sums at the end (the norm is linear in x/rms).
//   bit 1 GLU       binding 0 holds rows [gate | up] of 2K; x = act(gate) * up (ACT).
//   bit 2 RESIDUAL  y = x · Wᵀ + r (binding 6, shaped like y).
override FUSE: u32 = (QMV >> 20u) & 7u;
override ACT: u32 = (QMV >> 23u) & 3u;
// x quantized per chunk to integers for 4-bit dot products (4- and 8-bit affine codes only;
// `QmvConfig::xq`): 0 off (f32 x, codes decoded to floats), 1 one int8 level, 2 a 16-bit
// integer as two bytes (XChunk). Why: decoding a code to a float costs ~4 instructions,
// which bounded qmv on NVIDIA; with byte x a word of eight 4-bit codes is 3 integer
// operations and 2 (or 4) packed 4-byte dot products (DP4A), the x quantization shared by
// the RPT rows. One level adds up to amax/254 of error per x element (llama.cpp's q8_1
// activations); two levels amax/65024 (about f16's relative precision at amax).
override XQ: u32 = (QMV >> 25u) & 3u;
// Binding 0 holds x already quantized (XQ_VEC4S vec4s a chunk, by a producer such as
// rms_norm or glu: ops::qmatmul::QuantizedX) instead of f32 x: every row-set of the matvec
// would otherwise load and quantize each chunk again (on an H200, session 7: 10 % of a
// Llama-3.1-8B decode step as a bound, 4 % after the producers' own cost). Not with the
// NORM or GLU folds.
override XSRC: u32 = (QMV >> 27u) & 1u;
// The RMS norm after this matvec, split across the boundary (`ops::qmatmul::NormOut`): y
// (plus the residual) is written as it is and also as chunks of y·g (g the norm's weight,
// binding 7), each with Σy² over its 32 values in its last word, for the matvec after the
// norm. That one (XSRC with NORM) sums those words over its row, as the folded norm sums
// Σx², and scales its row sums by 1/rms: the norm's dispatch, and the barrier before it, go.
// A chunk is 32 rows of this matvec, so a workgroup holds whole chunks (32 | WG / TPR * RPT).
// XQO 2: the GLU after a stacked gate|up matvec (rows [gate | up], N = 2I), applied to the
// matvec's own rows: a workgroup takes gate rows 32w.. and up rows I + 32w.. (64 rows), and
// writes one chunk of act(gate)·up (ACT) for the down matvec, and no y. The GLU's dispatch,
// and its barrier, go.
override XQO: u32 = (QMV >> 28u) & 3u;


// x as words: f32 values (xf), or x chunks quantized by a producer (XSRC; common/
// xq_quantize.wgsl), read with no float load in between.
@group(0) @binding(0) var<storage, read> xv: array<vec4<u32>>;
fn xf(i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(xv[i]);
}
@group(0) @binding(4) var<storage, read_write> y: array<u32>;
@group(0) @binding(5) var<storage, read> packed4: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> aux: array<u32>;
@group(0) @binding(7) var<storage, read> normw: array<vec4<f32>>;
@group(1) @binding(0) var<uniform> p: Params;

fn weight_at(row: u32, j: u32) -> f32 {
    return dequant_at(row, j, p.wpr, p.gpr);
}

// ---------------------------------------------------------------------------------------
// qmv

// Partial sums of one x row: [row-set * RPT + r][slot], slot < TPR (fewer with subgroups).
// WG * RPT <= 2048. (Sizing it to what subgroups use, 1/8 to 1/32 of it, made Llama-3.1-8B
// decode 22 % slower on an H200, and 12-24 KiB slower too: docs/PERFORMANCE.md, session 7.)
var<workgroup> red: array<f32, 2048>;
// NORM: partial Σx² of the x row, [row-set][slot].
var<workgroup> red_ss: array<f32, 256>;
// XQO: the workgroup's rows of y are `yrows` (common/glu_chunk.wgsl).

// The BITS words of chunk c of packed row `row` (4- and 8-bit: vec4 loads).
fn chunk_words(row: u32, c: u32) -> array<u32, 8> {
    var w: array<u32, 8>;
    let base = row * p.wpr + c * BITS;
    if BITS == 4u {
        let v = packed4[base / 4u];
        w = array<u32, 8>(v.x, v.y, v.z, v.w, 0u, 0u, 0u, 0u);
    } else if BITS == 8u {
        let v0 = packed4[base / 4u];
        let v1 = packed4[base / 4u + 1u];
        w = array<u32, 8>(v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w);
    } else {
        let o = view(1u) + base;
        w = array<u32, 8>(packed[o], packed[o + 1u], packed[o + min(2u, BITS - 1u)],
                          packed[o + min(3u, BITS - 1u)], packed[o + min(4u, BITS - 1u)],
                          packed[o + min(5u, BITS - 1u)], packed[o + min(6u, BITS - 1u)],
                          packed[o + min(7u, BITS - 1u)]);
    }
    return w;
}

// Σ x·(1 + q/16) over a 4-bit chunk: each code's 4 bits shifted into the top of an f32
// mantissa under exponent 0 (3 operations per code, no conversion or subtraction).
fn chunk_dot_lean(w: array<u32, 8>, x: array<vec4<f32>, 8>) -> f32 {
    // Written out: a loop would index w and x dynamically, which puts them in local memory.
    return (word_dot_lean(w[0], x[0], x[1]) + word_dot_lean(w[1], x[2], x[3]))
         + (word_dot_lean(w[2], x[4], x[5]) + word_dot_lean(w[3], x[6], x[7]));
}

fn word_dot_lean(w: u32, xlo: vec4<f32>, xhi: vec4<f32>) -> f32 {
    let sh = vec4<u32>(19u, 15u, 11u, 7u);
    let m = vec4<u32>(0x00780000u);
    let one = vec4<u32>(0x3F800000u);
    let lo = bitcast<vec4<f32>>(((vec4<u32>(w) << sh) & m) | one);
    let hi = bitcast<vec4<f32>>(((vec4<u32>(w >> 16u) << sh) & m) | one);
    return dot(xlo, lo) + dot(xhi, hi);
}

fn chunk_dot_raw(w: array<u32, 8>, x: array<vec4<f32>, 8>) -> f32 {
    let f = bitcast<vec4<f32>>((vec4<u32>(w[0], w[1], w[2], w[3]) & vec4<u32>(0x007FFFFFu))
                               | vec4<u32>(0x3F800000u));
    return dot(x[0], f);
}

// One chunk's contribution: scale·Σx·q + bias·Σx (affine) or scale·Σx·fp4 (mxfp4).
fn chunk_sum(w: array<u32, 8>, x: array<vec4<f32>, 8>, g: u32) -> f32 {
    var sc = 1.0;
    var bi = 0.5;
    if (QX & 4u) == 0u {
        sc = scale_at(g);
        bi = bias_at(g);
    }
    if (QX & 1u) != 0u {
        return sc * chunk_dot_raw(w, x) + bi;
    }
#if !DT_U8
    if BITS == 4u && (QX & 8u) != 0u {
        let xs4 = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
        let xs = (xs4.x + xs4.y) + (xs4.z + xs4.w);
        // Σx·q = 16·(Σx·(1 + q/16) - Σx).
        return 16.0 * sc * chunk_dot_lean(w, x) + (bi - 16.0 * sc) * xs;
    }
#endif
    let d = chunk_dot(w, x);
#if DT_U8
    return sc * d;
#else
    let xs4 = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
    return sc * d + bi * ((xs4.x + xs4.y) + (xs4.z + xs4.w));
#endif
}

fn x_chunk(o: u32) -> array<vec4<f32>, 8> {
    if (QX & 2u) != 0u {
        let c = vec4<f32>(f32(o & 7u) * 0.125);
        return array<vec4<f32>, 8>(c, c, c, c, c, c, c, c);
    }
    return array<vec4<f32>, 8>(xf(o), xf(o + 1u), xf(o + 2u), xf(o + 3u), xf(o + 4u),
                               xf(o + 5u), xf(o + 6u), xf(o + 7u));
}

// Chunk c of x row m (x rows start at vec4 `xbase`), with the GLU prologue applied.
fn x_row_chunk(xbase: u32, m: u32, c: u32) -> array<vec4<f32>, 8> {
    if (FUSE & 2u) != 0u {
        // Rows of 2K: the gate chunk, and the up chunk K/4 vec4 further on.
        let o = xbase + m * (p.k / 2u) + c * 8u;
        let h = p.k / 4u;
        return array<vec4<f32>, 8>(glu4(xf(o), xf(o + h)), glu4(xf(o + 1u), xf(o + h + 1u)),
                                   glu4(xf(o + 2u), xf(o + h + 2u)),
                                   glu4(xf(o + 3u), xf(o + h + 3u)),
                                   glu4(xf(o + 4u), xf(o + h + 4u)),
                                   glu4(xf(o + 5u), xf(o + h + 5u)),
                                   glu4(xf(o + 6u), xf(o + h + 6u)),
                                   glu4(xf(o + 7u), xf(o + h + 7u)));
    }
    return x_chunk(xbase + m * (p.k / 4u) + c * 8u);
}

fn sum_squares(x: array<vec4<f32>, 8>) -> f32 {
    let a = (x[0] * x[0] + x[1] * x[1]) + (x[2] * x[2] + x[3] * x[3]);
    let b = (x[4] * x[4] + x[5] * x[5]) + (x[6] * x[6] + x[7] * x[7]);
    let s = a + b;
    return (s.x + s.y) + (s.z + s.w);
}

// x chunk c times the norm weight's chunk c.
fn norm_weighted(x: array<vec4<f32>, 8>, c: u32) -> array<vec4<f32>, 8> {
    let o = view(7u) / 4u + c * 8u;
    return array<vec4<f32>, 8>(x[0] * normw[o], x[1] * normw[o + 1u], x[2] * normw[o + 2u],
                               x[3] * normw[o + 3u], x[4] * normw[o + 4u],
                               x[5] * normw[o + 5u], x[6] * normw[o + 6u],
                               x[7] * normw[o + 7u]);
}

// XSRC: the quantized chunk whose first vec4 is xv[o].
fn load_xchunk(o: u32) -> XChunk {
    return xchunk_from(xv[o], xv[o + 1u], xv[o + 2u], xv[o + 3u], xv[o + 4u]);
}

// One row's contribution of chunk c (group column gc) against the x chunk (xq when XQ).
fn row_chunk(row: u32, c: u32, gc: u32, x: array<vec4<f32>, 8>, xq: XChunk) -> f32 {
    if XQ != 0u {
        let w = chunk_words(row, c);
        if (QX & 1u) != 0u {
            // Measurement: no dot products (the words still feed the result).
            let f = (w[0] ^ w[1] ^ w[2] ^ w[3]) ^ (w[4] ^ w[5] ^ w[6] ^ w[7]);
            return bitcast<f32>(f & 0x3F7FFFFFu) * xq.d;
        }
        if (QX & 4u) != 0u {
            // Measurement: no scale or bias loads.
            return xq.d * f32(chunk_dot_xq(w, xq)) + xq.s;
        }
        return chunk_sum_xq(w, xq, row * p.gpr + gc);
    }
    return chunk_sum(chunk_words(row, c), x, row * p.gpr + gc);
}

// Global row of the workgroup's row j (of WG / TPR * RPT): consecutive, or with XQO 2 the
// first half gate rows and the second the same up rows.
fn wg_row(wg: u32, j: u32) -> u32 {
    let rows = (WG / TPR) * RPT;
    if XQO == 2u {
        let half = rows / 2u;
        return select(p.n / 2u + wg * half + j - half, wg * half + j, j < half);
    }
    return wg * rows + j;
}

// XQO 2: the workgroup's chunk of act(gate)·up for x row m (common/glu_chunk.wgsl).
fn store_glu_chunk(wg: u32, m: u32, slot: u32) {
    store_glu_chunk_at(view(4u) + p.xo + (m * (p.n / 64u) + wg) * 4u * XQ_VEC4S, slot, true);
}

// XQO: the norm weights of this invocation's part of the workgroup's chunks (`slot` in
// quantize_part's order: chunk slot / 4, part slot % 4), loaded before the matvec so the
// epilogue does not wait on them. Zeros for invocations without a part.
fn norm_part_weights(row0: u32, slot: u32) -> array<vec4<f32>, 2> {
    var w = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    if slot / 4u < (WG / TPR) * RPT / 32u {
        let g = view(7u) / 4u + (row0 + 8u * slot) / 4u;
        w = array<vec4<f32>, 2>(normw[g], normw[g + 1u]);
    }
    return w;
}

// XQO: the workgroup's chunks of y·g (g: norm_part_weights), rows row0.. of x row m, from
// yrows: quantize_part's four invocations a chunk, each also summing its 8 values' squares,
// combined into the chunk's Σy² (the tail's last word). Called by the whole workgroup.
fn store_norm_chunks(row0: u32, m: u32, slot: u32, g: array<vec4<f32>, 2>) {
    let c = slot / 4u;
    let t = slot % 4u;
    let on = c < (WG / TPR) * RPT / 32u;
    var ya = vec4<f32>(0.0);
    var yb = vec4<f32>(0.0);
    let e = 8u * slot;
    if on {
        ya = vec4<f32>(yrows[e], yrows[e + 1u], yrows[e + 2u], yrows[e + 3u]);
        yb = vec4<f32>(yrows[e + 4u], yrows[e + 5u], yrows[e + 6u], yrows[e + 7u]);
    }
    let q = quantize_part(ya * g[0], yb * g[1], slot);
#if SUBGROUPS
    var sq = dot(ya, ya) + dot(yb, yb);
    sq += subgroupShuffleXor(sq, 1u);
    sq += subgroupShuffleXor(sq, 2u);
#else
    var sq = 0.0;
    if on && t == 0u {
        for (var j = 0u; j < 32u; j++) {
            let v = yrows[e + j];
            sq += v * v;
        }
    }
#endif
    if on {
        let o = view(4u) + p.xo + (m * (p.n / 32u) + row0 / 32u + c) * 4u * XQ_VEC4S;
        store_chunk_part(o, t, q, bitcast<u32>(sq));
    }
}

#if SUBGROUPS
// A partial sum over the subgroup, or with TPR < 32 over the row-set's TPR lanes (the host
// uses subgroups there only when they are at least TPR wide, so a row-set is an aligned
// segment of one subgroup): every lane of the segment gets it.
fn row_set_sum(v: f32) -> f32 {
    if TPR < 32u {
        var s = v;
        for (var o = 1u; o < TPR; o <<= 1u) {
            s += subgroupShuffleXor(s, o);
        }
        return s;
    }
    return subgroupAdd(v);
}
#endif

@compute @workgroup_size(WG)
fn qmv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
       , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_size) ss: u32,
       @builtin(subgroup_id) si: u32
#endif
) {
    let sets = WG / TPR;
    let rs = lid / TPR;
    let lane = lid % TPR;
    let wg = flat_wg(wid, nwg);
    let row0 = wg_row(wg, rs * RPT);
    let chunks = p.k / 32u;
    let xbase = view(0u) / 4u;
#if SUBGROUPS
    // Row-sets narrower than the subgroup (TPR 8 or 16) take one slot.
    let slots = max(TPR / ss, 1u);
    let slot = lane / ss;
    // XQO: the invocation's place in quantize_part's order (a chunk's parts adjacent lanes).
    let part_slot = si * ss + sl;
#else
    let slots = TPR;
    let slot = lane;
    let part_slot = lid;
#endif
    // Rows past N repeat the last row (their sums are dropped).
    let last = p.n - 1u;
    let r0 = min(row0, last);
    let r1 = min(row0 + 1u, last);
    let r2 = min(row0 + 2u, last);
    let r3 = min(row0 + 3u, last);
    let r4 = min(row0 + 4u, last);
    let r5 = min(row0 + 5u, last);
    let r6 = min(row0 + 6u, last);
    let r7 = min(row0 + 7u, last);
    let r8 = min(row0 + 8u, last);
    let r9 = min(row0 + 9u, last);
    let r10 = min(row0 + 10u, last);
    let r11 = min(row0 + 11u, last);
    let r12 = min(row0 + 12u, last);
    let r13 = min(row0 + 13u, last);
    let r14 = min(row0 + 14u, last);
    let r15 = min(row0 + 15u, last);
    var gpart = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    if XQO == 1u {
        gpart = norm_part_weights(wg * sets * RPT, part_slot);
    }
    for (var m = 0u; m < p.m; m++) {
        // One scalar accumulator per weight row, written out (no indexed private arrays);
        // each x chunk is loaded once for the RPT rows, whose RPT weight loads are
        // independent (in flight together).
        var s = vec4<f32>(0.0);
        var t = vec4<f32>(0.0);
        var u = vec4<f32>(0.0);
        var v = vec4<f32>(0.0);
        // NORM: this invocation's share of Σx².
        var ss = 0.0;
        for (var c = lane; c < chunks; c += TPR) {
            var x: array<vec4<f32>, 8>;
            if XSRC == 0u {
                x = x_row_chunk(xbase, m, c);
            }
            if (FUSE & 1u) != 0u && XSRC == 0u {
                ss += sum_squares(x);
                x = norm_weighted(x, c);
            }
            let gc = (c * 32u) / GROUP_SIZE;
            var xq: XChunk;
            if XSRC != 0u {
                let o = view(0u) / 4u + (m * chunks + c) * XQ_VEC4S;
                xq = load_xchunk(o);
                if (FUSE & 1u) != 0u {
                    // The producer's Σx² of the chunk (XQO).
                    ss += bitcast<f32>(xv[o + 4u].w);
                }
            } else if XQ != 0u {
                xq = quantize_x(x);
            }
            s.x += row_chunk(r0, c, gc, x, xq);
            if RPT > 1u {
                s.y += row_chunk(r1, c, gc, x, xq);
            }
            if RPT > 2u {
                s.z += row_chunk(r2, c, gc, x, xq);
                s.w += row_chunk(r3, c, gc, x, xq);
            }
            if RPT > 4u {
                t.x += row_chunk(r4, c, gc, x, xq);
                t.y += row_chunk(r5, c, gc, x, xq);
                t.z += row_chunk(r6, c, gc, x, xq);
                t.w += row_chunk(r7, c, gc, x, xq);
            }
            if RPT > 8u {
                u.x += row_chunk(r8, c, gc, x, xq);
                u.y += row_chunk(r9, c, gc, x, xq);
                u.z += row_chunk(r10, c, gc, x, xq);
                u.w += row_chunk(r11, c, gc, x, xq);
                v.x += row_chunk(r12, c, gc, x, xq);
                v.y += row_chunk(r13, c, gc, x, xq);
                v.z += row_chunk(r14, c, gc, x, xq);
                v.w += row_chunk(r15, c, gc, x, xq);
            }
        }
        for (var r = 0u; r < RPT; r++) {
            let sum = select(select(v[r & 3u], u[r & 3u], r < 12u),
                             select(t[r & 3u], s[r & 3u], r < 4u), r < 8u);
#if SUBGROUPS
            let all = row_set_sum(sum);
            if select(sl == 0u, lane == 0u, TPR < 32u) {
                red[(rs * RPT + r) * slots + slot] = all;
            }
#else
            red[(rs * RPT + r) * slots + slot] = sum;
#endif
        }
        if (FUSE & 1u) != 0u {
#if SUBGROUPS
            let u = row_set_sum(ss);
            if select(sl == 0u, lane == 0u, TPR < 32u) {
                red_ss[rs * slots + slot] = u;
            }
#else
            red_ss[rs * slots + slot] = ss;
#endif
        }
        workgroupBarrier();
        // Invocation j < sets * RPT (<= WG: RPT <= TPR) sums row j of the workgroup.
        let frow = wg_row(wg, lid);
        if lid < sets * RPT && frow < p.n {
            var acc = 0.0;
            for (var i = 0u; i < slots; i++) {
                acc += red[lid * slots + i];
            }
            if (FUSE & 1u) != 0u {
                var sq = 0.0;
                let b = (lid / RPT) * slots;
                for (var i = 0u; i < slots; i++) {
                    sq += red_ss[b + i];
                }
                acc *= inverseSqrt(sq / f32(p.k) + p.eps);
            }
            if (FUSE & 4u) != 0u {
                acc += bitcast<f32>(aux[view(6u) + m * p.n + frow]);
            }
            if XQO != 2u {
                y[view(4u) + m * p.n + frow] = bitcast<u32>(acc);
            }
            if XQO != 0u {
                yrows[lid] = acc;
            }
        }
        if XQO == 1u {
            workgroupBarrier();
            store_norm_chunks(wg * sets * RPT, m, part_slot, gpart);
        } else if XQO == 2u {
            workgroupBarrier();
            store_glu_chunk(wg, m, part_slot);
        }
        workgroupBarrier();
    }
}

// ---------------------------------------------------------------------------------------
// qmm (tiled, scalar)

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 32u;
// x tile [BK][BM] and W tile [BK][BN], as vec4 along M and N.
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> ws: array<vec4<f32>, 512>;

// Element (k, i) of a [BK][64] tile stored as vec4 along the 64.
fn set_xs(k: u32, i: u32, v: f32) {
    xs[k * 16u + i / 4u][i % 4u] = v;
}
fn set_ws(k: u32, i: u32, v: f32) {
    ws[k * 16u + i / 4u][i % 4u] = v;
}

@compute @workgroup_size(256)
fn qmm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let nbm = (p.m + BM - 1u) / BM;
    let nbn = (p.n + BN - 1u) / BN;
    let t = flat_wg(wid, nwg);
    // M blocks vary fastest: neighbouring workgroups share the W tile through the cache.
    let bm = t % nbm;
    let bn = t / nbm;
    let valid = bn < nbn;
    let m0 = bm * BM;
    let n0 = bn * BN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    // Loader roles: row lr of the tile, 8 consecutive k at lk.
    let lr = lid / 4u;
    let lk = (lid % 4u) * 8u;
    let xrow = m0 + lr;
    let wrow = n0 + lr;
    let xbase = view(0u) / 4u;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        if valid && xrow < p.m {
            let o = xbase + (xrow * p.k + k0 + lk) / 4u;
            let a = xf(o);
            let b = xf(o + 1u);
            for (var i = 0u; i < 4u; i++) {
                set_xs(lk + i, lr, a[i]);
                set_xs(lk + 4u + i, lr, b[i]);
            }
        } else {
            for (var i = 0u; i < 8u; i++) {
                set_xs(lk + i, lr, 0.0);
            }
        }
        if valid && wrow < p.n {
            for (var i = 0u; i < 8u; i++) {
                set_ws(lk + i, lr, weight_at(wrow, k0 + lk + i));
            }
        } else {
            for (var i = 0u; i < 8u; i++) {
                set_ws(lk + i, lr, 0.0);
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < BK; k++) {
            let a = xs[k * 16u + ty];
            let b = ws[k * 16u + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
    if !valid {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        if m < p.m {
            for (var j = 0u; j < 4u; j++) {
                let n = n0 + tx * 4u + j;
                if n < p.n {
                    y[view(4u) + m * p.n + n] = bitcast<u32>(acc[i][j]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// dequant / gather

@compute @workgroup_size(WG)
fn dequant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let chunks = p.k / 32u;
    let idx = flat_wg(wid, nwg) * WG + lid;
    let i = idx / chunks;
    let c = idx % chunks;
    if i >= p.rows {
        return;
    }
    var row = i;
    if p.use_ids != 0u {
        row = aux[view(6u) + i];
    }
    let o = view(4u) + i * p.k + c * 32u;
    if row >= p.n {
        // An out-of-range id gives a row of NaN rather than another row's values.
        for (var j = 0u; j < 32u; j++) {
            y[o + j] = 0x7fc00000u;
        }
        return;
    }
    for (var j = 0u; j < 32u; j++) {
        y[o + j] = bitcast<u32>(weight_at(row, c * 32u + j));
    }
}

@compute @workgroup_size(WG)
fn copy_x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    if i < p.rows {
        y[view(4u) + i] = aux[view(6u) + i];
    }
}

// kv_quant_common: helpers shared by kv_quant.wgsl and sdpa_quant.wgsl (compressed KV
// caches; layouts in kv_quant.rs). The including file provides:
//   p      a uniform with inv_sqrt_d: f32, cb: array<vec4<f32>, 4> (main codebook, ascending),
//          cb2: vec4<f32> (the 2-bit codebook of tq2.5's low half), signs: array<vec4<u32>, 4>
//          (512 sign bits, bit i set: coordinate i is negated before the transform);
//   wd(is_v, i) -> u32   word i of the K (is_v false) or V cache binding, view included;
//   sw(i) -> u32         word i of the side binding (view included);
//   scr    a workgroup f32 array of at least rows * HEAD_DIM for fwht;
//   NT     the workgroup size.
override HEAD_DIM: u32 = 128u;
// 0 q8, 1 q4, 2 tq4, 3 tq3, 4 tq2.5, 5 tq2.
override MODE: u32 = 2u;
// The rotated (TurboQuant) modes.
override ROT: bool = MODE >= 2u;
// 32-element blocks (affine) or groups (rotated) per row.
override NB: u32 = HEAD_DIM / 32u;
override C4: u32 = HEAD_DIM / 4u;
// Positions 0..SINKS of every layer are kept exact (attention sinks; kv_quant.rs:
// SINK_POSITIONS), and so are the most recent positions (a ring of RECENT rows; kv_quant.rs:
// RECENT_POSITIONS), in the layer's side buffer, u32 words [kv_heads, side_words()]: per kv
// head, SIDE_ROWS f32 rows (row 0 the key channel mean mu_k, rows 1..=SINKS the sink K rows,
// then the sink V rows), then RECENT f16 K rows and RECENT f16 V rows (HEAD_DIM / 2 words
// each; position pos in ring row pos % RECENT). Exact rows are in the basis the decoder works
// in (rotated for tq*, the model's for q8/q4) and not centered. Which positions the ring
// holds exactly (`win_lo` below) is the Rust side's bookkeeping (kv_quant.rs: exact_from).
const SINKS: u32 = 4u;
const RECENT: u32 = 128u;
const SIDE_ROWS: u32 = 1u + 2u * SINKS;

// Words of one kv head's side block.
fn side_words() -> u32 {
    return SIDE_ROWS * HEAD_DIM + RECENT * HEAD_DIM;
}

// Word offset (before view) of f32 row r of kv head h's side block.
fn side_row(h: u32, r: u32) -> u32 {
    return h * side_words() + r * HEAD_DIM;
}

// Side row of sink position pos (< SINKS) of K or V.
fn sink_row(h: u32, pos: u32, is_v: bool) -> u32 {
    return side_row(h, 1u + pos + select(0u, SINKS, is_v));
}

// Word offset (before view) of the f16 ring row of recent position pos of K or V.
fn recent_row(h: u32, pos: u32, is_v: bool) -> u32 {
    return side_row(h, SIDE_ROWS) + (pos % RECENT + select(0u, RECENT, is_v)) * (HEAD_DIM / 2u);
}

// Elements 4c..4c+3 of the exact row of position pos of K or V: its sink row if pos < SINKS,
// else its recent ring row (the caller knows the ring holds pos).
fn exact4(h: u32, pos: u32, is_v: bool, c: u32) -> vec4<f32> {
    if pos < SINKS {
        let o = sink_row(h, pos, is_v) + 4u * c;
        return bitcast<vec4<f32>>(vec4<u32>(sw(o), sw(o + 1u), sw(o + 2u), sw(o + 3u)));
    }
    let o = recent_row(h, pos, is_v) + 2u * c;
    return vec4<f32>(unpack2x16float(sw(o)), unpack2x16float(sw(o + 1u)));
}

fn sgn(i: u32) -> f32 {
    let w = p.signs[i >> 7u][(i >> 5u) & 3u];
    return select(1.0, -1.0, ((w >> (i & 31u)) & 1u) != 0u);
}

// Level k of the main codebook, or of the 2-bit one.
fn lvl(k: u32, two: bool) -> f32 {
    if two {
        return p.cb2[k & 3u];
    }
    return p.cb[(k >> 2u) & 3u][k & 3u];
}

// Index bits of the main codebook.
fn tq_bits() -> u32 {
    if MODE == 2u {
        return 4u;
    }
    if MODE == 5u {
        return 2u;
    }
    return 3u;
}

// Group gi of a rotated row: (bit planes, first plane's word in the row, 1 if 2-bit book).
fn grp(gi: u32) -> vec3<u32> {
    if MODE == 4u {
        let half = HEAD_DIM / 64u;
        if gi < half {
            return vec3<u32>(3u, 1u + gi * 3u, 0u);
        }
        return vec3<u32>(2u, 1u + half * 3u + (gi - half) * 2u, 1u);
    }
    let b = tq_bits();
    return vec3<u32>(b, 1u + gi * b, 0u);
}

// Elements 4c..4c+3 of the row starting at word rb, dequantized (rotated modes: in the
// rotated basis, y = level * norm / sqrt(d)).
fn deq4(is_v: bool, rb: u32, c: u32) -> vec4<f32> {
    if MODE == 0u {
        let b = c / 8u;
        let s = unpack2x16float(wd(is_v, rb + b / 2u))[b & 1u];
        let w = wd(is_v, rb + HEAD_DIM / 64u + c);
        let q = vec4<i32>(bitcast<i32>(w << 24u), bitcast<i32>(w << 16u),
                          bitcast<i32>(w << 8u), bitcast<i32>(w)) >> vec4<u32>(24u);
        return s * vec4<f32>(q);
    }
    if MODE == 1u {
        let dm = unpack2x16float(wd(is_v, rb + c / 8u));
        let w = wd(is_v, rb + NB + c / 2u) >> (16u * (c & 1u));
        let q = (vec4<u32>(w) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u);
        return dm.x * vec4<f32>(q) + dm.y;
    }
    let s = bitcast<f32>(wd(is_v, rb)) * p.inv_sqrt_d;
    let g = grp(c / 8u);
    let o = (c % 8u) * 4u;
    var k = vec4<u32>(0u);
    for (var b = 0u; b < g.x; b++) {
        let w = wd(is_v, rb + g.y + b) >> o;
        k |= ((vec4<u32>(w) >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) << vec4<u32>(b);
    }
    let two = g.z != 0u;
    return s * vec4<f32>(lvl(k.x, two), lvl(k.y, two), lvl(k.z, two), lvl(k.w, two));
}

// In-place unnormalized fast Walsh-Hadamard transform of `rows` consecutive rows of
// HEAD_DIM in scr. Call from uniform control flow after a barrier; ends with a barrier.
fn fwht(rows: u32, lid: u32) {
    let half = HEAD_DIM / 2u;
    for (var h = 1u; h < HEAD_DIM; h <<= 1u) {
        for (var i = lid; i < rows * half; i += NT) {
            let r = i / half;
            let k = i % half;
            let a = r * HEAD_DIM + (k / h) * 2u * h + k % h;
            let x = scr[a];
            let y = scr[a + h];
            scr[a] = x + y;
            scr[a + h] = x - y;
        }
        workgroupBarrier();
    }
}

// The epilogue shared by the matvecs that write their output as quantized chunks
// (qmatmul.wgsl's XQO, moe_quant.wgsl's gqmv_glu). The including shader declares
// `y: array<u32>` at binding 4 (the chunks' words) and the `act` of common/act.wgsl.

// The workgroup's output rows (at most 64: two chunks, or 32 gate and 32 up rows).
var<workgroup> yrows: array<f32, 64>;

fn glu4(g: vec4<f32>, u: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act(g.x), act(g.y), act(g.z), act(g.w)) * u;
}

// Part t (4 words) of a chunk whose first word is o, and part 0 the tail with `last` as
// its last word.
fn store_chunk_part(o: u32, t: u32, q: XqPart, last: u32) {
    let off = part_offsets(t);
    let val = part_values(q);
    for (var j = 0u; j < 4u; j++) {
        y[o + off[j]] = val[j];
    }
    if t == 0u {
        y[o + 16u] = q.tail[0];
        y[o + 17u] = q.tail[1];
        y[o + 18u] = q.tail[2];
        y[o + 19u] = last;
    }
}

// The chunk of act(gate)·up from yrows (32 gate rows, then the same 32 up rows) at word o:
// invocations 0..3 in quantize_part's order (`slot`) hold its parts and store them where
// `store`. Called by the whole workgroup (quantize_part may have barriers).
fn store_glu_chunk_at(o: u32, slot: u32, store: bool) {
    let t = slot % 4u;
    let on = slot < 4u;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if on {
        let e = 8u * t;
        let u = e + 32u;
        a = glu4(vec4<f32>(yrows[e], yrows[e + 1u], yrows[e + 2u], yrows[e + 3u]),
                 vec4<f32>(yrows[u], yrows[u + 1u], yrows[u + 2u], yrows[u + 3u]));
        b = glu4(vec4<f32>(yrows[e + 4u], yrows[e + 5u], yrows[e + 6u], yrows[e + 7u]),
                 vec4<f32>(yrows[u + 4u], yrows[u + 5u], yrows[u + 6u], yrows[u + 7u]));
    }
    let q = quantize_part(a, b, slot);
    if on && store {
        store_chunk_part(o, t, q, 0u);
    }
}

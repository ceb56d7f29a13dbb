// Embedding lookup: out[r, c] = table[ids[r], c] * scale, f32 out [n, dim].
// table [vocab, dim] is f32, f16 or bf16 by the variant (16-bit read as u32 words); ids [n]
// u32 or i32 (read as u32 words: a negative i32 is >= 2^31). An id >= vocab (or negative)
// reads nothing and writes a row of zeros. One invocation per output element.
// Bindings: 0 table, 1 ids, 2 out.
struct Params {
    total: u32,
    dim: u32,
    vocab: u32,
    scale: f32,
}

@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(0) var<storage, read> table: array<f32>;
fn load_t(i: u32) -> f32 {
    return table[view(0u) + i];
}
#else
@group(0) @binding(0) var<storage, read> table: array<u32>;
fn load_t(i: u32) -> f32 {
    let j = view(0u) + i;
    return half_at(table[j >> 1u], j);
}
#endif

@compute @workgroup_size(WG)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg) * WG + lid;
    if g >= p.total {
        return;
    }
    let row = g / p.dim;
    let col = g - row * p.dim;
    let id = ids[view(1u) + row];
    var v = 0.0;
    if id < p.vocab {
        v = load_t(id * p.dim + col) * p.scale;
    }
    out[view(2u) + g] = v;
}

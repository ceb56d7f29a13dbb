// fill: write one 32-bit pattern into every word of a buffer (poisoning, zeroing).
// Bindings: 0 out (u32 words).
struct Params {
    words: u32,
    value: u32,
}
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn fill_u32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    if i < p.words {
        out[view(0u) + i] = p.value;
    }
}

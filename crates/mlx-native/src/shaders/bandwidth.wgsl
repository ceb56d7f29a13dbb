// Read-bandwidth probe: every invocation streams vec4<u32> words with a grid stride and
// folds them into one word per workgroup, so the loads cannot be optimized away and the
// bytes written are negligible. Used by the bench as the device's memory roofline.
// Bindings: 0 src (vec4<u32>), 1 out (u32, one per workgroup).
struct Params {
    vec4s: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn read_probe(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    let stride = nwg.x * nwg.y * nwg.z * WG;
    let base = view(0u) / 4u;
    var acc = vec4<u32>(0u);
    for (var i = g * WG + lid; i < p.vec4s; i += stride) {
        acc ^= src[base + i];
    }
    let folded = acc.x ^ acc.y ^ acc.z ^ acc.w;
    // One write per invocation that saw a nonzero fold is enough to keep the loads alive.
    if folded == 0x9e3779b9u {
        out[view(1u) + g] = folded;
    }
}

// (in progress)
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(WG)
fn placeholder(@builtin(local_invocation_index) lid: u32) {
    out[lid] = lid;
}

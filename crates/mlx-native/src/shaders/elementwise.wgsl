// Elementwise arithmetic on f32 activations: add, mul (b either the same length as a, or
// one row broadcast over a's rows), scale, add_scaled (a + s * b).
// Bindings: 0 a (f32), 1 b (f32), 2 out (f32). `scale` binds a twice (b unused).
struct Params {
    n: u32,
    b_len: u32,
    s: f32,
    _pad: u32,
}
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_wg(wid, nwg) * WG + lid;
}

fn b_at(i: u32) -> f32 {
    return b[view(1u) + i % p.b_len];
}

@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = a[view(0u) + i] + b_at(i);
    }
}

@compute @workgroup_size(WG)
fn mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = a[view(0u) + i] * b_at(i);
    }
}

@compute @workgroup_size(WG)
fn add_scaled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = a[view(0u) + i] + p.s * b_at(i);
    }
}

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = a[view(0u) + i] * p.s;
    }
}

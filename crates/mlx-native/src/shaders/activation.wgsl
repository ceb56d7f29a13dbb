// Elementwise activations of f32 activations, and gated (GLU) products.
//   act:       out = act(x)
//   glu:       out = act(gate) * up                  (gate in binding 0, up in binding 1)
//   glu_split: out[r, c] = act(x[r, c]) * x[r, half + c]   (x is [rows, 2 * half]: gate
//              first, up second, as mlx-lm splits a fused gate_up projection)
//   softcap:   out = cap * tanh(x / cap)             (Gemma 2 logit soft-capping)
// ACT: 0 silu, 1 gelu with the tanh approximation, 2 gelu with erf (common/act.wgsl).
// Bindings: 0 x / gate, 1 up (glu only; other entries bind any buffer there), 2 out.
//
// No formula here can produce NaN or infinity for finite input: every exp argument is <= 0
// (sigmoid and tanh are built from exp(-|z|), which at worst underflows to 0), and tanh is
// not the builtin (some backends build it from exp(2y), which overflows for large |y| and
// loses relative accuracy near 0).
struct Params {
    n: u32,
    half: u32,
    cap: f32,
    _pad: u32,
}
override ACT: u32 = 0u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

// tanh without overflow or NaN for any finite y: |y| is clamped to 10 (tanh(10) rounds to 1
// in f32), and exp(-2|y|) lies in (0, 1]. Below 0.3 an odd Taylor polynomial to y^9
// (truncation < 6e-8 relative) keeps relative accuracy for tiny y.
fn tanh_safe(y: f32) -> f32 {
    let a = min(abs(y), 10.0);
    var t: f32;
    if a < 0.3 {
        let a2 = a * a;
        t = a * (1.0 + a2 * (-0.3333333333 + a2 * (0.1333333333 + a2 * (-0.0539682540 +
            a2 * 0.0218694885))));
    } else {
        let e = exp(-2.0 * a);
        t = (1.0 - e) / (1.0 + e);
    }
    return select(t, -t, y < 0.0);
}

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_wg(wid, nwg) * WG + lid;
}

@compute @workgroup_size(WG)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = act(x[view(0u) + i]);
    }
}

@compute @workgroup_size(WG)
fn glu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = act(x[view(0u) + i]) * up[view(1u) + i];
    }
}

@compute @workgroup_size(WG)
fn glu_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        let r = i / p.half;
        let g = view(0u) + i + r * p.half;
        out[view(2u) + i] = act(x[g]) * x[g + p.half];
    }
}

@compute @workgroup_size(WG)
fn softcap(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(2u) + i] = p.cap * tanh_safe(x[view(0u) + i] / p.cap);
    }
}

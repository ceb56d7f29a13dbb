// Elementwise activations of f32 activations, and gated (GLU) products.
//   act:       out = act(x)
//   glu:       out = act(gate) * up                  (gate in binding 0, up in binding 1)
//   glu_split: out[r, c] = act(x[r, c]) * x[r, half + c]   (x is [rows, 2 * half]: gate
//              first, up second, as mlx-lm splits a fused gate_up projection)
//   softcap:   out = cap * tanh(x / cap)             (Gemma 2 logit soft-capping)
//   quantize_chunks: glu_split's output (XQ_GLU), or x itself ([rows, half]), quantized
//              per 32-element chunk for a matvec (common/xq_quantize.wgsl) into outq: four
//              invocations a chunk.
// ACT: 0 silu, 1 gelu with the tanh approximation, 2 gelu with erf (common/act.wgsl).
// Bindings: 0 x / gate, 1 up (glu only; other entries bind any buffer there), 2 out, 3 outq
// (the quantized entries).
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
// The quantized entries: the consuming matvec's code width and x mode, XQ_OUT = BITS << 2 |
// XQ (common/xq_quantize.wgsl reads BITS and XQ).
override XQ_OUT: u32 = 18u;
override BITS: u32 = XQ_OUT >> 2u;
override XQ: u32 = XQ_OUT & 3u;
// quantize_chunks: 1 quantizes glu_split's output (glu_split_xq), 2 glu's (gate in binding 0,
// up in 1: glu_xq), 0 x itself.
override XQ_GLU: u32 = 0u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> outq: array<u32>;
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

// Part i % 4 of chunk i / 4 (values 8t..8t+7 in a, b; `on` false past the last chunk)
// quantized with its chunk's other parts (quantize_part; every invocation calls it; `slot`
// the invocation's place in its order) into outq.
fn store_part(i: u32, on: bool, a: vec4<f32>, b: vec4<f32>, slot: u32) {
    let q = quantize_part(a, b, slot);
    if on {
        let t = i % 4u;
        let o = view(3u) + (i / 4u) * 4u * XQ_VEC4S;
        let off = part_offsets(t);
        let val = part_values(q);
        for (var j = 0u; j < 4u; j++) {
            outq[o + off[j]] = val[j];
        }
        if t == 0u {
            for (var j = 0u; j < 4u; j++) {
                outq[o + 16u + j] = q.tail[j];
            }
        }
    }
}

fn x4at(i: u32) -> vec4<f32> {
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
}

fn up4at(i: u32) -> vec4<f32> {
    return vec4<f32>(up[i], up[i + 1u], up[i + 2u], up[i + 3u]);
}

fn act4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act(v.x), act(v.y), act(v.z), act(v.w));
}

// Four invocations a chunk. glu_split_xq (XQ_GLU 1): x is [rows, 2 * half], the values
// act(gate) * up; glu_xq (2): act(x) * up, both [rows, half]; quantize_x (0): x's own. p.n: values to quantize (rows *
// half), p.half: a row's (a multiple of 32).
@compute @workgroup_size(WG)
fn quantize_chunks(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
                   , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
                   @builtin(subgroup_size) ssz: u32
#endif
) {
#if SUBGROUPS
    let slot = si * ssz + sl;
#else
    let slot = lid;
#endif
    let i = index(wid, nwg, slot);
    let on = i < p.n / 8u;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if on {
        let e = i * 8u;
        if XQ_GLU == 2u {
            let g = view(0u) + e;
            let u = view(1u) + e;
            a = act4(x4at(g)) * up4at(u);
            b = act4(x4at(g + 4u)) * up4at(u + 4u);
        } else if XQ_GLU != 0u {
            let g = view(0u) + e + (e / p.half) * p.half;
            let u = g + p.half;
            a = act4(x4at(g)) * x4at(u);
            b = act4(x4at(g + 4u)) * x4at(u + 4u);
        } else {
            a = x4at(view(0u) + e);
            b = x4at(view(0u) + e + 4u);
        }
    }
    store_part(i, on, a, b, slot);
}

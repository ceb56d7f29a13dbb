// Elementwise activations of f32 activations, and gated (GLU) products.
//   act:       out = act(x)
//   glu:       out = act(gate) * up                  (gate in binding 0, up in binding 1)
//   glu_split: out[r, c] = act(x[r, c]) * x[r, half + c]   (x is [rows, 2 * half]: gate
//              first, up second, as mlx-lm splits a fused gate_up projection)
//   softcap:   out = cap * tanh(x / cap)             (Gemma 2 logit soft-capping)
// ACT: 0 silu, 1 gelu with the tanh approximation, 2 gelu with erf.
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

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const FRAC_1_SQRT_2: f32 = 0.7071067811865476;

// x * sigmoid(z) without overflow: with e = exp(-|z|) in [0, 1], sigmoid(z) is 1 / (1 + e)
// for z >= 0 and e / (1 + e) for z < 0. A very negative z gives x * 0, not x / inf.
fn mul_sigmoid(x: f32, z: f32) -> f32 {
    let e = exp(-abs(z));
    return select(x * e, x, z >= 0.0) / (1.0 + e);
}

fn silu(x: f32) -> f32 {
    return mul_sigmoid(x, x);
}

// 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3) (MLX nn.gelu_approx, PyTorch
// gelu(approximate="tanh")), evaluated as x * sigmoid(2u): identical in exact arithmetic,
// and free of the cancellation in 1 + tanh(u) for negative x.
fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    return mul_sigmoid(x, 2.0 * u);
}

// erfc(z) with fractional error < 1.2e-7 for all z (the Chebyshev fit `erfcc` of Numerical
// Recipes, 6.2), in exact arithmetic. Evaluated in f32 the exp argument -z^2 carries
// z^2 * 2^-24 absolute error, i.e. ~1e-5 relative at z = 9 where erfc ~ 1e-37; below that
// the result underflows to 0. Relative accuracy in the tail is why this is used rather than
// Abramowitz-Stegun 7.1.26 (1.5e-7 absolute on erf, so poor relative accuracy of 1 + erf
// for negative arguments).
fn erfc(z: f32) -> f32 {
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(poly - a * a);
    return select(2.0 - r, r, z >= 0.0);
}

// 0.5 * x * (1 + erf(x / sqrt(2))) (MLX nn.gelu, exact GELU) = 0.5 * x * erfc(-x / sqrt(2)).
fn gelu_erf(x: f32) -> f32 {
    return 0.5 * x * erfc(-x * FRAC_1_SQRT_2);
}

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

fn act(v: f32) -> f32 {
    if ACT == 1u {
        return gelu_tanh(v);
    }
    if ACT == 2u {
        return gelu_erf(v);
    }
    return silu(v);
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

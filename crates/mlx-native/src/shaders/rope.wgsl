// Rotary position embedding of f32 activations x [tokens, heads, head_dim] (row-major; the
// same memory as [tokens, heads * head_dim]) with an explicit position per token.
// One invocation per pair of a head: pairs j < rot_half rotate, the rest copy elements 2j and
// 2j + 1 unchanged (partial rotary: elements rot_half * 2 .. head_dim pass through).
//   NEOX = 0 (traditional): pair j is elements (2j, 2j + 1).
//   NEOX = 1 (neox / rotate_half): pair j is elements (j, j + rot_half).
// Rotated outputs are multiplied by `mscale` (YaRN attention factor; 1 otherwise).
// Bindings: 0 x (f32), 1 positions (u32 or i32 by the variant: DT_U32 / DT_I32), 2 the
// frequency table (4 f32 per pair, see turns()), 3 y (f32, same shape as x).
struct Params {
    total: u32,
    heads: u32,
    head_dim: u32,
    half: u32,
    rot_half: u32,
    mscale: f32,
    _pad0: u32,
    _pad1: u32,
}
override NEOX: u32 = 0u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> pos: array<u32>;
@group(0) @binding(2) var<storage, read> freq: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

// The angle of pair j at position `pw`, in turns (common/rope_turns.wgsl).
fn turns(pw: u32, j: u32) -> f32 {
    let fo = view(2u) + 4u * j;
    return turns_of(pw, freq[fo], freq[fo + 1u], freq[fo + 2u]);
}

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg) * WG + lid;
    if g >= p.total {
        return;
    }
    let row = g / p.half;
    let j = g - row * p.half;
    let xo = view(0u) + row * p.head_dim;
    let yo = view(3u) + row * p.head_dim;
    if j >= p.rot_half {
        // Pass-through pair: elements rot_half * 2 + 2 * (j - rot_half) = 2j and 2j + 1.
        let k = 2u * j;
        y[yo + k] = x[xo + k];
        y[yo + k + 1u] = x[xo + k + 1u];
        return;
    }
    var i0 = 2u * j;
    var i1 = i0 + 1u;
    if NEOX == 1u {
        i0 = j;
        i1 = j + p.rot_half;
    }
    let token = row / p.heads;
    let a = 6.283185307179586 * turns(pos[view(1u) + token], j);
    let c = cos(a) * p.mscale;
    let s = sin(a) * p.mscale;
    let x0 = x[xo + i0];
    let x1 = x[xo + i1];
    y[yo + i0] = x0 * c - x1 * s;
    y[yo + i1] = x0 * s + x1 * c;
}

// norm_rope: per-head RMS norm (weight `w`, f32 [head_dim]) then RoPE, one workgroup per
// row (token, head): Qwen3 / Gemma 3 q/k norm fused with the rotation (one dispatch where
// rms_norm + rope take two). Bindings as rope, plus 4 w.
@group(0) @binding(4) var<storage, read> w: array<f32>;

fn rotate_pair(xo: u32, yo: u32, token: u32, j: u32, inv: f32) {
    let wo = view(4u);
    if j >= p.rot_half {
        let k = 2u * j;
        y[yo + k] = x[xo + k] * inv * w[wo + k];
        y[yo + k + 1u] = x[xo + k + 1u] * inv * w[wo + k + 1u];
        return;
    }
    var i0 = 2u * j;
    var i1 = i0 + 1u;
    if NEOX == 1u {
        i0 = j;
        i1 = j + p.rot_half;
    }
    let a = 6.283185307179586 * turns(pos[view(1u) + token], j);
    let c = cos(a) * p.mscale;
    let s = sin(a) * p.mscale;
    let x0 = x[xo + i0] * inv * w[wo + i0];
    let x1 = x[xo + i1] * inv * w[wo + i1];
    y[yo + i0] = x0 * c - x1 * s;
    y[yo + i1] = x0 * s + x1 * c;
}

@compute @workgroup_size(WG)
fn norm_rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
             , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
             @builtin(num_subgroups) sc: u32
#endif
) {
#if SUBGROUPS
    sg_lane = sl;
    sg_index = si;
    sg_count = sc;
#endif
    // `total` counts rows here; the row index is uniform over the workgroup.
    let row = flat_wg(wid, nwg);
    if row >= p.total {
        return;
    }
    let xo = view(0u) + row * p.head_dim;
    let yo = view(3u) + row * p.head_dim;
    var ss = 0.0;
    for (var i = lid; i < p.head_dim; i += WG) {
        let v = x[xo + i];
        ss += v * v;
    }
    // `_pad0` carries eps (f32 bits) for this entry.
    let inv = inverseSqrt(wg_sum(ss, lid) / f32(p.head_dim) + bitcast<f32>(p._pad0));
    let token = row / p.heads;
    for (var j = lid; j < p.half; j += WG) {
        rotate_pair(xo, yo, token, j, inv);
    }
}

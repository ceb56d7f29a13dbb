// Row softmax of f32 activations over the last dimension, with a scale and an optional
// additive f32 mask:  y = softmax(x * scale + mask).
// One workgroup per row. The mask row of x row r is r % mask_rows (mask_rows divides rows:
// a mask broadcast over x's leading dimensions, e.g. [L, S] against scores [B, H, L, S]).
// Bindings: 0 x, 1 mask (MASK = 1; otherwise any buffer, not read), 2 y.
//
// Numerics: one pass keeps a running (max, sum of exp(v - max)) per invocation, combined
// across the workgroup (wg_max, then each partial sum rescaled to the row max, wg_sum); a
// second pass writes exp(v - max) / sum. The running max starts at the most negative finite
// f32 (WGSL has no infinity literal), so a -inf logit contributes exp(-inf) = 0 and never
// computes -inf - -inf. A row whose logits are all -inf (fully masked) therefore has sum 0
// and is written as zeros, not NaN. (MLX's Metal kernel starts from the same finite minimum
// but divides by the zero sum, giving NaN or zeros depending on the row length, see
// ml-explore/mlx#1467; zeros are what attention over a fully padded row wants.)
struct Params {
    rows: u32,
    n: u32,
    mask_rows: u32,
    scale: f32,
}
override MASK: u32 = 0u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> mask: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

const F32_LOWEST: f32 = -3.40282347e38;

fn reduce_init(sl: u32, si: u32, sc: u32) {
    sg_lane = sl;
    sg_index = si;
    sg_count = sc;
}

fn logit(xo: u32, mo: u32, i: u32) -> f32 {
    var v = x[xo + i] * p.scale;
    if MASK != 0u {
        v += mask[mo + i];
    }
    return v;
}

@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
           , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
           @builtin(num_subgroups) sc: u32
#endif
) {
#if SUBGROUPS
    reduce_init(sl, si, sc);
#endif
    let row = flat_wg(wid, nwg);
    // Workgroup-uniform: the whole workgroup leaves together, before any barrier.
    if row >= p.rows {
        return;
    }
    let xo = view(0u) + row * p.n;
    let mo = view(1u) + (row % p.mask_rows) * p.n;
    var m = F32_LOWEST;
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let v = logit(xo, mo, i);
        if v > m {
            // m - v may overflow to -inf for huge v: exp gives 0, which is right.
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s += exp(v - m);
        }
    }
    let row_max = wg_max(m, lid);
    let sum = wg_sum(s * exp(m - row_max), lid);
    // sum >= 1 unless every logit of the row is -inf: then write zeros.
    let inv = select(0.0, 1.0 / sum, sum > 0.0);
    let yo = view(2u) + row * p.n;
    for (var i = lid; i < p.n; i += WG) {
        y[yo + i] = exp(logit(xo, mo, i) - row_max) * inv;
    }
}

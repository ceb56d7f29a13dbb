// Row normalizations of f32 activations with an f32/f16/bf16 weight (and bias):
//   rms_norm:          y = x * rsqrt(mean(x^2) + eps) * w
//   rms_norm_residual: h = x + r; y = rms_norm(h)      (h is written too: the new residual)
//   layer_norm:        y = (x - mean) * rsqrt(var + eps) * w + b   (w, b optional: AFFINE bits)
// One workgroup per row.
// Bindings rms_norm: 0 x, 1 w, 2 y.  rms_norm_residual: 0 x, 1 w, 2 y, 3 r, 4 h.
// layer_norm: 0 x, 1 w, 2 y, 5 b.
struct Params {
    rows: u32,
    n: u32,
    eps: f32,
    _pad: u32,
}
// Bit 0: apply weight, bit 1: apply bias (layer_norm).
override AFFINE: u32 = 1u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> r: array<f32>;
@group(0) @binding(4) var<storage, read_write> h: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read> b: array<f32>;
fn load_w(i: u32) -> f32 {
    return w[view(1u) + i];
}
fn load_b(i: u32) -> f32 {
    return b[view(5u) + i];
}
#else
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(5) var<storage, read> b: array<u32>;
fn load_w(i: u32) -> f32 {
    let j = view(1u) + i;
    return half_at(w[j >> 1u], j);
}
fn load_b(i: u32) -> f32 {
    let j = view(5u) + i;
    return half_at(b[j >> 1u], j);
}
#endif

// Elements i, i + WG, i + 2 WG, i + 3 WG of a row (0 past its end): four independent loads
// per loop step, in flight together (a loop of single loads waits a full memory round trip
// per element: 17 us for one 4096-row on an H200).
fn x4(o: u32, i: u32) -> vec4<f32> {
    let last = p.n - 1u;
    let j = vec4<u32>(i, i + WG, i + 2u * WG, i + 3u * WG);
    let v = vec4<f32>(x[o + min(j.x, last)], x[o + min(j.y, last)], x[o + min(j.z, last)],
                      x[o + min(j.w, last)]);
    return select(vec4<f32>(0.0), v, j < vec4<u32>(p.n));
}

fn r4(o: u32, i: u32) -> vec4<f32> {
    let last = p.n - 1u;
    let j = vec4<u32>(i, i + WG, i + 2u * WG, i + 3u * WG);
    let v = vec4<f32>(r[o + min(j.x, last)], r[o + min(j.y, last)], r[o + min(j.z, last)],
                      r[o + min(j.w, last)]);
    return select(vec4<f32>(0.0), v, j < vec4<u32>(p.n));
}

// Weights at the same four positions as x4 (0 past the row).
fn w4(i: u32) -> vec4<f32> {
    let last = p.n - 1u;
    let j = vec4<u32>(i, i + WG, i + 2u * WG, i + 3u * WG);
    let v = vec4<f32>(load_w(min(j.x, last)), load_w(min(j.y, last)), load_w(min(j.z, last)),
                      load_w(min(j.w, last)));
    return select(vec4<f32>(0.0), v, j < vec4<u32>(p.n));
}

// Store v at the x4 positions of y (offset `o`), those inside the row.
fn store4(o: u32, i: u32, v: vec4<f32>) {
    for (var u = 0u; u < 4u; u++) {
        let j = i + u * WG;
        if j < p.n {
            y[o + j] = v[u];
        }
    }
}

fn store4h(o: u32, i: u32, v: vec4<f32>) {
    for (var u = 0u; u < 4u; u++) {
        let j = i + u * WG;
        if j < p.n {
            h[o + j] = v[u];
        }
    }
}

fn reduce_init(sl: u32, si: u32, sc: u32) {
    sg_lane = sl;
    sg_index = si;
    sg_count = sc;
}

@compute @workgroup_size(WG)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
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
    if row >= p.rows {
        return;
    }
    let xo = view(0u) + row * p.n;
    if p.n <= 4u * WG {
        // The whole row in registers (4 elements per invocation), the weights loaded before
        // the reduction: one memory round trip, then one reduction (decode's one-row norms
        // are latency, not bandwidth).
        let v = x4(xo, lid);
        let wv = w4(lid);
        let inv = inverseSqrt(wg_sum(dot(v, v), lid) / f32(p.n) + p.eps);
        store4(view(2u) + row * p.n, lid, v * inv * wv);
        return;
    }
    var ss = 0.0;
    for (var i = lid; i < p.n; i += 4u * WG) {
        let v = x4(xo, i);
        ss += dot(v, v);
    }
    let inv = inverseSqrt(wg_sum(ss, lid) / f32(p.n) + p.eps);
    let yo = view(2u) + row * p.n;
    for (var i = lid; i < p.n; i += 4u * WG) {
        let v = x4(xo, i) * inv;
        for (var u = 0u; u < 4u; u++) {
            let j = i + u * WG;
            if j < p.n {
                y[yo + j] = v[u] * load_w(j);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn rms_norm_residual(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
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
    if row >= p.rows {
        return;
    }
    let xo = view(0u) + row * p.n;
    let ro = view(3u) + row * p.n;
    let ho = view(4u) + row * p.n;
    if p.n <= 4u * WG {
        let v = x4(xo, lid) + r4(ro, lid);
        let wv = w4(lid);
        let inv = inverseSqrt(wg_sum(dot(v, v), lid) / f32(p.n) + p.eps);
        store4h(ho, lid, v);
        store4(view(2u) + row * p.n, lid, v * inv * wv);
        return;
    }
    var ss = 0.0;
    for (var i = lid; i < p.n; i += 4u * WG) {
        let v = x4(xo, i) + r4(ro, i);
        for (var u = 0u; u < 4u; u++) {
            let j = i + u * WG;
            if j < p.n {
                h[ho + j] = v[u];
            }
        }
        ss += dot(v, v);
    }
    let inv = inverseSqrt(wg_sum(ss, lid) / f32(p.n) + p.eps);
    let yo = view(2u) + row * p.n;
    // Recomputed from x and r (not read back from h): the same values, and no dependence
    // on this invocation's own stores.
    for (var i = lid; i < p.n; i += 4u * WG) {
        let v = (x4(xo, i) + r4(ro, i)) * inv;
        for (var u = 0u; u < 4u; u++) {
            let j = i + u * WG;
            if j < p.n {
                y[yo + j] = v[u] * load_w(j);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
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
    if row >= p.rows {
        return;
    }
    let xo = view(0u) + row * p.n;
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        s += x[xo + i];
    }
    let mean = wg_sum(s, lid) / f32(p.n);
    // Two-pass variance: exact for rows with a large mean, unlike E[x^2] - mean^2.
    var ss = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let d = x[xo + i] - mean;
        ss += d * d;
    }
    let inv = inverseSqrt(wg_sum(ss, lid) / f32(p.n) + p.eps);
    let yo = view(2u) + row * p.n;
    for (var i = lid; i < p.n; i += WG) {
        var v = (x[xo + i] - mean) * inv;
        if (AFFINE & 1u) != 0u {
            v *= load_w(i);
        }
        if (AFFINE & 2u) != 0u {
            v += load_b(i);
        }
        y[yo + i] = v;
    }
}

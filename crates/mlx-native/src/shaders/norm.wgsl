// Row normalizations of f32 activations with an f32/f16/bf16 weight (and bias):
//   rms_norm:          y = x * rsqrt(mean(x^2) + eps) * w
//   rms_norm_residual: h = x + r; y = rms_norm(h)      (h is written too: the new residual)
//   layer_norm:        y = (x - mean) * rsqrt(var + eps) * w + b   (w, b optional: AFFINE bits)
// One workgroup per row.
// With XQ_OUT (the rms norms), y is written quantized per 32-element chunk for a matvec
// (common/xq_quantize.wgsl) into yq instead: its consumer then skips that work in every
// row-set (ops::qmatmul::QuantizedX).
// With POST (rms_norm_residual with XQ_OUT, the row in registers), r is RMS-normalized first
// with its own weight (binding 5) and eps: h = x + rms_norm(r) (Gemma's post-norm, its
// residual add and the next pre-norm in one dispatch).
// Bindings rms_norm: 0 x, 1 w, 2 y (6 yq).  rms_norm_residual: 0 x, 1 w, 2 y (6 yq), 3 r, 4 h
// (5 the post-norm's weight).
// layer_norm: 0 x, 1 w, 2 y, 5 b.
struct Params {
    rows: u32,
    n: u32,
    eps: f32,
    // POST: the post-norm's eps.
    post_eps: f32,
}
// Bit 0: apply weight, bit 1: apply bias (layer_norm).
override AFFINE: u32 = 1u;
// 0: y in f32; else the consuming matvec's code width and x mode, BITS << 2 | XQ.
override XQ_OUT: u32 = 0u;
override BITS: u32 = XQ_OUT >> 2u;
override XQ: u32 = XQ_OUT & 3u;
// With XQ_OUT: 1 writes y in f32 too (a router beside quantized experts reads it).
override XQ_Y: u32 = 0u;
override POST: u32 = 0u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> r: array<f32>;
@group(0) @binding(4) var<storage, read_write> h: array<f32>;
// Words, not vec4s: an f32 rms_norm binds its y here too (the variants share the layout),
// which may be shorter than 16 bytes.
@group(0) @binding(6) var<storage, read_write> yq: array<u32>;
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

fn xr4(xo: u32, ro: u32, res: bool, e: u32) -> vec4<f32> {
    var v = vec4<f32>(x[xo + e], x[xo + e + 1u], x[xo + e + 2u], x[xo + e + 3u]);
    if res {
        v += vec4<f32>(r[ro + e], r[ro + e + 1u], r[ro + e + 2u], r[ro + e + 3u]);
    }
    return v;
}

// XQ_OUT: the row's values (x, plus r when `res`) times inv and the weight, in y's order of
// operations, quantized into yq: four invocations a chunk (quantize_part), p.n a multiple
// of 32. Called by the whole workgroup (uniform control flow).
fn store_row_xq(row: u32, xo: u32, ro: u32, res: bool, inv: f32, lid: u32) {
    let cpr = p.n / 32u;
    let slot = xq_slot(lid);
    let t = slot % 4u;
    for (var c0 = 0u; c0 < cpr; c0 += WG / 4u) {
        let c = c0 + slot / 4u;
        let on = c < cpr;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        if on {
            let e = c * 32u + 8u * t;
            a = xr4(xo, ro, res, e) * inv * w4at(e);
            b = xr4(xo, ro, res, e + 4u) * inv * w4at(e + 4u);
            store_y8(row, e, a, b);
        }
        let q = quantize_part(a, b, slot);
        if on {
            store_yq(row * cpr + c, t, q);
        }
    }
}

// XQ_OUT with the row in registers (p.n <= 8 * WG, a multiple of 32): each invocation
// loads its 8 contiguous values (a chunk part) and their weights once, then the reduction,
// then quantize_part: one memory round trip, as the f32 norm's small-row path. `res` adds
// r and writes the sums to h. Called by the whole workgroup.
fn row_xq_in_registers(row: u32, xo: u32, ro: u32, ho: u32, res: bool, lid: u32) {
    let cpr = p.n / 32u;
    let slot = xq_slot(lid);
    let c = slot / 4u;
    let t = slot % 4u;
    let on = c < cpr;
    let e = c * 32u + 8u * t;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    var wa = vec4<f32>(0.0);
    var wb = vec4<f32>(0.0);
    let post = res && POST != 0u;
    if on {
        if post {
            // r alone first, normalized below.
            a = vec4<f32>(r[ro + e], r[ro + e + 1u], r[ro + e + 2u], r[ro + e + 3u]);
            b = vec4<f32>(r[ro + e + 4u], r[ro + e + 5u], r[ro + e + 6u], r[ro + e + 7u]);
        } else {
            a = xr4(xo, ro, res, e);
            b = xr4(xo, ro, res, e + 4u);
        }
        wa = w4at(e);
        wb = w4at(e + 4u);
    }
    if post {
        let inv_r = inverseSqrt(wg_sum(dot(a, a) + dot(b, b), lid) / f32(p.n) + p.post_eps);
        if on {
            a = xr4(xo, ro, false, e) + a * inv_r * b4at(e);
            b = xr4(xo, ro, false, e + 4u) + b * inv_r * b4at(e + 4u);
        }
    }
    if on && res {
        for (var u = 0u; u < 4u; u++) {
            h[ho + e + u] = a[u];
            h[ho + e + 4u + u] = b[u];
        }
    }
    let inv = inverseSqrt(wg_sum(dot(a, a) + dot(b, b), lid) / f32(p.n) + p.eps);
    let ya = a * inv * wa;
    let yb = b * inv * wb;
    if on {
        store_y8(row, e, ya, yb);
    }
    let q = quantize_part(ya, yb, slot);
    if on {
        store_yq(row * cpr + c, t, q);
    }
}

// XQ_Y: the 8 normed values at element e of the row into y as well.
fn store_y8(row: u32, e: u32, a: vec4<f32>, b: vec4<f32>) {
    if XQ_Y != 0u {
        let o = view(2u) + row * p.n + e;
        for (var u = 0u; u < 4u; u++) {
            y[o + u] = a[u];
            y[o + 4u + u] = b[u];
        }
    }
}

// Part t of chunk `chunk` (counted over all rows) into yq.
fn store_yq(chunk: u32, t: u32, q: XqPart) {
    let o = view(6u) + chunk * 4u * XQ_VEC4S;
    let off = part_offsets(t);
    let val = part_values(q);
    for (var j = 0u; j < 4u; j++) {
        yq[o + off[j]] = val[j];
    }
    if t == 0u {
        for (var j = 0u; j < 4u; j++) {
            yq[o + 16u + j] = q.tail[j];
        }
    }
}

// The invocation's place in quantize_part's order: subgroup-major with SUBGROUPS (a chunk's
// four parts are adjacent lanes; reduce_init has set the sg_* privates).
fn xq_slot(lid: u32) -> u32 {
#if SUBGROUPS
    return sg_index * (WG / sg_count) + sg_lane;
#else
    return lid;
#endif
}

fn w4at(e: u32) -> vec4<f32> {
    return vec4<f32>(load_w(e), load_w(e + 1u), load_w(e + 2u), load_w(e + 3u));
}

// POST: the post-norm's weight (binding 5) at elements e..e + 3.
fn b4at(e: u32) -> vec4<f32> {
    return vec4<f32>(load_b(e), load_b(e + 1u), load_b(e + 2u), load_b(e + 3u));
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
    if XQ_OUT != 0u && p.n <= 8u * WG {
        row_xq_in_registers(row, xo, 0u, 0u, false, lid);
        return;
    }
    if p.n <= 4u * WG {
        // The whole row in registers (4 elements per invocation), the weights loaded before
        // the reduction: one memory round trip, then one reduction (decode's one-row norms
        // are latency, not bandwidth).
        let v = x4(xo, lid);
        let wv = w4(lid);
        let inv = inverseSqrt(wg_sum(dot(v, v), lid) / f32(p.n) + p.eps);
        if XQ_OUT != 0u {
            store_row_xq(row, xo, 0u, false, inv, lid);
            return;
        }
        store4(view(2u) + row * p.n, lid, v * inv * wv);
        return;
    }
    var ss = 0.0;
    for (var i = lid; i < p.n; i += 4u * WG) {
        let v = x4(xo, i);
        ss += dot(v, v);
    }
    let inv = inverseSqrt(wg_sum(ss, lid) / f32(p.n) + p.eps);
    if XQ_OUT != 0u {
        store_row_xq(row, xo, 0u, false, inv, lid);
        return;
    }
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
    if XQ_OUT != 0u && p.n <= 8u * WG {
        row_xq_in_registers(row, xo, ro, ho, true, lid);
        return;
    }
    if p.n <= 4u * WG {
        let v = x4(xo, lid) + r4(ro, lid);
        let wv = w4(lid);
        let inv = inverseSqrt(wg_sum(dot(v, v), lid) / f32(p.n) + p.eps);
        store4h(ho, lid, v);
        if XQ_OUT != 0u {
            store_row_xq(row, xo, ro, true, inv, lid);
            return;
        }
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
    if XQ_OUT != 0u {
        store_row_xq(row, xo, ro, true, inv, lid);
        return;
    }
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

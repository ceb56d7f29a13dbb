// Split-K decode: combine the splits of one head (decode kernels of sdpa.wgsl and
// sdpa_quant.wgsl). Needs the includer's bindings 3 part_o, 4 part_ml, 5 sinks, its `p`
// (n_splits, has_sinks), HEAD_DIM, C4 and M_INIT.

var<workgroup> red_m: array<vec2<f32>, 128>;
var<workgroup> red_o: array<vec4<f32>, 128>;

// Online-softmax merge of two (max, sum) pairs.
fn merge_ml(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// The normalized output dims 4 * lid .. 4 * lid + 3 of head h (for lid < C4; others get
// zeros), from the splits' (max, sum) pairs, the sink and the partial outputs. One workgroup
// of 128 per head; call from uniform control flow. Invocation (split group sg = lid / C4,
// chunk c = lid % C4) adds the splits sg, sg + sg_n, ... of its four dims, so 128 loads are
// in flight per step.
fn combine_splits(h: u32, lid: u32) -> vec4<f32> {
    let ml = view(4u) + h * p.n_splits * 2u;
    var mine = vec2<f32>(M_INIT, 0.0);
    for (var s = lid; s < p.n_splits; s += 128u) {
        mine = merge_ml(mine, vec2<f32>(part_ml[ml + 2u * s], part_ml[ml + 2u * s + 1u]));
    }
    red_m[lid] = mine;
    workgroupBarrier();
    for (var w = 64u; w > 0u; w >>= 1u) {
        if lid < w {
            red_m[lid] = merge_ml(red_m[lid], red_m[lid + w]);
        }
        workgroupBarrier();
    }
    var tot = red_m[0];
    if p.has_sinks != 0u {
        tot = merge_ml(tot, vec2<f32>(sinks[view(5u) + h], 1.0));
    }
    let mx = tot.x;
    let inv = select(0.0, 1.0 / tot.y, tot.y > 0.0);
    let sg_n = 128u / C4;
    let sg = lid / C4;
    let c = lid % C4;
    let po = view(3u) + h * p.n_splits * HEAD_DIM + c * 4u;
    var a = vec4<f32>(0.0);
    if sg < sg_n {
        // Four splits per trip, all loads before the arithmetic (independent requests in
        // flight instead of one load latency per split).
        var s = sg;
        while s + 3u * sg_n < p.n_splits {
            let s1 = s + sg_n;
            let s2 = s1 + sg_n;
            let s3 = s2 + sg_n;
            let m0 = part_ml[ml + 2u * s];
            let m1 = part_ml[ml + 2u * s1];
            let m2 = part_ml[ml + 2u * s2];
            let m3 = part_ml[ml + 2u * s3];
            let o0 = po + s * HEAD_DIM;
            let o1 = po + s1 * HEAD_DIM;
            let o2 = po + s2 * HEAD_DIM;
            let o3 = po + s3 * HEAD_DIM;
            let x0 = vec4<f32>(part_o[o0], part_o[o0 + 1u], part_o[o0 + 2u], part_o[o0 + 3u]);
            let x1 = vec4<f32>(part_o[o1], part_o[o1 + 1u], part_o[o1 + 2u], part_o[o1 + 3u]);
            let x2 = vec4<f32>(part_o[o2], part_o[o2 + 1u], part_o[o2 + 2u], part_o[o2 + 3u]);
            let x3 = vec4<f32>(part_o[o3], part_o[o3 + 1u], part_o[o3 + 2u], part_o[o3 + 3u]);
            a += (exp(m0 - mx) * x0 + exp(m1 - mx) * x1) + (exp(m2 - mx) * x2 + exp(m3 - mx) * x3);
            s += 4u * sg_n;
        }
        for (; s < p.n_splits; s += sg_n) {
            let o = po + s * HEAD_DIM;
            let w = exp(part_ml[ml + 2u * s] - mx);
            a += w * vec4<f32>(part_o[o], part_o[o + 1u], part_o[o + 2u], part_o[o + 3u]);
        }
    }
    red_o[lid] = a;
    workgroupBarrier();
    var t = vec4<f32>(0.0);
    if lid < C4 {
        for (var s = 0u; s < sg_n; s++) {
            t += red_o[s * C4 + lid];
        }
    }
    return t * inv;
}

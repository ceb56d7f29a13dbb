// MoE bookkeeping:
//   sort_pairs  one workgroup: counting sort of the P = T * top_k (token, slot) pairs by
//               expert id (histogram in workgroup atomics, prefix sum, scatter), plus the tile
//               table of the grouped matmul: runs of at most BM pairs of one expert. Ids >= E
//               go to bin E (their outputs are written as zeros).
//   combine     out[t, h] = Σ_j w[t, j] · y[t, j, h] (+ shared[t, h]); one invocation each.
// Bindings sort_pairs: 0 ids u32 [P], 1 sorted u32: [0] tile count, then max_tiles entries
// of 4 words at 4 + 4i (bin, first position, pairs, 0), then the pair order [P] at
// `order_at`. combine: 2 y f32 [T, top_k, H], 3 w f32 [T, top_k], 4 out f32 [T, H],
// 5 shared f32 [T, H].
struct Params {
    // pairs (sort_pairs) or tokens (combine)
    n: u32,
    top_k: u32,
    h: u32,
    experts: u32,
    max_tiles: u32,
    order_at: u32,
    bm: u32,
    has_shared: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(1) var<storage, read_write> sorted: array<u32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> shared_y: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

// Up to 256 experts plus the out-of-range bin.
var<workgroup> cnt: array<atomic<u32>, 257>;
var<workgroup> first: array<u32, 257>;

@compute @workgroup_size(WG)
fn sort_pairs(@builtin(local_invocation_index) lid: u32) {
    let bins = p.experts + 1u;
    for (var b = lid; b < bins; b += WG) {
        atomicStore(&cnt[b], 0u);
    }
    workgroupBarrier();
    let io = view(0u);
    for (var i = lid; i < p.n; i += WG) {
        atomicAdd(&cnt[min(ids[io + i], p.experts)], 1u);
    }
    workgroupBarrier();
    let so = view(1u);
    if lid == 0u {
        var pos = 0u;
        var tiles = 0u;
        for (var b = 0u; b < bins; b++) {
            let c = atomicLoad(&cnt[b]);
            first[b] = pos;
            for (var s = 0u; s < c; s += p.bm) {
                let e = so + 4u + 4u * tiles;
                sorted[e] = b;
                sorted[e + 1u] = pos + s;
                sorted[e + 2u] = min(p.bm, c - s);
                sorted[e + 3u] = 0u;
                tiles++;
            }
            pos += c;
            atomicStore(&cnt[b], 0u);
        }
        sorted[so] = tiles;
    }
    workgroupBarrier();
    for (var i = lid; i < p.n; i += WG) {
        let b = min(ids[io + i], p.experts);
        let at = first[b] + atomicAdd(&cnt[b], 1u);
        sorted[so + p.order_at + at] = i;
    }
}

@compute @workgroup_size(WG)
fn combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    if i >= p.n * p.h {
        return;
    }
    let t = i / p.h;
    let c = i % p.h;
    var s = 0.0;
    for (var j = 0u; j < p.top_k; j++) {
        let pair = t * p.top_k + j;
        s += w[view(3u) + pair] * y[view(2u) + pair * p.h + c];
    }
    if p.has_shared != 0u {
        s += shared_y[view(5u) + i];
    }
    out[view(4u) + i] = s;
}

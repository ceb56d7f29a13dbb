// GGML weights on the GPU: matvec (decode), tiled matmul (prefill) and embedding gather.
// Included into ggml_legacy.wgsl, ggml_k.wgsl and ggml_dense.wgsl, each of which defines
//   fn unit_hdr(row: u32, u: u32) -> vec4<f32>
//   fn dq_group(row: u32, u: u32, g: u32, h: vec4<f32>) -> vec4<f32>
// for unit u (elements [32u, 32u + 32)) of weight row `row` of the bound shard: the unit's
// scales (whatever the type needs, computed once per unit), and elements 32u + 4g .. + 4
// dequantized (zeros past K for the dense types, whose K need not be a multiple of 32).
// No private arrays: indexed ones would live in local memory.
// Weight shards are u32 words in the repacked layout documented in weights/ggml_weight.rs.
//
// Bindings: 0 x f32 [M, K], 1 w u32 words (one shard), 2 y f32 [M, N] (matvec, matmul) or
// [n_ids, K] (embedding), 3 ids u32 [n_ids] (embedding).
struct Params {
    // rows of x (matmul) or ids (embedding)
    m: u32,
    // elements per weight row
    k: u32,
    // weight rows in all shards: the row stride of y (matvec, matmul)
    n: u32,
    // rows in this shard
    rows: u32,
    // first row of this shard
    row0: u32,
    // blocks per weight row
    bpr: u32,
    // word offset of the f16 scale array in the shard (split layouts)
    scale_off: u32,
    // 32-element units per row: ceil(K / 32)
    units: u32,
    // embedding: write zeros for ids >= n (set on one shard's dispatch only)
    zero_oob: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> wq: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

// matvec: rows of x (1..=8); M * WG <= 2048.
override M: u32 = 1u;

fn wword(i: u32) -> u32 {
    return wq[view(1u) + i];
}

// f16 half `hi` (0 low, 1 high) of a word.
fn hf(word: u32, hi: u32) -> f32 {
    return unpack2x16float(word >> (16u * hi)).x;
}

// The f16 scale of block b in split layouts.
fn split_scale(b: u32) -> f32 {
    return hf(wword(p.scale_off + (b >> 1u)), b & 1u);
}

// Four 4-bit fields at bit `sh` of each byte of w.
fn nib4(w: u32, sh: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8((w >> sh) & 0x0F0F0F0Fu));
}

// Four 2-bit fields at bit `sh` of each byte of w.
fn crumb4(w: u32, sh: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8((w >> sh) & 0x03030303u));
}

// Bit `sh` of each byte of w.
fn bit4(w: u32, sh: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8((w >> sh) & 0x01010101u));
}

// Byte i of the words starting at word o.
fn byte_at(o: u32, i: u32) -> u32 {
    return (wword(o + (i >> 2u)) >> ((i & 3u) * 8u)) & 0xffu;
}

// Four consecutive x elements at flat index i, for column k of a row; zeros past K.
fn x4(i: u32, k: u32) -> vec4<f32> {
    if k + 4u <= p.k {
        return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
    }
    var v = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if k + c < p.k {
            v[c] = x[i + c];
        }
    }
    return v;
}

var<workgroup> red: array<f32, 2048>;

// y[m, n] = sum_k x[m, k] w[n, k] for M (<= 8) rows of x, one weight row per workgroup.
// Invocation t takes group t % 8 of units t / 8, t / 8 + WG / 8, ... of the row; partial sums
// are reduced per m.
@compute @workgroup_size(WG)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
          , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
          @builtin(num_subgroups) sc: u32
#endif
) {
    let row = flat_wg(wid, nwg);
    if row >= p.rows {
        return;
    }
    // acc_lo[m] for m < 4, acc_hi[m - 4] above
    var acc_lo = vec4<f32>(0.0);
    var acc_hi = vec4<f32>(0.0);
    let xo = view(0u);
    // Eight invocations share a unit, one 4-element group each: neighbouring invocations
    // read neighbouring x and weight words.
    let g = lid % 8u;
    for (var u = lid / 8u; u < p.units; u += WG / 8u) {
        let h = unit_hdr(row, u);
        let w = dq_group(row, u, g, h);
        let k = u * 32u + 4u * g;
        {
            acc_lo.x += dot(w, x4(xo + k, k));
            if M > 1u {
                acc_lo.y += dot(w, x4(xo + p.k + k, k));
            }
            if M > 2u {
                acc_lo.z += dot(w, x4(xo + 2u * p.k + k, k));
            }
            if M > 3u {
                acc_lo.w += dot(w, x4(xo + 3u * p.k + k, k));
            }
            if M > 4u {
                acc_hi.x += dot(w, x4(xo + 4u * p.k + k, k));
            }
            if M > 5u {
                acc_hi.y += dot(w, x4(xo + 5u * p.k + k, k));
            }
            if M > 6u {
                acc_hi.z += dot(w, x4(xo + 6u * p.k + k, k));
            }
            if M > 7u {
                acc_hi.w += dot(w, x4(xo + 7u * p.k + k, k));
            }
        }
    }
#if SUBGROUPS
    let s_lo = subgroupAdd(acc_lo);
    var s_hi = vec4<f32>(0.0);
    if M > 4u {
        s_hi = subgroupAdd(acc_hi);
    }
    if sl == 0u {
        for (var m = 0u; m < M; m++) {
            red[m * WG + si] = select(s_hi[m % 4u], s_lo[m % 4u], m < 4u);
        }
    }
    workgroupBarrier();
    if lid < M {
        var t = 0.0;
        for (var j = 0u; j < sc; j++) {
            t += red[lid * WG + j];
        }
        y[view(2u) + lid * p.n + p.row0 + row] = t;
    }
#else
    for (var m = 0u; m < M; m++) {
        red[m * WG + lid] = select(acc_hi[m % 4u], acc_lo[m % 4u], m < 4u);
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            for (var m = 0u; m < M; m++) {
                red[m * WG + lid] += red[m * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    if lid < M {
        y[view(2u) + lid * p.n + p.row0 + row] = red[lid * WG];
    }
#endif
}

// Tiled matmul: 64x64 output tile per workgroup of 64 invocations (8x8 each), K in steps of
// one 32-element unit. Each invocation dequantizes one unit of one weight row into workgroup
// memory per step. Row stride 33 avoids bank conflicts on the column reads.
const TS: u32 = 33u;
var<workgroup> xs: array<f32, 2112>;
var<workgroup> ws: array<f32, 2112>;

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    let tiles_n = (p.rows + 63u) / 64u;
    let tiles_m = (p.m + 63u) / 64u;
    if g >= tiles_n * tiles_m {
        return;
    }
    let tn = g % tiles_n;
    let tm = g / tiles_n;
    let tx = lid % 8u;
    let ty = lid / 8u;
    let xo = view(0u);
    let wrow = tn * 64u + lid;
    var acc: array<f32, 64>;
    for (var u = 0u; u < p.units; u++) {
        let k0 = u * 32u;
        for (var j = 0u; j < 32u; j++) {
            let idx = j * 64u + lid;
            let r = idx / 32u;
            let c = idx % 32u;
            let xr = tm * 64u + r;
            var v = 0.0;
            if xr < p.m && k0 + c < p.k {
                v = x[xo + xr * p.k + k0 + c];
            }
            xs[r * TS + c] = v;
        }
        let wr = min(wrow, p.rows - 1u);
        let h = unit_hdr(wr, u);
        for (var j = 0u; j < 8u; j++) {
            let d = dq_group(wr, u, j, h);
            ws[lid * TS + 4u * j] = d.x;
            ws[lid * TS + 4u * j + 1u] = d.y;
            ws[lid * TS + 4u * j + 2u] = d.z;
            ws[lid * TS + 4u * j + 3u] = d.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 32u; kk++) {
            var a: array<f32, 8>;
            var b: array<f32, 8>;
            for (var i = 0u; i < 8u; i++) {
                a[i] = xs[(ty * 8u + i) * TS + kk];
                b[i] = ws[(tx * 8u + i) * TS + kk];
            }
            for (var i = 0u; i < 8u; i++) {
                for (var j = 0u; j < 8u; j++) {
                    acc[i * 8u + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 8u; i++) {
        let row = tm * 64u + ty * 8u + i;
        for (var j = 0u; j < 8u; j++) {
            let col = tn * 64u + tx * 8u + j;
            if row < p.m && col < p.rows {
                y[view(2u) + row * p.n + p.row0 + col] = acc[i * 8u + j];
            }
        }
    }
}

// Gather rows: one workgroup per id. Ids inside this shard are dequantized; with zero_oob,
// ids >= n (past every shard) write zeros; other ids belong to another shard's dispatch.
@compute @workgroup_size(WG)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg);
    if i >= p.m {
        return;
    }
    let id = ids[view(3u) + i];
    let o = view(2u) + i * p.k;
    if id >= p.row0 && id - p.row0 < p.rows {
        for (var u = lid; u < p.units; u += WG) {
            let h = unit_hdr(id - p.row0, u);
            for (var j = 0u; j < 8u; j++) {
                let v = dq_group(id - p.row0, u, j, h);
                for (var c = 0u; c < 4u; c++) {
                    let k = u * 32u + 4u * j + c;
                    if k < p.k {
                        y[o + k] = v[c];
                    }
                }
            }
        }
    } else if p.zero_oob != 0u && id >= p.n {
        for (var k = lid; k < p.k; k += WG) {
            y[o + k] = 0.0;
        }
    }
}

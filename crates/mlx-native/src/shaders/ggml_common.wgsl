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
// [n_ids, K] (embedding), 3 ids u32 [n_ids] (embedding), 4 x again as vec4 (matvec, when
// p.xvec).
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
    // matvec: 1 to read x through xv (K and x's offset multiples of 4)
    xvec: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> wq: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read> xv: array<vec4<f32>>;
@group(1) @binding(0) var<uniform> p: Params;

// matvec: rows of x (1..=8); M * WG <= 2048.
override M: u32 = 1u;
// matvec: RPW weight rows per workgroup (1, 2, 4) and GPL groups of four elements per
// invocation per unit (1, 2: 8 / GPL invocations share a unit), packed as MV = RPW * 16 + GPL
// (a spec has three constants).
override MV: u32 = 17u;
override RPW: u32 = MV >> 4u;
override GPL: u32 = MV & 15u;

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

// Small u32 values as f32. (A bit trick, 2^23 + v read as f32 minus 2^23, avoids NVIDIA's
// quarter-rate conversion instruction, but gave wrong Q5_0 values on an H200 (Vulkan,
// 580.159) while passing on lavapipe; plain conversions until that is understood.)
fn ufloat4(v: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(v);
}

// The four bytes of w as signed values (i8).
fn sbytes4(w: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xI8(w));
}

// Four 4-bit fields at bit `sh` of each byte of w.
fn nib4(w: u32, sh: u32) -> vec4<f32> {
    return ufloat4(unpack4xU8((w >> sh) & 0x0F0F0F0Fu));
}

// Four 2-bit fields at bit `sh` of each byte of w.
fn crumb4(w: u32, sh: u32) -> vec4<f32> {
    return ufloat4(unpack4xU8((w >> sh) & 0x03030303u));
}

// Bit `sh` of each byte of w.
fn bit4(w: u32, sh: u32) -> vec4<f32> {
    return ufloat4(unpack4xU8((w >> sh) & 0x01010101u));
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

// x[m, k..k + 4] for column k (a multiple of 4) of row m; zeros past K.
fn xq(m: u32, k: u32) -> vec4<f32> {
    if p.xvec != 0u {
        return xv[(view(4u) + m * p.k + k) / 4u];
    }
    return x4(view(0u) + m * p.k + k, k);
}

// x[m, k..k + 4] for every m < M (constant indices only: the array stays in registers).
fn xm(k: u32) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    v[0] = xq(0u, k);
    if M > 1u {
        v[1] = xq(1u, k);
    }
    if M > 2u {
        v[2] = xq(2u, k);
    }
    if M > 3u {
        v[3] = xq(3u, k);
    }
    if M > 4u {
        v[4] = xq(4u, k);
    }
    if M > 5u {
        v[5] = xq(5u, k);
    }
    if M > 6u {
        v[6] = xq(6u, k);
    }
    if M > 7u {
        v[7] = xq(7u, k);
    }
    return v;
}

// Per-m sums of one weight row: lo for m < 4, hi for m >= 4.
struct Acc {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// a + (w · x[m]) for every m < M.
fn mdot(a: Acc, w: vec4<f32>, xs: array<vec4<f32>, 8>) -> Acc {
    var r = a;
    r.lo.x += dot(w, xs[0]);
    if M > 1u {
        r.lo.y += dot(w, xs[1]);
    }
    if M > 2u {
        r.lo.z += dot(w, xs[2]);
    }
    if M > 3u {
        r.lo.w += dot(w, xs[3]);
    }
    if M > 4u {
        r.hi.x += dot(w, xs[4]);
    }
    if M > 5u {
        r.hi.y += dot(w, xs[5]);
    }
    if M > 6u {
        r.hi.z += dot(w, xs[6]);
    }
    if M > 7u {
        r.hi.w += dot(w, xs[7]);
    }
    return r;
}

fn acc_m(a: Acc, m: u32) -> f32 {
    return select(a.hi[m & 3u], a.lo[m & 3u], m < 4u);
}

fn acc_sel(a0: Acc, a1: Acc, a2: Acc, a3: Acc, r: u32) -> Acc {
    var a = a0;
    if r == 1u {
        a = a1;
    } else if r == 2u {
        a = a2;
    } else if r == 3u {
        a = a3;
    }
    return a;
}

// y[m, n] = sum_k x[m, k] w[n, k] for M (<= 8) rows of x and RPW weight rows per workgroup.
// 8 / GPL invocations share a unit, invocation t taking groups t % (8 / GPL) + j * 8 / GPL
// (j < GPL) of units t / (8 / GPL), + WG * GPL / 8, ...: neighbouring invocations read
// neighbouring x and weight words. Each x group is loaded once for all RPW rows, whose
// loads are independent (in flight together). Partial sums are reduced per (row, m).
@compute @workgroup_size(WG)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
          , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
          @builtin(num_subgroups) sc: u32
#endif
) {
    let row0 = flat_wg(wid, nwg) * RPW;
    if row0 >= p.rows {
        return;
    }
    // Rows past the shard repeat its last row (their sums are dropped).
    let last = p.rows - 1u;
    let r0 = row0;
    let r1 = min(row0 + 1u, last);
    let r2 = min(row0 + 2u, last);
    let r3 = min(row0 + 3u, last);
    let zero = Acc(vec4<f32>(0.0), vec4<f32>(0.0));
    var a0 = zero;
    var a1 = zero;
    var a2 = zero;
    var a3 = zero;
    let lpu = 8u / GPL;
    let gl = lid % lpu;
    for (var u = lid / lpu; u < p.units; u += WG / lpu) {
        let h0 = unit_hdr(r0, u);
        var h1 = vec4<f32>(0.0);
        var h2 = vec4<f32>(0.0);
        var h3 = vec4<f32>(0.0);
        if RPW > 1u {
            h1 = unit_hdr(r1, u);
        }
        if RPW > 2u {
            h2 = unit_hdr(r2, u);
            h3 = unit_hdr(r3, u);
        }
        for (var j = 0u; j < GPL; j++) {
            let g = gl + j * lpu;
            let xs = xm(u * 32u + 4u * g);
            a0 = mdot(a0, dq_group(r0, u, g, h0), xs);
            if RPW > 1u {
                a1 = mdot(a1, dq_group(r1, u, g, h1), xs);
            }
            if RPW > 2u {
                a2 = mdot(a2, dq_group(r2, u, g, h2), xs);
                a3 = mdot(a3, dq_group(r3, u, g, h3), xs);
            }
        }
    }
    let yo = view(2u) + p.row0 + row0;
#if SUBGROUPS
    // red[(r * M + m) * 64 + subgroup]: at most 64 subgroups (WG <= 256, size >= 4).
    for (var r = 0u; r < RPW; r++) {
        let a = acc_sel(a0, a1, a2, a3, r);
        let s_lo = subgroupAdd(a.lo);
        var s_hi = vec4<f32>(0.0);
        if M > 4u {
            s_hi = subgroupAdd(a.hi);
        }
        if sl == 0u {
            for (var m = 0u; m < M; m++) {
                red[(r * M + m) * 64u + si] = select(s_hi[m & 3u], s_lo[m & 3u], m < 4u);
            }
        }
    }
    workgroupBarrier();
    if lid < RPW * M {
        let r = lid / M;
        let m = lid % M;
        var t = 0.0;
        for (var j = 0u; j < sc; j++) {
            t += red[lid * 64u + j];
        }
        if row0 + r < p.rows {
            y[yo + m * p.n + r] = t;
        }
    }
#else
    for (var r = 0u; r < RPW; r++) {
        let a = acc_sel(a0, a1, a2, a3, r);
        for (var m = 0u; m < M; m++) {
            red[m * WG + lid] = acc_m(a, m);
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
        if lid < M && row0 + r < p.rows {
            y[yo + lid * p.n + r] = red[lid * WG];
        }
        workgroupBarrier();
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

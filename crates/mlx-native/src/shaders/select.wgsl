// Row-wise selection over the last dimension of f32 x [rows, n]: argmax, top-k, argsort.
//
// Order: every kernel compares 32-bit keys (key_of) that order floats totally: NaN above
// +inf, -0 equal to +0; equal keys order by lowest column index. Pairs (key, index) are
// therefore distinct and every result is deterministic. x is read as u32 words so values
// travel bit-exactly. The sentinel (key 0, index 0xffffffff) pads chunks: it sorts after
// every real element (real keys are >= 0x007fffff, and an index never reaches 2^32-1).
//
// argmax_rows:    one workgroup per row.           0 x, 1 out_val, 2 out_idx.
// argmax_partial: one workgroup per (row, chunk):  0 x, 3 ck_out, 4 ci_out.
// argmax_merge:   one workgroup per row over the partial candidates: 0 x, 1, 2, 5 ck_in, 6 ci_in.
// topk_*: one workgroup per (row, chunk of SORT_N), bitonic sort of the chunk in workgroup
//   memory, the first k written either as candidates for another pass (3, 4) or as the result
//   (1 values, 2 indices). Sources: x (0) or candidates of an earlier pass (5, 6).
// argsort_rows: one workgroup per row of n <= SORT_N.  0 x, 2 out_idx.
// Longer rows: a bitonic network over the row padded to len = 2^m, keys and indices in
// scratch [rows, len] (3, 4): argsort_chunks sorts chunks of SORT_N in workgroup memory, then
// per block size: argsort_global_step for strides >= SORT_N (one invocation per pair), and
// argsort_merge (argsort_merge_final writes 2 out_idx) for the strides inside a chunk.
struct Params {
    rows: u32,
    // Elements per row of this pass's input (x: n; candidates: chunks * k of the last pass).
    len: u32,
    // Chunks per row in this pass.
    nch: u32,
    k: u32,
    // Row length of x (values are gathered from x by index).
    n: u32,
    // argsort: 1 for descending order.
    desc: u32,
    // Elements per chunk (argmax_partial).
    chunk: u32,
    // argsort_global_step / argsort_merge*: bitonic block size and compare distance.
    size: u32,
    stride: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
// Sort size: a power of two, the chunk length of topk_* and the row capacity of argsort.
override SORT_N: u32 = 64;

@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out_val: array<u32>;
@group(0) @binding(2) var<storage, read_write> out_idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> ck_out: array<u32>;
@group(0) @binding(4) var<storage, read_write> ci_out: array<u32>;
@group(0) @binding(5) var<storage, read> ck_in: array<u32>;
@group(0) @binding(6) var<storage, read> ci_in: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

const NO_INDEX: u32 = 0xffffffffu;

// Monotone map from f32 bits to u32: a < b as floats <=> key(a) < key(b). NaN (any payload or
// sign) is the largest key; -0 maps to +0.
fn key_of(bits: u32) -> u32 {
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return 0xffffffffu;
    }
    let c = select(bits, 0u, bits == 0x80000000u);
    return select(c | 0x80000000u, ~c, (c & 0x80000000u) != 0u);
}

// (ka, ia) ranks before (kb, ib): larger key, then lower index.
fn better(ka: u32, ia: u32, kb: u32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

// ---- argmax ------------------------------------------------------------------------------

var<workgroup> wk: array<u32, 256>;
var<workgroup> wi: array<u32, 256>;

fn reduce_init(sl: u32, si: u32, sc: u32) {
    sg_lane = sl;
    sg_index = si;
    sg_count = sc;
}

// The best (key, index) of the workgroup; every invocation receives it. Uniform control flow.
fn wg_best(k: u32, i: u32, lid: u32) -> vec2<u32> {
#if SUBGROUPS
    let m = subgroupMax(k);
    let mi = subgroupMin(select(NO_INDEX, i, k == m));
    if sg_lane == 0u {
        wk[sg_index] = m;
        wi[sg_index] = mi;
    }
    workgroupBarrier();
    var bk = wk[0];
    var bi = wi[0];
    for (var s = 1u; s < sg_count; s++) {
        if better(wk[s], wi[s], bk, bi) {
            bk = wk[s];
            bi = wi[s];
        }
    }
    workgroupBarrier();
    return vec2<u32>(bk, bi);
#else
    wk[lid] = k;
    wi[lid] = i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s && better(wk[lid + s], wi[lid + s], wk[lid], wi[lid]) {
            wk[lid] = wk[lid + s];
            wi[lid] = wi[lid + s];
        }
        workgroupBarrier();
    }
    let r = vec2<u32>(wk[0], wi[0]);
    workgroupBarrier();
    return r;
#endif
}

// Best of x[row, lo..hi), scanned with stride WG.
fn scan_x(row: u32, lo: u32, hi: u32, lid: u32) -> vec2<u32> {
    let xo = view(0u) + row * p.n;
    var bk = 0u;
    var bi = NO_INDEX;
    for (var i = lo + lid; i < hi; i += WG) {
        let k = key_of(x[xo + i]);
        // Each invocation visits increasing indices: a strictly larger key is needed.
        if k > bk || bi == NO_INDEX {
            bk = k;
            bi = i;
        }
    }
    return vec2<u32>(bk, bi);
}

fn write_result(row: u32, best: vec2<u32>, lid: u32) {
    if lid == 0u {
        out_idx[view(2u) + row] = best.y;
        out_val[view(1u) + row] = x[view(0u) + row * p.n + best.y];
    }
}

@compute @workgroup_size(WG)
fn argmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
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
    let t = scan_x(row, 0u, p.n, lid);
    write_result(row, wg_best(t.x, t.y, lid), lid);
}

@compute @workgroup_size(WG)
fn argmax_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
                  , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
                  @builtin(num_subgroups) sc: u32
#endif
) {
#if SUBGROUPS
    reduce_init(sl, si, sc);
#endif
    let g = flat_wg(wid, nwg);
    if g >= p.rows * p.nch {
        return;
    }
    let row = g / p.nch;
    let lo = (g % p.nch) * p.chunk;
    let t = scan_x(row, lo, min(p.n, lo + p.chunk), lid);
    let best = wg_best(t.x, t.y, lid);
    if lid == 0u {
        ck_out[view(3u) + g] = best.x;
        ci_out[view(4u) + g] = best.y;
    }
}

@compute @workgroup_size(WG)
fn argmax_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
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
    var bk = 0u;
    var bi = NO_INDEX;
    for (var c = lid; c < p.nch; c += WG) {
        let k = ck_in[view(5u) + row * p.nch + c];
        let i = ci_in[view(6u) + row * p.nch + c];
        if better(k, i, bk, bi) {
            bk = k;
            bi = i;
        }
    }
    write_result(row, wg_best(bk, bi, lid), lid);
}

// ---- bitonic sort in workgroup memory (top-k, argsort) -------------------------------------

var<workgroup> sk: array<u32, SORT_N>;
var<workgroup> sx: array<u32, SORT_N>;

// One compare-exchange stage of the bitonic network over the workgroup's SORT_N elements,
// which sit at global positions base.. of the sequence being sorted. Blocks with
// (position & size) == 0 run in `better` order, the others reversed. Uniform control flow.
fn bitonic_step(lid: u32, base: u32, size: u32, stride: u32) {
    for (var t = lid; t < SORT_N / 2u; t += WG) {
        let i = 2u * t - (t & (stride - 1u));
        let j = i + stride;
        let ki = sk[i];
        let kj = sk[j];
        let ii = sx[i];
        let ij = sx[j];
        if better(kj, ij, ki, ii) == (((base + i) & size) == 0u) {
            sk[i] = kj;
            sk[j] = ki;
            sx[i] = ij;
            sx[j] = ii;
        }
    }
    workgroupBarrier();
}

// Sort sk/sx (the chunk at global position `base`) after filling all SORT_N entries.
fn bitonic(lid: u32, base: u32) {
    workgroupBarrier();
    for (var size = 2u; size <= SORT_N; size <<= 1u) {
        for (var stride = size >> 1u; stride > 0u; stride >>= 1u) {
            bitonic_step(lid, base, size, stride);
        }
    }
}

// Fill the sort arrays from chunk `c` of x's row (elements c*SORT_N ..), padding with sentinels.
fn load_chunk_x(row: u32, c: u32, lid: u32) {
    let xo = view(0u) + row * p.n;
    for (var i = lid; i < SORT_N; i += WG) {
        let e = c * SORT_N + i;
        if e < p.len {
            sk[i] = key_of(x[xo + e]);
            sx[i] = e;
        } else {
            sk[i] = 0u;
            sx[i] = NO_INDEX;
        }
    }
}

// Same from candidates of an earlier pass: [rows, len] keys and column indices.
fn load_chunk_cand(row: u32, c: u32, lid: u32) {
    let o = row * p.len;
    for (var i = lid; i < SORT_N; i += WG) {
        let e = c * SORT_N + i;
        if e < p.len {
            sk[i] = ck_in[view(5u) + o + e];
            sx[i] = ci_in[view(6u) + o + e];
        } else {
            sk[i] = 0u;
            sx[i] = NO_INDEX;
        }
    }
}

// The first k sorted entries as candidates [rows, nch * k] for the next pass.
fn store_cand(row: u32, c: u32, lid: u32) {
    let o = (row * p.nch + c) * p.k;
    for (var i = lid; i < p.k; i += WG) {
        ck_out[view(3u) + o + i] = sk[i];
        ci_out[view(4u) + o + i] = sx[i];
    }
}

// The first k sorted entries as the result: values gathered from x, indices.
fn store_final(row: u32, lid: u32) {
    for (var i = lid; i < p.k; i += WG) {
        let col = sx[i];
        out_val[view(1u) + row * p.k + i] = x[view(0u) + row * p.n + col];
        out_idx[view(2u) + row * p.k + i] = col;
    }
}

@compute @workgroup_size(WG)
fn topk_x_cand(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    if g >= p.rows * p.nch {
        return;
    }
    load_chunk_x(g / p.nch, g % p.nch, lid);
    bitonic(lid, 0u);
    store_cand(g / p.nch, g % p.nch, lid);
}

@compute @workgroup_size(WG)
fn topk_cand_cand(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    if g >= p.rows * p.nch {
        return;
    }
    load_chunk_cand(g / p.nch, g % p.nch, lid);
    bitonic(lid, 0u);
    store_cand(g / p.nch, g % p.nch, lid);
}

@compute @workgroup_size(WG)
fn topk_x_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wid, nwg);
    if row >= p.rows {
        return;
    }
    load_chunk_x(row, 0u, lid);
    bitonic(lid, 0u);
    store_final(row, lid);
}

@compute @workgroup_size(WG)
fn topk_cand_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wid, nwg);
    if row >= p.rows {
        return;
    }
    load_chunk_cand(row, 0u, lid);
    bitonic(lid, 0u);
    store_final(row, lid);
}

@compute @workgroup_size(WG)
fn argsort_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wid, nwg);
    if row >= p.rows {
        return;
    }
    let xo = view(0u) + row * p.n;
    for (var i = lid; i < SORT_N; i += WG) {
        if i < p.n {
            let k = key_of(x[xo + i]);
            // Ascending: invert the key; the index tie-break stays lowest first (stable).
            sk[i] = select(~k, k, p.desc != 0u);
            sx[i] = i;
        } else {
            sk[i] = 0u;
            sx[i] = NO_INDEX;
        }
    }
    bitonic(lid, 0u);
    for (var i = lid; i < p.n; i += WG) {
        out_idx[view(2u) + row * p.n + i] = sx[i];
    }
}

// Load x's element e of a row as an argsort key (ascending: inverted), sentinel past n.
fn sort_key(xo: u32, e: u32) -> vec2<u32> {
    if e < p.n {
        let k = key_of(x[xo + e]);
        return vec2<u32>(select(~k, k, p.desc != 0u), e);
    }
    return vec2<u32>(0u, NO_INDEX);
}

@compute @workgroup_size(WG)
fn argsort_chunks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    if g >= p.rows * p.nch {
        return;
    }
    let row = g / p.nch;
    let base = (g % p.nch) * SORT_N;
    let xo = view(0u) + row * p.n;
    for (var i = lid; i < SORT_N; i += WG) {
        let v = sort_key(xo, base + i);
        sk[i] = v.x;
        sx[i] = v.y;
    }
    bitonic(lid, base);
    let o = row * p.len + base;
    for (var i = lid; i < SORT_N; i += WG) {
        ck_out[view(3u) + o + i] = sk[i];
        ci_out[view(4u) + o + i] = sx[i];
    }
}

@compute @workgroup_size(WG)
fn argsort_global_step(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let t_all = flat_wg(wid, nwg) * WG + lid;
    let half_len = p.len / 2u;
    if t_all >= p.rows * half_len {
        return;
    }
    let row = t_all / half_len;
    let t = t_all % half_len;
    let i = 2u * t - (t & (p.stride - 1u));
    let j = i + p.stride;
    let o = row * p.len;
    let ki = ck_out[view(3u) + o + i];
    let kj = ck_out[view(3u) + o + j];
    let ii = ci_out[view(4u) + o + i];
    let ij = ci_out[view(4u) + o + j];
    if better(kj, ij, ki, ii) == ((i & p.size) == 0u) {
        ck_out[view(3u) + o + i] = kj;
        ck_out[view(3u) + o + j] = ki;
        ci_out[view(4u) + o + i] = ij;
        ci_out[view(4u) + o + j] = ii;
    }
}

// The strides SORT_N/2 .. 1 of block size p.size for one chunk; returns the chunk's row.
fn merge_chunk(g: u32, lid: u32) -> u32 {
    let row = g / p.nch;
    let base = (g % p.nch) * SORT_N;
    let o = row * p.len + base;
    for (var i = lid; i < SORT_N; i += WG) {
        sk[i] = ck_out[view(3u) + o + i];
        sx[i] = ci_out[view(4u) + o + i];
    }
    workgroupBarrier();
    for (var stride = SORT_N / 2u; stride > 0u; stride >>= 1u) {
        bitonic_step(lid, base, p.size, stride);
    }
    return row;
}

@compute @workgroup_size(WG)
fn argsort_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    if g >= p.rows * p.nch {
        return;
    }
    let row = merge_chunk(g, lid);
    let o = row * p.len + (g % p.nch) * SORT_N;
    for (var i = lid; i < SORT_N; i += WG) {
        ck_out[view(3u) + o + i] = sk[i];
        ci_out[view(4u) + o + i] = sx[i];
    }
}

// The last merge: the first n sorted entries of the row are the result (sentinels sort last).
@compute @workgroup_size(WG)
fn argsort_merge_final(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wid, nwg);
    if g >= p.rows * p.nch {
        return;
    }
    let row = merge_chunk(g, lid);
    let base = (g % p.nch) * SORT_N;
    for (var i = lid; i < SORT_N; i += WG) {
        if base + i < p.n {
            out_idx[view(2u) + row * p.n + base + i] = sx[i];
        }
    }
}

enable f16;
enable wgpu_cooperative_matrix;
// sdpa_prefill_coop: the prefill of sdpa.wgsl on 16x16x16 f16 cooperative matrices with f32
// accumulation. One workgroup = one subgroup of WG invocations (the Rust side requires the
// device's subgroup size to be fixed and equal to WG) takes 16 (query, head) rows of one kv
// head and streams BN keys at a time:
//   Q (f16, in workgroup memory) x K tile -> S (f32) -> masked online softmax (scalar) ->
//   P (f16) -> O += P x V with O (f32) kept in workgroup memory and rescaled per tile.
// K/V tiles are staged as f16 in workgroup memory (ring wrap, tail zeros, f32 caches
// converted), so every cooperative load reads in-bounds, finite data.
//
// Layout convention (ARCHITECTURE.md "Kernels"): coopLoad/coopStore address element
// (r, c) of a tile at ptr[c * stride + r] (column-major). Hence:
//   q_sh  chunk dc (16 dims): q_sh[dc*256 + d*16 + row]    loads as Q  [row, d]  (A role)
//   kv_sh [key, D] row-major, stride D                      loads as K^T [d, key] (B role)
//                                                            and as V^T [d, key]  (A role)
//   s_sh  subtile kt: s_sh[kt*256 + key*16 + row]           stores S   [row, key]
//   p_sh  [row, BN] row-major, stride BN                     loads as P^T [key, row] (B role)
//   o_sh  [row, D] row-major, stride D                       is O^T [d, row] (C role)
// so S = Q K^T and O^T += V^T P^T.
// Offsets go through a `let` before `&arr[off]` (naga's SPIR-V backend needs it).
//
// Bindings as sdpa.wgsl: 0 q f32, 1 k cache, 2 v cache, 3 out f32, 5 sinks f32, 7 mask f32.
struct Params {
    n_heads: u32,
    kv_heads: u32,
    group: u32,
    slots: u32,
    kv_lo: u32,
    kv_hi: u32,
    split_len: u32,
    n_splits: u32,
    g_tiles: u32,
    tokens: u32,
    q0: u32,
    window: u32,
    causal: u32,
    has_mask: u32,
    mask_stride: u32,
    has_sinks: u32,
    scale: f32,
    softcap: f32,
    row_tiles: u32,
    _pad: u32,
}

override HEAD_DIM: u32 = 128u;
// Keys per tile: 64 (32 for head dim 256).
override BN: u32 = 64u;
override DC: u32 = HEAD_DIM / 16u;
override KC: u32 = BN / 16u;

const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(7) var<storage, read> mask: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(1) var<storage, read> kc: array<f32>;
@group(0) @binding(2) var<storage, read> vc: array<f32>;
#else
@group(0) @binding(1) var<storage, read> kc: array<f16>;
@group(0) @binding(2) var<storage, read> vc: array<f16>;
#endif

var<workgroup> q_sh: array<f16, 4096>;   // 16 x 256
var<workgroup> kv_sh: array<f16, 8192>;  // BN x HEAD_DIM (64 x 128 or 32 x 256)
var<workgroup> s_sh: array<f32, 1024>;   // 16 x BN
var<workgroup> p_sh: array<f16, 1024>;   // 16 x BN
var<workgroup> o_sh: array<f32, 4096>;   // 16 x HEAD_DIM
var<workgroup> alpha_sh: array<f32, 16>;
var<workgroup> red_sh: array<f32, 64>;

fn logit(dot_qk: f32) -> f32 {
    var s = dot_qk * p.scale;
    if p.softcap > 0.0 {
        s = p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0));
    }
    return s;
}

fn stage(is_v: bool, rowbase: u32, kt: u32, khi: u32, lid: u32) {
    for (var i = lid; i < BN * HEAD_DIM; i += WG) {
        let j = i / HEAD_DIM;
        let d = i % HEAD_DIM;
        let kp = kt + j;
        var v = f16(0.0);
        if kp < khi {
            let idx = (rowbase + kp % p.slots) * HEAD_DIM + d;
            if is_v {
                v = f16(vc[view(2u) + idx]);
            } else {
                v = f16(kc[view(1u) + idx]);
            }
        }
        kv_sh[i] = v;
    }
}

@compute @workgroup_size(WG)
fn sdpa_prefill_coop(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let wg = flat_wg(wid, nwg);
    let tile = wg % p.row_tiles;
    let kvh = wg / p.row_tiles;
    // Workgroups past the last kv head (grid folding) run no tile and write nothing: naga
    // requires control flow around cooperative-matrix ops to be free of early returns.
    let rows_total = select(0u, p.tokens * p.group, kvh < p.kv_heads);
    let row0 = tile * 16u;
    let row_end = max(min(row0 + 16u, rows_total), row0 + 1u);
    let t_min = row0 / p.group;
    let t_max = (row_end - 1u) / p.group;
    let kv_len = select(0u, p.q0 + p.tokens, rows_total > 0u);
    var khi = kv_len;
    if p.causal != 0u {
        khi = min(kv_len, p.q0 + t_max + 1u);
    }
    var klo = 0u;
    if p.window > 0u {
        klo = max(p.q0 + t_min + 1u, p.window) - p.window;
    }
    for (var i = lid; i < 16u * HEAD_DIM; i += WG) {
        let r = i / HEAD_DIM;
        let d = i % HEAD_DIM;
        let rg = row0 + r;
        var v = 0.0;
        if rg < rows_total {
            let h = kvh * p.group + rg % p.group;
            v = q[view(0u) + ((rg / p.group) * p.n_heads + h) * HEAD_DIM + d];
        }
        q_sh[(d / 16u) * 256u + (d % 16u) * 16u + r] = f16(v);
        o_sh[i] = 0.0;
    }
    // Softmax bookkeeping: invocation lid handles row lid % 16, keys of parity lid / 16
    // (WG = 32), or all keys of its row (WG = 16 would not fill a subgroup; not used).
    let r = lid % 16u;
    let part = lid / 16u;
    let halves = WG / 16u;
    let rg = row0 + r;
    let row_ok = rg < rows_total;
    let tq = rg / p.group;
    let h = kvh * p.group + rg % p.group;
    let qpos = p.q0 + tq;
    let rowbase = kvh * p.slots;
    var m = M_INIT;
    var lsum = 0.0;
    for (var kt = klo; kt < khi; kt += BN) {
        workgroupBarrier();
        stage(false, rowbase, kt, khi, lid);
        workgroupBarrier();
        for (var ks = 0u; ks < KC; ks++) {
            var acc = coop_mat16x16<f32, C>();
            for (var dc = 0u; dc < DC; dc++) {
                let qo = dc * 256u;
                let ko = ks * 16u * HEAD_DIM + dc * 16u;
                let a = coopLoad<coop_mat16x16<f16, A>>(&q_sh[qo], 16u);
                let b = coopLoad<coop_mat16x16<f16, B>>(&kv_sh[ko], HEAD_DIM);
                acc = coopMultiplyAdd(a, b, acc);
            }
            let so = ks * 256u;
            coopStore(acc, &s_sh[so], 16u);
        }
        workgroupBarrier();
        // Masked logits of this invocation's keys, kept in s_sh in place.
        var tmax = M_INIT;
        for (var j = part; j < BN; j += halves) {
            let kp = kt + j;
            var ok = row_ok && kp < khi;
            if p.causal != 0u {
                ok = ok && kp <= qpos;
            }
            if p.window > 0u {
                ok = ok && kp + p.window > qpos;
            }
            let si = (j / 16u) * 256u + (j % 16u) * 16u + r;
            var s = M_INIT;
            if ok {
                s = logit(s_sh[si]);
                if p.has_mask != 0u {
                    s += mask[view(7u) + tq * p.mask_stride + kp];
                }
                s = max(s, M_INIT);
            }
            s_sh[si] = s;
            tmax = max(tmax, s);
        }
        red_sh[lid] = tmax;
        workgroupBarrier();
        for (var i = 0u; i < halves; i++) {
            tmax = max(tmax, red_sh[i * 16u + r]);
        }
        let mn = max(m, tmax);
        let alpha = exp(m - mn);
        m = mn;
        lsum *= alpha;
        for (var j = part; j < BN; j += halves) {
            let s = s_sh[(j / 16u) * 256u + (j % 16u) * 16u + r];
            let pv = select(0.0, exp(s - mn), s > M_INIT);
            lsum += pv;
            p_sh[r * BN + j] = f16(pv);
        }
        if part == 0u {
            alpha_sh[r] = alpha;
        }
        // kv_sh was last read by the S loads, before the barrier above.
        stage(true, rowbase, kt, khi, lid);
        workgroupBarrier();
        for (var i = lid; i < 16u * HEAD_DIM; i += WG) {
            o_sh[i] *= alpha_sh[i / HEAD_DIM];
        }
        workgroupBarrier();
        for (var dc = 0u; dc < DC; dc++) {
            let oo = dc * 16u;
            var acc = coopLoad<coop_mat16x16<f32, C>>(&o_sh[oo], HEAD_DIM);
            for (var ks = 0u; ks < KC; ks++) {
                let vo = ks * 16u * HEAD_DIM + dc * 16u;
                let po = ks * 16u;
                let a = coopLoad<coop_mat16x16<f16, A>>(&kv_sh[vo], HEAD_DIM);
                let b = coopLoad<coop_mat16x16<f16, B>>(&p_sh[po], BN);
                acc = coopMultiplyAdd(a, b, acc);
            }
            coopStore(acc, &o_sh[oo], HEAD_DIM);
        }
    }
    workgroupBarrier();
    red_sh[lid] = lsum;
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < halves; i++) {
        total += red_sh[i * 16u + r];
    }
    var keep = 1.0;
    if p.has_sinks != 0u && row_ok {
        let sk = sinks[view(5u) + h];
        let mf = max(m, sk);
        keep = exp(m - mf);
        total = total * keep + exp(sk - mf);
    }
    let inv = select(0.0, keep / total, total > 0.0);
    // Each row's scale goes through workgroup memory to the invocations that write it.
    if part == 0u {
        alpha_sh[r] = select(0.0, inv, row_ok);
    }
    workgroupBarrier();
    for (var i = lid; i < 16u * HEAD_DIM; i += WG) {
        let rr = i / HEAD_DIM;
        let g_row = row0 + rr;
        if g_row < rows_total {
            let hh = kvh * p.group + g_row % p.group;
            out[view(3u) + ((g_row / p.group) * p.n_heads + hh) * HEAD_DIM + i % HEAD_DIM] =
                o_sh[i] * alpha_sh[rr];
        }
    }
}

// ---------------------------------------------------------------------------------------
// sdpa_prefill_coop4: the same attention with four subgroups per workgroup (WG = 128, head
// dims up to 128). A workgroup takes 64 (query, head) rows of one kv head (16 per
// subgroup) and streams 64 keys at a time; each K or V tile is staged once for the four
// subgroups, with 8- or 16-byte loads. Per subgroup: Q's fragments stay in registers
// (loaded once), S = Q K^T goes through workgroup memory to the softmax lanes (lane l: row
// l % 16, every other key), P (f16) back to workgroup memory, and O^T += V^T P^T
// accumulates in cooperative-matrix registers, never stored until the end.
// The running maximum is raised lazily: a row's exponentials use a maximum m that is
// replaced only when a tile's maximum exceeds it by more than LAZY (so P <= e^LAZY, well
// inside f16), and only then is O rescaled (through workgroup memory, for the whole
// workgroup when any row needs it). After the first tile this is rare.
const ST4: u32 = 136u; // row stride of the staged tiles (halves): 128 + 8, spreads the banks
const PS4: u32 = 72u;  // row stride of P (halves): 64 + 8
const LAZY: f32 = 8.0;

#if DT_F32
@group(0) @binding(1) var<storage, read> kc4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vc4: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> kc4: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> vc4: array<vec4<f16>>;
#endif

var<workgroup> kv4: array<f16, 8704>;  // Q, then K or V: [64][ST4]
var<workgroup> s4: array<f32, 4096>;   // per subgroup: S as 4 column-major 16x16 tiles
var<workgroup> p4: array<f16, 4608>;   // per subgroup: P [16][PS4]
var<workgroup> need4: array<u32, 4>;

// Vector e of the K or V tile at keys kt..: key e / (HEAD_DIM / 4), 4 dims; 0 past khi.
fn kv_vec4(is_v: bool, rowbase: u32, kt: u32, khi: u32, e: u32) -> vec4<f16> {
    let per_row = HEAD_DIM / 4u;
    let kp = kt + e / per_row;
    var v = vec4<f16>(0.0);
    if kp < khi {
        let idx = (rowbase + kp % p.slots) * per_row + e % per_row;
        if is_v {
            v = vec4<f16>(vc4[view(2u) / 4u + idx]);
        } else {
            v = vec4<f16>(kc4[view(1u) / 4u + idx]);
        }
    }
    return v;
}

fn put_vec4(e: u32, v: vec4<f16>) {
    let per_row = HEAD_DIM / 4u;
    let o = (e / per_row) * ST4 + (e % per_row) * 4u;
    kv4[o] = v.x;
    kv4[o + 1u] = v.y;
    kv4[o + 2u] = v.z;
    kv4[o + 3u] = v.w;
}

// Keys kt.. of the cache (K or V) into kv4 as [key][ST4] f16; zeros past khi. Each
// invocation takes HEAD_DIM / 8 vectors (64 keys x HEAD_DIM / 4 over WG = 128), written
// out: every load is issued before the first store, so the tile costs one memory latency,
// not one per loop trip.
fn stage4(is_v: bool, rowbase: u32, kt: u32, khi: u32, lid: u32) {
    let n = HEAD_DIM / 8u;
    var v0 = vec4<f16>(0.0);
    if n > 0u {
        v0 = kv_vec4(is_v, rowbase, kt, khi, lid + 0u * WG);
    }
    var v1 = vec4<f16>(0.0);
    if n > 1u {
        v1 = kv_vec4(is_v, rowbase, kt, khi, lid + 1u * WG);
    }
    var v2 = vec4<f16>(0.0);
    if n > 2u {
        v2 = kv_vec4(is_v, rowbase, kt, khi, lid + 2u * WG);
    }
    var v3 = vec4<f16>(0.0);
    if n > 3u {
        v3 = kv_vec4(is_v, rowbase, kt, khi, lid + 3u * WG);
    }
    var v4 = vec4<f16>(0.0);
    if n > 4u {
        v4 = kv_vec4(is_v, rowbase, kt, khi, lid + 4u * WG);
    }
    var v5 = vec4<f16>(0.0);
    if n > 5u {
        v5 = kv_vec4(is_v, rowbase, kt, khi, lid + 5u * WG);
    }
    var v6 = vec4<f16>(0.0);
    if n > 6u {
        v6 = kv_vec4(is_v, rowbase, kt, khi, lid + 6u * WG);
    }
    var v7 = vec4<f16>(0.0);
    if n > 7u {
        v7 = kv_vec4(is_v, rowbase, kt, khi, lid + 7u * WG);
    }
    var v8 = vec4<f16>(0.0);
    if n > 8u {
        v8 = kv_vec4(is_v, rowbase, kt, khi, lid + 8u * WG);
    }
    var v9 = vec4<f16>(0.0);
    if n > 9u {
        v9 = kv_vec4(is_v, rowbase, kt, khi, lid + 9u * WG);
    }
    var v10 = vec4<f16>(0.0);
    if n > 10u {
        v10 = kv_vec4(is_v, rowbase, kt, khi, lid + 10u * WG);
    }
    var v11 = vec4<f16>(0.0);
    if n > 11u {
        v11 = kv_vec4(is_v, rowbase, kt, khi, lid + 11u * WG);
    }
    var v12 = vec4<f16>(0.0);
    if n > 12u {
        v12 = kv_vec4(is_v, rowbase, kt, khi, lid + 12u * WG);
    }
    var v13 = vec4<f16>(0.0);
    if n > 13u {
        v13 = kv_vec4(is_v, rowbase, kt, khi, lid + 13u * WG);
    }
    var v14 = vec4<f16>(0.0);
    if n > 14u {
        v14 = kv_vec4(is_v, rowbase, kt, khi, lid + 14u * WG);
    }
    var v15 = vec4<f16>(0.0);
    if n > 15u {
        v15 = kv_vec4(is_v, rowbase, kt, khi, lid + 15u * WG);
    }
    if n > 0u {
        put_vec4(lid + 0u * WG, v0);
    }
    if n > 1u {
        put_vec4(lid + 1u * WG, v1);
    }
    if n > 2u {
        put_vec4(lid + 2u * WG, v2);
    }
    if n > 3u {
        put_vec4(lid + 3u * WG, v3);
    }
    if n > 4u {
        put_vec4(lid + 4u * WG, v4);
    }
    if n > 5u {
        put_vec4(lid + 5u * WG, v5);
    }
    if n > 6u {
        put_vec4(lid + 6u * WG, v6);
    }
    if n > 7u {
        put_vec4(lid + 7u * WG, v7);
    }
    if n > 8u {
        put_vec4(lid + 8u * WG, v8);
    }
    if n > 9u {
        put_vec4(lid + 9u * WG, v9);
    }
    if n > 10u {
        put_vec4(lid + 10u * WG, v10);
    }
    if n > 11u {
        put_vec4(lid + 11u * WG, v11);
    }
    if n > 12u {
        put_vec4(lid + 12u * WG, v12);
    }
    if n > 13u {
        put_vec4(lid + 13u * WG, v13);
    }
    if n > 14u {
        put_vec4(lid + 14u * WG, v14);
    }
    if n > 15u {
        put_vec4(lid + 15u * WG, v15);
    }
}

// Scale the rows of the O^T tile (column-major [d, row]) staged at s4[sb..] by each row's
// alpha (row c's on lane c), between barriers (the tile was just stored; it is loaded back).
fn rescale_rows(sb: u32, lane: u32, alpha: f32) {
    workgroupBarrier();
    for (var i = 0u; i < 8u; i++) {
        let e = lane + 32u * i;
        s4[sb + e] *= subgroupShuffle(alpha, e / 16u);
    }
    workgroupBarrier();
}

// Write the O^T tile t (dims 16t..) staged at s4[sb..] for rows r0.. (of rows_total) of kv
// head kvh, times each row's 1/sum (row c's on lane c).
fn write_rows(sb: u32, lane: u32, inv: f32, r0: u32, rows_total: u32, kvh: u32, t: u32) {
    workgroupBarrier();
    for (var i = 0u; i < 8u; i++) {
        let e = lane + 32u * i;
        let c = e / 16u;
        let sc = subgroupShuffle(inv, c);
        let g_row = r0 + c;
        if g_row < rows_total {
            let hh = kvh * p.group + g_row % p.group;
            out[view(3u) + ((g_row / p.group) * p.n_heads + hh) * HEAD_DIM + t * 16u + e % 16u] =
                s4[sb + e] * sc;
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn sdpa_prefill_coop4(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32,
                      @builtin(subgroup_id) sg: u32,
                      @builtin(subgroup_invocation_id) lane: u32) {
    let wg = flat_wg(wid, nwg);
    let tile = wg % p.row_tiles;
    let kvh = wg / p.row_tiles;
    // Workgroups past the last kv head (grid folding) run no tile and write nothing.
    let rows_total = select(0u, p.tokens * p.group, kvh < p.kv_heads);
    let row0 = tile * 64u;
    let row_end = max(min(row0 + 64u, rows_total), row0 + 1u);
    let t_min = row0 / p.group;
    let t_max = (row_end - 1u) / p.group;
    let kv_len = select(0u, p.q0 + p.tokens, rows_total > 0u);
    var khi = kv_len;
    if p.causal != 0u {
        khi = min(kv_len, p.q0 + t_max + 1u);
    }
    var klo = 0u;
    if p.window > 0u {
        klo = max(p.q0 + t_min + 1u, p.window) - p.window;
    }
    // Q rows [64][HEAD_DIM] into kv4, row-major.
    for (var i = lid; i < 64u * HEAD_DIM; i += WG) {
        let r = i / HEAD_DIM;
        let d = i % HEAD_DIM;
        let rg = row0 + r;
        var v = 0.0;
        if rg < rows_total {
            let h = kvh * p.group + rg % p.group;
            v = q[view(0u) + ((rg / p.group) * p.n_heads + h) * HEAD_DIM + d];
        }
        kv4[r * ST4 + d] = f16(v);
    }
    workgroupBarrier();
    let qb = sg * 16u * ST4;
    let q0o = qb;
    let q1o = qb + 16u;
    let q2o = qb + 32u;
    let q3o = qb + 48u;
    let q4o = qb + 64u;
    let q5o = qb + 80u;
    let q6o = qb + 96u;
    let q7o = qb + 112u;
    // Fragments past HEAD_DIM read the staged tile's padding or the next rows: never used.
    let qf0 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q0o], ST4);
    let qf1 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q1o], ST4);
    let qf2 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q2o], ST4);
    let qf3 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q3o], ST4);
    let qf4 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q4o], ST4);
    let qf5 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q5o], ST4);
    let qf6 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q6o], ST4);
    let qf7 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q7o], ST4);
    var o0 = coop_mat16x16<f32, C>();
    var o1 = coop_mat16x16<f32, C>();
    var o2 = coop_mat16x16<f32, C>();
    var o3 = coop_mat16x16<f32, C>();
    var o4 = coop_mat16x16<f32, C>();
    var o5 = coop_mat16x16<f32, C>();
    var o6 = coop_mat16x16<f32, C>();
    var o7 = coop_mat16x16<f32, C>();

    let r = lane % 16u;
    let part = lane / 16u;
    let rg = row0 + sg * 16u + r;
    let row_ok = rg < rows_total;
    let tq = rg / p.group;
    let h = kvh * p.group + rg % p.group;
    let qpos = p.q0 + tq;
    let rowbase = kvh * p.slots;
    let sb = sg * 1024u;
    let pb = sg * 16u * PS4;
    var m = M_INIT;
    var lsum = 0.0;
    for (var kt = klo; kt < khi; kt += 64u) {
        workgroupBarrier();
        stage4(false, rowbase, kt, khi, lid);
        workgroupBarrier();
        // S = Q K^T, 16 keys at a time: K^T [d, key] is kv4 read column-major.
        for (var ks = 0u; ks < 4u; ks++) {
            let kb = ks * 16u * ST4;
            var acc = coop_mat16x16<f32, C>();
            let k0o = kb;
            acc = coopMultiplyAdd(qf0, coopLoad<coop_mat16x16<f16, B>>(&kv4[k0o], ST4), acc);
            if HEAD_DIM > 16u {
                let k1o = kb + 16u;
                acc = coopMultiplyAdd(qf1, coopLoad<coop_mat16x16<f16, B>>(&kv4[k1o], ST4), acc);
            }
            if HEAD_DIM > 32u {
                let k2o = kb + 32u;
                acc = coopMultiplyAdd(qf2, coopLoad<coop_mat16x16<f16, B>>(&kv4[k2o], ST4), acc);
            }
            if HEAD_DIM > 48u {
                let k3o = kb + 48u;
                acc = coopMultiplyAdd(qf3, coopLoad<coop_mat16x16<f16, B>>(&kv4[k3o], ST4), acc);
            }
            if HEAD_DIM > 64u {
                let k4o = kb + 64u;
                acc = coopMultiplyAdd(qf4, coopLoad<coop_mat16x16<f16, B>>(&kv4[k4o], ST4), acc);
            }
            if HEAD_DIM > 80u {
                let k5o = kb + 80u;
                acc = coopMultiplyAdd(qf5, coopLoad<coop_mat16x16<f16, B>>(&kv4[k5o], ST4), acc);
            }
            if HEAD_DIM > 96u {
                let k6o = kb + 96u;
                acc = coopMultiplyAdd(qf6, coopLoad<coop_mat16x16<f16, B>>(&kv4[k6o], ST4), acc);
            }
            if HEAD_DIM > 112u {
                let k7o = kb + 112u;
                acc = coopMultiplyAdd(qf7, coopLoad<coop_mat16x16<f16, B>>(&kv4[k7o], ST4), acc);
            }
            let so = sb + ks * 256u;
            coopStore(acc, &s4[so], 16u);
        }
        workgroupBarrier();
        // Masked logits of this lane's keys (j = part, part + 2, ...), kept in s4.
        var tmax = M_INIT;
        for (var j = part; j < 64u; j += 2u) {
            let kp = kt + j;
            var ok = row_ok && kp < khi;
            if p.causal != 0u {
                ok = ok && kp <= qpos;
            }
            if p.window > 0u {
                ok = ok && kp + p.window > qpos;
            }
            let si = sb + (j / 16u) * 256u + (j % 16u) * 16u + r;
            var s = M_INIT;
            if ok {
                s = logit(s4[si]);
                if p.has_mask != 0u {
                    s += mask[view(7u) + tq * p.mask_stride + kp];
                }
                s = max(s, M_INIT);
            }
            s4[si] = s;
            tmax = max(tmax, s);
        }
        tmax = max(tmax, subgroupShuffleXor(tmax, 16u));
        // First keys of a row: take their maximum (O and lsum are still 0). Later: keep m
        // unless this tile exceeds it by more than LAZY, then rescale.
        let raise = tmax > m + LAZY;
        let mn = select(m, tmax, m == M_INIT || raise);
        let alpha = select(1.0, exp(m - mn), m > M_INIT && raise);
        m = mn;
        lsum *= alpha;
        for (var j = part; j < 64u; j += 2u) {
            let s = s4[sb + (j / 16u) * 256u + (j % 16u) * 16u + r];
            let pv = select(0.0, exp(s - mn), s > M_INIT);
            lsum += pv;
            p4[pb + r * PS4 + j] = f16(pv);
        }
        let any_raise = subgroupAny(alpha != 1.0);
        if lane == 0u {
            need4[sg] = u32(any_raise);
        }
        // (A barrier: every subgroup is done with K and with s4's logits.)
        let nf = workgroupUniformLoad(&need4);
        stage4(true, rowbase, kt, khi, lid);
        if (nf[0] | nf[1] | nf[2] | nf[3]) != 0u {
            // Rescale O^T [d, row] by each row's alpha, one 16x16 tile at a time through
            // this subgroup's s4 (alpha of row c is on lane c).
            if HEAD_DIM > 0u {
                coopStore(o0, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o0 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 16u {
                coopStore(o1, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o1 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 32u {
                coopStore(o2, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o2 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 48u {
                coopStore(o3, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o3 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 64u {
                coopStore(o4, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o4 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 80u {
                coopStore(o5, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o5 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 96u {
                coopStore(o6, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o6 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if HEAD_DIM > 112u {
                coopStore(o7, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o7 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
        }
        workgroupBarrier();
        // O^T += V^T P^T: V^T [d, key] is kv4 read column-major, P^T [key, row] is p4.
        for (var ks = 0u; ks < 4u; ks++) {
            let vb = ks * 16u * ST4;
            let po = pb + ks * 16u;
            let pf = coopLoad<coop_mat16x16<f16, B>>(&p4[po], PS4);
            let v0o = vb;
            o0 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v0o], ST4), pf, o0);
            if HEAD_DIM > 16u {
                let v1o = vb + 16u;
                o1 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v1o], ST4), pf, o1);
            }
            if HEAD_DIM > 32u {
                let v2o = vb + 32u;
                o2 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v2o], ST4), pf, o2);
            }
            if HEAD_DIM > 48u {
                let v3o = vb + 48u;
                o3 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v3o], ST4), pf, o3);
            }
            if HEAD_DIM > 64u {
                let v4o = vb + 64u;
                o4 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v4o], ST4), pf, o4);
            }
            if HEAD_DIM > 80u {
                let v5o = vb + 80u;
                o5 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v5o], ST4), pf, o5);
            }
            if HEAD_DIM > 96u {
                let v6o = vb + 96u;
                o6 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v6o], ST4), pf, o6);
            }
            if HEAD_DIM > 112u {
                let v7o = vb + 112u;
                o7 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v7o], ST4), pf, o7);
            }
        }
    }
    var total = lsum + subgroupShuffleXor(lsum, 16u);
    var keep = 1.0;
    if p.has_sinks != 0u && row_ok {
        let sk = sinks[view(5u) + h];
        let mf = max(m, sk);
        keep = exp(m - mf);
        total = total * keep + exp(sk - mf);
    }
    let inv = select(0.0, keep / total, total > 0.0 && row_ok);
    // O^T tiles to out, 16 dims at a time through s4; row c's 1/sum is on lane c.
    workgroupBarrier();
    if HEAD_DIM > 0u {
        coopStore(o0, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 0u);
    }
    if HEAD_DIM > 16u {
        coopStore(o1, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 1u);
    }
    if HEAD_DIM > 32u {
        coopStore(o2, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 2u);
    }
    if HEAD_DIM > 48u {
        coopStore(o3, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 3u);
    }
    if HEAD_DIM > 64u {
        coopStore(o4, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 4u);
    }
    if HEAD_DIM > 80u {
        coopStore(o5, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 5u);
    }
    if HEAD_DIM > 96u {
        coopStore(o6, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 6u);
    }
    if HEAD_DIM > 112u {
        coopStore(o7, &s4[sb], 16u);
        write_rows(sb, lane, inv, row0 + sg * 16u, rows_total, kvh, 7u);
    }
}

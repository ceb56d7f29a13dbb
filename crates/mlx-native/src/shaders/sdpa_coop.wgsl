enable f16;
enable wgpu_cooperative_matrix;
// sdpa_prefill_coop4: the prefill of sdpa.wgsl on 16x16x16 f16 cooperative matrices with
// f32 accumulation, four subgroups per workgroup (the Rust side requires the device's
// subgroup size to be fixed at 32); the design is described above the entry point.
// K/V tiles are staged as f16 in workgroup memory (ring wrap, tail zeros, f32 caches
// converted), so every cooperative load reads in-bounds, finite data.
//
// Layout convention (ARCHITECTURE.md "Kernels"): coopLoad/coopStore address element
// (r, c) of a tile at ptr[c * stride + r] (column-major; coopLoadT row-major). Hence:
//   Q     [row, d] row-major, stride ST4                 loads (T) as Q [row, d]  (A role)
//   K, V  [key, d] row-major, stride ST4                 loads as K^T [d, key]    (B role)
//                                                         and as V^T [d, key]     (A role)
//   s4    subtile kt: s4[kt*256 + key*16 + row]          stores S [row, key]
//   p4    [row, key] row-major, stride PS4               loads as P^T [key, row]  (B role)
//   O^T   [d, row] accumulators (C role), stored only to be rescaled or written out
// so S = Q K^T and O^T += V^T P^T.
// Offsets go through a `let` before `&arr[off]` (naga's SPIR-V backend needs it), and no
// cooperative operation sits under a `switch` (naga's uniformity analysis rejects it).
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

const M_INIT: f32 = -3.0e38;

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> sinks: array<f32>;
@group(0) @binding(7) var<storage, read> mask: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

fn logit(dot_qk: f32) -> f32 {
    var s = dot_qk * p.scale;
    if p.softcap > 0.0 {
        s = p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0));
    }
    return s;
}

// ---------------------------------------------------------------------------------------
// sdpa_prefill_coop4 (WG = 128: four subgroups). A workgroup takes ROWS4 (query, head) rows of one kv head, 16 per row group, and streams
// BN4 keys at a time; each K or V tile is staged once for the four subgroups, with 8- or
// 16-byte loads. SPLIT (1 or 2, the host's choice by head dim) subgroups share a row group,
// each owning DH = HEAD_DIM / SPLIT dims: head dims up to 128 take one (64 rows, 64 keys a
// tile), 256 two (32 rows, 32 keys), so Q's fragments and O's accumulators (DH / 16 each)
// stay in cooperative-matrix registers. Per subgroup: S over its dims, through workgroup
// memory to the softmax lanes (lane l: row l % 16, every other key), which add the row
// group's SPLIT partial sums; P (f16) back to workgroup memory; O^T += V^T P^T over its dims.
// The running maximum is raised lazily: a row's exponentials use a maximum m that is
// replaced only when a tile's maximum exceeds it by more than LAZY (so P <= e^LAZY, well
// inside f16), and only then is O rescaled (through workgroup memory, for the whole
// workgroup when any row needs it). After the first tile this is rare.
override SPLIT: u32 = 1u;
override DH: u32 = HEAD_DIM / SPLIT;
override BN4: u32 = 64u / SPLIT;
override ROWS4: u32 = 64u / SPLIT;
// Row strides (halves) of the staged tiles and of P: 8 past the row, to spread the banks.
override ST4: u32 = HEAD_DIM + 8u;
override PS4: u32 = BN4 + 8u;
const LAZY: f32 = 8.0;

#if DT_F32
@group(0) @binding(1) var<storage, read> kc4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vc4: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> kc4: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> vc4: array<vec4<f16>>;
#endif

var<workgroup> kv4: array<f16, 8704>;  // Q, then K or V: [ROWS4 or BN4][ST4] (<= 64 x 136, 32 x 264)
var<workgroup> s4: array<f32, 4096>;   // per subgroup: S as BN4 / 16 column-major 16x16 tiles
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

// Keys kt.. of the cache (K or V) into kv4 as [key][ST4] f16; zeros past khi. (Writing out
// the invocation's 8-16 loads ahead of its stores was measured: no faster on an H200.)
fn stage4(is_v: bool, rowbase: u32, kt: u32, khi: u32, lid: u32) {
    for (var e = lid; e < BN4 * HEAD_DIM / 4u; e += WG) {
        put_vec4(e, kv_vec4(is_v, rowbase, kt, khi, e));
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

// Write the O^T tile of dims d.. staged at s4[sb..] for rows r0.. (of rows_total) of kv head
// kvh, times each row's 1/sum (row c's on lane c).
fn write_rows(sb: u32, lane: u32, inv: f32, r0: u32, rows_total: u32, kvh: u32, d: u32) {
    workgroupBarrier();
    for (var i = 0u; i < 8u; i++) {
        let e = lane + 32u * i;
        let c = e / 16u;
        let sc = subgroupShuffle(inv, c);
        let g_row = r0 + c;
        if g_row < rows_total {
            let hh = kvh * p.group + g_row % p.group;
            out[view(3u) + ((g_row / p.group) * p.n_heads + hh) * HEAD_DIM + d + e % 16u] =
                s4[sb + e] * sc;
        }
    }
    workgroupBarrier();
}

// Row r's logit for key j of the tile at kt: the row group's SPLIT partial dot products
// (in s4 from sb0 on, 1024 floats apart), scaled, soft-capped and masked (M_INIT if masked).
fn logit4(sb0: u32, r: u32, j: u32, kt: u32, khi: u32, row_ok: bool, qpos: u32, tq: u32) -> f32 {
    let kp = kt + j;
    var ok = row_ok && kp < khi;
    if p.causal != 0u {
        ok = ok && kp <= qpos;
    }
    if p.window > 0u {
        ok = ok && kp + p.window > qpos;
    }
    var s = M_INIT;
    if ok {
        let si = (j / 16u) * 256u + (j % 16u) * 16u + r;
        var raw = s4[sb0 + si];
        if SPLIT > 1u {
            raw += s4[sb0 + 1024u + si];
        }
        s = logit(raw);
        if p.has_mask != 0u {
            s += mask[view(7u) + tq * p.mask_stride + kp];
        }
        s = max(s, M_INIT);
    }
    return s;
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
    let row0 = tile * ROWS4;
    let row_end = max(min(row0 + ROWS4, rows_total), row0 + 1u);
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
    // Q rows [ROWS4][HEAD_DIM] into kv4, row-major.
    for (var i = lid; i < ROWS4 * HEAD_DIM; i += WG) {
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
    // Row group (16 rows) and dims (DH from d0) of this subgroup.
    let rgp = sg / SPLIT;
    let d0 = (sg % SPLIT) * DH;
    let qb = rgp * 16u * ST4 + d0;
    // Fragments past DH read other dims or padding: never used.
    let q0o = qb + 0u;
    let qf0 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q0o], ST4);
    let q1o = qb + 16u;
    let qf1 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q1o], ST4);
    let q2o = qb + 32u;
    let qf2 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q2o], ST4);
    let q3o = qb + 48u;
    let qf3 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q3o], ST4);
    let q4o = qb + 64u;
    let qf4 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q4o], ST4);
    let q5o = qb + 80u;
    let qf5 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q5o], ST4);
    let q6o = qb + 96u;
    let qf6 = coopLoadT<coop_mat16x16<f16, A>>(&kv4[q6o], ST4);
    let q7o = qb + 112u;
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
    let rg = row0 + rgp * 16u + r;
    let row_ok = rg < rows_total;
    let tq = rg / p.group;
    let h = kvh * p.group + rg % p.group;
    let qpos = p.q0 + tq;
    let rowbase = kvh * p.slots;
    let sb = sg * 1024u;
    let sb0 = rgp * SPLIT * 1024u;
    let pb = sg * 16u * PS4;
    var m = M_INIT;
    var lsum = 0.0;
    for (var kt = klo; kt < khi; kt += BN4) {
        workgroupBarrier();
        stage4(false, rowbase, kt, khi, lid);
        workgroupBarrier();
        // Partial S = Q K^T over this subgroup's dims, 16 keys at a time: K^T [d, key] is
        // kv4 read column-major.
        for (var ks = 0u; ks < BN4 / 16u; ks++) {
            let kb = ks * 16u * ST4 + d0;
            var acc = coop_mat16x16<f32, C>();
            if DH > 0u {
                let k0o = kb + 0u;
                acc = coopMultiplyAdd(qf0, coopLoad<coop_mat16x16<f16, B>>(&kv4[k0o], ST4), acc);
            }
            if DH > 16u {
                let k1o = kb + 16u;
                acc = coopMultiplyAdd(qf1, coopLoad<coop_mat16x16<f16, B>>(&kv4[k1o], ST4), acc);
            }
            if DH > 32u {
                let k2o = kb + 32u;
                acc = coopMultiplyAdd(qf2, coopLoad<coop_mat16x16<f16, B>>(&kv4[k2o], ST4), acc);
            }
            if DH > 48u {
                let k3o = kb + 48u;
                acc = coopMultiplyAdd(qf3, coopLoad<coop_mat16x16<f16, B>>(&kv4[k3o], ST4), acc);
            }
            if DH > 64u {
                let k4o = kb + 64u;
                acc = coopMultiplyAdd(qf4, coopLoad<coop_mat16x16<f16, B>>(&kv4[k4o], ST4), acc);
            }
            if DH > 80u {
                let k5o = kb + 80u;
                acc = coopMultiplyAdd(qf5, coopLoad<coop_mat16x16<f16, B>>(&kv4[k5o], ST4), acc);
            }
            if DH > 96u {
                let k6o = kb + 96u;
                acc = coopMultiplyAdd(qf6, coopLoad<coop_mat16x16<f16, B>>(&kv4[k6o], ST4), acc);
            }
            if DH > 112u {
                let k7o = kb + 112u;
                acc = coopMultiplyAdd(qf7, coopLoad<coop_mat16x16<f16, B>>(&kv4[k7o], ST4), acc);
            }
            let so = sb + ks * 256u;
            coopStore(acc, &s4[so], 16u);
        }
        workgroupBarrier();
        // This lane's keys j = part, part + 2, ...: the tile's maximum, then the lazy update.
        var tmax = M_INIT;
        for (var j = part; j < BN4; j += 2u) {
            tmax = max(tmax, logit4(sb0, r, j, kt, khi, row_ok, qpos, tq));
        }
        tmax = max(tmax, subgroupShuffleXor(tmax, 16u));
        // First keys of a row: take their maximum (O and lsum are still 0). Later: keep m
        // unless this tile exceeds it by more than LAZY, then rescale.
        let raise = tmax > m + LAZY;
        let mn = select(m, tmax, m == M_INIT || raise);
        let alpha = select(1.0, exp(m - mn), m > M_INIT && raise);
        m = mn;
        lsum *= alpha;
        for (var j = part; j < BN4; j += 2u) {
            let s = logit4(sb0, r, j, kt, khi, row_ok, qpos, tq);
            let pv = select(0.0, exp(s - mn), s > M_INIT);
            lsum += pv;
            p4[pb + r * PS4 + j] = f16(pv);
        }
        let any_raise = subgroupAny(alpha != 1.0);
        if lane == 0u {
            need4[sg] = u32(any_raise);
        }
        // (A barrier: every subgroup is done with K and with s4's partial sums.)
        let nf = workgroupUniformLoad(&need4);
        stage4(true, rowbase, kt, khi, lid);
        if (nf[0] | nf[1] | nf[2] | nf[3]) != 0u {
            // Rescale O^T [d, row] by each row's alpha, one 16x16 tile at a time through
            // this subgroup's s4 (alpha of row c is on lane c).
            if DH > 0u {
                coopStore(o0, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o0 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 16u {
                coopStore(o1, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o1 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 32u {
                coopStore(o2, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o2 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 48u {
                coopStore(o3, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o3 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 64u {
                coopStore(o4, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o4 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 80u {
                coopStore(o5, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o5 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 96u {
                coopStore(o6, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o6 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
            if DH > 112u {
                coopStore(o7, &s4[sb], 16u);
                rescale_rows(sb, lane, alpha);
                o7 = coopLoad<coop_mat16x16<f32, C>>(&s4[sb], 16u);
            }
        }
        workgroupBarrier();
        // O^T += V^T P^T: V^T [d, key] is kv4 read column-major, P^T [key, row] is p4.
        for (var ks = 0u; ks < BN4 / 16u; ks++) {
            let vb = ks * 16u * ST4 + d0;
            let po = pb + ks * 16u;
            let pf = coopLoad<coop_mat16x16<f16, B>>(&p4[po], PS4);
            if DH > 0u {
                let v0o = vb + 0u;
                o0 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v0o], ST4), pf, o0);
            }
            if DH > 16u {
                let v1o = vb + 16u;
                o1 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v1o], ST4), pf, o1);
            }
            if DH > 32u {
                let v2o = vb + 32u;
                o2 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v2o], ST4), pf, o2);
            }
            if DH > 48u {
                let v3o = vb + 48u;
                o3 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v3o], ST4), pf, o3);
            }
            if DH > 64u {
                let v4o = vb + 64u;
                o4 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v4o], ST4), pf, o4);
            }
            if DH > 80u {
                let v5o = vb + 80u;
                o5 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v5o], ST4), pf, o5);
            }
            if DH > 96u {
                let v6o = vb + 96u;
                o6 = coopMultiplyAdd(coopLoad<coop_mat16x16<f16, A>>(&kv4[v6o], ST4), pf, o6);
            }
            if DH > 112u {
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
    let r0 = row0 + rgp * 16u;
    workgroupBarrier();
    if DH > 0u {
        coopStore(o0, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 0u);
    }
    if DH > 16u {
        coopStore(o1, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 16u);
    }
    if DH > 32u {
        coopStore(o2, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 32u);
    }
    if DH > 48u {
        coopStore(o3, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 48u);
    }
    if DH > 64u {
        coopStore(o4, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 64u);
    }
    if DH > 80u {
        coopStore(o5, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 80u);
    }
    if DH > 96u {
        coopStore(o6, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 96u);
    }
    if DH > 112u {
        coopStore(o7, &s4[sb], 16u);
        write_rows(sb, lane, inv, r0, rows_total, kvh, d0 + 112u);
    }
}

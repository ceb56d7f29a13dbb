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

// Cooperative-matrix (tensor core) matmul y[M, N] = x[M, K] · Wᵀ, f16 inputs, f32
// accumulation, for quantized W (qmm_coop*, common/quant.wgsl) and dense W (matmul_coop*).
// Compiled only on adapters with EXPERIMENTAL_COOPERATIVE_MATRIX and SHADER_F16.
//
// A workgroup is 4 subgroups (WG = 4 x the subgroup size, which the host requires to be
// fixed) and owns a (4T) x (4T) block of y; subgroup s owns the 2T x 2T sub-block
// (s / 2, s % 2) as 2 x 2 tiles of T x T (T = 16 on NVIDIA, 8 on Apple). K goes in steps of
// BK = 32: the workgroup converts x to f16 into xt [BM][BK] and dequantizes (or converts) W
// into wt [BK][BN], both row-major, then each subgroup multiply-adds.
// coopLoad/coopStore are column-major: loading a row-major [R][C] tile gives its transpose.
// So W's tile goes in the A role and x's in the B role: Wtᵀ·xtᵀ... = (x·Wᵀ)ᵀ = yᵀ, and the
// column-major store of yᵀ is row-major y (see ARCHITECTURE.md, "Kernels"). Tiles are
// staged through ct [BM][BN] f32 so partial edge tiles are stored with guards.
// Pointer offsets are computed into a `let` first (naga's SPIR-V backend needs it).
// Bindings: 0 x (f32), 1 packed, 2 scales, 3 biases (quantized), 4 y (f32), 5 w (dense).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    wpr: u32,
    gpr: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const BK: u32 = 32u;
// Largest block (T = 16): 64 x 64.
const BMAX: u32 = 64u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(5) var<storage, read> w: array<f32>;
fn dense_at(i: u32) -> f32 {
    return w[view(5u) + i];
}
#else
@group(0) @binding(5) var<storage, read> w: array<u32>;
fn dense_at(i: u32) -> f32 {
    let j = view(5u) + i;
    return half_at(w[j >> 1u], j);
}
#endif

var<workgroup> xt: array<f16, 2048>;
var<workgroup> wt: array<f16, 2048>;
var<workgroup> ct: array<f32, 4096>;

// Block coordinates of this workgroup: M blocks vary fastest so neighbours share W tiles.
fn block_origin(t: u32, bsz: u32) -> vec3<u32> {
    let nbm = (p.m + bsz - 1u) / bsz;
    let nbn = (p.n + bsz - 1u) / bsz;
    let bn = t / nbm;
    return vec3<u32>((t % nbm) * bsz, bn * bsz, u32(bn < nbn));
}

// Fill xt [bsz][BK] and wt [BK][bsz] for the K step at k0 (QUANT: dequantize W).
fn load_tiles(lid: u32, o: vec3<u32>, k0: u32, bsz: u32, quant: bool) {
    for (var e = lid; e < bsz * BK; e += WG) {
        let r = e / BK;
        let k = e % BK;
        let m = o.x + r;
        var a = 0.0;
        if o.z != 0u && m < p.m && k0 + k < p.k {
            a = x[view(0u) + m * p.k + k0 + k];
        }
        xt[r * BK + k] = f16(a);
        let n = o.y + r;
        var b = 0.0;
        if o.z != 0u && n < p.n && k0 + k < p.k {
            if quant {
                b = dequant_at(n, k0 + k, p.wpr, p.gpr);
            } else {
                b = dense_at(n * p.k + k0 + k);
            }
        }
        wt[k * bsz + r] = f16(b);
    }
}

fn zero_ct(lid: u32, bsz: u32) {
    for (var e = lid; e < bsz * bsz; e += WG) {
        ct[e] = 0.0;
    }
}

fn store_ct(lid: u32, o: vec3<u32>, bsz: u32) {
    if o.z == 0u {
        return;
    }
    for (var e = lid; e < bsz * bsz; e += WG) {
        let m = o.x + e / bsz;
        let n = o.y + e % bsz;
        if m < p.m && n < p.n {
            y[view(4u) + m * p.n + n] = ct[e];
        }
    }
}

// T = 16.
fn coop16(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, sg: u32, quant: bool) {
    let T = 16u;
    let bsz = 4u * T;
    let o = block_origin(flat_wg(wid, nwg), bsz);
    // Sub-block of this subgroup: rows sm.., columns sn.. of the block.
    let sm = (sg / 2u) * 2u * T;
    let sn = (sg % 2u) * 2u * T;
    zero_ct(lid, bsz);
    workgroupBarrier();
    let c00o = sm * bsz + sn;
    let c01o = sm * bsz + sn + T;
    let c10o = (sm + T) * bsz + sn;
    let c11o = (sm + T) * bsz + sn + T;
    var c00 = coopLoad<coop_mat16x16<f32, C>>(&ct[c00o], bsz);
    var c01 = coopLoad<coop_mat16x16<f32, C>>(&ct[c01o], bsz);
    var c10 = coopLoad<coop_mat16x16<f32, C>>(&ct[c10o], bsz);
    var c11 = coopLoad<coop_mat16x16<f32, C>>(&ct[c11o], bsz);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        workgroupBarrier();
        load_tiles(lid, o, k0, bsz, quant);
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += T) {
            // A role: W tile [kk.., sn + i*T..] (row-major [BK][bsz]).
            let a0o = kk * bsz + sn;
            let a1o = kk * bsz + sn + T;
            // B role: x tile [sm + j*T.., kk..] (row-major [bsz][BK]).
            let b0o = sm * BK + kk;
            let b1o = (sm + T) * BK + kk;
            let a0 = coopLoad<coop_mat16x16<f16, A>>(&wt[a0o], bsz);
            let a1 = coopLoad<coop_mat16x16<f16, A>>(&wt[a1o], bsz);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&xt[b0o], BK);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&xt[b1o], BK);
            // cJI holds y rows sm + J*T.., columns sn + I*T...
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a1, b0, c01);
            c10 = coopMultiplyAdd(a0, b1, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
    }
    workgroupBarrier();
    coopStore(c00, &ct[c00o], bsz);
    coopStore(c01, &ct[c01o], bsz);
    coopStore(c10, &ct[c10o], bsz);
    coopStore(c11, &ct[c11o], bsz);
    workgroupBarrier();
    store_ct(lid, o, bsz);
}

// T = 8: the same with 8 x 8 tiles.
fn coop8(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, sg: u32, quant: bool) {
    let T = 8u;
    let bsz = 4u * T;
    let o = block_origin(flat_wg(wid, nwg), bsz);
    let sm = (sg / 2u) * 2u * T;
    let sn = (sg % 2u) * 2u * T;
    zero_ct(lid, bsz);
    workgroupBarrier();
    let c00o = sm * bsz + sn;
    let c01o = sm * bsz + sn + T;
    let c10o = (sm + T) * bsz + sn;
    let c11o = (sm + T) * bsz + sn + T;
    var c00 = coopLoad<coop_mat8x8<f32, C>>(&ct[c00o], bsz);
    var c01 = coopLoad<coop_mat8x8<f32, C>>(&ct[c01o], bsz);
    var c10 = coopLoad<coop_mat8x8<f32, C>>(&ct[c10o], bsz);
    var c11 = coopLoad<coop_mat8x8<f32, C>>(&ct[c11o], bsz);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        workgroupBarrier();
        load_tiles(lid, o, k0, bsz, quant);
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += T) {
            let a0o = kk * bsz + sn;
            let a1o = kk * bsz + sn + T;
            let b0o = sm * BK + kk;
            let b1o = (sm + T) * BK + kk;
            let a0 = coopLoad<coop_mat8x8<f16, A>>(&wt[a0o], bsz);
            let a1 = coopLoad<coop_mat8x8<f16, A>>(&wt[a1o], bsz);
            let b0 = coopLoad<coop_mat8x8<f16, B>>(&xt[b0o], BK);
            let b1 = coopLoad<coop_mat8x8<f16, B>>(&xt[b1o], BK);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a1, b0, c01);
            c10 = coopMultiplyAdd(a0, b1, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
    }
    workgroupBarrier();
    coopStore(c00, &ct[c00o], bsz);
    coopStore(c01, &ct[c01o], bsz);
    coopStore(c10, &ct[c10o], bsz);
    coopStore(c11, &ct[c11o], bsz);
    workgroupBarrier();
    store_ct(lid, o, bsz);
}

@compute @workgroup_size(WG)
fn qmm_coop16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    coop16(wid, nwg, lid, sg, true);
}

@compute @workgroup_size(WG)
fn matmul_coop16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    coop16(wid, nwg, lid, sg, false);
}

@compute @workgroup_size(WG)
fn qmm_coop8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    coop8(wid, nwg, lid, sg, true);
}

@compute @workgroup_size(WG)
fn matmul_coop8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32) {
    coop8(wid, nwg, lid, sg, false);
}

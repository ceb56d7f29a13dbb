// Dense matmul y[M, N] = x[M, K] · Wᵀ with W [N, K] in f32, f16 or bf16 (16-bit read as u32
// words), x and y f32, f32 accumulation. Same shapes of work as qmatmul.wgsl:
//   matvec  M <= 8: row-blocks of 32 invocations, each owning RPT weight rows; consecutive
//           invocations read consecutive elements of a row (coalesced), x is read once per
//           element for all RPT rows.
//   mm      tiled: 64 x 64 outputs per workgroup of 256, K in steps of 32 (K tail guarded),
//           tiles of x and W in workgroup memory (16 KiB).
// Bindings: 0 x, 1 w, 2 y.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

override RPT: u32 = 4u;

const MAX_M: u32 = 8u;
const MAX_RPT: u32 = 4u;
const TPR: u32 = 32u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(1) var<storage, read> w: array<f32>;
fn w_at(i: u32) -> f32 {
    return w[view(1u) + i];
}
#else
@group(0) @binding(1) var<storage, read> w: array<u32>;
fn w_at(i: u32) -> f32 {
    let j = view(1u) + i;
    return half_at(w[j >> 1u], j);
}
#endif

var<workgroup> red: array<f32, 2048>;

@compute @workgroup_size(WG)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
          , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_size) ss: u32
#endif
) {
    let blocks = WG / TPR;
    let block = lid / TPR;
    let lane = lid % TPR;
    let row0 = (flat_wg(wid, nwg) * blocks + block) * RPT;
    let mr = MAX_M * MAX_RPT;
#if SUBGROUPS
    let slots = TPR / ss;
    let slot = lane / ss;
#else
    let slots = TPR;
    let slot = lane;
#endif
    for (var r = 0u; r < RPT; r++) {
        let wo = min(row0 + r, p.n - 1u) * p.k;
        for (var m = 0u; m < p.m; m++) {
            let xo = view(0u) + m * p.k;
            var s = 0.0;
            for (var k = lane; k < p.k; k += TPR) {
                s = fma(x[xo + k], w_at(wo + k), s);
            }
#if SUBGROUPS
            s = subgroupAdd(s);
            if sl == 0u {
                red[(block * mr + m * RPT + r) * TPR + slot] = s;
            }
#else
            red[(block * mr + m * RPT + r) * TPR + slot] = s;
#endif
        }
    }
    workgroupBarrier();
    let fb = lid / mr;
    let fj = lid % mr;
    let fm = fj / RPT;
    let fr = fj % RPT;
    let frow = (flat_wg(wid, nwg) * blocks + fb) * RPT + fr;
    if fm < p.m && fr < RPT && frow < p.n && fb < blocks {
        var s = 0.0;
        let o = (fb * mr + fm * RPT + fr) * TPR;
        for (var i = 0u; i < slots; i++) {
            s += red[o + i];
        }
        y[view(2u) + fm * p.n + frow] = s;
    }
}

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 32u;
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> ws: array<vec4<f32>, 512>;

// Element (k, i) of a [BK][64] tile stored as vec4 along the 64.
fn set_xs(k: u32, i: u32, v: f32) {
    xs[k * 16u + i / 4u][i % 4u] = v;
}
fn set_ws(k: u32, i: u32, v: f32) {
    ws[k * 16u + i / 4u][i % 4u] = v;
}

@compute @workgroup_size(256)
fn mm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
      @builtin(local_invocation_index) lid: u32) {
    let nbm = (p.m + BM - 1u) / BM;
    let nbn = (p.n + BN - 1u) / BN;
    let t = flat_wg(wid, nwg);
    let bm = t % nbm;
    let bn = t / nbm;
    let valid = bn < nbn;
    let m0 = bm * BM;
    let n0 = bn * BN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    let lr = lid / 4u;
    let lk = (lid % 4u) * 8u;
    let xrow = m0 + lr;
    let wrow = n0 + lr;
    let xok = valid && xrow < p.m;
    let wok = valid && wrow < p.n;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var i = 0u; i < 8u; i++) {
            let k = k0 + lk + i;
            var a = 0.0;
            var b = 0.0;
            if k < p.k {
                if xok {
                    a = x[view(0u) + xrow * p.k + k];
                }
                if wok {
                    b = w_at(wrow * p.k + k);
                }
            }
            set_xs(lk + i, lr, a);
            set_ws(lk + i, lr, b);
        }
        workgroupBarrier();
        for (var k = 0u; k < BK; k++) {
            let a = xs[k * 16u + ty];
            let b = ws[k * 16u + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
    if !valid {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        if m < p.m {
            for (var j = 0u; j < 4u; j++) {
                let n = n0 + tx * 4u + j;
                if n < p.n {
                    y[view(2u) + m * p.n + n] = acc[i][j];
                }
            }
        }
    }
}

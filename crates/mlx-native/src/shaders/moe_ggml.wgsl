// Routed GGML matvec over stacked experts (GGUF `ffn_*_exps` [E, N, K]), appended to
// ggml_common.wgsl and one dequantizer file (unit_hdr / dq_group of the bound shard). A shard
// holds whole experts: experts row0 .. row0 + rows, expert e's row n at shard row
// (e - row0) * N + n. For each pair (token, slot) of the P = T * top_k pairs:
//   y[pair, n] = x[pair / top_k, :] · W[ids[pair]][n, :]
// One workgroup per (pair, n), eight invocations per 32-element unit as in matvec: only the
// chosen experts' rows are read. A workgroup whose expert is in another shard computes
// nothing (its unit loop is empty) and writes nothing; ids >= E give zeros (first shard).
// Params (ggml_common's): m = pairs, k, n = N, rows = experts in the shard, row0 = its first
// expert, bpr, scale_off, units, zero_oob = 1 on the first shard, xvec = 0, _pad1 = E,
// _pad2 = the pairs per x row (top_k, or 1 when x has one row per pair).

@compute @workgroup_size(WG)
fn moe_matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
              , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_id) si: u32,
              @builtin(num_subgroups) sc: u32
#endif
) {
    let g = flat_wg(wid, nwg);
    if g >= p.m * p.n {
        return;
    }
    let pair = g / p.n;
    let n = g % p.n;
    let e = ids[view(3u) + pair];
    let in_shard = e >= p.row0 && e - p.row0 < p.rows;
    let row = select(0u, e - p.row0, in_shard) * p.n + n;
    let units = select(0u, p.units, in_shard);
    let xo = view(0u) + (pair / p._pad2) * p.k;
    var acc = 0.0;
    let grp = lid % 8u;
    for (var u = lid / 8u; u < units; u += WG / 8u) {
        let h = unit_hdr(row, u);
        let w = dq_group(row, u, grp, h);
        let k = u * 32u + 4u * grp;
        acc += dot(w, x4(xo + k, k));
    }
#if SUBGROUPS
    let s = subgroupAdd(acc);
    if sl == 0u {
        red[si] = s;
    }
    workgroupBarrier();
    if lid == 0u {
        var t = 0.0;
        for (var j = 0u; j < sc; j++) {
            t += red[j];
        }
#else
    red[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        let t = red[0];
#endif
        let o = view(2u) + pair * p.n + n;
        if in_shard {
            y[o] = t;
        } else if p.zero_oob != 0u && e >= p._pad1 {
            y[o] = 0.0;
        }
    }
}

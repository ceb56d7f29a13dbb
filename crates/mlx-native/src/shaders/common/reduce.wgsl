// Workgroup-wide reductions for kernels that give one workgroup (WG invocations, WG a power
// of two <= 1024) to a row. With SUBGROUPS each subgroup reduces in registers and one partial
// per subgroup goes through workgroup memory; without, a tree over workgroup memory. Every
// invocation receives the result. Call from uniform control flow; set the sg_* privates at
// the start of the entry point (reduce_init).
var<workgroup> red_buf: array<f32, 1024>;
var<private> sg_lane: u32;
var<private> sg_index: u32;
var<private> sg_count: u32;

fn combine(a: f32, b: f32, is_max: bool) -> f32 {
    return select(a + b, max(a, b), is_max);
}

fn wg_reduce(v: f32, lid: u32, is_max: bool) -> f32 {
#if SUBGROUPS
    let s = select(subgroupAdd(v), subgroupMax(v), is_max);
    if sg_lane == 0u {
        red_buf[sg_index] = s;
    }
    workgroupBarrier();
    var t = red_buf[0];
    for (var i = 1u; i < sg_count; i++) {
        t = combine(t, red_buf[i], is_max);
    }
    workgroupBarrier();
    return t;
#else
    red_buf[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red_buf[lid] = combine(red_buf[lid], red_buf[lid + s], is_max);
        }
        workgroupBarrier();
    }
    let t = red_buf[0];
    workgroupBarrier();
    return t;
#endif
}

fn wg_sum(v: f32, lid: u32) -> f32 {
    return wg_reduce(v, lid, false);
}

fn wg_max(v: f32, lid: u32) -> f32 {
    return wg_reduce(v, lid, true);
}

// MoE router: one workgroup of 256 per token (E <= 256 experts, one per invocation).
//   KIND 0 softmax-top-k:        p = softmax(logits); pick top-k; w = p (/ Σ picked if NORM)
//   KIND 1 softmax-top-k-scaled: as 0 with NORM, then w *= table[expert] (per-expert scale)
//   KIND 2 sigmoid-biased:       s = sigmoid(logits); pick top-k of s + table[expert];
//                                w = s / Σ picked s * scale (routed_scaling_factor)
// Softmax variants pick on the logits (the same order as the probabilities, without ties
// made by rounding exp). Ties: lowest expert index first. Picks come out in descending order.
// Bindings: 0 logits f32 [T, E], 1 table f32 [E] (KIND 1, 2), 2 weights f32 [T, K],
// 3 ids u32 [T, K].
struct Params {
    t: u32,
    e: u32,
    k: u32,
    kind: u32,
    norm: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read_write> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

#if SUBGROUPS
// Per-subgroup partials (subgroups of at least 4 invocations: at most 64 of them).
var<workgroup> part: array<f32, 64>;

// Workgroup max / sum: a subgroup reduction, then every invocation combines the subgroups'
// partials (one barrier each way instead of a tree of 8 levels).
fn all_max(v: f32, lid: u32, sl: u32, ss: u32) -> f32 {
    let m = subgroupMax(v);
    if sl == 0u {
        part[lid / ss] = m;
    }
    workgroupBarrier();
    var r = part[0];
    for (var i = 1u; i < 256u / ss; i++) {
        r = max(r, part[i]);
    }
    workgroupBarrier();
    return r;
}

fn all_sum(v: f32, lid: u32, sl: u32, ss: u32) -> f32 {
    let m = subgroupAdd(v);
    if sl == 0u {
        part[lid / ss] = m;
    }
    workgroupBarrier();
    var r = 0.0;
    for (var i = 0u; i < 256u / ss; i++) {
        r += part[i];
    }
    workgroupBarrier();
    return r;
}
#else
var<workgroup> rv: array<f32, 256>;

// Workgroup max / sum through a tree in workgroup memory.
fn all_max(v: f32, lid: u32, sl: u32, ss: u32) -> f32 {
    rv[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if lid < s {
            rv[lid] = max(rv[lid], rv[lid + s]);
        }
        workgroupBarrier();
    }
    let r = rv[0];
    workgroupBarrier();
    return r;
}

fn all_sum(v: f32, lid: u32, sl: u32, ss: u32) -> f32 {
    rv[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if lid < s {
            rv[lid] = rv[lid] + rv[lid + s];
        }
        workgroupBarrier();
    }
    let r = rv[0];
    workgroupBarrier();
    return r;
}
#endif

// The keys as vec4s for the rank pass.
var<workgroup> keys4: array<vec4<f32>, 64>;

// (a_v, a_i) ranks above (b_v, b_i): the larger value, then the lower index.
fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return av > bv || (av == bv && ai < bi);
}

// How many of the four keys q (experts j..j+3) rank above (key, lid).
fn rank_better(q: vec4<f32>, j: u32, key: f32, lid: u32) -> u32 {
    return u32(better(q.x, j, key, lid)) + u32(better(q.y, j + 1u, key, lid))
         + u32(better(q.z, j + 2u, key, lid)) + u32(better(q.w, j + 3u, key, lid));
}

// Max and sum over the workgroup (subgroups, else a tree), a rank pass over vec4s of keys,
// and each picked expert's invocation writes its own weight and id: the router is a chain of
// latencies (one token's experts), so it keeps barriers few and has no serial loop.
@compute @workgroup_size(256)
fn route(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32
#if SUBGROUPS
         , @builtin(subgroup_invocation_id) sl: u32, @builtin(subgroup_size) ss: u32
#endif
) {
#if !SUBGROUPS
    let sl = 0u;
    let ss = 1u;
#endif
    let t = flat_wg(wid, nwg);
    if t >= p.t {
        return;
    }
    let valid = lid < p.e;
    var v = neg_inf();
    if valid {
        v = logits[view(0u) + t * p.e + lid];
    }
    var prob = 0.0;
    var key = v;
    if p.kind == 2u {
        prob = 1.0 / (1.0 + exp(-v));
        if valid {
            key = prob + table[view(1u) + lid];
        }
    } else {
        let mx = all_max(v, lid, sl, ss);
        let ex = select(0.0, exp(v - mx), valid);
        prob = ex / all_sum(ex, lid, sl, ss);
    }
    // A NaN score ranks below every number.
    key = select(key, neg_inf(), key != key);
    // Rank of each expert = how many experts rank above it (larger key, or equal key and a
    // lower index): the top k are the ranks below k, in order. Keys past E are -inf with
    // indices >= E: they never rank above a valid one.
    keys4[lid / 4u][lid % 4u] = key;
    workgroupBarrier();
    var rank = p.k;
    if valid {
        rank = 0u;
        for (var j = 0u; j < p.e; j += 4u) {
            rank += rank_better(keys4[j / 4u], j, key, lid);
        }
    }
    let picked = rank < p.k;
    let s = all_sum(select(0.0, prob, picked), lid, sl, ss);
    if picked {
        var w = prob;
        if p.norm != 0u && s > 0.0 {
            w = w / s;
        }
        if p.kind == 1u {
            w *= table[view(1u) + lid];
        } else if p.kind == 2u {
            w *= p.scale;
        }
        let o = t * p.k + rank;
        weights[view(2u) + o] = w;
        ids[view(3u) + o] = lid;
    }
}

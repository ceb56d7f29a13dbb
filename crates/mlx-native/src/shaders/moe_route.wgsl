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

const NONE: u32 = 0xffffffffu;
const MAX_K: u32 = 16u;

var<workgroup> rv: array<f32, 256>;
var<workgroup> sel_w: array<f32, MAX_K>;
var<workgroup> sel_i: array<u32, MAX_K>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn wg_max(v: f32, lid: u32) -> f32 {
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

fn wg_sum(v: f32, lid: u32) -> f32 {
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

// (a_v, a_i) ranks above (b_v, b_i): candidates (index != NONE) above none, larger values
// first, then lower indices.
fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return ai != NONE && (bi == NONE || av > bv || (av == bv && ai < bi));
}

@compute @workgroup_size(256)
fn route(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
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
        let mx = wg_max(v, lid);
        let ex = select(0.0, exp(v - mx), valid);
        prob = ex / wg_sum(ex, lid);
    }
    // A NaN score ranks below every number.
    key = select(key, neg_inf(), key != key);
    // Rank of each expert = how many experts rank above it (larger key, or equal key and a
    // lower index): the top k are the ranks below k, in order. One pass over the keys in
    // workgroup memory (every invocation reads the same element at a time: a broadcast)
    // instead of k rounds of a tree reduction with a barrier per level.
    rv[lid] = key;
    workgroupBarrier();
    if valid {
        var rank = 0u;
        for (var j = 0u; j < p.e; j++) {
            rank += u32(better(rv[j], j, key, lid));
        }
        if rank < p.k {
            sel_w[rank] = prob;
            sel_i[rank] = lid;
        }
    }
    workgroupBarrier();
    if lid == 0u {
        var s = 0.0;
        for (var j = 0u; j < p.k; j++) {
            s += sel_w[j];
        }
        let o = t * p.k;
        for (var j = 0u; j < p.k; j++) {
            var w = sel_w[j];
            if p.norm != 0u && s > 0.0 {
                w = w / s;
            }
            if p.kind == 1u {
                w *= table[view(1u) + sel_i[j]];
            } else if p.kind == 2u {
                w *= p.scale;
            }
            weights[view(2u) + o + j] = w;
            ids[view(3u) + o + j] = sel_i[j];
        }
    }
}

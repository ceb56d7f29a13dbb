// Token sampling on the GPU: only the chosen id leaves the GPU.
// repetition_penalty: logits[id] /= penalty if > 0 else *= penalty, for each (unique) id.
//   Bindings: 0 logits (f32, read_write), 1 ids (u32).
// sample_sorted: from candidates sorted by logit, descending (top_k's output), keep the
//   prefix that top-p and min-p allow (computed at temperature 1, llama.cpp's order), then
//   draw from softmax(logit / temperature) over the survivors with a uniform number from
//   the host. One invocation walks the (at most 1024) candidates.
//   Bindings: 2 values (f32), 3 indices (u32), 4 out (u32, one id).
struct Params {
    n: u32,
    penalty: f32,
    temperature: f32,
    top_p: f32,
    min_p: f32,
    uniform: f32,
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(0) var<storage, read_write> logits: array<f32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> vals: array<f32>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn repetition_penalty(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    if i < p.n {
        let j = view(0u) + ids[view(1u) + i];
        let l = logits[j];
        logits[j] = select(l * p.penalty, l / p.penalty, l > 0.0);
    }
}

@compute @workgroup_size(1)
fn sample_sorted() {
    let v0 = vals[view(2u)];
    // Probabilities at temperature 1, relative to the most likely candidate.
    var total = 0.0;
    for (var i = 0u; i < p.n; i++) {
        total += exp(vals[view(2u) + i] - v0);
    }
    // Survivors: the shortest prefix reaching top_p of the mass, each at least min_p of the
    // top probability (the first candidate always survives).
    var keep = 1u;
    var cum = 1.0 / total;
    for (var i = 1u; i < p.n; i++) {
        let q = exp(vals[view(2u) + i] - v0);
        if cum >= p.top_p || q < p.min_p {
            break;
        }
        cum += q / total;
        keep = i + 1u;
    }
    // Draw at the requested temperature among the survivors.
    var mass = 0.0;
    for (var i = 0u; i < keep; i++) {
        mass += exp((vals[view(2u) + i] - v0) / p.temperature);
    }
    let goal = p.uniform * mass;
    var acc = 0.0;
    var pick = keep - 1u;
    for (var i = 0u; i < keep; i++) {
        acc += exp((vals[view(2u) + i] - v0) / p.temperature);
        if goal < acc {
            pick = i;
            break;
        }
    }
    out[view(4u)] = idx[view(3u) + pick];
}

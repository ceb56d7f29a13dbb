// kv_append: write T new tokens of K and V (f32 [T, kv_heads, head_dim]) into a layer's cache
// ([1, kv_heads, slots, head_dim], f16 or f32 by the variant) at positions start..start+T,
// slot = position % slots (a ring for sliding-window layers, the identity for full ones).
// One invocation per cache word: f16 caches pack two halves per u32 word, so no two
// invocations write the same word.
// Bindings: 0 k_new f32, 1 v_new f32, 2 k_cache, 3 v_cache.
struct Params {
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    slots: u32,
    start: u32,
    // Cache words per row: head_dim / 2 for f16, head_dim for f32.
    row_words: u32,
    // tokens * kv_heads * row_words.
    items: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> k_new: array<f32>;
@group(0) @binding(1) var<storage, read> v_new: array<f32>;
@group(1) @binding(0) var<uniform> p: Params;

#if DT_F32
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;
#else
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
#endif

@compute @workgroup_size(WG)
fn kv_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wid, nwg) * WG + lid;
    if i >= p.items {
        return;
    }
    let w = i % p.row_words;
    let th = i / p.row_words;
    let h = th % p.kv_heads;
    let t = th / p.kv_heads;
    let slot = (p.start + t) % p.slots;
    let dst = (h * p.slots + slot) * p.row_words + w;
    let src = th * p.head_dim;
#if DT_F32
    k_cache[view(2u) + dst] = k_new[view(0u) + src + w];
    v_cache[view(3u) + dst] = v_new[view(1u) + src + w];
#else
    let s = src + 2u * w;
    let ks = view(0u) + s;
    let vs = view(1u) + s;
    // Cache views start on a word (checked on the Rust side): view / 2 is the word offset.
    k_cache[view(2u) / 2u + dst] = pack2x16float(vec2<f32>(k_new[ks], k_new[ks + 1u]));
    v_cache[view(3u) / 2u + dst] = pack2x16float(vec2<f32>(v_new[vs], v_new[vs + 1u]));
#endif
}

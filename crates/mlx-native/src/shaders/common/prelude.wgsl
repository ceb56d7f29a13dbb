// Prepended to every kernel by the registry (see kernels.rs). Preprocessed with the kernel.
//
// Views: a buffer argument may start at any element offset. The dispatch helper binds it at
// the aligned base below that offset and passes the remainder, in elements of the buffer's
// dtype, here: view(i) for the i-th storage binding.
// Workgroup size of the variant (the registry sets it from Spec::wg).
override WG: u32 = 64;

struct Views {
    off: array<vec4<u32>, 2>,
}
@group(1) @binding(1) var<uniform> views: Views;

fn view(i: u32) -> u32 {
    return views.off[i >> 2u][i & 3u];
}

// The dispatch helper folds more than 65,535 workgroups into a 2-D/3-D grid; kernels recover
// the linear workgroup index and guard it against their own sizes.
fn flat_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}

// bf16 has no WGSL type: it is the high half of an f32.
fn bf16_to_f32(bits: u32) -> f32 {
    return bitcast<f32>(bits << 16u);
}

// Element `i` of a 16-bit (f16 or bf16, by the variant's dtype) array stored as u32 words.
fn half_at(word: u32, i: u32) -> f32 {
    let bits = (word >> ((i & 1u) * 16u)) & 0xffffu;
#if DT_BF16
    return bf16_to_f32(bits);
#else
    return unpack2x16float(bits).x;
#endif
}

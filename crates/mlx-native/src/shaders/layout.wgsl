// Data movement of 32-bit elements (f32, u32, i32 read as u32 words) and 16-bit copies.
//   copy_u32:        out[i] = x[i]                                 0 x, 1 out
//   copy_u16:        out word j = halves 2j, 2j+1 of x (any half offset)  0 x (u32 words), 1 out
//   transpose_tiled: x [batch, a, b] -> out [batch, b, a], 32x32 tiles through workgroup
//                    memory so reads and writes are both row-contiguous. 0 x, 1 out
//   gather4:         out (shape dims, row-major) [i] = x[sum_d coord_d * strides_d]. 0 x, 1 out
//   concat_part:     out[r, off + j] = x[r, j] for one input of width `a`, out width `b`.
struct Params {
    // Elements (copy, gather4, concat_part), or batch (transpose_tiled).
    n: u32,
    a: u32,
    b: u32,
    // Column offset (concat_part).
    off: u32,
    // gather4: output shape, outermost first (padded with leading 1s).
    dims: vec4<u32>,
    // gather4: input element stride of each output dimension.
    strides: vec4<u32>,
}
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(1) @binding(0) var<uniform> p: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_wg(wid, nwg) * WG + lid;
}

@compute @workgroup_size(WG)
fn copy_u32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        out[view(1u) + i] = x[view(0u) + i];
    }
}

// Half `e` of the input view (view(0) counts halves for a 16-bit buffer).
fn half_bits(e: u32) -> u32 {
    let h = view(0u) + e;
    return (x[h >> 1u] >> ((h & 1u) * 16u)) & 0xffffu;
}

// Output is a fresh allocation (element 0 on a word); p.n is the count of halves.
@compute @workgroup_size(WG)
fn copy_u16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let j = index(wid, nwg, lid);
    let e = 2u * j;
    if e < p.n {
        var w = half_bits(e);
        if e + 1u < p.n {
            w |= half_bits(e + 1u) << 16u;
        }
        out[(view(1u) >> 1u) + j] = w;
    }
}

const TILE: u32 = 32u;
var<workgroup> tile: array<u32, 1056>; // 32 x 33: the pad column avoids bank conflicts

// WG = 256: 32 columns x 8 rows, each invocation moves 4 rows of the tile.
@compute @workgroup_size(WG)
fn transpose_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let tiles_b = (p.b + TILE - 1u) / TILE;
    let tiles_a = (p.a + TILE - 1u) / TILE;
    let g = flat_wg(wid, nwg);
    let bt = g / (tiles_a * tiles_b);
    if bt >= p.n {
        return;
    }
    let ta = (g / tiles_b) % tiles_a;
    let tb = g % tiles_b;
    let lx = lid % TILE;
    let ly = lid / TILE;
    let base = bt * p.a * p.b;
    for (var r = ly; r < TILE; r += WG / TILE) {
        let row = ta * TILE + r;
        let col = tb * TILE + lx;
        if row < p.a && col < p.b {
            tile[r * (TILE + 1u) + lx] = x[view(0u) + base + row * p.b + col];
        }
    }
    workgroupBarrier();
    for (var r = ly; r < TILE; r += WG / TILE) {
        let orow = tb * TILE + r;
        let ocol = ta * TILE + lx;
        if orow < p.b && ocol < p.a {
            out[view(1u) + base + orow * p.a + ocol] = tile[lx * (TILE + 1u) + r];
        }
    }
}

@compute @workgroup_size(WG)
fn gather4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    var t = i;
    var src = 0u;
    for (var d = 3; d >= 0; d--) {
        let c = t % p.dims[d];
        t /= p.dims[d];
        src += c * p.strides[d];
    }
    out[view(1u) + i] = x[view(0u) + src];
}

@compute @workgroup_size(WG)
fn concat_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if i < p.n {
        let r = i / p.a;
        let j = i % p.a;
        out[view(1u) + r * p.b + p.off + j] = x[view(0u) + i];
    }
}

//! Ops: one module per family, each with its WGSL in `shaders/<family>.wgsl`.

pub mod activation;
pub mod elementwise;
pub mod embedding;
pub mod fill;
pub mod layout;
pub mod norm;
pub mod rope;
pub mod select;
pub mod softmax;

pub use elementwise::{add, add_scaled, mul, scale};
pub use fill::fill;
pub use norm::{layer_norm, rms_norm, rms_norm_residual};

use crate::device::Caps;

/// Workgroup size and subgroup use for kernels that give one workgroup to a row.
pub(crate) fn row_wg(caps: &Caps, n: usize) -> (u32, bool) {
    // Short rows waste lanes at 256; the reduction needs a power of two.
    let wg = if n <= 64 {
        64
    } else if n <= 128 {
        128
    } else {
        256
    };
    (
        wg.min(caps.max_invocations_per_workgroup.max(64)),
        caps.subgroups,
    )
}

/// Workgroups for `n` elements at `per_wg` elements each.
pub(crate) fn groups_for(n: usize, per_wg: u32, op: &str) -> crate::Result<u32> {
    crate::check::fits_u32(n.div_ceil(per_wg as usize), op, "workgroups")
}

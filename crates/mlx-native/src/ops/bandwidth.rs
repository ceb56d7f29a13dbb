//! `read_probe`: a read-only streaming kernel, the device's measured memory roofline.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ProbeParams {
    vec4s: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<ProbeParams>() == 16);

const WG: u32 = 256;

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    vec![(Kernel::Bandwidth, Spec::new("read_probe", DType::U32, WG))]
}

/// Read every byte of `src` (u32, length a multiple of 4) once, with `workgroups` workgroups
/// striding over it. `sink` receives at most one word per workgroup.
pub fn read_probe(
    pass: &mut Pass,
    src: &MlxBuffer,
    sink: &MlxBuffer,
    workgroups: u32,
) -> Result<()> {
    let op = "read_probe";
    check::dtype(src, &[DType::U32], op, "src")?;
    check::ensure(
        src.len().is_multiple_of(4) && src.elem_offset().is_multiple_of(4),
        op,
        || "src must be whole, aligned vec4<u32>s".into(),
    )?;
    check::dtype(sink, &[DType::U32], op, "sink")?;
    check::ensure(sink.len() >= workgroups as usize, op, || {
        format!(
            "sink has {} elements, expected at least {workgroups}",
            sink.len()
        )
    })?;
    let params = ProbeParams {
        vec4s: check::fits_u32(src.len() / 4, op, "vec4s")?,
        _pad: [0; 3],
    };
    pass.dispatch(
        Kernel::Bandwidth,
        Spec::new("read_probe", DType::U32, WG),
        &params,
        &[src, sink],
        workgroups,
    )
}

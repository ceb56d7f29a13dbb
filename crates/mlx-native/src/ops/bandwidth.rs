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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::gpu;

    /// Timing probe for a real GPU (`--ignored --nocapture`): the read probe in a pass of 32
    /// dependent dispatches (one sink), each over its own buffer of PROBE_MB megabytes, for
    /// several grids (PROBE_WGS, workgroups of 256): how many invocations a kernel that
    /// streams that much inside a pass needs.
    #[test]
    #[ignore]
    fn read_grid_probe() -> Result<()> {
        let g = gpu();
        let list = |name: &str, default: &[usize]| -> Vec<usize> {
            std::env::var(name).map_or(default.to_vec(), |v| {
                v.split(',').map(|t| t.trim().parse().unwrap()).collect()
            })
        };
        let layers = 32;
        for mb in list("PROBE_MB", &[33, 134]) {
            let words = (mb << 20) / 4 / 4 * 4;
            let mut bufs = Vec::new();
            let mut pass = g.begin();
            for i in 0..layers {
                let b = MlxBuffer::new(g, DType::U32, &[words])?;
                crate::ops::fill::fill_u32_words(&mut pass, &b, 0x1234_5679 ^ i as u32)?;
                bufs.push(b);
            }
            pass.commit_and_wait()?;
            for wgs in list("PROBE_WGS", &[64, 128, 256, 512, 1024, 2048, 8192]) {
                let sink = MlxBuffer::new(g, DType::U32, &[wgs])?;
                let mut best = f64::INFINITY;
                for _ in 0..6 {
                    let mut pass = g.begin().with_pass_timing(true);
                    for b in &bufs {
                        read_probe(&mut pass, b, &sink, wgs as u32)?;
                    }
                    let t = pass.commit_and_wait()?;
                    best = best.min(t.iter().map(|k| k.nanos).sum::<f64>() / layers as f64);
                }
                println!(
                    "read {mb} MiB, {wgs} workgroups of {WG}: {:.2} us a dispatch in a pass of {layers} ({:.0} GB/s)",
                    best / 1e3,
                    (words * 4) as f64 / best
                );
            }
        }
        Ok(())
    }
}

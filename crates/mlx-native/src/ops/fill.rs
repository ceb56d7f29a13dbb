//! `fill`: write a value into every element of a buffer.

use crate::buffer::MlxBuffer;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FillParams {
    words: u32,
    value: u32,
}
const _: () = assert!(std::mem::size_of::<FillParams>() == 8);

const WG: u32 = 256;

/// Write a 32-bit pattern into every word of `buf`'s view (its byte length must be a
/// multiple of 4 and start on a word). Any dtype: the view is seen as words.
pub fn fill_u32_words(pass: &mut Pass, buf: &MlxBuffer, value: u32) -> Result<()> {
    let bytes = buf.byte_len();
    let start = buf.elem_offset() as u64 * buf.dtype().size() as u64;
    if !bytes.is_multiple_of(4) || !start.is_multiple_of(4) {
        return Err(MlxError::invalid(format!(
            "fill: a view of {bytes} bytes at byte {start} is not whole 32-bit words"
        )));
    }
    let words = crate::check::fits_u32((bytes / 4) as usize, "fill", "words")?;
    let view = buf.bitcast(DType::U32, &[words as usize])?;
    let params = FillParams { words, value };
    pass.dispatch(
        Kernel::Fill,
        Spec::new("fill_u32", DType::U32, WG),
        &params,
        &[&view],
        words.div_ceil(WG),
    )
}

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    vec![(Kernel::Fill, Spec::new("fill_u32", DType::U32, WG))]
}

/// Set every element of an f32 buffer to `value`.
pub fn fill(pass: &mut Pass, buf: &MlxBuffer, value: f32) -> Result<()> {
    crate::check::dtype(buf, &[DType::F32], "fill", "buffer")?;
    fill_u32_words(pass, buf, value.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::gpu;

    #[test]
    fn fill_writes_every_element_of_a_view() -> Result<()> {
        let g = gpu();
        let base = MlxBuffer::from_slice(g, &vec![1.0f32; 1000], &[1000])?;
        let v = base.view(3, &[517])?;
        let mut pass = g.begin();
        fill(&mut pass, &v, 2.5)?;
        pass.commit_and_wait()?;
        let all = base.to_vec::<f32>(g)?;
        for (i, x) in all.iter().enumerate() {
            let want = if (3..520).contains(&i) { 2.5 } else { 1.0 };
            assert_eq!(*x, want, "element {i}");
        }
        Ok(())
    }
}

//! `MlxBuffer`: a GPU buffer with a dtype, a shape and an element offset (a view).

use std::sync::Arc;

use half::{bf16, f16};

use crate::buffer_pool::{create_raw, RawBuffer};
use crate::device::MlxDevice;
use crate::dtype::{DType, Element};
use crate::error::{MlxError, Result};

/// A tensor on the GPU. Cloning shares the storage; `view` makes a window into it.
#[derive(Clone)]
pub struct MlxBuffer {
    pub(crate) raw: Arc<RawBuffer>,
    /// Byte offset of element 0 of this view inside `raw`.
    pub(crate) offset: u64,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for MlxBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MlxBuffer({} {:?} at element {})",
            self.dtype,
            self.shape,
            self.elem_offset()
        )
    }
}

/// Element count of a shape, refusing empty shapes, zero-size dims and overflow.
pub fn shape_len(shape: &[usize], what: &str) -> Result<usize> {
    if shape.is_empty() {
        return Err(MlxError::invalid(format!("{what}: shape is empty")));
    }
    let mut n: usize = 1;
    for &d in shape {
        if d == 0 {
            return Err(MlxError::invalid(format!(
                "{what}: shape {shape:?} has a zero-size dimension"
            )));
        }
        n = n
            .checked_mul(d)
            .ok_or_else(|| MlxError::invalid(format!("{what}: shape {shape:?} overflows")))?;
    }
    Ok(n)
}

impl MlxBuffer {
    fn byte_size(dtype: DType, shape: &[usize], what: &str) -> Result<u64> {
        let n = shape_len(shape, what)?;
        (n as u64)
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| MlxError::invalid(format!("{what}: {shape:?} x {dtype} overflows")))
    }

    /// A view of a whole raw buffer from element 0 (callers check that it fits).
    pub(crate) fn from_raw(raw: Arc<RawBuffer>, dtype: DType, shape: &[usize]) -> Self {
        MlxBuffer {
            raw,
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// A new dedicated buffer (not pooled), contents unspecified. For weights and caches.
    pub fn new(gpu: &MlxDevice, dtype: DType, shape: &[usize]) -> Result<Self> {
        let bytes = Self::byte_size(dtype, shape, "MlxBuffer::new")?;
        let raw = create_raw(
            &gpu.inner.device,
            &gpu.inner.mem,
            bytes,
            gpu.caps().max_buffer_size,
            "mlx-native tensor",
        )?;
        Ok(MlxBuffer {
            raw: Arc::new(raw),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A new dedicated buffer holding `parts` one after another (same dtype), copied on the
    /// GPU; `shape` must hold their total length. Every part's byte offset and length must
    /// be multiples of 4 (a GPU copy's granularity).
    pub fn concat(gpu: &MlxDevice, parts: &[&MlxBuffer], shape: &[usize]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| MlxError::invalid("MlxBuffer::concat: no parts"))?;
        let dtype = first.dtype;
        let total: usize = parts.iter().map(|b| b.len()).sum();
        if shape_len(shape, "MlxBuffer::concat")? != total {
            return Err(MlxError::invalid(format!(
                "MlxBuffer::concat: shape {shape:?} does not hold the parts' {total} elements"
            )));
        }
        for (i, b) in parts.iter().enumerate() {
            if b.dtype != dtype {
                return Err(MlxError::invalid(format!(
                    "MlxBuffer::concat: part {i} is {}, part 0 is {dtype}",
                    b.dtype
                )));
            }
            if !b.offset.is_multiple_of(4) || !b.byte_len().is_multiple_of(4) {
                return Err(MlxError::invalid(format!(
                    "MlxBuffer::concat: part {i} (bytes {}..{}) is not 4-byte aligned",
                    b.offset,
                    b.offset + b.byte_len()
                )));
            }
        }
        let out = Self::new(gpu, dtype, shape)?;
        let dev = &gpu.inner.device;
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("mlx-native concat"),
        });
        let mut at = 0;
        for b in parts {
            enc.copy_buffer_to_buffer(&b.raw.buffer, b.offset, &out.raw.buffer, at, b.byte_len());
            at += b.byte_len();
        }
        gpu.inner.queue.submit(Some(enc.finish()));
        gpu.inner.count_submit_and_map(1, 0);
        Ok(out)
    }

    /// A pooled scratch buffer, contents unspecified.
    pub fn pooled(gpu: &MlxDevice, dtype: DType, shape: &[usize]) -> Result<Self> {
        let bytes = Self::byte_size(dtype, shape, "MlxBuffer::pooled")?;
        let raw = gpu.inner.pool.acquire(bytes, gpu.caps().max_buffer_size)?;
        Ok(MlxBuffer {
            raw: Arc::new(raw),
            offset: 0,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// Upload host data into a new buffer of the given shape.
    pub fn from_slice<T: Element>(gpu: &MlxDevice, data: &[T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(gpu, bytemuck::cast_slice(data), T::DTYPE, shape)
    }

    /// Upload raw little-endian bytes as a tensor of `dtype` and `shape`.
    pub fn from_bytes(
        gpu: &MlxDevice,
        bytes: &[u8],
        dtype: DType,
        shape: &[usize],
    ) -> Result<Self> {
        let want = Self::byte_size(dtype, shape, "MlxBuffer::from_bytes")?;
        if bytes.len() as u64 != want {
            return Err(MlxError::invalid(format!(
                "MlxBuffer::from_bytes: data has {} bytes, shape {shape:?} of {dtype} needs {want}",
                bytes.len()
            )));
        }
        let buf = Self::new(gpu, dtype, shape)?;
        buf.write_bytes(gpu, 0, bytes)?;
        Ok(buf)
    }

    /// Overwrite bytes of the underlying storage starting at this view's element 0 plus
    /// `byte_offset` (queued before the next submit).
    pub fn write_bytes(&self, gpu: &MlxDevice, byte_offset: u64, bytes: &[u8]) -> Result<()> {
        let start = self.offset + byte_offset;
        let end = start + bytes.len() as u64;
        if end > self.raw.size || !start.is_multiple_of(4) {
            return Err(MlxError::invalid(format!(
                "write_bytes: bytes {start}..{end} do not fit a buffer of {} bytes at 4-byte alignment",
                self.raw.size
            )));
        }
        if bytes.len().is_multiple_of(4) {
            gpu.inner.queue.write_buffer(&self.raw.buffer, start, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            if start + padded.len() as u64 > self.raw.size {
                return Err(MlxError::invalid(
                    "write_bytes: padded write passes the buffer end",
                ));
            }
            gpu.inner
                .queue
                .write_buffer(&self.raw.buffer, start, &padded);
        }
        Ok(())
    }

    /// Overwrite the view's elements from host data of the same dtype and length.
    pub fn write<T: Element>(&self, gpu: &MlxDevice, data: &[T]) -> Result<()> {
        self.expect_host::<T>("write", data.len())?;
        self.write_bytes(gpu, 0, bytemuck::cast_slice(data))
    }

    fn expect_host<T: Element>(&self, what: &str, n: usize) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(MlxError::invalid(format!(
                "{what}: buffer is {}, host type is {}",
                self.dtype,
                T::DTYPE
            )));
        }
        if n != self.len() {
            return Err(MlxError::invalid(format!(
                "{what}: host data has {n} elements, buffer has {}",
                self.len()
            )));
        }
        Ok(())
    }

    /// Download the view's elements. Waits for all queued GPU work.
    pub fn to_vec<T: Element>(&self, gpu: &MlxDevice) -> Result<Vec<T>> {
        self.expect_host::<T>("to_vec", self.len())?;
        let bytes = self.read_bytes(gpu)?;
        // Copy into a properly aligned Vec<T>.
        let mut out = vec![T::zeroed(); self.len()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
        Ok(out)
    }

    /// Download and convert to f32 (f32, f16, bf16 buffers).
    pub fn to_f32(&self, gpu: &MlxDevice) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_vec::<f32>(gpu),
            DType::F16 => Ok(self
                .to_vec::<f16>(gpu)?
                .into_iter()
                .map(f32::from)
                .collect()),
            DType::BF16 => Ok(self
                .to_vec::<bf16>(gpu)?
                .into_iter()
                .map(f32::from)
                .collect()),
            d => Err(MlxError::invalid(format!(
                "to_f32: buffer is {d}, not a float type"
            ))),
        }
    }

    /// The view's bytes, read through a MAP_READ staging buffer (waits for the GPU).
    pub fn read_bytes(&self, gpu: &MlxDevice) -> Result<Vec<u8>> {
        gpu.begin().commit_with_readback(self)?.wait_bytes()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements in the view.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Views always have at least one element; kept for API symmetry with slices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn byte_len(&self) -> u64 {
        self.len() as u64 * self.dtype.size() as u64
    }

    /// Element offset of the view inside its storage.
    pub fn elem_offset(&self) -> usize {
        (self.offset / self.dtype.size() as u64) as usize
    }

    /// Bytes of the underlying storage.
    pub fn storage_bytes(&self) -> u64 {
        self.raw.size
    }

    /// The same storage seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n = shape_len(shape, "reshape")?;
        if n != self.len() {
            return Err(MlxError::invalid(format!(
                "reshape: {:?} has {} elements, {shape:?} has {n}",
                self.shape,
                self.len()
            )));
        }
        Ok(MlxBuffer {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// A window starting `elem_offset` elements into this view, with `shape`.
    pub fn view(&self, elem_offset: usize, shape: &[usize]) -> Result<Self> {
        let n = shape_len(shape, "view")?;
        let end = elem_offset
            .checked_add(n)
            .ok_or_else(|| MlxError::invalid("view: offset + length overflows"))?;
        if end > self.len() {
            return Err(MlxError::invalid(format!(
                "view: elements {elem_offset}..{end} pass the end of a view of {} elements",
                self.len()
            )));
        }
        Ok(MlxBuffer {
            raw: self.raw.clone(),
            offset: self.offset + (elem_offset * self.dtype.size()) as u64,
            dtype: self.dtype,
            shape: shape.to_vec(),
        })
    }

    /// The same bytes seen as another dtype (element count rescaled; must divide evenly).
    pub fn bitcast(&self, dtype: DType, shape: &[usize]) -> Result<Self> {
        let n = shape_len(shape, "bitcast")?;
        if (n * dtype.size()) as u64 != self.byte_len()
            || !self.offset.is_multiple_of(dtype.size() as u64)
        {
            return Err(MlxError::invalid(format!(
                "bitcast: {} bytes of {} cannot be seen as {shape:?} of {dtype}",
                self.byte_len(),
                self.dtype
            )));
        }
        Ok(MlxBuffer {
            raw: self.raw.clone(),
            offset: self.offset,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// How this view binds: the aligned base offset, the binding size and the element
    /// remainder the kernel adds (`view(i)` in WGSL).
    pub(crate) fn binding(&self, align: u64, max_binding: u64) -> Result<(u64, u64, u32)> {
        let base = self.offset / align * align;
        let end = (self.offset + self.byte_len()).div_ceil(4) * 4;
        let size = end - base;
        if size > max_binding {
            return Err(MlxError::invalid(format!(
                "binding of {size} bytes exceeds the device's storage-binding limit of {max_binding} \
                 bytes: split the tensor by rows"
            )));
        }
        let rem = (self.offset - base) / self.dtype.size() as u64;
        Ok((base, size, rem as u32))
    }

    /// True when both views share storage.
    pub fn same_storage(&self, other: &MlxBuffer) -> bool {
        self.raw.id == other.raw.id
    }
}

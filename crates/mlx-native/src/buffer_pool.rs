//! `BufferPool`: size-bucketed reuse of scratch buffers, so a forward pass allocates nothing
//! once it has run once.
//!
//! A buffer goes back to its bucket when the last `MlxBuffer` pointing at it is dropped. Reuse
//! is safe without fences: every pass is submitted to the one queue in order, so later work
//! that writes a reused buffer runs after earlier work that read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{MlxError, Result};

/// Usage of every storage buffer the library creates.
pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// GPU memory held by the library's buffers: now and at most.
#[derive(Debug, Default)]
pub struct MemStats {
    live: AtomicU64,
    peak: AtomicU64,
}

impl MemStats {
    fn add(&self, bytes: u64) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes allocated now (free pool buffers included: they are still held).
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// The most bytes held at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// A wgpu buffer with a stable id (bind-group cache keys) that returns to its pool on drop.
pub(crate) struct RawBuffer {
    pub buffer: wgpu::Buffer,
    pub id: u64,
    pub size: u64,
    pool: Option<Weak<BufferPool>>,
    mem: Arc<MemStats>,
}

impl Drop for RawBuffer {
    fn drop(&mut self) {
        match self.pool.as_ref().and_then(Weak::upgrade) {
            Some(pool) => pool.release(self.buffer.clone(), self.id, self.size),
            None => self.mem.sub(self.size),
        }
    }
}

/// Free scratch buffers by bucket size.
pub struct BufferPool {
    device: wgpu::Device,
    mem: Arc<MemStats>,
    free: Mutex<HashMap<u64, Vec<(wgpu::Buffer, u64)>>>,
    created: AtomicU64,
    created_bytes: AtomicU64,
}

impl BufferPool {
    pub(crate) fn new(device: wgpu::Device, mem: Arc<MemStats>) -> Self {
        BufferPool {
            device,
            mem,
            free: Mutex::new(HashMap::new()),
            created: AtomicU64::new(0),
            created_bytes: AtomicU64::new(0),
        }
    }

    /// The bucket a request of `bytes` lands in: at least 256 B, then rounded up to a quarter
    /// of its power of two, so no request wastes more than 25%.
    pub fn bucket(bytes: u64) -> u64 {
        let b = bytes.max(256);
        let step = (1u64 << (63 - b.leading_zeros())) / 4;
        b.div_ceil(step) * step
    }

    /// Buffers created so far (tests check reuse by counting).
    pub fn created_count(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// Bytes of all buffers the pool has created (its peak footprint).
    pub fn created_bytes(&self) -> u64 {
        self.created_bytes.load(Ordering::Relaxed)
    }

    /// Drop every free buffer.
    pub fn trim(&self) {
        if let Ok(mut f) = self.free.lock() {
            for (size, list) in f.drain() {
                self.mem.sub(size * list.len() as u64);
            }
        }
    }

    /// Free lists are kept in descending id order, so `acquire` hands out the oldest free
    /// buffer of a size: the same sequence of allocations then gets the same buffers every
    /// time (whatever order the previous pass dropped them in), and every dispatch of a
    /// repeated decode step finds its bind group in the cache instead of creating one.
    fn release(&self, buffer: wgpu::Buffer, id: u64, size: u64) {
        if let Ok(mut f) = self.free.lock() {
            let list = f.entry(size).or_default();
            let at = list.partition_point(|&(_, i)| i > id);
            list.insert(at, (buffer, id));
        }
    }

    /// A buffer of at least `bytes`, reused when one is free.
    pub(crate) fn acquire(self: &Arc<Self>, bytes: u64, max: u64) -> Result<RawBuffer> {
        let size = Self::bucket(bytes);
        let reused = self
            .free
            .lock()
            .map_err(|_| MlxError::Gpu("buffer pool lock poisoned".into()))?
            .get_mut(&size)
            .and_then(Vec::pop);
        if let Some((buffer, id)) = reused {
            return Ok(RawBuffer {
                buffer,
                id,
                size,
                pool: Some(Arc::downgrade(self)),
                mem: self.mem.clone(),
            });
        }
        let mut raw = create_raw(&self.device, &self.mem, size, max, "mlx-native scratch")?;
        raw.pool = Some(Arc::downgrade(self));
        self.created.fetch_add(1, Ordering::Relaxed);
        self.created_bytes.fetch_add(size, Ordering::Relaxed);
        Ok(raw)
    }
}

/// A dedicated (unpooled) storage buffer of `bytes`, rounded up to 16.
pub(crate) fn create_raw(
    device: &wgpu::Device,
    mem: &Arc<MemStats>,
    bytes: u64,
    max: u64,
    label: &str,
) -> Result<RawBuffer> {
    let size = bytes.max(16).div_ceil(16) * 16;
    if size > max {
        return Err(MlxError::Gpu(format!(
            "{label}: buffer of {size} bytes exceeds the device's maximum buffer size {max}"
        )));
    }
    let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: STORAGE_USAGE,
        mapped_at_creation: false,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(MlxError::Gpu(format!(
            "{label}: allocating {size} bytes: {e}"
        )));
    }
    mem.add(size);
    Ok(RawBuffer {
        buffer,
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        size,
        pool: None,
        mem: mem.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_waste_at_most_a_quarter() {
        for bytes in [1u64, 255, 256, 257, 1000, 4096, 4097, 123_456_789] {
            let b = BufferPool::bucket(bytes);
            assert!(b >= bytes && b >= 256, "{bytes} -> {b}");
            assert!(
                b as f64 <= (bytes.max(256) as f64) * 1.25 + 1.0,
                "{bytes} -> {b}"
            );
        }
        assert_eq!(BufferPool::bucket(1000), BufferPool::bucket(1024));
    }
}

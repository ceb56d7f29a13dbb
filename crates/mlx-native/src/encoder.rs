//! `Pass`: records dispatches, then encodes them into one compute pass and one submit.
//!
//! Each dispatch is a `Step`: a pipeline, a cached bind group of storage buffers, and the
//! offsets of its parameter block and view offsets in the pass's uniform arena. Recording
//! first and encoding at commit keeps the hot loop free of wgpu lifetimes and is what graph
//! replay builds on.

use std::collections::HashMap;
use std::sync::Arc;

use bytemuck::Pod;

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, Spec};

/// Largest parameter block a kernel may take.
pub const MAX_PARAMS_BYTES: usize = 256;
/// Storage buffers per dispatch (view offsets travel in two vec4s).
pub const MAX_BUFFERS: usize = 8;
const VIEWS_BYTES: u64 = 32;

/// Fold a linear count of workgroups into a grid whose dimensions stay within `max`.
/// Kernels recover the linear index with `flat_wg` and guard it.
pub fn fold_grid(n: u32, max: u32) -> [u32; 3] {
    let max = max.max(1);
    if n <= max {
        return [n.max(1), 1, 1];
    }
    let y = n.div_ceil(max);
    if y <= max {
        return [max, y, 1];
    }
    [max, max, y.div_ceil(max)]
}

/// Bind groups by pipeline and (buffer, offset, size) per binding; bounded.
/// (pipeline id, per binding (buffer id, offset, size)).
type BindGroupKey = (u64, Vec<(u64, u64, u64)>);

#[derive(Default)]
pub(crate) struct BindGroupCache {
    map: HashMap<BindGroupKey, wgpu::BindGroup>,
    pub created: u64,
}

const BIND_GROUP_CACHE_MAX: usize = 16_384;

/// GPU time of one dispatch, from timestamp queries.
#[derive(Clone, Debug)]
pub struct KernelTiming {
    pub label: Arc<str>,
    pub nanos: f64,
}

struct Step {
    pipeline: wgpu::ComputePipeline,
    buffers: wgpu::BindGroup,
    params_layout: wgpu::BindGroupLayout,
    params_off: u32,
    views_off: u32,
    grid: [u32; 3],
    label: Arc<str>,
}

/// A recording of GPU work: encoder, registry and pool in one handle.
pub struct Pass {
    gpu: MlxDevice,
    steps: Vec<Step>,
    /// Every buffer a recorded step binds, held until the pass is submitted: a temporary
    /// dropped by its op while the pass is still open must not go back to the pool, where
    /// another pass (possibly on another thread) could take it and be submitted first.
    keep: Vec<std::sync::Arc<crate::buffer_pool::RawBuffer>>,
    arena: Vec<u8>,
    profile: bool,
}

impl Pass {
    pub(crate) fn new(gpu: MlxDevice) -> Self {
        Pass {
            gpu,
            steps: Vec::new(),
            keep: Vec::new(),
            arena: Vec::new(),
            profile: false,
        }
    }

    /// Time every dispatch with GPU timestamps (when the device has them).
    pub fn with_profiling(mut self, on: bool) -> Self {
        self.profile = on && self.gpu.caps().timestamps;
        self
    }

    pub fn gpu(&self) -> &MlxDevice {
        &self.gpu
    }

    pub fn caps(&self) -> &crate::device::Caps {
        self.gpu.caps()
    }

    /// Dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// A pooled output buffer (poisoned with NaN when the device was opened with
    /// `poison_allocations`).
    pub fn alloc(&mut self, dtype: DType, shape: &[usize]) -> Result<MlxBuffer> {
        let buf = MlxBuffer::pooled(&self.gpu, dtype, shape)?;
        if self.gpu.inner.poison {
            // Whole words covering the buffer (a pooled buffer starts at byte 0 and its
            // storage is a multiple of 16 bytes, so odd 16-bit lengths are covered too).
            let words = buf.byte_len().div_ceil(4) as usize;
            let all = MlxBuffer::from_raw(buf.raw.clone(), DType::U32, &[words]);
            crate::ops::fill::fill_u32_words(self, &all, 0xFFFF_FFFF)?;
        }
        Ok(buf)
    }

    /// A pooled buffer of the same dtype and shape as `like`.
    pub fn alloc_like(&mut self, like: &MlxBuffer) -> Result<MlxBuffer> {
        self.alloc(like.dtype(), like.shape())
    }

    fn push_uniform(&mut self, bytes: &[u8], slot: u64) -> u32 {
        let align = u64::from(self.gpu.caps().uniform_offset_alignment.max(16));
        let off = (self.arena.len() as u64).div_ceil(align) * align;
        self.arena.resize(off as usize, 0);
        self.arena.extend_from_slice(bytes);
        self.arena.resize((off + slot) as usize, 0);
        off as u32
    }

    /// Record one dispatch of `kernel` specialized by `spec`, with `params` as its uniform
    /// block and `buffers` as its storage bindings in order, over `workgroups` workgroups
    /// (folded into 2-D/3-D when over the per-dimension limit).
    pub fn dispatch<P: Pod>(
        &mut self,
        kernel: Kernel,
        spec: Spec,
        params: &P,
        buffers: &[&MlxBuffer],
        workgroups: u32,
    ) -> Result<()> {
        let pipe = self.gpu.pipeline(kernel, spec)?;
        if buffers.len() != pipe.slots || buffers.len() > MAX_BUFFERS {
            return Err(MlxError::invalid(format!(
                "{}: {} buffers given, the kernel takes {}",
                pipe.label,
                buffers.len(),
                pipe.slots
            )));
        }
        let p = bytemuck::bytes_of(params);
        if p.len() > MAX_PARAMS_BYTES {
            return Err(MlxError::invalid(format!(
                "{}: params of {} bytes exceed {MAX_PARAMS_BYTES}",
                pipe.label,
                p.len()
            )));
        }
        let caps = self.gpu.caps();
        let align = u64::from(caps.storage_offset_alignment.max(4));
        let max_binding = caps.max_storage_binding;
        let max_wg = caps.max_workgroups_per_dimension;
        let mut key = Vec::with_capacity(pipe.storage.len());
        let mut views = [0u32; MAX_BUFFERS];
        for &(binding, _) in &pipe.storage {
            let i = binding as usize;
            let b = buffers.get(i).ok_or_else(|| {
                MlxError::invalid(format!("{}: no buffer for binding {i}", pipe.label))
            })?;
            let (base, size, rem) = b
                .binding(align, max_binding)
                .map_err(|e| MlxError::invalid(format!("{}: buffer {i}: {e}", pipe.label)))?;
            key.push((b.raw.id, base, size));
            views[i] = rem;
            self.keep.push(b.raw.clone());
        }
        let bind_group = {
            let mut cache = self
                .gpu
                .inner
                .bind_groups
                .lock()
                .map_err(|_| MlxError::Gpu("bind-group cache poisoned".into()))?;
            let cache_key = (pipe.id, key);
            match cache.map.get(&cache_key) {
                Some(bg) => bg.clone(),
                None => {
                    let entries: Vec<wgpu::BindGroupEntry> = pipe
                        .storage
                        .iter()
                        .zip(cache_key.1.iter())
                        .map(|(&(binding, _), &(_, base, size))| wgpu::BindGroupEntry {
                            binding,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &buffers[binding as usize].raw.buffer,
                                offset: base,
                                size: wgpu::BufferSize::new(size),
                            }),
                        })
                        .collect();
                    let bg = self
                        .gpu
                        .inner
                        .device
                        .create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(&pipe.label),
                            layout: &pipe.buffers_layout,
                            entries: &entries,
                        });
                    if cache.map.len() >= BIND_GROUP_CACHE_MAX {
                        cache.map.clear();
                    }
                    cache.created += 1;
                    cache.map.insert(cache_key, bg.clone());
                    bg
                }
            }
        };
        let params_off = self.push_uniform(p, MAX_PARAMS_BYTES as u64);
        let views_off = self.push_uniform(bytemuck::cast_slice(&views), VIEWS_BYTES);
        let grid = fold_grid(workgroups, max_wg);
        self.steps.push(Step {
            pipeline: pipe.pipeline,
            buffers: bind_group,
            params_layout: pipe.params_layout,
            params_off,
            views_off,
            grid,
            label: pipe.label,
        });
        Ok(())
    }

    /// Encode everything recorded into one compute pass and submit it.
    pub fn commit(self) -> Result<()> {
        self.submit().map(|_| ())
    }

    /// Submit and wait; returns per-dispatch GPU times when profiling, else an empty list.
    pub fn commit_and_wait(self) -> Result<Vec<KernelTiming>> {
        let gpu = self.gpu.clone();
        let pending = self.submit()?;
        gpu.wait_idle()?;
        match pending {
            Some(p) => p.read(&gpu),
            None => Ok(Vec::new()),
        }
    }

    fn submit(self) -> Result<Option<PendingTimings>> {
        if self.steps.is_empty() {
            return Ok(None);
        }
        let inner = &self.gpu.inner;
        let dev = &inner.device;
        let arena_size = (self.arena.len() as u64).div_ceil(16) * 16;
        let uniforms = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mlx-native params"),
            size: arena_size,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut arena = self.arena;
        arena.resize(arena_size as usize, 0);
        inner.queue.write_buffer(&uniforms, 0, &arena);

        // One params bind group per distinct layout in this pass.
        let mut params_groups: Vec<(wgpu::BindGroupLayout, wgpu::BindGroup)> = Vec::new();
        let mut step_groups = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            let idx = match params_groups
                .iter()
                .position(|(l, _)| *l == s.params_layout)
            {
                Some(i) => i,
                None => {
                    let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("mlx-native params"),
                        layout: &s.params_layout,
                        entries: &[
                            wgpu::BindGroupEntry {
                                binding: 0,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &uniforms,
                                    offset: 0,
                                    size: wgpu::BufferSize::new(MAX_PARAMS_BYTES as u64),
                                }),
                            },
                            wgpu::BindGroupEntry {
                                binding: 1,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &uniforms,
                                    offset: 0,
                                    size: wgpu::BufferSize::new(VIEWS_BYTES),
                                }),
                            },
                        ],
                    });
                    params_groups.push((s.params_layout.clone(), bg));
                    params_groups.len() - 1
                }
            };
            step_groups.push(idx);
        }

        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("mlx-native pass"),
        });
        let mut pending = None;
        if self.profile {
            let n = self.steps.len() as u32;
            let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("mlx-native timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * n,
            });
            for (i, s) in self.steps.iter().enumerate() {
                let mut cp = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(&s.label),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &qs,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                encode_step(&mut cp, s, &params_groups[step_groups[i]].1);
            }
            let bytes = 16 * u64::from(n);
            let resolve = dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("mlx-native timestamps resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let readback = dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("mlx-native timestamps readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.resolve_query_set(&qs, 0..2 * n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &readback, 0, bytes);
            pending = Some(PendingTimings {
                readback,
                labels: self.steps.iter().map(|s| s.label.clone()).collect(),
                period: self.gpu.caps().timestamp_period,
            });
        } else {
            let mut cp = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("mlx-native"),
                timestamp_writes: None,
            });
            for (i, s) in self.steps.iter().enumerate() {
                encode_step(&mut cp, s, &params_groups[step_groups[i]].1);
            }
        }
        inner.queue.submit(Some(enc.finish()));
        inner.count_submit_and_map(1, u64::from(self.profile));
        // Submitted: later users of these buffers are ordered after this work on the queue.
        drop(self.keep);
        self.gpu.take_uncaptured()?;
        Ok(pending)
    }
}

fn encode_step(cp: &mut wgpu::ComputePass<'_>, s: &Step, params: &wgpu::BindGroup) {
    cp.set_pipeline(&s.pipeline);
    cp.set_bind_group(0, &s.buffers, &[]);
    cp.set_bind_group(1, params, &[s.params_off, s.views_off]);
    cp.dispatch_workgroups(s.grid[0], s.grid[1], s.grid[2]);
}

struct PendingTimings {
    readback: wgpu::Buffer,
    labels: Vec<Arc<str>>,
    period: f32,
}

impl PendingTimings {
    fn read(self, gpu: &MlxDevice) -> Result<Vec<KernelTiming>> {
        let slice = self.readback.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.wait_idle()?;
        rx.recv()
            .map_err(|_| MlxError::Gpu("timestamps: map callback never ran".into()))?
            .map_err(|e| MlxError::Gpu(format!("timestamps: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| MlxError::Gpu(format!("timestamps: {e}")))?;
        let ticks: &[u64] = bytemuck::cast_slice(&data);
        let out = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let a = ticks.get(2 * i).copied().unwrap_or(0);
                let b = ticks.get(2 * i + 1).copied().unwrap_or(0);
                KernelTiming {
                    label: l.clone(),
                    nanos: b.saturating_sub(a) as f64 * f64::from(self.period),
                }
            })
            .collect();
        drop(data);
        self.readback.unmap();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_grid_covers_and_respects_limits() {
        for &(n, max) in &[
            (1u32, 65_535u32),
            (65_535, 65_535),
            (65_536, 65_535),
            (1_000_000, 65_535),
            (u32::MAX, 65_535),
            (17, 4),
            (60, 4),
        ] {
            let g = fold_grid(n, max);
            assert!(g.iter().all(|&d| d >= 1 && d <= max), "{n} {max} {g:?}");
            let total = u64::from(g[0]) * u64::from(g[1]) * u64::from(g[2]);
            assert!(total >= u64::from(n), "{n} {max} {g:?}");
            // Waste is at most one row (or plane) of the grid.
            assert!(
                total - u64::from(n) < u64::from(g[0]) * u64::from(g[1]),
                "{n} {max} {g:?}"
            );
        }
    }
}

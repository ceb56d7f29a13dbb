//! `Pass`: records dispatches, then encodes them into one compute pass and one submit.
//!
//! Each dispatch is a `Step`: a pipeline, a cached bind group of storage buffers, and the
//! offsets of its parameter block and view offsets in the pass's uniform arena. Recording
//! first and encoding at commit keeps the hot loop free of wgpu lifetimes, and a recorded
//! pass can be kept and replayed per token instead ([`Pass::capture`], [`crate::Graph`]).

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

/// Measurement only: dispatches whose kernel label contains this text are not recorded
/// (`set_skip_dispatches`). A decode pass without them is the bound of what they cost in it.
static SKIP: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);
static SKIP_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Measurement only (timing; results are wrong on purpose): from now on, dispatches whose
/// kernel label (`Spec::label`) contains `pattern` are dropped instead of recorded; `None`
/// records everything again. What a pass loses without them is what they cost inside it
/// (the kernels after them no longer wait for them either).
#[doc(hidden)]
pub fn set_skip_dispatches(pattern: Option<&str>) {
    if let Ok(mut s) = SKIP.write() {
        *s = pattern.map(str::to_string);
        SKIP_ON.store(s.is_some(), std::sync::atomic::Ordering::Relaxed);
    }
}

fn skipped(label: &str) -> bool {
    SKIP_ON.load(std::sync::atomic::Ordering::Relaxed)
        && SKIP
            .read()
            .ok()
            .and_then(|s| s.as_deref().map(|p| label.contains(p)))
            .unwrap_or(false)
}

pub(crate) struct Step {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) buffers: wgpu::BindGroup,
    pub(crate) params_layout: wgpu::BindGroupLayout,
    pub(crate) params_off: u32,
    pub(crate) views_off: u32,
    pub(crate) grid: [u32; 3],
    pub(crate) label: Arc<str>,
}

/// A buffer-to-buffer copy encoded after the compute pass: (source, offset, destination,
/// offset, bytes).
pub(crate) type Copy = (
    Arc<crate::buffer_pool::RawBuffer>,
    u64,
    Arc<crate::buffer_pool::RawBuffer>,
    u64,
    u64,
);

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
    /// Time the whole pass with two timestamps instead of each dispatch.
    time_pass: bool,
    /// Copies between storage buffers, encoded after the compute pass (before `readbacks`).
    copies: Vec<Copy>,
    /// Recording for replay ([`Pass::capture`]).
    capture: Option<crate::graph::Capture>,
    /// The step the latest `dispatch` recorded (None when it was skipped).
    last: Option<usize>,
    /// Copies into MAP_READ staging buffers, encoded after the compute pass.
    readbacks: Vec<(MlxBuffer, Staged)>,
}

impl Pass {
    pub(crate) fn new(gpu: MlxDevice) -> Self {
        Pass {
            gpu,
            steps: Vec::new(),
            keep: Vec::new(),
            arena: Vec::new(),
            profile: false,
            time_pass: false,
            copies: Vec::new(),
            capture: None,
            last: None,
            readbacks: Vec::new(),
        }
    }

    /// Record this pass to be kept and replayed ([`Pass::into_graph`]): `at` is the token
    /// it is recorded for. Ops whose parameters follow the token (positions, the attention's
    /// range, the sampler's draw) say how ([`Pass::vary_last`]); ops that cannot be replayed
    /// refuse ([`Pass::refuse_replay`]), and `into_graph` then fails.
    pub fn capture(mut self, at: crate::graph::TokenVars) -> Self {
        self.capture = Some(crate::graph::Capture::new(at));
        self
    }

    /// Whether this pass is recorded for replay: ops record how their parameters vary only
    /// then.
    pub fn is_capturing(&self) -> bool {
        self.capture.is_some()
    }

    /// For ops, while capturing: how the parameters (`P`, the type the latest dispatch was
    /// given) and the workgroup count of the latest dispatch follow the token. `f` gets the
    /// tokens since the capture and the new token's values, and returns the new parameters
    /// and workgroups, or `None` when the recorded structure no longer fits (the graph must
    /// be recorded again). Does nothing when not capturing or when that dispatch was skipped.
    pub fn vary_last<P, F>(&mut self, f: F)
    where
        P: Pod,
        F: Fn(&crate::graph::Advance) -> Result<Option<(P, u32)>> + Send + 'static,
    {
        if let (Some(c), Some(step)) = (self.capture.as_mut(), self.last) {
            c.vary(step, f);
        }
    }

    /// For ops, while capturing: this pass cannot be replayed (`why` names the op and the
    /// reason); [`Pass::into_graph`] then returns that as its error.
    pub fn refuse_replay(&mut self, why: &str) {
        if let Some(c) = self.capture.as_mut() {
            c.refuse(why);
        }
    }

    /// Why this captured pass cannot be replayed, if an op refused.
    pub fn replay_refused(&self) -> Option<&str> {
        self.capture.as_ref().and_then(|c| c.refused())
    }

    /// Copy `src` into `dst` (the same number of bytes, 4-byte aligned) after the pass's
    /// dispatches, in the same submission: e.g. a decode step's sampled id into the buffer the
    /// next step embeds from.
    pub fn copy_after(&mut self, src: &MlxBuffer, dst: &MlxBuffer) -> Result<()> {
        let (n, m) = (src.byte_len(), dst.byte_len());
        if n != m
            || n == 0
            || !n.is_multiple_of(4)
            || !src.offset.is_multiple_of(4)
            || !dst.offset.is_multiple_of(4)
        {
            return Err(MlxError::invalid(format!(
                "copy_after: {n} bytes at offset {} into {m} bytes at offset {}: expected equal, \
                 nonzero, 4-byte aligned sizes and offsets",
                src.offset, dst.offset
            )));
        }
        if src.raw.id == dst.raw.id {
            return Err(MlxError::invalid(
                "copy_after: source and destination are the same buffer",
            ));
        }
        self.copies
            .push((src.raw.clone(), src.offset, dst.raw.clone(), dst.offset, n));
        Ok(())
    }

    /// The recording as a [`crate::Graph`] (see [`Pass::capture`]), not yet submitted.
    pub fn into_graph(self) -> Result<crate::Graph> {
        let capture = self.capture.ok_or_else(|| {
            MlxError::invalid("into_graph: the pass was not recorded with Pass::capture")
        })?;
        if self.profile || self.time_pass || !self.readbacks.is_empty() {
            return Err(MlxError::invalid(
                "into_graph: a captured pass takes no profiling, pass timing or readbacks",
            ));
        }
        crate::graph::Graph::new(
            self.gpu,
            self.steps,
            self.arena,
            capture,
            self.copies,
            self.keep,
        )
    }

    /// Time the whole pass (one compute pass between two timestamps, when the device has
    /// them): `commit_and_wait` then returns one timing labelled `pass`. Unlike
    /// `with_profiling`, dispatches run as in production (no pass per dispatch), so this is
    /// the GPU time of a real stream of dependent dispatches.
    pub fn with_pass_timing(mut self, on: bool) -> Self {
        self.time_pass = on && self.gpu.caps().timestamps;
        self
    }

    /// Submit, with a copy of `buf` to host-readable memory at the end of the same
    /// submission; returns at once. [`Readback::wait`] later waits for this submission only
    /// (later submissions keep running), so the host can record and submit the next step
    /// while this one executes.
    pub fn commit_with_readback(mut self, buf: &MlxBuffer) -> Result<Readback> {
        let staged = Staged::new(&self.gpu, buf);
        self.readbacks.push((buf.clone(), staged.clone()));
        let gpu = self.gpu.clone();
        let (_, index) = self.submit_indexed()?;
        Ok(staged.into_readback(gpu, index))
    }

    /// The parameter bytes (params and view offsets) and workgroup grid of every step
    /// recorded so far (tests: see [`crate::Graph::params_at`]).
    #[doc(hidden)]
    pub fn params_now(&self) -> Vec<crate::graph::StepParams> {
        crate::graph::steps_params(&self.steps, &self.arena)
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

    /// The kernel variant of each dispatch recorded so far, in order (`Spec::label`): what a
    /// step runs, for tests and profiles.
    pub fn labels(&self) -> Vec<Arc<str>> {
        self.steps.iter().map(|s| s.label.clone()).collect()
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
        self.last = None;
        let pipe = self.gpu.pipeline(kernel, spec)?;
        if skipped(&pipe.label) {
            return Ok(());
        }
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
        self.last = Some(self.steps.len() - 1);
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
        self.submit_indexed().map(|(p, _)| p)
    }

    fn submit_indexed(self) -> Result<(Option<PendingTimings>, Option<wgpu::SubmissionIndex>)> {
        if self.steps.is_empty() && self.readbacks.is_empty() && self.copies.is_empty() {
            return Ok((None, None));
        }
        let inner = &self.gpu.inner;
        let dev = &inner.device;
        let mut arena = self.arena;
        let uniforms = uniform_buffer(dev, &mut arena);
        inner.queue.write_buffer(&uniforms, 0, &arena);
        let (params_groups, step_groups) = params_groups(dev, &self.steps, &uniforms);

        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("mlx-native pass"),
        });
        let mut pending = None;
        if self.steps.is_empty() {
            // Only readbacks.
        } else if self.profile || self.time_pass {
            let passes: Vec<(usize, usize)> = if self.profile {
                (0..self.steps.len()).map(|i| (i, i + 1)).collect()
            } else {
                vec![(0, self.steps.len())]
            };
            let n = passes.len() as u32;
            let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("mlx-native timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * n,
            });
            for (pi, &(a, b)) in passes.iter().enumerate() {
                let label = if self.profile {
                    self.steps[a].label.clone()
                } else {
                    Arc::from("pass")
                };
                let mut cp = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(&label),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &qs,
                        beginning_of_pass_write_index: Some(2 * pi as u32),
                        end_of_pass_write_index: Some(2 * pi as u32 + 1),
                    }),
                });
                encode_steps(
                    &mut cp,
                    &self.steps[a..b],
                    &params_groups,
                    &step_groups[a..b],
                );
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
            let labels = if self.profile {
                self.steps.iter().map(|s| s.label.clone()).collect()
            } else {
                vec![Arc::from("pass")]
            };
            pending = Some(PendingTimings {
                readback,
                labels,
                period: self.gpu.caps().timestamp_period,
            });
        } else {
            let mut cp = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("mlx-native"),
                timestamp_writes: None,
            });
            encode_steps(&mut cp, &self.steps, &params_groups, &step_groups);
        }
        encode_copies(&mut enc, &self.copies);
        for (buf, staged) in &self.readbacks {
            staged.encode(&mut enc, buf);
        }
        let index = inner.queue.submit(Some(enc.finish()));
        inner.count_submit_and_map(
            1,
            u64::from(pending.is_some()) + self.readbacks.len() as u64,
        );
        // Submitted: later users of these buffers are ordered after this work on the queue.
        drop(self.keep);
        self.gpu.take_uncaptured()?;
        Ok((pending, Some(index)))
    }
}

/// A host-readable copy of a buffer's bytes: the staging buffer and the word-aligned range
/// copied into it.
#[derive(Clone)]
pub(crate) struct Staged {
    staging: wgpu::Buffer,
    a0: u64,
    size: u64,
    lo: usize,
    len: usize,
}

impl Staged {
    pub(crate) fn new(gpu: &MlxDevice, buf: &MlxBuffer) -> Self {
        let start = buf.offset;
        let len = buf.byte_len();
        let a0 = start / 4 * 4;
        let size = ((start + len).div_ceil(4) * 4 - a0).max(4);
        let staging = gpu.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mlx-native readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Staged {
            staging,
            a0,
            size,
            lo: (start - a0) as usize,
            len: len as usize,
        }
    }

    /// Encode the copy of `buf` (the buffer this was made for) into the staging buffer.
    pub(crate) fn encode(&self, enc: &mut wgpu::CommandEncoder, buf: &MlxBuffer) {
        enc.copy_buffer_to_buffer(&buf.raw.buffer, self.a0, &self.staging, 0, self.size);
    }

    /// The download, once the submission `index` that holds the copy is made.
    pub(crate) fn into_readback(
        self,
        gpu: MlxDevice,
        index: Option<wgpu::SubmissionIndex>,
    ) -> Readback {
        Readback {
            gpu,
            staging: self.staging,
            index,
            lo: self.lo,
            len: self.len,
        }
    }
}

/// A download in flight (see [`Pass::commit_with_readback`]).
pub struct Readback {
    gpu: MlxDevice,
    staging: wgpu::Buffer,
    index: Option<wgpu::SubmissionIndex>,
    lo: usize,
    len: usize,
}

impl Readback {
    /// Wait for the submission that made this copy (not for later ones) and return the bytes.
    pub fn wait_bytes(self) -> Result<Vec<u8>> {
        let slice = self.staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.gpu
            .inner
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: self.index.clone(),
                timeout: None,
            })
            .map_err(|e| MlxError::Gpu(format!("readback: poll: {e}")))?;
        rx.recv()
            .map_err(|_| MlxError::Gpu("readback: map callback never ran".into()))?
            .map_err(|e| MlxError::Gpu(format!("readback: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| MlxError::Gpu(format!("readback: {e}")))?;
        let out = data
            .get(self.lo..self.lo + self.len)
            .ok_or_else(|| MlxError::Gpu("readback: short staging buffer".into()))?
            .to_vec();
        drop(data);
        self.staging.unmap();
        self.gpu.take_uncaptured()?;
        Ok(out)
    }

    /// Like [`Readback::wait_bytes`], as elements of `T`.
    pub fn wait<T: crate::dtype::Element>(self) -> Result<Vec<T>> {
        let bytes = self.wait_bytes()?;
        let n = bytes.len() / std::mem::size_of::<T>();
        let mut out = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut out)
            .copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
        Ok(out)
    }
}

/// The uniform buffer of a pass's parameter arena, the arena padded to its size (a multiple
/// of 16 bytes, at least 16: a pass of readbacks only has no params).
pub(crate) fn uniform_buffer(dev: &wgpu::Device, arena: &mut Vec<u8>) -> wgpu::Buffer {
    let size = (arena.len() as u64).div_ceil(16).max(1) * 16;
    arena.resize(size as usize, 0);
    dev.create_buffer(&wgpu::BufferDescriptor {
        label: Some("mlx-native params"),
        size,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// The params bind groups of `steps` over `uniforms` (one per distinct layout, read at the
/// steps' dynamic offsets) and each step's index into them.
pub(crate) fn params_groups(
    dev: &wgpu::Device,
    steps: &[Step],
    uniforms: &wgpu::Buffer,
) -> (Vec<(wgpu::BindGroupLayout, wgpu::BindGroup)>, Vec<usize>) {
    let mut groups: Vec<(wgpu::BindGroupLayout, wgpu::BindGroup)> = Vec::new();
    let mut of_step = Vec::with_capacity(steps.len());
    for s in steps {
        let idx = match groups.iter().position(|(l, _)| *l == s.params_layout) {
            Some(i) => i,
            None => {
                let entry = |binding, size| wgpu::BindGroupEntry {
                    binding,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: uniforms,
                        offset: 0,
                        size: wgpu::BufferSize::new(size),
                    }),
                };
                let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("mlx-native params"),
                    layout: &s.params_layout,
                    entries: &[entry(0, MAX_PARAMS_BYTES as u64), entry(1, VIEWS_BYTES)],
                });
                groups.push((s.params_layout.clone(), bg));
                groups.len() - 1
            }
        };
        of_step.push(idx);
    }
    (groups, of_step)
}

/// Encode `steps` (the pipeline set only where it changes).
pub(crate) fn encode_steps(
    cp: &mut wgpu::ComputePass<'_>,
    steps: &[Step],
    groups: &[(wgpu::BindGroupLayout, wgpu::BindGroup)],
    of_step: &[usize],
) {
    let mut current: Option<&wgpu::ComputePipeline> = None;
    for (s, &g) in steps.iter().zip(of_step) {
        if current != Some(&s.pipeline) {
            cp.set_pipeline(&s.pipeline);
            current = Some(&s.pipeline);
        }
        cp.set_bind_group(0, &s.buffers, &[]);
        if let Some((_, params)) = groups.get(g) {
            cp.set_bind_group(1, params, &[s.params_off, s.views_off]);
        }
        cp.dispatch_workgroups(s.grid[0], s.grid[1], s.grid[2]);
    }
}

/// Encode buffer-to-buffer copies.
pub(crate) fn encode_copies(enc: &mut wgpu::CommandEncoder, copies: &[Copy]) {
    for (src, so, dst, d_o, n) in copies {
        enc.copy_buffer_to_buffer(&src.buffer, *so, &dst.buffer, *d_o, *n);
    }
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

    /// A readback of one pass while a later pass is in flight returns that pass's values
    /// (not the later pass's), from a view at an odd element offset; whole-pass timing gives
    /// one positive timing.
    #[test]
    fn readback_waits_for_its_own_submission() {
        let gpu = crate::testutil::gpu();
        let mut rng = crate::testutil::Rng::new(7);
        let n = 37;
        let a: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let ab = MlxBuffer::from_slice(gpu, &a, &[n]).unwrap();
        let bb = MlxBuffer::from_slice(gpu, &b, &[n]).unwrap();
        let mut pass = gpu.begin();
        let sum = crate::ops::add(&mut pass, &ab, &bb).unwrap();
        let view = sum.view(3, &[n - 5]).unwrap();
        let first = pass.commit_with_readback(&view).unwrap();
        // A second pass overwrites a pooled buffer of the same size with other values.
        let mut pass = gpu.begin().with_pass_timing(true);
        let scaled = crate::ops::scale(&mut pass, &ab, 3.0).unwrap();
        let second = pass.commit_with_readback(&scaled).unwrap();
        let got = first.wait::<f32>().unwrap();
        assert_eq!(got.len(), n - 5);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(*g, a[i + 3] + b[i + 3], "element {i}");
        }
        let got = second.wait::<f32>().unwrap();
        for (i, g) in got.iter().enumerate() {
            assert_eq!(*g, a[i] * 3.0, "element {i}");
        }
        let mut pass = gpu.begin().with_pass_timing(true);
        crate::ops::add(&mut pass, &ab, &bb).unwrap();
        crate::ops::add(&mut pass, &ab, &bb).unwrap();
        let t = pass.commit_and_wait().unwrap();
        if gpu.caps().timestamps {
            assert_eq!(t.len(), 1);
            assert_eq!(&*t[0].label, "pass");
        } else {
            assert!(t.is_empty());
        }
    }
}

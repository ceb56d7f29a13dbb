//! `MlxDevice`: adapter choice, the wgpu device and queue, and `Caps`, what the adapter can do.

use std::sync::{Arc, Mutex};

use crate::buffer_pool::BufferPool;
use crate::error::{MlxError, Result};
use crate::kernels::{Kernel, KernelRegistry, Pipeline, Spec};

/// Choices made when opening a device. `Default` takes the best adapter with everything it has.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Pick the first adapter whose name contains this (case-insensitive). When `None`, the
    /// `MLX_NATIVE_ADAPTER` environment variable is consulted.
    pub adapter: Option<String>,
    /// Pretend storage bindings are at most this many bytes (tests of the split paths).
    pub max_storage_binding: Option<u64>,
    /// Never use subgroup operations (tests of the workgroup-memory fallbacks).
    pub disable_subgroups: bool,
    /// Never use cooperative matrices (tests of the tiled scalar paths).
    pub disable_cooperative_matrix: bool,
    /// Never use `f16` arithmetic in shaders.
    pub disable_f16: bool,
    /// Fill every buffer a pass allocates with NaN before use, so an element a kernel fails
    /// to write is caught by tests.
    pub poison_allocations: bool,
    /// Keep wgpu's loop bounding in every kernel (an iteration counter naga adds to each
    /// loop so that an infinite loop cannot hang the GPU). Off by default: our loops are
    /// bounded by validated parameters, and the counter stops NVIDIA's compiler from
    /// unrolling loops, which pushes private arrays into local memory (3x slower decode
    /// attention on an H100). `MLX_NATIVE_LOOP_BOUNDING=1` turns it on too. Bounds checks of
    /// buffer accesses stay on either way.
    pub loop_bounding: bool,
}

/// One cooperative-matrix shape the adapter supports for f16 inputs and f32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// What the opened device can do. Kernel variant choice reads only this.
#[derive(Clone, Debug)]
pub struct Caps {
    pub adapter_name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// Subgroup operations usable in compute shaders.
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// `f16` arithmetic in WGSL.
    pub shader_f16: bool,
    /// Kernels are compiled with wgpu's loop bounding (see [`DeviceOptions::loop_bounding`]).
    pub loop_bounding: bool,
    /// GPU timestamp queries (per-dispatch timing).
    pub timestamps: bool,
    /// Nanoseconds per timestamp tick.
    pub timestamp_period: f32,
    /// f16 x f16 -> f32 cooperative-matrix shapes (empty when unavailable).
    pub cooperative_matrix: Vec<CoopShape>,
    /// Largest storage binding, bytes (possibly lowered by `DeviceOptions`).
    pub max_storage_binding: u64,
    pub max_buffer_size: u64,
    /// Storage bindings must start at a multiple of this.
    pub storage_offset_alignment: u32,
    /// Uniform dynamic offsets must be a multiple of this.
    pub uniform_offset_alignment: u32,
    pub max_workgroup_storage: u32,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroups_per_dimension: u32,
}

impl Caps {
    /// The f16 cooperative-matrix tile, when the adapter has the one our kernels use.
    pub fn coop_tile(&self, size: u32) -> Option<CoopShape> {
        self.cooperative_matrix
            .iter()
            .copied()
            .find(|s| s.m == size && s.n == size && s.k == size)
    }
}

pub(crate) struct DeviceInner {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub caps: Caps,
    pub registry: KernelRegistry,
    pub pool: Arc<BufferPool>,
    pub mem: Arc<crate::buffer_pool::MemStats>,
    pub poison: bool,
    /// Errors wgpu reported outside any error scope, surfaced at the next wait.
    pub uncaptured: Arc<Mutex<Vec<String>>>,
    pub bind_groups: Mutex<crate::encoder::BindGroupCache>,
    /// Queue submissions and buffer maps so far (tests check that a step needs one submit
    /// and no readback).
    pub submits: std::sync::atomic::AtomicU64,
    pub maps: std::sync::atomic::AtomicU64,
}

impl DeviceInner {
    pub(crate) fn count_submit_and_map(&self, submits: u64, maps: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.submits.fetch_add(submits, Relaxed);
        self.maps.fetch_add(maps, Relaxed);
    }
}

/// A GPU device: cheap to clone, shareable between threads.
#[derive(Clone)]
pub struct MlxDevice {
    pub(crate) inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for MlxDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlxDevice")
            .field("adapter", &self.inner.caps.adapter_name)
            .field("backend", &self.inner.caps.backend)
            .finish()
    }
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

const INSTALL_HINT: &str = "install a Vulkan driver for your GPU, or the software one: \
     `apt-get install mesa-vulkan-drivers libvulkan1` (Debian/Ubuntu)";

impl MlxDevice {
    /// Open the best adapter: discrete > integrated > software.
    pub fn new() -> Result<Self> {
        Self::with_options(DeviceOptions::default())
    }

    /// Open a device with explicit options.
    pub fn with_options(opts: DeviceOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        if adapters.is_empty() {
            return Err(MlxError::NoAdapter(format!(
                "no Vulkan/Metal/DX12 adapter found; {INSTALL_HINT}"
            )));
        }
        let wanted = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("MLX_NATIVE_ADAPTER").ok())
            .filter(|s| !s.is_empty());
        if let Some(w) = &wanted {
            let lw = w.to_lowercase();
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&lw));
            if adapters.is_empty() {
                return Err(MlxError::NoAdapter(format!(
                    "no adapter name contains {w:?} (MLX_NATIVE_ADAPTER); available: {}",
                    names.join(", ")
                )));
            }
        }
        adapters.sort_by_key(|a| type_rank(a.get_info().device_type));
        let adapter = adapters
            .into_iter()
            .next()
            .ok_or_else(|| MlxError::NoAdapter(INSTALL_HINT.into()))?;
        Self::open(adapter, opts)
    }

    fn open(adapter: wgpu::Adapter, opts: DeviceOptions) -> Result<Self> {
        let info = adapter.get_info();
        let have = adapter.features();
        let mut want = wgpu::Features::empty();
        let subgroups = have.contains(wgpu::Features::SUBGROUP) && !opts.disable_subgroups;
        if subgroups {
            want |= wgpu::Features::SUBGROUP;
        }
        let shader_f16 = have.contains(wgpu::Features::SHADER_F16) && !opts.disable_f16;
        if shader_f16 {
            want |= wgpu::Features::SHADER_F16;
        }
        let timestamps = have.contains(wgpu::Features::TIMESTAMP_QUERY);
        if timestamps {
            want |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let mut coop = Vec::new();
        if have.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && !opts.disable_cooperative_matrix
        {
            for p in adapter.cooperative_matrix_properties() {
                if p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
                {
                    coop.push(CoopShape {
                        m: p.m_size,
                        n: p.n_size,
                        k: p.k_size,
                    });
                }
            }
            if !coop.is_empty() {
                want |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            }
        }
        let limits = adapter.limits();
        let experimental = if want.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: we only use cooperative matrices through coopLoad/coopStore/
            // coopMultiplyAdd with in-bounds tiles; the layout is checked by a test wherever
            // the feature exists.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("mlx-native"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| MlxError::DeviceRequest(format!("{} ({:?}): {e}", info.name, info.backend)))?;

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));

        let max_storage_binding = match opts.max_storage_binding {
            Some(m) => m.min(limits.max_storage_buffer_binding_size),
            None => limits.max_storage_buffer_binding_size,
        };
        let caps = Caps {
            adapter_name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info),
            subgroups,
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            shader_f16,
            loop_bounding: opts.loop_bounding
                || std::env::var("MLX_NATIVE_LOOP_BOUNDING").is_ok_and(|v| v == "1"),
            timestamps,
            timestamp_period: queue.get_timestamp_period(),
            cooperative_matrix: coop,
            max_storage_binding,
            max_buffer_size: limits.max_buffer_size,
            storage_offset_alignment: limits.min_storage_buffer_offset_alignment,
            uniform_offset_alignment: limits.min_uniform_buffer_offset_alignment,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        };
        let mem = Arc::new(crate::buffer_pool::MemStats::default());
        Ok(MlxDevice {
            inner: Arc::new(DeviceInner {
                pool: Arc::new(BufferPool::new(device.clone(), mem.clone())),
                mem,
                device,
                queue,
                caps,
                registry: KernelRegistry::default(),
                poison: opts.poison_allocations,
                uncaptured,
                bind_groups: Mutex::new(crate::encoder::BindGroupCache::default()),
                submits: Default::default(),
                maps: Default::default(),
            }),
        })
    }

    /// What the device can do.
    pub fn caps(&self) -> &Caps {
        &self.inner.caps
    }

    /// The underlying wgpu device (for code outside the crate that needs it).
    pub fn wgpu_device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The underlying wgpu queue.
    pub fn wgpu_queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// `(queue submissions, buffer maps)` made through this device so far.
    pub fn submit_and_map_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.submits.load(Relaxed),
            self.inner.maps.load(Relaxed),
        )
    }

    /// The pipeline cache.
    pub fn registry(&self) -> &KernelRegistry {
        &self.inner.registry
    }

    /// GPU memory the library holds now, in bytes.
    /// Bind groups created so far: a steady decode loop should create none per step (every
    /// dispatch finds its bind group in the cache).
    pub fn bind_groups_created(&self) -> u64 {
        self.inner.bind_groups.lock().map_or(0, |c| c.created)
    }

    pub fn memory_live_bytes(&self) -> u64 {
        self.inner.mem.live()
    }

    /// The most GPU memory the library has held at once, in bytes.
    pub fn memory_peak_bytes(&self) -> u64 {
        self.inner.mem.peak()
    }

    /// The scratch-buffer pool.
    pub fn pool(&self) -> &BufferPool {
        &self.inner.pool
    }

    pub(crate) fn pipeline(&self, kernel: Kernel, spec: Spec) -> Result<Pipeline> {
        self.inner
            .registry
            .get(&self.inner.device, &self.inner.caps, kernel, spec)
    }

    /// Start recording a pass: the encoder, registry and pool in one handle.
    pub fn begin(&self) -> crate::encoder::Pass {
        crate::encoder::Pass::new(self.clone())
    }

    /// Block until the GPU is idle; return any error wgpu reported meanwhile.
    pub fn wait_idle(&self) -> Result<()> {
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| MlxError::Gpu(format!("poll: {e}")))?;
        self.take_uncaptured()
    }

    pub(crate) fn take_uncaptured(&self) -> Result<()> {
        let mut errs = self
            .inner
            .uncaptured
            .lock()
            .map_err(|_| MlxError::Gpu("error sink poisoned".into()))?;
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        Err(MlxError::Gpu(msg))
    }
}

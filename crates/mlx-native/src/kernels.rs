//! `KernelRegistry`: WGSL sources plus a specialization -> cached compute pipelines.
//!
//! A kernel family is one WGSL file (`Kernel`); a `Spec` names everything that varies inside
//! it: entry point, element type, workgroup size, subgroup or workgroup-memory reductions and
//! up to three named `override` constants. Specialization happens in two places:
//! - a tiny preprocessor (`#if NAME` / `#else` / `#endif`, nestable) over names the registry
//!   defines from the `Spec` (`DT_F32`/`DT_F16`/`DT_BF16`, `SUBGROUPS`, `SHADER_F16`), for
//!   type swaps and reduction strategy;
//! - WGSL `override` constants (`WG` and the named ones), passed as pipeline constants.
//!
//! Every source gets `shaders/common/prelude.wgsl` prepended (views, grid folding, bf16/f16
//! unpacking). Bind-group layouts are reflected from the final WGSL with naga so they match
//! the shader exactly, with the parameter block bound at a dynamic offset.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::dtype::DType;
use crate::error::{MlxError, Result};

/// One WGSL file: an op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Fill,
    Elementwise,
    Norm,
    Softmax,
    Activation,
    Rope,
    Embedding,
    Select,
    Layout,
    Bandwidth,
    Kv,
    Sdpa,
    SdpaCoop,
    Sample,
    GgmlDense,
    GgmlLegacy,
    GgmlK,
    Qmatmul,
    Dense,
    MatmulCoop,
    KvQuant,
    SdpaQuant,
    MoeRoute,
    Moe,
    MoeQuant,
    MoeGgmlDense,
    MoeGgmlLegacy,
    MoeGgmlK,
}

impl Kernel {
    /// Every family, for the shader validation test.
    pub const ALL: &'static [Kernel] = &[
        Kernel::Fill,
        Kernel::Elementwise,
        Kernel::Norm,
        Kernel::Softmax,
        Kernel::Activation,
        Kernel::Rope,
        Kernel::Embedding,
        Kernel::Select,
        Kernel::Layout,
        Kernel::Bandwidth,
        Kernel::Kv,
        Kernel::Sdpa,
        Kernel::SdpaCoop,
        Kernel::Sample,
        Kernel::GgmlDense,
        Kernel::GgmlLegacy,
        Kernel::GgmlK,
        Kernel::Qmatmul,
        Kernel::Dense,
        Kernel::MatmulCoop,
        Kernel::KvQuant,
        Kernel::SdpaQuant,
        Kernel::MoeRoute,
        Kernel::Moe,
        Kernel::MoeQuant,
        Kernel::MoeGgmlDense,
        Kernel::MoeGgmlLegacy,
        Kernel::MoeGgmlK,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Fill => "fill",
            Kernel::Elementwise => "elementwise",
            Kernel::Norm => "norm",
            Kernel::Softmax => "softmax",
            Kernel::Activation => "activation",
            Kernel::Rope => "rope",
            Kernel::Embedding => "embedding",
            Kernel::Select => "select",
            Kernel::Layout => "layout",
            Kernel::Bandwidth => "bandwidth",
            Kernel::Sample => "sample",
            Kernel::Kv => "kv",
            Kernel::Sdpa => "sdpa",
            Kernel::SdpaCoop => "sdpa_coop",
            Kernel::GgmlDense => "ggml_dense",
            Kernel::GgmlLegacy => "ggml_legacy",
            Kernel::GgmlK => "ggml_k",
            Kernel::Qmatmul => "qmatmul",
            Kernel::Dense => "dense",
            Kernel::MatmulCoop => "matmul_coop",
            Kernel::KvQuant => "kv_quant",
            Kernel::SdpaQuant => "sdpa_quant",
            Kernel::MoeRoute => "moe_route",
            Kernel::Moe => "moe",
            Kernel::MoeQuant => "moe_quant",
            Kernel::MoeGgmlDense => "moe_ggml_dense",
            Kernel::MoeGgmlLegacy => "moe_ggml_legacy",
            Kernel::MoeGgmlK => "moe_ggml_k",
        }
    }

    /// The WGSL source of the family, before preprocessing.
    pub const fn source(self) -> &'static str {
        match self {
            Kernel::Fill => include_str!("shaders/fill.wgsl"),
            Kernel::Elementwise => include_str!("shaders/elementwise.wgsl"),
            Kernel::Norm => include_str!("shaders/norm.wgsl"),
            Kernel::Softmax => include_str!("shaders/softmax.wgsl"),
            Kernel::Activation => include_str!("shaders/activation.wgsl"),
            Kernel::Rope => include_str!("shaders/rope.wgsl"),
            Kernel::Embedding => include_str!("shaders/embedding.wgsl"),
            Kernel::Select => include_str!("shaders/select.wgsl"),
            Kernel::Layout => include_str!("shaders/layout.wgsl"),
            Kernel::Bandwidth => include_str!("shaders/bandwidth.wgsl"),
            Kernel::Sample => include_str!("shaders/sample.wgsl"),
            Kernel::Kv => include_str!("shaders/kv.wgsl"),
            Kernel::Sdpa => include_str!("shaders/sdpa.wgsl"),
            Kernel::SdpaCoop => include_str!("shaders/sdpa_coop.wgsl"),
            Kernel::GgmlDense => include_str!("shaders/ggml_dense.wgsl"),
            Kernel::GgmlLegacy => include_str!("shaders/ggml_legacy.wgsl"),
            Kernel::GgmlK => include_str!("shaders/ggml_k.wgsl"),
            Kernel::Qmatmul => include_str!("shaders/qmatmul.wgsl"),
            Kernel::Dense => include_str!("shaders/dense.wgsl"),
            Kernel::MatmulCoop => include_str!("shaders/matmul_coop.wgsl"),
            Kernel::KvQuant => include_str!("shaders/kv_quant.wgsl"),
            Kernel::SdpaQuant => include_str!("shaders/sdpa_quant.wgsl"),
            Kernel::MoeRoute => include_str!("shaders/moe_route.wgsl"),
            Kernel::Moe => include_str!("shaders/moe.wgsl"),
            Kernel::MoeQuant => include_str!("shaders/moe_quant.wgsl"),
            // The GGML dequantizers come in through `includes`; this file adds the entry.
            Kernel::MoeGgmlDense | Kernel::MoeGgmlLegacy | Kernel::MoeGgmlK => {
                include_str!("shaders/moe_ggml.wgsl")
            }
        }
    }
}

const PRELUDE: &str = include_str!("shaders/common/prelude.wgsl");
const REDUCE: &str = include_str!("shaders/common/reduce.wgsl");
const GGML_COMMON: &str = include_str!("shaders/ggml_common.wgsl");
const QUANT: &str = include_str!("shaders/common/quant.wgsl");
const QUANT_XQ: &str = include_str!("shaders/common/quant_xq.wgsl");
const XQ_QUANTIZE: &str = include_str!("shaders/common/xq_quantize.wgsl");
const KV_QUANT_COMMON: &str = include_str!("shaders/kv_quant_common.wgsl");
const SPLIT_REDUCE: &str = include_str!("shaders/common/split_reduce.wgsl");
const ACT: &str = include_str!("shaders/common/act.wgsl");
const GLU_CHUNK: &str = include_str!("shaders/common/glu_chunk.wgsl");
const ROPE_TURNS: &str = include_str!("shaders/common/rope_turns.wgsl");
const GGML_DENSE: &str = include_str!("shaders/ggml_dense.wgsl");
const GGML_LEGACY: &str = include_str!("shaders/ggml_legacy.wgsl");
const GGML_K: &str = include_str!("shaders/ggml_k.wgsl");

impl Kernel {
    /// Shared WGSL helpers a family needs besides the prelude.
    const fn includes(self) -> &'static [&'static str] {
        match self {
            Kernel::Norm => &[REDUCE, XQ_QUANTIZE],
            Kernel::Softmax | Kernel::Select => &[REDUCE],
            Kernel::Rope | Kernel::Kv => &[REDUCE, ROPE_TURNS],
            Kernel::GgmlDense | Kernel::GgmlLegacy | Kernel::GgmlK => &[GGML_COMMON],
            Kernel::KvQuant => &[KV_QUANT_COMMON],
            Kernel::SdpaQuant => &[KV_QUANT_COMMON, SPLIT_REDUCE],
            Kernel::Sdpa => &[SPLIT_REDUCE, XQ_QUANTIZE],
            Kernel::Qmatmul => &[QUANT, XQ_QUANTIZE, QUANT_XQ, ACT, GLU_CHUNK],
            Kernel::Activation => &[ACT, XQ_QUANTIZE],
            Kernel::MoeQuant => &[QUANT, XQ_QUANTIZE, QUANT_XQ, ACT, GLU_CHUNK],
            Kernel::MatmulCoop => &[QUANT],
            Kernel::MoeGgmlDense => &[GGML_COMMON, GGML_DENSE],
            Kernel::MoeGgmlLegacy => &[GGML_COMMON, GGML_LEGACY],
            Kernel::MoeGgmlK => &[GGML_COMMON, GGML_K],
            _ => &[],
        }
    }
}

/// Everything that varies inside one kernel family. `Copy + Hash`: it is the cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Spec {
    /// WGSL entry point.
    pub entry: &'static str,
    /// The element type the variant reads (defines `DT_F32`, `DT_F16` or `DT_BF16`).
    pub dtype: DType,
    /// Workgroup size (the `WG` override).
    pub wg: u32,
    /// Reduce with subgroup operations (defines `SUBGROUPS`) or through workgroup memory.
    pub subgroups: bool,
    /// Extra named `override` constants.
    pub consts: [Option<(&'static str, u32)>; 3],
}

impl Spec {
    /// A spec with no extra constants and no subgroups.
    pub const fn new(entry: &'static str, dtype: DType, wg: u32) -> Self {
        Spec {
            entry,
            dtype,
            wg,
            subgroups: false,
            consts: [None, None, None],
        }
    }

    /// Use subgroup reductions.
    pub const fn with_subgroups(mut self, on: bool) -> Self {
        self.subgroups = on;
        self
    }

    /// Set the named override constant (up to three per spec).
    pub fn with_const(mut self, name: &'static str, value: u32) -> Result<Self> {
        for slot in self.consts.iter_mut() {
            match slot {
                Some((n, v)) if *n == name => {
                    *v = value;
                    return Ok(self);
                }
                None => {
                    *slot = Some((name, value));
                    return Ok(self);
                }
                _ => {}
            }
        }
        Err(MlxError::invalid(format!(
            "spec {}: more than three override constants",
            self.entry
        )))
    }

    /// The variant's name, in fixed order: `rms_norm_f32_wg256_sg`. Used as the wgpu label.
    pub fn label(&self, kernel: Kernel) -> String {
        let mut s = format!(
            "{}:{}_{}_wg{}",
            kernel.name(),
            self.entry,
            self.dtype,
            self.wg
        );
        for (n, v) in self.consts.iter().flatten() {
            s.push_str(&format!("_{}{}", n.to_ascii_lowercase(), v));
        }
        if self.subgroups {
            s.push_str("_sg");
        }
        s
    }

    /// Names the preprocessor sees as defined for this spec.
    fn defines(&self, shader_f16: bool) -> Vec<&'static str> {
        let mut d = vec![match self.dtype {
            DType::F16 => "DT_F16",
            DType::BF16 => "DT_BF16",
            DType::U32 => "DT_U32",
            DType::I32 => "DT_I32",
            DType::U8 => "DT_U8",
            _ => "DT_F32",
        }];
        if self.subgroups {
            d.push("SUBGROUPS");
        }
        if shader_f16 {
            d.push("SHADER_F16");
        }
        d
    }

    /// Pipeline constants for wgpu / naga.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut c = vec![("WG", self.wg as f64)];
        for (n, v) in self.consts.iter().flatten() {
            c.push((n, *v as f64));
        }
        c
    }
}

/// Expand `#if NAME` / `#if !NAME` / `#else` / `#endif` over `defines`, then prepend the
/// prelude and the `enable` directives the variant needs.
pub fn preprocess(kernel: Kernel, spec: &Spec, shader_f16: bool) -> Result<String> {
    let defines = spec.defines(shader_f16);
    // naga 30 accepts subgroup builtins when the device has SUBGROUP and rejects the
    // `enable subgroups;` directive as not yet implemented, so none is emitted.
    let mut out = String::new();
    let mut enables = String::new();
    let err = |line: usize, what: &str| MlxError::Shader {
        kernel: spec.label(kernel),
        message: format!("preprocessor, line {line}: {what}"),
    };
    // Stack of (this branch active, any branch taken, parent active).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut active = true;
    let mut body = String::from(PRELUDE);
    for inc in kernel.includes() {
        body.push('\n');
        body.push_str(inc);
    }
    body.push('\n');
    body.push_str(kernel.source());
    for (i, line) in body.lines().enumerate() {
        let t = line.trim();
        if let Some(cond) = t.strip_prefix("#if ") {
            let cond = cond.trim();
            let (neg, name) = match cond.strip_prefix('!') {
                Some(n) => (true, n.trim()),
                None => (false, cond),
            };
            let value = defines.contains(&name) != neg;
            stack.push((active, value));
            active = active && value;
        } else if t == "#else" {
            let (parent, value) = *stack
                .last()
                .ok_or_else(|| err(i + 1, "#else without #if"))?;
            active = parent && !value;
        } else if t == "#endif" {
            let (parent, _) = stack
                .pop()
                .ok_or_else(|| err(i + 1, "#endif without #if"))?;
            active = parent;
        } else if t.starts_with('#') {
            return Err(err(i + 1, &format!("unknown directive `{t}`")));
        } else if active && t.starts_with("enable ") {
            // WGSL wants `enable` directives before any declaration, so ahead of the prelude.
            enables.push_str(t);
            enables.push('\n');
            out.push('\n');
        } else if active {
            out.push_str(line);
            out.push('\n');
        } else {
            // Keep line numbers stable in naga's messages.
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(err(0, "unterminated #if"));
    }
    enables.push_str(&out);
    Ok(enables)
}

/// A compiled variant: the pipeline and its two bind-group layouts.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    /// group(0): storage buffers in binding order.
    pub buffers_layout: wgpu::BindGroupLayout,
    /// Storage bindings of group(0) the entry point uses: (binding, read_only).
    pub storage: Vec<(u32, bool)>,
    /// Buffers a dispatch passes: one per binding number up to the highest used.
    pub slots: usize,
    /// group(1): params and views, both uniform at dynamic offsets.
    pub params_layout: wgpu::BindGroupLayout,
    pub label: Arc<str>,
    /// Unique per pipeline, used as part of bind-group cache keys.
    pub id: u64,
}

/// Lazily compiled, cached pipelines keyed by `(Kernel, Spec)`.
#[derive(Default)]
pub struct KernelRegistry {
    cache: RwLock<HashMap<(Kernel, Spec), Pipeline>>,
    compiled: std::sync::atomic::AtomicU64,
}

impl KernelRegistry {
    /// How many pipelines have been compiled (tests count creations).
    pub fn compiled_count(&self) -> u64 {
        self.compiled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pipeline for `(kernel, spec)`, compiling it on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        caps: &crate::device::Caps,
        kernel: Kernel,
        spec: Spec,
    ) -> Result<Pipeline> {
        let lock_err = || MlxError::Gpu("kernel registry lock poisoned".into());
        if let Some(p) = self
            .cache
            .read()
            .map_err(|_| lock_err())?
            .get(&(kernel, spec))
        {
            return Ok(p.clone());
        }
        let mut cache = self.cache.write().map_err(|_| lock_err())?;
        if let Some(p) = cache.get(&(kernel, spec)) {
            return Ok(p.clone());
        }
        let id = self
            .compiled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let p = compile(device, caps, kernel, &spec, id)?;
        cache.insert((kernel, spec), p.clone());
        Ok(p)
    }
}

/// Parse and validate a preprocessed source with naga.
pub fn parse_and_validate(
    kernel: Kernel,
    spec: &Spec,
    src: &str,
) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let shader_err = |message: String| MlxError::Shader {
        kernel: spec.label(kernel),
        message,
    };
    let module =
        naga::front::wgsl::parse_str(src).map_err(|e| shader_err(e.emit_to_string(src)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| shader_err(e.emit_to_string(src)))?;
    Ok((module, info))
}

/// Storage bindings of group(0) that `spec.entry` uses, as (binding, read_only), sorted.
/// Unused binding numbers are allowed: the caller's buffer slice is indexed by binding number.
pub fn reflect_storage(kernel: Kernel, spec: &Spec, src: &str) -> Result<Vec<(u32, bool)>> {
    let (module, info) = parse_and_validate(kernel, spec, src)?;
    let ep = module
        .entry_points
        .iter()
        .position(|e| e.name == spec.entry)
        .ok_or_else(|| MlxError::Shader {
            kernel: spec.label(kernel),
            message: format!("no entry point named {}", spec.entry),
        })?;
    let uses = info.get_entry_point(ep);
    let mut out = Vec::new();
    for (h, var) in module.global_variables.iter() {
        if uses[h].is_empty() {
            continue;
        }
        if let (Some(rb), naga::AddressSpace::Storage { access }) = (&var.binding, var.space) {
            if rb.group == 0 {
                out.push((rb.binding, !access.contains(naga::StorageAccess::STORE)));
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn compile(
    device: &wgpu::Device,
    caps: &crate::device::Caps,
    kernel: Kernel,
    spec: &Spec,
    id: u64,
) -> Result<Pipeline> {
    let label = spec.label(kernel);
    let src = preprocess(kernel, spec, caps.shader_f16)?;
    let storage = reflect_storage(kernel, spec, &src)?;

    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(&label),
        source: wgpu::ShaderSource::Wgsl(src.as_str().into()),
    };
    let module = if caps.loop_bounding {
        device.create_shader_module(desc)
    } else {
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = false;
        // SAFETY: the one check dropped is loop bounding, whose absence is only unsound for
        // a loop that never terminates. Every loop in our kernels runs over a range bounded
        // by parameters the Rust side validates (lengths, counts, positive strides), and the
        // kernels are our own source, never user input. Bounds checks stay on.
        #[allow(unsafe_code)]
        unsafe {
            device.create_shader_module_trusted(desc, checks)
        }
    };
    let buffer_entries: Vec<wgpu::BindGroupLayoutEntry> = storage
        .iter()
        .map(|&(binding, read_only)| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let buffers_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&label),
        entries: &buffer_entries,
    });
    let uniform = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: None,
        },
        count: None,
    };
    let params_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&label),
        entries: &[uniform(0), uniform(1)],
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&label),
        bind_group_layouts: &[Some(&buffers_layout), Some(&params_layout)],
        immediate_size: 0,
    });
    let constants = spec.constants();
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&label),
        layout: Some(&layout),
        module: &module,
        entry_point: Some(spec.entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(MlxError::Shader {
            kernel: label,
            message: e.to_string(),
        });
    }
    Ok(Pipeline {
        pipeline,
        buffers_layout,
        slots: storage.last().map_or(0, |&(b, _)| b as usize + 1),
        storage,
        params_layout,
        label: label.into(),
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coop_kernels_translate_to_spirv() -> Result<()> {
        // naga's SPIR-V backend is the path to NVIDIA's tensor cores; it has panicked on
        // index expressions inside coopLoad before (see ARCHITECTURE.md). No GPU needed.
        for (kernel, spec) in crate::ops::all_specs()? {
            if !matches!(kernel, Kernel::SdpaCoop | Kernel::MatmulCoop) {
                continue;
            }
            let src = preprocess(kernel, &spec, true)?;
            let (module, info) = parse_and_validate(kernel, &spec, &src)?;
            let mut constants = naga::back::PipelineConstants::default();
            for (name, value) in spec.constants() {
                constants.insert(name.to_string(), value);
            }
            let stage = naga::ShaderStage::Compute;
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((stage, spec.entry)),
                &constants,
            )
            .map_err(|e| MlxError::invalid(format!("{e:?}")))?;
            let opts = naga::back::spv::Options {
                lang_version: (1, 3),
                ..Default::default()
            };
            let pipeline = naga::back::spv::PipelineOptions {
                shader_stage: stage,
                entry_point: spec.entry.to_string(),
            };
            let words = naga::back::spv::write_vec(&module, &info, &opts, Some(&pipeline))
                .map_err(|e| MlxError::invalid(format!("{}: {e:?}", spec.label(kernel))))?;
            assert!(words.len() > 100);
        }
        Ok(())
    }

    #[test]
    fn preprocessor_selects_branches() -> Result<()> {
        let spec = Spec::new("main", DType::BF16, 64).with_subgroups(true);
        let src = preprocess(Kernel::Norm, &spec, false)?;
        assert!(src.contains("subgroupAdd") && !src.contains("red_buf[lid] = v;"));
        assert!(src.contains("bf16_to_f32(bits)") && !src.contains("unpack2x16float(bits)"));
        let src = preprocess(Kernel::Norm, &Spec::new("main", DType::F16, 64), false)?;
        assert!(!src.contains("subgroupAdd") && src.contains("red_buf[lid] = v;"));
        assert!(src.contains("unpack2x16float(bits)"));
        Ok(())
    }

    #[test]
    fn labels_name_every_specialization() -> Result<()> {
        let spec = Spec::new("qmv", DType::BF16, 64)
            .with_const("GROUP_SIZE", 64)?
            .with_const("BITS", 4)?
            .with_subgroups(true);
        assert_eq!(
            spec.label(Kernel::Norm),
            "norm:qmv_bf16_wg64_group_size64_bits4_sg"
        );
        Ok(())
    }
}

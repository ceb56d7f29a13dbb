//! The bench harness: GPU time from timestamp queries, medians over repeats, and every
//! figure as a fraction of the device's measured read bandwidth (the roofline).

use mlx_native::ops;
use mlx_native::{DType, MlxBuffer, MlxDevice, MlxError, Pass, Result};
use serde::Serialize;

/// How a kernel's time is measured.
pub struct Timer<'a> {
    gpu: &'a MlxDevice,
    pub warmup: usize,
    pub reps: usize,
}

impl<'a> Timer<'a> {
    pub fn new(gpu: &'a MlxDevice) -> Result<Self> {
        if !gpu.caps().timestamps {
            return Err(MlxError::unsupported(format!(
                "bench: {} has no timestamp queries; GPU times cannot be measured",
                gpu.caps().adapter_name
            )));
        }
        Ok(Timer {
            gpu,
            warmup: 3,
            reps: 15,
        })
    }

    /// Median GPU nanoseconds of the dispatches `record` adds to a pass (summed per rep),
    /// each dispatch timed on its own.
    pub fn median_ns(&self, record: impl FnMut(&mut Pass) -> Result<()>) -> Result<f64> {
        self.median(false, record)
    }

    /// Median GPU nanoseconds of one pass holding what `record` adds, timed as a whole (no
    /// per-dispatch timestamps): dependent dispatches cost what they cost inside a decode
    /// step, without the per-dispatch profile's own floor.
    pub fn median_pass_ns(&self, record: impl FnMut(&mut Pass) -> Result<()>) -> Result<f64> {
        self.median(true, record)
    }

    fn median(
        &self,
        whole_pass: bool,
        mut record: impl FnMut(&mut Pass) -> Result<()>,
    ) -> Result<f64> {
        let mut samples = Vec::with_capacity(self.reps);
        for i in 0..self.warmup + self.reps {
            let pass = self.gpu.begin();
            let mut pass = if whole_pass {
                pass.with_pass_timing(true)
            } else {
                pass.with_profiling(true)
            };
            record(&mut pass)?;
            let t = pass.commit_and_wait()?;
            if i >= self.warmup {
                samples.push(t.iter().map(|k| k.nanos).sum::<f64>());
            }
        }
        samples.sort_by(f64::total_cmp);
        samples
            .get(samples.len() / 2)
            .copied()
            .ok_or_else(|| MlxError::invalid("bench: no samples"))
    }
}

/// The measured read bandwidth.
#[derive(Clone, Debug, Serialize)]
pub struct Bandwidth {
    pub bytes: u64,
    pub gpu_us: f64,
    pub gb_s: f64,
}

/// Read `total_mib` MiB (split into bindings the device allows) with the read probe.
pub fn read_bandwidth(gpu: &MlxDevice, total_mib: u64) -> Result<Bandwidth> {
    let caps = gpu.caps();
    let chunk = caps.max_storage_binding.min(256 << 20) / 16 * 16;
    let total = total_mib << 20;
    let n_chunks = total.div_ceil(chunk).max(1);
    let words = (chunk / 4) as usize;
    let mut chunks = Vec::new();
    let mut pass = gpu.begin();
    for i in 0..n_chunks {
        let b = MlxBuffer::new(gpu, DType::U32, &[words])?;
        // Nonzero, varying content: never benchmark on zeros.
        ops::fill::fill_u32_words(
            &mut pass,
            &b,
            0x9E37_79B9 ^ (i as u32).wrapping_mul(0x85EB_CA6B),
        )?;
        chunks.push(b);
    }
    pass.commit_and_wait()?;
    // ~16 vec4 loads per invocation keeps enough loads in flight without tail effects.
    let wgs = ((words / 4) / (256 * 16)).max(1) as u32;
    let sink = MlxBuffer::new(gpu, DType::U32, &[wgs as usize])?;
    let ns = Timer::new(gpu)?.median_ns(|pass| {
        for c in &chunks {
            ops::bandwidth::read_probe(pass, c, &sink, wgs)?;
        }
        Ok(())
    })?;
    let bytes = n_chunks * chunk;
    Ok(Bandwidth {
        bytes,
        gpu_us: ns / 1e3,
        gb_s: bytes as f64 / ns,
    })
}

/// Median GPU nanoseconds per dispatch of `count` read-probe dispatches in one pass, each over
/// its own buffer of `bytes` (rounded down to whole vec4s): the read-only floor of a pass of
/// dependent kernels that each stream that many bytes.
pub(crate) fn read_in_pass(
    gpu: &MlxDevice,
    timer: &Timer<'_>,
    bytes: u64,
    count: usize,
) -> Result<f64> {
    let words = (bytes / 16 * 4) as usize;
    let mut bufs = Vec::with_capacity(count);
    let mut pass = gpu.begin();
    for i in 0..count {
        let b = MlxBuffer::new(gpu, DType::U32, &[words])?;
        ops::fill::fill_u32_words(&mut pass, &b, 0x2545_F491 ^ (i as u32))?;
        bufs.push(b);
    }
    pass.commit_and_wait()?;
    // ~4 vec4 a invocation (8 past 4096 workgroups): enough workgroups for any GPU even at
    // a few MB, loads enough in flight at a hundred.
    let wgs = (words / 4 / 1024).clamp(1, 4096) as u32;
    let sink = MlxBuffer::new(gpu, DType::U32, &[wgs as usize])?;
    let ns = timer.median_pass_ns(|pass| {
        for b in &bufs {
            ops::bandwidth::read_probe(pass, b, &sink, wgs)?;
        }
        Ok(())
    })?;
    Ok(ns / count as f64)
}

/// One kernel measurement.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub kernel: String,
    pub shape: String,
    pub bytes: u64,
    pub gpu_us: f64,
    pub gb_s: f64,
    /// Achieved GB/s over the measured read bandwidth.
    pub roofline_fraction: f64,
}

/// The `bench kernels` report.
#[derive(Clone, Debug, Serialize)]
pub struct KernelsReport {
    pub adapter: String,
    pub backend: String,
    pub driver: String,
    pub bandwidth: Bandwidth,
    pub kernels: Vec<KernelRow>,
}

fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn f32_tensor(gpu: &MlxDevice, shape: &[usize], seed: u64) -> Result<MlxBuffer> {
    let n = shape.iter().product();
    MlxBuffer::from_slice(gpu, &random_f32(n, seed), shape)
}

fn bf16_tensor(gpu: &MlxDevice, shape: &[usize], seed: u64) -> Result<MlxBuffer> {
    let n = shape.iter().product();
    let v: Vec<half::bf16> = random_f32(n, seed)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    MlxBuffer::from_slice(gpu, &v, shape)
}

/// Time the hot elementwise and row kernels at model sizes.
pub fn bench_kernels(gpu: &MlxDevice, probe_mib: u64) -> Result<KernelsReport> {
    let bw = read_bandwidth(gpu, probe_mib)?;
    let timer = Timer::new(gpu)?;
    let mut rows = Vec::new();
    let mut push = |kernel: &str, shape: &[usize], bytes: u64, ns: f64| {
        let gb_s = bytes as f64 / ns;
        rows.push(KernelRow {
            kernel: kernel.into(),
            shape: format!("{shape:?}"),
            bytes,
            gpu_us: ns / 1e3,
            gb_s,
            roofline_fraction: gb_s / bw.gb_s,
        });
    };
    // Decode (1 row) and prefill (512 rows) at Llama-3.1-8B's hidden size; 4096 rows for a
    // size that fills the GPU.
    for &r in &[1usize, 512, 4096] {
        let shape = [r, 4096];
        let x = f32_tensor(gpu, &shape, 1)?;
        let w = bf16_tensor(gpu, &[4096], 2)?;
        let ns = timer.median_ns(|p| ops::rms_norm(p, &x, &w, 1e-5).map(|_| ()))?;
        push(
            "rms_norm (bf16 w)",
            &shape,
            (2 * r * 4096 * 4 + 4096 * 2) as u64,
            ns,
        );
        let y = f32_tensor(gpu, &shape, 3)?;
        let ns = timer.median_ns(|p| ops::add(p, &x, &y).map(|_| ()))?;
        push("add", &shape, (3 * r * 4096 * 4) as u64, ns);
    }
    // Attention-score softmax at prefill 512 for 32 heads, and decode (one query row per
    // head) over a 4096-token context.
    for &(rows, n) in &[(32 * 512usize, 512usize), (32, 4096)] {
        let shape = [rows, n];
        let x = f32_tensor(gpu, &shape, 4)?;
        let ns = timer.median_ns(|p| ops::softmax(p, &x, 0.088, None).map(|_| ()))?;
        push("softmax", &shape, (2 * rows * n * 4) as u64, ns);
    }
    // RoPE on Llama-3.1-8B queries: 32 heads x 128, decode (1 token) and prefill (512).
    let table = ops::RopeTable::new(
        gpu,
        &ops::RopeConfig::new(128, 500_000.0, ops::RopeStyle::Neox),
    )?;
    for &t in &[1usize, 512] {
        let shape = [t, 32, 128];
        let x = f32_tensor(gpu, &shape, 5)?;
        let pos: Vec<u32> = (0..t as u32).collect();
        let pos = MlxBuffer::from_slice(gpu, &pos, &[t])?;
        let ns = timer.median_ns(|p| ops::rope(p, &x, &pos, &table).map(|_| ()))?;
        push(
            "rope (neox)",
            &shape,
            (2 * t * 32 * 128 * 4 + t * 4) as u64,
            ns,
        );
    }
    // The cost of one dispatch inside a stream, as decode issues them: 256 adds of one
    // 4096-row in one compute pass, timed as a whole (no per-dispatch timestamps). Dependent:
    // each adds to the previous result (a barrier between every two); independent: each
    // reads the same inputs and writes its own output.
    let a = f32_tensor(gpu, &[4096], 6)?;
    let b = f32_tensor(gpu, &[4096], 7)?;
    for (name, dependent) in [
        ("add chain, per dispatch (dependent)", true),
        ("add chain, per dispatch (independent)", false),
    ] {
        let n = 256;
        let mut per = Vec::new();
        for _ in 0..7 {
            let mut pass = gpu.begin().with_pass_timing(true);
            let mut cur = a.clone();
            let mut outs = Vec::with_capacity(n);
            for _ in 0..n {
                let y = ops::add(&mut pass, if dependent { &cur } else { &a }, &b)?;
                if dependent {
                    cur = y;
                } else {
                    outs.push(y);
                }
            }
            let t = pass.commit_and_wait()?;
            if let Some(t) = t.first() {
                per.push(t.nanos / n as f64);
            }
        }
        if !per.is_empty() {
            per.sort_by(f64::total_cmp);
            push(name, &[4096], 3 * 4096 * 4, per[per.len() / 2]);
        }
    }
    Ok(KernelsReport {
        adapter: gpu.caps().adapter_name.clone(),
        backend: gpu.caps().backend.clone(),
        driver: gpu.caps().driver.clone(),
        bandwidth: bw,
        kernels: rows,
    })
}

impl KernelsReport {
    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = format!(
            "device: {} ({}, {})\nread bandwidth: {:.1} GB/s ({} MiB in {:.1} us)\n\n",
            self.adapter,
            self.backend,
            self.driver,
            self.bandwidth.gb_s,
            self.bandwidth.bytes >> 20,
            self.bandwidth.gpu_us
        );
        s.push_str(&format!(
            "{:<22} {:<14} {:>12} {:>10} {:>10} {:>9}\n",
            "kernel", "shape", "bytes", "gpu us", "GB/s", "roofline"
        ));
        for r in &self.kernels {
            s.push_str(&format!(
                "{:<22} {:<14} {:>12} {:>10.2} {:>10.1} {:>8.1}%\n",
                r.kernel,
                r.shape,
                r.bytes,
                r.gpu_us,
                r.gb_s,
                100.0 * r.roofline_fraction
            ));
        }
        s
    }
}

/// One attention measurement.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionRow {
    pub case: String,
    pub context: usize,
    pub gpu_us: f64,
    /// Decode: K/V bytes read; prefill: 0.
    pub bytes: u64,
    pub gb_s: f64,
    /// Decode: GB/s over the read bandwidth. Prefill: none.
    pub roofline_fraction: Option<f64>,
    /// Prefill: causal attention FLOPs (2 matmuls, half the square) per second.
    pub tflop_s: Option<f64>,
}

/// The `bench attention` report.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionReport {
    pub adapter: String,
    pub bandwidth: Bandwidth,
    pub cooperative_matrix_prefill: bool,
    pub rows: Vec<AttentionRow>,
}

/// A cache of `layers` layers of `kv_heads` x `head_dim` and `ctx` positions in `format`,
/// filled by its own append kernel (every layer from the same random chunks, seeded from
/// `seed`: the bytes read are what matters).
fn filled_store(
    gpu: &MlxDevice,
    (layers, kv_heads, head_dim): (usize, usize, usize),
    ctx: usize,
    format: mlx_native::kv_quant::KvFormat,
    seed: u64,
) -> Result<mlx_native::kv_quant::KvStore> {
    let mut cfg = mlx_native::kv_cache::KvCacheConfig::new(layers, kv_heads, head_dim, ctx);
    cfg.max_chunk = ctx.min(512);
    let mut cache = mlx_native::kv_quant::KvStore::new(gpu, &cfg, format)?;
    let mut pos = 0;
    while pos < ctx {
        let t = (ctx - pos).min(cache.max_chunk());
        let k = f32_tensor(gpu, &[t, kv_heads, head_dim], seed + pos as u64)?;
        let v = f32_tensor(gpu, &[t, kv_heads, head_dim], seed + 1 + pos as u64)?;
        let mut pass = gpu.begin();
        for layer in 0..layers {
            cache.append(&mut pass, layer, &k, &v, pos)?;
        }
        pass.commit_and_wait()?;
        pos += t;
    }
    Ok(cache)
}

/// The decode attention's streaming rate: `layers` layers' attention as one dispatch pair
/// (their kv heads side by side in one cache, their query heads in one q), each kv head split
/// as one layer's are (the workgroup target scaled by the layers), so the kernel's launch,
/// ramp and tail are paid once for all of them. The analogue of the read bandwidth's 1 GiB
/// figure, which is measured the same way. Returns GPU ns per layer, the layers folded (as
/// many as 1 GiB of K and V holds) and the K and V bytes of one layer, or None when not even
/// two fit or the format is compressed.
fn streaming_decode(
    gpu: &MlxDevice,
    timer: &Timer<'_>,
    format: mlx_native::kv_quant::KvFormat,
    ctx: usize,
    layers: usize,
) -> Result<Option<(f64, usize, u64)>> {
    use mlx_native::kv_quant::KvFormat;
    let (nh, nkv, hd) = (32usize, 8usize, 128usize);
    // The compressed formats' kernel plans its own grid (no target to scale).
    if !matches!(format, KvFormat::F16 | KvFormat::F32) {
        return Ok(None);
    }
    let elem = if matches!(format, KvFormat::F16) {
        2
    } else {
        4
    };
    let k_layer = (nkv * ctx * hd * elem) as u64;
    // At most 1 GiB of K and V, as the read bandwidth reads: on an H200 (Vulkan), bindings
    // near its 2 GiB limit ran this kernel 5x slower, and every memory-bound kernel of the
    // process after them 2-3x slower (session 11; not seen at 1 GiB).
    let fit = (gpu.caps().max_storage_binding / k_layer.max(1)).min((1 << 30) / (2 * k_layer));
    let folded = (fit as usize).min(layers);
    if folded < 2 {
        return Ok(None);
    }
    let cache = filled_store(gpu, (1, nkv * folded, hd), ctx, format, 20)?;
    let q = f32_tensor(gpu, &[nh * folded, hd], 22)?;
    let opts = ops::SdpaOptions::new(hd);
    let target = ops::sdpa::decode_target_wgs();
    ops::sdpa::set_decode_target_wgs(Some(target * folded));
    let ns = timer.median_pass_ns(|p| cache.sdpa_decode(p, &q, 0, ctx, &opts).map(|_| ()));
    ops::sdpa::set_decode_target_wgs(None);
    let bytes = cache.bytes_per_layer(0) / folded as u64;
    Ok(Some((ns? / folded as f64, folded, bytes)))
}

/// Llama-3.1-8B attention (32 query heads, 8 kv heads, head dim 128, f16 KV): decode at
/// several contexts, causal prefill at several lengths.
///
/// Decode is timed two ways. "alone": one layer's attention, its dispatches timed one by one
/// (each carries the profile's floor of a few µs). "in a pass" (when `layers` > 0): the
/// attention of `layers` layers in one pass, each over its own layer's cache (so no layer
/// finds its K/V in L2), per layer: what attention costs inside a decode step, the
/// dependent dispatches' floors included. Beside it, "read, in a pass": one read-probe
/// dispatch per layer over buffers of the same bytes, the same shape of pass with nothing
/// but the reads. And "streaming" (`streaming_decode`): the layers' attention as one
/// dispatch pair, beside one read of the same bytes: the kernel's rate with the launch,
/// ramp and tail of a dispatch amortized, as in the read bandwidth it is compared with
/// (measured first, since a process can turn slow as a whole; each context ends with the
/// read bandwidth measured again, which shows it when that happened).
pub fn bench_attention(
    gpu: &MlxDevice,
    probe_mib: u64,
    decode_ctx: &[usize],
    prefill: &[usize],
    kv_formats: &[mlx_native::kv_quant::KvFormat],
    layers: usize,
) -> Result<AttentionReport> {
    use mlx_native::kv_quant::KvFormat;
    let (nh, nkv, hd) = (32usize, 8usize, 128usize);
    let bw = read_bandwidth(gpu, probe_mib)?;
    let timer = Timer::new(gpu)?;
    let mut rows = Vec::new();
    let fill_store = |ctx: usize, format: KvFormat, n_layers: usize| {
        filled_store(gpu, (n_layers, nkv, hd), ctx, format, 10)
    };
    let formats: Vec<KvFormat> = if kv_formats.is_empty() {
        vec![KvFormat::F16]
    } else {
        kv_formats.to_vec()
    };
    let decode_row = |case: String, context: usize, ns: f64, bytes: u64| {
        let gb_s = bytes as f64 / ns;
        AttentionRow {
            case,
            context,
            gpu_us: ns / 1e3,
            bytes,
            gb_s,
            roofline_fraction: Some(gb_s / bw.gb_s),
            tflop_s: None,
        }
    };
    for &format in &formats {
        for &ctx in decode_ctx {
            // The streaming rows first: on an H200 a process that has allocated and freed
            // large caches can slow down as a whole, the read too (docs/PERFORMANCE.md,
            // sessions 11 and 12).
            if layers > 0 {
                if let Some((ns, folded, bytes)) =
                    streaming_decode(gpu, &timer, format, ctx, layers)?
                {
                    rows.push(decode_row(
                        format!("decode {}, streaming", format.name()),
                        ctx,
                        ns,
                        bytes,
                    ));
                    // The same bytes read as the read bandwidth reads them: buffers of at
                    // most 256 MiB (and one binding), one probe dispatch each.
                    let total = bytes * folded as u64;
                    let chunk_max = gpu.caps().max_storage_binding.min(256 << 20);
                    let n = total.div_ceil(chunk_max).max(1);
                    let ns = read_in_pass(gpu, &timer, total / n, n as usize)? * n as f64
                        / folded as f64;
                    rows.push(decode_row("read, streaming".into(), ctx, ns, bytes));
                }
            }
            let cache = fill_store(ctx, format, layers.max(1))?;
            let q = f32_tensor(gpu, &[nh, hd], 12)?;
            let opts = ops::SdpaOptions::new(hd);
            // The whole layer is read: K and V of every position, in the format's bytes.
            let bytes = cache.bytes_per_layer(0);
            let ns = timer.median_ns(|p| cache.sdpa_decode(p, &q, 0, ctx, &opts).map(|_| ()))?;
            rows.push(decode_row(
                format!("decode {}", format.name()),
                ctx,
                ns,
                bytes,
            ));
            if layers == 0 {
                continue;
            }
            let ns = timer.median_pass_ns(|p| {
                for layer in 0..layers {
                    cache.sdpa_decode(p, &q, layer, ctx, &opts)?;
                }
                Ok(())
            })? / layers as f64;
            let case = format!("decode {}, in pass", format.name());
            rows.push(decode_row(case, ctx, ns, bytes));
            drop(cache);
            let ns = read_in_pass(gpu, &timer, bytes, layers)?;
            rows.push(decode_row("read, in pass".into(), ctx, ns, bytes));
            // The read bandwidth again: a process can turn slow as a whole (session 12), and
            // then this row falls with the others.
            let again = read_bandwidth(gpu, probe_mib)?;
            rows.push(decode_row(
                format!("read {probe_mib} MiB, after"),
                ctx,
                again.gpu_us * 1e3,
                again.bytes,
            ));
        }
    }
    for &t in prefill {
        let mut cache = fill_store(t, KvFormat::F16, 1)?;
        let q = f32_tensor(gpu, &[t, nh, hd], 13)?;
        let opts = ops::SdpaOptions::new(hd);
        let ns = timer.median_ns(|p| cache.sdpa_prefill(p, &q, 0, 0, &opts).map(|_| ()))?;
        // QK^T and PV, 2 flops per multiply-add, over the causal half.
        let flops = 2.0 * 2.0 * (t * t) as f64 / 2.0 * (hd * nh) as f64;
        rows.push(AttentionRow {
            case: "prefill (causal)".into(),
            context: t,
            gpu_us: ns / 1e3,
            bytes: 0,
            gb_s: 0.0,
            roofline_fraction: None,
            tflop_s: Some(flops / ns / 1e3),
        });
    }
    Ok(AttentionReport {
        adapter: gpu.caps().adapter_name.clone(),
        cooperative_matrix_prefill: ops::sdpa::prefill_uses_coop(gpu.caps()),
        bandwidth: bw,
        rows,
    })
}

impl AttentionReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "device: {}\nread bandwidth: {:.1} GB/s; cooperative-matrix prefill: {}\n\n{:<22} {:>8} {:>10} {:>10} {:>9} {:>9}\n",
            self.adapter, self.bandwidth.gb_s, self.cooperative_matrix_prefill, "case", "context", "gpu us", "GB/s", "roofline", "TFLOP/s"
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{:<22} {:>8} {:>10.1} {:>10.1} {:>9} {:>9}\n",
                r.case,
                r.context,
                r.gpu_us,
                r.gb_s,
                r.roofline_fraction
                    .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f)),
                r.tflop_s.map_or("-".into(), |f| format!("{f:.2}")),
            ));
        }
        s
    }
}

/// The `bench load` report: how fast a GGUF file goes from the page cache to the GPU.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub adapter: String,
    pub file_bytes: u64,
    pub tensors: usize,
    /// Parsing the header (mmap) and uploading every tensor (repack included).
    pub secs: f64,
    pub gb_s: f64,
}

/// Write a synthetic GGUF of about `mib` MiB (Q4_0 matrices of 4096 x 4096, random blocks
/// with finite scales) to `path`, read it once to warm the page cache, then time
/// parse + upload of every tensor.
pub fn bench_load(gpu: &MlxDevice, path: &std::path::Path, mib: u64) -> Result<LoadReport> {
    use mlx_native::weights::ggml::GgmlType;
    use mlx_native::weights::ggml_weight::GgmlWeight;
    use mlx_native::weights::gguf::GgufFile;
    use std::io::Write;
    let (rows, cols) = (4096usize, 4096usize);
    let kind = GgmlType::Q4_0;
    let tensor_bytes = rows * (cols / kind.block_elems()) * kind.block_bytes();
    let n = ((mib << 20) as usize).div_ceil(tensor_bytes).max(1);
    let io = |e: std::io::Error| MlxError::io(path.display().to_string(), e);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        let mut w = |b: &[u8]| f.write_all(b).map_err(io);
        let s =
            |x: &str| -> Vec<u8> { [&(x.len() as u64).to_le_bytes()[..], x.as_bytes()].concat() };
        w(b"GGUF")?;
        w(&3u32.to_le_bytes())?;
        w(&(n as u64).to_le_bytes())?;
        w(&1u64.to_le_bytes())?;
        w(&s("general.architecture"))?;
        w(&8u32.to_le_bytes())?; // string
        w(&s("bench"))?;
        let mut header = 4 + 4 + 8 + 8 + (8 + 20) + 4 + (8 + 5);
        for i in 0..n {
            let name = s(&format!("t{i}.weight"));
            header += name.len() + 4 + 16 + 4 + 8;
            w(&name)?;
            w(&2u32.to_le_bytes())?;
            w(&(cols as u64).to_le_bytes())?;
            w(&(rows as u64).to_le_bytes())?;
            w(&kind.id().to_le_bytes())?;
            w(&((i * tensor_bytes) as u64).to_le_bytes())?;
        }
        w(&vec![0u8; header.div_ceil(32) * 32 - header])?;
        // One random tensor's bytes, with every block's f16 scale set to a finite value,
        // written n times (the bench measures bytes moved, not their variety).
        let mut block = random_f32(tensor_bytes / 4, 7)
            .into_iter()
            .flat_map(f32::to_le_bytes)
            .collect::<Vec<u8>>();
        for b in block.chunks_exact_mut(kind.block_bytes()) {
            b[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
        for _ in 0..n {
            w(&block)?;
        }
    }
    // Warm the page cache.
    let _ = std::fs::read(path).map_err(io)?;
    let t0 = std::time::Instant::now();
    let f = GgufFile::open(path)?;
    let mut weights = Vec::with_capacity(n);
    for t in f.tensors() {
        weights.push(GgmlWeight::from_gguf(gpu, &f, &t.name)?);
    }
    gpu.wait_idle()?;
    let secs = t0.elapsed().as_secs_f64();
    let file_bytes = std::fs::metadata(path).map_err(io)?.len();
    let _ = std::fs::remove_file(path);
    Ok(LoadReport {
        adapter: gpu.caps().adapter_name.clone(),
        file_bytes,
        tensors: n,
        secs,
        gb_s: file_bytes as f64 / secs / 1e9,
    })
}

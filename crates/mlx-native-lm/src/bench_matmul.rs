//! `bench qmatmul` / `bench ggml`: the decode matvec (M = 1..8) and prefill matmul of quantized
//! weights, timed with GPU timestamps, as GB/s and as a fraction of the read bandwidth
//! measured in the same run ([`crate::bench::read_bandwidth`]).
//!
//! Weights are synthetic (random codes, finite random scales; never zeros), uploaded in a few
//! copies that the timed dispatches rotate through, and every timed dispatch follows a read of
//! a 128 MiB buffer (larger than the L2 cache): the weights come from device memory, as in
//! decode, where a layer's weights are read once per token. That read's own time is the
//! `probe` column: the read bandwidth under the same clocks. Variants are timed round-robin
//! in passes that begin with ~10 ms of reads (clocks up). Bytes counted: weights, scales and
//! biases, x and y, each once: the fewest any kernel must move.

use crate::bench::{read_bandwidth, Bandwidth};
use mlx_native::ops::ggml_matmul::{self, GgmlMatvecConfig};
use mlx_native::ops::qmatmul::{self, QmvConfig};
use mlx_native::weights::ggml::GgmlType;
use mlx_native::weights::ggml_weight::GgmlWeight;
use mlx_native::weights::quant::QuantParams;
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{DType, MlxBuffer, MlxDevice, MlxError, Pass, Result};
use serde::Serialize;

/// What to measure.
#[derive(Clone, Debug)]
pub struct MatmulBenchOptions {
    /// MiB read by the bandwidth probe.
    pub probe_mib: u64,
    /// Weight copies (2 to 8) to cover about this many MiB.
    pub rotate_mib: u64,
    /// Rows of x for the matvec (each <= 8).
    pub ms: Vec<usize>,
    /// Timed dispatches per measurement (after one round of warm-up over the copies).
    pub reps: usize,
    /// Extra qmv dispatch shapes to time beside the default (tuning); empty: the default only.
    pub qmv_variants: Vec<QmvConfig>,
    /// Extra GGML matvec shapes to time beside the default (tuning).
    pub ggml_variants: Vec<GgmlMatvecConfig>,
    /// Also time qmm at M = 512 (4-bit, 4096 x 4096) as TFLOP/s.
    pub qmm: bool,
    /// Skip weights of more than this many elements (quick runs on slow devices).
    pub max_elems: usize,
}

impl Default for MatmulBenchOptions {
    fn default() -> Self {
        MatmulBenchOptions {
            probe_mib: 1024,
            rotate_mib: 256,
            ms: vec![1, 2, 4, 8],
            reps: 60,
            qmv_variants: Vec::new(),
            ggml_variants: Vec::new(),
            qmm: true,
            max_elems: usize::MAX,
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulRow {
    pub kernel: String,
    /// Weight format, e.g. `b4 g64 bf16` or `Q4_K`.
    pub format: String,
    /// Weight rows.
    pub n: usize,
    /// Weight columns.
    pub k: usize,
    /// Rows of x.
    pub m: usize,
    /// Dispatch shape (`default` for the library's own choice).
    pub variant: String,
    pub bytes: u64,
    pub gpu_us: f64,
    pub gb_s: f64,
    /// Achieved GB/s over the measured read bandwidth.
    pub roofline_fraction: f64,
    /// The read probe's GB/s interleaved with this measurement (same clocks and state).
    pub probe_gb_s: f64,
    /// 2·M·N·K / time, for the matrix kernels.
    pub tflop_s: Option<f64>,
}

/// A `bench qmatmul` or `bench ggml` report.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulReport {
    pub adapter: String,
    pub backend: String,
    pub driver: String,
    pub bandwidth: Bandwidth,
    pub rows: Vec<MatmulRow>,
}

impl MatmulReport {
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
            "{:<6} {:<14} {:>11} {:>3} {:<18} {:>10} {:>9} {:>8} {:>8} {:>7} {:>7}\n",
            "kernel",
            "format",
            "N x K",
            "M",
            "variant",
            "bytes",
            "gpu us",
            "GB/s",
            "roofline",
            "probe",
            "TFLOP/s"
        ));
        for r in &self.rows {
            s.push_str(&format!(
                "{:<6} {:<14} {:>11} {:>3} {:<18} {:>10} {:>9.2} {:>8.0} {:>7.1}% {:>7.0} {:>7}\n",
                r.kernel,
                r.format,
                format!("{}x{}", r.n, r.k),
                r.m,
                r.variant,
                r.bytes,
                r.gpu_us,
                r.gb_s,
                100.0 * r.roofline_fraction,
                r.probe_gb_s,
                r.tflop_s.map(|t| format!("{t:.1}")).unwrap_or_default()
            ));
        }
        s
    }
}

/// xorshift64: synthetic weights and activations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform(-1.0, 1.0)).collect()
    }
}

/// A timed dispatch: records one kernel on weight copy `i`.
type Record<'a> = Box<dyn FnMut(&mut Pass, usize) -> Result<()> + 'a>;

/// The buffers that keep the GPU busy and flush its L2 between measured dispatches.
struct Heater {
    src: MlxBuffer,
    sink: MlxBuffer,
    wgs: u32,
}

const HEATER_MIB: usize = 128;
/// Variant names of the reference rows: a read of the weights' byte count, and of 4 KiB
/// (the fixed cost of one timed dispatch).
const PROBE_SAME: &str = "read same bytes";
const PROBE_FLOOR: &str = "read 4 KiB (floor)";
/// Most dispatches per profiled pass (wgpu allows 4096 timestamp queries, two per dispatch).
const MAX_STEPS: usize = 2000;

impl Heater {
    fn new(gpu: &MlxDevice) -> Result<Self> {
        let words = (HEATER_MIB << 20) / 4;
        let src = MlxBuffer::new(gpu, DType::U32, &[words])?;
        let mut pass = gpu.begin();
        mlx_native::ops::fill::fill_u32_words(&mut pass, &src, 0x2545_F491)?;
        pass.commit_and_wait()?;
        let wgs = ((words / 4) / (256 * 16)).max(1) as u32;
        let sink = MlxBuffer::new(gpu, DType::U32, &[wgs as usize])?;
        Ok(Heater { src, sink, wgs })
    }

    fn probe(&self, pass: &mut Pass) -> Result<()> {
        mlx_native::ops::bandwidth::read_probe(pass, &self.src, &self.sink, self.wgs)
    }

    /// Keep the GPU busy for a while (clocks up) before anything is timed.
    fn heat(&self, gpu: &MlxDevice) -> Result<()> {
        let mut pass = gpu.begin();
        for _ in 0..400 {
            self.probe(&mut pass)?;
        }
        pass.commit_and_wait()?;
        Ok(())
    }
}

/// A buffer of about `bytes` bytes (whole vec4s) to read with the probe: the time a pure
/// streaming read of the same size takes under the same conditions (launch, ramp and tail
/// included), the practical roofline for a kernel of that size.
struct SizedProbe {
    src: MlxBuffer,
    sink: MlxBuffer,
    wgs: u32,
}

impl SizedProbe {
    fn new(gpu: &MlxDevice, bytes: u64) -> Result<Self> {
        let words = ((bytes as usize).div_ceil(16) * 4).max(4);
        let src = MlxBuffer::new(gpu, DType::U32, &[words])?;
        let mut pass = gpu.begin();
        mlx_native::ops::fill::fill_u32_words(&mut pass, &src, 0x6A09_E667)?;
        pass.commit_and_wait()?;
        let wgs = ((words / 4) / (256 * 16)).max(1) as u32;
        let sink = MlxBuffer::new(gpu, DType::U32, &[wgs as usize])?;
        Ok(SizedProbe { src, sink, wgs })
    }

    fn record(&self) -> Record<'_> {
        Box::new(move |p, _| {
            mlx_native::ops::bandwidth::read_probe(p, &self.src, &self.sink, self.wgs)
        })
    }
}

/// Median GPU nanoseconds of each variant, measured interleaved (round-robin) in passes that
/// start with ~10 ms of read-probe work, so every variant sees the same clocks. Each measured
/// dispatch takes the next weight copy (`copies` of them, rotating); with `flush`, a read
/// of the heater buffer (larger than L2) precedes each one, and its own times give the
/// read bandwidth under the same conditions (returned second, GB/s; 0 without flush).
fn interleaved(
    gpu: &MlxDevice,
    heater: &Heater,
    copies: usize,
    flush: bool,
    warm: usize,
    reps: usize,
    variants: &mut [Record<'_>],
) -> Result<(Vec<f64>, f64)> {
    let per_round = variants.len() * if flush { 2 } else { 1 };
    let heat = 150;
    let rounds_per_pass = ((MAX_STEPS - heat) / per_round.max(1)).max(1);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut probe_ns = Vec::new();
    let mut round = 0;
    let mut next = 0usize;
    while round < warm + reps {
        let mut pass = gpu.begin().with_profiling(true);
        for _ in 0..heat {
            heater.probe(&mut pass)?;
        }
        let mut slots = Vec::new();
        let mut probes = Vec::new();
        for _ in 0..rounds_per_pass.min(warm + reps - round) {
            for (v, rec) in variants.iter_mut().enumerate() {
                if flush {
                    probes.push((pass.len(), round >= warm));
                    heater.probe(&mut pass)?;
                }
                let at = pass.len();
                rec(&mut pass, next % copies)?;
                next += 1;
                if pass.len() != at + 1 {
                    return Err(MlxError::invalid(
                        "bench: a timed variant recorded other than one dispatch",
                    ));
                }
                if round >= warm {
                    slots.push((at, v));
                }
            }
            round += 1;
        }
        let t = pass.commit_and_wait()?;
        for (at, v) in slots {
            if let (Some(k), Some(s)) = (t.get(at), samples.get_mut(v)) {
                s.push(k.nanos);
            }
        }
        for (at, keep) in probes {
            if let (true, Some(k)) = (keep, t.get(at)) {
                probe_ns.push(k.nanos);
            }
        }
    }
    let median = |mut v: Vec<f64>| -> Result<f64> {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2)
            .copied()
            .ok_or_else(|| MlxError::invalid("bench: no samples"))
    };
    let meds = samples
        .into_iter()
        .map(median)
        .collect::<Result<Vec<_>>>()?;
    let probe = if flush {
        (HEATER_MIB << 20) as f64 / median(probe_ns)?
    } else {
        0.0
    };
    Ok((meds, probe))
}

fn copies_for(bytes: u64, rotate_mib: u64) -> usize {
    ((rotate_mib << 20).div_ceil(bytes.max(1)) as usize).clamp(2, 8)
}

fn check_ms(ms: &[usize]) -> Result<()> {
    if ms.iter().any(|&m| m == 0 || m > 8) {
        return Err(MlxError::invalid(format!(
            "bench: matvec M values {ms:?}; each must be 1..=8"
        )));
    }
    Ok(())
}

struct Push<'a> {
    rows: &'a mut Vec<MatmulRow>,
    bw: f64,
    probe: f64,
}

impl Push<'_> {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        kernel: &str,
        format: &str,
        n: usize,
        k: usize,
        m: usize,
        variant: String,
        bytes: u64,
        ns: f64,
    ) {
        let gb_s = bytes as f64 / ns;
        self.rows.push(MatmulRow {
            kernel: kernel.into(),
            format: format.into(),
            n,
            k,
            m,
            variant,
            bytes,
            gpu_us: ns / 1e3,
            gb_s,
            roofline_fraction: gb_s / self.bw,
            probe_gb_s: self.probe,
            tflop_s: None,
        });
    }
}

fn report(gpu: &MlxDevice, bandwidth: Bandwidth, rows: Vec<MatmulRow>) -> MatmulReport {
    MatmulReport {
        adapter: gpu.caps().adapter_name.clone(),
        backend: gpu.caps().backend.clone(),
        driver: gpu.caps().driver.clone(),
        bandwidth,
        rows,
    }
}

/// A random MLX-affine weight (bf16 scales and biases) on the GPU.
fn quant_weight(
    gpu: &MlxDevice,
    rng: &mut Rng,
    n: usize,
    k: usize,
    params: QuantParams,
) -> Result<(QuantWeight, u64)> {
    let wpr = k * params.bits as usize / 32;
    let packed: Vec<u32> = (0..n * wpr).map(|_| rng.next() as u32).collect();
    let groups = n * k / params.group_size as usize;
    let s: Vec<half::bf16> = (0..groups)
        .map(|_| half::bf16::from_f32(rng.uniform(0.001, 0.01)))
        .collect();
    let b: Vec<half::bf16> = (0..groups)
        .map(|_| half::bf16::from_f32(rng.uniform(-0.05, 0.05)))
        .collect();
    let w = QuantWeight::from_raw(
        gpu,
        &packed,
        &bf16_bytes(&s),
        Some(&bf16_bytes(&b)),
        [n, k],
        params,
        DType::BF16,
    )?;
    Ok((w, (packed.len() * 4 + groups * 4) as u64))
}

fn bf16_bytes(v: &[half::bf16]) -> Vec<u8> {
    v.iter().flat_map(|h| h.to_bits().to_le_bytes()).collect()
}

/// qmv (M = 1..8) for MLX 4- and 8-bit g64 weights at Llama-3.1-8B shapes, and qmm at
/// M = 512.
pub fn bench_qmatmul(gpu: &MlxDevice, opts: &MatmulBenchOptions) -> Result<MatmulReport> {
    check_ms(&opts.ms)?;
    let heater = Heater::new(gpu)?;
    let floor = SizedProbe::new(gpu, 4096)?;
    heater.heat(gpu)?;
    let bw = read_bandwidth(gpu, opts.probe_mib)?;
    let mut rows = Vec::new();
    let mut push = Push {
        rows: &mut rows,
        bw: bw.gb_s,
        probe: 0.0,
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let shapes = [(4096usize, 4096usize), (14336, 4096), (4096, 14336)];
    for bits in [4u32, 8] {
        let params = QuantParams::affine(bits, 64);
        let format = format!("b{bits} g64 bf16");
        for &(n, k) in &shapes {
            if (bits == 8 && n != k) || n * k > opts.max_elems {
                continue;
            }
            let (w0, wbytes) = quant_weight(gpu, &mut rng, n, k, params)?;
            let copies = copies_for(wbytes, opts.rotate_mib);
            let same = SizedProbe::new(gpu, wbytes)?;
            let mut ws = vec![w0];
            for _ in 1..copies {
                ws.push(quant_weight(gpu, &mut rng, n, k, params)?.0);
            }
            for &m in &opts.ms {
                let x = MlxBuffer::from_slice(gpu, &rng.f32s(m * k), &[m, k])?;
                let bytes = wbytes + 4 * (m * k + m * n) as u64;
                let mut names = vec!["default".to_string()];
                let mut recs: Vec<Record<'_>> =
                    vec![Box::new(|p, i| qmatmul::qmv(p, &x, &ws[i]).map(|_| ()))];
                names.push(PROBE_SAME.into());
                recs.push(same.record());
                names.push(PROBE_FLOOR.into());
                recs.push(floor.record());
                for &cfg in &opts.qmv_variants {
                    names.push(format!("rpt{} tpr{} wg{}", cfg.rpt, cfg.tpr, cfg.wg));
                    let (x, ws) = (&x, &ws);
                    recs.push(Box::new(move |p, i| {
                        qmatmul::qmv_with(p, x, &ws[i], cfg).map(|_| ())
                    }));
                }
                let (meds, probe) =
                    interleaved(gpu, &heater, copies, true, 5, opts.reps, &mut recs)?;
                push.probe = probe;
                for (name, ns) in names.into_iter().zip(meds) {
                    let kernel = if name.starts_with("read") {
                        "probe"
                    } else {
                        "qmv"
                    };
                    push.row(kernel, &format, n, k, m, name, bytes, ns);
                }
            }
            if opts.qmm && bits == 4 && n == 4096 && k == 4096 {
                let m = 512;
                let x = MlxBuffer::from_slice(gpu, &rng.f32s(m * k), &[m, k])?;
                let bytes = wbytes + 4 * (m * k + m * n) as u64;
                let mut recs: Vec<Record<'_>> =
                    vec![Box::new(|p, i| qmatmul::qmm(p, &x, &ws[i]).map(|_| ()))];
                let (meds, probe) = interleaved(gpu, &heater, copies, true, 3, 10, &mut recs)?;
                push.probe = probe;
                let ns = meds.first().copied().unwrap_or(f64::NAN);
                push.row("qmm", &format, n, k, m, "default".into(), bytes, ns);
                if let Some(r) = push.rows.last_mut() {
                    r.tflop_s = Some(2.0 * (m * n * k) as f64 / ns / 1e3);
                }
            }
        }
    }
    Ok(report(gpu, bw, rows))
}

/// Byte offsets of the f16 scale fields in a block of `kind` (to make them finite).
fn half_fields(kind: GgmlType) -> &'static [usize] {
    match kind {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random GGML blocks of `kind` with finite random f16 scales (dense types: random values).
fn ggml_bytes(rng: &mut Rng, kind: GgmlType, n: usize, k: usize) -> Result<Vec<u8>> {
    let len = kind.row_bytes(k as u64)? as usize * n;
    let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let bb = kind.block_bytes();
    match kind {
        GgmlType::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.uniform(-1.0, 1.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                let h = half::f16::from_f32(rng.uniform(-1.0, 1.0));
                c.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in b.chunks_exact_mut(2) {
                let h = half::bf16::from_f32(rng.uniform(-1.0, 1.0));
                c.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        _ => {
            for blk in b.chunks_exact_mut(bb) {
                for &f in half_fields(kind) {
                    let mag = 2f32.powf(rng.uniform(-9.0, -3.0));
                    let s = if rng.next() & 1 == 0 { mag } else { -mag };
                    let h = half::f16::from_f32(s);
                    blk[f..f + 2].copy_from_slice(&h.to_bits().to_le_bytes());
                }
            }
        }
    }
    Ok(b)
}

/// GGML matvec (M = 1..8) for the common llama.cpp types at Llama-3.1-8B shapes, plus Q4_1
/// and Q8_0 at SmolLM2-135M's (576 wide, 1536 MLP).
pub fn bench_ggml(gpu: &MlxDevice, opts: &MatmulBenchOptions) -> Result<MatmulReport> {
    check_ms(&opts.ms)?;
    let heater = Heater::new(gpu)?;
    let floor = SizedProbe::new(gpu, 4096)?;
    heater.heat(gpu)?;
    let bw = read_bandwidth(gpu, opts.probe_mib)?;
    let mut rows = Vec::new();
    let mut push = Push {
        rows: &mut rows,
        bw: bw.gb_s,
        probe: 0.0,
    };
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut cases = Vec::new();
    for kind in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q5_0,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
    ] {
        for shape in [(4096usize, 4096usize), (14336, 4096)] {
            cases.push((kind, shape));
        }
    }
    for kind in [GgmlType::Q4_1, GgmlType::Q8_0] {
        for shape in [(576, 576), (1536, 576), (576, 1536)] {
            cases.push((kind, shape));
        }
    }
    for (kind, (n, k)) in cases {
        if n * k > opts.max_elems {
            continue;
        }
        let bytes0 = ggml_bytes(&mut rng, kind, n, k)?;
        let wbytes = bytes0.len() as u64;
        let copies = copies_for(wbytes, opts.rotate_mib);
        let same = SizedProbe::new(gpu, wbytes)?;
        let mut ws = vec![GgmlWeight::upload(gpu, kind, &[n, k], &bytes0)?];
        // Copies of the same bytes at other addresses: the cache sees distinct data.
        for _ in 1..copies {
            ws.push(GgmlWeight::upload(gpu, kind, &[n, k], &bytes0)?);
        }
        for &m in &opts.ms {
            let x = MlxBuffer::from_slice(gpu, &rng.f32s(m * k), &[m, k])?;
            let bytes = wbytes + 4 * (m * k + m * n) as u64;
            let mut names = vec!["default".to_string()];
            let mut recs: Vec<Record<'_>> = vec![Box::new(|p, i| {
                ggml_matmul::ggml_matvec(p, &x, &ws[i]).map(|_| ())
            })];
            names.push(PROBE_SAME.into());
            recs.push(same.record());
            names.push(PROBE_FLOOR.into());
            recs.push(floor.record());
            for &cfg in &opts.ggml_variants {
                names.push(format!("{cfg}"));
                let (x, ws) = (&x, &ws);
                recs.push(Box::new(move |p, i| {
                    ggml_matmul::ggml_matvec_with(p, x, &ws[i], cfg).map(|_| ())
                }));
            }
            let (meds, probe) = interleaved(gpu, &heater, copies, true, 5, opts.reps, &mut recs)?;
            push.probe = probe;
            for (name, ns) in names.into_iter().zip(meds) {
                let kernel = if name.starts_with("read") {
                    "probe"
                } else {
                    "matvec"
                };
                push.row(kernel, kind.name(), n, k, m, name, bytes, ns);
            }
        }
    }
    Ok(report(gpu, bw, rows))
}

/// One stream measurement: a chain of dependent dispatches timed as one compute pass.
#[derive(Clone, Debug, Serialize)]
pub struct StreamRow {
    pub what: String,
    /// Dispatches in the timed pass.
    pub dispatches: usize,
    /// Bytes one dispatch must read (weights, scales, biases).
    pub bytes: u64,
    /// GPU time per dispatch (median of 5 passes).
    pub us_per_dispatch: f64,
    pub gb_s: f64,
    pub roofline_fraction: f64,
}

/// Matvecs as decode runs them: `y = W x` feeding the next matvec's x, one compute pass, no
/// per-dispatch timestamps, 8 weight copies per shape in rotation (more than the L2 cache),
/// so each weight comes from memory. The chain alternates [N, K] and [K, N] weights (FFN up
/// then down). Reported per dispatch. `variants`: qmv shapes to time beside the default.
pub fn bench_qmv_stream(gpu: &MlxDevice, variants: &[QmvConfig]) -> Result<Vec<StreamRow>> {
    let bw = read_bandwidth(gpu, 1024)?;
    let mut rng = Rng(0x5EED);
    let params = QuantParams::affine(4, 64);
    let mut rows = Vec::new();
    for &(n, k) in &[(4096usize, 4096usize), (14336, 4096)] {
        let mut up = Vec::new();
        let mut down = Vec::new();
        let mut bytes = 0;
        for _ in 0..8 {
            let (w, b) = quant_weight(gpu, &mut rng, n, k, params)?;
            up.push(w);
            bytes = b;
            down.push(quant_weight(gpu, &mut rng, k, n, params)?.0);
        }
        let x0: Vec<f32> = (0..k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let x0 = MlxBuffer::from_slice(gpu, &x0, &[1, k])?;
        let mut cfgs: Vec<Option<QmvConfig>> = vec![None];
        cfgs.extend(variants.iter().map(|&c| Some(c)));
        let steps = 64;
        for cfg in cfgs {
            let mut per = Vec::new();
            for rep in 0..6 {
                let mut pass = gpu.begin().with_pass_timing(true);
                let mut x = x0.clone();
                for i in 0..steps {
                    let w = if i % 2 == 0 {
                        &up[(i / 2) % 8]
                    } else {
                        &down[(i / 2) % 8]
                    };
                    // Values may overflow along the chain: timing does not depend on them.
                    x = match cfg {
                        None => qmatmul::qmv(&mut pass, &x, w)?,
                        Some(c) => qmatmul::qmv_with(&mut pass, &x, w, c)?,
                    };
                }
                let t = pass.commit_and_wait()?;
                if let (true, Some(t)) = (rep > 0, t.first()) {
                    per.push(t.nanos / 1e3 / steps as f64);
                }
            }
            if per.is_empty() {
                continue;
            }
            per.sort_by(f64::total_cmp);
            let us = per[per.len() / 2];
            let gb_s = bytes as f64 / (us * 1e3);
            rows.push(StreamRow {
                what: format!(
                    "qmv 4-bit g64 {n}x{k} / {k}x{n}, {}",
                    cfg.map_or("default".into(), |c| format!(
                        "rpt{} tpr{} wg{} exp{} xq{}",
                        c.rpt, c.tpr, c.wg, c.exp, c.xq
                    ))
                ),
                dispatches: steps,
                bytes,
                us_per_dispatch: us,
                gb_s,
                roofline_fraction: gb_s / bw.gb_s,
            });
        }
    }
    // The floor: the same chain of scales alone (one 4096-row each).
    let x0 = MlxBuffer::from_slice(gpu, &vec![1.0f32; 4096], &[1, 4096])?;
    let mut per = Vec::new();
    for rep in 0..6 {
        let mut pass = gpu.begin().with_pass_timing(true);
        let mut x = x0.clone();
        for _ in 0..128 {
            x = mlx_native::ops::scale(&mut pass, &x, 0.999)?;
        }
        let t = pass.commit_and_wait()?;
        if let (true, Some(t)) = (rep > 0, t.first()) {
            per.push(t.nanos / 1e3 / 128.0);
        }
    }
    if !per.is_empty() {
        per.sort_by(f64::total_cmp);
        rows.push(StreamRow {
            what: "scale [4096] chain (the per-dispatch floor)".into(),
            dispatches: 128,
            bytes: 4096 * 8,
            us_per_dispatch: per[per.len() / 2],
            gb_s: 0.0,
            roofline_fraction: 0.0,
        });
    }
    Ok(rows)
}

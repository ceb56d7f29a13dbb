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
//! biases, x and y, each once: the fewest any kernel must move. The routed expert matvec
//! (`gqmv`) counts the selected experts' weights, scales and biases only.
//!
//! `bench qmatmul` rows: `qmv` (4- and 8-bit) at Llama-3.1-8B's layer shapes; `qmm` (4-bit)
//! and `dense` (the f16 [`dense::matmul`], cooperative matrix where the device has it) at
//! M = 512 for those shapes and the lm_head, as TFLOP/s; `gqmv`, the routed decode matvec of
//! [`moe::gather_qmm`], at Qwen3-30B-A3B's expert shapes (top-8 of 128).

use crate::bench::{read_bandwidth, Bandwidth};
use mlx_native::ops::dense;
use mlx_native::ops::ggml_matmul::{self, GgmlMatvecConfig};
use mlx_native::ops::moe;
use mlx_native::ops::qmatmul::{self, QmvConfig};
use mlx_native::weights::expert_weight::QuantExperts;
use mlx_native::weights::ggml::GgmlType;
use mlx_native::weights::ggml_weight::GgmlWeight;
use mlx_native::weights::quant::QuantParams;
use mlx_native::weights::quant_weight::QuantWeight;
use mlx_native::{DType, MlxBuffer, MlxDevice, MlxError, Pass, Result};
use serde::Serialize;

/// Llama-3.1-8B's weight shapes, N x K: q/o, gate/up, down, lm_head.
const LLAMA_SHAPES: [(usize, usize); 4] =
    [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)];
/// Qwen3-30B-A3B's routed experts: hidden size, expert intermediate size, experts, top-k.
const MOE_HIDDEN: usize = 2048;
const MOE_INTER: usize = 768;
const MOE_EXPERTS: usize = 128;
const MOE_TOP_K: usize = 8;

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
    /// Also time the prefill matmuls at M = `mm_m` for every Llama-3.1-8B shape (lm_head
    /// included) as TFLOP/s: qmm (4-bit g64) and the dense f16 matmul.
    pub qmm: bool,
    /// Rows of x for the prefill matmuls.
    pub mm_m: usize,
    /// qmm's cooperative kernel again with these measurement switches (`qmm_with`; tuning).
    pub qmm_exps: Vec<u32>,
    /// Also time the routed decode matvec at Qwen3-30B-A3B's expert shapes.
    pub moe: bool,
    /// Also time qmv at M = 1 streaming (`bench_streaming`).
    pub stream: bool,
    /// Skip weights of more than this many elements (quick runs on slow devices); for routed
    /// experts, the elements of the selected experts.
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
            mm_m: 512,
            qmm_exps: Vec::new(),
            moe: true,
            stream: true,
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
    /// `count` distinct values below `below` (a partial Fisher-Yates shuffle).
    fn distinct(&mut self, count: usize, below: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..below as u32).collect();
        for i in 0..count.min(below) {
            let j = i + (self.next() % (below - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(count);
        all
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
                if pass.len() == at {
                    return Err(MlxError::invalid("bench: a timed variant recorded nothing"));
                }
                // A variant of several dispatches (qmm's f16 copy of x, then the matmul)
                // counts them all.
                if round >= warm {
                    slots.push((at..pass.len(), v));
                }
            }
            round += 1;
        }
        let t = pass.commit_and_wait()?;
        for (range, v) in slots {
            if let (Some(ks), Some(s)) = (t.get(range), samples.get_mut(v)) {
                s.push(ks.iter().map(|k| k.nanos).sum());
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

/// What a row measures: `m` rows of x against an `n x k` weight of `format`, moving `bytes`.
#[derive(Clone, Copy)]
struct Case<'a> {
    kernel: &'a str,
    format: &'a str,
    n: usize,
    k: usize,
    m: usize,
    bytes: u64,
}

/// One run: the device, the L2 flush, the 4 KiB read (the fixed cost of a timed dispatch),
/// the measured read bandwidth and the rows so far.
struct Bench<'g> {
    gpu: &'g MlxDevice,
    heater: Heater,
    floor: SizedProbe,
    reps: usize,
    bandwidth: Bandwidth,
    rows: Vec<MatmulRow>,
}

impl<'g> Bench<'g> {
    /// Buffers, a burst of reads (clocks up), then the read bandwidth.
    fn new(gpu: &'g MlxDevice, opts: &MatmulBenchOptions) -> Result<Self> {
        check_ms(&opts.ms)?;
        let heater = Heater::new(gpu)?;
        let floor = SizedProbe::new(gpu, 4096)?;
        heater.heat(gpu)?;
        let bandwidth = read_bandwidth(gpu, opts.probe_mib)?;
        Ok(Bench {
            gpu,
            heater,
            floor,
            reps: opts.reps,
            bandwidth,
            rows: Vec::new(),
        })
    }

    fn row(&mut self, c: &Case, kernel: &str, variant: String, ns: f64, probe: f64) {
        let gb_s = c.bytes as f64 / ns;
        self.rows.push(MatmulRow {
            kernel: kernel.into(),
            format: c.format.into(),
            n: c.n,
            k: c.k,
            m: c.m,
            variant,
            bytes: c.bytes,
            gpu_us: ns / 1e3,
            gb_s,
            roofline_fraction: gb_s / self.bandwidth.gb_s,
            probe_gb_s: probe,
            tflop_s: None,
        });
    }

    /// Time each named variant of the matvec `c` beside a read of `same` (as many bytes as
    /// the weight) and the 4 KiB floor, interleaved, each after an L2 flush, rotating over
    /// `copies` weight copies: a row each (`c.kernel`, the reads as `probe`).
    fn matvecs<'r>(
        &mut self,
        c: &Case,
        copies: usize,
        same: &'r SizedProbe,
        variants: Vec<(String, Record<'r>)>,
    ) -> Result<()> {
        let (names, mut recs): (Vec<String>, Vec<Record<'_>>) = variants.into_iter().unzip();
        recs.push(same.record());
        recs.push(self.floor.record());
        let (meds, probe) = interleaved(
            self.gpu,
            &self.heater,
            copies,
            true,
            5,
            self.reps,
            &mut recs,
        )?;
        drop(recs);
        let names = names
            .into_iter()
            .map(|n| (c.kernel, n))
            .chain([("probe", PROBE_SAME.into()), ("probe", PROBE_FLOOR.into())]);
        for ((kernel, name), ns) in names.zip(meds) {
            self.row(c, kernel, name, ns, probe);
        }
        Ok(())
    }

    /// Time the prefill matmul `c` (3 warm-up rounds, at most 10 timed, each after an L2
    /// flush, rotating over `copies` weight copies): a row with TFLOP/s.
    fn matmul(&mut self, c: &Case, copies: usize, rec: Record<'_>) -> Result<()> {
        self.matmul_variant(c, "default", copies, rec)
    }

    fn matmul_variant(
        &mut self,
        c: &Case,
        variant: &str,
        copies: usize,
        rec: Record<'_>,
    ) -> Result<()> {
        let reps = self.reps.clamp(1, 10);
        let mut recs = [rec];
        let (meds, probe) = interleaved(self.gpu, &self.heater, copies, true, 3, reps, &mut recs)?;
        let ns = meds.first().copied().unwrap_or(f64::NAN);
        self.row(c, c.kernel, variant.into(), ns, probe);
        if let Some(r) = self.rows.last_mut() {
            r.tflop_s = Some(2.0 * (c.m * c.n * c.k) as f64 / ns / 1e3);
        }
        Ok(())
    }

    fn report(self) -> MatmulReport {
        let caps = self.gpu.caps();
        MatmulReport {
            adapter: caps.adapter_name.clone(),
            backend: caps.backend.clone(),
            driver: caps.driver.clone(),
            bandwidth: self.bandwidth,
            rows: self.rows,
        }
    }
}

/// A random MLX-affine weight (bf16 scales and biases) on the GPU, and its bytes.
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

/// Distinct random copies of a weight, enough to cover about `rotate_mib` MiB (2 to 8), and
/// the bytes of one.
fn quant_copies(
    gpu: &MlxDevice,
    rng: &mut Rng,
    n: usize,
    k: usize,
    params: QuantParams,
    rotate_mib: u64,
) -> Result<(Vec<QuantWeight>, u64)> {
    let (w0, bytes) = quant_weight(gpu, rng, n, k, params)?;
    let mut ws = vec![w0];
    for _ in 1..copies_for(bytes, rotate_mib) {
        ws.push(quant_weight(gpu, rng, n, k, params)?.0);
    }
    Ok((ws, bytes))
}

fn bf16_bytes(v: &[half::bf16]) -> Vec<u8> {
    v.iter().flat_map(|h| h.to_bits().to_le_bytes()).collect()
}

/// With `opts.stream` qmv's streaming rate at M = 1 ([`bench_streaming`]); qmv (M = 1..8)
/// alone after an L2 flush for MLX 4- and 8-bit g64 weights at Llama-3.1-8B's layer shapes;
/// with `opts.qmm` the prefill matmuls ([`bench_prefill`]); with `opts.moe` the routed
/// decode matvec ([`bench_routed`]).
pub fn bench_qmatmul(gpu: &MlxDevice, opts: &MatmulBenchOptions) -> Result<MatmulReport> {
    let mut b = Bench::new(gpu, opts)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // First: on an H200 a process that has run many other rows can slow down as a whole
    // (the read probe too, by up to 2x; docs/PERFORMANCE.md, sessions 11 and 12).
    if opts.stream {
        bench_streaming(&mut b, &mut rng, opts)?;
    }
    for bits in [4u32, 8] {
        let params = QuantParams::affine(bits, 64);
        let format = format!("b{bits} g64 bf16");
        // The lm_head is timed as a matmul only.
        for &(n, k) in &LLAMA_SHAPES[..3] {
            if (bits == 8 && n != k) || n * k > opts.max_elems {
                continue;
            }
            let (ws, wbytes) = quant_copies(gpu, &mut rng, n, k, params, opts.rotate_mib)?;
            let same = SizedProbe::new(gpu, wbytes)?;
            for &m in &opts.ms {
                let x = MlxBuffer::from_slice(gpu, &rng.f32s(m * k), &[m, k])?;
                let c = Case {
                    kernel: "qmv",
                    format: &format,
                    n,
                    k,
                    m,
                    bytes: wbytes + 4 * (m * k + m * n) as u64,
                };
                let (x, ws) = (&x, &ws);
                let mut v: Vec<(String, Record<'_>)> = vec![(
                    "default".into(),
                    Box::new(move |p, i| qmatmul::qmv(p, x, &ws[i]).map(|_| ())),
                )];
                for &cfg in &opts.qmv_variants {
                    v.push((
                        format!("rpt{} tpr{} wg{}", cfg.rpt, cfg.tpr, cfg.wg),
                        Box::new(move |p, i| qmatmul::qmv_with(p, x, &ws[i], cfg).map(|_| ())),
                    ));
                }
                b.matvecs(&c, ws.len(), &same, v)?;
            }
        }
    }
    if opts.qmm {
        bench_prefill(&mut b, &mut rng, opts)?;
    }
    if opts.moe {
        bench_routed(&mut b, &mut rng, opts)?;
    }
    Ok(b.report())
}

/// Row-sets a streaming qmv row also runs in: 8 rows, 16 invocations (half a 32-wide
/// subgroup), 128 a workgroup. Each invocation walks twice the chunks of the 32-wide sets,
/// which streams faster alone; decode keeps the library's shapes, which have the warps a
/// matvec waiting on the one before needs (docs/PERFORMANCE.md, session 12).
pub const STREAM_SHAPE: QmvConfig = QmvConfig {
    rpt: 8,
    tpr: 16,
    wg: 128,
    exp: 0,
    xq: 2,
};

/// The matvec's streaming rate at M = 1 (x quantized by its producer, as decode runs it;
/// [`ShapeStream`]) for each Llama-3.1-8B shape, in the library's shape and in
/// [`STREAM_SHAPE`], beside the read probe in the same arrangement: rows `qmv_xq`
/// (`stream, default`, `stream, 8x16`) and `probe` (`read, stream`). The alone-after-a-flush
/// rows above are dominated by the launch (even the probe's); these are what a 1 GiB read
/// bandwidth compares with.
fn bench_streaming(b: &mut Bench<'_>, rng: &mut Rng, opts: &MatmulBenchOptions) -> Result<()> {
    let format = "b4 g64 bf16";
    for &(n, k) in &LLAMA_SHAPES {
        if n * k > opts.max_elems {
            continue;
        }
        let Some(st) = stream_shape(b.gpu, (n, k), &[None, Some(STREAM_SHAPE)], false, rng)? else {
            continue;
        };
        let c = Case {
            kernel: "qmv_xq",
            format,
            n,
            k,
            m: 1,
            bytes: st.bytes,
        };
        // ns a dispatch.
        let per = |pass_us: f64| pass_us * 1e3 / st.steps as f64;
        let probe_gb_s = st.bytes as f64 / per(st.probe_pass_us);
        for t in st.rows.iter().filter(|t| t.xq) {
            let name = t.cfg.map_or("stream, default".into(), |cfg| {
                format!("stream, {}x{}", cfg.rpt, cfg.tpr)
            });
            b.row(&c, "qmv_xq", name, per(t.pass_us), probe_gb_s);
        }
        b.row(
            &c,
            "probe",
            "read, stream".into(),
            per(st.probe_pass_us),
            probe_gb_s,
        );
    }
    Ok(())
}

/// qmm (4-bit g64, `qmm`) and the dense f16 matmul (`dense`, random values in [-1, 1)) at
/// M = `opts.mm_m` for every Llama-3.1-8B shape, as TFLOP/s. A dense weight larger than one
/// storage binding is skipped.
fn bench_prefill(b: &mut Bench<'_>, rng: &mut Rng, opts: &MatmulBenchOptions) -> Result<()> {
    let gpu = b.gpu;
    let m = opts.mm_m;
    if m == 0 {
        return Err(MlxError::invalid("bench: prefill M is 0"));
    }
    let caps = gpu.caps();
    let max_dense = caps.max_storage_binding.min(caps.max_buffer_size);
    for &(n, k) in &LLAMA_SHAPES {
        if n * k > opts.max_elems {
            continue;
        }
        let x = MlxBuffer::from_slice(gpu, &rng.f32s(m * k), &[m, k])?;
        let xy = 4 * (m * k + m * n) as u64;
        let params = QuantParams::affine(4, 64);
        let (qs, qbytes) = quant_copies(gpu, rng, n, k, params, opts.rotate_mib)?;
        let c = Case {
            kernel: "qmm",
            format: "b4 g64 bf16",
            n,
            k,
            m,
            bytes: qbytes + xy,
        };
        let rec: Record<'_> = Box::new(|p, i| qmatmul::qmm(p, &x, &qs[i]).map(|_| ()));
        b.matmul(&c, qs.len(), rec)?;
        let (xr, qr) = (&x, &qs);
        for &e in &opts.qmm_exps {
            let rec: Record<'_> =
                Box::new(move |p, i| qmatmul::qmm_with(p, xr, &qr[i], e).map(|_| ()));
            b.matmul_variant(&c, &format!("exp {e}"), qs.len(), rec)?;
        }
        drop(qs);
        let dbytes = 2 * (n * k) as u64;
        if dbytes > max_dense {
            continue;
        }
        let w: Vec<half::f16> = (0..n * k)
            .map(|_| half::f16::from_f32(rng.uniform(-1.0, 1.0)))
            .collect();
        // Copies of the same values at other addresses: the cache sees distinct data.
        let ws = (0..copies_for(dbytes, opts.rotate_mib))
            .map(|_| MlxBuffer::from_slice(gpu, &w, &[n, k]))
            .collect::<Result<Vec<_>>>()?;
        drop(w);
        let c = Case {
            kernel: "dense",
            format: "f16",
            bytes: dbytes + xy,
            ..c
        };
        let rec: Record<'_> = Box::new(|p, i| dense::matmul(p, &x, &ws[i]).map(|_| ()));
        b.matmul(&c, ws.len(), rec)?;
    }
    Ok(())
}

/// The routed decode matvec (`gqmv`: [`moe::gather_qmm`] at one token, as decode runs it) at
/// Qwen3-30B-A3B's expert shapes, MLX 4-bit g64: gate/up (x `[1, H]` shared by the 8
/// slots) and down (x `[1, 8, I]`). Each copy of the 128 stacked experts comes with its own 8
/// random distinct expert ids; bytes are those of the 8 selected experts.
fn bench_routed(b: &mut Bench<'_>, rng: &mut Rng, opts: &MatmulBenchOptions) -> Result<()> {
    let gpu = b.gpu;
    let params = QuantParams::affine(4, 64);
    let cases: [(usize, usize, &[usize]); 2] = [
        (MOE_INTER, MOE_HIDDEN, &[1, MOE_HIDDEN]),
        (MOE_HIDDEN, MOE_INTER, &[1, MOE_TOP_K, MOE_INTER]),
    ];
    for (n, k, xshape) in cases {
        if MOE_TOP_K * n * k > opts.max_elems {
            continue;
        }
        let (stacks, stack_bytes) =
            quant_copies(gpu, rng, MOE_EXPERTS * n, k, params, opts.rotate_mib)?;
        let mut ws = Vec::new();
        let mut ids = Vec::new();
        for w in stacks {
            ws.push(QuantExperts::new(w, MOE_EXPERTS)?);
            let pick = rng.distinct(MOE_TOP_K, MOE_EXPERTS);
            ids.push(moe::expert_ids(gpu, &pick, [1, MOE_TOP_K], MOE_EXPERTS)?);
        }
        let bytes = stack_bytes / MOE_EXPERTS as u64 * MOE_TOP_K as u64;
        let same = SizedProbe::new(gpu, bytes)?;
        let x = MlxBuffer::from_slice(gpu, &rng.f32s(xshape.iter().product()), xshape)?;
        let c = Case {
            kernel: "gqmv",
            format: "b4 g64 bf16",
            n,
            k,
            m: 1,
            bytes,
        };
        let (x, ws, ids) = (&x, &ws, &ids);
        let v: Vec<(String, Record<'_>)> = vec![(
            format!("top-{MOE_TOP_K} of {MOE_EXPERTS}"),
            Box::new(move |p, i| moe::gather_qmm(p, x, &ws[i], &ids[i]).map(|_| ())),
        )];
        b.matvecs(&c, ws.len(), &same, v)?;
    }
    Ok(())
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
    let mut b = Bench::new(gpu, opts)?;
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
        // Copies of the same bytes at other addresses: the cache sees distinct data.
        let ws = (0..copies)
            .map(|_| GgmlWeight::upload(gpu, kind, &[n, k], &bytes0))
            .collect::<Result<Vec<_>>>()?;
        for &m in &opts.ms {
            let x = MlxBuffer::from_slice(gpu, &rng.f32s(m * k), &[m, k])?;
            let c = Case {
                kernel: "matvec",
                format: kind.name(),
                n,
                k,
                m,
                bytes: wbytes + 4 * (m * k + m * n) as u64,
            };
            let (x, ws) = (&x, &ws);
            let mut v: Vec<(String, Record<'_>)> = vec![(
                "default".into(),
                Box::new(move |p, i| ggml_matmul::ggml_matvec(p, x, &ws[i]).map(|_| ())),
            )];
            for &cfg in &opts.ggml_variants {
                v.push((
                    format!("{cfg}"),
                    Box::new(move |p, i| {
                        ggml_matmul::ggml_matvec_with(p, x, &ws[i], cfg).map(|_| ())
                    }),
                ));
            }
            b.matvecs(&c, copies, &same, v)?;
        }
    }
    Ok(b.report())
}

/// Median of `reps` (after one warm-up) GPU times of one pass holding what `record` adds,
/// in µs.
fn pass_median_us(
    gpu: &MlxDevice,
    reps: usize,
    mut record: impl FnMut(&mut Pass) -> Result<Vec<MlxBuffer>>,
) -> Result<f64> {
    let mut per = Vec::new();
    for rep in 0..=reps {
        let mut pass = gpu.begin().with_pass_timing(true);
        // Outputs live until the pass is done: none is handed to a later dispatch.
        let outs = record(&mut pass)?;
        let t = pass.commit_and_wait()?;
        drop(outs);
        if let (true, Some(t)) = (rep > 0, t.first()) {
            per.push(t.nanos / 1e3);
        }
    }
    per.sort_by(f64::total_cmp);
    per.get(per.len() / 2)
        .copied()
        .ok_or_else(|| MlxError::invalid("bench: no samples"))
}

/// One shape's matvecs that do not wait on each other: every dispatch reads the same x and
/// writes its own y, so there is no barrier between them and the GPU overlaps one's tail
/// with the next one's start. This is the kernel's streaming rate, the analogue of the read
/// probe's 1 GiB figure (which is also free of launch gaps). Beside it, the read probe in the
/// same arrangement over buffers of the same bytes (each dispatch its own sink). Copies
/// rotate (8, or 2 of weights over 64 Mi elements), more than the L2 cache.
struct ShapeStream {
    /// Bytes one dispatch reads (packed words, bf16 scales and biases).
    bytes: u64,
    /// Dispatches in each timed pass.
    steps: usize,
    /// The matvecs' passes, f32 x first.
    rows: Vec<StreamTime>,
    /// The read probe's pass, µs.
    probe_pass_us: f64,
}

/// One timed pass of [`ShapeStream`]'s matvecs.
struct StreamTime {
    /// x quantized once by a producer, as decode's matvecs read it (`qmv_xq`); else f32 x
    /// (`qmv`).
    xq: bool,
    /// The shape (None: the library's).
    cfg: Option<QmvConfig>,
    /// The pass, µs.
    pass_us: f64,
}

/// [`ShapeStream`] of a 4-bit g64 `n x k` weight: each of `variants` (None: the library's
/// shape) with f32 x when `f32_x`, then with quantized x. None when one weight exceeds a
/// storage binding (the probe binds it as one buffer).
fn stream_shape(
    gpu: &MlxDevice,
    (n, k): (usize, usize),
    variants: &[Option<QmvConfig>],
    f32_x: bool,
    rng: &mut Rng,
) -> Result<Option<ShapeStream>> {
    let params = QuantParams::affine(4, 64);
    if (n * k / 2 + n * k / 64 * 4) as u64 > gpu.caps().max_storage_binding {
        return Ok(None);
    }
    let copies = if n * k > 64 << 20 { 2 } else { 8 };
    let steps = if copies == 2 { 8 } else { 32 };
    let mut ws = Vec::new();
    let mut bytes = 0;
    for _ in 0..copies {
        let (w, b) = quant_weight(gpu, rng, n, k, params)?;
        ws.push(w);
        bytes = b;
    }
    let x = MlxBuffer::from_slice(gpu, &rng.f32s(k), &[1, k])?;
    let mut rows = Vec::new();
    for &cfg in variants.iter().filter(|_| f32_x) {
        let us = pass_median_us(gpu, 5, |pass| {
            (0..steps)
                .map(|i| match cfg {
                    None => qmatmul::qmv(pass, &x, &ws[i % copies]),
                    Some(c) => qmatmul::qmv_with(pass, &x, &ws[i % copies], c),
                })
                .collect()
        })?;
        rows.push(StreamTime {
            xq: false,
            cfg,
            pass_us: us,
        });
    }
    let form = qmatmul::XqForm::of(&ws[0])
        .ok_or_else(|| MlxError::invalid("bench: no quantized-x form for 4-bit g64"))?;
    let mut pass = gpu.begin();
    let xq = qmatmul::quantize_x(&mut pass, &x, form)?;
    pass.commit_and_wait()?;
    for &cfg in variants {
        let us = pass_median_us(gpu, 5, |pass| {
            (0..steps)
                .map(|i| match cfg {
                    None => qmatmul::qmv_xq(pass, &xq, &ws[i % copies], None),
                    Some(c) => qmatmul::qmv_xq_with(pass, &xq, &ws[i % copies], c),
                })
                .collect()
        })?;
        rows.push(StreamTime {
            xq: true,
            cfg,
            pass_us: us,
        });
    }
    drop(ws);
    let probes = (0..copies)
        .map(|_| SizedProbe::new(gpu, bytes))
        .collect::<Result<Vec<_>>>()?;
    let us = pass_median_us(gpu, 5, |pass| {
        (0..steps)
            .map(|i| {
                let p = &probes[i % copies];
                let sink = MlxBuffer::new(gpu, DType::U32, &[p.wgs as usize])?;
                mlx_native::ops::bandwidth::read_probe(pass, &p.src, &sink, p.wgs)?;
                Ok(sink)
            })
            .collect()
    })?;
    Ok(Some(ShapeStream {
        bytes,
        steps,
        rows,
        probe_pass_us: us,
    }))
}

/// [`stream_shape`] for each of `opts.shapes`, as rows.
fn independent_streams(
    gpu: &MlxDevice,
    opts: &StreamOptions,
    bw_gb_s: f64,
    rng: &mut Rng,
) -> Result<Vec<StreamRow>> {
    let mut rows = Vec::new();
    for &(n, k) in &opts.shapes {
        let Some(st) = stream_shape(gpu, (n, k), &with_default(&opts.variants), opts.f32_x, rng)?
        else {
            continue;
        };
        let row =
            |what: String, pass_us: f64| StreamRow::new(what, st.steps, st.bytes, pass_us, bw_gb_s);
        for t in &st.rows {
            let kernel = if t.xq { "qmv_xq" } else { "qmv" };
            let shape = shape_label(t.cfg);
            let what = format!("{kernel} 4-bit g64 {n}x{k} independent, {shape}");
            rows.push(row(what, t.pass_us));
        }
        let what = format!("read probe, {} bytes, independent", st.bytes);
        rows.push(row(what, st.probe_pass_us));
    }
    Ok(rows)
}

/// One stream measurement: dispatches timed as one compute pass (a chain of dependent ones,
/// or matvecs that do not wait on each other).
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

impl StreamRow {
    /// A row of `dispatches` dispatches that each read `bytes`, taking `pass_us` as one pass,
    /// against the read bandwidth `bw_gb_s`.
    fn new(what: String, dispatches: usize, bytes: u64, pass_us: f64, bw_gb_s: f64) -> Self {
        let per = pass_us / dispatches as f64;
        let gb_s = bytes as f64 / (per * 1e3);
        StreamRow {
            what,
            dispatches,
            bytes,
            us_per_dispatch: per,
            gb_s,
            roofline_fraction: gb_s / bw_gb_s,
        }
    }
}

/// What [`bench_qmv_stream`] measures.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// qmv shapes to time beside the default.
    pub variants: Vec<QmvConfig>,
    /// The [N, K] weights of the independent rows (Llama-3.1-8B's four by default).
    pub shapes: Vec<(usize, usize)>,
    /// The dependent chains (FFN up then down) first.
    pub chains: bool,
    /// Independent rows of f32 x too, not only of x quantized by its producer.
    pub f32_x: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            variants: Vec::new(),
            shapes: LLAMA_SHAPES.to_vec(),
            chains: true,
            f32_x: true,
        }
    }
}

/// Matvecs as decode runs them: `y = W x` feeding the next matvec's x, one compute pass, no
/// per-dispatch timestamps, 8 weight copies per shape in rotation (more than the L2 cache),
/// so each weight comes from memory. The chain alternates [N, K] and [K, N] weights (FFN up
/// then down). Reported per dispatch. Then [`independent_streams`] and the per-dispatch
/// floor.
pub fn bench_qmv_stream(gpu: &MlxDevice, opts: &StreamOptions) -> Result<Vec<StreamRow>> {
    let variants = &opts.variants;
    let bw = read_bandwidth(gpu, 1024)?;
    let mut rng = Rng(0x5EED);
    let params = QuantParams::affine(4, 64);
    let mut rows = Vec::new();
    let chains: &[(usize, usize)] = if opts.chains {
        &[(4096, 4096), (14336, 4096)]
    } else {
        &[]
    };
    for &(n, k) in chains {
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
        let steps = 64;
        for cfg in with_default(variants) {
            let us = pass_median_us(gpu, 5, |pass| {
                let mut x = x0.clone();
                for i in 0..steps {
                    let w = if i % 2 == 0 {
                        &up[(i / 2) % 8]
                    } else {
                        &down[(i / 2) % 8]
                    };
                    // Values may overflow along the chain: timing does not depend on them.
                    x = match cfg {
                        None => qmatmul::qmv(pass, &x, w)?,
                        Some(c) => qmatmul::qmv_with(pass, &x, w, c)?,
                    };
                }
                Ok(vec![x])
            })?;
            let what = format!("qmv 4-bit g64 {n}x{k} / {k}x{n}, {}", shape_label(cfg));
            rows.push(StreamRow::new(what, steps, bytes, us, bw.gb_s));
        }
    }
    rows.extend(independent_streams(gpu, opts, bw.gb_s, &mut rng)?);
    // The floor: the same chain of scales alone (one 4096-row each).
    let x0 = MlxBuffer::from_slice(gpu, &vec![1.0f32; 4096], &[1, 4096])?;
    let us = pass_median_us(gpu, 5, |pass| {
        let mut x = x0.clone();
        for _ in 0..128 {
            x = mlx_native::ops::scale(pass, &x, 0.999)?;
        }
        Ok(vec![x])
    })?;
    let what = "scale [4096] chain (the per-dispatch floor)".to_string();
    rows.push(StreamRow {
        gb_s: 0.0,
        roofline_fraction: 0.0,
        ..StreamRow::new(what, 128, 4096 * 8, us, 1.0)
    });
    Ok(rows)
}

/// The default shape (None), then `variants`.
fn with_default(variants: &[QmvConfig]) -> Vec<Option<QmvConfig>> {
    std::iter::once(None)
        .chain(variants.iter().map(|&c| Some(c)))
        .collect()
}

/// A stream row's name for a forced shape (None: the rule's).
fn shape_label(cfg: Option<QmvConfig>) -> String {
    cfg.map_or("default".into(), |c| {
        format!(
            "rpt{} tpr{} wg{} exp{} xq{}",
            c.rpt, c.tpr, c.wg, c.exp, c.xq
        )
    })
}

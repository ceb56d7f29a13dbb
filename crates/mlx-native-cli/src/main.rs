//! `mlx-native`: generate, chat, info and bench on the command line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use mlx_native::ops::sample::Sampling;
use mlx_native::{DeviceOptions, MlxDevice};
use mlx_native_lm::chat::Message;
use mlx_native_lm::generate::{load_engine, Engine, GenerateOptions, Generation, StopReason};

/// Where `scripts/fetch-default-model` puts the default model.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "mlx-native",
    version,
    about = "MLX-compatible LLM inference on any GPU (wgpu)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Model: a GGUF file or an mlx-lm folder. Default: the model
    /// scripts/fetch-default-model fetches.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalize recently generated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Sampling seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// KV cache format: f16, f32, q8, q4 (affine), tq4, tq3, tq2.5, tq2 (TurboQuant).
    #[arg(long, default_value = "f16")]
    kv_cache: String,
    /// Record every decode step instead of replaying a recorded one (the before of graph
    /// replay; the tokens are the same).
    #[arg(long)]
    no_replay: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate {
        #[command(flatten)]
        s: SamplingArgs,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Print only one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// After generating, time one more decode step kernel by kernel (GPU timestamps)
        /// and print where its time goes.
        #[arg(long)]
        profile: bool,
    },
    /// Interactive chat with the model's template (empty line or /exit quits).
    Chat {
        #[command(flatten)]
        s: SamplingArgs,
        /// A system message.
        #[arg(long)]
        system: Option<String>,
    },
    /// Describe a model (GGUF file or mlx-lm folder): format, architecture,
    /// hyper-parameters, tensor count, quant types with byte totals, tokenizer kind.
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the GPU adapter that would be used and what it can do.
    Devices,
    /// Benchmarks, on the GPU: figures as fractions of the measured read bandwidth.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Read bandwidth and the elementwise/row kernels at model sizes.
    Kernels {
        /// Bytes the bandwidth probe reads, in MiB (at least 1024 on a real GPU).
        #[arg(long, default_value_t = 1024)]
        probe_mib: u64,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// MLX quantized matvec (decode) and qmm (prefill) at Llama-3.1-8B and Qwen3-30B-A3B
    /// shapes, as GB/s and TFLOP/s against the measured roofline.
    Qmatmul {
        #[arg(long, default_value_t = 1024)]
        probe_mib: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// GGML block matvec (Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0) at 4096x4096 and 14336x4096.
    Ggml {
        #[arg(long, default_value_t = 1024)]
        probe_mib: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Single-stream decode of real model shapes with synthetic weights, against the
    /// bandwidth roofline (`all`, llama-3.1-8b, gemma-3-4b, smollm2-135m, gemma3-270m,
    /// qwen3-30b-a3b, ...).
    Decode {
        #[arg(long, default_value = "all")]
        shape: String,
        /// KV cache format: f16, q8, q4, tq4, tq3, tq2.5, tq2 (f32 too). Bytes per token
        /// count the format's stored bytes.
        #[arg(long, default_value = "f16")]
        kv_cache: String,
        /// Contexts (positions in the cache) at which decode is timed.
        #[arg(long, value_delimiter = ',', default_value = "128,4096")]
        contexts: Vec<usize>,
        /// Separate q, k, v and gate, up matvecs (no stacked projections): the before of
        /// that fusion.
        #[arg(long)]
        unfused: bool,
        /// Residual adds (and any other folds) as their own dispatches instead of folded
        /// into the decode matvecs: the before of that fusion.
        #[arg(long)]
        no_fold: bool,
        /// Write the report (updated after each shape) to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Load time of a synthetic GGUF (Q4_0) from the page cache to the GPU.
    Load {
        #[arg(long, default_value_t = 4096)]
        mib: u64,
        #[arg(long, default_value = "/tmp/mlx-native-bench.gguf")]
        path: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Flash attention: decode over a long KV cache, causal prefill (Llama-3.1-8B heads).
    Attention {
        #[arg(long, default_value_t = 1024)]
        probe_mib: u64,
        #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768")]
        decode_ctx: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "512,4096")]
        prefill: Vec<usize>,
        /// KV cache formats of the decode rows (f16, f32, q8, q4, tq4, tq3, tq2.5, tq2).
        #[arg(long, value_delimiter = ',', default_value = "f16")]
        kv_cache: Vec<String>,
        /// Decode is also timed as this many layers' attention in one pass, each layer over
        /// its own cache (Llama-3.1-8B has 32); 0 skips those rows.
        #[arg(long, default_value_t = 32)]
        layers: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Errors the user sees: one line, no backtrace.
type CliResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn open_gpu() -> CliResult<MlxDevice> {
    MlxDevice::with_options(DeviceOptions::default()).map_err(err)
}

fn load(s: &SamplingArgs, gpu: &MlxDevice, quiet: bool) -> CliResult<Engine> {
    let path = match &s.model {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from(DEFAULT_MODEL);
            if !p.exists() {
                return Err(format!(
                    "no --model given and the default model {DEFAULT_MODEL} is missing; fetch it with \
                     scripts/fetch-default-model"
                ));
            }
            p
        }
    };
    load_engine(gpu, &path, quiet).map_err(err)
}

fn options(s: &SamplingArgs) -> CliResult<GenerateOptions> {
    let seed = s.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    Ok(GenerateOptions {
        kv_format: mlx_native::kv_quant::KvFormat::parse(&s.kv_cache).map_err(err)?,
        max_tokens: s.max_tokens,
        sampling: Sampling {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
        },
        repetition_penalty: s.repeat_penalty,
        repeat_last_n: 64,
        seed,
        stop: s.stop.clone(),
        replay: !s.no_replay,
    })
}

fn summary(g: &Generation, engine: &Engine) -> String {
    let gpu_mib = engine.model.gpu.memory_peak_bytes() as f64 / (1 << 20) as f64;
    format!(
        "\n[{} prompt tokens, {:.1} tok/s prefill | {} generated, {:.1} tok/s decode | peak GPU memory {gpu_mib:.0} MiB | KV {:.2} MiB/layer | {} | stop: {:?}]",
        g.prompt_ids.len(),
        g.prefill_tok_s,
        g.generated_ids.len(),
        g.decode_tok_s,
        g.kv_bytes_per_layer as f64 / (1 << 20) as f64,
        engine.model.gpu.caps().adapter_name,
        g.stop_reason
    )
}

fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // If a handler cannot be installed, Ctrl-C simply ends the process as usual.
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::Relaxed));
    flag
}

fn generate(
    s: SamplingArgs,
    prompt: String,
    chat: bool,
    json: bool,
    profile: bool,
) -> CliResult<bool> {
    let gpu = open_gpu()?;
    let engine = load(&s, &gpu, json)?;
    let ids = engine.prompt_ids(&prompt, chat).map_err(err)?;
    let ctx = s.ctx_size.unwrap_or_else(|| engine.default_ctx());
    let stop = interrupt_flag();
    let mut out = std::io::stdout();
    let mut on_text = |t: &str| {
        if !json {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        }
    };
    let g = engine
        .generate(&ids, ctx, &options(&s)?, &mut on_text, &stop)
        .map_err(err)?;
    if json {
        let v = serde_json::json!({
            "prompt_ids": g.prompt_ids,
            "generated_ids": g.generated_ids,
            "text": g.text,
            "prefill_tok_s": g.prefill_tok_s,
            "decode_tok_s": g.decode_tok_s,
        });
        println!("{v}");
    } else {
        println!();
    }
    eprintln!("{}", summary(&g, &engine));
    if profile {
        let tokens = [g.prompt_ids.as_slice(), g.generated_ids.as_slice()].concat();
        let kernels = engine
            .profile_decode(&tokens, ctx.max(tokens.len()))
            .map_err(err)?;
        let total: f64 = kernels.iter().map(|k| k.gpu_us).sum();
        let n: usize = kernels.iter().map(|k| k.count).sum();
        eprintln!(
            "profile: one decode step at position {}: {n} dispatches, {total:.0} us of GPU time",
            tokens.len() - 1
        );
        for k in &kernels {
            eprintln!(
                "  {:>9.1} us {:>5.1}%  x{:<4} {}",
                k.gpu_us,
                100.0 * k.gpu_us / total.max(1e-9),
                k.count,
                k.label
            );
        }
    }
    Ok(g.stop_reason != StopReason::Interrupted)
}

fn chat(s: SamplingArgs, system: Option<String>) -> CliResult<bool> {
    let gpu = open_gpu()?;
    let engine = load(&s, &gpu, false)?;
    let ctx = s.ctx_size.unwrap_or_else(|| engine.default_ctx());
    let opts = options(&s)?;
    let stop = interrupt_flag();
    let mut history: Vec<Message> = system.iter().map(|t| Message::new("system", t)).collect();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(err)? == 0 {
            return Ok(true);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() || line == "/exit" {
            return Ok(true);
        }
        history.push(Message::new("user", line));
        let text = engine.chat_text(&history).map_err(err)?;
        let ids = engine.tokenizer.encode(&text, false).map_err(err)?;
        stop.store(false, Ordering::Relaxed);
        let mut out = std::io::stdout();
        let mut on_text = |t: &str| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        };
        let g = engine
            .generate(&ids, ctx, &opts, &mut on_text, &stop)
            .map_err(err)?;
        println!();
        eprintln!("{}", summary(&g, &engine));
        history.push(Message::new("assistant", &g.text));
    }
}

fn info(path: PathBuf, json: bool) -> CliResult<bool> {
    let v = mlx_native_lm::info::describe(&path).map_err(err)?;
    let text = if json {
        serde_json::to_string(&v)
    } else {
        serde_json::to_string_pretty(&v)
    };
    println!("{}", text.map_err(err)?);
    Ok(true)
}

fn run(cli: Cli) -> CliResult<bool> {
    match cli.command {
        Command::Generate {
            s,
            prompt,
            chat,
            json,
            profile,
        } => generate(s, prompt, chat, json, profile),
        Command::Chat { s, system } => chat(s, system),
        Command::Info { path, json } => info(path, json),
        Command::Devices => {
            println!("{:#?}", open_gpu()?.caps());
            Ok(true)
        }
        Command::Bench { what } => match what {
            BenchWhat::Kernels { probe_mib, json } => {
                let gpu = open_gpu()?;
                let report = mlx_native_lm::bench::bench_kernels(&gpu, probe_mib).map_err(err)?;
                print!("{}", report.table());
                write_json(json, &report)
            }
            BenchWhat::Qmatmul {
                probe_mib,
                ref json,
            }
            | BenchWhat::Ggml {
                probe_mib,
                ref json,
            } => {
                let gpu = open_gpu()?;
                let opts = mlx_native_lm::bench_matmul::MatmulBenchOptions {
                    probe_mib,
                    ..Default::default()
                };
                let r = if matches!(what, BenchWhat::Qmatmul { .. }) {
                    mlx_native_lm::bench_matmul::bench_qmatmul(&gpu, &opts)
                } else {
                    mlx_native_lm::bench_matmul::bench_ggml(&gpu, &opts)
                }
                .map_err(err)?;
                print!("{}", r.table());
                write_json(json.clone(), &r)
            }
            BenchWhat::Decode {
                shape,
                kv_cache,
                mut contexts,
                unfused,
                no_fold,
                json,
            } => {
                let shapes = mlx_native_lm::bench_decode::expand_shapes(&shape).map_err(err)?;
                let kv_format = mlx_native::kv_quant::KvFormat::parse(&kv_cache).map_err(err)?;
                contexts.sort_unstable();
                contexts.dedup();
                let opts = mlx_native_lm::bench_decode::DecodeOptions {
                    kv_format,
                    contexts,
                    fused: !unfused,
                    fold: if no_fold {
                        mlx_native_lm::layers::decoder::Folding::NONE
                    } else {
                        mlx_native_lm::layers::decoder::Folding::DEFAULT
                    },
                    ..Default::default()
                };
                let gpu = open_gpu()?;
                let mut save = |partial: &mlx_native_lm::bench_decode::DecodeReport| {
                    let _ = write_json(json.clone(), partial);
                };
                let r = mlx_native_lm::bench_decode::bench_decode(&gpu, &shapes, &opts, &mut save)
                    .map_err(err)?;
                print!("{}", r.table());
                write_json(json, &r)
            }
            BenchWhat::Load { mib, path, json } => {
                let gpu = open_gpu()?;
                let r = mlx_native_lm::bench::bench_load(&gpu, &path, mib).map_err(err)?;
                println!(
                    "{}: {} tensors, {:.2} GB in {:.2} s: {:.2} GB/s (page cache -> GPU)",
                    r.adapter,
                    r.tensors,
                    r.file_bytes as f64 / 1e9,
                    r.secs,
                    r.gb_s
                );
                write_json(json, &r)
            }
            BenchWhat::Attention {
                probe_mib,
                decode_ctx,
                prefill,
                kv_cache,
                layers,
                json,
            } => {
                let formats = kv_cache
                    .iter()
                    .map(|s| mlx_native::kv_quant::KvFormat::parse(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?;
                let gpu = open_gpu()?;
                let r = mlx_native_lm::bench::bench_attention(
                    &gpu,
                    probe_mib,
                    &decode_ctx,
                    &prefill,
                    &formats,
                    layers,
                )
                .map_err(err)?;
                print!("{}", r.table());
                write_json(json, &r)
            }
        },
    }
}

fn write_json(path: Option<PathBuf>, report: &impl serde::Serialize) -> CliResult<bool> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(report).map_err(err)?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(true)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        // Interrupted: the summary was printed; 130 as shells report SIGINT.
        Ok(false) => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

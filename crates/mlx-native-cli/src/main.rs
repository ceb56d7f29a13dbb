//! `mlx-native`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mlx_native::{DeviceOptions, MlxDevice};

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

#[derive(Subcommand)]
enum Command {
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
}

fn run(cli: Cli) -> Result<(), String> {
    let gpu = MlxDevice::with_options(DeviceOptions::default()).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Devices => {
            println!("{:#?}", gpu.caps());
            Ok(())
        }
        Command::Bench { what } => match what {
            BenchWhat::Kernels { probe_mib, json } => {
                let report = mlx_native_lm::bench::bench_kernels(&gpu, probe_mib)
                    .map_err(|e| e.to_string())?;
                print!("{}", report.table());
                if let Some(path) = json {
                    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
                    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
                }
                Ok(())
            }
        },
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

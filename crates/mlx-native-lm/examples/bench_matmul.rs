//! Decode-matvec sweep for the GPU machine:
//! `bench_matmul [qmatmul|ggml|all|stream]` (stream: dependent qmv chains timed as one pass, then
//! matvecs that do not wait on each other, f32 and pre-quantized x, beside the read probe), variants from `QMV_VARIANTS="rpt,tpr,wg[,exp | xq << 4];..."` and
//! `GGML_VARIANTS="wg,rpw,gpl;..."`, M values from `BENCH_M="1,2,4,8"`. Quick runs:
//! `BENCH_MAX_ELEMS`, `BENCH_REPS`, `BENCH_ROTATE_MIB`, `BENCH_MM_M` (prefill rows of x, 512),
//! `BENCH_QMM=0` / `BENCH_MOE=0` / `BENCH_STREAM=0` (skip the prefill matmuls / the routed
//! expert matvec / qmatmul's streaming rows),
//! `QMM_EXP="1,2"` (qmm's cooperative kernel again with those measurement switches); stream
//! only: `STREAM_SHAPES="4096x4096,..."` (independent rows' [N, K]), `STREAM_CHAINS=0`,
//! `STREAM_F32=0` (only x quantized by its producer).
//! Prints the tables and writes JSON to `$OUT/bench_<what>.json` when OUT is set.
use mlx_native::ops::ggml_matmul::GgmlMatvecConfig;
use mlx_native::ops::qmatmul::QmvConfig;
use mlx_native::MlxDevice;
use mlx_native_lm::bench_matmul::{bench_ggml, bench_qmatmul, MatmulBenchOptions, StreamOptions};

/// `a,b,c[,d]` groups separated by `;` (a missing fourth value is 0).
fn triples(var: &str) -> Vec<[u32; 4]> {
    std::env::var(var)
        .unwrap_or_default()
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let v: Vec<u32> = s.split(',').map(|t| t.trim().parse().unwrap()).collect();
            [v[0], v[1], v[2], v.get(3).copied().unwrap_or(0)]
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let what = std::env::args().nth(1).unwrap_or("all".into());
    let gpu = MlxDevice::new()?;
    let mut opts = MatmulBenchOptions::default();
    if let Ok(m) = std::env::var("BENCH_M") {
        opts.ms = m.split(',').map(|t| t.trim().parse().unwrap()).collect();
    }
    if let Ok(r) = std::env::var("BENCH_ROTATE_MIB") {
        opts.rotate_mib = r.parse()?;
    }
    if let Ok(r) = std::env::var("BENCH_MAX_ELEMS") {
        opts.max_elems = r.parse()?;
    }
    if let Ok(r) = std::env::var("BENCH_REPS") {
        opts.reps = r.parse()?;
    }
    if let Ok(r) = std::env::var("BENCH_MM_M") {
        opts.mm_m = r.parse()?;
    }
    if let Ok(r) = std::env::var("BENCH_QMM") {
        opts.qmm = r != "0";
    }
    if let Ok(r) = std::env::var("BENCH_MOE") {
        opts.moe = r != "0";
    }
    if let Ok(r) = std::env::var("BENCH_STREAM") {
        opts.stream = r != "0";
    }
    opts.qmv_variants = triples("QMV_VARIANTS")
        .into_iter()
        .map(|[rpt, tpr, wg, exp]| QmvConfig {
            rpt,
            tpr,
            wg,
            exp: exp & 15,
            xq: exp >> 4,
        })
        .collect();
    opts.ggml_variants = triples("GGML_VARIANTS")
        .into_iter()
        .map(|[wg, rpw, gpl, _]| GgmlMatvecConfig { wg, rpw, gpl })
        .collect();
    if let Ok(v) = std::env::var("QMM_EXP") {
        opts.qmm_exps = v.split(',').map(|t| t.trim().parse().unwrap()).collect();
    }
    let out = std::env::var("OUT").ok();
    if what == "stream" {
        let mut so = StreamOptions {
            variants: opts.qmv_variants.clone(),
            ..StreamOptions::default()
        };
        if let Ok(v) = std::env::var("STREAM_SHAPES") {
            so.shapes = v
                .split(',')
                .map(|t| {
                    let (n, k) = t.trim().split_once('x').unwrap();
                    (n.parse().unwrap(), k.parse().unwrap())
                })
                .collect();
        }
        so.chains = std::env::var("STREAM_CHAINS").map_or(true, |v| v != "0");
        so.f32_x = std::env::var("STREAM_F32").map_or(true, |v| v != "0");
        let rows = mlx_native_lm::bench_matmul::bench_qmv_stream(&gpu, &so)?;
        for r in &rows {
            println!(
                "{:<64} {:>4} {:>9.2} us {:>7.0} GB/s {:>5.1}%",
                r.what,
                r.dispatches,
                r.us_per_dispatch,
                r.gb_s,
                100.0 * r.roofline_fraction
            );
        }
        if let Some(o) = &out {
            std::fs::write(
                format!("{o}/bench_qmv_stream.json"),
                serde_json::to_string_pretty(&rows)?,
            )?;
        }
        return Ok(());
    }
    for (name, run) in [
        (
            "qmatmul",
            bench_qmatmul as fn(&MlxDevice, &MatmulBenchOptions) -> _,
        ),
        ("ggml", bench_ggml),
    ] {
        if what != "all" && what != name {
            continue;
        }
        let t0 = std::time::Instant::now();
        let r = run(&gpu, &opts)?;
        println!(
            "== bench {name} ({:.1} s)\n{}",
            t0.elapsed().as_secs_f64(),
            r.table()
        );
        if let Some(o) = &out {
            std::fs::write(
                format!("{o}/bench_{name}.json"),
                serde_json::to_string_pretty(&r)?,
            )?;
        }
    }
    Ok(())
}

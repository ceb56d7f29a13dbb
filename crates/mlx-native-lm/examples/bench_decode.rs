//! `bench decode` without the CLI: `bench_decode [SHAPE[,SHAPE..]|all] [--json FILE]
//! [--probe-mib N] [--steps N] [--contexts A,B] [--kv-cache f16|q8|q4|tq4|tq3|tq2.5|tq2]
//! [--unfused] [--no-fold]`.
//! Shapes: see `mlx_native_lm::bench_decode::SHAPES`.

use mlx_native::MlxDevice;
use mlx_native_lm::bench_decode::{bench_decode, expand_shapes, DecodeOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut shapes: Vec<&str> = Vec::new();
    let mut json = None;
    let mut opts = DecodeOptions::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = args.next(),
            "--probe-mib" => opts.probe_mib = args.next().ok_or("--probe-mib N")?.parse()?,
            "--steps" => opts.steps = args.next().ok_or("--steps N")?.parse()?,
            "--kv-cache" => {
                opts.kv_format = mlx_native::kv_quant::KvFormat::parse(
                    &args
                        .next()
                        .ok_or("--kv-cache f16|q8|q4|tq4|tq3|tq2.5|tq2")?,
                )?
            }
            "--contexts" => {
                opts.contexts = args
                    .next()
                    .ok_or("--contexts A,B")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--build-only" => {
                for name in shapes.iter().copied() {
                    let t = std::time::Instant::now();
                    let spec = mlx_native_lm::bench_decode::shape(name)?;
                    let m = mlx_native_lm::bench_decode::build(&MlxDevice::new()?, &spec, 1)?;
                    let wb = mlx_native_lm::bench_decode::weight_bytes(&m);
                    eprintln!("{name}: built {} bytes in {:?}", wb.resident, t.elapsed());
                }
                return Ok(());
            }
            "--model-prefill" => {
                opts.model_prefill_max = args.next().ok_or("--model-prefill N")?.parse()?
            }
            "--unfused" => opts.fused = false,
            "--no-fold" => opts.fold = mlx_native_lm::layers::decoder::Folding::NONE,
            "--prefill" => opts.prefill_tokens = args.next().ok_or("--prefill N")?.parse()?,
            s => {
                for p in s.split(',') {
                    shapes.extend(expand_shapes(p)?);
                }
            }
        }
    }
    if shapes.is_empty() {
        shapes = expand_shapes("all")?;
    }
    // Tuning: QMV_OVERRIDE="rpt,tpr,wg,exp" forces one qmv dispatch shape everywhere (exp
    // bits 4-5: the x quantization, `QmvConfig::xq`).
    if let Ok(e) = std::env::var("QMV_OVERRIDE") {
        let v: Vec<u32> = e.split(',').map(str::parse).collect::<Result<_, _>>()?;
        let [rpt, tpr, wg, exp] = v[..] else {
            return Err("QMV_OVERRIDE=rpt,tpr,wg,exp".into());
        };
        mlx_native::ops::qmatmul::set_qmv_override(Some(mlx_native::ops::qmatmul::QmvConfig {
            rpt,
            tpr,
            wg,
            exp: exp & 15,
            xq: exp >> 4,
        }))?;
    }
    let gpu = MlxDevice::new()?;
    let mut save = |r: &mlx_native_lm::bench_decode::DecodeReport| {
        if let Some(path) = &json {
            if let Ok(text) = serde_json::to_string_pretty(r) {
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("{path}: {e}");
                }
            }
        }
    };
    let report = bench_decode(&gpu, &shapes, &opts, &mut save)?;
    print!("{}", report.table());
    Ok(())
}

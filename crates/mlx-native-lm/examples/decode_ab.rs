//! A/B timing of decode variants on one synthetic model in one process:
//! `decode_ab SHAPE [ROUNDS]`. Builds the shape (`bench_decode::shape`), prefills 128
//! positions, then times one decode step as one compute pass (GPU timestamps) for each
//! variant in turn, round after round, and prints each variant's minimum and median.
//! Interleaving matters: a GPU that idles between runs clocks down, so variants measured in
//! separate processes or one after another are not comparable.
//! Variants: the separate dispatches (no folding), the default folding (`Folding`), and
//! qmv's x quantization (`QmvConfig::xq`) forced to each setting.

use mlx_native::ops;
use mlx_native::MlxDevice;
use mlx_native_lm::bench_decode::{build, shape};
use mlx_native_lm::layers::decoder::Folding;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "llama-3.1-8b-mlx4".into());
    let rounds: usize = args.next().map_or(Ok(8), |s| s.parse())?;
    let gpu = MlxDevice::new()?;
    let spec = shape(&name)?;
    let mut m = build(&gpu, &spec, 7)?;
    let ctx = 128;
    let none = Folding::NONE;
    let default = Folding::DEFAULT;
    // (label, folding, qmv's x quantization: None = the default rule; the routed matvec's
    // rows per row-block: None = the plan's)
    let variants: [(&str, Folding, Option<u32>, Option<u32>); 7] = [
        ("separate", none, None, None),
        ("default", default, None, None),
        ("default, int8 x", default, Some(1), None),
        ("default, gqmv rpt 2 (before)", default, None, Some(2)),
        (
            "default +norms",
            Folding {
                norms: true,
                ..default
            },
            None,
            None,
        ),
        (
            "default -small norms",
            Folding {
                small_norms: false,
                ..default
            },
            None,
            None,
        ),
        (
            "default +glu",
            Folding {
                glu: true,
                ..default
            },
            None,
            None,
        ),
    ];
    let steps_per_round = 4;
    let mut cache = m.new_cache(ctx + rounds * variants.len() * steps_per_round + 8)?;
    let ids: Vec<u32> = (0..ctx as u32)
        .map(|i| (i * 7 + 3) % m.cfg.vocab as u32)
        .collect();
    let mut pass = gpu.begin();
    m.forward(&mut pass, &ids, 0, &mut cache)?;
    pass.commit_and_wait()?;
    let mut pos = ctx;
    let mut times = vec![Vec::new(); variants.len()];
    let mut dispatches = vec![0; variants.len()];
    for round in 0..rounds {
        for (vi, &(_, fold, xq, gqmv_rpt)) in variants.iter().enumerate() {
            for l in &mut m.layers {
                l.fold = fold;
            }
            ops::qmatmul::set_qmv_xq(xq)?;
            ops::moe::set_gqmv_rpt(gqmv_rpt)?;
            for _ in 0..steps_per_round {
                let mut pass = gpu.begin().with_pass_timing(true);
                let logits = m.forward(&mut pass, &[5], pos, &mut cache)?;
                ops::argmax(&mut pass, &logits)?;
                dispatches[vi] = pass.len();
                pos += 1;
                let t = pass.commit_and_wait()?;
                // Round 0 compiles the pipelines and warms up.
                if round > 0 {
                    times[vi].push(t.iter().map(|k| k.nanos).sum::<f64>() / 1e3);
                }
            }
        }
    }
    println!(
        "{} ({}), {name}, context {ctx}+",
        gpu.caps().adapter_name,
        gpu.caps().backend
    );
    for (vi, (vname, ..)) in variants.iter().enumerate() {
        let mut v = times[vi].clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            continue;
        }
        println!(
            "{vname:>24}: {:8.1} us min, {:8.1} us median per token, {} dispatches",
            v[0],
            v[v.len() / 2],
            dispatches[vi]
        );
    }
    Ok(())
}

//! A/B timing of decode variants on one synthetic model in one process:
//! `decode_ab SHAPE [ROUNDS] [CONTEXT]`. Builds the shape (`bench_decode::shape`), prefills
//! CONTEXT positions (128), then times one decode step as one compute pass (GPU timestamps)
//! for each variant in turn, round after round, and prints each variant's minimum and median.
//! Interleaving matters: a GPU that idles between runs clocks down, so variants measured in
//! separate processes or one after another are not comparable.
//! Variants: the separate dispatches (no folding), the default folding (`Folding`), the
//! default with the decode attention forced to split-K (the before of the one-split path),
//! and that with its split kernel dispatched twice (what the kernel costs inside the pass).
//! With `AB_XQ=1`: the default against its matvecs quantizing x themselves (the before of
//! `Folding::quantized_x`), each also without the norm folds. Other lists (comments below):
//! `AB_BOUND`, `AB_NORM_OUT`, `AB_OXQ`, `AB_XSRC` (matvec shapes), `AB_SKIP` (each kind of
//! dispatch dropped), `AB_MOE` (the experts' gate and up in one dispatch or two),
//! `AB_COMBINE` (an MoE layer's down and weighted sum in one dispatch or two, its FFN norm
//! split across o, its GLU in gate|up), `AB_GT` (the attention's query heads a workgroup). Each step
//! advances the position: after ~100 steps the context passes
//! the one-split attention's reach (224 keys) and the attention runs split-K (one more
//! dispatch a layer than `bench decode` counts at context 128).

use mlx_native::ops;
use mlx_native::MlxDevice;
use mlx_native_lm::bench_decode::{build, shape};
use mlx_native_lm::layers::decoder::Folding;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "llama-3.1-8b-mlx4".into());
    let rounds: usize = args.next().map_or(Ok(8), |s| s.parse())?;
    let ctx: usize = args.next().map_or(Ok(128), |s| s.parse())?;
    let gpu = MlxDevice::new()?;
    let spec = shape(&name)?;
    let mut m = build(&gpu, &spec, 7)?;
    let none = Folding::NONE;
    let default = Folding::DEFAULT;
    // (label, folding, extra dispatches of the decode attention's split and reduce
    // kernels: a pass with one more of a kernel costs that kernel inside the pass; the
    // attention's query heads per workgroup forced, 0 = the rule; the one-split decode's
    // max keys forced, None = the rule, 0 = split-K)
    type Variant = (Folding, (u16, u16), u32, Option<u32>);
    let mut variants: Vec<(String, Variant)> = vec![
        ("separate".into(), (none, (0, 0), 0, None)),
        ("default".into(), (default, (0, 0), 0, None)),
        (
            "default, split-K (before)".into(),
            (default, (0, 0), 0, Some(0)),
        ),
        (
            "default, split-K, split x2".into(),
            (default, (1, 0), 0, Some(0)),
        ),
        ("default, attention x2".into(), (default, (1, 0), 0, None)),
    ];
    // AB_XQ=1: instead, the default against its matvecs quantizing x themselves (the
    // before of `Folding::quantized_x`), each also without the norm folds.
    if std::env::var("AB_XQ").is_ok() {
        let in_matvec = Folding {
            quantized_x: false,
            ..default
        };
        let no_norms = |f: Folding| Folding {
            small_norms: false,
            ..f
        };
        variants = vec![
            (
                "x quantized by each matvec".into(),
                (in_matvec, (0, 0), 0, None),
            ),
            ("default".into(), (default, (0, 0), 0, None)),
            (
                "no norm folds, x by matvec".into(),
                (no_norms(in_matvec), (0, 0), 0, None),
            ),
            ("no norm folds".into(), (no_norms(default), (0, 0), 0, None)),
        ];
    }
    // AB_BOUND=1: the default against it with later pre-norms and GLUs not dispatched
    // (`decoder::set_bound_skip`; timing only): the bound of folding them away.
    // AB_BOUND=2: o reading the attention output as chunks (bit 4), no RoPE + append (8).
    let bound = std::env::var("AB_BOUND").is_ok();
    let bound_bits: Vec<u32> = if std::env::var("AB_BOUND").as_deref() == Ok("2") {
        vec![0, 4, 8, 12]
    } else {
        vec![0, 1, 2, 3]
    };
    if bound {
        let labels = if bound_bits[1] == 4 {
            ["default", "o of chunks", "no rope_append", "both"]
        } else {
            ["default", "no later norms", "no later GLUs", "neither"]
        };
        variants = labels
            .iter()
            .map(|l| (l.to_string(), (default, (0, 0), 0, None)))
            .collect();
    }
    // AB_NORM_OUT=1: the default against it without `Folding::norm_out` (the pre-norms as
    // their own dispatches) and without `glu_out` (the GLU as its own).
    if std::env::var("AB_NORM_OUT").is_ok() {
        let with = |norm_out, glu_out| Folding {
            norm_out,
            glu_out,
            ..default
        };
        variants = vec![
            (
                "norms and GLU dispatched".into(),
                (with(false, false), (0, 0), 0, None),
            ),
            ("norm_out".into(), (with(true, false), (0, 0), 0, None)),
            ("glu_out".into(), (with(false, true), (0, 0), 0, None)),
            ("both (default)".into(), (default, (0, 0), 0, None)),
        ];
    }
    // AB_OXQ=1: the default against the attention output in f32 (`Folding::o_xq` off).
    if std::env::var("AB_OXQ").is_ok() {
        let before = Folding {
            o_xq: false,
            ..default
        };
        variants = vec![
            ("o quantizes its x".into(), (before, (0, 0), 0, None)),
            ("default (o_xq)".into(), (default, (0, 0), 0, None)),
        ];
    }
    // AB_NORM_OUT=2: what norm_out's parts cost; 3: the GLU-writing gate|up in other shapes
    // (`qmatmul::set_norm_out_probe`, timing only). (label, folding, probe bits)
    let probed: Vec<(String, Folding, u32)> = match std::env::var("AB_NORM_OUT").as_deref() {
        Ok("2") => {
            let before = Folding {
                norm_out: false,
                glu_out: false,
                ..default
            };
            let norm_out = Folding {
                glu_out: false,
                ..default
            };
            let mut p = vec![
                (String::from("norms dispatched"), before, 0u32),
                ("norm_out".into(), norm_out, 0),
                ("norm_out, no chunk stores".into(), norm_out, 1 << 16),
            ];
            for (rpt, tpr) in [(4u32, 64u32), (2, 64)] {
                let label = format!("norm_out rpt {rpt} tpr {tpr}");
                p.push((label, norm_out, rpt | tpr << 8));
            }
            p
        }
        Ok("3") => {
            let off = Folding {
                glu_out: false,
                ..default
            };
            let mut p = vec![
                (String::from("GLU dispatched"), off, 0u32),
                ("glu_out".into(), default, 0),
            ];
            for (rpt, tpr) in [(16u32, 32u32), (4, 32), (2, 32), (2, 64), (4, 64)] {
                let label = format!("glu_out rpt {rpt} tpr {tpr}");
                p.push((label, default, 1 << 18 | rpt | tpr << 8));
            }
            p
        }
        _ => Vec::new(),
    };
    if !probed.is_empty() {
        variants = (probed.iter())
            .map(|(l, f, _)| (l.clone(), (*f, (0, 0), 0, None)))
            .collect();
    }
    let mut probes: Vec<u32> = probed.iter().map(|&(_, _, b)| b).collect();
    // AB_XSRC=1: the matvecs of quantized x in other shapes (`set_xsrc_probe`: q|k|v and the
    // like, then the LM head) and the norm-writing o and down (`set_norm_out_probe`).
    // (label, other matvecs' shape, the head's, norm_out's) as rpt | tpr << 8 | wg << 16.
    let shape = |rpt: u32, tpr: u32, wg: u32| rpt | tpr << 8 | wg << 16;
    // AB_XSRC=2: the other matvecs of quantized x (Qwen3-30B-A3B's q|k|v and o) in fewer
    // rows a row-set.
    let mut xsrc: Vec<(String, u32, u32, u32)> = if std::env::var("AB_XSRC").as_deref() == Ok("4") {
        // AB_XSRC=4: the LM head's row-sets of 16.
        vec![
            ("default".into(), 0, 0, 0),
            ("head 4x16".into(), 0, shape(4, 16, 128), 0),
            ("head 8x16".into(), 0, shape(8, 16, 128), 0),
            ("default again".into(), 0, 0, 0),
            ("head 4x16 again".into(), 0, shape(4, 16, 128), 0),
            ("head 8x16 again".into(), 0, shape(8, 16, 128), 0),
        ]
    } else if std::env::var("AB_XSRC").as_deref() == Ok("3") {
        // AB_XSRC=3: row-sets of 16 invocations (half a 32-wide subgroup).
        vec![
            ("default".into(), 0, 0, 0),
            ("others 8x16".into(), shape(8, 16, 128), 0, 0),
            ("others 4x16".into(), shape(4, 16, 128), 0, 0),
            ("head 8x16".into(), 0, shape(8, 16, 128), 0),
            ("head 4x16".into(), 0, shape(4, 16, 128), 0),
            ("norm_out 1x16".into(), 0, 0, 1 | 16 << 8),
            ("norm_out 2x16".into(), 0, 0, 2 | 16 << 8),
            ("norm_out 4x16".into(), 0, 0, 4 | 16 << 8),
            (
                "all x16 (8, 8, 2)".into(),
                shape(8, 16, 128),
                shape(8, 16, 128),
                2 | 16 << 8,
            ),
            ("default again".into(), 0, 0, 0),
        ]
    } else if std::env::var("AB_XSRC").as_deref() == Ok("2") {
        let mut v = vec![("default".into(), 0, 0, 0)];
        for (rpt, tpr) in [
            (4u32, 128u32),
            (2, 128),
            (2, 64),
            (1, 128),
            (4, 64),
            (8, 32),
        ] {
            v.push((format!("others {rpt}x{tpr}"), shape(rpt, tpr, 128), 0, 0));
        }
        v.push(("default again".into(), 0, 0, 0));
        v
    } else if std::env::var("AB_XSRC").is_ok() {
        vec![
            ("default".into(), 0, 0, 0),
            ("head 16x32 (before)".into(), 0, shape(16, 32, 128), 0),
            ("head 4x32".into(), 0, shape(4, 32, 128), 0),
            ("head 8x64".into(), 0, shape(8, 64, 128), 0),
            ("qkv 4x128".into(), shape(4, 128, 128), 0, 0),
            ("qkv 4x64".into(), shape(4, 64, 128), 0, 0),
            ("norm_out 4x128 (before)".into(), 0, 0, 4 | 128 << 8),
            ("norm_out 1x32".into(), 0, 0, 1 | 32 << 8),
            ("norm_out 2x32".into(), 0, 0, 2 | 32 << 8),
            ("default again".into(), 0, 0, 0),
        ]
    } else {
        Vec::new()
    };
    if !xsrc.is_empty() {
        variants = (xsrc.iter())
            .map(|(l, ..)| (l.clone(), (default, (0, 0), 0, None)))
            .collect();
        probes = xsrc.iter().map(|&(.., n)| n).collect();
    }
    // AB_SKIP=1: the default against it without each kind of dispatch (by kernel label,
    // `mlx_native::set_skip_dispatches`; timing only): what each costs inside the pass.
    let mut skips: Vec<Option<String>> = Vec::new();
    if std::env::var("AB_SKIP").is_ok() {
        // Its own list: no other list's probes apply to its variants.
        probes.clear();
        xsrc.clear();
        let mut cache = m.new_cache(ctx + 8)?;
        let mut pass = gpu.begin();
        m.forward(&mut pass, &[5], 0, &mut cache)?;
        let mut labels: Vec<(String, usize)> = Vec::new();
        for l in pass.labels() {
            match labels.iter_mut().find(|(s, _)| **s == *l) {
                Some(e) => e.1 += 1,
                None => labels.push((l.to_string(), 1)),
            }
        }
        drop(pass);
        labels.retain(|(_, n)| *n > 1);
        skips.push(None);
        variants = vec![("default".into(), (default, (0, 0), 0, None))];
        for (l, n) in labels {
            variants.push((format!("without {l} (x{n})"), (default, (0, 0), 0, None)));
            skips.push(Some(l));
        }
    }
    // AB_MOE=1: MoE experts' gate and up routed in one dispatch (the stacked weight, the
    // default) against two (`MoeExperts::gate_up` taken out: gate and up stay its views).
    let mut gu_off: Vec<bool> = Vec::new();
    if std::env::var("AB_MOE").is_ok() {
        probes.clear();
        xsrc.clear();
        skips.clear();
        variants = vec![
            (
                "gate, up in two dispatches".into(),
                (default, (0, 0), 0, None),
            ),
            (
                "stacked gate|up (default)".into(),
                (default, (0, 0), 0, None),
            ),
        ];
        gu_off = vec![true, false];
    }
    // AB_COMBINE=1: an MoE layer's down experts and weighted sum in one dispatch
    // (`Folding::moe_combine`) against the two, and with the FFN norm split across o
    // (`Folding::moe_norm_out`), and the GLU in the stacked gate|up (`moe_glu_out`; the
    // default).
    if std::env::var("AB_COMBINE").is_ok() {
        probes.clear();
        xsrc.clear();
        skips.clear();
        gu_off.clear();
        let apart = Folding {
            moe_combine: false,
            moe_norm_out: false,
            moe_glu_out: false,
            ..default
        };
        let combined = Folding {
            moe_norm_out: false,
            moe_glu_out: false,
            ..default
        };
        let norm_in_o = Folding {
            moe_glu_out: false,
            ..default
        };
        variants = vec![
            ("down, combine apart".into(), (apart, (0, 0), 0, None)),
            ("down+combine".into(), (combined, (0, 0), 0, None)),
            (
                "down+combine, norm in o".into(),
                (norm_in_o, (0, 0), 0, None),
            ),
            (
                "+ GLU in gate|up (default)".into(),
                (default, (0, 0), 0, None),
            ),
        ];
    }
    // AB_GT=1: the decode attention's query heads a workgroup forced to 1, 2, 4 and 8 (the
    // one-split kernel at short contexts takes the rule's, one).
    if std::env::var("AB_GT").is_ok() {
        probes.clear();
        xsrc.clear();
        skips.clear();
        gu_off.clear();
        variants = [1u32, 2, 4, 8]
            .into_iter()
            .map(|gt| {
                (
                    format!("{gt} heads a workgroup"),
                    (default, (0, 0), gt, None),
                )
            })
            .collect();
        variants.insert(0, ("the rule".into(), (default, (0, 0), 0, None)));
    }
    let mut stacked: Vec<Option<mlx_native::weights::expert_weight::QuantExperts>> =
        m.layers.iter().map(|_| None).collect();
    let steps_per_round = 4;
    let mut cache = m.new_cache(ctx + rounds * variants.len() * steps_per_round + 8)?;
    let ids: Vec<u32> = (0..ctx as u32)
        .map(|i| (i * 7 + 3) % m.cfg.vocab as u32)
        .collect();
    // Prefill in chunks of at most 512 tokens (the forward's step limit).
    for (i, chunk) in ids.chunks(512).enumerate() {
        let mut pass = gpu.begin();
        m.forward(&mut pass, chunk, i * 512, &mut cache)?;
        pass.commit_and_wait()?;
    }
    let mut pos = ctx;
    let mut times = vec![Vec::new(); variants.len()];
    let mut dispatches = vec![0; variants.len()];
    for round in 0..rounds {
        for (vi, (_, (fold, (split, reduce), gt, single))) in variants.iter().enumerate() {
            let (fold, split, reduce, gt, single) = (*fold, *split, *reduce, *gt, *single);
            for (l, saved) in m.layers.iter_mut().zip(&mut stacked) {
                l.fold = fold;
                if let mlx_native_lm::layers::mlp::Ffn::Moe(f) = &mut l.mlp {
                    match gu_off.get(vi) {
                        Some(true) => {
                            if let Some(w) = f.experts.gate_up.take() {
                                *saved = Some(w);
                            }
                        }
                        _ => {
                            if let Some(w) = saved.take() {
                                f.experts.gate_up = Some(w);
                            }
                        }
                    }
                }
            }
            ops::sdpa::set_decode_repeat(split, reduce);
            ops::sdpa::set_decode_gt((gt > 0).then_some(gt));
            ops::sdpa::set_decode_single(single);
            if bound {
                mlx_native_lm::layers::decoder::set_bound_skip(bound_bits[vi]);
            }
            if let Some(&p) = probes.get(vi) {
                ops::qmatmul::set_norm_out_probe(p);
            }
            if let Some(skip) = skips.get(vi) {
                mlx_native::set_skip_dispatches(skip.as_deref());
            }
            if let Some(&(_, other, head, _)) = xsrc.get(vi) {
                ops::qmatmul::set_xsrc_probe(false, other);
                ops::qmatmul::set_xsrc_probe(true, head);
            }
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
            "{vname:>30}: {:8.1} us min, {:8.1} us median per token, {} dispatches",
            v[0],
            v[v.len() / 2],
            dispatches[vi]
        );
    }
    Ok(())
}

//! Sampling on the GPU: repetition penalty on the logits, then top-k / top-p / min-p /
//! temperature sampling from `top_k`'s sorted candidates. Only one token id comes back.
//!
//! Order (llama.cpp's default chain): repetition penalty, top-k, top-p, min-p, temperature.
//! top-p and min-p are judged on probabilities at temperature 1; the draw is at the given
//! temperature over the survivors. With top-k off, candidates are the `TOP_K_MAX` most
//! likely tokens: the mass beyond them is ignored (for real vocabularies it is below what a
//! top-p or min-p cut keeps anyway; pure-temperature sampling of a flat distribution over more
//! than 1024 tokens is approximated).

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};
use crate::ops::select::{argmax, top_k, TOP_K_MAX};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SampleParams {
    n: u32,
    penalty: f32,
    temperature: f32,
    top_p: f32,
    min_p: f32,
    uniform: f32,
    _pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<SampleParams>() == 32);

const WG: u32 = 64;

pub(crate) fn specs() -> Vec<(Kernel, Spec)> {
    vec![
        (
            Kernel::Sample,
            Spec::new("repetition_penalty", DType::F32, WG),
        ),
        (Kernel::Sample, Spec::new("sample_sorted", DType::F32, 1)),
    ]
}

/// How to pick the next token. `temperature <= 0` is greedy (argmax).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

/// Divide positive logits by `penalty` and multiply negative ones, at each of `ids`
/// (which must be distinct), in place.
pub fn repetition_penalty(
    pass: &mut Pass,
    logits: &MlxBuffer,
    ids: &MlxBuffer,
    penalty: f32,
) -> Result<()> {
    let op = "repetition_penalty";
    check::dtype(logits, &[DType::F32], op, "logits")?;
    check::dtype(ids, &[DType::U32], op, "ids")?;
    check::ensure(
        logits.shape().len() == 1 || logits.shape()[0] == 1,
        op,
        || format!("logits has shape {:?}, expected one row", logits.shape()),
    )?;
    check::ensure(penalty.is_finite() && penalty > 0.0, op, || {
        format!("penalty is {penalty}, expected a positive finite value")
    })?;
    let n = check::fits_u32(ids.len(), op, "ids")?;
    let params = SampleParams {
        n,
        penalty,
        temperature: 1.0,
        top_p: 1.0,
        min_p: 0.0,
        uniform: 0.0,
        _pad: [0; 2],
    };
    // Slots 2..4 are unused by this entry point; `ids` fills them.
    pass.dispatch(
        Kernel::Sample,
        Spec::new("repetition_penalty", DType::F32, WG),
        &params,
        &[logits, ids],
        n.div_ceil(WG),
    )
}

/// The next token id (`u32 [1]`) from one row of logits. `uniform` in [0, 1) is the random
/// draw (the caller's seeded generator); unused when greedy.
pub fn sample(
    pass: &mut Pass,
    logits: &MlxBuffer,
    s: &Sampling,
    uniform: f32,
) -> Result<MlxBuffer> {
    let op = "sample";
    check::dtype(logits, &[DType::F32], op, "logits")?;
    let (rows, n) = check::rows(logits, op, "logits")?;
    check::ensure(rows == 1, op, || {
        format!("logits has {rows} rows, expected 1")
    })?;
    check::ensure((0.0..=1.0).contains(&s.top_p) && s.top_p > 0.0, op, || {
        format!("top_p is {}, expected a value in (0, 1]", s.top_p)
    })?;
    check::ensure((0.0..=1.0).contains(&s.min_p), op, || {
        format!("min_p is {}, expected a value in [0, 1]", s.min_p)
    })?;
    check::ensure((0.0..1.0).contains(&uniform), op, || {
        format!("uniform is {uniform}, expected a value in [0, 1)")
    })?;
    let row = logits.reshape(&[1, n])?;
    if s.temperature <= 0.0 || s.top_k == 1 {
        return argmax(pass, &row)?.reshape(&[1]);
    }
    let k = if s.top_k == 0 {
        n.min(TOP_K_MAX)
    } else {
        s.top_k.min(n)
    };
    check::ensure(k <= TOP_K_MAX, op, || {
        format!("top_k = {k} exceeds {TOP_K_MAX}")
    })?;
    let (vals, idx) = top_k(pass, &row, k)?;
    let out = pass.alloc(DType::U32, &[1])?;
    let params = SampleParams {
        n: k as u32,
        penalty: 1.0,
        temperature: s.temperature,
        top_p: s.top_p,
        min_p: s.min_p,
        uniform,
        _pad: [0; 2],
    };
    // Slots 0 and 1 are unused by this entry point; the candidates fill them.
    pass.dispatch(
        Kernel::Sample,
        Spec::new("sample_sorted", DType::F32, 1),
        &params,
        &[&vals, &idx, &vals, &idx, &out],
        1,
    )?;
    // Replayed per token with that token's draw.
    pass.vary_last(move |a| {
        let uniform = a.coin;
        if !(0.0..1.0).contains(&uniform) {
            return Err(crate::MlxError::invalid(format!(
                "sample: uniform is {uniform}, expected a value in [0, 1)"
            )));
        }
        Ok(Some((SampleParams { uniform, ..params }, 1)))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gpu, Rng};

    /// The distribution `sample` should draw from, computed independently in f64.
    fn reference(logits: &[f32], s: &Sampling) -> Vec<f64> {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if s.top_k > 0 {
            order.truncate(s.top_k);
        }
        let top = logits[order[0]] as f64;
        let p1: Vec<f64> = order
            .iter()
            .map(|&i| (logits[i] as f64 - top).exp())
            .collect();
        let z: f64 = p1.iter().sum();
        let mut keep = 1;
        let mut cum = p1[0] / z;
        while keep < order.len() && cum < s.top_p as f64 && p1[keep] >= s.min_p as f64 {
            cum += p1[keep] / z;
            keep += 1;
        }
        let mut probs = vec![0.0; logits.len()];
        let w: Vec<f64> = (0..keep)
            .map(|j| ((logits[order[j]] as f64 - top) / s.temperature as f64).exp())
            .collect();
        let wz: f64 = w.iter().sum();
        for j in 0..keep {
            probs[order[j]] = w[j] / wz;
        }
        probs
    }

    #[test]
    fn draws_follow_the_reference_distribution_chi_square() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(42);
        let vocab = 50;
        let logits: Vec<f32> = rng.normals(vocab, 1.5);
        let buf = MlxBuffer::from_slice(g, &logits, &[1, vocab])?;
        let settings = [
            Sampling {
                temperature: 1.0,
                ..Sampling::default()
            },
            Sampling {
                temperature: 0.7,
                top_k: 8,
                ..Sampling::default()
            },
            Sampling {
                temperature: 1.3,
                top_p: 0.8,
                ..Sampling::default()
            },
            Sampling {
                temperature: 1.0,
                min_p: 0.1,
                ..Sampling::default()
            },
        ];
        let draws = 2000;
        for s in &settings {
            let want = reference(&logits, s);
            let mut counts = vec![0usize; vocab];
            // Stratified uniforms: one pass records every draw (one submit).
            let mut pass = g.begin();
            let mut outs = Vec::with_capacity(draws);
            for d in 0..draws {
                let u = (d as f32 + rng.uniform(0.0, 1.0)) / draws as f32;
                outs.push(sample(&mut pass, &buf, s, u.min(0.999_999))?);
            }
            pass.commit_and_wait()?;
            for o in outs {
                counts[o.to_vec::<u32>(g)?[0] as usize] += 1;
            }
            // Chi-square over tokens with expected count >= 5; everything else must be 0
            // when its probability is 0 (filtered out).
            let mut chi2 = 0.0;
            let mut dof = 0usize;
            for (i, &c) in counts.iter().enumerate() {
                let e = want[i] * draws as f64;
                if want[i] == 0.0 {
                    assert_eq!(
                        c, 0,
                        "{s:?}: token {i} was filtered out but drawn {c} times"
                    );
                } else if e >= 5.0 {
                    chi2 += (c as f64 - e).powi(2) / e;
                    dof += 1;
                }
            }
            // Stratified draws are far tighter than independent ones: chi2 must stay well
            // under the 99.9% quantile of chi2(dof) (~ dof + 4.4 sqrt(2 dof) + 10).
            let limit = dof as f64 + 4.4 * (2.0 * dof as f64).sqrt() + 10.0;
            assert!(
                chi2 < limit,
                "{s:?}: chi2 {chi2:.1} over {dof} dof exceeds {limit:.1}"
            );
        }
        Ok(())
    }

    #[test]
    fn greedy_is_argmax_and_penalty_changes_logits_as_specified() -> Result<()> {
        let g = gpu();
        let logits = vec![1.0f32, 3.0, -2.0, 2.9, 0.5];
        let buf = MlxBuffer::from_slice(g, &logits, &[5])?;
        let ids = MlxBuffer::from_slice(g, &[1u32, 2], &[2])?;
        let mut pass = g.begin();
        let greedy = sample(&mut pass, &buf, &Sampling::default(), 0.5)?;
        pass.commit_and_wait()?;
        assert_eq!(greedy.to_vec::<u32>(g)?, vec![1]);
        let mut pass = g.begin();
        repetition_penalty(&mut pass, &buf, &ids, 1.5)?;
        let after = sample(&mut pass, &buf, &Sampling::default(), 0.5)?;
        pass.commit_and_wait()?;
        assert_eq!(buf.to_vec::<f32>(g)?, vec![1.0, 2.0, -3.0, 2.9, 0.5]);
        assert_eq!(after.to_vec::<u32>(g)?, vec![3]);
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let buf = MlxBuffer::from_slice(g, &[0.0f32; 8], &[2, 4])?;
        let mut pass = g.begin();
        let e = sample(&mut pass, &buf, &Sampling::default(), 0.5)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "sample: logits has 2 rows, expected 1");
        let one = buf.view(0, &[4])?;
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.0,
            ..Sampling::default()
        };
        let e = sample(&mut pass, &one, &s, 0.5).unwrap_err().to_string();
        assert_eq!(e, "sample: top_p is 0, expected a value in (0, 1]");
        Ok(())
    }
}

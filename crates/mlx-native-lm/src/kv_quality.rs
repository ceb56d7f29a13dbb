//! KV-cache quality: next-token distributions with a compressed cache against the f16 cache
//! over a text scored by chunked prefill: every chunk attends to the cache as stored after
//! its append (the sinks and the last 128 positions exact, the rest compressed; with chunks
//! of at most 128 a slightly pessimistic view of token-by-token decode, see
//! docs/KV_QUANT.md). Used by the `kv_quality` example (the long table in docs/KV_QUANT.md)
//! and by a short CI test.

use mlx_native::kv_quant::KvFormat;

use crate::error::Result;
use crate::models::Transformer;

/// Mean KL divergence (f16-cache distribution to the other) and top-1 agreement.
#[derive(Clone, Copy, Debug)]
pub struct KvQuality {
    pub mean_kl: f64,
    pub top1: f64,
}

/// Log-softmax of every position's logits of `ids` (chunks of `chunk` tokens) with a cache
/// in `format`, f32 (enough for the KL sums, which run in f64).
pub fn log_probs(
    m: &Transformer,
    ids: &[u32],
    chunk: usize,
    format: KvFormat,
) -> Result<Vec<Vec<f32>>> {
    let vocab = m.cfg.vocab;
    let mut cache = m.new_cache_with(ids.len().max(1), format)?;
    let mut out = Vec::with_capacity(ids.len());
    for (c, part) in ids.chunks(chunk.max(1)).enumerate() {
        let mut pass = m.gpu.begin();
        let logits = m.forward_all(&mut pass, part, c * chunk, &mut cache)?;
        pass.commit()?;
        let v = logits.to_vec::<f32>(&m.gpu)?;
        out.extend(v.chunks(vocab).map(|row| {
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let z = row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln() + mx;
            row.iter().map(|&v| (v as f64 - z) as f32).collect()
        }));
    }
    Ok(out)
}

/// Compare the distributions of `got` with the reference `base` (from [`log_probs`]).
pub fn compare(base: &[Vec<f32>], got: &[Vec<f32>]) -> KvQuality {
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc },
            )
            .0
    };
    let (mut kl, mut agree) = (0.0, 0usize);
    for (p, q) in base.iter().zip(got) {
        kl += p
            .iter()
            .zip(q)
            .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
            .sum::<f64>();
        agree += usize::from(argmax(p) == argmax(q));
    }
    let n = base.len().max(1) as f64;
    KvQuality {
        mean_kl: kl / n,
        top1: agree as f64 / n,
    }
}

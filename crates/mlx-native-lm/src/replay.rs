//! Decode by graph replay: a decode step is recorded once and replayed per token
//! ([`mlx_native::Graph`]).
//!
//! [`DecodeLoop`] owns the two buffers a decode step reads from the host's side of things,
//! the token id and its position, so that a recorded step can be submitted again as it is:
//! the step embeds the id in `ids`, and copies the id it samples back into `ids` for the next
//! step. Per token the host writes the position, checks and advances the cache's lengths, and
//! replays. When the recorded step no longer fits the token (the attention's split plan
//! changes shape as the context grows) or the cache cannot be replayed (compressed formats),
//! the step is recorded as usual, and kept again where it can be.

use mlx_native::kv_quant::KvStore;
use mlx_native::{Graph, MlxBuffer, MlxDevice, Pass, Readback, Replayed, TokenVars};

use crate::error::Result;
use crate::models::Transformer;

/// What the step records after the model's logits: sampling (or argmax), returning the
/// sampled id (u32 `[1]`).
pub type Tail<'a> = &'a dyn Fn(&mut Pass, &MlxBuffer) -> Result<MlxBuffer>;

/// Counts of how the steps ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Steps recorded (and kept for replay where they could be).
    pub recorded: usize,
    /// Steps replayed from a kept recording.
    pub replayed: usize,
}

/// One sequence's decode steps, replayed where they can be.
pub struct DecodeLoop {
    gpu: MlxDevice,
    ids: MlxBuffer,
    positions: MlxBuffer,
    graph: Option<Graph>,
    /// What the kept step was recorded for: the model's address and the cache's first K
    /// buffer (a step replayed over another cache would read and write that one).
    owner: Option<(usize, MlxBuffer)>,
    replay: bool,
    stats: LoopStats,
}

/// The identity [`DecodeLoop`] checks before it replays: the model's address and a plain
/// cache's first K buffer.
fn owner_of<'c>(m: &Transformer, cache: &'c KvStore) -> Option<(usize, &'c MlxBuffer)> {
    match cache {
        KvStore::Plain(c) => c
            .buffers(0)
            .ok()
            .map(|(k, _)| (m as *const Transformer as usize, k)),
        KvStore::Compressed(_) => None,
    }
}

impl DecodeLoop {
    /// `replay`: keep and replay recorded steps (false records every step, the before of
    /// replay).
    pub fn new(gpu: &MlxDevice, replay: bool) -> Result<Self> {
        Ok(DecodeLoop {
            gpu: gpu.clone(),
            ids: MlxBuffer::from_slice(gpu, &[0u32], &[1])?,
            positions: MlxBuffer::from_slice(gpu, &[0u32], &[1])?,
            graph: None,
            owner: None,
            replay,
            stats: LoopStats::default(),
        })
    }

    /// The id the next step embeds (u32 `[1]`): whoever samples the token before the first
    /// step (the prefill) copies its id here ([`Pass::copy_after`]) or writes it.
    pub fn ids(&self) -> &MlxBuffer {
        &self.ids
    }

    pub fn stats(&self) -> LoopStats {
        self.stats
    }

    /// [`Graph::host_split`] of the kept step's latest replay (zeros before one).
    pub fn host_split(&self) -> [f64; 3] {
        self.graph.as_ref().map_or([0.0; 3], Graph::host_split)
    }

    /// Forget the kept step. (A step is not replayed over another model or cache than it
    /// was recorded for in any case.)
    pub fn reset(&mut self) {
        self.graph = None;
        self.owner = None;
    }

    /// Submit the decode step of the id in [`DecodeLoop::ids`] at position `at.pos`, then
    /// `tail` (its random draw `at.coin`); the sampled id goes back into `ids`. With
    /// `readback`, returns the download of that id.
    pub fn step(
        &mut self,
        m: &Transformer,
        cache: &mut KvStore,
        at: TokenVars,
        tail: Tail<'_>,
        readback: bool,
    ) -> Result<Option<Readback>> {
        let pos = at.pos;
        self.positions.write(&self.gpu, &[pos as u32])?;
        let same = match (&self.owner, owner_of(m, cache)) {
            (Some((a, k)), Some((b, l))) => *a == b && k.same_storage(l),
            _ => false,
        };
        if !same {
            self.graph = None;
        }
        if let Some(g) = self.graph.as_mut() {
            // The appends' checks (capacity, rings), as recording would make them.
            cache.advance(pos, 1)?;
            match g.replay(at, readback.then_some(&self.ids)) {
                Ok(Replayed::Submitted(rb)) => {
                    self.stats.replayed += 1;
                    return Ok(rb);
                }
                Ok(Replayed::Stale) => self.graph = None,
                Err(e) => {
                    // Nothing was submitted: the lengths go back to before this step.
                    let _ = cache.advance(pos, 0);
                    return Err(e.into());
                }
            }
        }
        let capture = self.replay && matches!(cache, KvStore::Plain(_));
        let mut pass = self.gpu.begin();
        if capture {
            pass = pass.capture(at);
        }
        let logits = m.forward_token_at(&mut pass, &self.ids, &self.positions, pos, cache)?;
        let next = tail(&mut pass, &logits)?;
        pass.copy_after(&next, &self.ids)?;
        self.stats.recorded += 1;
        if capture && pass.replay_refused().is_none() {
            let mut g = pass.into_graph()?;
            let submitted = g.replay(at, readback.then_some(&self.ids))?;
            self.graph = Some(g);
            self.owner = owner_of(m, cache).map(|(a, k)| (a, k.clone()));
            return match submitted {
                Replayed::Submitted(rb) => Ok(rb),
                Replayed::Stale => Err(crate::LmError::Invalid(
                    "decode replay: a step is stale at the token it was recorded for".into(),
                )),
            };
        }
        if readback {
            Ok(Some(pass.commit_with_readback(&self.ids)?))
        } else {
            pass.commit()?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_decode::{build, shape, TEST_SHAPES};
    use mlx_native::kv_quant::KvFormat;
    use mlx_native::{ops, KvCacheConfig};

    /// Greedy decode of `n` steps after the prompt `ids`, every step's logits copied out:
    /// (sampled ids, logits per step, stats).
    fn decode(
        m: &Transformer,
        replay: bool,
        prompt: &[u32],
        n: usize,
        ctx: usize,
    ) -> (Vec<u32>, Vec<Vec<f32>>, LoopStats) {
        let g = &m.gpu;
        // Chunks of at most 8 tokens: the tiny Gemma's window-8 layer is then a ring of
        // 15 slots that wraps many times.
        let mut cfg = KvCacheConfig::new(m.cfg.n_layers, m.cfg.n_kv_heads, m.cfg.head_dim, ctx);
        cfg.max_chunk = 8;
        cfg.windows = m.layers.iter().map(|l| l.attn.window).collect();
        let mut cache = KvStore::new(g, &cfg, KvFormat::F16).unwrap();
        let mut steps = DecodeLoop::new(g, replay).unwrap();
        let mut pass = g.begin();
        let logits = m.forward(&mut pass, prompt, 0, &mut cache).unwrap();
        let first = ops::argmax(&mut pass, &logits)
            .unwrap()
            .reshape(&[1])
            .unwrap();
        pass.copy_after(&first, steps.ids()).unwrap();
        pass.commit().unwrap();
        let out =
            MlxBuffer::from_slice(g, &vec![f32::NAN; m.cfg.vocab], &[1, m.cfg.vocab]).unwrap();
        let tail = |pass: &mut Pass, logits: &MlxBuffer| -> Result<MlxBuffer> {
            pass.copy_after(logits, &out)?;
            Ok(ops::argmax(pass, logits)?.reshape(&[1])?)
        };
        let (mut ids, mut all) = (Vec::new(), Vec::new());
        for i in 0..n {
            let at = TokenVars {
                pos: prompt.len() + i,
                coin: 0.5,
            };
            let rb = steps.step(m, &mut cache, at, &tail, true).unwrap().unwrap();
            ids.push(rb.wait::<u32>().unwrap()[0]);
            all.push(out.to_vec::<f32>(g).unwrap());
        }
        (ids, all, steps.stats())
    }

    /// Replayed decode steps give the recorded steps' logits bit for bit, on every tiny
    /// shape (GQA, the Gemma's sliding window of 8 wrapping its 15-slot ring, MoE, GGUF),
    /// over enough steps (past 64 keys, the tiny heads' tile) that the attention's plan
    /// goes from one split to several with a reduce: recorded again there, then replayed.
    #[test]
    fn replayed_steps_match_recorded_steps() {
        let g = MlxDevice::new().unwrap();
        for name in TEST_SHAPES {
            let m = build(&g, &shape(name).unwrap(), 3).unwrap();
            let prompt: Vec<u32> = (0..5).map(|i| (i * 37 + 11) % m.cfg.vocab as u32).collect();
            let (ids_r, logits_r, st) = decode(&m, true, &prompt, 100, 120);
            let (ids_s, logits_s, st0) = decode(&m, false, &prompt, 100, 120);
            println!("{name}: {st:?}, without replay {st0:?}");
            assert_eq!(st0.replayed, 0);
            assert!(st.recorded >= 2 && st.replayed >= 90, "{name}: {st:?}");
            for (i, (a, b)) in logits_r.iter().zip(&logits_s).enumerate() {
                assert!(a.iter().all(|x| x.is_finite()), "{name} step {i}");
                assert_eq!(a, b, "{name}: logits of step {i}");
            }
            assert_eq!(ids_r, ids_s, "{name}");
        }
    }

    /// A kept step is not replayed over another cache than it was recorded for: the loop
    /// records again, and the logits are that cache's.
    #[test]
    fn a_kept_step_follows_its_cache() {
        let g = MlxDevice::new().unwrap();
        let m = build(&g, &shape("tiny-llama-mlx").unwrap(), 4).unwrap();
        let tail = |pass: &mut Pass, logits: &MlxBuffer| -> Result<MlxBuffer> {
            Ok(ops::argmax(pass, logits)?.reshape(&[1])?)
        };
        let mut steps = DecodeLoop::new(&g, true).unwrap();
        let mut caches = Vec::new();
        for prompt in [[3u32, 1, 4], [2, 7, 1]] {
            let mut cache = m.new_cache(16).unwrap();
            let mut pass = g.begin();
            m.forward(&mut pass, &prompt, 0, &mut cache).unwrap();
            pass.commit().unwrap();
            caches.push(cache);
        }
        let at = |pos| TokenVars { pos, coin: 0.0 };
        let mut got = Vec::new();
        for (c, pos) in [(0, 3), (0, 4), (1, 3)] {
            steps.ids().write(&g, &[5u32]).unwrap();
            let rb = steps
                .step(&m, &mut caches[c], at(pos), &tail, true)
                .unwrap();
            got.push(rb.unwrap().wait::<u32>().unwrap()[0]);
        }
        // Recorded, replayed over the same cache, recorded again over the other one.
        assert_eq!(
            steps.stats(),
            LoopStats {
                recorded: 2,
                replayed: 1
            }
        );
        assert_eq!((caches[0].len(0), caches[1].len(0)), (5, 4));
        let mut want = m.new_cache(16).unwrap();
        let mut pass = g.begin();
        m.forward(&mut pass, &[2, 7, 1], 0, &mut want).unwrap();
        let l = m.forward(&mut pass, &[5], 3, &mut want).unwrap();
        let id = ops::argmax(&mut pass, &l).unwrap();
        pass.commit().unwrap();
        assert_eq!(got[2], id.to_vec::<u32>(&g).unwrap()[0]);
    }
}

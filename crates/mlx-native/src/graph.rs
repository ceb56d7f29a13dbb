//! Graph replay: a pass recorded once ([`Pass::capture`](crate::Pass::capture)) and submitted
//! again per token without recording it again.
//!
//! A decode step's dispatches, pipelines, bind groups and buffers are the same from one token
//! to the next; only a few parameters follow the token (the position a K/V row is written at,
//! the attention's key range and split plan, the sampler's random draw). Ops that take such
//! values say, while a pass is captured, how their parameters and workgroup count follow the
//! token ([`Pass::vary_last`](crate::Pass::vary_last)). A replay runs those functions, writes
//! the whole parameter arena into the graph's own uniform buffer, and encodes the kept steps:
//! the host no longer looks up pipelines or bind groups, builds parameters, or creates a
//! uniform buffer and its bind groups per token. wgpu command buffers are single-use, so the
//! steps are still encoded per submission.
//!
//! When a function finds that the recorded structure no longer fits (the attention moving
//! from one split to several, more splits than its scratch holds), the replay reports
//! [`Replayed::Stale`] and the caller records a new graph.

use std::sync::Arc;

use bytemuck::Pod;

use crate::buffer::MlxBuffer;
use crate::buffer_pool::RawBuffer;
use crate::device::MlxDevice;
use crate::encoder::{self, fold_grid, Staged, Step};
use crate::error::{MlxError, Result};

/// The per-token values a pass is captured with and a graph replayed with.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenVars {
    /// Position of the (first) token of the step.
    pub pos: usize,
    /// The sampler's random draw in [0, 1) for this token.
    pub coin: f32,
}

/// What a varying op's parameters follow: the tokens since the capture and this token's
/// draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Advance {
    /// Positions moved since the capture (0 replays the captured token's values).
    pub steps: usize,
    /// The sampler's random draw for this token.
    pub coin: f32,
}

/// A varying step's function: writes its parameters for the token into the step's arena
/// slot and returns its workgroups, or `None` when the recorded structure no longer fits.
type VaryFn = Box<dyn Fn(&Advance, &mut [u8]) -> Result<Option<u32>> + Send>;

/// What a capture collects beside the steps.
pub(crate) struct Capture {
    at: TokenVars,
    varies: Vec<(usize, VaryFn)>,
    refused: Option<String>,
}

impl Capture {
    pub(crate) fn new(at: TokenVars) -> Self {
        Capture {
            at,
            varies: Vec::new(),
            refused: None,
        }
    }

    pub(crate) fn vary<P, F>(&mut self, step: usize, f: F)
    where
        P: Pod,
        F: Fn(&Advance) -> Result<Option<(P, u32)>> + Send + 'static,
    {
        self.varies.push((
            step,
            Box::new(move |a, slot| {
                let Some((p, wgs)) = f(a)? else {
                    return Ok(None);
                };
                let bytes = bytemuck::bytes_of(&p);
                slot.get_mut(..bytes.len())
                    .ok_or_else(|| MlxError::Gpu("graph: params past their slot".into()))?
                    .copy_from_slice(bytes);
                Ok(Some(wgs))
            }),
        ));
    }

    pub(crate) fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    pub(crate) fn refuse(&mut self, why: &str) {
        self.refused.get_or_insert_with(|| why.to_string());
    }
}

/// The result of [`Graph::replay`].
pub enum Replayed {
    /// Submitted; the readback asked for, if any.
    Submitted(Option<crate::Readback>),
    /// Not submitted: the recorded structure does not fit this token (record a new graph).
    Stale,
}

/// A recorded pass, replayed per token ([`Pass::capture`](crate::Pass::capture),
/// [`Pass::into_graph`](crate::Pass::into_graph)). It holds every buffer its steps bind, so
/// its scratch buffers stay its own while it lives.
pub struct Graph {
    gpu: MlxDevice,
    steps: Vec<Step>,
    arena: Vec<u8>,
    uniforms: wgpu::Buffer,
    groups: Vec<(wgpu::BindGroupLayout, wgpu::BindGroup)>,
    of_step: Vec<usize>,
    capture: Capture,
    copies: Vec<encoder::Copy>,
    _keep: Vec<Arc<RawBuffer>>,
    stale: bool,
    /// Host seconds of the latest replay's parts (see [`Graph::host_split`]).
    split: [f64; 3],
}

impl Graph {
    pub(crate) fn new(
        gpu: MlxDevice,
        steps: Vec<Step>,
        mut arena: Vec<u8>,
        capture: Capture,
        copies: Vec<encoder::Copy>,
        keep: Vec<Arc<RawBuffer>>,
    ) -> Result<Self> {
        if let Some(why) = &capture.refused {
            return Err(MlxError::Unsupported(format!(
                "graph replay: {why} cannot be replayed"
            )));
        }
        let dev = &gpu.inner.device;
        let uniforms = encoder::uniform_buffer(dev, &mut arena);
        let (groups, of_step) = encoder::params_groups(dev, &steps, &uniforms);
        Ok(Graph {
            gpu,
            steps,
            arena,
            uniforms,
            groups,
            of_step,
            capture,
            copies,
            _keep: keep,
            stale: false,
            split: [0.0; 3],
        })
    }

    /// The token the graph was captured for.
    pub fn captured_at(&self) -> TokenVars {
        self.capture.at
    }

    /// Dispatches per replay.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Dispatches whose parameters follow the token.
    pub fn varying(&self) -> usize {
        self.capture.varies.len()
    }

    /// Set every varying step's parameters and workgroups for the token `at`. False when the
    /// recorded structure does not fit it (the graph is then stale for good).
    fn apply(&mut self, at: TokenVars) -> Result<bool> {
        if self.stale {
            return Ok(false);
        }
        let Some(steps) = at.pos.checked_sub(self.capture.at.pos) else {
            self.stale = true;
            return Ok(false);
        };
        let adv = Advance {
            steps,
            coin: at.coin,
        };
        let max_wg = self.gpu.caps().max_workgroups_per_dimension;
        for (i, f) in &self.capture.varies {
            let step = self
                .steps
                .get_mut(*i)
                .ok_or_else(|| MlxError::Gpu(format!("graph: no step {i}")))?;
            let off = step.params_off as usize;
            let slot = self
                .arena
                .get_mut(off..off + encoder::MAX_PARAMS_BYTES)
                .ok_or_else(|| MlxError::Gpu(format!("graph: step {i}'s params out of range")))?;
            let Some(wgs) = f(&adv, slot)? else {
                self.stale = true;
                return Ok(false);
            };
            step.grid = fold_grid(wgs, max_wg);
        }
        Ok(true)
    }

    /// Submit the graph for the token `at` (its parameters set by the varying ops'
    /// functions), with a copy of `readback` to the host at the end of the submission when
    /// given; or [`Replayed::Stale`], submitting nothing.
    pub fn replay(&mut self, at: TokenVars, readback: Option<&MlxBuffer>) -> Result<Replayed> {
        let t0 = std::time::Instant::now();
        if !self.apply(at)? {
            return Ok(Replayed::Stale);
        }
        let inner = &self.gpu.inner;
        inner.queue.write_buffer(&self.uniforms, 0, &self.arena);
        let t1 = std::time::Instant::now();
        let mut enc = inner
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mlx-native graph"),
            });
        {
            let mut cp = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("mlx-native graph"),
                timestamp_writes: None,
            });
            encoder::encode_steps(&mut cp, &self.steps, &self.groups, &self.of_step);
        }
        encoder::encode_copies(&mut enc, &self.copies);
        let staged = readback.map(|buf| {
            let s = Staged::new(&self.gpu, buf);
            s.encode(&mut enc, buf);
            s
        });
        let cb = enc.finish();
        let t2 = std::time::Instant::now();
        let index = inner.queue.submit(Some(cb));
        inner.count_submit_and_map(1, u64::from(staged.is_some()));
        self.split = [
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            t2.elapsed().as_secs_f64(),
        ];
        self.gpu.take_uncaptured()?;
        Ok(Replayed::Submitted(
            staged.map(|s| s.into_readback(self.gpu.clone(), Some(index))),
        ))
    }

    /// Host seconds of the latest replay: setting and uploading the parameters, encoding
    /// the steps into a wgpu command buffer, and submitting it (measurement).
    pub fn host_split(&self) -> [f64; 3] {
        self.split
    }

    /// The parameter bytes and workgroup grid of every step as the next replay would submit
    /// them for `at` (tests: a replay's parameters equal a fresh recording's).
    #[doc(hidden)]
    pub fn params_at(&mut self, at: TokenVars) -> Result<Option<Vec<StepParams>>> {
        if !self.apply(at)? {
            return Ok(None);
        }
        Ok(Some(steps_params(&self.steps, &self.arena)))
    }
}

/// A step's kernel label, its parameter and view-offset bytes, and its grid.
pub type StepParams = (Arc<str>, Vec<u8>, [u32; 3]);

/// Each step's [`StepParams`].
pub(crate) fn steps_params(steps: &[Step], arena: &[u8]) -> Vec<StepParams> {
    steps
        .iter()
        .map(|s| {
            let p = s.params_off as usize;
            let v = s.views_off as usize;
            let end = |o: usize, n: usize| (o + n).min(arena.len());
            let mut bytes = arena
                .get(p..end(p, encoder::MAX_PARAMS_BYTES))
                .unwrap_or_default()
                .to_vec();
            bytes.extend_from_slice(arena.get(v..end(v, 32)).unwrap_or_default());
            (s.label.clone(), bytes, s.grid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gpu, Rng};

    /// A captured pass replays with its inputs' current contents, its varying step follows
    /// the token (a sampler's draw here, a position in the ops' own tests), and the copy
    /// after it lands; an earlier position than the capture's is stale, as is every replay
    /// after that.
    #[test]
    fn a_graph_replays_its_pass() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(5);
        let n = 33;
        let a = MlxBuffer::from_slice(g, &rng.normals(n, 1.0), &[n])?;
        let b = MlxBuffer::from_slice(g, &rng.normals(n, 1.0), &[n])?;
        let out = MlxBuffer::from_slice(g, &vec![f32::NAN; n], &[n])?;
        let at = TokenVars { pos: 7, coin: 0.0 };
        let mut pass = g.begin().capture(at);
        let sum = crate::ops::add(&mut pass, &a, &b)?;
        pass.copy_after(&sum, &out)?;
        let mut graph = pass.into_graph()?;
        assert_eq!((graph.varying(), graph.captured_at()), (0, at));
        for round in 0..3 {
            let av = rng.normals(n, 1.0);
            a.write(g, &av)?;
            let rb = match graph.replay(
                TokenVars {
                    pos: 7 + round,
                    coin: 0.0,
                },
                Some(&out),
            )? {
                Replayed::Submitted(rb) => rb,
                Replayed::Stale => panic!("round {round}: stale"),
            };
            let got = rb.map(|r| r.wait::<f32>()).transpose()?.unwrap_or_default();
            let bv = b.to_vec::<f32>(g)?;
            let want: Vec<f32> = av.iter().zip(&bv).map(|(x, y)| x + y).collect();
            assert_eq!(got, want, "round {round}");
        }
        assert!(matches!(
            graph.replay(TokenVars { pos: 6, coin: 0.0 }, None)?,
            Replayed::Stale
        ));
        assert!(matches!(graph.replay(at, None)?, Replayed::Stale));

        // The sampler's draw follows the token: each replay draws what a fresh pass would.
        let logits = MlxBuffer::from_slice(g, &rng.normals(n, 2.0), &[1, n])?;
        let s = crate::ops::sample::Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        };
        let mut pass = g.begin().capture(TokenVars { pos: 0, coin: 0.5 });
        let id = crate::ops::sample::sample(&mut pass, &logits, &s, 0.5)?;
        let mut graph = pass.into_graph()?;
        assert_eq!(graph.varying(), 1);
        let mut seen = std::collections::BTreeSet::new();
        for (i, coin) in [0.02f32, 0.3, 0.55, 0.8, 0.97].into_iter().enumerate() {
            let mut pass = g.begin();
            let fresh = crate::ops::sample::sample(&mut pass, &logits, &s, coin)?;
            let want = pass.commit_with_readback(&fresh)?.wait::<u32>()?;
            let rb = match graph.replay(TokenVars { pos: i, coin }, Some(&id))? {
                Replayed::Submitted(Some(rb)) => rb,
                _ => panic!("coin {coin}: not submitted"),
            };
            let got = rb.wait::<u32>()?;
            assert_eq!(got, want, "coin {coin}");
            seen.insert(got[0]);
        }
        assert!(seen.len() > 2, "the draws chose {seen:?}");
        Ok(())
    }

    /// Capture misuse is named: a pass not captured, an op that refuses replay, a copy of
    /// mismatched sizes.
    #[test]
    fn capture_errors_are_named() -> Result<()> {
        let g = gpu();
        let x = MlxBuffer::from_slice(g, &[1.0f32, 2.0, 3.0], &[3])?;
        let y = MlxBuffer::from_slice(g, &[1.0f32, 2.0], &[2])?;
        let e = g
            .begin()
            .into_graph()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not recorded with Pass::capture"), "{e}");
        let mut pass = g.begin().capture(TokenVars::default());
        pass.refuse_replay("some_op (a reason)");
        assert_eq!(pass.replay_refused(), Some("some_op (a reason)"));
        let e = pass
            .into_graph()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("some_op (a reason) cannot be replayed"), "{e}");
        let mut pass = g.begin();
        let e = pass
            .copy_after(&x, &y)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("copy_after: 12 bytes"), "{e}");
        Ok(())
    }
}

//! Text generation: chunked prefill, then token-by-token decode with sampling on the GPU
//! (only the chosen id comes back), stopping on end-of-generation tokens, stop strings, the
//! token budget, the context size or an interrupt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use mlx_native::kv_quant::KvStore;
use mlx_native::ops::sample::{repetition_penalty, sample, Sampling};
use mlx_native::{MlxBuffer, Pass, Readback, TokenVars};

use crate::chat::{ChatTemplate, Message, GEMMA_TEMPLATE};
use crate::config::Family;
use crate::error::{LmError, Result};
use crate::models::{Transformer, PREFILL_CHUNK};
use crate::replay::DecodeLoop;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// 1.0 = off (llama.cpp's `--repeat-penalty`).
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    /// KV cache format (`--kv-cache`): f16 (default), f32, q8, q4, tq4, tq3, tq2.5, tq2.
    pub kv_format: mlx_native::kv_quant::KvFormat,
    /// Replay a recorded decode step per token instead of recording each one
    /// ([`crate::replay::DecodeLoop`]; where the cache allows it).
    pub replay: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: Sampling::default(),
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            stop: Vec::new(),
            kv_format: mlx_native::kv_quant::KvFormat::F16,
            replay: true,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfGeneration,
    StopString,
    MaxTokens,
    ContextFull,
    Interrupted,
}

/// What a generation produced, with its timings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Includes the final end-of-generation token when one was produced.
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// KV cache bytes of layer 0 (full-attention layers are all the same size).
    pub kv_bytes_per_layer: u64,
}

/// A model with its tokenizer and chat template, ready to generate.
pub struct Engine {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// xorshift64*: the sampler's uniform numbers, reproducible per seed.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32) / (1u64 << 24) as f32
    }
}

impl Engine {
    /// The chat template of the model: its own, or Gemma's standard one for Gemma GGUFs,
    /// which carry none.
    pub fn with_template(
        model: Transformer,
        tokenizer: Tokenizer,
        source: Option<&str>,
    ) -> Result<Self> {
        let src = match source {
            Some(s) => Some(s.to_string()),
            None if model.cfg.family == Family::Gemma3 => Some(GEMMA_TEMPLATE.to_string()),
            None => None,
        };
        let tok_str = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let template = match src {
            Some(s) => Some(ChatTemplate::new(
                &s,
                &tok_str(tokenizer.bos),
                &tok_str(tokenizer.eos),
            )?),
            None => None,
        };
        Ok(Engine {
            model,
            tokenizer,
            template,
        })
    }

    /// Prompt ids: the raw text with the model's BOS rule, or the chat template around one
    /// user message (the template writes its own BOS).
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(LmError::Invalid("the prompt is empty".into()));
        }
        if chat {
            let text = self.chat_text(&[Message::new("user", prompt)])?;
            self.tokenizer.encode(&text, false)
        } else {
            self.tokenizer.encode(prompt, true)
        }
    }

    /// The templated conversation, ending with the assistant's turn opener.
    pub fn chat_text(&self, messages: &[Message]) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| {
            LmError::Template("the model has no chat template (use a raw prompt)".into())
        })?;
        t.render(messages, true)
    }

    /// Default context size: the model's, capped at 4096.
    pub fn default_ctx(&self) -> usize {
        self.model.cfg.max_context.clamp(1, 4096)
    }

    /// Generate after `prompt_ids` in a fresh context of `ctx` positions. `on_text` receives
    /// text as it completes; `interrupt` stops generation cleanly when set.
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        ctx: usize,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        interrupt: &AtomicBool,
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            return Err(LmError::Invalid("the prompt has no tokens".into()));
        }
        if prompt_ids.len() >= ctx {
            return Err(LmError::Invalid(format!(
                "the prompt has {} tokens, which does not fit the context size {ctx} (--ctx-size)",
                prompt_ids.len()
            )));
        }
        let vocab = self.model.cfg.vocab as u32;
        if let Some(bad) = prompt_ids.iter().find(|&&t| t >= vocab) {
            return Err(LmError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let mut cache = self.model.new_cache_with(ctx, opts.kv_format)?;
        let mut rng = Rng(opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut history: Vec<u32> = prompt_ids.to_vec();
        let mut generated = Vec::new();
        let mut decoder = StreamDecoder::new();
        let mut text = String::new();
        let t0 = Instant::now();
        let mut prefill_secs = 0.0;
        // Without a repetition penalty the next step needs nothing from the host but the
        // sampled id, which is already on the GPU: it is recorded and submitted before that
        // id is read back, so the host's recording overlaps the GPU's work (one speculative
        // step is wasted when generation stops).
        let pipelined = opts.repetition_penalty == 1.0;
        let mut stop_reason = StopReason::MaxTokens;
        if opts.max_tokens == 0 {
            return Ok(self.finish(prompt_ids, text, stop_reason, generated, t0, 0.0, &cache));
        }
        if interrupt.load(Ordering::Relaxed) {
            stop_reason = StopReason::Interrupted;
            return Ok(self.finish(prompt_ids, text, stop_reason, generated, t0, 0.0, &cache));
        }
        let mut pos = 0;
        let mut steps = DecodeLoop::new(&self.model.gpu, opts.replay)?;
        let mut cur = self.launch(
            Feed::Host(prompt_ids),
            &mut pos,
            &mut cache,
            opts,
            &history,
            &mut rng,
            &mut steps,
        )?;
        loop {
            let more = generated.len() + 1 < opts.max_tokens && pos < ctx;
            let next = if pipelined && more {
                Some(self.launch(
                    Feed::Gpu,
                    &mut pos,
                    &mut cache,
                    opts,
                    &history,
                    &mut rng,
                    &mut steps,
                )?)
            } else {
                None
            };
            let id = cur
                .wait::<u32>()?
                .first()
                .copied()
                .ok_or_else(|| LmError::Invalid("sampler returned nothing".into()))?;
            if generated.is_empty() {
                prefill_secs = t0.elapsed().as_secs_f64();
            }
            generated.push(id);
            history.push(id);
            if self.tokenizer.is_eog(id) {
                stop_reason = StopReason::EndOfGeneration;
                break;
            }
            let piece = decoder.push(&self.tokenizer, id)?;
            text.push_str(&piece);
            if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                // Emit only what precedes the stop string.
                let already = text.len() - piece.len();
                if cut > already {
                    on_text(&text[already..cut]);
                }
                text.truncate(cut);
                stop_reason = StopReason::StopString;
                break;
            }
            on_text(&piece);
            if generated.len() >= opts.max_tokens {
                break;
            }
            if interrupt.load(Ordering::Relaxed) {
                stop_reason = StopReason::Interrupted;
                break;
            }
            cur = match next {
                Some(n) => n,
                None if pos >= ctx => {
                    stop_reason = StopReason::ContextFull;
                    break;
                }
                None => self.launch(
                    Feed::Host(&[id]),
                    &mut pos,
                    &mut cache,
                    opts,
                    &history,
                    &mut rng,
                    &mut steps,
                )?,
            };
        }
        Ok(self.finish(
            prompt_ids,
            text,
            stop_reason,
            generated,
            t0,
            prefill_secs,
            &cache,
        ))
    }

    /// Record and submit the forward pass of `feed` at `*pos` (advanced past it), then
    /// sampling, the sampled id left in `steps.ids()` for a following `Feed::Gpu` step
    /// (which `steps` replays where it can); returns the sampled id's pending readback.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        feed: Feed<'_>,
        pos: &mut usize,
        cache: &mut KvStore,
        opts: &GenerateOptions,
        history: &[u32],
        rng: &mut Rng,
        steps: &mut DecodeLoop,
    ) -> Result<Readback> {
        let gpu = &self.model.gpu;
        let tokens = match feed {
            Feed::Gpu => {
                let coin = rng.uniform().min(0.999_999);
                let tail = |pass: &mut Pass, logits: &MlxBuffer| {
                    Ok(sample(pass, logits, &opts.sampling, coin)?)
                };
                let at = TokenVars { pos: *pos, coin };
                let rb = steps.step(&self.model, cache, at, &tail, true)?;
                *pos += 1;
                return rb.ok_or_else(|| LmError::Invalid("decode step: no readback".into()));
            }
            Feed::Host(tokens) => tokens,
        };
        // Prefill in chunks; all but the last chunk only fill the cache.
        let mut pass = gpu.begin();
        let mut logits = None;
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            if i > 0 {
                pass.commit()?;
                pass = gpu.begin();
            }
            logits = Some(self.model.forward(&mut pass, chunk, *pos, cache)?);
            *pos += chunk.len();
        }
        let logits = logits.ok_or_else(|| LmError::Invalid("nothing to evaluate".into()))?;
        if opts.repetition_penalty != 1.0 {
            let mut recent: Vec<u32> = history
                .iter()
                .rev()
                .take(opts.repeat_last_n)
                .copied()
                .collect();
            recent.sort_unstable();
            recent.dedup();
            let ids = MlxBuffer::from_slice(gpu, &recent, &[recent.len()])?;
            repetition_penalty(&mut pass, &logits, &ids, opts.repetition_penalty)?;
        }
        let next = sample(
            &mut pass,
            &logits,
            &opts.sampling,
            rng.uniform().min(0.999_999),
        )?;
        pass.copy_after(&next, steps.ids())?;
        Ok(pass.commit_with_readback(&next)?)
    }

    /// Where one decode step's GPU time goes: `tokens` (the prompt and what was generated)
    /// are prefilled into a fresh cache of `ctx` positions, then one more step runs with a
    /// GPU timestamp around every dispatch (each then runs in its own compute pass, which
    /// adds a few µs per dispatch). Kernels by total time, largest first.
    pub fn profile_decode(
        &self,
        tokens: &[u32],
        ctx: usize,
    ) -> Result<Vec<crate::bench_decode::KernelShare>> {
        let (last, past) = tokens
            .split_last()
            .ok_or_else(|| LmError::Invalid("profile: no tokens".into()))?;
        if tokens.len() > ctx {
            return Err(LmError::Invalid(format!(
                "profile: {} tokens do not fit the context size {ctx}",
                tokens.len()
            )));
        }
        let gpu = &self.model.gpu;
        let mut cache = self
            .model
            .new_cache_with(ctx, mlx_native::kv_quant::KvFormat::F16)?;
        for (c, chunk) in past.chunks(PREFILL_CHUNK).enumerate() {
            let mut pass = gpu.begin();
            self.model
                .forward(&mut pass, chunk, c * PREFILL_CHUNK, &mut cache)?;
            pass.commit()?;
        }
        let mut pass = gpu.begin().with_profiling(true);
        let logits = self
            .model
            .forward(&mut pass, &[*last], past.len(), &mut cache)?;
        sample(&mut pass, &logits, &Sampling::default(), 0.5)?;
        let timings = pass.commit_and_wait()?;
        Ok(crate::bench_decode::top_kernels(&[timings]))
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        prompt_ids: &[u32],
        text: String,
        stop_reason: StopReason,
        generated: Vec<u32>,
        t0: Instant,
        prefill_secs: f64,
        cache: &KvStore,
    ) -> Generation {
        let total = t0.elapsed().as_secs_f64();
        let decode_secs = (total - prefill_secs).max(0.0);
        let decoded = generated.len().saturating_sub(1);
        Generation {
            prompt_ids: prompt_ids.to_vec(),
            text,
            stop_reason,
            prefill_tok_s: if prefill_secs > 0.0 {
                prompt_ids.len() as f64 / prefill_secs
            } else {
                0.0
            },
            decode_tok_s: if decode_secs > 0.0 {
                decoded as f64 / decode_secs
            } else {
                0.0
            },
            prefill_secs,
            decode_secs,
            generated_ids: generated,
            kv_bytes_per_layer: cache.bytes_per_layer(0),
        }
    }
}

/// Where a step's token ids come from.
enum Feed<'a> {
    /// Known on the host (the prompt, or an id already read back).
    Host(&'a [u32]),
    /// The previous step's sampled id, still on the GPU (in the decode loop's `ids`).
    Gpu,
}

/// Load a GGUF file or an mlx-lm folder with its tokenizer and chat template.
pub fn load_engine(
    gpu: &mlx_native::MlxDevice,
    path: &std::path::Path,
    quiet: bool,
) -> Result<Engine> {
    use crate::models::{mlx, model_format, ModelFormat};
    if !path.exists() {
        return Err(LmError::Config(format!(
            "{}: no such file or folder",
            path.display()
        )));
    }
    match model_format(path)? {
        ModelFormat::Gguf => load_gguf(gpu, path, quiet),
        ModelFormat::MlxFolder(dir) => {
            let folder = mlx::MlxFolder::open(&dir)?;
            let tokenizer = folder.tokenizer()?.ok_or_else(|| {
                LmError::Config(format!(
                    "{}: the folder has no tokenizer.json",
                    dir.display()
                ))
            })?;
            let template = folder.chat_template()?;
            let model = mlx::load(gpu, &folder, quiet)?;
            Engine::with_template(model, tokenizer, template.as_deref())
        }
    }
}

/// Load a model file (GGUF) with its tokenizer and chat template.
pub fn load_gguf(
    gpu: &mlx_native::MlxDevice,
    path: &std::path::Path,
    quiet: bool,
) -> Result<Engine> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(LmError::Config(format!("{shown}: no such file or folder")));
    }
    let f = mlx_native::weights::gguf::GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_vocab(&crate::tokenizer::VocabSpec::from_gguf(&f)?)?;
    let template = f
        .get_opt::<&str>("tokenizer.chat_template")?
        .map(str::to_string);
    let model = crate::models::gguf::load(gpu, &f, quiet)?;
    Engine::with_template(model, tokenizer, template.as_deref())
}

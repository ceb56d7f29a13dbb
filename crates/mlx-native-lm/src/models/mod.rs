//! Architectures. Every family here is a decoder-only transformer built from `layers/`; what
//! differs is the tensor-name table, the norms around each block, the activation, RoPE style
//! and embedding scale, all carried by `ModelConfig`.

pub mod gguf;
pub mod mlx;

use mlx_native::kv_cache::KvCacheConfig;
use mlx_native::kv_quant::{KvFormat, KvStore};
use mlx_native::ops::{self, NormOut, QuantizedX, RopeTable};
use mlx_native::{DType, MlxBuffer, MlxDevice, Pass};

use crate::config::ModelConfig;
use crate::error::{LmError, Result};
use crate::layers::attention::Step;
use crate::layers::decoder::LayerLink;
use crate::layers::{DecoderLayer, Linear};

/// What a model path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// A GGUF file.
    Gguf,
    /// An mlx-lm (HF layout) folder: the folder itself.
    MlxFolder(std::path::PathBuf),
}

/// Decide by content: a file starting with `GGUF` is GGUF; a folder with `config.json` (or a
/// `config.json` / `*.safetensors` file inside one) is an mlx-lm folder.
pub fn model_format(path: &std::path::Path) -> Result<ModelFormat> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| LmError::Io {
        path: shown.clone(),
        source,
    })?;
    if meta.is_dir() {
        if path.join("config.json").exists() {
            return Ok(ModelFormat::MlxFolder(path.to_path_buf()));
        }
        return Err(LmError::Config(format!(
            "{shown}: not a model folder (no config.json); expected a GGUF file or an mlx-lm folder"
        )));
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut magic))
        .map_err(|source| LmError::Io {
            path: shown.clone(),
            source,
        })?;
    if n == 4 && &magic == b"GGUF" {
        return Ok(ModelFormat::Gguf);
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name == "config.json" || name.ends_with(".safetensors") {
        if let Some(dir) = path.parent().filter(|d| d.join("config.json").exists()) {
            return Ok(ModelFormat::MlxFolder(dir.to_path_buf()));
        }
    }
    Err(LmError::Config(format!(
        "{shown}: not a GGUF file (no GGUF magic) and not in an mlx-lm folder"
    )))
}

/// Load a GGUF file or an mlx-lm folder (see [`model_format`]), with a progress bar on
/// stderr.
pub fn load_any(gpu: &MlxDevice, path: &std::path::Path) -> Result<Transformer> {
    match model_format(path)? {
        ModelFormat::Gguf => gguf::load(
            gpu,
            &mlx_native::weights::gguf::GgufFile::open(path)?,
            false,
        ),
        ModelFormat::MlxFolder(dir) => mlx::load_dir(gpu, &dir, false),
    }
}

/// Most tokens one prefill dispatch sequence takes (the KV cache's chunk size).
pub const PREFILL_CHUNK: usize = 512;

/// A loaded model on the GPU.
pub struct Transformer {
    pub cfg: ModelConfig,
    pub gpu: MlxDevice,
    pub embed: Linear,
    pub layers: Vec<DecoderLayer>,
    pub norm: MlxBuffer,
    /// `None` when tied to the embeddings.
    pub head: Option<Linear>,
    /// RoPE tables: `[global]` or `[global, local]`; layers index them.
    pub ropes: Vec<RopeTable>,
}

impl Transformer {
    /// An f16 KV cache for `ctx` positions (sliding-window layers get rings).
    pub fn new_cache(&self, ctx: usize) -> Result<KvStore> {
        self.new_cache_with(ctx, KvFormat::F16)
    }

    /// A KV cache for `ctx` positions in `format` (f16, f32, q8, q4, tq4, tq3, tq2.5, tq2).
    pub fn new_cache_with(&self, ctx: usize, format: KvFormat) -> Result<KvStore> {
        let mut cfg = KvCacheConfig::new(
            self.cfg.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            ctx,
        );
        cfg.dtype = DType::F16;
        cfg.max_chunk = PREFILL_CHUNK.min(ctx);
        cfg.windows = self.layers.iter().map(|l| l.attn.window).collect();
        Ok(KvStore::new(&self.gpu, &cfg, format)?)
    }

    /// Record the forward pass of `tokens` at positions `pos0..`; returns the logits of the
    /// last token, f32 `[1, vocab]`. `tokens.len()` must not exceed `PREFILL_CHUNK`.
    pub fn forward(
        &self,
        pass: &mut Pass,
        tokens: &[u32],
        pos0: usize,
        cache: &mut KvStore,
    ) -> Result<MlxBuffer> {
        self.forward_rows(pass, tokens, pos0, cache, false)
    }

    /// Like [`Transformer::forward`] but returns the logits of every token, `[T, vocab]`
    /// (scoring, perplexity, KV-cache quality).
    pub fn forward_all(
        &self,
        pass: &mut Pass,
        tokens: &[u32],
        pos0: usize,
        cache: &mut KvStore,
    ) -> Result<MlxBuffer> {
        self.forward_rows(pass, tokens, pos0, cache, true)
    }

    fn forward_rows(
        &self,
        pass: &mut Pass,
        tokens: &[u32],
        pos0: usize,
        cache: &mut KvStore,
        all_rows: bool,
    ) -> Result<MlxBuffer> {
        let t = tokens.len();
        if t == 0 || t > PREFILL_CHUNK {
            return Err(LmError::Invalid(format!(
                "forward: {t} tokens in one step, expected 1..={PREFILL_CHUNK}"
            )));
        }
        // Pooled, so that decode reuses the same small buffer every token (and the bind
        // group of the embedding dispatch that names it). Safe: the pass holds it until it is
        // submitted, and a queued write lands after all earlier submissions.
        let ids = MlxBuffer::pooled(&self.gpu, DType::U32, &[t])?;
        ids.write(&self.gpu, tokens)?;
        let (x, xq) = self.hidden_states(pass, &ids, None, pos0, cache)?;
        if all_rows {
            return self.logits_of(pass, &x, None);
        }
        let rows = x.view((t - 1) * self.cfg.hidden, &[1, self.cfg.hidden])?;
        self.logits_of(pass, &rows, xq.as_ref())
    }

    /// The final norm and the LM head over hidden-state rows `[R, hidden]`. One row (decode)
    /// goes to an MLX-quantized head quantized by the norm, as the layers do
    /// (`Folding::quantized_x`), or by the last layer's down with the norm pending (`xq`).
    fn logits_of(
        &self,
        pass: &mut Pass,
        rows: &MlxBuffer,
        xq: Option<&QuantizedX>,
    ) -> Result<MlxBuffer> {
        let head = self.head.as_ref().unwrap_or(&self.embed);
        if let Some(q) = xq {
            return head.forward_xq(pass, q, None);
        }
        let quantized_x = self.layers.first().is_some_and(|l| l.fold.quantized_x);
        let form = head.xq_form().filter(|_| quantized_x);
        if let (Some(form), [1, _]) = (form, rows.shape()) {
            let hq = ops::rms_norm_xq(pass, rows, &self.norm, self.cfg.norm_eps, form)?;
            return head.forward_xq(pass, &hq, None);
        }
        let h = ops::rms_norm(pass, rows, &self.norm, self.cfg.norm_eps)?;
        head.forward(pass, &h)
    }

    /// Like [`Transformer::forward`] for tokens whose ids are already on the GPU (`ids`, u32
    /// `[T]`, e.g. the previous step's sampled id): a decode step can then be recorded and
    /// submitted before the host has read that id back.
    pub fn forward_ids(
        &self,
        pass: &mut Pass,
        ids: &MlxBuffer,
        pos0: usize,
        cache: &mut KvStore,
    ) -> Result<MlxBuffer> {
        let t = ids.len();
        if ids.dtype() != DType::U32 || t == 0 || t > PREFILL_CHUNK {
            return Err(LmError::Invalid(format!(
                "forward_ids: ids are {} {:?}, expected u32 with 1..={PREFILL_CHUNK} elements",
                ids.dtype(),
                ids.shape()
            )));
        }
        let ids = ids.reshape(&[t])?;
        let (x, xq) = self.hidden_states(pass, &ids, None, pos0, cache)?;
        self.logits_of(
            pass,
            &x.view((t - 1) * self.cfg.hidden, &[1, self.cfg.hidden])?,
            xq.as_ref(),
        )
    }

    /// One decode step of the token id in `ids` (u32 `[1]`, on the GPU) at position `pos`,
    /// whose value the caller has written into `positions` (u32 `[1]`): a step kept for
    /// replay ([`crate::replay::DecodeLoop`]) reads both from buffers it owns. Returns the
    /// logits `[1, vocab]`.
    pub fn forward_token_at(
        &self,
        pass: &mut Pass,
        ids: &MlxBuffer,
        positions: &MlxBuffer,
        pos: usize,
        cache: &mut KvStore,
    ) -> Result<MlxBuffer> {
        for (b, name) in [(ids, "ids"), (positions, "positions")] {
            if b.dtype() != DType::U32 || b.len() != 1 {
                return Err(LmError::Invalid(format!(
                    "forward_token_at: {name} is {} {:?}, expected u32 [1]",
                    b.dtype(),
                    b.shape()
                )));
            }
        }
        let ids = ids.reshape(&[1])?;
        let (x, xq) = self.hidden_states(pass, &ids, Some(positions), pos, cache)?;
        self.logits_of(pass, &x, xq.as_ref())
    }

    /// The final norm as the last layer's down may write its matvec's input at decode
    /// ([`Folding::norm_out`](crate::layers::decoder::Folding)): the LM head's form.
    fn final_norm_out(&self) -> Option<NormOut<'_>> {
        let last = self.layers.last()?;
        if !(last.fold.norm_out && last.fold.quantized_x) {
            return None;
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        Some(NormOut {
            weight: &self.norm,
            eps: self.cfg.norm_eps,
            form: head.xq_form()?,
        })
    }

    /// Embedding and every layer for `ids` at positions `pos0..`: the last hidden states
    /// `[T, hidden]`, before the final norm, and at decode the LM head's input where the
    /// last layer wrote it (the final norm pending).
    /// `positions`: the tokens' positions already on the GPU (else written here).
    fn hidden_states(
        &self,
        pass: &mut Pass,
        ids: &MlxBuffer,
        positions: Option<&MlxBuffer>,
        pos0: usize,
        cache: &mut KvStore,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let t = ids.len();
        let end = pos0 + t;
        if end > cache.capacity()
            && cache.layers() > 0
            && self.layers.iter().any(|l| l.attn.window.is_none())
        {
            return Err(LmError::Invalid(format!(
                "context overflow: positions up to {end} do not fit the context size {}",
                cache.capacity()
            )));
        }
        let pos_buf = match positions {
            Some(p) => p.clone(),
            None => {
                // Written here from the host: a replay would not write them again.
                pass.refuse_replay("a forward pass whose positions are written at record time");
                let positions: Vec<u32> = (pos0..end).map(|p| p as u32).collect();
                let b = MlxBuffer::pooled(&self.gpu, DType::U32, &[t])?;
                b.write(&self.gpu, &positions)?;
                b
            }
        };
        let mut x = self.embed.gather(pass, ids)?;
        if let Some(s) = self.cfg.embed_scale {
            x = ops::scale(pass, &x, s)?;
        }
        let step = Step {
            positions: &pos_buf,
            pos0,
            tokens: t,
        };
        // At decode each layer may write the next one's q|k|v input (or the head's) with
        // the norm pending, and the next reads it.
        let mut xq: Option<QuantizedX> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let next = match self.layers.get(i + 1) {
                Some(l) => l.input_norm_out(),
                None => self.final_norm_out(),
            };
            let link = LayerLink {
                xq_in: xq.as_ref(),
                next: next.filter(|_| t == 1),
            };
            let (nx, nq) = layer.forward_step(pass, &x, &link, &step, &self.ropes, cache, i)?;
            x = nx;
            xq = nq;
        }
        Ok((x, xq))
    }

    /// Logits of the last token of `tokens`, run from position 0 in a fresh cache (tests,
    /// scoring).
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(tokens.len().max(1))?;
        let mut out = None;
        for (c, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let mut pass = self.gpu.begin();
            let l = self.forward(&mut pass, chunk, c * PREFILL_CHUNK, &mut cache)?;
            pass.commit()?;
            out = Some(l);
        }
        let l = out.ok_or_else(|| LmError::Invalid("logits: no tokens".into()))?;
        Ok(l.to_vec::<f32>(&self.gpu)?)
    }
}

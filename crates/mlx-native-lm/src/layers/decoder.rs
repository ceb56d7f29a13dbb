//! One transformer block: pre-norm attention and MLP with residual adds; Gemma 3 adds a norm
//! after each of them (four norms per layer).

use mlx_native::kv_quant::KvStore;
use mlx_native::ops::{self, NormOut, QuantizedX, RopeTable};
use mlx_native::{MlxBuffer, Pass};

use super::attention::{BlockInput, Step};
use super::mlp::{Ffn, FfnInput, MoeFold};
use super::Attention;
use crate::error::Result;

/// Measurement only (timing, wrong results): `bits & 1` reuses the first pre-norm's
/// quantized output instead of dispatching the later ones, `bits & 2` the first GLU's: what
/// those dispatches cost inside a decode pass, the bound of folding them away (overstated:
/// the matvec after then no longer waits on the one before). `bits & 4`: o reads the
/// attention output as chunks; `bits & 8`: no RoPE and cache append ([`bound_bit`]).
#[doc(hidden)]
pub fn set_bound_skip(bits: u32) {
    BOUND_SKIP.store(bits, std::sync::atomic::Ordering::Relaxed);
    ops::kv::set_rope_append_skip(bits & 8 != 0);
    if let Ok(mut s) = BOUND_STASH.lock() {
        *s = [None, None, None];
    }
}
static BOUND_SKIP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static BOUND_STASH: std::sync::Mutex<[Option<ops::QuantizedX>; 3]> =
    std::sync::Mutex::new([None, None, None]);

/// Whether [`set_bound_skip`] has `bit` (4: o reads the attention output as chunks; 8:
/// no RoPE + cache append, `ops::kv::set_rope_append_skip`).
pub(crate) fn bound_bit(bit: u32) -> bool {
    BOUND_SKIP.load(std::sync::atomic::Ordering::Relaxed) & bit != 0
}

/// `make()`, or under [`set_bound_skip`]'s `bit` the stashed first result (slot `slot`).
pub(crate) fn bound_reuse(
    bit: u32,
    slot: usize,
    make: impl FnOnce() -> Result<ops::QuantizedX>,
) -> Result<ops::QuantizedX> {
    if BOUND_SKIP.load(std::sync::atomic::Ordering::Relaxed) & bit == 0 {
        return make();
    }
    if let Some(q) = BOUND_STASH.lock().ok().and_then(|s| s[slot].clone()) {
        return Ok(q);
    }
    let q = make()?;
    if let Ok(mut s) = BOUND_STASH.lock() {
        s[slot] = Some(q.clone());
    }
    Ok(q)
}

/// Which of a decode step's small ops ride in the matvecs (`ops::qmv_fused`) instead of
/// running as their own dispatches. Each saves a dispatch and the barrier before it, but
/// lengthens the matvec: the norm and the GLU are recomputed by every row-set of the matvec
/// (each re-reads the norm weight beside x; the GLU's exponentials, 2 per element per
/// row-set, are special-function work). docs/PERFORMANCE.md has what each measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Folding {
    /// The residual adds into o's and down's matvecs.
    pub residual: bool,
    /// The GLU into the down matvec's input.
    pub glu: bool,
    /// The pre-norms into the q|k|v and gate|up matvecs.
    pub norms: bool,
    /// A pre-norm into a matvec of at most [`SMALL_NORM_FOLD`] weights only, where the
    /// repeated norm work costs less than the dispatch it saves.
    pub small_norms: bool,
    /// RoPE (with the q/k norms) and the KV-cache append in one dispatch after the stacked
    /// q|k|v matvec (`ops::kv::rope_append`), not a matvec fold but the same kind of saving.
    pub rope_append: bool,
    /// The norms before q|k|v, gate|up, the MoE experts and the LM head and the GLUs before
    /// down (where they are their own dispatches) write their output quantized for the
    /// matvecs after them (`ops::rms_norm_xq`, `rms_norm_and_xq`, `glu_split_xq`,
    /// `glu_xq`), which otherwise quantize each x chunk again in every row-set. Not a fold
    /// (no dispatch saved) but the matvecs' own work.
    pub quantized_x: bool,
    /// The pre-norms of a Llama-style layer split across the boundary (needs `quantized_x`
    /// and `residual`): o and down write the residual stream and also the next matvec's
    /// quantized input before the norm's 1/rms (`ops::qmv_norm_out`), which that matvec
    /// applies; the norm dispatches go. Across layers too: the model passes each layer
    /// the next one's norm ([`LayerLink`]).
    pub norm_out: bool,
    /// The GLU applied by the stacked gate|up matvec to its own rows (needs `quantized_x`):
    /// each workgroup takes 32 gate rows and the same 32 up rows and writes down's input
    /// quantized (`ops::qmv_glu_out`); the GLU's dispatch goes.
    pub glu_out: bool,
    /// The decode attention writes its output quantized for o (needs `quantized_x`; plain
    /// caches, head dims of whole chunks: `KvStore::sdpa_decode_xq`), which then quantizes
    /// no x in its row-sets.
    pub o_xq: bool,
    /// An MoE layer's down experts and their weighted sum, with the residual, in one
    /// dispatch (needs `quantized_x` and `residual`; `ops::moe::gather_qmv_xq_combine`): the
    /// combine's dispatch goes.
    pub moe_combine: bool,
    /// An MoE layer's FFN norm split across o (needs `norm_out`'s conditions and
    /// `moe_combine`): o writes the experts' quantized input with the norm pending, which
    /// the routed matvecs finish, and the router folds the norm into its f32 matvec; the
    /// norm's dispatch goes.
    pub moe_norm_out: bool,
    /// An MoE layer's GLU applied by the stacked gate|up experts to their own rows (needs
    /// `moe_combine`; `ops::moe::gather_qmv_xq_glu`): the GLU's dispatch goes.
    pub moe_glu_out: bool,
}

impl Folding {
    pub const NONE: Folding = Folding {
        residual: false,
        glu: false,
        norms: false,
        small_norms: false,
        rope_append: false,
        quantized_x: false,
        norm_out: false,
        glu_out: false,
        o_xq: false,
        moe_combine: false,
        moe_norm_out: false,
        moe_glu_out: false,
    };
    pub const ALL: Folding = Folding {
        residual: true,
        glu: true,
        norms: true,
        small_norms: true,
        rope_append: true,
        quantized_x: true,
        norm_out: true,
        glu_out: true,
        o_xq: true,
        moe_combine: true,
        moe_norm_out: true,
        moe_glu_out: true,
    };
    /// What the loaders use: the folds that measured faster (docs/PERFORMANCE.md). With
    /// qmv's 16-bit x, `small_norms` gains 97 us a token on Qwen3-30B-A3B and 75 on
    /// Gemma-3-4B and is neutral on Llama-3.1-8B (before it, with f32 x: +479 on Gemma);
    /// every norm folded still loses 353 us on Llama, the GLU 297. Quantized x from the
    /// producers (session 7, H200): Llama-3.1-8B 3326 -> 3171 us a token, Gemma-3-4B 3389
    /// -> 3223, Qwen3-30B-A3B (the MoE experts' input) 3809 -> 3629. Session 8 (H200,
    /// `decode_ab`): `norm_out` Llama 3196 -> 2997, with `glu_out` 3177 -> 2951, Gemma's
    /// post-norms 2889 -> 2544, `o_xq` Llama 2679 -> 2585; the session's start and end
    /// alternated in `bench decode`: Llama 3269 -> 2671, Gemma 3231 -> 2532.
    pub const DEFAULT: Folding = Folding {
        residual: true,
        glu: false,
        norms: false,
        small_norms: true,
        rope_append: true,
        quantized_x: true,
        norm_out: true,
        glu_out: true,
        o_xq: true,
        moe_combine: true,
        moe_norm_out: true,
        moe_glu_out: true,
    };

    fn any(self) -> bool {
        self.residual
            || self.glu
            || self.norms
            || self.small_norms
            || self.quantized_x
            || self.norm_out
            || self.glu_out
            || self.o_xq
            || self.moe_combine
            || self.moe_norm_out
            || self.moe_glu_out
    }

    /// Whether to fold a pre-norm into a matvec of `shape` ([N, K]).
    fn norm_into(self, shape: [usize; 2]) -> bool {
        self.norms || (self.small_norms && shape[0] * shape[1] <= SMALL_NORM_FOLD)
    }
}

/// Weights (N x K) up to which [`Folding::small_norms`] folds a pre-norm into the matvec.
/// The fold makes each of the matvec's row-sets re-read the norm weight and square x (K
/// elements each), against one dispatch saved (~3–5 us on an H200). With f32 x (session 3)
/// it measured a gain at Qwen3-30B-A3B's q|k|v (5120 x 2048), a loss at Llama-3.1-8B's
/// (6144 x 4096, +5 us) and gate|up (28672 x 4096, +19 us) and at Gemma-3-4B's q|k|v
/// (4096 x 2560, +14 us a layer); with 16-bit x (fewer, longer row-sets, the multiply
/// before the quantization) a gain on Qwen3 and Gemma, and still a loss from Llama's sizes
/// (every norm folded: +353 us a token) (docs/PERFORMANCE.md).
pub const SMALL_NORM_FOLD: usize = 16 << 20;

impl Default for Folding {
    fn default() -> Self {
        Folding::DEFAULT
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub attn_norm: MlxBuffer,
    pub attn: Attention,
    pub post_attn_norm: Option<MlxBuffer>,
    pub ffn_norm: MlxBuffer,
    pub mlp: Ffn,
    pub post_ffn_norm: Option<MlxBuffer>,
    pub eps: f32,
    /// Index into the model's RoPE tables (global or local).
    pub rope: usize,
    /// At decode with MLX-quantized stacked projections, which small ops ride in the
    /// matvecs ([`DecoderLayer::forward_folded`]).
    pub fold: Folding,
}

/// What passes between decode layers besides the residual stream ([`Folding::norm_out`]).
#[derive(Default)]
pub struct LayerLink<'a> {
    /// This layer's input, normed and quantized for its q|k|v but for the norm's 1/rms
    /// (written by the layer before: [`DecoderLayer::input_norm_out`]).
    pub xq_in: Option<&'a QuantizedX>,
    /// The RMS norm after this layer (the next layer's input norm, or the model's final
    /// norm) and the form its matvec reads: down writes that input where it can.
    pub next: Option<NormOut<'a>>,
}

impl DecoderLayer {
    /// `x [T, hidden]` (the residual stream) -> the new residual stream.
    pub fn forward(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        step: &Step<'_>,
        ropes: &[RopeTable],
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<MlxBuffer> {
        let link = LayerLink::default();
        Ok(self
            .forward_step(pass, x, &link, step, ropes, cache, layer)?
            .0)
    }

    /// What the layer before should write for this layer's q|k|v at decode, if this layer
    /// reads it ([`Folding::norm_out`]): its input norm, and the q|k|v matvec's form.
    pub fn input_norm_out(&self) -> Option<NormOut<'_>> {
        let f = self.fold;
        if !(f.norm_out && f.quantized_x && self.attn.folds_norm()) {
            return None;
        }
        let form = self.attn.qkv.as_ref().and_then(|(w, _)| w.xq_form())?;
        Some(NormOut {
            weight: &self.attn_norm,
            eps: self.eps,
            form,
        })
    }

    /// [`DecoderLayer::forward`] with what passes between decode layers (`link`): returns
    /// the new residual stream and, where down wrote it, the input of `link.next`'s matvec.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_step(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        link: &LayerLink<'_>,
        step: &Step<'_>,
        ropes: &[RopeTable],
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let rope = ropes.get(self.rope).ok_or_else(|| {
            crate::LmError::Config(format!("layer {layer}: no RoPE table {}", self.rope))
        })?;
        if self.fold.any() && step.tokens == 1 && self.attn.folds_norm() {
            return self.forward_folded(pass, x, link, step, rope, cache, layer);
        }
        let h = ops::rms_norm(pass, x, &self.attn_norm, self.eps)?;
        let input = BlockInput {
            rope_append: self.fold.rope_append,
            ..BlockInput::plain(&h)
        };
        let mut a = self.attn.forward(pass, &input, step, rope, cache, layer)?;
        if let Some(n) = &self.post_attn_norm {
            a = ops::rms_norm(pass, &a, n, self.eps)?;
        }
        // Residual add fused into the MLP's pre-norm.
        let (x, h) = ops::rms_norm_residual(pass, x, &a, &self.ffn_norm, self.eps)?;
        let mut m = self.mlp.forward(pass, &h)?;
        if let Some(n) = &self.post_ffn_norm {
            m = ops::rms_norm(pass, &m, n, self.eps)?;
        }
        Ok((ops::add(pass, &x, &m)?, None))
    }

    /// Decode with MLX-quantized stacked projections, with the folds of `self.fold`
    /// (`ops::qmv_fused`). Gemma's post-norms sit between a matvec and its residual add, so
    /// those adds stay separate; an MoE FFN keeps its own norm and add.
    #[allow(clippy::too_many_arguments)]
    fn forward_folded(
        &self,
        pass: &mut Pass,
        x: &MlxBuffer,
        link: &LayerLink<'_>,
        step: &Step<'_>,
        rope: &RopeTable,
        cache: &mut KvStore,
        layer: usize,
    ) -> Result<(MlxBuffer, Option<QuantizedX>)> {
        let f = self.fold;
        let eps = self.eps;
        let fold_attn_residual = f.residual && self.post_attn_norm.is_none();
        // The attention's input: quantized by the layer before with the norm pending; raw
        // with the norm folded into q|k|v; or normed here, into the quantized x that q|k|v
        // reads where it takes one.
        let qkv_form = (self.attn.qkv.as_ref())
            .and_then(|(w, _)| w.xq_form())
            .filter(|_| f.quantized_x);
        let pending = link.xq_in.filter(|q| Some(q.form()) == qkv_form);
        let attn_norm = pending.is_none()
            && (self.attn.qkv.as_ref()).is_some_and(|(w, _)| f.norm_into(w.shape()));
        let (normed, normed_q);
        let mut xq = None;
        let xin = if let Some(q) = pending {
            xq = Some(q);
            x
        } else if attn_norm {
            x
        } else if let Some(form) = qkv_form {
            normed_q = bound_reuse(1, 0, || {
                Ok(ops::rms_norm_xq(pass, x, &self.attn_norm, eps, form)?)
            })?;
            xq = Some(&normed_q);
            x
        } else {
            normed = ops::rms_norm(pass, x, &self.attn_norm, eps)?;
            &normed
        };
        let dense = match &self.mlp {
            Ffn::Dense(m) if m.folds() => Some(m),
            _ => None,
        };
        let fold_ffn_residual = f.residual && self.post_ffn_norm.is_none();
        let gate_up_form = dense
            .and_then(|m| m.gate_up.as_ref())
            .and_then(|w| w.xq_form())
            .filter(|_| f.quantized_x);
        // The FFN norm folded into gate|up: every norm (`norms`), or a small gate|up's
        // (`small_norms`) unless o writes gate|up's input (`norm_out`, no norm work in
        // gate|up's row-sets).
        let o_writes = gate_up_form.is_some() && f.norm_out && fold_attn_residual;
        let ffn_norm = (dense.and_then(|m| m.gate_up.as_ref()))
            .is_some_and(|w| f.norms || (!o_writes && f.norm_into(w.shape())));
        let moe_form = match &self.mlp {
            Ffn::Moe(moe) => moe.xq_form().filter(|_| f.quantized_x && fold_ffn_residual),
            Ffn::Dense(_) => None,
        };
        // o writes gate|up's (or the experts') input with the FFN norm pending, where it can.
        let moe_o_writes = f.moe_norm_out && f.moe_combine && f.norm_out && fold_attn_residual;
        let o_norm_out = (gate_up_form.filter(|_| o_writes && !ffn_norm))
            .or(moe_form.filter(|_| moe_o_writes))
            .map(|form| NormOut {
                weight: &self.ffn_norm,
                eps,
                form,
            });
        let input = BlockInput {
            x: xin,
            norm: attn_norm.then_some((&self.attn_norm, eps)),
            residual: fold_attn_residual.then_some(x),
            rope_append: f.rope_append,
            xq,
            norm_out: o_norm_out,
            o_xq: f.o_xq && f.quantized_x,
        };
        let (a, aq) = self
            .attn
            .forward_out(pass, &input, step, rope, cache, layer)?;
        // The new residual stream x, and the FFN's input: quantized by o, normalized here
        // (into the quantized x that a dense gate|up reads where it takes one), or raw with
        // the norm folded into gate|up.
        let (x, h, norm, hq) = if fold_attn_residual {
            if let Some(q) = aq {
                (a.clone(), a, None, Some(q))
            } else if ffn_norm {
                (a.clone(), a, Some((&self.ffn_norm, eps)), None)
            } else if let Some(form) = moe_form {
                // The router reads f32, the experts the quantized rows.
                let (h, hq) = ops::rms_norm_and_xq(pass, &a, &self.ffn_norm, eps, form)?;
                (a, h, None, Some(hq))
            } else if let Some(form) = gate_up_form {
                let hq = bound_reuse(1, 1, || {
                    Ok(ops::rms_norm_xq(pass, &a, &self.ffn_norm, eps, form)?)
                })?;
                (a.clone(), a, None, Some(hq))
            } else {
                let h = ops::rms_norm(pass, &a, &self.ffn_norm, eps)?;
                (a, h, None, None)
            }
        } else if let (Some(pn), Some(form), true) =
            (&self.post_attn_norm, gate_up_form, f.norm_out)
        {
            // Gemma: the post-norm, the residual add and the FFN norm in one dispatch.
            let post = (pn, eps);
            let (x, hq) =
                ops::rms_norm_post_residual_xq(pass, x, &a, post, &self.ffn_norm, eps, form)?;
            (x.clone(), x, None, Some(hq))
        } else {
            let a = match &self.post_attn_norm {
                Some(n) => ops::rms_norm(pass, &a, n, eps)?,
                None => a,
            };
            if let Some(form) = gate_up_form {
                let (x, hq) = ops::rms_norm_residual_xq(pass, x, &a, &self.ffn_norm, eps, form)?;
                (x.clone(), x, None, Some(hq))
            } else {
                let (x, h) = ops::rms_norm_residual(pass, x, &a, &self.ffn_norm, eps)?;
                (x, h, None, None)
            }
        };
        let m = match dense {
            Some(mlp) => {
                let residual = fold_ffn_residual.then_some(&x);
                let input = match &hq {
                    Some(q) => FfnInput::Quantized(q),
                    None => FfnInput::F32(&h),
                };
                // down writes the next norm's matvec input where it is the residual stream.
                let next = link
                    .next
                    .as_ref()
                    .filter(|_| f.norm_out && fold_ffn_residual);
                let (m, mq) = mlp.forward_fused(pass, input, norm, f, residual, next)?;
                if fold_ffn_residual {
                    return Ok((m, mq));
                }
                m
            }
            None => match &self.mlp {
                // The residual rides in the experts' weighted sum.
                Ffn::Moe(moe) if fold_ffn_residual => {
                    if let (Some(q), true) = (&hq, f.moe_combine) {
                        // Chunks from o carry the FFN norm pending; the router folds it.
                        let fold = MoeFold {
                            norm: q.pending_norm().map(|_| (&self.ffn_norm, eps)),
                            glu_out: f.moe_glu_out,
                        };
                        // x (o's output, read by nothing after this) takes the sum in place.
                        moe.forward_into(pass, &h, q, &x, fold)?;
                        return Ok((x, None));
                    }
                    if hq.as_ref().is_some_and(|q| q.pending_norm().is_some()) {
                        return Err(crate::LmError::Invalid(format!(
                            "layer {layer}: the experts' input has its norm pending, which \
                             only the fused down-and-combine path finishes"
                        )));
                    }
                    return Ok((moe.forward_with(pass, &h, hq.as_ref(), Some(&x))?, None));
                }
                ffn => ffn.forward(pass, &h)?,
            },
        };
        // Gemma: the post-norm, the residual add and the next norm (the next layer's or the
        // final one) in one dispatch, writing the next matvec's input.
        if let (Some(pn), Some(next), true) = (&self.post_ffn_norm, &link.next, f.norm_out) {
            let post = (pn, eps);
            let (h, q) = ops::rms_norm_post_residual_xq(
                pass,
                &x,
                &m,
                post,
                next.weight,
                next.eps,
                next.form,
            )?;
            return Ok((h, Some(q)));
        }
        let m = match &self.post_ffn_norm {
            Some(n) => ops::rms_norm(pass, &m, n, eps)?,
            None => m,
        };
        Ok((ops::add(pass, &x, &m)?, None))
    }
}

//! Elementwise activations on f32 activations: `gelu` (tanh or erf), `silu`, `softcap`, and
//! the gated products of GLU feed-forward blocks: `glu` (separate gate and up tensors) and
//! `glu_split` (one fused `[.., 2n]` gate_up projection; `glu_split_xq` quantizes its output
//! for the decode matvec). Finite inputs never give NaN or infinity: see the header of
//! `shaders/activation.wgsl`.

use crate::buffer::MlxBuffer;
use crate::check;
use crate::dtype::DType;
use crate::encoder::Pass;
use crate::error::Result;
use crate::kernels::{Kernel, Spec};
use crate::ops::qmatmul::{QuantizedX, XqForm};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ActivationParams {
    n: u32,
    half: u32,
    cap: f32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<ActivationParams>() == 16);

const WG: u32 = 256;

/// Which formula `gelu` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GeluApprox {
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`: MLX `nn.gelu_approx`, PyTorch
    /// `gelu(approximate="tanh")` (Gemma's `gelu_pytorch_tanh`).
    Tanh,
    /// `0.5 x (1 + erf(x / sqrt(2)))`: the exact GELU, MLX `nn.gelu`.
    Erf,
}

/// The activation applied to the gate of a GLU product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    /// `x * sigmoid(x)` (SwiGLU: Llama, Qwen, Mistral, Phi-3).
    Silu,
    /// GELU, tanh approximation (GeGLU of Gemma).
    GeluTanh,
    /// GELU with erf.
    GeluErf,
}

impl Act {
    /// The `ACT` override of `activation.wgsl`.
    pub(crate) const fn code(self) -> u32 {
        match self {
            Act::Silu => 0,
            Act::GeluTanh => 1,
            Act::GeluErf => 2,
        }
    }
}

pub(crate) const ACTS: [Act; 3] = [Act::Silu, Act::GeluTanh, Act::GeluErf];

/// Whether the quantizing entries (and the norms' quantized output) may take the subgroup
/// path: subgroups of at least 4 (a chunk's parts are four lanes), no wider than `wg`.
pub(crate) fn xq_subgroups(caps: &crate::device::Caps, wg: u32) -> bool {
    caps.subgroups
        && caps.subgroup_min_size >= 4
        && caps.subgroup_max_size <= wg
        && caps.subgroup_min_size.is_power_of_two()
}

/// Workgroup size of the quantizing entries (four invocations a 32-element chunk): small,
/// so that a decode row's few hundred chunks spread over many SMs.
const XQ_WG: u32 = 64;

/// `sg`: a chunk's four parts exchange through subgroup shuffles (subgroups of 4 to XQ_WG
/// invocations, [`xq_subgroups`]) instead of workgroup memory and barriers.
/// What `quantize_chunks` quantizes (its XQ_GLU).
#[derive(Clone, Copy)]
enum ChunkSource {
    /// x itself.
    X,
    /// glu_split's output: x is [rows, 2 * half].
    GluSplit(Act),
    /// glu's: act(gate) * up, both [rows, half].
    Glu(Act),
}

fn xq_spec(src: ChunkSource, form: u32, sg: bool) -> Result<Spec> {
    let s = Spec::new("quantize_chunks", DType::F32, XQ_WG).with_subgroups(sg);
    let s = match src {
        ChunkSource::X => s,
        ChunkSource::GluSplit(a) => s.with_const("ACT", a.code())?.with_const("XQ_GLU", 1)?,
        ChunkSource::Glu(a) => s.with_const("ACT", a.code())?.with_const("XQ_GLU", 2)?,
    };
    s.with_const("XQ_OUT", form)
}

fn spec(entry: &'static str, act: Option<Act>) -> Result<Spec> {
    let s = Spec::new(entry, DType::F32, WG);
    match act {
        Some(a) => s.with_const("ACT", a.code()),
        None => Ok(s),
    }
}

pub(crate) fn specs() -> Result<Vec<(Kernel, Spec)>> {
    let mut v = Vec::new();
    for entry in ["unary", "glu", "glu_split"] {
        for a in ACTS {
            v.push((Kernel::Activation, spec(entry, Some(a))?));
        }
    }
    v.push((Kernel::Activation, spec("softcap", None)?));
    for form in super::qmatmul::XQ_FORM_CODES {
        for sg in [false, true] {
            v.push((Kernel::Activation, xq_spec(ChunkSource::X, form, sg)?));
            for a in ACTS {
                for src in [ChunkSource::GluSplit(a), ChunkSource::Glu(a)] {
                    v.push((Kernel::Activation, xq_spec(src, form, sg)?));
                }
            }
        }
    }
    Ok(v)
}

/// Dispatch one entry over `n_out` outputs: binding 0 `a`, 1 `b`, 2 the output.
fn run(
    pass: &mut Pass,
    entry: &'static str,
    act: Option<Act>,
    [a, b]: [&MlxBuffer; 2],
    out_shape: &[usize],
    half: usize,
    cap: f32,
) -> Result<MlxBuffer> {
    let y = pass.alloc(DType::F32, out_shape)?;
    let n = check::fits_u32(y.len(), entry, "elements")?;
    let params = ActivationParams {
        n,
        half: half as u32,
        cap,
        _pad: 0,
    };
    pass.dispatch(
        Kernel::Activation,
        spec(entry, act)?,
        &params,
        &[a, b, &y],
        n.div_ceil(WG),
    )?;
    Ok(y)
}

fn unary(pass: &mut Pass, op: &'static str, x: &MlxBuffer, act: Act) -> Result<MlxBuffer> {
    check::dtype(x, &[DType::F32], op, "x")?;
    check::rows(x, op, "x")?;
    check::fits_u32(x.len(), op, "elements")?;
    // `up` is unused by the kernel; x fills its slot.
    run(pass, "unary", Some(act), [x, x], x.shape(), 0, 0.0)
}

/// GELU of f32 `x`, exact (erf) or with the tanh approximation.
pub fn gelu(pass: &mut Pass, x: &MlxBuffer, approx: GeluApprox) -> Result<MlxBuffer> {
    let act = match approx {
        GeluApprox::Tanh => Act::GeluTanh,
        GeluApprox::Erf => Act::GeluErf,
    };
    unary(pass, "gelu", x, act)
}

/// SiLU (swish) of f32 `x`: `x * sigmoid(x)`.
pub fn silu(pass: &mut Pass, x: &MlxBuffer) -> Result<MlxBuffer> {
    unary(pass, "silu", x, Act::Silu)
}

/// `act(gate) * up` for f32 `gate` and `up` of the same shape.
pub fn glu(pass: &mut Pass, gate: &MlxBuffer, up: &MlxBuffer, act: Act) -> Result<MlxBuffer> {
    let op = "glu";
    check::dtype(gate, &[DType::F32], op, "gate")?;
    check::dtype(up, &[DType::F32], op, "up")?;
    check::rows(gate, op, "gate")?;
    check::same_shape(gate, up, op, "gate", "up")?;
    check::fits_u32(gate.len(), op, "elements")?;
    run(pass, "glu", Some(act), [gate, up], gate.shape(), 0, 0.0)
}

/// `act(gate) * up` where f32 `x` is `[.., 2n]` holding `gate` in the first half and `up` in
/// the second half of each row (the order in which mlx-lm splits a fused `gate_up_proj`:
/// `gate, x = mx.split(x, 2, axis=-1)`; note MLX's `nn.GLU` is the other way round, gating
/// the first half with the second). Returns `[.., n]`.
pub fn glu_split(pass: &mut Pass, x: &MlxBuffer, act: Act) -> Result<MlxBuffer> {
    let op = "glu_split";
    check::dtype(x, &[DType::F32], op, "x")?;
    let (_, two_n) = check::rows(x, op, "x")?;
    check::ensure(two_n % 2 == 0, op, || {
        format!("x has last dimension {two_n}, expected an even size (gate and up halves)")
    })?;
    check::fits_u32(x.len(), op, "elements")?;
    let half = two_n / 2;
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = half;
    }
    run(pass, "glu_split", Some(act), [x, x], &shape, half, 0.0)
}

/// [`glu_split`] with its output quantized for the decode matvec of weights in `form`
/// (`ops::qmatmul::qmv_xq`); the half-row must be a multiple of 32.
pub fn glu_split_xq(pass: &mut Pass, x: &MlxBuffer, act: Act, form: XqForm) -> Result<QuantizedX> {
    let op = "glu_split_xq";
    check::dtype(x, &[DType::F32], op, "x")?;
    let (rows, two_n) = check::rows(x, op, "x")?;
    check::ensure(two_n % 2 == 0, op, || {
        format!("x has last dimension {two_n}, expected an even size (gate and up halves)")
    })?;
    check::fits_u32(x.len(), op, "elements")?;
    let half = two_n / 2;
    let q = QuantizedX::alloc(pass, op, rows, half, form)?;
    run_chunks(pass, ChunkSource::GluSplit(act), [x, x], &q, half)?;
    Ok(q)
}

/// [`glu`] with its output quantized for the decode matvec of weights in `form`: `gate` and
/// `up` f32 of one shape whose last dimension is a multiple of 32.
pub fn glu_xq(
    pass: &mut Pass,
    gate: &MlxBuffer,
    up: &MlxBuffer,
    act: Act,
    form: XqForm,
) -> Result<QuantizedX> {
    let op = "glu_xq";
    check::dtype(gate, &[DType::F32], op, "gate")?;
    check::dtype(up, &[DType::F32], op, "up")?;
    let (rows, n) = check::rows(gate, op, "gate")?;
    check::same_shape(gate, up, op, "gate", "up")?;
    let q = QuantizedX::alloc(pass, op, rows, n, form)?;
    run_chunks(pass, ChunkSource::Glu(act), [gate, up], &q, n)?;
    Ok(q)
}

/// f32 `x` `[rows, K]` quantized into `q` (`ops::qmatmul::quantize_x`).
pub(crate) fn quantize_chunks(pass: &mut Pass, x: &MlxBuffer, q: &QuantizedX) -> Result<()> {
    run_chunks(pass, ChunkSource::X, [x, x], q, q.k())
}

/// Dispatch `quantize_chunks` of `src`: four invocations per 32-element chunk of `q`'s
/// `half`-wide rows, the inputs in bindings 0 and 1, the chunks in binding 3.
fn run_chunks(
    pass: &mut Pass,
    src: ChunkSource,
    [x, up]: [&MlxBuffer; 2],
    q: &QuantizedX,
    half: usize,
) -> Result<()> {
    let n = check::fits_u32(q.rows() * q.k(), "quantize_chunks", "elements")?;
    let params = ActivationParams {
        n,
        half: half as u32,
        cap: 0.0,
        _pad: 0,
    };
    let sg = xq_subgroups(pass.caps(), XQ_WG);
    let spec = xq_spec(src, q.form().code(), sg)?;
    let out = q.buffer();
    pass.dispatch(
        Kernel::Activation,
        spec,
        &params,
        &[x, up, out, out],
        (n / 8).div_ceil(XQ_WG),
    )?;
    Ok(())
}

/// Soft-capping `cap * tanh(x / cap)` (Gemma 2 attention and final logits); `cap` must be
/// positive and finite.
pub fn softcap(pass: &mut Pass, x: &MlxBuffer, cap: f32) -> Result<MlxBuffer> {
    let op = "softcap";
    check::dtype(x, &[DType::F32], op, "x")?;
    check::rows(x, op, "x")?;
    check::ensure(cap.is_finite() && cap > 0.0, op, || {
        format!("cap is {cap}, expected a positive finite value")
    })?;
    check::fits_u32(x.len(), op, "elements")?;
    run(pass, "softcap", None, [x, x], x.shape(), 0, cap)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, gpu, Rng};
    use std::f64::consts::{FRAC_2_SQRT_PI, PI, SQRT_2};

    /// erfc in f64, independent of the shader's fit: the Maclaurin series of erf (all terms
    /// positive after factoring out exp(-z^2)) for |z| < 3, and the continued fraction
    /// (evaluated bottom-up, 200 levels) for larger |z|. Both ~1e-13 relative or better.
    fn erfc64(z: f64) -> f64 {
        if z < 0.0 {
            return 2.0 - erfc64(-z);
        }
        if z < 3.0 {
            // erf(z) = 2/sqrt(pi) e^{-z^2} sum_k (2z^2)^k z / (1*3*...*(2k+1))
            let mut term = z;
            let mut sum = z;
            let mut k = 0.0;
            while term > 1e-17 * sum {
                k += 1.0;
                term *= 2.0 * z * z / (2.0 * k + 1.0);
                sum += term;
            }
            1.0 - FRAC_2_SQRT_PI * (-z * z).exp() * sum
        } else {
            // erfc(z) = e^{-z^2}/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + ...)))))
            let mut f = z;
            for k in (1..=200).rev() {
                f = z + (k as f64 / 2.0) / f;
            }
            (-z * z).exp() / PI.sqrt() / f
        }
    }

    fn silu64(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }
    /// 0.5 x (1 + tanh(u)) written as x / (1 + e^{-2u}): in f64 the tanh form cancels to 0
    /// for u < -19 (gelu_tanh(-9.2) ~ -3e-30), so the test would accept a GPU 0 there.
    /// `gelu_tanh64_matches_the_tanh_form` checks the identity where the tanh form is exact.
    fn gelu_tanh64(x: f64) -> f64 {
        let u = (2.0 / PI).sqrt() * (x + 0.044715 * x.powi(3));
        x / (1.0 + (-2.0 * u).exp())
    }
    fn gelu_erf64(x: f64) -> f64 {
        0.5 * x * erfc64(-x / SQRT_2)
    }
    fn act64(a: Act) -> fn(f64) -> f64 {
        match a {
            Act::Silu => silu64,
            Act::GeluTanh => gelu_tanh64,
            Act::GeluErf => gelu_erf64,
        }
    }

    /// Inputs over [-30, 30], random normals, tiny values of both signs and zero.
    fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..=600).map(|k| -30.0 + 0.1 * k as f32).collect();
        for t in [1e-3f32, 1e-6, 1e-12, 1e-20, 1e-30, 0.0] {
            v.push(t);
            v.push(-t);
        }
        while v.len() < n {
            v.push(rng.normal() * 4.0);
        }
        v
    }

    // Tolerances, relative to |want| with a 1e-30 absolute floor (outputs that underflow f32,
    // e.g. gelu(-20) ~ 1e-88, are 0 or tiny on the GPU):
    // - silu and gelu_tanh: one exp(-|z|) and a division. Where the result is not ~0, |z| is
    //   below ~100, and the f32 rounding of z (and of x^3 in gelu_tanh) costs up to
    //   |z| * 2^-24 ~ 6e-6 relative in exp; plus exp's own ulps. 2e-5 relative.
    // - gelu_erf: the erfc fit is 1.2e-7 relative; its f32 exp argument -z^2 carries up to
    //   z^2 * 2^-24 absolute error, ~1e-5 relative near the underflow point z ~ 9 (x ~ -13).
    //   3e-5 relative.
    // - softcap: tanh from exp(-2|y|), ~3 ulp; the Taylor branch is near exact. 1e-6.
    // - glu products add one f32 multiply: +1 ulp.
    const ATOL: f64 = 1e-30;

    fn rtol(a: Act) -> f64 {
        match a {
            Act::Silu | Act::GeluTanh => 2e-5,
            Act::GeluErf => 3e-5,
        }
    }

    #[test]
    fn reference_erfc_is_accurate() {
        // Known values (Abramowitz-Stegun table 7.1 / high-precision sources).
        for (z, want) in [
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028513),
            (2.0, 0.004677734981047266),
            (3.0, 2.209049699858544e-5),
            (5.0, 1.537_459_794_428_035e-12),
        ] {
            let got = erfc64(z);
            assert!(
                (got - want).abs() <= 1e-13 * want,
                "erfc({z}) = {got}, want {want}"
            );
        }
        assert!((erfc64(-1.0) - (2.0 - 0.15729920705028513)).abs() < 1e-15);
    }

    #[test]
    fn gelu_tanh64_matches_the_tanh_form() {
        for k in 0..=200 {
            let x = -4.0 + 0.05 * k as f64;
            let u = (2.0 / PI).sqrt() * (x + 0.044715 * x.powi(3));
            let t = 0.5 * x * (1.0 + u.tanh());
            assert!(
                (gelu_tanh64(x) - t).abs() <= 1e-15 + 1e-9 * t.abs(),
                "x = {x}"
            );
        }
    }

    #[test]
    fn unary_activations_match_f64() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(30);
        for n in [1usize, 1000, 100_000] {
            let x: Vec<f32> = inputs(&mut rng, n).into_iter().take(n).collect();
            let gx = MlxBuffer::from_slice(g, &x, &[n])?;
            let mut pass = g.begin();
            let s = silu(&mut pass, &gx)?;
            let gt = gelu(&mut pass, &gx, GeluApprox::Tanh)?;
            let ge = gelu(&mut pass, &gx, GeluApprox::Erf)?;
            let sc = softcap(&mut pass, &gx, 15.0)?;
            pass.commit_and_wait()?;
            let want = |f: fn(f64) -> f64| -> Vec<f64> { x.iter().map(|&v| f(v as f64)).collect() };
            let w = format!("n={n}");
            assert_close(&s.to_vec(g)?, &want(silu64), ATOL, rtol(Act::Silu), &w);
            assert_close(
                &gt.to_vec(g)?,
                &want(gelu_tanh64),
                ATOL,
                rtol(Act::GeluTanh),
                &w,
            );
            assert_close(
                &ge.to_vec(g)?,
                &want(gelu_erf64),
                ATOL,
                rtol(Act::GeluErf),
                &w,
            );
            let cap = |v: f64| 15.0 * (v / 15.0).tanh();
            assert_close(
                &sc.to_vec(g)?,
                &want(cap),
                ATOL,
                1e-6,
                &format!("softcap {w}"),
            );
        }
        Ok(())
    }

    #[test]
    fn folded_grid_reaches_every_element() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(33);
        // 65,600 * 256 elements: 65,600 workgroups (> 65,535), a folded 2-D grid.
        let n = 65_600 * 256;
        let x = rng.normals(n, 4.0);
        let gx = MlxBuffer::from_slice(g, &x, &[n])?;
        let mut pass = g.begin();
        let s = silu(&mut pass, &gx)?;
        pass.commit_and_wait()?;
        let want: Vec<f64> = x.iter().map(|&v| silu64(v as f64)).collect();
        assert_close(
            &s.to_vec(g)?,
            &want,
            ATOL,
            rtol(Act::Silu),
            "silu, folded grid",
        );
        Ok(())
    }

    #[test]
    fn huge_inputs_stay_finite() -> Result<()> {
        let g = gpu();
        let x = [1e30f32, -1e30, 3e38, -3e38, 1e4, -1e4, 100.0, -100.0];
        let gx = MlxBuffer::from_slice(g, &x, &[x.len()])?;
        let mut pass = g.begin();
        let outs = [
            silu(&mut pass, &gx)?,
            gelu(&mut pass, &gx, GeluApprox::Tanh)?,
            gelu(&mut pass, &gx, GeluApprox::Erf)?,
        ];
        let sc = softcap(&mut pass, &gx, 30.0)?;
        pass.commit_and_wait()?;
        for o in &outs {
            let got = o.to_vec::<f32>(g)?;
            // Positive x passes through; negative x gives ~0 (within 1e-30, no NaN).
            let want: Vec<f64> = x.iter().map(|&v| v.max(0.0) as f64).collect();
            assert_close(&got, &want, 1e-30, 1e-7, "activation of huge |x|");
        }
        let want: Vec<f64> = x.iter().map(|&v| 30.0 * (v as f64 / 30.0).tanh()).collect();
        assert_close(&sc.to_vec(g)?, &want, 0.0, 1e-6, "softcap of huge |x|");
        Ok(())
    }

    #[test]
    fn glu_products_match_f64() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(31);
        for &(rows, n) in &[(1usize, 1usize), (3, 7), (5, 700), (9000, 33)] {
            let gate: Vec<f32> = inputs(&mut rng, rows * n)
                .into_iter()
                .take(rows * n)
                .collect();
            let up = rng.normals(rows * n, 2.0);
            // The fused layout: each row is [gate row | up row].
            let fused: Vec<f32> = gate
                .chunks(n)
                .zip(up.chunks(n))
                .flat_map(|(a, b)| a.iter().chain(b).copied())
                .collect();
            let gg = MlxBuffer::from_slice(g, &gate, &[rows, n])?;
            let gu = MlxBuffer::from_slice(g, &up, &[rows, n])?;
            let gf = MlxBuffer::from_slice(g, &fused, &[rows, 2 * n])?;
            for a in ACTS {
                let mut pass = g.begin();
                let y = glu(&mut pass, &gg, &gu, a)?;
                let ys = glu_split(&mut pass, &gf, a)?;
                pass.commit_and_wait()?;
                assert_eq!(ys.shape(), &[rows, n]);
                let f = act64(a);
                let want: Vec<f64> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&gv, &uv)| f(gv as f64) * uv as f64)
                    .collect();
                let w = format!("{a:?} {rows}x{n}");
                let tol = rtol(a) + 2e-7;
                assert_close(&y.to_vec(g)?, &want, ATOL, tol, &format!("glu {w}"));
                assert_close(&ys.to_vec(g)?, &want, ATOL, tol, &format!("glu_split {w}"));
            }
        }
        Ok(())
    }

    #[test]
    fn views_at_odd_offsets() -> Result<()> {
        let g = gpu();
        let mut rng = Rng::new(32);
        let data = rng.normals(3000, 3.0);
        let base = MlxBuffer::from_slice(g, &data, &[3000])?;
        let gate = base.view(11, &[4, 50])?;
        let up = base.view(1003, &[4, 50])?;
        let fused = base.view(2001, &[4, 100])?;
        let mut pass = g.begin();
        let y = glu(&mut pass, &gate, &up, Act::Silu)?;
        let ys = glu_split(&mut pass, &fused, Act::GeluErf)?;
        let s = silu(&mut pass, &gate)?;
        pass.commit_and_wait()?;
        let want: Vec<f64> = (0..200)
            .map(|k| silu64(data[11 + k] as f64) * data[1003 + k] as f64)
            .collect();
        assert_close(&y.to_vec(g)?, &want, ATOL, 3e-5, "glu of views");
        let want: Vec<f64> = (0..200)
            .map(|k| {
                let (r, c) = (k / 50, k % 50);
                let base = 2001 + r * 100 + c;
                gelu_erf64(data[base] as f64) * data[base + 50] as f64
            })
            .collect();
        assert_close(&ys.to_vec(g)?, &want, ATOL, 3e-5, "glu_split of views");
        let want: Vec<f64> = (0..200).map(|k| silu64(data[11 + k] as f64)).collect();
        assert_close(&s.to_vec(g)?, &want, ATOL, 2e-5, "silu of a view");
        Ok(())
    }

    #[test]
    fn bad_arguments_are_named() -> Result<()> {
        let g = gpu();
        let a = MlxBuffer::from_slice(g, &[1.0f32; 6], &[2, 3])?;
        let b = MlxBuffer::from_slice(g, &[1.0f32; 8], &[2, 4])?;
        let h = MlxBuffer::from_slice(g, &[half::f16::ONE; 6], &[2, 3])?;
        let mut pass = g.begin();
        let e = glu(&mut pass, &a, &b, Act::Silu).unwrap_err().to_string();
        assert_eq!(e, "glu: gate has shape [2, 3] but up has shape [2, 4]");
        let e = glu(&mut pass, &a, &h, Act::Silu).unwrap_err().to_string();
        assert_eq!(e, "glu: up is f16, expected f32");
        let e = glu_split(&mut pass, &a, Act::GeluTanh)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "glu_split: x has last dimension 3, expected an even size (gate and up halves)"
        );
        let e = gelu(&mut pass, &h, GeluApprox::Erf)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "gelu: x is f16, expected f32");
        let e = silu(&mut pass, &h).unwrap_err().to_string();
        assert_eq!(e, "silu: x is f16, expected f32");
        let e = softcap(&mut pass, &a, 0.0).unwrap_err().to_string();
        assert_eq!(e, "softcap: cap is 0, expected a positive finite value");
        Ok(())
    }
}

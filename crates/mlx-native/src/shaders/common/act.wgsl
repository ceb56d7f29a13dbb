// Activation functions of f32 values, shared by activation.wgsl and the matvec prologue of
// qmatmul.wgsl. The including shader declares `override ACT: u32` (0 silu, 1 gelu with the
// tanh approximation, 2 gelu with erf), which selects `act`.
//
// No formula here can produce NaN or infinity for finite input: every exp argument is <= 0
// (sigmoid is built from exp(-|z|), which at worst underflows to 0).

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const FRAC_1_SQRT_2: f32 = 0.7071067811865476;

// x * sigmoid(z) without overflow: with e = exp(-|z|) in [0, 1], sigmoid(z) is 1 / (1 + e)
// for z >= 0 and e / (1 + e) for z < 0. A very negative z gives x * 0, not x / inf.
fn mul_sigmoid(x: f32, z: f32) -> f32 {
    let e = exp(-abs(z));
    return select(x * e, x, z >= 0.0) / (1.0 + e);
}

fn silu(x: f32) -> f32 {
    return mul_sigmoid(x, x);
}

// 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3) (MLX nn.gelu_approx, PyTorch
// gelu(approximate="tanh")), evaluated as x * sigmoid(2u): identical in exact arithmetic,
// and free of the cancellation in 1 + tanh(u) for negative x.
fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    return mul_sigmoid(x, 2.0 * u);
}

// erfc(z) with fractional error < 1.2e-7 for all z (the Chebyshev fit `erfcc` of Numerical
// Recipes, 6.2), in exact arithmetic. Evaluated in f32 the exp argument -z^2 carries
// z^2 * 2^-24 absolute error, i.e. ~1e-5 relative at z = 9 where erfc ~ 1e-37; below that
// the result underflows to 0. Relative accuracy in the tail is why this is used rather than
// Abramowitz-Stegun 7.1.26 (1.5e-7 absolute on erf, so poor relative accuracy of 1 + erf
// for negative arguments).
fn erfc(z: f32) -> f32 {
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(poly - a * a);
    return select(2.0 - r, r, z >= 0.0);
}

// 0.5 * x * (1 + erf(x / sqrt(2))) (MLX nn.gelu, exact GELU) = 0.5 * x * erfc(-x / sqrt(2)).
fn gelu_erf(x: f32) -> f32 {
    return 0.5 * x * erfc(-x * FRAC_1_SQRT_2);
}

fn act(v: f32) -> f32 {
    if ACT == 1u {
        return gelu_tanh(v);
    }
    if ACT == 2u {
        return gelu_erf(v);
    }
    return silu(v);
}

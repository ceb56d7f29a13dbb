// RoPE angles to full precision at any position, shared by rope.wgsl and kv.wgsl
// (rope_append). The table holds f = inv_freq / (2 pi) per pair as f32 pieces: f ~ fh + fl +
// f2 where fh and fl carry at most 12 significant bits each (fh + fl is f rounded to f32)
// and f2 is the remainder. The position splits into ph (a multiple of 4096) and pl
// (< 4096), both with at most 12 significant bits when |position| < 2^24, so ph*fh, ph*fl,
// pl*fh and pl*fl are exact in f32 and their fractional parts are exact too. Only p*f2
// (below 1 turn) and the final sum of five terms in [0, 1) round: the angle is good to
// about 1e-6 turns at any position, where a plain f32 `p * inv_freq` errs by about
// p * 2^-24 radians. DT_I32 variants read the position as signed.

// The angle of a pair with table entry (fh, fl, f2) at position `pw`, in turns, in
// [-0.5, 0.5).
fn turns_of(pw: u32, fh: f32, fl: f32, f2: f32) -> f32 {
#if DT_I32
    let pi = bitcast<i32>(pw);
    let ph = f32(pi & -4096);
    let pf = f32(pi);
#else
    let ph = f32(pw & 0xfffff000u);
    let pf = f32(pw);
#endif
    let pl = f32(pw & 0xfffu);
    let t = fract(fract(ph * fh) + fract(ph * fl) + fract(pl * fh) + fract(pl * fl)
        + fract(pf * f2));
    return select(t, t - 1.0, t >= 0.5);
}

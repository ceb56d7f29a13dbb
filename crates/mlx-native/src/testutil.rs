//! Test support: shared devices (normal and with subgroups disabled), a seeded RNG, and
//! tolerance checks against f64 references. Compiled only for tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use crate::device::{DeviceOptions, MlxDevice};

fn open(disable_subgroups: bool) -> MlxDevice {
    MlxDevice::with_options(DeviceOptions {
        disable_subgroups,
        poison_allocations: true,
        ..DeviceOptions::default()
    })
    .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"))
}

/// The default test device: all features, allocations poisoned with NaN.
pub fn gpu() -> &'static MlxDevice {
    static D: OnceLock<MlxDevice> = OnceLock::new();
    D.get_or_init(|| open(false))
}

/// Both reduction paths: the device with subgroups (when it has them) and one without.
pub fn devices() -> Vec<&'static MlxDevice> {
    static D: OnceLock<MlxDevice> = OnceLock::new();
    let fallback = D.get_or_init(|| open(true));
    if gpu().caps().subgroups {
        vec![gpu(), fallback]
    } else {
        vec![fallback]
    }
}

/// xorshift64*: deterministic per seed, different per test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform(1e-7, 1.0) as f64;
        let u2 = self.uniform(0.0, 1.0) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// Every element finite and within `atol + rtol * |want|`.
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (unwritten or overflow), want {w}"
        );
        let err = (g as f64 - w).abs();
        let tol = atol + rtol * w.abs();
        if err - tol > worst.1 {
            worst = (i, err - tol);
        }
        assert!(
            err <= tol,
            "{what}: element {i}: got {g}, want {w} (err {err:e} > tol {tol:e})"
        );
    }
}

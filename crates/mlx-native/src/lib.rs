//! mlx-native: GPU compute kernels for MLX-compatible LLM inference, written in WGSL and run
//! through wgpu (Metal, Vulkan, DX12, and lavapipe on any CPU).
//!
//! ```no_run
//! use mlx_native::{ops, MlxBuffer, MlxDevice};
//! # fn main() -> mlx_native::Result<()> {
//! let gpu = MlxDevice::new()?;
//! let x = MlxBuffer::from_slice(&gpu, &[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let w = MlxBuffer::from_slice(&gpu, &[1.0f32, 0.5], &[2])?;
//! let mut pass = gpu.begin();
//! let y = ops::rms_norm(&mut pass, &x, &w, 1e-6)?;
//! pass.commit_and_wait()?;
//! let v: Vec<f32> = y.to_vec(&gpu)?;
//! # Ok(()) }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod buffer;
pub mod buffer_pool;
pub mod check;
pub mod device;
pub mod dtype;
pub mod encoder;
pub mod error;
pub mod graph;
pub mod kernels;
pub mod kv_cache;
pub mod kv_quant;
pub mod ops;
pub mod weights;

pub use buffer::MlxBuffer;
pub use device::{Caps, DeviceOptions, MlxDevice};
pub use dtype::{DType, Element};
pub use encoder::{set_skip_dispatches, KernelTiming, Pass, Readback};
pub use error::{MlxError, Result};
pub use graph::{Advance, Graph, Replayed, StepParams, TokenVars};
pub use kernels::{Kernel, KernelRegistry, Spec};
pub use kv_cache::{KvCache, KvCacheConfig};
pub use kv_quant::{CompressedKvCache, KvFormat, KvStore};

#[cfg(test)]
pub(crate) mod testutil;

/// The README's code blocks compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

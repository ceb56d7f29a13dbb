//! mlx-native: GPU compute kernels for MLX-compatible LLM inference, written in WGSL and run
//! through wgpu (Metal, Vulkan, DX12, and lavapipe on any CPU).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod dtype;
pub mod error;
pub mod weights;

pub use dtype::{DType, Element};
pub use error::{MlxError, Result};

//! mlx-native-lm: the model engine built on mlx-native, and the bench harness.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bench;
pub mod bench_decode;
pub mod bench_matmul;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod info;
pub mod kv_quality;
pub mod layers;
pub mod mlx_config;
pub mod models;
pub mod replay;
pub mod tokenizer;

pub use error::{LmError, Result};

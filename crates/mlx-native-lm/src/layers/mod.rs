//! Blocks the architectures share: linear layers over any weight format, attention with the
//! KV cache, the gated MLP, and the decoder layer that strings them together.

pub mod attention;
pub mod decoder;
pub mod linear;
pub mod mlp;

pub use attention::Attention;
pub use decoder::DecoderLayer;
pub use linear::Linear;
pub use mlp::Mlp;

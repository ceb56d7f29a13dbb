//! Model weights: file formats (GGUF, safetensors) and CPU (de)quantization.

pub mod ggml;
pub mod gguf;
pub mod quant;
pub mod quant_weight;

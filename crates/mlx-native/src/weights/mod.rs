//! Model weights: file formats (GGUF, safetensors) and CPU (de)quantization.

pub mod expert_weight;
pub mod ggml;
pub mod ggml_weight;
pub mod gguf;
pub mod quant;
pub mod quant_weight;
pub mod safetensors;

//! The engine's error type: kernel errors plus what can go wrong with models, tokenizers and
//! generation. Messages name the file, key or argument and what was wrong.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LmError {
    #[error(transparent)]
    Mlx(#[from] mlx_native::MlxError),

    /// A model folder or file that is missing pieces or has values we cannot use.
    #[error("{0}")]
    Config(String),

    /// An architecture, option or format this build does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    /// Bad arguments to generation (empty prompt, prompt longer than the context...).
    #[error("{0}")]
    Invalid(String),

    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = LmError> = std::result::Result<T, E>;

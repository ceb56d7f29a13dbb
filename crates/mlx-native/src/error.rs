//! The one error type of the library. Messages start with the op or file they concern and
//! give what was found against what was expected, so a user can act on them.

use thiserror::Error;

/// Everything that can go wrong in mlx-native. No public function panics: they return this.
#[derive(Debug, Error)]
pub enum MlxError {
    /// No usable GPU adapter (or none matching `MLX_NATIVE_ADAPTER`).
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// The adapter refused the device request.
    #[error("could not open the GPU device: {0}")]
    DeviceRequest(String),

    /// A caller passed arguments that do not fit together (shape, dtype, length, offset).
    #[error("{0}")]
    InvalidArgument(String),

    /// A valid request this build or this adapter does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A WGSL source failed to preprocess, parse, validate or compile.
    #[error("kernel {kernel}: {message}")]
    Shader { kernel: String, message: String },

    /// A GPU-side failure: out of memory, device lost, a failed buffer map.
    #[error("gpu: {0}")]
    Gpu(String),

    /// A model or tensor file that is malformed, truncated or hostile.
    #[error("{file}: {what}")]
    Format { file: String, what: String },

    /// The KV cache or another fixed-capacity structure would overflow.
    #[error("capacity exceeded: {0}")]
    Capacity(String),

    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = MlxError> = std::result::Result<T, E>;

impl MlxError {
    /// `InvalidArgument` from anything printable; keeps call sites to one line.
    pub fn invalid(msg: impl Into<String>) -> Self {
        MlxError::InvalidArgument(msg.into())
    }

    /// `Unsupported` from anything printable.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        MlxError::Unsupported(msg.into())
    }

    /// `Format` error for a file.
    pub fn format(file: impl Into<String>, what: impl Into<String>) -> Self {
        MlxError::Format {
            file: file.into(),
            what: what.into(),
        }
    }

    /// `Io` error with the path that failed.
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        MlxError::Io {
            path: path.into(),
            source,
        }
    }
}

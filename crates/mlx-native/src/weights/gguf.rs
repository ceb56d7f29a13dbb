//! GGUF model files (versions 2 and 3): metadata, tensor table, tensor data.
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64,
//! the metadata key/value pairs, the tensor infos (name, n_dims u32, dims u64 × n_dims
//! fastest-varying first, GGML type u32, offset u64 into the data section), padding to
//! `general.alignment` (default 32), then the data section.
//!
//! The parser treats the file as hostile: every count, length, dimension and offset is checked
//! against the bytes that remain before anything is allocated from it, arithmetic is checked,
//! tensors must be aligned, inside the file and disjoint. Errors are
//! [`MlxError::Format`] naming the key or tensor and what is wrong with it.

mod parse;
#[cfg(test)]
mod tests;

use crate::error::{MlxError, Result};
use crate::weights::ggml::{self, GgmlType};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: all elements share one type; arrays may nest.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    /// The GGUF name of the value's type (`u32`, `string`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer value, widened; `None` for floats, bools, strings and arrays.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type.
    pub fn elem_type_name(&self) -> &'static str {
        match self {
            GgufArray::U8(_) => "u8",
            GgufArray::I8(_) => "i8",
            GgufArray::U16(_) => "u16",
            GgufArray::I16(_) => "i16",
            GgufArray::U32(_) => "u32",
            GgufArray::I32(_) => "i32",
            GgufArray::F32(_) => "f32",
            GgufArray::Bool(_) => "bool",
            GgufArray::String(_) => "string",
            GgufArray::Array(_) => "array",
            GgufArray::U64(_) => "u64",
            GgufArray::I64(_) => "i64",
            GgufArray::F64(_) => "f64",
        }
    }

    /// The elements of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an f32 array.
    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            GgufArray::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an integer array of any width, as i64; `None` for other element
    /// types or a u64 element above `i64::MAX`.
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T]) -> Option<Vec<i64>>
        where
            i64: TryFrom<T>,
        {
            v.iter().map(|&x| i64::try_from(x).ok()).collect()
        }
        match self {
            GgufArray::U8(v) => conv(v),
            GgufArray::I8(v) => conv(v),
            GgufArray::U16(v) => conv(v),
            GgufArray::I16(v) => conv(v),
            GgufArray::U32(v) => conv(v),
            GgufArray::I32(v) => conv(v),
            GgufArray::U64(v) => conv(v),
            GgufArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// Types a metadata value can be read as by [`GgufFile::get`]. Integers convert between
/// widths when the value fits; f32 accepts an f64 that is exactly representable.
pub trait FromGguf<'a>: Sized {
    /// Name used in error messages.
    const NAME: &'static str;
    /// The converted value, `None` if the value's type or range does not fit.
    fn from_gguf(v: &'a GgufValue) -> Option<Self>;
}

macro_rules! from_gguf_int {
    ($($t:ty),*) => {$(
        impl FromGguf<'_> for $t {
            const NAME: &'static str = stringify!($t);
            fn from_gguf(v: &GgufValue) -> Option<Self> {
                v.as_i128().and_then(|x| <$t>::try_from(x).ok())
            }
        }
    )*};
}
from_gguf_int!(u8, i8, u16, i16, u32, i32, u64, i64, usize);

impl FromGguf<'_> for f32 {
    const NAME: &'static str = "f32";
    fn from_gguf(v: &GgufValue) -> Option<Self> {
        match *v {
            GgufValue::F32(x) => Some(x),
            GgufValue::F64(x) if (x as f32) as f64 == x || x.is_nan() => Some(x as f32),
            _ => None,
        }
    }
}

impl FromGguf<'_> for f64 {
    const NAME: &'static str = "f64";
    fn from_gguf(v: &GgufValue) -> Option<Self> {
        match *v {
            GgufValue::F32(x) => Some(x.into()),
            GgufValue::F64(x) => Some(x),
            _ => None,
        }
    }
}

impl FromGguf<'_> for bool {
    const NAME: &'static str = "bool";
    fn from_gguf(v: &GgufValue) -> Option<Self> {
        match *v {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

impl<'a> FromGguf<'a> for &'a str {
    const NAME: &'static str = "string";
    fn from_gguf(v: &'a GgufValue) -> Option<Self> {
        v.as_str()
    }
}

impl<'a> FromGguf<'a> for &'a GgufArray {
    const NAME: &'static str = "array";
    fn from_gguf(v: &'a GgufValue) -> Option<Self> {
        match v {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions as GGUF stores them: fastest-varying first (ggml's `ne`).
    pub ne: Vec<u64>,
    /// Row-major shape, slowest-varying first: `ne` reversed, e.g. `[rows, cols]` for a
    /// matrix whose rows are contiguous. Empty for a scalar.
    pub shape: Vec<usize>,
    pub kind: GgmlType,
    /// Offset of the data from the start of the data section, as stored in the file.
    pub offset: u64,
    /// Absolute byte range of the data in the file.
    pub range: Range<usize>,
}

impl GgufTensor {
    /// Number of elements (1 for a scalar). The parser checked that the product fits.
    pub fn n_elems(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape.iter().product()
    }

    /// Number of bytes of data.
    pub fn n_bytes(&self) -> usize {
        self.range.len()
    }
}

/// Where the file's bytes live.
enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file together with its bytes.
pub struct GgufFile {
    name: String,
    version: u32,
    alignment: u32,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    tensor_index: HashMap<String, usize>,
    storage: Storage,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and parse the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| MlxError::io(&shown, e))?;
        // SAFETY: the map is read-only and private to this value. Mapped memory can change
        // under us only if another process modifies or truncates the file while it is open;
        // like every mmap-based model loader we require that model files are not rewritten
        // while in use. All reads of the map go through bounds-checked slices.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| MlxError::io(&shown, e))?;
        Self::from_storage(&shown, Storage::Mmap(map))
    }

    /// Parse a GGUF file held in memory (the bytes are copied). `name` appears in errors.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self> {
        Self::from_storage(name, Storage::Owned(bytes.to_vec()))
    }

    /// Parse a GGUF file held in memory, taking ownership of the bytes.
    pub fn from_vec(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(name, Storage::Owned(bytes))
    }

    fn from_storage(name: &str, storage: Storage) -> Result<Self> {
        let p = parse::parse(name, storage.bytes())?;
        let key_index = index_of(p.metadata.iter().map(|(k, _)| k));
        let tensor_index = index_of(p.tensors.iter().map(|t| &t.name));
        Ok(GgufFile {
            name: name.to_string(),
            version: p.version,
            alignment: p.alignment,
            data_offset: p.data_offset,
            metadata: p.metadata,
            key_index,
            tensors: p.tensors,
            tensor_index,
            storage,
        })
    }

    /// The name given to `parse` or the path given to `open`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and the tensors (`general.alignment`, default 32).
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All bytes of the file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of `key`, if present.
    pub fn value(&self, key: &str) -> Option<&GgufValue> {
        self.key_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// The value of `key` converted to `T`; a missing key or a type that does not convert
    /// losslessly is an error naming the key.
    pub fn get<'a, T: FromGguf<'a>>(&'a self, key: &str) -> Result<T> {
        self.get_opt(key)?
            .ok_or_else(|| MlxError::format(&self.name, format!("missing metadata key '{key}'")))
    }

    /// Like [`GgufFile::get`] but a missing key is `Ok(None)`.
    pub fn get_opt<'a, T: FromGguf<'a>>(&'a self, key: &str) -> Result<Option<T>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        match T::from_gguf(v) {
            Some(x) => Ok(Some(x)),
            None => Err(MlxError::format(
                &self.name,
                format!(
                    "metadata key '{key}' is {}, which does not convert to {}",
                    describe(v),
                    T::NAME
                ),
            )),
        }
    }

    /// [`GgufFile::get`] as `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.get(key)
    }
    /// [`GgufFile::get`] as `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
    }
    /// [`GgufFile::get`] as `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.get(key)
    }
    /// [`GgufFile::get`] as `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get(key)
    }
    /// [`GgufFile::get`] as `bool`.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.get(key)
    }
    /// [`GgufFile::get`] as `&str`.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
    }
    /// [`GgufFile::get`] as `&GgufArray`.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        self.get(key)
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    fn tensor_or_err(&self, name: &str) -> Result<&GgufTensor> {
        self.tensor(name)
            .ok_or_else(|| MlxError::format(&self.name, format!("no tensor named '{name}'")))
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_or_err(name)?;
        self.bytes().get(t.range.clone()).ok_or_else(|| {
            MlxError::format(
                &self.name,
                format!("tensor '{name}': data {:?} outside the file", t.range),
            )
        })
    }

    /// A tensor's values as f32, in row-major order of [`GgufTensor::shape`].
    pub fn dequantize_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_or_err(name)?;
        let bytes = self.tensor_bytes(name)?;
        ggml::dequantize(t.kind, bytes, t.n_elems())
            .map_err(|e| MlxError::format(&self.name, format!("tensor '{name}': {e}")))
    }
}

fn index_of<'a>(names: impl Iterator<Item = &'a String>) -> HashMap<String, usize> {
    names.enumerate().map(|(i, n)| (n.clone(), i)).collect()
}

/// A short description of a value for error messages: `u32 7`, `string "llama"`,
/// `array of 3 f32`.
fn describe(v: &GgufValue) -> String {
    match v {
        GgufValue::String(s) if s.len() <= 40 => format!("string {s:?}"),
        GgufValue::String(s) => format!("a string of {} bytes", s.len()),
        GgufValue::Array(a) => format!("an array of {} {}", a.len(), a.elem_type_name()),
        GgufValue::Bool(b) => format!("bool {b}"),
        GgufValue::F32(x) => format!("f32 {x}"),
        GgufValue::F64(x) => format!("f64 {x}"),
        other => match other.as_i128() {
            Some(x) => format!("{} {x}", other.type_name()),
            None => other.type_name().to_string(),
        },
    }
}

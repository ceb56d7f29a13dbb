//! The GGUF byte-level parser. Every read is bounds-checked; every count read from the file
//! is checked against the bytes that remain before it sizes an allocation.

use super::{GgufArray, GgufTensor, GgufValue, DEFAULT_ALIGNMENT};
use crate::error::{MlxError, Result};
use crate::weights::ggml::{ggml_type_name, GgmlType};
use std::collections::HashSet;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub(super) const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1); bounds recursion.
pub(super) const MAX_ARRAY_DEPTH: usize = 8;
/// Fewest bytes a metadata pair can take: key length u64, value type u32, a u8 value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes a tensor info can take: name length u64, n_dims u32, type u32, offset u64.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Capacity to reserve for `n` entries whose count came from the file. `n` is already
/// bounded by the bytes that remain, but each entry costs more memory than its minimum size
/// in the file, so a large claimed count only reserves a modest amount up front and the
/// rest grows as entries actually parse.
fn initial_capacity(n: usize) -> usize {
    n.min(1 << 16)
}

/// What the parser found; `GgufFile` adds storage and indexes.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u32,
    pub data_offset: usize,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensor>,
}

/// GGUF metadata value types, by their on-disk id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum VType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl VType {
    fn from_u32(id: u32) -> Option<Self> {
        use VType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Fewest bytes one value of this type takes in the file.
    fn min_bytes(self) -> u64 {
        use VType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 4 + 8,
        }
    }

    fn name(self) -> &'static str {
        use VType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

struct Parser<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn err(&self, what: impl Into<String>) -> MlxError {
        MlxError::format(self.file, what)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos.min(self.bytes.len())
    }

    /// The next `n` bytes; `what` (built only on failure) says what was being read.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let out = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n).map(|end| (n, end)))
            .and_then(|(_, end)| self.bytes.get(self.pos..end));
        match out {
            Some(s) => {
                self.pos += s.len();
                Ok(s)
            }
            None => Err(self.err(format!(
                "{}: needs {n} bytes at offset {}, past the end of the file ({} bytes)",
                what(),
                self.pos,
                self.bytes.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("{} length", what()))?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{}: string length {len} runs past the end of the file ({} bytes remain)",
                what(),
                self.remaining()
            )));
        }
        let at = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|e| {
            self.err(format!(
                "{}: string at offset {at} is not valid UTF-8 ({e})",
                what()
            ))
        })
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<VType> {
        let id = self.u32(&|| format!("{} type", what()))?;
        VType::from_u32(id).ok_or_else(|| self.err(format!("{}: unknown value type {id}", what())))
    }

    fn value(&mut self, t: VType, what: &dyn Fn() -> String, depth: usize) -> Result<GgufValue> {
        Ok(match t {
            VType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            VType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            VType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            VType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            VType::U32 => GgufValue::U32(self.u32(what)?),
            VType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            VType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            VType::Bool => {
                let [b] = self.array::<1>(what)?;
                GgufValue::Bool(self.bool(b, what)?)
            }
            VType::String => GgufValue::String(self.string(what)?),
            VType::Array => GgufValue::Array(self.array_value(what, depth + 1)?),
            VType::U64 => GgufValue::U64(self.u64(what)?),
            VType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            VType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
        })
    }

    fn bool(&self, b: u8, what: &dyn Fn() -> String) -> Result<bool> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.err(format!("{}: bool value {b} is neither 0 nor 1", what()))),
        }
    }

    /// An array value (element type, count, elements); `depth` counts enclosing arrays.
    fn array_value(&mut self, what: &dyn Fn() -> String, depth: usize) -> Result<GgufArray> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.err(format!(
                "{}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels",
                what()
            )));
        }
        let t = self.value_type(&|| format!("{} array element", what()))?;
        let n = self.u64(&|| format!("{} array length", what()))?;
        let rem = self.remaining() as u64;
        if n > rem / t.min_bytes() {
            return Err(self.err(format!(
                "{}: array of {n} {} elements needs at least {} bytes, past the end of the \
                 file ({rem} bytes remain)",
                what(),
                t.name(),
                u128::from(n) * u128::from(t.min_bytes()),
            )));
        }
        // n <= remaining bytes / element size: allocations below are bounded by the file.
        let n = n as usize;
        let elem = |i: usize| move || format!("{} [{i}]", what());
        macro_rules! fixed {
            ($variant:ident, $ty:ty) => {{
                let size = std::mem::size_of::<$ty>();
                let raw = self.take((n * size) as u64, what)?;
                GgufArray::$variant(
                    raw.chunks_exact(size)
                        .map(|c| {
                            let mut a = [0u8; std::mem::size_of::<$ty>()];
                            a.copy_from_slice(c);
                            <$ty>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match t {
            VType::U8 => GgufArray::U8(self.take(n as u64, what)?.to_vec()),
            VType::I8 => fixed!(I8, i8),
            VType::U16 => fixed!(U16, u16),
            VType::I16 => fixed!(I16, i16),
            VType::U32 => fixed!(U32, u32),
            VType::I32 => fixed!(I32, i32),
            VType::F32 => fixed!(F32, f32),
            VType::U64 => fixed!(U64, u64),
            VType::I64 => fixed!(I64, i64),
            VType::F64 => fixed!(F64, f64),
            VType::Bool => {
                let raw = self.take(n as u64, what)?;
                let mut v = Vec::with_capacity(initial_capacity(n));
                for (i, &b) in raw.iter().enumerate() {
                    v.push(self.bool(b, &elem(i))?);
                }
                GgufArray::Bool(v)
            }
            VType::String => {
                let mut v = Vec::with_capacity(initial_capacity(n));
                for i in 0..n {
                    v.push(self.string(&elem(i))?);
                }
                GgufArray::String(v)
            }
            VType::Array => {
                let mut v = Vec::with_capacity(initial_capacity(n));
                for i in 0..n {
                    v.push(self.array_value(&elem(i), depth + 1)?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// Parse and validate the whole file. `file` names it in errors.
pub(super) fn parse(file: &str, bytes: &[u8]) -> Result<Parsed> {
    let mut p = Parser {
        file,
        bytes,
        pos: 0,
    };
    let magic: [u8; 4] = p.array(&|| "magic".to_string())?;
    if &magic != b"GGUF" {
        return Err(p.err(format!(
            "not a GGUF file: magic is {magic:02x?}, expected \"GGUF\" (47 47 55 46)"
        )));
    }
    let version = p.u32(&|| "version".to_string())?;
    if version != 2 && version != 3 {
        let hint = if matches!(version.swap_bytes(), 2 | 3) {
            " (a big-endian GGUF file? only little-endian is supported)"
        } else {
            ""
        };
        return Err(p.err(format!(
            "GGUF version {version} is not supported (2 and 3 are){hint}"
        )));
    }
    let n_tensors = p.u64(&|| "tensor count".to_string())?;
    let n_kv = p.u64(&|| "metadata count".to_string())?;
    let rem = p.remaining() as u128;
    let need = u128::from(n_kv) * u128::from(MIN_KV_BYTES)
        + u128::from(n_tensors) * u128::from(MIN_TENSOR_INFO_BYTES);
    if need > rem {
        return Err(p.err(format!(
            "header claims {n_tensors} tensors and {n_kv} metadata entries, which need at \
             least {need} bytes, past the end of the file ({rem} bytes remain)"
        )));
    }
    // Both counts are now bounded by the file size.
    let (n_tensors, n_kv) = (n_tensors as usize, n_kv as usize);

    let mut metadata = Vec::with_capacity(initial_capacity(n_kv));
    let mut keys = HashSet::with_capacity(initial_capacity(n_kv));
    for i in 0..n_kv {
        let key = p.string(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata key '{key}'");
        if !keys.insert(key.clone()) {
            return Err(p.err(format!("duplicate {}", what())));
        }
        let t = p.value_type(&what)?;
        let v = p.value(t, &what, 0)?;
        metadata.push((key, v));
    }

    let alignment = alignment(&p, &metadata)?;

    struct Info {
        name: String,
        ne: Vec<u64>,
        kind: GgmlType,
        offset: u64,
    }
    let mut infos = Vec::with_capacity(initial_capacity(n_tensors));
    let mut names = HashSet::with_capacity(initial_capacity(n_tensors));
    for i in 0..n_tensors {
        let name = p.string(&|| format!("tensor #{i} name"))?;
        let what = || format!("tensor '{name}'");
        if !names.insert(name.clone()) {
            return Err(p.err(format!("duplicate tensor name '{name}'")));
        }
        let n_dims = p.u32(&|| format!("{} n_dims", what()))?;
        if n_dims > MAX_DIMS {
            return Err(p.err(format!(
                "{}: {n_dims} dimensions, at most {MAX_DIMS} are supported",
                what()
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(p.u64(&|| format!("{} dimension {d}", what()))?);
        }
        let type_id = p.u32(&|| format!("{} type", what()))?;
        let kind = tensor_type(&p, &name, type_id)?;
        let offset = p.u64(&|| format!("{} offset", what()))?;
        infos.push(Info {
            name,
            ne,
            kind,
            offset,
        });
    }

    let data_offset = p
        .pos
        .checked_next_multiple_of(alignment as usize)
        .ok_or_else(|| p.err("data section offset overflows"))?;

    let mut tensors = Vec::with_capacity(infos.len());
    for Info {
        name,
        ne,
        kind,
        offset,
    } in infos
    {
        let n_bytes = tensor_bytes(&p, &name, &ne, kind)?;
        if !offset.is_multiple_of(u64::from(alignment)) {
            return Err(p.err(format!(
                "tensor '{name}': data offset {offset} is not a multiple of the alignment \
                 {alignment}"
            )));
        }
        let start = (data_offset as u64).checked_add(offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => (s as usize, e as usize),
            _ => {
                return Err(p.err(format!(
                    "tensor '{name}': data at offset {offset} (+{data_offset}) with {n_bytes} \
                     bytes runs past the end of the file ({} bytes)",
                    bytes.len()
                )))
            }
        };
        let shape = ne.iter().rev().map(|&d| d as usize).collect();
        tensors.push(GgufTensor {
            name,
            ne,
            shape,
            kind,
            offset,
            range: start..end,
        });
    }
    check_overlap(&p, &tensors)?;

    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

/// `general.alignment` if present: an integer that is a nonzero power of two fitting u32.
fn alignment(p: &Parser, metadata: &[(String, GgufValue)]) -> Result<u32> {
    const KEY: &str = "general.alignment";
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match v.as_i128() {
        Some(a) => match u32::try_from(a) {
            Ok(a) if a.is_power_of_two() => Ok(a),
            _ => Err(p.err(format!(
                "metadata key '{KEY}' = {a} is not a nonzero power of two that fits u32"
            ))),
        },
        None => Err(p.err(format!(
            "metadata key '{KEY}' is {}, expected an integer",
            v.type_name()
        ))),
    }
}

/// The GGML type of tensor `name`: an unknown id is a format error; a type GGML defines but
/// this crate cannot read is `Unsupported`.
fn tensor_type(p: &Parser, name: &str, id: u32) -> Result<GgmlType> {
    match (GgmlType::from_u32(id), ggml_type_name(id)) {
        (Ok(t), _) => Ok(t),
        (Err(_), None) => Err(p.err(format!("tensor '{name}': unknown GGML type id {id}"))),
        (Err(_), Some(known)) => Err(MlxError::unsupported(format!(
            "{}: tensor '{name}': GGML type {id} ({known}) cannot be read by this crate",
            p.file
        ))),
    }
}

/// Bytes of data of a tensor with dimensions `ne` (fastest first) of type `kind`, checked:
/// the first dimension must be a whole number of blocks, the element count and the byte
/// count must fit u64 and usize.
fn tensor_bytes(p: &Parser, name: &str, ne: &[u64], kind: GgmlType) -> Result<u64> {
    let overflow = || {
        p.err(format!(
            "tensor '{name}': dimensions {ne:?} overflow: the element count does not fit \
             64 bits"
        ))
    };
    let mut elems: u64 = 1;
    for &d in ne {
        usize::try_from(d).map_err(|_| overflow())?;
        elems = elems.checked_mul(d).ok_or_else(overflow)?;
    }
    usize::try_from(elems).map_err(|_| overflow())?;
    let ne0 = ne.first().copied().unwrap_or(1);
    let be = kind.block_elems() as u64;
    if !ne0.is_multiple_of(be) {
        return Err(p.err(format!(
            "tensor '{name}': first dimension {ne0} is not a multiple of the {kind} block \
             size {be}"
        )));
    }
    // elems is a multiple of ne0, hence of the block size.
    (elems / be)
        .checked_mul(kind.block_bytes() as u64)
        .ok_or_else(|| {
            p.err(format!(
                "tensor '{name}': byte size of {elems} {kind} elements overflows"
            ))
        })
}

/// No two tensors may share a byte (empty tensors overlap nothing).
fn check_overlap(p: &Parser, tensors: &[GgufTensor]) -> Result<()> {
    let mut order: Vec<&GgufTensor> = tensors.iter().filter(|t| !t.range.is_empty()).collect();
    order.sort_by_key(|t| (t.range.start, t.range.end));
    for pair in order.windows(2) {
        if let [a, b] = pair {
            if b.range.start < a.range.end {
                return Err(p.err(format!(
                    "tensors '{}' and '{}' overlap: bytes {:?} and {:?}",
                    a.name, b.name, a.range, b.range
                )));
            }
        }
    }
    Ok(())
}

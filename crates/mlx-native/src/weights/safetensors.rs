//! safetensors files, single or sharded (`model.safetensors.index.json`), memory-mapped and
//! validated once: the header through the `safetensors` crate (offsets in bounds, contiguous,
//! byte size = shape × dtype), then every tensor's dtype against the ones we can upload.
//!
//! Dense f32/f16/bf16 tensors upload as [`MlxBuffer`]s; MLX-quantized linears (the triple
//! `<name>.weight` u32 packed, `<name>.scales`, `<name>.biases`, as `mlx.nn.QuantizedLinear`
//! saves them) upload as [`QuantWeight`] with the bits/group size the caller read from the
//! model's config; stacked experts (`switch_mlp.*_proj`, a leading expert axis) upload as
//! [`QuantExperts`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

use crate::buffer::MlxBuffer;
use crate::device::MlxDevice;
use crate::dtype::DType;
use crate::error::{MlxError, Result};
use crate::weights::expert_weight::QuantExperts;
use crate::weights::quant::{packed_words_per_row, QuantMode, QuantParams};
use crate::weights::quant_weight::QuantWeight;

/// The stored parts of a quantized module: packed words, scale and bias bytes (biases:
/// affine only), and the model dtype.
struct QuantParts<'a> {
    packed: Vec<u32>,
    scales: &'a [u8],
    biases: Option<&'a [u8]>,
    dtype: DType,
}

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct SafeTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    range: Range<usize>,
}

impl SafeTensor {
    pub fn n_elems(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn n_bytes(&self) -> usize {
        self.range.len()
    }
}

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

/// One parsed, validated safetensors file and its bytes.
pub struct SafetensorsFile {
    name: String,
    tensors: Vec<SafeTensor>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    storage: Storage,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("name", &self.name)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn dtype_of(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::U8 => DType::U8,
        Dtype::U16 => DType::U16,
        Dtype::U32 => DType::U32,
        Dtype::I32 => DType::I32,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Memory-map and validate the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| MlxError::io(&shown, e))?;
        // SAFETY: a read-only private map; as for GGUF (see `GgufFile::open`) model files
        // must not be rewritten while in use. Every read goes through checked slices.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| MlxError::io(&shown, e))?;
        Self::from_storage(&shown, Storage::Mmap(map))
    }

    /// Parse a file held in memory (for tests and embedded weights). `name` appears in errors.
    pub fn from_vec(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(name, Storage::Owned(bytes))
    }

    fn from_storage(name: &str, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let (header_len, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| MlxError::format(name, format!("not a valid safetensors file: {e}")))?;
        let data_start = header_len
            .checked_add(8)
            .ok_or_else(|| MlxError::format(name, "header length overflows"))?;
        let mut tensors = Vec::new();
        for (tname, info) in meta.tensors() {
            let dtype = dtype_of(info.dtype).ok_or_else(|| {
                MlxError::format(
                    name,
                    format!(
                        "tensor {tname}: dtype {:?} is not supported (f32, f16, bf16, u8, u16, u32, i32)",
                        info.dtype
                    ),
                )
            })?;
            let (a, b) = info.data_offsets;
            let range = data_start.checked_add(a).zip(data_start.checked_add(b));
            let range = match range {
                Some((s, e)) if s <= e && e <= bytes.len() => s..e,
                _ => {
                    return Err(MlxError::format(
                        name,
                        format!("tensor {tname}: data offsets {a}..{b} lie outside the file"),
                    ))
                }
            };
            let want = info
                .shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d));
            if want != Some(range.len()) {
                return Err(MlxError::format(
                    name,
                    format!(
                        "tensor {tname}: shape {:?} of {dtype} does not match its {} bytes",
                        info.shape,
                        range.len()
                    ),
                ));
            }
            tensors.push(SafeTensor {
                name: tname.clone(),
                dtype,
                shape: info.shape.clone(),
                range,
            });
        }
        tensors.sort_by(|a, b| a.range.start.cmp(&b.range.start).then(a.name.cmp(&b.name)));
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(SafetensorsFile {
            name: name.to_string(),
            tensors,
            index,
            metadata,
            storage,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[SafeTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&SafeTensor> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Raw little-endian bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensor(name)
            .ok_or_else(|| MlxError::format(&self.name, format!("no tensor {name}")))?;
        self.storage.bytes().get(t.range.clone()).ok_or_else(|| {
            MlxError::format(&self.name, format!("tensor {name}: data out of bounds"))
        })
    }
}

/// The weights of a model: one safetensors file or several shards.
#[derive(Debug)]
pub struct SafetensorsSet {
    files: Vec<SafetensorsFile>,
    /// tensor name -> (file index, tensor index), over all files.
    index: BTreeMap<String, (usize, usize)>,
}

impl SafetensorsSet {
    /// The given files (any order); a tensor name present in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let files = paths
            .iter()
            .map(SafetensorsFile::open)
            .collect::<Result<Vec<_>>>()?;
        Self::from_files(files)
    }

    pub fn from_files(files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut index = BTreeMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ti, t) in f.tensors.iter().enumerate() {
                if let Some((prev, _)) = index.insert(t.name.clone(), (fi, ti)) {
                    let other = files.get(prev).map_or("?", |p| p.name());
                    return Err(MlxError::format(
                        f.name(),
                        format!("tensor {} is also in {other}", t.name),
                    ));
                }
            }
        }
        Ok(SafetensorsSet { files, index })
    }

    /// The weights of a model folder: the shards `model.safetensors.index.json` lists (each
    /// must exist, and hold the tensors the index maps to it), else every `*.safetensors`
    /// file in the folder. Errors when there is none.
    pub fn open_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let shown = index_path.display().to_string();
            let text = std::fs::read_to_string(&index_path).map_err(|e| MlxError::io(&shown, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| MlxError::format(&shown, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| MlxError::format(&shown, "no \"weight_map\" object"))?;
            let mut shards: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    MlxError::format(&shown, format!("weight_map[{tensor:?}] is not a file name"))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(MlxError::format(
                        &shown,
                        format!("weight_map[{tensor:?}] = {file:?} is not a plain file name"),
                    ));
                }
                if !shards.iter().any(|s| s == file) {
                    shards.push(file.to_string());
                }
            }
            shards.sort();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let set = Self::open_files(&paths)?;
            for (tensor, file) in map {
                let in_file = set.file_of(tensor).map(|f| f.name().to_string());
                let want = dir
                    .join(file.as_str().unwrap_or_default())
                    .display()
                    .to_string();
                if in_file.as_deref() != Some(want.as_str()) {
                    return Err(MlxError::format(
                        &shown,
                        format!(
                            "tensor {tensor} is mapped to {file}, but that shard does not hold it"
                        ),
                    ));
                }
            }
            return Ok(set);
        }
        let shown = dir.display().to_string();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| MlxError::io(&shown, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if paths.is_empty() {
            return Err(MlxError::format(&shown, "no *.safetensors files"));
        }
        paths.sort();
        Self::open_files(&paths)
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Number of tensors over all files.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&SafeTensor> {
        let &(f, t) = self.index.get(name)?;
        self.files.get(f)?.tensors.get(t)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        let &(f, _) = self.index.get(name)?;
        self.files.get(f)
    }

    fn file_name_of(&self, name: &str) -> String {
        self.file_of(name)
            .map_or_else(|| self.folder_name(), |f| f.name().to_string())
    }

    /// The folder of the files (for errors about tensors no file holds); the first file's
    /// name when it has no folder (in-memory files).
    fn folder_name(&self) -> String {
        let Some(first) = self.files.first() else {
            return "safetensors".into();
        };
        match Path::new(first.name()).parent() {
            Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
            _ => first.name().to_string(),
        }
    }

    /// The tensor `name` or a `Format` error naming it.
    pub fn require(&self, name: &str) -> Result<(&SafetensorsFile, &SafeTensor)> {
        let &(f, t) = self.index.get(name).ok_or_else(|| {
            MlxError::format(self.folder_name(), format!("missing tensor {name}"))
        })?;
        let file = self.files.get(f).ok_or_else(|| {
            MlxError::format(self.folder_name(), format!("missing tensor {name}"))
        })?;
        let tensor = file
            .tensors
            .get(t)
            .ok_or_else(|| MlxError::format(file.name(), format!("missing tensor {name}")))?;
        Ok((file, tensor))
    }

    /// Raw bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (f, _) = self.require(name)?;
        f.tensor_bytes(name)
    }

    /// A float tensor as f32 values, whatever its float dtype (norm weights, biases).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (f, t) = self.require(name)?;
        let b = f.tensor_bytes(name)?;
        Ok(match t.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(MlxError::format(
                    f.name(),
                    format!("tensor {name}: dtype {other}, expected f32, f16 or bf16"),
                ))
            }
        })
    }

    /// Upload a dense float tensor as it is stored (f32, f16 or bf16).
    pub fn upload_dense(&self, gpu: &MlxDevice, name: &str) -> Result<MlxBuffer> {
        let (f, t) = self.require(name)?;
        if !t.dtype.is_float() {
            return Err(MlxError::format(
                f.name(),
                format!(
                    "tensor {name}: dtype {}, expected f32, f16 or bf16",
                    t.dtype
                ),
            ));
        }
        MlxBuffer::from_bytes(gpu, f.tensor_bytes(name)?, t.dtype, &t.shape)
    }

    /// True when `<prefix>.scales` exists, i.e. the module `prefix` is MLX-quantized.
    pub fn is_quantized(&self, prefix: &str) -> bool {
        self.index.contains_key(&format!("{prefix}.scales"))
    }

    /// The logical `[N, K]` shape of the quantized linear `prefix` at `params`, from its
    /// packed weight (`[N, K * bits / 32]` u32), checked against scales (and biases).
    pub fn quant_shape(&self, prefix: &str, params: QuantParams) -> Result<[usize; 2]> {
        let d = self.quant_dims(prefix, params, 2)?;
        Ok([d[0], d[1]])
    }

    /// The logical `[E, N, K]` shape of the MLX-quantized stacked experts `prefix`
    /// (`mlx_lm`'s `QuantizedSwitchLinear`: packed `[E, N, K * bits / 32]` u32, scales and
    /// biases `[E, N, K / group_size]`).
    pub fn quant_experts_shape(&self, prefix: &str, params: QuantParams) -> Result<[usize; 3]> {
        let d = self.quant_dims(prefix, params, 3)?;
        Ok([d[0], d[1], d[2]])
    }

    /// Logical dims of a quantized tensor of `rank` dims (the last is K), checked against
    /// its scales.
    fn quant_dims(&self, prefix: &str, params: QuantParams, rank: usize) -> Result<Vec<usize>> {
        let wname = format!("{prefix}.weight");
        let sname = format!("{prefix}.scales");
        let (wf, w) = self.require(&wname)?;
        let (sf, s) = self.require(&sname)?;
        let bad = |file: &str, what: String| Err(MlxError::format(file, what));
        let what = if rank == 2 {
            "a u32 [N, K*bits/32] packed matrix"
        } else {
            "a u32 [E, N, K*bits/32] packed expert stack"
        };
        if w.dtype != DType::U32 || w.shape.len() != rank {
            return bad(
                wf.name(),
                format!(
                    "tensor {wname}: {} {:?}, expected {what} (the config says {}-bit {})",
                    w.dtype, w.shape, params.bits, params.mode
                ),
            );
        }
        let words = w.shape[rank - 1];
        let k = words * 32 / params.bits.max(1) as usize;
        if packed_words_per_row(k, params.bits).ok() != Some(words) {
            return bad(
                wf.name(),
                format!(
                    "tensor {wname}: {words} words per row do not hold whole {}-bit rows",
                    params.bits
                ),
            );
        }
        let groups = k / params.group_size.max(1) as usize;
        let want_sdt = match params.mode {
            QuantMode::Affine => None,
            QuantMode::Mxfp4 => Some(DType::U8),
        };
        let mut want_shape = w.shape.clone();
        want_shape[rank - 1] = groups;
        let mut dims = w.shape.clone();
        dims[rank - 1] = k;
        if s.shape != want_shape
            || want_sdt.is_some_and(|d| d != s.dtype)
            || (want_sdt.is_none() && !s.dtype.is_float())
        {
            return bad(
                sf.name(),
                format!(
                    "tensor {sname}: {} {:?}, expected {} {want_shape:?} for {}-bit group-{} {} weights of shape {dims:?}",
                    s.dtype,
                    s.shape,
                    want_sdt.map_or("float".to_string(), |d| d.to_string()),
                    params.bits,
                    params.group_size,
                    params.mode
                ),
            );
        }
        Ok(dims)
    }

    /// Upload the MLX-quantized linear `prefix` (`.weight`, `.scales`, `.biases`) at `params`.
    pub fn upload_quant(
        &self,
        gpu: &MlxDevice,
        prefix: &str,
        params: QuantParams,
    ) -> Result<QuantWeight> {
        let shape = self.quant_shape(prefix, params)?;
        let q = self.quant_parts(prefix, params)?;
        QuantWeight::from_raw(gpu, &q.packed, q.scales, q.biases, shape, params, q.dtype)
            .map_err(|e| self.tensor_error(prefix, e))
    }

    /// Upload the MLX-quantized stacked experts `prefix` (`switch_mlp.up_proj` as mlx-lm
    /// stores them; see [`SafetensorsSet::quant_experts_shape`]) at `params`.
    pub fn upload_quant_experts(
        &self,
        gpu: &MlxDevice,
        prefix: &str,
        params: QuantParams,
    ) -> Result<QuantExperts> {
        let shape = self.quant_experts_shape(prefix, params)?;
        let q = self.quant_parts(prefix, params)?;
        QuantExperts::from_raw(gpu, &q.packed, q.scales, q.biases, shape, params, q.dtype)
            .map_err(|e| self.tensor_error(prefix, e))
    }

    fn tensor_error(&self, prefix: &str, e: MlxError) -> MlxError {
        let wname = format!("{prefix}.weight");
        MlxError::format(self.file_name_of(&wname), format!("tensor {wname}: {e}"))
    }

    /// The parts of the quantized module `prefix` (shapes already checked by
    /// [`SafetensorsSet::quant_dims`]).
    fn quant_parts(&self, prefix: &str, params: QuantParams) -> Result<QuantParts<'_>> {
        let wname = format!("{prefix}.weight");
        let sname = format!("{prefix}.scales");
        let bname = format!("{prefix}.biases");
        let packed: Vec<u32> = self
            .bytes(&wname)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (_, s) = self.require(&sname)?;
        let sdt = s.dtype;
        let scales = self.bytes(&sname)?;
        let biases = match params.mode {
            QuantMode::Affine => {
                let (bf, b) = self.require(&bname)?;
                if b.dtype != sdt || b.shape != s.shape {
                    return Err(MlxError::format(
                        bf.name(),
                        format!(
                            "tensor {bname}: {} {:?}, expected {sdt} {:?} like {sname}",
                            b.dtype, b.shape, s.shape
                        ),
                    ));
                }
                Some(self.bytes(&bname)?)
            }
            QuantMode::Mxfp4 => {
                if self.index.contains_key(&bname) {
                    return Err(MlxError::format(
                        self.file_name_of(&bname),
                        format!("tensor {bname}: mxfp4 weights have no biases"),
                    ));
                }
                None
            }
        };
        let dtype = match params.mode {
            QuantMode::Affine => sdt,
            QuantMode::Mxfp4 => DType::BF16,
        };
        Ok(QuantParts {
            packed,
            scales,
            biases,
            dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use safetensors::tensor::TensorView;

    fn build(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: HashMap<String, TensorView<'_>> = tensors
            .iter()
            .map(|(n, d, s, b)| ((*n).to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::tensor::serialize(&views, None).unwrap()
    }

    #[test]
    fn reads_tensors_and_converts_floats() {
        let f32s: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bf: Vec<u8> = [half::bf16::from_f32(0.5), half::bf16::from_f32(-4.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = build(&[
            ("a", Dtype::F32, vec![3], f32s),
            ("b", Dtype::BF16, vec![1, 2], bf),
        ]);
        let f = SafetensorsFile::from_vec("t.safetensors", bytes).unwrap();
        let set = SafetensorsSet::from_files(vec![f]).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.to_f32("a").unwrap(), vec![1.5, -2.0, 3.25]);
        assert_eq!(set.to_f32("b").unwrap(), vec![0.5, -4.0]);
        assert_eq!(set.tensor("b").unwrap().shape, vec![1, 2]);
        let e = set.to_f32("c").unwrap_err().to_string();
        assert_eq!(e, "t.safetensors: missing tensor c");
    }

    #[test]
    fn rejects_unsupported_dtype_and_garbage() {
        let bytes = build(&[("x", Dtype::F64, vec![1], vec![0; 8])]);
        let e = SafetensorsFile::from_vec("m.safetensors", bytes)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m.safetensors: tensor x: dtype F64 is not supported (f32, f16, bf16, u8, u16, u32, i32)"
        );
        let e = SafetensorsFile::from_vec("g.safetensors", vec![1, 2, 3])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("g.safetensors: not a valid safetensors file"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_tensor_across_shards_is_an_error() {
        let a =
            SafetensorsFile::from_vec("a", build(&[("x", Dtype::U8, vec![1], vec![0])])).unwrap();
        let b =
            SafetensorsFile::from_vec("b", build(&[("x", Dtype::U8, vec![1], vec![0])])).unwrap();
        let e = SafetensorsSet::from_files(vec![a, b])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "b: tensor x is also in a");
    }

    #[test]
    fn quant_shape_checks_scales() {
        // [4, 64] at 4 bits: 8 words per row, group 32 -> 2 scales per row.
        let packed = vec![0u8; 4 * 8 * 4];
        let scales = vec![0u8; 4 * 2 * 2];
        let bad_scales = vec![0u8; 4 * 3 * 2];
        let ok = build(&[
            ("l.weight", Dtype::U32, vec![4, 8], packed.clone()),
            ("l.scales", Dtype::F16, vec![4, 2], scales.clone()),
            ("l.biases", Dtype::F16, vec![4, 2], scales.clone()),
        ]);
        let set =
            SafetensorsSet::from_files(vec![SafetensorsFile::from_vec("q", ok).unwrap()]).unwrap();
        assert!(set.is_quantized("l"));
        assert_eq!(
            set.quant_shape("l", QuantParams::affine(4, 32)).unwrap(),
            [4, 64]
        );
        let e = set
            .quant_shape("l", QuantParams::affine(4, 64))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "q: tensor l.scales: f16 [4, 2], expected float [4, 1] for 4-bit group-64 affine weights of shape [4, 64]"
        );
        let bad = build(&[
            ("l.weight", Dtype::U32, vec![4, 8], packed),
            ("l.scales", Dtype::F16, vec![4, 3], bad_scales),
        ]);
        let set =
            SafetensorsSet::from_files(vec![SafetensorsFile::from_vec("q", bad).unwrap()]).unwrap();
        assert!(set.quant_shape("l", QuantParams::affine(4, 32)).is_err());
    }

    #[test]
    fn quant_experts_shape_and_upload() {
        // 2 experts of [4, 64] at 4 bits, group 32: packed [2, 4, 8], scales [2, 4, 2].
        let packed: Vec<u8> = (0..2 * 4 * 8 * 4).map(|i| i as u8).collect();
        let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
        let scales: Vec<u8> = (0..16).flat_map(|i| half(0.5 + i as f32 / 16.0)).collect();
        let f = build(&[
            ("e.weight", Dtype::U32, vec![2, 4, 8], packed.clone()),
            ("e.scales", Dtype::F16, vec![2, 4, 2], scales.clone()),
            ("e.biases", Dtype::F16, vec![2, 4, 2], scales.clone()),
            ("m.weight", Dtype::U32, vec![4, 8], packed[..128].to_vec()),
            ("m.scales", Dtype::F16, vec![4, 2], scales[..16].to_vec()),
        ]);
        let set =
            SafetensorsSet::from_files(vec![SafetensorsFile::from_vec("x", f).unwrap()]).unwrap();
        let p = QuantParams::affine(4, 32);
        assert_eq!(set.quant_experts_shape("e", p).unwrap(), [2, 4, 64]);
        let e = set.quant_shape("e", p).unwrap_err().to_string();
        assert_eq!(
            e,
            "x: tensor e.weight: u32 [2, 4, 8], expected a u32 [N, K*bits/32] packed matrix (the config says 4-bit affine)"
        );
        let e = set.quant_experts_shape("m", p).unwrap_err().to_string();
        assert_eq!(
            e,
            "x: tensor m.weight: u32 [4, 8], expected a u32 [E, N, K*bits/32] packed expert stack (the config says 4-bit affine)"
        );
        let e = set
            .quant_experts_shape("e", QuantParams::affine(4, 64))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x: tensor e.scales: f16 [2, 4, 2], expected float [2, 4, 1] for 4-bit group-64 affine weights of shape [2, 4, 64]"
        );
        let gpu = crate::testutil::gpu();
        let w = set.upload_quant_experts(gpu, "e", p).unwrap();
        assert_eq!(w.shape(), [2, 4, 64]);
        assert_eq!(w.weight().packed().to_vec::<u32>(gpu).unwrap().len(), 64);
        // The packed words keep MLX's layout: expert 1's first word is bytes 128..132.
        assert_eq!(
            w.weight().packed().to_vec::<u32>(gpu).unwrap()[32],
            u32::from_le_bytes([128, 129, 130, 131])
        );
    }
}

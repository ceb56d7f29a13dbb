//! GGUF parser tests: a writer that builds small files in memory, a corpus of malformed
//! files each checked for its specific error, and the `gguf`-package fixture
//! (`scripts/fixtures/gguf_blocks.py`) as an independent oracle for parsing and dequant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

// Value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_F64: u32 = 12;

fn str_bytes(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// An encoded metadata value: (type id, bytes after the type id).
type Val = (u32, Vec<u8>);

fn v_u8(x: u8) -> Val {
    (T_U8, vec![x])
}
fn v_i8(x: i8) -> Val {
    (T_I8, x.to_le_bytes().to_vec())
}
fn v_u16(x: u16) -> Val {
    (T_U16, x.to_le_bytes().to_vec())
}
fn v_u32(x: u32) -> Val {
    (4, x.to_le_bytes().to_vec())
}
fn v_f32(x: f32) -> Val {
    (T_F32, x.to_le_bytes().to_vec())
}
fn v_u64(x: u64) -> Val {
    (T_U64, x.to_le_bytes().to_vec())
}
fn v_f64(x: f64) -> Val {
    (T_F64, x.to_le_bytes().to_vec())
}
fn v_bool(x: bool) -> Val {
    (T_BOOL, vec![x as u8])
}
fn v_str(s: &str) -> Val {
    (T_STRING, str_bytes(s.as_bytes()))
}
/// An array of `count` elements of type `elem` whose encoded elements are `body`.
fn v_arr(elem: u32, count: u64, body: Vec<u8>) -> Val {
    let mut v = elem.to_le_bytes().to_vec();
    v.extend_from_slice(&count.to_le_bytes());
    v.extend(body);
    (T_ARRAY, v)
}

struct TestTensor {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    /// `None`: placed after the previous tensor, aligned.
    offset: Option<u64>,
    data: Vec<u8>,
}

/// Builds GGUF files, valid or deliberately broken.
struct Builder {
    magic: [u8; 4],
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kvs: Vec<(Vec<u8>, Val)>,
    tensors: Vec<TestTensor>,
    alignment: u64,
}

impl Builder {
    fn new() -> Self {
        Builder {
            magic: *b"GGUF",
            version: 3,
            n_tensors: None,
            n_kv: None,
            kvs: vec![],
            tensors: vec![],
            alignment: 32,
        }
    }

    fn kv(mut self, key: &str, v: Val) -> Self {
        self.kvs.push((key.as_bytes().to_vec(), v));
        self
    }

    fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(TestTensor {
            name: name.to_string(),
            ne: ne.to_vec(),
            type_id,
            offset: None,
            data,
        });
        self
    }

    fn at(mut self, offset: u64) -> Self {
        if let Some(t) = self.tensors.last_mut() {
            t.offset = Some(offset);
        }
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut b = self.magic.to_vec();
        b.extend(self.version.to_le_bytes());
        let n_t = self.n_tensors.unwrap_or(self.tensors.len() as u64);
        b.extend(n_t.to_le_bytes());
        b.extend(self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, (t, v)) in &self.kvs {
            b.extend(str_bytes(k));
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        let mut next = 0u64;
        let mut placed = vec![];
        for t in &self.tensors {
            b.extend(str_bytes(t.name.as_bytes()));
            b.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.type_id.to_le_bytes());
            let off = t.offset.unwrap_or(next);
            b.extend(off.to_le_bytes());
            next = off
                .wrapping_add(t.data.len() as u64)
                .next_multiple_of(self.alignment);
            placed.push(off);
        }
        let data_start = (b.len() as u64).next_multiple_of(self.alignment) as usize;
        for (t, off) in self.tensors.iter().zip(placed) {
            let start = match (data_start as u64).checked_add(off) {
                Some(s) if s <= 1 << 20 => s as usize,
                _ => continue, // a deliberately bogus offset: leave the data out
            };
            let end = start + t.data.len();
            if b.len() < end {
                b.resize(end, 0);
            }
            b[start..end].copy_from_slice(&t.data);
        }
        b
    }
}

const F32_ID: u32 = 0;
const F16_ID: u32 = 1;
const Q8_0_ID: u32 = 8;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A Q8_0 block with scale `d` and quants `0, 1, ..., 31` shifted by -16.
fn q8_block(d: f32) -> Vec<u8> {
    let mut b = half::f16::from_f32(d).to_bits().to_le_bytes().to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    b
}

/// A small valid file with metadata of several types and three tensors; the last tensor
/// ends exactly at the end of the file.
fn valid() -> Builder {
    let strings: Vec<u8> = ["a", "bc", ""]
        .iter()
        .flat_map(|s| str_bytes(s.as_bytes()))
        .collect();
    let inner = |xs: &[i32]| {
        let mut v = T_I32.to_le_bytes().to_vec();
        v.extend((xs.len() as u64).to_le_bytes());
        v.extend(xs.iter().flat_map(|x| x.to_le_bytes()));
        v
    };
    let nested: Vec<u8> = [inner(&[1, 2]), inner(&[3])].concat();
    let mut q8 = q8_block(0.5);
    q8.extend(q8_block(-2.0));
    Builder::new()
        .kv("general.architecture", v_str("llama"))
        .kv("llama.block_count", v_u32(30))
        .kv("small", v_u8(7))
        .kv("neg", v_i8(-3))
        .kv("half", v_u16(65535))
        .kv("eps", v_f32(1e-5))
        .kv("wide", v_u64(1 << 40))
        .kv("third", v_f64(1.0 / 3.0))
        .kv("exact", v_f64(0.5))
        .kv("flag", v_bool(true))
        .kv("tokens", v_arr(T_STRING, 3, strings))
        .kv("nested", v_arr(T_ARRAY, 2, nested))
        .tensor("a", &[3, 2], F32_ID, f32_bytes(&[1., 2., 3., 4., 5., 6.]))
        .tensor("c", &[4], F16_ID, vec![0, 0x3c, 0, 0x40, 0, 0xc0, 0, 0])
        .tensor("b", &[32, 2], Q8_0_ID, q8)
}

fn parse(b: &[u8]) -> Result<GgufFile> {
    GgufFile::parse("t.gguf", b)
}

/// The Format error text of parsing `b`; fails the test if parsing succeeds or the error
/// is of another kind.
fn format_err(b: &[u8]) -> String {
    match parse(b) {
        Err(MlxError::Format { file, what }) => {
            assert_eq!(file, "t.gguf");
            what
        }
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(_) => panic!("expected a format error, parse succeeded"),
    }
}

fn assert_err(b: &Builder, parts: &[&str]) {
    let what = format_err(&b.build());
    for p in parts {
        assert!(what.contains(p), "error {what:?} does not contain {p:?}");
    }
}

#[test]
fn valid_file_metadata() {
    let f = parse(&valid().build()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    // lossless integer coercion
    assert_eq!(f.get_u32("small").unwrap(), 7);
    assert_eq!(f.get_u64("half").unwrap(), 65535);
    assert_eq!(f.get_i64("neg").unwrap(), -3);
    assert_eq!(f.get::<u64>("wide").unwrap(), 1 << 40);
    assert_eq!(f.get_f32("eps").unwrap(), 1e-5);
    assert_eq!(f.get_f32("exact").unwrap(), 0.5);
    assert_eq!(f.get::<f64>("third").unwrap(), 1.0 / 3.0);
    assert!(f.get_bool("flag").unwrap());
    let tokens = f.get_array("tokens").unwrap();
    assert_eq!(tokens.as_strings().unwrap(), ["a", "bc", ""]);
    let nested = f.get_array("nested").unwrap();
    assert_eq!(
        nested,
        &GgufArray::Array(vec![GgufArray::I32(vec![1, 2]), GgufArray::I32(vec![3])])
    );
    let keys: Vec<&str> = f.metadata().map(|(k, _)| k).collect();
    assert_eq!(keys.first(), Some(&"general.architecture"));
    assert_eq!(keys.len(), 12);
    assert!(f.get_opt::<u32>("absent").unwrap().is_none());
}

#[test]
fn metadata_errors_name_the_key() {
    let f = parse(&valid().build()).unwrap();
    let e = f.get_u32("absent").unwrap_err().to_string();
    assert_eq!(e, "t.gguf: missing metadata key 'absent'");
    let e = f.get::<u8>("neg").unwrap_err().to_string();
    assert!(
        e.contains("'neg' is i8 -3, which does not convert to u8"),
        "{e}"
    );
    let e = f.get::<u16>("wide").unwrap_err().to_string();
    assert!(e.contains("'wide' is u64 1099511627776"), "{e}");
    let e = f.get_u32("general.architecture").unwrap_err().to_string();
    assert!(
        e.contains("is string \"llama\", which does not convert to u32"),
        "{e}"
    );
    let e = f.get_f32("third").unwrap_err().to_string();
    assert!(e.contains("'third' is f64 0.333"), "{e}");
    let e = f.get_str("tokens").unwrap_err().to_string();
    assert!(e.contains("an array of 3 string"), "{e}");
}

#[test]
fn valid_file_tensors() {
    let f = parse(&valid().build()).unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "c", "b"]);
    let a = f.tensor("a").unwrap();
    assert_eq!(a.ne, [3, 2]);
    assert_eq!(a.shape, [2, 3]);
    assert_eq!(a.kind, GgmlType::F32);
    assert_eq!(a.offset, 0);
    assert_eq!(a.range.start, f.data_offset());
    assert_eq!(a.n_elems(), 6);
    assert_eq!(f.dequantize_tensor("a").unwrap(), [1., 2., 3., 4., 5., 6.]);
    let c = f.tensor("c").unwrap();
    assert_eq!(c.offset, 32);
    assert_eq!(f.tensor_bytes("c").unwrap().len(), 8);
    assert_eq!(f.dequantize_tensor("c").unwrap(), [1., 2., -2., 0.]);
    let b = f.tensor("b").unwrap();
    assert_eq!(
        (b.shape.clone(), b.kind, b.n_bytes()),
        (vec![2, 32], GgmlType::Q8_0, 68)
    );
    assert_eq!(b.range.end, f.bytes().len());
    let v = f.dequantize_tensor("b").unwrap();
    assert_eq!(v[0], -8.0);
    assert_eq!(v[31], 7.5);
    assert_eq!(v[32], 32.0);
    assert_eq!(v[63], -30.0);
    let e = f.tensor_bytes("zz").unwrap_err().to_string();
    assert_eq!(e, "t.gguf: no tensor named 'zz'");
    assert!(f.dequantize_tensor("zz").is_err());
}

#[test]
fn version_2_scalars_empty_tensors_and_wide_alignment() {
    let mut b = Builder::new()
        .kv("general.alignment", v_u32(64))
        .tensor("scalar", &[], F32_ID, f32_bytes(&[2.5]))
        .tensor("empty", &[0, 4], F32_ID, vec![])
        .tensor("x", &[2], F32_ID, f32_bytes(&[1., -1.]));
    b.version = 2;
    b.alignment = 64;
    let f = parse(&b.build()).unwrap();
    assert_eq!((f.version(), f.alignment()), (2, 64));
    assert_eq!(f.data_offset() % 64, 0);
    let s = f.tensor("scalar").unwrap();
    assert_eq!((s.shape.len(), s.n_elems()), (0, 1));
    assert_eq!(f.dequantize_tensor("scalar").unwrap(), [2.5]);
    assert_eq!(f.tensor("empty").unwrap().n_elems(), 0);
    assert!(f.dequantize_tensor("empty").unwrap().is_empty());
    assert_eq!(f.tensor("x").unwrap().offset, 64);
}

#[test]
fn open_maps_a_file() {
    let dir = std::env::temp_dir().join(format!("mlx-native-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("valid.gguf");
    std::fs::write(&path, valid().build()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.dequantize_tensor("a").unwrap()[5], 6.0);
    std::fs::remove_file(&path).unwrap();
    let e = GgufFile::open(&path).unwrap_err();
    assert!(matches!(e, MlxError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("valid.gguf"));
}

#[test]
fn every_truncation_fails_past_end_of_file() {
    let full = valid().build();
    assert!(parse(&full).is_ok());
    for len in 0..full.len() {
        let what = format_err(&full[..len]);
        assert!(
            what.contains("past the end of the file"),
            "prefix of {len} bytes: {what}"
        );
    }
}

#[test]
fn bad_magic_and_versions() {
    let mut b = valid();
    b.magic = *b"GGML";
    assert_err(&b, &["not a GGUF file", "47 47 55 46"]);
    for v in [1, 4, 0] {
        let mut b = valid();
        b.version = v;
        assert_err(&b, &[&format!("GGUF version {v} is not supported")]);
    }
    let mut b = valid();
    b.version = 3u32.swap_bytes();
    assert_err(&b, &["big-endian"]);
}

#[test]
fn huge_counts_fail_before_allocating() {
    let mut b = valid();
    b.n_tensors = Some(1 << 60);
    assert_err(
        &b,
        &["header claims 1152921504606846976 tensors", "past the end"],
    );
    let mut b = valid();
    b.n_kv = Some(u64::MAX);
    assert_err(&b, &["18446744073709551615 metadata entries"]);
    for (elem, name) in [
        (T_U8, "u8"),
        (T_F64, "f64"),
        (T_STRING, "string"),
        (T_ARRAY, "array"),
    ] {
        let b = valid().kv("big", v_arr(elem, 1 << 60, vec![0; 64]));
        assert_err(
            &b,
            &[
                "metadata key 'big'",
                &format!("array of 1152921504606846976 {name} elements"),
                "past the end of the file",
            ],
        );
    }
    // a nested array whose inner length is huge
    let mut inner = T_U32_BYTES.to_vec();
    inner.extend((1u64 << 60).to_le_bytes());
    let b = valid().kv("deep", v_arr(T_ARRAY, 1, inner));
    assert_err(
        &b,
        &[
            "metadata key 'deep' [0]",
            "array of 1152921504606846976 u32",
        ],
    );
}

const T_U32_BYTES: [u8; 4] = 4u32.to_le_bytes();

#[test]
fn string_lengths_past_end() {
    let mut s = 1000u64.to_le_bytes().to_vec();
    s.extend(b"short");
    let b = valid().kv("name", (T_STRING, s));
    assert_err(
        &b,
        &[
            "metadata key 'name'",
            "string length 1000 runs past the end of the file",
        ],
    );
    // a key whose length is 2^60
    let mut b = valid();
    b.kvs.insert(0, (vec![], v_u8(0)));
    let mut bytes = b.build();
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let what = format_err(&bytes);
    assert!(
        what.contains("metadata key #0: string length 1152921504606846976"),
        "{what}"
    );
    // a tensor name past the end
    let mut b = valid();
    b.tensors[0].name = "x".repeat(10);
    let mut bytes = b.build();
    let at = bytes.windows(10).position(|w| w == b"xxxxxxxxxx").unwrap() - 8;
    bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let what = format_err(&bytes);
    assert!(
        what.contains("tensor #0 name: string length 18446744073709551615"),
        "{what}"
    );
}

#[test]
fn bad_values() {
    assert_err(
        &valid().kv("k", (13, vec![0; 8])),
        &["metadata key 'k'", "unknown value type 13"],
    );
    assert_err(
        &valid().kv("k", (T_BOOL, vec![2])),
        &["'k'", "bool value 2 is neither 0 nor 1"],
    );
    assert_err(
        &valid().kv("k", v_arr(T_BOOL, 2, vec![1, 5])),
        &["'k' [1]", "bool value 5"],
    );
    assert_err(
        &valid().kv("k", (T_STRING, str_bytes(&[0x66, 0xff]))),
        &["'k'", "not valid UTF-8"],
    );
    let mut b = valid();
    b.kvs.push((vec![0xc3], v_u8(1)));
    assert_err(&b, &["metadata key #12", "not valid UTF-8"]);
    assert_err(
        &valid().kv("small", v_u8(1)),
        &["duplicate metadata key 'small'"],
    );
}

#[test]
fn nesting_is_bounded() {
    // an empty u8 array wrapped in arrays: depth 8 is accepted, 9 is not
    let wrap = |depth: usize| {
        let mut v = T_U8.to_le_bytes().to_vec();
        v.extend(0u64.to_le_bytes());
        for _ in 1..depth {
            let mut outer = T_ARRAY.to_le_bytes().to_vec();
            outer.extend(1u64.to_le_bytes());
            outer.extend(v);
            v = outer;
        }
        (T_ARRAY, v)
    };
    assert!(parse(&valid().kv("d", wrap(8)).build()).is_ok());
    assert_err(&valid().kv("d", wrap(9)), &["'d'", "nested deeper than 8"]);
    // a deep nest that would overflow the stack if recursion were unbounded
    assert_err(&valid().kv("d", wrap(100_000)), &["nested deeper than 8"]);
}

#[test]
fn bad_tensor_infos() {
    let mut b = valid();
    b.tensors[1].ne = vec![1, 1, 1, 1, 4];
    assert_err(&b, &["tensor 'c': 5 dimensions, at most 4"]);
    let mut b = valid();
    b.tensors[0].ne = vec![1 << 32, 1 << 32, 2];
    assert_err(
        &b,
        &["tensor 'a': dimensions [4294967296, 4294967296, 2] overflow"],
    );
    let mut b = valid();
    b.tensors[0].ne = vec![u64::MAX, 2];
    assert_err(&b, &["tensor 'a'", "overflow"]);
    let mut b = valid();
    b.tensors[2].ne = vec![33, 2];
    assert_err(
        &b,
        &["tensor 'b': first dimension 33 is not a multiple of the Q8_0 block size 32"],
    );
    let mut b = valid();
    b.tensors[0].type_id = 99;
    assert_err(&b, &["tensor 'a': unknown GGML type id 99"]);
    let mut b = valid();
    b.tensors[2].name = "a".into();
    assert_err(&b, &["duplicate tensor name 'a'"]);
    // a type GGML defines but this crate does not read is Unsupported, not malformed
    let mut b = valid();
    b.tensors[0].type_id = 16;
    match parse(&b.build()) {
        Err(MlxError::Unsupported(m)) => {
            assert!(
                m.contains("t.gguf: tensor 'a': GGML type 16 (IQ2_XXS)"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_offsets() {
    assert_err(
        &valid().at(0).at(8),
        &["tensor 'b': data offset 8 is not a multiple of the alignment 32"],
    );
    let b = valid().tensor("d", &[4], F32_ID, vec![]).at(1 << 40);
    assert_err(
        &b,
        &[
            "tensor 'd': data at offset 1099511627776",
            "runs past the end of the file",
        ],
    );
    let b = valid().tensor("d", &[4], F32_ID, vec![]).at(u64::MAX - 31);
    assert_err(&b, &["tensor 'd'", "past the end of the file"]);
    // 'b' placed on top of 'a'
    let mut b = valid();
    b.tensors[2].offset = Some(0);
    assert_err(&b, &["tensors 'a' and 'b' overlap"]);
    // a 16-element F32 tensor at 0 runs into 'c' at 32
    let mut b = valid();
    b.tensors[0].ne = vec![16];
    b.tensors[0].data = vec![0; 64];
    b.tensors[1].offset = Some(32);
    b.tensors[2].offset = Some(64);
    assert_err(&b, &["tensors 'a' and 'c' overlap: bytes"]);
}

#[test]
fn bad_alignment() {
    for (v, shown) in [
        (v_u32(0), "= 0"),
        (v_u32(3), "= 3"),
        (v_u64(1 << 33), "= 8589934592"),
    ] {
        let b = valid().kv("general.alignment", v);
        assert_err(
            &b,
            &["'general.alignment'", shown, "not a nonzero power of two"],
        );
    }
    let b = valid().kv("general.alignment", v_str("32"));
    assert_err(&b, &["'general.alignment' is string, expected an integer"]);
}

#[test]
fn no_panic_on_corrupted_bytes() {
    // flip every byte of the header and tables to a few values: parse may fail, never panic
    let full = valid().build();
    let tables = full.len() - 32 - 68 - 8;
    for i in 0..tables {
        for x in [0u8, 0xff, 0x80, 1, 5, 9] {
            let mut b = full.clone();
            b[i] = x;
            if let Ok(f) = parse(&b) {
                for t in f.tensors() {
                    let _ = f.dequantize_tensor(&t.name);
                }
            }
        }
    }
}

fn fixture_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/blocks.gguf")
}

/// The file written by the `gguf` package parses to the values it was given.
#[test]
fn fixture_metadata_from_the_gguf_package() {
    let f = GgufFile::open(fixture_path()).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "fixture");
    assert_eq!(f.value("fixture.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.value("fixture.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(f.value("fixture.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(f.value("fixture.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(f.value("fixture.u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(
        f.value("fixture.i32"),
        Some(&GgufValue::I32(-2_000_000_000))
    );
    assert_eq!(f.value("fixture.f32"), Some(&GgufValue::F32(0.1)));
    assert_eq!(f.value("fixture.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(f.get_str("fixture.string").unwrap(), "héllo, gguf");
    assert_eq!(f.value("fixture.u64"), Some(&GgufValue::U64((1 << 63) + 5)));
    assert_eq!(f.value("fixture.i64"), Some(&GgufValue::I64(-(1 << 62))));
    assert_eq!(f.value("fixture.f64"), Some(&GgufValue::F64(1.0 / 3.0)));
    let strings = f.get_array("fixture.strings").unwrap();
    assert_eq!(strings.as_strings().unwrap(), ["a", "", "ü", "merges b c"]);
    let floats = f.get_array("fixture.floats").unwrap();
    assert_eq!(floats.as_f32s().unwrap(), [1.5, -2.25, 0.0]);
    let nested = f.get_array("fixture.nested").unwrap();
    assert_eq!(
        nested,
        &GgufArray::Array(vec![GgufArray::I32(vec![1, 2]), GgufArray::I32(vec![3])])
    );
    assert_eq!(f.tensors().len(), 2 * GgmlType::ALL.len());
}

/// Our dequantization equals the `gguf` package's numpy dequantization bit for bit, for
/// every block type. Both compute in f32 with one rounding per multiply or add in the same
/// order (numpy does not fuse), so exact equality is the expected result.
#[test]
fn fixture_dequant_matches_the_gguf_package_bit_exactly() {
    let f = GgufFile::open(fixture_path()).unwrap();
    for kind in GgmlType::ALL {
        let name = kind.name().to_lowercase();
        let raw = f.tensor(&format!("{name}.raw")).unwrap();
        assert_eq!(raw.kind, kind);
        assert_eq!(raw.shape, [2, 1024]);
        let ours = f.dequantize_tensor(&raw.name).unwrap();
        let want = f.dequantize_tensor(&format!("{name}.deq")).unwrap();
        assert_eq!(ours.len(), want.len());
        let mismatches: Vec<usize> = (0..ours.len())
            .filter(|&i| ours[i].to_bits() != want[i].to_bits())
            .collect();
        assert!(
            mismatches.is_empty(),
            "{kind}: {} mismatches, first at {}: ours {} want {}",
            mismatches.len(),
            mismatches[0],
            ours[mismatches[0]],
            want[mismatches[0]]
        );
    }
}

/// The fuzz seeds (written by the `gguf` package, `fuzz/make_seeds.py`) are valid files.
#[test]
fn fuzz_seeds_parse_and_dequantize() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf_parse");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries {
        let path = e.unwrap().path();
        let f = GgufFile::open(&path).unwrap();
        for t in f.tensors() {
            assert_eq!(f.dequantize_tensor(&t.name).unwrap().len(), t.n_elems());
        }
        if path.ends_with("aligned.gguf") {
            assert_eq!(f.alignment(), 64);
            assert_eq!(f.tensor("b").unwrap().offset, 64);
        }
        if path.ends_with("blocks.gguf") {
            assert_eq!(f.tensors().len(), GgmlType::ALL.len());
        }
    }
}

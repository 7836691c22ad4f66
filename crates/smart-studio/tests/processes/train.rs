//! `smart-studio train` as a process: supervised, DPO and distillation runs on tiny random
//! models written by `studio_train::tiny`, and the errors of runs that cannot start. They need
//! neither Postgres nor the real model, and each run trains a few steps.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use tempfile::TempDir;

const BINARY: &str = env!("CARGO_BIN_EXE_smart-studio");

/// The reward columns of metrics.csv, which DPO steps fill.
const REWARD_COLUMNS: [&str; 4] = ["reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"];

/// A folder with a tiny student model, a tiny teacher model, an empty models folder and the
/// data files that the tests write.
struct Workspace {
    dir: TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("failed to create a temporary folder");
        for (name, seed) in [("student", 1), ("teacher", 2)] {
            studio_train::tiny::write_tiny_model_folder(&dir.path().join(name), "llama", seed)
                .unwrap_or_else(|error| panic!("failed to write the tiny {name} model: {error}"));
        }
        std::fs::create_dir(dir.path().join("models")).expect("failed to create the models folder");
        Workspace { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn student(&self) -> String {
        self.path("student").display().to_string()
    }

    fn teacher(&self) -> String {
        self.path("teacher").display().to_string()
    }

    /// Writes `lines` as a JSONL file and returns its path.
    fn write_jsonl(&self, name: &str, lines: &[Value]) -> String {
        let path = self.path(name);
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        std::fs::write(&path, text).unwrap_or_else(|error| panic!("failed to write {}: {error}", path.display()));
        path.display().to_string()
    }

    /// Runs `smart-studio train ARGS` with this workspace's models and data folders.
    fn train(&self, args: &[&str]) -> Output {
        Command::new(BINARY)
            .arg("--models-dir")
            .arg(self.path("models"))
            .arg("--data-dir")
            .arg(self.path("data"))
            .arg("train")
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|error| panic!("failed to start {BINARY}: {error}"))
    }
}

/// Asserts that the run succeeded and returns its standard output.
fn succeeded(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "train failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    stdout
}

/// Asserts that the run failed and returns its standard error.
fn failed(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "train succeeded but should fail\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stderr
}

fn conversation(question: &str, answer: &str) -> Value {
    json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
}

fn conversations() -> Vec<Value> {
    vec![
        conversation("sky?", "blue"),
        conversation("grass?", "green"),
        conversation("snow?", "white"),
        conversation("coal?", "black"),
    ]
}

fn preference_pairs() -> Vec<Value> {
    let pair = |prompt: &str, chosen: &str, rejected: &str| json!({"prompt": prompt, "chosen": chosen, "rejected": rejected});
    vec![
        pair("sky?", "blue", "green"),
        pair("grass?", "green", "blue"),
        pair("snow?", "white", "black"),
        pair("coal?", "black", "white"),
    ]
}

/// Reads metrics.csv as one map from column name to value per row.
fn metrics_rows(output_dir: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let path = output_dir.join("metrics.csv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("metrics.csv has a header").split(',').collect();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), header.len(), "row {line:?} does not match header {header:?}");
            header.iter().map(|h| h.to_string()).zip(fields.iter().map(|f| f.to_string())).collect()
        })
        .collect()
}

/// Returns the step count of the run's `Done:` summary line.
fn reported_steps(stdout: &str) -> usize {
    let line = stdout.lines().find(|line| line.starts_with("Done: ")).unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line["Done: ".len()..].split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no step count in {line:?}"))
}

fn num_hidden_layers(model_dir: &Path) -> u64 {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
    let config: Value = serde_json::from_str(&text).expect("config.json is JSON");
    config["num_hidden_layers"].as_u64().unwrap_or_else(|| panic!("no num_hidden_layers in {config}"))
}

#[test]
fn train_supervised_lora_writes_adapter() {
    let workspace = Workspace::new();
    let data = workspace.write_jsonl("chat.jsonl", &conversations());
    let out = workspace.path("out");
    let out_arg = out.display().to_string();
    let student = workspace.student();

    let stdout = succeeded(&workspace.train(&[
        "--model", &student, "--training-file", &data, "--output-dir", &out_arg,
        "--n-epochs", "2", "--batch-size", "2", "--r", "4",
    ]));

    assert!(out.join("adapter").join("adapter_config.json").is_file(), "no adapter in {}:\n{stdout}", out.display());
    assert!(!out.join("model").exists(), "a LoRA run wrote a full model");
    let rows = metrics_rows(&out);
    assert_eq!(rows.len(), 4, "2 epochs of 2 steps:\n{stdout}");
    assert_eq!(rows.len(), reported_steps(&stdout));
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row["step"], (index + 1).to_string());
        assert!(row["train_loss"].parse::<f64>().is_ok_and(f64::is_finite), "{row:?}");
        for column in REWARD_COLUMNS {
            assert_eq!(row[column], "", "a supervised step has no {column}: {row:?}");
        }
    }
}

#[test]
fn train_dpo_full_records_rewards() {
    let workspace = Workspace::new();
    let pairs = preference_pairs();
    let training = workspace.write_jsonl("pairs.jsonl", &pairs);
    let validation = workspace.write_jsonl("valid_pairs.jsonl", &pairs[..2]);
    let out = workspace.path("out");
    let out_arg = out.display().to_string();
    let student = workspace.student();

    let stdout = succeeded(&workspace.train(&[
        "--model", &student, "--method", "dpo", "--beta", "0.5", "--approach", "full",
        "--training-file", &training, "--validation-file", &validation, "--output-dir", &out_arg,
        "--n-epochs", "2", "--batch-size", "2", "--learning-rate", "1e-2",
    ]));

    assert!(out.join("model").join("config.json").is_file(), "no model in {}:\n{stdout}", out.display());
    let rows = metrics_rows(&out);
    assert_eq!(rows.len(), 4, "2 epochs of 2 steps:\n{stdout}");
    for row in &rows {
        for column in REWARD_COLUMNS {
            assert!(row[column].parse::<f64>().is_ok_and(f64::is_finite), "{column} of {row:?}");
        }
    }
    // The policy of the first step is the base model, so its margin is 0.
    assert_eq!(rows[0]["reward_margin"].parse::<f64>().unwrap(), 0.0);
    // Each epoch ends with an evaluation of the validation pairs.
    for step in [2, 4] {
        let row = &rows[step - 1];
        assert!(row["valid_loss"].parse::<f64>().is_ok_and(f64::is_finite), "valid_loss of step {step}: {row:?}");
    }
    assert_eq!(rows[0]["valid_loss"], "", "step 1 ends no epoch: {:?}", rows[0]);
    assert!(stdout.contains("margin "), "the per-step line shows the reward margin:\n{stdout}");
}

#[test]
fn train_distillation_keeps_student_layers() {
    let workspace = Workspace::new();
    let data = workspace.write_jsonl("chat.jsonl", &conversations());
    let out = workspace.path("out");
    let out_arg = out.display().to_string();
    let (student, teacher) = (workspace.student(), workspace.teacher());
    assert_eq!(num_hidden_layers(&workspace.path("student")), 2, "the tiny model's layer count changed");

    let stdout = succeeded(&workspace.train(&[
        "--model", &student, "--method", "distillation", "--teacher-model", &teacher,
        "--student-layers", "1", "--approach", "full", "--temperature", "2", "--kd-weight", "0.5",
        "--training-file", &data, "--output-dir", &out_arg, "--n-epochs", "1", "--batch-size", "2",
    ]));

    assert_eq!(num_hidden_layers(&out.join("model")), 1, "{stdout}");
    assert_eq!(metrics_rows(&out).len(), 2, "1 epoch of 2 steps:\n{stdout}");
}

#[test]
fn train_distillation_answers_prompts_first() {
    let workspace = Workspace::new();
    let prompts = [json!({"prompt": "sky?"}), json!({"prompt": "grass?"}), json!({"prompt": "snow?"})];
    let data = workspace.write_jsonl("prompts.jsonl", &prompts);
    let out = workspace.path("out");
    let out_arg = out.display().to_string();
    let (student, teacher) = (workspace.student(), workspace.teacher());

    let stdout = succeeded(&workspace.train(&[
        "--model", &student, "--method", "distillation", "--teacher-model", &teacher,
        "--training-file", &data, "--output-dir", &out_arg, "--n-epochs", "1", "--batch-size", "3",
        "--max-seq-len", "96",
    ]));

    let replies_path = out.join("teacher_replies.jsonl");
    assert!(stdout.contains(&replies_path.display().to_string()), "the run names the replies file:\n{stdout}");
    let replies = std::fs::read_to_string(&replies_path).expect("the teacher's replies are written");
    let lines: Vec<Value> = replies.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect();
    assert_eq!(lines.len(), prompts.len());
    for (line, prompt) in lines.iter().zip(&prompts) {
        let messages = line["messages"].as_array().unwrap_or_else(|| panic!("no messages in {line}"));
        assert_eq!(messages.len(), 2, "{line}");
        assert_eq!(messages[0]["content"], prompt["prompt"], "{line}");
        assert_eq!(messages[1]["role"], "assistant", "{line}");
    }
    assert!(out.join("adapter").join("adapter_config.json").is_file(), "{stdout}");
}

#[test]
fn train_dpo_rejects_chat_file() {
    let workspace = Workspace::new();
    let data = workspace.write_jsonl("chat.jsonl", &conversations());
    let student = workspace.student();

    let stderr = failed(&workspace.train(&["--model", &student, "--method", "dpo", "--training-file", &data]));

    assert!(stderr.contains(&data), "the error names the file: {stderr}");
    assert!(stderr.contains("needs preference pairs"), "{stderr}");
}

#[test]
fn train_supervised_rejects_beta() {
    let workspace = Workspace::new();
    let data = workspace.write_jsonl("chat.jsonl", &conversations());
    let student = workspace.student();

    let stderr = failed(&workspace.train(&["--model", &student, "--beta", "0.2", "--training-file", &data]));

    assert!(stderr.contains("--beta applies only to the dpo method"), "{stderr}");
    assert!(stderr.contains("this run uses the supervised method"), "{stderr}");
}

#[test]
fn train_distillation_rejects_missing_teacher() {
    let workspace = Workspace::new();
    let data = workspace.write_jsonl("chat.jsonl", &conversations());
    let student = workspace.student();

    let stderr = failed(&workspace.train(&[
        "--model", &student, "--method", "distillation", "--teacher-model", "no-such-teacher", "--training-file", &data,
    ]));

    assert!(stderr.contains("teacher model 'no-such-teacher'"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

#[test]
fn train_distillation_checks_layers_before_teacher() {
    let workspace = Workspace::new();
    let prompts = [json!({"prompt": "sky?"}), json!({"prompt": "grass?"})];
    let data = workspace.write_jsonl("prompts.jsonl", &prompts);
    let out = workspace.path("out");
    let out_arg = out.display().to_string();
    let (student, teacher) = (workspace.student(), workspace.teacher());
    assert_eq!(num_hidden_layers(&workspace.path("student")), 2, "the tiny model's layer count changed");

    let stderr = failed(&workspace.train(&[
        "--model", &student, "--method", "distillation", "--teacher-model", &teacher,
        "--student-layers", "0,2", "--approach", "full", "--training-file", &data, "--output-dir", &out_arg,
    ]));

    assert!(stderr.contains("student_layers names layer 2"), "{stderr}");
    assert!(!out.join("teacher_replies.jsonl").exists(), "the teacher wrote replies before the layer check");
}

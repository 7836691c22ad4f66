//! The job body of a local run: the `--config` file, or an empty object, with the flags written
//! over it. `JobSpec::parse` validates the result as it validates a job create request.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::cli::{TrainArgs, TrainMethod};

/// Hyperparameters that only one method reads. They stay behind when `--method` replaces the
/// config's method, because the new method would reject them.
const METHOD_ONLY_HYPERPARAMETERS: [&str; 3] = ["beta", "temperature", "kd_weight"];

/// Builds the job body from the `--config` file, or an empty one, with flags written over it.
pub(super) fn job_body(args: &TrainArgs) -> anyhow::Result<Value> {
    let mut body = match &args.config {
        Some(path) => read_config(path)?,
        None => json!({}),
    };
    let Some(object) = body.as_object_mut() else {
        bail!("the config file must contain a JSON object shaped like a job create request");
    };
    if let Some(model) = &args.model {
        object.insert("model".into(), json!(model));
    }
    if !object.contains_key("model") {
        bail!("no model given; pass --model NAME or PATH, or set \"model\" in the config file");
    }
    // The spec requires a file id; a local run reads --training-file instead.
    object.insert("training_file".into(), json!("file-local"));
    object.remove("validation_file");
    if let Some(seed) = args.seed {
        object.insert("seed".into(), json!(seed));
    }

    let method = select_method(object, args.method)?;
    reject_flags_of_other_methods(args, method)?;
    write_hyperparameters(object, method, args);
    write_distillation_settings(object, method, args)?;
    write_training_type(object, args);
    Ok(body)
}

fn read_config(path: &Path) -> anyhow::Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Selects the run's method and writes it to `method.type`: `flag`, else the config's
/// `method.type`, else supervised. When the flag replaces the config's method, the config's
/// hyperparameters move to the new method, less those only the old method reads.
fn select_method(object: &mut Map<String, Value>, flag: Option<TrainMethod>) -> anyhow::Result<TrainMethod> {
    let configured = configured_method(object)?;
    let chosen = flag.or(configured).unwrap_or(TrainMethod::Supervised);
    let previous = configured.unwrap_or(TrainMethod::Supervised);
    if chosen != previous {
        let mut carried = take_hyperparameters(object, previous);
        carried.retain(|key, _| !METHOD_ONLY_HYPERPARAMETERS.contains(&key.as_str()));
        object.insert("method".into(), json!({ "type": chosen.as_str() }));
        if !carried.is_empty() {
            section(object, &["method", chosen.as_str(), "hyperparameters"]).extend(carried);
        }
    } else if chosen != TrainMethod::Supervised && object.contains_key("hyperparameters") {
        // Job create requests read top-level hyperparameters for the supervised method only.
        bail!(
            "the config file sets top-level \"hyperparameters\", which only the supervised method reads; \
             move them into method.{0}.hyperparameters",
            chosen.as_str()
        );
    }
    object
        .entry("method")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("configured_method accepts only an object or no method")
        .insert("type".into(), json!(chosen.as_str()));
    Ok(chosen)
}

/// Reads `method.type` of the config, `None` when the config has no method.
fn configured_method(object: &Map<String, Value>) -> anyhow::Result<Option<TrainMethod>> {
    let method = match object.get("method") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(method)) => method,
        Some(other) => bail!("\"method\" in the config file must be an object such as {{\"type\": \"dpo\"}}, not {other}"),
    };
    let name = match method.get("type") {
        Some(Value::String(name)) => name,
        Some(other) => bail!("method.type in the config file must be supervised, dpo or distillation, not {other}"),
        None => bail!("the config file's \"method\" has no \"type\"; set it to supervised, dpo or distillation, or pass --method"),
    };
    let methods = [TrainMethod::Supervised, TrainMethod::Dpo, TrainMethod::Distillation];
    match methods.into_iter().find(|method| method.as_str() == name) {
        Some(method) => Ok(Some(method)),
        None => bail!("method.type '{name}' in the config file is not a method; use supervised, dpo or distillation"),
    }
}

/// Removes `method` and the config's hyperparameters for `method` from `object` and returns
/// the hyperparameters. A supervised config may hold them at the top level.
fn take_hyperparameters(object: &mut Map<String, Value>, method: TrainMethod) -> Map<String, Value> {
    let top_level = match method {
        TrainMethod::Supervised => object.remove("hyperparameters"),
        _ => None,
    };
    let nested = object
        .remove("method")
        .and_then(|mut section| section.get_mut(method.as_str()).map(Value::take))
        .and_then(|mut section| section.get_mut("hyperparameters").map(Value::take));
    match nested.or(top_level) {
        Some(Value::Object(hyperparameters)) => hyperparameters,
        _ => Map::new(),
    }
}

/// Rejects a flag that only another method reads, naming the flag and both methods.
fn reject_flags_of_other_methods(args: &TrainArgs, method: TrainMethod) -> anyhow::Result<()> {
    let flags = [
        ("--beta", args.beta.is_some(), TrainMethod::Dpo),
        ("--teacher-model", args.teacher_model.is_some(), TrainMethod::Distillation),
        ("--temperature", args.temperature.is_some(), TrainMethod::Distillation),
        ("--kd-weight", args.kd_weight.is_some(), TrainMethod::Distillation),
        ("--student-layers", args.student_layers.is_some(), TrainMethod::Distillation),
    ];
    for (flag, given, owner) in flags {
        if given && owner != method {
            bail!(
                "{flag} applies only to the {} method, but this run uses the {} method; pass --method {} or drop {flag}",
                owner.as_str(),
                method.as_str(),
                owner.as_str()
            );
        }
    }
    Ok(())
}

/// Writes the hyperparameter flags into `method.<method>.hyperparameters`, or into the
/// top-level `hyperparameters` of a supervised config that keeps them there.
fn write_hyperparameters(object: &mut Map<String, Value>, method: TrainMethod, args: &TrainArgs) {
    let hyperparameters = [
        ("n_epochs", args.n_epochs.map(|v| json!(v))),
        ("batch_size", args.batch_size.map(|v| json!(v))),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps.map(|v| json!(v))),
        ("learning_rate", args.learning_rate.map(|v| json!(v))),
        ("max_seq_len", args.max_seq_len.map(|v| json!(v))),
        ("lr_scheduler", args.lr_scheduler.clone().map(|v| json!(v))),
        ("warmup_ratio", args.warmup_ratio.map(|v| json!(v))),
        ("checkpoint_interval", args.checkpoint_interval.map(|v| json!(v))),
        ("eval_interval", args.eval_interval.map(|v| json!(v))),
        ("beta", args.beta.map(|v| json!(v))),
        ("temperature", args.temperature.map(|v| json!(v))),
        ("kd_weight", args.kd_weight.map(|v| json!(v))),
    ];
    let nested = ["method", method.as_str(), "hyperparameters"];
    let has_nested = object
        .get("method")
        .and_then(|section| section.get(method.as_str()))
        .and_then(|section| section.get("hyperparameters"))
        .is_some();
    let path: &[&str] = if method == TrainMethod::Supervised && object.contains_key("hyperparameters") && !has_nested {
        &["hyperparameters"]
    } else {
        &nested
    };
    for (key, value) in hyperparameters {
        if let Some(value) = value {
            section(object, path).insert(key.into(), value);
        }
    }
}

/// Writes `--teacher-model` and `--student-layers`, and requires a teacher for distillation.
fn write_distillation_settings(object: &mut Map<String, Value>, method: TrainMethod, args: &TrainArgs) -> anyhow::Result<()> {
    if method != TrainMethod::Distillation {
        return Ok(());
    }
    let distillation = section(object, &["method", "distillation"]);
    if let Some(teacher) = &args.teacher_model {
        distillation.insert("teacher_model".into(), json!(teacher));
    }
    if let Some(layers) = &args.student_layers {
        distillation.insert("student_layers".into(), json!(layers));
    }
    if !distillation.contains_key("teacher_model") {
        bail!(
            "the distillation method needs a teacher; pass --teacher-model NAME or PATH, or set \
             method.distillation.teacher_model in the config file"
        );
    }
    Ok(())
}

/// Writes `--approach` and the LoRA flags into `training_type`. LoRA flags without a type
/// select LoRA, the default approach.
fn write_training_type(object: &mut Map<String, Value>, args: &TrainArgs) {
    if let Some(approach) = &args.approach {
        section(object, &["training_type"]).insert("type".into(), json!(approach));
    }
    let lora = [
        ("r", args.r.map(|v| json!(v))),
        ("alpha", args.alpha.map(|v| json!(v))),
        ("target_modules", args.target_modules.as_ref().map(|v| json!(v.split(',').collect::<Vec<_>>()))),
    ];
    for (key, value) in lora {
        if let Some(value) = value {
            let training_type = section(object, &["training_type"]);
            training_type.insert(key.into(), value);
            training_type.entry("type").or_insert_with(|| json!("lora"));
        }
    }
}

/// Returns the object at `path` inside `object`, created when missing.
fn section<'a>(object: &'a mut Map<String, Value>, path: &[&str]) -> &'a mut Map<String, Value> {
    let mut current = object;
    for key in path {
        let entry = current.entry(key.to_string()).or_insert_with(|| json!({}));
        if !entry.is_object() {
            *entry = json!({});
        }
        current = entry.as_object_mut().expect("replaced by an object above");
    }
    current
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use studio_core::spec::{Method, DPO_DEFAULT_BETA};
    use studio_core::JobSpec;

    use super::*;

    /// Parses `smart-studio train ARGS` as the binary does.
    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn args(flags: &[&str]) -> TrainArgs {
        let argv = ["train", "--training-file", "data.jsonl"].iter().chain(flags);
        Command::try_parse_from(argv).expect("valid flags").train
    }

    /// Returns the arguments with `--config` pointing at `config` written to a temporary file.
    fn with_config(config: Value, flags: &[&str]) -> (tempfile::TempDir, TrainArgs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, config.to_string()).unwrap();
        let mut args = args(flags);
        args.config = Some(path);
        (dir, args)
    }

    fn spec(body: &Value) -> JobSpec {
        JobSpec::parse(body, 0).unwrap_or_else(|err| panic!("{body}: {err}"))
    }

    #[test]
    fn supervised_is_the_default_method() {
        let body = job_body(&args(&["--model", "m", "--n-epochs", "2"])).unwrap();
        assert_eq!(body["method"]["type"], "supervised");
        assert_eq!(body["method"]["supervised"]["hyperparameters"]["n_epochs"], 2);
        assert_eq!(spec(&body).hyperparameters().n_epochs, 2);
    }

    #[test]
    fn config_dpo_method_is_kept() {
        let config = json!({"model": "m", "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}});
        let (_dir, args) = with_config(config, &["--batch-size", "4"]);
        let body = job_body(&args).unwrap();
        let spec = spec(&body);
        assert_eq!(spec.dpo_beta(), Some(0.3));
        assert_eq!(spec.hyperparameters().batch_size, 4);
    }

    #[test]
    fn method_flag_wins_over_config() {
        let config = json!({"model": "m", "method": {"type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 5}}}});
        let (_dir, args) = with_config(config, &["--method", "dpo", "--beta", "0.2"]);
        let body = job_body(&args).unwrap();
        assert!(body["method"].get("supervised").is_none(), "{body}");
        let spec = spec(&body);
        assert_eq!(spec.dpo_beta(), Some(0.2));
        assert_eq!(spec.hyperparameters().n_epochs, 5, "shared hyperparameters carry over");
    }

    #[test]
    fn method_flag_drops_method_only_hyperparameters() {
        let config = json!({"model": "m", "method": {"type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.4, "n_epochs": 2}}}});
        let (_dir, args) = with_config(config, &["--method", "supervised"]);
        let body = job_body(&args).unwrap();
        assert_eq!(body["method"], json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}));
        assert!(matches!(spec(&body).method, Method::Supervised { .. }));
    }

    #[test]
    fn method_flag_moves_top_level_hyperparameters() {
        let config = json!({"model": "m", "hyperparameters": {"n_epochs": 4}});
        let (_dir, args) = with_config(config, &["--method", "dpo"]);
        let body = job_body(&args).unwrap();
        assert!(body.get("hyperparameters").is_none(), "{body}");
        let spec = spec(&body);
        assert_eq!(spec.dpo_beta(), Some(DPO_DEFAULT_BETA));
        assert_eq!(spec.hyperparameters().n_epochs, 4);
    }

    #[test]
    fn supervised_flags_join_top_level_hyperparameters() {
        let config = json!({"model": "m", "hyperparameters": {"n_epochs": 4}});
        let (_dir, args) = with_config(config, &["--batch-size", "3"]);
        let body = job_body(&args).unwrap();
        assert_eq!(body["hyperparameters"], json!({"n_epochs": 4, "batch_size": 3}));
        let spec = spec(&body);
        assert_eq!(spec.hyperparameters().n_epochs, 4);
        assert_eq!(spec.hyperparameters().batch_size, 3);
    }

    #[test]
    fn dpo_config_rejects_top_level_hyperparameters() {
        let config = json!({"model": "m", "method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 4}});
        let (_dir, args) = with_config(config, &[]);
        let message = job_body(&args).unwrap_err().to_string();
        assert!(message.contains("method.dpo.hyperparameters"), "{message}");
    }

    #[test]
    fn distillation_flags_reach_the_spec() {
        let flags = [
            "--model", "m", "--method", "distillation", "--teacher-model", "big", "--temperature", "3",
            "--kd-weight", "0.25", "--student-layers", "0,3,6", "--approach", "full", "--max-seq-len", "64",
        ];
        let body = job_body(&args(&flags)).unwrap();
        let spec = spec(&body);
        let distillation = spec.distillation().expect("a distillation spec");
        assert_eq!(distillation.teacher_model, "big");
        assert_eq!(distillation.student_layers, Some(vec![0, 3, 6]));
        assert_eq!(distillation.hyperparameters.temperature, 3.0);
        assert_eq!(distillation.hyperparameters.kd_weight, 0.25);
        assert_eq!(spec.hyperparameters().max_seq_len, 64);
    }

    #[test]
    fn distillation_needs_a_teacher() {
        let message = job_body(&args(&["--model", "m", "--method", "distillation"])).unwrap_err().to_string();
        assert!(message.contains("--teacher-model"), "{message}");
    }

    #[test]
    fn flags_of_other_methods_are_rejected() {
        let cases: [(&[&str], &str, &str); 5] = [
            (&["--beta", "0.2"], "--beta", "supervised"),
            (&["--teacher-model", "t"], "--teacher-model", "supervised"),
            (&["--temperature", "2"], "--temperature", "supervised"),
            (&["--kd-weight", "0.5"], "--kd-weight", "supervised"),
            (&["--method", "dpo", "--student-layers", "0,1"], "--student-layers", "dpo"),
        ];
        for (flags, flag, method) in cases {
            let mut all = vec!["--model", "m"];
            all.extend_from_slice(flags);
            let message = job_body(&args(&all)).unwrap_err().to_string();
            assert!(message.starts_with(flag), "{flags:?}: {message}");
            assert!(message.contains(&format!("this run uses the {method} method")), "{flags:?}: {message}");
        }
    }

    #[test]
    fn unknown_config_method_is_rejected() {
        let config = json!({"model": "m", "method": {"type": "rlhf"}});
        let (_dir, args) = with_config(config, &[]);
        let message = job_body(&args).unwrap_err().to_string();
        assert!(message.contains("'rlhf'"), "{message}");
    }

    #[test]
    fn lora_flags_reach_the_spec() {
        let body = job_body(&args(&["--model", "m", "--r", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj"])).unwrap();
        let spec = spec(&body);
        let lora = spec.lora().expect("LoRA by default");
        assert_eq!(lora.r, 4);
        assert_eq!(lora.alpha, 8.0);
        assert_eq!(lora.target_modules, ["q_proj", "v_proj"]);
    }
}

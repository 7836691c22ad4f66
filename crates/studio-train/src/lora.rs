//! LoRA adapters: PEFT's initialisation, key names, file layout and config.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde_json::json;

use crate::config::{LlamaConfig, LINEAR_MODULES};
use crate::model::{LoraAdapter, Llama};
use crate::rng::Rng;
use crate::run::LoraSettings;
use crate::TrainError;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// PEFT's key for one LoRA matrix, for example
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(layer: usize, module: &str, matrix: char) -> String {
    let parent = parent_module(module).unwrap_or("self_attn");
    format!("base_model.model.model.layers.{layer}.{parent}.{module}.lora_{matrix}.weight")
}

fn parent_module(module: &str) -> Option<&'static str> {
    LINEAR_MODULES
        .iter()
        .find(|(_, name)| *name == module)
        .map(|(parent, _)| *parent)
}

/// Module names that `all-linear` stands for: every attention and MLP projection, never the
/// head or the embeddings (as PEFT's `all-linear` for causal language models).
pub const ALL_LINEAR: &str = "all-linear";

/// Returns the target modules with `all-linear` expanded, in the model's module order.
pub fn resolve_targets(target_modules: &[String]) -> Vec<String> {
    let all = target_modules.iter().any(|m| m == ALL_LINEAR);
    LINEAR_MODULES
        .iter()
        .map(|(_, name)| *name)
        .filter(|name| all || target_modules.iter().any(|m| m == name))
        .map(String::from)
        .collect()
}

/// Returns the factor applied to `B A x`: `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn scale(settings: &LoraSettings) -> f64 {
    if settings.use_rslora {
        settings.alpha / (settings.r as f64).sqrt()
    } else {
        settings.alpha / settings.r as f64
    }
}

/// Checks the settings before anything is allocated.
pub fn validate(settings: &LoraSettings) -> Result<(), TrainError> {
    let invalid = |message: String, param: &str| TrainError::InvalidData {
        message,
        param: Some(param.to_string()),
    };
    if settings.r == 0 {
        return Err(invalid("LoRA rank r must be at least 1".into(), "training_type.r"));
    }
    if !(0.0..1.0).contains(&settings.dropout) {
        return Err(invalid(
            format!("LoRA dropout {} is outside [0, 1)", settings.dropout),
            "training_type.dropout",
        ));
    }
    if settings.target_modules.is_empty() {
        return Err(invalid("target_modules is empty; name at least one linear module".into(), "training_type.target_modules"));
    }
    for module in &settings.target_modules {
        if module != ALL_LINEAR && parent_module(module).is_none() {
            let known: Vec<&str> = LINEAR_MODULES.iter().map(|(_, name)| *name).collect();
            return Err(invalid(
                format!("unknown target module {module:?}; expected some of {} or {ALL_LINEAR:?}", known.join(", ")),
                "training_type.target_modules",
            ));
        }
    }
    Ok(())
}

/// Adds fresh adapters to every targeted module of every layer, initialised as PEFT does:
/// `lora_A` from U(-1/√in, 1/√in) (Kaiming-uniform with a = √5), `lora_B` zero, so the
/// adapted model starts equal to the base model. Draws happen in layer, then module order.
pub fn attach(model: &mut Llama, settings: &LoraSettings, rng: &mut Rng) -> Result<(), TrainError> {
    validate(settings)?;
    let config = model.config.clone();
    let device = model.device().clone();
    let dtype = model.embed_tokens.dtype();
    let scale = scale(settings);
    let targets = resolve_targets(&settings.target_modules);
    for layer in &mut model.layers {
        for (_, module) in LINEAR_MODULES {
            if !targets.iter().any(|m| m == module) {
                continue;
            }
            let (fan_in, fan_out) = config.linear_shape(module).expect("module listed in LINEAR_MODULES");
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a = Tensor::from_vec(rng.uniform_vec(settings.r * fan_in, -bound, bound), (settings.r, fan_in), &device)?
                .to_dtype(dtype)?;
            let b = Tensor::zeros((fan_out, settings.r), dtype, &device)?;
            let linear = layer.linear_mut(module).expect("module listed in LINEAR_MODULES");
            linear.lora = Some(LoraAdapter {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scale,
                dropout: settings.dropout as f32,
            });
        }
    }
    Ok(())
}

/// Returns the adapter's variables under PEFT's key names, in layer and module order.
pub fn adapter_vars(model: &Llama) -> Vec<(String, Var)> {
    let mut vars = Vec::new();
    for (index, layer) in model.layers.iter().enumerate() {
        for (_, module) in LINEAR_MODULES {
            if let Some(lora) = layer.linear(module).and_then(|l| l.lora.as_ref()) {
                vars.push((peft_key(index, module, 'A'), lora.a.clone()));
                vars.push((peft_key(index, module, 'B'), lora.b.clone()));
            }
        }
    }
    vars
}

/// Returns the adapter's matrices under PEFT's key names.
pub fn adapter_tensors(model: &Llama) -> HashMap<String, Tensor> {
    adapter_vars(model)
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect()
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout. Each file is
/// written under a temporary name and renamed when whole.
pub fn save_adapter(model: &Llama, settings: &LoraSettings, base_model: &str, dir: &Path) -> Result<(), TrainError> {
    fs::create_dir_all(dir)?;
    let tensors = adapter_tensors(model);
    for (name, tensor) in &tensors {
        let finite = tensor.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite();
        if !finite {
            return Err(TrainError::NonFinite(format!("adapter tensor {name} contains a non-finite value")));
        }
    }
    let weights_tmp = dir.join(format!(".{ADAPTER_WEIGHTS}.tmp"));
    candle_core::safetensors::save(&tensors, &weights_tmp)?;
    fs::rename(&weights_tmp, dir.join(ADAPTER_WEIGHTS))?;

    let config = adapter_config(settings, base_model);
    let config_tmp = dir.join(format!(".{ADAPTER_CONFIG}.tmp"));
    fs::write(&config_tmp, serde_json::to_vec_pretty(&config).expect("JSON value serialises"))?;
    fs::rename(&config_tmp, dir.join(ADAPTER_CONFIG))?;
    Ok(())
}

/// Builds `adapter_config.json` with every field PEFT reads stated explicitly, because PEFT
/// fills a missing one with its own default, which may differ from how the adapter was trained.
pub fn adapter_config(settings: &LoraSettings, base_model: &str) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": resolve_targets(&settings.target_modules),
        "bias": "none",
        "use_rslora": settings.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Loads the matrices of a PEFT adapter into the model's adapters, which must already be
/// attached with the same rank and targets.
pub fn load_adapter_weights(model: &mut Llama, dir: &Path) -> Result<(), TrainError> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&path, model.device())?;
    for (index, layer) in model.layers.iter_mut().enumerate() {
        for (_, module) in LINEAR_MODULES {
            let Some(lora) = layer.linear_mut(module).and_then(|l| l.lora.as_mut()) else {
                continue;
            };
            for (matrix, var) in [('A', &lora.a), ('B', &lora.b)] {
                let key = peft_key(index, module, matrix);
                let tensor = tensors.get(&key).ok_or_else(|| TrainError::InvalidData {
                    message: format!("adapter {} has no tensor {key}", path.display()),
                    param: None,
                })?;
                var.set(&tensor.to_dtype(var.dtype())?)?;
            }
        }
    }
    Ok(())
}

/// Number of trainable LoRA parameters for `settings` on a model of `config`.
pub fn trainable_parameters(config: &LlamaConfig, settings: &LoraSettings) -> usize {
    let per_layer: usize = resolve_targets(&settings.target_modules)
        .iter()
        .filter_map(|module| config.linear_shape(module))
        .map(|(fan_in, fan_out)| settings.r * (fan_in + fan_out))
        .sum();
    per_layer * config.num_hidden_layers
}

/// Reads the settings of a PEFT adapter from its `adapter_config.json`, with PEFT's defaults
/// for fields it omits (`lora_alpha` 8, `lora_dropout` 0, `use_rslora` false).
pub fn read_adapter_settings(dir: &Path) -> Result<LoraSettings, TrainError> {
    let path = dir.join(ADAPTER_CONFIG);
    let invalid = |message: String| TrainError::InvalidData {
        message: format!("{}: {message}", path.display()),
        param: Some("adapter".into()),
    };
    if !path.is_file() && dir.join("config.json").is_file() {
        return Err(TrainError::InvalidData {
            message: format!(
                "{} is a model folder, not a PEFT adapter (it has config.json but no {ADAPTER_CONFIG}); load it as the model instead",
                dir.display()
            ),
            param: Some("adapter".into()),
        });
    }
    let text = fs::read_to_string(&path).map_err(|err| invalid(err.to_string()))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|err| invalid(format!("invalid JSON: {err}")))?;
    if config["peft_type"].as_str().is_some_and(|kind| kind != "LORA") {
        return Err(invalid(format!("peft_type {} is not LORA", config["peft_type"])));
    }
    let r = config["r"].as_u64().ok_or_else(|| invalid("r is missing".into()))? as usize;
    let target_modules = match &config["target_modules"] {
        serde_json::Value::String(one) => vec![one.clone()],
        serde_json::Value::Array(list) => list.iter().filter_map(|m| m.as_str().map(String::from)).collect(),
        _ => return Err(invalid("target_modules is missing".into())),
    };
    Ok(LoraSettings {
        r,
        alpha: config["lora_alpha"].as_f64().unwrap_or(8.0),
        dropout: config["lora_dropout"].as_f64().unwrap_or(0.0),
        target_modules,
        use_rslora: config["use_rslora"].as_bool().unwrap_or(false),
    })
}

/// Attaches the adapter stored in `dir` (a PEFT folder) to `model`.
pub fn apply_adapter(model: &mut Llama, dir: &Path) -> Result<LoraSettings, TrainError> {
    let settings = read_adapter_settings(dir)?;
    attach(model, &settings, &mut Rng::new(0))?;
    load_adapter_weights(model, dir)?;
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_folder_as_adapter_is_named() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 1).unwrap();

        let err = read_adapter_settings(dir.path()).unwrap_err();

        let message = err.to_string();
        assert!(message.contains("is a model folder, not a PEFT adapter"), "{message}");
        assert!(message.contains("load it as the model"), "{message}");
    }
}

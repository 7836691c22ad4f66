//! Checkpoints that resume a run exactly: trainable weights, optimizer moments, the step, the
//! schedule, the generator's state and the position in the data.
//!
//! A LoRA checkpoint folder is also a loadable PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`); a full fine-tuning one contains `model.safetensors` under
//! Hugging Face names.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::AdamW;
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::TrainError;

pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const FULL_WEIGHTS: &str = "model.safetensors";

/// Everything besides tensors that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    /// 0-based epoch in progress.
    pub epoch: usize,
    /// Examples of `epoch_order` already consumed.
    pub position: usize,
    /// This epoch's shuffled order of training examples.
    pub epoch_order: Vec<usize>,
    pub rng: Rng,
    pub schedule: Schedule,
    pub trained_tokens: u64,
    pub skipped_steps: u64,
    /// Updates the optimizer has applied; skipped steps apply none.
    pub optimizer_steps: u64,
    /// Names of the trained tensors, in optimizer order.
    pub parameters: Vec<String>,
    /// `"lora"` or `"full"`.
    pub approach: String,
}

/// Name of the folder of the checkpoint after `step`.
pub fn folder_name(step: u64) -> String {
    format!("step-{step}")
}

/// Writes the optimizer moments and the trainer state into `staging`, whose trainable weights
/// the caller has already written, then renames it to `dir/step-{n}` so a reader never sees a
/// partial checkpoint.
pub fn finish(staging: &Path, dir: &Path, optimizer: &AdamW, state: &TrainerState) -> Result<PathBuf, TrainError> {
    let (first, second) = optimizer.moments();
    let mut moments = HashMap::new();
    for (index, name) in state.parameters.iter().enumerate() {
        moments.insert(format!("exp_avg.{name}"), first[index].clone());
        moments.insert(format!("exp_avg_sq.{name}"), second[index].clone());
    }
    candle_core::safetensors::save(&moments, staging.join(OPTIMIZER))?;
    fs::write(
        staging.join(TRAINER_STATE),
        serde_json::to_vec_pretty(state).expect("trainer state serialises"),
    )?;

    let target = dir.join(folder_name(state.step));
    if target.exists() {
        fs::remove_dir_all(&target)?;
    }
    fs::rename(staging, &target)?;
    Ok(target)
}

/// Creates an empty staging folder for the checkpoint after `step`.
pub fn staging(dir: &Path, step: u64) -> Result<PathBuf, TrainError> {
    let staging = dir.join(format!(".{}.partial", folder_name(step)));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    Ok(staging)
}

/// Writes full fine-tuning weights under their Hugging Face names, refusing non-finite values.
pub fn write_full_weights(staging: &Path, vars: &[(String, Var)]) -> Result<(), TrainError> {
    for (name, var) in vars {
        let max = var.abs()?.max_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !max.is_finite() {
            return Err(TrainError::NonFinite(format!("weight {name} contains a non-finite value")));
        }
    }
    let tensors: HashMap<&str, Tensor> = vars
        .iter()
        .map(|(name, var)| (name.as_str(), var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, staging.join(FULL_WEIGHTS))?;
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join(TRAINER_STATE);
    let text = fs::read_to_string(&path)?;
    serde_json::from_str(&text).map_err(|err| TrainError::InvalidData {
        message: format!("checkpoint state {} is invalid: {err}", path.display()),
        param: None,
    })
}

/// Loads trained values and optimizer moments from `dir` into `vars` and `optimizer`.
pub fn restore(dir: &Path, weights_file: &str, vars: &[(String, Var)], optimizer: &mut AdamW, state: &TrainerState, device: &Device) -> Result<(), TrainError> {
    let names: Vec<&String> = vars.iter().map(|(name, _)| name).collect();
    if names.iter().map(|n| n.as_str()).ne(state.parameters.iter().map(String::as_str)) {
        return Err(TrainError::InvalidData {
            message: format!("checkpoint {} trains other parameters than this run", dir.display()),
            param: None,
        });
    }
    let weights = candle_core::safetensors::load(dir.join(weights_file), device)?;
    let moments = candle_core::safetensors::load(dir.join(OPTIMIZER), device)?;
    let missing = |key: &str| TrainError::InvalidData {
        message: format!("checkpoint {} has no tensor {key}", dir.display()),
        param: None,
    };
    let mut first = Vec::with_capacity(vars.len());
    let mut second = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        var.set(weights.get(name).ok_or_else(|| missing(name))?)?;
        let m_key = format!("exp_avg.{name}");
        let v_key = format!("exp_avg_sq.{name}");
        first.push(moments.get(&m_key).ok_or_else(|| missing(&m_key))?.clone());
        second.push(moments.get(&v_key).ok_or_else(|| missing(&v_key))?.clone());
    }
    optimizer.restore(state.optimizer_steps, first, second)?;
    Ok(())
}

//! The Smart Studio trainer as a library: Llama-family models loaded from GGUF, the model's chat
//! template, LoRA adapters in PEFT layout, and a supervised training loop with AdamW.
//!
//! It knows nothing of HTTP or databases: the worker and `smart-studio train` call
//! [`run_lora_sft`] with an observer that receives metrics and events.

mod error;
mod run;

pub use error::TrainError;
pub use run::{
    run_lora_sft, EventLevel, LoraSettings, RunOutcome, SftJob, StepMetrics, TrainObserver,
    TrainSettings,
};

//! The Smart Studio trainer as a library: Llama-family models loaded from GGUF, the model's chat
//! template, LoRA adapters in PEFT layout, and AdamW training for supervised fine-tuning, DPO and
//! distillation, which share one step loop.
//!
//! It has no HTTP or database code: the worker and the CLI call [`run_sft`], [`run_dpo`] or
//! [`run_distillation`] with an observer that receives metrics and events.

pub mod batch;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dpo;
pub mod distill;
mod error;
pub mod estimate;
pub mod export;
pub mod generate;
mod gguf;
pub mod hf;
pub mod loader;
pub mod lora;
pub mod model;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod schedule;
mod run;
mod steps;
pub mod tiny;
pub mod tokenizer;

pub use distill::{run_distillation, DistillJob, DistillSettings};
pub use error::TrainError;
pub use run::{
    evaluate, run_sft, Approach, ArtifactKind, CheckpointInfo, EventLevel, LoraSettings, RunOutcome,
    SftJob, StepMetrics, StopRequest, TrainObserver, TrainSettings, TrainSummary, FULL_LEARNING_RATE_RANGE,
};
pub use steps::MAX_CONSECUTIVE_SKIPPED_STEPS;
pub use generate::{generate, ChatModel, ChatReply, FinishReason, SamplingParams};
pub use dpo::{run_dpo, DpoJob, PreferenceMetrics};
pub use schedule::DecayKind;

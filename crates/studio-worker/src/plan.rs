//! Maps a validated job spec to the trainer's settings. The API's estimate uses the same
//! mapping, so an estimate describes exactly the run a job would make.

use studio_core::spec::{LrScheduler, TrainingType};
use studio_core::JobSpec;
use studio_train::{Approach, DecayKind, DistillSettings, LoraSettings, SamplingParams, TrainSettings};

/// The maximum length of a distillation teacher's reply to a prompt of a prompts-only training
/// file, in tokens.
pub const MAX_TEACHER_REPLY_TOKENS: usize = 256;

/// Returns what the job trains: LoRA adapters or every weight.
pub fn approach(spec: &JobSpec) -> Approach {
    match &spec.training_type {
        TrainingType::Lora(lora) => Approach::Lora(LoraSettings {
            r: lora.r as usize,
            alpha: lora.alpha,
            dropout: lora.dropout,
            target_modules: lora.target_modules.clone(),
            use_rslora: lora.use_rslora,
        }),
        TrainingType::Full => Approach::Full,
    }
}

/// Returns the optimisation settings of the job, every field taken from the spec.
pub fn train_settings(spec: &JobSpec) -> TrainSettings {
    let hp = spec.hyperparameters();
    TrainSettings {
        n_epochs: hp.n_epochs as usize,
        batch_size: hp.batch_size as usize,
        gradient_accumulation_steps: hp.gradient_accumulation_steps as usize,
        learning_rate: hp.learning_rate,
        lr_scheduler: match hp.lr_scheduler {
            LrScheduler::Cosine => DecayKind::Cosine,
            LrScheduler::Linear => DecayKind::Linear,
            LrScheduler::Constant => DecayKind::Constant,
        },
        warmup_ratio: hp.warmup_ratio,
        weight_decay: hp.weight_decay,
        max_grad_norm: hp.max_grad_norm,
        max_seq_len: hp.max_seq_len as usize,
        seed: spec.seed,
        eval_interval: hp.eval_interval,
        checkpoint_interval: hp.checkpoint_interval,
        n_checkpoints: hp.n_checkpoints,
    }
}

/// Returns the distillation settings of the job, or `None` for other methods.
pub fn distill_settings(spec: &JobSpec) -> Option<DistillSettings> {
    let distillation = spec.distillation()?;
    Some(DistillSettings {
        temperature: distillation.hyperparameters.temperature,
        kd_weight: distillation.hyperparameters.kd_weight,
        student_layers: distillation
            .student_layers
            .as_ref()
            .map(|layers| layers.iter().map(|&layer| layer as usize).collect()),
    })
}

/// Returns the sampling settings of a distillation teacher's replies to a prompts-only training
/// file: greedy, with at most `max_seq_len` or [`MAX_TEACHER_REPLY_TOKENS`] tokens per reply,
/// whichever is fewer.
pub fn teacher_reply_params(spec: &JobSpec) -> SamplingParams {
    SamplingParams {
        max_new_tokens: (spec.hyperparameters().max_seq_len as usize).min(MAX_TEACHER_REPLY_TOKENS),
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: spec.seed,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_knob_reaches_the_trainer() {
        let body = json!({
            "model": "m",
            "training_file": "file-x",
            "seed": 9,
            "hyperparameters": {
                "n_epochs": 2, "batch_size": 4, "gradient_accumulation_steps": 3,
                "learning_rate": 3e-5, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
                "weight_decay": 0.01, "max_grad_norm": 0.5, "max_seq_len": 256,
                "eval_interval": 7, "checkpoint_interval": 11, "n_checkpoints": 2,
            },
            "training_type": {"type": "full"},
        });
        let spec = JobSpec::parse(&body, 0).unwrap();

        let expected = TrainSettings {
            n_epochs: 2,
            batch_size: 4,
            gradient_accumulation_steps: 3,
            learning_rate: 3e-5,
            lr_scheduler: DecayKind::Cosine,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 0.5,
            max_seq_len: 256,
            seed: 9,
            eval_interval: 7,
            checkpoint_interval: 11,
            n_checkpoints: 2,
        };
        assert_eq!(train_settings(&spec), expected);
        assert_eq!(approach(&spec), Approach::Full);
    }

    #[test]
    fn lora_settings_reach_the_trainer() {
        let body = json!({
            "model": "m",
            "training_file": "file-x",
            "training_type": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1,
                              "target_modules": "all-linear", "use_rslora": true},
        });
        let spec = JobSpec::parse(&body, 0).unwrap();

        let expected = Approach::Lora(LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: vec!["all-linear".into()],
            use_rslora: true,
        });
        assert_eq!(approach(&spec), expected);
    }

    #[test]
    fn distillation_settings_reach_the_trainer() {
        let body = json!({
            "model": "m",
            "training_file": "file-x",
            "seed": 5,
            "training_type": {"type": "full"},
            "method": {"type": "distillation", "distillation": {
                "teacher_model": "t", "student_layers": [0, 2],
                "hyperparameters": {"temperature": 3, "kd_weight": 0.25, "max_seq_len": 64}}},
        });
        let spec = JobSpec::parse(&body, 0).unwrap();

        let expected = DistillSettings {
            temperature: 3.0,
            kd_weight: 0.25,
            student_layers: Some(vec![0, 2]),
        };
        assert_eq!(distill_settings(&spec), Some(expected));
        let params = teacher_reply_params(&spec);
        assert_eq!(params.max_new_tokens, 64);
        assert_eq!(params.temperature, 0.0);
        assert_eq!(params.seed, 5);
    }

    #[test]
    fn supervised_job_has_no_distillation_settings() {
        let spec = JobSpec::parse(&json!({"model": "m", "training_file": "file-x"}), 0).unwrap();
        assert_eq!(distill_settings(&spec), None);
        assert_eq!(teacher_reply_params(&spec).max_new_tokens, MAX_TEACHER_REPLY_TOKENS);
    }
}

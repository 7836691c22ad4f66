//! Maps a validated job spec to the trainer's settings. The API's estimate uses the same
//! mapping, so an estimate describes exactly the run a job would make.

use studio_core::spec::{LrScheduler, TrainingType};
use studio_core::JobSpec;
use studio_train::{Approach, DecayKind, LoraSettings, TrainSettings};

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
}

//! The estimate of a distillation job: the student's training plus the teacher that runs
//! beside it.

use candle_core::Device;
use studio_core::dataset::{Conversation, Role};

use super::{attach_trainable, encode_and_split, parameter_bytes, time_steps, total_parameters, trainable_parameters};
use super::{Counts, Estimate, EstimateJob, MicroBatchShape, TeacherModel};
use crate::config::LlamaConfig;
use crate::distill::{
    check_approach, load_teacher, select_layers, shared_vocabulary, validate_distill, DistillSettings, DistillSteps,
    StepContext, DISTILLATION_HYPERPARAMETERS,
};
use crate::loader::load_model;
use crate::lora;
use crate::model::Llama;
use crate::run::{invalid, TrainObserver};
use crate::TrainError;

/// Estimates a distillation job as [`run_distillation`](crate::run_distillation) would run it.
/// The student is the job's model after `student_layers`. The memory estimate adds the
/// teacher's weights and, when `kd_weight` is above 0, its log-probabilities and the
/// distillation term's tensors. A training file of prompts alone is rejected, because the
/// teacher writes its replies only when the job runs.
pub(super) fn estimate_distillation(
    job: &EstimateJob<'_>,
    conversations: &[Conversation],
    teacher: &TeacherModel<'_>,
    distill: &DistillSettings,
    student_name: &str,
    observer: &mut dyn TrainObserver,
) -> Result<Estimate, TrainError> {
    validate_distill(distill)?;
    check_approach(job.approach, distill)?;
    if is_prompts_only(conversations) {
        return Err(invalid(
            "the training file holds prompts without replies, and a distillation job's teacher writes the replies when the job runs, so their tokens are unknown before then; estimate with a file of conversations that end with an assistant reply, such as the teacher's replies file that a distillation job stores",
            "training_file",
        ));
    }
    let device = Device::Cpu;
    let settings = job.settings;
    let (teacher_loaded, teacher_model) = load_teacher(teacher.path, teacher.adapter, teacher.name, &device)?;
    let mut loaded = load_model(job.model_path, &device)?;
    let vocab = shared_vocabulary(&teacher_loaded, teacher.name, &loaded, student_name)?;
    if let Some(layers) = &distill.student_layers {
        select_layers(&mut loaded, layers)?;
    }
    let max_seq_len_param = format!("{DISTILLATION_HYPERPARAMETERS}.max_seq_len");
    let split = encode_and_split(&loaded, conversations, job, &max_seq_len_param, observer)?;
    let config = &loaded.config;

    let total = total_parameters(config);
    let trainable = trainable_parameters(config, job.approach);
    let largest = MicroBatchShape::largest(&split.train, settings.batch_size);
    let memory = parameter_bytes(total, trainable)
        + largest.activation_bytes(config)
        + teacher_weight_bytes(&teacher_loaded.config, teacher.adapter)?
        + distillation_term_bytes(largest.targets, vocab, distill.kd_weight);

    let seconds_per_step = if job.measure_steps > 0 {
        let n_examples = split.train.len().min(settings.batch_size * settings.gradient_accumulation_steps);
        let mut student = Llama::from_weights(config, &loaded.weights, &device)?;
        let vars = attach_trainable(&mut student, job.approach, settings.seed)?;
        let method = DistillSteps {
            context: StepContext {
                teacher: &teacher_model,
                student: &student,
                vars: &vars,
                vocab,
                distill,
                batch_size: settings.batch_size,
                pad: loaded.special.pad,
                device: &device,
            },
            train: &split.train,
            valid: &[],
        };
        Some(time_steps(&method, &vars, n_examples, settings.seed, job.measure_steps)?)
    } else {
        None
    };
    let counts = Counts {
        method: "distillation",
        total_parameters: total,
        trainable_parameters: trainable,
        examples: split.train.len(),
        held_out: split.held_out,
        dropped: split.dropped,
        tokens_per_epoch: split.train.iter().map(|e| e.ids.len() as u64).sum(),
        peak_memory_bytes: memory,
    };
    Ok(Estimate::from_counts(counts, settings, seconds_per_step))
}

/// Tells whether every conversation ends with a user turn, as a prompts-only file's do.
fn is_prompts_only(conversations: &[Conversation]) -> bool {
    !conversations.is_empty() && conversations.iter().all(|c| c.messages.last().is_some_and(|m| m.role == Role::User))
}

/// Bytes of the teacher's f32 weights, with its LoRA adapter when it has one.
fn teacher_weight_bytes(config: &LlamaConfig, adapter: Option<&std::path::Path>) -> Result<u64, TrainError> {
    let adapter_parameters = match adapter {
        Some(dir) => lora::trainable_parameters(config, &lora::read_adapter_settings(dir)?) as u64,
        None => 0,
    };
    Ok(4 * (total_parameters(config) + adapter_parameters))
}

/// Estimates the bytes of the 6 f32 tensors of `targets` rows and `vocab` columns that the
/// distillation term adds to a micro-batch. They are the teacher's log-probabilities, the
/// student's logits divided by the temperature, their log-softmax, the teacher's probabilities,
/// and the difference and the product inside the KL divergence. At `kd_weight` 0 the teacher
/// does not run.
fn distillation_term_bytes(targets: usize, vocab: usize, kd_weight: f64) -> u64 {
    if kd_weight == 0.0 {
        return 0;
    }
    4 * 6 * (targets * vocab) as u64
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::estimate::{activation_bytes, estimate, EstimateMethod};
    use crate::run::{Approach, LoraSettings, TrainSettings};
    use crate::tiny::{counting_conversations, SilentObserver};

    fn settings() -> TrainSettings {
        TrainSettings {
            n_epochs: 1,
            batch_size: 2,
            ..TrainSettings::default()
        }
    }

    /// Estimates distilling the tiny model in `model` into a student built from it, with the
    /// same model as the teacher.
    fn estimate_distillation(
        model: &Path,
        conversations: &[Conversation],
        approach: &Approach,
        distill: &DistillSettings,
        measure_steps: usize,
    ) -> Result<Estimate, TrainError> {
        let settings = settings();
        let job = EstimateJob {
            model_path: model,
            method: EstimateMethod::Distillation {
                conversations,
                teacher: TeacherModel { path: model, adapter: None, name: "tiny" },
                distill,
                student_name: "tiny",
            },
            approach,
            settings: &settings,
            hold_out_validation: true,
            measure_steps,
        };
        estimate(&job, &mut SilentObserver)
    }

    fn distill_settings(kd_weight: f64, student_layers: Option<Vec<usize>>) -> DistillSettings {
        DistillSettings { temperature: 2.0, kd_weight, student_layers }
    }

    #[test]
    fn distillation_estimate_counts_student_layers_and_teacher() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 5).unwrap();
        let conversations = counting_conversations();
        let distill = distill_settings(0.5, Some(vec![1]));
        let distilled = estimate_distillation(dir.path(), &conversations, &Approach::Full, &distill, 0).unwrap();

        // The student keeps every tensor of the 2-layer model except layer 0's.
        let loaded = load_model(dir.path(), &Device::Cpu).unwrap();
        let element_count = |keep: &dyn Fn(&str) -> bool| -> u64 {
            loaded.weights.iter().filter(|(name, _)| keep(name)).map(|(_, tensor)| tensor.elem_count() as u64).sum()
        };
        let teacher_total = element_count(&|_| true);
        let student_total = element_count(&|name| !name.starts_with("model.layers.0."));
        assert_eq!(teacher_total, total_parameters(&loaded.config), "the weight count disagrees with the config's");
        assert_eq!(distilled.method, "distillation");
        assert_eq!(distilled.total_parameters, student_total);
        assert_eq!(distilled.trainable_parameters, student_total);

        let settings = settings();
        let supervised_job = EstimateJob {
            model_path: dir.path(),
            method: EstimateMethod::Supervised { conversations: &conversations },
            approach: &Approach::Full,
            settings: &settings,
            hold_out_validation: true,
            measure_steps: 0,
        };
        let supervised = estimate(&supervised_job, &mut SilentObserver).unwrap();
        assert_eq!(distilled.examples, 8);
        assert_eq!(distilled.tokens_per_epoch, supervised.tokens_per_epoch);
        assert_eq!(distilled.steps_per_epoch, 4);

        // The 2 longest examples are the last 2, with the same tokens in the 1-layer student.
        let mut student_config = loaded.config.clone();
        student_config.num_hidden_layers = 1;
        let encoded = crate::data::encode_examples(&loaded, &conversations, 1024, "max_seq_len", "training file", &mut SilentObserver).unwrap();
        let (rows, seq_len) = (2, encoded[7].ids.len());
        let targets = encoded[6].n_targets() + encoded[7].n_targets();
        let vocab = loaded.tokenizer.get_vocab(true).len();
        let expected_memory = parameter_bytes(student_total, student_total)
            + activation_bytes(&student_config, rows, seq_len, targets)
            + 4 * teacher_total
            + 4 * 6 * (targets * vocab) as u64;
        assert_eq!(distilled.estimated_peak_memory_bytes, expected_memory);

        let without_kd = estimate_distillation(dir.path(), &conversations, &Approach::Full, &distill_settings(0.0, Some(vec![1])), 0).unwrap();
        assert_eq!(
            distilled.estimated_peak_memory_bytes - without_kd.estimated_peak_memory_bytes,
            4 * 6 * (targets * vocab) as u64,
            "at kd_weight 0 the teacher's log-probabilities are not computed"
        );
    }

    #[test]
    fn distillation_estimate_times_steps() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 6).unwrap();
        let distill = distill_settings(0.5, None);
        let approach = Approach::Lora(LoraSettings::default());
        let estimate = estimate_distillation(dir.path(), &counting_conversations(), &approach, &distill, 2).unwrap();

        let seconds = estimate.seconds_per_step.expect("a measured step time");
        assert!(seconds > 0.0, "{seconds}");
        assert_eq!(estimate.estimated_total_seconds, Some(seconds * 4.0));
    }

    #[test]
    fn distillation_estimate_rejects_prompts_only_file() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 7).unwrap();
        let prompts: Vec<Conversation> = counting_conversations()
            .into_iter()
            .map(|mut conversation| {
                conversation.messages.truncate(1);
                conversation
            })
            .collect();
        let err = estimate_distillation(dir.path(), &prompts, &Approach::Full, &distill_settings(0.5, None), 0).unwrap_err();

        let TrainError::InvalidData { message, param } = err else {
            panic!("expected invalid data, got {err}");
        };
        assert_eq!(param.as_deref(), Some("training_file"));
        assert!(message.contains("teacher writes the replies"), "{message}");
    }

    #[test]
    fn distillation_estimate_rejects_lora_student_layers() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 8).unwrap();
        let approach = Approach::Lora(LoraSettings::default());
        let err = estimate_distillation(dir.path(), &counting_conversations(), &approach, &distill_settings(0.5, Some(vec![0])), 0).unwrap_err();

        assert_eq!(err.param(), Some("training_type"), "{err}");
    }
}

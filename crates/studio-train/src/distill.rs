//! Knowledge distillation: a student learns the teacher's softened next-token distribution
//! together with the reference tokens.
//!
//! The loss over target tokens is `kd_weight · T² · KL(teacher_T ‖ student_T) + (1 − kd_weight)
//! · CE`, where `_T` is the softmax of the logits divided by the temperature `T`. The `T²`
//! factor keeps the gradient of the distillation term at the same scale for every `T`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use studio_core::dataset::{Conversation, Message, Role};

use crate::batch::Batch;
use crate::chat::EncodedExample;
use crate::data::{encode_examples, hold_out};
use crate::export::FolderMetadata;
use crate::generate::{ChatModel, SamplingParams};
use crate::loader::{load_model, LoadedModel};
use crate::lora;
use crate::model::{ForwardContext, Llama};
use crate::ops::{cross_entropy_per_row, log_softmax_last_dim};
use crate::rng::Rng;
use crate::run::{invalid, plural, trainable_vars, validate_settings, write_artifacts};
use crate::steps::{LoopEnd, StepGradients, StepLoop, StepMethod};
use crate::{
    evaluate, EventLevel, RunOutcome, SftJob, TrainError, TrainObserver, TrainSummary,
};

/// The distillation settings of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillSettings {
    /// Softens both distributions; must be positive.
    pub temperature: f64,
    /// Weight of the distillation term, in [0, 1].
    pub kd_weight: f64,
    /// Builds the student from these decoder layers of the job's model; `None` keeps all.
    pub student_layers: Option<Vec<usize>>,
}

/// One distillation run. `sft` describes the student exactly as a supervised run would; its
/// examples' assistant turns are the reference responses that the teacher scores.
pub struct DistillJob<'a> {
    pub sft: SftJob<'a>,
    /// A GGUF file or a Hugging Face model folder.
    pub teacher_path: &'a Path,
    /// A PEFT adapter applied to the teacher, for a teacher that was itself fine-tuned with LoRA.
    pub teacher_adapter: Option<&'a Path>,
    /// The teacher's name in messages.
    pub teacher_name: &'a str,
    pub distill: DistillSettings,
}

/// Keeps decoder layers `layers` of a loaded model, renumbered from 0, with its embeddings,
/// final norm and head, so the result is a smaller model of the same family.
pub fn select_layers(loaded: &mut LoadedModel, layers: &[usize]) -> Result<(), TrainError> {
    check_student_layers(layers, loaded.config.num_hidden_layers)?;

    let mut weights = HashMap::with_capacity(loaded.weights.len());
    for (name, tensor) in loaded.weights.drain() {
        match layer_of(&name) {
            None => {
                weights.insert(name, tensor);
            }
            Some((source, rest)) => {
                if let Some(target) = layers.iter().position(|&layer| layer == source) {
                    weights.insert(format!("model.layers.{target}.{rest}"), tensor);
                }
            }
        }
    }
    loaded.weights = weights;
    loaded.config.num_hidden_layers = layers.len();
    Ok(())
}

/// Checks that `layers` is a non-empty, strictly increasing list of indices below `count`, the
/// number of decoder layers of the model that the student is built from.
pub fn check_student_layers(layers: &[usize], count: usize) -> Result<(), TrainError> {
    let param = "method.distillation.student_layers";
    if layers.is_empty() {
        return Err(invalid(
            "student_layers is empty; list at least one layer index",
            param,
        ));
    }
    for pair in layers.windows(2) {
        if pair[1] <= pair[0] {
            return Err(invalid(
                &format!(
                    "student_layers must increase strictly, but {} follows {}",
                    pair[1], pair[0]
                ),
                param,
            ));
        }
    }
    if let Some(&bad) = layers.iter().find(|&&layer| layer >= count) {
        return Err(invalid(
            &format!(
                "student_layers names layer {bad}, but the model has {count} layers (0 to {})",
                count - 1
            ),
            param,
        ));
    }

    Ok(())
}

/// Splits `model.layers.{i}.{rest}` into `i` and `rest`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let tail = name.strip_prefix("model.layers.")?;
    let (index, rest) = tail.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// Checks that teacher and student share a tokenizer and returns its vocabulary size, to which
/// both heads are cut (a head may have extra padding rows).
pub fn shared_vocabulary(
    teacher: &LoadedModel,
    teacher_name: &str,
    student: &LoadedModel,
    student_name: &str,
) -> Result<usize, TrainError> {
    let teacher_vocab = teacher.tokenizer.get_vocab(true);
    let student_vocab = student.tokenizer.get_vocab(true);
    let describe = |vocab: &HashMap<String, u32>| format!("{} tokens", vocab.len());
    let mismatch = |detail: String| {
        invalid(
            &format!(
                "teacher {teacher_name} and student {student_name} do not share a tokenizer: the teacher's vocabulary has {}, the student's {}{detail}; distill into a model with the teacher's tokenizer",
                describe(&teacher_vocab),
                describe(&student_vocab)
            ),
            "method.distillation.teacher_model",
        )
    };
    if teacher_vocab.len() != student_vocab.len() {
        return Err(mismatch(String::new()));
    }
    let mut differing: Vec<(&String, &u32)> = teacher_vocab
        .iter()
        .filter(|(token, id)| student_vocab.get(*token) != Some(*id))
        .collect();
    if !differing.is_empty() {
        differing.sort_by_key(|(_, id)| **id);
        let (token, id) = differing[0];
        let student_id = student_vocab
            .get(token)
            .map_or("no id".to_string(), |id| format!("id {id}"));
        return Err(mismatch(format!(
            ", and {} tokens differ (the first: {token:?} is id {id} for the teacher and {student_id} for the student)",
            differing.len()
        )));
    }
    let vocab = teacher_vocab.len();
    for (name, loaded) in [(teacher_name, teacher), (student_name, student)] {
        if loaded.config.vocab_size < vocab {
            return Err(invalid(
                &format!(
                    "model {name} has a head of {} rows for a tokenizer of {vocab} tokens",
                    loaded.config.vocab_size
                ),
                "method.distillation.teacher_model",
            ));
        }
    }
    Ok(vocab)
}

/// Returns the teacher's log-probabilities at temperature `temperature`, `[n_targets, vocab]`, for the
/// target positions of `batch`, computed without a graph.
pub fn teacher_log_probs(
    teacher: &Llama,
    batch: &Batch,
    vocab: usize,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    let hidden = teacher.hidden_states(
        &batch.input_ids,
        &batch.lengths,
        &mut ForwardContext::eval(),
    )?;
    let hidden = hidden.index_select(&batch.target_positions, 0)?;
    let logits = teacher.logits(&hidden)?.narrow(1, 0, vocab)?;
    Ok(log_softmax_last_dim(&(logits / temperature)?)?.detach())
}

/// The summed loss of a batch and its parts.
pub struct DistillLoss {
    /// Scalar: `kd_weight · T² · Σ KL + (1 − kd_weight) · Σ CE` over the target rows.
    pub sum_loss: Tensor,
    /// `Σ KL(teacher_T ‖ student_T)`, unscaled.
    pub sum_kl: f64,
    /// `Σ CE` against the reference tokens, at temperature 1.
    pub sum_ce: f64,
    /// Rows whose argmax is the reference token.
    pub n_correct: usize,
}

/// Computes the distillation loss for student logits `[n, vocab]` (already cut to the shared
/// vocabulary), the teacher's log-probabilities at `temperature` and the reference targets.
/// Works in log space throughout, so it stays finite at low temperatures.
pub fn distillation_loss(
    student_logits: &Tensor,
    teacher_log_probs: &Tensor,
    targets: &Tensor,
    temperature: f64,
    kd_weight: f64,
) -> candle_core::Result<DistillLoss> {
    let ce = cross_entropy_per_row(student_logits, targets)?.sum_all()?;
    let sum_ce = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let predicted = student_logits.argmax(D::Minus1)?;
    let n_correct = predicted
        .eq(targets)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;

    // kd_weight 0 is plain cross-entropy, without the vocabulary-wide tensors of the KL.
    if kd_weight == 0.0 {
        return Ok(DistillLoss {
            sum_loss: ce,
            sum_kl: 0.0,
            sum_ce,
            n_correct,
        });
    }
    let student_log_probs = log_softmax_last_dim(&(student_logits / temperature)?)?;
    let kl = (teacher_log_probs.exp()? * (teacher_log_probs - &student_log_probs)?)?.sum_all()?;
    let sum_kl = kl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let kd_term = (kl * (kd_weight * temperature * temperature))?;
    let sum_loss = if kd_weight == 1.0 {
        kd_term
    } else {
        (kd_term + (ce * (1.0 - kd_weight))?)?
    };
    Ok(DistillLoss {
        sum_loss,
        sum_kl,
        sum_ce,
        n_correct,
    })
}

/// Mean `KL(teacher_T ‖ student_T)` per target token of `examples`, without dropout.
pub fn mean_kl(
    teacher: &Llama,
    student: &Llama,
    examples: &[EncodedExample],
    vocab: usize,
    temperature: f64,
    pad: u32,
) -> Result<f64, TrainError> {
    let device = student.device().clone();
    let (mut sum_kl, mut n_targets) = (0f64, 0usize);
    for example in examples {
        let batch = Batch::new(&[example], pad, &device)?;
        if batch.n_targets == 0 {
            continue;
        }
        let teacher_lp = teacher_log_probs(teacher, &batch, vocab, temperature)?;
        let logits = student_logits(student, &batch, vocab, &mut ForwardContext::eval())?;
        let loss = distillation_loss(&logits, &teacher_lp, &batch.target_ids, temperature, 1.0)?;
        sum_kl += loss.sum_kl;
        n_targets += batch.n_targets;
    }
    Ok(sum_kl / n_targets.max(1) as f64)
}

fn student_logits(
    student: &Llama,
    batch: &Batch,
    vocab: usize,
    ctx: &mut ForwardContext<'_>,
) -> candle_core::Result<Tensor> {
    let hidden = student.hidden_states(&batch.input_ids, &batch.lengths, ctx)?;
    let hidden = hidden.index_select(&batch.target_positions, 0)?;
    student.logits(&hidden)?.narrow(1, 0, vocab)
}

/// Has the teacher write the assistant reply to each prompt (a conversation ending with a user
/// turn), so a prompts-only file becomes a supervised one. `on_progress` receives the number of
/// replies written so far after each one. When it returns `ControlFlow::Break`, the function
/// stops there and returns `None`.
pub fn teacher_replies(
    teacher_path: &Path,
    teacher_adapter: Option<&Path>,
    prompts: &[Conversation],
    params: &SamplingParams,
    on_progress: &mut dyn FnMut(usize) -> ControlFlow<()>,
) -> Result<Option<Vec<Conversation>>, TrainError> {
    params.validate()?;
    let teacher = ChatModel::load(teacher_path, teacher_adapter, &Device::Cpu)?;
    let mut conversations = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let reply = teacher.reply(&prompt.messages, params, &[], &mut |_| {})?;
        let mut messages = prompt.messages.clone();
        messages.push(Message {
            role: Role::Assistant,
            content: reply.text,
            weight: None,
        });
        conversations.push(Conversation { messages });
        if on_progress(conversations.len()).is_break() {
            return Ok(None);
        }
    }
    Ok(Some(conversations))
}

/// The request path of a distillation job's hyperparameters, which errors name as the field to fix.
pub(crate) const DISTILLATION_HYPERPARAMETERS: &str = "method.distillation.hyperparameters";

pub(crate) fn validate_distill(settings: &DistillSettings) -> Result<(), TrainError> {
    let param = |name: &str| format!("{DISTILLATION_HYPERPARAMETERS}.{name}");
    if !(settings.temperature.is_finite() && settings.temperature > 0.0) {
        return Err(invalid(
            &format!(
                "temperature {} must be a positive number",
                settings.temperature
            ),
            &param("temperature"),
        ));
    }
    if !(0.0..=1.0).contains(&settings.kd_weight) {
        return Err(invalid(
            &format!("kd_weight {} is outside [0, 1]", settings.kd_weight),
            &param("kd_weight"),
        ));
    }
    Ok(())
}

/// Loads the teacher `name` from `path`, with its adapter when it has one.
pub(crate) fn load_teacher(
    path: &Path,
    adapter: Option<&Path>,
    name: &str,
    device: &Device,
) -> Result<(LoadedModel, Llama), TrainError> {
    let mut loaded = load_model(path, device).map_err(|err| match err {
        TrainError::ModelLoad { path, message } => TrainError::InvalidData {
            message: format!(
                "failed to load teacher model {name} from {}: {message}",
                path.display()
            ),
            param: Some("method.distillation.teacher_model".into()),
        },
        other => other,
    })?;
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, device)?;
    loaded.weights.clear();
    if let Some(adapter) = adapter {
        lora::apply_adapter(&mut model, adapter)?;
    }
    Ok((loaded, model))
}

/// Checks that the student's training type suits the distillation settings.
pub(crate) fn check_approach(approach: &crate::Approach, distill: &DistillSettings) -> Result<(), TrainError> {
    if let crate::Approach::Lora(settings) = approach {
        if distill.student_layers.is_some() {
            return Err(invalid(
                "student_layers builds a new, smaller model, which cannot take LoRA adapters; train it with training_type full",
                "training_type",
            ));
        }
        lora::validate(settings)?;
    }
    Ok(())
}

/// Runs a distillation and writes the student under `job.sft.output_dir`, as [`crate::run_sft`]
/// does, with the same checkpoints, stop requests and metrics.
///
/// Runs on the calling thread until done; call it from a blocking thread in async code.
pub fn run_distillation(
    job: &DistillJob<'_>,
    observer: &mut dyn TrainObserver,
) -> Result<RunOutcome, TrainError> {
    let sft = &job.sft;
    validate_settings(&sft.settings, DISTILLATION_HYPERPARAMETERS)?;
    validate_distill(&job.distill)?;
    check_approach(&sft.approach, &job.distill)?;
    let device = Device::Cpu;
    let settings = &sft.settings;

    let (teacher_loaded, teacher) = load_teacher(job.teacher_path, job.teacher_adapter, job.teacher_name, &device)?;
    observer.on_event(
        EventLevel::Info,
        &format!("Loaded teacher model {}", job.teacher_name),
    );
    let mut loaded = load_model(sft.model_path, &device)?;
    let vocab = shared_vocabulary(
        &teacher_loaded,
        job.teacher_name,
        &loaded,
        sft.base_model_name,
    )?;
    drop(teacher_loaded);
    if let Some(layers) = &job.distill.student_layers {
        let total = loaded.config.num_hidden_layers;
        select_layers(&mut loaded, layers)?;
        observer.on_event(
            EventLevel::Info,
            &format!(
                "Built the student from {} of the {total} layers of {}",
                layers.len(),
                sft.base_model_name
            ),
        );
    }

    let max_seq_len_param = format!("{DISTILLATION_HYPERPARAMETERS}.max_seq_len");
    let examples = encode_examples(
        &loaded,
        sft.examples,
        settings.max_seq_len,
        &max_seq_len_param,
        "training file",
        observer,
    )?;
    if examples.is_empty() {
        return Err(invalid(
            "the training file has no examples",
            "training_file",
        ));
    }
    let (train, valid) = match sft.validation {
        Some(conversations) => (
            examples,
            encode_examples(
                &loaded,
                conversations,
                settings.max_seq_len,
                &max_seq_len_param,
                "validation file",
                observer,
            )?,
        ),
        None => hold_out(examples, settings.seed),
    };

    let mut rng = Rng::new(settings.seed);
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    loaded.weights.clear();
    let vars = trainable_vars(
        &mut model,
        &sft.approach,
        &mut rng,
        observer,
        settings.learning_rate,
    )?;

    let method = DistillSteps {
        context: StepContext {
            teacher: &teacher,
            student: &model,
            vars: &vars,
            vocab,
            distill: &job.distill,
            batch_size: settings.batch_size,
            pad: loaded.special.pad,
            device: &device,
        },
        train: &train,
        valid: &valid,
    };
    let describe = |total_steps: u64, _trainable: usize| {
        format!(
            "Distilling {} on {} for {}: {}, temperature {}, kd_weight {}",
            job.teacher_name,
            plural(train.len() as u64, "example"),
            plural(settings.n_epochs as u64, "epoch"),
            plural(total_steps, "step"),
            job.distill.temperature,
            job.distill.kd_weight,
        )
    };
    let steps = StepLoop {
        job: sft,
        model: &model,
        vars: &vars,
        n_items: train.len(),
        rng,
    };
    let progress = match steps.run(&method, observer, &describe)? {
        LoopEnd::Finished(progress) => progress,
        LoopEnd::Stopped(outcome) => return Ok(outcome),
    };

    let metadata = FolderMetadata {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_deref(),
        special: loaded.special,
    };
    let artifacts = write_artifacts(sft, &model, &metadata)?;
    observer.on_event(
        EventLevel::Info,
        &format!("Saved the student after {}", plural(progress.step, "step")),
    );
    Ok(RunOutcome::Succeeded(TrainSummary {
        trained_tokens: progress.trained_tokens,
        steps: progress.step,
        skipped_steps: progress.skipped_steps,
        artifacts,
    }))
}

/// The distillation step: the teacher's softened distribution and the reference tokens.
pub(crate) struct DistillSteps<'a> {
    pub(crate) context: StepContext<'a>,
    pub(crate) train: &'a [EncodedExample],
    pub(crate) valid: &'a [EncodedExample],
}

impl StepMethod for DistillSteps<'_> {
    fn gradients(&self, indices: &[usize], rng: &mut Rng) -> Result<StepGradients, TrainError> {
        let rows: Vec<&EncodedExample> = indices.iter().map(|&i| &self.train[i]).collect();
        let totals = self.context.accumulate(&rows, rng)?;
        tracing::debug!(train_loss = totals.loss, kd_loss = totals.kl, ce_loss = totals.ce, "distillation step");
        Ok(StepGradients {
            loss: totals.loss,
            token_accuracy: totals.n_correct as f64 / totals.n_targets.max(1) as f64,
            n_tokens: totals.n_tokens,
            grads: totals.grads,
            preference: None,
        })
    }

    fn evaluate(&self) -> Result<Option<(f64, f64)>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let context = &self.context;
        evaluate(context.student, self.valid, context.batch_size, context.pad, context.device).map(Some)
    }
}

/// The models and settings that every step of a run uses.
pub(crate) struct StepContext<'a> {
    pub(crate) teacher: &'a Llama,
    pub(crate) student: &'a Llama,
    pub(crate) vars: &'a [(String, Var)],
    pub(crate) vocab: usize,
    pub(crate) distill: &'a DistillSettings,
    pub(crate) batch_size: usize,
    pub(crate) pad: u32,
    pub(crate) device: &'a Device,
}

struct StepTotals {
    /// Mean loss over the step's target tokens.
    loss: f64,
    /// Mean unscaled KL per target token.
    kl: f64,
    /// Mean cross-entropy per target token.
    ce: f64,
    n_correct: usize,
    n_targets: usize,
    n_tokens: usize,
    grads: Vec<Tensor>,
}

impl StepContext<'_> {
    /// Runs the step's micro-batches and sums their gradients, each micro-batch's loss divided
    /// by the target tokens of the whole step, as the supervised loop does.
    fn accumulate(
        &self,
        rows: &[&EncodedExample],
        rng: &mut Rng,
    ) -> Result<StepTotals, TrainError> {
        let batches = rows
            .chunks(self.batch_size)
            .map(|chunk| Batch::new(chunk, self.pad, self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
        let scale = 1.0 / n_targets.max(1) as f64;
        let mut totals = StepTotals {
            loss: 0.0,
            kl: 0.0,
            ce: 0.0,
            n_correct: 0,
            n_targets,
            n_tokens: batches.iter().map(|b| b.n_tokens).sum(),
            grads: Vec::new(),
        };
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let temperature = self.distill.temperature;
        for batch in &batches {
            let teacher_lp = if self.distill.kd_weight > 0.0 {
                teacher_log_probs(self.teacher, batch, self.vocab, temperature)?
            } else {
                // Unused: the loss skips the distillation term at kd_weight 0.
                Tensor::zeros(1, DType::F32, self.device)?
            };
            let mut ctx = ForwardContext {
                rng: Some(&mut *rng),
                adapters_enabled: true,
            };
            let logits = student_logits(self.student, batch, self.vocab, &mut ctx)?;
            let loss = distillation_loss(
                &logits,
                &teacher_lp,
                &batch.target_ids,
                temperature,
                self.distill.kd_weight,
            )?;
            let scaled = (loss.sum_loss * scale)?;
            totals.loss += scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            totals.kl += loss.sum_kl * scale;
            totals.ce += loss.sum_ce * scale;
            totals.n_correct += loss.n_correct;
            let store = scaled.backward()?;
            for (slot, (_, var)) in grads.iter_mut().zip(self.vars) {
                if let Some(grad) = store.get(var) {
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + grad)?,
                        None => grad.clone(),
                    });
                }
            }
        }
        totals.grads = grads
            .into_iter()
            .zip(self.vars)
            .map(|(grad, (name, _))| {
                grad.ok_or_else(|| {
                    TrainError::Candle(candle_core::Error::Msg(format!(
                        "{name} received no gradient"
                    )))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::run::{StepMetrics, StopRequest};
    use crate::tiny::counting_conversations;
    use crate::{Approach, CheckpointInfo, TrainSettings};

    #[derive(Default)]
    struct Recorder {
        steps: Vec<StepMetrics>,
        checkpoints: Vec<CheckpointInfo>,
        stop_after: Option<u64>,
    }

    impl TrainObserver for Recorder {
        fn on_step(&mut self, metrics: &StepMetrics) {
            self.steps.push(metrics.clone());
        }

        fn on_event(&mut self, _level: EventLevel, _message: &str) {}

        fn stop_request(&mut self) -> Option<StopRequest> {
            match self.stop_after {
                Some(step) if self.steps.len() as u64 >= step => Some(StopRequest::Suspend),
                _ => None,
            }
        }

        fn on_checkpoint(&mut self, checkpoint: &CheckpointInfo) {
            self.checkpoints.push(checkpoint.clone());
        }
    }

    /// Distils a 2-layer tiny teacher into its own first layer, from `resume` when given.
    fn distill(root: &Path, out: &str, examples: &[Conversation], resume: Option<&Path>, recorder: &mut Recorder) -> RunOutcome {
        let teacher = root.join("teacher");
        let output = root.join(out);
        let checkpoints = root.join(format!("{out}-checkpoints"));
        let job = DistillJob {
            sft: SftJob {
                model_path: &teacher,
                base_model_name: "tiny",
                examples,
                validation: Some(&examples[..2]),
                approach: Approach::Full,
                settings: TrainSettings {
                    n_epochs: 2,
                    batch_size: 2,
                    gradient_accumulation_steps: 2,
                    learning_rate: 1e-2,
                    max_seq_len: 160,
                    seed: 3,
                    ..TrainSettings::default()
                },
                output_dir: &output,
                checkpoint_dir: Some(&checkpoints),
                resume_from: resume,
                export_merged: false,
            },
            teacher_path: &teacher,
            teacher_adapter: None,
            teacher_name: "tiny",
            distill: DistillSettings {
                temperature: 2.0,
                kd_weight: 0.5,
                student_layers: Some(vec![0]),
            },
        };
        run_distillation(&job, recorder).unwrap()
    }

    #[test]
    fn distillation_resume_matches_uninterrupted_run() {
        let root = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(&root.path().join("teacher"), "llama", 11).unwrap();
        let examples = counting_conversations();

        let mut whole = Recorder::default();
        distill(root.path(), "whole", &examples, None, &mut whole);
        let mut first = Recorder { stop_after: Some(3), ..Recorder::default() };
        let stopped = distill(root.path(), "cut", &examples, None, &mut first);
        let checkpoint = first.checkpoints.last().expect("a checkpoint on suspend").dir.clone();
        let mut rest = Recorder::default();
        distill(root.path(), "cut", &examples, Some(&checkpoint), &mut rest);

        // All 8 examples train, since a validation set is given: 2 steps of 4 an epoch.
        assert_eq!(whole.steps.len(), 4);
        assert_eq!(stopped, RunOutcome::Stopped { steps: 3, request: StopRequest::Suspend });
        assert!(checkpoint.ends_with("step-3"), "{}", checkpoint.display());
        assert_eq!(rest.steps.len(), 1);
        let (expected, resumed) = (&whole.steps[3], &rest.steps[0]);
        assert!((expected.train_loss - resumed.train_loss).abs() < 1e-5, "{expected:?} vs {resumed:?}");
        assert_eq!(expected.valid_loss.is_some(), resumed.valid_loss.is_some());
        let read = |out: &str| {
            candle_core::safetensors::load(root.path().join(out).join("model").join("model.safetensors"), &Device::Cpu).unwrap()
        };
        let (whole_model, resumed_model) = (read("whole"), read("cut"));
        assert_eq!(whole_model.len(), resumed_model.len());
        for (name, tensor) in &whole_model {
            let difference = (tensor - &resumed_model[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(difference <= 1e-5, "{name} differs by {difference} after resuming");
        }
    }
}

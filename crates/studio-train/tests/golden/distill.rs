//! Distillation: the loss against a direct computation, the checks made before training, and a
//! real run that brings a 10-layer student of SmolLM2 closer to the full model.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use studio_core::dataset::{parse_dataset, Conversation};
use studio_train::batch::{batch_loss, Batch};
use studio_train::chat::EncodedExample;
use studio_train::data::encode_examples;
use studio_train::distill::{distillation_loss, mean_kl, select_layers};
use studio_train::loader::load_model;
use studio_train::model::{ForwardContext, Llama};
use studio_train::{
    run_distillation, Approach, ArtifactKind, DistillJob, DistillSettings, EventLevel, RunOutcome,
    SftJob, StepMetrics, StopRequest, TrainError, TrainObserver, TrainSettings,
};

use super::model_path;

#[derive(Default)]
struct Recorder {
    steps: Vec<StepMetrics>,
    events: Vec<String>,
}

impl TrainObserver for Recorder {
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.steps.push(metrics.clone());
    }

    fn on_event(&mut self, _level: EventLevel, message: &str) {
        self.events.push(message.to_string());
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        None
    }
}

fn log_softmax(row: &[f64], temperature: f64) -> Vec<f64> {
    let scaled: Vec<f64> = row.iter().map(|v| v / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = scaled.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    scaled.iter().map(|v| v - log_sum).collect()
}

/// `Σ_rows KL(softmax(t/T) ‖ softmax(s/T))` and `Σ_rows CE(s, target)`, written out in f64.
fn direct(
    student: &[[f64; 3]],
    teacher: &[[f64; 3]],
    targets: &[usize],
    temperature: f64,
) -> (f64, f64) {
    let mut kl = 0.0;
    let mut ce = 0.0;
    for ((s, t), &target) in student.iter().zip(teacher).zip(targets) {
        let (ls, lt) = (log_softmax(s, temperature), log_softmax(t, temperature));
        kl += lt
            .iter()
            .zip(&ls)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        ce -= log_softmax(s, 1.0)[target];
    }
    (kl, ce)
}

const STUDENT: [[f64; 3]; 2] = [[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]];
const TEACHER: [[f64; 3]; 2] = [[1.0, 0.0, 2.0], [-1.0, 2.5, 0.0]];
const TARGETS: [usize; 2] = [2, 1];

fn loss_of(student: &Tensor, temperature: f64, kd_weight: f64) -> (Tensor, f64, f64) {
    let device = Device::Cpu;
    let teacher = Tensor::new(&TEACHER, &device).unwrap();
    let teacher_lp =
        studio_train::ops::log_softmax_last_dim(&(teacher / temperature).unwrap()).unwrap();
    let targets = Tensor::new(&[TARGETS[0] as u32, TARGETS[1] as u32], &device).unwrap();
    let loss = distillation_loss(student, &teacher_lp, &targets, temperature, kd_weight).unwrap();
    (loss.sum_loss, loss.sum_kl, loss.sum_ce)
}

fn scalar(tensor: &Tensor) -> f64 {
    tensor
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn distill_loss_matches_direct_formula() {
    let student = Tensor::new(&STUDENT, &Device::Cpu).unwrap();
    for (temperature, kd_weight) in [(1.0, 0.5), (2.0, 0.5), (4.0, 0.25), (0.05, 0.7)] {
        let (loss, kl, ce) = loss_of(&student, temperature, kd_weight);
        let (expected_kl, expected_ce) = direct(&STUDENT, &TEACHER, &TARGETS, temperature);
        let expected =
            kd_weight * temperature * temperature * expected_kl + (1.0 - kd_weight) * expected_ce;
        let tolerance = 1e-9 * expected.abs().max(1.0);
        assert!(
            (scalar(&loss) - expected).abs() < tolerance,
            "T {temperature}: loss {} vs {expected}",
            scalar(&loss)
        );
        assert!(
            (kl - expected_kl).abs() < 1e-9,
            "T {temperature}: kl {kl} vs {expected_kl}"
        );
        assert!(
            (ce - expected_ce).abs() < 1e-9,
            "T {temperature}: ce {ce} vs {expected_ce}"
        );
        assert!(scalar(&loss).is_finite());
    }
}

#[test]
fn distill_loss_scales_kl_by_temperature_squared() {
    let student = Tensor::new(&STUDENT, &Device::Cpu).unwrap();
    for temperature in [0.5, 2.0, 8.0] {
        let (loss, kl, _) = loss_of(&student, temperature, 1.0);
        let ratio = scalar(&loss) / kl;
        assert!(
            (ratio - temperature * temperature).abs() < 1e-9,
            "T {temperature}: ratio {ratio}"
        );
    }
}

#[test]
fn distill_loss_is_finite_at_low_temperature() {
    let student = Tensor::new(&[[80.0f32, -60.0, 0.0]], &Device::Cpu).unwrap();
    let teacher = Tensor::new(&[[-70.0f32, 90.0, 1.0]], &Device::Cpu).unwrap();
    let temperature = 0.01;
    let teacher_lp =
        studio_train::ops::log_softmax_last_dim(&(teacher / temperature).unwrap()).unwrap();
    let targets = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    let loss = distillation_loss(&student, &teacher_lp, &targets, temperature, 0.5).unwrap();
    let value = scalar(&loss.sum_loss);
    assert!(value.is_finite(), "loss {value}");
    // The student's log-probability of token 1 at T 0.01 is (-60 - 80) / 0.01 = -14000.
    let expected = 0.5 * temperature * temperature * 14_000.0 + 0.5 * 140.0;
    assert!(
        (value - expected).abs() < 1e-2 * expected,
        "loss {value} vs {expected}"
    );
}

#[test]
fn distill_gradient_matches_finite_differences() {
    let var = Var::new(&STUDENT, &Device::Cpu).unwrap();
    let (temperature, kd_weight) = (2.0, 0.6);
    let (loss, _, _) = loss_of(var.as_tensor(), temperature, kd_weight);
    let grads = loss.backward().unwrap();
    let grad: Vec<Vec<f64>> = grads.get(&var).unwrap().to_vec2().unwrap();
    let step = 1e-6;
    for row in 0..2 {
        for column in 0..3 {
            let mut shifted = STUDENT;
            shifted[row][column] += step;
            let plus = scalar(
                &loss_of(
                    &Tensor::new(&shifted, &Device::Cpu).unwrap(),
                    temperature,
                    kd_weight,
                )
                .0,
            );
            shifted[row][column] -= 2.0 * step;
            let minus = scalar(
                &loss_of(
                    &Tensor::new(&shifted, &Device::Cpu).unwrap(),
                    temperature,
                    kd_weight,
                )
                .0,
            );
            let numeric = (plus - minus) / (2.0 * step);
            assert!(
                (grad[row][column] - numeric).abs() < 1e-6,
                "[{row}][{column}]: {} vs {numeric}",
                grad[row][column]
            );
        }
    }
}

fn tiny_folder(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if !dir.join("config.json").is_file() {
        studio_train::tiny::write_tiny_model_folder(&dir, "llama", 7).unwrap();
    }
    dir
}

#[test]
fn distill_kd_weight_zero_equals_cross_entropy() {
    let loaded = load_model(&tiny_folder("distill-tiny-ce"), &Device::Cpu).unwrap();
    let model = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
    let examples = [
        EncodedExample {
            ids: vec![3, 9, 27, 81, 17, 40],
            targets: vec![false, false, true, true, true, true],
        },
        EncodedExample {
            ids: vec![5, 11, 60, 2],
            targets: vec![false, true, true, true],
        },
    ];
    let rows: Vec<&EncodedExample> = examples.iter().collect();
    let batch = Batch::new(&rows, loaded.special.pad, &Device::Cpu).unwrap();
    let expected = scalar(
        &batch_loss(&model, &batch, &mut ForwardContext::eval())
            .unwrap()
            .sum_nll,
    );

    let hidden = model
        .hidden_states(
            &batch.input_ids,
            &batch.lengths,
            &mut ForwardContext::eval(),
        )
        .unwrap();
    let logits = model
        .logits(&hidden.index_select(&batch.target_positions, 0).unwrap())
        .unwrap();
    let teacher_lp = studio_train::ops::log_softmax_last_dim(&logits).unwrap();
    let loss = distillation_loss(&logits, &teacher_lp, &batch.target_ids, 2.0, 0.0).unwrap();
    assert!(
        (scalar(&loss.sum_loss) - expected).abs() < 1e-5,
        "{} vs {expected}",
        scalar(&loss.sum_loss)
    );
    // The same model as its own teacher has no KL to learn.
    let loss = distillation_loss(&logits, &teacher_lp, &batch.target_ids, 1.0, 1.0).unwrap();
    assert!(loss.sum_kl.abs() < 1e-5, "kl {}", loss.sum_kl);
}

#[test]
fn distill_student_layers_are_checked_against_the_model() {
    let dir = tiny_folder("distill-tiny-layers");
    let mut loaded = load_model(&dir, &Device::Cpu).unwrap();
    let err = select_layers(&mut loaded, &[0, 2]).unwrap_err().to_string();
    assert!(
        err.contains("layer 2") && err.contains("has 2 layers"),
        "{err}"
    );

    let mut loaded = load_model(&dir, &Device::Cpu).unwrap();
    let full = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
    select_layers(&mut loaded, &[1]).unwrap();
    assert_eq!(loaded.config.num_hidden_layers, 1);
    let student = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
    let same =
        |a: &Tensor, b: &Tensor| scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap()) == 0.0;
    assert!(same(
        &student.layers[0].q_proj.weight,
        &full.layers[1].q_proj.weight
    ));
    assert!(same(&student.embed_tokens, &full.embed_tokens));
    assert!(same(&student.norm, &full.norm));
}

fn conversations(name: &str) -> Vec<Conversation> {
    let path = super::repo_root().join("../shared/data").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    parse_dataset(&bytes).unwrap().0
}

fn settings(max_seq_len: usize) -> TrainSettings {
    TrainSettings {
        n_epochs: 1,
        batch_size: 4,
        learning_rate: 3e-4,
        max_seq_len,
        ..TrainSettings::default()
    }
}

fn distill_job<'a>(
    teacher: &'a Path,
    student: &'a Path,
    examples: &'a [Conversation],
    settings: TrainSettings,
    layers: Option<Vec<usize>>,
    output: &'a Path,
) -> DistillJob<'a> {
    DistillJob {
        sft: SftJob {
            model_path: student,
            base_model_name: "student",
            examples,
            validation: Some(&[]),
            approach: Approach::Full,
            settings,
            output_dir: output,
            checkpoint_dir: None,
            resume_from: None,
            export_merged: false,
        },
        teacher_path: teacher,
        teacher_adapter: None,
        teacher_name: "teacher",
        distill: DistillSettings {
            temperature: 2.0,
            kd_weight: 0.5,
            student_layers: layers,
        },
    }
}

#[test]
fn distill_rejects_mismatched_tokenizers_before_training() {
    let examples = conversations("sft_selfinstruct_seed.messages.jsonl");
    let output = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distill-mismatch");
    let student = tiny_folder("distill-tiny-mismatch");
    let teacher = model_path();
    let job = distill_job(
        &teacher,
        &student,
        &examples[..4],
        settings(64),
        None,
        &output,
    );
    let mut recorder = Recorder::default();
    let err = run_distillation(&job, &mut recorder).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TrainError::InvalidData { .. }), "{err:?}");
    assert_eq!(err.param(), Some("method.distillation.teacher_model"));
    assert!(
        message.contains("49152 tokens") && message.contains("258 tokens"),
        "{message}"
    );
    assert!(recorder.steps.is_empty());
}

#[test]
fn distill_rejects_a_missing_teacher() {
    let examples = conversations("sft_selfinstruct_seed.messages.jsonl");
    let output = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distill-missing");
    let student = tiny_folder("distill-tiny-missing");
    let teacher = output.join("no-such-teacher.gguf");
    let job = distill_job(
        &teacher,
        &student,
        &examples[..4],
        settings(64),
        None,
        &output,
    );
    let err = run_distillation(&job, &mut Recorder::default()).unwrap_err();
    assert_eq!(err.param(), Some("method.distillation.teacher_model"));
    assert!(err.to_string().contains("teacher model teacher"), "{err}");
}

/// Encodes conversations as the trainer does.
fn encoded(
    loaded: &studio_train::loader::LoadedModel,
    conversations: &[Conversation],
    max_seq_len: usize,
) -> Vec<EncodedExample> {
    encode_examples(
        loaded,
        conversations,
        max_seq_len,
        "max_seq_len",
        "test file",
        &mut Recorder::default(),
    )
    .unwrap_or_default()
}

#[test]
fn distill_real_student_moves_toward_teacher() {
    const MAX_SEQ_LEN: usize = 64;
    let layers: Vec<usize> = vec![0, 3, 6, 9, 12, 15, 18, 21, 25, 29];
    let teacher_loaded = &super::fixture().gguf;
    // Conversations whose prompt leaves at least 12 response tokens within MAX_SEQ_LEN.
    let usable: Vec<Conversation> = conversations("sft_selfinstruct_seed.messages.jsonl")
        .into_iter()
        .filter(|c| {
            encoded(teacher_loaded, std::slice::from_ref(c), MAX_SEQ_LEN)
                .iter()
                .any(|e| e.n_targets() >= 12)
        })
        .collect();
    assert!(
        usable.len() >= 48,
        "only {} conversations have short prompts",
        usable.len()
    );
    let (held_out, train) = usable.split_at(16);
    let train = &train[..32];

    let teacher = Llama::from_weights(
        &teacher_loaded.config,
        &teacher_loaded.weights,
        &Device::Cpu,
    )
    .unwrap();
    let vocab = teacher_loaded.tokenizer.get_vocab(true).len();
    let held_out = encoded(teacher_loaded, held_out, MAX_SEQ_LEN);
    assert_eq!(held_out.len(), 16);
    let pad = teacher_loaded.special.pad;

    let mut student_loaded = load_model(&model_path(), &Device::Cpu).unwrap();
    select_layers(&mut student_loaded, &layers).unwrap();
    let student = Llama::from_weights(
        &student_loaded.config,
        &student_loaded.weights,
        &Device::Cpu,
    )
    .unwrap();
    let before = mean_kl(&teacher, &student, &held_out, vocab, 1.0, pad).unwrap();
    drop(student);
    drop(student_loaded);

    let output = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distill-real");
    let _ = std::fs::remove_dir_all(&output);
    let path = model_path();
    let settings = TrainSettings {
        n_epochs: 1,
        batch_size: 8,
        learning_rate: 3e-4,
        ..settings(MAX_SEQ_LEN)
    };
    let job = distill_job(&path, &path, train, settings, Some(layers.clone()), &output);
    let mut recorder = Recorder::default();
    let outcome = run_distillation(&job, &mut recorder).unwrap();
    let RunOutcome::Succeeded(summary) = outcome else {
        panic!("the run stopped: {outcome:?}")
    };
    assert_eq!(summary.steps, 4);
    assert_eq!(summary.artifacts[0].0, ArtifactKind::Model);
    assert!(
        recorder.steps.iter().all(|m| m.train_loss.is_finite()),
        "{:?}",
        recorder.steps
    );

    let trained_loaded = load_model(&summary.artifacts[0].1, &Device::Cpu).unwrap();
    assert_eq!(trained_loaded.config.num_hidden_layers, layers.len());
    let trained = Llama::from_weights(
        &trained_loaded.config,
        &trained_loaded.weights,
        &Device::Cpu,
    )
    .unwrap();
    let after = mean_kl(&teacher, &trained, &held_out, vocab, 1.0, pad).unwrap();
    let losses: Vec<String> = recorder
        .steps
        .iter()
        .map(|m| format!("{:.3}", m.train_loss))
        .collect();
    eprintln!("train_loss by step: {}", losses.join(", "));
    eprintln!(
        "mean KL to the teacher on 16 held-out examples: {before:.4} before, {after:.4} after"
    );
    assert!(
        after <= 0.7 * before,
        "mean KL fell from {before} to {after}, less than 30%"
    );
}

#[test]
fn distill_teacher_replies_end_each_prompt() {
    use studio_core::dataset::{Message, Role};
    use studio_train::distill::teacher_replies;
    use studio_train::generate::SamplingParams;

    let dir = tiny_folder("distill-tiny-replies");
    let prompt = |text: &str| Conversation {
        messages: vec![Message { role: Role::User, content: text.into(), weight: None }],
    };
    let prompts = [prompt("Hello"), prompt("Name a colour")];
    let params = SamplingParams { max_new_tokens: 5, ..SamplingParams::default() };
    let mut progress = Vec::new();
    let mut record = |done| {
        progress.push(done);
        ControlFlow::Continue(())
    };
    let replies = teacher_replies(&dir, None, &prompts, &params, &mut record).unwrap().unwrap();
    let again = teacher_replies(&dir, None, &prompts, &params, &mut |_| ControlFlow::Continue(())).unwrap();
    let stopped = teacher_replies(&dir, None, &prompts, &params, &mut |_| ControlFlow::Break(())).unwrap();

    assert_eq!(progress, [1, 2]);
    assert_eq!(again.as_ref(), Some(&replies), "greedy replies are deterministic");
    assert_eq!(stopped, None, "a break after the first reply stops the teacher");
    for (reply, prompt) in replies.iter().zip(&prompts) {
        assert_eq!(reply.messages.len(), 2);
        assert_eq!(reply.messages[0], prompt.messages[0]);
        assert_eq!(reply.messages[1].role, Role::Assistant);
    }
}

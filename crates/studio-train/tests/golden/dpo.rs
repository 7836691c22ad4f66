//! DPO: log-probabilities, rewards, loss and LoRA gradient against the reference values, the
//! identical-pair case, a finite-difference check on the tiny model, and a real run on 16 pairs.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use studio_core::dataset::{parse_preference_dataset, PreferencePair};
use studio_train::chat::ChatTemplate;
use studio_train::dpo::{dpo_losses, encode_pairs, evaluate_preferences, pair_log_probs, EncodedPair, PairEncoder};
use studio_train::loader::load_model;
use studio_train::lora;
use studio_train::model::{ForwardContext, Llama};
use studio_train::optim::global_grad_norm;
use studio_train::rng::Rng;
use studio_train::{
    run_dpo, Approach, ArtifactKind, DpoJob, EventLevel, LoraSettings, PreferenceMetrics, RunOutcome, StepMetrics,
    StopRequest, TrainObserver, TrainSettings,
};

use super::{assert_close, f64_at, fixture, loaded, model_path, reference_adapted_model, Source};

#[derive(Default)]
struct Recorder {
    steps: Vec<(StepMetrics, PreferenceMetrics)>,
    events: Vec<String>,
}

impl TrainObserver for Recorder {
    fn on_step(&mut self, _metrics: &StepMetrics) {
        panic!("a DPO run reports its steps through on_preference_step");
    }

    fn on_preference_step(&mut self, metrics: &StepMetrics, preference: &PreferenceMetrics) {
        eprintln!("step {}: loss {:.4}, {preference:?}", metrics.step, metrics.train_loss);
        self.steps.push((metrics.clone(), *preference));
    }

    fn on_event(&mut self, _level: EventLevel, message: &str) {
        self.events.push(message.to_string());
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        None
    }
}

fn shared_pairs() -> Vec<PreferencePair> {
    let path = super::repo_root().join("../shared/data/pref_oasst.jsonl");
    let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    parse_preference_dataset(&bytes).unwrap()
}

fn encoder_parts() -> (ChatTemplate, String) {
    let model = loaded(Source::Gguf);
    let template = ChatTemplate::new(model.chat_template.as_deref().unwrap()).unwrap();
    let end_of_turn = model.tokenizer.id_to_token(model.special.eos).unwrap();
    (template, end_of_turn)
}

fn encode(pair: &PreferencePair) -> EncodedPair {
    let model = loaded(Source::Gguf);
    let (template, end_of_turn) = encoder_parts();
    let encoder = PairEncoder {
        template: &template,
        tokenizer: &model.tokenizer,
        end_of_turn: &end_of_turn,
        bos: model.special.bos,
    };
    encoder.encode(pair).unwrap()
}

fn values(tensor: &Tensor) -> Vec<f64> {
    tensor.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn dpo_reference_pair_matches_golden_values() {
    let reference = &fixture().golden["dpo_reference"];
    let beta = f64_at(&reference["beta"]);
    let pair = encode(&shared_pairs()[0]);
    assert_eq!(pair.prompt.len() as f64, f64_at(&reference["prompt_tokens"]), "prompt tokens");
    assert_eq!((pair.prompt.len() + pair.chosen.len()) as f64, f64_at(&reference["chosen_total_tokens"]), "chosen tokens");
    assert_eq!((pair.prompt.len() + pair.rejected.len()) as f64, f64_at(&reference["rejected_total_tokens"]), "rejected tokens");

    let model = reference_adapted_model(Source::Gguf);
    let pad = loaded(Source::Gguf).special.pad;
    let (chosen, rejected) = pair_log_probs(&model, &[&pair], pad, &mut ForwardContext::eval()).unwrap();
    let mut off = ForwardContext {
        rng: None,
        adapters_enabled: false,
    };
    let (reference_chosen, reference_rejected) = pair_log_probs(&model, &[&pair], pad, &mut off).unwrap();
    let checks = [
        (&chosen, "policy_logp_chosen"),
        (&rejected, "policy_logp_rejected"),
        (&reference_chosen, "reference_logp_chosen"),
        (&reference_rejected, "reference_logp_rejected"),
    ];
    for (tensor, key) in checks {
        assert_close(values(tensor)[0], f64_at(&reference[key]), 1e-3, key);
    }

    let metrics = evaluate_preferences(&model, std::slice::from_ref(&pair), beta, 1, pad).unwrap();
    assert_close(metrics.reward_chosen, f64_at(&reference["reward_chosen"]), 1e-3, "reward_chosen");
    assert_close(metrics.reward_rejected, f64_at(&reference["reward_rejected"]), 1e-3, "reward_rejected");

    let losses = dpo_losses(&chosen, &rejected, &reference_chosen.detach(), &reference_rejected.detach(), beta).unwrap();
    let loss = losses.sum_all().unwrap();
    assert_close(values(&loss.reshape(1).unwrap())[0], f64_at(&reference["loss"]), 1e-3, "loss");
    let grads = loss.backward().unwrap();
    let norm = global_grad_norm(&model.lora_vars(), &grads).unwrap();
    assert_close(norm, f64_at(&reference["grad_total_norm_all_lora"]), 1e-3, "total LoRA gradient norm");
}

#[test]
fn dpo_identical_pair_gives_ln2_and_no_gradient() {
    let mut pair = encode(&shared_pairs()[15]);
    pair.rejected = pair.chosen.clone();
    let model = reference_adapted_model(Source::Gguf);
    let pad = loaded(Source::Gguf).special.pad;
    let (chosen, rejected) = pair_log_probs(&model, &[&pair], pad, &mut ForwardContext::eval()).unwrap();
    let mut off = ForwardContext {
        rng: None,
        adapters_enabled: false,
    };
    let (reference_chosen, reference_rejected) = pair_log_probs(&model, &[&pair], pad, &mut off).unwrap();
    let loss = dpo_losses(&chosen, &rejected, &reference_chosen, &reference_rejected, 0.1).unwrap().sum_all().unwrap();
    let value = values(&loss.reshape(1).unwrap())[0];
    assert!((value - std::f64::consts::LN_2).abs() < 1e-6, "loss {value}, expected ln 2");
    let grads = loss.backward().unwrap();
    let norm = global_grad_norm(&model.lora_vars(), &grads).unwrap();
    assert!(norm < 1e-6, "gradient norm {norm}, expected 0");
}

#[test]
fn dpo_loss_gradient_matches_finite_differences() {
    let config = studio_train::tiny::tiny_config("llama");
    let weights = studio_train::tiny::tiny_weights(&config, 7, DType::F64).unwrap();
    let mut model = Llama::from_weights(&config, &weights, &Device::Cpu).unwrap();
    let settings = LoraSettings {
        r: 2,
        ..LoraSettings::default()
    };
    lora::attach(&mut model, &settings, &mut Rng::new(3)).unwrap();

    // Non-zero B matrices, so the policy differs from the reference.
    let vars = model.lora_vars();
    let mut rng = Rng::new(11);
    for var in vars.iter().skip(1).step_by(2) {
        let noise = rng.uniform_vec(var.elem_count(), -0.2, 0.2);
        var.set(&Tensor::from_vec(noise, var.shape(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
    }
    let pair = EncodedPair {
        prompt: vec![1, 5, 9, 2],
        chosen: vec![7, 3, 11],
        rejected: vec![4, 8],
    };

    let loss_of = |model: &Llama| -> Tensor {
        let (chosen, rejected) = pair_log_probs(model, &[&pair], 0, &mut ForwardContext::eval()).unwrap();
        let mut off = ForwardContext {
            rng: None,
            adapters_enabled: false,
        };
        let (reference_chosen, reference_rejected) = pair_log_probs(model, &[&pair], 0, &mut off).unwrap();
        dpo_losses(&chosen, &rejected, &reference_chosen.detach(), &reference_rejected.detach(), 0.5)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();

    let grads = loss_of(&model).backward().unwrap();
    let b = &vars[1];
    let analytic: Vec<f64> = grads.get(b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let original = b.as_tensor().copy().unwrap();
    let flat: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
    let epsilon = 1e-5;
    for index in [0, 3, flat.len() - 1] {
        let shifted = |delta: f64| {
            let mut values = flat.clone();
            values[index] += delta;
            b.set(&Tensor::from_vec(values, original.shape(), &Device::Cpu).unwrap()).unwrap();
            scalar(&loss_of(&model))
        };
        let numeric = (shifted(epsilon) - shifted(-epsilon)) / (2.0 * epsilon);
        b.set(&original).unwrap();
        assert!(
            (numeric - analytic[index]).abs() <= 1e-6 + 1e-4 * numeric.abs(),
            "element {index}: finite difference {numeric}, backward {}",
            analytic[index]
        );
    }
}

#[test]
fn dpo_truncation_keeps_a_completion_token_each_side() {
    let mut pair = EncodedPair {
        prompt: (0..10).collect(),
        chosen: vec![20, 21, 22],
        rejected: vec![20, 23],
    };
    assert!(pair.truncate(8));
    assert_eq!(pair.chosen, [20, 21, 22]);
    assert_eq!(pair.prompt, (5..10).collect::<Vec<u32>>());

    let mut pair = EncodedPair {
        prompt: (0..10).collect(),
        chosen: vec![20, 21, 22],
        rejected: vec![20, 23],
    };
    assert!(pair.truncate(4));
    assert_eq!(pair.chosen, [20, 21]);
    assert_eq!(pair.rejected, [20, 23]);
    assert_eq!(pair.prompt, [8, 9]);

    let mut pair = EncodedPair {
        prompt: (0..10).collect(),
        chosen: vec![20, 21, 22],
        rejected: vec![20, 23],
    };
    assert!(pair.truncate(2));
    assert_eq!(pair.chosen, [20]);
    assert_eq!(pair.rejected, [20]);
    assert_eq!(pair.prompt, [9]);

    let mut whole = EncodedPair {
        prompt: vec![1, 2],
        chosen: vec![3],
        rejected: vec![4, 5],
    };
    assert!(!whole.truncate(4));
    assert_eq!(whole.rejected, [4, 5]);
}

#[test]
fn dpo_pairs_identical_after_truncation_are_dropped() {
    let model = loaded(Source::Gguf);
    let pair = |chosen: &str, rejected: &str| PreferencePair {
        prompt: vec![studio_core::dataset::Message {
            role: studio_core::dataset::Role::User,
            content: "Name a colour.".into(),
            weight: None,
        }],
        chosen: chosen.into(),
        rejected: rejected.into(),
    };
    let shared = "blue ".repeat(40);
    let pairs = [pair(&format!("{shared}yes"), &format!("{shared}no")), pair("Red.", "Green.")];
    let prompt_len = encode(&pairs[0]).prompt.len();
    let mut recorder = Recorder::default();
    let encoded = encode_pairs(model, &pairs, prompt_len + 20, "training file", &mut recorder).unwrap();
    assert_eq!(encoded.len(), 1, "only the pair that differs within max_seq_len stays");
    assert!(
        recorder.events.iter().any(|e| e.starts_with("Dropped 1 pair whose chosen and rejected replies are identical")),
        "{:?}",
        recorder.events
    );
}

/// Returns the `count` shortest pairs of the shared file with a one-turn prompt, and the token length of
/// the longest sequence among them.
fn short_pairs(count: usize) -> (Vec<PreferencePair>, usize) {
    let mut sized: Vec<(usize, PreferencePair)> = shared_pairs()
        .into_iter()
        .filter(|pair| pair.prompt.len() == 1)
        .map(|pair| {
            let encoded = encode(&pair);
            (encoded.prompt.len() + encoded.chosen.len().max(encoded.rejected.len()), pair)
        })
        .collect();
    sized.sort_by_key(|(length, _)| *length);
    sized.truncate(count);
    let longest = sized.iter().map(|(length, _)| *length).max().unwrap_or(0);
    (sized.into_iter().map(|(_, pair)| pair).collect(), longest)
}

#[test]
fn dpo_real_run_prefers_chosen_replies() {
    let (pairs, longest) = short_pairs(16);
    assert_eq!(pairs.len(), 16);
    // Every pair fits whole, so nothing is truncated or dropped.
    let max_seq_len = longest;
    eprintln!("DPO run on 16 pairs of at most {longest} tokens");
    let out = tempfile::tempdir().unwrap();
    let job = DpoJob {
        model_path: &model_path(),
        base_model_name: "smollm2-135m-instruct",
        pairs: &pairs,
        validation: None,
        approach: Approach::Lora(LoraSettings::default()),
        settings: TrainSettings {
            n_epochs: 1,
            batch_size: 2,
            learning_rate: 2e-3,
            max_seq_len,
            warmup_ratio: 0.0,
            ..TrainSettings::default()
        },
        beta: 0.1,
        output_dir: out.path(),
        checkpoint_dir: None,
        resume_from: None,
        export_merged: false,
    };
    let mut recorder = Recorder::default();
    let outcome = run_dpo(&job, &mut recorder).unwrap();
    let RunOutcome::Succeeded(summary) = outcome else {
        panic!("the run stopped: {outcome:?}");
    };
    assert_eq!(summary.steps, 8);
    assert_eq!(recorder.steps.len(), 8);
    let (first, first_rewards) = &recorder.steps[0];
    assert!((first.train_loss - std::f64::consts::LN_2).abs() < 1e-4, "a fresh adapter starts at ln 2, got {}", first.train_loss);
    assert_eq!(first_rewards.reward_margin, 0.0);
    assert!(!recorder.events.iter().any(|e| e.starts_with("Truncated") || e.starts_with("Dropped")), "{:?}", recorder.events);

    let adapter = summary.artifacts.iter().find(|(kind, _)| *kind == ArtifactKind::Adapter).unwrap().1.clone();
    let after = measure(&adapter, &pairs, max_seq_len);
    eprintln!("after training: {after:?}");
    assert!(after.reward_accuracy >= 0.75, "reward accuracy after training {after:?}");
    assert!(after.reward_margin > 0.0, "reward margin after training {after:?}");
}

/// Measures the rewards of `pairs` for the base model with the adapter in `dir`.
fn measure(dir: &Path, pairs: &[PreferencePair], max_seq_len: usize) -> PreferenceMetrics {
    let loaded = load_model(&model_path(), &Device::Cpu).unwrap();
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
    lora::apply_adapter(&mut model, dir).unwrap();
    let encoded = encode_pairs(&loaded, pairs, max_seq_len, "training file", &mut Recorder::default()).unwrap();
    evaluate_preferences(&model, &encoded, 0.1, 4, loaded.special.pad).unwrap()
}

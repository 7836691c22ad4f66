//! Golden tests against values computed independently with PyTorch, `transformers` and `peft`
//! from the same GGUF file (the reference folder's README describes each value).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use serde_json::Value;
use studio_core::dataset::{Conversation, Message, Role};
use studio_train::batch::{batch_loss, Batch};
use studio_train::chat::{ChatEncoder, ChatTemplate, EncodedExample};
use studio_train::export::{save_model_folder, FolderMetadata};
use studio_train::loader::{load_model, read_config, LoadedModel};
use studio_train::lora;
use studio_train::model::{ForwardContext, Llama};
use studio_train::optim::{global_grad_norm, AdamW, AdamWConfig};
use studio_train::rng::Rng;
use studio_train::LoraSettings;

#[path = "golden/distill.rs"]
mod distill;
#[path = "golden/dpo.rs"]
mod dpo;
#[path = "golden/generate.rs"]
mod generate;

struct Fixture {
    gguf: LoadedModel,
    golden: Value,
    text: Value,
}

/// Where a test's model comes from: the GGUF file, or a Hugging Face folder holding the same
/// weights in shards beside the `config.json` and tokenizer files that `transformers` wrote.
#[derive(Clone, Copy, Debug)]
enum Source {
    Gguf,
    HuggingFace,
}

const SOURCES: [Source; 2] = [Source::Gguf, Source::HuggingFace];

fn loaded(source: Source) -> &'static LoadedModel {
    match source {
        Source::Gguf => &fixture().gguf,
        Source::HuggingFace => hugging_face_model(),
    }
}

fn hugging_face_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2-hugging-face");
        let gguf = &fixture().gguf;
        let model = Llama::from_weights(&gguf.config, &gguf.weights, &Device::Cpu).unwrap();
        write_hugging_face_folder(&model, false, &dir);
        load_model(&dir, &Device::Cpu).expect("the Hugging Face folder loads")
    })
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference_dir() -> PathBuf {
    repo_root().join("../shared/reference")
}

/// Locates the demo model in `STUDIO_TEST_MODELS_DIR` or the repository's `models/` folder.
fn model_path() -> PathBuf {
    let dir = std::env::var_os("STUDIO_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    let path = dir.join("smollm2-135m-instruct.gguf");
    assert!(
        path.is_file(),
        "{} is missing; run `cargo run -p smart-studio -- fetch-model` first",
        path.display()
    );
    path
}

fn read_json(name: &str) -> Value {
    let path = reference_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        gguf: load_model(&model_path(), &Device::Cpu).expect("the demo model loads"),
        golden: read_json("smollm2_golden.json"),
        text: read_json("smollm2_text_loss.json"),
    })
}

fn f64_at(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

fn ids_of(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn assert_close(actual: f64, expected: f64, relative: f64, what: &str) {
    let tolerance = relative * expected.abs().max(1e-12);
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: got {actual}, expected {expected} (tolerance {tolerance:e})"
    );
}

fn conversation(value: &Value) -> Conversation {
    let messages = value
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            },
            content: m["content"].as_str().unwrap().to_string(),
            weight: None,
        })
        .collect();
    Conversation { messages }
}

fn template(source: Source) -> ChatTemplate {
    ChatTemplate::new(loaded(source).chat_template.as_deref().expect("the model has a chat template")).unwrap()
}

fn encode(source: Source, conversation: &Conversation) -> EncodedExample {
    let loaded = loaded(source);
    let template = template(source);
    let encoder = ChatEncoder {
        template: &template,
        tokenizer: &loaded.tokenizer,
        end_of_turn: "<|im_end|>",
    };
    encoder.encode(conversation).unwrap()
}

fn chat_example(source: Source, index: usize) -> EncodedExample {
    encode(source, &conversation(&fixture().golden["chat_sft"][index]["messages"]))
}

fn base_model(source: Source) -> Llama {
    let loaded = loaded(source);
    Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap()
}

fn reference_lora_settings() -> LoraSettings {
    LoraSettings::default()
}

/// Builds the base model with `reference_adapter/` loaded.
fn reference_adapted_model(source: Source) -> Llama {
    let mut model = base_model(source);
    lora::attach(&mut model, &reference_lora_settings(), &mut Rng::new(0)).unwrap();
    lora::load_adapter_weights(&mut model, &reference_dir().join("reference_adapter")).unwrap();
    model
}

/// Computes the mean loss over the batch's target tokens, still attached to the graph.
fn mean_loss(model: &Llama, examples: &[&EncodedExample]) -> Tensor {
    let batch = Batch::new(examples, fixture().gguf.special.pad, &Device::Cpu).unwrap();
    let loss = batch_loss(model, &batch, &mut ForwardContext::eval()).unwrap();
    (loss.sum_nll / batch.n_targets as f64).unwrap()
}

fn scalar(tensor: &Tensor) -> f64 {
    f64::from(tensor.to_scalar::<f32>().unwrap())
}

#[test]
fn tokenizer_matches_reference_ids() {
    let golden = &fixture().golden;
    let text = std::fs::read_to_string(reference_dir().join("apache2_two_paragraphs.txt")).unwrap();
    for source in SOURCES {
        let tokenizer = &loaded(source).tokenizer;
        for case in golden["tokenizer_cases"].as_array().unwrap() {
            let case_text = case["text"].as_str().unwrap();
            let encoding = tokenizer.encode(case_text, false).unwrap();
            assert_eq!(encoding.get_ids(), ids_of(&case["ids"]).as_slice(), "{source:?}: token ids of {case_text:?}");
        }
        let encoding = tokenizer.encode(text.as_str(), false).unwrap();
        assert_eq!(encoding.get_ids(), ids_of(&fixture().text["all_ids"]).as_slice(), "{source:?}: reference text");
    }
}

#[test]
fn read_config_matches_loaded_config() {
    // Loading the folder model writes the folder first.
    let folder_model = hugging_face_model();
    let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2-hugging-face");
    let folder_config = read_config(&folder).expect("config.json reads");
    let gguf_config = read_config(&model_path()).expect("the GGUF metadata reads");

    assert_eq!(gguf_config, fixture().gguf.config, "GGUF metadata alone");
    assert_eq!(folder_config, folder_model.config, "config.json alone");
}

#[test]
fn hugging_face_folder_config_matches_gguf() {
    let folder = hugging_face_model();
    assert_eq!(folder.config, fixture().gguf.config, "config.json read as the GGUF metadata");
    assert_eq!(folder.special, fixture().gguf.special, "special tokens from tokenizer_config.json");
}

#[test]
fn gguf_weights_match_reference() {
    let loaded = &fixture().gguf;
    let reference = fixture().golden["weights_reference"].as_object().unwrap();
    for (name, expected) in reference {
        let weight = loaded.weights.get(name).unwrap_or_else(|| panic!("weight {name} is missing"));
        let shape: Vec<usize> = expected["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(weight.dims(), shape.as_slice(), "shape of {name}");

        let sum = f64::from(weight.sum_all().unwrap().to_scalar::<f32>().unwrap());
        let abs_sum = f64::from(weight.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
        assert_close(sum, f64_at(&expected["sum"]), 1e-3, &format!("sum of {name}"));
        assert_close(abs_sum, f64_at(&expected["abs_sum"]), 1e-4, &format!("absolute sum of {name}"));

        let rows = weight.flatten_to(0).unwrap();
        let first_row: Vec<f32> = if shape.len() == 1 {
            weight.to_vec1().unwrap()
        } else {
            weight.get(0).unwrap().to_vec1().unwrap()
        };
        for (i, expected) in expected["first5_row0"].as_array().unwrap().iter().enumerate() {
            assert_close(f64::from(first_row[i]), f64_at(expected), 1e-5, &format!("{name}[0][{i}]"));
        }
        if shape.len() == 2 {
            let second_row: Vec<f32> = rows.get(1).unwrap().to_vec1().unwrap();
            for (i, expected) in expected["first5_row1"].as_array().unwrap().iter().enumerate() {
                assert_close(f64::from(second_row[i]), f64_at(expected), 1e-5, &format!("{name}[1][{i}]"));
            }
        }
    }
}

#[test]
fn base_text_loss_and_logits_match_reference() {
    let reference = &fixture().text["float32_eager"];
    let ids = ids_of(&fixture().text["all_ids"]);
    let example = EncodedExample {
        targets: vec![true; ids.len()],
        ids: ids.clone(),
    };
    for source in SOURCES {
        let model = base_model(source);
        let loss = scalar(&mean_loss(&model, &[&example]));
        assert!((loss - f64_at(&reference["mean_loss_ce_fp32"])).abs() < 1e-3, "{source:?}: text loss {loss}");

        let logits = last_logits(&model, &example);
        for case in reference["top5"].as_array().unwrap() {
            let position = case["pos"].as_u64().unwrap() as usize;
            let row: Vec<f32> = logits.get(position).unwrap().to_vec1().unwrap();
            let expected_ids = ids_of(&case["top5_ids"]);
            for (rank, expected) in case["top5_logits"].as_array().unwrap().iter().enumerate() {
                let id = expected_ids[rank] as usize;
                let actual = f64::from(row[id]);
                assert!((actual - f64_at(expected)).abs() < 2e-3, "{source:?}: logit of token {id} at position {position}: {actual} vs {expected}");
            }
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            assert_eq!(order[0], expected_ids[0] as usize, "{source:?}: top token at position {position}");
        }
    }
}

#[test]
fn chat_template_and_mask_match_reference() {
    for source in SOURCES {
        let rendered_template = template(source);
        for (index, case) in fixture().golden["chat_sft"].as_array().unwrap().iter().enumerate() {
            let conversation = conversation(&case["messages"]);
            let rendered = rendered_template.render(&conversation.messages, false).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{source:?}: rendering of conversation {index}");

            let example = encode(source, &conversation);
            assert_eq!(example.ids, ids_of(&case["input_ids"]), "{source:?}: token ids of conversation {index}");
            let mask: Vec<bool> = case["target_mask"].as_array().unwrap().iter().map(|v| v.as_u64() == Some(1)).collect();
            assert_eq!(example.targets, mask, "{source:?}: target mask of conversation {index}");
            assert_eq!(example.n_targets() as u64, case["n_targets"].as_u64().unwrap());
        }
    }
}

#[test]
fn masked_chat_loss_matches_reference() {
    for source in SOURCES {
        let model = base_model(source);
        for (index, case) in fixture().golden["chat_sft"].as_array().unwrap().iter().enumerate() {
            let loss = scalar(&mean_loss(&model, &[&chat_example(source, index)]));
            let expected = f64_at(&case["masked_mean_loss"]);
            assert!((loss - expected).abs() < 1e-3, "{source:?}: conversation {index}: loss {loss}, expected {expected}");
        }
    }
}

#[test]
fn lora_loss_and_gradients_match_reference() {
    let reference = &fixture().golden["lora_reference"];
    for source in SOURCES {
        let model = reference_adapted_model(source);
        let loss = mean_loss(&model, &[&chat_example(source, 0)]);
        assert!((scalar(&loss) - f64_at(&reference["masked_mean_loss"])).abs() < 1e-3, "{source:?}: loss");

        let grads = loss.backward().unwrap();
        let total = global_grad_norm(&model.lora_vars(), &grads).unwrap();
        assert_close(total, f64_at(&reference["grad_total_norm_all_lora"]), 1e-3, &format!("{source:?}: total LoRA gradient norm"));

        let tensors = lora::adapter_tensors(&model);
        for (key, expected) in reference["grads"].as_object().unwrap() {
            let grad = grads.get(&tensors[key]).unwrap_or_else(|| panic!("no gradient for {key}"));
            let norm = f64::from(grad.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap());
            assert_close(norm, f64_at(&expected["frobenius_norm"]), 1e-3, &format!("{source:?}: gradient norm of {key}"));
            let first: Vec<f32> = grad.flatten_all().unwrap().narrow(0, 0, 5).unwrap().to_vec1().unwrap();
            for (i, value) in expected["first5"].as_array().unwrap().iter().enumerate() {
                let expected = f64_at(value);
                assert!((f64::from(first[i]) - expected).abs() <= 2e-3 * expected.abs() + 1e-8, "{source:?}: {key}[{i}]: {} vs {expected}", first[i]);
            }
        }
    }
}

#[test]
fn lora_adamw_steps_match_reference() {
    let reference = &fixture().golden["lora_training_reference"];
    for source in SOURCES {
        let model = reference_adapted_model(source);
        let mut optimizer = AdamW::new(model.lora_vars(), AdamWConfig::default()).unwrap();
        for step in 0..3 {
            let loss = mean_loss(&model, &[&chat_example(source, step)]);
            let grads = loss.backward().unwrap();
            let grad_norm = global_grad_norm(optimizer.params(), &grads).unwrap();
            assert_close(scalar(&loss), f64_at(&reference["loss_before_each_step"][step]), 1e-3, &format!("{source:?}: loss before step {step}"));
            assert_close(grad_norm, f64_at(&reference["grad_norm_each_step"][step]), 1e-3, &format!("{source:?}: gradient norm at step {step}"));
            optimizer.step(&grads, 1e-3).unwrap();
        }
        let after = scalar(&mean_loss(&model, &[&chat_example(source, 0)]));
        assert_close(after, f64_at(&reference["loss_chat_sft0_after_3_steps"]), 1e-3, &format!("{source:?}: loss after three steps"));
    }
}

#[test]
fn padded_batch_matches_reference() {
    let reference = &fixture().golden["batch_reference"];
    for source in SOURCES {
        let model = reference_adapted_model(source);
        let (first, second) = (chat_example(source, 0), chat_example(source, 1));
        let batch = Batch::new(&[&first, &second], 2, &Device::Cpu).unwrap();
        assert_eq!(batch.n_targets as u64, reference["n_targets"].as_u64().unwrap());

        let loss = mean_loss(&model, &[&first, &second]);
        assert_close(scalar(&loss), f64_at(&reference["loss"]), 1e-3, &format!("{source:?}: batch loss"));
        let grads = loss.backward().unwrap();
        let norm = global_grad_norm(&model.lora_vars(), &grads).unwrap();
        assert_close(norm, f64_at(&reference["grad_total_norm_all_lora"]), 1e-3, &format!("{source:?}: batch gradient norm"));
    }
}

#[test]
fn fresh_lora_matches_base_then_trains() {
    let example = chat_example(Source::Gguf, 0);
    let base_loss = scalar(&mean_loss(&base_model(Source::Gguf), &[&example]));

    let mut model = base_model(Source::Gguf);
    let settings = reference_lora_settings();
    lora::attach(&mut model, &settings, &mut Rng::new(1)).unwrap();
    let loss = mean_loss(&model, &[&example]);
    assert!((scalar(&loss) - base_loss).abs() < 1e-6, "fresh adapter changed the loss");

    let vars = model.lora_vars();
    assert_eq!(vars.len(), 30 * 4 * 2, "one A and one B per targeted module");
    let before: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let mut optimizer = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    // lora_B starts at zero, so lora_A's first gradient is zero by construction: B moves on the
    // first step and A on the second.
    for _ in 0..2 {
        let grads = mean_loss(&model, &[&example]).backward().unwrap();
        optimizer.step(&grads, 1e-3).unwrap();
    }
    for (index, (var, before)) in vars.iter().zip(&before).enumerate() {
        let change = (var.as_tensor() - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(change > 0.0, "LoRA matrix {index} did not change after two steps");
    }
}

#[test]
fn reference_adapter_gives_every_matrix_a_gradient() {
    let model = reference_adapted_model(Source::Gguf);
    let grads = mean_loss(&model, &[&chat_example(Source::Gguf, 1)]).backward().unwrap();
    for (key, tensor) in lora::adapter_tensors(&model) {
        let grad = grads.get(&tensor).unwrap_or_else(|| panic!("{key} received no gradient"));
        let norm = grad.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{key} received a zero gradient");
    }
}

/// Writes `model` as a Hugging Face folder in 200 MB shards, then puts the tokenizer files and
/// `config.json` that `transformers` wrote for this model beside the weights.
fn write_hugging_face_folder(model: &Llama, merge_lora: bool, dir: &Path) {
    let gguf = &fixture().gguf;
    let metadata = FolderMetadata {
        tokenizer: &gguf.tokenizer,
        chat_template: gguf.chat_template.as_deref(),
        special: gguf.special,
    };
    save_model_folder(model, &metadata, merge_lora, 200_000_000, dir).unwrap();
    assert!(dir.join("model.safetensors.index.json").is_file(), "a 540 MB model in 200 MB shards needs an index");
    for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"] {
        std::fs::copy(reference_dir().join("smollm2-tokenizer").join(file), dir.join(file)).unwrap();
    }
}

fn last_logits(model: &Llama, example: &EncodedExample) -> Tensor {
    let input = Tensor::new(example.ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let hidden = model.hidden_states(&input, &[example.ids.len()], &mut ForwardContext::eval()).unwrap();
    model.logits(&hidden).unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Exports `model`, reloads the folder and returns the reloaded model's logits on `example`.
fn logits_after_export(model: &Llama, merge_lora: bool, example: &EncodedExample) -> Tensor {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    write_hugging_face_folder(model, merge_lora, &dir);
    let loaded = load_model(&dir, &Device::Cpu).unwrap();
    let reloaded = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
    last_logits(&reloaded, example)
}

#[test]
fn merged_export_reloads_with_same_logits() {
    let example = chat_example(Source::Gguf, 2);
    let adapted = reference_adapted_model(Source::Gguf);
    let expected = last_logits(&adapted, &example);

    let merged = logits_after_export(&adapted, true, &example);
    let difference = max_difference(&merged, &expected);
    assert!(difference < 1e-3, "merged logits differ by {difference}");
    let base_difference = max_difference(&last_logits(&base_model(Source::Gguf), &example), &expected);
    assert!(base_difference > 1e-2, "the reference adapter should change the logits, changed by {base_difference}");
}

#[test]
fn full_adamw_steps_match_reference() {
    let reference = &fixture().golden["full_training_reference"];
    for source in SOURCES {
        let mut model = base_model(source);
        let vars: Vec<_> = model.make_all_trainable().unwrap().into_iter().map(|(_, var)| var).collect();
        assert_eq!(vars.iter().map(|v| v.elem_count()).sum::<usize>(), 134_515_008, "tied parameters counted once");

        let mut optimizer = AdamW::new(vars, AdamWConfig::default()).unwrap();
        for step in 0..2 {
            let loss = mean_loss(&model, &[&chat_example(source, step)]);
            let grads = loss.backward().unwrap();
            let grad_norm = global_grad_norm(optimizer.params(), &grads).unwrap();
            assert_close(scalar(&loss), f64_at(&reference["loss_before_each_step"][step]), 1e-3, &format!("{source:?}: loss before step {step}"));
            assert_close(grad_norm, f64_at(&reference["grad_norm_each_step"][step]), 1e-3, &format!("{source:?}: gradient norm at step {step}"));
            optimizer.step(&grads, 1e-5).unwrap();
        }
        let after = scalar(&mean_loss(&model, &[&chat_example(source, 0)]));
        assert_close(after, f64_at(&reference["loss_chat_sft0_after_2_steps"]), 1e-3, &format!("{source:?}: loss after two steps"));

        if let Source::Gguf = source {
            let example = chat_example(source, 2);
            let expected = last_logits(&model, &example);
            let difference = max_difference(&logits_after_export(&model, false, &example), &expected);
            assert!(difference < 1e-4, "fully fine-tuned logits differ by {difference} after export");
        }
    }
}

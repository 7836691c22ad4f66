//! Direct preference optimisation: the sigmoid DPO loss on summed completion log-probabilities,
//! for LoRA and full-parameter training.
//!
//! The reference model is the base model. With LoRA it is the same model run with its adapters
//! off on the same micro-batch, so no second copy is held and a fresh adapter's rewards are
//! exactly 0. With full fine-tuning the reference log-probabilities are computed in one pass
//! before the first update.


use candle_core::{DType, Device, Tensor, Var, D};
use studio_core::dataset::PreferencePair;
use tokenizers::Tokenizer;

use crate::batch::Batch;
use crate::chat::{ChatTemplate, EncodedExample};
use crate::export::FolderMetadata;
use crate::loader::{load_model, LoadedModel};
use crate::lora;
use crate::model::{ForwardContext, Llama};
use crate::ops::cross_entropy_per_row;
use crate::rng::Rng;
use crate::run::{
    invalid, plural, trainable_vars, validate_settings, write_artifacts, Approach, EventLevel, RunOutcome, SftJob,
    TrainObserver, TrainSettings, TrainSummary,
};
use crate::steps::{LoopEnd, StepGradients, StepLoop, StepMethod};
use crate::TrainError;

/// One DPO run.
pub struct DpoJob<'a> {
    /// A GGUF file or a Hugging Face model folder.
    pub model_path: &'a std::path::Path,
    /// Written to `base_model_name_or_path` in the adapter config.
    pub base_model_name: &'a str,
    pub pairs: &'a [PreferencePair],
    /// Pairs scored at each evaluation for `valid_loss`, never trained on. Without them a run
    /// reports training figures only.
    pub validation: Option<&'a [PreferencePair]>,
    pub approach: Approach,
    /// `batch_size` counts pairs; `max_seq_len` bounds each prompt plus one completion.
    pub settings: TrainSettings,
    /// Scales the log-probability ratios in the loss.
    pub beta: f64,
    /// Receives `adapter/`, `merged/` or `model/`.
    pub output_dir: &'a std::path::Path,
    /// Receives `step-{n}/` checkpoint folders; `None` writes no checkpoints.
    pub checkpoint_dir: Option<&'a std::path::Path>,
    /// A checkpoint folder of an earlier run of the same job to continue from.
    pub resume_from: Option<&'a std::path::Path>,
    /// For LoRA, also writes the base model with the adapter merged in.
    pub export_merged: bool,
}

impl DpoJob<'_> {
    /// Returns the supervised job with the same outputs, for the checkpoint and export writers.
    fn as_sft(&self) -> SftJob<'_> {
        SftJob {
            model_path: self.model_path,
            base_model_name: self.base_model_name,
            examples: &[],
            validation: None,
            approach: self.approach.clone(),
            settings: self.settings.clone(),
            output_dir: self.output_dir,
            checkpoint_dir: self.checkpoint_dir,
            resume_from: self.resume_from,
            export_merged: self.export_merged,
        }
    }
}

/// Preference figures of one step or one evaluation, as means over its pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PreferenceMetrics {
    /// `beta · (log π(chosen) − log π_ref(chosen))`.
    pub reward_chosen: f64,
    /// `beta · (log π(rejected) − log π_ref(rejected))`.
    pub reward_rejected: f64,
    /// Share of pairs whose chosen reward is strictly above the rejected one.
    pub reward_accuracy: f64,
    /// Mean of `reward_chosen − reward_rejected`.
    pub reward_margin: f64,
}

/// A tokenized pair: the prompt once, and each completion that continues it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPair {
    /// The prompt rendered with the generation prompt.
    pub prompt: Vec<u32>,
    /// The chosen reply followed by the end-of-turn token.
    pub chosen: Vec<u32>,
    /// The rejected reply followed by the end-of-turn token.
    pub rejected: Vec<u32>,
}

impl EncodedPair {
    /// Fits the prompt plus each completion into `max_len` tokens (at least 2) and returns
    /// whether anything was cut. The prompt keeps up to half of `max_len`, and more when the
    /// completions are short. Completions are cut at the end and keep at least one token. The
    /// prompt keeps its last tokens, so the reply still follows the generation prompt.
    pub fn truncate(&mut self, max_len: usize) -> bool {
        let longest = self.chosen.len().max(self.rejected.len());
        if self.prompt.len() + longest <= max_len {
            return false;
        }
        let prompt_reserve = self.prompt.len().min(max_len / 2);
        let completion_budget = (max_len - prompt_reserve).max(1);
        self.chosen.truncate(completion_budget);
        self.rejected.truncate(completion_budget);
        let prompt_budget = max_len - self.chosen.len().max(self.rejected.len());
        if self.prompt.len() > prompt_budget {
            self.prompt.drain(..self.prompt.len() - prompt_budget);
        }
        true
    }

    /// Returns the prompt plus the chosen (or rejected) completion, with the completion marked
    /// as the target.
    pub fn example(&self, chosen: bool) -> EncodedExample {
        let completion = if chosen { &self.chosen } else { &self.rejected };
        let mut ids = self.prompt.clone();
        ids.extend_from_slice(completion);
        let mut targets = vec![false; self.prompt.len()];
        targets.extend(std::iter::repeat_n(true, completion.len()));
        EncodedExample { ids, targets }
    }
}

/// Turns preference pairs into token ids through the model's chat template.
pub struct PairEncoder<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    /// The end-of-turn token's text, `<|im_end|>` for SmolLM2.
    pub end_of_turn: &'a str,
    /// Dropped from the start of a completion, so a sequence never contains a second BOS.
    pub bos: Option<u32>,
}

impl PairEncoder<'_> {
    /// Renders the prompt once with the generation prompt and tokenizes it, then tokenizes each
    /// reply plus the end-of-turn token on its own, without added special tokens.
    pub fn encode(&self, pair: &PreferencePair) -> Result<EncodedPair, TrainError> {
        let prompt_text = self.template.render(&pair.prompt, true)?;
        let prompt = self.tokenize(&prompt_text)?;
        let chosen = self.completion(&pair.chosen)?;
        let rejected = self.completion(&pair.rejected)?;
        Ok(EncodedPair { prompt, chosen, rejected })
    }

    fn completion(&self, reply: &str) -> Result<Vec<u32>, TrainError> {
        let mut ids = self.tokenize(&format!("{reply}{}", self.end_of_turn))?;
        if let (Some(bos), Some(&first)) = (self.bos, ids.first()) {
            if first == bos {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|err| TrainError::InvalidData {
            message: format!("tokenization failed: {err}"),
            param: None,
        })?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The request path of a DPO job's hyperparameters, which errors name as the field to fix.
const DPO_HYPERPARAMETERS: &str = "method.dpo.hyperparameters";

/// Encodes every pair and truncates it to `max_seq_len`. Pairs whose completions are equal
/// after truncation are dropped. An event names `source` and counts them and the truncated
/// pairs.
pub fn encode_pairs(
    loaded: &LoadedModel,
    pairs: &[PreferencePair],
    max_seq_len: usize,
    source: &str,
    observer: &mut dyn TrainObserver,
) -> Result<Vec<EncodedPair>, TrainError> {
    let template_source = loaded.chat_template.as_deref().ok_or_else(|| TrainError::InvalidData {
        message: "the base model has no chat template, so preference prompts cannot be rendered".into(),
        param: Some("model".into()),
    })?;
    let template = ChatTemplate::new(template_source)?;
    let end_of_turn = loaded.tokenizer.id_to_token(loaded.special.eos).unwrap_or_default();
    let encoder = PairEncoder {
        template: &template,
        tokenizer: &loaded.tokenizer,
        end_of_turn: &end_of_turn,
        bos: loaded.special.bos,
    };
    let mut encoded = Vec::with_capacity(pairs.len());
    let (mut truncated, mut identical) = (0usize, Vec::new());
    for (index, pair) in pairs.iter().enumerate() {
        let mut pair = encoder.encode(pair)?;
        if pair.truncate(max_seq_len) {
            truncated += 1;
        }
        if pair.chosen == pair.rejected {
            identical.push(index + 1);
        } else {
            encoded.push(pair);
        }
    }
    if truncated > 0 {
        observer.on_event(
            EventLevel::Warn,
            &format!("Truncated {} of the {source} to max_seq_len {max_seq_len}", plural(truncated as u64, "pair")),
        );
    }
    if !identical.is_empty() {
        let lines: Vec<String> = identical.iter().take(10).map(usize::to_string).collect();
        observer.on_event(
            EventLevel::Warn,
            &format!(
                "Dropped {} whose chosen and rejected replies are identical within max_seq_len {max_seq_len} ({source} lines {}{})",
                plural(identical.len() as u64, "pair"),
                lines.join(", "),
                if identical.len() > 10 { " and more" } else { "" }
            ),
        );
    }
    if encoded.is_empty() {
        return Err(invalid(
            &format!("no preference pair of the {source} differs within max_seq_len {max_seq_len}; raise max_seq_len or shorten the prompts"),
            &format!("{DPO_HYPERPARAMETERS}.max_seq_len"),
        ));
    }
    Ok(encoded)
}

/// Returns the summed completion log-probabilities of `pairs`: `[n]` for the chosen and `[n]`
/// for the rejected completions, from one forward pass over the `2n` sequences.
pub fn pair_log_probs(
    model: &Llama,
    pairs: &[&EncodedPair],
    pad: u32,
    ctx: &mut ForwardContext<'_>,
) -> Result<(Tensor, Tensor), TrainError> {
    let scored = score_pairs(model, pairs, pad, ctx)?;
    Ok((scored.chosen, scored.rejected))
}

/// Log-probabilities of a micro-batch of pairs, with the argmax accuracy on the chosen
/// completions.
struct ScoredPairs {
    chosen: Tensor,
    rejected: Tensor,
    chosen_correct: usize,
    chosen_targets: usize,
}

fn score_pairs(model: &Llama, pairs: &[&EncodedPair], pad: u32, ctx: &mut ForwardContext<'_>) -> Result<ScoredPairs, TrainError> {
    let examples: Vec<EncodedExample> = [true, false]
        .iter()
        .flat_map(|&chosen| pairs.iter().map(move |pair| pair.example(chosen)))
        .collect();
    let rows: Vec<&EncodedExample> = examples.iter().collect();
    let batch = Batch::new(&rows, pad, model.device())?;
    let hidden = model.hidden_states(&batch.input_ids, &batch.lengths, ctx)?;
    let hidden = hidden.index_select(&batch.target_positions, 0)?;
    let logits = model.logits(&hidden)?;
    let nll = cross_entropy_per_row(&logits, &batch.target_ids)?;
    // Batch lists each row's targets contiguously, in row order.
    let mut sums = Vec::with_capacity(rows.len());
    let mut offset = 0;
    for row in &rows {
        let count = row.n_targets();
        sums.push(nll.narrow(0, offset, count)?.sum_all()?.neg()?);
        offset += count;
    }
    let sums = Tensor::stack(&sums, 0)?;
    let n = pairs.len();

    let chosen_targets: usize = rows[..n].iter().map(|row| row.n_targets()).sum();
    let predicted = logits.narrow(0, 0, chosen_targets)?.argmax(D::Minus1)?;
    let chosen_correct = predicted
        .eq(&batch.target_ids.narrow(0, 0, chosen_targets)?)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok(ScoredPairs {
        chosen: sums.narrow(0, 0, n)?,
        rejected: sums.narrow(0, n, n)?,
        chosen_correct,
        chosen_targets,
    })
}

/// Computes the per-pair sigmoid DPO loss, `−log σ(β · ((π_c − ref_c) − (π_r − ref_r)))`, computed as a
/// softplus so it stays finite for large margins. All inputs are `[n]`.
pub fn dpo_losses(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference_chosen: &Tensor,
    reference_rejected: &Tensor,
    beta: f64,
) -> candle_core::Result<Tensor> {
    let chosen = (policy_chosen - reference_chosen)?;
    let rejected = (policy_rejected - reference_rejected)?;
    let z = ((chosen - rejected)? * beta)?;
    // softplus(−z) = max(−z, 0) + log(1 + exp(−|z|))
    let tail = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    z.neg()?.relu()? + tail
}

/// Returns the rewards of each pair from its four log-probabilities.
fn rewards(policy: (&[f64], &[f64]), reference: (&[f64], &[f64]), beta: f64) -> Vec<(f64, f64)> {
    (0..policy.0.len())
        .map(|i| (beta * (policy.0[i] - reference.0[i]), beta * (policy.1[i] - reference.1[i])))
        .collect()
}

fn summarize(rewards: &[(f64, f64)]) -> PreferenceMetrics {
    let n = rewards.len().max(1) as f64;
    PreferenceMetrics {
        reward_chosen: rewards.iter().map(|r| r.0).sum::<f64>() / n,
        reward_rejected: rewards.iter().map(|r| r.1).sum::<f64>() / n,
        reward_accuracy: rewards.iter().filter(|r| r.0 > r.1).count() as f64 / n,
        reward_margin: rewards.iter().map(|r| r.0 - r.1).sum::<f64>() / n,
    }
}

fn to_f64s(tensor: &Tensor) -> Result<Vec<f64>, TrainError> {
    Ok(tensor.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Computes the (chosen, rejected) log-probabilities of every pair without dropout (and with
/// any adapters off), `batch_size` pairs per pass.
pub(crate) fn reference_log_probs(model: &Llama, pairs: &[EncodedPair], batch_size: usize, pad: u32) -> Result<Vec<(f64, f64)>, TrainError> {
    let mut values = Vec::with_capacity(pairs.len());
    let rows: Vec<&EncodedPair> = pairs.iter().collect();
    for chunk in rows.chunks(batch_size.max(1)) {
        let mut ctx = ForwardContext {
            rng: None,
            adapters_enabled: false,
        };
        let (chosen, rejected) = pair_log_probs(model, chunk, pad, &mut ctx)?;
        values.extend(to_f64s(&chosen)?.into_iter().zip(to_f64s(&rejected)?));
    }
    Ok(values)
}

/// Measures the rewards of `pairs` without dropout, with the model's adapters off as the
/// reference. For a model without adapters every reward is 0.
pub fn evaluate_preferences(model: &Llama, pairs: &[EncodedPair], beta: f64, batch_size: usize, pad: u32) -> Result<PreferenceMetrics, TrainError> {
    Ok(evaluate_pairs(model, pairs, None, beta, batch_size, pad)?.preference)
}

/// DPO figures of a set of pairs scored without dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairEvaluation {
    /// Mean sigmoid DPO loss over the pairs.
    pub loss: f64,
    /// Argmax accuracy over the chosen completions' tokens, as `train_mean_token_accuracy`
    /// counts it.
    pub token_accuracy: f64,
    pub preference: PreferenceMetrics,
}

/// Scores `pairs` without dropout. The reference is `reference` (one value per pair, in
/// order) when given, and otherwise the same model with its adapters off.
pub fn evaluate_pairs(
    model: &Llama,
    pairs: &[EncodedPair],
    reference: Option<&[(f64, f64)]>,
    beta: f64,
    batch_size: usize,
    pad: u32,
) -> Result<PairEvaluation, TrainError> {
    let mut all = Vec::with_capacity(pairs.len());
    let (mut chosen_correct, mut chosen_targets) = (0usize, 0usize);
    let rows: Vec<&EncodedPair> = pairs.iter().collect();
    let batch_size = batch_size.max(1);
    for (index, chunk) in rows.chunks(batch_size).enumerate() {
        let scored = score_pairs(model, chunk, pad, &mut ForwardContext::eval())?;
        chosen_correct += scored.chosen_correct;
        chosen_targets += scored.chosen_targets;
        let policy = (to_f64s(&scored.chosen)?, to_f64s(&scored.rejected)?);
        let reference: (Vec<f64>, Vec<f64>) = match reference {
            Some(values) => values[index * batch_size..index * batch_size + chunk.len()].iter().copied().unzip(),
            None => {
                let mut off = ForwardContext {
                    rng: None,
                    adapters_enabled: false,
                };
                let (chosen, rejected) = pair_log_probs(model, chunk, pad, &mut off)?;
                (to_f64s(&chosen)?, to_f64s(&rejected)?)
            }
        };
        all.extend(rewards((&policy.0, &policy.1), (&reference.0, &reference.1), beta));
    }
    // The reward margin is the DPO logit, so each pair's loss is softplus(−margin).
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let loss = all.iter().map(|(chosen, rejected)| softplus(rejected - chosen)).sum::<f64>() / all.len().max(1) as f64;
    Ok(PairEvaluation {
        loss,
        token_accuracy: chosen_correct as f64 / chosen_targets.max(1) as f64,
        preference: summarize(&all),
    })
}

struct StepTotals {
    loss: f64,
    rewards: Vec<(f64, f64)>,
    chosen_correct: usize,
    chosen_targets: usize,
    n_tokens: usize,
    grads: Vec<Tensor>,
}

/// The DPO step: the sigmoid loss of each pair against the reference log-probabilities.
pub(crate) struct DpoSteps<'a> {
    pub(crate) model: &'a Llama,
    pub(crate) vars: &'a [(String, Var)],
    pub(crate) train: &'a [EncodedPair],
    pub(crate) valid: &'a [EncodedPair],
    /// The base model's log-probabilities of the training pairs in a full fine-tuning run. A
    /// LoRA run computes them with the adapters off instead.
    pub(crate) reference: Option<&'a [(f64, f64)]>,
    pub(crate) valid_reference: Option<&'a [(f64, f64)]>,
    pub(crate) beta: f64,
    pub(crate) batch_size: usize,
    pub(crate) pad: u32,
}

impl StepMethod for DpoSteps<'_> {
    fn gradients(&self, indices: &[usize], rng: &mut Rng) -> Result<StepGradients, TrainError> {
        let totals = accumulate_gradients(self.model, self.vars, self.train, indices, self.reference, self.beta, self.batch_size, rng, self.pad)?;
        let preference = summarize(&totals.rewards);
        tracing::debug!(train_loss = totals.loss, reward_margin = preference.reward_margin, "DPO step");
        Ok(StepGradients {
            loss: totals.loss,
            token_accuracy: totals.chosen_correct as f64 / totals.chosen_targets.max(1) as f64,
            n_tokens: totals.n_tokens,
            grads: totals.grads,
            preference: Some(preference),
        })
    }

    fn evaluate(&self) -> Result<Option<(f64, f64)>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let evaluation = evaluate_pairs(self.model, self.valid, self.valid_reference, self.beta, self.batch_size, self.pad)?;
        Ok(Some((evaluation.loss, evaluation.token_accuracy)))
    }
}

#[allow(clippy::too_many_arguments)]
fn accumulate_gradients(
    model: &Llama,
    vars: &[(String, Var)],
    train: &[EncodedPair],
    indices: &[usize],
    reference: Option<&[(f64, f64)]>,
    beta: f64,
    batch_size: usize,
    rng: &mut Rng,
    pad: u32,
) -> Result<StepTotals, TrainError> {
    let n_pairs = indices.len() as f64;
    let mut totals = StepTotals {
        loss: 0.0,
        rewards: Vec::with_capacity(indices.len()),
        chosen_correct: 0,
        chosen_targets: 0,
        n_tokens: 0,
        grads: Vec::new(),
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for chunk in indices.chunks(batch_size.max(1)) {
        let pairs: Vec<&EncodedPair> = chunk.iter().map(|&i| &train[i]).collect();
        totals.n_tokens += pairs.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).sum::<usize>();
        let (reference_chosen, reference_rejected): (Vec<f64>, Vec<f64>) = match reference {
            Some(values) => chunk.iter().map(|&i| values[i]).unzip(),
            None => {
                let mut off = ForwardContext {
                    rng: None,
                    adapters_enabled: false,
                };
                let (chosen, rejected) = pair_log_probs(model, &pairs, pad, &mut off)?;
                (to_f64s(&chosen)?, to_f64s(&rejected)?)
            }
        };
        let mut ctx = ForwardContext {
            rng: Some(&mut *rng),
            adapters_enabled: true,
        };
        let scored = score_pairs(model, &pairs, pad, &mut ctx)?;
        totals.chosen_correct += scored.chosen_correct;
        totals.chosen_targets += scored.chosen_targets;
        let (chosen, rejected) = (scored.chosen, scored.rejected);
        let device = chosen.device().clone();
        let as_tensor = |values: &[f64]| -> candle_core::Result<Tensor> {
            Tensor::from_vec(values.to_vec(), values.len(), &device)?.to_dtype(chosen.dtype())
        };
        let losses = dpo_losses(&chosen, &rejected, &as_tensor(&reference_chosen)?, &as_tensor(&reference_rejected)?, beta)?;
        let scaled = (losses.sum_all()? / n_pairs)?;
        totals.loss += scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        totals.rewards.extend(rewards(
            (&to_f64s(&chosen)?, &to_f64s(&rejected)?),
            (&reference_chosen, &reference_rejected),
            beta,
        ));
        let store = scaled.backward()?;
        for (slot, (_, var)) in grads.iter_mut().zip(vars) {
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
        .zip(vars)
        .map(|(grad, (name, var))| match grad {
            Some(grad) => Ok(grad),
            // A variable outside the loss's graph gets a zero gradient.
            None => {
                tracing::debug!(parameter = %name, "no gradient this step");
                Ok(var.as_tensor().zeros_like()?)
            }
        })
        .collect::<Result<_, TrainError>>()?;
    Ok(totals)
}

/// Runs DPO and writes the artifacts under `job.output_dir`, as [`crate::run_sft`] does.
///
/// Runs on the calling thread until done; call it from a blocking thread in async code.
pub fn run_dpo(job: &DpoJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
    validate_settings(&job.settings, DPO_HYPERPARAMETERS)?;
    if !(job.beta.is_finite() && job.beta > 0.0) {
        return Err(invalid(&format!("beta {} must be a positive number", job.beta), &format!("{DPO_HYPERPARAMETERS}.beta")));
    }
    if let Approach::Lora(settings) = &job.approach {
        lora::validate(settings)?;
    }
    let device = Device::Cpu;
    let settings = &job.settings;
    let sft = job.as_sft();

    let mut loaded = load_model(job.model_path, &device)?;
    observer.on_event(EventLevel::Info, &format!("Loaded base model {}", job.base_model_name));
    if job.pairs.is_empty() {
        return Err(invalid("the training file has no preference pairs", "training_file"));
    }
    let train = encode_pairs(&loaded, job.pairs, settings.max_seq_len, "training file", observer)?;
    let valid = match job.validation {
        Some(pairs) => encode_pairs(&loaded, pairs, settings.max_seq_len, "validation file", observer)?,
        None => Vec::new(),
    };
    let pad = loaded.special.pad;

    let mut rng = Rng::new(settings.seed);
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    loaded.weights.clear();
    // Before the weights become trainable and before a checkpoint is restored, so the reference
    // is always the base model.
    let (reference, valid_reference) = match &job.approach {
        Approach::Lora(_) => (None, None),
        Approach::Full => {
            let values = reference_log_probs(&model, &train, settings.batch_size, pad)?;
            let valid_values = reference_log_probs(&model, &valid, settings.batch_size, pad)?;
            observer.on_event(
                EventLevel::Info,
                &format!("Computed reference log-probabilities of {}", plural((train.len() + valid.len()) as u64, "pair")),
            );
            (Some(values), Some(valid_values))
        }
    };
    let vars = trainable_vars(&mut model, &job.approach, &mut rng, observer, settings.learning_rate)?;

    let method = DpoSteps {
        model: &model,
        vars: &vars,
        train: &train,
        valid: &valid,
        reference: reference.as_deref(),
        valid_reference: valid_reference.as_deref(),
        beta: job.beta,
        batch_size: settings.batch_size,
        pad,
    };
    let validation = if valid.is_empty() {
        String::new()
    } else {
        format!(" (and {} for validation)", plural(valid.len() as u64, "pair"))
    };
    let describe = |total_steps: u64, trainable: usize| {
        format!(
            "Training on {}{validation} for {} with beta {}: {}, {trainable} trainable parameters",
            plural(train.len() as u64, "preference pair"),
            plural(settings.n_epochs as u64, "epoch"),
            job.beta,
            plural(total_steps, "step"),
        )
    };
    let steps = StepLoop {
        job: &sft,
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
    let artifacts = write_artifacts(&sft, &model, &metadata)?;
    observer.on_event(EventLevel::Info, &format!("Saved the result after {}", plural(progress.step, "step")));
    Ok(RunOutcome::Succeeded(TrainSummary {
        trained_tokens: progress.trained_tokens,
        steps: progress.step,
        skipped_steps: progress.skipped_steps,
        artifacts,
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use studio_core::dataset::{Message, Role};

    use super::*;
    use crate::checkpoint;
    use crate::run::{StepMetrics, StopRequest};

    #[derive(Default)]
    struct Recorder {
        steps: Vec<PreferenceMetrics>,
        valid_losses: Vec<Option<f64>>,
        stop_after: Option<u64>,
    }

    impl TrainObserver for Recorder {
        fn on_step(&mut self, _metrics: &StepMetrics) {
            panic!("a DPO run reports its steps through on_preference_step");
        }

        fn on_preference_step(&mut self, metrics: &StepMetrics, preference: &PreferenceMetrics) {
            self.steps.push(*preference);
            self.valid_losses.push(metrics.valid_loss);
        }

        fn on_event(&mut self, _level: EventLevel, _message: &str) {}

        fn stop_request(&mut self) -> Option<StopRequest> {
            match self.stop_after {
                Some(step) if self.steps.len() as u64 >= step => Some(StopRequest::Suspend),
                _ => None,
            }
        }
    }

    fn pairs() -> Vec<PreferencePair> {
        let pair = |prompt: &str, chosen: &str, rejected: &str| PreferencePair {
            prompt: vec![Message {
                role: Role::User,
                content: prompt.into(),
                weight: None,
            }],
            chosen: chosen.into(),
            rejected: rejected.into(),
        };
        vec![
            pair("sky?", "blue", "green"),
            pair("grass?", "green", "blue"),
            pair("snow?", "white", "black"),
            pair("coal?", "black", "white"),
        ]
    }

    fn job<'a>(model: &'a Path, pairs: &'a [PreferencePair], out: &'a Path, approach: Approach) -> DpoJob<'a> {
        DpoJob {
            model_path: model,
            base_model_name: "tiny",
            pairs,
            validation: None,
            approach,
            settings: TrainSettings {
                n_epochs: 6,
                batch_size: 2,
                learning_rate: 1e-2,
                ..TrainSettings::default()
            },
            beta: 0.5,
            output_dir: out,
            checkpoint_dir: None,
            resume_from: None,
            export_merged: false,
        }
    }

    #[test]
    fn full_dpo_run_widens_reward_margin() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        crate::tiny::write_tiny_model_folder(&model, "llama", 5).unwrap();
        let pairs = pairs();
        let out = dir.path().join("out");
        let mut recorder = Recorder::default();
        let outcome = run_dpo(&job(&model, &pairs, &out, Approach::Full), &mut recorder).unwrap();

        let RunOutcome::Succeeded(summary) = outcome else {
            panic!("the run stopped: {outcome:?}");
        };
        assert_eq!(summary.steps, 12);
        assert_eq!(recorder.steps[0].reward_margin, 0.0, "the first step's policy is the base model");
        let last = recorder.steps.last().unwrap();
        assert!(last.reward_margin > 0.5, "{last:?}");
        assert_eq!(last.reward_accuracy, 1.0, "{last:?}");
        assert!(out.join("model").join("config.json").is_file());
    }

    #[test]
    fn full_dpo_validation_loss_falls() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        crate::tiny::write_tiny_model_folder(&model, "llama", 5).unwrap();
        let pairs = pairs();
        let out = dir.path().join("out");
        let mut scored = job(&model, &pairs, &out, Approach::Full);
        scored.validation = Some(&pairs[..3]);
        let mut recorder = Recorder::default();
        run_dpo(&scored, &mut recorder).unwrap();

        // Two steps per epoch, evaluated at each epoch's end.
        let evaluated: Vec<usize> = (0..recorder.valid_losses.len()).filter(|&i| recorder.valid_losses[i].is_some()).collect();
        assert_eq!(evaluated, [1, 3, 5, 7, 9, 11]);
        let first = recorder.valid_losses[1].unwrap();
        let last = recorder.valid_losses[11].unwrap();
        // The reference stays the base model, so the loss can fall below ln 2 as the margins grow.
        assert!(last < std::f64::consts::LN_2 - 0.1, "last validation loss {last}");
        assert!(last < first, "validation loss rose from {first} to {last}");
    }

    #[test]
    fn untrained_pairs_evaluate_to_ln_2() {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("model");
        crate::tiny::write_tiny_model_folder(&model_dir, "llama", 7).unwrap();
        let loaded = load_model(&model_dir, &Device::Cpu).unwrap();
        let model = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
        let encoded = encode_pairs(&loaded, &pairs(), 64, "validation file", &mut Recorder::default()).unwrap();

        let evaluation = evaluate_pairs(&model, &encoded, None, 0.1, 3, loaded.special.pad).unwrap();
        assert!((evaluation.loss - std::f64::consts::LN_2).abs() < 1e-12, "{evaluation:?}");
        assert_eq!(evaluation.preference.reward_accuracy, 0.0);

        // A reference that scores each chosen reply 1 nat lower gives margin 0.1 to every pair.
        let reference: Vec<(f64, f64)> = encoded
            .iter()
            .map(|pair| {
                let (chosen, rejected) = pair_log_probs(&model, &[pair], loaded.special.pad, &mut ForwardContext::eval()).unwrap();
                (to_f64s(&chosen).unwrap()[0] - 1.0, to_f64s(&rejected).unwrap()[0])
            })
            .collect();
        let shifted = evaluate_pairs(&model, &encoded, Some(&reference), 0.1, 3, loaded.special.pad).unwrap();
        let expected = (1.0 + (-0.1f64).exp()).ln();
        assert!((shifted.loss - expected).abs() < 1e-5, "{shifted:?}, expected {expected}");
        assert_eq!(shifted.preference.reward_accuracy, 1.0);
    }

    #[test]
    fn lora_dpo_resume_matches_uninterrupted_run() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        crate::tiny::write_tiny_model_folder(&model, "llama", 6).unwrap();
        let pairs = pairs();
        let approach = Approach::Lora(crate::LoraSettings {
            dropout: 0.1,
            ..crate::LoraSettings::default()
        });

        let whole_out = dir.path().join("whole");
        run_dpo(&job(&model, &pairs, &whole_out, approach.clone()), &mut Recorder::default()).unwrap();

        let checkpoints = dir.path().join("checkpoints");
        let resumed_out = dir.path().join("resumed");
        let mut first = job(&model, &pairs, &resumed_out, approach.clone());
        first.checkpoint_dir = Some(&checkpoints);
        let mut stopping = Recorder {
            stop_after: Some(5),
            ..Recorder::default()
        };
        let outcome = run_dpo(&first, &mut stopping).unwrap();
        assert_eq!(outcome, RunOutcome::Stopped { steps: 5, request: StopRequest::Suspend });

        let resume = checkpoints.join(checkpoint::folder_name(5));
        let mut second = job(&model, &pairs, &resumed_out, approach);
        second.resume_from = Some(&resume);
        let mut rest = Recorder::default();
        run_dpo(&second, &mut rest).unwrap();
        assert_eq!(rest.steps.len(), 7);

        let read = |out: &Path| candle_core::safetensors::load(out.join("adapter").join(lora::ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
        let (whole, resumed) = (read(&whole_out), read(&resumed_out));
        assert_eq!(whole.len(), resumed.len());
        for (name, tensor) in &whole {
            let difference = (tensor - &resumed[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(difference, 0.0, "{name} differs after resuming");
        }
    }
}

//! The optimizer step loop that supervised, DPO and distillation runs share: epochs and their
//! shuffled order, skipped non-finite steps, clipping, the learning-rate schedule, evaluation,
//! checkpoints, stop requests and resuming from a checkpoint.

use std::collections::BTreeSet;
use std::time::Instant;

use candle_core::{Tensor, Var};

use crate::checkpoint::{self, TrainerState};
use crate::dpo::PreferenceMetrics;
use crate::model::Llama;
use crate::optim::{grad_norm, AdamW, AdamWConfig};
use crate::rng::Rng;
use crate::run::{
    invalid, weights_file, write_checkpoint, Approach, CheckpointInfo, EventLevel, RunOutcome, SftJob, StepMetrics,
    StopRequest, TrainObserver,
};
use crate::schedule::Schedule;
use crate::TrainError;

/// A run fails after this many non-finite steps in a row.
pub const MAX_CONSECUTIVE_SKIPPED_STEPS: u64 = 3;

/// The gradients and figures of one optimizer step, before clipping.
pub(crate) struct StepGradients {
    /// The step's mean loss.
    pub(crate) loss: f64,
    /// Share of target tokens that the model predicted by argmax before the update.
    pub(crate) token_accuracy: f64,
    /// Tokens the step processed, padding excluded.
    pub(crate) n_tokens: usize,
    /// One per trained variable, summed over the step's micro-batches.
    pub(crate) grads: Vec<Tensor>,
    /// The rewards of a DPO step.
    pub(crate) preference: Option<PreferenceMetrics>,
}

/// A training method's part of the loop: the forward and backward passes of one step, and the
/// validation score.
pub(crate) trait StepMethod {
    /// Runs the forward and backward passes over the training items at `indices`.
    fn gradients(&self, indices: &[usize], rng: &mut Rng) -> Result<StepGradients, TrainError>;

    /// Scores the validation set as (loss, token accuracy), or returns `None` without one.
    fn evaluate(&self) -> Result<Option<(f64, f64)>, TrainError>;
}

/// A model with its trainable variables attached, and the run that trains it.
pub(crate) struct StepLoop<'a> {
    /// The run's settings and folders. A DPO or distillation run passes the supervised job with
    /// the same outputs.
    pub(crate) job: &'a SftJob<'a>,
    pub(crate) model: &'a Llama,
    pub(crate) vars: &'a [(String, Var)],
    /// Training items (examples or pairs) per epoch.
    pub(crate) n_items: usize,
    /// The generator after the adapters were initialised. A resumed run replaces it with the
    /// checkpoint's.
    pub(crate) rng: Rng,
}

/// The end of the loop: every step done, or a stop.
pub(crate) enum LoopEnd {
    /// Every planned step ran. The caller writes the artifacts.
    Finished(Progress),
    /// The observer stopped the run, after a checkpoint when it asked to suspend.
    Stopped(RunOutcome),
}

impl StepLoop<'_> {
    /// Creates the optimizer, restores `job.resume_from` when set, and runs the remaining steps.
    /// `describe` returns the start event of a fresh run from the planned steps and the number
    /// of trainable parameters.
    pub(crate) fn run(
        mut self,
        method: &dyn StepMethod,
        observer: &mut dyn TrainObserver,
        describe: &dyn Fn(u64, usize) -> String,
    ) -> Result<LoopEnd, TrainError> {
        let (job, model, vars) = (self.job, self.model, self.vars);
        let settings = &job.settings;
        let optimizer_config = AdamWConfig {
            weight_decay: settings.weight_decay,
            ..AdamWConfig::default()
        };
        let mut optimizer = AdamW::new(vars.iter().map(|(_, var)| var.clone()).collect(), optimizer_config)?;

        let items_per_step = settings.batch_size * settings.gradient_accumulation_steps;
        let steps_per_epoch = self.n_items.div_ceil(items_per_step) as u64;
        let total_steps = steps_per_epoch * settings.n_epochs as u64;
        let schedule = Schedule {
            peak_lr: settings.learning_rate,
            warmup_steps: (settings.warmup_ratio * total_steps as f64).ceil() as u64,
            total_steps,
            decay: settings.lr_scheduler,
        };
        let checkpoint_steps = planned_checkpoints(total_steps, settings.checkpoint_interval, settings.n_checkpoints);

        let mut progress = Progress::default();
        if let Some(dir) = job.resume_from {
            let state = checkpoint::read_state(dir)?;
            if state.total_steps != total_steps {
                return Err(invalid(
                    &format!("checkpoint {} plans {} steps but this run plans {total_steps}; resume with the same data and settings", dir.display(), state.total_steps),
                    "checkpoint",
                ));
            }
            checkpoint::restore(dir, weights_file(&job.approach), vars, &mut optimizer, &state, model.device())?;
            self.rng = state.rng.clone();
            progress = Progress::from_state(&state);
            observer.on_event(EventLevel::Info, &format!("Resumed from the checkpoint at step {}", state.step));
        } else {
            let trainable: usize = vars.iter().map(|(_, var)| var.elem_count()).sum();
            observer.on_event(EventLevel::Info, &describe(total_steps, trainable));
        }
        let rng = &mut self.rng;

        // Stopping here needs no checkpoint: no step ran since the start or the resumed one.
        if let Some(request) = observer.stop_request() {
            observer.on_event(EventLevel::Info, &format!("Stopped before step {}", progress.step + 1));
            return Ok(LoopEnd::Stopped(RunOutcome::Stopped { steps: progress.step, request }));
        }
        while progress.epoch < settings.n_epochs {
            if progress.position == 0 {
                progress.order = (0..self.n_items).collect();
                rng.shuffle(&mut progress.order);
            }
            while progress.position < progress.order.len() {
                let started = Instant::now();
                let end = (progress.position + items_per_step).min(progress.order.len());
                let indices = progress.order[progress.position..end].to_vec();
                progress.position = end;
                progress.step += 1;
                let step = progress.step;

                let totals = method.gradients(&indices, rng)?;
                let norm = grad_norm(&totals.grads)?;
                if !totals.loss.is_finite() || !norm.is_finite() {
                    progress.skipped_steps += 1;
                    progress.consecutive_skipped += 1;
                    observer.on_event(
                        EventLevel::Warn,
                        &format!("Skipped step {step}: loss {} and gradient norm {norm} are not both finite", totals.loss),
                    );
                    if progress.consecutive_skipped >= MAX_CONSECUTIVE_SKIPPED_STEPS {
                        return Err(TrainError::NonFinite(format!(
                            "{} steps in a row up to step {step} produced a non-finite loss or gradient; lower the learning rate",
                            progress.consecutive_skipped
                        )));
                    }
                    continue;
                }
                progress.consecutive_skipped = 0;

                let grads = clip(totals.grads, norm, settings.max_grad_norm)?;
                let learning_rate = schedule.learning_rate(step);
                optimizer.step_with(&grads, learning_rate)?;
                progress.trained_tokens += totals.n_tokens as u64;

                let epoch_done = progress.position >= progress.order.len();
                let mut metrics = StepMetrics {
                    step,
                    total_steps,
                    epoch: progress.epoch as f64 + progress.position as f64 / progress.order.len() as f64,
                    train_loss: totals.loss,
                    train_mean_token_accuracy: totals.token_accuracy,
                    valid_loss: None,
                    valid_mean_token_accuracy: None,
                    learning_rate,
                    grad_norm: norm,
                    tokens_per_second: totals.n_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                    trained_tokens: progress.trained_tokens,
                };
                let eval_due = settings.eval_interval > 0 && step % settings.eval_interval == 0;
                if eval_due || epoch_done {
                    if let Some((loss, accuracy)) = method.evaluate()? {
                        metrics.valid_loss = Some(loss);
                        metrics.valid_mean_token_accuracy = Some(accuracy);
                    }
                }
                tracing::debug!(step, train_loss = metrics.train_loss, learning_rate, grad_norm = norm, "optimizer step");
                match &totals.preference {
                    Some(preference) => observer.on_preference_step(&metrics, preference),
                    None => observer.on_step(&metrics),
                }

                if epoch_done {
                    progress.epoch += 1;
                    progress.position = 0;
                }
                // Checked after the epoch bookkeeping above, so a checkpoint written here resumes
                // exactly like a planned one.
                let stop = observer.stop_request();
                let suspend = stop == Some(StopRequest::Suspend) && !checkpoint_steps.contains(&step);
                if let (Some(dir), true) = (job.checkpoint_dir, checkpoint_steps.contains(&step) || suspend) {
                    let state = progress.state(rng, schedule, vars, &job.approach, optimizer.step_count());
                    let path = write_checkpoint(dir, job, model, vars, &optimizer, &state)?;
                    observer.on_checkpoint(&CheckpointInfo { step, dir: path, metrics: metrics.clone() });
                }
                if let Some(request) = stop {
                    observer.on_event(EventLevel::Info, &format!("Stopped after step {step}"));
                    return Ok(LoopEnd::Stopped(RunOutcome::Stopped { steps: step, request }));
                }
                if epoch_done {
                    break;
                }
            }
            // A skipped last step of an epoch leaves the loop without the advance above.
            if progress.position > 0 && progress.position >= progress.order.len() {
                progress.epoch += 1;
                progress.position = 0;
            }
        }
        Ok(LoopEnd::Finished(progress))
    }
}

/// The loop's position, which a checkpoint stores besides tensors.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) step: u64,
    pub(crate) epoch: usize,
    pub(crate) position: usize,
    pub(crate) order: Vec<usize>,
    pub(crate) trained_tokens: u64,
    pub(crate) skipped_steps: u64,
    pub(crate) consecutive_skipped: u64,
}

impl Progress {
    pub(crate) fn from_state(state: &TrainerState) -> Self {
        Self {
            step: state.step,
            epoch: state.epoch,
            position: state.position,
            order: state.epoch_order.clone(),
            trained_tokens: state.trained_tokens,
            skipped_steps: state.skipped_steps,
            consecutive_skipped: 0,
        }
    }

    pub(crate) fn state(&self, rng: &Rng, schedule: Schedule, vars: &[(String, Var)], approach: &Approach, optimizer_steps: u64) -> TrainerState {
        TrainerState {
            step: self.step,
            total_steps: schedule.total_steps,
            epoch: self.epoch,
            position: self.position,
            epoch_order: if self.position == 0 { Vec::new() } else { self.order.clone() },
            rng: rng.clone(),
            schedule,
            trained_tokens: self.trained_tokens,
            skipped_steps: self.skipped_steps,
            optimizer_steps,
            parameters: vars.iter().map(|(name, _)| name.clone()).collect(),
            approach: match approach {
                Approach::Lora(_) => "lora".into(),
                Approach::Full => "full".into(),
            },
        }
    }
}

/// Steps (1-based) after which a checkpoint is written.
pub(crate) fn planned_checkpoints(total_steps: u64, interval: u64, count: u64) -> BTreeSet<u64> {
    let mut steps = BTreeSet::new();
    if let Some(intervals) = total_steps.checked_div(interval) {
        steps.extend((1..=intervals).map(|k| k * interval));
    }
    for k in 1..=count.min(total_steps) {
        steps.insert((total_steps * k).div_ceil(count));
    }
    steps
}

/// Scales gradients so their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (including its 1e-6 guard).
pub(crate) fn clip(grads: Vec<Tensor>, norm: f64, max_norm: f64) -> Result<Vec<Tensor>, TrainError> {
    if max_norm <= 0.0 || norm <= max_norm {
        return Ok(grads);
    }
    let factor = max_norm / (norm + 1e-6);
    Ok(grads.into_iter().map(|g| g * factor).collect::<candle_core::Result<_>>()?)
}

use studio_train::{DistillJob, DpoJob, RunOutcome, SftJob, TrainError, TrainObserver};

/// The training step of a job, behind a trait so tests can replace the real trainer with a
/// fast fake. Called on a blocking thread.
pub trait Trainer: Send + Sync + 'static {
    fn run_sft(
        &self,
        job: &SftJob<'_>,
        observer: &mut dyn TrainObserver,
    ) -> Result<RunOutcome, TrainError>;

    /// Runs a DPO job. Trainers that serve only supervised jobs keep this default, which fails
    /// the job.
    fn run_dpo(&self, _job: &DpoJob<'_>, _observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        Err(TrainError::InvalidData {
            message: "this worker's trainer does not run DPO jobs; use the candle trainer".into(),
            param: Some("method.type".into()),
        })
    }

    /// Runs a distillation job. Trainers that serve only supervised jobs keep this default,
    /// which fails the job.
    fn run_distillation(&self, _job: &DistillJob<'_>, _observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        Err(TrainError::InvalidData {
            message: "this worker's trainer does not run distillation jobs; use the candle trainer".into(),
            param: Some("method.type".into()),
        })
    }
}

/// The candle trainer of `studio-train`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CandleTrainer;

impl Trainer for CandleTrainer {
    fn run_sft(
        &self,
        job: &SftJob<'_>,
        observer: &mut dyn TrainObserver,
    ) -> Result<RunOutcome, TrainError> {
        studio_train::run_sft(job, observer)
    }

    fn run_dpo(&self, job: &DpoJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        studio_train::run_dpo(job, observer)
    }

    fn run_distillation(&self, job: &DistillJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        studio_train::run_distillation(job, observer)
    }
}

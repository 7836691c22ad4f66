use studio_train::{RunOutcome, SftJob, TrainError, TrainObserver};

/// The training step of a job, behind a trait so tests can replace the real trainer with a
/// fast fake. Called on a blocking thread.
pub trait Trainer: Send + Sync + 'static {
    fn run_sft(
        &self,
        job: &SftJob<'_>,
        observer: &mut dyn TrainObserver,
    ) -> Result<RunOutcome, TrainError>;
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
}

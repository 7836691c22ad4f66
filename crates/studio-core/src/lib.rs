//! Domain types of Smart Studio. This crate does no I/O: it parses and validates values that
//! the API, the store, the worker and the trainer share.

pub mod dataset;
pub mod ids;
pub mod spec;
pub mod status;

pub use ids::{CheckpointId, EventId, FileId, InvalidId, JobId};
pub use spec::{JobSpec, LrScheduler, SpecError, SpecErrorKind, TrainingType};
pub use status::JobStatus;

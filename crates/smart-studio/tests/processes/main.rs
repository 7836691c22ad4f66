//! Process-level tests: the real `smart-studio` binary runs as child processes (`migrate`,
//! `serve`, `worker`) against Postgres and trains the real SmolLM2-135M-Instruct model, while
//! the test kills a worker or stops the database under a running job.
//!
//! Needs `DATABASE_URL` (a Postgres server on which the user may create databases), `initdb`
//! and `pg_ctl` on `PATH`, and the model file (`cargo run -p smart-studio -- fetch-model`).
//! The `train` tests need none of these: they run `smart-studio train` on tiny random models.

mod api;
mod children;
mod crash;
mod data;
mod database;
mod database_restart;
mod postgres_server;
mod train;

use tokio::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::const_new(());

/// Runs the tests of this binary one at a time: each trains the real model, and two trainings
/// side by side on a small machine would slow each other past their lease and poll deadlines.
pub async fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

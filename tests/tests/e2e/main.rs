//! End-to-end tests: the real REST API and worker in this process, a fresh Postgres database and
//! data folder per test, the real SmolLM2-135M-Instruct model and real conversations.
//!
//! Needs `DATABASE_URL` (a Postgres server on which the user may create databases), the model
//! file (`cargo run -p smart-studio -- fetch-model`) and `../shared/data/` beside the repository.
//! The S3 test also needs moto's server (`STUDIO_TEST_MOTO`, or `.venv-ci/bin/moto_server`).

mod app;
mod chat;
mod data;
mod database;
mod jobs;
mod lora;
// The moto helper of studio-store's S3 tests, compiled into this binary too.
#[path = "../../../crates/studio-store/tests/artifacts/moto.rs"]
mod moto;
mod s3;
mod uploads;

//! End-to-end tests: the real REST API and worker in this process, a fresh Postgres database and
//! data folder per test, the real SmolLM2-135M-Instruct model and real conversations.
//!
//! Needs `DATABASE_URL` (a Postgres server on which the user may create databases), the model
//! file (`cargo run -p smart-studio -- fetch-model`) and `../shared/data/` beside the repository.

mod app;
mod data;
mod database;
mod jobs;
mod lora;
mod uploads;

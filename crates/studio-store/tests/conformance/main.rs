//! The `Store` contract checked against both backends: every case of `suite` runs on SQLite
//! always, and on Postgres at `DATABASE_URL`, which must be set.

#[macro_use]
mod suite;

mod postgres;
mod queue;
mod sqlite;

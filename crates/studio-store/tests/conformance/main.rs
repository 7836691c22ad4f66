//! The `Store` contract checked against both backends: every case of `suite` runs on SQLite
//! always, and on Postgres when `DATABASE_URL` is set.

#[macro_use]
mod suite;

mod postgres;
mod sqlite;

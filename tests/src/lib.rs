//! End-to-end tests of Smart Studio live in `tests/e2e/`: one test binary that runs the REST API
//! and a worker in process against a real Postgres and the real demo model.

//! Domain types of Smart Studio. This crate does no I/O: it parses and validates values that
//! the API, the store, the worker and the trainer share.

pub mod dataset;

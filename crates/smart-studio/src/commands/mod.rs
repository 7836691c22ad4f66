//! One module per subcommand.

pub mod chat;
pub mod demo;
pub mod eval;
pub mod fetch_model;
pub mod migrate;
pub mod serve;
pub mod train;
pub mod up;
pub mod worker;

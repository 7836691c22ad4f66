//! One module per subcommand.

pub mod demo;
pub mod fetch_model;
pub mod migrate;
pub mod serve;
pub mod up;
pub mod worker;

//! The `ringfence` subcommands.

pub mod check;
pub mod local;
pub mod runs;
pub mod spawn;

//! The `ringfence` subcommands.

pub mod check;
pub mod demo;
pub mod local;
pub mod runs;
pub mod spawn;
